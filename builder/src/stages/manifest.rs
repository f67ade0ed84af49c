//! Stage 6: `manifest.json`, what the image is made of: inputs, packages with versions, the
//! sha256 of every artifact, the partition table and the verity root hash.

use super::rootfs::RootImage;
use super::Context;
use crate::host::exec::Cmd;
use crate::units::{sha256_file, Bytes};
use anyhow::{Context as _, Result};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::Path;

pub const FILE: &str = "manifest.json";

#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct Manifest {
    pub kiln_version: String,
    pub name: String,
    pub profile: String,
    pub profile_chain: Vec<String>,
    pub image: String,
    pub arch: String,
    pub suite: String,
    pub version: String,
    pub source_date_epoch: u64,
    pub sources: Vec<String>,
    pub kernel: String,
    pub kernel_cmdline: String,
    pub verity: Verity,
    /// "gpt" or "mbr".
    #[serde(default = "default_table")]
    pub partition_table: String,
    pub partitions: Vec<Partition>,
    pub artifacts: BTreeMap<String, Artifact>,
    pub packages: Vec<Package>,
    pub host_tools: BTreeMap<String, String>,
    /// How `kiln boot` runs this image.
    pub qemu: crate::config::image::Qemu,
    /// Service exposure scores, firewall openings, setuid files (older manifests: empty).
    #[serde(default)]
    pub security: super::harden::SecurityReport,
}

fn default_table() -> String {
    "gpt".into()
}

#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct Verity {
    pub root_hash: String,
    pub hash_offset: u64,
    pub salt: String,
    pub data_block_size: u32,
    pub hash_block_size: u32,
}

#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct Partition {
    pub name: String,
    /// The Linux partition number (`/dev/mmcblk0p<number>`).
    #[serde(default)]
    pub number: u32,
    pub role: String,
    pub slot: Option<String>,
    pub offset: u64,
    pub size: u64,
    pub partuuid: String,
}

#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct Artifact {
    pub sha256: String,
    pub size: u64,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Package {
    pub name: String,
    pub version: String,
    pub arch: String,
}

/// Installed packages, read from the tree's dpkg database with the host's dpkg-query.
pub fn packages(tree: &Path) -> Result<Vec<Package>> {
    let admindir = tree.join("usr/share/factory/var/lib/dpkg");
    let admindir = if admindir.is_dir() { admindir } else { tree.join("var/lib/dpkg") };
    let out = Cmd::new("dpkg-query")
        .arg(format!("--admindir={}", admindir.display()))
        .args(["-W", "-f", "${db:Status-Abbrev}\t${Package}\t${Version}\t${Architecture}\n"])
        .read()?;
    let mut v: Vec<Package> = out
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split('\t').collect();
            (f.len() == 4 && f[0].starts_with("ii")).then(|| Package {
                name: f[1].into(),
                version: f[2].into(),
                arch: f[3].into(),
            })
        })
        .collect();
    v.sort();
    Ok(v)
}

/// Versions of the host tools that shape the output, as their Debian packages say.
pub fn host_tools() -> BTreeMap<String, String> {
    const PACKAGES: [&str; 6] = ["mmdebstrap", "erofs-utils", "cryptsetup-bin", "binutils", "dosfstools", "mtools"];
    let mut m: BTreeMap<String, String> =
        PACKAGES.iter().map(|p| (p.to_string(), "not installed".to_string())).collect();
    let out =
        Cmd::new("dpkg-query").args(["-W", "-f", "${Package}\t${Version}\n"]).args(PACKAGES).read().unwrap_or_default();
    for line in out.lines() {
        if let Some((pkg, ver)) = line.split_once('\t') {
            if !ver.is_empty() {
                m.insert(pkg.to_string(), ver.to_string());
            }
        }
    }
    m
}

pub fn artifact(path: &Path) -> Result<Artifact> {
    let size = std::fs::metadata(path).with_context(|| format!("reading {}", path.display()))?.len();
    let sha256 = sha256_file(path).with_context(|| format!("hashing {}", path.display()))?.hex();
    Ok(Artifact { sha256, size })
}

#[allow(clippy::too_many_arguments)]
pub fn write(
    ctx: &Context,
    root: &RootImage,
    kernel: &str,
    cmdline: &str,
    partuuids: &[String],
    artifacts: BTreeMap<String, Artifact>,
    packages: Vec<Package>,
    security: super::harden::SecurityReport,
) -> Result<Manifest> {
    let plan = ctx.plan;
    let partitions = plan
        .disk
        .partitions
        .iter()
        .zip(partuuids)
        .map(|(p, uuid)| Partition {
            name: p.name.clone(),
            role: format!("{:?}", p.role).to_lowercase(),
            slot: p.slot.map(|s| format!("{s:?}").to_lowercase()),
            offset: p.offset.0,
            size: p.size.0,
            number: p.number,
            partuuid: uuid.clone(),
        })
        .collect();
    let m = Manifest {
        kiln_version: env!("CARGO_PKG_VERSION").into(),
        name: plan.output_name.clone(),
        profile: plan.profile.clone(),
        profile_chain: plan.profile_chain.clone(),
        image: plan.image.clone(),
        arch: plan.arch.debian().into(),
        suite: plan.suite.clone(),
        version: plan.version.clone(),
        source_date_epoch: plan.source_date_epoch,
        sources: plan.sources.clone(),
        kernel: kernel.into(),
        kernel_cmdline: cmdline.into(),
        verity: Verity {
            root_hash: root.root_hash.clone(),
            hash_offset: root.hash_offset,
            salt: root.salt.clone(),
            data_block_size: 4096,
            hash_block_size: 4096,
        },
        partition_table: format!("{:?}", plan.disk.table).to_lowercase(),
        partitions,
        artifacts,
        packages,
        host_tools: host_tools(),
        qemu: plan.qemu.clone(),
        security,
    };
    let path = ctx.staging.join(FILE);
    let text = serde_json::to_string_pretty(&m).context("serializing the manifest")? + "\n";
    std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
    Ok(m)
}

pub fn read(dir: &Path) -> Result<Manifest> {
    let path = dir.join(FILE);
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("reading {} (is {} a kiln build output?)", path.display(), dir.display()))?;
    serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))
}

/// Human-readable size for reports.
pub fn size(b: u64) -> String {
    Bytes(b).to_string()
}
