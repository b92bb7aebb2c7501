//! `ingot monitor-events` and `ingot log verify`: the command-line face of the event store.
//!
//! Both read the data directory directly with `ingot_engine::store`'s reader, without a
//! running hub and without disturbing one: the reader takes no lock and maps segments
//! read-only. This module owns the JSON rendering of an event (the engine knows no JSON):
//! one object per line, shaped like `az iot hub monitor-events --properties all` output.

use std::io::Write as _;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context as _};
use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use chrono::{DateTime, SecondsFormat, Utc};
use clap::Args;
use serde_json::{Map, Value};

use ingot_engine::store::format::property_name;
use ingot_engine::store::{
    verify, ArchivedProperty, Checkpoints, PartitionId, PartitionReader, ReadError, Reader, Record,
    StartAt,
};

/// Where `monitor-events` starts when no checkpoint says otherwise.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum From {
    Start,
    End,
    /// Unix milliseconds.
    TimeMs(u64),
}

fn parse_from(text: &str) -> Result<From, String> {
    match text {
        "start" => Ok(From::Start),
        "end" => Ok(From::End),
        _ => DateTime::parse_from_rfc3339(text)
            .map(|t| From::TimeMs(u64::try_from(t.timestamp_millis()).unwrap_or(0)))
            .map_err(|e| format!("expected start, end or an RFC 3339 time ({e})")),
    }
}

/// `ingot monitor-events`: print device events from the built-in endpoint's log.
#[derive(Debug, Clone, Args)]
pub struct MonitorEventsArgs {
    /// The hub's data directory.
    #[arg(
        long,
        value_name = "DIR",
        env = "INGOT_DATA_DIR",
        default_value = "./ingot-data"
    )]
    pub data_dir: PathBuf,
    /// Where to start: `start`, `end`, or an RFC 3339 time such as 2026-11-26T10:00:00Z.
    #[arg(long, value_name = "start|end|TIME", default_value = "end", value_parser = parse_from)]
    pub from: From,
    /// Read only this partition.
    #[arg(long, value_name = "N")]
    pub partition: Option<u32>,
    /// Print only this device's events.
    #[arg(long, value_name = "ID")]
    pub device: Option<String>,
    /// Resume from this consumer group's checkpoints, and store them as events are printed.
    #[arg(long, value_name = "NAME")]
    pub consumer_group: Option<String>,
    /// Stop at the end of the log instead of waiting for new events.
    #[arg(long)]
    pub no_follow: bool,
    /// Stop after printing this many events.
    #[arg(long, value_name = "N")]
    pub count: Option<u64>,
    /// Report a damaged record on standard error and continue after it, instead of stopping.
    #[arg(long)]
    pub skip_damaged: bool,
    /// Read this endpoint's log instead of the built-in `events` (a `log` endpoint of the
    /// routing configuration).
    #[arg(long, value_name = "NAME", default_value = "events")]
    pub endpoint: String,
}

impl MonitorEventsArgs {
    /// The store directory of the endpoint read: the data directory for `events`,
    /// `data_dir/endpoints/NAME` for a custom `log` endpoint.
    pub fn store_dir(&self) -> PathBuf {
        if self.endpoint == "events" {
            self.data_dir.clone()
        } else {
            self.data_dir.join("endpoints").join(&self.endpoint)
        }
    }
}

/// `ingot log verify`: check every checksum of the event store.
#[derive(Debug, Clone, Args)]
pub struct LogVerifyArgs {
    /// The hub's data directory.
    #[arg(
        long,
        value_name = "DIR",
        env = "INGOT_DATA_DIR",
        default_value = "./ingot-data"
    )]
    pub data_dir: PathBuf,
}

/// Events read from one partition before looking at the next, so that one busy partition
/// does not starve the others and checkpoints are written per round, not per event.
const ROUND_EVENTS_MAX: usize = 1000;
/// Sleep between rounds when every partition is at its end.
const IDLE_SLEEP: Duration = Duration::from_millis(1);

