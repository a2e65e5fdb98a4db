//! Reproducible protobuf code generation.
//!
//! The Rust bindings for `identity/proto/*.proto` are generated without `protoc`
//! (`protox` compiles the schemas, `tonic-prost-build` emits messages, clients and
//! servers) and committed under `identity/src/proto/gen/`, so building Sigil needs no
//! code generator at all.
//!
//! By default this test regenerates everything into a temporary directory and fails if
//! any committed file differs. With `SIGIL_REGENERATE=1` it rewrites the committed files
//! instead; that is what `make codegen` runs:
//!
//! ```text
//! SIGIL_REGENERATE=1 cargo test -p sigil-identity --test codegen
//! ```

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

/// Schemas to compile, each with the file prost-build writes for its package and the
/// name it is committed under. prost-build names files after the protobuf package;
/// the Workload API has none, hence `_.rs`.
const SCHEMAS: &[Schema] = &[
    Schema {
        proto: "workload.proto",
        prost_output: "_.rs",
        committed_as: "workload.rs",
    },
    Schema {
        proto: "broker.proto",
        prost_output: "spiffe.broker.rs",
        committed_as: "broker.rs",
    },
    Schema {
        proto: "csi.proto",
        prost_output: "csi.v1.rs",
        committed_as: "csi.rs",
    },
    Schema {
        proto: "node.proto",
        prost_output: "sigil.node.v1.rs",
        committed_as: "node.rs",
    },
    // Envoy's Secret Discovery Service (a minimal, wire-exact subset of
    // envoyproxy/data-plane-api, under its own package names, so type URLs and gRPC
    // paths are Envoy's). One file per protobuf package.
    Schema {
        proto: "envoy/service/secret/v3/sds.proto",
        prost_output: "envoy.service.secret.v3.rs",
        committed_as: "envoy.service.secret.v3.rs",
    },
    Schema {
        proto: "envoy/service/discovery/v3/discovery.proto",
        prost_output: "envoy.service.discovery.v3.rs",
        committed_as: "envoy.service.discovery.v3.rs",
    },
    Schema {
        proto: "envoy/extensions/transport_sockets/tls/v3/secret.proto",
        prost_output: "envoy.extensions.transport_sockets.tls.v3.rs",
        committed_as: "envoy.extensions.transport_sockets.tls.v3.rs",
    },
    Schema {
        proto: "envoy/config/core/v3/base.proto",
        prost_output: "envoy.config.core.v3.rs",
        committed_as: "envoy.config.core.v3.rs",
    },
    Schema {
        proto: "google/rpc/status.proto",
        prost_output: "google.rpc.rs",
        committed_as: "google.rpc.rs",
    },
];

/// Schemas that share a package with one in [`SCHEMAS`] (prost-build writes one file per
/// package): compiled too, generated into that package's file.
const SAME_PACKAGE_PROTOS: &[&str] = &[
    "envoy/config/core/v3/extension.proto",
    "envoy/extensions/transport_sockets/tls/v3/common.proto",
    "envoy/extensions/transport_sockets/tls/v3/tls_spiffe_validator_config.proto",
];

/// The encoded `FileDescriptorSet` (our schemas plus the well-known types they import),
/// for gRPC server reflection.
const DESCRIPTOR_SET_FILE: &str = "file_descriptor_set.bin";

/// Fully qualified names of messages whose derived `Debug` would print secrets.
/// Keep in sync with the `impl Debug` blocks in src/proto/mod.rs (the build fails
/// with `missing_debug_implementations` warnings, or conflicting impls, otherwise).
const REDACTED_DEBUG: &[&str] = &[
    ".X509SVID",
    ".JWTSVID",
    ".ValidateJWTSVIDRequest",
    ".WITSVID",
    ".spiffe.broker.X509SVID",
    ".spiffe.broker.JWTSVID",
    ".sigil.node.v1.PsatAttestation",
    ".sigil.node.v1.MintJwtSvidResponse",
    ".csi.v1.NodePublishVolumeRequest",
    ".envoy.extensions.transport_sockets.tls.v3.TlsCertificate",
    ".envoy.service.discovery.v3.DiscoveryResponse",
];

const DRIFT_MESSAGE: &str = "generated protobuf code drifted: run `make codegen`";

struct Schema {
    proto: &'static str,
    prost_output: &'static str,
    committed_as: &'static str,
}

fn crate_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn gen_dir() -> PathBuf {
    crate_dir().join("src").join("proto").join("gen")
}

