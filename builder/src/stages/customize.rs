//! Stage 2: turn the bootstrapped tree into an appliance: configuration from templates, users,
//! hostname, time zone and locale, a read-only-root layout with state on /var, and removal of
//! everything that must differ per device or per boot (machine-id, host keys, logs, caches).

use super::Context;
use crate::config::image::Role;
use crate::host::exec::Cmd;
use crate::host::progress::StageProgress;
use anyhow::{bail, Context as _, Result};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

/// Units kiln enables in every image.
/// Units an appliance never needs, masked: each costs seconds of a TCG guest's boot (and CPU on
/// a Pi), and some expose debugging interfaces. Measured with `systemd-analyze blame` in the
/// minimal image (NOTES.md, session 10).
pub const MASKED_UNITS: &[&str] = &[
    "dev-hugepages.mount",                    // no huge-page users
    "sys-kernel-debug.mount",                 // debugfs: a debugging interface, not for an appliance
    "sys-kernel-tracing.mount",               // tracefs: likewise
    "sys-fs-fuse-connections.mount",          // no FUSE file systems
    "modprobe@fuse.service",                  // likewise
    "sys-kernel-config.mount",                // configfs: USB gadgets, iSCSI targets
    "modprobe@configfs.service",              // likewise
    "modprobe@drm.service",                   // no display stack (the console is serial or the firmware's)
    "systemd-network-generator.service",      // networkd configuration from ip= arguments: kiln ships its own
    "systemd-udev-load-credentials.service",  // udev rules passed as credentials: kiln passes none
    "systemd-journal-catalog-update.service", // message catalog index: explanations for journalctl -x only
    "kmod-static-nodes.service",              // its list is written at build time (`static_nodes`)
];

/// systemd generators an appliance never needs: each is a program run at every boot (and every
/// `daemon-reload`) before any unit starts. kiln mounts the root, /var and the ESP itself.
pub const MASKED_GENERATORS: &[&str] = &[
    "systemd-gpt-auto-generator",         // partitions found by GPT type: kiln names its own
    "systemd-hibernate-resume-generator", // no hibernation
    "systemd-tpm2-generator",             // no TPM2 units
    "systemd-system-update-generator",    // no offline updates (kiln-agent updates whole slots)
    "systemd-rc-local-generator",         // no /etc/rc.local
    "systemd-ssh-generator",              // sshd on vsock/AF_UNIX for VMs and containers: ssh.service serves
];

const ENABLED_UNITS: &[&str] = &[
    "systemd-networkd.service",
    "systemd-resolved.service",
    "systemd-timesyncd.service",
    "ssh.service",
    "kiln-ssh-hostkey.service",
    "kiln-health.service",
    "kiln-var-base.service",
    "kiln-provision.service",
    "kiln-agent-boot.service",
    "kiln-agent-commit.service",
];

