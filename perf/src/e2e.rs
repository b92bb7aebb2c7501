//! `run --e2e`: publish -> readable in the segment files, measured through Ingot's reader library.
//!
//! The generator stamps the first [`STAMP_BYTES`] of every payload in place (it patches its
//! pre-encoded PUBLISH, as it does the packet id, so nothing is allocated): a run nonce, the
//! send time on the run's shared monotonic clock, and a sequence number (connection index,
//! per-connection counter, and whether the message was sent while measuring). A reader thread
//! opens every partition of the hub's event log at its end before the first connect, follows
//! the tails with `ingot_engine::store::PartitionReader` (the library `ingot monitor-events`
//! uses), and records `now - stamp` for every stamped record into an HDR histogram.
//!
//! The send time is the one the PUBACK latency counts from (the batch's write, or in an open
//! loop the intended send time), so the two figures compare, and an open-loop run charges a
//! stall to the end-to-end latency too. The reader sleeps `--e2e-poll-us` when every partition
//! is at its end; that sleep is the resolution of the figure. After the run the reader keeps
//! reading until every message sent while measuring was seen, or `--e2e-drain` seconds pass;
//! what it never saw is reported as `unread` (a message that never becomes readable has no
//! latency to record, so it is counted instead of hidden). Per connection the sequence numbers
//! must arrive in order: a lower one counts as `out_of_order`, a jump as `gaps`.
//!
//! Only a hub on this machine can be measured this way: the reader maps the segment files.

use std::hash::{BuildHasher as _, Hasher as _};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use hdrhistogram::Histogram;
use ingot_engine::store::{PartitionId, PartitionReader, Reader, StartAt};

use crate::latency::{histogram, Clock};

/// Bytes of the stamp at the start of a payload: nonce, send time (ns), sequence.
pub const STAMP_BYTES: usize = 24;
/// The sequence's bit that says the message was sent while measuring.
const MEASURED_BIT: u64 = 1 << 63;
/// Records read from one partition before looking at the next.
const ROUND_RECORDS_MAX: usize = 4096;
/// Read errors in a row on one partition before the reader gives up. The reader library can
/// report a gap for a moment while the hub rolls a segment (it lists the directory between the
/// rename of the next segment and its own check for it); the next look finds the segment.
/// Damage that stays is reported after this many looks, `poll` apart.
const READ_ERRORS_IN_A_ROW_MAX: u32 = 1000;

/// A nonce that tells this run's messages from anything else in the log.
pub fn new_nonce() -> u64 {
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u64(u64::from(std::process::id()));
    hasher.finish() | 1
}

/// The sequence number of message `counter` of connection `conn`.
pub fn sequence(conn: usize, counter: u32, measured: bool) -> u64 {
    let conn = (conn as u64) & 0x7fff_ffff;
    (conn << 32) | u64::from(counter) | if measured { MEASURED_BIT } else { 0 }
}

/// Writes the stamp into the first [`STAMP_BYTES`] of `payload` (shorter payloads are left as
/// they are; `run --e2e` refuses them).
pub fn write_stamp(payload: &mut [u8], nonce: u64, sent_ns: u64, seq: u64) {
    if let Some(stamp) = payload.get_mut(..STAMP_BYTES) {
        stamp[..8].copy_from_slice(&nonce.to_le_bytes());
        stamp[8..16].copy_from_slice(&sent_ns.to_le_bytes());
        stamp[16..24].copy_from_slice(&seq.to_le_bytes());
    }
}

/// A stamp of this run: `(sent_ns, connection, counter, measured)`.
pub fn read_stamp(body: &[u8], nonce: u64) -> Option<(u64, usize, u32, bool)> {
    let word = |at: usize| -> Option<u64> {
        let bytes: [u8; 8] = body.get(at..at + 8)?.try_into().ok()?;
        Some(u64::from_le_bytes(bytes))
    };
    if word(0)? != nonce {
        return None;
    }
    let seq = word(16)?;
    Some((
        word(8)?,
        ((seq & !MEASURED_BIT) >> 32) as usize,
        seq as u32,
        seq & MEASURED_BIT != 0,
    ))
}

/// What the reader saw.
#[derive(Debug)]
pub struct TailResult {
    /// Publish -> readable of the messages sent while measuring, microseconds.
    pub latency_us: Histogram<u64>,
    /// Stamped records read, warm-up included.
    pub read: u64,
    /// Stamped records sent while measuring that were read.
    pub read_measured: u64,
    /// Messages sent while measuring that were never read.
    pub unread: u64,
    /// Records without this run's stamp (other traffic in the same hub).
    pub foreign: u64,
    pub out_of_order: u64,
    pub gaps: u64,
    /// Read errors that went away on the next look (see [`READ_ERRORS_IN_A_ROW_MAX`]).
    pub read_errors: u64,
    /// Seconds the reader waited after the run for the last messages.
    pub drain_secs: f64,
}

