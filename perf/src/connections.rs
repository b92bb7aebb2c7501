//! `ingot-load connections`: how many idle authenticated connections a hub holds, what each
//! costs it in resident memory, and how fast it accepts them.
//!
//! The hub's memory is read from `/proc/PID/status` (VmRSS) before the first connect and after
//! the last CONNACK plus `--hold` seconds, so the figure includes everything a connection costs
//! in user space (buffers, TLS state, session) but not the kernel's socket memory, which is the
//! same for every broker. Connections are spread over `--source-ips` (127.0.0.1, 127.0.0.2, ...)
//! because one source address has only ~28 k ephemeral ports towards one destination.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use serde_json::json;

use crate::cli::{ConnectionsArgs, DeviceCount};
use crate::generator::{resolve, Plan, Session, PHASE_WARMUP};
use crate::report;

pub fn run(args: &ConnectionsArgs) -> anyhow::Result<()> {
    let common = &args.common;
    let count = match common.devices {
        DeviceCount::Count(n) => Some(n),
        // All of a fleet file.
        DeviceCount::Max => None,
    };
    let (cpus, fleet, tls) = crate::generator::prepare_target(common, count)?;
    let devices = fleet.devices.len();
    let plan = Arc::new(Plan {
        addr: resolve(&common.host, common.port())?,
        tls,
        qos1: true,
        payload_bytes: 0,
        window: 1,
        rate_per_conn: None,
        connect_rate: common.connect_rate.max(1.0),
        connect_timeout: Duration::from_secs_f64(common.connect_timeout.max(0.1)),
        keep_alive_secs: common.keep_alive,
        send_buffer_bytes: None,
        source_ips: args.source_ips.clone(),
        publish: false,
    });
    let rss_before = args.hub_pid.map(rss_kib).transpose()?;
    let mut session = Session::start(plan, fleet.devices, common.threads, cpus.clone())?;
    let budget =
        devices as f64 / common.connect_rate.max(1.0) + common.connect_timeout.max(0.1) + 1.0;
    session.wait_connected(Duration::from_secs_f64(budget), common.quiet);
    // Idle: the phase only tells the workers that connecting is over.
    session.set_phase(PHASE_WARMUP);
    session.hold(args.hold, common.quiet, "hold");
    let rss_after = args.hub_pid.map(rss_kib).transpose()?;
    let results = session.finish()?;
    let outcome = report::Outcome::merge(&results, 0.0);

    let per_conn_bytes = match (rss_before, rss_after) {
        (Some(before), Some(after)) if outcome.connected > 0 => {
            Some(after.saturating_sub(before) as f64 * 1024.0 / outcome.connected as f64)
        }
        _ => None,
    };
    let label = common.label.clone().unwrap_or_else(|| {
        format!(
            "connections-{}-{}",
            format!("{:?}", common.target).to_lowercase(),
            if common.tls { "tls" } else { "plain" }
        )
    });
    println!(
        "{label}: {} connected, {} failed, {:.0} CONNECT/s; hub RSS {} -> {} KiB ({}); errors {}",
        outcome.connected,
        outcome.connect_failed,
        outcome.connects_per_sec(),
        rss_before.map_or("?".to_owned(), |v| v.to_string()),
        rss_after.map_or("?".to_owned(), |v| v.to_string()),
        per_conn_bytes.map_or("no --hub-pid".to_owned(), |b| format!(
            "{b:.0} B per connection"
        )),
        report::errors_text(&outcome.errors),
    );
    if let Some(path) = &common.json {
        let value = json!({
            "label": label,
            "config": {
                "command": "connections",
                "target": format!("{:?}", common.target).to_lowercase(),
                "host": common.host,
                "port": common.port(),
                "tls": common.tls,
                "devices": devices,
                "devices_requested": common.devices.to_string(),
                "fleet": common.fleet,
                "connect_rate": common.connect_rate,
                "source_ips": args.source_ips,
                "threads": common.threads,
                "cpus": cpus,
                "hub_pid": args.hub_pid,
                "hold_secs": args.hold,
            },
            "machine": report::machine(),
            "connect": report::connect_json(&outcome),
            "memory": {
                "hub_rss_before_kib": rss_before,
                "hub_rss_after_kib": rss_after,
                "hub_rss_per_connection_bytes": per_conn_bytes,
            },
            "errors": report::errors_json(&outcome.errors),
        });
        report::write_json(path, &value)?;
    }
    Ok(())
}

/// VmRSS of process `pid` in KiB.
fn rss_kib(pid: u32) -> anyhow::Result<u64> {
    let path = format!("/proc/{pid}/status");
    let status =
        std::fs::read_to_string(Path::new(&path)).with_context(|| format!("read {path}"))?;
    parse_vm_rss(&status).with_context(|| format!("no VmRSS in {path}"))
}

fn parse_vm_rss(status: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_vm_rss() {
        let status = "Name:\tingot\nVmPeak:\t  9000 kB\nVmRSS:\t   12345 kB\nThreads:\t3\n";
        assert_eq!(parse_vm_rss(status), Some(12345));
        assert_eq!(parse_vm_rss("Name: x\n"), None);
    }
}
