//! CA and JWT key rotation as a pure, clock-driven state machine.
//!
//! Each kind of key (X.509 CA, JWT key) is a [`Ring`] of generations:
//!
//! ```text
//!            prepare at half-life        activate after the propagation delay      drop at expiry
//!  (none) ──────────────────────► prepared ──────────────────────────► active ──► retired ──────────► (gone)
//!            published in the bundle at once   (default: ttl/6 before the old CA expires)
//! ```
//!
//! - the next generation is prepared when half of the active one's lifetime has passed (or at
//!   once when the active one no longer matches the configuration, e.g. a new upstream CA),
//!   and is published in the bundle from that moment;
//! - it is activated once it has been published for the activation delay (default a third
//!   of the active generation's lifetime, which is ttl/6 before the old one expires, as
//!   SPIRE does), or at the latest when the active one expires;
//! - a replaced generation is retired: it stays in the bundle until it expires, because
//!   SVIDs it signed are valid until then;
//! - every change of the published authorities bumps the bundle's `spiffe_sequence`.
//!
//! Nothing here reads the time, talks to Kubernetes or logs: [`AuthorityState::advance`]
//! takes `now` and a minting function, and returns what changed and when the next
//! transition is due, so the whole cycle is unit-tested with a manual clock.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use sigil_identity::bundle::JwtAuthority;
use sigil_identity::ca::{BACKDATE, CaParams, CertificateAuthority, UpstreamAuthority};
use sigil_identity::clock::{from_unix_seconds, unix_seconds};
use sigil_identity::jwt::{JwtError, JwtKey};
use sigil_identity::key_manager::KeyReference;
use sigil_identity::keys::KeyType;
use sigil_identity::{TrustBundle, TrustDomain};

use super::error::Error;
use super::policy::Policy;

/// One generation of a rotating signing key.
pub trait Generation {
    /// What the bundle publishes for it.
    type Public: Clone + PartialEq + std::fmt::Debug;
    /// Serial number (CA) or key ID (JWT).
    fn id(&self) -> &str;
    /// Start of validity.
    fn not_before(&self) -> SystemTime;
    /// End of validity.
    fn not_after(&self) -> SystemTime;
    /// The public part.
    fn public(&self) -> Self::Public;
    /// Where a key manager keeps its key (`None` for a software key).
    fn key_reference(&self) -> Option<KeyReference>;
}

/// The public part of an X.509 CA: its certificate and the anchors a bundle needs for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct X509Public {
    /// The CA certificate (DER).
    pub certificate: Vec<u8>,
    /// What the bundle must hold so SVIDs of this CA validate: the CA itself when it is a
    /// self-signed root, the upstream root(s) otherwise.
    pub trust_anchors: Vec<Vec<u8>>,
}

impl Generation for CertificateAuthority {
    type Public = X509Public;
    fn id(&self) -> &str {
        self.serial()
    }
    fn not_before(&self) -> SystemTime {
        CertificateAuthority::not_before(self)
    }
    fn not_after(&self) -> SystemTime {
        CertificateAuthority::not_after(self)
    }
    fn public(&self) -> X509Public {
        X509Public {
            certificate: self.certificate().to_vec(),
            trust_anchors: self.trust_anchors().to_vec(),
        }
    }
    fn key_reference(&self) -> Option<KeyReference> {
        self.key().reference().cloned()
    }
}

/// A JWT signing key with the start of its life (the key itself knows only its end).
#[derive(Debug)]
pub struct JwtGeneration {
    /// The key.
    pub key: Arc<JwtKey>,
    /// When it was created.
    pub not_before: SystemTime,
}

impl Generation for JwtGeneration {
    type Public = JwtAuthority;
    fn id(&self) -> &str {
        self.key.kid()
    }
    fn not_before(&self) -> SystemTime {
        self.not_before
    }
    fn not_after(&self) -> SystemTime {
        self.key.not_after()
    }
    fn public(&self) -> JwtAuthority {
        self.key.authority()
    }
    fn key_reference(&self) -> Option<KeyReference> {
        self.key.key().reference().cloned()
    }
}

/// A generation that holds its private key (active or prepared).
#[derive(Debug)]
pub struct Slot<K> {
    /// The generation.
    pub key: Arc<K>,
    /// When it was first published in the bundle.
    pub published_at: SystemTime,
}

impl<K> Clone for Slot<K> {
    fn clone(&self) -> Self {
        Self {
            key: self.key.clone(),
            published_at: self.published_at,
        }
    }
}

/// A replaced generation: only its public part is kept, until it expires.
#[derive(Debug, Clone, PartialEq)]
pub struct Retired<P> {
    /// Serial or key ID.
    pub id: String,
    /// What the bundle publishes.
    pub public: P,
    /// Start of validity (orders the bundle).
    pub not_before: SystemTime,
    /// End of validity: it leaves the bundle then.
    pub not_after: SystemTime,
    /// Where a key manager keeps its key: destroyed only once the generation leaves the
    /// state at `not_after` (a replica that has not reloaded yet may still sign with it
    /// until then).
    pub key_ref: Option<KeyReference>,
}

/// The generations of one kind of key.
#[derive(Debug)]
pub struct Ring<K: Generation> {
    /// Signs now.
    pub active: Option<Slot<K>>,
    /// Published, signs next.
    pub prepared: Option<Slot<K>>,
    /// Replaced, published until expiry.
    pub retired: Vec<Retired<K::Public>>,
}

