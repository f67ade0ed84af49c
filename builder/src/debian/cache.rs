//! The local cache: downloaded .debs stored by their sha256, so a rebuild downloads nothing
//! and a tampered file is caught before it is installed.
//! Location: `$KILN_CACHE`, else `$XDG_CACHE_HOME/kiln`, else `~/.cache/kiln`.

use crate::units::{sha256_file, Sha256};
use anyhow::{bail, Context as _, Result};
use std::path::{Path, PathBuf};

pub struct Cache {
    pub dir: PathBuf,
}

impl Cache {
    pub fn open_default() -> Result<Cache> {
        let dir = if let Some(d) = std::env::var_os("KILN_CACHE") {
            PathBuf::from(d)
        } else if let Some(d) = std::env::var_os("XDG_CACHE_HOME") {
            PathBuf::from(d).join("kiln")
        } else {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| "/root".into())).join(".cache/kiln")
        };
        Cache::open(dir)
    }

    pub fn open(dir: PathBuf) -> Result<Cache> {
        std::fs::create_dir_all(dir.join("debs")).with_context(|| format!("creating the cache {}", dir.display()))?;
        Ok(Cache { dir })
    }

    /// Where a bootstrapped tree with this key is kept.
    pub fn tree_dir(&self, key: &str) -> PathBuf {
        self.dir.join("trees").join(key)
    }

    /// Cached trees with their sizes on disk.
    pub fn trees(&self) -> Result<Vec<(PathBuf, u64)>> {
        let dir = self.dir.join("trees");
        let mut v = Vec::new();
        if let Ok(rd) = std::fs::read_dir(&dir) {
            for e in rd.flatten() {
                v.push((e.path(), dir_size(&e.path())));
            }
        }
        v.sort();
        Ok(v)
    }

    /// Removes every cached tree (they are rebuilt from the .debs when needed).
    pub fn prune_trees(&self) -> Result<(usize, u64)> {
        let mut n = 0;
        let mut bytes = 0;
        for (p, size) in self.trees()? {
            std::fs::remove_dir_all(&p).with_context(|| format!("removing {}", p.display()))?;
            n += 1;
            bytes += size;
        }
        Ok((n, bytes))
    }

    fn deb_path(&self, sha256: &str) -> PathBuf {
        self.dir.join("debs").join(format!("{sha256}.deb"))
    }

    /// Stores a .deb (by hard link when possible) and returns its sha256.
    pub fn store_deb(&self, file: &Path) -> Result<Sha256> {
        let h = sha256_file(file).with_context(|| format!("hashing {}", file.display()))?;
        let dest = self.deb_path(&h.hex());
        if !dest.exists() {
            let tmp = dest.with_extension("part");
            if std::fs::hard_link(file, &tmp).is_err() {
                std::fs::copy(file, &tmp).with_context(|| format!("copying {} into the cache", file.display()))?;
            }
            std::fs::rename(&tmp, &dest).with_context(|| format!("storing {}", dest.display()))?;
        }
        Ok(h)
    }

    /// Stores downloaded bytes that must hash to `sha256` (else nothing is stored).
    pub fn store_deb_bytes(
        &self,
        package: &str,
        version: &str,
        url: &str,
        data: &[u8],
        sha256: &str,
    ) -> Result<PathBuf> {
        let got = Sha256::of(data).hex();
        if got != sha256 {
            bail!("package {package} {version}: {url} has sha256 {got} but the lock says {sha256}: the mirror serves a different file under this version; refusing it");
        }
        let dest = self.deb_path(sha256);
        let tmp = dest.with_extension("part");
        std::fs::write(&tmp, data).with_context(|| format!("writing {}", tmp.display()))?;
        std::fs::rename(&tmp, &dest).with_context(|| format!("storing {}", dest.display()))?;
        Ok(dest)
    }

    /// The cached .deb with this sha256, verified again (the cache is not trusted).
    /// `None` when it is not cached.
    pub fn verified_deb(&self, package: &str, version: &str, sha256: &str) -> Result<Option<PathBuf>> {
        let p = self.deb_path(sha256);
        if !p.exists() {
            return Ok(None);
        }
        let got = sha256_file(&p).with_context(|| format!("hashing {}", p.display()))?;
        if got.hex() != sha256 {
            bail!(
                "package {package} {version}: the cached .deb {} has sha256 {} but the lock says {sha256}: the file was changed or corrupted; delete it (or run `kiln cache prune`) to download it again",
                p.display(),
                got.hex()
            );
        }
        Ok(Some(p))
    }

    /// Removes cached .debs whose sha256 is not in `keep`; returns how many and their bytes.
    pub fn prune(&self, keep: &std::collections::BTreeSet<String>) -> Result<(usize, u64)> {
        let mut n = 0;
        let mut bytes = 0;
        for (p, size) in self.list()? {
            let sha = p.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
            if !keep.contains(&sha) {
                std::fs::remove_file(&p).with_context(|| format!("removing {}", p.display()))?;
                n += 1;
                bytes += size;
            }
        }
        Ok((n, bytes))
    }

    /// Every cached .deb with its size.
    pub fn list(&self) -> Result<Vec<(PathBuf, u64)>> {
        let dir = self.dir.join("debs");
        let mut v = Vec::new();
        for e in std::fs::read_dir(&dir).with_context(|| format!("reading {}", dir.display()))? {
            let e = e?;
            let size = e.metadata().map(|m| m.len()).unwrap_or(0);
            v.push((e.path(), size));
        }
        v.sort();
        Ok(v)
    }
}

fn dir_size(p: &Path) -> u64 {
    let Ok(meta) = p.symlink_metadata() else { return 0 };
    if meta.is_dir() {
        std::fs::read_dir(p).into_iter().flatten().flatten().map(|e| dir_size(&e.path())).sum()
    } else {
        meta.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stores_by_hash_and_catches_tampering() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::open(dir.path().join("c")).unwrap();
        let f = dir.path().join("a.deb");
        std::fs::write(&f, b"not really a deb").unwrap();
        let h = cache.store_deb(&f).unwrap().hex();
        assert!(cache.verified_deb("a", "1", &h).unwrap().is_some());
        assert!(cache.verified_deb("a", "1", &"0".repeat(64)).unwrap().is_none());
        let cached = cache.dir.join("debs").join(format!("{h}.deb"));
        std::fs::remove_file(&cached).unwrap();
        std::fs::write(&cached, b"tampered").unwrap();
        let e = cache.verified_deb("a", "1", &h).unwrap_err().to_string();
        assert!(e.starts_with("package a 1: the cached .deb"), "{e}");
        assert!(e.contains(&format!("but the lock says {h}")), "{e}");
    }
}
