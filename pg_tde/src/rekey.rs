//! Online re-keying: rotate the internal keys of a live table, or encrypt or decrypt
//! it, under VACUUM's lock (`SHARE UPDATE EXCLUSIVE`).
//!
//! Every file of the table (heap, TOAST table and index, indexes, owned sequences)
//! moves in turn from its *old* key to a *new* one; either may be "plaintext" (online
//! encryption, decryption). While a file moves, a frontier `(fork, block)` splits it
//! (`tde_core::rekey`): blocks before it are under the new key. The frontier lives in
//! `$PGDATA/pg_tde/<db>_rekey` and, authoritative while the server runs, in shared
//! memory, which the storage manager reads for every page of such a file.
//!
//! One step of the walk takes up to [`BATCH`] blocks of one fork: it reads them into
//! shared buffers and locks them exclusively, writes one WAL record with their
//! full-page images and the new frontier, marks them dirty, moves the frontier in
//! shared memory (inside the critical section) and in the file (before the locks are
//! released, as a crash there must replay the record: a failure is a PANIC). No block
//! of the batch can be written or read from disk while it is locked, so every block on
//! disk is always under the key the frontier says, on the primary, after a crash (redo
//! restores the images and moves the frontier again) and on a standby, which replays the
//! same records and decides nothing on its own. A fork is finished under the relation's
//! extension lock, so that no block is appended under the old key after the last
//! batch. When every fork is done, one record makes the new key the file's key-map entry
//! (or removes the entry) and forgets the re-keying.
//!
//! After a crash (and on a standby, and in a base backup) the recorded frontier is
//! the latest one, but redo may read a block of the last stretch before the record
//! that re-keyed it is replayed, and that block may be on disk under either key: a
//! page that is not valid under the key the frontier says is tried under the other
//! (`keys::decrypt_either`).
//!
//! Encryption and decryption end with a brief ACCESS EXCLUSIVE lock to switch the
//! table's access method. The walk runs in the calling session (or, with
//! `wait => false`, in a background worker); it can be cancelled between batches and
//! a later call continues from the frontier, also after a restart or a crash.

use std::time::Duration;

use pgrx::lwlock::PgLwLock;
use pgrx::pg_shmem_init;
use pgrx::prelude::*;
use pgrx::shmem::PGRXSharedMemory;
use pgrx::PgSqlErrorCode;
use tde_core::cipher::RelKey;
use tde_core::keymap::{self, KeyMapEntry};
use tde_core::rekey::{self as state, Frontier, RekeyMode, RekeyRecord, FORKS};
use tde_core::{Result, TdeError};

use crate::errors::{raise_with, OrRaise};
use crate::keys::{self, FileId};

/// Blocks per WAL record (at most `XLR_MAX_BLOCK_ID`).
const BATCH: u32 = 32;
const SLOTS: usize = 1024;

pub fn rekey_path(db: u32) -> std::path::PathBuf {
    std::path::PathBuf::from(format!("{}/{db}_rekey", keys::KEY_DIR))
}

// ---------------------------------------------------------------------------
// Shared memory: the frontiers, and progress.

#[derive(Clone, Copy)]
#[repr(C)]
pub struct RekeySlot {
    in_use: bool,
    mode: u8,
    /// 0 waiting, 1 running, 2 cancelled or failed (see `rekey_status`).
    state: u8,
    db: u32,
    spc: u32,
    rel: u32,
    frontier: u64,
    relid: u32,
    /// The process walking the file (0: none).
    pid: i32,
    done: u64,
    total: u64,
}

#[derive(Clone, Copy)]
#[repr(C)]
pub struct RekeyTable {
    slots: [RekeySlot; SLOTS],
}

impl Default for RekeyTable {
    fn default() -> Self {
        let empty = RekeySlot {
            in_use: false,
            mode: 0,
            state: 0,
            db: 0,
            spc: 0,
            rel: 0,
            frontier: 0,
            relid: 0,
            pid: 0,
            done: 0,
            total: 0,
        };
        RekeyTable { slots: [empty; SLOTS] }
    }
}

// SAFETY: plain old data with no pointers; valid in any process that maps it.
unsafe impl PGRXSharedMemory for RekeyTable {}

static REKEY: PgLwLock<RekeyTable> = unsafe { PgLwLock::new(c"pg_tde_rekey") };

/// Whether the interrupted re-keyings were resumed since shared memory was set up
/// (at the server's start, and again after a crash).
static RESUMED: pgrx::PgAtomic<std::sync::atomic::AtomicBool> = unsafe { pgrx::PgAtomic::new(c"pg_tde_rekey_resumed") };

pub fn init_shmem() {
    pg_shmem_init!(REKEY);
    pg_shmem_init!(REKEY_SEQ);
    pg_shmem_init!(RESUMED);
}

impl RekeySlot {
    fn is(&self, id: FileId) -> bool {
        self.in_use && self.db == id.db && self.spc == id.spc && self.rel == id.rel
    }
}

/// Whether block `block` of fork `fork` of the file in slot `slot` is under its new key.
/// A slot that no longer holds the file means its re-keying has finished: new key.
pub fn frontier_covers(slot: usize, id: FileId, fork: u8, block: u32) -> bool {
    let table = REKEY.share();
    let s = &table.slots[slot.min(SLOTS - 1)];
    if !s.is(id) {
        return true;
    }
    Frontier::from_u64(s.frontier).covers(fork, block)
}

/// The re-keying record of a file and its shared-memory slot (loaded from the file
/// when the slot is not there yet, after a start).
pub fn record_of(id: FileId) -> Result<Option<(RekeyRecord, usize)>> {
    let records = state::read(&rekey_path(id.db))?;
    let Some(record) = records.into_iter().find(|r| r.spc_oid == id.spc && r.rel_number == id.rel) else {
        return Ok(None);
    };
    let slot = slot_for(id, &record)?;
    Ok(Some((record, slot)))
}

fn slot_for(id: FileId, record: &RekeyRecord) -> Result<usize> {
    let mut table = REKEY.exclusive();
    if let Some(i) = table.slots.iter().position(|s| s.is(id)) {
        return Ok(i);
    }
    let i = table
        .slots
        .iter()
        .position(|s| !s.in_use)
        .ok_or_else(|| TdeError::Invalid(format!("more than {SLOTS} relation files are being re-keyed at once")))?;
    table.slots[i] = RekeySlot {
        in_use: true,
        mode: record.mode as u8,
        state: 0,
        db: id.db,
        spc: id.spc,
        rel: id.rel,
        frontier: record.frontier.to_u64(),
        relid: 0,
        pid: 0,
        done: 0,
        total: 0,
    };
    Ok(i)
}

