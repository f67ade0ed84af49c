//! Fetching one suite's verified `Packages` index from a mirror (size + SHA256 checked before decompression).

use super::*;

/// How patient the HTTP client is.
#[derive(Clone, Debug)]
pub struct FetchConfig {
    /// For connecting to the mirror.
    pub connect_timeout: Duration,
    /// For the response to start, and for each read of its body (a stall, not the whole
    /// download).
    pub timeout: Duration,
}

impl Default for FetchConfig {
    fn default() -> FetchConfig {
        FetchConfig { connect_timeout: Duration::from_secs(15), timeout: Duration::from_secs(30) }
    }
}

/// Release and InRelease files are small (trixie's is about 150 KiB).
pub(crate) const RELEASE_LIMIT: u64 = 64 << 20;
/// Largest decompressed Packages file accepted when the Release file does not list its size.
pub(crate) const PACKAGES_LIMIT: u64 = 2 << 30;

/// Downloads archive indexes from a mirror; one HTTP client, reused for every request.
pub struct Fetcher {
    client: reqwest::blocking::Client,
    config: FetchConfig,
}

impl Fetcher {
    pub fn new(config: FetchConfig) -> Result<Fetcher, DebianError> {
        // HTTPS mirrors through rustls with the ring provider (the agent uses the same; no
        // aws-lc). Installing it twice is harmless.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let client = reqwest::blocking::Client::builder()
            .user_agent(concat!("kiln/", env!("CARGO_PKG_VERSION")))
            .connect_timeout(config.connect_timeout)
            .timeout(config.timeout)
            .build()
            .map_err(|e| DebianError::Client { detail: error_chain(&e) })?;
        Ok(Fetcher { client, config })
    }

    /// The suite's Release file: `dists/<suite>/Release`, else `dists/<suite>/InRelease`.
    /// It must be for `suite` (by its Suite or Codename field).
    pub fn release(&self, mirror: &str, suite: &str) -> Result<Release, DebianError> {
        self.release_with_url(mirror, suite).map(|(_, r)| r)
    }

    fn release_with_url(&self, mirror: &str, suite: &str) -> Result<(String, Release), DebianError> {
        let base = suite_url(mirror, suite);
        let urls = [format!("{base}/Release"), format!("{base}/InRelease")];
        for url in &urls {
            let bytes = match self.get(url, RELEASE_LIMIT) {
                Ok(bytes) => bytes,
                Err(DebianError::Status { status: 404, .. }) => continue,
                Err(e) => return Err(e),
            };
            let release = parse_release(&String::from_utf8_lossy(&bytes)).map_err(|e| e.at(url))?;
            if release.suite != suite && release.codename != suite {
                return Err(DebianError::WrongSuite {
                    url: url.clone(),
                    asked: suite.to_string(),
                    suite: release.suite,
                    codename: release.codename,
                });
            }
            return Ok((url.clone(), release));
        }
        Err(DebianError::NoRelease { suite: suite.to_string(), urls })
    }

    /// The suite's `Packages` index for one component and architecture: the first of
    /// `Packages.xz`, `Packages.gz`, `Packages` that the Release file lists and the mirror has
    /// (by hash when the Release file allows it), checked against the Release file's size and
    /// SHA256, decompressed (and checked again when the Release file lists the plain file).
    pub fn packages(
        &self,
        mirror: &str,
        suite: &str,
        component: &str,
        arch: &str,
    ) -> Result<Vec<PackageEntry>, DebianError> {
        let (release_url, release) = self.release_with_url(mirror, suite)?;
        let base = suite_url(mirror, suite);
        let dir = format!("{component}/binary-{arch}");
        let plain_path = format!("{dir}/Packages");
        let mut tried = Vec::new();
        for compression in [Compression::Xz, Compression::Gz, Compression::None] {
            let path = format!("{plain_path}{}", compression.extension());
            let Some(digest) = release.sha256.get(&path) else { continue };
            let mut urls = Vec::new();
            if release.acquire_by_hash {
                urls.push(format!("{base}/{dir}/by-hash/SHA256/{}", digest.sha256));
            }
            urls.push(format!("{base}/{path}"));
            for url in urls {
                let bytes = match self.get(&url, digest.size) {
                    Ok(bytes) => bytes,
                    Err(DebianError::Status { status: 404, .. }) => {
                        tried.push(url);
                        continue;
                    }
                    Err(DebianError::TooLarge { url, limit }) => {
                        return Err(DebianError::SizeMismatch {
                            url,
                            expected: limit,
                            got: format!("more than {limit}"),
                        })
                    }
                    Err(e) => return Err(e),
                };
                verify(&url, &bytes, digest)?;
                let plain_digest =
                    if compression == Compression::None { None } else { release.sha256.get(&plain_path) };
                let text = decompress(&url, compression, bytes, plain_digest)?;
                return parse_packages(&String::from_utf8_lossy(&text)).map_err(|e| e.at(&url));
            }
        }
        Err(DebianError::NoPackagesIndex { release_url, path: plain_path, tried })
    }

