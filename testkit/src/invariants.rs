//! The reliability invariants, checked continuously while a fault is injected (#27).
//!
//! An [`Invariants`] checker follows a set of targets and checks each once a second:
//! - a workload ([`Invariants::watch_workload`]): an independent client (the Rust `spiffe`
//!   crate, `rust-spiffe-client poll`) running inside the workload's pod cgroup fetches its
//!   X.509 context on a new connection every second;
//! - a files-mode volume ([`Invariants::watch_files`]): the files sigil-csi keeps in it are
//!   read as a workload reads them.
//!
//! What every check asserts, each broken rule counted as a violation of its kind:
//! - `foreign_identity`: every SVID served is one of the IDs the target is entitled to;
//! - `expired` / `not_yet_valid`: the leaf is valid now;
//! - `beyond_ttl`: the leaf lives no longer than its ClusterSPIFFEID's TTL (plus the
//!   back-dating the CA applies);
//! - `untrusted`: the chain verifies against the trust bundle served with it;
//! - `key_mismatch`: the private key is the leaf's;
//! - `file_missing`: a files-mode volume lacks `svid.pem`, `svid_key.pem` or `bundle.pem`;
//! - `probe_died`: the client stopped answering (so nothing goes unchecked silently).
//!
//! A fetch that fails is not a violation by itself (a fault may make the agent unreachable
//! for a moment): failures are counted and the longest run of consecutive failures is
//! reported, for the test to hold to its stated bound.
//!
//! This module owns only observation; it never touches the system under test.
#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use sigil_identity::keys::PrivateKey;
use sigil_identity::{TrustBundle, x509};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio_util::sync::CancellationToken;

use crate::agent::Workload;

/// How often each target is checked.
pub const INTERVAL: Duration = Duration::from_secs(1);
/// How long the probe waits for one fetch before counting it as failed.
const FETCH_TIMEOUT: Duration = Duration::from_secs(2);
/// Leeway for certificate times, which have one-second resolution.
const SLACK: Duration = Duration::from_secs(1);

/// What a target is entitled to.
#[derive(Clone, Debug)]
pub struct Expect {
    /// The SPIFFE IDs it may be served (any other is a `foreign_identity` violation).
    pub ids: BTreeSet<String>,
    /// The X509-SVID TTL of its ClusterSPIFFEID.
    pub ttl: Duration,
}

impl Expect {
    pub fn one(id: &str, ttl: Duration) -> Self {
        Self {
            ids: [id.to_owned()].into(),
            ttl,
        }
    }
}

/// One distinct leaf a target was seen holding.
#[derive(Clone, Debug)]
pub struct Leaf {
    pub sha256: String,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
    /// When the checker first saw it.
    pub first_seen: SystemTime,
}

/// What was seen of one target.
#[derive(Clone, Debug, Default)]
pub struct TargetReport {
    pub checks: u64,
    pub failed: u64,
    /// Violations of every kind counted on this target.
    pub violations: u64,
    pub longest_failure: Duration,
    /// Distinct leaves in the order they were first seen.
    pub leaves: Vec<Leaf>,
    /// X.509 authorities of its own trust domain in the bundle seen last (2 while a
    /// prepared CA is published beside the active one).
    pub x509_authorities: usize,
    /// X.509 authorities of every other trust domain (federated) in the bundles seen
    /// last, by trust domain (workloads only).
    pub federated: BTreeMap<String, usize>,
    /// Start of the run of failures in progress, if any.
    failing_since: Option<SystemTime>,
    /// The error of the last failed fetch.
    pub last_error: Option<String>,
}

impl TargetReport {
    /// Leaves first seen in `[from, to)`: the rotations that happened then.
    pub fn leaves_between(&self, from: SystemTime, to: SystemTime) -> usize {
        self.leaves
            .iter()
            .filter(|l| l.first_seen >= from && l.first_seen < to)
            .count()
    }

    /// The leaf seen last.
    pub fn current(&self) -> Option<&Leaf> {
        self.leaves.last()
    }
}

