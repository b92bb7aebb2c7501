//! The reader library: what backends, `ingot monitor-events` and route endpoints use to read a
//! partition in place, from a start point, and to follow its tail.
//!
//! A reader needs no lock and writes nothing in the partition directories, so any number of
//! them, in any process, can read while the hub appends; the writer never waits for them. A
//! reader maps each segment read-only and learns that a record exists by loading its length
//! word with acquire ordering (the writer stores it last, with release ordering); only then
//! does it look at the record's bytes, checksum first, then rkyv validation, then hands out a
//! reference into the mapping: no copy.
//!
//! Following the tail is polling: at the end of the log, [`PartitionReader::next_wait`]
//! sleeps [`FOLLOW_POLL_INTERVAL`] (1 ms) between looks, each look one atomic load. So a record
//! reaches a following reader about 0.5 ms (at most ~1 ms plus scheduling) after its batch was
//! appended, at negligible cost. inotify would not do better: mapped writes raise no events.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::format::{
    access_message, decode_record, decode_segment_header, record_bytes, ArchivedMessage,
    FormatError, RecordHeader, RECORD_HEADER_BYTES, RECORD_PAYLOAD_BYTES_MAX, SEGMENT_HEADER_BYTES,
};
use super::index::{self, IndexEntry};
use super::layout;
use super::mmap::ReadMap;
use super::recover::check_record;
use super::{Offset, PartitionId, StoreError, FOLLOW_POLL_INTERVAL};

/// Where a partition reader starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StartAt {
    /// The oldest record still stored.
    Start,
    /// After the newest record: only records appended from now on.
    End,
    /// This offset (or the oldest stored one, if retention deleted it).
    Offset(Offset),
    /// The first record enqueued at or after this time (Unix milliseconds).
    TimeMs(u64),
}

/// Why a read failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ReadError {
    /// The bytes where the next record should be are damaged. The reader stays there (every
    /// `next` reports the same damage) until [`PartitionReader::skip_damaged`] is called.
    #[error(
        "partition {partition}, segment {segment}, offset {offset}, byte {position}: {reason}"
    )]
    Corrupt {
        partition: PartitionId,
        segment: Offset,
        offset: Offset,
        position: u64,
        reason: String,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// One record, read in place from the mapped segment.
#[derive(Debug, Clone, Copy)]
pub struct Record<'a> {
    pub partition: PartitionId,
    pub offset: Offset,
    /// Unix milliseconds.
    pub enqueued_time_ms: u64,
    pub message: &'a ArchivedMessage,
}

/// A read-only view of a data directory's event store.
///
/// ```
/// use ingot_engine::store::{MessageRef, PartitionId, PropertyRef, Reader, StartAt, Store, StoreConfig};
///
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let dir = tempfile::tempdir()?;
/// let mut config = StoreConfig::new(2);
/// config.segment_bytes_max = 1 << 20;
/// let mut store = Store::open(dir.path(), config)?;
/// let partition = store.partition_for("dev1");
/// let props = [PropertyRef { name: "iothub-connection-device-id", value: "dev1" }];
/// let message = MessageRef { system_properties: &props, application_properties: &[], body: b"21.5" };
/// store.append_batch(partition, &[message], 1_700_000_000_000)?;
///
/// // Any process can do this while the hub runs.
/// let reader = Reader::open(dir.path())?;
/// let mut events = reader.partition(partition, StartAt::Start)?;
/// while let Some(record) = events.next()? {
///     assert_eq!(record.message.body(), b"21.5");
///     assert_eq!(record.message.system_property("iothub-connection-device-id"), Some("dev1"));
/// }
/// // Follow the tail: wait up to 10 ms for the next record.
/// assert!(events.next_wait(std::time::Duration::from_millis(10))?.is_none());
/// # Ok(())
/// # }
/// ```
#[derive(Debug, Clone)]
pub struct Reader {
    data_dir: PathBuf,
    partitions: u32,
}

impl Reader {
    /// Opens the store of `data_dir` for reading. Takes no lock; needs only read access.
    pub fn open(data_dir: &Path) -> Result<Reader, StoreError> {
        match layout::read_meta(data_dir)? {
            Some(partitions) => Ok(Reader {
                data_dir: data_dir.to_path_buf(),
                partitions,
            }),
            None => Err(StoreError::NotAStore(data_dir.to_path_buf())),
        }
    }

