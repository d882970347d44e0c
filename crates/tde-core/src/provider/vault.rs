//! The HashiCorp Vault / OpenBao KV version 2 key provider (`vault-v2`).
//!
//! Options (a flat JSON object, names as in Percona pg_tde):
//!
//! | option      | required | meaning                                                              |
//! |-------------|----------|----------------------------------------------------------------------|
//! | `url`       | yes      | `https://host:port` (or `http://`), optionally with a path prefix    |
//! | `mountPath` | yes      | path of the KV version 2 secrets engine, e.g. `secret` or `a/b`      |
//! | `tokenPath` | yes      | absolute path of a file holding the Vault token                      |
//! | `caPath`    | no       | absolute path of a PEM CA bundle; when given, only it is trusted     |
//! | `namespace` | no       | Vault / OpenBao namespace, sent as `X-Vault-Namespace`               |
//!
//! `caPath` and `namespace` may also be JSON `null` (absent). Without `caPath` the system's
//! CA store is trusted.
//!
//! A key named `name` is the KV v2 secret `{url}/v1/{mountPath}/data/{name}` whose data is
//! `{"key": "<standard base64 of the key bytes>"}`, the layout Percona pg_tde uses. New keys
//! are written with check-and-set version 0, so an existing name is never overwritten.
//!
//! Threat model for the token: it lives in the file named by `tokenPath` (never in
//! `$PGDATA`, never in the provider options), is read again each time a provider is
//! opened, and never appears in an error message or in `Debug` output: the messages
//! about the token file name only its path, every message carrying server or library
//! text goes through one function (`VaultSession::error`) that scrubs the token
//! text, and the token header is marked sensitive. Redirects are followed only
//! to the same origin (scheme, host and port), because reqwest would otherwise send the
//! custom `X-Vault-Token` header to whatever server a redirect names. Proxies from the
//! environment are ignored. Buffers holding key material or the token are zeroed after
//! use where this module owns them; copies made inside reqwest (request body, header
//! map) are not, which is best effort like the JSON text of the file keyring.

use std::error::Error as StdError;
use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};
use reqwest::blocking::{Client, RequestBuilder};
use reqwest::header::{HeaderMap, HeaderValue};
use reqwest::{redirect, Certificate, StatusCode, Url};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use zeroize::{Zeroize, Zeroizing};

use super::{validate_key_name, KeyProvider, PrincipalKey};
use crate::error::{Result, TdeError};
use crate::secret_buf::{read_secret, SecretBuf, SecretRead};

/// Time allowed to establish a connection (TCP and TLS).
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Time allowed for a whole request, connection included.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest response body read from the server.
const MAX_RESPONSE_BYTES: usize = 1 << 20;
/// Largest token file read (Vault service tokens are about 100 bytes, batch tokens a few hundred).
const MAX_TOKEN_FILE_BYTES: usize = 64 * 1024;
/// Most same-origin redirects followed for one request.
const MAX_REDIRECTS: usize = 5;
/// Longest server error text quoted in an error message.
const MAX_SERVER_TEXT: usize = 300;

const OPTION_NAMES: [&str; 5] = ["url", "mountPath", "tokenPath", "caPath", "namespace"];

/// Characters escaped in a URL path segment: everything but RFC 3986 "unreserved".
const SEGMENT: &AsciiSet = &NON_ALPHANUMERIC.remove(b'-').remove(b'_').remove(b'.').remove(b'~');

/// The validated options of a `vault-v2` provider (see the module documentation).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VaultOptions {
    /// Base URL without a trailing slash, e.g. `https://127.0.0.1:8200`.
    pub url: String,
    /// Mount path of the KV v2 engine without leading or trailing slashes.
    pub mount_path: String,
    /// File holding the token (absolute path).
    pub token_path: PathBuf,
    /// PEM CA bundle that alone is trusted, if given (absolute path).
    pub ca_path: Option<PathBuf>,
    /// Namespace, without leading or trailing slashes, if given.
    pub namespace: Option<String>,
}

fn invalid(msg: impl Into<String>) -> TdeError {
    TdeError::Invalid(msg.into())
}

/// The string value of option `name`; `Ok(None)` if it is absent or (when `nullable`) null.
fn string_option<'a>(obj: &'a serde_json::Map<String, Value>, name: &str, nullable: bool) -> Result<Option<&'a str>> {
    match obj.get(name) {
        None => Ok(None),
        Some(Value::Null) if nullable => Ok(None),
        Some(Value::String(s)) if s.contains('\0') => {
            Err(invalid(format!("option \"{name}\" must not contain NUL characters")))
        }
        Some(Value::String(s)) => Ok(Some(s)),
        Some(_) => Err(invalid(format!("option \"{name}\" of a vault-v2 key provider must be a string"))),
    }
}

fn required_option<'a>(obj: &'a serde_json::Map<String, Value>, name: &str) -> Result<&'a str> {
    string_option(obj, name, false)?
        .ok_or_else(|| invalid(format!("vault-v2 key provider needs the option \"{name}\"")))
}

fn parse_url(s: &str) -> Result<String> {
    // The URL is not quoted back: it might hold credentials.
    let url = Url::parse(s).map_err(|e| invalid(format!("option \"url\" is not a valid URL ({e})")))?;
    if !matches!(url.scheme(), "https" | "http") {
        return Err(invalid("option \"url\" must start with https:// or http://"));
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err(invalid("option \"url\" must name a host"));
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(invalid("option \"url\" must not contain credentials (the token is read from \"tokenPath\")"));
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err(invalid("option \"url\" must not have a query or a fragment"));
    }
    Ok(url.as_str().trim_end_matches('/').to_string())
}

/// Check a Vault path made of `/`-separated segments: none may be empty, `.` or `..`
/// (Vault would collapse them, so two different names would reach one secret).
pub(crate) fn check_segments(path: &str) -> bool {
    !path.is_empty() && path.split('/').all(|seg| !seg.is_empty() && seg != "." && seg != "..")
}

fn parse_vault_path(option: &str, s: &str) -> Result<String> {
    let trimmed = s.trim_matches('/');
    if !check_segments(trimmed) {
        return Err(invalid(format!(
            "option \"{option}\" must be a non-empty path without empty, \".\" or \"..\" segments, got \"{s}\""
        )));
    }
    if trimmed.chars().any(char::is_control) {
        return Err(invalid(format!("option \"{option}\" must not contain control characters")));
    }
    Ok(trimmed.to_string())
}

fn parse_absolute_path(option: &str, s: &str) -> Result<PathBuf> {
    let path = PathBuf::from(s);
    if !path.is_absolute() {
        return Err(invalid(format!("option \"{option}\" must be an absolute path, got \"{s}\"")));
    }
    if path.file_name().is_none() {
        return Err(invalid(format!("option \"{option}\" must name a file, got \"{s}\"")));
    }
    Ok(path)
}

