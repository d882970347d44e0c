//! The registry of configured key providers: `$PGDATA/pg_tde/providers.json`.
//!
//! One file for the whole cluster holds every provider, global ones (`db_oid = 0`) and
//! those of each database:
//!
//! ```json
//! {"format": "pg_tde-providers", "version": 1, "next_id": 3,
//!  "providers": [
//!    {"id": 1, "name": "global-file", "kind": "file",
//!     "options": {"path": "/etc/pg_tde/keyring.json"}, "db_oid": 0},
//!    {"id": 2, "name": "db-file", "kind": "file",
//!     "options": {"path": "/srv/keys/db.json"}, "db_oid": 16384}]}
//! ```
//!
//! Provider ids are never reused (`next_id` only grows), so a key map that refers to a
//! provider id can never silently point at another provider. Names are unique within a
//! scope (the cluster-wide scope, or one database); a database provider may have the same
//! name as a global one, and [`ProviderCatalog::find`] then prefers the database's.
//!
//! Options hold no secrets (paths to token, certificate and key files, never their
//! contents), so the file may be WAL-logged and listed. The serialization is deterministic
//! (object keys sorted), so [`ProviderCatalog::to_bytes`] can be WAL-logged and replayed
//! byte for byte.

use std::collections::HashSet;
use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::{Result, TdeError};
use crate::fsutil;
use crate::provider::{parse_command_options, CommandWrapper, EnvelopeProvider, KeyWrapper, VaultTransitWrapper};
use crate::provider::{parse_file_options, FileKeyring, KeyProvider, ProviderKind};
use crate::provider::{parse_kmip_options, KmipProvider};
use crate::provider::{parse_vault_options, VaultV2Provider};

const FORMAT: &str = "pg_tde-providers";
const VERSION: u32 = 1;
const FILE_MODE: u32 = 0o600;
/// Longest provider name, in bytes.
pub const MAX_PROVIDER_NAME_LEN: usize = 255;
/// `db_oid` of cluster-wide (global) providers.
pub const GLOBAL_DB_OID: u32 = 0;

/// One configured key provider.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ProviderRecord {
    /// Cluster-unique id (positive, never reused).
    pub id: i32,
    /// Name, unique within its scope.
    pub name: String,
    /// Kind of provider.
    pub kind: ProviderKind,
    /// Kind-specific options (a JSON object).
    pub options: Value,
    /// Database the provider belongs to, or [`GLOBAL_DB_OID`] for a global provider.
    pub db_oid: u32,
}

/// The set of configured key providers.
#[derive(Clone, Debug, PartialEq)]
pub struct ProviderCatalog {
    /// Id the next added provider will get.
    pub next_id: i32,
    /// All providers, in the order they were added.
    pub providers: Vec<ProviderRecord>,
}

#[derive(Serialize, Deserialize)]
struct CatalogFile {
    format: String,
    version: u32,
    next_id: i32,
    providers: Vec<ProviderRecord>,
}

fn validate_name(name: &str) -> Result<()> {
    if name.is_empty() || name.len() > MAX_PROVIDER_NAME_LEN || name.contains('\0') {
        return Err(TdeError::Invalid(format!(
            "key provider name must be 1 to {MAX_PROVIDER_NAME_LEN} bytes without NUL characters, got {} bytes",
            name.len()
        )));
    }
    Ok(())
}

/// Validate the options of a provider of `kind`.
///
/// `file`: see [`parse_file_options`]. `vault-v2` and `vault-transit`: see
/// [`parse_vault_options`]. `kmip` and `kmip-wrap`: see [`parse_kmip_options`].
/// `command`: see [`parse_command_options`].
pub fn validate_options(kind: ProviderKind, options: &Value) -> Result<()> {
    match kind {
        ProviderKind::File => parse_file_options(options).map(|_| ()),
        ProviderKind::VaultV2 | ProviderKind::VaultTransit => parse_vault_options(options).map(|_| ()),
        ProviderKind::Kmip | ProviderKind::KmipWrap => parse_kmip_options(options).map(|_| ()),
        ProviderKind::Command => parse_command_options(options).map(|_| ()),
    }
}

