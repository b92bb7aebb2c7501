//! What a run reports: the live progress line (stderr), the one-line summary (stdout) and the
//! JSON result (`--json`), whose shape other scripts read:
//! `{"label", "config", "machine", "throughput", "latency_us", "connect", "errors"}`, plus
//! `"e2e"` with `--e2e` and `"timeline"` (one sample per second).

use std::path::Path;

use anyhow::Context as _;
use hdrhistogram::Histogram;
use serde_json::{json, Value};

use crate::cli::RunArgs;
use crate::generator::{Errors, ThreadResult};
use crate::latency::histogram;

/// The merged results of all threads.
#[derive(Debug)]
pub struct Outcome {
    pub latency_us: Histogram<u64>,
    pub connect_us: Histogram<u64>,
    pub sent: u64,
    pub acked: u64,
    pub errors: Errors,
    pub connected: u64,
    pub connect_failed: u64,
    /// From the start of the run to the last CONNACK.
    pub connect_secs: f64,
    pub measured_secs: f64,
    /// `run --e2e`: what the reader of the segment files saw.
    pub e2e: Option<crate::e2e::TailResult>,
}

impl Outcome {
    pub fn merge(results: &[ThreadResult], measured_secs: f64) -> Self {
        let mut outcome = Self {
            latency_us: histogram(),
            connect_us: histogram(),
            sent: 0,
            acked: 0,
            errors: Errors::default(),
            connected: 0,
            connect_failed: 0,
            connect_secs: 0.0,
            measured_secs,
            e2e: None,
        };
        for r in results {
            // Histograms of the same bounds always add.
            let _ = outcome.latency_us.add(&r.latency_us);
            let _ = outcome.connect_us.add(&r.connect_us);
            outcome.sent += r.sent_measured;
            outcome.acked += r.acked_measured;
            outcome.errors.add(&r.errors);
            outcome.connected += r.connected;
            outcome.connect_failed += r.connect_failed;
            outcome.connect_secs = outcome.connect_secs.max(r.last_connack_ns as f64 / 1e9);
        }
        outcome
    }

    /// Messages per second: acknowledged ones at QoS 1, written ones at QoS 0.
    pub fn msgs_per_sec(&self, qos1: bool) -> f64 {
        let count = if qos1 { self.acked } else { self.sent };
        count as f64 / self.measured_secs.max(1e-9)
    }

    pub fn connects_per_sec(&self) -> f64 {
        self.connected as f64 / self.connect_secs.max(1e-9)
    }
}

/// One second of a run: a progress line, a point of the timeline and of the plot.
#[derive(Debug, Clone)]
pub struct Sample {
    pub phase: &'static str,
    /// Since the start of the run.
    pub at_secs: f64,
    pub sent_per_sec: f64,
    pub acked_per_sec: f64,
    pub acked_total: u64,
    /// PUBACK latency of the acks of this second.
    pub p50_us: Option<u64>,
    pub p99_us: Option<u64>,
    pub max_us: Option<u64>,
    /// Publish -> readable of the records read in this second (`--e2e`).
    pub e2e_p50_us: Option<u64>,
    pub e2e_p99_us: Option<u64>,
    /// Whether the run measures end to end at all.
    pub e2e: bool,
    pub connected: u64,
    pub devices: u64,
    pub errors: u64,
}

pub fn progress_line(p: &Sample) -> String {
    let us = |v: Option<u64>| v.map_or_else(|| "-".to_owned(), |us| format!("{us} us"));
    let e2e = if p.e2e {
        format!("  e2e p99 {:>10}", us(p.e2e_p99_us))
    } else {
        String::new()
    };
    format!(
        "[{:6.1}s] {:<7} sent {:>11}/s  acked {:>11}/s  acks {:>12}  p99 {:>10}{e2e}  conns {}/{}  \
         errors {}",
        p.at_secs,
        p.phase,
        si(p.sent_per_sec),
        si(p.acked_per_sec),
        p.acked_total,
        us(p.p99_us),
        p.connected,
        p.devices,
        p.errors
    )
}

pub fn sample_json(p: &Sample) -> Value {
    json!({
        "t": (p.at_secs * 1000.0).round() / 1000.0,
        "phase": p.phase,
        "sent_per_sec": p.sent_per_sec.round(),
        "acked_per_sec": p.acked_per_sec.round(),
        "p50_us": p.p50_us,
        "p99_us": p.p99_us,
        "max_us": p.max_us,
        "e2e_p50_us": p.e2e_p50_us,
        "e2e_p99_us": p.e2e_p99_us,
        "connected": p.connected,
        "errors": p.errors,
    })
}

/// `1234567.0` as `1.23 M`.
fn si(value: f64) -> String {
    if value >= 1e6 {
        format!("{:.2} M", value / 1e6)
    } else if value >= 1e3 {
        format!("{:.1} k", value / 1e3)
    } else {
        format!("{value:.0}")
    }
}

pub fn errors_text(errors: &Errors) -> String {
    let named = errors.named();
    if named.is_empty() {
        return "none".to_owned();
    }
    named
        .iter()
        .map(|(name, n)| format!("{name}={n}"))
        .collect::<Vec<_>>()
        .join(" ")
}

pub fn default_label(args: &RunArgs) -> String {
    format!(
        "{:?}-{}-qos{}-{}B-w{}",
        args.common.target,
        if args.common.tls { "tls" } else { "plain" },
        args.qos,
        args.payload,
        args.window
    )
    .to_lowercase()
}

