//! Model discovery: hosts polled on `/v1/models`, requests routed by model,
//! model-unknown 404s, the local `/v1/models`, readmission by discovery.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use gaia_balancer::hosts::{HostState, Verdict};
use gaia_balancer::state::Balancer;

use crate::fake::{Reply, Upstream};
use crate::util::{post, request, start, wait_for, Running};

const OK: &str = r#"{"choices":[{"index":0,"message":{"role":"assistant","content":"ok"},"finish_reason":"stop"}]}"#;
const UNKNOWN: &str = r#"{"error":{"message":"The model `alpha` does not exist or you do not have access to it.","type":"invalid_request_error","param":null,"code":"model_not_found"}}"#;
const LIMIT: Duration = Duration::from_secs(10);

fn list(models: &[&str]) -> String {
    let data: Vec<serde_json::Value> = models
        .iter()
        .map(|m| serde_json::json!({"id": m, "object": "model", "created": 1, "owned_by": "node"}))
        .collect();
    serde_json::json!({"object": "list", "data": data}).to_string()
}

/// A node that lists `models` and answers every other request with OK.
fn node(models: &'static [&'static str]) -> Upstream {
    Upstream::start(move |seen, _| {
        if seen.path == "/v1/models" {
            Reply::json(200, &list(models))
        } else {
            Reply::json(200, OK)
        }
    })
}

fn ask(model: &str) -> String {
    format!(r#"{{"model":"{model}","messages":[{{"role":"user","content":"hi"}}]}}"#)
}

/// Requests other than discovery polls.
fn chats(up: &Upstream) -> Vec<String> {
    up.requests()
        .iter()
        .filter(|s| s.path != "/v1/models")
        .map(|s| {
            serde_json::from_slice::<serde_json::Value>(&s.body).map_or(String::new(), |v| {
                v["model"].as_str().unwrap_or_default().to_string()
            })
        })
        .collect()
}

fn polls(up: &Upstream) -> usize {
    up.requests()
        .iter()
        .filter(|s| s.path == "/v1/models")
        .count()
}

fn current(bal: &Running) -> Arc<Balancer> {
    bal.server().shared().current()
}

/// Wait until each host in `hosts` has answered discovery.
fn answered(bal: &Running, hosts: &[usize]) {
    let ok = wait_for(LIMIT, || {
        let b = current(bal);
        hosts
            .iter()
            .all(|&i| b.hosts.all()[i].catalog.models().is_some())
    });
    assert!(ok, "discovery never answered for {hosts:?}");
}

fn every(ms: u64) -> impl FnOnce(&mut gaia_balancer::config::Config) {
    move |c| c.settings.discovery_interval = Some(Duration::from_millis(ms))
}

#[test]
fn each_model_goes_only_to_the_hosts_that_serve_it() {
    let ups = [
        node(&["alpha"]),
        node(&["alpha"]),
        node(&["beta"]),
        node(&["beta"]),
    ];
    let urls: Vec<String> = ups.iter().map(Upstream::url).collect();
    let bal = start(&urls, &[], every(60_000));
    answered(&bal, &[0, 1, 2, 3]);
    for i in 0..40 {
        let model = if i % 2 == 0 { "alpha" } else { "beta" };
        let r = post(bal.addr, "/v1/chat/completions", &ask(model));
        assert_eq!(r.status, 200, "{}", r.text());
    }
    for (i, up) in ups.iter().enumerate() {
        let want = if i < 2 { "alpha" } else { "beta" };
        let got = chats(up);
        assert_eq!(got.len(), 10, "h{i}: round-robin within the serving pair");
        assert!(got.iter().all(|m| m == want), "h{i} got {got:?}");
    }
    // A model nobody declares may go anywhere (the upstream decides); so
    // may a body whose model is ambiguous.
    for body in [
        ask("gamma"),
        r#"{"model":"alpha","model":"beta","messages":[]}"#.to_string(),
    ] {
        for _ in 0..8 {
            assert_eq!(post(bal.addr, "/v1/chat/completions", &body).status, 200);
        }
    }
    assert!(
        ups.iter().all(|u| chats(u).len() > 10),
        "spread over all four"
    );
}

#[test]
fn a_host_that_has_not_answered_accepts_anything() {
    let serves = node(&["alpha"]);
    let silent = Upstream::start(|seen, _| {
        if seen.path == "/v1/models" {
            Reply::json(500, "{}")
        } else {
            Reply::json(200, OK)
        }
    });
    let other = node(&["beta"]);
    let bal = start(
        &[serves.url(), silent.url(), other.url()],
        &[],
        every(60_000),
    );
    answered(&bal, &[0, 2]);
    assert!(wait_for(LIMIT, || polls(&silent) >= 1));
    for _ in 0..10 {
        let r = post(bal.addr, "/v1/chat/completions", &ask("alpha"));
        assert_eq!(r.status, 200, "{}", r.text());
    }
    assert_eq!(chats(&serves).len(), 5);
    assert_eq!(chats(&silent).len(), 5, "no answer yet: eligible");
    assert!(chats(&other).is_empty(), "answered without alpha");
    // A junk answer is no information, and the host's health is untouched.
    assert_eq!(current(&bal).hosts.all()[1].catalog.models(), None);
    assert_eq!(current(&bal).hosts.all()[1].health().state, HostState::Up);
}

#[test]
fn a_model_not_found_404_excludes_the_host_and_fails_over_invisibly() {
    // Both list alpha, but h0 cannot load it.
    let broken = Upstream::start(|seen, _| {
        if seen.path == "/v1/models" {
            Reply::json(200, &list(&["alpha", "ghost"]))
        } else {
            Reply::json(404, UNKNOWN)
        }
    });
    let good = Upstream::start(|seen, _| {
        if seen.path == "/v1/models" {
            Reply::json(200, &list(&["alpha", "ghost"]))
        } else if String::from_utf8_lossy(&seen.body).contains("ghost") {
            Reply::json(
                404,
                r#"{"error":"model \"ghost\" not found, try pulling it first"}"#,
            )
        } else {
            Reply::json(200, OK)
        }
    });
    let bal = start(&[broken.url(), good.url()], &[], every(60_000));
    answered(&bal, &[0, 1]);
    let mut trails = Vec::new();
    for _ in 0..10 {
        let r = post(bal.addr, "/v1/chat/completions", &ask("alpha"));
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.header("x-gaia-upstream"), Some("h1"));
        trails.push(r.header("x-gaia-attempts").unwrap_or("").to_string());
    }
    assert_eq!(chats(&broken).len(), 1, "excluded after its first 404");
    assert!(trails.contains(&"h0:404,h1:200".to_string()), "{trails:?}");
    // The exclusion is about (host, model): other models still go there.
    let b = current(&bal);
    assert!(b.hosts.all()[0].health().state == HostState::Up);
    // Every host refusing a model: a 404 of our own, then no upstream call at all.
    let r = post(bal.addr, "/v1/chat/completions", &ask("ghost"));
    assert_eq!(r.status, 404, "{}", r.text());
    assert_eq!(r.json()["error"]["code"], "model_not_found");
    let before = broken.hits() + good.hits();
    let r = post(bal.addr, "/v1/chat/completions", &ask("ghost"));
    assert_eq!(r.status, 404, "{}", r.text());
    assert!(r.text().contains("ghost"), "{}", r.text());
    assert_eq!(broken.hits() + good.hits(), before);
}

