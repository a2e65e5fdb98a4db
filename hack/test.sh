#!/usr/bin/env bash
# make test: build the pinned test tools (cached) and run every test.
#
# On a cold machine both halves are long (Go builds of the Kubernetes binaries, SPIRE, helm,
# containerd and CoreDNS; the Rust workspace), and each leaves the CPU idle at times (module
# downloads, links), so the test binaries are compiled while the tools build. The tests
# run only once both are done; the real-node tests (e2e/tests/real_node.rs) build their
# images from the debug binaries this build makes.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo=${CARGO:-cargo}

# The agent's TPM helper links Debian's libtss2 (found with pkg-config): install the Debian
# packages first (seconds), then compile while the Go tools build.
bash hack/test-tools.sh swtpm
# The Dockerfile is generated from images/images.conf, which the real-node tests build
# their images from: the two must not have drifted apart.
bash hack/images.sh check
($cargo test --workspace --locked --no-run 2>&1 | sed -u 's/^/[cargo build] /') &
build=$!
tools_ok=0
# Every tool the tests run: the control-plane peers and the real node's (containerd,
# runc, CoreDNS, our node helpers, Debian's CNI plugins; e2e/tests/real_node.rs).
bash hack/test-tools.sh || tools_ok=$?
build_ok=0
wait "$build" || build_ok=$?
if [ "$tools_ok" != 0 ] || [ "$build_ok" != 0 ]; then
  echo "make test: test-tools exit $tools_ok, cargo build exit $build_ok" >&2
  exit 1
fi
exec $cargo test --workspace --locked
