//! In-backend tests (`cargo pgrx test`): SQL functions, errors and SQLSTATEs,
//! and the storage path inside one server.  File-level checks on disk, crashes
//! and standbys are in `tests/integration`.

#[cfg(any(test, feature = "pg_test"))]
#[pgrx::pg_schema]
mod tests {
    use pgrx::prelude::*;

    /// A keyring file of this test's own.  Provider-side keys are not
    /// transactional, so they outlive the test's rollback: the directory is
    /// unique per backend *and* per run (process ids are reused, and a keyring
    /// left by an earlier run would already hold the key a test creates).
    fn keyring_path(name: &str) -> String {
        static DIR: std::sync::OnceLock<std::path::PathBuf> = std::sync::OnceLock::new();
        let dir = DIR.get_or_init(|| {
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or_default();
            let dir = std::env::temp_dir().join(format!("pg_tde_pgtest_{}_{nanos}", std::process::id()));
            std::fs::create_dir_all(&dir).expect("temp dir");
            dir
        });
        dir.join(format!("{name}.json")).display().to_string()
    }

    fn setup_key(provider: &str, key: &str) {
        let path = keyring_path(provider);
        Spi::run(&format!("SELECT pg_tde_add_database_key_provider_file('{provider}', '{path}')")).unwrap();
        Spi::run(&format!("SELECT pg_tde_create_key_using_database_key_provider('{key}', '{provider}')")).unwrap();
        Spi::run(&format!("SELECT pg_tde_set_key_using_database_key_provider('{key}', '{provider}')")).unwrap();
    }

    #[pg_test]
    fn version_is_reported() {
        let v = Spi::get_one::<String>("SELECT pg_tde_version()").unwrap().unwrap();
        assert!(v.starts_with("pg_tde "), "{v}");
    }

    #[pg_test]
    fn tde_heap_table_roundtrip_and_status() {
        setup_key("p_roundtrip", "k_roundtrip");
        Spi::run("CREATE TABLE enc (id int PRIMARY KEY, v text) USING tde_heap").unwrap();
        Spi::run("INSERT INTO enc SELECT g, 'value ' || g FROM generate_series(1, 5000) g").unwrap();
        // Force pages through the storage manager and read them back.
        Spi::run("CHECKPOINT").unwrap();
        let n = Spi::get_one::<i64>("SELECT count(*) FROM enc WHERE v LIKE 'value %'").unwrap().unwrap();
        assert_eq!(n, 5000);
        assert_eq!(Spi::get_one::<bool>("SELECT pg_tde_is_encrypted('enc')").unwrap(), Some(true));
        assert_eq!(Spi::get_one::<bool>("SELECT pg_tde_is_encrypted('enc_pkey')").unwrap(), Some(true));
        Spi::run("CREATE TABLE plain (id int) USING heap").unwrap();
        assert_eq!(Spi::get_one::<bool>("SELECT pg_tde_is_encrypted('plain')").unwrap(), Some(false));
        Spi::run("CREATE VIEW v AS SELECT 1").unwrap();
        assert_eq!(Spi::get_one::<bool>("SELECT pg_tde_is_encrypted('v')").unwrap(), None);
    }

    #[pg_test]
    fn key_events_are_audited_and_checked() {
        setup_key("p_audit", "k_audit");
        let events = Spi::get_one::<String>(
            "SELECT string_agg(event || ':' || outcome, ',' ORDER BY seq) FROM pg_tde_audit_events() \
             WHERE provider_name = 'p_audit'",
        )
        .unwrap()
        .unwrap();
        assert_eq!(events, "provider_added:success,key_created:success,key_set:success");
        let state = Spi::get_one::<String>("SELECT state FROM pg_tde_check_keys() WHERE key_name = 'k_audit'")
            .unwrap()
            .unwrap();
        assert_eq!(state, "ok");
        let info = Spi::get_one::<String>("SELECT key_state || '/' || (kms_key_id IS NULL) FROM pg_tde_key_info()")
            .unwrap()
            .unwrap();
        assert_eq!(info, "ok/true", "a storing provider has no KMS key id");
    }

    #[pg_test]
    fn key_info_names_key_and_provider() {
        setup_key("p_info", "k_info");
        let name = Spi::get_one::<String>("SELECT key_name FROM pg_tde_key_info()").unwrap().unwrap();
        let provider = Spi::get_one::<String>("SELECT provider_name FROM pg_tde_key_info()").unwrap().unwrap();
        assert_eq!((name.as_str(), provider.as_str()), ("k_info", "p_info"));
        Spi::run("SELECT pg_tde_verify_key()").unwrap();
        let listed = Spi::get_one::<i64>(
            "SELECT count(*) FROM pg_tde_list_all_database_key_providers() WHERE name = 'p_info' AND type = 'file'",
        )
        .unwrap()
        .unwrap();
        assert_eq!(listed, 1);
    }

    // "No principal key" is tested in tests/integration/test_failures.py: key
    // changes are not transactional, so the shared pgrx test database keeps
    // the keys that other tests set.

    #[pg_test(error = "unknown key provider type \"nosuch\"")]
    fn unknown_provider_type_is_refused() {
        Spi::run("SELECT pg_tde_add_database_key_provider('nosuch', 'p', '{}')").unwrap();
    }

    #[pg_test(error = "provider name cannot be NULL")]
    fn null_provider_name_is_refused() {
        Spi::run("SELECT pg_tde_add_database_key_provider_file(NULL, '/tmp/x.json')").unwrap();
    }

    #[pg_test(error = "database key provider \"dup\" already exists")]
    fn duplicate_provider_is_refused() {
        let path = keyring_path("dup");
        Spi::run(&format!("SELECT pg_tde_add_database_key_provider_file('dup', '{path}')")).unwrap();
        Spi::run(&format!("SELECT pg_tde_add_database_key_provider_file('dup', '{path}')")).unwrap();
    }

    #[pg_test(error = "key \"missing\" does not exist in key provider \"p_missing\"")]
    fn setting_a_missing_key_is_refused() {
        let path = keyring_path("p_missing");
        Spi::run(&format!("SELECT pg_tde_add_database_key_provider_file('p_missing', '{path}')")).unwrap();
        Spi::run("SELECT pg_tde_set_key_using_database_key_provider('missing', 'p_missing')").unwrap();
    }

    #[pg_test(error = "provider options must be a JSON object")]
    fn non_object_options_are_refused() {
        Spi::run("SELECT pg_tde_add_database_key_provider('file', 'arr', '[1,2]')").unwrap();
    }

    #[pg_test]
    fn rotation_keeps_data_readable() {
        setup_key("p_rot", "k_rot1");
        Spi::run("CREATE TABLE rot (v text) USING tde_heap").unwrap();
        Spi::run("INSERT INTO rot SELECT 'row ' || g FROM generate_series(1, 1000) g").unwrap();
        Spi::run("CHECKPOINT").unwrap();
        Spi::run("SELECT pg_tde_create_key_using_database_key_provider('k_rot2', 'p_rot')").unwrap();
        Spi::run("SELECT pg_tde_set_key_using_database_key_provider('k_rot2', 'p_rot')").unwrap();
        let name = Spi::get_one::<String>("SELECT key_name FROM pg_tde_key_info()").unwrap().unwrap();
        assert_eq!(name, "k_rot2");
        let n = Spi::get_one::<i64>("SELECT count(*) FROM rot").unwrap().unwrap();
        assert_eq!(n, 1000);
    }
}
