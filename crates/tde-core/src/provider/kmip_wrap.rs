//! The KMIP provider as a [`KeyWrapper`]: the KMIP server encrypts and decrypts pg_tde's
//! envelope keys with a symmetric key that never leaves it.
//!
//! - [`KeyWrapper::prepare_key`]: `Locate` (Name, Object Type = Symmetric Key); when nothing
//!   is found, `Create` an AES-256 key with that Name and the Cryptographic Usage Mask
//!   Encrypt|Decrypt only (no Export, no Wrap Key), then `Activate` it. The key is never
//!   read with `Get`.
//! - [`KeyWrapper::wrap`]: `Locate` the key by name (when several keys carry the name,
//!   exactly one must be Active), then `Encrypt` on the server.
//! - [`KeyWrapper::unwrap`]: `Decrypt` on the server with the key object whose Unique
//!   Identifier was recorded at wrapping time ([`WrappedKey::kms_key_version`]), or the
//!   key found by name when none was recorded.
//! - [`KeyWrapper::rewrap`]: nothing to do (`None`), KMIP keys have no versions here.
//! - [`KeyWrapper::check`]: as [`KeyProvider::check`].
//!
//! # Cipher
//!
//! AES-GCM with a 16-byte Authenticated Encryption Tag, asked of the server with KMIP 1.4
//! messages (the version that carries the tag in `Encrypt` and `Decrypt` payloads). GCM is
//! authenticated: a wrapped key that was altered is refused by the server instead of
//! decrypting to garbage (pg_tde also checks every unwrapped key against a check value,
//! so this is a second line). PyKMIP 0.10 and later, like the commercial servers, do GCM
//! `Encrypt`/`Decrypt` under KMIP 1.4, so the unauthenticated CBC fallback is not needed.
//! The request sets Random IV, so the server draws the nonce (a FIPS module must generate
//! its GCM IVs itself); it comes back in the response and is kept in the blob.
//!
//! # Blob layout (version 1)
//!
//! ```text
//! offset  size  field
//! 0       3     magic "TKW" (pg_TDE KMIP Wrap)
//! 3       1     layout version: 1
//! 4       1     mode: 1 = AES-GCM (KMIP Block Cipher Mode GCM, Cryptographic Algorithm AES)
//! 5       1     n: length of the IV/Counter/Nonce, 1 to 64
//! 6       1     t: length of the Authenticated Encryption Tag, 12 to 16 (16 when written)
//! 7       n     the IV/Counter/Nonce returned by the server
//! 7+n     t     the Authenticated Encryption Tag returned by the server
//! 7+n+t   rest  the ciphertext (as long as the wrapped key: 1 to 4096 bytes)
//! ```
//!
//! # Errors
//!
//! A failed operation whose Result Reason is a definite "no" is [`TdeError::Refused`]
//! (naming the server, the key and the server's reason): Item Not Found, Permission
//! Denied (PyKMIP's answer for a key that is not Active: revoked, compromised or not yet
//! activated), Object Archived, Key Value Not Present, Usage Limit Exceeded, Incompatible
//! Cryptographic Usage Mask, Object Destroyed, Object Not Found, Not Authorised, Wrong
//! Key Lifecycle State, and Cryptographic Failure on `Encrypt`/`Decrypt` (servers that
//! answer so for a revoked key, or for a wrapped key that does not authenticate). A
//! key name that no symmetric key carries any more is refused too. Everything else
//! (connection, TLS, timeouts, undecodable answers, other reasons such as PyKMIP's
//! General Failure for a tag mismatch) is [`TdeError::Provider`].
//!
//! Key material: the unwrapped key is read from a response buffer that is wiped on drop
//! straight into a [`Zeroizing`] buffer. The `Encrypt` request is encoded by `kmip-ttlv`,
//! which copies the plaintext into buffers it does not wipe (as for `Register` in
//! [`super::KeyProvider::create_key`]); the final request buffer is wiped.

use std::fmt;
use std::io::Write;

use kmip_protocol::types::common::{
    AttributeName, AttributeValue, BlockCipherMode, CryptographicAlgorithm, CryptographicParameters, ObjectType,
    Operation, RandomIV, State, TagLength, UniqueIdentifier,
};
use kmip_protocol::types::request::{
    Attribute, BatchCount, ProtocolVersion, ProtocolVersionMajor, ProtocolVersionMinor, RequestHeader, RequestPayload,
    TemplateAttribute,
};
use kmip_protocol::types::response::{self as res, ResultStatus};
use serde::de::{DeserializeOwned, DeserializeSeed, Deserializer, EnumAccess, Error as _, VariantAccess, Visitor};
use serde::{Deserialize, Serialize, Serializer};
use zeroize::Zeroizing;

use super::{KmipProvider, Session, USAGE_ENCRYPT_DECRYPT};
use crate::error::{Result, TdeError};
use crate::provider::wrapping::{KeyWrapper, WrappedKey};
use crate::provider::{validate_key_name, KeyProvider};

/// Magic bytes at the start of a blob.
const BLOB_MAGIC: [u8; 3] = *b"TKW";
/// Version of the blob layout written.
const BLOB_VERSION: u8 = 1;
/// Blob mode byte: AES-GCM.
const BLOB_MODE_AES_GCM: u8 = 1;
/// Magic, version, mode, nonce length, tag length.
const BLOB_HEADER_LEN: usize = 7;
/// Longest IV/Counter/Nonce accepted.
const MAX_NONCE_LEN: usize = 64;
/// Shortest Authenticated Encryption Tag accepted.
const MIN_TAG_LEN: usize = 12;
/// The tag length asked of the server (and the longest accepted).
const TAG_LEN: usize = 16;
/// Longest key pg_tde wraps.
const MAX_PLAINTEXT_LEN: usize = 4096;

