//! What both kinds of worker do with one partition of an endpoint's log: resume at the
//! checkpoint, read a bounded batch ahead, checkpoint after delivery, wait without spinning.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use ingot_engine::store::Checkpoints;
use ingot_engine::store::{Offset, PartitionId, PartitionReader, ReadError, Reader, StartAt};
use tokio::sync::watch;

use super::{Counters, CHECKPOINT_GROUP};

/// Shortest and longest wait between looks at an idle partition: the wait doubles while the
/// partition stays idle, so an idle hub costs a few wake-ups per second per partition.
const IDLE_MIN: Duration = Duration::from_millis(5);
const IDLE_MAX: Duration = Duration::from_millis(200);
/// Wait after a failure that is not the receiver's (the file system, the log).
pub(crate) const ERROR_WAIT: Duration = Duration::from_secs(1);

/// One record read ahead: its offset and its JSON (Azure's encoding).
#[derive(Debug, Clone)]
pub(crate) struct Item {
    pub offset: Offset,
    pub json: Vec<u8>,
}

#[derive(Debug)]
pub(crate) struct Base {
    pub endpoint: String,
    pub dir: PathBuf,
    pub reader: Reader,
    pub id: PartitionId,
    pub counters: Arc<Counters>,
    pub stop: watch::Receiver<bool>,
}

/// A partition being delivered.
pub(crate) struct Tail {
    pub base: Base,
    checkpoints: Checkpoints,
    reader: PartitionReader,
    /// The stored checkpoint: where a rewind goes back to.
    committed: Offset,
    idle: Duration,
}

/// Waits `wait` or until the stop signal; `true` when stopping.
pub(crate) async fn stop_or_sleep(stop: &mut watch::Receiver<bool>, wait: Duration) -> bool {
    if *stop.borrow() {
        return true;
    }
    tokio::select! {
        _ = tokio::time::sleep(wait) => {}
        changed = stop.changed() => {
            // The sender is gone (the workers were dropped without a shutdown): stop too.
            if changed.is_err() {
                return true;
            }
        }
    }
    *stop.borrow()
}

impl Tail {
    /// Opens the partition at its checkpoint (the start of the log if it has none), retrying
    /// until it succeeds or the worker stops.
    pub async fn open(mut base: Base) -> Option<Tail> {
        loop {
            match Self::try_open(&base) {
                Ok((checkpoints, reader, committed)) => {
                    base.counters.progress(base.id, committed.0);
                    return Some(Tail {
                        base,
                        checkpoints,
                        reader,
                        committed,
                        idle: IDLE_MIN,
                    });
                }
                Err(e) => {
                    tracing::warn!(endpoint = %base.endpoint, partition = base.id.0, "cannot open the endpoint's log for delivery: {e:#}");
                    if stop_or_sleep(&mut base.stop, ERROR_WAIT).await {
                        return None;
                    }
                }
            }
        }
    }

    fn try_open(base: &Base) -> anyhow::Result<(Checkpoints, PartitionReader, Offset)> {
        let checkpoints = Checkpoints::open(&base.dir, CHECKPOINT_GROUP)?;
        let committed = checkpoints.load(base.id)?;
        let start = committed.map_or(StartAt::Start, StartAt::Offset);
        let reader = base.reader.partition(base.id, start)?;
        let committed = committed.unwrap_or(reader.next_offset());
        Ok((checkpoints, reader, committed))
    }

    pub fn stopping(&self) -> bool {
        *self.base.stop.borrow()
    }

    /// Up to `max_records` records, stopping early once `max_bytes` of JSON are read (so at least
    /// one record). Empty when nothing new is in the log.
    pub fn read(&mut self, max_records: usize, max_bytes: usize) -> Vec<Item> {
        let mut items = Vec::new();
        let mut bytes = 0;
        while items.len() < max_records && bytes < max_bytes {
            match self.reader.next() {
                Ok(Some(record)) => {
                    let mut json = Vec::with_capacity(256 + record.message.body().len() * 4 / 3);
                    super::record::write_record(&record, &mut json);
                    bytes += json.len();
                    items.push(Item {
                        offset: record.offset,
                        json,
                    });
                }
                Ok(None) => break,
                Err(e) => {
                    self.read_error(e);
                    break;
                }
            }
        }
        items
    }

    fn read_error(&mut self, error: ReadError) {
        match error {
            ReadError::Corrupt { .. } => {
                tracing::warn!(endpoint = %self.base.endpoint, partition = self.base.id.0,
                    "damaged data in the endpoint's log, passing over it: {error}");
                let _ = self.reader.skip_damaged();
            }
            other => {
                // A segment deleted by retention under the reader, for example: look again
                // from where the reader is.
                tracing::warn!(endpoint = %self.base.endpoint, partition = self.base.id.0,
                    "reading the endpoint's log: {other}");
                let at = self.reader.next_offset();
                if let Ok(reader) = self
                    .base
                    .reader
                    .partition(self.base.id, StartAt::Offset(at))
                {
                    self.reader = reader;
                }
            }
        }
    }

    /// Waits before the next look at an idle partition (longer each idle time, up to
    /// `limit`); `true` when stopping.
    pub async fn idle(&mut self, limit: Duration) -> bool {
        let wait = self.idle.min(limit);
        self.idle = (self.idle * 2).min(IDLE_MAX);
        stop_or_sleep(&mut self.base.stop, wait).await
    }

    /// Data arrived: the next idle wait starts short again.
    pub fn busy(&mut self) {
        self.idle = IDLE_MIN;
    }

    /// Durably records that everything before `next` is delivered.
    pub async fn commit(&mut self, next: Offset) -> anyhow::Result<()> {
        let checkpoints = self.checkpoints.clone();
        let id = self.base.id;
        tokio::task::spawn_blocking(move || checkpoints.store(id, next)).await??;
        self.committed = next;
        self.base.counters.progress(id, next.0);
        Ok(())
    }

    /// Goes back to the last checkpoint (after a delivery that failed half way).
    pub fn rewind(&mut self) {
        if let Ok(reader) = self
            .base
            .reader
            .partition(self.base.id, StartAt::Offset(self.committed))
        {
            self.reader = reader;
        }
    }

    /// The first offset still stored in the log (what retention kept).
    pub fn log_start(&self) -> Option<Offset> {
        self.base
            .reader
            .partition(self.base.id, StartAt::Start)
            .ok()
            .map(|r| r.next_offset())
    }
}
