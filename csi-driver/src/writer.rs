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
//!
//! `dir` is the driver's private staging directory, which the pod sees only through a
//! read-only bind mount ([`crate::files`]). Even so, nothing here trusts what is in `dir`:
//! every operation is relative to a directory file descriptor, names are single path
//! components, no symlink is ever followed (`O_NOFOLLOW`, `openat2` with
//! `RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS`, `AT_SYMLINK_NOFOLLOW`), ownership and modes are
//! set on open descriptors, and a generation is removed only when its name has the
//! generation pattern and it is a real directory inside `dir`. `..data` is read only to
//! find the previous generation, and its content is used only when it is such a name.

use std::collections::BTreeSet;
use std::ffi::CStr;
use std::fs::File;
use std::io::Write;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};

use rustix::fs::{self as rfs, AtFlags, FileType, Gid, Mode, OFlags, ResolveFlags};
use rustix::io::Errno;

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
/// Mode of the generation directory and its subdirectories.
const DIR_MODE: u32 = 0o755;
/// The longest file name a volume holds (Linux allows 255 bytes).
pub const MAX_NAME_BYTES: usize = 255;

/// Writes `files` as a new generation in `dir` and swaps it in atomically. `gid` (fsGroup)
/// becomes the group of every file and directory when given.
pub fn write_generation(dir: &Path, files: &[FileSpec], gid: Option<u32>) -> std::io::Result<()> {
    let mut tops = BTreeSet::new();
    for f in files {
        let (top, _) = validate_rel_path(&f.path)?;
        tops.insert(top.to_owned());
    }
    let root = open_root(dir)?;
    let gid = gid.map(Gid::from_raw);

    let stamp = generation_name();
    rfs::mkdirat(&root, stamp.as_str(), Mode::from_raw_mode(0o700))?;
    let generation = open_dir_beneath(&root, &stamp)?;
    let mut subdirs: Vec<(String, OwnedFd)> = Vec::new();
    for f in files {
        let (top, rest) = validate_rel_path(&f.path)?;
        let (parent, name) = match rest {
            None => (generation.as_fd(), top),
            Some(name) => {
                if !subdirs.iter().any(|(n, _)| n == top) {
                    rfs::mkdirat(&generation, top, Mode::from_raw_mode(0o700))?;
                    let fd = open_dir_beneath(&generation, top)?;
                    subdirs.push((top.to_owned(), fd));
                }
                let fd = subdirs
                    .iter()
                    .find(|(n, _)| n == top)
                    .map(|(_, fd)| fd.as_fd())
                    .ok_or_else(|| std::io::Error::other("subdirectory vanished"))?;
                (fd, name)
            }
        };
        let fd = rfs::openat2(
            parent,
            name,
            OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::from_raw_mode(0o600),
            ResolveFlags::BENEATH | ResolveFlags::NO_SYMLINKS | ResolveFlags::NO_MAGICLINKS,
        )?;
        rfs::fchown(&fd, None, gid)?;
        rfs::fchmod(&fd, Mode::from_raw_mode(f.mode & 0o777))?;
        let mut file = File::from(fd);
        file.write_all(&f.content)?;
        file.sync_all()?;
    }
    for (_, fd) in &subdirs {
        rfs::fchown(fd, None, gid)?;
        rfs::fchmod(fd, Mode::from_raw_mode(DIR_MODE))?;
        rfs::fsync(fd)?;
    }
    rfs::fchown(&generation, None, gid)?;
    rfs::fchmod(&generation, Mode::from_raw_mode(DIR_MODE))?;
    rfs::fsync(&generation)?;

    // Point ..data_tmp at the new generation, then rename it over ..data (atomic).
    remove_link_or_file(&root, TMP_LINK)?;
    rfs::symlinkat(stamp.as_str(), &root, TMP_LINK)?;
    let old = previous_generation(&root);
    if let Err(e) = rfs::renameat(&root, TMP_LINK, &root, DATA_LINK) {
        // ..data is not a link (a directory where a link belongs): never follow or empty
        // it; refuse, keeping the files the pod has.
        let _ = rfs::unlinkat(&root, TMP_LINK, AtFlags::empty());
        let _ = remove_generation(&root, &stamp);
        return Err(std::io::Error::other(format!(
            "cannot swap {DATA_LINK} in {}: {e}",
            dir.display()
        )));
    }

    // Stable top-level names (first component of each path) pointing into ..data.
    for top in &tops {
        let want = format!("{DATA_LINK}/{top}");
        match read_link_at(&root, top) {
            Ok(Some(current)) if current == want => continue,
            Ok(Some(_)) => rfs::unlinkat(&root, top.as_str(), AtFlags::empty())?,
            Ok(None) => {}
            Err(LinkError::NotALink) => {
                return Err(std::io::Error::other(format!(
                    "{top} in {} is not a symlink into {DATA_LINK}; refusing to replace it",
                    dir.display()
                )));
            }
            Err(LinkError::Io(e)) => return Err(e.into()),
        }
        rfs::symlinkat(want.as_str(), &root, top.as_str())?;
    }
    rfs::fsync(&root)?;

    // Remove the previous generation, older generations left by a crash, and names that
    // no longer exist. Anything else is left where it is.
    if let Some(old) = old.filter(|o| *o != stamp) {
        remove_generation(&root, &old)?;
    }
    for entry in rfs::Dir::read_from(&root)? {
        let entry = entry?;
        let Some(name) = utf8(entry.file_name()) else {
            continue;
        };
        if name == "." || name == ".." || name == DATA_LINK || name == stamp {
            continue;
        }
        if is_generation_name(name) {
            remove_generation(&root, name)?;
        } else if !tops.contains(name)
            && matches!(read_link_at(&root, name), Ok(Some(t)) if t.starts_with(&format!("{DATA_LINK}/")))
        {
            rfs::unlinkat(&root, name, AtFlags::empty())?;
        }
    }
    Ok(())
}

