//! `pg_tde_rewind`: the stock `pg_rewind` for a target whose WAL is encrypted.
//!
//! ```text
//! pg_tde_rewind -D /var/lib/postgresql/18/main --source-server='host=new-primary user=postgres' -R
//! ```
//! Every option is `pg_rewind`'s and is passed on.  `pg_rewind` reads the
//! target's WAL from the last checkpoint the two servers share, to find the
//! blocks the target changed after they diverged; with `pg_tde.wal_encrypt =
//! on` those segments are encrypted and it stops at the first page.  This
//! wrapper decrypts the target's WAL segments, with the target's WAL keys and
//! its server key from its key provider, into a private directory outside the
//! data directory (`$PG_TDE_TMPDIR`, else `/dev/shm`, else the system's
//! temporary directory; mode 0700, removed at the end), and runs `pg_rewind`
//! with `--target-wal-dir` (core patch 0008) pointing there.  Relation files
//! are copied as they are on the source (encrypted, under the same relation
//! keys, which replication shares), and so are the source's `pg_tde` files,
//! WAL keys included.  The target's own segments that `pg_rewind` keeps
//! (needed for recovery, gone from the source) are encrypted with keys of the
//! target's that the source's WAL key file may not hold: each one is encrypted
//! again, from its decrypted copy, under a new key recorded in the new key
//! file.  A target without WAL keys is rewound directly.  `-c`
//! (`--restore-target-wal`) is refused: `pg_rewind` would read restored,
//! encrypted segments from `pg_wal`.
#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::process::{Command, ExitCode};

use tde_tools::pgdata::ControlFile;
use tde_tools::{
    decrypt_segment, encrypt_segment, option_values, parse_segment_name, sibling_program, wal_wrapping, PrivateTmp,
    WalKeyring,
};

/// The target data directory named by `-D DIR`, `-DDIR`, `--target-pgdata DIR`
/// or `--target-pgdata=DIR`.
fn target_pgdata(args: &[String]) -> Option<PathBuf> {
    option_values(args, "-D", "--target-pgdata", &[]).pop().map(PathBuf::from)
}

/// Whether `name` is a WAL segment file name (24 hexadecimal digits).
fn is_segment_name(name: &str) -> bool {
    name.len() == 24 && name.bytes().all(|b| b.is_ascii_hexdigit())
}

fn run(args: &[String]) -> Result<i32, String> {
    let pg_rewind = sibling_program("pg_rewind");
    if args.iter().any(|a| a.starts_with("--target-wal-dir")) {
        return Err("--target-wal-dir is set by pg_tde_rewind itself".into());
    }
    let informational = args.iter().any(|a| matches!(a.as_str(), "-?" | "--help" | "-V" | "--version"));
    let target = target_pgdata(args);
    let encrypted = target.as_ref().is_some_and(|d| d.join("pg_tde/wal_keys").exists());
    if informational || !encrypted {
        let status = Command::new(&pg_rewind).args(args).status().map_err(|e| format!("cannot run pg_rewind: {e}"))?;
        return Ok(status.code().unwrap_or(1));
    }
    if args.iter().any(|a| a == "-c" || a == "--restore-target-wal") {
        return Err("-c/--restore-target-wal cannot be used with encrypted WAL: restore the segments the target \
                    needs into its pg_wal first (pg_tde_restore_encrypt)"
            .into());
    }
    let dry_run = args.iter().any(|a| a == "-n" || a == "--dry-run");
    let datadir = target.expect("checked above");
    let seg_size = u64::from(ControlFile::read(&datadir)?.xlog_seg_size);
    let keys = WalKeyring::load(&datadir, &wal_wrapping(&datadir)?)?;
    let tmp = PrivateTmp::new("rewind", &datadir)?;
    let pg_wal = datadir.join("pg_wal");
    let entries =
        std::fs::read_dir(&pg_wal).map_err(|e| format!("could not open directory \"{}\": {e}", pg_wal.display()))?;
    // Each segment's name and a CRC of its encrypted bytes: what pg_rewind leaves unchanged.
    let mut originals = Vec::new();
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if !is_segment_name(&name) {
            continue;
        }
        let mut data =
            std::fs::read(entry.path()).map_err(|e| format!("could not read \"{}\": {e}", entry.path().display()))?;
        originals.push((name.clone(), crc32c::crc32c(&data), data.len()));
        let (tli, segno) = parse_segment_name(&name, seg_size)?;
        decrypt_segment(&mut data, tli, segno, seg_size, &keys).map_err(|e| format!("segment {name}: {e}"))?;
        std::fs::write(tmp.path(&name), &data)
            .map_err(|e| format!("could not write a decrypted copy of {name}: {e}"))?;
    }
    let decrypted = originals.len();
    eprintln!("pg_tde_rewind: decrypted {decrypted} WAL segments of the target for pg_rewind");
    let dir = tmp.path("");
    let status = Command::new(&pg_rewind)
        .args(args)
        .arg(format!("--target-wal-dir={}", dir.display()))
        .status()
        .map_err(|e| format!("cannot run pg_rewind: {e}"))?;
    if status.success() && !dry_run {
        let kept = reencrypt_kept_segments(&datadir, &tmp, &originals, seg_size)?;
        if kept > 0 {
            eprintln!("pg_tde_rewind: encrypted {kept} kept WAL segments of the target under new WAL keys");
        }
    }
    drop(tmp);
    Ok(status.code().unwrap_or(1))
}

