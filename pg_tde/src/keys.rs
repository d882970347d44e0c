//! The key hierarchy as PostgreSQL processes see it.
//!
//! - Principal keys live in key providers.  A fetched principal key is cached
//!   in shared memory ([`PRINCIPAL_CACHE`]) so that a provider is contacted
//!   once per key, not once per process or query.
//! - Internal (relation) keys live wrapped in `$PGDATA/pg_tde/<db>_keys`, one
//!   entry per relation file (relfilenumber), shared by all its forks.  Each
//!   process caches unwrapped page ciphers in [`LOCAL`], invalidated through a
//!   cluster-wide generation counter that every key creation and removal bumps.
//! - Keys of temporary relations live only in the memory of their backend.
//!
//! Every change to a key file is WAL-logged first (see [`crate::rmgr`]), then
//! written and fsynced under [`KEY_FILES_LOCK`], so that crash recovery and
//! streaming standbys end up with the same files as the primary.

use std::cell::RefCell;
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use pgrx::lwlock::PgLwLock;
use pgrx::prelude::*;
use pgrx::shmem::PGRXSharedMemory;
use pgrx::{pg_shmem_init, PgAtomic};
use tde_core::cipher::{PageCipher, RelKey};
use tde_core::envelope::{Envelope, EnvelopeStore};
use tde_core::keymap::{self, KeyMapEntry, KeyMapHeader, PrincipalRef};
use tde_core::providers_catalog::{open_provider, ProviderCatalog};
use tde_core::{Result, TdeError};
use zeroize::Zeroizing;

use crate::audit::AuditEvent;
use crate::rmgr;

/// Directory of pg_tde's files, relative to the data directory (every
/// PostgreSQL process runs with the data directory as its working directory).
pub const KEY_DIR: &str = "pg_tde";

/// Pseudo database OIDs under which the cluster-wide default and server
/// principal keys are kept (header-only key maps; never valid database OIDs,
/// which stay below 2^32 - 2).
pub const DEFAULT_KEY_DB: u32 = u32::MAX - 1;
pub const SERVER_KEY_DB: u32 = u32::MAX - 2;

pub fn map_path(db_oid: u32) -> PathBuf {
    match db_oid {
        DEFAULT_KEY_DB => PathBuf::from(format!("{KEY_DIR}/default_key")),
        SERVER_KEY_DB => PathBuf::from(format!("{KEY_DIR}/server_key")),
        db => PathBuf::from(format!("{KEY_DIR}/{db}_keys")),
    }
}

/// OIDs of the databases that have a key map.
pub fn databases_with_maps() -> Result<Vec<u32>> {
    databases_with_file("_keys")
}

/// OIDs of the databases that have a file `<dboid><suffix>` in `pg_tde/`.
pub fn databases_with_file(suffix: &str) -> Result<Vec<u32>> {
    let dir = match std::fs::read_dir(KEY_DIR) {
        Ok(d) => d,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(TdeError::Io { context: format!("listing \"{KEY_DIR}\""), source: e }),
    };
    let mut out = Vec::new();
    for entry in dir.flatten() {
        let name = entry.file_name();
        if let Some(db) = name.to_str().and_then(|n| n.strip_suffix(suffix)).and_then(|n| n.parse::<u32>().ok()) {
            out.push(db);
        }
    }
    out.sort_unstable();
    Ok(out)
}

pub fn providers_path() -> PathBuf {
    PathBuf::from(format!("{KEY_DIR}/providers.json"))
}

fn ensure_key_dir() -> Result<()> {
    std::fs::create_dir_all(KEY_DIR)
        .map_err(|e| TdeError::Io { context: format!("creating directory \"{KEY_DIR}\""), source: e })?;
    Ok(())
}

/// Identity of a relation file: tablespace, database, relfilenumber.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FileId {
    pub spc: u32,
    pub db: u32,
    pub rel: u32,
}

impl From<pg_sys::RelFileLocator> for FileId {
    fn from(l: pg_sys::RelFileLocator) -> Self {
        FileId { spc: l.spcOid.to_u32(), db: l.dbOid.to_u32(), rel: l.relNumber.to_u32() }
    }
}

// ---------------------------------------------------------------------------
// Shared memory

/// Principal keys the shared cache holds.  Keys no map refers to any more are
/// dropped at once, so the slots hold keys in use: far more than a cluster has
/// databases with keys of their own.  The server key is pinned.
const PRINCIPAL_SLOTS: usize = 512;
const MAX_NAME: usize = 256;

/// One cached principal key, identified by provider id and key name.
#[derive(Clone, Copy)]
#[repr(C)]
pub struct PrincipalSlot {
    in_use: bool,
    /// Never evicted (the server key, which WAL writes need inside a
    /// critical section, where no provider may be asked).
    pinned: bool,
    provider_id: i32,
    name_len: u16,
    name: [u8; MAX_NAME],
    key_len: u8,
    key: [u8; 32],
}

#[derive(Clone, Copy)]
#[repr(C)]
pub struct PrincipalCache {
    slots: [PrincipalSlot; PRINCIPAL_SLOTS],
    next_victim: u32,
}

impl Default for PrincipalCache {
    fn default() -> Self {
        let empty = PrincipalSlot {
            in_use: false,
            pinned: false,
            provider_id: 0,
            name_len: 0,
            name: [0; MAX_NAME],
            key_len: 0,
            key: [0; 32],
        };
        PrincipalCache { slots: [empty; PRINCIPAL_SLOTS], next_victim: 0 }
    }
}

// SAFETY: plain old data with no pointers; valid in any process that maps it.
unsafe impl PGRXSharedMemory for PrincipalCache {}

impl PrincipalSlot {
    fn matches(&self, provider_id: i32, name: &str) -> bool {
        self.in_use && self.provider_id == provider_id && &self.name[..self.name_len as usize] == name.as_bytes()
    }
}

