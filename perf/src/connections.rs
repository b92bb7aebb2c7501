//! `ingot-load connections`: how many idle authenticated connections a hub holds, what each
//! costs it in resident memory, and how fast it accepts them.
//!
//! The hub's memory is read from `/proc/PID/status` (VmRSS) before the first connect and after
//! the last CONNACK plus `--hold` seconds, so the figure includes everything a connection costs
//! in user space (buffers, TLS state, session) but not the kernel's socket memory, which is the
//! same for every broker. Connections are spread over `--source-ips` (127.0.0.1, 127.0.0.2, ...)
//! because one source address has only ~28 k ephemeral ports towards one destination: each
//! socket is bound to its source address before it connects.
//!
//! `--devices max` asks for as many connections as this machine allows: the count is the
//! smallest of the generator's descriptor limit, the hub's (`/proc/PID/limits` minus what it has
//! open, with `--hub-pid`) and the ports of the source addresses, and opening stops at the first
//! connect that fails (`--until-failure` does that for a fixed count). The limits are in the
//! JSON, with the one that bound the run.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use serde_json::json;

use crate::cli::{ConnectionsArgs, DeviceCount};
use crate::generator::{resolve, Plan, Session, PHASE_WARMUP};
use crate::latency::Clock;
use crate::report;

pub fn run(args: &ConnectionsArgs) -> anyhow::Result<()> {
    let common = &args.common;
    let source_ips = common.source_ips();
    let limits = match common.devices {
        DeviceCount::Count(_) => None,
        DeviceCount::Max => Some(Limits::measure(args.hub_pid, source_ips.len())?),
    };
    let count = match (common.devices, &limits) {
        (DeviceCount::Count(n), _) => Some(n),
        // All of a fleet file, cut to the limit below; otherwise the limit.
        (DeviceCount::Max, _) if common.fleet.is_some() => None,
        (DeviceCount::Max, limits) => limits.as_ref().map(|l| l.chosen),
    };
    if let Some(l) = &limits {
        if !common.quiet {
            eprintln!("ingot-load: --devices max: {}", l.text());
        }
    }
    let (cpus, mut fleet, tls) = crate::generator::prepare_target(common, count)?;
    if let Some(l) = &limits {
        fleet.devices.truncate(l.chosen);
    }
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
        source_ips: source_ips.clone(),
        publish: false,
        e2e_nonce: None,
        stop_at_failure: args.until_failure || limits.is_some(),
    });
    let rss_before = args.hub_pid.map(rss_kib).transpose()?;
    let mut session = Session::start(
        plan,
        fleet.devices,
        common.threads,
        cpus.clone(),
        Clock::new(),
    )?;
    let budget =
        devices as f64 / common.connect_rate.max(1.0) + common.connect_timeout.max(0.1) + 1.0;
    session.wait_connected(Duration::from_secs_f64(budget), common.quiet);
    // Idle: the phase only tells the workers that connecting is over.
    session.set_phase(PHASE_WARMUP);
    session.hold(args.hold, common.quiet, "hold");
    let rss_after = args.hub_pid.map(rss_kib).transpose()?;
    let halted = session.halted();
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
        "{label}: {} connected, {} failed{}, {:.0} CONNECT/s; hub RSS {} -> {} KiB ({}); errors {}",
        outcome.connected,
        outcome.connect_failed,
        if halted {
            " (stopped at the first failure)"
        } else {
            ""
        },
        outcome.connects_per_sec(),
        rss_before.map_or("?".to_owned(), |v| v.to_string()),
        rss_after.map_or("?".to_owned(), |v| v.to_string()),
        match (per_conn_bytes, args.hub_pid) {
            (Some(b), _) => format!("{b:.0} B per connection"),
            (None, None) => "no --hub-pid".to_owned(),
            (None, Some(_)) => "no connection to divide by".to_owned(),
        },
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
                "until_failure": args.until_failure || limits.is_some(),
                "connect_rate": common.connect_rate,
                "source_ips": source_ips,
                "threads": common.threads,
                "cpus": cpus,
                "hub_pid": args.hub_pid,
                "hold_secs": args.hold,
            },
            "machine": report::machine(),
            "connect": report::connect_json(&outcome),
            "stopped_at_failure": halted,
            "limits": limits.as_ref().map(Limits::json),
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

/// What bounds the number of connections on this machine (`--devices max`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Descriptors this process may still open (its RLIMIT_NOFILE, minus what is open and a
    /// reserve for epoll instances and the like).
    pub generator_fds: u64,
    /// Descriptors the hub may still open, when its PID is known.
    pub hub_fds: Option<u64>,
    /// Ephemeral ports over all source addresses.
    pub ports: u64,
    pub chosen: usize,
    pub limited_by: &'static str,
}

