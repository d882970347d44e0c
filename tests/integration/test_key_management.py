"""The key-management SQL API (SPEC §3, §6, §8), with the file provider.

Principal keys rotate, default keys are adopted and rotated, keys and
providers are deleted or changed only when that leaves nothing without a key,
rotation is crash-safe, and only key administrators manage providers and
global keys.  Claims about what is on disk read the files: `pg_tde/<dboid>_keys`
(the key map) and the relation files.
"""

import json
import os
import shutil
import time
from pathlib import Path

import pytest

from cluster import Cluster, SQLError, chown
from test_replication import make_standby, wait_for_replay

KEYS_HEADER = 512
ENTRY = 256
RECOVERY_TIMEOUT = 60

CIPHER_IDS = {"aes_128": 1, "aes_256": 2, "aes_128_xts": 3, "aes_256_xts": 4, "sm4_xts": 5}


# ---------------------------------------------------------------------------
# helpers


def u32(buf: bytes, off: int) -> int:
    return int.from_bytes(buf[off:off + 4], "little")


def digest(c: Cluster, table: str, db: str = "postgres") -> str:
    return c.sql(f"SELECT count(*) || '/' || md5(string_agg(id || ':' || v, ',' ORDER BY id)) FROM {table}", db)


def fill(c: Cluster, table: str, marker: str, db: str = "postgres", rows: int = 500) -> str:
    """An encrypted table with an index; autovacuum off and hint bits set, so
    that its files change only when something rewrites them."""
    c.sql(
        f"CREATE TABLE {table} (id int, v text) USING tde_heap WITH (autovacuum_enabled = off);"
        f"INSERT INTO {table} SELECT g, '{marker}' || g FROM generate_series(1, {rows}) g;"
        f"CREATE INDEX {table}_idx ON {table} (v);"
        f"VACUUM (FREEZE) {table}",
        db,
    )
    return digest(c, table, db)


def dboid(c: Cluster, db: str = "postgres") -> str:
    return c.sql("SELECT oid FROM pg_database WHERE datname = current_database()", db)


def keys_path(c: Cluster, db: str = "postgres") -> Path:
    return c.datadir / "pg_tde" / f"{dboid(c, db)}_keys"


def parse_keymap(data: bytes):
    """(principal key name, {(spc, rel): (cipher, wrapped bytes)}) of a key map."""
    assert data[:8] == b"PGTDEKM\0", "not a key map"
    name_len = int.from_bytes(data[40:42], "little")
    name = data[108:108 + name_len].decode()
    records = {}
    for off in range(KEYS_HEADER, len(data) - ENTRY + 1, ENTRY):
        if u32(data, off) != 1:
            continue
        wrapped_len = u32(data, off + 16)
        records[(u32(data, off + 4), u32(data, off + 8))] = (u32(data, off + 12), data[off + 20:off + 20 + wrapped_len])
    return name, records


def key_info(c: Cluster, db: str = "postgres", which: str = "key") -> str:
    return c.sql(f"SELECT key_name || '|' || coalesce(provider_name, '?') FROM pg_tde_{which}_info()", db)


def rel_bytes(c: Cluster, rels, db: str = "postgres") -> dict:
    out = {}
    for rel in rels:
        for p in c.relation_files(rel, db):
            out[str(p)] = p.read_bytes()
    assert out
    return out


def toast_of(c: Cluster, table: str, db: str = "postgres") -> str:
    return c.sql(f"SELECT reltoastrelid::regclass FROM pg_class WHERE oid = '{table}'::regclass", db)


def read_keyring(path: Path) -> dict:
    return json.loads(path.read_text())


def write_keyring(path: Path, doc: dict) -> None:
    """Write a keyring file the server user can read (0600, its owner)."""
    path.write_text(json.dumps(doc))
    chown(path)
    os.chmod(path, 0o600)


def copy_keyring(src: Path, dst: Path) -> None:
    dst.parent.mkdir(exist_ok=True)
    chown(dst.parent)
    os.chmod(dst.parent, 0o700)
    shutil.copyfile(src, dst)
    chown(dst)
    os.chmod(dst, 0o600)


def flip_key(path: Path, name: str) -> None:
    """Replace the bytes of key `name` in a keyring file by different ones of
    the same length."""
    doc = read_keyring(path)
    hits = [k for k in doc["keys"] if k["name"] == name]
    assert len(hits) == 1, doc["keys"]
    old = bytes.fromhex(hits[0]["key_hex"])
    hits[0]["key_hex"] = bytes(b ^ 0x5A for b in old).hex()
    write_keyring(path, doc)


def key_names(path: Path) -> list:
    return sorted(k["name"] for k in read_keyring(path)["keys"])


def providers(c: Cluster, scope: str = "database", db: str = "postgres") -> str:
    return c.sql(
        f"SELECT id || '|' || name || '|' || type || '|' || (options->>'path') "
        f"FROM pg_tde_list_all_{scope}_key_providers() ORDER BY id",
        db,
    )


def wait_until_up(c: Cluster) -> None:
    deadline = time.time() + RECOVERY_TIMEOUT
    last = None
    while time.time() < deadline:
        try:
            if c.sql("SELECT 1") == "1":
                return
        except SQLError as e:
            last = e
        time.sleep(0.5)
    raise AssertionError(f"server not back within {RECOVERY_TIMEOUT} s ({last}):\n{c.log_tail()}")


