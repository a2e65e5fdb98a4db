//! Go templates of spire-controller-manager (`text/template` over its `templateData`:
//! `.TrustDomain`, `.ClusterName`, `.ClusterDomain`, `.PodMeta`, `.PodSpec`, `.NodeMeta`,
//! `.NodeSpec`) to Sigil's template language ([`sigil_api::template`]).
//!
//! Only what has an exact counterpart is translated: a field reference, a map key
//! (`.PodMeta.Labels.app` or `index .PodMeta.Labels "app.kubernetes.io/name"`), a string
//! literal, a comment. Pipelines, functions, conditionals, variables and fields Sigil does
//! not expose are refused with the reason, never guessed. Where a translation is exact
//! except at an edge, the edge is returned as a [`Caveat`] for the report.

use std::fmt;

/// Why a Go template has no Sigil equivalent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Untranslatable {
    /// The action as written, e.g. `{{ printf "%s" .PodMeta.Name }}`.
    pub action: String,
    /// Why.
    pub reason: String,
}

impl fmt::Display for Untranslatable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.action, self.reason)
    }
}

/// A translation that is exact except in a case the report must name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caveat(pub String);

/// A translated template and its caveats.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Translation {
    /// Sigil's template.
    pub template: String,
    /// Where Sigil and spire-controller-manager may still differ.
    pub caveats: Vec<Caveat>,
}

/// Translates one Go template.
pub fn translate(go: &str) -> Result<Translation, Untranslatable> {
    let mut out = String::new();
    let mut caveats = Vec::new();
    let mut rest = go;
    let mut trim_next = false;
    while !rest.is_empty() {
        let (text, after) = match rest.find("{{") {
            Some(i) => (&rest[..i], Some(&rest[i + 2..])),
            None => (rest, None),
        };
        let mut text = if trim_next { text.trim_start() } else { text };
        let Some(after) = after else {
            push_text(&mut out, text)?;
            break;
        };
        let end = after.find("}}").ok_or_else(|| Untranslatable {
            action: format!("{{{{{after}"),
            reason: "unclosed action".into(),
        })?;
        let mut inner = &after[..end];
        let raw = format!("{{{{{inner}}}}}");
        if let Some(i) = inner.strip_prefix('-')
            && i.starts_with([' ', '\t', '\n', '\r'])
        {
            text = text.trim_end();
            inner = i;
        }
        trim_next = false;
        if let Some(i) = inner.strip_suffix('-')
            && i.ends_with([' ', '\t', '\n', '\r'])
        {
            trim_next = true;
            inner = i;
        }
        push_text(&mut out, text)?;
        action(inner.trim(), &raw, &mut out, &mut caveats)?;
        rest = &after[end + 2..];
    }
    Ok(Translation {
        template: out,
        caveats,
    })
}

fn push_text(out: &mut String, text: &str) -> Result<(), Untranslatable> {
    if let Some(c) = text.chars().find(|c| matches!(c, '{' | '}')) {
        return Err(Untranslatable {
            action: text.to_owned(),
            reason: format!(
                "the text holds '{c}', which Sigil's template language has no escape for"
            ),
        });
    }
    out.push_str(text);
    Ok(())
}

fn refuse(raw: &str, reason: impl Into<String>) -> Untranslatable {
    Untranslatable {
        action: raw.to_owned(),
        reason: reason.into(),
    }
}

/// The maps templates can key into, and Sigil's keyed field for each.
const MAPS: &[(&str, &str)] = &[
    (".PodMeta.Labels", "pod.labels"),
    (".PodMeta.Annotations", "pod.annotations"),
    (".NodeMeta.Labels", "node.labels"),
];

/// Plain fields, and Sigil's field for each.
const FIELDS: &[(&str, &str)] = &[
    (".TrustDomain", "trustDomain"),
    (".ClusterName", "clusterName"),
    (".ClusterDomain", "clusterDomain"),
    (".PodMeta.Name", "pod.name"),
    (".PodMeta.Namespace", "pod.namespace"),
    (".PodMeta.UID", "pod.uid"),
    (".PodSpec.ServiceAccountName", "pod.serviceAccountName"),
    (".PodSpec.NodeName", "pod.nodeName"),
    (".PodSpec.Hostname", "pod.hostname"),
    (".NodeMeta.Name", "node.name"),
    (".NodeMeta.UID", "node.uid"),
];

