//! Online re-keying state: `$PGDATA/pg_tde/<dboid>_rekey`.
//!
//! While a relation file moves to another key (a rotation of its internal key, or an
//! online encryption or decryption), its blocks are under one of two keys: the *old*
//! one (the file's key-map entry, or none for a plaintext file) and the *new* one (held
//! here, wrapped by the database's principal key like a key-map entry, or none when the
//! file is being decrypted). A *frontier* `(fork, block)` splits them: a block is under
//! the new key exactly when `(fork, block) < frontier` in (fork, block) order.
//!
//! The frontier only moves forward, one batch of blocks at a time, in a WAL record that
//! carries the full-page images of the batch; the extension writes this file (and its
//! shared-memory copy) while it still holds the batch's buffers locked, so no block of
//! the batch reaches disk under the new key before the frontier covering it is durable.
//! When the frontier has passed every block, the new key replaces the old entry in the
//! key map and the record here is removed (in that order, so a crash in between leaves
//! a record whose old and new keys are the same).
//!
//! The file: a 16-byte header (`PGTDERKY`, version, record count) and fixed-size
//! records, each with a CRC32C. It is small (one record per file being re-keyed) and is
//! rewritten atomically on every change.

use std::path::Path;

use crate::error::{Result, TdeError};
use crate::fsutil;
use crate::keymap::{self, KeyMapEntry, ENTRY_SIZE};

const MAGIC: &[u8; 8] = b"PGTDERKY";
const VERSION: u32 = 1;
const HEADER_SIZE: usize = 16;
/// Size of one record.
pub const RECORD_SIZE: usize = 20 + ENTRY_SIZE + 4;
const FILE_MODE: u32 = 0o600;
/// Forks of a relation file, in the order the frontier passes them (main, FSM,
/// visibility map, init).
pub const FORKS: u8 = 4;

/// What a re-keying does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RekeyMode {
    /// Old key to a fresh key.
    Rotate = 1,
    /// Plaintext to a key.
    Encrypt = 2,
    /// Key to plaintext.
    Decrypt = 3,
}

impl RekeyMode {
    fn from_u8(v: u8) -> Option<RekeyMode> {
        [RekeyMode::Rotate, RekeyMode::Encrypt, RekeyMode::Decrypt].into_iter().find(|m| *m as u8 == v)
    }

    /// Name for progress reports.
    pub fn name(self) -> &'static str {
        match self {
            RekeyMode::Rotate => "rotate",
            RekeyMode::Encrypt => "encrypt",
            RekeyMode::Decrypt => "decrypt",
        }
    }
}

/// Where the new key begins: blocks before `(fork, block)` are under it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct Frontier {
    pub fork: u8,
    pub block: u32,
}

impl Frontier {
    /// Past every fork: the whole file is under the new key.
    pub const DONE: Frontier = Frontier { fork: FORKS, block: 0 };

    /// Whether block `block` of fork `fork` is under the new key.
    pub fn covers(&self, fork: u8, block: u32) -> bool {
        (fork, block) < (self.fork, self.block)
    }

    /// Packed for an atomic: `fork << 32 | block`.
    pub fn to_u64(self) -> u64 {
        (u64::from(self.fork) << 32) | u64::from(self.block)
    }

    /// Inverse of [`Frontier::to_u64`].
    pub fn from_u64(v: u64) -> Frontier {
        Frontier { fork: (v >> 32) as u8, block: v as u32 }
    }
}

/// The re-keying of one relation file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RekeyRecord {
    pub spc_oid: u32,
    pub rel_number: u32,
    pub mode: RekeyMode,
    pub frontier: Frontier,
    /// The new key, sealed like a key-map entry (`None` when decrypting).
    pub new_entry: Option<KeyMapEntry>,
}

fn record_to_bytes(r: &RekeyRecord) -> [u8; RECORD_SIZE] {
    let mut b = [0u8; RECORD_SIZE];
    b[0..4].copy_from_slice(&r.spc_oid.to_le_bytes());
    b[4..8].copy_from_slice(&r.rel_number.to_le_bytes());
    b[8] = r.mode as u8;
    b[9] = r.frontier.fork;
    b[10] = u8::from(r.new_entry.is_some());
    b[12..16].copy_from_slice(&r.frontier.block.to_le_bytes());
    if let Some(e) = &r.new_entry {
        b[20..20 + ENTRY_SIZE].copy_from_slice(&keymap::entry_to_bytes(e));
    }
    let crc = crc32c::crc32c(&b[..RECORD_SIZE - 4]);
    b[RECORD_SIZE - 4..].copy_from_slice(&crc.to_le_bytes());
    b
}

fn record_from_bytes(b: &[u8]) -> Result<RekeyRecord> {
    let u32_at = |o: usize| u32::from_le_bytes(b[o..o + 4].try_into().expect("4 bytes"));
    if b.len() != RECORD_SIZE || crc32c::crc32c(&b[..RECORD_SIZE - 4]) != u32_at(RECORD_SIZE - 4) {
        return Err(TdeError::Corrupt("re-keying record has a bad checksum".into()));
    }
    let mode = RekeyMode::from_u8(b[8]).ok_or_else(|| TdeError::Corrupt(format!("unknown re-keying mode {}", b[8])))?;
    let frontier = Frontier { fork: b[9], block: u32_at(12) };
    if frontier.fork > FORKS || (frontier.fork == FORKS && frontier.block != 0) {
        return Err(TdeError::Corrupt("re-keying frontier out of range".into()));
    }
    let new_entry = match b[10] {
        0 => None,
        1 => Some(keymap::entry_from_bytes(&b[20..20 + ENTRY_SIZE])?),
        v => return Err(TdeError::Corrupt(format!("bad re-keying flag {v}"))),
    };
    if new_entry.is_some() == (mode == RekeyMode::Decrypt) {
        return Err(TdeError::Corrupt("re-keying record's new key does not fit its mode".into()));
    }
    Ok(RekeyRecord { spc_oid: u32_at(0), rel_number: u32_at(4), mode, frontier, new_entry })
}

