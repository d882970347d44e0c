//! Page ciphers: the per-relation internal keys ([`RelKey`]) and the code that
//! encrypts and decrypts 8 KiB pages with them ([`PageCipher`]).
//!
//! # Ciphers
//!
//! | [`Cipher`]   | id | `pg_tde.cipher` name | key material                      |
//! |--------------|----|----------------------|-----------------------------------|
//! | `Aes128Cbc`  | 1  | `aes_128`            | 16-byte AES key                   |
//! | `Aes256Cbc`  | 2  | `aes_256`            | 32-byte AES key                   |
//! | `Aes128Xts`  | 3  | `aes_128_xts`        | two independent 16-byte subkeys   |
//! | `Aes256Xts`  | 4  | `aes_256_xts`        | two independent 32-byte subkeys   |
//! | `Sm4Xts`     | 5  | `sm4_xts`            | two independent 16-byte SM4 subkeys |
//!
//! Every [`RelKey`] also carries a random 16-byte *base IV*; only the CBC ciphers
//! use it, but it is always generated and stored so that all keys share one format.
//! The serialized form ([`RelKey::to_bytes`]) is `key_len()` key bytes followed by
//! the 16-byte base IV.
//!
//! # Tweak
//!
//! A page is identified by its fork number and block number. Both modes use the
//! 128-bit value `tweak = (fork << 32) | block` (see [`page_tweak`]), encoded as 16
//! little-endian bytes.
//!
//! # XTS (IEEE 1619-2007)
//!
//! The key is `key1 || key2`; the data unit is the whole buffer (the 8 KiB page);
//! the data unit sequence number is the tweak. `T_0 = AES-Enc(key2, tweak)`,
//! `T_{j+1} = T_j * alpha` in GF(2^128) (little-endian convention of the standard),
//! and block `j` is `C_j = AES-Enc(key1, P_j ^ T_j) ^ T_j`. Pages are a multiple of
//! 16 bytes, so ciphertext stealing is never needed (and not implemented).
//!
//! On a CPU with AVX-512 and VAES a page is done in one pass
//! (`Vaes512::xts_fused`): 32 blocks at a time, tweaks in registers, the AES
//! rounds run on the `aes` crate's own key schedule with the tweak XORs folded
//! into the first and last round keys. Elsewhere (and for buffers that are not a
//! multiple of 32 blocks) all tweaks of a page are computed first, the page is
//! XORed with them, encrypted with a single `encrypt_blocks` call over all 512
//! blocks (which lets the `aes` crate use its widest backend: AES-NI pipelining,
//! VAES-256 or VAES-512, all detected at run time), and XORed again. The
//! `xts-mode` crate, which encrypts one block at a time, is ~25x slower here and
//! is not used.
//!
//! # CBC (`aes_128`, `aes_256`)
//!
//! `IV = AES-Enc(key, base_iv ^ tweak)` (ESSIV-like: the IV is unpredictable and
//! unique per page), then plain CBC without padding. Encryption is inherently
//! serial (done by the `cbc` crate); decryption decrypts all blocks at once with
//! `decrypt_blocks` and then XORs each block with the previous ciphertext block.
//!
//! # All-zero pages
//!
//! PostgreSQL extends relations with all-zero pages. Whether such a page is left
//! as zeros on disk is the caller's decision; [`is_all_zero`] helps it decide.

use std::fmt;

use aes::cipher::{
    array::Array, consts::U16, BlockCipherDecrypt, BlockCipherEncrypt, BlockModeEncrypt, BlockSizeUser, InnerIvInit,
    KeyInit,
};
use aes::{Aes128, Aes128Enc, Aes256, Aes256Enc};
use sm4::Sm4;
use zeroize::Zeroizing;

use crate::avx512::{self, Avx512, PageBlocks, Vaes512, FUSED_BLOCKS, PAGE_BLOCKS, STEP_BLOCKS};
use crate::error::{Result, TdeError};

/// Size of a PostgreSQL page (`BLCKSZ`).
pub const PAGE_SIZE: usize = 8192;
/// AES block size.
pub const AES_BLOCK_SIZE: usize = 16;
/// Largest key material of any [`Cipher`] (XTS-AES-256: two 32-byte subkeys).
pub const MAX_KEY_LEN: usize = 64;
/// Length of the base IV stored with every [`RelKey`].
pub const BASE_IV_LEN: usize = 16;

type Block = Array<u8, U16>;

const _: () = assert!(PAGE_BLOCKS * AES_BLOCK_SIZE == PAGE_SIZE);

/// The cipher of an internal (relation) key. The numeric values are stored on disk.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Cipher {
    /// AES-128-CBC with an ESSIV-like IV (`aes_128`).
    Aes128Cbc = 1,
    /// AES-256-CBC with an ESSIV-like IV (`aes_256`).
    Aes256Cbc = 2,
    /// XTS-AES-128, IEEE 1619 (`aes_128_xts`).
    Aes128Xts = 3,
    /// XTS-AES-256, IEEE 1619 (`aes_256_xts`).
    Aes256Xts = 4,
    /// XTS over SM4 (GB/T 32907 block cipher, GB/T 17964 XTS) (`sm4_xts`).
    Sm4Xts = 5,
}

impl Cipher {
    /// Every cipher, in id order.
    pub const ALL: [Cipher; 5] =
        [Cipher::Aes128Cbc, Cipher::Aes256Cbc, Cipher::Aes128Xts, Cipher::Aes256Xts, Cipher::Sm4Xts];

    /// The cipher for a `pg_tde.cipher` name (`aes_128`, `aes_256`, `aes_128_xts`, `aes_256_xts`,
    /// `sm4_xts`).
    pub fn from_name(name: &str) -> Option<Cipher> {
        Cipher::ALL.into_iter().find(|c| c.name() == name)
    }

    /// The `pg_tde.cipher` name of this cipher.
    pub fn name(&self) -> &'static str {
        match self {
            Cipher::Aes128Cbc => "aes_128",
            Cipher::Aes256Cbc => "aes_256",
            Cipher::Aes128Xts => "aes_128_xts",
            Cipher::Aes256Xts => "aes_256_xts",
            Cipher::Sm4Xts => "sm4_xts",
        }
    }

    /// The cipher for an on-disk id.
    pub fn from_u32(value: u32) -> Option<Cipher> {
        Cipher::ALL.into_iter().find(|c| c.as_u32() == value)
    }

    /// The on-disk id of this cipher.
    pub fn as_u32(self) -> u32 {
        self as u32
    }

    /// Bytes of key material (both XTS subkeys together for the XTS ciphers).
    pub fn key_len(&self) -> usize {
        match self {
            Cipher::Aes128Cbc => 16,
            Cipher::Aes256Cbc => 32,
            Cipher::Aes128Xts | Cipher::Sm4Xts => 32,
            Cipher::Aes256Xts => 64,
        }
    }

    /// Length of a principal key that goes with this cipher (16 or 32 bytes).
    pub fn principal_key_len(&self) -> usize {
        match self {
            Cipher::Aes128Cbc | Cipher::Aes128Xts | Cipher::Sm4Xts => 16,
            Cipher::Aes256Cbc | Cipher::Aes256Xts => 32,
        }
    }

    /// Whether this is one of the XTS ciphers.
    pub fn is_xts(&self) -> bool {
        matches!(self, Cipher::Aes128Xts | Cipher::Aes256Xts | Cipher::Sm4Xts)
    }
}

impl fmt::Display for Cipher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The 128-bit tweak of a page: `(fork << 32) | block`.
pub fn page_tweak(fork: u32, block: u32) -> u128 {
    ((fork as u128) << 32) | block as u128
}

