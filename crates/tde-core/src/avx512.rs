//! The cipher passes around AES that run faster with AVX-512, chosen at run time.
//!
//! The block cipher is the `aes` crate's: its `encrypt_blocks` over a whole
//! page (it picks VAES-512 at run time), or, for XTS, its key schedule fed to
//! the VAES instructions here.  What the modes add around AES is done here, 64
//! bytes at a time, when the CPU has AVX-512F, AVX-512BW and VPCLMULQDQ (and,
//! for the one-pass XTS, VAES); `cipher.rs` and `wal.rs` keep portable versions
//! of the same passes, used on other CPUs and by the tests as the reference.
//!
//! **XTS** encrypts block `j` of a data unit as `AES(P_j ^ T_j) ^ T_j` with
//! `T_j = T_0 * alpha^j` in GF(2^128).  Four 512-bit registers hold 16
//! consecutive tweaks `T_j .. T_{j+15}`; each 128-bit lane steps to `T_{j+16}`
//! by multiplying with `alpha^16`: a shift left by two bytes (`vpslldq`) and the
//! 16 bits shifted out folded back in with one carry-less multiplication by the
//! polynomial's low terms `0x87` (`x^128 = x^7 + x^2 + x + 1`; a 16-bit by 8-bit
//! product has 23 bits and needs no second reduction).  The first pass XORs the
//! tweaks into 16 blocks and stores them for the second pass in the same loop.
//!
//! **XTS in one pass** ([`Vaes512::xts_fused`]) keeps 32 tweaks in eight
//! registers (stepping by `alpha^32` the same way) and never stores them: each
//! block goes through `P ^ T ^ K_0` (one three-way XOR), the middle rounds, and
//! `aesenclast(x, K_last ^ T)`, which equals `aesenclast(x, K_last) ^ T` because
//! the last round ends by adding its key (the same for decryption with the
//! equivalent inverse cipher's keys).  The round keys are the `aes` crate's
//! (exposed by the vendored patch in `third_party/`); only the instructions that
//! apply them are here.  The broadcast round keys live in registers and the
//! stack frame of that one function, which wipes them (with the tweaks) before
//! it returns; a test reads the stack afterwards to check.
//!
//! **CTR** (WAL) needs the big-endian counter blocks `c, c+1, ...`: four
//! 128-bit lanes count in little-endian 64-bit halves and are byte-reversed
//! (`vpshufb`) on the way out; only runs whose low 64 bits do not wrap are
//! handed here.  The keystream is then XORed into the data 64 bytes at a time.
//!
//! This is the only module of the crate with `unsafe` code, and it is the
//! CPU-feature boundary: the `#[target_feature]` functions may only run on a
//! CPU that has the features, which [`Avx512::detect`] checks; the unaligned
//! 512-bit loads and stores go through pointers to slices whose lengths are
//! checked first.

/// Blocks processed per step of the first pass (four registers of four blocks).
pub(crate) const STEP_BLOCKS: usize = 16;

/// Blocks processed per step of the fused XTS pass (eight registers of four blocks: enough
/// independent AES rounds in flight to cover the latency of `vaesenc`).
pub(crate) const FUSED_BLOCKS: usize = 32;

/// Blocks of a page (8 KiB).
pub(crate) const PAGE_BLOCKS: usize = 512;

/// A page of 16-byte blocks aligned for 512-bit loads and stores: the XTS tweaks and the
/// CTR keystream of a page are made in one.
#[repr(C, align(64))]
pub(crate) struct PageBlocks(pub(crate) [[u8; 16]; PAGE_BLOCKS]);

impl PageBlocks {
    pub(crate) const fn new() -> PageBlocks {
        PageBlocks([[0; 16]; PAGE_BLOCKS])
    }
}

/// `data[i] ^= stream[i]` for equal-length byte slices, 64 bytes at a time with `simd`,
/// portably (the compiler vectorizes it for the baseline CPU) without.
pub(crate) fn xor_bytes(simd: Option<Avx512>, data: &mut [u8], stream: &[u8]) {
    match simd {
        Some(x) => x.xor_bytes(data, stream),
        None => {
            assert_eq!(data.len(), stream.len());
            for (d, k) in data.iter_mut().zip(stream) {
                *d ^= k;
            }
        }
    }
}