fn reset_slot(id: FileId, record: &RekeyRecord) {
    let mut table = REKEY.exclusive();
    for s in table.slots.iter_mut().filter(|s| s.is(id)) {
        s.mode = record.mode as u8;
        s.frontier = record.frontier.to_u64();
        s.state = 0;
        s.pid = 0;
        s.done = 0;
        s.total = 0;
    }
}

/// Free the slots whose file has no record any more (readers racing the end of a
/// re-keying can leave one); with the key-files lock held, so that no record
/// starts or ends meanwhile.
fn sweep_slots(records: &[(u32, RekeyRecord)]) {
    let mut table = REKEY.exclusive();
    for s in table.slots.iter_mut().filter(|s| s.in_use) {
        if !records.iter().any(|(db, r)| *db == s.db && r.spc_oid == s.spc && r.rel_number == s.rel) {
            s.in_use = false;
        }
    }
}

fn set_frontier(id: FileId, frontier: Frontier) {
    let mut table = REKEY.exclusive();
    if let Some(s) = table.slots.iter_mut().find(|s| s.is(id)) {
        s.frontier = frontier.to_u64();
    }
}

fn free_slot(id: FileId) {
    let mut table = REKEY.exclusive();
    for s in table.slots.iter_mut().filter(|s| s.is(id)) {
        s.in_use = false;
    }
}

fn set_progress(id: FileId, relid: u32, state: u8, done: u64, total: u64) {
    let mut table = REKEY.exclusive();
    if let Some(s) = table.slots.iter_mut().find(|s| s.is(id)) {
        s.relid = relid;
        // SAFETY: a plain read of a process global.
        s.pid = unsafe { (&raw const pg_sys::MyProcPid).read() };
        s.state = state;
        s.done = done;
        s.total = total;
    }
}

/// The re-keying records of every database, with their database.
fn all_records() -> Result<Vec<(u32, RekeyRecord)>> {
    let mut out = Vec::new();
    for db in keys::databases_with_file("_rekey")? {
        out.extend(state::read(&rekey_path(db))?.into_iter().map(|r| (db, r)));
    }
    Ok(out)
}

/// Whether a database has files being re-keyed (its principal key may not change then:
/// the new keys are sealed with it).
pub fn in_progress(db: u32) -> Result<bool> {
    Ok(!state::read(&rekey_path(db))?.is_empty())
}

// ---------------------------------------------------------------------------
// WAL records (see crate::rmgr) and their redo.

/// What the end of a re-keying does to the key map.
pub enum MapChange {
    Put(KeyMapEntry),
    Remove { spc: u32, rel: u32 },
}

/// A change to a database's re-keying state, WAL-logged, and applied the same way
/// by the primary and by redo: the re-keying of a relation's files begins (all of
/// them at once), or one file's ends with its key-map change.  (The frontier moves
/// with the batch records.)
pub enum StateOp {
    Start(Vec<RekeyRecord>),
    Finish { spc: u32, rel: u32, change: MapChange },
}

/// Readers of the key map and the re-keying state (`keys::file_cipher`) read both
/// as one: the end of a re-keying makes the counter odd while it changes them.
static REKEY_SEQ: pgrx::PgAtomic<std::sync::atomic::AtomicU64> = unsafe { pgrx::PgAtomic::new(c"pg_tde_rekey_seq") };

pub fn seq() -> u64 {
    REKEY_SEQ.get().load(std::sync::atomic::Ordering::Acquire)
}

/// Apply a state change to the files, with the key-files lock held.
fn apply_op_locked(db: u32, op: &StateOp) -> Result<()> {
    let path = rekey_path(db);
    let mut records = state::read(&path)?;
    match op {
        StateOp::Start(started) => {
            let mut pushed = Vec::new();
            for r in started {
                if !records.iter().any(|x| x.spc_oid == r.spc_oid && x.rel_number == r.rel_number) {
                    records.push(r.clone());
                    pushed.push(r);
                }
            }
            if !pushed.is_empty() {
                state::write(&path, &records)?;
            }
            // A slot left for an earlier re-keying of the same file (a reader that
            // raced its end) starts over from the new record.  (A record already
            // there, as in crash recovery, may be further on: its slot stays.)
            for r in pushed {
                reset_slot(FileId { spc: r.spc_oid, db, rel: r.rel_number }, r);
            }
        }
        StateOp::Finish { spc, rel, change } => {
            REKEY_SEQ.get().fetch_add(1, std::sync::atomic::Ordering::AcqRel);
            let result = (|| {
                // The key map first: a crash before the state file changes leaves a
                // record whose old and new keys are the same.
                let map = keys::map_path(db);
                let changed = match change {
                    MapChange::Put(entry) => keymap::put_entry(&map, entry),
                    MapChange::Remove { spc, rel } => keymap::remove_entry(&map, *spc, *rel).map(|_| ()),
                };
                match changed {
                    Ok(()) => {}
                    // The map was removed later in the WAL (the database was dropped).
                    Err(TdeError::NotFound(_)) => {}
                    Err(e) => return Err(e),
                }
                records.retain(|x| !(x.spc_oid == *spc && x.rel_number == *rel));
                state::write(&path, &records)?;
                // Inside the odd window: a reader that found the record before
                // this and takes a slot for it now retries (and finds none).
                free_slot(FileId { spc: *spc, db, rel: *rel });
                Ok(())
            })();
            REKEY_SEQ.get().fetch_add(1, std::sync::atomic::Ordering::AcqRel);
            result?;
        }
    }
    keys::invalidate_local_keys();
    Ok(())
}

/// Redo of a state change.
pub fn redo_op(db: u32, op: &StateOp) -> Result<()> {
    keys::with_key_files_lock(|| apply_op_locked(db, op))
}

/// Forget every re-keying of a database whose key map goes away (the database
/// was dropped); on the primary and in redo.
pub fn forget_database(db: u32) -> Result<()> {
    state::write(&rekey_path(db), &[])?;
    let mut table = REKEY.exclusive();
    for s in table.slots.iter_mut().filter(|s| s.in_use && s.db == db) {
        s.in_use = false;
    }
    Ok(())
}

