//! The command line. Other scripts (`perf/compare`, CI) call these exact flag names, so a flag is
//! only ever added, never renamed.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

#[derive(Debug, Parser)]
#[command(
    name = "ingot-load",
    version,
    about = "Load generator and null MQTT sink for Ingot"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Connect N devices and publish telemetry for a duration; report throughput and latency.
    Run(RunArgs),
    /// A null MQTT broker: CONNACK 0, a PUBACK for every QoS 1 PUBLISH, PINGRESP; discards.
    Sink(SinkArgs),
    /// Open N idle authenticated connections; report the hub's memory per connection and the
    /// connect rate.
    Connections(ConnectionsArgs),
    /// Prepared fleets: register devices in bulk and save their ids and keys for `--fleet`.
    Fleet(FleetArgs),
}

/// How many devices: a number, or `max` (all of a `--fleet` file; for `connections`, as many
/// as the descriptor limits and source ports allow, until the first failure).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceCount {
    Count(usize),
    Max,
}

impl std::str::FromStr for DeviceCount {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        if text.eq_ignore_ascii_case("max") {
            return Ok(Self::Max);
        }
        match text.parse::<usize>() {
            Ok(0) => Err("must be at least 1".to_owned()),
            Ok(n) => Ok(Self::Count(n)),
            Err(_) => Err(format!("expected a number or `max`, not {text:?}")),
        }
    }
}

impl std::fmt::Display for DeviceCount {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Count(n) => write!(f, "{n}"),
            Self::Max => f.write_str("max"),
        }
    }
}

/// One `--source-ips` element: an address, or an IPv4 range `127.0.0.2-127.0.0.9`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceIps(pub Vec<std::net::IpAddr>);

/// Largest range one `--source-ips` element may expand to.
const SOURCE_RANGE_MAX: u32 = 4096;

