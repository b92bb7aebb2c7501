//! Delivery to `files` and `webhook` endpoints.
//!
//! Ingest appends every routed message to the endpoint's segment log (`data_dir/endpoints/NAME`);
//! it never waits for delivery. Here one worker per `files`/`webhook` endpoint tails every
//! partition of that log (one task per partition, so a slow partition holds back only itself and
//! each device's messages stay in order), reads a bounded batch ahead, delivers it, and only then
//! stores the partition's checkpoint (the offset to resume from, written atomically by the store's
//! checkpoint facility, group `delivery`). A restart resumes at the checkpoint: at least once,
//! with duplicates possible after a crash and never a gap. The log is the backlog, bounded by its
//! retention: a worker that falls further behind than retention loses the deleted records.
//!
//! [`Workers`] is what the rest of the control plane uses: start the configured endpoints' workers,
//! add and remove one on a running hub, read their counters, stop them all.

mod files;
mod partition;
pub mod record;
mod webhook;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Context as _};
use ingot_engine::store::{PartitionId, Reader, StartAt};
use serde::Serialize;
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::config::{EndpointConfig, EndpointKind};

pub use files::{render_file_name, FilesSettings};
pub use webhook::{backoff_delay, WebhookSettings};

/// The consumer group under which delivery checkpoints live in each endpoint's log.
pub const CHECKPOINT_GROUP: &str = "delivery";

/// What every worker needs from the hub.
#[derive(Debug, Clone)]
pub struct Context {
    pub data_dir: PathBuf,
    /// `{iothub}` in file names: the first label of the hub's host name.
    pub hub_name: String,
}

impl Context {
    /// `hub_name`: `Config::hub_name`.
    pub fn new(data_dir: &Path, hub_name: &str) -> Context {
        Context {
            data_dir: data_dir.to_path_buf(),
            hub_name: hub_name.to_owned(),
        }
    }

    /// The segment log of endpoint `name`.
    pub fn endpoint_dir(&self, name: &str) -> PathBuf {
        self.data_dir.join("endpoints").join(name)
    }
}

/// One endpoint's delivery counters, since the hub started.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct EndpointStatus {
    pub name: String,
    #[serde(rename = "type")]
    pub kind: &'static str,
    /// Messages delivered (written in a rolled file, or acknowledged by the webhook).
    pub delivered: u64,
    /// Webhook attempts that failed and were retried.
    pub retries: u64,
    /// Messages written to the dead-letter directory.
    pub dead_lettered: u64,
    /// Messages in the log not delivered yet (`None` while the log is not open).
    pub lag: Option<u64>,
}

#[derive(Debug, Default)]
pub(crate) struct Counters {
    delivered: AtomicU64,
    retries: AtomicU64,
    dead_lettered: AtomicU64,
    /// Per partition, the offset delivery has reached (its checkpoint); empty until the log opens.
    progress: Mutex<Vec<u64>>,
}

impl Counters {
    pub(crate) fn delivered(&self, n: u64) {
        self.delivered.fetch_add(n, Ordering::Relaxed);
    }
    pub(crate) fn retried(&self) {
        self.retries.fetch_add(1, Ordering::Relaxed);
    }
    pub(crate) fn dead_lettered(&self, n: u64) {
        self.dead_lettered.fetch_add(n, Ordering::Relaxed);
    }
    pub(crate) fn progress(&self, partition: PartitionId, next: u64) {
        if let Ok(mut progress) = self.progress.lock() {
            if let Some(slot) = progress.get_mut(partition.0 as usize) {
                *slot = next;
            }
        }
    }
}

struct Worker {
    kind: EndpointKind,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
    counters: Arc<Counters>,
}

/// How much lower than ingest the delivery threads run (added to their nice value): on a core
/// that ingest keeps busy, delivery takes the time ingest leaves, not half of it.
const NICENESS: i32 = 10;

/// Gives the calling thread a nice value `NICENESS` above the current one (at most 19).
fn lower_priority() {
    let tid = rustix::thread::gettid();
    let lowered = rustix::process::getpriority_process(Some(tid))
        .and_then(|now| rustix::process::setpriority_process(Some(tid), (now + NICENESS).min(19)));
    if let Err(e) = lowered {
        tracing::debug!("cannot lower the priority of a delivery thread: {e}");
    }
}

/// The delivery workers of a hub, on a runtime of their own whose threads run at a lower
/// priority than ingest.
pub struct Workers {
    ctx: Arc<Context>,
    /// Taken by `Drop` (a runtime cannot be dropped in an async context, only shut down).
    runtime: Option<tokio::runtime::Runtime>,
    handle: tokio::runtime::Handle,
    tls: Arc<rustls::ClientConfig>,
    workers: Mutex<BTreeMap<String, Worker>>,
}

