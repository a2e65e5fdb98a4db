//! The template language of ClusterSPIFFEIDs: text with `{{ field }}` placeholders over a
//! fixed set of pod, namespace, node and cluster facts, parsed once into a typed
//! [`Template`] and rendered per pod.
//!
//! ```text
//! spiffe://{{ trustDomain }}/ns/{{ pod.namespace }}/sa/{{ pod.serviceAccountName }}
//! {{ pod.labels['app.kubernetes.io/name'] }}.{{ namespace.name }}.svc
//! ```
//!
//! Grammar (deliberately tiny, so a regular expression can check it at admission):
//! - text is any character except `{` and `}`;
//! - a placeholder is `{{`, optional spaces, a field, optional spaces, `}}`;
//! - a field is one of [`FIELDS`]; the keyed ones (`pod.labels`, `pod.annotations`,
//!   `namespace.labels`, `node.labels`) take a key in single quotes and square brackets,
//!   `pod.labels['app']`, made of letters, digits, `.`, `_`, `-` and `/`.
//!
//! [`FIELDS`] is the one table both the parser and the admission rule
//! ([`admission_pattern`], used by the CRD's CEL validation) are built from, so what the
//! apiserver admits and what the operator can render cannot drift apart.
//!
//! This module knows nothing of Kubernetes objects: the caller hands the facts of one pod
//! to [`Template::render`] as a [`RenderInput`].

use std::collections::BTreeMap;
use std::fmt;

/// Where a field's value comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Source {
    /// The trust domain name of the ClusterSPIFFEID's TrustDomain.
    TrustDomain,
    /// `metadata.name` of the pod.
    PodName,
    /// `metadata.namespace` of the pod.
    PodNamespace,
    /// `metadata.uid` of the pod.
    PodUid,
    /// `spec.serviceAccountName` of the pod.
    PodServiceAccountName,
    /// `spec.nodeName` of the pod.
    PodNodeName,
    /// `spec.hostname` of the pod, or its name when unset (as the kubelet does).
    PodHostname,
    /// One label of the pod.
    PodLabel,
    /// One annotation of the pod.
    PodAnnotation,
    /// The namespace's name.
    NamespaceName,
    /// One label of the namespace.
    NamespaceLabel,
    /// The node's name.
    NodeName,
    /// `metadata.uid` of the Node object.
    NodeUid,
    /// One label of the Node object.
    NodeLabel,
    /// The cluster name the operator is configured with.
    ClusterName,
    /// The cluster DNS domain the operator is configured with (`cluster.local`).
    ClusterDomain,
}

/// One field of the template language.
#[derive(Debug, Clone, Copy)]
pub struct FieldSpec {
    /// How it is written, e.g. `pod.serviceAccountName` or `pod.labels`.
    pub name: &'static str,
    /// Whether it takes a `['key']`.
    pub keyed: bool,
    /// Where the value comes from.
    pub source: Source,
    /// One line for documentation and error messages.
    pub doc: &'static str,
}

/// Every field the template language knows. The parser, the admission regex and the CRD
/// documentation are all generated from this table.
pub const FIELDS: &[FieldSpec] = &[
    FieldSpec {
        name: "trustDomain",
        keyed: false,
        source: Source::TrustDomain,
        doc: "the trust domain name",
    },
    FieldSpec {
        name: "pod.name",
        keyed: false,
        source: Source::PodName,
        doc: "the pod's name",
    },
    FieldSpec {
        name: "pod.namespace",
        keyed: false,
        source: Source::PodNamespace,
        doc: "the pod's namespace",
    },
    FieldSpec {
        name: "pod.uid",
        keyed: false,
        source: Source::PodUid,
        doc: "the pod's UID",
    },
    FieldSpec {
        name: "pod.serviceAccountName",
        keyed: false,
        source: Source::PodServiceAccountName,
        doc: "the pod's service account",
    },
    FieldSpec {
        name: "pod.nodeName",
        keyed: false,
        source: Source::PodNodeName,
        doc: "the node the pod is scheduled on",
    },
    FieldSpec {
        name: "pod.hostname",
        keyed: false,
        source: Source::PodHostname,
        doc: "spec.hostname of the pod, or its name when unset",
    },
    FieldSpec {
        name: "pod.labels",
        keyed: true,
        source: Source::PodLabel,
        doc: "a label of the pod",
    },
    FieldSpec {
        name: "pod.annotations",
        keyed: true,
        source: Source::PodAnnotation,
        doc: "an annotation of the pod",
    },
    FieldSpec {
        name: "namespace.name",
        keyed: false,
        source: Source::NamespaceName,
        doc: "the namespace's name",
    },
    FieldSpec {
        name: "namespace.labels",
        keyed: true,
        source: Source::NamespaceLabel,
        doc: "a label of the namespace",
    },
    FieldSpec {
        name: "node.name",
        keyed: false,
        source: Source::NodeName,
        doc: "the node's name",
    },
    FieldSpec {
        name: "node.uid",
        keyed: false,
        source: Source::NodeUid,
        doc: "the Node object's UID",
    },
    FieldSpec {
        name: "node.labels",
        keyed: true,
        source: Source::NodeLabel,
        doc: "a label of the node",
    },
    FieldSpec {
        name: "clusterName",
        keyed: false,
        source: Source::ClusterName,
        doc: "the cluster name the operator runs with",
    },
    FieldSpec {
        name: "clusterDomain",
        keyed: false,
        source: Source::ClusterDomain,
        doc: "the cluster DNS domain, e.g. cluster.local",
    },
];

