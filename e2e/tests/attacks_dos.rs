//! The denial-of-service attack suite (issue 21, item 3): each test plays an attacker from
//! inside the cluster against the real operator and agent code (a real kube-apiserver,
//! the Node API on loopback, the agent's Workload API socket, workloads as real processes
//! in pod-shaped cgroups) and checks that what stops it stops it with a precise status,
//! a log line and a counted reason, while everyone else keeps being served.
//!
//! The operator and the agent run inside this test process, so its resident set (VmRSS)
//! is an upper bound of theirs: the memory tests read it before and after an attack and
//! print the figures next to the chart's memory limits (256 MiB for each).
//!
//! Attackers on the Node API connect from other loopback addresses (127.0.0.2 and up) so
//! per-address limits tell them from the legitimate agents on 127.0.0.1.
#![allow(clippy::unwrap_used)]

use sigil_testkit::node_api as node_api_common;
use sigil_testkit::trust_domain as trust_domain_common;

use sigil_testkit::agent as agent_common;

use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use agent_common::*;
use http_body_util::StreamBody;
use hyper::body::{Bytes, Frame};
use hyper_util::rt::{TokioExecutor, TokioIo};
use node_api_common::{CLUSTER, World, WorldOptions};
use serde_json::json;
use sigil_identity::BundleSet;
use sigil_identity::proto::node as pb;
use sigil_identity::tls::{
    Authorizer, BundleSource, SharedBundles, SpiffeServerVerifier, SwappableCert,
};
use sigil_operator::node_api::limits::NodeApiLimits;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpSocket;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;
use tonic::Code;
use tonic::transport::{Channel, Endpoint};

/// The chart's memory limit of the operator and of the agent (charts/sigil/values.yaml).
const CHART_MEMORY_LIMIT_MIB: f64 = 256.0;

/// VmRSS of this process (which hosts the operator and the agent), MiB.
/// The tests here measure the RSS of this process and hold hundreds of connections: run
/// one at a time, or one test's memory and sockets would count against another's.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn rss_mib() -> f64 {
    sigil_e2e::process::rss_kib(std::process::id()) as f64 / 1024.0
}

/// A TLS client without a client certificate, as anyone in the cluster can make one: it
/// checks the operator against the published bundle and presents nothing.
async fn anonymous_tls(w: &World) -> Arc<rustls::ClientConfig> {
    let mut set = BundleSet::new();
    set.upsert(w.bootstrap_bundle().await);
    let verifier = SpiffeServerVerifier::new(
        SharedBundles::new(set) as Arc<dyn BundleSource>,
        Authorizer::Any,
    );
    Arc::new(sigil_identity::tls::client_config(SwappableCert::new(), verifier).unwrap())
}

/// One TLS connection to the Node API from `from`.
async fn connect_from(
    tls: &Arc<rustls::ClientConfig>,
    to: &str,
    from: IpAddr,
) -> std::io::Result<TlsStream<tokio::net::TcpStream>> {
    let socket = TcpSocket::new_v4()?;
    socket.bind(SocketAddr::new(from, 0))?;
    let tcp = socket.connect(to.parse().unwrap()).await?;
    let name = rustls::pki_types::ServerName::try_from("sigil-operator").unwrap();
    TlsConnector::from(tls.clone()).connect(name, tcp).await
}

