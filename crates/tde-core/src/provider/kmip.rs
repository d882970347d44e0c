//! The KMIP key provider (`kmip`).
//!
//! Principal keys are AES symmetric keys held by a KMIP 1.x server (Thales CipherTrust,
//! Fortanix, HashiCorp Vault Enterprise, Cosmian, PyKMIP, ...) and found by their `Name`
//! attribute, as Percona pg_tde does:
//!
//! - [`KeyProvider::get_key`]: `Locate` (Name, Object Type = Symmetric Key), then `Get`;
//!   no object is `Ok(None)`, more than one is an error;
//! - [`KeyProvider::create_key`]: `Locate` (Name) must find nothing; a key drawn from the OS
//!   CSPRNG is `Register`ed (Raw key block, AES, Name, usage mask Encrypt|Decrypt),
//!   `Activate`d, then read back with `Get` and compared;
//! - [`KeyProvider::check`]: connect and run a `Locate`.
//!
//! The provider is also a [`KeyWrapper`](super::wrapping::KeyWrapper) (module
//! `kmip_wrap`): the server encrypts pg_tde's envelope keys with AES-GCM (`Encrypt` /
//! `Decrypt`, KMIP 1.4) under a key it creates non-exportable and never hands out.
//!
//! Options (a flat JSON object, Percona-compatible names): `host`, `port`, `certPath`,
//! `keyPath`, `caPath`; see [`parse_kmip_options`].
//!
//! Transport: one connection per operation. TCP with a [`CONNECT_TIMEOUT`] connect timeout
//! and [`IO_TIMEOUT`] read/write timeouts, and the whole operation (connection, handshake
//! and every request) ends by a deadline ([`OPERATION_TIMEOUT`]), so that a server that
//! trickles bytes cannot hold a caller longer; then TLS 1.2 or 1.3 (rustls, ring) with mutual
//! authentication: the server's certificate must chain to the CA in `caPath` (the only
//! trust anchor, the system store is never used) and match `host` (DNS name or IP address);
//! the client presents `certPath` with `keyPath`. KMIP messages are encoded and decoded by
//! the `kmip-protocol` / `kmip-ttlv` crates.
//!
//! Key material is held in zeroed-on-drop buffers here, and each response is read into a
//! buffer of ours that is wiped on drop; the buffer in which the KMIP crate encodes
//! a `Register` request (key creation) grows without being wiped, and TLS keeps its own
//! buffers (best effort). No error message contains key bytes
//! or private-key file contents: decoding errors of responses that carry a key are reported
//! without their details.

use std::fmt;
use std::io::{self, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kmip_protocol::types::common::{
    AttributeName, AttributeValue, CryptographicAlgorithm, CryptographicLength, KeyFormatType, KeyMaterial, ObjectType,
    Operation, UniqueIdentifier,
};
use kmip_protocol::types::request::{
    Attribute, KeyBlock, KeyValue, ManagedObject, RequestPayload, SymmetricKey, TemplateAttribute,
};
use kmip_protocol::types::response::{self as res, ResponseMessage, ResponsePayload, ResultReason, ResultStatus};
use rustls::pki_types::pem::{self, PemObject};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{ClientConfig, ClientConnection, RootCertStore, StreamOwned};
use serde_json::Value;
use zeroize::Zeroizing;

use super::{validate_key_name, KeyProvider, PrincipalKey};
use crate::error::{Result, TdeError};

#[path = "kmip_wrap.rs"]
mod kmip_wrap;

/// Timeout of the TCP connection to the KMIP server.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Read and write timeout on the connection (each TLS read or write).
pub const IO_TIMEOUT: Duration = Duration::from_secs(15);
/// Longest time one provider operation (`get_key`, `create_key`, `check`) may take, from
/// the TCP connection to the last response: each read or write is also bounded by what is
/// left of it.
pub const OPERATION_TIMEOUT: Duration = Duration::from_secs(30);
/// Largest KMIP response accepted, in bytes.
pub const MAX_RESPONSE_BYTES: u32 = 1024 * 1024;

/// Option names of a `kmip` provider.
pub const KMIP_OPTION_NAMES: [&str; 5] = ["host", "port", "certPath", "keyPath", "caPath"];

/// Cryptographic Usage Mask: Encrypt (0x4) | Decrypt (0x8).
const USAGE_ENCRYPT_DECRYPT: i32 = 0x4 | 0x8;

/// The settings of a `kmip` key provider.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KmipOptions {
    /// Server host name or IP address (also the name its certificate must carry).
    pub host: String,
    /// Server TCP port.
    pub port: u16,
    /// PEM client certificate (chain) presented to the server (`certPath`).
    pub cert_path: PathBuf,
    /// PEM private key of the client certificate (`keyPath`): PKCS#8, PKCS#1 or SEC1.
    pub key_path: PathBuf,
    /// PEM CA certificate(s) the server certificate must chain to (`caPath`).
    pub ca_path: PathBuf,
}

