//! pg_tde's WAL resource manager.
//!
//! Every change to pg_tde's files is WAL-logged before the file is written,
//! and flushed, so that crash recovery and streaming standbys rebuild exactly
//! the primary's files.  Records carry only wrapped keys: replaying them needs
//! no principal key.
//!
//! | info | record | main data |
//! | --- | --- | --- |
//! | `0x10` | relation key added | db oid (u32 LE) + key-map entry bytes |
//! | `0x20` | key map rewritten (principal key set or rotated) | db oid + header bytes + u32 count + entries |
//! | `0x30` | provider catalog replaced | catalog bytes |
//! | `0x40` | key map removed (principal key deleted) | db oid |
//!
//! Removal of a relation key is not logged: it follows the unlink of the
//! relation file, which recovery replays through the storage manager.

use std::ffi::{c_char, CStr};

use pgrx::pg_sys;
use pgrx::prelude::*;
use tde_core::keymap::{self, KeyMapEntry, KeyMapHeader};

use crate::errors;
use crate::keys;

/// Custom resource manager id (custom ids are 128..=255).
pub const RM_TDE_ID: u8 = 141;

const XLOG_TDE_RELATION_KEY: u8 = 0x10;
const XLOG_TDE_MAP_REWRITE: u8 = 0x20;
const XLOG_TDE_PROVIDERS: u8 = 0x30;
const XLOG_TDE_MAP_REMOVE: u8 = 0x40;
/// The whole envelope store of wrapping providers (`pg_tde/envelopes.json`).
const XLOG_TDE_ENVELOPES: u8 = 0x50;
/// Online re-keying: the state file of a database, with the key-map change that ends
/// the re-keying of a file (see `crate::rekey`).
const XLOG_TDE_REKEY_STATE: u8 = 0x60;
/// Online re-keying: full-page images of a batch of blocks and the frontier past them.
pub const XLOG_TDE_REKEY_BATCH: u8 = 0x70;

const XLR_INFO_MASK: u8 = 0x0F;

static mut TDE_RMGR: pg_sys::RmgrData = pg_sys::RmgrData {
    rm_name: c"pg_tde".as_ptr(),
    rm_redo: Some(tde_redo),
    rm_desc: Some(tde_desc),
    rm_identify: Some(tde_identify),
    rm_startup: None,
    rm_cleanup: None,
    rm_mask: None,
    rm_decode: None,
};

pub fn init() {
    // SAFETY: called once from _PG_init while shared_preload_libraries are
    // loaded; RegisterCustomRmgr keeps the pointer to our static.
    unsafe { pg_sys::RegisterCustomRmgr(RM_TDE_ID, &raw const TDE_RMGR) };
}

fn insert(info: u8, parts: &[&[u8]]) {
    // SAFETY: the standard XLogBeginInsert/XLogRegisterData/XLogInsert
    // sequence; the registered buffers outlive XLogInsert.
    unsafe {
        pg_sys::XLogBeginInsert();
        for p in parts {
            pg_sys::XLogRegisterData(p.as_ptr() as _, p.len() as u32);
        }
        let lsn = pg_sys::XLogInsert(RM_TDE_ID, info);
        pg_sys::XLogFlush(lsn);
    }
}

pub fn log_relation_key(db_oid: u32, entry: &KeyMapEntry) -> tde_core::Result<()> {
    let bytes = keymap::entry_to_bytes(entry);
    insert(XLOG_TDE_RELATION_KEY, &[&db_oid.to_le_bytes(), &bytes]);
    Ok(())
}

pub fn log_map_rewrite(db_oid: u32, header: &KeyMapHeader, entries: &[KeyMapEntry]) -> tde_core::Result<()> {
    let mut payload = keymap::header_to_bytes(header).to_vec();
    payload.extend_from_slice(&(entries.len() as u32).to_le_bytes());
    for e in entries {
        payload.extend_from_slice(&keymap::entry_to_bytes(e));
    }
    insert(XLOG_TDE_MAP_REWRITE, &[&db_oid.to_le_bytes(), &payload]);
    Ok(())
}

pub fn log_map_remove(db_oid: u32) {
    insert(XLOG_TDE_MAP_REMOVE, &[&db_oid.to_le_bytes()]);
}

pub fn log_providers(bytes: &[u8]) {
    insert(XLOG_TDE_PROVIDERS, &[bytes]);
}

/// The main data of a re-keying batch record: the file and the new frontier.
pub fn batch_payload(id: crate::keys::FileId, frontier: tde_core::rekey::Frontier) -> [u8; 20] {
    let mut b = [0u8; 20];
    b[0..4].copy_from_slice(&id.db.to_le_bytes());
    b[4..8].copy_from_slice(&id.spc.to_le_bytes());
    b[8..12].copy_from_slice(&id.rel.to_le_bytes());
    b[12..20].copy_from_slice(&frontier.to_u64().to_le_bytes());
    b
}

