"""The vault-v2 and kmip key providers through SQL, against real servers (SPEC §6, §10).

OpenBao (`bao server -dev -dev-tls`) and PyKMIP (`pykmip-server`, TLS 1.2 with
client certificates) run on 127.0.0.1 (see keyservers.py).  Each test has its
own cluster; the servers are shared by the tests of this module, except in the
tests that stop a server, which start their own.  Key names are unique per
test, since the shared servers keep them.

Provider failures are `external_routine_exception` (38000) and never show a
token; a table whose principal key cannot be fetched is not read at all.
"""

from __future__ import annotations

import json
import os
import time

import pytest

from cluster import Cluster, SQLError
from keyservers import OpenBao, PyKmip, free_port, openbao, pykmip

EXTERNAL = "38000"
INVALID = "22023"


# ---------------------------------------------------------------------------
# fixtures


@pytest.fixture(scope="module")
def bao():
    with openbao() as server:
        yield server


@pytest.fixture
def own_bao():
    """An OpenBao server for one test (which may stop it)."""
    with openbao() as server:
        yield server


@pytest.fixture(scope="module")
def kmip():
    with pykmip() as server:
        yield server


@pytest.fixture
def own_kmip():
    with pykmip() as server:
        yield server


@pytest.fixture
def uniq():
    return os.urandom(4).hex()


# ---------------------------------------------------------------------------
# helpers


def q(s) -> str:
    """An SQL literal."""
    if s is None:
        return "NULL"
    return "'" + str(s).replace("'", "''") + "'"


def add_vault(c: Cluster, bao: OpenBao, name: str = "vault", *, scope: str = "global", mount: str = "kv2",
              token_file=None, ca=None, url=None, namespace=None, db: str = "postgres") -> None:
    token_file = token_file or bao.token_file
    ca = bao.ca if ca is None else ca
    args = [name, url or bao.url, mount, token_file, ca]
    if namespace is not None:
        args.append(namespace)
    c.sql(f"SELECT pg_tde_add_{scope}_key_provider_vault_v2({', '.join(q(a) for a in args)})", db)


def add_kmip(c: Cluster, server: PyKmip, name: str = "kmip", *, scope: str = "database", port=None,
             cert=None, key=None, ca=None, db: str = "postgres") -> None:
    args = [q(name), q("127.0.0.1"), str(port or server.port), q(cert or server.client_cert),
            q(key or server.client_key), q(ca or server.ca)]
    c.sql(f"SELECT pg_tde_add_{scope}_key_provider_kmip({', '.join(args)})", db)


def create_and_set(c: Cluster, key: str, provider: str, scope: str, db: str = "postgres") -> None:
    c.sql(f"SELECT pg_tde_create_key_using_{scope}_key_provider({q(key)}, {q(provider)})", db)
    set_key(c, key, provider, scope, db)


def set_key(c: Cluster, key: str, provider: str, scope: str, db: str = "postgres") -> None:
    c.sql(f"SELECT pg_tde_set_key_using_{scope}_key_provider({q(key)}, {q(provider)})", db)


def fill(c: Cluster, table: str, marker: str, db: str = "postgres") -> str:
    """An encrypted table (with an index) holding `marker` in every row; its digest."""
    c.sql(
        f"CREATE TABLE {table} (id int, v text) USING tde_heap;"
        f"INSERT INTO {table} SELECT g, '{marker}' || g FROM generate_series(1, 500) g;"
        f"CREATE INDEX {table}_idx ON {table} (v)",
        db,
    )
    return digest(c, table, db)


def digest(c: Cluster, table: str, db: str = "postgres") -> str:
    return c.sql(f"SELECT count(*) || '/' || md5(string_agg(id || ':' || v, ',' ORDER BY id)) FROM {table}", db)


def assert_encrypted_on_disk(c: Cluster, table: str, marker: str) -> None:
    c.checkpoint()
    assert c.sql(f"SELECT pg_tde_is_encrypted('{table}')") == "t"
    assert c.sql(f"SELECT pg_tde_is_encrypted('{table}_idx')") == "t"
    assert not c.files_contain(table, marker.encode()), "plaintext marker in the table's files"
    assert not c.files_contain(f"{table}_idx", marker.encode()), "plaintext marker in the index's files"


def key_info(c: Cluster, db: str = "postgres") -> str:
    return c.sql("SELECT key_name || '|' || provider_name FROM pg_tde_key_info()", db)


def providers(c: Cluster, scope: str = "global", db: str = "postgres") -> dict:
    out = c.sql(f"SELECT json_agg(json_build_object('name', name, 'type', type, 'options', options)) "
                f"FROM pg_tde_list_all_{scope}_key_providers()", db)
    return {p["name"]: p for p in json.loads(out or "null") or []}


