"""PostgreSQL's own offline tools on an encrypted cluster (issue 18):
pg_checksums refuses (the core patch honours pg_tde's marker file) and
pg_tde_checksums enables, checks and disables checksums with nothing lost."""
from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from cluster import BIN, Cluster, as_user, setup_encryption

MARKER = "checksummed-secret"


def _tool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(as_user([str(a) for a in args]), capture_output=True, text=True)


def _controldata_checksums(c: Cluster) -> str:
    out = _tool(BIN / "pg_controldata", c.datadir).stdout
    return next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Data page checksum version"))


@pytest.fixture
def no_checksums(clusters, keyring):
    """A stopped cluster initialised without checksums, with encrypted and
    plaintext tables (heap, TOAST, an index, FSM and VM forks); `enc_files`
    lists the files of the encrypted table."""
    c = Cluster("ck-off")
    clusters.append(c)
    c.initdb(checksums=False)
    c.start()
    setup_encryption(c, keyring)
    c.sql(f"""
        CREATE TABLE enc (id int PRIMARY KEY, v text, big text) USING tde_heap;
        INSERT INTO enc SELECT g, '{MARKER}-' || g, repeat(md5(g::text), 200) FROM generate_series(1, 3000) g;
        CREATE TABLE plain (id int PRIMARY KEY, v text) USING heap;
        INSERT INTO plain SELECT g, 'plain-' || g FROM generate_series(1, 3000) g;
        DELETE FROM enc WHERE id % 10 = 0;
        VACUUM enc; VACUUM plain;
    """)
    c.enc_files = c.relation_files("enc")
    c.stop()
    return c


def _rows(c: Cluster) -> tuple[str, str]:
    return (c.sql(f"SELECT count(*), sum(length(big)) FROM enc WHERE v LIKE '{MARKER}-%'"),
            c.sql("SELECT count(*) FROM plain"))


def test_stock_pg_checksums_refuses_an_encrypted_cluster(no_checksums):
    c = no_checksums
    assert (c.datadir / "pg_relfile_transform").exists()
    before = {p: p.read_bytes() for p in c.enc_files}
    r = _tool(BIN / "pg_checksums", "--enable", "-D", c.datadir)
    assert r.returncode != 0, r.stdout
    assert "transformed by \"pg_tde\"" in r.stderr and "pg_tde_checksums" in r.stderr, r.stderr
    assert {p: p.read_bytes() for p in before} == before, "pg_checksums touched encrypted files"
    assert _controldata_checksums(c) == "0"


def test_stock_pg_checksums_without_the_marker_destroys_encrypted_pages(no_checksums):
    """What the marker prevents, shown: stock pg_checksums --enable writes a
    checksum of the ciphertext into the ciphertext."""
    c = no_checksums
    (c.datadir / "pg_relfile_transform").unlink()
    r = _tool(BIN / "pg_checksums", "--enable", "-D", c.datadir)
    assert r.returncode == 0, r.stderr
    c.start()
    e = c.sql_error("SELECT count(*) FROM enc")
    assert "invalid page" in e.message or "verification failed" in e.message, e.output
    # the server wrote the marker again at start
    assert (c.datadir / "pg_relfile_transform").exists()


