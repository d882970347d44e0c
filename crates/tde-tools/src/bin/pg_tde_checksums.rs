//! `pg_tde_checksums`: `pg_checksums` for a cluster with encrypted relations.
//!
//! ```text
//! pg_tde_checksums [-D DATADIR] [-c|--check | -e|--enable | -d|--disable] [-f FILENODE] [-N|--no-sync] [-v|--verbose]
//! ```
//! The options and the report are `pg_checksums`'s.  The cluster must be shut
//! down cleanly.  A page of an encrypted relation is decrypted with its
//! relation's key (unwrapped with the principal key, fetched from the cluster's
//! key provider), its checksum computed or checked on the plaintext, as the
//! server does, and, to enable checksums, the page is encrypted again under the
//! same key and tweak and written back in place.  Pages of plaintext relations
//! are handled exactly as `pg_checksums` handles them.  Stock `pg_checksums`
//! would check ciphertext (every encrypted page "corrupt") and, to enable
//! checksums, write a checksum into ciphertext (every encrypted page
//! destroyed); pg_tde's core patch makes it refuse such a cluster.
#![forbid(unsafe_code)]

use std::fs::OpenOptions;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use tde_core::PageCipher;
use tde_tools::data_dir;
use tde_tools::pgdata::{
    page_checksum, page_header_is_valid, page_is_new, relation_files, set_checksum, stored_checksum, tweak_fork,
    ControlFile, RelationFile, RelationKeys, BLCKSZ,
};
use zeroize::Zeroizing;

const USAGE: &str = "usage: pg_tde_checksums [-D DATADIR] [-c|--check | -e|--enable | -d|--disable] \
                     [-f FILENODE] [-N|--no-sync] [-v|--verbose]";

#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    Check,
    Enable,
    Disable,
}

struct Options {
    datadir: PathBuf,
    mode: Mode,
    filenode: Option<u32>,
    sync: bool,
    verbose: bool,
}

fn parse(argv: &[String]) -> Result<Options, String> {
    let mut datadir = None;
    let mut mode = None;
    let mut filenode = None;
    let mut sync = true;
    let mut verbose = false;
    let mut it = argv.iter();
    let set_mode = |m: Mode, mode: &mut Option<Mode>| match mode.replace(m) {
        Some(prev) if prev != m => Err("only one of --check, --enable and --disable can be given".to_string()),
        _ => Ok(()),
    };
    while let Some(a) = it.next() {
        match a.as_str() {
            "-D" | "--pgdata" => datadir = Some(PathBuf::from(it.next().ok_or("-D needs a directory")?)),
            s if s.starts_with("--pgdata=") => datadir = Some(PathBuf::from(&s["--pgdata=".len()..])),
            "-c" | "--check" => set_mode(Mode::Check, &mut mode)?,
            "-e" | "--enable" => set_mode(Mode::Enable, &mut mode)?,
            "-d" | "--disable" => set_mode(Mode::Disable, &mut mode)?,
            "-f" | "--filenode" => {
                let v = it.next().ok_or("-f needs a file node number")?;
                filenode = Some(v.parse().map_err(|_| format!("invalid filenode specification: \"{v}\""))?);
            }
            "-N" | "--no-sync" => sync = false,
            "-v" | "--verbose" => verbose = true,
            "-P" | "--progress" => {}
            "--help" | "-?" => return Err(USAGE.into()),
            other => return Err(format!("unrecognised argument \"{other}\"\n{USAGE}")),
        }
    }
    let mode = mode.unwrap_or(Mode::Check);
    if filenode.is_some() && mode != Mode::Check {
        return Err("option -f/--filenode can only be used with --check".into());
    }
    Ok(Options { datadir: data_dir(datadir), mode, filenode, sync, verbose })
}

#[derive(Default)]
struct Totals {
    files_scanned: u64,
    files_written: u64,
    blocks_scanned: u64,
    blocks_written: u64,
    bad: u64,
}