/// The KMIP version of `Encrypt` and `Decrypt` requests: 1.4, whose payloads carry the
/// Authenticated Encryption Tag.
const WRAP_PROTOCOL: (i32, i32) = (1, 4);

// Result Reason values (KMIP 1.0 to 2.0).
const ITEM_NOT_FOUND: u32 = 0x01;
const CRYPTOGRAPHIC_FAILURE: u32 = 0x0A;

/// The name of a KMIP Result Reason, for messages.
fn reason_name(code: u32) -> String {
    let name = match code {
        0x01 => "Item Not Found",
        0x02 => "Response Too Large",
        0x03 => "Authentication Not Successful",
        0x04 => "Invalid Message",
        0x05 => "Operation Not Supported",
        0x06 => "Missing Data",
        0x07 => "Invalid Field",
        0x08 => "Feature Not Supported",
        0x09 => "Operation Canceled By Requester",
        0x0A => "Cryptographic Failure",
        0x0B => "Illegal Operation",
        0x0C => "Permission Denied",
        0x0D => "Object Archived",
        0x0E => "Index Out Of Bounds",
        0x0F => "Application Namespace Not Supported",
        0x10 => "Key Format Type Not Supported",
        0x11 => "Key Compression Type Not Supported",
        0x12 => "Encoding Option Error",
        0x13 => "Key Value Not Present",
        0x14 => "Attestation Required",
        0x15 => "Attestation Failed",
        0x16 => "Sensitive",
        0x17 => "Not Extractable",
        0x18 => "Object Already Exists",
        0x19 => "Invalid Ticket",
        0x1A => "Usage Limit Exceeded",
        0x24 => "Bad Cryptographic Parameters",
        0x29 => "Incompatible Cryptographic Usage Mask",
        0x36 => "Object Destroyed",
        0x37 => "Object Not Found",
        0x39 => "Not Authorised",
        0x3E => "Unsupported Cryptographic Parameters",
        0x3F => "Unsupported Protocol Version",
        0x43 => "Wrong Key Lifecycle State",
        0x100 => "General Failure",
        other => return format!("Result Reason {other:#x}"),
    };
    name.to_string()
}

/// Whether a failed `op` with this Result Reason is the server saying "no" about the key
/// (or the client's right to use it), rather than a fault.
fn is_refusal(op: Operation, code: u32) -> bool {
    match code {
        // Item Not Found, Permission Denied, Object Archived, Key Value Not Present,
        // Usage Limit Exceeded, Incompatible Cryptographic Usage Mask, Object Destroyed,
        // Object Not Found, Not Authorised, Wrong Key Lifecycle State
        0x01 | 0x0C | 0x0D | 0x13 | 0x1A | 0x29 | 0x36 | 0x37 | 0x39 | 0x43 => true,
        CRYPTOGRAPHIC_FAILURE => matches!(op, Operation::Encrypt | Operation::Decrypt),
        _ => false,
    }
}

// ---------------------------------------------------------------------------------------
// Wire types. kmip-protocol 0.4.3 has no Encrypt/Decrypt payloads, and its response
// types reject Result Reasons newer than KMIP 1.0, so the messages of the wrapping
// operations are (de)serialized with these types, in kmip-protocol's style: every
// struct and field is renamed to its TTLV tag, fields in the order of the specification.
// ---------------------------------------------------------------------------------------

/// A request message with one batch item.
#[derive(Serialize)]
#[serde(rename = "0x420078")]
struct RequestMessage<P>(RequestHeader, RequestBatchItem<P>);

/// A request batch item: the operation and its payload (a struct renamed `0x420079`).
#[derive(Serialize)]
#[serde(rename = "0x42000F")]
struct RequestBatchItem<P>(Operation, P);

/// Serialize a byte slice as a TTLV Byte String.
fn byte_string<S: Serializer>(bytes: &&[u8], serializer: S) -> std::result::Result<S::Ok, S::Error> {
    serializer.serialize_bytes(bytes)
}

/// Data (`0x4200C2`) of a request.
#[derive(Serialize)]
#[serde(rename = "Transparent:0x4200C2")]
struct DataOut<'a>(#[serde(serialize_with = "byte_string")] &'a [u8]);

/// IV/Counter/Nonce (`0x42003D`) of a request.
#[derive(Serialize)]
#[serde(rename = "Transparent:0x42003D")]
struct IvOut<'a>(#[serde(serialize_with = "byte_string")] &'a [u8]);

/// Authenticated Encryption Tag (`0x4200FF`, KMIP 1.4) of a request.
#[derive(Serialize)]
#[serde(rename = "Transparent:0x4200FF")]
struct TagOut<'a>(#[serde(serialize_with = "byte_string")] &'a [u8]);

/// KMIP 1.4 section 4.29 Encrypt, request payload: Unique Identifier, Cryptographic
/// Parameters, Data (no IV: the parameters ask the server for a random one).
#[derive(Serialize)]
#[serde(rename = "0x420079")]
struct EncryptRequestPayload<'a>(UniqueIdentifier, CryptographicParameters, DataOut<'a>);

/// KMIP 1.4 section 4.30 Decrypt, request payload: Unique Identifier, Cryptographic
/// Parameters, Data, IV/Counter/Nonce, Authenticated Encryption Tag.
#[derive(Serialize)]
#[serde(rename = "0x420079")]
struct DecryptRequestPayload<'a>(UniqueIdentifier, CryptographicParameters, DataOut<'a>, IvOut<'a>, TagOut<'a>);

/// Visitor of a TTLV Byte String.
struct ByteStringVisitor;

impl Visitor<'_> for ByteStringVisitor {
    type Value = Vec<u8>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a TTLV byte string")
    }

    fn visit_byte_buf<E: serde::de::Error>(self, v: Vec<u8>) -> std::result::Result<Vec<u8>, E> {
        Ok(v)
    }
}

