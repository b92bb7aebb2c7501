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
                    .partition(PartitionId(p), StartAt::End)
                    .with_context(|| format!("open partition {p} at its end"))?,
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
            drain_secs: 0.0,
        };
        let mut interval = histogram();
        let mut next_report = Instant::now() + Duration::from_secs(1);
        let mut drain_started: Option<Instant> = None;
        loop {
            let mut progressed = false;
            for partition in &mut self.partitions {
                for _ in 0..ROUND_RECORDS_MAX {
                    let record = match partition.next() {
                        Ok(Some(record)) => record,
                        Ok(None) => break,
                        Err(e) => {
                            return Err(anyhow::Error::new(e)
                                .context("--e2e: a damaged record in the event log"))
                        }
                    };
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
}
