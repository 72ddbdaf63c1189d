//! Helpers: start the real balancer in-process on an ephemeral loopback port,
//! and a small raw HTTP/1.1 client that records when each chunk arrived.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use gaia_balancer::config::{Config, HostSpec, Settings};
use gaia_balancer::server::{self, Server};

/// A balancer running in this process; shut down when dropped.
pub struct Running {
    server: Option<Server>,
    pub addr: SocketAddr,
}

impl Running {
    /// Wrap a server started some other way (e.g. with reload).
    pub fn from_server(server: Server) -> Running {
        let addr = server.local_addr();
        Running {
            server: Some(server),
            addr,
        }
    }

    pub fn server(&self) -> &Server {
        self.server.as_ref().expect("running")
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(s) = self.server.take() {
            s.shutdown(Duration::from_secs(2));
        }
    }
}

/// A host spec for a base URL, named h0, h1, ... by position.
pub fn host(i: usize, url: &str) -> HostSpec {
    HostSpec {
        name: format!("h{i}"),
        base_url: url.trim_end_matches('/').to_string(),
        weight: 1,
        backup: false,
        api_keys: None,
        models: BTreeMap::new(),
    }
}

/// Settings for tests: ephemeral port, short timeouts.
pub fn test_settings() -> Settings {
    let mut s = Settings {
        port: 0,
        workers: 16,
        ..Settings::default()
    };
    s.timeouts.connect = Duration::from_secs(2);
    s.timeouts.first_byte = Duration::from_secs(5);
    s.timeouts.idle = Duration::from_secs(5);
    s.timeouts.total = Duration::from_secs(20);
    // Off unless a test is about it: its polls would add to the fakes' hit counts.
    s.discovery_interval = None;
    s
}

/// Start a balancer over these upstream URLs and pool keys.
pub fn start(urls: &[String], keys: &[&str], tweak: impl FnOnce(&mut Config)) -> Running {
    let mut config = Config {
        dir: PathBuf::from("test"),
        hosts: urls.iter().enumerate().map(|(i, u)| host(i, u)).collect(),
        api_keys: keys.iter().map(|k| k.to_string()).collect(),
        settings: test_settings(),
    };
    tweak(&mut config);
    let server = server::start(config).expect("balancer starts");
    let addr = server.local_addr();
    Running {
        server: Some(server),
        addr,
    }
}

/// A response as the client saw it.
#[derive(Debug)]
pub struct Resp {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    /// Each body chunk with its arrival time (chunked responses).
    pub chunks: Vec<(Instant, Vec<u8>)>,
    /// The body ended properly (final chunk, full length, or EOF for close-delimited).
    pub complete: bool,
}

impl Resp {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.text()))
    }
}

/// Connect to the balancer with a read timeout so a test can never hang.
pub fn connect(addr: SocketAddr) -> TcpStream {
    let s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    s.set_nodelay(true).unwrap();
    s
}

/// Read one response from a stream (plain, or TLS in `tls.rs`).
pub fn read_response(reader: &mut impl BufRead) -> std::io::Result<Resp> {
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let status: u16 = line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("bad status line {line:?}")))?;
    let mut headers = Vec::new();
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h)? == 0 {
            return Err(std::io::Error::other("eof in head"));
        }
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        if let Some((n, v)) = h.split_once(':') {
            headers.push((n.trim().to_string(), v.trim().to_string()));
        }
    }
    let mut resp = Resp {
        status,
        headers,
        body: Vec::new(),
        chunks: Vec::new(),
        complete: false,
    };
    if status == 100 {
        return Ok(resp);
    }
    if resp
        .header("transfer-encoding")
        .is_some_and(|v| v.eq_ignore_ascii_case("chunked"))
    {
        loop {
            let mut size = String::new();
            if reader.read_line(&mut size)? == 0 {
                return Ok(resp); // cut off: complete stays false
            }
            let Ok(n) = usize::from_str_radix(size.trim(), 16) else {
                return Ok(resp);
            };
            if n == 0 {
                let mut end = String::new();
                reader.read_line(&mut end)?;
                resp.complete = true;
                return Ok(resp);
            }
            let mut data = vec![0; n + 2];
            if reader.read_exact(&mut data).is_err() {
                return Ok(resp);
            }
            data.truncate(n);
            resp.body.extend_from_slice(&data);
            resp.chunks.push((Instant::now(), data));
        }
    } else if let Some(len) = resp
        .header("content-length")
        .and_then(|v| v.parse::<usize>().ok())
    {
        let mut data = vec![0; len];
        reader.read_exact(&mut data)?;
        resp.body = data;
        resp.complete = true;
    } else {
        reader.read_to_end(&mut resp.body)?;
        resp.complete = true;
    }
    Ok(resp)
}

