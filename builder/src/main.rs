//! The `kiln` command line.

use anyhow::{bail, Context as _, Result};
use clap::{Parser, Subcommand};
use kiln::boot::qemu;
use kiln::config::{image, plan, profile};
use kiln::debian::mirror;
use kiln::host::{doctor, tools};
use kiln::release::inspect;
use kiln::{build, stages};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

/// Bake hardened, reproducible, auto-updating appliance OS images from TOML profiles.
#[derive(Parser)]
#[command(name = "kiln", version, about, long_about = None, propagate_version = true)]
struct Cli {
    /// Print every external command before it runs, and its output.
    #[arg(long, global = true)]
    debug: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Args, Clone)]
struct Target {
    /// Profile: a name (profiles/NAME.toml or built-in) or a path to a .toml file.
    #[arg(long, short, default_value = "minimal")]
    profile: String,
    /// Image (board): a name (images/NAME.toml or built-in) or a path.
    #[arg(long, short, default_value = "pc-uefi")]
    image: String,
    /// Debian mirror URI (default: the profile's system.mirror, else the host's apt sources).
    #[arg(long)]
    mirror: Option<String>,
    /// Release version of the image (default: the profile's release.version).
    #[arg(long = "release", value_name = "VERSION")]
    release: Option<String>,
}

/// The lock file a command reads or writes.
#[derive(clap::Args, Clone)]
struct LockArg {
    /// The lock file (default: <profile>.<image>.lock next to the profile, or under profiles/).
    #[arg(long = "lock", value_name = "FILE")]
    path: Option<PathBuf>,
}

#[derive(Subcommand)]
enum CacheAction {
    /// List the cached .debs and their total size.
    List,
    /// Remove cached .debs that no lock file under the given directories refers to, and every
    /// cached bootstrapped tree.
    Prune {
        /// Directories searched for *.lock files (default: profiles/).
        #[arg(default_value = "profiles")]
        keep_locks_in: Vec<PathBuf>,
    },
}

#[derive(Subcommand)]
enum Command {
    /// Build an image: bootstrap, customize, verified root, UKI, disk, manifest.
    Build(BuildArgs),
    /// Resolve the profile's packages against the mirror and write the lock file: every
    /// package's exact version and .deb sha256, the build timestamp and host tool versions.
    Lock(LockArgs),
    /// Compare the lock with the mirror's current indexes (the suite, -updates and -security):
    /// lists newer versions, security updates flagged. Exit 0: up to date; 2: a rebuild is due.
    Outdated(OutdatedArgs),
    /// Lock again against the mirror, build exactly that, and write the package changelog of
    /// the release (added, removed, upgraded packages) into the output as changelog.txt/.json.
    Rebuild(RebuildArgs),
    /// The local cache of downloaded .debs.
    Cache(CacheArgs),
    /// Boot an image in QEMU: an interactive serial console, or a health check with --check.
    Boot(BootArgs),
    /// Show what a build output holds: partitions, hashes, packages.
    Inspect(InspectArgs),
    /// Resolve a profile and image into the build plan and print it (no build).
    Plan(PlanArgs),
    /// Write an image to an SD card or USB stick: only the blocks its block map lists, then
    /// read them back and verify. Refuses mounted devices, partitions, the system disk and
    /// devices larger than --max-size; asks first unless --yes.
    Flash(kiln::flash::FlashArgs),
    /// Start an appliance project: DIR/NAME.toml (extends base, your SSH key for the login user,
    /// a commented example of every section), a release key pair, a provisioning skeleton.
    /// Existing files are kept, never overwritten.
    Init(InitArgs),
    /// Make a release signing key pair (ed25519): DIR/kiln-release.key (secret, 0600) and
    /// DIR/kiln-release.pub (for the profile's [update] public_key).
    Keygen(KeygenArgs),
    /// Add a build to a release channel: artifacts by sha256, signed metadata for devices, and
    /// Atom/RSS feeds for people, in a directory to upload to the update URL.
    Publish(PublishArgs),
    /// Check the host tools kiln needs; --install installs the missing ones (idempotent).
    Doctor(DoctorArgs),
    /// Show how the devices are, from the status feeds they push (`kiln-agent monitor`).
    ///
    /// A table, then one line per open alert or warning and per silent device. Exit 0: every
    /// device is fine (warnings included); 1: a device has an open alert or is silent; 2: a
    /// source could not be read (what could be read is still shown).
    Status(StatusArgs),
    /// Measure what a device running OLD would download to update to NEW if it fetched only
    /// the data it does not have: new bytes at fixed 4 KiB blocks and at content-defined chunks
    /// (FastCDC, 4/16/64 KiB on average) for root.img and the UKI or boot.img.
    Delta(DeltaArgs),
    /// Find or build the image's on-device agent (kiln-agent) and print its path: for an arm64
    /// image kiln cross-builds it in a cached toolchain root, as `kiln build` does.
    Agent(AgentArgs),
}