#[test]
fn the_next_discovery_lifts_the_exclusion() {
    let fixed = Arc::new(AtomicBool::new(false));
    let flag = fixed.clone();
    let flaky = Upstream::start(move |seen, _| {
        if seen.path == "/v1/models" {
            Reply::json(200, &list(&["alpha"]))
        } else if flag.load(Ordering::SeqCst) {
            Reply::json(200, OK)
        } else {
            Reply::json(404, UNKNOWN)
        }
    });
    let good = node(&["alpha"]);
    let bal = start(&[flaky.url(), good.url()], &[], every(300));
    answered(&bal, &[0, 1]);
    while chats(&flaky).is_empty() {
        assert_eq!(
            post(bal.addr, "/v1/chat/completions", &ask("alpha")).status,
            200
        );
    }
    fixed.store(true, Ordering::SeqCst);
    let polled = polls(&flaky);
    // A round that started after the exclusion ends it.
    assert!(wait_for(LIMIT, || polls(&flaky) >= polled + 2));
    let back = wait_for(LIMIT, || {
        post(bal.addr, "/v1/chat/completions", &ask("alpha")).header("x-gaia-upstream")
            == Some("h0")
    });
    assert!(back, "h0 never served alpha again");
}

#[test]
fn v1_models_is_the_union_answered_locally() {
    let a = node(&["b-model", "a-model"]);
    let c = node(&["c-model", "a-model"]);
    let ejected = node(&["only-on-the-ejected-host"]);
    let spare = node(&[]);
    let backup = node(&["x-provider/model"]);
    let bal = start(
        &[a.url(), c.url(), ejected.url(), spare.url(), backup.url()],
        &[],
        |cfg| {
            cfg.settings.discovery_interval = Some(Duration::from_secs(60));
            cfg.hosts[4].backup = true;
            cfg.hosts[4].models = BTreeMap::from([("mapped".into(), "x-provider/model".into())]);
        },
    );
    answered(&bal, &[0, 1, 2, 3, 4]);
    let b = current(&bal);
    for _ in 0..5 {
        b.hosts
            .record(&b.hosts.all()[2], Verdict::Failure, false, Some("test"));
    }
    assert!(matches!(
        b.hosts.all()[2].health().state,
        HostState::Ejected(_)
    ));
    let hits = || [&a, &c, &ejected, &spare, &backup].map(|u| u.hits());
    let before = hits();
    let r = request(bal.addr, "GET", "/v1/models", &[], b"");
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("content-type"), Some("application/json"));
    assert_eq!(hits(), before, "no upstream call on the request path");
    let v = r.json();
    assert_eq!(v["object"], "list");
    let ids: Vec<&str> = v["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(
        ids,
        [
            "a-model",
            "b-model",
            "c-model",
            "mapped",
            "x-provider/model"
        ]
    );
    assert_eq!(
        v["data"][0],
        serde_json::json!({"id": "a-model", "object": "model", "created": 0, "owned_by": "gaia-balancer"})
    );
    // What each host listed shows in /status.
    let status = request(bal.addr, "GET", "/status", &[], b"").json();
    assert_eq!(
        status["hosts"][0]["models"],
        serde_json::json!(["a-model", "b-model"])
    );
}

