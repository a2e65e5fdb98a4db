//! Files mode: a per-volume tmpfs holding the pod's identity, kept current by sigil-csi.
//!
//! The pod can never write into its volume. The tmpfs is mounted in sigil-csi's data
//! directory (`<data_dir>/mounts/<sha256(volume_id)>`, root only), where the files are
//! written, and the pod's target path is a read-only (nosuid, nodev, noexec) bind mount of
//! it, whatever the volume's `readOnly` says. The writer never follows a link in it either
//! ([`crate::writer`]).
//!
//! Each volume has a task that holds two Broker API streams for its pod (X509-SVIDs and
//! JWT bundles), rewrites the files as a new `..data` generation whenever either changes
//! (the agent rotates SVIDs 1-10% before half-life and streams them at once), and refreshes
//! the JWT-SVIDs of `jwtAudiences` at half-life. A broken stream is reopened with backoff,
//! proven again with the pod's latest token; the kubelet refreshes that token on every
//! republish (`requiresRepublish: true`).
//!
//! Every published volume is recorded in the data directory (0600 JSON, with the pod's
//! token), so a restarted sigil-csi finds its volumes and resumes them; the tmpfs and its
//! files outlive the process, so pods keep their current identity meanwhile.
//!
//! Layout of a volume: `svid.pem` (leaf then intermediates), `svid_key.pem` (PKCS#8),
//! `bundle.pem` (own trust domain), `bundle.spiffe` (JWK Set with X.509 and JWT
//! authorities), `federated/<trust domain>.pem`, `jwt/<audience>.token`; and, for the
//! [`Format`]s a volume asks for (`formats`), the same identity in the layouts proxies and
//! gRPC read directly:
//! - `istio`: `cert-chain.pem`, `key.pem`, `root-cert.pem` (istio-agent's file-mounted
//!   credentials, `/var/run/secrets/workload-spiffe-credentials`);
//! - `grpc`: `spiffe-bundle-map.json`, a SPIFFE trust bundle map (grpc proposal A87,
//!   `spiffe_trust_bundle_map_file`): `{"trust_domains": {"<td>": <SPIFFE bundle>}}` for the
//!   own and every federated trust domain, keyed by trust domain name;
//! - `spiffe-fs`: the SPIFFE filesystem delivery draft (spiffe/spiffe#376), the same files
//!   as a Sigil pod certificate volume (docs/pod-certificates.md):
//!   `credential-bundle.private-key.pem` (key then chain) and
//!   `<trust domain>.spiffe-trust-bundle.pem` per trust domain;
//! - `credential-bundle`: `credential-bundle.pem`, the PKCS#8 key then the chain, in one
//!   file (the layout of Kubernetes pod certificates' `credentialBundlePath`), so a reader
//!   never sees a key and a chain from two different rotations.
//!
//! Every file of a generation is swapped in at once (`..data`), so a reader of any layout
//! sees a key and chain that belong together.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures::StreamExt;
use serde::{Deserialize, Serialize};
use sha2::Digest;
use sigil_identity::proto::broker as pb;
use sigil_identity::{TrustBundle, TrustDomain, x509};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tonic::Status;
use tracing::{info, warn};

use crate::broker::{BrokerClient, PodRef};
use crate::mounter::Mounter;
use crate::writer::{FileSpec, write_generation};

/// Size of a files-mode tmpfs.
pub const TMPFS_BYTES: u64 = 4 * 1024 * 1024;

/// What a files-mode volume holds and for whom.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FilesOptions {
    /// Which identity, when the pod has several (`spiffeID`).
    pub spiffe_id: Option<String>,
    /// A JWT-SVID file per audience (`jwtAudiences`).
    pub jwt_audiences: Vec<String>,
    /// Group owning the files (`fsGroup`, or the pod's fsGroup from the kubelet).
    pub fs_group: Option<u32>,
    /// Mode of every file (`fileMode`); default 0644 for certificates and bundles, 0640
    /// for the key and JWT-SVIDs.
    pub file_mode: Option<u32>,
    /// Extra layouts of the same identity (`formats`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub formats: Vec<Format>,
}

