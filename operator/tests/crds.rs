//! `crds/` holds exactly what the CRD types generate: users apply those files, so they must
//! never drift from the code. `make crds` rewrites them.

use std::collections::BTreeSet;

#[test]
fn crds_dir_matches_the_crd_types() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../crds");
    let rendered = sigil_operator::crd::render_all().expect("render CRDs");
    for (file, yaml) in &rendered {
        let committed = std::fs::read_to_string(dir.join(file)).unwrap_or_default();
        assert!(
            committed == *yaml,
            "crds/{file} is stale or missing: run `make crds` and commit the result"
        );
    }
    let expected: BTreeSet<String> = rendered.iter().map(|(f, _)| (*f).to_owned()).collect();
    let present: BTreeSet<String> = std::fs::read_dir(&dir)
        .expect("read crds/")
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .collect();
    assert_eq!(
        present, expected,
        "crds/ holds files no CRD type generates: remove them or run `make crds`"
    );
}
