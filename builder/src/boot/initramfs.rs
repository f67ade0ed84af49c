//! The initramfs, built on the host from the files of the bootstrapped target tree, without
//! running any code of the target's architecture (no mkinitramfs, ldd or depmod under
//! emulation): the same for arm64 and amd64 trees.
//!
//! It holds `/init` (a POSIX sh script, `templates/initramfs/init.tera`) run by the tree's
//! static busybox, `veritysetup` and `blkid` from the tree with their shared libraries and ELF
//! interpreter (found by reading ELF headers, [`elf`]), and the requested kernel modules with
//! their dependencies ([`kmod`]), decompressed so that busybox `insmod` loads them as they are.
//! Paths are resolved inside the tree: a symlink (`/lib` -> `usr/lib` on merged-/usr Debian) is
//! followed within the tree and copied into the archive as a symlink, never followed on the host.
//! The archive is a gzip-compressed newc cpio ([`cpio`]), byte-identical for the same inputs.

pub mod cpio;
pub mod elf;
pub mod kmod;

pub use elf::ElfInfo;

use crate::host::exec::{shell_quote, Cmd};
use crate::units::{Bytes, MIB};
use anyhow::{anyhow, bail, Context as _, Result};
use cpio::Node;
use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read as _, Write as _};
use std::path::{Path, PathBuf};

const INIT_TEMPLATE: &str = include_str!("../../templates/initramfs/init.tera");

/// The busybox applets `/init` calls, each linked in `/bin`.
const APPLETS: &[&str] = &["sh", "mount", "mkdir", "sleep", "insmod", "chroot", "switch_root", "readlink"];
/// Applets for the `kiln.debug` shell (job control on the console), linked when present.
const DEBUG_APPLETS: &[&str] = &["setsid", "cttyhack"];
/// Where busybox-static, util-linux and cryptsetup-bin put their programs (trixie, bookworm).
const BUSYBOX: &[&str] = &["/usr/bin/busybox", "/bin/busybox"];
const BLKID: &[&str] = &["/usr/sbin/blkid", "/sbin/blkid"];
const VERITYSETUP: &[&str] = &["/usr/sbin/veritysetup", "/sbin/veritysetup"];
/// The modules `/init` loads, in order, one `<path> [optional]` per line.
const MODULE_LIST: &str = "/etc/kiln/modules";
/// How many symlinks one path may pass through (as the kernel's MAXSYMLINKS).
const MAX_SYMLINKS: usize = 40;

/// What went into an initramfs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InitramfsInfo {
    /// The compressed archive's size.
    pub size: Bytes,
    /// Kernel modules it loads (dependencies included, built-ins not).
    pub modules: usize,
    /// Regular files in it.
    pub files: usize,
}

impl std::fmt::Display for InitramfsInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{:.1} MiB ({} bytes), {} modules, {} files",
            self.size.0 as f64 / MIB as f64,
            self.size.0,
            self.modules,
            self.files
        )
    }
}

