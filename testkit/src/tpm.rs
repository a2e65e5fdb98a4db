//! TPM fixtures for tests: a manufacturer CA, software TPMs (swtpm) provisioned like real
//! ones (EK certificate in NV index 0x01c00002), and the pool that starts them early.
//! Used by operator/tests/tpm.rs and node-agent/tests/tpm_binary.rs.
#![allow(clippy::unwrap_used)]

use std::sync::Mutex;
use std::time::Duration;

use rsa::pkcs8::EncodePublicKey;
use rsa::{BigUint, RsaPublicKey};
use sha2::{Digest, Sha256};
use sigil_agent::node_client::{AgentSvid, NodeClient, NodeClientError};
use sigil_e2e::swtpm::Swtpm;
use sigil_operator::node_api::tpm::{ManufacturerCas, TpmConfig};
use sigil_tpm::{TpmDevice, TpmOptions};
use tss_esapi::abstraction::ek;
use tss_esapi::attributes::NvIndexAttributesBuilder;
use tss_esapi::handles::NvIndexTpmHandle;
use tss_esapi::interface_types::algorithm::AsymmetricAlgorithm;
use tss_esapi::interface_types::algorithm::HashingAlgorithm;
use tss_esapi::interface_types::resource_handles::{NvAuth, Provision};
use tss_esapi::structures::{MaxNvBuffer, NvPublicBuilder, Public};

use crate::node_api::{World, WorldOptions};

/// A [`World`] whose operator accepts TPMs certified by `ca`, answering within
/// `challenge_timeout`.
pub async fn tpm_world(prefix: &str, ca: &ManufacturerCa, challenge_timeout: Duration) -> World {
    World::start_with(
        prefix,
        WorldOptions {
            tpm: Some(TpmConfig {
                manufacturer_cas: ManufacturerCas::from_pem(&ca.pem).unwrap(),
                challenge_timeout,
                required: false,
            }),
            ..Default::default()
        },
    )
    .await
}

/// A TPM manufacturer's CA (ECDSA P-256).
pub struct ManufacturerCa {
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
    /// The CA certificate (PEM): the operator's manufacturer CA bundle.
    pub pem: String,
}

impl ManufacturerCa {
    pub fn new(name: &str) -> Self {
        Self::with(name, |_| {})
    }

    /// A CA whose certificate `customize` changes first (an attacker's: not a CA, expired).
    pub fn with(name: &str, customize: impl FnOnce(&mut rcgen::CertificateParams)) -> Self {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, format!("{name} EK Root CA"));
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        customize(&mut params);
        let cert = params.self_signed(&key).unwrap();
        Self {
            pem: cert.pem(),
            issuer: rcgen::Issuer::new(params, key),
        }
    }

    /// An EK certificate for the RSA key `spki_der` (empty subject, as TCG profiles allow).
    pub fn ek_certificate(&self, spki_der: &[u8]) -> Vec<u8> {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name = rcgen::DistinguishedName::new();
        params
            .distinguished_name
            .push(rcgen::DnType::OrganizationName, "Sigil Test TPM");
        let spki = rcgen::SubjectPublicKeyInfo::from_der(spki_der).unwrap();
        params
            .signed_by(&spki, &self.issuer)
            .unwrap()
            .der()
            .to_vec()
    }
}

/// A software TPM provisioned like a real one: its EK certificate, signed by `ca`, sits
/// in NV index 0x01c00002 where the agent reads it.
pub struct TestTpm {
    /// The TPM code the agent's helper runs (`sigil_tpm`), in this process (it holds a
    /// connection: swtpm then serves no other client).
    pub device: TpmDevice,
    /// Hex SHA-256 of the EK SubjectPublicKeyInfo (the agent ID's last segment).
    pub ek_hash: String,
    // Dropped last: the device's connection closes before swtpm is killed.
    _swtpm: Swtpm,
}

/// Every software TPM this test binary uses, started before anything connects to one.
///
/// libtss2 opens its sockets without close-on-exec, so a process forked while a TPM
/// connection is open (another swtpm, etcd, kube-apiserver) inherits it; swtpm then never
/// sees that connection close and stops serving the next one. So: all swtpm processes
/// first (here), then the control plane (each test's World), and only then connections.
pub fn swtpm() -> Swtpm {
    static POOL: std::sync::OnceLock<Mutex<Vec<Swtpm>>> = std::sync::OnceLock::new();
    POOL.get_or_init(|| Mutex::new((0..4).map(|_| Swtpm::start().unwrap()).collect()))
        .lock()
        .unwrap()
        .pop()
        .expect("the swtpm pool is sized for this file's tests: raise it")
}