#[derive(Debug, Default)]
struct TailShared {
    /// Set when the run is over; from then on the reader stops once `expected` measured
    /// messages were read or the drain time is up.
    finishing: AtomicBool,
    expected: AtomicU64,
    read: AtomicU64,
}

/// The reader thread.
#[derive(Debug)]
pub struct Tail {
    shared: Arc<TailShared>,
    handle: std::thread::JoinHandle<anyhow::Result<TailResult>>,
    /// One histogram per second of everything read in it, for the progress line.
    pub progress: Option<mpsc::Receiver<Histogram<u64>>>,
}

impl Tail {
    /// Opens every partition of `data_dir` at its end (before this returns, so that nothing
    /// published after it is missed) and starts following them.
    pub fn start(
        data_dir: &Path,
        nonce: u64,
        clock: Clock,
        devices: usize,
        poll: Duration,
        drain: Duration,
    ) -> anyhow::Result<Self> {
        Self::start_at(data_dir, StartAt::End, nonce, clock, devices, poll, drain)
    }

    fn start_at(
        data_dir: &Path,
        start: StartAt,
        nonce: u64,
        clock: Clock,
        devices: usize,
        poll: Duration,
        drain: Duration,
    ) -> anyhow::Result<Self> {
        let reader = Reader::open(data_dir).with_context(|| {
            format!(
                "--e2e reads the hub's event log in {}/events: open it",
                data_dir.display()
            )
        })?;
        let mut partitions = Vec::new();
        for p in 0..reader.partition_count() {
            partitions.push(
                reader
                    .partition(PartitionId(p), start)
                    .with_context(|| format!("open partition {p} at {start:?}"))?,
            );
        }
        if partitions.is_empty() {
            bail!("the event log in {} has no partition", data_dir.display());
        }
        let shared = Arc::new(TailShared::default());
        let (sender, progress) = mpsc::channel();
        let state = TailState {
            partitions,
            nonce,
            clock,
            poll,
            drain,
            shared: shared.clone(),
            progress: sender,
            next_counter: vec![0; devices],
        };
        let handle = std::thread::Builder::new()
            .name("load-e2e".into())
            .spawn(move || state.run())
            .context("spawn the e2e reader thread")?;
        Ok(Self {
            shared,
            handle,
            progress: Some(progress),
        })
    }

    /// Stamped records read so far.
    pub fn read(&self) -> u64 {
        self.shared.read.load(Ordering::Relaxed)
    }

    /// Waits until `expected` measured messages were read (or the drain time is up) and returns
    /// what the reader saw.
    pub fn finish(self, expected: u64) -> anyhow::Result<TailResult> {
        self.shared.expected.store(expected, Ordering::Relaxed);
        self.shared.finishing.store(true, Ordering::Release);
        match self.handle.join() {
            Ok(result) => result,
            Err(_) => bail!("the e2e reader thread panicked"),
        }
    }
}

struct TailState {
    partitions: Vec<PartitionReader>,
    nonce: u64,
    clock: Clock,
    poll: Duration,
    drain: Duration,
    shared: Arc<TailShared>,
    progress: mpsc::Sender<Histogram<u64>>,
    /// Per connection, the counter its next message should have.
    next_counter: Vec<u32>,
}