/// Builds the initramfs for kernel `kernel_version` of `tree` into `out`. `modules` are module
/// names (`dm-verity` or `dm_verity`); built-in ones are skipped, dependencies added.
pub fn build(tree: &Path, kernel_version: &str, modules: &[String], out: &Path) -> Result<InitramfsInfo> {
    let tree = Tree::open(tree)?;
    let mut archive = Archive::default();
    for dir in ["dev", "proc", "sys", "run", "root"] {
        archive.insert(dir, Node::Dir { mode: 0o755 })?;
    }
    // The kernel gives /init this console as stdin, stdout and stderr.
    archive.insert("dev/console", Node::CharDevice { mode: 0o600, major: 5, minor: 1 })?;

    // busybox, and the links for the applets /init uses.
    let busybox = tree.find_first(BUSYBOX)?.ok_or_else(|| {
        anyhow!(
            "no busybox in {} (looked for {}): the initramfs runs on the static busybox of the Debian package busybox-static; add busybox-static to the image's packages",
            tree.root.display(),
            BUSYBOX.join(", ")
        )
    })?;
    let busybox_data = tree.read(&busybox)?;
    if let Some(missing) = APPLETS.iter().find(|a| !has_applet(&busybox_data, a)) {
        bail!("the busybox of {} ({busybox}) has no {missing} applet, which the initramfs needs", tree.root.display());
    }
    let applets: Vec<&str> =
        APPLETS.iter().chain(DEBUG_APPLETS.iter().filter(|a| has_applet(&busybox_data, a))).copied().collect();
    archive.place(&tree, "/bin/busybox", Node::File { mode: 0o755, data: busybox_data })?;
    for applet in applets {
        archive.place(&tree, &format!("/bin/{applet}"), Node::Symlink { target: "busybox".into() })?;
    }
    // A dynamically linked busybox (the `busybox` package) brings its libraries.
    archive.copy_with_libraries(&tree, &busybox, false)?;

    let blkid = tree.find_first(BLKID)?.ok_or_else(|| {
        anyhow!(
            "no blkid in {} (looked for {}): it comes with the Debian package util-linux",
            tree.root.display(),
            BLKID.join(", ")
        )
    })?;
    let veritysetup = tree.find_first(VERITYSETUP)?.ok_or_else(|| {
        anyhow!(
            "no veritysetup in {} (looked for {}): add the Debian package cryptsetup-bin to the image's packages",
            tree.root.display(),
            VERITYSETUP.join(", ")
        )
    })?;
    archive.copy_with_libraries(&tree, &blkid, true)?;
    archive.copy_with_libraries(&tree, &veritysetup, true)?;

    let steps = add_modules(&tree, &mut archive, kernel_version, modules)?;
    let mut list = String::new();
    for (path, optional) in &steps {
        list.push_str(path);
        list.push_str(if *optional { " optional\n" } else { "\n" });
    }
    archive.place(&tree, MODULE_LIST, Node::File { mode: 0o644, data: list.into_bytes() })?;

    let mut ctx = tera::Context::new();
    ctx.insert("kernel_version", &shell_quote(kernel_version));
    ctx.insert("veritysetup", &shell_quote(&veritysetup));
    ctx.insert("blkid", &shell_quote(&blkid));
    ctx.insert("module_list", &shell_quote(MODULE_LIST));
    let init = render_init(&ctx)?;
    archive.insert("init", Node::File { mode: 0o755, data: init.into_bytes() })?;

    let files = archive.entries.values().filter(|n| matches!(n, Node::File { .. })).count();
    let size = archive.write_gzip(out, source_date_epoch()?)?;
    Ok(InitramfsInfo { size: Bytes(size), modules: steps.len(), files })
}

/// Whether a busybox binary has an applet: its names are stored NUL-separated.
fn has_applet(busybox: &[u8], name: &str) -> bool {
    let needle = [b"\0", name.as_bytes(), b"\0"].concat();
    busybox.windows(needle.len()).any(|w| w == needle.as_slice())
}

/// Renders `/init` from its template.
fn render_init(ctx: &tera::Context) -> Result<String> {
    tera::Tera::one_off(INIT_TEMPLATE, ctx, false).map_err(|e| {
        let mut msg = format!("rendering the template initramfs/init.tera: {e}");
        let mut src = std::error::Error::source(&e);
        while let Some(s) = src {
            msg.push_str(&format!(": {s}"));
            src = s.source();
        }
        anyhow!(msg)
    })
}

/// The archive's timestamp: SOURCE_DATE_EPOCH when set, else 0.
fn source_date_epoch() -> Result<u32> {
    match std::env::var("SOURCE_DATE_EPOCH") {
        Ok(v) => v
            .trim()
            .parse()
            .map_err(|_| anyhow!("SOURCE_DATE_EPOCH={v:?} is not a number of seconds that fits the cpio format")),
        Err(_) => Ok(0),
    }
}

