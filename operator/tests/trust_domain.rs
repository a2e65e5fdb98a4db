//! TrustDomain behaviour against the real apiserver of the e2e harness: CA issuance and
//! persistence, bundle distribution, a full rotation cycle under a manual clock, an
//! upstream intermediate CA, and leader handover.
#![allow(clippy::unwrap_used)]

use sigil_testkit::trust_domain as trust_domain_common;

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use k8s_openapi::api::core::v1::Namespace;
use kube::api::{Api, PostParams};
use kube::{Client, ResourceExt};
use sigil_identity::ca::{IssuedSvid, SvidTemplate};
use sigil_identity::clock::{Clock, ManualClock};
use sigil_identity::keys::{KeyType, PrivateKey};
use sigil_identity::x509::{cert_summary, validate_x509_svid};
use sigil_identity::{BundleSet, SpiffeId, TrustBundle, TrustDomain as TdName};
use sigil_operator::authority::DomainAuthority;
use sigil_operator::crd::trust_domain::{COMPONENT_LABEL, OWNER_LABEL, TrustDomain};
use sigil_operator::trust_domain::publisher::SEQUENCE_ANNOTATION;
use trust_domain_common::*;

async fn create_namespace(client: &Client, name: &str, labels: &[(&str, &str)]) {
    let ns: Namespace = serde_json::from_value(serde_json::json!({
        "metadata": {"name": name, "labels": labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect::<std::collections::BTreeMap<_, _>>()}
    }))
    .unwrap();
    Api::<Namespace>::all(client.clone())
        .create(&PostParams::default(), &ns)
        .await
        .unwrap();
}

/// Waits until this replica's authority for `td` has `serial` and bundle `sequence`.
async fn wait_authority(
    r: &Replica,
    td: &str,
    serial: &str,
    sequence: i64,
) -> Arc<DomainAuthority> {
    let td = TdName::new(td).unwrap();
    eventually(
        &format!("{} to load CA {serial} / sequence {sequence}", r.identity),
        SETTLE,
        || async {
            r.authorities.get(&td).filter(|a| {
                a.x509_ca.serial() == serial && a.bundle.sequence == Some(sequence as u64)
            })
        },
    )
    .await
}

fn svid(a: &DomainAuthority, key: &PrivateKey, now: SystemTime) -> IssuedSvid {
    let id = SpiffeId::parse(&format!("spiffe://{}/ns/default/sa/web", a.trust_domain)).unwrap();
    a.x509_ca
        .sign_public_key(
            &key.public_key_der(),
            &SvidTemplate {
                spiffe_id: &id,
                ttl: a.x509_svid_ttl,
                dns_names: &[],
            },
            now,
        )
        .unwrap()
}

