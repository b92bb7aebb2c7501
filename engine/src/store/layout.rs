//! Where things live in a data directory, and the small metadata file that pins the partition
//! count.
//!
//! ```text
//! {data_dir}/events/store.meta                     format version and partition count
//! {data_dir}/events/p0003/00000000000000000000.log segment, named by its base offset
//! {data_dir}/events/p0003/00000000000000000000.index  sparse offset + time index
//! {data_dir}/events/p0003/next.prepared            the next segment, preallocated, unnamed yet
//! {data_dir}/events/checkpoints/{group}/p0003      consumer group checkpoint
//! ```

use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};

use rustix::fs::{flock, FlockOperation};

use super::{format::FORMAT_VERSION, Offset, PartitionId, StoreError};

const META_NAME: &str = "store.meta";
pub(super) const PREPARED_NAME: &str = "next.prepared";

pub(super) fn events_dir(data_dir: &Path) -> PathBuf {
    data_dir.join("events")
}

pub(super) fn partition_dir(data_dir: &Path, partition: PartitionId) -> PathBuf {
    events_dir(data_dir).join(format!("p{:04}", partition.0))
}

pub(super) fn segment_path(dir: &Path, base: Offset) -> PathBuf {
    dir.join(format!("{:020}.log", base.0))
}

pub(super) fn index_path(dir: &Path, base: Offset) -> PathBuf {
    dir.join(format!("{:020}.index", base.0))
}

pub(super) fn checkpoint_dir(data_dir: &Path, group: &str) -> PathBuf {
    events_dir(data_dir).join("checkpoints").join(group)
}

/// Base offsets of the segments in a partition directory, ascending. Files that are not named
/// exactly `{20 digits}.log` are ignored.
pub(super) fn list_segments(dir: &Path) -> Result<Vec<Offset>, StoreError> {
    let entries = fs::read_dir(dir).map_err(|e| StoreError::io("list", dir, e))?;
    let mut bases = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| StoreError::io("list", dir, e))?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        let Some(digits) = name.strip_suffix(".log") else {
            continue;
        };
        if digits.len() == 20 && digits.bytes().all(|b| b.is_ascii_digit()) {
            if let Ok(base) = digits.parse::<u64>() {
                bases.push(Offset(base));
            }
        }
    }
    bases.sort_unstable();
    Ok(bases)
}

/// Reads the partition count of an existing store; `Ok(None)` when there is no metadata yet.
pub(super) fn read_meta(data_dir: &Path) -> Result<Option<u32>, StoreError> {
    let path = events_dir(data_dir).join(META_NAME);
    let text = match fs::read_to_string(&path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(StoreError::io("read", path, e)),
    };
    let damaged = |reason: &str| StoreError::Damaged {
        path: path.clone(),
        reason: reason.into(),
    };
    let mut lines = text.lines();
    if lines.next() != Some("ingot-event-store") {
        return Err(damaged("the first line is not `ingot-event-store`"));
    }
    let version = lines
        .next()
        .and_then(|l| l.strip_prefix("format "))
        .and_then(|v| v.parse().ok());
    if version != Some(FORMAT_VERSION) {
        return Err(damaged("unknown or missing format version"));
    }
    let partitions = lines
        .next()
        .and_then(|l| l.strip_prefix("partitions "))
        .and_then(|v| v.parse().ok());
    match partitions {
        Some(p) if (1..=super::PARTITIONS_MAX).contains(&p) => Ok(Some(p)),
        _ => Err(damaged("missing or invalid partition count")),
    }
}

/// Writes the metadata file atomically (temporary file, fsync, rename, fsync of the directory).
pub(super) fn write_meta(data_dir: &Path, partitions: u32) -> Result<(), StoreError> {
    let dir = events_dir(data_dir);
    let text = format!("ingot-event-store\nformat {FORMAT_VERSION}\npartitions {partitions}\n");
    write_atomically(&dir, META_NAME, text.as_bytes())
}

/// Replaces `dir/name` with `bytes` so that a crash leaves either the old or the new content.
pub(super) fn write_atomically(dir: &Path, name: &str, bytes: &[u8]) -> Result<(), StoreError> {
    let path = dir.join(name);
    let tmp = dir.join(format!("{name}.tmp"));
    let mut file = File::create(&tmp).map_err(|e| StoreError::io("create", &tmp, e))?;
    file.write_all(bytes)
        .map_err(|e| StoreError::io("write", &tmp, e))?;
    file.sync_all()
        .map_err(|e| StoreError::io("sync", &tmp, e))?;
    fs::rename(&tmp, &path).map_err(|e| StoreError::io("rename", &path, e))?;
    sync_dir(dir)
}

/// fsync of a directory, so that a created, renamed or deleted entry survives a power loss.
pub(super) fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| StoreError::io("sync directory", dir, e))
}

/// An exclusive `flock` on a partition directory, held for the writer's lifetime: the first
/// rule of the mmap soundness story. Released when dropped (the file descriptor closes).
#[derive(Debug)]
pub(super) struct DirLock {
    _dir: File,
}

impl DirLock {
    pub(super) fn exclusive(dir: &Path) -> Result<DirLock, StoreError> {
        let file = File::open(dir).map_err(|e| StoreError::io("open", dir, e))?;
        match flock(&file, FlockOperation::NonBlockingLockExclusive) {
            Ok(()) => Ok(DirLock { _dir: file }),
            Err(rustix::io::Errno::WOULDBLOCK) => Err(StoreError::Locked(dir.to_path_buf())),
            Err(e) => Err(StoreError::io("lock", dir, e.into())),
        }
    }
}

/// Whether a writer holds the partition directory now (a shared lock would block).
pub(super) fn writer_active(dir: &Path) -> bool {
    let Ok(file) = File::open(dir) else {
        return false;
    };
    match flock(&file, FlockOperation::NonBlockingLockShared) {
        Ok(()) => false,
        Err(_) => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_zero_padded_and_listed_in_order() {
        let dir = tempfile::tempdir().unwrap();
        for base in [20u64, 0, 3] {
            File::create(segment_path(dir.path(), Offset(base))).unwrap();
        }
        File::create(dir.path().join("garbage.log")).unwrap();
        File::create(dir.path().join(PREPARED_NAME)).unwrap();
        File::create(index_path(dir.path(), Offset(0))).unwrap();
        assert_eq!(
            segment_path(dir.path(), Offset(3)).file_name().unwrap(),
            "00000000000000000003.log"
        );
        assert_eq!(
            list_segments(dir.path()).unwrap(),
            vec![Offset(0), Offset(3), Offset(20)]
        );
    }

    #[test]
    fn meta_round_trip_and_damage() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(read_meta(dir.path()).unwrap(), None);
        fs::create_dir_all(events_dir(dir.path())).unwrap();
        write_meta(dir.path(), 8).unwrap();
        assert_eq!(read_meta(dir.path()).unwrap(), Some(8));
        fs::write(events_dir(dir.path()).join(META_NAME), "something else\n").unwrap();
        assert!(matches!(
            read_meta(dir.path()),
            Err(StoreError::Damaged { .. })
        ));
    }

    #[test]
    fn the_lock_is_exclusive() {
        let dir = tempfile::tempdir().unwrap();
        assert!(!writer_active(dir.path()));
        let lock = DirLock::exclusive(dir.path()).unwrap();
        assert!(matches!(
            DirLock::exclusive(dir.path()),
            Err(StoreError::Locked(_))
        ));
        assert!(writer_active(dir.path()));
        drop(lock);
        assert!(DirLock::exclusive(dir.path()).is_ok());
    }
}
