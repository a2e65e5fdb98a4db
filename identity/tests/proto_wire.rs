//! Wire facts of the generated protobuf code that a wrong field number, name or package
//! would break: exact encodings checked against hand-assembled bytes, and the gRPC
//! paths the generated clients put on the wire.

use std::collections::BTreeMap;
use std::future::{Ready, ready};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use prost::Message;
use sigil_identity::proto::{FILE_DESCRIPTOR_SET, broker, csi, workload};
use tonic::codegen::http;

/// Length-delimited field (wire type 2) with a one-byte tag and a short payload.
fn ld(field: u8, payload: &[u8]) -> Vec<u8> {
    assert!(
        field < 16 && payload.len() < 128,
        "helper covers short fields only"
    );
    let mut out = vec![(field << 3) | 2, payload.len() as u8];
    out.extend_from_slice(payload);
    out
}

/// Varint field (wire type 0) with a one-byte tag and a value below 128.
fn varint(field: u8, value: u8) -> Vec<u8> {
    assert!(field < 16 && value < 128);
    vec![field << 3, value]
}

/// One protobuf map entry (key = 1, value = 2) as field `field` of the outer message.
fn map_entry(field: u8, key: &[u8], value: &[u8]) -> Vec<u8> {
    ld(field, &[ld(1, key), ld(2, value)].concat())
}

#[test]
fn x509_svid_response_wire_format() {
    let response = workload::X509svidResponse {
        svids: vec![workload::X509svid {
            spiffe_id: "spiffe://a.test/w".into(),
            x509_svid: vec![0x30, 0x01],
            x509_svid_key: vec![0x30, 0x02],
            bundle: vec![0x30, 0x03],
            hint: "internal".into(),
        }],
        crl: vec![vec![0x30, 0x04]],
        federated_bundles: BTreeMap::from([("spiffe://b.test".to_owned(), vec![0x30, 0x05])]),
    };

    let svid = [
        ld(1, b"spiffe://a.test/w"),
        ld(2, &[0x30, 0x01]),
        ld(3, &[0x30, 0x02]),
        ld(4, &[0x30, 0x03]),
        ld(5, b"internal"),
    ]
    .concat();
    let expected = [
        ld(1, &svid),
        ld(2, &[0x30, 0x04]),
        // federated_bundles is field 3: tag byte 0x1a, then a map entry.
        map_entry(3, b"spiffe://b.test", &[0x30, 0x05]),
    ]
    .concat();

    let encoded = response.encode_to_vec();
    assert_eq!(encoded, expected);
    assert!(encoded.windows(2).any(|w| w == [0x1a, 0x15]));
    assert_eq!(
        workload::X509svidResponse::decode(expected.as_slice()).expect("decode"),
        response
    );
}

#[test]
fn x509_bundles_and_jwt_messages_wire_format() {
    // X509BundlesResponse: crl = 1, bundles = 2.
    let bundles = workload::X509BundlesResponse {
        crl: vec![vec![1]],
        bundles: BTreeMap::from([("spiffe://a.test".to_owned(), vec![2])]),
    };
    assert_eq!(
        bundles.encode_to_vec(),
        [ld(1, &[1]), map_entry(2, b"spiffe://a.test", &[2])].concat()
    );

    // JWTSVIDRequest: audience = 1, spiffe_id = 2.
    let bytes = [
        ld(1, b"aud-1"),
        ld(1, b"aud-2"),
        ld(2, b"spiffe://a.test/w"),
    ]
    .concat();
    let request = workload::JwtsvidRequest::decode(bytes.as_slice()).expect("decode");
    assert_eq!(request.audience, ["aud-1", "aud-2"]);
    assert_eq!(request.spiffe_id, "spiffe://a.test/w");

    // JWTSVID: spiffe_id = 1, svid = 2, hint = 3.
    let svid = workload::Jwtsvid {
        spiffe_id: "spiffe://a.test/w".into(),
        svid: "h.p.s".into(),
        hint: "x".into(),
    };
    assert_eq!(
        svid.encode_to_vec(),
        [ld(1, b"spiffe://a.test/w"), ld(2, b"h.p.s"), ld(3, b"x")].concat()
    );

    // JWTBundlesResponse: bundles = 1.
    let jwt_bundles = workload::JwtBundlesResponse {
        bundles: BTreeMap::from([("spiffe://a.test".to_owned(), b"{}".to_vec())]),
    };
    assert_eq!(
        jwt_bundles.encode_to_vec(),
        map_entry(1, b"spiffe://a.test", b"{}")
    );

    // ValidateJWTSVIDRequest: audience = 1, svid = 2; response: spiffe_id = 1, claims = 2.
    let validate = workload::ValidateJwtsvidRequest {
        audience: "aud".into(),
        svid: "h.p.s".into(),
    };
    assert_eq!(
        validate.encode_to_vec(),
        [ld(1, b"aud"), ld(2, b"h.p.s")].concat()
    );
    let validated = workload::ValidateJwtsvidResponse {
        spiffe_id: "spiffe://a.test/w".into(),
        claims: Some(prost_types::Struct::default()),
    };
    assert_eq!(
        validated.encode_to_vec(),
        [ld(1, b"spiffe://a.test/w"), ld(2, &[])].concat()
    );
}

