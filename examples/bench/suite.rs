//! The measurement plan and the table: runs every load against every target
//! in turn (targets interleaved within each repetition, so drift on a shared
//! machine hits them alike), samples memory and CPU from /proc, and renders
//! medians and ratios as one Markdown table.
//!
//! Shared by the `bench` example and by the integration test that keeps the
//! benchmark runnable, so the test exercises the same code as a real run.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::load::{self, Load, LoadStats, StreamStats, Streams};

/// Something to measure: an HTTP endpoint and the process (with its children) serving it.
pub struct Target {
    pub name: String,
    pub addr: SocketAddr,
    /// Whose RSS and CPU to read; children (nginx workers) are included.
    pub pid: Option<u32>,
}

/// What to run.
pub struct Plan {
    pub reps: usize,
    /// Length of one non-streaming run.
    pub secs: f64,
    /// Cap on requests per non-streaming run.
    pub max_requests: u64,
    /// Keep-alive connections for the non-streaming runs.
    pub conns: Vec<usize>,
    /// Concurrent streams for the streaming runs.
    pub streams: Vec<usize>,
    /// How long one stream of the upstream lasts (starts are staggered over it).
    pub stream_length: Duration,
    /// Use wrk for non-streaming runs (else our own generator).
    pub wrk: Option<PathBuf>,
    /// Where wrk's script goes.
    pub work_dir: PathBuf,
    /// Unmeasured load before the first run.
    pub warmup: Duration,
}

/// Everything measured for one target.
#[derive(Default)]
pub struct Measured {
    pub name: String,
    pub idle_rss_kib: Option<u64>,
    pub peak_rss_kib: Option<u64>,
    /// `[conns index][rep]`
    pub load: Vec<Vec<LoadStats>>,
    /// `[streams index][rep]`
    pub streams: Vec<Vec<StreamStats>>,
    /// CPU seconds per 10,000 non-streaming requests, one per rep.
    pub cpu_per_10k: Vec<f64>,
    /// The user-space part of it.
    pub user_cpu_per_10k: Vec<f64>,
    /// Context switches (all threads) per non-streaming request, one per rep.
    pub switches_per_request: Vec<f64>,
}

impl Measured {
    /// Failed requests and streams over all runs.
    pub fn errors(&self) -> u64 {
        self.load.iter().flatten().map(|l| l.errors).sum::<u64>()
            + self
                .streams
                .iter()
                .flatten()
                .map(|s| s.errors as u64)
                .sum::<u64>()
    }
}

/// The results of one run of the plan; `targets[0]` is the baseline.
pub struct Results {
    pub conns: Vec<usize>,
    pub streams: Vec<usize>,
    pub reps: usize,
    pub generator: String,
    pub targets: Vec<Measured>,
}

