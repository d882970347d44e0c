#!/usr/bin/env bash
# Database benchmarks: heap vs tde_heap (and WAL encryption off vs on) in one
# patched PostgreSQL server, in paired, interleaved runs with an A/A control.
# Prints a Markdown table; raw per-run numbers go to a CSV file.  See
# docs/performance.md.
#
#   bash scripts/bench-db.sh                         # full size (~512 MB tables), 5 pairs
#   bash scripts/bench-db.sh --scale 0.1 --pairs 2   # quick check
#   bash scripts/bench-db.sh --io-method sync        # PostgreSQL 18: another io_method
#   bash scripts/bench-db.sh --help
#
# Needs the patched PostgreSQL and pg_tde installed in PG_PREFIX (scripts/setup.sh,
# scripts/demo.sh or scripts/test.sh do that); it builds nothing.
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

if ! use_pg_build || [ ! -x "$PG_PREFIX/bin/pgbench" ] || [ ! -f "$PG_PREFIX/lib/postgresql/pg_tde.so" ]; then
    log "no patched PostgreSQL $PG_MAJOR with pg_tde installed: run bash scripts/demo.sh (or scripts/test.sh) first"
    exit 1
fi

exec python3 "$REPO_ROOT/scripts/bench_db.py" "$@"
