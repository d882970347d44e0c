# shellcheck shell=bash
# Shared settings for the pg_tde build and test scripts.  Source it; do not run it.

set -euo pipefail

REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export REPO_ROOT

# The pinned PostgreSQL: Debian trixie's postgresql-17 source package.
PG_VERSION=17.11
PG_DEB_VERSION=17.11-0+deb13u1
PG_TARBALL=postgresql-17_${PG_VERSION}.orig.tar.bz2
PG_TARBALL_SHA256=dd27f2b3c59e73ed14aa3324901242bf69a032a6347805f274e6260322d42979
PGRX_VERSION=$(sed -n 's/^pgrx = { *version *= *"=\([0-9.]*\)".*/\1/p; s/^pgrx = "=\([0-9.]*\)"/\1/p' "$REPO_ROOT/pg_tde/Cargo.toml" | head -n1)

# Everything built outside the repository lives here, keyed so that a change
# of version or patch series builds afresh and nothing else does.
PG_TDE_CACHE=${PG_TDE_CACHE:-/var/cache/pg_tde-build}
PATCH_HASH=$(cat "$REPO_ROOT"/patches/postgresql/17/*.patch | sha256sum | cut -c1-12)
PG_PREFIX=$PG_TDE_CACHE/pg-$PG_VERSION-$PATCH_HASH
PG_CONFIG=$PG_PREFIX/bin/pg_config
export PG_PREFIX PG_CONFIG PG_TDE_CACHE

# pgrx state and one cargo target directory per PostgreSQL build (pgrx does not
# notice header changes on its own).
export PGRX_HOME=${PGRX_HOME:-$PG_TDE_CACHE/pgrx-home}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$PG_TDE_CACHE/target-$PATCH_HASH}

# The unprivileged OS user that runs clusters (initdb/postgres refuse root).
PG_TDE_OS_USER=${PG_TDE_OS_USER:-postgres}
export PG_TDE_OS_USER

log() { printf '==> %s\n' "$*" >&2; }

# run_as_pguser CMD...: run a command as the unprivileged user (or as is when
# we are not root).
run_as_pguser() {
    if [ "$(id -u)" = 0 ]; then
        runuser -u "$PG_TDE_OS_USER" -- env PATH="$PG_PREFIX/bin:$PATH" "$@"
    else
        "$@"
    fi
}
