//! Atomic identity files in a volume, the way the kubelet updates projected volumes:
//!
//! ```text
//! <dir>/..2026_11_24_07_05_01.123456789/svid.pem ...   (a complete, immutable generation)
//! <dir>/..data -> ..2026_11_24_07_05_01.123456789       (swapped with one rename(2))
//! <dir>/svid.pem -> ..data/svid.pem                      (stable user-visible names)
//! ```
//!
//! A reader that opens `svid.pem` and `svid_key.pem` through `..data` always sees files of
//! one generation: the new generation is fully written and fsynced before the `..data`
//! symlink is replaced atomically, and an open file handle keeps the old inode. The previous
//! generation is removed after the swap.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{PermissionsExt, symlink};
use std::path::{Path, PathBuf};

/// One file of a generation: relative path (may contain one directory level, e.g.
/// `federated/other.org.pem`), content and mode.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileSpec {
    /// Path under the volume.
    pub path: String,
    /// Content.
    pub content: Vec<u8>,
    /// Unix mode (e.g. 0o640).
    pub mode: u32,
}

const DATA_LINK: &str = "..data";
const TMP_LINK: &str = "..data_tmp";

/// Writes `files` as a new generation in `dir` and swaps it in atomically. `gid` (fsGroup)
/// becomes the group of every file and directory when given.
pub fn write_generation(dir: &Path, files: &[FileSpec], gid: Option<u32>) -> std::io::Result<()> {
    for f in files {
        validate_rel_path(&f.path)?;
    }
    let stamp = generation_name();
    let gen_dir = dir.join(&stamp);
    fs::create_dir(&gen_dir)?;
    set_mode_and_group(&gen_dir, 0o755, gid)?;
    for f in files {
        let target = gen_dir.join(&f.path);
        if let Some(parent) = target.parent()
            && parent != gen_dir
            && !parent.exists()
        {
            fs::create_dir_all(parent)?;
            set_mode_and_group(parent, 0o755, gid)?;
        }
        let mut file = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&target)?;
        file.write_all(&f.content)?;
        file.sync_all()?;
        set_mode_and_group(&target, f.mode, gid)?;
    }
    sync_dir(&gen_dir)?;

    // Point ..data_tmp at the new generation, then rename it over ..data (atomic).
    let tmp = dir.join(TMP_LINK);
    let _ = fs::remove_file(&tmp);
    symlink(&stamp, &tmp)?;
    let old = fs::read_link(dir.join(DATA_LINK)).ok();
    fs::rename(&tmp, dir.join(DATA_LINK))?;

    // Stable top-level names (first component of each path) pointing into ..data.
    for top in top_level_names(files) {
        let link = dir.join(&top);
        let want = PathBuf::from(DATA_LINK).join(&top);
        if fs::read_link(&link).ok().as_deref() != Some(want.as_path()) {
            let _ = fs::remove_file(&link);
            symlink(&want, &link)?;
        }
    }
    sync_dir(dir)?;

    // Remove the previous generation and names that no longer exist.
    if let Some(old) = old
        && old != Path::new(&stamp)
    {
        let _ = fs::remove_dir_all(dir.join(old));
    }
    let keep = top_level_names(files);
    for e in fs::read_dir(dir)?.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with("..") {
            if name != DATA_LINK && name != stamp {
                let _ = fs::remove_dir_all(e.path()).or_else(|_| fs::remove_file(e.path()));
            }
        } else if !keep.contains(&name) && e.path().is_symlink() {
            let _ = fs::remove_file(e.path());
        }
    }
    Ok(())
}

/// The generation `..data` points at, if any.
pub fn current_generation(dir: &Path) -> Option<PathBuf> {
    fs::read_link(dir.join(DATA_LINK)).ok()
}

fn top_level_names(files: &[FileSpec]) -> Vec<String> {
    let mut v: Vec<String> = files
        .iter()
        .filter_map(|f| f.path.split('/').next().map(str::to_owned))
        .collect();
    v.sort();
    v.dedup();
    v
}

fn validate_rel_path(p: &str) -> std::io::Result<()> {
    let ok = !p.is_empty()
        && !p.starts_with('/')
        && !p.starts_with("..")
        && p.split('/').all(|s| !s.is_empty() && s != "." && s != "..")
        && p.split('/').count() <= 2;
    if ok {
        Ok(())
    } else {
        Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("bad file path {p:?}"),
        ))
    }
}

fn set_mode_and_group(p: &Path, mode: u32, gid: Option<u32>) -> std::io::Result<()> {
    if let Some(g) = gid {
        std::os::unix::fs::chown(p, None, Some(g))?;
    }
    fs::set_permissions(p, fs::Permissions::from_mode(mode))
}

fn sync_dir(p: &Path) -> std::io::Result<()> {
    fs::File::open(p)?.sync_all()
}

fn generation_name() -> String {
    let now = time::OffsetDateTime::now_utc();
    format!(
        "..{:04}_{:02}_{:02}_{:02}_{:02}_{:02}.{:09}",
        now.year(),
        u8::from(now.month()),
        now.day(),
        now.hour(),
        now.minute(),
        now.second(),
        now.nanosecond()
    )
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn spec(path: &str, content: &str) -> FileSpec {
        FileSpec {
            path: path.into(),
            content: content.as_bytes().to_vec(),
            mode: 0o640,
        }
    }

    #[test]
    fn swaps_generations_atomically_and_cleans_up() {
        let d = tempfile::tempdir().unwrap();
        write_generation(
            d.path(),
            &[
                spec("svid.pem", "cert1"),
                spec("svid_key.pem", "key1"),
                spec("federated/a.pem", "fa"),
            ],
            None,
        )
        .unwrap();
        assert_eq!(
            fs::read_to_string(d.path().join("svid.pem")).unwrap(),
            "cert1"
        );
        assert_eq!(
            fs::read_to_string(d.path().join("federated/a.pem")).unwrap(),
            "fa"
        );
        let g1 = current_generation(d.path()).unwrap();

        // A reader holding the old key file keeps reading the old content after the swap.
        let mut held = fs::File::open(d.path().join("svid_key.pem")).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(2));
        write_generation(
            d.path(),
            &[spec("svid.pem", "cert2"), spec("svid_key.pem", "key2")],
            None,
        )
        .unwrap();
        let mut s = String::new();
        std::io::Read::read_to_string(&mut held, &mut s).unwrap();
        assert_eq!(s, "key1");
        assert_eq!(
            fs::read_to_string(d.path().join("svid_key.pem")).unwrap(),
            "key2"
        );
        assert_ne!(current_generation(d.path()).unwrap(), g1);
        assert!(!d.path().join(&g1).exists(), "old generation removed");
        assert!(
            !d.path().join("federated").exists(),
            "names that disappeared are removed"
        );
        let mode = fs::metadata(d.path().join("svid_key.pem"))
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o640);
    }

    #[test]
    fn refuses_escaping_paths() {
        let d = tempfile::tempdir().unwrap();
        for bad in ["../x", "/etc/passwd", "a/../b", "..data", "a/b/c", ""] {
            assert!(
                write_generation(d.path(), &[spec(bad, "x")], None).is_err(),
                "{bad}"
            );
        }
    }
}
