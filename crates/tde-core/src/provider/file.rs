//! The file keyring provider.
//!
//! A keyring is a JSON file, mode 0600:
//!
//! ```json
//! {"format": "pg_tde-keyring", "version": 1,
//!  "keys": [{"name": "db-key", "key_hex": "00112233...", "created": 1763800000}]}
//! ```
//!
//! It is replaced atomically on every change (`<path>.tmp`, fsync, rename, directory
//! fsync). Creators of keys serialize on an exclusive lock of `<path>.lock` (a separate
//! file, because the keyring itself is replaced by rename), so that two servers sharing
//! one keyring cannot lose each other's keys. Readers need no lock.
//!
//! Buffers that hold key material (the file contents, decoded keys) are zeroed after use;
//! this is best effort for the JSON text, whose parser may copy strings.

use std::fs::{self, File, OpenOptions};
use std::io::ErrorKind;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use zeroize::{Zeroize, Zeroizing};

use super::{validate_key_name, KeyProvider, PrincipalKey};
use crate::error::{Result, TdeError};
use crate::fsutil;
use crate::secret_buf::{read_secret_file, SecretBuf, SecretRead};

const FORMAT: &str = "pg_tde-keyring";
const VERSION: u32 = 1;
const FILE_MODE: u32 = 0o600;
/// Largest keyring file read (a key takes about 150 bytes).
const MAX_KEYRING_BYTES: usize = 64 << 20;

/// A keyring file holding principal keys.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FileKeyring {
    /// Path of the keyring file (absolute in production; see [`super::parse_file_options`]).
    pub path: PathBuf,
}

#[derive(Serialize, Deserialize)]
struct KeyringFile {
    format: String,
    version: u32,
    keys: Vec<StoredKey>,
}

#[derive(Serialize, Deserialize)]
struct StoredKey {
    name: String,
    key_hex: String,
    created: i64,
}

impl Drop for StoredKey {
    fn drop(&mut self) {
        self.key_hex.zeroize();
    }
}

fn hex_encode(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(DIGITS[(b >> 4) as usize] as char);
        s.push(DIGITS[(b & 0xf) as usize] as char);
    }
    s
}

fn hex_decode(s: &str) -> Option<Zeroizing<Vec<u8>>> {
    fn nibble(c: u8) -> Option<u8> {
        match c {
            b'0'..=b'9' => Some(c - b'0'),
            b'a'..=b'f' => Some(c - b'a' + 10),
            b'A'..=b'F' => Some(c - b'A' + 10),
            _ => None,
        }
    }
    let bytes = s.as_bytes();
    if !bytes.len().is_multiple_of(2) {
        return None;
    }
    let mut out = Zeroizing::new(Vec::with_capacity(bytes.len() / 2));
    for pair in bytes.chunks_exact(2) {
        out.push((nibble(pair[0])? << 4) | nibble(pair[1])?);
    }
    Some(out)
}

fn now_unix_secs() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0)
}

impl FileKeyring {
    /// A keyring stored at `path` (the file need not exist yet).
    pub fn new(path: impl Into<PathBuf>) -> Self {
        FileKeyring { path: path.into() }
    }

    fn corrupt(&self, msg: impl std::fmt::Display) -> TdeError {
        TdeError::Corrupt(format!("keyring file \"{}\": {msg}", self.path.display()))
    }

    /// Load the keyring; `Ok(None)` if the file does not exist.
    fn load(&self) -> Result<Option<KeyringFile>> {
        // Read into a buffer that is wiped whenever it grows.
        let data = match read_secret_file(&self.path, MAX_KEYRING_BYTES) {
            Ok(SecretRead::Complete(d)) => d,
            Ok(SecretRead::TooLarge) => {
                return Err(self.corrupt(format_args!("larger than {MAX_KEYRING_BYTES} bytes")));
            }
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(TdeError::io(format!("could not read keyring file \"{}\"", self.path.display()), e)),
        };
        let file: KeyringFile =
            serde_json::from_slice(&data).map_err(|e| self.corrupt(format_args!("not a valid keyring: {e}")))?;
        if file.format != FORMAT {
            return Err(self.corrupt(format_args!("unexpected format \"{}\"", file.format)));
        }
        if file.version != VERSION {
            return Err(
                self.corrupt(format_args!("unsupported version {} (this build reads version {VERSION})", file.version))
            );
        }
        Ok(Some(file))
    }

    fn save(&self, file: &KeyringFile) -> Result<()> {
        // Serialized into a buffer that is wiped whenever it grows (no copies of key
        // material left in freed memory), pre-sized so that it seldom does.
        let estimate = 128 + file.keys.iter().map(|k| 64 + 6 * k.name.len() + k.key_hex.len()).sum::<usize>();
        let mut buf = SecretBuf::with_capacity(estimate);
        serde_json::to_writer_pretty(&mut buf, file)
            .map_err(|e| TdeError::Invalid(format!("could not serialize keyring: {e}")))?;
        buf.extend_from_slice(b"\n");
        fsutil::replace_atomic(&self.path, &buf, FILE_MODE)
    }

