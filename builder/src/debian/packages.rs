//! `Packages` indexes: one entry per binary package.

use super::*;

/// One binary package as a `Packages` index lists it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PackageEntry {
    pub name: String,
    pub version: String,
    pub arch: String,
    /// Path of the .deb relative to the mirror root (`pool/main/…`).
    pub filename: String,
    pub size: u64,
    /// Lowercase hex.
    pub sha256: String,
    /// The source package's name when it differs from the binary's (the `Source` field without
    /// its "(version)" part, which is there only when the versions differ too).
    pub source: Option<String>,
}

/// Parses the text of a `Packages` file. A paragraph without Package, Version, Architecture,
/// Filename, Size or SHA256 is an error naming its package (or its line when the package is
/// unknown), as is one of those fields (or Source) given twice, or a malformed Size or SHA256.
pub fn parse_packages(text: &str) -> Result<Vec<PackageEntry>, DebianError> {
    let paras = paragraphs(text).map_err(|e| DebianError::Packages {
        line: e.paragraph_line,
        package: None,
        problem: e.problem,
    })?;
    paras.iter().map(package_entry).collect()
}

pub(crate) fn package_entry(p: &Paragraph<'_>) -> Result<PackageEntry, DebianError> {
    // One pass over the fields (a Packages file has ~70,000 paragraphs of ~20 fields).
    const FIELDS: [&str; 7] = ["Package", "Version", "Architecture", "Filename", "Size", "SHA256", "Source"];
    let mut values: [Option<&str>; 7] = [None; 7];
    let mut twice = None;
    for f in &p.fields {
        if let Some(k) = FIELDS.iter().position(|n| n.len() == f.name.len() && n.eq_ignore_ascii_case(f.name)) {
            if values[k].replace(f.value).is_some() && twice.is_none() {
                twice = Some(f.name);
            }
        }
    }
    let [package, version, architecture, filename, size, sha256, source] = values;
    let err = |problem: String| DebianError::Packages {
        line: p.line,
        package: package.filter(|v| !v.is_empty()).map(str::to_string),
        problem,
    };
    if let Some(field) = twice {
        return Err(err(format!("field {field} appears twice")));
    }
    let required = |value: Option<&'_ str>, field: &str| match value {
        Some(v) if !v.is_empty() => Ok(v.to_string()),
        _ => Err(err(format!("missing field {field}"))),
    };
    let name = required(package, "Package")?;
    let size_text = required(size, "Size")?;
    let size =
        size_text.parse::<u64>().map_err(|_| err(format!("Size: expected a number of bytes, found {size_text:?}")))?;
    let sha256 = required(sha256, "SHA256")?;
    if !is_sha256(&sha256) {
        return Err(err(format!("SHA256: expected 64 hex digits, found {sha256:?}")));
    }
    Ok(PackageEntry {
        name,
        version: required(version, "Version")?,
        arch: required(architecture, "Architecture")?,
        filename: required(filename, "Filename")?,
        size,
        sha256: sha256.to_ascii_lowercase(),
        source: source.and_then(|s| s.split_whitespace().next()).map(str::to_string),
    })
}

pub(crate) fn is_sha256(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|c| c.is_ascii_hexdigit())
}
