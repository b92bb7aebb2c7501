//! A checked cursor over untrusted bytes, after rustls' `codec::Reader`.
//!
//! Every operation returns `None` instead of panicking when the bytes run out, and hands out
//! sub-slices of the original buffer, so parsing is both panic-free and zero-copy. The price is
//! an `Option` at every step, which `?` makes cheap to write and the optimiser cheap to run.

/// A cursor over `&'a [u8]` with only checked reads.
#[derive(Debug, Clone)]
pub struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    pub fn new(buf: &'a [u8]) -> Self {
        Self { buf }
    }

    /// The next `len` bytes, or `None` (consuming nothing) if fewer are left.
    pub fn take(&mut self, len: usize) -> Option<&'a [u8]> {
        let (head, tail) = self.buf.split_at_checked(len)?;
        self.buf = tail;
        Some(head)
    }

    /// The next `N` bytes as an array.
    pub fn take_array<const N: usize>(&mut self) -> Option<[u8; N]> {
        let (head, tail) = self.buf.split_first_chunk::<N>()?;
        self.buf = tail;
        Some(*head)
    }

    pub fn u8(&mut self) -> Option<u8> {
        let (&first, tail) = self.buf.split_first()?;
        self.buf = tail;
        Some(first)
    }

    /// A big-endian `u16`, MQTT's byte order.
    pub fn u16(&mut self) -> Option<u16> {
        self.take_array::<2>().map(u16::from_be_bytes)
    }

    /// A reader over the next `len` bytes, which this reader skips.
    pub fn sub(&mut self, len: usize) -> Option<Reader<'a>> {
        self.take(len).map(Reader::new)
    }

    /// Everything left; the reader is empty afterwards.
    pub fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.buf)
    }

    pub fn left(&self) -> usize {
        self.buf.len()
    }

    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::Reader;

    #[test]
    fn reads_are_checked_and_consume_nothing_on_failure() {
        let mut r = Reader::new(&[1, 2, 3, 4, 5]);
        assert_eq!(r.u8(), Some(1));
        assert_eq!(r.u16(), Some(0x0203));
        assert_eq!(r.take(3), None);
        assert_eq!(r.left(), 2);
        assert_eq!(r.take_array::<3>(), None);
        let mut sub = r.sub(1).expect("one byte left to sub");
        assert_eq!(sub.rest(), &[4]);
        assert_eq!(r.rest(), &[5]);
        assert!(r.is_empty());
        assert_eq!(r.u8(), None);
        assert_eq!(r.u16(), None);
        assert_eq!(r.take(0), Some(&[][..]));
    }
}
