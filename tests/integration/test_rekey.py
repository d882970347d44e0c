"""Online re-keying (issue 17): pg_tde_rotate_relation_key, pg_tde_encrypt_relation and
pg_tde_decrypt_relation on live tables, with writers running, kill -9 in the middle of
the walk and a streaming standby.

What is checked on disk: the key map entries of the table's files change (the old
wrapped keys are gone), and every block of the files, read from disk and decrypted in
this test with the keys unwrapped from the keyring (AES-GCM, then XTS-AES as IEEE 1619
defines it, via the `cryptography` package), is a valid page under the new key and
garbage under the old one; for online encryption, no marker is left in plaintext.
"""

from __future__ import annotations

import json
import random
import re
import struct
import subprocess
import threading
import time
from pathlib import Path

import pytest

from cluster import Cluster, SQLError
from test_key_management import dboid, keys_path, parse_keymap
from test_replication import make_standby, wait_for_replay

PAGE = 8192
MARKER = "REKEYMARKER_7f3a"


def setup_table(c: Cluster, table: str, am: str, rows: int = 20000) -> None:
    c.sql(
        f"CREATE TABLE {table} (id int PRIMARY KEY, v text, big text) USING {am};"
        f"INSERT INTO {table} SELECT g, '{MARKER}' || g, NULL FROM generate_series(1, {rows}) g;"
        f"UPDATE {table} SET big = (SELECT string_agg(md5(x::text || id), '') FROM generate_series(1, 200) x)"
        f"  || '{MARKER}' WHERE id % 2000 = 0;"
        f"CREATE INDEX {table}_v ON {table} (v);"
        f"CREATE SEQUENCE {table}_seq OWNED BY {table}.id; SELECT nextval('{table}_seq')"
    )


def digest(c: Cluster, table: str, upto: int = 20000) -> str:
    return c.sql(f"SELECT count(*) || '/' || md5(string_agg(id || ':' || v || coalesce(md5(big), ''), ',' ORDER BY id)) "
                 f"FROM {table} WHERE id <= {upto}")


class Writer(threading.Thread):
    """Inserts rows one transaction at a time and remembers those whose commit was
    acknowledged; survives the server going away and coming back."""

    def __init__(self, c: Cluster, table: str, start: int = 100000):
        super().__init__(daemon=True)
        self.c, self.table, self.next = c, table, start
        self.committed: list[int] = []
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            i = self.next
            try:
                self.c.sql(f"INSERT INTO {self.table} VALUES ({i}, 'w{i}', NULL); "
                           f"UPDATE {self.table} SET v = v || '+' WHERE id = {1 + i % 20000}")
                self.committed.append(i)
            except (SQLError, OSError):
                time.sleep(0.2)
            self.next += 1


def files(c: Cluster, table: str) -> list[str]:
    rels = c.sql(
        f"SELECT string_agg(r::text, ' ') FROM (SELECT '{table}'::regclass::oid r UNION ALL "
        f"SELECT reltoastrelid FROM pg_class WHERE oid = '{table}'::regclass UNION ALL "
        f"SELECT indexrelid FROM pg_index WHERE indrelid = '{table}'::regclass UNION ALL "
        f"SELECT indexrelid FROM pg_index WHERE indrelid = (SELECT reltoastrelid FROM pg_class WHERE oid = '{table}'::regclass) "
        f"UNION ALL SELECT '{table}_seq'::regclass::oid) s")
    return rels.split()


def filenodes(c: Cluster, table: str) -> dict[int, str]:
    return {int(c.sql(f"SELECT pg_relation_filenode({r})")): r for r in files(c, table)}


def principal_key(keyring: Path, name: str = "principal-key") -> bytes:
    keys = json.loads((keyring / "keyring.json").read_text())["keys"]
    return bytes.fromhex(next(k["key_hex"] for k in keys if k["name"] == name))


