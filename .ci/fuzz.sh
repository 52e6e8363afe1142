#!/usr/bin/env bash
# Smoke-runs every fuzz target (fuzz/) for FUZZ_SECONDS each (default 40) on nightly.
# Installs cargo-fuzz if it is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

seconds="${FUZZ_SECONDS:-40}"
if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "fuzz: installing cargo-fuzz"
    cargo install cargo-fuzz --locked
fi
for target in ops dirty_ring; do
    echo "fuzz: $target for ${seconds}s"
    cargo +nightly fuzz run "$target" -- -max_total_time="$seconds"
done
echo "fuzz: all targets ran ${seconds}s without a crash"
