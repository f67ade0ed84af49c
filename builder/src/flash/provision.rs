//! `kiln flash --provision DIR`: per-device files, written into the data partition (which the
//! device mounts as `/var`), never into the verified root, so the image and its hash are the same
//! for every device.
//!
//! Layout of DIR (anything else is refused, naming the file):
//!
//! ```text
//! DIR/ssh/authorized_keys/<user>   OpenSSH public keys of a login user, one per line
//! DIR/backup/…                     any files: backup repository password, environment
//! DIR/wifi/<name>.network          a Wi-Fi network: ssid=, passphrase= (or sae_password=, or
//!                                  open=true), hidden=, priority= (kiln_device::wifi)
//! DIR/hostname                     the device's hostname (one line)
//! DIR/device-id                    the device's backup identity (32 hex digits): made by kiln
//!                                  flash when missing, and kept in DIR, so that the same
//!                                  device flashed again restores its own backups
//! ```
//!
//! The data partition gets a fresh ext4 filesystem (label `kiln-data`) made on the host with
//! `mkfs.ext4 -d`, holding DIR at `/kiln/provision/`, which the device sees as
//! `/var/kiln/provision/`. Everything belongs to root; files are 0600 and directories 0700,
//! except the public keys `ssh/authorized_keys/<user>` (0644) and the directories on their path
//! (`/kiln`, `/kiln/provision`, `ssh`, `ssh/authorized_keys`: 0755), so that sshd can read a
//! user's keys with that user's rights (`AuthorizedKeysFile /var/kiln/provision/ssh/authorized_keys/%u`).
//!
//! Only the filesystem's blocks that carry data are written to the device, plus its first and
//! last MiB (old signatures there must not survive) and its journal, which `mkfs.ext4` zeroes on
//! a real device but leaves as a hole in a sparse file.

use crate::flash::bmap::{self, Bmap};
use crate::host::exec::Cmd;
use crate::units::MIB;
use anyhow::{bail, Context as _, Result};
use std::fs;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// The entries DIR may hold, for messages.
pub const KNOWN: &str = "ssh/authorized_keys/<user>, backup/, wifi/, hostname, device-id";
/// The device's backup identity in DIR.
pub const DEVICE_ID: &str = "device-id";
/// Where DIR lands inside the data filesystem.
pub const TARGET: &str = "kiln/provision";
pub const LABEL: &str = "kiln-data";
const KEY_TYPES: &[&str] = &[
    "ssh-ed25519",
    "ssh-rsa",
    "ecdsa-sha2-nistp256",
    "ecdsa-sha2-nistp384",
    "ecdsa-sha2-nistp521",
    "sk-ssh-ed25519@openssh.com",
    "sk-ecdsa-sha2-nistp256@openssh.com",
];

/// A checked provisioning directory: the paths to copy, relative to it, parents first.
#[derive(Debug)]
pub struct Provision {
    pub dir: PathBuf,
    /// (relative path, None for a directory or the file's bytes). Files are read once, in
    /// `load`, without following links: what was checked before the prompt is what is written
    /// after it, whatever happens to DIR meanwhile.
    entries: Vec<(PathBuf, Option<Vec<u8>>)>,
}

/// The data filesystem made for one device: a sparse file the size of the partition and its map.
pub struct DataFs {
    pub image: PathBuf,
    pub bmap: Bmap,
    _scratch: Scratch,
}

