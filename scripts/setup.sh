#!/usr/bin/env bash
# Installs everything pg_tde needs on a fresh Debian machine and builds the
# patched PostgreSQL.  Idempotent: each step is skipped when its result is
# already there (the PostgreSQL build is cached by major, minor and patch hash).
#
#   bash scripts/setup.sh                         # PostgreSQL 18 (the default)
#   PG_TDE_PG_MAJOR=17 bash scripts/setup.sh      # PostgreSQL 17
#   PG_TDE_PG_SOURCE=~/postgresql-18.6.tar.bz2 bash scripts/setup.sh
#   PG_TDE_PG_REFRESH=1 bash scripts/setup.sh     # look for a newer minor in apt
#
# The source is, in this order: PG_TDE_PG_SOURCE (a tarball from
# postgresql.org), or the newest version of Debian's postgresql-<major> source
# package that apt can actually download (apt verifies it against the signed
# Sources indexes).  Exit status 3 means no source could be had.
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

APT_PACKAGES=(bison flex libclang-dev libreadline-dev zlib1g-dev sudo pkg-config
              libssl-dev dpkg-dev build-essential openssl liburing-dev)
# Source-only entries: they make source packages visible and change no
# installed binary package.  Newest minors appear in sid/forky first; stable
# point releases in trixie and trixie-security.
SRC_LIST=/etc/apt/sources.list.d/pg-tde-src.sources
NO_SOURCE_EXIT=3

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

add_deb_src_entries() {
    local want
    want=$(mktemp)
    cat > "$want" <<'SRC'
Types: deb-src
URIs: http://deb.debian.org/debian
Suites: trixie forky sid
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb-src
URIs: http://deb.debian.org/debian-security
Suites: trixie-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
    if cmp -s "$want" "$SRC_LIST"; then
        rm -f "$want"
    else
        log "writing deb-src entries (trixie, trixie-security, forky, sid) to $SRC_LIST"
        mv "$want" "$SRC_LIST"
        chmod 644 "$SRC_LIST"
    fi
}

# fetch_debian_source: sets SRC_TARBALL and SRC_ORIGIN to the newest
# postgresql-<major> source that downloads, or exits with NO_SOURCE_EXIT.
fetch_debian_source() {
    add_deb_src_entries
    apt-get update -qq || log "apt-get update failed; trying with the indexes apt has"
    local versions tried=() v dir
    versions=$({ apt-cache showsrc "postgresql-$PG_MAJOR" 2>/dev/null || true; } | sed -n 's/^Version: //p' | sort -V -r -u)
    for v in $versions; do
        dir=$PG_TDE_CACHE/src/postgresql-$PG_MAJOR-$v
        if [ ! -f "$dir/.complete" ]; then
            rm -rf "$dir" && mkdir -p "$dir"
            log "fetching postgresql-$PG_MAJOR $v source (apt verifies it against the signed indexes)"
            # _apt cannot write into root's cache directory; apt then downloads as root.
            if ! (cd "$dir" && apt-get source -qq --download-only "postgresql-$PG_MAJOR=$v" >"$dir/apt.log" 2>&1); then
                tried+=("postgresql-$PG_MAJOR $v: $(grep -m1 -E '^(E|Err):' "$dir/apt.log" || echo 'apt-get source failed')")
                rm -rf "$dir"
                continue
            fi
            touch "$dir/.complete"
        fi
        SRC_TARBALL=$(ls "$dir"/postgresql-"$PG_MAJOR"_*.orig.tar.* 2>/dev/null | head -n1 || true)
        if [ -n "$SRC_TARBALL" ]; then
            SRC_ORIGIN="Debian source package postgresql-$PG_MAJOR $v"
            return
        fi
        tried+=("postgresql-$PG_MAJOR $v: no .orig tarball in the package")
    done
    {
        echo
        echo "ERROR: no PostgreSQL $PG_MAJOR source could be fetched."
        if [ -z "$versions" ]; then
            echo "  apt lists no postgresql-$PG_MAJOR source package in the suites of $SRC_LIST."
        else
            echo "  Tried, newest first:"
            printf '    %s\n' "${tried[@]}"
        fi
        echo "  Download postgresql-$PG_MAJOR.<minor>.tar.bz2 (or .tar.gz) from https://www.postgresql.org/ftp/source/"
        echo "  and run again with PG_TDE_PG_SOURCE=/path/to/that/tarball."
    } >&2
    exit $NO_SOURCE_EXIT
}

# tarball_version FILE: the X.Y version inside a PostgreSQL source tarball.
tarball_version() {
    local top
    top=$(tar -tf "$1" 2>/dev/null | head -n1 | cut -d/ -f1)
    case "$top" in
        postgresql-[0-9]*) echo "${top#postgresql-}" ;;
        *) echo "ERROR: $1 is not a PostgreSQL source tarball (its top directory is \"$top\")" >&2; exit 2 ;;
    esac
}

