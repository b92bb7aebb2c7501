//! The writer: [`Store`] opens (and recovers) a data directory, [`PartitionLog`] appends to one
//! partition. A shard owns its partitions' logs outright (`Store::into_partitions`), so the
//! append path takes no lock: encode with rkyv into a reused buffer, `memcpy` into the mapped
//! segment, publish the length word, and flush once per batch when the policy says so.

use std::collections::VecDeque;
use std::fs::{self, File, OpenOptions};
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::format::{
    decode_segment_header, encode_segment_header, record_bytes, seal_record, FormatError,
    MessageEncoder, MessageRef, RECORD_HEADER_BYTES, RECORD_LEN_POSITION, RECORD_PAYLOAD_BYTES_MAX,
    SEGMENT_HEADER_BYTES,
};
use super::index::{self, IndexPolicy, IndexWriter};
use super::layout::{self, DirLock, PREPARED_NAME};
use super::mmap::{ReadMap, WriteMap};
use super::prepare::{prepare_segment, reserve, Helper, PrepareFaults, Prepared};
use super::recover::{resync, scan_from, scan_segment, zero_tail, Scan, Stop};
use super::{partition_of, Fsync, Offset, PartitionId, StoreConfig, StoreError};

/// The offsets a batch received: `start..end`, dense.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OffsetRange {
    pub start: Offset,
    pub end: Offset,
}

impl OffsetRange {
    pub fn len(&self) -> u64 {
        self.end.0 - self.start.0
    }

    pub fn is_empty(&self) -> bool {
        self.start == self.end
    }

    pub fn iter(&self) -> impl Iterator<Item = Offset> {
        (self.start.0..self.end.0).map(Offset)
    }
}

/// What one retention pass deleted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RetentionReport {
    pub segments_deleted: u64,
    pub bytes_deleted: u64,
}

/// The event store of a data directory, as its one writer sees it.
#[derive(Debug)]
pub struct Store {
    config: StoreConfig,
    partitions: Vec<PartitionLog>,
}

impl Store {
    /// Opens (creating if needed) the store under `data_dir/events`, recovering every
    /// partition: torn tails are cut, indexes rebuilt, offsets resumed. Refuses a partition
    /// count other than the one the directory was created with.
    pub fn open(data_dir: &Path, config: StoreConfig) -> Result<Store, StoreError> {
        config.validate()?;
        let events = layout::events_dir(data_dir);
        fs::create_dir_all(&events).map_err(|e| StoreError::io("create", &events, e))?;
        match layout::read_meta(data_dir)? {
            Some(existing) if existing != config.partitions => {
                return Err(StoreError::PartitionCountChanged {
                    path: data_dir.to_path_buf(),
                    existing,
                    requested: config.partitions,
                });
            }
            Some(_) => {}
            None => layout::write_meta(data_dir, config.partitions)?,
        }
        let partitions = (0..config.partitions)
            .map(|p| PartitionLog::open(data_dir, PartitionId(p), &config))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Store { config, partitions })
    }

    pub fn partition_count(&self) -> u32 {
        self.config.partitions
    }

    /// The partition of a device (see [`partition_of`]).
    pub fn partition_for(&self, device_id: &str) -> PartitionId {
        partition_of(device_id, self.config.partitions)
    }

    pub fn partition_mut(&mut self, id: PartitionId) -> Result<&mut PartitionLog, StoreError> {
        self.partitions
            .get_mut(id.0 as usize)
            .ok_or(StoreError::UnknownPartition(id))
    }

    /// Appends a batch to one partition; see [`PartitionLog::append_batch`].
    pub fn append_batch(
        &mut self,
        id: PartitionId,
        batch: &[MessageRef<'_>],
        now_ms: u64,
    ) -> Result<OffsetRange, StoreError> {
        self.partition_mut(id)?.append_batch(batch, now_ms)
    }

    /// Deletes sealed segments past retention in every partition.
    pub fn enforce_retention(&mut self, now_ms: u64) -> Result<RetentionReport, StoreError> {
        let mut total = RetentionReport::default();
        for partition in &mut self.partitions {
            let report = partition.enforce_retention(now_ms)?;
            total.segments_deleted += report.segments_deleted;
            total.bytes_deleted += report.bytes_deleted;
        }
        Ok(total)
    }

    /// Hands each partition to its owner (one shard per partition).
    pub fn into_partitions(self) -> Vec<PartitionLog> {
        self.partitions
    }
}

#[derive(Debug)]
struct SealedSegment {
    base: Offset,
    file_bytes: u64,
    /// The newest enqueued time in the segment: retention by age compares it.
    last_time_ms: Option<u64>,
}

