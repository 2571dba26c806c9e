//! A bounds-checked big-endian reader over untrusted bytes: every read that would run past the
//! end is an error naming the structure being read, never a panic.

use super::corrupt;
use crate::Result;

/// Reads big-endian integers and byte runs from a slice.
pub(super) struct ByteReader<'a> {
    data: &'a [u8],
    pos: usize,
    format: &'static str,
    what: &'static str,
}

impl<'a> ByteReader<'a> {
    /// A reader over `data`, which holds `what` of a `format` file (for error messages).
    pub fn new(data: &'a [u8], format: &'static str, what: &'static str) -> Self {
        Self { data, pos: 0, format, what }
    }

    /// The next `n` bytes.
    pub fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        match self.pos.checked_add(n) {
            Some(end) if end <= self.data.len() => {
                let out = &self.data[self.pos..end];
                self.pos = end;
                Ok(out)
            }
            _ => Err(corrupt(self.format, format!("{} is truncated ({} bytes, {n} more needed at byte {})", self.what, self.data.len(), self.pos))),
        }
    }

    /// Skips `n` bytes.
    pub fn skip(&mut self, n: usize) -> Result<()> {
        self.take(n).map(|_| ())
    }

    /// The bytes not read yet.
    pub fn rest(&mut self) -> &'a [u8] {
        let out = &self.data[self.pos..];
        self.pos = self.data.len();
        out
    }

    /// Bytes not read yet.
    pub fn remaining(&self) -> usize {
        self.data.len() - self.pos
    }

    /// One byte.
    pub fn u8(&mut self) -> Result<u8> {
        Ok(self.take(1)?[0])
    }

    /// A big-endian u16.
    pub fn u16(&mut self) -> Result<u16> {
        let b = self.take(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }

    /// A big-endian u32.
    pub fn u32(&mut self) -> Result<u32> {
        let b = self.take(4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    /// A big-endian u64.
    pub fn u64(&mut self) -> Result<u64> {
        let b = self.take(8)?;
        Ok(u64::from_be_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]))
    }

    /// A table of `count` entries of `entry` bytes each, checked to fit before anything is
    /// allocated or read.
    pub fn table(&mut self, count: u32, entry: usize) -> Result<&'a [u8]> {
        let len = count as u64 * entry as u64;
        if len > self.remaining() as u64 {
            return Err(corrupt(self.format, format!("{} declares {count} entries of {entry} bytes, but only {} bytes follow", self.what, self.remaining())));
        }
        self.take(len as usize)
    }
}

/// Big-endian u32 at `i·4` of a table checked by [`ByteReader::table`].
pub(super) fn u32_at(table: &[u8], i: usize) -> Option<u32> {
    let b = table.get(4 * i..4 * i + 4)?;
    Some(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
}

/// Big-endian u64 at `i·8` of a table.
pub(super) fn u64_at(table: &[u8], i: usize) -> Option<u64> {
    let b = table.get(8 * i..8 * i + 8)?;
    Some(u64::from_be_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_are_bounds_checked() {
        let mut r = ByteReader::new(&[0, 1, 2, 3, 4, 5, 6], "mp4", "`test` box");
        assert_eq!(r.u16().unwrap(), 1);
        assert_eq!(r.u32().unwrap(), 0x0203_0405);
        assert!(r.u16().unwrap_err().to_string().contains("`test` box is truncated"));
        assert_eq!(r.u8().unwrap(), 6);
        assert!(r.u8().is_err());
        let mut r = ByteReader::new(&[0; 8], "mp4", "table");
        assert!(r.table(u32::MAX, 12).unwrap_err().to_string().contains("declares 4294967295 entries"));
        assert_eq!(r.table(2, 4).unwrap().len(), 8);
        assert_eq!(u32_at(&[0, 0, 0, 7, 0, 0, 0, 9], 1), Some(9));
        assert_eq!(u32_at(&[0, 0, 0, 7], 1), None);
        assert_eq!(u64_at(&[0, 0, 0, 0, 0, 0, 1, 0], 0), Some(256));
    }
}
