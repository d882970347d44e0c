"""PostgreSQL 18's asynchronous reads of encrypted pages, under every io_method.

18 reads buffers through smgr_startreadv and completes the read in AIO callbacks
(in an I/O worker with io_method=worker, the issuing or any waiting backend with
io_uring, the issuing backend with sync), verifying checksums there.  pg_tde
decrypts in a completion callback of its own.  Each test runs under worker, sync
and io_uring (skipped, saying why, when the kernel refuses io_uring), with data
checksums on and off, whatever configuration the rest of the suite runs under.
"""

from __future__ import annotations

import pytest

from cluster import Cluster, make_keyring_dir, pg_major, setup_encryption

import io_uring_probe  # noqa: E402  (scripts/, put on the path by cluster)

pytestmark = pytest.mark.skipif(pg_major() < 18, reason="asynchronous reads are PostgreSQL 18's")


CONFIGS = [
    pytest.param((io, checksums), id=f"{io}-checksums-{'on' if checksums else 'off'}")
    for io in ("worker", "sync", "io_uring")
    for checksums in (True, False)
]


@pytest.fixture(params=CONFIGS)
def aio(request):
    io_method, checksums = request.param
    if io_method == "io_uring":
        why = io_uring_probe.refusal()
        if why:
            pytest.skip(f"io_method=io_uring: this kernel refuses io_uring_setup ({why})")
    c = Cluster(f"aio-{io_method}-{int(checksums)}")
    # Small shared and temp buffers, so that tables are read back from disk, but
    # enough pins per backend (shared_buffers / process slots) for read streams
    # to combine blocks.
    c.initdb(
        extra_conf="shared_buffers = 16MB\nmax_connections = 20\ntemp_buffers = 800kB\n",
        checksums=checksums,
        io_method=io_method,
    )
    c.start()
    setup_encryption(c, make_keyring_dir())
    assert c.sql("SHOW io_method") == io_method
    assert c.sql("SHOW data_checksums") == ("on" if checksums else "off")
    yield c
    c.destroy()


MARKER = "AIO_PLAINTEXT_MARKER"


def test_large_scan_reads_ahead_and_decrypts_every_block(aio):
    """A sequential scan of a table far larger than shared_buffers goes through
    read streams that combine up to io_combine_limit blocks into one read: every
    block of a multi-block read must be decrypted with its own block number."""
    aio.sql(
        "CREATE TABLE big (id int, pad text) USING tde_heap;"
        f"INSERT INTO big SELECT g, '{MARKER}' || repeat(md5(g::text), 6) FROM generate_series(1, 300000) g;"
    )
    aio.checkpoint()
    nblocks = int(aio.sql("SELECT pg_relation_size('big') / 8192"))
    assert nblocks > 4 * 2048, "the table must be much larger than shared_buffers"
    assert not aio.files_contain("big", MARKER.encode()), "plaintext in the table's files"
    aio.restart()
    aio.sql("SELECT pg_stat_reset_shared('io')")
    counts = aio.sql("SELECT count(*), sum(id), sum(length(pad)) FROM big")
    assert counts == f"300000|{300000 * 300001 // 2}|{300000 * (len(MARKER) + 192)}"
    # The scanning backend has exited, which flushed its I/O statistics.
    stats = aio.sql("SELECT sum(reads), sum(read_bytes) FROM pg_stat_io WHERE object = 'relation' AND reads > 0")
    reads, read_bytes = (int(x) for x in stats.split("|"))
    assert read_bytes >= nblocks * 8192 // 2, f"the scan did not read the table from disk: {stats}"
    assert read_bytes / reads > 8192, f"no multi-block reads (read streams combine blocks): {stats}"


def test_index_scan_after_restart(aio):
    """Random single-block reads through an index, after a restart empties the buffers."""
    aio.sql(
        "CREATE TABLE t (id int PRIMARY KEY, v text) USING tde_heap;"
        "INSERT INTO t SELECT g, md5(g::text) FROM generate_series(1, 40000) g;"
    )
    aio.checkpoint()
    aio.restart()
    out = aio.sql("SET enable_seqscan = off; SELECT count(*) FROM t WHERE id % 997 = 3 AND v = md5(id::text)")
    assert out == str(len([i for i in range(1, 40001) if i % 997 == 3]))


def test_temporary_table_read_back_from_disk(aio):
    """Temporary tables live in local buffers and complete their reads in their own
    backend; a table larger than temp_buffers is evicted to disk and read back."""
    out = aio.sql(
        "CREATE TEMP TABLE tt (id int, pad text) USING tde_heap;"
        f"INSERT INTO tt SELECT g, '{MARKER}' || repeat('x', 200) FROM generate_series(1, 20000) g;"
        "SELECT pg_relation_size('tt') / 8192;"
        "SELECT count(*), sum(id) FROM tt;"
        # The file on disk, read in the same session (temporary tables die with it).
        f"SELECT position(convert_to('{MARKER}', 'UTF8') IN pg_read_binary_file(pg_relation_filepath('tt')));"
        "SELECT pg_tde_is_encrypted('tt');"
    )
    nblocks, counts, position, encrypted = out.splitlines()
    assert int(nblocks) > 2 * 100, "the temporary table must not fit in temp_buffers (100 buffers)"
    assert counts == f"20000|{20000 * 20001 // 2}"
    assert position == "0", "plaintext in the temporary table's file"
    assert encrypted == "t"


def test_wrong_key_is_data_corrupted(aio):
    """Pages decrypted with another file's key must fail the buffer manager's
    verification with data_corrupted, never be accepted as a page of garbage."""
    aio.sql(
        "CREATE TABLE a (id int, v text) USING tde_heap;"
        "CREATE TABLE b (id int, v text) USING tde_heap;"
        "INSERT INTO a SELECT g, md5(g::text) FROM generate_series(1, 3000) g;"
        "INSERT INTO b SELECT g, md5(g::text) FROM generate_series(1, 3000) g;"
    )
    aio.checkpoint()
    fa = aio.datadir / aio.sql("SELECT pg_relation_filepath('a')")
    fb = aio.datadir / aio.sql("SELECT pg_relation_filepath('b')")
    aio.stop()
    assert fa.stat().st_size == fb.stat().st_size
    # b's file now holds pages encrypted under a's key.
    fb.write_bytes(fa.read_bytes())
    aio.start()
    err = aio.sql_error("SELECT count(*) FROM b")
    assert err.sqlstate == "XX001", f"expected data_corrupted, got {err.sqlstate}: {err.output}"
    assert "invalid page" in err.message or "checksum" in err.message, err.output
    # The other table is untouched, and the server is still up.
    assert aio.sql("SELECT count(*) FROM a") == "3000"