/// How a provider uses a file of the server named by one of its options.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FileAccess {
    /// Read only (a token, a certificate, a private key, a CA bundle).
    Read,
    /// Read, created and written (a keyring file, with its lock and probe files).
    Write,
    /// Run as a program (a KMS adapter), as `COPY ... PROGRAM` runs one.
    Execute,
}

/// The server files that a provider's options name: (option, path, access).
/// The options must have passed [`validate_options`].
pub fn server_files(
    kind: ProviderKind,
    options: &Value,
) -> Result<Vec<(&'static str, std::path::PathBuf, FileAccess)>> {
    Ok(match kind {
        ProviderKind::File => vec![("path", parse_file_options(options)?, FileAccess::Write)],
        ProviderKind::VaultV2 | ProviderKind::VaultTransit => {
            let o = parse_vault_options(options)?;
            let mut v = vec![("tokenPath", o.token_path, FileAccess::Read)];
            v.extend(o.ca_path.map(|p| ("caPath", p, FileAccess::Read)));
            v
        }
        ProviderKind::Kmip | ProviderKind::KmipWrap => {
            let o = parse_kmip_options(options)?;
            vec![
                ("certPath", o.cert_path, FileAccess::Read),
                ("keyPath", o.key_path, FileAccess::Read),
                ("caPath", o.ca_path, FileAccess::Read),
            ]
        }
        ProviderKind::Command => vec![("command", parse_command_options(options)?.command, FileAccess::Execute)],
    })
}

/// Whether a Vault provider's options use plain `http://`, which sends the
/// token in clear.
pub fn vault_uses_plain_http(options: &Value) -> bool {
    parse_vault_options(options).is_ok_and(|o| o.url.to_ascii_lowercase().starts_with("http://"))
}

/// `path` with its symbolic links and `..` resolved as far as it exists (the
/// names that do not exist yet appended as they are), for comparing where a
/// file that may not exist yet would be.  A `..` after a name that does not
/// exist cannot be resolved: such a path resolves to itself.
pub fn resolve_path(path: &Path) -> std::path::PathBuf {
    let mut existing = path.to_path_buf();
    let mut missing: Vec<std::ffi::OsString> = Vec::new();
    loop {
        if let Ok(mut out) = existing.canonicalize() {
            out.extend(missing.iter().rev());
            return out;
        }
        match (existing.file_name().map(|n| n.to_os_string()), existing.parent()) {
            (Some(name), Some(parent)) => {
                missing.push(name);
                existing = parent.to_path_buf();
            }
            _ => return path.to_path_buf(),
        }
    }
}

impl Default for ProviderCatalog {
    fn default() -> Self {
        ProviderCatalog { next_id: 1, providers: Vec::new() }
    }
}

impl ProviderCatalog {
    /// An empty catalog (`next_id` 1).
    pub fn new() -> Self {
        Self::default()
    }

    /// Load the catalog from `path`; a missing file is an empty catalog.
    pub fn load(path: &Path) -> Result<Self> {
        fsutil::load_or(path, "provider catalog", Self::from_bytes, Self::new)
    }

