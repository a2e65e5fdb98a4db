#!/usr/bin/env bash
# The sigil-agent code layout: node-agent/link-order.txt, the functions the agent runs, in
# the order lld places them (node-agent/build.rs says why and when it is used).
#
#   hack/link-order.sh check      how many of the file's names the release agent still has
#   hack/link-order.sh generate   write the file again from a run of the `agent` bench
#
# generate runs the release agent under valgrind's callgrind (Debian's valgrind, installed
# when missing) through the `agent` bench at small sizes: start-up, attestation, Pods and
# their SVIDs, Workload API streams, one rotation. callgrind dumps its counts every 2 s, as
# the bench ends the agent with SIGKILL. Every function that ran and is in the binary's
# symbol table is written, in the order callgrind first names it. Not part of `make test`;
# run it after a toolchain or dependency update, when `check` finds less than 90%.
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
  # fn=(id) name and cfn=(id) name introduce each function once; a name's 'N suffix is a
  # recursion depth.
  cat "$work"/cg.*.out.* | grep -oE "^c?fn=\([0-9]+\) .*" | sed -E "s/^c?fn=\([0-9]+\) //; s/'[0-9]+\$//" \
    | awk '!seen[$0]++' > "$work/ran"
  text_symbols "$agent" > "$work/syms"
  {
    echo "# sigil-agent's functions in the order the linker places them (node-agent/build.rs)."
    echo "# Written by hack/link-order.sh generate with $(rustc --version | cut -d' ' -f1-2); do not edit."
    awk 'NR == FNR {have[$0] = 1; next} have[$0]' "$work/syms" "$work/ran"
  } > "$file"
  echo "link-order: $(grep -vc '^#' "$file") functions written to $file"
}

case ${1:-} in
  check) check ;;
  generate) generate ;;
  *) echo "usage: hack/link-order.sh check|generate" >&2; exit 2 ;;
esac