/// Runs `ingot monitor-events`.
pub fn monitor_events(args: &MonitorEventsArgs) -> anyhow::Result<()> {
    let store_dir = args.store_dir();
    if args.endpoint != "events" && !store_dir.is_dir() {
        bail!(
            "there is no log endpoint '{}' in {}",
            args.endpoint,
            args.data_dir.display()
        );
    }
    let reader = Reader::open(&store_dir)
        .with_context(|| format!("open the event store in {}", store_dir.display()))?;
    let partitions: Vec<u32> = match args.partition {
        Some(p) if p >= reader.partition_count() => {
            bail!(
                "there is no partition {p}: the store has {}",
                reader.partition_count()
            )
        }
        Some(p) => vec![p],
        None => (0..reader.partition_count()).collect(),
    };
    let checkpoints = match &args.consumer_group {
        Some(group) => Some(
            Checkpoints::open(&store_dir, group)
                .with_context(|| format!("open the checkpoints of consumer group {group}"))?,
        ),
        None => None,
    };
    let mut readers = Vec::with_capacity(partitions.len());
    for p in partitions {
        let id = PartitionId(p);
        let saved = match &checkpoints {
            Some(c) => c
                .load(id)
                .with_context(|| format!("load the checkpoint of partition {p}"))?,
            None => None,
        };
        let start = match (saved, args.from) {
            (Some(offset), _) => StartAt::Offset(offset),
            (None, From::Start) => StartAt::Start,
            (None, From::End) => StartAt::End,
            (None, From::TimeMs(ms)) => StartAt::TimeMs(ms),
        };
        let partition = reader
            .partition(id, start)
            .with_context(|| format!("open partition {p}"))?;
        readers.push((partition, saved));
    }

    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    let mut printed = 0u64;
    loop {
        let mut progressed = false;
        for (partition, saved) in &mut readers {
            let mut events = 0;
            while events < ROUND_EVENTS_MAX {
                if args.count.is_some_and(|n| printed >= n) {
                    break;
                }
                let record = match partition.next() {
                    Ok(Some(record)) => record,
                    Ok(None) => break,
                    Err(e) => {
                        handle_read_error(partition, e, args.skip_damaged)?;
                        continue;
                    }
                };
                events += 1;
                if args
                    .device
                    .as_deref()
                    .is_some_and(|d| device_id(&record) != Some(d))
                {
                    continue;
                }
                let line = serde_json::to_string(&event_json(&record))?;
                writeln!(out, "{line}").context("write to standard output")?;
                printed += 1;
            }
            if events > 0 {
                progressed = true;
                out.flush().context("write to standard output")?;
                if let Some(checkpoints) = &checkpoints {
                    let next = partition.next_offset();
                    if *saved != Some(next) {
                        checkpoints
                            .store(partition.partition(), next)
                            .with_context(|| {
                                format!(
                                    "store the checkpoint of partition {}",
                                    partition.partition()
                                )
                            })?;
                        *saved = Some(next);
                    }
                }
            }
        }
        if args.count.is_some_and(|n| printed >= n) {
            return Ok(());
        }
        if !progressed {
            if args.no_follow {
                return Ok(());
            }
            std::thread::sleep(IDLE_SLEEP);
        }
    }
}

fn handle_read_error(
    partition: &mut PartitionReader,
    error: ReadError,
    skip: bool,
) -> anyhow::Result<()> {
    if !skip {
        return Err(anyhow::Error::new(error)
            .context("read a damaged record (run `ingot log verify`, or pass --skip-damaged)"));
    }
    eprintln!("skipping damaged data: {error}");
    if !partition.skip_damaged()? {
        // Nothing valid after the damage yet; the next poll looks again.
        std::thread::sleep(IDLE_SLEEP);
    }
    Ok(())
}

fn device_id<'a>(record: &Record<'a>) -> Option<&'a str> {
    record
        .message
        .system_property(property_name::CONNECTION_DEVICE_ID)
}

fn properties_json(properties: &[ArchivedProperty]) -> Value {
    let map: Map<String, Value> = properties
        .iter()
        .map(|p| (p.name().to_owned(), Value::String(p.value().to_owned())))
        .collect();
    Value::Object(map)
}

/// Whether a content type means JSON: `application/json`, with or without parameters.
fn is_json(content_type: Option<&str>) -> bool {
    content_type.is_some_and(|ct| {
        let media_type = ct.split(';').next().unwrap_or_default().trim();
        media_type.eq_ignore_ascii_case("application/json")
    })
}

/// The JSON form of one event: the line `monitor-events` prints.
pub fn event_json(record: &Record<'_>) -> Value {
    let message = record.message;
    let body = message.body();
    let content_type = message.system_property(property_name::CONTENT_TYPE);
    let mut event = Map::new();
    event.insert("partition".into(), record.partition.0.into());
    event.insert("offset".into(), record.offset.0.into());
    event.insert(
        "enqueuedTime".into(),
        rfc3339_ms(record.enqueued_time_ms).into(),
    );
    event.insert(
        "deviceId".into(),
        device_id(record).map_or(Value::Null, Value::from),
    );
    let module_id = message.system_property(property_name::CONNECTION_MODULE_ID);
    event.insert(
        "moduleId".into(),
        module_id.map_or(Value::Null, Value::from),
    );
    event.insert(
        "systemProperties".into(),
        properties_json(message.system_properties()),
    );
    event.insert(
        "properties".into(),
        properties_json(message.application_properties()),
    );
    let parsed = is_json(content_type)
        .then(|| serde_json::from_slice::<Value>(body).ok())
        .flatten();
    match (parsed, std::str::from_utf8(body)) {
        (Some(json), _) => {
            event.insert("body".into(), json);
        }
        (None, Ok(text)) => {
            event.insert("body".into(), text.into());
        }
        (None, Err(_)) => {
            event.insert("body".into(), BASE64.encode(body).into());
            event.insert("bodyEncoding".into(), "base64".into());
        }
    }
    Value::Object(event)
}

fn rfc3339_ms(unix_ms: u64) -> String {
    let time = i64::try_from(unix_ms)
        .ok()
        .and_then(DateTime::<Utc>::from_timestamp_millis);
    time.unwrap_or_default()
        .to_rfc3339_opts(SecondsFormat::Millis, true)
}

