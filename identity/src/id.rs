//! SPIFFE IDs and trust domain names, validated strictly per SPIFFE-ID.md.
//!
//! [`SpiffeId`] and [`TrustDomain`] are always-valid newtypes: holding one proves the
//! string passed every rule below. The parser is ours (the spec is short and its error
//! messages are part of our UX); conversions to the `spiffe` crate's types are provided
//! so interop code can use them.
//!
//! Rules enforced (each has its own [`IdError`] variant):
//! - scheme is exactly `spiffe://`;
//! - trust domain: 1..=255 bytes of lowercase `a-z`, `0-9`, `.`, `-`, `_`; no userinfo,
//!   no port;
//! - path: segments of `a-z A-Z 0-9 . - _`, none empty, none `.` or `..`, no trailing `/`;
//! - no query, fragment or percent-encoding anywhere;
//! - the whole ID at most 2048 bytes.

use std::fmt;
use std::str::FromStr;

/// Maximum length of a SPIFFE ID URI that implementations must support.
pub const MAX_SPIFFE_ID_LEN: usize = 2048;
/// Maximum length of a trust domain name.
pub const MAX_TRUST_DOMAIN_LEN: usize = 255;

/// The path under which Sigil's components have their IDs (`/sigil/agent/...`,
/// `/sigil/operator`, `/sigil/bundle-endpoint`). Workload SVIDs are never signed for it.
pub const RESERVED_PATH: &str = "/sigil";

const SCHEME_PREFIX: &str = "spiffe://";

/// Why a string is not a valid SPIFFE ID or trust domain name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum IdError {
    /// The input was empty.
    #[error("SPIFFE ID is empty; expected spiffe://<trust-domain>/<path>")]
    Empty,
    /// No `scheme://` at all.
    #[error("{input:?} has no scheme; a SPIFFE ID starts with \"spiffe://\"")]
    MissingScheme {
        /// The rejected input (truncated).
        input: String,
    },
    /// A scheme other than (lowercase) `spiffe`.
    #[error("scheme {found:?} is not allowed; a SPIFFE ID starts with \"spiffe://\"")]
    WrongScheme {
        /// The scheme that was found.
        found: String,
    },
    /// Nothing between `spiffe://` and the path.
    #[error("trust domain is missing; expected spiffe://<trust-domain>/<path>")]
    MissingTrustDomain,
    /// Uppercase letter in the trust domain.
    #[error(
        "trust domain {td:?} contains uppercase letters; trust domain names are lowercase (use {lower:?})"
    )]
    UppercaseTrustDomain {
        /// The trust domain as given.
        td: String,
        /// The lowercase form the user probably meant.
        lower: String,
    },
    /// A character outside `[a-z0-9._-]` in the trust domain.
    #[error(
        "trust domain contains {ch:?}; only lowercase letters, digits, '.', '-' and '_' are allowed"
    )]
    BadTrustDomainChar {
        /// The offending character.
        ch: char,
    },
    /// `host:port` form.
    #[error("trust domain must not contain a port (\":{port}\"); remove it")]
    Port {
        /// What followed the colon.
        port: String,
    },
    /// `user@host` form.
    #[error("trust domain must not contain userinfo (\"...@\"); remove it")]
    Userinfo,
    /// A `?` anywhere.
    #[error("SPIFFE ID must not contain a query (\"?...\")")]
    Query,
    /// A `#` anywhere.
    #[error("SPIFFE ID must not contain a fragment (\"#...\")")]
    Fragment,
    /// A `%` anywhere.
    #[error(
        "SPIFFE ID must not contain percent-encoding (\"%\"); use only letters, digits, '.', '-', '_'"
    )]
    PercentEncoded,
    /// `//` inside the path.
    #[error("path contains an empty segment (\"//\")")]
    EmptySegment,
    /// `/.` or `/..` segment.
    #[error("path contains a dot segment ({segment:?}); '.' and '..' are not allowed")]
    DotSegment {
        /// `.` or `..`.
        segment: String,
    },
    /// Path ends with `/`.
    #[error("path must not end with '/'")]
    TrailingSlash,
    /// A character outside `[a-zA-Z0-9._-]` in a path segment.
    #[error("path contains {ch:?}; path segments allow only letters, digits, '.', '-' and '_'")]
    BadPathChar {
        /// The offending character.
        ch: char,
    },
    /// Path given to [`SpiffeId::from_parts`] does not start with `/`.
    #[error("path {path:?} must be empty or start with '/'")]
    RelativePath {
        /// The rejected path.
        path: String,
    },
    /// The whole ID is longer than [`MAX_SPIFFE_ID_LEN`].
    #[error("SPIFFE ID is {len} bytes; the maximum is {max}")]
    TooLong {
        /// Length of the input.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The trust domain is longer than [`MAX_TRUST_DOMAIN_LEN`].
    #[error("trust domain is {len} bytes; the maximum is {max}")]
    TrustDomainTooLong {
        /// Length of the trust domain.
        len: usize,
        /// The limit.
        max: usize,
    },
}

