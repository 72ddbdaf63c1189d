//! Side-by-side benchmark: the fake upstream called directly, through
//! gaia-balancer (release build) and through nginx as a reverse proxy, all on
//! 127.0.0.1, measured in one run and printed as one Markdown table; then
//! the memory each open stream costs the balancer at 1,000 streams.
//!
//! Run it with `bench/run.sh`, which installs wrk and nginx-light when it
//! can, builds in release mode and calls this with the right paths. The
//! numbers only mean something side by side: the machine, its noise and
//! the load generator are the same for every column.
//!
//! Usage: `bench [--reps N] [--secs S] [--quick] [--hosts N] [--host-name NAME] [--no-nginx] [--no-wrk]
//! [--no-memory] [--no-floor] [--ureq-floor] [--agent-floor] [--memory-only] [--balancer PATH] [--fake PATH] [--nginx PATH]
//! [--wrk PATH] [--keep]`
//!
//! `--hosts N` puts N upstream hosts (one fake upstream listening on N
//! ports) behind the balancer and nginx, as a deployment over several
//! nodes has; "direct" and the floors still use the first one.
//! `--host-name NAME` gives the balancer its hosts by a name that resolves
//! to 127.0.0.1 (such as `localhost`) instead of the address, as Gaia nodes
//! are given; nginx resolves it once at start-up either way.

mod floor;
mod load;
mod suite;

use std::fs;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use suite::{Plan, Target};

/// Concurrent streams for the memory measurement.
const MEMORY_STREAMS: usize = 1000;

struct Args {
    reps: usize,
    secs: f64,
    balancer: PathBuf,
    fake: PathBuf,
    nginx: Option<PathBuf>,
    wrk: Option<PathBuf>,
    keep: bool,
    floor: bool,
    ureq_floor: bool,
    agent_floor: bool,
    table: bool,
    memory: bool,
    /// Upstream hosts behind the proxies (ports of one fake upstream).
    hosts: usize,
    /// How the balancer's hosts.json names the upstream's address.
    host_name: String,
}

fn main() -> ExitCode {
    // The bench runs its yardstick proxy as a child process of its own, so
    // that its CPU and memory are read like every other target's.
    let argv: Vec<String> = std::env::args().collect();
    if argv.get(1).map(String::as_str) == Some("--serve-floor") {
        let served = match &argv[2..] {
            [listen, upstream, how @ ..] => {
                let how = match how {
                    [] => Ok(floor::Upstream::Raw),
                    [u] if u == "ureq" => Ok(floor::Upstream::Ureq),
                    [u] if u == "agent" => Ok(floor::Upstream::Agent),
                    _ => Err("the last argument may only be \"ureq\"".to_string()),
                };
                let addrs = listen
                    .parse::<SocketAddr>()
                    .and_then(|l| Ok((l, upstream.parse::<SocketAddr>()?)))
                    .map_err(|e| e.to_string());
                how.and_then(|h| addrs.and_then(|(l, u)| floor::serve(l, u, h)))
            }
            _ => Err("usage: bench --serve-floor LISTEN UPSTREAM [ureq|agent]".into()),
        };
        return match served {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("bench floor: {e}");
                ExitCode::FAILURE
            }
        };
    }
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("bench: {e}");
            eprintln!(
                "usage: bench [--reps N] [--secs S] [--quick] [--no-nginx] [--no-wrk] [--no-memory] [--no-floor] [--ureq-floor] [--agent-floor] [--memory-only] \
                 [--balancer PATH] [--fake PATH] [--nginx PATH] [--wrk PATH] [--keep]"
            );
            return ExitCode::from(2);
        }
    };
    let dir = std::env::temp_dir().join(format!("gaia-bench-{}", std::process::id()));
    let result = run(&args, &dir);
    if args.keep {
        eprintln!("bench: files kept in {}", dir.display());
    } else {
        let _ = fs::remove_dir_all(&dir);
    }
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bench: {e}");
            ExitCode::FAILURE
        }
    }
}

