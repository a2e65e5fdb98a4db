//! Where the pinned test tools live: `make test-tools` builds them into
//! `$SIGIL_CACHE/bin` (default `${XDG_CACHE_HOME:-~/.cache}/sigil/bin`), the same place
//! `hack/versions.sh` names. `SIGIL_BIN` overrides the directory.

use std::path::PathBuf;

use crate::Error;

/// The directory the pinned tools are in.
pub fn bin_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("SIGIL_BIN") {
        return PathBuf::from(dir);
    }
    cache_dir().join("bin")
}

/// Sigil's cache directory (tools, Go caches).
pub fn cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("SIGIL_CACHE") {
        return PathBuf::from(dir);
    }
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(|| PathBuf::from("/tmp"));
    base.join("sigil")
}

/// The path of one pinned tool, or an error that says how to get it.
pub fn tool(name: &str) -> Result<PathBuf, Error> {
    let path = bin_dir().join(name);
    if path.is_file() {
        Ok(path)
    } else {
        Err(Error::ToolMissing {
            name: name.to_owned(),
            path,
        })
    }
}
