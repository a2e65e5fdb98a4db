//! The unix workload attestor: selectors from the kernel's view of the calling process.
//!
//! Produces SPIRE-compatible selectors: `unix:uid:<n>`, `unix:gid:<n>`, `unix:user:<name>`,
//! `unix:group:<name>`, `unix:supplementary_gid:<n>`, `unix:path:<exe>`,
//! `unix:sha256:<hex of the executable>`. Names come from the agent's `/etc/passwd` and
//! `/etc/group` (the host's, when the agent runs with the host's /etc).
//!
//! The binary's hash is read through `/proc/<pid>/exe` (so it is the file the process runs,
//! even across mount namespaces). Hashing up to [`MAX_HASHED_BYTES`] costs a core for
//! seconds, and the caller chooses the file, so:
//! - it runs on tokio's blocking pool, never on the async runtime the agent serves every
//!   workload from, and at most [`MAX_CONCURRENT_HASHES`] at once;
//! - concurrent attestations of one file wait for one hash;
//! - results are cached by [`FileKey`] (device, inode, size, mtime and ctime, to the
//!   nanosecond) taken from the opened file itself. Any write, `touch` or `utimensat`
//!   changes the ctime (which no unprivileged process can set back), so a changed file is
//!   always hashed again; and a file that changes while being hashed is not cached and
//!   gets no `sha256` selector.

use std::collections::HashMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use sha2::{Digest, Sha256};
use sigil_identity::entry::Selector;
use tokio::sync::{OnceCell, Semaphore};

use super::peer::PeerProcess;

/// Largest executable we hash (bigger ones get no sha256 selector).
pub const MAX_HASHED_BYTES: u64 = 512 * 1024 * 1024;
/// Most executables hashed at once.
pub const MAX_CONCURRENT_HASHES: usize = 2;
/// Most hashes cached.
const MAX_CACHED: usize = 4096;

/// What identifies a file's content without reading it: where it is and every time a
/// change to it updates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FileKey {
    dev: u64,
    ino: u64,
    size: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

impl FileKey {
    /// The key of a file's metadata.
    pub fn of(meta: &std::fs::Metadata) -> Self {
        Self {
            dev: meta.dev(),
            ino: meta.ino(),
            size: meta.len(),
            mtime: (meta.mtime(), meta.mtime_nsec()),
            ctime: (meta.ctime(), meta.ctime_nsec()),
        }
    }
}

type Pending = Arc<OnceCell<Option<String>>>;

/// Unix attestor with its hash cache.
#[derive(Debug)]
pub struct UnixAttestor {
    etc: PathBuf,
    hashes: Mutex<HashMap<FileKey, String>>,
    hashing: Mutex<HashMap<FileKey, Pending>>,
    permits: Arc<Semaphore>,
}

impl UnixAttestor {
    /// An attestor reading user and group names under `etc` (normally `/etc`).
    pub fn new(etc: impl Into<PathBuf>) -> Self {
        Self {
            etc: etc.into(),
            hashes: Mutex::default(),
            hashing: Mutex::default(),
            permits: Arc::new(Semaphore::new(MAX_CONCURRENT_HASHES)),
        }
    }

    /// Selectors for `peer`. Only facts that could be read are returned.
    pub async fn attest(&self, peer: &PeerProcess) -> Vec<Selector> {
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
        if let Some(hash) = self.hash_of(&exe).await {
            out.push(Selector::new("unix", format!("sha256:{hash}")));
        }
        out
    }

    /// The SHA-256 of `exe` (hex), from the cache or hashed off the runtime.
    pub async fn hash_of(&self, exe: &Path) -> Option<String> {
        let file = std::fs::File::open(exe).ok()?;
        let meta = file.metadata().ok()?;
        if !meta.is_file() || meta.len() > MAX_HASHED_BYTES {
            return None;
        }
        let key = FileKey::of(&meta);
        if let Some(h) = self.cached(&key) {
            return Some(h);
        }
        let pending = self
            .hashing
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(key)
            .or_default()
            .clone();
        let permits = self.permits.clone();
        let hash = pending
            .get_or_init(|| async move {
                let permit = permits.acquire_owned().await.ok()?;
                // The permit goes with the work: a cancelled caller does not free a slot
                // while its hash still runs.
                tokio::task::spawn_blocking(move || {
                    let _permit = permit;
                    hash_file(file, key)
                })
                .await
                .ok()
                .flatten()
            })
            .await
            .clone();
        self.hashing
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&key);
        if let Some(h) = &hash {
            let mut cache = self.hashes.lock().unwrap_or_else(|p| p.into_inner());
            if cache.len() >= MAX_CACHED {
                cache.clear();
            }
            cache.insert(key, h.clone());
        }
        hash
    }

    fn cached(&self, key: &FileKey) -> Option<String> {
        self.hashes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(key)
            .cloned()
    }
}

/// Hashes an opened file (blocking); None when it changed meanwhile (its key differs after
/// the read) or could not be read.
fn hash_file(mut file: std::fs::File, key: FileKey) -> Option<String> {
    use std::io::Read;
    let mut hasher = Sha256::new();
    std::io::copy(&mut (&mut file).take(MAX_HASHED_BYTES), &mut hasher).ok()?;
    let after = FileKey::of(&file.metadata().ok()?);
    (after == key).then(|| hex::encode(hasher.finalize()))
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

    #[tokio::test]
    async fn attests_the_current_process() {
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
            .await
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

    #[tokio::test]
    async fn a_changed_file_is_hashed_again_even_with_its_size_and_mtime_restored() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("bin");
        std::fs::write(&f, b"aaaa").unwrap();
        let mtime = std::fs::metadata(&f).unwrap().modified().unwrap();
        let a = UnixAttestor::new("/etc");
        let first = a.hash_of(&f).await.unwrap();
        assert_eq!(first, hex::encode(Sha256::digest(b"aaaa")));
        assert_eq!(a.hash_of(&f).await.unwrap(), first, "cached");
        // Same size, mtime set back: only the ctime tells.
        std::thread::sleep(std::time::Duration::from_millis(20));
        std::fs::write(&f, b"bbbb").unwrap();
        std::fs::File::options()
            .write(true)
            .open(&f)
            .unwrap()
            .set_modified(mtime)
            .unwrap();
        assert_eq!(
            a.hash_of(&f).await.unwrap(),
            hex::encode(Sha256::digest(b"bbbb"))
        );
    }

    #[tokio::test]
    async fn concurrent_attestations_of_one_file_share_one_hash() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("bin");
        std::fs::write(&f, vec![7u8; 8 << 20]).unwrap();
        let a = std::sync::Arc::new(UnixAttestor::new("/etc"));
        let all = futures::future::join_all((0..8).map(|_| {
            let (a, f) = (a.clone(), f.clone());
            async move { a.hash_of(&f).await }
        }))
        .await;
        let want = hex::encode(Sha256::digest(vec![7u8; 8 << 20]));
        assert!(all.iter().all(|h| h.as_deref() == Some(want.as_str())));
        assert!(a.hashing.lock().unwrap().is_empty());
        assert_eq!(a.hashes.lock().unwrap().len(), 1);
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
