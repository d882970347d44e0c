#!/usr/bin/env bash
# Cipher micro-benchmarks: pg_tde's page ciphers (criterion, release build)
# against OpenSSL's EVP implementation of the same mode, on this machine, in
# one run.  Prints one table: GB/s for both and ours as a percentage of OpenSSL.
#
#   bash scripts/bench-ciphers.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
cd "$REPO_ROOT"

log "cargo bench -p tde-bench (criterion)"
cargo bench -p tde-bench --bench ciphers -- --warm-up-time 1 --measurement-time 3 >/dev/null

# ns per 8 KiB page from criterion's estimates (mean).
ours_gbps() {
    local f=$CARGO_TARGET_DIR/criterion/page/${1/\//_}/new/estimates.json
    python3 -c "import json,sys; ns=json.load(open(sys.argv[1]))['mean']['point_estimate']; print(f'{8192/ns:.2f}')" "$f"
}

# OpenSSL speed in GB/s for an EVP cipher on 8 KiB buffers.
openssl_gbps() {
    local out
    out=$(openssl speed -evp "$1" ${2:+$2} -bytes 8192 -seconds 2 2>/dev/null | tail -n 1)
    python3 -c "import sys; v=sys.argv[1].split()[-1]; print(f'{float(v.rstrip(\"k\"))*1000/1e9:.2f}')" "$out"
}

printf '\n%-14s %-8s %10s %12s %8s\n' cipher op "pg_tde GB/s" "OpenSSL GB/s" "ratio"
for pair in aes_128_xts:aes-128-xts aes_256_xts:aes-256-xts aes_128:aes-128-cbc aes_256:aes-256-cbc; do
    ours=${pair%%:*}
    theirs=${pair##*:}
    for op in encrypt decrypt; do
        flag=""
        [ "$op" = decrypt ] && flag="-decrypt"
        a=$(ours_gbps "$op/$ours")
        b=$(openssl_gbps "$theirs" "$flag")
        printf '%-14s %-8s %10s %12s %7s%%\n' "$ours" "$op" "$a" "$b" "$(python3 -c "print(round(100*$a/$b))")"
    done
done
printf '\n(%s; %s)\n' "$(openssl version)" "$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //')"
