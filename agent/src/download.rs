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
use std::time::{Duration, Instant};

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

/// How slow a download may be before it is given up (a later check resumes it): at least
/// `min_bytes` in every `window`, and finished by `deadline`. A per-read timeout alone let a
/// server sending one byte a minute hold every future check (TUF's slow-retrieval attack).
#[derive(Clone, Copy, Debug)]
pub struct Pace {
    pub window: Duration,
    pub min_bytes: u64,
    pub deadline: Instant,
}

/// An install's downloads end within this (kiln-agent.service's TimeoutStartSec, which also
/// covers a backup before the update, is the backstop).
pub const CHECK_DEADLINE: Duration = Duration::from_secs(3 * 3600);
/// Small documents (metadata, signatures) take at most this, however they trickle in.
const SMALL_DEADLINE: Duration = Duration::from_secs(120);

impl Pace {
    /// 64 KiB a minute at least (about 1 KiB/s), done within `CHECK_DEADLINE` of `started`
    /// (the whole root image at that pace would take longer: a link that slow is reported).
    pub fn standard(started: Instant) -> Pace {
        Pace { window: Duration::from_secs(60), min_bytes: 64 << 10, deadline: started + CHECK_DEADLINE }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DownloadError {
    #[error("{url}: too slow: {detail}; stopped at {got} of {expected} bytes")]
    TooSlow { url: String, got: u64, expected: u64, detail: String },
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
    fetch_small_within(client, url, limit, SMALL_DEADLINE)
}

fn fetch_small_within(client: &Client, url: &str, limit: u64, within: Duration) -> Result<Vec<u8>> {
    let started = Instant::now();
    let resp = client.get(url).send().map_err(|e| DownloadError::Network { url: url.into(), source: e })?;
    if !resp.status().is_success() {
        return Err(DownloadError::Http { url: url.into(), status: resp.status() }.into());
    }
    let mut body = Vec::new();
    let mut reader = resp.take(limit + 1);
    let mut buf = [0u8; 16 << 10];
    loop {
        let n = reader.read(&mut buf).with_context(|| format!("{url}: reading the body"))?;
        if n == 0 {
            break;
        }
        body.extend_from_slice(&buf[..n]);
        if started.elapsed() > within {
            return Err(DownloadError::TooSlow {
                url: url.into(),
                got: body.len() as u64,
                expected: limit,
                detail: format!("not received within {within:?}"),
            }
            .into());
        }
    }
    if body.len() as u64 > limit {
        anyhow::bail!("{url}: larger than {limit} bytes; not a kiln metadata document");
    }
    Ok(body)
}

/// A download's pace as it goes (whole artifacts and deltas alike): the bytes of the current
/// window, checked after every read.
pub(crate) struct Pacer {
    pace: Pace,
    window_start: Instant,
    window_bytes: u64,
    /// Bytes counted in all.
    pub total: u64,
    /// Why the last count was too slow (for a reader that can only return an io error).
    pub slow: Option<String>,
}

impl Pacer {
    pub fn new(pace: Pace) -> Pacer {
        Pacer { pace, window_start: Instant::now(), window_bytes: 0, total: 0, slow: None }
    }

    /// A new request: time spent between requests (hashing, copying) is not the server's.
    pub fn restart(&mut self) {
        self.window_start = Instant::now();
        self.window_bytes = 0;
    }

    /// Counts `n` bytes just read; whether the download fell below the pace: the deadline
    /// passed, or a whole window went by with too few bytes (then a new window starts).
    pub fn count(&mut self, n: u64) -> Option<String> {
        self.window_bytes += n;
        self.total += n;
        let now = Instant::now();
        if now >= self.pace.deadline {
            return Some("the check's deadline passed".into());
        }
        let elapsed = now.duration_since(self.window_start);
        if elapsed >= self.pace.window {
            if self.window_bytes < self.pace.min_bytes {
                return Some(format!(
                    "{} bytes in {:.0}s, fewer than the {} required",
                    self.window_bytes,
                    elapsed.as_secs_f64(),
                    self.pace.min_bytes
                ));
            }
            self.window_start = now;
            self.window_bytes = 0;
        }
        None
    }

    /// The error for a read it refused ([`Pacer::slow`]).
    pub fn too_slow(&mut self, url: &str, got: u64, expected: u64) -> Option<anyhow::Error> {
        let detail = self.slow.take()?;
        Some(DownloadError::TooSlow { url: url.into(), got, expected, detail }.into())
    }
}

/// Where a 206 response's body starts (its `Content-Range: bytes N-M/L`).
pub(crate) fn range_start(resp: &reqwest::blocking::Response) -> Option<u64> {
    resp.headers()
        .get(CONTENT_RANGE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("bytes "))
        .and_then(|v| v.split('-').next())
        .and_then(|v| v.parse::<u64>().ok())
}

/// Streams `url` into `dest` at offsets [start, size), after hashing [0, start) from `dest`.
/// Slower than `pace` is an error (`TooSlow`) after what arrived was made durable.
pub fn download(
    client: &Client,
    url: &str,
    expect: &Expect,
    dest: &mut std::fs::File,
    start: u64,
    pace: Pace,
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
    let mut pacer = Pacer::new(pace);
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
                if range_start(&resp) != Some(pos) {
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
            let slow = pacer.count(n as u64);
            if pos - synced >= SYNC_EVERY || (slow.is_some() && pos > synced) {
                dest.sync_data().map_err(io("syncing".into()))?;
                synced = pos;
                progress(pos).map_err(|e| DownloadError::Io {
                    what: "recording progress".into(),
                    source: std::io::Error::other(format!("{e:#}")),
                })?;
            }
            if let Some(detail) = slow {
                return Err(DownloadError::TooSlow { url: url.into(), got: pos, expected: expect.size, detail });
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{BufRead, BufReader, Write};
    use std::net::TcpListener;

    /// A loopback HTTP server for one artifact: connection `i` sends at most `cut(i)` bytes of
    /// the body it owes (then drops the connection), `gap` apart in pieces of `piece` bytes.
    /// Honours `Range: bytes=N-`.
    fn serve(body: Vec<u8>, cut: fn(usize) -> Option<usize>, piece: usize, gap: Duration) -> String {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}/artifact", listener.local_addr().unwrap());
        std::thread::spawn(move || {
            for (i, conn) in listener.incoming().enumerate() {
                let Ok(mut conn) = conn else { return };
                let mut reader = BufReader::new(conn.try_clone().unwrap());
                let mut from = 0usize;
                loop {
                    let mut line = String::new();
                    if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                        break;
                    }
                    if let Some(r) = line.to_ascii_lowercase().strip_prefix("range: bytes=") {
                        from = r.trim().trim_end_matches('-').parse().unwrap();
                    }
                }
                let rest = &body[from..];
                let head = if from > 0 {
                    format!(
                        "HTTP/1.1 206 Partial Content\r\nContent-Range: bytes {from}-{}/{}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                        body.len() - 1,
                        body.len(),
                        rest.len()
                    )
                } else {
                    format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n", rest.len())
                };
                if conn.write_all(head.as_bytes()).is_err() {
                    continue;
                }
                let owed = cut(i).unwrap_or(rest.len()).min(rest.len());
                for chunk in rest[..owed].chunks(piece) {
                    if conn.write_all(chunk).is_err() {
                        break;
                    }
                    let _ = conn.flush();
                    std::thread::sleep(gap);
                }
            }
        });
        url
    }

    fn expect(body: &[u8]) -> Expect {
        Expect { size: body.len() as u64, sha256: Sha256::digest(body).into() }
    }

    fn scratch_file() -> (tempfile::TempDir, std::fs::File) {
        let dir = tempfile::tempdir().unwrap();
        let f = std::fs::File::options().read(true).write(true).create_new(true).open(dir.path().join("a")).unwrap();
        (dir, f)
    }

    fn pace(window_ms: u64, min_bytes: u64) -> Pace {
        Pace { window: Duration::from_millis(window_ms), min_bytes, deadline: Instant::now() + Duration::from_secs(60) }
    }

    #[test]
    fn dropped_connections_resume_where_they_stopped() {
        let body: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        // The first three connections drop after 30000 bytes each: four requests in all.
        let url = serve(body.clone(), |i| (i < 3).then_some(30_000), 10_000, Duration::ZERO);
        let (dir, mut f) = scratch_file();
        let report =
            download(&client().unwrap(), &url, &expect(&body), &mut f, 0, pace(60_000, 1), &mut |_| Ok(())).unwrap();
        assert_eq!(report.attempts, 4);
        assert_eq!(report.downloaded_bytes, body.len() as u64);
        assert_eq!(std::fs::read(dir.path().join("a")).unwrap(), body);
    }

    #[test]
    fn a_trickle_is_given_up_with_what_arrived_kept() {
        let body: Vec<u8> = vec![7u8; 100_000];
        // 100 bytes every 50 ms: 2 KB/s, below the 20 KB per 300 ms asked for.
        let url = serve(body.clone(), |_| None, 100, Duration::from_millis(50));
        let (dir, mut f) = scratch_file();
        let mut recorded = 0;
        let started = Instant::now();
        let e = download(&client().unwrap(), &url, &expect(&body), &mut f, 0, pace(300, 20_000), &mut |n| {
            recorded = n;
            Ok(())
        })
        .unwrap_err();
        assert!(matches!(e, DownloadError::TooSlow { .. }), "{e}");
        assert!(e.to_string().contains("fewer than the 20000 required"), "{e}");
        assert!(started.elapsed() < Duration::from_secs(10), "gave up after {:?}", started.elapsed());
        // What arrived was made durable and recorded: a later check resumes from there.
        assert!(recorded > 0, "no progress recorded");
        let mut again = 0;
        let fast = serve(body.clone(), |_| None, 10_000, Duration::ZERO);
        download(&client().unwrap(), &fast, &expect(&body), &mut f, recorded, pace(60_000, 1), &mut |n| {
            again = n;
            Ok(())
        })
        .unwrap();
        assert_eq!(again, body.len() as u64);
        assert_eq!(std::fs::read(dir.path().join("a")).unwrap(), body);
    }

    #[test]
    fn a_trickling_small_document_has_a_deadline() {
        let body = vec![b'{'; 4000];
        let url = serve(body, |_| None, 10, Duration::from_millis(20));
        let e = fetch_small_within(&client().unwrap(), &url, 1 << 20, Duration::from_millis(300)).unwrap_err();
        assert!(format!("{e:#}").contains("too slow: not received within 300ms"), "{e:#}");
    }
}
