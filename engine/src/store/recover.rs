//! Scanning a segment's bytes: what recovery, `verify` and index rebuilding share.
//!
//! Sans-IO: the input is the segment as a byte slice, the output says where the valid records
//! end and why. The rules of a valid record sequence are the format's invariants: each record
//! decodes, its checksum matches, its offset is exactly the next one, and its enqueued time
//! does not go back. The first record that breaks a rule ends the valid data; recovery zeroes
//! everything after it in the active segment, `verify` reports it.

use super::format::{
    decode_record, decode_record_header, FormatError, RecordHeader, RECORD_ALIGN_BYTES,
    RECORD_HEADER_BYTES, SEGMENT_HEADER_BYTES,
};
use super::index::{IndexEntry, IndexPolicy};
use super::Offset;

/// Why a scan stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    /// A zero length word: nothing was published here (the normal end of a segment).
    End,
    /// The segment is full: no room for another record header.
    Full,
    /// The bytes at the stop position are not the next valid record.
    Invalid(Invalid),
}

/// What is wrong with the bytes where a scan stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Invalid {
    #[error("{0}")]
    Format(FormatError),
    #[error("offset {found} where {expected} was expected")]
    Offset { expected: Offset, found: Offset },
    #[error("enqueued time {found} ms is before the previous record's {previous} ms")]
    TimeWentBack { previous: u64, found: u64 },
}

/// The result of scanning a segment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scan {
    /// Position after the last valid record (where the next record goes).
    pub end: usize,
    /// Offset of the next record.
    pub next_offset: Offset,
    /// Valid records found.
    pub records: u64,
    pub first_time_ms: Option<u64>,
    pub last_time_ms: Option<u64>,
    /// The index the segment should have (empty unless asked for).
    pub index: Vec<IndexEntry>,
    pub stop: Stop,
}

/// Scans the records of `segment` (the whole file, header included) starting at the first
/// record, expecting offsets from `base`. `index_interval` builds the index on the way.
pub fn scan_segment(segment: &[u8], base: Offset, index_interval: Option<u32>) -> Scan {
    scan_from(segment, base, SEGMENT_HEADER_BYTES, base, index_interval)
}

/// Like [`scan_segment`], but starting at `position`, where record `offset` is expected (an
/// index entry). Index entries (relative to `base`) are produced only for records scanned.
pub fn scan_from(
    segment: &[u8],
    base: Offset,
    position: usize,
    offset: Offset,
    index_interval: Option<u32>,
) -> Scan {
    let mut policy = index_interval.map(IndexPolicy::new);
    let mut scan = Scan {
        end: position,
        next_offset: offset,
        records: 0,
        first_time_ms: None,
        last_time_ms: None,
        index: Vec::new(),
        stop: Stop::End,
    };
    loop {
        let position = scan.end;
        let Some(rest) = segment
            .get(position..)
            .filter(|r| r.len() >= RECORD_HEADER_BYTES)
        else {
            scan.stop = Stop::Full;
            return scan;
        };
        let header = match check_record(rest, scan.next_offset, scan.last_time_ms) {
            Ok(header) => header,
            Err(Invalid::Format(FormatError::Empty)) => {
                scan.stop = Stop::End;
                return scan;
            }
            Err(invalid) => {
                scan.stop = Stop::Invalid(invalid);
                return scan;
            }
        };
        if let Some(policy) = policy.as_mut() {
            let relative = header.offset.0.saturating_sub(base.0) as u32;
            if let Some(entry) = policy.observe(position, relative, header.enqueued_time_ms) {
                scan.index.push(entry);
            }
        }
        scan.first_time_ms.get_or_insert(header.enqueued_time_ms);
        scan.last_time_ms = Some(header.enqueued_time_ms);
        scan.records += 1;
        scan.next_offset = header.offset.next();
        scan.end = position + header.record_bytes();
    }
}

/// Checks the record at the start of `bytes` against the sequence rules.
pub fn check_record(
    bytes: &[u8],
    expected: Offset,
    previous_time_ms: Option<u64>,
) -> Result<RecordHeader, Invalid> {
    let (header, _) = decode_record(bytes).map_err(Invalid::Format)?;
    if header.offset != expected {
        return Err(Invalid::Offset {
            expected,
            found: header.offset,
        });
    }
    if let Some(previous) = previous_time_ms.filter(|&p| header.enqueued_time_ms < p) {
        return Err(Invalid::TimeWentBack {
            previous,
            found: header.enqueued_time_ms,
        });
    }
    Ok(header)
}

