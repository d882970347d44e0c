#!/usr/bin/env bash
# Runs every check and test of pg_tde: formatting, clippy (warnings denied),
# unit tests of the pgrx-free core, in-backend pgrx tests, and the cluster
# integration tests (real clusters: restart, kill -9, standby, base backup).
# Installs what it needs first (scripts/setup.sh), so it works on a fresh machine.
#
#   bash scripts/test.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

bash "$REPO_ROOT/scripts/setup.sh"
bash "$REPO_ROOT/scripts/install-test-servers.sh"
cd "$REPO_ROOT"

log "cargo fmt --check"
cargo fmt --all -- --check

log "cargo clippy (warnings denied)"
cargo clippy --workspace --all-targets --locked -- -D warnings

log "unit tests of the pgrx-free core and the tools (with real OpenBao and PyKMIP servers)"
cargo test -p tde-core -p tde-tools --locked
cargo build -p tde-tools --locked
# The tools live beside pg_waldump & co (archive_command runs them as the server's user).
install -m 755 "$CARGO_TARGET_DIR"/debug/pg_tde_{change_key_provider,decrypt_wal,archive_decrypt,restore_encrypt} "$PG_PREFIX/bin/"
export PG_TDE_BIN=$PG_PREFIX/bin

log "installing the extension into $PG_PREFIX"
# Unlink first: servers still running keep the old file, instead of crashing on an overwrite.
rm -f "$PG_PREFIX/lib/postgresql/pg_tde.so"
(cd pg_tde && cargo pgrx install --pg-config "$PG_CONFIG" >/dev/null)

log "in-backend tests (cargo pgrx test)"
PGRX_TEST_DATA=$PG_TDE_CACHE/pgrx-test-data
mkdir -p "$PGRX_TEST_DATA"
chown "$PG_TDE_OS_USER" "$PGRX_TEST_DATA"
chmod a+rwx "$PG_TDE_CACHE" "$PGRX_HOME"
(cd pg_tde && cargo pgrx test pg17 --runas "$PG_TDE_OS_USER" --pgdata "$PGRX_TEST_DATA/pg17")

log "cluster integration tests (pytest)"
python3 -m pytest --version >/dev/null 2>&1 || python3 -m pip install -q pytest
python3 -m pytest -q tests/integration