/// A gRPC channel (one connection) to the Node API from `from`, without a client
/// certificate.
async fn channel_from(tls: &Arc<rustls::ClientConfig>, to: &str, from: IpAddr) -> Channel {
    let (tls, to) = (tls.clone(), to.to_owned());
    Endpoint::from_static("http://sigil-operator")
        .connect_with_connector(tower::service_fn(move |_: http::Uri| {
            let (tls, to) = (tls.clone(), to.clone());
            async move { Ok::<_, std::io::Error>(TokioIo::new(connect_from(&tls, &to, from).await?)) }
        }))
        .await
        .unwrap()
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// A world whose Node API has the operator's default limits (the harness's other tests run
/// without limits).
async fn world(prefix: &str) -> World {
    World::start_with(prefix, defaults()).await
}

fn defaults() -> WorldOptions {
    WorldOptions {
        limits: Some(NodeApiLimits::default()),
        ..Default::default()
    }
}

/// How many connections the Node API's listener refused for `reason`.
fn refused_connections(w: &World, reason: &str) -> u64 {
    w.metrics_text()
        .lines()
        .filter(|l| {
            l.starts_with("sigil_node_api_connections_refused_total")
                && l.contains(&format!("reason=\"{reason}\""))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

/// How many of the denials the operator counted carry `reason`.
fn denials(w: &World, reason: &str) -> u64 {
    w.metrics_text()
        .lines()
        .filter(|l| {
            l.starts_with("sigil_node_api_denials_total")
                && l.contains(&format!("reason=\"{reason}\""))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

/// Whether the peer closed `stream` (EOF or error) within `wait`, reading past whatever
/// it sent first (the server's HTTP/2 SETTINGS).
async fn closed_within<S: tokio::io::AsyncRead + Unpin>(stream: &mut S, wait: Duration) -> bool {
    let mut buf = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
            Err(_) => return false,
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => {}
        }
    }
}

/// One workload that mints a JWT-SVID for a fresh audience on every call, next to a
/// neighbour pod on the same node.
///
/// Attack: the agent mints every call at the operator (the cache is keyed by audience), so
/// the node's shared Node API budget drains and the neighbour's JWT-SVIDs (and the node's
/// X509 rotations) are refused.
///
/// Before the fix (with the operator's production budget of 20/s, burst 200 per node):
/// the attacker minted 338 JWT-SVIDs in 7 s, the node's shared bucket ran dry, and the
/// neighbour's JWT-SVID asked for during the flood was refused: "ResourceExhausted:
/// minting a JWT-SVID: node ... is over its Node API rate limit".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_workload_minting_fresh_audiences_is_stopped_and_its_neighbour_is_served() {
    let _serial = SERIAL.lock().await;
    let aw = AgentWorld::start_with("dosjwt", defaults()).await;
    let tag = aw.w.tag.clone();
    aw.w.cluster_spiffe_id(&format!("{tag}-greedy"), "greedy")
        .await;
    aw.w.cluster_spiffe_id(&format!("{tag}-web"), "web").await;
    let greedy = aw
        .workload("greedy", "intruder", json!({"app": "greedy"}))
        .await;
    let web = aw.workload("web", "web", json!({"app": "web"})).await;
    aw.wait_svid(&aw.id_for_sa("intruder")).await;
    aw.wait_svid(&aw.id_for_sa("web")).await;
    let rs = env!("CARGO_BIN_EXE_rust-spiffe-client");

    // The flood runs on while the neighbour asks for a JWT-SVID of its own.
    let flood = {
        let mut cmd = greedy.container.command(rs);
        cmd.args([
            "--addr",
            &aw.addr,
            "jwt-flood",
            "--count",
            "5000",
            "--prefix",
            "fresh",
        ]);
        tokio::process::Command::from(cmd).output()
    };
    let neighbour = async {
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let go = tool("go-spiffe-client");
        web.run(
            &go,
            &["-addr", &aw.addr, "jwt", "-audience", "during-the-flood"],
        )
        .await
    };
    let (out, neighbour) = tokio::join!(flood, neighbour);
    let flood = json_out("the JWT flood", &out.unwrap());
    eprintln!("attacker: {flood}");
    eprintln!(
        "neighbour's JWT-SVID during the flood: {} {}",
        neighbour.status,
        String::from_utf8_lossy(&neighbour.stderr)
    );
    json_out("the neighbour's JWT-SVID during the flood", &neighbour);
    let go = tool("go-spiffe-client");
    json_out(
        "the neighbour's X509-SVID",
        &web.run(&go, &["-addr", &aw.addr, "x509"]).await,
    );
    let served = flood["ok"].as_u64().unwrap();
    let exhausted = flood["refused"]["ResourceExhausted"].as_u64().unwrap_or(0);
    assert!(exhausted > 0, "the flood was never refused: {flood}");
    assert!(
        served < 100,
        "a single workload minted {served} JWT-SVIDs: {flood}"
    );
    let first = flood["first_refusal"].as_str().unwrap_or_default();
    assert!(
        first.contains("workload"),
        "the refusal names the per-workload budget: {first}"
    );

    let metrics = aw.metrics().await;
    assert!(
        metrics.contains("rpc=\"FetchJWTSVID\",reason=\"workload_rate_limited\""),
        "the refusals are counted:\n{metrics}"
    );
}

/// A compromised agent asks for many signatures in one SignX509Svids call.
///
/// Attack: one call carries up to 1000 CSRs and costs one token of the node's budget;
/// duplicates of one entry ID are allowed, so one authorised entry buys 1000 signatures.
///
/// Before the fix: all 1000 duplicate CSRs were signed in one call (390 ms of CA work for
/// one token of the node's budget).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_compromised_agent_cannot_buy_many_signatures_with_one_call() {
    let _serial = SERIAL.lock().await;
    let w = world("dossign").await;
    let tag = w.tag.clone();
    w.cluster_spiffe_id(&format!("{tag}-web"), "web").await;
    w.pod("web", &w.node_a, "web", json!({"app": "web"})).await;
    let agent = w.attested_agent(&w.node_a).await;
    let web_id =
        sigil_identity::SpiffeId::parse(&format!("spiffe://{}/ns/{}/sa/web", w.td, w.ns)).unwrap();
    let entry =
        trust_domain_common::eventually("the web entry", trust_domain_common::SETTLE, || async {
            w.index
                .node(&w.node_a)
                .entries_with_spiffe_id(&web_id)
                .into_iter()
                .next()
        })
        .await;
    let key =
        sigil_identity::keys::PrivateKey::generate(sigil_identity::keys::KeyType::EcP256).unwrap();
    let csr = sigil_identity::x509::build_csr(&key, &entry.spiffe_id).unwrap();
    let duplicates: Vec<_> = (0..1000)
        .map(|_| pb::SvidRequest {
            entry_id: entry.id.clone(),
            csr: csr.clone(),
        })
        .collect();
    let started = Instant::now();
    let answer = agent.sign(duplicates).await;
    eprintln!(
        "1000 duplicate CSRs: {:?} after {:?}",
        answer
            .as_ref()
            .map(|r| r.iter().filter(|r| r.error_code == 0).count()),
        started.elapsed()
    );
    let status = answer.map(|r| r.len()).unwrap_err();
    let status = status.status().unwrap();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(status.message().contains("duplicate"), "{status:?}");
    assert!(denials(&w, "duplicate_entry") >= 1);
}

/// A compromised agent signs distinct entries of its node past its signing budget.
///
/// Attack: one call of many CSRs cost one token of the node's budget, however many
/// signatures it bought.
///
/// Before the fix: the budget was counted per call (one token for any number of CSRs);
/// this test cannot be built against that code (it sets a signing budget, which did not
/// exist).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signing_is_charged_per_csr() {
    let _serial = SERIAL.lock().await;
    let w = World::start_with(
        "dospercsr",
        WorldOptions {
            limits: Some(NodeApiLimits {
                sign: sigil_operator::node_api::limits::Budget::new(0.001, 3.0),
                ..NodeApiLimits::default()
            }),
            ..Default::default()
        },
    )
    .await;
    let tag = w.tag.clone();
    w.cluster_spiffe_id(&format!("{tag}-web"), "web").await;
    for i in 0..5 {
        w.pod(&format!("web-{i}"), &w.node_a, "web", json!({"app": "web"}))
            .await;
    }
    let agent = w.attested_agent(&w.node_a).await;
    let web_id =
        sigil_identity::SpiffeId::parse(&format!("spiffe://{}/ns/{}/sa/web", w.td, w.ns)).unwrap();
    let entries = trust_domain_common::eventually(
        "five web entries",
        trust_domain_common::SETTLE,
        || async {
            let e = w.index.node(&w.node_a).entries_with_spiffe_id(&web_id);
            (e.len() == 5).then_some(e)
        },
    )
    .await;
    let key =
        sigil_identity::keys::PrivateKey::generate(sigil_identity::keys::KeyType::EcP256).unwrap();
    let csr = sigil_identity::x509::build_csr(&key, &web_id).unwrap();
    let batch = |ids: &[std::sync::Arc<sigil_identity::entry::RegistrationEntry>]| {
        ids.iter()
            .map(|e| pb::SvidRequest {
                entry_id: e.id.clone(),
                csr: csr.clone(),
            })
            .collect::<Vec<_>>()
    };
    let results = agent.sign(batch(&entries)).await.unwrap();
    let signed = results.iter().filter(|r| r.error_code == 0).count();
    let refused: Vec<_> = results
        .iter()
        .filter(|r| r.error_code == Code::ResourceExhausted as i32)
        .collect();
    assert_eq!(signed, 3, "{results:?}");
    assert_eq!(refused.len(), 2, "{results:?}");
    assert!(
        refused[0].error_message.contains("signing budget"),
        "{refused:?}"
    );
    // Nothing left: the whole next call is refused.
    let status = agent.sign(batch(&entries[..1])).await.unwrap_err();
    assert_eq!(
        status.status().unwrap().code(),
        Code::ResourceExhausted,
        "{status:?}"
    );
    assert!(denials(&w, "sign_rate_limited") >= 2);
}

/// One frame of a stalled request body, as its feeder sends it.
type StallFrame = Result<Frame<Bytes>, Infallible>;
type StallBody = StreamBody<tokio_stream::wrappers::ReceiverStream<StallFrame>>;

/// `n` requests on one HTTP/2 connection, each announcing a message of almost 4 MiB,
/// sending all but its last 64 KiB, and never finishing.
struct Stalled {
    answers: Vec<tokio::task::JoinHandle<hyper::Result<http::Response<hyper::body::Incoming>>>>,
    _feeders: Vec<tokio::task::JoinHandle<tokio::sync::mpsc::Sender<StallFrame>>>,
}

impl Stalled {
    async fn start<S>(io: S, rpc: &str, n: usize) -> Stalled
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let (mut send, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
            .handshake::<_, StallBody>(TokioIo::new(io))
            .await
            .unwrap();
        tokio::spawn(conn);
        static ZEROS: [u8; 64 * 1024] = [0; 64 * 1024];
        let declared: u32 = 4 * 1024 * 1024 - 64;
        let mut answers = Vec::new();
        let mut feeders = Vec::new();
        for _ in 0..n {
            let (tx, rx) = tokio::sync::mpsc::channel(2);
            let body = StreamBody::new(tokio_stream::wrappers::ReceiverStream::new(rx));
            let req =
                http::Request::post(format!("http://sigil-operator/sigil.node.v1.Node/{rpc}"))
                    .header("content-type", "application/grpc")
                    .header("te", "trailers")
                    .body(body)
                    .unwrap();
            send.ready().await.unwrap();
            answers.push(tokio::spawn(send.send_request(req)));
            feeders.push(tokio::spawn(async move {
                let mut prefix = vec![0u8];
                prefix.extend_from_slice(&declared.to_be_bytes());
                if tx.send(Ok(Frame::data(Bytes::from(prefix)))).await.is_err() {
                    return tx;
                }
                let mut sent = 0usize;
                while sent + ZEROS.len() < declared as usize - 64 * 1024 {
                    if tx
                        .send(Ok(Frame::data(Bytes::from_static(&ZEROS))))
                        .await
                        .is_err()
                    {
                        break;
                    }
                    sent += ZEROS.len();
                }
                tx // kept: the stream never ends
            }));
        }
        Stalled {
            answers,
            _feeders: feeders,
        }
    }

    /// How many requests were answered ResourceExhausted, and how many not at all.
    async fn answers(self) -> (usize, usize) {
        let (mut refused, mut unanswered) = (0, 0);
        for a in self.answers {
            match tokio::time::timeout(Duration::from_secs(1), a).await {
                Ok(Ok(Ok(resp))) => {
                    let code = resp
                        .headers()
                        .get("grpc-status")
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or("")
                        .to_owned();
                    if code == (Code::ResourceExhausted as i32).to_string() {
                        refused += 1;
                    }
                }
                _ => unanswered += 1,
            }
        }
        (refused, unanswered)
    }
}

/// A compromised agent (it holds a valid agent SVID) starts SignX509Svids calls of almost
/// 4 MiB each, 64 on each of 3 connections, and stalls them.
///
/// Attack: an authenticated caller may send 4 MiB messages, and the operator buffers each
/// until it is whole or the RPC deadline (30 s) passes: 192 stalled calls pin 768 MiB, three
/// times the operator's memory limit.
///
/// Before the fix: none of the 192 calls was refused and the operator's RSS grew from
/// 39.3 to 792.4 MiB (+753 MiB, three times the chart's limit) in 8 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_compromised_agent_cannot_make_the_operator_buffer_hundreds_of_megabytes() {
    let _serial = SERIAL.lock().await;
    let w = world("dosagentmem").await;
    // The agent's own SVID, as a compromised agent holds it: attest with its pod's token.
    let pod = w
        .pod(
            "agent",
            &w.node_a,
            "sigil-agent",
            json!({"app": "sigil-agent"}),
        )
        .await;
    let token = w.token(&pod, &w.audience).await;
    let key =
        sigil_identity::keys::PrivateKey::generate(sigil_identity::keys::KeyType::EcP256).unwrap();
    let csr = sigil_identity::x509::build_csr(&key, &w.td.id("/agent-key").unwrap()).unwrap();
    let anonymous = anonymous_tls(&w).await;
    let from = ip("127.0.0.5");
    let svid =
        pb::node_client::NodeClient::new(channel_from(&anonymous, &w.node_api_addr, from).await)
            .attest_node(pb::AttestNodeRequest {
                attestation: Some(pb::attest_node_request::Attestation::Psat(
                    pb::PsatAttestation {
                        cluster: CLUSTER.into(),
                        token,
                    },
                )),
                csr,
            })
            .await
            .unwrap()
            .into_inner();
    let cert = SwappableCert::new();
    cert.set(&svid.svid_chain, &key).unwrap();
    let mut set = BundleSet::new();
    set.upsert(w.bootstrap_bundle().await);
    let verifier = SpiffeServerVerifier::new(
        SharedBundles::new(set) as Arc<dyn BundleSource>,
        Authorizer::Any,
    );
    let mtls = Arc::new(sigil_identity::tls::client_config(cert, verifier).unwrap());

    let before = rss_mib();
    let mut stalled = Vec::new();
    for _ in 0..3 {
        let io = connect_from(&mtls, &w.node_api_addr, from).await.unwrap();
        stalled.push(Stalled::start(io, "SignX509Svids", 64).await);
    }
    tokio::time::sleep(Duration::from_secs(8)).await;
    let during = rss_mib();
    let (mut refused, mut unanswered) = (0, 0);
    for s in stalled {
        let (r, u) = s.answers().await;
        refused += r;
        unanswered += u;
    }
    eprintln!(
        "192 stalled 4 MiB SignX509Svids calls of an agent: RSS {before:.1} MiB before, {during:.1} MiB during (+{:.1}; chart limit {CHART_MEMORY_LIMIT_MIB} MiB); {refused} refused, {unanswered} unanswered",
        during - before
    );
    assert!(during < CHART_MEMORY_LIMIT_MIB, "RSS {during:.1} MiB");
    assert!(
        during - before < 64.0,
        "the operator buffered {:.1} MiB for one agent",
        during - before
    );
    assert!(refused > 150, "{refused} refused, {unanswered} unanswered");
    assert!(denials(&w, "request_bytes_per_address") > 0);
    // Other agents are served meanwhile.
    let (agent, token) = w.attested_agent_with_token(&w.node_b).await;
    agent.renew(&token).await.unwrap();
}

/// An unauthenticated caller sends AttestNode messages of megabytes.
///
/// Attack: callers without a client certificate may send 4 MiB messages; the operator
/// buffers each whole message before looking at it, so 64 streams on one connection,
/// each sending a message of 4 MiB less a little and then stalling, pin 256 MiB until the
/// RPC deadline: the operator's memory limit.
///
/// Before the fix: the 64 stalled streams were not refused and grew the operator's RSS
/// from 45.7 to 295.4 MiB (+249.7 MiB: past the chart's 256 MiB limit, from one
/// connection without a certificate); the 1 MiB token was read whole and only then
/// refused, as InvalidArgument.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unauthenticated_callers_cannot_make_the_operator_buffer_megabytes() {
    let _serial = SERIAL.lock().await;
    let w = world("dosbig").await;
    let tls = anonymous_tls(&w).await;
    let from = ip("127.0.0.2");

    // 64 stalled streams of almost 4 MiB each on one connection.
    let before = rss_mib();
    let tcp = connect_from(&tls, &w.node_api_addr, from).await.unwrap();
    let stalled = Stalled::start(tcp, "AttestNode", 64).await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    let during = rss_mib();
    let (refused, unanswered) = stalled.answers().await;
    eprintln!(
        "64 stalled 4 MiB AttestNode streams: RSS {before:.1} MiB before, {during:.1} MiB during (+{:.1}; chart limit {CHART_MEMORY_LIMIT_MIB} MiB); {refused} refused, {unanswered} unanswered",
        during - before
    );
    assert_eq!(
        refused, 64,
        "every stalled stream is refused at its header ({unanswered} unanswered)"
    );
    assert!(
        during - before < 32.0,
        "the operator buffered {:.1} MiB for unauthenticated callers",
        during - before
    );
    assert!(during < CHART_MEMORY_LIMIT_MIB, "RSS {during:.1} MiB");
    assert!(denials(&w, "message_too_large") >= 64);

    // One message with a 1 MiB token.
    let mut client =
        pb::node_client::NodeClient::new(channel_from(&tls, &w.node_api_addr, from).await)
            .max_encoding_message_size(8 << 20);
    let status = client
        .attest_node(pb::AttestNodeRequest {
            attestation: Some(pb::attest_node_request::Attestation::Psat(
                pb::PsatAttestation {
                    cluster: CLUSTER.into(),
                    token: "a".repeat(1 << 20),
                },
            )),
            csr: vec![],
        })
        .await
        .unwrap_err();
    eprintln!("1 MiB AttestNode: {status:?}");
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(
        status.message().contains("client certificate"),
        "{status:?}"
    );
    assert!(denials(&w, "message_too_large") >= 65);
}