/// Redo of a batch: the images are restored by the caller (the buffers are locked);
/// the frontier moves in shared memory and in the file before they are released.
pub fn redo_frontier(id: FileId, frontier: Frontier) -> Result<()> {
    let path = rekey_path(id.db);
    keys::with_key_files_lock(|| {
        let mut records = state::read(&path)?;
        let Some(r) = records.iter_mut().find(|r| r.spc_oid == id.spc && r.rel_number == id.rel) else {
            // The re-keying ended (or its file was dropped) later in the WAL.
            return Ok(());
        };
        if frontier > r.frontier {
            r.frontier = frontier;
            state::write(&path, &records)?;
        }
        Ok(())
    })?;
    if let Ok(Some((record, _))) = record_of(id) {
        set_frontier(id, record.frontier.max(frontier));
    }
    Ok(())
}

/// Forget the re-keying of a file that is unlinked (also during redo of the unlink).
pub fn forget_file(id: FileId) -> Result<()> {
    let path = rekey_path(id.db);
    if !path.exists() {
        free_slot(id);
        return Ok(());
    }
    keys::with_key_files_lock(|| {
        let mut records = state::read(&path)?;
        let before = records.len();
        records.retain(|r| !(r.spc_oid == id.spc && r.rel_number == id.rel));
        if records.len() != before {
            state::write(&path, &records)?;
        }
        Ok::<(), TdeError>(())
    })?;
    free_slot(id);
    Ok(())
}

// ---------------------------------------------------------------------------
// The walk

/// One relation file to move: its relation and identity.
struct Target {
    relid: pg_sys::Oid,
    id: FileId,
    persistence: u8,
}

/// The relation files of a table: itself, its TOAST table and index, its indexes and
/// the sequences it owns.
fn files_of(table: pg_sys::Oid) -> Vec<Target> {
    let mut oids = vec![table];
    let sql = format!(
        "SELECT c.reltoastrelid FROM pg_catalog.pg_class c WHERE c.oid = {t} AND c.reltoastrelid <> 0
         UNION ALL SELECT i.indexrelid FROM pg_catalog.pg_index i WHERE i.indrelid = {t}
         UNION ALL SELECT i.indexrelid FROM pg_catalog.pg_index i JOIN pg_catalog.pg_class c ON i.indrelid = c.reltoastrelid WHERE c.oid = {t}
         UNION ALL SELECT d.objid FROM pg_catalog.pg_depend d JOIN pg_catalog.pg_class s ON s.oid = d.objid
           WHERE d.classid = 'pg_catalog.pg_class'::regclass AND d.refobjid = {t} AND d.deptype IN ('a', 'i') AND s.relkind = 'S'",
        t = table.to_u32()
    );
    Spi::connect(|client| {
        for row in client.select(&sql, None, &[]).unwrap_or_else(|e| spi_failed(e)) {
            if let Ok(Some(oid)) = row.get::<pg_sys::Oid>(1) {
                if !oids.contains(&oid) {
                    oids.push(oid);
                }
            }
        }
    });
    oids.into_iter()
        .filter_map(|relid| {
            // SAFETY: the table is locked; its TOAST table, indexes and sequences cannot
            // go away while it is; the entry is released before returning.
            unsafe {
                let rel = pg_sys::RelationIdGetRelation(relid);
                if rel.is_null() {
                    return None;
                }
                let t = Target {
                    relid,
                    id: FileId::from((*rel).rd_locator),
                    persistence: (*(*rel).rd_rel).relpersistence as u8,
                };
                pg_sys::RelationClose(rel);
                Some(t)
            }
        })
        .collect()
}

/// Start (or find) the re-keying of a relation's files: the records of the files to
/// walk, in the order of `targets`.
///
/// All the files are started by one WAL record, before the first is walked, so
/// that a walk interrupted anywhere (between two files too) is continued by the
/// next call: a file with a record is continued from its frontier; for a rotation
/// with records left, the files without one were finished by the interrupted walk
/// and are not rotated again.  Encryption and decryption skip the files that are
/// already in the wanted state.
fn start_files(targets: &[Target], mode: RekeyMode) -> Result<Vec<(&Target, RekeyRecord)>> {
    let mut existing = Vec::with_capacity(targets.len());
    for target in targets {
        let record = record_of(target.id)?.map(|(record, _)| record);
        if let Some(record) = &record {
            if record.mode != mode {
                let id = target.id;
                return Err(TdeError::Invalid(format!(
                    "relation file {}/{}/{} is being re-keyed to {} already; finish that first",
                    id.spc,
                    id.db,
                    id.rel,
                    record.mode.name()
                )));
            }
        }
        existing.push(record);
    }
    let resuming_rotation = mode == RekeyMode::Rotate && existing.iter().any(Option::is_some);
    let mut to_start = Vec::new();
    for (target, record) in targets.iter().zip(&existing) {
        if record.is_some() || resuming_rotation {
            continue;
        }
        let has_key = keys::file_has_key(target.id, false)?;
        let needed = match mode {
            RekeyMode::Rotate | RekeyMode::Decrypt => has_key,
            RekeyMode::Encrypt => !has_key,
        };
        if needed {
            to_start.push(target);
        }
    }
    if !to_start.is_empty() {
        // The new keys are sealed outside the lock (the principal key may have to be
        // fetched), and stored only if the principal key did not change meanwhile.
        let db = to_start[0].id.db;
        let header = keys::database_header(db)?;
        let principal = match mode {
            RekeyMode::Decrypt => None,
            _ => {
                let h = header
                    .as_ref()
                    .ok_or_else(|| TdeError::NotFound(format!("principal key not configured for database {db}")))?;
                Some(keys::verified_principal(h)?)
            }
        };
        let mut started = Vec::with_capacity(to_start.len());
        for target in &to_start {
            let id = target.id;
            let new_entry = match &principal {
                None => None,
                Some(pk) => {
                    let relkey = RelKey::generate(crate::gucs::cipher())?;
                    Some(KeyMapEntry::seal(id.db, id.spc, id.rel, &relkey, pk)?)
                }
            };
            started.push(RekeyRecord {
                spc_oid: id.spc,
                rel_number: id.rel,
                mode,
                frontier: Frontier::default(),
                new_entry,
            });
        }
        keys::with_key_files_lock(|| {
            if keys::database_header(db)? != header {
                return Err(TdeError::Invalid("the principal key changed while the re-keying started; retry".into()));
            }
            // Every recorded file has a shared-memory slot while it is re-keyed (the
            // slots of records not yet looked at after a restart included).
            let on_disk = all_records()?;
            sweep_slots(&on_disk);
            let recorded = on_disk.len();
            if recorded + started.len() > SLOTS {
                return Err(TdeError::Invalid(format!(
                    "too many relation files would be re-keyed at once ({recorded} recorded, {} more; at most {SLOTS})",
                    started.len()
                )));
            }
            let op = StateOp::Start(started);
            crate::rmgr::log_rekey_op(db, &op);
            // Logged: the standbys and crash recovery have these new keys now, so the
            // primary must too (a retry would seal other ones).
            if let Err(e) = apply_op_locked(db, &op) {
                pgrx::ereport!(
                    PgLogLevel::PANIC,
                    PgSqlErrorCode::ERRCODE_IO_ERROR,
                    format!("pg_tde: could not record the start of a re-keying in database {db}: {e}")
                );
            }
            Ok(())
        })?;
    }
    // Every file with a record now, with its shared-memory slot (the walk moves its
    // frontier).
    let mut work = Vec::new();
    for target in targets {
        if let Some((record, _)) = record_of(target.id)? {
            set_progress(target.id, target.relid.to_u32(), 0, 0, 0);
            work.push((target, record));
        }
    }
    Ok(work)
}

