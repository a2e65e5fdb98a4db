//! `make demo`'s runner end to end (without the Ctrl-C wait): a control plane, the real
//! sigil-operator / sigil-agent / sigil binaries, a pod-shaped workload fetching its SVID,
//! a rotation, and `sigil explain`. The binaries are the ones this `cargo test` built.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

#[tokio::test]
async fn the_demo_shows_an_svid_a_rotation_and_an_explanation() {
    let demo = std::path::Path::new(env!("CARGO_BIN_EXE_sigil-demo"));
    let bin_dir = demo.parent().unwrap();
    for b in ["sigil-operator", "sigil-agent", "sigil"] {
        assert!(
            bin_dir.join(b).is_file(),
            "{b} was not built next to sigil-demo"
        );
    }
    let out = tokio::time::timeout(
        Duration::from_secs(300),
        tokio::process::Command::new(demo)
            .env("SIGIL_BIN_DIR", bin_dir)
            .env("SIGIL_DEMO_HOLD", "0")
            .output(),
    )
    .await
    .expect("the demo took over 5 minutes")
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    println!("{stdout}");
    assert!(
        out.status.success(),
        "demo failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for needle in [
        "SPIFFE ID:   spiffe://demo.example.org/ns/default/sa/web",
        "pod object created → SVID in the pod's process",
        "--- update 2 at",
        "rotation delivered to the open stream",
        "✔ demo-workloads: spiffe://demo.example.org/ns/default/sa/web",
        "[demo] done",
    ] {
        assert!(
            stdout.contains(needle),
            "demo output lacks {needle:?}:\n{stdout}"
        );
    }
}
