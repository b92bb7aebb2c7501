//! The writer's helper thread: it prepares the next segment (create at full size, map, and
//! write-fault every page, see [`reserve`]) so that a roll is a rename, and, under
//! `Fsync::Interval`, flushes the active segment on its schedule. Both are off the append path:
//! a page fault would stall the shard's whole core. The helper runs on the shard's core, so what
//! it costs still counts: see perf/README.md for what preparation costs per segment.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, RecvTimeoutError, SyncSender};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use rustix::fs::{fallocate, FallocateFlags};

use super::layout::PREPARED_NAME;
use super::mmap::WriteMap;
use super::StoreError;

/// A full-size, mapped, write-faulted segment file under its temporary name.
#[derive(Debug)]
pub(super) struct Prepared {
    pub(super) file: File,
    pub(super) map: WriteMap,
}

/// Test-only fault injection: while positive, reservations ([`reserve`]) fail with ENOSPC (and
/// count down).
#[derive(Debug, Clone, Default)]
pub(super) struct PrepareFaults(Arc<std::sync::atomic::AtomicU32>);

impl PrepareFaults {
    #[cfg(test)]
    pub(super) fn fail_next(&self, count: u32) {
        self.0.store(count, Ordering::SeqCst);
    }

    fn take(&self) -> bool {
        self.0
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok()
    }
}

/// Creates `dir/next.prepared` at `bytes`, maps it and write-faults every page of it
/// ([`reserve`]), so that no append takes a page fault or needs a block. On failure nothing is
/// left behind, so a full disk costs no space.
pub(super) fn prepare_segment(
    dir: &Path,
    bytes: u64,
    faults: &PrepareFaults,
) -> Result<Prepared, StoreError> {
    let path = dir.join(PREPARED_NAME);
    // A leftover from a crash is nobody's mapping (readers only map `*.log` names).
    match fs::remove_file(&path) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(StoreError::io("remove", &path, e)),
    }
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&path)
        .map_err(|e| StoreError::io("create", &path, e))?;
    let prepared = (|| {
        // A sparse file of the full size: nothing is allocated or zeroed yet.
        file.set_len(bytes).map_err(|e| ("size", e))?;
        let map = WriteMap::new(&file).map_err(|e| ("map", e))?;
        reserve(&file, &map, 0, faults).map_err(|e| ("preallocate", e))?;
        Ok(map)
    })();
    match prepared {
        Ok(map) => Ok(Prepared { file, map }),
        Err((context, e)) => {
            drop(file);
            let _ = fs::remove_file(&path);
            Err(StoreError::io(context, &path, e))
        }
    }
}

/// Makes the pages of `map` from `from` on ready for appends: write-faulted now, with their
/// blocks reserved by the file system, so that no store on the append path faults or can hit a
/// full disk (rule 2 of the mmap module). A full disk is an error of kind `StorageFull`.
///
/// Why not `fallocate` first, as format version 1's writer did: fallocated extents are
/// *unwritten*, and making their pages present (`MAP_POPULATE`, readahead) zeroes them in a
/// way that cost a third of the hub core's CPU at 1 KiB messages (perf/README.md); the write
/// fault of a hole reserves the same blocks and zeroes each page once. `fallocate` remains the
/// fallback for kernels without `MADV_POPULATE_WRITE` (before 5.14): there the pages fault in
/// on the append path, but never need a block.
pub(super) fn reserve(
    file: &File,
    map: &WriteMap,
    from: usize,
    faults: &PrepareFaults,
) -> io::Result<()> {
    if faults.take() {
        return Err(io::ErrorKind::StorageFull.into());
    }
    match map.prefault_for_write(from) {
        Ok(()) => Ok(()),
        Err(e) if e.raw_os_error() == Some(rustix::io::Errno::INVAL.raw_os_error()) => {
            let from = from as u64;
            let len = map.len() as u64;
            if from >= len {
                return Ok(());
            }
            fallocate(file, FallocateFlags::empty(), from, len - from).map_err(io::Error::from)
        }
        // A failed write fault: the file system could not reserve a block (ENOSPC, or a quota).
        Err(e) if e.raw_os_error() == Some(rustix::io::Errno::FAULT.raw_os_error()) => {
            Err(io::Error::new(
                io::ErrorKind::StorageFull,
                "no space for the segment's pages (a write fault failed while prefaulting)",
            ))
        }
        Err(e) => Err(e),
    }
}

enum Request {
    Prepare,
    /// From now on flush this file (the new active segment); flush the previous one once more,
    /// unmap it (off the append path: unmapping a whole segment takes milliseconds) and start
    /// its write-back, and drop the pages of the segment sealed before it from the page cache.
    Follow {
        next: File,
        sealed: WriteMap,
    },
}

/// The handle the writer keeps to its helper thread.
#[derive(Debug)]
pub(super) struct Helper {
    requests: Option<SyncSender<Request>>,
    prepared: Receiver<Result<Prepared, StoreError>>,
    pending: bool,
    sync_failed: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    dir: PathBuf,
    segment_bytes: u64,
    faults: PrepareFaults,
}

