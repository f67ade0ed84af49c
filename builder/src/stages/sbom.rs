//! The SBOM: an SPDX 2.3 JSON document naming the image and every Debian package in it, with
//! the licenses the packages declare in their machine-readable (DEP-5) copyright files.
//!
//! Everything in the document comes from the manifest and the tree, so the same build gives the
//! same bytes: the creation time is `SOURCE_DATE_EPOCH`, the namespace is a hash of the package
//! list, and every list is sorted.

use super::manifest::{Manifest, Package};
use crate::debian::deb822::{paragraphs_lenient, Paragraph};
use crate::units::Sha256;
use anyhow::{Context as _, Result};
use serde_json::{json, Value};
use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsString;
use std::path::{Component, Path, PathBuf};

pub const FILE: &str = "sbom.spdx.json";

const NOASSERTION: &str = "NOASSERTION";
const DOCUMENT_ID: &str = "SPDXRef-DOCUMENT";
const IMAGE_ID: &str = "SPDXRef-Image";
/// Where a Debian package's copyright file lives, below the tree.
const DOC_DIR: &str = "usr/share/doc";

/// SPDX license ids a DEP-5 short name may match (case-insensitively) as they are.
const SPDX_IDS: &[&str] = &[
    "0BSD",
    "AFL-2.1",
    "AFL-3.0",
    "Apache-1.1",
    "Apache-2.0",
    "Artistic-1.0",
    "Artistic-1.0-Perl",
    "Artistic-2.0",
    "Beerware",
    "BSD-1-Clause",
    "BSD-2-Clause",
    "BSD-3-Clause",
    "BSD-3-Clause-Clear",
    "BSD-4-Clause",
    "BSD-4-Clause-UC",
    "BSD-4.3TAHOE",
    "BSD-Source-Code",
    "BSL-1.0",
    "bzip2-1.0.6",
    "CC-BY-2.0",
    "CC-BY-3.0",
    "CC-BY-4.0",
    "CC-BY-SA-2.0",
    "CC-BY-SA-3.0",
    "CC-BY-SA-4.0",
    "CC0-1.0",
    "CDDL-1.0",
    "curl",
    "EPL-1.0",
    "EPL-2.0",
    "FSFAP",
    "FSFUL",
    "FSFULLR",
    "FTL",
    "GD",
    "HPND",
    "HPND-sell-variant",
    "ICU",
    "IJG",
    "Info-ZIP",
    "Intel",
    "ISC",
    "ISC-Veillard",
    "Kazlib",
    "Latex2e",
    "libpng-2.0",
    "Libpng",
    "libselinux-1.0",
    "libtiff",
    "LPPL-1.3c",
    "MirOS",
    "MIT",
    "MIT-0",
    "MIT-CMU",
    "MIT-Modern-Variant",
    "MIT-open-group",
    "MPL-1.0",
    "MPL-1.1",
    "MPL-2.0",
    "MS-PL",
    "NCSA",
    "NTP",
    "OFL-1.1",
    "OLDAP-2.8",
    "OpenSSL",
    "OpenSSL-standalone",
    "PostgreSQL",
    "PSF-2.0",
    "Python-2.0",
    "Ruby",
    "Sendmail",
    "Sleepycat",
    "Spencer-86",
    "Spencer-94",
    "SunPro",
    "TCL",
    "TCP-wrappers",
    "Unicode-3.0",
    "Unicode-DFS-2016",
    "Unicode-TOU",
    "Unlicense",
    "Vim",
    "WTFPL",
    "X11",
    "X11-distribute-modifications-variant",
    "Zlib",
    "zlib-acknowledgement",
];

/// DEP-5 short names that differ from their SPDX id (lowercase name -> id).
const ALIASES: &[(&str, &str)] = &[
    ("apache-2", "Apache-2.0"),
    ("artistic", "Artistic-1.0-Perl"),
    ("artistic-1", "Artistic-1.0"),
    ("artistic-2", "Artistic-2.0"),
    ("bsl-1", "BSL-1.0"),
    ("cc0", "CC0-1.0"),
    ("expat", "MIT"),
    ("mpl-2", "MPL-2.0"),
    ("psf-2", "PSF-2.0"),
    ("python-2", "Python-2.0"),
];

/// The GNU licenses, the versions SPDX knows of them, and what a bare name means (any version).
const GNU_FAMILIES: &[(&str, &str, &[&str], &str)] = &[
    // (DEP-5 prefix, SPDX prefix, versions, version meant by the bare name)
    ("gfdl-niv", "GFDL", &["1.2", "1.3"], "1.2"),
    ("gfdl", "GFDL", &["1.1", "1.2", "1.3"], "1.1"),
    ("agpl", "AGPL", &["1.0", "3.0"], "1.0"),
    ("lgpl", "LGPL", &["2.0", "2.1", "3.0"], "2.0"),
    ("gpl", "GPL", &["1.0", "2.0", "3.0"], "1.0"),
];