/// An unauthenticated caller sends AttestNode calls with bogus tokens as fast as it can.
///
/// Attack: every call makes the operator send a TokenReview to the API server before any
/// limit is checked (the per-node budget is charged only after the review, and a bogus
/// token names no node), so one pod turns the operator into a TokenReview amplifier.
///
/// Before the fix: all 60 calls were answered Unauthenticated after a TokenReview each
/// (60 TokenReviews, no ResourceExhausted).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unauthenticated_attestations_are_rate_limited_before_token_review() {
    let _serial = SERIAL.lock().await;
    let w = world("dosreview").await;
    let tls = anonymous_tls(&w).await;
    let mut client = pb::node_client::NodeClient::new(
        channel_from(&tls, &w.node_api_addr, ip("127.0.0.3")).await,
    );
    // A well-formed CSR, so each call gets as far as the operator lets it.
    let key =
        sigil_identity::keys::PrivateKey::generate(sigil_identity::keys::KeyType::EcP256).unwrap();
    let csr = sigil_identity::x509::build_csr(&key, &w.td.id("/attacker").unwrap()).unwrap();
    let mut codes = std::collections::BTreeMap::new();
    for _ in 0..60 {
        let status = client
            .attest_node(pb::AttestNodeRequest {
                attestation: Some(pb::attest_node_request::Attestation::Psat(
                    pb::PsatAttestation {
                        cluster: CLUSTER.into(),
                        token: "eyJhbGciOiJSUzI1NiJ9.e30.bm90LWEtdG9rZW4".into(),
                    },
                )),
                csr: csr.clone(),
            })
            .await
            .unwrap_err();
        *codes.entry(format!("{:?}", status.code())).or_insert(0) += 1;
    }
    let reviews = denials(&w, "token_rejected");
    eprintln!("60 bogus AttestNode calls: {codes:?}; {reviews} reached TokenReview");
    assert!(
        codes.get("ResourceExhausted").copied().unwrap_or(0) > 0,
        "{codes:?}"
    );
    assert!(reviews <= 20, "{reviews} TokenReviews for one caller");
    assert!(denials(&w, "attest_rate_limited") > 0);
    // A real agent on another address still attests and is served.
    let (agent, token) = w.attested_agent_with_token(&w.node_a).await;
    agent.renew(&token).await.unwrap();
}