def server_log(c: Cluster) -> str:
    return c.logfile.read_text(errors="replace")


def assert_unreadable(c: Cluster, table: str, marker: str, *secrets: str) -> SQLError:
    """Reading `table` fails with a provider error, shows no rows and no secret."""
    e = c.sql_error(f"SELECT v FROM {table} ORDER BY id LIMIT 5")
    assert e.sqlstate == EXTERNAL, e.output
    assert marker not in e.output
    for s in secrets:
        assert s not in e.output
    e2 = c.sql_error(f"SELECT count(*) FROM {table}")
    assert e2.sqlstate == EXTERNAL, e2.output
    # what needs no key still works
    assert c.sql(f"SELECT pg_tde_is_encrypted('{table}')") == "t"
    return e


# ---------------------------------------------------------------------------
# OpenBao


def test_vault_round_trip_restart_and_rotation(cluster, bao, uniq):
    """A global vault-v2 provider (with caPath) holds the principal key: the data
    is encrypted on disk, readable after a restart, and after a rotation to a key
    written into Vault by another client, even once the first key is gone."""
    c = cluster
    c.sql("CREATE EXTENSION pg_tde")
    add_vault(c, bao)
    k1, k2 = f"db-key-{uniq}", f"external-{uniq}"
    create_and_set(c, k1, "vault", "global")
    assert key_info(c) == f"{k1}|vault"
    first = bao.get_key(k1)
    assert first is not None and len(first) in (16, 32), "the key is stored in KV v2 as {\"key\": base64}"

    marker = f"VAULTMARKER{uniq}"
    before = fill(c, "t", marker)
    assert before.startswith("500/")
    assert_encrypted_on_disk(c, "t", marker)
    c.sql("SELECT pg_tde_verify_key()")

    c.restart()
    assert digest(c, "t") == before
    c.sql("SELECT pg_tde_verify_key()")

    # rotate to a key that another client put into Vault
    second = os.urandom(len(first))
    bao.put_key(k2, second)
    set_key(c, k2, "vault", "global")
    assert key_info(c) == f"{k2}|vault"
    assert digest(c, "t") == before
    c.sql("SELECT pg_tde_verify_key()")
    assert bao.get_key(k1) == first, "rotation must not touch the old key in Vault"

    # the old key is no longer needed: remove it from Vault altogether
    bao.ok("DELETE", f"kv2/metadata/{k1}")
    assert bao.get_key(k1) is None
    c.restart()
    assert digest(c, "t") == before
    assert key_info(c) == f"{k2}|vault"
    c.sql("SELECT pg_tde_verify_key()")
    assert_encrypted_on_disk(c, "t", marker)
    c.sql("INSERT INTO t VALUES (501, 'after rotation')")
    assert c.sql("SELECT v FROM t WHERE id = 501") == "after rotation"


def test_vault_namespace(cluster, bao, uniq):
    """A provider with a namespace keeps its keys in the mount of that namespace."""
    c = cluster
    ns = f"tenant-{uniq}"
    bao.create_namespace(ns)
    bao.mount("kv2", 2, namespace=ns)
    c.sql("CREATE EXTENSION pg_tde")
    add_vault(c, bao, "vault-ns", scope="database", namespace=ns)
    opts = providers(c, "database")["vault-ns"]["options"]
    assert opts.get("namespace") == ns, opts

    key = f"ns-key-{uniq}"
    create_and_set(c, key, "vault-ns", "database")
    stored = bao.get_key(key, namespace=ns)
    assert stored is not None, "the key is not in the namespace"
    assert bao.get_key(key) is None, "a namespaced key landed in the root namespace"

    marker = f"NSMARKER{uniq}"
    before = fill(c, "t", marker)
    assert_encrypted_on_disk(c, "t", marker)
    c.restart()
    assert digest(c, "t") == before
    c.sql("SELECT pg_tde_verify_key()")

    # a namespace without the mount is refused
    empty = f"empty-{uniq}"
    bao.create_namespace(empty)
    e = c.sql_error(
        f"SELECT pg_tde_add_database_key_provider_vault_v2('nomount', {q(bao.url)}, 'kv2', "
        f"{q(bao.token_file)}, {q(bao.ca)}, {q(empty)})"
    )
    assert e.sqlstate in (EXTERNAL, INVALID), e.output
    assert "nomount" not in providers(c, "database")


