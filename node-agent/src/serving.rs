//! What the Workload API and the Broker API both serve, from the cache: the SVIDs and
//! bundles of a set of selectors, as streams that follow every change, and JWT-SVIDs
//! minted on demand (cached until half-life; each mint charged to the calling workload's
//! [`MintBudget`]). The two APIs differ only in how they find
//! the selectors (a kernel-attested caller, or a pod proven by its token) and in their
//! protobuf types; both are built from the Workload API's messages here.

use std::collections::{BTreeMap, BTreeSet};
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use futures::Stream;
use prometheus_client::metrics::gauge::Gauge;
use sigil_identity::entry::Selector;
use sigil_identity::proto::workload as pb;
use sigil_identity::{SpiffeId, TrustBundle};
use tokio_util::sync::CancellationToken;
use tonic::Status;
use tracing::warn;

use crate::cache::{Cache, HeldJwt, WorkloadView};
use crate::limits::{MintBudget, WorkloadKey};
use crate::node_client::NodeClient;

/// How long a caller whose entries have no SVID yet waits for the first one.
pub const FIRST_SVID_WAIT: Duration = Duration::from_secs(30);

/// A response stream.
pub type ResponseStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

/// The cache, the operator client (for JWT-SVIDs) and the drain switch.
#[derive(Debug, Clone)]
pub struct Served {
    /// What the agent holds.
    pub cache: Arc<Cache>,
    /// Where JWT-SVIDs are minted.
    pub node: Arc<NodeClient>,
    /// Ends every stream on drain.
    pub shutdown: CancellationToken,
    /// Open streams (a metric).
    pub open_streams: Gauge,
    /// JWT-SVID mints per workload.
    pub mint_budget: Arc<MintBudget>,
}

/// Where a [`Served::watch`] stream is.
enum Step<T> {
    /// The first value is still to be sent.
    First(T),
    /// A value with this digest was sent last.
    Sent([u8; 32]),
    /// Ended (an error or the drain was sent).
    Done,
}

/// What a [`Served::watch`] stream holds between values.
struct WatchStream<F> {
    served: Served,
    changes: tokio::sync::watch::Receiver<u64>,
    next: F,
    _open: OpenStream,
}

/// SHA-256 of a message's encoding: equal digests, equal messages (prost encodes a
/// message's fields in one order, and maps as ordered maps here).
fn digest<T: prost::Message>(v: &T) -> [u8; 32] {
    use sha2::Digest;
    sha2::Sha256::digest(v.encode_to_vec()).into()
}

/// Counts one open stream in the gauge for as long as it lives.
pub(crate) struct OpenStream(Gauge);

impl OpenStream {
    pub(crate) fn new(g: &Gauge) -> Self {
        g.inc();
        Self(g.clone())
    }
}

impl Drop for OpenStream {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// Why JWT-SVIDs could not be served.
#[derive(Debug)]
pub enum JwtRefusal {
    /// No audience, or an empty one.
    NoAudience,
    /// The workload has no entries.
    NoIdentity,
    /// The requested SPIFFE ID does not parse.
    BadId(String),
    /// The workload is not entitled to the requested ID.
    NotEntitled(String),
    /// The workload is over its minting budget (the reason, for the status message).
    OverBudget(String),
    /// The operator refused or is unreachable.
    Mint(Status),
}

impl Served {
    /// Waits (bounded) until every matching entry has an SVID, or until the wait runs out.
    pub async fn ready_view(&self, selectors: &BTreeSet<Selector>) -> WorkloadView {
        let mut changes = self.cache.subscribe();
        let deadline = tokio::time::Instant::now() + FIRST_SVID_WAIT;
        loop {
            changes.borrow_and_update();
            let view = self.cache.view_for(selectors);
            if view.pending.is_empty() {
                return view;
            }
            tokio::select! {
                r = changes.changed() => if r.is_err() { return view },
                () = tokio::time::sleep_until(deadline) => return view,
                () = self.shutdown.cancelled() => return view,
            }
        }
    }