    pub fn partition_count(&self) -> u32 {
        self.partitions
    }

    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// A reader of one partition, positioned at `start`.
    pub fn partition(&self, id: PartitionId, start: StartAt) -> Result<PartitionReader, ReadError> {
        if id.0 >= self.partitions {
            return Err(StoreError::UnknownPartition(id).into());
        }
        let mut reader = PartitionReader {
            id,
            dir: layout::partition_dir(&self.data_dir, id),
            segment: None,
            position: SEGMENT_HEADER_BYTES,
            next_offset: Offset(0),
            last_time_ms: None,
            ready: None,
            skip_below: Offset(0),
            skip_before_ms: None,
            idle_polls: 0,
        };
        reader.seek(start)?;
        Ok(reader)
    }
}

#[derive(Debug)]
struct OpenSegment {
    base: Offset,
    map: ReadMap,
}

/// A record found by `poll`, not yet handed out.
#[derive(Debug, Clone, Copy)]
struct Found {
    position: usize,
    header: RecordHeader,
}

/// Reads one partition in offset order. Not `Sync`-shared: one per consumer.
#[derive(Debug)]
pub struct PartitionReader {
    id: PartitionId,
    dir: PathBuf,
    segment: Option<OpenSegment>,
    /// Byte position of the next record in `segment`.
    position: usize,
    /// Offset the next record must have.
    next_offset: Offset,
    last_time_ms: Option<u64>,
    ready: Option<Found>,
    /// Records below this offset are passed over silently (a start offset beyond the end).
    skip_below: Offset,
    /// Records enqueued before this time are passed over silently (a start time in the future).
    skip_before_ms: Option<u64>,
    idle_polls: u32,
}

/// At the end of a segment, look for a gap (a later segment without the expected one) only
/// every this many polls: a directory listing costs far more than the atomic load of a poll.
const GAP_CHECK_POLLS: u32 = 256;

impl PartitionReader {
    pub fn partition(&self) -> PartitionId {
        self.id
    }

    /// The offset of the next record this reader returns: what a consumer checkpoints.
    pub fn next_offset(&self) -> Offset {
        self.next_offset.max(self.skip_below)
    }