/// An extra layout of a files-mode volume (`volumeAttributes.formats`, comma-separated).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Format {
    /// Istio's names: `cert-chain.pem`, `key.pem`, `root-cert.pem`.
    Istio,
    /// gRPC's SPIFFE trust bundle map: `spiffe-bundle-map.json`.
    Grpc,
    /// Key then chain in one file: `credential-bundle.pem`.
    CredentialBundle,
    /// The SPIFFE filesystem delivery draft (spiffe/spiffe#376), the layout of Sigil's
    /// pod certificates: `credential-bundle.private-key.pem` (key then chain) and
    /// `<trust domain>.spiffe-trust-bundle.pem` for the own and every federated trust
    /// domain.
    SpiffeFs,
}

impl Format {
    /// Every format, by its attribute value.
    pub const ALL: &[(&str, Format)] = &[
        ("istio", Format::Istio),
        ("grpc", Format::Grpc),
        ("credential-bundle", Format::CredentialBundle),
        ("spiffe-fs", Format::SpiffeFs),
    ];
}

/// A published files-mode volume, as recorded on disk.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeRecord {
    /// The CSI volume ID.
    pub volume_id: String,
    /// Where it is mounted.
    pub target_path: PathBuf,
    /// Whose identity it holds.
    pub pod: PodRef,
    /// What it holds.
    pub options: FilesOptions,
    /// The pod's latest token for the Broker API.
    pub token: String,
}

impl std::fmt::Debug for VolumeRecord {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VolumeRecord")
            .field("volume_id", &self.volume_id)
            .field("target_path", &self.target_path)
            .field("pod", &self.pod)
            .field("options", &self.options)
            .field("token", &"<redacted>")
            .finish()
    }
}

/// The identity material of one volume, as last received.
#[derive(Debug, Default, Clone)]
struct Material {
    x509: Option<pb::SubscribeToX509svidResponse>,
    jwt_bundles: BTreeMap<String, Vec<u8>>,
    jwts: BTreeMap<String, (String, SystemTime, SystemTime)>,
}

/// Running files-mode volumes.
#[derive(Debug)]
pub struct FilesVolumes {
    data_dir: PathBuf,
    broker: BrokerClient,
    mounter: Arc<dyn Mounter>,
    running: Mutex<HashMap<String, Running>>,
    first_timeout: Duration,
}

#[derive(Debug)]
struct Running {
    record: watch::Sender<VolumeRecord>,
    cancel: CancellationToken,
}

fn record_file(data_dir: &Path, volume_id: &str) -> PathBuf {
    data_dir.join("volumes").join(format!(
        "{}.json",
        hex::encode(sha2::Sha256::digest(volume_id.as_bytes()))
    ))
}

/// Where a volume's tmpfs is mounted and written: in the data directory, out of the pod's
/// reach. The pod's target path is a read-only bind mount of it.
pub fn staging_dir(data_dir: &Path, volume_id: &str) -> PathBuf {
    data_dir
        .join("mounts")
        .join(hex::encode(sha2::Sha256::digest(volume_id.as_bytes())))
}

/// A file name for an audience (anything but `[A-Za-z0-9._-]` becomes `_`).
pub fn audience_file(audience: &str) -> String {
    let name: String = audience
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                c
            } else {
                '_'
            }
        })
        .collect();
    format!("jwt/{}.token", name.trim_start_matches('.'))
}

impl FilesVolumes {
    /// The agent's Broker API client (socket-mode publishes wait for identities with it).
    pub fn broker(&self) -> &BrokerClient {
        &self.broker
    }

    /// Volumes recorded under `data_dir`, served through `broker`.
    pub fn new(
        data_dir: &Path,
        broker: BrokerClient,
        mounter: Arc<dyn Mounter>,
        first_timeout: Duration,
    ) -> std::io::Result<Arc<Self>> {
        use std::os::unix::fs::PermissionsExt;
        for sub in ["volumes", "mounts"] {
            std::fs::create_dir_all(data_dir.join(sub))?;
            std::fs::set_permissions(data_dir.join(sub), std::fs::Permissions::from_mode(0o700))?;
        }
        Ok(Arc::new(Self {
            data_dir: data_dir.to_owned(),
            broker,
            mounter,
            running: Mutex::default(),
            first_timeout,
        }))
    }