fn parse_args() -> Result<Args, String> {
    let exe = std::env::current_exe().map_err(|e| format!("cannot find myself: {e}"))?;
    // target/<profile>/examples/bench: the balancer is two levels up.
    let examples = exe.parent().map(Path::to_path_buf).unwrap_or_default();
    let profile = examples.parent().map(Path::to_path_buf).unwrap_or_default();
    let mut a = Args {
        reps: 5,
        secs: 2.0,
        balancer: profile.join("gaia-balancer"),
        fake: examples.join("fake_upstream"),
        nginx: which("nginx"),
        wrk: which("wrk"),
        keep: false,
        floor: true,
        ureq_floor: false,
        agent_floor: false,
        table: true,
        memory: true,
        hosts: 1,
        host_name: "127.0.0.1".into(),
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or(format!("{flag} needs a value"));
        match flag.as_str() {
            "--reps" => a.reps = value()?.parse().map_err(|_| "--reps: a number")?,
            "--secs" => a.secs = value()?.parse().map_err(|_| "--secs: a number")?,
            "--quick" => {
                a.reps = 1;
                a.secs = 1.0;
            }
            "--balancer" => a.balancer = value()?.into(),
            "--fake" => a.fake = value()?.into(),
            "--nginx" => a.nginx = Some(value()?.into()),
            "--wrk" => a.wrk = Some(value()?.into()),
            "--no-nginx" => a.nginx = None,
            "--no-wrk" => a.wrk = None,
            "--no-memory" => a.memory = false,
            "--no-floor" => a.floor = false,
            "--ureq-floor" => a.ureq_floor = true,
            "--agent-floor" => a.agent_floor = true,
            "--memory-only" => a.table = false,
            "--hosts" => a.hosts = value()?.parse().map_err(|_| "--hosts: a number")?,
            "--host-name" => a.host_name = value()?,
            "--keep" => a.keep = true,
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    if !(1..=50).contains(&a.reps) || !(0.2..=60.0).contains(&a.secs) {
        return Err("--reps must be 1-50 and --secs 0.2-60".into());
    }
    if !(1..=100).contains(&a.hosts) {
        return Err("--hosts must be 1-100".into());
    }
    for p in [&a.balancer, &a.fake] {
        if !p.is_file() {
            return Err(format!(
                "{} not found; build with `cargo build --release --bin gaia-balancer --example fake_upstream --example bench`",
                p.display()
            ));
        }
    }
    Ok(a)
}

/// An executable on PATH (or in /usr/sbin, where Debian puts nginx).
fn which(name: &str) -> Option<PathBuf> {
    let path = std::env::var("PATH").unwrap_or_default();
    let found = path
        .split(':')
        .chain(["/usr/sbin", "/usr/local/sbin"])
        .map(|d| Path::new(d).join(name))
        .find(|p| p.is_file());
    found
}

/// A child process we started; stopped (TERM, then KILL) when dropped.
struct Proc {
    name: String,
    child: Child,
    log: PathBuf,
}

impl Proc {
    fn spawn(name: &str, cmd: &mut Command, log: PathBuf) -> Result<Proc, String> {
        let err = fs::File::create(&log).map_err(|e| format!("{}: {e}", log.display()))?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(err)
            .spawn()
            .map_err(|e| format!("cannot start {name}: {e}"))?;
        Ok(Proc {
            name: name.to_string(),
            child,
            log,
        })
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Wait until `addr` accepts connections, or fail with the process's log.
    fn wait_listening(&mut self, addr: SocketAddr) -> Result<(), String> {
        let end = Instant::now() + Duration::from_secs(10);
        while Instant::now() < end {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(format!(
                    "{} exited ({status}): {}",
                    self.name,
                    self.log_tail()
                ));
            }
            if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
                return Ok(());
            }
            thread::sleep(Duration::from_millis(20));
        }
        Err(format!(
            "{} not listening on {addr}: {}",
            self.name,
            self.log_tail()
        ))
    }

    fn log_tail(&self) -> String {
        let text = fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(5)..].join("\n")
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        // TERM first: nginx's master then stops its workers too.
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .stderr(Stdio::null())
            .status();
        let end = Instant::now() + Duration::from_secs(3);
        while Instant::now() < end {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A loopback port that was free a moment ago.
fn free_port() -> Result<u16, String> {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| format!("no free port: {e}"))
}

fn loopback(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// The test-only certificates (tests/tls/README.md) the HTTPS runs use.
const TLS_DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/tls/");

/// One fake upstream listening on `ports` ports.
fn start_fake(
    args: &Args,
    dir: &Path,
    name: &str,
    chunks: usize,
    tls: bool,
    ports: usize,
) -> Result<(Proc, Vec<u16>), String> {
    let ports = (0..ports)
        .map(|_| free_port())
        .collect::<Result<Vec<_>, _>>()?;
    let mut cmd = Command::new(&args.fake);
    cmd.args(ports.iter().map(u16::to_string)).args([
        "--chunks",
        &chunks.to_string(),
        "--delay-ms",
        "50",
        "--stamp",
    ]);
    if tls {
        cmd.arg("--tls")
            .arg(format!("{TLS_DIR}server.pem"))
            .arg(format!("{TLS_DIR}server.key"));
    }
    let mut p = Proc::spawn(name, &mut cmd, dir.join(format!("{name}.log")))?;
    for port in &ports {
        p.wait_listening(loopback(*port))?;
    }
    Ok((p, ports))
}

/// A config directory for the balancer in front of `upstreams` (ports,
/// over HTTPS trusting the test CA when `tls`).
fn balancer_config(
    dir: &Path,
    name: &str,
    upstreams: &[u16],
    tls: bool,
) -> Result<PathBuf, String> {
    fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let scheme = if tls { "https" } else { "http" };
    let urls: Vec<String> = upstreams
        .iter()
        .map(|p| format!("\"{scheme}://{name}:{p}\""))
        .collect();
    let hosts = format!("{{ \"hosts\": [{}] }}\n", urls.join(", "));
    fs::write(dir.join("hosts.json"), hosts).map_err(|e| e.to_string())?;
    if tls {
        let settings = format!("{{ \"caFile\": \"{TLS_DIR}ca.pem\" }}\n");
        fs::write(dir.join("balancer.json"), settings).map_err(|e| e.to_string())?;
    }
    Ok(dir.to_path_buf())
}

fn start_balancer(
    args: &Args,
    dir: &Path,
    name: &str,
    upstreams: &[u16],
    workers: usize,
    tls: bool,
) -> Result<(Proc, u16), String> {
    let config = balancer_config(
        &dir.join(format!("{name}-config")),
        &args.host_name,
        upstreams,
        tls,
    )?;
    let port = free_port()?;
    let mut cmd = Command::new(&args.balancer);
    cmd.arg("--config")
        .arg(&config)
        .args([
            "--port",
            &port.to_string(),
            "--workers",
            &workers.to_string(),
        ])
        // No per-request log line, as nginx runs with access_log off.
        .env("LOG_LEVEL", "warn");
    let mut p = Proc::spawn(name, &mut cmd, dir.join(format!("{name}.log")))?;
    p.wait_listening(loopback(port))?;
    Ok((p, port))
}

/// The design's floor (see `floor.rs`), this executable in another mode;
/// `how` is its upstream side ("ureq", or raw sockets when `None`).
fn start_floor(dir: &Path, upstream: u16, how: Option<&str>) -> Result<(Proc, u16), String> {
    let port = free_port()?;
    let exe = std::env::current_exe().map_err(|e| format!("cannot find myself: {e}"))?;
    let mut cmd = Command::new(exe);
    cmd.arg("--serve-floor")
        .arg(loopback(port).to_string())
        .arg(loopback(upstream).to_string())
        .args(how);
    let name = format!("floor{}", how.map(|h| format!("-{h}")).unwrap_or_default());
    let mut p = Proc::spawn(&name, &mut cmd, dir.join(format!("{name}.log")))?;
    p.wait_listening(loopback(port))?;
    Ok((p, port))
}

/// nginx as a plain reverse proxy over `upstreams`: unbuffered, keep-alive both ways.
fn start_nginx(nginx: &Path, dir: &Path, upstreams: &[u16]) -> Result<(Proc, u16), String> {
    let port = free_port()?;
    let ngx = dir.join("nginx");
    fs::create_dir_all(&ngx).map_err(|e| e.to_string())?;
    let d = ngx.display();
    let servers: String = upstreams
        .iter()
        .map(|p| format!("        server 127.0.0.1:{p};\n"))
        .collect();
    let conf = format!(
        r#"daemon off;
master_process on;
worker_processes auto;
worker_rlimit_nofile 20000;
pid {d}/nginx.pid;
error_log stderr warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {d}/body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
    keepalive_requests 1000000;
    keepalive_timeout 65s;
    upstream fake {{
{servers}        keepalive 256;
        keepalive_requests 1000000;
    }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://fake;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
            proxy_read_timeout 300s;
        }}
    }}
}}
"#
    );
    let path = ngx.join("nginx.conf");
    fs::write(&path, conf).map_err(|e| e.to_string())?;
    let mut cmd = Command::new(nginx);
    cmd.arg("-p")
        .arg(&ngx)
        .arg("-c")
        .arg(&path)
        .args(["-e", "stderr"]);
    let mut p = Proc::spawn("nginx", &mut cmd, dir.join("nginx.log"))?;
    p.wait_listening(loopback(port))?;
    Ok((p, port))
}

