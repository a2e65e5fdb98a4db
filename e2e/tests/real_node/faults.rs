//! Issue #27's faults on the real node (docs/reliability.md): checker pods run through
//! each fault while the test injects it into the node as it would happen in a cluster.
//!
//! - Socket-mode checkers (`go-spiffe-client check`) open a new connection every second,
//!   fetch their X509-SVIDs within 2 s and judge the one of their ID: a fetch that fails
//!   is a failed fetch; an SVID outside its validity, or that does not chain to the bundle
//!   served with it, is a violation.
//! - Files-mode checkers (`go-spiffe-client files-check`) read their volume every 200 ms:
//!   a missing file, a key that does not match its certificate, a certificate of another
//!   ID or one that does not verify against `bundle.pem` now (expired) is a violation.
//!
//! Their identity has a 30 s TTL, so rotations fall inside every fault. The faults, one
//! after another: the API server stopped (`SIGIL_NODE_FAULT_OUTAGE_SECS`, 40 s: more
//! than a TTL), etcd restarted, the agent cut off from the operator's Service (iptables in
//! the node's namespace, `SIGIL_NODE_FAULT_PARTITION_SECS`, 16 s: more than a half-life,
//! starting right after the checkers rotated),
//! and the operator's leader SIGKILLed while a burst of pods (`SIGIL_NODE_FAULT_BURST`,
//! 20) starts. After each, a new pod must get its SVID; the figures are printed.

use k8s_openapi::jiff::Timestamp;
use sigil_testkit::report::env;

use super::*;

const NS: &str = "rn-faults";
const TTL_SECS: u64 = 30;
const SOCKET_CHECKERS: usize = 3;
const FILES_CHECKERS: usize = 2;
/// No checker's fetches may fail for longer than this, at any moment of any fault.
const FAILURE_BOUND: Duration = Duration::from_secs(5);

fn faults_id() -> String {
    format!("spiffe://{TD}/faults/ns/{NS}/sa/default")
}

/// What one checker printed, parsed.
#[derive(Default)]
struct Seen {
    /// Every check: when, whether it failed (and why).
    checks: Vec<(SystemTime, Option<String>)>,
    /// Violations: when and what.
    violations: Vec<(SystemTime, String)>,
    /// Each serial and when it was first seen.
    serials: Vec<(SystemTime, String)>,
    /// The notAfter of the last SVID seen.
    not_after: Option<SystemTime>,
}

impl Seen {
    fn parse(log: &str, files: bool) -> Seen {
        let mut seen = Seen::default();
        for l in json_lines(log) {
            let Some(t) = rfc3339(&l) else { continue };
            let text = |k: &str| l.get(k).and_then(Value::as_str).map(str::to_owned);
            if files {
                // files-check prints a line per new serial, per error, and counts.
                if let Some(e) = text("error") {
                    seen.violations.push((t, e));
                }
            } else if l.get("check").is_some() {
                if let Some(v) = text("violation") {
                    seen.violations.push((t, v));
                }
                seen.checks.push((t, text("failed")));
            }
            if let Some(s) = text("serial")
                && seen.serials.last().is_none_or(|(_, last)| *last != s)
            {
                seen.serials.push((t, s));
            }
            if let Some(na) = text("not_after").and_then(|v| v.parse::<Timestamp>().ok()) {
                seen.not_after = Some(SystemTime::from(na));
            }
        }
        seen
    }

    /// Checks in [from, to), failed ones, and the longest run of failures (from the first
    /// failed check to the next good one, or to `to`).
    fn tally(&self, from: SystemTime, to: SystemTime) -> (usize, usize, Duration) {
        let (mut n, mut failed, mut longest) = (0, 0, Duration::ZERO);
        let mut run_start: Option<SystemTime> = None;
        for (t, f) in self.checks.iter().filter(|(t, _)| *t >= from && *t < to) {
            n += 1;
            match (f, run_start) {
                (Some(_), None) => {
                    failed += 1;
                    run_start = Some(*t);
                }
                (Some(_), Some(_)) => failed += 1,
                (None, Some(s)) => {
                    longest = longest.max(t.duration_since(s).unwrap_or_default());
                    run_start = None;
                }
                (None, None) => {}
            }
        }
        if let Some(s) = run_start {
            longest = longest.max(to.duration_since(s).unwrap_or_default());
        }
        (n, failed, longest)
    }

    /// New serials first seen in [from, to).
    fn rotations(&self, from: SystemTime, to: SystemTime) -> usize {
        self.serials
            .iter()
            .filter(|(t, _)| *t >= from && *t < to)
            .count()
    }

