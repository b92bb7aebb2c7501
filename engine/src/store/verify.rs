//! `verify`: reads every segment of a data directory and checks every record (checksum,
//! sequence, archive), every segment header, and that nothing but zeros follows the last
//! record of a segment. It is what `ingot log verify` runs; it only reads, so it is safe while
//! the hub runs (the tail of a partition being written is then checked as far as it was
//! published when verify looked).

use std::fs::File;
use std::path::Path;

use super::format::{
    access_message, decode_segment_header, RECORD_HEADER_BYTES, SEGMENT_HEADER_BYTES,
};
use super::layout;
use super::mmap::ReadMap;
use super::recover::{first_nonzero, resync, scan_from, Stop};
use super::{Offset, PartitionId, StoreError};

/// What kind of damage was found.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum DamageKind {
    /// The segment header is wrong; nothing in the segment can be trusted.
    SegmentHeader(String),
    /// A record fails its checks; records after it may still be fine (see the next damage or
    /// the record count).
    Record(String),
    /// A record's checksum matched but its archived message does not validate.
    Archive,
    /// Nonzero bytes after the last valid record. In the last segment of a partition whose
    /// writer is not running this is a torn tail, which recovery cuts on the next start.
    TrailingGarbage,
    /// Offsets are missing between two segments.
    Gap { expected: Offset, found: Offset },
}

/// One damaged place.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Damage {
    pub partition: PartitionId,
    /// Base offset of the segment (its file name).
    pub segment: Offset,
    /// The offset the damaged record should have had.
    pub offset: Offset,
    /// Byte position in the segment file.
    pub position: u64,
    pub kind: DamageKind,
}

impl std::fmt::Display for Damage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "partition {} segment {:020}.log offset {} byte {}: {:?}",
            self.partition.0, self.segment.0, self.offset, self.position, self.kind
        )
    }
}

/// The result of [`verify`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VerifyReport {
    pub partitions: u32,
    pub segments: u64,
    pub records: u64,
    pub damage: Vec<Damage>,
}

impl VerifyReport {
    pub fn is_clean(&self) -> bool {
        self.damage.is_empty()
    }
}

/// Checks every segment of every partition of `data_dir`.
pub fn verify(data_dir: &Path) -> Result<VerifyReport, StoreError> {
    let Some(partitions) = layout::read_meta(data_dir)? else {
        return Err(StoreError::NotAStore(data_dir.to_path_buf()));
    };
    let mut report = VerifyReport {
        partitions,
        ..VerifyReport::default()
    };
    for p in 0..partitions {
        verify_partition(data_dir, PartitionId(p), &mut report)?;
    }
    Ok(report)
}