#[derive(clap::Args)]
struct BuildArgs {
    #[command(flatten)]
    target: Target,
    /// Output directory; the image lands in OUT/<profile>-<image>/.
    #[arg(long, short, default_value = "out")]
    out: PathBuf,
    /// Keep the work directory (root tree, intermediate images) for debugging.
    #[arg(long)]
    keep_work: bool,
    /// Install exactly the packages of the lock file (see `kiln lock`), verifying every .deb.
    #[arg(long)]
    locked: bool,
    #[command(flatten)]
    lock: LockArg,
}

#[derive(clap::Args)]
struct LockArgs {
    #[command(flatten)]
    target: Target,
    #[command(flatten)]
    lock: LockArg,
    /// Scratch space for the bootstrap.
    #[arg(long, short, default_value = "out")]
    out: PathBuf,
}

#[derive(clap::Args)]
struct OutdatedArgs {
    #[command(flatten)]
    target: Target,
    #[command(flatten)]
    lock: LockArg,
}

#[derive(clap::Args)]
struct RebuildArgs {
    #[command(flatten)]
    target: Target,
    #[command(flatten)]
    lock: LockArg,
    #[arg(long, short, default_value = "out")]
    out: PathBuf,
}

#[derive(clap::Args)]
struct CacheArgs {
    #[command(subcommand)]
    action: CacheAction,
}

#[derive(clap::Args)]
struct BootArgs {
    /// disk.img, or the build output directory holding it.
    image: PathBuf,
    /// Headless: wait for the image's readiness marker, exit 0 when ready, 1 otherwise.
    #[arg(long)]
    check: bool,
    /// Seconds to wait for readiness with --check.
    #[arg(long, default_value_t = 420)]
    timeout: u64,
    /// Keep what the guest writes (default: a throw-away overlay).
    #[arg(long)]
    persist: bool,
    /// Forward 127.0.0.1:PORT to the guest's SSH port (user-mode network, restrict=on).
    #[arg(long, value_name = "PORT")]
    ssh_port: Option<u16>,
    /// Forward 127.0.0.1:HOST to the guest's TCP port GUEST (repeatable), e.g. 8080:80 to
    /// try a web service from the host's browser.
    #[arg(long, value_name = "HOST:GUEST", value_parser = parse_forward)]
    forward: Vec<(u16, u16)>,
    #[arg(long, value_enum, default_value = "auto")]
    accel: qemu::Accel,
    /// Write the whole console output here (check mode; default: next to the image).
    #[arg(long)]
    log: Option<PathBuf>,
    /// Show the console while checking.
    #[arg(long)]
    verbose: bool,
    /// Raspberry Pi images: boot the slot autoboot.txt names under [tryboot] (what the
    /// firmware does once after `reboot '0 tryboot'`).
    #[arg(long)]
    tryboot: bool,
    /// arm64 images: QEMU machine to use instead of the image's raspi model ("virt": the
    /// generic machine, with virtio disk and network).
    #[arg(long, value_parser = ["virt"])]
    machine: Option<String>,
    /// vCPUs of the guest. Default: the board's under KVM; under TCG the board's, but at most
    /// one per two host cores (a TCG guest whose vCPUs find no free host core spins: measured,
    /// twice the CPU per boot on a busy 2-core host). Raspberry Pi machines have the SoC's 4.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=64))]
    smp: Option<u32>,
    /// With --check: a command to run once the guest is ready (it gets KILN_SSH_PORT); its
    /// exit status decides the check. Example: -- ssh -p 2222 admin@127.0.0.1 true
    #[arg(last = true, value_name = "COMMAND")]
    then: Vec<String>,
}

