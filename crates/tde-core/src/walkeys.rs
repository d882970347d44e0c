//! The WAL key file `$PGDATA/pg_tde/wal_keys`: every WAL key this cluster has
//! used, in creation order, each wrapped (AES-GCM).
//!
//! The key for a WAL page at LSN `l` is the last-created key whose range
//! `[start_lsn, end_lsn)` holds `l`: a server process's key starts at the first
//! page it writes after it was created and is open-ended (everything written
//! afterwards at or beyond that LSN uses it); a key for re-encrypting one
//! restored segment covers just that segment.  Records are fixed-size (256
//! bytes, CRC32C-protected) and only ever appended (pwrite + fsync), so a torn
//! append is detected and ignored.
//!
//! # Wrapping
//!
//! Records with magic `PGTDEWK\x02` are wrapped by the *WAL key-encryption
//! key*, a random AES-256 key kept as the entry ([`WAL_KEK_SPC`],
//! [`WAL_KEK_REL`]) of the server key's key map, wrapped there by the server
//! key.  Rotating the server key re-wraps that entry with the rest of the map
//! (one WAL-logged map rewrite), and every WAL key stays readable, on the
//! primary and on standbys, whose own WAL keys are wrapped by the same
//! replicated key-encryption key.  Records with magic `PGTDEWK\x01` were
//! written before the key-encryption key existed and are wrapped by the server
//! key itself; [`upgrade_records`] re-wraps them before a rotation.
//!
//! | offset | size | field |
//! | --- | --- | --- |
//! | 0 | 8 | magic |
//! | 8 | 8 | start LSN |
//! | 16 | 8 | creation time, Unix seconds |
//! | 24 | 8 | end LSN (exclusive), `u64::MAX` when open-ended |
//! | 32 | 4 | wrapped length (0: null key, WAL in its range is plaintext) |
//! | 36 | 4 | v2: timeline of the segment files the key is for, 0 = any |
//! | 36 (v1), 40 (v2) | .. | wrapped key material and counter base |
//! | 252 | 4 | CRC-32C of bytes 0..252 |
//!
//! Writers (server processes, `pg_tde_restore_encrypt`) hold an exclusive
//! `flock` on the `pg_tde` directory while they append or rewrite the file.

use std::fs::{File, OpenOptions};
use std::io::{ErrorKind, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use zeroize::Zeroizing;

use crate::cipher::{Cipher, RelKey};
use crate::error::{Result, TdeError};
use crate::keymap::{KeyMapEntry, KeyMapHeader};
use crate::{fsutil, wrap};

const MAGIC_V1: &[u8; 8] = b"PGTDEWK\x01";
const MAGIC_V2: &[u8; 8] = b"PGTDEWK\x02";
pub const RECORD_SIZE: usize = 256;
const AAD_V1: &[u8] = b"pg_tde wal key";
const AAD_V2: &[u8] = b"pg_tde wal key v2";
const WRAPPED_V1: usize = 36;
const WRAPPED_V2: usize = 40;
const CRC_AT: usize = RECORD_SIZE - 4;

/// Tablespace and relation number of the WAL key-encryption key's entry in the
/// server key map (no relation file has relation number 0).
pub const WAL_KEK_SPC: u32 = 0;
pub const WAL_KEK_REL: u32 = 0;
/// The cipher the key-encryption key is stored as: its 32 key bytes are the
/// AES-256-GCM key that wraps WAL key records.
const WAL_KEK_CIPHER: Cipher = Cipher::Aes256Cbc;

/// A new WAL key-encryption key, sealed for the server key map `db_oid`.
pub fn new_kek_entry(db_oid: u32, server_key: &[u8]) -> Result<KeyMapEntry> {
    KeyMapEntry::seal(db_oid, WAL_KEK_SPC, WAL_KEK_REL, &RelKey::generate(WAL_KEK_CIPHER)?, server_key)
}

/// Whether a key-map entry is the WAL key-encryption key.
pub fn is_kek_entry(e: &KeyMapEntry) -> bool {
    e.spc_oid == WAL_KEK_SPC && e.rel_number == WAL_KEK_REL
}

/// The keys that unwrap WAL key records.
pub struct Wrapping {
    /// The WAL key-encryption key, once the server key map has one.
    kek: Option<Zeroizing<Vec<u8>>>,
    /// The server key: unwraps records written before the key-encryption key.
    server_key: Zeroizing<Vec<u8>>,
}

impl Wrapping {
    /// From the server key map (`db_oid`, header and entries) and the server
    /// key, which is checked against the map before use.
    pub fn from_server_map(
        db_oid: u32,
        header: &KeyMapHeader,
        entries: &[KeyMapEntry],
        server_key: Zeroizing<Vec<u8>>,
    ) -> Result<Wrapping> {
        header.verify_principal(&server_key)?;
        let kek = match entries.iter().find(|e| is_kek_entry(e)) {
            Some(e) => {
                let bytes = e.open(db_oid, &server_key)?.to_bytes();
                Some(Zeroizing::new(bytes[..WAL_KEK_CIPHER.key_len()].to_vec()))
            }
            None => None,
        };
        Ok(Wrapping { kek, server_key })
    }

    /// Length of new WAL keys: that of the server key (AES-128 or AES-256).
    pub fn wal_key_len(&self) -> usize {
        if self.server_key.len() >= 32 {
            32
        } else {
            16
        }
    }

    pub fn has_kek(&self) -> bool {
        self.kek.is_some()
    }
}

/// One WAL key, unwrapped.
pub struct WalKey {
    pub start_lsn: u64,
    /// End of the key's range (exclusive); `u64::MAX` for an open-ended key.
    pub end_lsn: u64,
    /// Timeline of the segment files the key encrypts; 0: any (records
    /// written before keys were bound to a timeline).
    pub timeline: u32,
    pub created_unix_secs: i64,
    pub key: Zeroizing<Vec<u8>>,
    pub base: [u8; 16],
}

impl std::fmt::Debug for WalKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WalKey")
            .field("start_lsn", &self.start_lsn)
            .field("timeline", &self.timeline)
            .field("key_len", &self.key.len())
            .finish()
    }
}

