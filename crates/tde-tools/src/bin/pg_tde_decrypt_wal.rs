//! `pg_tde_decrypt_wal`: write decrypted copies of WAL segment files, so that
//! stock tools such as `pg_waldump` can read them.
//!
//! ```text
//! pg_tde_decrypt_wal [-D DATADIR] -o OUTDIR SEGMENT_FILE...
//! ```
//! The keys come from DATADIR's `pg_tde` (WAL keys, server key) and its key
//! provider.  Pages that are not encrypted are copied as they are.
#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::process::ExitCode;

use tde_tools::{data_dir, decrypt_segment, exit_with, parse_segment_name, segment_size_of, wal_wrapping, WalKeyring};

fn run(argv: &[String]) -> Result<(), String> {
    let mut datadir = None;
    let mut out = None;
    let mut files = Vec::new();
    let mut it = argv.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "-D" => datadir = Some(PathBuf::from(it.next().ok_or("-D needs a directory")?)),
            "-o" => out = Some(PathBuf::from(it.next().ok_or("-o needs a directory")?)),
            _ => files.push(PathBuf::from(a)),
        }
    }
    let out = out.ok_or("usage: pg_tde_decrypt_wal [-D DATADIR] -o OUTDIR SEGMENT_FILE...")?;
    if files.is_empty() {
        return Err("no segment files given".into());
    }
    let datadir = data_dir(datadir);
    let sk = wal_wrapping(&datadir)?;
    let keys = WalKeyring::load(&datadir, &sk)?;
    std::fs::create_dir_all(&out).map_err(|e| format!("cannot create \"{}\": {e}", out.display()))?;
    for f in files {
        let name = f.file_name().and_then(|n| n.to_str()).ok_or("bad file name")?.to_string();
        let mut data = std::fs::read(&f).map_err(|e| format!("cannot read \"{}\": {e}", f.display()))?;
        let seg_size = segment_size_of(data.len() as u64);
        let (tli, segno) = parse_segment_name(&name, seg_size)?;
        decrypt_segment(&mut data, tli, segno, seg_size, &keys)?;
        std::fs::write(out.join(&name), &data).map_err(|e| format!("cannot write: {e}"))?;
    }
    Ok(())
}

fn main() -> ExitCode {
    let argv: Vec<String> = std::env::args().skip(1).collect();
    exit_with("pg_tde_decrypt_wal", run(&argv))
}
