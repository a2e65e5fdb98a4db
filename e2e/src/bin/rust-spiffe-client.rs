//! rust-spiffe-client: an independent Workload API client for Sigil's tests, built on the
//! Rust `spiffe` crate (X509Source, JwtSource, WorkloadApiClient). Prints JSON lines.
//!
//!   rust-spiffe-client --addr unix:///... x509
//!   rust-spiffe-client --addr ... jwt --audience A
//!   rust-spiffe-client --addr ... validate --audience A --token T
//!   rust-spiffe-client --addr ... watch --updates N     (one line per X509Source update)
//!   rust-spiffe-client --addr ... streams --count N     (hold N FetchX509SVID streams)
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
                "x509" | "jwt" | "validate" | "watch" | "streams"
            )
        })
        .ok_or("command: x509|jwt|validate|watch|streams")?;
    match cmd.as_str() {
        "x509" => {
            let source = X509Source::builder().endpoint(&addr).build().await?;
            println!("{}", leaf_line(&source)?);
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
            let mut held = Vec::with_capacity(count);
            for _ in 0..count {
                let client = WorkloadApiClient::connect_to(&addr).await?;
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
            let mut sink = String::new();
            let _ = std::io::stdin().read_line(&mut sink);
            drop(held);
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
