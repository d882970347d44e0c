//! Byte buffers for key material that leave no copy behind when they grow.
//!
//! A `Vec<u8>` that grows moves its bytes to a new allocation and frees the
//! old one as it is: a `Zeroizing<Vec<u8>>` wipes only its last allocation on
//! drop.  [`SecretBuf`] grows by copying into a new buffer itself and wiping
//! the old one, so every allocation that ever held its bytes is zeroed before
//! it is freed.  [`read_secret`] reads a provider's response or a key file into
//! one, bounded, and [`SecretBuf`] is a [`Write`] target for serializers.

use std::io::{self, Read, Write};
use std::ops::Deref;

use zeroize::Zeroizing;

/// Bytes read per step by [`read_secret`].
const READ_STEP: usize = 8192;

/// A growable byte buffer whose every allocation is zeroed before it is freed.
#[derive(Default)]
pub struct SecretBuf {
    bytes: Zeroizing<Vec<u8>>,
}

impl SecretBuf {
    /// An empty buffer with room for `capacity` bytes.
    pub fn with_capacity(capacity: usize) -> SecretBuf {
        SecretBuf { bytes: Zeroizing::new(Vec::with_capacity(capacity)) }
    }

    /// Make room for `additional` more bytes: a larger buffer receives the
    /// bytes and the old one is wiped (dropping a `Zeroizing<Vec>` zeroes its
    /// whole capacity).
    pub fn reserve(&mut self, additional: usize) {
        let needed = self.bytes.len().checked_add(additional).expect("buffer size overflows usize");
        if needed <= self.bytes.capacity() {
            return;
        }
        let capacity = needed.max(self.bytes.capacity().saturating_mul(2)).max(64);
        let mut grown = Zeroizing::new(Vec::with_capacity(capacity));
        grown.extend_from_slice(&self.bytes);
        self.bytes = grown;
    }

    /// Append `data`, growing as [`SecretBuf::reserve`] does.
    pub fn extend_from_slice(&mut self, data: &[u8]) {
        self.reserve(data.len());
        self.bytes.extend_from_slice(data);
    }

    /// The bytes, in a buffer that is wiped on drop.
    pub fn into_inner(self) -> Zeroizing<Vec<u8>> {
        self.bytes
    }
}

impl Deref for SecretBuf {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        &self.bytes
    }
}

impl Write for SecretBuf {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        self.extend_from_slice(data);
        Ok(data.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// What [`read_secret`] read.
pub enum SecretRead {
    /// Everything up to the end of the input, at most the limit.
    Complete(SecretBuf),
    /// The input has more than the limit allows (what was read is wiped).
    TooLarge,
}

/// Read `reader` to its end into a [`SecretBuf`], directly (no intermediate
/// buffer), sized first for `size_hint` bytes (a Content-Length, a file's
/// length), reading at most `limit` bytes and one more to tell whether there is
/// more.
pub fn read_secret(reader: &mut impl Read, size_hint: usize, limit: usize) -> io::Result<SecretRead> {
    let mut buf = SecretBuf::with_capacity(size_hint.min(limit).saturating_add(1));
    loop {
        let len = buf.bytes.len();
        if len > limit {
            return Ok(SecretRead::TooLarge);
        }
        let step = READ_STEP.min(limit + 1 - len);
        buf.reserve(step);
        // Within the capacity just reserved: no reallocation.
        buf.bytes.resize(len + step, 0);
        let got = loop {
            match reader.read(&mut buf.bytes[len..]) {
                Ok(n) => break n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        };
        buf.bytes.truncate(len + got);
        if got == 0 {
            return Ok(SecretRead::Complete(buf));
        }
    }
}

/// [`read_secret`] of the file at `path`, sized for the file's length.
pub fn read_secret_file(path: &std::path::Path, limit: usize) -> io::Result<SecretRead> {
    let mut file = std::fs::File::open(path)?;
    let hint = file.metadata().map(|m| usize::try_from(m.len()).unwrap_or(usize::MAX)).unwrap_or(0);
    read_secret(&mut file, hint, limit)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A reader that hands out `data` a few bytes at a time.
    struct Trickle<'a>(&'a [u8]);

    impl Read for Trickle<'_> {
        fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
            let n = out.len().min(self.0.len()).min(7);
            out[..n].copy_from_slice(&self.0[..n]);
            self.0 = &self.0[n..];
            Ok(n)
        }
    }

    fn complete(r: io::Result<SecretRead>) -> Vec<u8> {
        match r.unwrap() {
            SecretRead::Complete(b) => b.to_vec(),
            SecretRead::TooLarge => panic!("unexpectedly too large"),
        }
    }

    #[test]
    fn reads_everything_up_to_the_limit() {
        let data: Vec<u8> = (0..50_000u32).map(|i| i as u8).collect();
        for hint in [0, 10, 50_000, 1 << 30] {
            assert_eq!(complete(read_secret(&mut &data[..], hint, 50_000)), data);
            assert_eq!(complete(read_secret(&mut Trickle(&data), hint, 50_000)), data);
            assert!(matches!(read_secret(&mut &data[..], hint, 49_999).unwrap(), SecretRead::TooLarge));
        }
        assert_eq!(complete(read_secret(&mut &b""[..], 0, 0)), b"");
        assert!(matches!(read_secret(&mut &b"x"[..], 0, 0).unwrap(), SecretRead::TooLarge));
    }

    #[test]
    fn grows_and_writes() {
        let mut b = SecretBuf::with_capacity(1);
        for i in 0..1000u32 {
            b.write_all(&i.to_le_bytes()).unwrap();
        }
        assert_eq!(b.len(), 4000);
        assert_eq!(&b[4..8], &1u32.to_le_bytes());
        assert_eq!(b.into_inner().len(), 4000);
    }
}