def assert_proper_error(e: SQLError, *allowed: str) -> None:
    if allowed:
        assert e.sqlstate in allowed, f"expected one of {allowed}, got {e.sqlstate!r}: {e.output}"
    else:
        assert e.sqlstate and e.sqlstate not in ("XX000", "00000"), e.output


# ---------------------------------------------------------------------------
# 1. rotation


def test_rotation_across_database_and_global_providers(tde, keyring):
    m = "MARKER_ROTATION_71"
    expected = fill(tde, "rot_t", m)
    rels = ["rot_t", "rot_t_idx", toast_of(tde, "rot_t")]
    tde.sql(f"SELECT pg_tde_add_global_key_provider_file('global-vault', '{keyring}/global.json')")
    tde.checkpoint()
    files_before = rel_bytes(tde, rels)
    kp = keys_path(tde)
    map_before = kp.read_bytes()
    name, records_before = parse_keymap(map_before)
    assert name == "principal-key"
    filenode = int(tde.sql("SELECT pg_relation_filenode('rot_t')"))
    assert any(rel == filenode for _, rel in records_before), "no key map record for the table"
    assert key_info(tde) == "principal-key|file-vault"

    steps = [
        ("k2", "SELECT pg_tde_create_key_using_database_key_provider('k2', 'file-vault');"
               "SELECT pg_tde_set_key_using_database_key_provider('k2', 'file-vault')", "k2|file-vault"),
        ("k3", "SELECT pg_tde_create_key_using_global_key_provider('k3', 'global-vault');"
               "SELECT pg_tde_set_key_using_global_key_provider('k3', 'global-vault')", "k3|global-vault"),
        ("k4", "SELECT pg_tde_create_key_using_database_key_provider('k4', 'file-vault');"
               "SELECT pg_tde_set_key_using_database_key_provider('k4', 'file-vault')", "k4|file-vault"),
    ]
    prev_map, prev_records = map_before, records_before
    for key, sql, info in steps:
        tde.sql(sql)
        assert key_info(tde) == info, key
        tde.checkpoint()
        new_map = kp.read_bytes()
        assert new_map != prev_map, f"{key}: key map unchanged by the rotation"
        new_name, new_records = parse_keymap(new_map)
        assert new_name == key
        # same relation files, same ciphers; every wrapped key is new
        assert set(new_records) == set(prev_records), key
        for ident, (cipher, wrapped) in new_records.items():
            assert cipher == prev_records[ident][0], (key, ident)
            assert wrapped != prev_records[ident][1], f"{key}: record {ident} was not re-wrapped"
        # rotation touches no relation file
        assert rel_bytes(tde, rels) == files_before, f"{key}: relation files changed"
        assert digest(tde, "rot_t") == expected, key
        tde.sql("SELECT pg_tde_verify_key()")
        prev_map, prev_records = new_map, new_records

    # old keys stay in their providers
    assert key_names(keyring / "keyring.json") == ["k2", "k4", "principal-key"]
    assert key_names(keyring / "global.json") == ["k3"]

    tde.restart()
    assert key_info(tde) == "k4|file-vault"
    assert digest(tde, "rot_t") == expected
    assert tde.sql(f"SET enable_seqscan = off; SET enable_bitmapscan = off; SELECT id FROM rot_t WHERE v = '{m}77'") == "77"
    tde.sql("SELECT pg_tde_verify_key()")
    # new relations get keys wrapped by the current principal key
    tde.sql(f"INSERT INTO rot_t VALUES (1000, '{m}new')")
    tde.sql(f"CREATE TABLE rot_new (id int, v text) USING tde_heap; INSERT INTO rot_new VALUES (1, '{m}x')")
    tde.checkpoint()
    for rel in ("rot_t", "rot_new"):
        assert not tde.files_contain(rel, m.encode()), rel
    tde.restart()
    assert tde.sql("SELECT count(*) FROM rot_t") == "501"
    assert tde.sql("SELECT v FROM rot_new") == f"{m}x"


# ---------------------------------------------------------------------------
# 2. default key


