//! `kiln keygen` and `kiln publish`: the release side of over-the-air updates.
//!
//! publish adds one build output to a channel in a site directory (upload it anywhere static):
//! artifacts by content (`artifacts/<sha256>`, re-hashed against the manifest on the way), the
//! signed metadata devices act on (`<channel>.json` + `.sig`), and the same releases as Atom
//! and RSS for people. Each release's package list is kept (`releases/`) so the next release's
//! changelog is the difference.

use crate::stages::manifest::{Manifest, Package};
use crate::units::sha256_file;
use anyhow::{bail, Context as _, Result};
use kiln_feed::{Artifact, ArtifactKind, Change, Metadata, Release, SecretKey, Timestamp};
use std::collections::BTreeMap;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub const SECRET_FILE: &str = "kiln-release.key";
pub const PUBLIC_FILE: &str = "kiln-release.pub";

/// Writes a new key pair into `dir`; refuses to replace a secret key unless `force`.
pub fn keygen(dir: &Path, force: bool) -> Result<(PathBuf, PathBuf, String)> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let secret = dir.join(SECRET_FILE);
    let public = dir.join(PUBLIC_FILE);
    if secret.exists() && !force {
        bail!("{} already exists: devices trust its public half; pass --force to replace it (devices with the old key will refuse new releases)", secret.display());
    }
    let key = SecretKey::generate().context("reading random bytes for the key")?;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&secret)
        .with_context(|| format!("writing {}", secret.display()))?;
    f.write_all(key.to_text().as_bytes())
        .and_then(|_| f.sync_all())
        .with_context(|| format!("writing {}", secret.display()))?;
    std::fs::write(&public, key.public().to_text()).with_context(|| format!("writing {}", public.display()))?;
    Ok((secret, public, key.public().key_id()))
}

pub struct PublishOptions {
    pub channel: String,
    pub site: PathBuf,
    pub key: PathBuf,
    pub base_url: String,
    pub valid_for: Duration,
    pub notes: String,
    /// The release fixes security problems (`--security`).
    pub security: bool,
    pub keep: usize,
    pub force: bool,
}

pub struct Published {
    pub release: Release,
    pub expires: Timestamp,
    pub files: Vec<PathBuf>,
}

/// Replaces a published file in one step (temporary file, fsync, rename, fsync of the directory).
fn write_atomic(path: &Path, data: &[u8]) -> Result<()> {
    Ok(kiln_device::fs::write_atomically(path, data)?)
}

fn changelog(old: &[Package], new: &[Package]) -> Vec<Change> {
    let o: BTreeMap<&str, &str> = old.iter().map(|p| (p.name.as_str(), p.version.as_str())).collect();
    let n: BTreeMap<&str, &str> = new.iter().map(|p| (p.name.as_str(), p.version.as_str())).collect();
    let mut out = Vec::new();
    for (name, v) in &n {
        match o.get(name) {
            None => out.push(Change { package: name.to_string(), from: None, to: Some(v.to_string()) }),
            Some(ov) if ov != v => {
                out.push(Change { package: name.to_string(), from: Some(ov.to_string()), to: Some(v.to_string()) })
            }
            _ => {}
        }
    }
    for (name, v) in &o {
        if !n.contains_key(name) {
            out.push(Change { package: name.to_string(), from: Some(v.to_string()), to: None });
        }
    }
    out
}