/// Validate the options of a `vault-v2` provider.
///
/// `options` must be a flat JSON object with the string options `url`, `mountPath`,
/// `tokenPath` and optionally `caPath` and `namespace` (which may also be `null`).
/// Unknown keys, missing required keys and values of the wrong type are rejected with
/// [`TdeError::Invalid`] naming the option. Nothing is read or contacted.
pub fn parse_vault_options(options: &Value) -> Result<VaultOptions> {
    let obj = options.as_object().ok_or_else(|| invalid("vault-v2 key provider options must be a JSON object"))?;
    if let Some(unknown) = obj.keys().find(|k| !OPTION_NAMES.contains(&k.as_str())) {
        return Err(invalid(format!(
            "unknown option \"{unknown}\" for a vault-v2 key provider (allowed: {})",
            OPTION_NAMES.join(", ")
        )));
    }
    let url = parse_url(required_option(obj, "url")?)?;
    let mount_path = parse_vault_path("mountPath", required_option(obj, "mountPath")?)?;
    let token_path = parse_absolute_path("tokenPath", required_option(obj, "tokenPath")?)?;
    let ca_path = string_option(obj, "caPath", true)?.map(|s| parse_absolute_path("caPath", s)).transpose()?;
    let namespace = match string_option(obj, "namespace", true)? {
        None => None,
        Some(s) => {
            let ns = parse_vault_path("namespace", s)?;
            // It is sent as a header value (where reqwest would also let Latin-1 bytes through).
            if !ns.bytes().all(|b| b == b' ' || b.is_ascii_graphic()) {
                return Err(invalid("option \"namespace\" must be printable ASCII"));
            }
            Some(ns)
        }
    };
    Ok(VaultOptions { url, mount_path, token_path, ca_path, namespace })
}

/// Percent-encode each `/`-separated segment of a path.
pub(crate) fn encode_path(path: &str) -> String {
    path.split('/').map(|seg| utf8_percent_encode(seg, SEGMENT).to_string()).collect::<Vec<_>>().join("/")
}

/// Replace every occurrence of `secret` in `msg`.
fn scrub(msg: &str, secret: &str) -> String {
    if secret.is_empty() {
        msg.to_string()
    } else {
        msg.replace(secret, "<redacted>")
    }
}

/// Describe a failed HTTP exchange: the cause found by walking the error's source chain
/// (DNS failure, connection refused, TLS/certificate failure, timeout, ...) followed by
/// the chain's messages. Holds no header value, so never the token.
fn describe_reqwest_error(err: &reqwest::Error) -> String {
    describe_error_chain(err)
}

/// `e` followed by the errors nested in it through `io::Error::new` (tokio-rustls wraps a
/// `rustls::Error` in an `io::Error`, itself wrapped again), which `source()` skips.
fn wrapped_errors<'a>(e: &'a (dyn StdError + 'static)) -> Vec<&'a (dyn StdError + 'static)> {
    let mut layers = vec![e];
    while let Some(inner) = layers.last().and_then(|l| l.downcast_ref::<io::Error>()).and_then(io::Error::get_ref) {
        layers.push(inner);
    }
    layers
}

fn describe_error_chain(err: &(dyn StdError + 'static)) -> String {
    let mut cause: Option<String> = None;
    let mut messages: Vec<String> = Vec::new();
    let mut timeout = false;
    let mut current = Some(err);
    while let Some(e) = current {
        let mut text = e.to_string();
        if let Some(r) = e.downcast_ref::<reqwest::Error>() {
            timeout |= r.is_timeout();
            // Callers name the URL once; reqwest would repeat it at each level.
            if let Some(url) = r.url() {
                text = text.replace(&format!(" for url ({url})"), "");
            }
        }
        let layers = wrapped_errors(e);
        let tls = layers.iter().find_map(|l| l.downcast_ref::<rustls::Error>());
        let io_kind = layers
            .iter()
            .filter_map(|l| l.downcast_ref::<io::Error>().map(io::Error::kind))
            .find(|k| *k != io::ErrorKind::Other);
        if let Some(tls) = tls {
            cause = Some(match tls {
                rustls::Error::InvalidCertificate(c) => format!(
                    "TLS certificate verification failed ({c:?}): the server's certificate is not signed by a \
                     trusted CA (option \"caPath\") or does not match the host"
                ),
                other => format!("TLS handshake failed ({other})"),
            });
        } else if cause.is_none() {
            timeout |= io_kind == Some(io::ErrorKind::TimedOut);
            cause = match io_kind {
                Some(io::ErrorKind::ConnectionRefused) => Some("connection refused".into()),
                Some(io::ErrorKind::ConnectionReset | io::ErrorKind::ConnectionAborted) => {
                    Some("connection reset by the server".into())
                }
                _ if text.starts_with("dns error") || text.contains("failed to lookup address") => {
                    Some("could not resolve the host name (DNS failure)".into())
                }
                _ => None,
            };
        }
        if !messages.last().is_some_and(|last| last.contains(&text)) {
            messages.push(text);
        }
        current = e.source();
    }
    if timeout && cause.is_none() {
        cause = Some(format!(
            "timed out (connect timeout {} s, request timeout {} s)",
            CONNECT_TIMEOUT.as_secs(),
            REQUEST_TIMEOUT.as_secs()
        ));
    }
    let chain = messages.join(": ");
    match cause {
        Some(c) => format!("{c} ({chain})"),
        None => chain,
    }
}

/// The `errors` of a Vault error body, or a printable prefix of a non-JSON body.
pub(crate) fn server_text(body: &[u8]) -> String {
    server_text_of(body, true)
}

/// The `errors` of a Vault error body only: for the answers to key reads, whose body,
/// whatever the status, may hold the key.
pub(crate) fn server_errors_text(body: &[u8]) -> String {
    server_text_of(body, false)
}

fn server_text_of(body: &[u8], quote_non_json: bool) -> String {
    let text = match serde_json::from_slice::<Value>(body) {
        Ok(v) => match v.get("errors").and_then(Value::as_array) {
            Some(errors) => errors
                .iter()
                .map(|e| e.as_str().map_or_else(|| e.to_string(), str::to_string))
                .collect::<Vec<_>>()
                .join("; "),
            None => String::new(),
        },
        Err(_) if quote_non_json => String::from_utf8_lossy(body).chars().filter(|c| !c.is_control()).collect(),
        Err(_) => String::new(),
    };
    match text.char_indices().nth(MAX_SERVER_TEXT) {
        Some((cut, _)) => format!("{}...", &text[..cut]),
        None => text,
    }
}

/// Follow redirects only to the origin of the request (the token header goes along).
fn same_origin_redirects() -> redirect::Policy {
    redirect::Policy::custom(|attempt| {
        let same_origin = attempt.previous().first().is_some_and(|first| first.origin() == attempt.url().origin());
        if attempt.previous().len() > MAX_REDIRECTS {
            attempt.error("too many redirects")
        } else if same_origin {
            attempt.follow()
        } else {
            let msg = format!(
                "refusing to follow a redirect to another server ({})",
                attempt.url().origin().ascii_serialization()
            );
            attempt.error(msg)
        }
    })
}

/// Read the token file: one line of printable ASCII, surrounding whitespace ignored.
fn read_token(path: &Path) -> Result<Zeroizing<String>> {
    let bad = |why: &str| TdeError::Provider(format!("Vault token file \"{}\" {why}", path.display()));
    let bytes = match crate::secret_buf::read_secret_file(path, MAX_TOKEN_FILE_BYTES) {
        Ok(SecretRead::Complete(bytes)) => bytes,
        Ok(SecretRead::TooLarge) => return Err(bad(&format!("is larger than {MAX_TOKEN_FILE_BYTES} bytes"))),
        Err(e) => {
            return Err(TdeError::Provider(format!(
                "could not read the Vault token file \"{}\" (option tokenPath): {e}",
                path.display()
            )))
        }
    };
    let text = std::str::from_utf8(&bytes).map_err(|_| bad("is not text"))?.trim();
    if text.is_empty() {
        return Err(bad("is empty"));
    }
    if !text.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(bad("must hold one token of printable ASCII characters"));
    }
    Ok(Zeroizing::new(text.to_string()))
}

/// A KV v2 read response; only the fields this provider uses.
#[derive(Deserialize)]
struct ReadResponse {
    data: Option<ReadData>,
}

#[derive(Deserialize)]
struct ReadData {
    data: Option<SecretData>,
}

#[derive(Deserialize)]
struct SecretData {
    key: Option<String>,
}

impl Drop for SecretData {
    fn drop(&mut self) {
        self.key.zeroize();
    }
}

#[derive(Serialize)]
struct WriteRequest<'a> {
    options: WriteOptions,
    data: WriteData<'a>,
}

