//! Asynchronous reads of encrypted pages (PostgreSQL 18 and later).
//!
//! PostgreSQL 18's buffer manager reads through `smgr_startreadv`, and the read
//! completes in AIO completion callbacks: md.c's turns bytes into blocks, then
//! the buffer manager's verifies each page (header, checksum).  The completion
//! runs in a critical section, in the issuing backend, in another backend that
//! waits for the IO, or in an I/O worker (`io_method=worker`, the default).  So
//! pg_tde decrypts in a callback of its own, registered through the core
//! patch's `PGAIO_HCB_EXTENSION` slot so that it runs between the two.
//!
//! Everything that can fail happens when the read is started, in the issuing
//! backend with normal error handling: the file's key is looked up (loading it
//! if needed) and copied into a slot of the IO handle.  The completion only
//! takes the page cipher of that key from a small per-process cache, expanding
//! the key in place on a miss (no allocation, no lock, no file, no provider),
//! decrypts each block that was read with its own block number, and wipes the
//! slot.
//!
//! - Shared-buffer reads: the slot is in shared memory ([`IoKeySlots`]), one per
//!   AIO handle, because the completion may run in another process.  Decrypted
//!   in `complete_shared`, before the buffer manager's `complete_shared`.
//! - Temporary relations (local buffers): the key stays in the backend's own
//!   memory, as all temporary keys do (the handle gets a reference to the
//!   backend's expanded cipher, not a copy), and the pages are decrypted in
//!   `complete_local`, which PostgreSQL runs in the issuing backend only, before
//!   the local buffer manager's own `complete_local`.
//!
//! A read that completes with no key in its slot (which would be a bug) reports
//! `data_corrupted` through the IO's result instead of handing ciphertext on.

use std::cell::RefCell;
use std::collections::HashMap;
use std::ffi::c_void;
use std::sync::Arc;

use pgrx::pg_sys;
use pgrx::prelude::*;
use tde_core::cipher::{is_all_zero, Cipher, PageCipher, RelKey, BASE_IV_LEN, PAGE_SIZE};
use zeroize::Zeroize;

use crate::ffi;
use crate::ffi::aio;
use crate::keys::FileKey;

/// Longest serialized [`RelKey`]: 64 key bytes (AES-256-XTS) and a 16-byte base IV.
const MAX_KEY_BYTES: usize = 80;

/// `cb_data` of the callback: where the IO's key is.
const IN_SHARED_SLOT: u8 = 0;
const IN_LOCAL_MAP: u8 = 1;

/// The key of one in-flight read, in shared memory.
#[repr(C)]
#[derive(Clone, Copy)]
struct IoKeySlot {
    /// Set when the read is started, cleared when it completes.
    armed: bool,
    /// Raw fork number of the read.
    fork: u32,
    /// The file's key (its old key while re-keying); `key_len` 0: plaintext.
    cipher: u32,
    key_len: u32,
    key: [u8; MAX_KEY_BYTES],
    /// While the file is re-keyed: the frontier's slot (else -1) and the new key
    /// (`new_key_len` 0: plaintext), chosen per block at completion.
    rekey_slot: i32,
    rekey_file: [u32; 3],
    new_cipher: u32,
    new_key_len: u32,
    new_key: [u8; MAX_KEY_BYTES],
}

/// One [`IoKeySlot`] per AIO handle, indexed by `pgaio_io_get_id()`.
struct IoKeySlots {
    ptr: *mut IoKeySlot,
    len: usize,
}

/// The key of one in-flight read of a temporary relation: the backend's own
/// expanded cipher, shared, not copied.
struct LocalIoKey {
    /// Raw fork number of the read.
    fork: pg_sys::ForkNumber::Type,
    key: Arc<FileKey>,
}

thread_local! {
    // SAFETY (of the raw pointer): set once per process by the shmem startup hook,
    // before any IO, and pointing into shared memory that lives as long as the process.
    static SLOTS: RefCell<IoKeySlots> = const { RefCell::new(IoKeySlots { ptr: std::ptr::null_mut(), len: 0 }) };
    /// Keys of this backend's in-flight reads of temporary relations, by AIO handle id.
    static LOCAL_READS: RefCell<HashMap<i32, LocalIoKey>> = RefCell::new(HashMap::new());
}

