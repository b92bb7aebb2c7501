//! The only unsafe code of the store: mapping segment files, and the atomic length word that
//! publishes a record from the writer to readers in other threads or processes.
//!
//! # Soundness story
//!
//! `memmap2` cannot prove that a mapped file does not change or shrink under the mapping; the
//! store makes it true by protocol:
//!
//! 1. **One writer per partition.** The writer holds an exclusive `flock` on the partition
//!    directory for as long as it has any segment of it mapped writable. A second writer fails
//!    to take the lock and never maps anything.
//! 2. **Full size, write-faulted in advance, never truncated.** A segment is created at its full
//!    size (`ftruncate`, a sparse file) and every page of it is write-faulted on the writer's
//!    helper thread before the segment is used ([`WriteMap::prefault_for_write`]). That fault is
//!    where the file system reserves (delayed allocation) or allocates the page's block, so a
//!    full disk shows up there, as an error the helper reports, not later as SIGBUS on the
//!    append path; after it no store into the segment needs a block allocation. Where the
//!    kernel cannot prefault (before Linux 5.14) the segment's blocks are allocated with
//!    `fallocate` instead. No code of the store ever shrinks a segment file; a torn tail is
//!    zeroed in place, and retention unlinks whole files, which leaves existing mappings intact
//!    on Linux. Readers see the pages no record reached as zeros (a hole reads as zeros).
//! 3. **Published bytes are immutable.** The writer fills a record's bytes (everything except
//!    its first 4 bytes), then stores the length word with release ordering. A reader loads the
//!    length word with acquire ordering and only then forms a `&[u8]` over the record; those
//!    bytes never change again (recovery only zeroes bytes after the last valid record). Bytes
//!    beyond the published end are never referenced by a reader, except through the atomic
//!    load and through [`ReadMap::copy_volatile`].
//! 4. **Mapped bytes are untrusted.** Everything a reader sees goes through the record
//!    checksum and rkyv validation before it is interpreted, so a foreign writer, a damaged
//!    disk or a torn write produces an error, not undefined behaviour in the reader's logic.
//!
//! What the protocol cannot exclude is another program truncating or rewriting a segment file
//! behind the store's back (the files are owned by the hub's user; doing so is outside the
//! supported operations, like editing a database's files with a hex editor). Truncation would
//! raise SIGBUS in a process that reads the lost pages.

#![allow(unsafe_code)]

use std::fs::File;
use std::io;
use std::sync::atomic::{AtomicU32, Ordering};

use memmap2::{Advice, Mmap, MmapMut, MmapOptions};

/// A writable shared mapping of a whole segment file, owned by the partition's writer.
#[derive(Debug)]
pub(super) struct WriteMap {
    map: MmapMut,
}

impl WriteMap {
    /// Maps all of `file` (already at its final size) read-write. No page is faulted in here:
    /// see [`WriteMap::prefault_for_write`].
    pub(super) fn new(file: &File) -> io::Result<WriteMap> {
        // SAFETY: the caller holds the partition's exclusive flock (rule 1 of the module docs),
        // so no other writer maps or modifies this file; the file has its full size and is
        // never truncated while mapped (rule 2), so every page of the mapping stays backed by
        // the file for the mapping's lifetime.
        let map = unsafe { MmapOptions::new().map_mut(file)? };
        Ok(WriteMap { map })
    }

    /// Write-faults every page from `from` on now (`MADV_POPULATE_WRITE`, Linux 5.14+), so
    /// that no store on the append path takes a page fault, and so that the file system
    /// reserves each page's block now (rule 2): a full disk fails this call (the kernel reports
    /// the failed fault as `EFAULT`) instead of raising SIGBUS later. Only the write populate:
    /// `MAP_POPULATE` would first read-fault every page, and on ext4 reading fallocated
    /// (unwritten) extents goes through readahead that zeroes each folio, which cost ten times
    /// more CPU than this (measured: 160 ms against 17 ms per 64 MiB, see perf/README.md).
    /// Faulting a hole still makes the kernel zero each page once; that is the price of a
    /// mapping, paid here on the helper thread. `EINVAL` means the kernel cannot do it.
    pub(super) fn prefault_for_write(&self, from: usize) -> io::Result<()> {
        let start = from - from % super::PAGE_BYTES as usize;
        if start >= self.map.len() {
            return Ok(());
        }
        self.map
            .advise_range(Advice::PopulateWrite, start, self.map.len() - start)
    }