/// Longest key accepted in `['...']` (a label key: 253-byte prefix, `/`, 63-byte name).
pub const MAX_KEY_LEN: usize = 317;

fn is_key_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | '/')
}

/// `a|b|...`: one alternative per field of [`FIELDS`], as RE2 (keyed fields with their
/// `['key']`).
fn field_alternatives() -> String {
    let fields: Vec<String> = FIELDS
        .iter()
        .map(|f| {
            let name = f.name.replace('.', r"\.");
            if f.keyed {
                format!(r"{name}\['[-A-Za-z0-9._/]+'\]")
            } else {
                name
            }
        })
        .collect();
    fields.join("|")
}

/// The RE2 regular expression (anchored) that accepts exactly the templates
/// [`Template::parse`] accepts, apart from the key length limit.
pub fn admission_pattern() -> String {
    format!(r"^([^{{}}]|\{{\{{ *({}) *\}}\}})*$", field_alternatives())
}

/// A CEL double-quoted string literal holding `regex` (backslashes doubled; the patterns
/// here have no double quote).
fn cel_string(regex: &str) -> String {
    debug_assert!(!regex.contains('"'));
    format!("\"{}\"", regex.replace('\\', r"\\"))
}

/// The CEL rule the CRD puts on every template string.
pub fn admission_rule() -> String {
    format!("self.matches({})", cel_string(&admission_pattern()))
}

/// The fields as a comma-separated list, keyed ones written `pod.labels['key']`.
pub fn field_list() -> String {
    FIELDS
        .iter()
        .map(|f| {
            if f.keyed {
                format!("{}['key']", f.name)
            } else {
                f.name.to_owned()
            }
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// The message the apiserver gives when the admission rule refuses a template (after the
/// field path and the refused value). A message expression naming the bad placeholder
/// would need `findAll` over the template, which the apiserver's cost budget refuses.
pub fn admission_message() -> String {
    format!(
        "is not a valid template: write text with {{{{ field }}}} placeholders (no other '{{' or '}}'), where field is one of: {}",
        field_list()
    )
}

/// Why a template does not parse. The offset is in bytes from the start of the template.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TemplateError {
    /// `{{ something }}` where `something` is not in [`FIELDS`].
    #[error(
        "unknown field {field:?} at offset {offset}; known fields: {}",
        field_list()
    )]
    UnknownField {
        /// What was written.
        field: String,
        /// Where it starts.
        offset: usize,
    },
    /// A keyed field without `['key']`, or a plain field with one.
    #[error("field {field:?} at offset {offset} {}", if *.keyed { "needs a key, e.g. pod.labels['app']" } else { "takes no ['key']" })]
    KeyMismatch {
        /// The field.
        field: String,
        /// Where it starts.
        offset: usize,
        /// Whether the field is a keyed one.
        keyed: bool,
    },
    /// A `['key']` that is malformed: unquoted, unterminated, empty, too long, or with a
    /// character other than letters, digits, `.`, `_`, `-`, `/`.
    #[error("bad key at offset {offset}: {reason}; write it as ['app.kubernetes.io/name']")]
    BadKey {
        /// Where the `[` is.
        offset: usize,
        /// What is wrong.
        reason: String,
    },
    /// `{{` without a matching `}}`.
    #[error("placeholder opened at offset {offset} is not closed with }}}}")]
    Unclosed {
        /// Where the `{{` is.
        offset: usize,
    },
    /// `{{ }}` with nothing inside.
    #[error("empty placeholder at offset {offset}")]
    Empty {
        /// Where the `{{` is.
        offset: usize,
    },
    /// A single `{` or `}` outside a placeholder, or junk inside one.
    #[error(
        "unexpected {found:?} at offset {offset}; text may not contain '{{' or '}}' outside {{{{ field }}}}"
    )]
    Unexpected {
        /// The character.
        found: char,
        /// Where it is.
        offset: usize,
    },
}

