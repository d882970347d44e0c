"""Keys that never leave the KMS (issue 16): envelope keys wrapped by OpenBao Transit,
by a KMIP server's Encrypt/Decrypt and by an external adapter; the periodic key check
(revocation: fail closed, resume when the key returns); the audit trail.

Real servers on 127.0.0.1 (keyservers.py): `bao server -dev -dev-tls` with a Transit
mount, used through a least-privilege token, and `pykmip-server` with TLS client
certificates.  The command provider runs the OpenBao-backed adapter of
contrib/kms-adapters for real.

What "never leaves the KMS" is checked by:
- the Transit key is created non-exportable (read back as root, and an export as
  root is refused); pg_tde's Transit client has no export or backup call at all;
- PyKMIP's log shows pg_tde sending Encrypt and Decrypt, never Get;
- the envelope key, unwrapped as root through Transit, occurs nowhere in $PGDATA
  (every file, WAL included), in raw or base64 form.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import time
from pathlib import Path

import pytest

from cluster import Cluster, SQLError, make_dir
from keyservers import OpenBao, PyKmip, give_to_server, openbao, pykmip
from test_providers import assert_encrypted_on_disk, digest, fill, q
from test_replication import make_standby, wait_for_replay

ROOT = Path(__file__).resolve().parents[2]
ADAPTERS = ROOT / "contrib" / "kms-adapters"
EXTERNAL = "38000"
WAIT = 30


# ---------------------------------------------------------------------------
# fixtures and helpers


@pytest.fixture(scope="module")
def bao():
    with openbao() as server:
        server.ok("POST", "sys/mounts/transit", {"type": "transit"})
        yield server


@pytest.fixture
def uniq():
    return os.urandom(4).hex()


def transit_policy(mount: str = "transit", decrypt: bool = True) -> str:
    """The least privilege pg_tde needs on a Transit mount (without decrypt: revoked)."""
    paths = {
        f"{mount}/encrypt/*": '["update"]',
        f"{mount}/rewrap/*": '["update"]',
        f"{mount}/keys/*": '["read", "create", "update"]',
    }
    if decrypt:
        paths[f"{mount}/decrypt/*"] = '["update"]'
    return "\n".join(f'path "{p}" {{ capabilities = {c} }}' for p, c in paths.items())


def least_privilege_token(bao: OpenBao, name: str) -> Path:
    bao.ok("PUT", f"sys/policies/acl/{name}", {"policy": transit_policy()})
    v = bao.ok("POST", "auth/token/create", {"policies": [name], "no_default_policy": True, "ttl": "2h"})
    return bao.file(f"{name}.token", v["auth"]["client_token"] + "\n")


def add_transit(c: Cluster, bao: OpenBao, token: Path, name: str = "transit", scope: str = "global",
                db: str = "postgres") -> None:
    opts = {"url": bao.url, "mountPath": "transit", "tokenPath": str(token), "caPath": str(bao.ca)}
    c.sql(f"SELECT pg_tde_add_{scope}_key_provider('vault-transit', {q(name)}, {q(json.dumps(opts))})", db)


def create_and_set(c: Cluster, key: str, provider: str, scope: str = "global", db: str = "postgres") -> None:
    c.sql(f"SELECT pg_tde_create_key_using_{scope}_key_provider({q(key)}, {q(provider)})", db)
    c.sql(f"SELECT pg_tde_set_key_using_{scope}_key_provider({q(key)}, {q(provider)})", db)


def transit_key(c: Cluster, bao: OpenBao, name: str) -> Path:
    """pg_tde, a Transit provider with a least-privilege token (policy `name`) and
    a principal key `name` from it; returns the token file."""
    c.sql("CREATE EXTENSION pg_tde")
    token = least_privilege_token(bao, name)
    add_transit(c, bao, token)
    create_and_set(c, name, "transit")
    return token


def key_info(c: Cluster, db: str = "postgres") -> dict:
    row = c.sql("SELECT row_to_json(k) FROM pg_tde_key_info() k", db)
    return json.loads(row)


def envelope_key(bao: OpenBao, c: Cluster, key: str) -> bytes:
    """The envelope key, unwrapped as root through Transit (for the on-disk search)."""
    store = json.loads((c.datadir / "pg_tde" / "envelopes.json").read_text())
    (env,) = [e for e in store["envelopes"] if e["name"] == key]
    ciphertext = base64.b64decode(env["wrapped"]).decode()
    v = bao.ok("POST", f"transit/decrypt/{key}", {"ciphertext": ciphertext})
    return base64.b64decode(v["data"]["plaintext"])


def assert_nowhere_in_pgdata(c: Cluster, secret: bytes) -> None:
    needles = [secret, base64.b64encode(secret), secret.hex().encode()]
    for p in c.datadir.rglob("*"):
        if p.is_file():
            data = p.read_bytes()
            for n in needles:
                assert n not in data, f"the unwrapped envelope key is in {p}"


def wait_until(what: str, check, timeout: float = WAIT):
    deadline = time.time() + timeout
    last = None
    while time.time() < deadline:
        try:
            last = check()
            if last:
                return last
        except (SQLError, AssertionError) as e:
            last = e
        time.sleep(0.5)
    raise AssertionError(f"{what}: not within {timeout} s (last: {last})")


def audit_events(c: Cluster, db: str = "postgres") -> list[dict]:
    out = c.sql("SELECT coalesce(json_agg(a ORDER BY seq), '[]') FROM pg_tde_audit_log a", db)
    return json.loads(out)


# ---------------------------------------------------------------------------
# Vault / OpenBao Transit


def test_transit_envelope_key_never_leaves_the_kms(cluster, bao, uniq):
    """create_key makes a non-exportable Transit key and a random envelope key that
    only Transit's ciphertext of is kept; the data is encrypted, readable after a
    restart; a Transit key rotation re-wraps the one envelope (no relation key
    changes), after which the old key version may be retired."""
    c = cluster
    key = f"db-{uniq}"
    transit_key(c, bao, key)

    settings = bao.ok("GET", f"transit/keys/{key}")["data"]
    assert settings["exportable"] is False and settings["allow_plaintext_backup"] is False
    info = key_info(c)
    assert (info["key_name"], info["provider_name"], info["kms_key_id"], info["kms_key_version"], info["key_state"]) \
        == (key, "transit", key, "1", "ok"), info

    marker = f"TRANSITMARKER{uniq}"
    before = fill(c, "t", marker)
    assert_encrypted_on_disk(c, "t", marker)
    store = (c.datadir / "pg_tde" / "envelopes.json").read_text()
    assert base64.b64encode(b"vault:v1:").decode()[:8] in store
    secret = envelope_key(bao, c, key)
    assert len(secret) in (16, 32)
    events = [(e["event"], e["outcome"], e["key_name"]) for e in audit_events(c)]
    for ev in ["kms_wrap", "key_created", "key_set"]:
        assert (ev, "success", key) in events, (ev, events)
    assert ("provider_added", "success", None) in events, events
    c.restart()
    assert digest(c, "t") == before
    assert_nowhere_in_pgdata(c, secret)

    # rotate the Transit key; the key check re-wraps the envelope with version 2
    maps_before = (c.datadir / "pg_tde").glob("*_keys")
    map_bytes = {p.name: p.read_bytes() for p in maps_before}
    bao.ok("POST", f"transit/keys/{key}/rotate", {})
    assert c.sql("SELECT state FROM pg_tde_check_keys()") == "ok"
    assert key_info(c)["kms_key_version"] == "2"
    assert envelope_key(bao, c, key) == secret, "a re-wrap keeps the envelope key"
    assert {p.name: p.read_bytes() for p in (c.datadir / "pg_tde").glob("*_keys")} == map_bytes, \
        "no relation key changes with a KMS key rotation"
    # version 1 may now be retired: the server starts and reads with version 2 only
    bao.ok("POST", f"transit/keys/{key}/config", {"min_decryption_version": 2})
    c.restart()
    assert digest(c, "t") == before

    # the Transit key cannot leave OpenBao, not even for its root token
    status, answer = bao.api("GET", f"transit/export/encryption-key/{key}")
    assert status == 400 and "not exportable" in json.dumps(answer), (status, answer)

    # the ring holds the events since the server started; the log holds them all
    events = [(e["event"], e["outcome"]) for e in audit_events(c)]
    assert ("kms_unwrap", "success") in events, events
    logged = [json.loads(line.split("pg_tde audit: ", 1)[1])["event"]["event"]
              for line in c.logfile.read_text(errors="replace").splitlines() if "pg_tde audit: " in line]
    for ev in ["provider_added", "kms_wrap", "key_created", "key_set", "kms_rewrap", "kms_unwrap"]:
        assert ev in logged, (ev, logged)


def test_transit_revocation_fails_closed_and_recovers(cluster, bao, uniq):
    """With the token's decrypt permission removed, the key check (the background
    worker, every second here) revokes the key: rows written just before are kept,
    every read and write of the encrypted tables is refused with a clear error, also
    on a streaming standby; when the permission returns, access resumes without a
    restart.  An unreachable server only warns."""
    c = cluster
    c.configure("pg_tde.key_check_interval = 1")
    c.restart()
    key = policy = f"rev-{uniq}"
    token = transit_key(c, bao, key)
    marker = f"REVMARKER{uniq}"
    before = fill(c, "t", marker)
    standby = make_standby(c)
    try:
        # rows written right before the revocation stay in the buffers, dirty
        c.sql("INSERT INTO t SELECT g, 'late' || g FROM generate_series(501, 600) g")
        after_insert = digest(c, "t")
        wait_for_replay(c, standby)

        bao.ok("PUT", f"sys/policies/acl/{policy}", {"policy": transit_policy(decrypt=False)})
        err = wait_until("the primary refuses the table",
                         lambda: (lambda e: e)(c.sql_error("SELECT count(*) FROM t")))
        assert err.sqlstate == EXTERNAL and "revoked" in err.message and key in err.message, err.output
        assert marker not in err.output
        w = c.sql_error("INSERT INTO t VALUES (0, 'refused')")
        assert "revoked" in w.message
        state = c.sql(f"SELECT state FROM pg_tde_key_state() WHERE key_name = {q(key)}")
        assert state == "revoked"
        assert key_info(c)["key_state"].startswith("revoked: ")
        wait_until("the standby refuses the table",
                   lambda: "revoked" in standby.sql_error("SELECT count(*) FROM t").message)
        # what needs no key still works
        assert c.sql("SELECT pg_tde_is_encrypted('t')") == "t"
        assert c.sql("SELECT 1") == "1"

        bao.ok("PUT", f"sys/policies/acl/{policy}", {"policy": transit_policy()})
        wait_until("the primary reads again", lambda: c.sql("SELECT count(*) FROM t") == "600")
        assert digest(c, "t") == after_insert, "nothing written before the revocation was lost"
        wait_until("the standby reads again", lambda: standby.sql("SELECT count(*) FROM t") == "600")
        assert digest(standby, "t") == after_insert
        c.sql("INSERT INTO t VALUES (601, 'after recovery')")
        assert c.sql("SELECT state FROM pg_tde_key_state() WHERE key_name = " + q(key)) == "ok"
        events = [e["event"] for e in audit_events(c)]
        assert "key_revoked" in events and "key_recovered" in events, events
        log = c.logfile.read_text(errors="replace")
        assert '"event":"key_revoked"' in log.replace(" ", "") and token.read_text().strip() not in log
    finally:
        standby.destroy()
    assert before


def test_transit_unreachable_warns_and_grace_revokes(cluster, uniq):
    """A KMS that cannot be reached is not a revocation: the key stays in use with a
    warning; with pg_tde.key_unreachable_grace the key is dropped once the grace has
    passed, and comes back with the server."""
    c = cluster
    with openbao() as own:
        own.ok("POST", "sys/mounts/transit", {"type": "transit"})
        transit_key(c, own, f"u-{uniq}")
        before = fill(c, "t", f"UNREACH{uniq}")
        port = own.port
        own.stop()
        assert c.sql("SELECT state FROM pg_tde_check_keys()") == "unreachable"
        assert digest(c, "t") == before, "an unreachable KMS does not stop the server"
        c.sql("ALTER SYSTEM SET pg_tde.key_unreachable_grace = 0")
        c.sql("SELECT pg_reload_conf()")
        time.sleep(1.5)
        assert c.sql("SELECT state FROM pg_tde_check_keys()") == "revoked"
        assert "revoked" in c.sql_error("SELECT count(*) FROM t").message
        # a dev server restarts empty: a server restarted with its storage would
        # answer again; here the Transit key is gone, so the key stays revoked
        own.start(port)
        own.ok("POST", "sys/mounts/transit", {"type": "transit"})
        assert c.sql("SELECT state FROM pg_tde_check_keys()") == "revoked"
        assert "revoked" in c.sql_error("SELECT count(*) FROM t").message


def test_revoked_server_key_stops_writes_with_encrypted_wal(cluster, bao, uniq):
    """The server key on Transit with pg_tde.wal_encrypt = on: once the KMS refuses
    it, transactions that write cannot commit (refused before their commit record,
    no PANIC, the server keeps running and reading); they commit again when the
    key returns, without a restart."""
    c = cluster
    policy = f"srv-{uniq}"
    transit_key(c, bao, policy)
    c.sql(f"SELECT pg_tde_create_key_using_global_key_provider({q('server-' + uniq)}, 'transit')")
    c.sql(f"SELECT pg_tde_set_server_key_using_global_key_provider({q('server-' + uniq)}, 'transit')")
    c.configure("pg_tde.wal_encrypt = on")
    c.restart()
    before = fill(c, "t", f"SRVKEY{uniq}")

    bao.ok("PUT", f"sys/policies/acl/{policy}", {"policy": transit_policy(decrypt=False)})
    states = c.sql("SELECT string_agg(target || '=' || state, ',' ORDER BY target) FROM pg_tde_key_state()")
    assert c.sql("SELECT count(*) FROM pg_tde_check_keys() WHERE state = 'revoked'") == "2", states
    e = c.sql_error("INSERT INTO t VALUES (0, 'x')")
    assert e.sqlstate == EXTERNAL and "revoked" in e.message, e.output
    e = c.sql_error("CREATE TABLE plain_t (a int) USING heap")
    assert "server key is revoked" in e.message, e.output
    assert c.sql("SELECT 1") == "1", "read-only work goes on"
    assert c.sql("SELECT pg_is_in_recovery()") == "f"

    bao.ok("PUT", f"sys/policies/acl/{policy}", {"policy": transit_policy()})
    assert c.sql("SELECT count(*) FROM pg_tde_check_keys() WHERE state = 'ok'") == "2"
    c.sql("CREATE TABLE plain_t (a int) USING heap; INSERT INTO t VALUES (0, 'x')")
    assert digest(c, "t") != before
    c.restart()
    assert c.sql("SELECT count(*) FROM t") == "501"


def test_deleted_transit_key_is_revoked(cluster, bao, uniq):
    """Deleting the Transit key (the KMS says it does not exist) revokes the key."""
    c = cluster
    key = f"del-{uniq}"
    transit_key(c, bao, key)
    fill(c, "t", f"DELMARK{uniq}")
    bao.ok("POST", f"transit/keys/{key}/config", {"deletion_allowed": True})
    bao.ok("DELETE", f"transit/keys/{key}")
    assert c.sql("SELECT state FROM pg_tde_check_keys()") == "revoked"
    err = c.sql_error("SELECT count(*) FROM t")
    assert "revoked" in err.message and "not found" in err.message, err.output


# ---------------------------------------------------------------------------
# The command provider with the OpenBao-backed adapter


def install_adapter(name: str) -> Path:
    """A copy of an adapter that the server's OS user may run."""
    d = make_dir("adapters")
    dst = d / name
    shutil.copy(ADAPTERS / name, dst)
    for helper in ADAPTERS.glob("_*.py"):
        shutil.copy(helper, d / helper.name)
    for p in d.iterdir():
        give_to_server(p, 0o755)
    give_to_server(d, 0o755)
    return dst