fn aad_v1(start_lsn: u64, end_lsn: u64) -> Vec<u8> {
    let mut a = AAD_V1.to_vec();
    a.extend_from_slice(&start_lsn.to_le_bytes());
    a.extend_from_slice(&end_lsn.to_le_bytes());
    a
}

fn aad_v2(start_lsn: u64, end_lsn: u64, timeline: u32) -> Vec<u8> {
    let mut a = AAD_V2.to_vec();
    a.extend_from_slice(&start_lsn.to_le_bytes());
    a.extend_from_slice(&end_lsn.to_le_bytes());
    a.extend_from_slice(&timeline.to_le_bytes());
    a
}

/// The record of `key`: v2 when `wrapping` has a key-encryption key.
fn encode(wrapping: &Wrapping, key: &WalKey) -> Result<[u8; RECORD_SIZE]> {
    let mut rec = [0u8; RECORD_SIZE];
    let (magic, at, wrapped) = match &wrapping.kek {
        Some(kek) => {
            let w = if key.key.is_empty() {
                Vec::new()
            } else {
                let mut plain = Zeroizing::new(key.key.to_vec());
                plain.extend_from_slice(&key.base);
                wrap::wrap(kek, &aad_v2(key.start_lsn, key.end_lsn, key.timeline), &plain)?
            };
            rec[36..40].copy_from_slice(&key.timeline.to_le_bytes());
            (MAGIC_V2, WRAPPED_V2, w)
        }
        None => {
            if key.timeline != 0 {
                return Err(TdeError::Invalid("a WAL key bound to a timeline needs the key-encryption key".into()));
            }
            let w = if key.key.is_empty() {
                Vec::new()
            } else {
                let mut plain = Zeroizing::new(key.key.to_vec());
                plain.extend_from_slice(&key.base);
                wrap::wrap(&wrapping.server_key, &aad_v1(key.start_lsn, key.end_lsn), &plain)?
            };
            (MAGIC_V1, WRAPPED_V1, w)
        }
    };
    if wrapped.len() > CRC_AT - at {
        return Err(TdeError::Invalid("WAL key too long".into()));
    }
    rec[0..8].copy_from_slice(magic);
    rec[8..16].copy_from_slice(&key.start_lsn.to_le_bytes());
    rec[16..24].copy_from_slice(&key.created_unix_secs.to_le_bytes());
    rec[24..32].copy_from_slice(&key.end_lsn.to_le_bytes());
    rec[32..36].copy_from_slice(&(wrapped.len() as u32).to_le_bytes());
    rec[at..at + wrapped.len()].copy_from_slice(&wrapped);
    let crc = crc32c::crc32c(&rec[..CRC_AT]);
    rec[CRC_AT..].copy_from_slice(&crc.to_le_bytes());
    Ok(rec)
}

