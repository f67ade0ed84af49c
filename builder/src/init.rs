//! `kiln init DIR`: a working appliance project in one command. DIR/NAME.toml (a profile that
//! extends base, with the user's SSH key for the admin user and a commented example of every
//! other section), a release key pair in DIR/keys/, a provisioning skeleton and a .gitignore
//! that keeps the secret key and the per-device files out of version control. A file that
//! exists is kept, never overwritten, so running it again only adds what is missing.

use crate::config::profile::{valid_hostname, valid_ssh_key, valid_user_name};
use anyhow::{bail, Context as _, Result};
use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};

/// Where an SSH public key is looked for in `~/.ssh`, in this order (then any other `*.pub`).
pub const KEY_NAMES: &[&str] = &["id_ed25519.pub", "id_ecdsa.pub", "id_ed25519_sk.pub", "id_rsa.pub"];

pub struct InitOptions {
    pub dir: PathBuf,
    /// A public key file; default: the first of [`KEY_NAMES`] in `home/.ssh`.
    pub ssh_key: Option<PathBuf>,
    /// The login user's name on the appliance.
    pub user: String,
    /// The home directory to look for `~/.ssh` in.
    pub home: Option<PathBuf>,
}

/// What `init` did.
pub struct Report {
    pub name: String,
    pub profile: PathBuf,
    /// (path, what it is) for each file made now.
    pub created: Vec<(PathBuf, &'static str)>,
    /// Files that were there already and are kept as they are.
    pub kept: Vec<PathBuf>,
    /// Where the SSH key came from.
    pub key_source: PathBuf,
}

pub fn init(opts: &InitOptions) -> Result<Report> {
    let dir = &opts.dir;
    let name = dir
        .file_name()
        .and_then(|n| n.to_str())
        .map(str::to_string)
        .with_context(|| format!("{}: name the project directory, such as `kiln init myhome`", dir.display()))?;
    if !valid_hostname(&name) || name.chars().any(|c| c.is_ascii_uppercase()) {
        bail!("{}: the directory's name {name:?} becomes the profile's and the appliance's hostname: use lowercase letters, digits and '-' (at most 63), such as \"myhome\"", dir.display());
    }
    if !valid_user_name(&opts.user) || opts.user == "root" {
        bail!("--user {:?}: expected a login name (lowercase letters, digits, '-', '_'), not root", opts.user);
    }
    let profile = dir.join(format!("{name}.toml"));
    if dir.exists() {
        let empty = std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))?.next().is_none();
        if !empty && !profile.exists() {
            bail!("{} exists and is not a kiln project (it has no {name}.toml): pick a new directory name, or an empty directory", dir.display());
        }
    }
    let (key_source, key) = ssh_key(opts)?;
    std::fs::create_dir_all(dir)
        .with_context(|| format!("creating {} (is the parent directory writable by you?)", dir.display()))?;

    let mut report = Report { name: name.clone(), profile: profile.clone(), created: vec![], kept: vec![], key_source };
    let text = profile_text(&name, &opts.user, &key);
    put(
        &mut report,
        &profile,
        text.as_bytes(),
        0o644,
        "the appliance's profile: every section has a commented example",
    )?;
    put(
        &mut report,
        &dir.join(".gitignore"),
        b"# Written by kiln init: secrets and per-device files stay out of version control.\nkeys/kiln-release.key\nprovision/\nout/\n",
        0o644,
        "keeps the secret key, provisioning and builds out of git",
    )?;
    let keys = dir.join("keys");
    if keys.join(crate::release::publish::SECRET_FILE).exists() {
        report.kept.push(keys.join(crate::release::publish::SECRET_FILE));
    } else {
        let (secret, public, _) = crate::release::publish::keygen(&keys, false)?;
        report.created.push((secret, "the release signing key (secret, 0600): BACK IT UP somewhere safe; without it no device of this appliance takes an update again"));
        report.created.push((public, "its public half, which devices trust ([update] public_key)"));
    }
    // Per-device files for `kiln flash --provision`: only entries it accepts as they are
    // (backup/ needs its password file: made with the profile's [backup]).
    for (sub, what) in [
        ("provision/ssh/authorized_keys", "per-device SSH keys: a file named after the user"),
        ("provision/wifi", "Wi-Fi networks: <name>.network (ssid=, passphrase=)"),
    ] {
        let d = dir.join(sub);
        if d.exists() {
            report.kept.push(d);
        } else {
            std::fs::create_dir_all(&d).with_context(|| format!("creating {}", d.display()))?;
            report.created.push((d, what));
        }
    }
    let provision = dir.join("provision");
    std::fs::set_permissions(&provision, std::os::unix::fs::PermissionsExt::from_mode(0o700))
        .with_context(|| format!("chmod {}", provision.display()))?;
    Ok(report)
}

