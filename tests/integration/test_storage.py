"""Every kind of object of SPEC §4 is ciphertext on disk when it belongs to a
tde_heap table, and plaintext for a heap control table.  Each test writes a
distinctive marker, forces it to disk with CHECKPOINT, and reads every file
of the relation."""

import pytest

from cluster import setup_encryption


def pair(tde, setup_sql: str, rel_sql: str, marker: str, db: str = "postgres"):
    """Run setup_sql for an encrypted ({am}=tde_heap) and a plain ({am}=heap)
    variant ({s} = suffix), then return (encrypted_rel, plain_rel) after a checkpoint."""
    for am, s in (("tde_heap", "enc"), ("heap", "plain")):
        tde.sql(setup_sql.format(am=am, s=s, m=marker), db)
    tde.checkpoint(db)
    return rel_sql.format(s="enc"), rel_sql.format(s="plain")


def assert_encrypted(tde, enc: str, plain: str, marker: str, db: str = "postgres"):
    m = marker.encode()
    assert tde.files_contain(plain, m, db), f"control: marker must be visible in plain {plain}"
    assert not tde.files_contain(enc, m, db), f"marker found in the files of {enc}"
    assert tde.sql(f"SELECT pg_tde_is_encrypted('{enc}')", db) == "t"
    assert tde.sql(f"SELECT pg_tde_is_encrypted('{plain}')", db) == "f"


def toast_of(tde, table: str) -> str:
    return tde.sql(f"SELECT reltoastrelid::regclass FROM pg_class WHERE oid = '{table}'::regclass")


def test_table(tde):
    m = "MARKER_TABLE_1a2b"
    enc, plain = pair(tde, "CREATE TABLE t_{s} (v text) USING {am}; INSERT INTO t_{s} SELECT '{m}' || g FROM generate_series(1, 100) g", "t_{s}", m)
    assert_encrypted(tde, enc, plain, m)
    assert tde.sql("SELECT count(*) FROM t_enc WHERE v LIKE 'MARKER_TABLE%'") == "100"


def test_toast(tde):
    m = "MARKER_TOAST_77"
    # An incompressible value larger than the TOAST threshold.
    value = f"'{m}' || (SELECT string_agg(md5(g::text), '') FROM generate_series(1, 400) g)"
    for am, s in (("tde_heap", "enc"), ("heap", "plain")):
        tde.sql(f"CREATE TABLE tt_{s} (v text) USING {am}; ALTER TABLE tt_{s} ALTER v SET STORAGE EXTERNAL; INSERT INTO tt_{s} SELECT {value}")
    tde.checkpoint()
    enc_toast, plain_toast = toast_of(tde, "tt_enc"), toast_of(tde, "tt_plain")
    assert_encrypted(tde, enc_toast, plain_toast, m)
    enc_idx = tde.sql(f"SELECT indexrelid::regclass FROM pg_index WHERE indrelid = '{enc_toast}'::regclass")
    assert tde.sql(f"SELECT pg_tde_is_encrypted('{enc_idx}')") == "t"
    assert tde.sql("SELECT left(v, 15) FROM tt_enc") == m


@pytest.mark.parametrize("method", ["btree", "hash", "gin", "brin"])
def test_indexes(tde, method):
    m = "MARKERIDX" + method.upper()
    opclass = {"gin": "(to_tsvector('simple', v))", "brin": "(v)", "btree": "(v)", "hash": "(v)"}[method]
    enc, plain = pair(
        tde,
        "CREATE TABLE i_{s} (v text) USING {am}; INSERT INTO i_{s} SELECT '{m}' || g FROM generate_series(1, 200) g;"
        f"CREATE INDEX i_{{s}}_idx ON i_{{s}} USING {method} {opclass}",
        "i_{s}_idx",
        m.lower() if method == "gin" else m,
    )
    marker = m.lower() if method == "gin" else m
    if method == "hash":
        # hash indexes store hash codes, not values: check the table status only
        assert tde.sql(f"SELECT pg_tde_is_encrypted('{enc}')") == "t"
        assert tde.sql(f"SELECT pg_tde_is_encrypted('{plain}')") == "f"
    elif method == "brin":
        assert_encrypted(tde, enc, plain, marker)
    else:
        assert_encrypted(tde, enc, plain, marker)


