//! The plan: a profile and an image resolved into one frozen description of the build.
//!
//! `Plan::resolve` does no I/O: everything it needs (the loaded profile, the image definition,
//! the mirror, the clock) is handed in. Stages read the plan and never change it.

use crate::config::image::{Arch, LoadedImage, PartitionDef, PartitionTable, Qemu, Role, RpiDef, Slot};
use crate::config::profile::{LoadedProfile, ProfileError};
use crate::debian::mirror::Mirror;
use crate::units::{Bytes, Sha256, Uuid, MIB};
use kiln_device::Quiesce;
use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet};

/// Packages kiln's own pipeline needs in every image, whatever the profile says.
pub const REQUIRED_PACKAGES: &[&str] = &[
    "systemd",
    "systemd-sysv",
    "udev",
    "dbus",
    "initramfs-tools",
    "zstd",
    "cryptsetup-bin", // veritysetup, copied into the initramfs
    "e2fsprogs",      // the data partition is formatted at first boot
    "iproute2",
];

/// What the user passed on the command line that overrides the profile.
#[derive(Default, Debug, Clone)]
pub struct Overrides {
    pub mirror: Option<String>,
    pub version: Option<String>,
    /// From a lock file: wins over the profile and the clock.
    pub source_date_epoch: Option<u64>,
}

#[derive(Serialize, Debug, Clone, PartialEq)]
pub struct Plan {
    /// "<profile>-<image>": the output directory's name.
    pub output_name: String,
    pub profile: String,
    /// The profile files merged, child first.
    pub profile_chain: Vec<String>,
    pub image: String,
    pub image_source: String,
    pub arch: Arch,
    pub bootloader: crate::config::image::Bootloader,
    pub suite: String,
    /// Archive components (`main`, and e.g. `non-free-firmware` for the Pi firmware).
    pub components: Vec<String>,
    pub mirror: Mirror,
    pub sources: Vec<String>,
    /// Everything asked of apt, sorted.
    pub packages: Vec<String>,
    pub hostname: String,
    pub timezone: String,
    pub locale: String,
    pub users: Vec<UserPlan>,
    pub kernel_cmdline: Vec<String>,
    pub initramfs_modules: Vec<String>,
    pub initramfs: crate::config::image::InitramfsKind,
    pub version: String,
    pub source_date_epoch: u64,
    /// The profile names `[release] source_date_epoch`: a new lock takes it rather than
    /// keeping the previous lock's.
    pub epoch_from_profile: bool,
    pub disk: DiskPlan,
    pub health: HealthPlan,
    pub qemu: Qemu,
    /// Raspberry Pi boot files (rpi-firmware images).
    pub rpi: Option<RpiDef>,
    /// Where the device's agent looks for updates (None: no `[update]` in the profile).
    pub update: Option<kiln_device::UpdateConfig>,
    /// The profile's services, sorted by name.
    pub services: Vec<crate::config::services::ServicePlan>,
    pub hardening: HardeningPlan,
    /// Backups (None: no `[backup]` in the profile).
    pub backup: Option<BackupPlan>,
    /// Wi-Fi (None: the profile does not turn it on).
    pub wifi: Option<kiln_device::WifiConfig>,
    /// What the device watches and where it reports (defaults without `[monitor]`).
    pub monitor: kiln_device::MonitorConfig,
    /// Hash of every input: seeds the UUIDs that are not derived from content.
    pub seed: String,
}

#[derive(Serialize, Debug, Clone, PartialEq)]
pub struct UserPlan {
    pub name: String,
    pub ssh_keys: Vec<String>,
    pub groups: Vec<String>,
    pub shell: String,
}

#[derive(Serialize, Debug, Clone, PartialEq)]
pub struct HealthPlan {
    pub units: Vec<String>,
    pub commands: Vec<String>,
    pub timeout_secs: u32,
}

/// The system-wide hardening, defaults filled in.
#[derive(Serialize, Debug, Clone, PartialEq)]
pub struct HardeningPlan {
    pub firewall: bool,
    /// Inbound ports the firewall opens besides SSH, with the service that declared each.
    pub open_ports: Vec<OpenPort>,
    pub exposure_budget: f64,
    pub sysctl: BTreeMap<String, String>,
    pub disable_modules: Vec<String>,
    pub setuid_allow: Vec<String>,
    pub allow_compilers: bool,
    /// RuntimeWatchdogSec (None: off).
    pub watchdog_secs: Option<u64>,
    pub journal_max_use_mib: u64,
    /// auditd with kiln's rules (`rootfs/audit.rules.tera`).
    pub audit: bool,
    pub pam_tmpdir: bool,
    /// /proc mounted hidepid=invisible.
    pub hide_processes: bool,
    /// /tmp, /dev/shm and /dev mounted noexec.
    pub noexec_tmp: bool,
}

