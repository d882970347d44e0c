//! The per-database internal key map: `$PGDATA/pg_tde/<dboid>_keys`.
//!
//! The file holds, for one database, the internal key of every encrypted relation
//! file, each wrapped (AES-GCM, see [`crate::wrap`]) by the database's principal key.
//! The extension passes the path and the database OID; this module only knows the
//! format. All integers are little-endian.
//!
//! # Header (512 bytes, at offset 0)
//!
//! | offset | size | field                                                          |
//! |--------|------|----------------------------------------------------------------|
//! | 0      | 8    | magic `PGTDEKM\0`                                              |
//! | 8      | 4    | format version, u32 = 1                                        |
//! | 12     | 4    | header size, u32 = 512                                         |
//! | 16     | 4    | record size, u32 = 256                                         |
//! | 20     | 4    | database OID, u32                                              |
//! | 24     | 4    | principal key provider id, i32                                 |
//! | 28     | 4    | reserved, zero                                                 |
//! | 32     | 8    | principal key creation time, i64 Unix seconds                  |
//! | 40     | 2    | principal key name length, u16 (1..=255)                       |
//! | 42     | 2    | check blob length, u16 (= 44)                                  |
//! | 44     | 64   | check blob, zero-padded                                        |
//! | 108    | 256  | principal key name, UTF-8, zero-padded                         |
//! | 364    | 144  | reserved, zero                                                 |
//! | 508    | 4    | CRC-32C of bytes 0..508                                        |
//!
//! The *check blob* is `wrap(principal_key, "pg_tde principal key check" || db_oid, 16 zero
//! bytes)`: it lets the extension verify a principal key even when the map is empty.
//!
//! # Records (256 bytes each, from offset 512)
//!
//! | offset | size | field                                                          |
//! |--------|------|----------------------------------------------------------------|
//! | 0      | 4    | state, u32: 0 = free, 1 = in use                               |
//! | 4      | 4    | tablespace OID, u32                                            |
//! | 8      | 4    | relation file number, u32                                      |
//! | 12     | 4    | cipher id, u32 (see [`Cipher`])                                |
//! | 16     | 4    | wrapped key length, u32 (= 12 + key_len + 16 + 16)             |
//! | 20     | 128  | wrapped key, zero-padded (at most 108 bytes are used)          |
//! | 148    | 104  | reserved, zero                                                 |
//! | 252    | 4    | CRC-32C of bytes 0..252                                        |
//!
//! The wrapped key is `wrap(principal_key, aad, RelKey::to_bytes())` with
//! `aad = "pg_tde relkey" || db_oid || spc_oid || rel_number || cipher` (u32 LE each), so
//! a record copied to another relation, database or cipher fails to unwrap.
//!
//! Records are 256 bytes so that one never straddles a 512-byte sector: a record is
//! written with a single `pwrite` + `fsync`, and a torn write cannot damage it or a
//! neighbour (the same sector-atomicity assumption PostgreSQL makes for `pg_control`).
//! An all-zero record (never written, e.g. space left by a crash while appending) counts
//! as a free slot. Any other record whose CRC does not match makes the file
//! [`TdeError::Corrupt`].
//!
//! # Updates
//!
//! [`put_entry`] and [`remove_entry`] rewrite one record in place under an exclusive
//! `flock` of the file; [`create`] and [`rewrite`] write `<path>.tmp`, fsync it, move it
//! into place and fsync the directory. Callers must serialize [`rewrite`] with the other
//! writers of the same file (the extension holds a lock while it changes key maps).

use std::collections::HashSet;
use std::fs::{File, OpenOptions};
use std::io::{ErrorKind, Read};
use std::os::unix::fs::FileExt;
use std::path::Path;

use crate::cipher::{Cipher, RelKey, BASE_IV_LEN, MAX_KEY_LEN};
use crate::error::{Result, TdeError};
use crate::{fsutil, wrap};

/// File magic.
pub const MAGIC: [u8; 8] = *b"PGTDEKM\0";
/// Current (and only) format version.
pub const VERSION: u32 = 1;
/// Size of the header.
pub const HEADER_SIZE: usize = 512;
/// Size of one record.
pub const ENTRY_SIZE: usize = 256;
/// Longest principal key name, in bytes.
pub const MAX_PRINCIPAL_NAME_LEN: usize = 255;
/// Length of the principal key check blob.
pub const CHECK_LEN: usize = wrap::OVERHEAD + CHECK_PLAINTEXT.len();
/// Longest wrapped internal key (XTS-AES-256: 64 key bytes + 16 base IV bytes).
pub const MAX_WRAPPED_LEN: usize = wrap::OVERHEAD + MAX_KEY_LEN + BASE_IV_LEN;

const CHECK_PLAINTEXT: [u8; 16] = [0; 16];
const CHECK_AAD_PREFIX: &[u8] = b"pg_tde principal key check";
const ENTRY_AAD_PREFIX: &[u8] = b"pg_tde relkey";
const FILE_MODE: u32 = 0o600;

const STATE_FREE: u32 = 0;
const STATE_IN_USE: u32 = 1;

/// Header field offsets.
mod h {
    pub const MAGIC: usize = 0;
    pub const VERSION: usize = 8;
    pub const HEADER_SIZE: usize = 12;
    pub const ENTRY_SIZE: usize = 16;
    pub const DB_OID: usize = 20;
    pub const PROVIDER_ID: usize = 24;
    pub const CREATED: usize = 32;
    pub const NAME_LEN: usize = 40;
    pub const CHECK_LEN: usize = 42;
    pub const CHECK: usize = 44;
    pub const CHECK_CAP: usize = 64;
    pub const NAME: usize = CHECK + CHECK_CAP;
    pub const NAME_CAP: usize = 256;
    pub const END: usize = NAME + NAME_CAP;
    pub const CRC: usize = super::HEADER_SIZE - 4;
}