#[derive(Debug)]
struct ActiveSegment {
    base: Offset,
    file: File,
    map: WriteMap,
    /// Where the next record goes.
    end: usize,
    /// Where the pages ready for appends end (see `prepare::reserve`): the mapping's length,
    /// unless recovery could not reserve the rest of the segment (a full disk), in which case
    /// the next append tries again and is refused while it fails.
    ready: usize,
    /// Start of the bytes written since the last flush.
    unflushed_from: usize,
    index: IndexWriter,
    policy: IndexPolicy,
    last_time_ms: Option<u64>,
}

/// One partition's log, owned by its writer.
#[derive(Debug)]
pub struct PartitionLog {
    id: PartitionId,
    dir: PathBuf,
    config: StoreConfig,
    sealed: VecDeque<SealedSegment>,
    active: ActiveSegment,
    next_offset: Offset,
    last_time_ms: u64,
    encoder: MessageEncoder,
    helper: Helper,
    // Declared last so it is released last: the lock must outlive every writable mapping.
    _lock: DirLock,
}

impl PartitionLog {
    fn open(data_dir: &Path, id: PartitionId, config: &StoreConfig) -> Result<Self, StoreError> {
        let dir = layout::partition_dir(data_dir, id);
        fs::create_dir_all(&dir).map_err(|e| StoreError::io("create", &dir, e))?;
        let lock = DirLock::exclusive(&dir)?;
        let faults = PrepareFaults::default();
        let _ = fs::remove_file(dir.join(PREPARED_NAME));
        let mut bases = layout::list_segments(&dir)?;
        if bases.is_empty() {
            let prepared = prepare_segment(&dir, config.segment_bytes_max, &faults)?;
            install_segment(
                &dir,
                prepared,
                Offset(0),
                config.fsync,
                config.index_interval_bytes,
            )?;
            bases.push(Offset(0));
        }
        let Some((&active_base, sealed_bases)) = bases.split_last() else {
            return Err(StoreError::Damaged {
                path: dir,
                reason: "no segment".into(),
            });
        };
        let mut sealed = VecDeque::new();
        for &base in sealed_bases {
            sealed.push_back(open_sealed(&dir, base, config.index_interval_bytes)?);
        }
        let (active, next_offset) = recover_active(&dir, active_base, config, &faults)?;
        let last_time_ms = active
            .last_time_ms
            .or_else(|| sealed.back().and_then(|s| s.last_time_ms))
            .unwrap_or(0);
        let flush_interval = match config.fsync {
            Fsync::Interval(ms) => Some(Duration::from_millis(u64::from(ms))),
            _ => None,
        };
        let follow = active
            .file
            .try_clone()
            .map_err(|e| StoreError::io("open", &dir, e))?;
        let mut helper = Helper::start(
            &dir,
            config.segment_bytes_max,
            follow,
            flush_interval,
            faults.clone(),
        )?;
        helper.request_prepare();
        Ok(PartitionLog {
            id,
            dir,
            config: config.clone(),
            sealed,
            active,
            next_offset,
            last_time_ms,
            encoder: MessageEncoder::default(),
            helper,
            _lock: lock,
        })
    }

    pub fn id(&self) -> PartitionId {
        self.id
    }

    /// The offset the next appended record gets.
    pub fn next_offset(&self) -> Offset {
        self.next_offset
    }

    /// The oldest offset still stored.
    pub fn first_offset(&self) -> Offset {
        self.sealed.front().map_or(self.active.base, |s| s.base)
    }

