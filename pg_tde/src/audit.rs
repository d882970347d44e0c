//! The audit trail of key events.
//!
//! Every key event (providers added, changed, deleted; keys created, set, rotated,
//! deleted; KMS wrap, unwrap and re-wrap; key checks that fail; revocation and recovery)
//! is
//!
//! - written to the server log as one line, `pg_tde audit: {json}`, when `pg_tde.audit`
//!   is on (the default), and
//! - kept in a ring of the last [`RING_SLOTS`] events in shared memory, which the
//!   `pg_tde_audit_log` view shows with the database and role names.
//!
//! An event names providers and keys and says what happened; it never holds key bytes
//! or tokens (messages come from `tde_core`, whose errors never contain either).

use pgrx::lwlock::PgLwLock;
use pgrx::pg_shmem_init;
use pgrx::prelude::*;
use pgrx::shmem::PGRXSharedMemory;
use serde::Serialize;

/// Events the ring keeps.
pub const RING_SLOTS: usize = 512;
const EVENT_LEN: usize = 32;
const NAME_LEN: usize = 128;
const DETAIL_LEN: usize = 384;

/// How an event ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    Success,
    Failure,
}

/// One key event, built with the methods below and given to [`record`].
#[derive(Debug, Serialize)]
pub struct AuditEvent {
    event: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    provider_id: Option<i32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    provider: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    key: Option<String>,
    /// Whose key: `database <oid>`, `default` or `server`.
    #[serde(skip_serializing_if = "Option::is_none")]
    target: Option<String>,
    outcome: Outcome,
    #[serde(skip_serializing_if = "Option::is_none")]
    detail: Option<String>,
}

impl AuditEvent {
    /// A successful event of this kind (`key_created`, `kms_unwrap`, ...).
    pub fn new(event: &'static str) -> Self {
        AuditEvent {
            event,
            provider_id: None,
            provider: None,
            key: None,
            target: None,
            outcome: Outcome::Success,
            detail: None,
        }
    }

    /// The provider involved.
    pub fn provider(mut self, id: i32, name: &str) -> Self {
        self.provider_id = Some(id);
        self.provider = Some(name.to_string());
        self
    }

    /// The provider involved, by id (its name is looked up).
    pub fn provider_id(mut self, id: i32) -> Self {
        self.provider_id = Some(id);
        self.provider = tde_core::providers_catalog::ProviderCatalog::load(&crate::keys::providers_path())
            .ok()
            .and_then(|c| c.by_id(id).map(|p| p.name.clone()));
        self
    }

    /// The principal key involved.
    pub fn key(mut self, name: &str) -> Self {
        self.key = Some(name.to_string());
        self
    }

    /// Whose key it is (a key map's pseudo database OID).
    pub fn target(mut self, db_oid: u32) -> Self {
        self.target = Some(match db_oid {
            crate::keys::DEFAULT_KEY_DB => "default".to_string(),
            crate::keys::SERVER_KEY_DB => "server".to_string(),
            db => format!("database {db}"),
        });
        self
    }

    /// The event failed, for this reason.
    pub fn failed(mut self, reason: impl std::fmt::Display) -> Self {
        self.outcome = Outcome::Failure;
        self.detail = Some(reason.to_string());
        self
    }

    /// More about a successful event.
    pub fn detail(mut self, detail: impl Into<String>) -> Self {
        self.detail = Some(detail.into());
        self
    }
}

#[derive(Clone, Copy)]
#[repr(C)]
pub struct AuditSlot {
    seq: u64,
    time: i64,
    db_oid: u32,
    role_oid: u32,
    pid: i32,
    provider_id: i32,
    failed: bool,
    event: [u8; EVENT_LEN],
    provider: [u8; NAME_LEN],
    key: [u8; NAME_LEN],
    target: [u8; EVENT_LEN],
    detail: [u8; DETAIL_LEN],
}

#[derive(Clone, Copy)]
#[repr(C)]
pub struct AuditRing {
    next_seq: u64,
    slots: [AuditSlot; RING_SLOTS],
}

impl Default for AuditRing {
    fn default() -> Self {
        let empty = AuditSlot {
            seq: 0,
            time: 0,
            db_oid: 0,
            role_oid: 0,
            pid: 0,
            provider_id: 0,
            failed: false,
            event: [0; EVENT_LEN],
            provider: [0; NAME_LEN],
            key: [0; NAME_LEN],
            target: [0; EVENT_LEN],
            detail: [0; DETAIL_LEN],
        };
        AuditRing { next_seq: 1, slots: [empty; RING_SLOTS] }
    }
}

// SAFETY: plain old data with no pointers; valid in any process that maps it.
unsafe impl PGRXSharedMemory for AuditRing {}

static AUDIT_RING: PgLwLock<AuditRing> = unsafe { PgLwLock::new(c"pg_tde_audit_ring") };

pub fn init_shmem() {
    pg_shmem_init!(AUDIT_RING);
}

