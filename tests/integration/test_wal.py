"""WAL encryption, `pg_tde.wal_encrypt` (SPEC §5, §8).

Claims that the WAL is ciphertext read the bytes of every file under pg_wal/:
a marker written into a table must be in none of them.  Each such claim has a
control that shows that the same steps do put the marker into plaintext WAL.

Design under test (pg_tde/src/wal.rs, crates/tde-core/src/wal.rs): WAL page
headers stay plaintext; a page whose body is AES-CTR encrypted carries the
flag 0x0100 in `xlp_info` (outside PostgreSQL's XLP_ALL_FLAGS).  Every writer
role (XLogWrite path, WAL receiver) takes a new WAL key on its first write
after a start, a crash restart or a promotion, and appends it, wrapped by the
WAL key-encryption key of the server key's map, to `$PGDATA/pg_tde/wal_keys`
as a 256-byte record (bytes 0..8 magic, 8..16 start LSN, 32..36 wrapped
length, 36..40 timeline, 40.. wrapped key).
"""

from __future__ import annotations

import re
import shutil
import struct
import subprocess
import time
from pathlib import Path


from cluster import BIN, Cluster, as_user, chown, pg_major, setup_encryption
from test_replication import make_standby, wait_for_replay

WAL_PAGE = 8192
SEG_SIZE = 16 * 1024 * 1024
# access/xlog_internal.h: the WAL page magic of each supported major.
XLOG_PAGE_MAGIC = {17: 0xD116, 18: 0xD118}[pg_major()]
XLP_LONG_HEADER = 0x0002
XLP_TDE_ENCRYPTED = 0x0100
KEY_RECORD = 256
KEY_MAGIC = b"PGTDEWK\x02"  # wrapped by the WAL key-encryption key
TIMEOUT = 180  # the machine is small and shared


# ---------------------------------------------------------------------------
# helpers


def add_server_key(c: Cluster, keyring: Path) -> None:
    c.sql(f"SELECT pg_tde_add_global_key_provider_file('g', '{keyring}/keyring.json')")
    c.sql("SELECT pg_tde_create_key_using_global_key_provider('server-key', 'g')")
    c.sql("SELECT pg_tde_set_server_key_using_global_key_provider('server-key', 'g')")


def set_wal_encrypt(c: Cluster, on: bool) -> None:
    """Set the (postmaster) GUC and restart; later lines of postgresql.conf win."""
    c.configure(f"pg_tde.wal_encrypt = {'on' if on else 'off'}")
    c.restart()
    assert c.sql("SHOW pg_tde.wal_encrypt") == ("on" if on else "off")


def new_cluster(clusters: list, name: str, keyring: Path, wal_encrypt: bool, extra: str = "") -> Cluster:
    """A running cluster with a principal key for `postgres` and a server key."""
    c = Cluster(name)
    clusters.append(c)
    c.initdb(extra)
    c.start()
    setup_encryption(c, keyring)
    add_server_key(c, keyring)
    if wal_encrypt:
        set_wal_encrypt(c, True)
    return c


def wal_files(c: Cluster) -> list[Path]:
    return sorted(p for p in (c.datadir / "pg_wal").rglob("*") if p.is_file())


def wal_files_with(c: Cluster, marker: str) -> list[str]:
    m = marker.encode()
    return [p.name for p in wal_files(c) if m in p.read_bytes()]


def flush_wal(c: Cluster) -> None:
    """Everything inserted so far is in the segment files."""
    c.sql("SELECT pg_switch_wal()")
    c.checkpoint()


def wal_keys_path(c: Cluster) -> Path:
    return c.datadir / "pg_tde" / "wal_keys"


def wal_keys_size(c: Cluster) -> int:
    p = wal_keys_path(c)
    return p.stat().st_size if p.exists() else 0


def key_records(c: Cluster) -> list[bytes]:
    data = wal_keys_path(c).read_bytes()
    assert len(data) % KEY_RECORD == 0, f"wal_keys is {len(data)} bytes, not whole records"
    recs = [data[i:i + KEY_RECORD] for i in range(0, len(data), KEY_RECORD)]
    for r in recs:
        assert r[:8] == KEY_MAGIC, r[:8]
    return recs


def rec_start_lsn(rec: bytes) -> int:
    return struct.unpack_from("<Q", rec, 8)[0]


def rec_wrapped(rec: bytes) -> bytes:
    n = struct.unpack_from("<I", rec, 32)[0]
    return rec[40:40 + n]


def lsn_int(text: str) -> int:
    hi, lo = text.split("/")
    return (int(hi, 16) << 32) | int(lo, 16)