/// Makes `swtpm` a manufactured TPM: creates its EK, certifies it with `ca` and stores the
/// certificate where the agent reads it. Returns the hex SHA-256 of the EK
/// SubjectPublicKeyInfo (the agent ID's last segment) and the certificate. Holds no
/// connection afterwards.
pub async fn manufacture(ca: &ManufacturerCa, swtpm: &Swtpm) -> (String, Vec<u8>) {
    let tcti = swtpm.tcti();
    let ek_spki = tokio::task::spawn_blocking({
        let tcti = tcti.clone();
        move || {
            let mut ctx = tss_esapi::Context::new(tcti.parse().unwrap()).unwrap();
            let ek = ek::create_ek_object(&mut ctx, AsymmetricAlgorithm::Rsa, None).unwrap();
            let (public, _, _) = ctx.read_public(ek).unwrap();
            ctx.flush_context(ek.into()).unwrap();
            let Public::Rsa {
                parameters, unique, ..
            } = public
            else {
                panic!("EK is not RSA")
            };
            let e = match parameters.exponent().value() {
                0 => 65537,
                e => e,
            };
            RsaPublicKey::new(BigUint::from_bytes_be(unique.value()), BigUint::from(e))
                .unwrap()
                .to_public_key_der()
                .unwrap()
                .as_bytes()
                .to_vec()
        }
    })
    .await
    .unwrap();
    let cert = ca.ek_certificate(&ek_spki);
    tokio::task::spawn_blocking({
        let cert = cert.clone();
        move || write_ek_certificate(&tcti, &cert)
    })
    .await
    .unwrap();
    (hex::encode(Sha256::digest(&ek_spki)), cert)
}

impl TestTpm {
    /// `agent` attests with this TPM as the agent does through its helper: its identity,
    /// then ActivateCredential of the operator's challenge.
    pub async fn attest(
        &self,
        agent: &NodeClient,
        psat_token: Option<&str>,
    ) -> Result<AgentSvid, NodeClientError> {
        agent
            .attest_tpm_with(
                self.device.identity().clone(),
                psat_token,
                |challenge| async {
                    self.device
                        .activate_credential(challenge.credential_blob, challenge.encrypted_secret)
                        .await
                        .map_err(|e| NodeClientError::Local(e.to_string()))
                },
            )
            .await
    }

    /// [`manufacture`]s `swtpm`, then opens it as the agent does.
    pub async fn provision(ca: &ManufacturerCa, swtpm: Swtpm) -> TestTpm {
        let (ek_hash, cert) = manufacture(ca, &swtpm).await;
        let device = TpmDevice::open(TpmOptions {
            tcti: swtpm.tcti(),
            ek_certificate_file: None,
        })
        .await
        .unwrap();
        assert_eq!(
            device.identity().ek_certificate,
            cert,
            "the agent reads the certificate the manufacturer stored"
        );
        TestTpm {
            device,
            ek_hash,
            _swtpm: swtpm,
        }
    }
}

/// Flushes every transient object loaded in the TPM at `tcti`: what a resource manager
/// (`/dev/tpmrm0`) does when a connection closes, which swtpm without one does not. A test
/// that kills a TPM client calls it before the next client loads its keys.
pub fn flush_transient_objects(tcti: &str) {
    use tss_esapi::constants::CapabilityType;
    use tss_esapi::constants::tss::TPM2_TRANSIENT_FIRST;
    use tss_esapi::structures::CapabilityData;
    let mut ctx = tss_esapi::Context::new(tcti.parse().unwrap()).unwrap();
    let (data, _) = ctx
        .get_capability(CapabilityType::Handles, TPM2_TRANSIENT_FIRST, 16)
        .unwrap();
    let CapabilityData::Handles(handles) = data else {
        panic!("asked for handles, got {data:?}");
    };
    for handle in handles.into_inner() {
        let object = ctx.tr_from_tpm_public(handle).unwrap();
        ctx.flush_context(object).unwrap();
    }
}

/// Stores `cert` in the RSA-2048 EK certificate NV index, readable with the index's own
/// (empty) authorisation as TCG's profile prescribes.
fn write_ek_certificate(tcti: &str, cert: &[u8]) {
    let mut ctx = tss_esapi::Context::new(tcti.parse().unwrap()).unwrap();
    let index = NvIndexTpmHandle::new(0x01c0_0002).unwrap();
    let attributes = NvIndexAttributesBuilder::new()
        .with_owner_write(true)
        .with_owner_read(true)
        .with_auth_read(true)
        .with_no_da(true)
        .build()
        .unwrap();
    let public = NvPublicBuilder::new()
        .with_nv_index(index)
        .with_index_name_algorithm(HashingAlgorithm::Sha256)
        .with_index_attributes(attributes)
        .with_data_area_size(cert.len())
        .build()
        .unwrap();
    ctx.execute_with_nullauth_session(|ctx| {
        let handle = ctx.nv_define_space(Provision::Owner, None, public)?;
        for (i, chunk) in cert.chunks(512).enumerate() {
            ctx.nv_write(
                NvAuth::Owner,
                handle,
                MaxNvBuffer::try_from(chunk.to_vec())?,
                (i * 512) as u16,
            )?;
        }
        Ok::<_, tss_esapi::Error>(())
    })
    .unwrap();
}
