//! Factory state: what the image ships under `/var` (kept in the read-only root at
//! `/usr/share/factory/var`) reaching the data partition, run by `kiln-agent mount-data` right
//! after it mounted `/var`. The rule (ARCHITECTURE.md, "The image at run time"):
//!
//! - **Release-owned** paths, the package database and what belongs with it ([`RELEASE_OWNED`]),
//!   are links into the running release's factory copy: always the running root's, read-only,
//!   never copied, so an update or a rollback brings its own. A device's stale copy is replaced.
//! - **Everything else is delivered once per path.** A factory path the device has never been
//!   given is copied in when the device has nothing there (owner, mode and times kept) and is
//!   recorded in `/var/lib/kiln/factory.json`; a path the device already has is the device's, and
//!   a delivered path the device later deleted or changed stays as the device left it. So a new
//!   release's new files (a new service's defaults) reach an updated device, and nothing the
//!   device made is overwritten.
//!
//! The record names the root image (its dm-verity root hash) it was last brought up to date
//! with: a boot of the same root reads one small file and does nothing else.

use anyhow::{Context as _, Result};
use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// The image's own `/var`, in the read-only root.
pub const FACTORY: &str = "/usr/share/factory/var";
/// Relative to /var: the record of delivered paths.
const RECORD: &str = "lib/kiln/factory.json";
/// Relative to /var: paths that follow the running release (links into its factory copy).
pub const RELEASE_OWNED: &[&str] = &[
    "lib/dpkg",
    "lib/apt",
    "lib/ucf",
    "cache/debconf",
    "lib/systemd/deb-systemd-helper-enabled",
    "lib/systemd/deb-systemd-helper-masked",
    "lib/systemd/deb-systemd-user-helper-enabled",
];

#[derive(Serialize, Deserialize, Default, Debug)]
struct Record {
    /// The root image (dm-verity root hash) whose factory was last delivered.
    root: String,
    /// Every path (relative to /var) ever delivered or found already there.
    delivered: BTreeSet<String>,
}

/// What [`deliver`] did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Delivered {
    pub copied: usize,
    pub kept: usize,
    pub linked: usize,
    /// Nothing to do: this root's factory was delivered before.
    pub unchanged: bool,
}

impl std::fmt::Display for Delivered {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.unchanged {
            return write!(f, "factory state up to date");
        }
        write!(
            f,
            "factory state: {} path(s) copied, {} the device already had, {} release-owned link(s)",
            self.copied, self.kept, self.linked
        )
    }
}

/// Brings `var` up to date with `factory` (the running root's, identified by `root`); `link_to`
/// is where the release-owned links point (the factory's path as the running system sees it).
pub fn deliver(factory: &Path, link_to: &Path, var: &Path, root: &str) -> Result<Delivered> {
    let record_path = var.join(RECORD);
    let mut record: Record = match kiln_device::fs::read_json(&record_path) {
        Ok(r) => r.unwrap_or_default(),
        Err(e) => {
            println!("kiln-agent: {e}; delivering the factory state again (nothing the device has is overwritten)");
            Record::default()
        }
    };
    let mut done = Delivered::default();
    if record.root == root && !root.is_empty() {
        done.unchanged = true;
        return Ok(done);
    }
    for rel in RELEASE_OWNED {
        if factory.join(rel).symlink_metadata().is_err() {
            continue;
        }
        let at = var.join(rel);
        let target = link_to.join(rel);
        if std::fs::read_link(&at).ok().as_deref() == Some(target.as_path()) {
            continue;
        }
        if let Ok(m) = at.symlink_metadata() {
            if m.is_dir() { std::fs::remove_dir_all(&at) } else { std::fs::remove_file(&at) }
                .with_context(|| format!("replacing {} with a link into the release", at.display()))?;
        }
        if let Some(parent) = at.parent() {
            make_parents(factory, var, parent)?;
        }
        std::os::unix::fs::symlink(&target, &at)
            .with_context(|| format!("linking {} -> {}", at.display(), target.display()))?;
        done.linked += 1;
    }
    let owned: Vec<PathBuf> = RELEASE_OWNED.iter().map(PathBuf::from).collect();
    walk(factory, Path::new(""), &owned, &mut |rel, meta| {
        let key = rel.to_string_lossy().into_owned();
        if record.delivered.contains(&key) {
            return Ok(Walk::Descend);
        }
        let at = var.join(rel);
        let step = if at.symlink_metadata().is_ok() {
            done.kept += 1;
            Walk::Descend
        } else {
            copy_one(&factory.join(rel), &at, meta)?;
            done.copied += 1;
            if meta.is_dir() {
                Walk::Descend
            } else {
                Walk::Skip
            }
        };
        record.delivered.insert(key);
        Ok(step)
    })?;
    record.root = root.to_string();
    if let Some(dir) = record_path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    kiln_device::fs::write_json(&record_path, &record).with_context(|| format!("writing {}", record_path.display()))?;
    Ok(done)
}

