//! The binary: `check`, `--help`, `--version`, bad flags, and a real run.

use std::io::BufReader;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use crate::fake::{Reply, Upstream};
use crate::process::Balancer;
use crate::util::{chat, post, wait_for};

fn bin() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_gaia-balancer"));
    for var in ["GAIA_CONFIG_DIR", "PORT", "BIND", "LOG_LEVEL", "NODE_ENV"] {
        c.env_remove(var);
    }
    c
}

/// `gaia-balancer check --config <dir>`, run to its end.
fn check(dir: impl AsRef<std::ffi::OsStr>) -> std::process::Output {
    bin()
        .arg("check")
        .arg("--config")
        .arg(dir)
        .output()
        .unwrap()
}

fn temp_dir(name: &str) -> PathBuf {
    crate::process::temp_dir("it", name)
}

#[test]
fn check_accepts_the_shipped_config_and_masks_keys() {
    let dir = temp_dir("check-ok");
    std::fs::write(
        dir.join("hosts.json"),
        r#"{"hosts": ["asia", {"url": "http://127.0.0.1:9/v1", "weight": 2}]}"#,
    )
    .unwrap();
    std::fs::write(
        dir.join("api-keys.json"),
        r#"{"apiKeys": [{"key": "gaia-secret-key-value-1234", "isActive": true}]}"#,
    )
    .unwrap();
    let out = check(&dir);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("https://asia.gaia.domains"), "{text}");
    assert!(text.contains("http://127.0.0.1:9 "), "/v1 stripped: {text}");
    assert!(
        text.contains("1234") && !text.contains("gaia-secret-key"),
        "{text}"
    );
    let shipped = bin()
        .args([
            "check",
            "--config",
            concat!(env!("CARGO_MANIFEST_DIR"), "/config"),
        ])
        .output()
        .unwrap();
    assert!(shipped.status.success());
}

#[test]
fn check_reports_file_field_line_and_column() {
    let dir = temp_dir("check-bad");
    std::fs::write(
        dir.join("hosts.json"),
        "{\n  \"hosts\": [\n    {\"url\": \"asia\", \"weight\": 0}\n  ]\n}\n",
    )
    .unwrap();
    let out = check(&dir);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("hosts.json:3:"), "{err}");
    assert!(err.contains("weight"), "{err}");
    assert!(
        !err.contains("panicked") && !err.contains("RUST_BACKTRACE"),
        "{err}"
    );

    std::fs::write(dir.join("hosts.json"), "{\"hosts\": [\"asia\",]}").unwrap();
    let out = check(&dir);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("hosts.json:1:"), "{err}");
}

#[test]
fn help_version_and_bad_flags() {
    let help = bin().arg("--help").output().unwrap();
    assert!(help.status.success());
    assert!(String::from_utf8_lossy(&help.stdout).contains("--config DIR"));
    let version = bin().arg("--version").output().unwrap();
    assert!(String::from_utf8_lossy(&version.stdout).contains(env!("CARGO_PKG_VERSION")));
    let bad = bin().arg("--frobnicate").output().unwrap();
    assert_eq!(bad.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("--help"));
    let port = bin().args(["--port", "http"]).output().unwrap();
    assert_eq!(port.status.code(), Some(2));
}

/// Start the binary on `dir` through `sh` (so a ulimit can be set first) and
/// return it with the address from its "listening on" log line.
/// The binary on `dir` with 4 workers, logging at info.
fn spawn(dir: &std::path::Path, shell_prefix: &str) -> Balancer {
    Balancer::start(dir, shell_prefix, &["--workers", "4"], "info")
}