fn parse_batch_payload(data: &[u8]) -> tde_core::Result<(crate::keys::FileId, tde_core::rekey::Frontier)> {
    if data.len() != 20 {
        return Err(tde_core::TdeError::Corrupt("pg_tde re-keying record has a wrong length".into()));
    }
    let u = |o: usize| u32::from_le_bytes(data[o..o + 4].try_into().unwrap_or([0; 4]));
    let f = u64::from_le_bytes(data[12..20].try_into().unwrap_or([0; 8]));
    Ok((crate::keys::FileId { db: u(0), spc: u(4), rel: u(8) }, tde_core::rekey::Frontier::from_u64(f)))
}

/// Log a change to a database's re-keying state (see `crate::rekey::StateOp`).
pub fn log_rekey_op(db: u32, op: &crate::rekey::StateOp) {
    use crate::rekey::{MapChange, StateOp};
    let mut payload = db.to_le_bytes().to_vec();
    match op {
        StateOp::Start(started) => {
            // 3: the files of a walk, all at once (0, a single file, is read still).
            payload.push(3);
            payload.extend_from_slice(&tde_core::rekey::to_bytes(started));
        }
        StateOp::Finish { spc, rel, change } => {
            payload.extend_from_slice(&[if matches!(change, MapChange::Put(_)) { 1 } else { 2 }]);
            payload.extend_from_slice(&spc.to_le_bytes());
            payload.extend_from_slice(&rel.to_le_bytes());
            if let MapChange::Put(e) = change {
                payload.extend_from_slice(&keymap::entry_to_bytes(e));
            }
        }
    }
    insert(XLOG_TDE_REKEY_STATE, &[&payload]);
}

fn redo_rekey_state(data: &[u8]) -> tde_core::Result<()> {
    use crate::rekey::{MapChange, StateOp};
    let corrupt = || tde_core::TdeError::Corrupt("pg_tde re-keying state record is damaged".into());
    let (db, rest) = split_db(data);
    let (&tag, rest) = rest.split_first().ok_or_else(corrupt)?;
    let op = match tag {
        0 | 3 => {
            let records = tde_core::rekey::from_bytes(rest)?;
            if records.is_empty() {
                return Err(corrupt());
            }
            StateOp::Start(records)
        }
        1 | 2 if rest.len() >= 8 => {
            let u = |o: usize| u32::from_le_bytes(rest[o..o + 4].try_into().unwrap_or([0; 4]));
            let (spc, rel) = (u(0), u(4));
            let change = if tag == 1 {
                MapChange::Put(keymap::entry_from_bytes(rest.get(8..8 + keymap::ENTRY_SIZE).ok_or_else(corrupt)?)?)
            } else {
                MapChange::Remove { spc, rel }
            };
            StateOp::Finish { spc, rel, change }
        }
        _ => return Err(corrupt()),
    };
    crate::rekey::redo_op(db, &op)
}

/// Redo of a re-keying batch: restore the images (the buffers stay locked), move the
/// frontier, release them.
///
/// # Safety
/// `record` is the record being replayed.
unsafe fn redo_rekey_batch(record: *mut pg_sys::XLogReaderState, data: &[u8]) -> tde_core::Result<()> {
    let (id, frontier) = parse_batch_payload(data)?;
    // SAFETY: the decoded record of the reader being replayed.
    let max_block_id = unsafe { (*(*record).record).max_block_id };
    let mut buffers = Vec::new();
    for block_id in 0..=max_block_id.max(-1) {
        let mut buf: pg_sys::Buffer = 0;
        // SAFETY: every block reference of this record carries a full-page image.
        unsafe { pg_sys::XLogReadBufferForRedo(record, block_id as u8, &mut buf) };
        buffers.push(buf);
    }
    let result = crate::rekey::redo_frontier(id, frontier);
    for buf in buffers {
        if buf != pg_sys::InvalidBuffer as pg_sys::Buffer {
            // SAFETY: pinned and locked by XLogReadBufferForRedo.
            unsafe { pg_sys::UnlockReleaseBuffer(buf) };
        }
    }
    result
}

/// Log the whole envelope store (KMS-wrapped keys only) before it replaces the file.
pub fn log_envelopes(bytes: &[u8]) {
    insert(XLOG_TDE_ENVELOPES, &[bytes]);
}

/// The record's info bits and main data.
///
/// # Safety
/// `record` must be the reader state PostgreSQL passed to a resource-manager
/// callback, with a decoded record.
unsafe fn record_parts<'a>(record: *mut pg_sys::XLogReaderState) -> (u8, &'a [u8]) {
    // SAFETY: per the function contract the decoded record is valid for the
    // duration of the callback.
    unsafe {
        let decoded = (*record).record;
        let info = (*decoded).header.xl_info & !XLR_INFO_MASK;
        let data = std::slice::from_raw_parts((*decoded).main_data as *const u8, (*decoded).main_data_len as usize);
        (info, data)
    }
}

fn split_db(data: &[u8]) -> (u32, &[u8]) {
    if data.len() < 4 {
        errors::raise(tde_core::TdeError::Corrupt("pg_tde WAL record too short".into()));
    }
    (u32::from_le_bytes([data[0], data[1], data[2], data[3]]), &data[4..])
}

