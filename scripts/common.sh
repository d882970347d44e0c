# shellcheck shell=bash
# Shared settings for the pg_tde build and test scripts.  Source it; do not run it.
#
#   PG_TDE_PG_MAJOR=17|18   the PostgreSQL major to build and use (default 18)
#   PG_TDE_PG_SOURCE=FILE   a postgresql-X.Y.tar.{bz2,gz} to build instead of
#                           Debian's newest postgresql-<major> source package
#   PG_TDE_CACHE=DIR        where builds are cached (default /var/cache/pg_tde-build)

set -euo pipefail

REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export REPO_ROOT

SUPPORTED_PG_MAJORS=(18 17)
PG_MAJOR=${PG_TDE_PG_MAJOR:-18}
case " ${SUPPORTED_PG_MAJORS[*]} " in
    *" $PG_MAJOR "*) ;;
    *) echo "PG_TDE_PG_MAJOR=$PG_MAJOR: pg_tde supports PostgreSQL ${SUPPORTED_PG_MAJORS[*]}" >&2; exit 2 ;;
esac
export PG_TDE_PG_MAJOR=$PG_MAJOR
PATCH_DIR=$REPO_ROOT/patches/postgresql/$PG_MAJOR
PGRX_VERSION=$(sed -n 's/^pgrx = { *version *= *"=\([0-9.]*\)".*/\1/p; s/^pgrx = "=\([0-9.]*\)"/\1/p' "$REPO_ROOT/pg_tde/Cargo.toml" | head -n1)

# Everything built outside the repository lives here.  A build is keyed by
# major, minor and the hash of the patch series: pg-<version>-<hash>/.  The
# link pg<major>-<hash> names the build setup.sh made for this series, so that
# the other scripts find it without asking apt again.
PG_TDE_CACHE=${PG_TDE_CACHE:-/var/cache/pg_tde-build}
PATCH_HASH=$(cat "$PATCH_DIR"/*.patch | sha256sum | cut -c1-12)
PG_BUILD_LINK=$PG_TDE_CACHE/pg$PG_MAJOR-$PATCH_HASH
export PG_TDE_CACHE PG_MAJOR

# use_pg_build: point PG_PREFIX, PG_CONFIG, PGRX_HOME and CARGO_TARGET_DIR at
# the build setup.sh made (one pgrx home and cargo target directory per build:
# pgrx does not notice header changes on its own).  Returns 1 if there is none.
use_pg_build() {
    [ -x "$PG_BUILD_LINK/bin/pg_config" ] || return 1
    PG_PREFIX=$(readlink -f "$PG_BUILD_LINK")
    PG_CONFIG=$PG_PREFIX/bin/pg_config
    local build
    build=$(basename "$PG_PREFIX")
    PGRX_HOME=${PG_TDE_PGRX_HOME:-$PG_TDE_CACHE/pgrx-home-$build}
    CARGO_TARGET_DIR=${PG_TDE_CARGO_TARGET_DIR:-$PG_TDE_CACHE/target-$build}
    export PG_PREFIX PG_CONFIG PGRX_HOME CARGO_TARGET_DIR
}
if ! use_pg_build; then
    # No build for this major yet: nothing of another major's may linger.
    unset PG_PREFIX PG_CONFIG PGRX_HOME
    export CARGO_TARGET_DIR=${PG_TDE_CARGO_TARGET_DIR:-$PG_TDE_CACHE/target-no-pg}
fi

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