def test_pg_tde_checksums_enables_checks_and_disables(no_checksums):
    c = no_checksums
    files = c.enc_files
    r = _tool(BIN / "pg_tde_checksums", "--enable", "-D", c.datadir)
    assert r.returncode == 0, r.stderr
    assert "Checksums enabled in cluster" in r.stdout, r.stdout
    assert _controldata_checksums(c) == "1"
    # still encrypted on disk
    assert not any(MARKER.encode() in p.read_bytes() for p in files)
    c.start()
    assert c.sql("SHOW data_checksums") == "on"
    assert _rows(c) == ("2700|" + str(2700 * 6400), "3000")
    # the server verifies every page it reads: force reads from disk
    c.restart()
    assert c.sql("SELECT count(*) FROM enc WHERE id > 0") == "2700"
    c.sql("UPDATE enc SET v = v || '+' WHERE id % 7 = 0; CHECKPOINT")
    c.stop()

    r = _tool(BIN / "pg_tde_checksums", "--check", "-D", c.datadir)
    assert r.returncode == 0, r.stderr
    assert "Bad checksums:  0" in r.stdout, r.stdout

    # a flipped bit in an encrypted page is found
    heap = next(p for p in files if p.name.isdigit())
    data = bytearray(heap.read_bytes())
    data[8192 + 4000] ^= 0x01
    heap.write_bytes(bytes(data))
    r = _tool(BIN / "pg_tde_checksums", "--check", "-D", c.datadir)
    assert r.returncode != 0
    assert "Bad checksums:  1" in r.stdout, r.stdout + r.stderr
    assert "block 1" in r.stderr, r.stderr
    data[8192 + 4000] ^= 0x01
    heap.write_bytes(bytes(data))

    r = _tool(BIN / "pg_tde_checksums", "--disable", "-D", c.datadir)
    assert r.returncode == 0, r.stderr
    assert _controldata_checksums(c) == "0"
    c.start()
    assert c.sql("SHOW data_checksums") == "off"
    assert _rows(c) == ("2700|" + str(2700 * 6400), "3000")


def _checksummed_cluster_with_enc(clusters, keyring, name: str, rows: int) -> Cluster:
    """A running cluster with data checksums and an encrypted table `enc`
    (id, v) of `rows` rows, vacuumed and checkpointed."""
    c = Cluster(name)
    clusters.append(c)
    c.initdb(checksums=True)
    c.start()
    setup_encryption(c, keyring)
    c.sql("CREATE TABLE enc (id int PRIMARY KEY, v text) USING tde_heap;"
          f"INSERT INTO enc SELECT g, md5(g::text) FROM generate_series(1, {rows}) g; VACUUM enc; CHECKPOINT")
    return c


def test_pg_tde_checksums_agrees_with_the_server(clusters, keyring):
    """On a cluster whose checksums the server wrote, every page checks out:
    the tool computes PostgreSQL's checksum, on the plaintext."""
    c = _checksummed_cluster_with_enc(clusters, keyring, "ck-on", 20000)
    c.stop()
    # stock pg_checksums --check would call every encrypted page corrupt: refused
    r = _tool(BIN / "pg_checksums", "--check", "-D", c.datadir)
    assert r.returncode != 0 and "transformed by \"pg_tde\"" in r.stderr, r.stdout + r.stderr
    r = _tool(BIN / "pg_tde_checksums", "--check", "-v", "-D", c.datadir)
    assert r.returncode == 0, r.stderr
    assert "Bad checksums:  0" in r.stdout, r.stdout
    assert "(encrypted)" in r.stdout and "(plaintext)" in r.stdout
    # and it refuses a running cluster, as pg_checksums does
    c.start()
    r = _tool(BIN / "pg_tde_checksums", "--check", "-D", c.datadir)
    assert r.returncode != 0 and "cluster must be shut down" in r.stderr, r.stderr


