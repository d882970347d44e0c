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

from cluster import Cluster, SQLError, chown, make_dir, setup_encryption
from test_replication import dboid, digest, make_standby, wait_for_replay
import struct

from test_wal import SEG_SIZE, XLP_TDE_ENCRYPTED, flush_wal, lsn_int, new_cluster, seg_name, set_wal_encrypt, wal_files_with
from test_wal_tools import TOOLS, segments
from test_key_management import wait_until_up


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


# ---------------------------------------------------------------------------
# Case 2: databases copied or moved byte for byte; case 3: DROP DATABASE


def _keys_file(c: Cluster, oid: str) -> Path:
    return c.datadir / "pg_tde" / f"{oid}_keys"


def _db_pair(clusters, keyring):
    """A primary with an encrypted table in database `src`, a database
    `plain` without encrypted relations, an in-place tablespace `ts`, and a
    streaming standby."""
    p = new_cluster(clusters, "db-primary", keyring, wal_encrypt=False, extra="allow_in_place_tablespaces = on\n")
    p.sql("CREATE DATABASE src")
    p.sql("CREATE DATABASE plain")
    p.sql("CREATE TABLESPACE ts LOCATION ''")
    setup_encryption(p, keyring, db="src", key="src-key")
    fill_enc(p, "t", "MARKER_DBCOPY_z1", db="src")
    p.sql("CREATE TABLE h (v text); INSERT INTO h SELECT 'plain' || g FROM generate_series(1, 100) g", db="plain")
    s = make_standby(p)
    clusters.append(s)
    return p, s


def test_file_copy_and_set_tablespace_are_refused_for_encrypted_databases(clusters, keyring):
    p, s = _db_pair(clusters, keyring)
    expected = p.sql("SELECT md5(string_agg(v, ',' ORDER BY id)) FROM t", db="src")
    src_oid = dboid(p, "src")
    keys_before = _keys_file(p, src_oid).read_bytes()

    e = p.sql_error("CREATE DATABASE cp TEMPLATE src STRATEGY FILE_COPY")
    assert e.sqlstate == "0A000", e.output
    assert "STRATEGY WAL_LOG" in e.output, e.output
    assert p.sql("SELECT count(*) FROM pg_database WHERE datname = 'cp'") == "0"
    e = p.sql_error("ALTER DATABASE src SET TABLESPACE ts")
    assert e.sqlstate == "0A000", e.output
    assert p.sql("SELECT spcname FROM pg_database d JOIN pg_tablespace t ON t.oid = d.dattablespace WHERE datname = 'src'") == "pg_default"
    assert _keys_file(p, src_oid).read_bytes() == keys_before

    # what stays allowed: the default strategy gives the copies keys of their own,
    # and databases without encrypted relations move and copy as usual
    p.sql("CREATE DATABASE cp2 TEMPLATE src")
    p.sql("CREATE DATABASE cp3 TEMPLATE plain STRATEGY FILE_COPY")
    p.sql("ALTER DATABASE plain SET TABLESPACE ts")
    for db in ("src", "cp2"):
        assert p.sql("SELECT md5(string_agg(v, ',' ORDER BY id)) FROM t", db=db) == expected
    assert p.sql("SELECT count(*) FROM h", db="plain") == "100"
    assert p.sql("SELECT count(*) FROM h", db="cp3") == "100"
    p.sql("INSERT INTO t VALUES (100000, 'MARKER_DBCOPY_late')", db="cp2")
    flush_wal(p)
    wait_for_replay(p, s)
    for db in ("src", "cp2"):
        assert s.sql("SELECT md5(string_agg(v, ',' ORDER BY id)) FROM t WHERE id < 100000", db=db) == expected
    assert s.sql("SELECT count(*) FROM h", db="plain") == "100"
    for c in (p, s):
        c.checkpoint()
        assert not c.files_contain("t", b"MARKER_DBCOPY_z1", db="cp2")
        assert not c.files_contain("t", b"MARKER_DBCOPY_late", db="cp2")