/// License exceptions SPDX knows (lowercase DEP-5 spelling -> id); others make a LicenseRef.
const EXCEPTIONS: &[(&str, &str)] = &[
    ("autoconf-2.0", "Autoconf-exception-2.0"),
    ("autoconf-3.0", "Autoconf-exception-3.0"),
    ("autoconf-generic", "Autoconf-exception-generic"),
    ("autoconf-generic-3.0", "Autoconf-exception-generic-3.0"),
    ("autoconf-macro", "Autoconf-exception-macro"),
    ("bison", "Bison-exception-2.2"),
    ("bison-1.24", "Bison-exception-1.24"),
    ("bison-2.2", "Bison-exception-2.2"),
    ("classpath", "Classpath-exception-2.0"),
    ("font", "Font-exception-2.0"),
    ("gcc-2.0", "GCC-exception-2.0"),
    ("gcc-3.1", "GCC-exception-3.1"),
    ("gcc-runtime-library", "GCC-exception-3.1"),
    ("libtool", "Libtool-exception"),
    ("linux-syscall-note", "Linux-syscall-note"),
    ("llvm", "LLVM-exception"),
    ("texinfo", "Texinfo-exception"),
];

/// The license a package declares, as an SPDX expression, from its DEP-5 copyright file in
/// `tree`. `None` when the file is missing or not machine-readable (the SBOM says NOASSERTION).
pub fn license_of(tree: &Path, package: &str) -> Option<String> {
    declared_license(tree, package).map(|d| d.expression)
}

/// A declared license expression and the DEP-5 names behind the `LicenseRef-`s it uses.
#[derive(Debug, PartialEq, Eq)]
struct DeclaredLicense {
    expression: String,
    /// `LicenseRef-…` id -> the DEP-5 short name it stands for.
    refs: BTreeMap<String, String>,
}

fn declared_license(tree: &Path, package: &str) -> Option<DeclaredLicense> {
    if package.is_empty() || package.contains('/') || package == "." || package == ".." {
        return None;
    }
    let path = resolve_in_tree(tree, &Path::new(DOC_DIR).join(package).join("copyright"))?;
    let bytes = std::fs::read(&path).ok()?;
    dep5_license(&String::from_utf8_lossy(&bytes))
}

/// Follows symlinks inside `tree` as the image would see them: an absolute target is taken
/// from the tree's root, never the host's (`/usr/share/doc/libgcc-s1 -> gcc-14-base` and the
/// like are common). `None` if a component is missing or the links loop.
fn resolve_in_tree(tree: &Path, rel: &Path) -> Option<PathBuf> {
    const MAX_LINKS: usize = 40;
    let parent = OsString::from("..");
    let mut todo: Vec<OsString> = Vec::new();
    push_components(&mut todo, rel);
    let mut done: Vec<OsString> = Vec::new();
    let mut links = 0;
    while let Some(c) = todo.pop() {
        if c == parent {
            done.pop();
            continue;
        }
        let here: PathBuf = tree.join(done.iter().collect::<PathBuf>()).join(&c);
        let meta = std::fs::symlink_metadata(&here).ok()?;
        if !meta.file_type().is_symlink() {
            done.push(c);
            continue;
        }
        links += 1;
        if links > MAX_LINKS {
            return None;
        }
        let target = std::fs::read_link(&here).ok()?;
        if target.is_absolute() {
            done.clear();
        }
        push_components(&mut todo, &target);
    }
    Some(tree.join(done.iter().collect::<PathBuf>()))
}

/// Pushes `path`'s components onto a stack so that the first is popped first.
fn push_components(stack: &mut Vec<OsString>, path: &Path) {
    let parts: Vec<OsString> = path
        .components()
        .filter_map(|c| match c {
            Component::Normal(s) => Some(s.to_owned()),
            Component::ParentDir => Some(OsString::from("..")),
            Component::RootDir | Component::CurDir | Component::Prefix(_) => None,
        })
        .collect();
    stack.extend(parts.into_iter().rev());
}

/// A field's first line (a DEP-5 `License:` value is its short name, the license text follows).
fn field<'a>(p: &Paragraph<'a>, name: &str) -> Option<&'a str> {
    p.get(name).and_then(|v| v.lines().next()).map(str::trim)
}