def test_command_provider_with_the_openbao_adapter(cluster, bao, uniq):
    """An external adapter wraps the envelope key (here backed by a real OpenBao
    Transit): round trip, restart, revocation through the adapter's "denied" reply,
    recovery; the key material travels only through the pipes."""
    c = cluster
    c.sql("CREATE EXTENSION pg_tde")
    policy = f"cmd-{uniq}"
    token = least_privilege_token(bao, policy)
    key = f"cmd-{uniq}"
    bao.ok("POST", f"transit/keys/{key}", {"type": "aes256-gcm96", "exportable": False})
    adapter = install_adapter("pg_tde_kms_openbao")
    opts = {"command": str(adapter), "timeout": 20,
            "args": ["--url", bao.url, "--token-file", str(token), "--ca-file", str(bao.ca), "--mount", "transit"]}
    c.sql(f"SELECT pg_tde_add_global_key_provider('command', 'adapter', {q(json.dumps(opts))})")
    create_and_set(c, key, "adapter")
    info = key_info(c)
    assert (info["kms_key_id"], info["kms_key_version"]) == (key, "1"), info
    marker = f"CMDMARKER{uniq}"
    before = fill(c, "t", marker)
    assert_encrypted_on_disk(c, "t", marker)
    c.restart()
    assert digest(c, "t") == before
    assert_nowhere_in_pgdata(c, envelope_key(bao, c, key))

    bao.ok("PUT", f"sys/policies/acl/{policy}", {"policy": transit_policy(decrypt=False)})
    assert c.sql("SELECT state FROM pg_tde_check_keys()") == "revoked"
    err = c.sql_error("SELECT count(*) FROM t")
    assert "revoked" in err.message and "denied" in err.message, err.output
    bao.ok("PUT", f"sys/policies/acl/{policy}", {"policy": transit_policy()})
    assert c.sql("SELECT state FROM pg_tde_check_keys()") == "ok"
    assert digest(c, "t") == before