/// Finds the next position after `from` where a record with a valid checksum and an offset at
/// least `offset_min` starts: where a reader or `verify` resumes after damage. Positions are
/// tried at record alignment, so this costs one header decode per 16 bytes.
pub fn resync(segment: &[u8], from: usize, offset_min: Offset) -> Option<(usize, RecordHeader)> {
    let mut position = from
        .next_multiple_of(RECORD_ALIGN_BYTES)
        .max(SEGMENT_HEADER_BYTES);
    if position == from {
        position += RECORD_ALIGN_BYTES;
    }
    while position + RECORD_HEADER_BYTES <= segment.len() {
        let rest = &segment[position..];
        if let Ok(header) = decode_record_header(rest) {
            if header.offset >= offset_min {
                if let Ok((header, _)) = decode_record(rest) {
                    return Some((position, header));
                }
            }
        }
        position += RECORD_ALIGN_BYTES;
    }
    None
}

/// The first nonzero byte at or after `from`: garbage that a torn write left past the end.
pub fn first_nonzero(segment: &[u8], from: usize) -> Option<usize> {
    let tail = segment.get(from..)?;
    // Whole 64-byte chunks first: the common case is megabytes of zeros.
    let mut chunks = tail.chunks_exact(64);
    let mut skipped = 0;
    for chunk in chunks.by_ref() {
        if chunk.iter().fold(0u8, |acc, &b| acc | b) != 0 {
            return chunk
                .iter()
                .position(|&b| b != 0)
                .map(|i| from + skipped + i);
        }
        skipped += 64;
    }
    chunks
        .remainder()
        .iter()
        .position(|&b| b != 0)
        .map(|i| from + skipped + i)
}