/// Principal keys fetched from providers, shared by all processes.
static PRINCIPAL_CACHE: PgLwLock<PrincipalCache> = unsafe { PgLwLock::new(c"pg_tde_principal_keys") };
/// Serialises every write of pg_tde's files (key maps, provider catalog).
static KEY_FILES_LOCK: PgLwLock<u64> = unsafe { PgLwLock::new(c"pg_tde_key_files") };
/// Bumped on every key creation or removal; processes drop their caches when it moves.
static KEY_GENERATION: PgAtomic<AtomicU64> = unsafe { PgAtomic::new(c"pg_tde_key_generation") };

pub fn init_shmem() {
    pg_shmem_init!(PRINCIPAL_CACHE);
    pg_shmem_init!(KEY_FILES_LOCK);
    pg_shmem_init!(KEY_GENERATION);
}

/// Where the principal-key cache is in shared memory (start, length), for
/// [`crate::key_memory`].  Called in the postmaster once the cache exists.
pub fn principal_cache_region() -> (usize, usize) {
    let cache = PRINCIPAL_CACHE.share();
    (&*cache as *const PrincipalCache as usize, std::mem::size_of::<PrincipalCache>())
}

fn bump_generation() {
    KEY_GENERATION.get().fetch_add(1, Ordering::AcqRel);
}

/// Run `f` holding the cluster-wide lock on pg_tde's files.
pub fn with_key_files_lock<T>(f: impl FnOnce() -> T) -> T {
    let _guard = KEY_FILES_LOCK.exclusive();
    f()
}

// ---------------------------------------------------------------------------
// Principal keys

fn cached_principal(r: &PrincipalRef) -> Option<Zeroizing<Vec<u8>>> {
    let cache = PRINCIPAL_CACHE.share();
    cache
        .slots
        .iter()
        .find(|s| s.matches(r.provider_id, &r.name))
        .map(|s| Zeroizing::new(s.key[..s.key_len as usize].to_vec()))
}

fn cache_principal(provider_id: i32, name: &str, key: &[u8]) {
    if name.len() > MAX_NAME || key.len() > 32 {
        return;
    }
    let mut cache = PRINCIPAL_CACHE.exclusive();
    let idx = match cache
        .slots
        .iter()
        .position(|s| s.matches(provider_id, name))
        .or_else(|| cache.slots.iter().position(|s| !s.in_use))
    {
        Some(i) => i,
        None => {
            // Full: evict round robin, never a pinned key.
            let Some(i) = (0..PRINCIPAL_SLOTS)
                .map(|k| (cache.next_victim as usize + k) % PRINCIPAL_SLOTS)
                .find(|&i| !cache.slots[i].pinned)
            else {
                return;
            };
            cache.next_victim = (i as u32).wrapping_add(1);
            i
        }
    };
    let slot = &mut cache.slots[idx];
    let pinned = slot.matches(provider_id, name) && slot.pinned;
    slot.key.fill(0);
    slot.in_use = true;
    slot.pinned = pinned;
    slot.provider_id = provider_id;
    slot.name_len = name.len() as u16;
    slot.name[..name.len()].copy_from_slice(name.as_bytes());
    slot.key_len = key.len() as u8;
    slot.key[..key.len()].copy_from_slice(key);
}

/// Keep a cached principal key from eviction (the server key).
pub fn pin_principal(r: &PrincipalRef) {
    let mut cache = PRINCIPAL_CACHE.exclusive();
    for slot in cache.slots.iter_mut().filter(|s| s.matches(r.provider_id, &r.name)) {
        slot.pinned = true;
    }
}

/// Fetch a principal key from its provider, bypassing the cache.
pub fn fetch_principal_from_provider(r: &PrincipalRef) -> Result<Zeroizing<Vec<u8>>> {
    let catalog = ProviderCatalog::load(&providers_path())?;
    let rec = catalog
        .by_id(r.provider_id)
        .ok_or_else(|| TdeError::NotFound(format!("key provider with id {} does not exist", r.provider_id)))?;
    // Every failure on the provider's side is reported as a provider failure
    // (external_routine_exception) naming the provider.
    let in_provider = |e: TdeError| match e {
        TdeError::Provider(m) => TdeError::Provider(m),
        other => TdeError::Provider(format!("key provider \"{}\": {other}", rec.name)),
    };
    let provider = open_provider(rec).map_err(in_provider)?;
    let name = r.name.clone();
    let fetched = crate::provider_call::cancellable(move || provider.get_key(&name)).map_err(in_provider);
    if rec.kind.wraps() {
        let event = AuditEvent::new("kms_unwrap").provider(rec.id, &rec.name).key(&r.name);
        crate::audit::record(match &fetched {
            Ok(Some(k)) => event.detail(kms_key_text(k.envelope.as_ref())),
            Ok(None) => event.failed("no envelope"),
            Err(e) => event.failed(e),
        });
    }
    match fetched? {
        Some(k) => Ok(k.key),
        None => {
            Err(TdeError::Provider(format!("principal key \"{}\" not found in key provider \"{}\"", r.name, rec.name)))
        }
    }
}

/// "KMS key <id> version <n>" of an envelope, for audit details.
pub fn kms_key_text(envelope: Option<&Envelope>) -> String {
    match envelope {
        Some(e) => match &e.kms_key_version {
            Some(v) => format!("KMS key \"{}\" version {v}", e.kms_key_id),
            None => format!("KMS key \"{}\"", e.kms_key_id),
        },
        None => String::new(),
    }
}