fn run(argv: &[String]) -> Result<bool, String> {
    let o = parse(argv)?;
    let mut control = ControlFile::read(&o.datadir)?;
    if !control.shut_down() {
        return Err("cluster must be shut down".into());
    }
    let version = control.checksum_version();
    match o.mode {
        Mode::Check if version == 0 => return Err("data checksums are not enabled in cluster".into()),
        Mode::Enable if version != 0 => return Err("data checksums are already enabled in cluster".into()),
        Mode::Disable if version == 0 => return Err("data checksums are already disabled in cluster".into()),
        _ => {}
    }
    if o.mode == Mode::Disable {
        control.write_checksum_version(0, o.sync)?;
        println!("Checksums disabled in cluster");
        return Ok(true);
    }

    let keys = RelationKeys::load(&o.datadir)?;
    let files: Vec<_> = relation_files(&o.datadir, &control)?
        .into_iter()
        .filter(|f| o.filenode.is_none_or(|n| n == f.rel_number))
        .collect();
    let mut totals = Totals::default();
    if o.mode == Mode::Enable {
        // Every page is read (and decrypted) and its header checked before the
        // first one is written: a file encrypted with a key this tool does not
        // have (a key map missing from pg_tde/) would otherwise get checksums
        // written into its ciphertext.
        let mut invalid = Vec::new();
        for file in &files {
            scan_file(file, keys.cipher_of(file), control.relseg_size, false, |i, page| {
                if !page_is_new(page) && !page_header_is_valid(page) {
                    invalid.push(format!("block {i} of \"{}\"", file.path.display()));
                }
                None
            })?;
        }
        if !invalid.is_empty() {
            let shown = invalid.iter().take(5).cloned().collect::<Vec<_>>().join(", ");
            return Err(format!(
                "{} pages have no valid page header ({shown}{}): corrupt, or encrypted with a key that this \
                 data directory's pg_tde key maps do not hold; nothing was changed",
                invalid.len(),
                if invalid.len() > 5 { ", ..." } else { "" }
            ));
        }
    }
    for file in &files {
        let cipher = keys.cipher_of(file);
        totals.files_scanned += 1;
        let write = o.mode == Mode::Enable;
        let (scanned, written) = scan_file(file, cipher, control.relseg_size, write, |i, page| {
            if page_is_new(page) {
                return None;
            }
            let blkno = file.segment * control.relseg_size + i;
            let sum = page_checksum(page, blkno);
            match o.mode {
                Mode::Check => {
                    if !page_header_is_valid(page) {
                        eprintln!(
                            "pg_tde_checksums: error: invalid page header in file \"{}\", block {i}",
                            file.path.display()
                        );
                        totals.bad += 1;
                    } else if sum != stored_checksum(page) {
                        eprintln!(
                            "pg_tde_checksums: error: checksum verification failed in file \"{}\", block {i}: \
                             calculated checksum {sum:X} but block contains {:X}",
                            file.path.display(),
                            stored_checksum(page)
                        );
                        totals.bad += 1;
                    }
                    None
                }
                _ => (sum != stored_checksum(page)).then_some(sum),
            }
        })?;
        totals.blocks_scanned += scanned;
        if written > 0 {
            totals.files_written += 1;
            totals.blocks_written += written;
            if o.sync {
                std::fs::File::open(&file.path)
                    .and_then(|f| f.sync_all())
                    .map_err(|e| format!("could not fsync \"{}\": {e}", file.path.display()))?;
            }
        }
        if o.verbose {
            let what = if cipher.is_some() { "encrypted" } else { "plaintext" };
            println!("pg_tde_checksums: checksums verified in file \"{}\" ({what})", file.path.display());
        }
    }

    println!("Checksum operation completed");
    println!("Files scanned:   {}", totals.files_scanned);
    println!("Blocks scanned:  {}", totals.blocks_scanned);
    if o.mode == Mode::Check {
        println!("Bad checksums:  {}", totals.bad);
        println!("Data checksum version: {version}");
        return Ok(totals.bad == 0);
    }
    println!("Files written:  {}", totals.files_written);
    println!("Blocks written: {}", totals.blocks_written);
    if o.sync {
        println!("Syncing data directory");
    }
    control.write_checksum_version(1, o.sync)?;
    println!("Updating control file");
    println!("Data checksum version: 1");
    println!("Checksums enabled in cluster");
    Ok(true)
}

/// Read every block of `file`, decrypted when it has a `cipher`, and hand it to
/// `visit` with its block number in the file; all-zero blocks (never written)
/// are skipped.  When `visit` returns a checksum and `write` is set, the
/// checksum is stored in the page, which is encrypted again under the same key
/// and tweak and written back in place.  Returns (blocks read, blocks written).
fn scan_file(
    file: &RelationFile,
    cipher: Option<&PageCipher>,
    relseg_size: u32,
    write: bool,
    mut visit: impl FnMut(u32, &[u8]) -> Option<u16>,
) -> Result<(u64, u64), String> {
    let mut f = OpenOptions::new()
        .read(true)
        .write(write)
        .open(&file.path)
        .map_err(|e| format!("could not open file \"{}\": {e}", file.path.display()))?;
    let mut page = Zeroizing::new(vec![0u8; BLCKSZ]);
    let (mut scanned, mut written) = (0, 0);
    for i in 0u32.. {
        let got =
            read_block(&mut f, &mut page).map_err(|e| format!("could not read \"{}\": {e}", file.path.display()))?;
        if got == 0 {
            break;
        }
        if got != BLCKSZ {
            return Err(format!(
                "could not read block {i} in file \"{}\": read {got} of {BLCKSZ}",
                file.path.display()
            ));
        }
        scanned += 1;
        if page.iter().all(|&b| b == 0) {
            continue;
        }
        let blkno = file.segment * relseg_size + i;
        if let Some(c) = cipher {
            c.decrypt_page(tweak_fork(file.fork), blkno, &mut page);
        }
        let Some(sum) = visit(i, &page) else { continue };
        if !write {
            continue;
        }
        set_checksum(&mut page, sum);
        if let Some(c) = cipher {
            c.encrypt_page(tweak_fork(file.fork), blkno, &mut page);
        }
        f.seek(SeekFrom::Start(u64::from(i) * BLCKSZ as u64))
            .and_then(|_| f.write_all(&page))
            .map_err(|e| format!("could not write block {i} in file \"{}\": {e}", file.path.display()))?;
        written += 1;
    }
    Ok((scanned, written))
}

/// Read up to one block; fewer bytes only at the end of the file.
fn read_block(f: &mut std::fs::File, page: &mut [u8]) -> std::io::Result<usize> {
    let mut got = 0;
    while got < page.len() {
        match f.read(&mut page[got..])? {
            0 => break,
            n => got += n,
        }
    }
    Ok(got)
}

fn main() -> ExitCode {
    let argv: Vec<String> = std::env::args().skip(1).collect();
    match run(&argv) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("pg_tde_checksums: error: {e}");
            ExitCode::FAILURE
        }
    }
}