    /// Take the exclusive creator lock (`<path>.lock`); released when the file is dropped.
    fn lock(&self) -> Result<File> {
        let mut p = self.path.as_os_str().to_os_string();
        p.push(".lock");
        let lock_path = PathBuf::from(p);
        let ctx = |what: &str| format!("could not {what} keyring lock \"{}\"", lock_path.display());
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(FILE_MODE)
            .open(&lock_path)
            .map_err(|e| TdeError::io(ctx("open"), e))?;
        f.lock().map_err(|e| TdeError::io(ctx("take"), e))?;
        Ok(f)
    }

    fn probe_directory(&self, dir: &Path) -> std::io::Result<()> {
        let mut name = self.path.file_name().unwrap_or_default().to_os_string();
        name.push(format!(".probe.{}", std::process::id()));
        let probe = dir.join(name);
        let f = OpenOptions::new().write(true).create_new(true).mode(FILE_MODE).open(&probe)?;
        drop(f);
        fs::remove_file(&probe)
    }
}

impl KeyProvider for FileKeyring {
    fn get_key(&self, name: &str) -> Result<Option<PrincipalKey>> {
        validate_key_name(name)?;
        let Some(file) = self.load()? else {
            return Ok(None);
        };
        let Some(stored) = file.keys.iter().find(|k| k.name == name) else {
            return Ok(None);
        };
        let key = hex_decode(&stored.key_hex)
            .filter(|k| !k.is_empty())
            .ok_or_else(|| self.corrupt(format_args!("key \"{name}\" is not valid hex")))?;
        Ok(Some(PrincipalKey { name: name.to_string(), key, envelope: None }))
    }

    fn create_key(&self, name: &str, len: usize) -> Result<PrincipalKey> {
        validate_key_name(name)?;
        if len != 16 && len != 32 {
            return Err(TdeError::Invalid(format!("principal keys are 16 or 32 bytes, not {len}")));
        }
        let _lock = self.lock()?;
        let mut file =
            self.load()?.unwrap_or_else(|| KeyringFile { format: FORMAT.into(), version: VERSION, keys: Vec::new() });
        if file.keys.iter().any(|k| k.name == name) {
            return Err(TdeError::Invalid(format!(
                "key \"{name}\" already exists in keyring \"{}\"",
                self.path.display()
            )));
        }
        let mut key = Zeroizing::new(vec![0u8; len]);
        crate::rng::fill(&mut key)?;
        file.keys.push(StoredKey { name: name.to_string(), key_hex: hex_encode(&key), created: now_unix_secs() });
        self.save(&file)?;
        Ok(PrincipalKey { name: name.to_string(), key, envelope: None })
    }

