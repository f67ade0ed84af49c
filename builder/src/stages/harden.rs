//! Stage 3: harden the customized tree. The profile's services get their sandboxed units and
//! configuration from the catalog; the system gets its firewall (nftables, inbound denied but
//! SSH and the declared ports), kernel settings, module blacklist, journal limits, watchdog and
//! resolver settings; setuid/setgid bits are removed from every file not allowed to keep one;
//! a compiler in the image fails the build. Last comes the security gate: `systemd-analyze
//! security --offline` (the image's own) scores every service unit, and the build fails when
//! one exceeds its exposure budget, naming the directives that would lower it.

use super::Context;
use crate::config::services::{Loosened, ServicePlan};
use crate::host::exec::Cmd;
use crate::host::progress::StageProgress;
use anyhow::{bail, Context as _, Result};
use serde::{Deserialize, Serialize};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use super::customize::{remove_any, write_file};

/// What the build knows about the image's security, for the manifest and `kiln inspect`.
#[derive(Serialize, Deserialize, Debug, Clone, Default, PartialEq)]
pub struct SecurityReport {
    pub services: Vec<ServiceScore>,
    /// Inbound ports the firewall lets in ("22/tcp ssh", ...); empty when the firewall is off.
    pub firewall: Vec<String>,
    pub firewall_enabled: bool,
    /// Files that keep a setuid/setgid bit.
    pub setuid_kept: Vec<String>,
    /// Files whose setuid/setgid bit the build removed.
    pub setuid_removed: Vec<String>,
    pub sysctl: usize,
    pub watchdog_secs: Option<u64>,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct ServiceScore {
    pub name: String,
    pub unit: String,
    pub kind: String,
    /// `systemd-analyze security` overall exposure (0.0 best, 10.0 worst).
    pub exposure: f64,
    /// Its word for it ("OK", "MEDIUM", "EXPOSED", ...).
    pub rating: String,
    pub budget: f64,
    pub ports: Vec<String>,
    pub loosened: Vec<Loosened>,
    /// The checks still counting against the unit, worst first (directive, exposure).
    pub remaining: Vec<Finding>,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct Finding {
    pub directive: String,
    pub description: String,
    pub exposure: f64,
}

/// libpam-tmpdir's setuid helper, which makes a session's private directory in /tmp/user.
const PAM_TMPDIR_HELPER: &str = "/usr/libexec/pam-tmpdir/pam-tmpdir-helper";

/// Programs that make an appliance a build machine for whoever gets in.
const COMPILERS: &[&str] = &["gcc", "cc", "c++", "g++", "clang", "tcc", "as", "ld", "rustc", "go", "javac"];

pub fn harden(ctx: &Context) -> Result<SecurityReport> {
    let progress = StageProgress::start("harden", "services, firewall, kernel settings, security gate");
    let plan = ctx.plan;
    let tree = &ctx.tree;
    let t = &ctx.templates;
    let mut tctx = tera::Context::from_serialize(plan).context("plan as template context")?;
    let h = &plan.hardening;

    // Services.
    let mut units = Vec::new();
    let mut serve_dirs = Vec::new();
    for s in &plan.services {
        install_service(ctx, s)?;
        units.push(s.unit.clone());
        for site in &s.sites {
            if let Some(root) = &site.root {
                // /srv and /home are links into /var: make the directory there.
                let on_data = root
                    .strip_prefix("/srv/")
                    .map(|r| format!("/var/srv/{r}"))
                    .or_else(|| root.starts_with("/var/").then(|| root.clone()));
                serve_dirs.extend(on_data);
            }
        }
    }
    if !plan.services.is_empty() {
        write_file(
            &tree.join("usr/lib/kiln/service-provision"),
            t.render("rootfs/service-provision", &tctx)?.as_bytes(),
            0o755,
        )?;
        tctx.insert("dirs", &serve_dirs);
        write_file(
            &tree.join("usr/lib/tmpfiles.d/kiln-services.conf"),
            t.render("rootfs/tmpfiles-services.conf.tera", &tctx)?.as_bytes(),
            0o644,
        )?;
    }

    // The firewall.
    let mut firewall = Vec::new();
    if h.firewall {
        if !tree.join("usr/sbin/nft").exists() {
            bail!("hardening.firewall: the image has no nft (add \"nftables\" to system.packages, or set hardening.firewall = false)");
        }
        write_file(&tree.join("etc/nftables.conf"), t.render("rootfs/nftables.conf.tera", &tctx)?.as_bytes(), 0o755)?;
        units.push("nftables.service".into());
        firewall.push("22/tcp ssh".to_string());
        firewall.extend(h.open_ports.iter().map(|p| format!("{}/{} {}", p.port, p.proto, p.service)));
    }

    // System-wide settings.
    write_file(
        &tree.join("etc/sysctl.d/90-kiln-hardening.conf"),
        t.render("rootfs/sysctl.conf.tera", &tctx)?.as_bytes(),
        0o644,
    )?;
    write_file(
        &tree.join("etc/modprobe.d/kiln-hardening.conf"),
        t.render("rootfs/modprobe.conf.tera", &tctx)?.as_bytes(),
        0o644,
    )?;
    write_file(
        &tree.join("etc/systemd/journald.conf.d/90-kiln.conf"),
        t.render("rootfs/journald.conf.tera", &tctx)?.as_bytes(),
        0o644,
    )?;
    write_file(
        &tree.join("etc/systemd/system.conf.d/90-kiln.conf"),
        t.render("rootfs/system.conf.tera", &tctx)?.as_bytes(),
        0o644,
    )?;
    write_file(
        &tree.join("etc/systemd/resolved.conf.d/90-kiln.conf"),
        t.render("rootfs/resolved.conf", &tctx)?.as_bytes(),
        0o644,
    )?;

    let issue = t.render("rootfs/issue", &tctx)?;
    write_file(&tree.join("etc/issue"), issue.as_bytes(), 0o644)?;
    write_file(&tree.join("etc/issue.net"), issue.as_bytes(), 0o644)?;
    write_file(
        &tree.join("etc/systemd/coredump.conf.d/90-kiln.conf"),
        t.render("rootfs/coredump.conf", &tctx)?.as_bytes(),
        0o644,
    )?;
    // systemd's file of the same name allows unlimited cores; this one replaces it.
    write_file(
        &tree.join("etc/security/limits.d/10-coredump-debian.conf"),
        t.render("rootfs/limits-core.conf", &tctx)?.as_bytes(),
        0o644,
    )?;
    write_file(
        &tree.join("etc/profile.d/kiln-hardening.sh"),
        t.render("rootfs/profile-hardening.sh", &tctx)?.as_bytes(),
        0o644,
    )?;
    harden_login_defs(tree)?;
    check_sshd(tree)?;
    if h.audit {
        install_audit(ctx, &mut tctx)?;
        units.push("auditd.service".into());
    }
    if h.pam_tmpdir
        && !std::fs::read_to_string(tree.join("etc/pam.d/common-session")).unwrap_or_default().contains("pam_tmpdir.so")
    {
        bail!("hardening.pam_tmpdir: libpam-tmpdir did not enable pam_tmpdir.so in /etc/pam.d/common-session");
    }

    if !units.is_empty() {
        Cmd::new("chroot")
            .arg(tree)
            .args(["systemctl", "enable", "--quiet"])
            .args(&units)
            .run()
            .context("enabling the services")?;
    }

    check_compilers(tree, h.allow_compilers)?;
    let mut setuid_allow = h.setuid_allow.clone();
    if h.pam_tmpdir {
        // The session runs as the user when pam_tmpdir makes /tmp/user/<uid>: its helper does it.
        setuid_allow.push(PAM_TMPDIR_HELPER.into());
    }
    let (setuid_kept, setuid_removed) = strip_setuid(tree, &setuid_allow)?;

    // The gate.
    let mut scores = Vec::new();
    for s in &plan.services {
        let score = score(tree, s)?;
        progress.line(&format!(
            "{:<12} {:<22} exposure {:.1} {} (budget {:.1})",
            s.name, s.unit, score.exposure, score.rating, score.budget
        ));
        scores.push(score);
    }
    let over: Vec<&ServiceScore> = scores.iter().filter(|s| s.exposure > s.budget).collect();
    if !over.is_empty() {
        let mut msg = String::from("security gate: ");
        for (i, s) in over.iter().enumerate() {
            if i > 0 {
                msg.push_str("\n\n");
            }
            msg.push_str(&gate_failure(s));
        }
        bail!(msg);
    }

    let report = SecurityReport {
        services: scores,
        firewall,
        firewall_enabled: h.firewall,
        setuid_kept,
        setuid_removed,
        sysctl: h.sysctl.len(),
        watchdog_secs: h.watchdog_secs,
    };
    progress.finish(&format!(
        "{} services within budget, firewall {}, {} setuid files kept, {} stripped",
        report.services.len(),
        if h.firewall { format!("open for {}", report.firewall.len()) } else { "off".into() },
        report.setuid_kept.len(),
        report.setuid_removed.len()
    ));
    Ok(report)
}

/// sshd's own check of its configuration, at build time, with a throw-away host key (the device
/// makes its own at first boot). Debian's ssh.service runs the same `sshd -t` before every start;
/// a drop-in empties that ExecStartPre: a mistake stops the build instead of the device's SSH,
/// and the boot's critical chain loses an sshd start (about half a second under emulation).
fn check_sshd(tree: &Path) -> Result<()> {
    if !tree.join("usr/sbin/sshd").exists() {
        return Ok(());
    }
    let scratch = tree.join("run/kiln-sshd-check");
    let privsep = tree.join("run/sshd");
    let made_privsep = !privsep.exists();
    std::fs::create_dir_all(&scratch).with_context(|| format!("creating {}", scratch.display()))?;
    std::fs::create_dir_all(&privsep).with_context(|| format!("creating {}", privsep.display()))?;
    let checked = Cmd::new("chroot")
        .arg(tree)
        .args(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", "/run/kiln-sshd-check/key"])
        .output()
        .map_err(|e| anyhow::anyhow!("making a throw-away host key for the sshd check: {e}"))
        .and_then(|_| {
            Cmd::new("chroot").arg(tree).args(["/usr/sbin/sshd", "-t", "-h", "/run/kiln-sshd-check/key"]).output().map_err(
                |e| {
                    anyhow::anyhow!(
                        "the image's sshd refuses its configuration (/etc/ssh/sshd_config with sshd_config.d/50-kiln.conf, from the profile's users and hardening): {e}"
                    )
                },
            )
        });
    std::fs::remove_dir_all(&scratch).with_context(|| format!("removing {}", scratch.display()))?;
    if made_privsep {
        std::fs::remove_dir(&privsep).with_context(|| format!("removing {}", privsep.display()))?;
    }
    checked?;
    write_file(
        &tree.join("etc/systemd/system/ssh.service.d/90-kiln.conf"),
        b"# Written by kiln: sshd -t ran when the image was built (no second check at every boot).\n[Service]\nExecStartPre=\n",
        0o644,
    )
}

/// New files private to their owner's group; strong hashes should a password ever be set.
fn harden_login_defs(tree: &Path) -> Result<()> {
    let path = tree.join("etc/login.defs");
    let Ok(text) = std::fs::read_to_string(&path) else { return Ok(()) };
    let set = [
        ("UMASK", "027"),
        ("SHA_CRYPT_MIN_ROUNDS", "65536"),
        ("SHA_CRYPT_MAX_ROUNDS", "65536"),
        ("ENCRYPT_METHOD", "YESCRYPT"),
    ];
    let mut out: String = text
        .lines()
        .filter(|l| !set.iter().any(|(k, _)| l.split_whitespace().next() == Some(*k)))
        .map(|l| format!("{l}\n"))
        .collect();
    out.push_str("# Set by kiln.\n");
    for (k, v) in set {
        out.push_str(&format!("{k} {v}\n"));
    }
    write_file(&path, out.as_bytes(), 0o644)
}

/// auditd with kiln's rules, compiled at build time (the root is read-only at run time, so
/// augenrules finds nothing to change and only loads them); its log is on the data partition.
fn install_audit(ctx: &Context, tctx: &mut tera::Context) -> Result<()> {
    let tree = &ctx.tree;
    if !tree.join("usr/sbin/auditd").exists() {
        bail!("hardening.audit: the image has no auditd (the package auditd was not installed)");
    }
    tctx.insert("audit_arches", AUDIT_ARCHES);
    let rules_d = tree.join("etc/audit/rules.d");
    // Debian's own audit.rules there holds only the buffer settings, which kiln's file sets too.
    remove_any(&rules_d.join("audit.rules"))?;
    write_file(
        &rules_d.join("50-kiln.rules"),
        ctx.templates.render("rootfs/audit.rules.tera", tctx)?.as_bytes(),
        0o640,
    )?;
    Cmd::new("chroot").arg(tree).arg("augenrules").run().context("compiling the audit rules (augenrules)")?;
    set_keys(&tree.join("etc/audit/auditd.conf"), " = ", AUDITD_CONF)?;
    write_file(
        &tree.join("etc/systemd/system/auditd.service.d/90-kiln.conf"),
        ctx.templates.render("rootfs/auditd-kiln.conf", tctx)?.as_bytes(),
        0o644,
    )?;
    write_file(
        &tree.join("usr/lib/tmpfiles.d/kiln-audit.conf"),
        b"# Written by kiln: auditd's log on the data partition.\nd /var/log/audit 0700 root root -\n",
        0o644,
    )
}

/// The log stays bounded on the data partition: five files of 8 MiB, rotated; when the
/// partition runs short auditd says so in the journal and stops recording rather than fill it.
const AUDITD_CONF: &[(&str, &str)] = &[
    ("log_file", "/var/log/audit/audit.log"),
    ("max_log_file", "8"),
    ("num_logs", "5"),
    ("max_log_file_action", "ROTATE"),
    ("space_left", "75"),
    ("space_left_action", "SYSLOG"),
    ("admin_space_left", "50"),
    ("admin_space_left_action", "SUSPEND"),
    ("disk_full_action", "SUSPEND"),
    ("disk_error_action", "SYSLOG"),
];

/// Rules name syscalls per architecture: the native one (amd64, arm64) and its 32-bit compat
/// one, through which a program would otherwise escape the native rules.
const AUDIT_ARCHES: &[&str] = &["b64", "b32"];

/// Sets `key<sep>value` lines in a configuration file: an existing line of the key is replaced
/// in place, a missing key is appended.
fn set_keys(path: &Path, sep: &str, set: &[(&str, &str)]) -> Result<()> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    write_file(path, set_keys_in(&text, sep, set).as_bytes(), 0o640)
}

fn set_keys_in(text: &str, sep: &str, set: &[(&str, &str)]) -> String {
    let key_of = |l: &str| l.split(['=', ' ', '\t']).next().unwrap_or("").to_string();
    let mut done = Vec::new();
    let mut out = String::new();
    for line in text.lines() {
        match set.iter().find(|(k, _)| *k == key_of(line.trim_start())) {
            Some((k, v)) => {
                if !done.contains(k) {
                    out.push_str(&format!("{k}{sep}{v}\n"));
                    done.push(*k);
                }
            }
            _ => out.push_str(&format!("{line}\n")),
        }
    }
    for (k, v) in set.iter().filter(|(k, _)| !done.contains(k)) {
        out.push_str(&format!("{k}{sep}{v}\n"));
    }
    out
}

fn gate_failure(s: &ServiceScore) -> String {
    let mut msg = format!(
        "services.{}: {} has exposure {:.1} ({}), over its budget of {:.1}",
        s.name, s.unit, s.exposure, s.rating, s.budget
    );
    if !s.loosened.is_empty() {
        let l: Vec<String> =
            s.loosened.iter().map(|l| format!("{}={} (kiln sets {})", l.directive, l.now, l.was)).collect();
        msg.push_str(&format!("\n  loosened by the profile: {}", l.join(", ")));
    }
    msg.push_str("\n  these settings would lower it (worst first):");
    for f in s.remaining.iter().take(8) {
        msg.push_str(&format!("\n    {:<40} {:>4.1}  {}", f.directive, f.exposure, f.description));
    }
    msg.push_str(&format!(
        "\n  remove the loosening from [services.{0}.loosen], or raise services.{0}.exposure_budget if the service cannot run otherwise",
        s.name
    ));
    msg
}

fn install_service(ctx: &Context, s: &ServicePlan) -> Result<()> {
    let tree = &ctx.tree;
    let t = &ctx.templates;
    let key = format!("services.{}", s.name);
    if s.kind == "custom" {
        // A service of the user's own must not silently replace one of the system's.
        for dir in ["usr/lib/systemd/system", "lib/systemd/system", "etc/systemd/system"] {
            let existing = tree.join(dir).join(&s.unit);
            if existing.symlink_metadata().is_ok() {
                bail!("{key}: the image already has a {} (/{dir}); name the service differently", s.unit);
            }
        }
    }
    if let Some(b) = &s.binary {
        let data = std::fs::read(&b.source).with_context(|| format!("{key}.binary: reading {}", b.source))?;
        check_program(tree, ctx.plan.arch, &key, &b.source, &data)?;
        write_file(&tree.join(b.dest.trim_start_matches('/')), &data, 0o755)?;
    }
    let program = s.exec.split_whitespace().next().unwrap_or_default();
    let in_tree = tree.join(program.trim_start_matches('/'));
    if in_tree.symlink_metadata().is_err() {
        bail!("{key}.exec: {program} is not in the image (copy it with binary = \"...\", or add the package that has it to services.{}.packages)", s.name);
    }
    let mut c = tera::Context::from_serialize(ctx.plan).context("plan as template context")?;
    c.insert("service", s);
    c.insert("sites", &s.sites);
    for (path, f) in &s.files {
        let text = t.render(&format!("catalog/{}", f.template), &c)?;
        write_file(&tree.join(path.trim_start_matches('/')), text.as_bytes(), 0o644)?;
    }
    if let Some(v) = &s.validate {
        let argv: Vec<&str> = v.split_whitespace().collect();
        Cmd::new("chroot").arg(tree).args(&argv).env("HOME", "/nonexistent").output().map_err(|e| {
            anyhow::anyhow!("{key}: the rendered configuration does not pass `{v}`: {e}\n(check the profile's [services.{}] settings)", s.name)
        })?;
    }
    let unit = t.render("catalog/service.tera", &c)?;
    write_file(&tree.join("etc/systemd/system").join(&s.unit), unit.as_bytes(), 0o644)
}

/// A program copied into the image must be of the image's architecture, and find its
/// interpreter and shared libraries there (scripts: their interpreter).
fn check_program(tree: &Path, arch: crate::config::image::Arch, key: &str, source: &str, data: &[u8]) -> Result<()> {
    use crate::boot::initramfs::elf;
    if let Some(rest) = data.strip_prefix(b"#!") {
        let line = String::from_utf8_lossy(rest.split(|b| *b == b'\n').next().unwrap_or_default()).into_owned();
        let interp = line.split_whitespace().next().unwrap_or_default().to_string();
        if !interp.starts_with('/') || tree.join(interp.trim_start_matches('/')).symlink_metadata().is_err() {
            bail!("{key}.binary: {source} is a script for {interp:?}, which the image does not have (add the package that has it to the service's packages)");
        }
        return Ok(());
    }
    if !data.starts_with(b"\x7fELF") {
        bail!("{key}.binary: {source} is neither an ELF program nor a script starting with #!");
    }
    let info = elf::parse(data).map_err(|e| anyhow::anyhow!("{key}.binary: {source}: {e}"))?;
    let want = match arch {
        crate::config::image::Arch::Amd64 => elf::EM_X86_64,
        crate::config::image::Arch::Arm64 => elf::EM_AARCH64,
    };
    if info.machine != want {
        let is = match info.machine {
            elf::EM_X86_64 => "x86-64 (amd64)".to_string(),
            elf::EM_AARCH64 => "AArch64 (arm64)".to_string(),
            m => format!("ELF machine {m}"),
        };
        bail!(
            "{key}.binary: {source} is an {is} program, but the image is {}: build it for {}",
            arch.debian(),
            arch.debian()
        );
    }
    if let Some(interp) = &info.interpreter {
        if tree.join(interp.trim_start_matches('/')).symlink_metadata().is_err() {
            bail!("{key}.binary: {source} needs the program loader {interp}, which the image does not have (a program built for another C library?)");
        }
    }
    let dirs: Vec<String> = info
        .multiarch()
        .map(|t| vec![format!("usr/lib/{t}"), format!("lib/{t}")])
        .unwrap_or_default()
        .into_iter()
        .chain(["usr/lib".into(), "lib".into(), "usr/local/lib".into()])
        .collect();
    let missing: Vec<&String> =
        info.needed.iter().filter(|lib| !dirs.iter().any(|d| tree.join(d).join(lib.as_str()).exists())).collect();
    if !missing.is_empty() {
        let names: Vec<&str> = missing.iter().map(|s| s.as_str()).collect();
        bail!("{key}.binary: {source} needs {}, which the image does not have: add the Debian packages that ship them to the service's packages", names.join(", "));
    }
    Ok(())
}

/// Scores one unit with the image's own `systemd-analyze` (it knows the image's directives).
fn score(tree: &Path, s: &ServicePlan) -> Result<ServiceScore> {
    let out = Cmd::new("chroot")
        .arg(tree)
        .args(["systemd-analyze", "security", "--offline=true", "--no-pager"])
        .arg(&s.unit)
        .env("SYSTEMD_COLORS", "0")
        .read()
        .with_context(|| format!("services.{}: scoring {} with systemd-analyze security", s.name, s.unit))?;
    let (exposure, rating, remaining) = parse_security(&out)
        .with_context(|| format!("services.{}: reading systemd-analyze security's output:\n{out}", s.name))?;
    Ok(ServiceScore {
        name: s.name.clone(),
        unit: s.unit.clone(),
        kind: s.kind.clone(),
        exposure,
        rating,
        budget: s.exposure_budget,
        ports: s.ports.iter().map(|p| p.to_string()).collect(),
        loosened: s.loosened.clone(),
        remaining,
    })
}

/// Reads `systemd-analyze security UNIT`: the overall line ("→ Overall exposure level for
/// x.service: 1.2 OK :-)") and every failed check ("✗ Name=  description  0.2"), worst first.
pub fn parse_security(out: &str) -> Result<(f64, String, Vec<Finding>)> {
    let mut overall = None;
    let mut findings = Vec::new();
    for line in out.lines() {
        if let Some(rest) = line.split("Overall exposure level for ").nth(1) {
            let after = rest.split_once(": ").map(|(_, a)| a).unwrap_or("");
            let mut words = after.split_whitespace();
            let n: f64 = words.next().and_then(|w| w.parse().ok()).context("no exposure number")?;
            overall = Some((n, words.next().unwrap_or("").to_string()));
            continue;
        }
        let Some(rest) = line.trim_start().strip_prefix('✗') else { continue };
        let words: Vec<&str> = rest.split_whitespace().collect();
        let Some(exposure) = words.last().and_then(|w| w.parse::<f64>().ok()) else { continue };
        if words.len() < 2 {
            continue;
        }
        findings.push(Finding {
            directive: words[0].to_string(),
            description: words[1..words.len() - 1].join(" "),
            exposure,
        });
    }
    findings.sort_by(|a, b| b.exposure.total_cmp(&a.exposure).then_with(|| a.directive.cmp(&b.directive)));
    let (n, rating) = overall.context("no \"Overall exposure level\" line")?;
    Ok((n, rating, findings))
}

fn check_compilers(tree: &Path, allowed: bool) -> Result<()> {
    if allowed {
        return Ok(());
    }
    let mut found = Vec::new();
    for dir in ["usr/bin", "usr/local/bin"] {
        let Ok(rd) = std::fs::read_dir(tree.join(dir)) else { continue };
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            // gcc-14, x86_64-linux-gnu-gcc-14, clang-19 ...
            let base = name
                .rsplit_once('-')
                .filter(|(_, v)| v.chars().all(|c| c.is_ascii_digit() || c == '.'))
                .map(|(b, _)| b)
                .unwrap_or(&name);
            let base = base.rsplit('-').next().unwrap_or(base);
            if COMPILERS.contains(&base) && std::fs::metadata(e.path()).is_ok() {
                found.push(format!("/{dir}/{name}"));
            }
        }
    }
    found.sort();
    if !found.is_empty() {
        bail!(
            "hardening: the image contains compilers or assemblers ({}); remove the package that pulls them in (`kiln inspect --packages` lists them), or set hardening.allow_compilers = true",
            found.join(", ")
        );
    }
    Ok(())
}

/// Removes setuid/setgid bits from every file not in `allow`. Returns (kept, removed).
fn strip_setuid(tree: &Path, allow: &[String]) -> Result<(Vec<String>, Vec<String>)> {
    let mut kept = Vec::new();
    let mut removed = Vec::new();
    walk(tree, tree, &mut |rel, path, meta| {
        let mode = meta.permissions().mode();
        if mode & 0o6000 == 0 || !meta.is_file() {
            return Ok(());
        }
        if allow.iter().any(|a| a == rel) {
            kept.push(rel.to_string());
        } else {
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode & !0o6000))
                .with_context(|| format!("removing the setuid bit of {}", path.display()))?;
            removed.push(rel.to_string());
        }
        Ok(())
    })?;
    kept.sort();
    removed.sort();
    Ok((kept, removed))
}