def test_default_key_adopted_and_rotated(cluster, keyring):
    c = cluster
    m = "MARKER_DEFAULT_KEY_52"
    c.sql("CREATE DATABASE db2; CREATE DATABASE db3")
    for db in ("postgres", "db2", "db3"):
        c.sql("CREATE EXTENSION pg_tde", db)
    c.sql(
        f"SELECT pg_tde_add_global_key_provider_file('g', '{keyring}/global.json');"
        "SELECT pg_tde_create_key_using_global_key_provider('dk1', 'g');"
        "SELECT pg_tde_set_default_key_using_global_key_provider('dk1', 'g')"
    )
    assert key_info(c, which="default_key") == "dk1|g"
    assert (c.datadir / "pg_tde" / "default_key").exists()
    # db3 has a key of its own
    c.sql(
        f"SELECT pg_tde_add_database_key_provider_file('own', '{keyring}/own3.json');"
        "SELECT pg_tde_create_key_using_database_key_provider('own3', 'own');"
        "SELECT pg_tde_set_key_using_database_key_provider('own3', 'own')",
        "db3",
    )
    # postgres and db2 have none: they adopt the default key
    for db in ("postgres", "db2"):
        assert key_info(c, db) == "", db
    expected = {db: fill(c, "dt", m, db) for db in ("postgres", "db2", "db3")}
    assert key_info(c, "postgres") == "dk1|g"
    assert key_info(c, "db2") == "dk1|g"
    assert key_info(c, "db3") == "own3|own"
    c.checkpoint()
    for db in ("postgres", "db2", "db3"):
        assert c.sql("SELECT pg_tde_is_encrypted('dt')", db) == "t"
        assert not c.files_contain("dt", m.encode(), db), db

    e = c.sql_error("SELECT pg_tde_delete_default_key()")
    assert e.sqlstate == "55006", e.output
    assert key_info(c, which="default_key") == "dk1|g"

    maps = {db: keys_path(c, db) for db in ("postgres", "db2", "db3")}
    before = {db: p.read_bytes() for db, p in maps.items()}
    c.sql(
        "SELECT pg_tde_create_key_using_global_key_provider('dk2', 'g');"
        "SELECT pg_tde_set_default_key_using_global_key_provider('dk2', 'g')"
    )
    assert key_info(c, which="default_key") == "dk2|g"
    after = {db: p.read_bytes() for db, p in maps.items()}
    for db in ("postgres", "db2"):
        assert after[db] != before[db], f"{db}: not re-wrapped by the default key rotation"
        assert parse_keymap(after[db])[0] == "dk2", db
        old_records, new_records = parse_keymap(before[db])[1], parse_keymap(after[db])[1]
        assert len(new_records) >= 3, db  # table, index, TOAST table, TOAST index
        assert set(old_records) == set(new_records), db
        assert all(new_records[k][1] != old_records[k][1] for k in new_records), db
        assert key_info(c, db) == "dk2|g", db
    assert after["db3"] == before["db3"], "a database with its own key was touched by the default key rotation"
    assert key_info(c, "db3") == "own3|own"

    c.restart()
    for db in ("postgres", "db2", "db3"):
        assert digest(c, "dt", db) == expected[db], db
        c.sql("SELECT pg_tde_verify_key()", db)
    assert key_info(c, "db2") == "dk2|g"
    c.sql("SELECT pg_tde_verify_default_key()")
    e = c.sql_error("SELECT pg_tde_delete_default_key()")
    assert e.sqlstate == "55006", e.output
    assert key_info(c, which="default_key") == "dk2|g"
    assert key_names(keyring / "global.json") == ["dk1", "dk2"]

    # once no database uses it, the default key can be deleted
    for db in ("postgres", "db2"):
        c.sql(
            f"SELECT pg_tde_add_database_key_provider_file('own', '{keyring}/own-{db}.json');"
            f"SELECT pg_tde_create_key_using_database_key_provider('own-{db}', 'own');"
            f"SELECT pg_tde_set_key_using_database_key_provider('own-{db}', 'own')",
            db,
        )
        assert key_info(c, db) == f"own-{db}|own"
    c.sql("SELECT pg_tde_delete_default_key()")
    assert key_info(c, which="default_key") == ""
    assert not (c.datadir / "pg_tde" / "default_key").exists()
    c.restart()
    for db in ("postgres", "db2", "db3"):
        assert digest(c, "dt", db) == expected[db], db


# ---------------------------------------------------------------------------
# 3. delete_key


def test_delete_key_refused_with_encrypted_tables(tde):
    m = "MARKER_DELETE_KEY_REFUSED"
    expected = fill(tde, "dk_t", m)
    before = keys_path(tde).read_bytes()
    e = tde.sql_error("SELECT pg_tde_delete_key()")
    assert e.sqlstate == "55006", e.output
    assert key_info(tde) == "principal-key|file-vault"
    assert keys_path(tde).read_bytes() == before
    tde.restart()
    assert digest(tde, "dk_t") == expected


def test_delete_key_without_encrypted_relations(tde):
    # a key set but never used
    tde.sql("SELECT pg_tde_delete_key()")
    assert key_info(tde) == ""
    assert not keys_path(tde).exists()
    e = tde.sql_error("CREATE TABLE nk (v text) USING tde_heap")
    assert_proper_error(e)
    assert "principal key" in e.message, e.output
    assert tde.sql("SELECT to_regclass('nk') IS NULL") == "t"
    e = tde.sql_error("SELECT pg_tde_delete_key()")
    assert e.sqlstate == "42704", e.output


def test_delete_key_after_dropping_the_encrypted_tables(tde):
    fill(tde, "dropped_t", "MARKER_DROPPED")
    assert tde.sql_error("SELECT pg_tde_delete_key()").sqlstate == "55006"
    tde.sql("DROP TABLE dropped_t")
    tde.checkpoint()
    tde.sql("SELECT pg_tde_delete_key()")
    assert key_info(tde) == ""
    e = tde.sql_error("CREATE TABLE nk (v text) USING tde_heap")
    assert_proper_error(e)
    assert tde.sql("SELECT to_regclass('nk') IS NULL") == "t"


def test_delete_key_falls_back_to_the_default_key(tde, keyring):
    m = "MARKER_DELETE_KEY_DEFAULT"
    expected = fill(tde, "fb_t", m)
    tde.sql(
        f"SELECT pg_tde_add_global_key_provider_file('g', '{keyring}/global.json');"
        "SELECT pg_tde_create_key_using_global_key_provider('dk', 'g');"
        "SELECT pg_tde_set_default_key_using_global_key_provider('dk', 'g')"
    )
    before = parse_keymap(keys_path(tde).read_bytes())
    tde.sql("SELECT pg_tde_delete_key()")
    assert key_info(tde) == "dk|g"
    after = parse_keymap(keys_path(tde).read_bytes())
    assert after[0] == "dk"
    assert len(after[1]) >= 3
    assert set(after[1]) == set(before[1])
    assert all(after[1][k][1] != before[1][k][1] for k in after[1])
    assert digest(tde, "fb_t") == expected
    tde.restart()
    assert digest(tde, "fb_t") == expected
    tde.sql("SELECT pg_tde_verify_key()")
    # the database now depends on the default key
    assert tde.sql_error("SELECT pg_tde_delete_default_key()").sqlstate == "55006"
    tde.checkpoint()
    assert not tde.files_contain("fb_t", m.encode())