    fn persist(&self, record: &VolumeRecord) -> std::io::Result<()> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let path = record_file(&self.data_dir, &record.volume_id);
        let tmp = path.with_extension("tmp");
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(&serde_json::to_vec(record).map_err(std::io::Error::other)?)?;
        f.sync_all()?;
        std::fs::rename(&tmp, &path)
    }

    /// Whether `volume_id` is running at `target`.
    pub fn is_running(&self, volume_id: &str, target: &Path) -> bool {
        self.running
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(volume_id)
            .is_some_and(|r| r.record.borrow().target_path == target)
    }

    /// The record of `volume_id` if it is running at `target`.
    pub fn running_at(&self, volume_id: &str, target: &Path) -> Option<VolumeRecord> {
        self.running
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(volume_id)
            .map(|r| r.record.borrow().clone())
            .filter(|r| r.target_path == target)
    }

    /// A republish of a running volume: keep the newest token (and options).
    pub fn refresh(&self, record: VolumeRecord) -> Result<(), Status> {
        self.persist(&record)
            .map_err(|e| Status::internal(format!("recording volume {}: {e}", record.volume_id)))?;
        if let Some(r) = self
            .running
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&record.volume_id)
        {
            r.record.send_replace(record);
        }
        Ok(())
    }

    /// Publishes a new files-mode volume: a tmpfs in the data directory with the first
    /// files written, bind-mounted read-only on the target before returning, then kept
    /// current in the background.
    pub async fn publish(self: &Arc<Self>, record: VolumeRecord) -> Result<(), Status> {
        let target = record.target_path.clone();
        let staging = staging_dir(&self.data_dir, &record.volume_id);
        let mount_count = |p: &Path| {
            self.mounter
                .mount_count(p)
                .map_err(|e| Status::internal(format!("reading mounts: {e}")))
        };
        for dir in [&target, &staging] {
            std::fs::create_dir_all(dir)
                .map_err(|e| Status::internal(format!("creating {}: {e}", dir.display())))?;
        }
        let mut staged_here = false;
        if mount_count(&staging)? == 0 {
            if mount_count(&target)? > 0 {
                // A tmpfs on the target from an earlier version: stage it, don't hide it.
                self.restage(&record).map_err(|e| {
                    Status::internal(format!("staging the tmpfs of {}: {e}", target.display()))
                })?;
            } else {
                staged_here = true;
            }
        }
        if staged_here {
            self.mounter
                .tmpfs(&staging, TMPFS_BYTES, 0o755)
                .map_err(|e| {
                    Status::internal(format!("mounting a tmpfs on {}: {e}", staging.display()))
                })?;
        }
        let undo = |vols: &Self| {
            if staged_here {
                let _ = vols.mounter.unmount(&staging);
                let _ = std::fs::remove_dir(&staging);
            }
        };
        let first = tokio::time::timeout(self.first_timeout, self.open_and_write(&record))
            .await
            .unwrap_or_else(|_| {
                Err(Status::deadline_exceeded(format!(
                    "no identity for pod {}/{} within {:?}",
                    record.pod.namespace, record.pod.name, self.first_timeout
                )))
            });
        let streams = match first {
            Ok(s) => s,
            Err(status) => {
                undo(self);
                return Err(status);
            }
        };
        if mount_count(&target)? == 0
            && let Err(e) = self.mounter.bind_read_only(&staging, &target)
        {
            undo(self);
            return Err(Status::internal(format!(
                "bind-mounting the identity files read-only on {}: {e}",
                target.display()
            )));
        }
        self.persist(&record)
            .map_err(|e| Status::internal(format!("recording volume {}: {e}", record.volume_id)))?;
        self.start(record, Some(streams));
        Ok(())
    }

    /// Resumes every recorded volume still mounted (after a restart). Records of volumes
    /// whose mount is gone are removed.
    pub fn resume(self: &Arc<Self>) -> usize {
        let Ok(entries) = std::fs::read_dir(self.data_dir.join("volumes")) else {
            return 0;
        };
        let mut resumed = 0;
        for e in entries.flatten() {
            let Ok(bytes) = std::fs::read(e.path()) else {
                continue;
            };
            let Ok(record) = serde_json::from_slice::<VolumeRecord>(&bytes) else {
                warn!(file = %e.path().display(), "ignoring an unreadable volume record");
                continue;
            };
            if self.mounter.mount_count(&record.target_path).unwrap_or(0) == 0 {
                info!(volume = %record.volume_id, "recorded volume is no longer mounted; forgetting it");
                let staging = staging_dir(&self.data_dir, &record.volume_id);
                let _ = self.mounter.unmount(&staging);
                let _ = std::fs::remove_dir(&staging);
                let _ = std::fs::remove_file(e.path());
                continue;
            }
            if let Err(e) = self.restage(&record) {
                warn!(volume = %record.volume_id, error = %e, "cannot reach the volume's files to keep them current");
                continue;
            }
            info!(volume = %record.volume_id, pod = %format!("{}/{}", record.pod.namespace, record.pod.name), "resuming a files-mode volume");
            self.start(record, None);
            resumed += 1;
        }
        resumed
    }

    /// Makes sure a resumed volume's staging tmpfs is mounted. It is not when sigil-csi's
    /// data directory lost its mounts (a data directory without mount propagation), or
    /// when the volume was published by a version that mounted the tmpfs on the target
    /// itself: then the target's tmpfs is bind-mounted writable on the staging directory,
    /// and the target is made read-only.
    fn restage(&self, record: &VolumeRecord) -> std::io::Result<()> {
        let staging = staging_dir(&self.data_dir, &record.volume_id);
        if self.mounter.mount_count(&staging)? > 0 {
            return Ok(());
        }
        std::fs::create_dir_all(&staging)?;
        self.mounter.bind_writable(&record.target_path, &staging)?;
        self.mounter.remount_read_only(&record.target_path)?;
        info!(volume = %record.volume_id, "the volume's tmpfs is staged again in the data directory");
        Ok(())
    }

    /// Stops keeping a volume current, unmounts it and forgets it. Missing is fine.
    pub fn unpublish(&self, volume_id: &str, target: &Path) -> Result<(), Status> {
        if let Some(r) = self
            .running
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(volume_id)
        {
            r.cancel.cancel();
        }
        self.mounter
            .unmount(target)
            .map_err(|e| Status::internal(format!("unmounting {}: {e}", target.display())))?;
        match std::fs::remove_dir(target) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                return Err(Status::internal(format!(
                    "removing {}: {e}",
                    target.display()
                )));
            }
        }
        let staging = staging_dir(&self.data_dir, volume_id);
        self.mounter
            .unmount(&staging)
            .map_err(|e| Status::internal(format!("unmounting {}: {e}", staging.display())))?;
        match std::fs::remove_dir(&staging) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                return Err(Status::internal(format!(
                    "removing {}: {e}",
                    staging.display()
                )));
            }
        }
        let _ = std::fs::remove_file(record_file(&self.data_dir, volume_id));
        Ok(())
    }

    /// Stops every task (process shutdown); mounts and records stay for the next start.
    pub fn stop_all(&self) {
        for (_, r) in self
            .running
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .drain()
        {
            r.cancel.cancel();
        }
    }

    fn start(self: &Arc<Self>, record: VolumeRecord, streams: Option<Streams>) {
        let (tx, rx) = watch::channel(record.clone());
        let cancel = CancellationToken::new();
        if let Some(old) = self
            .running
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(
                record.volume_id.clone(),
                Running {
                    record: tx,
                    cancel: cancel.clone(),
                },
            )
        {
            old.cancel.cancel();
        }
        tokio::spawn(keep_current(self.clone(), rx, streams, cancel));
    }

    /// Opens both streams, waits for the first messages, writes the first generation.
    async fn open_and_write(&self, record: &VolumeRecord) -> Result<Streams, Status> {
        let mut x509 = self
            .broker
            .subscribe_x509(&record.pod, &record.token)
            .await?;
        let mut jwt_bundles = self
            .broker
            .subscribe_jwt_bundles(&record.pod, &record.token)
            .await?;
        let first_x509 = x509
            .message()
            .await?
            .ok_or_else(|| Status::unavailable("the agent closed the X509-SVID stream"))?;
        let first_jwt_bundles = jwt_bundles
            .message()
            .await?
            .ok_or_else(|| Status::unavailable("the agent closed the JWT bundle stream"))?
            .bundles;
        let mut material = Material {
            x509: Some(first_x509),
            jwt_bundles: first_jwt_bundles,
            jwts: BTreeMap::new(),
        };
        self.refresh_jwts(record, &mut material, SystemTime::now())
            .await?;
        write(&self.data_dir, record, &material)?;
        Ok(Streams {
            x509,
            jwt_bundles,
            material,
        })
    }

    async fn refresh_jwts(
        &self,
        record: &VolumeRecord,
        m: &mut Material,
        now: SystemTime,
    ) -> Result<bool, Status> {
        let mut changed = false;
        for audience in &record.options.jwt_audiences {
            let due = m.jwts.get(audience).is_none_or(|(_, issued, exp)| {
                now >= *issued + exp.duration_since(*issued).unwrap_or_default() / 2
            });
            if !due {
                continue;
            }
            let wanted = record.options.spiffe_id.clone().unwrap_or_default();
            let svids = self
                .broker
                .fetch_jwt(
                    &record.pod,
                    &record.token,
                    std::slice::from_ref(audience),
                    &wanted,
                )
                .await?;
            let token = svids
                .into_iter()
                .next()
                .ok_or_else(|| Status::not_found(format!("no JWT-SVID for audience {audience}")))?
                .svid;
            let exp = sigil_identity::jwt::peek(&token)
                .ok()
                .and_then(|(_, claims)| claims.get("exp").and_then(serde_json::Value::as_u64))
                .map_or(now + Duration::from_secs(300), |e| {
                    UNIX_EPOCH + Duration::from_secs(e)
                });
            m.jwts.insert(audience.clone(), (token, now, exp));
            changed = true;
        }
        Ok(changed)
    }
}

