//! A connection's read buffer: bounded, never re-zeroed, and small while the connection is quiet.
//!
//! Idle connections are most connections, so the buffer starts small (4 KiB) and grows only
//! while reads keep filling it (doubling up to 64 KiB per read, and up to one maximal packet plus
//! a read in total); when a connection goes quiet it shrinks back. Bytes are zeroed once, when the
//! buffer grows, not on every read.

/// Smallest read size, and the size a quiet connection's buffer shrinks back to.
const CHUNK_MIN_BYTES: usize = 4 * 1024;
/// Largest single read.
const CHUNK_MAX_BYTES: usize = 64 * 1024;

#[derive(Debug)]
pub struct ReadBuffer {
    buf: Vec<u8>,
    filled: usize,
    chunk: usize,
    /// Room offered to the last read, to tell whether it filled it.
    offered: usize,
    max: usize,
}

impl ReadBuffer {
    /// A buffer holding `initial` (bytes read before this loop), bounded by `max` bytes.
    pub fn new(initial: Vec<u8>, max: usize) -> Self {
        let filled = initial.len();
        Self {
            buf: initial,
            filled,
            chunk: CHUNK_MIN_BYTES,
            offered: 0,
            max: max.max(CHUNK_MIN_BYTES),
        }
    }

    /// The bytes read and not yet consumed.
    pub fn data(&self) -> &[u8] {
        self.buf.get(..self.filled).unwrap_or_default()
    }

    /// Drops the first `n` bytes (whole packets that were handled).
    pub fn consume(&mut self, n: usize) {
        let n = n.min(self.filled);
        self.buf.copy_within(n..self.filled, 0);
        self.filled -= n;
        // A quiet connection gives back what a burst made it take.
        if self.filled == 0 && self.chunk == CHUNK_MIN_BYTES && self.buf.len() > 2 * CHUNK_MIN_BYTES
        {
            self.buf = Vec::new();
        }
    }

    /// Room for the next read, or `None` when the buffer is at its bound (a packet larger than
    /// the limit is being buffered).
    pub fn spare(&mut self) -> Option<&mut [u8]> {
        let want = (self.filled + self.chunk).min(self.max);
        if self.buf.len() < want {
            self.buf.resize(want, 0);
        }
        self.offered = self.buf.len() - self.filled;
        if self.offered == 0 {
            return None;
        }
        self.buf.get_mut(self.filled..)
    }

    /// Records that a read put `n` bytes into the spare room, and adapts the read size.
    pub fn filled_by(&mut self, n: usize) {
        let n = n.min(self.offered);
        self.filled += n;
        if n == self.offered {
            self.chunk = (self.chunk * 2).min(CHUNK_MAX_BYTES);
        } else if n < self.chunk / 4 {
            self.chunk = (self.chunk / 2).max(CHUNK_MIN_BYTES);
        }
    }

    /// Bytes held.
    #[cfg(test)]
    fn capacity(&self) -> usize {
        self.buf.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(buffer: &mut ReadBuffer, bytes: &[u8]) -> usize {
        let spare = buffer.spare().expect("room");
        let n = bytes.len().min(spare.len());
        spare[..n].copy_from_slice(&bytes[..n]);
        buffer.filled_by(n);
        n
    }

    #[test]
    fn keeps_unconsumed_bytes_in_order() {
        let mut buffer = ReadBuffer::new(b"ab".to_vec(), 1 << 20);
        read(&mut buffer, b"cdef");
        assert_eq!(buffer.data(), b"abcdef");
        buffer.consume(3);
        assert_eq!(buffer.data(), b"def");
        read(&mut buffer, b"g");
        assert_eq!(buffer.data(), b"defg");
    }

    #[test]
    fn grows_under_load_and_shrinks_when_quiet() {
        let mut buffer = ReadBuffer::new(Vec::new(), 1 << 20);
        let burst = vec![7u8; CHUNK_MAX_BYTES];
        for _ in 0..8 {
            let n = read(&mut buffer, &burst);
            buffer.consume(n);
        }
        assert!(
            buffer.capacity() >= CHUNK_MAX_BYTES / 2,
            "grew to {}",
            buffer.capacity()
        );
        for _ in 0..8 {
            let n = read(&mut buffer, b"ping");
            buffer.consume(n);
        }
        assert!(
            buffer.capacity() <= 2 * CHUNK_MIN_BYTES,
            "shrank to {}",
            buffer.capacity()
        );
    }

    #[test]
    fn is_bounded() {
        let mut buffer = ReadBuffer::new(Vec::new(), 10_000);
        let big = vec![1u8; 100_000];
        let mut total = 0;
        while buffer.spare().is_some() {
            total += read(&mut buffer, &big);
        }
        assert_eq!(total, 10_000);
        assert_eq!(buffer.data().len(), 10_000);
    }
}
