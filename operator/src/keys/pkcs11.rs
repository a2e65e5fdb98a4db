//! The PKCS#11 key manager: CA and JWT keys generated in a token, never exported.
//!
//! Every key pair is generated in the token (`C_GenerateKeyPair`) with the private half
//! `CKA_TOKEN`, `CKA_PRIVATE`, `CKA_SENSITIVE` and not `CKA_EXTRACTABLE`, so nothing can
//! read it out, this process included. Both halves share a random 16-byte `CKA_ID`; its
//! hex is the [`KeyReference`] the CA Secret holds. The public half is read once (to
//! build the SubjectPublicKeyInfo); signing is `C_Sign` in the token: `CKM_ECDSA` over a
//! SHA-256/384 digest made here, `CKM_SHA256_RSA_PKCS` and `CKM_SHA256_RSA_PKCS_PSS` over
//! the whole message.
//!
//! Sessions are pooled: a signature borrows an idle logged-in session (or opens one), so
//! signatures from several threads run side by side where the token allows it. A session
//! the token closed (a restarted HSM, a network HSM's dropped connection) is thrown away
//! and the operation retried once on a fresh, logged-in one.

use std::path::Path;
use std::sync::{Arc, Mutex};

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::error::{Error as CkError, RvError};
use cryptoki::mechanism::rsa::{PkcsMgfType, PkcsPssParams};
use cryptoki::mechanism::{Mechanism, MechanismType};
use cryptoki::object::{Attribute, AttributeType, KeyType as CkKeyType, ObjectClass, ObjectHandle};
use cryptoki::session::{Session, UserType};
use cryptoki::slot::Slot;
use cryptoki::types::AuthPin;
use sha2::Digest;
use sigil_identity::key_manager::{
    AuthorityKey, ExternalAuthorityKey, ExternalKey, KeyManager, KeyReference, SignScheme, ec_spki,
    rsa_spki,
};
use sigil_identity::keys::{KeyError, KeyType};

/// [`KeyReference::manager`] of this key manager's keys.
pub const NAME: &str = "pkcs11";

/// DER OIDs of the curves (`CKA_EC_PARAMS`).
const P256_OID: &[u8] = &[0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];
const P384_OID: &[u8] = &[0x06, 0x05, 0x2b, 0x81, 0x04, 0x00, 0x22];

/// Idle sessions kept open for reuse.
const POOL: usize = 8;

/// Keys in one PKCS#11 token.
pub struct Pkcs11Keys {
    inner: Arc<Token>,
}

impl std::fmt::Debug for Pkcs11Keys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Pkcs11Keys(token {:?})", self.inner.label)
    }
}

struct Token {
    context: Pkcs11,
    slot: Slot,
    label: String,
    pin: AuthPin,
    idle: Mutex<Vec<Session>>,
}

/// A PKCS#11 error as its function and return value (`Login: PinIncorrect`), without the
/// standard's paragraph-long descriptions.
fn describe(e: &CkError) -> String {
    match e {
        CkError::Pkcs11(rv, function) => format!("{function:?}: {rv:?}"),
        e => e.to_string(),
    }
}

fn unavailable(what: impl std::fmt::Display) -> KeyError {
    KeyError::Unavailable(what.to_string())
}

/// Whether a failure means the session (not the request) is gone: retry on a new one.
fn session_lost(e: &CkError) -> bool {
    matches!(
        e,
        CkError::Pkcs11(
            RvError::SessionHandleInvalid
                | RvError::SessionClosed
                | RvError::DeviceRemoved
                | RvError::TokenNotPresent
                | RvError::UserNotLoggedIn
                | RvError::DeviceError,
            _
        )
    )
}

impl Pkcs11Keys {
    /// Loads `module`, finds the token labelled `label` and logs in with `pin`. Every
    /// error says which flag to look at.
    pub fn open(module: &Path, label: &str, pin: String) -> anyhow::Result<Self> {
        let context = Pkcs11::new(module).map_err(|e| {
            anyhow::anyhow!(
                "cannot load the PKCS#11 module {} (--pkcs11-module): {}",
                module.display(),
                describe(&e)
            )
        })?;
        match context.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)) {
            Ok(()) | Err(CkError::Pkcs11(RvError::CryptokiAlreadyInitialized, _)) => {}
            Err(e) => anyhow::bail!(
                "the PKCS#11 module {} (--pkcs11-module) did not initialise: {}",
                module.display(),
                describe(&e)
            ),
        }
        let slots = context.get_slots_with_token().map_err(|e| {
            anyhow::anyhow!(
                "the PKCS#11 module {} cannot list its tokens: {}",
                module.display(),
                describe(&e)
            )
        })?;
        let mut seen = Vec::new();
        let mut found = None;
        for slot in slots {
            let Ok(info) = context.get_token_info(slot) else {
                continue;
            };
            let l = info.label().trim_end().to_owned();
            if l == label {
                found = Some(slot);
                break;
            }
            seen.push(l);
        }
        let Some(slot) = found else {
            anyhow::bail!(
                "the PKCS#11 module {} has no token labelled {label:?} (--pkcs11-token-label); tokens present: {}",
                module.display(),
                if seen.is_empty() {
                    "none (initialise one, e.g. softhsm2-util --init-token)".to_owned()
                } else {
                    format!("{seen:?}")
                }
            );
        };
        let token = Token {
            context,
            slot,
            label: label.to_owned(),
            pin: AuthPin::from(pin),
            idle: Mutex::new(Vec::new()),
        };
        // Log in now, so a wrong PIN stops the operator at start with a reason.
        let session = token.open_session().map_err(|e| {
            anyhow::anyhow!(
                "cannot log in to PKCS#11 token {label:?}: {e} (check --pkcs11-pin-file)"
            )
        })?;
        token.give_back(session);
        Ok(Self {
            inner: Arc::new(token),
        })
    }
}

