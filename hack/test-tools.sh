#!/usr/bin/env bash
# Builds the pinned, real tools the tests run against, through the Go module proxy
# (and Debian / PyPI for the few that are not Go), into a cache outside the clone.
#
#   hack/test-tools.sh            build everything that is missing ($ALL_TOOLS and the
#                                 real node's $NODE_TOOLS, hack/versions.sh)
#   hack/test-tools.sh etcd helm  build only these
#
# Idempotent: each tool is stamped with its pinned version; a second run only checks
# stamps and prints "cached". Module downloads of every tool to build start together in
# the background (network-bound); the compiles run one at a time (CPU-bound).
# The cache lives in $SIGIL_CACHE (default
# ${XDG_CACHE_HOME:-~/.cache}/sigil); the repo's .tools/bin is a symlink into it.
set -euo pipefail

here=$(cd "$(dirname "$0")/.." && pwd)
# shellcheck source=hack/versions.sh
. "$here/hack/versions.sh"

export GOTOOLCHAIN=local
export GOFLAGS=-mod=mod
export GOPROXY=${GOPROXY:-https://proxy.golang.org,direct}
export GOMODCACHE=${GOMODCACHE:-$SIGIL_CACHE/go/mod}
export GOCACHE=${GOCACHE:-$SIGIL_CACHE/go/build}
mkdir -p "$SIGIL_BIN" "$SIGIL_CACHE/src" "$GOMODCACHE" "$GOCACHE"
ln -sfn "$SIGIL_BIN" "$here/.tools/bin" 2>/dev/null || { mkdir -p "$here/.tools"; ln -sfn "$SIGIL_BIN" "$here/.tools/bin"; }

log() { printf '[test-tools] %s\n' "$*" >&2; }
stamp() { echo "$SIGIL_BIN/.stamp-$1"; }
is_cached() { # name version binary...
  local name=$1 version=$2; shift 2
  [ "$(cat "$(stamp "$name")" 2>/dev/null)" = "$version" ] || return 1
  for b in "$@"; do [ -x "$SIGIL_BIN/$b" ] || return 1; done
}
mark() { echo "$2" >"$(stamp "$1")"; }

# A throwaway module: upstream kubernetes go.mod points every staging module at ./staging,
# so require k8s.io/kubernetes and replace each staging module with its published tag.
# Every Kubernetes binary comes from this one module and one `go build`, so they share
# one build (kube-apiserver for the control-plane tests; the rest for the real node).
KUBE_CMDS="kube-apiserver kubelet kube-controller-manager kube-scheduler kube-proxy kubectl"
kube_dir() { echo "$SIGIL_CACHE/src/kube-$KUBE_VERSION"; }
fetch_kube() {
  local v=$KUBE_VERSION minor patch dir c
  minor=$(echo "$v" | cut -d. -f2); patch=$(echo "$v" | cut -d. -f3)
  dir=$(kube_dir)
  mkdir -p "$dir"; cd "$dir"
  local upstream_mod
  upstream_mod=$(go mod download -json "k8s.io/kubernetes@$v" | python3 -c 'import json,sys; print(json.load(sys.stdin)["GoMod"])')
  {
    echo "module sigil.dev/tools/kube"
    echo "go $(go env GOVERSION | sed 's/^go//; s/\.[0-9]*$//').0"
    echo "require k8s.io/kubernetes $v"
    grep -E '^\s*k8s.io/[a-z0-9-]+ => ./staging/' "$upstream_mod" | awk '{print $1}' | sort -u |
      while read -r m; do echo "replace $m => $m v0.$minor.$patch"; done
  } >go.mod
  {
    printf '//go:build tools\n\npackage tools\n\nimport (\n'
    for c in $KUBE_CMDS; do printf '\t_ "k8s.io/kubernetes/cmd/%s"\n' "$c"; done
    printf ')\n'
  } >tools.go
  # shellcheck disable=SC2046
  go get $(for c in $KUBE_CMDS; do echo "k8s.io/kubernetes/cmd/$c@$v"; done) >/dev/null
}
build_kube() {
  local v=$KUBE_VERSION minor c
  minor=$(echo "$v" | cut -d. -f2)
  fetch_kube
  local pkg=k8s.io/component-base/version
  # shellcheck disable=SC2046
  go build -o "$SIGIL_BIN/" \
    -ldflags "-s -w -X $pkg.gitVersion=$v -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor" \
    $(for c in $KUBE_CMDS; do echo "k8s.io/kubernetes/cmd/$c"; done)
}

# etcd's package main is go.etcd.io/etcd/server/v3; server/go.mod has replace lines, so
# go install fails, but a module that merely requires it builds fine.
fetch_etcd() {
  local dir=$SIGIL_CACHE/src/etcd-$ETCD_VERSION
  mkdir -p "$dir"; cd "$dir"
  [ -f go.mod ] || go mod init sigil.dev/tools/etcd >/dev/null 2>&1
  go get "go.etcd.io/etcd/server/v3@$ETCD_VERSION" >/dev/null
}
build_etcd() {
  fetch_etcd
  go build -o "$SIGIL_BIN/etcd" -ldflags "-s -w" go.etcd.io/etcd/server/v3
}

go_install() { # module/cmd@version [binary-name]
  GOBIN=$SIGIL_BIN go install -ldflags "-s -w" "$1"
}

# `go install -n` loads every package (downloading its module) and compiles nothing.
fetch_csi_sanity() { GOBIN=$SIGIL_BIN go install -n "github.com/kubernetes-csi/csi-test/v5/cmd/csi-sanity@$CSI_SANITY_VERSION" 2>/dev/null; }
build_csi_sanity() { go_install "github.com/kubernetes-csi/csi-test/v5/cmd/csi-sanity@$CSI_SANITY_VERSION"; }
fetch_helm() { GOBIN=$SIGIL_BIN go install -n "helm.sh/helm/v4/cmd/helm@$HELM_VERSION" 2>/dev/null; }
build_helm() { go_install "helm.sh/helm/v4/cmd/helm@$HELM_VERSION"; }

# SPIRE's module has no version list on the proxy, so go install with a version is
# refused; a throwaway module that requires the exact version works. cgo for sqlite.
fetch_spire() {
  local dir=$SIGIL_CACHE/src/spire-$SPIRE_VERSION
  mkdir -p "$dir"; cd "$dir"
  [ -f go.mod ] || go mod init sigil.dev/tools/spire >/dev/null 2>&1
  # The proxy refuses ejbca-go-client-sdk v1.1.0's zip (used only by SPIRE's EJBCA
  # upstream-authority plugin); v1.0.2 is served and builds.
  go mod edit -replace github.com/Keyfactor/ejbca-go-client-sdk=github.com/Keyfactor/ejbca-go-client-sdk@v1.0.2
  go get "github.com/spiffe/spire@$SPIRE_VERSION"
  CGO_ENABLED=1 go build -n github.com/spiffe/spire/cmd/spire-server github.com/spiffe/spire/cmd/spire-agent >/dev/null 2>&1
}
build_spire() {
  fetch_spire
  CGO_ENABLED=1 go build -o "$SIGIL_BIN/spire-server" -ldflags "-s -w" github.com/spiffe/spire/cmd/spire-server
  go build -o "$SIGIL_BIN/spire-agent" -ldflags "-s -w" github.com/spiffe/spire/cmd/spire-agent
}

# SPIRE on the real node (bench only): spire-server and spire-agent above, and
# spire-controller-manager, copied or built into static/ for hack/images.sh (the two
# SPIRE binaries link glibc: their images have the cc base), and the controller
# manager's CRDs as its release has them.
fetch_spire_node() {
  local dir=$SIGIL_CACHE/src/spire-controller-manager-$SPIRE_CONTROLLER_MANAGER_VERSION
  mkdir -p "$dir"; cd "$dir"
  [ -f go.mod ] || go mod init sigil.dev/tools/spire-controller-manager >/dev/null 2>&1
  go get "github.com/spiffe/spire-controller-manager/cmd@$SPIRE_CONTROLLER_MANAGER_VERSION"
}
build_spire_node() {
  [ -x "$SIGIL_BIN/spire-server" ] && [ -x "$SIGIL_BIN/spire-agent" ] || build_spire
  fetch_spire_node
  CGO_ENABLED=0 go build -o "$SIGIL_BIN/static/spire-controller-manager" -ldflags "-s -w" \
    github.com/spiffe/spire-controller-manager/cmd
  install -m 755 "$SIGIL_BIN/spire-server" "$SIGIL_BIN/spire-agent" "$SIGIL_BIN/static/"
  local src; src=$(go list -m -f '{{.Dir}}' github.com/spiffe/spire-controller-manager)
  rm -rf "$SIGIL_BIN/spire-crds"; mkdir -p "$SIGIL_BIN/spire-crds"
  cp "$src"/config/crd/bases/*.yaml "$SIGIL_BIN/spire-crds/"
}

# spire-mint: our load generator for SPIRE server's signing path (e2e/clients/spire-mint),
# built in the SPIRE module above so its API and gRPC versions are SPIRE's own. Only
# `make bench` needs it.
build_spire_mint() {
  local dir=$SIGIL_CACHE/src/spire-$SPIRE_VERSION
  [ -f "$dir/go.mod" ] || build_spire
  mkdir -p "$dir/spire-mint"; cp "$here"/e2e/clients/spire-mint/main.go "$dir/spire-mint/"
  cd "$dir"
  go build -o "$SIGIL_BIN/spire-mint" ./spire-mint
}

# go-spiffe client fixture: our own tiny program (e2e/clients/go-spiffe), built against the
# pinned go-spiffe release.
build_go_spiffe_client() {
  local dir=$SIGIL_CACHE/src/go-spiffe-client-$GO_SPIFFE_VERSION
  rm -rf "$dir"; mkdir -p "$dir"; cp "$here"/e2e/clients/go-spiffe/*.go "$here"/e2e/clients/go-spiffe/go.mod "$dir"/
  cd "$dir"
  go get "github.com/spiffe/go-spiffe/v2@$GO_SPIFFE_VERSION" >/dev/null
  go build -o "$SIGIL_BIN/go-spiffe-client" .
}

# Envoy SDS client fixture: our own program (e2e/clients/envoy-sds) on Envoy's generated Go
# types (go-control-plane/envoy), standing in for Envoy, which no registry here serves.
build_envoy_sds_client() {
  local dir=$SIGIL_CACHE/src/envoy-sds-client-$ENVOY_GO_CONTROL_PLANE_VERSION
  rm -rf "$dir"; mkdir -p "$dir"; cp "$here"/e2e/clients/envoy-sds/*.go "$here"/e2e/clients/envoy-sds/go.mod "$dir"/
  cd "$dir"
  go get "github.com/envoyproxy/go-control-plane/envoy@$ENVOY_GO_CONTROL_PLANE_VERSION" >/dev/null
  go build -o "$SIGIL_BIN/envoy-sds-client" .
}

# py-spiffe (PyPI "spiffe") in a venv in the cache. The client script is copied into the
# venv: the cache is shared by every clone, so the wrapper must not point into this one
# (a clone that is later deleted left a wrapper pointing at nothing).
build_py_spiffe() {
  local venv=$SIGIL_CACHE/py-spiffe-$PY_SPIFFE_VERSION
  rm -rf "$venv"
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check "spiffe==$PY_SPIFFE_VERSION"
  cp "$here/e2e/clients/py-spiffe/client.py" "$venv/sigil-client.py"
  cat >"$SIGIL_BIN/py-spiffe-client" <<EOF
#!/bin/sh
exec "$venv/bin/python" "$venv/sigil-client.py" "\$@"
EOF
  chmod +x "$SIGIL_BIN/py-spiffe-client"
}

# spire-templates: renders spire-controller-manager's Go templates as it does (text/template
# over its templateData, with the Kubernetes API types of KUBE_VERSION and the pinned
# go-spiffe), for `sigil migrate`'s comparison test (cli/tests/migrate.rs).
build_spire_templates() {
  local dir=$SIGIL_CACHE/src/spire-templates
  rm -rf "$dir"; mkdir -p "$dir"; cp "$here"/e2e/clients/spire-templates/*.go "$here"/e2e/clients/spire-templates/go.mod "$dir"/
  cd "$dir"
  local minor=${KUBE_VERSION#v1.}
  go get "k8s.io/api@v0.$minor" "k8s.io/apimachinery@v0.$minor" "github.com/spiffe/go-spiffe/v2@$GO_SPIFFE_VERSION" >/dev/null
  go build -o "$SIGIL_BIN/spire-templates" .
}

# cert-manager: its real controllers (approver, CA issuer, Issuer/ClusterIssuer readiness)
# from the pinned github.com/cert-manager/cert-manager module, run by our small main
# (e2e/clients/cert-manager-controller), because the proxy does not serve the
# cmd/controller module. Its CRDs come from the same module zip (deploy/crds, plain YAML).
fetch_cert_manager() {
  local dir=$SIGIL_CACHE/src/cert-manager-$CERT_MANAGER_VERSION
  rm -rf "$dir"; mkdir -p "$dir"; cp "$here"/e2e/clients/cert-manager-controller/*.go "$here"/e2e/clients/cert-manager-controller/go.mod "$dir"/
  cd "$dir"
  go get "github.com/cert-manager/cert-manager@$CERT_MANAGER_VERSION" >/dev/null
  go mod tidy >/dev/null
}
build_cert_manager() {
  fetch_cert_manager
  go build -o "$SIGIL_BIN/cert-manager-controller" -ldflags "-s -w" .
  local crds
  crds=$(go mod download -json "github.com/cert-manager/cert-manager@$CERT_MANAGER_VERSION" | python3 -c 'import json,sys; print(json.load(sys.stdin)["Dir"])')/deploy/crds
  # Sorted, so the file is the same on every machine.
  for f in $(cd "$crds" && ls cert-manager.io_*.yaml | sort); do cat "$crds/$f"; done >"$SIGIL_BIN/cert-manager-crds.yaml"
}

# ---- the real node (hack/cluster.sh, docs/real-node.md) ----

fetch_containerd() {
  local dir=$SIGIL_CACHE/src/containerd-$CONTAINERD_VERSION
  mkdir -p "$dir"; cd "$dir"
  [ -f go.mod ] || go mod init sigil.dev/tools/containerd >/dev/null 2>&1
  go get "github.com/containerd/containerd/v2/cmd/containerd@$CONTAINERD_VERSION" \
    "github.com/containerd/containerd/v2/cmd/ctr@$CONTAINERD_VERSION" \
    "github.com/containerd/containerd/v2/cmd/containerd-shim-runc-v2@$CONTAINERD_VERSION" >/dev/null
}
build_containerd() {
  fetch_containerd
  local x="-s -w -X github.com/containerd/containerd/v2/version.Version=$CONTAINERD_VERSION"
  go build -o "$SIGIL_BIN/" -ldflags "$x" \
    github.com/containerd/containerd/v2/cmd/containerd github.com/containerd/containerd/v2/cmd/ctr
  # The shim outlives containerd restarts: static, as upstream builds it.
  CGO_ENABLED=0 go build -o "$SIGIL_BIN/" -ldflags "$x" github.com/containerd/containerd/v2/cmd/containerd-shim-runc-v2
}

# runc with seccomp (cgo, Debian's libseccomp-dev): without it every container that asks
# for a seccomp profile fails.
fetch_runc() {
  local dir=$SIGIL_CACHE/src/runc-$RUNC_VERSION
  mkdir -p "$dir"; cd "$dir"
  [ -f go.mod ] || go mod init sigil.dev/tools/runc >/dev/null 2>&1
  go get "github.com/opencontainers/runc@$RUNC_VERSION" >/dev/null
}
build_runc() {
  install_debian_node
  fetch_runc
  CGO_ENABLED=1 go build -tags seccomp -o "$SIGIL_BIN/runc" \
    -ldflags "-s -w -X main.version=${RUNC_VERSION#v}" github.com/opencontainers/runc
}

fetch_coredns() {
  local dir=$SIGIL_CACHE/src/coredns-$COREDNS_VERSION
  mkdir -p "$dir"; cd "$dir"
  [ -f go.mod ] || go mod init sigil.dev/tools/coredns >/dev/null 2>&1
  go get "github.com/coredns/coredns@$COREDNS_VERSION" >/dev/null
}
build_coredns() {
  fetch_coredns
  go build -o "$SIGIL_BIN/coredns" -ldflags "-s -w" github.com/coredns/coredns
}

# Our own Go programs of the real node (e2e/node) and the static go-spiffe client of the
# test images. Static ones go to $SIGIL_BIN/static (images), netns-forward to $SIGIL_BIN.
node_helpers_src() { cat "$here"/e2e/node/*/*.go "$here"/e2e/node/*/go.mod "$here"/e2e/clients/go-spiffe/*.go "$here"/e2e/clients/go-spiffe/go.mod; }
fetch_node_helpers() {
  local d name
  for d in "$here"/e2e/node/*/ "$here"/e2e/clients/go-spiffe/; do
    # Only Go programs: a directory without a go.mod is not a helper.
    [ -f "$d/go.mod" ] || continue
    name=$(basename "$d")
    rm -rf "$SIGIL_CACHE/src/node-helpers/$name"; mkdir -p "$SIGIL_CACHE/src/node-helpers/$name"
    cp "$d"/*.go "$d"/go.mod "$SIGIL_CACHE/src/node-helpers/$name/"
    (cd "$SIGIL_CACHE/src/node-helpers/$name" && go mod tidy >/dev/null)
  done
  (cd "$SIGIL_CACHE/src/node-helpers/go-spiffe" && go get "github.com/spiffe/go-spiffe/v2@$GO_SPIFFE_VERSION" >/dev/null)
}
build_cargo_machete() {
  local root; root=$(mktemp -d)
  CARGO_TARGET_DIR="$root/target" cargo install --locked --quiet --root "$root" \
    cargo-machete --version "$CARGO_MACHETE_VERSION"
  install -m 0755 "$root/bin/cargo-machete" "$SIGIL_BIN/cargo-machete"
  rm -rf "$root"
}

# Parsec (crates.io): the service and its CLI client, each with the features docs/parsec.md
# needs. Their own target directory in the cache (not the workspace's), removed after the
# install: it is large and nothing else reuses it. tss-esapi links Debian's libtss2.
# Cold: 7 min 51 s here (654 s of CPU, 2 cores; 2026-12-06), most of it gRPC C-core, built
# once for both programs since parsec-tool resolves from parsec-service's lock (below);
# with a lock of its own it was built twice, 22 min 55 s.
build_parsec() {
  install_debian_tpm
  local root=$SIGIL_CACHE/parsec-$PARSEC_SERVICE_VERSION-$PARSEC_TOOL_VERSION
  local target=$SIGIL_CACHE/parsec-target
  rm -rf "$root"
  CARGO_TARGET_DIR=$target cargo install --locked --quiet --root "$root" \
    parsec-service --version "$PARSEC_SERVICE_VERSION" --features "$PARSEC_SERVICE_FEATURES"
  local src; src=$(fetch_parsec_tool)
  # parsec-tool's published Cargo.lock pins time 0.3.23, which today's rustc refuses
  # (E0282 in time's format_description), and spiffe 0.2.1 on gRPC C-core 1.38. Start it
  # from parsec-service's own lock instead (time 0.3.45, spiffe 0.2.2 on gRPC 1.46), which
  # cargo then completes with parsec-tool's other crates: the crates both programs use,
  # gRPC C-core and its build dependencies above all, resolve alike and build once in the
  # shared target directory.
  cp "$(crate_dir parsec-service "$PARSEC_SERVICE_VERSION")/Cargo.lock" "$src/Cargo.lock"
  (cd "$src" &&
    cargo update --quiet -p time --precise "$PARSEC_TOOL_TIME_VERSION" &&
    cargo update --quiet -p spiffe --precise "$PARSEC_TOOL_SPIFFE_VERSION")
  CARGO_TARGET_DIR=$target cargo install --locked --quiet --root "$root" \
    --path "$src" --features "$PARSEC_TOOL_FEATURES"
  install -m 0755 "$root/bin/parsec" "$SIGIL_BIN/parsec"
  install -m 0755 "$root/bin/parsec-tool" "$SIGIL_BIN/parsec-tool"
  rm -rf "$target" "$root"
}

# Where cargo's registry cache holds crate NAME at VERSION (after a build used it).
crate_dir() {
  local d
  for d in "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/"$1-$2"; do
    [ -f "$d/Cargo.toml" ] && { echo "$d"; return 0; }
  done
  echo "crate $1 $2 is not in cargo's registry cache" >&2; return 1
}

# The published parsec-tool crate (with its Cargo.lock), copied out of cargo's registry
# cache: a throwaway package that depends on it makes cargo download it and say where.
fetch_parsec_tool() {
  local meta=$SIGIL_CACHE/src/parsec-tool-fetch dir=$SIGIL_CACHE/src/parsec-tool-$PARSEC_TOOL_VERSION manifest
  rm -rf "$meta" "$dir"; mkdir -p "$meta/src"
  printf '[package]\nname = "fetch"\nversion = "0.0.0"\nedition = "2021"\n\n[dependencies]\nparsec-tool = "=%s"\n' \
    "$PARSEC_TOOL_VERSION" >"$meta/Cargo.toml"
  touch "$meta/src/lib.rs"
  manifest=$(cargo metadata --quiet --format-version 1 --manifest-path "$meta/Cargo.toml" |
    python3 -c 'import json,sys; print(next(p["manifest_path"] for p in json.load(sys.stdin)["packages"] if p["name"] == "parsec-tool"))')
  cp -r "$(dirname "$manifest")" "$dir"
  rm -rf "$meta"
  echo "$dir"
}

build_node_helpers() {
  fetch_node_helpers
  mkdir -p "$SIGIL_BIN/static"
  local src=$SIGIL_CACHE/src/node-helpers
  (cd "$src/netns-forward" && CGO_ENABLED=0 go build -trimpath -ldflags "-s -w" -o "$SIGIL_BIN/netns-forward" .)
  (cd "$src/pause" && CGO_ENABLED=0 go build -trimpath -ldflags "-s -w" -o "$SIGIL_BIN/static/pause" .)
  (cd "$src/node-registrar" && CGO_ENABLED=0 go build -trimpath -ldflags "-s -w" -o "$SIGIL_BIN/static/node-registrar" .)
  (cd "$src/go-spiffe" && CGO_ENABLED=0 go build -trimpath -ldflags "-s -w" -o "$SIGIL_BIN/static/go-spiffe-client" .)
}

# The CNI plugins, iptables, conntrack, libseccomp (runc), busybox (test images) from
# Debian; nginx (test images) is unpacked into the cache, not installed, so no service
# appears on the machine.
install_debian_node() {
  apt_install $DEBIAN_NODE_PACKAGES
  local root=$SIGIL_CACHE/debian/nginx
  if [ ! -x "$root/usr/sbin/nginx" ]; then
    local tmp; tmp=$(mktemp -d)
    (cd "$tmp" && { apt-get download nginx >/dev/null 2>&1 ||
      { apt-get -o DPkg::Lock::Timeout=600 update -qq >/dev/null && apt-get download nginx >/dev/null; }; })
    rm -rf "$root"; mkdir -p "$root"
    dpkg-deb -x "$tmp"/nginx_*.deb "$root"
    rm -rf "$tmp"
  fi
}

apt_install() { # packages...: those not installed yet
  local missing=() p
  for p in "$@"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
  [ ${#missing[@]} -gt 0 ] || return 0
  log "apt: installing ${missing[*]}"
  local sudo=""; [ "$(id -u)" = 0 ] || sudo=sudo
  # Another process may be installing packages: wait for the dpkg lock, don't fail.
  $sudo apt-get -o DPkg::Lock::Timeout=600 update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive $sudo apt-get -o DPkg::Lock::Timeout=600 install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

# swtpm and the tss2 libraries from Debian (tss-esapi links libtss2-esys).
install_debian_tpm() {
  # shellcheck disable=SC2086
  apt_install $DEBIAN_PACKAGES
  ln -sfn "$(command -v swtpm)" "$SIGIL_BIN/swtpm"
}

# Each tool builds in its own bash process so `set -e` applies to every step of the
# build (it is ignored inside functions called from `&&`/`if` contexts).
if [ "${1:-}" = "--one" ]; then
  "build_$2"
  exit 0
fi
if [ "${1:-}" = "--fetch" ]; then
  "fetch_$2"
  exit 0
fi

# tool_spec TOOL: "stamp-key binaries..." of a tool that is built and stamped.
tool_spec() {
  case $1 in
    kube) echo "$KUBE_VERSION $KUBE_CMDS" ;;
    etcd) echo "$ETCD_VERSION etcd" ;;
    csi-sanity) echo "$CSI_SANITY_VERSION csi-sanity" ;;
    helm) echo "$HELM_VERSION helm" ;;
    spire) echo "$SPIRE_VERSION spire-server spire-agent" ;;
    spire-node)
      echo "$SPIRE_VERSION-$SPIRE_CONTROLLER_MANAGER_VERSION static/spire-server static/spire-agent static/spire-controller-manager" ;;
    go-spiffe-client)
      echo "$GO_SPIFFE_VERSION-$(cat "$here"/e2e/clients/go-spiffe/*.go "$here"/e2e/clients/go-spiffe/go.mod | sha256sum | cut -c1-12) go-spiffe-client" ;;
    envoy-sds-client)
      echo "$ENVOY_GO_CONTROL_PLANE_VERSION-$(cat "$here"/e2e/clients/envoy-sds/*.go "$here"/e2e/clients/envoy-sds/go.mod | sha256sum | cut -c1-12) envoy-sds-client" ;;
    py-spiffe)
      echo "$PY_SPIFFE_VERSION-$(sha256sum <"$here"/e2e/clients/py-spiffe/client.py | cut -c1-12) py-spiffe-client" ;;
    spire-mint)
      echo "$SPIRE_VERSION-$(sha256sum <"$here"/e2e/clients/spire-mint/main.go | cut -c1-12) spire-mint" ;;
    cert-manager)
      echo "$CERT_MANAGER_VERSION-$(cat "$here"/e2e/clients/cert-manager-controller/*.go "$here"/e2e/clients/cert-manager-controller/go.mod | sha256sum | cut -c1-12) cert-manager-controller" ;;
    spire-templates)
      echo "$KUBE_VERSION-$GO_SPIFFE_VERSION-$(cat "$here"/e2e/clients/spire-templates/*.go "$here"/e2e/clients/spire-templates/go.mod | sha256sum | cut -c1-12) spire-templates" ;;
    containerd) echo "$CONTAINERD_VERSION containerd containerd-shim-runc-v2 ctr" ;;
    runc) echo "$RUNC_VERSION runc" ;;
    coredns) echo "$COREDNS_VERSION coredns" ;;
    cargo-machete) echo "$CARGO_MACHETE_VERSION cargo-machete" ;;
    parsec)
      echo "$PARSEC_SERVICE_VERSION+$PARSEC_SERVICE_FEATURES-$PARSEC_TOOL_VERSION+$PARSEC_TOOL_FEATURES+time-$PARSEC_TOOL_TIME_VERSION+spiffe-$PARSEC_TOOL_SPIFFE_VERSION parsec parsec-tool" ;;
    node-helpers)
      echo "$GO_SPIFFE_VERSION-$(node_helpers_src | sha256sum | cut -c1-12) netns-forward static/pause static/node-registrar static/go-spiffe-client" ;;
    *) return 1 ;;
  esac
}

declare -A fetching=()
build() { # tool version-key binaries...
  local t=$1 key=$2; shift 2
  if is_cached "$t" "$key" "$@"; then log "$t $key: cached"; return 0; fi
  # Its modules were being fetched in the background: the compile starts after that.
  [ -z "${fetching[$t]:-}" ] || wait "${fetching[$t]}" || true
  local start; start=$(date +%s)
  log "$t $key: building (first build is slow; Go caches in $SIGIL_CACHE/go are reused)"
  local out; out=$(mktemp)
  if bash "$0" --one "${t//-/_}" >"$out" 2>&1; then
    mark "$t" "$key"
    log "$t $key: done in $(( $(date +%s) - start ))s"
    rm -f "$out"
  else
    grep -v '^go: \(downloading\|added\|upgraded\|finding\)' "$out" | tail -30 >&2
    rm -f "$out"
    log "$t $key: FAILED (output above)"
    return 1
  fi
}

args=("$@")
# Default: every tool `make test` needs, the real node's included.
[ ${#args[@]} -gt 0 ] || read -ra args <<<"$ALL_TOOLS $NODE_TOOLS"
want=()
for t in "${args[@]}"; do
  # kube-apiserver is built with the other Kubernetes binaries.
  [ "$t" = kube-apiserver ] && t=kube
  # Once each (kube is in both lists).
  case " ${want[*]} " in *" $t "*) continue ;; esac
  want+=("$t")
done

# Start the downloads of every tool that is not cached, all at once.
for t in "${want[@]}"; do
  spec=$(tool_spec "$t") || continue
  # shellcheck disable=SC2086
  is_cached "$t" $spec && continue
  declare -F "fetch_${t//-/_}" >/dev/null || continue
  bash "$0" --fetch "${t//-/_}" >/dev/null 2>&1 &
  fetching[$t]=$!
done

for t in "${want[@]}"; do
  if spec=$(tool_spec "$t"); then
    # shellcheck disable=SC2086
    build "$t" $spec
    continue
  fi
  case $t in
    swtpm) install_debian_tpm; log "swtpm/tss2: present" ;;
    debian-node) install_debian_node; log "CNI plugins, iptables, busybox, nginx (unpacked): present" ;;
    *) log "unknown tool $t (known: $ALL_TOOLS $NODE_TOOLS cargo-machete; for benches: spire-mint spire-node)"; exit 2 ;;
  esac
done
# Nothing is left downloading in the background.
wait
log "tools in $SIGIL_BIN"
