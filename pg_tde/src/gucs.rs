//! The `pg_tde.*` settings (SPEC §8).  `pg_tde.wal_encrypt` belongs to the
//! WAL-encryption work and is not defined until it does something.

use pgrx::{GucContext, GucFlags, GucRegistry, GucSetting, PostgresGucEnum};
use tde_core::cipher::Cipher;

/// Values of `pg_tde.cipher`; the names are those of Percona pg_tde.
#[derive(PostgresGucEnum, Clone, Copy, PartialEq, Eq, Debug)]
pub enum CipherSetting {
    #[name = c"aes_128"]
    Aes128,
    #[name = c"aes_256"]
    Aes256,
    #[name = c"aes_128_xts"]
    Aes128Xts,
    #[name = c"aes_256_xts"]
    Aes256Xts,
    #[name = c"sm4_xts"]
    Sm4Xts,
}

pub static CIPHER: GucSetting<CipherSetting> = GucSetting::<CipherSetting>::new(CipherSetting::Aes128Xts);
pub static ENFORCE_ENCRYPTION: GucSetting<bool> = GucSetting::<bool>::new(false);
pub static INHERIT_GLOBAL_PROVIDERS: GucSetting<bool> = GucSetting::<bool>::new(true);
/// Allow Vault providers on plain `http://` (the token then travels in clear):
/// for tests against a local development server only.
pub static VAULT_ALLOW_HTTP: GucSetting<bool> = GucSetting::<bool>::new(false);
/// Seconds between two checks of every principal key in use with its provider (0: never).
pub static KEY_CHECK_INTERVAL: GucSetting<i32> = GucSetting::<i32>::new(600);
/// Seconds a key whose provider cannot be reached stays usable (-1: for ever).
pub static KEY_UNREACHABLE_GRACE: GucSetting<i32> = GucSetting::<i32>::new(-1);
/// Online re-keying throttle, like VACUUM's cost-based delay: milliseconds slept
/// each time `REKEY_COST_LIMIT` is reached (a block costs 20); 0: no delay.
pub static REKEY_COST_DELAY: GucSetting<i32> = GucSetting::<i32>::new(0);
pub static REKEY_COST_LIMIT: GucSetting<i32> = GucSetting::<i32>::new(200);
/// Continue the online re-keyings that a restart, crash or failover interrupted,
/// in background workers, once the server accepts writes.
pub static REKEY_RESUME: GucSetting<bool> = GucSetting::<bool>::new(true);
/// Write every key event to the server log as a structured line.
pub static AUDIT: GucSetting<bool> = GucSetting::<bool>::new(true);
/// Test-only: name of a point at which the server process crashes (see
/// [`crash_point`]).  Hidden from SHOW ALL; superuser only.
pub static TEST_CRASH_POINT: GucSetting<Option<std::ffi::CString>> = GucSetting::<Option<std::ffi::CString>>::new(None);

/// Simulate a crash (as a power loss would) when `pg_tde.test_crash_point`
/// names this point.  Used by the crash-safety tests of key rotation.
pub fn crash_point(name: &str) {
    if TEST_CRASH_POINT.get().is_some_and(|p| p.to_bytes() == name.as_bytes()) {
        std::process::abort();
    }
}

/// Hold the session for three seconds when `pg_tde.test_crash_point` is
/// `sleep:<name>`, so that a test can run another session's statement in a
/// window that is otherwise too short to hit.
pub fn pause_point(name: &str) {
    let hit = TEST_CRASH_POINT
        .get()
        .is_some_and(|p| p.to_bytes().strip_prefix(b"sleep:".as_slice()) == Some(name.as_bytes()));
    if hit {
        std::thread::sleep(std::time::Duration::from_secs(3));
    }
}

