//! The operator's Pod LIST decoder (protobuf, read as it arrives, and JSON as the fallback
//! encoding): arbitrary bytes never panic it, every Pod it returns can be read for the
//! index's facts without panicking either, and a protobuf body read in two pieces, split
//! anywhere, reads as it does whole.
#![no_main]
use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use sigil_operator::index::{PodFields, PodListReader, decode_pod_list};

/// The Pods' names and the list's end, read from `body` pushed as `pieces`.
fn in_pieces(pieces: [&[u8]; 2]) -> Option<(Vec<Option<String>>, sigil_operator::index::ListEnd)> {
    let mut reader = PodListReader::new();
    let mut names = Vec::new();
    for piece in pieces {
        reader.push(piece);
        while let Some(pod) = reader.next_pod().ok()? {
            names.push(pod.metadata.name);
        }
    }
    reader.finish().ok().map(|end| (names, end))
}

fuzz_target!(|data: &[u8]| {
    // The first byte picks the encoding and, for protobuf, where the body is split;
    // protobuf inputs get the apiserver's prefix, so the fuzzer spends its time inside the
    // envelope rather than on the four magic bytes.
    let Some((&pick, rest)) = data.split_first() else { return };
    let protobuf = pick & 1 == 0;
    let body = if protobuf { [b"k8s\0".as_slice(), rest].concat() } else { rest.to_vec() };
    let whole = decode_pod_list(Bytes::from(body.clone()), protobuf);
    if let Ok(page) = &whole {
        for pod in &page.items {
            let _ = pod.fields();
        }
    }
    if protobuf {
        let at = body.len() * usize::from(pick >> 1) / 127;
        let (a, b) = body.split_at(at.min(body.len()));
        let split = in_pieces([a, b]);
        let whole = whole
            .ok()
            .map(|page| (page.items.into_iter().map(|p| p.metadata.name).collect::<Vec<_>>(), page.end));
        assert_eq!(split, whole, "split at {at}");
    }
});
