//! The two tweak passes of XTS with AVX-512, chosen at run time.
//!
//! XTS encrypts block `j` of a data unit as `AES(P_j ^ T_j) ^ T_j` with
//! `T_j = T_0 * alpha^j` in GF(2^128).  The AES part is one `encrypt_blocks`
//! call over the whole page (the `aes` crate picks VAES-512 at run time); what
//! is left is computing 512 tweaks and XORing them in and out, which the
//! portable code in `cipher.rs` does 128 bits at a time.  Here four 512-bit
//! registers hold 16 consecutive tweaks `T_j .. T_{j+15}`; each 128-bit lane
//! steps to `T_{j+16}` by multiplying with `alpha^16`: a shift left by two
//! bytes (`vpslldq`) and the 16 bits shifted out folded back in with one
//! carry-less multiplication by the polynomial's low terms `0x87`
//! (`x^128 = x^7 + x^2 + x + 1`; a 16-bit by 8-bit product has 23 bits and
//! needs no second reduction).  The pass XORs the tweaks into 16 blocks and
//! stores them for the second pass in the same loop.
//!
//! This is the only module of the crate with `unsafe` code, and it is the
//! CPU-feature boundary: the `#[target_feature]` functions may only run on a
//! CPU that has the features, which [`Avx512Xts::detect`] checks once; the
//! unaligned 512-bit loads and stores go through pointers to slices whose
//! lengths are checked first.  Both passes are checked against the portable
//! code in `cipher.rs` (`tests` below and the IEEE 1619 vectors there).

/// Blocks processed per step of the first pass (four registers of four blocks).
pub(crate) const STEP_BLOCKS: usize = 16;

/// Proof that this CPU has AVX-512F, AVX-512BW and VPCLMULQDQ. Only [`Avx512Xts::detect`] makes one.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Avx512Xts(());

impl Avx512Xts {
    /// `Some` when the CPU (and the OS, which must save the AVX-512 registers) supports the passes.
    pub(crate) fn detect() -> Option<Avx512Xts> {
        #[cfg(target_arch = "x86_64")]
        {
            // std caches the CPUID/XGETBV result; this is a few atomic loads.
            if std::is_x86_feature_detected!("avx512f")
                && std::is_x86_feature_detected!("avx512bw")
                && std::is_x86_feature_detected!("vpclmulqdq")
            {
                return Some(Avx512Xts(()));
            }
        }
        None
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
        let dst_ptr = dst.as_mut_ptr();
        let src_ptr = match src {
            Some(s) => {
                assert_eq!(s.len(), n);
                s.as_ptr()
            }
            None => dst_ptr.cast_const(),
        };
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

    /// Second pass: `blocks[j] ^= tweaks[j]`.
    ///
    /// # Panics
    /// If the lengths differ or are not a multiple of 4 blocks.
    pub(crate) fn whiten_out(self, blocks: &mut [[u8; 16]], tweaks: &[[u8; 16]]) {
        assert_eq!(blocks.len() % 4, 0, "XTS whitening works on multiples of 4 blocks");
        assert_eq!(tweaks.len(), blocks.len());
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the features are present (see `whiten_in`); both slices hold `blocks.len()`
        // blocks, a multiple of 4, checked above.
        unsafe {
            x86::whiten_out_avx512(blocks.as_mut_ptr(), tweaks.as_ptr(), blocks.len())
        };
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use core::arch::x86_64::*;

    use super::STEP_BLOCKS;

    /// Multiply each 128-bit lane by alpha^16 (little-endian bit order of IEEE 1619).
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,vpclmulqdq")]
    fn mul_alpha16(t: __m512i, poly: __m512i) -> __m512i {
        // The top two bytes of each lane, moved to its bottom.
        let carry = _mm512_bsrli_epi128::<14>(t);
        // carry * (x^7 + x^2 + x + 1), carry-less; selector 0x00 takes the low qwords.
        let fold = _mm512_clmulepi64_epi128::<0x00>(carry, poly);
        _mm512_xor_si512(_mm512_bslli_epi128::<2>(t), fold)
    }

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

    /// # Safety
    /// The CPU has AVX-512F; `blocks` and `tweaks` point to `n` blocks each, `n` a multiple of 4.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn whiten_out_avx512(blocks: *mut [u8; 16], tweaks: *const [u8; 16], n: usize) {
        let (blocks, tweaks) = (blocks.cast::<__m512i>(), tweaks.cast::<__m512i>());
        for i in 0..n / 4 {
            // SAFETY: i < n / 4 512-bit values in both buffers.
            unsafe {
                let d = _mm512_loadu_si512(blocks.add(i));
                _mm512_storeu_si512(blocks.add(i), _mm512_xor_si512(d, _mm512_loadu_si512(tweaks.add(i))));
            }
        }
    }
}