# ---------------------------------------------------------------------------
# 4. server key and verification


def test_server_key_and_verification(tde, keyring):
    m = "MARKER_VERIFY_KEY_18"
    fill(tde, "vk_t", m)
    tde.sql(
        f"SELECT pg_tde_add_global_key_provider_file('g', '{keyring}/global.json');"
        "SELECT pg_tde_create_key_using_global_key_provider('srv', 'g');"
        "SELECT pg_tde_create_key_using_global_key_provider('dk', 'g');"
        "SELECT pg_tde_set_server_key_using_global_key_provider('srv', 'g');"
        "SELECT pg_tde_set_default_key_using_global_key_provider('dk', 'g')"
    )
    assert key_info(tde, which="server_key") == "srv|g"
    assert tde.sql("SELECT key_creation_time > now() - interval '1 hour' FROM pg_tde_server_key_info()") == "t"
    assert (tde.datadir / "pg_tde" / "server_key").exists()
    for f in ("verify_server_key", "verify_key", "verify_default_key"):
        tde.sql(f"SELECT pg_tde_{f}()")
    tde.restart()
    assert key_info(tde, which="server_key") == "srv|g"
    for f in ("verify_server_key", "verify_key", "verify_default_key"):
        tde.sql(f"SELECT pg_tde_{f}()")
    # rotate the server key and back
    server_map = (tde.datadir / "pg_tde" / "server_key").read_bytes()
    tde.sql("SELECT pg_tde_create_key_using_global_key_provider('srv2', 'g');"
            "SELECT pg_tde_set_server_key_using_global_key_provider('srv2', 'g')")
    assert key_info(tde, which="server_key") == "srv2|g"
    assert (tde.datadir / "pg_tde" / "server_key").read_bytes() != server_map
    tde.sql("SELECT pg_tde_verify_server_key()")
    tde.sql("SELECT pg_tde_set_server_key_using_global_key_provider('srv', 'g')")
    assert key_info(tde, which="server_key") == "srv|g"

    # the keys in the keyrings are replaced by different bytes
    tde.stop()
    saved = {p: p.read_bytes() for p in (keyring / "keyring.json", keyring / "global.json")}
    flip_key(keyring / "keyring.json", "principal-key")
    flip_key(keyring / "global.json", "srv")
    try:
        tde.start()
        for f, name in (("verify_key", "principal-key"), ("verify_server_key", "srv")):
            e = tde.sql_error(f"SELECT pg_tde_{f}()")
            assert_proper_error(e)
            assert name in e.message, e.output
        tde.sql("SELECT pg_tde_verify_default_key()")  # untouched
        e = tde.sql_error("SELECT count(*) FROM vk_t")
        assert_proper_error(e)
        assert m not in e.output
    finally:
        tde.stop()
        for p, b in saved.items():
            p.write_bytes(b)
    tde.start()
    for f in ("verify_server_key", "verify_key", "verify_default_key"):
        tde.sql(f"SELECT pg_tde_{f}()")
    assert tde.sql("SELECT count(*) FROM vk_t") == "500"


# ---------------------------------------------------------------------------
# 5. provider changes


def test_change_provider_to_a_copy(tde, keyring):
    m = "MARKER_PROVIDER_MOVED"
    expected = fill(tde, "pm_t", m)
    old = keyring / "keyring.json"
    new = keyring / "moved" / "keyring2.json"
    copy_keyring(old, new)
    before = providers(tde)
    assert before.endswith(f"|file-vault|file|{old}")
    tde.sql(f"SELECT pg_tde_change_database_key_provider_file('file-vault', '{new}')")
    after = providers(tde)
    assert after == before.replace(str(old), str(new))
    tde.stop()
    old.rename(old.with_name("keyring.json.away"))  # only the new path can serve the key now
    tde.start()
    assert providers(tde) == after
    assert digest(tde, "pm_t") == expected
    tde.sql("SELECT pg_tde_verify_key()")
    assert key_info(tde) == "principal-key|file-vault"
    # new keys go to the new keyring
    tde.sql("SELECT pg_tde_create_key_using_database_key_provider('k2', 'file-vault')")
    assert key_names(new) == ["k2", "principal-key"]