/// Compiles the schemas and generates every committed file, in memory: file name
/// (relative to `gen/`) to contents.
fn generate() -> BTreeMap<String, Vec<u8>> {
    let mut compiler = protox::Compiler::new([crate_dir().join("proto")])
        .unwrap_or_else(|e| panic!("protox setup: {e}"));
    // Names are resolved against the include path, so descriptors carry relative names
    // ("workload.proto") and never a path of this machine.
    compiler
        .include_imports(true)
        .open_files(
            SCHEMAS
                .iter()
                .map(|s| s.proto)
                .chain(SAME_PACKAGE_PROTOS.iter().copied()),
        )
        .unwrap_or_else(|e| panic!("protox failed to compile identity/proto: {e:?}"));

    // Reflection descriptors: no source info (smaller, and nothing but the schema).
    // `encode_file_descriptor_set` keeps extension options such as CSI's `csi_secret`,
    // which a round trip through `prost_types` would drop as unknown fields.
    compiler.include_source_info(false);
    let descriptor_set = compiler.encode_file_descriptor_set();

    // Code generation wants the comments (they become rustdoc). The imported well-known
    // types stay in the set because prost-build inspects them (e.g. to decide whether a
    // message can derive `Eq`), but it generates nothing for them: `.google.protobuf`
    // maps to `prost_types`. The file list check below makes sure of that.
    compiler.include_source_info(true);
    let fds = compiler.file_descriptor_set();

    let out = tempfile::tempdir().unwrap_or_else(|e| panic!("temp dir: {e}"));
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .build_transport(true)
        // Every RPC a server does not implement answers Unimplemented by default, so a
        // CSI node plugin implements only what it offers.
        .generate_default_stubs(true)
        // Our codec (prost with a smaller encode buffer per stream; see src/proto/mod.rs).
        .codec_path("crate::proto::Codec")
        // Ordered maps: encoding is deterministic (map entries go out in key order),
        // which keeps bundle maps and test vectors byte-stable.
        .btree_map(".")
        // Messages that carry private keys or bearer tokens get a hand-written,
        // redacting `Debug` in src/proto/mod.rs instead of the derived one.
        .skip_debug(REDACTED_DEBUG)
        .out_dir(out.path())
        .compile_fds(fds)
        .unwrap_or_else(|e| panic!("tonic-prost-build failed: {e}"));

    let mut produced: Vec<String> = fs::read_dir(out.path())
        .unwrap_or_else(|e| panic!("read {}: {e}", out.path().display()))
        .map(|entry| {
            let entry = entry.unwrap_or_else(|e| panic!("read dir entry: {e}"));
            entry.file_name().to_string_lossy().into_owned()
        })
        .collect();
    produced.sort();
    let mut expected: Vec<String> = SCHEMAS.iter().map(|s| s.prost_output.to_owned()).collect();
    expected.sort();
    assert_eq!(
        produced, expected,
        "tonic-prost-build wrote an unexpected set of files; update SCHEMAS in tests/codegen.rs"
    );

    let mut files = BTreeMap::new();
    for schema in SCHEMAS {
        let path = out.path().join(schema.prost_output);
        let code =
            fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
        let header = format!(
            "// @generated from identity/proto/{} by identity/tests/codegen.rs. Do not edit:\n\
             // change the .proto and run `make codegen`.\n",
            schema.proto
        );
        files.insert(
            schema.committed_as.to_owned(),
            format!("{header}{code}").into_bytes(),
        );
    }
    files.insert(DESCRIPTOR_SET_FILE.to_owned(), descriptor_set);
    files
}

/// Files currently committed under `gen/`, by name.
fn committed_names(dir: &Path) -> Vec<String> {
    let Ok(entries) = fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut names: Vec<String> = entries
        .map(|entry| {
            let entry = entry.unwrap_or_else(|e| panic!("read dir entry: {e}"));
            entry.file_name().to_string_lossy().into_owned()
        })
        .collect();
    names.sort();
    names
}

#[test]
fn generated_protobuf_code_is_up_to_date() {
    let generated = generate();
    let dir = gen_dir();

    if std::env::var_os("SIGIL_REGENERATE").is_some_and(|v| v == "1") {
        fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("create {}: {e}", dir.display()));
        for stale in committed_names(&dir) {
            if !generated.contains_key(&stale) {
                let path = dir.join(&stale);
                fs::remove_file(&path).unwrap_or_else(|e| panic!("remove {}: {e}", path.display()));
            }
        }
        for (name, contents) in &generated {
            let path = dir.join(name);
            fs::write(&path, contents).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
        }
        eprintln!("regenerated {} files in {}", generated.len(), dir.display());
        return;
    }

    let mut problems = Vec::new();
    for (name, contents) in &generated {
        match fs::read(dir.join(name)) {
            Ok(committed) if committed == *contents => {}
            Ok(_) => problems.push(format!("{name}: differs from freshly generated output")),
            Err(e) => problems.push(format!("{name}: cannot read committed copy ({e})")),
        }
    }
    for name in committed_names(&dir) {
        if !generated.contains_key(&name) {
            problems.push(format!("{name}: committed but no longer generated"));
        }
    }
    assert!(
        problems.is_empty(),
        "{DRIFT_MESSAGE}\n  {}",
        problems.join("\n  ")
    );
}

/// Generation must not depend on anything but the schemas: two runs in one process
/// (different temp dirs) give identical bytes.
#[test]
fn generation_is_deterministic() {
    assert!(generate() == generate(), "two code generation runs differ");
}
