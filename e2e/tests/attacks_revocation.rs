//! The attack suite for revocation (issue 21, item 4) and three of the smaller holes
//! (item 5: autoPopulateDNSNames, PID reuse at accept). Each test plays the attacker
//! against the real pieces — the operator's Node API on a real apiserver, the identity
//! index fed by real watches, the agent's accept path with real processes — and says in
//! its doc comment what it did to the code before the fix. The TPM attacks are in
//! operator/tests/attacks_tpm.rs (they need swtpm); the Broker API audience check is a
//! unit test in node-agent/src/broker_api.rs (the real apiserver always checks
//! audiences, so the attacker there is an audience-unaware TokenReview answer).
#![allow(clippy::unwrap_used)]

use sigil_testkit::node_api as node_api_common;
use sigil_testkit::trust_domain as trust_domain_common;

use std::io::BufRead as _;
use std::time::{Duration, Instant};

use futures::StreamExt as _;
use k8s_openapi::api::core::v1::{Node, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::ResourceExt as _;
use kube::api::{Api, DeleteParams, Patch, PatchParams};
use node_api_common::{World, create};
use serde_json::json;
use sigil_agent::node_client::{NodeClient, NodeClientError};
use sigil_e2e::{eventually, unique};
use sigil_identity::proto::node as pb;
use sigil_operator::crd::cluster_spiffe_id::ClusterSPIFFEID;
use sigil_operator::index::entry_id;
use sigil_operator::node_api::revocation::{BAN_ANNOTATION, BAN_LABEL};
use tonic::Code;
use trust_domain_common::SETTLE;

/// How soon a revocation must reach an open stream ("within seconds").
const REVOKED_WITHIN: Duration = Duration::from_secs(3);

fn status(e: &NodeClientError) -> &tonic::Status {
    e.status()
        .unwrap_or_else(|| panic!("not an operator answer: {e}"))
}

fn assert_refused(e: &NodeClientError, code: Code, says: &str) {
    let s = status(e);
    assert_eq!(s.code(), code, "{s:?}");
    assert!(
        s.message().contains(says),
        "{:?} lacks {says:?}",
        s.message()
    );
}

/// Reads `stream` until it ends; returns how it ended (None: closed without a status) or
/// panics when it is still open after `within`.
async fn stream_end(
    stream: &mut tonic::Streaming<pb::SyncEntriesResponse>,
    within: Duration,
    what: &str,
) -> Option<tonic::Status> {
    tokio::time::timeout(within, async {
        loop {
            match stream.message().await {
                Ok(Some(_)) => continue,
                Ok(None) => return None,
                Err(s) => return Some(s),
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("the entry stream is still open {within:?} after {what}"))
}

/// A fresh pod-bound token of a new agent pod on `node`, and the pod.
async fn agent_pod(w: &World, node: &str) -> (Pod, String) {
    let pod = w
        .pod(
            &unique("agent"),
            node,
            "sigil-agent",
            json!({"app": "sigil-agent"}),
        )
        .await;
    let token = w.token(&pod, &w.audience).await;
    (pod, token)
}

/// Attack: the machine behind Node B is decommissioned (or stolen) and its Node deleted,
/// but the agent — or whoever copied its SVID and key — keeps its `SyncEntries` stream
/// open and goes on learning every identity scheduled to that node. docs/tpm.md promised
/// "at once"; the stream was never re-authorised.
///
/// Before the fix: the stream stayed open until the agent SVID expired (1h); the test
/// failed with "the entry stream is still open 3s after deleting the Node".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_the_node_ends_its_agents_stream_at_once() {
    let w = World::start("atk-del").await;
    let (_pod, token) = agent_pod(&w, &w.node_b).await;
    let agent = w.agent_client().await;
    agent.attest_psat(&token).await.unwrap();
    let mut stream = agent.sync_entries(0).await.unwrap();
    stream.message().await.unwrap().expect("the first snapshot");

    Api::<Node>::all(w.client.clone())
        .delete(&w.node_b, &DeleteParams::default())
        .await
        .unwrap();
    let deleted = Instant::now();
    let ended = stream_end(&mut stream, REVOKED_WITHIN, "deleting the Node").await;
    let s = ended.expect("ended with a status");
    assert_eq!(s.code(), Code::PermissionDenied, "{s:?}");
    assert!(s.message().contains("no Node with UID"), "{s:?}");
    eprintln!(
        "stream ended {:?} after the Node was deleted",
        deleted.elapsed()
    );

    // Every other call is refused too, and a new stream does not open.
    assert_refused(
        &agent.sync_entries(0).await.unwrap_err(),
        Code::PermissionDenied,
        "no Node with UID",
    );
    assert_refused(
        &agent.renew(&token).await.unwrap_err(),
        Code::PermissionDenied,
        "no Node with UID",
    );
    let metrics = w.metrics_text();
    assert!(
        metrics.contains(r#"rpc="SyncEntries",reason="unknown_node""#),
        "{metrics}"
    );
}

/// Attack: a thief copies the agent's SVID and private key off the node, and renews it
/// forever with `RenewAgent` — after the agent pod is gone, or from a copy the node's owner
/// never learns about. Renewal must prove again what attestation proved (the agent pod
/// still runs on that Node).
///
/// Before the fix: `RenewAgent` needed nothing but the current SVID; the test, with the old
/// `renew()` that sends no token, failed at its first refusal: "called
/// `Result::unwrap_err()` on an `Ok` value: AgentSvid { … }" (renewed with no proof).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stolen_agent_key_does_not_renew_without_a_live_agent_pod() {
    let w = World::start("atk-renew").await;
    let (pod, token) = agent_pod(&w, &w.node_a).await;
    let agent = w.agent_client().await;
    let first = agent.attest_psat(&token).await.unwrap();

    // The real agent renews with a fresh token of its pod.
    let renewed = agent.renew(&token).await.unwrap();
    assert_eq!(renewed.spiffe_id, first.spiffe_id);

    // The thief has the SVID and key, no token.
    assert_refused(
        &agent.renew("").await.unwrap_err(),
        Code::PermissionDenied,
        "needs psat_token",
    );
    // A valid token, but of an agent pod on another Node.
    let (_pod_b, token_b) = agent_pod(&w, &w.node_b).await;
    assert_refused(
        &agent.renew(&token_b).await.unwrap_err(),
        Code::PermissionDenied,
        &format!("agent pod on Node {}", w.node_b),
    );
    // The agent pod is deleted: its token no longer passes TokenReview.
    Api::<Pod>::namespaced(w.client.clone(), &w.ns)
        .delete(&pod.name_any(), &DeleteParams::default().grace_period(0))
        .await
        .unwrap();
    eventually("the agent pod to be gone", SETTLE, || async {
        Api::<Pod>::namespaced(w.client.clone(), &w.ns)
            .get_opt(&pod.name_any())
            .await
            .unwrap()
            .is_none()
            .then_some(())
    })
    .await;
    // Refused by TokenReview (the bound pod is gone), or, while the API server's pod
    // cache still has it, by the operator's own read of the pod.
    let e = agent.renew(&token).await.unwrap_err();
    let gone_reason = match status(&e).code() {
        Code::Unauthenticated => {
            assert!(status(&e).message().contains("TokenReview"), "{e}");
            "token_rejected"
        }
        Code::PermissionDenied => {
            assert!(status(&e).message().contains("no longer exists"), "{e}");
            "pod_mismatch"
        }
        _ => panic!("renewal with a deleted pod's token: {e}"),
    };

    let metrics = w.metrics_text();
    for reason in [
        "renewal_without_token",
        "renewal_node_mismatch",
        gone_reason,
    ] {
        assert!(
            metrics.contains(&format!(r#"rpc="RenewAgent",reason="{reason}""#)),
            "{reason} not counted:\n{metrics}"
        );
    }
}

/// Has the operator sign a CSR for `entry` (SPIFFE ID `id`).
async fn sign(
    agent: &NodeClient,
    entry: &str,
    id: &str,
) -> Result<Vec<pb::SvidResult>, NodeClientError> {
    let key =
        sigil_identity::keys::PrivateKey::generate(sigil_identity::keys::KeyType::EcP256).unwrap();
    let csr = sigil_identity::x509::build_csr(&key, &sigil_identity::SpiffeId::parse(id).unwrap())
        .unwrap();
    agent
        .sign(vec![pb::SvidRequest {
            entry_id: entry.to_owned(),
            csr,
        }])
        .await
}

/// Attack: an agent's key is stolen and the Node must stay (it runs other workloads, or
/// the theft is only suspected). The administrator bans the agent with
/// `sigil agent ban <node>`; the thief keeps streaming entries, signing workload CSRs and
/// minting JWT-SVIDs for the node's pods, re-attests with the agent pod's token, and — root
/// on the node, with the kubelet's credentials — removes the ban annotation.
///
/// Before the fix: there was no deny list; the test (banning by writing the same label and
/// annotation) failed with "the entry stream is still open 3s after the ban", and CSR
/// signing still worked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_banned_agent_is_cut_off_within_a_second() {
    let w = World::start("atk-ban").await;
    let csid = format!("{}-web", w.tag);
    w.cluster_spiffe_id(&csid, "web").await;
    let web = w
        .pod("web-0", &w.node_a, "web", json!({"app": "web"}))
        .await;
    let entry = entry_id(&csid, &web.uid().unwrap());
    let (_pod, token) = agent_pod(&w, &w.node_a).await;
    let agent = w.agent_client().await;
    agent.attest_psat(&token).await.unwrap();
    let mut stream = agent.sync_entries(0).await.unwrap();
    tokio::time::timeout(SETTLE, async {
        loop {
            let msg = stream.message().await.unwrap().unwrap();
            if msg.upserts.iter().any(|e| e.id == entry) {
                return;
            }
        }
    })
    .await
    .expect("the web entry on the stream");
    let workload_id = format!("spiffe://{}/ns/{}/sa/web", w.td, w.ns);
    assert_eq!(
        sign(&agent, &entry, &workload_id).await.unwrap()[0].error_code,
        0
    );

    let outcome = sigil_cli::agent::ban(w.client.clone(), &w.node_a, "stolen in a test")
        .await
        .unwrap();
    assert!(outcome.before.is_none() && outcome.after.is_some());
    let s = stream_end(&mut stream, REVOKED_WITHIN, "the ban")
        .await
        .expect("ended with a status");
    assert_eq!(s.code(), Code::PermissionDenied, "{s:?}");
    assert!(s.message().contains("stolen in a test"), "{s:?}");
    assert!(
        s.message()
            .contains(&format!("sigil agent unban {}", w.node_a)),
        "{s:?}"
    );

    // Everything else the key could do is refused, and so is attesting again.
    for e in [
        sign(&agent, &entry, &workload_id).await.unwrap_err(),
        agent.mint_jwt(&entry, &["db".into()]).await.unwrap_err(),
        agent.renew(&token).await.unwrap_err(),
        agent.attest_psat(&token).await.unwrap_err(),
    ] {
        assert_refused(&e, Code::PermissionDenied, "is banned");
    }

    // Root on the node, with the kubelet's credentials, removes the annotation (which a
    // kubelet may do on its own Node): the label still bans.
    Api::<Node>::all(w.client.clone())
        .patch(
            &w.node_a,
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"annotations": {BAN_ANNOTATION: null}}})),
        )
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_refused(
        &agent.attest_psat(&token).await.unwrap_err(),
        Code::PermissionDenied,
        BAN_LABEL,
    );

    // Unbanned: the agent attests and streams again.
    let outcome = sigil_cli::agent::unban(w.client.clone(), &w.node_a)
        .await
        .unwrap();
    assert!(outcome.before.is_some() && outcome.after.is_none());
    eventually("attestation after the unban", SETTLE, || async {
        agent.attest_psat(&token).await.ok()
    })
    .await;
    assert!(agent.sync_entries(0).await.is_ok());
    assert!(w.metrics_text().contains(r#"reason="agent_banned""#));
}

/// Attack: a pod author who may write EndpointSlices in their own namespace (a namespace
/// admin, or a controller they compromised) lists their pod in slices labelled
/// `kubernetes.io/service-name: api.prod` — which renders `api.prod`, the short name of
/// Service `api` in namespace `prod` — and `payments`, a Service that does not exist. With
/// `autoPopulateDNSNames` the operator put both names into the pod's X509-SVID, so the
/// pod could serve TLS as another namespace's service.
///
/// Before the fix: the entry carried `api.prod` and `payments` (the test failed at
/// "a dotted service-name label put api.prod into the SVID").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endpoint_slices_cannot_name_other_namespaces_or_missing_services() {
    let w = World::start("atk-dns").await;
    let csid = format!("{}-auto", w.tag);
    create(
        &Api::<ClusterSPIFFEID>::all(w.client.clone()),
        json!({"apiVersion": "sigil.dev/v1alpha1", "kind": "ClusterSPIFFEID", "metadata": {"name": csid}, "spec": {
            "trustDomain": w.td_object,
            "namespaceSelector": {"matchLabels": {"sigil-test": w.tag}},
            "podSelector": {"matchLabels": {"app": "evil"}},
            "autoPopulateDNSNames": true,
        }}),
    )
    .await;
    let pod = w
        .pod("evil-0", &w.node_a, "web", json!({"app": "evil"}))
        .await;
    let id = entry_id(&csid, &pod.uid().unwrap());
    let view = w.index.node(&w.node_a);
    let names = || view.entry(&id).map(|e| e.dns_names.clone());
    eventually("the pod's entry", SETTLE, || async { names() }).await;

    let services = Api::<Service>::namespaced(w.client.clone(), &w.ns);
    let svc = |name: &str| json!({"metadata": {"name": name}, "spec": {"ports": [{"port": 443}]}});
    create(&services, svc("web")).await;
    let slices = Api::<EndpointSlice>::namespaced(w.client.clone(), &w.ns);
    for (slice, service) in [
        ("dotted-1", "api.prod"),
        ("ghost-1", "payments"),
        ("web-1", "web"),
    ] {
        create(
            &slices,
            json!({
                "metadata": {"name": slice, "labels": {"kubernetes.io/service-name": service}},
                "addressType": "IPv4",
                "endpoints": [{"addresses": ["10.9.9.9"], "targetRef": {"kind": "Pod", "namespace": w.ns, "name": "evil-0"}}],
            }),
        )
        .await;
    }
    // The real Service's names arrive: every slice has been seen by now.
    let ns = w.ns.clone();
    let got = eventually("the web Service's names", SETTLE, || async {
        names().filter(|n| n.contains(&format!("web.{ns}.svc")))
    })
    .await;
    assert!(
        !got.iter().any(|n| n.starts_with("api.prod")),
        "a dotted service-name label put api.prod into the SVID: {got:?}"
    );
    assert!(
        !got.iter().any(|n| n.starts_with("payments")),
        "a slice naming no Service put payments into the SVID: {got:?}"
    );

    // Once the Service exists, its names follow.
    create(&services, svc("payments")).await;
    eventually("the payments Service's names", SETTLE, || async {
        names().filter(|n| n.contains(&format!("payments.{ns}.svc")))
    })
    .await;
    services
        .delete("payments", &DeleteParams::default())
        .await
        .unwrap();
    eventually(
        "the payments names to go with the Service",
        SETTLE,
        || async { names().filter(|n| !n.iter().any(|d| d.starts_with("payments"))) },
    )
    .await;
}

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
    let caps = sigil_agent::limits::Caps::connections(
        16,
        16,
        sigil_agent::transport::ApiMetrics::default(),
    );
    let incoming = sigil_agent::transport::incoming(listener, "/proc".into(), caps, cancel.clone());
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