    /// Streams `first`, then `next`'s result after every cache change when it differs
    /// from the last one sent; `next` returning `Ok(None)` sends nothing (keep what the
    /// client has), an error ends the stream with it.
    ///
    /// The stream is the response body itself (no task or channel per stream). Between
    /// values it holds the SHA-256 of the last one sent, not the value: a response carries
    /// SVIDs, a private key and bundles, and an agent may hold thousands of streams.
    pub fn watch<T, F>(&self, first: T, next: F) -> ResponseStream<T>
    where
        T: prost::Message + Send + 'static,
        F: FnMut(&Cache) -> Result<Option<T>, Status> + Send + 'static,
    {
        let mut changes = self.cache.subscribe();
        changes.borrow_and_update();
        let stream = WatchStream {
            served: self.clone(),
            changes,
            next,
            _open: OpenStream::new(&self.open_streams),
        };
        Box::pin(futures::stream::unfold(
            (Step::First(first), stream),
            |(step, mut s)| async move {
                let last = match step {
                    Step::First(v) => {
                        let d = digest(&v);
                        return Some((Ok(v), (Step::Sent(d), s)));
                    }
                    Step::Sent(d) => d,
                    Step::Done => return None,
                };
                loop {
                    tokio::select! {
                        r = s.changes.changed() => if r.is_err() { return None },
                        () = s.served.shutdown.cancelled() => {
                            let end = Status::unavailable("agent is shutting down; reconnect");
                            return Some((Err(end), (Step::Done, s)));
                        }
                    }
                    match (s.next)(&s.served.cache) {
                        Ok(Some(v)) => {
                            let d = digest(&v);
                            if d != last {
                                return Some((Ok(v), (Step::Sent(d), s)));
                            }
                        }
                        Ok(None) => {}
                        Err(e) => return Some((Err(e), (Step::Done, s))),
                    }
                }
            },
        ))
    }

    /// The X.509 bundles of `selectors`' workload: `view`'s at once, then after every
    /// change, until its entries are gone ([`bundles_update`]).
    pub fn x509_bundles_stream(
        &self,
        view: &WorkloadView,
        selectors: BTreeSet<Selector>,
    ) -> ResponseStream<pb::X509BundlesResponse> {
        self.watch(x509_bundles(view), move |cache| {
            bundles_update(&cache.view_for(&selectors), x509_bundles)
        })
    }

    /// The JWT bundles of `selectors`' workload, as [`Served::x509_bundles_stream`].
    pub fn jwt_bundles_stream(
        &self,
        view: &WorkloadView,
        selectors: BTreeSet<Selector>,
    ) -> ResponseStream<pb::JwtBundlesResponse> {
        self.watch(jwt_bundles(view), move |cache| {
            bundles_update(&cache.view_for(&selectors), jwt_bundles)
        })
    }

