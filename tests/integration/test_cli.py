"""pg_tde_change_key_provider: offline change of a provider's settings."""

import os
import shutil
import subprocess
from pathlib import Path

import pytest

TOOL = Path(os.environ.get("PG_TDE_BIN", "")) / "pg_tde_change_key_provider"


def run_tool(*args):
    return subprocess.run([str(TOOL), *args], capture_output=True, text=True)


@pytest.fixture
def moved(tde, keyring):
    """An encrypted table whose keyring file is then moved while the server is down."""
    if not TOOL.exists():
        pytest.fail(f"{TOOL} not built (scripts/test.sh builds it and sets PG_TDE_BIN)")
    tde.sql("CREATE TABLE secret (v text) USING tde_heap; INSERT INTO secret SELECT 'MARKER_CLI_' || g FROM generate_series(1, 100) g")
    tde.checkpoint()
    tde.stop()
    new_dir = keyring / "moved"
    new_dir.mkdir()
    shutil.move(str(keyring / "keyring.json"), str(new_dir / "keyring.json"))
    shutil.chown(new_dir, "postgres")
    shutil.chown(new_dir / "keyring.json", "postgres")
    return tde, new_dir / "keyring.json"


def test_refuses_running_cluster(moved):
    tde, new_path = moved
    tde.start()
    db = tde.sql("SELECT oid FROM pg_database WHERE datname = 'postgres'")
    r = run_tool("-D", str(tde.datadir), db, "file-vault", "file", str(new_path))
    assert r.returncode != 0
    assert "running" in r.stderr


def test_changes_provider_offline(moved):
    tde, new_path = moved
    tde.start()
    db = tde.sql("SELECT oid FROM pg_database WHERE datname = 'postgres'")
    # With the keyring gone, the table cannot be read (and nothing is returned).
    e = tde.sql_error("SELECT count(*) FROM secret")
    assert e.sqlstate == "38000", e.output
    tde.stop()
    before = (tde.datadir / "pg_tde" / "providers.json").read_bytes()
    # A keyring without the key in use is refused and nothing changes.
    empty = new_path.parent / "empty.json"
    r = run_tool("-D", str(tde.datadir), db, "file-vault", "file", str(empty))
    assert r.returncode != 0 and "not found" in r.stderr, r.stderr
    assert (tde.datadir / "pg_tde" / "providers.json").read_bytes() == before
    # Unknown provider / bad usage.
    assert run_tool("-D", str(tde.datadir), db, "nosuch", "file", str(new_path)).returncode != 0
    assert run_tool("-D", str(tde.datadir), db, "file-vault", "file").returncode == 2
    r = run_tool("-D", str(tde.datadir), db, "file-vault", "file", str(new_path))
    assert r.returncode == 0, r.stderr
    tde.start()
    assert tde.sql("SELECT count(*) FROM secret WHERE v LIKE 'MARKER_CLI_%'") == "100"
    assert str(new_path) in tde.sql("SELECT options::text FROM pg_tde_list_all_database_key_providers()")
    assert not tde.files_contain("secret", b"MARKER_CLI_")
