//! CA and JWT signing keys in an HSM: the operator's PKCS#11 key manager against SoftHSM2
//! (Debian's softhsm2), on the real apiserver.
//!
//! - A misconfigured or unreachable token stops the operator at start, naming the flag.
//! - The keys are generated in the token, sensitive and never extractable; the CA Secret
//!   holds only their references.
//! - Two real sigil-operator processes share the token: a workload's X509-SVID and an
//!   RS256 JWT-SVID, signed in the token, verify with go-spiffe; the leader is SIGKILLed
//!   and the other process signs with the same keys (no new CA).
//!
//! The test runs itself again in a child process that has `SOFTHSM2_CONF` (SoftHSM reads
//! it when its module initialises), since a test cannot set it for itself safely.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::Duration;

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::object::{Attribute, AttributeType, ObjectClass};
use cryptoki::session::UserType;
use cryptoki::types::AuthPin;
use k8s_openapi::api::core::v1::Secret;
use kube::api::Api;
use serde_json::{Value, json};
use sigil_operator::keys::Keys;
use sigil_operator::keys::pkcs11::Pkcs11Keys;
use sigil_operator::trust_domain::store::ca_secret_name;
use sigil_testkit::agent::{AgentWorld, json_out, tool};
use sigil_testkit::hsm::SoftHsm;
use sigil_testkit::node_api::{World, WorldOptions};
use sigil_testkit::operator_process::{lease_holder, operator_process};
use sigil_testkit::trust_domain::{SETTLE, eventually};

const CLIENT: &str = env!("CARGO_BIN_EXE_rust-spiffe-client");

fn operator_bin() -> std::path::PathBuf {
    sigil_testkit::operator_process::operator_beside(CLIENT)
}

const TEST: &str = "ca_and_jwt_keys_live_in_a_pkcs11_token_that_two_operator_processes_share";

#[test]
fn ca_and_jwt_keys_live_in_a_pkcs11_token_that_two_operator_processes_share() {
    sigil_testkit::hsm::run_with_token("sigil", TEST, scenario);
}

/// Runs the operator binary with `flags` and returns its exit status and output, which
/// must come within 30 s (it must fail at start, before it needs an API server).
async fn operator_start_failure(flags: &[String]) -> String {
    let mut cmd = tokio::process::Command::new(operator_bin());
    cmd.args(["--namespace=hsm", "--kubeconfig=/nonexistent/kubeconfig"])
        .arg("--health-addr=127.0.0.1:0")
        .arg("--log-format=text")
        .args(flags)
        .kill_on_drop(true);
    let out = tokio::time::timeout(Duration::from_secs(30), cmd.output())
        .await
        .expect("the operator exits at start")
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!out.status.success(), "the operator started: {text}");
    text
}

/// A logged-in session on the test's token, as any PKCS#11 client gets one.
fn token_session(hsm: &SoftHsm) -> cryptoki::session::Session {
    let ctx = Pkcs11::new(hsm.module()).unwrap();
    let _ = ctx.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK));
    let slot = ctx
        .get_slots_with_token()
        .unwrap()
        .into_iter()
        .find(|s| ctx.get_token_info(*s).unwrap().label().trim_end() == hsm.label())
        .unwrap();
    let session = ctx.open_ro_session(slot).unwrap();
    let _ = session.login(UserType::User, Some(&AuthPin::from(hsm.pin().to_owned())));
    session
}

/// The private keys with ID `id_hex` in the token.
fn private_keys(
    session: &cryptoki::session::Session,
    id_hex: &str,
) -> Vec<cryptoki::object::ObjectHandle> {
    session
        .find_objects(&[
            Attribute::Class(ObjectClass::PRIVATE_KEY),
            Attribute::Id(hex::decode(id_hex).unwrap()),
        ])
        .unwrap()
}

/// The token's own view of the private key `id_hex`: (sensitive, extractable, always
/// sensitive, never extractable, whether its value could be read).
fn private_key_facts(hsm: &SoftHsm, id_hex: &str) -> (bool, bool, bool, bool, bool) {
    let session = token_session(hsm);
    let found = private_keys(&session, id_hex);
    assert_eq!(found.len(), 1, "one private key {id_hex} in the token");
    let attrs = session
        .get_attributes(
            found[0],
            &[
                AttributeType::Sensitive,
                AttributeType::Extractable,
                AttributeType::AlwaysSensitive,
                AttributeType::NeverExtractable,
            ],
        )
        .unwrap();
    let flag = |want: AttributeType| {
        attrs.iter().any(|a| {
            a.attribute_type() == want
                && matches!(
                    a,
                    Attribute::Sensitive(true)
                        | Attribute::Extractable(true)
                        | Attribute::AlwaysSensitive(true)
                        | Attribute::NeverExtractable(true)
                )
        })
    };
    let value_read = matches!(
        session.get_attributes(found[0], &[AttributeType::Value]),
        Ok(v) if v.iter().any(|a| matches!(a, Attribute::Value(v) if !v.is_empty()))
    );
    (
        flag(AttributeType::Sensitive),
        flag(AttributeType::Extractable),
        flag(AttributeType::AlwaysSensitive),
        flag(AttributeType::NeverExtractable),
        value_read,
    )
}