/// An exclusive `flock` of the directory that holds the WAL key file, which
/// every writer of the file takes (released when dropped).
fn lock_dir(path: &Path) -> Result<File> {
    let dir = fsutil::parent_dir(path);
    let f = File::open(dir).map_err(|e| TdeError::io(format!("could not open directory \"{}\"", dir.display()), e))?;
    f.lock().map_err(|e| TdeError::io(format!("could not lock directory \"{}\"", dir.display()), e))?;
    Ok(f)
}

/// Append a key to the file, creating it if needed.  A key with empty
/// material is a *null key*: WAL in its range is plaintext.
pub fn append(path: &Path, wrapping: &Wrapping, key: &WalKey) -> Result<()> {
    let rec = encode(wrapping, key)?;
    let _lock = lock_dir(path)?;
    let mut f = OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| TdeError::io(format!("could not open WAL key file \"{}\"", path.display()), e))?;
    // A torn earlier append leaves a partial record: pad it out so records stay aligned.
    let len = f.metadata().map_err(|e| TdeError::io("stat WAL key file", e))?.len();
    let pad = (RECORD_SIZE as u64 - len % RECORD_SIZE as u64) % RECORD_SIZE as u64;
    let mut out = vec![0u8; pad as usize];
    out.extend_from_slice(&rec);
    f.write_all(&out)
        .and_then(|_| f.sync_all())
        .map_err(|e| TdeError::io(format!("could not write WAL key file \"{}\"", path.display()), e))?;
    if len == 0 {
        fsutil::fsync_dir(fsutil::parent_dir(path))?;
    }
    Ok(())
}

/// Whether the file holds records wrapped by the server key itself (v1).
pub fn has_legacy_records(path: &Path) -> Result<bool> {
    match std::fs::read(path) {
        Ok(d) => Ok(d.chunks_exact(RECORD_SIZE).any(|r| &r[0..8] == MAGIC_V1)),
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(false),
        Err(e) => Err(TdeError::io(format!("could not read WAL key file \"{}\"", path.display()), e)),
    }
}

/// Re-wrap every v1 record (wrapped by the server key) with the key-encryption
/// key, in one atomic replacement of the file; damaged and torn records, never
/// used, are dropped.  Returns whether the file changed.  Run before the
/// server key is rotated, while `wrapping` holds the current server key.
pub fn upgrade_records(path: &Path, wrapping: &Wrapping) -> Result<bool> {
    if wrapping.kek.is_none() {
        return Err(TdeError::Invalid("the server key map has no WAL key-encryption key".into()));
    }
    let _lock = lock_dir(path)?;
    let data = match std::fs::read(path) {
        Ok(d) => d,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(TdeError::io(format!("could not read WAL key file \"{}\"", path.display()), e)),
    };
    if !data.chunks_exact(RECORD_SIZE).any(|r| &r[0..8] == MAGIC_V1) {
        return Ok(false);
    }
    let keys = parse(path, &data, wrapping)?;
    let mut out = Vec::with_capacity(keys.len() * RECORD_SIZE);
    for k in &keys {
        out.extend_from_slice(&encode(wrapping, k)?);
    }
    fsutil::replace_atomic(path, &out, 0o600)?;
    Ok(true)
}

/// All keys, in creation order.  Missing file: no keys.  Damaged or torn
/// records are skipped (they were never used: a key is used only after its
/// record was fsynced).
pub fn read_all(path: &Path, wrapping: &Wrapping) -> Result<Vec<WalKey>> {
    match std::fs::read(path) {
        Ok(d) => parse(path, &d, wrapping),
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(TdeError::io(format!("could not read WAL key file \"{}\"", path.display()), e)),
    }
}

