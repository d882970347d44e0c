"""A streaming standby of an encrypted primary (SPEC §3, §7: a standby reaches
the same decisions, and the same keys, from the WAL alone)."""

import subprocess
import time

import pytest

from cluster import BIN, Cluster, as_user

REPLAY_TIMEOUT = 60


def digest(c, table: str) -> str:
    return c.sql(f"SELECT count(*) || '/' || md5(string_agg(id || ':' || v, ',' ORDER BY id)) FROM {table}")


def dboid(c, db: str = "postgres") -> str:
    return c.sql("SELECT oid FROM pg_database WHERE datname = current_database()", db)


def wait_for_replay(primary: Cluster, standby: Cluster) -> None:
    lsn = primary.sql("SELECT pg_current_wal_lsn()")
    deadline = time.time() + REPLAY_TIMEOUT
    while time.time() < deadline:
        if standby.sql(f"SELECT pg_last_wal_replay_lsn() >= '{lsn}'::pg_lsn") == "t":
            return
        time.sleep(0.2)
    raise AssertionError(f"standby did not replay up to {lsn} within {REPLAY_TIMEOUT} s:\n{standby.log_tail()}")


def make_standby(primary: Cluster) -> Cluster:
    standby = Cluster("standby")
    subprocess.run(
        as_user(
            [
                str(BIN / "pg_basebackup"),
                "-D", str(standby.datadir),
                "-R", "-X", "stream", "-c", "fast",
                "-h", str(primary.sockdir), "-p", str(primary.port), "-U", "postgres",
            ]
        ),
        check=True,
        stdout=subprocess.DEVNULL,
    )
    # The backup carries the primary's postgresql.conf: the appended lines give
    # the standby its own port and socket directory.
    standby.configure("")
    standby.start()
    assert standby.sql("SELECT pg_is_in_recovery()") == "t"
    return standby


M_OLD = "MARKER_REPL_BEFORE_BACKUP_a1"
M_NEW = "MARKER_REPL_AFTER_BACKUP_b2"


def fill(c: Cluster, table: str, marker: str, am: str = "tde_heap") -> None:
    big = f"'{marker}' || (SELECT string_agg(md5((g * 3 + x)::text), '') FROM generate_series(1, 300) g)"
    c.sql(
        f"CREATE TABLE {table} (id int, v text) USING {am};"
        f"ALTER TABLE {table} ALTER v SET STORAGE EXTERNAL;"
        f"INSERT INTO {table} SELECT x, '{marker}' || x FROM generate_series(1, 1000) x;"
        f"INSERT INTO {table} SELECT x, {big} FROM generate_series(1001, 1005) x;"
        f"CREATE INDEX {table}_idx ON {table} (left(v, 200))"
    )


@pytest.fixture
def pair(tde):
    fill(tde, "before_t", M_OLD)
    standby = make_standby(tde)
    yield tde, standby
    standby.destroy()


def test_standby_reads_tables_from_the_backup(pair):
    primary, standby = pair
    assert digest(standby, "before_t") == digest(primary, "before_t")
    assert standby.sql(f"SET enable_seqscan = off; SET enable_bitmapscan = off; SELECT id FROM before_t WHERE left(v, 200) = '{M_OLD}77'") == "77"
    assert standby.sql("SELECT pg_tde_is_encrypted('before_t'), pg_tde_is_encrypted('before_t_idx')") == "t|t"


def test_tables_created_after_the_backup(pair):
    primary, standby = pair
    fill(primary, "after_t", M_NEW)
    # new relation files for an existing table and index
    primary.sql("VACUUM FULL before_t")
    primary.sql(f"CREATE TABLE trunc_t (id int, v text) USING tde_heap; TRUNCATE trunc_t; INSERT INTO trunc_t SELECT g, '{M_NEW}' || g FROM generate_series(1, 100) g")
    wait_for_replay(primary, standby)
    for t in ("after_t", "before_t", "trunc_t"):
        assert digest(standby, t) == digest(primary, t), t
    assert standby.sql(f"SET enable_seqscan = off; SET enable_bitmapscan = off; SELECT id FROM after_t WHERE left(v, 200) = '{M_NEW}500'") == "500"
    assert standby.sql("SELECT count(*) FROM after_t WHERE length(v) > 9000") == "5"
    for rel in ("after_t", "after_t_idx", "before_t", "trunc_t"):
        assert standby.sql(f"SELECT pg_tde_is_encrypted('{rel}')") == "t", rel