#[derive(Serialize)]
struct WriteOptions {
    cas: u32,
}

#[derive(Serialize)]
struct WriteData<'a> {
    key: &'a str,
}

/// An authenticated HTTP session with a Vault or OpenBao server: the TLS settings, the
/// token and the error reporting shared by the KV v2 and Transit providers.
pub(crate) struct VaultSession {
    opts: VaultOptions,
    client: Client,
    /// Kept only to scrub it from error messages; the client holds its own copy.
    token: Zeroizing<String>,
}

impl fmt::Debug for VaultSession {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VaultSession")
            .field("url", &self.opts.url)
            .field("mount_path", &self.opts.mount_path)
            .field("namespace", &self.opts.namespace)
            .field("token_path", &self.opts.token_path)
            .field("ca_path", &self.opts.ca_path)
            .finish_non_exhaustive()
    }
}

impl VaultSession {
    /// Open a provider: read the token from `tokenPath` and the CA bundle from `caPath`,
    /// and set up the HTTP client. The server is not contacted (see [`KeyProvider::check`]).
    pub(crate) fn new(opts: VaultOptions) -> Result<Self> {
        let token = read_token(&opts.token_path)?;
        let mut headers = HeaderMap::new();
        let mut token_header = HeaderValue::from_str(&token).map_err(|_| {
            TdeError::Provider(format!("Vault token file \"{}\" holds no valid token", opts.token_path.display()))
        })?;
        token_header.set_sensitive(true);
        headers.insert("X-Vault-Token", token_header);
        if let Some(ns) = &opts.namespace {
            let value =
                HeaderValue::from_str(ns).map_err(|_| invalid("option \"namespace\" must be printable ASCII"))?;
            headers.insert("X-Vault-Namespace", value);
        }
        let mut builder = Client::builder()
            .no_proxy()
            .connect_timeout(CONNECT_TIMEOUT)
            .timeout(REQUEST_TIMEOUT)
            .redirect(same_origin_redirects())
            .user_agent(concat!("pg_tde/", env!("CARGO_PKG_VERSION")))
            .default_headers(headers);
        if let Some(ca) = &opts.ca_path {
            let pem = std::fs::read(ca).map_err(|e| {
                TdeError::Provider(format!("could not read the CA file \"{}\" (option caPath): {e}", ca.display()))
            })?;
            let certs = Certificate::from_pem_bundle(&pem).map_err(|e| {
                TdeError::Provider(format!(
                    "CA file \"{}\" (option caPath) is not a PEM bundle: {}",
                    ca.display(),
                    describe_reqwest_error(&e)
                ))
            })?;
            if certs.is_empty() {
                return Err(TdeError::Provider(format!(
                    "CA file \"{}\" (option caPath) holds no PEM certificate",
                    ca.display()
                )));
            }
            builder = builder.tls_built_in_root_certs(false);
            for cert in certs {
                builder = builder.add_root_certificate(cert);
            }
        }
        let client = builder.build().map_err(|e| {
            TdeError::Provider(scrub(
                &format!(
                    "could not set up the HTTP client for Vault server \"{}\": {}",
                    opts.url,
                    describe_reqwest_error(&e)
                ),
                &token,
            ))
        })?;
        Ok(VaultSession { opts, client, token })
    }

    /// The options this provider was opened with.
    pub(crate) fn options(&self) -> &VaultOptions {
        &self.opts
    }

    /// A GET request with the session's token and namespace.
    pub(crate) fn client_get(&self, url: &str) -> RequestBuilder {
        self.client.get(url)
    }

    /// A POST request with the session's token and namespace.
    pub(crate) fn client_post(&self, url: &str) -> RequestBuilder {
        self.client.post(url)
    }

    /// A provider error naming the server, mount and namespace, with the token scrubbed.
    pub(crate) fn error(&self, msg: impl fmt::Display) -> TdeError {
        let ns = self.opts.namespace.as_ref().map(|n| format!(", namespace \"{n}\"")).unwrap_or_default();
        let text = format!("Vault server \"{}\", mount \"{}\"{ns}: {msg}", self.opts.url, self.opts.mount_path);
        TdeError::Provider(scrub(&text, &self.token))
    }

    fn data_url(&self, name: &str) -> String {
        format!("{}/v1/{}/data/{}", self.opts.url, encode_path(&self.opts.mount_path), encode_path(name))
    }

