//! A recycled PID is refused after the peer was pinned. This test stands a fake /proc in
//! for the kernel's: the process that connected is pinned by its start time, the PID then
//! shows another start time (what a reused PID looks like), and attestation refuses it
//! instead of reading the newcomer's cgroups and binary. (The real kernel handing the PID
//! to another process between `connect()` and accept is played in
//! e2e/tests/attacks_revocation.rs, steering the next PID through ns_last_pid.)
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::time::Duration;

use sigil_agent::attest::peer::{PeerError, PeerProcess};
use sigil_agent::attest::{AttestError, WorkloadAttestor};

fn write_stat(proc: &Path, pid: i32, start_time: u64) {
    let dir = proc.join(pid.to_string());
    std::fs::create_dir_all(&dir).unwrap();
    // Fields 3.. of /proc/<pid>/stat; field 22 is the start time.
    let mut fields: Vec<String> = (3..=52).map(|i| i.to_string()).collect();
    fields[22 - 3] = start_time.to_string();
    std::fs::write(
        dir.join("stat"),
        format!("{pid} (workload) {}", fields.join(" ")),
    )
    .unwrap();
    std::fs::write(dir.join("cgroup"), "0::/\n").unwrap();
}

#[tokio::test]
async fn a_recycled_pid_is_refused() {
    let proc = tempfile::tempdir().unwrap();
    let etc = tempfile::tempdir().unwrap();
    write_stat(proc.path(), 4242, 1000);
    let peer = PeerProcess::pin(4242, 1000, 1000, proc.path()).unwrap();
    let attestor = WorkloadAttestor::new(
        proc.path().to_owned(),
        etc.path().to_owned(),
        None,
        Duration::from_secs(1),
    );
    // The same process: attested (unix selectors only, it is in no pod).
    let ok = attestor.attest(&peer).await.unwrap();
    assert!(
        ok.selectors
            .iter()
            .any(|s| s.to_string() == "unix:uid:1000")
    );

    // The PID now belongs to a process that started later.
    write_stat(proc.path(), 4242, 2000);
    let err = attestor.attest(&peer).await.unwrap_err();
    assert!(
        matches!(err, AttestError::Peer(PeerError::Recycled(4242))),
        "{err}"
    );
    assert_eq!(err.metric_label(), "pid_recycled");

    // And when it is gone altogether.
    std::fs::remove_dir_all(proc.path().join("4242")).unwrap();
    assert!(matches!(
        attestor.attest(&peer).await.unwrap_err(),
        AttestError::Peer(PeerError::Exited(4242))
    ));
}
