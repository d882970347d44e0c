//! The `tde_heap` table access method: heap's routine, with the callbacks
//! that create a table's files wrapped so that each new file gets a key
//! before anything is written to it, and with TOAST tables of `tde_heap`
//! tables created as `tde_heap` too.
//!
//! Table creation, TRUNCATE, VACUUM FULL, CLUSTER, ALTER TABLE rewrites,
//! SET ACCESS METHOD, materialized views and SET TABLESPACE all create table
//! files through these two callbacks, so none of them needs a hook of its own.

use std::sync::atomic::{AtomicBool, Ordering};

use pgrx::pg_sys;
use pgrx::prelude::*;

use crate::errors::OrRaise;
use crate::keys::{self, FileId};

static mut TDE_HEAP_ROUTINE: std::mem::MaybeUninit<pg_sys::TableAmRoutine> = std::mem::MaybeUninit::zeroed();
static INITIALISED: AtomicBool = AtomicBool::new(false);

type SetNewFilelocator = unsafe extern "C-unwind" fn(
    pg_sys::Relation,
    *const pg_sys::RelFileLocator,
    std::ffi::c_char,
    *mut pg_sys::TransactionId,
    *mut pg_sys::MultiXactId,
);
type CopyData = unsafe extern "C-unwind" fn(pg_sys::Relation, *const pg_sys::RelFileLocator);

static mut HEAP_SET_NEW_FILELOCATOR: Option<SetNewFilelocator> = None;
static mut HEAP_COPY_DATA: Option<CopyData> = None;
/// Heap's routine, whose callbacks the access checks below hand on to.
static mut HEAP_ROUTINE: std::mem::MaybeUninit<pg_sys::TableAmRoutine> = std::mem::MaybeUninit::zeroed();

/// Build the routine once per process (called from `_PG_init`).
pub fn init() {
    if INITIALISED.swap(true, Ordering::SeqCst) {
        return;
    }
    // SAFETY: GetHeapamTableAmRoutine returns a pointer to heap's static,
    // fully initialised routine; we copy it into our own static once, before
    // any other code of ours can read it.
    unsafe {
        let heap = *pg_sys::GetHeapamTableAmRoutine();
        HEAP_SET_NEW_FILELOCATOR = heap.relation_set_new_filelocator;
        HEAP_COPY_DATA = heap.relation_copy_data;
        (&raw mut HEAP_ROUTINE).cast::<pg_sys::TableAmRoutine>().write(heap);
        let mut ours = heap;
        ours.scan_begin = Some(tde_scan_begin);
        ours.index_fetch_begin = Some(tde_index_fetch_begin);
        ours.tuple_insert = Some(tde_tuple_insert);
        ours.multi_insert = Some(tde_multi_insert);
        ours.relation_set_new_filelocator = Some(tde_set_new_filelocator);
        ours.relation_copy_data = Some(tde_copy_data);
        ours.relation_toast_am = Some(tde_toast_am);
        (&raw mut TDE_HEAP_ROUTINE).cast::<pg_sys::TableAmRoutine>().write(ours);
    }
}

fn routine_ptr() -> *const pg_sys::TableAmRoutine {
    // Only the address is taken (MaybeUninit<T> has T's layout); the value
    // is written in init().
    (&raw const TDE_HEAP_ROUTINE).cast::<pg_sys::TableAmRoutine>()
}

/// Whether a relation uses `tde_heap` (its relcache entry points at our routine).
///
/// # Safety
/// `rel` must be a valid, open relation.
pub unsafe fn is_tde_heap(rel: pg_sys::Relation) -> bool {
    // SAFETY: per the contract rel is valid.
    unsafe { std::ptr::eq((*rel).rd_tableam, routine_ptr()) }
}

/// Whether the relation with this OID uses `tde_heap`.
pub fn is_tde_heap_oid(relid: pg_sys::Oid) -> bool {
    // SAFETY: RelationIdGetRelation returns NULL or a refcounted entry that we
    // release before returning.
    unsafe {
        let rel = pg_sys::RelationIdGetRelation(relid);
        if rel.is_null() {
            return false;
        }
        let result = is_tde_heap(rel);
        pg_sys::RelationClose(rel);
        result
    }
}

#[unsafe(no_mangle)]
pub extern "C" fn pg_finfo_tde_heap_handler() -> &'static pg_sys::Pg_finfo_record {
    const V1: pg_sys::Pg_finfo_record = pg_sys::Pg_finfo_record { api_version: 1 };
    &V1
}

/// The access method's handler, `tde_heap_handler(internal)`.
#[unsafe(no_mangle)]
#[pg_guard]
pub unsafe extern "C-unwind" fn tde_heap_handler(_fcinfo: pg_sys::FunctionCallInfo) -> pg_sys::Datum {
    init();
    pg_sys::Datum::from(routine_ptr())
}