/// An unauthenticated caller opens hundreds of TLS connections to the Node API and holds
/// them.
///
/// Attack: the listener bounds handshakes in flight but not established connections, so
/// one pod can hold as many as the operator has file descriptors and memory.
///
/// Before the fix: all 300 connections stayed open (RSS +7.1 MiB).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_api_connections_are_capped() {
    let _serial = SERIAL.lock().await;
    let w = world("dosconn").await;
    let tls = anonymous_tls(&w).await;
    let from = ip("127.0.0.4");
    let before = rss_mib();
    let mut held = Vec::new();
    let mut failed = 0;
    for _ in 0..300 {
        match connect_from(&tls, &w.node_api_addr, from).await {
            Ok(s) => held.push(s),
            Err(_) => failed += 1,
        }
    }
    let during = rss_mib();
    let open = futures::future::join_all(
        held.iter_mut()
            .map(|s| closed_within(s, Duration::from_millis(500))),
    )
    .await
    .into_iter()
    .filter(|closed| !closed)
    .count();
    eprintln!(
        "300 connections from one address: {open} held open, {failed} failed; RSS {before:.1} → {during:.1} MiB"
    );
    let cap = NodeApiLimits::default().max_connections_per_address;
    assert!(
        open <= cap,
        "{open} connections held open by one address (cap {cap})"
    );
    assert!(refused_connections(&w, "too_many_connections_from_address") >= (300 - cap) as u64);
    // A real agent still attests and signs.
    let (agent, token) = w.attested_agent_with_token(&w.node_a).await;
    agent.renew(&token).await.unwrap();
}