/// Adds the modules for `requested` (decompressed, as `.ko`) and returns their paths in load
/// order with whether each is optional.
fn add_modules(
    tree: &Tree,
    archive: &mut Archive,
    kernel_version: &str,
    requested: &[String],
) -> Result<Vec<(String, bool)>> {
    if kernel_version.is_empty() || kernel_version.contains('/') {
        bail!("{kernel_version:?} is not a kernel version");
    }
    let dir = format!("/lib/modules/{kernel_version}");
    let read_index = |name: &str, required: bool| -> Result<String> {
        let path = format!("{dir}/{name}");
        match tree.resolve(&path)? {
            Some(real) => {
                let data = tree.read(&real)?;
                String::from_utf8(data).with_context(|| format!("{path} in {} is not text", tree.root.display()))
            }
            None if required => bail!(
                "no {path} in {}: kernel {kernel_version} is not installed there, or depmod did not run for it",
                tree.root.display()
            ),
            None => Ok(String::new()),
        }
    };
    let index = kmod::ModuleIndex::parse(
        kernel_version,
        &read_index("modules.dep", true)?,
        &read_index("modules.builtin", false)?,
        &read_index("modules.alias", false)?,
        &read_index("modules.softdep", false)?,
    )?;
    let order = index.load_order(requested)?;
    let mut steps = Vec::new();
    for step in order {
        let logical = if step.path.starts_with('/') { step.path.clone() } else { format!("{dir}/{}", step.path) };
        let real = tree.resolve(&logical)?.ok_or_else(|| {
            anyhow!(
                "module {} of kernel {kernel_version} is listed in modules.dep but {logical} is not in {}",
                step.name,
                tree.root.display()
            )
        })?;
        let data = decompress_module(&tree.host(&real), &logical)?;
        let plain = strip_compression(&logical);
        archive.place(tree, &plain, Node::File { mode: 0o644, data })?;
        steps.push((plain, step.optional));
    }
    Ok(steps)
}

fn strip_compression(path: &str) -> String {
    for ext in [".xz", ".zst", ".gz"] {
        if let Some(p) = path.strip_suffix(ext) {
            return p.to_string();
        }
    }
    path.to_string()
}

/// A module file as `insmod` takes it: xz and gzip are decompressed here, zstd by the host's
/// `zstd` (Debian's kernels use xz).
fn decompress_module(host: &Path, logical: &str) -> Result<Vec<u8>> {
    let data = std::fs::read(host).with_context(|| format!("reading the module {}", host.display()))?;
    let plain = if logical.ends_with(".xz") {
        let mut out = Vec::new();
        lzma_rs::xz_decompress(&mut data.as_slice(), &mut out)
            .map_err(|e| anyhow!("decompressing the module {} (xz): {e:?}", host.display()))?;
        out
    } else if logical.ends_with(".gz") {
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(data.as_slice())
            .read_to_end(&mut out)
            .with_context(|| format!("decompressing the module {} (gzip)", host.display()))?;
        out
    } else if logical.ends_with(".zst") {
        Cmd::new("zstd").args(["-d", "-c", "-q"]).arg(host).output()?
    } else {
        data
    };
    if !plain.starts_with(b"\x7fELF") {
        bail!("the module {} is not an ELF object once decompressed", host.display());
    }
    Ok(plain)
}

/// The target's root directory. Paths are resolved as the target would resolve them: a
/// symlink is followed inside the tree (an absolute target starts at the tree's root).
struct Tree {
    root: PathBuf,
}

/// A path resolved in the tree: the symlinks met on the way (link path, target) and the path
/// it arrives at, which has no symlink in it.
struct Resolved {
    links: Vec<(String, String)>,
    real: String,
}

impl Tree {
    fn open(root: &Path) -> Result<Tree> {
        if !root.is_dir() {
            bail!("the tree {} is not a directory", root.display());
        }
        Ok(Tree { root: root.to_path_buf() })
    }

    /// The host path of a symlink-free tree path.
    fn host(&self, real: &str) -> PathBuf {
        self.root.join(real.trim_start_matches('/'))
    }

    fn read(&self, real: &str) -> Result<Vec<u8>> {
        let host = self.host(real);
        std::fs::read(&host).with_context(|| format!("reading {}", host.display()))
    }

    /// The real path of an existing `path`, or `None`.
    fn resolve(&self, path: &str) -> Result<Option<String>> {
        Ok(self.walk(path, false)?.map(|r| r.real))
    }