pub fn publish(out_dir: &Path, opts: &PublishOptions) -> Result<Published> {
    let manifest_path = out_dir.join(crate::stages::manifest::FILE);
    let manifest: Manifest = serde_json::from_str(&std::fs::read_to_string(&manifest_path).with_context(|| {
        format!("reading {} (is {} a kiln build output?)", manifest_path.display(), out_dir.display())
    })?)
    .with_context(|| format!("reading {}", manifest_path.display()))?;
    let key_text = std::fs::read_to_string(&opts.key)
        .with_context(|| format!("reading the signing key {}", opts.key.display()))?;
    let key = SecretKey::parse(&key_text).map_err(|e| anyhow::anyhow!("{}: {e}", opts.key.display()))?;
    let version: kiln_feed::Version =
        manifest.version.parse().map_err(|e: String| anyhow::anyhow!("{}: {e}", manifest_path.display()))?;

    // Which files make a release of this kind of image.
    let uki = format!("kiln-{}.efi", manifest.version);
    let mut wanted = vec![(ArtifactKind::Root, "root.img".to_string())];
    if manifest.artifacts.contains_key(&uki) {
        wanted.push((ArtifactKind::Uki, uki));
    } else if manifest.artifacts.contains_key("boot.img") {
        wanted.push((ArtifactKind::Boot, "boot.img".into()));
    } else {
        bail!(
            "{}: the build has neither {uki} (UEFI) nor boot.img (Raspberry Pi): rebuild it with this kiln",
            out_dir.display()
        );
    }

    // Artifacts, by content, each checked against the manifest.
    let store = opts.site.join("artifacts");
    std::fs::create_dir_all(&store).with_context(|| format!("creating {}", store.display()))?;
    let mut artifacts = Vec::new();
    for (kind, name) in wanted {
        let rec = manifest
            .artifacts
            .get(&name)
            .with_context(|| format!("{}: no {name} in the manifest", manifest_path.display()))?;
        let src = out_dir.join(&name);
        let actual = sha256_file(&src).with_context(|| format!("hashing {}", src.display()))?.hex();
        if actual != rec.sha256 {
            bail!("{}: sha256 {actual} differs from the manifest's {}: the build output was changed after it was built; refusing to publish it", src.display(), rec.sha256);
        }
        let dest = store.join(&actual);
        let present = dest.exists() && sha256_file(&dest).map(|h| h.hex() == actual).unwrap_or(false);
        if !present {
            let tmp = store.join(format!(".{actual}.tmp"));
            std::fs::copy(&src, &tmp).with_context(|| format!("copying {} to {}", src.display(), tmp.display()))?;
            std::fs::File::open(&tmp)
                .and_then(|f| f.sync_all())
                .with_context(|| format!("syncing {}", tmp.display()))?;
            std::fs::rename(&tmp, &dest).with_context(|| format!("renaming {}", tmp.display()))?;
        }
        let delta = Some(write_chunks(&dest, &actual, &opts.site, kind)?);
        artifacts.push(Artifact {
            kind,
            name,
            url: format!("artifacts/{actual}"),
            size: rec.size,
            sha256: actual,
            delta,
        });
    }

    // The channel so far: only if it verifies with this key.
    let json_path = opts.site.join(format!("{}.json", opts.channel));
    let sig_path = opts.site.join(format!("{}.json.sig", opts.channel));
    let mut releases = Vec::new();
    if json_path.exists() {
        let json = std::fs::read(&json_path).with_context(|| format!("reading {}", json_path.display()))?;
        let sig = std::fs::read_to_string(&sig_path).unwrap_or_default();
        match kiln_feed::verify(&json, &sig, &[key.public()]) {
            Ok(_) => {}
            Err(e) if opts.force => eprintln!("warning: {}: {e}; replacing it (--force)", json_path.display()),
            Err(e) => bail!(
                "{}: {e}; refusing to add to a channel this key did not sign (--force starts it afresh)",
                json_path.display()
            ),
        }
        if !opts.force {
            let old: Metadata =
                serde_json::from_slice(&json).with_context(|| format!("reading {}", json_path.display()))?;
            releases = old.releases;
        }
    }
    if let Some(newest) = releases.iter().find(|r| r.image == manifest.image) {
        if version <= newest.version {
            bail!("release {version} is not newer than {}, the newest {} release in channel {}: devices would refuse it; build it with a higher --release", newest.version, manifest.image, opts.channel);
        }
    }

    // Changelog against the previous release of this image.
    let packages_dir = opts.site.join("releases");
    std::fs::create_dir_all(&packages_dir).with_context(|| format!("creating {}", packages_dir.display()))?;
    let packages_file = |v: &str| packages_dir.join(format!("{}-{}.packages.json", manifest.image, v));
    let changelog = match releases.iter().find(|r| r.image == manifest.image) {
        Some(prev) => {
            let p = packages_file(prev.version.as_str());
            let old: Vec<Package> =
                std::fs::read(&p).ok().and_then(|b| serde_json::from_slice(&b).ok()).unwrap_or_default();
            changelog(&old, &manifest.packages)
        }
        None => Vec::new(),
    };
    write_atomic(&packages_file(&manifest.version), &serde_json::to_vec_pretty(&manifest.packages)?)?;

    let now = Timestamp::now();
    let release = Release {
        version,
        published: now,
        profile: manifest.profile.clone(),
        image: manifest.image.clone(),
        arch: manifest.arch.clone(),
        root_hash: manifest.verity.root_hash.clone(),
        artifacts,
        changelog,
        notes: opts.notes.clone(),
        security: opts.security,
    };
    releases.insert(0, release.clone());
    releases.truncate(opts.keep.max(1));
    let expires = Timestamp(now.0 + opts.valid_for.as_secs());
    let meta = Metadata { format: kiln_feed::FORMAT, channel: opts.channel.clone(), generated: now, expires, releases };
    let mut json = serde_json::to_vec_pretty(&meta)?;
    json.push(b'\n');
    let base = if opts.base_url.ends_with('/') { opts.base_url.clone() } else { format!("{}/", opts.base_url) };
    let title = format!("kiln releases: {} ({})", manifest.profile, opts.channel);
    // Metadata, then its signature: a reader between the two renames sees a pair that does
    // not verify and tries again later; it never acts on unsigned data.
    write_atomic(&json_path, &json)?;
    write_atomic(&sig_path, kiln_feed::sign(&key, &json).as_bytes())?;
    let atom = opts.site.join(format!("{}.atom", opts.channel));
    let rss = opts.site.join(format!("{}.rss", opts.channel));
    write_atomic(&atom, kiln_feed::render::atom(&meta, &base, &title).as_bytes())?;
    write_atomic(&rss, kiln_feed::render::rss(&meta, &base, &title).as_bytes())?;
    Ok(Published { release, expires, files: vec![json_path, sig_path, atom, rss] })
}

