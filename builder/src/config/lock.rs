//! Lock files: the exact package set of a profile on an image, with the sha256 of every .deb,
//! the timestamp the image is built with, and the host tools that shape the output.
//! `kiln lock` writes one; `kiln build --locked` installs exactly what it lists.

use crate::config::plan::Plan;
use crate::units::Sha256;
use anyhow::{bail, Context as _, Result};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

pub const FORMAT: u32 = 1;

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct LockFile {
    pub format: u32,
    pub kiln: String,
    pub profile: String,
    pub image: String,
    pub suite: String,
    pub arch: String,
    /// Every file in the image gets this time (so two builds from one lock are identical).
    pub source_date_epoch: u64,
    /// Hash of what was asked of apt (packages, suite, arch): a changed profile makes the lock stale.
    pub request: String,
    pub host_tools: BTreeMap<String, String>,
    #[serde(rename = "package")]
    pub packages: Vec<LockedPackage>,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
#[serde(deny_unknown_fields)]
pub struct LockedPackage {
    pub name: String,
    pub version: String,
    pub arch: String,
    pub sha256: String,
}

impl LockedPackage {
    /// The file name apt gives this package's .deb in /var/cache/apt/archives.
    pub fn deb_file_name(&self) -> String {
        format!("{}_{}_{}.deb", self.name, self.version.replace(':', "%3a"), self.arch)
    }
}

/// Where the lock of a plan lives: next to the profile file, or under ./profiles for a
/// built-in profile: `<profile>.<image>.lock`.
pub fn default_path(plan: &Plan, profile_file: Option<&Path>, cwd: &Path) -> PathBuf {
    let dir = profile_file.and_then(Path::parent).map(Path::to_path_buf).unwrap_or_else(|| cwd.join("profiles"));
    dir.join(format!("{}.{}.lock", plan.profile, plan.image))
}

/// A hash of what the lock answers: the package request, suite and architecture.
pub fn request_hash(plan: &Plan) -> String {
    let text = format!("{}\n{}\n{}", plan.suite, plan.arch.debian(), plan.packages.join("\n"));
    Sha256::of(text.as_bytes()).hex()
}

impl LockFile {
    pub fn read(path: &Path) -> Result<LockFile> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading the lock file {} (make it with `kiln lock`)", path.display()))?;
        let lock: LockFile = toml::from_str(&text)
            .map_err(|e| anyhow::anyhow!("{}: not a kiln lock file: {}", path.display(), e.message()))?;
        if lock.format != FORMAT {
            bail!(
                "{}: lock format {} is not supported by this kiln (expected {FORMAT}); run `kiln lock` again",
                path.display(),
                lock.format
            );
        }
        Ok(lock)
    }

    pub fn write(&self, path: &Path) -> Result<()> {
        let mut sorted = self.clone();
        sorted.packages.sort();
        let body = toml::to_string(&sorted).context("serializing the lock file")?;
        let text = format!(
            "# kiln lock file: the exact packages of profile {:?} on image {:?}.\n# Made by `kiln lock`; `kiln build --locked` installs exactly these. Do not edit by hand.\n\n{body}",
            self.profile, self.image
        );
        let tmp = path.with_extension("lock.tmp");
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        std::fs::write(&tmp, text).with_context(|| format!("writing {}", tmp.display()))?;
        std::fs::rename(&tmp, path).with_context(|| format!("moving {} to {}", tmp.display(), path.display()))
    }

    /// Checks that this lock answers the plan's request.
    pub fn check_matches(&self, plan: &Plan, path: &Path) -> Result<()> {
        if self.suite != plan.suite || self.arch != plan.arch.debian() {
            bail!(
                "{}: locked for {} {} but the plan builds {} {}; run `kiln lock` again",
                path.display(),
                self.suite,
                self.arch,
                plan.suite,
                plan.arch.debian()
            );
        }
        if self.request != request_hash(plan) {
            bail!(
                "{}: the profile's packages changed since it was locked; run `kiln lock` (or `kiln rebuild`) again",
                path.display()
            );
        }
        Ok(())
    }
}