/// Record field offsets.
mod e {
    pub const STATE: usize = 0;
    pub const SPC_OID: usize = 4;
    pub const REL_NUMBER: usize = 8;
    pub const CIPHER: usize = 12;
    pub const WRAPPED_LEN: usize = 16;
    pub const WRAPPED: usize = 20;
    pub const WRAPPED_CAP: usize = 128;
    pub const END: usize = WRAPPED + WRAPPED_CAP;
    pub const CRC: usize = super::ENTRY_SIZE - 4;
}

const _: () = assert!(CHECK_LEN == 44 && CHECK_LEN <= h::CHECK_CAP);
const _: () = assert!(h::NAME == 108 && MAX_PRINCIPAL_NAME_LEN < h::NAME_CAP);
const _: () = assert!(h::END <= h::CRC && h::CRC == 508);
const _: () = assert!(MAX_WRAPPED_LEN == 108 && MAX_WRAPPED_LEN <= e::WRAPPED_CAP);
const _: () = assert!(e::END <= e::CRC && e::CRC == 252);
// Records are sector-aligned and never straddle a 512-byte sector boundary.
const _: () = assert!(HEADER_SIZE.is_multiple_of(512) && 512usize.is_multiple_of(ENTRY_SIZE));

/// Which principal key wraps the keys of a map.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PrincipalRef {
    /// Key name in the provider (1..=255 bytes of UTF-8, no NUL).
    pub name: String,
    /// Id of the key provider in the provider catalog.
    pub provider_id: i32,
    /// When the principal key was created, Unix seconds.
    pub created_unix_secs: i64,
}

fn validate_principal_name(name: &str) -> Result<()> {
    if name.is_empty() || name.len() > MAX_PRINCIPAL_NAME_LEN || name.contains('\0') {
        return Err(TdeError::Invalid(format!(
            "principal key name must be 1 to {MAX_PRINCIPAL_NAME_LEN} bytes without NUL, got {} bytes",
            name.len()
        )));
    }
    Ok(())
}

/// The header of a key map.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyMapHeader {
    /// Database the map belongs to.
    pub db_oid: u32,
    /// The principal key that wraps the entries.
    pub principal: PrincipalRef,
    /// `wrap(principal_key, check_aad(db_oid), 16 zero bytes)`.
    check: Vec<u8>,
}

fn check_aad(db_oid: u32) -> Vec<u8> {
    let mut aad = CHECK_AAD_PREFIX.to_vec();
    aad.extend_from_slice(&db_oid.to_le_bytes());
    aad
}

impl KeyMapHeader {
    /// A header for database `db_oid` whose entries are wrapped by `principal_key`
    /// (16 or 32 bytes), described by `principal`.
    pub fn new(db_oid: u32, principal: PrincipalRef, principal_key: &[u8]) -> Result<Self> {
        validate_principal_name(&principal.name)?;
        let check = wrap::wrap(principal_key, &check_aad(db_oid), &CHECK_PLAINTEXT)?;
        Ok(KeyMapHeader { db_oid, principal, check })
    }

    /// Verify that `principal_key` is the key this map was created with.
    ///
    /// Fails with [`TdeError::Decrypt`] for any other key.
    pub fn verify_principal(&self, principal_key: &[u8]) -> Result<()> {
        let plain = wrap::unwrap(principal_key, &check_aad(self.db_oid), &self.check).map_err(|e| match e {
            TdeError::Decrypt(_) => TdeError::Decrypt(format!(
                "principal key does not match the key \"{}\" of the key map of database {}",
                self.principal.name, self.db_oid
            )),
            other => other,
        })?;
        if plain[..] != CHECK_PLAINTEXT {
            return Err(TdeError::Corrupt(format!(
                "principal key check of database {} has unexpected content",
                self.db_oid
            )));
        }
        Ok(())
    }
}

/// One internal key of a relation file, wrapped by the principal key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyMapEntry {
    /// Tablespace OID of the relation file.
    pub spc_oid: u32,
    /// Relation file number.
    pub rel_number: u32,
    /// Cipher of the key.
    pub cipher: Cipher,
    /// `nonce || ciphertext || tag` of `RelKey::to_bytes()`.
    pub wrapped: Vec<u8>,
}

fn entry_aad(db_oid: u32, spc_oid: u32, rel_number: u32, cipher: Cipher) -> Vec<u8> {
    let mut aad = ENTRY_AAD_PREFIX.to_vec();
    for v in [db_oid, spc_oid, rel_number, cipher.as_u32()] {
        aad.extend_from_slice(&v.to_le_bytes());
    }
    aad
}

fn wrapped_len(cipher: Cipher) -> usize {
    wrap::OVERHEAD + cipher.key_len() + BASE_IV_LEN
}

impl KeyMapEntry {
    /// Wrap `key` for relation `spc_oid`/`rel_number` of database `db_oid`.
    pub fn seal(db_oid: u32, spc_oid: u32, rel_number: u32, key: &RelKey, principal_key: &[u8]) -> Result<Self> {
        let aad = entry_aad(db_oid, spc_oid, rel_number, key.cipher);
        let wrapped = wrap::wrap(principal_key, &aad, &key.to_bytes())?;
        Ok(KeyMapEntry { spc_oid, rel_number, cipher: key.cipher, wrapped })
    }

    /// Unwrap the key. Fails with [`TdeError::Decrypt`] if `principal_key` is wrong or the
    /// entry does not belong to this database and relation.
    pub fn open(&self, db_oid: u32, principal_key: &[u8]) -> Result<RelKey> {
        let aad = entry_aad(db_oid, self.spc_oid, self.rel_number, self.cipher);
        let plain = wrap::unwrap(principal_key, &aad, &self.wrapped).map_err(|e| match e {
            TdeError::Decrypt(_) => TdeError::Decrypt(format!(
                "internal key of relation {}/{}/{} could not be unwrapped: \
                 wrong principal key, or the entry was damaged or moved",
                self.spc_oid, db_oid, self.rel_number
            )),
            other => other,
        })?;
        RelKey::from_bytes(self.cipher, &plain).map_err(|_| {
            TdeError::Corrupt(format!(
                "internal key of relation {}/{}/{} has a bad length",
                self.spc_oid, db_oid, self.rel_number
            ))
        })
    }

