//! Periodic verification of principal keys: fail closed when a KMS revokes a key,
//! resume when it returns.
//!
//! The background worker `pg_tde key checker` asks the provider of every principal key in
//! use (each database's, the default and the server key) every
//! `pg_tde.key_check_interval` seconds; `pg_tde_check_keys()` runs the same check at
//! once. For a wrapping provider the check is a KMS unwrap (`verify` for an adapter)
//! of the envelope, followed by a re-wrap when the KMS key has a newer version; for a
//! storing provider it fetches the key and compares it with the key map's check value.
//!
//! - The KMS says no ([`TdeError::Refused`]: revoked, disabled, deleted, expired,
//!   permission removed; or another key under the same name): the key is *revoked* here.
//!   Access to the affected tables is refused at once (the `tde_heap` access method
//!   checks before every scan and insert), then a checkpoint writes the dirty pages with
//!   the keys still cached (nothing is lost), and then the cached principal key is zeroed
//!   and every process drops the relation keys it unwrapped.
//! - The KMS cannot be reached ([`TdeError::Provider`]): the key stays in use with a
//!   warning, for `pg_tde.key_unreachable_grace` seconds (-1: without limit), after which
//!   it is treated as revoked.
//! - A later check that succeeds ends either state: access resumes without a restart.
//!
//! The states live in shared memory and show in `pg_tde_key_state()` and the
//! `key_state` column of the `pg_tde_*key_info()` functions. The server key is
//! checked and reported the same way, but its cached copy is kept: WAL writes need it
//! inside critical sections. Instead, while it is revoked and the WAL is encrypted,
//! transactions that wrote are refused at commit.

use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use pgrx::bgworkers::{BackgroundWorker, BackgroundWorkerBuilder, BgWorkerStartTime, SignalWakeFlags};
use pgrx::lwlock::PgLwLock;
use pgrx::prelude::*;
use pgrx::shmem::PGRXSharedMemory;
use pgrx::{pg_shmem_init, PgAtomic, PgTryBuilder};
use tde_core::keymap::{KeyMapHeader, PrincipalRef};
use tde_core::TdeError;

use crate::audit::{self, AuditEvent};
use crate::keys;

const SLOTS: usize = 128;
const NAME_LEN: usize = 256;
const MESSAGE_LEN: usize = 512;

/// What the last check found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum KeyState {
    Ok = 0,
    /// The provider could not be reached; the key is still used.
    Unreachable = 1,
    /// The KMS refused the key (or it was unreachable beyond the grace): not used.
    Revoked = 2,
}

impl KeyState {
    pub fn name(self) -> &'static str {
        match self {
            KeyState::Ok => "ok",
            KeyState::Unreachable => "unreachable",
            KeyState::Revoked => "revoked",
        }
    }
}

#[derive(Clone, Copy)]
#[repr(C)]
pub struct StateSlot {
    in_use: bool,
    state: u8,
    /// Whether a revoked state refuses access (not for the server key, which WAL
    /// writes need inside critical sections).
    enforced: bool,
    /// Whether the dirty pages were written since the key was revoked: until then
    /// the key still serves the page writes (only SQL access is refused).
    drained: bool,
    provider_id: i32,
    name_len: u16,
    name: [u8; NAME_LEN],
    /// When the current state began (TimestampTz).
    since: i64,
    /// When the key was last checked (TimestampTz).
    checked: i64,
    message_len: u16,
    message: [u8; MESSAGE_LEN],
}

#[derive(Clone, Copy)]
#[repr(C)]
pub struct KeyStates {
    slots: [StateSlot; SLOTS],
}

impl Default for KeyStates {
    fn default() -> Self {
        let empty = StateSlot {
            in_use: false,
            state: 0,
            enforced: false,
            drained: false,
            provider_id: 0,
            name_len: 0,
            name: [0; NAME_LEN],
            since: 0,
            checked: 0,
            message_len: 0,
            message: [0; MESSAGE_LEN],
        };
        KeyStates { slots: [empty; SLOTS] }
    }
}

// SAFETY: plain old data with no pointers; valid in any process that maps it.
unsafe impl PGRXSharedMemory for KeyStates {}

