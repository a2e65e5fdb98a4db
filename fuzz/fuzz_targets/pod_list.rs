//! The operator's Pod LIST decoder (protobuf, and JSON as the fallback encoding): arbitrary
//! bytes never panic it, and every Pod it returns can be read for the index's facts
//! without panicking either.
#![no_main]
use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use sigil_operator::index::{PodFields, decode_pod_list};

fuzz_target!(|data: &[u8]| {
    // The first byte picks the encoding; protobuf inputs get the apiserver's prefix, so
    // the fuzzer spends its time inside the envelope rather than on the four magic bytes.
    let Some((&pick, rest)) = data.split_first() else { return };
    let protobuf = pick & 1 == 0;
    let body = if protobuf { [b"k8s\0".as_slice(), rest].concat() } else { rest.to_vec() };
    if let Ok(page) = decode_pod_list(Bytes::from(body), protobuf) {
        for pod in &page.items {
            let _ = pod.fields();
        }
    }
});