    /// The first of `paths` that exists (as a file, after symlinks), as given.
    fn find_first(&self, paths: &[&str]) -> Result<Option<String>> {
        for p in paths {
            if let Some(real) = self.resolve(p)? {
                if self.host(&real).is_file() {
                    return Ok(Some(p.to_string()));
                }
            }
        }
        Ok(None)
    }

    /// Resolves `path` component by component. Missing components end the walk with `None`,
    /// unless `lenient`: then they are taken as directories still to be made.
    fn walk(&self, path: &str, lenient: bool) -> Result<Option<Resolved>> {
        let mut todo: Vec<String> = components(path).into_iter().rev().collect();
        let mut done: Vec<String> = Vec::new();
        let mut links = Vec::new();
        let mut missing = false;
        while let Some(c) = todo.pop() {
            if c == ".." {
                done.pop();
                continue;
            }
            done.push(c);
            if missing {
                continue;
            }
            let here = format!("/{}", done.join("/"));
            let host = self.host(&here);
            match std::fs::symlink_metadata(&host) {
                Ok(m) if m.file_type().is_symlink() => {
                    if links.len() == MAX_SYMLINKS {
                        bail!("too many levels of symlinks resolving {path} in {}", self.root.display());
                    }
                    let target =
                        std::fs::read_link(&host).with_context(|| format!("reading the symlink {}", host.display()))?;
                    let target = target
                        .to_str()
                        .ok_or_else(|| anyhow!("the symlink {} points to a path that is not UTF-8", host.display()))?
                        .to_string();
                    done.pop();
                    if target.starts_with('/') {
                        done.clear();
                    }
                    todo.extend(components(&target).into_iter().rev());
                    links.push((here, target));
                }
                Ok(m) if !m.is_dir() && !todo.is_empty() => {
                    if lenient {
                        bail!("{here} in {} is a file, not a directory (resolving {path})", self.root.display());
                    }
                    return Ok(None);
                }
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    if !lenient {
                        return Ok(None);
                    }
                    missing = true;
                }
                Err(e) => return Err(e).with_context(|| format!("reading {}", host.display())),
            }
        }
        Ok(Some(Resolved { links, real: format!("/{}", done.join("/")) }))
    }
}

fn components(path: &str) -> Vec<String> {
    path.split('/').filter(|c| !c.is_empty() && *c != ".").map(String::from).collect()
}

/// The archive being assembled: paths (without the leading `/`) to nodes, kept sorted, so
/// parents come before their children.
#[derive(Default)]
struct Archive {
    entries: BTreeMap<String, Node>,
}

impl Archive {
    /// Adds a node and any missing parent directories. Adding the same node twice is fine, a
    /// different one at the same path is an error.
    fn insert(&mut self, path: &str, node: Node) -> Result<()> {
        let rel = path.trim_start_matches('/');
        let parts: Vec<&str> = rel.split('/').collect();
        for i in 1..parts.len() {
            let parent = parts[..i].join("/");
            match self.entries.get(&parent) {
                None => {
                    self.entries.insert(parent, Node::Dir { mode: 0o755 });
                }
                Some(Node::Dir { .. }) => {}
                Some(_) => bail!("initramfs: /{parent} is not a directory, so /{rel} cannot go below it"),
            }
        }
        match self.entries.get(rel) {
            None => {
                self.entries.insert(rel.to_string(), node);
            }
            Some(existing) if *existing == node => {}
            Some(Node::Dir { .. }) if matches!(node, Node::Dir { .. }) => {}
            Some(_) => bail!("initramfs: /{rel} would be added twice, differently"),
        }
        Ok(())
    }

    /// Copies the symlinks met while resolving a path of the tree.
    fn insert_links(&mut self, links: &[(String, String)]) -> Result<()> {
        for (link, target) in links {
            self.insert(link, Node::Symlink { target: target.clone() })?;
        }
        Ok(())
    }

    /// Puts a generated node at `path` as the target sees it: its parent directory is resolved
    /// through the tree's symlinks, which are copied (so `/bin/busybox` lands in
    /// `/usr/bin/busybox` of a merged-/usr tree, reachable through the link `/bin`).
    fn place(&mut self, tree: &Tree, path: &str, node: Node) -> Result<()> {
        let (parent, name) = path.rsplit_once('/').ok_or_else(|| anyhow!("{path} is not an absolute path"))?;
        let resolved = tree.walk(parent, true)?.ok_or_else(|| anyhow!("cannot place {path} in the initramfs"))?;
        self.insert_links(&resolved.links)?;
        self.insert(&format!("{}/{name}", resolved.real.trim_end_matches('/')), node)
    }

