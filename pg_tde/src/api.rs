//! SQL functions (SPEC §6), names and shapes compatible with Percona pg_tde.
//!
//! Management functions are revoked from PUBLIC (see the SQL at the end).
//! Provider and global-scope functions additionally require a key administrator
//! (a superuser or a member of `tde_key_admin`).

use std::time::{SystemTime, UNIX_EPOCH};

use pgrx::prelude::*;
use pgrx::{Json, PgSqlErrorCode};
use tde_core::keymap::PrincipalRef;
use tde_core::provider::{KeyProvider, PrincipalKey, ProviderKind};
use tde_core::providers_catalog::{open_provider, validate_options, ProviderCatalog, ProviderRecord};

use crate::audit::AuditEvent;
use crate::errors::{raise, raise_with, OrRaise};
use crate::gucs;
use crate::keys::{self, FileId};

const MAX_NAME_LEN: usize = 255;

fn my_database() -> u32 {
    // SAFETY: plain read of a backend-global set at connection start.
    unsafe { (&raw const pg_sys::MyDatabaseId).read() }.to_u32()
}

/// The role whose members may manage key providers, global keys, the default
/// key and the server key (granted by pg_tde_grant_global_key_management_to_role).
const KEY_ADMIN_ROLE: &std::ffi::CStr = c"tde_key_admin";

/// Providers, global keys, the default key and the server key may be managed
/// only by superusers and members of `tde_key_admin`: a bare GRANT EXECUTE
/// is not enough.
pub fn require_key_admin(what: &str) {
    // SAFETY: catalog lookups on the current user and a role name; no
    // pointers are kept.
    let allowed = unsafe {
        pg_sys::superuser() || {
            let role = pg_sys::get_role_oid(KEY_ADMIN_ROLE.as_ptr(), true);
            role != pg_sys::InvalidOid && pg_sys::has_privs_of_role(pg_sys::GetUserId(), role)
        }
    };
    if !allowed {
        raise_with(
            PgSqlErrorCode::ERRCODE_INSUFFICIENT_PRIVILEGE,
            &format!("permission denied to {what}"),
            Some("Only superusers and roles given pg_tde_grant_global_key_management_to_role() may do this."),
        );
    }
}

/// A required text argument: not NULL, not empty, at most 255 bytes.
fn required_name<'a>(value: Option<&'a str>, what: &str) -> &'a str {
    match value {
        None => raise_with(PgSqlErrorCode::ERRCODE_NULL_VALUE_NOT_ALLOWED, &format!("{what} cannot be NULL"), None),
        Some("") => {
            raise_with(PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE, &format!("{what} cannot be empty"), None)
        }
        Some(v) if v.len() > MAX_NAME_LEN => raise_with(
            PgSqlErrorCode::ERRCODE_NAME_TOO_LONG,
            &format!("{what} is too long"),
            Some(&format!("At most {MAX_NAME_LEN} bytes are allowed.")),
        ),
        Some(v) => v,
    }
}

fn scope_db(global: bool) -> u32 {
    if global {
        0
    } else {
        my_database()
    }
}

fn scope_word(global: bool) -> &'static str {
    if global {
        "global"
    } else {
        "database"
    }
}

// ---------------------------------------------------------------------------
// Providers

/// Validate a provider type and its options (a flat JSON object).
fn provider_kind_and_options(provider_type: Option<&str>, options: Option<Json>) -> (ProviderKind, serde_json::Value) {
    let provider_type = required_name(provider_type, "provider type");
    let Some(Json(options)) = options else {
        raise_with(PgSqlErrorCode::ERRCODE_NULL_VALUE_NOT_ALLOWED, "provider options cannot be NULL", None)
    };
    let Some(kind) = ProviderKind::from_type_name(provider_type) else {
        raise_with(
            PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
            &format!("unknown key provider type \"{provider_type}\""),
            Some("Valid types are \"file\", \"vault-v2\", \"kmip\", \"vault-transit\", \"kmip-wrap\" and \"command\"."),
        )
    };
    if !options.is_object() {
        raise_with(PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE, "provider options must be a JSON object", None);
    }
    validate_options(kind, &options).or_raise();
    check_server_files(kind, &options);
    (kind, options)
}

