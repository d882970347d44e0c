"""WAL tools: decrypting segments for stock pg_waldump, and the archive /
restore wrappers (point-in-time restore through them)."""

import os
import subprocess
import time
from pathlib import Path

from cluster import BIN, Cluster, as_user, make_dir, setup_encryption

TOOLS = Path(os.environ.get("PG_TDE_BIN", str(BIN)))


def encrypted_wal_cluster(name, keyring, extra=""):
    c = Cluster(name)
    c.initdb(extra_conf=extra)
    c.start()
    setup_encryption(c, keyring)
    c.sql(f"SELECT pg_tde_add_global_key_provider_file('g', '{keyring}/global.json')")
    c.sql("SELECT pg_tde_create_key_using_global_key_provider('server-key', 'g')")
    c.sql("SELECT pg_tde_set_server_key_using_global_key_provider('server-key', 'g')")
    c.stop()
    c.configure("pg_tde.wal_encrypt = on")
    c.start()
    return c


def segments(c):
    return sorted(p for p in (c.datadir / "pg_wal").iterdir() if len(p.name) == 24)


def test_decrypt_tool_makes_segments_readable_by_pg_waldump(keyring):
    c = encrypted_wal_cluster("waldecrypt", keyring)
    try:
        m = "MARKER_WALDUMP_TOOL"
        # Start a fresh segment: the first one also holds initdb's plaintext WAL.
        c.sql("SELECT pg_switch_wal()")
        c.sql(f"CREATE TABLE p (v text) USING heap; INSERT INTO p SELECT '{m}' || g FROM generate_series(1, 500) g")
        seg = Path(c.datadir / "pg_wal" / c.sql("SELECT pg_walfile_name(pg_current_wal_lsn())"))
        c.sql("SELECT pg_switch_wal()")
        assert m.encode() not in seg.read_bytes()
        stock = subprocess.run([str(BIN / "pg_waldump"), str(seg)], capture_output=True, text=True)
        assert "rmgr: Heap" not in stock.stdout, "stock pg_waldump must not read encrypted WAL"
        out = make_dir("waldump-out")
        r = subprocess.run(
            [str(TOOLS / "pg_tde_decrypt_wal"), "-D", str(c.datadir), "-o", str(out), str(seg)],
            capture_output=True,
            text=True,
        )
        assert r.returncode == 0, r.stderr
        dec = out / seg.name
        assert m.encode() in dec.read_bytes()
        dump = subprocess.run([str(BIN / "pg_waldump"), str(dec)], capture_output=True, text=True)
        assert dump.stdout.count("rmgr: Heap") >= 500, dump.stdout[-500:] + dump.stderr
    finally:
        c.destroy()


def test_archive_and_point_in_time_restore_through_wrappers(keyring):
    archive = make_dir("archive")
    os.chmod(archive, 0o777)
    # %% leaves a literal % for the wrapper to substitute in the wrapped command.
    arch_cmd = f"pg_tde_archive_decrypt %f %p \"cp %%p {archive}/%%f\""
    c = encrypted_wal_cluster(
        "walarchive", keyring, extra=f"archive_mode = on\narchive_command = '{TOOLS}/{arch_cmd}'\n"
    )
    try:
        # Base backup first (its WAL comes through the archive too).
        backup = make_dir("pitr") / "data"
        subprocess.run(
            as_user([str(BIN / "pg_basebackup"), "-h", str(c.sockdir), "-p", str(c.port), "-U", "postgres",
                      "-D", str(backup), "-X", "none", "-c", "fast"]),
            check=True, capture_output=True,
        )
        m = "MARKER_ARCHIVED"
        c.sql(f"CREATE TABLE t (v text) USING tde_heap; INSERT INTO t SELECT '{m}' || g FROM generate_series(1, 300) g")
        c.sql(f"CREATE TABLE p (v text) USING heap; INSERT INTO p SELECT '{m}' || g FROM generate_series(1, 300) g")
        last = c.sql("SELECT pg_walfile_name(pg_current_wal_lsn())")
        c.sql("SELECT pg_switch_wal()")
        deadline = time.time() + 60
        while not (archive / last).exists() and time.time() < deadline:
            time.sleep(0.5)
        assert (archive / last).exists(), c.log_tail()
        # The archive holds plaintext WAL (that is what the wrapper is for) ...
        assert m.encode() in (archive / last).read_bytes()
        # ... while the server's own pg_wal does not.
        assert not any(m.encode() in s.read_bytes() for s in segments(c))
        c.stop()

        # Restore the base backup through the re-encrypting restore wrapper.
        r = Cluster("walrestore", datadir=backup)
        r.configure(
            f"restore_command = '{TOOLS}/pg_tde_restore_encrypt %f %p \"cp {archive}/%%f %%p\"'\n"
            "archive_mode = off\n"
        )
        (backup / "recovery.signal").touch()
        subprocess.run(["chown", "postgres", str(backup / "recovery.signal")], check=True)
        r.start()
        deadline = time.time() + 60
        while r.sql("SELECT pg_is_in_recovery()") == "t" and time.time() < deadline:
            time.sleep(0.5)
        assert r.sql("SELECT count(*) FROM t WHERE v LIKE 'MARKER_ARCHIVED%'") == "300"
        assert r.sql("SELECT count(*) FROM p") == "300"
        r.checkpoint()
        # Restored segments were stored encrypted again.
        assert not any(m.encode() in s.read_bytes() for s in segments(r)), "restored WAL must be encrypted"
        assert not r.files_contain("t", m.encode())
        r.destroy()
    finally:
        c.destroy()
