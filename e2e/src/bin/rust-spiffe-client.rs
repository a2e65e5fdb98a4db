//! rust-spiffe-client: an independent Workload API client for Sigil's tests, built on the
//! Rust `spiffe` crate (X509Source, JwtSource, WorkloadApiClient). Prints JSON lines.
//!
//!   rust-spiffe-client --addr unix:///... x509
//!   rust-spiffe-client --addr ... jwt --audience A
//!   rust-spiffe-client --addr ... validate --audience A --token T
//!   rust-spiffe-client --addr ... watch --updates N     (one line per X509Source update)
//!   rust-spiffe-client --addr ... streams --count N [--per-connection K]
//!       (hold N FetchX509SVID streams, K on each connection (default 1); prints "ready",
//!       then "updated" once all N received a second SVID)
//!   rust-spiffe-client --addr ... connections --count N
//!       (hold N connections, HTTP/2 handshake done, no call; prints "ready")
//!   rust-spiffe-client --addr ... wait-x509 --timeout-ms T
//!       (FetchX509SVID every 20 ms until an SVID arrives: for registration latency)
//!   rust-spiffe-client --addr ... load --concurrency C --requests N
//!       (C connections issuing N FetchX509SVID calls in all; prints p50/p99 in µs)
//!   rust-spiffe-client --addr ... jwt-flood --count N --prefix P
//!       (N FetchJWTSVID calls on one connection, each for a fresh audience P-<i>, as a
//!       workload draining its node's minting budget would; prints how many were served
//!       and how many refused, by gRPC code, with the first refusal)
//!   rust-spiffe-client --addr ... poll --interval-ms I --timeout-ms T
//!       (every I ms, on a new connection, one FetchX509SVID (the whole X.509 context) of
//!       at most T ms; one line per attempt, {"ok":true,"svids":[{spiffe_id, chain_der_hex,
//!       key_der_hex}],"bundles":{td: [authority_der_hex]}} or {"ok":false,"error":...},
//!       each with at_ms; runs until killed: the invariant checker's probe)
//!   rust-spiffe-client --addr ... streams --count N --reconnect
//!       (as streams, but a stream that breaks is opened again every 50 ms until it gets
//!       an SVID; prints {"resumed": N} once every stream has one again after a break)
//!
//! Exit status 0, or 1 with the library's error on stderr.

use std::time::{SystemTime, UNIX_EPOCH};

use sha2::Digest;
use spiffe::{JwtSource, WorkloadApiClient, X509Source};

fn arg(args: &[String], name: &str) -> Option<String> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

fn now_ms() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or(0)
}

fn leaf_line(source: &X509Source) -> Result<serde_json::Value, Box<dyn std::error::Error>> {
    let svid = source.svid()?;
    let authorities = source
        .try_bundle_for_trust_domain(svid.spiffe_id().trust_domain())
        .map_or(0, |b| b.authorities().len());
    Ok(serde_json::json!({
        "spiffe_id": svid.spiffe_id().to_string(),
        "chain_len": svid.cert_chain().len(),
        "leaf_sha256": hex::encode(sha2::Sha256::digest(svid.leaf().as_ref())),
        "leaf_der_hex": hex::encode(svid.leaf().as_ref()),
        "bundle_authorities": authorities,
        "at_ms": now_ms(),
    }))
}

