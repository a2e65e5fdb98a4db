#!/usr/bin/env bash
# A real single-node Kubernetes on this machine, inside its own network namespace
# (docs/real-node.md):
#
#   hack/cluster.sh up        build what is missing (cached), start everything, wait Ready
#   hack/cluster.sh down      stop everything and remove every trace (safe to repeat,
#                             safe after a crash or kill -9)
#   hack/cluster.sh status    what runs
#   hack/cluster.sh restart C restart one component (kubelet, containerd, ...)
#   hack/cluster.sh stop C    stop an unsupervised one (kube-apiserver, etcd, ...), and
#   hack/cluster.sh start C   start it again and wait until it serves
#   hack/cluster.sh partition on|off NS/SVC  drop (or stop dropping) pods' TCP to a Service
#   hack/cluster.sh kill ID   SIGKILL a container (the kubelet restarts it)
#   hack/cluster.sh env       print `export KUBECONFIG=...`
#   hack/cluster.sh leftovers exit 1 and name anything a cluster left behind
#   hack/cluster.sh guard TAG (the real-node tests) wait for the cluster lock, print
#                             "locked", then hold it until stdin closes (the test process
#                             ended, however it ended) and take down the cluster TAG owns
#
# One cluster per machine (the kubelet's directory and the kubepods cgroups are global).
# up, down and restart take the machine's cluster lock ($LOCK): while the real-node tests
# hold it (through their guard), `make cluster` / `make cluster-down` refuse to touch
# their node. A cluster the tests start is theirs ($RUN/owner): their guard takes it down
# when the test process ends, and any later `up` replaces one left by a guard that died.
#
# Network rule: every cluster address (node, pods, Services) exists only inside the
# network namespace $NETNS, which has no route out: no interface of it leads outside.
# The host reaches the API server through netns-forward on 127.0.0.1 only.
# Processes enter the namespace with `nsenter --net` (`ip netns exec` would remount /sys
# and the kubelet would find no cgroups).
set -euo pipefail

here=$(cd "$(dirname "$0")/.." && pwd)
# shellcheck source=hack/versions.sh
. "$here/hack/versions.sh"

NETNS=sigil-cluster
NETNS_PATH=/var/run/netns/$NETNS
STATE=/var/lib/sigil-cluster
RUN=/run/sigil-cluster
KUBELET_DIR=/var/lib/kubelet
HOST_PORT=${SIGIL_CLUSTER_PORT:-16443}
NODE_NAME=sigil-node
# Addresses inside the namespace only.
NODE_IP=10.200.0.2
NODE_NET=10.200.0.2/24
POD_CIDR=10.244.0.0/16
NODE_POD_CIDR=10.244.0.0/24
SERVICE_CIDR=10.96.0.0/16
KUBERNETES_SVC_IP=10.96.0.1
DNS_SVC_IP=10.96.0.10
CLUSTER_DOMAIN=cluster.local
SA_ISSUER=https://kubernetes.default.svc.$CLUSTER_DOMAIN
FEATURE_GATES=PodCertificateRequest=true,ClusterTrustBundle=true,ClusterTrustBundleProjection=true
# 1.37 serves ClusterTrustBundle and PodCertificateRequest in certificates.k8s.io/v1;
# v1beta1 is served too, for clients written against 1.35/1.36.
RUNTIME_CONFIG=certificates.k8s.io/v1beta1=true
SANDBOX_IMAGE=$TEST_IMAGE_PREFIX/pause:$TEST_IMAGE_TAG

KUBECONFIG_HOST=$STATE/kubeconfig
LOCK=/run/sigil-cluster.lock
CONTAINERD_SOCK=$RUN/containerd/containerd.sock
COMPONENTS="etcd kube-apiserver netns-forward containerd kube-controller-manager kube-scheduler kubelet kube-proxy coredns"

log() { printf '[cluster] %s\n' "$*" >&2; }
die() { log "$*"; exit 1; }
bin() { echo "$SIGIL_BIN/$1"; }
in_ns() { nsenter --net="$NETNS_PATH" -- "$@"; }
pidfile() { echo "$RUN/pids/$1"; }
alive() { local p; p=$(cat "$(pidfile "$1")" 2>/dev/null) && [ -n "$p" ] && kill -0 "$p" 2>/dev/null; }
kubectl_() { "$(bin kubectl)" --kubeconfig "$KUBECONFIG_HOST" "$@"; }
ctr_() { "$(bin ctr)" --address "$CONTAINERD_SOCK" -n k8s.io "$@"; }