impl TailState {
    fn run(mut self) -> anyhow::Result<TailResult> {
        let mut result = TailResult {
            latency_us: histogram(),
            read: 0,
            read_measured: 0,
            unread: 0,
            foreign: 0,
            out_of_order: 0,
            gaps: 0,
            read_errors: 0,
            drain_secs: 0.0,
        };
        let mut errors_in_a_row = vec![0u32; self.partitions.len()];
        let mut interval = histogram();
        let mut next_report = Instant::now() + Duration::from_secs(1);
        let mut drain_started: Option<Instant> = None;
        loop {
            let mut progressed = false;
            for (partition, in_a_row) in self.partitions.iter_mut().zip(&mut errors_in_a_row) {
                for _ in 0..ROUND_RECORDS_MAX {
                    let record = match partition.next() {
                        Ok(Some(record)) => record,
                        Ok(None) => break,
                        Err(e) => {
                            *in_a_row += 1;
                            if *in_a_row >= READ_ERRORS_IN_A_ROW_MAX {
                                return Err(anyhow::Error::new(e).context(format!(
                                    "--e2e: the event log stays unreadable ({in_a_row} looks \
                                     in a row)"
                                )));
                            }
                            if result.read_errors == 0 {
                                eprintln!("ingot-load: --e2e: {e}; looking again");
                            }
                            result.read_errors += 1;
                            break;
                        }
                    };
                    *in_a_row = 0;
                    progressed = true;
                    let Some((sent_ns, conn, counter, measured)) =
                        read_stamp(record.message.body(), self.nonce)
                    else {
                        result.foreign += 1;
                        continue;
                    };
                    let latency_us = self.clock.now_ns().saturating_sub(sent_ns) / 1_000;
                    result.read += 1;
                    interval.saturating_record(latency_us);
                    if measured {
                        result.read_measured += 1;
                        result.latency_us.saturating_record(latency_us);
                    }
                    if let Some(next) = self.next_counter.get_mut(conn) {
                        if counter < *next {
                            result.out_of_order += 1;
                        } else {
                            result.gaps += u64::from(counter - *next);
                            *next = counter.wrapping_add(1);
                        }
                    }
                }
            }
            self.shared.read.store(result.read, Ordering::Relaxed);
            if Instant::now() >= next_report {
                next_report = Instant::now() + Duration::from_secs(1);
                let _ = self.progress.send(interval.clone());
                interval.reset();
            }
            if self.shared.finishing.load(Ordering::Acquire) {
                let started = *drain_started.get_or_insert_with(Instant::now);
                let expected = self.shared.expected.load(Ordering::Relaxed);
                if result.read_measured >= expected || started.elapsed() >= self.drain {
                    result.unread = expected.saturating_sub(result.read_measured);
                    result.drain_secs = started.elapsed().as_secs_f64();
                    return Ok(result);
                }
            }
            if !progressed {
                std::thread::sleep(self.poll);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stamps_round_trip_and_other_runs_are_foreign() {
        let mut payload = vec![b'x'; 40];
        let seq = sequence(70_000, 12, true);
        write_stamp(&mut payload, 0xabcd, 123_456_789, seq);
        assert_eq!(
            read_stamp(&payload, 0xabcd),
            Some((123_456_789, 70_000, 12, true))
        );
        assert_eq!(read_stamp(&payload, 0xabce), None, "another run's nonce");
        assert_eq!(read_stamp(&payload[..20], 0xabcd), None, "too short");
        assert_eq!(
            &payload[24..],
            &[b'x'; 16],
            "the rest of the payload is kept"
        );
        write_stamp(&mut payload, 7, 1, sequence(3, u32::MAX, false));
        assert_eq!(read_stamp(&payload, 7), Some((1, 3, u32::MAX, false)));
    }

    /// The reader counts this run's records, tells others apart, and reports damage that
    /// does not go away as an error instead of waiting for ever.
    #[test]
    fn the_tail_reads_stamped_records_and_gives_up_on_lasting_damage() {
        use ingot_engine::store::{MessageRef, Store, StoreConfig};

        let dir = tempfile::tempdir().expect("temporary directory");
        let mut config = StoreConfig::new(1);
        config.segment_bytes_max = 1 << 20;
        let mut store = Store::open(dir.path(), config).expect("store");
        let clock = Clock::new();
        let poll = Duration::from_micros(100);
        let drain = Duration::from_secs(5);
        let append = |store: &mut Store, body: &[u8]| {
            let message = MessageRef {
                system_properties: &[],
                application_properties: &[],
                body,
            };
            store
                .append_batch(PartitionId(0), &[message], 1_764_151_200_000)
                .expect("appended");
        };
        // Before the tail starts: not read (it starts at the end).
        append(&mut store, b"old");
        let tail = Tail::start(dir.path(), 42, clock, 2, poll, drain).expect("tail");
        for counter in 0..3 {
            let mut body = [b'x'; 32];
            let seq = sequence(1, counter, counter > 0);
            write_stamp(&mut body, 42, clock.now_ns(), seq);
            append(&mut store, &body);
        }
        append(&mut store, b"someone else's message");
        let result = tail.finish(2).expect("read");
        assert_eq!(
            (result.read, result.read_measured, result.unread),
            (3, 2, 0)
        );
        assert_eq!(
            (result.gaps, result.out_of_order, result.read_errors),
            (0, 0, 0)
        );
        assert_eq!(result.latency_us.len(), 2);

        // A damaged record (its checksum fails on every look): the tail says so instead of
        // waiting for it.
        let marker = [b'y'; 40];
        append(&mut store, &marker);
        let segment = dir.path().join("events/p0000/00000000000000000000.log");
        let bytes = std::fs::read(&segment).expect("segment");
        let at = bytes
            .windows(marker.len())
            .position(|w| w == marker)
            .expect("the record is in the segment");
        let file = std::fs::OpenOptions::new()
            .write(true)
            .open(&segment)
            .expect("open the segment");
        std::os::unix::fs::FileExt::write_all_at(&file, b"z", at as u64).expect("damage");
        let tail =
            Tail::start_at(dir.path(), StartAt::Start, 42, clock, 2, poll, drain).expect("tail");
        let started = Instant::now();
        // Two measured records lie before the damage; a third never comes.
        let Err(error) = tail.finish(3) else {
            panic!("lasting damage is an error")
        };
        assert!(
            format!("{error:#}").contains("stays unreadable"),
            "{error:#}"
        );
        assert!(
            started.elapsed() < drain,
            "reported before the drain time is up"
        );
    }
}
