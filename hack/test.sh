#!/usr/bin/env bash
# make test: build the pinned test tools (cached) and run every test.
#
# On a cold machine both halves are long (Go builds of kube-apiserver, SPIRE and helm; the
# Rust workspace), and each leaves the CPU idle at times (module downloads, links), so the
# test binaries are compiled while the tools build. The tests run only once both are done.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo=${CARGO:-cargo}

# The agent links Debian's libtss2 (found with pkg-config): install the Debian packages
# first (seconds), then compile while the Go tools build.
bash hack/test-tools.sh swtpm
($cargo test --workspace --locked --no-run 2>&1 | sed -u 's/^/[cargo build] /') &
build=$!
tools_ok=0
bash hack/test-tools.sh || tools_ok=$?
build_ok=0
wait "$build" || build_ok=$?
if [ "$tools_ok" != 0 ] || [ "$build_ok" != 0 ]; then
  echo "make test: test-tools exit $tools_ok, cargo build exit $build_ok" >&2
  exit 1
fi
exec $cargo test --workspace --locked
