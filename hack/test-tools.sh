#!/usr/bin/env bash
# Builds the pinned, real tools the tests run against, through the Go module proxy
# (and Debian / PyPI for the few that are not Go), into a cache outside the clone.
#
#   hack/test-tools.sh            build everything that is missing
#   hack/test-tools.sh etcd helm  build only these
#
# Idempotent: each tool is stamped with its pinned version; a second run only checks
# stamps and prints "cached". The cache lives in $SIGIL_CACHE (default
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
build_kube_apiserver() {
  local v=$KUBE_VERSION minor patch dir
  minor=$(echo "$v" | cut -d. -f2); patch=$(echo "$v" | cut -d. -f3)
  dir=$SIGIL_CACHE/src/kube-apiserver-$v
  mkdir -p "$dir"; cd "$dir"
  go mod download -json "k8s.io/kubernetes@$v" >/dev/null
  local upstream_mod
  upstream_mod=$(go mod download -json "k8s.io/kubernetes@$v" | python3 -c 'import json,sys; print(json.load(sys.stdin)["GoMod"])')
  {
    echo "module sigil.dev/tools/kube-apiserver"
    echo "go $(go env GOVERSION | sed 's/^go//; s/\.[0-9]*$//').0"
    echo "require k8s.io/kubernetes $v"
    grep -E '^\s*k8s.io/[a-z0-9-]+ => ./staging/' "$upstream_mod" | awk '{print $1}' | sort -u |
      while read -r m; do echo "replace $m => $m v0.$minor.$patch"; done
  } >go.mod
  cat >tools.go <<'EOF'
//go:build tools

package tools

import _ "k8s.io/kubernetes/cmd/kube-apiserver"
EOF
  go get "k8s.io/kubernetes/cmd/kube-apiserver@$v" >/dev/null
  local pkg=k8s.io/component-base/version
  go build -o "$SIGIL_BIN/kube-apiserver" \
    -ldflags "-s -w -X $pkg.gitVersion=$v -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor" \
    k8s.io/kubernetes/cmd/kube-apiserver
}

# etcd's package main is go.etcd.io/etcd/server/v3; server/go.mod has replace lines, so
# go install fails, but a module that merely requires it builds fine.
build_etcd() {
  local dir=$SIGIL_CACHE/src/etcd-$ETCD_VERSION
  mkdir -p "$dir"; cd "$dir"
  [ -f go.mod ] || go mod init sigil.dev/tools/etcd >/dev/null 2>&1
  go get "go.etcd.io/etcd/server/v3@$ETCD_VERSION" >/dev/null
  go build -o "$SIGIL_BIN/etcd" -ldflags "-s -w" go.etcd.io/etcd/server/v3
}

go_install() { # module/cmd@version [binary-name]
  GOBIN=$SIGIL_BIN go install -ldflags "-s -w" "$1"
}

build_csi_sanity() { go_install "github.com/kubernetes-csi/csi-test/v5/cmd/csi-sanity@$CSI_SANITY_VERSION"; }
build_helm() { go_install "helm.sh/helm/v4/cmd/helm@$HELM_VERSION"; }

# SPIRE's module has no version list on the proxy, so go install with a version is
# refused; a throwaway module that requires the exact version works. cgo for sqlite.
build_spire() {
  local dir=$SIGIL_CACHE/src/spire-$SPIRE_VERSION
  mkdir -p "$dir"; cd "$dir"
  [ -f go.mod ] || go mod init sigil.dev/tools/spire >/dev/null 2>&1
  # The proxy refuses ejbca-go-client-sdk v1.1.0's zip (used only by SPIRE's EJBCA
  # upstream-authority plugin); v1.0.2 is served and builds.
  go mod edit -replace github.com/Keyfactor/ejbca-go-client-sdk=github.com/Keyfactor/ejbca-go-client-sdk@v1.0.2
  go get "github.com/spiffe/spire@$SPIRE_VERSION"
  CGO_ENABLED=1 go build -o "$SIGIL_BIN/spire-server" -ldflags "-s -w" github.com/spiffe/spire/cmd/spire-server
  go build -o "$SIGIL_BIN/spire-agent" -ldflags "-s -w" github.com/spiffe/spire/cmd/spire-agent
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

# swtpm and the tss2 libraries from Debian (tss-esapi links libtss2-esys).
install_debian_tpm() {
  local missing=()
  for p in $DEBIAN_PACKAGES; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
  if [ ${#missing[@]} -gt 0 ]; then
    log "apt: installing ${missing[*]}"
    local sudo=""; [ "$(id -u)" = 0 ] || sudo=sudo
    # Another process may be installing packages: wait for the dpkg lock, don't fail.
    $sudo apt-get -o DPkg::Lock::Timeout=600 update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive $sudo apt-get -o DPkg::Lock::Timeout=600 install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  fi
  ln -sfn "$(command -v swtpm)" "$SIGIL_BIN/swtpm"
}

# Each tool builds in its own bash process so `set -e` applies to every step of the
# build (it is ignored inside functions called from `&&`/`if` contexts).
if [ "${1:-}" = "--one" ]; then
  "build_$2"
  exit 0
fi

build() { # tool version-key binaries...
  local t=$1 key=$2; shift 2
  if is_cached "$t" "$key" "$@"; then log "$t $key: cached"; return 0; fi
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

want=("$@")
[ ${#want[@]} -gt 0 ] || want=($ALL_TOOLS)

for t in "${want[@]}"; do
  case $t in
    kube-apiserver) build "$t" "$KUBE_VERSION" kube-apiserver ;;
    etcd) build "$t" "$ETCD_VERSION" etcd ;;
    csi-sanity) build "$t" "$CSI_SANITY_VERSION" csi-sanity ;;
    helm) build "$t" "$HELM_VERSION" helm ;;
    spire) build "$t" "$SPIRE_VERSION" spire-server spire-agent ;;
    go-spiffe-client)
      build "$t" "$GO_SPIFFE_VERSION-$(cat "$here"/e2e/clients/go-spiffe/*.go "$here"/e2e/clients/go-spiffe/go.mod | sha256sum | cut -c1-12)" go-spiffe-client ;;
    py-spiffe)
      build "$t" "$PY_SPIFFE_VERSION-$(sha256sum <"$here"/e2e/clients/py-spiffe/client.py | cut -c1-12)" py-spiffe-client ;;
    spire-mint)
      build "$t" "$SPIRE_VERSION-$(sha256sum <"$here"/e2e/clients/spire-mint/main.go | cut -c1-12)" spire-mint ;;
    swtpm) install_debian_tpm; log "swtpm/tss2: present" ;;
    *) log "unknown tool $t (known: $ALL_TOOLS)"; exit 2 ;;
  esac
done
log "tools in $SIGIL_BIN"
