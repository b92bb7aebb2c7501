//! The segment store: partitioned, append-only event logs on memory-mapped segment files, and
//! the reader that backends use to tail them in place.
//!
//! The byte layout is specified in `docs/storage-format.md`; [`format`] and [`recover`] are its
//! sans-IO implementation (byte slices in, values out), so they are tested on every truncation
//! point and bit flip without files. The rest is the file-facing edge:
//!
//! - [`Store`] / [`PartitionLog`]: the writer. One process owns a data directory (an exclusive
//!   `flock` on each partition directory); each partition is owned by one shard, which calls
//!   [`PartitionLog::append_batch`] and gets offsets back once the batch is as durable as the
//!   [`Fsync`] policy promises.
//! - [`Reader`] / [`PartitionReader`]: any number of readers in any process, mapping segments
//!   read-only and treating every byte as untrusted (checksum, then rkyv validation).
//! - [`Checkpoints`]: per consumer group and partition, the next offset to read.
//! - [`verify()`]: checks every checksum of a data directory and reports damage.
//!
//! The trade-off: writing through a shared mapping makes an append a `memcpy` (no syscall per
//! batch unless the policy asks for a flush), and lets readers see a record as soon as its
//! length word is published, at the price of an unsafe boundary. That boundary lives in
//! [`mmap`](self::mmap) alone, and its soundness rests on three rules: segments are created at
//! full size and every page is write-faulted (its block reserved) on the writer's helper thread
//! before any append touches it (no SIGBUS, no ENOSPC on a page fault on the append path), no
//! mapped file is ever truncated, and a record's bytes never change once its length word is
//! published.
//!
//! What appending costs besides the `memcpy` is the kernel's: a page of page cache allocated,
//! zeroed and write-faulted per 4 KiB, all on the helper thread, which shares the shard's core.
//! `prepare.rs` says why segments are sparse (not `fallocate`d) and why sealed segments leave
//! the page cache (the writer's footprint stays at about three segments, so each new segment
//! reuses memory freed a moment before); perf/README.md has the measurements.

mod checkpoint;
pub mod format;
mod index;
mod layout;
mod log;
mod mmap;
mod prepare;
mod reader;
pub mod recover;
mod verify;

use std::io;
use std::path::PathBuf;
use std::time::Duration;

pub use checkpoint::Checkpoints;
pub use format::{ArchivedMessage, ArchivedProperty, MessageRef, PropertyRef};
pub use log::{OffsetRange, PartitionLog, RetentionReport, Store};
pub use reader::{PartitionReader, ReadError, Reader, Record, StartAt};
pub use verify::{verify, Damage, DamageKind, VerifyReport};

/// Most partitions a data directory can have (directory names are `p0000` to `p1023`).
pub const PARTITIONS_MAX: u32 = 1024;
/// Smallest allowed `segment_bytes_max`: tests roll often with it; production uses far more.
pub const SEGMENT_BYTES_MAX_FLOOR: u64 = 64 * 1024;
/// Largest allowed `segment_bytes_max`: index entries store positions as `u32`.
pub const SEGMENT_BYTES_MAX_CEILING: u64 = (4 << 30) - 4096;
/// Default segment size, as Kafka, Iggy and Fluvio use.
pub const SEGMENT_BYTES_MAX_DEFAULT: u64 = 1 << 30;
/// Default retention by age: Azure's built-in endpoint keeps events for 7 days by default.
pub const RETENTION_AGE_DEFAULT: Duration = Duration::from_secs(7 * 24 * 3600);
/// Default retention by size, per partition.
pub const RETENTION_BYTES_MAX_DEFAULT: u64 = 64 << 30;
/// Bytes between two sparse index entries (Kafka's `log.index.interval.bytes`).
pub const INDEX_INTERVAL_BYTES_DEFAULT: u32 = 4096;
/// Pages are the unit of mapping and of `msync`.
pub const PAGE_BYTES: u64 = 4096;
/// How long a following reader sleeps when it has reached the end of the log; this is the
/// added tail latency (on average half of it), for one atomic load per poll.
pub const FOLLOW_POLL_INTERVAL: Duration = Duration::from_millis(1);

