//! End-to-end harness: a real kube-apiserver and etcd on loopback