fn parse_map_rewrite(rest: &[u8]) -> tde_core::Result<(KeyMapHeader, Vec<KeyMapEntry>)> {
    let hlen = keymap::HEADER_SIZE;
    let elen = keymap::ENTRY_SIZE;
    if rest.len() < hlen + 4 {
        return Err(tde_core::TdeError::Corrupt("pg_tde map record too short".into()));
    }
    let header = keymap::header_from_bytes(&rest[..hlen])?;
    let count = u32::from_le_bytes(rest[hlen..hlen + 4].try_into().unwrap_or([0; 4])) as usize;
    let body = &rest[hlen + 4..];
    if body.len() != count * elen {
        return Err(tde_core::TdeError::Corrupt("pg_tde map record has a wrong length".into()));
    }
    let entries = body.chunks(elen).map(keymap::entry_from_bytes).collect::<tde_core::Result<Vec<_>>>()?;
    Ok((header, entries))
}

#[pg_guard]
unsafe extern "C-unwind" fn tde_redo(record: *mut pg_sys::XLogReaderState) {
    // SAFETY: called by PostgreSQL with a valid decoded record.
    let (info, data) = unsafe { record_parts(record) };
    let result = match info {
        XLOG_TDE_RELATION_KEY => {
            let (db, rest) = split_db(data);
            keymap::entry_from_bytes(rest).and_then(|e| keys::redo_relation_key(db, &e))
        }
        XLOG_TDE_MAP_REWRITE => {
            let (db, rest) = split_db(data);
            parse_map_rewrite(rest).and_then(|(h, e)| keys::redo_map_rewrite(db, &h, &e))
        }
        XLOG_TDE_PROVIDERS => keys::redo_providers(data),
        XLOG_TDE_MAP_REMOVE => keys::redo_map_remove(split_db(data).0),
        XLOG_TDE_ENVELOPES => keys::redo_envelopes(data),
        XLOG_TDE_REKEY_STATE => redo_rekey_state(data),
        // SAFETY: record is the record being replayed.
        XLOG_TDE_REKEY_BATCH => unsafe { redo_rekey_batch(record, data) },
        other => Err(tde_core::TdeError::Corrupt(format!("unknown pg_tde WAL record info {other:#x}"))),
    };
    if let Err(e) = result {
        // Recovery cannot go on without the key files: PANIC-level errors are
        // raised by the startup process itself when ERROR escapes redo.
        errors::raise(e);
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn tde_desc(buf: pg_sys::StringInfo, record: *mut pg_sys::XLogReaderState) {
    // SAFETY: called by PostgreSQL with a valid decoded record.
    let (info, data) = unsafe { record_parts(record) };
    let text = match info {
        XLOG_TDE_RELATION_KEY if data.len() >= 4 + 12 => {
            let (db, rest) = split_db(data);
            match keymap::entry_from_bytes(rest) {
                Ok(e) => format!("db {db} spc {} rel {} cipher {}", e.spc_oid, e.rel_number, e.cipher.name()),
                Err(_) => format!("db {db} (undecodable entry)"),
            }
        }
        XLOG_TDE_MAP_REWRITE if data.len() >= 4 => format!("db {}", split_db(data).0),
        XLOG_TDE_PROVIDERS | XLOG_TDE_ENVELOPES => format!("{} bytes", data.len()),
        XLOG_TDE_REKEY_STATE if data.len() >= 5 => {
            format!("db {} {}", split_db(data).0, if matches!(data[4], 0 | 3) { "start" } else { "finish" })
        }
        XLOG_TDE_REKEY_BATCH => match parse_batch_payload(data) {
            Ok((id, f)) => format!("file {}/{}/{} frontier fork {} block {}", id.spc, id.db, id.rel, f.fork, f.block),
            Err(_) => String::new(),
        },
        XLOG_TDE_MAP_REMOVE if data.len() >= 4 => format!("db {}", split_db(data).0),
        _ => String::new(),
    };
    let c = std::ffi::CString::new(text).unwrap_or_default();
    // SAFETY: buf is the StringInfo PostgreSQL passed in; c is NUL-terminated.
    unsafe { pg_sys::appendStringInfoString(buf, c.as_ptr()) };
}

#[pg_guard]
unsafe extern "C-unwind" fn tde_identify(info: u8) -> *const c_char {
    let name: &'static CStr = match info & !XLR_INFO_MASK {
        XLOG_TDE_RELATION_KEY => c"RELATION_KEY",
        XLOG_TDE_MAP_REWRITE => c"KEY_MAP_REWRITE",
        XLOG_TDE_PROVIDERS => c"PROVIDERS",
        XLOG_TDE_MAP_REMOVE => c"KEY_MAP_REMOVE",
        XLOG_TDE_ENVELOPES => c"ENVELOPES",
        XLOG_TDE_REKEY_STATE => c"REKEY_STATE",
        XLOG_TDE_REKEY_BATCH => c"REKEY_BATCH",
        _ => return std::ptr::null(),
    };
    name.as_ptr()
}