/// Copy `text` into a fixed field, cut at a character boundary.
fn put(field: &mut [u8], text: &str) {
    field.fill(0);
    let mut end = text.len().min(field.len());
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    field[..end].copy_from_slice(&text.as_bytes()[..end]);
}

fn get(field: &[u8]) -> String {
    let end = field.iter().position(|&b| b == 0).unwrap_or(field.len());
    String::from_utf8_lossy(&field[..end]).into_owned()
}

/// The current database and role (invalid outside a session, as in the key checker).
fn session_ids() -> (u32, u32) {
    let mut role = pg_sys::InvalidOid;
    let mut sec_context = 0;
    // SAFETY: plain reads of backend globals; GetUserIdAndSecContext does not
    // assert that a user is set.
    unsafe {
        pg_sys::GetUserIdAndSecContext(&mut role, &mut sec_context);
        ((&raw const pg_sys::MyDatabaseId).read().to_u32(), role.to_u32())
    }
}

/// Record an event: the server log (if `pg_tde.audit`) and the ring.
pub fn record(event: AuditEvent) {
    let (db_oid, role_oid) = session_ids();
    // SAFETY: plain reads of process globals.
    let (pid, now) = unsafe { ((&raw const pg_sys::MyProcPid).read(), pg_sys::GetCurrentTimestamp()) };
    if crate::gucs::AUDIT.get() {
        let line = serde_json::json!({
            "database_oid": db_oid,
            "role_oid": role_oid,
            "pid": pid,
            "event": &event,
        });
        let level = if event.outcome == Outcome::Failure { PgLogLevel::WARNING } else { PgLogLevel::LOG };
        ereport!(level, PgSqlErrorCode::ERRCODE_SUCCESSFUL_COMPLETION, format!("pg_tde audit: {line}"));
    }
    let mut ring = AUDIT_RING.exclusive();
    let seq = ring.next_seq;
    ring.next_seq += 1;
    let slot = &mut ring.slots[(seq % RING_SLOTS as u64) as usize];
    slot.seq = seq;
    slot.time = now;
    slot.db_oid = db_oid;
    slot.role_oid = role_oid;
    slot.pid = pid;
    slot.provider_id = event.provider_id.unwrap_or(0);
    slot.failed = event.outcome == Outcome::Failure;
    put(&mut slot.event, event.event);
    put(&mut slot.provider, event.provider.as_deref().unwrap_or(""));
    put(&mut slot.key, event.key.as_deref().unwrap_or(""));
    put(&mut slot.target, event.target.as_deref().unwrap_or(""));
    put(&mut slot.detail, event.detail.as_deref().unwrap_or(""));
}

fn nonempty(s: String) -> Option<String> {
    (!s.is_empty()).then_some(s)
}

/// The events in the ring, oldest first (the view `pg_tde_audit_log` joins the names).
#[pg_extern(name = "pg_tde_audit_events")]
#[allow(clippy::type_complexity)]
fn audit_events() -> TableIterator<
    'static,
    (
        name!(seq, i64),
        name!(event_time, TimestampWithTimeZone),
        name!(database_oid, pg_sys::Oid),
        name!(role_oid, pg_sys::Oid),
        name!(pid, i32),
        name!(event, String),
        name!(provider_id, Option<i32>),
        name!(provider_name, Option<String>),
        name!(key_name, Option<String>),
        name!(target, Option<String>),
        name!(outcome, String),
        name!(detail, Option<String>),
    ),
> {
    let ring = AUDIT_RING.share();
    let mut slots: Vec<AuditSlot> = ring.slots.iter().filter(|s| s.seq != 0).copied().collect();
    drop(ring);
    slots.sort_by_key(|s| s.seq);
    let rows = slots
        .into_iter()
        .filter_map(|s| {
            Some((
                s.seq as i64,
                TimestampWithTimeZone::try_from(s.time).ok()?,
                pg_sys::Oid::from(s.db_oid),
                pg_sys::Oid::from(s.role_oid),
                s.pid,
                get(&s.event),
                (s.provider_id != 0).then_some(s.provider_id),
                nonempty(get(&s.provider)),
                nonempty(get(&s.key)),
                nonempty(get(&s.target)),
                if s.failed { "failure" } else { "success" }.to_string(),
                nonempty(get(&s.detail)),
            ))
        })
        .collect::<Vec<_>>();
    TableIterator::new(rows)
}

pgrx::extension_sql!(
    r#"
-- Recent key events with the names of their database and role.
CREATE VIEW pg_tde_audit_log AS
SELECT e.seq, e.event_time, d.datname AS database, r.rolname AS role, e.pid, e.event,
       e.provider_name, e.key_name, e.target, e.outcome, e.detail
  FROM pg_tde_audit_events() e
  LEFT JOIN pg_catalog.pg_database d ON d.oid = e.database_oid
  LEFT JOIN pg_catalog.pg_roles r ON r.oid = e.role_oid;
REVOKE ALL ON FUNCTION pg_tde_audit_events() FROM PUBLIC;
REVOKE ALL ON pg_tde_audit_log FROM PUBLIC;
"#,
    name = "pg_tde_audit_log_view",
    requires = [audit_events]
);
