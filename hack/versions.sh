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
# SPIRE on the real node (`hack/bench.sh real_node`, e2e/benches/real_node/spire.yaml):
# spire-server and spire-agent of SPIRE_VERSION, and spire-controller-manager, as local
# images. v0.7.0 needs go 1.26.5. spiffe-csi-driver is not served by the Go module proxy
# here (no version of it, v0.1.0 to v0.2.8), so SPIRE's pods take the agent's socket
# through a hostPath volume, SPIRE's other documented way.
SPIRE_CONTROLLER_MANAGER_VERSION=v0.7.0
GO_SPIFFE_VERSION=v2.8.1
# Envoy's generated Go API, for the SDS test client (e2e/clients/envoy-sds): no Envoy
# binary is available from any registry here. v1.40.0 needs go 1.26.
ENVOY_GO_CONTROL_PLANE_VERSION=v1.40.0
PY_SPIFFE_VERSION=0.3.2
# cert-manager's controllers and CRDs for the certManager upstream test (e2e/tests/cert_manager.rs).
# Its cmd/controller module is not served by the Go module proxy; our small main
# (e2e/clients/cert-manager-controller) runs the controllers of the main module, which is.
# v1.21.2 needs go 1.26.0.
CERT_MANAGER_VERSION=v1.21.2
# TPM tests: swtpm, and the tss2 libraries the agent's TPM helper links (tss-esapi finds
# them with pkg-config; its bindings are pre-generated, so no libclang).
# lua5.4 runs the Argo CD health checks of docs/gitops.md in e2e/tests/gitops.rs.
# softhsm2 is the PKCS#11 HSM of the key manager's test and bench (e2e/tests/hsm.rs,
# operator/benches/signing.rs): its module, /usr/lib/softhsm/libsofthsm2.so, and
# softhsm2-util.
DEBIAN_PACKAGES="swtpm swtpm-tools libtss2-dev tpm2-tools pkg-config lua5.4 softhsm2"

# The real node (hack/cluster.sh, docs/real-node.md). kubelet, kube-controller-manager,
# kube-scheduler, kube-proxy and kubectl are KUBE_VERSION, built with kube-apiserver.
CONTAINERD_VERSION=v2.4.2
# With -tags seccomp (Debian's libseccomp-dev): Debian's runc 1.1.5 fails under containerd 2.4.
RUNC_VERSION=v1.5.3
# v1.15.0 needs go 1.26.0.
COREDNS_VERSION=v1.15.0
# node-registrar (e2e/node/node-registrar) stands in for kubernetes-csi's
# node-driver-registrar, whose v2 releases the Go module proxy does not serve.
# The CNI plugins, iptables, conntrack, busybox (test images) and nginx (test images)
# come from Debian; nginx is only unpacked into the image cache, never installed.
DEBIAN_NODE_PACKAGES="containernetworking-plugins iptables conntrack libseccomp-dev busybox-static"
NODE_TOOLS="kube containerd runc coredns node-helpers debian-node"
# Test images are imported into the node's containerd under these fully qualified
# names (the CRI would turn local/x into docker.io/local/x and try to pull it).
TEST_IMAGE_PREFIX=docker.io/sigil-local
TEST_IMAGE_TAG=dev

# cargo-machete (crates.io) finds unused dependencies in `make lint`; not a test tool.
CARGO_MACHETE_VERSION=0.9.2

# Parsec (docs/parsec.md): the service with its JWT-SVID authenticator and TPM provider
# (on the swtpm above), and its CLI client with JWT-SVID auth.
PARSEC_SERVICE_VERSION=1.5.0
PARSEC_SERVICE_FEATURES=jwt-svid-authenticator,tpm-provider
PARSEC_TOOL_VERSION=0.7.0
# parsec-tool's own spiffe-auth feature enables only parsec-client's `spiffe` dependency,
# not parsec-client's `spiffe-auth` feature that holds the JWT-SVID authentication: without
# the second, parsec-tool skips a JwtSvid service ("not supported by this client library").
PARSEC_TOOL_FEATURES=spiffe-auth,parsec-client/spiffe-auth
# parsec-tool's Cargo.lock is updated to these before the build (hack/test-tools.sh).
PARSEC_TOOL_TIME_VERSION=0.3.45
PARSEC_TOOL_SPIFFE_VERSION=0.2.2

ALL_TOOLS="etcd kube csi-sanity helm spire go-spiffe-client envoy-sds-client py-spiffe swtpm cert-manager"

# spire-templates renders spire-controller-manager's templates for `sigil migrate`'s test.
ALL_TOOLS="$ALL_TOOLS spire-templates"

# parsec: the Parsec service and parsec-tool (crates.io), built with cargo install.
ALL_TOOLS="$ALL_TOOLS parsec"

SIGIL_CACHE=${SIGIL_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/sigil}
SIGIL_BIN=$SIGIL_CACHE/bin