    fn same_relation(&self, spc_oid: u32, rel_number: u32) -> bool {
        self.spc_oid == spc_oid && self.rel_number == rel_number
    }
}

// ---------------------------------------------------------------------------------------
// Encoding

fn get<const N: usize>(buf: &[u8], off: usize) -> [u8; N] {
    let mut a = [0u8; N];
    a.copy_from_slice(&buf[off..off + N]);
    a
}

fn get_u32(buf: &[u8], off: usize) -> u32 {
    u32::from_le_bytes(get(buf, off))
}

fn put(buf: &mut [u8], off: usize, bytes: &[u8]) {
    buf[off..off + bytes.len()].copy_from_slice(bytes);
}

fn validate_header(header: &KeyMapHeader) -> Result<()> {
    validate_principal_name(&header.principal.name)?;
    if header.check.len() != CHECK_LEN {
        return Err(TdeError::Invalid("key map header has a bad check blob".into()));
    }
    Ok(())
}

/// Serialize a header (512 bytes, CRC included).
///
/// # Panics
/// If `header.principal.name` was changed to something [`KeyMapHeader::new`] rejects
/// (empty, longer than 255 bytes, or containing NUL). The file functions check this
/// first and return [`TdeError::Invalid`] instead.
pub fn header_to_bytes(header: &KeyMapHeader) -> [u8; HEADER_SIZE] {
    if let Err(e) = validate_header(header) {
        panic!("header_to_bytes: {e}");
    }
    let name = header.principal.name.as_bytes();
    let mut b = [0u8; HEADER_SIZE];
    put(&mut b, h::MAGIC, &MAGIC);
    put(&mut b, h::VERSION, &VERSION.to_le_bytes());
    put(&mut b, h::HEADER_SIZE, &(HEADER_SIZE as u32).to_le_bytes());
    put(&mut b, h::ENTRY_SIZE, &(ENTRY_SIZE as u32).to_le_bytes());
    put(&mut b, h::DB_OID, &header.db_oid.to_le_bytes());
    put(&mut b, h::PROVIDER_ID, &header.principal.provider_id.to_le_bytes());
    put(&mut b, h::CREATED, &header.principal.created_unix_secs.to_le_bytes());
    put(&mut b, h::NAME_LEN, &(name.len() as u16).to_le_bytes());
    put(&mut b, h::CHECK_LEN, &(CHECK_LEN as u16).to_le_bytes());
    put(&mut b, h::CHECK, &header.check);
    put(&mut b, h::NAME, name);
    let crc = crc32c::crc32c(&b[..h::CRC]);
    put(&mut b, h::CRC, &crc.to_le_bytes());
    b
}

fn parse_header(b: &[u8]) -> std::result::Result<KeyMapHeader, String> {
    if b.len() != HEADER_SIZE {
        return Err(format!("header is {} bytes, expected {HEADER_SIZE}", b.len()));
    }
    if get::<8>(b, h::MAGIC) != MAGIC {
        return Err("bad magic: not a pg_tde key map".into());
    }
    let version = get_u32(b, h::VERSION);
    if version != VERSION {
        return Err(format!("unsupported format version {version} (this build reads version {VERSION})"));
    }
    let stored = get_u32(b, h::CRC);
    let computed = crc32c::crc32c(&b[..h::CRC]);
    if stored != computed {
        return Err(format!("header CRC mismatch (stored {stored:08x}, computed {computed:08x})"));
    }
    let (hs, es) = (get_u32(b, h::HEADER_SIZE), get_u32(b, h::ENTRY_SIZE));
    if hs as usize != HEADER_SIZE || es as usize != ENTRY_SIZE {
        return Err(format!("unexpected header size {hs} or record size {es}"));
    }
    let name_len = u16::from_le_bytes(get(b, h::NAME_LEN)) as usize;
    if name_len == 0 || name_len > MAX_PRINCIPAL_NAME_LEN {
        return Err(format!("bad principal key name length {name_len}"));
    }
    let name = std::str::from_utf8(&b[h::NAME..h::NAME + name_len])
        .map_err(|_| "principal key name is not UTF-8".to_string())?;
    let check_len = u16::from_le_bytes(get(b, h::CHECK_LEN)) as usize;
    if check_len != CHECK_LEN {
        return Err(format!("bad check blob length {check_len}"));
    }
    Ok(KeyMapHeader {
        db_oid: get_u32(b, h::DB_OID),
        principal: PrincipalRef {
            name: name.to_string(),
            provider_id: i32::from_le_bytes(get(b, h::PROVIDER_ID)),
            created_unix_secs: i64::from_le_bytes(get(b, h::CREATED)),
        },
        check: b[h::CHECK..h::CHECK + CHECK_LEN].to_vec(),
    })
}

/// Parse a header produced by [`header_to_bytes`] ([`TdeError::Corrupt`] if damaged).
pub fn header_from_bytes(bytes: &[u8]) -> Result<KeyMapHeader> {
    parse_header(bytes).map_err(|m| TdeError::Corrupt(format!("key map header: {m}")))
}

fn validate_entry(entry: &KeyMapEntry) -> Result<()> {
    let expect = wrapped_len(entry.cipher);
    if entry.wrapped.len() != expect {
        return Err(TdeError::Invalid(format!(
            "wrapped {} key must be {expect} bytes, got {}",
            entry.cipher,
            entry.wrapped.len()
        )));
    }
    Ok(())
}

