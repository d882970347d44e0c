//! What offline tools need to know about a PostgreSQL data directory: the
//! control file (`global/pg_control`), the page checksum, and which files are
//! relation files, with the keys of the encrypted ones.
//!
//! Facts from PostgreSQL 17 and 18 (`catalog/pg_control.h`,
//! `storage/checksum_impl.h`, `storage/bufpage.h`, `common/relpath.h`); the
//! tests check them against real clusters.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use tde_core::keymap;
use tde_core::providers_catalog::{open_provider_in, ProviderCatalog};
use tde_core::PageCipher;

/// PostgreSQL's page size (pg_tde supports only 8 KiB pages).
pub const BLCKSZ: usize = 8192;
/// Offset of `pd_checksum` in the page header.
const PD_CHECKSUM: usize = 8;
/// Offset of `pd_upper` in the page header.
const PD_UPPER: usize = 14;
/// The tablespace OIDs of `base/` and `global/`.
pub const DEFAULT_TABLESPACE: u32 = 1663;
pub const GLOBAL_TABLESPACE: u32 = 1664;

// ---------------------------------------------------------------------------
// Page checksums (storage/checksum_impl.h)

const N_SUMS: usize = 32;
const FNV_PRIME: u32 = 16777619;
const CHECKSUM_BASE_OFFSETS: [u32; N_SUMS] = [
    0x5B1F36E9, 0xB8525960, 0x02AB50AA, 0x1DE66D2A, 0x79FF467A, 0x9BB9F8A3, 0x217E7CD2, 0x83E13D2C, 0xF8D4474F,
    0xE39EB970, 0x42C6AE16, 0x993216FA, 0x7B093B5D, 0x98DAFF3C, 0xF718902A, 0x0B1C9CDB, 0xE58F764B, 0x187636BC,
    0x5D7B3BB1, 0xE73DE7DE, 0x92BEC979, 0xCCA6C0B2, 0x304A0979, 0x85AA43D4, 0x783125BB, 0x6CA8EAA2, 0xE407EAC6,
    0x4B5CFC3E, 0x9FBF8C76, 0x15CA20BE, 0xF2CA9FD3, 0x959BD756,
];

fn checksum_comp(sum: u32, value: u32) -> u32 {
    let tmp = sum ^ value;
    tmp.wrapping_mul(FNV_PRIME) ^ (tmp >> 17)
}

/// PostgreSQL's checksum of a (plaintext) page at block `blkno` of its
/// relation: the page's own `pd_checksum` counts as zero.
pub fn page_checksum(page: &[u8], blkno: u32) -> u16 {
    assert_eq!(page.len(), BLCKSZ);
    let mut sums = CHECKSUM_BASE_OFFSETS;
    for (i, row) in page.chunks_exact(4 * N_SUMS).enumerate() {
        for (j, word) in row.chunks_exact(4).enumerate() {
            let mut bytes = [word[0], word[1], word[2], word[3]];
            if i == 0 && (j * 4..j * 4 + 4).contains(&PD_CHECKSUM) {
                // pd_checksum is the low half (little-endian) of the third word.
                bytes[PD_CHECKSUM - j * 4] = 0;
                bytes[PD_CHECKSUM - j * 4 + 1] = 0;
            }
            sums[j] = checksum_comp(sums[j], u32::from_le_bytes(bytes));
        }
    }
    for _ in 0..2 {
        for sum in &mut sums {
            *sum = checksum_comp(*sum, 0);
        }
    }
    let checksum = sums.iter().fold(0u32, |acc, s| acc ^ s) ^ blkno;
    ((checksum % 65535) + 1) as u16
}

/// The checksum stored in a page header.
pub fn stored_checksum(page: &[u8]) -> u16 {
    u16::from_le_bytes([page[PD_CHECKSUM], page[PD_CHECKSUM + 1]])
}