def test_vault_wrong_token(cluster, bao, uniq):
    """A wrong token: adding the provider and creating or setting a key fail with
    38000, and neither the wrong token nor the right one appears anywhere."""
    c = cluster
    c.sql("CREATE EXTENSION pg_tde")
    wrong = f"s.CANARY-wrong-token-{uniq}"
    bad_file = bao.file(f"wrong-token-{uniq}", wrong + "\n")
    e = c.sql_error(
        f"SELECT pg_tde_add_global_key_provider_vault_v2('bad', {q(bao.url)}, 'kv2', {q(bad_file)}, {q(bao.ca)})"
    )
    assert e.sqlstate == EXTERNAL, e.output
    assert "permission denied" in e.message, e.output
    assert "CANARY" not in e.output and bao.root_token not in e.output, e.output
    assert "bad" not in providers(c), "a provider that failed its check was saved"

    # a provider whose token goes bad after it was added
    token_file = bao.file(f"token-{uniq}", bao.root_token + "\n")
    add_vault(c, bao, "vault", token_file=token_file)
    create_and_set(c, f"good-{uniq}", "vault", "global")
    bao.put_key(f"other-{uniq}", os.urandom(16))
    bao.file(token_file.name, wrong)
    for sql in (
        f"SELECT pg_tde_create_key_using_global_key_provider('k-{uniq}', 'vault')",
        f"SELECT pg_tde_set_key_using_global_key_provider('other-{uniq}', 'vault')",
        "SELECT pg_tde_verify_key()",
    ):
        e = c.sql_error(sql)
        assert e.sqlstate == EXTERNAL, (sql, e.output)
        assert "CANARY" not in e.output and bao.root_token not in e.output, e.output
    assert bao.get_key(f"k-{uniq}") is None
    assert key_info(c) == f"good-{uniq}|vault"

    log = server_log(c)
    assert "CANARY" not in log and bao.root_token not in log, "a token in the server log"


def test_vault_wrong_ca(cluster, bao):
    """A CA that did not sign the server's certificate: a TLS error, 38000."""
    c = cluster
    c.sql("CREATE EXTENSION pg_tde")
    ca = bao.unrelated_ca()
    e = c.sql_error(
        f"SELECT pg_tde_add_global_key_provider_vault_v2('v', {q(bao.url)}, 'kv2', {q(bao.token_file)}, {q(ca)})"
    )
    assert e.sqlstate == EXTERNAL, e.output
    assert "tls" in e.message.lower() or "certificate" in e.message.lower(), e.output
    assert bao.root_token not in e.output
    assert providers(c) == {}


def test_vault_unreachable(cluster, bao):
    """Nothing listens on the port: 38000, at once."""
    c = cluster
    c.sql("CREATE EXTENSION pg_tde")
    url = f"https://127.0.0.1:{free_port()}"
    started = time.time()
    e = c.sql_error(
        f"SELECT pg_tde_add_global_key_provider_vault_v2('v', {q(url)}, 'kv2', {q(bao.token_file)}, {q(bao.ca)})"
    )
    assert e.sqlstate == EXTERNAL, e.output
    assert url in e.message and "connection refused" in e.message.lower(), e.output
    assert bao.root_token not in e.output
    assert time.time() - started < 60
    assert providers(c) == {}


def test_vault_kv1_mount_is_refused(cluster, bao):
    """The keys live in a KV version 2 engine; a KV version 1 mount is refused,
    with the typed and with the generic function."""
    c = cluster
    c.sql("CREATE EXTENSION pg_tde")
    e = c.sql_error(
        f"SELECT pg_tde_add_global_key_provider_vault_v2('v1', {q(bao.url)}, 'kv1', {q(bao.token_file)}, {q(bao.ca)})"
    )
    assert e.sqlstate in (EXTERNAL, INVALID), e.output
    assert "KV version 2" in e.message, e.output
    opts = {"url": bao.url, "mountPath": "kv1", "tokenPath": str(bao.token_file), "caPath": str(bao.ca)}
    e = c.sql_error(f"SELECT pg_tde_add_database_key_provider('vault-v2', 'v1', {q(json.dumps(opts))})")
    assert e.sqlstate in (EXTERNAL, INVALID), e.output
    assert "KV version 2" in e.message, e.output
    assert providers(c) == {} and providers(c, "database") == {}