def unwrap(pk: bytes, db: int, spc: int, rel: int, cipher: int, wrapped: bytes) -> bytes:
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM
    aad = b"pg_tde relkey" + struct.pack("<4I", db, spc, rel, cipher)
    return AESGCM(pk).decrypt(wrapped[:12], wrapped[12:], aad)


def xts_decrypt(key: bytes, fork: int, block: int, page: bytes) -> bytes:
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
    tweak = ((fork << 32) | block).to_bytes(16, "little")
    d = Cipher(algorithms.AES(key), modes.XTS(tweak)).decryptor()
    return d.update(page) + d.finalize()


def valid_page(p: bytes) -> bool:
    """A PostgreSQL page header: pd_pagesize_version 8192|4 and sane pointers; or a
    new (all-zero) page, as hash indexes write for the buckets they allocate."""
    if p.count(0) == PAGE:
        return True
    lower, upper, special, size_version = struct.unpack_from("<HHHH", p, 12)
    return size_version == 0x2004 and 24 <= lower <= upper <= special <= PAGE


def blocks_of(c: Cluster, rel: str) -> list[tuple[int, int, bytes]]:
    """(fork, block, bytes) of every non-zero block of the main fork of a relation."""
    path = c.datadir / c.sql(f"SELECT pg_relation_filepath({rel})")
    out = []
    data = path.read_bytes()
    for b in range(len(data) // PAGE):
        page = data[b * PAGE:(b + 1) * PAGE]
        if page.count(0) != PAGE:
            out.append((0, b, page))
    return out


def xts_key(relkey: bytes, cipher: int) -> bytes:
    assert cipher in (3, 4), "the test decrypts XTS-AES files"
    return relkey[:32] if cipher == 3 else relkey[:64]


def slow_walk(c: Cluster, call: str) -> subprocess.Popen:
    """`call` (a pg_tde_*_relation call) in a session of its own, throttled to a
    batch of 32 blocks every 400 ms."""
    return subprocess.Popen(c.psql_args() + ["-c", "SET pg_tde.rekey_cost_delay = 100",
                                             "-c", "SET pg_tde.rekey_cost_limit = 20", "-c", f"SELECT {call}"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def wait_mid_walk(c: Cluster, walk: subprocess.Popen, table: str | None = None) -> str:
    """Wait until the walk is at a random block of a file (the heap of `table` if
    given) with at least two batches left (so that what comes next cannot come
    after the walk).  Returns where."""
    at = random.randrange(1, 64)
    only = f" AND relfilenode = pg_relation_filenode('{table}')" if table else ""
    deadline = time.time() + 120
    while time.time() < deadline:
        assert walk.poll() is None, f"the walk ended too early: {walk.stderr.read()[-300:]!r}"
        where = c.sql("SELECT relfilenode || ':' || blocks_done || '/' || blocks_total FROM pg_tde_rekey_progress "
                      f"WHERE state = 'running' AND blocks_done >= {at} AND blocks_total - blocks_done >= 64{only}")
        if where:
            time.sleep(random.uniform(0, 0.3))  # within the batch's 400 ms
            return where
        time.sleep(0.02)
    raise AssertionError("the walk did not reach the middle of a file")


def kill9_mid_walk(c: Cluster, walk: subprocess.Popen) -> str:
    """Kill the whole server (kill -9) in the middle of a walk, then start it."""
    where = wait_mid_walk(c, walk)
    c.kill9()
    walk.wait(timeout=60)
    assert walk.returncode != 0, "the walk was interrupted by the kill"
    c.start()
    return where


def assert_rekeyed_on_disk(c: Cluster, keyring: Path, db: int, old: dict, nodes: dict) -> None:
    """Every file of `old` ({relfilenode: (cipher, wrapped key)}) has a new key in the
    key map, and every block of it on disk is a page under the new key and garbage
    under the old one, with no marker in plaintext."""
    c.checkpoint()
    _, new_records = parse_keymap(keys_path(c).read_bytes())
    pk = principal_key(keyring)
    for rel, (cipher, wrapped) in old.items():
        new_cipher, new_wrapped = new_records[(1663, rel)]
        assert new_wrapped != wrapped
        old_key = xts_key(unwrap(pk, db, 1663, rel, cipher, wrapped), cipher)
        new_key = xts_key(unwrap(pk, db, 1663, rel, new_cipher, new_wrapped), new_cipher)
        assert old_key != new_key
        name = nodes[rel]
        blocks = blocks_of(c, name)
        assert blocks, name
        for fork, block, page in blocks:
            assert valid_page(xts_decrypt(new_key, fork, block, page)), f"{name} block {block} under the new key"
            assert not valid_page(xts_decrypt(old_key, fork, block, page)), f"{name} block {block} still under the old key"
        assert MARKER.encode() not in b"".join(p for _, _, p in blocks)


def amcheck(c: Cluster, table: str) -> None:
    c.sql("CREATE EXTENSION IF NOT EXISTS amcheck")
    assert c.sql(f"SELECT count(*) FROM verify_heapam('{table}')") == "0"
    for idx in c.sql(f"SELECT string_agg(indexrelid::regclass::text, ' ') FROM pg_index WHERE indrelid = '{table}'::regclass").split():
        c.sql(f"SELECT bt_index_check('{idx}', true)")


def test_rotation_online_under_writes_survives_kill9(tde, keyring):
    c = tde
    setup_table(c, "t", "tde_heap")
    before = digest(c, "t")
    db = int(dboid(c))
    c.checkpoint()
    _, old_records = parse_keymap(keys_path(c).read_bytes())
    nodes = filenodes(c, "t")
    old = {rel: rec for (spc, rel), rec in old_records.items() if rel in nodes}
    assert len(old) == len(nodes), "every file of the table has a key"
    old_blocks = {nodes[rel]: blocks_of(c, nodes[rel]) for rel in old}

    # this test continues the walk by calling the function again (the other kill
    # test lets the server resume it)
    c.sql("ALTER SYSTEM SET pg_tde.rekey_resume = off")
    writer = Writer(c, "t")
    writer.start()
    walk = slow_walk(c, "pg_tde_rotate_relation_key('t')")
    killed_at = kill9_mid_walk(c, walk)
    time.sleep(2)  # the key checker would have resumed it by now
    state = c.sql("SELECT string_agg(mode || ':' || (fork * 1000000000::bigint + block), ',') FROM pg_tde_rekey_status()")
    assert state, f"the files being re-keyed when killed at {killed_at} are still recorded"
    assert set(c.sql("SELECT string_agg(state, ' ') FROM pg_tde_rekey_progress").split()) == {"interrupted"}
    assert "resuming the online" not in c.logfile.read_text(errors="replace")
    c.sql("SELECT pg_tde_rotate_relation_key('t')")  # continues from the frontier
    assert c.sql("SELECT count(*) FROM pg_tde_rekey_status()") == "0"
    time.sleep(1)
    writer.stop.set()
    writer.join(timeout=30)
    assert writer.committed, "the writer committed rows during the walk"

    # every row is there: the original ones (the writer only appended '+'), and
    # every acknowledged insert
    assert c.sql("SELECT count(*) FROM t WHERE id <= 20000") == "20000"
    got = {int(x) for x in c.sql("SELECT string_agg(id::text, ' ') FROM t WHERE id >= 100000").split()}
    assert set(writer.committed) <= got, f"lost rows: {sorted(set(writer.committed) - got)[:10]} (state after crash: {state})"
    assert c.sql("SELECT count(*) FROM t WHERE big LIKE '%" + MARKER + "'") == "10"
    amcheck(c, "t")
    assert not (c.datadir / "pg_tde" / f"{db}_rekey").exists()

    assert_rekeyed_on_disk(c, keyring, db, old, nodes)
    assert all(old_blocks[name] for name in nodes.values())
    c.restart()
    assert digest(c, "t").split("/")[0] == "20000"
    assert before.split("/")[0] == "20000"


def test_online_encryption_and_decryption_with_a_standby(tde, keyring):
    c = tde
    setup_table(c, "p", "heap")
    c.checkpoint()
    assert c.files_contain("p", MARKER.encode()), "control: the plain table shows the marker"
    standby = make_standby(c)
    try:
        before = digest(c, "p")
        writer = Writer(c, "p")
        writer.start()
        c.sql("SELECT pg_tde_encrypt_relation('p')")
        writer.stop.set()
        writer.join(timeout=30)
        assert c.sql("SELECT amname FROM pg_class c JOIN pg_am a ON a.oid = c.relam WHERE c.oid = 'p'::regclass") == "tde_heap"
        for rel in files(c, "p"):
            assert c.sql(f"SELECT pg_tde_is_encrypted({rel})") == "t", rel
        c.checkpoint()
        for rel in files(c, "p"):
            name = c.sql(f"SELECT {rel}::regclass")
            assert not c.files_contain(name, MARKER.encode()), f"plaintext marker left in {name}"
        amcheck(c, "p")
        wait_for_replay(c, standby)
        assert standby.sql("SELECT count(*) FROM p WHERE id <= 20000") == "20000"
        assert digest(standby, "p").split("/")[0] == before.split("/")[0]
        committed = set(writer.committed)

        # decryption is refused under enforcement, and then done
        c.sql("ALTER SYSTEM SET pg_tde.enforce_encryption = on; SELECT pg_reload_conf()")
        time.sleep(0.5)
        e = c.sql_error("SELECT pg_tde_decrypt_relation('p')")
        assert "enforce_encryption" in e.message
        c.sql("ALTER SYSTEM RESET pg_tde.enforce_encryption; SELECT pg_reload_conf()")
        time.sleep(0.5)
        c.sql("SELECT pg_tde_decrypt_relation('p')")
        assert c.sql("SELECT pg_tde_is_encrypted('p')") == "f"
        c.checkpoint()
        assert c.files_contain("p", MARKER.encode())
        amcheck(c, "p")

        # the standby, promoted, reads everything
        wait_for_replay(c, standby)
        standby.sql("SELECT pg_promote()")
        deadline = time.time() + 30
        while standby.sql("SELECT pg_is_in_recovery()") != "f" and time.time() < deadline:
            time.sleep(0.2)
        got = {int(x) for x in (standby.sql("SELECT string_agg(id::text, ' ') FROM p WHERE id >= 100000") or "").split()}
        assert committed <= got
        assert standby.sql("SELECT count(*) FROM p WHERE id <= 20000") == "20000"
        amcheck(standby, "p")
    finally:
        standby.destroy()


def test_failover_mid_rotation_resumes_on_the_promoted_standby(tde, keyring):
    """The primary dies (kill -9, for good) in the middle of a rotation; the standby,
    promoted, resumes the walk by itself from the replayed frontier and finishes it:
    every row there, every block on its disk under the new keys."""
    c = tde
    setup_table(c, "f", "tde_heap")
    db = int(dboid(c))
    c.checkpoint()
    _, old_records = parse_keymap(keys_path(c).read_bytes())
    nodes = filenodes(c, "f")
    old = {rel: rec for (spc, rel), rec in old_records.items() if rel in nodes}
    standby = make_standby(c)
    try:
        walk = slow_walk(c, "pg_tde_rotate_relation_key('f')")
        where = wait_mid_walk(c, walk, "f")
        wait_for_replay(c, standby)
        replaying = standby.sql("SELECT string_agg(DISTINCT state, ',') FROM pg_tde_rekey_progress")
        assert replaying == "replaying", replaying
        c.kill9()
        walk.wait(timeout=60)
        standby.sql("SELECT pg_promote()")
        state_file = standby.datadir / "pg_tde" / f"{db}_rekey"
        deadline = time.time() + 120
        while state_file.exists() or not re.search(r"rotate of relation \d+ finished", standby.logfile.read_text(errors="replace")):
            assert time.time() < deadline, f"the walk interrupted at {where} was not resumed after the promotion"
            time.sleep(0.3)
        log = standby.logfile.read_text(errors="replace")
        assert "resuming the online rotate of relation" in log
        assert standby.sql("SELECT count(*) FROM pg_tde_rekey_status()") == "0"
        assert standby.sql("SELECT count(*) FROM f WHERE id <= 20000") == "20000"
        amcheck(standby, "f")
        assert_rekeyed_on_disk(standby, keyring, db, old, nodes)
    finally:
        standby.destroy()


def test_rotation_of_a_growing_hash_index(tde, keyring):
    """A hash index grows while it is re-keyed: bucket splits allocate whole
    splitpoints past its end (smgrextend of the last block, holes before it) and
    overflow pages, without the relation extension lock.  Every value is found
    through the index afterwards, after a restart, and every block on disk is a
    page under the new key."""
    c = tde
    c.sql("CREATE TABLE h (id int, v text) USING tde_heap;"
          f"INSERT INTO h SELECT g, '{MARKER}' || g FROM generate_series(1, 20000) g;"
          "CREATE INDEX h_v ON h USING hash (v)")
    db = int(dboid(c))
    c.checkpoint()
    _, old_records = parse_keymap(keys_path(c).read_bytes())
    index = int(c.sql("SELECT pg_relation_filenode('h_v')"))
    size_before = int(c.sql("SELECT pg_relation_size('h_v')"))
    # inserts in batches of 200, each committed, for as long as the walk goes on
    # (faster than the throttled walk goes through the heap: its tail is walked
    # at full speed)
    grower = subprocess.Popen(c.psql_args() + ["-c", f"""
        DO $$ BEGIN FOR b IN 0..100000 LOOP
            INSERT INTO h SELECT g, '{MARKER}' || g FROM generate_series(100001 + b * 200, 100200 + b * 200) g;
            COMMIT; PERFORM pg_sleep(0.05);
        END LOOP; END $$"""], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    time.sleep(1)
    c.sql("SET pg_tde.rekey_cost_delay = 100; SET pg_tde.rekey_cost_limit = 20; SELECT pg_tde_rotate_relation_key('h')")
    assert grower.poll() is None, grower.stderr.read()
    c.sql("SELECT pg_cancel_backend(pid) FROM pg_stat_activity WHERE query LIKE '%generate_series(100001%' "
          "AND pid <> pg_backend_pid()")
    grower.communicate(timeout=60)
    assert int(c.sql("SELECT pg_relation_size('h_v')")) > size_before, "the index grew"
    c.restart()
    total = c.sql("SELECT count(*) FROM h")
    assert int(total) > 20000, total
    found = c.sql("SET enable_seqscan = off; SET enable_bitmapscan = off; SET enable_hashjoin = off; "
                  "SET enable_mergejoin = off; SELECT count(*) FROM h a WHERE EXISTS "
                  "(SELECT 1 FROM h b WHERE b.v = a.v)")
    plan = c.sql("SET enable_seqscan = off; SET enable_bitmapscan = off; EXPLAIN SELECT 1 FROM h WHERE v = 'x'")
    assert "h_v" in plan, plan
    assert found == total, f"{found} of {total} rows found through the hash index"
    assert_rekeyed_on_disk(c, keyring, db, {index: old_records[(1663, index)]}, {index: c.sql("SELECT 'h_v'::regclass::oid")})


def test_rekey_refusals(tde):
    c = tde
    c.sql("CREATE TABLE u (a int) USING tde_heap; CREATE UNLOGGED TABLE ul (a int) USING tde_heap;"
          "CREATE TABLE h (a int) USING heap")
    assert "not a tde_heap table" in c.sql_error("SELECT pg_tde_rotate_relation_key('h')").message
    assert "already a tde_heap" in c.sql_error("SELECT pg_tde_encrypt_relation('u')").message
    assert "permanent" in c.sql_error("SELECT pg_tde_rotate_relation_key('ul')").message
    c.sql("CREATE ROLE nobody LOGIN")
    e = c.sql_error("SET ROLE nobody; SELECT pg_tde_rotate_relation_key('u')")
    assert e.sqlstate == "42501", e.output
    c.sql("SELECT pg_tde_rotate_relation_key('u')")  # an empty table


def test_rotation_in_the_background(tde):
    """wait => false: a background worker does the walk; the call returns at once."""
    c = tde
    setup_table(c, "b", "tde_heap", rows=5000)
    before = digest(c, "b", 5000)
    c.checkpoint()
    nodes = filenodes(c, "b")
    _, old = parse_keymap(keys_path(c).read_bytes())
    c.sql("SELECT pg_tde_rotate_relation_key('b', wait => false)")
    deadline = time.time() + 60
    while time.time() < deadline:
        _, new = parse_keymap(keys_path(c).read_bytes())
        if all(new[k][1] != old[k][1] for k in old if k[1] in nodes) and \
                c.sql("SELECT count(*) FROM pg_tde_rekey_status()") == "0":
            break
        time.sleep(0.3)
    else:
        raise AssertionError("the background re-keying did not finish")
    assert digest(c, "b", 5000) == before
    assert "relation_key_rotated" in c.logfile.read_text(errors="replace")


def test_cancelled_walk_continues(tde):
    """A cancelled walk leaves the table consistent and partly re-keyed; the next
    call continues from the frontier."""
    c = tde
    setup_table(c, "k", "tde_heap", rows=20000)
    before = digest(c, "k", 20000)
    c.checkpoint()
    nodes = filenodes(c, "k")
    _, old_map = parse_keymap(keys_path(c).read_bytes())
    walk = slow_walk(c, "pg_tde_rotate_relation_key('k')")
    # cancelled in the walk of the primary key index, after the heap and the TOAST
    # table are done: those are not rotated again by the next call
    pkey = c.sql("SELECT pg_relation_filenode('k_pkey')")
    deadline = time.time() + 120
    while c.sql(f"SELECT count(*) FROM pg_tde_rekey_progress WHERE relfilenode = {pkey} AND state = 'running'") != "1":
        assert time.time() < deadline and walk.poll() is None, "the walk never reached the index"
        time.sleep(0.02)
    c.sql("SELECT pg_cancel_backend(pid) FROM pg_stat_activity WHERE query LIKE '%pg_tde_rotate_relation_key%' "
          "AND pid <> pg_backend_pid()")
    walk.wait(timeout=60)
    assert b"canceling statement" in walk.stderr.read()
    _, cancelled_map = parse_keymap(keys_path(c).read_bytes())
    recorded = set(c.sql("SELECT string_agg(relfilenode::text, ' ') FROM pg_tde_rekey_status()").split())
    finished = {rel for rel in nodes if str(rel) not in recorded}
    heap = int(c.sql("SELECT pg_relation_filenode('k')"))
    assert heap in finished and str(pkey) in recorded, (finished, recorded)
    for rel in finished:
        assert cancelled_map[(1663, rel)] != old_map[(1663, rel)], f"{nodes[rel]} was rotated before the cancel"
    progress = c.sql("SELECT string_agg(state, ',') FROM pg_tde_rekey_progress")
    assert set(progress.split(",")) == {"interrupted"}, progress
    assert digest(c, "k", 20000) == before
    c.sql("ALTER SYSTEM SET pg_tde.rekey_resume = off")  # continued by the call below, not on restart
    # the offline checksum tool refuses a data directory with an unfinished re-keying
    from test_stock_tools import BIN, _tool
    mode = "--check" if c.sql("SHOW data_checksums") == "on" else "--enable"
    c.stop()
    r = _tool(BIN / "pg_tde_checksums", mode, "-D", c.datadir)
    assert r.returncode != 0 and "being re-keyed online" in r.stderr, r.stderr
    c.start()
    c.sql("INSERT INTO k VALUES (30000, 'between', NULL)")
    c.sql("SELECT pg_tde_rotate_relation_key('k')")
    assert c.sql("SELECT count(*) FROM pg_tde_rekey_progress") == "0"
    _, final_map = parse_keymap(keys_path(c).read_bytes())
    for rel in nodes:
        if rel in finished:
            assert final_map[(1663, rel)] == cancelled_map[(1663, rel)], f"{nodes[rel]} was rotated again"
        else:
            assert final_map[(1663, rel)] != old_map[(1663, rel)], f"{nodes[rel]} was not rotated"
    assert digest(c, "k", 20000) == before
    amcheck(c, "k")
    c.restart()
    assert c.sql("SELECT v FROM k WHERE id = 30000") == "between"


def test_rotation_under_reads_from_disk(clusters, keyring):
    """A table four times larger than shared_buffers, read and written at random by
    pgbench's tpcb-like script (four tables and their indexes: many keys) while it
    is re-keyed: most reads come from disk, through asynchronous reads whose
    completion picks the old or the new key per block.  No read may fail."""
    from cluster import setup_encryption
    c = Cluster("rekey-disk")
    clusters.append(c)
    c.initdb("shared_buffers = 16MB\n")
    c.start()
    setup_encryption(c, keyring)
    pgbench = [str(Path(c.psql_args()[0]).parent / "pgbench"), "-h", str(c.sockdir), "-p", str(c.port), "-U", "postgres"]
    subprocess.run(pgbench + ["-i", "-q", "-s", "5", "postgres"], check=True, capture_output=True,
                   env={"PGOPTIONS": "-c default_table_access_method=tde_heap", "PATH": "/usr/bin:/bin"})
    assert c.sql("SELECT pg_tde_is_encrypted('pgbench_accounts')") == "t"
    for _ in range(2):
        load = subprocess.Popen(pgbench + ["-c", "4", "-j", "2", "-T", "8", "-n", "postgres"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        c.sql("SELECT pg_tde_rotate_relation_key('pgbench_accounts')")
        out, err = load.communicate(timeout=120)
        assert load.returncode == 0, err[-2000:]
    assert c.sql("SELECT count(*) FROM pgbench_accounts") == "500000"
    amcheck(c, "pgbench_accounts")


def test_online_encryption_survives_kill9(tde):
    """Online encryption killed (the whole server, kill -9) at a random point of
    the walk, with a writer running: after the restart the table reads whole, the
    next call finishes it, and no marker is left in plaintext on disk."""
    c = tde
    setup_table(c, "e", "heap")
    before = digest(c, "e")
    writer = Writer(c, "e")
    writer.start()
    killed_at = kill9_mid_walk(c, slow_walk(c, "pg_tde_encrypt_relation('e')"))
    assert c.sql("SELECT count(*) FROM e WHERE id <= 20000") == "20000", "readable mid-encryption"
    # the server resumes the walk by itself (pg_tde.rekey_resume), and switches the
    # table to tde_heap at its end
    deadline = time.time() + 120
    while c.sql("SELECT count(*) FROM pg_tde_rekey_status()") != "0" or c.sql("SELECT pg_tde_is_encrypted('e')") != "t":
        assert time.time() < deadline, f"the walk killed at {killed_at} was not resumed"
        time.sleep(0.3)
    log = c.logfile.read_text(errors="replace")
    assert "resuming the online encrypt of relation" in log
    time.sleep(1)
    writer.stop.set()
    writer.join(timeout=30)
    assert c.sql("SELECT count(*) FROM pg_tde_rekey_status()") == "0"
    assert c.sql("SELECT pg_tde_is_encrypted('e')") == "t"
    got = {int(x) for x in (c.sql("SELECT string_agg(id::text, ' ') FROM e WHERE id >= 100000") or "").split()}
    assert set(writer.committed) <= got
    assert digest(c, "e").split("/")[0] == before.split("/")[0]
    amcheck(c, "e")
    c.checkpoint()
    for rel in files(c, "e"):
        name = c.sql(f"SELECT {rel}::regclass")
        assert not c.files_contain(name, MARKER.encode()), f"plaintext marker left in {name}"