static KEY_STATES: PgLwLock<KeyStates> = unsafe { PgLwLock::new(c"pg_tde_key_states") };
/// How many keys are revoked: the access checks on the page and scan paths read only
/// this while no key is.
static REVOKED_KEYS: PgAtomic<AtomicU32> = unsafe { PgAtomic::new(c"pg_tde_revoked_keys") };

/// 1 while the server key is revoked: committing a transaction that wrote is
/// refused while the WAL is encrypted (see [`refuse_writes_without_server_key`]).
static SERVER_KEY_REVOKED: PgAtomic<AtomicU32> = unsafe { PgAtomic::new(c"pg_tde_server_key_revoked") };

pub fn init_shmem() {
    pg_shmem_init!(KEY_STATES);
    pg_shmem_init!(REVOKED_KEYS);
    pg_shmem_init!(SERVER_KEY_REVOKED);
}

/// Register the commit check (in `_PG_init`, for every process).
pub fn init() {
    // SAFETY: registers a callback with a static lifetime and no argument.
    unsafe { pg_sys::RegisterXactCallback(Some(refuse_writes_without_server_key), std::ptr::null_mut()) };
}

/// While the server key is revoked and the WAL is encrypted, a transaction that
/// wrote anything may not commit: the server key wraps the WAL keys, and the KMS
/// said it may no longer be used.  The refusal comes before the commit record (an
/// ERROR at pre-commit aborts the transaction cleanly); the WAL keys in memory keep
/// serving the abort records, vacuum and checkpoints, so nothing runs into a
/// missing key inside a critical section.
#[pg_guard]
unsafe extern "C-unwind" fn refuse_writes_without_server_key(
    event: pg_sys::XactEvent::Type,
    _arg: *mut std::ffi::c_void,
) {
    let pre_commit = matches!(
        event,
        pg_sys::XactEvent::XACT_EVENT_PRE_COMMIT
            | pg_sys::XactEvent::XACT_EVENT_PARALLEL_PRE_COMMIT
            | pg_sys::XactEvent::XACT_EVENT_PRE_PREPARE
    );
    if !pre_commit || SERVER_KEY_REVOKED.get().load(Ordering::Acquire) == 0 || !crate::wal::WAL_ENCRYPT.get() {
        return;
    }
    // SAFETY: reads the current transaction's state.
    let wrote = unsafe { pg_sys::GetTopTransactionIdIfAny() } != pg_sys::InvalidTransactionId;
    if wrote {
        crate::errors::raise_with(
            pgrx::PgSqlErrorCode::ERRCODE_EXTERNAL_ROUTINE_EXCEPTION,
            "the server key is revoked: transactions that write cannot commit while the WAL is encrypted",
            Some("Writes resume when the key check (pg_tde_check_keys()) finds the server key usable again."),
        );
    }
}

impl StateSlot {
    fn matches(&self, r: &PrincipalRef) -> bool {
        self.in_use && self.provider_id == r.provider_id && &self.name[..self.name_len as usize] == r.name.as_bytes()
    }

    fn message(&self) -> String {
        String::from_utf8_lossy(&self.message[..self.message_len as usize]).into_owned()
    }
}

/// The state of a principal key: (state, since, last checked, message).
pub fn state_of(r: &PrincipalRef) -> Option<(KeyState, i64, i64, String)> {
    let states = KEY_STATES.share();
    let slot = states.slots.iter().find(|s| s.matches(r))?;
    let state = match slot.state {
        1 => KeyState::Unreachable,
        2 => KeyState::Revoked,
        _ => KeyState::Ok,
    };
    Some((state, slot.since, slot.checked, slot.message()))
}

/// Why a principal key may not be used at all (for a page read or write), if it is
/// revoked and the dirty pages it encrypts have been written.
pub fn refusal(r: &PrincipalRef) -> Option<TdeError> {
    if exempt_process() {
        return None;
    }
    refusal_of(r, true)
}

fn refusal_of(r: &PrincipalRef, drained_only: bool) -> Option<TdeError> {
    if REVOKED_KEYS.get().load(Ordering::Acquire) == 0 {
        return None;
    }
    let enforced = KEY_STATES.share().slots.iter().any(|s| s.matches(r) && s.enforced && (s.drained || !drained_only));
    match state_of(r)? {
        (KeyState::Revoked, since, _, message) if enforced => Some(TdeError::Refused(format!(
            "principal key \"{}\" of key provider {} is revoked (since {}): {message}; access resumes when the key check succeeds again",
            r.name,
            r.provider_id,
            timestamp_text(since)
        ))),
        _ => None,
    }
}