/// A TTLV Byte String of a response.
struct Bytes(Vec<u8>);

impl<'de> Deserialize<'de> for Bytes {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> std::result::Result<Self, D::Error> {
        deserializer.deserialize_byte_buf(ByteStringVisitor).map(Bytes)
    }
}

/// A TTLV Byte String of a response that holds key material: wiped on drop from the
/// moment it is decoded, even when the rest of the message then fails to decode.
struct SecretBytes(Zeroizing<Vec<u8>>);

impl<'de> Deserialize<'de> for SecretBytes {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> std::result::Result<Self, D::Error> {
        deserializer.deserialize_byte_buf(ByteStringVisitor).map(|v| SecretBytes(Zeroizing::new(v)))
    }
}

/// A Result Reason (`0x42007E`) as its number, whatever its value (kmip-protocol's enum
/// knows only KMIP 1.0's, and decoding fails on the others).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct ReasonCode(u32);

/// Reads the name kmip-ttlv announces for an enumeration: its value as `0xXXXXXXXX`.
struct VariantName;

impl<'de> DeserializeSeed<'de> for VariantName {
    type Value = String;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> std::result::Result<String, D::Error> {
        struct Name;
        impl Visitor<'_> for Name {
            type Value = String;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an enumeration value")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> std::result::Result<String, E> {
                Ok(v.to_string())
            }
        }
        deserializer.deserialize_identifier(Name)
    }
}

impl<'de> Deserialize<'de> for ReasonCode {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> std::result::Result<Self, D::Error> {
        struct Reason;
        impl<'de> Visitor<'de> for Reason {
            type Value = ReasonCode;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a Result Reason enumeration")
            }
            fn visit_enum<A: EnumAccess<'de>>(self, data: A) -> std::result::Result<ReasonCode, A::Error> {
                let (name, variant) = data.variant_seed(VariantName)?;
                variant.unit_variant()?;
                name.strip_prefix("0x")
                    .and_then(|hex| u32::from_str_radix(hex, 16).ok())
                    .map(ReasonCode)
                    .ok_or_else(|| A::Error::custom(format!("bad Result Reason value {name:?}")))
            }
        }
        deserializer.deserialize_enum("0x42007E", &[], Reason)
    }
}

/// A response message (only its batch items are used).
#[derive(Deserialize)]
#[serde(rename = "0x42007B")]
struct ResponseMessage<P> {
    #[serde(rename = "0x42007A")]
    _header: res::ResponseHeader,
    #[serde(rename = "0x42000F")]
    batch_items: Vec<ResponseBatchItem<P>>,
}

/// A response batch item with a payload of type `P` (a struct renamed `0x42007C`).
/// A trailing Message Extension is skipped.
#[derive(Deserialize)]
#[serde(rename = "0x42000F")]
struct ResponseBatchItem<P> {
    #[serde(rename = "0x42005C")]
    operation: Option<Operation>,
    #[serde(rename = "0x420093")]
    _unique_batch_item_id: Option<Bytes>,
    #[serde(rename = "0x42007F")]
    result_status: ResultStatus,
    #[serde(rename = "0x42007E")]
    result_reason: Option<ReasonCode>,
    #[serde(rename = "0x42007D")]
    result_message: Option<String>,
    #[serde(rename = "0x420006")]
    _asynchronous_correlation_value: Option<Bytes>,
    #[serde(rename = "0x42007C")]
    payload: Option<P>,
}

/// KMIP 1.4 section 4.29 Encrypt, response payload.
#[derive(Deserialize)]
#[serde(rename = "0x42007C")]
struct EncryptResponsePayload {
    #[serde(rename = "0x420094")]
    unique_identifier: UniqueIdentifier,
    #[serde(rename = "0x4200C2")]
    data: Bytes,
    #[serde(rename = "0x42003D")]
    iv_counter_nonce: Option<Bytes>,
    #[serde(rename = "0x4200D6")]
    _correlation_value: Option<Bytes>,
    #[serde(rename = "0x4200FF")]
    authenticated_encryption_tag: Option<Bytes>,
}

/// KMIP 1.4 section 4.30 Decrypt, response payload.
#[derive(Deserialize)]
#[serde(rename = "0x42007C")]
struct DecryptResponsePayload {
    #[serde(rename = "0x420094")]
    unique_identifier: UniqueIdentifier,
    #[serde(rename = "0x4200C2")]
    data: SecretBytes,
    #[serde(rename = "0x4200D6")]
    _correlation_value: Option<Bytes>,
}

/// How a request of a wrapping operation ended when the server answered it.
enum Reply<R> {
    Done(R),
    Failed { reason: Option<u32>, message: String },
}

/// Decode a response (`raw`, one whole TTLV message) to a request for `op`.
/// `sensitive`: the response may carry key material, so decoding errors say nothing of
/// what they saw. Errors are messages for [`KmipProvider::err`].
fn decode_reply<R: DeserializeOwned>(
    raw: &[u8],
    op: Operation,
    sensitive: bool,
) -> std::result::Result<Reply<R>, String> {
    let detail = |e: &dyn fmt::Display| if sensitive { String::new() } else { format!(": {e}") };
    let mut response: ResponseMessage<R> = kmip_ttlv::from_slice(raw)
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
            (Some(got), Some(payload)) if got == op => Ok(Reply::Done(payload)),
            (Some(got), _) if got != op => Err(format!("the server answered the {op} request with a {got} response")),
            _ => Err(format!("the response to the {op} request has no payload")),
        },
        ResultStatus::OperationFailed => Ok(Reply::Failed {
            reason: item.result_reason.map(|r| r.0),
            message: item.result_message.unwrap_or_default(),
        }),
        other => Err(format!("unexpected result status {other} for the {op} request")),
    }
}