def seg_name(tli: int, lsn: int) -> str:
    segno = lsn // SEG_SIZE
    per_id = 0x100000000 // SEG_SIZE
    return f"{tli:08X}{segno // per_id:08X}{segno % per_id:08X}"


def page_headers(c: Cluster, start: str, end: str, tli: int = 1):
    """(lsn, magic, xlp_info) of every WAL page from LSN `start` to `end`."""
    a, b = lsn_int(start), lsn_int(end)
    out = []
    page = a - a % WAL_PAGE
    while page <= b:
        with open(c.datadir / "pg_wal" / seg_name(tli, page), "rb") as f:
            f.seek(page % SEG_SIZE)
            magic, info = struct.unpack("<HH", f.read(4))
        out.append((page, magic, info))
        page += WAL_PAGE
    return out


def assert_pages(c: Cluster, start: str, end: str, encrypted: bool, mixed_first_page: bool = False) -> None:
    """Every WAL page in [start, end] is flagged as encrypted (or not).  With
    mixed_first_page, the first page may be flagged either way: right after
    encryption is switched off it still carries the encrypted tail of the
    previous run, which stays encrypted (the rest of the page is plaintext)."""
    hdrs = page_headers(c, start, end)
    assert hdrs
    if mixed_first_page:
        hdrs = hdrs[1:]
    for page, magic, info in hdrs:
        assert magic == XLOG_PAGE_MAGIC, f"page {page:X}: magic {magic:04X}"
        assert bool(info & XLP_TDE_ENCRYPTED) == encrypted, f"page {page:X}: xlp_info {info:04X}"


def insert_lsn(c: Cluster) -> str:
    return c.sql("SELECT pg_current_wal_insert_lsn()")


def digest(c: Cluster, table: str) -> str:
    return c.sql(f"SELECT count(*) || '/' || md5(string_agg(id || ':' || v, ',' ORDER BY id)) FROM {table}")


def pg_controldata(c: Cluster) -> dict:
    out = subprocess.run(as_user([str(BIN / "pg_controldata"), str(c.datadir)]), capture_output=True, text=True, check=True).stdout
    return {k.strip(): v.strip() for k, _, v in (line.partition(":") for line in out.splitlines())}


def wait_until(c: Cluster, query: str, want: str, timeout: float = TIMEOUT) -> None:
    deadline = time.time() + timeout
    got = None
    while time.time() < deadline:
        try:
            got = c.sql(query)
            if got == want:
                return
        except Exception as e:  # noqa: BLE001 - the server may still be starting
            got = repr(e)
        time.sleep(0.5)
    raise AssertionError(f"{query!r} gave {got!r}, not {want!r}, within {timeout} s:\n{c.log_tail()}")


# ---------------------------------------------------------------------------
# 1. the WAL on disk is ciphertext; logical decoding still sees the changes


def _write_markers(c: Cluster, marker: str, encrypted: bool) -> str:
    c.sql("CREATE TABLE w_plain (id int, v text) USING heap; CREATE TABLE w_enc (id int, v text) USING tde_heap")
    start = insert_lsn(c)
    c.sql(
        f"INSERT INTO w_plain SELECT g, '{marker}_P' || g FROM generate_series(1, 200) g;"
        f"INSERT INTO w_enc SELECT g, '{marker}_E' || g FROM generate_series(1, 200) g"
    )
    end = insert_lsn(c)
    c.checkpoint()  # flushes the WAL; the segment is still the current one
    assert_pages(c, start, end, encrypted=encrypted)
    flush_wal(c)
    return start


def test_control_plaintext_wal_shows_the_marker(clusters, keyring):
    """Control: the same steps with wal_encrypt = off leave the marker in pg_wal."""
    c = new_cluster(clusters, "wal-off", keyring, wal_encrypt=False)
    assert c.sql("SHOW pg_tde.wal_encrypt") == "off"
    m = "MARKER_WAL_CONTROL_k7"
    _write_markers(c, m, encrypted=False)
    assert wal_files_with(c, m + "_P"), "control: the heap marker is in plaintext WAL"
    assert wal_files_with(c, m + "_E"), "control: tde_heap encrypts pages, not the WAL records"
    assert not wal_keys_path(c).exists() or wal_keys_size(c) == 0


