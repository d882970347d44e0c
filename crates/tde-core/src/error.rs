//! Error type shared by every module of the crate.
//!
//! The variants are chosen so that the SQL layer can map them to SQLSTATEs
//! without parsing messages:
//!
//! | variant    | meaning                                              | typical SQLSTATE             |
//! |------------|------------------------------------------------------|------------------------------|
//! | `Io`       | an operating-system call failed                      | `io_error` / `internal_error`|
//! | `Corrupt`  | a file is damaged: CRC mismatch, bad magic, version  | `data_corrupted`             |
//! | `Decrypt`  | an authentication tag did not verify                 | `data_corrupted`             |
//! | `NotFound` | a file or object does not exist                      | `undefined_object`           |
//! | `Invalid`  | the caller passed bad input                          | `invalid_parameter_value`    |
//! | `Provider` | a key provider failed or answered unexpectedly       | `external_routine_exception` |
//! | `Refused`  | a KMS refused: key revoked, disabled, deleted, expired, or permission removed | `external_routine_exception` |
//!
//! No message built by this crate ever contains key bytes.

/// Errors returned by `tde-core`.
#[derive(thiserror::Error, Debug)]
pub enum TdeError {
    /// An I/O operation failed; `context` says what was being done and on which path.
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    /// A file is damaged (CRC mismatch, bad magic or version, truncated record).
    #[error("corrupt data: {0}")]
    Corrupt(String),
    /// Authenticated decryption failed: wrong key, or the data was tampered with.
    #[error("decryption failed: {0}")]
    Decrypt(String),
    /// The requested file or object does not exist.
    #[error("not found: {0}")]
    NotFound(String),
    /// The caller passed invalid input.
    #[error("invalid input: {0}")]
    Invalid(String),
    /// A key provider failed.
    #[error("key provider error: {0}")]
    Provider(String),
    /// A KMS answered and refused the key: it is revoked, disabled, deleted or
    /// expired, or the credentials lost the permission to use it. Unlike
    /// [`TdeError::Provider`] this is a definite "no", not an outage.
    #[error("key refused by the KMS: {0}")]
    Refused(String),
}

/// `Result` with [`TdeError`].
pub type Result<T> = std::result::Result<T, TdeError>;

impl TdeError {
    /// Build an [`TdeError::Io`] from a context string and the underlying error.
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        TdeError::Io { context: context.into(), source }
    }
}
