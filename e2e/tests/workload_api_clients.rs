//! Workload API clients written by others, run as real processes inside a pod-shaped
//! cgroup, against sigil-agent: go-spiffe v2 (our tiny fixture), py-spiffe (PyPI
//! `spiffe`), the Rust `spiffe` crate (X509Source, JwtSource, WorkloadApiClient) and
//! SPIRE's own `spire-agent api`. Each gets the pod's X509-SVID, a JWT-SVID, validates
//! one, and reads the bundles.
#![allow(clippy::unwrap_used)]

use sigil_testkit::agent as agent_common;

use agent_common::*;
use serde_json::json;
use sha2::Digest;

#[tokio::test]
async fn go_py_rust_and_spire_clients_get_the_pods_identity() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    let aw = AgentWorld::start("clients").await;
    aw.w.cluster_spiffe_id(&format!("{}-web", aw.w.tag), "web")
        .await;
    let web = aw.workload("web-1", "web", json!({"app": "web"})).await;
    let id = aw.id_for_sa("web");
    let td_id = format!("spiffe://{}", aw.w.td);
    aw.wait_svid(&id).await;
    let entry = aw
        .agent
        .cache
        .entries()
        .into_iter()
        .find(|e| e.spiffe_id.to_string() == id)
        .unwrap();
    let held = aw.agent.cache.svid(&entry.id).unwrap();
    let leaf_sha = hex::encode(sha2::Sha256::digest(&held.chain[0]));
    let addr = aw.addr.as_str();

    // go-spiffe
    let go = tool("go-spiffe-client");
    let x = json_out(
        "go-spiffe x509",
        &web.run(&go, &["-addr", addr, "x509"]).await,
    );
    assert_eq!(x["svids"][0]["spiffe_id"], id.as_str());
    assert_eq!(
        x["svids"][0]["leaf_sha256"],
        leaf_sha.as_str(),
        "go-spiffe got the SVID the agent holds"
    );
    assert!(
        x["bundles"][aw.w.td.to_string()].as_u64().unwrap() >= 1,
        "{x}"
    );
    // go-spiffe's own validators (not the agent's ValidateJWTSVID) accept what was served:
    // every X509-SVID against the X.509 bundles, a JWT-SVID against the JWT bundles.
    let verified = json_out(
        "go-spiffe verify",
        &web.run(&go, &["-addr", addr, "verify", "-audience", "db"])
            .await,
    );
    assert_eq!(
        verified["x509_verified"],
        json!([id.as_str()]),
        "{verified}"
    );
    assert_eq!(verified["jwt_verified"], id.as_str(), "{verified}");
    let j = json_out(
        "go-spiffe jwt",
        &web.run(&go, &["-addr", addr, "jwt", "-audience", "db"])
            .await,
    );
    assert_eq!(j["spiffe_id"], id.as_str());
    let token = j["token"].as_str().unwrap().to_owned();
    let v = json_out(
        "go-spiffe validate",
        &web.run(
            &go,
            &[
                "-addr",
                addr,
                "validate",
                "-audience",
                "db",
                "-token",
                &token,
            ],
        )
        .await,
    );
    assert_eq!(v["spiffe_id"], id.as_str());
    let b = json_out(
        "go-spiffe bundles",
        &web.run(&go, &["-addr", addr, "bundles"]).await,
    );
    assert!(b["x509"][aw.w.td.to_string()].as_u64().unwrap() >= 1, "{b}");
    assert!(b["jwt"][aw.w.td.to_string()].as_u64().unwrap() >= 1, "{b}");

    // SPIFFE_ENDPOINT_SOCKET instead of a flag, as workloads are normally configured.
    let mut cmd = web.container.command(&go);
    cmd.arg("x509").env("SPIFFE_ENDPOINT_SOCKET", addr);
    let from_env = json_out(
        "go-spiffe x509 via SPIFFE_ENDPOINT_SOCKET",
        &tokio::process::Command::from(cmd).output().await.unwrap(),
    );
    assert_eq!(from_env["svids"][0]["spiffe_id"], id.as_str());

    // py-spiffe
    let py = tool("py-spiffe-client");
    let x = json_out(
        "py-spiffe x509",
        &web.run(&py, &["--socket", addr, "x509"]).await,
    );
    assert_eq!(x["spiffe_id"], id.as_str());
    assert_eq!(x["leaf_sha256"], leaf_sha.as_str());
    let j = json_out(
        "py-spiffe jwt",
        &web.run(&py, &["--socket", addr, "jwt", "--audience", "cache"])
            .await,
    );
    assert_eq!(j["spiffe_id"], id.as_str());
    let v = json_out(
        "py-spiffe validate",
        &web.run(
            &py,
            &[
                "--socket",
                addr,
                "validate",
                "--audience",
                "db",
                "--token",
                &token,
            ],
        )
        .await,
    );
    assert_eq!(v["spiffe_id"], id.as_str());
    let b = json_out(
        "py-spiffe bundles",
        &web.run(&py, &["--socket", addr, "bundles"]).await,
    );
    assert!(b["x509"][aw.w.td.to_string()].as_u64().unwrap() >= 1, "{b}");

    // The Rust spiffe crate.
    let rs = env!("CARGO_BIN_EXE_rust-spiffe-client");
    let x = json_out("rust x509", &web.run(rs, &["--addr", addr, "x509"]).await);
    assert_eq!(x["spiffe_id"], id.as_str());
    assert_eq!(x["leaf_sha256"], leaf_sha.as_str());
    let j = json_out(
        "rust jwt",
        &web.run(rs, &["--addr", addr, "jwt", "--audience", "queue"])
            .await,
    );
    assert_eq!(j["spiffe_id"], id.as_str());
    let v = json_out(
        "rust validate",
        &web.run(
            rs,
            &[
                "--addr",
                addr,
                "validate",
                "--audience",
                "db",
                "--token",
                &token,
            ],
        )
        .await,
    );
    assert_eq!(v["spiffe_id"], id.as_str());

    // SPIRE's own CLI.
    let spire = tool("spire-agent");
    let socket = aw.socket.display().to_string();
    let out_dir = tempfile::tempdir().unwrap();
    let out = web
        .run(
            &spire,
            &[
                "api",
                "fetch",
                "x509",
                "-socketPath",
                &socket,
                "-write",
                &out_dir.path().display().to_string(),
            ],
        )
        .await;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "spire-agent api fetch x509: {}{text}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains(&format!("SPIFFE ID:\t\t{id}")) || text.contains(&id),
        "{text}"
    );
    let pem = std::fs::read_to_string(out_dir.path().join("svid.0.pem")).unwrap();
    let written = sigil_identity::x509::certs_from_pem(&pem).unwrap();
    assert_eq!(
        hex::encode(sha2::Sha256::digest(&written[0])),
        leaf_sha,
        "spire-agent wrote the SVID the agent holds"
    );
    assert!(
        out_dir.path().join("svid.0.key").exists() && out_dir.path().join("bundle.0.pem").exists()
    );
    let out = web
        .run(
            &spire,
            &[
                "api",
                "fetch",
                "jwt",
                "-audience",
                "spire",
                "-socketPath",
                &socket,
            ],
        )
        .await;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "spire-agent api fetch jwt: {}{text}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains(&format!("token({id})")), "{text}");
    assert!(text.contains(&format!("bundle({td_id})")), "{text}");
    let out = web
        .run(
            &spire,
            &[
                "api",
                "validate",
                "jwt",
                "-audience",
                "db",
                "-svid",
                &token,
                "-socketPath",
                &socket,
            ],
        )
        .await;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "spire-agent api validate jwt: {}{text}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("SVID is valid") && text.contains(&id),
        "{text}"
    );
}