struct Streams {
    x509: tonic::Streaming<pb::SubscribeToX509svidResponse>,
    jwt_bundles: tonic::Streaming<pb::SubscribeToJwtBundlesResponse>,
    material: Material,
}

/// The per-volume task.
async fn keep_current(
    vols: Arc<FilesVolumes>,
    mut record: watch::Receiver<VolumeRecord>,
    mut streams: Option<Streams>,
    cancel: CancellationToken,
) {
    let mut backoff = Duration::from_millis(500);
    let mut material = Material::default();
    loop {
        let current = record.borrow_and_update().clone();
        let mut s = match streams.take() {
            Some(s) => s,
            None => match vols.open_and_write(&current).await {
                Ok(s) => {
                    backoff = Duration::from_millis(500);
                    s
                }
                Err(status) => {
                    warn!(volume = %current.volume_id, code = ?status.code(), message = status.message(), retry_in = ?backoff, "cannot reach the pod's identity; the files keep their current content");
                    tokio::select! {
                        () = cancel.cancelled() => return,
                        () = tokio::time::sleep(backoff) => {}
                        _ = record.changed() => {}
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(30));
                    continue;
                }
            },
        };
        material = std::mem::take(&mut s.material).merge_from(material);
        loop {
            let next_jwt = material
                .jwts
                .values()
                .map(|(_, issued, exp)| {
                    *issued + exp.duration_since(*issued).unwrap_or_default() / 2
                })
                .min()
                .and_then(|t| t.duration_since(SystemTime::now()).ok())
                .unwrap_or(Duration::from_secs(3600));
            let outcome: Result<bool, Status> = tokio::select! {
                () = cancel.cancelled() => return,
                m = s.x509.next() => match m {
                    Some(Ok(m)) => { material.x509 = Some(m); Ok(true) }
                    Some(Err(e)) => Err(e),
                    None => Err(Status::unavailable("X509-SVID stream ended")),
                },
                m = s.jwt_bundles.next() => match m {
                    Some(Ok(m)) => { material.jwt_bundles = m.bundles; Ok(true) }
                    Some(Err(e)) => Err(e),
                    None => Err(Status::unavailable("JWT bundle stream ended")),
                },
                () = tokio::time::sleep(next_jwt) => {
                    let current = record.borrow().clone();
                    vols.refresh_jwts(&current, &mut material, SystemTime::now()).await
                },
                _ = record.changed() => Ok(false),
            };
            match outcome {
                Ok(true) => {
                    let current = record.borrow().clone();
                    if let Err(e) = write(&vols.data_dir, &current, &material) {
                        warn!(volume = %current.volume_id, error = %e.message(), "writing identity files failed");
                    }
                }
                Ok(false) => {}
                Err(status) => {
                    warn!(volume = %current.volume_id, code = ?status.code(), message = status.message(), "identity stream broke; reopening");
                    break;
                }
            }
        }
    }
}

