//! The `kmip` key provider against a real KMIP server: PyKMIP's `pykmip-server` (SPEC §10),
//! started by each test on 127.0.0.1 with a free port, TLS 1.2 and client certificates.
//!
//! Certificates (ECDSA P-256; PyKMIP's TLS 1.2 suite list and rustls share only the ECDSA
//! AES-GCM suites) are made with the `openssl` command: a test CA, a server certificate for
//! 127.0.0.1/localhost and a client certificate signed by it, and an unrelated CA with a
//! client certificate of its own for the negative tests.
//!
//! Key names here are ASCII: PyKMIP 0.11 decodes a Text String byte by byte and fails on
//! multi-byte UTF-8 (a server bug; the provider sends names as UTF-8).
//!
//! The provider as a [`KeyWrapper`] (KMIP `Encrypt`/`Decrypt` with AES-GCM) is tested at the
//! end: round trips, no `Get` ever sent (the server's log is read), tampered blobs, keys
//! revoked or destroyed with PyKMIP's own client (refused), and a stopped server.
//!
//! `pykmip-server` is found through `$PYKMIP_SERVER`, `$PATH` or python3's scripts
//! directory (`scripts/install-test-servers.sh` installs it). Without it the tests fail,
//! unless `PG_TDE_SKIP_KMIP=1` is set.

use std::fs;
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::json;
use tde_core::provider::{KeyWrapper, KmipOptions, KmipProvider, WrappedKey};
use tde_core::{open_provider, KeyProvider, ProviderKind, ProviderRecord, TdeError};

const LOCALHOST: Ipv4Addr = Ipv4Addr::LOCALHOST;

fn find_pykmip_server() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("PYKMIP_SERVER") {
        return Some(PathBuf::from(p));
    }
    // python3's own scripts directory first: the console script itself rather than a
    // wrapper such as a pyenv shim
    let scripts = Command::new("python3")
        .args(["-c", "import sysconfig; print(sysconfig.get_path('scripts'))"])
        .output()
        .ok()
        .map(|out| PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()));
    let path = std::env::var_os("PATH").map(|paths| std::env::split_paths(&paths).collect::<Vec<_>>());
    scripts.into_iter().chain(path.into_iter().flatten()).map(|dir| dir.join("pykmip-server")).find(|p| p.is_file())
}

/// Kill the server and everything it started (its own process group: a wrapper script
/// may have forked the Python process), then reap it.
fn kill_server(child: &mut Child) {
    let _ = Command::new("kill").args(["-KILL", "--", &format!("-{}", child.id())]).status();
    let _ = child.kill();
    let _ = child.wait();
}

/// The server binary, or `None` when the tests are to be skipped (`PG_TDE_SKIP_KMIP=1`).
fn pykmip_server_or_skip() -> Option<PathBuf> {
    match find_pykmip_server() {
        Some(p) => Some(p),
        None if std::env::var("PG_TDE_SKIP_KMIP").as_deref() == Ok("1") => {
            eprintln!("pykmip-server not found; skipped because PG_TDE_SKIP_KMIP=1");
            None
        }
        None => panic!(
            "pykmip-server not found (run `bash scripts/install-test-servers.sh` as root, set \
             PYKMIP_SERVER, or set PG_TDE_SKIP_KMIP=1 to skip the KMIP tests)"
        ),
    }
}

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl").current_dir(dir).args(args).output().expect("run openssl");
    assert!(out.status.success(), "openssl {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
}

/// Certificates for one test, in a temporary directory.
struct Pki {
    dir: tempfile::TempDir,
}

