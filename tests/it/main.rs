//! kiln's integration tests: one binary, testing behaviour through the `kiln` command line.
//!
//! `arm64`: the Raspberry Pi 4 image built on this x86-64 host (four locked releases, the arm64
//! agent cross-built by kiln) and updating itself over the air on QEMU's `virt` machine, kiln
//! playing the firmware's tryboot across resets.
//! `golden`: profile errors against expected output (re-bless with KILN_BLESS=1).
//! `cli`: plan and inspect behaviour that needs no build.
//! `flash`: `kiln flash` against loop devices: writing, verifying, refusing the wrong device,
//! provisioning.
//! `image`: the real thing: an mmdebstrap build of the minimal image, its partition table,
//! dm-verity, and QEMU boots (healthy, and failing on a flipped byte in the root).
//! `agent`: over-the-air updates end to end: keygen, publish, a feed on 127.0.0.1, the agent in
//! QEMU installing, committing, rolling back, refusing bad releases, surviving power cuts.
//! `backup`: restic backups end to end: a real restic-rest-server (append-only) on 127.0.0.1, the
//! device in QEMU backing up, drilling, refused deletes and failures, self-restore after its
//! data partition is wiped, a drill against a corrupted repository.
//! `status`: `kiln status` reading device status feeds over loopback HTTP and from a directory
//! (table, JSON, exit codes, a release feed), and its HTML page rendered by headless chromium.
//! `initramfs`: the initramfs built natively from a target tree, booted under QEMU (healthy,
//! flipped byte, wrong root hash).
//!
//! Two tiers: as an ordinary user without QEMU, `cargo test --workspace` runs the fast tests
//! (cli, golden, every crate's unit tests) and skips the heavy ones, naming what they need
//! ([`host_can_run`]); `scripts/test` runs everything as root and fails instead of skipping.
//! Heavy tests take turns, longest first ([`HEAVY_ORDER`]).

mod agent;
mod arm64;
mod backup;
mod cli;
mod dist;
mod flash;
mod golden;
mod httpd;
mod image;
mod initramfs;
mod repro;
mod services;
mod status;
mod vm;