/// One workload opens hundreds of connections to the Workload API socket and holds them.
///
/// Attack: the agent accepts every connection (and pins its peer, reading /proc) with no
/// cap, so one pod can exhaust the agent's file descriptors and memory for the node.
///
/// Before the fix: all 600 connections stayed open (RSS +8.9 MiB).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workload_api_connections_are_capped_per_workload() {
    let _serial = SERIAL.lock().await;
    let aw = AgentWorld::start_with("dosuds", defaults()).await;
    let tag = aw.w.tag.clone();
    aw.w.cluster_spiffe_id(&format!("{tag}-web"), "web").await;
    let web = aw.workload("web", "web", json!({"app": "web"})).await;
    aw.wait_svid(&aw.id_for_sa("web")).await;
    let before = rss_mib();
    let mut held = Vec::new();
    for _ in 0..600 {
        held.push(tokio::net::UnixStream::connect(&aw.socket).await.unwrap());
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let open = futures::future::join_all(
        held.iter_mut()
            .map(|s| closed_within(s, Duration::from_millis(500))),
    )
    .await
    .into_iter()
    .filter(|closed| !closed)
    .count();
    let during = rss_mib();
    eprintln!(
        "600 connections from one workload: {open} held open; RSS {before:.1} → {during:.1} MiB"
    );
    let cap = sigil_agent::limits::DEFAULT_MAX_CONNECTIONS_PER_WORKLOAD;
    assert!(
        open <= cap,
        "{open} connections held open by one workload (cap {cap})"
    );
    // The neighbour pod is served meanwhile.
    let go = tool("go-spiffe-client");
    json_out(
        "the neighbour's X509-SVID",
        &web.run(&go, &["-addr", &aw.addr, "x509"]).await,
    );
    let metrics = aw.metrics().await;
    assert!(
        metrics.contains("rpc=\"connection\",reason=\"too_many_connections_from_workload\""),
        "{metrics}"
    );
}