def test_command_provider_needs_execute_rights_and_times_out(cluster, uniq):
    """Naming a program takes superuser or pg_execute_server_program; an adapter
    that hangs is killed after its timeout with a clear error."""
    c = cluster
    c.sql("CREATE EXTENSION pg_tde")
    c.sql("CREATE ROLE admin LOGIN; SELECT pg_tde_grant_global_key_management_to_role('admin')")
    d = make_dir("hang")
    hang = d / "hang"
    hang.write_text("#!/bin/sh\nsleep 60\n")
    give_to_server(hang, 0o755)
    give_to_server(d, 0o755)
    opts = json.dumps({"command": str(hang), "timeout": 2})
    e = c.sql_error(f"SET ROLE admin; SELECT pg_tde_add_global_key_provider('command', 'h', {q(opts)})")
    assert e.sqlstate == "42501" and "pg_execute_server_program" in e.output, e.output
    c.sql(f"SELECT pg_tde_add_global_key_provider('command', 'h', {q(opts)})")
    started = time.time()
    e = c.sql_error("SELECT pg_tde_create_key_using_global_key_provider('k', 'h')")
    assert time.time() - started < 20
    assert e.sqlstate == EXTERNAL and "killed" in e.message, e.output
    failed = [a for a in audit_events(c) if a["event"] == "key_created"]
    assert failed and failed[-1]["outcome"] == "failure"