/// Store `checksum` in the page header.
pub fn set_checksum(page: &mut [u8], checksum: u16) {
    page[PD_CHECKSUM..PD_CHECKSUM + 2].copy_from_slice(&checksum.to_le_bytes());
}

/// A page that was never initialised (`PageIsNew`: `pd_upper` is zero) carries no checksum.
pub fn page_is_new(page: &[u8]) -> bool {
    page[PD_UPPER] == 0 && page[PD_UPPER + 1] == 0
}

/// Whether an initialised page's header is sane, as PostgreSQL's
/// `PageHeaderIsValid` checks it: known flags only, `SizeOfPageHeaderData <=
/// pd_lower <= pd_upper <= pd_special <= BLCKSZ`, `pd_special` aligned, and
/// page size and layout version 8192 / 4.  Ciphertext, or a page decrypted
/// with the wrong key, fails this with near certainty.
pub fn page_header_is_valid(page: &[u8]) -> bool {
    let u16_at = |at: usize| u16::from_le_bytes([page[at], page[at + 1]]);
    let (flags, lower, upper, special, size_version) = (u16_at(10), u16_at(12), u16_at(14), u16_at(16), u16_at(18));
    flags & !0x0007 == 0
        && (24..=upper).contains(&lower)
        && upper <= special
        && special as usize <= BLCKSZ
        && special % 8 == 0
        && size_version == (BLCKSZ as u16 | 4)
}

// ---------------------------------------------------------------------------
// The control file (catalog/pg_control.h)

/// `DBState` values of a cluster that was shut down cleanly.
const DB_SHUTDOWNED: u32 = 1;
const DB_SHUTDOWNED_IN_RECOVERY: u32 = 2;
/// `floatFormat`, the anchor from which the later fields are found.
const FLOAT_FORMAT: f64 = 1234567.0;

/// `global/pg_control`, with the offsets of the fields the tools change.
pub struct ControlFile {
    path: PathBuf,
    bytes: Vec<u8>,
    /// Offset of `data_checksum_version`.
    checksum_version_at: usize,
    /// Offset of `crc` (the CRC-32C of every byte before it).
    crc_at: usize,
    /// `relseg_size`: blocks per segment file.
    pub relseg_size: u32,
    /// `xlog_seg_size`: bytes per WAL segment.
    pub xlog_seg_size: u32,
    /// The major version (`pg_control_version` / 100).
    pub major: u32,
    /// `catalog_version_no`, which names tablespace directories (`PG_<major>_<catversion>`).
    pub catalog_version: u32,
}

impl ControlFile {
    /// Read and check the control file of `datadir`.
    pub fn read(datadir: &Path) -> Result<ControlFile, String> {
        let path = datadir.join("global/pg_control");
        let bytes = std::fs::read(&path).map_err(|e| format!("could not read \"{}\": {e}", path.display()))?;
        let u32_at = |at: usize| bytes.get(at..at + 4).map(|b| u32::from_le_bytes(b.try_into().unwrap()));
        let version = u32_at(8).ok_or("the control file is truncated")?;
        let major = version / 100;
        if major != 17 && major != 18 {
            return Err(format!("unsupported control file version {version} (PostgreSQL 17 and 18 are supported)"));
        }
        // floatFormat, then eight uint32 (blcksz ... loblksize), float8ByVal (bool, padded),
        // data_checksum_version; 18 adds default_char_signedness; then the 32-byte
        // mock_authentication_nonce and the CRC (4-byte aligned).  The anchor's bytes
        // could also occur in an earlier field: the position whose CRC checks out wins.
        let layout = |float_at: usize| {
            let checksum_version_at = float_at + 44;
            let nonce_at = checksum_version_at + 4 + usize::from(major >= 18);
            (checksum_version_at, (nonce_at + 32).next_multiple_of(4))
        };
        let anchor = FLOAT_FORMAT.to_le_bytes();
        let float_at = (0..512.min(bytes.len().saturating_sub(8)))
            .filter(|&at| bytes[at..at + 8] == anchor)
            .find(|&at| {
                let (_, crc_at) = layout(at);
                u32_at(crc_at).is_some_and(|stored| crc32c::crc32c(&bytes[..crc_at]) == stored)
            })
            .ok_or_else(|| {
                format!(
                    "the control file \"{}\" has an incorrect checksum, or is not a little-endian 64-bit cluster's",
                    path.display()
                )
            })?;
        let (checksum_version_at, crc_at) = layout(float_at);
        let blcksz = u32_at(float_at + 8).ok_or("the control file is truncated")?;
        let relseg_size = u32_at(float_at + 12).ok_or("the control file is truncated")?;
        let xlog_seg_size = u32_at(float_at + 20).ok_or("the control file is truncated")?;
        if blcksz as usize != BLCKSZ {
            return Err(format!("the cluster's block size is {blcksz}, pg_tde supports only {BLCKSZ}"));
        }
        let catalog_version = u32_at(12).ok_or("the control file is truncated")?;
        Ok(ControlFile { path, bytes, checksum_version_at, crc_at, relseg_size, xlog_seg_size, major, catalog_version })
    }