impl Pki {
    fn new() -> Pki {
        let dir = tempfile::tempdir().unwrap();
        let pki = Pki { dir };
        pki.ca("ca", "pg_tde test CA");
        pki.ca("otherca", "unrelated test CA");
        let leaf = "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\n";
        pki.leaf(
            "server",
            "ca",
            "127.0.0.1",
            &format!("{leaf}extendedKeyUsage=serverAuth\nsubjectAltName=IP:127.0.0.1,DNS:localhost\n"),
        );
        pki.leaf("client", "ca", "pg_tde", &format!("{leaf}extendedKeyUsage=clientAuth\n"));
        pki.leaf("rogue", "otherca", "pg_tde", &format!("{leaf}extendedKeyUsage=clientAuth\n"));
        pki
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn key(&self, name: &str) {
        openssl(
            self.dir.path(),
            &["genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", &format!("{name}.key")],
        );
    }

    fn ca(&self, name: &str, cn: &str) {
        self.key(name);
        openssl(
            self.dir.path(),
            &[
                "req",
                "-x509",
                "-new",
                "-key",
                &format!("{name}.key"),
                "-subj",
                &format!("/CN={cn}"),
                "-days",
                "2",
                "-sha256",
                "-addext",
                "basicConstraints=critical,CA:TRUE",
                "-addext",
                "keyUsage=critical,keyCertSign,cRLSign",
                "-out",
                &format!("{name}.crt"),
            ],
        );
    }

    fn leaf(&self, name: &str, ca: &str, cn: &str, extensions: &str) {
        self.key(name);
        fs::write(self.path(&format!("{name}.ext")), extensions).unwrap();
        openssl(
            self.dir.path(),
            &[
                "req",
                "-new",
                "-key",
                &format!("{name}.key"),
                "-subj",
                &format!("/CN={cn}"),
                "-out",
                &format!("{name}.csr"),
            ],
        );
        openssl(
            self.dir.path(),
            &[
                "x509",
                "-req",
                "-in",
                &format!("{name}.csr"),
                "-CA",
                &format!("{ca}.crt"),
                "-CAkey",
                &format!("{ca}.key"),
                "-CAcreateserial",
                "-days",
                "2",
                "-sha256",
                "-extfile",
                &format!("{name}.ext"),
                "-out",
                &format!("{name}.crt"),
            ],
        );
    }
}

fn free_port() -> u16 {
    TcpListener::bind((LOCALHOST, 0)).unwrap().local_addr().unwrap().port()
}

/// A running `pykmip-server`, killed on drop.
struct Server {
    child: Child,
    port: u16,
    pki: Pki,
}

impl Server {
    /// Start a server, or `None` when the tests are skipped.
    fn start() -> Option<Server> {
        let bin = pykmip_server_or_skip()?;
        let pki = Pki::new();
        let policies = pki.path("policies");
        fs::create_dir(&policies).unwrap();
        // A port picked free may be taken before the server binds it: try a few.
        for _ in 0..3 {
            let port = free_port();
            let config = format!(
                "[server]\nhostname=127.0.0.1\nport={port}\ncertificate_path={}\nkey_path={}\nca_path={}\n\
                 auth_suite=TLS1.2\npolicy_path={}\nenable_tls_client_auth=True\nlogging_level=INFO\n\
                 database_path={}\n",
                pki.path("server.crt").display(),
                pki.path("server.key").display(),
                pki.path("ca.crt").display(),
                policies.display(),
                pki.path("pykmip.db").display(),
            );
            fs::write(pki.path("server.conf"), config).unwrap();
            let output = fs::File::create(pki.path("server.out")).unwrap();
            let mut child = Command::new(&bin)
                .arg("-f")
                .arg(pki.path("server.conf"))
                .arg("-l")
                .arg(pki.path("server.log"))
                .env("PYTHONWARNINGS", "ignore")
                .process_group(0)
                .stdin(Stdio::null())
                .stdout(output.try_clone().unwrap())
                .stderr(output)
                .spawn()
                .unwrap_or_else(|e| panic!("could not start {}: {e}", bin.display()));
            if wait_ready(&mut child, port) {
                return Some(Server { child, port, pki });
            }
            kill_server(&mut child);
            eprintln!("pykmip-server did not start on port {port}:\n{}", logs(&pki));
        }
        panic!("pykmip-server failed to start three times; its files are in {}", pki.dir.keep().display())
    }

    fn logs(&self) -> String {
        logs(&self.pki)
    }

    fn options(&self, client: &str, ca: &str) -> KmipOptions {
        KmipOptions {
            host: "127.0.0.1".into(),
            port: self.port,
            cert_path: self.pki.path(&format!("{client}.crt")),
            key_path: self.pki.path(&format!("{client}.key")),
            ca_path: self.pki.path(&format!("{ca}.crt")),
        }
    }

    /// A provider with the good client certificate and CA.
    fn provider(&self) -> KmipProvider {
        KmipProvider::new(self.options("client", "ca"))
    }
}

/// Wait until the TLS port accepts connections; false if the server exited or never did.
fn wait_ready(child: &mut Child, port: u16) -> bool {
    let deadline = Instant::now() + Duration::from_secs(60);
    let addr = SocketAddr::from((LOCALHOST, port));
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return false;
        }
        if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    false
}

