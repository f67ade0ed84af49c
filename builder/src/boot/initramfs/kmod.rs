//! Kernel modules as depmod describes them (`modules.dep`, `modules.builtin`, `modules.alias`,
//! `modules.softdep`), read without modprobe: which files a list of module names needs, in the
//! order `insmod` must load them (dependencies first).

use std::collections::{BTreeMap, BTreeSet};

/// One module file to load.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoadStep {
    /// The module's name (`dm_verity`).
    pub name: String,
    /// Its path as modules.dep gives it (relative to `/lib/modules/<version>`, or absolute).
    pub path: String,
    /// Pulled in only as a soft dependency: the boot goes on when it fails to load (e.g.
    /// `crc32c_intel` on a CPU without SSE4.2, next to `crc32c_generic`).
    pub optional: bool,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ModuleError {
    #[error("kernel module {name:?} is not a module of kernel {kernel_version} (not in its modules.dep, modules.builtin or modules.alias)")]
    Unknown { name: String, kernel_version: String },
    #[error("modules.dep of kernel {kernel_version}, line {line}: {problem}")]
    BadDep { kernel_version: String, line: usize, problem: String },
}

/// The module database of one kernel.
#[derive(Debug, Default)]
pub struct ModuleIndex {
    kernel_version: String,
    /// name -> (path, dependency names)
    modules: BTreeMap<String, (String, Vec<String>)>,
    builtin: BTreeSet<String>,
    /// alias -> module names, in file order (only plain aliases, no wildcards)
    aliases: BTreeMap<String, Vec<String>>,
    /// name -> (pre, post) soft dependencies, as written (names or aliases)
    softdeps: BTreeMap<String, (Vec<String>, Vec<String>)>,
}

/// `dm-verity`, `dm_verity` and `kernel/drivers/md/dm-verity.ko.xz` all name `dm_verity`.
pub fn module_name(name_or_path: &str) -> String {
    let base = name_or_path.rsplit('/').next().unwrap_or(name_or_path);
    let base = match base.find(".ko") {
        Some(i) if base[i..].starts_with(".ko") && matches!(&base[i + 3..], "" | ".xz" | ".zst" | ".gz") => &base[..i],
        _ => base,
    };
    base.replace('-', "_")
}