#[test]
fn v1_models_before_any_answer_and_under_client_keys() {
    let slow = Upstream::start(|seen, _| {
        if seen.path == "/v1/models" {
            Reply::Hang(Duration::from_secs(3))
        } else {
            Reply::json(200, OK)
        }
    });
    let bal = start(&[slow.url()], &[], |c| {
        c.settings.discovery_interval = Some(Duration::from_secs(60));
        c.settings.client_keys = vec!["client-key-0001".into()];
    });
    assert!(
        wait_for(LIMIT, || slow.hits() >= 1),
        "the poll is under way"
    );
    let started = Instant::now();
    let auth = [("Authorization", "Bearer client-key-0001")];
    let r = request(bal.addr, "GET", "/v1/models", &auth, b"");
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "never waits on a host"
    );
    assert_eq!(r.json()["data"], serde_json::json!([]));
    let r = request(bal.addr, "GET", "/v1/models", &[], b"");
    assert_eq!(r.status, 401, "{}", r.text());
    let r = request(bal.addr, "POST", "/v1/models", &auth, b"{}");
    assert_eq!(r.status, 405);
}

#[test]
fn discovery_is_forwarded_when_off() {
    let up = node(&["alpha"]);
    let bal = start(&[up.url()], &[], |_| {});
    let r = request(bal.addr, "GET", "/v1/models", &[], b"");
    assert_eq!(r.status, 200);
    assert_eq!(
        r.json()["data"][0]["owned_by"],
        "node",
        "the host's own answer"
    );
    assert_eq!(polls(&up), 1, "that one request, no polling");
}

#[test]
fn discovery_uses_the_pool_key() {
    const GLOBAL: &str = "gaia-global-key-000000001";
    const OWN: &str = "sk-own-key-00000000000002";
    let shared_pool = node(&["alpha"]);
    let own = node(&["beta"]);
    let bal = start(&[shared_pool.url(), own.url()], &[GLOBAL], |c| {
        c.settings.discovery_interval = Some(Duration::from_secs(60));
        c.hosts[1].api_keys = Some(vec![OWN.into()]);
    });
    answered(&bal, &[0, 1]);
    let auth = |up: &Upstream| {
        up.requests()
            .iter()
            .find(|s| s.path == "/v1/models")
            .and_then(|s| s.header("authorization").map(str::to_string))
    };
    assert_eq!(auth(&shared_pool), Some(format!("Bearer {GLOBAL}")));
    assert_eq!(auth(&own), Some(format!("Bearer {OWN}")));
    drop(bal);
    // No key in the pool: no Authorization header.
    let keyless = node(&["alpha"]);
    let bal = start(&[keyless.url()], &[], every(60_000));
    answered(&bal, &[0]);
    assert_eq!(auth(&keyless), None);
}

