//! Keeps the benchmark runnable: the `bench` example's load generator and
//! table, run in-process against the `fake_upstream` example and a real
//! balancer for a few hundred requests and a few streams. No timing is
//! asserted (CI machines vary); only that it measures and prints its table.

use std::net::TcpListener;
use std::thread;
use std::time::Duration;

use crate::util::start;

// The benchmark's own modules, compiled here as they are in the example;
// parts only the example binary uses would otherwise warn as dead code.
#[allow(dead_code)]
#[path = "../../examples/fake_upstream.rs"]
mod fake_upstream;
#[allow(dead_code)]
#[path = "../../examples/bench/floor.rs"]
mod floor;
#[allow(dead_code)]
#[path = "../../examples/bench/load.rs"]
mod load;
#[allow(dead_code)]
#[path = "../../examples/bench/suite.rs"]
mod suite;

#[test]
fn bench_measures_and_prints_its_table() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let up = listener.local_addr().unwrap();
    let opts = fake_upstream::Opts {
        chunks: 3,
        delay: Duration::from_millis(5),
        stamp: true,
    };
    // Serves until the test process exits; it holds no state worth stopping.
    thread::spawn(move || fake_upstream::serve_listener(listener, opts, None));
    let bal = start(&[format!("http://{up}")], &[], |_| {});
    // The yardstick proxies relay Content-Length and chunked answers alike.
    let floor = |how| {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        thread::spawn(move || floor::serve_listener(listener, up, how));
        addr
    };
    let floor_addr = floor(floor::Upstream::Raw);
    let ureq_floor_addr = floor(floor::Upstream::Ureq);
    let agent_floor_addr = floor(floor::Upstream::Agent);
    let me = Some(std::process::id());
    let targets = [
        suite::Target {
            name: "direct".into(),
            addr: up,
            pid: me,
        },
        suite::Target {
            name: "gaia-balancer".into(),
            addr: bal.addr,
            pid: me,
        },
        suite::Target {
            name: "blocking floor".into(),
            addr: floor_addr,
            pid: me,
        },
        suite::Target {
            name: "floor + ureq".into(),
            addr: ureq_floor_addr,
            pid: me,
        },
        suite::Target {
            name: "floor + our agent".into(),
            addr: agent_floor_addr,
            pid: me,
        },
    ];
    let work = std::env::temp_dir().join(format!("gaia-bench-test-{}", std::process::id()));
    let plan = suite::Plan {
        reps: 2,
        secs: 10.0,
        max_requests: 100,
        conns: vec![1, 4],
        streams: vec![4],
        stream_length: Duration::from_millis(20),
        wrk: None,
        work_dir: work,
        warmup: Duration::from_millis(50),
    };
    let mut lines = 0;
    let results = suite::measure(&targets, &plan, &mut |_| lines += 1);
    let table = suite::render(&results);
    println!("{table}");
    assert_eq!(lines, 2 * (5 * 2 + 5), "one progress line per run");
    for t in &results.targets {
        assert_eq!(
            t.errors(),
            0,
            "{}: failed requests or streams\n{table}",
            t.name
        );
        for runs in &t.load {
            for run in runs {
                assert_eq!(run.ok, 100, "{}: every request answered", t.name);
            }
        }
        for runs in &t.streams {
            for run in runs {
                assert_eq!(run.completed, 4);
                assert_eq!(run.events, 4 * 3, "every content event seen");
            }
        }
    }
    for row in [
        "| metric (median of reps) | direct | gaia-balancer | blocking floor | floor + ureq | floor + our agent | gaia-balancer / blocking floor | gaia-balancer / floor + ureq | gaia-balancer / floor + our agent | gaia-balancer / direct |",
        "| req/s, 1 conn |",
        "| req/s, 4 conns |",
        "| latency p50 / p99 ms, 4 conns |",
        "| first event p50 / p99 ms, 4 streams |",
        "| chunk lag p50 / p99 ms, 4 streams |",
        "| idle / peak RSS MiB |",
        "| CPU s per 10,000 requests |",
        "| of which user space |",
        "| context switches per request |",
        "| failed requests + streams | 0 | 0 | 0 | 0 | 0 |",
    ] {
        assert!(table.contains(row), "missing {row:?} in\n{table}");
    }
}
