//! `pg_tde_restore_encrypt`: a `restore_command` wrapper that runs the real
//! restore command into a temporary file and stores the segment in `pg_wal`
//! encrypted again, with a new WAL key valid for that segment only.
//!
//! ```text
//! restore_command = 'pg_tde_restore_encrypt %f %p "cp /archive/%%f %%p"'
//! ```
//! In the wrapped command `%p` is the temporary path to restore into.  Runs in
//! the data directory (or `-D DATADIR`).  Non-segment files (timeline history)
//! are passed through unchanged.  The temporary path is in a private
//! directory outside the data directory (see `PrivateTmp`); the key record is
//! appended under the WAL key file's lock, which the server takes too.
#![forbid(unsafe_code)]

use std::process::ExitCode;

use tde_tools::{
    encrypt_segment, exit_with, parse_segment_name, run_shell, segment_size_of, wal_wrapping, wrapper_args, PrivateTmp,
};

fn run(argv: &[String]) -> Result<(), String> {
    let (datadir, fname, path, command) =
        wrapper_args(argv, "usage: pg_tde_restore_encrypt [-D DATADIR] %f %p \"COMMAND restoring %f into %p\"")?;
    let tmpdir = PrivateTmp::new("restore", &datadir)?;
    let tmp = tmpdir.path(fname);
    let cmd = command.replace("%p", &tmp.display().to_string()).replace("%f", fname);
    run_shell(&cmd)?;
    let mut data = std::fs::read(&tmp).map_err(|e| format!("cannot read \"{}\": {e}", tmp.display()))?;
    drop(tmpdir);
    let data = &mut data;
    let seg_size = segment_size_of(data.len() as u64);
    if let Ok((tli, segno)) = parse_segment_name(fname, seg_size) {
        let sk = wal_wrapping(&datadir)?;
        encrypt_segment(data, tli, segno, seg_size, &datadir, &sk)?;
    }
    let dst = datadir.join(path);
    std::fs::write(&dst, &data).map_err(|e| format!("cannot write \"{}\": {e}", dst.display()))
}

fn main() -> ExitCode {
    let argv: Vec<String> = std::env::args().skip(1).collect();
    exit_with("pg_tde_restore_encrypt", run(&argv))
}