impl<K: Generation> Default for Ring<K> {
    fn default() -> Self {
        Self {
            active: None,
            prepared: None,
            retired: Vec::new(),
        }
    }
}

impl<K: Generation> Clone for Ring<K> {
    fn clone(&self) -> Self {
        Self {
            active: self.active.clone(),
            prepared: self.prepared.clone(),
            retired: self.retired.clone(),
        }
    }
}

/// Which ring a transition happened in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyKind {
    /// The X.509 CA.
    X509,
    /// The JWT signing key.
    Jwt,
}

impl KeyKind {
    /// Label value for metrics and words for events.
    pub fn label(self) -> &'static str {
        match self {
            KeyKind::X509 => "x509",
            KeyKind::Jwt => "jwt",
        }
    }
}

/// What happened in one [`AuthorityState::advance`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Transition {
    /// A generation was created and made active at once (first CA, or the active one had
    /// expired with nothing prepared).
    Minted {
        /// Which ring.
        kind: KeyKind,
        /// Its serial / key ID.
        id: String,
    },
    /// The next generation was created and published.
    Prepared {
        /// Which ring.
        kind: KeyKind,
        /// Its serial / key ID.
        id: String,
    },
    /// The prepared generation became active.
    Activated {
        /// Which ring.
        kind: KeyKind,
        /// The new active serial / key ID.
        id: String,
        /// The replaced one, now retired.
        replaced: Option<String>,
    },
    /// A retired generation expired and left the bundle.
    Dropped {
        /// Which ring.
        kind: KeyKind,
        /// Its serial / key ID.
        id: String,
    },
    /// A prepared generation was discarded before it signed anything (the configuration
    /// changed, or it expired unused).
    Discarded {
        /// Which ring.
        kind: KeyKind,
        /// Its serial / key ID.
        id: String,
    },
}

/// When generations move on.
#[derive(Debug, Clone, Copy, Default)]
pub struct Schedule {
    /// Time a prepared generation is published before activation; `None` = a third of the
    /// active generation's lifetime.
    pub activation_delay: Option<Duration>,
}

fn lifetime<K: Generation>(k: &K) -> Duration {
    k.not_after()
        .duration_since(k.not_before())
        .unwrap_or_default()
}

impl<K: Generation> Ring<K> {
    /// When the next generation should be prepared (half of the active one's lifetime).
    pub fn prepare_at(&self) -> Option<SystemTime> {
        let active = self.active.as_ref()?;
        Some(active.key.not_before() + lifetime(&*active.key) / 2)
    }

    /// When the prepared generation becomes active.
    pub fn activate_at(&self, schedule: Schedule) -> Option<SystemTime> {
        let prepared = self.prepared.as_ref()?;
        let Some(active) = self.active.as_ref() else {
            return Some(prepared.published_at);
        };
        let delay = schedule
            .activation_delay
            .unwrap_or_else(|| lifetime(&*active.key) / 3);
        Some((prepared.published_at + delay).min(active.key.not_after()))
    }

    /// The earliest time something in this ring changes (given no configuration change).
    pub fn next_due(
        &self,
        schedule: Schedule,
        must_replace: &dyn Fn(&K) -> bool,
    ) -> Option<SystemTime> {
        let mut due: Vec<SystemTime> = self.retired.iter().map(|r| r.not_after).collect();
        if let Some(active) = &self.active {
            due.push(active.key.not_after());
            if self.prepared.is_some() {
                due.extend(self.activate_at(schedule));
            } else if must_replace(&active.key) {
                due.push(SystemTime::UNIX_EPOCH);
            } else {
                due.extend(self.prepare_at());
            }
        }
        due.into_iter().min()
    }

    /// Public parts of every published generation, oldest first (so the order does not
    /// change when roles do).
    pub fn published(&self) -> Vec<K::Public> {
        let mut all: Vec<(SystemTime, K::Public)> = self
            .retired
            .iter()
            .map(|r| (r.not_before, r.public.clone()))
            .collect();
        for slot in [&self.active, &self.prepared].into_iter().flatten() {
            all.push((slot.key.not_before(), slot.key.public()));
        }
        all.sort_by_key(|(t, _)| *t);
        all.into_iter().map(|(_, p)| p).collect()
    }

    fn retire(&mut self, slot: Slot<K>) {
        let k = &slot.key;
        self.retired.push(Retired {
            id: k.id().to_owned(),
            public: k.public(),
            not_before: k.not_before(),
            not_after: k.not_after(),
            key_ref: k.key_reference(),
        });
    }