#[test]
fn wit_svid_messages_wire_format() {
    let request = workload::WitsvidRequest {
        spiffe_id: "spiffe://a.test/w".into(),
    };
    assert_eq!(request.encode_to_vec(), ld(1, b"spiffe://a.test/w"));

    let svid = workload::Witsvid {
        spiffe_id: "spiffe://a.test/w".into(),
        wit_svid: "h.p.s".into(),
        wit_svid_key: "{}".into(),
        hint: "x".into(),
    };
    assert_eq!(
        svid.encode_to_vec(),
        [
            ld(1, b"spiffe://a.test/w"),
            ld(2, b"h.p.s"),
            ld(3, b"{}"),
            ld(4, b"x")
        ]
        .concat()
    );

    // WIT bundles are JSON text: map<string, string>, field 1.
    let bundles = workload::WitBundlesResponse {
        bundles: BTreeMap::from([("spiffe://a.test".to_owned(), "{}".to_owned())]),
    };
    assert_eq!(
        bundles.encode_to_vec(),
        map_entry(1, b"spiffe://a.test", b"{}")
    );
}

#[test]
fn broker_messages_wire_format() {
    let pod = broker::KubernetesObjectReference {
        r#type: Some(broker::KubernetesObjectType {
            plural: "pods".into(),
            group: "core".into(),
        }),
        key: Some(broker::KubernetesObjectKey {
            namespace: "ns".into(),
            name: "p".into(),
        }),
        uid: "u".into(),
    };
    let pod_bytes = [
        ld(1, &[ld(1, b"pods"), ld(2, b"core")].concat()),
        ld(2, &[ld(1, b"ns"), ld(2, b"p")].concat()),
        ld(3, b"u"),
    ]
    .concat();
    assert_eq!(pod.encode_to_vec(), pod_bytes);

    let type_url = "type.googleapis.com/spiffe.broker.KubernetesObjectReference";
    let request = broker::FetchJwtsvidRequest {
        reference: Some(broker::WorkloadReference {
            reference: Some(prost_types::Any {
                type_url: type_url.into(),
                value: pod_bytes.clone(),
            }),
        }),
        audience: vec!["aud".into()],
        spiffe_id: "spiffe://a.test/w".into(),
    };
    let any = [ld(1, type_url.as_bytes()), ld(2, &pod_bytes)].concat();
    let expected = [
        ld(1, &ld(1, &any)),
        ld(2, b"aud"),
        ld(3, b"spiffe://a.test/w"),
    ]
    .concat();
    assert_eq!(request.encode_to_vec(), expected);

    let pid = broker::WorkloadPidReference { pid: 42 };
    assert_eq!(pid.encode_to_vec(), varint(1, 42));

    let response = broker::SubscribeToX509svidResponse {
        svids: vec![],
        crl: vec![],
        federated_bundles: BTreeMap::from([("spiffe://b.test".to_owned(), vec![5])]),
    };
    assert_eq!(
        response.encode_to_vec(),
        map_entry(3, b"spiffe://b.test", &[5])
    );
}

#[test]
fn csi_node_publish_volume_wire_format() {
    let request = csi::NodePublishVolumeRequest {
        volume_id: "v".into(),
        target_path: "/t".into(),
        readonly: true,
        volume_context: BTreeMap::from([("k".to_owned(), "v".to_owned())]),
        ..Default::default()
    };
    assert_eq!(
        request.encode_to_vec(),
        [
            ld(1, b"v"),
            ld(4, b"/t"),
            varint(6, 1),
            map_entry(8, b"k", b"v")
        ]
        .concat()
    );

    let capability = csi::VolumeCapability {
        access_type: Some(csi::volume_capability::AccessType::Mount(
            csi::volume_capability::MountVolume::default(),
        )),
        access_mode: Some(csi::volume_capability::AccessMode {
            mode: csi::volume_capability::access_mode::Mode::SingleNodeWriter as i32,
        }),
    };
    assert_eq!(
        capability.encode_to_vec(),
        [ld(2, &[]), ld(3, &varint(1, 1))].concat()
    );
}