/// Run the plan against `targets` (the first is the direct baseline).
/// `progress` gets one line per run.
pub fn measure(targets: &[Target], plan: &Plan, progress: &mut dyn FnMut(&str)) -> Results {
    let chat = load::chat_request("bench", load::CHAT_BODY);
    let stream = load::chat_request("bench", load::STREAM_BODY);
    let mut out: Vec<Measured> = targets
        .iter()
        .map(|t| Measured {
            name: t.name.clone(),
            idle_rss_kib: t.pid.and_then(|p| memory(p).map(|m| m.rss_kib)),
            load: vec![Vec::new(); plan.conns.len()],
            streams: vec![Vec::new(); plan.streams.len()],
            ..Measured::default()
        })
        .collect();
    let wrk_script = plan
        .wrk
        .as_ref()
        .and_then(|_| write_wrk_script(&plan.work_dir));
    for t in targets {
        let warm = Load {
            conns: 4,
            duration: plan.warmup,
            max_requests: plan.max_requests,
        };
        load::hammer(t.addr, &chat, &warm);
    }
    for rep in 0..plan.reps {
        // (user, user + system) CPU seconds per target.
        let mut cpu = vec![(0.0, 0.0); targets.len()];
        let mut switches = vec![0u64; targets.len()];
        let mut requests = vec![0u64; targets.len()];
        for (ci, &conns) in plan.conns.iter().enumerate() {
            for (ti, t) in targets.iter().enumerate() {
                let before = t.pid.and_then(cpu_secs);
                let switched = t.pid.map(context_switches);
                let stats = match (&plan.wrk, &wrk_script) {
                    (Some(wrk), Some(script)) => {
                        let run = wrk_run(wrk, script, t.addr, conns, plan.secs);
                        if run.is_none() {
                            progress("wrk failed; this run uses the bench's own client");
                        }
                        run
                    }
                    _ => None,
                }
                .unwrap_or_else(|| {
                    let l = Load {
                        conns,
                        duration: Duration::from_secs_f64(plan.secs),
                        max_requests: plan.max_requests,
                    };
                    load::hammer(t.addr, &chat, &l)
                });
                if let (Some(b), Some(a)) = (before, t.pid.and_then(cpu_secs)) {
                    cpu[ti].0 += a.0 - b.0;
                    cpu[ti].1 += a.1 - b.1;
                }
                if let (Some(b), Some(a)) = (switched, t.pid.map(context_switches)) {
                    switches[ti] += a.saturating_sub(b);
                }
                requests[ti] += stats.ok + stats.errors;
                progress(&format!(
                    "rep {}/{} {:>3} conns  {:<14} {:>9.0} req/s  p50 {:>8.3} ms  p99 {:>8.3} ms  errors {}",
                    rep + 1,
                    plan.reps,
                    conns,
                    t.name,
                    stats.rps(),
                    stats.p50_us / 1e3,
                    stats.p99_us / 1e3,
                    stats.errors
                ));
                out[ti].load[ci].push(stats);
            }
        }
        for ti in 0..targets.len() {
            if targets[ti].pid.is_some() && requests[ti] > 0 {
                let per_10k = |secs: f64| secs / requests[ti] as f64 * 10_000.0;
                out[ti].cpu_per_10k.push(per_10k(cpu[ti].1));
                out[ti].user_cpu_per_10k.push(per_10k(cpu[ti].0));
                out[ti]
                    .switches_per_request
                    .push(switches[ti] as f64 / requests[ti] as f64);
            }
        }
        for (si, &n) in plan.streams.iter().enumerate() {
            for (ti, t) in targets.iter().enumerate() {
                let spec = Streams {
                    n,
                    limit: plan.stream_length * 4 + Duration::from_secs(10),
                    stagger: plan.stream_length,
                    rounds: 2,
                };
                let stats = load::streams(t.addr, &stream, &spec, None);
                progress(&format!(
                    "rep {}/{} {:>3} streams {:<14} first event p50 {:>8.3} ms  chunk lag p50 {:>7.3} ms p99 {:>7.3} ms  completed {}/{n}",
                    rep + 1,
                    plan.reps,
                    n,
                    t.name,
                    stats.first_p50_us / 1e3,
                    stats.lag_p50_us / 1e3,
                    stats.lag_p99_us / 1e3,
                    stats.completed
                ));
                out[ti].streams[si].push(stats);
            }
        }
    }
    for (m, t) in out.iter_mut().zip(targets) {
        m.peak_rss_kib = t.pid.and_then(|p| memory(p).map(|m| m.hwm_kib));
    }
    Results {
        conns: plan.conns.clone(),
        streams: plan.streams.clone(),
        reps: plan.reps,
        generator: if wrk_script.is_some() {
            "wrk -t1 (non-streaming), bench's own client (streams)".into()
        } else {
            "bench's own keep-alive client".into()
        },
        targets: out,
    }
}

/// wrk's Lua script: POST the chat body, print one parseable line at the end.
fn write_wrk_script(dir: &Path) -> Option<PathBuf> {
    let path = dir.join("chat.lua");
    let script = format!(
        r#"wrk.method = "POST"
wrk.body = '{}'
wrk.headers["Content-Type"] = "application/json"
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format("BENCH ok=%d errors=%d duration_us=%d p50_us=%f p99_us=%f\n",
    summary.requests - e.status, e.connect + e.read + e.write + e.status + e.timeout,
    summary.duration, latency:percentile(50), latency:percentile(99)))
end
"#,
        load::CHAT_BODY
    );
    std::fs::write(&path, script).ok()?;
    Some(path)
}