/// Ask the provider of a key map's principal key whether the key may still be used
/// (the key check): a storing provider must return the key the map was sealed with;
/// a wrapping provider's KMS must still open the envelope, which is then re-wrapped
/// when the KMS key has a newer version (on a primary; a standby gets the re-wrapped
/// envelope through the WAL).  [`TdeError::Refused`] when the answer is no.
pub fn check_principal_with_provider(header: &KeyMapHeader) -> Result<()> {
    let r = &header.principal;
    let catalog = ProviderCatalog::load(&providers_path())?;
    let rec = catalog
        .by_id(r.provider_id)
        .ok_or_else(|| TdeError::Refused(format!("key provider with id {} does not exist", r.provider_id)))?;
    if !rec.kind.wraps() {
        let provider = open_provider(rec)?;
        let name = r.name.clone();
        let Some(key) = crate::provider_call::cancellable(move || provider.get_key(&name))? else {
            return Err(TdeError::Refused(format!(
                "principal key \"{}\" no longer exists in key provider \"{}\"",
                r.name, rec.name
            )));
        };
        return header.verify_principal(&key.key).map_err(|_| {
            TdeError::Refused(format!(
                "key provider \"{}\" returns another key under the name \"{}\" than the one in use",
                rec.name, r.name
            ))
        });
    }
    let envelope = envelope_of(r)?.ok_or_else(|| {
        TdeError::Corrupt(format!(
            "the envelope of principal key \"{}\" of key provider \"{}\" is missing",
            r.name, rec.name
        ))
    })?;
    let wrapper = tde_core::providers_catalog::open_wrapper(rec.kind, &rec.options)?;
    let wrapped = envelope.wrapped_key();
    // SAFETY: reads shared recovery state.
    let primary = unsafe { !pg_sys::RecoveryInProgress() };
    // The verdict is the verification's alone: a re-wrap that fails (a token allowed
    // to decrypt but not to re-wrap) is reported, and the key stays as it is.
    let (verified, rewrapped) = crate::provider_call::cancellable(move || {
        let verified = wrapper.verify(&wrapped);
        let rewrapped = match (&verified, primary) {
            (Ok(()), true) => wrapper.rewrap(&wrapped),
            _ => Ok(None),
        };
        Ok((verified, rewrapped))
    })?;
    verified?;
    let event = AuditEvent::new("kms_rewrap").provider(rec.id, &rec.name).key(&r.name);
    match rewrapped {
        Ok(None) => {}
        Ok(Some(new)) => {
            let new = envelope.rewrapped(new);
            let detail = format!("{} -> {}", kms_key_text(Some(&envelope)), kms_key_text(Some(&new)));
            match store_envelope(new, true) {
                Ok(()) => crate::audit::record(event.detail(detail)),
                Err(e) => crate::audit::record(event.failed(e)),
            }
        }
        Err(e) => crate::audit::record(event.failed(e)),
    }
    Ok(())
}

/// Zero and drop a principal key from the shared cache (a revoked key).
pub fn forget_principal_now(r: &PrincipalRef) {
    forget_principal(r);
}

/// Make every process drop the relation keys it has unwrapped.
pub fn invalidate_local_keys() {
    bump_generation();
}

/// The principal key `r` names, from shared memory or else from its provider;
/// refused while the key check finds it revoked.
pub fn principal_key(r: &PrincipalRef) -> Result<Zeroizing<Vec<u8>>> {
    if let Some(refused) = crate::key_check::refusal(r) {
        return Err(refused);
    }
    if let Some(k) = cached_principal(r) {
        return Ok(k);
    }
    let key = fetch_principal_from_provider(r)?;
    cache_principal(r.provider_id, &r.name, &key);
    Ok(key)
}

/// The principal key of a key map, checked against the map's check value
/// before any use: a provider that returns another key under the same name
/// (an overwritten secret) is refused, and the key is not kept in the cache.
pub fn verified_principal(header: &KeyMapHeader) -> Result<Zeroizing<Vec<u8>>> {
    let key = principal_key(&header.principal)?;
    if let Err(e) = header.verify_principal(&key) {
        forget_principal(&header.principal);
        return Err(match e {
            // The map is intact; the provider hands out another key under this name.
            TdeError::Decrypt(_) => TdeError::Provider(format!(
                "principal key \"{}\" of key provider {} does not match the key the key map was sealed with (was the secret overwritten?)",
                header.principal.name, header.principal.provider_id
            )),
            other => other,
        });
    }
    Ok(key)
}

/// Zero and drop a principal key from the shared cache when no key map refers
/// to it any more (rotated away or deleted).  Other processes only ever hold
/// transient, zeroized copies.
pub fn forget_principal_if_unused(r: &PrincipalRef) {
    let in_use = || -> Result<bool> {
        let mut dbs = databases_with_maps()?;
        dbs.extend([DEFAULT_KEY_DB, SERVER_KEY_DB]);
        for db in dbs {
            if database_header(db)?.is_some_and(|h| same_principal(&h.principal, r)) {
                return Ok(true);
            }
        }
        Ok(false)
    };
    match in_use() {
        Ok(false) => forget_principal(r),
        Ok(true) => {}
        Err(e) => crate::errors::warn("could not tell whether a retired principal key is still in use", &e),
    }
}

fn forget_principal(r: &PrincipalRef) {
    let mut cache = PRINCIPAL_CACHE.exclusive();
    for slot in cache.slots.iter_mut().filter(|s| s.matches(r.provider_id, &r.name)) {
        slot.key.fill(0);
        slot.in_use = false;
        slot.pinned = false;
    }
}

/// Header of a database's key map, if it has one (that is, if the database
/// has a principal key).
pub fn database_header(db_oid: u32) -> Result<Option<KeyMapHeader>> {
    match keymap::read(&map_path(db_oid)) {
        Ok((h, _)) => Ok(Some(h)),
        Err(TdeError::NotFound(_)) => Ok(None),
        Err(e) => Err(e),
    }
}