pub fn customize(ctx: &Context, agent: &Path) -> Result<()> {
    let progress = StageProgress::start("customize", "configuration, users, read-only layout");
    let plan = ctx.plan;
    let tree = &ctx.tree;
    let t = &ctx.templates;
    let mut tctx = tera::Context::from_serialize(plan).context("plan as template context")?;
    let uuid_of =
        |role| plan.disk.partitions.iter().find(|p| p.role == role).map(|p| p.uuid.clone()).unwrap_or_default();
    // kiln's initramfs mounts /var itself (kiln-agent mount-data); Debian's needs the fstab line.
    let fstab_var = (plan.initramfs == crate::config::image::InitramfsKind::InitramfsTools)
        .then(|| plan.partition(Role::Data, None).uuid.clone());
    tctx.insert("fstab_var_uuid", &fstab_var);
    tctx.insert("esp_uuid", &uuid_of(Role::Esp));
    tctx.insert("autoboot_uuid", &uuid_of(Role::Autoboot));

    // Identity.
    write_file(&tree.join("etc/hostname"), format!("{}\n", plan.hostname).as_bytes(), 0o644)?;
    write_file(
        &tree.join("etc/hosts"),
        format!("127.0.0.1\tlocalhost\n127.0.1.1\t{h}\n::1\tlocalhost ip6-localhost ip6-loopback\n", h = plan.hostname)
            .as_bytes(),
        0o644,
    )?;
    set_timezone(tree, &plan.timezone)?;
    set_locale(tree, &plan.locale)?;
    add_image_identity(tree, plan)?;

    // Configuration files.
    write_file(&tree.join("etc/fstab"), t.render("rootfs/fstab.tera", &tctx)?.as_bytes(), 0o644)?;
    write_file(
        &tree.join("etc/ssh/sshd_config.d/50-kiln.conf"),
        t.render("rootfs/sshd.conf.tera", &tctx)?.as_bytes(),
        0o644,
    )?;
    write_file(
        &tree.join("etc/systemd/network/80-kiln-dhcp.network"),
        t.render("rootfs/dhcp.network", &tctx)?.as_bytes(),
        0o644,
    )?;
    write_file(
        &tree.join("usr/lib/systemd/system/kiln-ssh-hostkey.service"),
        t.render("rootfs/kiln-ssh-hostkey.service", &tctx)?.as_bytes(),
        0o644,
    )?;
    write_file(
        &tree.join("usr/lib/systemd/system/kiln-health.service"),
        t.render("rootfs/kiln-health.service.tera", &tctx)?.as_bytes(),
        0o644,
    )?;
    write_file(
        &tree.join("usr/lib/systemd/system/kiln-var-base.service"),
        t.render("rootfs/kiln-var-base.service", &tctx)?.as_bytes(),
        0o644,
    )?;
    write_file(
        &tree.join("usr/lib/kiln/health-check"),
        t.render("rootfs/health-check.tera", &tctx)?.as_bytes(),
        0o755,
    )?;
    write_health_commands(tree, &ctx.plan.health.commands)?;
    write_file(
        &tree.join("usr/lib/systemd/system/kiln-provision.service"),
        t.render("rootfs/kiln-provision.service", &tctx)?.as_bytes(),
        0o644,
    )?;
    symlink_force("../run/systemd/resolve/stub-resolv.conf", &tree.join("etc/resolv.conf"))?;
    install_agent(ctx, &tctx, agent)?;

    // Users: SSH keys only; root stays locked.
    create_users(ctx)?;

    // Units.
    let mut units: Vec<&str> = ENABLED_UNITS.to_vec();
    units.extend(["kiln-monitor.timer", "kiln-monitor-stop.service"]);
    if plan.update.is_some() {
        units.push("kiln-agent.timer");
    }
    if let Some(b) = &plan.backup {
        units.extend(["kiln-backup.timer", "kiln-backup-restore.service"]);
        if b.restore_drill.is_some() {
            units.push("kiln-backup-drill.timer");
        }
    }
    let enable = Cmd::new("chroot").arg(tree).arg("systemctl").arg("enable").args(&units);
    enable.run()?;
    // Not for an appliance: e2scrub needs LVM snapshots, and its reaper costs seconds at boot.
    let disable = Cmd::new("chroot").arg(tree).args([
        "systemctl",
        "disable",
        "--quiet",
        "e2scrub_reap.service",
        "e2scrub_all.timer",
    ]);
    if tree.join("usr/lib/systemd/system/e2scrub_reap.service").exists() {
        disable.run()?;
    }
    Cmd::new("chroot").arg(tree).args(["systemctl", "mask", "--quiet"]).args(MASKED_UNITS).run()?;
    write_static_nodes(tree)?;
    let generators = tree.join("etc/systemd/system-generators");
    std::fs::create_dir_all(&generators).with_context(|| format!("creating {}", generators.display()))?;
    for g in MASKED_GENERATORS {
        symlink_force("/dev/null", &generators.join(g))?;
    }

    // State lives on /var (the data partition); /home and /srv point there.
    make_var_factory(tree, plan.initramfs == crate::config::image::InitramfsKind::InitramfsTools)?;

    clean(tree)?;
    if plan.rpi.is_some() {
        // The firmware files live in the boot slots (copied out by the bootstrap), not in the root.
        remove_any(&tree.join("usr/lib/raspi-firmware"))?;
        std::fs::create_dir_all(tree.join("boot/autoboot")).context("creating /boot/autoboot")?;
    }
    progress.finish(&format!("{} users, hostname {}", plan.users.len(), plan.hostname));
    Ok(())
}