def test_change_provider_refused_when_the_key_is_missing_or_differs(tde, keyring):
    fill(tde, "pr_t", "MARKER_PROVIDER_REFUSED")
    providers_json = tde.datadir / "pg_tde" / "providers.json"
    before, before_bytes = providers(tde), providers_json.read_bytes()

    # a keyring without the key in use
    lacking = keyring / "lacking.json"
    write_keyring(lacking, {
        "format": "pg_tde-keyring", "version": 1,
        "keys": [{"name": "something-else", "key_hex": "11" * 16, "created": 1763800000}],
    })
    e = tde.sql_error(f"SELECT pg_tde_change_database_key_provider_file('file-vault', '{lacking}')")
    assert e.sqlstate == "55006", e.output
    assert providers(tde) == before
    assert providers_json.read_bytes() == before_bytes

    # a keyring with a key of the same name but other bytes
    differs = keyring / "differs.json"
    copy_keyring(keyring / "keyring.json", differs)
    flip_key(differs, "principal-key")
    e = tde.sql_error(f"SELECT pg_tde_change_database_key_provider_file('file-vault', '{differs}')")
    assert e.sqlstate == "55006", e.output
    assert "differ" in e.message, e.output
    assert providers(tde) == before
    assert providers_json.read_bytes() == before_bytes

    # the same rules for a global provider that serves the default key
    tde.sql(
        f"SELECT pg_tde_add_global_key_provider_file('g', '{keyring}/global.json');"
        "SELECT pg_tde_create_key_using_global_key_provider('dk', 'g');"
        "SELECT pg_tde_set_default_key_using_global_key_provider('dk', 'g')"
    )
    global_before = providers(tde, "global")
    before_bytes = providers_json.read_bytes()
    g_differs = keyring / "g-differs.json"
    copy_keyring(keyring / "global.json", g_differs)
    flip_key(g_differs, "dk")
    for path in (lacking, g_differs):
        e = tde.sql_error(f"SELECT pg_tde_change_global_key_provider_file('g', '{path}')")
        assert e.sqlstate == "55006", e.output
    assert providers(tde, "global") == global_before
    assert providers_json.read_bytes() == before_bytes
    g_copy = keyring / "g-copy.json"
    copy_keyring(keyring / "global.json", g_copy)
    tde.sql(f"SELECT pg_tde_change_global_key_provider_file('g', '{g_copy}')")
    assert providers(tde, "global").endswith(f"|g|file|{g_copy}")
    tde.sql("SELECT pg_tde_verify_default_key()")

    # and nothing else was written to the keyrings
    assert key_names(lacking) == ["something-else"]
    tde.restart()
    assert providers(tde) == before
    assert tde.sql("SELECT count(*) FROM pr_t") == "500"


def test_delete_provider(tde, keyring):
    fill(tde, "dp_t", "MARKER_DELETE_PROVIDER")
    tde.sql(f"SELECT pg_tde_add_database_key_provider_file('spare', '{keyring}/spare.json')")
    assert [r.split("|")[1] for r in providers(tde).splitlines()] == ["file-vault", "spare"]
    e = tde.sql_error("SELECT pg_tde_delete_database_key_provider('file-vault')")
    assert e.sqlstate == "55006", e.output
    tde.sql("SELECT pg_tde_delete_database_key_provider('spare')")
    assert [r.split("|")[1] for r in providers(tde).splitlines()] == ["file-vault"]
    e = tde.sql_error("SELECT pg_tde_delete_database_key_provider('spare')")
    assert e.sqlstate == "42704", e.output
    # global providers: refused while they serve the default key, allowed when unused
    tde.sql(
        f"SELECT pg_tde_add_global_key_provider_file('g', '{keyring}/global.json');"
        f"SELECT pg_tde_add_global_key_provider_file('g-spare', '{keyring}/global-spare.json');"
        "SELECT pg_tde_create_key_using_global_key_provider('dk', 'g');"
        "SELECT pg_tde_set_default_key_using_global_key_provider('dk', 'g')"
    )
    assert tde.sql_error("SELECT pg_tde_delete_global_key_provider('g')").sqlstate == "55006"
    tde.sql("SELECT pg_tde_delete_global_key_provider('g-spare')")
    assert [r.split("|")[1] for r in providers(tde, "global").splitlines()] == ["g"]
    tde.restart()
    assert [r.split("|")[1] for r in providers(tde).splitlines()] == ["file-vault"]
    assert tde.sql("SELECT count(*) FROM dp_t") == "500"


def test_inherit_global_providers_off(tde, keyring):
    tde.sql(
        f"SELECT pg_tde_add_global_key_provider_file('g', '{keyring}/global.json');"
        "SELECT pg_tde_create_key_using_global_key_provider('gk', 'g')"
    )
    before = keys_path(tde).read_bytes() if keys_path(tde).exists() else None
    e = tde.sql_error("SET pg_tde.inherit_global_providers = off; SELECT pg_tde_set_key_using_global_key_provider('gk', 'g')")
    assert e.sqlstate == "42501", e.output
    assert key_info(tde) == "principal-key|file-vault"
    assert (keys_path(tde).read_bytes() if keys_path(tde).exists() else None) == before
    # only a superuser may change the setting
    tde.sql("CREATE ROLE plainuser LOGIN")
    e = tde.sql_error("SET ROLE plainuser; SET pg_tde.inherit_global_providers = on")
    assert e.sqlstate == "42501", e.output
    # on (the default), the same call works
    tde.sql("SELECT pg_tde_set_key_using_global_key_provider('gk', 'g')")
    assert key_info(tde) == "gk|g"


# ---------------------------------------------------------------------------
# 6. crash during rotation