/// Why a parsed template could not be rendered for one pod.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RenderError {
    /// A keyed field whose key is absent (or whose object is unknown).
    #[error("{field} is not set")]
    Missing {
        /// The field as written, e.g. `pod.labels['app']`.
        field: String,
    },
    /// A field of an object that is not known yet (the Node of an unscheduled pod, or a
    /// Node the operator has not seen).
    #[error("{field} is unknown: {reason}")]
    Unavailable {
        /// The field.
        field: String,
        /// Why.
        reason: &'static str,
    },
}

/// Read access to labels or annotations, however they are stored.
pub trait KeyValues {
    /// The value of `key`, if set.
    fn value(&self, key: &str) -> Option<&str>;
}

impl KeyValues for BTreeMap<String, String> {
    fn value(&self, key: &str) -> Option<&str> {
        self.get(key).map(String::as_str)
    }
}

/// One piece of a parsed template.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Text(String),
    Field { source: Source, key: Option<String> },
}

/// A parsed template. Cheap to render; parse once per ClusterSPIFFEID generation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template {
    source: String,
    parts: Vec<Part>,
}

/// The facts of one pod (and its namespace and node) that templates can read.
#[derive(Clone, Copy)]
pub struct RenderInput<'a> {
    /// The trust domain name.
    pub trust_domain: &'a str,
    /// The configured cluster name.
    pub cluster_name: &'a str,
    /// The configured cluster DNS domain.
    pub cluster_domain: &'a str,
    /// The pod's name.
    pub pod_name: &'a str,
    /// The pod's namespace.
    pub pod_namespace: &'a str,
    /// The pod's UID.
    pub pod_uid: &'a str,
    /// The pod's service account.
    pub pod_service_account: &'a str,
    /// `spec.hostname`, if set.
    pub pod_hostname: Option<&'a str>,
    /// The pod's labels.
    pub pod_labels: &'a dyn KeyValues,
    /// The pod's annotations.
    pub pod_annotations: &'a dyn KeyValues,
    /// The namespace's labels, when the namespace is known.
    pub namespace_labels: Option<&'a dyn KeyValues>,
    /// `spec.nodeName`, when scheduled.
    pub node_name: Option<&'a str>,
    /// The Node's UID, when the Node is known.
    pub node_uid: Option<&'a str>,
    /// The Node's labels, when the Node is known.
    pub node_labels: Option<&'a dyn KeyValues>,
}

impl fmt::Debug for RenderInput<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RenderInput")
            .field("trust_domain", &self.trust_domain)
            .field(
                "pod",
                &format_args!("{}/{}", self.pod_namespace, self.pod_name),
            )
            .field("node", &self.node_name)
            .finish_non_exhaustive()
    }
}

impl Template {
    /// Parses `source`; the error names the offending field and its byte offset.
    pub fn parse(source: &str) -> Result<Self, TemplateError> {
        let mut parts = Vec::new();
        let mut text = String::new();
        let bytes = source.as_bytes();
        let mut i = 0;
        while i < source.len() {
            let c = source[i..].chars().next().unwrap_or_default();
            match c {
                '{' if bytes.get(i + 1) == Some(&b'{') => {
                    let (part, next) = parse_placeholder(source, i)?;
                    if !text.is_empty() {
                        parts.push(Part::Text(std::mem::take(&mut text)));
                    }
                    parts.push(part);
                    i = next;
                }
                '{' | '}' => {
                    return Err(TemplateError::Unexpected {
                        found: c,
                        offset: i,
                    });
                }
                _ => {
                    text.push(c);
                    i += c.len_utf8();
                }
            }
        }
        if !text.is_empty() {
            parts.push(Part::Text(text));
        }
        Ok(Self {
            source: source.to_owned(),
            parts,
        })
    }

    /// The template as written.
    pub fn as_str(&self) -> &str {
        &self.source
    }

    /// Whether rendering reads any of `sources`.
    pub fn uses_any(&self, sources: &[Source]) -> bool {
        self.parts
            .iter()
            .any(|p| matches!(p, Part::Field { source, .. } if sources.contains(source)))
    }