/// One wrk run (one thread: the cheapest client, leaving CPU to the target).
fn wrk_run(
    wrk: &Path,
    script: &Path,
    addr: SocketAddr,
    conns: usize,
    secs: f64,
) -> Option<LoadStats> {
    let mut child = Command::new(wrk)
        .args([
            "-t1",
            &format!("-c{conns}"),
            &format!("-d{}s", secs.ceil().max(1.0)),
        ])
        .args(["--timeout", "5s", "-s"])
        .arg(script)
        .arg(format!("http://{addr}/v1/chat/completions"))
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .ok()?;
    let limit = Instant::now() + Duration::from_secs_f64(secs + 15.0);
    loop {
        match child.try_wait() {
            Ok(Some(_)) => break,
            Ok(None) if Instant::now() < limit => std::thread::sleep(Duration::from_millis(20)),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                return None;
            }
        }
    }
    let mut text = String::new();
    std::io::Read::read_to_string(&mut child.stdout.take()?, &mut text).ok()?;
    let line = text.lines().find(|l| l.starts_with("BENCH "))?;
    let field = |name: &str| -> Option<f64> {
        line.split_whitespace()
            .find_map(|kv| kv.strip_prefix(name)?.strip_prefix('='))?
            .parse()
            .ok()
    };
    Some(LoadStats {
        ok: field("ok")? as u64,
        errors: field("errors")? as u64,
        secs: field("duration_us")? / 1e6,
        p50_us: field("p50_us")?,
        p99_us: field("p99_us")?,
    })
}

/// Resident memory of a process and its children, KiB.
pub struct Memory {
    pub rss_kib: u64,
    pub hwm_kib: u64,
}

/// `pid` and its direct children (nginx's workers).
fn family(pid: u32) -> Vec<u32> {
    let mut all = vec![pid];
    if let Ok(dir) = std::fs::read_dir("/proc") {
        for entry in dir.flatten() {
            let Some(child) = entry
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<u32>().ok())
            else {
                continue;
            };
            if stat_fields(child)
                .is_some_and(|f| f.get(1).and_then(|p| p.parse().ok()) == Some(pid))
            {
                all.push(child);
            }
        }
    }
    all
}

/// Fields of /proc/PID/stat after the command name (state is the first).
fn stat_fields(pid: u32) -> Option<Vec<String>> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 1..];
    Some(rest.split_whitespace().map(str::to_string).collect())
}

/// VmRSS and VmHWM of `pid` and its children (shared pages counted per process).
pub fn memory(pid: u32) -> Option<Memory> {
    let mut m = Memory {
        rss_kib: 0,
        hwm_kib: 0,
    };
    for p in family(pid) {
        let status = std::fs::read_to_string(format!("/proc/{p}/status")).ok()?;
        let kib = |key: &str| -> u64 {
            status
                .lines()
                .find_map(|l| l.strip_prefix(key))
                .and_then(|v| v.split_whitespace().next()?.parse().ok())
                .unwrap_or(0)
        };
        m.rss_kib += kib("VmRSS:");
        m.hwm_kib += kib("VmHWM:");
    }
    Some(m)
}

/// User, and user plus system, CPU seconds of `pid` and its children so far.
pub fn cpu_secs(pid: u32) -> Option<(f64, f64)> {
    let tick = clock_ticks();
    let (mut user, mut total) = (0.0, 0.0);
    for p in family(pid) {
        let f = stat_fields(p)?;
        // utime and stime are fields 14 and 15; `f` starts at field 3.
        let ut: f64 = f.get(11)?.parse().ok()?;
        let st: f64 = f.get(12)?.parse().ok()?;
        user += ut / tick;
        total += (ut + st) / tick;
    }
    Some((user, total))
}

/// Voluntary plus involuntary context switches so far, summed over every
/// thread of `pid` and its children: what a blocking design pays per request.
pub fn context_switches(pid: u32) -> u64 {
    let mut total = 0;
    for p in family(pid) {
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{p}/task")) else {
            continue;
        };
        for task in tasks.flatten() {
            let Ok(status) = std::fs::read_to_string(task.path().join("status")) else {
                continue;
            };
            total += status
                .lines()
                .filter(|l| l.contains("ctxt_switches:"))
                .filter_map(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
                .sum::<u64>();
        }
    }
    total
}

