//! TPM2B_PUBLIC parser (the agent's `ek_public` and `ak_public`): never panics; an
//! accepted area keeps exactly the bytes its Name hashes and parses back to itself; and
//! MakeCredential never panics on any RSA key the parser accepts.
#![no_main]
use libfuzzer_sys::fuzz_target;
use rsa::rand_core::{CryptoRng, RngCore};
use sigil_operator::node_api::tpm::credential::make_credential;
use sigil_operator::node_api::tpm::public::{ALG_SHA256, MAX_PUBLIC_LEN, PublicKey, TpmPublic};

/// A deterministic byte stream, so a crash reproduces from its input alone. Not for keys:
/// MakeCredential's seed here only has to exist.
struct Counter(u8);

impl RngCore for Counter {
    fn next_u32(&mut self) -> u32 {
        let mut b = [0; 4];
        self.fill_bytes(&mut b);
        u32::from_le_bytes(b)
    }
    fn next_u64(&mut self) -> u64 {
        let mut b = [0; 8];
        self.fill_bytes(&mut b);
        u64::from_le_bytes(b)
    }
    fn fill_bytes(&mut self, dest: &mut [u8]) {
        for b in dest {
            self.0 = self.0.wrapping_add(1);
            *b = self.0 | 1;
        }
    }
    fn try_fill_bytes(&mut self, dest: &mut [u8]) -> Result<(), rsa::rand_core::Error> {
        self.fill_bytes(dest);
        Ok(())
    }
}

impl CryptoRng for Counter {}

fuzz_target!(|data: &[u8]| {
    let Ok(public) = TpmPublic::from_tpm2b(data) else {
        return;
    };
    // Strict: the size prefix covers every byte, and the Name hashes exactly those.
    assert_eq!(public.tpmt, &data[2..]);
    assert!(public.tpmt.len() <= MAX_PUBLIC_LEN);
    assert_eq!(TpmPublic::from_tpmt(&public.tpmt).as_ref(), Ok(&public));
    match public.name() {
        Some(name) => {
            assert_eq!(public.name_alg, ALG_SHA256);
            assert_eq!(name.len(), 2 + 32);
        }
        None => assert_ne!(public.name_alg, ALG_SHA256),
    }
    if let PublicKey::Rsa {
        exponent, modulus, ..
    } = &public.key
    {
        let name = [0u8; 34];
        if let Ok(c) = make_credential(modulus, *exponent, &name, &[7; 32], &mut Counter(0)) {
            assert!(!c.encrypted_secret.is_empty());
            // TPM2B_DIGEST integrity (2 + 32) then the encrypted TPM2B secret (2 + 32).
            assert_eq!(c.credential_blob.len(), 2 + 32 + 2 + 32);
        }
    }
});