@pytest.mark.parametrize("point,survivor", [("rotation_before_wal", "principal-key"), ("rotation_after_wal", "k2")])
def test_crash_during_rotation(tde, point, survivor):
    m = "MARKER_CRASH_ROTATION"
    expected = fill(tde, "cr_t", m, rows=2000)
    tde.sql("SELECT pg_tde_create_key_using_database_key_provider('k2', 'file-vault')")
    map_before = keys_path(tde).read_bytes()
    pid = tde.postmaster_pid()
    e = tde.sql_error(
        f"SET pg_tde.test_crash_point = '{point}';"
        "SELECT pg_tde_set_key_using_database_key_provider('k2', 'file-vault')"
    )
    assert e.sqlstate in ("", "08006", "57P01", "XX000") or "connection" in e.output, e.output
    wait_until_up(tde)
    assert tde.postmaster_pid() == pid, "the postmaster itself should survive a backend crash"
    log = tde.logfile.read_text(errors="replace")
    assert "terminated by signal 6" in log, tde.log_tail()
    assert "all server processes terminated; reinitializing" in log, tde.log_tail()

    assert digest(tde, "cr_t") == expected
    assert key_info(tde) == f"{survivor}|file-vault"
    map_after = keys_path(tde).read_bytes()
    assert parse_keymap(map_after)[0] == survivor
    if point == "rotation_before_wal":
        assert map_after == map_before, "the key map changed although the rotation was never logged"
    else:
        assert set(parse_keymap(map_after)[1]) == set(parse_keymap(map_before)[1])
    tde.sql("SELECT pg_tde_verify_key()")
    tde.sql(f"INSERT INTO cr_t VALUES (5000, '{m}after')")
    tde.restart()
    assert tde.sql("SELECT count(*) FROM cr_t") == "2001"
    assert key_info(tde) == f"{survivor}|file-vault"
    tde.sql("SELECT pg_tde_verify_key()")
    tde.checkpoint()
    assert not tde.files_contain("cr_t", m.encode())
    # and a rotation after the crash completes normally
    tde.sql("SELECT pg_tde_create_key_using_database_key_provider('k3', 'file-vault');"
            "SELECT pg_tde_set_key_using_database_key_provider('k3', 'file-vault')")
    tde.restart()
    assert key_info(tde) == "k3|file-vault"
    assert tde.sql("SELECT count(*) FROM cr_t") == "2001"


# ---------------------------------------------------------------------------
# 7. access control


def test_access_control(tde, keyring):
    t = tde
    t.sql("CREATE ROLE r LOGIN; CREATE ROLE r2 LOGIN")
    t.sql(f"SELECT pg_tde_add_global_key_provider_file('g', '{keyring}/global.json');"
          "SELECT pg_tde_create_key_using_global_key_provider('gk', 'g')")

    def refused(role, q, what=None):
        e = t.sql_error(f"SET ROLE {role}; {q}")
        assert e.sqlstate == "42501", f"{role}: {what or q}: expected 42501, got {e.sqlstate}: {e.message}"

    no_grant = [
        "SELECT * FROM pg_tde_key_info()",
        "SELECT pg_tde_set_key_using_database_key_provider('principal-key', 'file-vault')",
        f"SELECT pg_tde_add_database_key_provider_file('r-vault', '{keyring}/r.json')",
    ]
    for q in no_grant:
        refused("r", q)
        refused("r2", q)

    admin_only = [
        f"SELECT pg_tde_add_database_key_provider_file('r-vault', '{keyring}/r.json')",
        f"SELECT pg_tde_add_global_key_provider_file('r-vault', '{keyring}/r.json')",
        f"SELECT pg_tde_change_database_key_provider_file('file-vault', '{keyring}/keyring.json')",
        "SELECT pg_tde_delete_database_key_provider('file-vault')",
        "SELECT pg_tde_set_key_using_global_key_provider('gk', 'g')",
        "SELECT pg_tde_set_default_key_using_global_key_provider('gk', 'g')",
        "SELECT pg_tde_set_server_key_using_global_key_provider('gk', 'g')",
        "SELECT pg_tde_create_key_using_global_key_provider('rgk', 'g')",
        "SELECT pg_tde_delete_default_key()",
        "SELECT * FROM pg_tde_server_key_info()",
        "SELECT pg_tde_verify_default_key()",
    ]

    # database key management
    t.sql("SELECT pg_tde_grant_database_key_management_to_role('r')")
    t.sql("SET ROLE r; SELECT pg_tde_create_key_using_database_key_provider('rk', 'file-vault');"
          "SELECT pg_tde_set_key_using_database_key_provider('rk', 'file-vault')")
    assert t.sql("SET ROLE r; SELECT key_name || '|' || provider_name FROM pg_tde_key_info()") == "rk|file-vault"
    t.sql("SET ROLE r; SELECT pg_tde_verify_key()")
    assert t.sql("SET ROLE r; SELECT name FROM pg_tde_list_all_database_key_providers()") == "file-vault"
    assert t.sql("SET ROLE r; SELECT name FROM pg_tde_list_all_global_key_providers()") == "g"
    assert key_info(t) == "rk|file-vault"
    for q in admin_only:
        refused("r", q)
    # a bare GRANT EXECUTE does not make a key administrator
    t.sql("GRANT EXECUTE ON FUNCTION pg_tde_add_database_key_provider_file(text, text) TO r")
    refused("r", f"SELECT pg_tde_add_database_key_provider_file('r-vault', '{keyring}/r.json')", "bare GRANT EXECUTE")
    assert not (keyring / "r.json").exists()
    assert "r-vault" not in providers(t)

    # global key management; naming a keyring file also takes the right to
    # write server files, as COPY ... TO does (issue 15)
    t.sql("SELECT pg_tde_grant_global_key_management_to_role('r2')")
    refused("r2", f"SELECT pg_tde_add_database_key_provider_file('r2-vault', '{keyring}/r2.json')", "no pg_write_server_files")
    t.sql("GRANT pg_write_server_files TO r2")
    t.sql(f"SET ROLE r2; SELECT pg_tde_add_database_key_provider_file('r2-vault', '{keyring}/r2.json')")
    t.sql(f"SET ROLE r2; SELECT pg_tde_add_global_key_provider_file('r2-global', '{keyring}/r2g.json');"
          "SELECT pg_tde_create_key_using_global_key_provider('r2dk', 'r2-global');"
          "SELECT pg_tde_set_default_key_using_global_key_provider('r2dk', 'r2-global')")
    assert key_info(t, which="default_key") == "r2dk|r2-global"
    assert "r2-vault" in providers(t)
    t.sql("SET ROLE r2; SELECT pg_tde_verify_default_key()")

    # a bare GRANT EXECUTE is enough for the database-key functions
    t.sql("CREATE ROLE r3 LOGIN; GRANT EXECUTE ON FUNCTION pg_tde_key_info(), pg_tde_verify_key() TO r3")
    assert t.sql("SET ROLE r3; SELECT key_name FROM pg_tde_key_info()") == "rk"
    t.sql("SET ROLE r3; SELECT pg_tde_verify_key()")
    refused("r3", "SELECT * FROM pg_tde_list_all_database_key_providers()")

    # revoked
    t.sql("SELECT pg_tde_revoke_database_key_management_from_role('r');"
          "SELECT pg_tde_revoke_global_key_management_from_role('r2')")
    for q in no_grant + [
        "SELECT pg_tde_create_key_using_database_key_provider('rk2', 'file-vault')",
        "SELECT pg_tde_verify_key()",
        "SELECT * FROM pg_tde_list_all_database_key_providers()",
    ]:
        refused("r", q)
    for q in no_grant + [
        f"SELECT pg_tde_add_global_key_provider_file('r2-global2', '{keyring}/r2g2.json')",
        "SELECT pg_tde_set_default_key_using_global_key_provider('r2dk', 'r2-global')",
        "SELECT pg_tde_delete_database_key_provider('r2-vault')",
    ]:
        refused("r2", q)
    assert key_info(t) == "rk|file-vault"
    assert key_info(t, which="default_key") == "r2dk|r2-global"
    assert "r2-vault" in providers(t)