/// The AES-GCM Cryptographic Parameters with a tag of `tag_len` bytes.
fn gcm_parameters(tag_len: usize) -> CryptographicParameters {
    CryptographicParameters::default()
        .with_block_cipher_mode(BlockCipherMode::GCM)
        .with_cryptographic_algorithm(CryptographicAlgorithm::AES)
        .with_tag_length(TagLength(tag_len as i32))
}

// ---------------------------------------------------------------------------------------
// Blob layout
// ---------------------------------------------------------------------------------------

/// The parts of a version 1 blob.
#[derive(Debug, PartialEq, Eq)]
struct Blob<'a> {
    nonce: &'a [u8],
    tag: &'a [u8],
    ciphertext: &'a [u8],
}

/// Lay out an AES-GCM result as a version 1 blob (see the module documentation).
fn encode_blob(nonce: &[u8], tag: &[u8], ciphertext: &[u8]) -> std::result::Result<Vec<u8>, String> {
    if nonce.is_empty() || nonce.len() > MAX_NONCE_LEN {
        return Err(format!("an IV/nonce of {} bytes (1 to {MAX_NONCE_LEN} accepted)", nonce.len()));
    }
    if !(MIN_TAG_LEN..=TAG_LEN).contains(&tag.len()) {
        return Err(format!("an authentication tag of {} bytes ({MIN_TAG_LEN} to {TAG_LEN} accepted)", tag.len()));
    }
    if ciphertext.is_empty() || ciphertext.len() > MAX_PLAINTEXT_LEN {
        return Err(format!("a ciphertext of {} bytes (1 to {MAX_PLAINTEXT_LEN} accepted)", ciphertext.len()));
    }
    let mut out = Vec::with_capacity(BLOB_HEADER_LEN + nonce.len() + tag.len() + ciphertext.len());
    out.extend_from_slice(&BLOB_MAGIC);
    out.extend_from_slice(&[BLOB_VERSION, BLOB_MODE_AES_GCM, nonce.len() as u8, tag.len() as u8]);
    out.extend_from_slice(nonce);
    out.extend_from_slice(tag);
    out.extend_from_slice(ciphertext);
    Ok(out)
}

/// Split a blob into its parts; a blob that is not a version 1 blob is an error saying
/// what is wrong with it (never quoting its bytes).
fn parse_blob(blob: &[u8]) -> std::result::Result<Blob<'_>, String> {
    if blob.len() < BLOB_HEADER_LEN {
        return Err(format!("it is {} bytes long, shorter than its {BLOB_HEADER_LEN}-byte header", blob.len()));
    }
    let (header, rest) = blob.split_at(BLOB_HEADER_LEN);
    if header[..3] != BLOB_MAGIC {
        return Err("it does not start with the magic bytes \"TKW\" of a KMIP-wrapped key".into());
    }
    if header[3] != BLOB_VERSION {
        return Err(format!("it has the layout version {}; this pg_tde reads version {BLOB_VERSION}", header[3]));
    }
    if header[4] != BLOB_MODE_AES_GCM {
        return Err(format!("it names the unknown cipher mode {} (1 = AES-GCM)", header[4]));
    }
    let (nonce_len, tag_len) = (header[5] as usize, header[6] as usize);
    if nonce_len == 0 || nonce_len > MAX_NONCE_LEN {
        return Err(format!("it announces an IV/nonce of {nonce_len} bytes (1 to {MAX_NONCE_LEN} accepted)"));
    }
    if !(MIN_TAG_LEN..=TAG_LEN).contains(&tag_len) {
        return Err(format!(
            "it announces an authentication tag of {tag_len} bytes ({MIN_TAG_LEN} to {TAG_LEN} accepted)"
        ));
    }
    if rest.len() <= nonce_len + tag_len {
        return Err(format!(
            "it is truncated: {} bytes follow the header, fewer than the {nonce_len}-byte nonce, the {tag_len}-byte \
             tag and at least one byte of ciphertext",
            rest.len()
        ));
    }
    let (nonce, rest) = rest.split_at(nonce_len);
    let (tag, ciphertext) = rest.split_at(tag_len);
    if ciphertext.len() > MAX_PLAINTEXT_LEN {
        return Err(format!(
            "its ciphertext is {} bytes, more than the {MAX_PLAINTEXT_LEN} accepted",
            ciphertext.len()
        ));
    }
    Ok(Blob { nonce, tag, ciphertext })
}

// ---------------------------------------------------------------------------------------
// Operations
// ---------------------------------------------------------------------------------------

impl KmipProvider {
    /// The error of a failed wrapping operation: [`TdeError::Refused`] when the reason
    /// is a definite "no" ([`is_refusal`]), else [`TdeError::Provider`].
    fn wrap_failure(&self, op: Operation, what: &str, reason: Option<u32>, message: &str) -> TdeError {
        let reason_text = reason.map(|r| format!(": {}", reason_name(r))).unwrap_or_default();
        let message = if message.is_empty() { String::new() } else { format!(" ({message})") };
        if reason.is_some_and(|r| is_refusal(op, r)) {
            TdeError::Refused(format!(
                "KMIP server {} refused the {op} with {what}{reason_text}{message}",
                self.endpoint()
            ))
        } else {
            self.err(format_args!("{op} with {what} failed{reason_text}{message}"))
        }
    }

    /// Encode a request of kmip-protocol (Locate, Create, Activate, Destroy).
    fn encode_request(&self, payload: RequestPayload) -> Result<Zeroizing<Vec<u8>>> {
        let op = payload.operation();
        kmip_protocol::request::to_vec(payload, None)
            .map(Zeroizing::new)
            .map_err(|e| self.err(format_args!("could not encode the {op} request: {e}")))
    }