/// An internal key: the key of one relation file, with its cipher.
///
/// The key bytes live in a buffer that is zeroed on drop; `Debug` never prints them.
#[derive(Clone, PartialEq, Eq)]
pub struct RelKey {
    /// The cipher this key is for.
    pub cipher: Cipher,
    /// Key material; only the first `cipher.key_len()` bytes are used, the rest are zero.
    key: Zeroizing<[u8; MAX_KEY_LEN]>,
    /// Random base IV (used by the CBC ciphers).
    base_iv: Zeroizing<[u8; BASE_IV_LEN]>,
}

impl RelKey {
    /// Generate a new random key for `cipher` from the OS CSPRNG.
    ///
    /// For XTS the two subkeys are guaranteed to differ (IEEE 1619 / SP 800-38E).
    pub fn generate(cipher: Cipher) -> Result<RelKey> {
        let len = cipher.key_len();
        let mut key = Zeroizing::new([0u8; MAX_KEY_LEN]);
        loop {
            crate::rng::fill(&mut key[..len])?;
            if !(cipher.is_xts() && xts_halves_equal(&key[..len])) {
                break;
            }
        }
        let mut base_iv = Zeroizing::new([0u8; BASE_IV_LEN]);
        crate::rng::fill(&mut base_iv[..])?;
        Ok(RelKey { cipher, key, base_iv })
    }

    /// Serialize: `key_len()` key bytes, then the 16-byte base IV.
    pub fn to_bytes(&self) -> Zeroizing<Vec<u8>> {
        let len = self.cipher.key_len();
        let mut out = Zeroizing::new(Vec::with_capacity(len + BASE_IV_LEN));
        out.extend_from_slice(&self.key[..len]);
        out.extend_from_slice(&self.base_iv[..]);
        out
    }

    /// Parse the output of [`RelKey::to_bytes`] for `cipher`.
    ///
    /// Fails with [`TdeError::Invalid`] if the length is not `key_len() + 16`, or if
    /// the two XTS subkeys are equal.
    pub fn from_bytes(cipher: Cipher, bytes: &[u8]) -> Result<RelKey> {
        let len = cipher.key_len();
        if bytes.len() != len + BASE_IV_LEN {
            return Err(TdeError::Invalid(format!(
                "serialized {} key must be {} bytes, got {}",
                cipher.name(),
                len + BASE_IV_LEN,
                bytes.len()
            )));
        }
        let (key_bytes, iv_bytes) = bytes.split_at(len);
        if cipher.is_xts() && xts_halves_equal(key_bytes) {
            return Err(TdeError::Invalid(format!("{} key has two equal subkeys", cipher.name())));
        }
        let mut key = Zeroizing::new([0u8; MAX_KEY_LEN]);
        key[..len].copy_from_slice(key_bytes);
        let mut base_iv = Zeroizing::new([0u8; BASE_IV_LEN]);
        base_iv.copy_from_slice(iv_bytes);
        Ok(RelKey { cipher, key, base_iv })
    }

    /// The key material (`key_len()` bytes).
    pub(crate) fn key_material(&self) -> &[u8] {
        &self.key[..self.cipher.key_len()]
    }
}

impl fmt::Debug for RelKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RelKey").field("cipher", &self.cipher).field("key", &"<redacted>").finish()
    }
}

fn xts_halves_equal(key: &[u8]) -> bool {
    let (k1, k2) = key.split_at(key.len() / 2);
    k1 == k2
}

/// Expanded key schedules for one [`RelKey`], ready to encrypt and decrypt pages.
///
/// The `aes` crate's key schedules are zeroed on drop (its `zeroize` feature is on),
/// and so is the base IV.
pub struct PageCipher {
    cipher: Cipher,
    engine: Engine,
    /// Which XTS passes this CPU runs.
    passes: Passes,
}

/// How XTS runs: portably, or with AVX-512 in two passes around the `aes` crate's
/// `encrypt_blocks`, or (`fused`, which needs VAES too) in one pass that runs the AES rounds
/// itself on the crate's key schedule.
#[derive(Clone, Copy)]
struct Passes {
    simd: Option<Avx512>,
    fused: Option<Vaes512>,
}

impl Passes {
    /// The fastest this CPU has.
    fn detected() -> Passes {
        let simd = Avx512::detected();
        Passes { simd, fused: simd.and_then(Avx512::vaes) }
    }
}

enum Engine {
    Cbc128 { aes: Aes128, base_iv: Zeroizing<[u8; BASE_IV_LEN]> },
    Cbc256 { aes: Aes256, base_iv: Zeroizing<[u8; BASE_IV_LEN]> },
    Xts128 { data: Aes128, tweak: Aes128Enc },
    Xts256 { data: Aes256, tweak: Aes256Enc },
    XtsSm4 { data: Sm4, tweak: Sm4 },
}

impl Engine {
    /// Build the engine for `cipher` from raw key material (no check that XTS subkeys differ,
    /// so that the IEEE 1619 vectors with equal subkeys can be run).
    fn new(cipher: Cipher, key: &[u8], base_iv: &[u8; BASE_IV_LEN]) -> Result<Engine> {
        if key.len() != cipher.key_len() {
            return Err(TdeError::Invalid(format!(
                "{} key must be {} bytes, got {}",
                cipher.name(),
                cipher.key_len(),
                key.len()
            )));
        }
        let base_iv = Zeroizing::new(*base_iv);
        Ok(match cipher {
            Cipher::Aes128Cbc => Engine::Cbc128 { aes: new_key(key)?, base_iv },
            Cipher::Aes256Cbc => Engine::Cbc256 { aes: new_key(key)?, base_iv },
            Cipher::Aes128Xts => {
                let (k1, k2) = key.split_at(16);
                Engine::Xts128 { data: new_key(k1)?, tweak: new_key(k2)? }
            }
            Cipher::Aes256Xts => {
                let (k1, k2) = key.split_at(32);
                Engine::Xts256 { data: new_key(k1)?, tweak: new_key(k2)? }
            }
            Cipher::Sm4Xts => {
                let (k1, k2) = key.split_at(16);
                Engine::XtsSm4 { data: new_key(k1)?, tweak: new_key(k2)? }
            }
        })
    }

    /// Encrypt or decrypt `dst` as one data unit; `src` `None` means in place, otherwise `src`
    /// (same length) is the input.
    fn crypt(&self, tweak: u128, src: Option<&[u8]>, dst: &mut [u8], dir: Direction, passes: Passes) {
        let (blocks, tail) = dst.as_chunks_mut::<AES_BLOCK_SIZE>();
        assert!(tail.is_empty(), "buffer length must be a multiple of {AES_BLOCK_SIZE} bytes");
        let src = src.map(|s| {
            assert_eq!(s.len(), blocks.len() * AES_BLOCK_SIZE, "input and output lengths differ");
            s.as_chunks::<AES_BLOCK_SIZE>().0
        });
        match self {
            Engine::Xts128 { data, tweak: tk } => xts_crypt(data, tk, tweak, src, blocks, dir, passes),
            Engine::Xts256 { data, tweak: tk } => xts_crypt(data, tk, tweak, src, blocks, dir, passes),
            Engine::XtsSm4 { data, tweak: tk } => xts_crypt(data, tk, tweak, src, blocks, dir, passes),
            Engine::Cbc128 { aes, base_iv } => cbc_crypt(aes, base_iv, tweak, copied_in(src, blocks), dir),
            Engine::Cbc256 { aes, base_iv } => cbc_crypt(aes, base_iv, tweak, copied_in(src, blocks), dir),
        }
    }
}

/// The encryption and decryption key schedules of one AES key, as the AES instructions use them.
#[derive(Clone, Copy)]
struct FusedKeys<'a> {
    encrypt: &'a [[u8; AES_BLOCK_SIZE]],
    decrypt: &'a [[u8; AES_BLOCK_SIZE]],
}

/// AES types whose key schedules the fused XTS pass can use.
trait RoundKeys {
    /// The round keys, when the `aes` crate's AES-NI back end holds them.
    fn round_keys(&self) -> Option<FusedKeys<'_>>;
}