#[pg_guard]
unsafe extern "C-unwind" fn tde_set_new_filelocator(
    rel: pg_sys::Relation,
    newrlocator: *const pg_sys::RelFileLocator,
    persistence: std::ffi::c_char,
    freeze_xid: *mut pg_sys::TransactionId,
    minmulti: *mut pg_sys::MultiXactId,
) {
    // SAFETY: newrlocator points to the caller's locator for the new file.
    let id = FileId::from(unsafe { *newrlocator });
    keys::create_file_key(id, persistence as u8 == pg_sys::RELPERSISTENCE_TEMP).or_raise();
    // SAFETY: heap's own callback, called with the arguments we were given.
    unsafe {
        let heap = HEAP_SET_NEW_FILELOCATOR.expect("heap routine captured in init");
        heap(rel, newrlocator, persistence, freeze_xid, minmulti)
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn tde_copy_data(rel: pg_sys::Relation, newrlocator: *const pg_sys::RelFileLocator) {
    // SAFETY: rel is open and newrlocator points to the new file's locator.
    let (id, persistence) = unsafe { (FileId::from(*newrlocator), (*(*rel).rd_rel).relpersistence as u8) };
    keys::create_file_key(id, persistence == pg_sys::RELPERSISTENCE_TEMP).or_raise();
    // SAFETY: heap's own callback, called with the arguments we were given.
    unsafe {
        let heap = HEAP_COPY_DATA.expect("heap routine captured in init");
        heap(rel, newrlocator)
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn tde_toast_am(rel: pg_sys::Relation) -> pg_sys::Oid {
    // SAFETY: rel is an open relation.
    unsafe { (*(*rel).rd_rel).relam }
}

pgrx::extension_sql!(
    r#"
CREATE FUNCTION tde_heap_handler(internal) RETURNS table_am_handler
    AS 'MODULE_PATHNAME', 'tde_heap_handler' LANGUAGE C STRICT;
CREATE ACCESS METHOD tde_heap TYPE TABLE HANDLER tde_heap_handler;
COMMENT ON ACCESS METHOD tde_heap IS 'heap, stored encrypted';
"#,
    name = "tde_heap_am",
);

/// Heap's routine as captured in [`init`].
fn heap() -> &'static pg_sys::TableAmRoutine {
    // SAFETY: written once in init(), before tde_heap_handler hands out our
    // routine, whose callbacks are the only callers; never written again.
    unsafe { &*(&raw const HEAP_ROUTINE).cast::<pg_sys::TableAmRoutine>() }
}

/// Refuse access to a table whose database's principal key is revoked (see
/// `key_check`): every read starts with a scan or an index fetch, every insert
/// with one of the insert callbacks, so data that is still in shared buffers is
/// refused as well as data on disk.  Temporary tables have keys of their own.
///
/// # Safety
/// `rel` is an open relation.
unsafe fn check_access(rel: pg_sys::Relation) {
    // SAFETY: per the contract rel is open.
    let (db, persistence) = unsafe { ((*rel).rd_locator.dbOid.to_u32(), (*(*rel).rd_rel).relpersistence as u8) };
    if persistence != pg_sys::RELPERSISTENCE_TEMP {
        crate::key_check::check_database_access(db).or_raise();
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn tde_scan_begin(
    rel: pg_sys::Relation,
    snapshot: pg_sys::Snapshot,
    nkeys: std::ffi::c_int,
    key: *mut pg_sys::ScanKeyData,
    pscan: pg_sys::ParallelTableScanDesc,
    flags: u32,
) -> pg_sys::TableScanDesc {
    // SAFETY: rel is open (the caller's); heap's callback with our arguments.
    unsafe {
        check_access(rel);
        heap().scan_begin.expect("heap has scan_begin")(rel, snapshot, nkeys, key, pscan, flags)
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn tde_index_fetch_begin(rel: pg_sys::Relation) -> *mut pg_sys::IndexFetchTableData {
    // SAFETY: as above.
    unsafe {
        check_access(rel);
        heap().index_fetch_begin.expect("heap has index_fetch_begin")(rel)
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn tde_tuple_insert(
    rel: pg_sys::Relation,
    slot: *mut pg_sys::TupleTableSlot,
    cid: pg_sys::CommandId,
    options: std::ffi::c_int,
    bistate: *mut pg_sys::BulkInsertStateData,
) {
    // SAFETY: as above.
    unsafe {
        check_access(rel);
        heap().tuple_insert.expect("heap has tuple_insert")(rel, slot, cid, options, bistate)
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn tde_multi_insert(
    rel: pg_sys::Relation,
    slots: *mut *mut pg_sys::TupleTableSlot,
    nslots: std::ffi::c_int,
    cid: pg_sys::CommandId,
    options: std::ffi::c_int,
    bistate: *mut pg_sys::BulkInsertStateData,
) {
    // SAFETY: as above.
    unsafe {
        check_access(rel);
        heap().multi_insert.expect("heap has multi_insert")(rel, slots, nslots, cid, options, bistate)
    }
}