    /// JWT-SVIDs for `audience`: one per distinct SPIFFE ID of the workload's entries, or
    /// only `spiffe_id` when given. Each one not in the cache is minted at the operator and
    /// charged to `workload`'s minting budget first (after the request validated).
    pub async fn jwt_svids(
        &self,
        workload: &WorkloadKey,
        selectors: &BTreeSet<Selector>,
        audience: &[String],
        spiffe_id: &str,
    ) -> Result<Vec<pb::Jwtsvid>, JwtRefusal> {
        if audience.is_empty() || audience.iter().any(String::is_empty) {
            return Err(JwtRefusal::NoAudience);
        }
        let entries: Vec<_> = self
            .cache
            .entries()
            .into_iter()
            .filter(|e| e.matches(selectors))
            .collect();
        if entries.is_empty() {
            return Err(JwtRefusal::NoIdentity);
        }
        let wanted = if spiffe_id.is_empty() {
            None
        } else {
            Some(SpiffeId::parse(spiffe_id).map_err(|e| JwtRefusal::BadId(e.to_string()))?)
        };
        let mut seen = BTreeSet::new();
        let chosen: Vec<_> = entries
            .into_iter()
            .filter(|e| wanted.as_ref().is_none_or(|w| &e.spiffe_id == w))
            .filter(|e| seen.insert(e.spiffe_id.clone()))
            .collect();
        if chosen.is_empty() {
            return Err(JwtRefusal::NotEntitled(spiffe_id.to_owned()));
        }
        let mut audience = audience.to_vec();
        audience.sort();
        audience.dedup();
        let mut svids = Vec::with_capacity(chosen.len());
        for e in chosen {
            let now = SystemTime::now();
            let token = match self.cache.jwt(&e.id, &audience, now) {
                Some(j) => j.token,
                None => {
                    if !self.mint_budget.try_take(workload) {
                        return Err(JwtRefusal::OverBudget(self.mint_budget.refusal(workload)));
                    }
                    let (token, expires_at) =
                        self.node.mint_jwt(&e.id, &audience).await.map_err(|err| {
                            warn!(entry = %e.id, error = %err, "minting a JWT-SVID failed");
                            JwtRefusal::Mint(match err.status() {
                                Some(s) => Status::new(
                                    s.code(),
                                    format!("minting a JWT-SVID: {}", s.message()),
                                ),
                                None => Status::unavailable(format!("minting a JWT-SVID: {err}")),
                            })
                        })?;
                    self.cache.put_jwt(
                        &e.id,
                        &audience,
                        HeldJwt {
                            token: token.clone(),
                            expires_at,
                            issued_at: now,
                        },
                    );
                    token
                }
            };
            svids.push(pb::Jwtsvid {
                spiffe_id: e.spiffe_id.to_string(),
                svid: token,
                hint: e.hint.clone(),
            });
        }
        Ok(svids)
    }
}

fn td_id(b: &TrustBundle) -> String {
    b.trust_domain.id_string()
}

/// What an open X509-SVID stream does with a new view of its workload: end with an error
/// when the workload's entries are gone; send nothing while every identity is being
/// re-signed (its SPIFFE ID changed: an empty set would read as an error to clients);
/// otherwise send the view.
pub fn x509_update(view: &WorkloadView) -> Result<Option<&WorkloadView>, Status> {
    if !view.svids.is_empty() {
        Ok(Some(view))
    } else if !view.has_identity() {
        Err(Status::permission_denied(
            "no identity issued (the workload's entries were removed)",
        ))
    } else {
        Ok(None)
    }
}

/// The X509-SVIDs of a view: chains as concatenated DER, PKCS#8 keys, own bundles, and
/// federated bundles keyed by trust domain ID.
pub fn x509_response(view: &WorkloadView) -> pb::X509svidResponse {
    let own: BTreeMap<_, _> = view
        .own_bundles
        .iter()
        .map(|b| (b.trust_domain.clone(), b.x509_der_concat()))
        .collect();
    pb::X509svidResponse {
        svids: view
            .svids
            .iter()
            .map(|h| pb::X509svid {
                spiffe_id: h.entry.spiffe_id.to_string(),
                x509_svid: h.chain.concat(),
                x509_svid_key: h.key.to_pkcs8_der().to_vec(),
                bundle: own
                    .get(h.entry.spiffe_id.trust_domain())
                    .cloned()
                    .unwrap_or_default(),
                hint: h.entry.hint.clone(),
            })
            .collect(),
        crl: vec![],
        federated_bundles: view
            .federated
            .iter()
            .map(|b| (td_id(b), b.x509_der_concat()))
            .collect(),
    }
}

/// What an open bundle stream does with a new view of its workload: end with
/// PermissionDenied once the workload's entries are gone (SPIFFE_Workload_API.md 5.2.2 and
/// 6.2.2: a client not entitled to bundles gets PermissionDenied, as on FetchX509SVID),
/// otherwise send `make(view)`.
pub fn bundles_update<T>(
    view: &WorkloadView,
    make: impl FnOnce(&WorkloadView) -> T,
) -> Result<Option<T>, Status> {
    if view.has_identity() {
        Ok(Some(make(view)))
    } else {
        Err(Status::permission_denied(
            "no identity issued (the workload's entries were removed)",
        ))
    }
}

/// The refusal of a caller with no X509-SVID to serve, and its reason label (logged and
/// counted): its SVIDs all expired unrenewed (`svids_expired`, Unavailable: see
/// [`expired_refusal`]), or it has no identity (`no_identity`, PermissionDenied). The
/// Workload API, SDS and the Broker API decide it here, the one place.
pub fn no_valid_svid(view: &WorkloadView) -> (&'static str, Status) {
    if view.expired.is_empty() {
        (
            "no_identity",
            Status::permission_denied("no identity issued"),
        )
    } else {
        ("svids_expired", expired_refusal(view))
    }
}

/// The refusal of a caller whose entries' SVIDs have all expired without being renewed
/// (none being signed, none valid): Unavailable, so clients keep retrying, saying since
/// when and why. An expired SVID is never served: peers would refuse it, and a workload
/// handed one would not know its identity is gone.
pub fn expired_refusal(view: &WorkloadView) -> Status {
    let since = view.expired.iter().map(|h| h.not_after).min().map_or_else(
        || "now".to_owned(),
        |t| sigil_identity::x509::rfc3339(sigil_identity::clock::unix_seconds(t)),
    );
    Status::unavailable(format!(
        "every X509-SVID held for this workload expired (the first at {since}) and could not be renewed yet: the agent cannot reach the operator or prove its node (see the agent's log); retry"
    ))
}

fn all_bundles(view: &WorkloadView) -> impl Iterator<Item = &TrustBundle> {
    view.own_bundles.iter().chain(view.federated.iter())
}

/// Every X.509 bundle of a view (own and federated), keyed by trust domain ID.
pub fn x509_bundles(view: &WorkloadView) -> pb::X509BundlesResponse {
    pb::X509BundlesResponse {
        crl: vec![],
        bundles: all_bundles(view)
            .map(|b| (td_id(b), b.x509_der_concat()))
            .collect(),
    }
}

/// Every JWT bundle of a view, as JWK Sets holding only JWT authorities (X.509 keys have
/// no kid, and clients such as go-spiffe refuse a JWT bundle with a key lacking one).
pub fn jwt_bundles(view: &WorkloadView) -> pb::JwtBundlesResponse {
    pb::JwtBundlesResponse {
        bundles: all_bundles(view)
            .map(|b| {
                let mut jwt_only = b.clone();
                jwt_only.x509_authorities.clear();
                (td_id(b), jwt_only.to_jwks_json().into_bytes())
            })
            .collect(),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use sigil_identity::entry::RegistrationEntry;
    use sigil_identity::keys::{KeyType, PrivateKey};

    use super::*;
    use crate::cache::HeldSvid;

    fn entry() -> Arc<RegistrationEntry> {
        Arc::new(RegistrationEntry::new(
            "e1",
            SpiffeId::parse("spiffe://example.org/web").unwrap(),
            vec![Selector::new("k8s", "pod-uid:u1")],
        ))
    }

    #[test]
    fn an_x509_stream_ends_when_entries_go_and_waits_while_they_are_re_signed() {
        let now = SystemTime::now();
        let held = Arc::new(HeldSvid {
            entry: entry(),
            chain: vec![vec![1, 2, 3]],
            key: PrivateKey::generate(KeyType::EcP256).unwrap(),
            not_before: now,
            not_after: now + Duration::from_secs(3600),
            rotate_at: now + Duration::from_secs(1800),
        });
        let serving = WorkloadView {
            svids: vec![held],
            ..Default::default()
        };
        assert!(x509_update(&serving).unwrap().is_some());
        let re_signing = WorkloadView {
            pending: vec![entry()],
            ..Default::default()
        };
        assert!(x509_update(&re_signing).unwrap().is_none());
        let gone = x509_update(&WorkloadView::default()).unwrap_err();
        assert_eq!(gone.code(), tonic::Code::PermissionDenied);
        assert!(gone.message().contains("entries were removed"));
    }

    /// SPIFFE_Workload_API.md 5.2.2/6.2.2: bundle responses carry at least the bundle of
    /// the trust domain the agent resides in, and a client no longer entitled to bundles
    /// gets PermissionDenied, as FetchX509SVID's does.
    ///
    /// Before the fix: once the entries went, both streams sent a message with an empty
    /// bundle map and stayed open; and a workload whose SPIFFE ID is in another trust
    /// domain got no bundle for the agent's own.
    #[tokio::test]
    async fn bundle_streams_carry_the_own_trust_domain_and_end_when_the_entries_go() {
        use futures::StreamExt;
        use sigil_identity::TrustDomain;
        let own: TrustDomain = "example.org".parse().unwrap();
        let other: TrustDomain = "other.org".parse().unwrap();
        let cache = Cache::new();
        cache.set_own_trust_domain(own.clone());
        let selector = Selector::new("k8s", "pod-uid:u1");
        cache.replace_entries(
            vec![RegistrationEntry::new(
                "e1",
                SpiffeId::parse("spiffe://other.org/web").unwrap(),
                vec![selector.clone()],
            )],
            1,
        );
        let mut bundles = vec![];
        for td in [&own, &other] {
            let mut b = TrustBundle::new(td.clone());
            b.x509_authorities = vec![vec![1, 2, 3]];
            bundles.push(b);
        }
        cache.set_bundles(bundles, &[]);
        let node = NodeClient::unreachable(&own);
        let served = Served {
            cache: cache.clone(),
            node: Arc::new(node),
            shutdown: CancellationToken::new(),
            open_streams: Gauge::default(),
            mint_budget: Arc::new(MintBudget::new(10.0, 10.0)),
        };
        let selectors: BTreeSet<Selector> = [selector].into();
        let view = cache.view_for(&selectors);
        let mut x = served.x509_bundles_stream(&view, selectors.clone());
        let mut j = served.jwt_bundles_stream(&view, selectors.clone());
        let first = x.next().await.unwrap().unwrap();
        let keys: Vec<_> = first.bundles.keys().cloned().collect();
        assert_eq!(keys, ["spiffe://example.org", "spiffe://other.org"]);
        let first = j.next().await.unwrap().unwrap();
        assert!(
            first.bundles.contains_key("spiffe://example.org"),
            "{first:?}"
        );

        cache.replace_entries(vec![], 2);
        for (name, next) in [
            (
                "FetchX509Bundles",
                x.next().await.map(|r| r.map(|m| format!("{m:?}"))),
            ),
            (
                "FetchJWTBundles",
                j.next().await.map(|r| r.map(|m| format!("{m:?}"))),
            ),
        ] {
            match next {
                Some(Err(status)) => {
                    assert_eq!(status.code(), tonic::Code::PermissionDenied, "{name}");
                }
                other => panic!("{name} after the entries went: {other:?}"),
            }
        }
        assert!(x.next().await.is_none() && j.next().await.is_none());
    }

    #[test]
    fn equal_messages_have_equal_digests_and_a_changed_one_does_not() {
        let a = pb::X509svidResponse {
            svids: vec![pb::X509svid {
                spiffe_id: "spiffe://example.org/web".into(),
                x509_svid: vec![1, 2, 3],
                ..Default::default()
            }],
            ..Default::default()
        };
        let mut b = a.clone();
        assert_eq!(digest(&a), digest(&b));
        b.svids[0].x509_svid.push(4);
        assert_ne!(digest(&a), digest(&b));
    }
}