    /// Serialize (deterministic JSON).
    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        let file = CatalogFile {
            format: FORMAT.into(),
            version: VERSION,
            next_id: self.next_id,
            providers: self.providers.clone(),
        };
        let mut out = serde_json::to_vec_pretty(&file)
            .map_err(|e| TdeError::Invalid(format!("could not serialize provider catalog: {e}")))?;
        out.push(b'\n');
        Ok(out)
    }

    /// Parse the output of [`ProviderCatalog::to_bytes`], checking its consistency
    /// ([`TdeError::Corrupt`] otherwise).
    pub fn from_bytes(bytes: &[u8]) -> Result<Self> {
        let corrupt = |m: String| TdeError::Corrupt(m);
        let file: CatalogFile =
            serde_json::from_slice(bytes).map_err(|e| corrupt(format!("not a valid provider catalog: {e}")))?;
        if file.format != FORMAT {
            return Err(corrupt(format!("unexpected format \"{}\"", file.format)));
        }
        if file.version != VERSION {
            return Err(corrupt(format!("unsupported version {} (this build reads version {VERSION})", file.version)));
        }
        if file.next_id < 1 {
            return Err(corrupt(format!("bad next id {}", file.next_id)));
        }
        let mut ids = HashSet::new();
        let mut names = HashSet::new();
        for p in &file.providers {
            if p.id <= 0 || p.id >= file.next_id || !ids.insert(p.id) {
                return Err(corrupt(format!(
                    "provider \"{}\" has a bad or duplicate id {} (next id {})",
                    p.name, p.id, file.next_id
                )));
            }
            if !names.insert((p.db_oid, p.name.as_str())) {
                return Err(corrupt(format!("two providers named \"{}\" in the same scope", p.name)));
            }
            validate_name(&p.name)
                .and_then(|_| validate_options(p.kind, &p.options))
                .map_err(|e| corrupt(format!("provider \"{}\": {e}", p.name)))?;
        }
        Ok(ProviderCatalog { next_id: file.next_id, providers: file.providers })
    }

    /// Write the catalog to `path` atomically (mode 0600; tmp + fsync + rename + dir fsync).
    pub fn save_atomic(&self, path: &Path) -> Result<()> {
        fsutil::replace_atomic(path, &self.to_bytes()?, FILE_MODE)
    }

    /// Add a provider to the scope `db_oid` ([`GLOBAL_DB_OID`] for a global one) and return
    /// its id. Fails with [`TdeError::Invalid`] for a bad name or options, or a name that
    /// already exists in that scope.
    pub fn add(&mut self, name: &str, kind: ProviderKind, options: Value, db_oid: u32) -> Result<i32> {
        validate_name(name)?;
        validate_options(kind, &options)?;
        if self.providers.iter().any(|p| p.db_oid == db_oid && p.name == name) {
            return Err(TdeError::Invalid(format!("key provider \"{name}\" already exists")));
        }
        let id = self.next_id;
        self.next_id = id.checked_add(1).ok_or_else(|| TdeError::Invalid("no key provider ids left".into()))?;
        self.providers.push(ProviderRecord { id, name: name.to_string(), kind, options, db_oid });
        Ok(id)
    }

    /// Find a provider by name: in database `db_oid` first, then (if `include_global`)
    /// among the global providers. With `db_oid` = [`GLOBAL_DB_OID`], only global providers.
    pub fn find(&self, name: &str, db_oid: u32, include_global: bool) -> Option<&ProviderRecord> {
        let in_scope = |scope: u32| self.providers.iter().find(|p| p.db_oid == scope && p.name == name);
        in_scope(db_oid).or_else(
            || {
                if include_global && db_oid != GLOBAL_DB_OID {
                    in_scope(GLOBAL_DB_OID)
                } else {
                    None
                }
            },
        )
    }

    /// The provider with id `id`.
    pub fn by_id(&self, id: i32) -> Option<&ProviderRecord> {
        self.providers.iter().find(|p| p.id == id)
    }

    /// The providers of one scope (a database, or [`GLOBAL_DB_OID`]), in id order.
    pub fn in_scope(&self, db_oid: u32) -> impl Iterator<Item = &ProviderRecord> {
        self.providers.iter().filter(move |p| p.db_oid == db_oid)
    }

    /// Change the kind and options of provider `id` (its name, id and scope stay).
    pub fn change(&mut self, id: i32, kind: ProviderKind, options: Value) -> Result<()> {
        validate_options(kind, &options)?;
        let rec = self
            .providers
            .iter_mut()
            .find(|p| p.id == id)
            .ok_or_else(|| TdeError::NotFound(format!("key provider with id {id}")))?;
        rec.kind = kind;
        rec.options = options;
        Ok(())
    }

    /// Remove provider `id`, returning it. The id is not reused.
    pub fn remove(&mut self, id: i32) -> Option<ProviderRecord> {
        let pos = self.providers.iter().position(|p| p.id == id)?;
        Some(self.providers.remove(pos))
    }
}

