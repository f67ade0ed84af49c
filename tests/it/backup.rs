//! Backups end to end, with real parts: a real restic REST server (Debian's restic-rest-server,
//! append-only, private repositories, a login per device) on 127.0.0.1, which the QEMU guest
//! reaches through a user-mode guestfwd (restrict=on); the image's restic driven by the real
//! agent; stock restic on the host reading the repository directly.
//!
//! Shows: the device backs up its service's state and a user's home; a restore drill passes;
//! the device's credentials cannot delete history (prune refused, snapshots still there); a
//! wrong password, a target that is down and a full target each give a clear error in the
//! status while the service keeps running; the data partition wiped and provisioned again,
//! the device restores itself at first boot before its service starts, byte for byte; and a
//! restore drill against a deliberately corrupted repository fails and raises an alert.

use crate::vm::Vm;
use crate::Need;
use crate::{kiln_ok, repo_root, text};
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

const BOOT: Duration = Duration::from_secs(600);
/// The guest's address for the backup server (QEMU user-mode network, relayed to the host).
const TARGET: &str = "10.0.2.100:80";
/// Where the guest finds the release feed.
const FEED: &str = "10.0.2.101:80";
const REST_USER: &str = "kiln-dev1";
const REST_PASSWORD: &str = "append-only-login";
const REPO_PASSWORD: &str = "correct horse battery staple";
/// Seconds between the device's looks at itself (the monitor; its heartbeat's period).
const MONITOR_INTERVAL: u64 = 30;

/// A stand-in for a service of your own: counts its starts in its state directory.
const NOTES: &str =
    "#!/bin/sh\nset -eu\necho \"start $(date +%s)\" >> \"$STATE_DIRECTORY/starts\"\nexec sleep infinity\n";

/// Debian's restic-rest-server for the host, from the same mirror the images come from
/// (trixie; bookworm has none), checked against the archive's index.
fn rest_server(tools: &Path) -> PathBuf {
    let bin = tools.join("usr/bin/restic-rest-server");
    if bin.exists() {
        return bin;
    }
    let mirror =
        kiln::debian::mirror::from_host(Path::new("/etc/apt")).expect("the host's apt sources name a Debian mirror");
    let arch = if cfg!(target_arch = "aarch64") { "arm64" } else { "amd64" };
    let index = kiln::debian::fetch_packages(&mirror.debian, "trixie", "main", arch).expect("trixie's package index");
    let entry = index.iter().find(|p| p.name == "restic-rest-server").expect("trixie has restic-rest-server");
    let fetcher = kiln::debian::Fetcher::new(kiln::debian::FetchConfig::default()).unwrap();
    let deb = fetcher.file(&format!("{}/{}", mirror.debian.trim_end_matches('/'), entry.filename), entry.size).unwrap();
    assert_eq!(
        kiln::units::Sha256::of(&deb).hex(),
        entry.sha256,
        "restic-rest-server .deb does not match the archive's index"
    );
    std::fs::create_dir_all(tools).unwrap();
    let file = tools.join("restic-rest-server.deb");
    std::fs::write(&file, &deb).unwrap();
    let st = Command::new("dpkg-deb").arg("-x").arg(&file).arg(tools).status().unwrap();
    assert!(st.success());
    bin
}

/// The backup server: restic-rest-server in append-only mode with private repositories and one
/// login (an htpasswd file; rest-server reads `{SHA}` entries besides bcrypt).
struct Server {
    child: Option<Child>,
    bin: PathBuf,
    data: PathBuf,
    port: u16,
}

