//! WAL encryption: AES-CTR over the bodies of WAL pages.
//!
//! WAL page headers stay in plaintext, so that every page says for itself
//! whether it is encrypted (flag [`XLP_TDE_ENCRYPTED`] in `xlp_info`): WAL
//! written before encryption was switched on, WAL that `pg_basebackup -X
//! stream` wrote in plaintext and encrypted WAL can sit side by side in one
//! segment.  Page bodies are encrypted with AES-CTR whose counter for the
//! 16-byte block at LSN `l` of a page begun on timeline `tli` is
//! `base + (tli << 64 | l / 16)` (128-bit, big-endian, wrapping), where `base`
//! is random per WAL key.  Within one key a (timeline, LSN) position is written
//! with one content only: pg_tde takes a new key whenever a server process
//! starts writing WAL (after every start, crash recovery and promotion), and
//! the unfinished tail of a partially written page is written as zeros, never
//! encrypted, because it will be written again with other contents.
//!
//! The counter mode is composed over the `aes` crate's whole-buffer
//! `encrypt_blocks` (counters first, one call, then XOR), checked against the
//! NIST SP 800-38A CTR vectors.

use aes::cipher::{Array, BlockCipherEncrypt, KeyInit};
use aes::{Aes128, Aes256};
use zeroize::Zeroizing;

use crate::avx512::{self, Avx512, PageBlocks};
use crate::error::{Result, TdeError};
use crate::walkeys::KeyRanges;

/// WAL page size (XLOG_BLCKSZ).
pub const WAL_PAGE_SIZE: u64 = 8192;
/// `xlp_info` flag: the page body is encrypted.  Outside PostgreSQL's
/// `XLP_ALL_FLAGS`, so stock readers refuse encrypted pages instead of
/// misreading them.
pub const XLP_TDE_ENCRYPTED: u16 = 0x0100;
/// `xlp_info` flag of PostgreSQL: the page has a long header.
pub const XLP_LONG_HEADER: u16 = 0x0002;
/// Sizes of short and long WAL page headers.
pub const SHORT_HEADER: u64 = 24;
pub const LONG_HEADER: u64 = 40;
/// Bytes of a page header needed to process a page (`xlp_magic`, `xlp_info`,
/// `xlp_tli`, `xlp_pageaddr`).
pub const HEADER_PREFIX: usize = 16;

enum Aes {
    A128(Box<Aes128>),
    A256(Box<Aes256>),
}

/// The keystream of one WAL key.
pub struct WalCipher {
    aes: Aes,
    base: u128,
    simd: Option<Avx512>,
}

impl WalCipher {
    /// `key` is 16 or 32 bytes (AES-128 or AES-256), `base` the key's random counter base.
    pub fn new(key: &[u8], base: &[u8; 16]) -> Result<WalCipher> {
        let aes = match key.len() {
            16 => Aes::A128(Box::new(Aes128::new(&Array::try_from(key).map_err(|_| bad_key())?))),
            32 => Aes::A256(Box::new(Aes256::new(&Array::try_from(key).map_err(|_| bad_key())?))),
            n => return Err(TdeError::Invalid(format!("WAL key must be 16 or 32 bytes, not {n}"))),
        };
        Ok(WalCipher { aes, base: u128::from_be_bytes(*base), simd: Avx512::detected() })
    }

    /// The same cipher computing its counters and XOR portably (tests compare both).
    #[cfg(test)]
    fn portable(mut self) -> WalCipher {
        self.simd = None;
        self
    }

    /// XOR into `buf` the keystream of the bytes at LSN `lsn ..` of a page
    /// begun on timeline `tli` (encryption and decryption are the same).
    pub fn apply(&self, tli: u32, lsn: u64, buf: &mut [u8]) {
        if buf.is_empty() {
            return;
        }
        let first = ((tli as u128) << 64) | (lsn as u128 >> 4);
        let skip = (lsn % 16) as usize;
        let nblocks = (skip + buf.len()).div_ceil(16);
        self.apply_counters(self.base.wrapping_add(first), nblocks, skip, buf);
    }

    /// Raw CTR from an explicit initial counter block (for the NIST vectors).
    #[doc(hidden)]
    pub fn apply_raw(&self, counter: u128, buf: &mut [u8]) {
        let nblocks = buf.len().div_ceil(16);
        self.apply_counters(counter, nblocks, 0, buf);
    }

