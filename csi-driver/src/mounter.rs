//! Mounts, behind a trait so the node service's logic can be read (and reasoned about)
//! apart from syscalls. [`LinuxMounter`] is the real thing: it needs CAP_SYS_ADMIN and a
//! mount namespace that propagates to the kubelet's (the chart sets
//! `mountPropagation: Bidirectional`).

use std::path::{Path, PathBuf};

use nix::mount::{MntFlags, MsFlags, mount, umount2};

/// What the node service needs from the kernel.
pub trait Mounter: Send + Sync + std::fmt::Debug + 'static {
    /// Bind-mounts `source` on `target`, read-only, nosuid, nodev, noexec.
    fn bind_read_only(&self, source: &Path, target: &Path) -> std::io::Result<()>;
    /// Bind-mounts `source` on `target` writable (nosuid, nodev, noexec), even when
    /// `source` is a read-only mount.
    fn bind_writable(&self, source: &Path, target: &Path) -> std::io::Result<()>;
    /// Makes the mount on `target` read-only (nosuid, nodev, noexec).
    fn remount_read_only(&self, target: &Path) -> std::io::Result<()>;
    /// Mounts a fresh tmpfs of `size_bytes` on `target` (nosuid, nodev, noexec) whose
    /// root has `mode`.
    fn tmpfs(&self, target: &Path, size_bytes: u64, mode: u32) -> std::io::Result<()>;
    /// Unmounts `target` (every mount stacked on it).
    fn unmount(&self, target: &Path) -> std::io::Result<()>;
    /// How many mounts are stacked on `target` (0: not a mount point).
    fn mount_count(&self, target: &Path) -> std::io::Result<usize>;
}

/// The real mounter.
#[derive(Debug, Default, Clone, Copy)]
pub struct LinuxMounter;

fn io(e: nix::Error) -> std::io::Error {
    std::io::Error::from_raw_os_error(e as i32)
}

impl Mounter for LinuxMounter {
    fn bind_read_only(&self, source: &Path, target: &Path) -> std::io::Result<()> {
        bind(source, target, MsFlags::MS_RDONLY)
    }

    fn bind_writable(&self, source: &Path, target: &Path) -> std::io::Result<()> {
        bind(source, target, MsFlags::empty())
    }

    fn remount_read_only(&self, target: &Path) -> std::io::Result<()> {
        mount(
            None::<&str>,
            target,
            None::<&str>,
            MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY | SAFE,
            None::<&str>,
        )
        .map_err(io)
    }

    fn tmpfs(&self, target: &Path, size_bytes: u64, mode: u32) -> std::io::Result<()> {
        let options = format!("size={size_bytes},mode={mode:o}");
        mount(
            Some("tmpfs"),
            target,
            Some("tmpfs"),
            SAFE,
            Some(options.as_str()),
        )
        .map_err(io)
    }

    fn unmount(&self, target: &Path) -> std::io::Result<()> {
        while self.mount_count(target)? > 0 {
            umount2(target, MntFlags::empty())
                .or_else(|_| umount2(target, MntFlags::MNT_DETACH))
                .map_err(io)?;
        }
        Ok(())
    }

    fn mount_count(&self, target: &Path) -> std::io::Result<usize> {
        let target = canonical(target);
        let info = std::fs::read_to_string("/proc/self/mountinfo")?;
        Ok(info
            .lines()
            .filter_map(|l| l.split(' ').nth(4))
            .filter(|m| Path::new(&unescape(m)) == target)
            .count())
    }
}

/// The flags of every mount sigil-csi makes for a pod.
const SAFE: MsFlags = MsFlags::MS_NOSUID
    .union(MsFlags::MS_NODEV)
    .union(MsFlags::MS_NOEXEC);

/// A bind mount of `source` on `target`, remounted with `SAFE` plus `extra` (a bind mount
/// takes the source mount's flags and ignores new ones until remounted). Undone on error.
fn bind(source: &Path, target: &Path, extra: MsFlags) -> std::io::Result<()> {
    mount(
        Some(source),
        target,
        None::<&str>,
        MsFlags::MS_BIND,
        None::<&str>,
    )
    .map_err(io)?;
    let flags = MsFlags::MS_BIND | MsFlags::MS_REMOUNT | SAFE | extra;
    if let Err(e) = mount(None::<&str>, target, None::<&str>, flags, None::<&str>) {
        let _ = umount2(target, MntFlags::MNT_DETACH);
        return Err(io(e));
    }
    Ok(())
}

/// The path as the kernel reports mount points (symlinks resolved where possible).
fn canonical(p: &Path) -> PathBuf {
    std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf())
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
pub fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let octal = (b[i] == b'\\' && i + 4 <= b.len())
            .then(|| &b[i + 1..i + 4])
            .filter(|d| d.iter().all(|c| (b'0'..=b'7').contains(c)))
            .and_then(|d| {
                let v = d.iter().fold(0u32, |acc, c| acc * 8 + u32::from(c - b'0'));
                u8::try_from(v).ok()
            });
        if let Some(byte) = octal {
            // `\ooo` of one byte (the kernel escapes only space, tab, newline and backslash;
            // anything above \377 is left as written).
            out.push(byte);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_escape_above_one_byte_is_kept_as_written() {
        // Found by the mountinfo fuzz target: \444 overflowed a u8 (a panic in debug).
        assert_eq!(unescape(r"\444x"), r"\444x");
        assert_eq!(unescape(r"\377"), "\u{fffd}");
    }

    #[test]
    fn mountinfo_escapes() {
        assert_eq!(
            unescape(r"/var/lib/kubelet/pods/a\040b/vol"),
            "/var/lib/kubelet/pods/a b/vol"
        );
        assert_eq!(unescape("/plain"), "/plain");
    }
}