def test_standby_files_are_ciphertext(pair):
    primary, standby = pair
    fill(primary, "after_t", M_NEW)
    fill(primary, "after_plain", M_NEW, am="heap")
    primary.checkpoint()
    wait_for_replay(primary, standby)
    standby.checkpoint()  # a restartpoint: the standby writes its buffers out
    toast = standby.sql("SELECT reltoastrelid::regclass FROM pg_class WHERE oid = 'after_t'::regclass")
    plain_toast = standby.sql("SELECT reltoastrelid::regclass FROM pg_class WHERE oid = 'after_plain'::regclass")
    # control: the standby itself wrote the plain table (created after the backup)
    assert standby.files_contain("after_plain", M_NEW.encode())
    assert standby.files_contain(plain_toast, M_NEW.encode())
    for rel in ("after_t", "after_t_idx", toast):
        assert standby.sql(f"SELECT pg_tde_is_encrypted('{rel}')") == "t", rel
        assert not standby.files_contain(rel, M_NEW.encode()), f"marker in the standby's files of {rel}"
    for rel in ("before_t", "before_t_idx"):
        assert not standby.files_contain(rel, M_OLD.encode()), rel


def test_standby_key_map_is_identical(pair):
    primary, standby = pair
    fill(primary, "after_t", M_NEW)
    primary.sql("VACUUM FULL before_t; CREATE TABLE dropped_t (v text) USING tde_heap; DROP TABLE dropped_t")
    primary.checkpoint()
    wait_for_replay(primary, standby)
    standby.checkpoint()
    oid = dboid(primary)
    assert dboid(standby) == oid
    p = (primary.datadir / "pg_tde" / f"{oid}_keys").read_bytes()
    s = (standby.datadir / "pg_tde" / f"{oid}_keys").read_bytes()
    assert len(p) >= 512 + 256 * 4
    assert p == s, "the standby's key map differs from the primary's"
    assert (primary.datadir / "pg_tde" / "providers.json").read_bytes() == (standby.datadir / "pg_tde" / "providers.json").read_bytes()


def test_promote_then_write(pair):
    primary, standby = pair
    fill(primary, "after_t", M_NEW)
    wait_for_replay(primary, standby)
    expected = digest(primary, "after_t")
    primary.stop()
    assert standby.sql("SELECT pg_promote(true, 60)") == "t"
    assert standby.sql("SELECT pg_is_in_recovery()") == "f"
    assert digest(standby, "after_t") == expected

    m = "MARKER_PROMOTED_c3"
    standby.sql(f"INSERT INTO after_t SELECT x, '{m}' || x FROM generate_series(2001, 2100) x")
    standby.sql(f"UPDATE before_t SET v = '{m}' || id WHERE id <= 10")
    fill(standby, "promoted_t", m)
    assert standby.sql("SELECT count(*) FROM after_t") == "1105"
    assert standby.sql(f"SELECT count(*) FROM before_t WHERE v LIKE '{m}%'") == "10"
    assert standby.sql(f"SET enable_seqscan = off; SET enable_bitmapscan = off; SELECT id FROM promoted_t WHERE left(v, 200) = '{m}9'") == "9"
    standby.checkpoint()
    for rel in ("after_t", "after_t_idx", "before_t", "promoted_t", "promoted_t_idx"):
        assert standby.sql(f"SELECT pg_tde_is_encrypted('{rel}')") == "t", rel
        assert not standby.files_contain(rel, m.encode()), rel
    # and it all survives a restart of the promoted server
    before = digest(standby, "promoted_t")
    standby.restart()
    assert digest(standby, "promoted_t") == before