static mut PREV_SHMEM_REQUEST: pg_sys::shmem_request_hook_type = None;
static mut PREV_SHMEM_STARTUP: pg_sys::shmem_startup_hook_type = None;

/// Register the completion callbacks and the shared memory for the slots.
/// Runs in `_PG_init` during shared_preload_libraries.
pub fn init() {
    let callbacks = aio::PgAioHandleCallbacks {
        stage: None,
        complete_shared: Some(complete_shared),
        complete_local: Some(complete_local),
        report: Some(report),
    };
    // SAFETY: we are in _PG_init during shared_preload_libraries, as the core
    // patch requires; the struct is copied.  Hooks are chained as PostgreSQL's
    // own extensions chain them, in the single-threaded postmaster.
    unsafe {
        ffi::guarded(|| aio::pgaio_register_extension_callbacks(&callbacks));
        PREV_SHMEM_REQUEST = pg_sys::shmem_request_hook;
        pg_sys::shmem_request_hook = Some(shmem_request);
        PREV_SHMEM_STARTUP = pg_sys::shmem_startup_hook;
        pg_sys::shmem_startup_hook = Some(shmem_startup);
    }
}

/// How many AIO handles the server creates: one per process slot (`AioProcs()`)
/// times `io_max_concurrency`.  In the shmem request hook `io_max_concurrency`
/// may still be -1 ("choose"); PostgreSQL then chooses at most 64
/// (`AioChooseMaxConcurrency`), so 64 gives an upper bound to request.  From the
/// shmem startup hook on, in every process (`EXEC_BACKEND` children included,
/// which run no request hook), it is the real count.
fn max_aio_handles() -> usize {
    // SAFETY: plain reads of backend globals, set before shmem requests are made.
    let (max_backends, io_max_concurrency) =
        unsafe { ((&raw const pg_sys::MaxBackends).read(), (&raw const aio::io_max_concurrency).read()) };
    let per_proc = if io_max_concurrency > 0 { io_max_concurrency } else { 64 };
    (max_backends as usize + pg_sys::NUM_AUXILIARY_PROCS as usize) * per_proc as usize
}