/// Runs `ingot log verify`: prints every damaged place and a summary; fails when there is any.
pub fn log_verify(args: &LogVerifyArgs) -> anyhow::Result<()> {
    let report = verify(&args.data_dir)
        .with_context(|| format!("verify the event store in {}", args.data_dir.display()))?;
    for damage in &report.damage {
        println!("damaged: {damage}");
    }
    println!(
        "{} partitions, {} segments, {} valid records, {} damaged places",
        report.partitions,
        report.segments,
        report.records,
        report.damage.len()
    );
    if !report.is_clean() {
        bail!("the event store in {} is damaged", args.data_dir.display());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;
    use ingot_engine::store::{MessageRef, PropertyRef, Store, StoreConfig};

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        monitor: MonitorEventsArgs,
    }

    #[test]
    fn flags_parse_with_their_defaults() {
        let cli = Cli::parse_from(["ingot"]);
        assert_eq!(cli.monitor.data_dir, PathBuf::from("./ingot-data"));
        assert_eq!(cli.monitor.from, From::End);
        assert!(!cli.monitor.no_follow);
        let cli = Cli::parse_from([
            "ingot",
            "--from",
            "2026-11-26T10:00:00.5Z",
            "--partition",
            "2",
            "--device",
            "d1",
            "--consumer-group",
            "g",
            "--no-follow",
            "--count",
            "5",
        ]);
        assert_eq!(cli.monitor.from, From::TimeMs(1_795_687_200_500));
        assert_eq!(cli.monitor.partition, Some(2));
        assert_eq!(cli.monitor.count, Some(5));
        assert!(Cli::try_parse_from(["ingot", "--from", "yesterday"]).is_err());
    }

    fn store_with(bodies: &[(&str, &[u8])]) -> tempfile::TempDir {
        let dir = tempfile::tempdir().expect("temporary directory");
        let mut config = StoreConfig::new(1);
        config.segment_bytes_max = 1 << 20;
        let mut store = Store::open(dir.path(), config).expect("store opens");
        for (content_type, body) in bodies {
            let system = [
                PropertyRef {
                    name: property_name::CONNECTION_DEVICE_ID,
                    value: "dev1",
                },
                PropertyRef {
                    name: property_name::CONTENT_TYPE,
                    value: content_type,
                },
            ];
            let app = [PropertyRef {
                name: "alert",
                value: "yes",
            }];
            let message = MessageRef {
                system_properties: &system,
                application_properties: &app,
                body,
            };
            store
                .append_batch(PartitionId(0), &[message], 1_764_151_200_123)
                .expect("appended");
        }
        dir
    }

    #[test]
    fn events_render_json_text_and_binary_bodies() {
        let dir = store_with(&[
            ("application/json; charset=utf-8", b"{\"t\":21.5}"),
            ("text/plain", b"hello"),
            ("application/octet-stream", &[0xff, 0x00, 0x01]),
            ("application/json", b"not json"),
        ]);
        let reader = Reader::open(dir.path()).expect("reader");
        let mut partition = reader
            .partition(PartitionId(0), StartAt::Start)
            .expect("partition");
        let mut events = Vec::new();
        while let Some(record) = partition.next().expect("no damage") {
            events.push(event_json(&record));
        }
        assert_eq!(events[0]["body"], serde_json::json!({"t": 21.5}));
        assert_eq!(events[0]["deviceId"], "dev1");
        assert_eq!(events[0]["moduleId"], Value::Null);
        assert_eq!(events[0]["enqueuedTime"], "2025-11-26T10:00:00.123Z");
        assert_eq!(events[0]["properties"]["alert"], "yes");
        assert_eq!(
            events[0]["systemProperties"]["content-type"],
            "application/json; charset=utf-8"
        );
        assert_eq!(events[1]["body"], "hello");
        assert_eq!(events[2]["body"], "/wAB");
        assert_eq!(events[2]["bodyEncoding"], "base64");
        assert_eq!(events[3]["body"], "not json");
        assert_eq!(events[3]["offset"], 3);
    }

    #[test]
    fn monitor_and_verify_run_on_a_store() {
        let dir = store_with(&[("text/plain", b"a"), ("text/plain", b"b")]);
        let args = MonitorEventsArgs {
            data_dir: dir.path().to_path_buf(),
            from: From::Start,
            partition: None,
            device: Some("dev1".into()),
            consumer_group: Some("cli".into()),
            no_follow: true,
            count: None,
            skip_damaged: false,
            endpoint: "events".into(),
        };
        monitor_events(&args).expect("monitor runs");
        let checkpoints = Checkpoints::open(dir.path(), "cli").expect("checkpoints");
        assert_eq!(
            checkpoints.load(PartitionId(0)).expect("load").map(|o| o.0),
            Some(2)
        );
        log_verify(&LogVerifyArgs {
            data_dir: dir.path().to_path_buf(),
        })
        .expect("clean");
        let missing = LogVerifyArgs {
            data_dir: dir.path().join("nothing"),
        };
        assert!(log_verify(&missing).is_err());
    }
}