/// The public key to put in the profile, and where it came from.
fn ssh_key(opts: &InitOptions) -> Result<(PathBuf, String)> {
    let candidates: Vec<PathBuf> = match &opts.ssh_key {
        Some(k) => vec![k.clone()],
        None => {
            let home = opts.home.clone().or_else(|| std::env::var_os("HOME").map(PathBuf::from)).unwrap_or_default();
            let ssh = home.join(".ssh");
            let mut c: Vec<PathBuf> = KEY_NAMES.iter().map(|n| ssh.join(n)).collect();
            let mut other: Vec<PathBuf> = std::fs::read_dir(&ssh)
                .into_iter()
                .flatten()
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|e| e == "pub") && !c.contains(p))
                .collect();
            other.sort();
            c.extend(other);
            c.retain(|p| p.is_file());
            if c.is_empty() {
                bail!(
                    "no SSH public key found: looked for {} and any other *.pub in {}; pass --ssh-key FILE (a .pub file), or make a key with `ssh-keygen -t ed25519`",
                    KEY_NAMES.join(", "),
                    ssh.display()
                );
            }
            c
        }
    };
    let path = &candidates[0];
    let text = std::fs::read_to_string(path).with_context(|| format!("reading the SSH key {}", path.display()))?;
    let key = text.trim();
    if key.contains("PRIVATE KEY") {
        bail!("{} is a private key: give its public half (the .pub file next to it)", path.display());
    }
    if key.lines().count() != 1 || !valid_ssh_key(key) || key.chars().any(|c| c.is_control()) {
        bail!("{}: expected one OpenSSH public key line (\"ssh-ed25519 AAAA... comment\")", path.display());
    }
    Ok((path.clone(), key.to_string()))
}

/// Writes a new file; one that exists is kept (and listed as kept).
fn put(report: &mut Report, path: &Path, data: &[u8], mode: u32, what: &'static str) -> Result<()> {
    match std::fs::OpenOptions::new().write(true).create_new(true).mode(mode).open(path) {
        Ok(mut f) => {
            f.write_all(data).with_context(|| format!("writing {}", path.display()))?;
            report.created.push((path.to_path_buf(), what));
            Ok(())
        }
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            report.kept.push(path.to_path_buf());
            Ok(())
        }
        Err(e) => Err(e).with_context(|| format!("creating {} (is the directory writable by you?)", path.display())),
    }
}