fn walk(root: &Path, dir: &Path, f: &mut dyn FnMut(&str, &Path, &std::fs::Metadata) -> Result<()>) -> Result<()> {
    let rd = std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))?;
    for e in rd {
        let e = e.with_context(|| format!("reading {}", dir.display()))?;
        let path = e.path();
        let meta = path.symlink_metadata().with_context(|| format!("reading {}", path.display()))?;
        if meta.is_dir() {
            if path
                .strip_prefix(root)
                .map(|r| r == Path::new("proc") || r == Path::new("sys") || r == Path::new("dev"))
                .unwrap_or(false)
            {
                continue;
            }
            walk(root, &path, f)?;
        } else {
            let rel = format!("/{}", path.strip_prefix(root).unwrap_or(&path).display());
            f(&rel, &path, &meta)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str =
        "  NAME                                   DESCRIPTION                                  EXPOSURE
✗ RootDirectory=/RootImage=               Service runs within the host's root directory     0.1
✓ User=/DynamicUser=                      Service runs under a transient non-root user identity
✗ PrivateNetwork=                         Service has access to the host's network          0.5
✗ IPAddressDeny=                          Service does not define an IP address allow list   0.2

→ Overall exposure level for caddy.service: 1.4 OK 🙂
";

    #[test]
    fn reads_the_score_and_the_failed_checks_worst_first() {
        let (n, rating, f) = parse_security(SAMPLE).unwrap();
        assert_eq!(n, 1.4);
        assert_eq!(rating, "OK");
        let names: Vec<&str> = f.iter().map(|f| f.directive.as_str()).collect();
        assert_eq!(names, ["PrivateNetwork=", "IPAddressDeny=", "RootDirectory=/RootImage="]);
        assert_eq!(f[0].description, "Service has access to the host's network");
        assert!(parse_security("nothing").is_err());
    }

    #[test]
    fn config_keys_are_replaced_in_place_or_appended() {
        let text = "# max_log_file = 1\nlog_file = /var/log/audit/audit.log\nmax_log_file = 20\nnum_logs=2\nmax_log_file = 30\nflush = INCREMENTAL_ASYNC\n";
        let out =
            set_keys_in(text, " = ", &[("max_log_file", "8"), ("num_logs", "5"), ("disk_full_action", "SUSPEND")]);
        assert_eq!(
            out,
            "# max_log_file = 1\nlog_file = /var/log/audit/audit.log\nmax_log_file = 8\nnum_logs = 5\nflush = INCREMENTAL_ASYNC\ndisk_full_action = SUSPEND\n"
        );
    }

    #[test]
    fn setuid_bits_go_except_the_allowed_ones() {
        let tree = tempfile::tempdir().unwrap();
        let bin = tree.path().join("usr/bin");
        std::fs::create_dir_all(&bin).unwrap();
        for (name, mode) in [("sudo", 0o4755), ("su", 0o4755), ("chage", 0o2755), ("ls", 0o755)] {
            std::fs::write(bin.join(name), b"x").unwrap();
            std::fs::set_permissions(bin.join(name), std::fs::Permissions::from_mode(mode)).unwrap();
        }
        let (kept, removed) = strip_setuid(tree.path(), &["/usr/bin/sudo".to_string()]).unwrap();
        assert_eq!(kept, ["/usr/bin/sudo"]);
        assert_eq!(removed, ["/usr/bin/chage", "/usr/bin/su"]);
        let mode = |n: &str| std::fs::metadata(bin.join(n)).unwrap().permissions().mode() & 0o7777;
        assert_eq!((mode("sudo"), mode("su"), mode("chage"), mode("ls")), (0o4755, 0o755, 0o755, 0o755));
    }

    #[test]
    fn a_copied_program_must_fit_the_image() {
        use crate::config::image::Arch;
        let tree = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(tree.path().join("usr/bin")).unwrap();
        std::fs::write(tree.path().join("usr/bin/python3"), b"x").unwrap();
        check_program(tree.path(), Arch::Amd64, "services.app", "app.py", b"#!/usr/bin/python3\nprint(1)\n").unwrap();
        let e = check_program(tree.path(), Arch::Amd64, "services.app", "app.rb", b"#!/usr/bin/ruby\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("a script for \"/usr/bin/ruby\", which the image does not have"), "{e}");
        let e = check_program(tree.path(), Arch::Amd64, "services.app", "app.txt", b"hello").unwrap_err().to_string();
        assert!(e.contains("neither an ELF program nor a script"), "{e}");
        let arm = crate::boot::initramfs::elf::synthetic(crate::boot::initramfs::elf::EM_AARCH64, None, &[], None);
        let e = check_program(tree.path(), Arch::Amd64, "services.app", "dist/app", &arm).unwrap_err().to_string();
        assert_eq!(
            e,
            "services.app.binary: dist/app is an AArch64 (arm64) program, but the image is amd64: build it for amd64"
        );
        let x86 = crate::boot::initramfs::elf::synthetic(
            crate::boot::initramfs::elf::EM_X86_64,
            None,
            &["libfoo.so.1"],
            None,
        );
        let e = check_program(tree.path(), Arch::Amd64, "services.app", "dist/app", &x86).unwrap_err().to_string();
        assert!(e.contains("needs libfoo.so.1, which the image does not have"), "{e}");
        std::fs::create_dir_all(tree.path().join("usr/lib/x86_64-linux-gnu")).unwrap();
        std::fs::write(tree.path().join("usr/lib/x86_64-linux-gnu/libfoo.so.1"), b"x").unwrap();
        check_program(tree.path(), Arch::Amd64, "services.app", "dist/app", &x86).unwrap();
    }

    #[test]
    fn compilers_fail_the_build_unless_allowed() {
        let tree = tempfile::tempdir().unwrap();
        let bin = tree.path().join("usr/bin");
        std::fs::create_dir_all(&bin).unwrap();
        for name in ["systemd-cat", "gcc-14", "x86_64-linux-gnu-as", "python3"] {
            std::fs::write(bin.join(name), b"x").unwrap();
        }
        let e = check_compilers(tree.path(), false).unwrap_err().to_string();
        assert!(e.contains("/usr/bin/gcc-14, /usr/bin/x86_64-linux-gnu-as"), "{e}");
        assert!(!e.contains("systemd-cat") && !e.contains("python3"), "{e}");
        assert!(e.contains("hardening.allow_compilers = true"), "{e}");
        check_compilers(tree.path(), true).unwrap();
    }

    #[test]
    fn a_weak_unit_fails_with_the_directives_to_fix() {
        let s = ServiceScore {
            name: "weak".into(),
            unit: "weak.service".into(),
            kind: "custom".into(),
            exposure: 6.3,
            rating: "MEDIUM".into(),
            budget: 2.0,
            ports: vec![],
            loosened: vec![Loosened { directive: "ProtectSystem".into(), was: "strict".into(), now: "no".into() }],
            remaining: parse_security(SAMPLE).unwrap().2,
        };
        let m = gate_failure(&s);
        assert!(m.starts_with("services.weak: weak.service has exposure 6.3 (MEDIUM), over its budget of 2.0"), "{m}");
        assert!(m.contains("loosened by the profile: ProtectSystem=no (kiln sets strict)"), "{m}");
        assert!(m.contains("PrivateNetwork="), "{m}");
    }
}
