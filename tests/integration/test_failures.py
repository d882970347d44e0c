"""Bad cases: each fails with a clear error and the right SQLSTATE, returns no
rows it cannot decrypt, and writes nothing in plaintext (SPEC §4, §5, §6)."""

import os
import pwd

import pytest

from cluster import Cluster, make_keyring_dir, setup_encryption

KEYS_HEADER = 512
ENTRY = 256


# ---------------------------------------------------------------------------
# helpers


def _crc32c_table():
    table = []
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        table.append(c)
    return table


_CRC_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
    crc = 0xFFFFFFFF
    for b in data:
        crc = _CRC_TABLE[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


assert crc32c(b"123456789") == 0xE3069283  # the standard check value


def u32(buf, off: int) -> int:
    return int.from_bytes(buf[off:off + 4], "little")


def fill_marked(c: Cluster, table: str, marker: str, am: str = "tde_heap") -> str:
    c.sql(
        f"CREATE TABLE {table} (id int, v text) USING {am};"
        f"INSERT INTO {table} SELECT g, '{marker}' || g FROM generate_series(1, 500) g;"
        f"CREATE INDEX {table}_idx ON {table} (v)"
    )
    return c.sql(f"SELECT md5(string_agg(id || ':' || v, ',' ORDER BY id)) FROM {table}")


def provider_state(c: Cluster) -> str:
    return c.sql(
        "SELECT * FROM pg_tde_list_all_database_key_providers() ORDER BY id;"
        "SELECT '--';"
        "SELECT * FROM pg_tde_list_all_global_key_providers() ORDER BY id;"
        "SELECT '--';"
        "SELECT key_name, provider_name, provider_id FROM pg_tde_key_info()"
    )


def assert_no_plaintext_after_failed_write(c: Cluster, table: str, marker: str, sqlstate: str) -> None:
    """Try to write a new marker into a table whose key is unavailable: the
    write must fail, and the marker must not reach the disk."""
    e = c.sql_error(f"INSERT INTO {table} VALUES (100000, '{marker}')")
    assert e.sqlstate == sqlstate, e.output
    c.checkpoint()
    assert not c.files_contain(table, marker.encode())


# ---------------------------------------------------------------------------
# no principal key


def test_create_table_without_principal_key(cluster, keyring):
    cluster.sql("CREATE EXTENSION pg_tde")
    e = cluster.sql_error("CREATE TABLE x (v text) USING tde_heap")
    assert e.sqlstate and e.sqlstate != "XX000", e.output
    assert "principal key" in e.message, e.output
    assert cluster.sql("SELECT to_regclass('x') IS NULL") == "t"
    # a provider without a key set is not enough either
    cluster.sql(f"SELECT pg_tde_add_database_key_provider_file('file-vault', '{keyring}/keyring.json')")
    cluster.sql("SELECT pg_tde_create_key_using_database_key_provider('k', 'file-vault')")
    e = cluster.sql_error("CREATE TABLE x (v text) USING tde_heap")
    assert e.sqlstate and e.sqlstate != "XX000", e.output
    assert "principal key" in e.message, e.output
    assert cluster.sql("SELECT to_regclass('x') IS NULL") == "t"
    # and a heap table next to it still works
    cluster.sql("CREATE TABLE y (v text) USING heap; INSERT INTO y VALUES ('ok')")
    assert cluster.sql("SELECT v FROM y") == "ok"


# ---------------------------------------------------------------------------
# keyring unavailable after a restart


def _keyring_unavailable(tde, keyring, break_it, repair_it, sqlstate):
    """Break the keyring while the server is down; the server must start, every
    access to the encrypted table must fail with `sqlstate` (None: any proper
    SQLSTATE but internal_error) and an error that names the provider, the key
    or the keyring file, and nothing may be written in plaintext."""
    m = "MARKER_KEYRING_GONE_41"
    expected = fill_marked(tde, "kt", m)
    tde.sql(f"CREATE TABLE kt_plain (v text) USING heap; INSERT INTO kt_plain VALUES ('{m}')")
    tde.checkpoint()
    tde.stop()
    path = keyring / "keyring.json"
    break_it(path)

    def check(e, what):
        if sqlstate is None:
            assert e.sqlstate and e.sqlstate not in ("XX000", "00000"), f"{what}: {e.output}"
        else:
            assert e.sqlstate == sqlstate, f"{what}: expected {sqlstate}, got {e.sqlstate}: {e.message}"
        assert any(s in e.message for s in ("file-vault", "principal-key", str(path))), e.output
        assert m not in e.output

    try:
        assert tde.start(expect_fail=True), f"the server must start without its keyring:\n{tde.log_tail()}"
        assert tde.sql("SELECT v FROM kt_plain") == m  # the rest of the database works
        for q in ("SELECT * FROM kt", "SELECT count(*) FROM kt", f"SELECT id FROM kt WHERE v = '{m}7'"):
            check(tde.sql_error(q), q)
        check(tde.sql_error("INSERT INTO kt VALUES (100000, 'MARKER_WRITTEN_WITHOUT_KEY')"), "INSERT")
        check(tde.sql_error("CREATE TABLE kt2 (v text) USING tde_heap"), "CREATE TABLE")
        assert tde.sql("SELECT to_regclass('kt2') IS NULL") == "t"
        tde.checkpoint()
        assert not tde.files_contain("kt", b"MARKER_WRITTEN_WITHOUT_KEY")
    finally:
        tde.stop()
        repair_it(path)
    tde.start()
    assert tde.sql("SELECT md5(string_agg(id || ':' || v, ',' ORDER BY id)) FROM kt") == expected
    assert tde.sql("SELECT count(*) FROM kt WHERE v = 'MARKER_WRITTEN_WITHOUT_KEY'") == "0"
    tde.sql("SELECT pg_tde_verify_key()")


def _hide(p):
    p.rename(p.with_name(p.name + ".away"))


def _unhide(p):
    p.with_name(p.name + ".away").rename(p)


def _lock(p):
    os.chown(p, 0, 0)
    os.chmod(p, 0o000)


def _unlock(p):
    pw = pwd.getpwnam("postgres")
    os.chown(p, pw.pw_uid, pw.pw_gid)
    os.chmod(p, 0o600)


needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to make the keyring unreadable for the server")


def test_keyring_file_missing(tde, keyring):
    _keyring_unavailable(tde, keyring, _hide, _unhide, "38000")


@needs_root
def test_keyring_file_unreadable(tde, keyring):
    _keyring_unavailable(tde, keyring, _lock, _unlock, None)


@needs_root
def test_keyring_file_unreadable_sqlstate(tde, keyring):
    fill_marked(tde, "kt", "MARKER_KEYRING_LOCKED")
    tde.checkpoint()
    tde.stop()
    _lock(keyring / "keyring.json")
    try:
        tde.start()
        e = tde.sql_error("SELECT count(*) FROM kt")
    finally:
        tde.stop()
        _unlock(keyring / "keyring.json")
    assert e.sqlstate == "38000", f"expected 38000 external_routine_exception, got {e.sqlstate}: {e.message}"


# ---------------------------------------------------------------------------
# a damaged key map record


def _corrupt_entry(tde, table: str, fix_crc: bool) -> None:
    oid = tde.sql("SELECT oid FROM pg_database WHERE datname = current_database()")
    filenode = int(tde.sql(f"SELECT pg_relation_filenode('{table}')"))
    tde.stop()
    path = tde.datadir / "pg_tde" / f"{oid}_keys"
    data = bytearray(path.read_bytes())
    hits = [
        off for off in range(KEYS_HEADER, len(data) - ENTRY + 1, ENTRY)
        if u32(data, off) == 1 and u32(data, off + 8) == filenode and u32(data, off + 4) in (0, 1663)
    ]
    assert len(hits) == 1, f"expected one key map record for filenode {filenode}, found {hits}"
    off = hits[0]
    rec = data[off:off + ENTRY]
    assert u32(rec, 252) == crc32c(bytes(rec[:252])), "record CRC layout differs from keymap.rs"
    wrapped_len = u32(rec, 16)
    assert 12 + 16 < wrapped_len <= 128
    # flip bytes of the wrapped key's ciphertext (after the 12-byte nonce)
    for i in (20 + 12, 20 + 13, 20 + wrapped_len - 20):
        data[off + i] ^= 0xA5
    if fix_crc:
        data[off + 252:off + 256] = crc32c(bytes(data[off:off + 252])).to_bytes(4, "little")
    path.write_bytes(data)
    tde.start()  # caches are cold


VARIANTS = [pytest.param(False, id="crc_mismatch"), pytest.param(True, id="gcm_tag_mismatch")]


@pytest.mark.parametrize("fix_crc", VARIANTS)
def test_corrupt_key_map_entry(tde, fix_crc):
    m = "MARKER_KEYMAP_CORRUPT_93"
    fill_marked(tde, "ct", m)
    tde.checkpoint()
    _corrupt_entry(tde, "ct", fix_crc)
    for q in ("SELECT * FROM ct", "SELECT count(*) FROM ct"):
        e = tde.sql_error(q)
        assert e.sqlstate == "XX001", f"{q}: expected XX001 data_corrupted, got {e.sqlstate!r}: {e.output}"
        assert m not in e.output
    assert_no_plaintext_after_failed_write(tde, "ct", "MARKER_WRITTEN_WITH_BAD_KEY", "XX001")


@pytest.mark.parametrize("fix_crc", VARIANTS)
def test_corrupt_key_map_entry_is_contained(tde, fix_crc):
    """A damaged record takes down its relation only: the database stays
    usable (a DBA must be able to connect, read other tables and drop the
    damaged one), as PostgreSQL does for a damaged page."""
    m = "MARKER_KEYMAP_CONTAINED_17"
    good = fill_marked(tde, "good_t", m)
    plain = fill_marked(tde, "plain_t", m, am="heap")
    fill_marked(tde, "ct", m)
    tde.checkpoint()
    _corrupt_entry(tde, "ct", fix_crc)
    assert tde.sql("SELECT 1") == "1"
    assert tde.sql("SELECT md5(string_agg(id || ':' || v, ',' ORDER BY id)) FROM plain_t") == plain
    assert tde.sql("SELECT md5(string_agg(id || ':' || v, ',' ORDER BY id)) FROM good_t") == good
    assert tde.sql_error("SELECT count(*) FROM ct").sqlstate == "XX001"
    tde.sql("DROP TABLE ct")
    tde.sql("CREATE TABLE new_t (v text) USING tde_heap; INSERT INTO new_t VALUES ('x')")
    assert tde.sql("SELECT v FROM new_t") == "x"


# ---------------------------------------------------------------------------
# not preloaded


def test_create_extension_without_preload():
    c = Cluster("nopreload")
    try:
        c.initdb(extra_conf="shared_preload_libraries = ''")
        c.start()
        assert c.sql("SHOW shared_preload_libraries") == ""
        e = c.sql_error("CREATE EXTENSION pg_tde")
        assert e.sqlstate and e.sqlstate != "XX000", e.output
        assert "shared_preload_libraries" in e.output, e.output
        assert c.sql("SELECT count(*) FROM pg_extension WHERE extname = 'pg_tde'") == "0"
        assert c.sql("SELECT count(*) FROM pg_am WHERE amname = 'tde_heap'") == "0"
    finally:
        c.destroy()


# ---------------------------------------------------------------------------
# bad SQL input


@pytest.fixture(scope="module")
def shared():
    c = Cluster("badinput")
    c.initdb()
    c.start()
    kr = make_keyring_dir()
    setup_encryption(c, kr)
    c.sql(f"SELECT pg_tde_add_global_key_provider_file('global-vault', '{kr}/global.json')")
    yield c, kr
    c.destroy()


LONG = "a" * 300

BAD_INPUT = [
    # (id, SQL with {kr} for the keyring directory, expected SQLSTATE)
    ("file_null_name", "SELECT pg_tde_add_database_key_provider_file(NULL, '{kr}/p.json')", "22004"),
    ("file_null_path", "SELECT pg_tde_add_database_key_provider_file('p', NULL)", "22004"),
    ("file_empty_name", "SELECT pg_tde_add_database_key_provider_file('', '{kr}/p.json')", "22023"),
    ("file_empty_path", "SELECT pg_tde_add_database_key_provider_file('p', '')", "22023"),
    ("file_long_name", f"SELECT pg_tde_add_database_key_provider_file('{LONG}', '{{kr}}/p.json')", "42622"),
    ("file_relative_path", "SELECT pg_tde_add_database_key_provider_file('p', 'relative.json')", "22023"),
    ("file_unreachable", "SELECT pg_tde_add_database_key_provider_file('p', '/nonexistent-dir-pg-tde/p.json')", "38000"),
    ("global_null_name", "SELECT pg_tde_add_global_key_provider_file(NULL, '{kr}/p.json')", "22004"),
    ("global_long_name", f"SELECT pg_tde_add_global_key_provider_file('{LONG}', '{{kr}}/p.json')", "42622"),
    ("generic_null_type", "SELECT pg_tde_add_database_key_provider(NULL, 'p', '{{\"path\": \"{kr}/p.json\"}}')", "22004"),
    ("generic_null_name", "SELECT pg_tde_add_database_key_provider('file', NULL, '{{\"path\": \"{kr}/p.json\"}}')", "22004"),
    ("generic_null_options", "SELECT pg_tde_add_database_key_provider('file', 'p', NULL)", "22004"),
    ("generic_empty_type", "SELECT pg_tde_add_database_key_provider('', 'p', '{{\"path\": \"{kr}/p.json\"}}')", "22023"),
    ("unknown_type", "SELECT pg_tde_add_database_key_provider('nosuch', 'p', '{{\"path\": \"{kr}/p.json\"}}')", "22023"),
    ("options_array", "SELECT pg_tde_add_database_key_provider('file', 'p', '[1, 2]')", "22023"),
    ("options_string", "SELECT pg_tde_add_database_key_provider('file', 'p', '\"{kr}/p.json\"')", "22023"),
    ("options_json_null", "SELECT pg_tde_add_database_key_provider('file', 'p', 'null')", "22023"),
    ("options_number", "SELECT pg_tde_add_database_key_provider('file', 'p', '42')", "22023"),
    ("options_no_path", "SELECT pg_tde_add_database_key_provider('file', 'p', '{{}}')", "22023"),
    ("options_unknown_key", "SELECT pg_tde_add_database_key_provider('file', 'p', '{{\"path\": \"{kr}/p.json\", \"x\": 1}}')", "22023"),
    ("options_path_not_string", "SELECT pg_tde_add_database_key_provider('file', 'p', '{{\"path\": 7}}')", "22023"),
    ("global_options_array", "SELECT pg_tde_add_global_key_provider('file', 'p', '[]')", "22023"),
    ("duplicate_provider", "SELECT pg_tde_add_database_key_provider_file('file-vault', '{kr}/other.json')", "42710"),
    ("duplicate_provider_generic", "SELECT pg_tde_add_database_key_provider('file', 'file-vault', '{{\"path\": \"{kr}/other.json\"}}')", "42710"),
    ("duplicate_global_provider", "SELECT pg_tde_add_global_key_provider_file('global-vault', '{kr}/other.json')", "42710"),
    ("create_key_null_name", "SELECT pg_tde_create_key_using_database_key_provider(NULL, 'file-vault')", "22004"),
    ("create_key_null_provider", "SELECT pg_tde_create_key_using_database_key_provider('k2', NULL)", "22004"),
    ("create_key_empty_name", "SELECT pg_tde_create_key_using_database_key_provider('', 'file-vault')", "22023"),
    ("create_key_long_name", f"SELECT pg_tde_create_key_using_database_key_provider('{LONG}', 'file-vault')", "42622"),
    ("create_key_duplicate", "SELECT pg_tde_create_key_using_database_key_provider('principal-key', 'file-vault')", "42710"),
    ("create_key_unknown_provider", "SELECT pg_tde_create_key_using_database_key_provider('k2', 'no-such-provider')", "42704"),
    ("create_key_db_scope_for_global", "SELECT pg_tde_create_key_using_database_key_provider('k2', 'global-vault')", "42704"),
    ("set_key_missing", "SELECT pg_tde_set_key_using_database_key_provider('no-such-key', 'file-vault')", "42704"),
    ("set_key_unknown_provider", "SELECT pg_tde_set_key_using_database_key_provider('principal-key', 'no-such-provider')", "42704"),
    ("set_key_null_name", "SELECT pg_tde_set_key_using_database_key_provider(NULL, 'file-vault')", "22004"),
    ("set_key_empty_provider", "SELECT pg_tde_set_key_using_database_key_provider('principal-key', '')", "22023"),
    ("set_key_long_name", f"SELECT pg_tde_set_key_using_database_key_provider('{LONG}', 'file-vault')", "42622"),
    ("set_global_key_missing", "SELECT pg_tde_set_key_using_global_key_provider('no-such-key', 'global-vault')", "42704"),
    ("set_global_key_unknown_provider", "SELECT pg_tde_set_key_using_global_key_provider('principal-key', 'file-vault')", "42704"),
]


@pytest.mark.parametrize("sql,sqlstate", [(s, c) for _, s, c in BAD_INPUT], ids=[i for i, _, _ in BAD_INPUT])
def test_bad_input(shared, sql, sqlstate):
    c, kr = shared
    before = provider_state(c)
    keyring_before = sorted(p.name for p in kr.iterdir())
    keyring_bytes = (kr / "keyring.json").read_bytes()
    e = c.sql_error(sql.format(kr=kr))
    assert e.sqlstate == sqlstate, f"expected {sqlstate}, got {e.sqlstate}: {e.message}"
    assert provider_state(c) == before
    assert (kr / "keyring.json").read_bytes() == keyring_bytes
    assert sorted(p.name for p in kr.iterdir()) == keyring_before


def test_bad_input_left_everything_working(shared):
    c, kr = shared
    assert c.sql("SELECT name FROM pg_tde_list_all_database_key_providers()") == "file-vault"
    assert c.sql("SELECT name FROM pg_tde_list_all_global_key_providers()") == "global-vault"
    assert c.sql("SELECT key_name, provider_name FROM pg_tde_key_info()") == "principal-key|file-vault"
    c.sql("SELECT pg_tde_verify_key()")
    c.sql("CREATE TABLE after_bad (v text) USING tde_heap; INSERT INTO after_bad VALUES ('MARKER_AFTER_BAD')")
    c.checkpoint()
    assert not c.files_contain("after_bad", b"MARKER_AFTER_BAD")


# ---------------------------------------------------------------------------
# privileges


def test_non_superuser_without_grants(tde, keyring):
    tde.sql("CREATE ROLE alice LOGIN; CREATE TABLE pub_t (v text) USING tde_heap; GRANT SELECT ON pub_t TO alice")
    before = provider_state(tde)
    calls = [
        f"SELECT pg_tde_add_database_key_provider_file('alice-vault', '{keyring}/alice.json')",
        f"SELECT pg_tde_add_global_key_provider_file('alice-vault', '{keyring}/alice.json')",
        f"SELECT pg_tde_add_database_key_provider('file', 'alice-vault', '{{\"path\": \"{keyring}/alice.json\"}}')",
        "SELECT * FROM pg_tde_key_info()",
        "SELECT * FROM pg_tde_list_all_database_key_providers()",
        "SELECT * FROM pg_tde_list_all_global_key_providers()",
        "SELECT pg_tde_create_key_using_database_key_provider('alice-key', 'file-vault')",
        "SELECT pg_tde_set_key_using_database_key_provider('principal-key', 'file-vault')",
        "SELECT pg_tde_verify_key()",
    ]
    for q in calls:
        e = tde.sql_error("SET ROLE alice; " + q)
        assert e.sqlstate == "42501", f"{q}: expected 42501, got {e.sqlstate}: {e.message}"
    assert provider_state(tde) == before
    assert not (keyring / "alice.json").exists()
    # the status helpers stay public
    assert tde.sql("SET ROLE alice; SELECT pg_tde_is_encrypted('pub_t')") == "t"
    assert tde.sql("SET ROLE alice; SELECT pg_tde_version()").startswith("pg_tde ")