/// Everything the checker counted.
#[derive(Clone, Debug, Default)]
pub struct Report {
    pub targets: BTreeMap<String, TargetReport>,
    /// Violations by kind.
    pub violations: BTreeMap<&'static str, u64>,
    /// The first few violations, described.
    pub examples: Vec<String>,
    /// When the first violation was counted.
    pub first_violation_at: Option<SystemTime>,
    /// When the first fetch failed.
    pub first_failure_at: Option<SystemTime>,
}

impl Report {
    pub fn checks(&self) -> u64 {
        self.targets.values().map(|t| t.checks).sum()
    }

    pub fn failed(&self) -> u64 {
        self.targets.values().map(|t| t.failed).sum()
    }

    pub fn violation_count(&self) -> u64 {
        self.violations.values().sum()
    }

    /// The longest run of failed fetches of any target (one still running counts up to
    /// its last check).
    pub fn longest_failure(&self) -> Duration {
        self.targets
            .values()
            .map(|t| t.longest_failure)
            .max()
            .unwrap_or_default()
    }

    /// Panics unless every target was checked, nothing was violated and no target failed
    /// to fetch for longer than `max_failure`.
    pub fn assert_holds(&self, max_failure: Duration) {
        assert!(
            !self.targets.is_empty() && self.targets.values().all(|t| t.checks > 0),
            "every target must have been checked: {self}"
        );
        assert_eq!(self.violation_count(), 0, "invariants violated: {self}");
        assert!(
            self.longest_failure() <= max_failure,
            "a target could not fetch its SVID for {:?} (bound {max_failure:?}): {self}",
            self.longest_failure()
        );
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} checks of {} targets, {} failed fetches (longest failure {:?}), {} violations {:?}",
            self.checks(),
            self.targets.len(),
            self.failed(),
            self.longest_failure(),
            self.violation_count(),
            self.violations,
        )?;
        for e in &self.examples {
            write!(f, "\n  {e}")?;
        }
        for (name, t) in &self.targets {
            if let Some(e) = &t.last_error {
                write!(f, "\n  {name}: last error: {e}")?;
            }
        }
        Ok(())
    }
}