/// Descriptors kept free for epoll instances, the registry client and the like.
const FD_RESERVE: u64 = 64;

impl Limits {
    fn measure(hub_pid: Option<u32>, source_ips: usize) -> anyhow::Result<Self> {
        let own = rustix::process::getrlimit(rustix::process::Resource::Nofile)
            .current
            .unwrap_or(u64::MAX);
        let generator_fds = own
            .saturating_sub(open_fds("self")?)
            .saturating_sub(FD_RESERVE);
        let hub_fds = match hub_pid {
            Some(pid) => {
                let path = format!("/proc/{pid}/limits");
                let text =
                    std::fs::read_to_string(&path).with_context(|| format!("read {path}"))?;
                let soft = parse_open_files_limit(&text)
                    .with_context(|| format!("no Max open files in {path}"))?;
                Some(
                    soft.saturating_sub(open_fds(&pid.to_string())?)
                        .saturating_sub(FD_RESERVE / 4),
                )
            }
            None => None,
        };
        let range = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
            .ok()
            .and_then(|t| parse_port_range(&t))
            .unwrap_or(28_232);
        Ok(Self::choose(
            generator_fds,
            hub_fds,
            range * source_ips.max(1) as u64,
        ))
    }

    fn choose(generator_fds: u64, hub_fds: Option<u64>, ports: u64) -> Self {
        let mut chosen = (
            generator_fds,
            "the generator's descriptor limit (ulimit -n)",
        );
        if let Some(hub) = hub_fds {
            if hub < chosen.0 {
                chosen = (hub, "the hub's descriptor limit (its ulimit -n)");
            }
        }
        if ports < chosen.0 {
            chosen = (
                ports,
                "the ephemeral ports of the source addresses (--source-ips)",
            );
        }
        Self {
            generator_fds,
            hub_fds,
            ports,
            chosen: usize::try_from(chosen.0).unwrap_or(usize::MAX).max(1),
            limited_by: chosen.1,
        }
    }

    fn text(&self) -> String {
        format!(
            "{} connections, limited by {} (generator descriptors {}, hub descriptors {}, \
             source ports {})",
            self.chosen,
            self.limited_by,
            self.generator_fds,
            self.hub_fds
                .map_or_else(|| "? (no --hub-pid)".to_owned(), |n| n.to_string()),
            self.ports
        )
    }

    fn json(&self) -> serde_json::Value {
        json!({
            "generator_fds": self.generator_fds,
            "hub_fds": self.hub_fds,
            "ports": self.ports,
            "chosen": self.chosen,
            "limited_by": self.limited_by,
        })
    }
}

/// Descriptors process `pid` (or `self`) has open.
fn open_fds(pid: &str) -> anyhow::Result<u64> {
    let path = format!("/proc/{pid}/fd");
    Ok(std::fs::read_dir(&path)
        .with_context(|| format!("list {path}"))?
        .count() as u64)
}

/// The soft `Max open files` of a `/proc/PID/limits`.
fn parse_open_files_limit(limits: &str) -> Option<u64> {
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    let soft = line
        .strip_prefix("Max open files")?
        .split_whitespace()
        .next()?;
    match soft {
        "unlimited" => Some(u64::MAX),
        n => n.parse().ok(),
    }
}

/// How many ports `/proc/sys/net/ipv4/ip_local_port_range` holds.
fn parse_port_range(text: &str) -> Option<u64> {
    let mut it = text.split_whitespace().map(str::parse::<u64>);
    let (Some(Ok(lo)), Some(Ok(hi))) = (it.next(), it.next()) else {
        return None;
    };
    (hi >= lo).then(|| hi - lo + 1)
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

    #[test]
    fn reads_limits_and_chooses_the_smallest() {
        let limits = "Limit                     Soft Limit           Hard Limit           Units\n\
                      Max processes             95357                95357                processes\n\
                      Max open files            20000                20000                files\n";
        assert_eq!(parse_open_files_limit(limits), Some(20_000));
        assert_eq!(parse_port_range("32768\t60999\n"), Some(28_232));
        assert_eq!(parse_port_range("9 1"), None);
        let l = Limits::choose(19_900, Some(19_950), 56_464);
        assert_eq!(
            (l.chosen, l.limited_by.contains("generator")),
            (19_900, true)
        );
        let l = Limits::choose(1_000_000, Some(19_950), 56_464);
        assert_eq!((l.chosen, l.limited_by.contains("hub")), (19_950, true));
        let l = Limits::choose(1_000_000, None, 28_232);
        assert_eq!((l.chosen, l.limited_by.contains("ports")), (28_232, true));
    }
}