/// Finish a file whose frontier has passed every fork.
fn finish_file(id: FileId, record: &RekeyRecord) -> Result<()> {
    let change = match &record.new_entry {
        Some(e) => MapChange::Put(e.clone()),
        None => MapChange::Remove { spc: id.spc, rel: id.rel },
    };
    let op = StateOp::Finish { spc: id.spc, rel: id.rel, change };
    keys::with_key_files_lock(|| {
        crate::rmgr::log_rekey_op(id.db, &op);
        apply_op_locked(id.db, &op)
    })
}

/// Throttle: cost per block written, sleep when the limit is reached (like VACUUM).
struct Throttle {
    cost: i64,
}

impl Throttle {
    fn charge(&mut self, blocks: u32) {
        let delay = crate::gucs::REKEY_COST_DELAY.get();
        if delay <= 0 {
            return;
        }
        self.cost += i64::from(blocks) * 20;
        let limit = i64::from(crate::gucs::REKEY_COST_LIMIT.get().max(1));
        if self.cost >= limit {
            let ms = (i64::from(delay) * self.cost / limit).min(i64::from(delay) * 4);
            self.cost = 0;
            // Sleep in small steps, answering cancellation.
            let mut left = ms;
            while left > 0 {
                let step = left.min(100);
                std::thread::sleep(Duration::from_millis(step as u64));
                left -= step;
                pgrx::check_for_interrupts!();
            }
        }
    }
}

/// Walk one file from its frontier to the end of its last fork.
fn walk_file(target: &Target, mut record: RekeyRecord, throttle: &mut Throttle) -> Result<()> {
    let id = target.id;
    // SAFETY: the table is locked SHARE UPDATE EXCLUSIVE by the caller, which keeps
    // this relation (the table or one of its dependents) in place; NoLock opens it.
    let rel = unsafe { pg_sys::relation_open(target.relid, pg_sys::NoLock as pg_sys::LOCKMODE) };
    let result = (|| -> Result<()> {
        let total: u64 = (0..FORKS).filter(|&f| fork_exists(rel, f)).map(|f| u64::from(nblocks(rel, f))).sum();
        let mut frontier = record.frontier;
        let mut fork_size_at_start: Option<(u8, u32)> = None;
        while frontier.fork < FORKS {
            pgrx::check_for_interrupts!();
            let fork = frontier.fork;
            let n = if fork_exists(rel, fork) { nblocks(rel, fork) } else { 0 };
            if frontier.block < n {
                let (start, end) = (frontier.block, (frontier.block + BATCH).min(n));
                let end = rekey_batch(rel, id, fork, start, end)?;
                let size_at_start = match fork_size_at_start {
                    Some((f, size)) if f == fork => size,
                    _ => {
                        fork_size_at_start = Some((fork, n));
                        n
                    }
                };
                frontier = Frontier { fork, block: end };
                let before: u64 = (0..fork).filter(|&f| fork_exists(rel, f)).map(|f| u64::from(nblocks(rel, f))).sum();
                set_progress(id, target.relid.to_u32(), 1, before + u64::from(end), total);
                // The throttle paces the walk through the fork as it was when its
                // walk began; the blocks appended meanwhile are walked at full speed,
                // or a table growing faster than the throttled walk would never be
                // done.
                throttle.charge(end.min(size_at_start).saturating_sub(start));
                crate::gucs::crash_point("rekey_batch");
                continue;
            }
            // The fork is done up to its end (or does not exist): move on to the next
            // under the extension lock, which also creates forks, so that nothing is
            // appended or created under the old key meanwhile.  Hash indexes extend
            // their main fork without that lock (EB_SKIP_EXTENSION_LOCK, and
            // smgrextend of a whole splitpoint) but always under an exclusive lock
            // of their metapage, which is therefore held too.
            let hash_meta = (fork == pg_sys::ForkNumber::MAIN_FORKNUM as u8 && is_hash_index(rel) && n > 0)
                .then(|| lock_hash_metapage(rel));
            // SAFETY: rel is open; the lock is released below.
            unsafe { pg_sys::LockRelationForExtension(rel, pg_sys::ExclusiveLock as pg_sys::LOCKMODE) };
            let n_now = if fork_exists(rel, fork) { nblocks(rel, fork) } else { 0 };
            if n_now <= frontier.block {
                let next = Frontier { fork: fork + 1, block: 0 };
                log_frontier_only(id, next);
                frontier = next;
            }
            // SAFETY: taken above.
            unsafe { pg_sys::UnlockRelationForExtension(rel, pg_sys::ExclusiveLock as pg_sys::LOCKMODE) };
            if let Some(buffer) = hash_meta {
                // SAFETY: locked and pinned by lock_hash_metapage.
                unsafe { pg_sys::UnlockReleaseBuffer(buffer) };
            }
        }
        record.frontier = frontier;
        crate::gucs::crash_point("rekey_before_finish");
        finish_file(id, &record)
    })();
    // SAFETY: opened above.
    unsafe { pg_sys::relation_close(rel, pg_sys::NoLock as pg_sys::LOCKMODE) };
    result
}

fn is_hash_index(rel: pg_sys::Relation) -> bool {
    // SAFETY: rel is open; rd_rel is its pg_class row.
    unsafe { (*(*rel).rd_rel).relkind as u8 == pg_sys::RELKIND_INDEX && (*(*rel).rd_rel).relam == pg_sys::HASH_AM_OID }
}