#[derive(clap::Args)]
struct InspectArgs {
    /// The build output directory (or its disk.img).
    dir: PathBuf,
    /// List every package with its version.
    #[arg(long)]
    packages: bool,
    /// Hash every artifact again and compare with the manifest.
    #[arg(long)]
    verify: bool,
    /// Print the manifest as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(clap::Args)]
struct AgentArgs {
    #[command(flatten)]
    target: Target,
    /// Also copy it to DIR/kiln-agent-<arch>.
    #[arg(long, value_name = "DIR")]
    out: Option<PathBuf>,
}

#[derive(clap::Args)]
struct PlanArgs {
    #[command(flatten)]
    target: Target,
}

#[derive(clap::Args)]
struct InitArgs {
    /// The project directory; its name becomes the profile's and the hostname ("myhome").
    dir: PathBuf,
    /// The SSH public key for the login user (default: ~/.ssh/id_ed25519.pub, id_ecdsa.pub,
    /// id_ed25519_sk.pub, id_rsa.pub, then any other ~/.ssh/*.pub).
    #[arg(long, value_name = "FILE")]
    ssh_key: Option<PathBuf>,
    /// The login user's name on the appliance.
    #[arg(long, default_value = "admin")]
    user: String,
}

#[derive(clap::Args)]
struct KeygenArgs {
    #[arg(long, value_name = "DIR")]
    out: PathBuf,
    /// Replace an existing key (devices trusting the old one will refuse new releases).
    #[arg(long)]
    force: bool,
}

#[derive(clap::Args)]
struct PublishArgs {
    /// A build output directory (out/<profile>-<image>/).
    output: PathBuf,
    #[arg(long, default_value = "stable")]
    channel: String,
    /// The site directory (created if missing; an existing channel in it is extended).
    #[arg(long, value_name = "DIR")]
    to: PathBuf,
    /// The secret key from `kiln keygen`.
    #[arg(long, value_name = "FILE")]
    key: PathBuf,
    /// Where the site will be served from (used in the feeds' links and ids).
    #[arg(long, value_name = "URL", default_value = "https://updates.example.org/")]
    base_url: String,
    /// How long devices accept this metadata ("30d", "12h"); publish again before then.
    /// "0s" makes metadata that has already expired (for tests).
    #[arg(long, value_name = "DURATION", default_value = "30d")]
    valid_for: String,
    /// A note shown in the feeds and the metadata.
    #[arg(long, default_value = "")]
    notes: String,
    /// The release fixes security problems: devices that have not installed it say so in
    /// their status feeds (and `kiln status`).
    #[arg(long)]
    security: bool,
    /// Releases kept in the channel.
    #[arg(long, default_value_t = 10)]
    keep: usize,
    /// Start the channel afresh when the existing metadata does not verify with this key.
    #[arg(long)]
    force: bool,
}

#[derive(clap::Args)]
struct StatusArgs {
    /// A device's status feed: an http(s) URL (for NAME.atom its JSON twin NAME.json is read),
    /// a file (NAME.json, or NAME.atom for the NAME.json beside it), or a directory (every
    /// *.json status feed in it; other JSON files are named as skipped).
    #[arg(value_name = "SOURCE")]
    sources: Vec<String>,
    /// The release channel's metadata (CHANNEL.json, or the channel's .atom URL or file), to
    /// say which devices are behind: the newest release for a device's profile, image and
    /// arch that is newer than what it runs. Read for display only: the signature is not checked.
    #[arg(long, value_name = "URL_OR_FILE")]
    feed: Option<String>,
    /// Print a JSON array instead of the table, one object per device: name, source,
    /// device_id, profile, image, arch, version, channel, last_seen (RFC 3339), silent, state
    /// (fine, warning, alert, silent), update, behind (the newest available version or null),
    /// backup_configured, last_good_backup, data_used_percent, open (the open alerts and
    /// warnings: title, severity, since, detail, what_to_do).
    #[arg(long)]
    json: bool,
    /// Also write one static HTML page (no JavaScript): a card per device in its state's
    /// colour, its open alerts and a chart of its data partition's use.
    #[arg(long, value_name = "FILE")]
    html: Option<PathBuf>,
    /// A device is silent when its feed is older than this ("30m", "2h"; default: three of
    /// the device's own monitor intervals).
    #[arg(long, value_name = "DURATION")]
    silent_after: Option<String>,
    /// Judge at this time instead of now (RFC 3339; for tests).
    #[arg(long, value_name = "RFC3339", hide = true)]
    now: Option<String>,
}

#[derive(clap::Args)]
struct DeltaArgs {
    /// The build output of the release devices run (out/<profile>-<image>/ of that build).
    old: PathBuf,
    /// The build output of the new release.
    new: PathBuf,
    /// The figures as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(clap::Args)]
struct DoctorArgs {
    #[arg(long)]
    install: bool,
}

fn main() -> ExitCode {
    quiet_on_closed_stdout();
    kiln::host::exec::complete_path();
    // Files kiln makes (the image's directories among them) get the same modes whoever runs it:
    // a user's umask of 002 must not make a different, group-writable image.
    nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o022));
    let cli = Cli::parse();
    kiln::host::exec::set_debug(cli.debug);
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            print_error(&e);
            ExitCode::FAILURE
        }
    }
}

/// "error: what failed: why: why that", once, on stderr.
fn print_error(e: &anyhow::Error) {
    let mut chain = e.chain();
    eprint!("error: {}", chain.next().map(|c| c.to_string()).unwrap_or_default());
    for cause in chain {
        eprint!(": {cause}");
    }
    eprintln!();
}

/// Output to a closed pipe (`kiln plan | head`) ends the program quietly with status 0, as
/// ripgrep does: the print macros panic with "failed printing to stdout: Broken pipe", and
/// only that panic is turned into an exit; every other panic keeps the default report.
fn quiet_on_closed_stdout() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let msg = info
            .payload()
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| info.payload().downcast_ref::<&str>().copied())
            .unwrap_or("");
        if msg.starts_with("failed printing to stdout") && msg.contains("Broken pipe") {
            std::process::exit(0);
        }
        default(info)
    }));
}

fn resolve(t: &Target) -> Result<plan::Plan> {
    resolve_with(t, None)
}

