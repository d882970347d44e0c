//! Providers that wrap instead of store: the KMS keeps its key, pg_tde keeps an envelope.
//!
//! A wrapping provider (Vault / OpenBao Transit, KMIP `Encrypt`/`Decrypt`, an external
//! `command` adapter for a cloud KMS) never hands pg_tde a key. The principal key of a
//! database (or the default or server key) is instead a random *envelope key* that pg_tde
//! generates; the KMS encrypts it with its own key ([`KeyWrapper::wrap`]), and only that
//! wrapped form is kept, in `$PGDATA/pg_tde/envelopes.json` (see [`crate::envelope`]).
//! Unwrapping asks the KMS again ([`KeyWrapper::unwrap`]); the result is cached like a
//! fetched key. The KMS key itself is never requested, and where pg_tde creates it
//! ([`KeyWrapper::prepare_key`]) it is created non-exportable.
//!
//! Errors tell a KMS that says no ([`TdeError::Refused`]: the key is revoked, disabled,
//! deleted, expired, or the credentials lost the permission) from one that cannot be
//! reached or answers oddly ([`TdeError::Provider`]): the key check of the server drops
//! a key on the first and only warns on the second.

use std::fmt;
use std::path::PathBuf;
use std::time::{SystemTime, UNIX_EPOCH};

use zeroize::Zeroizing;

use super::{validate_key_name, KeyProvider, PrincipalKey};
use crate::envelope::{Envelope, EnvelopeStore};
use crate::error::{Result, TdeError};

/// A key wrapped by a KMS key: what pg_tde stores instead of the key.
#[derive(Clone, PartialEq, Eq)]
pub struct WrappedKey {
    /// The KMS key that wrapped it (the pg_tde key name for Transit and KMIP; an ARN,
    /// alias or resource name for a command adapter).
    pub kms_key_id: String,
    /// The KMS key's version that wrapped it, where the KMS has versions.
    pub kms_key_version: Option<String>,
    /// The KMS's ciphertext, opaque to pg_tde.
    pub blob: Vec<u8>,
}

impl fmt::Debug for WrappedKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WrappedKey")
            .field("kms_key_id", &self.kms_key_id)
            .field("kms_key_version", &self.kms_key_version)
            .field("blob_len", &self.blob.len())
            .finish()
    }
}

/// A KMS that encrypts and decrypts keys with a key that never leaves it.
pub trait KeyWrapper: Send {
    /// Make sure the KMS key `kms_key_id` exists, creating it non-exportable where the
    /// KMS lets pg_tde create keys (Transit, KMIP); for a command adapter, the key must
    /// already exist and this checks that it can wrap.
    fn prepare_key(&self, kms_key_id: &str) -> Result<()>;
    /// Encrypt `plaintext` (a principal key) with the KMS key.
    fn wrap(&self, kms_key_id: &str, plaintext: &[u8]) -> Result<WrappedKey>;
    /// Decrypt a wrapped key.
    fn unwrap(&self, wrapped: &WrappedKey) -> Result<Zeroizing<Vec<u8>>>;
    /// Re-encrypt a wrapped key with the newest version of its KMS key without
    /// revealing it, where the KMS can; `None` when it is already the newest (or the
    /// KMS has no versions).
    fn rewrap(&self, wrapped: &WrappedKey) -> Result<Option<WrappedKey>>;
    /// Prove the KMS still lets this key be unwrapped (the periodic key check); by
    /// default an unwrap whose result is dropped at once.
    fn verify(&self, wrapped: &WrappedKey) -> Result<()> {
        self.unwrap(wrapped).map(|_| ())
    }
    /// Check the KMS is reachable and usable, without a key.
    fn check(&self) -> Result<()>;
}

/// A wrapping provider seen as a [`KeyProvider`]: its keys are the envelopes of the
/// store at `store_path` that belong to it, unwrapped by its KMS.
pub struct EnvelopeProvider {
    provider_id: i32,
    wrapper: Box<dyn KeyWrapper>,
    store_path: PathBuf,
}

impl EnvelopeProvider {
    /// Provider `provider_id`, whose KMS is `wrapper`, with its envelopes in `store_path`.
    pub fn new(provider_id: i32, wrapper: Box<dyn KeyWrapper>, store_path: PathBuf) -> Self {
        EnvelopeProvider { provider_id, wrapper, store_path }
    }

    /// The KMS behind this provider.
    pub fn wrapper(&self) -> &dyn KeyWrapper {
        &*self.wrapper
    }

    /// Unwrap `envelope` and check the result has the envelope's length.
    pub fn open_envelope(&self, envelope: &Envelope) -> Result<Zeroizing<Vec<u8>>> {
        let key = self.wrapper.unwrap(&envelope.wrapped_key())?;
        if key.len() != envelope.key_len as usize {
            return Err(TdeError::Provider(format!(
                "the KMS unwrapped key \"{}\" to {} bytes, not the {} it was created with",
                envelope.name,
                key.len(),
                envelope.key_len
            )));
        }
        Ok(key)
    }
}

impl KeyProvider for EnvelopeProvider {
    fn get_key(&self, name: &str) -> Result<Option<PrincipalKey>> {
        validate_key_name(name)?;
        let store = EnvelopeStore::load(&self.store_path)?;
        let Some(envelope) = store.find(self.provider_id, name) else { return Ok(None) };
        let key = self.open_envelope(envelope)?;
        Ok(Some(PrincipalKey { name: name.to_string(), key, envelope: Some(envelope.clone()) }))
    }

