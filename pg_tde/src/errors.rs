//! The one place where core errors become SQL errors with a SQLSTATE.
//!
//! Messages come from `tde_core`, which never puts key material into them;
//! this module adds the SQLSTATE and, where it helps, a hint.

use pgrx::pg_sys::panic::ErrorReport;
use pgrx::prelude::*;
use pgrx::{ereport, PgSqlErrorCode};
use tde_core::TdeError;

/// The SQLSTATE a core error is reported with.
pub fn sqlstate(err: &TdeError) -> PgSqlErrorCode {
    match err {
        TdeError::Io { .. } => PgSqlErrorCode::ERRCODE_IO_ERROR,
        TdeError::Corrupt(_) | TdeError::Decrypt(_) => PgSqlErrorCode::ERRCODE_DATA_CORRUPTED,
        TdeError::NotFound(_) => PgSqlErrorCode::ERRCODE_UNDEFINED_OBJECT,
        TdeError::Invalid(_) => PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
        TdeError::Provider(_) | TdeError::Refused(_) => PgSqlErrorCode::ERRCODE_EXTERNAL_ROUTINE_EXCEPTION,
    }
}

/// Raise `err` as an SQL ERROR (does not return).
pub fn raise(err: TdeError) -> ! {
    raise_with(sqlstate(&err), &err.to_string(), None)
}

/// Raise an SQL ERROR with an explicit SQLSTATE and optional hint.
pub fn raise_with(code: PgSqlErrorCode, message: &str, hint: Option<&str>) -> ! {
    let mut report = ErrorReport::new(code, message.to_string(), "pg_tde");
    if let Some(hint) = hint {
        report = report.set_hint(hint);
    }
    report.report(PgLogLevel::ERROR);
    unreachable!("ereport(ERROR) returned")
}

/// Log `err` as a WARNING: for paths that must not fail, such as removing the
/// key of a file that is being unlinked after commit.
pub fn warn(context: &str, err: &TdeError) {
    ereport!(PgLogLevel::WARNING, sqlstate(err), format!("{context}: {err}"));
}

/// Unwrap a core result or raise it as an SQL error.
pub trait OrRaise<T> {
    fn or_raise(self) -> T;
}

impl<T> OrRaise<T> for Result<T, TdeError> {
    fn or_raise(self) -> T {
        match self {
            Ok(v) => v,
            Err(e) => raise(e),
        }
    }
}