fn invalid(msg: impl Into<String>) -> TdeError {
    TdeError::Invalid(msg.into())
}

/// Validate the options of a `kmip` provider.
///
/// `options` must be a flat JSON object with exactly the keys `host` (a DNS name or an IP
/// address), `port` (1..=65535, a JSON number or a string of digits), `certPath`,
/// `keyPath` and `caPath` (absolute paths). Anything else is [`TdeError::Invalid`] naming
/// the option.
pub fn parse_kmip_options(options: &Value) -> Result<KmipOptions> {
    let obj = options.as_object().ok_or_else(|| invalid("kmip key provider options must be a JSON object"))?;
    if let Some(unknown) = obj.keys().find(|k| !KMIP_OPTION_NAMES.contains(&k.as_str())) {
        return Err(invalid(format!(
            "unknown option \"{unknown}\" for a kmip key provider (allowed: {})",
            KMIP_OPTION_NAMES.join(", ")
        )));
    }
    let string = |name: &str| -> Result<&str> {
        match obj.get(name) {
            None => Err(invalid(format!("kmip key provider needs the option \"{name}\""))),
            Some(Value::String(s)) if s.is_empty() => {
                Err(invalid(format!("option \"{name}\" of a kmip key provider must not be empty")))
            }
            Some(Value::String(s)) if s.contains('\0') => {
                Err(invalid(format!("option \"{name}\" must not contain NUL characters")))
            }
            Some(Value::String(s)) => Ok(s),
            Some(_) => Err(invalid(format!("option \"{name}\" of a kmip key provider must be a string"))),
        }
    };
    let path = |name: &str| -> Result<PathBuf> {
        let p = PathBuf::from(string(name)?);
        if !p.is_absolute() {
            return Err(invalid(format!("option \"{name}\" must be an absolute path, got \"{}\"", p.display())));
        }
        Ok(p)
    };

    let host = string("host")?;
    if ServerName::try_from(host).is_err() {
        return Err(invalid(format!(
            "option \"host\" of a kmip key provider must be a host name or an IP address, got \"{host}\""
        )));
    }
    let port_range = "option \"port\" of a kmip key provider must be a port number from 1 to 65535";
    let port = match obj.get("port") {
        None => return Err(invalid("kmip key provider needs the option \"port\"")),
        Some(Value::Number(n)) => n.as_u64().and_then(|p| u16::try_from(p).ok()),
        Some(Value::String(s)) if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) => s.parse::<u16>().ok(),
        Some(Value::String(s)) => return Err(invalid(format!("{port_range}, got \"{s}\""))),
        Some(_) => return Err(invalid(format!("{port_range} (a number or a string of digits)"))),
    }
    .filter(|&p| p != 0)
    .ok_or_else(|| invalid(format!("{port_range}, got {}", obj["port"])))?;

    Ok(KmipOptions {
        host: host.to_string(),
        port,
        cert_path: path("certPath")?,
        key_path: path("keyPath")?,
        ca_path: path("caPath")?,
    })
}

/// A KMIP server holding principal keys.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KmipProvider {
    options: KmipOptions,
    operation_timeout: Duration,
}

/// The TCP connection of one operation: every read and write waits at most
/// [`IO_TIMEOUT`] and never past the operation's deadline.
struct DeadlineStream {
    tcp: TcpStream,
    deadline: Instant,
}

impl DeadlineStream {
    /// What is left of the operation's time, or a `TimedOut` error once it has passed.
    fn left(&self) -> io::Result<Duration> {
        let left = self.deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::Error::new(io::ErrorKind::TimedOut, "the operation's deadline has passed"));
        }
        Ok(left.min(IO_TIMEOUT))
    }
}

impl Read for DeadlineStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.tcp.set_read_timeout(Some(self.left()?))?;
        self.tcp.read(buf)
    }
}

impl Write for DeadlineStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.tcp.set_write_timeout(Some(self.left()?))?;
        self.tcp.write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.tcp.flush()
    }
}

/// How a KMIP request ended when the server answered it.
enum Outcome {
    Success(Box<ResponsePayload>),
    Failed { reason: Option<ResultReason>, message: String },
}

