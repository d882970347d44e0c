"""A small harness that runs real PostgreSQL clusters for the integration tests.

Clusters run as an unprivileged OS user (initdb and postgres refuse root), listen
only on a Unix socket in their own directory, and are stopped by `stop()` or at
the end of the test session.  Paths come from the environment that
scripts/common.sh sets up: PG_PREFIX (the patched PostgreSQL) and PG_TDE_OS_USER.
"""

from __future__ import annotations

import functools
import glob
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# The OS-user helpers are shared with the benchmark script.
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
from run_as import as_user, chown  # noqa: E402

PG_PREFIX = Path(os.environ.get("PG_PREFIX", ""))
BIN = PG_PREFIX / "bin"
ROOT = Path(os.environ.get("PG_TDE_TEST_ROOT", "/var/tmp/pg_tde-tests"))
# The configuration scripts/test.sh runs the whole suite under: io_method
# (PostgreSQL 18 and later; unset means the server's default) and whether
# initdb turns data checksums on (tests that need one or the other say so).
IO_METHOD = os.environ.get("PG_TDE_TEST_IO_METHOD", "")
CHECKSUMS_DEFAULT = os.environ.get("PG_TDE_TEST_CHECKSUMS", "on") != "off"


@functools.lru_cache(maxsize=None)
def pg_major() -> int:
    out = subprocess.run([str(BIN / "pg_config"), "--version"], capture_output=True, text=True, check=True).stdout
    return int(out.split()[1].split(".")[0])

_next_port = 55400 + (os.getpid() % 200) * 10


def make_dir(prefix: str) -> Path:
    """A fresh directory owned by the cluster user."""
    ROOT.mkdir(parents=True, exist_ok=True)
    os.chmod(ROOT, 0o755)
    d = Path(tempfile.mkdtemp(prefix=prefix + "-", dir=ROOT))
    chown(d)
    os.chmod(d, 0o700)
    return d


class SQLError(Exception):
    def __init__(self, sqlstate: str, message: str, output: str):
        super().__init__(f"{sqlstate}: {message}")
        self.sqlstate = sqlstate
        self.message = message
        self.output = output