/// What a provider's options may reach on the server, checked before the
/// provider is opened (which reads those files, and creates a keyring):
///
/// - naming a server file takes the rights `COPY` takes: superuser, or
///   `pg_read_server_files` for the files a provider reads and
///   `pg_write_server_files` for a keyring file, which it creates and writes;
/// - a keyring file is never inside the data directory, for anyone: the
///   server's own files must not be overwritten or created through a key
///   provider (`standby.signal`, `postgresql.auto.conf`, pg_tde's key maps),
///   and a keyring there would be copied with every base backup;
/// - a Vault URL is `https://` unless a superuser allowed `http://`
///   (`pg_tde.vault_allow_http`), as the token is sent with every request.
fn check_server_files(kind: ProviderKind, options: &serde_json::Value) {
    let files = tde_core::providers_catalog::server_files(kind, options).or_raise();
    // SAFETY: plain catalog lookups on the current user.
    let superuser = unsafe { pg_sys::superuser() };
    let data_dir = std::env::current_dir().ok().map(|d| tde_core::providers_catalog::resolve_path(&d));
    for (option, path, access) in files {
        use tde_core::providers_catalog::FileAccess;
        let write = access == FileAccess::Write;
        if !superuser {
            let (role, role_name, verb) = match access {
                FileAccess::Write => (pg_sys::ROLE_PG_WRITE_SERVER_FILES, "pg_write_server_files", "create and write"),
                FileAccess::Read => (pg_sys::ROLE_PG_READ_SERVER_FILES, "pg_read_server_files", "read"),
                FileAccess::Execute => (pg_sys::ROLE_PG_EXECUTE_SERVER_PROGRAM, "pg_execute_server_program", "run"),
            };
            // SAFETY: a catalog lookup on the current user and a built-in role.
            let allowed = unsafe { pg_sys::has_privs_of_role(pg_sys::GetUserId(), pg_sys::Oid::from(role)) };
            if !allowed {
                raise_with(
                    PgSqlErrorCode::ERRCODE_INSUFFICIENT_PRIVILEGE,
                    &format!("permission denied to name a server file in option \"{option}\""),
                    Some(&format!(
                        "Only superusers and members of {role_name} may make the server {verb} its files, as with COPY."
                    )),
                );
            }
        }
        if write {
            let resolved = tde_core::providers_catalog::resolve_path(&path);
            if data_dir.as_ref().is_some_and(|d| resolved.starts_with(d)) {
                raise_with(
                    PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
                    &format!("keyring file \"{}\" is inside the data directory", path.display()),
                    Some("Keep keyring files outside the data directory: the server's own files must not be written through a key provider, and base backups would copy the keys with the data."),
                );
            }
        }
    }
    if matches!(kind, ProviderKind::VaultV2 | ProviderKind::VaultTransit)
        && tde_core::providers_catalog::vault_uses_plain_http(options)
        && !crate::gucs::VAULT_ALLOW_HTTP.get()
    {
        raise_with(
            PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
            "Vault key providers must use https://",
            Some("http:// sends the Vault token in clear. For a local test server only, a superuser may set pg_tde.vault_allow_http = on."),
        );
    }
}

/// Open a provider with the given settings and check that it is usable.
fn reach_provider(
    id: i32,
    name: &str,
    kind: ProviderKind,
    options: &serde_json::Value,
    db: u32,
) -> Box<dyn KeyProvider> {
    let probe = ProviderRecord { id, name: name.to_string(), kind, options: options.clone(), db_oid: db };
    let provider = open_provider(&probe).or_raise();
    crate::provider_call::cancellable(move || provider.check().map(|_| provider)).or_raise()
}

fn add_provider(provider_type: Option<&str>, name: Option<&str>, options: Option<Json>, global: bool) {
    require_key_admin("add a key provider");
    let name = required_name(name, "provider name");
    let (kind, options) = provider_kind_and_options(provider_type, options);
    let db = scope_db(global);
    let duplicate = |catalog: &ProviderCatalog| {
        if catalog.providers.iter().any(|p| p.db_oid == db && p.name == name) {
            raise_with(
                PgSqlErrorCode::ERRCODE_DUPLICATE_OBJECT,
                &format!("{} key provider \"{name}\" already exists", scope_word(global)),
                None,
            );
        }
    };
    duplicate(&ProviderCatalog::load(&keys::providers_path()).or_raise());
    // The provider is contacted before the key-file lock is taken: a slow or
    // stalled provider must not hold up key creation, unlinks and replay.
    reach_provider(0, name, kind, &options, db);
    let id = keys::with_key_files_lock(|| {
        let mut catalog = ProviderCatalog::load(&keys::providers_path()).or_raise();
        duplicate(&catalog);
        let id = catalog.add(name, kind, options, db).or_raise();
        keys::save_providers(&catalog).or_raise();
        id
    });
    crate::audit::record(AuditEvent::new("provider_added").provider(id, name));
}

fn change_provider(provider_type: Option<&str>, name: Option<&str>, options: Option<Json>, global: bool) {
    require_key_admin("change a key provider");
    let name = required_name(name, "provider name");
    let (kind, options) = provider_kind_and_options(provider_type, options);
    let db = scope_db(global);
    let find = |catalog: &ProviderCatalog| {
        let Some(id) = catalog.providers.iter().find(|p| p.db_oid == db && p.name == name).map(|p| p.id) else {
            raise_with(
                PgSqlErrorCode::ERRCODE_UNDEFINED_OBJECT,
                &format!("{} key provider \"{name}\" does not exist", scope_word(global)),
                None,
            )
        };
        id
    };
    let id = find(&ProviderCatalog::load(&keys::providers_path()).or_raise());
    // The provider is contacted before the key-file lock is taken (see
    // add_provider); under the lock, nothing it was checked for may have changed.
    let provider = reach_provider(id, name, kind, &options, db);
    // Every principal key in use through this provider must be reachable
    // with the new settings and identical to the key in use.
    let checked = keys::headers_using_provider(id).or_raise();
    for (_, header) in &checked {
        let key = match provider.get_key(&header.principal.name).or_raise() {
            Some(k) => k,
            None => raise_with(
                PgSqlErrorCode::ERRCODE_OBJECT_IN_USE,
                &format!(
                    "principal key \"{}\" is in use but cannot be found with the new settings of key provider \"{name}\"",
                    header.principal.name
                ),
                None,
            ),
        };
        if header.verify_principal(&key.key).is_err() {
            raise_with(
                PgSqlErrorCode::ERRCODE_OBJECT_IN_USE,
                &format!(
                    "principal key \"{}\" differs in the provider reached with the new settings of \"{name}\"",
                    header.principal.name
                ),
                None,
            );
        }
    }
    keys::with_key_files_lock(|| {
        let mut catalog = ProviderCatalog::load(&keys::providers_path()).or_raise();
        if find(&catalog) != id || keys::headers_using_provider(id).or_raise() != checked {
            raise_with(
                PgSqlErrorCode::ERRCODE_T_R_SERIALIZATION_FAILURE,
                &format!("key provider \"{name}\" or the keys it holds changed while it was being checked"),
                Some("Retry the change."),
            );
        }
        catalog.change(id, kind, options).or_raise();
        keys::save_providers(&catalog).or_raise();
    });
    crate::audit::record(AuditEvent::new("provider_changed").provider(id, name));
}