    /// When a serial not seen before `since` was first seen.
    fn first_new_since(&self, since: SystemTime) -> Option<SystemTime> {
        self.serials
            .iter()
            .find(|(t, _)| *t >= since)
            .map(|(t, _)| *t)
    }
}

fn checker_names() -> Vec<(String, bool)> {
    (0..SOCKET_CHECKERS)
        .map(|i| (format!("check-{i}"), false))
        .chain((0..FILES_CHECKERS).map(|i| (format!("files-{i}"), true)))
        .collect()
}

async fn seen_all(ctx: &Ctx) -> Result<Vec<(String, Seen)>> {
    let mut out = Vec::new();
    for (name, files) in checker_names() {
        let log = logs(ctx, NS, &name, None).await?;
        out.push((name, Seen::parse(&log, files)));
    }
    Ok(out)
}

/// One fault's figures across every checker.
struct Window {
    fault: String,
    checks: usize,
    failed: usize,
    longest_failure: Duration,
    violations: Vec<String>,
    /// The fewest rotations any checker saw inside the fault.
    min_rotations: usize,
}

fn window(fault: &str, all: &[(String, Seen)], from: SystemTime, to: SystemTime) -> Window {
    let mut w = Window {
        fault: fault.to_owned(),
        checks: 0,
        failed: 0,
        longest_failure: Duration::ZERO,
        violations: Vec::new(),
        min_rotations: usize::MAX,
    };
    for (name, seen) in all {
        let (n, failed, longest) = seen.tally(from, to);
        w.checks += n;
        w.failed += failed;
        w.longest_failure = w.longest_failure.max(longest);
        w.violations.extend(
            seen.violations
                .iter()
                .filter(|(t, _)| *t >= from && *t < to)
                .map(|(_, v)| format!("{name}: {v}")),
        );
        w.min_rotations = w.min_rotations.min(seen.rotations(from, to));
    }
    w
}

fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}

/// A new pod, created now: when its container started and when it got its first SVID
/// (the times its client printed), both measured from `since`.
struct Served {
    /// `kubectl apply` returned (the API server and the admission webhooks answered).
    created: Duration,
    /// The pod's PodScheduled condition (whole seconds).
    scheduled: Duration,
    started: Duration,
    svid: Duration,
}

impl std::fmt::Display for Served {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{:.1}s (pod created at {:.1}s, scheduled at ~{:.0}s, its container started at {:.1}s: Sigil's part {:.0} ms)",
            secs(self.svid),
            secs(self.created),
            secs(self.scheduled),
            secs(self.started),
            (self.svid.saturating_sub(self.started)).as_secs_f64() * 1000.0
        )
    }
}

async fn new_pod_served(ctx: &Ctx, name: &str, since: SystemTime) -> Result<Served> {
    ctx.node
        .apply(&socket_pod(
            NS,
            name,
            "default",
            "sigil.dev/faults: probe",
            r#"["/go-spiffe-client", "-timeout", "170s", "first-svid"]"#,
        ))
        .await?;
    let created = since.elapsed().unwrap_or_default();
    let log = wait_done(ctx, NS, name).await?;
    let pod = pods(ctx, NS).get(name).await?;
    let scheduled = pod
        .status
        .and_then(|s| s.conditions)
        .unwrap_or_default()
        .into_iter()
        .find(|c| c.type_ == "PodScheduled")
        .and_then(|c| c.last_transition_time)
        .map(|t| {
            SystemTime::from(t.0)
                .duration_since(since)
                .unwrap_or_default()
        })
        .unwrap_or_default();
    let first = json_lines(&log).into_iter().next().unwrap_or_default();
    let at = |key: &str| {
        first[key]
            .as_u64()
            .map(|n| {
                (SystemTime::UNIX_EPOCH + Duration::from_nanos(n))
                    .duration_since(since)
                    .unwrap_or_default()
            })
            .ok_or_else(|| anyhow!("{name} printed no {key}: {log}"))
    };
    let served = Served {
        created,
        scheduled,
        started: at("started_unix_nano")?,
        svid: at("svid_unix_nano")?,
    };
    // A slow start is the kubelet's: its events say where it waited (a volume mount
    // would be sigil-csi's).
    if served.started.saturating_sub(served.scheduled) > Duration::from_secs(10) {
        let events = pod_events(ctx, NS, name).await;
        println!("    {name}'s events:\n{events}");
    }
    Ok(served)
}