#[pg_guard]
unsafe extern "C-unwind" fn shmem_request() {
    // SAFETY: chaining the previous hook, in the postmaster.
    unsafe {
        if let Some(prev) = PREV_SHMEM_REQUEST {
            prev();
        }
        pg_sys::RequestAddinShmemSpace(max_aio_handles() * size_of::<IoKeySlot>());
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn shmem_startup() {
    // SAFETY: chaining the previous hook; ShmemInitStruct under AddinShmemInitLock
    // as PostgreSQL requires, with the size requested in shmem_request.
    unsafe {
        if let Some(prev) = PREV_SHMEM_STARTUP {
            prev();
        }
        // io_max_concurrency is chosen by now: one slot per handle, the same
        // number in every process (no more than was requested).
        let len = max_aio_handles();
        let bytes = len * size_of::<IoKeySlot>();
        // AddinShmemInitLock is MainLWLockArray[21] (storage/lwlocklist.h).
        let init_lock = &raw mut (*pg_sys::MainLWLockArray.add(21)).lock;
        pg_sys::LWLockAcquire(init_lock, pg_sys::LWLockMode::LW_EXCLUSIVE);
        let mut found = false;
        let ptr = pg_sys::ShmemInitStruct(c"pg_tde_aio_key_slots".as_ptr(), bytes, &mut found) as *mut IoKeySlot;
        if !found {
            std::ptr::write_bytes(ptr as *mut u8, 0, bytes);
        }
        pg_sys::LWLockRelease(init_lock);
        SLOTS.with(|s| *s.borrow_mut() = IoKeySlots { ptr, len });
        // First use of a thread-local with a destructor registers it, which may
        // allocate: do it here, in every process before any completion (I/O
        // workers and backends inherit it from the postmaster), not in one.
        EXPANDED.with(|_| ());
    }
}

/// Where the key slots are in shared memory (start, length), for
/// [`crate::key_memory`]; `None` before they exist.
pub fn key_slots_region() -> Option<(usize, usize)> {
    SLOTS.with(|s| {
        let s = s.borrow();
        (!s.ptr.is_null()).then(|| (s.ptr as usize, s.len * size_of::<IoKeySlot>()))
    })
}

/// The slot of AIO handle `id`.
///
/// # Safety
/// The caller must own the IO of handle `id` (it is starting or completing it),
/// which is what makes the slot exclusively its own.
unsafe fn slot(id: i32) -> Option<&'static mut IoKeySlot> {
    SLOTS.with(|s| {
        let s = s.borrow();
        let id = usize::try_from(id).ok()?;
        // SAFETY: id < len and ptr points at len slots in shared memory; the
        // caller's ownership of the IO makes the reference exclusive.
        (id < s.len && !s.ptr.is_null()).then(|| unsafe { &mut *s.ptr.add(id) })
    })
}

/// The storage manager's `smgr_startreadv`: md.c's asynchronous read, with the
/// file's key handed to the completion callback when the file is encrypted.
#[pg_guard]
pub unsafe extern "C-unwind" fn tde_startreadv(
    ioh: *mut pg_sys::PgAioHandle,
    reln: pg_sys::SMgrRelation,
    forknum: pg_sys::ForkNumber::Type,
    blocknum: pg_sys::BlockNumber,
    buffers: *mut *mut c_void,
    nblocks: pg_sys::BlockNumber,
) {
    // SAFETY: reln is the valid SMgrRelation smgrstartreadv was called with.
    // Looking the key up may load it (files, provider): this is normal context.
    let Some(file_key) = (unsafe { crate::smgr::cipher_of(reln) }) else {
        // SAFETY: arguments passed through unchanged.
        unsafe { ffi::guarded(|| ffi::mdstartreadv(ioh, reln, forknum, blocknum, buffers, nblocks)) };
        return;
    };
    // SAFETY: reln is valid (see above); ioh is the handle being defined.
    let temp = crate::smgr::is_temp(unsafe { &(*reln).smgr_rlocator });
    let id = unsafe { aio::pgaio_io_get_id(ioh) };
    let cb_data = if temp { arm_local(id, forknum, &file_key) } else { arm_shared(id, forknum, &file_key) };
    let started = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        // SAFETY: ioh is the handle being defined, not yet started; the other
        // arguments are passed through unchanged.  Registered before md.c
        // registers its own: completion callbacks run last-registered first, so
        // ours runs after md.c's and before the buffer manager's (registered
        // before smgrstartreadv was called).  With io_method=sync (or whenever
        // PostgreSQL decides to) the read completes, and our callback runs, inside.
        unsafe {
            ffi::guarded(|| {
                aio::pgaio_io_register_callbacks(ioh, aio::PGAIO_HCB_EXTENSION, cb_data);
                ffi::mdstartreadv(ioh, reln, forknum, blocknum, buffers, nblocks)
            })
        }
    }));
    if let Err(e) = started {
        // The read never started (for example the file is missing): wipe its key.
        if temp {
            drop(take_local(id));
        } else {
            wipe_shared(id);
        }
        std::panic::resume_unwind(e);
    }
}

fn arm_shared(id: i32, fork: pg_sys::ForkNumber::Type, file_key: &FileKey) -> u8 {
    // SAFETY: we are defining the IO of handle id.
    let Some(slot) = (unsafe { slot(id) }) else {
        error!("pg_tde: AIO handle {id} has no key slot");
    };
    let put = |part: Option<&crate::keys::KeyPart>, cipher: &mut u32, len: &mut u32, key: &mut [u8; MAX_KEY_BYTES]| {
        match part {
            Some(p) => {
                let bytes = p.key_bytes();
                *cipher = p.page_cipher().cipher().as_u32();
                *len = bytes.len() as u32;
                key[..bytes.len()].copy_from_slice(bytes);
            }
            None => *len = 0,
        }
    };
    slot.fork = fork as u32;
    put(file_key.old_part(), &mut slot.cipher, &mut slot.key_len, &mut slot.key);
    match file_key.rekey_parts() {
        Some((frontier, id, new)) => {
            slot.rekey_slot = frontier as i32;
            slot.rekey_file = [id.spc, id.db, id.rel];
            put(new, &mut slot.new_cipher, &mut slot.new_key_len, &mut slot.new_key);
        }
        None => slot.rekey_slot = -1,
    }
    slot.armed = true;
    IN_SHARED_SLOT
}