/// Make `principal` (whose key bytes are `key`) the principal key of a
/// database, re-wrapping every relation key when it already had one.  The
/// whole new map is WAL-logged and then atomically replaces the old one.
pub fn set_database_principal(db_oid: u32, principal: PrincipalRef, key: &[u8]) -> Result<()> {
    ensure_key_dir()?;
    if db_oid != SERVER_KEY_DB && db_oid != DEFAULT_KEY_DB && crate::rekey::in_progress(db_oid)? {
        return Err(TdeError::Invalid(format!(
            "relation files of database {db_oid} are being re-keyed; their new keys are sealed with the current principal key: finish the re-keying (call the pg_tde_*_relation function again) first"
        )));
    }
    let path = map_path(db_oid);
    for _ in 0..STORE_ATTEMPTS {
        // The current principal key is fetched (and checked) before the lock: a
        // provider may be slow, and the lock serialises every key creation.
        let before = database_header(db_oid)?;
        let old_key = before.as_ref().map(verified_principal).transpose()?;
        let done = with_key_files_lock(|| {
            if db_oid != SERVER_KEY_DB && db_oid != DEFAULT_KEY_DB && crate::rekey::in_progress(db_oid)? {
                return Err(TdeError::Invalid(format!(
                    "relation files of database {db_oid} are being re-keyed; finish the re-keying first"
                )));
            }
            let entries = match keymap::read(&path) {
                Ok((old_header, old_entries)) => {
                    let (Some(expected), Some(old_key)) = (&before, &old_key) else { return Ok(false) };
                    if &old_header != expected {
                        return Ok(false); // rotated meanwhile: fetch the new current key
                    }
                    let mut new_entries = Vec::with_capacity(old_entries.len());
                    for e in &old_entries {
                        let relkey = e.open(db_oid, old_key)?;
                        new_entries.push(KeyMapEntry::seal(db_oid, e.spc_oid, e.rel_number, &relkey, key)?);
                    }
                    new_entries
                }
                Err(TdeError::NotFound(_)) if before.is_none() => Vec::new(),
                Err(TdeError::NotFound(_)) => return Ok(false),
                Err(e) => return Err(e),
            };
            let header = KeyMapHeader::new(db_oid, principal.clone(), key)?;
            crate::gucs::crash_point("rotation_before_wal");
            rmgr::log_map_rewrite(db_oid, &header, &entries)?;
            crate::gucs::crash_point("rotation_after_wal");
            // Cached first: a WAL write that reads the new map must find its
            // key here, not ask the provider inside a critical section.
            cache_principal(principal.provider_id, &principal.name, key);
            keymap::rewrite(&path, &header, &entries)?;
            bump_generation();
            Ok::<bool, TdeError>(true)
        })?;
        if done {
            if let Some(old) = before.filter(|h| !same_principal(&h.principal, &principal)) {
                forget_principal_if_unused(&old.principal);
            }
            return Ok(());
        }
    }
    Err(TdeError::Provider(format!(
        "the principal key of database {db_oid} changed {STORE_ATTEMPTS} times during this change; retry"
    )))
}

/// Set or rotate the server key.  The WAL keys are wrapped by a WAL
/// key-encryption key kept in the server key's map (see
/// `tde_core::walkeys`), so a rotation re-wraps them with the map in one
/// WAL-logged rewrite, on the primary and on every standby.  A map from before
/// the key-encryption key gets one first, under the current server key, and the
/// WAL key records it wrapped are re-wrapped by it.
pub fn set_server_principal(principal: PrincipalRef, key: &[u8]) -> Result<()> {
    ensure_key_dir()?;
    if database_header(SERVER_KEY_DB)?.is_some() {
        ensure_wal_kek()?;
        crate::wal::upgrade_legacy_records()?;
    }
    set_database_principal(SERVER_KEY_DB, principal.clone(), key)?;
    pin_principal(&principal);
    ensure_wal_kek()
}

/// Give the server key map its WAL key-encryption key if it has none: the
/// whole map with the new entry is WAL-logged and then atomically replaces the
/// old one (never an in-place write: WAL writers read this map without its
/// lock).
fn ensure_wal_kek() -> Result<()> {
    let path = map_path(SERVER_KEY_DB);
    let (header, entries) = keymap::read(&path)?;
    if entries.iter().any(tde_core::walkeys::is_kek_entry) {
        return Ok(());
    }
    // Fetched before the lock (a provider may be slow); checked under it.
    let pk = verified_principal(&header)?;
    with_key_files_lock(|| {
        let (current, mut entries) = keymap::read(&path)?;
        if entries.iter().any(tde_core::walkeys::is_kek_entry) {
            return Ok(());
        }
        if current != header {
            return Err(TdeError::Invalid("the server key changed while it was being set; retry".into()));
        }
        entries.push(tde_core::walkeys::new_kek_entry(SERVER_KEY_DB, &pk)?);
        rmgr::log_map_rewrite(SERVER_KEY_DB, &current, &entries)?;
        crate::gucs::crash_point("wal_kek_after_wal");
        keymap::rewrite(&path, &current, &entries)?;
        bump_generation();
        Ok(())
    })
}

// ---------------------------------------------------------------------------
// Relation keys

/// One key of a relation file: its expanded page cipher, and the key itself
/// for the asynchronous reads of PostgreSQL 18, whose completion may run in
/// another process and rebuilds the cipher there (see `aio_read`).
pub struct KeyPart {
    cipher: PageCipher,
    /// The key serialized ([`RelKey::to_bytes`]) once, so that starting a read
    /// copies it without allocating.
    #[cfg_attr(not(feature = "pg18"), allow(dead_code))]
    key_bytes: Zeroizing<Vec<u8>>,
}

impl KeyPart {
    fn new(key: &RelKey) -> KeyPart {
        KeyPart { cipher: PageCipher::new(key), key_bytes: key.to_bytes() }
    }

    #[cfg_attr(not(feature = "pg18"), allow(dead_code))]
    pub fn page_cipher(&self) -> &PageCipher {
        &self.cipher
    }

    /// The internal key, serialized (never logged, never returned by SQL).
    #[cfg_attr(not(feature = "pg18"), allow(dead_code))]
    pub fn key_bytes(&self) -> &[u8] {
        &self.key_bytes
    }
}

/// The keys of one relation file.  Normally one key; while the file is being
/// re-keyed (see [`crate::rekey`]) two, either of which may be "plaintext",
/// split by the frontier in shared memory, which is read for every page.
pub struct FileKey {
    /// The key of blocks the frontier has not passed (the file's key-map entry);
    /// `None`: plaintext (a file being encrypted).
    old: Option<KeyPart>,
    /// While re-keying: the frontier's slot, the file, and the key of the blocks
    /// it has passed (`None`: plaintext, a file being decrypted).
    rekey: Option<(usize, FileId, Option<KeyPart>)>,
}