build_postgres() {
    if [ -z "${PG_TDE_PG_SOURCE:-}" ] && [ -z "${PG_TDE_PG_REFRESH:-}" ] && use_pg_build; then
        log "patched PostgreSQL $(sed -n 's/^version=//p' "$PG_PREFIX/pg_tde-build-info") already built in $PG_PREFIX (PG_TDE_PG_REFRESH=1 looks for a newer minor)"
        return
    fi
    local SRC_TARBALL SRC_ORIGIN
    if [ -n "${PG_TDE_PG_SOURCE:-}" ]; then
        [ -f "$PG_TDE_PG_SOURCE" ] || { echo "PG_TDE_PG_SOURCE=$PG_TDE_PG_SOURCE: no such file" >&2; exit 2; }
        SRC_TARBALL=$(readlink -f "$PG_TDE_PG_SOURCE")
        SRC_ORIGIN="tarball $SRC_TARBALL (PG_TDE_PG_SOURCE)"
    else
        fetch_debian_source
    fi
    local version sha prefix build
    version=$(tarball_version "$SRC_TARBALL")
    if [ "${version%%.*}" != "$PG_MAJOR" ]; then
        echo "ERROR: $SRC_TARBALL holds PostgreSQL $version, not $PG_MAJOR (set PG_TDE_PG_MAJOR=${version%%.*})" >&2
        exit 2
    fi
    sha=$(sha256sum "$SRC_TARBALL" | cut -d' ' -f1)
    prefix=$PG_TDE_CACHE/pg-$version-$PATCH_HASH
    if [ ! -x "$prefix/bin/pg_config" ] || ! grep -qs "^source_sha256=$sha\$" "$prefix/pg_tde-build-info"; then
        build=$PG_TDE_CACHE/build-$version-$PATCH_HASH
        rm -rf "$build" "$prefix" && mkdir -p "$build"
        tar -xf "$SRC_TARBALL" -C "$build" --strip-components=1
        apply_patches "$build"
        log "building PostgreSQL $version into $prefix (about 4 minutes)"
        local extra=()
        [ "$PG_MAJOR" -ge 18 ] && extra+=(--with-liburing)
        (
            cd "$build"
            ./configure --quiet --prefix="$prefix" --enable-debug --enable-depend \
                --without-icu --with-openssl "${extra[@]}" >/dev/null
            make -s -j"$(nproc)" world-bin >/dev/null
            make -s install-world-bin >/dev/null
        )
        rm -rf "$build"
        {
            echo "version=$version"
            echo "source=$SRC_ORIGIN"
            echo "source_sha256=$sha"
            echo "patches=patches/postgresql/$PG_MAJOR ($PATCH_HASH)"
            echo "built=$(date -u +%Y-%m-%dT%H:%M:%SZ)"
        } > "$prefix/pg_tde-build-info"
    fi
    ln -sfn "$prefix" "$PG_BUILD_LINK"
    use_pg_build
}

# apply_patches DIR: the whole series with no fuzz, or nothing built at all.
apply_patches() {
    local p out
    for p in "$PATCH_DIR"/*.patch; do
        log "applying $(basename "$p")"
        if ! out=$(patch -d "$1" -p1 --fuzz=0 --forward --batch --no-backup-if-mismatch < "$p" 2>&1); then
            rm -rf "$1"
            {
                echo "ERROR: $(basename "$p") does not apply to this PostgreSQL source (patch --fuzz=0):"
                echo "$out" | awk '/^patching file/ { file = $3 }
                    /FAILED|can.t find file|Reversed|malformed/ { sub(/ -- saving rejects.*/, ""); print "  " file ": " $0 }'
                echo "  Nothing was built.  The series in $PATCH_DIR needs rebasing to this minor."
            } >&2
            exit 1
        fi
    done
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
    if grep -qs "pg$PG_MAJOR = \"$PG_CONFIG\"" "$PGRX_HOME/config.toml"; then
        return
    fi
    log "cargo pgrx init --pg$PG_MAJOR $PG_CONFIG"
    mkdir -p "$PGRX_HOME"
    cargo pgrx init "--pg$PG_MAJOR" "$PG_CONFIG" >/dev/null
}

main() {
    [ "$(id -u)" = 0 ] || { echo "run as root (it installs packages and creates the $PG_TDE_OS_USER user)" >&2; exit 1; }
    mkdir -p "$PG_TDE_CACHE/src"
    install_apt_packages
    ensure_os_user
    build_postgres
    install_cargo_pgrx
    init_pgrx
    # The server runs as an unprivileged user: it must be able to read the build.
    chmod -R a+rX "$PG_PREFIX"
    sed 's/^/    /' "$PG_PREFIX/pg_tde-build-info" >&2
    log "PostgreSQL $PG_MAJOR binaries: $PG_PREFIX/bin"
}

main "$@"