/// The profile file behind a target, when it is a file (for the default lock path).
fn profile_file(t: &Target) -> Result<Option<PathBuf>> {
    let cwd = std::env::current_dir().context("reading the current directory")?;
    Ok(match profile::locate(&t.profile, &cwd)? {
        profile::Source::File(p) => Some(p),
        profile::Source::Builtin(_) => None,
    })
}

fn lock_path(t: &Target, plan: &plan::Plan, explicit: Option<PathBuf>) -> Result<PathBuf> {
    if let Some(p) = explicit {
        return Ok(p);
    }
    let cwd = std::env::current_dir().context("reading the current directory")?;
    let file = profile_file(t)?;
    let p = kiln::config::lock::default_path(plan, file.as_deref(), &cwd);
    Ok(p.strip_prefix(&cwd).map(Path::to_path_buf).unwrap_or(p))
}

fn resolve_with(t: &Target, epoch: Option<u64>) -> Result<plan::Plan> {
    let cwd = std::env::current_dir().context("reading the current directory")?;
    let src = profile::locate(&t.profile, &cwd)?;
    let prof = profile::load(src)?;
    let img = image::load(&t.image, &cwd)?;
    let needs_host_mirror = t.mirror.is_none() && prof.merged.system.as_ref().and_then(|s| s.mirror.as_ref()).is_none();
    let host = if needs_host_mirror { Some(mirror::from_host(Path::new("/etc/apt"))?) } else { None };
    let overrides = plan::Overrides { mirror: t.mirror.clone(), version: t.release.clone(), source_date_epoch: epoch };
    let epoch = std::env::var("SOURCE_DATE_EPOCH").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
    });
    Ok(plan::Plan::resolve(&prof, &img, host.as_ref(), &overrides, epoch)?)
}

fn output_dir(p: &Path) -> PathBuf {
    if p.is_file() {
        p.parent().map(Path::to_path_buf).unwrap_or_else(|| PathBuf::from("."))
    } else {
        p.to_path_buf()
    }
}

/// One function per command, named after it; the exit status is 0 unless the command says
/// otherwise (`outdated`, `status`) or fails (1).
fn run(cli: Cli) -> Result<ExitCode> {
    // Commands that write a Debian root (or a file system for the device) run as root: for an
    // ordinary user, kiln runs them again as root of a user namespace (host/userns.rs), before
    // anything else happens.
    let writes_a_root = match &cli.command {
        Command::Build(_) => Some("build"),
        Command::Lock(_) => Some("lock"),
        Command::Rebuild(_) => Some("rebuild"),
        Command::Cache(_) => Some("cache"),
        // The provisioned files must belong to root on the device (mkfs.ext4 -d copies owners).
        Command::Flash(a) if a.provision.is_some() => Some("flash --provision"),
        _ => None,
    };
    if let Some(what) = writes_a_root {
        kiln::host::userns::become_root(what)?;
        kiln::host::userns::private_mounts()?;
    }
    let done = |r: Result<()>| r.map(|()| ExitCode::SUCCESS);
    match cli.command {
        Command::Build(args) => done(cmd_build(args)),
        Command::Boot(args) => done(cmd_boot(args)),
        Command::Inspect(args) => done(cmd_inspect(args)),
        Command::Lock(args) => done(cmd_lock(args)),
        Command::Outdated(args) => cmd_outdated(args),
        Command::Rebuild(args) => done(cmd_rebuild(args)),
        Command::Cache(args) => done(cmd_cache(args)),
        Command::Plan(args) => done(cmd_plan(args)),
        Command::Flash(args) => done(kiln::flash::run(&args)),
        Command::Init(args) => done(cmd_init(args)),
        Command::Keygen(args) => done(cmd_keygen(args)),
        Command::Publish(args) => done(cmd_publish(args)),
        Command::Status(args) => Ok(cmd_status(args)),
        Command::Delta(args) => done(cmd_delta(args)),
        Command::Doctor(args) => done(cmd_doctor(args)),
        Command::Agent(args) => done(cmd_agent(args)),
    }
}

fn cmd_delta(DeltaArgs { old, new, json }: DeltaArgs) -> Result<()> {
    let measures = kiln::release::delta::compare(&old, &new)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&measures)?);
    } else {
        print!("{}", kiln::release::delta::report(&measures));
    }
    Ok(())
}

