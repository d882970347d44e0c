"""Online re-keying benchmark (see scripts/bench-rekey.sh and docs/performance.md).

One cluster (the test harness's: an unprivileged OS user, a keyring-file
provider), `pgbench -i` with every table `tde_heap`.  Each pair runs the
tpcb-like pgbench for --duration seconds twice, in alternating order: once
alone, once while another session rotates the keys of pgbench_accounts (its
heap and primary key index) from the start of the run.  Prints the median tps
ratio (with / without) and the walk's speed: the size of the re-keyed files
divided by the time the rotation took.
"""

from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "integration"))

from cluster import BIN, Cluster, make_keyring_dir, setup_encryption  # noqa: E402


def pgbench(c: Cluster, duration: int, clients: int) -> float:
    out = subprocess.run(
        [str(BIN / "pgbench"), "-h", str(c.sockdir), "-p", str(c.port), "-U", "postgres",
         "-c", str(clients), "-j", "2", "-T", str(duration), "-n", "postgres"],
        capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"pgbench failed: {out.stderr[-2000:]}")
    out = out.stdout
    return float(re.search(r"tps = ([0-9.]+)", out).group(1))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--scale", type=int, default=20)
    ap.add_argument("--pairs", type=int, default=3)
    ap.add_argument("--duration", type=int, default=20)
    ap.add_argument("--clients", type=int, default=4)
    a = ap.parse_args()
    c = Cluster("bench-rekey")
    c.initdb("shared_buffers = 128MB\nmax_wal_size = 8GB\ncheckpoint_timeout = 1h\nautovacuum = off\n")
    c.start()
    try:
        setup_encryption(c, make_keyring_dir())
        subprocess.run([str(BIN / "pgbench"), "-i", "-q", "-s", str(a.scale), "-h", str(c.sockdir), "-p", str(c.port),
                        "-U", "postgres", "postgres"], check=True, capture_output=True,
                       env={"PGOPTIONS": "-c default_table_access_method=tde_heap", "PATH": "/usr/bin:/bin"})
        assert c.sql("SELECT pg_tde_is_encrypted('pgbench_accounts')") == "t"
        size = int(c.sql("SELECT pg_relation_size('pgbench_accounts') + pg_relation_size('pgbench_accounts_pkey')"))
        ratios, speeds, base_tps, rekey_tps = [], [], [], []
        for pair in range(a.pairs):
            order = ["base", "rekey"] if pair % 2 == 0 else ["rekey", "base"]
            for kind in order:
                c.sql("CHECKPOINT")
                if kind == "base":
                    base_tps.append(pgbench(c, a.duration, a.clients))
                    continue
                took = {}

                def rotate() -> None:
                    t0 = time.time()
                    c.sql("SELECT pg_tde_rotate_relation_key('pgbench_accounts')")
                    took["s"] = time.time() - t0

                t = threading.Thread(target=rotate)
                t.start()
                rekey_tps.append(pgbench(c, a.duration, a.clients))
                t.join()
                speeds.append(size / took["s"] / 1e6)
            ratios.append(rekey_tps[-1] / base_tps[-1])
        print(f"\n| measure | value |\n|---|---|")
        print(f"| pgbench tps without re-keying (median) | {statistics.median(base_tps):.0f} |")
        print(f"| pgbench tps while re-keying (median) | {statistics.median(rekey_tps):.0f} |")
        print(f"| ratio with / without (median of {a.pairs} pairs) | {statistics.median(ratios):.2f} |")
        print(f"| walk speed, MB/s (median) | {statistics.median(speeds):.1f} |")
        print(f"| re-keyed per run | {size / 1e6:.0f} MB (pgbench_accounts and its index, scale {a.scale}) |")
        print(f"\n(pgbench -c {a.clients} -j 2 -T {a.duration}, tpcb-like; {subprocess.run(['nproc'], capture_output=True, text=True).stdout.strip()} CPUs)")
    finally:
        c.destroy()
    return 0


if __name__ == "__main__":
    sys.exit(main())
