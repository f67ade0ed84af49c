//! The service catalog (`catalog/`: data and templates, compiled in) and the services of a plan.
//!
//! A profile's `[services.NAME]` is either a catalog entry (`NAME` is `caddy`, `syncthing`,
//! `radicale`) or a program of the user's own (`exec`, with `binary` or `packages`). Either way it
//! becomes one [`ServicePlan`]: a unit whose sandbox starts from `catalog/hardening.toml`,
//! changed by the catalog entry where its program needs it, and loosened only where the profile
//! says so explicitly ([`Loosened`], shown in the report). Resolving does no I/O.

use crate::config::profile::{Port, ProfileError, Service, Site};
use kiln_device::Quiesce;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// The catalog's entries, compiled in.
pub const CATALOG: &[(&str, &str)] = &[
    ("caddy", include_str!("../../../catalog/caddy.toml")),
    ("syncthing", include_str!("../../../catalog/syncthing.toml")),
    ("radicale", include_str!("../../../catalog/radicale.toml")),
];

/// The entry every service of the user's own starts from.
const CUSTOM: &str = include_str!("../../../catalog/custom.toml");
/// The sandbox every service starts from.
const HARDENING: &str = include_str!("../../../catalog/hardening.toml");

/// The default exposure budget (systemd-analyze security's scale, 0 = fully sandboxed).
pub const DEFAULT_BUDGET: f64 = 2.0;

/// One catalog file as written.
#[derive(Deserialize, Debug, Clone)]
#[serde(deny_unknown_fields)]
pub struct CatalogEntry {
    pub description: String,
    #[serde(default)]
    pub packages: Vec<String>,
    /// The unit's Type= ("simple" unless the program tells systemd it is ready: "notify").
    #[serde(rename = "type", default = "default_type")]
    pub kind: String,
    pub exec: Option<String>,
    /// A command run in the image at build time that checks the rendered configuration.
    pub validate: Option<String>,
    /// Exit codes that mean "restart me" rather than failure.
    pub success_exit_status: Option<String>,
    pub reload: Option<String>,
    #[serde(default)]
    pub ports: Vec<String>,
    #[serde(default)]
    pub state: bool,
    /// Profile keys this entry takes besides the common ones (e.g. caddy's `sites`).
    #[serde(default)]
    pub options: Vec<String>,
    #[serde(default)]
    pub environment: BTreeMap<String, String>,
    /// Configuration files rendered from templates, by absolute path in the image.
    #[serde(default)]
    pub files: BTreeMap<String, FileDef>,
    /// Provisioned files copied into the state directory before every start.
    #[serde(default)]
    pub provision: Vec<ProvisionFile>,
    /// Changes to the shared sandbox, with the program's reason in a comment.
    #[serde(default)]
    pub directives: BTreeMap<String, DirectiveValue>,
    /// How the state directory is backed up: "stop" (default: the service is stopped for the
    /// few seconds a backup takes), "live" (its files are consistent at any moment), "skip".
    #[serde(default)]
    pub backup: Quiesce,
}

#[derive(Deserialize, Serialize, Debug, Clone, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct FileDef {
    /// A template under `catalog/`.
    pub template: String,
}

#[derive(Deserialize, Serialize, Debug, Clone, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ProvisionFile {
    /// Path under the device's provisioning directory (`/var/kiln/provision/`).
    pub from: String,
    /// File name in the service's state directory.
    pub to: String,
}

#[derive(Deserialize, Debug, Clone, PartialEq)]
#[serde(untagged)]
pub enum DirectiveValue {
    One(String),
    Lines(Vec<String>),
}