/// Instantiate the provider described by `rec`, for a process whose working directory is
/// the data directory (a server process): see [`open_provider_in`].
pub fn open_provider(rec: &ProviderRecord) -> Result<Box<dyn KeyProvider>> {
    open_provider_in(rec, Path::new("pg_tde"))
}

/// Instantiate the provider described by `rec`, with pg_tde's directory at `key_dir`
/// (where wrapping providers find their envelopes).
///
/// `vault-v2` and `vault-transit` read their token file here; `kmip` and `kmip-wrap` read
/// their certificate files and contact the server only in their methods; `command` runs
/// its adapter only in its methods.
pub fn open_provider_in(rec: &ProviderRecord, key_dir: &Path) -> Result<Box<dyn KeyProvider>> {
    Ok(match rec.kind {
        ProviderKind::File => Box::new(FileKeyring::new(parse_file_options(&rec.options)?)),
        ProviderKind::VaultV2 => Box::new(VaultV2Provider::new(parse_vault_options(&rec.options)?)?),
        ProviderKind::Kmip => Box::new(KmipProvider::new(parse_kmip_options(&rec.options)?)),
        kind => Box::new(EnvelopeProvider::new(
            rec.id,
            open_wrapper(kind, &rec.options)?,
            key_dir.join(crate::envelope::FILE_NAME),
        )),
    })
}