/// A validated trust domain name, e.g. `example.org`.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TrustDomain(String);

impl TrustDomain {
    /// Validates a bare trust domain name (`example.org`). Use [`TrustDomain::parse`] to
    /// also accept the `spiffe://example.org` form.
    pub fn new(name: &str) -> Result<Self, IdError> {
        check_trust_domain(name)?;
        Ok(Self(name.to_owned()))
    }

    /// Accepts either a bare name or the trust domain's SPIFFE ID (`spiffe://example.org`).
    pub fn parse(s: &str) -> Result<Self, IdError> {
        if s.contains("://") {
            let id = SpiffeId::parse(s)?;
            if !id.path().is_empty() {
                return Err(IdError::BadTrustDomainChar { ch: '/' });
            }
            Ok(id.td)
        } else {
            Self::new(s)
        }
    }

    /// The bare name.
    pub fn name(&self) -> &str {
        &self.0
    }

    /// The trust domain's own SPIFFE ID, `spiffe://<name>`: the key of bundle maps in
    /// the Workload API.
    pub fn id_string(&self) -> String {
        format!("{SCHEME_PREFIX}{}", self.0)
    }

    /// A SPIFFE ID in this trust domain with the given path (`""` or `/...`).
    pub fn id(&self, path: &str) -> Result<SpiffeId, IdError> {
        SpiffeId::from_parts(self, path)
    }

    /// The `spiffe` crate's equivalent.
    pub fn to_spiffe(&self) -> spiffe::TrustDomain {
        // Our rules are stricter than the crate's, so this cannot fail.
        spiffe::TrustDomain::new(&self.0).unwrap_or_else(|_| unreachable!("validated trust domain"))
    }
}

impl fmt::Display for TrustDomain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for TrustDomain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TrustDomain({})", self.0)
    }
}

impl FromStr for TrustDomain {
    type Err = IdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

/// A validated SPIFFE ID, e.g. `spiffe://example.org/ns/default/sa/web`.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SpiffeId {
    uri: String,
    td: TrustDomain,
}

impl SpiffeId {
    /// Parses and validates a SPIFFE ID.
    pub fn parse(s: &str) -> Result<Self, IdError> {
        if s.is_empty() {
            return Err(IdError::Empty);
        }
        if s.len() > MAX_SPIFFE_ID_LEN {
            return Err(IdError::TooLong {
                len: s.len(),
                max: MAX_SPIFFE_ID_LEN,
            });
        }
        let rest = match s.strip_prefix(SCHEME_PREFIX) {
            Some(rest) => rest,
            None => {
                return Err(match s.find("://") {
                    Some(i) => IdError::WrongScheme {
                        found: s[..i].to_owned(),
                    },
                    None => IdError::MissingScheme {
                        input: s.chars().take(64).collect(),
                    },
                });
            }
        };
        // Query, fragment and percent-encoding are refused wherever they appear, with a
        // precise reason instead of a generic "bad character".
        if rest.contains('?') {
            return Err(IdError::Query);
        }
        if rest.contains('#') {
            return Err(IdError::Fragment);
        }
        if rest.contains('%') {
            return Err(IdError::PercentEncoded);
        }
        let (authority, path) = match rest.find('/') {
            Some(i) => rest.split_at(i),
            None => (rest, ""),
        };
        check_trust_domain(authority)?;
        check_path(path)?;
        Ok(Self {
            uri: s.to_owned(),
            td: TrustDomain(authority.to_owned()),
        })
    }