impl std::fmt::Debug for Workers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Workers")
            .field("ctx", &self.ctx)
            .finish_non_exhaustive()
    }
}

impl Workers {
    /// Starts a worker for each `files` and `webhook` endpoint (`log` endpoints have none).
    pub fn start(ctx: Context, endpoints: &[EndpointConfig]) -> anyhow::Result<Workers> {
        let tls = crate::tls::client_config(None).context("set up TLS for webhooks")?;
        let threads = std::thread::available_parallelism().map_or(2, |n| n.get().clamp(1, 4));
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads)
            .max_blocking_threads(16)
            .thread_name("ingot-delivery")
            .on_thread_start(lower_priority)
            .enable_all()
            .build()
            .context("start the delivery runtime")?;
        let workers = Workers {
            ctx: Arc::new(ctx),
            handle: runtime.handle().clone(),
            runtime: Some(runtime),
            tls: Arc::new(tls),
            workers: Mutex::new(BTreeMap::new()),
        };
        for endpoint in endpoints {
            workers.add(endpoint)?;
        }
        Ok(workers)
    }

    /// Starts the worker of `endpoint` (validated here); a `log` endpoint needs none and is
    /// accepted as is. Its log may be created after this call: the worker waits for it.
    pub fn add(&self, endpoint: &EndpointConfig) -> anyhow::Result<()> {
        endpoint.validate().map_err(anyhow::Error::msg)?;
        let kind = endpoint.kind;
        let mut tls = self.tls.clone();
        let settings = match kind {
            EndpointKind::Log => return Ok(()),
            EndpointKind::Files => Settings::Files(FilesSettings::from_config(endpoint)?),
            EndpointKind::Webhook => {
                let settings = WebhookSettings::from_config(endpoint)?;
                if let Some(ca) = &settings.ca_file {
                    let config = crate::tls::client_config(Some(ca)).with_context(|| {
                        format!(
                            "endpoint '{}': load the CA file {}",
                            endpoint.name,
                            ca.display()
                        )
                    })?;
                    tls = Arc::new(config);
                }
                webhook::Target::parse(&settings.url, tls.clone())
                    .with_context(|| format!("endpoint '{}'", endpoint.name))?;
                Settings::Webhook(settings)
            }
        };
        let mut workers = self
            .workers
            .lock()
            .map_err(|_| anyhow::anyhow!("delivery workers lock poisoned"))?;
        if workers.contains_key(&endpoint.name) {
            bail!("endpoint '{}' already has a delivery worker", endpoint.name);
        }
        let (stop, stopped) = watch::channel(false);
        let counters = Arc::new(Counters::default());
        let task = self.handle.spawn(run_endpoint(
            self.ctx.clone(),
            endpoint.name.clone(),
            settings,
            tls,
            counters.clone(),
            stopped,
        ));
        workers.insert(
            endpoint.name.clone(),
            Worker {
                kind,
                stop,
                task,
                counters,
            },
        );
        Ok(())
    }

    /// Stops the worker of endpoint `name` (a `files` worker closes its current files and
    /// checkpoints them first); `false` if it had none.
    pub async fn remove(&self, name: &str) -> bool {
        let worker = self.workers.lock().ok().and_then(|mut w| w.remove(name));
        match worker {
            Some(worker) => {
                let _ = worker.stop.send(true);
                let _ = worker.task.await;
                true
            }
            None => false,
        }
    }

    /// The names of the endpoints that have a worker.
    pub fn names(&self) -> Vec<String> {
        self.workers
            .lock()
            .map(|w| w.keys().cloned().collect())
            .unwrap_or_default()
    }

    /// Counters of every worker. Reads the end of each partition (a few file system calls).
    pub fn status(&self) -> Vec<EndpointStatus> {
        let Ok(workers) = self.workers.lock() else {
            return Vec::new();
        };
        workers
            .iter()
            .map(|(name, worker)| {
                let progress = worker
                    .counters
                    .progress
                    .lock()
                    .map(|p| p.clone())
                    .unwrap_or_default();
                EndpointStatus {
                    name: name.clone(),
                    kind: worker.kind.as_str(),
                    delivered: worker.counters.delivered.load(Ordering::Relaxed),
                    retries: worker.counters.retries.load(Ordering::Relaxed),
                    dead_lettered: worker.counters.dead_lettered.load(Ordering::Relaxed),
                    lag: lag(&self.ctx.endpoint_dir(name), &progress),
                }
            })
            .collect()
    }

    /// Stops every worker and waits for them: `files` workers close and checkpoint their files,
    /// webhook workers abandon a batch in flight (it is sent again after a restart).
    pub async fn shutdown(&self) {
        let workers = match self.workers.lock() {
            Ok(mut w) => std::mem::take(&mut *w),
            Err(_) => return,
        };
        for worker in workers.values() {
            let _ = worker.stop.send(true);
        }
        for (_, worker) in workers {
            let _ = worker.task.await;
        }
    }
}

