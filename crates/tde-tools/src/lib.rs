//! Shared code of pg_tde's command-line tools: reading a data directory's
//! pg_tde files (server key, WAL keys) and transforming WAL segment files.
#![forbid(unsafe_code)]

pub mod pgdata;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use tde_core::keymap;
use tde_core::providers_catalog::{open_provider_in, ProviderCatalog};
use tde_core::wal::{self, WalCipher, HEADER_PREFIX};
use tde_core::walkeys::{self, KeyRanges, WalKey, Wrapping};

/// WAL segment size assumed when a segment file's size does not tell.
pub const DEFAULT_SEGMENT_SIZE: u64 = 16 * 1024 * 1024;

/// A data directory from `-D`, else `$PGDATA`, else the working directory
/// (archive and restore commands run in the data directory).
pub fn data_dir(arg: Option<PathBuf>) -> PathBuf {
    arg.or_else(|| std::env::var_os("PGDATA").map(PathBuf::from)).unwrap_or_else(|| PathBuf::from("."))
}

/// What unwraps a data directory's WAL keys: its server key, fetched from
/// its provider and checked against the server key map, and the WAL
/// key-encryption key that the map holds.
pub fn wal_wrapping(datadir: &Path) -> Result<Wrapping, String> {
    let tde = datadir.join("pg_tde");
    let (header, entries) = keymap::read(&tde.join("server_key")).map_err(|e| format!("no usable server key: {e}"))?;
    let catalog = ProviderCatalog::load(&tde.join("providers.json")).map_err(|e| e.to_string())?;
    let rec = catalog
        .by_id(header.principal.provider_id)
        .ok_or_else(|| format!("key provider {} of the server key does not exist", header.principal.provider_id))?;
    let provider = open_provider_in(rec, &tde).map_err(|e| e.to_string())?;
    let key = provider.get_key(&header.principal.name).map_err(|e| e.to_string())?.ok_or_else(|| {
        format!("server key \"{}\" not found in key provider \"{}\"", header.principal.name, rec.name)
    })?;
    header
        .verify_principal(&key.key)
        .map_err(|_| "the server key in the provider differs from the key in use".to_string())?;
    Wrapping::from_server_map(SERVER_KEY_DB, &header, &entries, key.key).map_err(|e| e.to_string())
}

/// Pseudo database OID of the server key map (as the extension stores it).
const SERVER_KEY_DB: u32 = u32::MAX - 2;

/// The WAL keys of a data directory.
pub struct WalKeyring {
    ranges: KeyRanges,
}

impl WalKeyring {
    pub fn load(datadir: &Path, wrapping: &Wrapping) -> Result<Self, String> {
        let keys = walkeys::read_all(&datadir.join("pg_tde/wal_keys"), wrapping).map_err(|e| e.to_string())?;
        Ok(WalKeyring { ranges: KeyRanges::from_keys(&keys).map_err(|e| e.to_string())? })
    }
}

/// Segment number and timeline from a WAL segment file name
/// (`TTTTTTTTXXXXXXXXYYYYYYYY`, possibly with a `.partial` suffix).
pub fn parse_segment_name(name: &str, seg_size: u64) -> Result<(u32, u64), String> {
    let base = name.strip_suffix(".partial").unwrap_or(name);
    if base.len() != 24 || !base.chars().all(|c| c.is_ascii_hexdigit()) {
        return Err(format!("\"{name}\" is not a WAL segment file name"));
    }
    let hex = |s: &str| u64::from_str_radix(s, 16).map_err(|e| e.to_string());
    let tli = hex(&base[0..8])? as u32;
    let log = hex(&base[8..16])?;
    let seg = hex(&base[16..24])?;
    let per_log = 0x1_0000_0000u64 / seg_size;
    Ok((tli, log * per_log + seg))
}

/// Decrypt a whole WAL segment in memory (pages that are not encrypted are left as they are).
/// `tli` is the segment file's timeline (from its name).
pub fn decrypt_segment(data: &mut [u8], tli: u32, segno: u64, seg_size: u64, keys: &WalKeyring) -> Result<(), String> {
    let start = segno * seg_size;
    wal::decrypt_after_read(data, start, tli, &keys.ranges, &mut |_| Ok([0u8; HEADER_PREFIX]))
        .map_err(|e| e.to_string())
}