macro_rules! impl_round_keys {
    ($($aes:ty),*) => {$(
        impl RoundKeys for $aes {
            fn round_keys(&self) -> Option<FusedKeys<'_>> {
                #[cfg(all(target_arch = "x86_64", not(aes_backend = "soft")))]
                return self.x86_round_keys().map(|(encrypt, decrypt)| FusedKeys { encrypt, decrypt });
                #[cfg(not(all(target_arch = "x86_64", not(aes_backend = "soft"))))]
                return None;
            }
        }
    )*};
}
impl_round_keys!(Aes128, Aes256);

/// SM4 has no AES-NI key schedule: the two-pass XTS path serves it.
impl RoundKeys for Sm4 {
    fn round_keys(&self) -> Option<FusedKeys<'_>> {
        None
    }
}

/// `dst`, with `src` copied into it first if there is one (CBC works in place only).
fn copied_in<'a>(
    src: Option<&[[u8; AES_BLOCK_SIZE]]>,
    dst: &'a mut [[u8; AES_BLOCK_SIZE]],
) -> &'a mut [[u8; AES_BLOCK_SIZE]] {
    if let Some(s) = src {
        dst.copy_from_slice(s);
    }
    dst
}

fn new_key<C: KeyInit>(key: &[u8]) -> Result<C> {
    C::new_from_slice(key).map_err(|_| TdeError::Invalid("wrong block cipher key length".into()))
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Direction {
    Encrypt,
    Decrypt,
}

impl PageCipher {
    /// Expand the key schedules of `key`.
    pub fn new(key: &RelKey) -> PageCipher {
        let engine = Engine::new(key.cipher, key.key_material(), &key.base_iv)
            .expect("a RelKey always holds key_len() bytes of key material");
        PageCipher { cipher: key.cipher, engine, passes: Passes::detected() }
    }

    /// The cipher of this page cipher.
    pub fn cipher(&self) -> Cipher {
        self.cipher
    }

    /// Encrypt one page in place. `page` must be exactly [`PAGE_SIZE`] bytes.
    pub fn encrypt_page(&self, fork: u32, block: u32, page: &mut [u8]) {
        assert_eq!(page.len(), PAGE_SIZE, "a page must be {PAGE_SIZE} bytes");
        self.engine.crypt(page_tweak(fork, block), None, page, Direction::Encrypt, self.passes);
    }

    /// Encrypt the page `src` into `dst`, leaving `src` untouched (one pass fewer than copying
    /// and encrypting in place). Both must be exactly [`PAGE_SIZE`] bytes.
    pub fn encrypt_page_into(&self, fork: u32, block: u32, src: &[u8], dst: &mut [u8]) {
        assert_eq!(dst.len(), PAGE_SIZE, "a page must be {PAGE_SIZE} bytes");
        self.engine.crypt(page_tweak(fork, block), Some(src), dst, Direction::Encrypt, self.passes);
    }

    /// Decrypt one page in place. `page` must be exactly [`PAGE_SIZE`] bytes.
    pub fn decrypt_page(&self, fork: u32, block: u32, page: &mut [u8]) {
        assert_eq!(page.len(), PAGE_SIZE, "a page must be {PAGE_SIZE} bytes");
        self.engine.crypt(page_tweak(fork, block), None, page, Direction::Decrypt, self.passes);
    }

    /// Encrypt a buffer of any multiple of 16 bytes as one data unit with the given tweak.
    ///
    /// # Panics
    /// If `buf.len()` is not a multiple of 16.
    pub fn encrypt_buf(&self, tweak: u128, buf: &mut [u8]) {
        self.engine.crypt(tweak, None, buf, Direction::Encrypt, self.passes);
    }

    /// Decrypt a buffer of any multiple of 16 bytes as one data unit with the given tweak.
    ///
    /// # Panics
    /// If `buf.len()` is not a multiple of 16.
    pub fn decrypt_buf(&self, tweak: u128, buf: &mut [u8]) {
        self.engine.crypt(tweak, None, buf, Direction::Decrypt, self.passes);
    }
}

impl fmt::Debug for PageCipher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PageCipher").field("cipher", &self.cipher).finish_non_exhaustive()
    }
}

// ---------------------------------------------------------------------------------------
// XTS

/// Multiply a tweak by alpha (x) in GF(2^128), IEEE 1619 byte order (little-endian).
#[inline(always)]
fn mul_alpha(t: u128) -> u128 {
    (t << 1) ^ ((t >> 127) * 0x87)
}

/// Multiply a tweak by alpha^8 (x^8): shift by a byte and fold the 8 bits shifted out
/// back in with x^128 = x^7 + x^2 + x + 1. Branch-free.
#[inline(always)]
fn mul_alpha8(t: u128) -> u128 {
    let h = t >> 120;
    (t << 8) ^ h ^ (h << 1) ^ (h << 2) ^ (h << 7)
}

/// `out[j] = start * alpha^j`: the first tweaks, as the wide passes take them into registers.
fn fill_tweaks(start: u128, out: &mut [[u8; AES_BLOCK_SIZE]]) {
    let mut t = start;
    for f in out {
        *f = t.to_le_bytes();
        t = mul_alpha(t);
    }
}

/// First pass, portable: `dst[j] = src[j] ^ T_j`, `tweaks[j] = T_j` with `T_j = start * alpha^j`.
/// Eight independent chains (`T_{j+8} = T_j * alpha^8`) keep the CPU's pipelines busy
/// instead of one long serial dependency.
fn whiten_in_portable(
    src: Option<&[[u8; AES_BLOCK_SIZE]]>,
    dst: &mut [[u8; AES_BLOCK_SIZE]],
    tweaks: &mut [[u8; AES_BLOCK_SIZE]],
    start: u128,
) {
    let mut chain = [0u128; 8];
    let mut t = start;
    for c in &mut chain {
        *c = t;
        t = mul_alpha(t);
    }
    for (j, (d, tw)) in dst.iter_mut().zip(tweaks.iter_mut()).enumerate() {
        let c = &mut chain[j % 8];
        let input = src.map_or(*d, |s| s[j]);
        *d = (u128::from_le_bytes(input) ^ *c).to_le_bytes();
        *tw = c.to_le_bytes();
        *c = mul_alpha8(*c);
    }
}

/// XTS over `dst` as one data unit with sequence number `seq`. `src` `None` means in place;
/// otherwise `src` (same length) is the input and `dst` receives the output. When this CPU has
/// VAES and the `aes` crate holds `data_key`'s AES-NI key schedules, buffers of a multiple of
/// [`FUSED_BLOCKS`] blocks (pages) take the one-pass path; others the two passes.
fn xts_crypt<D, T>(
    data_key: &D,
    tweak_key: &T,
    seq: u128,
    src: Option<&[[u8; AES_BLOCK_SIZE]]>,
    dst: &mut [[u8; AES_BLOCK_SIZE]],
    dir: Direction,
    passes: Passes,
) where
    D: BlockCipherEncrypt + BlockCipherDecrypt + BlockSizeUser<BlockSize = U16> + RoundKeys,
    T: BlockCipherEncrypt + BlockSizeUser<BlockSize = U16>,
{
    if dst.is_empty() {
        return;
    }
    let fused = passes.fused.filter(|_| dst.len().is_multiple_of(FUSED_BLOCKS)).zip(data_key.round_keys());
    let mut t0 = Block::from(seq.to_le_bytes());
    tweak_key.encrypt_block(&mut t0);
    let mut next = u128::from_le_bytes(t0.into());

    if let Some((x, keys)) = fused {
        let round_keys = match dir {
            Direction::Encrypt => keys.encrypt,
            Direction::Decrypt => keys.decrypt,
        };
        let mut first = [[0; AES_BLOCK_SIZE]; 8];
        fill_tweaks(next, &mut first);
        x.xts_fused(round_keys, dir == Direction::Decrypt, src, dst, &first);
        return;
    }

    // Buffers longer than a page are processed a page at a time; the tweak chain
    // continues across chunks, so the whole buffer is one data unit.
    TWEAKS.with_borrow_mut(|tweaks| {
        for (i, chunk) in dst.chunks_mut(PAGE_BLOCKS).enumerate() {
            next = xts_chunk(
                data_key,
                next,
                src.map(|s| &s[i * PAGE_BLOCKS..i * PAGE_BLOCKS + chunk.len()]),
                chunk,
                tweaks,
                dir,
                passes.simd,
            );
        }
    });
}