# ---------------------------------------------------------------------------
# 8. pg_tde.enforce_encryption


def test_enforce_encryption(tde):
    m = "MARKER_ENFORCE_PLAIN"
    tde.sql(f"CREATE TABLE old_plain (id int, v text) USING heap; INSERT INTO old_plain SELECT g, '{m}' || g FROM generate_series(1, 300) g;"
            "CREATE TABLE enc (id int, v text) USING tde_heap; INSERT INTO enc VALUES (1, 'x')")
    plain = digest(tde, "old_plain")
    on = "SET pg_tde.enforce_encryption = on; "

    e = tde.sql_error(on + "CREATE TABLE h (v text) USING heap")
    assert e.sqlstate == "0A000", e.output
    assert tde.sql("SELECT to_regclass('h') IS NULL") == "t"
    e = tde.sql_error(on + "SET default_table_access_method = heap; CREATE TABLE h2 (v text)")
    assert e.sqlstate == "0A000", e.output
    assert tde.sql("SELECT to_regclass('h2') IS NULL") == "t"

    # every other way to create a table that would not be encrypted
    for name, q in (
        ("h_temp", "CREATE TEMP TABLE h_temp (v text) USING heap"),
        ("h_ctas", "CREATE TABLE h_ctas USING heap AS SELECT 1 AS v"),
        ("h_mv", "CREATE MATERIALIZED VIEW h_mv USING heap AS SELECT 1 AS v"),
        ("h_into", "SET default_table_access_method = heap; SELECT 1 AS v INTO h_into"),
        ("h_unlogged", "CREATE UNLOGGED TABLE h_unlogged (v text) USING heap"),
    ):
        e = tde.sql_error(on + q)
        assert e.sqlstate == "0A000", f"{q}: {e.output}"
        assert tde.sql(f"SELECT to_regclass('{name}') IS NULL") == "t", name

    tde.sql(on + "CREATE TABLE t_enc (id int, v text) USING tde_heap; INSERT INTO t_enc VALUES (1, 'MARKER_ENFORCED_ENC')")
    assert tde.sql("SELECT pg_tde_is_encrypted('t_enc')") == "t"

    for table in ("t_enc", "enc"):
        e = tde.sql_error(on + f"ALTER TABLE {table} SET ACCESS METHOD heap")
        assert e.sqlstate == "0A000", e.output
        assert tde.sql(f"SELECT pg_tde_is_encrypted('{table}')") == "t"
        assert tde.sql(f"SELECT a.amname FROM pg_class c JOIN pg_am a ON a.oid = c.relam WHERE c.oid = '{table}'::regclass") == "tde_heap"

    # maintenance of a plain table that existed before still works
    node_before = tde.sql("SELECT pg_relation_filenode('old_plain')")
    tde.sql(on + "VACUUM FULL old_plain")
    assert tde.sql("SELECT pg_relation_filenode('old_plain')") != node_before
    assert digest(tde, "old_plain") == plain
    assert tde.sql("SELECT pg_tde_is_encrypted('old_plain')") == "f"

    # only a superuser may change it
    tde.sql("CREATE ROLE plainuser LOGIN")
    e = tde.sql_error("SET ROLE plainuser; SET pg_tde.enforce_encryption = off")
    assert e.sqlstate == "42501", e.output
    e = tde.sql_error("SET ROLE plainuser; SET pg_tde.enforce_encryption = on")
    assert e.sqlstate == "42501", e.output

    # set server-wide, it applies to every session
    tde.sql("ALTER SYSTEM SET pg_tde.enforce_encryption = on; SELECT pg_reload_conf()")
    deadline = time.time() + 30
    while tde.sql("SHOW pg_tde.enforce_encryption") != "on" and time.time() < deadline:
        time.sleep(0.2)
    e = tde.sql_error("CREATE TABLE h3 (v text) USING heap")
    assert e.sqlstate == "0A000", e.output
    tde.sql("CREATE TABLE t_enc2 (v text) USING tde_heap")