impl KmipProvider {
    /// A provider with these settings (nothing is checked or contacted yet).
    pub fn new(options: KmipOptions) -> Self {
        KmipProvider { options, operation_timeout: OPERATION_TIMEOUT }
    }

    /// The same provider with another overall deadline per operation than
    /// [`OPERATION_TIMEOUT`] (tests use a short one).
    pub fn with_operation_timeout(mut self, timeout: Duration) -> Self {
        self.operation_timeout = timeout;
        self
    }

    /// Validate `options` ([`parse_kmip_options`]) and build the provider.
    pub fn from_options(options: &Value) -> Result<Self> {
        parse_kmip_options(options).map(Self::new)
    }

    /// The provider's settings.
    pub fn options(&self) -> &KmipOptions {
        &self.options
    }

    /// `host:port` (`[host]:port` for an IPv6 address), for messages.
    pub fn endpoint(&self) -> String {
        let KmipOptions { host, port, .. } = &self.options;
        if host.contains(':') {
            format!("[{host}]:{port}")
        } else {
            format!("{host}:{port}")
        }
    }

    fn err(&self, msg: impl fmt::Display) -> TdeError {
        TdeError::Provider(format!("KMIP server {}: {msg}", self.endpoint()))
    }

    fn read_file(&self, option: &str, path: &Path) -> Result<Zeroizing<Vec<u8>>> {
        std::fs::read(path)
            .map(Zeroizing::new)
            .map_err(|e| self.err(format_args!("could not read {option} \"{}\": {e}", path.display())))
    }

    /// The TLS client configuration: `caPath` as the only trust anchor, `certPath` and
    /// `keyPath` as the client identity. Files are read on every connection, so that
    /// renewed certificates are picked up.
    fn tls_config(&self) -> Result<Arc<ClientConfig>> {
        let o = &self.options;
        let ca_pem = self.read_file("caPath", &o.ca_path)?;
        let mut roots = RootCertStore::empty();
        for cert in CertificateDer::pem_slice_iter(&ca_pem) {
            let cert = cert.map_err(|e| {
                self.err(format_args!("caPath \"{}\" is not a valid PEM file: {e}", o.ca_path.display()))
            })?;
            roots.add(cert).map_err(|e| {
                self.err(format_args!("caPath \"{}\" holds an unusable CA certificate: {e}", o.ca_path.display()))
            })?;
        }
        if roots.is_empty() {
            return Err(self.err(format_args!("caPath \"{}\" contains no PEM certificate", o.ca_path.display())));
        }

        let cert_pem = self.read_file("certPath", &o.cert_path)?;
        let chain =
            CertificateDer::pem_slice_iter(&cert_pem).collect::<std::result::Result<Vec<_>, _>>().map_err(|e| {
                self.err(format_args!("certPath \"{}\" is not a valid PEM file: {e}", o.cert_path.display()))
            })?;
        if chain.is_empty() {
            return Err(self.err(format_args!("certPath \"{}\" contains no PEM certificate", o.cert_path.display())));
        }

        // The PEM parser's error details could quote the file; say only what is wrong.
        let key_pem = self.read_file("keyPath", &o.key_path)?;
        let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| {
            let what = match e {
                pem::Error::NoItemsFound => "contains no PEM private key (PKCS#8, PKCS#1 or SEC1)",
                _ => "is not a valid PEM private key file",
            };
            self.err(format_args!("keyPath \"{}\" {what}", o.key_path.display()))
        })?;

