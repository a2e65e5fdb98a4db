# Pinned versions of every external tool the tests and benchmarks run. Sourced by
# hack/*.sh and read by the e2e harness (through SIGIL_BIN).
#
# Kubernetes: the newest release whose go line the machine's Go (1.26) satisfies.
# k8s-openapi's feature in Cargo.toml (v1_37) must match KUBE_VERSION's minor.
KUBE_VERSION=v1.37.2
ETCD_VERSION=v3.6.16
CSI_SANITY_VERSION=v5.6.0
HELM_VERSION=v4.3.1
# v1.15.3 needs go >= 1.26.6; v1.14.x is refused by the proxy here.
SPIRE_VERSION=v1.15.3
GO_SPIFFE_VERSION=v2.8.1
PY_SPIFFE_VERSION=0.3.2
# TPM tests: swtpm, and the tss2 libraries the agent links (tss-esapi finds them with
# pkg-config; its bindings are pre-generated, so no libclang).
DEBIAN_PACKAGES="swtpm swtpm-tools libtss2-dev tpm2-tools pkg-config"

ALL_TOOLS="etcd kube-apiserver csi-sanity helm spire go-spiffe-client py-spiffe swtpm"

SIGIL_CACHE=${SIGIL_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/sigil}
SIGIL_BIN=$SIGIL_CACHE/bin
