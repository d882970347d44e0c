//! No copy of key material is left in freed memory by the buffers that hold it.
//!
//! This test binary's global allocator scans every block it frees for the
//! byte strings a test arms it with, and records a hit.  A control case
//! (a plain `Vec` that grows) shows that the scan sees what it should.
//! Growth goes through `GlobalAlloc::realloc`'s default (allocate, copy,
//! free), so every block that is given up is scanned.
#![allow(unsafe_code)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::io::Write;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicUsize, Ordering};
use std::sync::Mutex;

use tde_core::secret_buf::{read_secret, SecretBuf, SecretRead};
use tde_core::{FileKeyring, KeyProvider};

const MAX_NEEDLE: usize = 64;
const NEEDLES: usize = 2;

#[allow(clippy::declare_interior_mutable_const)]
const ZERO: AtomicU8 = AtomicU8::new(0);
#[allow(clippy::declare_interior_mutable_const)]
const ZEROS: [AtomicU8; MAX_NEEDLE] = [ZERO; MAX_NEEDLE];
static NEEDLE: [[AtomicU8; MAX_NEEDLE]; NEEDLES] = [ZEROS; NEEDLES];
static NEEDLE_LEN: [AtomicUsize; NEEDLES] = [AtomicUsize::new(0), AtomicUsize::new(0)];
static ARMED: AtomicBool = AtomicBool::new(false);
static FOUND: AtomicBool = AtomicBool::new(false);
/// One test at a time: the needles are global.
static SERIAL: Mutex<()> = Mutex::new(());

struct ScanningAllocator;

fn holds_needle(block: &[u8]) -> bool {
    (0..NEEDLES).any(|n| {
        let len = NEEDLE_LEN[n].load(Ordering::Relaxed);
        len > 0
            && block.windows(len).any(|w| w.iter().enumerate().all(|(i, b)| *b == NEEDLE[n][i].load(Ordering::Relaxed)))
    })
}

// SAFETY: every call goes to the system allocator with the caller's arguments;
// `dealloc` first reads the block it is given, which is still allocated and
// `layout.size()` bytes long.
unsafe impl GlobalAlloc for ScanningAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: as the caller's contract.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        if ARMED.load(Ordering::Relaxed) && layout.size() > 0 {
            // SAFETY: `ptr` is a live block of `layout.size()` bytes until freed below.
            let block = unsafe { std::slice::from_raw_parts(ptr, layout.size()) };
            if holds_needle(block) {
                FOUND.store(true, Ordering::Relaxed);
            }
        }
        // SAFETY: as the caller's contract.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: ScanningAllocator = ScanningAllocator;

/// Run `f` with the allocator looking for `needles` in freed blocks; whether it saw one.
fn freed_a_copy_of(needles: &[&[u8]], f: impl FnOnce()) -> bool {
    assert!(needles.len() <= NEEDLES);
    for (n, needle) in needles.iter().enumerate() {
        assert!(needle.len() <= MAX_NEEDLE);
        for (i, b) in needle.iter().enumerate() {
            NEEDLE[n][i].store(*b, Ordering::Relaxed);
        }
        NEEDLE_LEN[n].store(needle.len(), Ordering::Relaxed);
    }
    FOUND.store(false, Ordering::Relaxed);
    ARMED.store(true, Ordering::SeqCst);
    f();
    ARMED.store(false, Ordering::SeqCst);
    for len in &NEEDLE_LEN {
        len.store(0, Ordering::Relaxed);
    }
    FOUND.load(Ordering::SeqCst)
}

const SECRET: &[u8; 32] = b"\x8e\x11KEY-CANARY-0123456789abcdef\x01\x02\x03";

#[test]
fn a_growing_vec_leaves_copies_that_the_scan_sees() {
    let _one = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let leaked = freed_a_copy_of(&[SECRET], || {
        let mut v = zeroize::Zeroizing::new(Vec::with_capacity(8));
        v.extend_from_slice(SECRET);
        for _ in 0..10_000 {
            v.push(0u8);
        }
    });
    assert!(leaked, "the allocator's scan does not work: a plain Vec's growth was not seen");
}

#[test]
fn secret_buffers_wipe_every_block_they_give_up() {
    let _one = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let leaked = freed_a_copy_of(&[SECRET], || {
        let mut b = SecretBuf::with_capacity(8);
        b.write_all(SECRET).unwrap();
        for i in 0..10_000u32 {
            b.write_all(&i.to_le_bytes()).unwrap();
        }
        drop(b);
        // A response of unknown length, read a few bytes at a time past several growths.
        let mut data = Vec::with_capacity(100_000);
        data.extend_from_slice(SECRET);
        data.resize(100_000, 7);
        let read = read_secret(&mut &data[..], 0, 1 << 20).unwrap();
        assert!(matches!(read, SecretRead::Complete(ref b) if b.len() == 100_000));
        drop(read);
        zeroize::Zeroize::zeroize(&mut data);
    });
    assert!(!leaked, "a secret buffer freed a block that still held the key");
}

#[test]
fn the_keyring_file_leaves_no_copy_of_its_keys() {
    let _one = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keyring.json");
    let hex: String = SECRET.iter().map(|b| format!("{b:02x}")).collect();
    // Enough other keys, with short names (the writer's size estimate is low for them),
    // that the file is read and written in several steps.
    let mut keys = vec![format!(r#"{{"name": "c0", "key_hex": "{hex}", "created": 1}}"#)];
    let alphabet: Vec<char> = ('a'..='z').chain('A'..='Z').chain('0'..='9').collect();
    let one = alphabet.iter().map(|a| a.to_string());
    let two = alphabet.iter().flat_map(|a| alphabet.iter().map(move |b| format!("{a}{b}")));
    for (i, name) in one.chain(two).take(300).enumerate() {
        keys.push(format!(r#"{{"name": "{name}", "key_hex": "{:064x}", "created": 1765000000}}"#, i + 1));
    }
    std::fs::write(&path, format!(r#"{{"format": "pg_tde-keyring", "version": 1, "keys": [{}]}}"#, keys.join(",")))
        .unwrap();
    let keyring = FileKeyring::new(&path);
    let leaked = freed_a_copy_of(&[hex.as_bytes(), SECRET], || {
        let got = keyring.get_key("c0").unwrap().expect("the canary key");
        assert_eq!(&got.key[..], SECRET);
        drop(got);
        // A load, then a save of every key with a new one.
        keyring.create_key("another", 32).unwrap();
    });
    assert!(!leaked, "reading or writing the keyring left a copy of a key in freed memory");
    assert_eq!(&keyring.get_key("c0").unwrap().unwrap().key[..], SECRET);
}