    /// Generate a random key and have the KMS wrap it with its key of the same name
    /// (created non-exportable where pg_tde may create keys). The envelope is returned
    /// in [`PrincipalKey::envelope`]: the caller stores it (WAL-logged) before any use.
    fn create_key(&self, name: &str, len: usize) -> Result<PrincipalKey> {
        validate_key_name(name)?;
        if len != 16 && len != 32 {
            return Err(TdeError::Invalid(format!("principal keys are 16 or 32 bytes, not {len}")));
        }
        if EnvelopeStore::load(&self.store_path)?.find(self.provider_id, name).is_some() {
            return Err(TdeError::Invalid(format!("key \"{name}\" already exists in the provider")));
        }
        self.wrapper.prepare_key(name)?;
        let mut key = Zeroizing::new(vec![0u8; len]);
        crate::rng::fill(&mut key)?;
        let wrapped = self.wrapper.wrap(name, &key)?;
        let created = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0);
        let envelope = Envelope::new(self.provider_id, name, len, wrapped, created);
        // Proved to come back before anything depends on it.
        if *self.open_envelope(&envelope)? != *key {
            return Err(TdeError::Provider(format!(
                "the KMS did not unwrap key \"{name}\" to the key it wrapped; the key was not created"
            )));
        }
        Ok(PrincipalKey { name: name.to_string(), key, envelope: Some(envelope) })
    }

    fn check(&self) -> Result<()> {
        self.wrapper.check()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    /// A KMS stand-in: "wraps" by XOR with a pad, can be told to refuse.
    #[derive(Clone, Default)]
    struct FakeKms {
        refuse: Arc<Mutex<bool>>,
        prepared: Arc<Mutex<Vec<String>>>,
        truncate: Arc<Mutex<bool>>,
    }

    impl KeyWrapper for FakeKms {
        fn prepare_key(&self, kms_key_id: &str) -> Result<()> {
            self.prepared.lock().unwrap().push(kms_key_id.to_string());
            Ok(())
        }
        fn wrap(&self, kms_key_id: &str, plaintext: &[u8]) -> Result<WrappedKey> {
            Ok(WrappedKey {
                kms_key_id: kms_key_id.into(),
                kms_key_version: Some("1".into()),
                blob: plaintext.iter().map(|b| b ^ 0x5a).collect(),
            })
        }
        fn unwrap(&self, wrapped: &WrappedKey) -> Result<Zeroizing<Vec<u8>>> {
            if *self.refuse.lock().unwrap() {
                return Err(TdeError::Refused("key disabled".into()));
            }
            let mut out: Vec<u8> = wrapped.blob.iter().map(|b| b ^ 0x5a).collect();
            if *self.truncate.lock().unwrap() {
                out.pop();
            }
            Ok(Zeroizing::new(out))
        }
        fn rewrap(&self, _wrapped: &WrappedKey) -> Result<Option<WrappedKey>> {
            Ok(None)
        }
        fn check(&self) -> Result<()> {
            Ok(())
        }
    }

    #[test]
    fn create_store_and_get() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(crate::envelope::FILE_NAME);
        let kms = FakeKms::default();
        let p = EnvelopeProvider::new(7, Box::new(kms.clone()), path.clone());
        let created = p.create_key("k1", 32).unwrap();
        let envelope = created.envelope.clone().expect("a wrapping provider returns the envelope");
        assert_eq!((envelope.provider_id, envelope.name.as_str(), envelope.key_len), (7, "k1", 32));
        assert_ne!(envelope.wrapped, *created.key, "only the wrapped form is in the envelope");
        assert_eq!(*kms.prepared.lock().unwrap(), ["k1"]);
        // not stored yet: the caller stores it (WAL-logged)
        assert!(p.get_key("k1").unwrap().is_none());
        let mut store = EnvelopeStore::default();
        store.put(envelope);
        store.save_atomic(&path).unwrap();
        assert_eq!(p.get_key("k1").unwrap().unwrap().key, created.key);
        assert!(matches!(p.create_key("k1", 32), Err(TdeError::Invalid(m)) if m.contains("already exists")));
        // another provider id does not see it
        let other = EnvelopeProvider::new(8, Box::new(kms.clone()), path.clone());
        assert!(other.get_key("k1").unwrap().is_none());
        // a refusal comes through as such; a wrong length is caught
        *kms.refuse.lock().unwrap() = true;
        assert!(matches!(p.get_key("k1"), Err(TdeError::Refused(_))));
        *kms.refuse.lock().unwrap() = false;
        *kms.truncate.lock().unwrap() = true;
        assert!(matches!(p.get_key("k1"), Err(TdeError::Provider(m)) if m.contains("31 bytes")));
    }

    #[test]
    fn a_kms_that_does_not_give_the_key_back_creates_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let kms = FakeKms::default();
        *kms.truncate.lock().unwrap() = true;
        let p = EnvelopeProvider::new(1, Box::new(kms), dir.path().join("e.json"));
        assert!(p.create_key("k", 16).is_err());
        assert!(matches!(p.create_key("k", 24), Err(TdeError::Invalid(_))));
    }
}