/// The server's output and the end of its log.
fn logs(pki: &Pki) -> String {
    let read = |f: &str| fs::read_to_string(pki.path(f)).unwrap_or_default();
    let log = read("server.log");
    let tail: Vec<&str> = log.lines().rev().take(40).collect();
    format!(
        "--- output ---\n{}\n--- log (last lines) ---\n{}",
        read("server.out"),
        tail.into_iter().rev().collect::<Vec<_>>().join("\n")
    )
}

impl Drop for Server {
    fn drop(&mut self) {
        kill_server(&mut self.child);
        if std::thread::panicking() {
            eprintln!("pykmip-server on port {}:\n{}", self.port, self.logs());
        }
    }
}

fn provider_error(r: Result<impl std::fmt::Debug, TdeError>) -> String {
    match r {
        Err(TdeError::Provider(m)) => {
            eprintln!("provider error: {m}");
            m
        }
        other => panic!("expected a provider error, got {other:?}"),
    }
}

#[test]
fn create_and_get_round_trip() {
    let Some(server) = Server::start() else { return };
    let p = server.provider();
    for (name, len) in [("principal-16", 16), ("principal-32", 32), ("key name with spaces, dots.and:colons", 32)] {
        let created = p.create_key(name, len).unwrap();
        assert_eq!((created.name.as_str(), created.key.len()), (name, len));
        assert!(created.key.iter().any(|&b| b != 0));
        let got = p.get_key(name).unwrap().expect("the key just created");
        assert_eq!(got.name, name);
        assert_eq!(*got.key, *created.key, "{name}");
    }
    assert_ne!(
        *p.get_key("principal-32").unwrap().unwrap().key,
        *p.get_key("key name with spaces, dots.and:colons").unwrap().unwrap().key
    );

    // through the provider catalog, with the port as a string (Percona writes it either way)
    let rec = ProviderRecord {
        id: 1,
        name: "kmip".into(),
        kind: ProviderKind::Kmip,
        options: json!({
            "host": "127.0.0.1",
            "port": server.port.to_string(),
            "certPath": server.pki.path("client.crt"),
            "keyPath": server.pki.path("client.key"),
            "caPath": server.pki.path("ca.crt"),
        }),
        db_oid: 0,
    };
    let opened = open_provider(&rec).unwrap();
    opened.check().unwrap();
    assert_eq!(*opened.get_key("principal-16").unwrap().unwrap().key, *p.get_key("principal-16").unwrap().unwrap().key);
    let k = opened.create_key("via-catalog", 16).unwrap();
    assert_eq!(*p.get_key("via-catalog").unwrap().unwrap().key, *k.key);
}

#[test]
fn create_twice_is_invalid() {
    let Some(server) = Server::start() else { return };
    let p = server.provider();
    let first = p.create_key("dup", 32).unwrap();
    match p.create_key("dup", 16) {
        Err(TdeError::Invalid(m)) => assert!(m.contains("key \"dup\" already exists in the provider"), "{m}"),
        other => panic!("expected Invalid, got {other:?}"),
    }
    assert_eq!(*p.get_key("dup").unwrap().unwrap().key, *first.key, "the first key is untouched");
}

#[test]
fn missing_key_is_none() {
    let Some(server) = Server::start() else { return };
    let p = server.provider();
    assert!(p.get_key("no-such-key").unwrap().is_none());
    p.create_key("other", 16).unwrap();
    assert!(p.get_key("no-such-key").unwrap().is_none());
    assert!(p.get_key("othe").unwrap().is_none(), "names match exactly");
}

#[test]
fn check_succeeds() {
    let Some(server) = Server::start() else { return };
    KeyProvider::check(&server.provider()).unwrap();
}

#[test]
fn client_certificate_from_untrusted_ca_is_refused() {
    let Some(server) = Server::start() else { return };
    let p = KmipProvider::new(server.options("rogue", "ca"));
    for m in
        [provider_error(KeyProvider::check(&p)), provider_error(p.get_key("k")), provider_error(p.create_key("k", 16))]
    {
        let lower = m.to_lowercase();
        assert!(m.contains(&format!("127.0.0.1:{}", server.port)), "{m}");
        assert!(
            ["tls", "certificate", "handshake"].iter().any(|w| lower.contains(w)),
            "the error should say that TLS failed: {m}"
        );
    }
    // nothing was created by the refused client
    assert!(server.provider().get_key("k").unwrap().is_none());
}

