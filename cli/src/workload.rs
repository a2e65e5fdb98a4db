//! The Workload API commands, through the Rust `spiffe` crate's client.

use std::io::Read;
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use futures::StreamExt;
use serde_json::json;
use spiffe::WorkloadApiClient;
use spiffe::workload_api::x509_context::X509Context;

use crate::output::{cert_line, relative, when};
use crate::{EXIT_NEGATIVE, Output, SocketArgs};

async fn client(socket: &SocketArgs) -> anyhow::Result<WorkloadApiClient> {
    WorkloadApiClient::connect_to(&socket.socket)
        .await
        .with_context(|| format!("cannot reach the Workload API at {} (is sigil-agent running, and is the socket mounted?)", socket.socket))
}

fn leaf_validity(der: &[u8]) -> Option<(SystemTime, SystemTime, String)> {
    let (_, c) = x509_parser::parse_x509_certificate(der).ok()?;
    let t = |x: i64| UNIX_EPOCH + Duration::from_secs(x.max(0) as u64);
    Some((
        t(c.validity().not_before.timestamp()),
        t(c.validity().not_after.timestamp()),
        c.raw_serial_as_string(),
    ))
}

fn context_json(ctx: &X509Context) -> serde_json::Value {
    let svids: Vec<_> = ctx
        .svids()
        .iter()
        .map(|s| {
            let (nb, na, serial) =
                leaf_validity(s.leaf().as_ref()).unwrap_or((UNIX_EPOCH, UNIX_EPOCH, String::new()));
            json!({
                "spiffe_id": s.spiffe_id().to_string(),
                "hint": s.hint(),
                "serial": serial,
                "not_before": when(nb),
                "not_after": when(na),
                "chain_length": s.cert_chain().len(),
            })
        })
        .collect();
    let bundles: serde_json::Map<String, serde_json::Value> = ctx
        .bundle_set()
        .iter()
        .map(|(td, b)| (td.to_string(), json!(b.authorities().len())))
        .collect();
    json!({"svids": svids, "bundles": bundles})
}

fn print_context(ctx: &X509Context) {
    for (i, s) in ctx.svids().iter().enumerate() {
        let chain = s.cert_chain();
        println!(
            "SPIFFE ID:   {}{}",
            s.spiffe_id(),
            if i == 0 { "  (default)" } else { "" }
        );
        if let Some(h) = s.hint().filter(|h| !h.is_empty()) {
            println!("Hint:        {h}");
        }
        if let Some((nb, na, serial)) = leaf_validity(s.leaf().as_ref()) {
            println!(
                "Valid:       {} .. {} (expires {})",
                when(nb),
                when(na),
                relative(na)
            );
            println!("Serial:      {serial}");
        }
        for (n, c) in chain.iter().enumerate().skip(1) {
            println!("Chain [{n}]:   {}", cert_line(c.as_ref()));
        }
        println!();
    }
    for (td, b) in ctx.bundle_set().iter() {
        println!(
            "Bundle:      {td} ({} X.509 authorit{})",
            b.authorities().len(),
            if b.authorities().len() == 1 {
                "y"
            } else {
                "ies"
            }
        );
    }
}

/// `sigil x509 fetch`.
pub(crate) async fn x509_fetch(socket: &SocketArgs, write: Option<&Path>) -> anyhow::Result<i32> {
    let started = std::time::Instant::now();
    let ctx = client(socket)
        .await?
        .fetch_x509_context()
        .await
        .context("FetchX509SVID")?;
    let took = started.elapsed();
    if let Some(dir) = write {
        std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
        for (i, s) in ctx.svids().iter().enumerate() {
            let certs: Vec<Vec<u8>> = s.cert_chain().iter().map(|c| c.as_ref().to_vec()).collect();
            std::fs::write(
                dir.join(format!("svid.{i}.pem")),
                sigil_identity::x509::certs_to_pem(&certs),
            )?;
            let key = pem::encode(&pem::Pem::new(
                "PRIVATE KEY",
                s.private_key().as_ref().to_vec(),
            ));
            use std::os::unix::fs::OpenOptionsExt;
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(dir.join(format!("svid.{i}.key")))?;
            std::io::Write::write_all(&mut f, key.as_bytes())?;
            let td = s.spiffe_id().trust_domain();
            if let Some(b) = ctx.bundle_set().get(td) {
                let roots: Vec<Vec<u8>> = b
                    .authorities()
                    .iter()
                    .map(|c| c.as_ref().to_vec())
                    .collect();
                std::fs::write(
                    dir.join(format!("bundle.{i}.pem")),
                    sigil_identity::x509::certs_to_pem(&roots),
                )?;
            }
        }
    }
    match socket.output {
        Output::Json => {
            let mut v = context_json(&ctx);
            v["fetch_ms"] = json!(took.as_secs_f64() * 1e3);
            println!("{v}");
        }
        Output::Text => {
            print_context(&ctx);
            println!("Fetched in:  {took:.1?}");
            if let Some(dir) = write {
                println!(
                    "Written to:  {} (svid.N.pem, svid.N.key, bundle.N.pem)",
                    dir.display()
                );
            }
        }
    }
    Ok(0)
}