/// The profile. Lines of the form `# key = ...` and `# [table]` are examples: uncommented, they
/// are valid (a unit test uncomments all of them and plans the result).
pub fn profile_text(name: &str, user: &str, key: &str) -> String {
    let key = toml::Value::String(key.to_string()).to_string();
    format!(
        r#"# {name}: a kiln appliance, made by `kiln init`. Build it with
#   kiln build --profile {name}/{name}.toml            (add --image rpi4 for a Raspberry Pi 4)
# Every section below has a commented example; the README explains each one.
extends = "base"
description = "{name}: a self-hosted appliance"

[system]
hostname = "{name}"
# timezone = "Europe/Berlin"
# packages = ["htop"]

# The login user: SSH keys only (no passwords anywhere); "sudo" makes an administrator.
# More keys for one device: {name}/provision/ssh/authorized_keys/{user} (kiln flash --provision).
[users.{user}]
ssh_keys = [{key}]
groups = ["sudo"]

# Services: from kiln's catalog (caddy, syncthing, radicale) or a program of your own. Each runs
# in a sandbox scored by `systemd-analyze security`; only the ports declared here are open.
# [services.caddy]
# sites = [{{ root = "/srv/www" }}]
# [services.syncthing]
# [services.radicale]

# Encrypted offsite backups with restic, restore-tested on a schedule. The password is per
# device: {name}/provision/backup/password.
# [backup]
# repository = "rest:https://backup.example.org/{name}"
# schedule = "daily"
# restore_drill = "weekly"

# Over-the-air updates: devices follow your signed release feed (kiln publish) and update
# themselves A/B, health-gated, with rollback. keys/kiln-release.key signs; keep it safe.
# [update]
# feed = "https://updates.example.org/{name}/stable.atom"
# public_key = "keys/kiln-release.pub"
# window = "03:00-05:00"

# Wi-Fi: the networks are per device ({name}/provision/wifi/<name>.network).
# [network]
# wifi = true
# country = "DE"

# The device watches itself (failed services, a full disk, backups, updates, the clock,
# certificates, logins) and keeps a status feed; with these it also reports: the feed PUT to
# your WebDAV or object store, alerts POSTed to ntfy, a heartbeat that alerts by its silence.
# Credentials and secret URLs are per device: {name}/provision/monitor/ (push-url, ...).
# [monitor]
# push = "https://dav.example.org/kiln/{{hostname}}.atom"
# alert_url = "https://ntfy.example.org/{name}"
# heartbeat_url = "https://hc-ping.com/your-check-uuid"
# disk_warn = 85
# disk_alert = 95

# What makes a boot healthy (an update that is not healthy is rolled back).
# [health]
# commands = ["systemctl is-active --quiet ssh"]
"#
    )
}