impl Provision {
    /// Checks DIR against the layout above, reading every file that has a format.
    pub fn load(dir: &Path) -> Result<Provision> {
        let meta = fs::symlink_metadata(dir)
            .with_context(|| format!("{}: cannot read the provisioning directory", dir.display()))?;
        if !meta.is_dir() {
            bail!("{} is not a directory: --provision takes a directory holding {KNOWN}", dir.display());
        }
        let mut entries = Vec::new();
        for (name, path) in list(dir)? {
            let rel = PathBuf::from(&name);
            match name.as_str() {
                "ssh" => {
                    require_dir(&path)?;
                    entries.push((rel.clone(), None));
                    for (sub, subpath) in list(&path)? {
                        if sub != "authorized_keys" {
                            bail!("{}: unknown entry in ssh/ (known: ssh/authorized_keys/<user>)", subpath.display());
                        }
                        require_dir(&subpath)?;
                        entries.push((rel.join(&sub), None));
                        for (user, keyfile) in list(&subpath)? {
                            let data = read_regular(&keyfile)?;
                            if !valid_user(&user) {
                                bail!("{}: {user:?} is not a valid user name (lowercase letters, digits, '_' and '-', starting with a letter or '_', at most 32)", keyfile.display());
                            }
                            check_keys(&keyfile, &data)?;
                            entries.push((rel.join(&sub).join(&user), Some(data)));
                        }
                    }
                }
                "backup" => {
                    require_dir(&path)?;
                    entries.push((rel.clone(), None));
                    let first = entries.len();
                    walk(&path, &rel, &mut entries)?;
                    check_backup(&path, &entries[first..])?;
                }
                "wifi" => {
                    require_dir(&path)?;
                    entries.push((rel.clone(), None));
                    for (file, filepath) in list(&path)? {
                        let Some(stem) = file.strip_suffix(kiln_device::wifi::SUFFIX).filter(|s| !s.is_empty()) else {
                            bail!("{}: a Wi-Fi network file is named <name>.network (ssid=, passphrase= or sae_password= or open=true, hidden=, priority=)", filepath.display());
                        };
                        let data = read_regular(&filepath)?;
                        let text = std::str::from_utf8(&data)
                            .map_err(|_| anyhow::anyhow!("{}: not UTF-8 text", filepath.display()))?;
                        kiln_device::wifi::parse_network(stem, text).map_err(|(line, msg)| match line {
                            0 => anyhow::anyhow!("{}: {msg}", filepath.display()),
                            n => anyhow::anyhow!("{}:{n}: {msg}", filepath.display()),
                        })?;
                        entries.push((rel.join(&file), Some(data)));
                    }
                }
                DEVICE_ID => {
                    let data = read_regular(&path)?;
                    let text = String::from_utf8_lossy(&data);
                    if !kiln_device::valid_device_id(text.trim()) {
                        bail!(
                            "{}: expected 32 lowercase hex digits (kiln flash writes one when the file is missing)",
                            path.display()
                        );
                    }
                    entries.push((rel, Some(data)));
                }
                "hostname" => {
                    let data = read_regular(&path)?;
                    let text = String::from_utf8_lossy(&data);
                    check_hostname(text.trim()).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
                    entries.push((rel, Some(data)));
                }
                _ => bail!("{}: unknown provisioning entry (known: {KNOWN})", path.display()),
            }
        }
        Ok(Provision { dir: dir.to_path_buf(), entries })
    }
}

/// DIR/device-id, made from 16 random bytes when it is missing: the device's backup identity
/// (restic's `--host`), which stays with DIR, so flashing the same device again restores its
/// own backups, and two devices never share one. Returns the id and whether it was made now.
pub fn ensure_device_id(dir: &Path) -> Result<(String, bool)> {
    let path = dir.join(DEVICE_ID);
    if fs::symlink_metadata(&path).is_ok() {
        let data = read_regular(&path)?;
        return Ok((String::from_utf8_lossy(&data).trim().to_string(), false));
    }
    let id = kiln_device::new_device_id().context("reading /dev/urandom for a device id")?;
    // A new file only (O_EXCL: no link followed, nothing overwritten), then synced.
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)
        .with_context(|| format!("creating {} (kiln flash keeps the device's identity in DIR)", path.display()))?;
    std::io::Write::write_all(&mut f, format!("{id}\n").as_bytes())
        .and_then(|_| f.sync_all())
        .with_context(|| format!("writing {}", path.display()))?;
    Ok((id, true))
}