impl Token {
    fn open_session(&self) -> Result<Session, String> {
        let session = self
            .context
            .open_rw_session(self.slot)
            .map_err(|e| describe(&e))?;
        match session.login(UserType::User, Some(&self.pin)) {
            Ok(()) | Err(CkError::Pkcs11(RvError::UserAlreadyLoggedIn, _)) => Ok(session),
            Err(e) => Err(describe(&e)),
        }
    }

    fn give_back(&self, session: Session) {
        if let Ok(mut idle) = self.idle.lock()
            && idle.len() < POOL
        {
            idle.push(session);
        }
    }

    /// Runs `op` on a logged-in session; once more on a fresh one if the session was lost.
    fn with_session<T>(
        &self,
        what: &str,
        op: impl Fn(&Session) -> Result<T, CkError>,
    ) -> Result<T, KeyError> {
        let reused = self.idle.lock().ok().and_then(|mut idle| idle.pop());
        let first = match reused {
            Some(s) => s,
            None => self
                .open_session()
                .map_err(|e| unavailable(format!("PKCS#11 token {:?}: {e}", self.label)))?,
        };
        match op(&first) {
            Ok(v) => {
                self.give_back(first);
                Ok(v)
            }
            Err(e) if session_lost(&e) => {
                drop(first);
                if let Ok(mut idle) = self.idle.lock() {
                    idle.clear();
                }
                let fresh = self.open_session().map_err(|e| {
                    unavailable(format!(
                        "PKCS#11 token {:?} is unreachable: {e}",
                        self.label
                    ))
                })?;
                let v = op(&fresh).map_err(|e| {
                    unavailable(format!(
                        "PKCS#11 token {:?}: {what}: {}",
                        self.label,
                        describe(&e)
                    ))
                })?;
                self.give_back(fresh);
                Ok(v)
            }
            Err(e) => {
                self.give_back(first);
                Err(unavailable(format!(
                    "PKCS#11 token {:?}: {what}: {}",
                    self.label,
                    describe(&e)
                )))
            }
        }
    }
}

/// One key pair in the token.
struct Pkcs11Key {
    token: Arc<Token>,
    id: Vec<u8>,
    reference: KeyReference,
    key_type: KeyType,
    spki: Vec<u8>,
    /// The private half's handle, found once (a lookup per signature halved the signing
    /// rate): a token object's handle is valid in every session of this process until the
    /// object is destroyed. Sigil destroys a key only after its generation expired, when
    /// nothing signs with it any more; a key deleted behind Sigil's back shows as an
    /// invalid handle, and is looked up again.
    handle: Mutex<Option<ObjectHandle>>,
}

impl Pkcs11Key {
    /// The private half's handle, if the token still holds it.
    fn private_handle(&self, session: &Session) -> Result<Option<ObjectHandle>, CkError> {
        if let Some(h) = self.handle.lock().ok().and_then(|h| *h) {
            return Ok(Some(h));
        }
        let found = session
            .find_objects(&[
                Attribute::Class(ObjectClass::PRIVATE_KEY),
                Attribute::Id(self.id.clone()),
            ])?
            .into_iter()
            .next();
        if let Ok(mut h) = self.handle.lock() {
            *h = found;
        }
        Ok(found)
    }

    /// Signs with the private half; a cached handle the token no longer knows is looked
    /// up again once.
    fn sign_in(
        &self,
        session: &Session,
        mechanism: &Mechanism,
        input: &[u8],
    ) -> Result<Option<Vec<u8>>, CkError> {
        let Some(key) = self.private_handle(session)? else {
            return Ok(None);
        };
        match session.sign(mechanism, key, input) {
            Err(CkError::Pkcs11(RvError::KeyHandleInvalid | RvError::ObjectHandleInvalid, _)) => {
                if let Ok(mut h) = self.handle.lock() {
                    *h = None;
                }
                match self.private_handle(session)? {
                    Some(key) => session.sign(mechanism, key, input).map(Some),
                    None => Ok(None),
                }
            }
            signed => signed.map(Some),
        }
    }
}