    /// Appends `batch` in order and returns its offsets once the batch is as durable as the
    /// fsync policy promises: with `Always`, one `msync` covers the whole batch (group commit).
    ///
    /// `now_ms` is the enqueued time (Unix milliseconds) stamped on every record of the batch;
    /// a clock that went back is clamped to the last time used, so times never decrease within
    /// a partition and the time index stays sorted.
    ///
    /// A batch never spans two segments: if it may not fit in the rest of the active segment,
    /// the log rolls first. So a failed roll (a full disk) fails the batch before any byte of
    /// it is written, and the next call retries.
    pub fn append_batch(
        &mut self,
        batch: &[MessageRef<'_>],
        now_ms: u64,
    ) -> Result<OffsetRange, StoreError> {
        let range = self.append_batch_deferred(batch, now_ms)?;
        if self.config.fsync == Fsync::Always {
            self.flush_active()?;
        }
        Ok(range)
    }

    /// Like [`PartitionLog::append_batch`], but leaves the flush that `Fsync::Always` promises
    /// to the caller, who covers several batches (several connections' worth) with one
    /// [`PartitionLog::flush`]: group commit. The batch must not be acknowledged before that
    /// flush returns. (A roll in between flushes the segment it seals, so nothing escapes.)
    pub fn append_batch_deferred(
        &mut self,
        batch: &[MessageRef<'_>],
        now_ms: u64,
    ) -> Result<OffsetRange, StoreError> {
        if self.helper.take_sync_failure() {
            return Err(StoreError::io(
                "flush (in the background)",
                &self.dir,
                std::io::Error::other("fdatasync failed; recent records may not be durable"),
            ));
        }
        let capacity = self.config.segment_bytes_max as usize - SEGMENT_HEADER_BYTES;
        let mut batch_bytes = 0usize;
        for message in batch {
            let bound = record_bytes_bound(message);
            if bound > record_bytes(RECORD_PAYLOAD_BYTES_MAX) || bound > capacity {
                return Err(StoreError::RecordTooLarge(bound));
            }
            batch_bytes += bound;
        }
        if batch_bytes > capacity {
            return Err(StoreError::RecordTooLarge(batch_bytes));
        }
        if self.active.end + batch_bytes > self.active.map.len() {
            self.roll()?;
        } else if self.active.end + batch_bytes > self.active.ready {
            self.reserve_active()?;
        }
        let start = self.next_offset;
        let time_ms = now_ms.max(self.last_time_ms);
        for message in batch {
            let active = &mut self.active;
            let position = active.end;
            // The bound reserved room for the whole batch (checked above), so this slice is in
            // the mapping; the message is archived straight into it.
            let bound = record_bytes_bound(message);
            let out = &mut active.map.bytes_mut()[position..position + bound];
            let encoded = self
                .encoder
                .encode_into(message, &mut out[RECORD_HEADER_BYTES..]);
            let payload_len = match encoded {
                Ok(len) => len,
                Err(e) => {
                    // Keep invariant 4 (zeros after the last record) for what this wrote.
                    out.fill(0);
                    return Err(StoreError::Damaged {
                        path: self.dir.clone(),
                        reason: format!("cannot archive a message: {e}"),
                    });
                }
            };
            let size = record_bytes(payload_len);
            let len_word = seal_record(&mut out[..size], self.next_offset, time_ms, payload_len);
            active
                .map
                .publish_u32(position + RECORD_LEN_POSITION, len_word);
            let relative = (self.next_offset.0 - active.base.0) as u32;
            if let Some(entry) = active.policy.observe(position, relative, time_ms) {
                active.index.push(entry);
            }
            active.end = position + size;
            active.last_time_ms = Some(time_ms);
            self.next_offset = self.next_offset.next();
        }
        self.last_time_ms = time_ms;
        // Index entries are derived data (rebuilt by recovery): a failed write is not a failed
        // append.
        let _ = self.active.index.write_pending();
        Ok(OffsetRange {
            start,
            end: self.next_offset,
        })
    }

    /// The durability policy this partition was opened with.
    pub fn fsync(&self) -> Fsync {
        self.config.fsync
    }

    /// Flushes what the active segment holds (`msync`), whatever the policy: for shutdown.
    pub fn flush(&mut self) -> Result<(), StoreError> {
        self.flush_active()
    }

    fn flush_active(&mut self) -> Result<(), StoreError> {
        let active = &mut self.active;
        if active.unflushed_from < active.end {
            active
                .map
                .flush(active.unflushed_from, active.end)
                .map_err(|e| {
                    StoreError::io("flush", layout::segment_path(&self.dir, active.base), e)
                })?;
            active.unflushed_from = active.end;
        }
        Ok(())
    }

    /// Retries what recovery could not do (a full disk at open): reserve the rest of the active
    /// segment before anything is written there. Runs on the append path, once.
    fn reserve_active(&mut self) -> Result<(), StoreError> {
        let active = &mut self.active;
        reserve(&active.file, &active.map, active.end, self.helper.faults()).map_err(|e| {
            StoreError::io(
                "preallocate",
                layout::segment_path(&self.dir, active.base),
                e,
            )
        })?;
        active.ready = active.map.len();
        Ok(())
    }

    /// Seals the active segment and starts the prepared one at `next_offset`.
    fn roll(&mut self) -> Result<(), StoreError> {
        let prepared = self.helper.take_prepared()?;
        if self.config.fsync != Fsync::Never {
            self.flush_active()?;
        }
        let _ = self.active.index.write_pending();
        let follow = prepared
            .file
            .try_clone()
            .map_err(|e| StoreError::io("open", &self.dir, e))?;
        let new = install_segment(
            &self.dir,
            prepared,
            self.next_offset,
            self.config.fsync,
            self.config.index_interval_bytes,
        )?;
        let old = std::mem::replace(&mut self.active, new);
        self.sealed.push_back(SealedSegment {
            base: old.base,
            file_bytes: old.map.len() as u64,
            last_time_ms: old.last_time_ms,
        });
        self.helper.follow(follow, old.map);
        self.helper.request_prepare();
        Ok(())
    }

    /// Deletes whole sealed segments, oldest first, while the oldest is past the age limit
    /// (its newest record is older than `retention_age`) or the partition's files take more
    /// than `retention_bytes_max`. The active segment is never deleted. Readers that have a
    /// deleted segment mapped keep reading it: unlinking does not unmap.
    pub fn enforce_retention(&mut self, now_ms: u64) -> Result<RetentionReport, StoreError> {
        let age_ms = self.config.retention_age.as_millis() as u64;
        let mut total_bytes: u64 =
            self.sealed.iter().map(|s| s.file_bytes).sum::<u64>() + self.active.map.len() as u64;
        let mut report = RetentionReport::default();
        while let Some(oldest) = self.sealed.front() {
            let too_old = oldest
                .last_time_ms
                .is_none_or(|t| t.saturating_add(age_ms) < now_ms);
            let too_big = total_bytes > self.config.retention_bytes_max;
            if !too_old && !too_big {
                break;
            }
            // The index goes first: a segment without an index is rebuilt, the reverse would
            // leave an orphan index.
            let index = layout::index_path(&self.dir, oldest.base);
            match fs::remove_file(&index) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(StoreError::io("delete", index, e)),
            }
            let segment = layout::segment_path(&self.dir, oldest.base);
            fs::remove_file(&segment).map_err(|e| StoreError::io("delete", segment, e))?;
            total_bytes -= oldest.file_bytes;
            report.segments_deleted += 1;
            report.bytes_deleted += oldest.file_bytes;
            self.sealed.pop_front();
        }
        if report.segments_deleted > 0 && self.config.fsync != Fsync::Never {
            layout::sync_dir(&self.dir)?;
        }
        Ok(report)
    }

    #[cfg(test)]
    pub(super) fn fail_next_preparations(&self, count: u32) {
        self.helper.faults().fail_next(count);
    }

    #[cfg(test)]
    pub(super) fn segment_count(&self) -> usize {
        self.sealed.len() + 1
    }
}

impl Drop for PartitionLog {
    fn drop(&mut self) {
        // The policy's promise holds on a clean shutdown too; errors have nowhere to go here.
        if self.config.fsync != Fsync::Never {
            let _ = self.flush_active();
        }
        let _ = self.active.index.write_pending();
    }
}

/// An upper bound of `record_bytes` for a message, computable before archiving it: the rkyv
/// archive holds the 24-byte root, each property as 16 bytes plus its strings, the body, and at
/// most 15 bytes of alignment padding per object.
fn record_bytes_bound(message: &MessageRef<'_>) -> usize {
    let properties = message
        .system_properties
        .iter()
        .chain(message.application_properties);
    let property_bytes: usize = properties
        .map(|p| 16 + p.name.len() + p.value.len() + 32)
        .sum();
    record_bytes(24 + 16 + message.body.len() + 16 + 2 * 16 + property_bytes)
}

/// Writes the segment header into a prepared file and gives it its name: the roll's commit
/// point. The header is written before the rename, so a reader never sees a named segment
/// without one.
fn install_segment(
    dir: &Path,
    mut prepared: Prepared,
    base: Offset,
    fsync: Fsync,
    index_interval: u32,
) -> Result<ActiveSegment, StoreError> {
    let mut header = [0u8; SEGMENT_HEADER_BYTES];
    encode_segment_header(&mut header, base);
    prepared.map.bytes_mut()[..SEGMENT_HEADER_BYTES].copy_from_slice(&header);
    let path = layout::segment_path(dir, base);
    if fsync != Fsync::Never {
        prepared
            .map
            .flush(0, SEGMENT_HEADER_BYTES)
            .map_err(|e| StoreError::io("flush", &path, e))?;
    }
    let index = IndexWriter::create(&layout::index_path(dir, base), &[])?;
    fs::rename(dir.join(PREPARED_NAME), &path).map_err(|e| StoreError::io("rename", &path, e))?;
    if fsync != Fsync::Never {
        layout::sync_dir(dir)?;
    }
    Ok(ActiveSegment {
        base,
        file: prepared.file,
        ready: prepared.map.len(),
        map: prepared.map,
        end: SEGMENT_HEADER_BYTES,
        unflushed_from: SEGMENT_HEADER_BYTES,
        index,
        policy: IndexPolicy::new(index_interval),
        last_time_ms: None,
    })
}

/// Opens a sealed segment read-only to learn its newest time, checking its index on the way
/// and rebuilding it when it is missing or does not match the segment.
fn open_sealed(dir: &Path, base: Offset, index_interval: u32) -> Result<SealedSegment, StoreError> {
    let path = layout::segment_path(dir, base);
    let file = File::open(&path).map_err(|e| StoreError::io("open", &path, e))?;
    let map = ReadMap::new(&file).map_err(|e| StoreError::io("map", &path, e))?;
    // The writer holds the lock: nobody writes this file, so the whole map is stable.
    let bytes = map.bytes(0, map.len()).unwrap_or_default();
    let index_file = layout::index_path(dir, base);
    let entries = index::read_index(&index_file)?;
    let tail = entries
        .last()
        .filter(|_| index::is_plausible(&entries, bytes.len()))
        .and_then(|last| {
            let scan = scan_from(
                bytes,
                base,
                last.position as usize,
                Offset(base.0 + u64::from(last.relative_offset)),
                None,
            );
            // The entry must land on its own record for the index to be trusted.
            (scan.records > 0).then_some(scan)
        });
    let last_time_ms = match tail {
        Some(scan) => scan.last_time_ms,
        None => {
            let scan = scan_segment(bytes, base, Some(index_interval));
            let encoded: Vec<u8> = scan.index.iter().flat_map(|e| e.encode()).collect();
            let name = index_file
                .file_name()
                .and_then(|n| n.to_str())
                .unwrap_or_default();
            layout::write_atomically(dir, name, &encoded)?;
            scan.last_time_ms
        }
    };
    Ok(SealedSegment {
        base,
        file_bytes: map.len() as u64,
        last_time_ms,
    })
}

/// Maps the last segment writable, cuts a torn tail (zeroes everything after the last valid
/// record; the file keeps its size) and rebuilds its index from the scan.
fn recover_active(
    dir: &Path,
    base: Offset,
    config: &StoreConfig,
    faults: &PrepareFaults,
) -> Result<(ActiveSegment, Offset), StoreError> {
    let path = layout::segment_path(dir, base);
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .map_err(|e| StoreError::io("open", &path, e))?;
    let mut map = WriteMap::new(&file).map_err(|e| StoreError::io("map", &path, e))?;
    if map.len() < SEGMENT_HEADER_BYTES {
        return Err(StoreError::Damaged {
            path,
            reason: "shorter than a segment header".into(),
        });
    }
    match decode_segment_header(map.bytes()) {
        Ok(header) if header.base_offset == base => {}
        // A power loss between the rename and the header reaching the disk: the segment was
        // empty (records are flushed after the header), so the header is written again.
        Err(FormatError::Empty) => {
            let mut header = [0u8; SEGMENT_HEADER_BYTES];
            encode_segment_header(&mut header, base);
            map.bytes_mut()[..SEGMENT_HEADER_BYTES].copy_from_slice(&header);
        }
        Ok(_) => {
            return Err(StoreError::Damaged {
                path,
                reason: "the header names another base offset".into(),
            })
        }
        Err(e) => {
            return Err(StoreError::Damaged {
                path,
                reason: format!("bad segment header: {e}"),
            })
        }
    }
    // The rest of the segment will be appended to: take its page faults (and reserve its
    // blocks) now, not per append. On a full disk the hub still opens; appends are refused
    // until the reservation succeeds. Zeroing a torn tail below needs no reservation: nonzero
    // bytes lie on pages that already have their blocks.
    let reserved = reserve(&file, &map, SEGMENT_HEADER_BYTES, faults).is_ok();
    let interval = Some(config.index_interval_bytes);
    let mut scan = scan_segment(map.bytes(), base, interval);
    // Damage followed by valid records is not a torn tail (a crash tears only the end): keep
    // every byte, resume after the last valid record, and let readers and `verify` report the
    // damaged ones. Zeroing it all would turn one flipped bit into lost records.
    while let Stop::Invalid(_) = scan.stop {
        let Some((position, header)) = resync(map.bytes(), scan.end, scan.next_offset) else {
            break;
        };
        let rest = scan_from(map.bytes(), base, position, header.offset, interval);
        let mut index = std::mem::take(&mut scan.index);
        index.extend(rest.index.iter().copied());
        scan = Scan {
            index,
            first_time_ms: scan.first_time_ms,
            records: scan.records + rest.records,
            ..rest
        };
    }
    if let Some((start, end)) = zero_tail(map.bytes_mut(), scan.end) {
        map.flush(start, end)
            .map_err(|e| StoreError::io("flush", &path, e))?;
    }
    let index = IndexWriter::create(&layout::index_path(dir, base), &scan.index)?;
    let active = ActiveSegment {
        base,
        file,
        ready: if reserved { map.len() } else { scan.end },
        map,
        end: scan.end,
        unflushed_from: scan.end,
        index,
        policy: IndexPolicy::resume(config.index_interval_bytes, scan.index.last().copied()),
        last_time_ms: scan.last_time_ms,
    };
    Ok((active, scan.next_offset))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::format::PropertyRef;
    use crate::store::{PartitionReader, Reader, StartAt};

    fn config() -> StoreConfig {
        let mut config = StoreConfig::new(1);
        config.segment_bytes_max = 64 * 1024;
        config.index_interval_bytes = 512;
        config.fsync = Fsync::Never;
        config
    }

    fn body(i: u64) -> Vec<u8> {
        format!("message {i} {}", "y".repeat((i * 7 % 200) as usize)).into_bytes()
    }

    fn append(log: &mut PartitionLog, range: std::ops::Range<u64>, batch: usize, time_ms: u64) {
        let bodies: Vec<Vec<u8>> = range.clone().map(body).collect();
        let props = [PropertyRef {
            name: "k",
            value: "v",
        }];
        let messages: Vec<MessageRef<'_>> = bodies
            .iter()
            .map(|b| MessageRef {
                system_properties: &props,
                application_properties: &[],
                body: b,
            })
            .collect();
        let mut next = range.start;
        for chunk in messages.chunks(batch) {
            let got = log.append_batch(chunk, time_ms).unwrap();
            assert_eq!(got.start, Offset(next));
            assert_eq!(got.len(), chunk.len() as u64);
            next = got.end.0;
        }
    }

    fn read_all(dir: &Path) -> Vec<(u64, Vec<u8>)> {
        let reader = Reader::open(dir).unwrap();
        let mut r: PartitionReader = reader.partition(PartitionId(0), StartAt::Start).unwrap();
        let mut out = Vec::new();
        while let Some(record) = r.next().unwrap() {
            out.push((record.offset.0, record.message.body().to_vec()));
        }
        out
    }

    fn expected(range: std::ops::Range<u64>) -> Vec<(u64, Vec<u8>)> {
        range.map(|i| (i, body(i))).collect()
    }

    #[test]
    fn appends_roll_and_resume_after_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::open(dir.path(), config()).unwrap();
        let log = store.partition_mut(PartitionId(0)).unwrap();
        append(log, 0..1500, 7, 1000);
        assert!(log.segment_count() > 3, "segments: {}", log.segment_count());
        drop(store);
        assert_eq!(read_all(dir.path()), expected(0..1500));
        let mut store = Store::open(dir.path(), config()).unwrap();
        let log = store.partition_mut(PartitionId(0)).unwrap();
        assert_eq!(log.next_offset(), Offset(1500));
        append(log, 1500..1600, 10, 2000);
        drop(store);
        assert_eq!(read_all(dir.path()), expected(0..1600));
    }