/// Pointers to the input and output blocks of a pass: `src`, or `dst` itself when `src` is
/// `None` (in place).
///
/// # Panics
/// If `src` and `dst` differ in length.
fn in_out(src: Option<&[[u8; 16]]>, dst: &mut [[u8; 16]]) -> (*const [u8; 16], *mut [u8; 16]) {
    let dst_ptr = dst.as_mut_ptr();
    match src {
        Some(s) => {
            assert_eq!(s.len(), dst.len(), "input and output lengths differ");
            (s.as_ptr(), dst_ptr)
        }
        None => (dst_ptr.cast_const(), dst_ptr),
    }
}

/// Proof that this CPU has AVX-512F, AVX-512BW and VPCLMULQDQ. Only [`Avx512::detect`] makes one.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Avx512(());

impl Avx512 {
    /// The result of [`Avx512::detect`], computed once per process.
    pub(crate) fn detected() -> Option<Avx512> {
        static DETECTED: std::sync::OnceLock<Option<Avx512>> = std::sync::OnceLock::new();
        *DETECTED.get_or_init(Avx512::detect)
    }

    /// `Some` when the CPU (and the OS, which must save the AVX-512 registers) supports the passes.
    pub(crate) fn detect() -> Option<Avx512> {
        #[cfg(target_arch = "x86_64")]
        {
            // std caches the CPUID/XGETBV result; this is a few atomic loads.
            if std::is_x86_feature_detected!("avx512f")
                && std::is_x86_feature_detected!("avx512bw")
                && std::is_x86_feature_detected!("vpclmulqdq")
            {
                return Some(Avx512(()));
            }
        }
        None
    }

    /// Proof that this CPU also has VAES (512-bit AES instructions), for [`Vaes512::xts_fused`].
    pub(crate) fn vaes(self) -> Option<Vaes512> {
        // std caches the CPUID/XGETBV result, as in `detect`.
        #[cfg(target_arch = "x86_64")]
        let has = std::is_x86_feature_detected!("vaes");
        #[cfg(not(target_arch = "x86_64"))]
        let has = false;
        has.then_some(Vaes512(()))
    }

    /// First pass: `dst[j] = src[j] ^ T_j` and `tweaks[j] = T_j` where `first` holds
    /// `T_0 .. T_15`. `src` `None` means in place (`dst` is also the input).
    ///
    /// # Panics
    /// If the lengths differ or are not a multiple of [`STEP_BLOCKS`].
    pub(crate) fn whiten_in(
        self,
        src: Option<&[[u8; 16]]>,
        dst: &mut [[u8; 16]],
        tweaks: &mut [[u8; 16]],
        first: &[[u8; 16]; STEP_BLOCKS],
    ) {
        assert_eq!(dst.len() % STEP_BLOCKS, 0, "XTS whitening works on multiples of 16 blocks");
        assert_eq!(tweaks.len(), dst.len());
        let n = dst.len();
        let (src_ptr, dst_ptr) = in_out(src, dst);
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `self` exists only if `detect` found the features `whiten_in_avx512` is compiled
        // for. `src_ptr` (a slice distinct from `dst`, or `dst` itself), `dst` and `tweaks` are each
        // valid for `n` blocks, a multiple of 16, checked above.
        unsafe {
            x86::whiten_in_avx512(src_ptr, dst_ptr, tweaks.as_mut_ptr(), n, first)
        };
        #[cfg(not(target_arch = "x86_64"))]
        let _ = (src_ptr, dst_ptr, first);
    }

    /// Big-endian counter blocks `out[i] = first + i`, for runs whose low 64 bits do not
    /// wrap (the caller checks; this panics otherwise).
    pub(crate) fn ctr_counters(self, first: u128, out: &mut [[u8; 16]]) {
        let lo = first as u64;
        assert!(lo.checked_add(out.len() as u64).is_some(), "counter run wraps its low 64 bits");
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the features are present (see `whiten_in`); `out` holds `out.len()` blocks.
        unsafe {
            x86::ctr_counters_avx512(lo, (first >> 64) as u64, out.as_mut_ptr(), out.len())
        };
    }