def test_vault_list_shows_token_path_not_token(cluster, bao, uniq):
    c = cluster
    c.sql("CREATE EXTENSION pg_tde")
    opts = {"url": bao.url, "mountPath": "kv2", "tokenPath": str(bao.token_file), "caPath": str(bao.ca)}
    c.sql(f"SELECT pg_tde_add_global_key_provider('vault-v2', 'generic', {q(json.dumps(opts))})")
    add_vault(c, bao, "typed")
    raw = c.sql("SELECT * FROM pg_tde_list_all_global_key_providers()")
    assert bao.root_token not in raw, raw
    listed = providers(c)
    assert set(listed) == {"generic", "typed"}
    for p in listed.values():
        assert p["type"] == "vault-v2"
        assert p["options"]["tokenPath"] == str(bao.token_file)
        assert p["options"]["caPath"] == str(bao.ca)
        assert p["options"]["url"] == bao.url
        assert p["options"]["mountPath"] == "kv2"
    create_and_set(c, f"listed-{uniq}", "typed", "global")
    c.sql("SELECT pg_tde_verify_key()")
    assert bao.root_token not in c.sql("SELECT * FROM pg_tde_list_all_global_key_providers()")
    assert bao.root_token not in server_log(c)


def test_vault_verify_key_detects_a_changed_key(cluster, bao, uniq):
    """pg_tde_verify_key() passes while Vault holds the key in use, and fails when
    the secret has been overwritten with other bytes."""
    c = cluster
    c.sql("CREATE EXTENSION pg_tde")
    add_vault(c, bao)
    key = f"verify-{uniq}"
    create_and_set(c, key, "vault", "global")
    c.sql("SELECT pg_tde_verify_key()")
    original = bao.get_key(key)
    bao.put_key(key, bytes(b ^ 0x5A for b in original))  # a new KV v2 version
    e = c.sql_error("SELECT pg_tde_verify_key()")
    assert e.sqlstate in ("XX001", EXTERNAL), e.output
    bao.put_key(key, original)
    c.sql("SELECT pg_tde_verify_key()")


def test_vault_token_revoked_at_restart(cluster, bao, uniq):
    """With a wrong token in the token file when PostgreSQL restarts, the table
    cannot be read (38000: no rows, no plaintext, no garbage, no token); once the
    right token is back, it reads as before, without a restart."""
    c = cluster
    c.sql("CREATE EXTENSION pg_tde")
    token_file = bao.file(f"token-{uniq}", bao.root_token + "\n")
    add_vault(c, bao, token_file=token_file)
    create_and_set(c, f"outage-{uniq}", "vault", "global")
    marker = f"OUTAGEMARKER{uniq}"
    before = fill(c, "t", marker)
    c.checkpoint()

    wrong = f"s.CANARY-revoked-{uniq}"
    bao.file(token_file.name, wrong)
    c.restart()
    assert_unreadable(c, "t", marker, wrong, "CANARY", bao.root_token)
    e = c.sql_error("INSERT INTO t VALUES (1000, 'x')")
    assert e.sqlstate == EXTERNAL, e.output

    bao.file(token_file.name, bao.root_token + "\n")
    assert digest(c, "t") == before
    c.restart()
    assert digest(c, "t") == before
    c.sql("SELECT pg_tde_verify_key()")
    log = server_log(c)
    assert "CANARY" not in log and bao.root_token not in log


def test_vault_server_down_at_restart(cluster, own_bao, uniq):
    """OpenBao itself is down when PostgreSQL restarts: reading fails with 38000;
    once a server holding the key answers again on the same address, it reads."""
    bao, c = own_bao, cluster
    c.sql("CREATE EXTENSION pg_tde")
    add_vault(c, bao)
    key = f"down-{uniq}"
    create_and_set(c, key, "vault", "global")
    key_bytes = bao.get_key(key)
    marker = f"DOWNMARKER{uniq}"
    before = fill(c, "t", marker)
    c.checkpoint()

    bao.stop()
    c.restart()
    assert_unreadable(c, "t", marker, bao.root_token)
    e = c.sql_error("SELECT pg_tde_verify_key()")
    assert e.sqlstate == EXTERNAL, e.output

    # a dev server keeps its data in memory: the new one gets the key back
    bao.start(bao.port)
    bao.put_key(key, key_bytes)
    assert digest(c, "t") == before
    c.sql("SELECT pg_tde_verify_key()")


# ---------------------------------------------------------------------------
# KMIP