impl std::str::FromStr for SourceIps {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let parse = |t: &str| {
            t.trim()
                .parse::<std::net::IpAddr>()
                .map_err(|e| format!("{t:?}: {e}"))
        };
        let Some((first, last)) = text.split_once('-') else {
            return Ok(Self(vec![parse(text)?]));
        };
        let (std::net::IpAddr::V4(first), std::net::IpAddr::V4(last)) =
            (parse(first)?, parse(last)?)
        else {
            return Err(format!("{text:?}: ranges are IPv4 only"));
        };
        let (first, last) = (u32::from(first), u32::from(last));
        if last < first || last - first >= SOURCE_RANGE_MAX {
            return Err(format!(
                "{text:?}: a range runs forwards and holds at most {SOURCE_RANGE_MAX} addresses"
            ));
        }
        Ok(Self(
            (first..=last)
                .map(|a| std::net::IpAddr::V4(a.into()))
                .collect(),
        ))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Target {
    /// An Ingot hub: devices are created through its registry API and use SAS tokens.
    Ingot,
    /// Any MQTT 3.1.1 broker: client id, username, password and topic from templates.
    Mqtt,
}

/// Who to connect to, as whom, and how fast: shared by `run` and `connections`.
#[derive(Debug, Clone, Args)]
pub struct TargetArgs {
    #[arg(long, value_enum, default_value = "ingot")]
    pub target: Target,
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// Defaults to 1883, or 8883 with --tls.
    #[arg(long)]
    pub port: Option<u16>,
    #[arg(long)]
    pub tls: bool,
    /// A PEM CA to trust for TLS (with --data-dir, the hub's development CA is the default).
    #[arg(long)]
    pub ca: Option<PathBuf>,
    /// TLS server name; defaults to the hub's host name (ingot) or `localhost` (mqtt).
    #[arg(long)]
    pub server_name: Option<String>,
    /// A local hub's data directory: its registry access and development CA.
    #[arg(long, env = "INGOT_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// A service connection string with RegistryWrite (instead of --data-dir).
    #[arg(long)]
    pub connection_string: Option<String>,
    /// Devices (connections): a number, or `max` (see the README).
    #[arg(long, default_value = "100")]
    pub devices: DeviceCount,
    #[arg(long, default_value = "load-")]
    pub device_prefix: String,
    /// ingot target: a prepared fleet (`ingot-load fleet create`; JSON lines or CSV of device
    /// id, primary key and optionally host name) instead of registering devices; the first
    /// --devices of it are used.
    #[arg(long, value_name = "FILE")]
    pub fleet: Option<PathBuf>,
    /// Source addresses to spread connections over, round robin (`127.0.0.1,127.0.0.2` or
    /// `127.0.0.1-127.0.0.8`): each has its own ephemeral port range towards the hub.
    #[arg(long, value_delimiter = ',')]
    pub source_ips: Vec<SourceIps>,
    /// New connections per second, over all threads.
    #[arg(long, default_value_t = 1000.0)]
    pub connect_rate: f64,
    /// A connection that has no CONNACK after this many seconds counts as failed.
    #[arg(long, default_value_t = 10.0)]
    pub connect_timeout: f64,
    #[arg(long, default_value_t = 300)]
    pub keep_alive: u16,
    /// mqtt target: client id template; `{i}` is the connection's index.
    #[arg(long, default_value = "load-{i}")]
    pub client_id: String,
    /// mqtt target: username template.
    #[arg(long)]
    pub username: Option<String>,
    /// mqtt target: password template.
    #[arg(long)]
    pub password: Option<String>,
    /// mqtt target: topic template.
    #[arg(long, default_value = "load/{i}")]
    pub topic: String,
    /// ingot target: a property bag appended to the telemetry topic (`a=1&b=x`), as the device
    /// SDKs send application properties.
    #[arg(long)]
    pub properties: Option<String>,
    /// Generator threads, each one event loop owning its share of the connections.
    #[arg(long, default_value_t = 1)]
    pub threads: usize,
    /// Pin generator thread k to the k-th CPU of this list (`1`, `0,1`, `2-5`).
    #[arg(long)]
    pub cpus: Option<String>,
    /// Write the result as JSON to this file.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// A name for this run in the summary and the JSON.
    #[arg(long)]
    pub label: Option<String>,
    /// No progress line on stderr.
    #[arg(long)]
    pub quiet: bool,
}

impl TargetArgs {
    pub fn port(&self) -> u16 {
        self.port.unwrap_or(if self.tls { 8883 } else { 1883 })
    }

    /// Every `--source-ips` address, ranges expanded, in order.
    pub fn source_ips(&self) -> Vec<std::net::IpAddr> {
        self.source_ips.iter().flat_map(|s| s.0.clone()).collect()
    }
}

#[derive(Debug, Clone, Args)]
pub struct RunArgs {
    #[command(flatten)]
    pub common: TargetArgs,
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(0..=1))]
    pub qos: u8,
    /// Payload bytes per PUBLISH.
    #[arg(long, default_value_t = 100)]
    pub payload: usize,
    /// QoS 1: unacknowledged PUBLISHes per connection. QoS 0: PUBLISHes per write.
    #[arg(long, default_value_t = 32)]
    pub window: usize,
    /// Messages per second over all connections (open loop, latency from the intended send
    /// time); without it every connection sends as fast as its window allows.
    #[arg(long)]
    pub rate: Option<f64>,
    /// Measured seconds, after the warm-up.
    #[arg(long, default_value_t = 5.0)]
    pub duration: f64,
    #[arg(long, default_value_t = 2.0)]
    pub warmup: f64,
    /// SO_SNDBUF per connection in bytes; QoS 0 defaults to 65536 so that the count of sent
    /// messages is not mostly the kernel's queue. 0 keeps the kernel's autotuning.
    #[arg(long)]
    pub send_buffer: Option<usize>,
    /// Also measure publish -> readable in the segment files: a reader thread tails every
    /// partition of --data-dir's event log (ingot target, local hub, payload >= 24 bytes).
    #[arg(long)]
    pub e2e: bool,
    /// --e2e: microseconds the reader sleeps when every partition is at its end (the
    /// resolution of the end-to-end figure).
    #[arg(long, default_value_t = 100)]
    pub e2e_poll_us: u64,
    /// --e2e: seconds the reader waits after the run for messages still on their way.
    #[arg(long, default_value_t = 5.0)]
    pub e2e_drain: f64,
    /// Write throughput and latency over time as a self-contained HTML page (inline SVG).
    #[arg(long, value_name = "FILE.html")]
    pub plot: Option<PathBuf>,
}

