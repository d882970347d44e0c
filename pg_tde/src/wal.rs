//! WAL encryption (`pg_tde.wal_encrypt`), through the core patch's WAL
//! segment hooks.
//!
//! Every WAL byte a server process writes goes through [`wal_write`], every
//! byte read back through [`wal_read`]; the page format and cipher are in
//! `tde_core::wal`.  Keys: each process role that writes WAL (the WAL writer
//! path on a primary, the WAL receiver on a standby) takes a fresh key on its
//! first write after the server started, crash-restarted or was promoted, so
//! no (key, counter) pair is ever used for two different contents.  WAL keys
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
use tde_core::wal::{self, WalCipher, HEADER_PREFIX};
use tde_core::walkeys::{self, WalKey};
use tde_core::{Result, TdeError};

use crate::errors;
use crate::keys;

pub static WAL_ENCRYPT: GucSetting<bool> = GucSetting::<bool>::new(false);

fn wal_keys_path() -> PathBuf {
    PathBuf::from(format!("{}/wal_keys", keys::KEY_DIR))
}

/// The current write key of one writer role, in shared memory.
#[derive(Clone, Copy, Default)]
#[repr(C)]
struct WalSlot {
    valid: bool,
    /// Generation at which the key was created: identifies it.
    serial: u64,
    key_len: u8,
    key: [u8; 32],
    base: [u8; 16],
}

#[derive(Clone, Copy, Default)]
#[repr(C)]
pub struct WalShared {
    /// Bumped whenever a WAL key is added to the key file.
    generation: u64,
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

fn server_key() -> Result<zeroize::Zeroizing<Vec<u8>>> {
    let header = keys::database_header(keys::SERVER_KEY_DB)?
        .ok_or_else(|| TdeError::NotFound("no server key is set: WAL keys cannot be unwrapped".into()))?;
    let key = keys::principal_key(&header.principal)?;
    header.verify_principal(&key)?;
    Ok(key)
}

thread_local! {
    /// This process's current write key: (serial, cipher).
    static WRITE_KEY: RefCell<Option<(u64, Arc<WalCipher>)>> = const { RefCell::new(None) };
    /// All WAL keys, for reading: (generation and file length loaded, ranges).
    static READ_KEYS: RefCell<Option<(u64, Vec<(u64, u64, Arc<WalCipher>)>)>> = const { RefCell::new(None) };
}

/// The key the calling process writes WAL with, created on first use.
fn write_cipher(slot_no: usize, startptr: u64) -> Result<Arc<WalCipher>> {
    let mut shared = WAL_SHARED.exclusive();
    if !shared.slots[slot_no].valid {
        let sk = server_key()?;
        let len = if crate::gucs::cipher().principal_key_len() == 32 { 32 } else { 16 };
        let (key, base) = wal::generate_key(len)?;
        let start = startptr - startptr % wal::WAL_PAGE_SIZE;
        let created =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0);
        let record = WalKey { start_lsn: start, end_lsn: u64::MAX, created_unix_secs: created, key, base };
        walkeys::append(&wal_keys_path(), &sk, &record)?;
        shared.generation += 1;
        let serial = shared.generation;
        let slot = &mut shared.slots[slot_no];
        slot.valid = true;
        slot.serial = serial;
        slot.key_len = len as u8;
        slot.key = [0; 32];
        slot.key[..len].copy_from_slice(&record.key);
        slot.base = base;
    }
    let slot = shared.slots[slot_no];
    drop(shared);
    WRITE_KEY.with(|cell| {
        let mut cached = cell.borrow_mut();
        if let Some((serial, c)) = cached.as_ref() {
            if *serial == slot.serial {
                return Ok(c.clone());
            }
        }
        let c = Arc::new(WalCipher::new(&slot.key[..slot.key_len as usize], &slot.base)?);
        *cached = Some((slot.serial, c.clone()));
        Ok(c)
    })
}

/// The key a WAL page at `lsn` was written with.
fn read_cipher(lsn: u64) -> Result<Arc<WalCipher>> {
    // The key file also grows outside the server (pg_tde_restore_encrypt adds
    // a key per restored segment): its length is part of the cache key.
    let file_len = std::fs::metadata(wal_keys_path()).map(|m| m.len()).unwrap_or(0);
    let generation = WAL_SHARED.share().generation ^ (file_len << 20);
    READ_KEYS.with(|cell| {
        let mut cached = cell.borrow_mut();
        let find = |keys: &Vec<(u64, u64, Arc<WalCipher>)>| {
            keys.iter().rev().find(|(s, e, _)| *s <= lsn && lsn < *e).map(|(_, _, c)| c.clone())
        };
        if let Some((g, keys)) = cached.as_ref() {
            if *g == generation {
                if let Some(c) = find(keys) {
                    return Ok(c);
                }
            }
        }
        let sk = server_key()?;
        let loaded = walkeys::read_all(&wal_keys_path(), &sk)?
            .into_iter()
            .map(|k| Ok((k.start_lsn, k.end_lsn, Arc::new(WalCipher::new(&k.key, &k.base)?))))
            .collect::<Result<Vec<_>>>()?;
        let found = find(&loaded);
        *cached = Some((generation, loaded));
        found
            .ok_or_else(|| TdeError::NotFound(format!("no WAL key covers LSN {:X}/{:X}", lsn >> 32, lsn & 0xffff_ffff)))
    })
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

fn is_wal_receiver() -> bool {
    // SAFETY: plain read of a process-global set at process start.
    unsafe { (&raw const pg_sys::MyBackendType).read() == pg_sys::BackendType::B_WAL_RECEIVER }
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
    if !WAL_ENCRYPT.get() {
        // SAFETY: the caller's buffer and file, as pg_pwrite would get them.
        return unsafe { libc::pwrite(fd, buf, nbytes, offset) };
    }
    let slot = usize::from(is_wal_receiver());
    let cipher = match write_cipher(slot, startptr) {
        Ok(c) => c,
        Err(e) => errors::raise(e),
    };
    SCRATCH.with(|s| {
        let mut scratch = s.borrow_mut();
        scratch.clear();
        // SAFETY: the caller passes nbytes readable bytes at buf.
        scratch.extend_from_slice(unsafe { std::slice::from_raw_parts(buf as *const u8, nbytes) });
        let result = wal::encrypt_for_write(&mut scratch, startptr, validupto, &cipher, &mut |page| {
            header_from_file(fd, offset, startptr, page)
        });
        if let Err(e) = result {
            errors::raise(e);
        }
        // SAFETY: scratch holds nbytes bytes; fd is the caller's open segment.
        unsafe { libc::pwrite(fd, scratch.as_ptr().cast(), nbytes, offset) }
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
    let result = wal::decrypt_after_read(data, startptr, &mut read_cipher, &mut |page| {
        header_from_file(fd, offset, startptr, page)
    });
    if let Err(e) = result {
        errors::raise(e);
    }
}