def test_kmip_round_trip_restart_and_rotation(cluster, kmip, uniq):
    c = cluster
    c.sql("CREATE EXTENSION pg_tde")
    add_kmip(c, kmip)
    listed = providers(c, "database")["kmip"]
    assert listed["type"] == "kmip"
    assert listed["options"]["certPath"] == str(kmip.client_cert)
    assert listed["options"]["keyPath"] == str(kmip.client_key)
    assert int(listed["options"]["port"]) == kmip.port
    assert "BEGIN" not in json.dumps(listed), "certificate or key contents in the listing"

    k1, k2 = f"kmip-key-{uniq}", f"kmip-rotated-{uniq}"
    create_and_set(c, k1, "kmip", "database")
    assert key_info(c) == f"{k1}|kmip"
    marker = f"KMIPMARKER{uniq}"
    before = fill(c, "t", marker)
    assert_encrypted_on_disk(c, "t", marker)
    c.sql("SELECT pg_tde_verify_key()")

    c.restart()
    assert digest(c, "t") == before
    c.sql("SELECT pg_tde_verify_key()")

    e = c.sql_error(f"SELECT pg_tde_create_key_using_database_key_provider({q(k1)}, 'kmip')")
    assert e.sqlstate in ("42710", INVALID), e.output

    create_and_set(c, k2, "kmip", "database")
    assert key_info(c) == f"{k2}|kmip"
    assert digest(c, "t") == before
    c.sql("SELECT pg_tde_verify_key()")
    c.restart()
    assert digest(c, "t") == before
    assert key_info(c) == f"{k2}|kmip"
    c.sql("SELECT pg_tde_verify_key()")
    assert_encrypted_on_disk(c, "t", marker)


def test_kmip_global_provider_generic_function(cluster, kmip, uniq):
    """The generic function with a JSON object (port as a string, as Percona
    writes it), a global provider and a database key from it."""
    c = cluster
    c.sql("CREATE EXTENSION pg_tde")
    opts = {"host": "127.0.0.1", "port": str(kmip.port), "certPath": str(kmip.client_cert),
            "keyPath": str(kmip.client_key), "caPath": str(kmip.ca)}
    c.sql(f"SELECT pg_tde_add_global_key_provider('kmip', 'kmip-g', {q(json.dumps(opts))})")
    create_and_set(c, f"kmip-global-{uniq}", "kmip-g", "global")
    marker = f"KMIPGLOBAL{uniq}"
    before = fill(c, "t", marker)
    assert_encrypted_on_disk(c, "t", marker)
    c.restart()
    assert digest(c, "t") == before
    c.sql("SELECT pg_tde_verify_key()")


def test_kmip_untrusted_client_certificate(cluster, kmip):
    """A client certificate signed by a CA the server does not trust, and a
    server certificate checked against the wrong CA: TLS errors, 38000."""
    c = cluster
    c.sql("CREATE EXTENSION pg_tde")
    for what, kwargs in (
        ("client certificate from an untrusted CA", dict(cert=kmip.rogue_cert, key=kmip.rogue_key)),
        ("server certificate checked against another CA", dict(ca=kmip.other_ca)),
    ):
        e = c.sql_error(
            f"SELECT pg_tde_add_database_key_provider_kmip('rogue', '127.0.0.1', {kmip.port}, "
            f"{q(kwargs.get('cert', kmip.client_cert))}, {q(kwargs.get('key', kmip.client_key))}, "
            f"{q(kwargs.get('ca', kmip.ca))})"
        )
        assert e.sqlstate == EXTERNAL, (what, e.output)
        lower = e.message.lower()
        assert any(w in lower for w in ("tls", "certificate", "handshake")), (what, e.output)
        assert "BEGIN" not in e.output
    assert providers(c, "database") == {}


def test_kmip_closed_port(cluster, kmip):
    c = cluster
    c.sql("CREATE EXTENSION pg_tde")
    port = free_port()
    started = time.time()
    e = c.sql_error(
        f"SELECT pg_tde_add_database_key_provider_kmip('k', '127.0.0.1', {port}, "
        f"{q(kmip.client_cert)}, {q(kmip.client_key)}, {q(kmip.ca)})"
    )
    assert e.sqlstate == EXTERNAL, e.output
    assert f"127.0.0.1:{port}" in e.message and "connection refused" in e.message.lower(), e.output
    assert time.time() - started < 60
    assert providers(c, "database") == {}


def test_kmip_server_down_at_restart(cluster, own_kmip, uniq):
    """The KMIP server is down when PostgreSQL restarts: 38000; once it is back
    (same keys: PyKMIP keeps them in SQLite), the table reads as before."""
    server, c = own_kmip, cluster
    c.sql("CREATE EXTENSION pg_tde")
    add_kmip(c, server)
    create_and_set(c, f"kmip-down-{uniq}", "kmip", "database")
    marker = f"KMIPDOWN{uniq}"
    before = fill(c, "t", marker)
    c.checkpoint()

    server.stop()
    c.restart()
    assert_unreadable(c, "t", marker)
    server.start(server.port)
    assert digest(c, "t") == before
    c.sql("SELECT pg_tde_verify_key()")
