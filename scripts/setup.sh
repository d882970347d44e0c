#!/usr/bin/env bash
# Installs everything pg_tde needs on a fresh Debian machine and builds the
# patched PostgreSQL.  Idempotent: each step is skipped when its result is
# already there (the PostgreSQL build is cached by version and patch hash).
#
#   bash scripts/setup.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

APT_PACKAGES=(bison flex libclang-dev libreadline-dev zlib1g-dev sudo pkg-config
              libssl-dev dpkg-dev build-essential openssl)

install_apt_packages() {
    local missing=()
    for p in "${APT_PACKAGES[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
    done
    [ ${#missing[@]} -eq 0 ] && return
    log "installing apt packages: ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
}

fetch_postgres_source() {
    local dir=$PG_TDE_CACHE/src
    mkdir -p "$dir"
    if [ ! -f "$dir/$PG_TARBALL" ]; then
        local src_list=/etc/apt/sources.list.d/pg-tde-trixie-src.sources
        if [ ! -f "$src_list" ]; then
            log "adding a deb-src entry for Debian trixie"
            cat > "$src_list" <<'SRC'
Types: deb-src
URIs: http://deb.debian.org/debian
Suites: trixie
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
        fi
        apt-get update -qq
        log "fetching postgresql-17 $PG_DEB_VERSION source"
        (cd "$dir" && apt-get source -qq --download-only "postgresql-17=$PG_DEB_VERSION" 2>/dev/null)
    fi
    echo "$PG_TARBALL_SHA256  $dir/$PG_TARBALL" | sha256sum -c --quiet -
}

build_postgres() {
    if [ -x "$PG_CONFIG" ]; then
        log "patched PostgreSQL $PG_VERSION already built in $PG_PREFIX"
        return
    fi
    fetch_postgres_source
    local build=$PG_TDE_CACHE/build-$PG_VERSION-$PATCH_HASH
    rm -rf "$build" && mkdir -p "$build"
    tar -xjf "$PG_TDE_CACHE/src/$PG_TARBALL" -C "$build" --strip-components=1
    for p in "$REPO_ROOT"/patches/postgresql/17/*.patch; do
        log "applying $(basename "$p")"
        patch -d "$build" -p1 --quiet --no-backup-if-mismatch < "$p"
    done
    log "building PostgreSQL $PG_VERSION into $PG_PREFIX (about 4 minutes)"
    (
        cd "$build"
        ./configure --quiet --prefix="$PG_PREFIX" --enable-debug --enable-depend \
            --without-icu --with-openssl >/dev/null
        make -s -j"$(nproc)" world-bin >/dev/null
        make -s install-world-bin >/dev/null
    )
    rm -rf "$build"
}

ensure_os_user() {
    id "$PG_TDE_OS_USER" >/dev/null 2>&1 || useradd -r -m -s /bin/bash "$PG_TDE_OS_USER"
}

install_cargo_pgrx() {
    if command -v cargo-pgrx >/dev/null && cargo pgrx --version 2>/dev/null | grep -q " $PGRX_VERSION\$"; then
        return
    fi
    log "installing cargo-pgrx $PGRX_VERSION (about 5 minutes)"
    cargo install cargo-pgrx --version "$PGRX_VERSION" --locked --quiet
}

init_pgrx() {
    if grep -qs "pg17 = \"$PG_CONFIG\"" "$PGRX_HOME/config.toml"; then
        return
    fi
    log "cargo pgrx init --pg17 $PG_CONFIG"
    mkdir -p "$PGRX_HOME"
    cargo pgrx init --pg17 "$PG_CONFIG" >/dev/null
}

main() {
    [ "$(id -u)" = 0 ] || { echo "run as root (it installs packages and creates the $PG_TDE_OS_USER user)" >&2; exit 1; }
    install_apt_packages
    ensure_os_user
    build_postgres
    install_cargo_pgrx
    init_pgrx
    # The server runs as an unprivileged user: it must be able to read the build.
    chmod -R a+rX "$PG_PREFIX"
    log "PostgreSQL binaries: $PG_PREFIX/bin"
}

main "$@"
