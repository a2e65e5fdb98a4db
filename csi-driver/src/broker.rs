//! sigil-csi's client of the agent's SPIFFE Broker API: SVIDs, bundles and JWT-SVIDs on
//! behalf of a pod, named by a `KubernetesObjectReference` and proven by the pod-bound
//! token the kubelet passed in NodePublishVolume (sent as `authorization` metadata; the
//! agent TokenReviews it).

use std::path::{Path, PathBuf};

use hyper_util::rt::TokioIo;
use prost::Message;
use serde::{Deserialize, Serialize};
use sigil_identity::proto::broker as pb;
use tonic::transport::{Channel, Endpoint};

/// Type URL of a pod reference.
pub const K8S_REFERENCE: &str = "type.googleapis.com/spiffe.broker.KubernetesObjectReference";

/// The pod a volume belongs to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodRef {
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
    /// UID.
    pub uid: String,
}

impl PodRef {
    fn reference(&self) -> pb::WorkloadReference {
        let r = pb::KubernetesObjectReference {
            r#type: Some(pb::KubernetesObjectType {
                plural: "pods".into(),
                group: "core".into(),
            }),
            key: Some(pb::KubernetesObjectKey {
                namespace: self.namespace.clone(),
                name: self.name.clone(),
            }),
            uid: self.uid.clone(),
        };
        pb::WorkloadReference {
            reference: Some(prost_types::Any {
                type_url: K8S_REFERENCE.into(),
                value: r.encode_to_vec(),
            }),
        }
    }
}

/// A Broker API client on the agent's private socket.
#[derive(Debug, Clone)]
pub struct BrokerClient {
    socket: PathBuf,
    channel: Channel,
}

fn with_token<T>(message: T, token: &str) -> Result<tonic::Request<T>, tonic::Status> {
    let mut req = tonic::Request::new(message);
    let value = format!("Bearer {token}").parse().map_err(|_| {
        tonic::Status::invalid_argument("the pod token is not a valid header value")
    })?;
    req.metadata_mut().insert("authorization", value);
    Ok(req)
}

impl BrokerClient {
    /// A client for the socket at `socket` (connects lazily, reconnects as needed).
    pub fn new(socket: &Path) -> Result<Self, tonic::transport::Error> {
        let path = socket.to_path_buf();
        let channel = Endpoint::from_static("http://localhost").connect_with_connector_lazy(
            tower::service_fn(move |_: http::Uri| {
                let path = path.clone();
                async move {
                    Ok::<_, std::io::Error>(TokioIo::new(
                        tokio::net::UnixStream::connect(path).await?,
                    ))
                }
            }),
        );
        Ok(Self {
            socket: socket.to_path_buf(),
            channel,
        })
    }

    /// The socket this client talks to.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    fn raw(&self) -> pb::api_client::ApiClient<Channel> {
        pb::api_client::ApiClient::new(self.channel.clone())
            .max_decoding_message_size(16 * 1024 * 1024)
    }

    /// The pod's X509-SVIDs, now and at every change.
    pub async fn subscribe_x509(
        &self,
        pod: &PodRef,
        token: &str,
    ) -> Result<tonic::Streaming<pb::SubscribeToX509svidResponse>, tonic::Status> {
        let req = with_token(
            pb::SubscribeToX509svidRequest {
                reference: Some(pod.reference()),
            },
            token,
        )?;
        Ok(self.raw().subscribe_to_x509svid(req).await?.into_inner())
    }

    /// The pod's JWT bundles (JWK Sets by trust domain ID), now and at every change.
    pub async fn subscribe_jwt_bundles(
        &self,
        pod: &PodRef,
        token: &str,
    ) -> Result<tonic::Streaming<pb::SubscribeToJwtBundlesResponse>, tonic::Status> {
        let req = with_token(
            pb::SubscribeToJwtBundlesRequest {
                reference: Some(pod.reference()),
            },
            token,
        )?;
        Ok(self.raw().subscribe_to_jwt_bundles(req).await?.into_inner())
    }

    /// JWT-SVIDs for `audience` (`spiffe_id` picks one identity; empty: all).
    pub async fn fetch_jwt(
        &self,
        pod: &PodRef,
        token: &str,
        audience: &[String],
        spiffe_id: &str,
    ) -> Result<Vec<pb::Jwtsvid>, tonic::Status> {
        let req = with_token(
            pb::FetchJwtsvidRequest {
                reference: Some(pod.reference()),
                audience: audience.to_vec(),
                spiffe_id: spiffe_id.to_owned(),
            },
            token,
        )?;
        Ok(self.raw().fetch_jwtsvid(req).await?.into_inner().svids)
    }
}