/// Pin and share-lock block 0 of a hash index, its metapage (see `walk_file`).
fn lock_hash_metapage(rel: pg_sys::Relation) -> pg_sys::Buffer {
    // SAFETY: rel is open and has a block 0 (the caller checked the fork's size);
    // ReadBuffer and LockBuffer raise ERROR through the guard, with nothing held.
    unsafe {
        crate::ffi::guarded(|| {
            let buffer = pg_sys::ReadBuffer(rel, 0);
            pg_sys::LockBuffer(buffer, pg_sys::BUFFER_LOCK_SHARE as i32);
            buffer
        })
    }
}

fn fork_exists(rel: pg_sys::Relation, fork: u8) -> bool {
    // SAFETY: rel is open.
    unsafe { pg_sys::smgrexists(pg_sys::RelationGetSmgr(rel), fork as pg_sys::ForkNumber::Type) }
}

fn nblocks(rel: pg_sys::Relation, fork: u8) -> u32 {
    // SAFETY: rel is open and the fork exists.
    unsafe { pg_sys::RelationGetNumberOfBlocksInFork(rel, fork as pg_sys::ForkNumber::Type) }
}

fn set_page_lsn(page: pg_sys::Page, lsn: pg_sys::XLogRecPtr) {
    // SAFETY: page is a locked shared buffer's page; pd_lsn is its first field.
    unsafe {
        let header = page as *mut pg_sys::PageHeaderData;
        (*header).pd_lsn = pg_sys::PageXLogRecPtr { xlogid: (lsn >> 32) as u32, xrecoff: lsn as u32 };
    }
}

/// Move the frontier over blocks `[start, end)` of `fork`, or the first part of
/// them: lock them, log their images with the new frontier, move it, release
/// them.  Returns where the frontier is now.  The first block is locked waiting;
/// the others only if they are free at once (the batch ends before the first that
/// is not), as other backends lock pages in other orders (index splits, hash
/// metapages) and a wait there could deadlock.
fn rekey_batch(rel: pg_sys::Relation, id: FileId, fork: u8, start: u32, end: u32) -> Result<u32> {
    let mut buffers = Vec::with_capacity((end - start) as usize);
    // SAFETY: rel is open; every buffer pinned here is locked, logged and released
    // below; the critical section contains no call that can fail but XLogInsert and
    // the state file's write, whose failure there is a PANIC (recovery then replays
    // the record).
    unsafe {
        for block in start..end {
            let buf = pg_sys::ReadBufferExtended(
                rel,
                fork as pg_sys::ForkNumber::Type,
                block,
                pg_sys::ReadBufferMode::RBM_NORMAL,
                std::ptr::null_mut(),
            );
            if buffers.is_empty() {
                pg_sys::LockBuffer(buf, pg_sys::BUFFER_LOCK_EXCLUSIVE as i32);
            } else if !pg_sys::ConditionalLockBuffer(buf) {
                pg_sys::ReleaseBuffer(buf);
                break;
            }
            buffers.push(buf);
        }
        let end = start + buffers.len() as u32;
        let frontier = Frontier { fork, block: end };
        pg_sys::XLogEnsureRecordSpace(buffers.len() as i32, 0);
        pg_sys::XLogBeginInsert();
        let payload = crate::rmgr::batch_payload(id, frontier);
        pg_sys::XLogRegisterData(payload.as_ptr() as _, payload.len() as u32);
        for (i, &buf) in buffers.iter().enumerate() {
            pg_sys::XLogRegisterBuffer(i as u8, buf, pg_sys::REGBUF_FORCE_IMAGE as u8);
        }
        pg_sys::CritSectionCount += 1;
        for &buf in &buffers {
            pg_sys::MarkBufferDirty(buf);
        }
        let lsn = pg_sys::XLogInsert(crate::rmgr::RM_TDE_ID, crate::rmgr::XLOG_TDE_REKEY_BATCH);
        for &buf in &buffers {
            let page = pg_sys::BufferGetPage(buf);
            if !pg_sys::PageIsNew(page) {
                set_page_lsn(page, lsn);
            }
        }
        pg_sys::XLogFlush(lsn);
        move_frontier(id, frontier);
        pg_sys::CritSectionCount -= 1;
        for buf in buffers {
            pg_sys::UnlockReleaseBuffer(buf);
        }
        Ok(end)
    }
}

/// Move the frontier past a fork with no blocks left (no images), under the
/// relation's extension lock.
fn log_frontier_only(id: FileId, frontier: Frontier) {
    // SAFETY: a record without block references; the critical section turns a
    // failure to record the frontier into a PANIC (recovery replays the record).
    unsafe {
        pg_sys::XLogBeginInsert();
        let payload = crate::rmgr::batch_payload(id, frontier);
        pg_sys::XLogRegisterData(payload.as_ptr() as _, payload.len() as u32);
        let lsn = pg_sys::XLogInsert(crate::rmgr::RM_TDE_ID, crate::rmgr::XLOG_TDE_REKEY_BATCH);
        pg_sys::XLogFlush(lsn);
        pg_sys::CritSectionCount += 1;
        move_frontier(id, frontier);
        pg_sys::CritSectionCount -= 1;
    }
}

/// Record a new frontier in the state file, then in shared memory.  Called in a
/// critical section after its WAL record is flushed: a failure is a PANIC.
fn move_frontier(id: FileId, frontier: Frontier) {
    if let Err(e) = write_frontier(id, frontier) {
        pgrx::ereport!(
            PgLogLevel::PANIC,
            PgSqlErrorCode::ERRCODE_IO_ERROR,
            format!("pg_tde: could not record the re-keying frontier of {}/{}/{}: {e}", id.spc, id.db, id.rel)
        );
    }
    set_frontier(id, frontier);
}

fn write_frontier(id: FileId, frontier: Frontier) -> Result<()> {
    let path = rekey_path(id.db);
    keys::with_key_files_lock(|| {
        let mut records = state::read(&path)?;
        match records.iter_mut().find(|r| r.spc_oid == id.spc && r.rel_number == id.rel) {
            Some(r) if frontier > r.frontier => r.frontier = frontier,
            _ => return Ok(()),
        }
        state::write(&path, &records)
    })
}

// ---------------------------------------------------------------------------
// SQL

fn spi_failed(e: pgrx::spi::SpiError) -> ! {
    raise_with(PgSqlErrorCode::ERRCODE_INTERNAL_ERROR, &format!("catalog query failed: {e}"), None)
}