fn cmd_build(BuildArgs { target, out, keep_work, locked, lock }: BuildArgs) -> Result<()> {
    let (plan, lock) = if locked || lock.path.is_some() {
        let first = resolve(&target)?;
        let path = lock_path(&target, &first, lock.path)?;
        let lock = kiln::config::lock::LockFile::read(&path)?;
        let plan = resolve_with(&target, Some(lock.source_date_epoch))?;
        lock.check_matches(&plan, &path)?;
        eprintln!("locked: {} packages from {}", lock.packages.len(), path.display());
        (plan, Some(lock))
    } else {
        (resolve(&target)?, None)
    };
    let missing: Vec<_> = tools::build_tools(plan.arch).filter(|t| !tools::is_present(t)).collect();
    if !missing.is_empty() {
        let names: Vec<String> = missing.iter().map(|t| format!("{} ({})", t.name, t.package)).collect();
        bail!("missing host tools: {}; run `kiln doctor --install`", names.join(", "));
    }
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    eprintln!(
        "building {} {} ({} {}, from {})",
        plan.output_name,
        plan.version,
        plan.suite,
        plan.arch.debian(),
        plan.mirror.debian
    );
    let r = build::build(&plan, &build::BuildOptions { out_dir: out, keep_work, locked: lock })?;
    let disk = &r.manifest.artifacts["disk.img"];
    let root = &r.manifest.artifacts["root.img"];
    println!("built {} in {:.1}s", r.dir.display(), r.seconds);
    println!("  disk.img  {} (sha256 {})", stages::manifest::size(disk.size), disk.sha256);
    println!("  root.img  {} (sha256 {})", stages::manifest::size(root.size), root.sha256);
    println!("  root hash {}", r.manifest.verity.root_hash);
    kiln::release::inspect::print_security(&r.manifest.security);
    println!("next: kiln boot {} --check", r.dir.join("disk.img").display());
    Ok(())
}

fn cmd_boot(
    BootArgs { image,
            check,
            timeout,
            persist,
            ssh_port,
            forward,
            accel,
            log,
            verbose,
            tryboot,
            machine,
            smp,
            then, }: BootArgs,
) -> Result<()> {
    if !then.is_empty() && !check {
        bail!("a command after -- needs --check (it runs once the guest is ready)");
    }
    let dir = output_dir(&image);
    let disk = if image.is_dir() { image.join("disk.img") } else { image.clone() };
    if !disk.is_file() {
        bail!("{}: no such disk image (pass a disk.img or a build output directory)", disk.display());
    }
    let m = stages::manifest::read(&dir)?;
    let scratch = tempdir("kiln-boot")?;
    let log = log.or_else(|| check.then(|| dir.join("boot-console.log")));
    let mut q = m.qemu.clone();
    if machine.is_some() {
        if q.firmware != kiln::config::image::Firmware::Rpi {
            bail!("--machine is for Raspberry Pi (arm64) images; {} boots as {}", disk.display(), q.machine);
        }
        q = qemu::virt_machine(q);
    }
    if tryboot && q.firmware != kiln::config::image::Firmware::Rpi {
        bail!("--tryboot is for Raspberry Pi images (autoboot.txt); {} boots with UEFI", disk.display());
    }
    if let Some(n) = smp.filter(|&n| q.machine.starts_with("raspi") && n != q.smp) {
        bail!(
            "--smp {n}: QEMU's {} has the SoC's {} cores and no other count; add --machine virt to choose",
            q.machine,
            q.smp
        );
    }
    let net_rules = forward.iter().map(|(h, g)| format!("hostfwd=tcp:127.0.0.1:{h}-:{g}")).collect();
    let opts = qemu::BootOptions { disk, qemu: q, accel, persist, ssh_port, net_rules, log: log.clone(), tryboot, smp };
    let result = if check {
        let then_cmd = then.split_first().map(|(prog, args)| {
            let mut c = kiln::host::exec::Cmd::new(prog).args(args);
            if let Some(p) = ssh_port {
                c = c.env("KILN_SSH_PORT", p.to_string());
            }
            c
        });
        match qemu::check(&opts, Duration::from_secs(timeout), &scratch, verbose, then_cmd.as_ref())? {
            qemu::CheckOutcome::Ready { seconds, line, then } => {
                println!("ready after {seconds:.1}s: {}", line.trim());
                match then {
                    Some(Err(e)) => Err(anyhow::anyhow!("the image is ready but the command failed: {e}")),
                    _ => Ok(()),
                }
            }
            qemu::CheckOutcome::NotReady { seconds, line, tail } => {
                print_tail(&tail, log.as_deref());
                Err(anyhow::anyhow!("the image booted but is not healthy after {seconds:.1}s: {}", line.trim()))
            }
            qemu::CheckOutcome::Failed { seconds, reason, tail } => {
                print_tail(&tail, log.as_deref());
                Err(anyhow::anyhow!("boot check failed after {seconds:.1}s: {reason}"))
            }
        }
    } else {
        qemu::interactive(&opts, &scratch)
    };
    let _ = std::fs::remove_dir_all(&scratch);
    result?;
    Ok(())
}

fn cmd_inspect(InspectArgs { dir, packages, verify, json }: InspectArgs) -> Result<()> {
    let dir = output_dir(&dir);
    let m = stages::manifest::read(&dir)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&m)?);
    } else {
        inspect::print(&m, packages);
    }
    if verify {
        inspect::verify(&dir, &m)?;
    }
    Ok(())
}