const _: () = assert!(SEGMENT_BYTES_MAX_FLOOR % PAGE_BYTES == 0);
const _: () = assert!(SEGMENT_BYTES_MAX_CEILING % PAGE_BYTES == 0);
const _: () = assert!(SEGMENT_BYTES_MAX_CEILING <= u32::MAX as u64);
const _: () = assert!(
    format::record_bytes(format::RECORD_PAYLOAD_BYTES_MAX) + format::SEGMENT_HEADER_BYTES
        <= SEGMENT_BYTES_MAX_DEFAULT as usize
);

/// A position in one partition's log: dense (every record takes the next one) and monotonic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Offset(pub u64);

impl Offset {
    /// The offset after this one.
    pub fn next(self) -> Offset {
        Offset(self.0 + 1)
    }
}

impl std::fmt::Display for Offset {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

/// A partition of the event log, `0..partitions`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PartitionId(pub u32);

impl std::fmt::Display for PartitionId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

/// The partition a device's messages go to: `xxh3_64(device_id) % partitions`. Stable across
/// restarts because xxh3 is seedless and the partition count of a data directory cannot change.
pub fn partition_of(device_id: &str, partitions: u32) -> PartitionId {
    assert!(partitions > 0);
    let hash = xxhash_rust::xxh3::xxh3_64(device_id.as_bytes());
    PartitionId((hash % u64::from(partitions)) as u32)
}

/// How durable an appended batch is when `append_batch` returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fsync {
    /// Leave write-back to the kernel: a process crash loses nothing (the page cache holds the
    /// data), a power loss loses what the kernel had not written.
    Never,
    /// A background thread flushes every this many milliseconds: a power loss loses at most
    /// about that much.
    Interval(u32),
    /// One `msync` covers each batch before `append_batch` returns (group commit).
    Always,
}

impl std::str::FromStr for Fsync {
    type Err = StoreError;

    /// Parses `never`, `always` or `interval:MS`, the config file's spelling.
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text {
            "never" => Ok(Fsync::Never),
            "always" => Ok(Fsync::Always),
            _ => match text.strip_prefix("interval:").map(str::parse::<u32>) {
                Some(Ok(ms)) if ms > 0 => Ok(Fsync::Interval(ms)),
                _ => Err(StoreError::Config(
                    "fsync must be never, always or interval:MS",
                )),
            },
        }
    }
}

/// Settings of a store, validated once by [`StoreConfig::validate`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreConfig {
    /// Partitions of the event log; fixed for the life of a data directory.
    pub partitions: u32,
    /// Size of each segment file, preallocated up front; a segment rolls when the next record
    /// does not fit.
    pub segment_bytes_max: u64,
    /// Bytes between sparse index entries.
    pub index_interval_bytes: u32,
    pub fsync: Fsync,
    /// Sealed segments whose newest record is older than this are deleted.
    pub retention_age: Duration,
    /// Oldest sealed segments are deleted while a partition's files take more than this.
    pub retention_bytes_max: u64,
}

impl StoreConfig {
    /// The defaults, with `partitions` partitions.
    pub fn new(partitions: u32) -> StoreConfig {
        StoreConfig {
            partitions,
            segment_bytes_max: SEGMENT_BYTES_MAX_DEFAULT,
            index_interval_bytes: INDEX_INTERVAL_BYTES_DEFAULT,
            fsync: Fsync::Always,
            retention_age: RETENTION_AGE_DEFAULT,
            retention_bytes_max: RETENTION_BYTES_MAX_DEFAULT,
        }
    }

    /// Checks every bound; the store never panics on configuration.
    pub fn validate(&self) -> Result<(), StoreError> {
        if self.partitions == 0 || self.partitions > PARTITIONS_MAX {
            return Err(StoreError::Config("partitions must be between 1 and 1024"));
        }
        if !(SEGMENT_BYTES_MAX_FLOOR..=SEGMENT_BYTES_MAX_CEILING).contains(&self.segment_bytes_max)
        {
            return Err(StoreError::Config(
                "segment_bytes_max must be between 64 KiB and 4 GiB",
            ));
        }
        if self.segment_bytes_max % PAGE_BYTES != 0 {
            return Err(StoreError::Config(
                "segment_bytes_max must be a multiple of 4096",
            ));
        }
        if self.index_interval_bytes < 64 {
            return Err(StoreError::Config(
                "index_interval_bytes must be at least 64",
            ));
        }
        if self.fsync == Fsync::Interval(0) {
            return Err(StoreError::Config("fsync interval must be at least 1 ms"));
        }
        Ok(())
    }
}

