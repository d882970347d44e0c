//! Hooks that decide, for every new relation file that is not a table file
//! (those are the `tde_heap` access method's business, see [`crate::am`]),
//! whether it is encrypted, before anything is written to it:
//!
//! - `object_access_hook`, post-create of an index: encrypted when its table
//!   is `tde_heap`.  It fires after the index's catalog rows are inserted and
//!   before the index is built.
//! - `relation_file_create_hook` (core patch): a new file for an existing
//!   index or sequence (REINDEX, TRUNCATE, sequence rewrites, SET
//!   TABLESPACE) or for any relation copied into a new database.  Indexes
//!   follow their table; sequences follow their owning table, and keep their
//!   status when they have none; copies keep their source's status.
//! - `ProcessUtility_hook`: after a statement that may have created or
//!   changed the ownership of a sequence (serial and identity columns,
//!   `ALTER SEQUENCE ... OWNED BY`, `SET ACCESS METHOD`), a sequence whose
//!   status differs from its owning table's is rewritten into a new file,
//!   which the previous rule then encrypts or decrypts.
//!
//! None of these can be switched off the way event triggers can.

use std::ffi::{c_char, c_int, c_void};

use pgrx::pg_sys;
use pgrx::prelude::*;

use crate::am;
use crate::errors::OrRaise;
use crate::ffi;
use crate::keys::{self, FileId};

static mut PREV_OBJECT_ACCESS: pg_sys::object_access_hook_type = None;
static mut PREV_PROCESS_UTILITY: pg_sys::ProcessUtility_hook_type = None;
static mut PREV_FILE_CREATE: pg_sys::relation_file_create_hook_type = None;

pub fn init() {
    // SAFETY: _PG_init runs once per process before any hook can fire; we
    // save the previous hooks and chain to them.
    unsafe {
        PREV_OBJECT_ACCESS = pg_sys::object_access_hook;
        pg_sys::object_access_hook = Some(tde_object_access);
        PREV_PROCESS_UTILITY = pg_sys::ProcessUtility_hook;
        pg_sys::ProcessUtility_hook = Some(tde_process_utility);
        PREV_FILE_CREATE = pg_sys::relation_file_create_hook;
        pg_sys::relation_file_create_hook = Some(tde_relation_file_create);
    }
}

/// OIDs below this belong to objects created by initdb.
const FIRST_NORMAL_OBJECT_ID: u32 = 16384;

fn is_temp_persistence(p: c_char) -> bool {
    p as u8 == pg_sys::RELPERSISTENCE_TEMP
}