/// The cipher for new internal keys and the length of new principal keys.
pub fn cipher() -> Cipher {
    match CIPHER.get() {
        CipherSetting::Aes128 => Cipher::Aes128Cbc,
        CipherSetting::Aes256 => Cipher::Aes256Cbc,
        CipherSetting::Aes128Xts => Cipher::Aes128Xts,
        CipherSetting::Aes256Xts => Cipher::Aes256Xts,
        CipherSetting::Sm4Xts => Cipher::Sm4Xts,
    }
}

pub fn init() {
    GucRegistry::define_enum_guc(
        c"pg_tde.cipher",
        c"Cipher of new relation keys.",
        c"aes_128_xts and aes_256_xts are XTS (IEEE 1619); aes_128 and aes_256 are CBC as in Percona pg_tde; \
          sm4_xts is XTS over SM4 (GB/T 32907). \
          Also decides the length of principal keys created by pg_tde.",
        &CIPHER,
        GucContext::Suset,
        GucFlags::default(),
    );
    GucRegistry::define_bool_guc(
        c"pg_tde.enforce_encryption",
        c"Refuse to create tables that would not be encrypted.",
        c"",
        &ENFORCE_ENCRYPTION,
        GucContext::Suset,
        GucFlags::default(),
    );
    GucRegistry::define_string_guc(
        c"pg_tde.test_crash_point",
        c"Test only: crash the server process at the named point.",
        c"",
        &TEST_CRASH_POINT,
        GucContext::Suset,
        GucFlags::NO_SHOW_ALL,
    );
    GucRegistry::define_bool_guc(
        c"pg_tde.vault_allow_http",
        c"Allow Vault key providers on plain http:// (the token is sent in clear).",
        c"For tests against a local development server only.",
        &VAULT_ALLOW_HTTP,
        GucContext::Suset,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"pg_tde.key_check_interval",
        c"Seconds between checks of every principal key in use with its key provider (0 turns the checks off).",
        c"A key the KMS refuses (revoked, disabled, deleted, expired, permission removed) stops being used; \
          access resumes when a later check succeeds.",
        &KEY_CHECK_INTERVAL,
        0,
        7 * 24 * 3600,
        GucContext::Sighup,
        GucFlags::UNIT_S,
    );
    GucRegistry::define_int_guc(
        c"pg_tde.key_unreachable_grace",
        c"Seconds a principal key stays in use while its key provider cannot be reached (-1: without limit).",
        c"",
        &KEY_UNREACHABLE_GRACE,
        -1,
        i32::MAX,
        GucContext::Sighup,
        GucFlags::UNIT_S,
    );
    GucRegistry::define_int_guc(
        c"pg_tde.rekey_cost_delay",
        c"Milliseconds the online re-keying sleeps when its cost limit is reached (0: no throttling).",
        c"Like vacuum_cost_delay; a re-keyed block costs 20.",
        &REKEY_COST_DELAY,
        0,
        100,
        GucContext::Userset,
        GucFlags::UNIT_MS,
    );
    GucRegistry::define_bool_guc(
        c"pg_tde.rekey_resume",
        c"Continue interrupted online re-keyings in the background after a restart, crash or promotion.",
        c"Off: they wait for the re-keying function to be called again.",
        &REKEY_RESUME,
        GucContext::Sighup,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"pg_tde.rekey_cost_limit",
        c"Cost accumulated by the online re-keying before it sleeps.",
        c"Like vacuum_cost_limit.",
        &REKEY_COST_LIMIT,
        1,
        10000,
        GucContext::Userset,
        GucFlags::default(),
    );
    GucRegistry::define_bool_guc(
        c"pg_tde.audit",
        c"Write every key event to the server log as one structured line.",
        c"Key events are also kept in memory and shown by the pg_tde_audit_log view.",
        &AUDIT,
        GucContext::Sighup,
        GucFlags::default(),
    );
    GucRegistry::define_bool_guc(
        c"pg_tde.inherit_global_providers",
        c"Let databases use global key providers.",
        c"",
        &INHERIT_GLOBAL_PROVIDERS,
        GucContext::Suset,
        GucFlags::default(),
    );
}