/// `[backup]` resolved: what the agent gets (`device.json`) and when its timers fire.
#[derive(Serialize, Debug, Clone, PartialEq)]
pub struct BackupPlan {
    pub device: kiln_device::BackupConfig,
    /// systemd calendar expressions.
    pub schedule: String,
    /// None: no restore drills.
    pub restore_drill: Option<String>,
}

#[derive(Serialize, Debug, Clone, PartialEq)]
pub struct OpenPort {
    pub port: u16,
    pub proto: String,
    pub service: String,
}

/// The partition table with every offset decided.
#[derive(Serialize, Debug, Clone, PartialEq)]
pub struct DiskPlan {
    pub table: PartitionTable,
    pub size: Bytes,
    /// GPT: the disk GUID. MBR: the 32-bit disk identifier as 8 hex digits.
    pub disk_guid: String,
    pub partitions: Vec<PartitionPlan>,
}

#[derive(Serialize, Debug, Clone, PartialEq)]
pub struct PartitionPlan {
    pub name: String,
    pub role: Role,
    pub slot: Option<Slot>,
    /// The Linux partition number (MBR: 1-3 primary, 5.. logical).
    pub number: u32,
    pub offset: Bytes,
    pub size: Bytes,
    /// GPT: the partition's GUID; for the root slot written at build time it is replaced by the
    /// first 128 bits of the root hash once that is known (see `stages::disk`).
    /// MBR: the PARTUUID Linux shows (`<disk id>-<number>`), fixed by the layout.
    pub uuid: String,
}

/// Where the first partition starts, and the room kept at the end for the backup GPT.
pub const ALIGN: u64 = MIB;

/// `[backup]` with its defaults filled in (values were checked when the file was read). The
/// default paths are every service's state directory (unless its `backup = "skip"`), /home and
/// /srv; the services whose state is inside the paths are quiesced as their entry says.
fn resolve_backup(
    file: &str,
    b: &crate::config::profile::Backup,
    services: &[crate::config::services::ServicePlan],
) -> Result<BackupPlan, ProfileError> {
    let err = |k: &str, m: &str| ProfileError::new(file, Some(&format!("backup.{k}")), m.to_string());
    let repository = b.repository.clone().ok_or_else(|| {
        err("repository", "required: the restic repository devices back up to, such as \"rest:https://backup.example.org/home\" (append-only recommended)")
    })?;
    let state: Vec<(&crate::config::services::ServicePlan, String)> =
        services.iter().filter(|s| s.backup != Quiesce::Skip).filter_map(|s| s.state_path().map(|p| (s, p))).collect();
    let paths: Vec<String> = match &b.paths {
        Some(list) if !list.is_empty() => {
            let mut out: Vec<String> = Vec::new();
            for (i, p) in list.iter().enumerate() {
                let real = crate::config::profile::backup_path(p).map_err(|m| err(&format!("paths[{i}]"), &m))?;
                if !out.contains(&real) {
                    out.push(real);
                }
            }
            out
        }
        _ => state.iter().map(|(_, p)| p.clone()).chain(["/var/home".to_string(), "/var/srv".to_string()]).collect(),
    };
    let inside =
        |p: &str| paths.iter().any(|q| p == q || p.starts_with(&format!("{q}/")) || q.starts_with(&format!("{p}/")));
    let backup_services = state
        .iter()
        .filter(|(_, p)| inside(p))
        .map(|(s, p)| kiln_device::BackupService { unit: s.unit.clone(), quiesce: s.backup, path: p.clone() })
        .collect();
    let keep = match &b.keep {
        Some(k) => k.iter().map(|(k, v)| (k.clone(), *v as u32)).collect(),
        None => [("daily", 7), ("weekly", 4), ("monthly", 12)].into_iter().map(|(k, v)| (k.to_string(), v)).collect(),
    };
    let secs = |d: &Option<String>, default: u64| {
        d.as_deref().and_then(|d| humantime::parse_duration(d).ok()).map(|d| d.as_secs()).unwrap_or(default)
    };
    let drill = b.restore_drill.clone().unwrap_or_else(|| "monthly".into());
    Ok(BackupPlan {
        device: kiln_device::BackupConfig {
            repository,
            paths,
            exclude: b.exclude.clone().unwrap_or_default(),
            keep,
            prune: b.prune.unwrap_or(false),
            check_subset: b.check_subset.clone().unwrap_or_else(|| "10%".into()),
            stale_after_secs: secs(&b.alert_after, 2 * 86400),
            // Checked against `BeforeUpdate::NAMES` when the profile was loaded.
            before_update: b
                .before_update
                .as_deref()
                .map(str::parse)
                .transpose()
                .map_err(|e: String| err("before_update", &e))?
                .unwrap_or_default(),
            self_restore: b.self_restore.unwrap_or(true),
            retry_secs: secs(&b.retry, 300),
            services: backup_services,
            alert_url: b.alert_url.clone(),
        },
        schedule: b.schedule.clone().unwrap_or_else(|| "daily".into()),
        restore_drill: (drill != "off").then_some(drill),
    })
}