/// What changed between two locks (the release's package changelog).
#[derive(Serialize, Debug, Clone, Default, PartialEq)]
pub struct Changes {
    pub added: Vec<(String, String)>,
    pub removed: Vec<(String, String)>,
    /// (name, old version, new version)
    pub upgraded: Vec<(String, String, String)>,
}

impl Changes {
    pub fn is_empty(&self) -> bool {
        self.added.is_empty() && self.removed.is_empty() && self.upgraded.is_empty()
    }

    /// One line each, sorted by package: "+ name version", "- name version", "~ name old -> new".
    pub fn lines(&self) -> Vec<String> {
        let mut v: Vec<(String, String)> = Vec::new();
        v.extend(self.added.iter().map(|(n, ver)| (n.clone(), format!("+ {n} {ver}"))));
        v.extend(self.removed.iter().map(|(n, ver)| (n.clone(), format!("- {n} {ver}"))));
        v.extend(self.upgraded.iter().map(|(n, a, b)| (n.clone(), format!("~ {n} {a} -> {b}"))));
        v.sort();
        v.into_iter().map(|(_, l)| l).collect()
    }
}

pub fn changes(old: &LockFile, new: &LockFile) -> Changes {
    let a: BTreeMap<&str, &str> = old.packages.iter().map(|p| (p.name.as_str(), p.version.as_str())).collect();
    let b: BTreeMap<&str, &str> = new.packages.iter().map(|p| (p.name.as_str(), p.version.as_str())).collect();
    let mut c = Changes::default();
    let names: std::collections::BTreeSet<&str> = a.keys().chain(b.keys()).copied().collect();
    for n in names {
        match (a.get(n), b.get(n)) {
            (None, Some(v)) => c.added.push((n.into(), v.to_string())),
            (Some(v), None) => c.removed.push((n.into(), v.to_string())),
            (Some(x), Some(y)) if x != y => c.upgraded.push((n.into(), x.to_string(), y.to_string())),
            _ => {}
        }
    }
    c
}

/// `changes` as lines (see [`Changes::lines`]).
pub fn diff(old: &LockFile, new: &LockFile) -> Vec<String> {
    changes(old, new).lines()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> LockFile {
        LockFile {
            format: FORMAT,
            kiln: "0.1.0".into(),
            profile: "minimal".into(),
            image: "pc-uefi".into(),
            suite: "trixie".into(),
            arch: "amd64".into(),
            source_date_epoch: 1_700_000_000,
            request: "ab".into(),
            host_tools: BTreeMap::from([("mkfs.erofs".into(), "mkfs.erofs 1.5".into())]),
            packages: vec![
                LockedPackage {
                    name: "zlib1g".into(),
                    version: "1:1.3.dfsg-3".into(),
                    arch: "amd64".into(),
                    sha256: "00".repeat(32),
                },
                LockedPackage {
                    name: "adduser".into(),
                    version: "3.152".into(),
                    arch: "all".into(),
                    sha256: "11".repeat(32),
                },
            ],
        }
    }

    #[test]
    fn round_trips_sorted_and_names_debs_like_apt() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.lock");
        sample().write(&p).unwrap();
        let back = LockFile::read(&p).unwrap();
        assert_eq!(back.packages[0].name, "adduser");
        assert_eq!(back.packages[1].deb_file_name(), "zlib1g_1%3a1.3.dfsg-3_amd64.deb");
        let text = std::fs::read_to_string(&p).unwrap();
        assert!(text.contains("[[package]]"), "{text}");
        let mut newer = sample();
        newer.packages[0].version = "1:1.3.dfsg-4".into();
        newer.packages.pop();
        newer.packages.push(LockedPackage {
            name: "vim-tiny".into(),
            version: "2:9.1".into(),
            arch: "amd64".into(),
            sha256: "22".repeat(32),
        });
        assert_eq!(
            diff(&sample(), &newer),
            ["- adduser 3.152", "+ vim-tiny 2:9.1", "~ zlib1g 1:1.3.dfsg-3 -> 1:1.3.dfsg-4"]
        );
        std::fs::write(&p, text.replace("format = 1", "format = 9")).unwrap();
        assert!(LockFile::read(&p).unwrap_err().to_string().contains("lock format 9 is not supported"));
    }
}