fn config_for(name: &str, up: &Upstream) -> PathBuf {
    let dir = temp_dir(name);
    std::fs::write(
        dir.join("hosts.json"),
        format!(r#"{{"hosts": ["{}"]}}"#, up.url()),
    )
    .unwrap();
    dir
}

#[test]
fn the_binary_serves_a_config_directory() {
    let up = Upstream::always(Reply::json(200, r#"{"ok":true}"#));
    let bal = spawn(&config_for("run", &up), "");
    let addr = bal.addr;
    let r = post(addr, "/v1/chat/completions", &chat(false));
    assert_eq!(r.status, 200);
    assert_eq!(r.text(), r#"{"ok":true}"#);
    // The directory has no api-keys.json: the warning says that, rather
    // than "no active key in .../api-keys.json" about a file that is not there.
    assert!(
        bal.logged("no api-keys.json in", Duration::from_secs(5)),
        "{:?}",
        bal.lines()
    );
}

#[test]
fn descriptor_exhaustion_does_not_stop_accepting() {
    let up = Upstream::always(Reply::json(200, r#"{"ok":true}"#));
    let bal = spawn(&config_for("emfile", &up), "ulimit -n 48 &&");
    let addr = bal.addr;
    assert_eq!(post(addr, "/v1/embeddings", "{}").status, 200);
    // A busy keep-alive client, connected and served before the flood: one
    // request every 100 ms (an idle one would give way to the waiting flood).
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let statuses = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let busy = {
        let (stop, statuses) = (stop.clone(), statuses.clone());
        let ka = std::net::TcpStream::connect(addr).unwrap();
        std::thread::spawn(move || {
            ka.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            let mut reader = BufReader::new(ka.try_clone().unwrap());
            let mut writer = ka;
            for _ in 0..300 {
                if stop.load(std::sync::atomic::Ordering::Relaxed) {
                    break;
                }
                let sent = std::io::Write::write_all(
                    &mut writer,
                    b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n",
                );
                let status = sent
                    .ok()
                    .and_then(|()| crate::util::read_response(&mut reader).ok())
                    .map_or(0, |r| r.status);
                statuses.lock().unwrap().push(status);
                std::thread::sleep(Duration::from_millis(100));
            }
        })
    };
    let served = || statuses.lock().unwrap().len();
    assert!(wait_for(Duration::from_secs(5), || served() >= 1));
    // Far more idle connections than the process has descriptors.
    let flood: Vec<_> = (0..150)
        .filter_map(|_| std::net::TcpStream::connect(addr).ok())
        .collect();
    assert!(flood.len() > 48);
    let exhausted = bal.logged("Too many open files", Duration::from_secs(5));
    assert!(exhausted, "the flood never exhausted descriptors");
    // Two more requests on the open connection while descriptors are out.
    let before = served();
    assert!(wait_for(Duration::from_secs(5), || served() >= before + 2));
    drop(flood);
    let dropped = std::time::Instant::now();
    // Once the flood is gone it serves again at once (after at most one
    // accept backoff, 1 s).
    let back = wait_for(Duration::from_secs(10), || {
        let mut s = match std::net::TcpStream::connect(addr) {
            Ok(s) => s,
            Err(_) => return false,
        };
        let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
        let _ = std::io::Write::write_all(
            &mut s,
            b"GET /healthz HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
        );
        let mut out = String::new();
        let _ = std::io::Read::read_to_string(&mut s, &mut out);
        out.starts_with("HTTP/1.1 200")
    });
    assert!(
        back,
        "the balancer stopped accepting after descriptor exhaustion"
    );
    let recovered = dropped.elapsed();
    eprintln!("descriptor exhaustion (ulimit -n 48, 150 connections): serving new connections {recovered:?} after the flood ended");
    assert!(recovered < Duration::from_secs(3), "{recovered:?}");
    // The connection that was open all along was served throughout (it
    // needs no new descriptor for /healthz).
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    busy.join().unwrap();
    let statuses = statuses.lock().unwrap();
    assert!(
        statuses.iter().all(|s| *s == 200),
        "keep-alive client: {statuses:?}"
    );
    assert_eq!(post(addr, "/v1/embeddings", "{}").status, 200);
}

#[test]
fn the_backup_example_config_is_valid() {
    let dir = temp_dir("backup-example");
    std::fs::copy(
        concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/config/hosts.backup-example.json"
        ),
        dir.join("hosts.json"),
    )
    .unwrap();
    let out = check(&dir);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("openrouter") && text.contains("https://openrouter.ai/api"),
        "{text}"
    );
    assert!(
        !text.contains("REPLACE-WITH-YOUR-OPENROUTER-KEY"),
        "keys are masked: {text}"
    );
}

/// A base URL whose path the HTTP layer refuses (`<`, `>`, a backtick) used
/// to pass `check` and start, and then every request to the host was
/// answered 400 "request cannot be forwarded: invalid uri character", as if
/// the client were at fault. It is a configuration error, reported by `check`.
#[test]
fn check_refuses_a_base_url_path_the_http_layer_cannot_send() {
    let dir = temp_dir("check-url-path");
    let check = |hosts: &str| {
        std::fs::write(dir.join("hosts.json"), hosts).unwrap();
        check(&dir)
    };
    for (bad, encoded) in [("a<b", "%3C"), ("a>b", "%3E"), ("a`b", "%60")] {
        let out = check(&format!(
            "{{\"hosts\": [\"asia\", \"http://127.0.0.1:9/{bad}/v1\"]}}"
        ));
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{bad}: {err}");
        assert!(
            err.contains("hosts.json:1:") && err.contains("hosts[1]") && err.contains(encoded),
            "{bad}: {err}"
        );
    }
    // Paths the HTTP layer sends as they are stay accepted.
    let out = check(r#"{"hosts": ["http://127.0.0.1:9/api%20v2/v1", "http://127.0.0.1:10/ü"]}"#);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A FIFO in place of a config file (`mkfifo`, or a process substitution
/// linked in) used to block whoever opened it: `check` never returned, and
/// in a running balancer the reloader stalled for good, so no later change
/// was ever applied and SIGTERM hung (shutdown waits for the reloader before
/// it closes the listener). Now it is refused like any unreadable file.
#[test]
fn a_fifo_in_place_of_a_config_file_is_an_error_not_a_hang() {
    let mkfifo = |path: &std::path::Path| {
        let _ = std::fs::remove_file(path);
        let ok = Command::new("mkfifo").arg(path).status().unwrap().success();
        assert!(ok, "mkfifo {}", path.display());
    };
    let dir = temp_dir("check-fifo");
    mkfifo(&dir.join("hosts.json"));
    let mut child = bin()
        .arg("check")
        .arg("--config")
        .arg(&dir)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut status = None;
    wait_for(Duration::from_secs(10), || {
        status = child.try_wait().unwrap();
        status.is_some()
    });
    if status.is_none() {
        let _ = child.kill();
        let _ = child.wait();
        panic!("`check` on a FIFO hosts.json did not return within 10 s");
    }
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
    assert_eq!(status.and_then(|s| s.code()), Some(1), "{err}");
    assert!(
        err.contains("hosts.json") && err.contains("not a regular file"),
        "{err}"
    );

    // A running balancer: balancer.json becomes a FIFO, then a good file again.
    let up = Upstream::always(Reply::json(200, "{}"));
    let dir = config_for("run-fifo", &up);
    std::fs::write(dir.join("balancer.json"), r#"{"discoveryIntervalMs": 0}"#).unwrap();
    let mut bal = Balancer::start(&dir, "", &["--workers", "4"], "info");
    mkfifo(&dir.join("balancer.json"));
    assert!(
        bal.logged("not a regular file", Duration::from_secs(10)),
        "the reloader did not report the FIFO: {:?}",
        bal.lines()
    );
    assert_eq!(post(bal.addr, "/v1/embeddings", "{}").status, 200);
    std::fs::remove_file(dir.join("balancer.json")).unwrap();
    std::fs::write(
        dir.join("balancer.json"),
        r#"{"discoveryIntervalMs": 0, "maxAttempts": 3}"#,
    )
    .unwrap();
    assert!(
        bal.logged("configuration reloaded", Duration::from_secs(10)),
        "{:?}",
        bal.lines()
    );
    bal.terminate_cleanly();
}

/// A refused change that is then undone (the file put back as it was) used
/// to leave the error as the last word in the log: nothing said the files
/// were valid again, since the configuration in force did not change.
#[test]
fn undoing_a_refused_change_logs_that_the_configuration_is_valid_again() {
    let up = Upstream::always(Reply::json(200, "{}"));
    let dir = config_for("valid-again", &up);
    let good = r#"{"discoveryIntervalMs": 0}"#;
    std::fs::write(dir.join("balancer.json"), good).unwrap();
    let bal = Balancer::start(&dir, "", &["--workers", "4"], "info");
    std::fs::write(dir.join("balancer.json"), r#"{"maxAttempts": 0}"#).unwrap();
    assert!(
        bal.logged("invalid configuration", Duration::from_secs(10)),
        "{:?}",
        bal.lines()
    );
    std::fs::write(dir.join("balancer.json"), good).unwrap();
    assert!(
        bal.logged(
            "configuration valid again; the one in force (generation 1) is unchanged",
            Duration::from_secs(10)
        ),
        "{:?}",
        bal.lines()
    );
    assert!(
        !bal.lines()
            .iter()
            .any(|l| l.contains("configuration reloaded")),
        "nothing changed: {:?}",
        bal.lines()
    );
    assert_eq!(post(bal.addr, "/v1/embeddings", "{}").status, 200);
}

/// `--config` naming a file (often hosts.json itself) is said in those words,
/// not as "hosts.json/hosts.json: Not a directory (os error 20)".
#[test]
fn check_says_when_config_names_a_file_instead_of_a_directory() {
    let dir = temp_dir("check-config-file");
    std::fs::write(dir.join("hosts.json"), r#"{"hosts": ["asia"]}"#).unwrap();
    let out = check(dir.join("hosts.json"));
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(
            "hosts.json: not a directory; --config (or GAIA_CONFIG_DIR) names the directory"
        ),
        "{err}"
    );
    assert!(!err.contains("hosts.json/hosts.json"), "{err}");
}

/// An empty file (a `touch`ed api-keys.json) and a comment (which many
/// editors and config formats allow) are said in those words, not only as
/// "EOF while parsing a value" or "key must be a string".
#[test]
fn check_names_an_empty_file_and_a_comment() {
    let dir = temp_dir("check-empty-comment");
    let check = |file: &str, text: &str| {
        std::fs::write(dir.join("hosts.json"), r#"{"hosts": ["asia"]}"#).unwrap();
        let _ = std::fs::remove_file(dir.join("balancer.json"));
        let _ = std::fs::remove_file(dir.join("api-keys.json"));
        std::fs::write(dir.join(file), text).unwrap();
        let out = check(&dir);
        assert_eq!(out.status.code(), Some(1));
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let err = check("api-keys.json", "");
    assert!(
        err.contains(
            "api-keys.json: the file is empty; it must hold an object such as {\"apiKeys\""
        ),
        "{err}"
    );
    let err = check("hosts.json", "\n  \n");
    assert!(err.contains("hosts.json: the file is empty"), "{err}");
    let err = check(
        "balancer.json",
        "{\n  \"maxAttempts\": 3, // fewer retries\n  \"open\": false\n}\n",
    );
    assert!(
        err.contains("balancer.json:2:21:") && err.contains("JSON has no comments"),
        "{err}"
    );
    let err = check("hosts.json", "{\"hosts\": [\"asia\"]} /* main */");
    assert!(
        err.contains("hosts.json:1:21:") && err.contains("JSON has no comments"),
        "{err}"
    );
}

/// `check | head` on a long host list (the reader leaves before the end), or
/// stdout on a full disk, used to panic ("failed printing to stdout",
/// exit 101, with a backtrace when RUST_BACKTRACE is set): SPEC says never a
/// panic. A reader that left is not an error; a failed write is said plainly.
#[test]
fn check_and_version_survive_a_closed_or_full_stdout() {
    use std::io::Read as _;
    use std::process::Stdio;
    let dir = temp_dir("check-pipe");
    // Far more than a pipe buffer (64 KiB) of output.
    let hosts: Vec<String> = (0..5000).map(|i| format!("\"node-{i}\"")).collect();
    std::fs::write(
        dir.join("hosts.json"),
        format!(r#"{{"hosts": [{}]}}"#, hosts.join(", ")),
    )
    .unwrap();
    let mut child = bin()
        .arg("check")
        .arg("--config")
        .arg(&dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = child.stdout.take().unwrap();
    let mut first = [0u8; 64];
    stdout.read_exact(&mut first).unwrap();
    assert!(first.starts_with(b"config directory: "));
    drop(stdout);
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(0), "{err}");
    assert!(!err.contains("panicked"), "{err}");

    let full = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/full")
        .unwrap();
    let out = bin()
        .arg("--version")
        .stdout(Stdio::from(full))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        !err.contains("panicked") && err.contains("cannot write to standard output"),
        "{err}"
    );
}

/// stderr whose reader went away (`2>&1 | tee` with tee gone, a log shipper
/// restarted) used to make every log line a panic (simple_logger writes with
/// `eprintln!`), killing the worker or acceptor that logged it: after a few
/// requests the process still ran but answered nothing. SPEC: never a panic;
/// the process keeps answering.
#[test]
fn a_broken_stderr_does_not_stop_the_balancer_answering() {
    use std::io::{BufRead, Read, Write};
    use std::process::Stdio;
    let up = Upstream::always(Reply::json(200, "{}"));
    let dir = config_for("broken-stderr", &up);
    std::fs::write(dir.join("balancer.json"), r#"{"discoveryIntervalMs": 0}"#).unwrap();
    let mut child = bin()
        .args(["--port", "0", "--workers", "4", "--config"])
        .arg(&dir)
        .env("LOG_LEVEL", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // The address from the "listening on http://ADDR with ..." line.
    let mut stderr = BufReader::new(child.stderr.take().unwrap());
    let mut addr = None;
    for _ in 0..20 {
        let mut line = String::new();
        if stderr.read_line(&mut line).unwrap_or(0) == 0 {
            break;
        }
        if let Some(rest) = line.split("listening on http://").nth(1) {
            addr = rest.split_whitespace().next().map(|a| a.parse().unwrap());
            break;
        }
    }
    let Some(addr): Option<std::net::SocketAddr> = addr else {
        let _ = child.kill();
        let _ = child.wait();
        panic!("no 'listening on' line");
    };
    // The reader of its stderr goes away.
    drop(stderr);
    let mut answered = 0;
    for _ in 0..40 {
        let Ok(mut s) = std::net::TcpStream::connect(addr) else {
            break;
        };
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let _ = s.write_all(b"GET /healthz HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n");
        let mut reply = String::new();
        let _ = s.read_to_string(&mut reply);
        if !reply.starts_with("HTTP/1.1 200") {
            break;
        }
        answered += 1;
    }
    let alive = child.try_wait().unwrap().is_none();
    let _ = child.kill();
    let _ = child.wait();
    assert!(alive, "the process died");
    assert_eq!(answered, 40, "stopped answering after {answered} requests");
}

/// A port that is taken is the commonest start-up failure: the message
/// names the address and says what to do, instead of a bare
/// "Address already in use" with no port in it.
#[test]
fn a_port_in_use_is_named_with_a_hint() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port().to_string();
    let dir = temp_dir("port-in-use");
    std::fs::write(
        dir.join("hosts.json"),
        r#"{"hosts": ["http://127.0.0.1:9"]}"#,
    )
    .unwrap();
    let out = bin()
        .arg("--config")
        .arg(&dir)
        .args(["--port", &port])
        .env("LOG_LEVEL", "error")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("cannot listen on 127.0.0.1:{port}")),
        "{err}"
    );
    assert!(err.contains("--port"), "{err}");
}
