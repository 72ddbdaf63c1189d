//! The balancer binary as a separate process, for tests that measure it from
//! outside: threads, open descriptors and RSS read from `/proc/PID`, so that
//! the test's own client threads and sockets (and other tests running in
//! parallel) never count against the balancer's caps. Also a "normal client"
//! probe that keeps sending ordinary requests while a flood is on.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::util::wait_for;

/// A running balancer process; killed when dropped.
pub struct Balancer {
    child: Child,
    pub addr: SocketAddr,
    pub pid: u32,
    /// Every stderr line so far (a reader thread appends).
    log: Arc<Mutex<Vec<String>>>,
}

impl Drop for Balancer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Balancer {
    /// Start the binary on `dir` with `LOG_LEVEL=level` and `args` (after
    /// `--port 0 --config DIR`), through `sh` so that `shell_prefix` (a
    /// `ulimit`) applies first, and wait until it listens.
    pub fn start(dir: &Path, shell_prefix: &str, args: &[&str], level: &str) -> Balancer {
        let exe = env!("CARGO_BIN_EXE_gaia-balancer");
        let mut cmd = Command::new("sh");
        // `exec`: the pid (signals, /proc) is the balancer's, not the shell's.
        // "$@" is the directory (the value of --config), then `args`.
        cmd.arg("-c")
            .arg(format!(
                "{shell_prefix} exec \"$0\" --port 0 --config \"$@\""
            ))
            .arg(exe)
            .arg(dir)
            .args(args);
        for var in ["GAIA_CONFIG_DIR", "PORT", "BIND", "NODE_ENV", "LOG_LEVEL"] {
            cmd.env_remove(var);
        }
        let mut child = cmd
            .env("LOG_LEVEL", level)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let pid = child.id();
        let log = Arc::new(Mutex::new(Vec::new()));
        let sink = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                sink.lock().unwrap().push(line);
            }
        });
        let mut b = Balancer {
            child,
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            pid,
            log,
        };
        // Not every level logs the address: find the listening port in /proc.
        let mut addr = None;
        let found = wait_for(Duration::from_secs(10), || {
            addr = listening_port(pid).map(|p| SocketAddr::from(([127, 0, 0, 1], p)));
            addr.is_some()
        });
        assert!(
            found,
            "the balancer did not start listening: {:?}",
            b.lines()
        );
        b.addr = addr.unwrap();
        b
    }

    /// Every log line so far.
    pub fn lines(&self) -> Vec<String> {
        self.log.lock().unwrap().clone()
    }

    /// Wait until a log line contains `text`.
    pub fn logged(&self, text: &str, limit: Duration) -> bool {
        wait_for(limit, || self.lines().iter().any(|l| l.contains(text)))
    }

    /// Send signal `name` (TERM, INT, ...).
    pub fn signal(&self, name: &str) {
        let ok = Command::new("kill")
            .arg(format!("-{name}"))
            .arg(self.pid.to_string())
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -{name} failed");
    }

    /// The exit status once the process has exited, waiting up to `limit`.
    pub fn exit_within(&mut self, limit: Duration) -> Option<ExitStatus> {
        let mut status = None;
        wait_for(limit, || {
            status = self.child.try_wait().ok().flatten();
            status.is_some()
        });
        status
    }

    /// SIGTERM, then expect a clean exit (code 0) within 10 s.
    pub fn terminate_cleanly(&mut self) {
        self.signal("TERM");
        let code = self
            .exit_within(Duration::from_secs(10))
            .and_then(|s| s.code());
        assert_eq!(code, Some(0), "{:?}", self.lines());
    }
}