def test_amcheck_verifies_encrypted_tables(tde):
    """verify_heapam (the core patch lets it check tables of heap-based AMs)
    and bt_index_check with heapallindexed on a tde_heap table, its TOAST
    table and its index."""
    c = tde
    c.sql("CREATE EXTENSION amcheck;"
          "CREATE TABLE enc (id int PRIMARY KEY, v text, big text) USING tde_heap;"
          "INSERT INTO enc SELECT g, md5(g::text), repeat(md5(g::text), 400) FROM generate_series(1, 2000) g;"
          "UPDATE enc SET v = v || '!' WHERE id % 3 = 0; DELETE FROM enc WHERE id % 5 = 0; VACUUM enc; CHECKPOINT")
    assert c.sql("SELECT pg_tde_is_encrypted('enc')") == "t"
    assert c.sql("SELECT count(*) FROM verify_heapam('enc', check_toast => true)") == "0"
    toast = c.sql("SELECT reltoastrelid::regclass FROM pg_class WHERE relname = 'enc'")
    assert c.sql(f"SELECT count(*) FROM verify_heapam('{toast}')") == "0"
    c.sql("SELECT bt_index_check('enc_pkey', heapallindexed => true)")
    c.sql("SELECT bt_index_parent_check('enc_pkey', heapallindexed => true)")
    # the queries docs/usage.md gives instead of pg_amcheck, which skips tde_heap
    usage = (Path(__file__).parents[2] / "docs" / "usage.md").read_text()
    block = usage[usage.index("LATERAL verify_heapam") - 200:]
    heap_q, index_q = re.search(r"```sql\n(SELECT [^;]*;)\n\n(SELECT [^;]*;)\n```", block).groups()
    assert c.sql(f"SELECT count(*) FROM ({heap_q.rstrip(';')}) r") == "0"
    assert "enc_pkey" in c.sql(index_q)
    # it reports what it finds: a relfrozenxid newer than the table's tuples
    # makes every tuple's xmin precede the freeze threshold (a logical
    # corruption amcheck detects without any change on disk)
    c.sql("CREATE TABLE bad (v text) USING tde_heap; INSERT INTO bad VALUES ('x'), ('y')")
    c.sql("SET allow_system_table_mods = on; "
          "UPDATE pg_class SET relfrozenxid = txid_current()::text::xid WHERE relname = 'bad'")
    msg = c.sql("SELECT string_agg(msg, '; ') FROM verify_heapam('bad')")
    assert "precedes relation freeze threshold" in msg, msg
    # stock pg_amcheck skips tde_heap tables (and their indexes); pg_tde_amcheck does not
    conn = ["-h", c.sockdir, "-p", str(c.port), "-U", "postgres", "-d", "postgres", "--heapallindexed", "-v"]
    r = _tool(BIN / "pg_amcheck", *conn)
    assert r.returncode == 0 and "public.bad" not in r.stdout + r.stderr and "enc_pkey" not in r.stderr, r.stderr
    r = _tool(BIN / "pg_tde_amcheck", *conn)
    assert r.returncode == 2, r.stdout + r.stderr
    assert 'heap table "postgres.public.bad"' in r.stdout and "precedes relation freeze threshold" in r.stdout, r.stdout
    # enc and bad with their TOAST tables; enc's primary key and the TOAST indexes
    assert '"postgres.enc_pkey"' in r.stderr and "checking 4 tde_heap tables" in r.stderr, r.stderr


def _standby_via_pg_tde_basebackup(p: Cluster, name: str) -> Cluster:
    s = Cluster(name)
    r = _tool(BIN / "pg_tde_basebackup", "-D", s.datadir, "-R", "-c", "fast",
              "-h", p.sockdir, "-p", str(p.port), "-U", "postgres")
    assert r.returncode == 0, r.stderr
    s.configure("")  # its own port and socket directory
    s.start()
    return s