fn cmd_lock(LockArgs { target, lock, out }: LockArgs) -> Result<()> {
    let plan = resolve(&target)?;
    let path = lock_path(&target, &plan, lock.path)?;
    let old = kiln::config::lock::LockFile::read(&path).ok();
    eprintln!("locking {} ({} {}) into {}", plan.output_name, plan.suite, plan.arch.debian(), path.display());
    let mut new = build::lock(&plan, &out)?;
    keep_epoch(&plan, old.as_ref(), &mut new);
    new.write(&path)?;
    println!("locked {} packages into {}", new.packages.len(), path.display());
    if let Some(old) = old {
        let changes = kiln::config::lock::diff(&old, &new);
        println!("{} changed since the previous lock", changes.len());
        for c in changes {
            println!("  {c}");
        }
    }
    Ok(())
}

fn cmd_outdated(OutdatedArgs { target, lock }: OutdatedArgs) -> Result<ExitCode> {
    let plan = resolve(&target)?;
    let path = lock_path(&target, &plan, lock.path)?;
    let lock = kiln::config::lock::LockFile::read(&path)?;
    let fetcher = kiln::debian::Fetcher::new(Default::default())?;
    let mut indexes = Vec::new();
    for (mirror, suite) in plan.mirror.index_suites(&plan.suite) {
        let mut entries = Vec::new();
        for component in &plan.components {
            entries.extend(fetcher.packages(&mirror, &suite, component, &lock.arch)?);
        }
        indexes.push((suite, entries));
    }
    let locked: Vec<(String, String, String)> =
        lock.packages.iter().map(|p| (p.name.clone(), p.version.clone(), p.arch.clone())).collect();
    let updates = kiln::debian::outdated(&locked, &indexes);
    if updates.is_empty() {
        println!("{}: all {} locked packages are current", path.display(), lock.packages.len());
        return Ok(ExitCode::SUCCESS);
    }
    println!("{:<32} {:<28} {:<28} suite", "package", "locked", "available");
    for u in &updates {
        println!(
            "{:<32} {:<28} {:<28} {}{}",
            u.name,
            u.locked,
            u.available,
            u.suite,
            if u.security { "  SECURITY" } else { "" }
        );
    }
    let security = updates.iter().filter(|u| u.security).count();
    println!(
        "{} packages have newer versions ({security} security updates): run `kiln rebuild` or `kiln lock`",
        updates.len()
    );
    Ok(ExitCode::from(2))
}

fn cmd_rebuild(RebuildArgs { target, lock, out }: RebuildArgs) -> Result<()> {
    let plan = resolve(&target)?;
    let path = lock_path(&target, &plan, lock.path)?;
    let old = kiln::config::lock::LockFile::read(&path).ok();
    eprintln!("re-locking {} into {}", plan.output_name, path.display());
    let mut new = build::lock(&plan, &out)?;
    keep_epoch(&plan, old.as_ref(), &mut new);
    new.write(&path)?;
    let plan = resolve_with(&target, Some(new.source_date_epoch))?;
    let r = build::build(&plan, &build::BuildOptions { out_dir: out, keep_work: false, locked: Some(new.clone()) })?;
    let changes =
        old.as_ref().map(|o| kiln::config::lock::changes(o, &new)).unwrap_or_else(|| kiln::config::lock::Changes {
            added: new.packages.iter().map(|p| (p.name.clone(), p.version.clone())).collect(),
            ..Default::default()
        });
    let mut text = format!(
        "{} {}: {} packages; {} upgraded, {} added, {} removed\n",
        plan.output_name,
        plan.version,
        new.packages.len(),
        changes.upgraded.len(),
        changes.added.len(),
        changes.removed.len()
    );
    for l in changes.lines() {
        text.push_str(&format!("{l}\n"));
    }
    let txt = r.dir.join("changelog.txt");
    std::fs::write(&txt, &text).with_context(|| format!("writing {}", txt.display()))?;
    let json = r.dir.join("changelog.json");
    std::fs::write(&json, serde_json::to_string_pretty(&changes)? + "\n")
        .with_context(|| format!("writing {}", json.display()))?;
    print!("{text}");
    println!("built {} in {:.1}s (changelog in {})", r.dir.display(), r.seconds, txt.display());
    Ok(())
}

fn cmd_cache(CacheArgs { action }: CacheArgs) -> Result<()> {
    let cache = kiln::debian::cache::Cache::open_default()?;
    match action {
        CacheAction::List => {
            let items = cache.list()?;
            let total: u64 = items.iter().map(|(_, s)| s).sum();
            for (p, size) in &items {
                println!("{:>10}  {}", stages::manifest::size(*size), p.display());
            }
            println!("{} .debs, {} in {}", items.len(), stages::manifest::size(total), cache.dir.display());
            for (p, size) in cache.trees()? {
                println!("{:>10}  {} (bootstrapped tree)", stages::manifest::size(size), p.display());
            }
        }
        CacheAction::Prune { keep_locks_in } => {
            let mut keep = std::collections::BTreeSet::new();
            for dir in &keep_locks_in {
                let entries = std::fs::read_dir(dir).with_context(|| {
                    format!(
                        "reading {}, searched for the lock files whose .debs are kept (name the directories that hold your locks: kiln cache prune DIR...)",
                        dir.display()
                    )
                })?;
                for e in entries {
                    let p = e?.path();
                    if p.extension().is_some_and(|x| x == "lock") {
                        keep.extend(kiln::config::lock::LockFile::read(&p)?.packages.into_iter().map(|p| p.sha256));
                    }
                }
            }
            let (n, bytes) = cache.prune(&keep)?;
            println!(
                "removed {n} .debs ({}) that no lock refers to; kept {}",
                stages::manifest::size(bytes),
                keep.len()
            );
            let (n, bytes) = cache.prune_trees()?;
            println!("removed {n} bootstrapped trees ({})", stages::manifest::size(bytes));
        }
    }
    Ok(())
}