thread_local! {
    /// The tweaks of a page between the two passes; per thread, so that no call pays for
    /// clearing 8 KiB (every tweak is written before it is read).
    static TWEAKS: std::cell::RefCell<PageBlocks> = const { std::cell::RefCell::new(PageBlocks::new()) };
}

/// XTS over one chunk of at most a page whose first tweak is `next`; returns the tweak
/// that follows the chunk's last.
fn xts_chunk<D>(
    data_key: &D,
    next: u128,
    input: Option<&[[u8; AES_BLOCK_SIZE]]>,
    chunk: &mut [[u8; AES_BLOCK_SIZE]],
    tweaks: &mut PageBlocks,
    dir: Direction,
    simd: Option<Avx512>,
) -> u128
where
    D: BlockCipherEncrypt + BlockCipherDecrypt + BlockSizeUser<BlockSize = U16>,
{
    let n = chunk.len();
    let tweaks = &mut tweaks.0[..n];
    match simd {
        Some(x) if n.is_multiple_of(STEP_BLOCKS) => {
            let mut first = [[0; AES_BLOCK_SIZE]; STEP_BLOCKS];
            fill_tweaks(next, &mut first);
            x.whiten_in(input, chunk, tweaks, &first);
        }
        _ => whiten_in_portable(input, chunk, tweaks, next),
    }
    let next = mul_alpha(u128::from_le_bytes(tweaks[n - 1]));

    let arr = Block::cast_slice_from_core_mut(chunk);
    match dir {
        Direction::Encrypt => data_key.encrypt_blocks(arr),
        Direction::Decrypt => data_key.decrypt_blocks(arr),
    }
    avx512::xor_bytes(simd, chunk.as_flattened_mut(), tweaks.as_flattened());
    next
}

// ---------------------------------------------------------------------------------------
// CBC

/// `IV = AES-Enc(key, base_iv ^ le_bytes(tweak))`.
fn cbc_iv<C>(aes: &C, base_iv: &[u8; BASE_IV_LEN], tweak: u128) -> [u8; AES_BLOCK_SIZE]
where
    C: BlockCipherEncrypt + BlockSizeUser<BlockSize = U16>,
{
    let mut b = Block::from((u128::from_le_bytes(*base_iv) ^ tweak).to_le_bytes());
    aes.encrypt_block(&mut b);
    b.into()
}

fn cbc_crypt<C>(aes: &C, base_iv: &[u8; BASE_IV_LEN], tweak: u128, blocks: &mut [[u8; AES_BLOCK_SIZE]], dir: Direction)
where
    C: BlockCipherEncrypt + BlockCipherDecrypt + BlockSizeUser<BlockSize = U16>,
{
    let iv = cbc_iv(aes, base_iv, tweak);
    match dir {
        Direction::Encrypt => cbc_encrypt_blocks(aes, &iv, blocks),
        Direction::Decrypt => cbc_decrypt_blocks(aes, &iv, blocks),
    }
}

fn cbc_encrypt_blocks<C>(aes: &C, iv: &[u8; AES_BLOCK_SIZE], blocks: &mut [[u8; AES_BLOCK_SIZE]])
where
    C: BlockCipherEncrypt + BlockSizeUser<BlockSize = U16>,
{
    let mut enc = cbc::Encryptor::<&C>::inner_iv_init(aes, &Block::from(*iv));
    enc.encrypt_blocks(Block::cast_slice_from_core_mut(blocks));
}

// Not inlined: its 8 KiB of saved ciphertext would otherwise sit in the frame of
// `Engine::crypt`, and every XTS call would probe and dirty two pages of stack for it.
#[inline(never)]
fn cbc_decrypt_blocks<C>(aes: &C, iv: &[u8; AES_BLOCK_SIZE], blocks: &mut [[u8; AES_BLOCK_SIZE]])
where
    C: BlockCipherDecrypt + BlockSizeUser<BlockSize = U16>,
{
    // P_i = D(C_i) ^ C_{i-1}: decrypt a whole page of blocks at once (parallel backends),
    // then XOR with the saved ciphertext shifted by one block.
    let mut prev = *iv;
    let mut saved = [[0u8; AES_BLOCK_SIZE]; PAGE_BLOCKS];
    for chunk in blocks.chunks_mut(PAGE_BLOCKS) {
        let n = chunk.len();
        let saved = &mut saved[..n];
        saved.copy_from_slice(chunk);
        aes.decrypt_blocks(Block::cast_slice_from_core_mut(chunk));
        xor_block(&mut chunk[0], &prev);
        for (b, c) in chunk[1..].iter_mut().zip(saved.iter()) {
            xor_block(b, c);
        }
        prev = saved[n - 1];
    }
}

#[inline(always)]
fn xor_block(a: &mut [u8; AES_BLOCK_SIZE], b: &[u8; AES_BLOCK_SIZE]) {
    *a = (u128::from_ne_bytes(*a) ^ u128::from_ne_bytes(*b)).to_ne_bytes();
}

// ---------------------------------------------------------------------------------------
// Raw helpers for known-answer tests and benchmarks.

fn blocks_of(buf: &mut [u8]) -> Result<&mut [[u8; AES_BLOCK_SIZE]]> {
    let (blocks, tail) = buf.as_chunks_mut::<AES_BLOCK_SIZE>();
    if !tail.is_empty() {
        return Err(TdeError::Invalid(format!("buffer length must be a multiple of {AES_BLOCK_SIZE} bytes")));
    }
    Ok(blocks)
}

fn raw_cbc(key: &[u8], iv: &[u8; 16], buf: &mut [u8], dir: Direction) -> Result<()> {
    let blocks = blocks_of(buf)?;
    match key.len() {
        16 => {
            let aes: Aes128 = new_key(key)?;
            match dir {
                Direction::Encrypt => cbc_encrypt_blocks(&aes, iv, blocks),
                Direction::Decrypt => cbc_decrypt_blocks(&aes, iv, blocks),
            }
        }
        32 => {
            let aes: Aes256 = new_key(key)?;
            match dir {
                Direction::Encrypt => cbc_encrypt_blocks(&aes, iv, blocks),
                Direction::Decrypt => cbc_decrypt_blocks(&aes, iv, blocks),
            }
        }
        n => return Err(TdeError::Invalid(format!("CBC key must be 16 or 32 bytes, got {n}"))),
    }
    Ok(())
}

/// AES-CBC encryption with a caller-supplied IV (NIST SP 800-38A vectors). Not for production use.
#[doc(hidden)]
pub fn cbc_encrypt_raw(key: &[u8], iv: &[u8; 16], buf: &mut [u8]) -> Result<()> {
    raw_cbc(key, iv, buf, Direction::Encrypt)
}

/// AES-CBC decryption with a caller-supplied IV (same code path as page decryption).
#[doc(hidden)]
pub fn cbc_decrypt_raw(key: &[u8], iv: &[u8; 16], buf: &mut [u8]) -> Result<()> {
    raw_cbc(key, iv, buf, Direction::Decrypt)
}

