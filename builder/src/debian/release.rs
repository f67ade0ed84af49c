//! `Release`/`InRelease`: the suite's index of indexes, with sizes and SHA256.

use super::*;

/// Size and SHA256 of one file as a Release file lists it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FileDigest {
    pub size: u64,
    /// Lowercase hex.
    pub sha256: String,
}

/// What kiln needs from a suite's `Release` (or `InRelease`) file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Release {
    /// "trixie", "trixie-security", …
    pub codename: String,
    /// "stable", "stable-security", …
    pub suite: String,
    /// As written, e.g. "Sat, 10 May 2025 09:03:47 UTC".
    pub date: String,
    /// Whether files may be fetched by their hash (`by-hash/SHA256/<hex>`).
    pub acquire_by_hash: bool,
    /// Path relative to the suite's directory (`main/binary-amd64/Packages.xz`) -> digest.
    pub sha256: BTreeMap<String, FileDigest>,
}

/// Parses a `Release` file, or an `InRelease` file (its clear-signing armor is removed; the
/// signature is not checked). Codename, Suite, Date and SHA256 are required.
pub fn parse_release(text: &str) -> Result<Release, DebianError> {
    let text = strip_clearsign(text)?;
    let err = |problem: String| DebianError::Release { problem };
    let paras = paragraphs(&text).map_err(|e| err(e.problem))?;
    let Some(p) = paras.first() else { return Err(err("empty file".to_string())) };
    let required = |field: &str| match p.get(field) {
        Some(v) if !v.is_empty() || field == "SHA256" => Ok(v.to_string()),
        _ => Err(err(format!("missing field {field}"))),
    };
    let sha256_text = required("SHA256")?;
    let mut sha256 = BTreeMap::new();
    for line in sha256_text.lines().map(str::trim).filter(|l| !l.is_empty()) {
        let bad = || err(format!("SHA256: expected \"<sha256> <size> <path>\", found {line:?}"));
        let mut words = line.split_whitespace();
        let (Some(hash), Some(size), Some(path), None) = (words.next(), words.next(), words.next(), words.next())
        else {
            return Err(bad());
        };
        let size = size.parse::<u64>().map_err(|_| bad())?;
        if !is_sha256(hash) {
            return Err(bad());
        }
        sha256.insert(path.to_string(), FileDigest { size, sha256: hash.to_ascii_lowercase() });
    }
    if sha256.is_empty() {
        return Err(err("SHA256: lists no files".to_string()));
    }
    Ok(Release {
        codename: required("Codename")?,
        suite: required("Suite")?,
        date: required("Date")?,
        acquire_by_hash: p.get("Acquire-By-Hash").is_some_and(|v| v.eq_ignore_ascii_case("yes")),
        sha256,
    })
}

/// Removes OpenPGP clear-signing (RFC 4880 §7) from an InRelease file; other text is returned
/// as it is.
pub(crate) fn strip_clearsign(text: &str) -> Result<Cow<'_, str>, DebianError> {
    const BEGIN: &str = "-----BEGIN PGP SIGNED MESSAGE-----";
    const SIGNATURE: &str = "-----BEGIN PGP SIGNATURE-----";
    let mut lines = text.lines().skip_while(|l| l.trim().is_empty());
    if lines.next().map(str::trim_end) != Some(BEGIN) {
        return Ok(Cow::Borrowed(text));
    }
    // Armor headers ("Hash: SHA512") up to the first empty line.
    for line in lines.by_ref() {
        if line.trim().is_empty() {
            break;
        }
    }
    let mut body = String::with_capacity(text.len());
    for line in lines {
        if line.trim_end() == SIGNATURE {
            return Ok(Cow::Owned(body));
        }
        body.push_str(line.strip_prefix("- ").unwrap_or(line));
        body.push('\n');
    }
    Err(DebianError::Release { problem: format!("clear-signed text has no {SIGNATURE} line") })
}