fn run(relation: pg_sys::Oid, mode: RekeyMode, wait: bool) {
    crate::api::require_key_admin(&format!("{} a relation online", mode.name()));
    if !wait {
        start_worker(relation, mode);
        return;
    }
    walk_relation(relation, mode, false);
}

/// Run the walk in a background worker connected to this database as this user,
/// and return at once (`wait => false`).
fn start_worker(relation: pg_sys::Oid, mode: RekeyMode) {
    // SAFETY: plain reads of backend globals.
    let (db, user) = unsafe { ((&raw const pg_sys::MyDatabaseId).read(), pg_sys::GetUserId()) };
    let started = launch_worker(db.to_u32(), user.to_u32(), relation.to_u32(), mode, false);
    if started.is_err() {
        raise_with(
            PgSqlErrorCode::ERRCODE_CONFIGURATION_LIMIT_EXCEEDED,
            "could not start a background worker for the re-keying",
            Some("Raise max_worker_processes, or call the function with wait => true."),
        );
    }
}

/// Start a re-keying worker connected to `db` as `user`: for `relation`, or with
/// relation 0 for the resuming of every table of the database.
fn launch_worker(db: u32, user: u32, relation: u32, mode: RekeyMode, resume: bool) -> std::result::Result<(), ()> {
    let extra = format!("{db} {user} {relation} {} {}", mode as u8, u8::from(resume));
    pgrx::bgworkers::BackgroundWorkerBuilder::new("pg_tde re-keying")
        .set_type("pg_tde re-keying")
        .set_library("pg_tde")
        .set_function("pg_tde_rekey_worker_main")
        .enable_spi_access()
        .set_extra(&extra)
        .set_restart_time(None)
        .load_dynamic()
        .map(|_| ())
        .map_err(|_| ())
}

#[pg_guard]
#[unsafe(no_mangle)]
pub extern "C-unwind" fn pg_tde_rekey_worker_main(_arg: pg_sys::Datum) {
    use pgrx::bgworkers::BackgroundWorker;
    // SIGTERM (pg_terminate_backend, shutdown) as in a backend: the walk stops at
    // its next interrupt check, between batches, and a later call continues.
    // SAFETY: installs PostgreSQL's own handler, then unblocks signals.
    unsafe {
        #[cfg(feature = "pg18")]
        pg_sys::pqsignal_be(pg_sys::SIGTERM as i32, Some(crate::ffi::die));
        #[cfg(not(feature = "pg18"))]
        pg_sys::pqsignal(pg_sys::SIGTERM as i32, Some(crate::ffi::die));
        pg_sys::BackgroundWorkerUnblockSignals();
    }
    let parts: Vec<u32> = BackgroundWorker::get_extra().split(' ').filter_map(|p| p.parse().ok()).collect();
    let [db, user, relation, mode, resume] = parts[..] else {
        pgrx::warning!("pg_tde re-keying worker started without its arguments");
        return;
    };
    let mode = match mode {
        1 => RekeyMode::Rotate,
        2 => RekeyMode::Encrypt,
        _ => RekeyMode::Decrypt,
    };
    BackgroundWorker::connect_worker_to_spi_by_oid(Some(pg_sys::Oid::from(db)), Some(pg_sys::Oid::from(user)));
    if relation == 0 {
        resume_database(db);
        return;
    }
    let walked = BackgroundWorker::transaction(|| walk_relation(pg_sys::Oid::from(relation), mode, resume == 1));
    if walked > 0 || resume == 0 {
        pgrx::log!("pg_tde: {} of relation {relation} finished ({walked} files)", mode.name());
    }
}

// ---------------------------------------------------------------------------
// Resuming after a restart, a crash or a promotion

/// Called by the key checker once a second: the first time the server accepts
/// writes, start a worker for every database with an unfinished re-keying
/// (`pg_tde.rekey_resume`).  Once per server start or crash (a flag in shared
/// memory, which both set up anew), whatever happens to the key checker itself.
pub fn resume_interrupted() {
    // SAFETY: reads shared recovery state.
    if !crate::gucs::REKEY_RESUME.get() || unsafe { pg_sys::RecoveryInProgress() } {
        return;
    }
    if RESUMED.get().swap(true, std::sync::atomic::Ordering::AcqRel) {
        return;
    }
    let Ok(dbs) = keys::databases_with_file("_rekey") else { return };
    for db in dbs {
        match state::read(&rekey_path(db)) {
            Ok(records) if records.is_empty() => continue,
            Ok(records) => {
                pgrx::log!("pg_tde: resuming the online re-keying of {} files of database {db}", records.len())
            }
            Err(e) => {
                pgrx::warning!("pg_tde: cannot resume the online re-keying of database {db}: {e}");
                continue;
            }
        }
        let started = launch_worker(db, pg_sys::BOOTSTRAP_SUPERUSERID, 0, RekeyMode::Rotate, true);
        if started.is_err() {
            pgrx::warning!(
                "pg_tde: no background worker free to resume the online re-keying of database {db}; \
                 call the re-keying function again, or raise max_worker_processes"
            );
        }
    }
}

/// The resuming worker of a database: one worker per table whose files have
/// records, which continues only those files (a failure stops that table only).
fn resume_database(db: u32) {
    use pgrx::bgworkers::BackgroundWorker;
    let records = match state::read(&rekey_path(db)) {
        Ok(r) => r,
        Err(e) => {
            pgrx::warning!("pg_tde: cannot resume the online re-keying of database {db}: {e}");
            return;
        }
    };
    let tables = BackgroundWorker::transaction(|| {
        let mut tables: Vec<(u32, RekeyMode)> = Vec::new();
        for r in &records {
            match table_of_file(r.spc_oid, r.rel_number) {
                Some(t) if !tables.iter().any(|(x, _)| *x == t) => tables.push((t, r.mode)),
                Some(_) => {}
                None => pgrx::warning!(
                    "pg_tde: relation file {}/{db}/{} is recorded as being re-keyed but belongs to no table",
                    r.spc_oid,
                    r.rel_number
                ),
            }
        }
        tables
    });
    for (table, mode) in tables {
        pgrx::log!("pg_tde: resuming the online {} of relation {table} (if still unfinished)", mode.name());
        if launch_worker(db, pg_sys::BOOTSTRAP_SUPERUSERID, table, mode, true).is_err() {
            pgrx::warning!(
                "pg_tde: no background worker free to resume the online {} of relation {table}; \
                 call the function again, or raise max_worker_processes",
                mode.name()
            );
        }
    }
}