fn arm_local(id: i32, fork: pg_sys::ForkNumber::Type, file_key: &Arc<FileKey>) -> u8 {
    // Allocation happens here, in normal context; completion only removes.
    LOCAL_READS.with(|m| m.borrow_mut().insert(id, LocalIoKey { fork, key: Arc::clone(file_key) }));
    IN_LOCAL_MAP
}

/// Expanded ciphers of the keys this process completed reads with lately.
///
/// Key expansion costs about half a page decryption (195 ns against 349 ns for
/// AES-128-XTS on the benchmark machine), and the reads of a scan or of a busy
/// table come with the same key over and over, so each process keeps the last
/// few.  A fixed array, filled in place: nothing is allocated in the critical
/// section, and an evicted cipher is zeroed as it is dropped.  Like the
/// per-process relation-key cache, it holds a key no longer than the process
/// lives or until a newer key takes its place.
const EXPANDED_KEYS: usize = 4;

struct ExpandedKey {
    cipher: u32,
    key_len: usize,
    key: [u8; MAX_KEY_BYTES],
    page_cipher: PageCipher,
}

impl Drop for ExpandedKey {
    fn drop(&mut self) {
        self.key.zeroize();
    }
}

struct ExpandedKeys {
    entries: [Option<ExpandedKey>; EXPANDED_KEYS],
    next_victim: usize,
}

impl ExpandedKeys {
    /// Where the expanded cipher of a key is, expanding it into the cache on a miss.
    /// `keep`: an entry this call must not evict (the other key of a read of a
    /// file being re-keyed, expanded just before).
    fn index(&mut self, cipher_id: u32, bytes: &[u8], keep: Option<usize>) -> Option<usize> {
        let len = bytes.len().min(MAX_KEY_BYTES);
        let bytes = &bytes[..len];
        let hit = self
            .entries
            .iter()
            .position(|e| e.as_ref().is_some_and(|e| e.cipher == cipher_id && &e.key[..e.key_len] == bytes));
        let idx = match hit {
            Some(i) => i,
            None => {
                let cipher = Cipher::from_u32(cipher_id)?;
                // from_bytes formats (allocates) an error on a wrong length: check first.
                if bytes.len() != cipher.key_len() + BASE_IV_LEN {
                    return None;
                }
                let relkey = RelKey::from_bytes(cipher, bytes).ok()?;
                let mut i = self.next_victim;
                if keep == Some(i) {
                    i = (i + 1) % EXPANDED_KEYS;
                }
                self.next_victim = (i + 1) % EXPANDED_KEYS;
                let mut key = [0u8; MAX_KEY_BYTES];
                key[..len].copy_from_slice(bytes);
                // Replaces (and so zeroes) the oldest entry; no heap.  The round keys
                // may pass through the stack on the way (as in any key expansion).
                self.entries[i] =
                    Some(ExpandedKey { cipher: cipher_id, key_len: len, key, page_cipher: PageCipher::new(&relkey) });
                key.zeroize();
                i
            }
        };
        Some(idx)
    }

    fn at(&self, i: usize) -> Option<&PageCipher> {
        self.entries[i].as_ref().map(|e| &e.page_cipher)
    }
}

/// How one part of a slot's keys is decrypted: plaintext, a cached cipher, or
/// (re-entered, which never happens in practice) one expanded on the stack.
// Kept on the stack (no allocation in the completion's critical section).
#[allow(clippy::large_enum_variant)]
enum PartCipher {
    Plain,
    Cached(usize),
    Own(PageCipher),
    Missing,
}

fn resolve<'a>(p: &'a PartCipher, cache: Option<&'a ExpandedKeys>) -> Option<&'a PageCipher> {
    match p {
        PartCipher::Cached(i) => cache.and_then(|c| c.at(*i)),
        PartCipher::Own(c) => Some(c),
        PartCipher::Plain | PartCipher::Missing => None,
    }
}