def test_failover_with_encrypted_wal_rewinds_the_old_primary(clusters, keyring):
    """Failover with pg_tde.wal_encrypt = on: the old primary, which wrote
    after the standby was promoted, is rewound and follows the new primary.
    Stock pg_rewind cannot read the old primary's encrypted WAL;
    pg_tde_rewind decrypts it outside the data directory for it."""
    import glob
    import os
    from test_replication import digest, wait_for_replay
    from test_wal import new_cluster
    from test_data_safety import fill_enc
    p = new_cluster(clusters, "rw-old-primary", keyring, wal_encrypt=True,
                    extra="wal_log_hints = on\nwal_keep_size = '1GB'\n")
    fill_enc(p, "t", "MARKER_RW_BEFORE")
    s = _standby_via_pg_tde_basebackup(p, "rw-new-primary")
    clusters.append(s)
    # The old primary restarts after the standby was made: the WAL it writes
    # from now on is under a key the standby's WAL key file does not have.
    p.restart()
    fill_enc(p, "t", "MARKER_RW_SHARED", n=200)
    p.sql("CHECKPOINT")
    wait_for_replay(p, s)
    # The segment in which the timelines part is full on the old primary
    # but only a .partial on the new one: pg_rewind keeps the old primary's
    # own copy, which it needs for recovery.
    p.sql("SELECT pg_switch_wal()")
    fill_enc(p, "t", "MARKER_RW_SHARED2", n=100)
    wait_for_replay(p, s)
    assert s.sql("SELECT pg_promote(true, 120)") == "t"
    # The new primary keeps its WAL from the promotion on (a slot for the old
    # primary) and nothing older: the old primary's segment that holds the
    # last common checkpoint exists only in its own pg_wal, where pg_rewind
    # keeps it for recovery.
    s.sql("ALTER SYSTEM SET wal_keep_size = 0; SELECT pg_reload_conf();"
          "SELECT pg_create_physical_replication_slot('old_primary', true)")
    # both write: the old primary's writes are to be thrown away
    fill_enc(p, "t", "MARKER_RW_LOST", n=2000)
    p.sql("CREATE TABLE lost (v text) USING tde_heap; INSERT INTO lost SELECT 'MARKER_RW_LOST' FROM generate_series(1, 100);"
          "CHECKPOINT")
    fill_enc(s, "t", "MARKER_RW_NEW", n=500)
    for _ in range(3):
        s.sql("SELECT pg_switch_wal(); CHECKPOINT")
    p.stop()
    source = f"--source-server=host={s.sockdir} port={s.port} user=postgres dbname=postgres"

    # stock pg_rewind: the target's WAL is encrypted
    r = _tool(BIN / "pg_rewind", "-D", p.datadir, source)
    assert r.returncode != 0, r.stdout + r.stderr
    assert "could not read" in r.stderr or "invalid" in r.stderr, r.stderr

    r = _tool(BIN / "pg_tde_rewind", "-D", p.datadir, source, "-R")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "decrypted" in r.stderr and "Done!" in r.stdout + r.stderr, r.stdout + r.stderr
    assert "kept WAL segments of the target under new WAL keys" in r.stderr, r.stderr
    assert not glob.glob("/dev/shm/pg_tde-rewind-*"), "the decrypted copies were not removed"
    p.configure("")  # pg_rewind copied the new primary's configuration
    p.start()
    assert p.sql("SELECT pg_is_in_recovery()") == "t"
    fill_enc(s, "t", "MARKER_RW_AFTER", n=100)
    wait_for_replay(s, p)
    assert digest(p, "t") == digest(s, "t")
    assert p.sql("SELECT count(*) FROM t WHERE v LIKE 'MARKER_RW_LOST%'") == "0"
    assert p.sql("SELECT count(*) FROM t WHERE v LIKE 'MARKER_RW_NEW%'") == "500"
    assert p.sql("SELECT count(*) FROM t WHERE v LIKE 'MARKER_RW_SHARED%'") == "300"
    assert p.sql("SELECT to_regclass('lost') IS NULL") == "t"
    # nothing in plaintext on the rewound server's disk
    for root, _, names in os.walk(p.datadir):
        for n in names:
            path = os.path.join(root, n)
            if os.path.isfile(path) and (n.isdigit() or len(n) == 24):
                with open(path, "rb") as f:
                    assert b"MARKER_RW_" not in f.read(), path