#[tokio::test]
async fn applying_a_trust_domain_issues_a_ca_and_publishes_bundles_to_selected_namespaces_only() {
    let client = client().await;
    let ns = namespace("td-apply").await;
    let instance = unique("apply");
    let selected = unique("sel");
    let (a, b, c) = (unique("ns-a"), unique("ns-b"), unique("ns-c"));
    create_namespace(&client, &a, &[("sigil-bundle", &selected)]).await;
    create_namespace(&client, &b, &[]).await;
    create_namespace(&client, &c, &[("sigil-bundle", "someone-else")]).await;

    let started = Instant::now();
    let replica = Replica::start(client.clone(), ReplicaConfig::new(&ns, &instance));
    let name = unique("td");
    create_trust_domain(
        &client,
        &trust_domain(
            &name,
            &instance,
            serde_json::json!({
                "trustDomain": "apply.example.org",
                "bundle": {"namespaceSelector": {"matchLabels": {"sigil-bundle": selected}}},
            }),
        ),
    )
    .await;

    let td = wait_condition(&client, &name, "Ready", "True", "BundlePublished").await;
    println!("Ready after {:?}", started.elapsed());
    assert_eq!(condition(&td, "Issuing").unwrap().0, "True");
    let status = td.status.clone().unwrap();
    let serial = status.active_ca.clone().unwrap().serial;
    assert_eq!(status.bundle_sequence, Some(1));
    assert!(status.active_jwt_key_id.is_some());

    // The CA Secret: in the operator's namespace, labelled, owned by the TrustDomain.
    let secret = ca_secret(&client, &ns, &name).await.expect("CA Secret");
    assert_eq!(secret.labels().get(OWNER_LABEL), Some(&name));
    assert_eq!(
        secret.labels().get(COMPONENT_LABEL).map(String::as_str),
        Some("ca")
    );
    let owner = &secret.owner_references()[0];
    assert_eq!(
        (owner.kind.as_str(), owner.uid.as_str()),
        ("TrustDomain", td.uid().unwrap().as_str())
    );
    assert_eq!(
        status.ca_secret,
        Some(format!("{ns}/{}", secret.name_any()))
    );

    // The bundle ConfigMap: in the selected namespace only.
    let cm = eventually("bundle ConfigMap in the selected namespace", SETTLE, || {
        bundle_config_map(&client, &a, "sigil-trust-bundle")
    })
    .await;
    assert!(
        bundle_config_map(&client, &b, "sigil-trust-bundle")
            .await
            .is_none()
    );
    assert!(
        bundle_config_map(&client, &c, "sigil-trust-bundle")
            .await
            .is_none()
    );
    let (pem, spiffe) = decode_bundle(&cm, "apply.example.org");
    assert_eq!(pem.x509_authorities.len(), 1);
    assert_eq!(cert_summary(&pem.x509_authorities[0]).unwrap().0, serial);
    assert_eq!(spiffe.sequence, Some(1));
    assert_eq!(spiffe.refresh_hint, Some(Duration::from_secs(300)));
    assert_eq!(
        spiffe.jwt_authorities[0].kid,
        status.active_jwt_key_id.clone().unwrap()
    );

    // Every replica can sign, and what it signs verifies against the published bundle.
    let authority = wait_authority(&replica, "apply.example.org", &serial, 1).await;
    let key = PrivateKey::generate(KeyType::EcP256).unwrap();
    let now = SystemTime::now();
    validate_x509_svid(&svid(&authority, &key, now).chain(), &pem, now).unwrap();
    let token = authority
        .jwt_key
        .mint(
            &SpiffeId::parse("spiffe://apply.example.org/w").unwrap(),
            &["aud".into()],
            authority.jwt_svid_ttl,
            now,
            None,
        )
        .unwrap();
    let mut set = BundleSet::new();
    set.insert(spiffe.clone()).unwrap();
    sigil_identity::jwt::validate_jwt_svid(&token, &set, "aud", now).unwrap();

    // The replica is ready (its caches synced) and exports the CA's expiry and sequence.
    eventually("replica ready", SETTLE, || async {
        replica.readiness.is_ready().then_some(())
    })
    .await;
    let mut registry = prometheus_client::registry::Registry::default();
    replica.metrics.register(&mut registry);
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
    let expiry = cert_summary(&pem.x509_authorities[0])
        .unwrap()
        .2
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    for needle in [
        format!("sigil_ca_expiry_timestamp_seconds{{trust_domain=\"apply.example.org\",role=\"active\"}} {expiry}"),
        "sigil_bundle_sequence{trust_domain=\"apply.example.org\"} 1".to_owned(),
        "sigil_ca_rotations_total{trust_domain=\"apply.example.org\",kind=\"x509\",transition=\"minted\"} 1".to_owned(),
    ] {
        assert!(text.contains(&needle), "metrics lack {needle}:\n{text}");
    }
    let events = events_for(&client, &name).await;
    assert!(
        events
            .iter()
            .any(|e| e.reason.as_deref() == Some("CACreated")),
        "no CACreated Event"
    );

    // Spec changes reach every replica's signing authority.
    Api::<TrustDomain>::all(client.clone())
        .patch(
            &name,
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(serde_json::json!({"spec": {"x509SVIDTTL": "30m"}})),
        )
        .await
        .unwrap();
    eventually("new SVID TTL loaded", SETTLE, || async {
        replica
            .authorities
            .get(&TdName::new("apply.example.org").unwrap())
            .filter(|a| a.x509_svid_ttl == Duration::from_secs(1800))
    })
    .await;

    // A namespace labelled later gets its ConfigMap; one that stops matching loses it.
    label_namespace(&client, &b, "sigil-bundle", Some(&selected)).await;
    eventually("ConfigMap in the newly labelled namespace", SETTLE, || {
        bundle_config_map(&client, &b, "sigil-trust-bundle")
    })
    .await;
    label_namespace(&client, &a, "sigil-bundle", None).await;
    eventually(
        "ConfigMap removed from the unlabelled namespace",
        SETTLE,
        || async {
            bundle_config_map(&client, &a, "sigil-trust-bundle")
                .await
                .is_none()
                .then_some(())
        },
    )
    .await;
    // A namespace created with the label gets one too.
    let d = unique("ns-d");
    create_namespace(&client, &d, &[("sigil-bundle", &selected)]).await;
    eventually("ConfigMap in a new namespace", SETTLE, || {
        bundle_config_map(&client, &d, "sigil-trust-bundle")
    })
    .await;
    assert!(
        bundle_config_map(&client, &c, "sigil-trust-bundle")
            .await
            .is_none()
    );

    // An operator restart never mints a new root.
    replica.stop().await;
    let replica = Replica::start(client.clone(), ReplicaConfig::new(&ns, &instance));
    let authority = wait_authority(&replica, "apply.example.org", &serial, 1).await;
    assert_eq!(authority.x509_ca.serial(), serial);
    // Give the new leader a chance to act, then check nothing changed.
    let mut r = replica;
    r.wait_leader(SETTLE).await;
    r.resync.trigger();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let td = Api::<TrustDomain>::all(client.clone())
        .get(&name)
        .await
        .unwrap();
    assert_eq!(td.status.unwrap().active_ca.unwrap().serial, serial);

    // Deleting the TrustDomain makes every replica forget its authority.
    Api::<TrustDomain>::all(client.clone())
        .delete(&name, &Default::default())
        .await
        .unwrap();
    eventually("authority forgotten", SETTLE, || async {
        r.authorities
            .get(&TdName::new("apply.example.org").unwrap())
            .is_none()
            .then_some(())
    })
    .await;
    r.stop().await;
}