/// The table (or materialized view) a relation file belongs to: itself, the owner
/// of its TOAST table, the table of its index, or the owner of its sequence.
fn table_of_file(spc: u32, rel: u32) -> Option<u32> {
    let sql = format!(
        "WITH f AS (SELECT pg_catalog.pg_filenode_relation({spc}, {rel}) AS oid),
              o AS (SELECT CASE c.relkind
                             WHEN 'i' THEN (SELECT i.indrelid FROM pg_catalog.pg_index i WHERE i.indexrelid = c.oid)
                             WHEN 'S' THEN (SELECT d.refobjid FROM pg_catalog.pg_depend d
                                             WHERE d.classid = 'pg_catalog.pg_class'::regclass AND d.objid = c.oid
                                               AND d.refclassid = 'pg_catalog.pg_class'::regclass
                                               AND d.deptype IN ('a', 'i') LIMIT 1)
                             ELSE c.oid END AS oid
                      FROM pg_catalog.pg_class c JOIN f ON c.oid = f.oid)
         SELECT coalesce((SELECT t.oid FROM pg_catalog.pg_class t JOIN o ON t.reltoastrelid = o.oid), o.oid) FROM o"
    );
    Spi::get_one::<pg_sys::Oid>(&sql).ok().flatten().map(|o| o.to_u32())
}

/// Walk the files of a table; `resume_only` for the resuming worker.  Returns the
/// number of files walked.
fn walk_relation(relation: pg_sys::Oid, mode: RekeyMode, resume_only: bool) -> usize {
    // SAFETY: reads shared recovery state.
    if unsafe { pg_sys::RecoveryInProgress() } {
        raise_with(
            PgSqlErrorCode::ERRCODE_READ_ONLY_SQL_TRANSACTION,
            "relations cannot be re-keyed during recovery",
            Some("Re-key on the primary: standbys replay it."),
        );
    }
    if mode == RekeyMode::Decrypt && crate::gucs::ENFORCE_ENCRYPTION.get() {
        raise_with(
            PgSqlErrorCode::ERRCODE_INSUFFICIENT_PRIVILEGE,
            "cannot decrypt a relation while pg_tde.enforce_encryption is on",
            None,
        );
    }
    // SAFETY: takes the lock VACUUM takes; held to the end of the transaction.
    // The resuming worker waits like any session (autovacuum gives way to it); a
    // session that was walking the table meanwhile has finished it then.
    unsafe { pg_sys::LockRelationOid(relation, pg_sys::ShareUpdateExclusiveLock as pg_sys::LOCKMODE) };
    // The resuming worker continues only a walk that left records: none when the
    // table is gone (it has no files then) or someone else finished the walk.
    if resume_only && files_of(relation).iter().all(|t| record_of(t.id).ok().flatten().is_none()) {
        return 0;
    }
    let is_tde = crate::am::is_tde_heap_oid(relation);
    let relkind = Spi::get_one::<String>(&format!(
        "SELECT relkind::text FROM pg_catalog.pg_class WHERE oid = {}",
        relation.to_u32()
    ))
    .unwrap_or_else(|e| spi_failed(e))
    .unwrap_or_default();
    if relkind != "r" && relkind != "m" {
        raise_with(
            PgSqlErrorCode::ERRCODE_WRONG_OBJECT_TYPE,
            "only tables and materialized views can be re-keyed",
            None,
        );
    }
    match mode {
        RekeyMode::Rotate | RekeyMode::Decrypt if !is_tde => raise_with(
            PgSqlErrorCode::ERRCODE_WRONG_OBJECT_TYPE,
            "the relation is not a tde_heap table",
            Some("Use pg_tde_encrypt_relation() to encrypt it."),
        ),
        RekeyMode::Encrypt if is_tde => {
            raise_with(PgSqlErrorCode::ERRCODE_WRONG_OBJECT_TYPE, "the relation is already a tde_heap table", None)
        }
        _ => {}
    }
    let targets = files_of(relation);
    if let Some(t) = targets.iter().find(|t| t.persistence != pg_sys::RELPERSISTENCE_PERMANENT) {
        let _ = t;
        raise_with(
            PgSqlErrorCode::ERRCODE_FEATURE_NOT_SUPPORTED,
            "only permanent (logged) relations can be re-keyed online",
            Some("Unlogged and temporary tables are rewritten with VACUUM FULL instead."),
        );
    }
    let mut throttle = Throttle { cost: 0 };
    // From here an ERROR (cancel, timeout, failure) marks the files interrupted.
    WALKING.with(|w| *w.borrow_mut() = targets.iter().map(|t| t.id).collect());
    let work = start_files(&targets, mode).or_raise();
    let walked = work.len();
    for (target, record) in work {
        set_progress(target.id, target.relid.to_u32(), 1, 0, 0);
        if let Err(e) = walk_file(target, record, &mut throttle) {
            crate::errors::raise(e);
        }
    }
    WALKING.with(|w| w.borrow_mut().clear());
    if mode != RekeyMode::Rotate {
        switch_access_method(relation, mode == RekeyMode::Encrypt);
    }
    let event = match mode {
        RekeyMode::Rotate => "relation_key_rotated",
        RekeyMode::Encrypt => "relation_encrypted",
        RekeyMode::Decrypt => "relation_decrypted",
    };
    crate::audit::record(
        crate::audit::AuditEvent::new(event).detail(format!("relation {} ({walked} files)", relation.to_u32())),
    );
    walked
}

