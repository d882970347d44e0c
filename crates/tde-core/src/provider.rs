//! Key providers: where principal keys live.
//!
//! Principal keys never live in `$PGDATA`; they are fetched from a provider through the
//! [`KeyProvider`] trait. The kinds of provider are listed by [`ProviderKind`]; this
//! crate implements the file keyring ([`FileKeyring`]), Vault / OpenBao KV v2
//! ([`VaultV2Provider`]) and KMIP ([`KmipProvider`]), which store keys, and the
//! wrapping providers ([`wrapping`]): Vault / OpenBao Transit ([`VaultTransitWrapper`]),
//! KMIP `Encrypt`/`Decrypt` and external KMS adapters ([`CommandWrapper`]), whose keys
//! are envelopes that only the KMS can open.

use std::fmt;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use crate::error::{Result, TdeError};

pub mod command;
mod file;
pub mod kmip;
pub mod transit;
pub mod vault;
pub mod wrapping;

pub use command::{parse_command_options, CommandOptions, CommandWrapper};
pub use file::FileKeyring;
pub use kmip::{parse_kmip_options, KmipOptions, KmipProvider};
pub use transit::VaultTransitWrapper;
pub use vault::{parse_vault_options, VaultOptions, VaultV2Provider};
pub use wrapping::{EnvelopeProvider, KeyWrapper, WrappedKey};

/// Longest key name, in bytes.
pub const MAX_KEY_NAME_LEN: usize = 255;

/// A principal key fetched from (or created in) a provider.
#[derive(Clone)]
pub struct PrincipalKey {
    /// Key name in the provider.
    pub name: String,
    /// Key bytes, zeroed on drop.
    pub key: Zeroizing<Vec<u8>>,
    /// For a wrapping provider, the key's envelope (see [`crate::envelope`]); after
    /// `create_key` the caller must store it before the key is used.
    pub envelope: Option<crate::envelope::Envelope>,
}

impl fmt::Debug for PrincipalKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PrincipalKey")
            .field("name", &self.name)
            .field("len", &self.key.len())
            .field("envelope", &self.envelope)
            .finish_non_exhaustive()
    }
}

/// A store of principal keys.
pub trait KeyProvider: Send {
    /// Fetch a key by name; `Ok(None)` if the provider does not have it.
    fn get_key(&self, name: &str) -> Result<Option<PrincipalKey>>;
    /// Create and store a new random key of `len` bytes; error `Invalid("... already exists")`
    /// if the name exists.
    fn create_key(&self, name: &str, len: usize) -> Result<PrincipalKey>;
    /// Check the provider is reachable/usable (for the file provider: the file is readable
    /// or its directory writable).
    fn check(&self) -> Result<()>;
}

/// Check a key name: 1..=255 bytes, no NUL.
pub fn validate_key_name(name: &str) -> Result<()> {
    if name.is_empty() || name.len() > MAX_KEY_NAME_LEN || name.contains('\0') {
        return Err(TdeError::Invalid(format!(
            "key name must be 1 to {MAX_KEY_NAME_LEN} bytes without NUL characters, got {} bytes",
            name.len()
        )));
    }
    Ok(())
}

/// The kinds of key provider (`type` argument of `pg_tde_add_*_key_provider`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ProviderKind {
    /// A keyring file (`file`).
    #[serde(rename = "file")]
    File,
    /// HashiCorp Vault / OpenBao KV version 2 (`vault-v2`).
    #[serde(rename = "vault-v2")]
    VaultV2,
    /// A KMIP server (`kmip`).
    #[serde(rename = "kmip")]
    Kmip,
    /// Vault / OpenBao Transit, wrapping envelope keys (`vault-transit`).
    #[serde(rename = "vault-transit")]
    VaultTransit,
    /// A KMIP server's `Encrypt` / `Decrypt`, wrapping envelope keys (`kmip-wrap`).
    #[serde(rename = "kmip-wrap")]
    KmipWrap,
    /// An external KMS adapter program, wrapping envelope keys (`command`).
    #[serde(rename = "command")]
    Command,
}

impl ProviderKind {
    /// Every kind.
    pub const ALL: [ProviderKind; 6] = [
        ProviderKind::File,
        ProviderKind::VaultV2,
        ProviderKind::Kmip,
        ProviderKind::VaultTransit,
        ProviderKind::KmipWrap,
        ProviderKind::Command,
    ];

    /// The kind for a type name: `file`, `vault-v2`, `kmip`, `vault-transit`, `kmip-wrap`
    /// or `command`.
    pub fn from_type_name(name: &str) -> Option<ProviderKind> {
        Self::ALL.into_iter().find(|k| k.type_name() == name)
    }