/// The full cycle with a manual clock through the real apiserver: prepare at half-life,
/// publish before signing, activate at ttl/6 before expiry, drop only after expiry, and
/// every SVID ever issued (and still valid) verifies against the bundle read back from
/// the ConfigMap at every step.
#[tokio::test]
async fn rotation_cycle_with_a_manual_clock_keeps_every_svid_verifiable() {
    let client = client().await;
    let ns = namespace("td-rotate").await;
    let instance = unique("rotate");
    let bundle_ns = unique("ns-rot");
    let selected = unique("sel");
    create_namespace(&client, &bundle_ns, &[("sigil-bundle", &selected)]).await;
    let t0 = SystemTime::now();
    let clock = ManualClock::new(t0);
    let mut config = ReplicaConfig::new(&ns, &instance);
    config.clock = Arc::new(clock.clone());
    let replica = Replica::start(client.clone(), config);
    let name = unique("td");
    let tdn = "rotate.example.org";
    create_trust_domain(
        &client,
        &trust_domain(
            &name,
            &instance,
            serde_json::json!({
                "trustDomain": tdn,
                "ca": {"ttl": "24h"},
                "bundle": {"namespaceSelector": {"matchLabels": {"sigil-bundle": selected}}},
            }),
        ),
    )
    .await;
    let api = Api::<TrustDomain>::all(client.clone());
    wait_condition(&client, &name, "Ready", "True", "BundlePublished").await;

    let key = PrivateKey::generate(KeyType::EcP256).unwrap();
    let mut issued: Vec<(IssuedSvid, String)> = Vec::new();
    let mut tokens: Vec<(String, SystemTime)> = Vec::new();
    let mut last_sequence = 0i64;
    let mut last_bundle: Option<TrustBundle> = None;
    let mut activations = 0;
    let mut drops = 0;

    // Reads the settled state: status, the ConfigMap bundle at the same sequence, and this
    // replica's authority at the same CA and sequence.
    async fn settled(
        client: &Client,
        api: &Api<TrustDomain>,
        name: &str,
        bundle_ns: &str,
        replica: &Replica,
        tdn: &str,
        want: impl Fn(&TrustDomain) -> bool,
    ) -> (TrustDomain, TrustBundle, TrustBundle, Arc<DomainAuthority>) {
        let td = eventually("the expected status", SETTLE, || async {
            api.get(name).await.ok().filter(|t| want(t))
        })
        .await;
        let status = td.status.clone().unwrap();
        let seq = status.bundle_sequence.unwrap();
        let cm = eventually("ConfigMap at the status sequence", SETTLE, || async {
            bundle_config_map(client, bundle_ns, "sigil-trust-bundle")
                .await
                .filter(|cm| cm.annotations().get(SEQUENCE_ANNOTATION) == Some(&seq.to_string()))
        })
        .await;
        let (pem, spiffe) = decode_bundle(&cm, tdn);
        let authority =
            wait_authority(replica, tdn, &status.active_ca.clone().unwrap().serial, seq).await;
        (td, pem, spiffe, authority)
    }

    let (mut td, mut pem, mut spiffe, mut authority) =
        settled(&client, &api, &name, &bundle_ns, &replica, tdn, |t| {
            t.status.as_ref().is_some_and(|s| s.active_ca.is_some())
        })
        .await;
    let started = Instant::now();
    // Steps chosen to land just after each transition of two full CA lifetimes.
    for step in 0..7 {
        let now = clock.now();
        let status = td.status.clone().unwrap();
        let seq = status.bundle_sequence.unwrap();
        println!(
            "step {step} at +{:?}: active {} prepared {:?} sequence {seq} bundle {} CA(s)",
            now.duration_since(t0).unwrap(),
            status.active_ca.as_ref().unwrap().serial,
            status.prepared_ca.as_ref().map(|p| &p.serial),
            pem.x509_authorities.len()
        );
        assert!(seq >= last_sequence, "sequence went backwards");
        if let Some(prev) = &last_bundle {
            if prev.same_keys(&pem) {
                assert_eq!(
                    seq, last_sequence,
                    "sequence changed without a bundle change"
                );
            } else {
                assert!(
                    seq > last_sequence,
                    "bundle changed without a sequence bump"
                );
            }
        }
        // The CA that signs now was in the bundle published before this step.
        let active = status.active_ca.clone().unwrap();
        if let Some(prev) = &last_bundle {
            let was_published = prev
                .x509_authorities
                .iter()
                .any(|c| cert_summary(c).unwrap().0 == active.serial);
            assert!(
                was_published,
                "step {step}: CA {} signs but was not in the previous bundle",
                active.serial
            );
        }
        // Issue with the current authority; every unexpired SVID so far verifies.
        issued.push((
            svid(&authority, &key, now),
            authority.x509_ca.serial().to_owned(),
        ));
        for (s, serial) in &issued {
            if s.not_after > now {
                validate_x509_svid(&s.chain(), &pem, now)
                    .unwrap_or_else(|e| panic!("step {step}: SVID from CA {serial} does not verify against the published bundle: {e}"));
            }
        }
        let id = SpiffeId::parse(&format!("spiffe://{tdn}/w")).unwrap();
        tokens.push((
            authority
                .jwt_key
                .mint(&id, &["aud".into()], authority.jwt_svid_ttl, now, None)
                .unwrap(),
            now + authority.jwt_svid_ttl,
        ));
        let mut set = BundleSet::new();
        set.insert(spiffe.clone()).unwrap();
        for (t, exp) in &tokens {
            if *exp > now {
                sigil_identity::jwt::validate_jwt_svid(t, &set, "aud", now).unwrap();
            }
        }
        // Every CA in the bundle is still valid (expired ones have left).
        for c in &pem.x509_authorities {
            assert!(
                cert_summary(c).unwrap().2 > now,
                "step {step}: expired CA still in the bundle"
            );
        }
        last_sequence = seq;
        last_bundle = Some(pem.clone());

        // Move the clock just past the next transition and let the leader act.
        let na: SystemTime = SystemTime::from(active.not_after.0);
        let nb: SystemTime = SystemTime::from(active.not_before.0);
        let life = na.duration_since(nb).unwrap();
        let next = match &status.prepared_ca {
            None => nb + life / 2,
            Some(_) => na - life / 6,
        };
        let retired_expiry = last_bundle
            .as_ref()
            .unwrap()
            .x509_authorities
            .iter()
            .map(|c| cert_summary(c).unwrap())
            .filter(|(serial, ..)| {
                *serial != active.serial
                    && Some(serial) != status.prepared_ca.as_ref().map(|p| &p.serial)
            })
            .map(|(.., na)| na)
            .min();
        let target = (retired_expiry.map_or(next, |r| r.min(next)) + Duration::from_secs(60))
            .max(now + Duration::from_secs(1));
        // An SVID issued shortly before the transition outlives it and must keep verifying.
        if let Some(before) = target
            .checked_sub(Duration::from_secs(1800))
            .filter(|b| *b > now)
        {
            clock.set(before);
            issued.push((
                svid(&authority, &key, before),
                authority.x509_ca.serial().to_owned(),
            ));
        }
        clock.set(target);
        let prepared_before = status.prepared_ca.clone();
        let bundle_len_before = pem.x509_authorities.len();
        replica.resync.trigger();
        let expect_activation =
            prepared_before.is_some() && retired_expiry.is_none_or(|r| r > next);
        let expect_drop = retired_expiry.is_some_and(|r| r <= next);
        (td, pem, spiffe, authority) =
            settled(&client, &api, &name, &bundle_ns, &replica, tdn, |t| {
                let s = t.status.as_ref().unwrap();
                if expect_drop {
                    s.bundle_sequence.unwrap_or(0) > last_sequence
                } else if expect_activation {
                    s.active_ca.as_ref().map(|a| &a.serial)
                        == prepared_before.as_ref().map(|p| &p.serial)
                } else {
                    s.prepared_ca.is_some()
                }
            })
            .await;
        if expect_activation {
            activations += 1;
            assert_eq!(
                pem.x509_authorities.len(),
                bundle_len_before,
                "activation must not change the bundle"
            );
        }
        if expect_drop {
            drops += 1;
        }
    }
    println!(
        "7 rotation steps through the apiserver in {:?}",
        started.elapsed()
    );
    let events = events_for(&client, &name).await;
    for reason in [
        "CACreated",
        "CAPrepared",
        "CAActivated",
        "CAExpired",
        "JWTKeyPrepared",
        "JWTKeyActivated",
    ] {
        assert!(
            events.iter().any(|e| e.reason.as_deref() == Some(reason)),
            "no {reason} Event"
        );
    }
    assert!(activations >= 2, "activations: {activations}");
    assert!(drops >= 1, "drops: {drops}");
    replica.stop().await;
}