    /// Whether the cluster was shut down cleanly (the only state offline tools may work in).
    pub fn shut_down(&self) -> bool {
        matches!(self.u32_at(16), DB_SHUTDOWNED | DB_SHUTDOWNED_IN_RECOVERY)
    }

    fn u32_at(&self, at: usize) -> u32 {
        u32::from_le_bytes(self.bytes[at..at + 4].try_into().unwrap())
    }

    /// `data_checksum_version`: 0 when checksums are off.
    pub fn checksum_version(&self) -> u32 {
        self.u32_at(self.checksum_version_at)
    }

    /// Set `data_checksum_version`, recompute the CRC and write the file in place, durably
    /// (PostgreSQL writes it in place too: it is one sector).
    pub fn write_checksum_version(&mut self, version: u32, sync: bool) -> Result<(), String> {
        self.bytes[self.checksum_version_at..self.checksum_version_at + 4].copy_from_slice(&version.to_le_bytes());
        let crc = crc32c::crc32c(&self.bytes[..self.crc_at]);
        self.bytes[self.crc_at..self.crc_at + 4].copy_from_slice(&crc.to_le_bytes());
        let write = || -> std::io::Result<()> {
            use std::io::Write;
            let mut f = std::fs::OpenOptions::new().write(true).open(&self.path)?;
            f.write_all(&self.bytes)?;
            if sync {
                f.sync_all()?;
            }
            Ok(())
        };
        write().map_err(|e| format!("could not write \"{}\": {e}", self.path.display()))
    }
}

// ---------------------------------------------------------------------------
// Relation files

/// One segment file of a relation fork.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RelationFile {
    pub path: PathBuf,
    pub db_oid: u32,
    pub spc_oid: u32,
    pub rel_number: u32,
    /// PostgreSQL's fork number: 0 main, 1 fsm, 2 vm, 3 init.
    pub fork: u32,
    pub segment: u32,
}

/// `<relnumber>[_fsm|_vm|_init][.<segment>]` → (relnumber, fork, segment); anything
/// else (temporary relations, `pg_filenode.map`, `PG_VERSION`, ...) is `None`.
pub fn parse_relation_file_name(name: &str) -> Option<(u32, u32, u32)> {
    let (base, segment) = match name.split_once('.') {
        Some((b, s)) if !s.is_empty() && s.bytes().all(|c| c.is_ascii_digit()) => (b, s.parse().ok()?),
        Some(_) => return None,
        None => (name, 0),
    };
    let (digits, fork) = match base.split_once('_') {
        Some((d, "fsm")) => (d, 1),
        Some((d, "vm")) => (d, 2),
        Some((d, "init")) => (d, 3),
        Some(_) => return None,
        None => (base, 0),
    };
    if digits.is_empty() || !digits.bytes().all(|c| c.is_ascii_digit()) || digits.starts_with('0') {
        return None;
    }
    Some((digits.parse().ok()?, fork, segment))
}