    /// XOR into `buf` the keystream of counters `first ..`, starting `skip` bytes into the
    /// first block. The keystream is made up to a page (512 blocks) at a time in a per-thread
    /// buffer (nothing to clear per call): counters, one `encrypt_blocks` call, then the XOR.
    fn apply_counters(&self, first: u128, nblocks: usize, skip: usize, buf: &mut [u8]) {
        KEYSTREAM.with_borrow_mut(|stream| self.xor_keystream(first, nblocks, skip, buf, &mut stream.0));
        // The keystream left in the buffer is not wiped: it reveals no more than the plaintext
        // WAL it was XORed with, which sits in PostgreSQL's WAL buffers anyway.
    }

    fn xor_keystream(&self, first: u128, nblocks: usize, skip: usize, buf: &mut [u8], stream: &mut [[u8; 16]]) {
        let mut counter = first;
        let mut done = 0usize; // keystream blocks used
        let mut pos = 0usize; // bytes of buf XORed
        while done < nblocks {
            let n = (nblocks - done).min(stream.len());
            let blocks = &mut stream[..n];
            match self.simd {
                Some(x) if (counter as u64).checked_add(n as u64).is_some() => {
                    x.ctr_counters(counter, blocks);
                    counter = counter.wrapping_add(n as u128);
                }
                _ => {
                    for b in blocks.iter_mut() {
                        *b = counter.to_be_bytes();
                        counter = counter.wrapping_add(1);
                    }
                }
            }
            let arr = Array::cast_slice_from_core_mut(blocks);
            match &self.aes {
                Aes::A128(a) => a.encrypt_blocks(arr),
                Aes::A256(a) => a.encrypt_blocks(arr),
            }
            let bytes = blocks.as_flattened();
            let bytes = if done == 0 { &bytes[skip..] } else { bytes };
            let len = bytes.len().min(buf.len() - pos);
            avx512::xor_bytes(self.simd, &mut buf[pos..pos + len], &bytes[..len]);
            pos += len;
            done += n;
        }
    }
}

thread_local! {
    /// A page of keystream.
    static KEYSTREAM: std::cell::RefCell<PageBlocks> = const { std::cell::RefCell::new(PageBlocks::new()) };
}

fn bad_key() -> TdeError {
    TdeError::Invalid("bad WAL key".into())
}

/// `xlp_info`, `xlp_tli` and `xlp_pageaddr` of a page header prefix.
fn header_fields(prefix: &[u8; HEADER_PREFIX]) -> (u16, u32, u64) {
    let mut addr = [0u8; 8];
    addr.copy_from_slice(&prefix[8..16]);
    (
        u16::from_le_bytes([prefix[2], prefix[3]]),
        u32::from_le_bytes([prefix[4], prefix[5], prefix[6], prefix[7]]),
        u64::from_le_bytes(addr),
    )
}

fn header_len(info: u16) -> u64 {
    if info & XLP_LONG_HEADER != 0 {
        LONG_HEADER
    } else {
        SHORT_HEADER
    }
}

/// The header prefix of the page at `page`: from `buf` (WAL bytes from LSN
/// `start`) where it covers it, else from `from_file`.
fn page_prefix(
    buf: &[u8],
    start: u64,
    page: u64,
    from_file: &mut dyn FnMut(u64) -> Result<[u8; HEADER_PREFIX]>,
) -> Result<[u8; HEADER_PREFIX]> {
    let end = start + buf.len() as u64;
    if start <= page && page + HEADER_PREFIX as u64 <= end {
        let off = (page - start) as usize;
        let mut p = [0u8; HEADER_PREFIX];
        p.copy_from_slice(&buf[off..off + HEADER_PREFIX]);
        return Ok(p);
    }
    let mut p = from_file(page)?;
    // Bytes of the header inside buf win over the file's older ones.
    for (i, b) in p.iter_mut().enumerate() {
        let lsn = page + i as u64;
        if lsn >= start && lsn < end {
            *b = buf[(lsn - start) as usize];
        }
    }
    Ok(p)
}