/// `sigil x509 watch`.
pub(crate) async fn x509_watch(socket: &SocketArgs, count: Option<usize>) -> anyhow::Result<i32> {
    let c = client(socket).await?;
    let mut stream = c.stream_x509_contexts().await.context("FetchX509SVID")?;
    let mut seen = 0;
    while let Some(ctx) = stream.next().await {
        let ctx = ctx.context("the X509-SVID stream broke")?;
        seen += 1;
        match socket.output {
            Output::Json => {
                let mut v = context_json(&ctx);
                v["update"] = json!(seen);
                v["at"] = json!(when(SystemTime::now()));
                println!("{v}");
            }
            Output::Text => {
                println!("--- update {seen} at {} ---", when(SystemTime::now()));
                print_context(&ctx);
            }
        }
        if count.is_some_and(|n| seen >= n) {
            break;
        }
    }
    Ok(0)
}

/// `sigil jwt fetch`.
pub(crate) async fn jwt_fetch(
    socket: &SocketArgs,
    audience: &[String],
    spiffe_id: Option<&str>,
) -> anyhow::Result<i32> {
    let c = client(socket).await?;
    let id = spiffe_id
        .map(str::parse::<spiffe::SpiffeId>)
        .transpose()
        .context("--spiffe-id is not a SPIFFE ID")?;
    let svid = c
        .fetch_jwt_svid(audience, id.as_ref())
        .await
        .context("FetchJWTSVID")?;
    match socket.output {
        Output::Json => println!(
            "{}",
            json!({"spiffe_id": svid.spiffe_id().to_string(), "audience": svid.audience(), "expiry": svid.expiry().unix_timestamp(), "token": svid.token()})
        ),
        Output::Text => {
            eprintln!(
                "SPIFFE ID: {}  audience: {}  expires: {}",
                svid.spiffe_id(),
                svid.audience().join(","),
                when(
                    UNIX_EPOCH + Duration::from_secs(svid.expiry().unix_timestamp().max(0) as u64)
                )
            );
            println!("{}", svid.token());
        }
    }
    Ok(0)
}

/// `sigil jwt validate`.
pub(crate) async fn jwt_validate(
    socket: &SocketArgs,
    audience: &str,
    token: &str,
) -> anyhow::Result<i32> {
    let token = if token == "-" {
        let mut s = String::new();
        std::io::stdin()
            .read_to_string(&mut s)
            .context("read the token from stdin")?;
        s.trim().to_owned()
    } else {
        token.to_owned()
    };
    let c = client(socket).await?;
    match c.validate_jwt_token(audience, &token).await {
        Ok(svid) => {
            match socket.output {
                Output::Json => println!(
                    "{}",
                    json!({"valid": true, "spiffe_id": svid.spiffe_id().to_string(), "audience": svid.audience()})
                ),
                Output::Text => println!(
                    "valid: {} (audience {})",
                    svid.spiffe_id(),
                    svid.audience().join(",")
                ),
            }
            Ok(0)
        }
        Err(e) => {
            match socket.output {
                Output::Json => println!("{}", json!({"valid": false, "error": e.to_string()})),
                Output::Text => println!("invalid: {e}"),
            }
            Ok(EXIT_NEGATIVE)
        }
    }
}

/// `sigil bundle show`.
pub(crate) async fn bundle_show(socket: &SocketArgs, pem: bool) -> anyhow::Result<i32> {
    let c = client(socket).await?;
    let x509 = c.fetch_x509_bundles().await.context("FetchX509Bundles")?;
    let jwt = c.fetch_jwt_bundles().await.context("FetchJWTBundles")?;
    if pem {
        for (_, b) in x509.iter() {
            let roots: Vec<Vec<u8>> = b
                .authorities()
                .iter()
                .map(|c| c.as_ref().to_vec())
                .collect();
            print!("{}", sigil_identity::x509::certs_to_pem(&roots));
        }
        return Ok(0);
    }
    match socket.output {
        Output::Json => {
            let mut out = serde_json::Map::new();
            for (td, b) in x509.iter() {
                out.insert(
                    td.to_string(),
                    json!({"x509_authorities": b.authorities().len()}),
                );
            }
            for (td, b) in jwt.iter() {
                let kids: Vec<String> =
                    b.jwt_authorities().map(|a| a.key_id().to_owned()).collect();
                out.entry(td.to_string()).or_insert_with(|| json!({}))["jwt_key_ids"] = json!(kids);
            }
            println!("{}", serde_json::Value::Object(out));
        }
        Output::Text => {
            for (td, b) in x509.iter() {
                println!("{td}");
                for a in b.authorities() {
                    println!("  X.509: {}", cert_line(a.as_ref()));
                }
                if let Some(j) = jwt.get(td) {
                    for a in j.jwt_authorities() {
                        println!("  JWT:   key ID {}", a.key_id());
                    }
                }
            }
        }
    }
    Ok(0)
}
