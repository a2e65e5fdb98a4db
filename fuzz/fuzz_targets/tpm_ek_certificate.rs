//! EK certificate handling (the agent's `ek_certificate`): `verify` never panics and
//! never trusts a certificate no configured CA signed; `describe`, which reads the key and
//! the TCG SAN attributes, never panics on any certificate x509-parser accepts.
#![no_main]
use std::sync::LazyLock;
use std::time::SystemTime;

use libfuzzer_sys::fuzz_target;
use sigil_operator::node_api::tpm::TpmError;
use sigil_operator::node_api::tpm::ek::{ManufacturerCas, describe, verify};
use x509_parser::prelude::{FromDer, X509Certificate};

/// A CA whose key no input can hold (made fresh for this process), so every input must be
/// refused as untrusted or earlier.
static CAS: LazyLock<ManufacturerCas> = LazyLock::new(|| {
    let key = rcgen::KeyPair::generate().expect("CA key");
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("CA params");
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca = params.self_signed(&key).expect("CA certificate");
    ManufacturerCas::from_pem(&ca.pem()).expect("CA bundle")
});

fuzz_target!(|data: &[u8]| {
    match verify(data, &CAS, SystemTime::now()) {
        Ok(ek) => panic!("trusted an EK certificate no configured CA signed: {ek:?}"),
        Err(
            TpmError::BadEkCertificate(_)
            | TpmError::UntrustedEkCertificate { .. }
            | TpmError::EkCertificateNotValid(_)
            | TpmError::UnsupportedEk(_),
        ) => {}
        Err(other) => panic!("unexpected refusal for an EK certificate: {other}"),
    }
    if let Ok((_, cert)) = X509Certificate::from_der(data) {
        if let Ok(ek) = describe(&cert) {
            assert_eq!(ek.spki_sha256.len(), 64);
            assert!(ek.rsa_modulus.first() != Some(&0));
        }
    }
});
