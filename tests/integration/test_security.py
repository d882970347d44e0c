"""Security hardening (issue 15): what reaches clients, what key
administrators can reach, what stays in memory.

Each test failed before its fix.
"""

from __future__ import annotations

import os
import subprocess

import pytest

from cluster import BIN, Cluster, as_user


@pytest.fixture
def backtrace_env_cluster():
    """A server started from an environment set up for Rust development
    (RUST_BACKTRACE=full), as a DBA's shell may be."""
    c = Cluster("rust-env")
    c.initdb()
    env = dict(os.environ, RUST_BACKTRACE="full")
    r = subprocess.run(
        as_user([str(BIN / "pg_ctl"), "-D", str(c.datadir), "-l", str(c.logfile), "-w", "-t", "120", "start"]),
        env=env, capture_output=True, text=True,
    )
    assert r.returncode == 0, c.log_tail()
    yield c
    c.destroy()


def _error_output(c: Cluster, query: str) -> str:
    r = subprocess.run(c.psql_args() + ["-v", "VERBOSITY=verbose"], input=query, capture_output=True, text=True)
    assert r.returncode != 0 or "ERROR" in r.stderr, r
    return r.stderr


def _no_rust(out: str) -> None:
    """No Rust backtrace or source path, beyond the LOCATION line that every
    error carries in verbose mode."""
    text = "\n".join(line for line in out.splitlines() if not line.startswith("LOCATION:"))
    for sign in ("backtrace", ".rs:", "pgrx", "rust_begin_unwind", "   0: "):
        assert sign not in text, f"{sign!r} in what the client got:\n{out}"


def test_errors_reach_clients_as_postgresql_raised_them(backtrace_env_cluster):
    c = backtrace_env_cluster
    c.sql("CREATE EXTENSION pg_tde")
    # an error that has nothing to do with pg_tde, through pg_tde's utility hook
    out = _error_output(c, "CREATE DATABASE postgres")
    assert "42P04" in out and 'database "postgres" already exists' in out, out
    assert "DETAIL" not in out, out
    _no_rust(out)
    # with every field PostgreSQL gives it (constraint, table, schema)
    c.sql("CREATE TABLE t (a int); INSERT INTO t VALUES (1)")
    out = _error_output(c, "ALTER TABLE t ADD CONSTRAINT c CHECK (a > 5)")
    assert "23514" in out, out
    for field in ("SCHEMA NAME:  public", "TABLE NAME:  t", "CONSTRAINT NAME:  c"):
        assert field in out, f"{field!r} missing:\n{out}"
    _no_rust(out)
    # an error of pg_tde's own
    out = _error_output(c, "SELECT pg_tde_set_key_using_database_key_provider('k', 'no-such-provider')")
    _no_rust(out)


# ---------------------------------------------------------------------------
# Case 1: what a key administrator can reach on the server's file system


@pytest.fixture
def key_admin(tde):
    """A cluster with a key administrator `ka` that is not a superuser."""
    tde.sql("CREATE ROLE ka LOGIN; SELECT pg_tde_grant_global_key_management_to_role('ka');"
            "SELECT pg_tde_grant_database_key_management_to_role('ka')")
    return tde


def _as(c: Cluster, role: str, query: str):
    r = subprocess.run(c.psql_args() + ["-U", role, "-v", "ON_ERROR_STOP=1", "-v", "VERBOSITY=verbose"],
                       input=query, capture_output=True, text=True)
    return r


def test_key_admin_cannot_create_files_in_the_data_directory(key_admin, keyring):
    c = key_admin
    signal = c.datadir / "standby.signal"
    r = _as(c, "ka", f"SELECT pg_tde_add_global_key_provider_file('x', '{signal}')")
    assert r.returncode != 0 and "42501" in r.stderr and "pg_write_server_files" in r.stderr, r.stderr
    assert not signal.exists()
    # with pg_write_server_files, files outside the data directory only
    c.sql("GRANT pg_write_server_files TO ka")
    r = _as(c, "ka", f"SELECT pg_tde_add_global_key_provider_file('x', '{signal}')")
    assert r.returncode != 0 and "inside the data directory" in r.stderr, r.stderr
    assert not signal.exists()
    for inside in (c.datadir / "pg_tde" / "16384_keys", c.datadir / "base" / ".." / "postgresql.auto.conf"):
        r = _as(c, "ka", f"SELECT pg_tde_add_global_key_provider_file('y', '{inside}')")
        assert r.returncode != 0 and "inside the data directory" in r.stderr, r.stderr
    # also through a symbolic link to it, and for a superuser
    link = keyring / "to-data"
    link.symlink_to(c.datadir)
    e = c.sql_error(f"SELECT pg_tde_add_global_key_provider_file('z', '{link}/standby.signal')")
    assert "inside the data directory" in e.message, e.output
    assert not signal.exists()
    r = _as(c, "ka", f"SELECT pg_tde_add_global_key_provider_file('ok', '{keyring}/ka.json')")
    assert r.returncode == 0, r.stderr
    c.restart()
    assert c.sql("SELECT pg_is_in_recovery()") == "f"