    /// Copies a file of the tree (with the symlinks on its path) as it is there.
    fn copy_file(&mut self, tree: &Tree, path: &str) -> Result<(String, Vec<u8>)> {
        let resolved = tree.walk(path, false)?.ok_or_else(|| anyhow!("{path} is not in {}", tree.root.display()))?;
        let host = tree.host(&resolved.real);
        let meta = std::fs::symlink_metadata(&host).with_context(|| format!("reading {}", host.display()))?;
        if !meta.is_file() {
            bail!("{path} in {} is not a regular file", tree.root.display());
        }
        let data = tree.read(&resolved.real)?;
        self.insert_links(&resolved.links)?;
        use std::os::unix::fs::PermissionsExt as _;
        self.insert(&resolved.real, Node::File { mode: meta.permissions().mode() & 0o7777, data: data.clone() })?;
        Ok((resolved.real, data))
    }

    /// Copies an ELF program or library of the tree with its interpreter and, transitively,
    /// the shared libraries it needs, found as the target's dynamic loader would find them.
    /// `copy_self` false: `path` is already in the archive (elsewhere), only its needs are added.
    fn copy_with_libraries(&mut self, tree: &Tree, path: &str, copy_self: bool) -> Result<()> {
        // A file can be needed under several names (the interpreter's path and libc's
        // DT_NEEDED): each name is copied, each file read for its needs once.
        let mut names = BTreeSet::new();
        let mut files = BTreeSet::new();
        let mut todo = vec![(path.to_string(), copy_self)];
        let mut machine = None;
        while let Some((p, copy)) = todo.pop() {
            if !names.insert(p.clone()) {
                continue;
            }
            let (real, data) = if copy {
                self.copy_file(tree, &p)?
            } else {
                let real = tree.resolve(&p)?.ok_or_else(|| anyhow!("{p} is not in {}", tree.root.display()))?;
                let data = tree.read(&real)?;
                (real, data)
            };
            if !files.insert(real.clone()) {
                continue;
            }
            let info = elf::parse(&data)
                .with_context(|| format!("reading the ELF headers of {p} in {}", tree.root.display()))?;
            match machine {
                None => machine = Some(info.machine),
                Some(m) if m != info.machine => {
                    bail!("{p} in {} is for ELF machine {} but {path} is for {m}", tree.root.display(), info.machine)
                }
                Some(_) => {}
            }
            if let Some(interp) = &info.interpreter {
                if tree.resolve(interp)?.is_none() {
                    bail!("the ELF interpreter {interp} of {p} is not in {}", tree.root.display());
                }
                todo.push((interp.clone(), true));
            }
            let origin = real.rsplit_once('/').map(|(d, _)| d).unwrap_or("");
            let mut dirs: Vec<String> =
                info.runpath.iter().map(|d| d.replace("${ORIGIN}", origin).replace("$ORIGIN", origin)).collect();
            if let Some(triplet) = info.multiarch() {
                dirs.push(format!("/lib/{triplet}"));
                dirs.push(format!("/usr/lib/{triplet}"));
            }
            dirs.push("/lib".into());
            dirs.push("/usr/lib".into());
            for needed in &info.needed {
                let found = if needed.contains('/') {
                    Some(needed.clone())
                } else {
                    let mut found = None;
                    for dir in &dirs {
                        let candidate = format!("{dir}/{needed}");
                        if let Some(real) = tree.resolve(&candidate)? {
                            if tree.host(&real).is_file() {
                                found = Some(candidate);
                                break;
                            }
                        }
                    }
                    found
                };
                let lib = found.ok_or_else(|| {
                    anyhow!(
                        "{needed}, needed by {p}, is not in {} (looked in {})",
                        tree.root.display(),
                        dirs.join(", ")
                    )
                })?;
                todo.push((lib, true));
            }
        }
        Ok(())
    }

