//! pg_tde: transparent data encryption for PostgreSQL 17 and 18.
//!
//! This crate is the thin PostgreSQL shell over `tde_core`, which holds the
//! cryptography, the key-file formats and the key providers.  Each module here
//! owns one PostgreSQL-facing concern:
//!
//! - [`gucs`]: the `pg_tde.*` settings;
//! - [`errors`]: mapping of core errors to SQLSTATEs;
//! - [`key_memory`]: the shared key caches kept out of core dumps and swap;
//! - [`keys`]: the key hierarchy as PostgreSQL sees it (principal-key cache in
//!   shared memory, per-relation key lookup and creation);
//! - [`smgr`]: the encrypting storage manager installed through the core patch;
//! - `aio_read` (18 only): decryption of asynchronous reads in an AIO
//!   completion callback;
//! - [`am`]: the `tde_heap` table access method;
//! - [`hooks`]: object-access, utility and relation-file hooks that decide
//!   which new relation files are encrypted;
//! - [`provider_call`]: key-provider calls that a session can cancel;
//! - [`rmgr`]: the WAL resource manager that makes key changes crash-safe and
//!   replicated;
//! - [`wal`]: WAL encryption through the core patch's WAL segment hooks;
//! - [`api`]: the SQL functions.
#![deny(unsafe_op_in_unsafe_fn)]

use pgrx::prelude::*;

#[cfg(feature = "pg18")]
mod aio_read;
mod am;
mod api;
mod audit;
mod errors;
mod ffi;
mod gucs;
mod hooks;
mod key_check;
mod key_memory;
mod keys;
mod provider_call;
mod rekey;
mod rmgr;
mod smgr;
mod tests;
mod wal;

::pgrx::pg_module_magic!(name, version);

/// Library entry point: installs everything, but only from
/// `shared_preload_libraries`.  Loaded any other way (for example by
/// `CREATE EXTENSION` alone) it refuses, because the storage manager,
/// shared memory and the WAL resource manager must exist in every process
/// from postmaster start on.
#[pg_guard]
pub extern "C-unwind" fn _PG_init() {
    // SAFETY: a plain read of a backend-global flag.
    let preloading = unsafe { (&raw const pg_sys::process_shared_preload_libraries_in_progress).read() };
    if !preloading {
        ereport!(
            PgLogLevel::ERROR,
            PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            "pg_tde can only be loaded through shared_preload_libraries",
            "Add pg_tde to shared_preload_libraries in postgresql.conf and restart the server."
        );
    }
    // pgrx re-raises the PostgreSQL ERRORs it catches at its guards with a Rust
    // backtrace in DETAIL when std's backtrace capture is enabled, which
    // RUST_BACKTRACE in the server's environment does: a backtrace is never
    // for clients.  RUST_LIB_BACKTRACE takes precedence for that capture and
    // leaves panic messages in the server log (RUST_BACKTRACE) as they are.
    // _PG_init runs in the postmaster before it starts any thread or child,
    // which inherit the setting.
    std::env::set_var("RUST_LIB_BACKTRACE", "0");
    gucs::init();
    keys::init_shmem();
    audit::init_shmem();
    key_check::init_shmem();
    rekey::init_shmem();
    key_check::register_worker();
    key_check::init();
    rekey::init();
    am::init();
    smgr::init();
    #[cfg(feature = "pg18")]
    aio_read::init();
    rmgr::init();
    hooks::init();
    wal::init();
    // Last: its shared-memory hook runs after the others have allocated.
    key_memory::init();
}

/// Required by `cargo pgrx test`.
#[cfg(test)]
pub mod pg_test {
    pub fn setup(_options: Vec<&str>) {}

    pub fn postgresql_conf_options() -> Vec<&'static str> {
        vec!["shared_preload_libraries = 'pg_tde'"]
    }
}
