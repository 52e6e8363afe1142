#!/usr/bin/env bash
# Runs the unsafe-adjacent unit tests (dirty ring, shard) under Miri.
# Skips cleanly (exit 0) when the nightly toolchain has no Miri component.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! cargo +nightly miri --version >/dev/null 2>&1; then
    rustup component add miri --toolchain nightly >/dev/null 2>&1 || true
fi
if ! cargo +nightly miri --version >/dev/null 2>&1; then
    echo "miri: SKIPPED - no 'miri' component for the nightly toolchain (rustup component add miri --toolchain nightly)"
    exit 0
fi

export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-target/miri}"
# The first run also builds Miri's sysroot and the dev-dependencies (minutes); time the tests only.
cargo +nightly miri test --lib --no-run
start=$(date +%s)
cargo +nightly miri test --lib -- dirty_ring shard
end=$(date +%s)
echo "miri: ring and shard unit tests took $((end - start)) s (build excluded)"