fn run(args: &Args, dir: &Path) -> Result<(), String> {
    fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let started = Instant::now();
    let mut report = String::new();
    if args.table {
        report.push_str(&table(args, dir)?);
    }
    if args.memory {
        report.push_str(&memory_per_stream(args, dir, false)?);
        report.push_str(&memory_per_stream(args, dir, true)?);
    }
    report.push_str(&machine(args));
    let _ = writeln_time(&mut report, started.elapsed());
    println!("\n{report}");
    Ok(())
}

/// The side-by-side table: direct, balancer, nginx.
fn table(args: &Args, dir: &Path) -> Result<String, String> {
    let chunks = 20;
    let (fake, ups) = start_fake(args, dir, "fake", chunks, false, args.hosts)?;
    let up = ups[0];
    let (bal, bal_port) = start_balancer(args, dir, "balancer", &ups, 256, false)?;
    let nginx = match &args.nginx {
        Some(n) => match start_nginx(n, dir, &ups) {
            Ok(p) => Some(p),
            Err(e) => {
                eprintln!("bench: nginx left out: {e}");
                None
            }
        },
        None => {
            eprintln!("bench: no nginx (not installed, or --no-nginx); its column is left out");
            None
        }
    };
    // Let start-up allocations settle before the idle sample.
    thread::sleep(Duration::from_millis(300));
    let mut targets = vec![
        Target {
            name: "direct".into(),
            addr: loopback(up),
            pid: Some(fake.pid()),
        },
        Target {
            name: "gaia-balancer".into(),
            addr: loopback(bal_port),
            pid: Some(bal.pid()),
        },
    ];
    if let Some((p, port)) = &nginx {
        targets.push(Target {
            name: "nginx".into(),
            addr: loopback(*port),
            pid: Some(p.pid()),
        });
    }
    let mut floors = Vec::new();
    if args.floor {
        floors.push(("blocking floor", start_floor(dir, up, None)?));
    }
    if args.ureq_floor {
        floors.push(("floor + ureq", start_floor(dir, up, Some("ureq"))?));
    }
    if args.agent_floor {
        floors.push(("floor + our agent", start_floor(dir, up, Some("agent"))?));
    }
    for (name, (p, port)) in &floors {
        targets.push(Target {
            name: name.to_string(),
            addr: loopback(*port),
            pid: Some(p.pid()),
        });
    }
    let plan = Plan {
        reps: args.reps,
        secs: args.secs,
        max_requests: 10_000_000,
        conns: vec![1, 16, 64],
        streams: vec![10, 200],
        stream_length: Duration::from_millis(50 * (chunks as u64 + 1)),
        wrk: args.wrk.clone(),
        work_dir: dir.to_path_buf(),
        warmup: Duration::from_millis(500),
    };
    let results = suite::measure(&targets, &plan, &mut |l| eprintln!("{l}"));
    drop(floors);
    drop(nginx);
    drop(bal);
    drop(fake);
    let mut report = suite::render(&results);
    if args.host_name != "127.0.0.1" {
        report.push_str(&format!(
            "\nThe balancer's hosts are given by name: {}.\n",
            args.host_name
        ));
    }
    if args.hosts > 1 {
        report.push_str(&format!(
            "\nUpstream hosts behind gaia-balancer and nginx: {} (ports of one fake upstream); \
             direct and the floors use the first.\n",
            args.hosts
        ));
    }
    Ok(report)
}