/// Each JWS algorithm a TrustDomain can choose, signed by a key made in the token, passes
/// Sigil's JWT-SVID validation (ES256 and RS256 are also checked by go-spiffe below).
fn every_jwt_algorithm_signs_in_the_token(keys: &Keys) {
    use sigil_identity::jwt::{JwtKey, SigningAlg, validate_jwt_svid};
    use sigil_identity::keys::KeyType;
    use sigil_identity::{BundleSet, TrustBundle, TrustDomain};
    let td = TrustDomain::new("hsm.example.org").unwrap();
    let id = td.id("/workload").unwrap();
    let now = std::time::SystemTime::now();
    for (key_type, alg) in [
        (KeyType::EcP256, SigningAlg::Es256),
        (KeyType::EcP384, SigningAlg::Es384),
        (KeyType::Rsa2048, SigningAlg::Rs256),
        (KeyType::Rsa2048, SigningAlg::Ps256),
    ] {
        let key = keys.generate(key_type, "sigil-test").unwrap();
        let reference = key.reference().unwrap().clone();
        let jwt = JwtKey::with_new_kid(key, Some(alg), now + Duration::from_secs(600)).unwrap();
        let token = jwt
            .mint(&id, &["db".to_owned()], Duration::from_secs(60), now, None)
            .unwrap();
        let mut bundle = TrustBundle::new(td.clone());
        bundle.jwt_authorities.push(jwt.authority());
        let mut bundles = BundleSet::new();
        bundles.insert(bundle).unwrap();
        let valid = validate_jwt_svid(&token, &bundles, "db", now)
            .unwrap_or_else(|e| panic!("{alg:?} signed in the token: {e}"));
        assert_eq!(valid.spiffe_id, id, "{alg:?}");
        keys.destroy(&reference).unwrap();
    }
}

/// The CA Secret's state document.
async fn state_document(w: &World) -> (Value, String) {
    let secret = Api::<Secret>::namespaced(w.client.clone(), &w.ns)
        .get(&ca_secret_name(&w.td_object))
        .await
        .unwrap();
    let raw = &secret.data.unwrap()["authorities.json"].0;
    (
        serde_json::from_slice(raw).unwrap(),
        String::from_utf8_lossy(raw).into_owned(),
    )
}