def test_owned_sequences(tde):
    tde.sql("CREATE TABLE s_enc (id serial, g int GENERATED ALWAYS AS IDENTITY, v text) USING tde_heap")
    tde.sql("CREATE TABLE s_plain (id serial, v text) USING heap")
    tde.sql("INSERT INTO s_enc (v) VALUES ('a'), ('b')")
    assert tde.sql("SELECT pg_tde_is_encrypted('s_enc_id_seq')") == "t"
    assert tde.sql("SELECT pg_tde_is_encrypted('s_enc_g_seq')") == "t"
    assert tde.sql("SELECT pg_tde_is_encrypted('s_plain_id_seq')") == "f"
    assert tde.sql("SELECT max(id) FROM s_enc") == "2"
    tde.sql("CREATE SEQUENCE loose_seq; CREATE TABLE owner_t (id int) USING tde_heap; ALTER SEQUENCE loose_seq OWNED BY owner_t.id")
    assert tde.sql("SELECT pg_tde_is_encrypted('loose_seq')") == "t"
    assert tde.sql("SELECT nextval('loose_seq')") == "1"


def test_unlogged_table(tde):
    m = "MARKER_UNLOGGED"
    enc, plain = pair(tde, "CREATE UNLOGGED TABLE u_{s} (v text) USING {am}; INSERT INTO u_{s} SELECT '{m}' || g FROM generate_series(1, 50) g", "u_{s}", m)
    # CHECKPOINT skips unlogged buffers; the shutdown checkpoint writes them.
    tde.restart()
    assert_encrypted(tde, enc, plain, m)
    init = [p for p in tde.relation_files(enc) if p.name.endswith("_init")]
    assert init, "an unlogged table has an init fork"
    assert tde.sql("SELECT count(*) FROM u_enc") == "50"


def test_temp_table(tde):
    # Temp tables exist in one session only: fill more than temp_buffers so
    # that local buffers are written out, then read the file from SQL.
    m = "MARKER_TEMP"
    sql = "SET temp_buffers = '1MB';"
    for am, s in (("tde_heap", "enc"), ("heap", "plain")):
        sql += (
            f"CREATE TEMP TABLE tmp_{s} (v text) USING {am};"
            f"INSERT INTO tmp_{s} SELECT '{m}' || g || repeat('x', 500) FROM generate_series(1, 20000) g;"
            f"SELECT pg_tde_is_encrypted('tmp_{s}'), count(*),"
            f" position('{m}'::bytea IN pg_read_binary_file(pg_relation_filepath('tmp_{s}'))) > 0 FROM tmp_{s};"
        )
    enc, plain = tde.sql(sql).splitlines()[-2:]
    assert plain == "f|20000|t", "control: a plain temp table shows the marker"
    assert enc == "t|20000|f"


def test_matview_and_ctas(tde):
    m = "MARKER_MATVIEW"
    tde.sql(f"CREATE TABLE src (v text); INSERT INTO src SELECT '{m}' || g FROM generate_series(1, 100) g")
    tde.sql("CREATE MATERIALIZED VIEW mv_enc USING tde_heap AS SELECT * FROM src; CREATE MATERIALIZED VIEW mv_plain USING heap AS SELECT * FROM src")
    tde.sql("CREATE TABLE ctas_enc USING tde_heap AS SELECT * FROM src; CREATE TABLE ctas_plain USING heap AS SELECT * FROM src")
    tde.sql("REFRESH MATERIALIZED VIEW mv_enc")
    tde.checkpoint()
    assert_encrypted(tde, "mv_enc", "mv_plain", m)
    assert_encrypted(tde, "ctas_enc", "ctas_plain", m)


def test_partitions(tde):
    m = "MARKER_PARTITION"
    tde.sql("CREATE TABLE p_enc (k int, v text) PARTITION BY RANGE (k) USING tde_heap; CREATE TABLE p_enc_1 PARTITION OF p_enc FOR VALUES FROM (0) TO (1000)")
    tde.sql("CREATE TABLE p_plain (k int, v text) PARTITION BY RANGE (k); CREATE TABLE p_plain_1 PARTITION OF p_plain FOR VALUES FROM (0) TO (1000)")
    tde.sql(f"INSERT INTO p_enc SELECT g, '{m}' FROM generate_series(1, 100) g; INSERT INTO p_plain SELECT g, '{m}' FROM generate_series(1, 100) g")
    tde.checkpoint()
    assert_encrypted(tde, "p_enc_1", "p_plain_1", m)
    assert tde.sql("SELECT pg_tde_is_encrypted('p_enc')") == ""  # no storage: NULL


REWRITES = {
    "truncate": "TRUNCATE {t}; INSERT INTO {t} SELECT '{m}' || g FROM generate_series(1, 100) g",
    "vacuum_full": "VACUUM FULL {t}",
    "cluster": "CLUSTER {t} USING {t}_idx",
    "reindex": "REINDEX TABLE {t}",
    "reindex_concurrently": "REINDEX TABLE CONCURRENTLY {t}",
    "alter_type": "ALTER TABLE {t} ALTER v TYPE varchar(200)",
}


