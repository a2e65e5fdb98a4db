#!/usr/bin/env bash
# make demo: build the binaries, start a local control plane (from make test-tools), run
# sigil-operator and sigil-agent on loopback, and show a pod-shaped workload getting its
# SVID and a rotation. Ctrl-C stops everything.
set -euo pipefail
cd "$(dirname "$0")/.."
. hack/versions.sh
echo "[demo] building the test tools if needed (cached in $SIGIL_CACHE)…"
bash hack/test-tools.sh etcd kube-apiserver swtpm  # swtpm: also the libtss2 the agent's TPM helper links
echo "[demo] building sigil-operator, sigil-agent, sigil-csi, sigil and the demo runner…"
cargo build --locked --bins -p sigil-operator -p sigil-agent -p sigil-csi -p sigil-cli -p sigil-e2e
target=${CARGO_TARGET_DIR:-target}
if [ "$(id -u)" != 0 ]; then
  echo "[demo] note: workloads are placed in pod-shaped cgroups, which needs root; run as root (or in a privileged container)." >&2
fi
SIGIL_BIN_DIR="$target/debug" exec "$target/debug/sigil-demo"