    /// `data[i] ^= stream[i]` for equal-length byte slices (see [`xor_bytes`]).
    fn xor_bytes(self, data: &mut [u8], stream: &[u8]) {
        assert_eq!(data.len(), stream.len());
        let whole = data.len() / 64 * 64;
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the features are present (see `whiten_in`); both slices hold `whole` bytes.
        unsafe {
            x86::xor_avx512(data.as_mut_ptr(), stream.as_ptr(), whole / 64)
        };
        for (d, k) in data[whole..].iter_mut().zip(&stream[whole..]) {
            *d ^= k;
        }
    }
}

/// Proof that this CPU has everything [`Avx512`] needs and VAES. Only [`Avx512::vaes`] makes one.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Vaes512(());

impl Vaes512 {
    /// XTS over `n` blocks (`dst.len()`, a multiple of [`FUSED_BLOCKS`]) in one pass, with the
    /// AES rounds run here on the `aes` crate's key schedule `round_keys` (11, 13 or 15 round
    /// keys: the encryption schedule to encrypt, the equivalent inverse cipher's to decrypt).
    /// `first` holds `T_0 .. T_7`. `src` `None` means in place.
    ///
    /// # Panics
    /// If the lengths differ, are not a multiple of [`FUSED_BLOCKS`], or `round_keys` does not
    /// have 11, 13 or 15 entries.
    pub(crate) fn xts_fused(
        self,
        round_keys: &[[u8; 16]],
        decrypt: bool,
        src: Option<&[[u8; 16]]>,
        dst: &mut [[u8; 16]],
        first: &[[u8; 16]; 8],
    ) {
        let n = dst.len();
        assert_eq!(n % FUSED_BLOCKS, 0, "fused XTS works on multiples of {FUSED_BLOCKS} blocks");
        let (src_ptr, dst_ptr) = in_out(src, dst);
        #[cfg(target_arch = "x86_64")]
        {
            macro_rules! run {
                ($rk:literal) => {{
                    let keys: &[[u8; 16]; $rk] = round_keys.try_into().expect("length checked by the match");
                    // SAFETY: `self` exists only if `Avx512::detect` and `Avx512::vaes` found the
                    // features the function is compiled for (VAES implies AES-NI and AVX2 to the
                    // compiler; AES-NI is also what the `aes` crate checked before it handed out
                    // the round keys); `src_ptr` (a slice distinct from `dst`, or `dst` itself) and
                    // `dst` are each valid for `n` blocks, a multiple of 32, checked above.
                    unsafe {
                        if decrypt {
                            x86::xts_avx512::<$rk, true>(keys, src_ptr, dst_ptr, n, first)
                        } else {
                            x86::xts_avx512::<$rk, false>(keys, src_ptr, dst_ptr, n, first)
                        }
                    }
                }};
            }
            match round_keys.len() {
                11 => run!(11),
                13 => run!(13),
                15 => run!(15),
                other => panic!("an AES key schedule has 11, 13 or 15 round keys, not {other}"),
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            let _ = (round_keys, decrypt, src_ptr, first);
            unreachable!("Vaes512 is only detected on x86_64")
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use core::arch::x86_64::*;

    use super::STEP_BLOCKS;

    /// `fn $name(t, poly)`: multiply each 128-bit lane of `t` by alpha^(8 * $bytes)
    /// (little-endian bit order of IEEE 1619; `poly` holds 0x87 in every qword). The lane is
    /// shifted up by `$bytes` bytes and the top `$bytes` bytes shifted out (moved to the
    /// bottom by a shift of `16 - $bytes`) are folded back in times x^7 + x^2 + x + 1 with one
    /// carry-less multiplication of the low qwords: at most a 32-bit by 8-bit product, 39
    /// bits, far below 128, so no second reduction is needed.
    macro_rules! mul_alpha_bytes {
        ($name:ident, $bytes:literal, $rest:literal) => {
            #[inline]
            #[target_feature(enable = "avx512f,avx512bw,vpclmulqdq")]
            pub(super) fn $name(t: __m512i, poly: __m512i) -> __m512i {
                const { assert!($bytes + $rest == 16 && $bytes <= 4) };
                let carry = _mm512_bsrli_epi128::<$rest>(t);
                let fold = _mm512_clmulepi64_epi128::<0x00>(carry, poly);
                _mm512_xor_si512(_mm512_bslli_epi128::<$bytes>(t), fold)
            }
        };
    }
    mul_alpha_bytes!(mul_alpha8, 1, 15);
    mul_alpha_bytes!(mul_alpha16, 2, 14);
    mul_alpha_bytes!(mul_alpha32, 4, 12);

    /// # Safety
    /// The CPU has AVX-512F, AVX-512BW and VPCLMULQDQ; `src` (may equal `dst`), `dst` and
    /// `tweaks` point to `n` blocks each, `n` a multiple of 16; `dst` and `tweaks` do not overlap.
    #[target_feature(enable = "avx512f,avx512bw,vpclmulqdq")]
    pub(super) unsafe fn whiten_in_avx512(
        src: *const [u8; 16],
        dst: *mut [u8; 16],
        tweaks: *mut [u8; 16],
        n: usize,
        first: &[[u8; 16]; STEP_BLOCKS],
    ) {
        let poly = _mm512_set1_epi64(0x87);
        let f = first.as_ptr().cast::<__m512i>();
        // SAFETY: `first` is 16 blocks, i.e. four 512-bit values; unaligned loads.
        let mut t = unsafe {
            [
                _mm512_loadu_si512(f),
                _mm512_loadu_si512(f.add(1)),
                _mm512_loadu_si512(f.add(2)),
                _mm512_loadu_si512(f.add(3)),
            ]
        };
        let (src, dst, tweaks) = (src.cast::<__m512i>(), dst.cast::<__m512i>(), tweaks.cast::<__m512i>());
        for step in 0..n / STEP_BLOCKS {
            for (lane, tl) in t.iter_mut().enumerate() {
                let i = step * 4 + lane;
                // SAFETY: i < n / 4, and each pointer covers n blocks = n / 4 512-bit values.
                unsafe {
                    let d = _mm512_loadu_si512(src.add(i));
                    _mm512_storeu_si512(dst.add(i), _mm512_xor_si512(d, *tl));
                    _mm512_storeu_si512(tweaks.add(i), *tl);
                }
                *tl = mul_alpha16(*tl, poly);
            }
        }
    }

    /// XTS in one pass: for each block, `AES(P ^ T) ^ T` with both XORs folded into AES's
    /// first and last key additions (`P ^ T ^ K_0` in one three-way XOR, and
    /// `aes{enc,dec}last(x, K_last ^ T)`, which is `aes{enc,dec}last(x, K_last) ^ T`, since
    /// the last round ends by adding its key). Eight registers of four blocks per step; the
    /// eight tweak registers step by alpha^32.
    ///
    /// # Safety
    /// The CPU has AVX-512F, AVX-512BW, VPCLMULQDQ and VAES; `src` (may equal `dst`) and
    /// `dst` point to `n` blocks each, `n` a multiple of 32.
    #[target_feature(enable = "avx512f,avx512bw,vpclmulqdq,vaes")]
    pub(super) unsafe fn xts_avx512<const RK: usize, const DECRYPT: bool>(
        round_keys: &[[u8; 16]; RK],
        src: *const [u8; 16],
        dst: *mut [u8; 16],
        n: usize,
        first: &[[u8; 16]; 8],
    ) {
        const W: usize = super::FUSED_BLOCKS / 4;
        let mut keys = [_mm512_setzero_si512(); RK];
        for (k, rk) in keys.iter_mut().zip(round_keys) {
            // SAFETY: `rk` is 16 bytes; unaligned load.
            *k = _mm512_broadcast_i32x4(unsafe { _mm_loadu_si128(rk.as_ptr().cast()) });
        }
        let poly = _mm512_set1_epi64(0x87);
        let f = first.as_ptr().cast::<__m512i>();
        let mut t = [_mm512_setzero_si512(); W];
        // SAFETY: `first` is 8 blocks, i.e. two 512-bit values; unaligned loads.
        (t[0], t[1]) = unsafe { (_mm512_loadu_si512(f), _mm512_loadu_si512(f.add(1))) };
        for i in 2..W {
            t[i] = mul_alpha8(t[i - 2], poly);
        }
        let (src, dst) = (src.cast::<__m512i>(), dst.cast::<__m512i>());
        // The eight registers of a step, written out: with loops over the arrays LLVM kept the
        // tweaks and blocks on the stack between rounds.
        macro_rules! each {
            ($i:ident => $body:block) => {{
                each!(@ $i $body 0 1 2 3 4 5 6 7);
            }};
            (@ $i:ident $body:block $($n:literal)*) => {{
                const { assert!(W == 8) };
                $( { let $i: usize = $n; $body } )*
            }};
        }
        let mut x = [_mm512_setzero_si512(); W];
        for step in 0..n / super::FUSED_BLOCKS {
            let base = step * W;
            each!(i => {
                // SAFETY: base + i < n / 4 512-bit values in `src`; unaligned load.
                let p = unsafe { _mm512_loadu_si512(src.add(base + i)) };
                x[i] = _mm512_ternarylogic_epi64::<0x96>(p, t[i], keys[0]);
            });
            for key in &keys[1..RK - 1] {
                each!(i => {
                    x[i] = if DECRYPT { _mm512_aesdec_epi128(x[i], *key) } else { _mm512_aesenc_epi128(x[i], *key) };
                });
            }
            each!(i => {
                let last = _mm512_xor_si512(keys[RK - 1], t[i]);
                let c = if DECRYPT {
                    _mm512_aesdeclast_epi128(x[i], last)
                } else {
                    _mm512_aesenclast_epi128(x[i], last)
                };
                // SAFETY: as the load above, in `dst`; unaligned store.
                unsafe { _mm512_storeu_si512(dst.add(base + i), c) };
                t[i] = mul_alpha32(t[i], poly);
            });
        }
        // The broadcast round keys (and the tweaks and blocks) were spilled to this frame
        // between rounds: wipe them before it is given up.
        zeroize::Zeroize::zeroize(&mut keys);
        zeroize::Zeroize::zeroize(&mut t);
        zeroize::Zeroize::zeroize(&mut x);
    }

    /// # Safety
    /// The CPU has AVX-512F; `data` and `stream` point to `n` 64-byte chunks each.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn xor_avx512(data: *mut u8, stream: *const u8, n: usize) {
        let (data, stream) = (data.cast::<__m512i>(), stream.cast::<__m512i>());
        for i in 0..n {
            // SAFETY: i < n 64-byte chunks in both buffers; unaligned loads and stores.
            unsafe {
                let d = _mm512_loadu_si512(data.add(i));
                _mm512_storeu_si512(data.add(i), _mm512_xor_si512(d, _mm512_loadu_si512(stream.add(i))));
            }
        }
    }

    /// # Safety
    /// The CPU has AVX-512F and AVX-512BW; `out` points to `n` blocks; `lo + n` does not wrap.
    #[target_feature(enable = "avx512f,avx512bw")]
    pub(super) unsafe fn ctr_counters_avx512(lo: u64, hi: u64, out: *mut [u8; 16], n: usize) {
        // Lanes (lo + k, hi) for k = 0..3, as little-endian 128-bit values.
        let mut ctr = _mm512_add_epi64(
            _mm512_set_epi64(hi as i64, lo as i64, hi as i64, lo as i64, hi as i64, lo as i64, hi as i64, lo as i64),
            _mm512_set_epi64(0, 3, 0, 2, 0, 1, 0, 0),
        );
        let four = _mm512_set_epi64(0, 4, 0, 4, 0, 4, 0, 4);
        // Reverse the 16 bytes of every lane: little-endian to big-endian.
        let rev = _mm512_broadcast_i32x4(_mm_set_epi8(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15));
        let out4 = out.cast::<__m512i>();
        for i in 0..n / 4 {
            // SAFETY: i < n / 4 512-bit values in `out`; unaligned store.
            unsafe { _mm512_storeu_si512(out4.add(i), _mm512_shuffle_epi8(ctr, rev)) };
            ctr = _mm512_add_epi64(ctr, four);
        }
        for k in n / 4 * 4..n {
            let c = ((hi as u128) << 64) | (lo + k as u64) as u128;
            // SAFETY: k < n blocks in `out`.
            unsafe { out.add(k).write(c.to_be_bytes()) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `t * x` in GF(2^128), IEEE 1619 bit order, written out bit by bit.
    fn times_x(t: u128) -> u128 {
        let carry = t >> 127;
        (t << 1) ^ if carry == 1 { 0x87 } else { 0 }
    }

    /// The 64-byte broadcasts of the round keys that `xts_avx512` spills to its stack frame
    /// are wiped before it returns: the stack below the caller, read through
    /// `/proc/self/mem` after the call, holds none of them.
    #[test]
    fn fused_xts_leaves_no_round_keys_on_the_stack() {
        let Some(v) = Avx512::detect().and_then(Avx512::vaes) else {
            eprintln!("no AVX-512 VAES on this CPU: nothing to test");
            return;
        };
        fn broadcasts_left(v: Vaes512, decrypt: bool) -> usize {
            // Distinctive round keys, on the heap, so that only the callee's copies can be
            // found below this frame.
            let round_keys: Box<[[u8; 16]; 15]> =
                Box::new(std::array::from_fn(|r| std::array::from_fn(|i| 0xA0 ^ (r as u8) << 3 ^ i as u8)));
            let first = [[7u8; 16]; 8];
            let mut data = vec![[0u8; 16]; FUSED_BLOCKS * 2];
            v.xts_fused(&round_keys[..], decrypt, None, &mut data, &first);
            std::hint::black_box(&data);
            let marker = 0u8;
            let here = std::hint::black_box(&marker) as *const u8 as u64;
            let mut below = vec![0u8; 64 * 1024];
            let mem = std::fs::File::open("/proc/self/mem").expect("open /proc/self/mem");
            let from = here - below.len() as u64;
            std::os::unix::fs::FileExt::read_exact_at(&mem, &mut below, from)
                .expect("read this thread's stack below the current frame");
            round_keys
                .iter()
                .filter(|rk| {
                    let broadcast: Vec<u8> = rk.iter().copied().cycle().take(64).collect();
                    below.windows(64).any(|w| w == broadcast.as_slice())
                })
                .count()
        }
        for decrypt in [false, true] {
            let left = std::thread::spawn(move || broadcasts_left(v, decrypt)).join().unwrap();
            assert_eq!(left, 0, "{left} broadcast round keys left on the stack (decrypt: {decrypt})");
        }
    }

    #[test]
    fn whitening_of_zeros_is_the_tweak_sequence() {
        let Some(x) = Avx512::detect() else {
            eprintln!("no AVX-512 on this CPU: nothing to test");
            return;
        };
        // Starts whose top 16 bits are set exercise the fold in every lane and step.
        let starts =
            [1u128, u128::MAX, 1 << 127, 0xffff << 112, 0x8001 << 112, 0x0123_4567_89ab_cdef_fedc_ba98_7654_3210];
        for start in starts {
            for n in [16usize, 32, 512] {
                let mut seq = Vec::with_capacity(n);
                let mut t = start;
                for _ in 0..n {
                    seq.push(t);
                    t = times_x(t);
                }
                let first: [[u8; 16]; STEP_BLOCKS] = core::array::from_fn(|j| seq[j].to_le_bytes());
                let mut out = vec![[0u8; 16]; n];
                let mut tweaks = vec![[0u8; 16]; n];
                x.whiten_in(None, &mut out, &mut tweaks, &first);
                for (j, block) in out.iter().enumerate() {
                    assert_eq!(u128::from_le_bytes(*block), seq[j], "start {start:#x}, block {j}");
                }
                assert_eq!(tweaks, out, "the stored tweaks are the ones XORed in");
                // Out of place gives the same and leaves the source alone; the second pass
                // takes the tweaks out again.
                let src = vec![[0u8; 16]; n];
                let mut out2 = vec![[9u8; 16]; n];
                x.whiten_in(Some(&src), &mut out2, &mut tweaks, &first);
                assert_eq!(out2, out);
                xor_bytes(Some(x), out2.as_flattened_mut(), tweaks.as_flattened());
                assert_eq!(out2, src);
            }
        }
    }

    #[test]
    #[cfg(target_arch = "x86_64")]
    fn lane_multipliers_match_repeated_times_x() {
        use core::arch::x86_64::*;
        let Some(_) = Avx512::detect() else {
            eprintln!("no AVX-512 on this CPU: nothing to test");
            return;
        };
        // Values whose top 8, 16 or 32 bits are set exercise every fold.
        let values = [
            1u128,
            u128::MAX,
            1 << 127,
            0xff << 120,
            0xffff << 112,
            0xffff_ffff << 96,
            0x8000_0001 << 96,
            0x0123_4567_89ab_cdef_fedc_ba98_7654_3210,
        ];
        type Mul = unsafe fn(__m512i, __m512i) -> __m512i;
        let muls: [(u32, Mul); 3] = [(8, x86::mul_alpha8), (16, x86::mul_alpha16), (32, x86::mul_alpha32)];
        for chunk in values.chunks(4) {
            let lanes: [u128; 4] = chunk.try_into().unwrap();
            for (power, mul) in muls {
                let mut bytes = [0u8; 64];
                for (k, v) in lanes.iter().enumerate() {
                    bytes[16 * k..16 * k + 16].copy_from_slice(&v.to_le_bytes());
                }
                let mut out = [0u8; 64];
                // SAFETY: `detect` found AVX-512F/BW and VPCLMULQDQ, the multipliers' features;
                // 64-byte unaligned load and store on 64-byte arrays.
                unsafe {
                    let r = mul(_mm512_loadu_si512(bytes.as_ptr().cast()), _mm512_set1_epi64(0x87));
                    _mm512_storeu_si512(out.as_mut_ptr().cast(), r);
                }
                for (k, v) in lanes.iter().enumerate() {
                    let want = (0..power).fold(*v, |t, _| times_x(t));
                    let got = u128::from_le_bytes(out[16 * k..16 * k + 16].try_into().unwrap());
                    assert_eq!(got, want, "{v:#x} * alpha^{power}");
                }
            }
        }
    }

    #[test]
    fn counters_and_xor_match_scalar() {
        let Some(x) = Avx512::detect() else {
            eprintln!("no AVX-512 on this CPU: nothing to test");
            return;
        };
        for first in [0u128, 1, (7u128 << 64) | (u64::MAX as u128 - 600), u128::MAX << 64] {
            for n in [0usize, 1, 3, 4, 5, 31, 512] {
                let mut wide = vec![[0u8; 16]; n];
                x.ctr_counters(first, &mut wide);
                let scalar: Vec<[u8; 16]> = (0..n).map(|i| (first + i as u128).to_be_bytes()).collect();
                assert_eq!(wide, scalar, "first {first:#x}, n {n}");
            }
        }
        for len in [0usize, 1, 63, 64, 65, 200, 8192] {
            let data: Vec<u8> = (0..len).map(|i| i as u8).collect();
            let stream: Vec<u8> = (0..len).map(|i| (i * 7 + 1) as u8).collect();
            let mut wide = data.clone();
            x.xor_bytes(&mut wide, &stream);
            let scalar: Vec<u8> = data.iter().zip(&stream).map(|(a, b)| a ^ b).collect();
            assert_eq!(wide, scalar, "len {len}");
        }
    }

    #[test]
    #[should_panic(expected = "wraps its low 64 bits")]
    fn counters_refuse_a_run_across_the_64_bit_carry() {
        match Avx512::detect() {
            Some(x) => x.ctr_counters(u64::MAX as u128 - 1, &mut [[0u8; 16]; 4]),
            None => panic!("wraps its low 64 bits (no AVX-512 here; nothing else to check)"),
        }
    }
}