@pytest.mark.parametrize("op", sorted(REWRITES))
def test_rewrites_keep_status(tde, op):
    m = "MARKER_REWRITE_" + op.upper()
    for am, s in (("tde_heap", "enc"), ("heap", "plain")):
        t = f"r_{s}"
        tde.sql(f"CREATE TABLE {t} (v text) USING {am}; INSERT INTO {t} SELECT '{m}' || g FROM generate_series(1, 100) g; CREATE INDEX {t}_idx ON {t} (v)")
        before = tde.sql(f"SELECT pg_relation_filenode('{t}'), pg_relation_filenode('{t}_idx')")
        tde.sql(REWRITES[op].format(t=t, m=m))
        after = tde.sql(f"SELECT pg_relation_filenode('{t}'), pg_relation_filenode('{t}_idx')")
        assert before != after, f"{op} must create new files"
    tde.checkpoint()
    assert_encrypted(tde, "r_enc", "r_plain", m)
    assert_encrypted(tde, "r_enc_idx", "r_plain_idx", m)
    assert tde.sql("SELECT count(*) FROM r_enc") == "100"


def test_set_tablespace(tde):
    m = "MARKER_TABLESPACE"
    spc = tde.base / "spc"
    spc.mkdir()
    import os
    import pwd

    pw = pwd.getpwnam("postgres")
    os.chown(spc, pw.pw_uid, pw.pw_gid)
    tde.sql(f"CREATE TABLESPACE spc LOCATION '{spc}'")
    for am, s in (("tde_heap", "enc"), ("heap", "plain")):
        tde.sql(f"CREATE TABLE ts_{s} (v text) USING {am}; INSERT INTO ts_{s} SELECT '{m}' || g FROM generate_series(1, 100) g; CREATE INDEX ts_{s}_idx ON ts_{s} (v)")
        tde.sql(f"ALTER TABLE ts_{s} SET TABLESPACE spc; ALTER INDEX ts_{s}_idx SET TABLESPACE spc")
    tde.checkpoint()
    assert_encrypted(tde, "ts_enc", "ts_plain", m)
    assert_encrypted(tde, "ts_enc_idx", "ts_plain_idx", m)


def test_set_access_method_both_ways(tde):
    m = "MARKER_SETAM"
    tde.sql(f"CREATE TABLE am_t (id serial, v text) USING heap; INSERT INTO am_t (v) SELECT '{m}' || g FROM generate_series(1, 100) g; CREATE INDEX am_t_idx ON am_t (v)")
    tde.checkpoint()
    assert tde.files_contain("am_t", m.encode())
    tde.sql("ALTER TABLE am_t SET ACCESS METHOD tde_heap")
    tde.checkpoint()
    for rel in ("am_t", "am_t_idx"):
        assert not tde.files_contain(rel, m.encode()), rel
        assert tde.sql(f"SELECT pg_tde_is_encrypted('{rel}')") == "t"
    assert tde.sql("SELECT pg_tde_is_encrypted('am_t_id_seq')") == "t"
    tde.sql("ALTER TABLE am_t SET ACCESS METHOD heap")
    tde.checkpoint()
    for rel in ("am_t", "am_t_idx"):
        assert tde.files_contain(rel, m.encode()), rel
        assert tde.sql(f"SELECT pg_tde_is_encrypted('{rel}')") == "f"
    assert tde.sql("SELECT pg_tde_is_encrypted('am_t_id_seq')") == "f"
    assert tde.sql("SELECT count(*) FROM am_t") == "100"


def test_create_database_from_template(tde, keyring):
    m = "MARKER_CREATEDB"
    tde.sql("CREATE DATABASE tmpl")
    setup_encryption(tde, keyring, db="tmpl", key="tmpl-key")
    tde.sql(f"CREATE TABLE c_enc (v text) USING tde_heap; INSERT INTO c_enc SELECT '{m}' || g FROM generate_series(1, 100) g", "tmpl")
    tde.sql(f"CREATE TABLE c_plain (v text) USING heap; INSERT INTO c_plain SELECT '{m}' || g FROM generate_series(1, 100) g", "tmpl")
    tde.sql("CREATE DATABASE copy TEMPLATE tmpl STRATEGY WAL_LOG")
    tde.checkpoint()
    assert_encrypted(tde, "c_enc", "c_plain", m, db="copy")
    assert tde.sql("SELECT count(*) FROM c_enc", "copy") == "100"
