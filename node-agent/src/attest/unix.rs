//! The unix workload attestor: selectors from the kernel's view of the calling process.
//!
//! Produces SPIRE-compatible selectors: `unix:uid:<n>`, `unix:gid:<n>`, `unix:user:<name>`,
//! `unix:group:<name>`, `unix:supplementary_gid:<n>`, `unix:path:<exe>`,
//! `unix:sha256:<hex of the executable>`. Names come from the agent's `/etc/passwd` and
//! `/etc/group` (the host's, when the agent runs with the host's /etc). The binary's hash is
//! read through `/proc/<pid>/exe` (so it is the file the process runs, even across mount
//! namespaces) and cached by (device, inode, size, mtime).

use std::collections::HashMap;
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::sync::Mutex;

use sha2::{Digest, Sha256};
use sigil_identity::entry::Selector;

use super::peer::PeerProcess;

/// Largest executable we hash (bigger ones get no sha256 selector).
const MAX_HASHED_BYTES: u64 = 512 * 1024 * 1024;

/// Unix attestor with its hash cache.
#[derive(Debug)]
pub struct UnixAttestor {
    etc: PathBuf,
    hashes: Mutex<HashMap<(u64, u64, u64, i64), String>>,
}

impl UnixAttestor {
    /// An attestor reading user and group names under `etc` (normally `/etc`).
    pub fn new(etc: impl Into<PathBuf>) -> Self {
        Self {
            etc: etc.into(),
            hashes: Mutex::default(),
        }
    }

    /// Selectors for `peer`. Only facts that could be read are returned.
    pub fn attest(&self, peer: &PeerProcess) -> Vec<Selector> {
        let mut out = vec![
            Selector::new("unix", format!("uid:{}", peer.uid)),
            Selector::new("unix", format!("gid:{}", peer.gid)),
        ];
        if let Some(name) = lookup_name(&self.etc.join("passwd"), peer.uid) {
            out.push(Selector::new("unix", format!("user:{name}")));
        }
        if let Some(name) = lookup_name(&self.etc.join("group"), peer.gid) {
            out.push(Selector::new("unix", format!("group:{name}")));
        }
        for gid in supplementary_gids(peer) {
            if gid != peer.gid {
                out.push(Selector::new("unix", format!("supplementary_gid:{gid}")));
            }
        }
        let exe = peer.proc_dir().join("exe");
        if let Ok(path) = std::fs::read_link(&exe) {
            out.push(Selector::new("unix", format!("path:{}", path.display())));
        }
        if let Some(hash) = self.hash_of(&exe) {
            out.push(Selector::new("unix", format!("sha256:{hash}")));
        }
        out
    }

    fn hash_of(&self, exe: &std::path::Path) -> Option<String> {
        let meta = std::fs::metadata(exe).ok()?;
        if meta.len() > MAX_HASHED_BYTES {
            return None;
        }
        let key = (meta.dev(), meta.ino(), meta.len(), meta.mtime());
        if let Some(h) = self
            .hashes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&key)
        {
            return Some(h.clone());
        }
        let mut file = std::fs::File::open(exe).ok()?;
        let mut hasher = Sha256::new();
        std::io::copy(&mut file, &mut hasher).ok()?;
        let hex = hex::encode(hasher.finalize());
        let mut cache = self.hashes.lock().unwrap_or_else(|p| p.into_inner());
        if cache.len() > 4096 {
            cache.clear();
        }
        cache.insert(key, hex.clone());
        Some(hex)
    }
}

/// Finds the name with numeric id `id` in a passwd- or group-format file.
fn lookup_name(file: &std::path::Path, id: u32) -> Option<String> {
    let text = std::fs::read_to_string(file).ok()?;
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        let mut f = l.split(':');
        let name = f.next()?;
        let _pw = f.next()?;
        let num: u32 = f.next()?.parse().ok()?;
        (num == id).then(|| name.to_owned())
    })
}

/// The `Groups:` line of /proc/<pid>/status.
fn supplementary_gids(peer: &PeerProcess) -> Vec<u32> {
    let Ok(status) = std::fs::read_to_string(peer.proc_dir().join("status")) else {
        return vec![];
    };
    status
        .lines()
        .find_map(|l| l.strip_prefix("Groups:"))
        .map(|g| {
            g.split_whitespace()
                .filter_map(|n| n.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::path::Path;

    #[test]
    fn attests_the_current_process() {
        let me = std::process::id() as i32;
        // SAFETY-free way to get our ids: read them from /proc.
        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        let uid: u32 = status
            .lines()
            .find_map(|l| l.strip_prefix("Uid:"))
            .unwrap()
            .split_whitespace()
            .nth(1)
            .unwrap()
            .parse()
            .unwrap();
        let peer = PeerProcess::pin(me, uid, 0, Path::new("/proc")).unwrap();
        let sels: Vec<String> = UnixAttestor::new("/etc")
            .attest(&peer)
            .iter()
            .map(|s| s.to_string())
            .collect();
        assert!(sels.contains(&format!("unix:uid:{uid}")));
        let exe = std::fs::read_link("/proc/self/exe").unwrap();
        assert!(
            sels.contains(&format!("unix:path:{}", exe.display())),
            "{sels:?}"
        );
        let expected = hex::encode(Sha256::digest(std::fs::read(&exe).unwrap()));
        assert!(sels.contains(&format!("unix:sha256:{expected}")));
        if uid == 0 {
            assert!(sels.contains(&"unix:user:root".to_string()));
        }
    }

    #[test]
    fn name_lookup() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("passwd"),
            "# c\nroot:x:0:0::/root:/bin/sh\nweb:x:1001:1001::/:/bin/false\n",
        )
        .unwrap();
        assert_eq!(
            lookup_name(&dir.path().join("passwd"), 1001).as_deref(),
            Some("web")
        );
        assert_eq!(lookup_name(&dir.path().join("passwd"), 5), None);
    }
}
