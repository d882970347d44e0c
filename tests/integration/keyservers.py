"""Real key servers for the integration tests (SPEC §10): OpenBao and PyKMIP.

`openbao()` and `pykmip()` are context managers that start a server on a free
port of 127.0.0.1 in its own process group, in a temporary directory, and kill
the whole group when they exit.  The facts they rely on are those of the Rust
harnesses (crates/tde-core/tests/vault_openbao.rs and kmip_pykmip.rs):

- OpenBao: `bao server -dev -dev-tls` with a random root token; the dev CA is
  `vault-ca.pem` in the `-dev-tls-cert-dir`; a KV v2 mount `kv2` and a KV v1
  mount `kv1` are enabled through the HTTP API.
- PyKMIP: `pykmip-server -f CONF -l LOG` with `auth_suite=TLS1.2` and client
  certificates; ECDSA P-256 certificates made with the `openssl` command (a
  test CA, a server certificate for 127.0.0.1, a client certificate with the
  clientAuth EKU, and a "rogue" client certificate signed by an unrelated CA).

The PostgreSQL server runs as an unprivileged OS user and reads the token
file, the CA, the client certificate and its key: every file a provider names
is owned by that user (mode 0600) in a directory it may enter.

The binaries are `$BAO_BIN` / `$PYKMIP_SERVER`, else the one in python3's
scripts directory (`scripts/install-test-servers.sh` installs them there), else
the one on PATH.  When a binary is missing the tests fail: they are never
skipped.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sysconfig
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import pytest

from cluster import chown, make_dir

STARTUP_TIMEOUT = 90  # seconds: a busy 2-core machine


# ---------------------------------------------------------------------------
# helpers


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def _executable(p: Path) -> bool:
    return p.is_file() and os.access(p, os.X_OK)


def find_binary(name: str, env: str) -> Path:
    """`$env`, python3's scripts directory, PATH; fails the test when absent."""
    if os.environ.get(env):
        p = Path(os.environ[env])
        if not _executable(p):
            pytest.fail(f"{env}={p} is not an executable file")
        return p
    candidates = [Path(sysconfig.get_path("scripts")) / name]
    try:
        out = subprocess.run(
            ["python3", "-c", "import sysconfig; print(sysconfig.get_path('scripts'))"],
            capture_output=True, text=True, timeout=60,
        ).stdout.strip()
        if out:
            candidates.append(Path(out) / name)
    except (OSError, subprocess.SubprocessError):
        pass
    on_path = shutil.which(name)
    if on_path:
        candidates.append(Path(on_path))
    for p in candidates:
        if _executable(p):
            return p
    pytest.fail(
        f"the `{name}` binary was not found (${env}, python3's scripts directory, PATH): "
        "run `bash scripts/install-test-servers.sh`"
    )


def give_to_server(path: Path, mode: int = 0o600) -> Path:
    """Make a file readable by the PostgreSQL server's OS user only."""
    chown(path)
    os.chmod(path, mode)
    return path


def write_private(path: Path, contents: str | bytes) -> Path:
    """Write a file (token, key...) that the PostgreSQL server's OS user reads."""
    data = contents.encode() if isinstance(contents, str) else contents
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    give_to_server(tmp)
    os.replace(tmp, path)
    return path


def openssl(cwd: Path, *args: str) -> None:
    r = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, f"openssl {args} failed: {r.stderr}"


def make_ca(directory: Path, name: str, cn: str) -> Path:
    """A self-signed ECDSA P-256 CA: `name.crt` and `name.key`."""
    openssl(directory, "genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", f"{name}.key")
    openssl(
        directory, "req", "-x509", "-new", "-key", f"{name}.key", "-subj", f"/CN={cn}", "-days", "2", "-sha256",
        "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        "-out", f"{name}.crt",
    )
    for f in (f"{name}.crt", f"{name}.key"):
        give_to_server(directory / f)
    return directory / f"{name}.crt"


def make_leaf(directory: Path, name: str, ca: str, cn: str, extensions: str) -> None:
    """`name.crt` / `name.key` signed by the CA `ca`."""
    openssl(directory, "genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", f"{name}.key")
    (directory / f"{name}.ext").write_text(extensions)
    openssl(directory, "req", "-new", "-key", f"{name}.key", "-subj", f"/CN={cn}", "-out", f"{name}.csr")
    openssl(
        directory, "x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.crt", "-CAkey", f"{ca}.key",
        "-CAcreateserial", "-days", "2", "-sha256", "-extfile", f"{name}.ext", "-out", f"{name}.crt",
    )
    for f in (f"{name}.crt", f"{name}.key"):
        give_to_server(directory / f)


def _kill_group(proc: subprocess.Popen, grace: float = 0) -> None:
    """Kill a server's process group.  With `grace`, SIGTERM the server first so
    that it reaps its own children (PyKMIP's policy monitor is a child process:
    killed together with its parent it would stay a zombie, as PID 1 here may
    not reap orphans)."""
    if grace and proc.poll() is None:
        try:
            proc.terminate()
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        proc.kill()
    except ProcessLookupError:
        pass
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        pass