    /// Send a request and read its status and (bounded) body.
    pub(crate) fn send(&self, request: RequestBuilder, url: &str) -> Result<(StatusCode, Zeroizing<Vec<u8>>)> {
        let response = request
            .send()
            .map_err(|e| self.error(format_args!("request to \"{url}\" failed: {}", describe_reqwest_error(&e))))?;
        let status = response.status();
        // Read into a buffer that is wiped whenever it grows: the body may hold a key.
        let hint = response.content_length().unwrap_or(4096).min(MAX_RESPONSE_BYTES as u64) as usize;
        let mut response = response;
        match read_secret(&mut response, hint, MAX_RESPONSE_BYTES) {
            Ok(SecretRead::Complete(body)) => Ok((status, body.into_inner())),
            Ok(SecretRead::TooLarge) => {
                Err(self.error(format_args!("the response from \"{url}\" is larger than {MAX_RESPONSE_BYTES} bytes")))
            }
            Err(e) => {
                Err(self
                    .error(format_args!("reading the response from \"{url}\" failed: {}", describe_error_chain(&e))))
            }
        }
    }

    /// The error for an unexpected HTTP status.
    /// `server`: what the server said ([`server_text`] or [`server_errors_text`] of the body).
    pub(crate) fn status_error(&self, url: &str, status: StatusCode, server: &str) -> TdeError {
        let hint = match status {
            StatusCode::FORBIDDEN => {
                ": permission denied (the token is invalid or expired, or its policy does not allow this path)"
            }
            StatusCode::UNAUTHORIZED => ": not authorized (check the token)",
            StatusCode::NOT_FOUND => ": not found (does the mount exist?)",
            StatusCode::SERVICE_UNAVAILABLE => ": the server is sealed or unavailable",
            StatusCode::TOO_MANY_REQUESTS => ": rate limited by the server",
            _ => "",
        };
        let server = if server.is_empty() { String::new() } else { format!("; the server said: {server}") };
        self.error(format_args!("HTTP {status} from \"{url}\"{hint}{server}"))
    }

    /// `check()` through `{mount}/config`, for tokens that may not read `sys/mounts`.
    fn check_via_config(&self) -> Result<()> {
        let url = format!("{}/v1/{}/config", self.opts.url, encode_path(&self.opts.mount_path));
        let (status, body) = self.send(self.client.get(&url), &url)?;
        match status {
            StatusCode::OK => {
                let v: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
                if v.pointer("/data/max_versions").is_some() {
                    Ok(())
                } else {
                    Err(self.error("not a KV version 2 secrets engine (its config has no \"max_versions\")"))
                }
            }
            StatusCode::NOT_FOUND | StatusCode::METHOD_NOT_ALLOWED => Err(self.error(format_args!(
                "the mount does not exist or is not a KV version 2 secrets engine (\"{url}\" answered {status})"
            ))),
            _ => Err(self.status_error(&url, status, &server_text(&body))),
        }
    }
}

/// Why a KV v2 read gave no key.
enum ReadError {
    /// An HTTP status that means an error (reported with [`VaultSession::status_error`]).
    Status,
    /// A response that is not what a KV v2 secret of pg_tde looks like.
    Message(String),
}

/// The key in the answer (`status`, `body`) to a KV v2 read of secret `name` at `url`:
/// `None` for a missing secret. Messages never quote the body (it may hold the key).
fn interpret_read(
    name: &str,
    url: &str,
    status: StatusCode,
    body: &[u8],
) -> std::result::Result<Option<Zeroizing<Vec<u8>>>, ReadError> {
    match status {
        StatusCode::OK => {}
        StatusCode::NOT_FOUND => {
            // A missing (or deleted) secret: `{"errors": []}` or metadata without data.
            // A missing mount: `{"errors": ["no handler for route ..."]}`.
            let v: Option<Value> = serde_json::from_slice(body).ok();
            let errors = v.as_ref().and_then(|v| v.get("errors")).and_then(Value::as_array);
            return match (&v, errors) {
                (Some(Value::Object(_)), None) => Ok(None),
                (Some(_), Some(e)) if e.is_empty() => Ok(None),
                _ => Err(ReadError::Status),
            };
        }
        _ => return Err(ReadError::Status),
    }
    let response: ReadResponse = serde_json::from_slice(body).map_err(|e| {
        // serde's message may quote values (key material): give only the position.
        ReadError::Message(format!(
            "unexpected response reading key \"{name}\" from \"{url}\": not a KV version 2 secret \
             (JSON error at line {}, column {})",
            e.line(),
            e.column()
        ))
    })?;
    let secret = response.data.and_then(|d| d.data);
    let Some(encoded) = secret.as_ref().and_then(|s| s.key.as_deref()) else {
        return Err(ReadError::Message(format!(
            "secret \"{name}\" at \"{url}\" has no string field \"key\" (not a pg_tde principal key)"
        )));
    };
    let key = Zeroizing::new(
        BASE64
            .decode(encoded)
            .map_err(|_| ReadError::Message(format!("field \"key\" of secret \"{name}\" is not valid base64")))?,
    );
    if key.is_empty() {
        return Err(ReadError::Message(format!("field \"key\" of secret \"{name}\" is empty")));
    }
    Ok(Some(key))
}

/// Check a key name for this provider: the common rules plus Vault path rules.
fn validate_vault_key_name(name: &str) -> Result<()> {
    validate_key_name(name)?;
    if !check_segments(name) {
        return Err(invalid(format!(
            "key name \"{name}\" cannot be stored in Vault: empty, \".\" or \"..\" path segments are not allowed"
        )));
    }
    Ok(())
}

impl VaultSession {
    fn kv_get_key(&self, name: &str) -> Result<Option<PrincipalKey>> {
        validate_vault_key_name(name)?;
        let url = self.data_url(name);
        let (status, body) = self.send(self.client.get(&url), &url)?;
        match interpret_read(name, &url, status, &body) {
            Ok(key) => Ok(key.map(|key| PrincipalKey { name: name.to_string(), key, envelope: None })),
            Err(ReadError::Status) => Err(self.status_error(&url, status, &server_errors_text(&body))),
            Err(ReadError::Message(m)) => Err(self.error(m)),
        }
    }