    /// Moves the ring to where it should be at `now`. `must_replace` says whether a
    /// generation no longer fits the configuration; `mint` creates a new one. A minting
    /// error stops only the steps that need a new generation: everything already issued
    /// keeps working, and expired generations still leave.
    pub fn advance<E>(
        &mut self,
        kind: KeyKind,
        now: SystemTime,
        schedule: Schedule,
        must_replace: &dyn Fn(&K) -> bool,
        mint: &mut dyn FnMut() -> Result<K, E>,
    ) -> (Vec<Transition>, Option<E>) {
        let mut out = Vec::new();
        // An expired active generation cannot sign any more.
        if self
            .active
            .as_ref()
            .is_some_and(|a| a.key.not_after() <= now)
            && let Some(a) = self.active.take()
        {
            self.retire(a);
        }
        // Expired retired generations leave the bundle.
        self.retired.retain(|r| {
            let keep = r.not_after > now;
            if !keep {
                out.push(Transition::Dropped {
                    kind,
                    id: r.id.clone(),
                });
            }
            keep
        });
        // A prepared generation that expired or no longer fits never signed: discard it.
        if self
            .prepared
            .as_ref()
            .is_some_and(|p| p.key.not_after() <= now || must_replace(&p.key))
            && let Some(p) = self.prepared.take()
        {
            out.push(Transition::Discarded {
                kind,
                id: p.key.id().to_owned(),
            });
        }
        // Activation.
        if self.prepared.is_some()
            && (self.active.is_none() || self.activate_at(schedule).is_some_and(|t| now >= t))
        {
            let prepared = self.prepared.take();
            let old = self.active.take();
            let replaced = old.as_ref().map(|o| o.key.id().to_owned());
            if let Some(o) = old {
                self.retire(o);
            }
            if let Some(p) = prepared {
                out.push(Transition::Activated {
                    kind,
                    id: p.key.id().to_owned(),
                    replaced,
                });
                self.active = Some(p);
            }
        }
        // Nothing active: mint one that signs at once.
        if self.active.is_none() {
            match mint() {
                Ok(k) => {
                    out.push(Transition::Minted {
                        kind,
                        id: k.id().to_owned(),
                    });
                    self.active = Some(Slot {
                        key: Arc::new(k),
                        published_at: now,
                    });
                }
                Err(e) => return (out, Some(e)),
            }
        }
        // Preparation.
        let prepare_due = self.prepare_at().is_some_and(|t| now >= t)
            || self.active.as_ref().is_some_and(|a| must_replace(&a.key));
        if self.prepared.is_none() && prepare_due {
            match mint() {
                Ok(k) => {
                    out.push(Transition::Prepared {
                        kind,
                        id: k.id().to_owned(),
                    });
                    self.prepared = Some(Slot {
                        key: Arc::new(k),
                        published_at: now,
                    });
                }
                Err(e) => return (out, Some(e)),
            }
        }
        (out, None)
    }
}

/// Everything Sigil keeps for one trust domain: both rings and the bundle sequence. This
/// is what the CA Secret stores.
#[derive(Debug, Clone)]
pub struct AuthorityState {
    /// The trust domain.
    pub trust_domain: TrustDomain,
    /// `spiffe_sequence` of the current bundle.
    pub sequence: u64,
    /// `spiffe_refresh_hint` the current sequence was published with; `None` until known
    /// (a new trust domain, or a Secret written before it was kept).
    pub refresh_hint: Option<Duration>,
    /// X.509 CAs.
    pub x509: Ring<CertificateAuthority>,
    /// JWT keys.
    pub jwt: Ring<JwtGeneration>,
    /// The CSR key of a CA that an upstream is asked to sign (cert-manager), until it is
    /// signed and becomes a prepared or active CA.
    pub pending_request: Option<PendingRequest>,
}

/// A CertificateRequest sent for the next CA, and the key whose CSR it carries. The key
/// lives only here and in the CA Secret.
#[derive(Clone)]
pub struct PendingRequest {
    /// Name of the CertificateRequest (in the operator's namespace).
    pub name: String,
    /// The key the CSR was made with (software, or in the key manager).
    pub key: sigil_identity::key_manager::AuthorityKey,
    /// When it was sent.
    pub requested_at: SystemTime,
}

impl std::fmt::Debug for PendingRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PendingRequest")
            .field("name", &self.name)
            .field("requested_at", &self.requested_at)
            .finish_non_exhaustive()
    }
}

/// The result of [`AuthorityState::advance`].
#[derive(Debug, Default)]
pub struct Advance {
    /// What changed, in order.
    pub transitions: Vec<Transition>,
    /// Why the X.509 ring could not mint, if it needed to.
    pub x509_error: Option<Error>,
    /// The X.509 ring needed a new CA but the upstream CA is broken (reported by the caller).
    pub x509_blocked: bool,
    /// Why the JWT ring could not mint, if it needed to.
    pub jwt_error: Option<Error>,
    /// Whether the bundle's authorities changed (and the sequence was bumped).
    pub bundle_changed: bool,
    /// Whether only the policy's refresh hint changed the bundle (the sequence was bumped
    /// too: SPIFFE_Trust_Domain_and_Bundle.md 4.1.1, the sequence MUST change whenever the
    /// bundle's contents do).
    pub refresh_hint_changed: bool,
}

impl Advance {
    /// Whether the state must be persisted.
    pub fn changed(&self) -> bool {
        !self.transitions.is_empty() || self.refresh_hint_changed
    }
}

impl AuthorityState {
    /// A state with nothing minted yet.
    pub fn new(trust_domain: TrustDomain) -> Self {
        Self {
            trust_domain,
            sequence: 0,
            refresh_hint: None,
            x509: Ring::default(),
            jwt: Ring::default(),
            pending_request: None,
        }
    }

    /// The published bundle.
    pub fn bundle(&self, refresh_hint: Option<Duration>) -> TrustBundle {
        let mut b = TrustBundle::new(self.trust_domain.clone());
        for p in self.x509.published() {
            for anchor in p.trust_anchors {
                if !b.x509_authorities.contains(&anchor) {
                    b.x509_authorities.push(anchor);
                }
            }
        }
        b.jwt_authorities = self.jwt.published();
        b.sequence = Some(self.sequence);
        b.refresh_hint = refresh_hint;
        b
    }