    /// The next record, or `None` at the end of what is written now.
    #[allow(clippy::should_implement_trait)]
    pub fn next(&mut self) -> Result<Option<Record<'_>>, ReadError> {
        if !self.poll()? {
            return Ok(None);
        }
        self.take().map(Some)
    }

    /// The next record, waiting up to `timeout` for one to be appended.
    pub fn next_wait(&mut self, timeout: Duration) -> Result<Option<Record<'_>>, ReadError> {
        let deadline = Instant::now() + timeout;
        while !self.poll()? {
            let now = Instant::now();
            if now >= deadline {
                return Ok(None);
            }
            std::thread::sleep(FOLLOW_POLL_INTERVAL.min(deadline - now));
        }
        self.take().map(Some)
    }

    /// After a [`ReadError::Corrupt`], moves to the next record that checks out, passing over
    /// the damage (and the records in it, which are lost to this reader). Returns whether it
    /// found one; `false` means nothing valid follows yet.
    pub fn skip_damaged(&mut self) -> Result<bool, ReadError> {
        self.ready = None;
        loop {
            let Some(segment) = &self.segment else {
                return Ok(false);
            };
            if let Some((position, header)) =
                resync_volatile(&segment.map, self.position, self.next_offset)
            {
                self.position = position;
                self.next_offset = header.offset;
                self.last_time_ms = None;
                return Ok(true);
            }
            // Nothing valid after the damage in this segment: the next segment, if any.
            let bases = layout::list_segments(&self.dir)?;
            let Some(&base) = bases.iter().find(|&&b| b > segment.base) else {
                return Ok(false);
            };
            self.open_segment(base)?;
            self.next_offset = base;
            self.last_time_ms = None;
            if self.segment_header_damage().is_none() {
                return Ok(true);
            }
        }
    }

    /// Positions the reader.
    fn seek(&mut self, start: StartAt) -> Result<(), ReadError> {
        let bases = layout::list_segments(&self.dir)?;
        let (Some(&first), Some(&last)) = (bases.first(), bases.last()) else {
            return Err(StoreError::Damaged {
                path: self.dir.clone(),
                reason: "no segment".into(),
            }
            .into());
        };
        match start {
            StartAt::Start => self.open_at(first, None)?,
            StartAt::End => {
                self.open_at(last, Some(Offset(u64::MAX)))?;
                self.step_while(|_| true);
            }
            StartAt::Offset(offset) => {
                let base = bases
                    .iter()
                    .rev()
                    .find(|&&b| b <= offset)
                    .copied()
                    .unwrap_or(first);
                self.open_at(base, Some(offset))?;
                self.step_while(|h| h.offset < offset);
                self.skip_below = offset;
            }
            StartAt::TimeMs(time_ms) => {
                // The last segment whose first record is older than `time_ms` holds the start.
                let mut chosen = first;
                for &base in bases.iter().rev() {
                    if self.first_time_ms(base).is_some_and(|t| t < time_ms) {
                        chosen = base;
                        break;
                    }
                }
                self.open_at(chosen, None)?;
                let index = index::read_index(&layout::index_path(&self.dir, chosen))?;
                if let Some(entry) = index::floor_time(&index, time_ms) {
                    self.jump_to_entry(chosen, entry);
                }
                self.step_while(|h| h.enqueued_time_ms < time_ms);
                self.skip_before_ms = Some(time_ms);
            }
        }
        Ok(())
    }

    /// Opens segment `base` at its first record, or near `target` through its index.
    fn open_at(&mut self, base: Offset, target: Option<Offset>) -> Result<(), ReadError> {
        self.open_segment(base)?;
        self.next_offset = base;
        if let Some(target) = target {
            let index = index::read_index(&layout::index_path(&self.dir, base))?;
            let relative = u32::try_from(target.0.saturating_sub(base.0)).unwrap_or(u32::MAX);
            if let Some(entry) = index::floor_offset(&index, relative) {
                self.jump_to_entry(base, entry);
            }
        }
        Ok(())
    }

    /// Moves to an index entry if the record there is the one the entry names (an index is
    /// never trusted); otherwise stays where it is.
    fn jump_to_entry(&mut self, base: Offset, entry: IndexEntry) {
        let Some(segment) = &self.segment else { return };
        let position = entry.position as usize;
        let expected = Offset(base.0 + u64::from(entry.relative_offset));
        if position < self.position || position % 16 != 0 {
            return;
        }
        if let Some(header) = published_header(&segment.map, position) {
            if header.offset == expected {
                self.position = position;
                self.next_offset = expected;
            }
        }
    }

    /// Steps over published records of the current segment while `keep_going` holds, reading
    /// headers only (the records stepped over are not returned, so not verified).
    fn step_while(&mut self, keep_going: impl Fn(&RecordHeader) -> bool) {
        let Some(segment) = &self.segment else { return };
        while let Some(header) = published_header(&segment.map, self.position) {
            if header.offset != self.next_offset || !keep_going(&header) {
                break;
            }
            self.position += header.record_bytes();
            self.next_offset = header.offset.next();
            self.last_time_ms = Some(header.enqueued_time_ms);
        }
    }

    fn first_time_ms(&self, base: Offset) -> Option<u64> {
        let file = File::open(layout::segment_path(&self.dir, base)).ok()?;
        let map = ReadMap::new(&file).ok()?;
        published_header(&map, SEGMENT_HEADER_BYTES).map(|h| h.enqueued_time_ms)
    }

    fn open_segment(&mut self, base: Offset) -> Result<(), ReadError> {
        let path = layout::segment_path(&self.dir, base);
        let file = File::open(&path).map_err(|e| StoreError::io("open", &path, e))?;
        let map = ReadMap::new(&file).map_err(|e| StoreError::io("map", &path, e))?;
        self.segment = Some(OpenSegment { base, map });
        self.position = SEGMENT_HEADER_BYTES;
        self.ready = None;
        Ok(())
    }

    fn segment_header_damage(&self) -> Option<FormatError> {
        let segment = self.segment.as_ref()?;
        // The header is written before the segment gets its name, so it is stable.
        let header = segment
            .map
            .bytes(0, SEGMENT_HEADER_BYTES)
            .unwrap_or_default();
        match decode_segment_header(header) {
            Ok(h) if h.base_offset == segment.base => None,
            Ok(_) => Some(FormatError::Magic),
            Err(e) => Some(e),
        }
    }

    fn corrupt(&self, position: usize, reason: impl std::fmt::Display) -> ReadError {
        ReadError::Corrupt {
            partition: self.id,
            segment: self.segment.as_ref().map_or(Offset(0), |s| s.base),
            offset: self.next_offset,
            position: position as u64,
            reason: reason.to_string(),
        }
    }

    /// Finds the next record to return, crossing segments; `false` at the end of the log.
    fn poll(&mut self) -> Result<bool, ReadError> {
        if self.ready.is_some() {
            return Ok(true);
        }
        loop {
            let Some(segment) = &self.segment else {
                return Ok(false);
            };
            if self.position == SEGMENT_HEADER_BYTES {
                if let Some(damage) = self.segment_header_damage() {
                    return Err(self.corrupt(0, format!("segment header: {damage}")));
                }
            }
            let len = segment.map.load_u32_acquire(self.position);
            if len == 0 {
                if !self.cross_to_next_segment()? {
                    return Ok(false);
                }
                continue;
            }
            self.idle_polls = 0;
            let position = self.position;
            let end = position.saturating_add(record_bytes(len.min(u32::MAX - 64) as usize));
            if len as usize > RECORD_PAYLOAD_BYTES_MAX {
                return Err(self.corrupt(position, FormatError::TooLong(len)));
            }
            let Some(bytes) = segment.map.bytes(position, end) else {
                return Err(self.corrupt(position, "the record runs past the end of the segment"));
            };
            let header = match check_record(bytes, self.next_offset, self.last_time_ms) {
                Ok(header) => header,
                Err(invalid) => return Err(self.corrupt(position, invalid)),
            };
            let skipped = header.offset < self.skip_below
                || self
                    .skip_before_ms
                    .is_some_and(|t| header.enqueued_time_ms < t);
            if skipped {
                self.advance_past(position, &header);
                continue;
            }
            self.skip_before_ms = None;
            self.ready = Some(Found { position, header });
            return Ok(true);
        }
    }

    /// Hands out the record `poll` found, validating its archive, and moves past it.
    fn take(&mut self) -> Result<Record<'_>, ReadError> {
        let Some(found) = self.ready else {
            return Err(self.corrupt(self.position, "no record is ready (a bug in the reader)"));
        };
        let start = found.position + RECORD_HEADER_BYTES;
        let end = start + found.header.payload_len as usize;
        // Only `segment` is borrowed for the record's lifetime; the cursor fields next to it
        // move on independently.
        let payload = self.segment.as_ref().and_then(|s| s.map.bytes(start, end));
        let reason = match payload.map(access_message) {
            Some(Ok(message)) => {
                self.position = found.position + found.header.record_bytes();
                self.next_offset = found.header.offset.next();
                self.last_time_ms = Some(found.header.enqueued_time_ms);
                self.ready = None;
                return Ok(Record {
                    partition: self.id,
                    offset: found.header.offset,
                    enqueued_time_ms: found.header.enqueued_time_ms,
                    message,
                });
            }
            Some(Err(e)) => e.to_string(),
            None => "the record is outside the mapping".to_string(),
        };
        Err(self.corrupt(found.position, reason))
    }

    fn advance_past(&mut self, position: usize, header: &RecordHeader) {
        self.position = position + header.record_bytes();
        self.next_offset = header.offset.next();
        self.last_time_ms = Some(header.enqueued_time_ms);
    }

    /// At the end of the published records of a segment: moves to the next segment if the
    /// writer has rolled. The writer names the next segment after the offset that follows the
    /// last record, after the last record was published, so seeing that name means this
    /// segment is complete: look once more, then move.
    fn cross_to_next_segment(&mut self) -> Result<bool, ReadError> {
        let current = self.segment.as_ref().map(|s| s.base);
        // An empty segment is named after the offset this reader waits for: that is not a roll.
        let next = layout::segment_path(&self.dir, self.next_offset);
        if current != Some(self.next_offset) && next.exists() {
            let still_empty = self
                .segment
                .as_ref()
                .is_some_and(|s| s.map.load_u32_acquire(self.position) == 0);
            if still_empty {
                self.open_segment(self.next_offset)?;
            }
            return Ok(true);
        }
        self.idle_polls += 1;
        if self.idle_polls % GAP_CHECK_POLLS == 0 {
            let bases = layout::list_segments(&self.dir)?;
            let current = current.unwrap_or(Offset(0));
            // Retention deletes oldest first: if every remaining segment is newer than this
            // one, this reader fell behind retention and continues at the oldest record left.
            if let Some(&first) = bases.first().filter(|&&first| first > current) {
                self.open_segment(first)?;
                self.next_offset = first;
                self.last_time_ms = None;
                return Ok(true);
            }
            if bases.iter().any(|&b| b > current) {
                // The writer may have published more, or rolled to the segment this reader
                // waits for, since the look above: only what is still missing now is a gap.
                let published = self
                    .segment
                    .as_ref()
                    .is_some_and(|s| s.map.load_u32_acquire(self.position) != 0);
                if published {
                    return Ok(true);
                }
                if bases.contains(&self.next_offset) {
                    self.open_segment(self.next_offset)?;
                    return Ok(true);
                }
                return Err(self.corrupt(
                    self.position,
                    format!("records from offset {} on are missing", self.next_offset),
                ));
            }
        }
        Ok(false)
    }
}

