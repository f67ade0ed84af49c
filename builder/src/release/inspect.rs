//! `kiln inspect`: what a build output holds: version, packages, partitions, hashes. With
//! `--verify`, every artifact is hashed again and the disk's partition table is compared with
//! the manifest.

use crate::gpt::{GptTable, SECTOR};
use crate::stages::manifest::{self, Manifest};
use crate::units::sha256_file;
use anyhow::{bail, Context as _, Result};
use std::path::Path;

pub fn print(m: &Manifest, packages: bool) {
    println!("{} {} ({} {}, {})", m.name, m.version, m.suite, m.arch, m.image);
    println!("profile:   {}", m.profile_chain.join(" <- "));
    println!("kernel:    {}", m.kernel);
    println!("cmdline:   {}", m.kernel_cmdline);
    println!("root hash: {} (hash tree at byte {})", m.verity.root_hash, m.verity.hash_offset);
    println!("partitions:");
    for p in &m.partitions {
        println!(
            "  {:<8} {:<5} {:<2} at {:>10} size {:>8}  {}",
            p.name,
            p.role,
            p.slot.as_deref().unwrap_or("-"),
            manifest::size(p.offset),
            manifest::size(p.size),
            p.partuuid
        );
    }
    println!("artifacts:");
    for (name, a) in &m.artifacts {
        println!("  {:<20} {:>10}  sha256 {}", name, manifest::size(a.size), a.sha256);
    }
    print_security(&m.security);
    println!("packages:  {}", m.packages.len());
    if packages {
        for p in &m.packages {
            println!("  {:<36} {} {}", p.name, p.version, p.arch);
        }
    }
}

/// The security gate's table and the system's openings.
pub fn print_security(s: &crate::stages::harden::SecurityReport) {
    if !s.services.is_empty() {
        println!("services (systemd-analyze security exposure, 0 = fully sandboxed):");
        println!(
            "  {:<12} {:<22} {:>8} {:<8} {:>6}  {:<26} loosened",
            "name", "unit", "exposure", "rating", "budget", "ports"
        );
        for v in &s.services {
            let loosened: Vec<String> = v.loosened.iter().map(|l| format!("{}={}", l.directive, l.now)).collect();
            println!(
                "  {:<12} {:<22} {:>8.1} {:<8} {:>6.1}  {:<26} {}",
                v.name,
                v.unit,
                v.exposure,
                v.rating,
                v.budget,
                if v.ports.is_empty() { "-".to_string() } else { v.ports.join(" ") },
                if loosened.is_empty() { "-".to_string() } else { loosened.join(" ") }
            );
        }
    }
    if s.firewall_enabled {
        println!("firewall:  inbound denied except {}", s.firewall.join(", "));
    } else if !s.services.is_empty() || !s.setuid_kept.is_empty() {
        println!("firewall:  OFF (hardening.firewall = false)");
    }
    if !s.setuid_kept.is_empty() || !s.setuid_removed.is_empty() {
        println!(
            "setuid:    {} kept ({}), {} stripped",
            s.setuid_kept.len(),
            s.setuid_kept.join(", "),
            s.setuid_removed.len()
        );
    }
}

/// Re-hashes every artifact and reads the disk's GPT back; errors name the first mismatch.
pub fn verify(dir: &Path, m: &Manifest) -> Result<()> {
    for (name, a) in &m.artifacts {
        let p = dir.join(name);
        let got = sha256_file(&p).with_context(|| format!("hashing {}", p.display()))?;
        if got.hex() != a.sha256 {
            bail!(
                "{}: sha256 is {} but the manifest says {}: the file was changed after the build",
                p.display(),
                got.hex(),
                a.sha256
            );
        }
    }
    let disk = dir.join("disk.img");
    let size = std::fs::metadata(&disk).with_context(|| format!("reading {}", disk.display()))?.len();
    let mut f = std::fs::File::open(&disk).with_context(|| format!("opening {}", disk.display()))?;
    // (name or "", offset, partuuid) as the disk has them.
    let found: Vec<(String, u64, String)> = if m.partition_table == "mbr" {
        let t = crate::mbr::MbrTable::read(&mut f)
            .with_context(|| format!("reading the partition table of {}", disk.display()))?;
        t.partitions.iter().map(|p| (String::new(), p.first_lba * crate::mbr::SECTOR, t.partuuid(p))).collect()
    } else {
        let t = GptTable::read(&mut f, size / SECTOR)
            .with_context(|| format!("reading the partition table of {}", disk.display()))?;
        t.partitions.iter().map(|p| (p.name.clone(), p.first_lba * SECTOR, p.guid.to_string())).collect()
    };
    if found.len() != m.partitions.len() {
        bail!("{}: {} partitions on the disk, the manifest lists {}", disk.display(), found.len(), m.partitions.len());
    }
    for (want, (name, offset, partuuid)) in m.partitions.iter().zip(&found) {
        if (!name.is_empty() && want.name != *name) || want.offset != *offset || want.partuuid != *partuuid {
            bail!("{}: partition {:?} differs from the manifest", disk.display(), want.name);
        }
    }
    println!("verified: {} artifacts and {} partitions match the manifest", m.artifacts.len(), found.len());
    Ok(())
}