# start NAME [--host] CMD... : a detached process (own session, no terminal, output to a
# log), inside the namespace unless --host. The kubelet and containerd are supervised, as
# systemd does on a real node: when they exit they start again a second later (a kubelet
# that starts while containerd restarts exits at once).
SUPERVISED="kubelet containerd"
start() {
  local name=$1; shift
  local ns=(nsenter --net="$NETNS_PATH" --)
  if [ "${1:-}" = --host ]; then ns=(); shift; fi
  mkdir -p "$RUN/pids" "$STATE/logs"
  case " $SUPERVISED " in
    *" $name "*)
      rm -f "$(pidfile "$name")"
      PATH="$SIGIL_BIN:$PATH" "${ns[@]}" setsid bash -c '
        pidfile=$1; shift
        while :; do
          "$@" &
          echo $! >"$pidfile"
          wait $!
          echo "[cluster] $1 exited ($?): starting it again in 1 s"
          sleep 1
        done' supervise "$(pidfile "$name")" "$@" </dev/null >>"$STATE/logs/$name.log" 2>&1 9>&- &
      echo $! >"$(pidfile "$name").supervisor"
      local i
      for i in $(seq 50); do [ -s "$(pidfile "$name")" ] && break; sleep 0.1; done
      ;;
    *)
      PATH="$SIGIL_BIN:$PATH" "${ns[@]}" setsid "$@" </dev/null >>"$STATE/logs/$name.log" 2>&1 9>&- &
      echo $! >"$(pidfile "$name")"
      ;;
  esac
}

stop_pid() { # name: TERM, then KILL after 5 s
  local p i
  p=$(cat "$(pidfile "$1")" 2>/dev/null) || return 0
  if [ -n "$p" ] && kill -0 "$p" 2>/dev/null; then
    kill -TERM "$p" 2>/dev/null || true
    for i in $(seq 50); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$p" 2>/dev/null || true
  fi
  rm -f "$(pidfile "$1")"
}

wait_for() { # what seconds cmd...
  local what=$1 secs=$2 i; shift 2
  for i in $(seq $((secs * 5))); do
    if "$@" >/dev/null 2>&1; then return 0; fi
    sleep 0.2
  done
  log "$what: not ready after ${secs}s"
  return 1
}

need_tools() {
  # Cached after the first run: only stamps are checked.
  # shellcheck disable=SC2086
  bash "$here/hack/test-tools.sh" $NODE_TOOLS
  bash "$here/hack/images.sh" build pause
}

# ---------------------------------------------------------------- network namespace
setup_netns() {
  ip netns add "$NETNS"
  in_ns ip link set lo up
  # The node's address and default route, on one end of a veth pair whose other end is
  # in the namespace too, with no address and no forwarding (this kernel has no dummy
  # device): the kubelet picks its node IP from the default route's interface, and
  # whatever is routed there goes nowhere.
  in_ns ip link add sigil0 type veth peer name sigil0-end
  in_ns ip addr add "$NODE_NET" dev sigil0
  in_ns ip link set sigil0-end up
  in_ns ip link set sigil0 up
  in_ns ip route add default dev sigil0
  in_ns sysctl -qw net.ipv4.ip_forward=1
  in_ns sysctl -qw net.ipv4.conf.sigil0-end.forwarding=0
  in_ns sysctl -qw net.bridge.bridge-nf-call-iptables=1 2>/dev/null || true
  in_ns sysctl -qw net.ipv4.conf.all.route_localnet=1
}

