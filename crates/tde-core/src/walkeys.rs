//! The WAL key file `$PGDATA/pg_tde/wal_keys`: every WAL key this cluster has
//! used, in creation order, each wrapped (AES-GCM) by the server key.
//!
//! The key for a WAL page at LSN `l` is the last-created key whose range
//! `[start_lsn, end_lsn)` holds `l`: a server process's key starts at the first
//! page it writes after it was created and is open-ended (everything written
//! afterwards at or beyond that LSN uses it); a key for re-encrypting one
//! restored segment covers just that segment.  Records are fixed-size (256 bytes, CRC32C-protected) and only ever
//! appended (pwrite + fsync), so a torn append is detected and ignored.

use std::fs::OpenOptions;
use std::io::{ErrorKind, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use zeroize::Zeroizing;

use crate::error::{Result, TdeError};
use crate::wrap;

const MAGIC: &[u8; 8] = b"PGTDEWK\x01";
pub const RECORD_SIZE: usize = 256;
const AAD: &[u8] = b"pg_tde wal key";

/// One WAL key, unwrapped.
pub struct WalKey {
    pub start_lsn: u64,
    /// End of the key's range (exclusive); `u64::MAX` for an open-ended key.
    pub end_lsn: u64,
    pub created_unix_secs: i64,
    pub key: Zeroizing<Vec<u8>>,
    pub base: [u8; 16],
}

impl std::fmt::Debug for WalKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WalKey").field("start_lsn", &self.start_lsn).field("key_len", &self.key.len()).finish()
    }
}

fn aad(start_lsn: u64, end_lsn: u64) -> Vec<u8> {
    let mut a = AAD.to_vec();
    a.extend_from_slice(&start_lsn.to_le_bytes());
    a.extend_from_slice(&end_lsn.to_le_bytes());
    a
}

/// Append a key (wrapped by `server_key`) to the file, creating it if needed.
/// A key with empty material is a *null key*: WAL in its range is plaintext.
pub fn append(path: &Path, server_key: &[u8], key: &WalKey) -> Result<()> {
    let wrapped = if key.key.is_empty() {
        Vec::new()
    } else {
        let mut plain = Zeroizing::new(key.key.to_vec());
        plain.extend_from_slice(&key.base);
        wrap::wrap(server_key, &aad(key.start_lsn, key.end_lsn), &plain)?
    };
    let mut rec = [0u8; RECORD_SIZE];
    rec[0..8].copy_from_slice(MAGIC);
    rec[8..16].copy_from_slice(&key.start_lsn.to_le_bytes());
    rec[16..24].copy_from_slice(&key.created_unix_secs.to_le_bytes());
    rec[24..32].copy_from_slice(&key.end_lsn.to_le_bytes());
    rec[32..36].copy_from_slice(&(wrapped.len() as u32).to_le_bytes());
    if wrapped.len() > RECORD_SIZE - 40 {
        return Err(TdeError::Invalid("WAL key too long".into()));
    }
    rec[36..36 + wrapped.len()].copy_from_slice(&wrapped);
    let crc = crc32c::crc32c(&rec[..RECORD_SIZE - 4]);
    rec[RECORD_SIZE - 4..].copy_from_slice(&crc.to_le_bytes());
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
        if let Some(dir) = path.parent() {
            crate::fsutil::fsync_dir(dir)?;
        }
    }
    Ok(())
}

/// All keys, in creation order.  Missing file: no keys.  Damaged or torn
/// records are skipped (they were never used: a key is used only after its
/// record was fsynced).
pub fn read_all(path: &Path, server_key: &[u8]) -> Result<Vec<WalKey>> {
    let data = match std::fs::read(path) {
        Ok(d) => d,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(TdeError::io(format!("could not read WAL key file \"{}\"", path.display()), e)),
    };
    let mut keys = Vec::new();
    for rec in data.chunks_exact(RECORD_SIZE) {
        if &rec[0..8] != MAGIC {
            continue;
        }
        let crc = u32::from_le_bytes(rec[RECORD_SIZE - 4..].try_into().unwrap_or_default());
        if crc != crc32c::crc32c(&rec[..RECORD_SIZE - 4]) {
            continue;
        }
        let start_lsn = u64::from_le_bytes(rec[8..16].try_into().unwrap_or_default());
        let created_unix_secs = i64::from_le_bytes(rec[16..24].try_into().unwrap_or_default());
        let end_lsn = u64::from_le_bytes(rec[24..32].try_into().unwrap_or_default());
        let len = u32::from_le_bytes(rec[32..36].try_into().unwrap_or_default()) as usize;
        if len > RECORD_SIZE - 40 {
            continue;
        }
        if len == 0 {
            keys.push(WalKey { start_lsn, end_lsn, created_unix_secs, key: Zeroizing::new(Vec::new()), base: [0; 16] });
            continue;
        }
        let plain = wrap::unwrap(server_key, &aad(start_lsn, end_lsn), &rec[36..36 + len])?;
        if plain.len() != 32 && plain.len() != 48 {
            return Err(TdeError::Corrupt(format!("WAL key file \"{}\": bad key length", path.display())));
        }
        let klen = plain.len() - 16;
        let mut base = [0u8; 16];
        base.copy_from_slice(&plain[klen..]);
        keys.push(WalKey { start_lsn, end_lsn, created_unix_secs, key: Zeroizing::new(plain[..klen].to_vec()), base });
    }
    Ok(keys)
}

