#!/usr/bin/env bash
# Runs every check and test of pg_tde: formatting, clippy (warnings denied),
# unit tests of the pgrx-free core, and, for every PostgreSQL major that can be
# built here, the in-backend pgrx tests and the cluster integration tests (real
# clusters: restart, kill -9, standby, base backup).  On 18 the integration
# suite runs under each io_method (worker, the default, with checksums on;
# sync with checksums off; io_uring when the kernel allows it).
# A major whose source cannot be fetched is type-checked against its headers
# (scripts/typecheck-headers.sh) and reported as skipped.
# Installs what it needs first (scripts/setup.sh), so it works on a fresh machine.
#
#   bash scripts/test.sh                       # every major that can be built
#   PG_TDE_TEST_MAJORS=18 bash scripts/test.sh # only these
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

MAJORS=${PG_TDE_TEST_MAJORS:-${SUPPORTED_PG_MAJORS[*]}}
# A tarball given with PG_TDE_PG_SOURCE is for the major it holds only.
USER_SOURCE=""
USER_SOURCE_MAJOR=""
if [ -n "${PG_TDE_PG_SOURCE:-}" ]; then
    USER_SOURCE=$(readlink -f "$PG_TDE_PG_SOURCE")
    USER_SOURCE_MAJOR=$(tar -tf "$USER_SOURCE" | head -n1 | sed -n 's/^postgresql-\([0-9]*\)\..*/\1/p' || true)
fi
bash "$REPO_ROOT/scripts/install-test-servers.sh"
cd "$REPO_ROOT"
python3 -m pytest --version >/dev/null 2>&1 || python3 -m pip install -q pytest

tested=()
skipped=()
first=1
for major in $MAJORS; do
    export PG_TDE_PG_MAJOR=$major
    if [ -n "$USER_SOURCE" ] && [ "$USER_SOURCE_MAJOR" = "$major" ]; then
        export PG_TDE_PG_SOURCE=$USER_SOURCE
    else
        unset PG_TDE_PG_SOURCE
    fi
    # shellcheck source=common.sh
    source "$REPO_ROOT/scripts/common.sh"
    log "PostgreSQL $major: setup"
    rc=0
    bash "$REPO_ROOT/scripts/setup.sh" || rc=$?
    if [ "$rc" = 3 ]; then
        log "PostgreSQL $major: no source for it can be fetched here (see above): no server to test;"
        log "type-checking pg_tde against its headers instead"
        trc=0
        bash "$REPO_ROOT/scripts/typecheck-headers.sh" "$major" || trc=$?
        if [ "$trc" = 0 ]; then
            skipped+=("$major (no source: type-checked against its headers, not run)")
        elif [ "$trc" = 3 ]; then
            skipped+=("$major (no source, no headers: not even type-checked)")
        else
            exit "$trc"
        fi
        continue
    elif [ "$rc" != 0 ]; then
        exit "$rc"
    fi
    use_pg_build
    features=(--no-default-features --features "pg$major")

    if [ "$first" = 1 ]; then
        first=0
        log "cargo fmt --check"
        cargo fmt --all -- --check
        log "unit tests of the pgrx-free core and the tools (with real OpenBao and PyKMIP servers)"
        cargo test -p tde-core -p tde-tools --locked
    fi
    log "cargo clippy, PostgreSQL $major (warnings denied)"
    cargo clippy --workspace --all-targets --locked "${features[@]}" -- -D warnings

    cargo build -p tde-tools --locked
    # The tools live beside pg_waldump & co (archive_command runs them as the server's user).
    install -m 755 "$CARGO_TARGET_DIR"/debug/pg_tde_{change_key_provider,decrypt_wal,archive_decrypt,restore_encrypt,basebackup,checksums,rewind,upgrade,amcheck} "$PG_PREFIX/bin/"
    export PG_TDE_BIN=$PG_PREFIX/bin

    log "installing the extension into $PG_PREFIX"
    # Unlink first: servers still running keep the old file, instead of crashing on an overwrite.
    rm -f "$PG_PREFIX/lib/postgresql/pg_tde.so"
    (cd pg_tde && cargo pgrx install --pg-config "$PG_CONFIG" "${features[@]}" >/dev/null)

    log "in-backend tests (cargo pgrx test pg$major)"
    PGRX_TEST_DATA=$PG_TDE_CACHE/pgrx-test-data
    mkdir -p "$PGRX_TEST_DATA"
    chown "$PG_TDE_OS_USER" "$PGRX_TEST_DATA"
    chmod a+rwx "$PG_TDE_CACHE" "$PGRX_HOME"
    # Keyrings that earlier runs' in-backend tests left behind (keys are not
    # transactional, so they outlive each test's rollback).
    rm -rf "${TMPDIR:-/tmp}"/pg_tde_pgtest_*
    (cd pg_tde && cargo pgrx test "pg$major" "${features[@]}" --runas "$PG_TDE_OS_USER" --pgdata "$PGRX_TEST_DATA/pg$major")

    if [ "$major" -ge 18 ]; then
        configs=("worker on" "sync off")
        if why=$(python3 "$REPO_ROOT/scripts/io_uring_probe.py"); then
            configs+=("io_uring on")
        else
            log "io_method=io_uring: SKIPPED, this kernel refuses io_uring_setup ($why)"
            skipped+=("$major io_uring ($why)")
        fi
    else
        configs=("default on")
    fi
    for cfg in "${configs[@]}"; do
        read -r io checksums <<<"$cfg"
        [ "$io" = default ] && io=""
        log "cluster integration tests, PostgreSQL $major, io_method=${io:-default}, data checksums $checksums"
        PG_TDE_TEST_IO_METHOD=$io PG_TDE_TEST_CHECKSUMS=$checksums python3 -m pytest -q tests/integration
        tested+=("$major io_method=${io:-default} checksums=$checksums")
    done
done

log "tested: ${tested[*]:-nothing}"
[ ${#skipped[@]} -eq 0 ] || log "skipped: ${skipped[*]}"
[ ${#tested[@]} -gt 0 ] || { echo "no PostgreSQL major could be built: nothing was tested" >&2; exit 1; }
