//! WAL encryption (`pg_tde.wal_encrypt`), through the core patch's WAL
//! segment hooks.
//!
//! Every WAL byte a server process writes goes through [`wal_write`], every
//! byte read back through [`wal_read`]; the page format and cipher are in
//! `tde_core::wal`.  Keys: each process role that writes WAL (the WAL writer
//! path on a primary, the WAL receiver on a standby) takes a fresh key on its
//! first write after the server started, crash-restarted or was promoted, and
//! whenever the timeline of the segment files it writes changes (the receiver
//! also at each of its own starts), so no (key, counter) pair is ever used for
//! two different contents: keys are bound to the timeline of the files they
//! encrypt (read from the file name, see [`file_timeline`]).  WAL keys
//! are appended to `$PGDATA/pg_tde/wal_keys`, wrapped by the server key, and
//! fsynced before first use; they are local to each server (a standby has its
//! own), and `pg_basebackup` copies them with the data.
//!
//! The hooks stay installed when `pg_tde.wal_encrypt` is off, so that WAL
//! written while it was on stays readable.

use std::cell::RefCell;
use std::ffi::{c_int, c_void};
use std::path::PathBuf;
use std::sync::Arc;

use pgrx::lwlock::PgLwLock;
use pgrx::prelude::*;
use pgrx::shmem::PGRXSharedMemory;
use pgrx::{pg_shmem_init, GucContext, GucFlags, GucRegistry, GucSetting};
use tde_core::keymap;
use tde_core::wal::{self, HEADER_PREFIX};
use tde_core::walkeys::{self, KeyRanges, WalKey, Wrapping};
use tde_core::{Result, TdeError};

use crate::errors;
use crate::keys;

pub static WAL_ENCRYPT: GucSetting<bool> = GucSetting::<bool>::new(false);

fn wal_keys_path() -> PathBuf {
    PathBuf::from(format!("{}/wal_keys", keys::KEY_DIR))
}

/// What one writer role of this server incarnation writes with.
#[derive(Clone, Copy, Default)]
#[repr(C)]
struct WalSlot {
    /// A key record was appended for this role since the server started.
    valid: bool,
    /// The record is a null key (wal_encrypt off): plaintext from `start` on.
    null: bool,
    /// First LSN the record covers.
    start: u64,
    /// Timeline of the segment files the key is for.
    timeline: u32,
    /// The WAL receiver process that took the key (0 for the writer role):
    /// each start of the receiver takes a new one.
    pid: i32,
    /// End of what the receiver has written on this timeline: a receiver
    /// started again rewrites the same WAL up to there, which keeps the key
    /// it was written with; its own key starts after it.
    written_upto: u64,
}

#[derive(Clone, Copy, Default)]
#[repr(C)]
pub struct WalShared {
    /// Bumped whenever a WAL key is added to the key file.
    generation: u64,
    /// Bumped when the key file is rewritten (not only appended to).
    rewrites: u64,
    /// 0: the WAL writer path (XLogWrite), 1: the WAL receiver.
    slots: [WalSlot; 2],
}

// SAFETY: plain old data without pointers.
unsafe impl PGRXSharedMemory for WalShared {}

static WAL_SHARED: PgLwLock<WalShared> = unsafe { PgLwLock::new(c"pg_tde_wal_keys") };

/// Define the GUC, set up shared memory and install the hooks (from `_PG_init`).
pub fn init() {
    GucRegistry::define_bool_guc(
        c"pg_tde.wal_encrypt",
        c"Encrypt newly written WAL.",
        c"Needs a server key (pg_tde_set_server_key_using_global_key_provider). WAL written before stays as written.",
        &WAL_ENCRYPT,
        GucContext::Postmaster,
        GucFlags::default(),
    );
    pg_shmem_init!(WAL_SHARED);
    if WAL_ENCRYPT.get() && !keys::map_path(keys::SERVER_KEY_DB).exists() {
        errors::raise_with(
            pgrx::PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            "pg_tde.wal_encrypt is on but no server key is set",
            Some("Start without pg_tde.wal_encrypt, run SELECT pg_tde_set_server_key_using_global_key_provider(...), then turn it on."),
        );
    }
    // SAFETY: _PG_init runs before any WAL is written or read by this process;
    // the core patch's hooks are plain function pointers.
    unsafe {
        pg_sys::xlog_seg_write_hook = Some(wal_write);
        pg_sys::xlog_seg_read_hook = Some(wal_read);
    }
}