def test_key_admin_needs_read_rights_for_vault_and_kmip_files(key_admin):
    c = key_admin
    vault = ("SELECT pg_tde_add_global_key_provider_vault_v2('v', 'https://127.0.0.1:1', 'secret', "
             f"'{c.datadir}/postgresql.auto.conf', NULL)")
    r = _as(c, "ka", vault)
    assert r.returncode != 0 and "42501" in r.stderr and "pg_read_server_files" in r.stderr, r.stderr
    kmip = ("SELECT pg_tde_add_global_key_provider_kmip('k', '127.0.0.1', 1, "
            f"'{c.datadir}/server.crt', '{c.datadir}/server.key', '/etc/ssl/ca.pem')")
    r = _as(c, "ka", kmip)
    assert r.returncode != 0 and "42501" in r.stderr, r.stderr


def test_vault_over_plain_http_is_refused(tde, tmp_path):
    token = tmp_path / "token"
    token.write_text("s.secret")
    q = f"SELECT pg_tde_add_global_key_provider_vault_v2('v', 'http://127.0.0.1:1', 'secret', '{token}', NULL)"
    e = tde.sql_error(q)
    assert e.sqlstate == "22023" and "https" in e.message, e.output
    # a superuser's explicit opt-in for a local test server gets past this check
    e = tde.sql_error("SET pg_tde.vault_allow_http = on; " + q)
    assert "https://" not in e.message, e.output


# ---------------------------------------------------------------------------
# Case 3: retired principal keys leave shared memory


def _shared_memory_holds(c: Cluster, needle: bytes) -> bool:
    """Whether the postmaster's writable mappings (shared memory included,
    which every backend's cache writes go to) hold `needle`.  The postmaster
    itself never handles keys."""
    pid = c.postmaster_pid()
    found = False
    with open(f"/proc/{pid}/maps") as maps, open(f"/proc/{pid}/mem", "rb", 0) as mem:
        for line in maps:
            addr, perms = line.split()[:2]
            if not perms.startswith("rw"):
                continue
            start, end = (int(x, 16) for x in addr.split("-"))
            try:
                mem.seek(start)
                if needle in mem.read(end - start):
                    found = True
            except OSError:
                continue
    return found


def test_rotated_principal_key_leaves_the_shared_cache(tde, keyring):
    import json
    c = tde
    c.sql("CREATE TABLE t (v text) USING tde_heap; INSERT INTO t VALUES ('x')")
    c.sql("SELECT pg_tde_create_key_using_database_key_provider('k2', 'file-vault')")

    def key_bytes(name):
        keys = json.loads((keyring / "keyring.json").read_text())["keys"]
        return bytes.fromhex(next(k["key_hex"] for k in keys if k["name"] == name))

    old, new = key_bytes("principal-key"), key_bytes("k2")
    assert _shared_memory_holds(c, old), "the scan cannot see the cache"
    c.sql("SELECT pg_tde_set_key_using_database_key_provider('k2', 'file-vault')")
    assert c.sql("SELECT count(*) FROM t") == "1"
    assert _shared_memory_holds(c, new)
    assert not _shared_memory_holds(c, old), "the retired principal key is still in shared memory"


def _address_of(pid: int, needle: bytes) -> int | None:
    """The address of `needle` in the writable mappings of process `pid`."""
    with open(f"/proc/{pid}/maps") as maps, open(f"/proc/{pid}/mem", "rb", 0) as mem:
        for line in maps:
            addr, perms = line.split()[:2]
            if not perms.startswith("rw"):
                continue
            start, end = (int(x, 16) for x in addr.split("-"))
            try:
                mem.seek(start)
                at = mem.read(end - start).find(needle)
            except OSError:
                continue
            if at >= 0:
                return start + at
    return None


def _mapping_at(pid: int, address: int) -> dict:
    """The /proc/<pid>/smaps entry of the mapping that holds `address`:
    its VmFlags (a set) and its Locked size in kB."""
    entry = None
    with open(f"/proc/{pid}/smaps") as smaps:
        for line in smaps:
            head = line.split()
            if "-" in head[0] and len(head) >= 5 and not head[0].endswith(":"):
                start, end = (int(x, 16) for x in head[0].split("-"))
                entry = {"range": (start, end)} if start <= address < end else None
            elif entry is not None:
                if head[0] == "VmFlags:":
                    entry["flags"] = set(head[1:])
                    return entry
                if head[0] == "Locked:":
                    entry["locked_kb"] = int(head[1])
    raise AssertionError(f"no mapping of process {pid} holds {address:#x}")