# ---------------------------------------------------------------- certificates
# One cluster CA signs every certificate (serving and client); the pods' ca.crt
# (kube-root-ca.crt) is this CA, so a pod can verify the API server and the kubelet.
pki() {
  local d=$STATE/pki
  mkdir -p "$d"; cd "$d"
  key() { openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1.key" 2>/dev/null; }
  key ca
  openssl req -x509 -new -key ca.key -days 3650 -subj "/CN=sigil-cluster-ca" -out ca.crt \
    -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null
  cert() { # name subject extendedKeyUsage [subjectAltName]
    key "$1"
    openssl req -new -key "$1.key" -subj "$2" -out "$1.csr" 2>/dev/null
    {
      echo "basicConstraints=critical,CA:FALSE"
      echo "keyUsage=critical,digitalSignature,keyEncipherment"
      echo "extendedKeyUsage=$3"
      [ -z "${4:-}" ] || echo "subjectAltName=$4"
    } >"$1.ext"
    openssl x509 -req -in "$1.csr" -CA ca.crt -CAkey ca.key -CAcreateserial -days 3650 \
      -extfile "$1.ext" -out "$1.crt" 2>/dev/null
    rm -f "$1.csr" "$1.ext"
  }
  cert apiserver "/CN=kube-apiserver" serverAuth \
    "DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.$CLUSTER_DOMAIN,DNS:localhost,IP:127.0.0.1,IP:$NODE_IP,IP:$KUBERNETES_SVC_IP"
  cert admin "/O=system:masters/CN=sigil-cluster-admin" clientAuth
  cert apiserver-kubelet-client "/O=system:masters/CN=kube-apiserver-kubelet-client" clientAuth
  cert controller-manager "/CN=system:kube-controller-manager" clientAuth
  cert scheduler "/CN=system:kube-scheduler" clientAuth
  cert kube-proxy "/CN=system:kube-proxy" clientAuth
  cert kubelet-client "/O=system:nodes/CN=system:node:$NODE_NAME" clientAuth
  cert kubelet-serving "/CN=$NODE_NAME" serverAuth "DNS:$NODE_NAME,DNS:localhost,IP:$NODE_IP,IP:127.0.0.1"
  cert coredns "/CN=sigil-cluster-coredns" clientAuth
  key sa
  openssl pkey -in sa.key -pubout -out sa.pub 2>/dev/null
  chmod 600 ./*.key
  cd - >/dev/null
}

kubeconfig() { # file server user-cert-name
  local ca crt key
  ca=$(base64 -w0 <"$STATE/pki/ca.crt")
  crt=$(base64 -w0 <"$STATE/pki/$3.crt")
  key=$(base64 -w0 <"$STATE/pki/$3.key")
  cat >"$1" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: sigil
  cluster: {server: "$2", certificate-authority-data: "$ca"}
users:
- name: $3
  user: {client-certificate-data: "$crt", client-key-data: "$key"}
contexts:
- name: sigil
  context: {cluster: sigil, user: $3}
current-context: sigil
EOF
  chmod 600 "$1"
}

configs() {
  local c=$STATE/config
  mkdir -p "$c" "$STATE/cni/net.d" "$STATE/cni/ipam"
  kubeconfig "$KUBECONFIG_HOST" "https://127.0.0.1:$HOST_PORT" admin
  local inside=https://127.0.0.1:6443
  kubeconfig "$c/admin.kubeconfig" "$inside" admin
  kubeconfig "$c/controller-manager.kubeconfig" "$inside" controller-manager
  kubeconfig "$c/scheduler.kubeconfig" "$inside" scheduler
  kubeconfig "$c/kube-proxy.kubeconfig" "$inside" kube-proxy
  kubeconfig "$c/kubelet.kubeconfig" "$inside" kubelet-client
  kubeconfig "$c/coredns.kubeconfig" "$inside" coredns

  # Pods get no nameserver of the host's: only the cluster's DNS.
  printf 'nameserver %s\n' "$DNS_SVC_IP" >"$c/resolv.conf"

  cat >"$c/kubelet.yaml" <<EOF
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
authentication:
  anonymous: {enabled: false}
  webhook: {enabled: true}
  x509: {clientCAFile: $STATE/pki/ca.crt}
authorization: {mode: Webhook}
tlsCertFile: $STATE/pki/kubelet-serving.crt
tlsPrivateKeyFile: $STATE/pki/kubelet-serving.key
address: 0.0.0.0
port: 10250
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
healthzPort: 10248
containerRuntimeEndpoint: unix://$CONTAINERD_SOCK
# This machine is cgroup v1 (hybrid) and has no systemd.
cgroupDriver: cgroupfs
failCgroupV1: false
failSwapOn: false
cgroupsPerQOS: true
localStorageCapacityIsolation: false
clusterDNS: [$DNS_SVC_IP]
clusterDomain: $CLUSTER_DOMAIN
resolvConf: $c/resolv.conf
podCIDR: $NODE_POD_CIDR
registerNode: true
rotateCertificates: false
serverTLSBootstrap: false
hairpinMode: hairpin-veth
protectKernelDefaults: false
makeIPTablesUtilChains: false
# A shared disk: never evict for disk pressure; images are imported, never pulled.
evictionHard: {memory.available: 100Mi, nodefs.available: "0%", imagefs.available: "0%", nodefs.inodesFree: "0%"}
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
imageMinimumGCAge: 87600h
maxPods: 250
serializeImagePulls: false
syncFrequency: 10s
fileCheckFrequency: 5s
nodeStatusUpdateFrequency: 5s
staticPodPath: $STATE/manifests
featureGates: {PodCertificateRequest: true, ClusterTrustBundle: true, ClusterTrustBundleProjection: true}
EOF
  mkdir -p "$STATE/manifests"

  cat >"$c/kube-proxy.yaml" <<EOF
apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
clientConnection: {kubeconfig: $c/kube-proxy.kubeconfig}
mode: iptables
clusterCIDR: $POD_CIDR
hostnameOverride: $NODE_NAME
bindAddress: 0.0.0.0
healthzBindAddress: 127.0.0.1:10256
metricsBindAddress: 127.0.0.1:10249
# nf_conntrack_max is global to the machine: leave it alone.
conntrack: {maxPerCore: 0, tcpEstablishedTimeout: 0s, tcpCloseWaitTimeout: 0s}
EOF

  cat >"$c/containerd.toml" <<EOF
version = 3
root = "$STATE/containerd"
state = "$RUN/containerd"

[grpc]
  address = "$CONTAINERD_SOCK"

[ttrpc]
  address = "$RUN/containerd/containerd.sock.ttrpc"

[debug]
  address = "$RUN/containerd/debug.sock"

[plugins.'io.containerd.cri.v1.runtime']
  # No CAP_SYS_RESOURCE here: a negative oom_score_adj (the pause container asks for
  # -998) is refused, so containerd keeps scores at or above its own.
  restrict_oom_score_adj = true
  tolerate_missing_hugetlb_controller = true
  disable_apparmor = true
  # Pod network namespaces live under the state dir, not /var/run/netns.
  netns_mounts_under_state_dir = true
  [plugins.'io.containerd.cri.v1.runtime'.containerd]
    default_runtime_name = 'runc'
    [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc]
      runtime_type = 'io.containerd.runc.v2'
      [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc.options]
        BinaryName = '$(bin runc)'
        SystemdCgroup = false
  [plugins.'io.containerd.cri.v1.runtime'.cni]
    bin_dirs = ['/usr/lib/cni']
    conf_dir = '$STATE/cni/net.d'

[plugins.'io.containerd.cri.v1.images']
  snapshotter = 'overlayfs'
  [plugins.'io.containerd.cri.v1.images'.pinned_images]
    sandbox = '$SANDBOX_IMAGE'

[plugins.'io.containerd.grpc.v1.cri']
  stream_server_address = '127.0.0.1'
  stream_server_port = '0'
EOF

  cat >"$STATE/cni/net.d/10-sigil.conflist" <<EOF
{
  "cniVersion": "1.0.0",
  "name": "sigil",
  "plugins": [
    {
      "type": "bridge",
      "bridge": "cni0",
      "isGateway": true,
      "ipMasq": false,
      "hairpinMode": true,
      "ipam": {
        "type": "host-local",
        "dataDir": "$STATE/cni/ipam",
        "ranges": [[{"subnet": "$NODE_POD_CIDR"}]],
        "routes": [{"dst": "0.0.0.0/0"}]
      }
    },
    {"type": "portmap", "capabilities": {"portMappings": true}}
  ]
}
EOF

  # The cluster's zones from the API; every other name is NXDOMAIN at once (there is no
  # upstream: nothing leaves the namespace).
  cat >"$c/Corefile" <<EOF
$CLUSTER_DOMAIN:53 in-addr.arpa:53 ip6.arpa:53 {
    bind $NODE_IP
    errors
    health 127.0.0.1:8080
    ready 127.0.0.1:8181
    kubernetes $CLUSTER_DOMAIN in-addr.arpa ip6.arpa {
        kubeconfig $c/coredns.kubeconfig sigil
        pods insecure
    }
    cache 30
    reload
}
.:53 {
    bind $NODE_IP
    template ANY ANY {
        rcode NXDOMAIN
    }
}
EOF
}

# ---------------------------------------------------------------- components
start_etcd() {
  start etcd "$(bin etcd)" --name=default --data-dir="$STATE/etcd" \
    --listen-client-urls=http://127.0.0.1:2379 --advertise-client-urls=http://127.0.0.1:2379 \
    --listen-peer-urls=http://127.0.0.1:2380 --initial-advertise-peer-urls=http://127.0.0.1:2380 \
    --initial-cluster=default=http://127.0.0.1:2380 --unsafe-no-fsync --log-level=warn
}

start_kube_apiserver() {
  local p=$STATE/pki
  start kube-apiserver "$(bin kube-apiserver)" \
    --etcd-servers=http://127.0.0.1:2379 \
    --bind-address=0.0.0.0 --secure-port=6443 --advertise-address="$NODE_IP" \
    --tls-cert-file="$p/apiserver.crt" --tls-private-key-file="$p/apiserver.key" \
    --client-ca-file="$p/ca.crt" \
    --kubelet-client-certificate="$p/apiserver-kubelet-client.crt" \
    --kubelet-client-key="$p/apiserver-kubelet-client.key" \
    --kubelet-certificate-authority="$p/ca.crt" \
    --kubelet-preferred-address-types=InternalIP,Hostname \
    --authorization-mode=Node,RBAC \
    --enable-admission-plugins=NodeRestriction \
    --service-account-issuer="$SA_ISSUER" \
    --service-account-key-file="$p/sa.pub" \
    --service-account-signing-key-file="$p/sa.key" \
    --service-cluster-ip-range="$SERVICE_CIDR" \
    --allow-privileged=true \
    --feature-gates="$FEATURE_GATES" \
    --runtime-config="$RUNTIME_CONFIG" \
    --profiling=false --v=1
}

start_netns_forward() {
  start netns-forward --host "$(bin netns-forward)" -netns "$NETNS_PATH" \
    -listen "127.0.0.1:$HOST_PORT" -connect 127.0.0.1:6443
}

start_containerd() {
  mkdir -p "$RUN/containerd"
  start containerd "$(bin containerd)" --config "$STATE/config/containerd.toml"
}

start_kube_controller_manager() {
  local c=$STATE/config p=$STATE/pki
  start kube-controller-manager "$(bin kube-controller-manager)" \
    --kubeconfig="$c/controller-manager.kubeconfig" \
    --authentication-kubeconfig="$c/controller-manager.kubeconfig" \
    --authorization-kubeconfig="$c/controller-manager.kubeconfig" \
    --bind-address=127.0.0.1 --secure-port=10257 \
    --leader-elect=false --use-service-account-credentials=true \
    --root-ca-file="$p/ca.crt" \
    --service-account-private-key-file="$p/sa.key" \
    --cluster-signing-cert-file="$p/ca.crt" --cluster-signing-key-file="$p/ca.key" \
    --allocate-node-cidrs=true --cluster-cidr="$POD_CIDR" --node-cidr-mask-size=24 \
    --service-cluster-ip-range="$SERVICE_CIDR" \
    --feature-gates="$FEATURE_GATES" --v=1
}

start_kube_scheduler() {
  local c=$STATE/config
  start kube-scheduler "$(bin kube-scheduler)" \
    --kubeconfig="$c/scheduler.kubeconfig" \
    --authentication-kubeconfig="$c/scheduler.kubeconfig" \
    --authorization-kubeconfig="$c/scheduler.kubeconfig" \
    --bind-address=127.0.0.1 --secure-port=10259 --leader-elect=false --v=1
}

start_kubelet() {
  mkdir -p "$KUBELET_DIR"
  start kubelet "$(bin kubelet)" \
    --config="$STATE/config/kubelet.yaml" \
    --kubeconfig="$STATE/config/kubelet.kubeconfig" \
    --root-dir="$KUBELET_DIR" \
    --hostname-override="$NODE_NAME" --node-ip="$NODE_IP" --v=1
}

start_kube_proxy() {
  start kube-proxy "$(bin kube-proxy)" --config="$STATE/config/kube-proxy.yaml" --v=1
}

start_coredns() {
  start coredns "$(bin coredns)" -conf "$STATE/config/Corefile"
}

# kube-dns: a Service on $DNS_SVC_IP whose endpoint is CoreDNS on the node's address,
# and what CoreDNS may read.
dns_service() {
  kubectl_ apply -f - >/dev/null <<EOF
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata: {name: "sigil-cluster:coredns"}
rules:
- apiGroups: [""]
  resources: [endpoints, services, pods, namespaces]
  verbs: [list, watch]
- apiGroups: [discovery.k8s.io]
  resources: [endpointslices]
  verbs: [list, watch]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata: {name: "sigil-cluster:coredns"}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: "sigil-cluster:coredns"}
subjects:
- {apiGroup: rbac.authorization.k8s.io, kind: User, name: sigil-cluster-coredns}
---
apiVersion: v1
kind: Service
metadata: {name: kube-dns, namespace: kube-system, labels: {k8s-app: kube-dns}}
spec:
  clusterIP: $DNS_SVC_IP
  ports:
  - {name: dns, port: 53, protocol: UDP, targetPort: 53}
  - {name: dns-tcp, port: 53, protocol: TCP, targetPort: 53}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: kube-dns-node
  namespace: kube-system
  labels: {kubernetes.io/service-name: kube-dns, endpointslice.kubernetes.io/managed-by: sigil-cluster}
addressType: IPv4
endpoints:
- addresses: [$NODE_IP]
  conditions: {ready: true}
ports:
- {name: dns, port: 53, protocol: UDP}
- {name: dns-tcp, port: 53, protocol: TCP}
EOF
}

apiserver_ready() { [ "$(kubectl_ get --raw /readyz 2>/dev/null)" = ok ]; }
node_ready() {
  [ "$(kubectl_ get node "$NODE_NAME" -o 'jsonpath={.status.conditions[?(@.type=="Ready")].status}' 2>/dev/null)" = True ]
}

import_images() { # tar...
  local t
  for t in "$@"; do ctr_ images import "$t" 2>&1 >/dev/null | { grep -v DEPRECATION >&2 || true; }; done
}

# Bidirectional hostPath mounts (sigil-csi's) need their source on a shared mount, as `/`
# is on every systemd host. Here `/` is private: make it shared (not recursively) while the
# cluster runs, and private again on the way down.
share_root() {
  if ! findmnt -n -o PROPAGATION / | grep -q shared; then
    mount --make-shared /
    touch "$RUN/root-made-shared"
  fi
}
unshare_root() {
  if [ -e "$RUN/root-made-shared" ]; then
    mount --make-private /
    rm -f "$RUN/root-made-shared"
  fi
}

# The lock (fd 9) of this command, unless the caller holds it for us (the tests' guard).
take_lock() {
  [ "${SIGIL_CLUSTER_LOCKED:-}" = 1 ] && return 0
  exec 9>"$LOCK"
  flock -n 9 || die "the real-node tests are using the cluster (their guard holds $LOCK): wait until they end"
  SIGIL_CLUSTER_LOCKED=1
}

# up. With SIGIL_CLUSTER_OWNER=TAG (the real-node tests), the cluster is TAG's: one that
# `make cluster` started is not taken over (SIGIL_CLUSTER_REUSE=1 runs on it and leaves
# it), and one another owner left behind is replaced.
up() {
  need_tools
  take_lock
  local me=${SIGIL_CLUSTER_OWNER:-}
  if [ -e "$NETNS_PATH" ] || [ -d "$RUN" ] || [ -d "$STATE" ]; then
    local owner; owner=$(cat "$RUN/owner" 2>/dev/null || true)
    if alive kube-apiserver && alive kubelet && alive containerd && apiserver_ready; then
      if [ "$owner" = "$me" ]; then log "already up"; print_env; return 0; fi
      if [ -z "$owner" ]; then
        if [ "${SIGIL_CLUSTER_REUSE:-}" = 1 ]; then
          log "running on the cluster make cluster started (SIGIL_CLUSTER_REUSE=1); it stays up"
          print_env; return 0
        fi
        die "a cluster started by make cluster is running; the real-node tests start their own and remove it when they end: run make cluster-down first (or set SIGIL_CLUSTER_REUSE=1 to run them on it and keep it)"
      fi
      log "a cluster left by $owner, which has ended: removing it first"
    else
      log "leftovers of an earlier cluster: removing them first"
    fi
    down
  fi
  # The chart's hostPath directories belong to this node: anything in them now was left
  # by something else (a killed process run by hand or by a bench), and would be taken
  # for what this node's pods left.
  remove_chart_hostpaths "before the node starts"
  local t0; t0=$(date +%s)
  mkdir -p "$STATE" "$RUN/pids"
  [ -z "$me" ] || echo "$me" >"$RUN/owner"
  share_root
  setup_netns
  pki
  configs
  start_etcd
  start_containerd
  wait_for etcd 60 in_ns curl -sf http://127.0.0.1:2379/health || { tail -20 "$STATE/logs/etcd.log"; exit 1; }
  start_kube_apiserver
  start_netns_forward
  wait_for containerd 60 ctr_ version || { tail -20 "$STATE/logs/containerd.log"; exit 1; }
  import_images "$SIGIL_CACHE/images/pause.tar"
  wait_for kube-apiserver 180 apiserver_ready || { tail -30 "$STATE/logs/kube-apiserver.log"; exit 1; }
  start_kube_controller_manager
  start_kube_scheduler
  start_kubelet
  start_kube_proxy
  dns_service
  start_coredns
  wait_for "node $NODE_NAME Ready" 180 node_ready || { tail -30 "$STATE/logs/kubelet.log"; exit 1; }
  wait_for "default ServiceAccount" 60 kubectl_ -n default get serviceaccount default
  log "up in $(( $(date +%s) - t0 ))s"
  print_env
}

print_env() {
  log "kubeconfig: $KUBECONFIG_HOST (API server on https://127.0.0.1:$HOST_PORT)"
  echo "export KUBECONFIG=$KUBECONFIG_HOST"
}

# ---------------------------------------------------------------- teardown
# Processes to end: those whose network namespace is the cluster's (every component,
# the containerd shims, hostNetwork pods) and those in the pods' cgroups. Never by name.
cluster_pids() {
  local ns="" p
  [ -e "$NETNS_PATH" ] && ns=$(stat -L -c %i "$NETNS_PATH" 2>/dev/null || true)
  for p in /proc/[0-9]*; do
    p=${p#/proc/}
    [ "$p" = $$ ] && continue
    if [ -n "$ns" ] && [ "$(stat -L -c %i "/proc/$p/ns/net" 2>/dev/null)" = "$ns" ]; then echo "$p"; fi
  done
  for f in /sys/fs/cgroup/*/kubepods; do
    [ -d "$f" ] && find "$f" -name cgroup.procs -exec cat {} + 2>/dev/null
  done
  # Recorded pids only while they are still ours (a pid may be reused after a crash).
  for f in "$RUN"/pids/*; do
    [ -f "$f" ] || continue
    p=$(cat "$f")
    case $(readlink "/proc/$p/exe" 2>/dev/null) in "$SIGIL_BIN"/*) echo "$p" ;; esac
  done
  true
}

living() { # pids... -> those still running (a zombie waits for its parent: not running)
  local p st
  for p in "$@"; do
    st=$(awk '{print $3}' "/proc/$p/stat" 2>/dev/null) || continue
    [ -n "$st" ] && [ "$st" != Z ] && echo "$p"
  done
  true
}

# `down` is no drain: everything gets SIGKILL (the kubelet and the API server take
# seconds to honour TERM, and nothing they would do on the way out is needed).
kill_all() {
  local pids i
  for i in $(seq 50); do
    # shellcheck disable=SC2046
    pids=$(living $(cluster_pids | sort -u))
    [ -n "$pids" ] || return 0
    # shellcheck disable=SC2086
    kill -KILL $pids 2>/dev/null || true
    sleep 0.2
  done
  log "still running: $pids"
}

# Mount points under the cluster's directories and the chart's hostPath directories
# (sigil-csi's files-mode tmpfs mounts live in /var/lib/sigil-csi: a node torn down under
# a running Sigil leaves them), deepest first.
our_mounts() {
  awk '{print $5}' /proc/self/mountinfo | sed 's/\\040/ /g' |
    grep -E "^($KUBELET_DIR|$STATE|$RUN|/var/lib/sigil-csi|/run/sigil)(/|$)" |
    awk '{print length, $0}' | sort -rn | cut -d' ' -f2-
}

unmount_all() {
  local m i
  for i in 1 2 3; do
    while read -r m; do
      [ -n "$m" ] && { umount "$m" 2>/dev/null || umount -l "$m" 2>/dev/null || true; }
    done < <(our_mounts)
    [ -z "$(our_mounts)" ] && return 0
  done
  log "mounts left: $(our_mounts | tr '\n' ' ')"
}

remove_cgroups() {
  local f
  for f in /sys/fs/cgroup/*/kubepods; do
    [ -d "$f" ] || continue
    find "$f" -depth -type d -exec rmdir {} \; 2>/dev/null || true
    [ -d "$f" ] && log "cgroup left: $f"
  done
  true
}

down() {
  take_lock
  local t0 t; t0=$(date +%s)
  # The supervisors and the kubelet first, so nothing restarts; then everything else.
  local c
  for c in $SUPERVISED; do
    if alive "$c.supervisor"; then kill -KILL "$(cat "$(pidfile "$c.supervisor")")" 2>/dev/null || true; fi
  done
  if alive kubelet; then kill -KILL "$(cat "$(pidfile kubelet)")" 2>/dev/null || true; fi
  t=$(date +%s); kill_all; [ $(( $(date +%s) - t )) -lt 5 ] || log "processes took $(( $(date +%s) - t ))s to end"
  unmount_all
  [ -e "$NETNS_PATH" ] && ip netns del "$NETNS"
  remove_cgroups
  unshare_root
  rm -rf "$STATE" "$RUN" "$KUBELET_DIR"
  remove_chart_hostpaths
  log "down in $(( $(date +%s) - t0 ))s"
  leftovers || true
}

# The chart's hostPath directories (DirectoryOrCreate: the kubelet creates them, and
# nothing removes them). They go with the node, like everything its pods wrote; files in
# them (a socket, a files-mode record) are named, since after `helm uninstall` there
# should be none: a test of that checks before `down`.
CHART_HOSTPATHS="/run/sigil/agent /var/lib/sigil-csi /run/sigil"
remove_chart_hostpaths() {
  local d files when=${1:-}
  for d in $CHART_HOSTPATHS; do
    [ -d "$d" ] || continue
    # Never through a mount (down unmounts the node's first; any other is not ours).
    if awk -v d="$d" '$5 == d || index($5, d "/") == 1 { found = 1 } END { exit !found }' /proc/self/mountinfo; then
      log "not removing $d: something is mounted under it"
      continue
    fi
    files=$(find "$d" ! -type d 2>/dev/null | head -5 | tr '\n' ' ')
    [ -z "$files" ] || log "removing what was left in $d${when:+ $when}: $files"
    rm -rf "$d"
  done
  true
}

# What would show that something was left behind.
leftovers() {
  local bad=0
  if [ -n "$(our_mounts)" ]; then log "LEFT: mounts $(our_mounts | tr '\n' ' ')"; bad=1; fi
  if [ -e "$NETNS_PATH" ]; then log "LEFT: network namespace $NETNS"; bad=1; fi
  if ls -d /sys/fs/cgroup/*/kubepods >/dev/null 2>&1; then log "LEFT: $(ls -d /sys/fs/cgroup/*/kubepods | tr '\n' ' ')"; bad=1; fi
  if [ -n "$(cluster_pids)" ]; then log "LEFT: processes $(cluster_pids | tr '\n' ' ')"; bad=1; fi
  for d in "$STATE" "$RUN" "$KUBELET_DIR" $CHART_HOSTPATHS; do [ -e "$d" ] && { log "LEFT: $d"; bad=1; }; done
  return $bad
}