impl DirectiveValue {
    fn lines(&self) -> Vec<String> {
        match self {
            DirectiveValue::One(s) => vec![s.clone()],
            DirectiveValue::Lines(v) => v.clone(),
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct HardeningFile {
    directives: BTreeMap<String, DirectiveValue>,
}

/// A directive of a service unit: one `Key=value` line per value.
#[derive(Serialize, Debug, Clone, PartialEq)]
pub struct Directive {
    pub key: String,
    pub values: Vec<String>,
}

/// A directive the profile relaxed for one service.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct Loosened {
    pub directive: String,
    /// What the catalog sets ("yes"; lines joined by "; ").
    pub was: String,
    pub now: String,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct PortPlan {
    pub port: u16,
    /// "tcp" or "udp".
    pub proto: String,
}

impl std::fmt::Display for PortPlan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.port, self.proto)
    }
}

/// A program the build copies into the image.
#[derive(Serialize, Debug, Clone, PartialEq)]
pub struct BinaryPlan {
    /// Absolute path on the build host.
    pub source: String,
    /// Absolute path in the image.
    pub dest: String,
}

#[derive(Serialize, Debug, Clone, PartialEq)]
pub struct ServicePlan {
    pub name: String,
    /// `<name>.service`.
    pub unit: String,
    /// The catalog entry ("caddy"), or "custom".
    pub kind: String,
    pub description: String,
    /// The unit's Type=.
    pub service_type: String,
    pub exec: String,
    pub reload: Option<String>,
    pub validate: Option<String>,
    pub success_exit_status: Option<String>,
    pub ports: Vec<PortPlan>,
    pub state: bool,
    pub environment: BTreeMap<String, String>,
    /// The sandbox, sorted by directive name.
    pub directives: Vec<Directive>,
    pub loosened: Vec<Loosened>,
    pub exposure_budget: f64,
    pub files: BTreeMap<String, FileDef>,
    pub provision: Vec<ProvisionFile>,
    pub binary: Option<BinaryPlan>,
    pub sites: Vec<Site>,
    pub packages: Vec<String>,
    /// See `CatalogEntry::backup`.
    #[serde(default)]
    pub backup: Quiesce,
}

impl ServicePlan {
    /// Where the state directory really is: with DynamicUser, systemd keeps it in
    /// `/var/lib/private/<name>` (and `/var/lib/<name>` is a link to it).
    pub fn state_path(&self) -> Option<String> {
        if !self.state {
            return None;
        }
        let dynamic = self.directives.iter().any(|d| d.key == "DynamicUser" && d.values.iter().all(|v| v == "yes"));
        Some(if dynamic { format!("/var/lib/private/{}", self.name) } else { format!("/var/lib/{}", self.name) })
    }
}

pub fn catalog_names() -> String {
    CATALOG.iter().map(|(n, _)| *n).collect::<Vec<_>>().join(", ")
}

pub fn catalog_entry(name: &str) -> Option<CatalogEntry> {
    CATALOG.iter().find(|(n, _)| *n == name).map(|(n, text)| parse_entry(n, text))
}

fn parse_entry(name: &str, text: &str) -> CatalogEntry {
    // Compiled in and covered by a unit test: a broken entry is a bug in kiln, not user input.
    toml::from_str(text).unwrap_or_else(|e| panic!("catalog/{name}.toml: {e}"))
}

fn default_type() -> String {
    "simple".into()
}

fn baseline() -> BTreeMap<String, DirectiveValue> {
    let f: HardeningFile = toml::from_str(HARDENING).unwrap_or_else(|e| panic!("catalog/hardening.toml: {e}"));
    f.directives
}

/// Every directive the shared sandbox sets (for messages and reports).
pub fn baseline_directives() -> Vec<String> {
    baseline().into_keys().collect()
}