    /// Builds `spiffe://<td><path>`; `path` is `""` or starts with `/`.
    pub fn from_parts(td: &TrustDomain, path: &str) -> Result<Self, IdError> {
        if !path.is_empty() && !path.starts_with('/') {
            return Err(IdError::RelativePath {
                path: path.to_owned(),
            });
        }
        Self::parse(&format!("{SCHEME_PREFIX}{}{path}", td.name()))
    }

    /// The trust domain this ID belongs to.
    pub fn trust_domain(&self) -> &TrustDomain {
        &self.td
    }

    /// The path, `""` or starting with `/`.
    pub fn path(&self) -> &str {
        &self.uri[SCHEME_PREFIX.len() + self.td.0.len()..]
    }

    /// The full URI.
    pub fn as_str(&self) -> &str {
        &self.uri
    }

    /// Whether the ID is in `td`.
    pub fn is_member_of(&self, td: &TrustDomain) -> bool {
        &self.td == td
    }

    /// Whether the path is reserved for Sigil's own components ([`RESERVED_PATH`] or
    /// below it): agents, the operator, the bundle endpoint. No workload SVID is ever
    /// signed for such an ID.
    pub fn is_reserved(&self) -> bool {
        let path = self.path();
        path.strip_prefix(RESERVED_PATH)
            .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
    }

    /// The `spiffe` crate's equivalent.
    pub fn to_spiffe(&self) -> spiffe::SpiffeId {
        spiffe::SpiffeId::new(&self.uri).unwrap_or_else(|_| unreachable!("validated SPIFFE ID"))
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.uri)
    }
}

impl fmt::Debug for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SpiffeId({})", self.uri)
    }
}

impl FromStr for SpiffeId {
    type Err = IdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

impl serde::Serialize for SpiffeId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.uri)
    }
}

impl<'de> serde::Deserialize<'de> for SpiffeId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Self::parse(&s).map_err(serde::de::Error::custom)
    }
}

impl serde::Serialize for TrustDomain {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de> serde::Deserialize<'de> for TrustDomain {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Self::parse(&s).map_err(serde::de::Error::custom)
    }
}

fn check_trust_domain(td: &str) -> Result<(), IdError> {
    if td.is_empty() {
        return Err(IdError::MissingTrustDomain);
    }
    if td.contains('@') {
        return Err(IdError::Userinfo);
    }
    if let Some(i) = td.find(':') {
        return Err(IdError::Port {
            port: td[i + 1..].to_owned(),
        });
    }
    if td.len() > MAX_TRUST_DOMAIN_LEN {
        return Err(IdError::TrustDomainTooLong {
            len: td.len(),
            max: MAX_TRUST_DOMAIN_LEN,
        });
    }
    if td.bytes().any(|b| b.is_ascii_uppercase()) {
        return Err(IdError::UppercaseTrustDomain {
            td: td.to_owned(),
            lower: td.to_ascii_lowercase(),
        });
    }
    match td
        .chars()
        .find(|&c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '-' | '_')))
    {
        Some(ch) => Err(IdError::BadTrustDomainChar { ch }),
        None => Ok(()),
    }
}