/// Serialize a set of records (the whole file).
pub fn to_bytes(records: &[RekeyRecord]) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_SIZE + records.len() * RECORD_SIZE);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&VERSION.to_le_bytes());
    out.extend_from_slice(&(records.len() as u32).to_le_bytes());
    for r in records {
        out.extend_from_slice(&record_to_bytes(r));
    }
    out
}

/// Parse [`to_bytes`]'s output.
pub fn from_bytes(bytes: &[u8]) -> Result<Vec<RekeyRecord>> {
    if bytes.len() < HEADER_SIZE || &bytes[..8] != MAGIC {
        return Err(TdeError::Corrupt("not a pg_tde re-keying file".into()));
    }
    let version = u32::from_le_bytes(bytes[8..12].try_into().expect("4 bytes"));
    if version != VERSION {
        return Err(TdeError::Corrupt(format!("re-keying file version {version} is not {VERSION}")));
    }
    let count = u32::from_le_bytes(bytes[12..16].try_into().expect("4 bytes")) as usize;
    let body = &bytes[HEADER_SIZE..];
    if body.len() != count * RECORD_SIZE {
        return Err(TdeError::Corrupt("re-keying file has a wrong length".into()));
    }
    body.chunks(RECORD_SIZE).map(record_from_bytes).collect()
}

/// Every record of the file at `path`; none if it does not exist.
pub fn read(path: &Path) -> Result<Vec<RekeyRecord>> {
    fsutil::load_or(path, "re-keying state", from_bytes, Vec::new)
}

/// Replace the file at `path` with `records` (removed when there are none), atomically.
pub fn write(path: &Path, records: &[RekeyRecord]) -> Result<()> {
    if records.is_empty() {
        return match std::fs::remove_file(path) {
            Ok(()) => fsutil::fsync_dir(fsutil::parent_dir(path)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(TdeError::io(format!("removing \"{}\"", path.display()), e)),
        };
    }
    fsutil::replace_atomic(path, &to_bytes(records), FILE_MODE)
}

/// Put (add or replace) the record of `rec`'s file.
pub fn put(records: &mut Vec<RekeyRecord>, rec: RekeyRecord) {
    match records.iter_mut().find(|r| r.spc_oid == rec.spc_oid && r.rel_number == rec.rel_number) {
        Some(slot) => *slot = rec,
        None => records.push(rec),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cipher::{Cipher, RelKey};

    fn rec(rel: u32, mode: RekeyMode) -> RekeyRecord {
        let pk = [7u8; 16];
        let new_entry = (mode != RekeyMode::Decrypt)
            .then(|| KeyMapEntry::seal(5, 1663, rel, &RelKey::generate(Cipher::Sm4Xts).unwrap(), &pk).unwrap());
        RekeyRecord { spc_oid: 1663, rel_number: rel, mode, frontier: Frontier { fork: 1, block: 42 }, new_entry }
    }

    #[test]
    fn frontier_order() {
        let f = Frontier { fork: 1, block: 10 };
        assert!(f.covers(0, u32::MAX) && f.covers(1, 9));
        assert!(!f.covers(1, 10) && !f.covers(2, 0));
        assert!(Frontier::DONE.covers(3, u32::MAX));
        assert!(!Frontier::default().covers(0, 0));
        assert_eq!(Frontier::from_u64(f.to_u64()), f);
    }

    #[test]
    fn round_trip_and_damage() {
        let records = vec![rec(1, RekeyMode::Rotate), rec(2, RekeyMode::Encrypt), rec(3, RekeyMode::Decrypt)];
        let bytes = to_bytes(&records);
        assert_eq!(from_bytes(&bytes).unwrap(), records);
        for i in [0, 9, 12, HEADER_SIZE + 3, HEADER_SIZE + 50, bytes.len() - 1] {
            let mut bad = bytes.clone();
            bad[i] ^= 0x10;
            assert!(matches!(from_bytes(&bad), Err(TdeError::Corrupt(_))), "flip at {i}");
        }
        assert!(from_bytes(&bytes[..bytes.len() - 1]).is_err());
    }

    #[test]
    fn file_put_and_removal() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("5_rekey");
        assert!(read(&path).unwrap().is_empty());
        let mut records = Vec::new();
        put(&mut records, rec(1, RekeyMode::Rotate));
        let mut moved = rec(1, RekeyMode::Rotate);
        moved.frontier = Frontier::DONE;
        put(&mut records, moved.clone());
        assert_eq!(records, vec![moved]);
        write(&path, &records).unwrap();
        assert_eq!(read(&path).unwrap(), records);
        write(&path, &[]).unwrap();
        assert!(!path.exists());
    }
}