    /// Renders the template for one pod. A missing label or annotation, or a Node that
    /// is not known, is an error for this pod only.
    pub fn render(&self, input: &RenderInput<'_>) -> Result<String, RenderError> {
        let mut out = String::with_capacity(self.source.len() + 32);
        for part in &self.parts {
            match part {
                Part::Text(t) => out.push_str(t),
                Part::Field { source, key } => out.push_str(value(*source, key.as_deref(), input)?),
            }
        }
        Ok(out)
    }
}

impl fmt::Display for Template {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.source)
    }
}

fn field_name(source: Source) -> &'static str {
    FIELDS
        .iter()
        .find(|f| f.source == source)
        .map_or("?", |f| f.name)
}

fn keyed_name(source: Source, key: &str) -> String {
    format!("{}['{key}']", field_name(source))
}

fn lookup<'a>(
    source: Source,
    map: Option<&'a dyn KeyValues>,
    key: &str,
    unknown: &'static str,
) -> Result<&'a str, RenderError> {
    let map = map.ok_or_else(|| RenderError::Unavailable {
        field: keyed_name(source, key),
        reason: unknown,
    })?;
    map.value(key).ok_or_else(|| RenderError::Missing {
        field: keyed_name(source, key),
    })
}

const NO_NODE: &str = "the pod is not scheduled";
const UNKNOWN_NODE: &str = "the Node object has not been seen";

fn value<'a>(
    source: Source,
    key: Option<&str>,
    i: &RenderInput<'a>,
) -> Result<&'a str, RenderError> {
    let key = key.unwrap_or_default();
    Ok(match source {
        Source::TrustDomain => i.trust_domain,
        Source::PodName => i.pod_name,
        Source::PodNamespace => i.pod_namespace,
        Source::PodUid => i.pod_uid,
        Source::PodServiceAccountName => i.pod_service_account,
        Source::PodNodeName | Source::NodeName => i.node_name.ok_or(RenderError::Unavailable {
            field: field_name(source).to_owned(),
            reason: NO_NODE,
        })?,
        Source::PodHostname => i.pod_hostname.unwrap_or(i.pod_name),
        Source::PodLabel => lookup(source, Some(i.pod_labels), key, "")?,
        Source::PodAnnotation => lookup(source, Some(i.pod_annotations), key, "")?,
        Source::NamespaceName => i.pod_namespace,
        Source::NamespaceLabel => lookup(
            source,
            i.namespace_labels,
            key,
            "the Namespace object has not been seen",
        )?,
        Source::NodeUid => {
            if i.node_name.is_none() {
                return Err(RenderError::Unavailable {
                    field: field_name(source).to_owned(),
                    reason: NO_NODE,
                });
            }
            i.node_uid.ok_or(RenderError::Unavailable {
                field: field_name(source).to_owned(),
                reason: UNKNOWN_NODE,
            })?
        }
        Source::NodeLabel => {
            let why = if i.node_name.is_none() {
                NO_NODE
            } else {
                UNKNOWN_NODE
            };
            lookup(source, i.node_labels, key, why)?
        }
        Source::ClusterName => i.cluster_name,
        Source::ClusterDomain => i.cluster_domain,
    })
}