/// Test PKI: an enterprise root and an intermediate CA under it, as PEM.
fn enterprise_pki(valid_for: time::Duration) -> (String, String, String) {
    let p = sigil_e2e::pki::upstream_pki(valid_for, true).unwrap();
    (p.root_pem, p.intermediate_pem, p.intermediate_key_pem)
}

#[tokio::test]
async fn upstream_intermediate_chains_svids_to_the_enterprise_root() {
    let client = client().await;
    let ns = namespace("td-upstream").await;
    let instance = unique("upstream");
    let bundle_ns = unique("ns-up");
    let selected = unique("sel");
    create_namespace(&client, &bundle_ns, &[("sigil-bundle", &selected)]).await;
    let (root, intermediate, key_pem) = enterprise_pki(time::Duration::days(90));
    let secret: k8s_openapi::api::core::v1::Secret = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "enterprise-ca"},
        "type": "kubernetes.io/tls",
        "stringData": {"tls.crt": intermediate, "tls.key": key_pem, "ca.crt": root},
    }))
    .unwrap();
    Api::namespaced(client.clone(), &ns)
        .create(&PostParams::default(), &secret)
        .await
        .unwrap();
    let replica = Replica::start(client.clone(), ReplicaConfig::new(&ns, &instance));
    let name = unique("td");
    create_trust_domain(
        &client,
        &trust_domain(
            &name,
            &instance,
            serde_json::json!({
                "trustDomain": "upstream.example.org",
                "upstreamAuthority": {"secretRef": {"name": "enterprise-ca"}},
                "bundle": {"namespaceSelector": {"matchLabels": {"sigil-bundle": selected}}},
            }),
        ),
    )
    .await;
    let td = wait_condition(&client, &name, "Ready", "True", "BundlePublished").await;
    let serial = td.status.unwrap().active_ca.unwrap().serial;

    // The bundle publishes the enterprise root, and only it.
    let cm = eventually("bundle ConfigMap", SETTLE, || {
        bundle_config_map(&client, &bundle_ns, "sigil-trust-bundle")
    })
    .await;
    let (pem, _) = decode_bundle(&cm, "upstream.example.org");
    let root_der = sigil_identity::x509::certs_from_pem(&root)
        .unwrap()
        .remove(0);
    let intermediate_der = sigil_identity::x509::certs_from_pem(&intermediate)
        .unwrap()
        .remove(0);
    assert_eq!(pem.x509_authorities, vec![root_der.clone()]);

    // SVIDs chain leaf → Sigil's CA → the enterprise intermediate → the root in the bundle.
    let authority = wait_authority(&replica, "upstream.example.org", &serial, 1).await;
    let key = PrivateKey::generate(KeyType::EcP256).unwrap();
    let now = SystemTime::now();
    let issued = svid(&authority, &key, now);
    assert_eq!(issued.intermediates.len(), 2);
    assert_eq!(cert_summary(&issued.intermediates[0]).unwrap().0, serial);
    assert_eq!(issued.intermediates[1], intermediate_der);
    validate_x509_svid(&issued.chain(), &pem, now).unwrap();
    // Without the intermediate the chain does not verify: Sigil's CA really is under it.
    assert!(validate_x509_svid(&issued.chain()[..2], &pem, now).is_err());
    replica.stop().await;
}

