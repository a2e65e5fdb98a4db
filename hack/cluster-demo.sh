#!/usr/bin/env bash
# make cluster-demo: the user's story on a real node (docs/real-node.md). The cluster
# (make cluster), Sigil's images (make images), `helm install` of the chart, the README's
# example workload (examples/workload.yaml) applied with kubectl, its SVID fetched from
# inside its container with `sigil x509 fetch`, then `sigil explain`. Everything stays up
# to look around (export KUBECONFIG=/var/lib/sigil-cluster/kubeconfig); `make
# cluster-down` removes it all.
#
# The images hold release binaries (`cargo build --release`, long on a cold machine);
# SIGIL_DEMO_BIN_DIR=DIR takes already-built binaries from DIR instead (for example the
# debug ones `make test` built: hack/images.sh --bin-dir).
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=hack/versions.sh
. hack/versions.sh
export KUBECONFIG=/var/lib/sigil-cluster/kubeconfig
export PATH=$SIGIL_BIN:$PATH

t0=$(date +%s.%N)
since() { awk -v now="$(date +%s.%N)" -v t="$1" 'BEGIN { printf "%.1fs", now - t }'; }
say() { printf '[cluster-demo] %s\n' "$*"; }
show() { sed 's/^/       | /'; }
quiet() { # run, showing the output only if it fails
  local out; out=$(mktemp)
  if ! "$@" >"$out" 2>&1; then cat "$out" >&2; rm -f "$out"; exit 1; fi
  rm -f "$out"
}

t=$(date +%s.%N)
say "make cluster: a real single-node Kubernetes in the network namespace sigil-cluster…"
quiet bash hack/cluster.sh up
say "  ✓ ($(since "$t")) $(kubectl get node sigil-node --no-headers | awk '{print $1, $2, $5}')"

t=$(date +%s.%N)
bin_args=()
if [ -n "${SIGIL_DEMO_BIN_DIR:-}" ]; then
  bin_args=(--bin-dir "$SIGIL_DEMO_BIN_DIR")
  sigil=$(realpath "$SIGIL_DEMO_BIN_DIR")/sigil
  say "make images: the images from the binaries in $SIGIL_DEMO_BIN_DIR, imported into the node's containerd…"
else
  sigil=$(realpath -m "${CARGO_TARGET_DIR:-target}")/release/sigil
  say "make images: Sigil's images (cargo build --release) and the workload image, imported into the node's containerd…"
fi
quiet bash hack/images.sh import "${bin_args[@]}"
say "  ✓ ($(since "$t"))"

t=$(date +%s.%N)
helm_args=$(bash hack/images.sh helm-args)
say "helm install sigil charts/sigil -n sigil --create-namespace $helm_args"
if helm status sigil -n sigil >/dev/null 2>&1; then
  say "  (already installed: helm upgrade, and a restart for the images just imported under the same tag)"
  # shellcheck disable=SC2086
  quiet helm upgrade sigil charts/sigil -n sigil $helm_args
  quiet kubectl -n sigil rollout restart deployment/sigil-operator daemonset/sigil-agent
  quiet kubectl delete pod web --ignore-not-found --grace-period=1
else
  # shellcheck disable=SC2086
  quiet helm install sigil charts/sigil -n sigil --create-namespace $helm_args
fi
quiet kubectl -n sigil rollout status deployment/sigil-operator --timeout=300s
quiet kubectl -n sigil rollout status daemonset/sigil-agent --timeout=300s
say "  ✓ ($(since "$t")) every Sigil pod Ready:"
kubectl -n sigil get pods -o wide --no-headers | awk '{print $1, $2, $3}' | show

t=$(date +%s.%N)
say "kubectl apply -f examples/workload.yaml (the README's example: a pod with the Sigil CSI volume)"
quiet kubectl apply -f examples/workload.yaml
quiet kubectl wait --for=condition=Ready pod/web --timeout=180s
say "  ✓ ($(since "$t")) pod default/web Ready"

say "kubectl exec web -- sigil x509 fetch"
kubectl exec web -- sigil x509 fetch | show

say "sigil explain pod default/web"
[ -x "$sigil" ] || { say "no sigil CLI at $sigil"; exit 1; }
"$sigil" explain pod default/web | show

say "done in $(since "$t0"). The node keeps running (export KUBECONFIG=$KUBECONFIG; kubectl get pods -A);"
say "make cluster-down removes everything."