def test_shared_key_cache_is_kept_out_of_core_dumps_and_swap(tde, keyring):
    import json
    c = tde
    c.sql("CREATE TABLE t (v text) USING tde_heap; INSERT INTO t VALUES ('x')")
    keys = json.loads((keyring / "keyring.json").read_text())["keys"]
    key = bytes.fromhex(next(k["key_hex"] for k in keys if k["name"] == "principal-key"))
    postmaster = c.postmaster_pid()
    address = _address_of(postmaster, key)
    assert address is not None, "the principal key is not in the shared cache"
    mapping = _mapping_at(postmaster, address)
    assert "dd" in mapping["flags"], f"the shared key cache would be in core dumps: {mapping}"
    # Forked children inherit the exclusion from core dumps.
    checkpointer = int(c.sql("SELECT pid FROM pg_stat_activity WHERE backend_type = 'checkpointer'"))
    assert "dd" in _mapping_at(checkpointer, address)["flags"]
    log = c.logfile.read_text(errors="replace")
    if "could not lock its shared key caches" in log:
        pytest.skip("the OS refused to lock the key cache (RLIMIT_MEMLOCK); the server said so in its log")
    assert "lo" in mapping["flags"] and mapping["locked_kb"] > 0, f"the shared key cache is not locked: {mapping}"


# ---------------------------------------------------------------------------
# Case 2 (part): a stalled provider holds no lock that others need


def _token_file(keyring):
    """A Vault token file the server can read (the token is never accepted)."""
    from cluster import chown
    token = keyring / "token"
    token.write_text("s.token")
    chown(token)
    return token


class _StallingServer:
    """Accepts TCP connections on 127.0.0.1 and never answers."""

    def __init__(self):
        import socket
        import threading
        self.srv = socket.socket()
        self.srv.bind(("127.0.0.1", 0))
        self.srv.listen(8)
        self.srv.settimeout(0.2)
        self.port = self.srv.getsockname()[1]
        self.conns = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        while not self.stop.is_set():
            try:
                self.conns.append(self.srv.accept()[0])
            except OSError:
                pass

    def close(self):
        self.stop.set()
        self.thread.join()
        for s in self.conns:
            s.close()
        self.srv.close()