/// Send one request on a new connection and read the response.
pub fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Resp {
    let mut s = connect(addr);
    write_request(&mut s, method, path, headers, body).unwrap();
    let mut reader = BufReader::new(s);
    read_response(&mut reader).unwrap()
}

/// Write one request with `Connection: close` in one write.
pub fn write_request(
    out: &mut impl Write,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> std::io::Result<()> {
    let mut head = format!("{method} {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n");
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    if !body.is_empty() || method == "POST" {
        head.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    head.push_str("\r\n");
    let mut all = head.into_bytes();
    all.extend_from_slice(body);
    out.write_all(&all)
}

/// POST a JSON body.
pub fn post(addr: SocketAddr, path: &str, body: &str) -> Resp {
    request(
        addr,
        "POST",
        path,
        &[("Content-Type", "application/json")],
        body.as_bytes(),
    )
}

/// A chat request body.
pub fn chat(stream: bool) -> String {
    format!(r#"{{"model":"m","stream":{stream},"messages":[{{"role":"user","content":"hi"}}]}}"#)
}

/// Send raw bytes and read whatever comes back until close or timeout.
pub fn raw(addr: SocketAddr, bytes: &[u8]) -> String {
    let mut s = connect(addr);
    s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    let _ = s.write_all(bytes);
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    String::from_utf8_lossy(&out).into_owned()
}

/// Poll `cond` until it holds or `limit` passes; bounded in time and count.
/// Start a stream on the only worker of `bal` (its upstream `up` stays
/// silent) and return the connection that holds it.
pub fn hold_the_only_worker(bal: &Running, up: &crate::fake::Upstream) -> TcpStream {
    let mut busy = connect(bal.addr);
    let body = chat(true);
    write!(
        busy,
        "POST /v1/chat/completions HTTP/1.1\r\nHost: t\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    assert!(wait_for(Duration::from_secs(3), || up.hits() == 1));
    busy
}

/// A hand-written upstream for what the fake cannot do: for 10 s, each
/// connection `listener` accepts goes to `each` on one thread (blocking, 5 s
/// read timeout, no Nagle: an answer leaves at once, before a close that a
/// reset could make discard it). Returns how many were accepted.
pub fn serve_by_hand(
    listener: std::net::TcpListener,
    mut each: impl FnMut(TcpStream) + Send + 'static,
) -> std::sync::Arc<std::sync::atomic::AtomicUsize> {
    use std::sync::atomic::{AtomicUsize, Ordering};
    listener.set_nonblocking(true).unwrap();
    let accepted = std::sync::Arc::new(AtomicUsize::new(0));
    let count = accepted.clone();
    std::thread::spawn(move || {
        let end = Instant::now() + Duration::from_secs(10);
        while Instant::now() < end {
            let Ok((s, _)) = listener.accept() else {
                std::thread::sleep(Duration::from_millis(5));
                continue;
            };
            count.fetch_add(1, Ordering::SeqCst);
            s.set_nonblocking(false).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            s.set_nodelay(true).unwrap();
            each(s);
        }
    });
    accepted
}

/// Read a request head byte by byte (nothing of the body), up to its blank line.
pub fn read_head_only(mut r: impl Read) -> Vec<u8> {
    let mut got = Vec::new();
    let mut buf = [0u8; 1];
    while !got.ends_with(b"\r\n\r\n") {
        match r.read(&mut buf) {
            Ok(1) => got.push(buf[0]),
            _ => break,
        }
    }
    got
}

/// The status code of a raw response text (0 when there is none).
pub fn status_of(resp: &str) -> u16 {
    resp.split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

/// Wait until `cond` holds, up to `limit`; whether it did.
pub fn wait_for(limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + limit;
    for _ in 0..100_000 {
        if cond() {
            return true;
        }
        if Instant::now() >= end {
            return false;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    false
}
