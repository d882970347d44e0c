//! `pg_tde_upgrade`: the stock `pg_upgrade` for a cluster with encrypted relations.
//!
//! ```text
//! pg_tde_upgrade -b OLD_BINDIR -B NEW_BINDIR -d OLD_DATADIR -D NEW_DATADIR [--link | --copy | --clone | --swap] ...
//! ```
//! Every option is `pg_upgrade`'s and is passed on; `pg_tde` must be in the new
//! cluster's `shared_preload_libraries`.  `pg_upgrade` keeps database OIDs,
//! tablespace OIDs and relation file numbers, and moves or copies relation
//! files as they are (encrypted), but knows nothing of `$PGDATA/pg_tde`:
//!
//! 1. before it runs, the old cluster's key provider catalog, principal-key
//!    maps and relation key maps are copied into the new cluster, so that the
//!    schema it restores there (`CREATE TABLE … USING tde_heap`) finds each
//!    database's principal key;
//! 2. that restore gives every encrypted relation a new key in the new
//!    cluster, but the files `pg_upgrade` then brings over are encrypted with
//!    the old keys: once it has succeeded, the old relation key maps replace the
//!    new ones (the relation file numbers are the same, and the new cluster,
//!    stopped, starts from the checkpoint `pg_upgrade` made, so no WAL replays
//!    the keys it replaces).
//!
//! The WAL key file is not copied: the new cluster has WAL of its own.  With
//! `--check`, only step 1 runs.
#![forbid(unsafe_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

use tde_tools::{option_values, sibling_program};

/// The value of an option given as `-x V`, `-xV`, `--long V` or `--long=V`
/// (the last one given wins), else the environment variable `env`.
fn option_value(args: &[String], short: &str, long: &str, env: &str) -> Option<PathBuf> {
    // The values of options that pass options on to the servers are not ours.
    option_values(args, short, long, &["-o", "-O", "--old-options", "--new-options"])
        .pop()
        .map(PathBuf::from)
        .or_else(|| std::env::var_os(env).map(PathBuf::from))
}

/// Whether a file of `pg_tde/` is copied before `pg_upgrade` runs (everything
/// but the WAL keys and temporary files) and whether it is a relation key map.
fn copied_before(name: &str) -> bool {
    name == "providers.json" || name == "server_key" || name == "default_key" || is_relation_map(name)
}

fn is_relation_map(name: &str) -> bool {
    name.strip_suffix("_keys").is_some_and(|d| !d.is_empty() && d.bytes().all(|b| b.is_ascii_digit()))
}

/// Copy the files of `from/pg_tde` that `pick` selects into `to/pg_tde`, each
/// through a temporary file, renamed into place and synced.
fn copy_tde_files(from: &Path, to: &Path, pick: fn(&str) -> bool) -> Result<usize, String> {
    let src = from.join("pg_tde");
    let dst = to.join("pg_tde");
    let entries = match std::fs::read_dir(&src) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(format!("could not open directory \"{}\": {e}", src.display())),
    };
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .mode(0o700)
        .recursive(true)
        .create(&dst)
        .map_err(|e| format!("could not create \"{}\": {e}", dst.display()))?;
    let mut copied = 0;
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if !pick(&name) {
            continue;
        }
        let tmp = dst.join(format!("{name}.upgrade.tmp"));
        let target = dst.join(&name);
        let copy = || -> std::io::Result<()> {
            std::fs::copy(entry.path(), &tmp)?;
            std::fs::File::open(&tmp)?.sync_all()?;
            std::fs::rename(&tmp, &target)
        };
        copy()
            .map_err(|e| format!("could not copy \"{}\" to \"{}\": {e}", entry.path().display(), target.display()))?;
        copied += 1;
    }
    std::fs::File::open(&dst)
        .and_then(|d| d.sync_all())
        .map_err(|e| format!("could not sync \"{}\": {e}", dst.display()))?;
    Ok(copied)
}

fn run(args: &[String]) -> Result<i32, String> {
    let pg_upgrade = sibling_program("pg_upgrade");
    let informational = args.iter().any(|a| matches!(a.as_str(), "-?" | "--help" | "-V" | "--version"));
    let old = option_value(args, "-d", "--old-datadir", "PGDATAOLD");
    let new = option_value(args, "-D", "--new-datadir", "PGDATANEW");
    let (Some(old), Some(new), false) = (old, new, informational) else {
        let status =
            Command::new(&pg_upgrade).args(args).status().map_err(|e| format!("cannot run pg_upgrade: {e}"))?;
        return Ok(status.code().unwrap_or(1));
    };
    let check_only = args.iter().any(|a| a == "-c" || a == "--check");
    if new.join("pg_tde/wal_keys").exists() {
        return Err(format!(
            "the new cluster \"{}\" already has WAL keys of its own, which the old cluster's server key would not \
             unwrap: run initdb for it again",
            new.display()
        ));
    }
    let n = copy_tde_files(&old, &new, copied_before)?;
    if n > 0 {
        eprintln!("pg_tde_upgrade: copied {n} pg_tde key files into the new cluster");
    }
    let status = Command::new(&pg_upgrade).args(args).status().map_err(|e| format!("cannot run pg_upgrade: {e}"))?;
    if !status.success() || check_only {
        return Ok(status.code().unwrap_or(1));
    }
    let n = copy_tde_files(&old, &new, is_relation_map)?;
    eprintln!("pg_tde_upgrade: the new cluster uses the old cluster's relation keys ({n} key maps)");
    Ok(0)
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match run(&args) {
        Ok(code) => ExitCode::from(u8::try_from(code).unwrap_or(1)),
        Err(e) => {
            eprintln!("pg_tde_upgrade: error: {e}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_and_files() {
        let a = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(option_value(&a(&["-d", "/o", "-D/n"]), "-D", "--new-datadir", "X_UNSET"), Some("/n".into()));
        assert_eq!(option_value(&a(&["--old-datadir=/o"]), "-d", "--old-datadir", "X_UNSET"), Some("/o".into()));
        assert_eq!(option_value(&a(&["-o", "-d 5", "-d", "/o"]), "-d", "--old-datadir", "X_UNSET"), Some("/o".into()));
        assert!(copied_before("16384_keys") && copied_before("providers.json") && copied_before("server_key"));
        assert!(!copied_before("wal_keys") && !copied_before("x_keys") && !copied_before("16384_keys.tmp"));
        assert!(is_relation_map("5_keys") && !is_relation_map("default_key"));
    }
}