        let crypto = Arc::new(rustls::crypto::ring::default_provider());
        let config = ClientConfig::builder_with_provider(crypto)
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .map_err(|e| self.err(format_args!("could not set up TLS: {e}")))?
            .with_root_certificates(roots)
            .with_client_auth_cert(chain, key)
            .map_err(|e| {
                self.err(format_args!(
                    "the client certificate \"{}\" and key \"{}\" cannot be used: {e}",
                    o.cert_path.display(),
                    o.key_path.display()
                ))
            })?;
        Ok(Arc::new(config))
    }

    /// Describe an I/O error of the connection, unwrapping TLS errors.
    fn io_err(&self, what: impl fmt::Display, e: &io::Error) -> TdeError {
        if let Some(tls) = e.get_ref().and_then(|inner| inner.downcast_ref::<rustls::Error>()) {
            let hint = match tls {
                rustls::Error::AlertReceived(_) => {
                    " (the server refused the TLS connection: is the client certificate in certPath \
                     signed by a CA that the server trusts?)"
                }
                rustls::Error::InvalidCertificate(_) => {
                    " (the server's certificate must be signed by the CA in caPath and name the host)"
                }
                _ => "",
            };
            return self.err(format_args!("{what}: TLS error: {tls}{hint}"));
        }
        match e.kind() {
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => self.err(format_args!(
                "{what}: timed out (each read or write may take {} s, the whole operation {} s)",
                IO_TIMEOUT.as_secs(),
                self.operation_timeout.as_secs_f32()
            )),
            io::ErrorKind::UnexpectedEof => self.err(format_args!(
                "{what}: the server closed the connection (TLS handshake or client certificate rejected?)"
            )),
            _ => self.err(format_args!("{what}: {e}")),
        }
    }

    /// Open a TCP + TLS connection to the server and complete the TLS handshake.
    fn connect(&self) -> Result<Session<'_>> {
        let deadline = Instant::now() + self.operation_timeout;
        let o = &self.options;
        let config = self.tls_config()?;
        let server_name = ServerName::try_from(o.host.clone())
            .map_err(|_| self.err(format_args!("\"{}\" is not a valid host name or IP address", o.host)))?;

        let addrs: Vec<SocketAddr> = (o.host.as_str(), o.port)
            .to_socket_addrs()
            .map_err(|e| self.err(format_args!("could not resolve host \"{}\": {e}", o.host)))?
            .collect();
        let mut tcp = None;
        let mut failure = None;
        for addr in &addrs {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            match TcpStream::connect_timeout(addr, CONNECT_TIMEOUT.min(left)) {
                Ok(s) => {
                    tcp = Some(s);
                    break;
                }
                Err(e) => failure = Some((addr, e)),
            }
        }
        let tcp = match (tcp, failure) {
            (Some(s), _) => s,
            (None, Some((addr, e))) => {
                // Name the address only when it is not already in the endpoint.
                let to = if o.host.parse::<IpAddr>().is_ok() { String::new() } else { format!(" to {addr}") };
                return Err(if e.kind() == io::ErrorKind::TimedOut {
                    self.err(format_args!(
                        "could not connect{to}: timed out after {} s",
                        CONNECT_TIMEOUT.min(self.operation_timeout).as_secs_f32()
                    ))
                } else {
                    self.err(format_args!("could not connect{to}: {e}"))
                });
            }
            (None, None) if addrs.is_empty() => {
                return Err(self.err(format_args!("host \"{}\" has no address", o.host)))
            }
            (None, None) => return Err(self.err("could not connect: the operation's deadline has passed")),
        };
        tcp.set_nodelay(true).map_err(|e| self.err(format_args!("could not set up the connection: {e}")))?;
        let mut tcp = DeadlineStream { tcp, deadline };

        let mut conn = ClientConnection::new(config, server_name)
            .map_err(|e| self.err(format_args!("could not start TLS: {e}")))?;
        while conn.is_handshaking() {
            conn.complete_io(&mut tcp).map_err(|e| self.io_err("TLS handshake failed", &e))?;
        }
        Ok(Session { provider: self, stream: StreamOwned::new(conn, tcp) })
    }
}

/// One connection to the server.
struct Session<'a> {
    provider: &'a KmipProvider,
    stream: StreamOwned<ClientConnection, DeadlineStream>,
}

impl Drop for Session<'_> {
    fn drop(&mut self) {
        // Say goodbye (close_notify) without waiting for the server's answer.
        self.stream.conn.send_close_notify();
        while self.stream.conn.wants_write() {
            if !matches!(self.stream.conn.write_tls(&mut self.stream.sock), Ok(n) if n > 0) {
                break;
            }
        }
    }
}