    fn kv_create_key(&self, name: &str, len: usize) -> Result<PrincipalKey> {
        validate_vault_key_name(name)?;
        if len != 16 && len != 32 {
            return Err(invalid(format!("principal keys are 16 or 32 bytes, not {len}")));
        }
        let mut key = Zeroizing::new(vec![0u8; len]);
        crate::rng::fill(&mut key)?;
        let encoded = Zeroizing::new(BASE64.encode(&*key));
        let request = WriteRequest { options: WriteOptions { cas: 0 }, data: WriteData { key: &encoded } };
        // Serialized into a buffer that is wiped as it grows; the HTTP and TLS
        // libraries' own copies of the request are beyond our reach.
        let mut json = SecretBuf::with_capacity(64 + encoded.len());
        serde_json::to_writer(&mut json, &request)
            .map_err(|e| self.error(format_args!("could not encode the request: {e}")))?;
        let url = self.data_url(name);
        let post = self.client.post(&url).header(reqwest::header::CONTENT_TYPE, "application/json");
        let (status, body) = self.send(post.body(json.to_vec()), &url)?;
        match status {
            StatusCode::OK | StatusCode::NO_CONTENT => Ok(PrincipalKey { name: name.to_string(), key, envelope: None }),
            StatusCode::BAD_REQUEST if server_text(&body).contains("check-and-set") => {
                Err(invalid(format!("key \"{name}\" already exists in the provider")))
            }
            _ => Err(self.status_error(&url, status, &server_text(&body))),
        }
    }

    fn kv_check(&self) -> Result<()> {
        let url = format!("{}/v1/sys/mounts/{}", self.opts.url, encode_path(&self.opts.mount_path));
        let (status, body) = self.send(self.client.get(&url), &url)?;
        // Vault answers 400 "No secret engine mount at ..."; other servers may say 404.
        let server = server_text(&body);
        if status == StatusCode::NOT_FOUND
            || (status == StatusCode::BAD_REQUEST && server.to_ascii_lowercase().contains("secret engine mount"))
        {
            return Err(self.error(format_args!("the mount does not exist (\"{url}\" answered {status}: {server})")));
        }
        match status {
            StatusCode::OK => {}
            StatusCode::FORBIDDEN => return self.check_via_config(),
            _ => return Err(self.status_error(&url, status, &server_text(&body))),
        }
        let v: Value = serde_json::from_slice(&body)
            .map_err(|e| self.error(format_args!("unexpected response from \"{url}\": not JSON ({e})")))?;
        // Vault answers with the mount both at the top level and under "data".
        let mount = v.get("data").filter(|d| d.is_object()).unwrap_or(&v);
        let kind = mount.get("type").and_then(Value::as_str);
        let version = mount.pointer("/options/version").and_then(Value::as_str);
        match (kind, version) {
            (Some("kv"), Some("2")) => Ok(()),
            (Some("kv"), version) => Err(self.error(format_args!(
                "the mount is not a KV version 2 secrets engine (it is KV version {})",
                version.map_or_else(|| "1".to_string(), |v| format!("\"{v}\""))
            ))),
            (Some(kind), _) => {
                Err(self.error(format_args!("the mount is not a KV version 2 secrets engine (type \"{kind}\")")))
            }
            (None, _) => Err(self.error(format_args!(
                "unexpected response from \"{url}\": no mount \"type\" (is this a Vault or OpenBao server?)"
            ))),
        }
    }
}

/// A KV version 2 secrets engine of HashiCorp Vault or OpenBao holding principal keys.
#[derive(Debug)]
pub struct VaultV2Provider {
    session: VaultSession,
}

impl VaultV2Provider {
    /// Open a provider: read the token from `tokenPath` and the CA bundle from `caPath`,
    /// and set up the HTTP client. The server is not contacted (see [`KeyProvider::check`]).
    pub fn new(opts: VaultOptions) -> Result<Self> {
        Ok(VaultV2Provider { session: VaultSession::new(opts)? })
    }

    /// The options this provider was opened with.
    pub fn options(&self) -> &VaultOptions {
        self.session.options()
    }
}

impl KeyProvider for VaultV2Provider {
    fn get_key(&self, name: &str) -> Result<Option<PrincipalKey>> {
        self.session.kv_get_key(name)
    }

    fn create_key(&self, name: &str, len: usize) -> Result<PrincipalKey> {
        self.session.kv_create_key(name, len)
    }

