#!/usr/bin/env bash
# Type-checks pg_tde (cargo clippy, warnings denied) against a PostgreSQL major
# that cannot be built here, using the server headers of Debian's binary
# postgresql-server-dev-<major> package with the header parts of pg_tde's patch
# series applied.  No server is built and nothing runs: this only proves that
# the one source tree still compiles for that major.  scripts/test.sh runs it
# for a major whose source cannot be fetched.  Exit status 3: the headers
# cannot be fetched either.
#
#   bash scripts/typecheck-headers.sh 17
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

major=${1:?usage: typecheck-headers.sh MAJOR}
patch_dir=$REPO_ROOT/patches/postgresql/$major
work=$PG_TDE_CACHE/headers-$major
apt_dir=$work/apt
rm -rf "$work/root" "$work/bin"
mkdir -p "$apt_dir/lists/partial" "$apt_dir/cache/archives/partial" "$work/bin"

# A private apt state: the Debian suites that carry the package are listed
# only here, so the machine's own apt sources and installed packages are untouched.
cat > "$apt_dir/sources.list" <<'SRC'
deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian trixie main
deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian-security trixie-security main
SRC
APT=(-o "Dir::Etc::SourceList=$apt_dir/sources.list" -o Dir::Etc::SourceParts=/nonexistent
     -o "Dir::State::Lists=$apt_dir/lists" -o "Dir::Cache=$apt_dir/cache")
log "fetching postgresql-server-dev-$major (headers only, private apt state in $apt_dir)"
if ! apt-get "${APT[@]}" update -qq >"$work/apt.log" 2>&1 ||
   ! (cd "$work" && rm -f ./*.deb && apt-get "${APT[@]}" download "postgresql-server-dev-$major" >>"$work/apt.log" 2>&1); then
    log "postgresql-server-dev-$major cannot be fetched: $(grep -m1 -E '^(E|Err|W):' "$work/apt.log" || echo 'apt failed')"
    exit 3
fi
deb=$(ls "$work"/postgresql-server-dev-"$major"_*.deb | head -n1)
dpkg-deb -x "$deb" "$work/root"
include=$work/root/usr/include/postgresql
server=$include/$major/server
version=$(dpkg-deb -f "$deb" Version)

# The header hunks of the series (the .c hunks need the source, which is the point).
python3 - "$patch_dir" > "$work/headers.patch" <<'PY'
import glob, re, sys
for p in sorted(glob.glob(sys.argv[1] + "/*.patch")):
    for part in re.split(r"(?m)^(?=diff --git )", open(p).read())[1:]:
        if part.startswith("diff --git a/src/include/"):
            print(re.sub(r"(?m)^-- \n[0-9.]+\n*\Z", "", part), end="")
PY
patch -d "$server" -p3 --fuzz=0 --batch --quiet < "$work/headers.patch"

# Just what pgrx's binding generator asks pg_config.
cat > "$work/bin/pg_config" <<CFG
#!/bin/sh
case "\$1" in
  --version) echo "PostgreSQL ${version%%-*}" ;;
  --includedir-server) echo "$server" ;;
  --includedir|--pkgincludedir) echo "$include" ;;
  --cppflags|--ldflags) echo "" ;;
  --cflags) echo "-O2" ;;
  --configure) echo "'--prefix=$work'" ;;
  --bindir) echo "$work/bin" ;;
  --libdir|--pkglibdir) echo "$work/lib" ;;
  --sharedir) echo "$work/share" ;;
  *) echo "pg_config (headers only): \$1 is not available" >&2; exit 1 ;;
esac
CFG
chmod +x "$work/bin/pg_config"
mkdir -p "$work/pgrx-home"
printf '[configs]\npg%s = "%s"\n' "$major" "$work/bin/pg_config" > "$work/pgrx-home/config.toml"

log "cargo clippy -p pg_tde for PostgreSQL $major ($version headers + the series' header hunks; warnings denied)"
cd "$REPO_ROOT"
PGRX_HOME=$work/pgrx-home CARGO_TARGET_DIR=$PG_TDE_CACHE/target-headers-$major \
    cargo clippy -p pg_tde --all-targets --locked --no-default-features --features "pg$major" -- -D warnings