/// Make sure the server key is in the shared cache, pinned, before this
/// process could need it inside a critical section: called on every WAL read
/// (cheap once done), and the startup process reads the checkpoint record
/// before a server incarnation writes any WAL.  Needed when WAL keys exist
/// (to read them) or WAL encryption is on (the first WAL write adds a key
/// record, wrapped with the server key's map, inside `XLogWrite`).  A provider
/// that cannot be reached fails the read with a clear error (the startup
/// process: the server does not start), never a WAL write.
fn ensure_server_key_cached() -> Result<()> {
    thread_local! {
        static DONE: std::cell::Cell<u64> = const { std::cell::Cell::new(u64::MAX) };
    }
    // Again after a rotation (a new key) or a crash restart of the cache.
    let generation = WAL_SHARED.share().generation;
    if DONE.with(|d| d.get()) == generation || !(WAL_ENCRYPT.get() || has_wal_keys()) {
        return Ok(());
    }
    if let Some(header) = keys::database_header(keys::SERVER_KEY_DB)? {
        keys::verified_principal(&header)?;
        keys::pin_principal(&header.principal);
    }
    DONE.with(|d| d.set(generation));
    Ok(())
}

/// What unwraps the WAL key records: the server key (checked against its
/// key map) and the WAL key-encryption key the map holds.
fn wal_wrapping() -> Result<Wrapping> {
    let (header, entries) = match keymap::read(&keys::map_path(keys::SERVER_KEY_DB)) {
        Ok(m) => m,
        Err(TdeError::NotFound(_)) => {
            return Err(TdeError::NotFound("no server key is set: WAL keys cannot be unwrapped".into()))
        }
        Err(e) => return Err(e),
    };
    let key = keys::verified_principal(&header)?;
    Wrapping::from_server_map(keys::SERVER_KEY_DB, &header, &entries, key)
}

/// Re-wrap the WAL key records still wrapped by the server key itself with the
/// WAL key-encryption key, before the server key is rotated.  Holds the WAL
/// key lock, so no server process appends meanwhile.
pub fn upgrade_legacy_records() -> Result<()> {
    let path = wal_keys_path();
    if !walkeys::has_legacy_records(&path)? {
        return Ok(());
    }
    let wrapping = wal_wrapping()?;
    let mut shared = WAL_SHARED.exclusive();
    if walkeys::upgrade_records(&path, &wrapping)? {
        shared.generation += 1;
        shared.rewrites += 1;
    }
    drop(shared);
    crate::gucs::crash_point("wal_kek_converted");
    Ok(())
}

/// This process's copy of the WAL keys.
struct LoadedKeys {
    /// `WAL_SHARED.rewrites` when loaded: a rewrite means a full reload.
    rewrites: u64,
    /// `WAL_SHARED.generation` when last checked.
    generation: u64,
    /// Bytes of the key file read so far (whole records).
    read_upto: u64,
    ranges: Arc<KeyRanges>,
}

thread_local! {
    static KEYS: RefCell<Option<LoadedKeys>> = const { RefCell::new(None) };
}

