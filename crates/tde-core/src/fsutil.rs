//! Durable file replacement helpers.
//!
//! Files are never rewritten in place: the new content goes to `<path>.tmp`, which is
//! fsynced, then renamed (or hard-linked, for create-if-absent) over `<path>`, and the
//! directory is fsynced so that the rename itself survives a crash. Writers of one path
//! must be serialized by the caller (the `.tmp` name is fixed, so that a crash never
//! leaves more than one stale temporary file behind).

use std::fs::{self, File, OpenOptions, Permissions};
use std::io::{ErrorKind, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::error::{Result, TdeError};

/// `<path>.tmp`.
pub(crate) fn tmp_path(path: &Path) -> PathBuf {
    let mut s = path.as_os_str().to_os_string();
    s.push(".tmp");
    PathBuf::from(s)
}

/// The directory containing `path` (`.` for a bare file name).
pub(crate) fn parent_dir(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// fsync a directory, making renames and new names in it durable.
pub(crate) fn fsync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| TdeError::io(format!("fsync of directory {}", dir.display()), e))
}

/// Remove a file, ignoring "not found".
fn remove_if_exists(path: &Path) -> Result<()> {
    match fs::remove_file(path) {
        Err(e) if e.kind() != ErrorKind::NotFound => {
            Err(TdeError::io(format!("could not remove {}", path.display()), e))
        }
        _ => Ok(()),
    }
}

/// Write `bytes` to a fresh `<path>.tmp` with permissions `mode`, fsync it and return its path.
fn write_tmp(path: &Path, bytes: &[u8], mode: u32) -> Result<PathBuf> {
    let tmp = tmp_path(path);
    // A stale temporary file may be left by a crash; never write through it (it could
    // even be a hard link to the live file, see `create_atomic`).
    remove_if_exists(&tmp)?;
    let ctx = |what: &str| format!("could not {what} {}", tmp.display());
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .map_err(|e| TdeError::io(ctx("create"), e))?;
    let result =
        f.set_permissions(Permissions::from_mode(mode)).and_then(|_| f.write_all(bytes)).and_then(|_| f.sync_all());
    if let Err(e) = result {
        drop(f);
        let _ = fs::remove_file(&tmp);
        return Err(TdeError::io(ctx("write"), e));
    }
    Ok(tmp)
}

/// Load the file `what` at `path` with `parse`; a missing file is `missing()`.  A
/// damaged file's [`TdeError::Corrupt`] message names it.
pub(crate) fn load_or<T>(
    path: &Path,
    what: &str,
    parse: impl FnOnce(&[u8]) -> Result<T>,
    missing: impl FnOnce() -> T,
) -> Result<T> {
    match std::fs::read(path) {
        Ok(bytes) => parse(&bytes).map_err(|e| match e {
            TdeError::Corrupt(m) => TdeError::Corrupt(format!("{what} \"{}\": {m}", path.display())),
            other => other,
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(missing()),
        Err(e) => Err(TdeError::io(format!("could not read {what} \"{}\"", path.display()), e)),
    }
}

/// Atomically replace (or create) `path` with `bytes`: tmp + fsync + rename + directory fsync.
pub(crate) fn replace_atomic(path: &Path, bytes: &[u8], mode: u32) -> Result<()> {
    let tmp = write_tmp(path, bytes, mode)?;
    if let Err(e) = fs::rename(&tmp, path) {
        let _ = fs::remove_file(&tmp);
        return Err(TdeError::io(format!("could not rename {} to {}", tmp.display(), path.display()), e));
    }
    fsync_dir(parent_dir(path))
}

/// Atomically create `path` with `bytes`, failing with [`TdeError::Invalid`] if it exists.
///
/// The complete, fsynced temporary file is hard-linked to `path` (which fails atomically
/// if `path` exists), then the temporary name is removed and the directory fsynced.
pub(crate) fn create_atomic(path: &Path, bytes: &[u8], mode: u32) -> Result<()> {
    let tmp = write_tmp(path, bytes, mode)?;
    let linked = fs::hard_link(&tmp, path);
    remove_if_exists(&tmp)?;
    match linked {
        Ok(()) => fsync_dir(parent_dir(path)),
        Err(e) if e.kind() == ErrorKind::AlreadyExists => {
            Err(TdeError::Invalid(format!("{} already exists", path.display())))
        }
        Err(e) => Err(TdeError::io(format!("could not create {}", path.display()), e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replace_and_create() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        create_atomic(&p, b"one", 0o600).unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"one");
        assert!(matches!(create_atomic(&p, b"two", 0o600), Err(TdeError::Invalid(_))));
        assert_eq!(fs::read(&p).unwrap(), b"one");
        replace_atomic(&p, b"three", 0o600).unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"three");
        assert!(!tmp_path(&p).exists());
        let mode = fs::metadata(&p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
    }

    #[test]
    fn stale_tmp_from_a_crash_is_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        create_atomic(&p, b"live", 0o600).unwrap();
        // simulate a crash between link and unlink in create_atomic
        fs::hard_link(&p, tmp_path(&p)).unwrap();
        replace_atomic(&p, b"new", 0o600).unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"new");
        assert!(!tmp_path(&p).exists());
        // and a stale tmp does not block create_atomic either
        let q = dir.path().join("q");
        fs::write(tmp_path(&q), b"garbage").unwrap();
        create_atomic(&q, b"fresh", 0o600).unwrap();
        assert_eq!(fs::read(&q).unwrap(), b"fresh");
        assert!(!tmp_path(&q).exists());
    }
}