impl Provision {
    /// The relative paths that will be copied, parents first.
    pub fn paths(&self) -> impl Iterator<Item = &Path> {
        self.entries.iter().map(|(p, _)| p.as_path())
    }

    /// Makes the data filesystem of `size` bytes holding DIR, in a private scratch directory.
    /// Needs root, to give the files to root (`kiln flash` checks that before asking).
    pub fn build(&self, size: u64) -> Result<DataFs> {
        let scratch = Scratch::new()?;
        let tree = scratch.0.join("tree");
        let dest = tree.join(TARGET);
        make_dir(&tree, 0o755)?;
        make_dir(&tree.join("kiln"), 0o755)?;
        make_dir(&dest, 0o755)?;
        for (rel, data) in &self.entries {
            let to = dest.join(rel);
            let mode = mode_for(rel, data.is_none());
            match data {
                None => make_dir(&to, mode)?,
                Some(bytes) => {
                    fs::write(&to, bytes).with_context(|| format!("writing {}", to.display()))?;
                    fs::set_permissions(&to, fs::Permissions::from_mode(mode))
                        .with_context(|| format!("setting the mode of {}", to.display()))?;
                }
            }
            std::os::unix::fs::chown(&to, Some(0), Some(0))
                .with_context(|| format!("giving {} to root", to.display()))?;
        }
        let image = scratch.0.join("data.ext4");
        let f = fs::File::create(&image).with_context(|| format!("creating {}", image.display()))?;
        f.set_len(size).with_context(|| format!("sizing {} to {size} bytes", image.display()))?;
        drop(f);
        // nodiscard: mke2fs must not mark the inode tables as zeroed (the card's old contents
        // are still there); the kernel zeroes the unused ones after the first mount.
        Cmd::new("mkfs.ext4")
            .args(["-q", "-F", "-b", "4096", "-L", LABEL, "-E", "root_owner=0:0,nodiscard", "-d"])
            .arg(&tree)
            .arg(&image)
            .run()
            .with_context(|| format!("making the data filesystem from {}", self.dir.display()))?;
        let edge = MIB.min(size);
        let mut must_write = vec![(0, edge), (size - edge, edge)];
        must_write.extend(journal_spans(&image)?);
        let bmap = bmap::create(&image, &must_write)?;
        Ok(DataFs { image, bmap, _scratch: scratch })
    }
}

/// The modes of the layout: see the module documentation.
fn mode_for(rel: &Path, is_dir: bool) -> u32 {
    let under_keys = rel.starts_with("ssh/authorized_keys");
    match (is_dir, under_keys || rel == Path::new("ssh")) {
        (true, true) => 0o755,
        (true, false) => 0o700,
        (false, true) => 0o644,
        (false, false) => 0o600,
    }
}

/// The journal's blocks as byte spans (`debugfs` lists the blocks of inode 8).
fn journal_spans(image: &Path) -> Result<Vec<(u64, u64)>> {
    let out =
        Cmd::new("debugfs").args(["-R", "blocks <8>"]).arg(image).read().context("listing the journal's blocks")?;
    let mut blocks: Vec<u64> = Vec::new();
    for w in out.split_whitespace() {
        blocks.push(w.parse().with_context(|| format!("debugfs printed {w:?} where a block number was expected"))?);
    }
    blocks.sort_unstable();
    let mut spans: Vec<(u64, u64)> = Vec::new();
    for b in blocks {
        match spans.last_mut() {
            Some((start, len)) if *start + *len == b => *len += 1,
            _ => spans.push((b, 1)),
        }
    }
    Ok(spans.into_iter().map(|(b, n)| (b * 4096, n * 4096)).collect())
}

/// A private (0700) scratch directory, removed when dropped: it holds secrets.
struct Scratch(PathBuf);