fn cmd_plan(PlanArgs { target }: PlanArgs) -> Result<()> {
    let plan = resolve(&target)?;
    println!("{}", serde_json::to_string_pretty(&plan)?);
    Ok(())
}

fn cmd_agent(AgentArgs { target, out }: AgentArgs) -> Result<()> {
    let plan = resolve(&target)?;
    let cache = kiln::debian::cache::Cache::open_default()?;
    let bin = stages::agent::prepare(&plan, &cache)?;
    let bin = match out {
        Some(dir) => {
            std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
            let dest = dir.join(format!("kiln-agent-{}", plan.arch.debian()));
            let tmp = dir.join(format!(".kiln-agent-{}.tmp", plan.arch.debian()));
            std::fs::copy(&bin, &tmp).with_context(|| format!("copying {} to {}", bin.display(), tmp.display()))?;
            std::fs::rename(&tmp, &dest).with_context(|| format!("moving {} into place", dest.display()))?;
            dest
        }
        None => bin,
    };
    println!("{}", bin.display());
    Ok(())
}

fn cmd_init(InitArgs { dir, ssh_key, user }: InitArgs) -> Result<()> {
    let r = kiln::init::init(&kiln::init::InitOptions { dir, ssh_key, user: user.clone(), home: None })?;
    println!("kiln init: {} (SSH key from {})", r.name, r.key_source.display());
    for (path, what) in &r.created {
        println!("  created {}: {what}", path.display());
    }
    for path in &r.kept {
        println!("  kept    {} (it exists; not overwritten)", path.display());
    }
    println!("{}", kiln::init::next_steps(&r, &user));
    Ok(())
}

fn cmd_keygen(KeygenArgs { out, force }: KeygenArgs) -> Result<()> {
    let (secret, public, id) = kiln::release::publish::keygen(&out, force)?;
    println!(
        "key {id}: secret {} (keep it off the devices and out of version control), public {}",
        secret.display(),
        public.display()
    );
    println!("{}", std::fs::read_to_string(&public).unwrap_or_default().trim());
    println!(
        "put the public key into the profile: [update] public_key = \"{}\" (relative to the profile file)",
        public.display()
    );
    Ok(())
}

fn cmd_publish(
    PublishArgs { output, channel, to, key, base_url, valid_for, notes, security, keep, force }: PublishArgs,
) -> Result<()> {
    let valid_for =
        humantime::parse_duration(&valid_for).map_err(|e| anyhow::anyhow!("--valid-for {valid_for:?}: {e}"))?;
    if valid_for.as_secs() == 0 {
        eprintln!("warning: --valid-for 0s: devices will refuse this metadata as expired (meant for tests)");
    }
    let opts = kiln::release::publish::PublishOptions {
        channel,
        site: to,
        key,
        base_url,
        valid_for,
        notes,
        security,
        keep,
        force,
    };
    let p = kiln::release::publish::publish(&output, &opts)?;
    let r = &p.release;
    println!(
        "published {} {} for {} ({}) in channel {}; expires {}",
        r.profile, r.version, r.image, r.arch, opts.channel, p.expires
    );
    for a in &r.artifacts {
        println!("  {:<24} {:>10.1} MiB  {}", a.name, a.size as f64 / 1048576.0, a.url);
    }
    println!("  {} package change(s)", r.changelog.len());
    for f in &p.files {
        println!("  wrote {}", f.display());
    }
    Ok(())
}

/// Exit 0, 1 or 2 as `kiln status --help` says; kiln's own failures (a bad argument, a page it
/// cannot write) are 2 as well: 1 must only ever mean that a device needs attention.
fn cmd_status(args: StatusArgs) -> ExitCode {
    match read_status(args) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            print_error(&e);
            ExitCode::from(2)
        }
    }
}

