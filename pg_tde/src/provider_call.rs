//! Calls to key providers that a session can cancel.
//!
//! A provider call (a file, an HTTPS request to Vault, a KMIP exchange) may
//! block for as long as the provider's own timeouts allow.  It runs on a
//! helper thread that touches nothing of PostgreSQL, while the backend waits
//! for it and checks for interrupts: `pg_cancel_backend`, `statement_timeout`
//! and a terminating server end the wait with PostgreSQL's usual error.  An
//! abandoned call finishes on its thread (bounded by the provider's timeouts)
//! and its result, key material included, is dropped there, in zeroizing
//! buffers.  Inside a critical section or with interrupts held, the checks do
//! nothing and the backend waits for the result.

use std::sync::mpsc::{sync_channel, RecvTimeoutError};
use std::time::Duration;

use tde_core::{Result, TdeError};

/// How often the waiting backend checks for interrupts.
const POLL: Duration = Duration::from_millis(50);

/// Run `call` on a helper thread; wait for it, cancellably.
pub fn cancellable<T: Send + 'static>(call: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    let (tx, rx) = sync_channel(1);
    std::thread::Builder::new()
        .name("pg_tde provider call".into())
        .spawn(move || {
            let _ = tx.send(call());
        })
        .map_err(|e| TdeError::io("could not start a thread for the key provider call", e))?;
    loop {
        match rx.recv_timeout(POLL) {
            Ok(result) => return result,
            Err(RecvTimeoutError::Timeout) => {
                pgrx::check_for_interrupts!();
            }
            Err(RecvTimeoutError::Disconnected) => {
                return Err(TdeError::Provider("the key provider call ended without a result".into()))
            }
        }
    }
}