impl FileKey {
    fn new(key: RelKey) -> FileKey {
        FileKey { old: Some(KeyPart::new(&key)), rekey: None }
    }

    /// The key of a file being re-keyed, with its frontier in slot `slot`.
    fn rekeying(old: Option<RelKey>, new: Option<RelKey>, slot: usize, id: FileId) -> FileKey {
        FileKey { old: old.as_ref().map(KeyPart::new), rekey: Some((slot, id, new.as_ref().map(KeyPart::new))) }
    }

    /// The key of block `block` of fork `fork` (raw fork number) now.
    pub fn part_for(&self, fork: pg_sys::ForkNumber::Type, block: u32) -> Option<&KeyPart> {
        match &self.rekey {
            None => self.old.as_ref(),
            Some((slot, id, new)) => {
                if crate::rekey::frontier_covers(*slot, *id, fork as u8, block) {
                    new.as_ref()
                } else {
                    self.old.as_ref()
                }
            }
        }
    }

    /// The key outside re-keying, or the old one.
    #[cfg_attr(not(feature = "pg18"), allow(dead_code))]
    pub fn old_part(&self) -> Option<&KeyPart> {
        self.old.as_ref()
    }

    /// While re-keying: the frontier slot, the file and the new key.
    #[cfg_attr(not(feature = "pg18"), allow(dead_code))]
    pub fn rekey_parts(&self) -> Option<(usize, FileId, Option<&KeyPart>)> {
        self.rekey.as_ref().map(|(slot, id, new)| (*slot, *id, new.as_ref()))
    }

    /// Encrypt (or, for a plaintext part, copy) a page for writing.
    pub fn encrypt_page_into(&self, fork: pg_sys::ForkNumber::Type, block: u32, src: &[u8], dst: &mut [u8]) {
        match self.part_for(fork, block) {
            Some(p) => p.cipher.encrypt_page_into(crate::smgr::tweak_fork(fork), block, src, dst),
            None => dst.copy_from_slice(src),
        }
    }

    /// Decrypt a page just read (a plaintext part leaves it as it is).  While the
    /// file is re-keyed, a page that is not valid under the key its frontier says is
    /// tried under the other key (see [`decrypt_either`]).
    pub fn decrypt_page(&self, fork: pg_sys::ForkNumber::Type, block: u32, page: &mut [u8]) {
        match &self.rekey {
            None => {
                if let Some(p) = &self.old {
                    p.cipher.decrypt_page(crate::smgr::tweak_fork(fork), block, page);
                }
            }
            Some((slot, id, new)) => {
                let old = self.old.as_ref().map(|p| &p.cipher);
                let new = new.as_ref().map(|p| &p.cipher);
                let (first, second) =
                    if crate::rekey::frontier_covers(*slot, *id, fork as u8, block) { (new, old) } else { (old, new) };
                decrypt_either(first, second, fork, block, page);
            }
        }
    }
}

/// Decrypt a page of a file being re-keyed: under `first` (the key the frontier
/// says; `None`: plaintext), and if the result is not a valid page, under `second`.
///
/// The frontier is exact while the server runs, but after a crash (or on a
/// standby, or from a base backup) it is the latest one, while redo may read a
/// block of the window between the frontier at the redo start and the latest one
/// before the record that re-keyed it is replayed, and that block may be on disk
/// under either key.  Validity is PostgreSQL's own test of a page read from
/// disk: all zeros, or a sane header (and the checksum, when data checksums are on).
pub fn decrypt_either(
    first: Option<&PageCipher>,
    second: Option<&PageCipher>,
    fork: pg_sys::ForkNumber::Type,
    block: u32,
    page: &mut [u8],
) {
    let tweak = crate::smgr::tweak_fork(fork);
    let mut original = [0u8; tde_core::PAGE_SIZE];
    original.copy_from_slice(page);
    if let Some(c) = first {
        c.decrypt_page(tweak, block, page);
    }
    if page_is_valid(page, block) {
        return;
    }
    if let Some(c) = second {
        c.decrypt_page(tweak, block, &mut original);
    }
    if page_is_valid(&mut original, block) {
        page.copy_from_slice(&original);
    }
}

/// PostgreSQL's test of a page read from disk (`PageIsVerified`): all zeros, or a
/// header with the layout version and sane pointers, and the checksum if enabled.
fn page_is_valid(page: &mut [u8], block: u32) -> bool {
    if tde_core::is_all_zero(page) {
        return true;
    }
    let u16_at = |o: usize| u16::from_le_bytes([page[o], page[o + 1]]);
    let (checksum, flags, lower, upper, special, size_version) =
        (u16_at(8), u16_at(10), u16_at(12), u16_at(14), u16_at(16), u16_at(18));
    let header_ok = size_version == 0x2004
        && flags & !0x0007 == 0
        && lower >= 24
        && lower <= upper
        && upper <= special
        && usize::from(special) <= tde_core::PAGE_SIZE;
    if !header_ok {
        return false;
    }
    // SAFETY: reads the control file's flag; pg_checksum_page only reads the page
    // (it zeroes and restores the checksum field in place).
    unsafe {
        !pg_sys::DataChecksumsEnabled()
            || crate::ffi::pg_checksum_page(page.as_mut_ptr() as *mut std::ffi::c_char, block) == checksum
    }
}

#[derive(Default)]
struct LocalKeys {
    generation: u64,
    /// `None` caches "this file is not encrypted".
    files: HashMap<FileId, Option<Arc<FileKey>>>,
    /// Keys of this backend's temporary relations.
    temp: HashMap<FileId, Arc<FileKey>>,
}

thread_local! {
    static LOCAL: RefCell<LocalKeys> = RefCell::new(LocalKeys::default());
}

