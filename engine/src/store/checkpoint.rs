//! Consumer-group checkpoints: per group and partition, the offset of the next record to read,
//! so that a consumer that restarts resumes where it stopped.
//!
//! Each checkpoint is a 24-byte file written atomically (temporary file, fsync, rename, fsync of
//! the directory), so a crash leaves the old or the new checkpoint, never a mix. Layout:
//! `b"INGOTCKP"`, the next offset (`u64` little-endian), xxh3_64 of the first 16 bytes.

use std::fs;
use std::path::{Path, PathBuf};

use xxhash_rust::xxh3::xxh3_64;

use super::layout::{self, write_atomically};
use super::{Offset, PartitionId, StoreError};

const MAGIC: [u8; 8] = *b"INGOTCKP";
const CHECKPOINT_BYTES: usize = 24;
/// Longest consumer group name (Event Hubs allows 50; a little more costs nothing).
pub const GROUP_NAME_BYTES_MAX: usize = 64;

/// The checkpoints of one consumer group in one data directory.
#[derive(Debug, Clone)]
pub struct Checkpoints {
    dir: PathBuf,
}

impl Checkpoints {
    /// The checkpoints of `group` (1 to 64 ASCII letters, digits, `-`, `_`, `.`; not `.` or
    /// `..`), creating its directory if needed.
    pub fn open(data_dir: &Path, group: &str) -> Result<Checkpoints, StoreError> {
        let valid = !group.is_empty()
            && group.len() <= GROUP_NAME_BYTES_MAX
            && group
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
            && group != "."
            && group != "..";
        if !valid {
            return Err(StoreError::BadGroupName);
        }
        let dir = layout::checkpoint_dir(data_dir, group);
        fs::create_dir_all(&dir).map_err(|e| StoreError::io("create", &dir, e))?;
        Ok(Checkpoints { dir })
    }

    /// The stored next offset of `partition`, `None` if the group never checkpointed it.
    pub fn load(&self, partition: PartitionId) -> Result<Option<Offset>, StoreError> {
        let path = self.dir.join(name(partition));
        let bytes = match fs::read(&path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(StoreError::io("read", path, e)),
        };
        decode(&bytes).map(Some).ok_or_else(|| StoreError::Damaged {
            path,
            reason: "not a valid checkpoint".into(),
        })
    }

    /// Stores `next` as the offset `partition` resumes from.
    pub fn store(&self, partition: PartitionId, next: Offset) -> Result<(), StoreError> {
        write_atomically(&self.dir, &name(partition), &encode(next))
    }
}

fn name(partition: PartitionId) -> String {
    format!("p{:04}", partition.0)
}

fn encode(next: Offset) -> [u8; CHECKPOINT_BYTES] {
    let mut out = [0u8; CHECKPOINT_BYTES];
    out[0..8].copy_from_slice(&MAGIC);
    out[8..16].copy_from_slice(&next.0.to_le_bytes());
    let checksum = xxh3_64(&out[0..16]);
    out[16..24].copy_from_slice(&checksum.to_le_bytes());
    out
}

fn decode(bytes: &[u8]) -> Option<Offset> {
    let bytes: &[u8; CHECKPOINT_BYTES] = bytes.try_into().ok()?;
    let (head, checksum) = bytes.split_at(16);
    if head[0..8] != MAGIC || xxh3_64(head).to_le_bytes() != checksum {
        return None;
    }
    let mut offset = [0u8; 8];
    offset.copy_from_slice(&head[8..16]);
    Some(Offset(u64::from_le_bytes(offset)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checkpoints_persist_per_group_and_partition() {
        let dir = tempfile::tempdir().unwrap();
        let a = Checkpoints::open(dir.path(), "backend-a").unwrap();
        let b = Checkpoints::open(dir.path(), "backend_b.2").unwrap();
        assert_eq!(a.load(PartitionId(0)).unwrap(), None);
        a.store(PartitionId(0), Offset(42)).unwrap();
        a.store(PartitionId(3), Offset(7)).unwrap();
        a.store(PartitionId(0), Offset(43)).unwrap();
        let again = Checkpoints::open(dir.path(), "backend-a").unwrap();
        assert_eq!(again.load(PartitionId(0)).unwrap(), Some(Offset(43)));
        assert_eq!(again.load(PartitionId(3)).unwrap(), Some(Offset(7)));
        assert_eq!(b.load(PartitionId(0)).unwrap(), None);
    }

    #[test]
    fn bad_names_and_damaged_files_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        for bad in ["", ".", "..", "a/b", "with space", &"x".repeat(65)] {
            assert!(matches!(
                Checkpoints::open(dir.path(), bad),
                Err(StoreError::BadGroupName)
            ));
        }
        let group = Checkpoints::open(dir.path(), "g").unwrap();
        group.store(PartitionId(1), Offset(5)).unwrap();
        let path = group.dir.join("p0001");
        let mut bytes = fs::read(&path).unwrap();
        for i in 0..bytes.len() {
            bytes[i] ^= 0x10;
            assert_eq!(decode(&bytes), None, "flip in byte {i}");
            bytes[i] ^= 0x10;
        }
        bytes.push(0);
        fs::write(&path, &bytes).unwrap();
        assert!(matches!(
            group.load(PartitionId(1)),
            Err(StoreError::Damaged { .. })
        ));
    }
}