def test_drop_database_removes_its_key_map(clusters, keyring):
    p, s = _db_pair(clusters, keyring)
    # a database on the default key, which DROP DATABASE must release
    p.sql("SELECT pg_tde_create_key_using_global_key_provider('dflt', 'g');"
          "SELECT pg_tde_set_default_key_using_global_key_provider('dflt', 'g')")
    p.sql("CREATE DATABASE ondefault")
    p.sql("CREATE EXTENSION pg_tde", db="ondefault")
    fill_enc(p, "t", "MARKER_DROPDB_d1", db="ondefault")
    oids = {db: dboid(p, db) for db in ("src", "ondefault")}
    wait_for_replay(p, s)
    stale = _keys_file(p, oids["src"]).read_bytes()
    for oid in oids.values():
        assert _keys_file(p, oid).exists() and _keys_file(s, oid).exists()

    p.sql("DROP DATABASE src")
    p.sql("DROP DATABASE ondefault")
    wait_for_replay(p, s)
    for c in (p, s):
        for oid in oids.values():
            assert not _keys_file(c, oid).exists(), f"{c.name}: {oid}_keys left behind"
    # nothing pins the default key any more
    p.sql("SELECT pg_tde_delete_default_key()")

    # A map left behind by a crash after the drop is not adopted by a new
    # database that gets the same OID.
    _keys_file(p, oids["src"]).write_bytes(stale)
    chown(_keys_file(p, oids["src"]))
    p.sql(f"CREATE DATABASE reused OID = {oids['src']}")
    assert not _keys_file(p, oids["src"]).exists()
    p.sql("CREATE EXTENSION pg_tde", db="reused")
    e = p.sql_error("CREATE TABLE x (v text) USING tde_heap", db="reused")
    assert "principal key" in e.message, e.output
    p.restart()
    assert not _keys_file(p, oids["src"]).exists()


# ---------------------------------------------------------------------------
# Case 4: creating a relation key races with rotating or deleting the
# principal key.  `pg_tde.test_crash_point = 'sleep:<point>'` holds the
# session for three seconds at that point, so that the other session's
# statement runs in the window.


def _in_background(c: Cluster, query: str, db: str = "postgres"):
    result: dict = {}

    def run():
        try:
            result["out"] = c.sql(query, db)
        except SQLError as e:
            result["err"] = e

    t = threading.Thread(target=run)
    t.start()
    return t, result


def _sleep_then(c: Cluster, point: str, query: str, db: str = "postgres"):
    # psql sends each statement on its own; the comment tags the first one
    t, r = _in_background(c, f"SET pg_tde.test_crash_point = 'sleep:{point}'; /* sleep:{point} */ {query}", db)
    # the background session is past its first statement and sleeping
    import time
    deadline = time.time() + 30
    while time.time() < deadline:
        if c.sql(f"SELECT count(*) FROM pg_stat_activity WHERE query LIKE '/* sleep:{point} */%' AND pid <> pg_backend_pid()") == "1":
            break
        time.sleep(0.05)
    else:
        raise AssertionError(f"the session never reached {point}")
    time.sleep(0.5)
    return t, r


def test_relation_key_created_during_a_rotation(clusters, keyring):
    p = new_cluster(clusters, "race-rot", keyring, wal_encrypt=False)
    p.sql("SELECT pg_tde_create_key_using_database_key_provider('k2', 'file-vault')")
    t, r = _sleep_then(p, "relation_key_before_lock",
                       "CREATE TABLE racy (id int, v text) USING tde_heap;"
                       "INSERT INTO racy SELECT g, 'MARKER_RACE_ROT' || g FROM generate_series(1, 500) g")
    p.sql("SELECT pg_tde_set_key_using_database_key_provider('k2', 'file-vault')")
    t.join()
    assert "err" not in r, r["err"].output
    p.checkpoint()
    p.restart()
    assert p.sql("SELECT count(*) FROM racy") == "500"
    p.sql("INSERT INTO racy VALUES (0, 'x')")
    p.checkpoint()
    assert not p.files_contain("racy", b"MARKER_RACE_ROT")


