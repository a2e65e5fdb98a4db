# syntax=docker/dockerfile:1
# GENERATED from images/images.conf by `hack/images.sh dockerfile`: edit that file, then
# regenerate. The real-node tests build the same images without Docker from the same
# description (hack/images.sh), and `hack/images.sh check` fails when the two differ.
#
# The three Sigil images from one build:
#   docker build --target sigil-operator -t sigil-operator .
#   docker build --target sigil-agent    -t sigil-agent .
#   docker build --target sigil-csi      -t sigil-csi .

FROM docker.io/library/rust:1.95-bookworm AS build
# The agent's TPM helper links the tss2 libraries (TPM node attestation, tss-esapi).
RUN apt-get update && apt-get install -y --no-install-recommends libtss2-dev pkg-config \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bins \
 && mkdir -p /out/lib \
 && cp target/release/sigil target/release/sigil-agent target/release/sigil-agent-tpm target/release/sigil-csi target/release/sigil-operator /out/ \
 && cp -L /usr/lib/*-linux-gnu/libtss2-esys.so.0 /usr/lib/*-linux-gnu/libtss2-mu.so.0 /usr/lib/*-linux-gnu/libtss2-sys.so.1 /usr/lib/*-linux-gnu/libtss2-tcti-device.so.0 /usr/lib/*-linux-gnu/libtss2-tctildr.so.0 /out/lib/

# The operator needs nothing from the host: non-root, read-only root filesystem (the
# chart sets it), no shell.
FROM gcr.io/distroless/cc-debian12:nonroot AS sigil-operator
COPY --from=build /out/sigil-operator /sigil-operator
USER 65532:65532
ENTRYPOINT ["/sigil-operator"]

# The agent runs as root with CAP_SYS_PTRACE (reading /proc/<pid>/exe of workloads) and
# hostPID; see charts/sigil/templates/agent.yaml. The sigil CLI is included for debugging
# (kubectl exec ... -- /sigil x509 fetch). tss2 for the TPM (the device TCTI; libcrypto
# comes with the base image), which only the TPM helper sigil-agent-tpm links: the agent
# runs it on nodes that attest with a TPM (docs/tpm.md).
FROM gcr.io/distroless/cc-debian12 AS sigil-agent
COPY --from=build /out/lib/libtss2-esys.so.0 /usr/lib/x86_64-linux-gnu/
COPY --from=build /out/lib/libtss2-sys.so.1 /usr/lib/x86_64-linux-gnu/
COPY --from=build /out/lib/libtss2-mu.so.0 /usr/lib/x86_64-linux-gnu/
COPY --from=build /out/lib/libtss2-tctildr.so.0 /usr/lib/x86_64-linux-gnu/
COPY --from=build /out/lib/libtss2-tcti-device.so.0 /usr/lib/x86_64-linux-gnu/
COPY --from=build /out/sigil-agent /sigil-agent
COPY --from=build /out/sigil-agent-tpm /sigil-agent-tpm
COPY --from=build /out/sigil /sigil
ENTRYPOINT ["/sigil-agent"]

# sigil-csi mounts into pods' volume directories: privileged, root.
FROM gcr.io/distroless/cc-debian12 AS sigil-csi
COPY --from=build /out/sigil-csi /sigil-csi
ENTRYPOINT ["/sigil-csi"]