async fn run(args: Vec<String>) -> Result<(), Box<dyn std::error::Error>> {
    let addr = arg(&args, "--addr")
        .or_else(|| std::env::var("SPIFFE_ENDPOINT_SOCKET").ok())
        .ok_or("--addr is required")?;
    let cmd = args
        .iter()
        .find(|a| {
            matches!(
                a.as_str(),
                "x509"
                    | "jwt"
                    | "validate"
                    | "watch"
                    | "streams"
                    | "connections"
                    | "wait-x509"
                    | "load"
                    | "jwt-flood"
                    | "poll"
            )
        })
        .ok_or(
            "command: x509|jwt|validate|watch|streams|connections|wait-x509|load|jwt-flood|poll",
        )?;
    match cmd.as_str() {
        "x509" => {
            let source = X509Source::builder().endpoint(&addr).build().await?;
            println!("{}", leaf_line(&source)?);
        }
        "connections" => {
            // Holds `count` connections, HTTP/2 handshake done and no call made: what a
            // connection alone costs the server. Says "ready", exits when stdin closes.
            let count: usize = arg(&args, "--count")
                .and_then(|v| v.parse().ok())
                .unwrap_or(100);
            let mut held = Vec::with_capacity(count);
            for _ in 0..count {
                held.push(WorkloadApiClient::connect_to(&addr).await?);
            }
            println!(
                "{}",
                serde_json::json!({"ready": held.len(), "at_ms": now_ms()})
            );
            let mut sink = String::new();
            let _ = std::io::stdin().read_line(&mut sink);
        }
        "poll" => {
            let every = std::time::Duration::from_millis(
                arg(&args, "--interval-ms")
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(1000),
            );
            let timeout = std::time::Duration::from_millis(
                arg(&args, "--timeout-ms")
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(2000),
            );
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let at_ms = now_ms();
                let attempt = tokio::time::timeout(timeout, async {
                    let client = WorkloadApiClient::connect_to(&addr)
                        .await
                        .map_err(|e| e.to_string())?;
                    client.fetch_x509_context().await.map_err(|e| e.to_string())
                });
                let line = match attempt.await {
                    Ok(Ok(context)) => {
                        let svids: Vec<_> = context
                            .svids()
                            .iter()
                            .map(|s| {
                                serde_json::json!({
                                    "spiffe_id": s.spiffe_id().to_string(),
                                    "chain_der_hex": s.cert_chain().iter().map(|c| hex::encode(c.as_ref())).collect::<Vec<_>>(),
                                    "key_der_hex": hex::encode(s.private_key().as_ref()),
                                })
                            })
                            .collect();
                        let bundles: serde_json::Map<String, serde_json::Value> = context
                            .bundle_set()
                            .iter()
                            .map(|(td, b)| {
                                (
                                    td.to_string(),
                                    b.authorities()
                                        .iter()
                                        .map(|c| hex::encode(c.as_ref()))
                                        .collect(),
                                )
                            })
                            .collect();
                        serde_json::json!({"ok": true, "svids": svids, "bundles": bundles, "at_ms": at_ms})
                    }
                    Ok(Err(e)) => serde_json::json!({"ok": false, "error": e, "at_ms": at_ms}),
                    Err(_) => {
                        serde_json::json!({"ok": false, "error": "the call was not answered", "at_ms": at_ms})
                    }
                };
                println!("{line}");
            }
        }
        "watch" => {
            let n: usize = arg(&args, "--updates")
                .and_then(|v| v.parse().ok())
                .unwrap_or(2);
            let source = X509Source::builder().endpoint(&addr).build().await?;
            println!("{}", leaf_line(&source)?);
            let mut updates = source.updated();
            for _ in 1..n {
                updates.changed().await?;
                println!("{}", leaf_line(&source)?);
            }
        }
        "streams" => {
            // Holds `count` FetchX509SVID streams, each on its own connection; says
            // "ready" once every stream has its first SVID; exits when stdin closes.
            let count: usize = arg(&args, "--count")
                .and_then(|v| v.parse().ok())
                .unwrap_or(100);
            let per_connection: usize = arg(&args, "--per-connection")
                .and_then(|v| v.parse().ok())
                .unwrap_or(1)
                .max(1);
            let mut held = Vec::with_capacity(count);
            let mut shared: Option<WorkloadApiClient> = None;
            for i in 0..count {
                let client = match &shared {
                    Some(c) if i % per_connection != 0 => c.clone(),
                    _ => {
                        let c = WorkloadApiClient::connect_to(&addr).await?;
                        shared = Some(c.clone());
                        c
                    }
                };
                let mut stream = Box::pin(client.stream_x509_svids().await?);
                futures::StreamExt::next(&mut stream)
                    .await
                    .ok_or("stream ended")??;
                held.push((client, stream));
            }
            println!(
                "{}",
                serde_json::json!({"ready": held.len(), "at_ms": now_ms()})
            );
            // Then says "updated" once every stream has received a second SVID (a
            // rotation or an entry change fanned out to all of them); with --reconnect,
            // "resumed" once every stream that broke has been opened again and has an SVID.
            let reconnect = args.iter().any(|a| a == "--reconnect");
            let (tx, mut rx) = tokio::sync::mpsc::channel::<()>(count.max(1));
            let mut tasks = Vec::with_capacity(count);
            for (client, mut stream) in held {
                let tx = tx.clone();
                let addr = addr.clone();
                tasks.push(tokio::spawn(async move {
                    if reconnect {
                        while let Some(Ok(_)) = futures::StreamExt::next(&mut stream).await {}
                        drop((stream, client));
                        loop {
                            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                            let Ok(client) = WorkloadApiClient::connect_to(&addr).await else {
                                continue;
                            };
                            let Ok(stream) = client.stream_x509_svids().await else {
                                continue;
                            };
                            let mut stream = Box::pin(stream);
                            if let Some(Ok(_)) = futures::StreamExt::next(&mut stream).await {
                                let _ = tx.send(()).await;
                                let _held = (client, stream);
                                std::future::pending::<()>().await;
                            }
                        }
                    }
                    let _client = client;
                    if let Some(Ok(_)) = futures::StreamExt::next(&mut stream).await {
                        let _ = tx.send(()).await;
                    }
                    // Keep the stream open until the process is told to stop.
                    std::future::pending::<()>().await;
                }));
            }
            let done = if reconnect { "resumed" } else { "updated" };
            drop(tx);
            let mut stdin = tokio::task::spawn_blocking(|| {
                let mut sink = String::new();
                let _ = std::io::stdin().read_line(&mut sink);
            });
            let (mut updated, mut open) = (0, true);
            loop {
                tokio::select! {
                    _ = &mut stdin => break,
                    got = rx.recv(), if open && updated < count => match got {
                        // Every stream task has ended: nothing more will arrive.
                        None => open = false,
                        Some(()) => {
                            updated += 1;
                            if updated == count {
                                println!(
                                    "{}",
                                    serde_json::json!({done: updated, "at_ms": now_ms()})
                                );
                            }
                        }
                    },
                }
            }
            for t in tasks {
                t.abort();
            }
        }
        "wait-x509" => {
            // Same fixed retry for every system measured, so the figure is the server
            // side's, not a client backoff's.
            let timeout = std::time::Duration::from_millis(
                arg(&args, "--timeout-ms")
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(60_000),
            );
            let started = std::time::Instant::now();
            let mut attempts = 0u32;
            let mut last = String::new();
            while let Some(left) = timeout.checked_sub(started.elapsed()) {
                attempts += 1;
                // Bounded too: a server may hold a call open without ever answering.
                let attempt = tokio::time::timeout(left, async {
                    let client = WorkloadApiClient::connect_to(&addr)
                        .await
                        .map_err(|e| e.to_string())?;
                    client.fetch_x509_svid().await.map_err(|e| e.to_string())
                });
                match attempt.await {
                    Ok(Ok(svid)) => {
                        println!(
                            "{}",
                            serde_json::json!({"spiffe_id": svid.spiffe_id().to_string(), "attempts": attempts, "at_ms": now_ms()})
                        );
                        return Ok(());
                    }
                    Ok(Err(e)) => last = e,
                    Err(_) => last = "the call was not answered".to_owned(),
                }
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
            return Err(
                format!("no X509-SVID within {timeout:?} ({attempts} attempts): {last}").into(),
            );
        }
        "load" => {
            let concurrency: usize = arg(&args, "--concurrency")
                .and_then(|v| v.parse().ok())
                .unwrap_or(1);
            let requests: usize = arg(&args, "--requests")
                .and_then(|v| v.parse().ok())
                .unwrap_or(1000);
            let mut clients = Vec::with_capacity(concurrency);
            for _ in 0..concurrency {
                clients.push(WorkloadApiClient::connect_to(&addr).await?);
            }
            let per = requests.div_ceil(concurrency);
            let started = std::time::Instant::now();
            let tasks = clients.into_iter().map(|client| async move {
                let mut v = Vec::with_capacity(per);
                for _ in 0..per {
                    let t = std::time::Instant::now();
                    client
                        .fetch_x509_svid()
                        .await
                        .map_err(|e| Box::new(e) as Box<dyn std::error::Error>)?;
                    v.push(t.elapsed());
                }
                Ok::<_, Box<dyn std::error::Error>>(v)
            });
            let mut all = Vec::with_capacity(per * concurrency);
            for r in futures::future::join_all(tasks).await {
                all.extend(r?);
            }
            let wall = started.elapsed();
            all.sort();
            let pct = |p: f64| all[((all.len() as f64 - 1.0) * p).round() as usize].as_micros();
            println!(
                "{}",
                serde_json::json!({"n": all.len(), "p50_us": pct(0.5), "p99_us": pct(0.99), "per_s": all.len() as f64 / wall.as_secs_f64()})
            );
        }
        "jwt" => {
            let audience = arg(&args, "--audience").ok_or("--audience is required")?;
            let source = JwtSource::builder().endpoint(&addr).build().await?;
            let svid = source.fetch_jwt_svid([audience.as_str()]).await?;
            println!(
                "{}",
                serde_json::json!({"spiffe_id": svid.spiffe_id().to_string(), "token": svid.token()})
            );
        }
        "jwt-flood" => {
            let count: usize = arg(&args, "--count")
                .and_then(|v| v.parse().ok())
                .unwrap_or(100);
            let prefix = arg(&args, "--prefix").unwrap_or_else(|| "flood".into());
            let client = WorkloadApiClient::connect_to(&addr).await?;
            let (mut ok, mut refused) = (0usize, std::collections::BTreeMap::new());
            let mut first_refusal = None;
            let started = std::time::Instant::now();
            for i in 0..count {
                let audience = format!("{prefix}-{i}");
                match client.fetch_jwt_svid(&[audience.as_str()], None).await {
                    Ok(_) => ok += 1,
                    Err(e) => {
                        // The status code's name as the client library shows it.
                        let text = format!("{e:?}");
                        let code = [
                            "ResourceExhausted",
                            "PermissionDenied",
                            "Unavailable",
                            "InvalidArgument",
                            "DeadlineExceeded",
                        ]
                        .into_iter()
                        .find(|c| text.contains(c))
                        .unwrap_or("Other");
                        *refused.entry(code).or_insert(0usize) += 1;
                        first_refusal.get_or_insert((i, text));
                    }
                }
            }
            println!(
                "{}",
                serde_json::json!({
                    "ok": ok,
                    "refused": refused,
                    "first_refusal_at": first_refusal.as_ref().map(|f| f.0),
                    "first_refusal": first_refusal.map(|f| f.1),
                    "ms": started.elapsed().as_millis(),
                })
            );
        }
        "validate" => {
            let audience = arg(&args, "--audience").ok_or("--audience is required")?;
            let token = arg(&args, "--token").ok_or("--token is required")?;
            let client = WorkloadApiClient::connect_to(&addr).await?;
            let svid = client.validate_jwt_token(&audience, &token).await?;
            println!(
                "{}",
                serde_json::json!({"spiffe_id": svid.spiffe_id().to_string(), "audience": svid.audience()})
            );
        }
        _ => unreachable!(),
    }
    Ok(())
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if let Err(e) = run(args).await {
        eprintln!("{e}");
        std::process::exit(1);
    }
}