fn relation_files_in(dir: &Path, db_oid: u32, spc_oid: u32, out: &mut Vec<RelationFile>) -> Result<(), String> {
    let entries = std::fs::read_dir(dir).map_err(|e| format!("could not open directory \"{}\": {e}", dir.display()))?;
    for entry in entries {
        let entry = entry.map_err(|e| format!("could not read directory \"{}\": {e}", dir.display()))?;
        let name = entry.file_name();
        let Some((rel_number, fork, segment)) = name.to_str().and_then(parse_relation_file_name) else { continue };
        if !entry.file_type().map(|t| t.is_file()).unwrap_or(false) {
            continue;
        }
        out.push(RelationFile { path: entry.path(), db_oid, spc_oid, rel_number, fork, segment });
    }
    Ok(())
}

fn numeric_subdirs(dir: &Path) -> Result<Vec<(u32, PathBuf)>, String> {
    let mut out = Vec::new();
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(format!("could not open directory \"{}\": {e}", dir.display())),
    };
    for entry in entries {
        let entry = entry.map_err(|e| format!("could not read directory \"{}\": {e}", dir.display()))?;
        if let Some(oid) = entry.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) {
            out.push((oid, entry.path()));
        }
    }
    out.sort();
    Ok(out)
}

/// Every relation segment file of the cluster: `global/`, `base/<db>/` and
/// `pg_tblspc/<spc>/PG_<major>_<catversion>/<db>/` (this cluster's version
/// directory only: another cluster may share the tablespace's directory).
pub fn relation_files(datadir: &Path, control: &ControlFile) -> Result<Vec<RelationFile>, String> {
    let mut out = Vec::new();
    relation_files_in(&datadir.join("global"), 0, GLOBAL_TABLESPACE, &mut out)?;
    for (db, dir) in numeric_subdirs(&datadir.join("base"))? {
        relation_files_in(&dir, db, DEFAULT_TABLESPACE, &mut out)?;
    }
    let version_dir = format!("PG_{}_{}", control.major, control.catalog_version);
    for (spc, link) in numeric_subdirs(&datadir.join("pg_tblspc"))? {
        for (db, dir) in numeric_subdirs(&link.join(&version_dir))? {
            relation_files_in(&dir, db, spc, &mut out)?;
        }
    }
    out.sort_by(|a, b| a.path.cmp(&b.path));
    Ok(out)
}

// ---------------------------------------------------------------------------
// Keys of encrypted relation files

/// The internal keys of every encrypted relation of a data directory, unwrapped
/// with the principal keys fetched from the cluster's key providers.
pub struct RelationKeys {
    keys: HashMap<(u32, u32, u32), PageCipher>,
}

