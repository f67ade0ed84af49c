//! The `kiln` command line.

use anyhow::{bail, Context as _, Result};
use clap::{Parser, Subcommand};
use kiln::{build, doctor, image, inspect, mirror, plan, profile, qemu, stages};
use std::path::{Path, PathBuf};
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

#[derive(Subcommand)]
enum Command {
    /// Build an image: bootstrap, customize, verified root, UKI, disk, manifest.
    Build {
        #[command(flatten)]
        target: Target,
        /// Output directory; the image lands in OUT/<profile>-<image>/.
        #[arg(long, short, default_value = "out")]
        out: PathBuf,
        /// Keep the work directory (root tree, intermediate images) for debugging.
        #[arg(long)]
        keep_work: bool,
    },
    /// Boot an image in QEMU: an interactive serial console, or a health check with --check.
    Boot {
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
        #[arg(long, value_enum, default_value = "auto")]
        accel: qemu::Accel,
        /// Write the whole console output here (check mode; default: next to the image).
        #[arg(long)]
        log: Option<PathBuf>,
        /// Show the console while checking.
        #[arg(long)]
        verbose: bool,
    },
    /// Show what a build output holds: partitions, hashes, packages.
    Inspect {
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
    },
    /// Resolve a profile and image into the build plan and print it (no build).
    Plan {
        #[command(flatten)]
        target: Target,
    },
    /// Check the host tools kiln needs; --install installs the missing ones (idempotent).
    Doctor {
        #[arg(long)]
        install: bool,
    },
}

fn main() {
    let cli = Cli::parse();
    kiln::exec::set_debug(cli.debug);
    if let Err(e) = run(cli) {
        let mut chain = e.chain();
        eprint!("error: {}", chain.next().map(|c| c.to_string()).unwrap_or_default());
        for cause in chain {
            eprint!(": {cause}");
        }
        eprintln!();
        std::process::exit(1);
    }
}

fn resolve(t: &Target) -> Result<plan::Plan> {
    let cwd = std::env::current_dir().context("reading the current directory")?;
    let src = profile::locate(&t.profile, &cwd)?;
    let prof = profile::load(src)?;
    let img = image::load(&t.image, &cwd)?;
    let needs_host_mirror = t.mirror.is_none() && prof.merged.system.as_ref().and_then(|s| s.mirror.as_ref()).is_none();
    let host = if needs_host_mirror { Some(mirror::from_host(Path::new("/etc/apt"))?) } else { None };
    let overrides = plan::Overrides { mirror: t.mirror.clone(), version: t.release.clone() };
    let epoch = std::env::var("SOURCE_DATE_EPOCH")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0));
    Ok(plan::Plan::resolve(&prof, &img, host.as_ref(), &overrides, epoch)?)
}

fn output_dir(p: &Path) -> PathBuf {
    if p.is_file() {
        p.parent().map(Path::to_path_buf).unwrap_or_else(|| PathBuf::from("."))
    } else {
        p.to_path_buf()
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Build { target, out, keep_work } => {
            let plan = resolve(&target)?;
            let missing: Vec<_> = doctor::TOOLS.iter().filter(|t| t.name != "qemu-system-x86_64" && t.name != "OVMF" && !doctor::is_present(t)).collect();
            if !missing.is_empty() {
                let names: Vec<String> = missing.iter().map(|t| format!("{} ({})", t.name, t.package)).collect();
                bail!("missing host tools: {}; run `kiln doctor --install`", names.join(", "));
            }
            std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
            eprintln!("building {} {} ({} {}, from {})", plan.output_name, plan.version, plan.suite, plan.arch.debian(), plan.mirror.debian);
            let r = build::build(&plan, &build::BuildOptions { out_dir: out, keep_work })?;
            let disk = &r.manifest.artifacts["disk.img"];
            let root = &r.manifest.artifacts["root.img"];
            println!("built {} in {:.1}s", r.dir.display(), r.seconds);
            println!("  disk.img  {} (sha256 {})", stages::manifest::size(disk.size), disk.sha256);
            println!("  root.img  {} (sha256 {})", stages::manifest::size(root.size), root.sha256);
            println!("  root hash {}", r.manifest.verity.root_hash);
            println!("next: kiln boot {} --check", r.dir.join("disk.img").display());
        }
        Command::Boot { image, check, timeout, persist, ssh_port, accel, log, verbose } => {
            let dir = output_dir(&image);
            let disk = if image.is_dir() { image.join("disk.img") } else { image.clone() };
            if !disk.is_file() {
                bail!("{}: no such disk image (pass a disk.img or a build output directory)", disk.display());
            }
            let m = stages::manifest::read(&dir)?;
            let scratch = tempdir("kiln-boot")?;
            let log = log.or_else(|| check.then(|| dir.join("boot-console.log")));
            let opts = qemu::BootOptions { disk, qemu: m.qemu.clone(), accel, persist, ssh_port, net_rules: vec![], log: log.clone() };
            let result = if check {
                match qemu::check(&opts, Duration::from_secs(timeout), &scratch, verbose)? {
                    qemu::CheckOutcome::Ready { seconds, line } => {
                        println!("ready after {seconds:.1}s: {}", line.trim());
                        Ok(())
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
        }
        Command::Inspect { dir, packages, verify, json } => {
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
        }
        Command::Plan { target } => {
            let plan = resolve(&target)?;
            println!("{}", serde_json::to_string_pretty(&plan)?);
        }
        Command::Doctor { install } => {
            let missing = doctor::report();
            if install {
                doctor::install(&missing)?;
                let still: Vec<_> = doctor::TOOLS.iter().filter(|t| !doctor::is_present(t)).map(|t| t.name).collect();
                if !still.is_empty() {
                    bail!("still missing after installing: {}", still.join(", "));
                }
                println!("all host tools are installed");
            } else if !missing.is_empty() {
                bail!("{} host tools missing; run `kiln doctor --install`", missing.len());
            }
        }
    }
    Ok(())
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