/// The SPDX expression for a DEP-5 copyright file: the `License:` short names of its Files
/// paragraphs, joined with AND, de-duplicated and sorted. `None` if it is not DEP-5.
fn dep5_license(text: &str) -> Option<DeclaredLicense> {
    let paras = paragraphs_lenient(text);
    field(paras.first()?, "format")?;
    let mut refs = BTreeMap::new();
    let mut terms: BTreeMap<String, LicenseExpr> = BTreeMap::new();
    for p in paras.iter().filter(|p| field(p, "files").is_some()) {
        let Some(expr) = field(p, "license").and_then(|l| parse_dep5_expression(l, &mut refs)) else { continue };
        let conjuncts = match expr {
            LicenseExpr::And(items) => items,
            other => vec![other],
        };
        for c in conjuncts {
            terms.insert(c.render(), c);
        }
    }
    let expression = match terms.len() {
        0 => return None,
        1 => terms.into_keys().next()?,
        _ => terms.values().map(|t| t.render_inside(Op::And)).collect::<Vec<_>>().join(" AND "),
    };
    Some(DeclaredLicense { expression, refs })
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum LicenseExpr {
    /// An SPDX id, `id WITH exception`, or a `LicenseRef-…`.
    Term(String),
    And(Vec<LicenseExpr>),
    Or(Vec<LicenseExpr>),
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Op {
    And,
    Or,
}

impl LicenseExpr {
    /// Builds an AND/OR of `items`, flattening nested ones of the same kind.
    fn join(op: Op, items: Vec<LicenseExpr>) -> Option<LicenseExpr> {
        let mut flat = Vec::new();
        for i in items {
            match (op, i) {
                (Op::And, LicenseExpr::And(v)) | (Op::Or, LicenseExpr::Or(v)) => flat.extend(v),
                (_, other) => flat.push(other),
            }
        }
        match flat.len() {
            0 => None,
            1 => flat.pop(),
            _ if op == Op::And => Some(LicenseExpr::And(flat)),
            _ => Some(LicenseExpr::Or(flat)),
        }
    }

    /// SPDX text; the operands of AND and OR are sorted and de-duplicated (both commute).
    fn render(&self) -> String {
        let (op, items, sep) = match self {
            LicenseExpr::Term(t) => return t.clone(),
            LicenseExpr::And(v) => (Op::And, v, " AND "),
            LicenseExpr::Or(v) => (Op::Or, v, " OR "),
        };
        let parts: BTreeSet<String> = items.iter().map(|i| i.render_inside(op)).collect();
        parts.into_iter().collect::<Vec<_>>().join(sep)
    }

    /// SPDX text as an operand of `parent`: a compound of the other kind is parenthesized.
    fn render_inside(&self, parent: Op) -> String {
        match (self, parent) {
            (LicenseExpr::Or(_), Op::And) | (LicenseExpr::And(_), Op::Or) => format!("({})", self.render()),
            _ => self.render(),
        }
    }
}

/// Parses a DEP-5 `License:` first line: names joined by `or`/`and` (`and` binds tighter), a
/// comma before `and`/`or` closes everything on its left, and `NAME with X exception` adds an
/// exception. Names SPDX does not know become `LicenseRef-…`, recorded in `refs`.
fn parse_dep5_expression(text: &str, refs: &mut BTreeMap<String, String>) -> Option<LicenseExpr> {
    let mut result: Option<LicenseExpr> = None;
    for (i, chunk) in text.split(',').enumerate() {
        let words: Vec<&str> = chunk.split_whitespace().collect();
        let (op, words) = match words.first().map(|w| w.to_ascii_lowercase()) {
            Some(w) if i > 0 && w == "or" => (Op::Or, &words[1..]),
            Some(w) if i > 0 && w == "and" => (Op::And, &words[1..]),
            // A bare comma list: every name applies.
            _ => (Op::And, &words[..]),
        };
        let Some(group) = parse_group(words, refs) else { continue };
        result = match result {
            None => Some(group),
            Some(left) => LicenseExpr::join(op, vec![left, group]),
        };
    }
    result
}

/// `A or B and C` without commas: OR of ANDs of terms.
fn parse_group(words: &[&str], refs: &mut BTreeMap<String, String>) -> Option<LicenseExpr> {
    let alternatives = words
        .split(|w| w.eq_ignore_ascii_case("or"))
        .filter_map(|alt| {
            let terms = alt.split(|w| w.eq_ignore_ascii_case("and")).filter_map(|t| license_term(t, refs)).collect();
            LicenseExpr::join(Op::And, terms)
        })
        .collect();
    LicenseExpr::join(Op::Or, alternatives)
}

/// One license with an optional `with X exception` (also spelled `GPL-3+-with-X-exception`).
fn license_term(words: &[&str], refs: &mut BTreeMap<String, String>) -> Option<LicenseExpr> {
    let original = words.join(" ");
    let split;
    let words = match words {
        [] => return None,
        [one] => match one.to_ascii_lowercase().find("-with-") {
            Some(at) => {
                split = [&one[..at], "with", &one[at + "-with-".len()..]];
                &split[..]
            }
            None => words,
        },
        _ => words,
    };
    let with = words.iter().position(|w| w.eq_ignore_ascii_case("with"));
    let mapped = match with {
        None => spdx_license_id(&original),
        Some(at) => {
            let mut exception = &words[at + 1..];
            if exception.last().is_some_and(|w| w.eq_ignore_ascii_case("exception")) {
                exception = &exception[..exception.len() - 1];
            }
            match (spdx_license_id(&words[..at].join(" ")), spdx_exception_id(&exception.join("-"))) {
                (Some(id), Some(ex)) => Some(format!("{id} WITH {ex}")),
                _ => None,
            }
        }
    };
    Some(LicenseExpr::Term(mapped.unwrap_or_else(|| {
        let id = license_ref(&original);
        refs.entry(id.clone()).or_insert(original);
        id
    })))
}

/// The SPDX id for a DEP-5 short name, if SPDX has one.
fn spdx_license_id(name: &str) -> Option<String> {
    let lower = name.to_ascii_lowercase();
    if let Some((_, id)) = ALIASES.iter().find(|(alias, _)| *alias == lower) {
        return Some(id.to_string());
    }
    if let Some(id) = gnu_license_id(&lower) {
        return Some(id);
    }
    let known = |n: &str| SPDX_IDS.iter().find(|id| id.eq_ignore_ascii_case(n)).map(|id| id.to_string());
    if let Some(id) = known(&lower) {
        return Some(id);
    }
    // `MPL-1.1+`: SPDX's "or any later version" operator.
    let base = lower.strip_suffix('+')?;
    let id = ALIASES.iter().find(|(alias, _)| *alias == base).map(|(_, id)| id.to_string()).or_else(|| known(base))?;
    Some(format!("{id}+"))
}

/// `GPL-2+` -> `GPL-2.0-or-later`, `LGPL-2.1` -> `LGPL-2.1-only`, `GFDL-NIV-1.3+` ->
/// `GFDL-1.3-no-invariants-or-later`; SPDX spellings (`GPL-2.0-only`, `GPL-2.0+`) as well.
fn gnu_license_id(lower: &str) -> Option<String> {
    let (rest, later) = if let Some(r) = lower.strip_suffix("-or-later").or_else(|| lower.strip_suffix('+')) {
        (r, true)
    } else if let Some(r) = lower.strip_suffix("-only") {
        (r, false)
    } else {
        (lower, false)
    };
    for (prefix, spdx, versions, bare) in GNU_FAMILIES {
        let Some(after) = rest.strip_prefix(prefix) else { continue };
        let (version, later) = if after.is_empty() {
            // No version: "any version published".
            (bare.to_string(), true)
        } else {
            let v = after.strip_prefix('-')?;
            (if v.contains('.') { v.to_string() } else { format!("{v}.0") }, later)
        };
        if !versions.contains(&version.as_str()) {
            return None;
        }
        let niv = if *prefix == "gfdl-niv" { "-no-invariants" } else { "" };
        let suffix = if later { "or-later" } else { "only" };
        return Some(format!("{spdx}-{version}{niv}-{suffix}"));
    }
    None
}

fn spdx_exception_id(name: &str) -> Option<String> {
    let lower = name.to_ascii_lowercase();
    let lower = lower.strip_suffix("-exception").unwrap_or(&lower);
    EXCEPTIONS.iter().find(|(n, id)| *n == lower || id.eq_ignore_ascii_case(name)).map(|(_, id)| id.to_string())
}

/// `LicenseRef-<name>` with every character SPDX does not allow in an id made a `-`, except
/// `+`, which becomes `-plus` so that `Foo+` and `Foo` stay apart.
fn license_ref(name: &str) -> String {
    let s = sanitize_id(&name.replace('+', "-plus-"));
    format!("LicenseRef-{}", if s.is_empty() { "unnamed" } else { &s })
}

/// `[A-Za-z0-9.-]` only: other characters become `-`, runs of `-` one, none at the ends.
fn sanitize_id(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if c.is_ascii_alphanumeric() || c == '.' {
            out.push(c);
        } else if !out.ends_with('-') {
            out.push('-');
        }
    }
    out.trim_matches('-').to_string()
}

/// Percent-encodes everything but the unreserved characters `A-Z a-z 0-9 . - _ ~`, as the
/// purl spec asks of names and versions (`1:2.3` -> `1%3A2.3`, `libstdc++6` -> `libstdc%2B%2B6`).
fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The package URL of a Debian package.
fn purl(p: &Package) -> String {
    format!(
        "pkg:deb/debian/{}@{}?arch={}",
        percent_encode(&p.name),
        percent_encode(&p.version),
        percent_encode(&p.arch)
    )
}

/// `1970-01-01T00:00:00Z` for seconds since the epoch, without a clock or a time zone.
fn rfc3339_utc(epoch: u64) -> String {
    let (days, secs) = (epoch / 86_400, epoch % 86_400);
    let (y, m, d) = civil_from_days(days);
    format!("{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z", secs / 3600, secs % 3600 / 60, secs % 60)
}

/// Proleptic Gregorian (year, month, day) of a day count since 1970-01-01 (H. Hinnant's
/// `civil_from_days`, for non-negative days).
fn civil_from_days(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z % 146_097; // [0, 146096]
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365; // [0, 399]
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100); // [0, 365], from March 1st
    let mp = (5 * doy + 2) / 153; // [0, 11], March = 0
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + u64::from(m <= 2);
    (y, m, d)
}

