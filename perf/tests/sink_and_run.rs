//! Black-box: the null sink and `run --target mqtt` as processes, about a second each, checking
//! that messages are acknowledged and that the JSON result has the shape scripts read.

#![allow(clippy::unwrap_used)]

use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_ingot-load");

/// Kills the sink even when an assertion fails.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn start_sink() -> (Killed, u16) {
    let port = free_port();
    let child = Command::new(BIN)
        .args([
            "sink",
            "--port",
            &port.to_string(),
            "--duration",
            "20",
            "--quiet",
        ])
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    let sink = Killed(child);
    let deadline = Instant::now() + Duration::from_secs(5);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            Instant::now() < deadline,
            "the sink did not start listening"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    (sink, port)
}

fn run(port: u16, extra: &[&str]) -> serde_json::Value {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("result.json");
    let output = Command::new(BIN)
        .args(["run", "--target", "mqtt", "--port", &port.to_string()])
        .args([
            "--devices",
            "4",
            "--warmup",
            "0.3",
            "--duration",
            "1",
            "--quiet",
        ])
        .args(["--label", "it", "--json", json.to_str().unwrap()])
        .args(extra)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(stdout.starts_with("it: "), "one summary line: {stdout}");
    serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap()
}

#[test]
fn qos1_with_a_window_against_the_sink() {
    let (_sink, port) = start_sink();
    let result = run(port, &["--qos", "1", "--window", "8", "--threads", "2"]);
    for key in [
        "label",
        "config",
        "machine",
        "throughput",
        "latency_us",
        "connect",
        "errors",
    ] {
        assert!(result.get(key).is_some(), "missing {key}: {result}");
    }
    assert_eq!(result["label"], "it");
    assert_eq!(result["config"]["qos"], 1);
    assert_eq!(result["config"]["window"], 8);
    assert!(result["machine"]["cpus"].as_u64().unwrap() >= 1);
    let throughput = &result["throughput"];
    let acked = throughput["messages_acked"].as_u64().unwrap();
    assert!(acked > 0, "{result}");
    assert!(throughput["messages_sent"].as_u64().unwrap() >= acked);
    assert!(throughput["msgs_per_sec"].as_f64().unwrap() > 0.0);
    assert!(throughput["mb_per_sec"].as_f64().unwrap() > 0.0);
    let latency = &result["latency_us"];
    for key in ["p50", "p90", "p99", "p999", "max"] {
        assert!(latency[key].is_u64(), "latency {key}: {result}");
    }
    assert!(latency["p50"].as_u64() <= latency["p99"].as_u64());
    assert_eq!(result["connect"]["ok"], 4);
    assert_eq!(result["connect"]["failed"], 0);
    assert_eq!(result["errors"]["total"], 0, "{result}");
}

#[test]
fn qos0_and_open_loop_against_the_sink() {
    let (_sink, port) = start_sink();
    let result = run(port, &["--qos", "0", "--window", "16"]);
    assert!(result["throughput"]["messages_sent"].as_u64().unwrap() > 0);
    assert_eq!(result["throughput"]["messages_acked"], 0);
    assert_eq!(result["errors"]["total"], 0, "{result}");

    // Open loop at 2000 msg/s over 4 connections: about 2000 acked in the measured second.
    let result = run(port, &["--qos", "1", "--rate", "2000"]);
    let acked = result["throughput"]["messages_acked"].as_u64().unwrap();
    assert!((1000..=3000).contains(&acked), "{result}");
    assert!(result["latency_us"]["p50"].is_u64());
}

#[test]
fn a_refused_connect_is_counted_not_a_panic() {
    // Nothing listens on this port: every connect fails, the run says so and exits non-zero.
    let port = free_port();
    let output = Command::new(BIN)
        .args(["run", "--target", "mqtt", "--port", &port.to_string()])
        .args([
            "--devices",
            "2",
            "--duration",
            "0.2",
            "--warmup",
            "0",
            "--quiet",
        ])
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("connect_io=2"), "{stderr}");
}

#[test]
fn connections_over_two_source_addresses_report_memory() {
    let (sink, port) = start_sink();
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("connections.json");
    let output = Command::new(BIN)
        .args([
            "connections",
            "--target",
            "mqtt",
            "--port",
            &port.to_string(),
        ])
        .args([
            "--devices",
            "20",
            "--source-ips",
            "127.0.0.1,127.0.0.2",
            "--hold",
            "0.2",
        ])
        .args(["--hub-pid", &sink.0.id().to_string(), "--quiet"])
        .args(["--json", json.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let result: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    assert_eq!(result["connect"]["ok"], 20, "{result}");
    assert!(result["connect"]["per_sec"].as_f64().unwrap() > 0.0);
    assert!(result["memory"]["hub_rss_after_kib"].as_u64().unwrap() > 0);
    assert!(result["memory"]["hub_rss_per_connection_bytes"].is_number());
}