/// Two replicas, one Lease: killing the leader hands over within the lease duration, the
/// new leader keeps the same CA and takes over the writes.
#[tokio::test]
async fn leader_handover_keeps_the_same_ca() {
    let client = client().await;
    let ns = namespace("td-leader").await;
    let instance = unique("leader");
    let selected = unique("sel");
    let first_ns = unique("ns-l1");
    create_namespace(&client, &first_ns, &[("sigil-bundle", &selected)]).await;
    let lease_duration = Duration::from_secs(2);
    let mut one = Replica::start(
        client.clone(),
        ReplicaConfig {
            lease_duration,
            ..ReplicaConfig::new(&ns, &instance)
        },
    );
    one.wait_leader(SETTLE).await;
    let mut two = Replica::start(
        client.clone(),
        ReplicaConfig {
            lease_duration,
            ..ReplicaConfig::new(&ns, &instance)
        },
    );
    let name = unique("td");
    create_trust_domain(
        &client,
        &trust_domain(
            &name,
            &instance,
            serde_json::json!({
                "trustDomain": "leader.example.org",
                "bundle": {"namespaceSelector": {"matchLabels": {"sigil-bundle": selected}}},
            }),
        ),
    )
    .await;
    let td = wait_condition(&client, &name, "Ready", "True", "BundlePublished").await;
    let serial = td.status.unwrap().active_ca.unwrap().serial;
    // Both replicas can sign with the same CA; only one leads.
    wait_authority(&one, "leader.example.org", &serial, 1).await;
    wait_authority(&two, "leader.example.org", &serial, 1).await;
    assert!(one.is_leader() && !two.is_leader());
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !two.is_leader(),
        "the follower must not take over a renewed lease"
    );

    // Kill the leader outright (no release): the follower waits for the lease to lapse.
    let killed = Instant::now();
    one.kill();
    two.wait_leader(lease_duration * 3).await;
    let handover = killed.elapsed();
    println!("handover after a crash took {handover:?} (lease {lease_duration:?})");
    assert!(
        handover <= lease_duration + Duration::from_millis(700),
        "handover took {handover:?}"
    );

    // The new leader writes: a newly selected namespace gets the bundle, same CA.
    let second_ns = unique("ns-l2");
    create_namespace(&client, &second_ns, &[("sigil-bundle", &selected)]).await;
    let cm = eventually("ConfigMap written by the new leader", SETTLE, || {
        bundle_config_map(&client, &second_ns, "sigil-trust-bundle")
    })
    .await;
    let (pem, _) = decode_bundle(&cm, "leader.example.org");
    assert_eq!(cert_summary(&pem.x509_authorities[0]).unwrap().0, serial);
    let td = Api::<TrustDomain>::all(client.clone())
        .get(&name)
        .await
        .unwrap();
    assert_eq!(td.status.unwrap().active_ca.unwrap().serial, serial);

    // A graceful stop releases the Lease: the next replica leads at once.
    let three = Replica::start(
        client.clone(),
        ReplicaConfig {
            lease_duration,
            ..ReplicaConfig::new(&ns, &instance)
        },
    );
    wait_authority(&three, "leader.example.org", &serial, 1).await;
    let stopped = Instant::now();
    two.stop().await;
    let mut three = three;
    three.wait_leader(lease_duration * 3).await;
    let handover = stopped.elapsed();
    println!("handover after a graceful stop took {handover:?}");
    assert!(
        handover < lease_duration,
        "graceful handover took {handover:?}"
    );
    three.stop().await;
}

