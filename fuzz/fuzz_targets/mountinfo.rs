//! sigil-csi's mountinfo field unescaping (`\ooo`): never panics, never grows the text,
//! and leaves text without backslashes as it is.
#![no_main]
use libfuzzer_sys::fuzz_target;
use sigil_csi::mounter::unescape;

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else { return };
    let out = unescape(s);
    assert!(out.len() <= s.len() * 3);
    if !s.contains('\\') {
        assert_eq!(out, s);
    }
});