    /// Encode an `Encrypt` or `Decrypt` request (KMIP 1.4). `sensitive`: the payload
    /// carries key material, so encoding errors are reported without details.
    fn encode_wrap_request<P: Serialize>(
        &self,
        op: Operation,
        payload: P,
        sensitive: bool,
    ) -> Result<Zeroizing<Vec<u8>>> {
        let (major, minor) = WRAP_PROTOCOL;
        let header = RequestHeader(
            ProtocolVersion(ProtocolVersionMajor(major), ProtocolVersionMinor(minor)),
            None,
            None,
            BatchCount(1),
        );
        kmip_ttlv::to_vec(&RequestMessage(header, RequestBatchItem(op, payload))).map(Zeroizing::new).map_err(|e| {
            let detail = if sensitive { String::new() } else { format!(": {e}") };
            self.err(format_args!("could not encode the {op} request{detail}"))
        })
    }
}

impl Session<'_> {
    /// Send one encoded request for `op` and read its response. `sensitive`: the
    /// response may carry key material.
    fn call<R: DeserializeOwned>(&mut self, op: Operation, request: &[u8], sensitive: bool) -> Result<Reply<R>> {
        let p = self.provider;
        self.stream
            .write_all(request)
            .and_then(|()| self.stream.flush())
            .map_err(|e| p.io_err(format_args!("could not send the {op} request"), &e))?;
        let raw = self.read_message(op)?;
        decode_reply(&raw, op, sensitive).map_err(|e| p.err(e))
    }

    /// Like [`Session::call`], with a failed operation as an error ([`KmipProvider::wrap_failure`]).
    fn call_ok<R: DeserializeOwned>(
        &mut self,
        op: Operation,
        request: &[u8],
        sensitive: bool,
        what: &str,
    ) -> Result<R> {
        match self.call(op, request, sensitive)? {
            Reply::Done(payload) => Ok(payload),
            Reply::Failed { reason, message } => Err(self.provider.wrap_failure(op, what, reason, &message)),
        }
    }

    /// Unique identifiers of the symmetric keys named `name` (only the Active ones
    /// when `active_only`).
    fn find_keys(&mut self, name: &str, active_only: bool) -> Result<Vec<String>> {
        let mut attributes = vec![Attribute::Name(name.to_string()), Attribute::ObjectType(ObjectType::SymmetricKey)];
        if active_only {
            attributes.push(Attribute(AttributeName("State".into()), None, AttributeValue::State(State::Active)));
        }
        let request = self.provider.encode_request(RequestPayload::Locate(attributes))?;
        match self.call::<res::LocateResponsePayload>(Operation::Locate, &request, false)? {
            Reply::Done(found) => Ok(found.unique_identifiers.into_iter().map(|id| id.0).collect()),
            // Some servers answer "item not found" rather than an empty list.
            Reply::Failed { reason: Some(ITEM_NOT_FOUND), .. } => Ok(Vec::new()),
            Reply::Failed { reason, message } => {
                Err(self.provider.wrap_failure(Operation::Locate, &format!("key \"{name}\""), reason, &message))
            }
        }
    }

    /// The unique identifier of the key named `name` to wrap with: the only symmetric key
    /// of that name, or the only Active one of several.
    fn key_to_use(&mut self, name: &str) -> Result<String> {
        let all = self.find_keys(name, false)?;
        match all.as_slice() {
            [] => {
                return Err(TdeError::Refused(format!(
                    "KMIP server {} has no symmetric key named \"{name}\" (deleted?)",
                    self.provider.endpoint()
                )))
            }
            [uid] => return Ok(uid.clone()),
            _ => {}
        }
        let active = self.find_keys(name, true)?;
        match active.as_slice() {
            [uid] => Ok(uid.clone()),
            [] => Err(TdeError::Refused(format!(
                "KMIP server {}: none of the {} symmetric keys named \"{name}\" (objects {}) is active",
                self.provider.endpoint(),
                all.len(),
                all.join(", ")
            ))),
            many => Err(self.provider.err(format_args!(
                "{} active symmetric keys are named \"{name}\" (objects {}); cannot tell which one to use",
                many.len(),
                many.join(", ")
            ))),
        }
    }

    /// `Encrypt` `plaintext` with the key object `uid` (named `name`) and lay out the
    /// result as a blob.
    fn encrypt(&mut self, uid: &str, name: &str, plaintext: &[u8]) -> Result<Vec<u8>> {
        let p = self.provider;
        let what = format!("key \"{name}\" (object {uid})");
        let parameters = gcm_parameters(TAG_LEN).with_random_iv(RandomIV(true));
        let payload = EncryptRequestPayload(UniqueIdentifier(uid.to_string()), parameters, DataOut(plaintext));
        let request = p.encode_wrap_request(Operation::Encrypt, payload, true)?;
        let out: EncryptResponsePayload = self.call_ok(Operation::Encrypt, &request, false, &what)?;
        let bad = |why: &str| p.err(format_args!("the Encrypt with {what} returned {why}"));
        if out.unique_identifier.0 != uid {
            return Err(bad(&format!("the result of another object ({})", out.unique_identifier.0)));
        }
        let nonce =
            out.iv_counter_nonce.ok_or_else(|| bad("no IV/Counter/Nonce although a random IV was asked for"))?;
        let tag = out
            .authenticated_encryption_tag
            .ok_or_else(|| bad("no Authenticated Encryption Tag (no KMIP 1.4 GCM?)"))?;
        if tag.0.len() != TAG_LEN {
            return Err(bad(&format!("a {}-byte authentication tag instead of {TAG_LEN} bytes", tag.0.len())));
        }
        if out.data.0.len() != plaintext.len() {
            return Err(bad(&format!(
                "{} bytes of ciphertext for {} bytes of plaintext, which is not AES-GCM",
                out.data.0.len(),
                plaintext.len()
            )));
        }
        encode_blob(&nonce.0, &tag.0, &out.data.0).map_err(|e| bad(&e))
    }

    /// `Decrypt` `blob` with the key object `uid` (named `name`).
    fn decrypt(&mut self, uid: &str, name: &str, blob: &Blob<'_>) -> Result<Zeroizing<Vec<u8>>> {
        let p = self.provider;
        let what = format!("key \"{name}\" (object {uid})");
        let payload = DecryptRequestPayload(
            UniqueIdentifier(uid.to_string()),
            gcm_parameters(blob.tag.len()),
            DataOut(blob.ciphertext),
            IvOut(blob.nonce),
            TagOut(blob.tag),
        );
        let request = p.encode_wrap_request(Operation::Decrypt, payload, false)?;
        let out: DecryptResponsePayload = self.call_ok(Operation::Decrypt, &request, true, &what)?;
        let DecryptResponsePayload { unique_identifier, data: SecretBytes(key), .. } = out;
        if unique_identifier.0 != uid {
            return Err(p.err(format_args!(
                "the Decrypt with {what} returned the result of another object ({})",
                unique_identifier.0
            )));
        }
        if key.len() != blob.ciphertext.len() {
            return Err(p.err(format_args!(
                "the Decrypt with {what} returned {} bytes for {} bytes of ciphertext",
                key.len(),
                blob.ciphertext.len()
            )));
        }
        Ok(key)
    }

    /// `Create` an AES-256 key named `name` that may only encrypt and decrypt, and
    /// `Activate` it; a key that cannot be activated is destroyed again.
    fn create_wrapping_key(&mut self, name: &str) -> Result<()> {
        let p = self.provider;
        let what = format!("key \"{name}\"");
        let template = TemplateAttribute::unnamed(vec![
            Attribute::CryptographicAlgorithm(CryptographicAlgorithm::AES),
            Attribute::CryptographicLength(256),
            Attribute(
                AttributeName("Cryptographic Usage Mask".into()),
                None,
                AttributeValue::Integer(USAGE_ENCRYPT_DECRYPT),
            ),
            Attribute::Name(name.to_string()),
        ]);
        let request = p.encode_request(RequestPayload::Create(ObjectType::SymmetricKey, template))?;
        let created: res::CreateResponsePayload = self.call_ok(Operation::Create, &request, false, &what)?;
        let uid = created.unique_identifier.0;

        let request = p.encode_request(RequestPayload::Activate(Some(UniqueIdentifier(uid.clone()))))?;
        let what = format!("key \"{name}\" (object {uid})");
        let activated =
            self.call_ok::<res::UniqueIdentifierResponsePayload>(Operation::Activate, &request, false, &what);
        if let Err(e) = activated {
            // Leave no Pre-Active key behind that the next prepare_key would take as ready.
            let destroy = p.encode_request(RequestPayload::Destroy(Some(UniqueIdentifier(uid.clone()))))?;
            let cleanup = match self.call::<res::UniqueIdentifierResponsePayload>(Operation::Destroy, &destroy, false) {
                Ok(Reply::Done(_)) => "it was destroyed again".to_string(),
                Ok(Reply::Failed { reason, message }) => {
                    let reason = reason.map(reason_name).unwrap_or_else(|| "no reason".into());
                    format!("destroying it failed too ({reason}: {message}); destroy object {uid} by hand")
                }
                Err(d) => format!("destroying it failed too ({d}); destroy object {uid} by hand"),
            };
            let msg = format!("created {what} but could not activate it ({e}); {cleanup}");
            return Err(match e {
                TdeError::Refused(_) => TdeError::Refused(msg),
                _ => p.err(msg),
            });
        }
        Ok(())
    }
}