/// The header of the record at `position` if one is published there.
fn published_header(map: &ReadMap, position: usize) -> Option<RecordHeader> {
    if map.load_u32_acquire(position) == 0 {
        return None;
    }
    let bytes = map.bytes(position, position + RECORD_HEADER_BYTES)?;
    let header = super::format::decode_record_header_only(bytes).ok()?;
    Some(header)
}

/// [`super::recover::resync`] over bytes that a writer may still change: candidates are copied
/// out with volatile reads and checked on the copy, so no reference to unstable bytes is made.
fn resync_volatile(
    map: &ReadMap,
    from: usize,
    offset_min: Offset,
) -> Option<(usize, RecordHeader)> {
    let mut position = (from + 16).next_multiple_of(16);
    let mut header_bytes = [0u8; RECORD_HEADER_BYTES];
    let mut record = Vec::new();
    while map.copy_volatile(position, &mut header_bytes) {
        if let Ok(header) = super::format::decode_record_header_only(&header_bytes) {
            if header.offset >= offset_min {
                record.resize(header.record_bytes(), 0);
                if map.copy_volatile(position, &mut record) && decode_record(&record).is_ok() {
                    return Some((position, header));
                }
            }
        }
        position += 16;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{MessageRef, PropertyRef, Store, StoreConfig};

    fn config(partitions: u32) -> StoreConfig {
        let mut config = StoreConfig::new(partitions);
        config.segment_bytes_max = 64 * 1024;
        config.index_interval_bytes = 256;
        config.fsync = crate::store::Fsync::Never;
        config
    }

    fn append(store: &mut Store, count: u64, time_ms: u64) {
        for i in 0..count {
            let body = format!(
                "{{\"i\":{i},\"pad\":\"{}\"}}",
                "x".repeat((i % 50) as usize)
            );
            let props = [PropertyRef {
                name: "iothub-connection-device-id",
                value: "dev1",
            }];
            let message = MessageRef {
                system_properties: &props,
                application_properties: &[],
                body: body.as_bytes(),
            };
            store
                .append_batch(PartitionId(0), &[message], time_ms + i)
                .unwrap();
        }
    }

    fn offsets(reader: &mut PartitionReader) -> Vec<u64> {
        let mut out = Vec::new();
        while let Some(record) = reader.next().unwrap() {
            out.push(record.offset.0);
        }
        out
    }

    #[test]
    fn reads_from_start_offset_time_and_end_across_segments() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::open(dir.path(), config(1)).unwrap();
        append(&mut store, 2000, 10_000);
        assert!(store.partition_mut(PartitionId(0)).unwrap().segment_count() > 3);
        let reader = Reader::open(dir.path()).unwrap();
        let mut all = reader.partition(PartitionId(0), StartAt::Start).unwrap();
        assert_eq!(offsets(&mut all), (0..2000).collect::<Vec<_>>());
        for from in [0u64, 1, 777, 1999, 2000, 2500] {
            let mut r = reader
                .partition(PartitionId(0), StartAt::Offset(Offset(from)))
                .unwrap();
            let expected: Vec<u64> = (from.min(2000)..2000).collect();
            assert_eq!(offsets(&mut r), expected, "from offset {from}");
        }
        for from_ms in [0u64, 10_000, 10_500, 11_999, 12_000] {
            let mut r = reader
                .partition(PartitionId(0), StartAt::TimeMs(from_ms))
                .unwrap();
            let first = from_ms.saturating_sub(10_000).min(2000);
            assert_eq!(
                offsets(&mut r),
                (first..2000).collect::<Vec<_>>(),
                "from time {from_ms}"
            );
        }
        let mut end = reader.partition(PartitionId(0), StartAt::End).unwrap();
        assert_eq!(end.next_offset(), Offset(2000));
        assert!(end.next().unwrap().is_none());
        // A reader waiting beyond the end sees only what it asked for once it arrives.
        let mut ahead = reader
            .partition(PartitionId(0), StartAt::Offset(Offset(2005)))
            .unwrap();
        append(&mut store, 10, 20_000);
        assert_eq!(offsets(&mut end), (2000..2010).collect::<Vec<_>>());
        assert_eq!(offsets(&mut ahead), (2005..2010).collect::<Vec<_>>());
    }

    #[test]
    fn an_empty_partition_reads_as_the_end() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::open(dir.path(), config(2)).unwrap();
        let reader = Reader::open(dir.path()).unwrap();
        for start in [
            StartAt::Start,
            StartAt::End,
            StartAt::Offset(Offset(3)),
            StartAt::TimeMs(5),
        ] {
            let mut r = reader.partition(PartitionId(1), start).unwrap();
            assert!(r.next().unwrap().is_none(), "{start:?}");
            assert!(r.next_wait(Duration::from_millis(3)).unwrap().is_none());
        }
        let mut r = reader.partition(PartitionId(0), StartAt::Start).unwrap();
        append(&mut store, 1, 1000);
        assert_eq!(r.next().unwrap().unwrap().offset, Offset(0));
        assert!(reader.partition(PartitionId(2), StartAt::Start).is_err());
    }

    #[test]
    fn a_reader_behind_retention_continues_at_the_oldest_record_left() {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = config(1);
        cfg.retention_bytes_max = 2 * cfg.segment_bytes_max;
        let mut store = Store::open(dir.path(), cfg).unwrap();
        append(&mut store, 2000, 1000);
        let reader = Reader::open(dir.path()).unwrap();
        let mut r = reader.partition(PartitionId(0), StartAt::Start).unwrap();
        assert_eq!(r.next().unwrap().unwrap().offset, Offset(0));
        store.enforce_retention(0).unwrap();
        let first = store.partition_mut(PartitionId(0)).unwrap().first_offset();
        assert!(first.0 > 300);
        // The deleted segment stays readable through the mapping, then the reader moves on.
        let mut offsets = Vec::new();
        for _ in 0..10 * GAP_CHECK_POLLS {
            if let Some(record) = r.next().unwrap() {
                offsets.push(record.offset.0);
            }
        }
        let resumed = offsets.iter().position(|&o| o == first.0).expect("resumed");
        assert_eq!(
            offsets[..resumed],
            (1..offsets[resumed - 1] + 1).collect::<Vec<_>>()[..]
        );
        assert_eq!(offsets[resumed..], (first.0..2000).collect::<Vec<_>>()[..]);
    }

    #[test]
    fn follows_the_tail_from_another_thread() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::open(dir.path(), config(1)).unwrap();
        let reader = Reader::open(dir.path()).unwrap();
        let mut tail = reader.partition(PartitionId(0), StartAt::End).unwrap();
        let writer = std::thread::spawn(move || {
            for i in 0..500 {
                append(&mut store, 1, 1000 + i);
            }
            store
        });
        let mut seen = Vec::new();
        while seen.len() < 500 {
            let record = tail
                .next_wait(Duration::from_secs(10))
                .unwrap()
                .expect("a record in time");
            assert_eq!(
                record
                    .message
                    .system_property("iothub-connection-device-id"),
                Some("dev1")
            );
            seen.push(record.offset.0);
        }
        assert_eq!(seen, (0..500).collect::<Vec<_>>());
        drop(writer.join().unwrap());
    }

    #[test]
    fn corruption_is_reported_and_skipped_only_when_asked() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::open(dir.path(), config(1)).unwrap();
        append(&mut store, 50, 1000);
        drop(store);
        // Damage record 10's body on disk.
        let path = layout::segment_path(
            &layout::partition_dir(dir.path(), PartitionId(0)),
            Offset(0),
        );
        let mut bytes = std::fs::read(&path).unwrap();
        let scan = crate::store::recover::scan_segment(&bytes, Offset(0), Some(1));
        let position = scan.index[10].position as usize;
        bytes[position + RECORD_HEADER_BYTES + 3] ^= 0x40;
        std::fs::write(&path, &bytes).unwrap();

        let reader = Reader::open(dir.path()).unwrap();
        let mut r = reader.partition(PartitionId(0), StartAt::Start).unwrap();
        for expected in 0..10 {
            assert_eq!(r.next().unwrap().unwrap().offset, Offset(expected));
        }
        for _ in 0..2 {
            match r.next() {
                Err(ReadError::Corrupt {
                    offset,
                    position: p,
                    ..
                }) => {
                    assert_eq!(offset, Offset(10));
                    assert_eq!(p as usize, position);
                }
                other => panic!("expected corruption, got {other:?}"),
            }
        }
        assert!(r.skip_damaged().unwrap());
        assert_eq!(offsets(&mut r), (11..50).collect::<Vec<_>>());
    }
}