/// A transport that records the request path and answers UNIMPLEMENTED.
#[derive(Clone, Debug, Default)]
struct PathRecorder {
    paths: Arc<Mutex<Vec<String>>>,
}

impl PathRecorder {
    fn take(&self) -> Vec<String> {
        std::mem::take(&mut *self.paths.lock().expect("lock"))
    }
}

impl tonic::codegen::Service<http::Request<tonic::body::Body>> for PathRecorder {
    type Response = http::Response<tonic::body::Body>;
    type Error = std::convert::Infallible;
    type Future = Ready<Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<tonic::body::Body>) -> Self::Future {
        self.paths
            .lock()
            .expect("lock")
            .push(request.uri().path().to_owned());
        ready(Ok(tonic::Status::unimplemented("recorded").into_http()))
    }
}

fn assert_unimplemented<T>(result: Result<T, tonic::Status>) {
    match result {
        Err(status) => assert_eq!(status.code(), tonic::Code::Unimplemented),
        Ok(_) => panic!("the recorder never answers successfully"),
    }
}

#[tokio::test]
async fn workload_api_grpc_paths() {
    use workload::spiffe_workload_api_client::SpiffeWorkloadApiClient;

    let recorder = PathRecorder::default();
    let mut client = SpiffeWorkloadApiClient::new(recorder.clone());
    assert_unimplemented(client.fetch_x509svid(workload::X509svidRequest {}).await);
    assert_unimplemented(
        client
            .fetch_x509_bundles(workload::X509BundlesRequest {})
            .await,
    );
    assert_unimplemented(
        client
            .fetch_jwtsvid(workload::JwtsvidRequest::default())
            .await,
    );
    assert_unimplemented(
        client
            .fetch_jwt_bundles(workload::JwtBundlesRequest {})
            .await,
    );
    assert_unimplemented(
        client
            .validate_jwtsvid(workload::ValidateJwtsvidRequest::default())
            .await,
    );
    assert_unimplemented(
        client
            .fetch_witsvid(workload::WitsvidRequest::default())
            .await,
    );
    assert_unimplemented(
        client
            .fetch_wit_bundles(workload::WitBundlesRequest {})
            .await,
    );
    assert_eq!(
        recorder.take(),
        [
            "/SpiffeWorkloadAPI/FetchX509SVID",
            "/SpiffeWorkloadAPI/FetchX509Bundles",
            "/SpiffeWorkloadAPI/FetchJWTSVID",
            "/SpiffeWorkloadAPI/FetchJWTBundles",
            "/SpiffeWorkloadAPI/ValidateJWTSVID",
            "/SpiffeWorkloadAPI/FetchWITSVID",
            "/SpiffeWorkloadAPI/FetchWITBundles",
        ]
    );
    assert_eq!(
        workload::spiffe_workload_api_server::SERVICE_NAME,
        "SpiffeWorkloadAPI"
    );
}

#[tokio::test]
async fn broker_api_grpc_paths() {
    use broker::api_client::ApiClient;

    let recorder = PathRecorder::default();
    let mut client = ApiClient::new(recorder.clone());
    assert_unimplemented(
        client
            .subscribe_to_x509svid(broker::SubscribeToX509svidRequest::default())
            .await,
    );
    assert_unimplemented(
        client
            .subscribe_to_x509_bundles(broker::SubscribeToX509BundlesRequest::default())
            .await,
    );
    assert_unimplemented(
        client
            .fetch_jwtsvid(broker::FetchJwtsvidRequest::default())
            .await,
    );
    assert_unimplemented(
        client
            .subscribe_to_jwt_bundles(broker::SubscribeToJwtBundlesRequest::default())
            .await,
    );
    assert_eq!(
        recorder.take(),
        [
            "/spiffe.broker.API/SubscribeToX509SVID",
            "/spiffe.broker.API/SubscribeToX509Bundles",
            "/spiffe.broker.API/FetchJWTSVID",
            "/spiffe.broker.API/SubscribeToJWTBundles",
        ]
    );
    assert_eq!(broker::api_server::SERVICE_NAME, "spiffe.broker.API");
}