fn clock_ticks() -> f64 {
    use std::sync::OnceLock;
    static TICKS: OnceLock<f64> = OnceLock::new();
    *TICKS.get_or_init(|| {
        Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(100.0)
    })
}

/// Median; NaN when empty.
pub fn median(mut v: Vec<f64>) -> f64 {
    v.retain(|x| x.is_finite());
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// Median over reps of `f(target rep) - f(baseline rep)`: paired, so a
/// slow moment of the machine cancels out.
fn added<T>(base: &[T], target: &[T], f: impl Fn(&T) -> f64) -> f64 {
    median(base.iter().zip(target).map(|(b, t)| f(t) - f(b)).collect())
}

fn ms(us: f64) -> String {
    if !us.is_finite() {
        return "n/a".into();
    }
    let v = us / 1e3;
    if v.abs() >= 10.0 {
        format!("{v:+.1}")
    } else {
        format!("{v:+.2}")
    }
}

fn abs_ms(us: f64) -> String {
    ms(us).trim_start_matches('+').to_string()
}

fn ratio(a: f64, b: f64) -> String {
    if a.is_finite() && b.is_finite() && b != 0.0 && (a / b).is_finite() {
        format!("{:.2}", a / b)
    } else {
        "—".into()
    }
}

/// `v` with two decimals, or a dash when there is no value.
fn two_places(v: f64) -> String {
    if v.is_finite() {
        format!("{v:.2}")
    } else {
        "—".into()
    }
}

fn mib(kib: Option<u64>) -> String {
    kib.map_or("—".into(), |k| format!("{:.1}", k as f64 / 1024.0))
}

fn plural(n: usize, one: &str, many: &str) -> String {
    format!("{n} {}", if n == 1 { one } else { many })
}

/// One Markdown table: a row per metric, a column per target, then the ratios
/// of the second target (the balancer) to each later one (nginx, the floor)
/// and to the first (direct).
pub fn render(r: &Results) -> String {
    let names: Vec<&str> = r.targets.iter().map(|t| t.name.as_str()).collect();
    let base = &r.targets[0];
    let bal = r.targets.get(1);
    // The balancer against every other proxy, then against direct.
    let others = 2..r.targets.len();
    let mut header = vec!["metric (median of reps)".to_string()];
    header.extend(names.iter().map(|n| n.to_string()));
    if let Some(b) = bal {
        for o in &r.targets[others.clone()] {
            header.push(format!("{} / {}", b.name, o.name));
        }
        header.push(format!("{} / {}", b.name, base.name));
    }
    let mut rows: Vec<Vec<String>> = Vec::new();
    // Each row: cells per target, then ratio cells computed from `num` values.
    let mut push = |label: String, cells: Vec<String>, num: Vec<f64>| {
        let mut row = vec![label];
        row.extend(cells);
        if bal.is_some() {
            for o in others.clone() {
                row.push(ratio(num[1], num[o]));
            }
            row.push(ratio(num[1], num[0]));
        }
        rows.push(row);
    };
    for (ci, &c) in r.conns.iter().enumerate() {
        let rps: Vec<f64> = r
            .targets
            .iter()
            .map(|t| median(t.load[ci].iter().map(LoadStats::rps).collect()))
            .collect();
        push(
            format!("req/s, {}", plural(c, "conn", "conns")),
            rps.iter().map(|v| format!("{v:.0}")).collect(),
            rps.clone(),
        );
    }
    for (ci, &c) in r.conns.iter().enumerate() {
        let mut cells = Vec::new();
        let mut p50s = Vec::new();
        for (ti, t) in r.targets.iter().enumerate() {
            if ti == 0 {
                let p50 = median(t.load[ci].iter().map(|l| l.p50_us).collect());
                let p99 = median(t.load[ci].iter().map(|l| l.p99_us).collect());
                cells.push(format!("{} / {}", abs_ms(p50), abs_ms(p99)));
                p50s.push(f64::NAN);
            } else {
                let a50 = added(&base.load[ci], &t.load[ci], |l| l.p50_us);
                let a99 = added(&base.load[ci], &t.load[ci], |l| l.p99_us);
                cells.push(format!("{} / {}", ms(a50), ms(a99)));
                p50s.push(a50);
            }
        }
        push(
            format!("latency p50 / p99 ms, {}", plural(c, "conn", "conns")),
            cells,
            p50s,
        );
    }
    type Pick = fn(&StreamStats) -> f64;
    let stream_rows: [(&str, Pick, Pick); 2] = [
        ("first event", |s| s.first_p50_us, |s| s.first_p99_us),
        ("chunk lag", |s| s.lag_p50_us, |s| s.lag_p99_us),
    ];
    for (what, p50, p99) in stream_rows {
        for (si, &n) in r.streams.iter().enumerate() {
            let mut cells = Vec::new();
            let mut nums = Vec::new();
            for (ti, t) in r.targets.iter().enumerate() {
                if ti == 0 {
                    let a = median(t.streams[si].iter().map(p50).collect());
                    let b = median(t.streams[si].iter().map(p99).collect());
                    cells.push(format!("{} / {}", abs_ms(a), abs_ms(b)));
                    nums.push(f64::NAN);
                } else {
                    let a = added(&base.streams[si], &t.streams[si], p50);
                    let b = added(&base.streams[si], &t.streams[si], p99);
                    cells.push(format!("{} / {}", ms(a), ms(b)));
                    nums.push(a);
                }
            }
            push(
                format!("{what} p50 / p99 ms, {}", plural(n, "stream", "streams")),
                cells,
                nums,
            );
        }
    }
    let peak: Vec<f64> = r
        .targets
        .iter()
        .map(|t| t.peak_rss_kib.map_or(f64::NAN, |k| k as f64))
        .collect();
    push(
        "idle / peak RSS MiB".into(),
        r.targets
            .iter()
            .map(|t| format!("{} / {}", mib(t.idle_rss_kib), mib(t.peak_rss_kib)))
            .collect(),
        peak,
    );
    let cpu: Vec<f64> = r
        .targets
        .iter()
        .map(|t| median(t.cpu_per_10k.clone()))
        .collect();
    push(
        "CPU s per 10,000 requests".into(),
        cpu.iter().map(|&v| two_places(v)).collect(),
        cpu.clone(),
    );
    let user: Vec<f64> = r
        .targets
        .iter()
        .map(|t| median(t.user_cpu_per_10k.clone()))
        .collect();
    push(
        "of which user space".into(),
        user.iter().map(|&v| two_places(v)).collect(),
        user.clone(),
    );
    let switches: Vec<f64> = r
        .targets
        .iter()
        .enumerate()
        // Not for the baseline: the fake upstream's threads (one per
        // connection) exit when wrk closes, taking their counts with them.
        .map(|(i, t)| {
            if i == 0 {
                f64::NAN
            } else {
                median(t.switches_per_request.clone())
            }
        })
        .collect();
    push(
        "context switches per request".into(),
        switches.iter().map(|&v| two_places(v)).collect(),
        switches.clone(),
    );
    push(
        "failed requests + streams".into(),
        r.targets.iter().map(|t| t.errors().to_string()).collect(),
        vec![f64::NAN; r.targets.len()],
    );
    let mut s = String::new();
    let line = |cells: &[String]| format!("| {} |\n", cells.join(" | "));
    s.push_str(&line(&header));
    let mut sep = vec!["---".to_string()];
    sep.extend((1..header.len()).map(|_| "---:".to_string()));
    s.push_str(&line(&sep));
    for row in &rows {
        s.push_str(&line(row));
    }
    let _ = writeln!(
        s,
        "\n{} repetitions; load: {}. The {} column is absolute; the others are what each proxy adds \
         (paired per repetition). \"first event\" is the first content event; \"chunk lag\" is from \
         the upstream writing an event to the client reading it. Ratios: req/s, added p50, peak RSS, CPU (all, and user space), context switches.",
        r.reps, r.generator, base.name
    );
    s
}
