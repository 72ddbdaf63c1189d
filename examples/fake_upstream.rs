//! A stand-in for a Gaia node, for trying gaia-balancer with no internet and
//! for benchmarks: an OpenAI-compatible server on loopback that answers
//! `/v1/chat/completions` (JSON, or SSE when `"stream": true`),
//! `/v1/completions`, `/v1/embeddings` and `/v1/models`.
//!
//! Usage: `cargo run --release --example fake_upstream -- [PORT ...] [--chunks N] [--delay-ms MS] [--stamp] [--tls CERT KEY]`
//! (default port 8080; one listener per port, each named after its port).
//! `--stamp` adds `"x_sent_ns"` (Unix time in ns when the event was written)
//! to every streamed event, so the benchmark can measure per-chunk lag
//! across processes. Each response and each chunk leaves in one `write`, so
//! the fake itself adds no extra packets or syscalls to what is measured.
//! `--tls CERT KEY` serves HTTPS on every port instead (rustls; PEM files,
//! e.g. `tests/tls/server.pem tests/tls/server.key`, whose CA is
//! `tests/tls/ca.pem`); each response and each chunk is then one TLS record
//! in one `write`.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::sync::Arc;
use std::thread;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::{ServerConfig, ServerConnection, StreamOwned};

const USAGE: &str =
    "usage: fake_upstream [PORT ...] [--chunks N] [--delay-ms MS] [--stamp] [--tls CERT KEY]";

/// How streamed answers are shaped.
#[derive(Clone, Copy)]
pub struct Opts {
    /// Content events per stream.
    pub chunks: usize,
    /// Pause before each content event.
    pub delay: Duration,
    /// Add `"x_sent_ns"` to every streamed event.
    pub stamp: bool,
}

fn main() {
    let mut ports = Vec::new();
    let mut opts = Opts {
        chunks: 8,
        delay: Duration::from_millis(50),
        stamp: false,
    };
    let mut tls = None;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--chunks" => opts.chunks = args.next().and_then(|v| v.parse().ok()).unwrap_or(8),
            "--delay-ms" => {
                opts.delay =
                    Duration::from_millis(args.next().and_then(|v| v.parse().ok()).unwrap_or(50))
            }
            "--stamp" => opts.stamp = true,
            "--tls" => {
                let (Some(cert), Some(key)) = (args.next(), args.next()) else {
                    eprintln!("{USAGE}");
                    std::process::exit(2);
                };
                match tls_config(&cert, &key) {
                    Ok(config) => tls = Some(config),
                    Err(e) => {
                        eprintln!("--tls {cert} {key}: {e}");
                        std::process::exit(2);
                    }
                }
            }
            p => match p.parse::<u16>() {
                Ok(port) => ports.push(port),
                Err(_) => {
                    eprintln!("{USAGE}");
                    std::process::exit(2);
                }
            },
        }
    }
    let scheme = if tls.is_some() { "https" } else { "http" };
    if ports.is_empty() {
        ports.push(8080);
    }
    let mut handles = Vec::new();
    for port in ports {
        let listener = match TcpListener::bind(("127.0.0.1", port)) {
            Ok(l) => l,
            Err(e) => {
                eprintln!("cannot listen on 127.0.0.1:{port}: {e}");
                std::process::exit(1);
            }
        };
        let port = listener.local_addr().map(|a| a.port()).unwrap_or(port);
        eprintln!("fake upstream listening on {scheme}://127.0.0.1:{port}");
        let tls = tls.clone();
        handles.push(thread::spawn(move || serve_listener(listener, opts, tls)));
    }
    for h in handles {
        let _ = h.join();
    }
}

/// A server configuration for a certificate chain and its key (PEM files).
pub fn tls_config(cert: &str, key: &str) -> Result<Arc<ServerConfig>, String> {
    let chain = CertificateDer::pem_file_iter(cert)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|e| e.to_string())?;
    let key = PrivateKeyDer::from_pem_file(key).map_err(|e| e.to_string())?;
    let config =
        ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .map_err(|e| e.to_string())?;
    Ok(Arc::new(config))
}

/// Serve every connection of `listener`, one thread each, forever; over TLS
/// with `tls`.
pub fn serve_listener(listener: TcpListener, opts: Opts, tls: Option<Arc<ServerConfig>>) {
    let port = listener.local_addr().map(|a| a.port()).unwrap_or(0);
    for stream in listener.incoming().flatten() {
        let tls = tls.clone();
        thread::spawn(move || -> std::io::Result<()> {
            stream.set_nodelay(true)?;
            let Some(config) = tls else {
                return serve(stream, port, opts);
            };
            // The handshake runs on the first read, in this thread.
            let conn = ServerConnection::new(config).map_err(std::io::Error::other)?;
            let mut tls = StreamOwned::new(conn, stream);
            serve(&mut tls, port, opts)?;
            // The client asked to close: end in order, as a server does.
            tls.conn.send_close_notify();
            tls.flush()
        });
    }
}

