#!/usr/bin/env bash
# make bench: every benchmark, each printing a table and writing bench/out/<name>.json.
# Not part of make test. Benches that need a control plane start their own (e2e harness).
#
#   hack/bench.sh                 all benches
#   hack/bench.sh node_stream     only these
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=hack/versions.sh
. hack/versions.sh
mkdir -p bench/out
benches=("$@")
[ ${#benches[@]} -gt 0 ] || benches=(index node_stream signing agent csi versus_spire servers real_node)
# versus_spire and servers need SPIRE and our spire-mint load generator (bench-only tool).
# swtpm installs the Debian packages: libtss2 (linked by the agent) and softhsm2 (the
# signing bench's PKCS#11 rows).
bash hack/test-tools.sh etcd kube-apiserver spire spire-mint swtpm
# The agent, versus_spire and servers benches run the real sigil-agent and sigil-operator
# binaries, built here in release mode. `--bins`, as the images are built: the features of
# shared dependencies, and so the agent's code layout (node-agent/build.rs), depend on
# which packages a build selects.
cargo build --locked -q --release --bins
# The agent's memory rows depend on its code layout (node-agent/build.rs): say when the
# layout file no longer matches this build.
bash hack/link-order.sh check ||
  echo "bench: node-agent/link-order.txt is stale for this build; the agent's RSS rows are higher for it (hack/link-order.sh generate)" >&2
# Absolute: cargo runs each bench from its package's directory.
target=$(realpath -m "${CARGO_TARGET_DIR:-target}")
export SIGIL_AGENT_BIN=$target/release/sigil-agent
export SIGIL_OPERATOR_BIN=$target/release/sigil-operator
# The e2e harness ends a test binary after 15 min (a hung test); a bench at its default
# sizes runs up to ~20 min, and longer at larger ones (servers bounds SPIRE's side at 30).
export SIGIL_TEST_BINARY_TIMEOUT=${SIGIL_TEST_BINARY_TIMEOUT:-5400}
for b in "${benches[@]}"; do
  echo
  echo "== $b =="
  case $b in
    real_node)
      # The real node (docs/real-node.md): its tools, and every Sigil binary in release
      # for the images (hack/images.sh --bin-dir target/release).
      bash hack/test-tools.sh $NODE_TOOLS
      cargo build --locked -q --release --bins
      cargo bench --locked -q -p sigil-e2e --bench real_node ;;
    agent|csi|versus_spire|servers) cargo bench --locked -q -p sigil-e2e --bench "$b" ;;
    *) cargo bench --locked -q -p sigil-operator --bench "$b" ;;
  esac
done
echo
echo "JSON results in bench/out/"