/// What a heavy test needs from the host.
pub enum Need {
    /// mmdebstrap --mode=root, loop devices, mounts.
    Root,
    /// A program on PATH.
    Tool(&'static str),
}

/// The variable `scripts/test` sets: there, a test that would be skipped fails instead.
pub const REQUIRE_ALL: &str = "KILN_TEST_REQUIRE_ALL";

/// Whether this host can run `test`. The fast tier (`cargo test --workspace` as an ordinary
/// user, without QEMU) skips the heavy tests and says so on stderr; `scripts/test` (root, every
/// tool installed by `kiln doctor --install`) sets [`REQUIRE_ALL`], and there a missing need
/// fails the test: nothing is ever skipped in CI.
pub fn host_can_run(test: &str, needs: &[Need]) -> bool {
    let missing: Vec<String> = needs
        .iter()
        .filter_map(|n| match n {
            Need::Root if !nix::unistd::geteuid().is_root() => {
                Some("root (mmdebstrap --mode=root, loop devices)".into())
            }
            Need::Tool(t) if !on_path(t) => Some(format!("`{t}` on PATH")),
            _ => None,
        })
        .collect();
    if missing.is_empty() {
        return true;
    }
    let why = missing.join(", ");
    if std::env::var_os(REQUIRE_ALL).is_some() {
        let tools = needs.iter().any(|n| matches!(n, Need::Tool(t) if !on_path(t)));
        let fix = if tools { "; run `kiln doctor --install`, which installs every tool the tests need" } else { "" };
        panic!("{test} would be skipped: it needs {why}; {REQUIRE_ALL} is set (scripts/test never skips a test){fix}");
    }
    // Written past libtest's output capture (which takes only the print macros), so a skip is
    // always seen.
    let _ = writeln!(std::io::stderr(), "kiln-it: skipped {test}: needs {why}; `sudo scripts/test` runs it");
    false
}

/// [`host_can_run`] for a heavy test, then its turn (see [`HEAVY_ORDER`]), with a guard that
/// holds the turn and prints how long the test took (in every run, so a CI log shows where its
/// time goes).
pub fn heavy_test(test: &'static str, needs: &[Need]) -> Option<Timed> {
    if !host_can_run(test, needs) {
        return None;
    }
    let rank = HEAVY_ORDER.iter().position(|t| *t == test).unwrap_or(HEAVY_ORDER.len());
    let at_once = std::env::var("KILN_IT_HEAVY").ok().and_then(|v| v.parse().ok()).unwrap_or(2usize).max(1);
    GATE.enter(rank, at_once);
    let _ = writeln!(std::io::stderr(), "kiln-it: {test} starts at +{:.0}s", started().elapsed().as_secs_f64());
    Some(Timed(test, std::time::Instant::now()))
}

/// The order in which heavy tests get their turn, longest first (their times in the last CI
/// run, NOTES.md): the two longest start at once, and the run does not end with one long test
/// alone on one of the two cores (it did: the services test, ~230 s). `scripts/test` starts
/// every test of this binary at once (`--test-threads` above the number of tests); at most
/// `KILN_IT_HEAVY` (2) heavy tests run together, the others wait here in this order. A test
/// not named here goes last; with fewer test threads libtest's own order decides who waits.
pub const HEAVY_ORDER: &[&str] = &[
    "ota_updates_commit_roll_back_refuse_and_survive_power_cuts",
    "rpi4_image_builds_boots_and_updates_itself",
    "backups_restore_themselves_resist_deletion_and_report_failures",
    "services_are_sandboxed_gated_and_only_declared_ports_listen",
    "locked_builds_are_bit_identical_and_refuse_tampered_debs",
    "release_archives_install_and_run_from_an_empty_prefix",
    "minimal_image_builds_verifies_and_boots",
    "native_initramfs_opens_the_verified_root_and_boots_systemd",
    "status_page_renders_in_a_browser",
];

static GATE: Gate = Gate::new();

/// How long the first heavy test to arrive keeps every turn closed, so that the tests libtest
/// starts at the same moment are all waiting before the first turn is given: without it the
/// first two threads the scheduler happened to run took the turns (a run began with the backup
/// and release tests, and the Pi test, the longest, started 15 minutes late).
pub const SETTLE: std::time::Duration = std::time::Duration::from_secs(2);

impl Default for Gate {
    fn default() -> Self {
        Self::new()
    }
}

/// Turns for the heavy tests: at most `at_once` hold one; a free turn goes to the waiting test
/// of the lowest rank, once [`SETTLE`] has passed since the first test arrived.
pub struct Gate {
    state: std::sync::Mutex<GateState>,
    changed: std::sync::Condvar,
}

struct GateState {
    holding: usize,
    waiting: Vec<usize>,
    opens: Option<std::time::Instant>,
}

impl Gate {
    pub const fn new() -> Self {
        Gate {
            state: std::sync::Mutex::new(GateState { holding: 0, waiting: Vec::new(), opens: None }),
            changed: std::sync::Condvar::new(),
        }
    }

    pub fn enter(&self, rank: usize, at_once: usize) {
        self.enter_after(rank, at_once, SETTLE)
    }

    fn enter_after(&self, rank: usize, at_once: usize, settle: std::time::Duration) {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let opens = *s.opens.get_or_insert_with(|| std::time::Instant::now() + settle);
        s.waiting.push(rank);
        loop {
            let now = std::time::Instant::now();
            if now < opens {
                s = self.changed.wait_timeout(s, opens - now).unwrap_or_else(|e| e.into_inner()).0;
                continue;
            }
            if s.holding < at_once && s.waiting.iter().min() == Some(&rank) {
                break;
            }
            s = self.changed.wait(s).unwrap_or_else(|e| e.into_inner());
        }
        let i = s.waiting.iter().position(|r| *r == rank).expect("a waiting rank");
        s.waiting.swap_remove(i);
        s.holding += 1;
        self.changed.notify_all();
    }

    pub fn leave(&self) {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        s.holding = s.holding.saturating_sub(1);
        self.changed.notify_all();
    }

    pub fn waiting(&self) -> usize {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).waiting.len()
    }
}

/// When the test binary's first heavy test started.
fn started() -> std::time::Instant {
    static START: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    *START.get_or_init(std::time::Instant::now)
}