fn raw_xts(key: &[u8], seq: u128, buf: &mut [u8], dir: Direction) -> Result<()> {
    raw_xts_with(key, seq, buf, dir, Passes::detected())
}

fn raw_xts_with(key: &[u8], seq: u128, buf: &mut [u8], dir: Direction, passes: Passes) -> Result<()> {
    let cipher = match key.len() {
        32 => Cipher::Aes128Xts,
        64 => Cipher::Aes256Xts,
        n => return Err(TdeError::Invalid(format!("XTS key must be 32 or 64 bytes, got {n}"))),
    };
    blocks_of(buf)?;
    Engine::new(cipher, key, &[0u8; BASE_IV_LEN])?.crypt(seq, None, buf, dir, passes);
    Ok(())
}

/// XTS-AES encryption of one data unit with raw `key1 || key2` (32 or 64 bytes) and data unit
/// sequence number `seq` (IEEE 1619 vectors). Same code path as page encryption.
#[doc(hidden)]
pub fn xts_encrypt_raw(key: &[u8], seq: u128, buf: &mut [u8]) -> Result<()> {
    raw_xts(key, seq, buf, Direction::Encrypt)
}

/// XTS-AES decryption, see [`xts_encrypt_raw`].
#[doc(hidden)]
pub fn xts_decrypt_raw(key: &[u8], seq: u128, buf: &mut [u8]) -> Result<()> {
    raw_xts(key, seq, buf, Direction::Decrypt)
}

// ---------------------------------------------------------------------------------------