/// Relation files numbered below this are those of the initial catalogs.
const FIRST_NORMAL_OBJECT_ID: u32 = 16384;

/// Look up the entry of a file in its database's key map.
///
/// A damaged record fails only lookups that might concern it: the relation
/// file it names and, when the record is damaged so badly that its name cannot
/// be trusted, any other user relation file without an entry, because we
/// cannot tell whether that file is encrypted and must never write it in
/// plaintext by mistake.  The initial catalogs stay readable, so the database
/// can still be connected to.
fn find_entry(id: FileId) -> Result<Option<(KeyMapHeader, KeyMapEntry)>> {
    let view = match keymap::read_for_lookup(&map_path(id.db)) {
        Ok(v) => v,
        Err(TdeError::NotFound(_)) => return Ok(None),
        Err(e) => return Err(e),
    };
    let keymap::KeyMapView { header, entries, damaged } = view;
    if let Some(e) = entries.into_iter().find(|e| e.spc_oid == id.spc && e.rel_number == id.rel) {
        return Ok(Some((header, e)));
    }
    if let Some(d) = damaged.iter().find(|d| d.spc_oid == id.spc && d.rel_number == id.rel) {
        return Err(TdeError::Corrupt(format!(
            "the key of relation file {}/{}/{} is damaged (key map slot {}: {})",
            id.spc, id.db, id.rel, d.slot, d.reason
        )));
    }
    // A damaged record whose state and cipher fields are intact most likely
    // names its relation correctly (checked above).  Only when one is damaged
    // beyond that can it be this file's record.
    if damaged.iter().any(|d| !d.plausible_identity) && id.rel >= FIRST_NORMAL_OBJECT_ID {
        return Err(TdeError::Corrupt(format!(
            "key map of database {} has {} damaged record(s) (first: slot {}: {}); cannot tell whether relation file {}/{}/{} is encrypted",
            id.db, damaged.len(), damaged[0].slot, damaged[0].reason, id.spc, id.db, id.rel
        )));
    }
    Ok(None)
}

/// The page cipher of a relation file, or `None` if it is not encrypted.
/// This is on the page read/write path: it touches no catalog and, once a
/// file's key is cached, no file and no lock.
pub fn file_cipher(id: FileId, temp: bool) -> Result<Option<Arc<FileKey>>> {
    LOCAL.with(|cell| {
        let mut local = cell.borrow_mut();
        if temp {
            return Ok(local.temp.get(&id).cloned());
        }
        let generation = KEY_GENERATION.get().load(Ordering::Acquire);
        if generation != local.generation {
            local.files.clear();
            local.generation = generation;
        }
        if let Some(c) = local.files.get(&id) {
            return Ok(c.clone());
        }
        // The key map and the re-keying state are read as one: the end of a
        // re-keying changes both (see crate::rekey::seq_begin).
        let (found, rekeying) = loop {
            let seq = crate::rekey::seq();
            if seq % 2 == 1 {
                std::thread::yield_now();
                continue;
            }
            let found = find_entry(id)?;
            let rekeying = crate::rekey::record_of(id)?;
            if crate::rekey::seq() == seq {
                break (found, rekeying);
            }
        };
        let cipher = match (found, rekeying) {
            (None, None) => None,
            (Some((header, entry)), None) => {
                let pk = verified_principal(&header)?;
                Some(Arc::new(FileKey::new(entry.open(id.db, &pk)?)))
            }
            (found, Some((record, slot))) => {
                let header = match (&found, database_header(id.db)?) {
                    (Some((h, _)), _) => h.clone(),
                    (None, Some(h)) => h,
                    (None, None) => return Err(no_principal_key(id.db)),
                };
                let pk = verified_principal(&header)?;
                let old = found.map(|(_, e)| e.open(id.db, &pk)).transpose()?;
                let new = record.new_entry.as_ref().map(|e| e.open(id.db, &pk)).transpose()?;
                Some(Arc::new(FileKey::rekeying(old, new, slot, id)))
            }
        };
        local.files.insert(id, cipher.clone());
        Ok(cipher)
    })
}

/// Whether a relation file has a key; needs no principal key.
pub fn file_has_key(id: FileId, temp: bool) -> Result<bool> {
    if temp {
        return Ok(LOCAL.with(|cell| cell.borrow().temp.contains_key(&id)));
    }
    Ok(find_entry(id)?.is_some())
}

/// Create and record the key of a new relation file, before anything is
/// written to it.  Fails, and so prevents the relation from being created,
/// when its database has no principal key.
pub fn create_file_key(id: FileId, temp: bool) -> Result<()> {
    let relkey = RelKey::generate(crate::gucs::cipher())?;
    if temp {
        let cipher = Arc::new(FileKey::new(relkey));
        LOCAL.with(|cell| cell.borrow_mut().temp.insert(id, cipher));
        return Ok(());
    }
    store_file_key(id, &relkey)
}

/// Give a database without a principal key of its own the cluster's default
/// key, if there is one.
fn adopt_default_key(db_oid: u32) -> Result<KeyMapHeader> {
    let default = database_header(DEFAULT_KEY_DB)?.ok_or_else(|| no_principal_key(db_oid))?;
    let key = verified_principal(&default)?;
    set_database_principal(db_oid, default.principal.clone(), &key)?;
    database_header(db_oid)?.ok_or_else(|| no_principal_key(db_oid))
}

fn no_principal_key(db_oid: u32) -> TdeError {
    TdeError::NotFound(format!(
        "principal key not configured for database {db_oid}: cannot create an encrypted relation"
    ))
}

/// How often a new relation key is sealed again because the principal key was
/// rotated between sealing and storing it.
const STORE_ATTEMPTS: usize = 5;