/// Set or clear the encrypted flag in `buf` if it holds the page's `xlp_info`.
fn set_flag(buf: &mut [u8], start: u64, page: u64, on: bool) {
    let end = start + buf.len() as u64;
    // xlp_info is bytes 2..4 of the page; the flag is in its high byte (offset 3).
    let lsn = page + 3;
    if lsn >= start && lsn < end {
        let i = (lsn - start) as usize;
        let hi = (XLP_TDE_ENCRYPTED >> 8) as u8;
        if on {
            buf[i] |= hi;
        } else {
            buf[i] &= !hi;
        }
    }
}

/// XOR the keys of `keys` into the bytes `[from, to)` of a page begun on
/// timeline `tli` (`buf` holds LSN `start ..`) of a segment file of timeline
/// `file_tli`; bytes under a null key or no key are left as they are.
fn apply_ranges(buf: &mut [u8], start: u64, from: u64, to: u64, tli: u32, file_tli: u32, keys: &KeyRanges) {
    let mut lsn = from;
    while lsn < to {
        let (cipher, next) = keys.lookup(file_tli, lsn);
        let until = next.min(to);
        if let Some(c) = cipher {
            c.apply(tli, lsn, &mut buf[(lsn - start) as usize..(until - start) as usize]);
        }
        lsn = until;
    }
}

/// Whether any byte of `[from, to)` of a segment file of timeline `file_tli`
/// falls under a (non-null) key.
fn any_key(keys: &KeyRanges, file_tli: u32, from: u64, to: u64) -> bool {
    let mut lsn = from;
    while lsn < to {
        let (cipher, next) = keys.lookup(file_tli, lsn);
        if cipher.is_some() {
            return true;
        }
        lsn = next;
    }
    false
}

/// Walk the WAL pages that `buf` (LSN `start ..`) touches, calling
/// `f(buf, page_lsn, xlp_info, xlp_tli, xlp_pageaddr)` for each; the header
/// prefix comes from the buffer, or from `from_file` where the buffer does not
/// cover it.
fn for_each_page(
    buf: &mut [u8],
    start: u64,
    from_file: &mut dyn FnMut(u64) -> Result<[u8; HEADER_PREFIX]>,
    mut f: impl FnMut(&mut [u8], u64, u16, u32, u64) -> Result<()>,
) -> Result<()> {
    let end = start + buf.len() as u64;
    let mut page = start - start % WAL_PAGE_SIZE;
    while page < end {
        let (info, tli, addr) = header_fields(&page_prefix(buf, start, page, from_file)?);
        f(buf, page, info, tli, addr)?;
        page += WAL_PAGE_SIZE;
    }
    Ok(())
}

/// Whether any WAL page that `buf` (LSN `start ..`) touches is flagged as
/// encrypted: readers of plaintext WAL need not load keys at all.
pub fn any_page_flagged(
    buf: &mut [u8],
    start: u64,
    from_file: &mut dyn FnMut(u64) -> Result<[u8; HEADER_PREFIX]>,
) -> Result<bool> {
    let mut flagged = false;
    for_each_page(buf, start, from_file, |_, _, info, _, _| {
        flagged |= info & XLP_TDE_ENCRYPTED != 0;
        Ok(())
    })?;
    Ok(flagged)
}

/// Prepare WAL bytes `buf` (LSN `start ..` of a segment file of timeline
/// `file_tli`) for writing, in place.  A page
/// whose body falls (even partly) under a key is flagged; its bytes are
/// encrypted with the key of their LSN up to `valid_upto`, and zeroed after it
/// (they will be written again).  Pages wholly under null keys or no key are
/// written as they are.  `from_file` reads the header prefix of a page the
/// buffer does not cover.
pub fn encrypt_for_write(
    buf: &mut [u8],
    start: u64,
    valid_upto: u64,
    file_tli: u32,
    keys: &KeyRanges,
    from_file: &mut dyn FnMut(u64) -> Result<[u8; HEADER_PREFIX]>,
) -> Result<()> {
    let end = start + buf.len() as u64;
    for_each_page(buf, start, from_file, |buf, page, info, tli, _| {
        let body = page + header_len(info);
        let page_end = page + WAL_PAGE_SIZE;
        if any_key(keys, file_tli, body, page_end) {
            let enc_from = start.max(body);
            let enc_to = end.min(valid_upto).min(page_end);
            if enc_from < enc_to {
                apply_ranges(buf, start, enc_from, enc_to, tli, file_tli, keys);
            }
            let zero_from = start.max(body).max(valid_upto);
            let zero_to = end.min(page_end);
            if zero_from < zero_to {
                buf[(zero_from - start) as usize..(zero_to - start) as usize].fill(0);
            }
            set_flag(buf, start, page, true);
        }
        Ok(())
    })
}