impl Helper {
    /// Starts the thread; `flush_interval` is `Some` under `Fsync::Interval`.
    pub(super) fn start(
        dir: &Path,
        segment_bytes: u64,
        active: File,
        flush_interval: Option<Duration>,
        faults: PrepareFaults,
    ) -> Result<Helper, StoreError> {
        let (requests, request_rx) = sync_channel::<Request>(4);
        let (prepared_tx, prepared) = sync_channel(1);
        let sync_failed = Arc::new(AtomicBool::new(false));
        let thread_dir = dir.to_path_buf();
        let thread_failed = Arc::clone(&sync_failed);
        let thread_faults = faults.clone();
        let thread = std::thread::Builder::new()
            .name("ingot-segment-prep".into())
            .spawn(move || {
                helper_loop(
                    &thread_dir,
                    segment_bytes,
                    active,
                    flush_interval,
                    &request_rx,
                    &prepared_tx,
                    &thread_failed,
                    &thread_faults,
                )
            })
            .map_err(|e| StoreError::io("start the preparation thread for", dir, e))?;
        Ok(Helper {
            requests: Some(requests),
            prepared,
            pending: false,
            sync_failed,
            thread: Some(thread),
            dir: dir.to_path_buf(),
            segment_bytes,
            faults,
        })
    }

    pub(super) fn faults(&self) -> &PrepareFaults {
        &self.faults
    }

    /// Asks for the next segment to be prepared in the background.
    pub(super) fn request_prepare(&mut self) {
        if self.pending {
            return;
        }
        if let Some(requests) = &self.requests {
            self.pending = requests.send(Request::Prepare).is_ok();
        }
    }

    /// The prepared segment: the background one if it is ready (waiting for it if it is on its
    /// way), else prepared here and now. An error (a full disk) leaves nothing behind; the next
    /// call tries again, so appends resume when space returns.
    pub(super) fn take_prepared(&mut self) -> Result<Prepared, StoreError> {
        if self.pending {
            self.pending = false;
            if let Ok(Ok(prepared)) = self.prepared.recv() {
                return Ok(prepared);
            }
        }
        prepare_segment(&self.dir, self.segment_bytes, &self.faults)
    }

    /// Hands over a roll: `active` is the new active segment's file, `sealed` the mapping of
    /// the segment just sealed.
    pub(super) fn follow(&mut self, active: File, sealed: WriteMap) {
        if let Some(requests) = &self.requests {
            let _ = requests.send(Request::Follow {
                next: active,
                sealed,
            });
        }
    }

    /// Whether a background flush failed since the last call: the next append reports it.
    pub(super) fn take_sync_failure(&self) -> bool {
        self.sync_failed.swap(false, Ordering::SeqCst)
    }
}

impl Drop for Helper {
    fn drop(&mut self) {
        // Closing the request channel ends the thread after its current job (it never blocks
        // on handing over a result: at most one preparation is requested at a time).
        self.requests = None;
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
        while self.prepared.try_recv().is_ok() {}
        let _ = fs::remove_file(self.dir.join(PREPARED_NAME));
    }
}

#[allow(clippy::too_many_arguments)]
fn helper_loop(
    dir: &Path,
    segment_bytes: u64,
    mut active: File,
    flush_interval: Option<Duration>,
    requests: &Receiver<Request>,
    prepared: &SyncSender<Result<Prepared, StoreError>>,
    sync_failed: &AtomicBool,
    faults: &PrepareFaults,
) {
    let flush = |file: &File| {
        if flush_interval.is_some() && file.sync_data().is_err() {
            sync_failed.store(true, Ordering::SeqCst);
        }
    };
    let mut written_back: Option<File> = None;
    loop {
        let request = match flush_interval {
            Some(interval) => match requests.recv_timeout(interval) {
                Ok(request) => request,
                Err(RecvTimeoutError::Timeout) => {
                    flush(&active);
                    continue;
                }
                Err(RecvTimeoutError::Disconnected) => break,
            },
            None => match requests.recv() {
                Ok(request) => request,
                Err(_) => break,
            },
        };
        match request {
            Request::Prepare => {
                let result = prepare_segment(dir, segment_bytes, faults);
                if prepared.send(result).is_err() {
                    break;
                }
            }
            Request::Follow { next, sealed } => {
                flush(&active);
                drop(sealed);
                // The segment sealed at the previous roll has been written back since (its
                // write-back started then): its clean pages leave the page cache now, just before
                // the next preparation, which takes the same memory again. Then the segment just
                // sealed starts its write-back, to be dropped at the next roll.
                if let Some(older) = written_back.replace(active) {
                    evict(&older);
                }
                if let Some(just_sealed) = &written_back {
                    evict(just_sealed);
                }
                active = next;
            }
        }
    }
    flush(&active);
}

/// `POSIX_FADV_DONTNEED` on a whole sealed segment: the kernel starts writing back its dirty
/// pages (without waiting) and drops the clean ones that no process maps, so a reader that has
/// them mapped keeps them. Why the writer bounds its page cache at about three segments
/// (active, prepared, last sealed) instead of leaving every byte it wrote cached until memory
/// runs short: preparing a segment makes the kernel allocate and zero a page per 4 KiB, and
/// memory that has been free for a while costs far more to touch the first time than memory
/// freed a moment ago (on the virtual machines measured, where free memory goes back to the
/// host: 60-85 ms against 21 ms per 64 MiB; perf/README.md). Readers more than a segment
/// behind read from the disk instead of the cache. Best effort: errors change nothing.
fn evict(file: &File) {
    let _ = rustix::fs::fadvise(file, 0, None, rustix::fs::Advice::DontNeed);
}
