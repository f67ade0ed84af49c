//! Finding newer versions of locked packages (`kiln outdated`).

use super::*;

/// A locked package with a newer version in one of the indexes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Update {
    pub name: String,
    pub locked: String,
    pub available: String,
    /// The suite the newest version comes from.
    pub suite: String,
    /// Whether that suite is a security suite ("…-security").
    pub security: bool,
}

/// For each locked `(name, version, arch)`, the highest version in `indexes` (`(suite,
/// entries)`) of the same name and architecture (or "all") that is newer than the locked one.
/// When several suites carry that version, a security suite is named. Packages with nothing
/// newer, or in no index, are left out. Sorted by name.
pub fn outdated(locked: &[(String, String, String)], indexes: &[(String, Vec<PackageEntry>)]) -> Vec<Update> {
    let wanted: HashSet<&str> = locked.iter().map(|(name, _, _)| name.as_str()).collect();
    let mut by_name: HashMap<&str, Vec<(&PackageEntry, &str)>> = HashMap::new();
    for (suite, entries) in indexes {
        for e in entries.iter().filter(|e| wanted.contains(e.name.as_str())) {
            by_name.entry(e.name.as_str()).or_default().push((e, suite.as_str()));
        }
    }
    let is_security = |suite: &str| suite.ends_with("-security");
    let mut updates = Vec::new();
    for (name, version, arch) in locked {
        let mut best: Option<(&PackageEntry, &str)> = None;
        let candidates = by_name.get(name.as_str()).map(Vec::as_slice).unwrap_or_default();
        for &(entry, suite) in candidates {
            if entry.arch != *arch && entry.arch != "all" {
                continue;
            }
            if compare_versions(&entry.version, version) != Ordering::Greater {
                continue;
            }
            let better = match best {
                None => true,
                Some((b, b_suite)) => match compare_versions(&entry.version, &b.version) {
                    Ordering::Greater => true,
                    Ordering::Equal => is_security(suite) && !is_security(b_suite),
                    Ordering::Less => false,
                },
            };
            if better {
                best = Some((entry, suite));
            }
        }
        if let Some((entry, suite)) = best {
            updates.push(Update {
                name: name.clone(),
                locked: version.clone(),
                available: entry.version.clone(),
                suite: suite.to_string(),
                security: is_security(suite),
            });
        }
    }
    updates.sort_by(|a, b| a.name.cmp(&b.name));
    updates
}
