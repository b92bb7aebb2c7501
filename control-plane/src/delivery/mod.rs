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
    pub fn new(data_dir: &Path, hostname: &str) -> Context {
        Context {
            data_dir: data_dir.to_path_buf(),
            hub_name: hostname.split('.').next().unwrap_or(hostname).to_owned(),
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

/// The delivery workers of a hub.
pub struct Workers {
    ctx: Arc<Context>,
    runtime: tokio::runtime::Handle,
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
    /// Starts a worker for each `files` and `webhook` endpoint (`log` endpoints have none). Call
    /// inside the tokio runtime the workers should run on.
    pub fn start(ctx: Context, endpoints: &[EndpointConfig]) -> anyhow::Result<Workers> {
        let tls = crate::tls::client_config(None).context("set up TLS for webhooks")?;
        let workers = Workers {
            ctx: Arc::new(ctx),
            runtime: tokio::runtime::Handle::try_current()
                .context("delivery workers need a tokio runtime")?,
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
        let settings = match kind {
            EndpointKind::Log => return Ok(()),
            EndpointKind::Files => Settings::Files(FilesSettings::from_config(endpoint)?),
            EndpointKind::Webhook => Settings::Webhook(WebhookSettings::from_config(endpoint)?),
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
        let task = self.runtime.spawn(run_endpoint(
            self.ctx.clone(),
            endpoint.name.clone(),
            settings,
            self.tls.clone(),
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
