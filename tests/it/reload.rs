//! Hot reload against the in-process server: hosts added and removed under
//! load without a failed request, a corrupt file that changes nothing, a key
//! file change that brings back a rejected key, health and in-flight counts
//! carried over, requests finishing on the configuration they started with,
//! and listener settings that wait for a restart.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use gaia_balancer::config::{self, Overrides};
use gaia_balancer::server;

use crate::fake::{content_event, finish_events, role_event, Reply, Step, Upstream};
use crate::util::{chat, post, request, wait_for, Running};

const OK: &str = r#"{"choices":[{"index":0,"message":{"role":"assistant","content":"ok"},"finish_reason":"stop"}]}"#;
/// Short upstream timeouts, as in util::test_settings.
/// Discovery off: its polls would add upstream hits the tests count.
const BALANCER: &str = r#"{"discoveryIntervalMs": 0,
    "timeouts": {"connectMs": 2000, "firstByteMs": 5000, "idleMs": 5000, "totalMs": 20000}}"#;
/// Long enough for any reload (one poll plus the settle time, twice over).
const RELOAD: Duration = Duration::from_secs(5);

/// A config directory of its own, removed when dropped.
struct Dir(PathBuf);

impl Dir {
    fn new(name: &str) -> Dir {
        let dir =
            std::env::temp_dir().join(format!("gaia-it-reload-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("balancer.json"), BALANCER).unwrap();
        Dir(dir)
    }

    fn write(&self, file: &str, text: &str) {
        std::fs::write(self.0.join(file), text).unwrap();
    }

    fn hosts(&self, urls: &[&str]) {
        let list: Vec<String> = urls.iter().map(|u| format!("\"{u}\"")).collect();
        self.write(
            "hosts.json",
            &format!(r#"{{"hosts": [{}]}}"#, list.join(", ")),
        );
    }

    fn keys(&self, keys: &[&str], description: &str) {
        let list: Vec<String> = keys
            .iter()
            .map(|k| format!(r#"{{"key": "{k}", "description": "{description}"}}"#))
            .collect();
        self.write(
            "api-keys.json",
            &format!(r#"{{"apiKeys": [{}]}}"#, list.join(", ")),
        );
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Load `dir` as the binary does and serve it with the reloader running.
fn start_reloading(dir: &Path) -> Running {
    let overrides = Overrides {
        port: Some(0),
        workers: Some(16),
        bind: None,
    };
    let config = config::load(dir, &overrides).unwrap();
    let server = server::start_with_reload(config, dir.to_path_buf(), overrides).unwrap();
    Running::from_server(server)
}

fn generation(bal: &Running) -> u64 {
    bal.server().shared().current().generation
}

/// Wait until a reload has put generation `want` in force.
fn reloaded_to(bal: &Running, want: u64) {
    assert!(
        wait_for(RELOAD, || generation(bal) >= want),
        "no reload to generation {want} (at {}; last error {:?})",
        generation(bal),
        bal.server().shared().reload.last_error()
    );
    assert_eq!(generation(bal), want, "one change, one reload");
}

fn status(bal: &Running) -> serde_json::Value {
    request(bal.addr, "GET", "/status", &[], b"").json()
}

fn slow_stream(events: usize, pause: Duration) -> Reply {
    let mut steps = vec![Step::Send(role_event())];
    for i in 0..events {
        steps.push(Step::Send(content_event(&format!("part{i} "))));
        steps.push(Step::Sleep(pause));
    }
    steps.push(Step::Send(finish_events()));
    Reply::sse(steps)
}

#[test]
fn hosts_added_and_removed_under_load_without_a_failed_request() {
    let a = Upstream::always(Reply::json(200, OK));
    let b = Upstream::always(Reply::json(200, OK));
    let c = Upstream::always(Reply::json(200, OK));
    let dir = Dir::new("load");
    dir.hosts(&[&a.url(), &b.url()]);
    let bal = start_reloading(&dir.0);
    let g0 = generation(&bal);
    let addr = bal.addr;

    const CLIENTS: usize = 6;
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicUsize::new(0));
    let failures = Arc::new(Mutex::new(Vec::<String>::new()));
    // Per client: the epoch in which its last finished request had started.
    let epoch = Arc::new(AtomicU64::new(0));
    let finished_in: Arc<Vec<AtomicU64>> =
        Arc::new((0..CLIENTS).map(|_| AtomicU64::new(0)).collect());
    let clients: Vec<_> = (0..CLIENTS)
        .map(|i| {
            let (stop, done, failures) = (stop.clone(), done.clone(), failures.clone());
            let (epoch, finished_in) = (epoch.clone(), finished_in.clone());
            std::thread::spawn(move || {
                let mut n = 0;
                while !stop.load(Ordering::SeqCst) && n < 100_000 {
                    n += 1;
                    let began = epoch.load(Ordering::SeqCst);
                    let r = post(addr, "/v1/chat/completions", &chat(false));
                    if r.status != 200 || !r.complete {
                        failures
                            .lock()
                            .unwrap()
                            .push(format!("{} {}", r.status, r.text()));
                    }
                    finished_in[i].store(began, Ordering::SeqCst);
                    done.fetch_add(1, Ordering::SeqCst);
                }
            })
        })
        .collect();
    assert!(wait_for(RELOAD, || done.load(Ordering::SeqCst) >= 30));

    // Add c.
    dir.hosts(&[&a.url(), &b.url(), &c.url()]);
    reloaded_to(&bal, g0 + 1);
    assert!(
        wait_for(RELOAD, || c.hits() >= 5),
        "the new host gets no traffic"
    );

    // Remove a.
    dir.hosts(&[&b.url(), &c.url()]);
    reloaded_to(&bal, g0 + 2);
    // Once every client has finished a request begun after the swap, no
    // request of the old generation can still reach a.
    epoch.store(1, Ordering::SeqCst);
    assert!(wait_for(RELOAD, || finished_in
        .iter()
        .all(|e| e.load(Ordering::SeqCst) == 1)));
    // Proxied requests only: a model-discovery round of an earlier
    // generation may still be polling a's /v1/models.
    let chats = |up: &Upstream| {
        up.requests()
            .iter()
            .filter(|s| s.path == "/v1/chat/completions")
            .count()
    };
    let a_after = chats(&a);
    let (b_after, c_after) = (b.hits(), c.hits());
    let so_far = done.load(Ordering::SeqCst);
    assert!(wait_for(RELOAD, || done.load(Ordering::SeqCst) >= so_far + 60));
    stop.store(true, Ordering::SeqCst);
    for c in clients {
        c.join().expect("a client thread panicked");
    }

    let failures = failures.lock().unwrap();
    assert!(failures.is_empty(), "failed requests: {failures:?}");
    assert_eq!(chats(&a), a_after, "the removed host still gets traffic");
    assert!(b.hits() > b_after && c.hits() > c_after);
    let st = status(&bal);
    assert_eq!(st["hosts"].as_array().unwrap().len(), 2);
    assert_eq!(st["config"]["reloads"], 2);
    // A worker counts its request done just after the answer went out.
    assert!(
        wait_for(RELOAD, || status(&bal)["totals"]["requestsInFlight"] == 0),
        "requests still counted in flight: {}",
        status(&bal)
    );
}

#[test]
fn a_corrupt_file_changes_nothing_and_the_next_good_one_is_applied() {
    let a = Upstream::always(Reply::json(200, OK));
    let b = Upstream::always(Reply::json(200, OK));
    let dir = Dir::new("corrupt");
    dir.hosts(&[&a.url()]);
    let bal = start_reloading(&dir.0);
    let g0 = generation(&bal);
    let shared = bal.server().shared().clone();
    assert_eq!(
        post(bal.addr, "/v1/chat/completions", &chat(false)).status,
        200
    );

    // Truncated in the middle of the list (line 2).
    dir.write("hosts.json", &format!("{{\"hosts\": [\n  \"{}\",", b.url()));
    assert!(wait_for(RELOAD, || shared.reload.failed() == 1));
    let err = shared.reload.last_error().unwrap();
    assert!(err.contains("hosts.json:"), "{err}");
    // The message is the one `check` prints.
    let check = config::load(&dir.0, &Overrides::default()).unwrap_err();
    assert_eq!(err, check.to_string());
    assert_eq!(status(&bal)["config"]["lastReloadError"], err.as_str());
    // Reported once per change, not once per poll.
    let checks = shared.reload.checks();
    assert!(wait_for(RELOAD, || shared.reload.checks() >= checks + 2));
    assert_eq!(shared.reload.failed(), 1);
    assert_eq!(generation(&bal), g0);
    for _ in 0..5 {
        let r = post(bal.addr, "/v1/chat/completions", &chat(false));
        assert_eq!(r.status, 200);
    }
    assert_eq!((a.hits(), b.hits()), (6, 0));

    // hosts.json repaired but balancer.json broken: refused the same way.
    dir.hosts(&[&a.url()]);
    dir.write("balancer.json", r#"{"maxAttempts": 0}"#);
    assert!(wait_for(RELOAD, || shared.reload.failed() == 2));
    let err = shared.reload.last_error().unwrap();
    assert!(
        err.contains("balancer.json") && err.contains("maxAttempts"),
        "{err}"
    );
    assert_eq!(generation(&bal), g0);

    dir.write("balancer.json", BALANCER);
    dir.hosts(&[&b.url()]);
    reloaded_to(&bal, g0 + 1);
    assert_eq!(
        post(bal.addr, "/v1/chat/completions", &chat(false)).status,
        200
    );
    assert_eq!((a.hits(), b.hits()), (6, 1));
    assert!(status(&bal)["config"]["lastReloadError"].is_null());
}

#[test]
fn a_changed_key_file_brings_back_a_key_rejected_with_401() {
    let revoked = "gaia-Revoked4Hn8sQ2vX6mT";
    let good = "gaia-Good5Jk9wE3rP7cY1zL";
    let bearer = format!("Bearer {revoked}");
    let up = Upstream::start(move |seen, _| {
        if seen.header("authorization") == Some(&bearer) {
            Reply::json(401, r#"{"error":{"message":"invalid key"}}"#)
        } else {
            Reply::json(200, OK)
        }
    });
    let other = Upstream::always(Reply::json(200, OK));
    let dir = Dir::new("keys");
    dir.hosts(&[&up.url()]);
    dir.keys(&[revoked, good], "first");
    let bal = start_reloading(&dir.0);
    let g0 = generation(&bal);
    let key_state = |bal: &Running| status(bal)["keys"][0]["state"].clone();
    assert!(wait_for(RELOAD, || {
        assert_eq!(
            post(bal.addr, "/v1/chat/completions", &chat(false)).status,
            200
        );
        key_state(&bal) == "disabled"
    }));

    // Another file changes: the pool, and the rejection, stay.
    dir.hosts(&[&up.url(), &other.url()]);
    reloaded_to(&bal, g0 + 1);
    assert_eq!(key_state(&bal), "disabled");

    // The key file changes (a description is enough): every key is back.
    dir.keys(&[revoked, good], "second");
    reloaded_to(&bal, g0 + 2);
    assert_eq!(key_state(&bal), "active");
    let sent = |up: &Upstream| {
        up.requests()
            .iter()
            .filter(|s| s.header("authorization") == Some(&format!("Bearer {revoked}")))
            .count()
    };
    let before = sent(&up) + sent(&other);
    assert!(wait_for(RELOAD, || {
        assert_eq!(
            post(bal.addr, "/v1/chat/completions", &chat(false)).status,
            200
        );
        sent(&up) + sent(&other) > before
    }));
}

#[test]
fn rewriting_hosts_json_brings_back_a_host_s_own_rejected_key() {
    let own = "sk-own-Rejected7Hq2mX9vB";
    let up = Upstream::always(Reply::json(401, r#"{"error":{"message":"invalid key"}}"#));
    let dir = Dir::new("own-keys");
    let hosts = format!(
        r#"{{"hosts": [{{"url": "{}", "apiKeys": ["{own}"]}}]}}"#,
        up.url()
    );
    dir.write("hosts.json", &hosts);
    let bal = start_reloading(&dir.0);
    let g0 = generation(&bal);
    let own_state = |bal: &Running| status(bal)["hosts"][0]["keys"][0]["state"].clone();
    assert_eq!(own_state(&bal), "active");
    let r = post(bal.addr, "/v1/chat/completions", &chat(false));
    assert_ne!(r.status, 200);
    assert_eq!(own_state(&bal), "disabled", "its only host rejected it");

    // The global key file changing does not touch a host's own keys.
    dir.keys(&["gaia-Global3Kd8sQ2vX6mT"], "x");
    reloaded_to(&bal, g0 + 1);
    assert_eq!(own_state(&bal), "disabled");

    // hosts.json is their key file: rewritten, even unchanged, they are back.
    dir.write("hosts.json", &format!("{hosts}\n"));
    reloaded_to(&bal, g0 + 2);
    assert_eq!(own_state(&bal), "active");
    let hits = up.hits();
    post(bal.addr, "/v1/chat/completions", &chat(false));
    assert!(up.hits() > hits, "the key is sent again");
}

#[test]
fn health_and_in_flight_counts_carry_over_and_requests_finish_on_their_config() {
    let bad = Upstream::always(Reply::json(500, "{}"));
    let good = Upstream::start(|seen, _| {
        if String::from_utf8_lossy(&seen.body).contains("\"stream\":true") {
            slow_stream(12, Duration::from_millis(250))
        } else {
            Reply::json(200, OK)
        }
    });
    let leaving = Upstream::start(|seen, _| {
        if String::from_utf8_lossy(&seen.body).contains("\"stream\":true") {
            slow_stream(12, Duration::from_millis(250))
        } else {
            Reply::json(200, OK)
        }
    });
    let front = Upstream::always(Reply::json(200, OK));
    let dir = Dir::new("health");
    dir.hosts(&[&bad.url(), &good.url(), &leaving.url()]);
    let bal = start_reloading(&dir.0);
    let g0 = generation(&bal);
    let addr = bal.addr;

    // Eject bad (every request still succeeds by failing over).
    assert!(wait_for(RELOAD, || {
        assert_eq!(post(addr, "/v1/chat/completions", &chat(false)).status, 200);
        status(&bal)["hosts"][0]["state"] == "ejected"
    }));
    let ejections = status(&bal)["hosts"][0]["ejections"].clone();
    assert_eq!(ejections, 1);

    // Two streams in flight: one on good, which stays, one on leaving,
    // which the reload removes.
    let streams: Vec<_> = (0..2)
        .map(|_| std::thread::spawn(move || post(addr, "/v1/chat/completions", &chat(true))))
        .collect();
    assert!(wait_for(RELOAD, || good.sent().len() >= 2
        && leaving.sent().len() >= 2));
    assert_eq!(status(&bal)["hosts"][1]["inFlight"], 1);

    // A new host in front moves bad and good to other positions.
    dir.hosts(&[&front.url(), &bad.url(), &good.url()]);
    reloaded_to(&bal, g0 + 1);
    let st = status(&bal);
    assert_eq!(st["hosts"][1]["url"], bad.url().as_str());
    assert_eq!(st["hosts"][2]["url"], good.url().as_str());
    assert_eq!(st["hosts"][1]["state"], "ejected", "{st}");
    assert_eq!(st["hosts"][1]["ejections"], ejections);
    assert!(st["hosts"][1]["failures"].as_u64().unwrap() >= 5);
    assert_eq!(
        st["hosts"][2]["inFlight"], 1,
        "in-flight count carried over"
    );
    assert_eq!(st["totals"]["ejected"], 1);

    for s in streams {
        let r = s.join().unwrap();
        assert_eq!(r.status, 200);
        assert!(
            r.complete && r.text().ends_with("data: [DONE]\n\n") && r.text().contains("part11"),
            "a stream in flight was cut by the reload: {}",
            r.text()
        );
    }
    assert!(wait_for(RELOAD, || status(&bal)["hosts"][2]["inFlight"] == 0));
    let bad_hits = bad.hits();
    let leaving_hits = leaving.hits();
    for _ in 0..8 {
        assert_eq!(post(addr, "/v1/chat/completions", &chat(false)).status, 200);
    }
    assert_eq!(
        bad.hits(),
        bad_hits,
        "an ejected host came back with the reload"
    );
    assert_eq!(leaving.hits(), leaving_hits);
    assert!(front.hits() > 0);
}

#[test]
fn listener_settings_wait_for_a_restart_and_the_rest_applies() {
    let up = Upstream::always(Reply::json(200, OK));
    let dir = Dir::new("listener");
    dir.hosts(&[&up.url()]);
    let bal = start_reloading(&dir.0);
    let g0 = generation(&bal);
    let before = bal.server().shared().current().config.settings.clone();
    dir.write(
        "balancer.json",
        r#"{"queueSize": 7, "maxConnectionsPerClient": 3, "maxAttempts": 2, "discoveryIntervalMs": 0,
            "timeouts": {"connectMs": 2000, "firstByteMs": 5000, "idleMs": 5000, "totalMs": 20000}}"#,
    );
    reloaded_to(&bal, g0 + 1);
    let after = bal.server().shared().current().config.settings.clone();
    assert_eq!(after.max_attempts, 2);
    assert_eq!(
        (
            after.queue_size,
            after.max_connections_per_client,
            after.port,
            after.workers
        ),
        (
            before.queue_size,
            before.max_connections_per_client,
            before.port,
            before.workers
        )
    );
    assert_eq!(
        post(bal.addr, "/v1/chat/completions", &chat(false)).status,
        200
    );
}

#[test]
fn a_reload_that_moves_a_host_does_not_make_it_count_as_a_second_rejecting_host() {
    // One misconfigured node rejects the shared key; the other accepts it.
    // A shared key leaves rotation only once a *second* host rejects it.
    let bad = Upstream::always(Reply::json(401, r#"{"error":{"message":"no"}}"#));
    let good = Upstream::always(Reply::json(200, OK));
    let dir = Dir::new("rejected-moved");
    dir.hosts(&[&bad.url(), &good.url()]);
    dir.keys(&["pool-key-shared-moved-000001"], "shared");
    let bal = start_reloading(&dir.0);
    let g0 = generation(&bal);
    assert!(wait_for(RELOAD, || {
        assert_eq!(
            post(bal.addr, "/v1/chat/completions", &chat(false)).status,
            200
        );
        bad.hits() == 1
    }));
    // The operator puts the good node first: the bad one moves, unchanged.
    dir.hosts(&[&good.url(), &bad.url()]);
    reloaded_to(&bal, g0 + 1);
    let moved = bal.server().shared().current().hosts.all()[1].clone();
    assert_eq!(moved.spec.base_url, bad.url());
    // As if REJECTED_PAIR_COOLDOWN (300 s) had passed: the pair may be tried again.
    moved.health().pairs.clear();
    assert!(wait_for(RELOAD, || {
        assert_eq!(
            post(bal.addr, "/v1/chat/completions", &chat(false)).status,
            200
        );
        bad.hits() == 2
    }));
    // Still one host that rejected the key: it stays in rotation.
    let state = status(&bal)["keys"][0]["state"].clone();
    assert_eq!(state, "active", "{}", status(&bal));
    assert_eq!(
        post(bal.addr, "/v1/chat/completions", &chat(false)).status,
        200
    );
}

#[test]
fn failures_of_requests_in_flight_across_a_reload_count_toward_ejection() {
    use gaia_balancer::hosts::EJECT_AFTER;
    // bad holds every attempt until the reload is in force, then fails it:
    // the failures land after the swap, from requests of the old generation.
    let released = Arc::new(AtomicBool::new(false));
    let gate = released.clone();
    let bad = Upstream::start(move |_, _| {
        // Bounded below firstByteMs: a gate never opened still ends in a 500.
        wait_for(Duration::from_secs(4), || gate.load(Ordering::SeqCst));
        Reply::json(500, "{}")
    });
    let good = Upstream::always(Reply::json(200, OK));
    let front = Upstream::always(Reply::json(200, OK));
    let dir = Dir::new("straddle");
    dir.hosts(&[&bad.url(), &good.url()]);
    let bal = start_reloading(&dir.0);
    let g0 = generation(&bal);
    let addr = bal.addr;

    // One request at a time until EJECT_AFTER of them wait on bad (round
    // robin sends every other one to good, which answers at once).
    let held = EJECT_AFTER as usize;
    let mut clients = Vec::new();
    for _ in 0..4 * held {
        if bad.hits() >= held {
            break;
        }
        let (on_bad, on_good) = (bad.hits(), good.hits());
        clients.push(std::thread::spawn(move || {
            post(addr, "/v1/chat/completions", &chat(false))
        }));
        assert!(wait_for(RELOAD, || bad.hits() > on_bad || good.hits() > on_good));
    }
    assert_eq!(bad.hits(), held);
    assert_eq!(status(&bal)["hosts"][0]["consecutiveFailures"], 0);

    // A new host in front: bad stays (same URL) at another position.
    dir.hosts(&[&front.url(), &bad.url(), &good.url()]);
    reloaded_to(&bal, g0 + 1);
    released.store(true, Ordering::SeqCst);
    for c in clients {
        let r = c.join().expect("a client thread panicked");
        assert_eq!(r.status, 200, "{}", r.text());
    }

    let st = status(&bal);
    let host = &st["hosts"][1];
    assert_eq!(host["url"], bad.url().as_str(), "{st}");
    assert_eq!(host["failures"], held, "{st}");
    assert_eq!(host["consecutiveFailures"], held, "{st}");
    assert_eq!(host["state"], "ejected", "{st}");
    assert_eq!(host["ejections"], 1, "{st}");
    assert_eq!(st["totals"]["ejected"], 1, "{st}");
    let metrics = request(addr, "GET", "/metrics", &[], b"").text();
    let name = host["name"].as_str().expect("a host name");
    let line = format!("gaia_balancer_host_ejections_total{{host=\"{name}\"}} 1");
    assert!(
        metrics.lines().any(|l| l == line),
        "{line} not in:\n{metrics}"
    );
    // The new generation keeps traffic off it.
    for _ in 0..6 {
        assert_eq!(post(addr, "/v1/chat/completions", &chat(false)).status, 200);
    }
    assert_eq!(bad.hits(), held, "an ejected host got traffic");
}
