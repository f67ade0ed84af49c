//! Finds the Debian mirror to build from: the profile's or `--mirror`, else the host's own
//! apt sources (`/etc/apt/sources.list.d/*.sources` in deb822 form, or `sources.list`).

use std::path::Path;

/// The archive URIs to bootstrap from.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Mirror {
    /// The main archive ("…/debian").
    pub debian: String,
    /// The security archive ("…/debian-security"), when known.
    pub security: Option<String>,
}

impl Mirror {
    /// A mirror given by the user: the security archive is guessed next to it only when the URI
    /// ends in "/debian" (the common layout); otherwise security updates come from nowhere and
    /// the build says so.
    pub fn from_uri(uri: &str) -> Mirror {
        let uri = uri.trim_end_matches('/').to_string();
        let security = uri.strip_suffix("/debian").map(|base| format!("{base}/debian-security"));
        Mirror { debian: uri, security }
    }

    /// (archive URI, suite) of every index a suite's packages come from: the suite, -updates and
    /// -security (when a security archive is known).
    pub fn index_suites(&self, suite: &str) -> Vec<(String, String)> {
        let mut v = vec![(self.debian.clone(), suite.to_string()), (self.debian.clone(), format!("{suite}-updates"))];
        if let Some(sec) = &self.security {
            v.push((sec.clone(), format!("{suite}-security")));
        }
        v
    }

    /// The apt source lines for a suite, as mmdebstrap takes them.
    pub fn source_lines(&self, suite: &str, components: &str) -> Vec<String> {
        let mut v = vec![format!("deb {} {suite} {components}", self.debian)];
        if !matches!(suite, "sid" | "unstable" | "experimental") {
            v.push(format!("deb {} {suite}-updates {components}", self.debian));
            if let Some(sec) = &self.security {
                v.push(format!("deb {sec} {suite}-security {components}"));
            }
        }
        v
    }
}

#[derive(Debug, thiserror::Error)]
#[error("no Debian mirror found in the host's apt sources ({searched}); set system.mirror in the profile or pass --mirror URI")]
pub struct NoMirror {
    searched: String,
}

/// Reads the host's apt configuration under `etc_apt` (normally `/etc/apt`).
pub fn from_host(etc_apt: &Path) -> Result<Mirror, NoMirror> {
    let mut entries: Vec<(String, Vec<String>)> = Vec::new();
    let dir = etc_apt.join("sources.list.d");
    let mut files: Vec<_> = std::fs::read_dir(&dir).into_iter().flatten().flatten().map(|e| e.path()).collect();
    files.sort();
    for f in &files {
        let Ok(text) = std::fs::read_to_string(f) else { continue };
        match f.extension().and_then(|e| e.to_str()) {
            Some("sources") => entries.extend(parse_deb822(&text)),
            Some("list") => entries.extend(parse_one_line(&text)),
            _ => {}
        }
    }
    if let Ok(text) = std::fs::read_to_string(etc_apt.join("sources.list")) {
        entries.extend(parse_one_line(&text));
    }
    let is_security = |s: &str| s.ends_with("-security") || s.ends_with("/updates");
    let debian = entries
        .iter()
        .find(|(uri, suites)| {
            suites.iter().any(|s| !is_security(s) && !s.contains("backports")) && !uri.contains("security")
        })
        .map(|(u, _)| u.trim_end_matches('/').to_string());
    let security = entries
        .iter()
        .find(|(_, suites)| suites.iter().any(|s| is_security(s)))
        .map(|(u, _)| u.trim_end_matches('/').to_string());
    match debian {
        Some(debian) => Ok(Mirror { debian, security }),
        None => Err(NoMirror {
            searched: format!("{}/sources.list.d/*.sources, *.list and sources.list", etc_apt.display()),
        }),
    }
}

/// deb822 `.sources`: (URI, suites) for each enabled `Types: deb` entry. A file apt would
/// refuse is skipped here too (apt reports it; kiln then finds no mirror and says so).
fn parse_deb822(text: &str) -> Vec<(String, Vec<String>)> {
    let mut out = Vec::new();
    for p in crate::debian::deb822::paragraphs(text).unwrap_or_default() {
        let words =
            |k: &str| -> Vec<String> { p.get(k).unwrap_or("").split_whitespace().map(str::to_string).collect() };
        let enabled = !p.get("Enabled").is_some_and(|v| v.eq_ignore_ascii_case("no"));
        if enabled && words("Types").iter().any(|t| t == "deb") {
            let suites = words("Suites");
            for u in words("URIs") {
                out.push((u, suites.clone()));
            }
        }
    }
    out
}

/// One-line form: `deb [options] URI suite component...`.
fn parse_one_line(text: &str) -> Vec<(String, Vec<String>)> {
    let mut out = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        let Some(rest) = line.strip_prefix("deb ") else { continue };
        let rest = rest.trim_start();
        let rest = if rest.starts_with('[') { rest.split_once(']').map(|(_, r)| r).unwrap_or("") } else { rest };
        let mut words = rest.split_whitespace();
        if let (Some(uri), Some(suite)) = (words.next(), words.next()) {
            out.push((uri.to_string(), vec![suite.to_string()]));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_deb822_and_one_line_sources() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("sources.list.d")).unwrap();
        std::fs::write(
            dir.path().join("sources.list.d/debian.sources"),
            "Types: deb\n# comment: ignored\nURIs: http://mirror.test/debian/\nSuites: bookworm bookworm-updates\nComponents: main\n\n\
             Types: deb\nURIs: http://mirror.test/debian-security\nSuites: bookworm-security\nComponents: main\n",
        )
        .unwrap();
        let m = from_host(dir.path()).unwrap();
        assert_eq!(
            m,
            Mirror {
                debian: "http://mirror.test/debian".into(),
                security: Some("http://mirror.test/debian-security".into())
            }
        );
        assert_eq!(
            m.source_lines("trixie", "main"),
            vec![
                "deb http://mirror.test/debian trixie main",
                "deb http://mirror.test/debian trixie-updates main",
                "deb http://mirror.test/debian-security trixie-security main"
            ]
        );

        let dir2 = tempfile::tempdir().unwrap();
        std::fs::write(dir2.path().join("sources.list"), "# x\ndeb [arch=amd64] http://m.test/debian bookworm main\n")
            .unwrap();
        assert_eq!(from_host(dir2.path()).unwrap().debian, "http://m.test/debian");

        let empty = tempfile::tempdir().unwrap();
        let e = from_host(empty.path()).unwrap_err().to_string();
        assert!(e.contains("pass --mirror URI"), "{e}");
    }
}
