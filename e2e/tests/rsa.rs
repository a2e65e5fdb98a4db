//! RSA end to end, against the real apiserver: a TrustDomain with an RSA-3072 CA and RS256
//! JWT-SVIDs, a ClusterSPIFFEID with RSA-2048 workload keys, a workload (a real process in
//! a pod-shaped cgroup) using go-spiffe, a relying party that knows only the OIDC
//! discovery document and its JWKS, as Azure Entra workload identity federation does, and
//! sigil-csi's files mode writing the same identity for software that reads files.
#![allow(clippy::unwrap_used)]

use sigil_testkit::agent as agent_common;
use sigil_testkit::csi as csi_common;

use agent_common::*;
use csi_common::*;
use serde_json::{Value, json};
use sha2::Digest;
use sigil_identity::keys::{KeyType, PrivateKey};
use sigil_identity::proto::csi as pb;
use sigil_testkit::node_api::WorldOptions;
use tokio_util::sync::CancellationToken;
use x509_parser::prelude::*;

/// The modulus size of a certificate's RSA key (panics on another key type).
fn rsa_bits(der: &[u8]) -> usize {
    let (_, cert) = X509Certificate::from_der(der).unwrap();
    match cert.public_key().parsed().unwrap() {
        x509_parser::public_key::PublicKey::RSA(k) => k.key_size(),
        other => panic!("not an RSA key: {other:?}"),
    }
}