/// Refuse access to the encrypted tables of database `db_oid` while its principal key
/// is revoked. Cheap while no key is revoked.
pub fn check_database_access(db_oid: u32) -> Result<(), TdeError> {
    if REVOKED_KEYS.get().load(Ordering::Acquire) == 0 {
        return Ok(());
    }
    match keys::database_header(db_oid)? {
        Some(h) => refusal_of(&h.principal, false).map_or(Ok(()), Err),
        None => Ok(()),
    }
}

fn timestamp_text(ts: i64) -> String {
    TimestampWithTimeZone::try_from(ts).map(|t| t.to_string()).unwrap_or_else(|_| ts.to_string())
}

fn now() -> i64 {
    // SAFETY: reads the clock.
    unsafe { pg_sys::GetCurrentTimestamp() }
}

/// Record a state; returns the previous one (and since when).
fn set_state(r: &PrincipalRef, state: KeyState, enforced: bool, message: &str) -> (KeyState, i64) {
    let now = now();
    let mut states = KEY_STATES.exclusive();
    let idx = match states.slots.iter().position(|s| s.matches(r)) {
        Some(i) => i,
        None => match states.slots.iter().position(|s| !s.in_use || s.state == KeyState::Ok as u8) {
            Some(i) => {
                let slot = &mut states.slots[i];
                slot.in_use = true;
                slot.state = KeyState::Ok as u8;
                slot.since = now;
                slot.provider_id = r.provider_id;
                let n = r.name.len().min(NAME_LEN);
                slot.name_len = n as u16;
                slot.name[..n].copy_from_slice(&r.name.as_bytes()[..n]);
                i
            }
            None => return (KeyState::Ok, now), // every slot holds a failing key: not recorded
        },
    };
    let slot = &mut states.slots[idx];
    let before = match slot.state {
        1 => KeyState::Unreachable,
        2 => KeyState::Revoked,
        _ => KeyState::Ok,
    };
    let since = slot.since;
    if before != state {
        slot.since = now;
        slot.drained = false;
    }
    slot.state = state as u8;
    slot.enforced = enforced;
    slot.checked = now;
    let mut end = message.len().min(MESSAGE_LEN);
    while !message.is_char_boundary(end) {
        end -= 1;
    }
    slot.message[..end].copy_from_slice(&message.as_bytes()[..end]);
    slot.message_len = end as u16;
    let revoked = states.slots.iter().filter(|s| s.in_use && s.enforced && s.state == KeyState::Revoked as u8).count();
    REVOKED_KEYS.get().store(revoked as u32, Ordering::Release);
    (before, since)
}

/// Every principal key in use, once each, with the key maps (pseudo database OIDs) that use it.
fn keys_in_use() -> Result<Vec<(KeyMapHeader, Vec<u32>)>, TdeError> {
    let mut out: Vec<(KeyMapHeader, Vec<u32>)> = Vec::new();
    let mut dbs = keys::databases_with_maps()?;
    dbs.extend([keys::DEFAULT_KEY_DB, keys::SERVER_KEY_DB]);
    for db in dbs {
        if let Some(h) = keys::database_header(db)? {
            match out.iter_mut().find(|(seen, _)| keys::same_principal(&seen.principal, &h.principal)) {
                Some((_, users)) => users.push(db),
                None => out.push((h, vec![db])),
            }
        }
    }
    Ok(out)
}

