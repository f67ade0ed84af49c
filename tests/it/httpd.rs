//! A small real HTTP/1.1 static file server on 127.0.0.1 for the tests: GET and HEAD, `Range:
//! bytes=N-` and `N-M` (206 + Content-Range, 416 past the end), one thread per connection,
//! persistent connections as real servers keep them (a connection serves requests until the
//! client closes it, asks `Connection: close`, or is idle for [`IDLE`]). Faults for tests,
//! settable while it runs: a rate limit (bytes/s), and cutting a response after N body bytes (a
//! dropped connection). Every request is logged.
//! POST bodies are kept ([`Server::posts`], a webhook); PUT writes the body to the path under
//! the served directory (a WebDAV-like push target), served by GET afterwards.

use std::io::{BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How long a kept-alive connection may wait for its next request: longer than reqwest's idle
/// pool timeout (90 s), so a client never reuses a connection this server is closing.
const IDLE: Duration = Duration::from_secs(120);

#[derive(Default, Debug, Clone)]
pub struct Faults {
    pub rate_limit: Option<u64>,
    pub cut_after: Option<u64>,
    pub ignore_range: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Request {
    pub path: String,
    pub range: Option<String>,
    pub status: u16,
}

pub struct Server {
    port: u16,
    faults: Arc<Mutex<Faults>>,
    log: Arc<Mutex<Vec<Request>>>,
    posts: Arc<Mutex<Vec<(String, String)>>>,
    sent: Arc<Mutex<Vec<(String, u64)>>>,
}

#[allow(dead_code)]
impl Server {
    /// Serves `root` (symbolic links are followed) until the test process ends.
    pub fn start(root: &Path) -> Server {
        let listener = TcpListener::bind("127.0.0.1:0").expect("binding 127.0.0.1:0");
        let port = listener.local_addr().unwrap().port();
        let faults = Arc::new(Mutex::new(Faults::default()));
        let log = Arc::new(Mutex::new(Vec::new()));
        let posts = Arc::new(Mutex::new(Vec::new()));
        let sent = Arc::new(Mutex::new(Vec::new()));
        let (root, f, l, p, s) = (root.to_path_buf(), faults.clone(), log.clone(), posts.clone(), sent.clone());
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let (root, f, l, p, s) = (root.clone(), f.clone(), l.clone(), p.clone(), s.clone());
                std::thread::spawn(move || {
                    let _ = serve(stream, &root, &f, &l, &p, &s);
                });
            }
        });
        Server { port, faults, log, posts, sent }
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn set_rate_limit(&self, bytes_per_sec: Option<u64>) {
        self.faults.lock().unwrap().rate_limit = bytes_per_sec;
    }

    pub fn set_faults(&self, faults: Faults) {
        *self.faults.lock().unwrap() = faults;
    }

    /// Body bytes sent so far for paths starting with `prefix` (what devices downloaded).
    pub fn served(&self, prefix: &str) -> u64 {
        self.sent.lock().unwrap().iter().filter(|(p, _)| p.starts_with(prefix)).map(|(_, n)| n).sum()
    }

    pub fn requests(&self) -> Vec<Request> {
        self.log.lock().unwrap().clone()
    }

    /// (path, body) of every POST received (a webhook's deliveries).
    pub fn posts(&self) -> Vec<(String, String)> {
        self.posts.lock().unwrap().clone()
    }
}

fn resolve(root: &Path, url_path: &str) -> Option<PathBuf> {
    let rel = url_path.split('?').next()?.trim_start_matches('/');
    if rel.split('/').any(|c| c == ".." || c.starts_with('.')) {
        return None;
    }
    let p = root.join(rel);
    p.is_file().then_some(p)
}

/// What the connection does after a response.
#[derive(PartialEq)]
enum Next {
    KeepAlive,
    Close,
}

fn serve(
    stream: TcpStream,
    root: &Path,
    faults: &Mutex<Faults>,
    log: &Mutex<Vec<Request>>,
    posts: &Mutex<Vec<(String, String)>>,
    sent_log: &Mutex<Vec<(String, u64)>>,
) -> std::io::Result<()> {
    stream.set_read_timeout(Some(IDLE))?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut out = stream;
    while respond(&mut reader, &mut out, root, faults, log, posts, sent_log)? == Next::KeepAlive {}
    Ok(())
}