/// `sha256WithRSAEncryption`: what an RSA CA signs with.
const SHA256_WITH_RSA: &str = "1.2.840.113549.1.1.11";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_rsa_trust_domain_issues_rsa_svids_and_rs256_jwts_that_others_verify() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    let issuer = "https://oidc.rsa.example.org/sigil";
    let aw = AgentWorld::start_with(
        "rsa",
        WorldOptions {
            trust_domain_spec: json!({
                "ca": {"keyType": "RSA-3072"},
                "jwt": {"algorithm": "RS256", "issuer": issuer},
            }),
            ..Default::default()
        },
    )
    .await;
    aw.w.cluster_spiffe_id_with(
        &format!("{}-jvm", aw.w.tag),
        "jvm",
        json!({"workloadKeyType": "RSA-2048"}),
    )
    .await;
    let jvm = aw.workload("jvm-1", "web", json!({"app": "jvm"})).await;
    let id = aw.id_for_sa("web");
    aw.wait_svid(&id).await;

    // What the operator and the agent made: an RSA-3072 CA, an RSA-2048 workload key.
    let authority = aw.w.replica.authorities.get(&aw.w.td).unwrap();
    assert_eq!(authority.x509_ca.key_type(), KeyType::Rsa3072);
    assert_eq!(rsa_bits(authority.x509_ca.certificate()), 3072);
    let entry = aw
        .agent
        .cache
        .entries()
        .into_iter()
        .find(|e| e.spiffe_id.to_string() == id)
        .unwrap();
    assert_eq!(entry.key_type, KeyType::Rsa2048);
    let held = aw.agent.cache.svid(&entry.id).unwrap();
    assert_eq!(held.key.key_type(), KeyType::Rsa2048);
    assert_eq!(rsa_bits(&held.chain[0]), 2048);
    let (_, leaf) = X509Certificate::from_der(&held.chain[0]).unwrap();
    assert_eq!(
        leaf.signature_algorithm.algorithm.to_id_string(),
        SHA256_WITH_RSA
    );
    let leaf_sha = hex::encode(sha2::Sha256::digest(&held.chain[0]));

    // go-spiffe, in the workload's cgroup: it gets that SVID (and go-spiffe checks the
    // private key it was sent matches it), verifies the chain against the X.509 bundle
    // with its own validator, and verifies an RS256 JWT-SVID against the JWT bundle.
    let go = tool("go-spiffe-client");
    let addr = aw.addr.as_str();
    let x = json_out(
        "go-spiffe x509",
        &jvm.run(&go, &["-addr", addr, "x509"]).await,
    );
    assert_eq!(x["svids"][0]["spiffe_id"], id.as_str());
    assert_eq!(x["svids"][0]["leaf_sha256"], leaf_sha.as_str(), "{x}");
    let verified = json_out(
        "go-spiffe verify",
        &jvm.run(&go, &["-addr", addr, "verify", "-audience", "db"])
            .await,
    );
    assert_eq!(
        verified["x509_verified"],
        json!([id.as_str()]),
        "{verified}"
    );
    assert_eq!(verified["jwt_verified"], id.as_str(), "{verified}");

    // A JWT-SVID for Azure's audience, fetched by go-spiffe.
    let audience = "api://AzureADTokenExchange";
    let j = json_out(
        "go-spiffe jwt",
        &jvm.run(&go, &["-addr", addr, "jwt", "-audience", audience])
            .await,
    );
    let token = j["token"].as_str().unwrap().to_owned();
    let header = jsonwebtoken::decode_header(&token).unwrap();
    assert_eq!(header.alg, jsonwebtoken::Algorithm::RS256);
    let kid = header.kid.unwrap();
    // The agent's ValidateJWTSVID accepts it, asked by go-spiffe and by the Rust spiffe
    // crate.
    let v = json_out(
        "go-spiffe validate",
        &jvm.run(
            &go,
            &[
                "-addr",
                addr,
                "validate",
                "-audience",
                audience,
                "-token",
                &token,
            ],
        )
        .await,
    );
    assert_eq!(v["spiffe_id"], id.as_str(), "{v}");
    let rs = env!("CARGO_BIN_EXE_rust-spiffe-client");
    let v = json_out(
        "rust validate",
        &jvm.run(
            rs,
            &[
                "--addr",
                addr,
                "validate",
                "--audience",
                audience,
                "--token",
                &token,
            ],
        )
        .await,
    );
    assert_eq!(v["spiffe_id"], id.as_str(), "{v}");

    // The relying party's view: OIDC discovery and JWKS over plain HTTP (as behind an
    // ingress), and nothing else.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let oidc = listener.local_addr().unwrap();
    let cancel = CancellationToken::new();
    let _stop = cancel.clone().drop_guard();
    tokio::spawn(sigil_operator::federation::endpoint::serve_oidc_http(
        listener,
        aw.w.td.clone(),
        aw.w.replica.authorities.clone(),
        aw.w.replica.metrics.federation.clone(),
        cancel,
    ));
    let get = |path: &'static str| async move {
        let body = sigil_e2e::http::get_ok(oidc, path)
            .await
            .unwrap_or_else(|| panic!("GET {path} answered 200"));
        serde_json::from_str::<Value>(&body).unwrap()
    };
    let config = get("/sigil/.well-known/openid-configuration").await;
    assert_eq!(config["issuer"], issuer);
    assert_eq!(
        config["id_token_signing_alg_values_supported"],
        json!(["RS256"]),
        "{config}"
    );
    let keys = get("/sigil/keys").await;
    let jwk = keys["keys"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["kid"] == kid.as_str())
        .unwrap_or_else(|| panic!("no key {kid} in {keys}"))
        .clone();
    assert_eq!(jwk["kty"], "RSA", "{jwk}");
    assert_eq!(jwk["alg"], "RS256", "{jwk}");
    assert_eq!(jwk["use"], "sig", "{jwk}");
    assert!(jwk["crv"].is_null() && jwk["x"].is_null(), "{jwk}");
    let key = jsonwebtoken::DecodingKey::from_rsa_components(
        jwk["n"].as_str().unwrap(),
        jwk["e"].as_str().unwrap(),
    )
    .unwrap();
    let mut validation = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::RS256);
    validation.set_audience(&[audience]);
    validation.set_issuer(&[issuer]);
    let claims = jsonwebtoken::decode::<Value>(&token, &key, &validation)
        .unwrap_or_else(|e| panic!("the JWT-SVID does not validate against /keys: {e}"))
        .claims;
    assert_eq!(claims["sub"], id.as_str());
    // The signature is what makes it pass: the same claims under another RSA key fail.
    let other = PrivateKey::generate(KeyType::Rsa2048).unwrap();
    let forged = jsonwebtoken::encode(
        &header_for(&kid),
        &claims,
        &jsonwebtoken::EncodingKey::from_rsa_der(&pkcs1_der(&other)),
    )
    .unwrap();
    assert!(jsonwebtoken::decode::<Value>(&forged, &key, &validation).is_err());

    // sigil-csi files mode, from the agent's Broker API: the same RSA identity as files,
    // the key as PKCS#8, and a JWT-SVID file that validates RS256 against bundle.spiffe.
    let csi = Csi::start(csi_args(&aw)).await;
    let mut client = csi.client().await;
    let target = aw.dir.path().join("pods").join("jvm-1").join("identity");
    let pod_token = aw.w.token(&jvm.pod, "sigil-csi").await;
    client
        .node_publish_volume(publish_request(
            "vol-jvm",
            &target,
            &jvm.pod,
            Some(&pod_token),
            true,
            &[("mode", "files"), ("jwtAudiences", audience)],
        ))
        .await
        .unwrap();
    let (cert, key_pem) = read_pair(&target);
    let (files_id, files_leaf) = check_files(&target, &cert, &key_pem);
    assert_eq!(files_id, id);
    assert_eq!(rsa_bits(&files_leaf), 2048);
    let file_key = PrivateKey::from_pem(std::str::from_utf8(&key_pem).unwrap()).unwrap();
    assert_eq!(file_key.key_type(), KeyType::Rsa2048);
    assert!(String::from_utf8_lossy(&key_pem).starts_with("-----BEGIN PRIVATE KEY-----"));
    let jwks = std::fs::read(target.join("bundle.spiffe")).unwrap();
    let mut set = sigil_identity::BundleSet::new();
    set.insert(sigil_identity::TrustBundle::from_jwks_json(aw.w.td.clone(), &jwks).unwrap())
        .unwrap();
    let file_jwt =
        std::fs::read_to_string(target.join("jwt/api___AzureADTokenExchange.token")).unwrap();
    assert_eq!(
        jsonwebtoken::decode_header(&file_jwt).unwrap().alg,
        jsonwebtoken::Algorithm::RS256
    );
    let v = sigil_identity::jwt::validate_jwt_svid(
        &file_jwt,
        &set,
        audience,
        std::time::SystemTime::now(),
    )
    .unwrap();
    assert_eq!(v.spiffe_id.to_string(), id);
    client
        .node_unpublish_volume(pb::NodeUnpublishVolumeRequest {
            volume_id: "vol-jvm".into(),
            target_path: target.display().to_string(),
        })
        .await
        .unwrap();
    assert!(!target.exists());
    csi.stop().await;
}

fn header_for(kid: &str) -> jsonwebtoken::Header {
    let mut h = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::RS256);
    h.kid = Some(kid.to_owned());
    h
}

/// The PKCS#1 RSAPrivateKey inside a PKCS#8 key (jsonwebtoken signs with PKCS#1 DER).
fn pkcs1_der(key: &PrivateKey) -> Vec<u8> {
    let der = key.to_pkcs8_der();
    let (_, info) = x509_parser::der_parser::der::parse_der(&der).unwrap();
    // PrivateKeyInfo ::= SEQUENCE { version, algorithm, privateKey OCTET STRING, ... }
    info.as_sequence().unwrap()[2].as_slice().unwrap().to_vec()
}