impl Material {
    /// Keeps JWT-SVIDs fetched before a reconnect.
    fn merge_from(mut self, old: Material) -> Material {
        for (k, v) in old.jwts {
            self.jwts.entry(k).or_insert(v);
        }
        self
    }
}

/// The SPIFFE trust bundle map of grpc proposal A87: every trust domain the pod trusts
/// (its own, `own`, and the federated ones of `x509`), keyed by trust domain name, each a
/// SPIFFE bundle (JWK Set) with its X.509 authorities and, when the agent sent them, its
/// JWT authorities.
pub(crate) fn bundle_map(
    own: &TrustBundle,
    x509: &pb::SubscribeToX509svidResponse,
    jwt_bundles: &BTreeMap<String, Vec<u8>>,
) -> Result<String, Status> {
    let mut map = serde_json::Map::new();
    let mut put = |b: &TrustBundle| -> Result<(), Status> {
        let doc: serde_json::Value = serde_json::from_str(&b.to_jwks_json())
            .map_err(|e| Status::internal(format!("bundle of {}: {e}", b.trust_domain)))?;
        map.insert(b.trust_domain.name().to_owned(), doc);
        Ok(())
    };
    put(own)?;
    for (td_id, der) in &x509.federated_bundles {
        let td = TrustDomain::parse(td_id)
            .map_err(|e| Status::internal(format!("federated bundle {td_id}: {e}")))?;
        let mut b = jwt_bundles
            .get(td_id)
            .and_then(|jwks| TrustBundle::from_jwks_json(td.clone(), jwks).ok())
            .unwrap_or_else(|| TrustBundle::new(td.clone()));
        b.x509_authorities = x509::split_der_certs(der)
            .map_err(|e| Status::internal(format!("federated bundle {td_id}: {e}")))?;
        put(&b)?;
    }
    serde_json::to_string(&serde_json::json!({ "trust_domains": map }))
        .map_err(|e| Status::internal(format!("bundle map: {e}")))
}