impl ModuleIndex {
    /// Parses the text of the index files; `builtin`, `alias` and `softdep` may be empty.
    pub fn parse(
        kernel_version: &str,
        dep: &str,
        builtin: &str,
        alias: &str,
        softdep: &str,
    ) -> Result<ModuleIndex, ModuleError> {
        let mut index = ModuleIndex { kernel_version: kernel_version.to_string(), ..Default::default() };
        for (i, line) in dep.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let Some((path, deps)) = line.split_once(':') else {
                return Err(ModuleError::BadDep {
                    kernel_version: kernel_version.into(),
                    line: i + 1,
                    problem: format!("no ':' in {line:?}"),
                });
            };
            let path = path.trim().to_string();
            let deps = deps.split_whitespace().map(module_name).collect();
            index.modules.insert(module_name(&path), (path, deps));
        }
        index.builtin = builtin.lines().map(str::trim).filter(|l| !l.is_empty()).map(module_name).collect();
        for line in alias.lines() {
            let mut words = line.split_whitespace();
            if let (Some("alias"), Some(name), Some(module)) = (words.next(), words.next(), words.next()) {
                if !name.contains(['*', '?', '[']) {
                    index.aliases.entry(name.replace('-', "_")).or_default().push(module_name(module));
                }
            }
        }
        for line in softdep.lines() {
            let mut words = line.split_whitespace();
            let (Some("softdep"), Some(module)) = (words.next(), words.next()) else { continue };
            let entry = index.softdeps.entry(module_name(module)).or_default();
            let mut post = false;
            for w in words {
                match w {
                    "pre:" => post = false,
                    "post:" => post = true,
                    w if post => entry.1.push(w.to_string()),
                    w => entry.0.push(w.to_string()),
                }
            }
        }
        Ok(index)
    }

    /// The modules to load for `requested`, dependencies first, each once. Built-in modules are
    /// skipped; a name that is neither a module, a built-in nor an alias is an error. Soft
    /// dependencies that the kernel has as modules are included, marked optional.
    pub fn load_order(&self, requested: &[String]) -> Result<Vec<LoadStep>, ModuleError> {
        let mut order = Vec::new();
        let mut state: BTreeMap<String, bool> = BTreeMap::new(); // false: in progress, true: done
        for name in requested {
            let wanted = module_name(name);
            if self.builtin.contains(&wanted) {
                continue;
            }
            let names = self.resolve(&wanted);
            if names.is_empty() {
                return Err(ModuleError::Unknown { name: name.clone(), kernel_version: self.kernel_version.clone() });
            }
            for n in names {
                self.visit(&n, false, &mut state, &mut order);
            }
        }
        Ok(order)
    }

    /// Module names for a module name or an alias (empty when built in or unknown).
    fn resolve(&self, name: &str) -> Vec<String> {
        let name = module_name(name);
        if self.modules.contains_key(&name) {
            return vec![name];
        }
        self.aliases
            .get(&name)
            .map(|v| v.iter().filter(|m| self.modules.contains_key(*m)).cloned().collect())
            .unwrap_or_default()
    }

    fn visit(&self, name: &str, optional: bool, state: &mut BTreeMap<String, bool>, order: &mut Vec<LoadStep>) {
        let Some((path, deps)) = self.modules.get(name) else { return };
        if state.contains_key(name) {
            // Done, or a cycle through soft dependencies (hard ones cannot cycle). A module
            // first met as a soft dependency and now needed for real is no longer optional.
            if let Some(step) = order.iter_mut().find(|s| s.name == name && s.optional && !optional) {
                step.optional = false;
                for dep in deps {
                    self.visit(dep, false, state, order);
                }
            }
            return;
        }
        state.insert(name.to_string(), false);
        let (pre, post) = self.softdeps.get(name).cloned().unwrap_or_default();
        for soft in &pre {
            for m in self.resolve(soft) {
                self.visit(&m, true, state, order);
            }
        }
        // modules.dep lists every dependency, transitively; visiting each first puts the
        // dependencies of dependencies earlier still.
        for dep in deps {
            self.visit(dep, optional, state, order);
        }
        order.push(LoadStep { name: name.to_string(), path: path.clone(), optional });
        state.insert(name.to_string(), true);
        for soft in &post {
            for m in self.resolve(soft) {
                self.visit(&m, true, state, order);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEP: &str = "kernel/fs/erofs/erofs.ko.xz: kernel/lib/libcrc32c.ko.xz
kernel/crypto/crc32c_generic.ko.xz:
kernel/arch/x86/crypto/crc32c-intel.ko.xz:
kernel/lib/libcrc32c.ko.xz:
kernel/drivers/md/dm-mod.ko.xz:
kernel/drivers/md/dm-bufio.ko.xz: kernel/drivers/md/dm-mod.ko.xz
kernel/drivers/md/dm-verity.ko.xz: kernel/drivers/md/dm-bufio.ko.xz kernel/drivers/md/dm-mod.ko.xz kernel/lib/reed_solomon/reed_solomon.ko.xz
kernel/lib/reed_solomon/reed_solomon.ko.xz:
kernel/drivers/block/virtio_blk.ko.zst:
";
    const BUILTIN: &str = "kernel/drivers/virtio/virtio_pci.ko\nkernel/lib/crc32.ko\n";
    const ALIAS: &str = "alias crc32c crc32c_intel\nalias crc32c crc32c_generic\nalias fs-erofs erofs\nalias pci:v00001AF4d* virtio_pci\n";
    const SOFTDEP: &str = "# Soft dependencies extracted from modules themselves.\nsoftdep libcrc32c pre: crc32c\n";

    fn index() -> ModuleIndex {
        ModuleIndex::parse("6.12.0-test", DEP, BUILTIN, ALIAS, SOFTDEP).unwrap()
    }

    fn names(steps: &[LoadStep]) -> Vec<String> {
        steps.iter().map(|s| if s.optional { format!("{}?", s.name) } else { s.name.clone() }).collect()
    }

    #[test]
    fn dependencies_come_first_and_once() {
        let req: Vec<String> = ["dm-verity", "dm_mod", "erofs", "virtio_blk"].iter().map(|s| s.to_string()).collect();
        let order = index().load_order(&req).unwrap();
        assert_eq!(
            names(&order),
            [
                "dm_mod",
                "dm_bufio",
                "reed_solomon",
                "dm_verity",
                "crc32c_intel?",
                "crc32c_generic?",
                "libcrc32c",
                "erofs",
                "virtio_blk"
            ]
        );
        assert_eq!(order[1].path, "kernel/drivers/md/dm-bufio.ko.xz");
    }

    #[test]
    fn a_soft_dependency_asked_for_by_name_is_required() {
        let req: Vec<String> = ["erofs", "crc32c_generic"].iter().map(|s| s.to_string()).collect();
        let order = index().load_order(&req).unwrap();
        assert_eq!(names(&order), ["crc32c_intel?", "crc32c_generic", "libcrc32c", "erofs"]);
    }

    #[test]
    fn builtins_are_skipped_and_aliases_resolve() {
        let order =
            index().load_order(&["virtio-pci".to_string(), "crc32".to_string(), "fs-erofs".to_string()]).unwrap();
        assert_eq!(names(&order), ["crc32c_intel?", "crc32c_generic?", "libcrc32c", "erofs"]);
    }

    #[test]
    fn an_unknown_module_is_named_with_the_kernel() {
        let err = index().load_order(&["erofs".to_string(), "squashfs".to_string()]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "kernel module \"squashfs\" is not a module of kernel 6.12.0-test (not in its modules.dep, modules.builtin or modules.alias)"
        );
    }

    #[test]
    fn names_from_paths() {
        assert_eq!(module_name("kernel/drivers/md/dm-verity.ko.xz"), "dm_verity");
        assert_eq!(module_name("/lib/modules/x/kernel/a/b-c.ko"), "b_c");
        assert_eq!(module_name("virtio-blk"), "virtio_blk");
    }
}
