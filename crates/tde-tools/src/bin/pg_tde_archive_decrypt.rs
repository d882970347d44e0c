//! `pg_tde_archive_decrypt`: an `archive_command` wrapper that hands the real
//! archive command a decrypted copy of the segment, so that archives and
//! backup tools (pgBackRest, Barman, ...) store WAL they can read.
//!
//! ```text
//! archive_command = 'pg_tde_archive_decrypt %f %p "cp %%p /archive/%%f"'
//! ```
//! In the wrapped command `%p` is the decrypted copy's path and `%f` the file
//! name.  Runs in the data directory (or `-D DATADIR`).  The archive then holds
//! plaintext WAL: protect it accordingly, or encrypt it in the archive tool.
//! The decrypted copy lives outside the data directory, in a private
//! directory under `$PG_TDE_TMPDIR`, `/dev/shm` or the system's temporary
//! directory, while the command runs.
#![forbid(unsafe_code)]

use std::process::ExitCode;

use tde_tools::{
    decrypt_segment, exit_with, parse_segment_name, run_shell, segment_size_of, wal_wrapping, wrapper_args, PrivateTmp,
    WalKeyring,
};

fn run(argv: &[String]) -> Result<(), String> {
    let (datadir, fname, path, command) =
        wrapper_args(argv, "usage: pg_tde_archive_decrypt [-D DATADIR] %f %p \"COMMAND with %p and %f\"")?;
    let src = datadir.join(path);
    let mut data = std::fs::read(&src).map_err(|e| format!("cannot read \"{}\": {e}", src.display()))?;
    // Only segments carry WAL pages; history and backup-label files are copied as they are.
    let seg_size = segment_size_of(data.len() as u64);
    if let Ok((tli, segno)) = parse_segment_name(fname, seg_size) {
        let sk = wal_wrapping(&datadir)?;
        let keys = WalKeyring::load(&datadir, &sk)?;
        decrypt_segment(&mut data, tli, segno, seg_size, &keys)?;
    }
    let tmpdir = PrivateTmp::new("archive", &datadir)?;
    let tmp = tmpdir.path(fname);
    std::fs::write(&tmp, &data).map_err(|e| format!("cannot write \"{}\": {e}", tmp.display()))?;
    let cmd = command.replace("%p", &tmp.display().to_string()).replace("%f", fname);
    run_shell(&cmd)
}

fn main() -> ExitCode {
    let argv: Vec<String> = std::env::args().skip(1).collect();
    exit_with("pg_tde_archive_decrypt", run(&argv))
}
