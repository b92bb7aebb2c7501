//! Black-box: `run --plot` and the per-second timeline of the JSON, against the null sink.

#![allow(clippy::unwrap_used)]

mod common;

use common::{load, ok, read_json, sink_with_limit};

#[test]
fn the_plot_and_the_timeline_show_every_second() {
    let (_sink, port) = sink_with_limit(1024);
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("run.json");
    let plot = dir.path().join("run.html");
    let out = load(&[
        "run",
        "--target",
        "mqtt",
        "--port",
        &port.to_string(),
        "--devices",
        "4",
        "--rate",
        "4000",
        "--warmup",
        "1",
        "--duration",
        "2.5",
        "--quiet",
        "--label",
        "plot-test",
        "--json",
        json.to_str().unwrap(),
        "--plot",
        plot.to_str().unwrap(),
    ]);
    ok(&out);
    let result = read_json(&json);
    let timeline = result["timeline"].as_array().unwrap();
    let measured: Vec<&serde_json::Value> = timeline
        .iter()
        .filter(|s| s["phase"] == "measure")
        .collect();
    assert!(measured.len() >= 2, "{result}");
    for s in &measured {
        let acked = s["acked_per_sec"].as_f64().unwrap();
        assert!((2000.0..=6000.0).contains(&acked), "{s}");
        assert!(s["p99_us"].is_u64(), "{s}");
    }
    assert!(result["e2e"].is_null());
    let page = std::fs::read_to_string(&plot).unwrap();
    assert!(page.starts_with("<!DOCTYPE html>"));
    assert!(page.contains("<title>ingot-load: plot-test</title>"));
    assert_eq!(page.matches("<svg").count(), 2, "throughput and latency");
    assert!(
        page.matches("<polyline").count() >= 4,
        "lines of both charts"
    );
    assert!(
        !page.contains("http"),
        "self-contained: no external reference"
    );
    assert!(!page.contains("<script"));
    assert_eq!(page.matches("<tr>").count(), timeline.len() + 1);
}