    /// The active CA, if valid at `now`.
    pub fn signing_ca(&self, now: SystemTime) -> Option<&Arc<CertificateAuthority>> {
        self.x509
            .active
            .as_ref()
            .map(|s| &s.key)
            .filter(|k| k.not_after() > now)
    }

    /// The active JWT key, if valid at `now`.
    pub fn signing_jwt_key(&self, now: SystemTime) -> Option<&Arc<JwtGeneration>> {
        self.jwt
            .active
            .as_ref()
            .map(|s| &s.key)
            .filter(|k| k.not_after() > now)
    }

    /// When the next transition of either ring is due.
    pub fn next_due(
        &self,
        policy: &Policy,
        upstream: Option<&UpstreamAuthority>,
    ) -> Option<SystemTime> {
        let schedule = Schedule {
            activation_delay: policy.activation_delay,
        };
        let x509_replace = |ca: &CertificateAuthority| ca_must_be_replaced(ca, upstream);
        self.next_due_with(schedule, &x509_replace)
    }

    /// When the next transition of either ring is due, for a trust domain whose CAs are
    /// signed from a CSR ([`CaSource::Requested`]).
    pub fn next_due_requested(&self, policy: &Policy) -> Option<SystemTime> {
        let schedule = Schedule {
            activation_delay: policy.activation_delay,
        };
        self.next_due_with(schedule, &requested_ca_must_be_replaced)
    }

    fn next_due_with(
        &self,
        schedule: Schedule,
        x509_replace: &dyn Fn(&CertificateAuthority) -> bool,
    ) -> Option<SystemTime> {
        let jwt_replace = |_: &JwtGeneration| false;
        [
            self.x509.next_due(schedule, x509_replace),
            self.jwt.next_due(schedule, &jwt_replace),
        ]
        .into_iter()
        .flatten()
        .min()
    }

    /// Moves both rings to where they should be at `now`.
    ///
    /// `upstream` is the upstream CA when one is configured: `Some(Ok(..))` when it is
    /// usable, `Some(Err(..))` when it is configured but broken (then no new CA is minted,
    /// and the active one keeps signing), `None` for a self-signed root.
    pub fn advance(
        &mut self,
        now: SystemTime,
        policy: &Policy,
        upstream: Option<Result<&UpstreamAuthority, &Error>>,
    ) -> Advance {
        let source = match upstream {
            None => CaSource::SelfSigned,
            Some(u) => CaSource::Upstream(u),
        };
        self.advance_with(now, policy, source)
    }

    /// Whether advancing the X.509 ring to `now` needs a new CA (to activate at once or to
    /// prepare), for an upstream that signs asynchronously: the request is only sent
    /// when this says so. `must_replace` as in [`Ring::advance`].
    pub fn needs_new_ca(
        &self,
        now: SystemTime,
        policy: &Policy,
        must_replace: &dyn Fn(&CertificateAuthority) -> bool,
    ) -> bool {
        let schedule = Schedule {
            activation_delay: policy.activation_delay,
        };
        let mut ring = self.x509.clone();
        let mut asked = false;
        let mut mint = || -> Result<CertificateAuthority, ()> {
            asked = true;
            Err(())
        };
        let _ = ring.advance(KeyKind::X509, now, schedule, must_replace, &mut mint);
        asked
    }

