//! The HashiCorp Vault / OpenBao Transit provider (`vault-transit`): keys that never
//! leave the server.
//!
//! Options are those of `vault-v2` ([`super::vault::parse_vault_options`]), with
//! `mountPath` naming a Transit secrets engine. A pg_tde key `name` is an envelope key
//! (see [`super::wrapping`]) wrapped by the Transit key of the same name:
//!
//! | operation        | request                                                    |
//! |------------------|------------------------------------------------------------|
//! | create the key   | `GET {mount}/keys/{name}`, then if absent `POST {mount}/keys/{name}` `{"type": "aes256-gcm96", "exportable": false, "allow_plaintext_backup": false}` |
//! | wrap             | `POST {mount}/encrypt/{name}` `{"plaintext": base64}`      |
//! | unwrap           | `POST {mount}/decrypt/{name}` `{"ciphertext": "vault:vN:…"}` |
//! | re-wrap          | `POST {mount}/rewrap/{name}` (to the newest key version)   |
//!
//! The Transit key is never read (there is no export call anywhere in this module), and an
//! existing key that is exportable or allows plaintext backup is refused. A token with
//! `update` on `{mount}/encrypt/*`, `{mount}/decrypt/*`, `{mount}/rewrap/*` and `read`,
//! `create`, `update` on `{mount}/keys/*` is enough.
//!
//! The key version that wrapped an envelope is the `N` of the ciphertext's `vault:vN:`
//! prefix. Answers that mean "no" (403, a deleted key, a version below the key's
//! `min_decryption_version`) are [`TdeError::Refused`]; everything else, a sealed
//! server included, is [`TdeError::Provider`].

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use reqwest::StatusCode;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use zeroize::{Zeroize, Zeroizing};

use super::validate_key_name;
use super::vault::{check_segments, encode_path, server_text, VaultOptions, VaultSession};
use super::wrapping::{KeyWrapper, WrappedKey};
use crate::error::{Result, TdeError};
use crate::secret_buf::SecretBuf;

/// Vault / OpenBao Transit as a [`KeyWrapper`].
#[derive(Debug)]
pub struct VaultTransitWrapper {
    session: VaultSession,
}

#[derive(Serialize)]
struct EncryptRequest<'a> {
    plaintext: &'a str,
}

#[derive(Serialize)]
struct CiphertextRequest<'a> {
    ciphertext: &'a str,
}

#[derive(Deserialize)]
struct CiphertextResponse {
    data: CiphertextData,
}

#[derive(Deserialize)]
struct CiphertextData {
    ciphertext: String,
}

#[derive(Deserialize)]
struct PlaintextResponse {
    data: PlaintextData,
}

#[derive(Deserialize)]
struct PlaintextData {
    plaintext: String,
}

impl Drop for PlaintextData {
    fn drop(&mut self) {
        self.plaintext.zeroize();
    }
}

#[derive(Serialize)]
struct CreateKeyRequest {
    r#type: &'static str,
    exportable: bool,
    allow_plaintext_backup: bool,
}

/// The `N` of a `vault:vN:…` ciphertext.
pub fn ciphertext_version(ciphertext: &str) -> Option<u32> {
    let rest = ciphertext.strip_prefix("vault:v")?;
    let (n, _) = rest.split_once(':')?;
    n.parse().ok()
}

/// Whether a Transit error answer means the key may not be used (revoked in effect), as
/// opposed to a failure of the request.
fn is_refusal(status: StatusCode, server: &str) -> bool {
    let text = server.to_ascii_lowercase();
    status == StatusCode::FORBIDDEN
        || status == StatusCode::NOT_FOUND
        || (status == StatusCode::BAD_REQUEST
            && (text.contains("key not found")
                || text.contains("disallowed by policy")
                || text.contains("too old")
                || text.contains("permission denied")))
}

impl VaultTransitWrapper {
    /// Open a Transit provider: read the token and CA files and set up the HTTP client.
    /// The server is not contacted.
    pub fn new(opts: VaultOptions) -> Result<Self> {
        Ok(VaultTransitWrapper { session: VaultSession::new(opts)? })
    }

    fn url(&self, action: &str, name: &str) -> String {
        let o = self.session.options();
        format!("{}/v1/{}/{action}/{}", o.url, encode_path(&o.mount_path), encode_path(name))
    }

