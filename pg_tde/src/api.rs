//! SQL functions (SPEC §6), names and shapes compatible with Percona pg_tde.
//!
//! Management functions are revoked from PUBLIC (see the SQL at the end).
//! Provider and global-scope functions additionally require a superuser.

use std::time::{SystemTime, UNIX_EPOCH};

use pgrx::prelude::*;
use pgrx::{Json, PgSqlErrorCode};
use tde_core::keymap::PrincipalRef;
use tde_core::provider::{parse_file_options, ProviderKind};
use tde_core::providers_catalog::{open_provider, ProviderCatalog, ProviderRecord};

use crate::errors::{raise, raise_with, OrRaise};
use crate::gucs;
use crate::keys::{self, FileId};

const MAX_NAME_LEN: usize = 255;

fn my_database() -> u32 {
    // SAFETY: plain read of a backend-global set at connection start.
    unsafe { (&raw const pg_sys::MyDatabaseId).read() }.to_u32()
}

fn require_superuser(what: &str) {
    // SAFETY: plain catalog-free check of the current user.
    if !unsafe { pg_sys::superuser() } {
        raise_with(
            PgSqlErrorCode::ERRCODE_INSUFFICIENT_PRIVILEGE,
            &format!("must be superuser to {what}"),
            Some("Key providers and global keys can only be managed by a superuser."),
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

fn add_provider(provider_type: Option<&str>, name: Option<&str>, options: Option<Json>, global: bool) {
    require_superuser("add a key provider");
    let provider_type = required_name(provider_type, "provider type");
    let name = required_name(name, "provider name");
    let Some(Json(options)) = options else {
        raise_with(PgSqlErrorCode::ERRCODE_NULL_VALUE_NOT_ALLOWED, "provider options cannot be NULL", None)
    };
    let Some(kind) = ProviderKind::from_type_name(provider_type) else {
        raise_with(
            PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
            &format!("unknown key provider type \"{provider_type}\""),
            Some("Valid types are \"file\", \"vault-v2\" and \"kmip\"."),
        )
    };
    if !options.is_object() {
        raise_with(PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE, "provider options must be a JSON object", None);
    }
    if kind == ProviderKind::File {
        parse_file_options(&options).or_raise();
    }
    let db = scope_db(global);
    keys::with_key_files_lock(|| {
        let mut catalog = ProviderCatalog::load(&keys::providers_path()).or_raise();
        if catalog.providers.iter().any(|p| p.db_oid == db && p.name == name) {
            raise_with(
                PgSqlErrorCode::ERRCODE_DUPLICATE_OBJECT,
                &format!("{} key provider \"{name}\" already exists", scope_word(global)),
                None,
            );
        }
        // Reach the provider before saving it.
        let probe = ProviderRecord { id: 0, name: name.to_string(), kind, options: options.clone(), db_oid: db };
        open_provider(&probe).and_then(|p| p.check()).or_raise();
        catalog.add(name, kind, options, db).or_raise();
        keys::save_providers(&catalog).or_raise();
    });
}

#[pg_extern(name = "pg_tde_add_database_key_provider")]
fn add_database_key_provider(provider_type: Option<&str>, provider_name: Option<&str>, options: Option<Json>) {
    add_provider(provider_type, provider_name, options, false)
}

#[pg_extern(name = "pg_tde_add_global_key_provider")]
fn add_global_key_provider(provider_type: Option<&str>, provider_name: Option<&str>, options: Option<Json>) {
    add_provider(provider_type, provider_name, options, true)
}

fn file_options(path: Option<&str>) -> Json {
    let path = required_name(path, "file path");
    Json(serde_json::json!({ "path": path }))
}

#[pg_extern(name = "pg_tde_add_database_key_provider_file")]
fn add_database_key_provider_file(provider_name: Option<&str>, file_path: Option<&str>) {
    add_provider(Some("file"), provider_name, Some(file_options(file_path)), false)
}

#[pg_extern(name = "pg_tde_add_global_key_provider_file")]
fn add_global_key_provider_file(provider_name: Option<&str>, file_path: Option<&str>) {
    add_provider(Some("file"), provider_name, Some(file_options(file_path)), true)
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
        require_superuser("create a key with a global key provider");
    }
    let key_name = required_name(key_name, "key name");
    let provider_name = required_name(provider_name, "provider name");
    let rec = find_provider(provider_name, global);
    let provider = open_provider(&rec).or_raise();
    if provider.get_key(key_name).or_raise().is_some() {
        raise_with(
            PgSqlErrorCode::ERRCODE_DUPLICATE_OBJECT,
            &format!("key \"{key_name}\" already exists in key provider \"{provider_name}\""),
            None,
        );
    }
    provider.create_key(key_name, gucs::cipher().principal_key_len()).or_raise();
}

#[pg_extern(name = "pg_tde_create_key_using_database_key_provider")]
fn create_key_using_database_key_provider(key_name: Option<&str>, provider_name: Option<&str>) {
    create_key(key_name, provider_name, false)
}

#[pg_extern(name = "pg_tde_create_key_using_global_key_provider")]
fn create_key_using_global_key_provider(key_name: Option<&str>, provider_name: Option<&str>) {
    create_key(key_name, provider_name, true)
}

fn set_key(key_name: Option<&str>, provider_name: Option<&str>, global: bool) {
    if global {
        require_superuser("set a key from a global key provider");
    }
    let key_name = required_name(key_name, "key name");
    let provider_name = required_name(provider_name, "provider name");
    let rec = find_provider(provider_name, global);
    let provider = open_provider(&rec).or_raise();
    let Some(key) = provider.get_key(key_name).or_raise() else {
        raise_with(
            PgSqlErrorCode::ERRCODE_UNDEFINED_OBJECT,
            &format!("key \"{key_name}\" does not exist in key provider \"{provider_name}\""),
            Some("Create it first with pg_tde_create_key_using_database_key_provider() or pg_tde_create_key_using_global_key_provider()."),
        )
    };
    let created = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0);
    let principal = PrincipalRef { name: key_name.to_string(), provider_id: rec.id, created_unix_secs: created };
    keys::set_database_principal(my_database(), principal, &key.key).or_raise();
}

#[pg_extern(name = "pg_tde_set_key_using_database_key_provider")]
fn set_key_using_database_key_provider(key_name: Option<&str>, provider_name: Option<&str>) {
    set_key(key_name, provider_name, false)
}

#[pg_extern(name = "pg_tde_set_key_using_global_key_provider")]
fn set_key_using_global_key_provider(key_name: Option<&str>, provider_name: Option<&str>) {
    set_key(key_name, provider_name, true)
}

/// Seconds since the Unix epoch as a timestamptz.
fn unix_to_timestamptz(secs: i64) -> Option<TimestampWithTimeZone> {
    const PG_EPOCH_UNIX_SECS: i64 = 946_684_800;
    TimestampWithTimeZone::try_from((secs - PG_EPOCH_UNIX_SECS) * 1_000_000).ok()
}

#[pg_extern(name = "pg_tde_key_info")]
fn key_info() -> TableIterator<
    'static,
    (
        name!(key_name, String),
        name!(provider_name, Option<String>),
        name!(provider_id, i32),
        name!(key_creation_time, Option<TimestampWithTimeZone>),
    ),
> {
    let rows = match keys::database_header(my_database()).or_raise() {
        None => Vec::new(),
        Some(h) => {
            let catalog = ProviderCatalog::load(&keys::providers_path()).or_raise();
            let provider_name = catalog.by_id(h.principal.provider_id).map(|p| p.name.clone());
            vec![(
                h.principal.name.clone(),
                provider_name,
                h.principal.provider_id,
                unix_to_timestamptz(h.principal.created_unix_secs),
            )]
        }
    };
    TableIterator::new(rows)
}

#[pg_extern(name = "pg_tde_verify_key")]
fn verify_key() {
    let Some(header) = keys::database_header(my_database()).or_raise() else {
        raise_with(
            PgSqlErrorCode::ERRCODE_UNDEFINED_OBJECT,
            "principal key not configured for this database",
            Some("Use pg_tde_set_key_using_database_key_provider() or pg_tde_set_key_using_global_key_provider()."),
        )
    };
    // Ask the provider itself, not the cache.
    let fresh = keys::fetch_principal_from_provider(&header.principal).or_raise();
    if header.verify_principal(&fresh).is_err() {
        raise_with(
            PgSqlErrorCode::ERRCODE_DATA_CORRUPTED,
            &format!("principal key \"{}\" in its provider differs from the key in use", header.principal.name),
            None,
        );
    }
    let cached = keys::principal_key(&header.principal).or_raise();
    if header.verify_principal(&cached).is_err() {
        raise_with(
            PgSqlErrorCode::ERRCODE_DATA_CORRUPTED,
            "the cached principal key differs from the key in use",
            None,
        );
    }
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
DO $$
DECLARE f regprocedure;
BEGIN
    FOR f IN
        SELECT p.oid::regprocedure FROM pg_proc p
        WHERE p.pronamespace = (SELECT oid FROM pg_namespace WHERE nspname = current_schema())
          AND p.proname LIKE 'pg\_tde\_%'
          AND p.proname NOT IN ('pg_tde_is_encrypted', 'pg_tde_version')
    LOOP
        EXECUTE format('REVOKE ALL ON FUNCTION %s FROM PUBLIC', f);
    END LOOP;
END
$$;
"#,
    name = "revoke_management_functions",
    finalize,
);