/// Check every principal key in use now; returns (key name, state, message) per key.
pub fn check_all() -> Vec<(String, KeyState, String)> {
    let in_use = match keys_in_use() {
        Ok(v) => v,
        Err(e) => {
            crate::errors::warn("pg_tde key check: could not list the keys in use", &e);
            return Vec::new();
        }
    };
    let mut results = Vec::new();
    let results_keys: Vec<PrincipalRef> = in_use.iter().map(|(h, _)| h.principal.clone()).collect();
    for (header, users) in in_use {
        let r = &header.principal;
        let outcome = keys::check_principal_with_provider(&header);
        let (state, message) = match outcome {
            Ok(()) => (KeyState::Ok, String::new()),
            Err(TdeError::Refused(m)) => (KeyState::Revoked, m),
            Err(e) => {
                let grace = crate::gucs::KEY_UNREACHABLE_GRACE.get();
                let since = match state_of(r) {
                    Some((KeyState::Unreachable, since, _, _)) => since,
                    _ => now(),
                };
                let over = grace >= 0 && now().saturating_sub(since) > i64::from(grace) * 1_000_000;
                match (over, state_of(r)) {
                    (_, Some((KeyState::Revoked, ..))) => (KeyState::Revoked, e.to_string()),
                    (true, _) => (KeyState::Revoked, format!("unreachable for more than {grace} s: {e}")),
                    (false, _) => (KeyState::Unreachable, e.to_string()),
                }
            }
        };
        let enforced = !users.contains(&keys::SERVER_KEY_DB);
        let (before, _) = set_state(r, state, enforced, &message);
        if !enforced {
            SERVER_KEY_REVOKED.get().store(u32::from(state == KeyState::Revoked), Ordering::Release);
        }
        let event = |name: &'static str| AuditEvent::new(name).provider_id(r.provider_id).key(&r.name).target(users[0]);
        match (before, state) {
            (KeyState::Revoked, KeyState::Revoked) | (KeyState::Ok, KeyState::Ok) => {}
            (_, KeyState::Ok) => audit::record(event("key_recovered").detail(format!("was {}", before.name()))),
            (_, KeyState::Unreachable) => audit::record(event("key_unreachable").failed(&message)),
            (_, KeyState::Revoked) => audit::record(event("key_revoked").failed(&message)),
        }
        // Every round until it has succeeded once: a failed or interrupted checkpoint
        // leaves the key revoked but not yet drained.
        if state == KeyState::Revoked && enforced && !is_drained(r) {
            drop_revoked_key(r);
        }
        results.push((r.name.clone(), state, message));
    }
    forget_states_except(&results_keys);
    results
}

/// After a key was marked revoked (new access is already refused): write the dirty
/// pages with the keys still cached, then zero the cached key and make every process
/// drop the relation keys it opened with it. Not for the server key (see `enforced`).
///
/// On a standby nothing is zeroed: the startup process must go on replaying (it may
/// need the key for any page), so only SQL access is refused there.
fn drop_revoked_key(r: &PrincipalRef) {
    // SAFETY: reads shared recovery state.
    if unsafe { pg_sys::RecoveryInProgress() } {
        return;
    }
    let checkpointed = PgTryBuilder::new(|| {
        // SAFETY: asks the checkpointer for an immediate checkpoint and waits for it;
        // an ERROR (the checkpoint failed, the wait was cancelled) is caught here.
        unsafe {
            crate::ffi::guarded(|| {
                crate::ffi::RequestCheckpoint(
                    (pg_sys::CHECKPOINT_IMMEDIATE | pg_sys::CHECKPOINT_FORCE | pg_sys::CHECKPOINT_WAIT) as i32,
                )
            })
        };
        true
    })
    .catch_others(|e| {
        let message = match &e {
            pgrx::pg_sys::panic::CaughtError::PostgresError(report)
            | pgrx::pg_sys::panic::CaughtError::ErrorReport(report) => report.message().to_string(),
            _ => "unknown error".to_string(),
        };
        pgrx::warning!("pg_tde key check: the checkpoint before dropping revoked key \"{}\" failed ({message}); retried at the next check", r.name);
        false
    })
    .execute();
    if !checkpointed {
        return;
    }
    {
        let mut states = KEY_STATES.exclusive();
        if let Some(slot) = states.slots.iter_mut().find(|s| s.matches(r)) {
            slot.drained = true;
        }
    }
    keys::forget_principal_now(r);
    keys::invalidate_local_keys();
}

fn is_drained(r: &PrincipalRef) -> bool {
    KEY_STATES.share().slots.iter().any(|s| s.matches(r) && s.drained)
}

/// Forget the states of keys no longer in use (a dropped database, a rotated key).
fn forget_states_except(in_use: &[PrincipalRef]) {
    let mut states = KEY_STATES.exclusive();
    for slot in states.slots.iter_mut().filter(|s| s.in_use) {
        let name = &slot.name[..slot.name_len as usize];
        if !in_use.iter().any(|r| r.provider_id == slot.provider_id && r.name.as_bytes() == name) {
            slot.in_use = false;
            slot.state = KeyState::Ok as u8;
            slot.drained = false;
        }
    }
    let revoked = states.slots.iter().filter(|s| s.in_use && s.enforced && s.state == KeyState::Revoked as u8).count();
    REVOKED_KEYS.get().store(revoked as u32, Ordering::Release);
}