/// Turns a profile's `[services.NAME]` into its plan. `file` names the profile in errors.
pub fn resolve(file: &str, name: &str, svc: &Service, default_budget: f64) -> Result<ServicePlan, ProfileError> {
    let err = |key: &str, msg: String| ProfileError::new(file, Some(&format!("services.{name}{key}")), msg);
    let (kind, entry) = match catalog_entry(name) {
        Some(e) => (name.to_string(), e),
        None => ("custom".to_string(), parse_entry("custom", CUSTOM)),
    };
    let custom = kind == "custom";
    if custom && svc.exec.is_none() && svc.binary.is_none() {
        return Err(err(
            "",
            format!("not in kiln's catalog ({}) and no exec: a service of your own needs exec = \"/usr/local/bin/{name} ...\" (and binary or packages)", catalog_names()),
        ));
    }
    if svc.sites.is_some() && !entry.options.iter().any(|o| o == "sites") {
        return Err(err(".sites", format!("{name} takes no sites (only caddy serves sites)")));
    }
    let sites = svc.sites.clone().unwrap_or_default();
    if entry.options.iter().any(|o| o == "sites") && sites.is_empty() {
        return Err(err(
            ".sites",
            "required: at least one site, such as sites = [{ domain = \"home.example.org\", root = \"/srv/www\" }]"
                .into(),
        ));
    }

    let binary = svc.binary.as_ref().map(|src| {
        let file_name = std::path::Path::new(src)
            .file_name()
            .map(|f| f.to_string_lossy().into_owned())
            .unwrap_or_else(|| name.to_string());
        BinaryPlan { source: src.clone(), dest: format!("/usr/local/bin/{file_name}") }
    });
    let exec = match (&svc.exec, &entry.exec, &binary) {
        (Some(e), _, _) | (None, Some(e), _) => e.clone(),
        (None, None, Some(b)) => b.dest.clone(),
        (None, None, None) => return Err(err(".exec", "required: the command line that starts the service".into())),
    };

    let ports = match &svc.ports {
        Some(list) => list.clone(),
        None => entry.ports.iter().map(|p| Port::Text(p.clone())).collect(),
    };
    let mut port_plans = Vec::new();
    for (i, p) in ports.iter().enumerate() {
        let (port, proto) = p.parse().map_err(|m| err(&format!(".ports[{i}]"), m))?;
        let pp = PortPlan { port, proto: proto.to_string() };
        if !port_plans.contains(&pp) {
            port_plans.push(pp);
        }
    }
    port_plans.sort();

    // The sandbox: the shared baseline, the catalog's changes, then the profile's loosening.
    let mut directives = baseline();
    for (k, v) in &entry.directives {
        directives.insert(k.clone(), v.clone());
    }
    let mut loosened = Vec::new();
    for (k, v) in svc.loosen.iter().flatten() {
        let Some(old) = directives.get(k) else {
            return Err(err(
                &format!(".loosen.{k}"),
                format!(
                    "kiln does not set {k} for {name}; the directives that can be loosened are: {}",
                    directives.keys().cloned().collect::<Vec<_>>().join(", ")
                ),
            ));
        };
        loosened.push(Loosened { directive: k.clone(), was: old.lines().join("; "), now: v.clone() });
        directives.insert(k.clone(), DirectiveValue::One(v.clone()));
    }
    let directives = directives.into_iter().map(|(key, v)| Directive { key, values: v.lines() }).collect();

    let mut environment = entry.environment.clone();
    environment.extend(svc.environment.clone().unwrap_or_default());
    let mut packages = entry.packages.clone();
    for p in svc.packages.iter().flatten() {
        if !packages.contains(p) {
            packages.push(p.clone());
        }
    }
    Ok(ServicePlan {
        name: name.to_string(),
        unit: format!("{name}.service"),
        kind,
        description: entry.description.clone(),
        service_type: if custom { "simple".into() } else { entry.kind.clone() },
        exec,
        reload: entry.reload.clone(),
        validate: entry.validate.clone(),
        success_exit_status: entry.success_exit_status.clone(),
        ports: port_plans,
        state: svc.state.unwrap_or(entry.state),
        environment,
        directives,
        loosened,
        exposure_budget: svc.exposure_budget.unwrap_or(default_budget),
        files: entry.files.clone(),
        provision: entry.provision.clone(),
        binary,
        sites,
        packages,
        // The profile's value was checked against `Quiesce::NAMES` when it was loaded.
        backup: match &svc.backup {
            Some(b) => b.parse().map_err(|e: String| err(".backup", e))?,
            None => entry.backup,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn catalog_entries_parse_and_name_existing_templates() {
        for (name, _) in CATALOG {
            let e = catalog_entry(name).unwrap();
            for f in e.files.values() {
                assert!(
                    crate::stages::templates::CATALOG_FILES.iter().any(|(n, _)| *n == f.template),
                    "{name}: no template {}",
                    f.template
                );
            }
            for d in e.directives.keys() {
                assert!(
                    baseline().contains_key(d),
                    "{name}: {d} is not a baseline directive: add it to hardening.toml"
                );
            }
        }
        parse_entry("custom", CUSTOM);
    }

    fn svc(text: &str) -> Service {
        toml::from_str(text).unwrap()
    }

    #[test]
    fn catalog_service_gets_the_catalog_sandbox_and_ports() {
        let s = resolve("p.toml", "caddy", &svc("sites = [{ root = \"/srv/www\" }]"), 2.0).unwrap();
        assert_eq!(s.unit, "caddy.service");
        assert_eq!(s.ports.iter().map(|p| p.to_string()).collect::<Vec<_>>(), ["80/tcp", "443/tcp", "443/udp"]);
        let cap = s.directives.iter().find(|d| d.key == "CapabilityBoundingSet").unwrap();
        assert_eq!(cap.values, ["CAP_NET_BIND_SERVICE"]);
        assert!(s.loosened.is_empty());
        assert!(s.packages.contains(&"caddy".to_string()));
    }

    #[test]
    fn custom_service_and_its_errors() {
        let s = resolve(
            "p.toml",
            "myapp",
            &svc("binary = \"/x/dist/myapp\"\nports = [8080, \"9000/udp\"]\nstate = true"),
            2.0,
        )
        .unwrap();
        assert_eq!(s.exec, "/usr/local/bin/myapp");
        assert_eq!(s.kind, "custom");
        assert!(s.state);
        assert_eq!(s.ports.iter().map(|p| p.to_string()).collect::<Vec<_>>(), ["8080/tcp", "9000/udp"]);
        let e = resolve("p.toml", "myapp", &svc("state = true"), 2.0).unwrap_err();
        assert_eq!(e.key.as_deref(), Some("services.myapp"));
        assert!(e.message.contains("needs exec"), "{e}");
        let e = resolve("p.toml", "radicale", &svc("sites = []"), 2.0).unwrap_err();
        assert_eq!(e.to_string(), "p.toml: services.radicale.sites: radicale takes no sites (only caddy serves sites)");
        let e = resolve("p.toml", "caddy", &svc(""), 2.0).unwrap_err();
        assert_eq!(e.key.as_deref(), Some("services.caddy.sites"));
    }

    #[test]
    fn loosening_is_explicit_and_recorded() {
        let s = resolve(
            "p.toml",
            "myapp",
            &svc("exec = \"/usr/bin/myapp\"\nloosen = { MemoryDenyWriteExecute = \"no\" }"),
            2.0,
        )
        .unwrap();
        assert_eq!(
            s.loosened,
            [Loosened { directive: "MemoryDenyWriteExecute".into(), was: "yes".into(), now: "no".into() }]
        );
        let mdwe = s.directives.iter().find(|d| d.key == "MemoryDenyWriteExecute").unwrap();
        assert_eq!(mdwe.values, ["no"]);
        let e = resolve(
            "p.toml",
            "myapp",
            &svc("exec = \"/usr/bin/myapp\"\nloosen = { MemoryDenyWriteExecut = \"no\" }"),
            2.0,
        )
        .unwrap_err();
        assert_eq!(e.key.as_deref(), Some("services.myapp.loosen.MemoryDenyWriteExecut"));
        assert!(e.message.contains("MemoryDenyWriteExecute"), "{e}");
    }
}