    /// GETs a file of at most `size` bytes (a .deb whose size an index gave, a device's status
    /// feed), refusing anything larger.
    pub fn file(&self, url: &str, size: u64) -> Result<Vec<u8>, DebianError> {
        self.get(url, size)
    }

    /// GETs `url`, refusing a body larger than `limit` bytes.
    fn get(&self, url: &str, limit: u64) -> Result<Vec<u8>, DebianError> {
        let timeout = |url: &str| DebianError::Timeout { url: url.to_string(), after: self.config.timeout };
        let response = self.client.get(url).send().map_err(|e| {
            if e.is_timeout() {
                timeout(url)
            } else {
                DebianError::Http { url: url.to_string(), detail: error_chain(&e.without_url()) }
            }
        })?;
        let status = response.status();
        if !status.is_success() {
            return Err(DebianError::Status { url: url.to_string(), status: status.as_u16() });
        }
        if response.content_length().is_some_and(|n| n > limit) {
            return Err(DebianError::TooLarge { url: url.to_string(), limit });
        }
        let mut body = Vec::new();
        response.take(limit.saturating_add(1)).read_to_end(&mut body).map_err(|e| {
            let reqwest_timeout =
                e.get_ref().and_then(|i| i.downcast_ref::<reqwest::Error>()).is_some_and(|r| r.is_timeout());
            if reqwest_timeout || e.kind() == std::io::ErrorKind::TimedOut {
                timeout(url)
            } else {
                DebianError::Http { url: url.to_string(), detail: format!("reading the body: {}", error_chain(&e)) }
            }
        })?;
        if body.len() as u64 > limit {
            return Err(DebianError::TooLarge { url: url.to_string(), limit });
        }
        Ok(body)
    }
}

/// Fetches the `Packages` index of `<mirror>/dists/<suite>` for one component and architecture,
/// verified against the suite's Release file (see [`Fetcher::packages`]), with the default
/// [`FetchConfig`].
pub fn fetch_packages(
    mirror: &str,
    suite: &str,
    component: &str,
    arch: &str,
) -> Result<Vec<PackageEntry>, DebianError> {
    Fetcher::new(FetchConfig::default())?.packages(mirror, suite, component, arch)
}

pub(crate) fn suite_url(mirror: &str, suite: &str) -> String {
    format!("{}/dists/{suite}", mirror.trim_end_matches('/'))
}

/// An error and its sources, "outer: inner: innermost".
pub(crate) fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(inner) = source {
        let text = inner.to_string();
        if !s.contains(&text) {
            s.push_str(": ");
            s.push_str(&text);
        }
        source = inner.source();
    }
    s
}

pub(crate) fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// Checks a download against the Release file's digest.
pub(crate) fn verify(url: &str, bytes: &[u8], digest: &FileDigest) -> Result<(), DebianError> {
    if bytes.len() as u64 != digest.size {
        return Err(DebianError::SizeMismatch {
            url: url.to_string(),
            expected: digest.size,
            got: bytes.len().to_string(),
        });
    }
    let got = sha256_hex(bytes);
    if got != digest.sha256 {
        return Err(DebianError::HashMismatch { url: url.to_string(), expected: digest.sha256.clone(), got });
    }
    Ok(())
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Compression {
    Xz,
    Gz,
    None,
}

impl Compression {
    fn extension(self) -> &'static str {
        match self {
            Compression::Xz => ".xz",
            Compression::Gz => ".gz",
            Compression::None => "",
        }
    }
}

/// A `Vec` that refuses to grow past `limit` bytes.
pub(crate) struct BoundedVec {
    bytes: Vec<u8>,
    limit: u64,
}

impl Write for BoundedVec {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if (self.bytes.len() + buf.len()) as u64 > self.limit {
            return Err(std::io::Error::other(format!("decompressed data is larger than {} bytes", self.limit)));
        }
        self.bytes.extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Decompresses a verified download; when the Release file lists the plain file too, the result
/// is checked against that as well.
pub(crate) fn decompress(
    url: &str,
    compression: Compression,
    bytes: Vec<u8>,
    plain: Option<&FileDigest>,
) -> Result<Vec<u8>, DebianError> {
    let limit = plain.map_or(PACKAGES_LIMIT, |d| d.size);
    // Reserve the listed size, or a guess (Packages files compress about 6:1).
    let capacity = plain.map_or(bytes.len().saturating_mul(6), |d| usize::try_from(d.size).unwrap_or(0));
    let mut out = BoundedVec { bytes: Vec::with_capacity(capacity.min(512 << 20)), limit };
    let failed = |detail: String| DebianError::Decompress { url: url.to_string(), detail };
    match compression {
        Compression::None => return Ok(bytes),
        Compression::Xz => lzma_rs::xz_decompress(&mut &bytes[..], &mut out).map_err(|e| failed(e.to_string()))?,
        Compression::Gz => {
            std::io::copy(&mut flate2::read::MultiGzDecoder::new(&bytes[..]), &mut out)
                .map_err(|e| failed(e.to_string()))?;
        }
    }
    if let Some(digest) = plain {
        verify(&format!("{url} (decompressed)"), &out.bytes, digest)?;
    }
    Ok(out.bytes)
}