impl KeyWrapper for KmipProvider {
    /// Make sure a symmetric key named `kms_key_id` exists, else create it: AES-256,
    /// usage mask Encrypt|Decrypt only, activated. An existing key is taken as it is.
    fn prepare_key(&self, kms_key_id: &str) -> Result<()> {
        validate_key_name(kms_key_id)?;
        let mut session = self.connect()?;
        if !session.find_keys(kms_key_id, false)?.is_empty() {
            return Ok(());
        }
        session.create_wrapping_key(kms_key_id)
    }

    /// Encrypt `plaintext` (1 to 4096 bytes) on the server with AES-GCM; the blob is laid
    /// out as the module documentation describes, and the key object's Unique Identifier
    /// is kept as [`WrappedKey::kms_key_version`].
    fn wrap(&self, kms_key_id: &str, plaintext: &[u8]) -> Result<WrappedKey> {
        validate_key_name(kms_key_id)?;
        if plaintext.is_empty() || plaintext.len() > MAX_PLAINTEXT_LEN {
            return Err(TdeError::Invalid(format!(
                "a KMIP-wrapped key must be 1 to {MAX_PLAINTEXT_LEN} bytes long, not {}",
                plaintext.len()
            )));
        }
        let mut session = self.connect()?;
        let uid = session.key_to_use(kms_key_id)?;
        let blob = session.encrypt(&uid, kms_key_id, plaintext)?;
        Ok(WrappedKey { kms_key_id: kms_key_id.to_string(), kms_key_version: Some(uid), blob })
    }

    /// Decrypt on the server with the key object [`WrappedKey::kms_key_version`] (or the
    /// key named [`WrappedKey::kms_key_id`] when it is `None`).
    fn unwrap(&self, wrapped: &WrappedKey) -> Result<Zeroizing<Vec<u8>>> {
        let name = &wrapped.kms_key_id;
        let blob = parse_blob(&wrapped.blob)
            .map_err(|e| self.err(format_args!("the wrapped key of \"{name}\" cannot be read: {e}")))?;
        let mut session = self.connect()?;
        let uid = match &wrapped.kms_key_version {
            Some(uid) if !uid.is_empty() => uid.clone(),
            _ => {
                validate_key_name(name)?;
                session.key_to_use(name)?
            }
        };
        session.decrypt(&uid, name, &blob)
    }