@pytest.mark.parametrize("mode", ["--copy", "--link", "--swap"])
def test_pg_tde_upgrade_keeps_encrypted_tables(clusters, keyring, mode):
    """pg_upgrade 18 -> 18 of a cluster with encrypted tables (two databases,
    TOAST, indexes, an owned sequence) and encrypted WAL, through
    pg_tde_upgrade: every row comes back, still encrypted on disk."""
    from test_wal import new_cluster
    from test_data_safety import fill_enc
    old = new_cluster(clusters, "upg-old", keyring, wal_encrypt=True)
    old.sql("CREATE DATABASE other")
    setup_encryption(old, keyring, db="other", key="other-key")
    for db in ("postgres", "other"):
        fill_enc(old, "t", "MARKER_UPG_", n=3000, db=db)
        old.sql("CREATE TABLE big (id serial PRIMARY KEY, doc text) USING tde_heap;"
                "ALTER TABLE big ALTER doc SET STORAGE EXTERNAL;"
                "INSERT INTO big (doc) SELECT 'MARKER_UPG_TOAST' || repeat(md5(g::text), 300) FROM generate_series(1, 50) g",
                db=db)
    old.sql("CREATE TABLE plain (v text); INSERT INTO plain VALUES ('plaintext stays')")
    want = {db: old.sql("SELECT count(*), md5(string_agg(v, ',' ORDER BY id)) FROM t", db=db) for db in ("postgres", "other")}
    want_big = old.sql("SELECT md5(string_agg(doc, ',' ORDER BY id)) FROM big", db="other")
    old.stop()

    new = Cluster("upg-new")
    clusters.append(new)
    new.initdb("pg_tde.wal_encrypt = on\n")
    r = subprocess.run(
        as_user([str(BIN / "pg_tde_upgrade"), "-b", str(BIN), "-B", str(BIN), "-d", str(old.datadir),
                 "-D", str(new.datadir), "-s", str(new.sockdir), "-p", str(old.port), "-P", str(new.port), mode]),
        capture_output=True, text=True, cwd=str(new.sockdir))
    if r.returncode != 0:
        import glob
        logs = "".join(f"--- {f}\n" + open(f).read()[-2000:]
                       for f in glob.glob(f"{new.datadir}/pg_upgrade_output.d/*/log/*.log"))
        raise AssertionError(r.stderr[-2000:] + logs)
    assert "the new cluster uses the old cluster's relation keys" in r.stderr, r.stderr
    new.start()
    for db in ("postgres", "other"):
        assert new.sql("SELECT count(*), md5(string_agg(v, ',' ORDER BY id)) FROM t", db=db) == want[db]
        assert new.sql("SELECT pg_tde_is_encrypted('t'), pg_tde_is_encrypted('big_id_seq')", db=db) == "t|t"
    assert new.sql("SELECT md5(string_agg(doc, ',' ORDER BY id)) FROM big", db="other") == want_big
    assert new.sql("SELECT v FROM plain") == "plaintext stays"
    # writable, and readable again after a restart
    new.sql("INSERT INTO big (doc) VALUES ('MARKER_UPG_AFTER'); CHECKPOINT", db="other")
    new.restart()
    assert new.sql("SELECT count(*) FROM big WHERE doc LIKE 'MARKER_UPG_%'", db="other") == "51"
    for db in ("postgres", "other"):
        for rel in ("t", "big"):
            assert not new.files_contain(rel, b"MARKER_UPG_", db=db), f"{db}.{rel} is in plaintext on disk"


def test_stock_pg_upgrade_cannot_restore_encrypted_tables(clusters, keyring):
    """Why pg_tde_upgrade exists: stock pg_upgrade restores the schema into a
    new cluster that has no pg_tde key files, so the first tde_heap table
    fails (before any old file is touched)."""
    from test_data_safety import fill_enc
    old = Cluster("upg-stock-old")
    clusters.append(old)
    old.initdb()
    old.start()
    setup_encryption(old, keyring)
    fill_enc(old, "t", "MARKER_UPG_STOCK", n=10)
    old.stop()
    new = Cluster("upg-stock-new")
    clusters.append(new)
    new.initdb()
    r = subprocess.run(
        as_user([str(BIN / "pg_upgrade"), "-b", str(BIN), "-B", str(BIN), "-d", str(old.datadir),
                 "-D", str(new.datadir), "-s", str(new.sockdir), "-p", str(old.port), "-P", str(new.port)]),
        capture_output=True, text=True, cwd=str(new.sockdir))
    assert r.returncode != 0
    import glob
    logs = "".join(open(f).read() for f in glob.glob(f"{new.datadir}/pg_upgrade_output.d/*/log/*.log"))
    assert "principal key not configured" in logs, logs[-2000:]
    old.start()
    assert old.sql("SELECT count(*) FROM t") == "10"