    fn check(&self) -> Result<()> {
        self.session.kv_check()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::io::{BufRead, BufReader, Read, Write};
    use std::net::{TcpListener, TcpStream};
    use std::thread::JoinHandle;

    fn opts_json() -> Value {
        json!({"url": "https://127.0.0.1:8200", "mountPath": "secret", "tokenPath": "/etc/pg_tde/token"})
    }

    fn with(key: &str, value: Value) -> Value {
        let mut v = opts_json();
        v[key] = value;
        v
    }

    fn invalid_msg(v: Value) -> String {
        match parse_vault_options(&v) {
            Err(TdeError::Invalid(m)) => m,
            other => panic!("expected Invalid for {v}, got {other:?}"),
        }
    }

    #[test]
    fn options_are_parsed_and_normalized() {
        let o = parse_vault_options(&opts_json()).unwrap();
        assert_eq!(
            o,
            VaultOptions {
                url: "https://127.0.0.1:8200".into(),
                mount_path: "secret".into(),
                token_path: "/etc/pg_tde/token".into(),
                ca_path: None,
                namespace: None,
            }
        );
        let o = parse_vault_options(&json!({
            "url": "http://vault.example:8200/prefix/", "mountPath": "/team/kv/",
            "tokenPath": "/t", "caPath": "/etc/ca.pem", "namespace": "/ns1/child/"
        }))
        .unwrap();
        assert_eq!(o.url, "http://vault.example:8200/prefix");
        assert_eq!(o.mount_path, "team/kv");
        assert_eq!(o.ca_path.as_deref(), Some(Path::new("/etc/ca.pem")));
        assert_eq!(o.namespace.as_deref(), Some("ns1/child"));
        // optional options may be null
        let o = parse_vault_options(&with("caPath", Value::Null)).unwrap();
        assert!(o.ca_path.is_none());
        assert!(parse_vault_options(&with("namespace", Value::Null)).unwrap().namespace.is_none());
    }

    #[test]
    fn option_errors_name_the_option() {
        assert!(invalid_msg(json!(["x"])).contains("object"));
        assert!(invalid_msg(json!("https://x")).contains("object"));
        assert!(invalid_msg(with("token", json!("s.abc"))).contains("\"token\""));
        for name in ["url", "mountPath", "tokenPath"] {
            let mut v = opts_json();
            v.as_object_mut().unwrap().remove(name);
            assert!(invalid_msg(v).contains(&format!("\"{name}\"")), "{name}");
            assert!(invalid_msg(with(name, Value::Null)).contains(&format!("\"{name}\"")), "{name}");
        }
        for name in OPTION_NAMES {
            for bad in [json!(5), json!(true), json!({"type": "file", "path": "/x"}), json!(["/x"])] {
                let m = invalid_msg(with(name, bad));
                assert!(m.contains(&format!("\"{name}\"")) && m.contains("string"), "{m}");
            }
            assert!(invalid_msg(with(name, json!("/a\0b"))).contains("NUL"));
        }
        assert!(invalid_msg(with("url", json!("ftp://127.0.0.1/"))).contains("https://"));
        assert!(invalid_msg(with("url", json!("127.0.0.1:8200"))).contains("\"url\""));
        assert!(invalid_msg(with("url", json!("not a url"))).contains("\"url\""));
        let m = invalid_msg(with("url", json!("https://user:hunter2@127.0.0.1:8200")));
        assert!(m.contains("credentials") && !m.contains("hunter2"), "{m}");
        assert!(invalid_msg(with("url", json!("https://127.0.0.1:8200/?x=1"))).contains("query"));
        assert!(invalid_msg(with("url", json!("https://127.0.0.1:8200/#f"))).contains("fragment"));
        for bad in ["", "/", "a//b", "./a", "a/..", "a/\u{7}"] {
            assert!(invalid_msg(with("mountPath", json!(bad))).contains("\"mountPath\""), "{bad:?}");
            assert!(invalid_msg(with("namespace", json!(bad))).contains("\"namespace\""), "{bad:?}");
        }
        assert!(invalid_msg(with("namespace", json!("espace-é"))).contains("ASCII"));
        for name in ["tokenPath", "caPath"] {
            assert!(invalid_msg(with(name, json!("relative/token"))).contains("absolute"), "{name}");
            assert!(invalid_msg(with(name, json!(""))).contains(&format!("\"{name}\"")), "{name}");
            assert!(invalid_msg(with(name, json!("/"))).contains("file"), "{name}");
        }
    }

    #[test]
    fn paths_and_key_names() {
        assert_eq!(encode_path("team/k v?#%/é"), "team/k%20v%3F%23%25/%C3%A9");
        assert_eq!(encode_path("a-b_c.d~e"), "a-b_c.d~e");
        validate_vault_key_name("db-key/2024.1").unwrap();
        for bad in ["", ".", "..", "a/../b", "/a", "a/", "a//b"] {
            assert!(matches!(validate_vault_key_name(bad), Err(TdeError::Invalid(_))), "{bad:?}");
        }
    }

    #[test]
    fn scrub_and_server_text() {
        assert_eq!(scrub("a tok b tok", "tok"), "a <redacted> b <redacted>");
        assert_eq!(scrub("abc", ""), "abc");
        assert_eq!(server_text(br#"{"errors":["permission denied","x"]}"#), "permission denied; x");
        assert_eq!(server_text(br#"{"errors":[]}"#), "");
        assert_eq!(server_text(b"<html>\nbad gateway</html>"), "<html>bad gateway</html>");
        let long = server_text(&vec![b'x'; 5000]);
        assert_eq!(long.len(), MAX_SERVER_TEXT + 3);
    }

    struct TokenFile {
        _dir: tempfile::TempDir,
        path: PathBuf,
    }

    fn token_file(contents: &[u8]) -> TokenFile {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        std::fs::write(&path, contents).unwrap();
        TokenFile { _dir: dir, path }
    }

    fn provider(url: &str, token: &TokenFile, namespace: Option<&str>) -> VaultV2Provider {
        let mut v = json!({"url": url, "mountPath": "kv", "tokenPath": token.path.to_str().unwrap()});
        if let Some(ns) = namespace {
            v["namespace"] = json!(ns);
        }
        VaultV2Provider::new(parse_vault_options(&v).unwrap()).unwrap()
    }

    fn closed_port() -> u16 {
        TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
    }

    #[test]
    fn token_file_problems() {
        let opts = |p: &Path| {
            parse_vault_options(&json!({"url": "https://127.0.0.1:1", "mountPath": "kv",
                                        "tokenPath": p.to_str().unwrap()}))
            .unwrap()
        };
        let err = |t: &TokenFile| match VaultV2Provider::new(opts(&t.path)) {
            Err(TdeError::Provider(m)) => m,
            other => panic!("expected Provider, got {other:?}"),
        };
        let missing = token_file(b"");
        let path = missing.path.with_file_name("absent");
        match VaultV2Provider::new(opts(&path)) {
            Err(TdeError::Provider(m)) => assert!(m.contains("absent") && m.contains("tokenPath"), "{m}"),
            other => panic!("expected Provider, got {other:?}"),
        }
        assert!(err(&missing).contains("empty"));
        assert!(err(&token_file(b"  \n")).contains("empty"));
        let m = err(&token_file(b"s.secret part\n"));
        assert!(m.contains("printable") && !m.contains("secret part"), "{m}");
        assert!(err(&token_file(&[0xff, 0xfe])).contains("not text"));
        // surrounding whitespace is ignored
        let t = token_file(b"  s.abc\n");
        assert_eq!(*read_token(&t.path).unwrap(), "s.abc");
    }

    #[test]
    fn ca_file_problems() {
        let t = token_file(b"tok");
        let dir = tempfile::tempdir().unwrap();
        let not_pem = dir.path().join("ca.pem");
        std::fs::write(&not_pem, b"hello").unwrap();
        for (ca, expect) in [(not_pem, "no PEM certificate"), (dir.path().join("absent.pem"), "could not read")] {
            let o = parse_vault_options(&json!({"url": "https://127.0.0.1:1", "mountPath": "kv",
                "tokenPath": t.path.to_str().unwrap(), "caPath": ca.to_str().unwrap()}))
            .unwrap();
            match VaultV2Provider::new(o) {
                Err(TdeError::Provider(m)) => assert!(m.contains(expect) && m.contains("caPath"), "{m}"),
                other => panic!("expected Provider, got {other:?}"),
            }
        }
    }

    #[test]
    fn the_token_never_appears_in_errors_or_debug() {
        const TOKEN: &str = "s.CANARY-token-7f3e9a1c";
        let t = token_file(format!("{TOKEN}\n").as_bytes());
        let p = provider(&format!("https://127.0.0.1:{}", closed_port()), &t, Some("ns1"));
        let mut errors = vec![
            p.get_key("k").unwrap_err().to_string(),
            p.create_key("k", 16).unwrap_err().to_string(),
            p.check().unwrap_err().to_string(),
        ];
        for e in &errors {
            assert!(e.contains("connection refused") && e.contains("127.0.0.1") && e.contains("\"kv\""), "{e}");
        }
        errors.push(format!("{p:?}"));
        for e in &errors {
            assert!(!e.contains(TOKEN) && !e.contains("CANARY"), "{e}");
        }
        // a server that echoes the token back cannot get it into a message either
        let (url, server) = fake_server(vec![(403, format!(r#"{{"errors":["bad token {TOKEN}"]}}"#))]);
        let p = provider(&url, &t, None);
        let e = p.get_key("k").unwrap_err().to_string();
        assert!(e.contains("403") && e.contains("permission denied") && !e.contains(TOKEN), "{e}");
        let requests = server.join().unwrap();
        assert!(requests[0].to_ascii_lowercase().contains(&format!("x-vault-token: {}", TOKEN.to_ascii_lowercase())));
    }

    /// A one-shot HTTP server on 127.0.0.1 answering each connection with the next
    /// `(status, body)`; the thread returns the requests it read.
    fn fake_server(responses: Vec<(u16, String)>) -> (String, JoinHandle<Vec<String>>) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let handle = std::thread::spawn(move || {
            let mut requests = Vec::new();
            for (status, body) in responses {
                let (stream, _) = listener.accept().unwrap();
                requests.push(answer(stream, status, &body));
            }
            requests
        });
        (url, handle)
    }

    fn answer(stream: TcpStream, status: u16, body: &str) -> String {
        let mut reader = BufReader::new(stream.try_clone().unwrap());
        let mut request = String::new();
        let mut content_length = 0;
        loop {
            let mut line = String::new();
            reader.read_line(&mut line).unwrap();
            if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                content_length = v.trim().parse().unwrap();
            }
            request.push_str(&line);
            if line == "\r\n" || line.is_empty() {
                break;
            }
        }
        let mut req_body = vec![0; content_length];
        reader.read_exact(&mut req_body).unwrap();
        request.push_str(&String::from_utf8_lossy(&req_body));
        let (extra, body) = match body.strip_prefix("Location: ") {
            Some(loc) => (format!("Location: {loc}\r\n"), ""),
            None => (String::new(), body),
        };
        let mut stream = stream;
        write!(
            stream,
            "HTTP/1.1 {status} X\r\nContent-Type: application/json\r\n{extra}Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
        .unwrap();
        request
    }

    #[test]
    fn requests_encode_names_and_send_headers() {
        let t = token_file(b"tok-123");
        let (url, server) = fake_server(vec![
            (404, r#"{"errors":[]}"#.into()),
            (200, r#"{"data":{"created_time":"x","version":1}}"#.into()),
            (400, r#"{"errors":["check-and-set parameter did not match the current version"]}"#.into()),
            (404, r#"{"errors":["no handler for route \"kv/data/k\". route entry not found."]}"#.into()),
        ]);
        let p = provider(&url, &t, Some("team/ns"));
        assert!(p.get_key("dir/k ey").unwrap().is_none());
        let k = p.create_key("k", 32).unwrap();
        assert_eq!(k.key.len(), 32);
        match p.create_key("k", 32) {
            Err(TdeError::Invalid(m)) => assert_eq!(m, "key \"k\" already exists in the provider"),
            other => panic!("expected Invalid, got {other:?}"),
        }
        match p.get_key("k") {
            Err(TdeError::Provider(m)) => assert!(m.contains("404") && m.contains("no handler"), "{m}"),
            other => panic!("expected Provider, got {other:?}"),
        }
        let requests = server.join().unwrap();
        let lower: Vec<String> = requests.iter().map(|r| r.to_ascii_lowercase()).collect();
        assert!(requests[0].starts_with("GET /v1/kv/data/dir/k%20ey HTTP/1.1\r\n"), "{}", requests[0]);
        assert!(lower[0].contains("x-vault-token: tok-123\r\n") && lower[0].contains("x-vault-namespace: team/ns\r\n"));
        assert!(requests[1].starts_with("POST /v1/kv/data/k HTTP/1.1\r\n"), "{}", requests[1]);
        let body: Value = serde_json::from_str(requests[1].split("\r\n\r\n").nth(1).unwrap()).unwrap();
        assert_eq!(body["options"], json!({"cas": 0}));
        assert_eq!(BASE64.decode(body["data"]["key"].as_str().unwrap()).unwrap(), *k.key);
    }

    #[test]
    fn unexpected_bodies_are_provider_errors_without_key_material() {
        let t = token_file(b"tok");
        let (url, server) = fake_server(vec![
            (200, r#"{"data":{"data":{"key":"c2VjcmV0IQ"}}}"#.into()),
            (200, r#"{"data":{"data":{"other":"x"}}}"#.into()),
            (200, r#"{"data":{"data":{"key":5678}}}"#.into()),
            (200, "<html>".into()),
            (200, r#"{"type":"kv","options":{"version":"1"}}"#.into()),
            (200, r#"{"data":{"type":"generic","options":null}}"#.into()),
            (200, r#"{"whatever":1}"#.into()),
            (400, r#"{"errors":["No secret engine mount at kv/"]}"#.into()),
            (403, r#"{"errors":["permission denied"]}"#.into()),
            (200, r#"{"data":{"max_versions":0,"cas_required":false}}"#.into()),
            (503, r#"{"errors":["Vault is sealed"]}"#.into()),
        ]);
        let p = provider(&url, &t, None);
        let provider_err = |r: Result<()>| match r {
            Err(TdeError::Provider(m)) => m,
            other => panic!("expected Provider, got {other:?}"),
        };
        let get = |n: &str| provider_err(p.get_key(n).map(|_| ()));
        let m = get("a");
        assert!(m.contains("base64") && !m.contains("c2VjcmV0IQ"), "{m}");
        assert!(get("b").contains("no string field \"key\""));
        let m = get("c");
        assert!(m.contains("not a KV version 2 secret") && !m.contains("5678"), "{m}");
        assert!(get("d").contains("not a KV version 2 secret"));
        let m = provider_err(p.check());
        assert!(m.contains("not a KV version 2 secrets engine (it is KV version \"1\")"), "{m}");
        let m = provider_err(p.check());
        assert!(m.contains("not a KV version 2 secrets engine (type \"generic\")"), "{m}");
        assert!(provider_err(p.check()).contains("no mount \"type\""));
        let m = provider_err(p.check());
        assert!(m.contains("does not exist") && m.contains("No secret engine mount"), "{m}");
        // sys/mounts forbidden: falls back to {mount}/config
        p.check().unwrap();
        assert!(provider_err(p.check()).contains("sealed"));
        let requests = server.join().unwrap();
        assert!(requests[8].starts_with("GET /v1/sys/mounts/kv "), "{}", requests[8]);
        assert!(requests[9].starts_with("GET /v1/kv/config "), "{}", requests[9]);
    }

    #[test]
    fn redirects_only_to_the_same_origin() {
        let t = token_file(b"tok-redirect");
        let other = TcpListener::bind("127.0.0.1:0").unwrap();
        other.set_nonblocking(true).unwrap();
        let other_url = format!("http://{}", other.local_addr().unwrap());
        let (url, server) = fake_server(vec![(307, format!("Location: {other_url}/v1/kv/data/k"))]);
        let p = provider(&url, &t, None);
        match p.get_key("k") {
            Err(TdeError::Provider(m)) => assert!(m.contains("redirect to another server"), "{m}"),
            other => panic!("expected Provider, got {other:?}"),
        }
        server.join().unwrap();
        assert_eq!(other.accept().unwrap_err().kind(), io::ErrorKind::WouldBlock, "the other server was contacted");

        // a redirect within the same server is followed
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let same = format!("Location: {url}/v1/kv/data/moved");
        let server = std::thread::spawn(move || {
            let (s, _) = listener.accept().unwrap();
            let first = answer(s, 307, &same);
            let (s, _) = listener.accept().unwrap();
            let second = answer(s, 200, r#"{"data":{"data":{"key":"AAECAwQFBgcICQoLDA0ODw=="}}}"#);
            (first, second)
        });
        let p = provider(&url, &t, None);
        let k = p.get_key("k").unwrap().unwrap();
        assert_eq!(*k.key, (0u8..16).collect::<Vec<_>>());
        let (_, second) = server.join().unwrap();
        assert!(second.starts_with("GET /v1/kv/data/moved "), "{second}");
        assert!(second.to_ascii_lowercase().contains("x-vault-token: tok-redirect"));
    }

    #[test]
    fn bad_key_requests_are_refused_before_any_request() {
        let t = token_file(b"tok");
        let p = provider(&format!("https://127.0.0.1:{}", closed_port()), &t, None);
        assert!(matches!(p.get_key(""), Err(TdeError::Invalid(_))));
        assert!(matches!(p.get_key("a/../b"), Err(TdeError::Invalid(_))));
        assert!(matches!(p.create_key("k", 20), Err(TdeError::Invalid(_))));
    }

    #[test]
    fn error_chains_are_classified() {
        #[derive(Debug)]
        struct Layer(&'static str, Option<io::Error>);
        impl fmt::Display for Layer {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.0)
            }
        }
        impl StdError for Layer {
            fn source(&self) -> Option<&(dyn StdError + 'static)> {
                self.1.as_ref().map(|e| e as _)
            }
        }
        // tokio-rustls: io::Error(Other, io::Error(InvalidData, rustls::Error))
        let cert = rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer);
        let tls =
            Layer("client error (Connect)", Some(io::Error::other(io::Error::new(io::ErrorKind::InvalidData, cert))));
        let m = describe_error_chain(&tls);
        assert!(m.starts_with("TLS certificate verification failed (UnknownIssuer)") && m.contains("caPath"), "{m}");
        let other_tls = rustls::Error::InvalidMessage(rustls::InvalidMessage::InvalidContentType);
        let m = describe_error_chain(&Layer("x", Some(io::Error::other(other_tls))));
        assert!(m.starts_with("TLS handshake failed"), "{m}");
        let refused = Layer("tcp connect error", Some(io::Error::from(io::ErrorKind::ConnectionRefused)));
        assert!(describe_error_chain(&refused).starts_with("connection refused (tcp connect error: "));
        let dns = Layer("dns error", Some(io::Error::other("failed to lookup address information")));
        assert!(describe_error_chain(&dns).starts_with("could not resolve the host name"));
        let timeout = Layer("x", Some(io::Error::from(io::ErrorKind::TimedOut)));
        assert!(describe_error_chain(&timeout).starts_with("timed out ("));
        // nothing recognised: the chain alone, repeated texts once
        let plain = Layer("outer: inner", Some(io::Error::other("inner")));
        assert_eq!(describe_error_chain(&plain), "outer: inner");
    }

    #[test]
    fn a_silent_server_times_out() {
        // Accepts TCP connections (the kernel does, from the backlog) but never answers.
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let t = token_file(b"tok");
        let p = provider(&format!("https://{}", listener.local_addr().unwrap()), &t, None);
        let started = std::time::Instant::now();
        let m = p.check().unwrap_err().to_string();
        let elapsed = started.elapsed();
        assert!(m.contains("timed out"), "{m}");
        assert!(
            elapsed >= CONNECT_TIMEOUT - Duration::from_millis(100)
                && elapsed < REQUEST_TIMEOUT + Duration::from_secs(2),
            "{elapsed:?}"
        );
    }

    /// A KV v2 read response holding `key`, as Vault sends it.
    fn read_body(key: &[u8]) -> Vec<u8> {
        let v = json!({
            "request_id": "0b6d", "lease_id": "", "renewable": false, "lease_duration": 0,
            "data": {"data": {"key": BASE64.encode(key)},
                     "metadata": {"created_time": "2026-12-06T10:00:00Z", "deletion_time": "",
                                  "destroyed": false, "version": 1}},
            "wrap_info": null, "warnings": null, "auth": null
        });
        serde_json::to_vec(&v).unwrap()
    }

    #[test]
    fn a_read_response_gives_its_key() {
        let key: Vec<u8> = (1..=32).collect();
        let got = interpret_read("k", "u", StatusCode::OK, &read_body(&key)).ok().flatten().unwrap();
        assert_eq!(&got[..], &key[..]);
        assert!(matches!(interpret_read("k", "u", StatusCode::NOT_FOUND, br#"{"errors":[]}"#), Ok(None)));
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(2000))]

        /// Mutated read responses (bytes overwritten, cut, extended), under any status,
        /// give a key, "missing", or an error that quotes none of the key: never a panic.
        #[test]
        fn mutated_read_responses_are_interpreted_or_refused(
            status in proptest::sample::select(vec![200u16, 204, 301, 400, 403, 404, 500, 503]),
            edits in proptest::collection::vec((0usize..4096, proptest::prelude::any::<u8>()), 0..6),
            cut in proptest::option::of(0usize..4096),
            extra in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..24),
        ) {
            let key: Vec<u8> = (0xC0..0xE0).collect();
            let mut body = read_body(&key);
            for (at, b) in edits {
                let i = at % body.len();
                body[i] = b;
            }
            if let Some(c) = cut {
                body.truncate(c % (body.len() + 1));
            }
            body.extend_from_slice(&extra);
            let status = StatusCode::from_u16(status).unwrap();
            let encoded = BASE64.encode(&key);
            let message = match interpret_read("k", "u", status, &body) {
                Err(ReadError::Message(m)) => m,
                Err(ReadError::Status) => server_errors_text(&body),
                Ok(_) => String::new(),
            };
            // A status error quotes the server's "errors" only, never the secret's data.
            proptest::prop_assert!(!message.contains(&encoded[..16]), "{message}");
        }
    }
}