fn action(
    inner: &str,
    raw: &str,
    out: &mut String,
    caveats: &mut Vec<Caveat>,
) -> Result<(), Untranslatable> {
    if inner.starts_with("/*") && inner.ends_with("*/") {
        return Ok(());
    }
    if let Some(s) = go_string(inner) {
        return push_text(out, &s);
    }
    if inner.contains('|') {
        return Err(refuse(raw, "a pipeline; Sigil templates have no functions"));
    }
    if inner.contains('$') {
        return Err(refuse(
            raw,
            "a template variable; Sigil templates have none",
        ));
    }
    let words: Vec<&str> = split_words(inner);
    match words.as_slice() {
        ["index", map, key] => {
            let field = MAPS
                .iter()
                .find(|(go, _)| go == map)
                .map(|(_, s)| *s)
                .ok_or_else(|| {
                    refuse(
                        raw,
                        format!("index of {map}; only {} can be indexed", map_names()),
                    )
                })?;
            let key =
                go_string(key).ok_or_else(|| refuse(raw, "the key is not a string literal"))?;
            keyed(field, &key, raw, out)?;
            caveats.push(Caveat(format!(
                "{raw}: a pod without that key renders as an empty string in SPIRE; in Sigil the pod is a render failure (no entry)"
            )));
            Ok(())
        }
        [one] if one.starts_with('.') => {
            if let Some((_, sigil)) = FIELDS.iter().find(|(go, _)| go == one) {
                out.push_str(&format!("{{{{{sigil}}}}}"));
                if *one == ".PodSpec.Hostname" {
                    caveats.push(Caveat(format!(
                        "{raw}: for a pod without spec.hostname SPIRE renders an empty string, Sigil the pod's name (what the kubelet uses as its hostname)"
                    )));
                }
                return Ok(());
            }
            for (go, sigil) in MAPS {
                if let Some(key) = one.strip_prefix(go).and_then(|k| k.strip_prefix('.')) {
                    // A missing key renders "<no value>" in SPIRE: never a valid SPIFFE ID or
                    // DNS name, as a missing key is a render failure in Sigil.
                    return keyed(sigil, key, raw, out);
                }
            }
            Err(refuse(raw, unknown_field(one)))
        }
        [first, ..]
            if matches!(
                *first,
                "if" | "else"
                    | "end"
                    | "range"
                    | "with"
                    | "define"
                    | "template"
                    | "block"
                    | "break"
                    | "continue"
            ) =>
        {
            Err(refuse(
                raw,
                format!(
                    "`{first}`: Sigil templates have no control structures; write one ClusterSPIFFEID per case (podSelector)"
                ),
            ))
        }
        [func, ..] => Err(refuse(
            raw,
            format!("the function `{func}`; Sigil templates have no functions"),
        )),
        [] => Err(refuse(raw, "an empty action")),
    }
}

fn keyed(field: &str, key: &str, raw: &str, out: &mut String) -> Result<(), Untranslatable> {
    if key.is_empty()
        || key.len() > sigil_api::template::MAX_KEY_LEN
        || !key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | '/'))
    {
        return Err(refuse(
            raw,
            format!("the key {key:?} is not a label or annotation key"),
        ));
    }
    out.push_str(&format!("{{{{{field}['{key}']}}}}"));
    Ok(())
}

fn map_names() -> String {
    MAPS.iter().map(|(g, _)| *g).collect::<Vec<_>>().join(", ")
}

fn unknown_field(field: &str) -> String {
    let hint = if field.starts_with(".NodeSpec") {
        "Sigil exposes no NodeSpec field (node.name, node.uid and node.labels['key'] are the node's)"
    } else if field.starts_with(".PodSpec") {
        "of PodSpec, Sigil exposes ServiceAccountName, NodeName and Hostname"
    } else if field.starts_with(".PodMeta") || field.starts_with(".NodeMeta") {
        "of the metadata, Sigil exposes Name, Namespace, UID, Labels and Annotations (nodes: Name, UID, Labels)"
    } else {
        "not a field of spire-controller-manager's template data"
    };
    format!("the field {field}: {hint}")
}

/// A Go string literal ("..." with the usual escapes, or `...`), unquoted.
fn go_string(s: &str) -> Option<String> {
    if s.len() >= 2 && s.starts_with('`') && s.ends_with('`') {
        return Some(s[1..s.len() - 1].to_owned());
    }
    if s.len() < 2 || !s.starts_with('"') || !s.ends_with('"') {
        return None;
    }
    let body = &s[1..s.len() - 1];
    let mut out = String::new();
    let mut chars = body.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => match chars.next()? {
                '"' => out.push('"'),
                '\\' => out.push('\\'),
                'n' => out.push('\n'),
                't' => out.push('\t'),
                _ => return None,
            },
            '"' => return None,
            c => out.push(c),
        }
    }
    Some(out)
}

