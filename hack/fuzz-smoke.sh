#!/usr/bin/env bash
# Runs every cargo-fuzz target for FUZZ_SECONDS (default 20) each. Needs the nightly
# toolchain (rustup) and installs cargo-fuzz into the cache on first use.
set -euo pipefail
cd "$(dirname "$0")/.."
. hack/versions.sh
secs=${FUZZ_SECONDS:-20}
export PATH=$SIGIL_CACHE/cargo-bin/bin:$PATH
if ! command -v cargo-fuzz >/dev/null; then
  echo "[fuzz] installing cargo-fuzz into $SIGIL_CACHE/cargo-bin"
  cargo install --locked --root "$SIGIL_CACHE/cargo-bin" cargo-fuzz
fi
targets=$(cd fuzz && cargo +nightly fuzz list)
for t in $targets; do
  echo "[fuzz] $t for ${secs}s"
  # New inputs go to corpus/<target> (git-ignored); seeds/<target>, when present, holds
  # committed inputs the parser accepts, so fuzzing starts from real structure.
  dirs=("corpus/$t")
  [ -d "fuzz/seeds/$t" ] && dirs+=("seeds/$t")
  mkdir -p "fuzz/corpus/$t"
  (cd fuzz && cargo +nightly fuzz run "$t" "${dirs[@]}" -- -max_total_time="$secs" -max_len=8192 2>&1 | tail -3)
done
echo "[fuzz] all targets ran ${secs}s without a crash"
