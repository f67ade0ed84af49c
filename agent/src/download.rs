//! Downloads for the agent: small documents (metadata, signatures) and artifacts streamed into
//! a partition or staging file, verified while they stream, resumable with HTTP Range.
//!
//! Resuming: the caller records how many bytes are durably written (`progress` is called only
//! after `sync_data`). A later call with that `start` first re-reads and hashes the bytes
//! already there (a local read is cheap; hash states are not persisted), then asks the server
//! for the rest. A corrupted prefix cannot be told before the end: it shows as a hash mismatch,
//! and the caller starts that artifact again from 0.

use anyhow::{Context as _, Result};
use reqwest::blocking::Client;
use reqwest::header::{CONTENT_RANGE, RANGE};
use reqwest::StatusCode;
use sha2::{Digest, Sha256};
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::time::Duration;

const CHUNK: usize = 1 << 20;
/// Progress is made durable (and reported) every this many bytes.
const SYNC_EVERY: u64 = 8 << 20;
const ATTEMPTS: u32 = 5;

pub struct Expect {
    pub size: u64,
    pub sha256: [u8; 32],
}

#[derive(Debug, Clone, PartialEq)]
pub struct Report {
    /// Bytes that came over the network in this call.
    pub downloaded_bytes: u64,
    pub resumed_from: u64,
    pub attempts: u32,
}

#[derive(Debug, thiserror::Error)]
pub enum DownloadError {
    #[error("{url}: the server answered {status}")]
    Http { url: String, status: StatusCode },
    #[error("{url}: {source}")]
    Network { url: String, source: reqwest::Error },
    #[error("{url}: truncated: the server ended at {got} of {expected} bytes")]
    Truncated { url: String, got: u64, expected: u64 },
    #[error("{url}: the artifact is larger than the metadata says ({expected} bytes)")]
    TooLarge { url: String, expected: u64 },
    #[error("{url}: sha256 mismatch: expected {expected}, got {actual}")]
    HashMismatch { url: String, expected: String, actual: String },
    #[error("{what}: {source}")]
    Io { what: String, source: std::io::Error },
}

/// The HTTP client: rustls (ring) with the system's CA certificates, bounded timeouts.
pub fn client() -> Result<Client> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    Client::builder()
        .user_agent(concat!("kiln-agent/", env!("CARGO_PKG_VERSION")))
        .connect_timeout(Duration::from_secs(20))
        // For the blocking client this bounds each read of the body, not the whole download.
        .timeout(Duration::from_secs(60))
        .build()
        .context("setting up the HTTP client")
}

/// A small document (metadata, signature), refused above `limit` bytes.
pub fn fetch_small(client: &Client, url: &str, limit: u64) -> Result<Vec<u8>> {
    let resp = client.get(url).send().map_err(|e| DownloadError::Network { url: url.into(), source: e })?;
    if !resp.status().is_success() {
        return Err(DownloadError::Http { url: url.into(), status: resp.status() }.into());
    }
    let mut body = Vec::new();
    resp.take(limit + 1).read_to_end(&mut body).with_context(|| format!("{url}: reading the body"))?;
    if body.len() as u64 > limit {
        anyhow::bail!("{url}: larger than {limit} bytes; not a kiln metadata document");
    }
    Ok(body)
}

/// Streams `url` into `dest` at offsets [start, size), after hashing [0, start) from `dest`.
pub fn download(
    client: &Client,
    url: &str,
    expect: &Expect,
    dest: &mut std::fs::File,
    start: u64,
    progress: &mut dyn FnMut(u64) -> Result<()>,
) -> Result<Report, DownloadError> {
    let io = |what: String| move |source| DownloadError::Io { what, source };
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; CHUNK];
    let start = start.min(expect.size);
    // Hash what an earlier attempt wrote.
    let mut pos = 0u64;
    while pos < start {
        let n = ((start - pos) as usize).min(CHUNK);
        dest.read_exact_at(&mut buf[..n], pos).map_err(io(format!("re-reading the first {start} bytes written")))?;
        hasher.update(&buf[..n]);
        pos += n as u64;
    }
    let mut report = Report { downloaded_bytes: 0, resumed_from: start, attempts: 0 };
    let mut synced = pos;
    let mut stalled_at = None;
    while pos < expect.size || report.attempts == 0 {
        report.attempts += 1;
        let mut req = client.get(url);
        if pos > 0 {
            req = req.header(RANGE, format!("bytes={pos}-"));
        }
        let resp = match req.send() {
            Ok(r) => r,
            Err(e) if report.attempts < ATTEMPTS => {
                eprintln!("kiln-agent: {url}: {e}; retrying");
                std::thread::sleep(Duration::from_secs(report.attempts as u64));
                continue;
            }
            Err(e) => return Err(DownloadError::Network { url: url.into(), source: e }),
        };
        match resp.status() {
            StatusCode::PARTIAL_CONTENT => {
                let from = resp
                    .headers()
                    .get(CONTENT_RANGE)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.strip_prefix("bytes "))
                    .and_then(|v| v.split('-').next())
                    .and_then(|v| v.parse::<u64>().ok());
                if from != Some(pos) {
                    return Err(DownloadError::Http { url: url.into(), status: resp.status() });
                }
            }
            StatusCode::OK => {
                if pos > 0 {
                    // The server ignored the Range: start over from byte 0.
                    hasher = Sha256::new();
                    pos = 0;
                    synced = 0;
                }
            }
            StatusCode::RANGE_NOT_SATISFIABLE if pos > 0 => {
                if pos < expect.size {
                    return Err(DownloadError::Truncated { url: url.into(), got: pos, expected: expect.size });
                }
                break;
            }
            s => return Err(DownloadError::Http { url: url.into(), status: s }),
        }
        let mut body = resp;
        loop {
            let n = match body.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) => {
                    eprintln!("kiln-agent: {url}: connection lost at {pos} of {} bytes: {e}", expect.size);
                    break;
                }
            };
            if pos + n as u64 > expect.size {
                return Err(DownloadError::TooLarge { url: url.into(), expected: expect.size });
            }
            dest.write_all_at(&buf[..n], pos).map_err(io(format!("writing at byte {pos}")))?;
            hasher.update(&buf[..n]);
            pos += n as u64;
            report.downloaded_bytes += n as u64;
            if pos - synced >= SYNC_EVERY {
                dest.sync_data().map_err(io("syncing".into()))?;
                synced = pos;
                progress(pos).map_err(|e| DownloadError::Io {
                    what: "recording progress".into(),
                    source: std::io::Error::other(format!("{e:#}")),
                })?;
            }
        }
        if pos >= expect.size {
            break;
        }
        // Ended early: try again from here, unless the server keeps ending at the same byte.
        if stalled_at == Some(pos) || report.attempts >= ATTEMPTS {
            return Err(DownloadError::Truncated { url: url.into(), got: pos, expected: expect.size });
        }
        stalled_at = Some(pos);
        std::thread::sleep(Duration::from_secs(report.attempts as u64));
    }
    dest.sync_data().map_err(io("syncing".into()))?;
    let actual: [u8; 32] = hasher.finalize().into();
    if actual != expect.sha256 {
        return Err(DownloadError::HashMismatch {
            url: url.into(),
            expected: hex::encode(expect.sha256),
            actual: hex::encode(actual),
        });
    }
    progress(pos).map_err(|e| DownloadError::Io {
        what: "recording progress".into(),
        source: std::io::Error::other(format!("{e:#}")),
    })?;
    Ok(report)
}
