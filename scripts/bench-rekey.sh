#!/usr/bin/env bash
# Online re-keying benchmark: pgbench throughput while pgbench_accounts is being
# re-keyed (pg_tde_rotate_relation_key), as a ratio against the same run without
# re-keying, in interleaved pairs; and the walk's speed in MB/s.  See
# docs/performance.md.
#
#   bash scripts/bench-rekey.sh                  # scale 20 (~300 MB), 3 pairs of 20 s runs
#   bash scripts/bench-rekey.sh --scale 5 --pairs 2 --duration 10
#
# Needs the patched PostgreSQL and pg_tde installed in PG_PREFIX; builds nothing.
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

if ! use_pg_build || [ ! -x "$PG_PREFIX/bin/pgbench" ] || [ ! -f "$PG_PREFIX/lib/postgresql/pg_tde.so" ]; then
    log "no patched PostgreSQL $PG_MAJOR with pg_tde installed: run bash scripts/demo.sh (or scripts/test.sh) first"
    exit 1
fi

exec python3 "$REPO_ROOT/scripts/bench_rekey.py" "$@"
