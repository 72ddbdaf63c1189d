//! Security: what a hostile client can make the balancer send upstream.

use crate::fake::{Reply, Upstream};
use crate::util::{post, raw, start, status_of};

#[test]
fn dot_segments_behind_encoded_or_backslash_separators_never_reach_upstream() {
    let up = Upstream::always(Reply::json(200, "{}"));
    let bal = start(&[up.url()], &["pool-key-123456789"], |_| {});
    // Each resolves to /admin in some upstream stack (nginx decodes %2F
    // before resolving dot segments; WHATWG parsers read `\` as `/`;
    // Tomcat reads `..;` as `..`), carrying the pool key out of /v1/.
    for target in [
        "/v1/..%2fadmin",
        "/v1/..%2Fadmin",
        "/v1/%2e%2e%2fadmin",
        "/v1/..\\admin",
        "/v1/%2e%2e%5cadmin",
        "/v1/x/..%5C..%5Cadmin",
        "/v1/..;/admin",
        "http://evil.example/v1/..%2fadmin",
    ] {
        let req = format!("GET {target} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n");
        let resp = raw(bal.addr, req.as_bytes());
        assert_eq!(status_of(&resp), 400, "{target}: {resp}");
    }
    assert_eq!(up.hits(), 0, "{:?}", up.requests());
    // An encoded slash inside a name (a model id such as org/name) still
    // goes through, as it is.
    let fine = "/v1/models/meta-llama%2FLlama-3.1-8B";
    let resp = raw(
        bal.addr,
        format!("GET {fine} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n").as_bytes(),
    );
    assert_eq!(status_of(&resp), 200, "{resp}");
    assert_eq!(
        up.requests().last().map(|s| s.path.clone()).as_deref(),
        Some(fine)
    );
}

const UNKNOWN: &str =
    r#"{"error":{"message":"The model does not exist","code":"model_not_found"}}"#;

fn ask(model: &str) -> String {
    format!(r#"{{"model":"{model}","messages":[{{"role":"user","content":"hi"}}]}}"#)
}

#[test]
fn model_names_chosen_by_clients_are_remembered_within_bounds() {
    let up = Upstream::always(Reply::json(404, UNKNOWN));
    let bal = start(&[up.url()], &[], |_| {});
    // A name no host can list (longer than any kept id) is not remembered
    // (nor logged): the host is asked again, as it was the first time.
    let long = "x".repeat(300);
    for _ in 0..2 {
        assert_eq!(
            post(bal.addr, "/v1/chat/completions", &ask(&long)).status,
            404
        );
    }
    assert_eq!(up.hits(), 2, "a 300-byte model name was remembered");
    // Made-up names fill at most 256 places per host; the oldest gives way.
    for i in 0..257 {
        let r = post(
            bal.addr,
            "/v1/chat/completions",
            &ask(&format!("made-up-{i}")),
        );
        assert_eq!(r.status, 404, "{}", r.text());
    }
    assert_eq!(up.hits(), 2 + 257);
    let r = post(bal.addr, "/v1/chat/completions", &ask("made-up-256"));
    assert_eq!(r.status, 404);
    assert_eq!(up.hits(), 2 + 257, "the newest name is still remembered");
    let r = post(bal.addr, "/v1/chat/completions", &ask("made-up-0"));
    assert_eq!(r.status, 404);
    assert_eq!(up.hits(), 2 + 258, "the oldest name gave way");
}