/// The generation `..data` points at, if it points at one.
pub fn current_generation(dir: &Path) -> Option<PathBuf> {
    let root = open_root(dir).ok()?;
    previous_generation(&root).map(PathBuf::from)
}

/// Opens the volume directory itself: a directory, not a symlink.
fn open_root(dir: &Path) -> std::io::Result<OwnedFd> {
    Ok(rfs::open(
        dir,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )?)
}

/// Opens the directory `name` directly inside `parent`, refusing links and escapes.
fn open_dir_beneath(parent: &impl AsFd, name: &str) -> std::io::Result<OwnedFd> {
    Ok(rfs::openat2(
        parent,
        name,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
        ResolveFlags::BENEATH | ResolveFlags::NO_SYMLINKS | ResolveFlags::NO_MAGICLINKS,
    )?)
}

enum LinkError {
    NotALink,
    Io(Errno),
}

/// The target of the symlink `name` in `root` (None: no such entry).
fn read_link_at(root: &impl AsFd, name: &str) -> Result<Option<String>, LinkError> {
    match rfs::readlinkat(root, name, Vec::new()) {
        Ok(target) => Ok(Some(target.to_string_lossy().into_owned())),
        Err(Errno::NOENT) => Ok(None),
        Err(Errno::INVAL) => Err(LinkError::NotALink),
        Err(e) => Err(LinkError::Io(e)),
    }
}

/// The generation `..data` names, when it names one by the generation pattern.
fn previous_generation(root: &impl AsFd) -> Option<String> {
    match read_link_at(root, DATA_LINK) {
        Ok(Some(target)) if is_generation_name(&target) => Some(target),
        _ => None,
    }
}