impl Session<'_> {
    /// Send one request and read its response. `sensitive`: the request or the response
    /// carries key material, so decoding errors are reported without details.
    fn request(&mut self, payload: RequestPayload, sensitive: bool) -> Result<Outcome> {
        let p = self.provider;
        let op = payload.operation();
        let detail = |e: &dyn fmt::Display| if sensitive { String::new() } else { format!(": {e}") };
        let bytes = Zeroizing::new(
            kmip_protocol::request::to_vec(payload, None)
                .map_err(|e| p.err(format_args!("could not encode the {op} request{}", detail(&e))))?,
        );
        self.stream
            .write_all(&bytes)
            .and_then(|()| self.stream.flush())
            .map_err(|e| p.io_err(format_args!("could not send the {op} request"), &e))?;
        let raw = self.read_message(op)?;
        decode_response(&raw, op, sensitive).map_err(|e| p.err(e))
    }

    /// Read one TTLV message off the connection into a buffer that is wiped on drop (a
    /// `Get` response holds the key): its 8-byte tag, type and length, then the value.
    fn read_message(&mut self, op: Operation) -> Result<Zeroizing<Vec<u8>>> {
        let p = self.provider;
        let mut head = [0u8; 8];
        self.stream.read_exact(&mut head).map_err(|e| p.io_err(format_args!("no response to the {op} request"), &e))?;
        let len = u32::from_be_bytes([head[4], head[5], head[6], head[7]]);
        if len > MAX_RESPONSE_BYTES - 8 {
            return Err(p.err(format_args!(
                "the response to the {op} request announces {len} bytes, more than the {MAX_RESPONSE_BYTES} accepted"
            )));
        }
        let mut raw = Zeroizing::new(vec![0u8; 8 + len as usize]);
        raw[..8].copy_from_slice(&head);
        self.stream
            .read_exact(&mut raw[8..])
            .map_err(|e| p.io_err(format_args!("incomplete response to the {op} request"), &e))?;
        Ok(raw)
    }

    /// Like [`Session::request`], with a failed operation as an error.
    fn request_ok(&mut self, payload: RequestPayload, sensitive: bool, what: &str) -> Result<ResponsePayload> {
        let op = payload.operation();
        match self.request(payload, sensitive)? {
            Outcome::Success(payload) => Ok(*payload),
            Outcome::Failed { reason, message } => Err(self.failed(op, what, reason, &message)),
        }
    }

    fn failed(&self, op: Operation, what: &str, reason: Option<ResultReason>, message: &str) -> TdeError {
        let reason = reason.map(|r| format!(" ({r})")).unwrap_or_default();
        let message = if message.is_empty() { String::new() } else { format!(": {message}") };
        self.provider.err(format_args!("{op} of {what} failed{reason}{message}"))
    }

    /// Unique identifiers of the objects named `name` (of `object_type` when given).
    fn locate(&mut self, name: &str, object_type: Option<ObjectType>) -> Result<Vec<String>> {
        let mut attributes = vec![Attribute::Name(name.to_string())];
        attributes.extend(object_type.map(Attribute::ObjectType));
        let what = format!("key \"{name}\"");
        match self.request(RequestPayload::Locate(attributes), false)? {
            Outcome::Success(payload) => match *payload {
                ResponsePayload::Locate(found) => Ok(found.unique_identifiers.into_iter().map(|id| id.0).collect()),
                _ => Err(self.provider.err("unexpected payload in the Locate response")),
            },
            // Some servers answer "item not found" rather than an empty list.
            Outcome::Failed { reason: Some(ResultReason::ItemNotFound), .. } => Ok(Vec::new()),
            Outcome::Failed { reason, message } => Err(self.failed(Operation::Locate, &what, reason, &message)),
        }
    }

    /// The key material of the symmetric key `uid` (named `name`, for messages).
    fn get(&mut self, uid: &str, name: &str) -> Result<Zeroizing<Vec<u8>>> {
        let p = self.provider;
        let what = format!("key \"{name}\" (object {uid})");
        let payload = RequestPayload::Get(Some(UniqueIdentifier(uid.to_string())), None, None, None);
        let payload = self.request_ok(payload, true, &what)?;
        symmetric_key(payload, &what).map_err(|e| p.err(e))
    }
}

/// Decode a response message (`raw`, one whole TTLV message) to a request for `op`.
/// `sensitive`: the response may carry key material, so decoding errors say nothing of
/// what they saw. Errors are messages for [`KmipProvider::err`].
fn decode_response(raw: &[u8], op: Operation, sensitive: bool) -> std::result::Result<Outcome, String> {
    let detail = |e: &dyn fmt::Display| if sensitive { String::new() } else { format!(": {e}") };
    let mut response: ResponseMessage = kmip_ttlv::from_slice(raw)
        .map_err(|e| format!("could not decode the response to the {op} request{}", detail(&e)))?;
    if response.batch_items.len() != 1 {
        return Err(format!(
            "expected one batch item in the response to the {op} request, got {}",
            response.batch_items.len()
        ));
    }
    let item = response.batch_items.remove(0);
    match item.result_status {
        ResultStatus::Success => match (item.operation, item.payload) {
            (Some(got), Some(payload)) if got == op => Ok(Outcome::Success(Box::new(payload))),
            (Some(got), _) if got != op => Err(format!("the server answered the {op} request with a {got} response")),
            _ => Err(format!("the response to the {op} request has no payload")),
        },
        ResultStatus::OperationFailed => {
            Ok(Outcome::Failed { reason: item.result_reason, message: item.result_message.unwrap_or_default() })
        }
        other => Err(format!("unexpected result status {other} for the {op} request")),
    }
}

