//! Lays out sigil-agent's code by how it runs (release builds for x86_64 Linux only).
//!
//! `link-order.txt` lists, in order, the functions the agent ran in the `agent` bench
//! (start-up, attestation, serving SVIDs, rotation), then those it ran only in its pod on
//! the real node (the in-cluster configuration, the kubelet's probes, the chart's flags).
//! lld places them first and together (`--symbol-ordering-file`), so the code the agent
//! runs fills fewer pages. The kernel maps up to 64 KiB around every page fault in the
//! binary, so with the default layout an idle agent had 80% of its code resident, and with
//! this one 33% (bench/README.md, "the agent's idle RSS and the build profile"). `hack/link-order.sh` writes the file again and
//! checks how much of it a build still matches.
//!
//! The names are specific to the toolchain, the locked dependencies, the target and the set
//! of packages built (their features unify). So the file is written from `cargo build
//! --release --bins`, as the images are built, and only x86_64 Linux (GNU) gets it. A name
//! the build does not have is skipped: a stale file costs memory, never correctness.
//! rust-lld is rustc's default linker there; with a linker that has no
//! `--symbol-ordering-file` (GNU ld), set `SIGIL_LINK_ORDER=0`.

fn main() {
    println!("cargo::rerun-if-changed=link-order.txt");
    println!("cargo::rerun-if-env-changed=SIGIL_LINK_ORDER");
    let var = |name: &str| std::env::var(name).unwrap_or_default();
    let wanted = var("SIGIL_LINK_ORDER") != "0"
        && var("PROFILE") == "release"
        && var("CARGO_CFG_TARGET_ARCH") == "x86_64"
        && var("CARGO_CFG_TARGET_OS") == "linux"
        && var("CARGO_CFG_TARGET_ENV") == "gnu";
    if !wanted {
        return;
    }
    let file = std::path::Path::new(&var("CARGO_MANIFEST_DIR")).join("link-order.txt");
    if file.is_file() {
        println!(
            "cargo::rustc-link-arg-bin=sigil-agent=-Wl,--symbol-ordering-file={}",
            file.display()
        );
        println!("cargo::rustc-link-arg-bin=sigil-agent=-Wl,--no-warn-symbol-ordering");
    }
}