/// Seal a new relation key with its database's principal key and store it.
/// The principal key is fetched outside the key-file lock (a provider may be
/// slow); under the lock the map's header is read again and the entry stored
/// only if it is still the header the key was sealed for, so a rotation or a
/// deletion in between is never missed: the entry is sealed again, or the
/// creation fails when the database has no principal key any more.
fn store_file_key(id: FileId, relkey: &RelKey) -> Result<()> {
    let path = map_path(id.db);
    for _ in 0..STORE_ATTEMPTS {
        let header = match database_header(id.db)? {
            Some(h) => h,
            None => adopt_default_key(id.db)?,
        };
        let pk = verified_principal(&header)?;
        let entry = KeyMapEntry::seal(id.db, id.spc, id.rel, relkey, &pk)?;
        crate::gucs::pause_point("relation_key_before_lock");
        let stored = with_key_files_lock(|| {
            if database_header(id.db)?.as_ref() != Some(&header) {
                return Ok::<bool, TdeError>(false);
            }
            rmgr::log_relation_key(id.db, &entry)?;
            keymap::put_entry(&path, &entry)?;
            bump_generation();
            Ok(true)
        })?;
        if stored {
            let cipher = Arc::new(FileKey::new(relkey.clone()));
            LOCAL.with(|cell| {
                let mut local = cell.borrow_mut();
                local.generation = KEY_GENERATION.get().load(Ordering::Acquire);
                local.files.clear();
                local.files.insert(id, Some(cipher));
            });
            return Ok(());
        }
    }
    Err(TdeError::Provider(format!(
        "the principal key of database {} changed {STORE_ATTEMPTS} times while a relation key was being stored; retry",
        id.db
    )))
}

/// Give `dst`, a copy of `src` in a database being created, a key of its own.
/// The new database takes the source database's principal key when it has
/// none yet.
pub fn create_copied_file_key(src: FileId, dst: FileId) -> Result<()> {
    let Some((src_header, _)) = find_entry(src)? else { return Ok(()) };
    if database_header(dst.db)?.is_none() {
        let pk = verified_principal(&src_header)?;
        set_database_principal(dst.db, src_header.principal.clone(), &pk)?;
    }
    let relkey = RelKey::generate(crate::gucs::cipher())?;
    store_file_key(dst, &relkey)
}

/// Forget the key of a relation file that is being unlinked.  Also runs
/// during recovery, when the unlink is replayed.
pub fn remove_file_key(id: FileId, temp: bool) -> Result<()> {
    if temp {
        LOCAL.with(|cell| cell.borrow_mut().temp.remove(&id));
        return Ok(());
    }
    let path = map_path(id.db);
    if path.exists() {
        with_key_files_lock(|| {
            if keymap::remove_entry(&path, id.spc, id.rel)? {
                bump_generation();
            }
            Ok::<(), TdeError>(())
        })?;
    }
    crate::rekey::forget_file(id)
}

/// Remove a key map (a database's principal key, or the default or server
/// key): WAL first, then the file.
pub fn remove_map(db_oid: u32) -> Result<()> {
    remove_map_checked(db_oid, false).map(|_| ())
}

/// Remove a key map under the key-file lock (WAL first, then the file), if
/// `only_if_unused` then only when it holds no relation key; a principal key
/// no map refers to any more then leaves the shared cache.  Returns whether
/// the map was removed.
fn remove_map_checked(db_oid: u32, only_if_unused: bool) -> Result<bool> {
    let before = database_header(db_oid).ok().flatten();
    let removed = with_key_files_lock(|| {
        if only_if_unused && (relation_key_count(db_oid)? > 0 || crate::rekey::in_progress(db_oid)?) {
            return Ok(false);
        }
        rmgr::log_map_remove(db_oid);
        crate::gucs::crash_point("map_remove_after_wal");
        remove_map_file(db_oid)?;
        bump_generation();
        Ok::<bool, TdeError>(true)
    })?;
    if let (true, Some(h)) = (removed, before) {
        forget_principal_if_unused(&h.principal);
    }
    Ok(removed)
}

fn remove_map_file(db_oid: u32) -> Result<()> {
    if db_oid != SERVER_KEY_DB && db_oid != DEFAULT_KEY_DB {
        crate::rekey::forget_database(db_oid)?;
    }
    match std::fs::remove_file(map_path(db_oid)) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(TdeError::Io { context: format!("removing \"{}\"", map_path(db_oid).display()), source: e }),
    }
}

/// Remove a database's key map if it holds no relation key, checked under the
/// key-file lock so that a relation key being stored concurrently is seen.
/// Returns whether the map was removed.
pub fn remove_map_if_unused(db_oid: u32) -> Result<bool> {
    crate::gucs::pause_point("delete_key_before_lock");
    remove_map_checked(db_oid, true)
}

/// Remove the key map of a database that no longer exists (dropped), or of
/// an OID just given to a new database: WAL-logged, and a no-op when there
/// is none.
pub fn remove_stale_map(db_oid: u32) -> Result<()> {
    if !map_path(db_oid).exists() {
        return Ok(());
    }
    remove_map(db_oid)
}

/// Number of relation keys in a database's key map for files in tablespace `spc`.
pub fn relation_key_count_in(db_oid: u32, spc: u32) -> Result<usize> {
    match keymap::read_for_lookup(&map_path(db_oid)) {
        Ok(v) => Ok(v.entries.iter().filter(|e| e.spc_oid == spc).count()
            + v.damaged.iter().filter(|d| d.spc_oid == spc || !d.plausible_identity).count()),
        Err(TdeError::NotFound(_)) => Ok(0),
        Err(e) => Err(e),
    }
}

/// Number of relation keys in a database's key map.
pub fn relation_key_count(db_oid: u32) -> Result<usize> {
    match keymap::read_for_lookup(&map_path(db_oid)) {
        Ok(v) => Ok(v.entries.len() + v.damaged.len()),
        Err(TdeError::NotFound(_)) => Ok(0),
        Err(e) => Err(e),
    }
}

/// Whether two principal-key references name the same key.
pub fn same_principal(a: &PrincipalRef, b: &PrincipalRef) -> bool {
    a.provider_id == b.provider_id && a.name == b.name
}