def test_encrypted_wal_hides_the_marker(clusters, keyring):
    c = new_cluster(clusters, "wal-on", keyring, wal_encrypt=True, extra="wal_keep_size = '1GB'\n")
    m = "MARKER_WAL_ENC_q3"
    _write_markers(c, m, encrypted=True)
    assert digest(c, "w_plain").startswith("200/") and digest(c, "w_enc").startswith("200/")
    found = wal_files_with(c, m)
    assert not found, f"marker in WAL files {found}"
    recs = key_records(c)
    assert len(recs) >= 1
    # the page headers stay readable: the first page of the segment that
    # pg_switch_wal() began (written entirely with encryption on) has a long
    # header with the segment's own address
    cur = lsn_int(insert_lsn(c))
    seg = c.datadir / "pg_wal" / seg_name(1, cur)
    hdr = seg.read_bytes()[:16]
    magic, info, tli, pageaddr = struct.unpack("<HHIQ", hdr)
    assert magic == XLOG_PAGE_MAGIC and info & XLP_LONG_HEADER and info & XLP_TDE_ENCRYPTED and tli == 1, hex(info)
    assert pageaddr == cur - cur % SEG_SIZE
    # and it all reads back after a restart (recovery of nothing, but the
    # shutdown checkpoint record is read back through the WAL key)
    before = digest(c, "w_enc")
    c.restart()
    assert digest(c, "w_enc") == before


def test_logical_decoding_of_encrypted_wal(clusters, keyring):
    c = new_cluster(clusters, "wal-logical", keyring, wal_encrypt=True, extra="wal_level = logical\n")
    assert c.sql("SHOW wal_level") == "logical"
    c.sql("CREATE TABLE ld_plain (id int, v text) USING heap; CREATE TABLE ld_enc (id int, v text) USING tde_heap")
    c.sql("SELECT pg_create_logical_replication_slot('s', 'test_decoding')")
    m = "MARKER_WAL_LOGICAL_z9"
    start = insert_lsn(c)
    c.sql(f"INSERT INTO ld_plain VALUES (1, '{m}_P'); INSERT INTO ld_enc VALUES (2, '{m}_E')")
    end = insert_lsn(c)
    c.checkpoint()
    assert_pages(c, start, end, encrypted=True)
    flush_wal(c)
    assert not wal_files_with(c, m), "marker in the WAL files"
    # decoding reads the WAL back through the read hook (WALRead)
    out = c.sql("SELECT data FROM pg_logical_slot_get_changes('s', NULL, NULL)")
    assert f"table public.ld_plain: INSERT: id[integer]:1 v[text]:'{m}_P'" in out, out
    assert f"table public.ld_enc: INSERT: id[integer]:2 v[text]:'{m}_E'" in out, out
    # after a restart too (a new WAL key; the old segments use the old one)
    c.restart()
    c.sql(f"INSERT INTO ld_plain VALUES (3, '{m}_again')")
    out = c.sql("SELECT data FROM pg_logical_slot_get_changes('s', NULL, NULL)")
    assert f"v[text]:'{m}_again'" in out, out
    flush_wal(c)
    assert not wal_files_with(c, m)


# ---------------------------------------------------------------------------
# 2. crash recovery


def test_kill9_under_load_with_encrypted_wal(clusters, keyring, tmp_path):
    c = new_cluster(clusters, "wal-crash", keyring, wal_encrypt=True)
    m = "MARKER_WAL_CRASH_t5"
    c.sql(
        "CREATE TABLE load_t (id int NOT NULL, v text) USING heap;"
        "CREATE TABLE load_e (id int NOT NULL, v text) USING tde_heap;"
        "CREATE PROCEDURE load(n int) LANGUAGE plpgsql AS $$\n"
        "BEGIN\n"
        "  FOR i IN 1..n LOOP\n"
        f"    INSERT INTO load_t VALUES (i, '{m}' || i || repeat('z', 100));\n"
        f"    INSERT INTO load_e VALUES (i, '{m}' || i || repeat('z', 100));\n"
        "    COMMIT;\n"
        "    RAISE NOTICE 'committed %', i;\n"
        "  END LOOP;\n"
        "END $$"
    )
    err_path = tmp_path / "load.err"
    with open(tmp_path / "load.out", "w") as out, open(err_path, "w") as err:
        load = subprocess.Popen(c.psql_args() + ["-c", "CALL load(100000000)"], stdin=subprocess.DEVNULL, stdout=out, stderr=err)
        try:
            time.sleep(2)
            c.checkpoint()
            # rows committed from here on exist only in the (encrypted) WAL
            time.sleep(2)
            assert load.poll() is None, f"the load stopped early: {err_path.read_text()[-2000:]}"
            keys_before = wal_keys_size(c)
            c.kill9()
            load.wait(timeout=60)
        finally:
            if load.poll() is None:
                load.kill()
                load.wait()
    committed = [int(x) for x in re.findall(r"committed (\d+)", err_path.read_text())]
    assert len(committed) > 20, f"too few commits before the crash: {err_path.read_text()[-2000:]}"
    assert committed == list(range(1, len(committed) + 1))
    assert keys_before > 0 and keys_before % KEY_RECORD == 0

    c.start()
    log = c.logfile.read_text(errors="replace")
    assert "database system was interrupted" in log or "not properly shut down" in log
    assert "redo starts at" in log

    for t in ("load_t", "load_e"):
        ids = [int(x) for x in c.sql(f"SELECT id FROM {t} ORDER BY id").split()]
        missing = sorted(set(committed) - set(ids))
        assert not missing, f"{t}: {len(missing)} committed rows lost, first {missing[:10]}"
        assert ids == list(range(1, len(ids) + 1)), t
        assert len(ids) - len(committed) <= 1, t
        assert c.sql(f"SELECT count(*) FROM {t} WHERE v <> '{m}' || id || repeat('z', 100)") == "0"

    # the restarted server writes with a new WAL key: exactly one more record
    c.sql(f"INSERT INTO load_t VALUES (0, '{m}after')")
    assert wal_keys_size(c) == keys_before + KEY_RECORD, (keys_before, wal_keys_size(c))
    recs = key_records(c)
    assert rec_start_lsn(recs[-1]) > rec_start_lsn(recs[-2])
    assert rec_wrapped(recs[-1]) != rec_wrapped(recs[-2])
    flush_wal(c)
    found = wal_files_with(c, m)
    assert not found, f"marker in WAL files {found}"