    pub(super) fn len(&self) -> usize {
        self.map.len()
    }

    /// The mapped bytes, for the writer's own recovery scan (no reader writes).
    pub(super) fn bytes(&self) -> &[u8] {
        &self.map
    }

    /// The mapped bytes, for writing a record before it is published.
    pub(super) fn bytes_mut(&mut self) -> &mut [u8] {
        &mut self.map
    }

    /// Stores a record's length word with release ordering: every byte written before becomes
    /// visible to a reader that loads this word with acquire ordering and sees `value`.
    pub(super) fn publish_u32(&mut self, position: usize, value: u32) {
        assert!(position % 4 == 0);
        assert!(position + 4 <= self.map.len());
        // SAFETY: `position` is in bounds and 4-byte aligned (asserted above; the mapping starts
        // at a page boundary), and the pointer is derived from `&mut self`, so it is valid for
        // an atomic access. Readers in other processes only access this word atomically.
        let word = unsafe { AtomicU32::from_ptr(self.map.as_mut_ptr().add(position).cast()) };
        word.store(value.to_le(), Ordering::Release);
    }

    /// `msync(MS_SYNC)` of the pages that hold `start..end` (rounded out to pages).
    pub(super) fn flush(&self, start: usize, end: usize) -> io::Result<()> {
        let page = super::PAGE_BYTES as usize;
        let start = start - start % page;
        let end = end.min(self.map.len());
        if end <= start {
            return Ok(());
        }
        self.map.flush_range(start, end - start)
    }
}

/// A read-only shared mapping of a whole segment file, for readers and `verify`.
#[derive(Debug)]
pub(super) struct ReadMap {
    map: Mmap,
}

impl ReadMap {
    /// Maps all of `file` read-only.
    pub(super) fn new(file: &File) -> io::Result<ReadMap> {
        // SAFETY: segment files are never truncated (rule 2), so the pages stay backed; the
        // writer may still append to this file, which is why `bytes` is only ever called for
        // published ranges (rule 3) and everything read is checked before use (rule 4).
        let map = unsafe { MmapOptions::new().map(file)? };
        Ok(ReadMap { map })
    }

    pub(super) fn len(&self) -> usize {
        self.map.len()
    }

    /// Loads the 4-byte little-endian word at `position` with acquire ordering; 0 (no record)
    /// when the position is out of bounds or misaligned.
    pub(super) fn load_u32_acquire(&self, position: usize) -> u32 {
        if position % 4 != 0 || position + 4 > self.map.len() {
            return 0;
        }
        // SAFETY: in bounds and aligned (checked above). Atomic loads from read-only memory are
        // allowed for lock-free sizes (std::sync::atomic docs, "Atomic accesses to read-only
        // memory"), and the writer stores this word atomically.
        let word =
            unsafe { AtomicU32::from_ptr(self.map.as_ptr().add(position).cast_mut().cast()) };
        u32::from_le(word.load(Ordering::Acquire))
    }

    /// The bytes `start..end`. Contract: only for ranges a reader has seen published (the
    /// length word loaded with acquire ordering) or for files no writer holds, so the bytes do
    /// not change while borrowed. Returns `None` out of bounds.
    pub(super) fn bytes(&self, start: usize, end: usize) -> Option<&[u8]> {
        self.map.get(start..end)
    }

    /// Copies `out.len()` bytes from `position` with volatile reads, for looking at bytes that a
    /// writer may still change (the unpublished tail) without ever borrowing them.
    pub(super) fn copy_volatile(&self, position: usize, out: &mut [u8]) -> bool {
        if position
            .checked_add(out.len())
            .is_none_or(|end| end > self.map.len())
        {
            return false;
        }
        let base = self.map.as_ptr();
        for (i, byte) in out.iter_mut().enumerate() {
            // SAFETY: `position + i < len` (checked above), so the read is inside the mapping;
            // a volatile read of a `u8` cannot tear and keeps the compiler from assuming the
            // byte is stable.
            *byte = unsafe { base.add(position + i).read_volatile() };
        }
        true
    }
}