    /// [`AuthorityState::advance`] with any [`CaSource`].
    pub fn advance_with(
        &mut self,
        now: SystemTime,
        policy: &Policy,
        source: CaSource<'_>,
    ) -> Advance {
        let before = self.bundle(None);
        let schedule = Schedule {
            activation_delay: policy.activation_delay,
        };
        let mut result = Advance::default();

        let (usable_upstream, upstream_broken) = match &source {
            CaSource::Upstream(Ok(u)) => (Some(*u), false),
            CaSource::Upstream(Err(_)) => (None, true),
            _ => (None, false),
        };
        let signed_by_request = matches!(source, CaSource::Requested(_));
        // Only judge "does this CA fit" against a usable configuration: a broken upstream
        // must not retire a CA that still works.
        let x509_replace = |ca: &CertificateAuthority| {
            if signed_by_request {
                requested_ca_must_be_replaced(ca)
            } else {
                !upstream_broken && ca_must_be_replaced(ca, usable_upstream)
            }
        };
        let params = CaParams {
            trust_domain: self.trust_domain.clone(),
            key_type: policy.ca_key_type,
            ttl: policy.ca_ttl,
            subject: policy.ca_subject.clone(),
        };
        let mut requested = match source {
            CaSource::Requested(ca) => ca,
            _ => None,
        };
        // `Err(None)`: blocked by the broken upstream or a request that is not signed yet,
        // which the caller reports.
        let kind = source_kind(usable_upstream, upstream_broken, signed_by_request);
        let ca_label = format!("sigil-ca:{}", self.trust_domain.name());
        let mut mint_ca = || -> Result<CertificateAuthority, Option<Error>> {
            match kind {
                SourceKind::Blocked => return Err(None),
                SourceKind::Requested => return requested.take().map(|ca| *ca).ok_or(None),
                SourceKind::SelfSigned | SourceKind::Upstream => {}
            }
            let key = policy
                .keys
                .generate(params.key_type, &ca_label)
                .map_err(|e| Some(policy.ca_error(e.into())))?;
            let made = match usable_upstream {
                Some(u) => {
                    CertificateAuthority::new_under_upstream_with(&params, u, key.clone(), now)
                }
                None => CertificateAuthority::new_self_signed_with(&params, key.clone(), now),
            };
            made.map_err(|e| {
                // The key will never be used: do not leave it in the key manager.
                if let Some(r) = key.reference() {
                    let _ = policy.keys.destroy(r);
                }
                Some(policy.ca_error(e))
            })
        };
        let (t, e) = self
            .x509
            .advance(KeyKind::X509, now, schedule, &x509_replace, &mut mint_ca);
        result.transitions.extend(t);
        result.x509_blocked = matches!(e, Some(None));
        result.x509_error = e.flatten();

        let (jwt_type, jwt_alg): (KeyType, _) = (policy.jwt_key_type, policy.jwt_alg);
        let jwt_ttl = policy.ca_ttl;
        // JWT keys get the same (whole-second, back-dated) validity a CA minted now gets,
        // so both rings reach their transitions at the same instants.
        let whole_now = from_unix_seconds(unix_seconds(now));
        let jwt_label = format!("sigil-jwt:{}", self.trust_domain.name());
        let mut mint_jwt = || -> Result<JwtGeneration, Error> {
            let key = policy
                .keys
                .generate(jwt_type, &jwt_label)
                .map_err(|e| Error::JwtKey(JwtError::Key(e.to_string())))?;
            let key = JwtKey::with_new_kid(key.clone(), Some(jwt_alg), whole_now + jwt_ttl)
                .inspect_err(|_| {
                    if let Some(r) = key.reference() {
                        let _ = policy.keys.destroy(r);
                    }
                })
                .map_err(Error::JwtKey)?;
            Ok(JwtGeneration {
                key: Arc::new(key),
                not_before: whole_now.checked_sub(BACKDATE).unwrap_or(whole_now),
            })
        };
        let (t, e) = self
            .jwt
            .advance(KeyKind::Jwt, now, schedule, &|_| false, &mut mint_jwt);
        result.transitions.extend(t);
        result.jwt_error = e;

        if !self.bundle(None).same_keys(&before) {
            self.sequence += 1;
            result.bundle_changed = true;
        } else if self.refresh_hint.is_some_and(|h| h != policy.refresh_hint) {
            self.sequence += 1;
            result.refresh_hint_changed = true;
        }
        self.refresh_hint = Some(policy.refresh_hint);
        result
    }
}

/// Where a new X.509 CA comes from in [`AuthorityState::advance_with`].
#[derive(Debug)]
pub enum CaSource<'a> {
    /// Minted here as a self-signed root.
    SelfSigned,
    /// Minted here under an upstream CA whose key Sigil holds; `Err` when that upstream
    /// is configured but broken (nothing new is minted, the active CA keeps signing).
    Upstream(Result<&'a UpstreamAuthority, &'a Error>),
    /// Signed elsewhere from Sigil's CSR (cert-manager): the CA whose request was just
    /// signed, or `None` while none is (nothing new is installed, the active CA keeps
    /// signing).
    Requested(Option<Box<CertificateAuthority>>),
}

#[derive(Clone, Copy)]
enum SourceKind {
    SelfSigned,
    Upstream,
    Blocked,
    Requested,
}

fn source_kind(usable: Option<&UpstreamAuthority>, broken: bool, requested: bool) -> SourceKind {
    match (usable, broken, requested) {
        (_, _, true) => SourceKind::Requested,
        (_, true, _) => SourceKind::Blocked,
        (Some(_), _, _) => SourceKind::Upstream,
        (None, false, false) => SourceKind::SelfSigned,
    }
}

/// Whether a CA no longer fits a configuration whose CAs are signed from a CSR: only a
/// self-signed root does (the trust domain moved to an upstream). The upstream's root is
/// known only once it signs, so a change of issuer takes effect at the next rotation.
pub fn requested_ca_must_be_replaced(ca: &CertificateAuthority) -> bool {
    ca.trust_anchors() == [ca.certificate().to_vec()]
}

