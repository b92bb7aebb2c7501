//! The sparse index of a segment: one 16-byte entry every `index_interval_bytes` of records,
//! mapping a relative offset and an enqueued time to a byte position.
//!
//! One file serves as both the offset index and the time index, because the writer keeps
//! enqueued times non-decreasing within a partition (it clamps a clock that went back), so the
//! entries are sorted by both keys. The index is derived data: it is never trusted (every
//! lookup is checked against the segment's own record headers), a damaged or missing one is
//! rebuilt by scanning the segment, and it is read with plain file reads, never mapped, so it
//! may be truncated and rewritten.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use super::format::SEGMENT_HEADER_BYTES;
use super::StoreError;

/// Bytes of one index entry.
pub const INDEX_ENTRY_BYTES: usize = 16;

/// One index entry: the record `base + relative_offset` starts at `position` and was enqueued
/// at `time_ms`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IndexEntry {
    pub relative_offset: u32,
    pub position: u32,
    pub time_ms: u64,
}

impl IndexEntry {
    pub fn encode(&self) -> [u8; INDEX_ENTRY_BYTES] {
        let mut out = [0u8; INDEX_ENTRY_BYTES];
        out[0..4].copy_from_slice(&self.relative_offset.to_le_bytes());
        out[4..8].copy_from_slice(&self.position.to_le_bytes());
        out[8..16].copy_from_slice(&self.time_ms.to_le_bytes());
        out
    }

    fn decode(bytes: &[u8; INDEX_ENTRY_BYTES]) -> IndexEntry {
        let [a, b, c, d, e, f, g, h, rest @ ..] = *bytes;
        IndexEntry {
            relative_offset: u32::from_le_bytes([a, b, c, d]),
            position: u32::from_le_bytes([e, f, g, h]),
            time_ms: u64::from_le_bytes(rest),
        }
    }
}

/// Decodes every whole entry of `bytes` (a torn trailing entry is dropped).
pub fn decode_entries(bytes: &[u8]) -> Vec<IndexEntry> {
    bytes
        .chunks_exact(INDEX_ENTRY_BYTES)
        .map(|chunk| {
            let mut entry = [0u8; INDEX_ENTRY_BYTES];
            entry.copy_from_slice(chunk);
            IndexEntry::decode(&entry)
        })
        .collect()
}

/// Whether `entries` could describe a segment of `segment_len` bytes: the first entry is the
/// first record, and offsets, positions and times all increase. A plausible index can still
/// point at the wrong record; lookups check the record they land on.
pub fn is_plausible(entries: &[IndexEntry], segment_len: usize) -> bool {
    let Some(first) = entries.first() else {
        return true;
    };
    if first.relative_offset != 0 || first.position as usize != SEGMENT_HEADER_BYTES {
        return false;
    }
    entries.windows(2).all(|w| {
        w[0].relative_offset < w[1].relative_offset
            && w[0].position < w[1].position
            && w[0].time_ms <= w[1].time_ms
    }) && entries.iter().all(|e| (e.position as usize) < segment_len)
}

/// The last entry at or before `relative_offset`.
pub fn floor_offset(entries: &[IndexEntry], relative_offset: u32) -> Option<IndexEntry> {
    let count = entries.partition_point(|e| e.relative_offset <= relative_offset);
    count.checked_sub(1).map(|i| entries[i])
}

/// The last entry enqueued strictly before `time_ms`: the first record at or after `time_ms`
/// lies after it.
pub fn floor_time(entries: &[IndexEntry], time_ms: u64) -> Option<IndexEntry> {
    let count = entries.partition_point(|e| e.time_ms < time_ms);
    count.checked_sub(1).map(|i| entries[i])
}

/// Decides which records get an entry: the first one, then one at least every `interval`
/// bytes.
#[derive(Debug, Clone)]
pub struct IndexPolicy {
    interval_bytes: usize,
    last_position: Option<usize>,
}

impl IndexPolicy {
    pub fn new(interval_bytes: u32) -> IndexPolicy {
        IndexPolicy {
            interval_bytes: interval_bytes as usize,
            last_position: None,
        }
    }

    pub fn resume(interval_bytes: u32, last: Option<IndexEntry>) -> IndexPolicy {
        IndexPolicy {
            interval_bytes: interval_bytes as usize,
            last_position: last.map(|e| e.position as usize),
        }
    }