impl Scratch {
    fn new() -> Result<Scratch> {
        let base = std::env::temp_dir();
        for i in 0..1000u32 {
            let p = base.join(format!("kiln-provision-{}-{i}", std::process::id()));
            match fs::DirBuilder::new().mode(0o700).create(&p) {
                Ok(()) => return Ok(Scratch(p)),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(e).with_context(|| format!("creating {}", p.display())),
            }
        }
        bail!("could not create a scratch directory in {}", base.display())
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

fn make_dir(path: &Path, mode: u32) -> Result<()> {
    fs::DirBuilder::new().mode(mode).create(path).with_context(|| format!("creating {}", path.display()))?;
    // The umask may have taken bits away.
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
        .with_context(|| format!("setting the mode of {}", path.display()))
}

/// The entries of a directory, sorted, as (UTF-8 name, path).
fn list(dir: &Path) -> Result<Vec<(String, PathBuf)>> {
    let mut out = Vec::new();
    for e in fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let e = e.with_context(|| format!("reading {}", dir.display()))?;
        let name = e
            .file_name()
            .into_string()
            .map_err(|n| anyhow::anyhow!("{}: the name {n:?} is not UTF-8", dir.display()))?;
        out.push((name, e.path()));
    }
    out.sort();
    Ok(out)
}

fn walk(dir: &Path, rel: &Path, entries: &mut Vec<(PathBuf, Option<Vec<u8>>)>) -> Result<()> {
    for (name, path) in list(dir)? {
        let meta = fs::symlink_metadata(&path).with_context(|| format!("reading {}", path.display()))?;
        if meta.is_dir() {
            entries.push((rel.join(&name), None));
            walk(&path, &rel.join(&name), entries)?;
        } else {
            let data = read_regular(&path)?;
            entries.push((rel.join(&name), Some(data)));
        }
    }
    Ok(())
}

/// The largest provisioning file: keys, passwords and lists, never data.
const MAX_FILE: u64 = 1 << 20;

/// A provisioning file's bytes, read once through a descriptor opened without following a
/// link, and only if it is a regular file of at most [`MAX_FILE`] bytes.
fn read_regular(path: &Path) -> Result<Vec<u8>> {
    use kiln_device::fs::ReadError;
    kiln_device::fs::read_regular(path, MAX_FILE).map_err(|e| match e {
        ReadError::Link => {
            anyhow::anyhow!(
                "{}: a symbolic link; provisioning takes regular files only (copy the file itself)",
                path.display()
            )
        }
        ReadError::NotRegular => anyhow::anyhow!("{}: expected a regular file", path.display()),
        ReadError::TooBig(n) => anyhow::anyhow!(
            "{}: {n} bytes; provisioning files are keys, passwords and settings of at most 1 MiB",
            path.display()
        ),
        ReadError::Io(e) => anyhow::Error::new(e).context(format!("reading {}", path.display())),
    })
}

fn require_dir(path: &Path) -> Result<()> {
    let meta = fs::symlink_metadata(path).with_context(|| format!("reading {}", path.display()))?;
    if !meta.is_dir() {
        bail!("{}: expected a directory", path.display());
    }
    Ok(())
}

fn valid_user(name: &str) -> bool {
    let mut chars = name.chars();
    let first_ok = chars.next().is_some_and(|c| c.is_ascii_lowercase() || c == '_');
    first_ok && name.len() <= 32 && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-')
}

/// A static hostname: labels of letters, digits and '-', 1-63 characters each, not starting or
/// ending with '-', at most 64 characters in all (Linux's limit).
pub fn check_hostname(name: &str) -> std::result::Result<(), String> {
    let bad = || {
        format!("{name:?} is not a valid hostname (letters, digits and '-', dot-separated labels of 1-63 characters not starting or ending with '-', at most 64 in all)")
    };
    if name.is_empty() || name.len() > 64 {
        return Err(bad());
    }
    for label in name.split('.') {
        let ok = !label.is_empty()
            && label.len() <= 63
            && !label.starts_with('-')
            && !label.ends_with('-')
            && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-');
        if !ok {
            return Err(bad());
        }
    }
    Ok(())
}

/// Every non-empty, non-comment line must hold an OpenSSH public key (options before it are
/// allowed, as in authorized_keys); at least one key.
fn check_keys(path: &Path, data: &[u8]) -> Result<()> {
    let text = std::str::from_utf8(data)
        .map_err(|_| anyhow::anyhow!("{}: not UTF-8 text (expected OpenSSH public keys)", path.display()))?;
    let mut keys = 0;
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        check_key_line(line).map_err(|e| anyhow::anyhow!("{}:{}: {e}", path.display(), i + 1))?;
        keys += 1;
    }
    if keys == 0 {
        bail!("{}: holds no public key (expected lines like \"ssh-ed25519 AAAA… alice@laptop\")", path.display());
    }
    Ok(())
}