/// The credential bundle's name in the SPIFFE filesystem delivery draft.
pub const SPIFFE_FS_CREDENTIAL_BUNDLE: &str = "credential-bundle.private-key.pem";

/// The trust bundle file of trust domain `name` in the SPIFFE filesystem delivery draft.
pub fn spiffe_fs_trust_bundle(name: &str) -> String {
    format!("{name}.spiffe-trust-bundle.pem")
}

/// Builds the files of one generation and swaps them in, in the volume's staging tmpfs.
fn write(data_dir: &Path, record: &VolumeRecord, m: &Material) -> Result<(), Status> {
    let x509 = m
        .x509
        .as_ref()
        .ok_or_else(|| Status::unavailable("no X509-SVID yet"))?;
    let svid = match &record.options.spiffe_id {
        Some(id) => x509
            .svids
            .iter()
            .find(|s| &s.spiffe_id == id)
            .ok_or_else(|| {
                Status::failed_precondition(format!(
                    "volumeAttributes.spiffeID {id} is not an identity of pod {}/{}",
                    record.pod.namespace, record.pod.name
                ))
            })?,
        None => x509
            .svids
            .first()
            .ok_or_else(|| Status::permission_denied("the pod has no identity"))?,
    };
    let chain = x509::split_der_certs(&svid.x509_svid)
        .map_err(|e| Status::internal(format!("SVID chain: {e}")))?;
    let bundle_certs = x509::split_der_certs(&svid.bundle)
        .map_err(|e| Status::internal(format!("bundle: {e}")))?;
    let td: TrustDomain = sigil_identity::SpiffeId::parse(&svid.spiffe_id)
        .map_err(|e| Status::internal(format!("SVID ID: {e}")))?
        .trust_domain()
        .clone();
    let mut bundle = m
        .jwt_bundles
        .get(&td.id_string())
        .and_then(|jwks| TrustBundle::from_jwks_json(td.clone(), jwks).ok())
        .unwrap_or_else(|| TrustBundle::new(td.clone()));
    bundle.x509_authorities = bundle_certs.clone();
    let key_pem = pem::encode(&pem::Pem::new("PRIVATE KEY", svid.x509_svid_key.clone()));
    let public = record.options.file_mode.unwrap_or(0o644);
    let secret = record.options.file_mode.unwrap_or(0o640);
    // Each layout below is the same few texts under other names: made once here.
    let chain_pem = x509::certs_to_pem(&chain);
    let bundle_pem = x509::certs_to_pem(&bundle_certs);
    let federated = x509
        .federated_bundles
        .iter()
        .map(|(td_id, der)| {
            let name = td_id.strip_prefix("spiffe://").unwrap_or(td_id);
            let certs = x509::split_der_certs(der)
                .map_err(|e| Status::internal(format!("federated bundle {td_id}: {e}")))?;
            Ok((name, x509::certs_to_pem(&certs)))
        })
        .collect::<Result<Vec<_>, Status>>()?;
    let public_file = |path: String, text: &str| FileSpec {
        path,
        content: text.as_bytes().to_vec(),
        mode: public,
    };
    let secret_file = |path: String, text: &str| FileSpec {
        path,
        content: text.as_bytes().to_vec(),
        mode: secret,
    };
    let mut files = vec![
        public_file("svid.pem".into(), &chain_pem),
        secret_file("svid_key.pem".into(), &key_pem),
        public_file("bundle.pem".into(), &bundle_pem),
        public_file("bundle.spiffe".into(), &bundle.to_jwks_json()),
    ];
    for (name, pem) in &federated {
        files.push(public_file(format!("federated/{name}.pem"), pem));
    }
    let credential_bundle = format!("{key_pem}{chain_pem}");
    for format in &record.options.formats {
        match format {
            Format::Istio => files.extend([
                public_file("cert-chain.pem".into(), &chain_pem),
                secret_file("key.pem".into(), &key_pem),
                public_file("root-cert.pem".into(), &bundle_pem),
            ]),
            Format::Grpc => files.push(public_file(
                "spiffe-bundle-map.json".into(),
                &bundle_map(&bundle, x509, &m.jwt_bundles)?,
            )),
            Format::CredentialBundle => files.push(secret_file(
                "credential-bundle.pem".into(),
                &credential_bundle,
            )),
            Format::SpiffeFs => {
                files.push(secret_file(
                    SPIFFE_FS_CREDENTIAL_BUNDLE.into(),
                    &credential_bundle,
                ));
                files.push(public_file(spiffe_fs_trust_bundle(td.name()), &bundle_pem));
                for (name, pem) in &federated {
                    files.push(public_file(spiffe_fs_trust_bundle(name), pem));
                }
            }
        }
    }
    for (audience, (token, ..)) in &m.jwts {
        files.push(secret_file(audience_file(audience), token));
    }
    let staging = staging_dir(data_dir, &record.volume_id);
    write_generation(&staging, &files, record.options.fs_group).map_err(|e| {
        Status::internal(format!(
            "writing identity files for {} into {}: {e}",
            record.target_path.display(),
            staging.display()
        ))
    })?;
    Ok(())
}