/// The key material of a `Get` response payload (`what` names the key, for messages).
fn symmetric_key(payload: ResponsePayload, what: &str) -> std::result::Result<Zeroizing<Vec<u8>>, String> {
    let ResponsePayload::Get(got) = payload else {
        return Err("unexpected payload in the Get response".into());
    };
    let res::ManagedObject::SymmetricKey(res::SymmetricKey { key_block }) = got.cryptographic_object else {
        return Err(format!("{what} is a {}, not a symmetric key", got.object_type));
    };
    if key_block.key_wrapping_data.is_some() {
        return Err(format!("{what} is returned wrapped; wrapped keys are not supported"));
    }
    let format = key_block.key_format_type;
    let key = match key_block.key_value.key_material {
        KeyMaterial::Bytes(bytes) if format == KeyFormatType::Raw => Zeroizing::new(bytes),
        KeyMaterial::TransparentSymmetricKey(t) => Zeroizing::new(t.key),
        other => {
            if let KeyMaterial::Bytes(b) | KeyMaterial::Structure(b) = other {
                drop(Zeroizing::new(b)); // wipe what may be key material
            }
            return Err(format!("{what} has the unsupported key format {format}"));
        }
    };
    if key.is_empty() {
        return Err(format!("{what} has no key material"));
    }
    Ok(key)
}

impl KeyProvider for KmipProvider {
    fn get_key(&self, name: &str) -> Result<Option<PrincipalKey>> {
        validate_key_name(name)?;
        let mut session = self.connect()?;
        let ids = session.locate(name, Some(ObjectType::SymmetricKey))?;
        match ids.as_slice() {
            [] => Ok(None),
            [uid] => Ok(Some(PrincipalKey { name: name.to_string(), key: session.get(uid, name)?, envelope: None })),
            many => Err(self.err(format_args!(
                "{} symmetric keys are named \"{name}\" (objects {}); cannot tell which one to use",
                many.len(),
                many.join(", ")
            ))),
        }
    }

    fn create_key(&self, name: &str, len: usize) -> Result<PrincipalKey> {
        validate_key_name(name)?;
        if len != 16 && len != 32 {
            return Err(invalid(format!("principal keys are 16 or 32 bytes, not {len}")));
        }
        let mut session = self.connect()?;
        if !session.locate(name, None)?.is_empty() {
            return Err(invalid(format!(
                "key \"{name}\" already exists in the provider (KMIP server {})",
                self.endpoint()
            )));
        }

        let mut key = Zeroizing::new(vec![0u8; len]);
        crate::rng::fill(&mut key)?;
        let bits = (len * 8) as i32;
        let template = TemplateAttribute::unnamed(vec![
            Attribute::Name(name.to_string()),
            Attribute(
                AttributeName("Cryptographic Usage Mask".into()),
                None,
                AttributeValue::Integer(USAGE_ENCRYPT_DECRYPT),
            ),
        ]);
        let object = ManagedObject::SymmetricKey(SymmetricKey(KeyBlock(
            KeyFormatType::Raw,
            None,
            Some(KeyValue(KeyMaterial::Bytes(key.to_vec()), None)),
            Some(CryptographicAlgorithm::AES),
            Some(CryptographicLength(bits)),
            None,
        )));
        let what = format!("key \"{name}\"");
        let payload = RequestPayload::Register(ObjectType::SymmetricKey, template, Some(object));
        let ResponsePayload::Register(registered) = session.request_ok(payload, true, &what)? else {
            return Err(self.err("unexpected payload in the Register response"));
        };
        let uid = registered.unique_identifier.0;

        // Registered objects start Pre-Active on most servers. A server that refuses to
        // activate (or activates on its own) is fine as long as the key can be read back.
        let activate = RequestPayload::Activate(Some(UniqueIdentifier(uid.clone())));
        let activated = session.request(activate, false)?;
        let back = session.get(&uid, name).map_err(|e| match activated {
            Outcome::Failed { reason, ref message } => {
                let activation = session.failed(Operation::Activate, &what, reason, message);
                self.err(format_args!("registered {what} as object {uid} but cannot read it back ({e}; {activation})"))
            }
            Outcome::Success(_) => e,
        })?;
        if *back != *key {
            return Err(self
                .err(format_args!("registered {what} as object {uid} but the server returns different key material")));
        }
        Ok(PrincipalKey { name: name.to_string(), key, envelope: None })
    }