/// `[monitor]` with its defaults filled in (values were checked when the file was read).
fn resolve_monitor(m: Option<&crate::config::profile::Monitor>) -> kiln_device::MonitorConfig {
    let d = kiln_device::MonitorConfig::default();
    let Some(m) = m else { return d };
    let secs = |v: &Option<String>, default: u64| {
        v.as_deref().and_then(|v| humantime::parse_duration(v).ok()).map(|v| v.as_secs()).unwrap_or(default)
    };
    let num = |v: Option<i64>, default: u32| v.map(|v| v as u32).unwrap_or(default);
    let pct = |v: Option<i64>, default: u8| v.map(|v| v as u8).unwrap_or(default);
    kiln_device::MonitorConfig {
        interval_secs: secs(&m.interval, d.interval_secs),
        disk_warn: pct(m.disk_warn, d.disk_warn),
        disk_alert: pct(m.disk_alert, d.disk_alert),
        inodes_warn: pct(m.inodes_warn, d.inodes_warn),
        inodes_alert: pct(m.inodes_alert, d.inodes_alert),
        restarts: num(m.restarts, d.restarts),
        cert_days: num(m.cert_days, d.cert_days),
        update_stale_secs: secs(&m.update_stale, d.update_stale_secs),
        failed_logins: num(m.failed_logins, d.failed_logins),
        clock_grace_secs: secs(&m.clock_grace, d.clock_grace_secs),
        history: num(m.history, d.history),
        push: m.push.clone(),
        alert_url: m.alert_url.clone(),
        heartbeat_url: m.heartbeat_url.clone(),
    }
}

/// `[update]` with its defaults filled in (values were checked when the file was read).
fn resolve_update(file: &str, u: &crate::config::profile::Update) -> Result<kiln_device::UpdateConfig, ProfileError> {
    let err = |key: &str, msg: &str| ProfileError::new(file, Some(key), msg);
    let feed = u.feed.clone().ok_or_else(|| {
        err("update.feed", "required: the feed URL devices follow, such as \"https://updates.example.org/stable.atom\"")
    })?;
    let metadata = match &u.metadata {
        Some(m) => m.clone(),
        None => {
            let m = kiln_feed::metadata_url(&feed);
            if m == feed {
                return Err(err(
                    "update.metadata",
                    "required when update.feed does not end in .atom or .rss (the signed .json next to it)",
                ));
            }
            m
        }
    };
    let stem = metadata.rsplit('/').next().unwrap_or("").trim_end_matches(".json").to_string();
    let channel = u.channel.clone().unwrap_or(if stem.is_empty() { "stable".into() } else { stem });
    let key = u.public_key.clone().ok_or_else(|| {
        err("update.public_key", "required: the release key's public half (`kiln keygen`), which devices trust")
    })?;
    let secs = |d: &Option<String>, default: u64| {
        d.as_deref().and_then(|d| humantime::parse_duration(d).ok()).map(|d| d.as_secs()).unwrap_or(default)
    };
    Ok(kiln_device::UpdateConfig {
        feed,
        metadata,
        channel,
        public_keys: vec![key.trim_start_matches("kiln-ed25519:").to_string()],
        window: u.window.clone(),
        interval_secs: secs(&u.interval, 6 * 3600).max(1),
        jitter_secs: secs(&u.jitter, 30 * 60),
        tries: u.tries.unwrap_or(3),
    })
}