#[test]
fn discovery_readmits_an_ejected_host_without_live_traffic() {
    let back = node(&["alpha"]);
    let junk = Upstream::start(|seen, n| {
        // A valid list at start, junk once ejected.
        if seen.path == "/v1/models" && n == 0 {
            Reply::json(200, &list(&["alpha"]))
        } else {
            Reply::json(200, "<html>maintenance</html>")
        }
    });
    let others = [node(&["alpha"]), node(&["alpha"])];
    let bal = start(
        &[back.url(), junk.url(), others[0].url(), others[1].url()],
        &[],
        every(60_000),
    );
    answered(&bal, &[0, 1, 2, 3]);
    let b = current(&bal);
    for i in [0, 1] {
        for _ in 0..5 {
            b.hosts
                .record(&b.hosts.all()[i], Verdict::Failure, false, Some("test"));
        }
    }
    assert_eq!(b.hosts.ejected(), 2);
    // Shorten the ejections (30 s) so the test need not wait them out.
    let soon = Instant::now() + Duration::from_millis(300);
    for i in [0, 1] {
        b.hosts.all()[i].health().state = HostState::Ejected(soon);
    }
    let polled = polls(&junk);
    let up = wait_for(LIMIT, || b.hosts.all()[0].health().state == HostState::Up);
    assert!(up, "a valid list after the ejection readmits");
    assert!(wait_for(LIMIT, || polls(&junk) > polled), "probed too");
    assert!(
        matches!(b.hosts.all()[1].health().state, HostState::Ejected(_)),
        "junk is no proof"
    );
    assert_eq!(b.hosts.ejected(), 1);
    assert!(
        chats(&back).is_empty() && chats(&junk).is_empty(),
        "no live traffic"
    );
}

#[test]
fn a_reload_keeps_what_was_learned_and_polls_again() {
    let a = node(&["alpha"]);
    let z = node(&["zeta"]);
    let bal = start(&[a.url(), z.url()], &[], every(60_000));
    answered(&bal, &[0, 1]);
    let polled = polls(&a);
    let shared = bal.server().shared();
    let config = shared.current().config.clone();
    shared.replace(Balancer::new(config));
    assert!(
        wait_for(LIMIT, || polls(&a) > polled),
        "the new generation is polled"
    );
    answered(&bal, &[0, 1]);
    for _ in 0..6 {
        post(bal.addr, "/v1/chat/completions", &ask("zeta"));
    }
    assert_eq!(chats(&z).len(), 6);
    assert!(chats(&a).is_empty());
}

#[test]
fn a_stalled_list_is_cut_off_and_holds_up_no_other_host() {
    use crate::fake::Step;
    let stalled = Upstream::start(|seen, _| {
        if seen.path == "/v1/models" {
            Reply::Chunked {
                status: 200,
                content_type: "application/json".into(),
                steps: vec![
                    Step::Send(br#"{"data":[{"id":"a"},"#.to_vec()),
                    Step::Sleep(Duration::from_secs(30)),
                ],
            }
        } else {
            Reply::json(200, OK)
        }
    });
    let quick = node(&["alpha"]);
    let started = Instant::now();
    let bal = start(&[stalled.url(), quick.url()], &[], every(60_000));
    answered(&bal, &[1]);
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "polled side by side"
    );
    // The whole exchange is bounded (5 s), body included; the half list is no answer.
    assert!(wait_for(Duration::from_secs(8), || !stalled
        .peer_closed()
        .is_empty()));
    assert!(
        started.elapsed() >= Duration::from_secs(4),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(current(&bal).hosts.all()[0].catalog.models(), None);
}

/// A reload (any change, even `touch api-keys.json`) keeps the model lists
/// at once: `/v1/models` and routing by model do not lapse while the
/// discovery thread is still busy with a slow host's poll.
#[test]
fn a_reload_keeps_the_model_lists_while_discovery_is_busy() {
    use gaia_balancer::reload::{rebuild, KeyFiles};
    // Its list takes the whole poll timeout (5 s), keeping discovery busy.
    let slow = Upstream::start(|seen, _| {
        if seen.path == "/v1/models" {
            Reply::Hang(Duration::from_secs(30))
        } else {
            Reply::json(200, OK)
        }
    });
    let a = node(&["alpha"]);
    let z = node(&["zeta"]);
    let bal = start(&[a.url(), z.url(), slow.url()], &[], every(60_000));
    answered(&bal, &[0, 1]);
    let ids = |bal: &Running| {
        let r = request(bal.addr, "GET", "/v1/models", &[], b"");
        let v = r.json();
        v["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["id"].as_str().unwrap().to_string())
            .collect::<Vec<_>>()
    };
    assert_eq!(ids(&bal), ["alpha", "zeta"]);
    // The reload path: the next generation built from the one in force.
    let shared = bal.server().shared();
    let old = shared.current();
    shared.replace(rebuild(&old, old.config.clone(), KeyFiles::default()));
    assert_eq!(ids(&bal), ["alpha", "zeta"], "right after the reload");
    for _ in 0..4 {
        let r = post(bal.addr, "/v1/chat/completions", &ask("zeta"));
        assert_eq!(r.status, 200);
    }
    assert!(chats(&a).is_empty(), "zeta went to the alpha host");
}