fn read_status(StatusArgs { sources, feed, json, html, silent_after, now }: StatusArgs) -> Result<u8> {
    use kiln::release::status;
    if sources.is_empty() {
        bail!(
            "name the devices' status feeds: kiln status SOURCE... (a URL such as \
             https://dav.example.org/status/home.atom, a NAME.json file, or a directory of them)"
        );
    }
    let now = match now {
        Some(t) => t.parse().map_err(|e: String| anyhow::anyhow!("--now: {e}"))?,
        None => kiln_feed::Timestamp::now(),
    };
    let silent_after = silent_after
        .map(|d| humantime::parse_duration(&d).map_err(|e| anyhow::anyhow!("--silent-after {d:?}: {e}")))
        .transpose()?
        .map(|d| d.as_secs());
    let mut reading = status::read(&sources);
    let release = match feed.as_deref().map(status::read_release_feed) {
        Some(Ok(metadata)) => Some(metadata),
        Some(Err(failed)) => {
            reading.failed.push(failed);
            None
        }
        None => None,
    };
    for s in &reading.skipped {
        // Both may carry a device's or a server's bytes: no terminal escapes reach the terminal.
        eprintln!("skipped {}: {}", status::plain(&s.source), status::plain(&s.reason));
    }
    for f in &reading.failed {
        eprintln!("cannot read {}: {}", status::plain(&f.source), status::plain(&f.reason));
    }
    let reports: Vec<_> =
        reading.devices.iter().map(|d| status::report(d, release.as_ref(), now, silent_after)).collect();
    if json {
        print!("{}", status::json(&reports));
    } else if !reports.is_empty() {
        print!("{}", status::table(&reports, now));
    }
    if let Some(path) = html {
        let page = status::html(&reports, &reading.failed, now);
        kiln_device::fs::write_atomically(&path, page.as_bytes())
            .with_context(|| format!("writing the status page {}", path.display()))?;
    }
    Ok(status::exit_code(&reports, &reading.failed))
}

fn cmd_doctor(DoctorArgs { install }: DoctorArgs) -> Result<()> {
    let missing = doctor::report();
    let rootless = doctor::report_rootless();
    stages::agent::report();
    if install {
        doctor::install(&missing)?;
        let still: Vec<_> = tools::TOOLS.iter().filter(|t| !tools::is_present(t)).map(|t| t.name).collect();
        if !still.is_empty() {
            bail!("still missing after installing: {}", still.join(", "));
        }
        println!("all host tools are installed");
        // Run through sudo: the user behind it gets what its builds without root need.
        if let Some((user, uid, problems)) = rootless.filter(|(_, _, p)| !p.is_empty()) {
            if !nix::unistd::geteuid().is_root() {
                bail!("this host is not ready for {user}'s builds without root: run `sudo kiln doctor --install`");
            }
            doctor::ensure_subids(&user, uid)?;
            let left = doctor::host_rootless_problems(&user, uid);
            if !left.is_empty() {
                bail!("builds without root for {user} still need:\n  - {}", left.join("\n  - "));
            }
            println!("rootless builds: this host is now ready for {user} (was: {})", problems.join("; "));
        }
    } else if !missing.is_empty() {
        bail!("{} host tools missing; run `kiln doctor --install`", missing.len());
    } else if let Some((_, _, problems)) =
        rootless.filter(|(_, _, p)| !p.is_empty() && !nix::unistd::geteuid().is_root())
    {
        bail!(
            "this host is not ready for builds without root ({} problem(s) above): run `sudo kiln doctor --install`, or build with sudo",
            problems.len()
        );
    }
    Ok(())
}

/// When nothing was upgraded, added or removed, a new lock keeps the old timestamp, so that
/// rebuilding an unchanged package set gives the same image again.
/// A new lock keeps the previous lock's `source_date_epoch` (unless the profile names one):
/// every file a package upgrade does not touch keeps its timestamp, so the next release's image
/// differs from the last only where packages changed (a delta update stays small: a new epoch
/// changed 7-22 % of the image, issue 19). The build is as reproducible either way.
fn keep_epoch(plan: &plan::Plan, old: Option<&kiln::config::lock::LockFile>, new: &mut kiln::config::lock::LockFile) {
    if let Some(old) = old.filter(|_| !plan.epoch_from_profile) {
        new.source_date_epoch = old.source_date_epoch;
    }
}

fn print_tail(tail: &[String], log: Option<&Path>) {
    eprintln!("--- last {} console lines ---", tail.len());
    for l in tail {
        eprintln!("{l}");
    }
    eprintln!("---");
    if let Some(p) = log {
        eprintln!("full console log: {}", p.display());
    }
}

/// `--forward HOST:GUEST`.
fn parse_forward(s: &str) -> std::result::Result<(u16, u16), String> {
    let (h, g) = s.split_once(':').ok_or_else(|| format!("expected HOST:GUEST ports such as 8080:80, found {s:?}"))?;
    let port = |p: &str| {
        p.parse::<u16>().ok().filter(|p| *p > 0).ok_or_else(|| format!("expected a port from 1 to 65535, found {p:?}"))
    };
    Ok((port(h)?, port(g)?))
}

fn tempdir(prefix: &str) -> Result<PathBuf> {
    let base = std::env::temp_dir();
    for i in 0..1000u32 {
        let p = base.join(format!("{prefix}-{}-{i}", std::process::id()));
        if std::fs::create_dir(&p).is_ok() {
            return Ok(p);
        }
    }
    bail!("could not create a scratch directory in {}", base.display())
}