fn writeln_time(s: &mut String, d: Duration) -> std::fmt::Result {
    use std::fmt::Write;
    writeln!(s, "Measured in {:.0} s.", d.as_secs_f64())
}

/// RSS over idle at [`MEMORY_STREAMS`] open streams, per stream.
fn memory_per_stream(args: &Args, dir: &Path, tls: bool) -> Result<String, String> {
    // Streams long enough (20 s) to all be open at once; closed early by us.
    let scheme = if tls { "https" } else { "http" };
    let (_fake, ups) = start_fake(args, dir, &format!("fake-memory-{scheme}"), 400, tls, 1)?;
    let (bal, port) = start_balancer(
        args,
        dir,
        &format!("balancer-memory-{scheme}"),
        &ups,
        MEMORY_STREAMS + 100,
        tls,
    )?;
    thread::sleep(Duration::from_millis(300));
    let idle = suite::memory(bal.pid()).map(|m| m.rss_kib).unwrap_or(0);
    let request = load::chat_request("bench", load::STREAM_BODY);
    let spec = load::Streams {
        n: MEMORY_STREAMS,
        limit: Duration::from_secs(15),
        stagger: Duration::ZERO,
        rounds: 1,
    };
    let sampled = std::sync::Mutex::new((0usize, 0u64));
    load::streams(
        loopback(port),
        &request,
        &spec,
        Some(&|open| {
            // Let every stream settle into its steady state before sampling.
            thread::sleep(Duration::from_millis(500));
            let rss = suite::memory(bal.pid()).map(|m| m.rss_kib).unwrap_or(0);
            *sampled.lock().unwrap_or_else(|e| e.into_inner()) = (open, rss);
        }),
    );
    let (open, rss) = *sampled.lock().unwrap_or_else(|e| e.into_inner());
    eprintln!("memory ({scheme}): idle {idle} KiB, {rss} KiB with {open} streams open");
    let per = (rss.saturating_sub(idle) as f64 * 1024.0) / open.max(1) as f64;
    Ok(format!(
        "\nMemory per stream (gaia-balancer, --workers {}, {scheme} upstream): idle RSS {:.1} MiB, \
         {:.1} MiB with {open} streams open → {:.1} KiB per stream over idle.\n",
        MEMORY_STREAMS + 100,
        idle as f64 / 1024.0,
        rss as f64 / 1024.0,
        per / 1024.0
    ))
}

/// One line on what this ran on.
fn machine(args: &Args) -> String {
    let cpu = fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|v| v.trim_start_matches([' ', '\t', ':']).to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = thread::available_parallelism().map_or(0, |n| n.get());
    let kernel = fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let version = |p: &Option<PathBuf>, flag: &str| -> String {
        p.as_ref()
            .and_then(|p| Command::new(p).arg(flag).output().ok())
            .map(|o| {
                let text = String::from_utf8_lossy(&o.stderr).to_string()
                    + &String::from_utf8_lossy(&o.stdout);
                text.lines().next().unwrap_or("").trim().to_string()
            })
            .unwrap_or_else(|| "not used".into())
    };
    format!(
        "Machine: {cpu}, {cores} cores, Linux {}; nginx: {}; wrk: {}.\n",
        kernel.trim(),
        version(&args.nginx, "-v"),
        version(&args.wrk, "--version")
    )
}