fn delete_provider(name: Option<&str>, global: bool) {
    require_key_admin("delete a key provider");
    let name = required_name(name, "provider name");
    let db = scope_db(global);
    let id = keys::with_key_files_lock(|| {
        let mut catalog = ProviderCatalog::load(&keys::providers_path()).or_raise();
        let Some(id) = catalog.providers.iter().find(|p| p.db_oid == db && p.name == name).map(|p| p.id) else {
            raise_with(
                PgSqlErrorCode::ERRCODE_UNDEFINED_OBJECT,
                &format!("{} key provider \"{name}\" does not exist", scope_word(global)),
                None,
            )
        };
        if let Some((_, h)) = keys::headers_using_provider(id).or_raise().first() {
            raise_with(
                PgSqlErrorCode::ERRCODE_OBJECT_IN_USE,
                &format!("key provider \"{name}\" is in use"),
                Some(&format!("Principal key \"{}\" comes from it.", h.principal.name)),
            );
        }
        catalog.remove(id);
        keys::save_providers(&catalog).or_raise();
        id
    });
    // Its envelopes can never be opened again: provider ids are not reused.
    keys::remove_provider_envelopes(id).or_raise();
    crate::audit::record(AuditEvent::new("provider_deleted").provider(id, name));
}

#[pg_extern(name = "pg_tde_add_database_key_provider")]
fn add_database_key_provider(provider_type: Option<&str>, provider_name: Option<&str>, options: Option<Json>) {
    add_provider(provider_type, provider_name, options, false)
}

#[pg_extern(name = "pg_tde_add_global_key_provider")]
fn add_global_key_provider(provider_type: Option<&str>, provider_name: Option<&str>, options: Option<Json>) {
    add_provider(provider_type, provider_name, options, true)
}

#[pg_extern(name = "pg_tde_change_database_key_provider")]
fn change_database_key_provider(provider_type: Option<&str>, provider_name: Option<&str>, options: Option<Json>) {
    change_provider(provider_type, provider_name, options, false)
}

#[pg_extern(name = "pg_tde_change_global_key_provider")]
fn change_global_key_provider(provider_type: Option<&str>, provider_name: Option<&str>, options: Option<Json>) {
    change_provider(provider_type, provider_name, options, true)
}

#[pg_extern(name = "pg_tde_delete_database_key_provider")]
fn delete_database_key_provider(provider_name: Option<&str>) {
    delete_provider(provider_name, false)
}

#[pg_extern(name = "pg_tde_delete_global_key_provider")]
fn delete_global_key_provider(provider_name: Option<&str>) {
    delete_provider(provider_name, true)
}

// Typed wrappers: the options objects they build are those of the generic functions.

fn file_options(path: Option<&str>) -> Json {
    let path = required_name(path, "file path");
    Json(serde_json::json!({ "path": path }))
}

fn vault_options(
    url: Option<&str>,
    mount_path: Option<&str>,
    token_path: Option<&str>,
    ca_path: Option<&str>,
    namespace: Option<&str>,
) -> Json {
    let mut o = serde_json::json!({
        "url": required_name(url, "url"),
        "mountPath": required_name(mount_path, "mount path"),
        "tokenPath": required_name(token_path, "token path"),
    });
    if let Some(ca) = ca_path {
        o["caPath"] = ca.into();
    }
    if let Some(ns) = namespace {
        o["namespace"] = ns.into();
    }
    Json(o)
}

fn kmip_options(
    host: Option<&str>,
    port: Option<i32>,
    cert_path: Option<&str>,
    key_path: Option<&str>,
    ca_path: Option<&str>,
) -> Json {
    let Some(port) = port else {
        raise_with(PgSqlErrorCode::ERRCODE_NULL_VALUE_NOT_ALLOWED, "port cannot be NULL", None)
    };
    Json(serde_json::json!({
        "host": required_name(host, "host"),
        "port": port,
        "certPath": required_name(cert_path, "certificate path"),
        "keyPath": required_name(key_path, "key path"),
        "caPath": required_name(ca_path, "CA path"),
    }))
}

#[pg_extern(name = "pg_tde_add_database_key_provider_file")]
fn add_database_key_provider_file(provider_name: Option<&str>, file_path: Option<&str>) {
    add_provider(Some("file"), provider_name, Some(file_options(file_path)), false)
}

#[pg_extern(name = "pg_tde_add_global_key_provider_file")]
fn add_global_key_provider_file(provider_name: Option<&str>, file_path: Option<&str>) {
    add_provider(Some("file"), provider_name, Some(file_options(file_path)), true)
}

#[pg_extern(name = "pg_tde_change_database_key_provider_file")]
fn change_database_key_provider_file(provider_name: Option<&str>, file_path: Option<&str>) {
    change_provider(Some("file"), provider_name, Some(file_options(file_path)), false)
}

