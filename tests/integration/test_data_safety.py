"""Routine operations that must lose nothing and write nothing in plaintext
(issue 14): server-key rotation with encrypted WAL, databases copied or moved
byte for byte, DROP DATABASE, races on the key map, WAL at timeline switches.

Each test failed before its fix; the claims are checked on a restarted
server, on a streaming standby, and by reading the files on disk.
"""

from __future__ import annotations

import subprocess
import threading
from pathlib import Path

import pytest

from cluster import BIN, Cluster, SQLError, setup_encryption
from test_replication import dboid, digest, make_standby, wait_for_replay
from test_wal import flush_wal, new_cluster, set_wal_encrypt, wal_files_with
from test_wal_tools import TOOLS, segments
from test_key_management import wait_until_up


@pytest.fixture
def clusters():
    made: list[Cluster] = []
    yield made
    for c in reversed(made):
        c.destroy()


def fill_enc(c: Cluster, table: str, marker: str, n: int = 300, db: str = "postgres") -> None:
    c.sql(
        f"CREATE TABLE IF NOT EXISTS {table} (id int primary key, v text) USING tde_heap;"
        f"INSERT INTO {table} SELECT g, '{marker}' || g FROM generate_series((SELECT coalesce(max(id), 0) + 1 FROM {table}),"
        f" (SELECT coalesce(max(id), 0) + {n} FROM {table})) g",
        db=db,
    )


# ---------------------------------------------------------------------------
# Case 1: rotating the server key with pg_tde.wal_encrypt = on


def test_server_key_rotation_with_encrypted_wal(clusters, keyring, tmp_path):
    p = new_cluster(clusters, "rot-primary", keyring, wal_encrypt=True, extra="wal_keep_size = '1GB'\n")
    s = make_standby(p)
    clusters.append(s)
    m1 = "MARKER_ROT_BEFORE_q1"
    fill_enc(p, "t", m1)
    flush_wal(p)
    wait_for_replay(p, s)
    segs_before = {x.name for x in segments(p)}

    p.sql("SELECT pg_tde_create_key_using_global_key_provider('server-key-2', 'g')")
    p.sql("SELECT pg_tde_set_server_key_using_global_key_provider('server-key-2', 'g')")
    assert p.sql("SELECT key_name FROM pg_tde_server_key_info()") == "server-key-2"

    # New backends load the WAL keys afresh: before the fix the first WAL
    # write of one PANICked on the records wrapped by the retired key.
    m2 = "MARKER_ROT_AFTER_w2"
    fill_enc(p, "t", m2)
    flush_wal(p)
    assert p.sql(f"SELECT count(*) FROM t WHERE v LIKE '{m2}%'") == "300"
    wait_for_replay(p, s)
    assert digest(s, "t") == digest(p, "t")
    assert s.sql("SELECT key_name FROM pg_tde_server_key_info()") == "server-key-2"

    # Both servers start again and read back WAL written before and after.
    expected = digest(p, "t")
    for c in (p, s):
        c.kill9()
        c.start()
    assert digest(p, "t") == expected
    fill_enc(p, "t", "MARKER_ROT_LATE_e3", n=10)
    wait_for_replay(p, s)
    assert digest(s, "t") == digest(p, "t")
    # the standby's receiver keys follow the rotation as well: it restarts
    s.restart()
    wait_for_replay(p, s)
    assert digest(s, "t") == digest(p, "t")

    for c in (p, s):
        c.checkpoint()
        assert not wal_files_with(c, m1) and not wal_files_with(c, m2)

    # The WAL tool decrypts segments written before and after the rotation.
    out = tmp_path / "dec"
    out.mkdir()
    decoded = b""
    for seg in segments(p):
        r = subprocess.run(
            [str(TOOLS / "pg_tde_decrypt_wal"), "-D", str(p.datadir), "-o", str(out), str(seg)],
            capture_output=True, text=True,
        )
        assert r.returncode == 0, r.stderr
        decoded += (out / seg.name).read_bytes()
    assert m1.encode() in decoded and m2.encode() in decoded


@pytest.mark.parametrize("point", ["wal_kek_after_wal", "rotation_before_wal", "rotation_after_wal"])
def test_rotation_crash_points_keep_wal_readable(clusters, keyring, point):
    """A crash at each step of a server-key rotation leaves a server that
    starts and reads its WAL, with the old key or the new one in force, and
    the rotation then completes."""
    if point == "wal_kek_after_wal":
        # the first server key gets its WAL key-encryption key
        p = Cluster("rot-crash")
        clusters.append(p)
        p.initdb()
        p.start()
        setup_encryption(p, keyring)
        p.sql(f"SELECT pg_tde_add_global_key_provider_file('g', '{keyring}/keyring.json')")
    else:
        p = new_cluster(clusters, "rot-crash", keyring, wal_encrypt=True)
    fill_enc(p, "t", "MARKER_ROTCRASH_r1")
    p.sql("SELECT pg_tde_create_key_using_global_key_provider('server-key-2', 'g')")
    e = p.sql_error(
        f"SET pg_tde.test_crash_point = '{point}';"
        "SELECT pg_tde_set_server_key_using_global_key_provider('server-key-2', 'g')"
    )
    assert "connection" in e.output or e.sqlstate in ("", "08006", "57P01", "XX000"), e.output
    wait_until_up(p)
    assert "terminated by signal 6" in p.logfile.read_text(errors="replace"), p.log_tail()
    assert p.sql("SELECT key_name FROM pg_tde_server_key_info()") in ("server-key", "server-key-2")
    if point == "wal_kek_after_wal":
        set_wal_encrypt(p, True)
    fill_enc(p, "t", "MARKER_ROTCRASH_r2", n=20)
    before = digest(p, "t")
    p.kill9()
    p.start()
    assert digest(p, "t") == before
    p.sql("SELECT pg_tde_set_server_key_using_global_key_provider('server-key-2', 'g')")
    fill_enc(p, "t", "MARKER_ROTCRASH_r3", n=20)
    before = digest(p, "t")
    p.restart()
    assert digest(p, "t") == before