#[tokio::test]
async fn csi_grpc_paths() {
    let recorder = PathRecorder::default();
    let mut node = csi::node_client::NodeClient::new(recorder.clone());
    assert_unimplemented(
        node.node_publish_volume(csi::NodePublishVolumeRequest::default())
            .await,
    );
    assert_unimplemented(
        node.node_unpublish_volume(csi::NodeUnpublishVolumeRequest::default())
            .await,
    );
    let mut identity = csi::identity_client::IdentityClient::new(recorder.clone());
    assert_unimplemented(
        identity
            .get_plugin_info(csi::GetPluginInfoRequest::default())
            .await,
    );
    assert_unimplemented(identity.probe(csi::ProbeRequest::default()).await);
    assert_eq!(
        recorder.take(),
        [
            "/csi.v1.Node/NodePublishVolume",
            "/csi.v1.Node/NodeUnpublishVolume",
            "/csi.v1.Identity/GetPluginInfo",
            "/csi.v1.Identity/Probe",
        ]
    );
    assert_eq!(csi::node_server::SERVICE_NAME, "csi.v1.Node");
    assert_eq!(csi::identity_server::SERVICE_NAME, "csi.v1.Identity");
}

#[test]
fn file_descriptor_set_describes_the_services() {
    let set = prost_types::FileDescriptorSet::decode(FILE_DESCRIPTOR_SET).expect("decode");
    let file = |name: &str| {
        set.file
            .iter()
            .find(|f| f.name() == name)
            .unwrap_or_else(|| panic!("{name} missing from FILE_DESCRIPTOR_SET"))
    };
    let methods = |f: &prost_types::FileDescriptorProto, service: &str| -> Vec<String> {
        f.service
            .iter()
            .find(|s| s.name() == service)
            .unwrap_or_else(|| panic!("service {service} missing from {}", f.name()))
            .method
            .iter()
            .map(|m| m.name().to_owned())
            .collect()
    };

    let workload = file("workload.proto");
    assert_eq!(workload.package(), "");
    assert_eq!(
        methods(workload, "SpiffeWorkloadAPI"),
        [
            "FetchX509SVID",
            "FetchX509Bundles",
            "FetchJWTSVID",
            "FetchJWTBundles",
            "ValidateJWTSVID",
            "FetchWITSVID",
            "FetchWITBundles",
        ]
    );
    let broker = file("broker.proto");
    assert_eq!(broker.package(), "spiffe.broker");
    assert_eq!(
        methods(broker, "API"),
        [
            "SubscribeToX509SVID",
            "SubscribeToX509Bundles",
            "FetchJWTSVID",
            "SubscribeToJWTBundles",
        ]
    );
    let csi = file("csi.proto");
    assert_eq!(csi.package(), "csi.v1");
    assert!(methods(csi, "Node").contains(&"NodePublishVolume".to_owned()));
    assert!(methods(csi, "Identity").contains(&"GetPluginInfo".to_owned()));

    // Reflection clients must be able to resolve every import from the same set.
    for f in [workload, broker, csi] {
        for dependency in &f.dependency {
            file(dependency);
        }
    }
    // No source info, so no comments and nothing about the machine that generated it.
    assert!(set.file.iter().all(|f| f.source_code_info.is_none()));
    // CSI's custom option `csi_secret` (FieldOptions extension 1059, bool true:
    // varint tag 0x98 0x42, value 1) survived encoding.
    assert!(
        FILE_DESCRIPTOR_SET
            .windows(3)
            .any(|w| w == [0x98, 0x42, 0x01])
    );
}

#[test]
fn debug_output_redacts_keys_and_tokens() {
    let svid = workload::X509svid {
        spiffe_id: "spiffe://a.test/w".into(),
        x509_svid: vec![1; 10],
        x509_svid_key: b"KEY-MATERIAL".to_vec(),
        bundle: vec![2; 3],
        hint: String::new(),
    };
    let shown = format!("{svid:?}");
    assert!(shown.contains("spiffe://a.test/w"), "{shown}");
    assert!(shown.contains("<redacted 12 bytes>"), "{shown}");
    assert!(!shown.contains("75, 69, 89"), "key bytes leaked: {shown}");

    let jwt = broker::Jwtsvid {
        spiffe_id: "spiffe://a.test/w".into(),
        svid: "SECRET.TOKEN.VALUE".into(),
        hint: String::new(),
    };
    let shown = format!("{jwt:?}");
    assert!(!shown.contains("SECRET"), "token leaked: {shown}");

    let wit = workload::Witsvid {
        spiffe_id: "spiffe://a.test/w".into(),
        wit_svid: "SECRET.TOKEN.VALUE".into(),
        wit_svid_key: "{\"d\":\"SECRET\"}".into(),
        hint: String::new(),
    };
    let shown = format!("{wit:?}");
    assert!(!shown.contains("SECRET"), "WIT secret leaked: {shown}");
}
