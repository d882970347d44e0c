//! Randomised tests of every parser of bytes that come from disk: key maps,
//! the WAL key file, the provider catalog and WAL pages.  Valid inputs are
//! mutated (bytes overwritten, truncated, extended) and each parser must
//! return a value or a clear error: never panic, never allocate without bound.

use proptest::prelude::*;
use tde_core::cipher::{Cipher, RelKey};
use tde_core::keymap::{self, KeyMapEntry, KeyMapHeader, PrincipalRef};
use tde_core::providers_catalog::ProviderCatalog;
use tde_core::wal::{self, WalCipher};
use tde_core::walkeys::{self, KeyRanges, WalKey, Wrapping};
use zeroize::Zeroizing;

const DB: u32 = 16384;

fn principal() -> PrincipalRef {
    PrincipalRef { name: "k".into(), provider_id: 1, created_unix_secs: 1 }
}

/// A valid key map with three entries, and its principal key.
fn valid_map() -> (Vec<u8>, Vec<u8>) {
    let pk = vec![7u8; 32];
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m");
    let header = KeyMapHeader::new(DB, principal(), &pk).unwrap();
    keymap::create(&path, &header).unwrap();
    for (rel, cipher) in [(16385, Cipher::Aes128Xts), (16386, Cipher::Aes256Xts), (16387, Cipher::Aes128Cbc)] {
        let e = KeyMapEntry::seal(DB, 1663, rel, &RelKey::generate(cipher).unwrap(), &pk).unwrap();
        keymap::put_entry(&path, &e).unwrap();
    }
    (std::fs::read(&path).unwrap(), pk)
}

fn server_wrapping() -> (Wrapping, KeyMapHeader, Vec<KeyMapEntry>, Zeroizing<Vec<u8>>) {
    let db = u32::MAX - 2;
    let sk = Zeroizing::new(vec![9u8; 32]);
    let header = KeyMapHeader::new(db, principal(), &sk).unwrap();
    let kek = walkeys::new_kek_entry(db, &sk).unwrap();
    let w = Wrapping::from_server_map(db, &header, std::slice::from_ref(&kek), sk.clone()).unwrap();
    (w, header, vec![kek], sk)
}

fn valid_wal_keys(w: &Wrapping) -> Vec<u8> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("wal_keys");
    for (i, tli) in [(0u64, 1u32), (1, 1), (2, 2)] {
        let (key, base) = wal::generate_key(16).unwrap();
        let k = WalKey { start_lsn: i << 24, end_lsn: u64::MAX, timeline: tli, created_unix_secs: 1, key, base };
        walkeys::append(&path, w, &k).unwrap();
    }
    std::fs::read(&path).unwrap()
}

/// Overwrite bytes, then truncate or extend.
fn mutate(mut data: Vec<u8>, edits: &[(usize, u8)], cut: Option<usize>, extra: &[u8]) -> Vec<u8> {
    if !data.is_empty() {
        for &(at, b) in edits {
            let i = at % data.len();
            data[i] = b;
        }
    }
    if let Some(c) = cut {
        data.truncate(c % (data.len() + 1));
    }
    data.extend_from_slice(extra);
    data
}

fn edits() -> impl Strategy<Value = (Vec<(usize, u8)>, Option<usize>, Vec<u8>)> {
    (
        proptest::collection::vec((any::<usize>(), any::<u8>()), 0..16),
        proptest::option::of(any::<usize>()),
        proptest::collection::vec(any::<u8>(), 0..600),
    )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]

    #[test]
    fn key_maps((e, cut, extra) in edits()) {
        let (data, pk) = valid_map();
        let bad = mutate(data, &e, cut, &extra);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m");
        std::fs::write(&path, &bad).unwrap();
        if let Ok((h, entries)) = keymap::read(&path) {
            let _ = h.verify_principal(&pk);
            for en in entries {
                let _ = en.open(DB, &pk);
            }
        }
        let _ = keymap::read_for_lookup(&path);
        let _ = keymap::header_from_bytes(&bad);
        let _ = keymap::entry_from_bytes(&bad);
    }

    #[test]
    fn wal_key_files((e, cut, extra) in edits()) {
        let (w, _, _, _) = server_wrapping();
        let bad = mutate(valid_wal_keys(&w), &e, cut, &extra);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("wal_keys");
        std::fs::write(&path, &bad).unwrap();
        if let Ok(keys) = walkeys::read_all(&path, &w) {
            let ranges = KeyRanges::from_keys(&keys);
            prop_assert!(ranges.is_ok());
        }
        let _ = walkeys::read_from(&path, &w, 256);
        let _ = walkeys::has_legacy_records(&path);
    }

    #[test]
    fn provider_catalogs((e, cut, extra) in edits(), junk in proptest::collection::vec(any::<u8>(), 0..2000)) {
        let mut cat = ProviderCatalog::new();
        cat.add("f", tde_core::provider::ProviderKind::File, serde_json::json!({"path": "/k/keyring.json"}), 0).unwrap();
        let valid = cat.to_bytes().unwrap();
        let _ = ProviderCatalog::from_bytes(&mutate(valid, &e, cut, &extra));
        let _ = ProviderCatalog::from_bytes(&junk);
    }

    #[test]
    fn wal_pages(
        mut page in proptest::collection::vec(any::<u8>(), 8192),
        tli in 0u32..4,
        at in 0u64..64,
        own_address in any::<bool>(),
    ) {
        let c = std::sync::Arc::new(WalCipher::new(&[3u8; 16], &[4u8; 16]).unwrap());
        let mut keys = KeyRanges::default();
        keys.push(0, u64::MAX, Some(c));
        let start = at * 8192;
        if own_address {
            // a page that claims to be encrypted WAL of this position, with a random body
            page[3] |= (wal::XLP_TDE_ENCRYPTED >> 8) as u8;
            page[8..16].copy_from_slice(&start.to_le_bytes());
        }
        let mut buf = page.clone();
        let _ = wal::decrypt_after_read(&mut buf, start, tli, &keys, &mut |_| Ok([0u8; wal::HEADER_PREFIX]));
        let mut buf = page.clone();
        let _ = wal::any_page_flagged(&mut buf, start, &mut |_| Ok([0u8; wal::HEADER_PREFIX]));
        let mut buf = page;
        let _ = wal::encrypt_for_write(&mut buf, start + 24, start + 4000, tli, &keys, &mut |_| Ok([0u8; wal::HEADER_PREFIX]));
    }
}