/// Processes that write or replay pages for everyone (startup, checkpointer, background
/// writer) are never refused a key: a refusal there would stop recovery or keep
/// failing checkpoints; SQL access is refused in the sessions.
fn exempt_process() -> bool {
    // SAFETY: a plain read of a process global.
    let kind = unsafe { (&raw const pg_sys::MyBackendType).read() };
    matches!(
        kind,
        pg_sys::BackendType::B_STARTUP | pg_sys::BackendType::B_CHECKPOINTER | pg_sys::BackendType::B_BG_WRITER
    )
}

// ---------------------------------------------------------------------------
// The background worker

pub fn register_worker() {
    BackgroundWorkerBuilder::new("pg_tde key checker")
        .set_type("pg_tde key checker")
        .set_library("pg_tde")
        .set_function("pg_tde_key_checker_main")
        .enable_shmem_access(None)
        .set_start_time(BgWorkerStartTime::ConsistentState)
        .set_restart_time(Some(Duration::from_secs(10)))
        .load();
}

#[pg_guard]
#[unsafe(no_mangle)]
pub extern "C-unwind" fn pg_tde_key_checker_main(_arg: pg_sys::Datum) {
    BackgroundWorker::attach_signal_handlers(SignalWakeFlags::SIGHUP | SignalWakeFlags::SIGTERM);
    // The first round one interval after the start: the keys were just fetched
    // (or are about to be), and a restart must not send a burst to every KMS.
    let mut last_round = Instant::now();
    while BackgroundWorker::wait_latch(Some(Duration::from_secs(1))) {
        if BackgroundWorker::sighup_received() {
            // SAFETY: reloads the configuration file, as every process does on SIGHUP.
            unsafe { pg_sys::ProcessConfigFile(pg_sys::GucContext::PGC_SIGHUP) };
        }
        // This worker also starts the resuming of interrupted online re-keyings.
        crate::rekey::resume_interrupted();
        let interval = crate::gucs::KEY_CHECK_INTERVAL.get();
        if interval <= 0 {
            continue;
        }
        if last_round.elapsed() < Duration::from_secs(interval as u64) {
            continue;
        }
        last_round = Instant::now();
        check_all();
    }
}

// ---------------------------------------------------------------------------
// SQL

/// Check every principal key in use now, as the background worker does.
#[pg_extern(name = "pg_tde_check_keys")]
fn check_keys(
) -> TableIterator<'static, (name!(key_name, String), name!(state, String), name!(message, Option<String>))> {
    crate::api::require_key_admin("check the principal keys");
    let rows = check_all()
        .into_iter()
        .map(|(name, state, message)| (name, state.name().to_string(), (!message.is_empty()).then_some(message)))
        .collect::<Vec<_>>();
    TableIterator::new(rows)
}

/// The state of every principal key in use.
#[pg_extern(name = "pg_tde_key_state")]
#[allow(clippy::type_complexity)]
fn key_state() -> TableIterator<
    'static,
    (
        name!(target, String),
        name!(key_name, String),
        name!(provider_id, i32),
        name!(state, String),
        name!(since, Option<TimestampWithTimeZone>),
        name!(last_check, Option<TimestampWithTimeZone>),
        name!(message, Option<String>),
    ),
> {
    let mut rows = Vec::new();
    for (header, users) in keys_in_use().unwrap_or_default() {
        let r = &header.principal;
        let (state, since, checked, message) = state_of(r).unwrap_or((KeyState::Ok, 0, 0, String::new()));
        for db in users {
            let target = match db {
                keys::DEFAULT_KEY_DB => "default".to_string(),
                keys::SERVER_KEY_DB => "server".to_string(),
                db => format!("database {db}"),
            };
            rows.push((
                target,
                r.name.clone(),
                r.provider_id,
                state.name().to_string(),
                (since != 0).then(|| TimestampWithTimeZone::try_from(since).ok()).flatten(),
                (checked != 0).then(|| TimestampWithTimeZone::try_from(checked).ok()).flatten(),
                (!message.is_empty()).then(|| message.clone()),
            ));
        }
    }
    TableIterator::new(rows)
}