/// A workload sends HTTP/2 frames that announce a megabyte each and never finish them.
///
/// Attack: the HPACK shim in front of the Workload API buffers a whole frame (up to
/// 1 MiB) before handing it on, although the server only allows 16 KiB frames, so 100
/// connections pin 100 MiB in the agent.
///
/// Before the fix: all 100 connections stayed open and the agent's RSS grew from 59.3 to
/// 158.7 MiB (+99.4 MiB).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_hpack_shim_refuses_oversized_frames_at_their_header() {
    let _serial = SERIAL.lock().await;
    let aw = AgentWorld::start_with("dosframe", defaults()).await;
    let before = rss_mib();
    let mut held = Vec::new();
    static PAYLOAD: [u8; 1024 * 1024 - 1] = [0x61; 1024 * 1024 - 1];
    let mut refused = 0;
    for _ in 0..100 {
        let mut s = tokio::net::UnixStream::connect(&aw.socket).await.unwrap();
        let mut start = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
        start.extend_from_slice(&[0x10, 0x00, 0x00, 0x00, 0x00, 0, 0, 0, 1]); // DATA, 1 MiB, stream 1
        let sent = async {
            s.write_all(&start).await?;
            s.write_all(&PAYLOAD).await
        };
        match tokio::time::timeout(Duration::from_secs(2), sent).await {
            Ok(Ok(())) => {}
            _ => refused += 1,
        }
        held.push(s);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let during = rss_mib();
    let open = futures::future::join_all(
        held.iter_mut()
            .map(|s| closed_within(s, Duration::from_millis(300))),
    )
    .await
    .into_iter()
    .filter(|closed| !closed)
    .count();
    eprintln!(
        "100 connections each with an unfinished 1 MiB frame: {open} still open, {refused} refused while sending; RSS {before:.1} → {during:.1} MiB (+{:.1}; chart limit {CHART_MEMORY_LIMIT_MIB} MiB)",
        during - before
    );
    assert_eq!(open, 0, "connections with oversized frames are closed");
    assert!(
        during - before < 32.0,
        "the agent buffered {:.1} MiB",
        during - before
    );
    assert!(during < CHART_MEMORY_LIMIT_MIB, "RSS {during:.1} MiB");
    let metrics = aw.metrics().await;
    assert!(metrics.contains("reason=\"http2_refused\""), "{metrics}");
}