class Cluster:
    """One PostgreSQL cluster with pg_tde preloaded."""

    def __init__(self, name: str, datadir: Path | None = None, port: int | None = None):
        global _next_port
        self.name = name
        self.base = make_dir(name)
        self.datadir = datadir or (self.base / "data")
        self.sockdir = self.base
        if port is None:
            port = _next_port
            _next_port += 1
        self.port = port
        self.logfile = self.base / "server.log"

    # -- lifecycle -----------------------------------------------------------

    def initdb(self, extra_conf: str = "", checksums: bool | None = None, io_method: str | None = None) -> "Cluster":
        """Create the cluster.  `checksums` and `io_method` default to the suite's
        configuration (PG_TDE_TEST_CHECKSUMS, PG_TDE_TEST_IO_METHOD)."""
        if checksums is None:
            checksums = CHECKSUMS_DEFAULT
        io_method = IO_METHOD if io_method is None else io_method
        args = [str(BIN / "initdb"), "-D", str(self.datadir), "-U", "postgres", "--auth=trust", "-E", "UTF8", "--locale=C"]
        # 18's initdb turns checksums on unless told otherwise; 17's only with -k.
        args.append("--data-checksums" if checksums else ("--no-data-checksums" if pg_major() >= 18 else ""))
        subprocess.run(as_user([a for a in args if a]), check=True, stdout=subprocess.DEVNULL)
        self.configure(
            "shared_preload_libraries = 'pg_tde'\n"
            "wal_level = replica\nmax_wal_senders = 5\nhot_standby = on\n"
            "fsync = on\n" + (f"io_method = {io_method}\n" if io_method else "") + extra_conf
        )
        return self

    def configure(self, text: str) -> None:
        with open(self.datadir / "postgresql.conf", "a") as f:
            f.write(
                f"\n# pg_tde tests\nlisten_addresses = ''\nport = {self.port}\n"
                f"unix_socket_directories = '{self.sockdir}'\n" + text + "\n"
            )

    def start(self, expect_fail: bool = False) -> bool:
        r = subprocess.run(
            as_user([str(BIN / "pg_ctl"), "-D", str(self.datadir), "-l", str(self.logfile), "-w", "-t", "120", "start"]),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        if r.returncode != 0 and not expect_fail:
            raise RuntimeError(f"cluster {self.name} did not start:\n{self.log_tail()}")
        return r.returncode == 0

    def stop(self, mode: str = "fast") -> None:
        subprocess.run(
            as_user([str(BIN / "pg_ctl"), "-D", str(self.datadir), "-m", mode, "-w", "stop"]),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    def restart(self) -> None:
        self.stop()
        self.start()

    def postmaster_pid(self) -> int | None:
        try:
            return int((self.datadir / "postmaster.pid").read_text().split("\n")[0])
        except (FileNotFoundError, ValueError):
            return None

    def kill9(self) -> None:
        """Crash: SIGKILL the postmaster, then its children, as a power loss would."""
        pid = self.postmaster_pid()
        assert pid, "cluster is not running"
        children = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
        os.kill(pid, signal.SIGKILL)
        for c in children:
            try:
                os.kill(int(c), signal.SIGKILL)
            except ProcessLookupError:
                pass
        deadline = time.time() + 30
        while time.time() < deadline:
            if subprocess.run(["pgrep", "-f", f"-D {self.datadir}"], capture_output=True).returncode != 0 and not _alive(pid):
                break
            time.sleep(0.1)
        time.sleep(0.5)

    def log_tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.logfile.read_text(errors="replace").splitlines()[-n:])
        except FileNotFoundError:
            return "(no log)"

    def destroy(self) -> None:
        self.stop("immediate")
        shutil.rmtree(self.base, ignore_errors=True)

    # -- SQL -------------------------------------------------------------------

    def psql_args(self, db: str = "postgres") -> list[str]:
        return [str(BIN / "psql"), "-X", "-q", "-A", "-t", "-h", str(self.sockdir), "-p", str(self.port), "-U", "postgres", "-d", db]

    def psql_line(self, db: str = "postgres") -> str:
        return f"{BIN / 'psql'} -h {self.sockdir} -p {self.port} -U postgres {db}"

    def sql(self, query: str, db: str = "postgres") -> str:
        """Run SQL; return the output (unaligned, tuples only).  Raises SQLError."""
        r = subprocess.run(
            self.psql_args(db) + ["-v", "ON_ERROR_STOP=1", "-v", "VERBOSITY=verbose"],
            input=query,
            capture_output=True,
            text=True,
        )
        if r.returncode != 0:
            raise _parse_error(r.stderr)
        return r.stdout.strip()

    def sql_error(self, query: str, db: str = "postgres") -> SQLError:
        """Run SQL that must fail; return the error."""
        try:
            out = self.sql(query, db)
        except SQLError as e:
            return e
        raise AssertionError(f"expected an error from {query!r}, got {out!r}")

    # -- files -----------------------------------------------------------------

    def relation_files(self, relname: str, db: str = "postgres") -> list[Path]:
        """Every file (all forks and segments) of a relation."""
        rel = self.sql(f"SELECT pg_relation_filepath('{relname}')", db)
        assert rel, f"{relname} has no storage"
        base = self.datadir / rel
        files = [Path(p) for p in glob.glob(str(base)) + glob.glob(str(base) + ".*") + glob.glob(str(base) + "_*")]
        return sorted(set(files))

    def files_contain(self, relname: str, marker: bytes, db: str = "postgres") -> bool:
        files = self.relation_files(relname, db)
        assert files, f"no files for {relname}"
        return any(marker in p.read_bytes() for p in files)

    def checkpoint(self, db: str = "postgres") -> None:
        self.sql("CHECKPOINT", db)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False


def _parse_error(stderr: str) -> SQLError:
    # VERBOSITY=verbose prints "ERROR:  42501: message".
    for line in stderr.splitlines():
        for level in ("ERROR:", "FATAL:", "PANIC:"):
            if line.startswith(level):
                rest = line[len(level):].strip()
                code, _, msg = rest.partition(": ")
                if len(code) == 5:
                    return SQLError(code, msg, stderr)
                return SQLError("", rest, stderr)
    return SQLError("", stderr.strip(), stderr)


def make_keyring_dir() -> Path:
    """A directory for keyring files, outside any data directory."""
    return make_dir("keyring")


def setup_encryption(cluster: Cluster, keyring: Path, db: str = "postgres", key: str = "principal-key") -> None:
    """CREATE EXTENSION, a file provider and a principal key for `db`."""
    cluster.sql("CREATE EXTENSION IF NOT EXISTS pg_tde", db)
    cluster.sql(f"SELECT pg_tde_add_database_key_provider_file('file-vault', '{keyring}/keyring.json')", db)
    cluster.sql(f"SELECT pg_tde_create_key_using_database_key_provider('{key}', 'file-vault')", db)
    cluster.sql(f"SELECT pg_tde_set_key_using_database_key_provider('{key}', 'file-vault')", db)