#[test]
fn server_certificate_from_other_ca_is_refused() {
    let Some(server) = Server::start() else { return };
    let p = KmipProvider::new(server.options("client", "otherca"));
    let m = provider_error(KeyProvider::check(&p));
    assert!(m.contains(&format!("127.0.0.1:{}", server.port)), "{m}");
    assert!(m.contains("TLS") && m.to_lowercase().contains("certificate"), "{m}");
    provider_error(p.get_key("k"));
}

#[test]
fn closed_port_is_connection_refused() {
    // no server listens on the port (the certificates are read before connecting)
    let pki = Pki::new();
    let port = free_port();
    let p = KmipProvider::new(KmipOptions {
        host: "127.0.0.1".into(),
        port,
        cert_path: pki.path("client.crt"),
        key_path: pki.path("client.key"),
        ca_path: pki.path("ca.crt"),
    });
    for m in
        [provider_error(KeyProvider::check(&p)), provider_error(p.get_key("k")), provider_error(p.create_key("k", 32))]
    {
        assert!(m.contains(&format!("127.0.0.1:{port}")), "{m}");
        assert!(m.to_lowercase().contains("connection refused"), "{m}");
    }
}

/// The Python interpreter that runs `pykmip-server`: `$PYKMIP_PYTHON`, else the one of its
/// `#!` line when that is a Python, else `python3` (for wrappers such as pyenv's shims).
fn python_of(server_bin: &Path) -> Vec<String> {
    if let Ok(p) = std::env::var("PYKMIP_PYTHON") {
        return vec![p];
    }
    let text = fs::read(server_bin).unwrap_or_default();
    let first = String::from_utf8_lossy(text.split(|&b| b == b'\n').next().unwrap_or_default()).into_owned();
    let mut words: Vec<String> = first.strip_prefix("#!").unwrap_or("").split_whitespace().map(String::from).collect();
    if words.first().is_some_and(|w| w.ends_with("/env")) {
        words.remove(0);
    }
    let is_python = |w: &String| Path::new(w).file_name().is_some_and(|n| n.to_string_lossy().starts_with("python"));
    if words.first().is_some_and(is_python) {
        words
    } else {
        vec!["python3".into()]
    }
}

#[test]
fn keys_made_by_other_clients() {
    let Some(server) = Server::start() else { return };
    let bin = find_pykmip_server().unwrap();
    let python = python_of(&bin);
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/kmip/other_client.py");
    let out = Command::new(&python[0])
        .args(&python[1..])
        .arg(&script)
        .arg(server.port.to_string())
        .args([server.pki.path("client.crt"), server.pki.path("client.key"), server.pki.path("ca.crt")])
        .output()
        .unwrap();
    assert!(out.status.success(), "{script:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    let hex = String::from_utf8(out.stdout).unwrap();
    let p = server.provider();

    // a key generated by the server, not by this provider
    let key = p.get_key("made-by-pykmip").unwrap().unwrap();
    let key_hex: String = key.key.iter().map(|b| format!("{b:02x}")).collect();
    assert_eq!(key_hex, hex.trim());
    assert!(matches!(p.create_key("made-by-pykmip", 32), Err(TdeError::Invalid(_))));

    // two keys with one name: refuse to pick one
    let m = provider_error(p.get_key("twice"));
    assert!(m.contains("2 symmetric keys are named \"twice\""), "{m}");
    assert!(!m.contains("0101") && !m.contains("0202"), "no key bytes in messages: {m}");
}

/// A server that accepts, answers with the start of a TLS record and then sends one byte
/// every 200 ms: every read completes well within the read timeout, so only the
/// operation's deadline can end the call (before the deadline, it would wait for the
/// record's 16 KiB for almost an hour).  Needs no pykmip-server, only certificates.
#[test]
fn a_trickling_server_is_cut_off_by_the_operation_deadline() {
    use std::io::Write;
    let pki = Pki::new();
    let listener = TcpListener::bind((LOCALHOST, 0)).unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { return };
            std::thread::spawn(move || {
                // A handshake record header announcing 16384 bytes, then one byte at a time.
                if conn.write_all(&[0x16, 0x03, 0x03, 0x40, 0x00]).is_err() {
                    return;
                }
                while conn.write_all(&[0x00]).is_ok() {
                    std::thread::sleep(Duration::from_millis(200));
                }
            });
        }
    });
    let options = KmipOptions {
        host: "127.0.0.1".into(),
        port,
        cert_path: pki.path("client.crt"),
        key_path: pki.path("client.key"),
        ca_path: pki.path("ca.crt"),
    };
    let provider = KmipProvider::new(options).with_operation_timeout(Duration::from_secs(2));
    let started = Instant::now();
    let message = provider_error(provider.get_key("any"));
    let took = started.elapsed();
    assert!(took < Duration::from_secs(6), "the call took {took:?}: {message}");
    assert!(took >= Duration::from_millis(1500), "ended before the deadline ({took:?}): {message}");
    assert!(message.contains("timed out"), "{message}");
    assert!(message.contains("the whole operation 2 s"), "{message}");
}