    /// Returns the entry for a record at `position`, if it deserves one.
    pub fn observe(
        &mut self,
        position: usize,
        relative_offset: u32,
        time_ms: u64,
    ) -> Option<IndexEntry> {
        let due = self
            .last_position
            .is_none_or(|last| position >= last + self.interval_bytes);
        if !due {
            return None;
        }
        self.last_position = Some(position);
        Some(IndexEntry {
            relative_offset,
            position: position as u32,
            time_ms,
        })
    }
}

/// Reads an index file; a missing file is an empty index.
pub fn read_index(path: &Path) -> Result<Vec<IndexEntry>, StoreError> {
    let mut bytes = Vec::new();
    match File::open(path) {
        Ok(mut file) => {
            file.read_to_end(&mut bytes)
                .map_err(|e| StoreError::io("read", path, e))?;
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(StoreError::io("open", path, e)),
    }
    Ok(decode_entries(&bytes))
}

/// Appends entries of the active segment's index. Entries are buffered and written once per
/// batch; no fsync, because recovery rebuilds the active segment's index from the segment.
#[derive(Debug)]
pub struct IndexWriter {
    path: PathBuf,
    file: File,
    pending: Vec<u8>,
}

impl IndexWriter {
    /// Replaces the index at `path` with `entries` and opens it for appending.
    pub fn create(path: &Path, entries: &[IndexEntry]) -> Result<IndexWriter, StoreError> {
        let mut file = OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(true)
            .open(path)
            .map_err(|e| StoreError::io("create", path, e))?;
        let bytes: Vec<u8> = entries.iter().flat_map(|e| e.encode()).collect();
        file.write_all(&bytes)
            .map_err(|e| StoreError::io("write", path, e))?;
        Ok(IndexWriter {
            path: path.to_path_buf(),
            file,
            pending: Vec::new(),
        })
    }

    pub fn push(&mut self, entry: IndexEntry) {
        self.pending.extend_from_slice(&entry.encode());
    }

    /// Writes the buffered entries. A failure loses nothing that matters: the index is rebuilt
    /// on the next open, and readers fall back to scanning.
    pub fn write_pending(&mut self) -> Result<(), StoreError> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let result = self.file.write_all(&self.pending);
        self.pending.clear();
        result.map_err(|e| StoreError::io("write", &self.path, e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(relative_offset: u32, position: u32, time_ms: u64) -> IndexEntry {
        IndexEntry {
            relative_offset,
            position,
            time_ms,
        }
    }

    #[test]
    fn entries_round_trip_and_torn_tails_are_dropped() {
        let entries = vec![entry(0, 64, 5), entry(7, 4200, 9)];
        let mut bytes: Vec<u8> = entries.iter().flat_map(|e| e.encode()).collect();
        assert_eq!(decode_entries(&bytes), entries);
        bytes.pop();
        assert_eq!(decode_entries(&bytes), entries[..1]);
    }

    #[test]
    fn lookups_find_the_floor() {
        let entries = vec![entry(0, 64, 10), entry(10, 5000, 20), entry(20, 9000, 20)];
        assert_eq!(floor_offset(&entries, 0), Some(entries[0]));
        assert_eq!(floor_offset(&entries, 15), Some(entries[1]));
        assert_eq!(floor_offset(&entries, 99), Some(entries[2]));
        assert_eq!(floor_time(&entries, 10), None);
        assert_eq!(floor_time(&entries, 11), Some(entries[0]));
        assert_eq!(floor_time(&entries, 20), Some(entries[0]));
        assert_eq!(floor_time(&entries, 21), Some(entries[2]));
    }

    #[test]
    fn implausible_indexes_are_refused() {
        assert!(is_plausible(&[], 100));
        assert!(is_plausible(&[entry(0, 64, 1), entry(3, 200, 1)], 4096));
        assert!(!is_plausible(&[entry(1, 64, 1)], 4096));
        assert!(!is_plausible(&[entry(0, 64, 1), entry(0, 200, 1)], 4096));
        assert!(!is_plausible(&[entry(0, 64, 2), entry(3, 200, 1)], 4096));
        assert!(!is_plausible(&[entry(0, 64, 1), entry(3, 9000, 1)], 4096));
    }

    #[test]
    fn the_policy_spaces_entries() {
        let mut policy = IndexPolicy::new(100);
        assert!(policy.observe(64, 0, 1).is_some());
        assert!(policy.observe(128, 1, 1).is_none());
        assert!(policy.observe(164, 2, 1).is_some());
        assert!(policy.observe(200, 3, 1).is_none());
    }
}