def test_delete_key_during_a_relation_key_creation(clusters, keyring):
    p = new_cluster(clusters, "race-del", keyring, wal_encrypt=False)
    t, r = _sleep_then(p, "delete_key_before_lock", "SELECT pg_tde_delete_key()")
    p.sql("CREATE TABLE racy (id int, v text) USING tde_heap;"
          "INSERT INTO racy SELECT g, 'MARKER_RACE_DEL' || g FROM generate_series(1, 500) g")
    t.join()
    # the delete sees the new relation under the lock and is refused
    assert "err" in r, "pg_tde_delete_key() deleted the key of a database with an encrypted table"
    assert r["err"].sqlstate == "55006", r["err"].output
    p.checkpoint()
    assert not p.files_contain("racy", b"MARKER_RACE_DEL")
    p.restart()
    assert p.sql("SELECT count(*) FROM racy") == "500"


def test_redo_of_a_relation_key_whose_map_was_removed_later(clusters, keyring):
    """Crash recovery replays a relation-key record after the map it belongs
    to was removed (DROP DATABASE) before the crash."""
    p = new_cluster(clusters, "redo-absent", keyring, wal_encrypt=False)
    p.sql("CREATE DATABASE gone")
    setup_encryption(p, keyring, db="gone", key="gone-key")
    p.checkpoint()  # recovery starts after the map was created
    fill_enc(p, "t", "MARKER_GONE", db="gone")
    p.sql("DROP DATABASE gone")
    p.kill9()
    p.start()
    assert p.sql("SELECT 1") == "1"


# ---------------------------------------------------------------------------
# Case 8: a provider that returns a different key under the same name


def test_overwritten_principal_key_is_refused(clusters, keyring):
    import json
    p = new_cluster(clusters, "overwritten", keyring, wal_encrypt=False)
    fill_enc(p, "t", "MARKER_OVERWRITTEN")
    expected = digest(p, "t")
    path = keyring / "keyring.json"
    original = path.read_bytes()
    doc = json.loads(original)
    for k in doc["keys"]:
        if k["name"] == "principal-key":
            k["key_hex"] = "ab" * (len(k["key_hex"]) // 2)
    path.write_text(json.dumps(doc))
    p.restart()  # empties the principal-key cache
    e = p.sql_error("CREATE TABLE t2 (v text) USING tde_heap")
    assert "does not match" in e.message, e.output
    e = p.sql_error("SELECT count(*) FROM t")
    assert "does not match" in e.message, e.output
    # the right key back: everything readable, and nothing was sealed with the wrong one
    path.write_bytes(original)
    p.restart()
    assert digest(p, "t") == expected
    p.sql("CREATE TABLE t2 (v text) USING tde_heap; INSERT INTO t2 VALUES ('x')")
    p.restart()
    assert p.sql("SELECT v FROM t2") == "x"


# ---------------------------------------------------------------------------
# Case 7: an ERROR inside md.c (here: a full tablespace) while pg_tde's
# storage manager writes encrypted pages


@pytest.fixture
def small_fs():
    """A 32 MB tmpfs owned by the server's user; skipped where mounting is refused."""
    import os
    import pwd
    import tempfile

    mnt = Path(tempfile.mkdtemp(prefix="pg_tde-full-", dir="/var/tmp"))
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=32m,mode=0700", "tmpfs", str(mnt)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        mnt.rmdir()
        pytest.skip(f"cannot mount a small file system here: {r.stderr.strip()}")
    pw = pwd.getpwnam("postgres")
    os.chown(mnt, pw.pw_uid, pw.pw_gid)
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)
    mnt.rmdir()


