//! `tde-core`: the PostgreSQL-independent core of `pg_tde`.
//!
//! This crate has no pgrx dependency. Its only `unsafe` code is the CPU-feature
//! boundary of the AVX-512 passes around AES (`avx512`: XTS tweaks, CTR counters,
//! chosen at run time and checked against the portable code); everything else
//! denies `unsafe`. It provides:
//!
//! - [`cipher`]: the page ciphers (AES-CBC with ESSIV-like IVs, IEEE 1619 XTS-AES)
//!   and the per-relation internal keys ([`RelKey`], [`PageCipher`]);
//! - [`wrap`]: AES-GCM key wrapping with associated data;
//! - [`keymap`]: the per-database internal key map file `$PGDATA/pg_tde/<dboid>_keys`;
//! - [`provider`]: the key provider trait and the file keyring provider;
//! - [`providers_catalog`]: the cluster's registry of configured key providers
//!   (`$PGDATA/pg_tde/providers.json`);
//! - [`envelope`]: the KMS-wrapped principal keys of wrapping providers
//!   (`$PGDATA/pg_tde/envelopes.json`);
//! - [`secret_buf`]: buffers for key material that are wiped whenever they grow.
//!
//! Every error is a [`TdeError`]; no error message contains key bytes.
#![deny(unsafe_code)]

#[allow(unsafe_code)]
mod avx512;
pub mod cipher;
pub mod envelope;
pub mod error;
mod fsutil;
pub mod keymap;
pub mod provider;
pub mod providers_catalog;
pub mod rekey;
mod rng;
pub mod secret_buf;
#[cfg(test)]
mod testutil;
pub mod wal;
pub mod walkeys;
pub mod wrap;

pub use cipher::{is_all_zero, page_tweak, Cipher, PageCipher, RelKey, PAGE_SIZE};
pub use error::{Result, TdeError};
pub use keymap::{KeyMapEntry, KeyMapHeader, PrincipalRef};
pub use provider::{parse_file_options, FileKeyring, KeyProvider, PrincipalKey, ProviderKind};
pub use providers_catalog::{open_provider, ProviderCatalog, ProviderRecord};
