//! The Debian archive's indexes: dpkg version ordering, `Release` and `Packages` parsing,
//! fetching one suite's verified `Packages` index from a mirror, and finding updates for a lock.
//!
//! `kiln outdated` and `kiln lock` are built on this. Everything that comes from the network is
//! checked against the suite's `Release` file (size and SHA256) before it is decompressed or
//! parsed. The Release file's own OpenPGP signature is *not* checked here: an `InRelease` file
//! is only unwrapped.

pub mod cache;
pub mod deb822;
mod fetch;
pub mod mirror;
mod packages;
mod release;
mod updates;
mod version;

pub use fetch::*;
pub use packages::*;
pub use release::*;
pub use updates::*;
pub use version::*;

use deb822::{paragraphs, Paragraph};

use std::borrow::Cow;
use std::cmp::Ordering;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::{Read, Write};
use std::time::Duration;

use sha2::{Digest, Sha256};

/// Everything that can go wrong reading the archive. Each variant names the URL, file or package.
#[derive(Debug, thiserror::Error)]
pub enum DebianError {
    /// The request could not be made or the connection broke.
    #[error("GET {url}: {detail}")]
    Http { url: String, detail: String },
    /// The server did not answer (or stopped sending) in time.
    #[error("GET {url}: timed out after {}s", .after.as_secs_f64())]
    Timeout { url: String, after: Duration },
    /// The server answered with something other than success.
    #[error("GET {url}: HTTP {status}")]
    Status { url: String, status: u16 },
    /// A download was larger than allowed.
    #[error("GET {url}: larger than {limit} bytes")]
    TooLarge { url: String, limit: u64 },
    /// Neither `Release` nor `InRelease` exists for the suite.
    #[error("no Release file for suite {suite}: {} and {} both gave HTTP 404", .urls[0], .urls[1])]
    NoRelease { suite: String, urls: [String; 2] },
    /// The Release file is for another suite than the one asked for.
    #[error("{url}: asked for suite {asked}, but the Release file is for suite {suite} (codename {codename})")]
    WrongSuite { url: String, asked: String, suite: String, codename: String },
    /// The Release file lists no Packages index for the component and architecture, or none of
    /// the listed ones could be downloaded.
    #[error("{release_url}: no usable {path}{{.xz,.gz,}} index (tried: {})", if .tried.is_empty() { "none listed".to_string() } else { .tried.join(", ") })]
    NoPackagesIndex { release_url: String, path: String, tried: Vec<String> },
    /// A download's size differs from what the Release file lists.
    #[error("{url}: size mismatch: Release lists {expected} bytes, got {got}")]
    SizeMismatch { url: String, expected: u64, got: String },
    /// A download's SHA256 differs from what the Release file lists.
    #[error("{url}: sha256 mismatch: Release lists {expected}, got {got}")]
    HashMismatch { url: String, expected: String, got: String },
    /// A compressed index could not be decompressed.
    #[error("{url}: cannot decompress: {detail}")]
    Decompress { url: String, detail: String },
    /// A Packages file is malformed; names the paragraph's package when it is known.
    #[error("Packages paragraph at line {line}{}: {problem}", package_suffix(.package))]
    Packages { line: usize, package: Option<String>, problem: String },
    /// A Release file is malformed.
    #[error("Release: {problem}")]
    Release { problem: String },
    /// A parse error in a file that came from `url`.
    #[error("{url}: {error}")]
    In { url: String, error: Box<DebianError> },
    /// The HTTP client could not be set up (TLS backend).
    #[error("cannot set up the HTTP client: {detail}")]
    Client { detail: String },
}

fn package_suffix(package: &Option<String>) -> String {
    package.as_deref().map(|p| format!(" (package {p})")).unwrap_or_default()
}