/// Prints a heavy test's time when it ends, passed or failed, and gives its turn back.
pub struct Timed(&'static str, std::time::Instant);

impl Drop for Timed {
    fn drop(&mut self) {
        let how = if std::thread::panicking() { "failed" } else { "passed" };
        let _ = writeln!(
            std::io::stderr(),
            "kiln-it: {} {how} in {:.0}s (at +{:.0}s)",
            self.0,
            self.1.elapsed().as_secs_f64(),
            started().elapsed().as_secs_f64()
        );
        GATE.leave();
    }
}

#[test]
fn heavy_tests_take_their_turns_in_rank_order() {
    let gate = std::sync::Arc::new(Gate::new());
    gate.enter_after(0, 1, std::time::Duration::ZERO);
    let order = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let waiters: Vec<_> = [3, 1, 2]
        .into_iter()
        .map(|rank| {
            let (gate, order) = (gate.clone(), order.clone());
            std::thread::spawn(move || {
                gate.enter_after(rank, 1, std::time::Duration::ZERO);
                order.lock().unwrap().push(rank);
                gate.leave();
            })
        })
        .collect();
    while gate.waiting() < 3 {
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    assert!(order.lock().unwrap().is_empty(), "a turn was taken while the only one was held");
    gate.leave();
    for w in waiters {
        w.join().unwrap();
    }
    assert_eq!(*order.lock().unwrap(), vec![1, 2, 3]);
}

/// Tests that arrive together, in any order, get their turns by rank: the first to arrive does
/// not take a turn before the others are waiting.
#[test]
fn tests_arriving_together_take_turns_by_rank_not_by_arrival() {
    let gate = std::sync::Arc::new(Gate::new());
    let order = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let settle = std::time::Duration::from_secs(3);
    let mut arrivals = Vec::new();
    for rank in [4, 3, 0, 2, 1] {
        let (gate, order) = (gate.clone(), order.clone());
        arrivals.push(std::thread::spawn(move || {
            gate.enter_after(rank, 2, settle);
            order.lock().unwrap().push(rank);
            std::thread::sleep(std::time::Duration::from_millis(20));
            gate.leave();
        }));
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    for a in arrivals {
        a.join().unwrap();
    }
    let order = order.lock().unwrap().clone();
    let mut first_two = order[..2].to_vec();
    first_two.sort();
    assert_eq!(first_two, vec![0, 1], "the two lowest ranks start first: {order:?}");
    assert_eq!(order.len(), 5);
}

fn on_path(program: &str) -> bool {
    let path = std::env::var_os("PATH").unwrap_or_default();
    // Tools in /usr/sbin are on root's PATH but not always on an ordinary user's.
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin"].map(PathBuf::from))
        .any(|d| std::fs::metadata(d.join(program)).map(|m| m.is_file()).unwrap_or(false))
}

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub fn kiln_bin() -> &'static str {
    env!("CARGO_BIN_EXE_kiln")
}

pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("builder/ has a parent").to_path_buf()
}

/// A heavy test's directory under `target/`, removed when the test passes: the whole suite
/// would otherwise keep ~20 GB of images until the next run, more than a CI machine may have.
/// Kept after a failure (to look at), and always with `KILN_IT_REUSE` or `KILN_IT_KEEP` set.
pub struct Scratch(pub PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let keep = std::env::var_os("KILN_IT_REUSE").is_some() || std::env::var_os("KILN_IT_KEEP").is_some();
        if !std::thread::panicking() && !keep {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

/// Removes build outputs a test no longer needs (a disk image is ~200 MB on disk), unless
/// `KILN_IT_REUSE` keeps builds for the next run.
pub fn drop_outputs(dir: &Path, files: &[&str]) {
    if std::env::var_os("KILN_IT_REUSE").is_some() {
        return;
    }
    for f in files {
        let _ = std::fs::remove_file(dir.join(f));
    }
}

/// Runs kiln with `args` in `cwd`, with a fixed mirror so no test depends on the host's apt.
pub fn kiln(cwd: &Path, args: &[&str]) -> Output {
    Command::new(kiln_bin()).args(args).current_dir(cwd).output().expect("kiln runs")
}

/// Runs kiln in `work` with a cache of its own (`work/cache`), so a test's builds and trees
/// do not depend on another test's.
pub fn kiln_in(work: &Path, args: &[&str]) -> Output {
    Command::new(kiln_bin())
        .args(args)
        .current_dir(work)
        .env("KILN_CACHE", work.join("cache"))
        .output()
        .expect("kiln runs")
}

/// [`kiln_in`] that must succeed; returns stdout and stderr.
pub fn kiln_ok(work: &Path, args: &[&str]) -> String {
    let out = kiln_in(work, args);
    assert!(out.status.success(), "kiln {} failed:\n{}\n{}", args.join(" "), text(&out.stdout), text(&out.stderr));
    text(&out.stdout) + &text(&out.stderr)
}

pub fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Inverts one byte of a file in place (to corrupt a root image on purpose).
pub fn flip_byte(path: &Path, at: u64) {
    let mut f = std::fs::OpenOptions::new().read(true).write(true).open(path).unwrap();
    let mut b = [0u8; 1];
    std::io::Seek::seek(&mut f, std::io::SeekFrom::Start(at)).unwrap();
    std::io::Read::read_exact(&mut f, &mut b).unwrap();
    b[0] ^= 0xff;
    std::io::Seek::seek(&mut f, std::io::SeekFrom::Start(at)).unwrap();
    std::io::Write::write_all(&mut f, &b).unwrap();
}

/// An ordinary user for the rootless tests (`kiln-it`, made once with a home and a subordinate
/// id range, as `useradd` gives every new user on Debian), and a directory of its own under
/// /tmp holding copies of kiln and kiln-agent: the checkout may sit in a directory only root can
/// enter (/root), and a user must run kiln from where it can read it.
pub struct Unprivileged {
    pub name: &'static str,
    pub uid: u32,
    /// Owned by the user; holds `bin/kiln`, `bin/kiln-agent`; removed on drop unless kept.
    pub dir: PathBuf,
}

impl Unprivileged {
    pub fn new(label: &str) -> Unprivileged {
        // Several tests may ask at once (--test-threads): one makes the user, the other waits.
        static MAKING: std::sync::Mutex<()> = std::sync::Mutex::new(());
        let _one = MAKING.lock().unwrap_or_else(|e| e.into_inner());
        let name = "kiln-it";
        if nix::unistd::User::from_name(name).unwrap().is_none() {
            let out = Command::new("useradd").args(["--create-home", "--shell", "/bin/sh", name]).output().unwrap();
            assert!(out.status.success(), "useradd {name}: {}", text(&out.stderr));
        }
        let user = nix::unistd::User::from_name(name).unwrap().expect("the test user exists");
        let (subuid, subgid) = (
            std::fs::read_to_string("/etc/subuid").unwrap_or_default(),
            std::fs::read_to_string("/etc/subgid").unwrap_or_default(),
        );
        // Debian's useradd gives a new user a range; where it did not, a free one.
        let start = kiln::host::doctor::free_subid_start(&subuid, &subgid);
        let range = format!("{start}-{}", start + 65535);
        for (ranges, flag) in [(&subuid, "--add-subuids"), (&subgid, "--add-subgids")] {
            if !ranges.lines().any(|l| l.starts_with(&format!("{name}:"))) {
                let out = Command::new("usermod").args([flag, &range, name]).output().unwrap();
                assert!(out.status.success(), "usermod {flag} {name}: {}", text(&out.stderr));
            }
        }
        // A fresh directory no one else could have prepared (/tmp is shared).
        let dir = tempfile::Builder::new()
            .prefix(&format!("kiln-it-{label}-"))
            .tempdir_in(std::env::temp_dir())
            .unwrap()
            .keep();
        std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
        std::fs::create_dir_all(dir.join("bin")).unwrap();
        let exe = Path::new(kiln_bin());
        for b in ["kiln", "kiln-agent"] {
            std::fs::copy(exe.with_file_name(b), dir.join("bin").join(b))
                .unwrap_or_else(|e| panic!("copying {b} next to kiln ({e}): `cargo build --workspace --bins` first"));
        }
        let me = Unprivileged { name, uid: user.uid.as_raw(), dir };
        me.chown(&me.dir);
        me
    }

    /// Gives `path` (recursively) to the user.
    pub fn chown(&self, path: &Path) {
        let out = Command::new("chown").arg("-R").arg(format!("{0}:{0}", self.name)).arg(path).output().unwrap();
        assert!(out.status.success(), "chown {}: {}", path.display(), text(&out.stderr));
    }

    /// Runs the user's copy of kiln in `cwd` with a login's environment (its PATH has no
    /// /usr/sbin) and the cache `cache`.
    pub fn kiln(&self, cwd: &Path, cache: &Path, args: &[&str]) -> Output {
        Command::new("runuser")
            .args(["-u", self.name, "--", "env", "-i", "PATH=/usr/local/bin:/usr/bin:/bin", "LANG=C.UTF-8"])
            .arg(format!("HOME={}", self.dir.display()))
            .arg(format!("KILN_CACHE={}", cache.display()))
            .arg(self.dir.join("bin/kiln"))
            .args(args)
            .current_dir(cwd)
            .output()
            .expect("runuser runs")
    }
}

impl Drop for Unprivileged {
    fn drop(&mut self) {
        let keep = std::env::var_os("KILN_IT_KEEP").is_some();
        if !std::thread::panicking() && !keep {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}