/// The short text printed after `init`: what to do next.
pub fn next_steps(r: &Report, user: &str) -> String {
    let name = &r.name;
    let dir = r.profile.parent().unwrap_or(Path::new(".")).display().to_string();
    format!(
        "next:\n  \
         kiln build --profile {profile}          # the image, in out/{name}-pc-uefi/\n  \
         kiln boot out/{name}-pc-uefi/disk.img --ssh-port 2222    # test-boot it; then, with your key:\n  \
         ssh -p 2222 {user}@127.0.0.1\n  \
         kiln flash out/{name}-pc-uefi/disk.img /dev/sdX --provision {dir}/provision   # onto a disk or USB stick\n\
         For a Raspberry Pi: `--image rpi4` when building, then flash out/{name}-rpi4/disk.img to the SD card.\n\
         Back up {dir}/keys/kiln-release.key: it signs every update your devices will accept.",
        profile = r.profile.display(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::profile::{load, Source};

    fn opts(dir: &Path, home: &Path) -> InitOptions {
        InitOptions { dir: dir.to_path_buf(), ssh_key: None, user: "admin".into(), home: Some(home.to_path_buf()) }
    }

    #[test]
    fn a_project_is_made_once_and_never_overwritten() {
        let t = tempfile::tempdir().unwrap();
        let home = t.path().join("home");
        std::fs::create_dir_all(home.join(".ssh")).unwrap();
        let dir = t.path().join("myhome");
        // No key: the error says where it looked and what to do.
        let e = format!("{:#}", init(&opts(&dir, &home)).err().unwrap());
        assert!(
            e.contains("no SSH public key found") && e.contains("id_ed25519.pub") && e.contains("--ssh-key"),
            "{e}"
        );
        assert!(!dir.exists(), "nothing is made without a key");
        let key = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBu9n2Ww2xW5p5y7E7R5n8H1t2T3sN4kZ6Q0aJkq3vXy me@laptop";
        std::fs::write(home.join(".ssh/id_rsa.pub"), "ssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAABAQC7 other\n").unwrap();
        std::fs::write(home.join(".ssh/id_ed25519.pub"), format!("{key}\n")).unwrap();
        let r = init(&opts(&dir, &home)).unwrap();
        assert_eq!(r.key_source, home.join(".ssh/id_ed25519.pub"), "ed25519 is preferred");
        assert!(r.kept.is_empty());
        let text = std::fs::read_to_string(dir.join("myhome.toml")).unwrap();
        assert!(text.contains(&format!("ssh_keys = [\"{key}\"]")), "{text}");
        let mode =
            |p: &Path| std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(p).unwrap().permissions()) & 0o777;
        assert_eq!(mode(&dir.join("keys/kiln-release.key")), 0o600);
        assert_eq!(mode(&dir.join("provision")), 0o700);
        let prof = load(Source::File(dir.join("myhome.toml"))).unwrap();
        assert_eq!(prof.merged.system.as_ref().unwrap().hostname.as_deref(), Some("myhome"));
        // The skeleton is what `kiln flash --provision` accepts.
        crate::flash::provision::Provision::load(&dir.join("provision")).unwrap();
        let steps = next_steps(&r, "admin");
        assert!(steps.contains("--ssh-port 2222") && steps.contains("ssh -p 2222 admin@127.0.0.1"), "{steps}");

        // Again: every file is kept as it is.
        std::fs::write(dir.join("myhome.toml"), "# mine now\nextends = \"base\"\n").unwrap();
        let secret = std::fs::read(dir.join("keys/kiln-release.key")).unwrap();
        std::fs::remove_file(dir.join(".gitignore")).unwrap();
        let again = init(&opts(&dir, &home)).unwrap();
        assert_eq!(again.created.iter().map(|c| c.0.clone()).collect::<Vec<_>>(), [dir.join(".gitignore")]);
        assert_eq!(std::fs::read_to_string(dir.join("myhome.toml")).unwrap(), "# mine now\nextends = \"base\"\n");
        assert_eq!(std::fs::read(dir.join("keys/kiln-release.key")).unwrap(), secret);

        // A directory that is something else, a bad name, a private key, a bad user.
        let other = t.path().join("photos");
        std::fs::create_dir_all(&other).unwrap();
        std::fs::write(other.join("a.jpg"), "x").unwrap();
        let e = format!("{:#}", init(&opts(&other, &home)).err().unwrap());
        assert!(e.contains("exists and is not a kiln project"), "{e}");
        let e = format!("{:#}", init(&opts(&t.path().join("My Home"), &home)).err().unwrap());
        assert!(e.contains("becomes the profile's and the appliance's hostname"), "{e}");
        std::fs::write(home.join("id"), "-----BEGIN OPENSSH PRIVATE KEY-----\nabc\n").unwrap();
        let o = InitOptions { ssh_key: Some(home.join("id")), ..opts(&t.path().join("x"), &home) };
        assert!(format!("{:#}", init(&o).err().unwrap()).contains("is a private key"));
        let o = InitOptions { user: "root".into(), ..opts(&t.path().join("y"), &home) };
        assert!(format!("{:#}", init(&o).err().unwrap()).contains("not root"));
    }

    /// Every commented example, uncommented, is a valid profile that plans.
    #[test]
    fn every_commented_example_is_valid() {
        let key = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBu9n2Ww2xW5p5y7E7R5n8H1t2T3sN4kZ6Q0aJkq3vXy me";
        let text = profile_text("myhome", "admin", key);
        fn example(l: &str) -> Option<&str> {
            l.strip_prefix("# ").filter(|r| {
                r.starts_with('[')
                    || r.split_once(" = ").is_some_and(|(k, _)| k.chars().all(|c| c.is_ascii_lowercase() || c == '_'))
            })
        }
        let uncommented: String =
            text.lines().map(|l| example(l).unwrap_or(l)).map(|l| format!("{l}\n")).collect::<String>();
        let n = text.lines().filter(|l| example(l).is_some()).count();
        assert!(n >= 20, "{n} example lines:\n{uncommented}");
        let t = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(t.path().join("keys")).unwrap();
        crate::release::publish::keygen(&t.path().join("keys"), false).unwrap();
        let file = t.path().join("myhome.toml");
        std::fs::write(&file, &uncommented).unwrap();
        let prof = load(Source::File(file)).unwrap_or_else(|e| panic!("{e}\n{uncommented}"));
        let img = crate::config::image::load("rpi4", Path::new("/nonexistent")).unwrap();
        let m = crate::debian::mirror::Mirror::from_uri("http://mirror.test/debian");
        let p = crate::config::plan::Plan::resolve(&prof, &img, Some(&m), &Default::default(), 1_700_000_000)
            .unwrap_or_else(|e| panic!("{e}\n{uncommented}"));
        assert!(p.update.is_some() && p.backup.is_some() && p.wifi.is_some() && p.services.len() == 3);
    }
}