/// Parses the placeholder starting at `start` (which holds `{{`); returns it and the
/// offset just past its `}}`.
fn parse_placeholder(s: &str, start: usize) -> Result<(Part, usize), TemplateError> {
    let close = s[start + 2..]
        .find("}}")
        .map(|j| start + 2 + j)
        .ok_or(TemplateError::Unclosed { offset: start })?;
    let inner_start = start + 2;
    let inner = &s[inner_start..close];
    let lead = inner.len() - inner.trim_start_matches(' ').len();
    let body = inner.trim_matches(' ');
    let body_offset = inner_start + lead;
    if body.is_empty() {
        return Err(TemplateError::Empty { offset: start });
    }
    // The field name runs up to a `[` (keyed) or the end.
    let (name, rest) = match body.find('[') {
        Some(j) => body.split_at(j),
        None => (body, ""),
    };
    if let Some((j, c)) = name
        .char_indices()
        .find(|&(_, c)| !(c.is_ascii_alphanumeric() || c == '.'))
    {
        // A field name only has letters, digits and dots: report the first field-like
        // word when it is unknown, otherwise the stray character.
        let word = &name[..j];
        if !word.is_empty() && FIELDS.iter().all(|f| f.name != word) {
            return Err(TemplateError::UnknownField {
                field: word.to_owned(),
                offset: body_offset,
            });
        }
        return Err(TemplateError::Unexpected {
            found: c,
            offset: body_offset + j,
        });
    }
    let spec =
        FIELDS
            .iter()
            .find(|f| f.name == name)
            .ok_or_else(|| TemplateError::UnknownField {
                field: name.to_owned(),
                offset: body_offset,
            })?;
    let key = if rest.is_empty() {
        None
    } else {
        let key_offset = body_offset + name.len();
        if !spec.keyed {
            return Err(TemplateError::KeyMismatch {
                field: name.to_owned(),
                offset: body_offset,
                keyed: false,
            });
        }
        let quoted = rest
            .strip_prefix("['")
            .and_then(|r| r.strip_suffix("']"))
            .ok_or_else(|| TemplateError::BadKey {
                offset: key_offset,
                reason: "expected ['key']".into(),
            })?;
        if quoted.is_empty() {
            return Err(TemplateError::BadKey {
                offset: key_offset,
                reason: "the key is empty".into(),
            });
        }
        if quoted.len() > MAX_KEY_LEN {
            return Err(TemplateError::BadKey {
                offset: key_offset,
                reason: format!("the key is {} bytes; at most {MAX_KEY_LEN}", quoted.len()),
            });
        }
        if let Some(c) = quoted.chars().find(|&c| !is_key_char(c)) {
            return Err(TemplateError::BadKey {
                offset: key_offset,
                reason: format!(
                    "{c:?} is not allowed in a key (letters, digits, '.', '_', '-', '/')"
                ),
            });
        }
        Some(quoted.to_owned())
    };
    if spec.keyed && key.is_none() {
        return Err(TemplateError::KeyMismatch {
            field: name.to_owned(),
            offset: body_offset,
            keyed: true,
        });
    }
    Ok((
        Part::Field {
            source: spec.source,
            key,
        },
        close + 2,
    ))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn input<'a>(
        labels: &'a BTreeMap<String, String>,
        node: Option<&'a BTreeMap<String, String>>,
    ) -> RenderInput<'a> {
        RenderInput {
            trust_domain: "example.org",
            cluster_name: "c1",
            cluster_domain: "cluster.local",
            pod_name: "web-0",
            pod_namespace: "prod",
            pod_uid: "u-1",
            pod_service_account: "web",
            pod_hostname: None,
            pod_labels: labels,
            pod_annotations: labels,
            namespace_labels: Some(labels),
            node_name: Some("n1"),
            node_uid: node.map(|_| "nu-1"),
            node_labels: node.map(|n| n as &dyn KeyValues),
        }
    }

    #[test]
    fn renders_every_field() {
        let labels = BTreeMap::from([
            ("app".to_owned(), "web".to_owned()),
            ("a/b".to_owned(), "x".to_owned()),
        ]);
        let t = Template::parse(
            "{{trustDomain}}|{{ pod.name }}|{{pod.namespace}}|{{pod.uid}}|{{pod.serviceAccountName}}|{{pod.nodeName}}|{{pod.hostname}}|{{pod.labels['app']}}|{{pod.annotations['a/b']}}|{{namespace.name}}|{{namespace.labels['app']}}|{{node.name}}|{{node.uid}}|{{node.labels['app']}}|{{clusterName}}|{{clusterDomain}}",
        )
        .unwrap();
        assert_eq!(
            t.render(&input(&labels, Some(&labels))).unwrap(),
            "example.org|web-0|prod|u-1|web|n1|web-0|web|x|prod|web|n1|nu-1|web|c1|cluster.local"
        );
    }

    #[test]
    fn default_spiffe_template() {
        let labels = BTreeMap::new();
        let t = Template::parse(
            "spiffe://{{trustDomain}}/ns/{{pod.namespace}}/sa/{{pod.serviceAccountName}}",
        )
        .unwrap();
        assert_eq!(
            t.render(&input(&labels, None)).unwrap(),
            "spiffe://example.org/ns/prod/sa/web"
        );
        assert!(!t.uses_any(&[Source::NodeUid, Source::NodeLabel]));
    }

    #[test]
    fn errors_name_field_and_offset() {
        let e = Template::parse("spiffe://{{trustDomain}}/x/{{ pod.nme }}").unwrap_err();
        assert_eq!(
            e,
            TemplateError::UnknownField {
                field: "pod.nme".into(),
                offset: 30
            }
        );
        let msg = e.to_string();
        assert!(
            msg.contains("\"pod.nme\"")
                && msg.contains("offset 30")
                && msg.contains("pod.serviceAccountName"),
            "{msg}"
        );

        assert_eq!(
            Template::parse("a{{pod.name").unwrap_err(),
            TemplateError::Unclosed { offset: 1 }
        );
        assert_eq!(
            Template::parse("a{{  }}").unwrap_err(),
            TemplateError::Empty { offset: 1 }
        );
        assert_eq!(
            Template::parse("a}b").unwrap_err(),
            TemplateError::Unexpected {
                found: '}',
                offset: 1
            }
        );
        assert_eq!(
            Template::parse("a{b").unwrap_err(),
            TemplateError::Unexpected {
                found: '{',
                offset: 1
            }
        );
        assert!(matches!(
            Template::parse("{{pod.labels}}").unwrap_err(),
            TemplateError::KeyMismatch { keyed: true, .. }
        ));
        assert!(matches!(
            Template::parse("{{pod.name['x']}}").unwrap_err(),
            TemplateError::KeyMismatch { keyed: false, .. }
        ));
        assert!(matches!(
            Template::parse("{{pod.labels[\"x\"]}}").unwrap_err(),
            TemplateError::BadKey { offset: 12, .. }
        ));
        assert!(matches!(
            Template::parse("{{pod.labels['']}}").unwrap_err(),
            TemplateError::BadKey { .. }
        ));
        assert!(matches!(
            Template::parse("{{pod.labels['a b']}}").unwrap_err(),
            TemplateError::BadKey { .. }
        ));
        assert!(matches!(
            Template::parse("{{ .Pod.Name }}").unwrap_err(),
            TemplateError::UnknownField { .. }
        ));
        assert!(matches!(
            Template::parse("{{ pod.name | upper }}").unwrap_err(),
            TemplateError::UnknownField { .. } | TemplateError::Unexpected { .. }
        ));
    }

    #[test]
    fn missing_values_are_render_errors() {
        let labels = BTreeMap::new();
        let t = Template::parse("{{pod.labels['app']}}").unwrap();
        let e = t.render(&input(&labels, None)).unwrap_err();
        assert_eq!(e.to_string(), "pod.labels['app'] is not set");
        let t = Template::parse("{{node.uid}}").unwrap();
        assert!(
            t.render(&input(&labels, None))
                .unwrap_err()
                .to_string()
                .contains("Node object has not been seen")
        );
        let mut i = input(&labels, None);
        i.node_name = None;
        assert!(
            t.render(&i)
                .unwrap_err()
                .to_string()
                .contains("not scheduled")
        );
    }

    /// The admission regex and the parser agree on a corpus of good and bad templates.
    #[test]
    fn admission_pattern_agrees_with_parser() {
        let re = regex::Regex::new(&admission_pattern()).unwrap();
        assert!(
            !admission_pattern().contains('"'),
            "the pattern sits in a CEL double-quoted string"
        );
        let corpus = [
            "",
            "plain",
            "spiffe://{{trustDomain}}/ns/{{pod.namespace}}/sa/{{pod.serviceAccountName}}",
            "{{ pod.labels['app.kubernetes.io/name'] }}.svc",
            "{{  node.labels['topology.kubernetes.io/zone']  }}",
            "{{clusterName}}{{clusterDomain}}",
            "k8s:pod-label:app:{{pod.labels['app']}}",
            "{{pod.nme}}",
            "{{pod.labels}}",
            "{{pod.name['x']}}",
            "{{pod.labels[\"x\"]}}",
            "{{pod.labels['']}}",
            "{{pod.labels['a b']}}",
            "{{ .Pod.Name }}",
            "{{pod.name",
            "a}b",
            "{a}",
            "{{}}",
            "{{\tpod.name}}",
            "{{ pod.name | upper }}",
            "{{{pod.name}}}",
            "é{{pod.uid}}ü",
            "{{Pod.Name}}",
            "{{pod.labels['x']]}}",
        ];
        for t in corpus {
            assert_eq!(
                re.is_match(t),
                Template::parse(t).is_ok(),
                "regex and parser disagree on {t:?}"
            );
        }
        for f in FIELDS {
            let t = if f.keyed {
                format!("{{{{{}['k']}}}}", f.name)
            } else {
                format!("{{{{{}}}}}", f.name)
            };
            assert!(re.is_match(&t) && Template::parse(&t).is_ok(), "{t}");
        }
    }
}