/// The keys of the records from byte `from` on (a multiple of the record
/// size), and where the next read should start: for the processes that reload
/// keys when the file grows, which then unwrap only the new records.
pub fn read_from(path: &Path, wrapping: &Wrapping, from: u64) -> Result<(Vec<WalKey>, u64)> {
    use std::io::{Read, Seek, SeekFrom};
    let mut f = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok((Vec::new(), 0)),
        Err(e) => return Err(TdeError::io(format!("could not open WAL key file \"{}\"", path.display()), e)),
    };
    let mut data = Vec::new();
    f.seek(SeekFrom::Start(from))
        .and_then(|_| f.read_to_end(&mut data))
        .map_err(|e| TdeError::io(format!("could not read WAL key file \"{}\"", path.display()), e))?;
    // A torn record at the end is read again once the next append pads it.
    let whole = data.len() / RECORD_SIZE * RECORD_SIZE;
    Ok((parse(path, &data[..whole], wrapping)?, from + whole as u64))
}

fn parse(path: &Path, data: &[u8], wrapping: &Wrapping) -> Result<Vec<WalKey>> {
    let mut keys = Vec::new();
    for rec in data.chunks_exact(RECORD_SIZE) {
        let v2 = match &rec[0..8] {
            m if m == MAGIC_V1 => false,
            m if m == MAGIC_V2 => true,
            _ => continue,
        };
        let crc = u32::from_le_bytes(rec[CRC_AT..].try_into().unwrap_or_default());
        if crc != crc32c::crc32c(&rec[..CRC_AT]) {
            continue;
        }
        let u64_at = |i: usize| u64::from_le_bytes(rec[i..i + 8].try_into().unwrap_or_default());
        let start_lsn = u64_at(8);
        let created_unix_secs = u64_at(16) as i64;
        let end_lsn = u64_at(24);
        let len = u32::from_le_bytes(rec[32..36].try_into().unwrap_or_default()) as usize;
        let (at, timeline) = if v2 {
            (WRAPPED_V2, u32::from_le_bytes(rec[36..40].try_into().unwrap_or_default()))
        } else {
            (WRAPPED_V1, 0)
        };
        if len > CRC_AT - at {
            continue;
        }
        let mut key =
            WalKey { start_lsn, end_lsn, timeline, created_unix_secs, key: Zeroizing::new(Vec::new()), base: [0; 16] };
        if len > 0 {
            let wrapped = &rec[at..at + len];
            let plain = if v2 {
                let kek = wrapping.kek.as_ref().ok_or_else(|| {
                    TdeError::Corrupt(format!(
                        "WAL key file \"{}\" needs the WAL key-encryption key, which the server key map does not have",
                        path.display()
                    ))
                })?;
                wrap::unwrap(kek, &aad_v2(start_lsn, end_lsn, timeline), wrapped)?
            } else {
                wrap::unwrap(&wrapping.server_key, &aad_v1(start_lsn, end_lsn), wrapped)?
            };
            if plain.len() != 32 && plain.len() != 48 {
                return Err(TdeError::Corrupt(format!("WAL key file \"{}\": bad key length", path.display())));
            }
            let klen = plain.len() - 16;
            key.base.copy_from_slice(&plain[klen..]);
            key.key = Zeroizing::new(plain[..klen].to_vec());
        }
        keys.push(key);
    }
    Ok(keys)
}

/// Index of the key for WAL at `lsn` of a segment file of timeline `tli`
/// (see [`KeyRanges::lookup`] for the rule).
pub fn key_index_for(keys: &[WalKey], tli: u32, lsn: u64) -> Option<usize> {
    keys.iter()
        .enumerate()
        .filter(|(_, k)| k.start_lsn <= lsn && lsn < k.end_lsn && k.timeline <= tli)
        .max_by_key(|(i, k)| (k.timeline, *i))
        .map(|(i, _)| i)
}

/// One WAL key ready for use.
#[derive(Clone)]
struct Range {
    start: u64,
    end: u64,
    timeline: u32,
    /// `None`: a null key (plaintext in its range).
    cipher: Option<std::sync::Arc<crate::wal::WalCipher>>,
}

