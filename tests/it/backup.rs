//! Backup providers: a fallback tier with its own keys and model names.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use crate::fake::{content_event, finish_events, Reply, Step, Upstream};
use crate::util::{chat, post, start};

const OK: &str = r#"{"choices":[{"index":0,"message":{"role":"assistant","content":"ok"},"finish_reason":"stop"}]}"#;
const GLOBAL: &str = "gaia-global-key-000000001";
const PAID: &str = "sk-or-paid-key-0000000009";

/// Two primaries and one backup with its own key and a model map.
fn setup(primary: impl Fn() -> Upstream) -> (Upstream, Upstream, Upstream, crate::util::Running) {
    let (p0, p1) = (primary(), primary());
    let backup = Upstream::start(|seen, _| {
        if String::from_utf8_lossy(&seen.body).contains("\"stream\":true") {
            Reply::sse(vec![
                Step::Send(content_event("from backup")),
                Step::Send(finish_events()),
            ])
        } else {
            Reply::json(200, OK)
        }
    });
    let bal = start(&[p0.url(), p1.url(), backup.url()], &[GLOBAL], |c| {
        let b = &mut c.hosts[2];
        b.name = "openrouter".into();
        b.backup = true;
        b.api_keys = Some(vec![PAID.into()]);
        b.models = BTreeMap::from([(
            "m".to_string(),
            "meta-llama/llama-3.1-8b-instruct".to_string(),
        )]);
    });
    (p0, p1, backup, bal)
}

#[test]
fn backup_serves_when_primaries_fail_with_its_own_key_and_model() {
    for failing in [
        Reply::json(429, "{}"),
        Reply::json(500, "{}"),
        Reply::json(503, "{}"),
    ] {
        let what = format!("{failing:?}");
        let (p0, p1, backup, bal) = setup(|| Upstream::always(failing.clone()));
        for stream in [false, true] {
            let r = post(bal.addr, "/v1/chat/completions", &chat(stream));
            assert_eq!(r.status, 200, "{what}: {}", r.text());
            assert_eq!(r.header("x-gaia-upstream"), Some("openrouter"));
            let trail = r.header("x-gaia-attempts").unwrap_or("");
            assert!(trail.contains("openrouter(backup)"), "{trail}");
            if stream {
                assert!(r.text().contains("from backup"));
            }
        }
        let seen = backup.requests();
        assert!(!seen.is_empty(), "{what}");
        for s in &seen {
            assert_eq!(
                s.header("authorization"),
                Some(format!("Bearer {PAID}").as_str())
            );
            let body = String::from_utf8_lossy(&s.body);
            assert!(
                body.contains(r#""model":"meta-llama/llama-3.1-8b-instruct""#),
                "{body}"
            );
        }
        // The paid key never reaches a primary; the global key never the backup.
        for s in p0.requests().iter().chain(p1.requests().iter()) {
            assert_eq!(
                s.header("authorization"),
                Some(format!("Bearer {GLOBAL}").as_str())
            );
            assert!(String::from_utf8_lossy(&s.body).contains(r#""model":"m""#));
        }
    }
}

#[test]
fn healthy_primaries_keep_the_backup_idle() {
    let (p0, p1, backup, bal) = setup(|| Upstream::always(Reply::json(200, OK)));
    for i in 0..200 {
        assert_eq!(
            post(bal.addr, "/v1/chat/completions", &chat(i % 5 == 0)).status,
            200
        );
    }
    assert_eq!(backup.hits(), 0);
    assert_eq!(p0.hits() + p1.hits(), 200);
}

#[test]
fn a_recovering_primary_takes_the_traffic_back() {
    let down = Arc::new(AtomicBool::new(true));
    let flag = down.clone();
    let (p0, _p1, backup, bal) = setup(move || {
        let flag = flag.clone();
        Upstream::start(move |_, _| {
            if flag.load(Ordering::SeqCst) {
                Reply::json(502, "{}")
            } else {
                Reply::json(200, OK)
            }
        })
    });
    for _ in 0..3 {
        assert_eq!(
            post(bal.addr, "/v1/chat/completions", &chat(false)).header("x-gaia-upstream"),
            Some("openrouter")
        );
    }
    down.store(false, Ordering::SeqCst);
    let served_by_backup = backup.hits();
    for _ in 0..10 {
        let r = post(bal.addr, "/v1/chat/completions", &chat(false));
        assert_eq!(r.status, 200);
        assert_ne!(r.header("x-gaia-upstream"), Some("openrouter"));
    }
    assert_eq!(backup.hits(), served_by_backup);
    assert!(p0.hits() > 0);
}

#[test]
fn only_the_model_value_changes_in_the_body() {
    let (_p0, _p1, backup, bal) = setup(|| Upstream::always(Reply::json(500, "{}")));
    let body = "{\"temperature\": 0.25,\n \"model\" : \"m\", \"messages\":[{\"role\":\"user\",\"content\":\"model: m\"}],\"x\":[1,2 ,3]}";
    let r = post(bal.addr, "/v1/chat/completions", body);
    assert_eq!(r.status, 200, "{}", r.text());
    let sent = String::from_utf8(backup.requests()[0].body.clone()).unwrap();
    assert_eq!(
        sent,
        body.replace(
            "\"model\" : \"m\"",
            "\"model\" : \"meta-llama/llama-3.1-8b-instruct\""
        )
    );
    // A model the map does not name passes untouched.
    let other = "{\"model\":\"unmapped\",\"messages\":[]}";
    post(bal.addr, "/v1/chat/completions", other);
    assert_eq!(backup.requests()[1].body, other.as_bytes());
}

/// One primary and one backup, a common setup (a local node with a paid
/// provider behind it): once the primary is ejected, requests go straight to
/// the backup instead of failing on the ejected primary first. Panic mode
/// (ignoring ejections) is for when nothing else can serve.
#[test]
fn an_ejected_primary_is_skipped_while_a_backup_can_serve() {
    let primary = Upstream::always(Reply::json(500, "{}"));
    let backup = Upstream::always(Reply::json(200, OK));
    let bal = start(&[primary.url(), backup.url()], &[GLOBAL], |c| {
        c.hosts[1].backup = true;
    });
    // Five host failures eject the primary (each request then fails over).
    for _ in 0..5 {
        let r = post(bal.addr, "/v1/chat/completions", &chat(false));
        assert_eq!(r.status, 200, "{}", r.text());
    }
    assert_eq!(primary.hits(), 5);
    // Ejected for 30 s at least: it gets nothing meanwhile.
    for _ in 0..10 {
        let r = post(bal.addr, "/v1/chat/completions", &chat(false));
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(
            r.header("x-gaia-attempts").map(|t| t.contains("h0")),
            Some(false),
            "{:?}",
            r.header("x-gaia-attempts")
        );
    }
    assert_eq!(primary.hits(), 5, "requests went to the ejected primary");
    assert_eq!(backup.hits(), 15);
}