/// Whether a CA no longer fits the configuration: a self-signed root when an upstream is
/// configured, an intermediate when none is, or an intermediate under another root.
pub fn ca_must_be_replaced(
    ca: &CertificateAuthority,
    upstream: Option<&UpstreamAuthority>,
) -> bool {
    let self_signed = ca.trust_anchors() == [ca.certificate().to_vec()];
    match upstream {
        None => !self_signed,
        Some(u) => self_signed || ca.trust_anchors() != u.roots(),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::collections::BTreeSet;

    use sigil_identity::ca::SvidTemplate;
    use sigil_identity::clock::{Clock, ManualClock};
    use sigil_identity::keys::PrivateKey;
    use sigil_identity::x509::validate_x509_svid;
    use sigil_identity::{BundleSet, SpiffeId};

    use super::*;
    use crate::crd::trust_domain::TrustDomainSpec;

    const HOUR: Duration = Duration::from_secs(3600);

    fn policy(extra: serde_json::Value) -> Policy {
        let mut spec = serde_json::json!({"trustDomain": "example.org"});
        if let (Some(s), Some(e)) = (spec.as_object_mut(), extra.as_object()) {
            s.extend(e.clone());
        }
        let spec: TrustDomainSpec = serde_json::from_value(spec).unwrap();
        Policy::from_spec("test", &spec).unwrap()
    }

    fn td() -> TrustDomain {
        TrustDomain::new("example.org").unwrap()
    }

    /// Drives a full CA lifecycle hour by hour for four CA lifetimes and checks the
    /// invariants the issue names, at every step.
    #[test]
    fn full_rotation_cycle_keeps_every_issued_svid_verifiable() {
        let policy = policy(serde_json::json!({}));
        let clock = ManualClock::new(SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000));
        let mut state = AuthorityState::new(td());
        let id = SpiffeId::parse("spiffe://example.org/ns/default/sa/web").unwrap();
        let key = PrivateKey::generate(KeyType::EcP256).unwrap();

        let mut issued: Vec<(sigil_identity::ca::IssuedSvid, String)> = Vec::new();
        let mut ever_published: BTreeSet<Vec<u8>> = BTreeSet::new();
        let mut signed_by: BTreeSet<String> = BTreeSet::new();
        let mut last_sequence = 0;
        let mut seen_activations = 0;
        let mut seen_drops = 0;
        let mut tokens: Vec<String> = Vec::new();

        for _hour in 0..(4 * 24) {
            let now = clock.now();
            let prev_bundle = state.bundle(None);
            let adv = state.advance(now, &policy, None);
            assert!(adv.x509_error.is_none() && adv.jwt_error.is_none());
            let bundle = state.bundle(None);
            // The sequence moves exactly when the authorities change.
            if bundle.same_keys(&prev_bundle) {
                assert_eq!(state.sequence, last_sequence);
            } else {
                assert!(state.sequence > last_sequence);
            }
            last_sequence = state.sequence;
            for t in &adv.transitions {
                match t {
                    Transition::Activated {
                        kind: KeyKind::X509,
                        id,
                        ..
                    } => {
                        seen_activations += 1;
                        // The new CA was in the bundle before it ever signed.
                        assert!(!signed_by.contains(id));
                        let ca = state.x509.active.as_ref().unwrap();
                        assert!(
                            prev_bundle
                                .x509_authorities
                                .contains(&ca.key.certificate().to_vec()),
                            "activated CA was not published before"
                        );
                    }
                    Transition::Dropped {
                        kind: KeyKind::X509,
                        id,
                    } => {
                        seen_drops += 1;
                        let cert = prev_bundle
                            .x509_authorities
                            .iter()
                            .find(|c| sigil_identity::x509::cert_summary(c).unwrap().0 == *id)
                            .unwrap();
                        // It left only after it expired.
                        assert!(sigil_identity::x509::cert_summary(cert).unwrap().2 <= now);
                    }
                    _ => {}
                }
            }
            for a in &bundle.x509_authorities {
                ever_published.insert(a.clone());
            }
            // Issue with the active CA.
            let ca = state.signing_ca(now).unwrap().clone();
            signed_by.insert(ca.serial().to_owned());
            let svid = ca
                .sign_public_key(
                    &key.public_key_der(),
                    &SvidTemplate {
                        spiffe_id: &id,
                        ttl: HOUR,
                        dns_names: &[],
                    },
                    now,
                )
                .unwrap();
            issued.push((svid, ca.serial().to_owned()));
            // Every SVID issued so far that is still valid verifies against the bundle.
            for (svid, serial) in &issued {
                if svid.not_after > now {
                    validate_x509_svid(&svid.chain(), &bundle, now)
                        .unwrap_or_else(|e| panic!("SVID of CA {serial} no longer verifies: {e}"));
                }
            }
            // Same for JWT-SVIDs.
            let jwt = state.signing_jwt_key(now).unwrap();
            tokens.push(
                jwt.key
                    .mint(&id, &["aud".into()], Duration::from_secs(300), now, None)
                    .unwrap(),
            );
            let mut set = BundleSet::new();
            set.insert(bundle.clone()).unwrap();
            let token = tokens.last().unwrap();
            sigil_identity::jwt::validate_jwt_svid(
                token,
                &set,
                "aud",
                now + Duration::from_secs(1),
            )
            .unwrap();
            clock.advance(HOUR);
        }
        assert!(seen_activations >= 3, "activations: {seen_activations}");
        assert!(seen_drops >= 2, "drops: {seen_drops}");
        assert!(state.x509.retired.len() <= 1);
    }

    /// SPIFFE_Trust_Domain_and_Bundle.md 4.1.1: the sequence MUST change whenever the
    /// contents of the bundle are updated, `spiffe_refresh_hint` included.
    ///
    /// Before the fix: changing spec.bundle.refreshHint republished the bundle with the
    /// new hint under the old sequence (the test failed at "sequence bumped").
    #[test]
    fn a_changed_refresh_hint_bumps_the_sequence() {
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let mut state = AuthorityState::new(td());
        let five = policy(serde_json::json!({"bundle": {"refreshHint": "5m"}}));
        state.advance(t0, &five, None);
        let seq = state.sequence;
        let adv = state.advance(t0 + Duration::from_secs(1), &five, None);
        assert!(
            !adv.changed() && state.sequence == seq,
            "same hint, same sequence"
        );
        let ten = policy(serde_json::json!({"bundle": {"refreshHint": "10m"}}));
        let adv = state.advance(t0 + Duration::from_secs(2), &ten, None);
        assert_eq!(state.sequence, seq + 1, "sequence bumped");
        assert!(adv.changed(), "the new sequence is persisted");
        assert_eq!(
            state.bundle(Some(ten.refresh_hint)).refresh_hint,
            Some(Duration::from_secs(600))
        );
    }

    #[test]
    fn schedule_matches_spire_defaults() {
        let policy = policy(serde_json::json!({}));
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let mut state = AuthorityState::new(td());
        let adv = state.advance(t0, &policy, None);
        assert_eq!(state.sequence, 1);
        assert!(matches!(
            adv.transitions[0],
            Transition::Minted {
                kind: KeyKind::X509,
                ..
            }
        ));
        let active = state.x509.active.clone().unwrap();
        let nb = active.key.not_before();
        // Next due: preparation at half-life (the CA is backdated by a few seconds).
        let due = state.next_due(&policy, None).unwrap();
        assert_eq!(
            due,
            nb + (active.key.not_after().duration_since(nb).unwrap()) / 2
        );
        // Nothing happens before then.
        assert!(
            state
                .advance(due - Duration::from_secs(1), &policy, None)
                .transitions
                .is_empty()
        );
        let adv = state.advance(due, &policy, None);
        assert!(adv.transitions.iter().any(|t| matches!(
            t,
            Transition::Prepared {
                kind: KeyKind::X509,
                ..
            }
        )));
        assert!(adv.bundle_changed);
        assert_eq!(state.sequence, 2);
        assert_eq!(state.bundle(None).x509_authorities.len(), 2);
        // Activation when ttl/6 of the old CA remains.
        let due = state.next_due(&policy, None).unwrap();
        let remaining = active.key.not_after().duration_since(due).unwrap();
        let lifetime = active.key.not_after().duration_since(nb).unwrap();
        assert_eq!(remaining.as_secs(), (lifetime / 6).as_secs());
        let adv = state.advance(due, &policy, None);
        assert!(adv.transitions.iter().any(|t| matches!(
            t,
            Transition::Activated {
                kind: KeyKind::X509,
                ..
            }
        )));
        // Activation alone does not change the bundle.
        assert!(!adv.bundle_changed);
        assert_eq!(state.sequence, 2);
        // The retired CA leaves at its expiry, not before. (The new CA reaches its own
        // half-life at about the same time, so a third CA is prepared around then.)
        let expiry = active.key.not_after();
        assert!(state.next_due(&policy, None).unwrap() <= expiry);
        let adv = state.advance(expiry - Duration::from_secs(1), &policy, None);
        assert!(
            !adv.transitions
                .iter()
                .any(|t| matches!(t, Transition::Dropped { .. }))
        );
        assert!(
            state
                .bundle(None)
                .x509_authorities
                .contains(&active.key.certificate().to_vec())
        );
        let adv = state.advance(expiry, &policy, None);
        assert!(adv.transitions.iter().any(|t| matches!(t, Transition::Dropped { kind: KeyKind::X509, id } if id == active.key.serial())));
        assert!(
            !state
                .bundle(None)
                .x509_authorities
                .contains(&active.key.certificate().to_vec())
        );
    }

    #[test]
    fn explicit_activation_delay_is_honoured() {
        let policy = policy(serde_json::json!({"ca": {"ttl": "24h", "activationDelay": "1h"}}));
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let mut state = AuthorityState::new(td());
        state.advance(t0, &policy, None);
        let prepare = state.x509.prepare_at().unwrap();
        state.advance(prepare, &policy, None);
        assert_eq!(
            state.x509.activate_at(Schedule {
                activation_delay: policy.activation_delay
            }),
            Some(prepare + HOUR)
        );
    }

    #[test]
    fn recovery_after_long_downtime_mints_a_new_active_ca() {
        let policy = policy(serde_json::json!({}));
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let mut state = AuthorityState::new(td());
        state.advance(t0, &policy, None);
        let old = state.x509.active.clone().unwrap().key.serial().to_owned();
        let adv = state.advance(t0 + 30 * HOUR, &policy, None);
        let new = state.x509.active.clone().unwrap().key.serial().to_owned();
        assert_ne!(old, new);
        assert!(
            adv.transitions
                .iter()
                .any(|t| matches!(t, Transition::Dropped { id, .. } if *id == old))
        );
        assert!(state.signing_ca(t0 + 30 * HOUR).is_some());
    }

    #[test]
    fn broken_upstream_keeps_the_active_ca_signing() {
        let policy = policy(serde_json::json!({}));
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let mut state = AuthorityState::new(td());
        state.advance(t0, &policy, None);
        let serial = state.x509.active.clone().unwrap().key.serial().to_owned();
        let broken = Error::InvalidSpec {
            object: "test".into(),
            field: "spec.upstreamAuthority".into(),
            reason: "broken".into(),
        };
        // Half-life passes with the upstream broken: no new CA, the old one still signs.
        let at = state.x509.prepare_at().unwrap() + HOUR;
        let adv = state.advance(at, &policy, Some(Err(&broken)));
        assert!(adv.x509_blocked && adv.x509_error.is_none());
        assert!(state.x509.prepared.is_none());
        assert_eq!(state.signing_ca(at).unwrap().serial(), serial);
        // JWT keys do not depend on the upstream and still rotate.
        assert!(state.jwt.prepared.is_some());
    }

    /// A CA signed by an upstream from Sigil's CSR, as cert-manager would return it.
    fn requested_ca(
        policy: &Policy,
        root: &(Vec<u8>, rcgen::Issuer<'static, rcgen::KeyPair>),
        now: SystemTime,
    ) -> CertificateAuthority {
        let params = CaParams {
            trust_domain: td(),
            key_type: KeyType::EcP256,
            ttl: policy.ca_ttl,
            subject: Default::default(),
        };
        let key: sigil_identity::key_manager::AuthorityKey =
            PrivateKey::generate(KeyType::EcP256).unwrap().into();
        let pem = CertificateAuthority::csr_pem(&params, &key, now).unwrap();
        let mut csr = rcgen::CertificateSigningRequestParams::from_pem(&pem).unwrap();
        csr.params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        csr.params.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign];
        let start = sigil_identity::clock::unix_seconds(now);
        csr.params.not_before = time::OffsetDateTime::from_unix_timestamp(start).unwrap();
        csr.params.not_after =
            time::OffsetDateTime::from_unix_timestamp(start + policy.ca_ttl.as_secs() as i64)
                .unwrap();
        let cert = csr.signed_by(&root.1).unwrap().der().to_vec();
        CertificateAuthority::from_signed_chain(td(), key, vec![cert], vec![root.0.clone()])
            .unwrap()
    }

    /// With an upstream that signs asynchronously, a new CA is asked for exactly when the
    /// rotation needs one, installed only once signed, and a request that is not signed
    /// yet never stops the active CA from signing.
    #[test]
    fn requested_cas_rotate_like_minted_ones_and_never_block_the_active_one() {
        let policy = policy(serde_json::json!({"ca": {"ttl": "6h"}}));
        let root_key = rcgen::KeyPair::generate().unwrap();
        let mut rp = rcgen::CertificateParams::default();
        rp.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        rp.distinguished_name
            .push(rcgen::DnType::CommonName, "Root");
        rp.not_before = time::OffsetDateTime::from_unix_timestamp(1_700_000_000).unwrap();
        rp.not_after = time::OffsetDateTime::from_unix_timestamp(1_900_000_000).unwrap();
        let root_der = rp.self_signed(&root_key).unwrap().der().to_vec();
        let root = (root_der.clone(), rcgen::Issuer::new(rp, root_key));
        let fits = requested_ca_must_be_replaced;
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let mut state = AuthorityState::new(td());

        // Nothing signed yet: a CA is needed, none is made up.
        assert!(state.needs_new_ca(t0, &policy, &fits));
        let adv = state.advance_with(t0, &policy, CaSource::Requested(None));
        assert!(state.x509.active.is_none() && adv.x509_error.is_none());
        assert!(
            state.jwt.active.is_some(),
            "JWT keys do not wait for the upstream"
        );

        // Signed: it becomes the active CA; the bundle publishes the upstream root.
        let first = requested_ca(&policy, &root, t0);
        let first_serial = first.serial().to_owned();
        state.advance_with(t0, &policy, CaSource::Requested(Some(Box::new(first))));
        assert_eq!(state.signing_ca(t0).unwrap().serial(), first_serial);
        assert_eq!(state.bundle(None).x509_authorities, vec![root_der.clone()]);
        assert!(!state.needs_new_ca(t0 + HOUR, &policy, &fits));
        assert_eq!(
            state.x509.prepare_at(),
            Some(t0 + 3 * HOUR),
            "the next request is due at half-life"
        );
        let due = state.next_due_requested(&policy).unwrap();
        assert!(due <= t0 + 3 * HOUR && due > t0 + 2 * HOUR, "{due:?}");

        // Half-life: the next one is needed; while it is not signed the active CA signs.
        let half = t0 + 3 * HOUR;
        assert!(state.needs_new_ca(half, &policy, &fits));
        let adv = state.advance_with(half, &policy, CaSource::Requested(None));
        assert!(adv.transitions.iter().all(|t| !matches!(
            t,
            Transition::Prepared {
                kind: KeyKind::X509,
                ..
            }
        )));
        assert_eq!(state.signing_ca(half).unwrap().serial(), first_serial);

        // Signed later: prepared, then active after the activation delay (ttl/3).
        let later = half + HOUR / 2;
        let second = requested_ca(&policy, &root, later);
        let second_serial = second.serial().to_owned();
        let adv = state.advance_with(later, &policy, CaSource::Requested(Some(Box::new(second))));
        assert!(adv.transitions.contains(&Transition::Prepared {
            kind: KeyKind::X509,
            id: second_serial.clone()
        }));
        assert!(!state.needs_new_ca(later, &policy, &fits));
        assert_eq!(state.signing_ca(later).unwrap().serial(), first_serial);
        let activation = later + 2 * HOUR;
        state.advance_with(activation, &policy, CaSource::Requested(None));
        assert_eq!(
            state.signing_ca(activation).unwrap().serial(),
            second_serial
        );

        // A self-signed CA is replaced when the trust domain moves to a requested one.
        let mut plain = AuthorityState::new(td());
        plain.advance(t0, &policy, None);
        assert!(plain.needs_new_ca(t0, &policy, &fits));
    }
}