/// Reads one request from `reader` and answers it on `out`.
#[allow(clippy::too_many_arguments)]
fn respond(
    reader: &mut BufReader<TcpStream>,
    out: &mut TcpStream,
    root: &Path,
    faults: &Mutex<Faults>,
    log: &Mutex<Vec<Request>>,
    posts: &Mutex<Vec<(String, String)>>,
    sent_log: &Mutex<Vec<(String, u64)>>,
) -> std::io::Result<Next> {
    let mut line = String::new();
    if reader.read_line(&mut line)? == 0 {
        return Ok(Next::Close);
    }
    let mut parts = line.split_whitespace();
    let (method, path) = (parts.next().unwrap_or("").to_string(), parts.next().unwrap_or("/").to_string());
    let mut range = None;
    let mut length = 0usize;
    let mut next = Next::KeepAlive;
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h)? == 0 {
            return Ok(Next::Close);
        }
        if h.trim().is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            if k.eq_ignore_ascii_case("range") {
                range = Some(v.trim().to_string());
            }
            if k.eq_ignore_ascii_case("content-length") {
                length = v.trim().parse().unwrap_or(0);
            }
            if k.eq_ignore_ascii_case("connection") && v.trim().eq_ignore_ascii_case("close") {
                next = Next::Close;
            }
        }
    }
    if length > 1 << 20 {
        // Only the first MiB is read: what follows must not be taken for the next request.
        next = Next::Close;
    }
    let keep = if next == Next::Close { "close" } else { "keep-alive" };
    if method == "POST" {
        let mut body = vec![0u8; length.min(1 << 20)];
        reader.read_exact(&mut body)?;
        posts.lock().unwrap().push((path.clone(), String::from_utf8_lossy(&body).into_owned()));
        log.lock().unwrap().push(Request { path, range, status: 200 });
        out.write_all(format!("HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: {keep}\r\n\r\n").as_bytes())?;
        return Ok(next);
    }
    if method == "PUT" {
        let mut body = vec![0u8; length.min(4 << 20)];
        reader.read_exact(&mut body)?;
        let rel = path.split('?').next().unwrap_or("").trim_start_matches('/').to_string();
        if rel.is_empty() || rel.split('/').any(|c| c.is_empty() || c == ".." || c.starts_with('.')) {
            log.lock().unwrap().push(Request { path, range, status: 403 });
            out.write_all(
                format!("HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\nConnection: {keep}\r\n\r\n").as_bytes(),
            )?;
            return Ok(next);
        }
        let dest = root.join(&rel);
        std::fs::create_dir_all(dest.parent().unwrap())?;
        let tmp = dest.with_extension("put-tmp");
        std::fs::write(&tmp, &body)?;
        std::fs::rename(&tmp, &dest)?;
        log.lock().unwrap().push(Request { path, range, status: 204 });
        out.write_all(format!("HTTP/1.1 204 No Content\r\nConnection: {keep}\r\n\r\n").as_bytes())?;
        return Ok(next);
    }
    let f = faults.lock().unwrap().clone();
    let Some(file) = resolve(root, &path) else {
        log.lock().unwrap().push(Request { path, range, status: 404 });
        out.write_all(format!("HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: {keep}\r\n\r\n").as_bytes())?;
        return Ok(next);
    };
    let mut file = std::fs::File::open(file)?;
    let len = file.metadata()?.len();
    let mut status = 200;
    let (mut from, mut to) = (0, len);
    if let (Some(r), false) = (&range, f.ignore_range) {
        let spec = r.strip_prefix("bytes=").unwrap_or("");
        let (a, b) = spec.split_once('-').unwrap_or(("", ""));
        let a: u64 = a.parse().unwrap_or(0);
        if a >= len {
            log.lock().unwrap().push(Request { path, range, status: 416 });
            out.write_all(format!("HTTP/1.1 416 Range Not Satisfiable\r\nContent-Range: bytes */{len}\r\nContent-Length: 0\r\nConnection: {keep}\r\n\r\n").as_bytes())?;
            return Ok(next);
        }
        let b = b.parse::<u64>().map(|b| (b + 1).min(len)).unwrap_or(len);
        (from, to, status) = (a, b, 206);
    }
    let entry = {
        let mut s = sent_log.lock().unwrap();
        s.push((path.clone(), 0));
        s.len() - 1
    };
    log.lock().unwrap().push(Request { path, range, status });
    // A response cut short ends its connection (the client sees fewer bytes than promised).
    if f.cut_after.is_some_and(|cut| cut < to - from) {
        next = Next::Close;
    }
    let keep = if next == Next::Close { "close" } else { "keep-alive" };
    let mut head = format!(
        "HTTP/1.1 {status} {}\r\nContent-Length: {}\r\nAccept-Ranges: bytes\r\nConnection: {keep}\r\n",
        if status == 206 { "Partial Content" } else { "OK" },
        to - from
    );
    if status == 206 {
        head.push_str(&format!("Content-Range: bytes {from}-{}/{len}\r\n", to - 1));
    }
    head.push_str("\r\n");
    out.write_all(head.as_bytes())?;
    if method == "HEAD" {
        return Ok(next);
    }
    file.seek(SeekFrom::Start(from))?;
    let mut left = to - from;
    if let Some(cut) = f.cut_after {
        left = left.min(cut);
    }
    let mut buf = vec![0u8; 64 << 10];
    let started = Instant::now();
    let mut sent = 0u64;
    while left > 0 {
        let want = left.min(buf.len() as u64) as usize;
        let n = file.read(&mut buf[..want])?;
        if n == 0 {
            break;
        }
        out.write_all(&buf[..n])?;
        left -= n as u64;
        sent += n as u64;
        sent_log.lock().unwrap()[entry].1 = sent;
        // Read the limit again: a test may change it while a download runs.
        if let Some(rate) = faults.lock().unwrap().rate_limit {
            let due = Duration::from_secs_f64(sent as f64 / rate as f64);
            if let Some(wait) = due.checked_sub(started.elapsed()) {
                std::thread::sleep(wait);
            }
        }
    }
    if left > 0 {
        // The file ended before its length was sent: the connection cannot carry another.
        next = Next::Close;
    }
    Ok(next)
}

/// Puts a channel's metadata (`stable.json` + `.sig` from `from`) where a [`Server`] serves
/// `site`: the signature first, so a reader never pairs new metadata with an old signature.
pub fn serve_channel(site: &Path, from: &Path) {
    for f in ["stable.json", "stable.json.sig"] {
        std::fs::copy(from.join(f), site.join(format!(".{f}.tmp"))).unwrap();
    }
    std::fs::rename(site.join(".stable.json.sig.tmp"), site.join("stable.json.sig")).unwrap();
    std::fs::rename(site.join(".stable.json.tmp"), site.join("stable.json")).unwrap();
}