fn verify_partition(
    data_dir: &Path,
    partition: PartitionId,
    report: &mut VerifyReport,
) -> Result<(), StoreError> {
    let dir = layout::partition_dir(data_dir, partition);
    let live = layout::writer_active(&dir);
    let bases = layout::list_segments(&dir)?;
    let mut expected: Option<Offset> = None;
    for (i, &base) in bases.iter().enumerate() {
        let last = i + 1 == bases.len();
        report.segments += 1;
        let mut damage = |offset: Offset, position: usize, kind: DamageKind| {
            report.damage.push(Damage {
                partition,
                segment: base,
                offset,
                position: position as u64,
                kind,
            });
        };
        if let Some(expected) = expected.filter(|&e| e != base) {
            damage(
                expected,
                0,
                DamageKind::Gap {
                    expected,
                    found: base,
                },
            );
        }
        let path = layout::segment_path(&dir, base);
        let file = File::open(&path).map_err(|e| StoreError::io("open", &path, e))?;
        let map = ReadMap::new(&file).map_err(|e| StoreError::io("map", &path, e))?;
        let bytes = map.bytes(0, map.len()).unwrap_or_default();
        match decode_segment_header(bytes) {
            Ok(header) if header.base_offset == base => {}
            Ok(header) => {
                let kind =
                    DamageKind::SegmentHeader(format!("names base offset {}", header.base_offset));
                damage(base, 0, kind);
                continue;
            }
            Err(e) => {
                damage(base, 0, DamageKind::SegmentHeader(e.to_string()));
                continue;
            }
        }
        let mut position = SEGMENT_HEADER_BYTES;
        let mut next = base;
        loop {
            let scan = scan_from(bytes, base, position, next, None);
            report.records += scan.records;
            // Records that pass the checksum are also validated as archives, as readers will.
            let mut at = position;
            for _ in 0..scan.records {
                let len =
                    u32::from_le_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]]);
                let payload =
                    &bytes[at + RECORD_HEADER_BYTES..at + RECORD_HEADER_BYTES + len as usize];
                if access_message(payload).is_err() {
                    let offset =
                        u64::from_le_bytes(bytes[at + 8..at + 16].try_into().unwrap_or_default());
                    damage(Offset(offset), at, DamageKind::Archive);
                }
                at += super::format::record_bytes(len as usize);
            }
            position = scan.end;
            next = scan.next_offset;
            match scan.stop {
                Stop::End | Stop::Full => {
                    let garbage = first_nonzero(bytes, position);
                    // The live tail may hold a record being written right now.
                    if let Some(at) = garbage.filter(|_| !(last && live)) {
                        damage(next, at, DamageKind::TrailingGarbage);
                    }
                    break;
                }
                Stop::Invalid(invalid) => {
                    damage(next, position, DamageKind::Record(invalid.to_string()));
                    match resync(bytes, position, next) {
                        Some((found, header)) => {
                            position = found;
                            next = header.offset;
                        }
                        None => break,
                    }
                }
            }
        }
        expected = Some(next);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{Fsync, MessageRef, Store, StoreConfig};

    #[test]
    fn a_clean_store_verifies_and_every_damage_is_located() {
        let dir = tempfile::tempdir().unwrap();
        let mut config = StoreConfig::new(2);
        config.segment_bytes_max = 64 * 1024;
        config.fsync = Fsync::Never;
        let mut store = Store::open(dir.path(), config).unwrap();
        let body = vec![b'z'; 300];
        let message = MessageRef {
            system_properties: &[],
            application_properties: &[],
            body: &body,
        };
        for _ in 0..600 {
            store
                .append_batch(PartitionId(1), &[message, message], 1000)
                .unwrap();
        }
        drop(store);
        let clean = verify(dir.path()).unwrap();
        assert!(clean.is_clean(), "{:?}", clean.damage);
        assert_eq!(clean.records, 1200);
        assert!(clean.segments > 4);

        let pdir = layout::partition_dir(dir.path(), PartitionId(1));
        let bases = layout::list_segments(&pdir).unwrap();
        let path = layout::segment_path(&pdir, bases[1]);
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[5000] ^= 0x01;
        std::fs::write(&path, &bytes).unwrap();
        let report = verify(dir.path()).unwrap();
        assert_eq!(report.damage.len(), 1, "{:?}", report.damage);
        let damage = &report.damage[0];
        assert_eq!(
            (damage.partition, damage.segment),
            (PartitionId(1), bases[1])
        );
        assert!(damage.position <= 5000 && damage.position + 400 > 5000);
        assert!(matches!(damage.kind, DamageKind::Record(_)));
        // Only the damaged record is lost to the count.
        assert_eq!(report.records, 1199);

        std::fs::remove_file(layout::segment_path(&pdir, bases[2])).unwrap();
        let report = verify(dir.path()).unwrap();
        assert!(report
            .damage
            .iter()
            .any(|d| matches!(d.kind, DamageKind::Gap { .. })));
    }

    #[test]
    fn verify_refuses_a_directory_without_a_store() {
        let dir = tempfile::tempdir().unwrap();
        assert!(matches!(verify(dir.path()), Err(StoreError::NotAStore(_))));
    }
}