# ---------------------------------------------------------------------------
# 9. pg_tde.cipher


def test_cipher_per_table(tde):
    m = "MARKER_CIPHER_KIND"
    expected = {}
    for name in CIPHER_IDS:
        t = f"c_{name}"
        tde.sql(
            f"SET pg_tde.cipher = '{name}';"
            f"CREATE TABLE {t} (id int, v text) USING tde_heap;"
            f"INSERT INTO {t} SELECT g, '{m}' || g FROM generate_series(1, 1000) g;"
            f"CREATE INDEX {t}_idx ON {t} (v)"
        )
        expected[t] = digest(tde, t)
    tde.checkpoint()
    _, records = parse_keymap(keys_path(tde).read_bytes())
    by_rel = {rel: cipher for (_, rel), (cipher, _) in records.items()}
    for name, cid in CIPHER_IDS.items():
        t = f"c_{name}"
        for rel in (t, f"{t}_idx", toast_of(tde, t)):
            node = int(tde.sql(f"SELECT pg_relation_filenode('{rel}')"))
            assert node in by_rel, f"no key map record for {rel}"
            assert by_rel[node] == cid, f"{rel}: cipher {by_rel[node]}, expected {cid} ({name})"
            assert not tde.files_contain(rel, m.encode()), rel
    tde.sql("CREATE ROLE plainuser LOGIN")
    e = tde.sql_error("SET ROLE plainuser; SET pg_tde.cipher = 'aes_128'")
    assert e.sqlstate == "42501", e.output
    # the five ciphers' files differ from each other's for the same content
    pages = {tde.relation_files(f"c_{n}")[0].read_bytes()[:8192] for n in CIPHER_IDS}
    assert len(pages) == len(CIPHER_IDS)
    tde.restart()
    for t, d in expected.items():
        assert digest(tde, t) == d, t
        assert tde.sql(f"SET enable_seqscan = off; SET enable_bitmapscan = off; SELECT id FROM {t} WHERE v = '{m}432'") == "432", t
    # the cipher is a property of the key: rows added with another setting go through the table's own key
    tde.sql(f"SET pg_tde.cipher = 'aes_128'; INSERT INTO c_aes_256_xts VALUES (2000, '{m}late')")
    tde.checkpoint()
    _, records = parse_keymap(keys_path(tde).read_bytes())
    node = int(tde.sql("SELECT pg_relation_filenode('c_aes_256_xts')"))
    assert {cipher for (_, rel), (cipher, _) in records.items() if rel == node} == {4}
    assert not tde.files_contain("c_aes_256_xts", m.encode())
    tde.restart()
    assert tde.sql("SELECT count(*) FROM c_aes_256_xts") == "1001"


# ---------------------------------------------------------------------------
# 10. standby


def test_standby_follows_rotation_and_provider_change(tde, keyring):
    m = "MARKER_STANDBY_KEYS"
    expected = fill(tde, "sb_t", m)
    standby = make_standby(tde)
    try:
        assert digest(standby, "sb_t") == expected
        oid = dboid(tde)
        old = keyring / "keyring.json"
        new = keyring / "moved" / "keyring2.json"

        tde.sql("SELECT pg_tde_create_key_using_database_key_provider('k2', 'file-vault');"
                "SELECT pg_tde_set_key_using_database_key_provider('k2', 'file-vault')")
        copy_keyring(old, new)
        tde.sql(f"SELECT pg_tde_change_database_key_provider_file('file-vault', '{new}')")
        fill(tde, "sb_after", m)
        expected_after = digest(tde, "sb_after")
        wait_for_replay(tde, standby)

        p_map = (tde.datadir / "pg_tde" / f"{oid}_keys").read_bytes()
        s_map = (standby.datadir / "pg_tde" / f"{oid}_keys").read_bytes()
        assert parse_keymap(p_map)[0] == "k2"
        assert s_map == p_map, "the standby's key map differs from the primary's"
        p_prov = (tde.datadir / "pg_tde" / "providers.json").read_bytes()
        s_prov = (standby.datadir / "pg_tde" / "providers.json").read_bytes()
        assert str(new).encode() in p_prov
        assert s_prov == p_prov, "the standby's provider catalog differs from the primary's"
        assert key_info(standby) == "k2|file-vault"
        assert providers(standby) == providers(tde)
        assert digest(standby, "sb_t") == expected
        assert digest(standby, "sb_after") == expected_after

        # cold caches, and only the new keyring path can serve the keys
        standby.stop()
        old.rename(old.with_name("keyring.json.away"))
        standby.start()
        assert digest(standby, "sb_t") == expected
        assert digest(standby, "sb_after") == expected_after
        assert standby.sql(f"SET enable_seqscan = off; SET enable_bitmapscan = off; SELECT id FROM sb_t WHERE v = '{m}99'") == "99"
        standby.sql("SELECT pg_tde_verify_key()")
    finally:
        standby.destroy()
