//! ClusterSPIFFEID templates: a template a user writes is parsed by hand, then rendered
//! with values a pod author controls (labels, annotations). Neither step panics; what
//! parses prints back to itself; a render is exactly the text parts and the values.
#![no_main]
use std::collections::BTreeMap;

use libfuzzer_sys::fuzz_target;
use sigil_operator::template::{RenderInput, Template};

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else { return };
    // The first line is the template; the rest are a pod's label and annotation values.
    let mut lines = s.splitn(2, '\n');
    let source = lines.next().unwrap_or_default();
    let value = lines.next().unwrap_or_default();
    let Ok(t) = Template::parse(source) else { return };
    assert_eq!(t.to_string(), source, "a parsed template prints as written");
    let mut kv = BTreeMap::new();
    for k in ["app", "example.com/path", "team", "sigil.dev/x"] {
        kv.insert(k.to_owned(), value.to_owned());
    }
    let input = RenderInput {
        trust_domain: "example.org",
        cluster_name: "c",
        cluster_domain: "cluster.local",
        pod_name: value,
        pod_namespace: "ns",
        pod_uid: "u",
        pod_service_account: "sa",
        pod_hostname: Some(value),
        pod_labels: &kv,
        pod_annotations: &kv,
        namespace_labels: Some(&kv),
        node_name: Some("n"),
        node_uid: Some("nu"),
        node_labels: Some(&kv),
    };
    if let Ok(out) = t.render(&input) {
        // Every placeholder takes at least 5 bytes of the source and yields one value.
        assert!(out.len() <= source.len() * (value.len() + 64));
    }
});