    #[test]
    fn a_torn_tail_is_cut_and_its_offsets_reused() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::open(dir.path(), config()).unwrap();
        append(store.partition_mut(PartitionId(0)).unwrap(), 0..20, 5, 1000);
        drop(store);
        // What a SIGKILL in the middle of a record leaves: bytes without a length word.
        let pdir = layout::partition_dir(dir.path(), PartitionId(0));
        let path = layout::segment_path(&pdir, Offset(0));
        let mut bytes = fs::read(&path).unwrap();
        let end = scan_segment(&bytes, Offset(0), None).end;
        bytes[end + 4..end + 300].fill(0xAB);
        fs::write(&path, &bytes).unwrap();
        let len_before = bytes.len();
        let mut store = Store::open(dir.path(), config()).unwrap();
        let log = store.partition_mut(PartitionId(0)).unwrap();
        assert_eq!(log.next_offset(), Offset(20));
        append(log, 20..25, 5, 2000);
        drop(store);
        assert_eq!(
            fs::metadata(&path).unwrap().len() as usize,
            len_before,
            "never shrunk"
        );
        assert_eq!(read_all(dir.path()), expected(0..25));
    }

    #[test]
    fn damage_in_the_middle_keeps_the_records_after_it() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::open(dir.path(), config()).unwrap();
        append(store.partition_mut(PartitionId(0)).unwrap(), 0..20, 1, 1000);
        drop(store);
        let pdir = layout::partition_dir(dir.path(), PartitionId(0));
        let path = layout::segment_path(&pdir, Offset(0));
        let mut bytes = fs::read(&path).unwrap();
        let position = scan_segment(&bytes, Offset(0), Some(1)).index[5].position as usize;
        bytes[position + 40] ^= 1;
        fs::write(&path, &bytes).unwrap();
        let mut store = Store::open(dir.path(), config()).unwrap();
        assert_eq!(
            store.partition_mut(PartitionId(0)).unwrap().next_offset(),
            Offset(20)
        );
    }

    #[test]
    fn a_missing_or_damaged_index_is_rebuilt() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::open(dir.path(), config()).unwrap();
        append(
            store.partition_mut(PartitionId(0)).unwrap(),
            0..1000,
            10,
            1000,
        );
        drop(store);
        let pdir = layout::partition_dir(dir.path(), PartitionId(0));
        let bases = layout::list_segments(&pdir).unwrap();
        fs::remove_file(layout::index_path(&pdir, bases[0])).unwrap();
        fs::write(layout::index_path(&pdir, bases[1]), [0xFFu8; 40]).unwrap();
        let store = Store::open(dir.path(), config()).unwrap();
        drop(store);
        for base in &bases[..2] {
            let entries = index::read_index(&layout::index_path(&pdir, *base)).unwrap();
            assert!(!entries.is_empty());
            assert_eq!(entries[0].position as usize, SEGMENT_HEADER_BYTES);
        }
        let reader = Reader::open(dir.path()).unwrap();
        let mut r = reader
            .partition(PartitionId(0), StartAt::Offset(Offset(500)))
            .unwrap();
        assert_eq!(r.next().unwrap().unwrap().offset, Offset(500));
    }

    #[test]
    fn the_partition_count_cannot_change_and_one_writer_only() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), config()).unwrap();
        assert!(matches!(
            Store::open(dir.path(), config()),
            Err(StoreError::Locked(_))
        ));
        drop(store);
        let mut four = config();
        four.partitions = 4;
        let error = Store::open(dir.path(), four).unwrap_err();
        assert!(matches!(
            error,
            StoreError::PartitionCountChanged {
                existing: 1,
                requested: 4,
                ..
            }
        ));
        assert!(error.to_string().contains("keep partitions = 1"));
    }

    #[test]
    fn retention_deletes_whole_sealed_segments_by_age_and_size() {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = config();
        cfg.retention_age = Duration::from_secs(60);
        let mut store = Store::open(dir.path(), cfg.clone()).unwrap();
        let log = store.partition_mut(PartitionId(0)).unwrap();
        append(log, 0..600, 10, 1_000);
        append(log, 600..1200, 10, 100_000);
        let segments = log.segment_count();
        assert!(segments >= 4);
        // A reader in the middle of an old segment keeps reading after it is deleted.
        let reader = Reader::open(dir.path()).unwrap();
        let mut old = reader.partition(PartitionId(0), StartAt::Start).unwrap();
        assert_eq!(old.next().unwrap().unwrap().offset, Offset(0));
        // At 50 s nothing is 60 s old.
        assert_eq!(log.enforce_retention(50_000).unwrap().segments_deleted, 0);
        let report = log.enforce_retention(90_000).unwrap();
        assert!(report.segments_deleted >= 1);
        let first = log.first_offset();
        assert!(first.0 <= 600 && first.0 > 0, "first offset {first}");
        assert_eq!(old.next().unwrap().unwrap().offset, Offset(1));
        // By size: keep at most two segments' worth.
        let mut small = cfg;
        small.retention_bytes_max = 2 * small.segment_bytes_max;
        log.config = small;
        log.enforce_retention(90_000).unwrap();
        assert_eq!(log.segment_count(), 2);
        drop(store);
        let records = read_all(dir.path());
        assert_eq!(records.last().unwrap().0, 1199);
        let from = records[0].0;
        assert_eq!(records, expected(from..1200));
    }

    #[test]
    fn a_full_disk_refuses_the_batch_and_recovers() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::open(dir.path(), config()).unwrap();
        let log = store.partition_mut(PartitionId(0)).unwrap();
        append(log, 0..10, 10, 1000);
        // Both the background preparation and the retry on the append path fail.
        log.fail_next_preparations(u32::MAX);
        // Wait for the background preparation that was requested at open to finish first.
        std::thread::sleep(Duration::from_millis(200));
        let payload = vec![7u8; 1000];
        let message = MessageRef {
            system_properties: &[],
            application_properties: &[],
            body: &payload,
        };
        let mut refused = None;
        for _ in 0..200 {
            match log.append_batch(&[message], 2000) {
                Ok(_) => {}
                Err(e) => {
                    refused = Some(e);
                    break;
                }
            }
        }
        let next = log.next_offset();
        assert!(
            matches!(refused, Some(StoreError::DiskFull { .. })),
            "{refused:?}"
        );
        assert!(log.append_batch(&[message], 2000).is_err());
        assert_eq!(log.next_offset(), next, "a refused batch takes no offset");
        log.fail_next_preparations(0);
        let range = log.append_batch(&[message], 3000).unwrap();
        assert_eq!(range.start, next);
        drop(store);
        let records = read_all(dir.path());
        assert_eq!(records.len() as u64, next.0 + 1);
        assert!(records.iter().enumerate().all(|(i, r)| r.0 == i as u64));
    }

    #[test]
    fn an_active_segment_recovery_could_not_reserve_is_reserved_before_appending() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::open(dir.path(), config()).unwrap();
        let log = store.partition_mut(PartitionId(0)).unwrap();
        append(log, 0..10, 10, 1000);
        // What `recover_active` leaves when the disk was full at open.
        log.active.ready = log.active.end;
        log.fail_next_preparations(1);
        let payload = [1u8; 100];
        let message = MessageRef {
            system_properties: &[],
            application_properties: &[],
            body: &payload,
        };
        assert!(matches!(
            log.append_batch(&[message], 2000),
            Err(StoreError::DiskFull { .. })
        ));
        assert_eq!(
            log.next_offset(),
            Offset(10),
            "a refused batch takes no offset"
        );
        assert_eq!(log.segment_count(), 1, "and does not roll");
        append(log, 10..20, 5, 3000);
        assert_eq!(log.active.ready, log.active.map.len());
        drop(store);
        assert_eq!(read_all(dir.path()), expected(0..20));
    }

    #[test]
    fn the_size_bound_holds_for_any_message_shape() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let mut encoder = MessageEncoder::default();
        for _ in 0..2000 {
            let texts: Vec<String> = (0..rng.gen_range(0..12))
                .map(|_| "n".repeat(rng.gen_range(0..40)))
                .collect();
            let props: Vec<PropertyRef<'_>> = texts
                .chunks(2)
                .map(|pair| PropertyRef {
                    name: &pair[0],
                    value: pair.last().unwrap(),
                })
                .collect();
            let split = rng.gen_range(0..=props.len());
            let body = vec![1u8; rng.gen_range(0..3000)];
            let message = MessageRef {
                system_properties: &props[..split],
                application_properties: &props[split..],
                body: &body,
            };
            let actual = record_bytes(encoder.encode(&message).unwrap().len());
            assert!(actual <= record_bytes_bound(&message), "{actual} > bound");
        }
    }

    #[test]
    fn oversized_messages_are_refused_before_anything_is_written() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::open(dir.path(), config()).unwrap();
        let log = store.partition_mut(PartitionId(0)).unwrap();
        let big = vec![0u8; 70 * 1024];
        let message = MessageRef {
            system_properties: &[],
            application_properties: &[],
            body: &big,
        };
        assert!(matches!(
            log.append_batch(&[message], 1),
            Err(StoreError::RecordTooLarge(_))
        ));
        assert_eq!(log.next_offset(), Offset(0));
    }

    #[test]
    fn every_fsync_policy_appends() {
        for fsync in [Fsync::Never, Fsync::Interval(5), Fsync::Always] {
            let dir = tempfile::tempdir().unwrap();
            let mut cfg = config();
            cfg.fsync = fsync;
            let mut store = Store::open(dir.path(), cfg).unwrap();
            append(
                store.partition_mut(PartitionId(0)).unwrap(),
                0..300,
                16,
                1000,
            );
            std::thread::sleep(Duration::from_millis(20));
            drop(store);
            assert_eq!(read_all(dir.path()), expected(0..300), "{fsync:?}");
        }
    }

    #[test]
    fn a_clock_that_goes_back_is_clamped() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::open(dir.path(), config()).unwrap();
        let log = store.partition_mut(PartitionId(0)).unwrap();
        append(log, 0..1, 1, 5000);
        append(log, 1..2, 1, 4000);
        drop(store);
        let reader = Reader::open(dir.path()).unwrap();
        let mut r = reader.partition(PartitionId(0), StartAt::Start).unwrap();
        assert_eq!(r.next().unwrap().unwrap().enqueued_time_ms, 5000);
        assert_eq!(r.next().unwrap().unwrap().enqueued_time_ms, 5000);
    }
}