fn check_path(path: &str) -> Result<(), IdError> {
    if path.is_empty() {
        return Ok(());
    }
    // `path` starts with '/', so the first split item is the empty string before it.
    let mut segments = path.split('/').skip(1).peekable();
    while let Some(seg) = segments.next() {
        if seg.is_empty() {
            return Err(if segments.peek().is_none() {
                IdError::TrailingSlash
            } else {
                IdError::EmptySegment
            });
        }
        if seg == "." || seg == ".." {
            return Err(IdError::DotSegment {
                segment: seg.to_owned(),
            });
        }
        if let Some(ch) = seg
            .chars()
            .find(|&c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_')))
        {
            return Err(IdError::BadPathChar { ch });
        }
    }
    Ok(())
}

/// Whether `name` is a DNS name an X509-SVID may carry as a SAN: letters, digits and
/// hyphens in labels of 1 to 63 bytes that neither start nor end with a hyphen, at most
/// 253 bytes in all, optionally with one leading `*.` wildcard label (counted in the 253).
pub fn is_dns_name(name: &str) -> bool {
    let host = name.strip_prefix("*.").unwrap_or(name);
    !host.is_empty()
        && name.len() <= 253
        && host.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// One rule for the CA and the index (they had drifted: the CA left the wildcard out
    /// of the 253-byte limit, so it signed a name the index refused).
    #[test]
    fn dns_names_count_the_wildcard_in_the_253_bytes() {
        let labels = |n: usize| vec!["a".repeat(63); n].join(".");
        let host = format!("{}.{}", labels(3), "b".repeat(61)); // 63*3 + 3 + 61 = 253
        assert_eq!(host.len(), 253);
        assert!(is_dns_name(&host));
        assert!(
            !is_dns_name(&format!("*.{host}")),
            "255 bytes with the wildcard"
        );
        assert!(is_dns_name("*.web.default.svc"));
        for bad in ["", "*.", "-a.b", "a-.b", "a..b", "a_b.c", &"a".repeat(64)] {
            assert!(!is_dns_name(bad), "{bad:?}");
        }
    }

    fn err(s: &str) -> IdError {
        SpiffeId::parse(s).unwrap_err()
    }

    #[test]
    fn accepts_valid_ids() {
        for s in [
            "spiffe://example.org",
            "spiffe://example.org/ns/default/sa/web",
            "spiffe://a_b-c.d9/Upper.Case-path_ok/x",
            "spiffe://td/...a/a..",
        ] {
            let id = SpiffeId::parse(s).unwrap();
            assert_eq!(id.as_str(), s);
            assert_eq!(id.to_string(), s);
        }
        let id = SpiffeId::parse("spiffe://example.org/ns/x").unwrap();
        assert_eq!(id.trust_domain().name(), "example.org");
        assert_eq!(id.path(), "/ns/x");
        assert_eq!(id.to_spiffe().to_string(), "spiffe://example.org/ns/x");
    }

    #[test]
    fn rejects_empty() {
        assert_eq!(err(""), IdError::Empty);
        assert!(err("").to_string().contains("empty"));
    }

    #[test]
    fn rejects_missing_scheme() {
        assert!(matches!(
            err("example.org/path"),
            IdError::MissingScheme { .. }
        ));
        assert!(err("example.org/path").to_string().contains("spiffe://"));
    }

    #[test]
    fn rejects_wrong_scheme() {
        assert_eq!(
            err("https://example.org/x"),
            IdError::WrongScheme {
                found: "https".into()
            }
        );
        assert_eq!(
            err("SPIFFE://example.org/x"),
            IdError::WrongScheme {
                found: "SPIFFE".into()
            }
        );
        assert!(err("https://example.org").to_string().contains("\"https\""));
    }

    #[test]
    fn rejects_missing_trust_domain() {
        assert_eq!(err("spiffe://"), IdError::MissingTrustDomain);
        assert_eq!(err("spiffe:///path"), IdError::MissingTrustDomain);
    }

    #[test]
    fn rejects_uppercase_trust_domain() {
        let e = err("spiffe://Example.org/x");
        assert_eq!(
            e,
            IdError::UppercaseTrustDomain {
                td: "Example.org".into(),
                lower: "example.org".into()
            }
        );
        assert!(e.to_string().contains("use \"example.org\""));
    }

    #[test]
    fn rejects_port() {
        assert_eq!(
            err("spiffe://example.org:8443/x"),
            IdError::Port {
                port: "8443".into()
            }
        );
        assert!(
            err("spiffe://example.org:8443")
                .to_string()
                .contains("port")
        );
    }

    #[test]
    fn rejects_userinfo() {
        assert_eq!(err("spiffe://user@example.org/x"), IdError::Userinfo);
        assert_eq!(err("spiffe://user:pw@example.org/x"), IdError::Userinfo);
    }

    #[test]
    fn rejects_query() {
        assert_eq!(err("spiffe://example.org/x?a=b"), IdError::Query);
        assert_eq!(err("spiffe://example.org?a=b"), IdError::Query);
    }

    #[test]
    fn rejects_fragment() {
        assert_eq!(err("spiffe://example.org/x#frag"), IdError::Fragment);
    }

    #[test]
    fn rejects_percent_encoding() {
        assert_eq!(err("spiffe://example.org/a%20b"), IdError::PercentEncoded);
        assert_eq!(err("spiffe://ex%41mple.org/a"), IdError::PercentEncoded);
    }

    #[test]
    fn rejects_empty_segment() {
        assert_eq!(err("spiffe://example.org//x"), IdError::EmptySegment);
        assert_eq!(err("spiffe://example.org/a//b"), IdError::EmptySegment);
    }

    #[test]
    fn rejects_dot_segments() {
        assert_eq!(
            err("spiffe://example.org/./x"),
            IdError::DotSegment {
                segment: ".".into()
            }
        );
        assert_eq!(
            err("spiffe://example.org/a/.."),
            IdError::DotSegment {
                segment: "..".into()
            }
        );
    }

    #[test]
    fn rejects_trailing_slash() {
        assert_eq!(err("spiffe://example.org/"), IdError::TrailingSlash);
        assert_eq!(err("spiffe://example.org/a/"), IdError::TrailingSlash);
    }

    #[test]
    fn rejects_bad_characters() {
        assert_eq!(
            err("spiffe://exa$mple.org/x"),
            IdError::BadTrustDomainChar { ch: '$' }
        );
        assert_eq!(
            err("spiffe://example.org/a b"),
            IdError::BadPathChar { ch: ' ' }
        );
        assert_eq!(
            err("spiffe://example.org/a*b"),
            IdError::BadPathChar { ch: '*' }
        );
        assert_eq!(
            err("spiffe://example.org/é"),
            IdError::BadPathChar { ch: 'é' }
        );
    }

    #[test]
    fn length_limits() {
        // Exactly 2048 bytes is accepted.
        let head = "spiffe://example.org/";
        let ok = format!("{head}{}", "a".repeat(MAX_SPIFFE_ID_LEN - head.len()));
        assert_eq!(ok.len(), 2048);
        SpiffeId::parse(&ok).unwrap();
        let long = format!("{ok}a");
        assert_eq!(
            err(&long),
            IdError::TooLong {
                len: 2049,
                max: 2048
            }
        );

        let td255 = "a".repeat(255);
        SpiffeId::parse(&format!("spiffe://{td255}/x")).unwrap();
        TrustDomain::new(&td255).unwrap();
        let td256 = "a".repeat(256);
        assert_eq!(
            err(&format!("spiffe://{td256}/x")),
            IdError::TrustDomainTooLong { len: 256, max: 255 }
        );
    }

    #[test]
    fn trust_domain_forms() {
        assert_eq!(
            TrustDomain::parse("spiffe://example.org").unwrap().name(),
            "example.org"
        );
        assert_eq!(
            TrustDomain::parse("example.org").unwrap().id_string(),
            "spiffe://example.org"
        );
        assert!(TrustDomain::parse("spiffe://example.org/x").is_err());
        assert!(matches!(
            TrustDomain::new("Example.org"),
            Err(IdError::UppercaseTrustDomain { .. })
        ));
        assert_eq!(TrustDomain::new(""), Err(IdError::MissingTrustDomain));
    }

    #[test]
    fn from_parts() {
        let td = TrustDomain::new("example.org").unwrap();
        assert_eq!(td.id("/a/b").unwrap().as_str(), "spiffe://example.org/a/b");
        assert_eq!(td.id("").unwrap().as_str(), "spiffe://example.org");
        assert!(matches!(td.id("a/b"), Err(IdError::RelativePath { .. })));
    }

    #[test]
    fn serde_round_trip() {
        let id: SpiffeId = serde_json::from_str("\"spiffe://example.org/x\"").unwrap();
        assert_eq!(
            serde_json::to_string(&id).unwrap(),
            "\"spiffe://example.org/x\""
        );
        assert!(serde_json::from_str::<SpiffeId>("\"spiffe://Example.org/x\"").is_err());
    }
}