#[pg_extern(name = "pg_tde_change_global_key_provider_file")]
fn change_global_key_provider_file(provider_name: Option<&str>, file_path: Option<&str>) {
    change_provider(Some("file"), provider_name, Some(file_options(file_path)), true)
}

#[pg_extern(name = "pg_tde_add_database_key_provider_vault_v2")]
fn add_database_key_provider_vault_v2(
    provider_name: Option<&str>,
    url: Option<&str>,
    mount_path: Option<&str>,
    token_path: Option<&str>,
    ca_path: Option<&str>,
    namespace: default!(Option<&str>, "NULL"),
) {
    let o = vault_options(url, mount_path, token_path, ca_path, namespace);
    add_provider(Some("vault-v2"), provider_name, Some(o), false)
}

#[pg_extern(name = "pg_tde_add_global_key_provider_vault_v2")]
fn add_global_key_provider_vault_v2(
    provider_name: Option<&str>,
    url: Option<&str>,
    mount_path: Option<&str>,
    token_path: Option<&str>,
    ca_path: Option<&str>,
    namespace: default!(Option<&str>, "NULL"),
) {
    let o = vault_options(url, mount_path, token_path, ca_path, namespace);
    add_provider(Some("vault-v2"), provider_name, Some(o), true)
}

#[pg_extern(name = "pg_tde_change_database_key_provider_vault_v2")]
fn change_database_key_provider_vault_v2(
    provider_name: Option<&str>,
    url: Option<&str>,
    mount_path: Option<&str>,
    token_path: Option<&str>,
    ca_path: Option<&str>,
    namespace: default!(Option<&str>, "NULL"),
) {
    let o = vault_options(url, mount_path, token_path, ca_path, namespace);
    change_provider(Some("vault-v2"), provider_name, Some(o), false)
}

#[pg_extern(name = "pg_tde_change_global_key_provider_vault_v2")]
fn change_global_key_provider_vault_v2(
    provider_name: Option<&str>,
    url: Option<&str>,
    mount_path: Option<&str>,
    token_path: Option<&str>,
    ca_path: Option<&str>,
    namespace: default!(Option<&str>, "NULL"),
) {
    let o = vault_options(url, mount_path, token_path, ca_path, namespace);
    change_provider(Some("vault-v2"), provider_name, Some(o), true)
}

#[pg_extern(name = "pg_tde_add_database_key_provider_kmip")]
fn add_database_key_provider_kmip(
    provider_name: Option<&str>,
    host: Option<&str>,
    port: Option<i32>,
    cert_path: Option<&str>,
    key_path: Option<&str>,
    ca_path: Option<&str>,
) {
    add_provider(Some("kmip"), provider_name, Some(kmip_options(host, port, cert_path, key_path, ca_path)), false)
}

#[pg_extern(name = "pg_tde_add_global_key_provider_kmip")]
fn add_global_key_provider_kmip(
    provider_name: Option<&str>,
    host: Option<&str>,
    port: Option<i32>,
    cert_path: Option<&str>,
    key_path: Option<&str>,
    ca_path: Option<&str>,
) {
    add_provider(Some("kmip"), provider_name, Some(kmip_options(host, port, cert_path, key_path, ca_path)), true)
}

#[pg_extern(name = "pg_tde_change_database_key_provider_kmip")]
fn change_database_key_provider_kmip(
    provider_name: Option<&str>,
    host: Option<&str>,
    port: Option<i32>,
    cert_path: Option<&str>,
    key_path: Option<&str>,
    ca_path: Option<&str>,
) {
    change_provider(Some("kmip"), provider_name, Some(kmip_options(host, port, cert_path, key_path, ca_path)), false)
}

#[pg_extern(name = "pg_tde_change_global_key_provider_kmip")]
fn change_global_key_provider_kmip(
    provider_name: Option<&str>,
    host: Option<&str>,
    port: Option<i32>,
    cert_path: Option<&str>,
    key_path: Option<&str>,
    ca_path: Option<&str>,
) {
    change_provider(Some("kmip"), provider_name, Some(kmip_options(host, port, cert_path, key_path, ca_path)), true)
}

fn list_providers(
    global: bool,
) -> TableIterator<'static, (name!(id, i32), name!(name, String), name!(type, String), name!(options, Json))> {
    let db = scope_db(global);
    let catalog = ProviderCatalog::load(&keys::providers_path()).or_raise();
    let rows: Vec<_> = catalog
        .providers
        .into_iter()
        .filter(|p| p.db_oid == db)
        .map(|p| (p.id, p.name, p.kind.type_name().to_string(), Json(p.options)))
        .collect();
    TableIterator::new(rows)
}

#[pg_extern(name = "pg_tde_list_all_database_key_providers")]
fn list_all_database_key_providers(
) -> TableIterator<'static, (name!(id, i32), name!(name, String), name!(type, String), name!(options, Json))> {
    list_providers(false)
}

#[pg_extern(name = "pg_tde_list_all_global_key_providers")]
fn list_all_global_key_providers(
) -> TableIterator<'static, (name!(id, i32), name!(name, String), name!(type, String), name!(options, Json))> {
    list_providers(true)
}