def test_pg_resetwal_on_a_cluster_with_encrypted_wal(clusters, keyring):
    """pg_resetwal writes a new, plaintext WAL segment with a checkpoint
    record; pg_tde reads it as plaintext and encrypts what follows."""
    from test_wal import new_cluster
    from test_data_safety import fill_enc
    c = new_cluster(clusters, "resetwal", keyring, wal_encrypt=True)
    fill_enc(c, "t", "MARKER_RESETWAL", n=1000)
    c.stop()
    r = _tool(BIN / "pg_resetwal", "-D", c.datadir)
    assert r.returncode == 0, r.stderr
    c.start()
    assert c.sql("SELECT count(*) FROM t") == "1000"
    fill_enc(c, "t", "MARKER_RESETWAL_AFTER", n=100)
    c.sql("SELECT pg_switch_wal(); CHECKPOINT")
    c.restart()
    assert c.sql("SELECT count(*) FROM t") == "1100"
    for p in (c.datadir / "pg_wal").iterdir():
        if p.is_file() and len(p.name) == 24:
            assert b"MARKER_RESETWAL_AFTER" not in p.read_bytes(), p


def test_base_backup_checksums_of_encrypted_pages_are_checked_offline(clusters, keyring):
    """The server's checksum verification during a base backup reads
    encrypted pages as they are on disk and skips them (their LSNs look
    newer than the backup): a corrupt encrypted page goes unreported.
    pg_tde_basebackup says so, and pg_tde_checksums finds the page in the
    restored backup."""
    c = _checksummed_cluster_with_enc(clusters, keyring, "bb-ck", 5000)
    heap = next(p for p in c.relation_files("enc") if p.name.isdigit())
    c.stop()
    data = bytearray(heap.read_bytes())
    data[2 * 8192 + 5000] ^= 0x40
    heap.write_bytes(bytes(data))
    c.start()
    b = Cluster("bb-ck-backup")
    clusters.append(b)
    r = _tool(BIN / "pg_tde_basebackup", "-D", b.datadir, "-c", "fast", "-h", c.sockdir, "-p", str(c.port), "-U", "postgres")
    assert r.returncode == 0, r.stderr
    # the server did not notice the corrupt page
    assert "checksum verification failed" not in r.stderr and "checksum error" not in r.stderr, r.stderr
    assert "cannot read encrypted ones" in r.stderr and "pg_tde_checksums --check" in r.stderr, r.stderr
    b.configure("")
    b.start()
    b.stop()
    r = _tool(BIN / "pg_tde_checksums", "--check", "-D", b.datadir)
    assert r.returncode != 0
    assert "Bad checksums:  1" in r.stdout and "block 2" in r.stderr, r.stdout + r.stderr


def test_pg_tde_checksums_writes_nothing_into_pages_it_cannot_decrypt(no_checksums):
    """A data directory whose key maps are missing (copied without
    pg_tde/, say): the encrypted files look like plaintext ones to the tool,
    but their pages have no valid header, so --enable stops before writing."""
    c = no_checksums
    before = {p: p.read_bytes() for p in c.enc_files}
    for m in (c.datadir / "pg_tde").glob("*_keys"):
        m.rename(m.with_suffix(".away"))
    r = _tool(BIN / "pg_tde_checksums", "--enable", "-D", c.datadir)
    assert r.returncode != 0
    assert "no valid page header" in r.stderr and "nothing was changed" in r.stderr, r.stderr
    assert {p: p.read_bytes() for p in before} == before
    assert _controldata_checksums(c) == "0"