/// WAL keys ready for use, indexed for lookups by position.
///
/// The key of WAL at LSN `l` in a segment file of timeline `t` is, among the
/// keys whose range holds `l` and whose timeline is at most `t` (0: any), the
/// one of the highest timeline, and of those the last created.  A server
/// process takes a new key for each timeline it writes; the part of a segment
/// that a new timeline's file copies from its parent timeline's file keeps the
/// parent's key.  Lookups cost O(log n) plus the keys that cover the position:
/// the keys of restored segments, one per segment, do not slow down the reading
/// of other WAL.
#[derive(Default, Clone)]
pub struct KeyRanges {
    /// In creation order.
    ranges: Vec<Range>,
    /// Indexes of the bounded ranges, sorted by start.
    bounded: Vec<usize>,
    /// Indexes of the open-ended ranges (one per server process role and
    /// incarnation: few).
    open: Vec<usize>,
    /// Longest bounded range.
    max_len: u64,
}

impl KeyRanges {
    pub fn from_keys(keys: &[WalKey]) -> Result<Self> {
        let mut r = KeyRanges::default();
        r.extend(keys)?;
        Ok(r)
    }

    /// Add keys created after those already held.
    pub fn extend(&mut self, keys: &[WalKey]) -> Result<()> {
        for k in keys {
            let c = if k.key.is_empty() {
                None
            } else {
                Some(std::sync::Arc::new(crate::wal::WalCipher::new(&k.key, &k.base)?))
            };
            self.push_range(k.start_lsn, k.end_lsn, k.timeline, c);
        }
        Ok(())
    }

    /// Add one key (timeline 0: any).
    pub fn push(&mut self, start: u64, end: u64, cipher: Option<std::sync::Arc<crate::wal::WalCipher>>) {
        self.push_range(start, end, 0, cipher);
    }

    fn push_range(
        &mut self,
        start: u64,
        end: u64,
        timeline: u32,
        cipher: Option<std::sync::Arc<crate::wal::WalCipher>>,
    ) {
        let idx = self.ranges.len();
        self.ranges.push(Range { start, end, timeline, cipher });
        if end == u64::MAX {
            self.open.push(idx);
        } else {
            let at = self.bounded.partition_point(|&i| self.ranges[i].start <= start);
            self.bounded.insert(at, idx);
            self.max_len = self.max_len.max(end.saturating_sub(start));
        }
    }

    pub fn is_empty(&self) -> bool {
        self.ranges.is_empty()
    }

    pub fn len(&self) -> usize {
        self.ranges.len()
    }