/// The provider a key function names, in the given scope.
fn find_provider(name: &str, global: bool) -> ProviderRecord {
    if global && !gucs::INHERIT_GLOBAL_PROVIDERS.get() {
        raise_with(
            PgSqlErrorCode::ERRCODE_INSUFFICIENT_PRIVILEGE,
            "usage of global key providers is disabled",
            Some("Set pg_tde.inherit_global_providers = on to allow it."),
        );
    }
    let db = scope_db(global);
    let catalog = ProviderCatalog::load(&keys::providers_path()).or_raise();
    match catalog.providers.into_iter().find(|p| p.db_oid == db && p.name == name) {
        Some(p) => p,
        None => raise_with(
            PgSqlErrorCode::ERRCODE_UNDEFINED_OBJECT,
            &format!("{} key provider \"{name}\" does not exist", scope_word(global)),
            None,
        ),
    }
}

// ---------------------------------------------------------------------------
// Principal keys

fn create_key(key_name: Option<&str>, provider_name: Option<&str>, global: bool) {
    if global {
        require_key_admin("create a key with a global key provider");
    }
    let key_name = required_name(key_name, "key name");
    let provider_name = required_name(provider_name, "provider name");
    let rec = find_provider(provider_name, global);
    let provider = open_provider(&rec).or_raise();
    let (name, len) = (key_name.to_string(), gucs::cipher().principal_key_len());
    // Both provider calls on a helper thread, so that the session can cancel them; the new
    // key is dropped (wiped) there. A wrapping provider's envelope comes back to be stored.
    let created = crate::provider_call::cancellable(move || {
        if provider.get_key(&name)?.is_some() {
            return Ok(None);
        }
        provider.create_key(&name, len).map(|k| Some(k.envelope.clone()))
    });
    let event = AuditEvent::new("key_created").provider(rec.id, &rec.name).key(key_name);
    let created = match created {
        Ok(c) => c,
        Err(e) => {
            crate::audit::record(event.failed(&e));
            raise(e)
        }
    };
    let Some(envelope) = created else {
        raise_with(
            PgSqlErrorCode::ERRCODE_DUPLICATE_OBJECT,
            &format!("key \"{key_name}\" already exists in key provider \"{provider_name}\""),
            None,
        )
    };
    match envelope {
        Some(envelope) => {
            let detail = format!("envelope key wrapped by {}", keys::kms_key_text(Some(&envelope)));
            if let Err(e) = keys::store_envelope(envelope, false) {
                crate::audit::record(event.failed(&e));
                match e {
                    tde_core::TdeError::Invalid(m) if m.contains("already exists") => {
                        raise_with(PgSqlErrorCode::ERRCODE_DUPLICATE_OBJECT, &m, None)
                    }
                    other => raise(other),
                }
            }
            crate::audit::record(
                AuditEvent::new("kms_wrap").provider(rec.id, &rec.name).key(key_name).detail(detail.clone()),
            );
            crate::audit::record(event.detail(detail));
        }
        None => crate::audit::record(event),
    }
}

#[pg_extern(name = "pg_tde_create_key_using_database_key_provider")]
fn create_key_using_database_key_provider(key_name: Option<&str>, provider_name: Option<&str>) {
    create_key(key_name, provider_name, false)
}

#[pg_extern(name = "pg_tde_create_key_using_global_key_provider")]
fn create_key_using_global_key_provider(key_name: Option<&str>, provider_name: Option<&str>) {
    create_key(key_name, provider_name, true)
}

/// Fetch a key from a provider for one of the set_* functions.
fn fetch_key_for_set(
    key_name: Option<&str>,
    provider_name: Option<&str>,
    global: bool,
) -> (PrincipalRef, PrincipalKey) {
    let key_name = required_name(key_name, "key name");
    let provider_name = required_name(provider_name, "provider name");
    let rec = find_provider(provider_name, global);
    let provider = open_provider(&rec).or_raise();
    let name = key_name.to_string();
    let Some(key) = crate::provider_call::cancellable(move || provider.get_key(&name)).or_raise() else {
        raise_with(
            PgSqlErrorCode::ERRCODE_UNDEFINED_OBJECT,
            &format!("key \"{key_name}\" does not exist in key provider \"{provider_name}\""),
            Some("Create it first with pg_tde_create_key_using_database_key_provider() or pg_tde_create_key_using_global_key_provider()."),
        )
    };
    let created = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0);
    (PrincipalRef { name: key_name.to_string(), provider_id: rec.id, created_unix_secs: created }, key)
}

fn set_key(key_name: Option<&str>, provider_name: Option<&str>, global: bool) {
    if global {
        require_key_admin("set a key from a global key provider");
    }
    let (principal, key) = fetch_key_for_set(key_name, provider_name, global);
    let db = my_database();
    audited_set(db, &principal.clone(), || keys::set_database_principal(db, principal, &key.key));
}

/// Run a change of the principal key of `target` (a database, or the default or
/// server key) and record it: `key_set` for a first key, `key_rotated` for a new one.
fn audited_set(target: u32, principal: &PrincipalRef, change: impl FnOnce() -> tde_core::Result<()>) {
    let before = keys::database_header(target).or_raise();
    let kind = if before.is_some() { "key_rotated" } else { "key_set" };
    let mut event = AuditEvent::new(kind).provider_id(principal.provider_id).key(&principal.name).target(target);
    if let Some(b) = &before {
        event = event.detail(format!("was \"{}\" of provider {}", b.principal.name, b.principal.provider_id));
    }
    match change() {
        Ok(()) => crate::audit::record(event),
        Err(e) => {
            crate::audit::record(event.failed(&e));
            raise(e)
        }
    }
}

#[pg_extern(name = "pg_tde_set_key_using_database_key_provider")]
fn set_key_using_database_key_provider(key_name: Option<&str>, provider_name: Option<&str>) {
    set_key(key_name, provider_name, false)
}