    /// Writes the gzip-compressed cpio to `out` (via a temporary file beside it). Returns its size.
    fn write_gzip(&self, out: &Path, mtime: u32) -> Result<u64> {
        let tmp = out.with_extension("part");
        let file = std::fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
        let mut gz =
            flate2::GzBuilder::new().mtime(0).write(std::io::BufWriter::new(file), flate2::Compression::best());
        cpio::write(&mut gz, self.entries.iter().map(|(k, v)| (k.as_str(), v)), mtime)
            .with_context(|| format!("writing {}", tmp.display()))?;
        let mut writer = gz.finish().with_context(|| format!("writing {}", tmp.display()))?;
        writer.flush().with_context(|| format!("writing {}", tmp.display()))?;
        drop(writer);
        std::fs::rename(&tmp, out).with_context(|| format!("moving {} to {}", tmp.display(), out.display()))?;
        Ok(std::fs::metadata(out).with_context(|| format!("reading {}", out.display()))?.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    const KVER: &str = "6.12.0-test-arm64";

    fn write(root: &Path, path: &str, data: &[u8]) {
        let p = root.join(path.trim_start_matches('/'));
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(&p, data).unwrap();
    }

    fn link(root: &Path, path: &str, target: &str) {
        let p = root.join(path.trim_start_matches('/'));
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        symlink(target, p).unwrap();
    }

    fn module(name: &str) -> Vec<u8> {
        let mut m = elf::synthetic(elf::EM_AARCH64, None, &[], None);
        m.extend_from_slice(format!("module {name}").as_bytes());
        m
    }

    /// A merged-/usr arm64 tree as trixie lays it out, with synthetic ELF files; one absolute
    /// symlink points at a path that does not exist on the host, so following it on the host
    /// would fail.
    fn arm64_tree(root: &Path) {
        use elf::{synthetic, EM_AARCH64 as A};
        for (l, t) in [("/bin", "usr/bin"), ("/sbin", "usr/sbin"), ("/lib", "usr/lib")] {
            link(root, l, t);
        }
        let mut busybox = synthetic(A, None, &[], None);
        busybox.extend_from_slice(
            b"\0[\0[[\0chroot\0cttyhack\0insmod\0mkdir\0mount\0readlink\0setsid\0sh\0sleep\0switch_root\0",
        );
        write(root, "/usr/bin/busybox", &busybox);
        let ld = "/lib/ld-linux-aarch64.so.1";
        write(root, "/usr/sbin/veritysetup", &synthetic(A, Some(ld), &["libcryptsetup.so.12", "libc.so.6"], None));
        write(root, "/usr/sbin/blkid", &synthetic(A, Some(ld), &["libblkid.so.1", "libc.so.6"], None));
        let lib = "/usr/lib/aarch64-linux-gnu";
        link(root, "/usr/lib/ld-linux-aarch64.so.1", "aarch64-linux-gnu/ld-linux-aarch64.so.1");
        write(root, &format!("{lib}/ld-linux-aarch64.so.1"), &synthetic(A, None, &[], None));
        write(root, &format!("{lib}/libc.so.6"), &synthetic(A, Some(ld), &["ld-linux-aarch64.so.1"], None));
        link(root, &format!("{lib}/libcryptsetup.so.12"), "libcryptsetup.so.12.10.0");
        write(
            root,
            &format!("{lib}/libcryptsetup.so.12.10.0"),
            &synthetic(A, None, &["libdevmapper.so.1.02.1", "libc.so.6"], None),
        );
        write(root, &format!("{lib}/libdevmapper.so.1.02.1"), &synthetic(A, None, &["libc.so.6"], None));
        link(root, &format!("{lib}/libblkid.so.1"), "/usr/lib/aarch64-linux-gnu/libblkid.so.1.1.0");
        write(root, &format!("{lib}/libblkid.so.1.1.0"), &synthetic(A, None, &["libc.so.6"], None));

        let dir = format!("/usr/lib/modules/{KVER}");
        let mut xz = Vec::new();
        lzma_rs::xz_compress(&mut module("erofs").as_slice(), &mut xz).unwrap();
        write(root, &format!("{dir}/kernel/fs/erofs/erofs.ko.xz"), &xz);
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(&module("dm-mod")).unwrap();
        write(root, &format!("{dir}/kernel/drivers/md/dm-mod.ko.gz"), &gz.finish().unwrap());
        write(root, &format!("{dir}/kernel/drivers/md/dm-verity.ko"), &module("dm-verity"));
        let bufio = root.join(format!("{}/kernel/drivers/md/dm-bufio.ko", dir.trim_start_matches('/')));
        std::fs::write(&bufio, module("dm-bufio")).unwrap();
        Cmd::new("zstd").args(["-q", "--rm"]).arg(&bufio).run().unwrap();
        write(
            root,
            &format!("{dir}/modules.dep"),
            b"kernel/fs/erofs/erofs.ko.xz:\nkernel/drivers/md/dm-mod.ko.gz:\nkernel/drivers/md/dm-bufio.ko.zst: kernel/drivers/md/dm-mod.ko.gz\n\
              kernel/drivers/md/dm-verity.ko: kernel/drivers/md/dm-bufio.ko.zst kernel/drivers/md/dm-mod.ko.gz\n",
        );
        write(root, &format!("{dir}/modules.builtin"), b"kernel/drivers/virtio/virtio_blk.ko\n");
    }

    fn modules() -> Vec<String> {
        ["dm_verity", "erofs", "virtio-blk"].iter().map(|s| s.to_string()).collect()
    }

    /// The archive as the host's cpio lists it, and extracted into `dir` by it.
    fn unpack(image: &Path, dir: &Path) -> Vec<String> {
        let mut raw = Vec::new();
        flate2::read::GzDecoder::new(std::fs::File::open(image).unwrap()).read_to_end(&mut raw).unwrap();
        let raw_path = dir.with_extension("cpio");
        std::fs::write(&raw_path, &raw).unwrap();
        std::fs::create_dir_all(dir).unwrap();
        let list = Cmd::new("cpio").args(["-t", "--quiet", "-F"]).arg(&raw_path).read().unwrap();
        // The device node needs root to extract: everything else is compared.
        Cmd::new("cpio")
            .args(["-i", "-d", "--quiet", "--no-absolute-filenames", "-F"])
            .arg(&raw_path)
            .args(["--nonmatching", "dev/console"])
            .cwd(dir)
            .run()
            .unwrap();
        list.lines().map(String::from).collect()
    }

    #[test]
    fn builds_an_arm64_initramfs_from_a_tree_without_running_it() {
        if !crate::testing::host_has("builds_an_arm64_initramfs_from_a_tree_without_running_it", "cpio") {
            return;
        }
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("tree");
        arm64_tree(&root);
        let out = tmp.path().join("initrd.img");
        let info = build(&root, KVER, &modules(), &out).unwrap();
        assert_eq!(info.modules, 4, "dm_mod, dm_bufio, dm_verity, erofs (virtio_blk is built in)");
        // init, busybox, the module list, 4 modules, 2 programs, ld.so and 4 libraries.
        assert_eq!(info.files, 14, "{info}");

        let x = tmp.path().join("x");
        let list = unpack(&out, &x);
        let mut sorted = list.clone();
        sorted.sort();
        assert_eq!(list, sorted, "entries are sorted");
        for want in ["init", "dev/console", "root", "proc", "sys", "run", "usr/bin/busybox", "usr/bin/cttyhack"] {
            assert!(list.iter().any(|l| l == want), "{want} missing from {list:?}");
        }
        let read_link = |p: &str| std::fs::read_link(x.join(p)).unwrap().to_string_lossy().into_owned();
        // The tree's symlinks are copied as symlinks, so the ELF interpreter's path works.
        assert_eq!(read_link("bin"), "usr/bin");
        assert_eq!(read_link("lib"), "usr/lib");
        assert_eq!(read_link("usr/bin/sh"), "busybox");
        assert_eq!(read_link("usr/lib/ld-linux-aarch64.so.1"), "aarch64-linux-gnu/ld-linux-aarch64.so.1");
        assert_eq!(read_link("usr/lib/aarch64-linux-gnu/libcryptsetup.so.12"), "libcryptsetup.so.12.10.0");
        assert_eq!(
            read_link("usr/lib/aarch64-linux-gnu/libblkid.so.1"),
            "/usr/lib/aarch64-linux-gnu/libblkid.so.1.1.0"
        );
        for lib in [
            "ld-linux-aarch64.so.1",
            "libc.so.6",
            "libcryptsetup.so.12.10.0",
            "libdevmapper.so.1.02.1",
            "libblkid.so.1.1.0",
        ] {
            assert!(x.join("usr/lib/aarch64-linux-gnu").join(lib).is_file(), "{lib}");
        }
        assert!(x.join("lib/ld-linux-aarch64.so.1").is_file(), "the interpreter resolves inside the archive");
        // Modules: decompressed, in load order.
        let mods = format!("usr/lib/modules/{KVER}/kernel");
        assert_eq!(std::fs::read(x.join(&mods).join("fs/erofs/erofs.ko")).unwrap(), module("erofs"));
        assert_eq!(std::fs::read(x.join(&mods).join("drivers/md/dm-mod.ko")).unwrap(), module("dm-mod"));
        assert_eq!(std::fs::read(x.join(&mods).join("drivers/md/dm-bufio.ko")).unwrap(), module("dm-bufio"));
        assert_eq!(
            std::fs::read_to_string(x.join("etc/kiln/modules")).unwrap(),
            format!(
                "/lib/modules/{KVER}/kernel/drivers/md/dm-mod.ko\n/lib/modules/{KVER}/kernel/drivers/md/dm-bufio.ko\n\
                 /lib/modules/{KVER}/kernel/drivers/md/dm-verity.ko\n/lib/modules/{KVER}/kernel/fs/erofs/erofs.ko\n"
            )
        );
        // /init is valid sh and names the tools by their paths in the tree.
        let init = std::fs::read_to_string(x.join("init")).unwrap();
        assert!(init.contains("veritysetup=/usr/sbin/veritysetup\nblkid=/usr/sbin/blkid\n"), "{init}");
        assert!(init.contains(&format!("kernel_version={KVER}\n")));
        Cmd::new("sh").arg("-n").arg(x.join("init")).run().unwrap();
        use std::os::unix::fs::PermissionsExt as _;
        assert_eq!(std::fs::metadata(x.join("init")).unwrap().permissions().mode() & 0o777, 0o755);
    }

    #[test]
    fn two_builds_are_byte_identical() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("tree");
        arm64_tree(&root);
        let (a, b) = (tmp.path().join("a.img"), tmp.path().join("b.img"));
        build(&root, KVER, &modules(), &a).unwrap();
        // Different mtimes in the tree change nothing.
        crate::stages::esp::set_mtimes(&root.join("usr/sbin"), 1_000_000).unwrap();
        build(&root, KVER, &modules(), &b).unwrap();
        assert!(std::fs::read(&a).unwrap() == std::fs::read(&b).unwrap());
    }

    #[test]
    fn missing_pieces_are_named() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("tree");
        arm64_tree(&root);
        let out = tmp.path().join("initrd.img");
        let err = build(&root, KVER, &["erofs".to_string(), "squashfs".to_string()], &out).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!("kernel module \"squashfs\" is not a module of kernel {KVER} (not in its modules.dep, modules.builtin or modules.alias)")
        );
        let err = build(&root, "6.0-other", &modules(), &out).unwrap_err();
        assert!(err.to_string().starts_with("no /lib/modules/6.0-other/modules.dep in "), "{err}");
        std::fs::remove_file(root.join("usr/lib/aarch64-linux-gnu/libdevmapper.so.1.02.1")).unwrap();
        let err = format!("{:#}", build(&root, KVER, &modules(), &out).unwrap_err());
        assert!(
            err.starts_with("libdevmapper.so.1.02.1, needed by /lib/aarch64-linux-gnu/libcryptsetup.so.12, is not in "),
            "{err}"
        );
        std::fs::remove_file(root.join("usr/bin/busybox")).unwrap();
        let err = build(&root, KVER, &modules(), &out).unwrap_err().to_string();
        assert!(err.contains("busybox-static"), "{err}");
    }
}