fn part_cipher(
    cache: Option<&mut ExpandedKeys>,
    cipher_id: u32,
    len: u32,
    key: &[u8; MAX_KEY_BYTES],
    keep: Option<usize>,
) -> PartCipher {
    if len == 0 {
        return PartCipher::Plain;
    }
    let bytes = &key[..(len as usize).min(MAX_KEY_BYTES)];
    match cache {
        Some(cache) => cache.index(cipher_id, bytes, keep).map_or(PartCipher::Missing, PartCipher::Cached),
        None => Cipher::from_u32(cipher_id)
            .and_then(|c| RelKey::from_bytes(c, bytes).ok())
            .map_or(PartCipher::Missing, |k| PartCipher::Own(PageCipher::new(&k))),
    }
}

thread_local! {
    static EXPANDED: RefCell<ExpandedKeys> =
        const { RefCell::new(ExpandedKeys { entries: [None, None, None, None], next_victim: 0 }) };
}

/// Complete a read whose key is in the shared slot of handle `id`, wiping the slot.
///
/// # Safety
/// `ioh` is the completing handle and `id` its id.
unsafe fn complete_from_slot(
    ioh: *mut pg_sys::PgAioHandle,
    id: i32,
    prior: pg_sys::PgAioResult,
) -> pg_sys::PgAioResult {
    // SAFETY: we are completing the IO of handle id.
    let Some(slot) = (unsafe { slot(id) }) else {
        // SAFETY: per the contract.
        return unsafe { complete(ioh, prior, None) };
    };
    let result = if !slot.armed {
        // SAFETY: per the contract.
        unsafe { complete(ioh, prior, None) }
    } else {
        EXPANDED.with(|cell| {
            let mut borrowed = cell.try_borrow_mut().ok();
            let old = part_cipher(borrowed.as_deref_mut(), slot.cipher, slot.key_len, &slot.key, None);
            // The new key must not take the old one's place in the cache.
            let keep = match old {
                PartCipher::Cached(i) => Some(i),
                _ => None,
            };
            let new = if slot.rekey_slot >= 0 {
                part_cipher(borrowed.as_deref_mut(), slot.new_cipher, slot.new_key_len, &slot.new_key, keep)
            } else {
                PartCipher::Plain
            };
            if matches!(old, PartCipher::Missing) || matches!(new, PartCipher::Missing) {
                // SAFETY: per the contract.
                return unsafe { complete(ioh, prior, None) };
            }
            let cache = borrowed.as_deref();
            let (old, new) = (resolve(&old, cache), resolve(&new, cache));
            let fork = slot.fork;
            let rekey_slot = slot.rekey_slot;
            let [spc, db, rel] = slot.rekey_file;
            let id = crate::keys::FileId { spc, db, rel };
            let decrypt = |block: u32, page: &mut [u8]| {
                let fork = fork as pg_sys::ForkNumber::Type;
                if rekey_slot >= 0 {
                    let (first, second) = if crate::rekey::frontier_covers(rekey_slot as usize, id, fork as u8, block) {
                        (new, old)
                    } else {
                        (old, new)
                    };
                    crate::keys::decrypt_either(first, second, fork, block, page);
                } else if let Some(c) = old {
                    c.decrypt_page(crate::smgr::tweak_fork(fork), block, page);
                }
            };
            // SAFETY: per the contract.
            unsafe { complete(ioh, prior, Some(&decrypt)) }
        })
    };
    disarm(slot);
    result
}

fn disarm(slot: &mut IoKeySlot) {
    slot.key.zeroize();
    slot.new_key.zeroize();
    slot.armed = false;
}

/// Wipe the slot of handle `id` (a read that never started).
fn wipe_shared(id: i32) {
    // SAFETY: we defined the IO of handle id, which never started.
    if let Some(slot) = unsafe { slot(id) } {
        disarm(slot);
    }
}

fn take_local(id: i32) -> Option<(pg_sys::ForkNumber::Type, Arc<FileKey>)> {
    LOCAL_READS.with(|m| m.try_borrow_mut().ok()?.remove(&id)).map(|l| (l.fork, l.key))
}

const RS_ERROR: u32 = pg_sys::PgAioResultStatus::PGAIO_RS_ERROR;

/// Decrypts one page of a read in place, given its block number.
type Decrypt<'a> = &'a dyn Fn(u32, &mut [u8]);