/// Removes the link or file `name` in `root`; missing is fine, a directory is an error.
fn remove_link_or_file(root: &impl AsFd, name: &str) -> std::io::Result<()> {
    match rfs::unlinkat(root, name, AtFlags::empty()) {
        Ok(()) | Err(Errno::NOENT) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// Removes the generation `name` from `root` if it is one: a name of the generation
/// pattern that is a real directory (not a link). Its entries are removed without following
/// any link, one subdirectory level deep, as generations are written.
fn remove_generation(root: &impl AsFd, name: &str) -> std::io::Result<()> {
    if !is_generation_name(name) {
        return Ok(());
    }
    match rfs::statat(root, name, AtFlags::SYMLINK_NOFOLLOW) {
        Ok(st) if FileType::from_raw_mode(st.st_mode) == FileType::Directory => {}
        Ok(_) => return remove_link_or_file(root, name),
        Err(Errno::NOENT) => return Ok(()),
        Err(e) => return Err(e.into()),
    }
    let generation = open_dir_beneath(root, name)?;
    empty_dir(generation.as_fd(), 1)?;
    match rfs::unlinkat(root, name, AtFlags::REMOVEDIR) {
        Ok(()) | Err(Errno::NOENT) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// Unlinks every entry of `dir`, descending into at most `depth` directory levels.
fn empty_dir(dir: BorrowedFd<'_>, depth: u32) -> std::io::Result<()> {
    for entry in rfs::Dir::read_from(dir)? {
        let entry = entry?;
        let name = entry.file_name();
        if name.to_bytes() == b"." || name.to_bytes() == b".." {
            continue;
        }
        let st = rfs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW)?;
        if FileType::from_raw_mode(st.st_mode) == FileType::Directory {
            if depth == 0 {
                return Err(std::io::Error::other(
                    "a generation holds a deeper directory than the driver writes",
                ));
            }
            let sub = rfs::openat2(
                dir,
                name,
                OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                Mode::empty(),
                ResolveFlags::BENEATH | ResolveFlags::NO_SYMLINKS | ResolveFlags::NO_MAGICLINKS,
            )?;
            empty_dir(sub.as_fd(), depth - 1)?;
            rfs::unlinkat(dir, name, AtFlags::REMOVEDIR)?;
        } else {
            rfs::unlinkat(dir, name, AtFlags::empty())?;
        }
    }
    Ok(())
}

fn utf8(name: &CStr) -> Option<&str> {
    name.to_str().ok()
}

/// Checks a file path and splits it into its first component and the file name under it.
fn validate_rel_path(p: &str) -> std::io::Result<(&str, Option<&str>)> {
    let parts: Vec<&str> = p.split('/').collect();
    let ok = !p.starts_with("..")
        && parts.len() <= 2
        && parts.iter().all(|s| {
            !s.is_empty()
                && *s != "."
                && *s != ".."
                && s.len() <= MAX_NAME_BYTES
                && !s.contains('\0')
        });
    if !ok {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("bad file path {p:?}"),
        ));
    }
    Ok((parts[0], parts.get(1).copied()))
}

/// `..YYYY_MM_DD_hh_mm_ss.nnnnnnnnn`, as [`generation_name`] makes them.
fn is_generation_name(name: &str) -> bool {
    let b = name.as_bytes();
    let shape = b"..dddd_dd_dd_dd_dd_dd.ddddddddd";
    b.len() == shape.len()
        && b.iter().zip(shape).all(|(c, s)| match s {
            b'd' => c.is_ascii_digit(),
            other => c == other,
        })
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
    use std::fs;
    use std::os::unix::fs::{PermissionsExt, symlink};

    use super::*;

    fn spec(path: &str, content: &str) -> FileSpec {
        FileSpec {
            path: path.into(),
            content: content.as_bytes().to_vec(),
            mode: 0o640,
        }
    }

    fn pair(n: u32) -> Vec<FileSpec> {
        vec![
            spec("svid.pem", &format!("cert{n}")),
            spec("svid_key.pem", &format!("key{n}")),
            spec("federated/a.pem", &format!("fa{n}")),
        ]
    }

    /// A directory outside the volume with a file in it, as a host directory would be.
    fn victim() -> (tempfile::TempDir, PathBuf) {
        let v = tempfile::tempdir().unwrap();
        let dir = v.path().join("host-dir");
        fs::create_dir(&dir).unwrap();
        fs::write(dir.join("precious"), b"keep me").unwrap();
        (v, dir)
    }

    fn assert_untouched(dir: &Path) {
        assert_eq!(
            fs::read(dir.join("precious")).ok().as_deref(),
            Some(&b"keep me"[..]),
            "{} was emptied or removed by the writer",
            dir.display()
        );
    }

    #[test]
    fn swaps_generations_atomically_and_cleans_up() {
        let d = tempfile::tempdir().unwrap();
        write_generation(d.path(), &pair(1), None).unwrap();
        assert_eq!(
            fs::read_to_string(d.path().join("svid.pem")).unwrap(),
            "cert1"
        );
        assert_eq!(
            fs::read_to_string(d.path().join("federated/a.pem")).unwrap(),
            "fa1"
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
        let long = "a".repeat(MAX_NAME_BYTES + 1);
        for bad in [
            "../x",
            "/etc/passwd",
            "a/../b",
            "..data",
            "a/b/c",
            "",
            long.as_str(),
        ] {
            assert!(
                write_generation(d.path(), &[spec(bad, "x")], None).is_err(),
                "{bad}"
            );
        }
    }

    #[test]
    fn generation_names_have_one_shape() {
        assert!(is_generation_name(&generation_name()));
        for bad in [
            "..data",
            "../etc",
            "/etc",
            "..2026_11_24_07_05_01.12345678",
            "..2026_11_24_07_05_01.123456789/x",
            "..2026_11_24_07_05_01.1234567890",
            "..2026-11-24_07_05_01.123456789",
        ] {
            assert!(!is_generation_name(bad), "{bad}");
        }
    }

    // The attacker: someone who could write in the volume (before the pod's view became a
    // read-only mount, the pod itself) points `..data` at a host directory and waits for
    // the next rotation to delete it as root.

    #[test]
    fn a_data_link_to_an_absolute_host_directory_is_not_followed() {
        let d = tempfile::tempdir().unwrap();
        let (_v, host) = victim();
        write_generation(d.path(), &pair(1), None).unwrap();
        fs::remove_file(d.path().join(DATA_LINK)).unwrap();
        symlink(&host, d.path().join(DATA_LINK)).unwrap();
        write_generation(d.path(), &pair(2), None).unwrap();
        assert_untouched(&host);
        assert_eq!(
            fs::read_to_string(d.path().join("svid.pem")).unwrap(),
            "cert2"
        );
    }

    #[test]
    fn a_data_link_climbing_out_of_the_volume_is_not_followed() {
        let parent = tempfile::tempdir().unwrap();
        let vol = parent.path().join("vol");
        fs::create_dir(&vol).unwrap();
        let host = parent.path().join("host-dir");
        fs::create_dir(&host).unwrap();
        fs::write(host.join("precious"), b"keep me").unwrap();
        write_generation(&vol, &pair(1), None).unwrap();
        fs::remove_file(vol.join(DATA_LINK)).unwrap();
        symlink("../host-dir", vol.join(DATA_LINK)).unwrap();
        write_generation(&vol, &pair(2), None).unwrap();
        assert_untouched(&host);
    }

    #[test]
    fn a_generation_shaped_link_is_removed_as_a_link_not_followed() {
        let d = tempfile::tempdir().unwrap();
        let (_v, host) = victim();
        write_generation(d.path(), &pair(1), None).unwrap();
        let bait = d.path().join("..2001_01_01_00_00_00.000000000");
        symlink(&host, &bait).unwrap();
        write_generation(d.path(), &pair(2), None).unwrap();
        assert_untouched(&host);
        assert!(bait.symlink_metadata().is_err(), "the bait link is gone");
    }

    #[test]
    fn a_stale_top_level_link_into_the_host_is_left_alone() {
        let d = tempfile::tempdir().unwrap();
        let (_v, host) = victim();
        write_generation(d.path(), &pair(1), None).unwrap();
        symlink(&host, d.path().join("extra")).unwrap();
        write_generation(d.path(), &pair(2), None).unwrap();
        assert_untouched(&host);
    }

    #[test]
    fn a_top_level_name_pointing_at_a_host_file_is_replaced_not_written_through() {
        let d = tempfile::tempdir().unwrap();
        let (_v, host) = victim();
        write_generation(d.path(), &pair(1), None).unwrap();
        fs::remove_file(d.path().join("svid_key.pem")).unwrap();
        symlink(host.join("precious"), d.path().join("svid_key.pem")).unwrap();
        write_generation(d.path(), &pair(2), Some(12345)).unwrap();
        assert_untouched(&host);
        let st = fs::symlink_metadata(host.join("precious")).unwrap();
        assert_ne!(
            std::os::unix::fs::MetadataExt::gid(&st),
            12345,
            "chown followed a link"
        );
        assert_eq!(
            fs::read_to_string(d.path().join("svid_key.pem")).unwrap(),
            "key2"
        );
    }

    #[test]
    fn a_data_directory_in_place_of_the_link_is_refused_and_kept() {
        let d = tempfile::tempdir().unwrap();
        fs::create_dir(d.path().join(DATA_LINK)).unwrap();
        fs::write(d.path().join(DATA_LINK).join("precious"), b"keep me").unwrap();
        assert!(write_generation(d.path(), &pair(1), None).is_err());
        assert_untouched(&d.path().join(DATA_LINK));
        let generations = fs::read_dir(d.path())
            .unwrap()
            .flatten()
            .filter(|e| is_generation_name(&e.file_name().to_string_lossy()))
            .count();
        assert_eq!(generations, 0, "the unused generation was removed");
    }

    #[test]
    fn the_volume_directory_itself_may_not_be_a_link() {
        let parent = tempfile::tempdir().unwrap();
        let (_v, host) = victim();
        let vol = parent.path().join("vol");
        symlink(&host, &vol).unwrap();
        assert!(write_generation(&vol, &pair(1), None).is_err());
        assert_eq!(fs::read_dir(&host).unwrap().count(), 1, "nothing written");
    }
}
