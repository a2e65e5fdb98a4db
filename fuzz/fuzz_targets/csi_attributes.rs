//! Files-mode volume attributes, which a pod author writes: fileMode, fsGroup (with the
//! kubelet's volume_mount_group), jwtAudiences and formats. Never a panic; whatever is accepted
//! keeps its promises (a capped mode, distinct JWT file names of a bounded length).
#![no_main]
use std::collections::BTreeSet;

use libfuzzer_sys::fuzz_target;
use sigil_csi::files::audience_file;
use sigil_csi::service::{file_mode, formats, fs_group, jwt_audiences};

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else { return };
    let mut parts = s.splitn(3, '\n');
    let (a, b, c) = (
        parts.next().unwrap_or_default(),
        parts.next().unwrap_or_default(),
        parts.next().unwrap_or_default(),
    );
    if let Ok(mode) = file_mode(a) {
        assert!(mode & 0o400 != 0 && mode & 0o111 == 0 && mode & 0o002 == 0 && mode <= 0o777);
    }
    if let (Ok(Some(g)), false) = (fs_group(Some(a.to_owned()), b), b.is_empty()) {
        assert_eq!(Some(g), b.parse::<u32>().ok());
    }
    if let Ok(f) = formats(Some(c)) {
        let distinct: BTreeSet<_> = f.iter().collect();
        assert!(f.len() <= 3 && distinct.len() == f.len(), "{f:?}");
    }
    if let Ok(audiences) = jwt_audiences(Some(c)) {
        assert!(audiences.len() <= 16);
        let files: BTreeSet<String> = audiences.iter().map(|a| audience_file(a)).collect();
        assert_eq!(files.len(), audiences.len(), "two audiences share a file");
        for f in &files {
            let name = f.strip_prefix("jwt/").expect("under jwt/");
            assert!(!name.contains('/') && name.len() <= 255);
        }
    }
});