#[pg_extern(name = "pg_tde_set_key_using_global_key_provider")]
fn set_key_using_global_key_provider(key_name: Option<&str>, provider_name: Option<&str>) {
    set_key(key_name, provider_name, true)
}

#[pg_extern(name = "pg_tde_set_server_key_using_global_key_provider")]
fn set_server_key_using_global_key_provider(key_name: Option<&str>, provider_name: Option<&str>) {
    require_key_admin("set the server key");
    let (principal, key) = fetch_key_for_set(key_name, provider_name, true);
    audited_set(keys::SERVER_KEY_DB, &principal.clone(), || keys::set_server_principal(principal, &key.key));
}

#[pg_extern(name = "pg_tde_set_default_key_using_global_key_provider")]
fn set_default_key_using_global_key_provider(key_name: Option<&str>, provider_name: Option<&str>) {
    require_key_admin("set the default key");
    let (principal, key) = fetch_key_for_set(key_name, provider_name, true);
    audited_set(keys::DEFAULT_KEY_DB, &principal.clone(), || keys::set_default_principal(principal, &key.key));
}

/// Delete this database's principal key.  With encrypted relations left, the
/// database falls back to the default key when there is one (its relation keys
/// are re-wrapped); otherwise it is refused.
#[pg_extern(name = "pg_tde_delete_key")]
fn delete_key() {
    let db = my_database();
    let Some(header) = keys::database_header(db).or_raise() else {
        raise_with(PgSqlErrorCode::ERRCODE_UNDEFINED_OBJECT, "principal key not configured for this database", None)
    };
    let deleted =
        AuditEvent::new("key_deleted").provider_id(header.principal.provider_id).key(&header.principal.name).target(db);
    if keys::remove_map_if_unused(db).or_raise() {
        crate::audit::record(deleted);
        return;
    }
    match keys::database_header(keys::DEFAULT_KEY_DB).or_raise() {
        Some(default) if !keys::same_principal(&default.principal, &header.principal) => {
            let key = keys::principal_key(&default.principal).or_raise();
            keys::set_database_principal(db, default.principal, &key).or_raise();
            crate::audit::record(deleted.detail("the database now uses the default key"));
        }
        _ => raise_with(
            PgSqlErrorCode::ERRCODE_OBJECT_IN_USE,
            "cannot delete the principal key: encrypted relations in this database need it",
            Some("Drop or decrypt them first, or set a default key for the database to fall back to."),
        ),
    }
}

#[pg_extern(name = "pg_tde_delete_default_key")]
fn delete_default_key() {
    require_key_admin("delete the default key");
    let Some(default) = keys::database_header(keys::DEFAULT_KEY_DB).or_raise() else {
        raise_with(PgSqlErrorCode::ERRCODE_UNDEFINED_OBJECT, "no default key is set", None)
    };
    for db in keys::databases_with_maps().or_raise() {
        if let Some(h) = keys::database_header(db).or_raise() {
            if keys::same_principal(&h.principal, &default.principal) {
                raise_with(
                    PgSqlErrorCode::ERRCODE_OBJECT_IN_USE,
                    &format!("cannot delete the default key: database with OID {db} uses it"),
                    Some("Give that database a principal key of its own first."),
                );
            }
        }
    }
    keys::remove_map(keys::DEFAULT_KEY_DB).or_raise();
    crate::audit::record(
        AuditEvent::new("key_deleted")
            .provider_id(default.principal.provider_id)
            .key(&default.principal.name)
            .target(keys::DEFAULT_KEY_DB),
    );
}

#[allow(clippy::type_complexity)]
fn key_info_of(
    db: u32,
) -> TableIterator<
    'static,
    (
        name!(key_name, String),
        name!(provider_name, Option<String>),
        name!(provider_id, i32),
        name!(key_creation_time, Option<TimestampWithTimeZone>),
        name!(kms_key_id, Option<String>),
        name!(kms_key_version, Option<String>),
        name!(key_state, String),
    ),
> {
    let rows = match keys::database_header(db).or_raise() {
        None => Vec::new(),
        Some(h) => {
            let catalog = ProviderCatalog::load(&keys::providers_path()).or_raise();
            let provider_name = catalog.by_id(h.principal.provider_id).map(|p| p.name.clone());
            let envelope = keys::envelope_of(&h.principal).or_raise();
            let state = match crate::key_check::state_of(&h.principal) {
                None => "ok".to_string(),
                Some((state, _, _, message)) if message.is_empty() => state.name().to_string(),
                Some((state, _, _, message)) => format!("{}: {message}", state.name()),
            };
            vec![(
                h.principal.name.clone(),
                provider_name,
                h.principal.provider_id,
                unix_to_timestamptz(h.principal.created_unix_secs),
                envelope.as_ref().map(|e| e.kms_key_id.clone()),
                envelope.and_then(|e| e.kms_key_version),
                state,
            )]
        }
    };
    TableIterator::new(rows)
}

/// Seconds since the Unix epoch as a timestamptz.
fn unix_to_timestamptz(secs: i64) -> Option<TimestampWithTimeZone> {
    const PG_EPOCH_UNIX_SECS: i64 = 946_684_800;
    TimestampWithTimeZone::try_from((secs - PG_EPOCH_UNIX_SECS) * 1_000_000).ok()
}