/// The operator's Lease: its holder and when it was last renewed.
async fn lease(ctx: &Ctx) -> Result<(String, Option<SystemTime>)> {
    let leases: Api<Lease> = Api::namespaced(ctx.client.clone(), RELEASE_NS);
    let spec = api(|| leases.get("sigil-operator"))
        .await?
        .spec
        .unwrap_or_default();
    let renewed = spec
        .renew_time
        .map(|t| SystemTime::UNIX_EPOCH + Duration::from_micros(t.0.as_microsecond() as u64));
    Ok((spec.holder_identity.unwrap_or_default(), renewed))
}

/// The step: the faults, and when they fail, the agent's and the operators' last warnings
/// with the error (the node, and their logs with it, is gone once the run ends).
pub(super) async fn faults_on_the_real_node_keep_every_pod_served(ctx: Arc<Ctx>) -> Result<()> {
    let result = faults(&ctx).await;
    if result.is_ok() {
        return result;
    }
    // What the agent and the operator's replicas said, to place the failure.
    let mut said = String::new();
    for (selector, container) in [
        ("app.kubernetes.io/component=agent", "agent"),
        ("app.kubernetes.io/component=operator", "operator"),
    ] {
        let out = ctx
            .node
            .kubectl(&[
                "logs",
                "-n",
                RELEASE_NS,
                "-l",
                selector,
                "-c",
                container,
                "--tail=400",
                "--prefix",
            ])
            .await
            .unwrap_or_else(|e| e.to_string());
        let lines: Vec<&str> = out
            .lines()
            .filter(|l| l.contains("WARN") || l.contains("ERROR"))
            .collect();
        said.push_str(&lines[lines.len().saturating_sub(40)..].join("\n"));
        said.push('\n');
    }
    result.with_context(|| format!("the agent's and the operators' last warnings:\n{said}"))
}

