//! kiln's templates (tera), compiled into the binary. Files without `.tera` are copied as is.

use anyhow::{Context as _, Result};

macro_rules! templates {
    ($($name:literal),* $(,)?) => {
        &[$(($name, include_str!(concat!("../../templates/", $name)))),*]
    };
}

pub const FILES: &[(&str, &str)] = templates![
    "initramfs/kiln.conf",
    "initramfs/modules.tera",
    "initramfs/hook-kiln-verity",
    "initramfs/local-top-kiln-verity",
    "rootfs/fstab.tera",
    "rootfs/sshd.conf.tera",
    "rootfs/kiln-ssh-hostkey.service",
    "rootfs/dhcp.network",
    "rootfs/wifi.network",
    "rootfs/kiln-wifi@.service",
    "rootfs/kiln-wifi.rules",
    "rootfs/kiln-health.service.tera",
    "rootfs/kiln-agent-boot.service",
    "rootfs/kiln-agent-commit.service",
    "rootfs/kiln-agent-rollback.service",
    "rootfs/kiln-agent.service",
    "rootfs/kiln-agent.timer.tera",
    "rootfs/kiln-monitor.service",
    "rootfs/kiln-monitor.timer.tera",
    "rootfs/kiln-monitor-stop.service",
    "rootfs/kiln-backup.service",
    "rootfs/kiln-backup.timer.tera",
    "rootfs/kiln-backup-drill.service",
    "rootfs/kiln-backup-drill.timer.tera",
    "rootfs/kiln-backup-restore.service.tera",
    "rootfs/kiln-var-base.service",
    "rootfs/kiln-provision.service",
    "rootfs/health-check.tera",
    "rootfs/nftables.conf.tera",
    "rootfs/sysctl.conf.tera",
    "rootfs/modprobe.conf.tera",
    "rootfs/journald.conf.tera",
    "rootfs/system.conf.tera",
    "rootfs/resolved.conf",
    "rootfs/service-provision",
    "rootfs/tmpfiles-services.conf.tera",
    "rootfs/issue",
    "rootfs/audit.rules.tera",
    "rootfs/auditd-kiln.conf",
    "rootfs/coredump.conf",
    "rootfs/limits-core.conf",
    "rootfs/profile-hardening.sh",
    "esp/loader.conf",
];

macro_rules! catalog_templates {
    ($($name:literal),* $(,)?) => {
        &[$(($name, include_str!(concat!("../../../catalog/", $name)))),*]
    };
}

/// The service catalog's templates (`catalog/`), named as catalog entries name them.
pub const CATALOG_FILES: &[(&str, &str)] =
    catalog_templates!["service.tera", "caddy/Caddyfile.tera", "radicale/config.tera"];

/// A unit file value in which systemd must expand no specifier: `%` becomes `%%`.
/// (Description=, sandbox directive values.)
pub fn systemd_specifiers(v: &str) -> String {
    v.replace('%', "%%")
}

/// A unit file value that systemd also unescapes (ExecStart= words, a quoted Environment=
/// value): `\` becomes `\\` and `%` becomes `%%`, so the text arrives as the profile wrote it.
/// (`$VAR` in an exec line is still expanded from the service's environment: documented.)
pub fn systemd_escape(v: &str) -> String {
    v.replace('\\', "\\\\").replace('%', "%%")
}

fn filter(
    f: fn(&str) -> String,
) -> impl Fn(&tera::Value, &std::collections::HashMap<String, tera::Value>) -> tera::Result<tera::Value> {
    move |v, _| match v {
        tera::Value::String(s) => Ok(tera::Value::String(f(s))),
        other => Ok(other.clone()),
    }
}

pub struct Templates {
    tera: tera::Tera,
}

impl Templates {
    pub fn load() -> Result<Templates> {
        let mut tera = tera::Tera::default();
        tera.autoescape_on(vec![]);
        tera.register_filter("systemd_specifiers", filter(systemd_specifiers));
        tera.register_filter("systemd_escape", filter(systemd_escape));
        for (name, text) in FILES {
            if name.ends_with(".tera") {
                tera.add_raw_template(name, text).with_context(|| format!("template {name}"))?;
            }
        }
        for (name, text) in CATALOG_FILES {
            let name = format!("catalog/{name}");
            tera.add_raw_template(&name, text).with_context(|| format!("template {name}"))?;
        }
        Ok(Templates { tera })
    }

    /// Renders a `.tera` template, or returns a plain file's text.
    pub fn render(&self, name: &str, ctx: &tera::Context) -> Result<String> {
        if name.ends_with(".tera") {
            self.tera.render(name, ctx).map_err(|e| {
                let mut msg = format!("rendering template {name}: {e}");
                let mut src = std::error::Error::source(&e);
                while let Some(s) = src {
                    msg.push_str(&format!(": {s}"));
                    src = s.source();
                }
                anyhow::anyhow!(msg)
            })
        } else {
            FILES
                .iter()
                .find(|(n, _)| *n == name)
                .map(|(_, t)| t.to_string())
                .with_context(|| format!("no template {name}"))
        }
    }
}