impl ExternalKey for Pkcs11Key {
    fn key_type(&self) -> KeyType {
        self.key_type
    }

    fn public_key_der(&self) -> &[u8] {
        &self.spki
    }

    fn sign(&self, scheme: SignScheme, message: &[u8]) -> Result<Vec<u8>, KeyError> {
        let (mechanism, input) = match scheme {
            SignScheme::EcdsaP256Sha256 => {
                (Mechanism::Ecdsa, sha2::Sha256::digest(message).to_vec())
            }
            SignScheme::EcdsaP384Sha384 => {
                (Mechanism::Ecdsa, sha2::Sha384::digest(message).to_vec())
            }
            SignScheme::RsaPkcs1Sha256 => (Mechanism::Sha256RsaPkcs, message.to_vec()),
            SignScheme::RsaPssSha256 => (
                Mechanism::Sha256RsaPkcsPss(PkcsPssParams {
                    hash_alg: MechanismType::SHA256,
                    mgf: PkcsMgfType::MGF1_SHA256,
                    s_len: 32.into(),
                }),
                message.to_vec(),
            ),
            other => {
                return Err(unavailable(format!(
                    "key {}: signature scheme {other:?} is not supported",
                    self.reference
                )));
            }
        };
        self.token
            .with_session(&format!("signing with key {}", self.reference), |s| {
                self.sign_in(s, &mechanism, &input)
            })?
            .ok_or_else(|| {
                unavailable(format!(
                    "key {} is no longer in PKCS#11 token {:?}",
                    self.reference, self.token.label
                ))
            })
    }

    fn reference(&self) -> &KeyReference {
        &self.reference
    }
}

impl Pkcs11Keys {
    fn key(&self, id: Vec<u8>, key_type: KeyType, spki: Vec<u8>) -> Result<AuthorityKey, KeyError> {
        let key = Pkcs11Key {
            token: self.inner.clone(),
            reference: KeyReference {
                manager: NAME.to_owned(),
                id: hex::encode(&id),
            },
            id,
            key_type,
            spki,
            handle: Mutex::new(None),
        };
        Ok(AuthorityKey::External(ExternalAuthorityKey::new(
            Arc::new(key),
        )?))
    }

    /// The key type and SubjectPublicKeyInfo of the public object `handle`.
    fn public_parts(
        session: &Session,
        handle: ObjectHandle,
    ) -> Result<(KeyType, Vec<u8>), KeyError> {
        let attrs = session
            .get_attributes(
                handle,
                &[
                    AttributeType::KeyType,
                    AttributeType::EcParams,
                    AttributeType::EcPoint,
                    AttributeType::Modulus,
                    AttributeType::PublicExponent,
                ],
            )
            .map_err(|e| unavailable(format!("reading a public key: {}", describe(&e))))?;
        let (mut kind, mut params, mut point, mut modulus, mut exponent) =
            (None, None, None, None, None);
        for a in attrs {
            match a {
                Attribute::KeyType(k) => kind = Some(k),
                Attribute::EcParams(p) => params = Some(p),
                Attribute::EcPoint(p) => point = Some(p),
                Attribute::Modulus(m) => modulus = Some(m),
                Attribute::PublicExponent(e) => exponent = Some(e),
                _ => {}
            }
        }
        match (kind, params, point, modulus, exponent) {
            (Some(k), Some(params), Some(point), _, _) if k == CkKeyType::EC => {
                let key_type = match params.as_slice() {
                    P256_OID => KeyType::EcP256,
                    P384_OID => KeyType::EcP384,
                    _ => {
                        return Err(unavailable(
                            "an EC key on a curve other than P-256 or P-384",
                        ));
                    }
                };
                let point = unwrap_octet_string(&point);
                Ok((key_type, ec_spki(key_type, point)?))
            }
            (Some(k), _, _, Some(n), Some(e)) if k == CkKeyType::RSA => {
                let spki = rsa_spki(&n, &e)?;
                let bits = n.iter().skip_while(|b| **b == 0).count() * 8;
                let key_type = match bits {
                    2048 => KeyType::Rsa2048,
                    3072 => KeyType::Rsa3072,
                    4096 => KeyType::Rsa4096,
                    _ => KeyType::Rsa,
                };
                Ok((key_type, spki))
            }
            _ => Err(unavailable(
                "a public key object that is neither EC nor RSA",
            )),
        }
    }
}