    fn check(&self) -> Result<()> {
        let mut session = self.connect()?;
        session.locate("pg_tde connectivity check", Some(ObjectType::SymmetricKey)).map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn good() -> Value {
        json!({"host": "kmip.example.com", "port": 5696, "certPath": "/etc/pg/client.pem",
               "keyPath": "/etc/pg/client.key", "caPath": "/etc/pg/ca.pem"})
    }

    fn with(key: &str, value: Value) -> Value {
        let mut v = good();
        v[key] = value;
        v
    }

    fn without(key: &str) -> Value {
        let mut v = good();
        v.as_object_mut().unwrap().remove(key);
        v
    }

    fn err(v: Value) -> String {
        match parse_kmip_options(&v) {
            Err(TdeError::Invalid(m)) => m,
            other => panic!("expected Invalid for {v}, got {other:?}"),
        }
    }

    #[test]
    fn parses_good_options() {
        let o = parse_kmip_options(&good()).unwrap();
        assert_eq!(
            o,
            KmipOptions {
                host: "kmip.example.com".into(),
                port: 5696,
                cert_path: "/etc/pg/client.pem".into(),
                key_path: "/etc/pg/client.key".into(),
                ca_path: "/etc/pg/ca.pem".into(),
            }
        );
        assert_eq!(parse_kmip_options(&with("port", json!("5696"))).unwrap().port, 5696);
        assert_eq!(parse_kmip_options(&with("port", json!(1))).unwrap().port, 1);
        assert_eq!(parse_kmip_options(&with("port", json!(65535))).unwrap().port, 65535);
        for host in ["127.0.0.1", "::1", "localhost", "kmip-1.internal"] {
            assert_eq!(parse_kmip_options(&with("host", json!(host))).unwrap().host, host);
        }
        let p = KmipProvider::from_options(&with("host", json!("::1"))).unwrap();
        assert_eq!(p.endpoint(), "[::1]:5696");
        assert_eq!(KmipProvider::from_options(&good()).unwrap().endpoint(), "kmip.example.com:5696");
    }

    #[test]
    fn rejects_bad_options() {
        assert!(err(json!(["x"])).contains("object"));
        assert!(err(json!("host")).contains("object"));
        assert!(err(with("url", json!("https://x"))).contains("\"url\""));
        // option names are case-sensitive (Percona spelling)
        assert!(err(with("certpath", json!("/c"))).contains("\"certpath\""));
        for name in KMIP_OPTION_NAMES {
            assert!(err(without(name)).contains(&format!("\"{name}\"")), "{name}");
        }
        for name in ["host", "certPath", "keyPath", "caPath"] {
            let m = err(with(name, json!(5)));
            assert!(m.contains(&format!("\"{name}\"")) && m.contains("string"), "{m}");
            assert!(err(with(name, json!(""))).contains(&format!("\"{name}\"")));
            assert!(err(with(name, json!(null))).contains(&format!("\"{name}\"")));
        }
        for name in ["certPath", "keyPath", "caPath"] {
            let m = err(with(name, json!("relative/file.pem")));
            assert!(m.contains(&format!("\"{name}\"")) && m.contains("absolute"), "{m}");
            assert!(err(with(name, json!("/a\0b"))).contains("NUL"));
        }
        for bad in ["kmip server", "https://kmip", "a/b", "[::1]"] {
            assert!(err(with("host", json!(bad))).contains("\"host\""), "{bad}");
        }
        for bad in [
            json!(0),
            json!(65536),
            json!(-1),
            json!(5696.5),
            json!("0"),
            json!("65536"),
            json!("56x"),
            json!(""),
            json!(" 5696"),
            json!("+5696"),
            json!(true),
            json!([5696]),
            json!(null),
        ] {
            let m = err(with("port", bad.clone()));
            assert!(m.contains("\"port\""), "{bad}: {m}");
        }
    }

    #[test]
    fn unreadable_files_are_provider_errors() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing.pem");
        let mut o = parse_kmip_options(&good()).unwrap();
        o.host = "127.0.0.1".into();
        o.ca_path = missing.clone();
        let p = KmipProvider::new(o.clone());
        match p.check() {
            Err(TdeError::Provider(m)) => {
                assert!(m.contains("127.0.0.1:5696") && m.contains("caPath") && m.contains("missing.pem"), "{m}")
            }
            other => panic!("expected Provider error, got {other:?}"),
        }
        // a key file that is not PEM: the message does not quote it
        let ca = dir.path().join("ca.pem");
        std::fs::write(&ca, "not a certificate").unwrap();
        o.ca_path = ca;
        match KmipProvider::new(o.clone()).get_key("k") {
            Err(TdeError::Provider(m)) => assert!(m.contains("no PEM certificate"), "{m}"),
            other => panic!("expected Provider error, got {other:?}"),
        }
        assert!(matches!(KmipProvider::new(o.clone()).get_key(""), Err(TdeError::Invalid(_))));
        assert!(matches!(KmipProvider::new(o).create_key("k", 24), Err(TdeError::Invalid(_))));
    }