    /// Whether the provider wraps envelope keys rather than storing keys.
    pub fn wraps(&self) -> bool {
        matches!(self, ProviderKind::VaultTransit | ProviderKind::KmipWrap | ProviderKind::Command)
    }

    /// The type name of this kind.
    pub fn type_name(&self) -> &'static str {
        match self {
            ProviderKind::File => "file",
            ProviderKind::VaultV2 => "vault-v2",
            ProviderKind::Kmip => "kmip",
            ProviderKind::VaultTransit => "vault-transit",
            ProviderKind::KmipWrap => "kmip-wrap",
            ProviderKind::Command => "command",
        }
    }
}

impl fmt::Display for ProviderKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.type_name())
    }
}

/// Validate the options of a `file` provider and return the keyring path.
///
/// `options` must be a flat JSON object whose only key is `path`, a string holding an
/// absolute path. Unknown keys are rejected with [`TdeError::Invalid`] naming the key.
pub fn parse_file_options(options: &serde_json::Value) -> Result<PathBuf> {
    let obj = options
        .as_object()
        .ok_or_else(|| TdeError::Invalid("file key provider options must be a JSON object".into()))?;
    if let Some(unknown) = obj.keys().find(|k| k.as_str() != "path") {
        return Err(TdeError::Invalid(format!(
            "unknown option \"{unknown}\" for a file key provider (only \"path\" is allowed)"
        )));
    }
    let path = match obj.get("path") {
        None => return Err(TdeError::Invalid("file key provider needs the option \"path\"".into())),
        Some(serde_json::Value::String(s)) => s,
        Some(_) => return Err(TdeError::Invalid("option \"path\" of a file key provider must be a string".into())),
    };
    if path.contains('\0') {
        return Err(TdeError::Invalid("option \"path\" must not contain NUL characters".into()));
    }
    let path = PathBuf::from(path);
    if !path.is_absolute() {
        return Err(TdeError::Invalid(format!("option \"path\" must be an absolute path, got \"{}\"", path.display())));
    }
    if path.file_name().is_none() {
        return Err(TdeError::Invalid(format!("option \"path\" must name a file, got \"{}\"", path.display())));
    }
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn kinds_and_names() {
        for (kind, name) in [
            (ProviderKind::File, "file"),
            (ProviderKind::VaultV2, "vault-v2"),
            (ProviderKind::Kmip, "kmip"),
            (ProviderKind::VaultTransit, "vault-transit"),
            (ProviderKind::KmipWrap, "kmip-wrap"),
            (ProviderKind::Command, "command"),
        ] {
            assert_eq!(ProviderKind::from_type_name(name), Some(kind));
            assert_eq!(kind.type_name(), name);
            assert_eq!(serde_json::to_value(kind).unwrap(), json!(name));
        }
        assert_eq!(ProviderKind::from_type_name("vault"), None);
        assert_eq!(ProviderKind::from_type_name("File"), None);
    }

    #[test]
    fn file_options() {
        assert_eq!(
            parse_file_options(&json!({"path": "/etc/pg/keyring.json"})).unwrap(),
            PathBuf::from("/etc/pg/keyring.json")
        );
        let err = |v: serde_json::Value| match parse_file_options(&v) {
            Err(TdeError::Invalid(m)) => m,
            other => panic!("expected Invalid for {v}, got {other:?}"),
        };
        assert!(err(json!({"path": "/k", "mode": "x"})).contains("\"mode\""));
        assert!(err(json!({})).contains("path"));
        assert!(err(json!({"path": 5})).contains("string"));
        assert!(err(json!({"path": {"type": "remote"}})).contains("string"));
        assert!(err(json!({"path": "relative/keyring"})).contains("absolute"));
        assert!(err(json!({"path": "/"})).contains("file"));
        assert!(err(json!(["/k"])).contains("object"));
        assert!(err(json!("/k")).contains("object"));
    }

    #[test]
    fn key_names() {
        validate_key_name("k").unwrap();
        validate_key_name(&"x".repeat(255)).unwrap();
        for bad in ["", "a\0b"] {
            assert!(validate_key_name(bad).is_err());
        }
        assert!(validate_key_name(&"x".repeat(256)).is_err());
    }

    #[test]
    fn principal_key_debug_hides_bytes() {
        let k = PrincipalKey { name: "n".into(), key: Zeroizing::new(vec![0xab; 16]), envelope: None };
        let s = format!("{k:?}");
        assert!(s.contains("\"n\"") && !s.contains("171") && !s.contains("ab"), "{s}");
    }
}