impl Server {
    fn start(bin: &Path, data: &Path, port: u16, max_size: Option<u64>) -> Server {
        std::fs::create_dir_all(data).unwrap();
        let sha = htpasswd_sha(REST_PASSWORD);
        std::fs::write(data.join(".htpasswd"), format!("{REST_USER}:{{SHA}}{sha}\n")).unwrap();
        let mut cmd = Command::new(bin);
        cmd.arg("--path").arg(data).args([
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--append-only",
            "--private-repos",
        ]);
        if let Some(m) = max_size {
            cmd.args(["--max-size", &m.to_string()]);
        }
        let log = std::fs::OpenOptions::new().create(true).append(true).open(data.with_extension("log")).unwrap();
        let child = cmd.stdout(log.try_clone().unwrap()).stderr(log).spawn().expect("restic-rest-server starts");
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "restic-rest-server did not listen on {port}");
            std::thread::sleep(Duration::from_millis(100));
        }
        Server { child: Some(child), bin: bin.into(), data: data.into(), port }
    }

    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn restart(&mut self, max_size: Option<u64>) {
        self.stop();
        *self = Server::start(&self.bin.clone(), &self.data.clone(), self.port, max_size);
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The `{SHA}` form of an htpasswd entry: base64 of the password's SHA-1 (openssl on the host).
fn htpasswd_sha(password: &str) -> String {
    use std::io::Write;
    let mut c = Command::new("sh")
        .args(["-c", "openssl sha1 -binary | base64"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("openssl");
    c.stdin.take().unwrap().write_all(password.as_bytes()).unwrap();
    String::from_utf8_lossy(&c.wait_with_output().unwrap().stdout).trim().to_string()
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// Writes a fresh data file system holding `prov` into the image's data partition (what
/// `kiln flash --provision` writes to a device), after zeroing the whole partition.
fn provision(disk: &Path, prov: &Path) -> u64 {
    use std::io::{Seek, SeekFrom, Write};
    let mut f = std::fs::OpenOptions::new().read(true).write(true).open(disk).unwrap();
    let sectors = f.metadata().unwrap().len() / kiln::gpt::SECTOR;
    let table = kiln::gpt::GptTable::read(&mut f, sectors).unwrap();
    let data = table.partitions.iter().find(|p| p.name == "data").expect("a data partition");
    let (offset, size) = (data.first_lba * kiln::gpt::SECTOR, (data.last_lba + 1 - data.first_lba) * kiln::gpt::SECTOR);
    let zero = vec![0u8; 1 << 20];
    f.seek(SeekFrom::Start(offset)).unwrap();
    let mut left = size;
    while left > 0 {
        let n = left.min(zero.len() as u64) as usize;
        f.write_all(&zero[..n]).unwrap();
        left -= n as u64;
    }
    // As kiln flash --provision does: the device's backup identity is made once, kept in DIR.
    kiln::flash::provision::ensure_device_id(prov).unwrap();
    let fs = kiln::flash::provision::Provision::load(prov).unwrap().build(size).unwrap();
    let bytes = std::fs::read(&fs.image).unwrap();
    assert_eq!(bytes.len() as u64, size);
    f.seek(SeekFrom::Start(offset)).unwrap();
    f.write_all(&bytes).unwrap();
    f.sync_all().unwrap();
    size
}

/// Runs a shell command in the guest as the test's user; (success, stdout + stderr).
fn ssh(key: &Path, port: u16, cmd: &str) -> (bool, String) {
    let (ok, out, err) = ssh3(key, port, cmd);
    (ok, out + &err)
}

/// (success, stdout, stderr) of a command in the guest.
fn ssh3(key: &Path, port: u16, cmd: &str) -> (bool, String, String) {
    let out = Command::new("ssh")
        .args(["-i"])
        .arg(key)
        .args([
            "-p",
            &port.to_string(),
            "-o",
            "StrictHostKeyChecking=no",
            "-o",
            "UserKnownHostsFile=/dev/null",
            "-o",
            "ConnectTimeout=30",
        ])
        .args(["-o", "LogLevel=ERROR", "-o", "BatchMode=yes", "-o", "ServerAliveInterval=30", "tester@127.0.0.1", cmd])
        .output()
        .unwrap();
    (out.status.success(), text(&out.stdout), text(&out.stderr))
}

/// stdout of a command in the guest that must succeed (sshd's banner goes to stderr).
fn ssh_ok(key: &Path, port: u16, cmd: &str) -> String {
    let (ok, out, err) = ssh3(key, port, cmd);
    assert!(ok, "in the guest: {cmd}\n{out}{err}");
    out
}

/// The timers whose runs the test makes itself, at its own moments.
const STOP_TIMERS: &str = "sudo systemctl stop kiln-agent.timer kiln-backup.timer kiln-backup-drill.timer";

/// sha256 of every file of the backed-up data except the service's start counter, sorted.
const HASHES: &str = "sudo find /var/lib/private/notes /var/home/tester/papers -type f ! -name starts -print0 | sort -z | xargs -0 sudo sha256sum";

fn backup_status(key: &Path, port: u16) -> serde_json::Value {
    let (ok, out, err) = ssh3(key, port, "sudo kiln-agent backup status --json");
    assert!(ok, "{out}{err}");
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"))
}

fn host_restic(repo: &Path, args: &[&str]) -> std::process::Output {
    Command::new("restic")
        .arg("-r")
        .arg(repo)
        .args(args)
        .env("RESTIC_PASSWORD", REPO_PASSWORD)
        .output()
        .expect("restic on the host (kiln doctor --install)")
}

#[test]
fn backups_restore_themselves_resist_deletion_and_report_failures() {
    let Some(_timed) = crate::heavy_test(
        "backups_restore_themselves_resist_deletion_and_report_failures",
        &[Need::Root, Need::Tool("mmdebstrap"), Need::Tool("qemu-system-x86_64")],
    ) else {
        return;
    };
    let root = repo_root();
    let work = root.join("target/kiln-it-backup");
    let _scratch = crate::Scratch(work.clone());
    let reuse = std::env::var_os("KILN_IT_REUSE").is_some() && work.join("out/bk-pc-uefi/disk.img").exists();
    if !reuse {
        let _ = std::fs::remove_dir_all(&work);
    }
    let _ = std::fs::remove_dir_all(work.join("repo"));
    std::fs::create_dir_all(work.join("profiles/dist")).unwrap();
    let server_bin = rest_server(&root.join("target/kiln-it-tools"));
    let key = work.join("id_ed25519");
    if !key.exists() {
        let kg = Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "", "-C", "kiln-it", "-f"])
            .arg(&key)
            .status()
            .unwrap();
        assert!(kg.success());
    }
    let public = std::fs::read_to_string(work.join("id_ed25519.pub")).unwrap();
    std::fs::write(work.join("profiles/dist/notes"), NOTES).unwrap();
    std::fs::write(
        work.join("profiles/bk.toml"),
        format!(
            r#"extends = "minimal"
[users.tester]
ssh_keys = ["{}"]
groups = ["sudo"]

[services.notes]
binary = "dist/notes"
exec = "/usr/local/bin/notes"
state = true

[backup]
repository = "rest:http://{TARGET}/{REST_USER}"
# Keep one: the device's prune then has something to delete, which the server must refuse.
keep = {{ last = 1 }}
# Read all of it back in a drill: the test corrupts the repository on purpose.
check_subset = "100%"
retry = "30s"
alert_url = "http://{FEED}/alerts"

[update]
feed = "http://{FEED}/stable.atom"
public_key = "../keys/kiln-release.pub"

# The status feed PUT next to the release feed; a heartbeat while healthy. (Alerts go to
# [backup] alert_url above: a profile written before [monitor] keeps working.)
[monitor]
interval = "{MONITOR_INTERVAL}s"
push = "http://{FEED}/status/{{hostname}}.atom"
heartbeat_url = "http://{FEED}/hb"
"#,
            public.trim()
        ),
    )
    .unwrap();
    let dir = work.join("out/bk-pc-uefi");
    if !reuse {
        kiln_ok(&work, &["keygen", "--out", "keys"]);
        // Locked, so that the next release comes from the cached tree instead of a second
        // bootstrap (an unlocked build resolves again and cannot reuse one).
        let t = Instant::now();
        kiln_ok(&work, &["lock", "--profile", "profiles/bk.toml", "--out", "scratch"]);
        let lock = "profiles/bk.pc-uefi.lock";
        kiln_ok(&work, &["build", "--profile", "profiles/bk.toml", "--lock", lock, "--out", "out"]);
        println!("kiln-it: locked and built bk-pc-uefi in {:.1}s", t.elapsed().as_secs_f64());
        // The next release, for the backup before an update.
        let t = Instant::now();
        kiln_ok(
            &work,
            &["build", "--profile", "profiles/bk.toml", "--lock", lock, "--release", "0.2.0", "--out", "out-v2"],
        );
        println!("kiln-it: built release 0.2.0 from the cached tree in {:.1}s", t.elapsed().as_secs_f64());
    }
    let site = work.join("site");
    let _ = std::fs::remove_dir_all(&site);
    kiln_ok(
        &work,
        &[
            "publish",
            "out-v2/bk-pc-uefi",
            "--channel",
            "stable",
            "--to",
            "site",
            "--key",
            "keys/kiln-release.key",
            "--base-url",
            &format!("http://{FEED}/"),
        ],
    );
    crate::drop_outputs(&work.join("out-v2/bk-pc-uefi"), &["disk.img", "disk.img.bmap", "root.img", "kiln-0.2.0.efi"]);
    std::fs::write(site.join("hb"), "ok\n").unwrap();
    let feed = crate::httpd::Server::start(&site);
    let manifest: kiln::stages::manifest::Manifest =
        serde_json::from_str(&std::fs::read_to_string(dir.join("manifest.json")).unwrap()).unwrap();

    // The device's own secrets: the repository password and its login on the server.
    let prov = work.join("provision");
    let _ = std::fs::remove_dir_all(&prov);
    std::fs::create_dir_all(prov.join("backup")).unwrap();
    std::fs::write(prov.join("hostname"), "dev1\n").unwrap();
    std::fs::write(prov.join("backup/password"), format!("{REPO_PASSWORD}\n")).unwrap();
    std::fs::write(
        prov.join("backup/env"),
        format!("RESTIC_REST_USERNAME={REST_USER}\nRESTIC_REST_PASSWORD={REST_PASSWORD}\n"),
    )
    .unwrap();
    let disk = work.join("disk.img");
    // Sparse: the disk image is GiBs long and mostly holes.
    let cp = Command::new("cp").arg("--sparse=always").arg(dir.join("disk.img")).arg(&disk).status().unwrap();
    assert!(cp.success());
    crate::drop_outputs(&dir, &["disk.img", "disk.img.bmap"]);
    let data_size = provision(&disk, &prov);

    let port = free_port();
    let mut server = Server::start(&server_bin, &work.join("repo"), port, None);
    let repo = work.join("repo").join(REST_USER);
    let qemu = manifest.qemu.clone();
    let ssh_port = free_port();
    let log = work.join("console.log");

    // Boot 1: a fresh device with credentials and an empty repository.
    let t = Instant::now();
    let mut vm =
        Vm::start_with(&disk, &qemu, &[(TARGET, port), (FEED, feed.port())], Some(ssh_port), &log, &work.join("qemu"));
    let ready = vm.wait_for(&["KILN-READY", "KILN-NOT-READY"], BOOT);
    assert!(ready.contains("KILN-READY"), "{ready}\n{}", vm.tail());
    println!("kiln-it: boot 1 ready after {:.1}s", t.elapsed().as_secs_f64());
    // The test decides when the device checks for updates (release 0.2.0 is in the feed) and
    // when it backs up (a run near midnight UTC would meet the daily backup and its drill).
    ssh_ok(&key, ssh_port, STOP_TIMERS);
    let first = backup_status(&key, ssh_port);
    assert_eq!(first["self_restore"]["outcome"], "fresh", "an empty repository: nothing to restore: {first}");

    ssh_ok(
        &key,
        ssh_port,
        "set -e; sudo mkdir -p /var/lib/private/notes/docs; sudo sh -c 'head -c 3000000 /dev/urandom > /var/lib/private/notes/docs/big.bin; for i in $(seq 1 40); do echo note $i > /var/lib/private/notes/docs/n$i.txt; done; ln -sf docs/n1.txt /var/lib/private/notes/first'; \
         mkdir -p ~/papers; head -c 200000 /dev/urandom > ~/papers/p.bin; echo draft > ~/papers/draft.txt",
    );
    let t = Instant::now();
    let out = ssh_ok(&key, ssh_port, "sudo kiln-agent backup now");
    println!("kiln-it: first backup in {:.1}s: {}", t.elapsed().as_secs_f64(), out.trim());
    assert!(out.contains("kiln-agent: backup: snapshot"), "{out}");
    assert!(out.contains("notes.service stopped meanwhile"), "notes is quiesced (backup = \"stop\"): {out}");
    assert_eq!(ssh_ok(&key, ssh_port, "systemctl is-active notes").trim(), "active");

    let t = Instant::now();
    let out = ssh_ok(&key, ssh_port, "sudo kiln-agent backup drill");
    println!("kiln-it: restore drill in {:.1}s: {}", t.elapsed().as_secs_f64(), out.trim());
    assert!(out.contains("restore drill passed"), "{out}");

    // Append-only: the device cannot delete, and the history is still there.
    ssh_ok(&key, ssh_port, "echo second > ~/papers/second.txt; sudo kiln-agent backup now");
    let (ok, out) = ssh(&key, ssh_port, "sudo kiln-agent backup prune");
    println!("kiln-it: prune from the device: {}", out.trim());
    assert!(!ok && out.contains("append-only") && out.contains("Prune from a trusted machine"), "{out}");
    let snaps = host_restic(&repo, &["snapshots", "--json"]);
    assert!(snaps.status.success(), "stock restic on the host reads the repository: {}", text(&snaps.stderr));
    let list: Vec<serde_json::Value> = serde_json::from_slice(&snaps.stdout).unwrap();
    assert_eq!(list.len(), 2, "both snapshots survived the device's forget: {list:?}");
    // The snapshots are of the device's own identity (made at flash, kept with the
    // provisioning directory), never of a hostname another device may share.
    let device_id = std::fs::read_to_string(prov.join("device-id")).unwrap().trim().to_string();
    for s in &list {
        assert_eq!(s["hostname"], device_id.as_str(), "{s}");
        assert!(s["tags"].as_array().unwrap().iter().any(|t| t == "hostname=dev1"), "{s}");
    }

    // Failures: each one clear in the status, the service running throughout.
    let pw = "/var/kiln/provision/backup/password";
    let (ok, out) = ssh(&key, ssh_port, &format!("sudo cp {pw} {pw}.good; echo wrong | sudo tee {pw} >/dev/null; sudo kiln-agent backup now; r=$?; sudo mv {pw}.good {pw}; exit $r"));
    assert!(!ok && out.contains("wrong repository password"), "{out}");
    let s = backup_status(&key, ssh_port);
    assert!(s["last_backup"]["summary"].as_str().unwrap().contains("wrong repository password"), "{s}");
    assert!(s["alerts"].as_array().unwrap().iter().any(|a| a.as_str().unwrap().starts_with("backup failed")), "{s}");
    println!("kiln-it: wrong password: {}", s["last_backup"]["summary"]);
    let wrong_password = wait_post(&feed, "wrong repository password", Duration::from_secs(60));
    assert!(wrong_password.starts_with("dev1: ALERT: backup failed at"), "{wrong_password}");

    server.stop();
    let t = Instant::now();
    let (ok, out) = ssh(&key, ssh_port, "sudo kiln-agent backup now");
    assert!(!ok && out.contains("cannot reach the backup target"), "{out}");
    println!(
        "kiln-it: target down, failed in {:.1}s: {}",
        t.elapsed().as_secs_f64(),
        out.lines().last().unwrap_or_default()
    );

    let used: u64 = dir_size(&work.join("repo"));
    server.restart(Some(used + 64 * 1024));
    ssh_ok(&key, ssh_port, "sudo sh -c 'head -c 2000000 /dev/urandom > /var/lib/private/notes/docs/extra.bin'");
    let t = Instant::now();
    let (ok, out) = ssh(&key, ssh_port, "sudo kiln-agent backup now");
    assert!(!ok && out.contains("the backup target is full"), "{out}");
    println!(
        "kiln-it: target full, failed in {:.1}s: {}",
        t.elapsed().as_secs_f64(),
        out.lines().last().unwrap_or_default()
    );
    assert_eq!(ssh_ok(&key, ssh_port, "systemctl is-active notes").trim(), "active", "the service keeps running");
    server.restart(None);
    ssh_ok(&key, ssh_port, "sudo rm /var/lib/private/notes/docs/extra.bin");

    // The last good backup, and what it holds.
    let before = ssh3(&key, ssh_port, HASHES).1;
    let out = ssh_ok(&key, ssh_port, "sudo kiln-agent backup now");
    assert!(out.contains("kiln-agent: backup: snapshot"), "{out}");
    let s = backup_status(&key, ssh_port);
    assert!(s["alerts"].as_array().unwrap().is_empty(), "a good backup clears the alerts: {s}");
    let alerts = feed.posts();
    assert!(
        alerts.last().is_some_and(|(_, b)| b.starts_with("dev1: cleared: backup failed at")),
        "the good backup cleared the last failure: {alerts:?}"
    );
    // Three failures for three reasons: each raised once and cleared once.
    for reason in ["wrong repository password", "cannot reach the backup target", "the backup target is full"] {
        let raised = about(&feed, "ALERT: backup failed at", reason);
        let cleared = about(&feed, "cleared: backup failed at", reason);
        assert_eq!((raised, cleared), (1, 1), "{reason}: {alerts:#?}");
    }
    println!(
        "kiln-it: {} alert deliveries so far, the last: {:?}",
        alerts.len(),
        alerts.last().map(|(_, b)| b.lines().next().unwrap_or_default())
    );
    monitor_raises_and_clears(&key, ssh_port, &feed, &site);

    // A manual restore puts the snapshot back exactly: files made since are removed (a SQLite
    // -wal left next to a restored database corrupts it), changed ones restored, the service
    // stopped meanwhile and running again.
    let out = ssh_ok(
        &key,
        ssh_port,
        "sudo sh -c 'echo stale > /var/lib/private/notes/docs/n1.txt-wal; echo changed > /var/lib/private/notes/docs/n2.txt'; sudo kiln-agent backup restore",
    );
    assert!(out.contains("restored into place: /var/lib/private/notes"), "{out}");
    let check = ssh_ok(
        &key,
        ssh_port,
        "sudo test ! -e /var/lib/private/notes/docs/n1.txt-wal && echo gone; sudo cat /var/lib/private/notes/docs/n2.txt; systemctl is-active notes",
    );
    assert_eq!(check.split_whitespace().collect::<Vec<_>>(), ["gone", "note", "2", "active"], "{check}");
    assert_eq!(ssh3(&key, ssh_port, HASHES).1, before, "the restored data differs from the snapshot");
    println!("kiln-it: manual restore: {}", out.trim());

    // The repository disappears (an unmounted volume, a wrong address, someone in between):
    // the device says so and creates nothing (restic exit 10 is not "a fresh device").
    let away = work.join("repo-away");
    std::fs::rename(&repo, &away).unwrap();
    let (ok, out) = ssh(&key, ssh_port, "sudo kiln-agent backup now");
    let made = repo.exists();
    if made {
        std::fs::remove_dir_all(&repo).unwrap();
    }
    std::fs::rename(&away, &repo).unwrap();
    assert!(!ok && out.contains("which holds this device's backups") && out.contains("nothing was created"), "{out}");
    assert!(!made, "a new repository was created where the device's one disappeared");
    println!("kiln-it: repository gone: {}", out.lines().last().unwrap_or_default());

    // Stock restic on the host restores the same bytes.
    let host_dir = work.join("host-restore");
    let _ = std::fs::remove_dir_all(&host_dir);
    let r = host_restic(&repo, &["restore", "latest", "--target", host_dir.to_str().unwrap()]);
    assert!(r.status.success(), "{}", text(&r.stderr));
    let host_hashes = host_sha256(&host_dir, &before);
    assert_eq!(host_hashes, before, "host restore differs");
    // The session may end before ssh hears the command's status (sshd stops with the rest):
    // the guest's exit is what counts.
    let _ = ssh(&key, ssh_port, "sudo systemctl poweroff");
    vm.wait_exit(BOOT);

    // A fresh device: the data partition wiped and provisioned again.
    provision(&disk, &prov);
    println!("kiln-it: data partition ({} MiB) wiped and provisioned again", data_size >> 20);
    let t = Instant::now();
    let mut vm =
        Vm::start_with(&disk, &qemu, &[(TARGET, port), (FEED, feed.port())], Some(ssh_port), &log, &work.join("qemu"));
    let restored = vm.wait_for(&["kiln-agent: self-restore:"], BOOT);
    println!("kiln-it: {restored}");
    assert!(restored.contains("self-restore: restored"), "{restored}\n{}", vm.tail());
    let ready = vm.wait_for(&["KILN-READY", "KILN-NOT-READY"], BOOT);
    assert!(ready.contains("KILN-READY"), "{ready}\n{}", vm.tail());
    println!("kiln-it: boot 2 (self-restore) ready after {:.1}s", t.elapsed().as_secs_f64());
    // The test decides when the device checks for updates and backs up.
    ssh_ok(&key, ssh_port, STOP_TIMERS);
    let after = ssh3(&key, ssh_port, HASHES).1;
    let files = before.lines().count();
    assert!(files >= 43, "{before}");
    assert_eq!(after, before, "the restored data differs");
    println!(
        "kiln-it: {files} files byte-identical after the self-restore (sha256 of the list {})",
        kiln::units::Sha256::of(after.as_bytes()).hex()
    );
    let starts = ssh3(&key, ssh_port, "sudo cat /var/lib/private/notes/starts").1;
    assert!(
        starts.lines().count() >= 2,
        "the service started on its restored state (its earlier starts came back): {starts}"
    );

    // A corrupted repository: the drill must say so.
    let mut corrupted = 0;
    for pack in walk_files(&repo.join("data")) {
        let len = std::fs::metadata(&pack).unwrap().len();
        crate::flip_byte(&pack, len / 2);
        corrupted += 1;
    }
    let (ok, out) = ssh(&key, ssh_port, "sudo kiln-agent backup drill");
    assert!(!ok && out.contains("restore drill failed"), "{out}");
    let s = backup_status(&key, ssh_port);
    assert_eq!(s["last_drill"]["ok"], false, "{s}");
    assert!(
        s["alerts"].as_array().unwrap().iter().any(|a| a.as_str().unwrap().starts_with("restore drill failed")),
        "{s}"
    );
    println!(
        "kiln-it: drill on a corrupted repository ({corrupted} pack files with one byte flipped): {}",
        s["last_drill"]["summary"]
    );
    assert!(feed.posts().iter().any(|(_, b)| b.contains("restore drill failed")), "{:?}", feed.posts());
    assert_eq!(ssh_ok(&key, ssh_port, "systemctl is-active notes").trim(), "active");
    // Flipped back: the same bytes as before.
    for pack in walk_files(&repo.join("data")) {
        let len = std::fs::metadata(&pack).unwrap().len();
        crate::flip_byte(&pack, len / 2);
    }

    // Repaired: the next drill passes, and the alert is cleared.
    let out = ssh_ok(&key, ssh_port, "sudo kiln-agent backup drill");
    assert!(out.contains("restore drill passed"), "{out}");
    wait_post(&feed, "cleared: restore drill failed", Duration::from_secs(60));

    // A new release: no install without a backup first (before_update = "require").
    server.stop();
    let out = ssh_ok(&key, ssh_port, "sudo kiln-agent check --now --no-reboot");
    assert!(out.contains("release 0.2.0 waits: the backup before the update failed"), "{out}");
    println!("kiln-it: update with the target down: {}", out.lines().find(|l| l.contains("waits")).unwrap_or_default());
    server.restart(None);
    let t = Instant::now();
    let out = ssh_ok(&key, ssh_port, "sudo kiln-agent check --now --no-reboot");
    assert!(
        out.contains("kiln-agent: backup before the update: snapshot") && out.contains("installed 0.2.0 into slot b"),
        "{out}"
    );
    println!(
        "kiln-it: update with a backup first in {:.1}s: {}",
        t.elapsed().as_secs_f64(),
        out.lines().find(|l| l.contains("before the update")).unwrap_or_default()
    );
    let tagged = host_restic(&repo, &["snapshots", "--json", "--tag", "before-update"]);
    let tagged: Vec<serde_json::Value> = serde_json::from_slice(&tagged.stdout).unwrap();
    assert_eq!(tagged.len(), 1, "one snapshot tagged before-update: {tagged:?}");

    // Killed: its heartbeats stop, and `kiln status` on the owner's machine says it is silent.
    // Healthy (no alert open: the burst of failed logins was in the boot before), so it calls.
    let beats = || feed.requests().iter().filter(|r| r.path == "/hb").count();
    let t = Instant::now();
    let alive = beats();
    while beats() == alive {
        // A heartbeat follows each monitor look, which takes 13-60 s on a loaded host.
        assert!(t.elapsed() < Duration::from_secs(10 * MONITOR_INTERVAL), "no heartbeat from a healthy device");
        std::thread::sleep(Duration::from_secs(1));
    }
    let before_kill = beats();
    vm.kill();
    let killed = Instant::now();
    std::thread::sleep(Duration::from_secs(MONITOR_INTERVAL + 15));
    assert_eq!(beats(), before_kill, "no heartbeat from a device that is off");
    let url = format!("http://127.0.0.1:{}/status/dev1.atom", feed.port());
    let silent_after = format!("{MONITOR_INTERVAL}s");
    let st = crate::kiln(&work, &["status", &url, "--silent-after", &silent_after]);
    let table = text(&st.stdout);
    println!(
        "kiln-it: kiln status {:.0}s after the kill (exit {:?}):\n{table}",
        killed.elapsed().as_secs_f64(),
        st.status.code()
    );
    assert_eq!(st.status.code(), Some(1), "a silent device fails `kiln status`: {table}\n{}", text(&st.stderr));
    assert!(table.contains("dev1") && table.contains("SILENT"), "{table}");
}

/// Deliveries to `/alerts` whose text holds both `a` and `b`.
fn about(feed: &crate::httpd::Server, a: &str, b: &str) -> usize {
    feed.posts().iter().filter(|(p, t)| p == "/alerts" && t.contains(a) && t.contains(b)).count()
}

/// Waits for an alert holding `what` while the device looks at itself every few seconds.
fn wait_post(feed: &crate::httpd::Server, what: &str, timeout: Duration) -> String {
    crate::agent::wait_post(feed, what, timeout)
}

/// The monitor, in the running guest: /var filled past the alert threshold, a service
/// crash-looping, time synchronisation stopped, a certificate about to expire and a burst of
/// failed logins, all at once: each raises exactly one alert at the webhook and clears it once
/// fixed; then the pushed status feed is read back through a real feed
/// parser and as JSON, and the heartbeat was fetched.
fn monitor_raises_and_clears(key: &Path, port: u16, feed: &crate::httpd::Server, site: &Path) {
    let look = || ssh_ok(key, port, "sudo kiln-agent monitor");
    // Looks until each alert of `whats` was delivered; the seconds from `since` to each.
    let until = |whats: &[&str], since: Instant| -> Vec<f64> {
        let mut at = Vec::new();
        for what in whats {
            let t = Instant::now();
            while !feed.posts().iter().any(|(p, b)| p == "/alerts" && b.contains(what)) {
                assert!(t.elapsed() < Duration::from_secs(180), "no alert {what:?}: {:#?}", feed.posts());
                look();
                std::thread::sleep(Duration::from_secs(3));
            }
            at.push(since.elapsed().as_secs_f64());
        }
        at
    };
    let once = |whats: &[&str]| {
        // A few more looks: still one delivery each (one event per change, not per look).
        look();
        look();
        for what in whats {
            let n = feed.posts().iter().filter(|(p, b)| p == "/alerts" && b.contains(what)).count();
            assert_eq!(n, 1, "{what:?} delivered {n} times: {:#?}", feed.posts());
        }
    };
    let t = Instant::now();
    let st = ssh_ok(key, port, "systemctl is-active systemd-timesyncd; df --output=pcent /var | tail -1");
    println!("kiln-it: monitor: before: timesyncd {}", st.split_whitespace().collect::<Vec<_>>().join(", /var "));

    // Five things go wrong at once (as they do on a neglected device); each must raise its
    // own alert, once, and each fix must clear its own.
    // /var past 95 %: fallocate as much as takes it to 96 % of what users may use.
    let fill = "set -e; u=$(df -B1 --output=used /var | tail -1); a=$(df -B1 --output=avail /var | tail -1); \
                sudo fallocate -l $(( (u + a) * 96 / 100 - u )) /var/kiln-it-fill; df --output=pcent /var | tail -1";
    let pct = ssh_ok(key, port, fill);
    // A service that keeps crashing (restarted every second, no start limit).
    ssh_ok(
        key,
        port,
        "sudo systemd-run --quiet --unit=kiln-it-crashy -p Restart=always -p RestartSec=1 -p StartLimitIntervalSec=0 /bin/sh -c \"sleep 1; exit 3\"",
    );
    // Time synchronisation switched off.
    ssh_ok(key, port, "sudo systemctl stop systemd-timesyncd");
    // A certificate caddy would manage that expires in 3 days (made on the host, placed where
    // caddy keeps them).
    let dir = std::env::temp_dir().join(format!("kiln-it-cert-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let made = Command::new("openssl")
        .args(["req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-days", "3"])
        .args(["-subj", "/CN=kiln-it.example", "-keyout"])
        .arg(dir.join("key.pem"))
        .arg("-out")
        .arg(dir.join("cert.pem"))
        .output()
        .expect("openssl (kiln doctor --install installs it)");
    assert!(made.status.success(), "{}", text(&made.stderr));
    let pem = std::fs::read_to_string(dir.join("cert.pem")).unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    let certs = "/var/lib/caddy/caddy/certificates/acme-v02.api.letsencrypt.org-directory/kiln-it.example";
    let lines: Vec<String> = pem.lines().map(|l| format!("echo \"{l}\"")).collect();
    ssh_ok(
        key,
        port,
        &format!(
            "sudo mkdir -p {certs}; {{ {}; }} | sudo tee {certs}/kiln-it.example.crt >/dev/null",
            lines.join("; ")
        ),
    );
    // A burst of failed logins (a user that does not exist, 12 times).
    for _ in 0..12 {
        let _ = Command::new("ssh")
            .args(["-p", &port.to_string(), "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=no"])
            .args(["-o", "UserKnownHostsFile=/dev/null", "-o", "LogLevel=ERROR", "-o", "ConnectTimeout=20"])
            .arg("-i")
            .arg(key)
            .args(["nosuchuser@127.0.0.1", "true"])
            .output();
    }
    let broken = Instant::now();
    let raised = [
        "ALERT: /var is",
        "ALERT: kiln-it-crashy.service is crash-looping",
        "warning: time synchronisation is off",
        "ALERT: the TLS certificate of kiln-it.example expires in ",
        "failed logins and sudo denials in the last 10 min",
    ];
    let when = until(&raised, broken);
    once(&raised);
    // 2 days and some hours left, or 3 when the guest's clock is a second behind the host's.
    let said = feed.posts().into_iter().map(|(_, b)| b).find(|b| b.contains("kiln-it.example expires in")).unwrap();
    assert!(said.contains("expires in 2 day(s)") || said.contains("expires in 3 day(s)"), "{said}");
    let burst = wait_post(feed, "failed logins and sudo denials", Duration::from_secs(1));
    assert!(burst.contains("from 10.0.2.2"), "{burst}");

    // Fixed: each clears (the burst of failed logins counts for 10 minutes and stays open).
    ssh_ok(
        key,
        port,
        "sudo rm /var/kiln-it-fill; sudo systemctl stop kiln-it-crashy; \
         sudo systemctl reset-failed kiln-it-crashy 2>/dev/null || true; \
         sudo systemctl start systemd-timesyncd; sudo rm -r /var/lib/caddy",
    );
    let fixed = Instant::now();
    let cleared = [
        "cleared: /var is",
        "cleared: kiln-it-crashy.service is crash-looping",
        "cleared: time synchronisation is off",
        "cleared: the TLS certificate of kiln-it.example",
    ];
    let after = until(&cleared, fixed);
    let what = [
        "/var at ".to_string() + pct.trim(),
        "crash loop".into(),
        "time sync off".into(),
        "certificate expiring in 3 days".into(),
    ];
    for (i, w) in what.iter().enumerate() {
        println!("kiln-it: monitor: {w} raised within {:.1}s, cleared within {:.1}s of the fix", when[i], after[i]);
    }
    println!(
        "kiln-it: monitor: 12 failed logins raised within {:.1}s: {}",
        when[4],
        burst.lines().next().unwrap_or_default()
    );

    // The pushed feed: Atom through a real feed parser, the JSON twin as kiln reads it.
    look();
    let atom = site.join("status/dev1.atom");
    let check = Command::new(repo_root().join("scripts/feed-validate")).arg(&atom).output().unwrap();
    assert!(
        check.status.success(),
        "feedparser rejected {}:\n{}\n{}",
        atom.display(),
        text(&check.stdout),
        text(&check.stderr)
    );
    let f =
        kiln_feed::status::StatusFeed::parse(&std::fs::read_to_string(site.join("status/dev1.json")).unwrap()).unwrap();
    assert_eq!(f.device.hostname, "dev1");
    let open: Vec<&str> = f.open.iter().map(|e| e.key.as_str()).collect();
    assert_eq!(open, ["logins:failed"], "everything else was fixed (the burst counts for 10 minutes)");
    let titles: Vec<String> = f.events.iter().map(|e| e.headline()).collect();
    let logins = titles.iter().filter(|t| t.contains("logged in over SSH")).count();
    assert_eq!(logins, 1, "the test's many SSH logins are one entry an hour: {titles:#?}");
    for want in [
        "ALERT: /var is",
        "cleared: /var is",
        "crash-looping",
        "time synchronisation is off",
        "backup failed",
        "logged in over SSH",
    ] {
        assert!(titles.iter().any(|t| t.contains(want)), "{want:?} not in the feed: {titles:#?}");
    }
    assert!(
        f.samples.iter().any(|s| s.data_used_percent >= 95.0),
        "the fill is in the chart's samples: {:?}",
        f.samples
    );
    let beats = feed.requests().iter().filter(|r| r.path == "/hb").count();
    assert!(beats > 0, "the heartbeat was fetched");
    println!(
        "kiln-it: monitor: pushed feed: {} entries, {} samples, feedparser: {}; {beats} heartbeats; checks took {:.1}s",
        f.events.len(),
        f.samples.len(),
        text(&check.stdout).trim().replace('\n', " | "),
        t.elapsed().as_secs_f64()
    );
    let cost = ssh_ok(key, port, "sudo kiln-agent monitor --stats");
    println!("kiln-it: monitor: one look in the guest: {}", cost.trim());
    let status = ssh_ok(key, port, "sudo kiln-agent status | grep -E '^(monitor|open|delivery):' || true");
    println!("kiln-it: monitor: kiln-agent status: {}", status.trim().replace('\n', " | "));
}

fn dir_size(p: &Path) -> u64 {
    walk_files(p).iter().map(|f| std::fs::metadata(f).map(|m| m.len()).unwrap_or(0)).sum()
}

fn walk_files(p: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Ok(rd) = std::fs::read_dir(p) {
        for e in rd.flatten() {
            let path = e.path();
            if path.is_dir() {
                out.extend(walk_files(&path));
            } else {
                out.push(path);
            }
        }
    }
    out
}

/// The guest's `sha256sum` lines, computed over the host's restore of the same paths.
fn host_sha256(restored: &Path, guest: &str) -> String {
    let mut lines = Vec::new();
    for l in guest.lines() {
        let (_, path) = l.split_once("  ").unwrap();
        let data = std::fs::read(restored.join(path.trim_start_matches('/'))).unwrap_or_default();
        lines.push(format!("{}  {path}", kiln::units::Sha256::of(&data).hex()));
    }
    lines.join("\n") + "\n"
}
