#!/usr/bin/env bash
# Sets up everything and runs an encrypted demo cluster:
#   installs packages, builds the patched PostgreSQL (18 by default,
#   PG_TDE_PG_MAJOR=17 for 17; cached), cargo-pgrx,
#   builds and installs pg_tde, creates a cluster with pg_tde preloaded, a
#   keyring-file key provider and a principal key, creates an encrypted table,
#   shows that it is encrypted (also by reading its file on disk), and leaves
#   the cluster running.
#
#   bash scripts/demo.sh            # PGPORT=54329 PG_TDE_DEMO_DIR=/var/lib/pg_tde-demo by default
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

DEMO_DIR=${PG_TDE_DEMO_DIR:-/var/lib/pg_tde-demo}
PORT=${PGPORT:-54329}
DATA=$DEMO_DIR/data
KEYRING=$DEMO_DIR/keyring/keyring.json

bash "$REPO_ROOT/scripts/setup.sh"
use_pg_build

log "building and installing pg_tde"
(cd "$REPO_ROOT/pg_tde" && cargo pgrx install --release --pg-config "$PG_CONFIG" --no-default-features --features "pg$PG_MAJOR" >/dev/null)
cargo build --release --locked -p tde-tools --manifest-path "$REPO_ROOT/Cargo.toml" >/dev/null
install -m 755 "$CARGO_TARGET_DIR"/release/pg_tde_{change_key_provider,decrypt_wal,archive_decrypt,restore_encrypt,basebackup,checksums,rewind,upgrade,amcheck} "$PG_PREFIX/bin/"

if [ -f "$DATA/postmaster.pid" ]; then
    log "stopping the running demo cluster"
    run_as_pguser "$PG_PREFIX/bin/pg_ctl" -D "$DATA" -m fast -w stop >/dev/null || true
fi
rm -rf "$DEMO_DIR"
mkdir -p "$DEMO_DIR/keyring"
chown -R "$PG_TDE_OS_USER" "$DEMO_DIR"
chmod 700 "$DEMO_DIR/keyring"

log "creating the demo cluster in $DATA"
run_as_pguser "$PG_PREFIX/bin/initdb" -D "$DATA" -U postgres --auth=trust -k >/dev/null
cat >> "$DATA/postgresql.conf" <<CONF
# pg_tde demo
shared_preload_libraries = 'pg_tde'
listen_addresses = ''
port = $PORT
unix_socket_directories = '$DEMO_DIR'
CONF
run_as_pguser "$PG_PREFIX/bin/pg_ctl" -D "$DATA" -l "$DEMO_DIR/server.log" -w start >/dev/null

PSQL=("$PG_PREFIX/bin/psql" -X -h "$DEMO_DIR" -p "$PORT" -U postgres -d postgres -v ON_ERROR_STOP=1)
"${PSQL[@]}" -e <<SQL
CREATE EXTENSION pg_tde;
SELECT pg_tde_add_database_key_provider_file('demo-keyring', '$KEYRING');
SELECT pg_tde_create_key_using_database_key_provider('demo-key', 'demo-keyring');
SELECT pg_tde_set_key_using_database_key_provider('demo-key', 'demo-keyring');
CREATE TABLE secrets (id serial PRIMARY KEY, note text) USING tde_heap;
INSERT INTO secrets (note) SELECT 'TOP-SECRET-' || g FROM generate_series(1, 1000) g;
CREATE TABLE plain (id serial PRIMARY KEY, note text) USING heap;
INSERT INTO plain (note) SELECT 'TOP-SECRET-' || g FROM generate_series(1, 1000) g;
CHECKPOINT;
SELECT relname, pg_tde_is_encrypted(oid) AS encrypted FROM pg_class WHERE relname IN ('secrets', 'plain', 'secrets_pkey', 'secrets_id_seq') ORDER BY 1;
SELECT * FROM secrets ORDER BY id LIMIT 3;
SQL

for t in secrets plain; do
    f=$DATA/$("${PSQL[@]}" -Atc "SELECT pg_relation_filepath('$t')")
    n=$(grep -c -a 'TOP-SECRET' "$f" || true)
    echo "file of table $t: $f -> lines containing 'TOP-SECRET' on disk: $n"
done

cat <<EOF2

The encrypted demo cluster is running (data: $DATA, log: $DEMO_DIR/server.log).
Connect with:
    $PG_PREFIX/bin/psql -h $DEMO_DIR -p $PORT -U postgres postgres
Stop it with:
    runuser -u $PG_TDE_OS_USER -- $PG_PREFIX/bin/pg_ctl -D $DATA stop
EOF2