/// The SPDX document for the image `m`, with licenses read from `tree` (the image's root).
/// Does no I/O besides reading copyright files; the result is the same for the same inputs.
pub fn spdx_document(m: &Manifest, tree: &Path) -> Value {
    let mut packages: Vec<&Package> = m.packages.iter().collect();
    packages.sort();
    packages.dedup();

    let list: String = packages.iter().map(|p| format!("{}\t{}\t{}\n", p.name, p.version, p.arch)).collect();
    let namespace = format!(
        "https://spdx.kiln.invalid/{}/{}/{}",
        percent_encode(&m.name),
        percent_encode(&m.version),
        Sha256::of(list.as_bytes()).hex()
    );

    let mut image = json!({
        "SPDXID": IMAGE_ID,
        "name": m.name,
        "versionInfo": m.version,
        "primaryPackagePurpose": "OPERATING-SYSTEM",
        "downloadLocation": NOASSERTION,
        "filesAnalyzed": false,
        "licenseConcluded": NOASSERTION,
        "licenseDeclared": NOASSERTION,
        "copyrightText": NOASSERTION,
        "comment": format!("Debian {} ({}) appliance image built by kiln from profile {} for image {}", m.suite, m.arch, m.profile, m.image),
    });
    if let Some(disk) = m.artifacts.get("disk.img") {
        image["checksums"] = json!([{ "algorithm": "SHA256", "checksumValue": disk.sha256 }]);
    }

    let mut spdx_packages = vec![image];
    let mut relationships = vec![json!({
        "spdxElementId": DOCUMENT_ID,
        "relationshipType": "DESCRIBES",
        "relatedSpdxElement": IMAGE_ID,
    })];
    // LicenseRef id -> (DEP-5 name, packages declaring it).
    let mut extracted: BTreeMap<String, (String, BTreeSet<String>)> = BTreeMap::new();
    let mut ids = BTreeSet::from([DOCUMENT_ID.to_string(), IMAGE_ID.to_string()]);
    for p in packages {
        let id = unique_id(
            &mut ids,
            &format!("SPDXRef-Package-deb-{}", sanitize_id(&format!("{}-{}-{}", p.name, p.version, p.arch))),
        );
        let declared = declared_license(tree, &p.name);
        let license = match &declared {
            Some(d) => d.expression.clone(),
            None => NOASSERTION.to_string(),
        };
        for (ref_id, name) in declared.into_iter().flat_map(|d| d.refs) {
            extracted.entry(ref_id).or_insert_with(|| (name, BTreeSet::new())).1.insert(p.name.clone());
        }
        spdx_packages.push(json!({
            "SPDXID": id,
            "name": p.name,
            "versionInfo": p.version,
            "supplier": "Organization: Debian",
            "downloadLocation": NOASSERTION,
            "filesAnalyzed": false,
            "licenseConcluded": NOASSERTION,
            "licenseDeclared": license,
            "copyrightText": NOASSERTION,
            "externalRefs": [{
                "referenceCategory": "PACKAGE-MANAGER",
                "referenceType": "purl",
                "referenceLocator": purl(p),
            }],
        }));
        relationships.push(json!({
            "spdxElementId": IMAGE_ID,
            "relationshipType": "CONTAINS",
            "relatedSpdxElement": id,
        }));
    }

    let mut doc = json!({
        "spdxVersion": "SPDX-2.3",
        "dataLicense": "CC0-1.0",
        "SPDXID": DOCUMENT_ID,
        "name": format!("{}-{}", m.name, m.version),
        "documentNamespace": namespace,
        "creationInfo": {
            "created": rfc3339_utc(m.source_date_epoch),
            "creators": [format!("Tool: kiln-{}", m.kiln_version)],
        },
        "packages": spdx_packages,
        "relationships": relationships,
    });
    if !extracted.is_empty() {
        let infos: Vec<Value> = extracted
            .into_iter()
            .map(|(id, (name, users))| {
                let users: Vec<String> = users.into_iter().collect();
                json!({
                    "licenseId": id,
                    "name": name,
                    "extractedText": format!(
                        "License short name \"{name}\" of Debian's machine-readable copyright format; \
                         its text is in {DOC_DIR}/<package>/copyright of: {}",
                        users.join(", ")
                    ),
                })
            })
            .collect();
        doc["hasExtractedLicensingInfos"] = Value::Array(infos);
    }
    doc
}

