# Sigil: the entry points the README names. `make help` lists them.
SHELL := /usr/bin/env bash
.DEFAULT_GOAL := help
CARGO ?= cargo
export GOTOOLCHAIN := local

.PHONY: help
help: ## List targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-14s %s\n", $$1, $$2}'

.PHONY: demo
demo: ## Bring up a local control plane, run Sigil on loopback, and show a workload getting its SVID
	@bash hack/demo.sh

.PHONY: test
test: ## Install what the tests need (cached) and run every test
	@CARGO=$(CARGO) bash hack/test.sh

.PHONY: test-tools
test-tools: ## Build the pinned test peers (kube-apiserver, etcd, ...) and the real node's tools into the cache
	@bash hack/test-tools.sh

.PHONY: cluster
cluster: ## A real single-node Kubernetes (kubelet, containerd) in its own network namespace: docs/real-node.md
	@bash hack/cluster.sh up

.PHONY: cluster-down
cluster-down: ## Stop the real node and remove every trace of it (mounts, processes, netns, cgroups)
	@bash hack/cluster.sh down

.PHONY: cluster-demo
cluster-demo: ## On the real node: make cluster, images, helm install, the README's example pod gets its SVID
	@bash hack/cluster-demo.sh

.PHONY: images
images: ## Build Sigil's images and the test images without Docker; import them when the node is up
	@bash hack/images.sh all

.PHONY: build
build: ## Build the three binaries and the CLI (release)
	@bash hack/test-tools.sh swtpm # Debian's libtss2 + pkg-config, which the agent's TPM helper links
	$(CARGO) build --release --locked --bins

.PHONY: lint
lint: ## clippy with warnings as errors, rustfmt check, and no unused dependency
	@bash hack/test-tools.sh swtpm cargo-machete # Debian's libtss2 + pkg-config, which the agent's TPM helper links
	$(CARGO) clippy --workspace --all-targets --locked -- -D warnings
	$(CARGO) fmt --all --check
	.tools/bin/cargo-machete

.PHONY: codegen
codegen: ## Regenerate the protobuf code in identity/src/proto/gen
	SIGIL_REGENERATE=1 $(CARGO) test -p sigil-identity --test codegen

.PHONY: crds
crds: ## Regenerate crds/ from the operator's CRD types
	$(CARGO) run -q -p sigil-operator --bin sigil-crdgen -- crds

.PHONY: fuzz-smoke
fuzz-smoke: ## Run every fuzz target for a short bounded time (needs the nightly toolchain)
	@bash hack/fuzz-smoke.sh

.PHONY: soak
soak: test-tools ## The 1-hour soak (not in make test): pods churning at 5/s, CA rotation every 10 min, ClusterSPIFFEID edits, federation changes, RSS/fd slopes
	SIGIL_SOAK_SECS=$${SIGIL_SOAK_SECS:-3600} SIGIL_SOAK_PODS_PER_SEC=$${SIGIL_SOAK_PODS_PER_SEC:-5} \
	SIGIL_SOAK_CA_TTL=$${SIGIL_SOAK_CA_TTL:-20m} SIGIL_SOAK_EDIT_SECS=$${SIGIL_SOAK_EDIT_SECS:-60} \
	SIGIL_SOAK_FEDERATION_SECS=$${SIGIL_SOAK_FEDERATION_SECS:-300} SIGIL_TEST_BINARY_TIMEOUT=$${SIGIL_TEST_BINARY_TIMEOUT:-5400} \
	$(CARGO) test --locked -p sigil-e2e --test soak -- --nocapture

.PHONY: bench
bench: test-tools ## Benchmarks (not part of make test): prints a table, writes bench/out/*.json
	@bash hack/bench.sh