impl DebianError {
    /// Says which URL a parse error's text came from.
    fn at(self, url: &str) -> DebianError {
        DebianError::In { url: url.to_string(), error: Box::new(self) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::BufRead;
    use std::net::{SocketAddr, TcpListener, TcpStream};
    use std::path::Path;
    use std::sync::atomic::{AtomicBool, Ordering as AtomicOrdering};
    use std::sync::Arc;
    use std::thread::JoinHandle;

    // --- versions ---

    #[track_caller]
    fn assert_order(a: &str, b: &str, expected: Ordering) {
        assert_eq!(compare_versions(a, b), expected, "compare_versions({a:?}, {b:?})");
        assert_eq!(compare_versions(b, a), expected.reverse(), "compare_versions({b:?}, {a:?})");
    }

    #[test]
    fn compare_versions_classic_cases() {
        use Ordering::*;
        assert_order("1.0~rc1", "1.0", Less);
        assert_order("1:0.1", "2.0", Greater);
        assert_order("2.36-9+deb12u14", "2.36-9+deb12u15", Less);
        assert_order("2.36-9+deb12u9", "2.36-9+deb12u10", Less);
        assert_order("1.0-1", "1.0a-1", Less);
        assert_order("1.0", "1.0-0", Equal);
        assert_order("1.0", "1.00", Equal);
        assert_order("0:1.0", "1.0", Equal);
        assert_order("1.0", "1.0", Equal);
        assert_order("1.10", "1.9", Greater);
        assert_order("1.2.3", "1.2", Greater);
        assert_order("1.0+b1", "1.0", Greater);
        assert_order("1.0a", "1.0.", Less); // letters before non-letters
        assert_order("1.0-1~bpo12+1", "1.0-1", Less);
        assert_order("1.0-1", "1.0-1.1", Less);
        assert_order("2.0-1", "1.99-99", Greater);
        assert_order("10:1", "9:1", Greater);
        assert_order("1:1.0", "0:9.9", Greater);
        assert_order("1.2-3-4", "1.2-3-5", Less); // the revision is after the last hyphen
        assert_order("1:2:3", "1:2:4", Less); // colons after the epoch belong to upstream
        assert_order("0001:1", "1:1", Equal);
        assert_order("99999999999999999999:1", "99999999999999999998:2", Greater);
        assert_order("252.39-1~deb13u1", "257.9-1~deb13u1", Less);
    }

    #[test]
    fn compare_versions_tilde_sorts_before_everything() {
        // Each strictly greater than the one before, as in dpkg's documentation.
        let sorted = ["1.0~~", "1.0~~a", "1.0~", "1.0", "1.0-1", "1.0a", "1.0+", "1.0.1", "1.1~rc1", "1.1", "1:0"];
        for (i, a) in sorted.iter().enumerate() {
            for (j, b) in sorted.iter().enumerate() {
                assert_eq!(compare_versions(a, b), i.cmp(&j), "compare_versions({a:?}, {b:?})");
            }
        }
    }

    #[test]
    fn split_version_follows_dpkg() {
        assert_eq!(split_version("1:2.3-4"), ("1", "2.3", "4"));
        assert_eq!(split_version("2.3"), ("0", "2.3", ""));
        assert_eq!(split_version("a:1-2-3"), ("0", "a:1-2", "3"));
    }

    // --- Packages ---

    const SHA_A: &str = "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
    const SHA_B: &str = "BBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBB";

    fn packages_text() -> String {
        format!(
            "Package: libc6\n\
             Source: glibc (2.41-12)\n\
             Version: 2.41-12+deb13u1\n\
             Architecture: amd64\n\
             Description: GNU C Library: Shared libraries\n \
             Contains the standard libraries.\n \
             .\n \
             More text: with a colon.\n\
             Filename: pool/main/g/glibc/libc6_2.41-12+deb13u1_amd64.deb\n\
             Size: 2850000\n\
             SHA256: {SHA_A}\n\
             \n\
             \n\
             Package: tzdata\r\n\
             version: 2025b-4\r\n\
             Architecture: all\r\n\
             Filename: pool/main/t/tzdata/tzdata_2025b-4_all.deb\r\n\
             Size: 260000\r\n\
             SHA256: {SHA_B}\r\n"
        )
    }

    #[test]
    fn parse_packages_reads_paragraphs_and_continuations() {
        let entries = parse_packages(&packages_text()).unwrap();
        assert_eq!(
            entries,
            vec![
                PackageEntry {
                    name: "libc6".into(),
                    version: "2.41-12+deb13u1".into(),
                    arch: "amd64".into(),
                    filename: "pool/main/g/glibc/libc6_2.41-12+deb13u1_amd64.deb".into(),
                    size: 2850000,
                    sha256: SHA_A.into(),
                    source: Some("glibc".into()),
                },
                PackageEntry {
                    name: "tzdata".into(),
                    version: "2025b-4".into(),
                    arch: "all".into(),
                    filename: "pool/main/t/tzdata/tzdata_2025b-4_all.deb".into(),
                    size: 260000,
                    sha256: SHA_B.to_ascii_lowercase(),
                    source: None,
                },
            ]
        );
    }

    #[test]
    fn parse_packages_empty_text_is_no_packages() {
        assert_eq!(parse_packages("").unwrap(), vec![]);
        assert_eq!(parse_packages("\n\n").unwrap(), vec![]);
    }

    #[test]
    fn parse_packages_missing_field_names_the_package() {
        let text = packages_text().replace("Size: 260000\r\n", "");
        let err = parse_packages(&text).unwrap_err();
        assert_eq!(err.to_string(), "Packages paragraph at line 14 (package tzdata): missing field Size");
    }

    #[test]
    fn parse_packages_missing_package_names_the_line() {
        let err = parse_packages("Version: 1\nArchitecture: all\n").unwrap_err();
        assert_eq!(err.to_string(), "Packages paragraph at line 1: missing field Package");
    }

    #[test]
    fn parse_packages_bad_values_are_errors() {
        let text = packages_text().replace("Size: 2850000", "Size: big");
        assert_eq!(
            parse_packages(&text).unwrap_err().to_string(),
            "Packages paragraph at line 1 (package libc6): Size: expected a number of bytes, found \"big\""
        );
        let text = packages_text().replace(SHA_A, "abc");
        assert_eq!(
            parse_packages(&text).unwrap_err().to_string(),
            "Packages paragraph at line 1 (package libc6): SHA256: expected 64 hex digits, found \"abc\""
        );
        let text = packages_text().replace("Size: 260000", "Size: 1\r\nsize: 2");
        assert_eq!(
            parse_packages(&text).unwrap_err().to_string(),
            "Packages paragraph at line 14 (package tzdata): field size appears twice"
        );
    }

    #[test]
    fn parse_packages_syntax_errors_name_the_line() {
        assert_eq!(
            parse_packages(" continued\nPackage: a\n").unwrap_err().to_string(),
            "Packages paragraph at line 1: line 1: continuation line before any field"
        );
        assert_eq!(
            parse_packages("Package: a\nno colon here\n").unwrap_err().to_string(),
            "Packages paragraph at line 1: line 2: expected \"Field: value\", found \"no colon here\""
        );
    }

    // --- Release ---

    fn release_text() -> String {
        format!(
            "Origin: Debian\n\
             Label: Debian\n\
             Suite: stable-security\n\
             Codename: trixie-security\n\
             Date: Sat, 10 May 2025 09:03:47 UTC\n\
             Acquire-By-Hash: yes\n\
             Architectures: amd64 arm64\n\
             Components: main\n\
             MD5Sum:\n \
             0123456789abcdef0123456789abcdef 100 main/binary-amd64/Packages\n\
             SHA256:\n \
             {SHA_A} 100 main/binary-amd64/Packages\n \
             {SHA_B}   40 main/binary-amd64/Packages.xz\n"
        )
    }

    #[test]
    fn parse_release_reads_fields_and_sha256() {
        let r = parse_release(&release_text()).unwrap();
        assert_eq!(r.codename, "trixie-security");
        assert_eq!(r.suite, "stable-security");
        assert_eq!(r.date, "Sat, 10 May 2025 09:03:47 UTC");
        assert!(r.acquire_by_hash);
        let listed: Vec<_> = r.sha256.iter().map(|(p, d)| (p.as_str(), d.size, d.sha256.as_str())).collect();
        assert_eq!(
            listed,
            vec![
                ("main/binary-amd64/Packages", 100, SHA_A),
                ("main/binary-amd64/Packages.xz", 40, &*SHA_B.to_ascii_lowercase())
            ]
        );
    }

    #[test]
    fn parse_release_accepts_inrelease_armor() {
        let body = release_text().replace("Label: Debian", "- Label: Debian");
        let signed = format!(
            "-----BEGIN PGP SIGNED MESSAGE-----\nHash: SHA512\n\n{}-----BEGIN PGP SIGNATURE-----\n\niQIzBAEBCgAdFiEE\n-----END PGP SIGNATURE-----\n",
            body.replace("- Label", "- - Label")
        );
        let from_inrelease = parse_release(&signed).unwrap();
        let expected = parse_release(&body).unwrap();
        assert_eq!(from_inrelease, expected);
        assert_eq!(expected.codename, "trixie-security");
    }

    #[test]
    fn parse_release_errors() {
        let no_sha = release_text().split("SHA256:").next().unwrap_or_default().to_string();
        assert_eq!(parse_release(&no_sha).unwrap_err().to_string(), "Release: missing field SHA256");
        let no_codename = release_text().replace("Codename: trixie-security\n", "");
        assert_eq!(parse_release(&no_codename).unwrap_err().to_string(), "Release: missing field Codename");
        let bad_line = release_text().replace("   40 main", " forty main");
        assert_eq!(
            parse_release(&bad_line).unwrap_err().to_string(),
            format!("Release: SHA256: expected \"<sha256> <size> <path>\", found \"{SHA_B} forty main/binary-amd64/Packages.xz\"")
        );
        let unsigned = "-----BEGIN PGP SIGNED MESSAGE-----\nHash: SHA512\n\nSuite: x\n";
        assert_eq!(
            parse_release(unsigned).unwrap_err().to_string(),
            "Release: clear-signed text has no -----BEGIN PGP SIGNATURE----- line"
        );
        assert_eq!(parse_release("\n").unwrap_err().to_string(), "Release: empty file");
    }

    // --- outdated ---

    fn entry(name: &str, version: &str, arch: &str) -> PackageEntry {
        PackageEntry {
            name: name.into(),
            version: version.into(),
            arch: arch.into(),
            filename: format!("pool/main/{name}_{version}_{arch}.deb"),
            size: 1,
            sha256: SHA_A.into(),
            source: None,
        }
    }

    fn lock(items: &[(&str, &str, &str)]) -> Vec<(String, String, String)> {
        items.iter().map(|(n, v, a)| (n.to_string(), v.to_string(), a.to_string())).collect()
    }

    fn update(name: &str, locked: &str, available: &str, suite: &str, security: bool) -> Update {
        Update { name: name.into(), locked: locked.into(), available: available.into(), suite: suite.into(), security }
    }

    #[test]
    fn outdated_picks_the_newest_across_suites() {
        let indexes = vec![
            (
                "trixie".to_string(),
                vec![
                    entry("openssl", "3.5.0-1", "amd64"),
                    entry("zlib1g", "1:1.3.dfsg-3", "amd64"),
                    entry("bash", "5.2-1", "amd64"),
                ],
            ),
            (
                "trixie-updates".to_string(),
                vec![entry("zlib1g", "1:1.3.dfsg-3+deb13u1", "amd64"), entry("openssl", "3.5.0-1+deb13u1", "amd64")],
            ),
            (
                "trixie-security".to_string(),
                vec![entry("openssl", "3.5.0-1+deb13u2", "amd64"), entry("zlib1g", "1:1.3.dfsg-3~sec1", "amd64")],
            ),
        ];
        let locked = lock(&[
            ("zlib1g", "1:1.3.dfsg-3", "amd64"),
            ("openssl", "3.5.0-1", "amd64"),
            ("bash", "5.2-1", "amd64"),
            ("absent", "1", "amd64"),
        ]);
        assert_eq!(
            outdated(&locked, &indexes),
            vec![
                update("openssl", "3.5.0-1", "3.5.0-1+deb13u2", "trixie-security", true),
                update("zlib1g", "1:1.3.dfsg-3", "1:1.3.dfsg-3+deb13u1", "trixie-updates", false),
            ]
        );
    }

    #[test]
    fn outdated_matches_arch_or_all_and_prefers_security_on_ties() {
        let indexes = vec![
            ("trixie-updates".to_string(), vec![entry("tzdata", "2025c-1", "all"), entry("curl", "8.14-2", "amd64")]),
            ("trixie-security".to_string(), vec![entry("curl", "8.14-2", "amd64"), entry("curl", "9.0-1", "arm64")]),
        ];
        let locked = lock(&[("tzdata", "2025b-4", "all"), ("curl", "8.14-1", "amd64")]);
        assert_eq!(
            outdated(&locked, &indexes),
            vec![
                update("curl", "8.14-1", "8.14-2", "trixie-security", true),
                update("tzdata", "2025b-4", "2025c-1", "trixie-updates", false),
            ]
        );
        // The same lock on arm64 sees the arm64-only 9.0-1.
        let locked = lock(&[("curl", "8.14-1", "arm64")]);
        assert_eq!(outdated(&locked, &indexes), vec![update("curl", "8.14-1", "9.0-1", "trixie-security", true)]);
    }

    // --- fixture mirror over HTTP on 127.0.0.1 ---

    /// A tiny HTTP/1.1 file server for the tests: GET only, one request per connection, at most
    /// `MAX_CONNECTIONS`, stopped and joined when dropped. `/broken/…` answers 500.
    struct FixtureServer {
        addr: SocketAddr,
        stop: Arc<AtomicBool>,
        thread: Option<JoinHandle<()>>,
    }

    const MAX_CONNECTIONS: usize = 200;

    impl FixtureServer {
        fn serve(root: &Path) -> FixtureServer {
            let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
            let addr = listener.local_addr().expect("local address of the fixture server");
            let stop = Arc::new(AtomicBool::new(false));
            let (root, stop2) = (root.to_path_buf(), stop.clone());
            let thread = std::thread::spawn(move || {
                for conn in listener.incoming().take(MAX_CONNECTIONS) {
                    if stop2.load(AtomicOrdering::SeqCst) {
                        break;
                    }
                    if let Ok(conn) = conn {
                        let _ = handle(&root, conn);
                    }
                }
            });
            FixtureServer { addr, stop, thread: Some(thread) }
        }

        fn url(&self) -> String {
            format!("http://{}/debian", self.addr)
        }
    }

    impl Drop for FixtureServer {
        fn drop(&mut self) {
            self.stop.store(true, AtomicOrdering::SeqCst);
            let _ = TcpStream::connect(self.addr); // wakes the accept loop
            if let Some(t) = self.thread.take() {
                let _ = t.join();
            }
        }
    }

    fn handle(root: &Path, mut conn: TcpStream) -> std::io::Result<()> {
        conn.set_read_timeout(Some(Duration::from_secs(5)))?;
        conn.set_write_timeout(Some(Duration::from_secs(5)))?;
        let mut reader = std::io::BufReader::new(conn.try_clone()?).take(16 << 10);
        let mut request_line = String::new();
        reader.read_line(&mut request_line)?;
        loop {
            let mut header = String::new();
            if reader.read_line(&mut header)? == 0 || header.trim().is_empty() {
                break;
            }
        }
        let mut words = request_line.split_whitespace();
        let (method, path) = (words.next().unwrap_or(""), words.next().unwrap_or(""));
        let file = path.strip_prefix("/debian/").map(|p| root.join(p));
        let (status, body) = if method != "GET" {
            ("405 Method Not Allowed", Vec::new())
        } else if path.starts_with("/broken/") {
            ("500 Internal Server Error", b"boom".to_vec())
        } else if path.contains("..") {
            ("400 Bad Request", Vec::new())
        } else {
            match file.map(std::fs::read) {
                Some(Ok(body)) => ("200 OK", body),
                _ => ("404 Not Found", b"not found".to_vec()),
            }
        };
        write!(conn, "HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n", body.len())?;
        conn.write_all(&body)?;
        conn.flush()
    }

    fn xz(data: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        lzma_rs::xz_compress(&mut &data[..], &mut out).expect("xz-compress fixture");
        out
    }

    fn gz(data: &[u8]) -> Vec<u8> {
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        enc.write_all(data).expect("gzip fixture");
        enc.finish().expect("gzip fixture")
    }

    fn write(path: &Path, bytes: &[u8]) {
        std::fs::create_dir_all(path.parent().expect("fixture path has a parent")).expect("create fixture dir");
        std::fs::write(path, bytes).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
    }

    fn packages_file(entries: &[(&str, &str, &str)]) -> String {
        entries
            .iter()
            .map(|(name, version, arch)| {
                let sha = sha256_hex(format!("{name}{version}").as_bytes());
                format!(
                    "Package: {name}\nVersion: {version}\nArchitecture: {arch}\nMaintainer: Someone <a@b>\n\
                     Description: {name}\n long text\nFilename: pool/main/{name}_{version}_{arch}.deb\nSize: 1234\nSHA256: {sha}\n\n"
                )
            })
            .collect()
    }

    #[derive(Clone, Copy)]
    enum Layout {
        /// Packages.xz at its path; the plain Packages listed but absent, as on Debian mirrors.
        Xz,
        /// Packages.gz only.
        Gz,
        /// Packages.xz by hash only (Acquire-By-Hash: yes), plus the plain Packages file.
        XzByHash,
    }

    /// Writes `dists/<codename>` with a Release (or InRelease) file whose SHA256 list matches.
    fn write_suite(root: &Path, codename: &str, suite: &str, packages: &str, layout: Layout, inrelease: bool) {
        let dir = root.join("dists").join(codename);
        let plain = packages.as_bytes();
        let mut listed = vec![("main/binary-amd64/Packages".to_string(), plain.to_vec())];
        match layout {
            Layout::Xz => {
                let data = xz(plain);
                write(&dir.join("main/binary-amd64/Packages.xz"), &data);
                listed.push(("main/binary-amd64/Packages.xz".into(), data));
            }
            Layout::Gz => {
                let data = gz(plain);
                write(&dir.join("main/binary-amd64/Packages.gz"), &data);
                listed = vec![("main/binary-amd64/Packages.gz".into(), data)];
            }
            Layout::XzByHash => {
                let data = xz(plain);
                write(&dir.join("main/binary-amd64/by-hash/SHA256").join(sha256_hex(&data)), &data);
                write(&dir.join("main/binary-amd64/Packages"), plain);
                listed.push(("main/binary-amd64/Packages.xz".into(), data));
            }
        }
        let by_hash = if matches!(layout, Layout::XzByHash) { "yes" } else { "no" };
        let mut release = format!(
            "Origin: Debian\nLabel: Debian\nSuite: {suite}\nCodename: {codename}\nDate: Sat, 10 May 2025 09:03:47 UTC\n\
             Acquire-By-Hash: {by_hash}\nArchitectures: amd64\nComponents: main\nSHA256:\n"
        );
        for (path, data) in &listed {
            release.push_str(&format!(" {} {} {path}\n", sha256_hex(data), data.len()));
        }
        if inrelease {
            let signed = format!("-----BEGIN PGP SIGNED MESSAGE-----\nHash: SHA512\n\n{release}-----BEGIN PGP SIGNATURE-----\n\nabc\n-----END PGP SIGNATURE-----\n");
            write(&dir.join("InRelease"), signed.as_bytes());
        } else {
            write(&dir.join("Release"), release.as_bytes());
        }
    }

    /// trixie (xz, Release), trixie-updates (gz, InRelease only), trixie-security (xz by hash).
    fn fixture_mirror() -> tempfile::TempDir {
        let dir = tempfile::tempdir().expect("temp dir");
        let root = dir.path();
        let trixie = packages_file(&[
            ("libc6", "2.41-12", "amd64"),
            ("openssl", "3.5.1-1", "amd64"),
            ("tzdata", "2025b-4", "all"),
            ("bash", "5.2.37-2", "amd64"),
        ]);
        write_suite(root, "trixie", "stable", &trixie, Layout::Xz, false);
        let updates = packages_file(&[("tzdata", "2025c-0+deb13u1", "all"), ("openssl", "3.5.1-1+deb13u1", "amd64")]);
        write_suite(root, "trixie-updates", "stable-updates", &updates, Layout::Gz, true);
        let security = packages_file(&[
            ("libc6", "2.41-12+deb13u1", "amd64"),
            ("openssl", "3.5.1-1+deb13u2", "amd64"),
            ("openssl", "9.9-1", "arm64"),
        ]);
        write_suite(root, "trixie-security", "stable-security", &security, Layout::XzByHash, false);
        dir
    }

    fn test_fetcher() -> Fetcher {
        Fetcher::new(FetchConfig { connect_timeout: Duration::from_secs(5), timeout: Duration::from_secs(10) })
            .expect("HTTP client")
    }

    #[test]
    fn fixture_mirror_reports_security_updates() {
        let dir = fixture_mirror();
        let server = FixtureServer::serve(dir.path());
        let fetcher = test_fetcher();
        let mut indexes = Vec::new();
        for suite in ["trixie", "trixie-updates", "trixie-security"] {
            let entries =
                fetcher.packages(&server.url(), suite, "main", "amd64").unwrap_or_else(|e| panic!("{suite}: {e}"));
            indexes.push((suite.to_string(), entries));
        }
        assert_eq!(indexes.iter().map(|(_, e)| e.len()).collect::<Vec<_>>(), [4, 2, 3]);
        assert_eq!(indexes[0].1[0].filename, "pool/main/libc6_2.41-12_amd64.deb");
        let locked = lock(&[
            ("libc6", "2.41-12", "amd64"),
            ("openssl", "3.5.1-1", "amd64"),
            ("tzdata", "2025b-4", "all"),
            ("bash", "5.2.37-2", "amd64"),
        ]);
        assert_eq!(
            outdated(&locked, &indexes),
            vec![
                update("libc6", "2.41-12", "2.41-12+deb13u1", "trixie-security", true),
                update("openssl", "3.5.1-1", "3.5.1-1+deb13u2", "trixie-security", true),
                update("tzdata", "2025b-4", "2025c-0+deb13u1", "trixie-updates", false),
            ]
        );
        // The free function does the same with its own client.
        assert_eq!(
            fetch_packages(&server.url(), "trixie-security", "main", "amd64").expect("fetch_packages"),
            indexes[2].1
        );
    }

    #[test]
    fn fixture_mirror_refuses_a_packages_file_that_does_not_match_release() {
        let dir = fixture_mirror();
        let server = FixtureServer::serve(dir.path());
        let path = dir.path().join("dists/trixie/main/binary-amd64/Packages.xz");
        let good = std::fs::read(&path).expect("read fixture Packages.xz");
        let expected = sha256_hex(&good);
        let url = format!("{}/dists/trixie/main/binary-amd64/Packages.xz", server.url());

        // Same size, other bytes: the hash is wrong.
        let mut tampered = good.clone();
        let last = tampered.len() - 1;
        tampered[last] ^= 0xff;
        write(&path, &tampered);
        let err = test_fetcher().packages(&server.url(), "trixie", "main", "amd64").unwrap_err();
        assert_eq!(
            err.to_string(),
            format!("{url}: sha256 mismatch: Release lists {expected}, got {}", sha256_hex(&tampered))
        );

        // Longer than listed.
        let mut longer = good.clone();
        longer.extend_from_slice(b"more");
        write(&path, &longer);
        let err = test_fetcher().packages(&server.url(), "trixie", "main", "amd64").unwrap_err();
        assert_eq!(
            err.to_string(),
            format!("{url}: size mismatch: Release lists {} bytes, got more than {}", good.len(), good.len())
        );

        // Shorter than listed.
        write(&path, &good[..10]);
        let err = test_fetcher().packages(&server.url(), "trixie", "main", "amd64").unwrap_err();
        assert_eq!(err.to_string(), format!("{url}: size mismatch: Release lists {} bytes, got 10", good.len()));
    }

    #[test]
    fn fixture_mirror_checks_the_decompressed_file_too() {
        let dir = fixture_mirror();
        let server = FixtureServer::serve(dir.path());
        // Replace Packages.xz by another valid one and list it in Release: only the plain
        // Packages digest in Release can catch it.
        let suite_dir = dir.path().join("dists/trixie");
        let other = xz(packages_file(&[("evil", "1", "amd64")]).as_bytes());
        write(&suite_dir.join("main/binary-amd64/Packages.xz"), &other);
        let release = std::fs::read_to_string(suite_dir.join("Release")).expect("read fixture Release");
        let release: String = release
            .lines()
            .map(|l| {
                if l.ends_with("Packages.xz") {
                    format!(" {} {} main/binary-amd64/Packages.xz\n", sha256_hex(&other), other.len())
                } else {
                    format!("{l}\n")
                }
            })
            .collect();
        write(&suite_dir.join("Release"), release.as_bytes());
        let err = test_fetcher().packages(&server.url(), "trixie", "main", "amd64").unwrap_err();
        let url = format!("{}/dists/trixie/main/binary-amd64/Packages.xz (decompressed)", server.url());
        assert!(
            matches!(&err, DebianError::SizeMismatch { url: u, .. } | DebianError::HashMismatch { url: u, .. } if *u == url),
            "{err}"
        );
    }

    #[test]
    fn fixture_mirror_http_errors_name_the_url() {
        let dir = fixture_mirror();
        let server = FixtureServer::serve(dir.path());
        let fetcher = test_fetcher();
        let base = server.url();

        let err = fetcher.packages(&base, "sid", "main", "amd64").unwrap_err();
        assert_eq!(err.to_string(), format!("no Release file for suite sid: {base}/dists/sid/Release and {base}/dists/sid/InRelease both gave HTTP 404"));

        let broken = format!("http://{}/broken", server.addr);
        let err = fetcher.packages(&broken, "trixie", "main", "amd64").unwrap_err();
        assert_eq!(err.to_string(), format!("GET {broken}/dists/trixie/Release: HTTP 500"));

        let err = fetcher.packages(&base, "trixie", "contrib", "amd64").unwrap_err();
        assert_eq!(err.to_string(), format!("{base}/dists/trixie/Release: no usable contrib/binary-amd64/Packages{{.xz,.gz,}} index (tried: none listed)"));

        std::fs::remove_file(dir.path().join("dists/trixie/main/binary-amd64/Packages.xz"))
            .expect("remove fixture Packages.xz");
        let err = fetcher.packages(&base, "trixie", "main", "amd64").unwrap_err();
        assert_eq!(
            err.to_string(),
            format!("{base}/dists/trixie/Release: no usable main/binary-amd64/Packages{{.xz,.gz,}} index (tried: {base}/dists/trixie/main/binary-amd64/Packages.xz, {base}/dists/trixie/main/binary-amd64/Packages)")
        );

        let err = fetcher.release(&base, "bookworm").unwrap_err();
        assert!(err.to_string().starts_with("no Release file for suite bookworm"), "{err}");
        std::fs::rename(dir.path().join("dists/trixie"), dir.path().join("dists/bookworm"))
            .expect("rename fixture suite");
        let err = fetcher.release(&base, "bookworm").unwrap_err();
        assert_eq!(err.to_string(), format!("{base}/dists/bookworm/Release: asked for suite bookworm, but the Release file is for suite stable (codename trixie)"));
    }

    #[test]
    fn fixture_mirror_malformed_index_names_the_url() {
        let dir = fixture_mirror();
        let server = FixtureServer::serve(dir.path());
        write_suite(dir.path(), "trixie", "stable", "Package: broken\nVersion: 1\n", Layout::Gz, false);
        let err = test_fetcher().packages(&server.url(), "trixie", "main", "amd64").unwrap_err();
        assert_eq!(
            err.to_string(),
            format!("{}/dists/trixie/main/binary-amd64/Packages.gz: Packages paragraph at line 1 (package broken): missing field Size", server.url())
        );
    }

    #[test]
    fn fetch_timeout_names_the_url() {
        // A listener that never accepts: the connection is made (backlog) but nothing answers.
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
        let base = format!("http://{}/debian", listener.local_addr().expect("local address"));
        let fetcher =
            Fetcher::new(FetchConfig { connect_timeout: Duration::from_secs(2), timeout: Duration::from_millis(500) })
                .expect("HTTP client");
        let started = std::time::Instant::now();
        let err = fetcher.packages(&base, "trixie", "main", "amd64").unwrap_err();
        assert_eq!(err.to_string(), format!("GET {base}/dists/trixie/Release: timed out after 0.5s"));
        assert!(started.elapsed() < Duration::from_secs(10), "took {:?}", started.elapsed());
        drop(listener);
    }

    #[test]
    fn connection_refused_names_the_url() {
        let addr = {
            let l = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
            l.local_addr().expect("local address")
        };
        let base = format!("http://{addr}/debian");
        let err = test_fetcher().release(&base, "trixie").unwrap_err();
        let text = err.to_string();
        assert!(text.starts_with(&format!("GET {base}/dists/trixie/Release: ")), "{text}");
        assert!(matches!(err, DebianError::Http { .. }), "{text}");
    }

    #[test]
    fn decompress_is_bounded() {
        let data = xz(&[b'x'; 5000]);
        let err = decompress("u", Compression::Xz, data, None).map(|v| v.len());
        assert_eq!(err.ok(), Some(5000));
        let plain = FileDigest { size: 100, sha256: SHA_A.into() };
        let err = decompress("u", Compression::Gz, gz(&[b'x'; 5000]), Some(&plain)).unwrap_err();
        assert_eq!(err.to_string(), "u: cannot decompress: decompressed data is larger than 100 bytes");
    }
}