    fn check(&self) -> Result<()> {
        match fs::metadata(&self.path) {
            Ok(meta) if meta.is_file() => self.load().map(|_| ()),
            Ok(_) => Err(TdeError::Provider(format!("keyring \"{}\" is not a regular file", self.path.display()))),
            Err(e) if e.kind() == ErrorKind::NotFound => {
                let dir = fsutil::parent_dir(&self.path);
                self.probe_directory(dir).map_err(|e| {
                    TdeError::Provider(format!(
                        "keyring \"{}\" does not exist and its directory \"{}\" is not writable: {e}",
                        self.path.display(),
                        dir.display()
                    ))
                })
            }
            Err(e) => Err(TdeError::io(format!("could not access keyring \"{}\"", self.path.display()), e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;
    use std::sync::{Arc, Barrier};

    fn mode_of(path: &Path) -> u32 {
        fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    fn keyring() -> (tempfile::TempDir, FileKeyring) {
        let dir = tempfile::tempdir().unwrap();
        let kr = FileKeyring::new(dir.path().join("keyring.json"));
        (dir, kr)
    }

    #[test]
    fn create_then_get() {
        let (_dir, kr) = keyring();
        kr.check().unwrap();
        assert!(kr.get_key("k1").unwrap().is_none(), "missing file: no key");
        let created = kr.create_key("k1", 32).unwrap();
        assert_eq!(created.name, "k1");
        assert_eq!(created.key.len(), 32);
        let got = kr.get_key("k1").unwrap().unwrap();
        assert_eq!(got.key, created.key);
        let second = kr.create_key("k2", 16).unwrap();
        assert_eq!(second.key.len(), 16);
        assert_ne!(second.key[..], created.key[..16]);
        assert_eq!(kr.get_key("k1").unwrap().unwrap().key, created.key);
        assert_eq!(kr.get_key("k2").unwrap().unwrap().key, second.key);
        kr.check().unwrap();

        // the file has the documented format
        let v: serde_json::Value = serde_json::from_slice(&fs::read(&kr.path).unwrap()).unwrap();
        assert_eq!(v["format"], "pg_tde-keyring");
        assert_eq!(v["version"], 1);
        assert_eq!(v["keys"][0]["name"], "k1");
        assert_eq!(v["keys"][0]["key_hex"], hex_encode(&created.key));
        assert!(v["keys"][0]["created"].as_i64().unwrap() > 1_700_000_000);
    }

    #[test]
    fn duplicate_create_is_refused() {
        let (_dir, kr) = keyring();
        let first = kr.create_key("dup", 16).unwrap();
        match kr.create_key("dup", 16) {
            Err(TdeError::Invalid(m)) => assert!(m.contains("already exists"), "{m}"),
            other => panic!("expected Invalid, got {other:?}"),
        }
        assert_eq!(kr.get_key("dup").unwrap().unwrap().key, first.key);
    }

    #[test]
    fn missing_key_is_none() {
        let (_dir, kr) = keyring();
        kr.create_key("present", 16).unwrap();
        assert!(kr.get_key("absent").unwrap().is_none());
        assert!(matches!(kr.get_key(""), Err(TdeError::Invalid(_))));
        assert!(matches!(kr.create_key("x", 20), Err(TdeError::Invalid(_))));
    }

    #[test]
    fn file_mode_is_0600() {
        let (_dir, kr) = keyring();
        kr.create_key("k", 16).unwrap();
        assert_eq!(mode_of(&kr.path), 0o600);
        kr.create_key("k2", 16).unwrap();
        assert_eq!(mode_of(&kr.path), 0o600);
        assert!(!fsutil::tmp_path(&kr.path).exists());
    }

    #[test]
    fn corrupt_json_is_reported() {
        let (_dir, kr) = keyring();
        fs::write(&kr.path, b"{\"format\": \"pg_tde-keyring\", \"keys\": [").unwrap();
        assert!(matches!(kr.get_key("k"), Err(TdeError::Corrupt(_))));
        assert!(matches!(kr.create_key("k", 16), Err(TdeError::Corrupt(_))));
        assert!(matches!(kr.check(), Err(TdeError::Corrupt(_))));

        fs::write(&kr.path, br#"{"format":"other","version":1,"keys":[]}"#).unwrap();
        assert!(matches!(kr.get_key("k"), Err(TdeError::Corrupt(_))));
        fs::write(&kr.path, br#"{"format":"pg_tde-keyring","version":2,"keys":[]}"#).unwrap();
        assert!(matches!(kr.get_key("k"), Err(TdeError::Corrupt(_))));
        fs::write(
            &kr.path,
            br#"{"format":"pg_tde-keyring","version":1,"keys":[{"name":"k","key_hex":"zz","created":0}]}"#,
        )
        .unwrap();
        match kr.get_key("k") {
            Err(TdeError::Corrupt(m)) => assert!(!m.contains("zz"), "{m}"),
            other => panic!("expected Corrupt, got {other:?}"),
        }
    }

    #[test]
    fn check_reports_unusable_locations() {
        let dir = tempfile::tempdir().unwrap();
        // the path is a directory
        let kr = FileKeyring::new(dir.path());
        assert!(matches!(kr.check(), Err(TdeError::Provider(_))));
        // the directory does not exist
        let kr = FileKeyring::new(dir.path().join("nope").join("keyring.json"));
        assert!(matches!(kr.check(), Err(TdeError::Provider(_))));
        // no probe file is left behind
        let kr = FileKeyring::new(dir.path().join("keyring.json"));
        kr.check().unwrap();
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 0);
    }

    #[test]
    fn concurrent_creators_lose_nothing() {
        let (_dir, kr) = keyring();
        let threads = 4;
        let per_thread = 5;
        let barrier = Arc::new(Barrier::new(threads));
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let kr = kr.clone();
                let barrier = Arc::clone(&barrier);
                std::thread::spawn(move || {
                    barrier.wait();
                    for i in 0..per_thread {
                        kr.create_key(&format!("t{t}-k{i}"), 16).unwrap();
                    }
                })
            })
            .collect();
        for h in handles {
            h.join().unwrap();
        }
        for t in 0..threads {
            for i in 0..per_thread {
                assert!(kr.get_key(&format!("t{t}-k{i}")).unwrap().is_some());
            }
        }
    }

    #[test]
    fn hex_helpers() {
        assert_eq!(hex_encode(&[0x00, 0xab, 0xff]), "00abff");
        assert_eq!(*hex_decode("00ABff").unwrap(), vec![0x00, 0xab, 0xff]);
        assert!(hex_decode("abc").is_none());
        assert!(hex_decode("0g").is_none());
    }
}
