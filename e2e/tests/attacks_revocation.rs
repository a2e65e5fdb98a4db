//! The attack suite of issue 21 played end to end against the real pieces. Each test
//! plays the attacker and says in its doc comment what it did to the code before the fix.
//! This one: PID reuse at accept (item 5), with the agent's accept path and real
//! processes.
#![allow(clippy::unwrap_used)]

use std::io::BufRead as _;
use std::time::Duration;

use futures::StreamExt as _;

/// What the attacker program does: connect to the socket, print its PID, hand the
/// connection to a child that keeps it open, and exit — so its PID can go to another
/// process while the connection waits in the listener's backlog.
const CONNECT_AND_EXIT: &str = r#"
use IO::Socket::UNIX;
my $s = IO::Socket::UNIX->new(Peer => $ARGV[0]) or die "connect: $!";
my $child = fork();
if ($child == 0) { sleep 60; exit 0; }
print "$$ $child\n";
exit 0;
"#;

/// Starts `sleep 30` as PID `pid` (root: steers the kernel's next PID through
/// /proc/sys/kernel/ns_last_pid); None when another process took it first.
fn spawn_with_pid(pid: u32) -> Option<std::process::Child> {
    for _ in 0..20 {
        std::fs::write("/proc/sys/kernel/ns_last_pid", (pid - 1).to_string()).ok()?;
        let mut child = std::process::Command::new("sleep").arg("30").spawn().ok()?;
        if child.id() == pid {
            return Some(child);
        }
        let _ = child.kill();
        let _ = child.wait();
    }
    None
}

/// Attack: PID reuse at accept. A workload connects to the agent's socket, hands the
/// connection to a child and exits; its PID is then reused by a victim process (here
/// `/usr/bin/sleep`; in a cluster, another pod's process) before the agent accepts. The
/// kernel's SO_PEERCRED still names the old PID, so an agent that reads `/proc/<pid>` at
/// accept reads the victim: its cgroups (its pod), its binary — and serves the attacker the
/// victim's identity.
///
/// Before the fix: the accepted connection was pinned to the victim and attested with the
/// victim's `unix:path:/usr/bin/sleep` (the test failed at "attested as the process that
/// took the PID"). After: SO_PEERPIDFD shows the connecting process has exited, and the
/// peer is refused ("exited before it could be attested").
#[tokio::test(flavor = "current_thread")]
async fn a_recycled_pid_at_accept_is_not_read_as_the_caller() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("api.sock");
    let listener = tokio::net::UnixListener::bind(&path).unwrap();
    let cancel = tokio_util::sync::CancellationToken::new();
    let incoming = sigil_agent::workload_api::incoming(listener, "/proc".into(), cancel.clone());
    futures::pin_mut!(incoming);
    let etc = tempfile::tempdir().unwrap();
    let attestor = sigil_agent::attest::WorkloadAttestor::new(
        "/proc".into(),
        etc.path().into(),
        None,
        Duration::from_secs(1),
    );
    let sleep_exe = std::fs::canonicalize(
        std::process::Command::new("sh")
            .args(["-c", "command -v sleep"])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
            .unwrap(),
    )
    .unwrap();

    for attempt in 0..10 {
        let mut attacker = std::process::Command::new("perl")
            .args(["-e", CONNECT_AND_EXIT, path.to_str().unwrap()])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        std::io::BufReader::new(attacker.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let mut ids = line.split_whitespace().map(|n| n.parse::<u32>().unwrap());
        let (pid, holder) = (ids.next().unwrap(), ids.next().unwrap());
        // Reaped: the PID is free for the next process.
        assert!(attacker.wait().unwrap().success());
        let victim = spawn_with_pid(pid);

        // Only now does the agent accept the connection.
        let conn = incoming.next().await.unwrap().unwrap();
        let peer = tonic::transport::server::Connected::connect_info(&conn).0;
        let _ = std::process::Command::new("kill")
            .arg(holder.to_string())
            .status();
        let Some(mut victim) = victim else {
            eprintln!("attempt {attempt}: another process took PID {pid}; again");
            continue;
        };
        let result = match &peer {
            Ok(p) => attestor
                .attest(p)
                .await
                .map(|a| a.selectors)
                .map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        };
        let _ = victim.kill();
        let _ = victim.wait();
        match result {
            Ok(selectors) => panic!(
                "attested as the process that took the PID ({}): {selectors:?}",
                sleep_exe.display()
            ),
            Err(e) => {
                assert!(e.contains("exited before it could be attested"), "{e}");
                return;
            }
        }
    }
    panic!(
        "could not hand a PID to the victim in 10 attempts (is /proc/sys/kernel/ns_last_pid writable?)"
    );
}