thread_local! {
    /// The files this backend is walking (see `mark_walk_interrupted`).
    static WALKING: std::cell::RefCell<Vec<FileId>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Register the abort callback (in `_PG_init`, for every process).
pub fn init() {
    // SAFETY: registers a callback with a static lifetime and no argument.
    unsafe { pg_sys::RegisterXactCallback(Some(mark_walk_interrupted), std::ptr::null_mut()) };
}

/// A walk ended by an ERROR (cancel, timeout, failure): its files show as
/// interrupted at once.  At abort, after the LWLocks were released.
#[pg_guard]
unsafe extern "C-unwind" fn mark_walk_interrupted(event: pg_sys::XactEvent::Type, _arg: *mut std::ffi::c_void) {
    if !matches!(event, pg_sys::XactEvent::XACT_EVENT_ABORT | pg_sys::XactEvent::XACT_EVENT_COMMIT) {
        return;
    }
    let files = WALKING.with(|w| std::mem::take(&mut *w.borrow_mut()));
    if files.is_empty() || event != pg_sys::XactEvent::XACT_EVENT_ABORT {
        return;
    }
    let mut table = REKEY.exclusive();
    for s in table.slots.iter_mut().filter(|s| files.iter().any(|&id| s.is(id))) {
        s.state = 2;
    }
}

/// Make the table (and its TOAST table) `tde_heap` or `heap`, under a brief
/// ACCESS EXCLUSIVE lock: their files are all under the matching keys by now.
fn switch_access_method(relation: pg_sys::Oid, to_tde: bool) {
    // SAFETY: upgrades the lock; held to the end of the transaction.
    unsafe { pg_sys::LockRelationOid(relation, pg_sys::AccessExclusiveLock as pg_sys::LOCKMODE) };
    let am = if to_tde { "tde_heap" } else { "heap" };
    Spi::run(&format!(
        "UPDATE pg_catalog.pg_class SET relam = (SELECT oid FROM pg_catalog.pg_am WHERE amname = '{am}')
          WHERE oid = {t} OR oid = (SELECT reltoastrelid FROM pg_catalog.pg_class WHERE oid = {t})",
        t = relation.to_u32()
    ))
    .unwrap_or_else(|e| spi_failed(e));
    // SAFETY: invalidates the relcache entries of the relation (and, through the
    // catalog update, of the TOAST table).
    unsafe { pg_sys::CacheInvalidateRelcacheByRelid(relation) };
}

#[pg_extern(
    sql = "CREATE FUNCTION pg_tde_rotate_relation_key(rel regclass, wait boolean DEFAULT true) RETURNS void STRICT LANGUAGE c AS 'MODULE_PATHNAME', 'rotate_relation_key_wrapper';"
)]
fn rotate_relation_key(rel: pg_sys::Oid, wait: bool) {
    run(rel, RekeyMode::Rotate, wait)
}

#[pg_extern(
    sql = "CREATE FUNCTION pg_tde_encrypt_relation(rel regclass, wait boolean DEFAULT true) RETURNS void STRICT LANGUAGE c AS 'MODULE_PATHNAME', 'encrypt_relation_wrapper';"
)]
fn encrypt_relation(rel: pg_sys::Oid, wait: bool) {
    run(rel, RekeyMode::Encrypt, wait)
}

#[pg_extern(
    sql = "CREATE FUNCTION pg_tde_decrypt_relation(rel regclass, wait boolean DEFAULT true) RETURNS void STRICT LANGUAGE c AS 'MODULE_PATHNAME', 'decrypt_relation_wrapper';"
)]
fn decrypt_relation(rel: pg_sys::Oid, wait: bool) {
    run(rel, RekeyMode::Decrypt, wait)
}

/// Files being re-keyed: relation, file, fork and block of the frontier, progress.
#[pg_extern(name = "pg_tde_rekey_status")]
#[allow(clippy::type_complexity)]
fn rekey_status() -> TableIterator<
    'static,
    (
        name!(database_oid, pg_sys::Oid),
        name!(relation_oid, Option<pg_sys::Oid>),
        name!(relfilenode, pg_sys::Oid),
        name!(tablespace_oid, pg_sys::Oid),
        name!(mode, String),
        name!(state, String),
        name!(fork, i32),
        name!(block, i64),
        name!(blocks_done, i64),
        name!(blocks_total, i64),
    ),
> {
    let mode_name = |m: u8| match m {
        1 => "rotate",
        2 => "encrypt",
        _ => "decrypt",
    };
    // SAFETY: reads shared recovery state.
    let in_recovery = unsafe { pg_sys::RecoveryInProgress() };
    let mut rows = {
        let table = REKEY.share();
        table
            .slots
            .iter()
            .filter(|s| s.in_use)
            .map(|s| {
                let f = Frontier::from_u64(s.frontier);
                // SAFETY: looks a process up in the proc array.
                let alive = s.pid != 0 && unsafe { !pg_sys::BackendPidGetProc(s.pid).is_null() };
                // A file is waiting while the walk of an earlier file of its table goes
                // on; with no live walker it was interrupted (cancel, error, restart),
                // and on a standby it is replayed.
                let state = match s.state {
                    _ if in_recovery => "replaying",
                    1 if alive => "running",
                    0 if alive => "waiting",
                    _ => "interrupted",
                };
                (
                    pg_sys::Oid::from(s.db),
                    (s.relid != 0).then(|| pg_sys::Oid::from(s.relid)),
                    pg_sys::Oid::from(s.rel),
                    pg_sys::Oid::from(s.spc),
                    mode_name(s.mode).to_string(),
                    state.to_string(),
                    i32::from(f.fork),
                    i64::from(f.block),
                    s.done as i64,
                    s.total as i64,
                )
            })
            .collect::<Vec<_>>()
    };
    // Recorded files that no process has looked at since the server started.
    let recorded = all_records().unwrap_or_else(|e| {
        pgrx::warning!("pg_tde: {e}");
        Vec::new()
    });
    for (db, r) in recorded {
        if rows.iter().any(|row| row.0.to_u32() == db && row.2.to_u32() == r.rel_number && row.3.to_u32() == r.spc_oid)
        {
            continue;
        }
        rows.push((
            pg_sys::Oid::from(db),
            None,
            pg_sys::Oid::from(r.rel_number),
            pg_sys::Oid::from(r.spc_oid),
            mode_name(r.mode as u8).to_string(),
            (if in_recovery { "replaying" } else { "interrupted" }).to_string(),
            i32::from(r.frontier.fork),
            i64::from(r.frontier.block),
            0,
            0,
        ));
    }
    TableIterator::new(rows)
}

pgrx::extension_sql!(
    r#"
CREATE VIEW pg_tde_rekey_progress AS
SELECT d.datname AS database,
       coalesce(s.relation_oid,
                CASE WHEN d.datname = current_database()
                     THEN pg_catalog.pg_filenode_relation(s.tablespace_oid, s.relfilenode) END)::regclass AS relation,
       s.relfilenode, s.mode, s.state,
       s.fork, s.block, s.blocks_done, s.blocks_total
  FROM pg_tde_rekey_status() s LEFT JOIN pg_catalog.pg_database d ON d.oid = s.database_oid;
REVOKE ALL ON pg_tde_rekey_progress FROM PUBLIC;
"#,
    name = "pg_tde_rekey_progress_view",
    requires = [rekey_status]
);