impl Drop for Workers {
    fn drop(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

/// Messages in the log after each partition's delivered offset.
fn lag(dir: &Path, progress: &[u64]) -> Option<u64> {
    if progress.is_empty() {
        return None;
    }
    let reader = Reader::open(dir).ok()?;
    let mut total = 0u64;
    for (p, delivered) in progress.iter().enumerate() {
        let end = reader
            .partition(PartitionId(p as u32), StartAt::End)
            .ok()?
            .next_offset()
            .0;
        total += end.saturating_sub(*delivered);
    }
    Some(total)
}

#[derive(Debug, Clone)]
enum Settings {
    Files(FilesSettings),
    Webhook(WebhookSettings),
}

/// How long to wait between looks for an endpoint's log that does not exist yet.
const LOG_WAIT: Duration = Duration::from_millis(500);

async fn run_endpoint(
    ctx: Arc<Context>,
    name: String,
    settings: Settings,
    tls: Arc<rustls::ClientConfig>,
    counters: Arc<Counters>,
    mut stop: watch::Receiver<bool>,
) {
    let dir = ctx.endpoint_dir(&name);
    let mut warned = false;
    let reader = loop {
        match Reader::open(&dir) {
            Ok(reader) => break reader,
            Err(e) => {
                if !warned {
                    tracing::info!(endpoint = %name, "delivery waits for the endpoint's log: {e}");
                    warned = true;
                }
                if partition::stop_or_sleep(&mut stop, LOG_WAIT).await {
                    return;
                }
            }
        }
    };
    if let Ok(mut progress) = counters.progress.lock() {
        *progress = vec![0; reader.partition_count() as usize];
    }
    let webhook = match &settings {
        Settings::Webhook(s) => match webhook::Target::parse(&s.url, tls) {
            Ok(target) => Some(Arc::new(target)),
            Err(e) => {
                tracing::error!(endpoint = %name, "webhook delivery cannot start: {e:#}");
                return;
            }
        },
        Settings::Files(_) => None,
    };
    let mut tasks = JoinSet::new();
    for p in 0..reader.partition_count() {
        let base = partition::Base {
            endpoint: name.clone(),
            dir: dir.clone(),
            reader: reader.clone(),
            id: PartitionId(p),
            counters: counters.clone(),
            stop: stop.clone(),
        };
        match &settings {
            Settings::Files(s) => {
                tasks.spawn(files::run(base, s.clone(), ctx.hub_name.clone()));
            }
            Settings::Webhook(s) => {
                if let Some(target) = &webhook {
                    tasks.spawn(webhook::run(base, s.clone(), target.clone()));
                }
            }
        }
    }
    while tasks.join_next().await.is_some() {}
    tracing::debug!(endpoint = %name, "delivery stopped");
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use ingot_engine::store::{MessageRef, PropertyRef, Store, StoreConfig};

    fn append(store: &mut Store, partition: u32, bodies: std::ops::Range<u32>) {
        for i in bodies {
            let body = format!("{{\"n\":{i}}}");
            let system = [
                PropertyRef {
                    name: "content-type",
                    value: "application/json",
                },
                PropertyRef {
                    name: "content-encoding",
                    value: "utf-8",
                },
            ];
            let message = MessageRef {
                system_properties: &system,
                application_properties: &[],
                body: body.as_bytes(),
            };
            store
                .append_batch(PartitionId(partition), &[message], 1_700_000_000_000)
                .unwrap();
        }
    }

    /// Every `Body.n` in the files under `root`, per file.
    fn files(root: &Path) -> Vec<Vec<u64>> {
        let mut out = Vec::new();
        let mut stack = vec![root.to_path_buf()];
        while let Some(dir) = stack.pop() {
            for entry in std::fs::read_dir(&dir).unwrap() {
                let path = entry.unwrap().path();
                if path.file_name().unwrap() == files::TMP_DIR {
                    continue;
                }
                if path.is_dir() {
                    stack.push(path);
                } else {
                    let text = std::fs::read_to_string(&path).unwrap();
                    out.push(
                        text.lines()
                            .map(|l| {
                                let v: serde_json::Value = serde_json::from_str(l).unwrap();
                                v["Body"]["n"].as_u64().unwrap()
                            })
                            .collect(),
                    );
                }
            }
        }
        out.sort();
        out
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn files_resume_at_the_checkpoint_after_a_restart() {
        let data = tempfile::tempdir().unwrap();
        let out = tempfile::tempdir().unwrap();
        let ctx = Context::new(data.path(), "myhub");
        let mut config = StoreConfig::new(2);
        config.segment_bytes_max = 1 << 20;
        let mut store = Store::open(&ctx.endpoint_dir("arch"), config).unwrap();
        append(&mut store, 0, 0..5);
        append(&mut store, 1, 100..103);
        let mut endpoint = EndpointConfig::log("arch");
        endpoint.kind = EndpointKind::Files;
        endpoint.path = Some(out.path().to_path_buf());
        endpoint.batch_frequency_in_seconds = Some(720);

        // Shutdown rolls the open files: one per partition, all records.
        let workers = Workers::start(ctx.clone(), std::slice::from_ref(&endpoint)).unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while workers.status()[0].lag != Some(8) {
            assert!(std::time::Instant::now() < deadline);
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        workers.shutdown().await;
        assert_eq!(
            files(out.path()),
            [vec![0, 1, 2, 3, 4], vec![100, 101, 102]]
        );

        // After a restart only the new records are written, in a new file.
        append(&mut store, 0, 5..7);
        let workers = Workers::start(ctx.clone(), std::slice::from_ref(&endpoint)).unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
        let status = workers.status();
        workers.shutdown().await;
        assert_eq!(
            files(out.path()),
            [vec![0, 1, 2, 3, 4], vec![5, 6], vec![100, 101, 102]]
        );
        assert_eq!(status[0].name, "arch");
        assert_eq!(status[0].delivered, 0, "nothing is rolled before shutdown");
        assert_eq!(status[0].lag, Some(2));
        // The names follow Azure's default format; the second file of partition 0 in the same
        // minute gets a suffix.
        let p0 = out.path().join("myhub").join("0");
        assert!(p0.is_dir());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn files_roll_by_size_and_age_without_a_shutdown() {
        let data = tempfile::tempdir().unwrap();
        let out = tempfile::tempdir().unwrap();
        let ctx = Context::new(data.path(), "h");
        let mut config = StoreConfig::new(1);
        config.segment_bytes_max = 1 << 20;
        let mut store = Store::open(&ctx.endpoint_dir("a"), config).unwrap();
        let mut endpoint = EndpointConfig::log("a");
        endpoint.kind = EndpointKind::Files;
        endpoint.path = Some(out.path().to_path_buf());
        endpoint.batch_frequency_in_seconds = Some(1);
        endpoint.max_chunk_size_in_bytes = Some(1024);
        let workers = Workers::start(ctx, std::slice::from_ref(&endpoint)).unwrap();
        // Records of about 190 bytes: a 1 KiB chunk holds 6 (the sixth passes the limit).
        append(&mut store, 0, 0..20);
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while workers.status()[0].delivered < 20 {
            assert!(
                std::time::Instant::now() < deadline,
                "{:?}",
                workers.status()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let found = files(out.path());
        assert!(found.len() >= 4, "{found:?}");
        let all: Vec<u64> = found.concat();
        let mut sorted = all.clone();
        sorted.sort();
        assert_eq!(sorted, (0..20).collect::<Vec<u64>>());
        assert_eq!(workers.status()[0].lag, Some(0));
        workers.shutdown().await;
        assert_eq!(
            files(out.path()).concat().len(),
            20,
            "no empty or extra file"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn endpoints_are_added_and_removed_on_running_workers() {
        let data = tempfile::tempdir().unwrap();
        let out = tempfile::tempdir().unwrap();
        let ctx = Context::new(data.path(), "h");
        let workers = Workers::start(ctx.clone(), &[]).unwrap();
        let mut endpoint = EndpointConfig::log("late");
        endpoint.kind = EndpointKind::Files;
        endpoint.path = Some(out.path().to_path_buf());
        // Added before its log exists: the worker waits for it.
        workers.add(&endpoint).unwrap();
        workers.add(&EndpointConfig::log("plain")).unwrap();
        assert!(workers.add(&endpoint).is_err(), "one worker per endpoint");
        assert_eq!(workers.names(), ["late"]);
        assert_eq!(workers.status()[0].lag, None);
        let mut config = StoreConfig::new(1);
        config.segment_bytes_max = 1 << 20;
        let mut store = Store::open(&ctx.endpoint_dir("late"), config).unwrap();
        append(&mut store, 0, 0..3);
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while workers.status()[0].lag != Some(3) {
            assert!(
                std::time::Instant::now() < deadline,
                "{:?}",
                workers.status()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // Removing stops the worker, which rolls its file first.
        assert!(workers.remove("late").await);
        assert!(!workers.remove("late").await);
        assert!(workers.names().is_empty());
        assert_eq!(files(out.path()), [vec![0, 1, 2]]);
        let mut bad = endpoint.clone();
        bad.path = None;
        assert!(workers
            .add(&bad)
            .unwrap_err()
            .to_string()
            .contains("needs 'path'"));
        workers.shutdown().await;
    }
}