status() {
  local c
  for c in $COMPONENTS; do
    if alive "$c"; then echo "$c: running (pid $(cat "$(pidfile "$c")"))"; else echo "$c: not running"; fi
  done
  if apiserver_ready; then kubectl_ get nodes -o wide; fi
}

# restart C: a supervised component (kubelet, containerd) gets SIGTERM and its supervisor
# starts it again, as systemd would; any other is stopped and started.
restart() {
  take_lock
  local c=$1 old i
  case " $COMPONENTS " in *" $c "*) ;; *) die "unknown component $c (known: $COMPONENTS)" ;; esac
  old=$(cat "$(pidfile "$c")" 2>/dev/null || true)
  case " $SUPERVISED " in
    *" $c "*)
      alive "$c.supervisor" || die "$c is not running"
      kill -TERM "$old" 2>/dev/null || true
      for i in $(seq 150); do
        [ "$(cat "$(pidfile "$c")" 2>/dev/null)" != "$old" ] && alive "$c" && break
        sleep 0.1
      done ;;
    *) stop_pid "$c"; "start_${c//-/_}" ;;
  esac
  log "$c restarted (pid $old -> $(cat "$(pidfile "$c")"))"
}

# stop C / start C: take an unsupervised component (kube-apiserver, etcd, ...) down and
# bring it back, for the fault tests' outages; `start` waits until it serves again.
stop_component() {
  take_lock
  local c=$1
  case " $COMPONENTS " in *" $c "*) ;; *) die "unknown component $c (known: $COMPONENTS)" ;; esac
  case " $SUPERVISED " in *" $c "*) die "$c is supervised (it would start again): use restart" ;; esac
  alive "$c" || die "$c is not running"
  stop_pid "$c"
  log "$c stopped"
}
start_component() {
  take_lock
  local c=$1
  case " $COMPONENTS " in *" $c "*) ;; *) die "unknown component $c (known: $COMPONENTS)" ;; esac
  case " $SUPERVISED " in *" $c "*) die "$c is supervised: use restart" ;; esac
  alive "$c" && die "$c is already running"
  "start_${c//-/_}"
  case $c in
    kube-apiserver) wait_for kube-apiserver 120 apiserver_ready || exit 1 ;;
    etcd) wait_for etcd 60 in_ns curl -sf http://127.0.0.1:2379/health || exit 1 ;;
  esac
  log "$c started (pid $(cat "$(pidfile "$c")"))"
}