impl RelationKeys {
    /// Load every database key map under `pg_tde/` (`<dboid>_keys`).
    pub fn load(datadir: &Path) -> Result<RelationKeys, String> {
        let tde = datadir.join("pg_tde");
        let mut keys = HashMap::new();
        let entries = match std::fs::read_dir(&tde) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(RelationKeys { keys }),
            Err(e) => return Err(format!("could not open directory \"{}\": {e}", tde.display())),
        };
        let mut catalog = None;
        let entries: Vec<_> = entries.flatten().collect();
        // A file being re-keyed online is under two keys split by a frontier that
        // only the server applies: refuse rather than misread or rewrite it.
        if let Some(r) = entries.iter().find(|e| {
            e.file_name().to_str().is_some_and(|n| n.ends_with("_rekey"))
                && tde_core::rekey::read(&e.path()).is_ok_and(|records| !records.is_empty())
        }) {
            return Err(format!(
                "relation files are being re-keyed online (\"{}\"): finish the re-keying on the running server first (SELECT * FROM pg_tde_rekey_progress)",
                r.path().display()
            ));
        }
        for entry in entries {
            let name = entry.file_name();
            let Some(db) = name.to_str().and_then(|n| n.strip_suffix("_keys")).and_then(|d| d.parse::<u32>().ok())
            else {
                continue;
            };
            let (header, map) = keymap::read(&entry.path()).map_err(|e| e.to_string())?;
            if map.is_empty() {
                continue;
            }
            if catalog.is_none() {
                catalog = Some(ProviderCatalog::load(&tde.join("providers.json")).map_err(|e| e.to_string())?);
            }
            let catalog = catalog.as_ref().expect("loaded above");
            let p = &header.principal;
            let rec = catalog.by_id(p.provider_id).ok_or_else(|| {
                format!("key provider {} of database {db}'s principal key does not exist", p.provider_id)
            })?;
            let provider = open_provider_in(rec, &tde).map_err(|e| e.to_string())?;
            let principal = provider
                .get_key(&p.name)
                .map_err(|e| e.to_string())?
                .ok_or_else(|| format!("principal key \"{}\" not found in key provider \"{}\"", p.name, rec.name))?;
            header.verify_principal(&principal.key).map_err(|_| {
                format!("principal key \"{}\" in key provider \"{}\" differs from the key in use", p.name, rec.name)
            })?;
            for e in &map {
                let key = e.open(db, &principal.key).map_err(|e| e.to_string())?;
                keys.insert((db, e.spc_oid, e.rel_number), PageCipher::new(&key));
            }
        }
        Ok(RelationKeys { keys })
    }

    /// The page cipher of an encrypted relation file, `None` for a plaintext one.
    pub fn cipher_of(&self, file: &RelationFile) -> Option<&PageCipher> {
        self.keys.get(&(file.db_oid, file.spc_oid, file.rel_number))
    }

    /// Whether any relation is encrypted.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }
}

/// The fork number in a page's tweak: the init fork uses the main fork's (as the extension does).
pub fn tweak_fork(fork: u32) -> u32 {
    if fork == 3 {
        0
    } else {
        fork
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relation_file_names() {
        assert_eq!(parse_relation_file_name("16384"), Some((16384, 0, 0)));
        assert_eq!(parse_relation_file_name("16384_fsm"), Some((16384, 1, 0)));
        assert_eq!(parse_relation_file_name("16384_vm.3"), Some((16384, 2, 3)));
        assert_eq!(parse_relation_file_name("16384_init"), Some((16384, 3, 0)));
        for other in ["PG_VERSION", "pg_filenode.map", "pg_internal.init", "t3_16384", "16384_x", "16384.", "0", "1.a"]
        {
            assert_eq!(parse_relation_file_name(other), None, "{other}");
        }
    }

    #[test]
    fn page_headers() {
        let mut page = vec![0u8; BLCKSZ];
        let mut put = |at: usize, v: u16| page[at..at + 2].copy_from_slice(&v.to_le_bytes());
        put(12, 40);
        put(14, 8000);
        put(16, 8192);
        put(18, 8192 | 4);
        assert!(page_header_is_valid(&page));
        let mut bad = page.clone();
        bad[10] = 0x10; // unknown flag
        assert!(!page_header_is_valid(&bad));
        let mut bad = page.clone();
        bad[12..14].copy_from_slice(&9000u16.to_le_bytes()); // pd_lower > pd_upper
        assert!(!page_header_is_valid(&bad));
        let random: Vec<u8> = (0..BLCKSZ as u32).map(|i| (i.wrapping_mul(2654435761) >> 13) as u8).collect();
        assert!(!page_header_is_valid(&random));
    }

    #[test]
    fn checksum_ignores_its_own_field_and_depends_on_the_block() {
        let mut page = vec![0u8; BLCKSZ];
        page[100] = 7;
        let a = page_checksum(&page, 0);
        set_checksum(&mut page, 0xBEEF);
        assert_eq!(page_checksum(&page, 0), a);
        assert_ne!(page_checksum(&page, 1), a);
        assert!(a != 0);
    }
}
