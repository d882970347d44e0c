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
use tde_core::provider::{KmipOptions, KmipProvider};
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
    server.provider().check().unwrap();
}

#[test]
fn client_certificate_from_untrusted_ca_is_refused() {
    let Some(server) = Server::start() else { return };
    let p = KmipProvider::new(server.options("rogue", "ca"));
    for m in [provider_error(p.check()), provider_error(p.get_key("k")), provider_error(p.create_key("k", 16))] {
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
    let m = provider_error(p.check());
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
    for m in [provider_error(p.check()), provider_error(p.get_key("k")), provider_error(p.create_key("k", 32))] {
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