/// The WAL key ranges.  Keys added since the last call (by this server:
/// `generation`; by `pg_tde_restore_encrypt`, when `with_file_len`: the
/// file's length) are read and unwrapped alone, so that a recovery restoring
/// many segments, each with a key of its own, does not re-read every key for
/// every segment.
fn key_ranges(with_file_len: bool) -> Result<Arc<KeyRanges>> {
    let (generation, rewrites) = {
        let shared = WAL_SHARED.share();
        (shared.generation, shared.rewrites)
    };
    let path = wal_keys_path();
    KEYS.with(|cell| {
        let mut cached = cell.borrow_mut();
        if let Some(k) = cached.as_mut() {
            if k.rewrites == rewrites {
                let grown = if with_file_len {
                    std::fs::metadata(&path)
                        .map(|m| m.len() >= k.read_upto + walkeys::RECORD_SIZE as u64)
                        .unwrap_or(false)
                } else {
                    k.generation != generation
                };
                if grown {
                    let (more, upto) = walkeys::read_from(&path, &wal_wrapping()?, k.read_upto)?;
                    let mut ranges = KeyRanges::clone(&k.ranges);
                    ranges.extend(&more)?;
                    k.ranges = Arc::new(ranges);
                    k.read_upto = upto;
                }
                k.generation = generation;
                return Ok(k.ranges.clone());
            }
        }
        let (keys, upto) = walkeys::read_from(&path, &wal_wrapping()?, 0)?;
        let ranges = Arc::new(KeyRanges::from_keys(&keys)?);
        *cached = Some(LoadedKeys { rewrites, generation, read_upto: upto, ranges: ranges.clone() });
        Ok(ranges)
    })
}

fn forget_key_ranges() {
    KEYS.with(|cell| *cell.borrow_mut() = None);
}

/// Where the new data of the first write of this incarnation begins: the first
/// byte of the write that differs from what the file already holds (decrypted).
/// XLogWrite's first write rewrites the previous run's last, partly filled
/// page; its durable prefix must keep its bytes, so the new key starts after it.
fn first_new_byte(fd: c_int, buf: &[u8], offset: i64, startptr: u64, tli: u32) -> u64 {
    let n = buf.len().min(wal::WAL_PAGE_SIZE as usize - (startptr % wal::WAL_PAGE_SIZE) as usize);
    let mut disk = vec![0u8; n];
    // SAFETY: pread into a local buffer of length n.
    let got = unsafe { libc::pread(fd, disk.as_mut_ptr().cast(), n, offset) };
    if got != n as isize {
        return startptr;
    }
    let Ok(keys) = key_ranges(false) else { return startptr };
    if wal::decrypt_after_read(&mut disk, startptr, tli, &keys, &mut |p| header_from_file(fd, offset, startptr, p))
        .is_err()
    {
        return startptr;
    }
    let same = disk.iter().zip(buf).take_while(|(a, b)| a == b).count();
    startptr + same as u64
}