#[pg_extern(name = "pg_tde_key_info")]
#[allow(clippy::type_complexity)]
fn key_info() -> TableIterator<
    'static,
    (
        name!(key_name, String),
        name!(provider_name, Option<String>),
        name!(provider_id, i32),
        name!(key_creation_time, Option<TimestampWithTimeZone>),
        name!(kms_key_id, Option<String>),
        name!(kms_key_version, Option<String>),
        name!(key_state, String),
    ),
> {
    key_info_of(my_database())
}

#[pg_extern(name = "pg_tde_server_key_info")]
#[allow(clippy::type_complexity)]
fn server_key_info() -> TableIterator<
    'static,
    (
        name!(key_name, String),
        name!(provider_name, Option<String>),
        name!(provider_id, i32),
        name!(key_creation_time, Option<TimestampWithTimeZone>),
        name!(kms_key_id, Option<String>),
        name!(kms_key_version, Option<String>),
        name!(key_state, String),
    ),
> {
    key_info_of(keys::SERVER_KEY_DB)
}

#[pg_extern(name = "pg_tde_default_key_info")]
#[allow(clippy::type_complexity)]
fn default_key_info() -> TableIterator<
    'static,
    (
        name!(key_name, String),
        name!(provider_name, Option<String>),
        name!(provider_id, i32),
        name!(key_creation_time, Option<TimestampWithTimeZone>),
        name!(kms_key_id, Option<String>),
        name!(kms_key_version, Option<String>),
        name!(key_state, String),
    ),
> {
    key_info_of(keys::DEFAULT_KEY_DB)
}

fn verify(db: u32, what: &str) {
    let Some(header) = keys::database_header(db).or_raise() else {
        raise_with(
            PgSqlErrorCode::ERRCODE_UNDEFINED_OBJECT,
            &format!("{what} is not configured"),
            Some("Use the pg_tde_set_*key* functions to set it."),
        )
    };
    // Ask the provider itself, not the cache.
    let fresh = keys::fetch_principal_from_provider(&header.principal).or_raise();
    if header.verify_principal(&fresh).is_err() {
        raise_with(
            PgSqlErrorCode::ERRCODE_DATA_CORRUPTED,
            &format!("{what} \"{}\" in its provider differs from the key in use", header.principal.name),
            None,
        );
    }
    let cached = keys::principal_key(&header.principal).or_raise();
    if header.verify_principal(&cached).is_err() {
        raise_with(
            PgSqlErrorCode::ERRCODE_DATA_CORRUPTED,
            &format!("the cached {what} differs from the key in use"),
            None,
        );
    }
}

#[pg_extern(name = "pg_tde_verify_key")]
fn verify_key() {
    verify(my_database(), "principal key of this database")
}

#[pg_extern(name = "pg_tde_verify_server_key")]
fn verify_server_key() {
    require_key_admin("verify the server key");
    verify(keys::SERVER_KEY_DB, "server key")
}

#[pg_extern(name = "pg_tde_verify_default_key")]
fn verify_default_key() {
    require_key_admin("verify the default key");
    verify(keys::DEFAULT_KEY_DB, "default key")
}

// ---------------------------------------------------------------------------
// Status

/// Whether a relation is stored encrypted; NULL for relations without
/// storage.  Needs no access to the principal key.
#[pg_extern(
    sql = "CREATE FUNCTION pg_tde_is_encrypted(relation regclass) RETURNS boolean STRICT LANGUAGE c AS 'MODULE_PATHNAME', 'is_encrypted_wrapper';",
    requires = ["tde_heap_am"]
)]
fn is_encrypted(relation: pg_sys::Oid) -> Option<bool> {
    // SAFETY: RelationIdGetRelation returns NULL or a refcounted entry that we
    // release before returning.
    let (locator, relkind, persistence) = unsafe {
        pg_sys::LockRelationOid(relation, pg_sys::AccessShareLock as pg_sys::LOCKMODE);
        let rel = pg_sys::RelationIdGetRelation(relation);
        if rel.is_null() {
            return None;
        }
        let out = ((*rel).rd_locator, (*(*rel).rd_rel).relkind as u8, (*(*rel).rd_rel).relpersistence as u8);
        pg_sys::RelationClose(rel);
        out
    };
    let has_storage = matches!(
        relkind,
        pg_sys::RELKIND_RELATION
            | pg_sys::RELKIND_INDEX
            | pg_sys::RELKIND_SEQUENCE
            | pg_sys::RELKIND_TOASTVALUE
            | pg_sys::RELKIND_MATVIEW
    );
    if !has_storage {
        return None;
    }
    Some(
        keys::file_has_key(FileId::from(locator), persistence == pg_sys::RELPERSISTENCE_TEMP)
            .unwrap_or_else(|e| raise(e)),
    )
}

#[pg_extern(name = "pg_tde_version")]
fn version() -> String {
    format!("pg_tde {}", env!("CARGO_PKG_VERSION"))
}

pgrx::extension_sql!(
    r#"
-- Members of this role may manage key providers, global keys, the default key
-- and the server key (pg_tde checks membership itself: EXECUTE alone is not enough).
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = 'tde_key_admin') THEN
        CREATE ROLE tde_key_admin NOLOGIN;
    END IF;
END
$$;

CREATE FUNCTION pg_tde_database_key_functions() RETURNS text[] LANGUAGE sql IMMUTABLE
SET search_path = pg_catalog AS $$
    SELECT ARRAY[
        'pg_tde_create_key_using_database_key_provider(text, text)',
        'pg_tde_set_key_using_database_key_provider(text, text)',
        'pg_tde_delete_key()',
        'pg_tde_key_info()',
        'pg_tde_verify_key()',
        'pg_tde_list_all_database_key_providers()',
        'pg_tde_list_all_global_key_providers()']