/// Whether `page` consists of zero bytes only (fast: 64 bytes per step).
pub fn is_all_zero(page: &[u8]) -> bool {
    let (chunks, tail) = page.as_chunks::<64>();
    for chunk in chunks {
        let (words, _) = chunk.as_chunks::<16>();
        if words.iter().fold(0u128, |acc, w| acc | u128::from_ne_bytes(*w)) != 0 {
            return false;
        }
    }
    tail.iter().all(|&b| b == 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{hex, random_bytes};

    // ---- IEEE 1619-2007 Annex B (XTS-AES) -------------------------------------------

    /// 00 01 .. ff 00 01 .. ff: the 512-byte plaintext of vectors 4-14.
    fn pattern512() -> Vec<u8> {
        (0..512).map(|i| i as u8).collect()
    }

    fn check_xts_vector(key: &[u8], seq: u128, pt: &[u8], ct: &[u8]) {
        let mut buf = pt.to_vec();
        xts_encrypt_raw(key, seq, &mut buf).unwrap();
        assert_eq!(hex_str(&buf), hex_str(ct), "encrypt");
        xts_decrypt_raw(key, seq, &mut buf).unwrap();
        assert_eq!(buf, pt, "decrypt");
    }

    fn hex_str(b: &[u8]) -> String {
        b.iter().map(|x| format!("{x:02x}")).collect()
    }

    const V4_KEY: &str = "27182818284590452353602874713526\
                          31415926535897932384626433832795";
    const V4_CT: &str = "27a7479befa1d476489f308cd4cfa6e2a96e4bbe3208ff25287dd3819616e89c\
        c78cf7f5e543445f8333d8fa7f56000005279fa5d8b5e4ad40e736ddb4d35412\
        328063fd2aab53e5ea1e0a9f332500a5df9487d07a5c92cc512c8866c7e860ce\
        93fdf166a24912b422976146ae20ce846bb7dc9ba94a767aaef20c0d61ad0265\
        5ea92dc4c4e41a8952c651d33174be51a10c421110e6d81588ede82103a252d8\
        a750e8768defffed9122810aaeb99f9172af82b604dc4b8e51bcb08235a6f434\
        1332e4ca60482a4ba1a03b3e65008fc5da76b70bf1690db4eae29c5f1badd03c\
        5ccf2a55d705ddcd86d449511ceb7ec30bf12b1fa35b913f9f747a8afd1b130e\
        94bff94effd01a91735ca1726acd0b197c4e5b03393697e126826fb6bbde8ecc\
        1e08298516e2c9ed03ff3c1b7860f6de76d4cecd94c8119855ef5297ca67e9f3\
        e7ff72b1e99785ca0a7e7720c5b36dc6d72cac9574c8cbbc2f801e23e56fd344\
        b07f22154beba0f08ce8891e643ed995c94d9a69c9f1b5f499027a78572aeebd\
        74d20cc39881c213ee770b1010e4bea718846977ae119f7a023ab58cca0ad752\
        afe656bb3c17256a9f6e9bf19fdd5a38fc82bbe872c5539edb609ef4f79c203e\
        bb140f2e583cb2ad15b4aa5b655016a8449277dbd477ef2c8d6c017db738b18d\
        eb4a427d1923ce3ff262735779a418f20a282df920147beabe421ee5319d0568";

    const V10_KEY: &str = "2718281828459045235360287471352662497757247093699959574966967627\
                           3141592653589793238462643383279502884197169399375105820974944592";
    const V10_CT: &str = "1c3b3a102f770386e4836c99e370cf9bea00803f5e482357a4ae12d414a3e63b\
        5d31e276f8fe4a8d66b317f9ac683f44680a86ac35adfc3345befecb4bb188fd\
        5776926c49a3095eb108fd1098baec70aaa66999a72a82f27d848b21d4a741b0\
        c5cd4d5fff9dac89aeba122961d03a757123e9870f8acf1000020887891429ca\
        2a3e7a7d7df7b10355165c8b9a6d0a7de8b062c4500dc4cd120c0f7418dae3d0\
        b5781c34803fa75421c790dfe1de1834f280d7667b327f6c8cd7557e12ac3a0f\
        93ec05c52e0493ef31a12d3d9260f79a289d6a379bc70c50841473d1a8cc81ec\
        583e9645e07b8d9670655ba5bbcfecc6dc3966380ad8fecb17b6ba02469a020a\
        84e18e8f84252070c13e9f1f289be54fbc481457778f616015e1327a02b140f1\
        505eb309326d68378f8374595c849d84f4c333ec4423885143cb47bd71c5edae\
        9be69a2ffeceb1bec9de244fbe15992b11b77c040f12bd8f6a975a44a0f90c29\
        a9abc3d4d893927284c58754cce294529f8614dcd2aba991925fedc4ae74ffac\
        6e333b93eb4aff0479da9a410e4450e0dd7ae4c6e2910900575da401fc07059f\
        645e8b7e9bfdef33943054ff84011493c27b3429eaedb4ed5376441a77ed4385\
        1ad77f16f541dfd269d50d6a5f14fb0aab1cbb4c1550be97f7ab4066193c4caa\
        773dad38014bd2092fa755c824bb5e54c4f36ffda9fcea70b9c6e693e148c151";

    #[test]
    fn xts_aes128_ieee1619_vector1() {
        check_xts_vector(
            &[0u8; 32],
            0,
            &[0u8; 32],
            &hex("917cf69ebd68b2ec9b9fe9a3eadda692cd43d2f59598ed858c02c2652fbf922e"),
        );
    }

    #[test]
    fn xts_aes128_ieee1619_vector2() {
        check_xts_vector(
            &hex("1111111111111111111111111111111122222222222222222222222222222222"),
            0x33_3333_3333,
            &[0x44u8; 32],
            &hex("c454185e6a16936e39334038acef838bfb186fff7480adc4289382ecd6d394f0"),
        );
    }

    #[test]
    fn xts_aes128_ieee1619_vector3() {
        check_xts_vector(
            &hex("fffefdfcfbfaf9f8f7f6f5f4f3f2f1f022222222222222222222222222222222"),
            0x33_3333_3333,
            &[0x44u8; 32],
            &hex("af85336b597afc1a900b2eb21ec949d292df4c047e0b21532186a5971a227a89"),
        );
    }

    #[test]
    fn xts_aes128_ieee1619_vector4_512_byte_unit() {
        check_xts_vector(&hex(V4_KEY), 0, &pattern512(), &hex(V4_CT));
    }

    #[test]
    fn xts_aes256_ieee1619_vector10_512_byte_unit() {
        check_xts_vector(&hex(V10_KEY), 0xff, &pattern512(), &hex(V10_CT));
    }

    /// The same vectors through the production API: RelKey -> PageCipher -> encrypt_buf.
    #[test]
    fn xts_vectors_through_page_cipher() {
        for (cipher, key, seq, ct) in
            [(Cipher::Aes128Xts, V4_KEY, 0u128, V4_CT), (Cipher::Aes256Xts, V10_KEY, 0xff, V10_CT)]
        {
            let mut bytes = hex(key);
            bytes.extend_from_slice(&[0x5a; 16]);
            let pc = PageCipher::new(&RelKey::from_bytes(cipher, &bytes).unwrap());
            let mut buf = pattern512();
            pc.encrypt_buf(seq, &mut buf);
            assert_eq!(hex_str(&buf), hex_str(&hex(ct)), "{cipher}");
            pc.decrypt_buf(seq, &mut buf);
            assert_eq!(buf, pattern512());
        }
    }

    /// Straightforward one-block-at-a-time XTS, written from the standard, to check the
    /// batched implementation on buffers longer than a page and on odd block counts.
    fn reference_xts(key: &[u8], seq: u128, buf: &mut [u8], encrypt: bool) {
        fn run<C>(k1: &C, k2: &C, seq: u128, buf: &mut [u8], encrypt: bool)
        where
            C: BlockCipherEncrypt + BlockCipherDecrypt + BlockSizeUser<BlockSize = U16>,
        {
            let mut t = Block::from(seq.to_le_bytes());
            k2.encrypt_block(&mut t);
            let mut t: [u8; 16] = t.into();
            for chunk in buf.chunks_exact_mut(16) {
                for (c, x) in chunk.iter_mut().zip(t) {
                    *c ^= x;
                }
                let mut b = Block::try_from(&*chunk).unwrap();
                if encrypt {
                    k1.encrypt_block(&mut b);
                } else {
                    k1.decrypt_block(&mut b);
                }
                chunk.copy_from_slice(&b);
                for (c, x) in chunk.iter_mut().zip(t) {
                    *c ^= x;
                }
                // multiply by alpha, byte by byte as in IEEE 1619 section 5.2
                let mut carry = 0u8;
                for byte in t.iter_mut() {
                    let next = *byte >> 7;
                    *byte = (*byte << 1) | carry;
                    carry = next;
                }
                if carry != 0 {
                    t[0] ^= 0x87;
                }
            }
        }
        let (k1, k2) = key.split_at(key.len() / 2);
        if key.len() == 32 {
            let (a, b): (Aes128, Aes128) = (new_key(k1).unwrap(), new_key(k2).unwrap());
            run(&a, &b, seq, buf, encrypt);
        } else {
            let (a, b): (Aes256, Aes256) = (new_key(k1).unwrap(), new_key(k2).unwrap());
            run(&a, &b, seq, buf, encrypt);
        }
    }

    #[test]
    fn reference_xts_matches_vector4() {
        let mut buf = pattern512();
        reference_xts(&hex(V4_KEY), 0, &mut buf, true);
        assert_eq!(hex_str(&buf), hex_str(&hex(V4_CT)));
    }

    /// The XTS pass variants this CPU can run: always the portable one, and with AVX-512 the
    /// two-pass and the fused one.
    fn whitenings() -> Vec<(&'static str, Passes)> {
        let mut v = vec![("portable", Passes { simd: None, fused: None })];
        if let Some(x) = Avx512::detect() {
            v.push(("avx512 two passes", Passes { simd: Some(x), fused: None }));
            match x.vaes() {
                Some(y) => v.push(("avx512 one pass", Passes { simd: Some(x), fused: Some(y) })),
                None => eprintln!("this CPU has no VAES: the one-pass XTS is not tested"),
            }
        } else {
            eprintln!("this CPU has no AVX-512F/BW + VPCLMULQDQ: only the portable XTS passes are tested");
        }
        v
    }

    #[test]
    fn batched_xts_matches_reference_on_many_lengths() {
        for (name, whitening) in whitenings() {
            for key_len in [32usize, 64] {
                let key = random_bytes(key_len);
                for blocks in [1usize, 2, 7, 8, 9, 16, 31, 32, 48, 64, 96, 511, 512, 513, 528, 1024, 1500] {
                    let seq = u128::from_le_bytes(random_bytes(16).try_into().unwrap());
                    let pt = random_bytes(blocks * 16);
                    let mut fast = pt.clone();
                    let mut slow = pt.clone();
                    raw_xts_with(&key, seq, &mut fast, Direction::Encrypt, whitening).unwrap();
                    reference_xts(&key, seq, &mut slow, true);
                    assert_eq!(fast, slow, "{name}: encrypt, key {key_len} bytes, {blocks} blocks");
                    raw_xts_with(&key, seq, &mut fast, Direction::Decrypt, whitening).unwrap();
                    assert_eq!(fast, pt, "{name}: decrypt, {blocks} blocks");
                    reference_xts(&key, seq, &mut slow, false);
                    assert_eq!(slow, pt);
                }
            }
        }
    }

    #[test]
    fn xts_whitening_variants_agree_on_edge_tweaks() {
        // Sequence numbers at the edges of their range, through every variant and both key
        // sizes. (The tweak key encrypts them first; the wide code's reduction edges are
        // tested in `avx512`: `lane_multipliers_match_repeated_times_x`.)
        let seqs = [0u128, 1, u128::MAX, 1 << 127, 0xffff << 112, 0x8000 << 112, 0x7fff << 112];
        for (seq, key) in seqs.into_iter().flat_map(|q| [(q, random_bytes(32)), (q, random_bytes(64))]) {
            let pt = random_bytes(PAGE_SIZE);
            let mut out = Vec::new();
            for (name, whitening) in whitenings() {
                let mut buf = pt.clone();
                raw_xts_with(&key, seq, &mut buf, Direction::Encrypt, whitening).unwrap();
                let mut slow = pt.clone();
                reference_xts(&key, seq, &mut slow, true);
                assert_eq!(buf, slow, "{name}, seq {seq:#x}");
                out.push(buf);
            }
            assert!(out.windows(2).all(|w| w[0] == w[1]));
        }
    }

    #[test]
    fn encrypt_page_into_equals_in_place_and_leaves_the_source() {
        for cipher in Cipher::ALL {
            let pc = PageCipher::new(&RelKey::generate(cipher).unwrap());
            let src = random_bytes(PAGE_SIZE);
            let mut in_place = src.clone();
            pc.encrypt_page(1, 99, &mut in_place);
            let mut dst = vec![0u8; PAGE_SIZE];
            pc.encrypt_page_into(1, 99, &src, &mut dst);
            assert_eq!(dst, in_place, "{cipher}");
            pc.decrypt_page(1, 99, &mut dst);
            assert_eq!(dst, src, "{cipher}");
        }
    }

    #[test]
    fn alpha8_is_eight_alpha_steps() {
        let mut values = vec![0u128, 1, 1 << 127, u128::MAX, 0xff << 120, 0x80 << 120];
        for _ in 0..200 {
            values.push(u128::from_le_bytes(random_bytes(16).try_into().unwrap()));
        }
        for v in values {
            let mut slow = v;
            for _ in 0..8 {
                slow = mul_alpha(slow);
            }
            assert_eq!(mul_alpha8(v), slow, "{v:#x}");
        }
        // x^127 * x = x^128 = x^7 + x^2 + x + 1
        assert_eq!(mul_alpha(1 << 127), 0x87);
    }

    #[test]
    fn page_tweak_is_fork_and_block() {
        assert_eq!(page_tweak(0, 0), 0);
        assert_eq!(page_tweak(1, 2), (1u128 << 32) | 2);
        assert_eq!(page_tweak(3, u32::MAX), (3u128 << 32) | 0xffff_ffff);

        let key = RelKey::generate(Cipher::Aes128Xts).unwrap();
        let pc = PageCipher::new(&key);
        let page = random_bytes(PAGE_SIZE);
        let mut a = page.clone();
        pc.encrypt_page(2, 77, &mut a);
        let mut b = page.clone();
        xts_encrypt_raw(key.key_material(), (2u128 << 32) | 77, &mut b).unwrap();
        assert_eq!(a, b);
    }

    // ---- NIST SP 800-38A (CBC) --------------------------------------------------------

    const NIST_PT: &str = "6bc1bee22e409f96e93d7e117393172aae2d8a571e03ac9c9eb76fac45af8e51\
                           30c81c46a35ce411e5fbc1191a0a52eff69f2445df4f9b17ad2b417be66c3710";

    fn check_cbc_vector(key: &str, ct: &str) {
        let iv: [u8; 16] = hex("000102030405060708090a0b0c0d0e0f").try_into().unwrap();
        let mut buf = hex(NIST_PT);
        cbc_encrypt_raw(&hex(key), &iv, &mut buf).unwrap();
        assert_eq!(hex_str(&buf), hex_str(&hex(ct)), "encrypt");
        cbc_decrypt_raw(&hex(key), &iv, &mut buf).unwrap();
        assert_eq!(hex_str(&buf), NIST_PT, "decrypt");
    }

    #[test]
    fn cbc_aes128_sp800_38a_f21() {
        check_cbc_vector(
            "2b7e151628aed2a6abf7158809cf4f3c",
            "7649abac8119b246cee98e9b12e9197d5086cb9b507219ee95db113a917678b2\
             73bed6b8e3c1743b7116e69e222295163ff1caa1681fac09120eca307586e1a7",
        );
    }

    #[test]
    fn cbc_aes256_sp800_38a_f25() {
        check_cbc_vector(
            "603deb1015ca71be2b73aef0857d77811f352c073b6108d72d9810a30914dff4",
            "f58c4c04d6e5f1ba779eabfb5f7bfbd69cfc4e967edb808d679f777bc6702c7d\
             39f23369a9d9bacfa530e26304231461b2eb05e2c39be9fcda6c19078c6a9d1b",
        );
    }

    #[test]
    fn cbc_multi_page_decrypt_matches_serial_reference() {
        for key_len in [16usize, 32] {
            let key = random_bytes(key_len);
            let iv: [u8; 16] = random_bytes(16).try_into().unwrap();
            for blocks in [1usize, 2, 511, 512, 513, 1100] {
                let pt = random_bytes(blocks * 16);
                let mut ct = pt.clone();
                cbc_encrypt_raw(&key, &iv, &mut ct).unwrap();
                // serial reference: C_i = E(P_i ^ C_{i-1})
                let mut expect = pt.clone();
                let mut prev = iv;
                for chunk in expect.chunks_exact_mut(16) {
                    for (c, p) in chunk.iter_mut().zip(prev) {
                        *c ^= p;
                    }
                    let mut b = Block::try_from(&*chunk).unwrap();
                    if key_len == 16 {
                        new_key::<Aes128>(&key).unwrap().encrypt_block(&mut b);
                    } else {
                        new_key::<Aes256>(&key).unwrap().encrypt_block(&mut b);
                    }
                    chunk.copy_from_slice(&b);
                    prev = b.into();
                }
                assert_eq!(ct, expect, "{blocks} blocks");
                cbc_decrypt_raw(&key, &iv, &mut ct).unwrap();
                assert_eq!(ct, pt, "{blocks} blocks");
            }
        }
    }

    #[test]
    fn cbc_page_iv_is_encrypted_base_iv_xor_tweak() {
        for cipher in [Cipher::Aes128Cbc, Cipher::Aes256Cbc] {
            let key = RelKey::generate(cipher).unwrap();
            let bytes = key.to_bytes();
            let (k, base_iv) = bytes.split_at(cipher.key_len());
            let (fork, block) = (1u32, 0x0102_0304u32);
            // base_iv ^ [04 03 02 01 01 00 00 00 ...]
            let mut iv = Block::try_from(base_iv).unwrap();
            for (i, b) in [0x04u8, 0x03, 0x02, 0x01, 0x01].iter().enumerate() {
                iv[i] ^= b;
            }
            if cipher == Cipher::Aes128Cbc {
                new_key::<Aes128>(k).unwrap().encrypt_block(&mut iv);
            } else {
                new_key::<Aes256>(k).unwrap().encrypt_block(&mut iv);
            }
            let iv: [u8; 16] = iv.into();

            let page = random_bytes(PAGE_SIZE);
            let mut expect = page.clone();
            cbc_encrypt_raw(k, &iv, &mut expect).unwrap();
            let mut got = page.clone();
            PageCipher::new(&key).encrypt_page(fork, block, &mut got);
            assert_eq!(got, expect, "{cipher}");
        }
    }

    #[test]
    fn raw_helpers_reject_bad_lengths() {
        let iv = [0u8; 16];
        assert!(matches!(cbc_encrypt_raw(&[0u8; 24], &iv, &mut [0u8; 16]), Err(TdeError::Invalid(_))));
        assert!(matches!(cbc_encrypt_raw(&[0u8; 16], &iv, &mut [0u8; 15]), Err(TdeError::Invalid(_))));
        assert!(matches!(xts_encrypt_raw(&[0u8; 48], 0, &mut [0u8; 16]), Err(TdeError::Invalid(_))));
    }

    // ---- page round trips -----------------------------------------------------------

    #[test]
    fn every_cipher_round_trips_random_pages() {
        for cipher in Cipher::ALL {
            let pc = PageCipher::new(&RelKey::generate(cipher).unwrap());
            assert_eq!(pc.cipher(), cipher);
            for (fork, block) in [(0u32, 0u32), (0, 1), (1, 0), (3, 123_456), (2, u32::MAX)] {
                let page = random_bytes(PAGE_SIZE);
                let mut buf = page.clone();
                pc.encrypt_page(fork, block, &mut buf);
                assert_ne!(buf, page, "{cipher}: ciphertext equals plaintext");
                pc.decrypt_page(fork, block, &mut buf);
                assert_eq!(buf, page, "{cipher}: round trip ({fork}, {block})");
            }
        }
    }

    #[test]
    fn different_positions_give_different_ciphertext() {
        for cipher in Cipher::ALL {
            let pc = PageCipher::new(&RelKey::generate(cipher).unwrap());
            let page = vec![0x42u8; PAGE_SIZE];
            let mut seen = Vec::new();
            for (fork, block) in [(0u32, 0u32), (0, 1), (1, 0), (1, 1), (0, 1 << 31)] {
                let mut buf = page.clone();
                pc.encrypt_page(fork, block, &mut buf);
                // identical plaintext blocks within a page must not repeat either
                assert_ne!(buf[..16], buf[16..32], "{cipher}");
                assert!(!seen.contains(&buf), "{cipher}: ({fork}, {block}) repeats");
                seen.push(buf);
            }
            // decrypting at the wrong position does not give the plaintext back
            let mut buf = seen[1].clone();
            pc.decrypt_page(0, 2, &mut buf);
            assert_ne!(buf, page, "{cipher}");
        }
    }

    #[test]
    fn wrong_key_does_not_decrypt() {
        for cipher in Cipher::ALL {
            let right = PageCipher::new(&RelKey::generate(cipher).unwrap());
            let wrong = PageCipher::new(&RelKey::generate(cipher).unwrap());
            let page = random_bytes(PAGE_SIZE);
            let mut buf = page.clone();
            right.encrypt_page(0, 5, &mut buf);
            wrong.decrypt_page(0, 5, &mut buf);
            assert_ne!(buf, page, "{cipher}");
        }
    }

    #[test]
    #[should_panic(expected = "a page must be 8192 bytes")]
    fn short_page_panics() {
        let pc = PageCipher::new(&RelKey::generate(Cipher::Aes128Xts).unwrap());
        pc.encrypt_page(0, 0, &mut [0u8; 4096]);
    }

    #[test]
    #[should_panic(expected = "multiple of 16")]
    fn unaligned_buffer_panics() {
        let pc = PageCipher::new(&RelKey::generate(Cipher::Aes256Cbc).unwrap());
        pc.encrypt_buf(0, &mut [0u8; 40]);
    }

    // ---- SM4 ---------------------------------------------------------------------------

    /// GB/T 32907-2016, appendix A: example 1 (one encryption) and example 2 (the same
    /// block encrypted 1,000,000 times), through the block cipher that `sm4_xts` uses.
    #[test]
    fn sm4_gbt32907_vectors() {
        use aes::cipher::{BlockCipherDecrypt, BlockCipherEncrypt, KeyInit};
        let key = hex("0123456789abcdeffedcba9876543210");
        let sm4 = Sm4::new_from_slice(&key).unwrap();
        let mut block = Block::try_from(key.as_slice()).unwrap();
        sm4.encrypt_block(&mut block);
        assert_eq!(hex_str(&block), "681edf34d206965e86b3e94f536e4246");
        sm4.decrypt_block(&mut block);
        assert_eq!(block.as_slice(), key.as_slice());
        let mut block = Block::try_from(key.as_slice()).unwrap();
        for _ in 0..1_000_000 {
            sm4.encrypt_block(&mut block);
        }
        assert_eq!(hex_str(&block), "595298c7c6fd271f0402f804c33d3f66");
    }

    /// XTS construction check for SM4: a page through the production path equals XTS
    /// computed block by block from its definition (T_0 = E_k2(tweak), T_{j+1} = T_j * alpha,
    /// C_j = E_k1(P_j ^ T_j) ^ T_j) with the raw SM4 block cipher, for several tweaks.
    #[test]
    fn sm4_xts_matches_its_definition() {
        use aes::cipher::{BlockCipherEncrypt, KeyInit};
        let key = RelKey::generate(Cipher::Sm4Xts).unwrap();
        let (k1, k2) = key.key_material().split_at(16);
        let (data, tweak_key) = (Sm4::new_from_slice(k1).unwrap(), Sm4::new_from_slice(k2).unwrap());
        let pc = PageCipher::new(&key);
        let plain: Vec<u8> = (0..PAGE_SIZE).map(|i| (i * 7 % 251) as u8).collect();
        for (fork, block) in [(0u32, 0u32), (0, 1), (1, 77), (2, u32::MAX)] {
            let mut t = Block::from(page_tweak(fork, block).to_le_bytes());
            tweak_key.encrypt_block(&mut t);
            let mut t = u128::from_le_bytes(t.into());
            let mut expected = plain.clone();
            for chunk in expected.chunks_mut(16) {
                let x = u128::from_le_bytes(chunk.try_into().unwrap()) ^ t;
                let mut b = Block::from(x.to_le_bytes());
                data.encrypt_block(&mut b);
                let c = u128::from_le_bytes(b.into()) ^ t;
                chunk.copy_from_slice(&c.to_le_bytes());
                t = mul_alpha(t);
            }
            let mut page = plain.clone();
            pc.encrypt_page(fork, block, &mut page);
            assert_eq!(page, expected, "fork {fork} block {block}");
            let mut into = vec![0u8; PAGE_SIZE];
            pc.encrypt_page_into(fork, block, &plain, &mut into);
            assert_eq!(into, expected);
            pc.decrypt_page(fork, block, &mut page);
            assert_eq!(page, plain);
        }
        let other = PageCipher::new(&RelKey::generate(Cipher::Aes128Xts).unwrap());
        let mut a = plain.clone();
        other.encrypt_page(0, 0, &mut a);
        let mut b = plain.clone();
        pc.encrypt_page(0, 0, &mut b);
        assert_ne!(a, b);
    }

    // ---- keys and names --------------------------------------------------------------

    #[test]
    fn cipher_names_ids_and_lengths() {
        for (cipher, name, id, key_len, pk_len) in [
            (Cipher::Aes128Cbc, "aes_128", 1, 16, 16),
            (Cipher::Aes256Cbc, "aes_256", 2, 32, 32),
            (Cipher::Aes128Xts, "aes_128_xts", 3, 32, 16),
            (Cipher::Aes256Xts, "aes_256_xts", 4, 64, 32),
            (Cipher::Sm4Xts, "sm4_xts", 5, 32, 16),
        ] {
            assert_eq!(Cipher::from_name(name), Some(cipher));
            assert_eq!(cipher.name(), name);
            assert_eq!(cipher.to_string(), name);
            assert_eq!(Cipher::from_u32(id), Some(cipher));
            assert_eq!(cipher as u32, id);
            assert_eq!(cipher.key_len(), key_len);
            assert_eq!(cipher.principal_key_len(), pk_len);
        }
        assert_eq!(Cipher::from_name("aes"), None);
        assert_eq!(Cipher::from_name("AES_128"), None);
        assert_eq!(Cipher::from_u32(0), None);
        assert_eq!(Cipher::from_u32(6), None);
    }

    #[test]
    fn relkey_serialization_round_trip() {
        for cipher in Cipher::ALL {
            let key = RelKey::generate(cipher).unwrap();
            let bytes = key.to_bytes();
            assert_eq!(bytes.len(), cipher.key_len() + BASE_IV_LEN);
            let back = RelKey::from_bytes(cipher, &bytes).unwrap();
            assert_eq!(back, key);
            assert_ne!(RelKey::generate(cipher).unwrap(), key, "keys must be random");
            // wrong length
            assert!(matches!(RelKey::from_bytes(cipher, &bytes[1..]), Err(TdeError::Invalid(_))));
        }
    }

    #[test]
    fn relkey_rejects_equal_xts_subkeys() {
        let mut bytes = vec![7u8; 32];
        bytes.extend_from_slice(&[0u8; 16]);
        assert!(matches!(RelKey::from_bytes(Cipher::Aes128Xts, &bytes), Err(TdeError::Invalid(_))));
        // the same bytes are fine for CBC-256 (one 32-byte key)
        assert!(RelKey::from_bytes(Cipher::Aes256Cbc, &bytes).is_ok());
    }

    #[test]
    fn debug_output_has_no_key_bytes() {
        let bytes: Vec<u8> = (0u8..80).map(|i| i.wrapping_mul(37) | 0x80).collect();
        let key = RelKey::from_bytes(Cipher::Aes256Xts, &bytes).unwrap();
        let dbg = format!("{key:?} {:?}", PageCipher::new(&key));
        assert!(dbg.contains("Aes256Xts"));
        let key_hex = hex_str(&bytes[..8]);
        assert!(!dbg.contains(&key_hex), "{dbg}");
        let key_dec = format!("{}, {}", bytes[0], bytes[1]);
        assert!(!dbg.contains(&key_dec), "{dbg}");
    }

    #[test]
    fn all_zero_detection() {
        let mut page = vec![0u8; PAGE_SIZE];
        assert!(is_all_zero(&page));
        assert!(is_all_zero(&[]));
        for pos in [0, 1, 63, 64, 4095, PAGE_SIZE - 1] {
            page[pos] = 1;
            assert!(!is_all_zero(&page), "byte {pos}");
            page[pos] = 0;
        }
        // lengths that are not a multiple of 64
        let mut odd = vec![0u8; 100];
        assert!(is_all_zero(&odd));
        odd[99] = 0x80;
        assert!(!is_all_zero(&odd));
    }
}