/// Encrypt again, under new keys of the rewound data directory (whose WAL key
/// file and server key are now the source's), every segment that pg_rewind
/// left as it was; each is replaced through a temporary file in `pg_wal`.
fn reencrypt_kept_segments(
    datadir: &std::path::Path,
    tmp: &PrivateTmp,
    originals: &[(String, u32, usize)],
    seg_size: u64,
) -> Result<usize, String> {
    let pg_wal = datadir.join("pg_wal");
    let mut wrapping = None;
    let mut kept = 0;
    for (name, crc, len) in originals {
        let path = pg_wal.join(name);
        let Ok(now) = std::fs::read(&path) else { continue }; // removed by pg_rewind
        if now.len() != *len || crc32c::crc32c(&now) != *crc {
            continue; // replaced by the source's copy
        }
        if wrapping.is_none() {
            wrapping = Some(wal_wrapping(datadir)?);
        }
        let mut data = std::fs::read(tmp.path(name)).map_err(|e| format!("could not read the copy of {name}: {e}"))?;
        let (tli, segno) = parse_segment_name(name, seg_size)?;
        encrypt_segment(&mut data, tli, segno, seg_size, datadir, wrapping.as_ref().expect("set above"))?;
        let part = pg_wal.join(format!("{name}.pg_tde_rewind"));
        let replace = || -> std::io::Result<()> {
            std::fs::write(&part, &data)?;
            std::fs::File::open(&part)?.sync_all()?;
            std::fs::rename(&part, &path)?;
            std::fs::File::open(&pg_wal)?.sync_all()
        };
        replace().map_err(|e| format!("could not replace {name}: {e}"))?;
        kept += 1;
    }
    Ok(kept)
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match run(&args) {
        Ok(code) => ExitCode::from(u8::try_from(code).unwrap_or(1)),
        Err(e) => {
            eprintln!("pg_tde_rewind: error: {e}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_target_directory_in_every_spelling() {
        let v = |a: &[&str]| target_pgdata(&a.iter().map(|s| s.to_string()).collect::<Vec<_>>());
        assert_eq!(v(&["-D", "/a"]), Some("/a".into()));
        assert_eq!(v(&["-D/a", "-R"]), Some("/a".into()));
        assert_eq!(v(&["--target-pgdata=/a"]), Some("/a".into()));
        assert_eq!(v(&["--target-pgdata", "/a", "--source-server=x"]), Some("/a".into()));
        assert_eq!(v(&["--source-pgdata=/b"]), None);
        assert!(is_segment_name("000000010000000000000003"));
        assert!(!is_segment_name("00000002.history"));
    }
}