pub fn check_key_line(line: &str) -> std::result::Result<(), String> {
    if line.split_whitespace().any(|w| w == "ssh-dss") {
        return Err("ssh-dss (DSA) keys are refused by current OpenSSH: use an ssh-ed25519 key".into());
    }
    let words: Vec<&str> = line.split_whitespace().collect();
    for (i, w) in words.iter().enumerate() {
        if KEY_TYPES.contains(w) {
            let Some(blob) = words.get(i + 1).and_then(|b| kiln_device::base64::decode(b)) else {
                return Err(format!("the {w} key is not valid base64"));
            };
            // The blob starts with the key type as an SSH string (u32 length + bytes).
            let named = blob
                .get(..4)
                .map(|l| u32::from_be_bytes([l[0], l[1], l[2], l[3]]) as usize)
                .and_then(|n| blob.get(4..4 + n));
            if named != Some(w.as_bytes()) {
                return Err(format!("the key data does not hold a {w} key (a truncated or mixed-up line?)"));
            }
            // type string + the 32-byte key string
            if *w == "ssh-ed25519" && blob.len() != 4 + 11 + 4 + 32 {
                return Err(format!("the {w} key is truncated (its key data should be 32 bytes)"));
            }
            return Ok(());
        }
    }
    Err("not an OpenSSH public key (expected a line like \"ssh-ed25519 AAAA… alice@laptop\", as in ~/.ssh/id_ed25519.pub)".into())
}

