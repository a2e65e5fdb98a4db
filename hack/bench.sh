#!/usr/bin/env bash
# make bench: every benchmark, each printing a table and writing bench/out/<name>.json.
# Not part of make test. Benches that need a control plane start their own (e2e harness).
#
#   hack/bench.sh                 all benches
#   hack/bench.sh node_stream     only these
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p bench/out
benches=("$@")
[ ${#benches[@]} -gt 0 ] || benches=(index node_stream)
for b in "${benches[@]}"; do
  echo
  echo "== $b =="
  cargo bench --locked -q -p sigil-operator --bench "$b"
done
echo
echo "JSON results in bench/out/"