/// Make sure the calling role has its key record for this incarnation and
/// the timeline `tli` of the segment file it writes (and, for the WAL
/// receiver, for this start of the receiver); returns the slot.
fn ensure_slot(role: usize, on: bool, fd: c_int, buf: &[u8], offset: i64, startptr: u64, tli: u32) -> Result<WalSlot> {
    // SAFETY: plain read of a process-global set at process start.
    let pid = if role == 1 { unsafe { (&raw const pg_sys::MyProcPid).read() } } else { 0 };
    let current = |s: &WalSlot| s.valid && s.timeline == tli && s.pid == pid;
    {
        let shared = WAL_SHARED.share();
        if current(&shared.slots[role]) {
            return Ok(shared.slots[role]);
        }
    }
    // The WAL receiver writes only final data and, started again, rewrites its
    // timeline's WAL from a segment start: its key starts where it starts
    // writing, or after what the previous receiver wrote on the same timeline
    // (the same WAL, which keeps that receiver's key).  (Computed before taking
    // the lock: it reads the key ranges, which share it.  Each role writes from
    // one process at a time, so nothing races us here.)
    let start = if role == 1 {
        let prev = WAL_SHARED.share().slots[1];
        if prev.valid && !prev.null && prev.timeline == tli {
            startptr.max(prev.written_upto)
        } else {
            startptr
        }
    } else {
        first_new_byte(fd, buf, offset, startptr, tli)
    };
    for _ in 0..3 {
        // A rewrite of the key file (re-wrapping old records before a server-key
        // rotation) between reading the wrapping keys and appending would let an
        // old-format record in after the conversion: checked under the lock.
        let rewrites = WAL_SHARED.share().rewrites;
        let wrapping = wal_wrapping()?;
        let mut shared = WAL_SHARED.exclusive();
        if current(&shared.slots[role]) {
            return Ok(shared.slots[role]);
        }
        if shared.rewrites != rewrites {
            continue;
        }
        let created =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0);
        let (key, base) = if on {
            wal::generate_key(wrapping.wal_key_len())?
        } else {
            (zeroize::Zeroizing::new(Vec::new()), [0u8; 16])
        };
        // Records of a server key map from before the key-encryption key carry no
        // timeline; they are re-wrapped with one at the next server-key rotation.
        let timeline = if wrapping.has_kek() { tli } else { 0 };
        walkeys::append(
            &wal_keys_path(),
            &wrapping,
            &WalKey { start_lsn: start, end_lsn: u64::MAX, timeline, created_unix_secs: created, key, base },
        )?;
        shared.generation += 1;
        shared.slots[role] = WalSlot { valid: true, null: !on, start, timeline: tli, pid, written_upto: start };
        return Ok(shared.slots[role]);
    }
    Err(TdeError::Invalid("the WAL key file was rewritten three times while a WAL key was being added".into()))
}

/// Read the header prefix of the WAL page at `page_lsn` from `fd`, whose byte
/// at `offset` holds LSN `startptr`.
fn header_from_file(fd: c_int, offset: i64, startptr: u64, page_lsn: u64) -> Result<[u8; HEADER_PREFIX]> {
    let at = offset - (startptr as i64 - page_lsn as i64);
    let mut prefix = [0u8; HEADER_PREFIX];
    // SAFETY: pread into a local buffer of the given length.
    let n = unsafe { libc::pread(fd, prefix.as_mut_ptr().cast(), HEADER_PREFIX, at) };
    if n == HEADER_PREFIX as isize {
        Ok(prefix)
    } else {
        // Not written yet: a page whose header we have not seen is plaintext.
        Ok([0; HEADER_PREFIX])
    }
}