/// The checker: add targets, inject faults, read the [`Report`].
pub struct Invariants {
    client_bin: PathBuf,
    report: Arc<Mutex<Report>>,
    cancel: CancellationToken,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for Invariants {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

impl Invariants {
    /// `client_bin` is the path of `rust-spiffe-client` (`env!("CARGO_BIN_EXE_rust-spiffe-client")`
    /// in the e2e tests).
    pub fn new(client_bin: impl Into<PathBuf>) -> Self {
        Self {
            client_bin: client_bin.into(),
            report: Arc::default(),
            cancel: CancellationToken::new(),
            tasks: Vec::new(),
        }
    }

    /// Checks `workload` every second through the Workload API at `addr`
    /// (`unix:///...`), from inside its pod cgroup.
    pub fn watch_workload(&mut self, name: &str, workload: &Workload, addr: &str, expect: Expect) {
        let mut cmd = workload.container.command(&self.client_bin);
        cmd.args([
            "--addr",
            addr,
            "poll",
            "--interval-ms",
            &INTERVAL.as_millis().to_string(),
            "--timeout-ms",
            &FETCH_TIMEOUT.as_millis().to_string(),
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null());
        let mut child = tokio::process::Command::from(cmd)
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (name, report, cancel) = (name.to_owned(), self.report.clone(), self.cancel.clone());
        report
            .lock()
            .unwrap()
            .targets
            .insert(name.clone(), TargetReport::default());
        self.tasks.push(tokio::spawn(async move {
            let _child = child;
            let mut lines = BufReader::new(stdout).lines();
            loop {
                let next = tokio::select! {
                    _ = cancel.cancelled() => return,
                    n = tokio::time::timeout(INTERVAL + FETCH_TIMEOUT * 2, lines.next_line()) => n,
                };
                let line = match next {
                    Ok(Ok(Some(line))) => line,
                    _ => {
                        record_violation(
                            &report,
                            &name,
                            "probe_died",
                            "the client stopped answering".into(),
                        );
                        return;
                    }
                };
                let v: serde_json::Value = serde_json::from_str(&line).unwrap();
                if v["ok"] == true {
                    check_context(&report, &name, &v, &expect);
                } else {
                    record_failure(&report, &name, v["error"].as_str().unwrap_or("?"));
                }
            }
        }));
    }

    /// Checks the files-mode volume at `dir` every second, as a workload reads it.
    pub fn watch_files(&mut self, name: &str, dir: &Path, expect: Expect) {
        let (name, dir) = (name.to_owned(), dir.to_owned());
        let (report, cancel) = (self.report.clone(), self.cancel.clone());
        report
            .lock()
            .unwrap()
            .targets
            .insert(name.clone(), TargetReport::default());
        self.tasks.push(tokio::spawn(async move {
            let mut tick = tokio::time::interval(INTERVAL);
            loop {
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = tick.tick() => {}
                }
                check_files(&report, &name, &dir, &expect);
            }
        }));
    }

    /// What was counted so far.
    pub fn report(&self) -> Report {
        let mut r = self.report.lock().unwrap().clone();
        // A run of failures still in progress counts as far as it got.
        let now = SystemTime::now();
        for t in r.targets.values_mut() {
            if let Some(since) = t.failing_since {
                t.longest_failure = t
                    .longest_failure
                    .max(now.duration_since(since).unwrap_or_default());
            }
        }
        r
    }

    /// One target's figures so far.
    pub fn target(&self, name: &str) -> TargetReport {
        self.report().targets.get(name).cloned().unwrap_or_default()
    }

    /// Stops every probe and returns the final report.
    pub async fn stop(mut self) -> Report {
        self.cancel.cancel();
        for t in std::mem::take(&mut self.tasks) {
            let _ = t.await;
        }
        self.report()
    }
}

/// Waits until every target named has seen a leaf issued (not_before) at or after `since`
/// (with the CA's back-dating allowed for) and returns how long that took from `from`.
pub async fn wait_current(
    inv: &Invariants,
    names: &[String],
    since: SystemTime,
    backdate: Duration,
    within: Duration,
) -> Duration {
    let started = std::time::Instant::now();
    crate::trust_domain::eventually(
        &format!("every target to hold an SVID issued after {since:?}"),
        within,
        || async {
            let r = inv.report();
            names
                .iter()
                .all(|n| {
                    r.targets
                        .get(n)
                        .and_then(|t| t.current())
                        .is_some_and(|l| l.not_before + backdate + SLACK >= since)
                })
                .then_some(())
        },
    )
    .await;
    started.elapsed()
}

fn record_violation(report: &Mutex<Report>, name: &str, kind: &'static str, what: String) {
    let mut r = report.lock().unwrap();
    *r.violations.entry(kind).or_default() += 1;
    r.targets.entry(name.to_owned()).or_default().violations += 1;
    r.first_violation_at.get_or_insert_with(SystemTime::now);
    if r.examples.len() < 10 {
        r.examples.push(format!("{name}: {kind}: {what}"));
    }
}

fn record_failure(report: &Mutex<Report>, name: &str, error: &str) {
    let now = SystemTime::now();
    let mut r = report.lock().unwrap();
    r.first_failure_at.get_or_insert(now);
    let t = r.targets.entry(name.to_owned()).or_default();
    t.checks += 1;
    t.failed += 1;
    let since = *t.failing_since.get_or_insert(now);
    t.longest_failure = t
        .longest_failure
        .max(now.duration_since(since).unwrap_or_default());
    t.last_error = Some(error.to_owned());
}

fn record_success(report: &Mutex<Report>, name: &str, leaf: Option<Leaf>, authorities: usize) {
    let now = SystemTime::now();
    let mut r = report.lock().unwrap();
    let t = r.targets.entry(name.to_owned()).or_default();
    t.checks += 1;
    t.x509_authorities = authorities;
    if let Some(since) = t.failing_since.take() {
        t.longest_failure = t
            .longest_failure
            .max(now.duration_since(since).unwrap_or_default());
    }
    if let Some(leaf) = leaf
        && t.leaves.last().is_none_or(|l| l.sha256 != leaf.sha256)
        && t.leaves.iter().all(|l| l.sha256 != leaf.sha256)
    {
        t.leaves.push(leaf);
    }
}

/// The checks of one SVID (chain, key, bundle) at `now`; returns the leaf or the
/// violations found.
fn check_svid(
    chain: &[Vec<u8>],
    key_der: &[u8],
    bundle: Option<&TrustBundle>,
    expect: &Expect,
    now: SystemTime,
) -> Result<Leaf, Vec<(&'static str, String)>> {
    let Some(leaf_der) = chain.first() else {
        return Err(vec![("malformed", "an empty chain".into())]);
    };
    let info = match x509::inspect_leaf(leaf_der) {
        Ok(i) => i,
        Err(e) => return Err(vec![("malformed", e.to_string())]),
    };
    let mut bad = Vec::new();
    let id = info.spiffe_id.to_string();
    if !expect.ids.contains(&id) {
        bad.push((
            "foreign_identity",
            format!("served {id}, entitled to {:?}", expect.ids),
        ));
    }
    if info.not_after <= now {
        bad.push(("expired", format!("{id} expired at {:?}", info.not_after)));
    }
    if info.not_before > now + SLACK {
        bad.push((
            "not_yet_valid",
            format!("{id} valid from {:?}", info.not_before),
        ));
    }
    let lifetime = info
        .not_after
        .duration_since(info.not_before)
        .unwrap_or_default();
    let allowed = expect.ttl + sigil_identity::ca::svid_backdate(expect.ttl) + SLACK;
    if lifetime > allowed {
        bad.push((
            "beyond_ttl",
            format!(
                "{id} lives {lifetime:?}, more than its TTL {:?}",
                expect.ttl
            ),
        ));
    }
    match bundle {
        None => bad.push(("untrusted", format!("no bundle for {id}'s trust domain"))),
        Some(b) => {
            if let Err(e) = x509::validate_x509_svid(chain, b, now) {
                // An expired leaf is already counted as such.
                if info.not_after > now {
                    bad.push(("untrusted", format!("{id}: {e}")));
                }
            }
        }
    }
    match PrivateKey::from_pkcs8_der(key_der) {
        Ok(key) => {
            let (_, cert) = x509_parser::parse_x509_certificate(leaf_der).unwrap();
            if cert.tbs_certificate.subject_pki.raw != key.public_key_der().as_slice() {
                bad.push(("key_mismatch", format!("{id}: the key is not the leaf's")));
            }
        }
        Err(e) => bad.push(("key_mismatch", format!("{id}: the key does not parse: {e}"))),
    }
    if bad.is_empty() {
        Ok(Leaf {
            sha256: hex::encode(<sha2::Sha256 as sha2::Digest>::digest(leaf_der)),
            not_before: info.not_before,
            not_after: info.not_after,
            first_seen: now,
        })
    } else {
        Err(bad)
    }
}

fn check_context(report: &Mutex<Report>, name: &str, v: &serde_json::Value, expect: &Expect) {
    let now = SystemTime::now();
    let hex_list = |v: &serde_json::Value| -> Vec<Vec<u8>> {
        v.as_array()
            .map(|a| {
                a.iter()
                    .map(|h| hex::decode(h.as_str().unwrap_or_default()).unwrap_or_default())
                    .collect()
            })
            .unwrap_or_default()
    };
    let svids = v["svids"].as_array().cloned().unwrap_or_default();
    if svids.is_empty() {
        record_failure(report, name, "an X.509 context without SVIDs");
        return;
    }
    let mut own = BTreeSet::new();
    let mut first = None;
    let mut authorities = 0;
    let mut clean = true;
    for s in &svids {
        let chain = hex_list(&s["chain_der_hex"]);
        let key = hex::decode(s["key_der_hex"].as_str().unwrap_or_default()).unwrap_or_default();
        let bundle = chain
            .first()
            .and_then(|l| x509::inspect_leaf(l).ok())
            .and_then(|info| {
                let td = info.spiffe_id.trust_domain().clone();
                own.insert(td.to_string());
                let certs = hex_list(&v["bundles"][td.to_string()]);
                authorities = authorities.max(certs.len());
                let pem = x509::certs_to_pem(&certs);
                TrustBundle::from_x509_pem(td, &pem).ok()
            });
        match check_svid(&chain, &key, bundle.as_ref(), expect, now) {
            Ok(leaf) => {
                first.get_or_insert(leaf);
            }
            Err(bad) => {
                clean = false;
                for (kind, what) in bad {
                    record_violation(report, name, kind, what);
                }
            }
        }
    }
    let federated = v["bundles"]
        .as_object()
        .map(|m| {
            m.iter()
                .filter(|(td, _)| !own.contains(*td))
                .map(|(td, a)| (td.clone(), a.as_array().map_or(0, Vec::len)))
                .collect()
        })
        .unwrap_or_default();
    report
        .lock()
        .unwrap()
        .targets
        .entry(name.to_owned())
        .or_default()
        .federated = federated;
    if clean {
        record_success(report, name, first, authorities);
    } else {
        // Checked, and what was served is counted above as violations.
        record_success(report, name, None, authorities);
    }
}

/// Reads the volume's files as a workload does (through the stable names) and checks
/// them. A read that straddles a generation swap (`..data` changed meanwhile) is read
/// again: only a generation that stays in place while it is read is judged.
fn check_files(report: &Mutex<Report>, name: &str, dir: &Path, expect: &Expect) {
    let link = || std::fs::read_link(dir.join("..data")).ok();
    for _ in 0..5 {
        let before = link();
        let read = |f: &str| std::fs::read(dir.join(f));
        let (cert, key, bundle) = (read("svid.pem"), read("svid_key.pem"), read("bundle.pem"));
        if link() != before || before.is_none() {
            if before.is_none() && link().is_none() {
                record_violation(report, name, "file_missing", "..data is missing".into());
                record_success(report, name, None, 0);
                return;
            }
            continue;
        }
        let missing: Vec<&str> = [
            ("svid.pem", &cert),
            ("svid_key.pem", &key),
            ("bundle.pem", &bundle),
        ]
        .into_iter()
        .filter(|(_, r)| r.is_err())
        .map(|(f, _)| f)
        .collect();
        if !missing.is_empty() {
            record_violation(
                report,
                name,
                "file_missing",
                format!("{missing:?} in {}", dir.display()),
            );
            record_success(report, name, None, 0);
            return;
        }
        let (cert, key, bundle) = (cert.unwrap(), key.unwrap(), bundle.unwrap());
        let now = SystemTime::now();
        let parsed = (|| {
            let chain = x509::certs_from_pem(std::str::from_utf8(&cert).ok()?).ok()?;
            let key = PrivateKey::from_pem(std::str::from_utf8(&key).ok()?).ok()?;
            let td = x509::inspect_leaf(chain.first()?)
                .ok()?
                .spiffe_id
                .trust_domain()
                .clone();
            let bundle_pem = &bundle;
            let bundle = TrustBundle::from_x509_pem(td, std::str::from_utf8(&bundle).ok()?).ok()?;
            let authorities = x509::certs_from_pem(std::str::from_utf8(bundle_pem).ok()?)
                .ok()?
                .len();
            Some((chain, key.to_pkcs8_der().to_vec(), bundle, authorities))
        })();
        let Some((chain, key, bundle, authorities)) = parsed else {
            record_violation(
                report,
                name,
                "malformed",
                format!("files in {} do not parse", dir.display()),
            );
            record_success(report, name, None, 0);
            return;
        };
        match check_svid(&chain, &key, Some(&bundle), expect, now) {
            Ok(leaf) => record_success(report, name, Some(leaf), authorities),
            Err(bad) => {
                for (kind, what) in bad {
                    record_violation(report, name, kind, what);
                }
                record_success(report, name, None, authorities);
            }
        }
        return;
    }
    record_violation(
        report,
        name,
        "file_missing",
        format!("{}: ..data changed on five reads in a row", dir.display()),
    );
}

/// Milliseconds since the epoch, as the probes print them.
pub fn ms(t: SystemTime) -> u128 {
    t.duration_since(UNIX_EPOCH).unwrap_or_default().as_millis()
}