    /// `None`: KMIP keys have no versions here.
    fn rewrap(&self, _wrapped: &WrappedKey) -> Result<Option<WrappedKey>> {
        Ok(None)
    }

    /// Connect and run a `Locate`, as [`KeyProvider::check`].
    fn check(&self) -> Result<()> {
        KeyProvider::check(self)
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::{enumeration, integer, item, structure};
    use super::*;

    fn blob() -> Vec<u8> {
        encode_blob(&[0x11; 16], &[0x22; 16], &[0x33; 32]).unwrap()
    }

    #[test]
    fn blob_round_trip() {
        let b = blob();
        assert_eq!(b.len(), 7 + 16 + 16 + 32);
        assert_eq!(&b[..7], &[b'T', b'K', b'W', 1, 1, 16, 16]);
        let parsed = parse_blob(&b).unwrap();
        assert_eq!(parsed, Blob { nonce: &[0x11; 16], tag: &[0x22; 16], ciphertext: &[0x33; 32] });
        let short = encode_blob(&[1; 12], &[2; 12], &[3]).unwrap();
        assert_eq!(parse_blob(&short).unwrap(), Blob { nonce: &[1; 12], tag: &[2; 12], ciphertext: &[3] });
    }

    #[test]
    fn bad_parts_are_not_laid_out() {
        assert!(encode_blob(&[], &[0; 16], &[0; 32]).unwrap_err().contains("IV/nonce"));
        assert!(encode_blob(&[0; 65], &[0; 16], &[0; 32]).unwrap_err().contains("IV/nonce"));
        assert!(encode_blob(&[0; 12], &[0; 8], &[0; 32]).unwrap_err().contains("tag"));
        assert!(encode_blob(&[0; 12], &[0; 17], &[0; 32]).unwrap_err().contains("tag"));
        assert!(encode_blob(&[0; 12], &[0; 16], &[]).unwrap_err().contains("ciphertext"));
        assert!(encode_blob(&[0; 12], &[0; 16], &[0; 4097]).unwrap_err().contains("ciphertext"));
    }

    #[test]
    fn truncated_or_garbled_blobs_are_clear_errors() {
        let b = blob();
        // (a cut in the ciphertext leaves a well-formed blob: the server's tag check finds it)
        for len in 0..=7 + 16 + 16 {
            let e = parse_blob(&b[..len]).unwrap_err();
            assert!(e.contains("shorter than") || e.contains("truncated"), "{len}: {e}");
        }
        let with = |at: usize, v: u8| {
            let mut g = b.clone();
            g[at] = v;
            parse_blob(&g).unwrap_err()
        };
        assert!(with(0, b'X').contains("magic"));
        assert!(with(3, 2).contains("layout version 2"));
        assert!(with(4, 7).contains("cipher mode 7"));
        assert!(with(5, 0).contains("IV/nonce of 0 bytes"));
        assert!(with(5, 200).contains("IV/nonce of 200 bytes"));
        assert!(with(5, 64).contains("truncated"));
        assert!(with(6, 4).contains("tag of 4 bytes"));
        // a longer nonce than announced shifts the parts: still a blob, the server's tag
        // check refuses it
        let mut shifted = b.clone();
        shifted[5] = 17;
        assert!(parse_blob(&shifted).is_ok());
        let mut long = b.clone();
        long.extend_from_slice(&[0; 4096]);
        assert!(parse_blob(&long).unwrap_err().contains("more than"));
    }

    #[test]
    fn refusals() {
        for code in [0x01, 0x0C, 0x0D, 0x36, 0x37, 0x39, 0x43] {
            assert!(is_refusal(Operation::Decrypt, code), "{code:#x}");
            assert!(is_refusal(Operation::Locate, code), "{code:#x}");
        }
        assert!(is_refusal(Operation::Decrypt, CRYPTOGRAPHIC_FAILURE));
        assert!(is_refusal(Operation::Encrypt, CRYPTOGRAPHIC_FAILURE));
        assert!(!is_refusal(Operation::Create, CRYPTOGRAPHIC_FAILURE));
        for code in [0x03, 0x04, 0x05, 0x07, 0x0B, 0x100, 0x1234] {
            assert!(!is_refusal(Operation::Decrypt, code), "{code:#x}");
        }
        assert_eq!(reason_name(0x43), "Wrong Key Lifecycle State");
        assert_eq!(reason_name(0x1234), "Result Reason 0x1234");
    }

    fn response(op: u32, status: &[Vec<u8>], payload: Option<Vec<u8>>) -> Vec<u8> {
        let header = structure(
            0x42007A,
            &[
                structure(0x420069, &[integer(0x42006A, 1), integer(0x42006B, 4)]),
                item(0x420092, 0x09, &1_700_000_000i64.to_be_bytes()),
                integer(0x42000D, 1),
            ],
        );
        let mut items = vec![enumeration(0x42005C, op)];
        items.extend_from_slice(status);
        items.extend(payload);
        structure(0x42007B, &[header, structure(0x42000F, &items)])
    }

    fn decrypt_response(key: &[u8]) -> Vec<u8> {
        let payload = structure(0x42007C, &[item(0x420094, 0x07, b"7"), item(0x4200C2, 0x08, key)]);
        response(0x20, &[enumeration(0x42007F, 0)], Some(payload))
    }

    #[test]
    fn hand_made_responses_decode() {
        let key: Vec<u8> = (1..=32).collect();
        match decode_reply::<DecryptResponsePayload>(&decrypt_response(&key), Operation::Decrypt, true).unwrap() {
            Reply::Done(out) => {
                assert_eq!(out.unique_identifier.0, "7");
                assert_eq!(&out.data.0[..], &key[..]);
            }
            Reply::Failed { .. } => panic!("expected success"),
        }

        let payload = structure(
            0x42007C,
            &[
                item(0x420094, 0x07, b"7"),
                item(0x4200C2, 0x08, &[9; 32]),
                item(0x42003D, 0x08, &[8; 16]),
                item(0x4200FF, 0x08, &[7; 16]),
            ],
        );
        let raw = response(0x1F, &[enumeration(0x42007F, 0)], Some(payload));
        match decode_reply::<EncryptResponsePayload>(&raw, Operation::Encrypt, false).unwrap() {
            Reply::Done(out) => {
                assert_eq!(out.data.0, vec![9; 32]);
                assert_eq!(out.iv_counter_nonce.unwrap().0, vec![8; 16]);
                assert_eq!(out.authenticated_encryption_tag.unwrap().0, vec![7; 16]);
            }
            Reply::Failed { .. } => panic!("expected success"),
        }

        // A failure with a KMIP 2.0 reason that kmip-protocol's enum does not know.
        let failed = response(
            0x20,
            &[enumeration(0x42007F, 1), enumeration(0x42007E, 0x43), item(0x42007D, 0x07, b"key is revoked")],
            None,
        );
        match decode_reply::<DecryptResponsePayload>(&failed, Operation::Decrypt, true).unwrap() {
            Reply::Failed { reason, message } => {
                assert_eq!((reason, message.as_str()), (Some(0x43), "key is revoked"));
            }
            Reply::Done(_) => panic!("expected a failure"),
        }
        // The answer to another operation is an error.
        let e = decode_reply::<DecryptResponsePayload>(&decrypt_response(&key), Operation::Encrypt, false);
        assert!(matches!(e, Err(m) if m.contains("Decrypt response")));
    }

    #[test]
    fn failures_are_classified() {
        let p = KmipProvider::new(super::super::KmipOptions {
            host: "127.0.0.1".into(),
            port: 5696,
            cert_path: "/c".into(),
            key_path: "/k".into(),
            ca_path: "/ca".into(),
        });
        match p.wrap_failure(Operation::Decrypt, "key \"k\" (object 7)", Some(0x0C), "not active") {
            TdeError::Refused(m) => assert_eq!(
                m,
                "KMIP server 127.0.0.1:5696 refused the Decrypt with key \"k\" (object 7): Permission Denied (not active)"
            ),
            other => panic!("{other:?}"),
        }
        assert!(matches!(p.wrap_failure(Operation::Decrypt, "k", Some(0x100), ""), TdeError::Provider(_)));
        assert!(matches!(p.wrap_failure(Operation::Decrypt, "k", None, "?"), TdeError::Provider(_)));
    }

    #[test]
    fn requests_encode() {
        let p = KmipProvider::new(super::super::KmipOptions {
            host: "h".into(),
            port: 1,
            cert_path: "/c".into(),
            key_path: "/k".into(),
            ca_path: "/ca".into(),
        });
        let payload = EncryptRequestPayload(
            UniqueIdentifier("7".into()),
            gcm_parameters(16).with_random_iv(RandomIV(true)),
            DataOut(&[0xAB; 32]),
        );
        let raw = p.encode_wrap_request(Operation::Encrypt, payload, true).unwrap();
        let hex: String = raw.iter().map(|b| format!("{b:02x}")).collect();
        // header version 1.4, operation Encrypt, GCM, AES, Random IV, tag length 16, the data
        for part in [
            "42006a02000000040000000100000000",
            "42006b02000000040000000400000000",
            "42005c05000000040000001f00000000",
            "42001105000000040000000900000000",
            "4200c506000000080000000000000001",
            "4200ce02000000040000001000000000",
            &format!("4200c20800000020{}", "ab".repeat(32)),
        ] {
            assert!(hex.contains(part), "{part} not in {hex}");
        }
        let payload = DecryptRequestPayload(
            UniqueIdentifier("7".into()),
            gcm_parameters(16),
            DataOut(&[1; 32]),
            IvOut(&[2; 16]),
            TagOut(&[3; 16]),
        );
        let raw = p.encode_wrap_request(Operation::Decrypt, payload, false).unwrap();
        let hex: String = raw.iter().map(|b| format!("{b:02x}")).collect();
        for part in ["42003d0800000010", "4200ff0800000010", "42005c050000000400000020"] {
            assert!(hex.contains(part), "{part} not in {hex}");
        }
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(2000))]