def _tail(path: Path, n: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except FileNotFoundError:
        return "(no log)"


def _server_env() -> dict:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("BAO_", "VAULT_")) and k.lower() not in ("http_proxy", "https_proxy", "all_proxy")}
    return env


# ---------------------------------------------------------------------------
# OpenBao


class OpenBao:
    """A `bao server -dev -dev-tls` with KV v2 mount `kv2` and KV v1 mount `kv1`."""

    def __init__(self, binary: Path):
        self.binary = binary
        self.dir = make_dir("openbao")
        self.root_token = "root-" + os.urandom(12).hex()
        self.ca = self.dir / "vault-ca.pem"
        self.token_file = self.dir / "root-token"
        self.log = self.dir / "bao.log"
        self.port = 0
        self.proc: subprocess.Popen | None = None
        write_private(self.token_file, self.root_token + "\n")

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    # -- lifecycle ---------------------------------------------------------------

    def start(self, port: int | None = None) -> None:
        """Start (or start again, on the same port, with the same root token and
        CA path: a dev server's storage is in memory, so it starts empty)."""
        last = ""
        for _ in range(3 if port is None else 10):
            self.port = port or free_port()
            if self._try_start():
                give_to_server(self.ca, 0o644)
                self.mount("kv2", 2)
                self.mount("kv1", 1)
                return
            last = _tail(self.log)
            if port is not None:
                time.sleep(1)  # the old process's sockets may linger a moment
        raise RuntimeError(f"OpenBao did not start; its last log:\n{last}")

    def _try_start(self) -> bool:
        if self.ca.exists():
            self.ca.unlink()
        home = self.dir / "home"
        home.mkdir(exist_ok=True)
        env = _server_env()
        env["HOME"] = str(home)
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [
                    str(self.binary), "server", "-dev", "-dev-tls", "-dev-no-store-token",
                    f"-dev-listen-address=127.0.0.1:{self.port}",
                    f"-dev-root-token-id={self.root_token}",
                    f"-dev-tls-cert-dir={self.dir}",
                ],
                cwd=self.dir, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                start_new_session=True,
            )
        deadline = time.time() + STARTUP_TIMEOUT
        while time.time() < deadline:
            if self.proc.poll() is not None:
                return False
            if self.ca.exists() and self.ca.stat().st_size > 0:
                try:
                    status, _ = self.api("GET", "sys/health")
                    if status == 200:
                        return True
                except (OSError, ssl.SSLError, ValueError):
                    pass
            time.sleep(0.2)
        self.stop()
        return False

    def stop(self) -> None:
        if self.proc is not None:
            _kill_group(self.proc)
            self.proc = None

    def restart(self) -> None:
        """Kill the server and start a fresh (empty) one on the same port."""
        self.stop()
        self.start(self.port)

    # -- HTTP API ----------------------------------------------------------------

    def api(self, method: str, path: str, body=None, namespace: str | None = None, token: str | None = None):
        """(HTTP status, parsed JSON or None) of a call to /v1/<path> as root."""
        ctx = ssl.create_default_context(cafile=str(self.ca))
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}), urllib.request.HTTPSHandler(context=ctx))
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(f"{self.url}/v1/{path}", data=data, method=method)
        req.add_header("X-Vault-Token", token or self.root_token)
        if data is not None:
            req.add_header("Content-Type", "application/json")
        if namespace:
            req.add_header("X-Vault-Namespace", namespace)
        try:
            with opener.open(req, timeout=30) as resp:
                status, text = resp.status, resp.read()
        except urllib.error.HTTPError as e:
            status, text = e.code, e.read()
        try:
            return status, (json.loads(text) if text else None)
        except ValueError:
            return status, None

    def ok(self, method: str, path: str, body=None, namespace: str | None = None):
        status, v = self.api(method, path, body, namespace)
        assert 200 <= status < 300, f"{method} {path}: HTTP {status}: {v}"
        return v

    def mount(self, path: str, version: int, namespace: str | None = None) -> None:
        self.ok("POST", f"sys/mounts/{path}", {"type": "kv", "options": {"version": str(version)}}, namespace)

    def create_namespace(self, name: str) -> None:
        self.ok("POST", f"sys/namespaces/{name}", {})

    def put_key(self, name: str, key: bytes, mount: str = "kv2", namespace: str | None = None) -> None:
        """Store a key the way pg_tde does (KV v2 secret {"key": base64})."""
        self.ok("POST", f"{mount}/data/{name}", {"data": {"key": base64.b64encode(key).decode()}}, namespace)

    def get_key(self, name: str, mount: str = "kv2", namespace: str | None = None) -> bytes | None:
        status, v = self.api("GET", f"{mount}/data/{name}", namespace=namespace)
        if status == 404:
            return None
        assert status == 200, f"GET {mount}/data/{name}: HTTP {status}: {v}"
        return base64.b64decode(v["data"]["data"]["key"])

    # -- files -------------------------------------------------------------------

    def file(self, name: str, contents: str | bytes) -> Path:
        """A file in the server's directory that the PostgreSQL server can read."""
        return write_private(self.dir / name, contents)

    def unrelated_ca(self) -> Path:
        """A CA that signed nothing the server uses."""
        return make_ca(self.dir, "unrelated-ca", "unrelated test CA")

    def destroy(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


@contextmanager
def openbao():
    bao = OpenBao(find_binary("bao", "BAO_BIN"))
    try:
        bao.start()
        yield bao
    finally:
        bao.destroy()


# ---------------------------------------------------------------------------
# PyKMIP


class PyKmip:
    """A `pykmip-server` with TLS 1.2 and client certificates; its database is a
    SQLite file, so it keeps its keys across `restart()`."""

    def __init__(self, binary: Path):
        self.binary = binary
        self.dir = make_dir("pykmip")
        self.port = 0
        self.proc: subprocess.Popen | None = None
        d = self.dir
        make_ca(d, "ca", "pg_tde test CA")
        make_ca(d, "otherca", "unrelated test CA")
        leaf = "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\n"
        make_leaf(d, "server", "ca", "127.0.0.1",
                  leaf + "extendedKeyUsage=serverAuth\nsubjectAltName=IP:127.0.0.1,DNS:localhost\n")
        make_leaf(d, "client", "ca", "pg_tde", leaf + "extendedKeyUsage=clientAuth\n")
        make_leaf(d, "rogue", "otherca", "pg_tde", leaf + "extendedKeyUsage=clientAuth\n")
        (d / "policies").mkdir()
        self.ca = d / "ca.crt"
        self.other_ca = d / "otherca.crt"
        self.client_cert, self.client_key = d / "client.crt", d / "client.key"
        self.rogue_cert, self.rogue_key = d / "rogue.crt", d / "rogue.key"
        self.log = d / "server.log"
        self.out = d / "server.out"

    def start(self, port: int | None = None) -> None:
        for _ in range(3 if port is None else 10):
            self.port = port or free_port()
            if self._try_start():
                return
            if port is not None:
                time.sleep(1)
        raise RuntimeError(f"pykmip-server did not start:\n{self.logs()}")

    def _try_start(self) -> bool:
        d = self.dir
        (d / "server.conf").write_text(
            "[server]\nhostname=127.0.0.1\n"
            f"port={self.port}\ncertificate_path={d / 'server.crt'}\nkey_path={d / 'server.key'}\n"
            f"ca_path={d / 'ca.crt'}\nauth_suite=TLS1.2\npolicy_path={d / 'policies'}\n"
            f"enable_tls_client_auth=True\nlogging_level=INFO\ndatabase_path={d / 'pykmip.db'}\n"
        )
        env = _server_env()
        env["PYTHONWARNINGS"] = "ignore"
        with open(self.out, "ab") as out:
            self.proc = subprocess.Popen(
                [str(self.binary), "-f", str(d / "server.conf"), "-l", str(self.log)],
                cwd=d, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=out, start_new_session=True,
            )
        deadline = time.time() + STARTUP_TIMEOUT
        while time.time() < deadline:
            if self.proc.poll() is not None:
                return False
            if port_open(self.port):
                return True
            time.sleep(0.2)
        self.stop()
        return False

    def stop(self) -> None:
        if self.proc is not None:
            _kill_group(self.proc, grace=15)
            self.proc = None

    def restart(self) -> None:
        """Stop the server and start it again on the same port, with the same keys."""
        self.stop()
        self.start(self.port)

    def logs(self) -> str:
        return f"--- output ---\n{_tail(self.out)}\n--- log ---\n{_tail(self.log)}"

    def full_log(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def revoke(self, uid: str, reason: str = "CESSATION_OF_OPERATION") -> None:
        """Revoke a key with PyKMIP's own client (a revoked key cannot be reactivated)."""
        first = self.binary.read_text(errors="replace").splitlines()[0]
        python = first[2:].split() if first.startswith("#!") else ["python3"]
        script = (
            "import sys, warnings\nwarnings.simplefilter('ignore')\n"
            "from kmip.core import enums\nfrom kmip.pie.client import ProxyKmipClient\n"
            "c = ProxyKmipClient(hostname='127.0.0.1', port=int(sys.argv[1]), cert=sys.argv[2], key=sys.argv[3],"
            " ca=sys.argv[4], config_file='/dev/null', kmip_version=enums.KMIPVersion.KMIP_1_2)\n"
            "with c:\n    c.revoke(getattr(enums.RevocationReasonCode, sys.argv[6]), sys.argv[5])\n"
        )
        subprocess.run(python + ["-c", script, str(self.port), str(self.client_cert), str(self.client_key),
                                 str(self.ca), uid, reason], check=True, capture_output=True)

    def destroy(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


@contextmanager
def pykmip():
    server = PyKmip(find_binary("pykmip-server", "PYKMIP_SERVER"))
    try:
        server.start()
        yield server
    finally:
        server.destroy()