thread_local! {
    static SCRATCH: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// Timeline of the WAL segment file open as `fd`, from its name
/// (`TTTTTTTTXXXXXXXXYYYYYYYY`): WAL keys are bound to the timeline of the
/// files they encrypt, whatever the page headers say (a new timeline's first
/// segment starts with pages of its parent).
fn file_timeline(fd: c_int) -> Result<u32> {
    let link = std::fs::read_link(format!("/proc/self/fd/{fd}"))
        .map_err(|e| TdeError::io(format!("could not find the WAL segment file of descriptor {fd}"), e))?;
    let name = link.file_name().and_then(|n| n.to_str()).unwrap_or("");
    match name.get(0..8).map(|t| u32::from_str_radix(t, 16)) {
        Some(Ok(tli)) if name.len() >= 24 => Ok(tli),
        _ => Err(TdeError::Invalid(format!("\"{}\" is not a WAL segment file", link.display()))),
    }
}

fn is_wal_receiver() -> bool {
    // SAFETY: plain read of a process-global set at process start.
    unsafe { (&raw const pg_sys::MyBackendType).read() == pg_sys::BackendType::B_WAL_RECEIVER }
}

/// Whether this server ever encrypted WAL (its WAL key file exists).
fn has_wal_keys() -> bool {
    thread_local! {
        static SEEN: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    }
    SEEN.with(|seen| {
        if !seen.get() && wal_keys_path().exists() {
            seen.set(true);
        }
        seen.get()
    })
}

#[pg_guard]
unsafe extern "C-unwind" fn wal_write(
    fd: c_int,
    buf: *const c_void,
    nbytes: usize,
    offset: pg_sys::off_t,
    startptr: pg_sys::XLogRecPtr,
    validupto: pg_sys::XLogRecPtr,
) -> isize {
    let on = WAL_ENCRYPT.get();
    let role = usize::from(is_wal_receiver());
    // Plaintext WAL on a server that never encrypted any, or received by a
    // standby with encryption off: as stock PostgreSQL.
    if !on && (role == 1 || !has_wal_keys()) {
        // SAFETY: the caller's buffer and file, as pg_pwrite would get them.
        return unsafe { libc::pwrite(fd, buf, nbytes, offset) };
    }
    // SAFETY: the caller passes nbytes readable bytes at buf.
    let data = unsafe { std::slice::from_raw_parts(buf as *const u8, nbytes) };
    let tli = match file_timeline(fd) {
        Ok(t) => t,
        Err(e) => errors::raise(e),
    };
    let slot = match ensure_slot(role, on, fd, data, offset, startptr, tli) {
        Ok(s) => s,
        Err(e) => errors::raise(e),
    };
    let slot_pid = slot.pid;
    if slot.null && startptr >= slot.start {
        // Encryption switched off and past the last encrypted byte.
        // SAFETY: as above.
        return unsafe { libc::pwrite(fd, buf, nbytes, offset) };
    }
    let keys = match key_ranges(false) {
        Ok(k) => k,
        Err(e) => errors::raise(e),
    };
    SCRATCH.with(|s| {
        let mut scratch = s.borrow_mut();
        scratch.clear();
        scratch.extend_from_slice(data);
        let result = wal::encrypt_for_write(&mut scratch, startptr, validupto, tli, &keys, &mut |page| {
            header_from_file(fd, offset, startptr, page)
        });
        if let Err(e) = result {
            errors::raise(e);
        }
        // SAFETY: scratch holds nbytes bytes; fd is the caller's open segment.
        let written = unsafe { libc::pwrite(fd, scratch.as_ptr().cast(), nbytes, offset) };
        if role == 1 && written > 0 {
            let mut shared = WAL_SHARED.exclusive();
            let slot = &mut shared.slots[1];
            if slot.timeline == tli && slot.pid == slot_pid {
                slot.written_upto = slot.written_upto.max(startptr + written as u64);
            }
        }
        written
    })
}

#[pg_guard]
unsafe extern "C-unwind" fn wal_read(
    fd: c_int,
    buf: *mut c_void,
    nbytes: usize,
    offset: pg_sys::off_t,
    startptr: pg_sys::XLogRecPtr,
) {
    // SAFETY: the caller has just read nbytes bytes into buf.
    let data = unsafe { std::slice::from_raw_parts_mut(buf as *mut u8, nbytes) };
    if let Err(e) = ensure_server_key_cached() {
        errors::raise(e);
    }
    // Most WAL of a server that never encrypted is plaintext: skip key loading
    // unless a page is flagged.
    match wal::any_page_flagged(data, startptr, &mut |page| header_from_file(fd, offset, startptr, page)) {
        Ok(true) => {}
        Ok(false) => return,
        Err(e) => errors::raise(e),
    }
    let tli = match file_timeline(fd) {
        Ok(t) => t,
        Err(e) => errors::raise(e),
    };
    let original = data.to_vec();
    let attempt = |data: &mut [u8]| -> Result<()> {
        let keys = key_ranges(true)?;
        wal::decrypt_after_read(data, startptr, tli, &keys, &mut |page| header_from_file(fd, offset, startptr, page))
    };
    let result = match attempt(data) {
        Err(TdeError::NotFound(_)) => {
            // A key may have been added since we loaded them: reload once.
            data.copy_from_slice(&original);
            forget_key_ranges();
            attempt(data)
        }
        other => other,
    };
    if let Err(e) = result {
        errors::raise(e);
    }
}