/// Set or rotate the cluster's default principal key: every database that
/// uses the old default key is re-wrapped with the new one first.
pub fn set_default_principal(principal: PrincipalRef, key: &[u8]) -> Result<()> {
    if let Some(old) = database_header(DEFAULT_KEY_DB)? {
        for db in databases_with_maps()? {
            if let Some(h) = database_header(db)? {
                if same_principal(&h.principal, &old.principal) {
                    set_database_principal(db, principal.clone(), key)?;
                }
            }
        }
    }
    set_database_principal(DEFAULT_KEY_DB, principal, key)
}

/// Every key-map header (databases, default, server) that refers to a
/// provider, with the pseudo-OID it is stored under.
pub fn headers_using_provider(provider_id: i32) -> Result<Vec<(u32, KeyMapHeader)>> {
    let mut out = Vec::new();
    let mut dbs = databases_with_maps()?;
    dbs.extend([DEFAULT_KEY_DB, SERVER_KEY_DB]);
    for db in dbs {
        if let Some(h) = database_header(db)? {
            if h.principal.provider_id == provider_id {
                out.push((db, h));
            }
        }
    }
    Ok(out)
}

// ---------------------------------------------------------------------------
// Redo: apply WAL-logged changes to the files (no principal key needed).

pub fn redo_map_remove(db_oid: u32) -> Result<()> {
    let before = database_header(db_oid).ok().flatten();
    with_key_files_lock(|| {
        remove_map_file(db_oid)?;
        bump_generation();
        Ok::<(), TdeError>(())
    })?;
    if let Some(h) = before {
        forget_principal_if_unused(&h.principal);
    }
    Ok(())
}

pub fn redo_relation_key(db_oid: u32, entry: &KeyMapEntry) -> Result<()> {
    ensure_key_dir()?;
    with_key_files_lock(|| {
        match keymap::put_entry(&map_path(db_oid), entry) {
            Ok(()) => {}
            // The map was removed later in the WAL (the database was dropped or
            // its key deleted) and crash recovery is replaying from before
            // that: the removal's own record follows.
            Err(TdeError::NotFound(_)) => {
                pgrx::log!(
                    "pg_tde: key map of database {db_oid} is absent; relation key {}/{} skipped (its database was dropped or its key deleted later in the WAL)",
                    entry.spc_oid,
                    entry.rel_number
                );
                return Ok(());
            }
            Err(e) => return Err(e),
        }
        bump_generation();
        Ok(())
    })
}

pub fn redo_map_rewrite(db_oid: u32, header: &KeyMapHeader, entries: &[KeyMapEntry]) -> Result<()> {
    ensure_key_dir()?;
    let before = database_header(db_oid).ok().flatten();
    with_key_files_lock(|| {
        keymap::rewrite(&map_path(db_oid), header, entries)?;
        bump_generation();
        Ok::<(), TdeError>(())
    })?;
    if let Some(old) = before.filter(|h| !same_principal(&h.principal, &header.principal)) {
        forget_principal_if_unused(&old.principal);
    }
    // This server's own WAL key records from before the key-encryption key
    // (a standby's receiver keys, a backup's) are re-wrapped by it as soon as
    // the map that adds it is replayed, while the server key that wraps them
    // is still current: the primary does the same before it rotates.
    if db_oid == SERVER_KEY_DB && entries.iter().any(tde_core::walkeys::is_kek_entry) {
        crate::wal::upgrade_legacy_records()?;
    }
    Ok(())
}

pub fn redo_providers(bytes: &[u8]) -> Result<()> {
    ensure_key_dir()?;
    let catalog = ProviderCatalog::from_bytes(bytes)?;
    with_key_files_lock(|| catalog.save_atomic(&providers_path()))
}

pub fn envelopes_path() -> PathBuf {
    PathBuf::from(format!("{KEY_DIR}/{}", tde_core::envelope::FILE_NAME))
}

pub fn redo_envelopes(bytes: &[u8]) -> Result<()> {
    ensure_key_dir()?;
    let store = EnvelopeStore::from_bytes(bytes)?;
    with_key_files_lock(|| store.save_atomic(&envelopes_path()))
}

/// Store an envelope: a new one (`replace` false: refused if the key exists, as two
/// sessions may create the same key at once), or a re-wrapped one.  The whole store is
/// checked, WAL-logged and then atomically replaces the file, under the key-file lock.
pub fn store_envelope(envelope: Envelope, replace: bool) -> Result<()> {
    ensure_key_dir()?;
    with_key_files_lock(|| {
        let mut store = EnvelopeStore::load(&envelopes_path())?;
        if !replace && store.find(envelope.provider_id, &envelope.name).is_some() {
            return Err(TdeError::Invalid(format!("key \"{}\" already exists in the provider", envelope.name)));
        }
        store.put(envelope);
        let bytes = store.to_bytes()?;
        // What is logged must read back, here and in every standby's redo.
        EnvelopeStore::from_bytes(&bytes)?;
        rmgr::log_envelopes(&bytes);
        store.save_atomic(&envelopes_path())
    })
}

/// Remove the envelopes of a deleted provider (WAL-logged); the count removed.
pub fn remove_provider_envelopes(provider_id: i32) -> Result<usize> {
    with_key_files_lock(|| {
        let mut store = EnvelopeStore::load(&envelopes_path())?;
        let removed = store.remove_provider(provider_id);
        if removed > 0 {
            let bytes = store.to_bytes()?;
            rmgr::log_envelopes(&bytes);
            store.save_atomic(&envelopes_path())?;
        }
        Ok(removed)
    })
}

/// The envelope of a principal key of a wrapping provider.
pub fn envelope_of(r: &PrincipalRef) -> Result<Option<Envelope>> {
    Ok(EnvelopeStore::load(&envelopes_path())?.find(r.provider_id, &r.name).cloned())
}

/// Save a changed provider catalog: WAL first, then the file.
pub fn save_providers(catalog: &ProviderCatalog) -> Result<()> {
    ensure_key_dir()?;
    rmgr::log_providers(&catalog.to_bytes()?);
    catalog.save_atomic(&providers_path())
}
