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

# GB/s of one criterion benchmark (mean time per iteration of SIZE bytes).
ours_gbps() { # GROUP/NAME SIZE
    local f=$CARGO_TARGET_DIR/criterion/${1%%/*}/$(echo "${1#*/}" | tr / _)/new/estimates.json
    python3 -c "import json,sys; ns=json.load(open(sys.argv[1]))['mean']['point_estimate']; print(f'{int(sys.argv[2])/ns:.2f}')" "$f" "$2"
}

# OpenSSL speed in GB/s for an EVP cipher on SIZE-byte buffers.
openssl_gbps() { # CIPHER SIZE [-decrypt]
    local out
    out=$(openssl speed -evp "$1" ${3:+$3} -bytes "$2" -seconds 2 2>/dev/null | tail -n 1)
    python3 -c "import sys; v=sys.argv[1].split()[-1]; print(f'{float(v.rstrip(\"k\"))*1000/1e9:.2f}')" "$out"
}

row() { # OUR_CIPHER OP CRITERION_ID SIZE OPENSSL_CIPHER [-decrypt]
    local a b
    a=$(ours_gbps "$3" "$4")
    b=$(openssl_gbps "$5" "$4" "${6:-}")
    printf '| %-13s | %-12s | %5s | %6s | %6s | %5s%% |\n' "$1" "$2" "$4" "$a" "$b" "$(python3 -c "print(round(100*$a/$b))")"
}

printf '\n| cipher | op | bytes | pg_tde GB/s | OpenSSL GB/s | pg_tde / OpenSSL |\n|---|---|---|---|---|---|\n'
for pair in aes_128_xts:aes-128-xts aes_256_xts:aes-256-xts aes_128:aes-128-cbc aes_256:aes-256-cbc; do
    ours=${pair%%:*}
    theirs=${pair##*:}
    row "$ours" encrypt "page/encrypt/$ours" 8192 "$theirs"
    row "$ours" "encrypt into" "page/encrypt_into/$ours" 8192 "$theirs"
    row "$ours" decrypt "page/decrypt/$ours" 8192 "$theirs" -decrypt
done
# OpenSSL 3.0 has no SM4-XTS: its SM4-ECB (the bare block cipher, no tweaks) is the
# closest comparison, and an upper bound for any SM4-XTS.
row sm4_xts encrypt "page/encrypt/sm4_xts" 8192 sm4-ecb
row sm4_xts decrypt "page/decrypt/sm4_xts" 8192 sm4-ecb -decrypt
for bits in 128 256; do
    for size in 8192 128; do
        row "wal aes_${bits}_ctr" "encrypt" "wal/aes_${bits}_ctr/$size" "$size" "aes-$bits-ctr"
    done
done
printf '\n(%s; %s; XTS: %s)\n' "$(openssl version)" \
    "$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //')" \
    "$(grep -qw avx512bw /proc/cpuinfo && grep -qw vpclmulqdq /proc/cpuinfo && grep -qw vaes /proc/cpuinfo &&
        echo 'one pass, AVX-512 + VAES' || echo 'portable tweak passes around the aes crate')"
