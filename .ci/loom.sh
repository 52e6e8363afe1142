#!/usr/bin/env bash
# Runs the loom models (loom_tests/loom.rs) and prints how long the suite took.
#
#   .ci/loom.sh                 # all models
#   .ci/loom.sh conflation      # only models whose name contains "conflation"
#
# Release mode, LOOM_MAX_PREEMPTIONS=2 (override in the environment), its own target dir
# (RUSTFLAGS differ from a normal build, so sharing `target/` would rebuild everything).
set -euo pipefail
cd "$(dirname "$0")/.."

export RUSTFLAGS="${RUSTFLAGS:-} --cfg writebehind_loom"
export LOOM_MAX_PREEMPTIONS="${LOOM_MAX_PREEMPTIONS:-2}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-target/loom}"

echo "loom: building (LOOM_MAX_PREEMPTIONS=$LOOM_MAX_PREEMPTIONS)"
cargo test --release --test loom --no-run
start=$(date +%s)
cargo test --release --test loom -- --test-threads=1 "$@"
end=$(date +%s)
echo "loom: suite took $((end - start)) s (models only, build excluded)"