/// Serialize an in-use record (256 bytes, CRC included).
///
/// # Panics
/// If `entry.wrapped` does not have the length of a wrapped key of `entry.cipher`
/// (entries made by [`KeyMapEntry::seal`] or parsed from a file always do). The file
/// functions check this first and return [`TdeError::Invalid`] instead.
pub fn entry_to_bytes(entry: &KeyMapEntry) -> [u8; ENTRY_SIZE] {
    if let Err(e) = validate_entry(entry) {
        panic!("entry_to_bytes: {e}");
    }
    let expect = entry.wrapped.len();
    let mut b = [0u8; ENTRY_SIZE];
    put(&mut b, e::STATE, &STATE_IN_USE.to_le_bytes());
    put(&mut b, e::SPC_OID, &entry.spc_oid.to_le_bytes());
    put(&mut b, e::REL_NUMBER, &entry.rel_number.to_le_bytes());
    put(&mut b, e::CIPHER, &entry.cipher.as_u32().to_le_bytes());
    put(&mut b, e::WRAPPED_LEN, &(expect as u32).to_le_bytes());
    put(&mut b, e::WRAPPED, &entry.wrapped);
    seal_record(&mut b);
    b
}

fn seal_record(b: &mut [u8; ENTRY_SIZE]) {
    let crc = crc32c::crc32c(&b[..e::CRC]);
    put(b, e::CRC, &crc.to_le_bytes());
}

fn free_record() -> [u8; ENTRY_SIZE] {
    let mut b = [0u8; ENTRY_SIZE];
    put(&mut b, e::STATE, &STATE_FREE.to_le_bytes());
    seal_record(&mut b);
    b
}

/// Parse one record: `Ok(None)` for a free slot.
fn parse_record(b: &[u8]) -> std::result::Result<Option<KeyMapEntry>, String> {
    if b.len() != ENTRY_SIZE {
        return Err(format!("record is {} bytes, expected {ENTRY_SIZE}", b.len()));
    }
    if b.iter().all(|&x| x == 0) {
        return Ok(None);
    }
    let stored = get_u32(b, e::CRC);
    let computed = crc32c::crc32c(&b[..e::CRC]);
    if stored != computed {
        return Err(format!("record CRC mismatch (stored {stored:08x}, computed {computed:08x})"));
    }
    match get_u32(b, e::STATE) {
        STATE_FREE => return Ok(None),
        STATE_IN_USE => {}
        s => return Err(format!("bad record state {s}")),
    }
    let cipher_id = get_u32(b, e::CIPHER);
    let cipher = Cipher::from_u32(cipher_id).ok_or_else(|| format!("unknown cipher id {cipher_id}"))?;
    let len = get_u32(b, e::WRAPPED_LEN) as usize;
    if len != wrapped_len(cipher) {
        return Err(format!("wrapped key length {len} does not match cipher {cipher}"));
    }
    Ok(Some(KeyMapEntry {
        spc_oid: get_u32(b, e::SPC_OID),
        rel_number: get_u32(b, e::REL_NUMBER),
        cipher,
        wrapped: b[e::WRAPPED..e::WRAPPED + len].to_vec(),
    }))
}

/// Parse an in-use record produced by [`entry_to_bytes`] ([`TdeError::Corrupt`] if damaged
/// or if it is a free slot).
pub fn entry_from_bytes(bytes: &[u8]) -> Result<KeyMapEntry> {
    match parse_record(bytes) {
        Ok(Some(entry)) => Ok(entry),
        Ok(None) => Err(TdeError::Corrupt("key map record is a free slot".into())),
        Err(m) => Err(TdeError::Corrupt(format!("key map record: {m}"))),
    }
}

// ---------------------------------------------------------------------------------------
// Files

fn corrupt(path: &Path, msg: impl std::fmt::Display) -> TdeError {
    TdeError::Corrupt(format!("key map file \"{}\": {msg}", path.display()))
}

/// Parse a whole file: the header, and one `Option<KeyMapEntry>` per slot (`None` = free).
fn parse_file(path: &Path, data: &[u8]) -> Result<(KeyMapHeader, Vec<Option<KeyMapEntry>>)> {
    let (header, lenient) = parse_slots_lenient(path, data)?;
    let records = (data.len() - HEADER_SIZE) / ENTRY_SIZE;
    let mut seen = HashSet::with_capacity(lenient.len());
    let mut slots = Vec::with_capacity(lenient.len());
    for slot in lenient {
        match slot {
            Slot::Damaged(d) if d.slot == records => return Err(corrupt(path, d.reason)),
            Slot::Damaged(d) => return Err(corrupt(path, format_args!("slot {}: {}", d.slot, d.reason))),
            Slot::Free => slots.push(None),
            Slot::Entry(entry) => {
                if !seen.insert((entry.spc_oid, entry.rel_number)) {
                    return Err(corrupt(
                        path,
                        format_args!(
                            "slot {}: second entry for relation file {}/{}",
                            slots.len(),
                            entry.spc_oid,
                            entry.rel_number
                        ),
                    ));
                }
                slots.push(Some(entry));
            }
        }
    }
    Ok((header, slots))
}

fn not_found_or_io(path: &Path, what: &str, e: std::io::Error) -> TdeError {
    if e.kind() == ErrorKind::NotFound {
        TdeError::NotFound(format!("key map file \"{}\"", path.display()))
    } else {
        TdeError::io(format!("could not {what} key map file \"{}\"", path.display()), e)
    }
}

/// Create a key map with `header` and no entries. Fails with [`TdeError::Invalid`] if
/// the file exists.
pub fn create(path: &Path, header: &KeyMapHeader) -> Result<()> {
    validate_header(header)?;
    let bytes = header_to_bytes(header);
    fsutil::create_atomic(path, &bytes, FILE_MODE)
}

/// Create a key map with `header` and no entries, replacing any existing file.
pub fn create_or_replace(path: &Path, header: &KeyMapHeader) -> Result<()> {
    validate_header(header)?;
    let bytes = header_to_bytes(header);
    fsutil::replace_atomic(path, &bytes, FILE_MODE)
}

/// Read a key map: its header and its in-use entries, in slot order.
///
/// [`TdeError::NotFound`] if the file does not exist; [`TdeError::Corrupt`] (naming the
/// path and slot) for a bad magic, version, CRC or record.
pub fn read(path: &Path) -> Result<(KeyMapHeader, Vec<KeyMapEntry>)> {
    let data = std::fs::read(path).map_err(|e| not_found_or_io(path, "read", e))?;
    let (header, slots) = parse_file(path, &data)?;
    Ok((header, slots.into_iter().flatten().collect()))
}