struct Req {
    path: String,
    body: Vec<u8>,
    close: bool,
}

fn read_req(r: &mut impl BufRead) -> std::io::Result<Option<Req>> {
    let mut line = String::new();
    if r.read_line(&mut line)? == 0 {
        return Ok(None);
    }
    let path = line.split_whitespace().nth(1).unwrap_or("/").to_string();
    let (mut len, mut close) = (0usize, false);
    loop {
        let mut h = String::new();
        if r.read_line(&mut h)? == 0 {
            return Ok(None);
        }
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        if let Some((n, v)) = h.split_once(':') {
            let n = n.trim().to_ascii_lowercase();
            if n == "content-length" {
                len = v.trim().parse().unwrap_or(0);
            } else if n == "connection" && v.trim().eq_ignore_ascii_case("close") {
                close = true;
            }
        }
    }
    let mut body = vec![0; len];
    r.read_exact(&mut body)?;
    Ok(Some(Req { path, body, close }))
}

/// Serve one connection until the client closes it or asks to. One object
/// reads and writes (a TLS connection cannot be split as a socket can);
/// writes go past the read buffer, straight to the stream.
fn serve(stream: impl Read + Write, port: u16, opts: Opts) -> std::io::Result<()> {
    let mut reader = BufReader::new(stream);
    while let Some(req) = read_req(&mut reader)? {
        let out = reader.get_mut();
        let streaming = req.body.windows(13).any(|w| w == b"\"stream\":true")
            || req.body.windows(14).any(|w| w == b"\"stream\": true");
        let path = req.path.split('?').next().unwrap_or("");
        if path.ends_with("/chat/completions") && streaming {
            stream_chat(out, port, opts)?;
        } else {
            let body = match path {
                p if p.ends_with("/chat/completions") => format!(
                    r#"{{"id":"chatcmpl-{port}","object":"chat.completion","model":"fake","choices":[{{"index":0,"message":{{"role":"assistant","content":"Hello from fake node {port}."}},"finish_reason":"stop"}}],"usage":{{"prompt_tokens":5,"completion_tokens":5,"total_tokens":10}}}}"#
                ),
                p if p.ends_with("/completions") => format!(
                    r#"{{"id":"cmpl-{port}","object":"text_completion","model":"fake","choices":[{{"index":0,"text":"Hello from fake node {port}.","finish_reason":"stop"}}]}}"#
                ),
                p if p.ends_with("/embeddings") => {
                    r#"{"object":"list","data":[{"object":"embedding","index":0,"embedding":[0.1,0.2,0.3]}],"model":"fake"}"#.to_string()
                }
                p if p.ends_with("/models") => {
                    r#"{"object":"list","data":[{"id":"fake","object":"model","owned_by":"fake"}]}"#.to_string()
                }
                _ => {
                    let body = r#"{"error":{"message":"not found","type":"invalid_request_error"}}"#;
                    let whole = format!("HTTP/1.1 404 Not Found\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}", body.len());
                    out.write_all(whole.as_bytes())?;
                    continue;
                }
            };
            let whole = format!("HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}", body.len());
            out.write_all(whole.as_bytes())?;
        }
        if req.close {
            return Ok(());
        }
    }
    Ok(())
}

fn chunk(out: &mut impl Write, data: &str) -> std::io::Result<()> {
    out.write_all(format!("{:x}\r\n{data}\r\n", data.len()).as_bytes())
}

/// `,"x_sent_ns":N` with the current time when stamping, else nothing.
fn stamp(opts: Opts) -> String {
    if !opts.stamp {
        return String::new();
    }
    let ns = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    format!(",\"x_sent_ns\":{ns}")
}

fn stream_chat(out: &mut impl Write, port: u16, opts: Opts) -> std::io::Result<()> {
    out.write_all(
        b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n",
    )?;
    chunk(out, &format!("data: {{\"id\":\"chatcmpl-{port}\",\"object\":\"chat.completion.chunk\",\"choices\":[{{\"index\":0,\"delta\":{{\"role\":\"assistant\"}},\"finish_reason\":null}}]{}}}\n\n", stamp(opts)))?;
    for i in 0..opts.chunks {
        if !opts.delay.is_zero() {
            thread::sleep(opts.delay);
        }
        chunk(out, &format!("data: {{\"id\":\"chatcmpl-{port}\",\"object\":\"chat.completion.chunk\",\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"word{i} \"}},\"finish_reason\":null}}]{}}}\n\n", stamp(opts)))?;
    }
    chunk(out, &format!("data: {{\"id\":\"chatcmpl-{port}\",\"object\":\"chat.completion.chunk\",\"choices\":[{{\"index\":0,\"delta\":{{}},\"finish_reason\":\"stop\"}}]{}}}\n\ndata: [DONE]\n\n", stamp(opts)))?;
    out.write_all(b"0\r\n\r\n")
}
