//! Key wrapping with AES-GCM.
//!
//! A wrapped blob is `nonce (12) || ciphertext (len of plaintext) || tag (16)`.
//! The key-encryption key (KEK, normally a principal key) selects the variant:
//! 16 bytes → AES-128-GCM, 32 bytes → AES-256-GCM. Every call to [`wrap`] draws a
//! fresh 96-bit nonce from the OS CSPRNG. The associated data (AAD) binds a blob to
//! its purpose and identity (for example the relation it belongs to): a blob moved
//! elsewhere fails to unwrap with [`TdeError::Decrypt`].

use aes_gcm::aead::inout::InOutBuf;
use aes_gcm::{AeadInOut, Aes128Gcm, Aes256Gcm, KeyInit, Nonce, Tag};
use zeroize::Zeroizing;

use crate::error::{Result, TdeError};

/// Length of the GCM nonce at the start of a wrapped blob.
pub const NONCE_LEN: usize = 12;
/// Length of the GCM tag at the end of a wrapped blob.
pub const TAG_LEN: usize = 16;
/// Bytes a wrapped blob has on top of its plaintext.
pub const OVERHEAD: usize = NONCE_LEN + TAG_LEN;

enum Gcm {
    A128(Aes128Gcm),
    A256(Aes256Gcm),
}

fn gcm(kek: &[u8]) -> Result<Gcm> {
    let bad = |_| TdeError::Invalid("wrong AES-GCM key length".into());
    match kek.len() {
        16 => Ok(Gcm::A128(Aes128Gcm::new_from_slice(kek).map_err(bad)?)),
        32 => Ok(Gcm::A256(Aes256Gcm::new_from_slice(kek).map_err(bad)?)),
        n => Err(TdeError::Invalid(format!("key encryption key must be 16 or 32 bytes, got {n}"))),
    }
}

/// Wrap `plaintext` under `kek` with associated data `aad`.
///
/// Returns `nonce || ciphertext || tag`. Fails with [`TdeError::Invalid`] if `kek` is
/// neither 16 nor 32 bytes.
pub fn wrap(kek: &[u8], aad: &[u8], plaintext: &[u8]) -> Result<Vec<u8>> {
    let mut nonce = [0u8; NONCE_LEN];
    crate::rng::fill(&mut nonce)?;
    seal_with_nonce(kek, &nonce, aad, plaintext)
}

/// AES-GCM encryption with a caller-chosen nonce, returning `nonce || ciphertext || tag`.
///
/// Only for known-answer tests: reusing a nonce with the same key breaks GCM. Use [`wrap`].
#[doc(hidden)]
pub fn seal_with_nonce(kek: &[u8], nonce: &[u8; NONCE_LEN], aad: &[u8], plaintext: &[u8]) -> Result<Vec<u8>> {
    let gcm = gcm(kek)?;
    let mut out = Vec::with_capacity(OVERHEAD + plaintext.len());
    out.extend_from_slice(nonce);
    out.extend_from_slice(plaintext);
    let n = Nonce::from(*nonce);
    let body = InOutBuf::from(&mut out[NONCE_LEN..]);
    let tag = match &gcm {
        Gcm::A128(c) => c.encrypt_inout_detached(&n, aad, body),
        Gcm::A256(c) => c.encrypt_inout_detached(&n, aad, body),
    }
    .map_err(|_| TdeError::Invalid("plaintext or associated data too long for AES-GCM".into()))?;
    out.extend_from_slice(&tag);
    Ok(out)
}