/// A record that failed its checks, with the relation file it claims to be for
/// (read from the damaged bytes, so possibly wrong).
#[derive(Debug, Clone)]
pub struct DamagedSlot {
    pub slot: usize,
    pub spc_oid: u32,
    pub rel_number: u32,
    /// The record's state and cipher fields are valid, so its relation fields
    /// are probably intact too (the damage is elsewhere in the record).
    pub plausible_identity: bool,
    pub reason: String,
}

/// One slot of a key map as read leniently.
#[derive(Debug)]
enum Slot {
    Free,
    Entry(KeyMapEntry),
    Damaged(DamagedSlot),
}

/// A key map read for lookups: damaged records are set aside instead of
/// failing the whole file, so that one bad record does not make every other
/// relation of the database unreadable.  Callers decide what a lookup that
/// misses means while records are damaged.
#[derive(Debug)]
pub struct KeyMapView {
    pub header: KeyMapHeader,
    pub entries: Vec<KeyMapEntry>,
    pub damaged: Vec<DamagedSlot>,
}

/// Parse a file, keeping damaged records as [`Slot::Damaged`].  A bad header is
/// still an error; a truncated last record counts as a damaged slot.
fn parse_slots_lenient(path: &Path, data: &[u8]) -> Result<(KeyMapHeader, Vec<Slot>)> {
    if data.len() < HEADER_SIZE {
        return Err(corrupt(
            path,
            format_args!("file is {} bytes, shorter than its {HEADER_SIZE}-byte header", data.len()),
        ));
    }
    let (head, body) = data.split_at(HEADER_SIZE);
    let header = parse_header(head).map_err(|m| corrupt(path, format_args!("header: {m}")))?;
    let (records, tail) = body.as_chunks::<ENTRY_SIZE>();
    let mut slots = Vec::with_capacity(records.len() + 1);
    for (i, rec) in records.iter().enumerate() {
        slots.push(match parse_record(rec) {
            Ok(Some(e)) => Slot::Entry(e),
            Ok(None) => Slot::Free,
            Err(reason) => Slot::Damaged(DamagedSlot {
                slot: i,
                spc_oid: get_u32(rec, e::SPC_OID),
                rel_number: get_u32(rec, e::REL_NUMBER),
                plausible_identity: get_u32(rec, e::STATE) == STATE_IN_USE
                    && Cipher::from_u32(get_u32(rec, e::CIPHER)).is_some(),
                reason,
            }),
        });
    }
    if !tail.is_empty() {
        slots.push(Slot::Damaged(DamagedSlot {
            slot: records.len(),
            spc_oid: 0,
            rel_number: 0,
            plausible_identity: false,
            reason: format!("{} trailing bytes after slot {} (truncated record)", tail.len(), records.len()),
        }));
    }
    Ok((header, slots))
}

/// Read a key map for lookups (see [`KeyMapView`]).  A bad header or a missing
/// file are still errors.
pub fn read_for_lookup(path: &Path) -> Result<KeyMapView> {
    let data = std::fs::read(path).map_err(|e| not_found_or_io(path, "read", e))?;
    let (header, slots) = parse_slots_lenient(path, &data)?;
    let mut entries = Vec::with_capacity(slots.len());
    let mut damaged = Vec::new();
    for slot in slots {
        match slot {
            Slot::Entry(e) => entries.push(e),
            Slot::Damaged(d) => damaged.push(d),
            Slot::Free => {}
        }
    }
    Ok(KeyMapView { header, entries, damaged })
}

/// Open an existing key map for update and take an exclusive lock on it; return the
/// file and its slots.  Damaged slots are kept (and never overwritten by new entries),
/// so that the rest of the map stays usable.
fn open_locked(path: &Path) -> Result<(File, Vec<Slot>)> {
    let file = OpenOptions::new().read(true).write(true).open(path).map_err(|e| not_found_or_io(path, "open", e))?;
    file.lock().map_err(|e| not_found_or_io(path, "lock", e))?;
    let mut data = Vec::new();
    (&file).read_to_end(&mut data).map_err(|e| not_found_or_io(path, "read", e))?;
    let (_, slots) = parse_slots_lenient(path, &data)?;
    Ok((file, slots))
}

fn write_slot(file: &File, path: &Path, slot: usize, record: &[u8; ENTRY_SIZE]) -> Result<()> {
    let offset = (HEADER_SIZE + slot * ENTRY_SIZE) as u64;
    file.write_all_at(record, offset)
        .and_then(|_| file.sync_all())
        .map_err(|e| TdeError::io(format!("could not write slot {slot} of key map file \"{}\"", path.display()), e))
}

/// Store `entry`: overwrite the in-use record of the same relation file if there is one,
/// else reuse the first free slot, else append. Writes one record (pwrite + fsync).
/// Idempotent, so it can be replayed from WAL.
pub fn put_entry(path: &Path, entry: &KeyMapEntry) -> Result<()> {
    validate_entry(entry)?;
    let record = entry_to_bytes(entry);
    let (file, slots) = open_locked(path)?;
    let slot = slots
        .iter()
        .position(|s| matches!(s, Slot::Entry(e) if e.same_relation(entry.spc_oid, entry.rel_number)))
        .or_else(|| slots.iter().position(|s| matches!(s, Slot::Free)))
        .unwrap_or(slots.len());
    write_slot(&file, path, slot, &record)
}

/// Mark the entry of relation file `spc_oid`/`rel_number` free. Returns whether there was one.
pub fn remove_entry(path: &Path, spc_oid: u32, rel_number: u32) -> Result<bool> {
    let (file, slots) = open_locked(path)?;
    // A damaged record that names this relation file is freed too: the file is
    // going away, and with it the only use of that record.
    let found = slots.iter().position(|s| match s {
        Slot::Entry(e) => e.same_relation(spc_oid, rel_number),
        Slot::Damaged(d) => d.spc_oid == spc_oid && d.rel_number == rel_number,
        Slot::Free => false,
    });
    match found {
        Some(slot) => write_slot(&file, path, slot, &free_record()).map(|_| true),
        None => Ok(false),
    }
}

