#!/usr/bin/env bash
# The sigil-agent code layout: node-agent/link-order.txt, the functions the agent runs, in
# the order lld places them (node-agent/build.rs says why and when it is used).
#
#   hack/link-order.sh check      how many of the file's names the release agent still has
#   hack/link-order.sh generate   write the file again from a run of the `agent` bench
#   hack/link-order.sh pod        then add what the agent runs in its pod on the real node
#
# generate runs the release agent under valgrind's callgrind (Debian's valgrind, installed
# when missing) through the `agent` bench at small sizes: start-up, attestation, Pods and
# their SVIDs, Workload API streams, one rotation. callgrind dumps its counts every 2 s, as
# the bench ends the agent with SIGKILL. Every function that ran and is in the binary's
# symbol table is written, in the order callgrind first names it. Not part of `make test`;
# run it after a toolchain or dependency update, when `check` finds less than 90%.
#
# pod adds the functions the bench does not run but an agent in its pod does (the in-cluster
# configuration, the kubelet's probes, the chart's flags, start-up as a DaemonSet): on the
# real node (docs/real-node.md; root), it installs the chart with the release images, runs
# the agent container under callgrind (valgrind from the host, mounted read-only), gives it
# the README's example pod (X.509 and JWT SVIDs, the bundle), a minute idle, then deletes the
# agent pod, which writes the profile as it exits. The names not in the file yet are added
# at its end. It leaves the node up, with the chart uninstalled (make cluster-down).
set -euo pipefail
cd "$(dirname "$0")/.."
file=node-agent/link-order.txt
# Always `--bins`, as the images and the Dockerfile build: building sigil-agent alone unifies
# its dependencies' features differently, and most symbol names then differ.
target=$(realpath -m "${CARGO_TARGET_DIR:-target}")
agent=$target/release/sigil-agent

text_symbols() { # binary: the names of its functions, one per line, sorted
  nm --defined-only "$1" | awk '$2 == "t" || $2 == "T" {print $3}' | sort -u
}
ran() { # callgrind output files...: the functions they name, in the order first named
  # fn=(id) name and cfn=(id) name introduce each function once; a name's 'N suffix is a
  # recursion depth.
  cat "$@" | grep -oE "^c?fn=\([0-9]+\) .*" | sed -E "s/^c?fn=\([0-9]+\) //; s/'[0-9]+\$//" \
    | awk '!seen[$0]++'
}
names() { # the order file's names, sorted
  grep -v '^#' "$file" | grep -v '^$' | sort -u
}