def test_stalled_provider_check_does_not_block_key_creation(tde, keyring):
    import time
    c = tde
    stall = _StallingServer()
    token = _token_file(keyring)
    adder = subprocess.Popen(
        c.psql_args() + ["-c", f"SELECT pg_tde_add_global_key_provider_vault_v2('stalled', 'https://127.0.0.1:{stall.port}', "
                               f"'secret', '{token}', NULL)"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 10
        while not stall.conns and time.time() < deadline:
            time.sleep(0.05)
        assert stall.conns, "the provider check never connected"
        # the provider check is now stalled; key creation goes on meanwhile
        t0 = time.time()
        c.sql("CREATE TABLE during_stall (v text) USING tde_heap; INSERT INTO during_stall VALUES ('x')")
        assert time.time() - t0 < 3, "key creation waited for the stalled provider"
        assert adder.poll() is None, "the provider check was expected to still be waiting"
    finally:
        adder.wait(timeout=60)
        stall.close()
    assert adder.returncode != 0
    assert c.sql("SELECT count(*) FROM pg_tde_list_all_global_key_providers() WHERE name = 'stalled'") == "0"


def test_wal_writes_never_reach_the_provider(clusters, keyring):
    """More principal keys in use than the old 32-slot cache held, then the
    provider gone: a new backend's first WAL write (inside a critical section)
    finds the server key in the cache instead of asking the provider, which
    would be a PANIC."""
    from test_wal import new_cluster
    c = new_cluster(clusters, "sk-pinned", keyring, wal_encrypt=True)
    c.sql("CREATE TABLE h (v text) USING heap")
    # 40 principal keys through the cache in one session (whose WAL keys are
    # loaded already, so it never looks the server key up again)
    c.sql("".join(f"SELECT pg_tde_create_key_using_global_key_provider('dk{i}', 'g');"
                  f"SELECT pg_tde_set_default_key_using_global_key_provider('dk{i}', 'g');" for i in range(40)))
    moved = keyring / "keyring.json.away"
    (keyring / "keyring.json").rename(moved)
    try:
        for i in range(3):
            c.sql(f"INSERT INTO h VALUES ('w{i}')")  # a new backend each time
        assert c.sql("SELECT count(*) FROM h") == "3"
        assert "PANIC" not in c.logfile.read_text(errors="replace"), c.log_tail()
    finally:
        moved.rename(keyring / "keyring.json")


def test_first_encrypted_wal_write_finds_the_server_key_cached(clusters, keyring):
    """WAL encryption turned on for the first time: no WAL key exists, so the
    first WAL write adds one inside XLogWrite's critical section, wrapped with
    the server key's map.  The server key must have been loaded when the
    server started; fetched there from a provider that fails, it was a PANIC
    (and the crash restart PANICked again)."""
    from test_wal import new_cluster, wal_keys_path, set_wal_encrypt
    c = new_cluster(clusters, "sk-first-write", keyring, wal_encrypt=False)
    c.sql("CREATE TABLE h (v text) USING heap")
    # Nothing but our INSERT may write WAL after the next start: no standby
    # snapshots, no autovacuum, and the wal_level change logged now, in plaintext.
    c.configure("wal_level = minimal\nmax_wal_senders = 0\nautovacuum = off")
    c.restart()
    assert not wal_keys_path(c).exists()
    set_wal_encrypt(c, True)
    assert not wal_keys_path(c).exists(), "WAL was written before the test's INSERT"
    moved = keyring / "keyring.json.away"
    (keyring / "keyring.json").rename(moved)
    try:
        c.sql("INSERT INTO h VALUES ('first encrypted write')")
        assert c.sql("SELECT count(*) FROM h") == "1"
        assert "PANIC" not in c.logfile.read_text(errors="replace"), c.log_tail()
        assert wal_keys_path(c).exists()
    finally:
        moved.rename(keyring / "keyring.json")



def test_provider_calls_can_be_cancelled(tde, keyring):
    import time
    c = tde
    token = _token_file(keyring)
    stall = _StallingServer()
    try:
        q = (f"SELECT pg_tde_add_global_key_provider_vault_v2('stalled', 'https://127.0.0.1:{stall.port}', "
             f"'secret', '{token}', NULL)")
        t0 = time.time()
        e = c.sql_error("SET statement_timeout = '1s'; " + q)
        took = time.time() - t0
        assert e.sqlstate == "57014", e.output
        assert took < 3, f"statement_timeout took {took:.1f} s to end a stalled provider call"
        # and pg_cancel_backend
        import subprocess as sp
        p = sp.Popen(c.psql_args() + ["-c", q], stdout=sp.PIPE, stderr=sp.PIPE, text=True)
        deadline = time.time() + 10
        while c.sql("SELECT count(*) FROM pg_stat_activity WHERE query LIKE 'SELECT pg_tde_add_global%'") != "1":
            assert time.time() < deadline
            time.sleep(0.05)
        time.sleep(0.3)
        t0 = time.time()
        c.sql("SELECT pg_cancel_backend(pid) FROM pg_stat_activity WHERE query LIKE 'SELECT pg_tde_add_global%'")
        _, err = p.communicate(timeout=30)
        assert "canceling statement due to user request" in err, err
        assert time.time() - t0 < 2
    finally:
        stall.close()
    assert c.sql("SELECT count(*) FROM pg_tde_list_all_global_key_providers() WHERE name = 'stalled'") == "0"


class _VaultThatStallsOnKeys:
    """A plain-HTTP stand-in for Vault on 127.0.0.1 that answers the
    reachability check (a KV version 2 mount) and never answers a key read."""

    def __init__(self):
        import http.server
        import threading
        release = self.release = threading.Event()

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                if self.path.startswith("/v1/sys/mounts/"):
                    body = b'{"type": "kv", "options": {"version": "2"}}'
                    self.send_response(200)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                else:
                    release.wait(60)

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


def test_key_creation_in_a_stalled_provider_can_be_cancelled(tde, keyring):
    import time
    c = tde
    token = _token_file(keyring)
    vault = _VaultThatStallsOnKeys()
    try:
        c.sql("SET pg_tde.vault_allow_http = on; "
              f"SELECT pg_tde_add_global_key_provider_vault_v2('slow', 'http://127.0.0.1:{vault.port}', "
              f"'secret', '{token}', NULL)")
        t0 = time.time()
        e = c.sql_error("SET statement_timeout = '1s'; "
                        "SELECT pg_tde_create_key_using_global_key_provider('k-slow', 'slow')")
        took = time.time() - t0
        assert e.sqlstate == "57014", e.output
        assert took < 3, f"statement_timeout took {took:.1f} s to end a stalled key creation"
    finally:
        vault.close()