    /// POST a JSON body (wiped after use) and return the status and body.
    fn post(&self, url: &str, body: &impl Serialize) -> Result<(StatusCode, Zeroizing<Vec<u8>>)> {
        let mut json = SecretBuf::with_capacity(256);
        serde_json::to_writer(&mut json, body)
            .map_err(|e| self.session.error(format_args!("could not encode the request: {e}")))?;
        let post = self.session.client_post(url).header(reqwest::header::CONTENT_TYPE, "application/json");
        self.session.send(post.body(json.to_vec()), url)
    }

    /// The error for a failed Transit call on key `name`.
    fn failure(&self, what: &str, name: &str, url: &str, status: StatusCode, body: &[u8]) -> TdeError {
        let server = server_text(body);
        let err = self.session.status_error(url, status, &server);
        if is_refusal(status, &server) {
            TdeError::Refused(format!("Transit key \"{name}\": {what} refused: {}", provider_message(err)))
        } else {
            err
        }
    }

    fn check_name(name: &str) -> Result<()> {
        validate_key_name(name)?;
        if name.contains('/') || !check_segments(name) {
            return Err(TdeError::Invalid(format!("\"{name}\" cannot name a Transit key: it must not contain \"/\"")));
        }
        Ok(())
    }
}

fn provider_message(e: TdeError) -> String {
    match e {
        TdeError::Provider(m) => m,
        other => other.to_string(),
    }
}

impl KeyWrapper for VaultTransitWrapper {
    fn prepare_key(&self, name: &str) -> Result<()> {
        Self::check_name(name)?;
        let url = self.url("keys", name);
        let (status, body) = self.session.send(self.session.client_get(&url), &url)?;
        match status {
            StatusCode::OK => {
                let v: Value = serde_json::from_slice(&body)
                    .map_err(|_| self.session.error(format_args!("unexpected answer from \"{url}\": not JSON")))?;
                let flag = |f: &str| v.pointer(&format!("/data/{f}")).and_then(Value::as_bool).unwrap_or(false);
                if flag("exportable") || flag("allow_plaintext_backup") {
                    return Err(TdeError::Invalid(format!(
                        "Transit key \"{name}\" is exportable or allows plaintext backup; pg_tde uses only keys that cannot leave the server"
                    )));
                }
                Ok(())
            }
            StatusCode::NOT_FOUND => {
                let request =
                    CreateKeyRequest { r#type: "aes256-gcm96", exportable: false, allow_plaintext_backup: false };
                let (status, body) = self.post(&url, &request)?;
                match status {
                    StatusCode::OK | StatusCode::NO_CONTENT => Ok(()),
                    _ => Err(self.failure("creating the key", name, &url, status, &body)),
                }
            }
            _ => Err(self.failure("reading the key's settings", name, &url, status, &body)),
        }
    }

    fn wrap(&self, name: &str, plaintext: &[u8]) -> Result<WrappedKey> {
        Self::check_name(name)?;
        let url = self.url("encrypt", name);
        let encoded = Zeroizing::new(BASE64.encode(plaintext));
        let (status, body) = self.post(&url, &EncryptRequest { plaintext: &encoded })?;
        if status != StatusCode::OK {
            return Err(self.failure("encrypt", name, &url, status, &body));
        }
        self.ciphertext_of(name, &url, &body)
    }

    fn unwrap(&self, wrapped: &WrappedKey) -> Result<Zeroizing<Vec<u8>>> {
        let (url, body) = self.post_ciphertext("decrypt", wrapped)?;
        let response: PlaintextResponse = serde_json::from_slice(&body)
            .map_err(|_| self.session.error(format_args!("unexpected answer from \"{url}\": no data.plaintext")))?;
        let key = BASE64
            .decode(response.data.plaintext.as_bytes())
            .map_err(|_| self.session.error(format_args!("\"{url}\" answered a plaintext that is not base64")))?;
        Ok(Zeroizing::new(key))
    }

    fn rewrap(&self, wrapped: &WrappedKey) -> Result<Option<WrappedKey>> {
        let (url, body) = self.post_ciphertext("rewrap", wrapped)?;
        let new = self.ciphertext_of(&wrapped.kms_key_id, &url, &body)?;
        Ok((new.kms_key_version != wrapped.kms_key_version).then_some(new))
    }

    fn check(&self) -> Result<()> {
        let o = self.session.options();
        let url = format!("{}/v1/sys/mounts/{}", o.url, encode_path(&o.mount_path));
        let (status, body) = self.session.send(self.session.client_get(&url), &url)?;
        match status {
            StatusCode::OK => {
                let v: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
                let mount = v.get("data").filter(|d| d.is_object()).unwrap_or(&v);
                match mount.get("type").and_then(Value::as_str) {
                    Some("transit") => Ok(()),
                    Some(kind) => Err(self
                        .session
                        .error(format_args!("the mount is not a Transit secrets engine (type \"{kind}\")"))),
                    None => Err(self.session.error(format_args!("unexpected answer from \"{url}\": no mount type"))),
                }
            }
            // A least-privilege token may not read sys/mounts: read a key that does not
            // exist instead; a Transit mount answers 404 with no error text.
            StatusCode::FORBIDDEN => {
                let url = self.url("keys", "pg_tde-check-probe");
                let (status, body) = self.session.send(self.session.client_get(&url), &url)?;
                match (status, server_text(&body).is_empty()) {
                    (StatusCode::OK, _) | (StatusCode::NOT_FOUND, true) => Ok(()),
                    (StatusCode::NOT_FOUND, false) => Err(self.session.error(format_args!(
                        "the mount does not exist or is not a Transit secrets engine (\"{url}\")"
                    ))),
                    _ => Err(self.session.status_error(&url, status, &server_text(&body))),
                }
            }
            StatusCode::BAD_REQUEST | StatusCode::NOT_FOUND => Err(self
                .session
                .error(format_args!("the mount does not exist (\"{url}\" answered {status}: {})", server_text(&body)))),
            _ => Err(self.session.status_error(&url, status, &server_text(&body))),
        }
    }
}

impl VaultTransitWrapper {
    /// `POST {mount}/{action}/{key}` with a wrapped key's ciphertext (`decrypt`,
    /// `rewrap`); the URL and the body of a 200 answer.
    fn post_ciphertext(&self, action: &str, wrapped: &WrappedKey) -> Result<(String, Zeroizing<Vec<u8>>)> {
        let name = &wrapped.kms_key_id;
        Self::check_name(name)?;
        let url = self.url(action, name);
        let ciphertext = std::str::from_utf8(&wrapped.blob).map_err(|_| {
            TdeError::Corrupt(format!("the envelope of Transit key \"{name}\" is not a Transit ciphertext"))
        })?;
        let (status, body) = self.post(&url, &CiphertextRequest { ciphertext })?;
        if status != StatusCode::OK {
            return Err(self.failure(action, name, &url, status, &body));
        }
        Ok((url, body))
    }