check() {
  cargo build --locked -q --release --bins
  local want have
  want=$(names | wc -l)
  have=$(comm -12 <(names) <(text_symbols "$agent") | wc -l)
  echo "link-order: $have of $want names in $file are functions of $agent ($(( 100 * have / want ))%)"
  # With the file used, the code opens with listed functions.
  local placed
  placed=$(nm -n --defined-only "$agent" | awk 'NR == FNR {listed[$0] = 1; next}
    ($2 == "t" || $2 == "T") && !found {n++; if ($3 in listed) {print n; found = 1}}' <(names) -)
  echo "link-order: the first listed function in the binary is its function number ${placed:-none} by address"
  [ "$(( 100 * have / want ))" -ge 90 ] || { echo "link-order: under 90%; run hack/link-order.sh generate" >&2; exit 1; }
  [ "${placed:-99}" -le 3 ] || { echo "link-order: the listed functions do not come first; is the linker rust-lld (SIGIL_LINK_ORDER unset)?" >&2; exit 1; }
}

generate() {
  command -v valgrind >/dev/null || {
    sudo=; [ "$(id -u)" = 0 ] || sudo=sudo
    $sudo apt-get -o DPkg::Lock::Timeout=600 update -qq >/dev/null
    $sudo apt-get -o DPkg::Lock::Timeout=600 install -y -qq valgrind >/dev/null
  }
  bash hack/test-tools.sh etcd kube-apiserver
  cargo build --locked -q --release --bins
  cargo bench --locked -q --no-run -p sigil-e2e --bench agent
  work=$(mktemp -d)
  trap 'rm -rf "$work"' EXIT
  cat > "$work/agent" <<EOF
#!/bin/sh
exec valgrind --tool=callgrind --demangle=no --dump-instr=no --callgrind-out-file=$work/cg.%p.out $agent "\$@"
EOF
  chmod +x "$work/agent"
  # Dump callgrind's counts every 2 s while the agent runs.
  (
    for _ in $(seq 1 3000); do pid=$(pgrep -f "callgrind-out-file=$work/" | head -1 || true); [ -n "$pid" ] && break; sleep 0.1; done
    while [ -n "${pid:-}" ] && kill -0 "$pid" 2>/dev/null; do sleep 2; callgrind_control -d "$pid" >/dev/null 2>&1 || true; done
  ) &
  local dumper=$!
  SIGIL_AGENT_BIN=$work/agent SIGIL_BENCH_OUT=$work/out SIGIL_BENCH_PODS=5 SIGIL_BENCH_ENTRIES=200 \
    SIGIL_BENCH_PACED=0 SIGIL_BENCH_BURST=0 SIGIL_BENCH_STREAMS=100 SIGIL_BENCH_STREAM_KINDS=wl \
    cargo bench --locked -q -p sigil-e2e --bench agent > "$work/bench.log" 2>&1 || { tail -20 "$work/bench.log" >&2; exit 1; }
  wait "$dumper" || true
  ran "$work"/cg.*.out.* > "$work/ran"
  text_symbols "$agent" > "$work/syms"
  {
    echo "# sigil-agent's functions in the order the linker places them (node-agent/build.rs)."
    echo "# Written by hack/link-order.sh generate with $(rustc --version | cut -d' ' -f1-2); do not edit."
    awk 'NR == FNR {have[$0] = 1; next} have[$0]' "$work/syms" "$work/ran"
  } > "$file"
  echo "link-order: $(grep -vc '^#' "$file") functions written to $file"
}

pod() {
  # shellcheck source=hack/versions.sh
  . hack/versions.sh
  export KUBECONFIG=/var/lib/sigil-cluster/kubeconfig PATH=$SIGIL_BIN:$PATH
  command -v valgrind >/dev/null || { echo "link-order: run generate first (it installs valgrind)" >&2; exit 1; }
  [ -s "$file" ] || { echo "link-order: no $file; run generate first" >&2; exit 1; }
  cargo build --locked -q --release --bins
  bash hack/cluster.sh up >/dev/null
  bash hack/images.sh import sigil-operator sigil-agent sigil-csi node-registrar pause workload >/dev/null
  # A fresh install: the DaemonSet as the chart writes it, patched below.
  helm uninstall sigil -n sigil --wait >/dev/null 2>&1 || true
  # shellcheck disable=SC2046
  helm install sigil charts/sigil -n sigil --create-namespace $(bash hack/images.sh helm-args) >/dev/null
  kubectl -n sigil rollout status deployment/sigil-operator --timeout=300s >/dev/null
  local out=/var/lib/sigil-link-order
  rm -rf "$out" && mkdir -p "$out"
  # The agent container under callgrind: no liveness probe (it is 50 times slower) and no
  # memory limit (valgrind's own memory). Debian's valgrind is a shell script around
  # valgrind.bin (dynamic, glibc: the image has it); the image has no shell. Its temporary
  # files go to the profile's directory (the root filesystem is read-only).
  local valgrind
  valgrind=$(command -v valgrind).bin
  [ -x "$valgrind" ] || valgrind=$(command -v valgrind)
  kubectl -n sigil patch daemonset sigil-agent --type json -p "$(cat <<JSON
[
 {"op": "add", "path": "/spec/template/spec/containers/0/command", "value":
   ["/valgrind", "--tool=callgrind", "--vgdb=no", "--demangle=no", "--dump-instr=no",
    "--callgrind-out-file=/callgrind/cg.%p.out", "/sigil-agent"]},
 {"op": "remove", "path": "/spec/template/spec/containers/0/livenessProbe"},
 {"op": "add", "path": "/spec/template/spec/containers/0/env/-", "value": {"name": "TMPDIR", "value": "/callgrind"}},
 {"op": "remove", "path": "/spec/template/spec/containers/0/resources/limits"},
 {"op": "add", "path": "/spec/template/spec/terminationGracePeriodSeconds", "value": 120},
 {"op": "add", "path": "/spec/template/spec/volumes/-", "value": {"name": "valgrind", "hostPath": {"path": "$valgrind", "type": "File"}}},
 {"op": "add", "path": "/spec/template/spec/volumes/-", "value": {"name": "valgrind-lib", "hostPath": {"path": "/usr/libexec/valgrind", "type": "Directory"}}},
 {"op": "add", "path": "/spec/template/spec/volumes/-", "value": {"name": "callgrind", "hostPath": {"path": "$out", "type": "Directory"}}},
 {"op": "add", "path": "/spec/template/spec/containers/0/volumeMounts/-", "value": {"name": "valgrind", "mountPath": "/valgrind", "readOnly": true}},
 {"op": "add", "path": "/spec/template/spec/containers/0/volumeMounts/-", "value": {"name": "valgrind-lib", "mountPath": "/usr/libexec/valgrind", "readOnly": true}},
 {"op": "add", "path": "/spec/template/spec/containers/0/volumeMounts/-", "value": {"name": "callgrind", "mountPath": "/callgrind"}}
]
JSON
)" >/dev/null
  kubectl -n sigil rollout status daemonset/sigil-agent --timeout=300s >/dev/null || {
    kubectl -n sigil logs daemonset/sigil-agent -c agent --tail=20 >&2 || true
    exit 1
  }
  kubectl delete pod web --ignore-not-found --wait >/dev/null
  kubectl apply -f examples/workload.yaml >/dev/null
  kubectl wait --for=condition=Ready pod/web --timeout=300s >/dev/null
  kubectl exec web -- sigil x509 fetch >/dev/null
  kubectl exec web -- sigil jwt fetch --audience link-order >/dev/null
  kubectl exec web -- sigil bundle show >/dev/null
  sleep 60
  # SIGTERM: the agent drains and exits, and callgrind writes its profile.
  kubectl -n sigil delete pod -l app.kubernetes.io/component=agent --wait --timeout=180s >/dev/null
  kubectl delete pod web --ignore-not-found --wait=false >/dev/null
  helm uninstall sigil -n sigil --wait >/dev/null
  ls "$out"/cg.*.out >/dev/null 2>&1 || { echo "link-order: no profile in $out" >&2; exit 1; }
  work=$(mktemp -d)
  trap 'rm -rf "$work"' EXIT
  ran "$out"/cg.*.out > "$work/ran"
  text_symbols "$agent" > "$work/syms"
  local before
  before=$(grep -vc '^#' "$file")
  awk 'NR == FNR {have[$0] = 1; next} FILENAME == ARGV[2] {listed[$0] = 1; next} have[$0] && !listed[$0]' \
    "$work/syms" "$file" "$work/ran" > "$work/new"
  cat "$work/new" >> "$file"
  echo "link-order: the agent in its pod ran $(wc -l < "$work/ran") functions; $(wc -l < "$work/new") were not in $file ($before), now added"
  rm -rf "$out"
}

case ${1:-} in
  check) check ;;
  generate) generate ;;
  pod) pod ;;
  *) echo "usage: hack/link-order.sh check|generate|pod" >&2; exit 2 ;;
esac