impl Plan {
    pub fn resolve(
        profile: &LoadedProfile,
        image: &LoadedImage,
        host_mirror: Option<&Mirror>,
        overrides: &Overrides,
        now_epoch: u64,
    ) -> Result<Plan, ProfileError> {
        let p = &profile.merged;
        let file = profile.chain.first().map(|s| s.to_string()).unwrap_or_default();
        let sys = p.system.clone().unwrap_or_default();
        let def = &image.def;

        let suite = sys.suite.clone().unwrap_or_else(|| "trixie".into());
        let mirror = match (&overrides.mirror, &sys.mirror, host_mirror) {
            (Some(m), _, _) | (None, Some(m), _) => Mirror::from_uri(m),
            (None, None, Some(h)) => h.clone(),
            (None, None, None) => {
                return Err(ProfileError::new(
                    &file,
                    Some("system.mirror"),
                    "no mirror: the host's apt sources name none; set system.mirror or pass --mirror URI",
                ))
            }
        };
        let net = p.network.clone().unwrap_or_default();
        let wifi = match (net.wifi.unwrap_or(false), &net.country) {
            (false, _) => None,
            (true, None) => {
                return Err(ProfileError::new(
                    &file,
                    Some("network.country"),
                    "required with wifi = true: the regulatory country (\"DE\", \"US\", ...), which says the channels and transmit power that are legal where the device is",
                ))
            }
            (true, Some(c)) => Some(kiln_device::WifiConfig { country: c.clone() }),
        };
        let wifi_firmware = net.firmware.clone().unwrap_or_else(|| def.wifi_firmware.clone());
        let mut components = def.components.clone();
        if wifi.is_some() && !wifi_firmware.is_empty() && !components.iter().any(|c| c == "non-free-firmware") {
            components.push("non-free-firmware".into());
        }
        let sources = mirror.source_lines(&suite, &components.join(" "));
        let locale = sys.locale.clone().unwrap_or_else(|| "C.UTF-8".into());

        let mut packages: BTreeSet<String> = REQUIRED_PACKAGES.iter().map(|s| s.to_string()).collect();
        packages.insert(def.kernel_package.clone());
        packages.extend(def.packages.iter().cloned());
        packages.extend(sys.packages.iter().flatten().cloned());
        if locale != "C.UTF-8" {
            packages.insert("locales".into());
        }
        let timezone = sys.timezone.clone().unwrap_or_else(|| "Etc/UTC".into());
        if timezone != "Etc/UTC" && timezone != "UTC" {
            packages.insert("tzdata".into());
        }

        let users: Vec<UserPlan> = p
            .users
            .iter()
            .flatten()
            .map(|(name, u)| UserPlan {
                name: name.clone(),
                ssh_keys: u.ssh_keys.clone().unwrap_or_default(),
                groups: u.groups.clone().unwrap_or_default(),
                shell: u.shell.clone().unwrap_or_else(|| "/bin/bash".into()),
            })
            .collect();
        if users.iter().any(|u| u.groups.iter().any(|g| g == "sudo")) {
            packages.insert("sudo".into());
        }

        let mut kernel_cmdline = def.kernel_cmdline.clone();
        kernel_cmdline.extend(sys.kernel_cmdline.iter().flatten().cloned());

        let release = p.release.clone().unwrap_or_default();
        let version = overrides.version.clone().or(release.version).unwrap_or_else(|| "0.1.0".into());
        if !crate::config::profile::valid_version(&version) {
            return Err(ProfileError::new(
                "--release",
                None,
                format!("expected a version starting with a digit, such as \"1.4.0\", found {version:?}"),
            ));
        }
        let source_date_epoch = overrides.source_date_epoch.or(release.source_date_epoch).unwrap_or(now_epoch);

        let h = p.hardening.clone().unwrap_or_default();
        let exposure_budget = h.exposure_budget.unwrap_or(crate::config::services::DEFAULT_BUDGET);
        let mut services = Vec::new();
        for (name, svc) in p.services.iter().flatten() {
            if svc.enable == Some(false) {
                continue;
            }
            let s = crate::config::services::resolve(&file, name, svc, exposure_budget)?;
            packages.extend(s.packages.iter().cloned());
            services.push(s);
        }
        let mut open_ports: Vec<OpenPort> = Vec::new();
        for s in &services {
            for pp in &s.ports {
                if pp.port == 22 && pp.proto == "tcp" {
                    return Err(ProfileError::new(
                        &file,
                        Some(&format!("services.{}.ports", s.name)),
                        "port 22/tcp is SSH's".to_string(),
                    ));
                }
                if let Some(other) = open_ports.iter().find(|o| o.port == pp.port && o.proto == pp.proto) {
                    return Err(ProfileError::new(
                        &file,
                        Some(&format!("services.{}.ports", s.name)),
                        format!("{pp} is already declared by service {}", other.service),
                    ));
                }
                open_ports.push(OpenPort { port: pp.port, proto: pp.proto.clone(), service: s.name.clone() });
            }
        }
        open_ports.sort_by(|a, b| (a.port, &a.proto).cmp(&(b.port, &b.proto)));
        let watchdog_secs = match h.watchdog.as_deref() {
            None => Some(30),
            Some("off") => None,
            Some(d) => humantime::parse_duration(d).ok().map(|d| d.as_secs().max(1)),
        };
        let hardening = HardeningPlan {
            firewall: h.firewall.unwrap_or(true),
            open_ports,
            exposure_budget,
            sysctl: h.sysctl.unwrap_or_default().into_iter().map(|(k, v)| (k, v.to_string())).collect(),
            disable_modules: h.disable_modules.unwrap_or_default(),
            setuid_allow: h.setuid_allow.unwrap_or_default(),
            allow_compilers: h.allow_compilers.unwrap_or(false),
            watchdog_secs,
            journal_max_use_mib: h.journal_max_use.map(|b| b.mib().max(16)).unwrap_or(256),
            audit: h.audit.unwrap_or(true),
            pam_tmpdir: h.pam_tmpdir.unwrap_or(true),
            hide_processes: h.hide_processes.unwrap_or(true),
            noexec_tmp: h.noexec_tmp.unwrap_or(true),
        };
        if hardening.audit {
            packages.insert("auditd".into());
            // Processes started before auditd are audited too; the kernel queues their events.
            kernel_cmdline.extend(["audit=1".to_string(), "audit_backlog_limit=8192".to_string()]);
        }
        if hardening.pam_tmpdir {
            packages.insert("libpam-tmpdir".into());
        }

        let health = p.health.clone().unwrap_or_default();
        let mut health_units = health.units.unwrap_or_default();
        for s in &services {
            if !health_units.contains(&s.unit) {
                health_units.push(s.unit.clone());
            }
        }
        // An appliance that should record privileged actions and does not is not healthy.
        if hardening.audit && !health_units.iter().any(|u| u == "auditd.service") {
            health_units.push("auditd.service".into());
        }
        let health = HealthPlan {
            units: health_units,
            commands: health.commands.unwrap_or_default(),
            timeout_secs: health.timeout.unwrap_or(240),
        };

        let update = match &p.update {
            None => None,
            Some(u) => Some(resolve_update(&file, u)?),
        };
        let backup = match &p.backup {
            None => None,
            Some(b) => Some(resolve_backup(&file, b, &services)?),
        };
        if backup.is_some() {
            packages.insert("restic".to_string());
        }
        let mut monitor = resolve_monitor(p.monitor.as_ref());
        // `[backup] alert_url` (before `[monitor]` existed) still says where alerts go.
        if monitor.alert_url.is_none() {
            monitor.alert_url = p.backup.as_ref().and_then(|b| b.alert_url.clone());
        }
        if wifi.is_some() {
            // The supplicant (WPA2/WPA3) and the regulatory database it hands the kernel.
            packages.extend(["wpasupplicant".to_string(), "wireless-regdb".to_string()]);
            packages.extend(wifi_firmware.iter().cloned());
        }

        let seed_input = serde_json::json!({
            "profile": p, "image": def, "version": version, "suite": suite, "epoch": source_date_epoch,
        });
        let seed = Sha256::of(seed_input.to_string().as_bytes()).hex();
        // The partition table stays on the device for its whole life: every release of an
        // appliance (profile + image) must name the same partitions (the data partition in
        // fstab, the Pi's disk id), so their ids come from the appliance's identity alone,
        // never from the version or the contents.
        let layout_seed = Sha256::of(
            serde_json::json!({ "profile": profile.name, "image": image.name, "layout": def.disk })
                .to_string()
                .as_bytes(),
        )
        .hex();
        let disk = layout(def.disk.table, &def.disk.partitions, &layout_seed);

        Ok(Plan {
            output_name: format!("{}-{}", profile.name, image.name),
            profile: profile.name.clone(),
            profile_chain: profile.chain.iter().map(|s| s.to_string()).collect(),
            image: image.name.clone(),
            image_source: image.source.clone(),
            arch: def.arch,
            bootloader: def.bootloader,
            suite,
            components,
            mirror,
            sources,
            packages: packages.into_iter().collect(),
            hostname: sys.hostname.unwrap_or_else(|| "kiln".into()),
            timezone,
            locale,
            users,
            kernel_cmdline,
            initramfs_modules: def.initramfs_modules.clone(),
            initramfs: def.initramfs,
            version,
            source_date_epoch,
            epoch_from_profile: release.source_date_epoch.is_some(),
            disk,
            health,
            qemu: def.qemu.clone(),
            rpi: def.rpi.clone(),
            wifi,
            monitor,
            update,
            services,
            hardening,
            backup,
            seed,
        })
    }