def test_full_tablespace_during_encrypted_writes(clusters, keyring, small_fs):
    p = new_cluster(clusters, "fulldisk", keyring, wal_encrypt=False)
    p.sql(f"CREATE TABLESPACE small LOCATION '{small_fs}'")
    m = "MARKER_FULL_DISK_f7"
    p.sql(f"CREATE TABLE big (id int, v text) USING tde_heap;"
          f"INSERT INTO big SELECT g, '{m}' || md5(g::text) FROM generate_series(1, 300000) g")
    p.sql("CREATE TABLE filler (v text) USING tde_heap TABLESPACE small;"
          "INSERT INTO filler SELECT repeat(md5(g::text), 4) FROM generate_series(1, 120000) g")
    # One session: the index build into the full tablespace fails inside
    # mdextend; after space is freed, the same process writes encrypted pages
    # again (no state of pg_tde's left behind by the error), and so does the
    # checkpointer.
    script = (
        "CREATE INDEX big_v ON big (v) TABLESPACE small;\n"
        "SELECT 'after-error';\n"
        "DROP TABLE filler;\n"
        "CREATE INDEX big_v ON big (v) TABLESPACE small;\n"
        f"INSERT INTO big SELECT g, '{m}' || md5(g::text) FROM generate_series(300001, 310000) g;\n"
        "CHECKPOINT;\n"
        "SELECT 'done';\n"
    )
    r = subprocess.run(p.psql_args() + ["-v", "VERBOSITY=verbose"], input=script, capture_output=True, text=True)
    assert "53100" in r.stderr, f"no disk-full error:\n{r.stderr}"
    assert r.stderr.count("ERROR") == 1, r.stderr
    assert "done" in r.stdout, r.stdout + r.stderr
    p.restart()
    assert p.sql("SELECT count(*) FROM big") == "310000"
    assert p.sql(f"SET enable_seqscan = off; SELECT count(*) FROM big WHERE v = '{m}' || md5('309999')") == "1"
    p.sql("CREATE EXTENSION IF NOT EXISTS amcheck; SELECT bt_index_check('big_v', true)")
    assert not p.files_contain("big_v", m.encode())
    assert not p.files_contain("big", m.encode())


# ---------------------------------------------------------------------------
# Case 6: stale encrypted pages of recycled segments after encryption was
# switched off