/// zstd level of each chunk in a pack: 9 packs the minimal image in a few seconds on 2 cores;
/// 19 saved little more on kiln's images (EROFS data is lz4 already) at many times the time.
const ZSTD_LEVEL: i32 = 9;

/// The chunk index (head and leaves) and pack of the artifact `src` (sha256 `sha`), for delta
/// updates (`kiln_feed::delta`): `chunks/<sha>.index`, `.leaves` and `.pack`. Made once per
/// artifact: a later release that ships the same artifact reuses them. The head is written
/// last, so a head on disk always has its leaves and pack.
pub fn write_chunks(src: &Path, sha: &str, site: &Path, kind: ArtifactKind) -> Result<kiln_feed::Delta> {
    use kiln_feed::delta::{Chunk, Head, Index, Packing, BLOCKS, CHUNKING, ENTRY};
    let dir = site.join("chunks");
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let path = |ext: &str| dir.join(format!("{sha}.{ext}"));
    let artifact_sha256: [u8; 32] =
        hex::decode(sha).ok().and_then(|b| b.try_into().ok()).with_context(|| format!("{sha}: not a sha256"))?;
    // root.img is EROFS (4 KiB blocks throughout); the UKI and the Pi's FAT image are not.
    let chunking = if kind == ArtifactKind::Root { BLOCKS } else { CHUNKING };
    let delta = |head: &[u8], h: &Head| kiln_feed::Delta {
        index: format!("chunks/{sha}.index"),
        index_size: head.len() as u64,
        index_sha256: hex::encode(kiln_feed::delta::sha256(head)),
        leaves: format!("chunks/{sha}.leaves"),
        leaves_size: h.count as u64 * ENTRY as u64,
        pack: format!("chunks/{sha}.pack"),
        pack_size: h.pack_size,
    };
    if let Ok(bytes) = std::fs::read(path("index")) {
        if let Ok(h) = Head::decode(&bytes) {
            let len = |ext: &str| std::fs::metadata(path(ext)).map(|m| m.len()).ok();
            if h.artifact_sha256 == artifact_sha256
                && h.chunking == chunking
                && len("pack") == Some(h.pack_size)
                && len("leaves") == Some(h.count as u64 * ENTRY as u64)
            {
                return Ok(delta(&bytes, &h));
            }
        }
    }
    let file = std::fs::File::open(src).with_context(|| format!("reading {}", src.display()))?;
    let tmp = dir.join(format!(".{sha}.pack.tmp"));
    let mut pack =
        std::io::BufWriter::new(std::fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?);
    let mut chunks = Vec::new();
    let mut size = 0u64;
    kiln_feed::delta::for_each_chunk(std::io::BufReader::with_capacity(1 << 20, file), chunking, |_, data| {
        let z = zstd::bulk::compress(data, ZSTD_LEVEL)?;
        let (packing, bytes) = if z.len() < data.len() { (Packing::Zstd, &z[..]) } else { (Packing::Stored, data) };
        pack.write_all(bytes)?;
        chunks.push(Chunk {
            sha256: kiln_feed::delta::sha256(data),
            size: data.len() as u32,
            packed: bytes.len() as u32,
            packing,
        });
        size += data.len() as u64;
        Ok(())
    })
    .with_context(|| format!("cutting {} into chunks", src.display()))?;
    let pack = pack.into_inner().map_err(|e| e.into_error()).with_context(|| format!("writing {}", tmp.display()))?;
    pack.sync_all().with_context(|| format!("syncing {}", tmp.display()))?;
    std::fs::rename(&tmp, path("pack")).with_context(|| format!("renaming {}", tmp.display()))?;
    let index = Index { artifact_sha256, size, chunking, chunks };
    write_atomic(&path("leaves"), &index.encode_leaves())?;
    let head = index.head();
    let bytes = head.encode();
    write_atomic(&path("index"), &bytes)?;
    Ok(delta(&bytes, &head))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn changelogs_list_added_removed_and_upgraded() {
        let p = |n: &str, v: &str| Package { name: n.into(), version: v.into(), arch: "amd64".into() };
        let c = changelog(&[p("a", "1"), p("b", "1"), p("c", "1")], &[p("a", "1"), p("b", "2"), p("d", "1")]);
        let lines: Vec<String> = c.iter().map(|c| c.to_string()).collect();
        assert_eq!(lines, ["b 1 -> 2", "d 1 (new)", "c 1 (removed)"]);
    }
}
