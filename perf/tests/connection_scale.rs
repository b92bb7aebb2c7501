//! Black-box: connections from several source addresses, and `connections --devices max`
//! bounded by descriptor limits.

#![allow(clippy::unwrap_used)]

mod common;

use std::io::{Read as _, Write as _};
use std::net::TcpListener;
use std::process::Command;

use common::{load, ok, read_json, sink_with_limit, BIN};

#[test]
fn each_connection_is_bound_to_its_source_address() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let acceptor = std::thread::spawn(move || {
        let mut peers = Vec::new();
        for _ in 0..6 {
            let (mut stream, peer) = listener.accept().unwrap();
            let mut connect = [0u8; 2];
            stream.read_exact(&mut connect).unwrap();
            // CONNACK, accepted; the rest of the CONNECT is not needed.
            stream.write_all(&[0x20, 0x02, 0x00, 0x00]).unwrap();
            peers.push((peer.ip().to_string(), stream));
        }
        peers
    });
    let out = load(&[
        "connections",
        "--target",
        "mqtt",
        "--port",
        &port.to_string(),
        "--devices",
        "6",
        "--source-ips",
        "127.0.0.2-127.0.0.4",
        "--hold",
        "0.1",
        "--quiet",
    ]);
    let stdout = ok(&out);
    assert!(stdout.contains("6 connected"), "{stdout}");
    let mut ips: Vec<String> = acceptor
        .join()
        .unwrap()
        .into_iter()
        .map(|(ip, _)| ip)
        .collect();
    ips.sort();
    assert_eq!(
        ips,
        [
            "127.0.0.2",
            "127.0.0.2",
            "127.0.0.3",
            "127.0.0.3",
            "127.0.0.4",
            "127.0.0.4"
        ]
    );
}

/// `connections --devices max` under `ulimit -n`, with the json it writes.
fn connections_max(port: u16, nofile: u32, hub_pid: Option<u32>) -> serde_json::Value {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("max.json");
    let hub = hub_pid.map_or_else(String::new, |pid| format!("--hub-pid {pid}"));
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "ulimit -n {nofile} && exec \"$0\" connections --target mqtt --port {port} \
             --devices max --connect-rate 5000 --hold 0.1 --quiet --json {} {hub}",
            json.display()
        ))
        .arg(BIN)
        .output()
        .unwrap();
    ok(&out);
    read_json(&json)
}

#[test]
fn devices_max_opens_as_many_as_the_descriptor_limits_allow() {
    let (sink, port) = sink_with_limit(1024);
    // The generator's own limit binds: 200 descriptors, minus those open and a reserve.
    let result = connections_max(port, 200, None);
    let limits = &result["limits"];
    let chosen = limits["chosen"].as_u64().unwrap();
    assert!((100..=136).contains(&chosen), "{result}");
    assert!(limits["limited_by"].as_str().unwrap().contains("generator"));
    assert_eq!(result["connect"]["ok"].as_u64(), Some(chosen), "{result}");
    assert_eq!(result["config"]["devices"].as_u64(), Some(chosen));
    assert!(limits["ports"].as_u64().unwrap() > 1000);
    drop(sink);

    // The hub's limit binds: it can take about 120 descriptors, the generator far more.
    let (sink, port) = sink_with_limit(120);
    let result = connections_max(port, 2000, Some(sink.0.id()));
    let limits = &result["limits"];
    let chosen = limits["chosen"].as_u64().unwrap();
    assert!(
        limits["limited_by"].as_str().unwrap().contains("hub"),
        "{result}"
    );
    assert!((80..=104).contains(&chosen), "{result}");
    assert_eq!(result["connect"]["ok"].as_u64(), Some(chosen), "{result}");
    assert_eq!(result["connect"]["failed"], 0, "{result}");
    assert!(result["memory"]["hub_rss_per_connection_bytes"].is_number());
}