/// The table of an index, read from pg_index with SnapshotSelf: during
/// index_create's post-create event the row is not yet visible otherwise.
fn index_table_self(index_oid: pg_sys::Oid) -> Option<pg_sys::Oid> {
    // SAFETY: a standard catalog index scan; the relation is closed and the
    // scan ended before returning, and the tuple is read while pinned.
    unsafe {
        let pg_index = pg_sys::table_open(pg_sys::IndexRelationId, pg_sys::AccessShareLock as pg_sys::LOCKMODE);
        let mut key: pg_sys::ScanKeyData = std::mem::zeroed();
        pg_sys::ScanKeyInit(
            &mut key,
            pg_sys::Anum_pg_index_indexrelid as pg_sys::AttrNumber,
            pg_sys::BTEqualStrategyNumber as pg_sys::StrategyNumber,
            pg_sys::F_OIDEQ.into(),
            pg_sys::Datum::from(index_oid),
        );
        let scan = pg_sys::systable_beginscan(
            pg_index,
            pg_sys::Oid::from(pg_sys::IndexRelidIndexId),
            true,
            &raw mut pg_sys::SnapshotSelfData,
            1,
            &mut key,
        );
        let tuple = pg_sys::systable_getnext(scan);
        let result = if tuple.is_null() {
            None
        } else {
            let form = (*tuple).t_data.cast::<u8>().add((*(*tuple).t_data).t_hoff as usize)
                as *const pg_sys::FormData_pg_index;
            Some((*form).indrelid)
        };
        pg_sys::systable_endscan(scan);
        pg_sys::table_close(pg_index, pg_sys::AccessShareLock as pg_sys::LOCKMODE);
        result
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn tde_object_access(
    access: pg_sys::ObjectAccessType::Type,
    class_id: pg_sys::Oid,
    object_id: pg_sys::Oid,
    sub_id: c_int,
    arg: *mut c_void,
) {
    // SAFETY: chaining to the previous hook with our own arguments.
    unsafe {
        if let Some(prev) = PREV_OBJECT_ACCESS {
            prev(access, class_id, object_id, sub_id, arg);
        }
    }
    if access == pg_sys::ObjectAccessType::OAT_POST_CREATE && class_id == pg_sys::DatabaseRelationId {
        // The OID was just given to a new database, before anything is copied
        // into it: a key map under that OID is a dropped database's, left by a
        // crash between the drop and the removal of its map.  Not under
        // pg_upgrade, which re-creates each database with its old OID: the map
        // is the old cluster's, brought over by pg_tde_upgrade.
        if !binary_upgrade() {
            keys::remove_stale_map(object_id.to_u32()).or_raise();
        }
        return;
    }
    if access != pg_sys::ObjectAccessType::OAT_POST_CREATE || class_id != pg_sys::RelationRelationId || sub_id != 0 {
        return;
    }
    // SAFETY: the relation was just created by this backend and is in the
    // relcache; we release our reference before returning.
    unsafe {
        let rel = pg_sys::RelationIdGetRelation(object_id);
        if rel.is_null() {
            return;
        }
        let form = *(*rel).rd_rel;
        let locator = (*rel).rd_locator;
        let tde = am::is_tde_heap(rel);
        pg_sys::RelationClose(rel);
        let relkind = form.relkind as u8;
        // Internal creations (the transient table of a rewrite) are not checked.
        let internal = !arg.is_null() && (*(arg as *mut pg_sys::ObjectAccessPostCreate)).is_internal;
        if (relkind == pg_sys::RELKIND_RELATION || relkind == pg_sys::RELKIND_MATVIEW)
            && !tde
            && !internal
            && object_id.to_u32() >= FIRST_NORMAL_OBJECT_ID
            && crate::gucs::ENFORCE_ENCRYPTION.get()
        {
            let name = std::ffi::CStr::from_ptr(form.relname.data.as_ptr()).to_string_lossy().into_owned();
            crate::errors::raise_with(
                pgrx::PgSqlErrorCode::ERRCODE_FEATURE_NOT_SUPPORTED,
                &format!("pg_tde.enforce_encryption is on: relation \"{name}\" must use the tde_heap access method"),
                Some("Create it USING tde_heap, or set default_table_access_method = tde_heap."),
            );
        }
        if relkind != pg_sys::RELKIND_INDEX {
            return;
        }
        // The index's table is read with SnapshotSelf; the pg_index row is
        // not yet visible through the syscache.
        let Some(table) = index_table_self(object_id) else { return };
        if am::is_tde_heap_oid(table) {
            keys::create_file_key(FileId::from(locator), is_temp_persistence(form.relpersistence)).or_raise();
        }
    }
}

/// The table that owns a sequence (serial or identity), if any.
fn sequence_owner(seq: pg_sys::Oid) -> Option<pg_sys::Oid> {
    for deptype in [pg_sys::DependencyType::DEPENDENCY_AUTO, pg_sys::DependencyType::DEPENDENCY_INTERNAL] {
        let mut table = pg_sys::InvalidOid;
        let mut col: i32 = 0;
        // SAFETY: plain catalog lookup with out-parameters on our stack.
        if unsafe { pg_sys::sequenceIsOwned(seq, deptype as c_char, &mut table, &mut col) } {
            return Some(table);
        }
    }
    None
}

#[pg_guard]
unsafe extern "C-unwind" fn tde_relation_file_create(
    rel: pg_sys::Relation,
    src: *const pg_sys::RelFileLocator,
    dst: *const pg_sys::RelFileLocator,
    persistence: c_char,
) {
    // SAFETY: chaining to the previous hook with our own arguments.
    unsafe {
        if let Some(prev) = PREV_FILE_CREATE {
            prev(rel, src, dst, persistence);
        }
    }
    // SAFETY: src and dst point to the caller's locators.
    let (src_id, dst_id) = unsafe { (FileId::from(*src), FileId::from(*dst)) };
    let temp = is_temp_persistence(persistence);
    if rel.is_null() {
        // CREATE DATABASE ... STRATEGY WAL_LOG copying a template's file.
        keys::create_copied_file_key(src_id, dst_id).or_raise();
        return;
    }
    // SAFETY: rel is an open relation given by the caller.
    let (relkind, relid, index_table) = unsafe {
        let kind = (*(*rel).rd_rel).relkind as u8;
        let table = if kind == pg_sys::RELKIND_INDEX && !(*rel).rd_index.is_null() {
            Some((*(*rel).rd_index).indrelid)
        } else {
            None
        };
        (kind, (*rel).rd_id, table)
    };
    let encrypt = match relkind {
        pg_sys::RELKIND_INDEX => index_table.is_some_and(am::is_tde_heap_oid),
        pg_sys::RELKIND_SEQUENCE => match sequence_owner(relid) {
            Some(table) => am::is_tde_heap_oid(table),
            None => keys::file_has_key(src_id, temp).or_raise(),
        },
        _ => keys::file_has_key(src_id, temp).or_raise(),
    };
    if encrypt {
        keys::create_file_key(dst_id, temp).or_raise();
    }
}

/// Rewrite the sequences a table owns whose encryption status differs from
/// the table's.
fn sync_owned_sequences(table: pg_sys::Oid) {
    let want = am::is_tde_heap_oid(table);
    // SAFETY: getOwnedSequences returns a palloc'd OID list we only read.
    let seqs = unsafe { pg_sys::getOwnedSequences(table) };
    if seqs.is_null() {
        return;
    }
    // SAFETY: seqs is a valid List of OIDs of the given length.
    let oids: Vec<pg_sys::Oid> =
        unsafe { (0..(*seqs).length).map(|i| (*(*seqs).elements.add(i as usize)).oid_value).collect() };
    for seq in oids {
        // SAFETY: we lock the sequence as ALTER SEQUENCE would, and release
        // the relcache reference before rewriting it.
        unsafe {
            pg_sys::LockRelationOid(seq, pg_sys::AccessExclusiveLock as pg_sys::LOCKMODE);
            let rel = pg_sys::RelationIdGetRelation(seq);
            if rel.is_null() {
                continue;
            }
            let locator = (*rel).rd_locator;
            let persistence = (*(*rel).rd_rel).relpersistence;
            pg_sys::RelationClose(rel);
            let has = keys::file_has_key(FileId::from(locator), is_temp_persistence(persistence)).or_raise();
            if has != want {
                ffi::guarded(|| ffi::SequenceChangePersistence(seq, persistence));
            }
        }
    }
}

/// The relation a statement names, if it exists.
///
/// # Safety
/// `rv` must be NULL or a valid RangeVar.
unsafe fn range_var_oid(rv: *mut pg_sys::RangeVar) -> Option<pg_sys::Oid> {
    if rv.is_null() {
        return None;
    }
    // SAFETY: per the contract rv is valid; no lock is taken (the statement
    // that just ran holds the locks it needs).
    let oid = unsafe {
        pg_sys::RangeVarGetRelidExtended(
            rv,
            pg_sys::NoLock as pg_sys::LOCKMODE,
            pg_sys::RVROption::RVR_MISSING_OK,
            None,
            std::ptr::null_mut(),
        )
    };
    (oid != pg_sys::InvalidOid).then_some(oid)
}

/// With `pg_tde.enforce_encryption` on, `ALTER TABLE ... SET ACCESS METHOD`
/// to anything but `tde_heap` is refused.  (New tables are checked when they
/// are created; table rewrites, which create internal tables, are not.)
///
/// # Safety
/// `stmt` must be NULL or a valid parse node.
unsafe fn refuse_decrypting_under_enforcement(stmt: *mut pg_sys::Node) {
    if stmt.is_null() || !crate::gucs::ENFORCE_ENCRYPTION.get() {
        return;
    }
    // SAFETY: we check the node tag before casting, and walk the command list
    // of the statement, which stays valid during the call.
    unsafe {
        if (*stmt).type_ != pg_sys::NodeTag::T_AlterTableStmt {
            return;
        }
        let cmds = (*(stmt as *mut pg_sys::AlterTableStmt)).cmds;
        if cmds.is_null() {
            return;
        }
        for i in 0..(*cmds).length {
            let cmd = (*(*cmds).elements.add(i as usize)).ptr_value as *mut pg_sys::AlterTableCmd;
            if (*cmd).subtype == pg_sys::AlterTableType::AT_SetAccessMethod {
                let target = if (*cmd).name.is_null() {
                    String::from("(default)")
                } else {
                    std::ffi::CStr::from_ptr((*cmd).name).to_string_lossy().into_owned()
                };
                if target != "tde_heap" {
                    crate::errors::raise_with(
                        pgrx::PgSqlErrorCode::ERRCODE_FEATURE_NOT_SUPPORTED,
                        &format!(
                            "pg_tde.enforce_encryption is on: cannot change a table's access method to \"{target}\""
                        ),
                        None,
                    );
                }
            }
        }
    }
}

/// The string value of option `name` of a CREATE/ALTER DATABASE statement.
///
/// # Safety
/// `options` must be NULL or a valid List of DefElem.
unsafe fn db_option(options: *mut pg_sys::List, name: &str) -> Option<String> {
    if options.is_null() {
        return None;
    }
    // SAFETY: per the contract every element is a DefElem; defGetString reads
    // its argument (and raises an ERROR, through pgrx's guard, for a bad one).
    unsafe {
        for i in 0..(*options).length {
            let def = (*(*options).elements.add(i as usize)).ptr_value as *mut pg_sys::DefElem;
            if std::ffi::CStr::from_ptr((*def).defname).to_bytes() == name.as_bytes() && !(*def).arg.is_null() {
                return Some(std::ffi::CStr::from_ptr(pg_sys::defGetString(def)).to_string_lossy().into_owned());
            }
        }
    }
    None
}

/// The OID of a database by name, if it exists.
fn database_oid(name: *const c_char) -> Option<pg_sys::Oid> {
    if name.is_null() {
        return None;
    }
    // SAFETY: name is a NUL-terminated string of the statement.
    let oid = unsafe { pg_sys::get_database_oid(name, true) };
    (oid != pg_sys::InvalidOid).then_some(oid)
}

/// The default tablespace of a database.
fn database_tablespace(db: pg_sys::Oid) -> Option<u32> {
    // SAFETY: a syscache lookup; the tuple is released before returning.
    unsafe {
        let tuple = pg_sys::SearchSysCache1(pg_sys::SysCacheIdentifier::DATABASEOID as _, pg_sys::Datum::from(db));
        if tuple.is_null() {
            return None;
        }
        let form =
            (*tuple).t_data.cast::<u8>().add((*(*tuple).t_data).t_hoff as usize) as *const pg_sys::FormData_pg_database;
        let spc = (*form).dattablespace.to_u32();
        pg_sys::ReleaseSysCache(tuple);
        Some(spc)
    }
}

/// Refuse the commands that copy a database's files byte for byte under a new
/// identity, where no key entry exists for them: the copies of encrypted
/// files could not be read, and pages written to them later would go to disk
/// in plaintext.  Checked before anything is changed.
///
/// # Safety
/// `stmt` must be NULL or a valid parse node.
unsafe fn refuse_byte_copies_of_encrypted_files(stmt: *mut pg_sys::Node) {
    if stmt.is_null() {
        return;
    }
    // SAFETY: the node tag is checked before each cast.
    unsafe {
        match (*stmt).type_ {
            pg_sys::NodeTag::T_CreatedbStmt => {
                let c = stmt as *mut pg_sys::CreatedbStmt;
                let file_copy =
                    db_option((*c).options, "strategy").is_some_and(|s| s.eq_ignore_ascii_case("file_copy"));
                if !file_copy {
                    return;
                }
                let template = db_option((*c).options, "template").unwrap_or_else(|| "template1".into());
                let Ok(cname) = std::ffi::CString::new(template.clone()) else { return };
                let Some(src) = database_oid(cname.as_ptr()) else { return };
                if keys::relation_key_count(src.to_u32()).or_raise() > 0 {
                    crate::errors::raise_with(
                        pgrx::PgSqlErrorCode::ERRCODE_FEATURE_NOT_SUPPORTED,
                        &format!("cannot copy database \"{template}\" with STRATEGY FILE_COPY: it has encrypted relations"),
                        Some("Use STRATEGY WAL_LOG (the default), which gives every copied encrypted file a key of its own."),
                    );
                }
            }
            pg_sys::NodeTag::T_AlterDatabaseStmt => {
                let a = stmt as *mut pg_sys::AlterDatabaseStmt;
                if db_option((*a).options, "tablespace").is_none() {
                    return;
                }
                let Some(db) = database_oid((*a).dbname) else { return };
                let Some(spc) = database_tablespace(db) else { return };
                if keys::relation_key_count_in(db.to_u32(), spc).or_raise() > 0 {
                    let name = std::ffi::CStr::from_ptr((*a).dbname).to_string_lossy();
                    crate::errors::raise_with(
                        pgrx::PgSqlErrorCode::ERRCODE_FEATURE_NOT_SUPPORTED,
                        &format!("cannot move database \"{name}\" to another tablespace: it has encrypted relations in its default tablespace"),
                        Some("Move its encrypted tables and indexes with ALTER TABLE ... SET TABLESPACE and ALTER INDEX ... SET TABLESPACE, which give the moved files keys of their own."),
                    );
                }
            }
            _ => {}
        }
    }
}

/// The utility hook.  Not under pgrx's guard itself, so that an ERROR raised
/// by the statement (by PostgreSQL, about anything) reaches the client exactly
/// as PostgreSQL raised it, with all its fields, instead of being caught and
/// re-raised by pgrx (which keeps only some fields and, with `RUST_BACKTRACE`
/// set, adds a Rust backtrace).  pg_tde's own work before and after the
/// statement runs in guarded functions; this frame holds nothing with a
/// destructor, so an ERROR's longjmp across it is sound (a plain old frame).
#[allow(clippy::too_many_arguments)]
unsafe extern "C-unwind" fn tde_process_utility(
    pstmt: *mut pg_sys::PlannedStmt,
    query_string: *const c_char,
    read_only_tree: bool,
    context: pg_sys::ProcessUtilityContext::Type,
    params: pg_sys::ParamListInfo,
    query_env: *mut pg_sys::QueryEnvironment,
    dest: *mut pg_sys::DestReceiver,
    qc: *mut pg_sys::QueryCompletion,
) {
    // SAFETY: pstmt is the statement being executed; the helpers are guarded
    // entry points.
    let dropped_db = unsafe { before_utility((*pstmt).utilityStmt) };
    // SAFETY: chaining to the previous hook or the standard function, with the
    // caller's arguments.
    unsafe {
        match PREV_PROCESS_UTILITY {
            Some(prev) => prev(pstmt, query_string, read_only_tree, context, params, query_env, dest, qc),
            None => {
                ffi::standard_ProcessUtility(pstmt, query_string, read_only_tree, context, params, query_env, dest, qc)
            }
        }
        after_utility((*pstmt).utilityStmt, dropped_db);
    }
}

/// Whether this server runs for pg_upgrade (`-b`).
fn binary_upgrade() -> bool {
    // SAFETY: a plain read of a process-global flag set at start.
    unsafe { (&raw const pg_sys::IsBinaryUpgrade).read() }
}

/// Checks that may refuse the statement before anything runs; returns the OID
/// of the database a DROP DATABASE drops (0 otherwise).
#[pg_guard]
unsafe extern "C-unwind" fn before_utility(stmt: *mut pg_sys::Node) -> u32 {
    // SAFETY: stmt is NULL or a valid parse node.
    unsafe {
        refuse_decrypting_under_enforcement(stmt);
        refuse_byte_copies_of_encrypted_files(stmt);
    }
    // DROP DATABASE: the dropped database's key map goes with it (after the
    // drop, which removes its files and cannot be rolled back).
    // SAFETY: the node tag is checked before the cast.
    unsafe {
        if !stmt.is_null() && (*stmt).type_ == pg_sys::NodeTag::T_DropdbStmt {
            database_oid((*(stmt as *mut pg_sys::DropdbStmt)).dbname).map_or(0, |o| o.to_u32())
        } else {
            0
        }
    }
}

/// pg_tde's work after a statement that succeeded.
#[pg_guard]
unsafe extern "C-unwind" fn after_utility(stmt: *mut pg_sys::Node, dropped_db: u32) {
    // Reached only when the drop succeeded (a failure raises an ERROR).  Under
    // pg_upgrade, a dropped database is re-created with the same OID at once
    // and keeps the old cluster's key map (see the object access hook).
    if dropped_db != 0 && !binary_upgrade() {
        keys::remove_stale_map(dropped_db).or_raise();
    }
    if stmt.is_null() {
        return;
    }
    // SAFETY: stmt is a parse node of the tag we check before casting.
    unsafe {
        let table = match (*stmt).type_ {
            pg_sys::NodeTag::T_CreateStmt => range_var_oid((*(stmt as *mut pg_sys::CreateStmt)).relation),
            pg_sys::NodeTag::T_AlterTableStmt => {
                let at = stmt as *mut pg_sys::AlterTableStmt;
                if (*at).objtype == pg_sys::ObjectType::OBJECT_TABLE {
                    range_var_oid((*at).relation)
                } else {
                    None
                }
            }
            pg_sys::NodeTag::T_AlterSeqStmt => {
                range_var_oid((*(stmt as *mut pg_sys::AlterSeqStmt)).sequence).and_then(sequence_owner)
            }
            pg_sys::NodeTag::T_CreateSeqStmt => {
                range_var_oid((*(stmt as *mut pg_sys::CreateSeqStmt)).sequence).and_then(sequence_owner)
            }
            _ => None,
        };
        if let Some(table) = table {
            sync_owned_sequences(table);
        }
    }
}