// ---------------------------------------------------------------------------------------
// The provider as a KeyWrapper
// ---------------------------------------------------------------------------------------

/// Run `body` (Python, indented by 4 spaces) with `client`, a PyKMIP `ProxyKmipClient`
/// connected to `server` with the good client certificate, and `args` in `sys.argv[5:]`;
/// returns what it prints.
fn pykmip_client(server: &Server, body: &str, args: &[&str]) -> String {
    let python = python_of(&find_pykmip_server().unwrap());
    let script = format!(
        "import sys, warnings\n\
         warnings.simplefilter('ignore')\n\
         from kmip.core import enums\n\
         from kmip.pie.client import ProxyKmipClient\n\
         port, cert, key, ca = sys.argv[1:5]\n\
         client = ProxyKmipClient(hostname='127.0.0.1', port=int(port), cert=cert, key=key, ca=ca,\n\
         \x20                        config_file='/dev/null', kmip_version=enums.KMIPVersion.KMIP_1_2)\n\
         with client:\n{body}\n"
    );
    let out = Command::new(&python[0])
        .args(&python[1..])
        .arg("-c")
        .arg(&script)
        .arg(server.port.to_string())
        .args([server.pki.path("client.crt"), server.pki.path("client.key"), server.pki.path("ca.crt")])
        .args(args)
        .output()
        .unwrap();
    assert!(out.status.success(), "python failed:\n{script}\n{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

/// The operations the server logged ("Processing operation: X"), in order.
fn logged_operations(server: &Server) -> Vec<String> {
    let log = fs::read_to_string(server.pki.path("server.log")).unwrap_or_default();
    log.lines().filter_map(|l| l.split("Processing operation: ").nth(1)).map(|op| op.trim().to_string()).collect()
}

fn random_key(len: usize) -> Vec<u8> {
    let mut key = vec![0u8; len];
    getrandom::fill(&mut key).unwrap();
    key
}

fn contains_window(haystack: &[u8], needle: &[u8], window: usize) -> bool {
    needle.windows(window).any(|w| haystack.windows(window).any(|h| h == w))
}

fn refused(r: Result<impl std::fmt::Debug, TdeError>) -> String {
    match r {
        Err(TdeError::Refused(m)) => {
            eprintln!("refused: {m}");
            m
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
}

#[test]
fn wrap_round_trip_never_gets_the_key() {
    let Some(server) = Server::start() else { return };
    let p = server.provider();
    let name = "wrapping key";
    p.prepare_key(name).unwrap();
    p.prepare_key(name).unwrap(); // already there: fine
    KeyWrapper::check(&p).unwrap();

    let key = random_key(32);
    let wrapped = p.wrap(name, &key).unwrap();
    assert_eq!(wrapped.kms_key_id, name);
    let uid = wrapped.kms_key_version.clone().expect("the key object's Unique Identifier");
    assert_eq!(&wrapped.blob[..5], b"TKW\x01\x01");
    assert_eq!(wrapped.blob.len(), 7 + wrapped.blob[5] as usize + 16 + 32);
    assert!(!contains_window(&wrapped.blob, &key, 4), "the blob must not contain the key");
    let debug = format!("{wrapped:?}");
    assert!(debug.contains("blob_len") && !debug.contains("blob:"), "{debug}");
    assert_eq!(*p.unwrap(&wrapped).unwrap(), key);

    // The server draws a new IV each time.
    let again = p.wrap(name, &key).unwrap();
    assert_ne!(again.blob, wrapped.blob);
    assert_eq!(again.kms_key_version.as_deref(), Some(uid.as_str()));
    assert_eq!(*p.unwrap(&again).unwrap(), key);

    // Without the object identifier, the key is found by name.
    let by_name = WrappedKey { kms_key_version: None, ..wrapped.clone() };
    assert_eq!(*p.unwrap(&by_name).unwrap(), key);

    // A 16-byte key, and a second wrapping key.
    p.prepare_key("other wrapping key").unwrap();
    let short = random_key(16);
    let w16 = p.wrap("other wrapping key", &short).unwrap();
    assert_ne!(w16.kms_key_version, wrapped.kms_key_version);
    assert_eq!(*p.unwrap(&w16).unwrap(), short);
    assert_eq!(p.rewrap(&w16).unwrap(), None);

    // The key of another object does not open the blob.
    let crossed = WrappedKey { kms_key_version: w16.kms_key_version.clone(), ..wrapped.clone() };
    let e = p.unwrap(&crossed).unwrap_err();
    eprintln!("crossed: {e}");

    // Bad input.
    assert!(matches!(p.wrap(name, &[]), Err(TdeError::Invalid(_))));
    assert!(matches!(p.wrap("", &key), Err(TdeError::Invalid(_))));
    assert!(matches!(p.prepare_key(""), Err(TdeError::Invalid(_))));

    // The server created each key once, encrypted and decrypted, and was never asked for
    // a key (`Get`).
    let ops = logged_operations(&server);
    assert!(!ops.is_empty(), "no operations in the server log:\n{}", server.logs());
    assert!(!ops.iter().any(|op| op == "Get"), "a Get was sent: {ops:?}");
    assert_eq!(ops.iter().filter(|op| *op == "Create").count(), 2, "{ops:?}");
    assert_eq!(ops.iter().filter(|op| *op == "Activate").count(), 2, "{ops:?}");
    assert!(ops.iter().any(|op| op == "Encrypt") && ops.iter().any(|op| op == "Decrypt"), "{ops:?}");

    // The key the provider created may only encrypt and decrypt (no Export, no Wrap Key)
    // and is Active.
    let attributes = pykmip_client(
        &server,
        "    _, attrs = client.get_attributes(sys.argv[5], ['Cryptographic Usage Mask', 'State',\n\
         \x20       'Cryptographic Algorithm', 'Cryptographic Length'])\n\
         \x20   for a in attrs:\n\
         \x20       v = a.attribute_value.value\n\
         \x20       print(a.attribute_name.value, getattr(v, 'name', v))\n",
        &[&uid],
    );
    let mask: u32 = attributes
        .lines()
        .find_map(|l| l.strip_prefix("Cryptographic Usage Mask "))
        .unwrap_or_else(|| panic!("no usage mask in {attributes}"))
        .parse()
        .unwrap();
    assert_eq!(mask, 0x4 | 0x8, "Encrypt|Decrypt only: {attributes}");
    assert_eq!(mask & 0x40, 0, "no Export bit");
    assert!(attributes.contains("State ACTIVE"), "{attributes}");
    assert!(attributes.contains("Cryptographic Algorithm AES"), "{attributes}");
    assert!(attributes.contains("Cryptographic Length 256"), "{attributes}");
}

#[test]
fn tampered_blobs_are_not_unwrapped() {
    let Some(server) = Server::start() else { return };
    let p = server.provider();
    p.prepare_key("k").unwrap();
    let key = random_key(32);
    let wrapped = p.wrap("k", &key).unwrap();
    let nonce_len = wrapped.blob[5] as usize;
    // a byte of the nonce, of the tag and of the ciphertext
    for at in [7, 7 + nonce_len, 7 + nonce_len + 16, wrapped.blob.len() - 1] {
        let mut bad = wrapped.clone();
        bad.blob[at] ^= 0x01;
        // PyKMIP answers a tag mismatch with General Failure: not a refusal of the key
        let m = provider_error(p.unwrap(&bad));
        assert!(m.contains("Decrypt with key \"k\""), "tampered at {at}: {m}");
        assert!(!m.contains(&format!("{:02x}{:02x}", key[0], key[1])));
    }
    // cut short: the server's tag check refuses it; garbled headers are refused here
    let mut cut = wrapped.clone();
    cut.blob.pop();
    p.unwrap(&cut).expect_err("a shortened blob must not unwrap");
    let mut cut = wrapped.clone();
    cut.blob.truncate(7 + nonce_len + 16);
    let m = provider_error(p.unwrap(&cut));
    assert!(m.contains("\"k\"") && m.contains("truncated"), "{m}");
    let m = provider_error(p.unwrap(&WrappedKey { blob: b"garbage".to_vec(), ..wrapped.clone() }));
    assert!(m.contains("magic"), "{m}");
    // an object that does not exist
    let m = refused(p.unwrap(&WrappedKey { kms_key_version: Some("999999".into()), ..wrapped.clone() }));
    assert!(m.contains("Item Not Found"), "{m}");
    // the real one still works
    assert_eq!(*p.unwrap(&wrapped).unwrap(), key);
}

#[test]
fn revoked_and_destroyed_keys_are_refused() {
    let Some(server) = Server::start() else { return };
    let p = server.provider();
    let endpoint = format!("127.0.0.1:{}", server.port);
    let key = random_key(32);
    for name in ["retired", "compromised"] {
        p.prepare_key(name).unwrap();
    }
    let retired = p.wrap("retired", &key).unwrap();
    let compromised = p.wrap("compromised", &key).unwrap();
    let revoke = |wrapped: &WrappedKey, reason: &str| {
        pykmip_client(
            &server,
            &format!("    client.revoke(enums.RevocationReasonCode.{reason}, sys.argv[5])\n"),
            &[wrapped.kms_key_version.as_deref().unwrap()],
        );
    };

    // Revoked for "cessation of operation": the key is Deactivated.
    revoke(&retired, "CESSATION_OF_OPERATION");
    let m = refused(p.unwrap(&retired));
    assert!(m.contains(&endpoint) && m.contains("\"retired\"") && m.contains("Permission Denied"), "{m}");
    let m = refused(p.wrap("retired", &key));
    assert!(m.contains("Encrypt") && m.contains("Permission Denied"), "{m}");
    // prepare_key takes the name as taken (it does not create a second key)
    p.prepare_key("retired").unwrap();
    refused(p.wrap("retired", &key));

    // Revoked as compromised.
    revoke(&compromised, "KEY_COMPROMISE");
    let m = refused(p.unwrap(&compromised));
    assert!(m.contains("\"compromised\"") && m.contains("Permission Denied"), "{m}");

    // Destroyed: the object is gone.
    pykmip_client(&server, "    client.destroy(sys.argv[5])\n", &[retired.kms_key_version.as_deref().unwrap()]);
    let m = refused(p.unwrap(&retired));
    assert!(m.contains("\"retired\"") && m.contains("Item Not Found"), "{m}");
    let m = refused(p.wrap("retired", &key));
    assert!(m.contains("no symmetric key named \"retired\""), "{m}");
    let m = refused(p.unwrap(&WrappedKey { kms_key_version: None, ..retired.clone() }));
    assert!(m.contains("no symmetric key named \"retired\""), "{m}");

    // No Get was ever sent by the provider (the PyKMIP client only revoked and destroyed).
    let ops = logged_operations(&server);
    assert!(!ops.iter().any(|op| op == "Get"), "{ops:?}");
}

#[test]
fn a_stopped_server_is_a_provider_error_not_a_refusal() {
    let Some(mut server) = Server::start() else { return };
    let p = server.provider();
    p.prepare_key("k").unwrap();
    let wrapped = p.wrap("k", &random_key(32)).unwrap();
    kill_server(&mut server.child);
    for m in
        [provider_error(p.unwrap(&wrapped)), provider_error(p.wrap("k", &[1; 32])), provider_error(p.prepare_key("k"))]
    {
        assert!(m.contains(&format!("127.0.0.1:{}", server.port)), "{m}");
        assert!(m.to_lowercase().contains("connection refused"), "{m}");
    }
    provider_error(KeyWrapper::check(&p));
}

#[test]
fn wrapping_with_an_untrusted_client_certificate_is_a_provider_error() {
    let Some(server) = Server::start() else { return };
    server.provider().prepare_key("k").unwrap();
    let wrapped = server.provider().wrap("k", &[7; 32]).unwrap();
    let rogue = KmipProvider::new(server.options("rogue", "ca"));
    for m in [provider_error(rogue.unwrap(&wrapped)), provider_error(rogue.wrap("k", &[7; 32]))] {
        assert!(m.contains("TLS") || m.to_lowercase().contains("certificate"), "{m}");
    }
}