    /// TTLV items, for hand-made server responses (also `kmip_wrap`'s tests).
    pub(super) fn item(tag: u32, ty: u8, value: &[u8]) -> Vec<u8> {
        let mut out = tag.to_be_bytes()[1..].to_vec();
        out.push(ty);
        out.extend_from_slice(&(value.len() as u32).to_be_bytes());
        out.extend_from_slice(value);
        out.resize(out.len().next_multiple_of(8), 0);
        out
    }
    pub(super) fn structure(tag: u32, items: &[Vec<u8>]) -> Vec<u8> {
        item(tag, 0x01, &items.concat())
    }
    pub(super) fn enumeration(tag: u32, v: u32) -> Vec<u8> {
        item(tag, 0x05, &v.to_be_bytes())
    }
    pub(super) fn integer(tag: u32, v: i32) -> Vec<u8> {
        item(tag, 0x02, &v.to_be_bytes())
    }

    /// A KMIP 1.2 response to a `Get` that returns the raw AES key `key`.
    fn get_response(key: &[u8]) -> Vec<u8> {
        let header = structure(
            0x42007A,
            &[
                structure(0x420069, &[integer(0x42006A, 1), integer(0x42006B, 2)]),
                item(0x420092, 0x09, &1_700_000_000i64.to_be_bytes()),
                integer(0x42000D, 1),
            ],
        );
        let key_block = structure(
            0x420040,
            &[
                enumeration(0x420042, 1), // Key Format Type: Raw
                structure(0x420045, &[item(0x420043, 0x08, key)]),
                enumeration(0x420028, 3), // Cryptographic Algorithm: AES
                integer(0x42002A, key.len() as i32 * 8),
            ],
        );
        let payload = structure(
            0x42007C,
            &[
                enumeration(0x420057, 2), // Object Type: Symmetric Key
                item(0x420094, 0x07, b"17"),
                structure(0x42008F, &[key_block]),
            ],
        );
        let batch_item = structure(
            0x42000F,
            &[
                enumeration(0x42005C, 0x0A), // Operation: Get
                enumeration(0x42007F, 0),    // Result Status: Success
                payload,
            ],
        );
        structure(0x42007B, &[header, batch_item])
    }

    fn decode_key(raw: &[u8]) -> std::result::Result<Zeroizing<Vec<u8>>, String> {
        match decode_response(raw, Operation::Get, true)? {
            Outcome::Success(payload) => symmetric_key(*payload, "key \"k\""),
            Outcome::Failed { message, .. } => Err(format!("failed: {message}")),
        }
    }

    #[test]
    fn a_hand_made_get_response_decodes() {
        let key: Vec<u8> = (1..=32).collect();
        assert_eq!(&decode_key(&get_response(&key)).unwrap()[..], &key[..]);
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(2000))]

        /// Mutated server responses (bytes overwritten, lengths changed, cut, extended)
        /// decode to a key or to a clear error that shows none of the key: never a panic,
        /// never an allocation the response's own length does not bound.
        #[test]
        fn mutated_get_responses_are_decoded_or_refused(
            edits in proptest::collection::vec((0usize..4096, proptest::prelude::any::<u8>()), 0..6),
            lengths in proptest::collection::vec((0usize..64, proptest::prelude::any::<u32>()), 0..3),
            cut in proptest::option::of(0usize..4096),
            extra in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..24),
        ) {
            let key: Vec<u8> = (0xC0..0xE0).collect();
            let mut raw = get_response(&key);
            // Overwrite the length field of some item (items start at multiples of 8 in
            // the padded encoding; not every multiple of 8 is an item start, which is fine).
            for (slot, len) in lengths {
                let at = (slot * 8) % raw.len();
                if at + 8 <= raw.len() {
                    raw[at + 4..at + 8].copy_from_slice(&len.to_be_bytes());
                }
            }
            for (at, b) in edits {
                let i = at % raw.len();
                raw[i] = b;
            }
            if let Some(c) = cut {
                raw.truncate(c % (raw.len() + 1));
            }
            raw.extend_from_slice(&extra);
            if let Err(message) = decode_key(&raw) {
                let hex: String = key.iter().map(|b| format!("{b:02x}")).collect();
                proptest::prop_assert!(!message.contains(&hex), "{message}");
                proptest::prop_assert!(!message.as_bytes().windows(8).any(|w| key.windows(8).any(|k| k == w)));
            }
        }
    }
}