/// Atomically replace the whole file with `header` and `entries` (used when the principal
/// key is rotated: every entry is re-wrapped and the file swapped in one rename).
pub fn rewrite(path: &Path, header: &KeyMapHeader, entries: &[KeyMapEntry]) -> Result<()> {
    validate_header(header)?;
    let mut buf = Vec::with_capacity(HEADER_SIZE + entries.len() * ENTRY_SIZE);
    buf.extend_from_slice(&header_to_bytes(header));
    let mut seen = HashSet::with_capacity(entries.len());
    for entry in entries {
        validate_entry(entry)?;
        if !seen.insert((entry.spc_oid, entry.rel_number)) {
            return Err(TdeError::Invalid(format!(
                "two entries for relation file {}/{}",
                entry.spc_oid, entry.rel_number
            )));
        }
        buf.extend_from_slice(&entry_to_bytes(entry));
    }
    fsutil::replace_atomic(path, &buf, FILE_MODE)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::random_bytes;
    use std::fs;
    use std::os::unix::fs::PermissionsExt;
    use std::path::PathBuf;

    const DB: u32 = 16384;

    fn principal() -> PrincipalRef {
        PrincipalRef { name: "db-key-1".into(), provider_id: 3, created_unix_secs: 1_763_800_000 }
    }

    fn setup() -> (tempfile::TempDir, PathBuf, Vec<u8>, KeyMapHeader) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(format!("{DB}_keys"));
        let pk = random_bytes(32);
        let header = KeyMapHeader::new(DB, principal(), &pk).unwrap();
        create(&path, &header).unwrap();
        (dir, path, pk, header)
    }

    fn entry(rel: u32, cipher: Cipher, pk: &[u8]) -> (KeyMapEntry, RelKey) {
        let key = RelKey::generate(cipher).unwrap();
        (KeyMapEntry::seal(DB, 1663, rel, &key, pk).unwrap(), key)
    }

    fn file_len(path: &Path) -> usize {
        fs::metadata(path).unwrap().len() as usize
    }

    #[test]
    fn create_and_read_round_trip() {
        let (_dir, path, pk, header) = setup();
        let (h2, entries) = read(&path).unwrap();
        assert_eq!(h2, header);
        assert_eq!(h2.principal, principal());
        assert!(entries.is_empty());
        h2.verify_principal(&pk).unwrap();
        assert_eq!(file_len(&path), HEADER_SIZE);
        let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert!(!fsutil::tmp_path(&path).exists());
    }

    #[test]
    fn create_refuses_existing_file_and_read_reports_missing() {
        let (dir, path, _pk, header) = setup();
        assert!(matches!(create(&path, &header), Err(TdeError::Invalid(_))));
        create_or_replace(&path, &header).unwrap();
        let missing = dir.path().join("1_keys");
        assert!(matches!(read(&missing), Err(TdeError::NotFound(_))));
        assert!(matches!(
            put_entry(&missing, &entry(1, Cipher::Aes128Xts, &random_bytes(16)).0),
            Err(TdeError::NotFound(_))
        ));
    }

    #[test]
    fn entries_round_trip_for_every_cipher() {
        let (_dir, path, pk, _) = setup();
        let mut keys = Vec::new();
        for (i, cipher) in Cipher::ALL.into_iter().enumerate() {
            let (e, k) = entry(100 + i as u32, cipher, &pk);
            put_entry(&path, &e).unwrap();
            keys.push((e, k));
        }
        let (_, entries) = read(&path).unwrap();
        let n = Cipher::ALL.len();
        assert_eq!(entries.len(), n);
        for ((e, k), got) in keys.iter().zip(&entries) {
            assert_eq!(got, e);
            assert_eq!(&got.open(DB, &pk).unwrap(), k);
        }
        assert_eq!(file_len(&path), HEADER_SIZE + n * ENTRY_SIZE);
    }

    #[test]
    fn put_remove_put_reuses_slots() {
        let (_dir, path, pk, _) = setup();
        let (a, _) = entry(1, Cipher::Aes128Xts, &pk);
        let (b, _) = entry(2, Cipher::Aes256Xts, &pk);
        let (c, _) = entry(3, Cipher::Aes128Cbc, &pk);
        for x in [&a, &b, &c] {
            put_entry(&path, x).unwrap();
        }
        assert_eq!(file_len(&path), HEADER_SIZE + 3 * ENTRY_SIZE);
        assert!(remove_entry(&path, 1663, 2).unwrap());
        assert!(!remove_entry(&path, 1663, 2).unwrap());
        assert!(!remove_entry(&path, 1664, 1).unwrap());
        assert_eq!(read(&path).unwrap().1, vec![a.clone(), c.clone()]);

        let (d, dk) = entry(4, Cipher::Aes256Cbc, &pk);
        put_entry(&path, &d).unwrap();
        // d went into b's old slot: no growth, slot order a, d, c
        assert_eq!(file_len(&path), HEADER_SIZE + 3 * ENTRY_SIZE);
        let (_, entries) = read(&path).unwrap();
        assert_eq!(entries, vec![a, d.clone(), c]);
        assert_eq!(entries[1].open(DB, &pk).unwrap(), dk);
        let raw = fs::read(&path).unwrap();
        let slot1 = &raw[HEADER_SIZE + ENTRY_SIZE..HEADER_SIZE + 2 * ENTRY_SIZE];
        assert_eq!(entry_from_bytes(slot1).unwrap(), d);
    }

    #[test]
    fn put_same_relation_twice_overwrites() {
        let (_dir, path, pk, _) = setup();
        let (first, _) = entry(7, Cipher::Aes128Xts, &pk);
        let (second, k2) = entry(7, Cipher::Aes256Xts, &pk);
        put_entry(&path, &first).unwrap();
        put_entry(&path, &second).unwrap();
        put_entry(&path, &second).unwrap(); // replay: idempotent
        assert_eq!(file_len(&path), HEADER_SIZE + ENTRY_SIZE);
        let (_, entries) = read(&path).unwrap();
        assert_eq!(entries, vec![second]);
        assert_eq!(entries[0].open(DB, &pk).unwrap(), k2);
    }

    #[test]
    fn lookup_read_sets_damaged_records_aside() {
        let (_dir, path, pk, _) = setup();
        for rel in 1..=3 {
            put_entry(&path, &entry(rel, Cipher::Aes128Xts, &pk).0).unwrap();
        }
        let mut raw = fs::read(&path).unwrap();
        raw[HEADER_SIZE + ENTRY_SIZE + e::WRAPPED + 5] ^= 0x10;
        fs::write(&path, &raw).unwrap();
        let view = read_for_lookup(&path).unwrap();
        let good: Vec<u32> = view.entries.iter().map(|e| e.rel_number).collect();
        assert_eq!(good, vec![1, 3]);
        assert_eq!(view.damaged.len(), 1);
        assert_eq!((view.damaged[0].slot, view.damaged[0].rel_number), (1, 2));
        assert!(view.damaged[0].reason.contains("CRC"), "{}", view.damaged[0].reason);
        // the strict reader still refuses the file
        assert!(matches!(read(&path), Err(TdeError::Corrupt(_))));
    }

    #[test]
    fn record_crc_corruption_is_detected() {
        let (_dir, path, pk, _) = setup();
        for rel in 1..=3 {
            put_entry(&path, &entry(rel, Cipher::Aes128Xts, &pk).0).unwrap();
        }
        let mut raw = fs::read(&path).unwrap();
        raw[HEADER_SIZE + ENTRY_SIZE + e::WRAPPED + 5] ^= 0x10;
        fs::write(&path, &raw).unwrap();
        match read(&path) {
            Err(TdeError::Corrupt(m)) => {
                assert!(m.contains("slot 1"), "{m}");
                assert!(m.contains(&path.display().to_string()), "{m}");
                assert!(m.contains("CRC"), "{m}");
            }
            other => panic!("expected Corrupt, got {other:?}"),
        }
        // updates keep working around the damaged record and never overwrite it
        put_entry(&path, &entry(9, Cipher::Aes128Xts, &pk).0).unwrap();
        let view = read_for_lookup(&path).unwrap();
        assert_eq!(view.entries.iter().map(|e| e.rel_number).collect::<Vec<_>>(), vec![1, 3, 9]);
        assert_eq!(view.damaged.len(), 1);
        assert!(view.damaged[0].plausible_identity);
        // removing the relation file the damaged record names frees that slot
        assert!(remove_entry(&path, view.damaged[0].spc_oid, 2).unwrap());
        let view = read_for_lookup(&path).unwrap();
        assert!(view.damaged.is_empty());
        assert_eq!(read(&path).unwrap().1.len(), 3);
    }

    #[test]
    fn bad_magic_version_and_header_crc_are_detected() {
        let (_dir, path, _pk, _) = setup();
        let good = fs::read(&path).unwrap();
        for (what, pos, needle) in [
            ("magic", 0usize, "magic"),
            ("version", h::VERSION, "version"),
            ("name", h::NAME + 1, "CRC"),
            ("crc", h::CRC, "CRC"),
        ] {
            let mut bad = good.clone();
            bad[pos] ^= 0x01;
            fs::write(&path, &bad).unwrap();
            match read(&path) {
                Err(TdeError::Corrupt(m)) => assert!(m.contains(needle), "{what}: {m}"),
                other => panic!("{what}: expected Corrupt, got {other:?}"),
            }
        }
        fs::write(&path, &good[..100]).unwrap();
        assert!(matches!(read(&path), Err(TdeError::Corrupt(_))));
    }

    #[test]
    fn zero_filled_tail_is_free_but_partial_record_is_corrupt() {
        let (_dir, path, pk, _) = setup();
        let (a, _) = entry(1, Cipher::Aes128Xts, &pk);
        put_entry(&path, &a).unwrap();
        let mut raw = fs::read(&path).unwrap();
        raw.extend_from_slice(&[0u8; ENTRY_SIZE]);
        fs::write(&path, &raw).unwrap();
        assert_eq!(read(&path).unwrap().1, vec![a.clone()]);
        let (b, _) = entry(2, Cipher::Aes128Xts, &pk);
        put_entry(&path, &b).unwrap();
        assert_eq!(file_len(&path), HEADER_SIZE + 2 * ENTRY_SIZE);
        assert_eq!(read(&path).unwrap().1, vec![a, b]);

        let mut raw = fs::read(&path).unwrap();
        raw.extend_from_slice(&[0u8; 10]);
        fs::write(&path, &raw).unwrap();
        assert!(matches!(read(&path), Err(TdeError::Corrupt(_))));
    }

    #[test]
    fn entry_bound_to_its_relation_database_and_cipher() {
        let pk = random_bytes(16);
        let key = RelKey::generate(Cipher::Aes128Xts).unwrap();
        let e = KeyMapEntry::seal(DB, 1663, 42, &key, &pk).unwrap();
        assert_eq!(e.open(DB, &pk).unwrap(), key);

        let mut moved = e.clone();
        moved.rel_number = 43;
        assert!(matches!(moved.open(DB, &pk), Err(TdeError::Decrypt(_))));
        let mut moved = e.clone();
        moved.spc_oid = 1664;
        assert!(matches!(moved.open(DB, &pk), Err(TdeError::Decrypt(_))));
        // Aes256Cbc has the same key length as Aes128Xts: only the AAD tells them apart
        let mut moved = e.clone();
        moved.cipher = Cipher::Aes256Cbc;
        assert!(matches!(moved.open(DB, &pk), Err(TdeError::Decrypt(_))));
        assert!(matches!(e.open(DB + 1, &pk), Err(TdeError::Decrypt(_))));
        assert!(matches!(e.open(DB, &random_bytes(16)), Err(TdeError::Decrypt(_))));
    }

    #[test]
    fn verify_principal_rejects_wrong_key_and_database() {
        let pk = random_bytes(32);
        let header = KeyMapHeader::new(DB, principal(), &pk).unwrap();
        header.verify_principal(&pk).unwrap();
        assert!(matches!(header.verify_principal(&random_bytes(32)), Err(TdeError::Decrypt(_))));
        assert!(matches!(header.verify_principal(&pk[..16]), Err(TdeError::Decrypt(_))));
        let mut other_db = header.clone();
        other_db.db_oid = DB + 1;
        assert!(matches!(other_db.verify_principal(&pk), Err(TdeError::Decrypt(_))));
        // error messages carry no key bytes
        let msg = header.verify_principal(&random_bytes(32)).unwrap_err().to_string();
        assert!(msg.contains("db-key-1"), "{msg}");
    }

    #[test]
    fn rewrite_rotates_atomically() {
        let (_dir, path, old_pk, _) = setup();
        let mut keys = Vec::new();
        for rel in 1..=5 {
            let (e, k) = entry(rel, Cipher::Aes256Xts, &old_pk);
            put_entry(&path, &e).unwrap();
            keys.push(k);
        }
        remove_entry(&path, 1663, 3).unwrap();

        // rotate: unwrap with the old key, re-wrap with the new one
        let new_pk = random_bytes(16);
        let (_, entries) = read(&path).unwrap();
        let rewrapped: Vec<KeyMapEntry> = entries
            .iter()
            .map(|e| {
                let k = e.open(DB, &old_pk).unwrap();
                KeyMapEntry::seal(DB, e.spc_oid, e.rel_number, &k, &new_pk).unwrap()
            })
            .collect();
        let new_principal = PrincipalRef { name: "db-key-2".into(), provider_id: 4, created_unix_secs: 1_763_900_000 };
        let header = KeyMapHeader::new(DB, new_principal.clone(), &new_pk).unwrap();
        rewrite(&path, &header, &rewrapped).unwrap();

        assert!(!fsutil::tmp_path(&path).exists());
        let (h, entries) = read(&path).unwrap();
        assert_eq!(h.principal, new_principal);
        h.verify_principal(&new_pk).unwrap();
        assert!(matches!(h.verify_principal(&old_pk), Err(TdeError::Decrypt(_))));
        // the free slot was compacted away
        assert_eq!(file_len(&path), HEADER_SIZE + 4 * ENTRY_SIZE);
        let rels: Vec<u32> = entries.iter().map(|e| e.rel_number).collect();
        assert_eq!(rels, vec![1, 2, 4, 5]);
        for e in &entries {
            let k = e.open(DB, &new_pk).unwrap();
            assert_eq!(k, keys[e.rel_number as usize - 1]);
        }
        let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);

        // duplicates are refused and leave the file alone
        let dup = vec![rewrapped[0].clone(), rewrapped[0].clone()];
        assert!(matches!(rewrite(&path, &header, &dup), Err(TdeError::Invalid(_))));
        assert_eq!(read(&path).unwrap().1.len(), 4);
    }

    #[test]
    fn byte_level_round_trips() {
        let pk = random_bytes(16);
        let header = KeyMapHeader::new(DB, principal(), &pk).unwrap();
        let hb = header_to_bytes(&header);
        assert_eq!(&hb[..8], b"PGTDEKM\0");
        assert_eq!(header_from_bytes(&hb).unwrap(), header);
        assert!(matches!(header_from_bytes(&hb[..HEADER_SIZE - 1]), Err(TdeError::Corrupt(_))));

        let (e, _) = entry(5, Cipher::Aes256Xts, &pk);
        let eb = entry_to_bytes(&e);
        assert_eq!(e.wrapped.len(), MAX_WRAPPED_LEN);
        assert_eq!(entry_from_bytes(&eb).unwrap(), e);
        assert!(matches!(entry_from_bytes(&free_record()), Err(TdeError::Corrupt(_))));
        assert!(matches!(entry_from_bytes(&[0u8; ENTRY_SIZE]), Err(TdeError::Corrupt(_))));
        let mut bad = e.clone();
        bad.wrapped.pop();
        assert!(std::panic::catch_unwind(|| entry_to_bytes(&bad)).is_err());
    }

    #[test]
    fn file_functions_reject_invalid_values_without_panicking() {
        let (_dir, path, pk, header) = setup();
        let (mut e, _) = entry(1, Cipher::Aes128Cbc, &pk);
        e.wrapped.push(0);
        assert!(matches!(put_entry(&path, &e), Err(TdeError::Invalid(_))));
        assert!(matches!(rewrite(&path, &header, &[e]), Err(TdeError::Invalid(_))));
        let mut bad_header = header.clone();
        bad_header.principal.name = String::new();
        assert!(matches!(create_or_replace(&path, &bad_header), Err(TdeError::Invalid(_))));
        assert!(matches!(rewrite(&path, &bad_header, &[]), Err(TdeError::Invalid(_))));
        assert_eq!(read(&path).unwrap().0, header);
    }

    #[test]
    fn principal_name_limits() {
        let pk = random_bytes(16);
        let mut p = principal();
        p.name = "k".repeat(MAX_PRINCIPAL_NAME_LEN);
        let header = KeyMapHeader::new(DB, p.clone(), &pk).unwrap();
        assert_eq!(header_from_bytes(&header_to_bytes(&header)).unwrap().principal, p);
        for bad in [String::new(), "k".repeat(256), "a\0b".into()] {
            p.name = bad;
            assert!(matches!(KeyMapHeader::new(DB, p.clone(), &pk), Err(TdeError::Invalid(_))));
        }
        // principal keys must be AES-128 or AES-256 keys
        assert!(matches!(KeyMapHeader::new(DB, principal(), &random_bytes(20)), Err(TdeError::Invalid(_))));
    }
}
