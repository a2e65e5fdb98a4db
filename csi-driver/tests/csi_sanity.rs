//! csi-sanity (kubernetes-csi/csi-test, built by `make test-tools`) against sigil-csi with
//! real mounts.
//!
//! Skipped by us: `[Controller Server]`, csi-test's documented way to run a node-only
//! plugin (kubernetes-csi/csi-test#208): sigil-csi has no Controller service (inline
//! ephemeral volumes need none) and says so in GetPluginCapabilities. csi-sanity itself
//! then skips what needs capabilities we do not advertise (staging, stats, expansion);
//! the summary line is printed. Also skipped by us: "should remove target path", which
//! creates its volume with the Controller's CreateVolume before publishing it. Publishing real volumes, unpublish
//! removing the target, and idempotency are tested with real mounts and a real agent in
//! e2e/tests/csi.rs. Needs v5.6.0 or later (kubernetes-csi/csi-test#595: earlier versions
//! ask a node-only plugin for controller capabilities anyway).
#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use sigil_csi::app::{Args, run};
use sigil_csi::mounter::LinuxMounter;
use sigil_telemetry::LogFormat;
use sigil_telemetry::Readiness;
use tokio_util::sync::CancellationToken;

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
    cancel.cancel();
    server.await.unwrap().unwrap();
}