/// `want`, or `want-2`, `want-3`… if an element already has that id.
fn unique_id(taken: &mut BTreeSet<String>, want: &str) -> String {
    let mut id = want.to_string();
    let mut n = 1;
    while taken.contains(&id) {
        n += 1;
        id = format!("{want}-{n}");
    }
    taken.insert(id.clone());
    id
}

/// Writes `<out_dir>/sbom.spdx.json` and returns its path.
pub fn write(m: &Manifest, tree: &Path, out_dir: &Path) -> Result<PathBuf> {
    let doc = spdx_document(m, tree);
    let path = out_dir.join(FILE);
    let text = serde_json::to_string_pretty(&doc).context("serializing the SBOM")? + "\n";
    std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::host::exec::Cmd;
    use crate::stages::manifest::{Artifact, Verity};

    fn expr(dep5: &str) -> (Option<String>, Vec<String>) {
        let mut refs = BTreeMap::new();
        let e = parse_dep5_expression(dep5, &mut refs).map(|e| e.render());
        (e, refs.into_keys().collect())
    }

    #[test]
    fn dep5_short_names_map_to_spdx_expressions() {
        let cases = [
            ("GPL-2+", "GPL-2.0-or-later"),
            ("GPL-2", "GPL-2.0-only"),
            ("GPL-2.0+", "GPL-2.0-or-later"),
            ("GPL-2.0-only", "GPL-2.0-only"),
            ("GPL-3+", "GPL-3.0-or-later"),
            ("GPL", "GPL-1.0-or-later"),
            ("LGPL-2.1+", "LGPL-2.1-or-later"),
            ("LGPL-2.1", "LGPL-2.1-only"),
            ("LGPL-2", "LGPL-2.0-only"),
            ("LGPL-3+", "LGPL-3.0-or-later"),
            ("AGPL-3+", "AGPL-3.0-or-later"),
            ("GFDL-NIV-1.3+", "GFDL-1.3-no-invariants-or-later"),
            ("Expat", "MIT"),
            ("BSD-3-clause", "BSD-3-Clause"),
            ("BSD-2-clause", "BSD-2-Clause"),
            ("BSD-4-clause-UC", "BSD-4-Clause-UC"),
            ("Apache-2.0", "Apache-2.0"),
            ("Apache-2", "Apache-2.0"),
            ("ZLIB", "Zlib"),
            ("ISC", "ISC"),
            ("CC0", "CC0-1.0"),
            ("MPL-1.1+", "MPL-1.1+"),
            ("Artistic", "Artistic-1.0-Perl"),
            ("public-domain", "LicenseRef-public-domain"),
            ("GPL-2+ or Artistic-1.0", "Artistic-1.0 OR GPL-2.0-or-later"),
            ("GPL-1+ or Artistic", "Artistic-1.0-Perl OR GPL-1.0-or-later"),
            ("BSD-3-clause and BSD-3-clause-generic", "BSD-3-Clause AND LicenseRef-BSD-3-clause-generic"),
            // `and` binds tighter than `or`; a comma closes what is on its left.
            ("LGPL-3+ or GPL-2+ and Expat", "(GPL-2.0-or-later AND MIT) OR LGPL-3.0-or-later"),
            (
                "GPL-2+ or AFL-2.1, and Expat and Tcl-BSDish",
                "(AFL-2.1 OR GPL-2.0-or-later) AND LicenseRef-Tcl-BSDish AND MIT",
            ),
            ("GPL-2 with Linux-syscall-note exception", "GPL-2.0-only WITH Linux-syscall-note"),
            ("GPL-3+ with Bison exception", "GPL-3.0-or-later WITH Bison-exception-2.2"),
            ("GPL-3+-WITH-BISON-EXCEPTION", "GPL-3.0-or-later WITH Bison-exception-2.2"),
            ("GPL-3.0-or-later-WITH-Autoconf-exception-macro", "GPL-3.0-or-later WITH Autoconf-exception-macro"),
            ("Ms-PL", "MS-PL"),
            ("GPL-2+ with OpenSSL exception", "LicenseRef-GPL-2-plus-with-OpenSSL-exception"),
            ("GPL-2+-with-link-exception", "LicenseRef-GPL-2-plus-with-link-exception"),
            ("MIT/X11", "LicenseRef-MIT-X11"),
            ("GPL-7+", "LicenseRef-GPL-7-plus"),
        ];
        for (dep5, want) in cases {
            assert_eq!(expr(dep5).0.as_deref(), Some(want), "DEP-5 {dep5:?}");
        }
        assert_eq!(expr("GPL-2+ with OpenSSL exception or Expat").1, ["LicenseRef-GPL-2-plus-with-OpenSSL-exception"]);
        assert_eq!(expr("").0, None);
    }

    const DEP5: &str = "\
Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/
Upstream-Name: sample
License: GPL-2+

Files: *
Copyright: 2001 Someone
License: GPL-2+

Files: lib/*
Copyright: 2002 Someone Else
License:  BSD-3-clause

Files: lib/compat/*
Copyright: none
License: public-domain
 Whoever wrote this gave it away.
 .
 Really.

Files: perl/*
Copyright: 1990 Larry
License: GPL-1+ or Artistic

Files: perl/more/*
Copyright: 1991 Larry
License: Artistic or GPL-1+

Files: docs/*
Copyright: 2003 Someone
License: GPL-2+

License: GPL-2+
 This program is free software; you can redistribute it ...

License: public-domain
 The stand-alone text of public-domain.
";

    #[test]
    fn files_paragraphs_combine_with_and_sorted_and_deduplicated() {
        let d = dep5_license(DEP5).unwrap();
        assert_eq!(
            d.expression,
            "(Artistic-1.0-Perl OR GPL-1.0-or-later) AND BSD-3-Clause AND GPL-2.0-or-later AND LicenseRef-public-domain"
        );
        assert_eq!(d.refs, BTreeMap::from([("LicenseRef-public-domain".to_string(), "public-domain".to_string())]));
    }

    #[test]
    fn a_single_files_paragraph_is_not_parenthesized() {
        let text = "Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/\n\nFiles: *\nCopyright: x\nLicense: GPL-2+ or Expat\n";
        assert_eq!(dep5_license(text).unwrap().expression, "GPL-2.0-or-later OR MIT");
    }

    #[test]
    fn free_form_copyright_files_declare_nothing() {
        let text = "This is the Debian prepackaged version of foo.\n\nCopyright: 1999 Someone\n\nLicense: GPL-2+\n";
        assert_eq!(dep5_license(text), None);
        // DEP-5 without Files paragraphs says nothing about the files either.
        assert_eq!(dep5_license("Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/\n"), None);
    }

    #[test]
    fn license_of_reads_the_tree_and_follows_links_inside_it() {
        let tree = tempfile::tempdir().unwrap();
        let doc = tree.path().join(DOC_DIR);
        std::fs::create_dir_all(doc.join("gcc-14-base")).unwrap();
        std::fs::write(doc.join("gcc-14-base/copyright"), DEP5).unwrap();
        std::os::unix::fs::symlink("gcc-14-base", doc.join("libgcc-s1")).unwrap();
        // An absolute link means the image's root, never the host's.
        std::os::unix::fs::symlink("/usr/share/doc/gcc-14-base", doc.join("libstdc++6")).unwrap();
        std::fs::create_dir_all(doc.join("free")).unwrap();
        std::fs::write(doc.join("free/copyright"), "Copyright 1999 Someone. GPL.\n").unwrap();
        std::os::unix::fs::symlink("loop", doc.join("loop")).unwrap();

        let want = dep5_license(DEP5).map(|d| d.expression);
        assert!(want.is_some());
        for p in ["gcc-14-base", "libgcc-s1", "libstdc++6"] {
            assert_eq!(license_of(tree.path(), p), want, "{p}");
        }
        for p in ["free", "loop", "missing", "..", ""] {
            assert_eq!(license_of(tree.path(), p), None, "{p}");
        }
    }

    #[test]
    fn created_is_rfc3339_utc_without_a_clock() {
        let cases = [
            (0, "1970-01-01T00:00:00Z"),
            (951_782_400, "2000-02-29T00:00:00Z"),
            (1_709_251_199, "2024-02-29T23:59:59Z"),
            (1_795_320_626, "2026-11-22T04:10:26Z"),
            (4_107_542_399, "2100-02-28T23:59:59Z"),
            (253_402_300_799, "9999-12-31T23:59:59Z"),
        ];
        for (epoch, want) in cases {
            assert_eq!(rfc3339_utc(epoch), want, "{epoch}");
        }
    }

    #[test]
    fn purls_percent_encode_epochs_and_pluses() {
        let p = |name: &str, version: &str, arch: &str| {
            purl(&Package { name: name.into(), version: version.into(), arch: arch.into() })
        };
        assert_eq!(p("bash", "5.2.37-2+b5", "amd64"), "pkg:deb/debian/bash@5.2.37-2%2Bb5?arch=amd64");
        assert_eq!(p("libstdc++6", "14.2.0-19", "amd64"), "pkg:deb/debian/libstdc%2B%2B6@14.2.0-19?arch=amd64");
        assert_eq!(p("perl-base", "1:5.40.1-6~bpo1", "all"), "pkg:deb/debian/perl-base@1%3A5.40.1-6~bpo1?arch=all");
    }

    fn package(name: &str, version: &str) -> Package {
        Package { name: name.into(), version: version.into(), arch: "amd64".into() }
    }

    fn fake_manifest(packages: Vec<Package>) -> Manifest {
        Manifest {
            kiln_version: "0.1.0".into(),
            name: "minimal-pc-uefi".into(),
            profile: "minimal".into(),
            profile_chain: vec!["profiles/minimal.toml".into()],
            image: "pc-uefi".into(),
            arch: "amd64".into(),
            suite: "trixie".into(),
            version: "1.2.3".into(),
            source_date_epoch: 1_795_320_626,
            sources: vec![],
            kernel: "6.12.0-amd64".into(),
            kernel_cmdline: String::new(),
            verity: Verity {
                root_hash: "00".repeat(32),
                hash_offset: 0,
                salt: String::new(),
                data_block_size: 4096,
                hash_block_size: 4096,
            },
            partition_table: "gpt".into(),
            partitions: vec![],
            artifacts: BTreeMap::from([("disk.img".to_string(), Artifact { sha256: "ab".repeat(32), size: 1 })]),
            packages,
            host_tools: BTreeMap::new(),
            qemu: crate::config::image::Qemu {
                system: "x86_64".into(),
                machine: "q35".into(),
                cpu: "max".into(),
                memory: "1G".into(),
                smp: 1,
                firmware: crate::config::image::Firmware::Ovmf,
                dtb: None,
                console: None,
            },
            security: Default::default(),
        }
    }

    /// A tree with a DEP-5 file, a link to it, a free-form file and one package without docs.
    fn fake_tree() -> (tempfile::TempDir, Manifest) {
        let tree = tempfile::tempdir().unwrap();
        let doc = tree.path().join(DOC_DIR);
        std::fs::create_dir_all(doc.join("base-files")).unwrap();
        std::fs::write(doc.join("base-files/copyright"), DEP5).unwrap();
        std::os::unix::fs::symlink("base-files", doc.join("libstdc++6")).unwrap();
        std::fs::create_dir_all(doc.join("debian-archive-keyring")).unwrap();
        std::fs::write(doc.join("debian-archive-keyring/copyright"), "Free-form text.\n").unwrap();
        let m = fake_manifest(vec![
            package("libstdc++6", "14.2.0-19"),
            package("base-files", "13.8+deb13u1"),
            package("debian-archive-keyring", "2025.1"),
            package("perl-base", "1:5.40.1-6"),
        ]);
        (tree, m)
    }

    #[test]
    fn document_describes_the_image_and_each_package_deterministically() {
        let (tree, m) = fake_tree();
        let doc = spdx_document(&m, tree.path());
        let mut shuffled = m.clone();
        shuffled.packages.reverse();
        assert_eq!(spdx_document(&shuffled, tree.path()), doc);

        assert_eq!(doc["spdxVersion"], "SPDX-2.3");
        assert_eq!(doc["name"], "minimal-pc-uefi-1.2.3");
        assert_eq!(doc["creationInfo"]["created"], "2026-11-22T04:10:26Z");
        assert_eq!(doc["creationInfo"]["creators"], json!(["Tool: kiln-0.1.0"]));
        let ns = doc["documentNamespace"].as_str().unwrap();
        assert!(ns.starts_with("https://spdx.kiln.invalid/minimal-pc-uefi/1.2.3/"), "{ns}");
        let mut other = m.clone();
        other.packages[0].version = "14.2.0-20".into();
        assert_ne!(spdx_document(&other, tree.path())["documentNamespace"], doc["documentNamespace"]);

        let packages = doc["packages"].as_array().unwrap();
        let image = &packages[0];
        assert_eq!(image["SPDXID"], IMAGE_ID);
        assert_eq!(image["primaryPackagePurpose"], "OPERATING-SYSTEM");
        assert_eq!(image["checksums"][0]["checksumValue"], "ab".repeat(32));
        let names: Vec<&str> = packages[1..].iter().map(|p| p["name"].as_str().unwrap()).collect();
        assert_eq!(names, ["base-files", "debian-archive-keyring", "libstdc++6", "perl-base"]);
        let perl = &packages[4];
        assert_eq!(perl["SPDXID"], "SPDXRef-Package-deb-perl-base-1-5.40.1-6-amd64");
        assert_eq!(perl["licenseDeclared"], NOASSERTION);
        assert_eq!(perl["externalRefs"][0]["referenceLocator"], "pkg:deb/debian/perl-base@1%3A5.40.1-6?arch=amd64");
        assert_eq!(packages[2]["licenseDeclared"], NOASSERTION);
        assert_eq!(packages[3]["licenseDeclared"], packages[1]["licenseDeclared"]);
        assert_eq!(packages[3]["SPDXID"], "SPDXRef-Package-deb-libstdc-6-14.2.0-19-amd64");

        let rels = doc["relationships"].as_array().unwrap();
        assert_eq!(
            rels[0],
            json!({"spdxElementId": DOCUMENT_ID, "relationshipType": "DESCRIBES", "relatedSpdxElement": IMAGE_ID})
        );
        assert_eq!(rels.len(), 5);
        assert!(rels[1..]
            .iter()
            .zip(&packages[1..])
            .all(|(r, p)| r["relationshipType"] == "CONTAINS" && r["relatedSpdxElement"] == p["SPDXID"]));

        let infos = doc["hasExtractedLicensingInfos"].as_array().unwrap();
        assert_eq!(infos.len(), 1);
        assert_eq!(infos[0]["licenseId"], "LicenseRef-public-domain");
        assert!(infos[0]["extractedText"].as_str().unwrap().ends_with("of: base-files, libstdc++6"));
    }

    #[test]
    fn sanitized_ids_that_collide_stay_unique() {
        let tree = tempfile::tempdir().unwrap();
        let m = fake_manifest(vec![package("a", "1+b1"), package("a", "1:b1")]);
        let doc = spdx_document(&m, tree.path());
        let ids: BTreeSet<&str> =
            doc["packages"].as_array().unwrap().iter().map(|p| p["SPDXID"].as_str().unwrap()).collect();
        assert_eq!(ids.len(), 3);
    }

    fn spdx_validate(file: &Path) -> Result<Vec<u8>, crate::host::exec::ExecError> {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/spdx-validate");
        Cmd::new(script).arg(file).output()
    }

    #[test]
    fn written_sbom_passes_the_spdx_validator() {
        if !crate::testing::allows(
            "written_sbom_passes_the_spdx_validator",
            nix::unistd::geteuid().is_root() || std::env::var_os("KILN_VENV").is_some(),
            "root (the validator's venv is made in /opt/kiln-venv) or KILN_VENV naming a writable directory",
        ) {
            return;
        }
        let (tree, m) = fake_tree();
        let out = tempfile::tempdir().unwrap();
        let path = write(&m, tree.path(), out.path()).unwrap();
        assert_eq!(path, out.path().join(FILE));
        if let Err(e) = spdx_validate(&path) {
            panic!("{e}");
        }
    }

    #[test]
    fn spdx_validator_rejects_broken_documents() {
        if !crate::testing::allows(
            "spdx_validator_rejects_broken_documents",
            nix::unistd::geteuid().is_root() || std::env::var_os("KILN_VENV").is_some(),
            "root (the validator's venv is made in /opt/kiln-venv) or KILN_VENV naming a writable directory",
        ) {
            return;
        }
        let (tree, m) = fake_tree();
        let good = spdx_document(&m, tree.path());
        let out = tempfile::tempdir().unwrap();

        let mut no_id = good.clone();
        no_id["packages"][1].as_object_mut().unwrap().remove("SPDXID");
        let mut undeclared_ref = good.clone();
        undeclared_ref.as_object_mut().unwrap().remove("hasExtractedLicensingInfos");
        let mut bad_expression = good;
        bad_expression["packages"][1]["licenseDeclared"] = json!("GPL-2+ or Artistic");

        let cases = [
            ("no-id", no_id, "spdx_id"),
            ("undeclared-ref", undeclared_ref, "Unrecognized license reference: LicenseRef-public-domain"),
            ("bad-expression", bad_expression, "Unrecognized license reference: GPL-2+"),
        ];
        for (name, doc, why) in cases {
            let path = out.path().join(format!("{name}.spdx.json"));
            std::fs::write(&path, serde_json::to_string_pretty(&doc).unwrap()).unwrap();
            match spdx_validate(&path) {
                Err(crate::host::exec::ExecError::Failed { stderr_tail, .. }) => {
                    assert!(stderr_tail.contains(why), "{name}: {stderr_tail}")
                }
                other => panic!("{name}: expected the validator to reject it, got {other:?}"),
            }
        }
    }
}