/// Index of the key for WAL at `lsn`: the last-created key whose range holds it.
pub fn key_index_for(keys: &[WalKey], lsn: u64) -> Option<usize> {
    keys.iter().rposition(|k| k.start_lsn <= lsn && lsn < k.end_lsn)
}

/// WAL keys ready for use: ranges in creation order, `None` for null keys.
#[derive(Default, Clone)]
pub struct KeyRanges {
    ranges: Vec<(u64, u64, Option<std::sync::Arc<crate::wal::WalCipher>>)>,
}

impl KeyRanges {
    pub fn from_keys(keys: &[WalKey]) -> Result<Self> {
        let ranges = keys
            .iter()
            .map(|k| {
                let c = if k.key.is_empty() {
                    None
                } else {
                    Some(std::sync::Arc::new(crate::wal::WalCipher::new(&k.key, &k.base)?))
                };
                Ok((k.start_lsn, k.end_lsn, c))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(KeyRanges { ranges })
    }

    pub fn push(&mut self, start: u64, end: u64, cipher: Option<std::sync::Arc<crate::wal::WalCipher>>) {
        self.ranges.push((start, end, cipher));
    }

    pub fn is_empty(&self) -> bool {
        self.ranges.is_empty()
    }

    /// The key for WAL at `lsn` (`None`: plaintext, or no key covers it) and
    /// the next LSN at which the answer may change.
    pub fn lookup(&self, lsn: u64) -> (Option<std::sync::Arc<crate::wal::WalCipher>>, u64) {
        let idx = self.ranges.iter().rposition(|(s, e, _)| *s <= lsn && lsn < *e);
        // The answer changes where the chosen range ends or a later-created range begins.
        let (from, mut next, cipher) = match idx {
            Some(i) => (i + 1, self.ranges[i].1, self.ranges[i].2.clone()),
            None => (0, u64::MAX, None),
        };
        for (s, _, _) in &self.ranges[from..] {
            if *s > lsn && *s < next {
                next = *s;
            }
        }
        if idx.is_none() {
            // No range covers lsn: it may start being covered at any range start after it.
            for (s, _, _) in &self.ranges {
                if *s > lsn && *s < next {
                    next = *s;
                }
            }
        }
        (cipher, next)
    }

    /// Whether any WAL key covers LSN `lsn` (a null key counts).
    pub fn covers(&self, lsn: u64) -> bool {
        self.ranges.iter().any(|(s, e, _)| *s <= lsn && lsn < *e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(start: u64, b: u8) -> WalKey {
        WalKey {
            start_lsn: start,
            end_lsn: u64::MAX,
            created_unix_secs: 1,
            key: Zeroizing::new(vec![b; 16]),
            base: [b; 16],
        }
    }

    #[test]
    fn append_read_and_select() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("wal_keys");
        let sk = [7u8; 32];
        assert!(read_all(&path, &sk).unwrap().is_empty());
        append(&path, &sk, &key(1000, 1)).unwrap();
        append(&path, &sk, &key(5000, 2)).unwrap();
        append(&path, &sk, &key(3000, 3)).unwrap(); // a restarted standby re-receiving from earlier
        let keys = read_all(&path, &sk).unwrap();
        assert_eq!(keys.len(), 3);
        assert_eq!(key_index_for(&keys, 500), None);
        assert_eq!(key_index_for(&keys, 1000), Some(0));
        assert_eq!(key_index_for(&keys, 4000), Some(2));
        assert_eq!(key_index_for(&keys, 9000), Some(2));
        assert_eq!(*keys[1].key, vec![2u8; 16]);
        // wrong server key: refused
        assert!(matches!(read_all(&path, &[8u8; 32]), Err(TdeError::Decrypt(_))));
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
        assert_eq!(key_index_for(&keys, 1600), Some(4));
        assert_eq!(key_index_for(&keys, 2000), Some(0));
        assert_eq!(key_index_for(&keys, 8000), Some(3));
        // null keys: plaintext from their start on
        append(&path, &sk, &WalKey { key: Zeroizing::new(Vec::new()), ..key(9000, 0) }).unwrap();
        let keys = read_all(&path, &sk).unwrap();
        let ranges = KeyRanges::from_keys(&keys).unwrap();
        assert!(ranges.lookup(9500).0.is_none());
        let (k, next) = ranges.lookup(8000);
        assert!(k.is_some());
        assert_eq!(next, 9000);
        assert_eq!(ranges.lookup(1600).1, 2000);
    }
}