/// Words of an action, keeping string literals whole.
fn split_words(s: &str) -> Vec<&str> {
    let mut words = Vec::new();
    let bytes = s.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i].is_ascii_whitespace() {
            i += 1;
            continue;
        }
        let start = i;
        if bytes[i] == b'"' || bytes[i] == b'`' {
            let q = bytes[i];
            i += 1;
            while i < bytes.len() && bytes[i] != q {
                if q == b'"' && bytes[i] == b'\\' {
                    i += 1;
                }
                i += 1;
            }
            i = (i + 1).min(bytes.len());
        } else {
            while i < bytes.len() && !bytes[i].is_ascii_whitespace() {
                i += 1;
            }
        }
        words.push(&s[start..i]);
    }
    words
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn ok(go: &str) -> String {
        let t = translate(go).unwrap_or_else(|e| panic!("{go}: {e}"));
        sigil_api::template::Template::parse(&t.template)
            .unwrap_or_else(|e| panic!("{go} → {}: {e}", t.template));
        t.template
    }

    #[test]
    fn the_usual_templates_translate() {
        assert_eq!(
            ok(
                "spiffe://{{ .TrustDomain }}/ns/{{ .PodMeta.Namespace }}/sa/{{ .PodSpec.ServiceAccountName }}"
            ),
            "spiffe://{{trustDomain}}/ns/{{pod.namespace}}/sa/{{pod.serviceAccountName}}"
        );
        assert_eq!(
            ok(
                "spiffe://{{.TrustDomain}}/{{ .PodMeta.Labels.app }}/{{ index .PodMeta.Labels \"app.kubernetes.io/name\" }}"
            ),
            "spiffe://{{trustDomain}}/{{pod.labels['app']}}/{{pod.labels['app.kubernetes.io/name']}}"
        );
        assert_eq!(
            ok("{{- .PodMeta.Name -}} . {{ .PodMeta.Namespace }}.svc.{{ .ClusterDomain }}"),
            "{{pod.name}}. {{pod.namespace}}.svc.{{clusterDomain}}"
        );
        assert_eq!(
            ok("k8s:ns:{{ .PodMeta.Namespace }}{{/* why */}}"),
            "k8s:ns:{{pod.namespace}}"
        );
        assert_eq!(
            ok("spiffe://{{ \"example.org\" }}/x"),
            "spiffe://example.org/x"
        );
        assert_eq!(
            ok("spiffe://{{ .TrustDomain }}/node/{{ .NodeMeta.Name }}/{{ .NodeMeta.Labels.zone }}"),
            "spiffe://{{trustDomain}}/node/{{node.name}}/{{node.labels['zone']}}"
        );
    }

    #[test]
    fn what_has_no_equivalent_is_refused_with_the_reason() {
        for (go, reason) in [
            (
                "spiffe://{{ .TrustDomain }}/{{ .PodMeta.Name | lower }}",
                "pipeline",
            ),
            (
                "spiffe://{{ .TrustDomain }}/{{ printf \"%s\" .PodMeta.Name }}",
                "`printf`",
            ),
            (
                "spiffe://{{ .TrustDomain }}/{{ if .PodMeta.Labels.app }}a{{ end }}",
                "`if`",
            ),
            (
                "spiffe://{{ .TrustDomain }}/{{ .PodSpec.Subdomain }}",
                "PodSpec",
            ),
            (
                "spiffe://{{ .TrustDomain }}/{{ .NodeSpec.ProviderID }}",
                "NodeSpec",
            ),
            ("spiffe://{{ .TrustDomain }}/{{ $x := 1 }}", "variable"),
            ("spiffe://{{ .TrustDomain }}/{{ .PodMeta.Name ", "unclosed"),
        ] {
            let e = translate(go).unwrap_err();
            assert!(e.reason.contains(reason), "{go}: {e}");
        }
    }

    #[test]
    fn edges_are_named() {
        let t = translate("spiffe://{{ .TrustDomain }}/h/{{ .PodSpec.Hostname }}").unwrap();
        assert_eq!(t.caveats.len(), 1);
        let t = translate("spiffe://{{ .TrustDomain }}/{{ index .PodMeta.Annotations \"team\" }}")
            .unwrap();
        assert!(t.caveats[0].0.contains("empty string"));
        assert!(
            translate("spiffe://{{ .TrustDomain }}/{{ .PodMeta.Name }}")
                .unwrap()
                .caveats
                .is_empty()
        );
    }
}