/// Zeroes every 4 KiB page part at or after `from` that holds a nonzero byte, leaving zero
/// pages untouched (not dirtied): how recovery cuts a torn tail without shrinking the file.
/// Returns the range that was written, to be flushed.
pub fn zero_tail(segment: &mut [u8], from: usize) -> Option<(usize, usize)> {
    let mut written: Option<(usize, usize)> = None;
    let mut position = from;
    while let Some(dirty) = first_nonzero(segment, position) {
        let page_end = (dirty / 4096 + 1) * 4096;
        let end = page_end.min(segment.len());
        segment[dirty..end].fill(0);
        written = Some((written.map_or(dirty, |w| w.0), end));
        position = end;
    }
    written
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::format::{
        encode_record, encode_segment_header, record_bytes, MessageEncoder, MessageRef, PropertyRef,
    };
    use rkyv::util::AlignedVec;

    /// A segment image with `count` records from `base`, then `spare` zero bytes.
    fn segment(base: u64, count: u64, spare: usize) -> (AlignedVec, Vec<usize>) {
        let mut bytes = AlignedVec::<16>::new();
        let mut header = [0u8; SEGMENT_HEADER_BYTES];
        encode_segment_header(&mut header, Offset(base));
        bytes.extend_from_slice(&header);
        let mut encoder = MessageEncoder::default();
        let mut starts = Vec::new();
        for i in 0..count {
            let body = vec![i as u8; (i as usize * 37) % 300];
            let props = [PropertyRef {
                name: "n",
                value: "v",
            }];
            let message = MessageRef {
                system_properties: &props,
                application_properties: &[],
                body: &body,
            };
            let payload = encoder.encode(&message).unwrap().to_vec();
            let mut record = vec![0u8; record_bytes(payload.len())];
            let len = encode_record(&mut record, Offset(base + i), 1000 + i, &payload);
            record[0..4].copy_from_slice(&len.to_le_bytes());
            starts.push(bytes.len());
            bytes.extend_from_slice(&record);
        }
        bytes.extend_from_slice(&vec![0u8; spare]);
        (bytes, starts)
    }

    fn u32_at(bytes: &[u8], position: usize) -> u32 {
        u32::from_le_bytes(bytes[position..position + 4].try_into().unwrap())
    }

    #[test]
    fn a_clean_segment_scans_to_its_end() {
        let (bytes, starts) = segment(100, 20, 4096);
        let scan = scan_segment(&bytes, Offset(100), Some(256));
        assert_eq!(scan.records, 20);
        assert_eq!(scan.next_offset, Offset(120));
        assert_eq!(scan.end, bytes.len() - 4096);
        assert_eq!(scan.stop, Stop::End);
        assert_eq!(
            (scan.first_time_ms, scan.last_time_ms),
            (Some(1000), Some(1019))
        );
        assert_eq!(scan.index[0].position as usize, starts[0]);
        assert!(scan.index.len() > 1);
        assert!(super::super::index::is_plausible(&scan.index, bytes.len()));
    }

    #[test]
    fn a_full_segment_stops_at_its_end() {
        let (bytes, _) = segment(0, 3, 0);
        let scan = scan_segment(&bytes, Offset(0), None);
        assert_eq!((scan.records, scan.stop), (3, Stop::Full));
    }

    #[test]
    fn every_truncation_point_keeps_exactly_the_whole_records() {
        // A torn write leaves a prefix of the last record followed by zeros: the scan must end
        // exactly at the last whole record, for every cut.
        let (bytes, starts) = segment(0, 5, 0);
        for cut in SEGMENT_HEADER_BYTES..bytes.len() {
            let mut torn = AlignedVec::<16>::new();
            torn.extend_from_slice(&bytes[..cut]);
            torn.extend_from_slice(&vec![0u8; bytes.len() - cut + 64]);
            let scan = scan_segment(&torn, Offset(0), None);
            // A record is whole when the cut lost none of its nonzero bytes: its padding, and
            // the archive's trailing zero bytes, read the same either way.
            let whole = starts
                .iter()
                .take_while(|&&s| {
                    let end = s + RECORD_HEADER_BYTES + u32_at(&bytes, s) as usize;
                    bytes[cut.clamp(s, end)..end].iter().all(|&b| b == 0)
                })
                .count();
            assert_eq!(scan.records as usize, whole, "cut at {cut}");
        }
    }

    #[test]
    fn every_bit_flip_stops_the_scan_at_the_damaged_record() {
        let (bytes, starts) = segment(0, 3, 64);
        let data_end = bytes.len() - 64;
        for bit in (SEGMENT_HEADER_BYTES * 8..data_end * 8).step_by(3) {
            let mut damaged = AlignedVec::<16>::new();
            damaged.extend_from_slice(&bytes);
            damaged[bit / 8] ^= 1 << (bit % 8);
            let scan = scan_segment(&damaged, Offset(0), None);
            let record = starts.iter().rposition(|&s| s <= bit / 8).unwrap();
            // Flips in the zero padding of a record are not covered by the checksum; they are
            // harmless (never read) and verify reports them as trailing garbage only at the end.
            let padding_flip = scan.records == 3;
            assert!(padding_flip || scan.records as usize == record, "bit {bit}");
            assert!(padding_flip || matches!(scan.stop, Stop::Invalid(_)));
        }
    }

    #[test]
    fn resync_finds_the_next_good_record_after_damage() {
        let (mut bytes, starts) = segment(0, 4, 64);
        bytes[starts[1] + 40] ^= 0xff;
        let scan = scan_segment(&bytes, Offset(0), None);
        assert_eq!(scan.records, 1);
        let (position, header) = resync(&bytes, scan.end, Offset(1)).unwrap();
        assert_eq!(position, starts[2]);
        assert_eq!(header.offset, Offset(2));
        assert_eq!(resync(&bytes, starts[3], Offset(4)), None);
    }

    #[test]
    fn out_of_sequence_records_end_the_valid_data() {
        let (bytes, _) = segment(5, 2, 64);
        let scan = scan_segment(&bytes, Offset(4), None);
        assert_eq!(
            scan.stop,
            Stop::Invalid(Invalid::Offset {
                expected: Offset(4),
                found: Offset(5)
            })
        );
    }

    #[test]
    fn zero_tail_clears_only_what_is_dirty() {
        let mut bytes = vec![0u8; 3 * 4096];
        assert_eq!(zero_tail(&mut bytes, 10), None);
        bytes[100] = 7;
        bytes[9000] = 9;
        assert_eq!(zero_tail(&mut bytes, 50), Some((100, 3 * 4096)));
        assert!(bytes.iter().all(|&b| b == 0));
        bytes[20] = 1;
        assert_eq!(zero_tail(&mut bytes, 50), None);
        assert_eq!(bytes[20], 1);
    }

    #[test]
    fn first_nonzero_finds_garbage_anywhere() {
        let mut bytes = vec![0u8; 1000];
        assert_eq!(first_nonzero(&bytes, 0), None);
        bytes[999] = 1;
        assert_eq!(first_nonzero(&bytes, 0), Some(999));
        bytes[130] = 1;
        assert_eq!(first_nonzero(&bytes, 5), Some(130));
        assert_eq!(first_nonzero(&bytes, 131), Some(999));
        assert_eq!(first_nonzero(&bytes, 2000), None);
    }
}