async fn faults(ctx: &Arc<Ctx>) -> Result<()> {
    let ctx = ctx.clone();
    let outage = Duration::from_secs(env("SIGIL_NODE_FAULT_OUTAGE_SECS", 40) as u64);
    let partition = Duration::from_secs(env(
        "SIGIL_NODE_FAULT_PARTITION_SECS",
        TTL_SECS as usize / 2 + 1,
    ) as u64);
    let burst = env("SIGIL_NODE_FAULT_BURST", 20);
    let id = faults_id();
    namespace(&ctx, NS, "").await?;
    short_lived_clusterspiffeid(
        &ctx,
        "real-node-faults",
        "faults",
        "{matchExpressions: [{key: sigil.dev/faults, operator: Exists}]}",
        &format!("{TTL_SECS}s"),
    )
    .await?;
    for (name, files) in checker_names() {
        let yaml = if files {
            files_pod(
                NS,
                &name,
                "default",
                "sigil.dev/faults: checker",
                &id,
                &format!(
                    r#"["/go-spiffe-client", "files-check", "-dir", "/svid", "-interval", "200ms", "-spiffe-id", "{id}"]"#
                ),
            )
        } else {
            socket_pod(
                NS,
                &name,
                "default",
                "sigil.dev/faults: checker",
                &format!(
                    r#"["/go-spiffe-client", "-timeout", "2s", "check", "-interval", "1s", "-spiffe-id", "{id}"]"#
                ),
            )
        };
        ctx.node.apply(&yaml).await?;
    }
    for (name, _) in checker_names() {
        wait_ready(&ctx, NS, &name).await?;
    }
    // Every checker holds an SVID of the faults identity before the first fault.
    until("every checker served its SVID", READY, || async {
        let all = seen_all(&ctx).await?;
        Ok(all
            .iter()
            .all(|(_, s)| !s.serials.is_empty() && s.violations.is_empty())
            .then_some(()))
    })
    .await?;
    let started = SystemTime::now();
    tokio::time::sleep(Duration::from_secs(3)).await;

    let mut marks: Vec<(String, SystemTime, SystemTime)> = Vec::new();
    let mut recovery: Vec<String> = Vec::new();

    // 1. The API server stopped for longer than a TTL.
    let from = SystemTime::now();
    ctx.node.stop_component("kube-apiserver").await?;
    tokio::time::sleep(outage).await;
    ctx.node.start_component("kube-apiserver").await?;
    let back = SystemTime::now();
    let served = new_pod_served(&ctx, "after-apiserver", back).await?;
    recovery.push(format!(
        "API server down {}s: after it served again, a new pod's first SVID at {served}",
        outage.as_secs(),
    ));
    marks.push(("API server down".into(), from, SystemTime::now()));

    // 2. etcd restarted under the API server's open watches.
    let from = SystemTime::now();
    ctx.node.restart("etcd").await?;
    let back = SystemTime::now();
    let served = new_pod_served(&ctx, "after-etcd", back).await?;
    recovery.push(format!(
        "etcd restarted: after the restart returned, a new pod's first SVID at {served}"
    ));
    marks.push(("etcd restarted".into(), from, SystemTime::now()));

    // 3. The agent cut off from the operator for longer than a half-life, starting right
    // after every checker rotated, so that what they hold outlives the partition (the
    // point is what workloads see past half-life, not an SVID that must expire).
    let service = format!("{RELEASE_NS}/sigil-operator");
    // Each checker pod has its own SVID, rotated on its own schedule (at 34-44% of the
    // TTL after issue, with the CA's back-dating and the jitter), so they are not fresh
    // at once: wait for a moment when every one outlives the partition by 4 s.
    let least = partition + Duration::from_secs(4);
    let expires = until(
        &format!(
            "every checker holding an SVID valid {}s more",
            least.as_secs()
        ),
        Duration::from_secs(6 * TTL_SECS),
        || async {
            let all = seen_all(&ctx).await?;
            let now = SystemTime::now();
            let left: Vec<String> = all
                .iter()
                .map(|(name, s)| {
                    let l = s.not_after.and_then(|t| t.duration_since(now).ok());
                    format!("{name} {:.0}s", l.unwrap_or_default().as_secs_f64())
                })
                .collect();
            match all.iter().map(|(_, s)| s.not_after).min().flatten() {
                Some(t) if t >= now + least => Ok(Some(t)),
                _ => bail!("validity left: {}", left.join(", ")),
            }
        },
    )
    .await?;
    let from = SystemTime::now();
    ctx.node.partition(true, &service).await?;
    tokio::time::sleep(partition).await;
    ctx.node.partition(false, &service).await?;
    let healed = SystemTime::now();
    println!(
        "    partition: {} to {}",
        Timestamp::try_from(from).map_or_else(|e| e.to_string(), |t| t.to_string()),
        Timestamp::try_from(healed).map_or_else(|e| e.to_string(), |t| t.to_string())
    );
    // Every SVID is overdue now (older than a half-life): each checker must get a new one.
    let current = until(
        "every checker rotated after the partition healed",
        READY,
        || async {
            let all = seen_all(&ctx).await?;
            let firsts: Option<Vec<SystemTime>> =
                all.iter().map(|(_, s)| s.first_new_since(healed)).collect();
            Ok(firsts.map(|f| f.into_iter().max().unwrap_or(healed)))
        },
    )
    .await?;
    let current_after = current.duration_since(healed).unwrap_or_default();
    let served = new_pod_served(&ctx, "after-partition", healed).await?;
    recovery.push(format!(
        "agent cut off from the operator {}s: every checker held a new SVID {:.1}s after it healed (what they held had {:.1}s left); a new pod's first SVID at {served}",
        partition.as_secs(),
        secs(current_after),
        secs(expires.duration_since(healed).unwrap_or_default()),
    ));
    marks.push((
        "agent <-> operator partition".into(),
        from,
        SystemTime::now(),
    ));

    // 4. The operator's leader SIGKILLed while a burst of pods starts.
    let from = SystemTime::now();
    let (leader, _) = lease(&ctx).await?;
    let release_pods = pods(&ctx, RELEASE_NS);
    let leader_pod = api(|| release_pods.get(&leader)).await?;
    let container = leader_pod
        .status
        .and_then(|s| s.container_statuses)
        .unwrap_or_default()
        .into_iter()
        .find_map(|c| c.container_id)
        .ok_or_else(|| anyhow!("the leader {leader} has no running container"))?;
    let container = container.trim_start_matches("containerd://").to_owned();
    let burst_pod = |i: usize| {
        socket_pod(
            NS,
            &format!("burst-{i}"),
            "default",
            "sigil.dev/faults: burst",
            r#"["/go-spiffe-client", "-timeout", "170s", "first-svid"]"#,
        )
    };
    let half = burst / 2;
    let first: String = (0..half).map(burst_pod).collect::<Vec<_>>().join("---\n");
    let second: String = (half..burst)
        .map(burst_pod)
        .collect::<Vec<_>>()
        .join("---\n");
    if !first.is_empty() {
        ctx.node.apply(&first).await?;
    }
    ctx.node.kill_container(&container).await?;
    let killed = SystemTime::now();
    if !second.is_empty() {
        ctx.node.apply(&second).await?;
    }
    // The kubelet restarts the killed container at once, under the same pod name: the
    // Lease goes to whichever replica renews it first after the kill, the standby or the
    // restarted leader.
    let (holder, renewed) = until("a live replica renews the Lease", READY, || async {
        let (h, renewed) = lease(&ctx).await?;
        Ok(renewed
            .filter(|r| !h.is_empty() && *r > killed)
            .map(|r| (h, r)))
    })
    .await?;
    let by = if holder == leader {
        "the restarted leader"
    } else {
        "the standby"
    };
    let mut last_svid = from;
    for i in 0..burst {
        let name = format!("burst-{i}");
        let log = wait_done(&ctx, NS, &name).await?;
        let line = json_lines(&log).into_iter().next().unwrap_or_default();
        ensure!(
            line["spiffe_id"] == id.as_str(),
            "{name} (burst, leader killed) printed {log}"
        );
        let at = SystemTime::UNIX_EPOCH
            + Duration::from_nanos(line["svid_unix_nano"].as_u64().unwrap_or_default());
        last_svid = last_svid.max(at);
    }
    sigil_ready(&ctx).await?;
    recovery.push(format!(
        "leader SIGKILLed in a burst of {burst} pods: the Lease renewed by {by} {:.1}s after the kill; every burst pod had its SVID {:.1}s after the burst began",
        secs(renewed.duration_since(killed).unwrap_or_default()),
        secs(last_svid.duration_since(from).unwrap_or_default())
    ));
    marks.push((
        "operator leader SIGKILLed in a burst".into(),
        from,
        SystemTime::now(),
    ));

    // The figures, fault by fault, and the invariants over the whole run.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let all = seen_all(&ctx).await?;
    let end = SystemTime::now();
    let mut problems = Vec::new();
    for (fault, from, to) in &marks {
        let w = window(fault, &all, *from, *to);
        println!(
            "    {}: {} checks, {} failed (longest {:.1}s), {} violations, ≥{} rotations in each checker",
            w.fault,
            w.checks,
            w.failed,
            secs(w.longest_failure),
            w.violations.len(),
            w.min_rotations
        );
        if w.longest_failure > FAILURE_BOUND {
            problems.push(format!(
                "{}: fetches failed for {:.1}s (bound {FAILURE_BOUND:?})",
                w.fault,
                secs(w.longest_failure)
            ));
        }
        problems.extend(w.violations.iter().map(|v| format!("{}: {v}", w.fault)));
    }
    for r in &recovery {
        println!("    {r}");
    }
    let whole = window("the whole run", &all, started, end);
    println!(
        "    the whole run: {} socket checks ({} failed), {} files checks, {} violations",
        whole.checks,
        whole.failed,
        files_checks(&ctx).await?,
        whole.violations.len()
    );
    problems.extend(whole.violations);
    // The API server outage outlived the TTL: the checkers rotated inside it.
    let api_down = window(&marks[0].0, &all, marks[0].1, marks[0].2);
    if api_down.min_rotations < 2 {
        problems.push(format!(
            "a checker saw only {} rotations while the API server was down {}s (TTL {TTL_SECS}s)",
            api_down.min_rotations,
            outage.as_secs()
        ));
    }
    // What they held when the partition began outlived it by at least 4 s: the agent must
    // be signing again before that runs out.
    let margin = expires.duration_since(healed).unwrap_or_default();
    if current_after >= margin {
        problems.push(format!(
            "every checker held a new SVID only {:.1}s after the partition healed, and what they held expired {:.1}s after it",
            secs(current_after),
            secs(margin)
        ));
    }
    ctx.node
        .kubectl(&[
            "delete",
            "clusterspiffeid",
            "real-node-faults",
            "--ignore-not-found",
        ])
        .await?;
    ensure!(problems.is_empty(), "{}", problems.join("\n"));
    Ok(())
}

/// The files checkers' reads, from their last count line.
async fn files_checks(ctx: &Ctx) -> Result<u64> {
    let mut n = 0;
    for (name, files) in checker_names() {
        if files {
            let log = logs(ctx, NS, &name, None).await?;
            n += json_lines(&log)
                .iter()
                .filter_map(|l| l["checks"].as_u64())
                .max()
                .unwrap_or(0);
        }
    }
    Ok(n)
}