/// Encrypt a whole plaintext WAL segment with a new key valid for exactly this
/// segment's LSN range and timeline (`tli`, from its name), recorded in the
/// data directory's WAL key file first.  Restoring the same segment again, or
/// the same LSN range of another timeline, takes another new key.
pub fn encrypt_segment(
    data: &mut [u8],
    tli: u32,
    segno: u64,
    seg_size: u64,
    datadir: &Path,
    wrapping: &Wrapping,
) -> Result<(), String> {
    let start = segno * seg_size;
    let (key, base) = wal::generate_key(wrapping.wal_key_len()).map_err(|e| e.to_string())?;
    // A data directory whose server key map predates the key-encryption key
    // keeps writing records of the old format, which carry no timeline.
    let timeline = if wrapping.has_kek() { tli } else { 0 };
    let record = WalKey { start_lsn: start, end_lsn: start + seg_size, timeline, created_unix_secs: now(), key, base };
    walkeys::append(&datadir.join("pg_tde/wal_keys"), wrapping, &record).map_err(|e| e.to_string())?;
    let mut ranges = KeyRanges::default();
    ranges.push(
        start,
        start + seg_size,
        Some(Arc::new(WalCipher::new(&record.key, &record.base).map_err(|e| e.to_string())?)),
    );
    // Only pages with a valid header are WAL; leave empty (zero) pages as they are.
    let end = start + data.len() as u64;
    let mut page = start;
    while page < end {
        let off = (page - start) as usize;
        let len = (wal::WAL_PAGE_SIZE as usize).min(data.len() - off);
        let magic = u16::from_le_bytes([data[off], data[off + 1]]);
        if magic != 0 {
            let chunk = &mut data[off..off + len];
            wal::encrypt_for_write(chunk, page, page + len as u64, tli, &ranges, &mut |_| Ok([0u8; HEADER_PREFIX]))
                .map_err(|e| e.to_string())?;
        }
        page += wal::WAL_PAGE_SIZE;
    }
    Ok(())
}

fn now() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0)
}

/// Segment size of a WAL file from its length (complete segments) or the default.
pub fn segment_size_of(len: u64) -> u64 {
    if len.is_power_of_two() && len >= 1024 * 1024 {
        len
    } else {
        DEFAULT_SEGMENT_SIZE
    }
}

/// Arguments of the archive/restore wrappers: `[-D DATADIR] %f %p COMMAND`.
pub fn wrapper_args<'a>(argv: &'a [String], usage: &str) -> Result<(PathBuf, &'a str, &'a str, &'a str), String> {
    let (datadir, rest) = match argv {
        [d, dir, rest @ ..] if d == "-D" => (Some(PathBuf::from(dir)), rest),
        rest => (None, rest),
    };
    match rest {
        [fname, path, command] => Ok((data_dir(datadir), fname.as_str(), path.as_str(), command.as_str())),
        _ => Err(usage.to_string()),
    }
}

/// A PostgreSQL program installed next to this tool (the tools are installed
/// into PostgreSQL's `bin` directory), else the name alone (found on `PATH`).
pub fn sibling_program(program: &str) -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(|d| d.join(program)))
        .filter(|p| p.exists())
        .unwrap_or_else(|| PathBuf::from(program))
}

/// The values of every occurrence of a command-line option of a wrapped
/// PostgreSQL program, in order: `-x V`, `-xV`, `--long V`, `--long=V`
/// (`short` may be empty).  The value that follows an option named in
/// `opaque` (options that pass options on to a server) is never looked into.
pub fn option_values(args: &[String], short: &str, long: &str, opaque: &[&str]) -> Vec<String> {
    let mut out = Vec::new();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        if opaque.contains(&a.as_str()) {
            it.next();
        } else if a == short || a == long {
            out.extend(it.next().cloned());
        } else if let Some(v) = a.strip_prefix(long).and_then(|v| v.strip_prefix('=')) {
            out.push(v.to_string());
        } else if let Some(v) =
            a.strip_prefix(short).filter(|v| !short.is_empty() && !v.is_empty() && !a.starts_with("--"))
        {
            out.push(v.to_string());
        }
    }
    out
}