/// Decrypt the blocks of a completed read; `prior` is md.c's result (blocks read).
///
/// # Safety
/// `ioh` is the completing handle; called from a completion callback.
unsafe fn complete(
    ioh: *mut pg_sys::PgAioHandle,
    prior: pg_sys::PgAioResult,
    decrypt: Option<Decrypt<'_>>,
) -> pg_sys::PgAioResult {
    if prior.status() == RS_ERROR {
        return prior;
    }
    let Some(decrypt) = decrypt else {
        let mut failed = prior;
        failed.set_status(RS_ERROR);
        failed.set_id(aio::PGAIO_HCB_EXTENSION);
        failed.set_error_data(0);
        return failed;
    };
    // SAFETY: the handle's target is the smgr read being completed.
    let target = unsafe { &*aio::pgaio_io_get_target_data(ioh) };
    // SAFETY: reading the smgr member of the target union, which md.c set.
    let first_block = unsafe { target.smgr.blockNum };
    let mut iov: *mut libc::iovec = std::ptr::null_mut();
    // SAFETY: the handle's iovecs, as md.c defined them (contiguous buffers merged).
    let iovcnt = unsafe { aio::pgaio_io_get_iovec_length(ioh, &mut iov) };
    let mut left = prior.result.max(0) as u32;
    let mut block = first_block;
    for i in 0..iovcnt.max(0) as usize {
        // SAFETY: iov points at iovcnt iovecs.
        let v = unsafe { &*iov.add(i) };
        let pages = v.iov_len / PAGE_SIZE;
        for p in 0..pages {
            if left == 0 {
                return prior;
            }
            // SAFETY: each iovec covers whole pages of buffer memory of this IO.
            let page = unsafe { std::slice::from_raw_parts_mut((v.iov_base as *mut u8).add(p * PAGE_SIZE), PAGE_SIZE) };
            if !is_all_zero(page) {
                decrypt(block, page);
            }
            block += 1;
            left -= 1;
        }
    }
    prior
}

/// `complete_shared`: decrypt reads into shared buffers.
#[pg_guard]
unsafe extern "C-unwind" fn complete_shared(
    ioh: *mut pg_sys::PgAioHandle,
    prior: pg_sys::PgAioResult,
    cb_data: u8,
) -> pg_sys::PgAioResult {
    if cb_data != IN_SHARED_SLOT {
        return prior;
    }
    // SAFETY: ioh is the handle being completed.
    unsafe { complete_from_slot(ioh, aio::pgaio_io_get_id(ioh), prior) }
}

/// `complete_local`: decrypt reads of temporary relations, in their own backend.
#[pg_guard]
unsafe extern "C-unwind" fn complete_local(
    ioh: *mut pg_sys::PgAioHandle,
    prior: pg_sys::PgAioResult,
    cb_data: u8,
) -> pg_sys::PgAioResult {
    if cb_data != IN_LOCAL_MAP {
        return prior;
    }
    // SAFETY: ioh is the handle being completed.
    let key = take_local(unsafe { aio::pgaio_io_get_id(ioh) });
    let decrypt = key.as_ref().map(|(fork, k)| move |block: u32, page: &mut [u8]| k.decrypt_page(*fork, block, page));
    // SAFETY: as above.
    unsafe { complete(ioh, prior, decrypt.as_ref().map(|d| d as Decrypt<'_>)) }
}

/// Report a read that completed without its key (see [`complete`]).
#[pg_guard]
unsafe extern "C-unwind" fn report(result: pg_sys::PgAioResult, target: *const pg_sys::PgAioTargetData, elevel: i32) {
    // SAFETY: the target of an smgr read.
    let t = unsafe { &(*target).smgr };
    let msg = format!(
        "could not decrypt blocks {}..{} of relation file {}/{}/{} fork {}: the read completed without its key",
        t.blockNum,
        t.blockNum + t.nblocks.max(1) - 1,
        t.rlocator.spcOid.to_u32(),
        t.rlocator.dbOid.to_u32(),
        t.rlocator.relNumber.to_u32(),
        t.forkNum()
    );
    let _ = result;
    ereport!(PgLogLevel::from(elevel as isize), PgSqlErrorCode::ERRCODE_DATA_CORRUPTED, msg);
}
