//! `/proc/<pid>/cgroup` of a workload process: the process chooses its cgroup path only
//! within what the runtime allows, but the parser must never panic, and whatever pod it
//! finds has a UID and container ID of the expected shape.
#![no_main]
use libfuzzer_sys::fuzz_target;
use sigil_agent::attest::cgroup::{parse_cgroup_file, parse_cgroup_path};

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else { return };
    let check = |pc: &sigil_agent::attest::cgroup::PodContainer| {
        assert!(!pc.pod_uid.is_empty() && !pc.container_id.is_empty());
        assert!(!pc.pod_uid.contains('/') && !pc.container_id.contains('/'));
    };
    match parse_cgroup_file(s) {
        Ok(Some(pc)) => check(&pc),
        Ok(None) => {}
        Err((a, b)) => {
            check(&a);
            check(&b);
            assert_ne!(a, b);
        }
    }
    if let Some(pc) = parse_cgroup_path(s) {
        check(&pc);
    }
});