/// The device nodes whose opening loads a module (`/dev/net/tun`, `/dev/fuse`, ...), as
/// `kmod static-nodes --format=tmpfiles` lists them from the kernel's `modules.devname`.
/// kmod-static-nodes.service writes that list at every boot, first in the boot's critical chain
/// (about a second under TCG); the kernel is fixed per image, so kiln writes it at build time
/// and systemd-tmpfiles-setup-dev-early creates the nodes as before.
fn write_static_nodes(tree: &Path) -> Result<()> {
    let modules = tree.join("usr/lib/modules");
    let mut text =
        String::from("# Written by kiln from the kernel's modules.devname (kmod static-nodes, at build time).\n");
    let mut kernels: Vec<_> = std::fs::read_dir(&modules)
        .with_context(|| format!("reading {}", modules.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    kernels.sort();
    for k in kernels {
        let devname = k.join("modules.devname");
        let Ok(list) = std::fs::read_to_string(&devname) else { continue };
        text.push_str(&static_nodes_tmpfiles(&list).with_context(|| format!("reading {}", devname.display()))?);
    }
    write_file(&tree.join("usr/lib/tmpfiles.d/kiln-static-nodes.conf"), text.as_bytes(), 0o644)
}

/// `modules.devname` ("module devname c10:200" lines) as tmpfiles.d lines, in kmod's format.
fn static_nodes_tmpfiles(list: &str) -> Result<String> {
    let mut out = String::new();
    for (n, line) in list.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let f: Vec<&str> = line.split_whitespace().collect();
        let parsed = match f.as_slice() {
            [_module, devname, dev] => dev.split_once(':').and_then(|(t, min)| {
                let (kind, maj) = t.split_at(1);
                let ok = matches!(kind, "c" | "b")
                    && maj.parse::<u32>().is_ok()
                    && min.parse::<u32>().is_ok()
                    && !devname.contains("..")
                    && devname.chars().all(|c| c.is_ascii_alphanumeric() || "/-_.".contains(c));
                ok.then_some((*devname, kind, maj, min))
            }),
            _ => None,
        };
        let Some((devname, kind, maj, min)) = parsed else {
            bail!("line {}: expected \"module devname c|bMAJOR:MINOR\", found {line:?}", n + 1);
        };
        if let Some((dir, _)) = devname.rsplit_once('/') {
            out.push_str(&format!("d /dev/{dir} 0755 - - -\n"));
        }
        out.push_str(&format!("{kind}! /dev/{devname} 0600 - - - {maj}:{min}\n"));
    }
    Ok(out)
}

/// The on-device agent: its binary, `/usr/lib/kiln/device.json`, and its units (the timer
/// only when the profile has `[update]`).
fn install_agent(ctx: &Context, tctx: &tera::Context, bin: &Path) -> Result<()> {
    let (tree, plan, t) = (&ctx.tree, ctx.plan, &ctx.templates);
    let dest = tree.join("usr/bin/kiln-agent");
    // Debug builds carry tens of MiB of debug info the device does not need (and would download
    // with every update); a foreign binary the host's objcopy cannot read goes in as it is.
    let stripped = Cmd::new("objcopy").arg("--strip-debug").arg(bin).arg(&dest).run();
    if stripped.is_err() {
        let data = std::fs::read(bin).with_context(|| format!("reading {}", bin.display()))?;
        write_file(&dest, &data, 0o755)?;
    }
    std::fs::set_permissions(&dest, std::fs::Permissions::from_mode(0o755))
        .with_context(|| format!("chmod {}", dest.display()))?;
    let device =
        serde_json::to_vec_pretty(&crate::config::device::device_config(plan)?).context("encoding device.json")?;
    write_file(&tree.join(kiln_device::DEVICE_CONFIG.trim_start_matches('/')), &device, 0o644)?;
    for unit in [
        "kiln-agent-boot.service",
        "kiln-agent-commit.service",
        "kiln-agent-rollback.service",
        "kiln-agent.service",
        "kiln-monitor.service",
        "kiln-monitor-stop.service",
    ] {
        write_file(
            &tree.join("usr/lib/systemd/system").join(unit),
            t.render(&format!("rootfs/{unit}"), tctx)?.as_bytes(),
            0o644,
        )?;
    }
    let mut c = tctx.clone();
    c.insert("monitor", &plan.monitor);
    c.insert("first_look_secs", &plan.monitor.interval_secs.min(60));
    write_file(
        &tree.join("usr/lib/systemd/system/kiln-monitor.timer"),
        t.render("rootfs/kiln-monitor.timer.tera", &c)?.as_bytes(),
        0o644,
    )?;
    if let Some(b) = &plan.backup {
        install_backup(ctx, tctx, b)?;
    }
    if plan.wifi.is_some() {
        install_wifi(ctx, tctx)?;
    }
    if let Some(u) = &plan.update {
        let mut c = tctx.clone();
        c.insert("first_check_secs", &u.interval_secs.min(300));
        write_file(
            &tree.join("usr/lib/systemd/system/kiln-agent.timer"),
            t.render("rootfs/kiln-agent.timer.tera", &c)?.as_bytes(),
            0o644,
        )?;
    }
    Ok(())
}

/// Wi-Fi: wpa_supplicant and the regulatory database come from Debian (the plan added them);
/// kiln-agent runs the supplicant per wireless interface with the provisioned networks. Debian's
/// own supplicant units stay unused (they would read configuration from the read-only /etc).
fn install_wifi(ctx: &Context, tctx: &tera::Context) -> Result<()> {
    let (tree, t) = (&ctx.tree, &ctx.templates);
    if !tree.join("usr/sbin/wpa_supplicant").exists() {
        bail!("[network] wifi needs wpa_supplicant in the image, and /usr/sbin/wpa_supplicant is missing from the tree (is the wpasupplicant package installed?)");
    }
    for (template, dest) in [
        ("kiln-wifi@.service", "usr/lib/systemd/system/kiln-wifi@.service"),
        ("kiln-wifi.rules", "usr/lib/udev/rules.d/90-kiln-wifi.rules"),
        ("wifi.network", "etc/systemd/network/80-kiln-wifi.network"),
    ] {
        write_file(&tree.join(dest), t.render(&format!("rootfs/{template}"), tctx)?.as_bytes(), 0o644)?;
    }
    // Debian enables wpa_supplicant.service (D-Bus, unconfigured): not needed, not started.
    if tree.join("usr/lib/systemd/system/wpa_supplicant.service").exists() {
        Cmd::new("chroot").arg(tree).args(["systemctl", "disable", "--quiet", "wpa_supplicant.service"]).run()?;
    }
    Ok(())
}

/// Backups: restic comes from Debian (the plan added it); the agent runs it from these units.
/// The calendar expressions are checked by the image's own systemd, which will run them.
fn install_backup(ctx: &Context, tctx: &tera::Context, b: &crate::config::plan::BackupPlan) -> Result<()> {
    let (tree, t) = (&ctx.tree, &ctx.templates);
    if !tree.join("usr/bin/restic").exists() {
        bail!("[backup] needs restic in the image, and /usr/bin/restic is missing from the tree (is the restic package installed?)");
    }
    let mut calendars = vec![("backup.schedule", b.schedule.as_str())];
    calendars.extend(b.restore_drill.as_deref().map(|d| ("backup.restore_drill", d)));
    for (key, expr) in calendars {
        if let Err(e) =
            Cmd::new("chroot").arg(tree).args(["systemd-analyze", "calendar", "--iterations=1", expr]).output()
        {
            let why = match e {
                crate::host::exec::ExecError::Failed { stderr_tail, .. } => stderr_tail.trim().to_string(),
                other => return Err(other.into()),
            };
            bail!(
                "{}: {key}: {expr:?} is not a systemd calendar expression ({why}); examples: \"daily\", \"weekly\", \"Mon..Fri 02:30\", \"*-*-01 04:00\" (see man systemd.time)",
                ctx.plan.profile_chain.first().map(String::as_str).unwrap_or("profile")
            );
        }
    }
    for unit in ["kiln-backup.service", "kiln-backup-drill.service"] {
        write_file(
            &tree.join("usr/lib/systemd/system").join(unit),
            t.render(&format!("rootfs/{unit}"), tctx)?.as_bytes(),
            0o644,
        )?;
    }
    for unit in ["kiln-backup.timer", "kiln-backup-drill.timer", "kiln-backup-restore.service"] {
        write_file(
            &tree.join("usr/lib/systemd/system").join(unit),
            t.render(&format!("rootfs/{unit}.tera"), tctx)?.as_bytes(),
            0o644,
        )?;
    }
    Ok(())
}

/// `systemd-escape --path`: the unit name of a path (`/dev/disk/by-partuuid/ab-1` ->
/// `dev-disk-by\x2dpartuuid-ab\x2d1`).
pub fn systemd_escape_path(path: &str) -> String {
    let trimmed = path.trim_matches('/');
    let mut out = String::new();
    for (i, c) in trimmed.chars().enumerate() {
        match c {
            '/' => out.push('-'),
            '.' if i == 0 => out.push_str("\\x2e"),
            c if c.is_ascii_alphanumeric() || c == ':' || c == '_' || c == '.' => out.push(c),
            c => {
                let mut buf = [0u8; 4];
                for b in c.encode_utf8(&mut buf).bytes() {
                    out.push_str(&format!("\\x{b:02x}"));
                }
            }
        }
    }
    out
}

/// Each of the profile's `health.commands` is a shell script of its own
/// (`/usr/lib/kiln/health.d/<n>`), never pasted into the health check: a `#`, a `;` or an
/// unbalanced quote stays inside its command. A command that is not valid `sh` stops the build
/// here (`sh -n`), not every trial boot on the devices.
fn write_health_commands(tree: &Path, commands: &[String]) -> Result<()> {
    let dir = tree.join("usr/lib/kiln/health.d");
    for (i, cmd) in commands.iter().enumerate() {
        let path = dir.join((i + 1).to_string());
        let script = format!(
            "#!/bin/sh\n# Written by kiln: health.commands[{i}] of the profile; exit 0 means healthy.\n{cmd}\n"
        );
        write_file(&path, script.as_bytes(), 0o755)?;
        if let Err(e) = Cmd::new("sh").arg("-n").arg(&path).output() {
            bail!("health.commands[{i}]: not a valid sh command: {e:#}");
        }
    }
    Ok(())
}

/// Writes a file (creating parent directories) with the given mode.
pub fn write_file(path: &Path, data: &[u8], mode: u32) -> Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    std::fs::write(path, data).with_context(|| format!("writing {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .with_context(|| format!("setting the mode of {}", path.display()))?;
    Ok(())
}

fn symlink_force(target: &str, link: &Path) -> Result<()> {
    if link.symlink_metadata().is_ok() {
        if link.is_dir() && !link.symlink_metadata().map(|m| m.file_type().is_symlink()).unwrap_or(false) {
            std::fs::remove_dir_all(link).with_context(|| format!("removing {}", link.display()))?;
        } else {
            std::fs::remove_file(link).with_context(|| format!("removing {}", link.display()))?;
        }
    }
    std::os::unix::fs::symlink(target, link).with_context(|| format!("linking {} -> {target}", link.display()))
}

fn set_timezone(tree: &Path, tz: &str) -> Result<()> {
    let zone = tree.join("usr/share/zoneinfo").join(tz);
    let localtime = tree.join("etc/localtime");
    if tz == "Etc/UTC" || tz == "UTC" {
        // No tzdata needed: a missing /etc/localtime means UTC.
        let _ = std::fs::remove_file(&localtime);
        write_file(&tree.join("etc/timezone"), b"Etc/UTC\n", 0o644)?;
        return Ok(());
    }
    if !zone.is_file() {
        bail!("system.timezone: no time zone {tz:?} in the image (looked for /usr/share/zoneinfo/{tz}; add \"tzdata\" to system.packages or fix the name)");
    }
    symlink_force(&format!("/usr/share/zoneinfo/{tz}"), &localtime)?;
    write_file(&tree.join("etc/timezone"), format!("{tz}\n").as_bytes(), 0o644)
}

fn set_locale(tree: &Path, locale: &str) -> Result<()> {
    write_file(&tree.join("etc/default/locale"), format!("LANG={locale}\n").as_bytes(), 0o644)?;
    write_file(&tree.join("etc/locale.conf"), format!("LANG={locale}\n").as_bytes(), 0o644)?;
    if locale != "C.UTF-8" {
        write_file(&tree.join("etc/locale.gen"), format!("{locale} UTF-8\n").as_bytes(), 0o644)?;
        Cmd::new("chroot").arg(tree).arg("locale-gen").run().context("system.locale: generating the locale")?;
    }
    Ok(())
}

/// Adds IMAGE_ID/IMAGE_VERSION to os-release. systemd-boot sorts UKIs by IMAGE_ID, then by
/// IMAGE_VERSION (newest first): IMAGE_ID is the same for every release for one kind of
/// hardware (`kiln-<image>`), so that the newest version boots first whatever the profile's
/// name, and the updater's new UKI is the one tried.
fn add_image_identity(tree: &Path, plan: &crate::config::plan::Plan) -> Result<()> {
    let path = tree.join("usr/lib/os-release");
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let mut out: String = text
        .lines()
        .filter(|l| !l.starts_with("IMAGE_ID=") && !l.starts_with("IMAGE_VERSION=") && !l.starts_with("PRETTY_NAME="))
        .map(|l| format!("{l}\n"))
        .collect();
    let pretty = text
        .lines()
        .find_map(|l| l.strip_prefix("PRETTY_NAME="))
        .map(|s| s.trim_matches('"').to_string())
        .unwrap_or_else(|| "Debian".into());
    out.push_str(&format!("PRETTY_NAME=\"kiln {} {} ({pretty})\"\n", plan.profile, plan.version));
    out.push_str(&format!("IMAGE_ID=kiln-{}\nIMAGE_VERSION={}\n", plan.image, plan.version));
    write_file(&path, out.as_bytes(), 0o644)
}

fn create_users(ctx: &Context) -> Result<()> {
    let tree = &ctx.tree;
    // Root: locked, no password.
    Cmd::new("chroot").arg(tree).args(["usermod", "--lock", "root"]).run()?;
    // Only members of this group may log in over SSH (sshd's AllowGroups): the profile's users.
    Cmd::new("chroot").arg(tree).args(["groupadd", "--system", "kiln-ssh"]).run()?;
    let mut sudo = false;
    let mut tmpfiles = String::from("# Written by kiln: home directories on the data partition.\n");
    for u in &ctx.plan.users {
        let mut cmd = Cmd::new("chroot")
            .arg(tree)
            .args(["useradd", "--no-create-home", "--user-group", "--home-dir"])
            .arg(format!("/home/{}", u.name))
            .arg("--shell")
            .arg(&u.shell);
        let groups: Vec<&str> = u.groups.iter().map(String::as_str).chain(["kiln-ssh"]).collect();
        cmd = cmd.arg("--groups").arg(groups.join(","));
        cmd.arg(&u.name).run().with_context(|| format!("users.{}: creating the user", u.name))?;
        // "*": no password can match, but the account is not locked (SSH keys work).
        Cmd::new("chroot").arg(tree).args(["usermod", "--password", "*"]).arg(&u.name).run()?;
        let keys: String = u.ssh_keys.iter().map(|k| format!("{k}\n")).collect();
        write_file(&tree.join("etc/ssh/authorized_keys").join(&u.name), keys.as_bytes(), 0o644)?;
        tmpfiles.push_str(&format!("d /var/home/{0} 0700 {0} {0} -\n", u.name));
        sudo |= u.groups.iter().any(|g| g == "sudo");
    }
    if sudo {
        write_file(&tree.join("etc/sudoers.d/kiln"), b"# Written by kiln: accounts have no passwords, so sudo asks for none.\n%sudo ALL=(ALL:ALL) NOPASSWD: ALL\n", 0o440)?;
    }
    write_file(&tree.join("usr/lib/tmpfiles.d/kiln-home.conf"), tmpfiles.as_bytes(), 0o644)
}

/// Moves the installed /var into /usr/share/factory/var, which kiln-agent mount-data delivers
/// onto the data partition at boot (agent/src/factory.rs; with Debian's initramfs-tools,
/// `copy_rules`: systemd-tmpfiles copies each top-level directory that is missing). /home and
/// /srv become links into /var.
fn make_var_factory(tree: &Path, copy_rules: bool) -> Result<()> {
    let var = tree.join("var");
    let factory = tree.join("usr/share/factory/var");
    if factory.exists() {
        std::fs::remove_dir_all(&factory).with_context(|| format!("removing {}", factory.display()))?;
    }
    std::fs::create_dir_all(&factory).with_context(|| format!("creating {}", factory.display()))?;
    let mut rules = String::from(
        "# Written by kiln: /var is the data partition; kiln-agent mount-data brings the image's factory copy in.\n\
         d /var/home 0755 root root -\n\
         d /var/srv 0755 root root -\n\
         d /var/tmp 1777 root root -\n\
         d /var/lib/kiln 0755 root root -\n\
         d /var/log/journal 2755 root systemd-journal -\n\
         L /var/run - - - - /run\n\
         L /var/lock - - - - /run/lock\n",
    );
    let mut entries: Vec<_> = std::fs::read_dir(&var)
        .with_context(|| format!("reading {}", var.display()))?
        .collect::<std::io::Result<_>>()?;
    entries.sort_by_key(|e| e.file_name());
    for e in entries {
        let name = e.file_name().to_string_lossy().into_owned();
        let from = e.path();
        if matches!(name.as_str(), "run" | "lock" | "tmp") {
            remove_any(&from)?;
            continue;
        }

        std::fs::rename(&from, factory.join(&name))
            .with_context(|| format!("moving {} into the factory copy", from.display()))?;
        if copy_rules {
            rules.push_str(&format!("C /var/{name} - - - - -\n"));
        }
    }
    write_file(&tree.join("usr/lib/tmpfiles.d/00-kiln-var.conf"), rules.as_bytes(), 0o644)?;
    // Under the mount point, for services that set up a private /var/tmp before /var is mounted.
    let tmp = var.join("tmp");
    std::fs::create_dir(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o1777))
        .with_context(|| format!("setting the mode of {}", tmp.display()))?;
    for dir in ["home", "srv"] {
        symlink_force(&format!("var/{dir}"), &tree.join(dir))?;
    }
    // systemd's home.conf would make /home and /srv subvolumes/directories; they are links here.
    write_file(
        &tree.join("etc/tmpfiles.d/home.conf"),
        b"# Written by kiln: /home and /srv are links into /var (see 00-kiln-var.conf).\n",
        0o644,
    )?;
    std::fs::create_dir_all(tree.join("efi")).context("creating /efi")?;
    Ok(())
}

pub(crate) fn remove_any(p: &Path) -> Result<()> {
    let meta = match p.symlink_metadata() {
        Ok(m) => m,
        Err(_) => return Ok(()),
    };
    if meta.is_dir() { std::fs::remove_dir_all(p) } else { std::fs::remove_file(p) }
        .with_context(|| format!("removing {}", p.display()))
}

/// Removes what must not be shared by every device or survive into the image.
fn clean(tree: &Path) -> Result<()> {
    // An empty machine-id: systemd treats this as a first boot.
    write_file(&tree.join("etc/machine-id"), b"", 0o444)?;
    let factory = tree.join("usr/share/factory/var");
    for rel in ["lib/dbus/machine-id", "cache/ldconfig/aux-cache", "lib/systemd/random-seed"] {
        remove_any(&factory.join(rel))?;
    }
    for dir in ["cache/apt", "lib/apt/lists", "log", "cache/debconf"] {
        let d = factory.join(dir);
        if d.is_dir() {
            for e in std::fs::read_dir(&d).with_context(|| format!("reading {}", d.display()))? {
                let p = e?.path();
                if p.file_name().map(|n| n == "partial" || n == "lock").unwrap_or(false) {
                    continue;
                }
                // Keep templates.dat etc. of debconf; drop its caches' old copies.
                if dir == "cache/debconf" && !p.to_string_lossy().ends_with("-old") {
                    continue;
                }
                remove_any(&p)?;
            }
        }
    }
    // Host keys are made on the device at first boot (kiln-ssh-hostkey.service).
    if let Ok(rd) = std::fs::read_dir(tree.join("etc/ssh")) {
        for e in rd.flatten() {
            if e.file_name().to_string_lossy().starts_with("ssh_host_") {
                remove_any(&e.path())?;
            }
        }
    }
    for f in ["etc/.pwd.lock", "etc/passwd-", "etc/group-", "etc/shadow-", "etc/gshadow-", "etc/subuid-", "etc/subgid-"]
    {
        remove_any(&tree.join(f))?;
    }
    for dir in ["tmp", "boot"] {
        let d = tree.join(dir);
        if d.is_dir() {
            for e in std::fs::read_dir(&d).with_context(|| format!("reading {}", d.display()))? {
                remove_any(&e?.path())?;
            }
        }
    }
    // Python bytecode is made at install time with the build's clock; drop it.
    remove_pycache(&tree.join("usr"))?;
    Ok(())
}

fn remove_pycache(dir: &Path) -> Result<()> {
    let Ok(rd) = std::fs::read_dir(dir) else { return Ok(()) };
    for e in rd.flatten() {
        let p = e.path();
        let ft = e.file_type().with_context(|| format!("reading {}", p.display()))?;
        if ft.is_dir() {
            if e.file_name() == "__pycache__" {
                remove_any(&p)?;
            } else {
                remove_pycache(&p)?;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::write_health_commands;

    #[test]
    fn health_commands_are_scripts_of_their_own_checked_by_sh() {
        // Issue 16 item 14: pasted into the health check, a "#" or an unbalanced quote broke
        // every check after it, and so every trial boot.
        let tree = tempfile::tempdir().unwrap();
        let ok = ["test -e /etc/os-release # a comment".to_string(), "echo 'a; b' | grep -q b".to_string()];
        write_health_commands(tree.path(), &ok).unwrap();
        let first = std::fs::read_to_string(tree.path().join("usr/lib/kiln/health.d/1")).unwrap();
        assert!(first.starts_with("#!/bin/sh\n") && first.ends_with("\ntest -e /etc/os-release # a comment\n"));
        let out = std::process::Command::new(tree.path().join("usr/lib/kiln/health.d/2")).status().unwrap();
        assert!(out.success());
        let e = write_health_commands(tree.path(), &["true".into(), "echo 'unbalanced".into()]).unwrap_err();
        assert!(format!("{e:#}").starts_with("health.commands[1]: not a valid sh command"), "{e:#}");
    }

    #[test]
    fn escapes_like_systemd_escape() {
        assert_eq!(
            super::systemd_escape_path("/dev/disk/by-partuuid/d6873725-07"),
            "dev-disk-by\\x2dpartuuid-d6873725\\x2d07"
        );
        let host =
            crate::host::exec::Cmd::new("systemd-escape").args(["--path", "/dev/disk/by-partuuid/0a1b-c.d"]).read();
        if let Ok(h) = host {
            assert_eq!(super::systemd_escape_path("/dev/disk/by-partuuid/0a1b-c.d"), h.trim());
        }
    }

    #[test]
    fn static_nodes_are_written_as_kmod_writes_them() {
        // A trixie arm64 kernel's modules.devname (abridged) and what `kmod static-nodes
        // --format=tmpfiles` makes of it.
        let list = "# Device nodes to trigger on-demand module loading.\ncuse cuse c10:203\ntun net/tun c10:200\nsnd_timer snd/timer c116:33\nloop loop b7:0\n";
        assert_eq!(
            super::static_nodes_tmpfiles(list).unwrap(),
            "c! /dev/cuse 0600 - - - 10:203\nd /dev/net 0755 - - -\nc! /dev/net/tun 0600 - - - 10:200\nd /dev/snd 0755 - - -\nc! /dev/snd/timer 0600 - - - 116:33\nb! /dev/loop 0600 - - - 7:0\n"
        );
        for bad in ["tun net/tun", "tun net/tun x10:200", "tun ../etc/x c10:200", "tun net/tun c10:2x", "tun a b c10:1"]
        {
            let e = super::static_nodes_tmpfiles(bad).unwrap_err().to_string();
            assert!(e.starts_with("line 1: expected"), "{bad}: {e}");
        }
    }
}

#[cfg(test)]
mod fstab_tests {
    use crate::config::plan::{Overrides, Plan};
    use crate::config::profile::{load, Source};

    fn fstab(hardening: &str) -> String {
        fstab_with(hardening, None)
    }

    fn fstab_with(hardening: &str, var_uuid: Option<&str>) -> String {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("p.toml");
        std::fs::write(&file, format!("extends = \"minimal\"\n[hardening]\n{hardening}")).unwrap();
        let img = crate::config::image::load("pc-uefi", std::path::Path::new("/nonexistent")).unwrap();
        let m = crate::debian::mirror::Mirror::from_uri("http://mirror.test/debian");
        let plan =
            Plan::resolve(&load(Source::File(file)).unwrap(), &img, Some(&m), &Overrides::default(), 1_700_000_000)
                .unwrap();
        let mut tctx = tera::Context::from_serialize(&plan).unwrap();
        tctx.insert("fstab_var_uuid", &var_uuid);
        crate::stages::templates::Templates::load().unwrap().render("rootfs/fstab.tera", &tctx).unwrap()
    }

    #[test]
    fn var_is_in_fstab_only_when_debians_initramfs_boots_the_image() {
        let kiln = fstab_with("", None);
        assert!(!kiln.lines().any(|l| !l.starts_with('#') && l.contains(" /var ")), "{kiln}");
        let tools = fstab_with("", Some("0fc63daf-0000-4000-8000-000000000001"));
        assert!(tools.contains("PARTUUID=0fc63daf-0000-4000-8000-000000000001  /var  ext4  "), "{tools}");
    }

    #[test]
    fn fstab_hides_processes_and_mounts_writable_places_noexec_unless_switched_off() {
        let on = fstab("");
        assert!(on.contains("proc  /proc  proc  nosuid,nodev,noexec,hidepid=invisible  0  0\n"), "{on}");
        for m in [
            "/tmp  tmpfs  mode=1777,strictatime,nosuid,nodev,noexec,",
            "/dev/shm  tmpfs  nosuid,nodev,noexec ",
            "/dev  devtmpfs  nosuid,noexec,",
        ] {
            assert!(on.contains(m), "{m} in {on}");
        }
        let off = fstab("hide_processes = false\nnoexec_tmp = false\n");
        assert!(!off.contains("hidepid") && !off.contains("noexec"), "{off}");
    }
}