/// Decrypt, in place, WAL bytes `buf` (LSN `start ..`) just read from a
/// segment: the bodies of flagged pages are decrypted with the keys of their
/// LSNs and the flag cleared.  A flagged page with bytes no key covers is an
/// error (`NotFound`: the caller may reload the keys and retry).
///
/// A flagged page whose header gives another address than its position is
/// not WAL of this position: a page left in a recycled segment file from its
/// previous life, read when recovery looks one page past the end of WAL (or
/// in the tail of a `.partial` segment).  It is passed up as it is, flag and
/// all, and PostgreSQL's page-header check ends the WAL there, as for any
/// stale page.
pub fn decrypt_after_read(
    buf: &mut [u8],
    start: u64,
    file_tli: u32,
    keys: &KeyRanges,
    from_file: &mut dyn FnMut(u64) -> Result<[u8; HEADER_PREFIX]>,
) -> Result<()> {
    let end = start + buf.len() as u64;
    for_each_page(buf, start, from_file, |buf, page, info, tli, addr| {
        if info & XLP_TDE_ENCRYPTED == 0 || addr != page {
            return Ok(());
        }
        let body = page + header_len(info);
        // A flagged page has at least one byte under a key; bytes under no
        // key are the plaintext prefix written before encryption began.
        if !any_key(keys, file_tli, body, page + WAL_PAGE_SIZE) {
            return Err(TdeError::NotFound(format!(
                "no WAL key covers the encrypted WAL page at {:X}/{:X}",
                page >> 32,
                page & 0xffff_ffff
            )));
        }
        let from = start.max(body);
        let to = end.min(page + WAL_PAGE_SIZE);
        if from < to {
            apply_ranges(buf, start, from, to, tli, file_tli, keys);
        }
        set_flag(buf, start, page, false);
        Ok(())
    })
}