def _next_segment_starts_with_a_stale_flagged_page(c: Cluster) -> bool:
    lsn = lsn_int(c.sql("SELECT pg_current_wal_insert_lsn()"))
    nxt = (lsn // SEG_SIZE + 1) * SEG_SIZE
    path = c.datadir / "pg_wal" / seg_name(1, nxt)
    if not path.exists():
        return False
    with open(path, "rb") as f:
        _magic, info, _tli, addr = struct.unpack("<HHIQ", f.read(16))
    return bool(info & XLP_TDE_ENCRYPTED) and addr != nxt


def test_stale_encrypted_page_after_switching_off_is_end_of_wal(clusters, keyring):
    p = new_cluster(clusters, "stale-wal", keyring, wal_encrypt=True,
                    extra="min_wal_size = '256MB'\nmax_wal_size = '512MB'\nwal_recycle = on\n")
    # several segments of encrypted WAL, then recycled into future segments
    p.sql("CREATE TABLE w (v text) USING tde_heap;"
          "INSERT INTO w SELECT repeat(md5(g::text), 30) FROM generate_series(1, 80000) g")
    p.checkpoint()
    p.sql("SELECT pg_switch_wal()")
    p.checkpoint()
    set_wal_encrypt(p, False)
    # End the WAL with a segment switch right before a recycled segment whose
    # first page is a flagged page of its previous life, with another page
    # address: crash recovery reads that page to find the end of WAL.
    for i in range(8):
        if _next_segment_starts_with_a_stale_flagged_page(p):
            break
        p.sql(f"INSERT INTO w VALUES ('skip{i}'); SELECT pg_switch_wal()")
    else:
        raise AssertionError("no recycled segment with stale encrypted pages came up")
    p.sql("INSERT INTO w VALUES ('after')")
    expected = p.sql("SELECT count(*) FROM w")
    p.sql("SELECT pg_switch_wal()")
    for _ in range(2):
        p.kill9()
        p.start()
        assert p.sql("SELECT count(*) FROM w") == expected
    assert "unexpected pageaddr" in p.logfile.read_text(errors="replace") or "invalid info bits" in p.logfile.read_text(errors="replace")


# ---------------------------------------------------------------------------
# Case 5: WAL keys at a timeline switch


def test_new_timeline_never_reuses_the_keystream_of_the_old_one(clusters, keyring, tmp_path):
    """A standby that follows a promoted node onto timeline 2 writes the new
    timeline's copy of the switch segment with a key of its own: where the
    two files hold the same WAL (before the switch point), their ciphertexts
    differ; a shared (key, counter) would make them equal, and would encrypt
    the different WAL after the switch point with the same keystream."""
    p = new_cluster(clusters, "tl-primary", keyring, wal_encrypt=True, extra="wal_keep_size = '1GB'\n")
    p.sql("CREATE TABLE s (id int, v text) USING tde_heap")
    s1 = make_standby(p)
    clusters.append(s1)
    s2 = make_standby(p)
    clusters.append(s2)
    p.sql("INSERT INTO s SELECT g, 'MARKER_TL_ONE' || g FROM generate_series(1, 2000) g")
    for s in (s1, s2):
        wait_for_replay(p, s)
    p.stop()
    assert s1.sql("SELECT pg_promote(true, 120)") == "t"
    s1.sql("INSERT INTO s SELECT g, 'MARKER_TL_TWO' || g FROM generate_series(3000, 5000) g")
    s2.sql(f"ALTER SYSTEM SET primary_conninfo = 'host={s1.sockdir} port={s1.port} user=postgres'; SELECT pg_reload_conf()")
    import time
    deadline = time.time() + 180
    while s2.sql("SELECT coalesce((SELECT received_tli FROM pg_stat_wal_receiver WHERE status = 'streaming'), 0)") != "2":
        assert time.time() < deadline, s2.log_tail()
        time.sleep(0.2)
    wait_for_replay(s1, s2)
    assert digest(s2, "s") == digest(s1, "s")
    s2.checkpoint()

    history = (s2.datadir / "pg_wal" / "00000002.history").read_text().split()
    switch = lsn_int(history[1])
    seg1 = s2.datadir / "pg_wal" / seg_name(1, switch)
    seg2 = s2.datadir / "pg_wal" / seg_name(2, switch)
    assert seg1.exists() and seg2.exists(), sorted(x.name for x in (s2.datadir / "pg_wal").iterdir())
    c1, c2 = seg1.read_bytes(), seg2.read_bytes()
    out = tmp_path / "plain"
    out.mkdir()
    r = subprocess.run([str(TOOLS / "pg_tde_decrypt_wal"), "-D", str(s2.datadir), "-o", str(out), str(seg1), str(seg2)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    p1, p2 = (out / seg1.name).read_bytes(), (out / seg2.name).read_bytes()
    start = switch - switch % SEG_SIZE
    same_plain = same_cipher = 0
    for page in range(0, (switch - start) // 8192 * 8192, 8192):
        flagged = all(struct.unpack_from("<H", c, page + 2)[0] & XLP_TDE_ENCRYPTED for c in (c1, c2))
        if not flagged:
            continue
        for i in range(page + 40, page + 8192):
            if p1[i] == p2[i]:
                same_plain += 1
                same_cipher += c1[i] == c2[i]
    assert same_plain > 8192, "the two timelines' files share too little WAL to compare"
    # with independent keys, equal bytes come by chance (1/256)
    assert same_cipher < same_plain // 20, f"{same_cipher} of {same_plain} shared bytes encrypted alike: keystream reused"


# ---------------------------------------------------------------------------
# Case 10: the archive and restore wrappers


def test_killed_archive_wrapper_leaves_no_plaintext_in_the_data_directory(clusters, keyring, tmp_path):
    from run_as import as_user
    p = new_cluster(clusters, "wrap-kill", keyring, wal_encrypt=True)
    m = "MARKER_WRAPPER_KILLED"
    p.sql("SELECT pg_switch_wal()")
    p.sql(f"CREATE TABLE k (v text); INSERT INTO k SELECT '{m}' || g FROM generate_series(1, 300) g")
    seg = p.sql("SELECT pg_walfile_name(pg_current_wal_lsn())")
    p.sql("SELECT pg_switch_wal()")
    tmpdir = make_dir("wrapper-tmp")
    tool = str(TOOLS / "pg_tde_archive_decrypt")
    # The wrapped command kills the wrapper while the decrypted copy exists.
    r = subprocess.run(as_user(["env", f"PG_TDE_TMPDIR={tmpdir}", tool, "-D", str(p.datadir), seg, f"pg_wal/{seg}",
                                "kill -9 $PPID"]), capture_output=True, text=True)
    assert r.returncode != 0
    leftovers = [f for f in tmpdir.rglob("*") if f.is_file()]
    assert leftovers and m.encode() in leftovers[0].read_bytes(), "the copy the command works on is plaintext"
    for f in p.datadir.rglob("*"):
        if f.is_file():
            assert m.encode() not in f.read_bytes(), f"plaintext WAL in the data directory: {f}"
    # the next run removes what the killed one left
    r = subprocess.run(as_user(["env", f"PG_TDE_TMPDIR={tmpdir}", tool, "-D", str(p.datadir), seg, f"pg_wal/{seg}",
                                "true"]), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert not [f for f in tmpdir.rglob("*") if f.is_file()]
    # a temporary directory inside the data directory is refused
    inside = p.datadir / "pg_tde"
    r = subprocess.run(as_user(["env", f"PG_TDE_TMPDIR={inside}", tool, "-D", str(p.datadir), seg, f"pg_wal/{seg}",
                                "true"]), capture_output=True, text=True)
    assert r.returncode != 0 and "inside the data directory" in r.stderr, r.stderr


def test_concurrent_restores_append_whole_key_records(clusters, keyring, tmp_path):
    from run_as import as_user
    p = new_cluster(clusters, "wrap-conc", keyring, wal_encrypt=True)
    p.sql("SELECT pg_switch_wal()")
    p.sql("CREATE TABLE k (v text); INSERT INTO k SELECT 'MARKER_RESTORE_CONC_' || g FROM generate_series(1, 300) g")
    seg = p.sql("SELECT pg_walfile_name(pg_current_wal_lsn())")
    p.sql("SELECT pg_switch_wal()")
    plain = make_dir("plain")
    r = subprocess.run(as_user([str(TOOLS / "pg_tde_decrypt_wal"), "-D", str(p.datadir), "-o", str(plain),
                                str(p.datadir / "pg_wal" / seg)]), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    # a marker long enough never to occur by chance in 16 MB of ciphertext
    # (a 4-byte one did, in about one file in 250)
    marker = b"MARKER_RESTORE_CONC_299"
    assert marker in (plain / seg).read_bytes()
    keys = p.datadir / "pg_tde" / "wal_keys"
    before = keys.stat().st_size
    out = make_dir("restored")
    n = 8
    procs = [subprocess.Popen(as_user([str(TOOLS / "pg_tde_restore_encrypt"), "-D", str(p.datadir), seg,
                                       str(out / f"{i}"), f"cp {plain}/%f %p"]),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for i in range(n)]
    for pr in procs:
        _, err = pr.communicate(timeout=120)
        assert pr.returncode == 0, err
    data = keys.read_bytes()
    assert len(data) == before + n * 256, (before, len(data))
    assert all(data[i:i + 8] == b"PGTDEWK\x02" for i in range(0, len(data), 256))
    # every restored copy is encrypted with one of the new keys, and the
    # server still reads all its keys
    for i in range(n):
        assert marker not in (out / f"{i}").read_bytes()
    p.restart()
    p.sql("INSERT INTO k VALUES ('after')")
    assert p.sql("SELECT count(*) FROM k") == "301"


@pytest.mark.parametrize("how", ["drop database", "delete key"])
def test_crash_between_logging_and_removing_a_key_map(clusters, keyring, how):
    p = new_cluster(clusters, "map-remove-crash", keyring, wal_encrypt=False)
    p.sql("CREATE DATABASE victim")
    setup_encryption(p, keyring, db="victim", key="victim-key")
    oid = dboid(p, "victim")
    assert _keys_file(p, oid).exists()
    stmt = "DROP DATABASE victim" if how == "drop database" else "SELECT pg_tde_delete_key()"
    db = "postgres" if how == "drop database" else "victim"
    e = p.sql_error(f"SET pg_tde.test_crash_point = 'map_remove_after_wal'; {stmt}", db=db)
    assert "connection" in e.output or e.sqlstate in ("", "08006", "57P01", "XX000"), e.output
    wait_until_up(p)
    assert "terminated by signal 6" in p.logfile.read_text(errors="replace"), p.log_tail()
    # the removal was logged: crash recovery finished it
    assert not _keys_file(p, oid).exists()
    if how == "drop database":
        # the drop itself had not committed; the database is left invalid and is dropped again
        p.sql("DROP DATABASE IF EXISTS victim")
        assert p.sql("SELECT count(*) FROM pg_database WHERE datname = 'victim'") == "0"
    else:
        assert p.sql("SELECT count(*) FROM pg_tde_key_info()", db="victim") in ("0", "1")
        e = p.sql_error("CREATE TABLE x (v text) USING tde_heap", db="victim")
        assert "principal key" in e.message, e.output


def test_restarted_wal_receiver_takes_a_new_key_after_what_it_wrote(clusters, keyring):
    """Each start of the WAL receiver takes a new key, starting after what the
    previous receiver wrote on the timeline (the rewritten WAL keeps its key):
    a crash of the standby right after the restart loses nothing on disk."""
    import time
    from test_wal import key_records, rec_start_lsn
    p = new_cluster(clusters, "rcv-primary", keyring, wal_encrypt=True, extra="wal_keep_size = '1GB'\n")
    s = make_standby(p)
    clusters.append(s)
    fill_enc(p, "t", "MARKER_RCV_ONE")
    wait_for_replay(p, s)
    n = len(key_records(s))
    first = rec_start_lsn(key_records(s)[-1])
    received = lsn_int(s.sql("SELECT pg_last_wal_receive_lsn()"))
    import os
    import signal
    old_pid = int(s.sql("SELECT pid FROM pg_stat_wal_receiver"))
    os.kill(old_pid, signal.SIGTERM)  # an auxiliary process: pg_terminate_backend refuses it
    deadline = time.time() + 120
    while s.sql("SELECT coalesce((SELECT pid FROM pg_stat_wal_receiver WHERE status = 'streaming'), 0)") in ("0", str(old_pid)):
        assert time.time() < deadline, s.log_tail()
        time.sleep(0.2)
    fill_enc(p, "t", "MARKER_RCV_TWO")
    wait_for_replay(p, s)
    recs = key_records(s)
    assert len(recs) == n + 1, "the restarted receiver took no key of its own"
    assert first < rec_start_lsn(recs[-1]) and rec_start_lsn(recs[-1]) >= received - received % 8192
    s.kill9()
    s.start()
    wait_for_replay(p, s)
    assert digest(s, "t") == digest(p, "t")
    s.checkpoint()
    assert not wal_files_with(s, "MARKER_RCV_TWO")


# ---------------------------------------------------------------------------
# Case 1, continued: data directories from before the WAL key-encryption key.
# Their WAL key records are wrapped by the server key itself (format v1); the
# helpers below turn a stopped cluster back into that state, offline.


def _crc32c(data: bytes) -> int:
    crc = 0xFFFFFFFF
    for b in data:
        crc ^= b
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
    return crc ^ 0xFFFFFFFF


def _server_key(keyring: Path) -> bytes:
    import json
    keys = json.loads((keyring / "keyring.json").read_text())["keys"]
    return bytes.fromhex(next(k["key_hex"] for k in keys if k["name"] == "server-key"))


def _make_legacy(c: Cluster, keyring: Path) -> None:
    """Drop the key-encryption key from the server map and re-wrap every WAL
    key record with the server key, as the format before it (v1) had them."""
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM
    sk = _server_key(keyring)
    server_db = 0xFFFFFFFD
    mp = c.datadir / "pg_tde" / "server_key"
    m = bytearray(mp.read_bytes())
    kek = None
    for off in range(512, len(m), 256):
        state, spc, rel, cipher, wlen = struct.unpack_from("<5I", m, off)
        if state == 1 and spc == 0 and rel == 0:
            w = bytes(m[off + 20:off + 20 + wlen])
            aad = b"pg_tde relkey" + struct.pack("<4I", server_db, 0, 0, cipher)
            kek = AESGCM(sk).decrypt(w[:12], w[12:], aad)[:32]
            m[off:off + 256] = bytes(256)  # an all-zero record is a free slot
    assert kek is not None, "no WAL key-encryption key in the server key map"
    mp.write_bytes(bytes(m))
    wk = c.datadir / "pg_tde" / "wal_keys"
    data = wk.read_bytes()
    out = b""
    for off in range(0, len(data), 256):
        rec = data[off:off + 256]
        assert rec[:8] == b"PGTDEWK\x02"
        start, created, end, wlen, tli = struct.unpack_from("<QqQII", rec, 8)
        new = bytearray(256)
        new[0:8] = b"PGTDEWK\x01"
        struct.pack_into("<QqQ", new, 8, start, created, end)
        if wlen:
            w = rec[40:40 + wlen]
            plain = AESGCM(kek).decrypt(w[:12], w[12:], b"pg_tde wal key v2" + struct.pack("<QQI", start, end, tli))
            nonce = __import__("os").urandom(12)
            w1 = nonce + AESGCM(sk).encrypt(nonce, plain, b"pg_tde wal key" + struct.pack("<QQ", start, end))
            struct.pack_into("<I", new, 32, len(w1))
            new[36:36 + len(w1)] = w1
        struct.pack_into("<I", new, 252, _crc32c(bytes(new[:252])))
        out += bytes(new)
    wk.write_bytes(out)


def test_rotation_with_legacy_wal_key_records_on_primary_and_standby(clusters, keyring, tmp_path):
    p = new_cluster(clusters, "legacy-primary", keyring, wal_encrypt=True, extra="wal_keep_size = '1GB'\n")
    s = make_standby(p)
    clusters.append(s)
    fill_enc(p, "t", "MARKER_LEGACY_ONE")
    wait_for_replay(p, s)
    s.stop()
    p.stop()
    for c in (p, s):
        _make_legacy(c, keyring)
    p.start()
    s.start()
    # the old format reads as before
    fill_enc(p, "t", "MARKER_LEGACY_TWO")
    wait_for_replay(p, s)
    assert digest(s, "t") == digest(p, "t")
    assert any(r[:8] == b"PGTDEWK\x01" for r in _records(s))

    p.sql("SELECT pg_tde_create_key_using_global_key_provider('server-key-2', 'g')")
    p.sql("SELECT pg_tde_set_server_key_using_global_key_provider('server-key-2', 'g')")
    fill_enc(p, "t", "MARKER_LEGACY_THREE")
    wait_for_replay(p, s)
    # both servers re-wrapped their own records before the rotation took effect
    for c in (p, s):
        assert all(r[:8] == b"PGTDEWK\x02" for r in _records(c)), c.name
    for c in (s, p):
        c.restart()
    fill_enc(p, "t", "MARKER_LEGACY_FOUR", n=10)
    wait_for_replay(p, s)
    assert digest(s, "t") == digest(p, "t")
    out = tmp_path / "dec"
    out.mkdir()
    r = subprocess.run([str(TOOLS / "pg_tde_decrypt_wal"), "-D", str(s.datadir), "-o", str(out)]
                       + [str(x) for x in segments(s)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def _records(c: Cluster) -> list[bytes]:
    data = (c.datadir / "pg_tde" / "wal_keys").read_bytes()
    return [data[i:i + 256] for i in range(0, len(data), 256)]