/// `CKA_EC_POINT` is a DER OCTET STRING holding the point in most tokens (SoftHSM2
/// included); some return the bare point.
fn unwrap_octet_string(v: &[u8]) -> &[u8] {
    match v {
        [0x04, len, rest @ ..] if usize::from(*len) == rest.len() && *len < 0x80 => rest,
        [0x04, 0x81, len, rest @ ..] if usize::from(*len) == rest.len() => rest,
        _ => v,
    }
}

impl KeyManager for Pkcs11Keys {
    fn name(&self) -> &str {
        NAME
    }

    fn generate(&self, key_type: KeyType, label: &str) -> Result<AuthorityKey, KeyError> {
        let mut id = vec![0u8; 16];
        rand_core::RngCore::fill_bytes(&mut rand_core::OsRng, &mut id);
        let common = |extra: Vec<Attribute>| {
            let mut v = vec![
                Attribute::Token(true),
                Attribute::Id(id.clone()),
                Attribute::Label(label.as_bytes().to_vec()),
            ];
            v.extend(extra);
            v
        };
        let private = common(vec![
            Attribute::Private(true),
            Attribute::Sensitive(true),
            Attribute::Extractable(false),
            Attribute::Sign(true),
        ]);
        let (mechanism, public) = match key_type {
            KeyType::EcP256 | KeyType::EcP384 => (
                Mechanism::EccKeyPairGen,
                common(vec![
                    Attribute::Verify(true),
                    Attribute::EcParams(
                        if key_type == KeyType::EcP256 {
                            P256_OID
                        } else {
                            P384_OID
                        }
                        .to_vec(),
                    ),
                ]),
            ),
            t if t.rsa_bits().is_some() => (
                Mechanism::RsaPkcsKeyPairGen,
                common(vec![
                    Attribute::Verify(true),
                    Attribute::ModulusBits((t.rsa_bits().unwrap_or(2048) as u64).into()),
                    Attribute::PublicExponent(vec![0x01, 0x00, 0x01]),
                ]),
            ),
            other => {
                return Err(KeyError::Generate(
                    other,
                    "the pkcs11 key manager makes ECDSA-P256, ECDSA-P384, RSA-2048, RSA-3072 and RSA-4096 keys".into(),
                ));
            }
        };
        let (key_type, spki) = self.inner.with_session("generating a key pair", |s| {
            let (public, _private) = s.generate_key_pair(&mechanism, &public, &private)?;
            Ok(Self::public_parts(s, public))
        })??;
        self.key(id, key_type, spki)
    }

    fn load(&self, reference: &KeyReference) -> Result<AuthorityKey, KeyError> {
        if reference.manager != NAME {
            return Err(unavailable(format!(
                "key {reference} is held by key manager {:?}, not pkcs11: start the operator with --key-manager {}",
                reference.manager, reference.manager
            )));
        }
        let id = hex::decode(&reference.id)
            .map_err(|_| unavailable(format!("key {reference}: the ID is not hex")))?;
        let found = self.inner.with_session("finding a key", |s| {
            let private = s.find_objects(&[
                Attribute::Class(ObjectClass::PRIVATE_KEY),
                Attribute::Id(id.clone()),
            ])?;
            let public = s.find_objects(&[
                Attribute::Class(ObjectClass::PUBLIC_KEY),
                Attribute::Id(id.clone()),
            ])?;
            Ok(match (private.len(), public.first()) {
                (1, Some(p)) => Some(Self::public_parts(s, *p)),
                _ => None,
            })
        })?;
        let Some(parts) = found else {
            return Err(unavailable(format!(
                "key {reference} is not in PKCS#11 token {:?} (the CA Secret names a key this token does not hold: is --pkcs11-token-label the token both replicas share, and was the key deleted?)",
                self.inner.label
            )));
        };
        let (key_type, spki) = parts?;
        self.key(id, key_type, spki)
    }

    fn destroy(&self, reference: &KeyReference) -> Result<(), KeyError> {
        if reference.manager != NAME {
            return Ok(());
        }
        let Ok(id) = hex::decode(&reference.id) else {
            return Ok(());
        };
        self.inner
            .with_session(&format!("destroying key {reference}"), |s| {
                for handle in s.find_objects(&[Attribute::Id(id.clone())])? {
                    s.destroy_object(handle)?;
                }
                Ok(())
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ec_points_are_unwrapped_from_their_octet_string_or_taken_bare() {
        let point = [4u8; 65];
        let wrapped = [&[0x04, 65][..], &point].concat();
        assert_eq!(unwrap_octet_string(&wrapped), &point);
        assert_eq!(unwrap_octet_string(&point), &point);
        let point = [4u8; 97];
        let wrapped = [&[0x04, 97][..], &point].concat();
        assert_eq!(unwrap_octet_string(&wrapped), &point);
    }
}