/// backup/: the repository password must be there and not empty (the device's agent cannot
/// back up without it); backup/env must be KEY=VALUE lines restic reads.
fn check_backup(dir: &Path, entries: &[(PathBuf, Option<Vec<u8>>)]) -> Result<()> {
    let file = |name: &str| {
        entries.iter().find(|(p, _)| p == Path::new("backup").join(name).as_path()).and_then(|(_, d)| d.as_ref())
    };
    let password = dir.join("password");
    match file("password") {
        Some(d) if !d.is_empty() => {}
        Some(_) => bail!("{}: the restic repository password is empty", password.display()),
        None => bail!("{}: missing: backup/ needs the restic repository password (one line), and optionally env, repository, ssh_key, known_hosts", password.display()),
    }
    if let Some(d) = file("env") {
        let env = dir.join("env");
        let text = std::str::from_utf8(d).map_err(|_| anyhow::anyhow!("{}: not UTF-8 text", env.display()))?;
        kiln_device::parse_backup_env(text).map_err(|m| anyhow::anyhow!("{}: {m}", env.display()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A real ed25519 public key (ssh-keygen output).
    const KEY: &str = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIIRAsH7li64RmCN0q/zGOXUMEp4Klh2GpxkCXRuDH5DX alice@laptop";

    #[test]
    fn keys_are_checked() {
        assert_eq!(check_key_line(KEY), Ok(()));
        assert_eq!(check_key_line(&format!("no-pty,from=\"10.0.0.0/8\" {KEY}")), Ok(()));
        assert!(check_key_line("hello world").unwrap_err().starts_with("not an OpenSSH public key"));
        assert_eq!(
            check_key_line("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGxJ1nJ8Qv0bGz2jQ8g7").unwrap_err(),
            "the ssh-ed25519 key is truncated (its key data should be 32 bytes)"
        );
        assert_eq!(
            check_key_line("ssh-rsa AAAAC3NzaC1lZDI1NTE5AAAAIJdD7y3a x").unwrap_err(),
            "the key data does not hold a ssh-rsa key (a truncated or mixed-up line?)"
        );
        assert_eq!(check_key_line("ssh-ed25519 !!!").unwrap_err(), "the ssh-ed25519 key is not valid base64");
        assert!(check_key_line("ssh-dss AAAAB3NzaC1kc3M= x").unwrap_err().contains("DSA"));
    }

    #[test]
    fn hostnames_are_checked() {
        assert!(check_hostname("kiln-test").is_ok());
        assert!(check_hostname("pi.home.lan").is_ok());
        for bad in ["", "-a", "a-", "a_b", "a..b", &"x".repeat(65)] {
            assert!(check_hostname(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn layout_is_validated_with_the_file_named() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        fs::create_dir_all(d.join("ssh/authorized_keys")).unwrap();
        fs::write(d.join("ssh/authorized_keys/alice"), format!("# alice\n{KEY}\n")).unwrap();
        fs::create_dir_all(d.join("backup")).unwrap();
        fs::write(d.join("backup/password"), "s3cret\n").unwrap();
        fs::create_dir_all(d.join("wifi")).unwrap();
        fs::write(d.join("wifi/home.network"), "ssid=Home\npassphrase=correct horse\n").unwrap();
        fs::write(d.join("hostname"), "kiln-test\n").unwrap();
        let p = Provision::load(d).unwrap();
        let paths: Vec<String> = p.paths().map(|p| p.display().to_string()).collect();
        assert_eq!(
            paths,
            [
                "backup",
                "backup/password",
                "hostname",
                "ssh",
                "ssh/authorized_keys",
                "ssh/authorized_keys/alice",
                "wifi",
                "wifi/home.network"
            ]
        );
        assert_eq!(mode_for(Path::new("ssh/authorized_keys/alice"), false), 0o644);
        assert_eq!(mode_for(Path::new("ssh/authorized_keys"), true), 0o755);
        assert_eq!(mode_for(Path::new("ssh"), true), 0o755);
        assert_eq!(mode_for(Path::new("backup"), true), 0o700);
        assert_eq!(mode_for(Path::new("backup/password"), false), 0o600);
        assert_eq!(mode_for(Path::new("hostname"), false), 0o600);

        let err = |d: &Path| Provision::load(d).unwrap_err().to_string();
        fs::write(d.join("notes.txt"), "x").unwrap();
        assert_eq!(
            err(d),
            format!(
                "{}: unknown provisioning entry (known: ssh/authorized_keys/<user>, backup/, wifi/, hostname, device-id)",
                d.join("notes.txt").display()
            )
        );
        fs::remove_file(d.join("notes.txt")).unwrap();
        fs::write(d.join("hostname"), "bad_name\n").unwrap();
        assert!(
            err(d).starts_with(&format!("{}: \"bad_name\" is not a valid hostname", d.join("hostname").display())),
            "{}",
            err(d)
        );
        fs::write(d.join("hostname"), "ok\n").unwrap();
        fs::write(d.join("ssh/authorized_keys/Bob"), KEY).unwrap();
        assert!(err(d).contains("\"Bob\" is not a valid user name"), "{}", err(d));
        fs::remove_file(d.join("ssh/authorized_keys/Bob")).unwrap();
        fs::write(d.join("ssh/authorized_keys/bob"), "ssh-ed25519\n").unwrap();
        assert_eq!(
            err(d),
            format!("{}:1: the ssh-ed25519 key is not valid base64", d.join("ssh/authorized_keys/bob").display())
        );
        fs::remove_file(d.join("ssh/authorized_keys/bob")).unwrap();
        std::os::unix::fs::symlink("/etc/passwd", d.join("backup/env")).unwrap();
        assert!(
            err(d)
                .ends_with("backup/env: a symbolic link; provisioning takes regular files only (copy the file itself)"),
            "{}",
            err(d)
        );
        fs::remove_file(d.join("backup/env")).unwrap();
        fs::write(d.join("backup/env"), "RESTIC_REST_USERNAME=dev1\nrest_password=x\n").unwrap();
        assert!(err(d).ends_with("backup/env: line 2: \"rest_password\" is not an environment variable name (capital letters, digits, '_')"), "{}", err(d));
        fs::write(d.join("backup/env"), "RESTIC_REST_USERNAME=dev1\n").unwrap();
        fs::write(d.join("backup/password"), "").unwrap();
        assert!(err(d).ends_with("backup/password: the restic repository password is empty"), "{}", err(d));
        fs::remove_file(d.join("backup/password")).unwrap();
        assert!(
            err(d).contains("backup/password: missing: backup/ needs the restic repository password"),
            "{}",
            err(d)
        );
    }

    #[test]
    fn wifi_networks_are_checked_naming_file_and_line() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        fs::create_dir_all(d.join("wifi")).unwrap();
        fs::write(d.join("wifi/home.network"), "ssid=Home\n# WPA2\npassphrase=short\n").unwrap();
        let e = Provision::load(d).unwrap_err().to_string();
        assert_eq!(
            e,
            format!(
                "{}:3: passphrase: expected 8 to 63 printable ASCII characters (WPA), found 5 characters",
                d.join("wifi/home.network").display()
            )
        );
        fs::write(d.join("wifi/home.network"), "ssid=Home\npassphrase=long enough\n").unwrap();
        Provision::load(d).unwrap();
        fs::write(d.join("wifi/notes.txt"), "x").unwrap();
        let e = Provision::load(d).unwrap_err().to_string();
        assert!(e.ends_with("notes.txt: a Wi-Fi network file is named <name>.network (ssid=, passphrase= or sae_password= or open=true, hidden=, priority=)"), "{e}");
        fs::remove_file(d.join("wifi/notes.txt")).unwrap();
        fs::write(d.join("wifi/cafe.network"), "ssid=Cafe\n").unwrap();
        let e = Provision::load(d).unwrap_err().to_string();
        assert!(
            e.ends_with("cafe.network: no passphrase=, sae_password= or open=true: how the network is secured"),
            "{e}"
        );
    }

    #[test]
    fn what_was_checked_is_what_is_written() {
        // Issue 16 item 16: files were checked in load() and copied, following links, after
        // the prompt: a swap in between wrote anything (a symlink to /etc/shadow, say).
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        fs::create_dir_all(d.join("ssh/authorized_keys")).unwrap();
        fs::write(d.join("ssh/authorized_keys/alice"), format!("{KEY}\n")).unwrap();
        fs::write(d.join("hostname"), "kiln-test\n").unwrap();
        let p = Provision::load(d).unwrap();
        fs::remove_file(d.join("ssh/authorized_keys/alice")).unwrap();
        std::os::unix::fs::symlink("/etc/shadow", d.join("ssh/authorized_keys/alice")).unwrap();
        fs::write(d.join("hostname"), "evil\n").unwrap();
        let bytes = |rel: &str| p.entries.iter().find(|(r, _)| r == Path::new(rel)).unwrap().1.clone().unwrap();
        assert_eq!(bytes("ssh/authorized_keys/alice"), format!("{KEY}\n").into_bytes());
        assert_eq!(bytes("hostname"), b"kiln-test\n");
        // Oversized files and devices are refused at load.
        fs::write(d.join("hostname"), vec![b'a'; (MAX_FILE + 1) as usize]).unwrap();
        let e = Provision::load(d).unwrap_err().to_string();
        assert!(
            e.ends_with("1048577 bytes; provisioning files are keys, passwords and settings of at most 1 MiB"),
            "{e}"
        );
        fs::write(d.join("hostname"), "kiln-test\n").unwrap();
        let e = Provision::load(d).unwrap_err().to_string();
        assert!(
            e.ends_with("alice: a symbolic link; provisioning takes regular files only (copy the file itself)"),
            "{e}"
        );
    }
}