/// Fresh random WAL key material: (key, counter base).
pub fn generate_key(len: usize) -> Result<(Zeroizing<Vec<u8>>, [u8; 16])> {
    let mut key = Zeroizing::new(vec![0u8; len]);
    crate::rng::fill(&mut key)?;
    let mut base = [0u8; 16];
    crate::rng::fill(&mut base)?;
    Ok((key, base))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(s: &str) -> Vec<u8> {
        (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap()).collect()
    }

    const PLAIN: &str = "6bc1bee22e409f96e93d7e117393172aae2d8a571e03ac9c9eb76fac45af8e5130c81c46a35ce411e5fbc1191a0a52eff69f2445df4f9b17ad2b417be66c3710";

    #[test]
    fn nist_sp800_38a_f51_ctr_aes128() {
        let c = WalCipher::new(&hex("2b7e151628aed2a6abf7158809cf4f3c"), &[0; 16]).unwrap();
        let mut buf = hex(PLAIN);
        c.apply_raw(u128::from_be_bytes(hex("f0f1f2f3f4f5f6f7f8f9fafbfcfdfeff").try_into().unwrap()), &mut buf);
        assert_eq!(buf, hex("874d6191b620e3261bef6864990db6ce9806f66b7970fdff8617187bb9fffdff5ae4df3edbd5d35e5b4f09020db03eab1e031dda2fbe03d1792170a0f3009cee"));
    }

    #[test]
    fn nist_sp800_38a_f55_ctr_aes256() {
        let c =
            WalCipher::new(&hex("603deb1015ca71be2b73aef0857d77811f352c073b6108d72d9810a30914dff4"), &[0; 16]).unwrap();
        let mut buf = hex(PLAIN);
        c.apply_raw(u128::from_be_bytes(hex("f0f1f2f3f4f5f6f7f8f9fafbfcfdfeff").try_into().unwrap()), &mut buf);
        assert_eq!(buf, hex("601ec313775789a5b7a7f504bbf3d228f443e3ca4d62b59aca84e990cacaf5c52b0930daa23de94ce87017ba2d84988ddfc9c58db67aada613c2dd08457941a6"));
    }

    #[test]
    fn wide_and_portable_keystreams_agree() {
        // Bases right below a 64-bit carry make runs cross it: the wide counters must hand
        // those to the portable code; the others go wide.
        for base in [[0u8; 16], [0xff; 16], {
            let mut b = [0u8; 16];
            b[8..].copy_from_slice(&(u64::MAX - 300).to_be_bytes());
            b
        }] {
            let wide = WalCipher::new(&[3u8; 16], &base).unwrap();
            let portable = WalCipher::new(&[3u8; 16], &base).unwrap().portable();
            for (lsn, len) in [(0u64, 1usize), (5, 63), (16, 64), (40, 128), (8, 8192 - 8), (0, 8192), (7, 20000)] {
                let data: Vec<u8> = (0..len).map(|i| (i * 31) as u8).collect();
                let (mut a, mut b) = (data.clone(), data.clone());
                wide.apply(2, lsn, &mut a);
                portable.apply(2, lsn, &mut b);
                assert_eq!(a, b, "lsn {lsn}, len {len}");
                assert_ne!(a, data);
            }
        }
    }

    #[test]
    fn long_unaligned_apply_crosses_keystream_chunks() {
        // More than one page of keystream, starting mid-block: byte i of the result must be
        // keystream block (lsn + i) / 16, byte (lsn + i) % 16, wherever the chunks split.
        let c = WalCipher::new(&[5u8; 32], &[1u8; 16]).unwrap();
        let lsn = 3 * 8192 + 7;
        let mut whole = vec![0u8; 3 * 8192 + 100];
        c.apply(1, lsn, &mut whole);
        for (off, len) in [(0usize, 1usize), (1, 8190), (8191, 2), (8193, 16384), (24577, 8)] {
            let mut part = vec![0u8; len];
            c.apply(1, lsn + off as u64, &mut part);
            assert_eq!(part, whole[off..off + len], "offset {off}");
        }
    }

    #[test]
    fn unaligned_apply_matches_aligned_keystream() {
        let c = WalCipher::new(&[9u8; 16], &[3u8; 16]).unwrap();
        let mut whole = vec![0u8; 100];
        c.apply(7, 1600, &mut whole);
        for (off, len) in [(0usize, 5usize), (5, 17), (22, 1), (23, 77)] {
            let mut part = vec![0u8; len];
            c.apply(7, 1600 + off as u64, &mut part);
            assert_eq!(part, whole[off..off + len]);
        }
    }

    #[test]
    fn counters_differ_by_timeline_and_position() {
        let c = WalCipher::new(&[1u8; 32], &[0xff; 16]).unwrap();
        let ks = |tli, lsn| {
            let mut b = vec![0u8; 32];
            c.apply(tli, lsn, &mut b);
            b
        };
        assert_ne!(ks(1, 0), ks(2, 0));
        assert_ne!(ks(1, 0), ks(1, 16));
        assert_ne!(ks(1, 1 << 40), ks(1, (1 << 40) + 32));
        // the base wraps around without repeating within a key
        assert_ne!(ks(u32::MAX, u64::MAX - 31), ks(0, 0));
    }

    fn page(lsn: u64, tli: u32, long: bool, fill: u8) -> Vec<u8> {
        let mut p = vec![fill; WAL_PAGE_SIZE as usize];
        p[0..2].copy_from_slice(&0xD116u16.to_le_bytes());
        let info: u16 = if long { XLP_LONG_HEADER } else { 0 };
        p[2..4].copy_from_slice(&info.to_le_bytes());
        p[4..8].copy_from_slice(&tli.to_le_bytes());
        p[8..16].copy_from_slice(&lsn.to_le_bytes());
        let hl = if long { LONG_HEADER } else { SHORT_HEADER } as usize;
        p[16..hl].fill(0);
        p
    }

    fn one_key(c: &std::sync::Arc<WalCipher>) -> KeyRanges {
        let mut k = KeyRanges::default();
        k.push(0, u64::MAX, Some(c.clone()));
        k
    }

    #[test]
    fn write_then_read_roundtrip_with_partial_tail() {
        let c = std::sync::Arc::new(WalCipher::new(&[5u8; 16], &[1u8; 16]).unwrap());
        let keys = one_key(&c);
        let start = 16 * 1024 * 1024; // first page of a segment: long header
        let mut plain = page(start, 3, true, 0xAB);
        plain.extend(page(start + WAL_PAGE_SIZE, 3, false, 0xCD));
        let valid_upto = start + WAL_PAGE_SIZE + 1000;
        let mut disk = plain.clone();
        encrypt_for_write(&mut disk, start, valid_upto, 1, &keys, &mut |_| panic!("header is in the buffer")).unwrap();
        // headers stay readable (flag set), bodies are not plaintext, the tail is zero
        assert_eq!(&disk[8..16], &plain[8..16]);
        assert_ne!(u16::from_le_bytes([disk[2], disk[3]]) & XLP_TDE_ENCRYPTED, 0);
        assert!(!disk[40..8192].windows(8).any(|w| w == [0xAB; 8]));
        assert!(disk[(valid_upto - start) as usize..].iter().all(|&b| b == 0));
        let mut back = disk.clone();
        decrypt_after_read(&mut back, start, 1, &keys, &mut |_| panic!("in buffer")).unwrap();
        let valid = (valid_upto - start) as usize;
        assert_eq!(back[..valid], plain[..valid]);
        assert_eq!(u16::from_le_bytes([back[2], back[3]]) & XLP_TDE_ENCRYPTED, 0);
        // a read starting mid-page gets the header from the file
        let mut part = disk[5000..9000].to_vec();
        let disk_ref = disk.clone();
        decrypt_after_read(&mut part, start + 5000, 1, &keys, &mut |p| {
            let o = (p - start) as usize;
            Ok(disk_ref[o..o + HEADER_PREFIX].try_into().unwrap())
        })
        .unwrap();
        let mut expect = plain[5000..9000].to_vec();
        // bytes 3192.. of `part` are page 2's header: the flag is cleared there too
        expect[3192 + 3] &= !((XLP_TDE_ENCRYPTED >> 8) as u8);
        assert_eq!(part, expect);
    }

    #[test]
    fn plaintext_pages_are_left_alone_on_read() {
        let c = std::sync::Arc::new(WalCipher::new(&[5u8; 16], &[1u8; 16]).unwrap());
        let plain = page(8192, 1, false, 0x11);
        let mut buf = plain.clone();
        decrypt_after_read(&mut buf, 8192, 1, &one_key(&c), &mut |_| unreachable!()).unwrap();
        assert_eq!(buf, plain);
    }

    #[test]
    fn keys_switch_mid_page_and_null_keys_leave_plaintext() {
        let old = std::sync::Arc::new(WalCipher::new(&[1u8; 16], &[1u8; 16]).unwrap());
        let new = std::sync::Arc::new(WalCipher::new(&[2u8; 16], &[2u8; 16]).unwrap());
        let start = 5 * WAL_PAGE_SIZE;
        let plain = page(start, 1, false, 0x77);
        let boundary = start + 3000;
        // Old run: only the old key, data final up to the boundary.
        let mut first = plain.clone();
        encrypt_for_write(&mut first, start, boundary, 1, &one_key(&old), &mut |_| unreachable!()).unwrap();
        // New run with a key starting exactly at the boundary: the prefix keeps its old bytes.
        let mut keys = one_key(&old);
        keys.push(boundary, u64::MAX, Some(new.clone()));
        let mut second = plain.clone();
        encrypt_for_write(&mut second, start, start + WAL_PAGE_SIZE, 1, &keys, &mut |_| unreachable!()).unwrap();
        assert_eq!(first[..3000], second[..3000], "a lost rewrite leaves the same prefix");
        let mut back = second.clone();
        decrypt_after_read(&mut back, start, 1, &keys, &mut |_| unreachable!()).unwrap();
        assert_eq!(back[24..], plain[24..]);
        // Switching encryption off: a null key from the boundary on.
        let mut off = one_key(&old);
        off.push(boundary, u64::MAX, None);
        let mut third = plain.clone();
        encrypt_for_write(&mut third, start, start + WAL_PAGE_SIZE, 1, &off, &mut |_| unreachable!()).unwrap();
        assert_eq!(first[..3000], third[..3000], "the encrypted prefix stays encrypted");
        assert_eq!(third[3000..], plain[3000..], "the rest is plaintext");
        let mut back = third.clone();
        decrypt_after_read(&mut back, start, 1, &off, &mut |_| unreachable!()).unwrap();
        assert_eq!(back[24..], plain[24..]);
        // A page wholly under the null key is written as it is, unflagged.
        let later = page(start + WAL_PAGE_SIZE, 1, false, 0x55);
        let mut w = later.clone();
        encrypt_for_write(&mut w, start + WAL_PAGE_SIZE, start + 2 * WAL_PAGE_SIZE, 1, &off, &mut |_| unreachable!())
            .unwrap();
        assert_eq!(w, later);
        // Reading a flagged page without its keys is an error, not garbage.
        let none = KeyRanges::default();
        assert!(matches!(
            decrypt_after_read(&mut second.clone(), start, 1, &none, &mut |_| unreachable!()),
            Err(TdeError::NotFound(_))
        ));
    }

    #[test]
    fn plaintext_prefix_before_the_first_key_reads_back() {
        // Encryption switched on mid-page: the page is flagged, its prefix stays plaintext.
        let k = std::sync::Arc::new(WalCipher::new(&[3u8; 16], &[3u8; 16]).unwrap());
        let start = 9 * WAL_PAGE_SIZE;
        let mut keys = KeyRanges::default();
        keys.push(start + 2000, u64::MAX, Some(k));
        let plain = page(start, 1, false, 0x31);
        let mut disk = plain.clone();
        encrypt_for_write(&mut disk, start, start + WAL_PAGE_SIZE, 1, &keys, &mut |_| unreachable!()).unwrap();
        assert_eq!(disk[24..2000], plain[24..2000]);
        assert_ne!(disk[2000..2100], plain[2000..2100]);
        let mut back = disk.clone();
        decrypt_after_read(&mut back, start, 1, &keys, &mut |_| unreachable!()).unwrap();
        assert_eq!(back[24..], plain[24..]);
    }

    #[test]
    fn receiver_chunks_split_anywhere_match_one_write() {
        // The WAL receiver writes final data in arbitrary chunks, even inside a header.
        let c = std::sync::Arc::new(WalCipher::new(&[8u8; 32], &[2u8; 16]).unwrap());
        let keys = one_key(&c);
        let start = 3 * WAL_PAGE_SIZE;
        let mut plain = page(start, 2, false, 0x42);
        plain.extend(page(start + WAL_PAGE_SIZE, 2, false, 0x43));
        let end = start + plain.len() as u64;
        let mut whole = plain.clone();
        encrypt_for_write(&mut whole, start, end, 1, &keys, &mut |_| unreachable!()).unwrap();
        let mut disk = vec![0u8; plain.len()];
        for cut in [[0usize, 10, 5000, 8195, 16384], [0, 3, 4, 8200, 16384]] {
            for w in cut.windows(2) {
                let (a, b) = (w[0], w[1]);
                let mut chunk = plain[a..b].to_vec();
                let snapshot = disk.clone();
                encrypt_for_write(&mut chunk, start + a as u64, end, 1, &keys, &mut |p| {
                    let o = (p - start) as usize;
                    Ok(snapshot[o..o + HEADER_PREFIX].try_into().unwrap())
                })
                .unwrap();
                disk[a..b].copy_from_slice(&chunk);
            }
            assert_eq!(disk, whole);
        }
    }

    #[test]
    fn stale_flagged_page_of_a_recycled_segment_is_passed_up_as_it_is() {
        let c = std::sync::Arc::new(WalCipher::new(&[4u8; 16], &[6u8; 16]).unwrap());
        let old = one_key(&c);
        // a page written at 8192 under a key, then found at 3 * 8192 in a recycled file
        let mut stale = page(8192, 1, false, 0x5a);
        encrypt_for_write(&mut stale, 8192, 2 * 8192, 1, &old, &mut |_| unreachable!()).unwrap();
        let flagged = stale.clone();
        // encryption was switched off since: a null key covers the position
        let mut off = KeyRanges::default();
        off.push(0, u64::MAX, Some(c.clone()));
        off.push(2 * 8192, u64::MAX, None);
        decrypt_after_read(&mut stale, 3 * 8192, 1, &off, &mut |_| unreachable!()).unwrap();
        assert_eq!(stale, flagged, "a stale page must reach PostgreSQL's header check unchanged");
        // at its own address the same page is still an error without a key
        let mut own = flagged.clone();
        let none = KeyRanges::default();
        assert!(decrypt_after_read(&mut own, 8192, 1, &none, &mut |_| unreachable!()).is_err());
    }
}