        /// Any bytes parse to a blob or to an error, never a panic.
        #[test]
        fn any_bytes_parse_or_fail(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..200)) {
            let _ = parse_blob(&bytes);
            let mut with_header = vec![b'T', b'K', b'W', 1, 1];
            with_header.extend_from_slice(&bytes);
            if let Ok(b) = parse_blob(&with_header) {
                proptest::prop_assert_eq!(7 + b.nonce.len() + b.tag.len() + b.ciphertext.len(), with_header.len());
            }
        }

        /// Mutated Decrypt responses decode or fail with a message that shows none of the key.
        #[test]
        fn mutated_decrypt_responses_never_show_the_key(
            edits in proptest::collection::vec((0usize..4096, proptest::prelude::any::<u8>()), 0..6),
            cut in proptest::option::of(0usize..4096),
        ) {
            let key: Vec<u8> = (0xC0..0xE0).collect();
            let mut raw = decrypt_response(&key);
            for (at, b) in edits {
                let i = at % raw.len();
                raw[i] = b;
            }
            if let Some(c) = cut {
                raw.truncate(c % (raw.len() + 1));
            }
            if let Err(message) = decode_reply::<DecryptResponsePayload>(&raw, Operation::Decrypt, true) {
                let hex: String = key.iter().map(|b| format!("{b:02x}")).collect();
                proptest::prop_assert!(!message.contains(&hex), "{}", message);
                proptest::prop_assert!(!message.as_bytes().windows(8).any(|w| key.windows(8).any(|k| k == w)));
            }
        }
    }
}
