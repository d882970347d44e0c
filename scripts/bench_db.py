#!/usr/bin/env python3
"""Database benchmarks for pg_tde: `heap` vs `tde_heap`, WAL encryption off vs on.

One fresh patched PostgreSQL server (17 or 18; --io-method for 18) (run by the unprivileged OS user, Unix
socket only), every comparison in that one server and one run:

  seqscan       SELECT count(*) of an OS-cached table larger than shared_buffers,
                no parallel workers: every page is read from the OS cache and
                (tde_heap) decrypted
  pgbench -S    select-only, -c 4 -j 2, in a database initialised with heap vs
                one initialised with tde_heap (PGOPTIONS default_table_access_method)
  pgbench tpcb  the same with the default tpcb-like script
  CTAS          CREATE TABLE ... USING <am> AS SELECT * FROM <table of that am>
  VACUUM FULL   of the large table
  ALTER rewrite ALTER COLUMN c TYPE int USING c + 0 (same type, forced rewrite)
  WAL write     pgbench tpcb-like -c 16 -j 2 on the heap database with
                pg_tde.wal_encrypt off vs on (restart before every run)

CPU placement: during every pgbench run, pgbench runs on the first CPU and the
server (postmaster, its background processes and the backends it forks for
pgbench) on the others; without it this 2-CPU machine's pgbench throughput
jumps between levels ~1.5x apart depending on where the scheduler puts the
backends relative to pgbench's threads.  --no-pin turns it off.

Primer: before every measured pgbench run an untimed 2-second select-only run
of the same database (a run is ~5-8% faster when its database ran just
before, which otherwise favoured the plain side, measured in half the runs).

Profile (--profile): every measured pgbench run is sampled with `perf record`
on the server's CPUs, and the share of those samples that fall in pg_tde.so
(the page cipher, the key lookup, the hooks) is recorded per run: a direct
measure of the CPU that pg_tde takes, much less noisy than the throughput
ratio, though blind to indirect costs (e.g. caches the cipher evicts).

Method: one untimed warm-up run per side; then N adjacent pairs in alternating
order (A,B / B,A / ...).  Each pair gives a ratio "encrypted / plain" oriented so
that higher is better for pg_tde (throughput: tde/heap, duration: heap/tde); the
result is the geometric mean of the pair ratios with a 95% confidence interval
(Student t on the log ratios).  Every benchmark also runs an A/A control, heap vs
an identical second heap object (WAL: off vs off), pair by pair interleaved with
the real pairs, to show how much of a difference this machine produces from
nothing.

Run through scripts/bench-db.sh (it sets PG_PREFIX).  See docs/performance.md.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import glob
import math
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from run_as import as_user, chown

PG_PREFIX = Path(os.environ.get("PG_PREFIX", ""))
BIN = PG_PREFIX / "bin"
REPO_ROOT = Path(__file__).resolve().parent.parent

# Full size (--scale 1): the large table ~512 MB (4x shared_buffers), the pgbench
# databases ~530 MB each (pgbench scale 1 is ~15.6 MB with its primary keys).
ROWS_FULL = 4_900_000  # ~75 rows of ~104 bytes per 8 KiB page -> ~512 MB
PGBENCH_SCALE_FULL = 34

TARGETS = {
    "seqscan": 0.85,
    "pgbench-S": 0.98,
    "pgbench-tpcb": 0.98,
    "ctas": 0.95,
    "vacuum-full": 0.95,
    "alter-rewrite": 0.95,
    "wal-write": 0.95,
}
ALL_BENCHES = list(TARGETS)

# Two-sided 95% Student t quantiles.
_T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262,
         10: 2.228, 11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 16: 2.120, 17: 2.110,
         18: 2.101, 19: 2.093, 20: 2.086, 25: 2.060, 30: 2.042}


def t975(df: int) -> float:
    if df in _T975:
        return _T975[df]
    if df < 30:
        return _T975[max(k for k in _T975 if k < df)]
    return 1.96 + 2.4 / df


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------
# the server


class Server:
    """One PostgreSQL server with pg_tde preloaded, Unix socket only."""

    def __init__(self, workdir: Path):
        workdir.mkdir(parents=True, exist_ok=True)
        os.chmod(workdir, 0o755)
        self.base = Path(tempfile.mkdtemp(prefix="server-", dir=workdir))
        chown(self.base)
        os.chmod(self.base, 0o700)
        self.datadir = self.base / "data"
        self.keyring = self.base / "keyring"
        self.keyring.mkdir()
        chown(self.keyring)
        os.chmod(self.keyring, 0o700)
        self.logfile = self.base / "server.log"
        self.port = 56000 + os.getpid() % 1000
        self.running = False
        # CPU placement for pgbench runs: (client CPUs, server CPUs), or None to let the
        # scheduler place everything (see Server.pgbench).
        self.placement: tuple[set[int], set[int]] | None = None
        # --profile: sample measured pgbench runs with perf; their reports (profile-NNN-<db>.txt) go here.
        self.profile_dir: Path | None = None
        self.profiles = 0

    def initdb(self, io_method: str = "") -> None:
        subprocess.run(
            as_user([str(BIN / "initdb"), "-D", str(self.datadir), "-U", "postgres", "--auth=trust",
                      "-E", "UTF8", "--locale=C", "-k"]),
            check=True, stdout=subprocess.DEVNULL,
        )
        with open(self.datadir / "postgresql.conf", "a") as f:
            f.write(
                "\n# scripts/bench_db.py\n"
                "listen_addresses = ''\n"
                f"port = {self.port}\n"
                f"unix_socket_directories = '{self.base}'\n"
                "shared_preload_libraries = 'pg_tde'\n"
                "shared_buffers = 128MB\n"
                "fsync = on\n"
                "synchronous_commit = on\n"
                "full_page_writes = on\n"
                "wal_level = replica\n"
                "max_wal_size = 8GB\n"
                "min_wal_size = 1GB\n"
                "checkpoint_timeout = 1h\n"
                "log_checkpoints = on\n"
                "autovacuum = off\n"
                "jit = off\n"
                "max_connections = 50\n"
                + (f"io_method = {io_method}\n" if io_method else "")
            )

    def start(self) -> None:
        for attempt in range(3):
            wait_for_library()
            r = subprocess.run(
                as_user([str(BIN / "pg_ctl"), "-D", str(self.datadir), "-l", str(self.logfile), "-w", "-t", "300", "start"]),
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )
            self.running = True  # even on failure: stop() is harmless
            if r.returncode == 0:
                return
            if 'could not load library "pg_tde"' not in self.log_tail(5):
                break
            # Another job is installing pg_tde.so right now (the file is briefly missing).
            log("pg_tde.so could not be loaded (being reinstalled?): waiting and starting again")
        raise RuntimeError(f"server did not start:\n{self.log_tail()}")

    def stop(self) -> None:
        if not (self.datadir / "postmaster.pid").exists():
            self.running = False
            return
        r = subprocess.run(
            as_user([str(BIN / "pg_ctl"), "-D", str(self.datadir), "-m", "fast", "-w", "-t", "300", "stop"]),
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        if r.returncode != 0:
            subprocess.run(
                as_user([str(BIN / "pg_ctl"), "-D", str(self.datadir), "-m", "immediate", "-w", "stop"]),
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )
        self.running = False

    def restart(self) -> None:
        self.stop()
        self.start()

    def log_tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.logfile.read_text(errors="replace").splitlines()[-n:])
        except FileNotFoundError:
            return "(no log)"

    def conn_args(self, db: str) -> list[str]:
        return ["-h", str(self.base), "-p", str(self.port), "-U", "postgres", "-d", db]

    def psql(self, sql: str, db: str = "postgres", timeout: float | None = 3600) -> str:
        r = subprocess.run(
            [str(BIN / "psql"), "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1"] + self.conn_args(db),
            input=sql, capture_output=True, text=True, timeout=timeout,
        )
        if r.returncode != 0:
            raise RuntimeError(f"psql failed in {db}: {r.stderr.strip()}\nSQL: {sql[:500]}")
        return r.stdout.strip()

    def io_counters(self, db: str) -> dict[str, int]:
        """Cumulative block counts: `db`'s blocks read from the OS and found in shared buffers
        (pg_stat_database), and relation blocks written and extended by every process of the
        server (pg_stat_io; during a pgbench run only that database is busy).  The differences
        per transaction, in `runs.csv`, tell whether two databases do the same I/O."""
        row = self.psql("SELECT blks_read, blks_hit, "
                        "(SELECT sum(writes) FROM pg_stat_io WHERE object = 'relation'), "
                        "(SELECT sum(extends) FROM pg_stat_io WHERE object = 'relation') "
                        f"FROM pg_stat_database WHERE datname = '{db}'")
        values = [int(v or 0) for v in row.split("|")]
        return dict(zip(("blks_read", "blks_hit", "writes", "extends"), values))

    def timed(self, stmts: list[str], db: str, setup: str = "") -> tuple[list[float], str]:
        """Run `setup` untimed, then each statement with \\timing.  Returns ms per statement and
        "cpu_user_ms=U cpu_sys_ms=S wait_ms=W": the CPU time the backend used per statement (the
        mean over the statements), from /proc/<pid>/stat read (by psql's \\!) just before the first
        and after the last, and the rest of the mean elapsed time, so that a difference in elapsed
        time can be told apart as CPU or waiting."""
        stat = "\\! cat /proc/$PG_TDE_BENCH_BACKEND/stat\n"
        script = (setup + "\nSELECT pg_backend_pid() AS pg_tde_bench_backend \\gset\n"
                  "\\setenv PG_TDE_BENCH_BACKEND :pg_tde_bench_backend\n\\timing on\n" + stat
                  + "".join(s.rstrip(";") + ";\n" for s in stmts) + stat)
        out = self.psql(script, db)
        times = [float(t) for t in re.findall(r"^Time: ([0-9.]+) ms", out, re.M)]
        if len(times) != len(stmts):
            raise RuntimeError(f"expected {len(stmts)} timings, got: {out[-500:]}")
        # /proc/<pid>/stat: "pid (comm) state ..." with utime and stime the 12th and 13th
        # fields after the comm, in clock ticks.  \\! writes straight to the output, so the
        # two lines are in order whatever psql's own buffering does with the rest.
        ticks = [tuple(int(f) for f in line.rsplit(")", 1)[1].split()[11:13])
                 for line in out.splitlines() if re.match(r"^\d+ \(postgres\) ", line)]
        if len(ticks) != 2:
            raise RuntimeError(f"could not read the backend's CPU time (two /proc stat lines expected): {out[-500:]}")
        hz = os.sysconf("SC_CLK_TCK")
        user, sys_ = ((ticks[1][i] - ticks[0][i]) * 1000 / hz / len(stmts) for i in (0, 1))
        wait = statistics.fmean(times) - user - sys_
        return times, f"cpu_user_ms={user:.0f} cpu_sys_ms={sys_:.0f} wait_ms={wait:.0f}"

    def server_pids(self) -> list[int]:
        """The postmaster and every process it has started (all single-threaded)."""
        try:
            pm = int((self.datadir / "postmaster.pid").read_text().split()[0])
        except (FileNotFoundError, IndexError, ValueError):
            return []
        children = Path(f"/proc/{pm}/task/{pm}/children")
        return [pm] + [int(c) for c in (children.read_text().split() if children.exists() else [])]

    def set_server_cpus(self, cpus: set[int]) -> None:
        for pid in self.server_pids():
            try:
                os.sched_setaffinity(pid, cpus)
            except ProcessLookupError:
                pass  # exited meanwhile

    def pgbench(self, db: str, args: list[str], env_extra: dict | None = None, timeout: float = 3600,
                measured: bool = True, profiled: bool = True) -> str:
        """Run pgbench; a `measured` run uses self.placement, if set: the server's processes
        (and the backends the postmaster forks for pgbench, which inherit its mask) on the
        server CPUs, pgbench on the client CPUs, everything unpinned again afterwards."""
        env = dict(os.environ)
        env.update(env_extra or {})
        place = self.placement if measured else None
        if place:
            self.set_server_cpus(place[1])
        perf = self.start_profile(place[1] if place else None, db) if measured and profiled and self.profile_dir else None
        try:
            r = subprocess.run([str(BIN / "pgbench")] + args + self.conn_args(db)[:-2] + [db],
                               capture_output=True, text=True, env=env, timeout=timeout,
                               preexec_fn=(lambda: os.sched_setaffinity(0, place[0])) if place else None)
        finally:
            share = self.stop_profile(perf) if perf else None
            if place:
                self.set_server_cpus(os.sched_getaffinity(0))
        if r.returncode != 0:
            raise RuntimeError(f"pgbench {' '.join(args)} on {db} failed ({r.returncode}):\n{r.stdout[-1500:]}\n{r.stderr[-1500:]}")
        return r.stdout + r.stderr + (f"\nprofile: {share}\n" if share is not None else "")

    def start_profile(self, cpus: set[int] | None, db: str) -> tuple[subprocess.Popen, Path]:
        """Start sampling the server's CPUs (all CPUs without placement) with perf, 999 Hz, cpu-clock."""
        self.profiles += 1
        data = self.profile_dir / f"profile-{self.profiles:03d}-{db}.data"
        where = ["-C", ",".join(map(str, sorted(cpus)))] if cpus else ["-a"]
        proc = subprocess.Popen(["perf", "record", "-q", "-e", "cpu-clock", "-F", "999", "-o", str(data)] + where,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        time.sleep(0.2)  # perf's set-up, so that the run's first transactions are sampled too
        if proc.poll() is not None:
            raise RuntimeError(f"perf record failed: {proc.stderr.read().strip()[:500]}")
        return proc, data

    def stop_profile(self, perf: tuple[subprocess.Popen, Path]) -> str:
        """Stop perf, keep its report by DSO and symbol next to the results (the data file is
        removed), and return "pg_tde_cpu_pct=X postgres_cpu_pct=Y kernel_cpu_pct=Z report=FILE"."""
        proc, data = perf
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        reports = [subprocess.run(["perf", "report", "-i", str(data), "--sort", sort, "--stdio", "-q"],
                                  capture_output=True, text=True) for sort in ("dso", "dso,sym")]
        data.unlink(missing_ok=True)
        Path(str(data) + ".old").unlink(missing_ok=True)
        for r in reports:
            if r.returncode != 0:
                raise RuntimeError(f"perf report failed: {r.stderr.strip()[:500]}")
        text = data.with_suffix(".txt")
        text.write_text(reports[0].stdout + "\n" + "\n".join(reports[1].stdout.splitlines()[:200]) + "\n")
        return " ".join(f"{key}={dso_share(reports[0].stdout, dso):.3f}" for key, dso in
                        (("pg_tde_cpu_pct", "pg_tde.so"), ("postgres_cpu_pct", "postgres"),
                         ("kernel_cpu_pct", "[kernel.kallsyms]"))) + f" report={text.name}"

    def cold_buffers(self) -> None:
        """CHECKPOINT, then evict every shared buffer (pg_buffercache_evict, PostgreSQL 17 and 18).

        Every measured run starts from the same state: nothing of the benchmark's
        relations in shared_buffers (so every page is read, and decrypted, from
        the OS page cache) and no dirty buffers left over from the previous run.
        Without this the relation written last during setup stays partly
        resident and an A/A control of two identical heap tables reads 2x apart.
        """
        # 17 returns whether the buffer was evicted, 18 a record that says so.
        if int(self.psql("SHOW server_version_num")) >= 180000:
            evicted = "(pg_buffercache_evict(bufferid)).buffer_evicted"
        else:
            evicted = "pg_buffercache_evict(bufferid)"
        self.psql(f"CHECKPOINT; SELECT count(*) FILTER (WHERE {evicted}) "
                  "FROM pg_buffercache WHERE relfilenode IS NOT NULL")

    def rel_files(self, rel: str, db: str) -> list[Path]:
        path = self.psql(f"SELECT pg_relation_filepath('{rel}')", db)
        base = self.datadir / path
        return sorted({Path(p) for p in glob.glob(str(base)) + glob.glob(str(base) + ".*") + glob.glob(str(base) + "_*")})

    def db_dir(self, db: str) -> Path:
        oid = self.psql(f"SELECT oid FROM pg_database WHERE datname = '{db}'")
        return self.datadir / "base" / oid


LIBRARY_MISSING = re.compile(r'could not access file "\$libdir/pg_tde"|could not load library "pg_tde"')


def wait_for_library(timeout: float = 600) -> None:
    """Wait until pg_tde.so exists and has not changed for 5 s (another job may be installing it)."""
    so = PG_PREFIX / "lib" / "postgresql" / "pg_tde.so"
    deadline = time.time() + timeout
    last = None
    while time.time() < deadline:
        try:
            st = so.stat()
            cur = (st.st_mtime, st.st_size)
        except FileNotFoundError:
            cur = None
        if cur is not None and cur == last:
            return
        last = cur
        time.sleep(5 if cur is not None else 2)
    raise RuntimeError(f"{so} missing or changing for {timeout:.0f} s")


def read_files(paths) -> int:
    """Read files to the end so that they are in the OS page cache; return bytes read."""
    n = 0
    for p in paths:
        try:
            with open(p, "rb", buffering=0) as f:
                while True:
                    b = f.read(1 << 20)
                    if not b:
                        break
                    n += len(b)
        except FileNotFoundError:
            pass  # dropped meanwhile
    return n


def tree_files(d: Path) -> list[Path]:
    return [p for p in d.rglob("*") if p.is_file()]


# ---------------------------------------------------------------------------
# results


class Recorder:
    FIELDS = ["benchmark", "metric", "comparison", "pair", "position", "role", "side", "object", "value", "unit", "detail",
              "started_at", "loadavg_1m"]

    def __init__(self, path: Path):
        self.path = path
        self.f = open(path, "w", newline="")
        self.w = csv.DictWriter(self.f, fieldnames=self.FIELDS)
        self.w.writeheader()

    def add(self, **row) -> None:
        self.w.writerow(row)
        self.f.flush()

    def close(self) -> None:
        self.f.close()


def summarize(ratios: list[float]) -> tuple[float, float | None, float | None]:
    logs = [math.log(r) for r in ratios]
    m = statistics.fmean(logs)
    if len(logs) < 2:
        return math.exp(m), None, None
    half = t975(len(logs) - 1) * statistics.stdev(logs) / math.sqrt(len(logs))
    return math.exp(m), math.exp(m - half), math.exp(m + half)


def pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def ci(lo: float | None, hi: float | None) -> str:
    return "n/a" if lo is None else f"{pct(lo)} – {pct(hi)}"


def verdict(target: float, lo: float | None, hi: float | None, geo: float) -> str:
    if lo is None:
        return "meets (1 pair)" if geo >= target else "below (1 pair)"
    if lo >= target:
        return "meets"
    if hi < target:
        return "below"
    return "inconclusive"


# ---------------------------------------------------------------------------
# benchmarks


class Bench:
    """A benchmark: `run(obj)` performs one measured run on one side and returns (value, detail)."""

    name = ""
    metric = ""
    unit = ""
    higher_is_better = True
    # (label, object) for the plain side, the encrypted side and the A/A twin of the plain side
    plain: tuple[str, object]
    enc: tuple[str, object]
    twin: tuple[str, object]

    def prepare(self) -> None:
        """Before the warm-up: e.g. read the files into the OS cache."""

    def run(self, obj) -> tuple[float, str]:
        raise NotImplementedError

    def finish(self) -> None:
        pass


class SeqScan(Bench):
    name, metric, unit, higher_is_better = "seqscan", "count(*) time, median of reps", "ms", False

    def __init__(self, srv: Server, db: str, tables: dict, reps: int):
        self.srv, self.db, self.reps = srv, db, reps
        self.plain, self.enc, self.twin = ("heap", tables["heap"]), ("tde_heap", tables["tde"]), ("heap (twin)", tables["heap2"])

    def prepare(self) -> None:
        for _, t in (self.plain, self.enc, self.twin):
            read_files(self.srv.rel_files(t, self.db))

    def run(self, table) -> tuple[float, str]:
        self.srv.cold_buffers()
        times, cpu = self.srv.timed([f"SELECT count(*) FROM {table}"] * self.reps, self.db,
                                    setup="SET max_parallel_workers_per_gather = 0;")
        return statistics.median(times), " ".join(f"{t:.1f}" for t in times) + " " + cpu


class PgbenchRead(Bench):
    unit, higher_is_better = "tps", True

    def __init__(self, srv: Server, dbs: dict, select_only: bool, duration: int, clients: int, threads: int):
        self.srv, self.select_only, self.duration, self.clients, self.threads = srv, select_only, duration, clients, threads
        self.name = "pgbench-S" if select_only else "pgbench-tpcb"
        self.metric = f"{'select-only' if select_only else 'tpcb-like'} tps, -c {clients} -j {threads} -T {duration}"
        self.plain, self.enc, self.twin = ("heap", dbs["heap"]), ("tde_heap", dbs["tde"]), ("heap (twin)", dbs["heap2"])

    def prepare(self) -> None:
        for _, db in (self.plain, self.enc, self.twin):
            read_files(tree_files(self.srv.db_dir(db)))

    def run(self, db) -> tuple[float, str]:
        clients = ["-c", str(self.clients), "-j", str(self.threads)]
        # A run is ~5-8% faster when the same database ran just before it, and the plain
        # database (side A of both comparisons) often does while the encrypted one never
        # does; so every measured run follows an untimed 2-second select-only run of its
        # own database (select-only: it changes nothing).
        self.srv.cold_buffers()
        self.srv.pgbench(db, clients + ["-S", "-T", "2"], timeout=600, profiled=False)
        self.srv.cold_buffers()
        args = clients + (["-S"] if self.select_only else []) + ["-T", str(self.duration)]
        before = self.srv.io_counters(db)
        tps, detail = parse_pgbench(self.srv.pgbench(db, args, timeout=self.duration + 600))
        time.sleep(0.5)  # the pgbench backends report their statistics as they exit
        after = self.srv.io_counters(db)
        xacts = re.search(r"xacts=(\d+)", detail)
        if xacts and int(xacts.group(1)) > 0:
            n = int(xacts.group(1))
            detail += " " + " ".join(f"{k}_per_xact={(after[k] - before[k]) / n:.3f}" for k in before)
        return tps, detail


def dso_share(report: str, dso: str) -> float:
    """The percentage of `dso` in `perf report --sort dso --stdio -q` output (0 if absent)."""
    m = re.search(r"^\s*([0-9.]+)%\s+" + re.escape(dso) + r"\s*$", report, re.M)
    return float(m.group(1)) if m else 0.0


def parse_pgbench(out: str) -> tuple[float, str]:
    m = re.search(r"^tps = ([0-9.]+) \(without initial connection time\)", out, re.M)
    if not m:
        raise RuntimeError(f"no tps in pgbench output:\n{out[-1500:]}")
    lat = re.search(r"^latency average = ([0-9.]+) ms", out, re.M)
    failed = re.search(r"^number of failed transactions: (\d+)", out, re.M)
    xacts = re.search(r"^number of transactions actually processed: (\d+)", out, re.M)
    detail = f"latency_ms={lat.group(1) if lat else '?'} xacts={xacts.group(1) if xacts else '?'} failed={failed.group(1) if failed else '?'}"
    profile = re.search(r"^profile: (.*)$", out, re.M)
    if profile:
        detail += " " + profile.group(1)
    return float(m.group(1)), detail


class Rewrite(Bench):
    unit, higher_is_better = "ms", False

    def __init__(self, srv: Server, db: str, tables: dict, kind: str):
        self.srv, self.db, self.kind, self.name = srv, db, kind, kind
        self.metric = {
            "ctas": "CREATE TABLE AS time",
            "vacuum-full": "VACUUM FULL time",
            "alter-rewrite": "ALTER COLUMN TYPE (rewrite) time",
        }[kind]
        self.plain, self.enc, self.twin = ("heap", tables["heap"]), ("tde_heap", tables["tde"]), ("heap (twin)", tables["heap2"])
        self.am = {tables["heap"]: "heap", tables["tde"]: "tde_heap", tables["heap2"]: "heap"}

    def prepare(self) -> None:
        for _, t in (self.plain, self.enc, self.twin):
            read_files(self.srv.rel_files(t, self.db))

    def run(self, table) -> tuple[float, str]:
        srv, db = self.srv, self.db
        before = srv.psql(f"SELECT pg_relation_filenode('{table}')", db)
        if self.kind == "ctas":
            target = f"ctas_{table}"
            srv.psql(f"DROP TABLE IF EXISTS {target}", db)
            srv.cold_buffers()
            (ms,), cpu = srv.timed([f"CREATE TABLE {target} USING {self.am[table]} AS SELECT * FROM {table}"], db,
                                   setup="SET max_parallel_workers_per_gather = 0;")
            enc = srv.psql(f"SELECT pg_tde_is_encrypted('{target}')", db)
            size = srv.psql(f"SELECT pg_relation_size('{target}')", db)
            srv.psql(f"DROP TABLE {target}", db)
            return ms, f"encrypted={enc} bytes={size} {cpu}"
        srv.cold_buffers()
        stmt = f"VACUUM FULL {table}" if self.kind == "vacuum-full" else f"ALTER TABLE {table} ALTER COLUMN c TYPE int USING c + 0"
        (ms,), cpu = srv.timed([stmt], db)
        after = srv.psql(f"SELECT pg_relation_filenode('{table}')", db)
        if after == before:
            raise RuntimeError(f"{stmt} did not rewrite {table}")
        enc = srv.psql(f"SELECT pg_tde_is_encrypted('{table}')", db)
        return ms, f"encrypted={enc} filenode={before}->{after} {cpu}"


class WalWrite(Bench):
    name, unit, higher_is_better = "wal-write", "tps", True

    def __init__(self, srv: Server, db: str, duration: int, clients: int, threads: int):
        self.srv, self.db, self.duration, self.clients, self.threads = srv, db, duration, clients, threads
        self.metric = f"tpcb-like tps, -c {clients} -j {threads} -T {duration}, heap tables, wal_encrypt off vs on"
        self.plain, self.enc, self.twin = ("wal_encrypt=off", "off"), ("wal_encrypt=on", "on"), ("wal_encrypt=off (twin)", "off#2")
        self.current = None

    def prepare(self) -> None:
        read_files(tree_files(self.srv.db_dir(self.db)))

    def run(self, setting) -> tuple[float, str]:
        srv = self.srv
        value = setting.split("#")[0]
        srv.psql(f"ALTER SYSTEM SET pg_tde.wal_encrypt = {value}")
        srv.restart()  # before every run, on both sides
        shown = srv.psql("SHOW pg_tde.wal_encrypt")
        if shown != value:
            raise RuntimeError(f"pg_tde.wal_encrypt is {shown}, wanted {value}")
        # The restart leaves shared_buffers empty, as cold_buffers() does for the other benchmarks.
        tps, detail = parse_pgbench(srv.pgbench(self.db, ["-c", str(self.clients), "-j", str(self.threads), "-T", str(self.duration)],
                                                timeout=self.duration + 600))
        return tps, f"{detail} wal_encrypt={shown}"

    def finish(self) -> None:
        self.srv.psql("ALTER SYSTEM RESET pg_tde.wal_encrypt")
        self.srv.restart()


def measure(bench: Bench, pairs: int, rec: Recorder) -> None:
    """Warm-up per side, then `pairs` real pairs and `pairs` A/A pairs, interleaved and alternating."""

    def one(comparison: str, pair, position: int, side: tuple[str, object], role: str = "") -> float:
        label, obj = side
        for attempt in range(3):
            started = dt.datetime.now().isoformat(timespec="seconds")
            try:
                value, detail = bench.run(obj)
                break
            except RuntimeError as e:
                # Another job reinstalling pg_tde.so leaves $libdir/pg_tde missing for a moment, and new
                # backends that call a pg_tde function fail.  Wait for the file and run this side again.
                if attempt == 2 or not LIBRARY_MISSING.search(str(e)):
                    raise
                log(f"  {bench.name} {label}: pg_tde.so missing (being reinstalled?): waiting, then running again")
                wait_for_library()
        rec.add(benchmark=bench.name, metric=bench.metric, comparison=comparison, pair=pair, position=position, role=role,
                side=label, object=obj, value=f"{value:.3f}", unit=bench.unit, detail=detail, started_at=started,
                loadavg_1m=f"{os.getloadavg()[0]:.2f}")
        log(f"  {bench.name} {comparison} pair {pair} {label}: {value:.1f} {bench.unit} ({detail})")
        return value

    bench.prepare()
    for i, side in enumerate((bench.plain, bench.enc, bench.twin)):
        one("warmup", "warmup", i + 1, side)

    for i in range(pairs):
        comps = [("tde", bench.plain, bench.enc), ("aa", bench.plain, bench.twin)]
        if i % 2:
            comps.reverse()
        for comp, a, b in comps:
            order = [(a, "A"), (b, "B")] if i % 2 == 0 else [(b, "B"), (a, "A")]
            got = {}
            for pos, (side, role) in enumerate(order, 1):
                got[role] = one(comp, i + 1, pos, side, role)
            r = got["B"] / got["A"] if bench.higher_is_better else got["A"] / got["B"]
            log(f"  {bench.name} {comp} pair {i + 1}: ratio {100 * r:.1f}%")
    bench.finish()


def results_from_csv(path: Path) -> list[dict]:
    """Summaries per benchmark from runs.csv (complete pairs only), in the order benchmarks appear."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    out: dict[str, dict] = {}
    pairs: dict[tuple, dict] = {}
    shares: dict[tuple, list[float]] = {}
    cpu_ms: dict[tuple, list[tuple[float, float]]] = {}  # (backend CPU, waiting) per run
    for row in rows:
        name = row["benchmark"]
        out.setdefault(name, {"name": name, "metric": row["metric"], "unit": row["unit"]})
        if row["comparison"] in ("tde", "aa") and row["role"] in ("A", "B"):
            pairs.setdefault((name, row["comparison"], row["pair"]), {})[row["role"]] = float(row["value"])
            m = re.search(r"pg_tde_cpu_pct=([0-9.]+)", row.get("detail") or "")
            if m:
                shares.setdefault((name, row["comparison"], row["role"]), []).append(float(m.group(1)))
            m = re.search(r"cpu_user_ms=([0-9.]+) cpu_sys_ms=([0-9.]+) wait_ms=(-?[0-9.]+)", row.get("detail") or "")
            if m:
                cpu_ms.setdefault((name, row["comparison"], row["role"]), []).append(
                    (float(m.group(1)) + float(m.group(2)), float(m.group(3))))
    for r in out.values():
        higher = r["unit"] == "tps"
        for comp in ("tde", "aa"):
            done = [v for (n, c, _), v in pairs.items() if n == r["name"] and c == comp and len(v) == 2]
            r[comp + "_ratios"] = [v["B"] / v["A"] if higher else v["A"] / v["B"] for v in done]
            r[comp] = summarize(r[comp + "_ratios"]) if done else (None, None, None)
            r[comp + "_median_a"] = statistics.median(v["A"] for v in done) if done else None
            r[comp + "_median_b"] = statistics.median(v["B"] for v in done) if done else None
            for role in ("A", "B"):
                got = shares.get((r["name"], comp, role))
                r[f"{comp}_share_{role}"] = statistics.median(got) if got else None
                got = cpu_ms.get((r["name"], comp, role))
                r[f"{comp}_cpu_{role}"] = statistics.median(c for c, _ in got) if got else None
                r[f"{comp}_wait_{role}"] = statistics.median(w for _, w in got) if got else None
    loads = [float(row["loadavg_1m"]) for row in rows if row.get("loadavg_1m")]
    return list(out.values()), (min(loads), max(loads)) if loads else None


def render(results: list[dict], conditions: list[str], csv_path: Path) -> str:
    table = ["| benchmark | metric | ratio (geo mean) | 95% CI | A/A control ratio | A/A CI | target | verdict |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    medians = ["| benchmark | unit | plain (median) | encrypted (median) | A/A plain (median) | A/A twin (median) | pair ratios | A/A pair ratios |",
               "| --- | --- | --- | --- | --- | --- | --- | --- |"]

    def num(x):
        return "n/a" if x is None else f"{x:.1f}"

    for r in results:
        g, lo, hi = r["tde"]
        ag, alo, ahi = r["aa"]
        target = TARGETS.get(r["name"], 1.0)
        v = "no complete pair" if g is None else verdict(target, lo, hi, g)
        table.append(f"| {r['name']} | {r['metric']} | {pct(g)} | {ci(lo, hi)} | {pct(ag)} | {ci(alo, ahi)} | ≥ {100 * target:.0f}% | {v} |")
        medians.append(
            f"| {r['name']} | {r['unit']} | {num(r['tde_median_a'])} | {num(r['tde_median_b'])} | {num(r['aa_median_a'])} | "
            f"{num(r['aa_median_b'])} | " + " ".join(f"{100 * x:.1f}" for x in r["tde_ratios"]) + " | "
            + " ".join(f"{100 * x:.1f}" for x in r["aa_ratios"]) + " |")
    profiled = [r for r in results if r.get("tde_share_A") is not None and r.get("tde_share_B") is not None]
    profile = ""
    if profiled:
        rows = ["| benchmark | plain (median) | encrypted (median) | difference | A/A plain | A/A twin |",
                "| --- | --- | --- | --- | --- | --- |"]

        def share(x):
            return "n/a" if x is None else f"{x:.2f}%"

        for r in profiled:
            rows.append(f"| {r['name']} | {share(r['tde_share_A'])} | {share(r['tde_share_B'])} | "
                        f"{r['tde_share_B'] - r['tde_share_A']:+.2f} points | {share(r.get('aa_share_A'))} | "
                        f"{share(r.get('aa_share_B'))} |")
        profile = ("\n\nShare of the server CPU's perf samples in pg_tde.so (--profile), median of the measured runs; "
                   "the difference is the server CPU that encryption takes (indirect costs not included):\n\n"
                   + "\n".join(rows))
    timed = [r for r in results if r.get("tde_cpu_A") is not None and r.get("tde_cpu_B") is not None]
    cpu_table = ""
    if timed:
        rows = ["| benchmark | CPU plain | CPU encrypted | difference | waiting plain | waiting encrypted | difference |",
                "| --- | --- | --- | --- | --- | --- | --- |"]
        for r in timed:
            a, b, wa, wb = (round(r[k]) for k in ("tde_cpu_A", "tde_cpu_B", "tde_wait_A", "tde_wait_B"))
            rows.append(f"| {r['name']} | {a} | {b} | {b - a:+d} | {wa} | {wb} | {wb - wa:+d} |")
        cpu_table = ("\n\nThe measuring backend's CPU time per statement (user + sys from /proc/<pid>/stat, 10 ms "
                     "ticks) and the rest of the elapsed time (waiting: I/O, locks, other processes), ms, "
                     "medians of the measured runs:\n\n" + "\n".join(rows))
    return ("Ratios are encrypted / plain, oriented so that higher is better for pg_tde "
            "(throughput: tde/heap; duration: heap/tde).  100% = no overhead.\n\n"
            + "\n".join(table) + profile + cpu_table + "\n\nConditions:\n\n" + "\n".join(conditions)
            + "\n\nPer-side medians (ms for durations, tps for throughput) and the individual pair ratios (%):\n\n"
            + "\n".join(medians) + f"\n\nRaw per-run numbers: {csv_path}\n")


# ---------------------------------------------------------------------------
# setup


def setup_databases(srv: Server, rows: int, pgb_scale: int, benches: list[str]) -> dict:
    keyring = srv.keyring / "keyring.json"
    srv.psql("CREATE EXTENSION pg_tde; CREATE EXTENSION pg_buffercache")
    srv.psql(f"SELECT pg_tde_add_global_key_provider_file('bench-keyring', '{keyring}')")
    srv.psql("SELECT pg_tde_create_key_using_global_key_provider('server-key', 'bench-keyring')")
    srv.psql("SELECT pg_tde_set_server_key_using_global_key_provider('server-key', 'bench-keyring')")

    def new_db(name: str) -> None:
        srv.psql(f"CREATE DATABASE {name}")
        srv.psql("CREATE EXTENSION pg_tde", name)
        srv.psql(f"SELECT pg_tde_create_key_using_global_key_provider('key-{name}', 'bench-keyring')", name)
        srv.psql(f"SELECT pg_tde_set_key_using_global_key_provider('key-{name}', 'bench-keyring')", name)

    info = {"tables": {"heap": "big_heap", "tde": "big_tde", "heap2": "big_heap2"}, "table_db": "bench",
            "pgbench_dbs": {"heap": "pgb_heap", "tde": "pgb_tde", "heap2": "pgb_heap2"}, "sizes": {}}

    if any(b in benches for b in ("seqscan", "ctas", "vacuum-full", "alter-rewrite")):
        db = info["table_db"]
        new_db(db)
        log(f"creating the large tables ({rows} rows each) in database {db}")
        srv.psql(
            # the three tables are made the same way, from one source
            "CREATE TABLE big_src (id int, a text, b text, c int) USING heap;"
            f"INSERT INTO big_src SELECT g, md5(g::text), md5((g + 1)::text), g % 1000 FROM generate_series(1, {rows}) g;"
            "CREATE TABLE big_heap (LIKE big_src) USING heap; INSERT INTO big_heap SELECT * FROM big_src;"
            "CREATE TABLE big_tde (LIKE big_src) USING tde_heap; INSERT INTO big_tde SELECT * FROM big_src;"
            "CREATE TABLE big_heap2 (LIKE big_src) USING heap; INSERT INTO big_heap2 SELECT * FROM big_src;"
            "DROP TABLE big_src;"
            # set hint bits and the visibility map now, so that no measured scan writes
            "VACUUM (FREEZE, ANALYZE) big_heap; VACUUM (FREEZE, ANALYZE) big_tde; VACUUM (FREEZE, ANALYZE) big_heap2;"
            "CHECKPOINT",
            db,
        )
        for t in info["tables"].values():
            enc = srv.psql(f"SELECT pg_tde_is_encrypted('{t}')", db)
            info["sizes"][t] = int(srv.psql(f"SELECT pg_relation_size('{t}')", db))
            if (enc == "t") != (t == "big_tde"):
                raise RuntimeError(f"{t}: pg_tde_is_encrypted = {enc}")

    if any(b in benches for b in ("pgbench-S", "pgbench-tpcb", "wal-write")):
        for key, db in info["pgbench_dbs"].items():
            if key != "heap" and not any(b in benches for b in ("pgbench-S", "pgbench-tpcb")):
                continue  # wal-write only needs the heap database
            new_db(db)
            am = "tde_heap" if key == "tde" else "heap"
            log(f"pgbench -i -s {pgb_scale} in {db} (default_table_access_method={am})")
            srv.pgbench(db, ["-i", "-q", "-s", str(pgb_scale)], env_extra={"PGOPTIONS": f"-c default_table_access_method={am}"},
                        timeout=7200, measured=False)
            enc = srv.psql(
                "SELECT string_agg(relname || '=' || pg_tde_is_encrypted(oid)::text, ' ' ORDER BY relname) FROM pg_class "
                "WHERE relname IN ('pgbench_accounts', 'pgbench_accounts_pkey', 'pgbench_history', 'pgbench_branches')", db)
            want = "true" if key == "tde" else "false"
            if any(not kv.endswith("=" + want) for kv in enc.split()):
                raise RuntimeError(f"{db}: unexpected encryption status {enc}")
            info["sizes"][db] = int(srv.psql(f"SELECT pg_database_size('{db}')", db))
        srv.psql("CHECKPOINT")
    return info


def build_profile() -> str:
    """Which cargo profile the installed pg_tde.so came from (by GNU build id), if we can tell."""
    so = PG_PREFIX / "lib" / "postgresql" / "pg_tde.so"

    def build_id(p: Path) -> str | None:
        try:
            out = subprocess.run(["file", "-L", str(p)], capture_output=True, text=True).stdout
        except FileNotFoundError:
            return None
        m = re.search(r"BuildID\[sha1\]=([0-9a-f]+)", out)
        return m.group(1) if m else None

    installed = build_id(so)
    target = Path(os.environ.get("CARGO_TARGET_DIR", "/nonexistent"))
    for profile in ("release", "debug"):
        cand = target / profile / "libpg_tde.so"
        if installed and cand.exists() and build_id(cand) == installed:
            return f"{profile} ({'cargo pgrx install --release' if profile == 'release' else 'dev profile, as scripts/test.sh installs it'})"
    return "unknown (no matching build in CARGO_TARGET_DIR)"


def git_rev() -> str:
    try:
        rev = subprocess.run(["git", "-C", str(REPO_ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(REPO_ROOT), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True).stdout.strip()
        return rev + ("+uncommitted changes" if dirty else "")
    except FileNotFoundError:
        return "?"


def mb(n: int) -> str:
    return f"{n / 2**20:.0f} MB"


# ---------------------------------------------------------------------------


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scale", type=float, default=1.0, help="data size factor: 1 = ~512 MB table and pgbench scale 34 (4x shared_buffers)")
    ap.add_argument("--pairs", type=int, default=5, help="measured pairs per comparison (default 5)")
    ap.add_argument("--duration", type=int, default=10, help="pgbench -T seconds (default 10)")
    ap.add_argument("--reps", type=int, default=3, help="count(*) scans per seqscan run (median; default 3)")
    ap.add_argument("--clients", type=int, default=4, help="pgbench clients for -S / tpcb-like (default 4, -j 2)")
    ap.add_argument("--write-clients", type=int, default=16, help="pgbench clients for the WAL write run (default 16, -j 2)")
    ap.add_argument("--bench", default=",".join(ALL_BENCHES), help=f"comma-separated subset of: {','.join(ALL_BENCHES)}")
    ap.add_argument("--workdir", type=Path, default=Path(os.environ.get("PG_TDE_BENCH_DIR", "/var/tmp/pg_tde-bench")),
                    help="where the temporary server and the default results dir go")
    ap.add_argument("--out", type=Path, help="results directory (default: WORKDIR/results-<timestamp>)")
    ap.add_argument("--io-method", default="",
                    help="io_method of the server (PostgreSQL 18: worker, the default, sync or io_uring)")
    ap.add_argument("--keep", action="store_true", help="keep the server's data directory")
    ap.add_argument("--no-pin", action="store_true",
                    help="let the scheduler place pgbench and the server (default: pgbench on CPU 0, server on the others)")
    ap.add_argument("--profile", action="store_true",
                    help="sample every measured pgbench run with perf on the server's CPUs and report pg_tde.so's share")
    ap.add_argument("--summarize", type=Path, metavar="RESULTS_DIR",
                    help="run nothing: print the table again from RESULTS_DIR/runs.csv (e.g. of an interrupted run)")
    args = ap.parse_args()

    if args.summarize:
        csv_path = args.summarize / "runs.csv" if args.summarize.is_dir() else args.summarize
        results, loads = results_from_csv(csv_path)
        conds = [f"- summarized from {csv_path}"]
        if loads:
            conds.append(f"- 1-min load average sampled after each run: {loads[0]:.2f} – {loads[1]:.2f}")
        print(render(results, conds, csv_path))
        return 0

    benches = [b.strip() for b in args.bench.split(",") if b.strip()]
    for b in benches:
        if b not in TARGETS:
            ap.error(f"unknown benchmark {b}")
    if args.pairs < 1 or args.scale <= 0:
        ap.error("--pairs must be >= 1 and --scale > 0")
    if not (BIN / "pgbench").exists():
        ap.error(f"no pgbench in {BIN}: run through scripts/bench-db.sh (PG_PREFIX)")
    if args.profile and not shutil.which("perf"):
        ap.error("--profile needs perf (Debian: apt-get install linux-perf)")

    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    out = args.out or (args.workdir / f"results-{stamp}")
    out.mkdir(parents=True, exist_ok=True)
    rows = max(10_000, int(ROWS_FULL * args.scale))
    pgb_scale = max(1, round(PGBENCH_SCALE_FULL * args.scale))
    so = PG_PREFIX / "lib" / "postgresql" / "pg_tde.so"
    wait_for_library()
    so_stat = (so.stat().st_mtime, so.stat().st_size)
    profile = build_profile()

    def _term(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, _term)

    t0 = time.time()
    load0 = os.getloadavg()
    srv = Server(args.workdir)
    cpus = sorted(os.sched_getaffinity(0))
    if not args.no_pin and len(cpus) >= 2:
        srv.placement = ({cpus[0]}, set(cpus[1:]))
    if args.profile:
        srv.profile_dir = out
    rec = Recorder(out / "runs.csv")
    info: dict = {}
    version = "?"
    io_method = "?"
    failures: list[str] = []
    checkpoints: list[str] = []
    try:
        log(f"server in {srv.base}, results in {out}")
        srv.initdb(args.io_method)
        srv.start()
        version = srv.psql("SHOW server_version")
        io_method = srv.psql("SELECT coalesce((SELECT setting FROM pg_settings WHERE name = 'io_method'), 'n/a (no AIO)')")
        info = setup_databases(srv, rows, pgb_scale, benches)
        tdb, tables, dbs = info["table_db"], info["tables"], info["pgbench_dbs"]
        objs = {
            "seqscan": lambda: SeqScan(srv, tdb, tables, args.reps),
            "pgbench-S": lambda: PgbenchRead(srv, dbs, True, args.duration, args.clients, 2),
            "pgbench-tpcb": lambda: PgbenchRead(srv, dbs, False, args.duration, args.clients, 2),
            "ctas": lambda: Rewrite(srv, tdb, tables, "ctas"),
            "vacuum-full": lambda: Rewrite(srv, tdb, tables, "vacuum-full"),
            "alter-rewrite": lambda: Rewrite(srv, tdb, tables, "alter-rewrite"),
            "wal-write": lambda: WalWrite(srv, dbs["heap"], args.duration, args.write_clients, 2),
        }
        for name in ALL_BENCHES:  # fixed order: rewrites after the scans, WAL restarts last
            if name not in benches:
                continue
            log(f"benchmark {name}")
            try:
                measure(objs[name](), args.pairs, rec)
            except (RuntimeError, subprocess.SubprocessError, OSError) as e:
                # Keep what was measured; go on with the next benchmark on a running server.
                failures.append(f"{name}: {str(e).splitlines()[0]}")
                log(f"benchmark {name} FAILED: {e}")
                if subprocess.run(as_user([str(BIN / "pg_ctl"), "-D", str(srv.datadir), "status"]),
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode != 0:
                    srv.start()
        checkpoints = re.findall(r"checkpoint starting: ([a-z ]+)", srv.logfile.read_text(errors="replace"))
    except KeyboardInterrupt as e:
        failures.append(f"interrupted ({e or 'SIGINT'})")
    except (RuntimeError, subprocess.SubprocessError, OSError) as e:
        failures.append(f"aborted: {str(e).splitlines()[0]}")
        log(f"ABORTED: {e}")
    finally:
        rec.close()
        try:
            srv.stop()
        finally:
            if srv.logfile.exists():
                shutil.copy(srv.logfile, out / "server.log")
            if not args.keep:
                shutil.rmtree(srv.base, ignore_errors=True)
            else:
                log(f"kept {srv.base}")

    elapsed = time.time() - t0
    load1 = os.getloadavg()
    unplanned = [c for c in checkpoints if "wal" in c or "time" in c]
    try:
        so_changed = (so.stat().st_mtime, so.stat().st_size) != so_stat
    except FileNotFoundError:
        so_changed = True
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
    results, loads = results_from_csv(out / "runs.csv")

    sizes = ", ".join(f"{k} {mb(v)}" for k, v in info.get("sizes", {}).items())
    conditions = [
        f"- command: `bash scripts/bench-db.sh {' '.join(sys.argv[1:])}`".rstrip(),
        f"- date: {dt.datetime.now().isoformat(timespec='minutes')}, elapsed {elapsed / 60:.1f} min; git {git_rev()}",
        f"- server: PostgreSQL {version}, io_method {io_method}, pg_tde.so build: {profile}; shared_buffers 128MB, fsync on, synchronous_commit on, "
        "max_wal_size 8GB, autovacuum off, checksums on, pg_tde.cipher default (aes_128_xts)",
        f"- data: --scale {args.scale} ({rows} rows per large table; pgbench scale {pgb_scale}); sizes: {sizes or 'n/a'}",
        f"- method: {args.pairs} pairs per comparison after one warm-up run per side; pgbench -T {args.duration}; "
        f"seqscan median of {args.reps} scans per run; "
        + (f"pgbench runs: pgbench on CPU {sorted(srv.placement[0])}, the server on CPUs {sorted(srv.placement[1])}"
           if srv.placement else "pgbench runs: placed by the scheduler (--no-pin)")
        + ("; measured pgbench runs sampled with perf (--profile)" if args.profile else ""),
        f"- machine: {os.cpu_count()} CPUs ({cpu}, {os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GB); "
        f"load average (1/5/15 min) at start {load0[0]:.2f}/{load0[1]:.2f}/{load0[2]:.2f}, "
        f"at end {load1[0]:.2f}/{load1[1]:.2f}/{load1[2]:.2f}"
        + (f"; 1-min load after each run {loads[0]:.2f} – {loads[1]:.2f}" if loads else ""),
        f"- checkpoints not requested by the benchmark (wal/time) during the run: {len(unplanned)}",
    ]
    small = [t for t in ("big_heap", "big_tde") if 0 < info.get("sizes", {}).get(t, 1 << 40) <= 32 * 2**20]
    if small and "seqscan" in benches:
        conditions.append("- NOTE: the large tables are not larger than shared_buffers/4 (32 MB) at this scale, so a seq scan "
                          "keeps them in shared_buffers and the seqscan row measures no decryption")
    if so_changed:
        conditions.append("- WARNING: pg_tde.so was replaced during the run (another job installed it); "
                          "server restarts after that loaded the new file")
    for f in failures:
        conditions.append(f"- FAILED: {f} (the table has the complete pairs measured before)")

    text = render(results, conditions, out / "runs.csv")
    (out / "results.md").write_text(text)
    print(text)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