# partition on|off NAMESPACE/SERVICE: drop every TCP packet sent to the Service's cluster
# IP inside the node's namespace (the raw table, before kube-proxy's NAT and conntrack: an
# open connection stalls too), or stop dropping. The fault tests' agent <-> operator
# partition; nothing outside the namespace is touched.
partition() {
  take_lock
  local what=$1 svc=$2 ip
  ip=$(kubectl_ -n "${svc%%/*}" get service "${svc#*/}" -o jsonpath='{.spec.clusterIP}') ||
    die "no Service $svc"
  case $what in
    on) in_ns iptables -w -t raw -I PREROUTING -d "$ip" -p tcp -j DROP ;;
    off) in_ns iptables -w -t raw -D PREROUTING -d "$ip" -p tcp -j DROP ;;
    *) die "partition on|off NAMESPACE/SERVICE" ;;
  esac
  log "partition $what: TCP to $svc ($ip)"
}

# kill CONTAINER_ID: SIGKILL a container's task (the id of a pod's containerStatuses,
# without containerd://), as a crash or the OOM killer would; the kubelet restarts it.
kill_container() {
  take_lock
  ctr_ tasks kill -s SIGKILL "${1:?container id}"
  log "container ${1:0:12} killed"
}

# guard TAG: for a test process, which starts it with stdin a pipe it never writes. Waits
# for the lock (SIGIL_CLUSTER_LOCK_WAIT seconds, default 1800: another test run may hold
# it), prints "locked", and holds it while the test process lives. When the pipe closes
# (the process ended: passed, failed, panicked or killed), takes down the cluster if TAG
# still owns it. Started in its own session, so a signal to the test's process group
# does not reach it.
guard() {
  local tag=${1:?tag}
  exec 9>"$LOCK"
  if ! flock -w "${SIGIL_CLUSTER_LOCK_WAIT:-1800}" 9; then
    log "guard: the cluster lock $LOCK stayed taken for ${SIGIL_CLUSTER_LOCK_WAIT:-1800}s"
    exit 1
  fi
  echo locked
  exec 1>&2
  cat >/dev/null || true
  if [ "$(cat "$RUN/owner" 2>/dev/null)" = "$tag" ]; then
    log "guard: $tag has ended; taking its cluster down"
    SIGIL_CLUSTER_LOCKED=1 down
  fi
}

case ${1:-} in
  up) up ;;
  down) down ;;
  status) status ;;
  restart) restart "${2:?component}" ;;
  stop) stop_component "${2:?component}" ;;
  start) start_component "${2:?component}" ;;
  partition) partition "${2:?on|off}" "${3:?NAMESPACE/SERVICE}" ;;
  kill) kill_container "${2:?container id}" ;;
  env) print_env 2>/dev/null ;;
  leftovers) leftovers ;;
  guard) guard "${2:-}" ;;
  *) sed -n '2,14p' "$0" >&2; exit 2 ;;
esac
