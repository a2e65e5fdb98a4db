//! csi-sanity (kubernetes-csi/csi-test, built by `make test-tools`) against sigil-csi with
//! real mounts, running every spec a node-only plugin of inline ephemeral volumes can run.
//!
//! Left out with `--ginkgo.skip` (csi-sanity would fail them, not skip them):
//! - `[Controller Server]` (every Controller spec): sigil-csi has no Controller service
//!   (inline ephemeral volumes need none) and says so in GetPluginCapabilities; this is
//!   csi-test's documented way to run a node-only plugin (kubernetes-csi/csi-test#208).
//! - "should remove target path": it creates its volume with the Controller's
//!   CreateVolume before publishing, unconditionally. Unpublish removing the target is
//!   tested with real mounts and a real agent in e2e/tests/csi.rs.
//!
//! Skipped by csi-sanity itself: each skip it reports must be one of [`JUSTIFIED_SKIPS`],
//! which says why that is right for sigil-csi; an unexpected skip fails this test.
//! Needs v5.6.0 or later (kubernetes-csi/csi-test#595: earlier versions ask a node-only
//! plugin for controller capabilities anyway).
#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use sigil_csi::app::{Args, run};
use sigil_csi::mounter::LinuxMounter;
use sigil_telemetry::LogFormat;
use sigil_telemetry::Readiness;
use tokio_util::sync::CancellationToken;

/// The reasons csi-sanity gives for the specs it skips, and why each is right here.
const JUSTIFIED_SKIPS: &[(&str, &str)] = &[
    (
        "NodeStageVolume not supported",
        "no STAGE_UNSTAGE_VOLUME: an ephemeral volume has nothing to stage; NodePublishVolume makes it whole",
    ),
    ("NodeUnstageVolume not supported", "as NodeStageVolume"),
    (
        "NodeGetVolume not supported",
        "no GET_VOLUME_STATS: a 4 MiB tmpfs or a socket bind mount has no capacity worth reporting",
    ),
    (
        "NodeExpandVolume not supported",
        "no EXPAND_VOLUME: nothing to resize",
    ),
    (
        "NodeGetVolumeHealth not supported",
        "no VOLUME_CONDITION: the files are rewritten on every rotation; their health is the agent's",
    ),
    (
        "NodeGetStorageHealth not supported",
        "as NodeGetVolumeHealth",
    ),
    (
        "Service does not have single node multi writer capability",
        "no SINGLE_NODE_MULTI_WRITER: each pod's volume is its own and read-only",
    ),
    (
        "Controller Service not provided: CreateVolume not supported",
        "\"should work\" and \"should be idempotent\" create their volume with the Controller; publishing, republishing and unpublishing real volumes are in e2e/tests/csi.rs",
    ),
    (
        "GroupControllerService not supported",
        "no GroupController service: no volume groups or snapshots",
    ),
];

/// (spec, csi-sanity's skip reason) of every spec csi-sanity skipped, from its `-ginkgo.v`
/// output.
fn skipped_specs(verbose: &str) -> Vec<(String, String)> {
    verbose
        .split("------------------------------")
        .filter(|block| block.contains("S [SKIPPED]"))
        .map(|block| {
            let mut lines = block.lines().map(str::trim).filter(|l| !l.is_empty());
            let title = lines.next().unwrap_or_default().to_owned();
            let reason = block
                .lines()
                .map(str::trim)
                .filter_map(|l| l.strip_prefix("[SKIPPED] "))
                .find(|r| !r.starts_with("in ["))
                .unwrap_or_default()
                .to_owned();
            (title, reason)
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn csi_sanity_passes() {
    let csi_sanity = sigil_e2e::tools::tool("csi-sanity").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("csi.sock");
    let cancel = CancellationToken::new();
    let args = Args {
        endpoint: format!("unix://{}", socket.display()),
        node_name: "sanity-node".into(),
        broker_socket_path: dir.path().join("no-broker.sock"),
        agent_socket_dir: dir.path().join("agent"),
        data_dir: dir.path().join("data"),
        token_audience: "sigil-csi".into(),
        health_addr: "127.0.0.1:0".parse().unwrap(),
        log_format: LogFormat::Text,
        socket_publish_wait: std::time::Duration::from_secs(10),
    };
    let server = tokio::spawn(run(
        args,
        Arc::new(LinuxMounter),
        Readiness::new(),
        cancel.clone(),
    ));
    let started = Instant::now();
    while !socket.exists() {
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "sigil-csi did not open its socket"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let out = tokio::process::Command::new(csi_sanity)
        .arg(format!("--csi.endpoint=unix://{}", socket.display()))
        .arg(format!(
            "--csi.mountdir={}",
            dir.path().join("mnt").display()
        ))
        .arg(format!(
            "--csi.stagingdir={}",
            dir.path().join("stage").display()
        ))
        .arg("--csi.testvolumeaccesstype=mount")
        .arg(r"--ginkgo.skip=\[Controller.Server\]|should remove target path")
        .arg("--ginkgo.no-color")
        .arg("--ginkgo.v")
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let summary = stdout
        .lines()
        .filter(|l| l.contains("Passed") && l.contains("Failed"))
        .collect::<Vec<_>>()
        .join("\n");
    println!("csi-sanity: {summary}");
    assert!(
        out.status.success(),
        "csi-sanity failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let passed: u32 = summary
        .split(" Passed")
        .next()
        .and_then(|head| head.rsplit(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    // Identity (3) + Node validation and info (7) at the pinned version.
    assert!(
        passed >= 10,
        "csi-sanity passed only {passed} specs: {summary}"
    );
    let skipped = skipped_specs(&stdout);
    for (spec, reason) in &skipped {
        assert!(
            JUSTIFIED_SKIPS.iter().any(|(r, _)| r == reason),
            "csi-sanity skipped {spec:?} ({reason:?}); make sigil-csi pass it, or justify the skip in JUSTIFIED_SKIPS"
        );
    }
    assert!(
        skipped.iter().any(|(_, r)| r.contains("CreateVolume")),
        "the skip list is read from csi-sanity's output: {skipped:?}"
    );
    cancel.cancel();
    server.await.unwrap().unwrap();
}