    fn ciphertext_of(&self, name: &str, url: &str, body: &[u8]) -> Result<WrappedKey> {
        let response: CiphertextResponse = serde_json::from_slice(body)
            .map_err(|_| self.session.error(format_args!("unexpected answer from \"{url}\": no data.ciphertext")))?;
        let ciphertext = response.data.ciphertext;
        let version = ciphertext_version(&ciphertext).ok_or_else(|| {
            self.session.error(format_args!("\"{url}\" answered a ciphertext without a \"vault:vN:\" prefix"))
        })?;
        Ok(WrappedKey {
            kms_key_id: name.to_string(),
            kms_key_version: Some(version.to_string()),
            blob: ciphertext.into_bytes(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_of_ciphertexts() {
        assert_eq!(ciphertext_version("vault:v1:abc"), Some(1));
        assert_eq!(ciphertext_version("vault:v12:abc:def"), Some(12));
        for bad in ["vault:v:abc", "vault:vx:abc", "v1:abc", "", "vault:v1"] {
            assert_eq!(ciphertext_version(bad), None, "{bad}");
        }
    }

    #[test]
    fn refusals_and_failures() {
        assert!(is_refusal(StatusCode::FORBIDDEN, "permission denied"));
        assert!(is_refusal(StatusCode::BAD_REQUEST, "encryption key not found"));
        assert!(is_refusal(
            StatusCode::BAD_REQUEST,
            "ciphertext or signature version is disallowed by policy (too old)"
        ));
        assert!(!is_refusal(StatusCode::BAD_REQUEST, "invalid ciphertext: unable to decrypt"));
        assert!(!is_refusal(StatusCode::SERVICE_UNAVAILABLE, "Vault is sealed"));
        assert!(!is_refusal(StatusCode::INTERNAL_SERVER_ERROR, ""));
    }
}