# ---------------------------------------------------------------------------
# KMIP Encrypt / Decrypt


def test_kmip_wrap_provider(cluster, uniq):
    """A kmip-wrap provider: the KMIP server encrypts the envelope key with a
    symmetric key that pg_tde never Gets; a Revoke on the server revokes the key."""
    c = cluster
    c.sql("CREATE EXTENSION pg_tde")
    with pykmip() as server:
        opts = {"host": "127.0.0.1", "port": server.port, "certPath": str(server.client_cert),
                "keyPath": str(server.client_key), "caPath": str(server.ca)}
        c.sql(f"SELECT pg_tde_add_global_key_provider('kmip-wrap', 'kw', {q(json.dumps(opts))})")
        key = f"kw-{uniq}"
        create_and_set(c, key, "kw")
        info = key_info(c)
        assert info["kms_key_id"] == key and info["kms_key_version"], info
        marker = f"KMIPWRAP{uniq}"
        before = fill(c, "t", marker)
        assert_encrypted_on_disk(c, "t", marker)
        c.restart()
        assert digest(c, "t") == before
        assert c.sql("SELECT state FROM pg_tde_check_keys()") == "ok"
        logs = server.full_log()
        ops = [l.split("Processing operation: ", 1)[1].strip() for l in logs.splitlines()
               if "Processing operation: " in l]
        assert "Encrypt" in ops and "Decrypt" in ops and "Get" not in ops, ops

        server.revoke(info["kms_key_version"])
        assert c.sql("SELECT state FROM pg_tde_check_keys()") == "revoked"
        assert "revoked" in c.sql_error("SELECT count(*) FROM t").message


# ---------------------------------------------------------------------------
# Audit


def test_audit_log_is_for_key_administrators_and_holds_no_secrets(tde):
    c = tde
    c.sql("CREATE ROLE plain LOGIN")
    e = c.sql_error("SET ROLE plain; SELECT count(*) FROM pg_tde_audit_log")
    assert e.sqlstate == "42501", e.output
    events = audit_events(c)
    kinds = [(e["event"], e["database"], e["role"], e["provider_name"], e["key_name"]) for e in events]
    assert ("key_created", "postgres", "postgres", "file-vault", "principal-key") in kinds, kinds
    assert ("key_set", "postgres", "postgres", "file-vault", "principal-key") in kinds, kinds
    log = c.logfile.read_text(errors="replace")
    lines = [l.split("pg_tde audit: ", 1)[1] for l in log.splitlines() if "pg_tde audit: " in l]
    assert lines, "audit lines in the server log"
    for line in lines:
        record = json.loads(line)
        assert set(record) == {"database_oid", "role_oid", "pid", "event"}, record
        assert not {"token", "key_bytes"} & set(record["event"]), record