    /// The key for WAL at `lsn` in a segment file of timeline `tli` (`None`:
    /// plaintext, or no key covers it) and the next LSN at which the answer
    /// may change.
    pub fn lookup(&self, tli: u32, lsn: u64) -> (Option<std::sync::Arc<crate::wal::WalCipher>>, u64) {
        let eligible = |i: usize| {
            let r = &self.ranges[i];
            r.start <= lsn && lsn < r.end && r.timeline <= tli
        };
        let lo = self.bounded.partition_point(|&i| self.ranges[i].start < lsn.saturating_sub(self.max_len));
        let hi = self.bounded.partition_point(|&i| self.ranges[i].start <= lsn);
        let best = self.bounded[lo..hi]
            .iter()
            .chain(self.open.iter())
            .copied()
            .filter(|&i| eligible(i))
            .max_by_key(|&i| (self.ranges[i].timeline, i));
        // The answer may change where the chosen range ends or any range begins.
        let mut next = best.map_or(u64::MAX, |i| self.ranges[i].end);
        if let Some(&i) = self.bounded.get(hi) {
            next = next.min(self.ranges[i].start);
        }
        for &i in &self.open {
            let s = self.ranges[i].start;
            if s > lsn && s < next {
                next = s;
            }
        }
        (best.and_then(|i| self.ranges[i].cipher.clone()), next)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(start: u64, b: u8) -> WalKey {
        WalKey {
            start_lsn: start,
            end_lsn: u64::MAX,
            timeline: 0,
            created_unix_secs: 1,
            key: Zeroizing::new(vec![b; 16]),
            base: [b; 16],
        }
    }

    #[test]
    fn append_read_and_select() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("wal_keys");
        let sk = Wrapping { kek: None, server_key: Zeroizing::new(vec![7u8; 32]) };
        assert!(read_all(&path, &sk).unwrap().is_empty());
        append(&path, &sk, &key(1000, 1)).unwrap();
        append(&path, &sk, &key(5000, 2)).unwrap();
        append(&path, &sk, &key(3000, 3)).unwrap(); // a restarted standby re-receiving from earlier
        let keys = read_all(&path, &sk).unwrap();
        assert_eq!(keys.len(), 3);
        assert_eq!(key_index_for(&keys, 1, 500), None);
        assert_eq!(key_index_for(&keys, 1, 1000), Some(0));
        assert_eq!(key_index_for(&keys, 1, 4000), Some(2));
        assert_eq!(key_index_for(&keys, 1, 9000), Some(2));
        assert_eq!(*keys[1].key, vec![2u8; 16]);
        // wrong server key: refused
        assert!(matches!(
            read_all(&path, &Wrapping { kek: None, server_key: Zeroizing::new(vec![8u8; 32]) }),
            Err(TdeError::Decrypt(_))
        ));
        // a torn append is skipped, and the next append stays aligned
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(&[1, 2, 3]).unwrap();
        drop(f);
        assert_eq!(read_all(&path, &sk).unwrap().len(), 3);
        append(&path, &sk, &key(7000, 4)).unwrap();
        let keys = read_all(&path, &sk).unwrap();
        assert_eq!(keys.len(), 4);
        assert_eq!(keys[3].start_lsn, 7000);
        // a bounded key (a restored segment) covers its range only
        append(&path, &sk, &WalKey { end_lsn: 2000, ..key(1500, 5) }).unwrap();
        let keys = read_all(&path, &sk).unwrap();
        assert_eq!(key_index_for(&keys, 1, 1600), Some(4));
        assert_eq!(key_index_for(&keys, 1, 2000), Some(0));
        assert_eq!(key_index_for(&keys, 1, 8000), Some(3));
        // null keys: plaintext from their start on
        append(&path, &sk, &WalKey { key: Zeroizing::new(Vec::new()), ..key(9000, 0) }).unwrap();
        let keys = read_all(&path, &sk).unwrap();
        let ranges = KeyRanges::from_keys(&keys).unwrap();
        assert!(ranges.lookup(1, 9500).0.is_none());
        let (k, next) = ranges.lookup(1, 8000);
        assert!(k.is_some());
        assert_eq!(next, 9000);
        assert_eq!(ranges.lookup(1, 1600).1, 2000);
    }

    #[test]
    fn kek_records_survive_a_server_key_rotation() {
        use crate::keymap::{KeyMapHeader, PrincipalRef};
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("wal_keys");
        let db = u32::MAX - 2;
        let principal = |n: &str| PrincipalRef { name: n.into(), provider_id: 1, created_unix_secs: 1 };
        let old_sk = Zeroizing::new(vec![1u8; 32]);
        let header = KeyMapHeader::new(db, principal("a"), &old_sk).unwrap();
        // legacy records, wrapped by the server key
        let legacy = Wrapping::from_server_map(db, &header, &[], old_sk.clone()).unwrap();
        assert!(!legacy.has_kek());
        append(&path, &legacy, &key(100, 1)).unwrap();
        assert!(append(&path, &legacy, &WalKey { timeline: 2, ..key(200, 2) }).is_err());
        // the key-encryption key is added and the records upgraded
        let kek = new_kek_entry(db, &old_sk).unwrap();
        let with_kek = Wrapping::from_server_map(db, &header, std::slice::from_ref(&kek), old_sk.clone()).unwrap();
        assert!(upgrade_records(&path, &with_kek).unwrap());
        assert!(!upgrade_records(&path, &with_kek).unwrap());
        append(&path, &with_kek, &WalKey { timeline: 2, ..key(200, 2) }).unwrap();
        let data = std::fs::read(&path).unwrap();
        assert!(data.chunks(RECORD_SIZE).all(|r| &r[..8] == MAGIC_V2));
        // rotation: the map entry is re-wrapped; the file is untouched
        let new_sk = Zeroizing::new(vec![9u8; 32]);
        let new_header = KeyMapHeader::new(db, principal("b"), &new_sk).unwrap();
        let rewrapped = KeyMapEntry::seal(db, 0, 0, &kek.open(db, &old_sk).unwrap(), &new_sk).unwrap();
        let after = Wrapping::from_server_map(db, &new_header, &[rewrapped], new_sk.clone()).unwrap();
        let keys = read_all(&path, &after).unwrap();
        assert_eq!(keys.len(), 2);
        assert_eq!(*keys[0].key, vec![1u8; 16]);
        assert_eq!((keys[1].start_lsn, keys[1].timeline), (200, 2));
        // a server key that does not match the map is refused before use
        assert!(Wrapping::from_server_map(db, &new_header, &[], old_sk).is_err());
        // a record whose timeline was altered fails to unwrap
        let mut data = std::fs::read(&path).unwrap();
        data[RECORD_SIZE + 36] = 3;
        let crc = crc32c::crc32c(&data[RECORD_SIZE..RECORD_SIZE + CRC_AT]);
        data[RECORD_SIZE + CRC_AT..2 * RECORD_SIZE].copy_from_slice(&crc.to_le_bytes());
        std::fs::write(&path, &data).unwrap();
        assert!(matches!(read_all(&path, &after), Err(TdeError::Decrypt(_))));
    }