/// `main` of a tool: run, print the error on failure.
pub fn exit_with(tool: &str, result: Result<(), String>) -> std::process::ExitCode {
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{tool}: error: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// A private directory (mode 0700) for the plaintext copy of a WAL file that a
/// wrapped archive or restore command works on.  Never inside the data
/// directory, which base backups and standbys copy: under `$PG_TDE_TMPDIR`,
/// else `/dev/shm` (memory) when there is one, else the system's temporary
/// directory.  Removed when dropped; what a killed run left behind is removed
/// by the next run, and so are the copies that earlier versions kept in
/// `$PGDATA/pg_tde`.
pub struct PrivateTmp {
    dir: PathBuf,
}

impl PrivateTmp {
    pub fn new(tool: &str, datadir: &Path) -> Result<PrivateTmp, String> {
        let base = match std::env::var_os("PG_TDE_TMPDIR") {
            Some(d) => PathBuf::from(d),
            None if Path::new("/dev/shm").is_dir() => PathBuf::from("/dev/shm"),
            None => std::env::temp_dir(),
        };
        let base = base.canonicalize().map_err(|e| format!("temporary directory \"{}\": {e}", base.display()))?;
        // The data directory and what base backups copy with it through links:
        // pg_wal and the tablespaces.
        let mut copied = vec![datadir.to_path_buf(), datadir.join("pg_wal")];
        if let Ok(links) = std::fs::read_dir(datadir.join("pg_tblspc")) {
            copied.extend(links.flatten().map(|e| e.path()));
        }
        for dir in copied.iter().filter_map(|d| d.canonicalize().ok()) {
            if base.starts_with(&dir) {
                return Err(format!(
                    "temporary directory \"{}\" is inside the data directory (\"{}\"): plaintext WAL would be copied by base backups",
                    base.display(),
                    dir.display()
                ));
            }
        }
        let prefix = format!("pg_tde-{tool}-");
        remove_leftovers(&base, &prefix);
        remove_legacy_copies(datadir);
        let dir = base.join(format!("{prefix}{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&dir)
            .map_err(|e| format!("cannot create \"{}\": {e}", dir.display()))?;
        Ok(PrivateTmp { dir })
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }
}

impl Drop for PrivateTmp {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Directories `<prefix><pid>` of runs whose process is gone.
fn remove_leftovers(base: &Path, prefix: &str) {
    let Ok(entries) = std::fs::read_dir(base) else { return };
    for e in entries.flatten() {
        let name = e.file_name();
        let Some(pid) = name.to_str().and_then(|n| n.strip_prefix(prefix)).and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        if !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

/// Plaintext copies that earlier versions of the wrappers wrote into
/// `$PGDATA/pg_tde` (`archive.<pid>.<file>`, `restore.<pid>.<file>`).
fn remove_legacy_copies(datadir: &Path) {
    let Ok(entries) = std::fs::read_dir(datadir.join("pg_tde")) else { return };
    for e in entries.flatten() {
        let name = e.file_name();
        let name = name.to_string_lossy();
        if name.starts_with("archive.") || name.starts_with("restore.") {
            let _ = std::fs::remove_file(e.path());
        }
    }
}

/// Run a shell command (archive/restore commands are shell strings).
pub fn run_shell(cmd: &str) -> Result<(), String> {
    let status = std::process::Command::new("/bin/sh").arg("-c").arg(cmd).status().map_err(|e| e.to_string())?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("command \"{cmd}\" failed: {status}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segment_names() {
        assert_eq!(parse_segment_name("000000010000000000000003", DEFAULT_SEGMENT_SIZE).unwrap(), (1, 3));
        assert_eq!(parse_segment_name("0000000200000001000000FF", DEFAULT_SEGMENT_SIZE).unwrap(), (2, 256 + 255));
        assert_eq!(parse_segment_name("000000020000000000000004.partial", DEFAULT_SEGMENT_SIZE).unwrap(), (2, 4));
        assert!(parse_segment_name("00000002.history", DEFAULT_SEGMENT_SIZE).is_err());
    }

    proptest::proptest! {
        #[test]
        fn any_file_name_or_arguments(name in ".{0,40}", args in proptest::collection::vec(".{0,12}", 0..6)) {
            let _ = parse_segment_name(&name, DEFAULT_SEGMENT_SIZE);
            let _ = parse_segment_name(&name, 1 << 20);
            let _ = wrapper_args(&args, "usage");
            let _ = segment_size_of(name.len() as u64);
        }
    }
}