    pub fn partition(&self, role: Role, slot: Option<Slot>) -> &PartitionPlan {
        self.disk
            .partitions
            .iter()
            .find(|p| p.role == role && p.slot == slot)
            .expect("image validated: partition exists")
    }
}

/// Places partitions back to back, 1 MiB aligned, with room for the backup GPT at the end. In a
/// DOS table with more than four partitions, each logical partition gets 1 MiB before it for
/// its extended boot record.
fn layout(table: PartitionTable, parts: &[PartitionDef], seed: &str) -> DiskPlan {
    let disk_id = u32::from_str_radix(&seed[..8], 16).expect("hex seed") | 1;
    let mut offset = ALIGN;
    let mut out = Vec::new();
    for (i, p) in parts.iter().enumerate() {
        let (number, uuid) = match table {
            PartitionTable::Gpt => (i as u32 + 1, Uuid::derive(seed, &format!("partition:{}", p.name)).to_string()),
            PartitionTable::Mbr => {
                let n = crate::mbr::partition_number(i, parts.len());
                if n > 4 {
                    offset += crate::mbr::EBR_GAP_SECTORS * crate::mbr::SECTOR;
                }
                (n, crate::mbr::partuuid(disk_id, n))
            }
        };
        out.push(PartitionPlan {
            name: p.name.clone(),
            role: p.role,
            slot: p.slot,
            number,
            offset: Bytes(offset),
            size: p.size,
            uuid,
        });
        offset += p.size.0.div_ceil(ALIGN) * ALIGN;
    }
    let disk_guid = match table {
        PartitionTable::Gpt => Uuid::derive(seed, "disk").to_string(),
        PartitionTable::Mbr => format!("{disk_id:08x}"),
    };
    DiskPlan { table, size: Bytes(offset + ALIGN), disk_guid, partitions: out }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::profile::{load, Source};

    fn plan() -> Plan {
        let prof = load(Source::Builtin("minimal")).unwrap();
        let img = crate::config::image::load("pc-uefi", std::path::Path::new("/nonexistent")).unwrap();
        let m = Mirror::from_uri("http://mirror.test/debian");
        Plan::resolve(&prof, &img, Some(&m), &Overrides::default(), 1_700_000_000).unwrap()
    }

    fn plan_of(text: &str) -> Plan {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("home.toml");
        std::fs::write(&file, text).unwrap();
        let prof = load(Source::File(file)).unwrap();
        let img = crate::config::image::load("pc-uefi", std::path::Path::new("/nonexistent")).unwrap();
        let m = Mirror::from_uri("http://mirror.test/debian");
        Plan::resolve(&prof, &img, Some(&m), &Overrides::default(), 1_700_000_000).unwrap()
    }

    #[test]
    fn unit_files_carry_profile_strings_literally() {
        // Issue 16 item 14: systemd expands "%" specifiers and unescapes "\\" in ExecStart= and
        // quoted Environment= values; the unit must say what the profile says.
        let p = plan_of(
            r#"extends = "minimal"
[services.app]
exec = '/usr/bin/printf 100%% %h \\n'
[services.app.environment]
GREETING = 'C:\Users 50%'
"#,
        );
        let s = p.services.iter().find(|s| s.name == "app").unwrap();
        let t = crate::stages::templates::Templates::load().unwrap();
        let mut c = tera::Context::from_serialize(&p).unwrap();
        c.insert("service", s);
        c.insert("sites", &s.sites);
        let unit = t.render("catalog/service.tera", &c).unwrap();
        assert!(unit.contains("\nExecStart=/usr/bin/printf 100%%%% %%h \\\\\\\\n\n"), "{unit}");
        assert!(unit.contains("\nEnvironment=\"GREETING=C:\\\\Users 50%%\"\n"), "{unit}");
    }

    #[test]
    fn monitor_defaults_and_the_backup_alert_url() {
        let p = plan_of("extends = \"minimal\"\n");
        assert_eq!(p.monitor, kiln_device::MonitorConfig::default(), "on by default, with no URLs");
        let p = plan_of(
            "extends = \"minimal\"\n[backup]\nrepository = \"/srv/r\"\nalert_url = \"https://ntfy.example.org/b\"\n\
             [monitor]\ninterval = \"1m\"\ndisk_warn = 70\nupdate_stale = \"2d\"\n",
        );
        assert_eq!(
            p.monitor.alert_url.as_deref(),
            Some("https://ntfy.example.org/b"),
            "[backup] alert_url still counts"
        );
        assert_eq!((p.monitor.interval_secs, p.monitor.disk_warn, p.monitor.disk_alert), (60, 70, 95));
        assert_eq!(p.monitor.update_stale_secs, 2 * 86400);
        let p = plan_of(
            "extends = \"minimal\"\n[backup]\nrepository = \"/srv/r\"\nalert_url = \"https://ntfy.example.org/b\"\n\
             [monitor]\nalert_url = \"https://ntfy.example.org/m\"\n",
        );
        assert_eq!(p.monitor.alert_url.as_deref(), Some("https://ntfy.example.org/m"), "[monitor] wins");
    }

    #[test]
    fn backups_cover_the_services_state_home_and_srv() {
        let p = plan_of(
            r#"extends = "minimal"
[services.caddy]
sites = [{ root = "/srv/www" }]
[services.syncthing]
[services.cache]
exec = "/usr/bin/sleep infinity"
state = true
backup = "skip"
[services.legacy]
exec = "/usr/bin/sleep infinity"
state = true
[services.legacy.loosen]
DynamicUser = "no"
[backup]
repository = "rest:https://backup.example.org/home"
"#,
        );
        let b = p.backup.as_ref().unwrap();
        assert!(p.packages.contains(&"restic".to_string()));
        assert_eq!(
            b.device.paths,
            ["/var/lib/private/caddy", "/var/lib/legacy", "/var/lib/private/syncthing", "/var/home", "/var/srv"]
        );
        let svc: Vec<(&str, Quiesce)> = b.device.services.iter().map(|s| (s.unit.as_str(), s.quiesce)).collect();
        assert_eq!(
            svc,
            [("caddy.service", Quiesce::Live), ("legacy.service", Quiesce::Stop), ("syncthing.service", Quiesce::Stop)]
        );
        assert_eq!(b.schedule, "daily");
        assert_eq!(b.restore_drill.as_deref(), Some("monthly"));
        assert_eq!(b.device.keep.len(), 3);
        assert!(!b.device.prune, "append-only targets are the default: the device does not prune");
        assert_eq!(
            (b.device.before_update, b.device.stale_after_secs),
            (kiln_device::BeforeUpdate::Require, 2 * 86400)
        );

        // Paths of the user's own: /home and /srv are links into /var; only services inside them
        // are quiesced.
        let p = plan_of(
            r#"extends = "minimal"
[services.syncthing]
[backup]
repository = "sftp:backup@nas:/srv/restic/home"
paths = ["/home/alice/", "/srv/www"]
restore_drill = "off"
"#,
        );
        let b = p.backup.unwrap();
        assert_eq!(b.device.paths, ["/var/home/alice", "/var/srv/www"]);
        assert!(b.device.services.is_empty());
        assert_eq!(b.restore_drill, None);
    }

    #[test]
    fn minimal_on_pc_uefi_resolves() {
        let p = plan();
        assert_eq!(p.output_name, "minimal-pc-uefi");
        assert_eq!(p.suite, "trixie");
        assert_eq!(p.hostname, "kiln-minimal");
        assert!(p.packages.contains(&"openssh-server".to_string()), "base's packages are inherited");
        assert!(p.packages.contains(&"linux-image-amd64".to_string()));
        assert_eq!(p.sources[2], "deb http://mirror.test/debian-security trixie-security main");
        let names: Vec<&str> = p.disk.partitions.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(names, ["esp", "root-a", "root-b", "data"]);
        assert_eq!(p.disk.partitions[0].offset, Bytes(MIB));
        assert_eq!(p.disk.partitions[1].offset, Bytes(257 * MIB));
        assert_eq!(p.disk.size, Bytes((1 + 256 + 1024 + 1024 + 512 + 1) * MIB));
    }

    #[test]
    fn rpi4_layout_leaves_room_for_the_ebrs() {
        let prof = load(Source::Builtin("minimal")).unwrap();
        let img = crate::config::image::load("rpi4", std::path::Path::new("/nonexistent")).unwrap();
        let m = Mirror::from_uri("http://mirror.test/debian");
        let p = Plan::resolve(&prof, &img, Some(&m), &Overrides::default(), 1_700_000_000).unwrap();
        assert_eq!(p.arch, Arch::Arm64);
        assert_eq!(p.sources[0], "deb http://mirror.test/debian trixie main non-free-firmware");
        let numbers: Vec<u32> = p.disk.partitions.iter().map(|p| p.number).collect();
        assert_eq!(numbers, [1, 2, 3, 5, 6, 7]);
        let root_a = p.partition(Role::Root, Some(Slot::A));
        assert_eq!(root_a.offset, Bytes((1 + 64 + 128 + 128 + 1) * MIB));
        assert!(root_a.uuid.ends_with("-05") && root_a.uuid.starts_with(&p.disk.disk_guid), "{}", root_a.uuid);
        assert!(p.packages.contains(&"raspi-firmware".to_string()));
    }

    #[test]
    fn audit_and_pam_tmpdir_bring_their_packages_and_can_be_switched_off() {
        let p = plan();
        assert!(p.hardening.audit && p.hardening.pam_tmpdir && p.hardening.hide_processes && p.hardening.noexec_tmp);
        assert!(p.packages.contains(&"auditd".to_string()) && p.packages.contains(&"libpam-tmpdir".to_string()));
        assert!(p.kernel_cmdline.contains(&"audit=1".to_string()));
        assert!(p.health.units.contains(&"auditd.service".to_string()), "a stopped auditd fails the health check");

        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("quiet.toml");
        std::fs::write(&file, "extends = \"minimal\"\n[hardening]\naudit = false\npam_tmpdir = false\n").unwrap();
        let prof = load(Source::File(file)).unwrap();
        let img = crate::config::image::load("pc-uefi", std::path::Path::new("/nonexistent")).unwrap();
        let m = Mirror::from_uri("http://mirror.test/debian");
        let p = Plan::resolve(&prof, &img, Some(&m), &Overrides::default(), 1_700_000_000).unwrap();
        assert!(!p.packages.iter().any(|p| p == "auditd" || p == "libpam-tmpdir"));
        assert!(!p.kernel_cmdline.iter().any(|a| a.starts_with("audit")));
        assert!(!p.health.units.contains(&"auditd.service".to_string()));
    }

    #[test]
    fn wifi_brings_the_supplicant_and_the_boards_firmware() {
        let p = plan();
        assert!(p.wifi.is_none() && !p.packages.iter().any(|p| p == "wpasupplicant"));
        let dir = tempfile::tempdir().unwrap();
        let m = Mirror::from_uri("http://mirror.test/debian");
        let resolve = |text: &str, image: &str| {
            let file = dir.path().join("w.toml");
            std::fs::write(&file, text).unwrap();
            let prof = load(Source::File(file)).map_err(|e| e.to_string())?;
            let img = crate::config::image::load(image, std::path::Path::new("/nonexistent")).unwrap();
            Plan::resolve(&prof, &img, Some(&m), &Overrides::default(), 1_700_000_000).map_err(|e| e.to_string())
        };
        let pi = resolve("extends = \"minimal\"\n[network]\nwifi = true\ncountry = \"DE\"\n", "rpi4").unwrap();
        assert_eq!(pi.wifi, Some(kiln_device::WifiConfig { country: "DE".into() }));
        for pkg in ["wpasupplicant", "wireless-regdb", "firmware-brcm80211"] {
            assert!(pi.packages.iter().any(|p| p == pkg), "{pkg} missing: {:?}", pi.packages);
        }
        assert!(crate::config::device::device_config(&pi).unwrap().wifi.is_some());
        // x86: no firmware unless the profile names it; naming it brings non-free-firmware.
        let pc = resolve("extends = \"minimal\"\n[network]\nwifi = true\ncountry = \"US\"\n", "pc-uefi").unwrap();
        assert!(!pc.packages.iter().any(|p| p.starts_with("firmware-")) && pc.components == ["main"]);
        let intel = resolve(
            "extends = \"minimal\"\n[network]\nwifi = true\ncountry = \"US\"\nfirmware = [\"firmware-iwlwifi\"]\n",
            "pc-uefi",
        )
        .unwrap();
        assert!(intel.packages.iter().any(|p| p == "firmware-iwlwifi"));
        assert_eq!(intel.components, ["main", "non-free-firmware"]);
        assert!(intel.sources.iter().all(|l| l.contains("non-free-firmware")), "{:?}", intel.sources);
        let e = resolve("extends = \"minimal\"\n[network]\nwifi = true\n", "rpi4").unwrap_err();
        assert!(e.contains("network.country") && e.contains("required with wifi = true"), "{e}");
        let e = resolve("extends = \"minimal\"\n[network]\nwifi = true\ncountry = \"de\"\n", "rpi4").unwrap_err();
        assert!(e.contains("network.country") && e.contains("found \"de\""), "{e}");
    }

    #[test]
    fn plan_is_deterministic_and_seeded_by_inputs() {
        assert_eq!(plan(), plan());
        let prof = load(Source::Builtin("minimal")).unwrap();
        let img = crate::config::image::load("pc-uefi", std::path::Path::new("/nonexistent")).unwrap();
        let m = Mirror::from_uri("http://mirror.test/debian");
        let o = Overrides { version: Some("2.0.0".into()), ..Default::default() };
        let p2 = Plan::resolve(&prof, &img, Some(&m), &o, 1_700_000_000).unwrap();
        assert_ne!(p2.seed, plan().seed);
        assert_eq!(p2.version, "2.0.0");
    }
}