    fn cipher(b: u8) -> Option<std::sync::Arc<crate::wal::WalCipher>> {
        Some(std::sync::Arc::new(crate::wal::WalCipher::new(&[b; 16], &[b; 16]).unwrap()))
    }

    fn same(
        a: &Option<std::sync::Arc<crate::wal::WalCipher>>,
        b: &Option<std::sync::Arc<crate::wal::WalCipher>>,
    ) -> bool {
        match (a, b) {
            (Some(a), Some(b)) => std::sync::Arc::ptr_eq(a, b),
            (None, None) => true,
            _ => false,
        }
    }

    #[test]
    fn keys_are_bound_to_the_timeline_of_their_files() {
        let (r1, r2, w3) = (cipher(1), cipher(2), cipher(3));
        let mut k = KeyRanges::default();
        k.push_range(1000, u64::MAX, 1, r1.clone()); // receiver on timeline 1
        k.push_range(4000, u64::MAX, 2, r2.clone()); // receiver again, on timeline 2, from the segment start
        k.push_range(6000, u64::MAX, 3, w3.clone()); // promoted: writer on timeline 3
                                                     // timeline 1's file keeps its key past the point where timeline 2 began
        assert!(same(&k.lookup(1, 5000).0, &r1));
        assert_eq!(k.lookup(1, 5000).1, 6000, "a later range start may change the answer");
        // timeline 2's file: its own key, and its parent's before it began
        assert!(same(&k.lookup(2, 5000).0, &r2));
        assert!(same(&k.lookup(2, 3000).0, &r1));
        // timeline 3's file: the prefix copied from timeline 2's file keeps timeline 2's key
        assert!(same(&k.lookup(3, 5000).0, &r2));
        assert!(same(&k.lookup(3, 7000).0, &w3));
        assert!(k.lookup(1, 500).0.is_none());
    }

    #[test]
    fn restored_segments_of_two_timelines_keep_their_own_keys() {
        let seg = 16u64 << 20;
        let mut k = KeyRanges::default();
        let mut expect = Vec::new();
        // thousands of restored segments, one key each
        for i in 0..5000u64 {
            let c = cipher((i % 250) as u8 + 1);
            k.push_range(i * seg, (i + 1) * seg, 1, c.clone());
            expect.push(c);
        }
        let t2 = cipher(251);
        k.push_range(4000 * seg, 4001 * seg, 2, t2.clone()); // the same segment of timeline 2
        k.push_range(4000 * seg + 100, u64::MAX, 2, cipher(252)); // the promoted writer
        for i in [0u64, 1, 2500, 3999, 4000, 4999] {
            assert!(same(&k.lookup(1, i * seg + 7).0, &expect[i as usize]), "segment {i}");
        }
        assert!(same(&k.lookup(2, 4000 * seg + 7).0, &t2));
        let (c, next) = k.lookup(1, 17);
        assert!(same(&c, &expect[0]));
        assert_eq!(next, seg);
        assert_eq!(k.len(), 5002);
    }
}