$$;

CREATE FUNCTION pg_tde_global_key_functions() RETURNS text[] LANGUAGE sql IMMUTABLE
SET search_path = pg_catalog AS $$
    SELECT ARRAY[
        'pg_tde_add_database_key_provider(text, text, json)',
        'pg_tde_add_global_key_provider(text, text, json)',
        'pg_tde_change_database_key_provider(text, text, json)',
        'pg_tde_change_global_key_provider(text, text, json)',
        'pg_tde_delete_database_key_provider(text)',
        'pg_tde_delete_global_key_provider(text)',
        'pg_tde_add_database_key_provider_file(text, text)',
        'pg_tde_add_global_key_provider_file(text, text)',
        'pg_tde_change_database_key_provider_file(text, text)',
        'pg_tde_change_global_key_provider_file(text, text)',
        'pg_tde_add_database_key_provider_vault_v2(text, text, text, text, text, text)',
        'pg_tde_add_global_key_provider_vault_v2(text, text, text, text, text, text)',
        'pg_tde_change_database_key_provider_vault_v2(text, text, text, text, text, text)',
        'pg_tde_change_global_key_provider_vault_v2(text, text, text, text, text, text)',
        'pg_tde_add_database_key_provider_kmip(text, text, integer, text, text, text)',
        'pg_tde_add_global_key_provider_kmip(text, text, integer, text, text, text)',
        'pg_tde_change_database_key_provider_kmip(text, text, integer, text, text, text)',
        'pg_tde_change_global_key_provider_kmip(text, text, integer, text, text, text)',
        'pg_tde_create_key_using_global_key_provider(text, text)',
        'pg_tde_set_key_using_global_key_provider(text, text)',
        'pg_tde_set_server_key_using_global_key_provider(text, text)',
        'pg_tde_set_default_key_using_global_key_provider(text, text)',
        'pg_tde_delete_default_key()',
        'pg_tde_server_key_info()',
        'pg_tde_default_key_info()',
        'pg_tde_verify_server_key()',
        'pg_tde_verify_default_key()',
        'pg_tde_check_keys()',
        'pg_tde_rotate_relation_key(regclass, boolean)',
        'pg_tde_encrypt_relation(regclass, boolean)',
        'pg_tde_decrypt_relation(regclass, boolean)',
        'pg_tde_rekey_status()',
        'pg_tde_key_state()',
        'pg_tde_audit_events()']
$$;

CREATE FUNCTION pg_tde_grant_database_key_management_to_role(target_role text) RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog AS $$
DECLARE f text;
BEGIN
    FOREACH f IN ARRAY @extschema@.pg_tde_database_key_functions() LOOP
        EXECUTE format('GRANT EXECUTE ON FUNCTION @extschema@.%s TO %I', f, target_role);
    END LOOP;
END
$$;

CREATE FUNCTION pg_tde_revoke_database_key_management_from_role(target_role text) RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog AS $$
DECLARE f text;
BEGIN
    FOREACH f IN ARRAY @extschema@.pg_tde_database_key_functions() LOOP
        EXECUTE format('REVOKE EXECUTE ON FUNCTION @extschema@.%s FROM %I', f, target_role);
    END LOOP;
END
$$;

CREATE FUNCTION pg_tde_grant_global_key_management_to_role(target_role text) RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog AS $$
DECLARE f text;
BEGIN
    FOREACH f IN ARRAY @extschema@.pg_tde_global_key_functions() LOOP
        EXECUTE format('GRANT EXECUTE ON FUNCTION @extschema@.%s TO %I', f, target_role);
    END LOOP;
    EXECUTE format('GRANT SELECT ON @extschema@.pg_tde_audit_log, @extschema@.pg_tde_rekey_progress TO %I', target_role);
    EXECUTE format('GRANT tde_key_admin TO %I', target_role);
END
$$;

CREATE FUNCTION pg_tde_revoke_global_key_management_from_role(target_role text) RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog AS $$
DECLARE f text;
BEGIN
    FOREACH f IN ARRAY @extschema@.pg_tde_global_key_functions() LOOP
        EXECUTE format('REVOKE EXECUTE ON FUNCTION @extschema@.%s FROM %I', f, target_role);
    END LOOP;
    EXECUTE format('REVOKE SELECT ON @extschema@.pg_tde_audit_log, @extschema@.pg_tde_rekey_progress FROM %I', target_role);
    EXECUTE format('REVOKE tde_key_admin FROM %I', target_role);
END
$$;

-- Every management function is revoked from PUBLIC; the status functions stay open.
DO $$
DECLARE f regprocedure;
BEGIN
    FOR f IN
        SELECT p.oid::regprocedure FROM pg_proc p
        WHERE p.pronamespace = (SELECT oid FROM pg_namespace WHERE nspname = current_schema())
          AND p.proname LIKE 'pg\_tde\_%'
          AND p.proname NOT IN ('pg_tde_is_encrypted', 'pg_tde_version',
                                'pg_tde_database_key_functions', 'pg_tde_global_key_functions')
    LOOP
        EXECUTE format('REVOKE ALL ON FUNCTION %s FROM PUBLIC', f);
    END LOOP;
END
$$;
"#,
    name = "revoke_management_functions",
    finalize,
);
