//! `sigil inspect`: decode an X509-SVID (a PEM file: leaf first) or a JWT-SVID (a token,
//! or a file holding one), and verify it when a bundle is given.

use std::path::PathBuf;
use std::time::SystemTime;

use anyhow::Context as _;
use sigil_identity::{BundleSet, TrustBundle, x509};

use crate::EXIT_NEGATIVE;
use crate::output::{cert_line, relative, when};

/// Arguments of `sigil inspect`.
#[derive(Debug, Clone, clap::Args)]
pub struct InspectArgs {
    /// A PEM file (X509-SVID, leaf first), a file holding a JWT-SVID, or the token itself.
    pub what: String,
    /// A bundle to verify against: PEM certificates or a SPIFFE bundle (JWK Set).
    #[arg(long, short = 'b')]
    pub bundle: Option<PathBuf>,
    /// For a JWT-SVID: the audience it must carry (default: accept its first).
    #[arg(long, short = 'a')]
    pub audience: Option<String>,
}

/// Runs `sigil inspect`.
pub(crate) fn run(args: &InspectArgs) -> anyhow::Result<i32> {
    let text = match std::fs::read_to_string(&args.what) {
        Ok(t) => t,
        Err(_) if args.what.split('.').count() == 3 => args.what.clone(),
        Err(e) => {
            return Err(anyhow::anyhow!(
                "{}: {e} (give a PEM file, a token file or a token)",
                args.what
            ));
        }
    };
    if text.contains("-----BEGIN CERTIFICATE-----") {
        x509_svid(&text, args)
    } else {
        jwt_svid(text.trim(), args)
    }
}

fn load_bundle(
    args: &InspectArgs,
    td: &sigil_identity::TrustDomain,
) -> anyhow::Result<Option<TrustBundle>> {
    let Some(path) = &args.bundle else {
        return Ok(None);
    };
    let doc = std::fs::read(path).with_context(|| format!("read bundle {}", path.display()))?;
    Ok(Some(
        TrustBundle::from_jwks_or_pem(td.clone(), &doc)
            .with_context(|| format!("bundle {}", path.display()))?,
    ))
}

fn x509_svid(pem_text: &str, args: &InspectArgs) -> anyhow::Result<i32> {
    let chain = x509::certs_from_pem(pem_text).context("PEM certificates")?;
    let leaf =
        x509::inspect_leaf(&chain[0]).context("the first certificate is not an X509-SVID")?;
    println!("X509-SVID:   {}", leaf.spiffe_id);
    println!(
        "Valid:       {} .. {} (expires {})",
        when(leaf.not_before),
        when(leaf.not_after),
        relative(leaf.not_after)
    );
    if !leaf.dns_names.is_empty() {
        println!("DNS names:   {}", leaf.dns_names.join(", "));
    }
    for (i, c) in chain.iter().enumerate().skip(1) {
        println!("Chain [{i}]:   {}", cert_line(c));
    }
    let Some(bundle) = load_bundle(args, leaf.spiffe_id.trust_domain())? else {
        println!("(give --bundle to verify it)");
        return Ok(0);
    };
    match x509::validate_x509_svid(&chain, &bundle, SystemTime::now()) {
        Ok(v) => {
            println!(
                "Verified:    yes, chains to the {} bundle",
                v.spiffe_id.trust_domain()
            );
            Ok(0)
        }
        Err(e) => {
            println!("Verified:    NO: {e}");
            Ok(EXIT_NEGATIVE)
        }
    }
}

fn jwt_svid(token: &str, args: &InspectArgs) -> anyhow::Result<i32> {
    let (header, claims) =
        sigil_identity::jwt::peek(token).context("not an X509-SVID PEM nor a JWT")?;
    println!("JWT-SVID header: {}", serde_json::Value::Object(header));
    println!(
        "Claims:          {}",
        serde_json::Value::Object(claims.clone())
    );
    let sub = claims
        .get("sub")
        .and_then(|s| s.as_str())
        .context("the token has no sub")?;
    let id = sigil_identity::SpiffeId::parse(sub).context("sub is not a SPIFFE ID")?;
    let Some(bundle) = load_bundle(args, id.trust_domain())? else {
        println!("(give --bundle, a SPIFFE bundle with the JWT keys, to verify it)");
        return Ok(0);
    };
    let audience = args.audience.clone().or_else(|| match claims.get("aud") {
        Some(serde_json::Value::String(a)) => Some(a.clone()),
        Some(serde_json::Value::Array(a)) => a.first().and_then(|v| v.as_str()).map(str::to_owned),
        _ => None,
    });
    let mut set = BundleSet::new();
    set.upsert(bundle);
    match sigil_identity::jwt::validate_jwt_svid(
        token,
        &set,
        audience.as_deref().unwrap_or_default(),
        SystemTime::now(),
    ) {
        Ok(v) => {
            println!(
                "Verified:        yes, {} for audience {}",
                v.spiffe_id,
                audience.unwrap_or_default()
            );
            Ok(0)
        }
        Err(e) => {
            println!("Verified:        NO: {e}");
            Ok(EXIT_NEGATIVE)
        }
    }
}
