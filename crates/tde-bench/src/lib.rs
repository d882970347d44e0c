//! Benchmarks only: see `benches/ciphers.rs` and `scripts/bench-ciphers.sh`.