/// Unwrap a blob produced by [`wrap`] with the same `kek` and `aad`.
///
/// Fails with [`TdeError::Decrypt`] if the tag does not verify (wrong key, wrong
/// associated data, or tampered blob), with [`TdeError::Corrupt`] if the blob is too
/// short to be a wrapped key, and with [`TdeError::Invalid`] for a bad `kek` length.
pub fn unwrap(kek: &[u8], aad: &[u8], wrapped: &[u8]) -> Result<Zeroizing<Vec<u8>>> {
    let gcm = gcm(kek)?;
    if wrapped.len() < OVERHEAD {
        return Err(TdeError::Corrupt(format!(
            "wrapped key is {} bytes, shorter than the {OVERHEAD}-byte minimum",
            wrapped.len()
        )));
    }
    let (nonce, rest) = wrapped.split_at(NONCE_LEN);
    let (ciphertext, tag) = rest.split_at(rest.len() - TAG_LEN);
    let bad_len = |_| TdeError::Corrupt("malformed wrapped key".into());
    let nonce = Nonce::try_from(nonce).map_err(bad_len)?;
    let tag = Tag::try_from(tag).map_err(bad_len)?;

    let mut buf = Zeroizing::new(ciphertext.to_vec());
    let body = InOutBuf::from(buf.as_mut_slice());
    match &gcm {
        Gcm::A128(c) => c.decrypt_inout_detached(&nonce, aad, body, &tag),
        Gcm::A256(c) => c.decrypt_inout_detached(&nonce, aad, body, &tag),
    }
    .map_err(|_| TdeError::Decrypt("authentication tag mismatch: wrong key or tampered wrapped key".into()))?;
    Ok(buf)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{hex, random_bytes};

    // McGrew & Viega, "The Galois/Counter Mode of Operation", test cases 3, 4 and 16
    // (the NIST GCM specification's examples).
    const K: &str = "feffe9928665731c6d6a8f9467308308";
    const IV: &str = "cafebabefacedbaddecaf888";
    const P: &str = "d9313225f88406e5a55909c5aff5269a86a7a9531534f7da2e4c303d8a318a72\
                     1c3c0c95956809532fcf0e2449a6b525b16aedf5aa0de657ba637b391aafd255";
    const A: &str = "feedfacedeadbeeffeedfacedeadbeefabaddad2";

    fn iv() -> [u8; 12] {
        hex(IV).try_into().unwrap()
    }

    #[test]
    fn gcm_aes128_test_case_3() {
        let out = seal_with_nonce(&hex(K), &iv(), &[], &hex(P)).unwrap();
        let expect = hex("42831ec2217774244b7221b784d0d49ce3aa212f2c02a4e035c17e2329aca12e\
             21d514b25466931c7d8f6a5aac84aa051ba30b396a0aac973d58e091473f5985\
             4d5c2af327cd64a62cf35abd2ba6fab4");
        assert_eq!(out[..NONCE_LEN], iv());
        assert_eq!(out[NONCE_LEN..], expect[..]);
        assert_eq!(*unwrap(&hex(K), &[], &out).unwrap(), hex(P));
    }

    #[test]
    fn gcm_aes128_test_case_4_with_aad() {
        let p = &hex(P)[..60];
        let out = seal_with_nonce(&hex(K), &iv(), &hex(A), p).unwrap();
        let expect = hex("42831ec2217774244b7221b784d0d49ce3aa212f2c02a4e035c17e2329aca12e\
             21d514b25466931c7d8f6a5aac84aa051ba30b396a0aac973d58e091\
             5bc94fbc3221a5db94fae95ae7121a47");
        assert_eq!(out[NONCE_LEN..], expect[..]);
        assert_eq!(*unwrap(&hex(K), &hex(A), &out).unwrap(), p);
    }

    #[test]
    fn gcm_aes256_test_case_16_with_aad() {
        let key = hex(&format!("{K}{K}"));
        let p = &hex(P)[..60];
        let out = seal_with_nonce(&key, &iv(), &hex(A), p).unwrap();
        let expect = hex("522dc1f099567d07f47f37a32a84427d643a8cdcbfe5c0c97598a2bd2555d1aa\
             8cb08e48590dbb3da7b08b1056828838c5f61e6393ba7a0abcc9f662\
             76fc6ece0f4e1768cddf8853bb2d551b");
        assert_eq!(out[NONCE_LEN..], expect[..]);
    }

    #[test]
    fn round_trip_128_and_256() {
        for kek_len in [16, 32] {
            let kek = random_bytes(kek_len);
            let pt = random_bytes(80);
            let w = wrap(&kek, b"aad", &pt).unwrap();
            assert_eq!(w.len(), pt.len() + OVERHEAD);
            assert_ne!(&w[NONCE_LEN..NONCE_LEN + pt.len()], &pt[..]);
            assert_eq!(*unwrap(&kek, b"aad", &w).unwrap(), pt);
        }
        // empty plaintext works too
        let kek = random_bytes(16);
        let w = wrap(&kek, b"", b"").unwrap();
        assert_eq!(w.len(), OVERHEAD);
        assert!(unwrap(&kek, b"", &w).unwrap().is_empty());
    }

    #[test]
    fn wrong_kek_fails() {
        let kek = random_bytes(32);
        let w = wrap(&kek, b"aad", b"secret key bytes").unwrap();
        let other = random_bytes(32);
        assert!(matches!(unwrap(&other, b"aad", &w), Err(TdeError::Decrypt(_))));
        // a 16-byte prefix of the right key is a different (AES-128) key
        assert!(matches!(unwrap(&kek[..16], b"aad", &w), Err(TdeError::Decrypt(_))));
    }

    #[test]
    fn any_flipped_bit_fails() {
        let kek = random_bytes(16);
        let w = wrap(&kek, b"aad", &random_bytes(48)).unwrap();
        let n = w.len();
        // nonce, ciphertext and tag, first and last bit of each
        for (pos, bit) in [
            (0, 0x01),
            (NONCE_LEN - 1, 0x80),
            (NONCE_LEN, 0x01),
            (n - TAG_LEN - 1, 0x80),
            (n - TAG_LEN, 0x01),
            (n - 1, 0x80),
        ] {
            let mut bad = w.clone();
            bad[pos] ^= bit;
            assert!(matches!(unwrap(&kek, b"aad", &bad), Err(TdeError::Decrypt(_))), "flip at byte {pos}");
        }
        assert!(unwrap(&kek, b"aad", &w).is_ok());
    }

    #[test]
    fn wrong_aad_fails() {
        let kek = random_bytes(32);
        let w = wrap(&kek, b"relation 1", b"k").unwrap();
        assert!(matches!(unwrap(&kek, b"relation 2", &w), Err(TdeError::Decrypt(_))));
        assert!(matches!(unwrap(&kek, b"", &w), Err(TdeError::Decrypt(_))));
    }

    #[test]
    fn nonces_differ_between_wraps() {
        let kek = random_bytes(16);
        let a = wrap(&kek, b"x", b"same data").unwrap();
        let b = wrap(&kek, b"x", b"same data").unwrap();
        assert_ne!(a[..NONCE_LEN], b[..NONCE_LEN]);
        assert_ne!(a, b);
    }

    #[test]
    fn bad_lengths() {
        assert!(matches!(wrap(&[0u8; 24], b"", b"x"), Err(TdeError::Invalid(_))));
        assert!(matches!(unwrap(&[0u8; 15], b"", &[0u8; 40]), Err(TdeError::Invalid(_))));
        assert!(matches!(unwrap(&[0u8; 16], b"", &[0u8; OVERHEAD - 1]), Err(TdeError::Corrupt(_))));
    }
}