pub fn summary_line(label: &str, args: &RunArgs, o: &Outcome) -> String {
    let qos1 = args.qos == 1;
    let rate = o.msgs_per_sec(qos1);
    let latency = if qos1 && !o.latency_us.is_empty() {
        format!(
            "latency p50 {} p99 {} p99.9 {} max {} us",
            o.latency_us.value_at_quantile(0.5),
            o.latency_us.value_at_quantile(0.99),
            o.latency_us.value_at_quantile(0.999),
            o.latency_us.max()
        )
    } else {
        "latency n/a".to_owned()
    };
    let e2e = match &o.e2e {
        Some(e) if !e.latency_us.is_empty() => format!(
            "; e2e p50 {} p99 {} p99.9 {} max {} us ({} read, {} unread)",
            e.latency_us.value_at_quantile(0.5),
            e.latency_us.value_at_quantile(0.99),
            e.latency_us.value_at_quantile(0.999),
            e.latency_us.max(),
            e.read_measured,
            e.unread
        ),
        Some(e) => format!("; e2e none read ({} unread)", e.unread),
        None => String::new(),
    };
    format!(
        "{label}: {:.0} msg/s {} ({:.1} MB/s payload) over {:.1} s; {latency}{e2e}; connect {} \
         ok {} failed ({:.0}/s); errors {}",
        rate,
        if qos1 { "acked" } else { "sent" },
        rate * args.payload as f64 / 1e6,
        o.measured_secs,
        o.connected,
        o.connect_failed,
        o.connects_per_sec(),
        errors_text(&o.errors)
    )
}

pub fn latency_json(h: &Histogram<u64>) -> Value {
    if h.is_empty() {
        return json!({"p50": null, "p90": null, "p99": null, "p999": null, "max": null,
            "count": 0});
    }
    json!({
        "p50": h.value_at_quantile(0.5),
        "p90": h.value_at_quantile(0.9),
        "p99": h.value_at_quantile(0.99),
        "p999": h.value_at_quantile(0.999),
        "max": h.max(),
        "count": h.len(),
    })
}

pub fn errors_json(errors: &Errors) -> Value {
    let mut map = serde_json::Map::new();
    for (name, n) in errors.named() {
        map.insert(name.to_owned(), json!(n));
    }
    map.insert("total".to_owned(), json!(errors.total()));
    Value::Object(map)
}

pub fn connect_json(o: &Outcome) -> Value {
    json!({
        "ok": o.connected,
        "failed": o.connect_failed,
        "per_sec": o.connects_per_sec(),
        "secs": o.connect_secs,
        "latency_us": latency_json(&o.connect_us),
    })
}

/// The run's settings in one line, for the plot's heading.
pub fn config_text(args: &RunArgs, devices: usize) -> String {
    let c = &args.common;
    format!(
        "{} {}:{}{}, {devices} devices, QoS {}, {} B, window {}, {}, {} s warm-up + {} s{}",
        format!("{:?}", c.target).to_lowercase(),
        c.host,
        c.port(),
        if c.tls { " (TLS)" } else { "" },
        args.qos,
        args.payload,
        args.window,
        args.rate
            .map_or_else(|| "closed loop".to_owned(), |r| format!("{r} msg/s")),
        args.warmup,
        args.duration,
        if args.e2e { ", e2e" } else { "" }
    )
}

pub fn e2e_json(e: &crate::e2e::TailResult) -> Value {
    json!({
        "latency_us": latency_json(&e.latency_us),
        "read": e.read,
        "read_measured": e.read_measured,
        "unread": e.unread,
        "foreign": e.foreign,
        "out_of_order": e.out_of_order,
        "gaps": e.gaps,
        "read_errors": e.read_errors,
        "drain_secs": e.drain_secs,
    })
}

pub fn run_json(
    label: &str,
    args: &RunArgs,
    cpus: Option<&[usize]>,
    devices: usize,
    o: &Outcome,
    samples: &[Sample],
) -> Value {
    let c = &args.common;
    let qos1 = args.qos == 1;
    let rate = o.msgs_per_sec(qos1);
    json!({
        "label": label,
        "config": {
            "command": "run",
            "target": format!("{:?}", c.target).to_lowercase(),
            "host": c.host,
            "port": c.port(),
            "tls": c.tls,
            "devices": devices,
            "devices_requested": c.devices.to_string(),
            "fleet": c.fleet,
            "source_ips": c.source_ips(),
            "connect_rate": c.connect_rate,
            "qos": args.qos,
            "payload_bytes": args.payload,
            "window": args.window,
            "rate": args.rate,
            "duration_secs": args.duration,
            "warmup_secs": args.warmup,
            "threads": c.threads,
            "cpus": cpus,
            "send_buffer": args.send_buffer,
            "e2e": args.e2e,
            "e2e_poll_us": args.e2e.then_some(args.e2e_poll_us),
        },
        "machine": machine(),
        "throughput": {
            "messages_acked": o.acked,
            "messages_sent": o.sent,
            "msgs_per_sec": rate,
            "mb_per_sec": rate * args.payload as f64 / 1e6,
            "measured_secs": o.measured_secs,
        },
        "latency_us": latency_json(&o.latency_us),
        "connect": connect_json(o),
        "errors": errors_json(&o.errors),
        "e2e": o.e2e.as_ref().map(e2e_json),
        "timeline": samples.iter().map(sample_json).collect::<Vec<_>>(),
    })
}

/// CPUs, kernel and CPU model of this machine, for comparing results across machines.
pub fn machine() -> Value {
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_owned())
        .unwrap_or_default();
    let cpu_model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| {
            info.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, model)| model.trim().to_owned())
        })
        .unwrap_or_default();
    json!({"cpus": cpus, "kernel": kernel, "cpu_model": cpu_model})
}

pub fn write_json(path: &Path, value: &Value) -> anyhow::Result<()> {
    let mut text = serde_json::to_string_pretty(value)?;
    text.push('\n');
    std::fs::write(path, text).with_context(|| format!("write {}", path.display()))
}