/// An empty directory of this test process's own, named `what-name`.
pub fn temp_dir(what: &str, name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("gaia-{what}-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A fresh config directory for this test process.
pub fn config_dir(name: &str, upstream: &str, balancer_json: &str) -> PathBuf {
    let dir = temp_dir("proc", name);
    std::fs::write(
        dir.join("hosts.json"),
        format!(r#"{{"hosts": ["{upstream}"]}}"#),
    )
    .unwrap();
    // Model discovery off: its polls would add upstream hits the tests count.
    let balancer_json = match balancer_json.trim().strip_prefix('{') {
        Some(rest) if rest.trim_start().starts_with('}') => {
            r#"{"discoveryIntervalMs": 0}"#.to_string()
        }
        Some(rest) => format!(r#"{{"discoveryIntervalMs": 0, {rest}"#),
        None => balancer_json.to_string(),
    };
    std::fs::write(dir.join("balancer.json"), balancer_json).unwrap();
    dir
}

/// Start the binary on `dir` (port 0, log level warn) through `sh`, so that a
/// `ulimit` can be set first.
pub fn spawn(dir: &Path, shell_prefix: &str) -> Balancer {
    Balancer::start(dir, shell_prefix, &[], "warn")
}

/// The port of the listening socket of `pid`, from /proc/PID/net/tcp and its
/// descriptors' inodes.
fn listening_port(pid: u32) -> Option<u16> {
    let inodes: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .ok()?
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter_map(|l| {
            let l = l.to_string_lossy().into_owned();
            Some(l.strip_prefix("socket:[")?.strip_suffix(']')?.to_string())
        })
        .collect();
    let table = std::fs::read_to_string(format!("/proc/{pid}/net/tcp")).ok()?;
    table.lines().skip(1).find_map(|line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        // state 0A = LISTEN; field 9 is the inode.
        if f.get(3) != Some(&"0A") || !inodes.iter().any(|i| Some(&i.as_str()) == f.get(9)) {
            return None;
        }
        u16::from_str_radix(f.get(1)?.rsplit(':').next()?, 16).ok()
    })
}

/// One look at a process from outside.
#[derive(Debug, Clone, Copy, Default)]
pub struct Sample {
    pub threads: usize,
    pub fds: usize,
    pub rss_kib: u64,
}

impl Sample {
    pub fn of(pid: u32) -> Sample {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        let field = |name: &str| -> u64 {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.split_whitespace().next()?.parse().ok())
                .unwrap_or(0)
        };
        Sample {
            threads: field("Threads:") as usize,
            fds: std::fs::read_dir(format!("/proc/{pid}/fd"))
                .map(|d| d.count())
                .unwrap_or(0),
            rss_kib: field("VmRSS:"),
        }
    }

    /// The larger of each field.
    pub fn max(self, o: Sample) -> Sample {
        Sample {
            threads: self.threads.max(o.threads),
            fds: self.fds.max(o.fds),
            rss_kib: self.rss_kib.max(o.rss_kib),
        }
    }
}

/// Samples a process every 100 ms on a thread until stopped; keeps the peak.
pub struct Sampler {
    stop: Arc<AtomicBool>,
    handle: JoinHandle<Sample>,
}

impl Sampler {
    pub fn start(pid: u32) -> Sampler {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let handle = std::thread::spawn(move || {
            let mut peak = Sample::of(pid);
            // Bounded: at most 10 minutes of samples.
            for _ in 0..6_000 {
                if flag.load(Ordering::Relaxed) {
                    break;
                }
                peak = peak.max(Sample::of(pid));
                std::thread::sleep(Duration::from_millis(100));
            }
            peak
        });
        Sampler { stop, handle }
    }

    /// Stop and return the peak.
    pub fn peak(self) -> Sample {
        self.stop.store(true, Ordering::Relaxed);
        self.handle.join().unwrap()
    }
}

/// One ordinary request on a fresh connection, as a normal client sends it.
#[derive(Debug, Clone, Copy)]
pub struct Outcome {
    /// `None` when the connection failed or closed unanswered.
    pub status: Option<u16>,
    /// Time to establish the TCP connection: the kernel's listen queue, not
    /// the balancer's workers (a SYN dropped because the queue overflowed
    /// costs a 1 s retransmit).
    pub connect: Duration,
    /// From connected to the whole answer: the balancer's own latency.
    pub served: Duration,
}

/// `POST /v1/embeddings` on a fresh connection.
pub fn ordinary(addr: SocketAddr, limit: Duration) -> Outcome {
    let began = Instant::now();
    let Ok(mut s) = TcpStream::connect_timeout(&addr, limit) else {
        return Outcome {
            status: None,
            connect: began.elapsed(),
            served: Duration::ZERO,
        };
    };
    let connect = began.elapsed();
    let status = (|| {
        s.set_read_timeout(Some(limit)).ok()?;
        s.set_nodelay(true).ok()?;
        s.write_all(
            b"POST /v1/embeddings HTTP/1.1\r\nHost: t\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}",
        )
        .ok()?;
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out);
        let text = String::from_utf8_lossy(&out);
        text.split_whitespace().nth(1)?.parse().ok()
    })();
    Outcome {
        status,
        connect,
        served: began.elapsed() - connect,
    }
}

/// What a normal client saw during a flood.
#[derive(Debug, Default)]
pub struct ProbeReport {
    pub results: Vec<Outcome>,
}

fn percentile(mut l: Vec<Duration>, p: f64) -> Duration {
    l.sort();
    l.get(((l.len() as f64 - 1.0) * p).round() as usize)
        .copied()
        .unwrap_or_default()
}

impl ProbeReport {
    pub fn ok(&self) -> usize {
        self.results
            .iter()
            .filter(|r| r.status == Some(200))
            .count()
    }

    /// The longest time the balancer took to answer, once connected.
    pub fn max_served(&self) -> Duration {
        self.results
            .iter()
            .map(|r| r.served)
            .max()
            .unwrap_or_default()
    }

    pub fn max_connect(&self) -> Duration {
        self.results
            .iter()
            .map(|r| r.connect)
            .max()
            .unwrap_or_default()
    }

    pub fn summary(&self) -> String {
        let mut by_status = std::collections::BTreeMap::new();
        for r in &self.results {
            *by_status.entry(r.status).or_insert(0) += 1;
        }
        let served: Vec<Duration> = self.results.iter().map(|r| r.served).collect();
        format!(
            "{} requests {:?}; answered in p50 {:?} p99 {:?} max {:?}; connect max {:?}",
            self.results.len(),
            by_status,
            percentile(served.clone(), 0.5),
            percentile(served.clone(), 0.99),
            percentile(served, 1.0),
            self.max_connect()
        )
    }
}

/// A normal client: one request every `every`, for `total`, on a thread.
pub fn probe(addr: SocketAddr, every: Duration, total: Duration) -> JoinHandle<ProbeReport> {
    std::thread::spawn(move || {
        let end = Instant::now() + total;
        let mut report = ProbeReport::default();
        for _ in 0..10_000 {
            let next = Instant::now() + every;
            if next > end {
                break;
            }
            report.results.push(ordinary(addr, Duration::from_secs(15)));
            std::thread::sleep(next.saturating_duration_since(Instant::now()));
        }
        report
    })
}