# ---------------------------------------------------------------------------
# 3. toggling, and recovery of a base backup across the mixed stream


def test_toggle_and_restore_backup_across_mixed_wal(clusters, keyring):
    p = new_cluster(clusters, "wal-toggle", keyring, wal_encrypt=False, extra="wal_keep_size = '1GB'\n")
    p.sql("CREATE TABLE tog_plain (id int, v text) USING heap; CREATE TABLE tog_enc (id int, v text) USING tde_heap")
    p.sql("INSERT INTO tog_plain VALUES (0, 'before backup'); INSERT INTO tog_enc VALUES (0, 'before backup')")

    # the base backup, taken before the first toggle
    b = Cluster("wal-toggle-backup")
    clusters.append(b)
    r = subprocess.run(
        as_user([str(BIN / "pg_basebackup"), "-D", str(b.datadir), "-X", "stream", "-c", "fast",
                  "-h", str(p.sockdir), "-p", str(p.port), "-U", "postgres"]),
        capture_output=True, text=True,
    )
    assert r.returncode == 0, r.stderr
    # -X stream worked: the backup has its WAL and verifies (pg_verifybackup
    # parses that WAL with pg_waldump)
    assert (b.datadir / "backup_label").exists()
    assert [f for f in (b.datadir / "pg_wal").iterdir() if re.fullmatch(r"[0-9A-F]{24}", f.name)]
    r = subprocess.run(as_user([str(BIN / "pg_verifybackup"), str(b.datadir)]), capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr

    markers = {"A": "TOGGLE_A_PLAIN_r1", "B": "TOGGLE_B_ENC_r2", "C": "TOGGLE_C_PLAIN_r3", "D": "TOGGLE_D_ENC_r4"}
    phases = [("A", False), ("B", True), ("C", False), ("D", True)]
    done = []
    for i, (phase, on) in enumerate(phases):
        if i > 0:
            set_wal_encrypt(p, on)
        m = markers[phase]
        start = insert_lsn(p)
        p.sql(
            f"INSERT INTO tog_plain SELECT {i + 1} * 1000 + g, '{m}' || g FROM generate_series(1, 50) g;"
            f"INSERT INTO tog_enc SELECT {i + 1} * 1000 + g, '{m}' || g FROM generate_series(1, 50) g"
        )
        end = insert_lsn(p)
        p.checkpoint()
        done.append(phase)
        assert_pages(p, start, end, encrypted=on, mixed_first_page=not on and i > 0)
        if on:
            assert not wal_files_with(p, m), f"phase {phase}: marker in WAL"
        else:
            assert wal_files_with(p, m), f"control, phase {phase}: the marker is in plaintext WAL"
        # (whether what was written while encryption was on stays encrypted
        # after it is switched off: test_switching_off_keeps_encrypted_wal_encrypted)
        for t in ("tog_plain", "tog_enc"):
            for ph in done:
                assert p.sql(f"SELECT count(*) FROM {t} WHERE v LIKE '{markers[ph]}%'") == "50", (t, ph)
    # all rows readable after yet another restart, too
    p.restart()
    expected = {t: digest(p, t) for t in ("tog_plain", "tog_enc")}
    assert expected["tog_plain"].startswith("201/")
    p.stop()

    # Recover the backup from the primary's pg_wal as an archive.  WAL keys are
    # local to the server that wrote them (not WAL-logged, not in the backup
    # when they were created after it), so the backup needs the primary's
    # pg_tde/wal_keys to read the segments written with them.
    src = wal_keys_path(p)
    # one key per start with encryption on (phases B and D and the final
    # restart), and one null-key record where it was switched off after having
    # been on (phase C): plaintext from there on
    assert src.exists() and src.stat().st_size == 4 * KEY_RECORD
    dst = wal_keys_path(b)
    shutil.copy2(src, dst)
    chown(dst)
    (b.datadir / "recovery.signal").touch()
    chown(b.datadir / "recovery.signal")
    b.configure(f"restore_command = 'cp {p.datadir}/pg_wal/%f %p'\nrecovery_target_action = 'promote'\n")
    b.start()
    wait_until(b, "SELECT pg_is_in_recovery()", "f")
    for t in ("tog_plain", "tog_enc"):
        assert digest(b, t) == expected[t], t
        for ph, m in markers.items():
            assert b.sql(f"SELECT count(*) FROM {t} WHERE v LIKE '{m}%'") == "50", (t, ph)
    log = b.logfile.read_text(errors="replace")
    assert "restored log file" in log, "the backup did not replay the archive"


def test_switching_off_keeps_encrypted_wal_encrypted(clusters, keyring):
    """SPEC §4: records written before a switch "stay as written"; WAL written
    while encryption was on must not turn into plaintext when it is switched off."""
    c = new_cluster(clusters, "wal-off-again", keyring, wal_encrypt=True, extra="wal_keep_size = '1GB'\n")
    c.sql("CREATE TABLE t (id int, v text) USING heap")
    m = "MARKER_WAL_ON_THEN_OFF_w2"
    c.sql(f"INSERT INTO t VALUES (1, '{m}')")
    c.checkpoint()
    assert not wal_files_with(c, m)
    # a clean shutdown: the shutdown checkpoint record follows the insert,
    # on the same (partially filled) WAL page
    set_wal_encrypt(c, False)
    # Write to another table: touching t's page again would log a full-page
    # image of it (marker included) in the now-plaintext WAL, legitimately.
    c.sql("CREATE TABLE u (v text) USING heap; INSERT INTO u VALUES ('after')")
    c.checkpoint()
    assert c.sql("SELECT v FROM t ORDER BY id") == m
    assert c.sql("SELECT v FROM u") == "after"
    assert wal_files_with(c, "after"), "control: WAL written with encryption off is plaintext"
    found = wal_files_with(c, m)
    assert not found, f"marker written while wal_encrypt was on is now in plaintext in {found}"


# ---------------------------------------------------------------------------
# 4. streaming standbys, promotion, following the new timeline


def test_streaming_standby_promotion_and_timeline_follow(clusters, keyring):
    # wal_keep_size (copied to the standbys with postgresql.conf): the second
    # standby switches to the promoted node later and needs its old segments
    p = new_cluster(clusters, "wal-primary", keyring, wal_encrypt=True, extra="wal_keep_size = '1GB'\n")
    p.sql("CREATE TABLE s_plain (id int, v text) USING heap; CREATE TABLE s_enc (id int, v text) USING tde_heap")
    # Markers are written only once the standbys stream: pg_basebackup -X stream
    # writes the backup's WAL itself, in plaintext (a client, not a server
    # process), from the start of the segment that holds the backup's start.
    s1 = make_standby(p)
    clusters.append(s1)
    s2 = make_standby(p)
    clusters.append(s2)
    for s in (s1, s2):
        assert s.sql("SHOW pg_tde.wal_encrypt") == "on"

    m = "MARKER_WAL_STANDBY_h4"
    p.sql(
        f"INSERT INTO s_plain SELECT g, '{m}' || g FROM generate_series(1, 500) g;"
        f"INSERT INTO s_enc SELECT g, '{m}' || g FROM generate_series(1, 500) g"
    )
    flush_wal(p)
    for s in (s1, s2):
        wait_for_replay(p, s)
        for t in ("s_plain", "s_enc"):
            assert digest(s, t) == digest(p, t), t
        s.checkpoint()
        found = wal_files_with(s, m)
        assert not found, f"marker in the standby's WAL files {found}"
    assert not wal_files_with(p, m)
    # each standby's receiver took its own key, appended to the copied file
    assert key_records(s1)[-1] not in key_records(p)
    assert key_records(s2)[-1] not in key_records(p)

    # promote s1
    expected = digest(p, "s_enc")
    p.stop()
    assert s1.sql("SELECT pg_promote(true, 120)") == "t"
    assert s1.sql("SELECT pg_is_in_recovery()") == "f"
    assert digest(s1, "s_enc") == expected
    m2 = "MARKER_WAL_PROMOTED_j8"
    s1.sql(
        f"INSERT INTO s_plain SELECT g, '{m2}' || g FROM generate_series(1001, 1300) g;"
        f"INSERT INTO s_enc SELECT g, '{m2}' || g FROM generate_series(1001, 1300) g"
    )
    assert s1.sql(f"SELECT count(*) FROM s_enc WHERE v LIKE '{m2}%'") == "300"
    flush_wal(s1)
    assert s1.sql("SELECT timeline_id FROM pg_control_checkpoint()") == "2"
    for mk in (m, m2):
        found = wal_files_with(s1, mk)
        assert not found, f"{mk} in the promoted node's WAL files {found}"

    # s2 follows the promoted node onto timeline 2 (recovery_target_timeline
    # defaults to 'latest'); primary_conninfo is reloadable
    s2.sql(f"ALTER SYSTEM SET primary_conninfo = 'host={s1.sockdir} port={s1.port} user=postgres'; SELECT pg_reload_conf()")
    wait_until(s2, "SELECT received_tli FROM pg_stat_wal_receiver WHERE status = 'streaming'", "2")
    wait_for_replay(s1, s2)
    for t in ("s_plain", "s_enc"):
        assert digest(s2, t) == digest(s1, t), t
    assert s2.sql(f"SELECT count(*) FROM s_plain WHERE v LIKE '{m2}%'") == "300"
    s2.checkpoint()
    for mk in (m, m2):
        found = wal_files_with(s2, mk)
        assert not found, f"{mk} in the second standby's WAL files {found}"
    # and the second standby survives a crash (its local WAL read back with
    # its own keys; its receiver takes a new one)
    n = len(key_records(s2))
    s2.kill9()
    s2.start()
    s1.sql(f"INSERT INTO s_enc VALUES (5000, '{m2}late')")
    wait_for_replay(s1, s2)
    assert digest(s2, "s_enc") == digest(s1, "s_enc")
    assert len(key_records(s2)) == n + 1
    s2.checkpoint()
    assert not wal_files_with(s2, m2)


def _basebackup(p: Cluster, name: str, wal_method: str) -> Cluster:
    b = Cluster(name)
    r = subprocess.run(
        as_user([str(BIN / "pg_basebackup"), "-D", str(b.datadir), "-X", wal_method, "-c", "fast",
                  "-h", str(p.sockdir), "-p", str(p.port), "-U", "postgres"]),
        capture_output=True, text=True,
    )
    assert r.returncode == 0, r.stderr
    b.configure("")
    return b


def test_fetch_backup_of_encrypted_server(clusters, keyring):
    """-X fetch: the server sends its segment files as they are (encrypted) and
    the backup's pg_tde/wal_keys, copied with the data, reads them."""
    p = new_cluster(clusters, "wal-fetch", keyring, wal_encrypt=True)
    m = "MARKER_WAL_FETCH_n6"
    p.sql(f"CREATE TABLE f (id int, v text) USING heap; INSERT INTO f SELECT g, '{m}' || g FROM generate_series(1, 300) g")
    b = _basebackup(p, "wal-fetch-backup", "fetch")
    clusters.append(b)
    found = wal_files_with(b, m)
    assert not found, f"marker in the backup's WAL {found}"
    p.sql(f"INSERT INTO f VALUES (1000, '{m}late')")
    b.start()
    assert b.sql("SELECT count(*) FROM f") == "300"
    b.sql(f"INSERT INTO f VALUES (2000, '{m}restored')")
    flush_wal(b)
    assert not wal_files_with(b, m)


def _backup_under_load(p: Cluster, name: str, marker: str, tool: str, wal_method: str) -> Cluster:
    """A base backup taken while rows with `marker` are committed, a few a second."""
    p.sql(
        "CREATE TABLE IF NOT EXISTS f (id int, v text) USING heap;"
        "CREATE OR REPLACE PROCEDURE ins(m text) LANGUAGE plpgsql AS $$\n"
        "BEGIN\n"
        "  FOR i IN 1..100000 LOOP\n"
        "    INSERT INTO f VALUES (i, m || i); COMMIT; PERFORM pg_sleep(0.02);\n"
        "  END LOOP;\n"
        "END $$"
    )
    load = subprocess.Popen(p.psql_args() + ["-c", f"CALL ins('{marker}')"], stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(1)
        b = Cluster(name)
        r = subprocess.run(
            as_user([str(tool), "-D", str(b.datadir), "-X", wal_method, "-c", "fast", "-r", "8M",
                     "-h", str(p.sockdir), "-p", str(p.port), "-U", "postgres"]),
            capture_output=True, text=True,
        )
        assert r.returncode == 0, r.stderr
    finally:
        load.kill()
        load.wait()
    return b


def test_control_stock_stream_backup_writes_plaintext_wal(clusters, keyring):
    """Control: stock pg_basebackup -X stream writes the WAL it streams (a
    client, outside pg_tde) in plaintext, which is why pg_tde_basebackup exists."""
    p = new_cluster(clusters, "wal-stream-ctl", keyring, wal_encrypt=True)
    m = "MARKER_WAL_STREAMBK_ctl"
    b = _backup_under_load(p, "wal-stream-ctl-backup", m, BIN / "pg_basebackup", "stream")
    clusters.append(b)
    assert wal_files_with(b, m), "the marker detection saw nothing"


def test_stream_backup_of_encrypted_server_holds_no_plaintext_wal(clusters, keyring, tmp_path):
    """pg_tde_basebackup -X stream: the stock pg_basebackup fetching the
    server's encrypted segments, with the WAL held by a temporary slot."""
    tools = Path(__import__("os").environ.get("PG_TDE_BIN", str(BIN)))
    p = new_cluster(clusters, "wal-stream", keyring, wal_encrypt=True)
    m = "MARKER_WAL_STREAMBK_p1"
    b = _backup_under_load(p, "wal-stream-backup", m, tools / "pg_tde_basebackup", "stream")
    clusters.append(b)
    # the slot went with the wrapper's session
    assert p.sql("SELECT count(*) FROM pg_replication_slots") == "0"
    p.checkpoint()
    assert not wal_files_with(p, m), "marker in the primary's WAL"
    found = wal_files_with(b, m)
    assert not found, f"marker (written with wal_encrypt = on, during the backup) in the backup's WAL {found}"
    # the backup starts, recovers through its encrypted WAL and has the rows
    b.configure("")
    b.start()
    assert int(b.sql(f"SELECT count(*) FROM f WHERE v LIKE '{m}%'")) > 0


# ---------------------------------------------------------------------------
# 5. stock pg_waldump cannot read encrypted segments


def test_stock_pg_waldump_refuses_encrypted_segments(clusters, keyring):
    c = new_cluster(clusters, "wal-dump", keyring, wal_encrypt=False, extra="wal_keep_size = '1GB'\n")
    c.sql("CREATE TABLE d (id int, v text) USING heap; INSERT INTO d SELECT g, 'x' || g FROM generate_series(1, 100) g")
    plain_seg = c.sql("SELECT pg_walfile_name(pg_current_wal_insert_lsn())")
    c.sql("SELECT pg_switch_wal()")
    set_wal_encrypt(c, True)
    c.sql("SELECT pg_switch_wal()")  # start a segment written entirely while encrypted
    enc_seg = c.sql("SELECT pg_walfile_name(pg_current_wal_insert_lsn())")
    c.sql("INSERT INTO d SELECT g, 'y' || g FROM generate_series(1, 2000) g")
    c.sql("SELECT pg_switch_wal()")
    c.checkpoint()
    assert enc_seg != plain_seg

    def waldump(seg: str):
        return subprocess.run(
            as_user([str(BIN / "pg_waldump"), "-p", str(c.datadir / "pg_wal"), seg, seg]),
            capture_output=True, text=True,
        )

    # control: the same tool reads a segment written before encryption
    r = waldump(plain_seg)
    assert "rmgr: Heap" in r.stdout and "INSERT" in r.stdout, r.stdout[-2000:] + r.stderr
    assert "invalid info bits" not in r.stderr

    r = waldump(enc_seg)
    assert "rmgr: Heap" not in r.stdout, r.stdout[-2000:]
    assert r.returncode != 0, r.stdout[-2000:] + r.stderr
    assert re.search(r"invalid info bits|invalid record|could not find a valid record", r.stderr), r.stderr


# ---------------------------------------------------------------------------
# 6. a new WAL key per start: no (key, counter) reuse across restarts


def _page_at(c: Cluster, tli: int, lsn: int) -> bytes:
    with open(c.datadir / "pg_wal" / seg_name(tli, lsn), "rb") as f:
        f.seek(lsn % SEG_SIZE - lsn % WAL_PAGE)
        return f.read(WAL_PAGE)


def test_new_wal_key_per_start(clusters, keyring):
    c = new_cluster(clusters, "wal-keys", keyring, wal_encrypt=True, extra="wal_keep_size = '1GB'\n")
    c.sql("CREATE TABLE k (id int, v text) USING heap")

    def write(n):
        # more than a WAL page per session, so that each start begins on a new page
        c.sql("INSERT INTO k SELECT g, repeat('k', 100) FROM generate_series(1, 300) g")

    write(0)
    n0 = len(key_records(c))
    assert n0 >= 1
    compared = 0
    for i in range(1, 4):
        c.stop()
        ctl = pg_controldata(c)
        ckpt = lsn_int(ctl["Latest checkpoint location"])
        tli = int(ctl["Latest checkpoint's TimeLineID"])
        old_page = _page_at(c, tli, ckpt)
        c.start()
        write(i)
        c.checkpoint()
        assert len(key_records(c)) == n0 + i, f"start {i}: {len(key_records(c))} key records, expected {n0 + i}"
        # The page that holds the shutdown checkpoint is written again by the
        # next start.  Its durable prefix (up to the end of the checkpoint
        # record) keeps its bytes under the old key -- the same plaintext at the
        # same position, so no keystream is reused, and a lost or torn rewrite
        # cannot make it unreadable -- and the new key starts exactly after it,
        # where the old run wrote only zeros (never its keystream).
        new_page = _page_at(c, tli, ckpt)
        new_start = rec_start_lsn(key_records(c)[-1])
        page_start = ckpt - ckpt % WAL_PAGE
        hdr = 40 if (ckpt % SEG_SIZE) < WAL_PAGE else 24
        assert old_page[:2] == new_page[:2] and old_page[8:16] == new_page[8:16], "not the same WAL page"
        for pg in (old_page, new_page):
            assert struct.unpack_from("<H", pg, 2)[0] & XLP_TDE_ENCRYPTED
        if ckpt < new_start < page_start + WAL_PAGE:
            cut = new_start - page_start
            assert old_page[hdr:cut] == new_page[hdr:cut], f"start {i}: the durable prefix changed"
            assert old_page[cut:] == bytes(WAL_PAGE - cut), f"start {i}: the old run wrote past its end"
            assert new_page[cut:cut + 64] != bytes(64), f"start {i}: nothing new after the boundary"
            compared += 1
    print("rewritten pages compared:", compared)
    assert compared >= 1, "no shutdown checkpoint landed where the rewrite could be compared"
    recs = key_records(c)
    starts = [rec_start_lsn(r) for r in recs]
    assert starts == sorted(starts) and len(set(starts)) == len(starts), [hex(s) for s in starts]
    wrapped = [rec_wrapped(r) for r in recs]
    assert len(set(wrapped)) == len(wrapped)
    assert all(len(w) >= 16 + 16 for w in wrapped)
    assert c.sql("SELECT count(*) FROM k") == "1200"


# ---------------------------------------------------------------------------
# 7. the rewrite of the last, partially filled page under a new key


def _lost_rewrite_of_last_page(clusters, keyring, wal_encrypt: bool) -> Cluster:
    """Simulate a power loss right after a restarted server wrote its first WAL
    page: the rewrite of the partially filled last page of the previous run
    has not reached the disk, everything fsynced before it has (for pg_tde:
    the new WAL key's record, fsynced before the key is used).

    The page's prefix holds records the previous run made durable (here its
    shutdown checkpoint, the one pg_control points to); the server must find
    them whatever became of the unflushed rewrite.  Stock PostgreSQL rewrites
    the prefix with identical bytes, so either version of the page works."""
    c = new_cluster(clusters, "wal-lostpage", keyring, wal_encrypt=wal_encrypt)
    c.sql("CREATE TABLE t (id int, v text) USING heap; INSERT INTO t VALUES (1, 'durable')")
    c.stop()
    ckpt = lsn_int(pg_controldata(c)["Latest checkpoint location"])
    before = {p.name: p.read_bytes() for p in wal_files(c) if re.fullmatch(r"[0-9A-F]{24}", p.name)}
    keys_before = wal_keys_size(c)
    c.start()
    c.sql("INSERT INTO t VALUES (2, 'not acknowledged in the simulated crash')")
    if wal_encrypt:
        recs = key_records(c)
        assert wal_keys_size(c) == keys_before + KEY_RECORD
        page = rec_start_lsn(recs[-1])  # the first page the new run wrote
        assert page <= ckpt + 200, (hex(page), hex(ckpt))
    else:
        page = ckpt - ckpt % WAL_PAGE
    c.kill9()
    name = seg_name(1, page)
    off = page % SEG_SIZE
    old = before[name][off:off + WAL_PAGE]
    with open(c.datadir / "pg_wal" / name, "r+b") as f:
        f.seek(off)
        f.write(old)
    return c


def test_control_lost_rewrite_of_last_page_plaintext(clusters, keyring):
    c = _lost_rewrite_of_last_page(clusters, keyring, wal_encrypt=False)
    assert c.start(expect_fail=True), c.log_tail(8)
    assert c.sql("SELECT v FROM t WHERE id = 1") == "durable"


def test_lost_rewrite_of_last_page_encrypted(clusters, keyring):
    c = _lost_rewrite_of_last_page(clusters, keyring, wal_encrypt=True)
    assert c.start(expect_fail=True), c.log_tail(8)
    assert c.sql("SELECT v FROM t WHERE id = 1") == "durable"