async fn scenario(hsm: SoftHsm) {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();

    // 1. Misconfigured or unreachable: the operator does not start, and says why.
    let good = hsm.operator_flags();
    let with = |i: usize, v: String| {
        let mut f = good.clone();
        f[i] = v;
        f
    };
    let text =
        operator_start_failure(&with(1, "--pkcs11-module=/nonexistent/libpkcs11.so".into())).await;
    assert!(
        text.contains("--pkcs11-module") && text.contains("/nonexistent/libpkcs11.so"),
        "{text}"
    );
    let text = operator_start_failure(&with(2, "--pkcs11-token-label=nope".into())).await;
    assert!(
        text.contains("no token labelled \"nope\"")
            && text.contains("--pkcs11-token-label")
            && text.contains("\"sigil\""),
        "names the label, the flag and the tokens there are: {text}"
    );
    let wrong = hsm.pin_file("wrong-pin", "00000000");
    let text =
        operator_start_failure(&with(3, format!("--pkcs11-pin-file={}", wrong.display()))).await;
    assert!(
        text.contains("PinIncorrect") && text.contains("--pkcs11-pin-file"),
        "{text}"
    );
    assert!(
        !text.contains(hsm.pin()) && !text.contains("00000000"),
        "no PIN in the output: {text}"
    );

    // 2. The operator (in this process) makes its CA and JWT keys in the token.
    let keys = Keys::new(Arc::new(
        Pkcs11Keys::open(hsm.module(), hsm.label(), hsm.pin().to_owned()).unwrap(),
    ));
    every_jwt_algorithm_signs_in_the_token(&keys);
    let w = World::start_with(
        "hsm",
        WorldOptions {
            keys,
            trust_domain_spec: json!({"jwt": {"algorithm": "RS256"}}),
            ca_ttl: Some("1m".into()),
            ..Default::default()
        },
    )
    .await;
    let (doc, raw) = state_document(&w).await;
    assert!(
        !raw.contains("PRIVATE KEY"),
        "no key in the CA Secret: {raw}"
    );
    let mut refs = Vec::new();
    for ring in ["x509", "jwt"] {
        let active = &doc[ring]["active"];
        assert_eq!(active["keyRef"]["manager"], "pkcs11", "{ring}: {active}");
        assert!(active.get("privateKey").is_none(), "{ring}: {active}");
        refs.push(active["keyRef"]["id"].as_str().unwrap().to_owned());
    }
    for id in &refs {
        assert_eq!(
            private_key_facts(&hsm, id),
            (true, false, true, true, false),
            "key {id}: sensitive, not extractable, always sensitive, never extractable, unreadable"
        );
    }
    let ca_serial = w
        .replica
        .authorities
        .get(&w.td)
        .unwrap()
        .x509_ca
        .serial()
        .to_owned();

    // 3. Two sigil-operator processes take over, sharing the token.
    w.kill_replica().await;
    let dir = tempfile::tempdir().unwrap();
    let lease = format!("sigil-hsm-{}", w.tag);
    let bin = operator_bin();
    let mut operators = [
        operator_process(&w, &bin, "sigil-operator-0", &lease, dir.path(), &good).await,
        operator_process(&w, &bin, "sigil-operator-1", &lease, dir.path(), &good).await,
    ];
    let (client, ns) = (w.client.clone(), w.ns.clone());
    let leader = eventually("a leader among the processes", SETTLE, || async {
        lease_holder(&client, &ns, &lease).await
    })
    .await;
    let addresses = operators.iter().map(|o| o.node_api_addr.clone()).collect();
    let aw = AgentWorld::start_with_operators(w, addresses).await;
    aw.w.cluster_spiffe_id_with(&format!("{}-hsm", aw.w.tag), "hsm", json!({}))
        .await;

    let go = tool("go-spiffe-client");
    let addr = aw.addr.clone();
    // A new service account each time: a new SPIFFE ID, so a new SVID is signed.
    let check = |name: &'static str, sa: &'static str| {
        let (aw, go, addr) = (&aw, go.clone(), addr.clone());
        async move {
            let workload = aw.workload(name, sa, json!({"app": "hsm"})).await;
            let id = aw.id_for_sa(sa);
            aw.wait_svid(&id).await;
            // go-spiffe verifies the X509-SVID's chain against the bundle and an RS256
            // JWT-SVID against the JWT bundle: both signed in the token.
            let verified = json_out(
                "go-spiffe verify",
                &workload
                    .run(&go, &["-addr", &addr, "verify", "-audience", "db"])
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
                &workload
                    .run(&go, &["-addr", &addr, "jwt", "-audience", "db"])
                    .await,
            );
            let header = jsonwebtoken::decode_header(j["token"].as_str().unwrap()).unwrap();
            assert_eq!(header.alg, jsonwebtoken::Algorithm::RS256);
        }
    };
    check("hsm-1", "web").await;

    // 4. The leader dies; the other process leads and signs with the same keys.
    let killed = operators.iter_mut().find(|o| o.name == leader).unwrap();
    killed.process.stop();
    let survivor = if leader == "sigil-operator-0" {
        "sigil-operator-1"
    } else {
        "sigil-operator-0"
    };
    let (client, ns) = (aw.w.client.clone(), aw.w.ns.clone());
    eventually("the other process leads", SETTLE, || async {
        (lease_holder(&client, &ns, &lease).await.as_deref() == Some(survivor)).then_some(())
    })
    .await;
    check("hsm-2", "api").await;
    let (doc, raw) = state_document(&aw.w).await;
    assert!(!raw.contains("PRIVATE KEY"));
    assert_eq!(
        doc["x509"]["active"]["keyRef"]["id"], refs[0],
        "the same CA key after the failover"
    );
    let pem = doc["x509"]["active"]["certificate"].as_str().unwrap();
    let der = sigil_identity::x509::certs_from_pem(pem).unwrap().remove(0);
    let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
    assert_eq!(
        cert.raw_serial_as_string().replace(':', ""),
        ca_serial,
        "no new CA"
    );

    // 5. Rotation (spec.ca.ttl 1m: the next CA and JWT key are prepared at 30 s and
    // activate 20 s later): the surviving process makes the new keys in the token, and
    // destroys the old ones when their generation expires (at 60 s) and leaves the state.
    let rotated = eventually(
        "the CA and the JWT key rotated",
        Duration::from_secs(120),
        || async {
            let (doc, _) = state_document(&aw.w).await;
            let now: Vec<String> = ["x509", "jwt"]
                .iter()
                .map(|r| {
                    doc[*r]["active"]["keyRef"]["id"]
                        .as_str()
                        .unwrap_or_default()
                        .to_owned()
                })
                .collect();
            (now[0] != refs[0] && now[1] != refs[1] && !now[0].is_empty() && !now[1].is_empty())
                .then_some(now)
        },
    )
    .await;
    for id in &rotated {
        assert_eq!(
            private_key_facts(&hsm, id),
            (true, false, true, true, false),
            "rotated key {id}"
        );
    }
    eventually("the old keys destroyed in the token", SETTLE, || async {
        let session = token_session(&hsm);
        refs.iter()
            .all(|id| private_keys(&session, id).is_empty())
            .then_some(())
    })
    .await;
    check("hsm-3", "db").await;
}