/// The KMS of a wrapping provider kind ([`ProviderKind::wraps`]).
pub fn open_wrapper(kind: ProviderKind, options: &Value) -> Result<Box<dyn KeyWrapper>> {
    Ok(match kind {
        ProviderKind::VaultTransit => Box::new(VaultTransitWrapper::new(parse_vault_options(options)?)?),
        ProviderKind::KmipWrap => Box::new(KmipProvider::new(parse_kmip_options(options)?)),
        ProviderKind::Command => Box::new(CommandWrapper::new(parse_command_options(options)?)),
        other => return Err(TdeError::Invalid(format!("key provider type \"{other}\" does not wrap keys"))),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::os::unix::fs::PermissionsExt;

    const DB: u32 = 16384;

    fn file_opts(p: &str) -> Value {
        json!({ "path": p })
    }

    #[test]
    fn add_find_and_ids() {
        let mut c = ProviderCatalog::new();
        let g = c.add("shared", ProviderKind::File, file_opts("/k/g.json"), GLOBAL_DB_OID).unwrap();
        let d = c.add("mine", ProviderKind::File, file_opts("/k/d.json"), DB).unwrap();
        assert_eq!((g, d), (1, 2));
        assert_eq!(c.next_id, 3);
        assert_eq!(c.find("mine", DB, false).unwrap().id, d);
        assert_eq!(c.find("shared", DB, true).unwrap().id, g);
        assert!(c.find("shared", DB, false).is_none());
        assert!(c.find("mine", DB + 1, true).is_none());
        assert!(c.find("mine", GLOBAL_DB_OID, true).is_none());
        assert_eq!(c.find("shared", GLOBAL_DB_OID, false).unwrap().id, g);
        assert_eq!(c.by_id(d).unwrap().name, "mine");
        assert!(c.by_id(99).is_none());
        assert_eq!(c.in_scope(DB).count(), 1);
    }

    #[test]
    fn duplicates_and_scope_precedence() {
        let mut c = ProviderCatalog::new();
        c.add("p", ProviderKind::File, file_opts("/g"), GLOBAL_DB_OID).unwrap();
        match c.add("p", ProviderKind::File, file_opts("/g2"), GLOBAL_DB_OID) {
            Err(TdeError::Invalid(m)) => assert!(m.contains("already exists"), "{m}"),
            other => panic!("expected Invalid, got {other:?}"),
        }
        // the same name in a database scope is allowed and shadows the global one
        let local = c.add("p", ProviderKind::File, file_opts("/d"), DB).unwrap();
        assert!(matches!(c.add("p", ProviderKind::File, file_opts("/d2"), DB), Err(TdeError::Invalid(_))));
        assert_eq!(c.find("p", DB, true).unwrap().id, local);
        assert_eq!(c.find("p", DB + 1, true).unwrap().db_oid, GLOBAL_DB_OID);
        // a failed add consumes no id
        assert_eq!(c.next_id, 3);
    }

    #[test]
    fn options_validation() {
        let mut c = ProviderCatalog::new();
        let invalid = |r: Result<i32>| matches!(r, Err(TdeError::Invalid(_)));
        assert!(invalid(c.add("a", ProviderKind::File, json!({"path": "rel"}), 0)));
        assert!(invalid(c.add("a", ProviderKind::File, json!({"path": "/k", "x": 1}), 0)));
        assert!(invalid(c.add("a", ProviderKind::File, json!("/k"), 0)));
        assert!(invalid(c.add("a", ProviderKind::VaultV2, json!([1]), 0)));
        assert!(invalid(c.add("", ProviderKind::File, file_opts("/k"), 0)));
        assert!(invalid(c.add("a\0", ProviderKind::File, file_opts("/k"), 0)));
        assert!(c.providers.is_empty());
        assert!(invalid(c.add("a", ProviderKind::VaultV2, json!({"url": "https://127.0.0.1:8200"}), 0)));
        let vault = json!({"url": "https://127.0.0.1:8200", "mountPath": "kv", "tokenPath": "/t"});
        c.add("v", ProviderKind::VaultV2, vault, 0).unwrap();
    }

    #[test]
    fn save_load_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("providers.json");
        let empty = ProviderCatalog::load(&path).unwrap();
        assert_eq!(empty, ProviderCatalog::new());
        assert_eq!(empty.next_id, 1);

        let mut c = ProviderCatalog::new();
        c.add("g", ProviderKind::File, file_opts("/k/g.json"), 0).unwrap();
        let d = c.add("d", ProviderKind::File, file_opts("/k/d.json"), DB).unwrap();
        let kmip = json!({"host": "127.0.0.1", "port": 5696, "certPath": "/k/c.pem",
                          "keyPath": "/k/c.key", "caPath": "/k/ca.pem"});
        assert!(matches!(c.add("k", ProviderKind::Kmip, json!({"host": "127.0.0.1"}), DB), Err(TdeError::Invalid(_))));
        c.add("k", ProviderKind::Kmip, kmip, DB).unwrap();
        c.remove(d).unwrap();
        c.save_atomic(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert!(!fsutil::tmp_path(&path).exists());

        let back = ProviderCatalog::load(&path).unwrap();
        assert_eq!(back, c);
        assert_eq!(back.next_id, 4, "removed ids are not reused");
        assert_eq!(back.to_bytes().unwrap(), c.to_bytes().unwrap());
        assert_eq!(ProviderCatalog::from_bytes(&c.to_bytes().unwrap()).unwrap(), c);
    }

    #[test]
    fn damaged_catalogs_are_corrupt() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("providers.json");
        std::fs::write(&path, b"{not json").unwrap();
        match ProviderCatalog::load(&path) {
            Err(TdeError::Corrupt(m)) => assert!(m.contains("providers.json"), "{m}"),
            other => panic!("expected Corrupt, got {other:?}"),
        }
        let rec = |id: i32, name: &str| {
            json!({"id": id, "name": name, "kind": "file",
                   "options": {"path": "/k"}, "db_oid": 0})
        };
        for bad in [
            json!({"format": "x", "version": 1, "next_id": 1, "providers": []}),
            json!({"format": FORMAT, "version": 9, "next_id": 1, "providers": []}),
            json!({"format": FORMAT, "version": 1, "next_id": 0, "providers": []}),
            json!({"format": FORMAT, "version": 1, "next_id": 2, "providers": [rec(2, "a")]}),
            json!({"format": FORMAT, "version": 1, "next_id": 5,
                   "providers": [rec(1, "a"), rec(1, "b")]}),
            json!({"format": FORMAT, "version": 1, "next_id": 5,
                   "providers": [rec(1, "a"), rec(2, "a")]}),
            json!({"format": FORMAT, "version": 1, "next_id": 5,
                   "providers": [{"id": 1, "name": "a", "kind": "file",
                                  "options": {"path": "rel"}, "db_oid": 0}]}),
            json!({"format": FORMAT, "version": 1, "next_id": 5,
                   "providers": [{"id": 1, "name": "a", "kind": "ftp",
                                  "options": {}, "db_oid": 0}]}),
        ] {
            let bytes = serde_json::to_vec(&bad).unwrap();
            assert!(matches!(ProviderCatalog::from_bytes(&bytes), Err(TdeError::Corrupt(_))), "{bad}");
        }
    }

    #[test]
    fn change_and_remove() {
        let mut c = ProviderCatalog::new();
        let id = c.add("p", ProviderKind::File, file_opts("/a"), 0).unwrap();
        c.change(id, ProviderKind::File, file_opts("/b")).unwrap();
        assert_eq!(c.by_id(id).unwrap().options, file_opts("/b"));
        assert!(matches!(c.change(id, ProviderKind::File, json!({"path": "b"})), Err(TdeError::Invalid(_))));
        assert!(matches!(c.change(42, ProviderKind::File, file_opts("/c")), Err(TdeError::NotFound(_))));
        assert_eq!(c.remove(id).unwrap().name, "p");
        assert!(c.remove(id).is_none());
    }

    #[test]
    fn open_provider_by_kind() {
        let dir = tempfile::tempdir().unwrap();
        let keyring = dir.path().join("keyring.json");
        let mut c = ProviderCatalog::new();
        let id = c.add("f", ProviderKind::File, file_opts(keyring.to_str().unwrap()), 0).unwrap();
        let p = open_provider(c.by_id(id).unwrap()).unwrap();
        p.check().unwrap();
        let k = p.create_key("pk", 32).unwrap();
        assert_eq!(p.get_key("pk").unwrap().unwrap().key, k.key);
        assert!(keyring.exists());

        // a vault-v2 provider reads its token file when opened (the server is contacted
        // only by its methods: see tests/vault_openbao.rs)
        let token = dir.path().join("token");
        let vault = json!({"url": "https://127.0.0.1:8200", "mountPath": "kv", "tokenPath": token.to_str().unwrap()});
        let vid = c.add("v", ProviderKind::VaultV2, vault, 0).unwrap();
        match open_provider(c.by_id(vid).unwrap()) {
            Err(TdeError::Provider(m)) => assert!(m.contains("token file"), "{m}"),
            Err(e) => panic!("expected Provider, got {e:?}"),
            Ok(_) => panic!("a vault-v2 provider without its token file should not open"),
        }
        std::fs::write(&token, "s.token\n").unwrap();
        open_provider(c.by_id(vid).unwrap()).unwrap();
    }

    #[test]
    fn paths_resolve_through_links_and_missing_names() {
        let dir = tempfile::tempdir().unwrap();
        let real = dir.path().join("real");
        std::fs::create_dir(&real).unwrap();
        std::os::unix::fs::symlink(&real, dir.path().join("link")).unwrap();
        let canon = real.canonicalize().unwrap();
        assert_eq!(resolve_path(&dir.path().join("link/new/file.json")), canon.join("new/file.json"));
        assert_eq!(resolve_path(&dir.path().join("real/../real/x")), canon.join("x"));
        assert!(resolve_path(&dir.path().join("link/missing/../x")).ends_with("missing/../x"));
    }

    #[test]
    fn server_files_of_each_kind() {
        let files = server_files(ProviderKind::File, &serde_json::json!({"path": "/k/keyring.json"})).unwrap();
        assert_eq!(files, vec![("path", std::path::PathBuf::from("/k/keyring.json"), FileAccess::Write)]);
        let v = serde_json::json!({"url": "http://v:8200", "mountPath": "secret", "tokenPath": "/t", "caPath": "/ca"});
        let files = server_files(ProviderKind::VaultV2, &v).unwrap();
        assert_eq!(files.iter().map(|f| f.0).collect::<Vec<_>>(), ["tokenPath", "caPath"]);
        assert!(files.iter().all(|f| f.2 == FileAccess::Read));
        assert!(vault_uses_plain_http(&v));
        assert!(!vault_uses_plain_http(&serde_json::json!({"url": "https://v", "mountPath": "s", "tokenPath": "/t"})));
    }
}