/// Operating errors of the store. Device faults never reach it; programmer errors are asserts.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    #[error("failed to {context} {path}: {source}")]
    Io {
        context: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    #[error(
        "disk full: cannot {context} {path} ({source}); nothing written was damaged, \
         appends resume when space returns"
    )]
    DiskFull {
        context: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    #[error("invalid store configuration: {0}")]
    Config(&'static str),
    #[error(
        "the data directory {path} was created with {existing} partitions and this configuration \
         asks for {requested}; changing it would move devices to other partitions and break their \
         order, so keep partitions = {existing} or use a new data directory"
    )]
    PartitionCountChanged {
        path: PathBuf,
        existing: u32,
        requested: u32,
    },
    #[error("{0} is locked by another writer (another hub uses this data directory)")]
    Locked(PathBuf),
    #[error("{0} holds no Ingot event store (no events/store.meta)")]
    NotAStore(PathBuf),
    #[error("{path} is damaged: {reason}")]
    Damaged { path: PathBuf, reason: String },
    #[error("no partition {0} in this store")]
    UnknownPartition(PartitionId),
    #[error("a message archives to {0} bytes, more than a record or a segment can hold")]
    RecordTooLarge(usize),
    #[error("consumer group names are 1 to 64 ASCII letters, digits, '-', '_' or '.'")]
    BadGroupName,
}

impl StoreError {
    /// An IO error with what was being done and to which file; ENOSPC becomes `DiskFull`.
    fn io(context: &'static str, path: impl Into<PathBuf>, source: io::Error) -> StoreError {
        let path = path.into();
        if source.kind() == io::ErrorKind::StorageFull {
            StoreError::DiskFull {
                context,
                path,
                source,
            }
        } else {
            StoreError::Io {
                context,
                path,
                source,
            }
        }
    }
}

/// Milliseconds since the Unix epoch, the store's clock unit (Azure's enqueued time has
/// millisecond precision). Times before the epoch count as 0.
pub fn unix_ms(time: std::time::SystemTime) -> u64 {
    time.duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partition_of_is_stable_and_spread() {
        // Pinned values: a change here would move every device of an existing data directory.
        assert_eq!(partition_of("dev1", 4), partition_of("dev1", 4));
        let expected = xxhash_rust::xxh3::xxh3_64(b"dev1") % 4;
        assert_eq!(partition_of("dev1", 4), PartitionId(expected as u32));
        let mut counts = [0u32; 4];
        for i in 0..4000 {
            counts[partition_of(&format!("device-{i}"), 4).0 as usize] += 1;
        }
        assert!(
            counts.iter().all(|&c| (800..1200).contains(&c)),
            "{counts:?}"
        );
        assert_eq!(partition_of("anything", 1), PartitionId(0));
    }

    #[test]
    fn fsync_parses_the_config_spelling() {
        assert_eq!("never".parse::<Fsync>().unwrap(), Fsync::Never);
        assert_eq!("always".parse::<Fsync>().unwrap(), Fsync::Always);
        assert_eq!(
            "interval:250".parse::<Fsync>().unwrap(),
            Fsync::Interval(250)
        );
        for bad in ["", "interval:", "interval:0", "interval:x", "sometimes"] {
            assert!(bad.parse::<Fsync>().is_err(), "{bad}");
        }
    }

    #[test]
    fn config_bounds_are_checked() {
        assert!(StoreConfig::new(4).validate().is_ok());
        let mut config = StoreConfig::new(0);
        assert!(config.validate().is_err());
        config.partitions = 1025;
        assert!(config.validate().is_err());
        config = StoreConfig::new(1);
        config.segment_bytes_max = 65 * 1024 + 1;
        assert!(config.validate().is_err());
        config.segment_bytes_max = 1024;
        assert!(config.validate().is_err());
        config.segment_bytes_max = SEGMENT_BYTES_MAX_FLOOR;
        assert!(config.validate().is_ok());
    }
}