/// The operator needs no more than these RBAC rules (the Helm chart grants exactly them):
/// it works under a ServiceAccount bound to them, and a Secret it may not read is reported
/// as such rather than retried silently.
#[tokio::test]
async fn operator_runs_with_least_privilege_rbac() {
    use kube::core::{ApiResource, DynamicObject, GroupVersionKind};
    let admin = client().await;
    let ns = namespace("td-rbac").await;
    let instance = unique("rbac");
    let apply =
        |kind: &str, group: &str, version: &str, namespaced: bool, body: serde_json::Value| {
            let admin = admin.clone();
            let ns = ns.clone();
            let gvk = GroupVersionKind::gvk(group, version, kind);
            async move {
                let ar = ApiResource::from_gvk(&gvk);
                let api: Api<DynamicObject> = if namespaced {
                    Api::namespaced_with(admin, &ns, &ar)
                } else {
                    Api::all_with(admin, &ar)
                };
                let obj: DynamicObject = serde_json::from_value(body).unwrap();
                api.create(&PostParams::default(), &obj).await.unwrap();
            }
        };
    let cluster_role = format!("sigil-operator-{instance}");
    apply("ClusterRole", "rbac.authorization.k8s.io", "v1", false, serde_json::json!({
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
        "metadata": {"name": cluster_role},
        "rules": [
            {"apiGroups": ["sigil.dev"], "resources": ["trustdomains"], "verbs": ["get", "list", "watch"]},
            {"apiGroups": ["sigil.dev"], "resources": ["trustdomains/status"], "verbs": ["get", "patch", "update"]},
            {"apiGroups": ["sigil.dev"], "resources": ["federatedbundles"], "verbs": ["get", "list", "watch"]},
            {"apiGroups": ["sigil.dev"], "resources": ["federatedbundles/status"], "verbs": ["get", "patch", "update"]},
            {"apiGroups": [""], "resources": ["namespaces"], "verbs": ["get", "list", "watch"]},
            {"apiGroups": [""], "resources": ["configmaps"], "verbs": ["get", "list", "watch", "create", "update", "delete"]},
            {"apiGroups": ["events.k8s.io"], "resources": ["events"], "verbs": ["create", "patch"]},
        ],
    })).await;
    apply("ClusterRoleBinding", "rbac.authorization.k8s.io", "v1", false, serde_json::json!({
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
        "metadata": {"name": cluster_role},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": cluster_role},
        "subjects": [{"kind": "ServiceAccount", "name": "sigil-operator", "namespace": ns}],
    })).await;
    apply("Role", "rbac.authorization.k8s.io", "v1", true, serde_json::json!({
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
        "metadata": {"name": "sigil-operator"},
        "rules": [
            {"apiGroups": [""], "resources": ["secrets"], "verbs": ["get", "list", "watch", "create", "update"]},
            {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "verbs": ["get", "create", "update"]},
        ],
    })).await;
    apply("RoleBinding", "rbac.authorization.k8s.io", "v1", true, serde_json::json!({
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
        "metadata": {"name": "sigil-operator"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "sigil-operator"},
        "subjects": [{"kind": "ServiceAccount", "name": "sigil-operator", "namespace": ns}],
    })).await;
    // An upstream CA Secret in a namespace the operator has no grant in.
    let pki_ns = namespace("td-rbac-pki").await;
    let (root, intermediate, key_pem) = enterprise_pki(time::Duration::days(90));
    let secret: k8s_openapi::api::core::v1::Secret = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "enterprise-ca"},
        "stringData": {"tls.crt": intermediate, "tls.key": key_pem, "ca.crt": root},
    }))
    .unwrap();
    Api::namespaced(admin.clone(), &pki_ns)
        .create(&PostParams::default(), &secret)
        .await
        .unwrap();
    let selected = unique("sel");
    let bundle_ns = unique("ns-rbac");
    create_namespace(&admin, &bundle_ns, &[("sigil-bundle", &selected)]).await;

    let sa_client = service_account_client(&ns, "sigil-operator").await;
    let replica = Replica::start(sa_client, ReplicaConfig::new(&ns, &instance));
    let good = unique("td");
    create_trust_domain(
        &admin,
        &trust_domain(
            &good,
            &instance,
            serde_json::json!({
                "trustDomain": "rbac.example.org",
                "bundle": {"namespaceSelector": {"matchLabels": {"sigil-bundle": selected}}},
            }),
        ),
    )
    .await;
    let td = wait_condition(&admin, &good, "Ready", "True", "BundlePublished").await;
    let serial = td.status.unwrap().active_ca.unwrap().serial;
    eventually(
        "bundle ConfigMap written under least privilege",
        SETTLE,
        || bundle_config_map(&admin, &bundle_ns, "sigil-trust-bundle"),
    )
    .await;
    wait_authority(&replica, "rbac.example.org", &serial, 1).await;
    assert!(
        events_for(&admin, &good)
            .await
            .iter()
            .any(|e| e.reason.as_deref() == Some("CACreated"))
    );

    let forbidden = unique("td");
    create_trust_domain(
        &admin,
        &trust_domain(
            &forbidden,
            &instance,
            serde_json::json!({
                "trustDomain": "rbac-upstream.example.org",
                "upstreamAuthority": {"secretRef": {"name": "enterprise-ca", "namespace": pki_ns}},
            }),
        ),
    )
    .await;
    let td = wait_condition(
        &admin,
        &forbidden,
        "Ready",
        "False",
        "UpstreamSecretForbidden",
    )
    .await;
    let (_, _, message) = condition(&td, "Ready").unwrap();
    assert!(
        message.contains(&pki_ns) && message.contains("grant"),
        "{message}"
    );
    wait_warning_event(&admin, &forbidden, "UpstreamSecretForbidden").await;
    // Every watch listed under these grants: the replica reports ready.
    eventually("replica ready under least privilege", SETTLE, || async {
        replica.readiness.is_ready().then_some(())
    })
    .await;
    replica.stop().await;
}