enum Walk {
    Descend,
    Skip,
}

/// Visits every path under `base/rel` in name order, parents before children, leaving out `skip`.
fn walk(
    base: &Path,
    rel: &Path,
    skip: &[PathBuf],
    visit: &mut dyn FnMut(&Path, &std::fs::Metadata) -> Result<Walk>,
) -> Result<()> {
    let dir = base.join(rel);
    let mut entries: Vec<_> = std::fs::read_dir(&dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .collect::<std::io::Result<_>>()
        .with_context(|| format!("reading {}", dir.display()))?;
    entries.sort_by_key(|e| e.file_name());
    for e in entries {
        let r = rel.join(e.file_name());
        if skip.contains(&r) {
            continue;
        }
        let meta = e.path().symlink_metadata().with_context(|| format!("reading {}", e.path().display()))?;
        if let Walk::Descend = visit(&r, &meta)? {
            if meta.is_dir() {
                walk(base, &r, skip, visit)?;
            }
        }
    }
    Ok(())
}

/// Copies one directory (without its contents), file or link, with owner, mode and times.
fn copy_one(from: &Path, to: &Path, meta: &std::fs::Metadata) -> Result<()> {
    let ft = meta.file_type();
    if ft.is_dir() {
        std::fs::create_dir(to).with_context(|| format!("creating {}", to.display()))?;
    } else if ft.is_symlink() {
        let target = std::fs::read_link(from).with_context(|| format!("reading {}", from.display()))?;
        std::os::unix::fs::symlink(&target, to).with_context(|| format!("linking {}", to.display()))?;
    } else if ft.is_file() {
        // Through a temporary name: a power cut never leaves a half file under the real one
        // (which would count as the device's own on the next boot).
        let tmp = to.with_file_name(format!(
            ".{}.kiln-factory",
            to.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default()
        ));
        std::fs::copy(from, &tmp).with_context(|| format!("copying {} to {}", from.display(), tmp.display()))?;
        std::fs::File::open(&tmp).and_then(|f| f.sync_all()).with_context(|| format!("syncing {}", tmp.display()))?;
        std::fs::rename(&tmp, to).with_context(|| format!("renaming {} to {}", tmp.display(), to.display()))?;
    } else {
        // Sockets, fifos, devices: nothing an image should ship under /var.
        println!("kiln-agent: {} is not a file, directory or link; not copied", from.display());
        return Ok(());
    }
    std::os::unix::fs::lchown(to, Some(meta.uid()), Some(meta.gid()))
        .with_context(|| format!("setting the owner of {}", to.display()))?;
    if !ft.is_symlink() {
        std::fs::set_permissions(to, std::fs::Permissions::from_mode(meta.mode() & 0o7777))
            .with_context(|| format!("setting the mode of {}", to.display()))?;
    }
    let times = [
        nix::sys::time::TimeSpec::new(meta.atime(), meta.atime_nsec()),
        nix::sys::time::TimeSpec::new(meta.mtime(), meta.mtime_nsec()),
    ];
    nix::sys::stat::utimensat(
        nix::fcntl::AT_FDCWD,
        to,
        &times[0],
        &times[1],
        nix::sys::stat::UtimensatFlags::NoFollowSymlink,
    )
    .with_context(|| format!("setting the times of {}", to.display()))?;
    Ok(())
}

/// Makes the missing directories from `var` down to `dir`, as the factory has them.
fn make_parents(factory: &Path, var: &Path, dir: &Path) -> Result<()> {
    let rel = dir.strip_prefix(var).unwrap_or(dir);
    let mut at = PathBuf::new();
    for c in rel.components() {
        at.push(c);
        let to = var.join(&at);
        if to.symlink_metadata().is_err() {
            let from = factory.join(&at);
            let meta = from.symlink_metadata().with_context(|| format!("reading {}", from.display()))?;
            copy_one(&from, &to, &meta)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put(p: &Path, text: &str) {
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, text).unwrap();
    }

    #[test]
    fn factory_paths_are_delivered_once_and_release_owned_ones_follow_the_release() {
        let t = tempfile::tempdir().unwrap();
        let (f1, f2, var) = (t.path().join("r1"), t.path().join("r2"), t.path().join("var"));
        std::fs::create_dir(&var).unwrap();
        put(&f1.join("lib/dpkg/status"), "Package: zstd\nVersion: 1\n");
        put(&f1.join("lib/app/defaults.conf"), "factory 1\n");
        put(&f1.join("lib/app/seed"), "seed\n");
        std::os::unix::fs::symlink("../run", f1.join("run-link")).unwrap();
        std::fs::set_permissions(f1.join("lib/app/seed"), std::fs::Permissions::from_mode(0o600)).unwrap();
        // The device already made /var/lib (kiln-var-base runs before): its contents still come.
        std::fs::create_dir_all(var.join("lib/kiln")).unwrap();

        let first = deliver(&f1, &f1, &var, "root1").unwrap();
        assert_eq!(first, Delivered { copied: 4, kept: 1, linked: 1, unchanged: false }, "{first}");
        assert_eq!(std::fs::read_to_string(var.join("lib/app/defaults.conf")).unwrap(), "factory 1\n");
        assert_eq!(std::fs::metadata(var.join("lib/app/seed")).unwrap().permissions().mode() & 0o777, 0o600);
        assert_eq!(std::fs::read_link(var.join("run-link")).unwrap(), Path::new("../run"));
        assert_eq!(std::fs::read_link(var.join("lib/dpkg")).unwrap(), f1.join("lib/dpkg"));
        // The same root again: nothing is walked.
        assert!(deliver(&f1, &f1, &var, "root1").unwrap().unchanged);

        // The device changes one factory file and deletes another.
        std::fs::write(var.join("lib/app/defaults.conf"), "the device's own\n").unwrap();
        std::fs::remove_file(var.join("lib/app/seed")).unwrap();
        // A new release: a new package version, a new service's defaults, the old files.
        put(&f2.join("lib/dpkg/status"), "Package: zstd\nVersion: 2\n");
        put(&f2.join("lib/app/defaults.conf"), "factory 2\n");
        put(&f2.join("lib/app/seed"), "seed\n");
        put(&f2.join("lib/newsvc/defaults.conf"), "new service\n");
        let second = deliver(&f2, &f2, &var, "root2").unwrap();
        assert_eq!(second, Delivered { copied: 2, kept: 0, linked: 1, unchanged: false }, "{second}");
        assert_eq!(std::fs::read_to_string(var.join("lib/app/defaults.conf")).unwrap(), "the device's own\n");
        assert!(!var.join("lib/app/seed").exists(), "a file the device deleted stays deleted");
        assert_eq!(std::fs::read_to_string(var.join("lib/newsvc/defaults.conf")).unwrap(), "new service\n");
        assert_eq!(std::fs::read_to_string(var.join("lib/dpkg/status")).unwrap(), "Package: zstd\nVersion: 2\n");

        // A stale copy of a release-owned directory (a device from before this rule) is replaced.
        std::fs::remove_file(var.join("lib/dpkg")).unwrap();
        put(&var.join("lib/dpkg/status"), "old copy\n");
        let third = deliver(&f2, &f2, &var, "root3").unwrap();
        assert_eq!(third.linked, 1);
        assert_eq!(std::fs::read_to_string(var.join("lib/dpkg/status")).unwrap(), "Package: zstd\nVersion: 2\n");
        // A damaged record: delivered again, still nothing of the device's overwritten.
        std::fs::write(var.join(RECORD), "{").unwrap();
        let again = deliver(&f2, &f2, &var, "root3").unwrap();
        assert_eq!(again.copied, 1, "only the deleted seed comes back: {again}");
        assert_eq!(std::fs::read_to_string(var.join("lib/app/defaults.conf")).unwrap(), "the device's own\n");
    }
}