/// One workload holds hundreds of FetchX509SVID streams, 32 on each connection.
///
/// Attack: every open stream costs the agent tens of KiB (its HTTP/2 state, its watch of
/// the cache, the response in flight); with no cap on streams, one pod holding thousands
/// of them pushes the agent out of its memory limit for the whole node.
///
/// Before the fix: all 300 streams opened (RSS +2.2 MiB).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workload_api_streams_are_capped_per_workload() {
    let _serial = SERIAL.lock().await;
    let aw = AgentWorld::start_with("dosstreams", defaults()).await;
    let tag = aw.w.tag.clone();
    aw.w.cluster_spiffe_id(&format!("{tag}-greedy"), "greedy")
        .await;
    aw.w.cluster_spiffe_id(&format!("{tag}-web"), "web").await;
    let greedy = aw
        .workload("greedy", "intruder", json!({"app": "greedy"}))
        .await;
    let web = aw.workload("web", "web", json!({"app": "web"})).await;
    aw.wait_svid(&aw.id_for_sa("intruder")).await;
    aw.wait_svid(&aw.id_for_sa("web")).await;
    let before = rss_mib();
    let mut cmd = greedy
        .container
        .command(env!("CARGO_BIN_EXE_rust-spiffe-client"));
    cmd.args([
        "--addr",
        &aw.addr,
        "streams",
        "--count",
        "300",
        "--per-connection",
        "32",
    ])
    .stdin(std::process::Stdio::piped())
    .stdout(std::process::Stdio::piped())
    .stderr(std::process::Stdio::piped());
    let mut child = tokio::process::Command::from(cmd)
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut out = tokio::io::BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    let ready = tokio::time::timeout(
        Duration::from_secs(120),
        tokio::io::AsyncBufReadExt::read_line(&mut out, &mut line),
    )
    .await;
    let during = rss_mib();
    let opened = line.contains("ready");
    // The neighbour is served meanwhile.
    let go = tool("go-spiffe-client");
    json_out(
        "the neighbour's X509-SVID",
        &web.run(&go, &["-addr", &aw.addr, "x509"]).await,
    );
    drop(child.stdin.take());
    let done = tokio::time::timeout(Duration::from_secs(30), child.wait_with_output()).await;
    let stderr = done
        .ok()
        .and_then(|r| r.ok())
        .map(|o| String::from_utf8_lossy(&o.stderr).into_owned())
        .unwrap_or_default();
    eprintln!(
        "300 streams from one workload: opened all: {opened} ({ready:?}); RSS {before:.1} → {during:.1} MiB (+{:.1}); client said: {stderr}",
        during - before
    );
    assert!(!opened, "one workload held 300 streams");
    assert!(
        stderr.contains("ResourceExhausted") || stderr.contains("streams open already"),
        "{stderr}"
    );
    let metrics = aw.metrics().await;
    assert!(
        metrics.contains("rpc=\"FetchX509SVID\",reason=\"too_many_streams_from_workload\""),
        "{metrics}"
    );
}