#[derive(Debug, Clone, Args)]
pub struct SinkArgs {
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    #[arg(long)]
    pub port: u16,
    /// Event-loop threads, each with its own SO_REUSEPORT listener.
    #[arg(long, default_value_t = 1)]
    pub threads: usize,
    #[arg(long)]
    pub cpus: Option<String>,
    /// Exit after this many seconds (default: run until killed).
    #[arg(long)]
    pub duration: Option<f64>,
    #[arg(long)]
    pub quiet: bool,
}

#[derive(Debug, Clone, Args)]
pub struct ConnectionsArgs {
    #[command(flatten)]
    pub common: TargetArgs,
    /// Stop opening connections at the first one that fails (implied by `--devices max`).
    #[arg(long)]
    pub until_failure: bool,
    /// The hub's process id, to read its resident memory before and after.
    #[arg(long)]
    pub hub_pid: Option<u32>,
    /// Seconds to hold the connections open after the last CONNACK before measuring memory.
    #[arg(long, default_value_t = 1.0)]
    pub hold: f64,
}

#[derive(Debug, Clone, Args)]
pub struct FleetArgs {
    #[command(subcommand)]
    pub command: FleetCommand,
}

#[derive(Debug, Clone, Subcommand)]
pub enum FleetCommand {
    /// Register N SAS devices in bulk with random keys through the registry API and write
    /// their ids and keys to a file for `--fleet`.
    Create(FleetCreateArgs),
}

#[derive(Debug, Clone, Args)]
pub struct FleetCreateArgs {
    #[arg(long)]
    pub devices: usize,
    #[arg(long, value_name = "FILE")]
    pub out: PathBuf,
    #[arg(long, default_value = "load-")]
    pub device_prefix: String,
    /// A local hub's data directory: its registry access and development CA.
    #[arg(long, env = "INGOT_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// A service connection string with RegistryWrite (instead of --data-dir).
    #[arg(long)]
    pub connection_string: Option<String>,
    /// A PEM CA to trust for the registry's HTTPS (with --data-dir, the hub's development CA).
    #[arg(long)]
    pub ca: Option<PathBuf>,
    /// `jsonl` or `csv`; by default from the file name (`.csv` is CSV, anything else JSON
    /// lines).
    #[arg(long)]
    pub format: Option<FleetFormat>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum FleetFormat {
    Jsonl,
    Csv,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_counts_and_source_ranges_parse() {
        assert_eq!("max".parse(), Ok(DeviceCount::Max));
        assert_eq!("250".parse(), Ok(DeviceCount::Count(250)));
        assert!("0".parse::<DeviceCount>().is_err());
        assert!("lots".parse::<DeviceCount>().is_err());
        let range: SourceIps = "127.0.0.254-127.0.1.1".parse().unwrap_or(SourceIps(vec![]));
        let text: Vec<String> = range.0.iter().map(ToString::to_string).collect();
        assert_eq!(
            text,
            ["127.0.0.254", "127.0.0.255", "127.0.1.0", "127.0.1.1"]
        );
        assert!("127.0.0.9-127.0.0.2".parse::<SourceIps>().is_err());
        assert!("::1-::2".parse::<SourceIps>().is_err());
        assert_eq!("::1".parse::<SourceIps>().map(|s| s.0.len()), Ok(1));
    }
}
