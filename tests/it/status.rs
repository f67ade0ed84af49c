//! `kiln status` end to end: four devices' status feeds (fine, warnings only, an open disk alert
//! with two days of samples, silent) served over loopback HTTP and read from a directory; the
//! table, `--json`, the exit status (0, 1, 2), a release feed making devices "behind", and the
//! `--html` page rendered by a real browser (headless chromium), its cards' colours counted in
//! the screenshot. `KILN_SAVE_SCREENSHOT=PATH` also saves a 1000x700 screenshot there (the
//! README's `docs/status-page.png`).

use crate::httpd::Server;
use crate::{kiln, repo_root, text, Need};
use kiln_feed::status::{atom, DeviceInfo, Event, EventKind, Sample, Severity, StatusFeed, Summary, STATUS_FORMAT};
use kiln_feed::{Metadata, Release, Timestamp};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

const NOW: &str = "2026-11-22T12:00:00Z";
const HOUR: u64 = 3600;

fn now() -> u64 {
    NOW.parse::<Timestamp>().unwrap().0
}

fn ago(secs: u64) -> Timestamp {
    Timestamp(now() - secs)
}

fn raised(id: &str, key: &str, severity: Severity, since: u64, title: &str, what_to_do: &str) -> Event {
    Event {
        id: id.into(),
        key: key.into(),
        kind: EventKind::Raised,
        severity,
        at: ago(since),
        since: ago(since),
        title: title.into(),
        detail: String::new(),
        what_to_do: what_to_do.into(),
    }
}

/// One sample an hour, the newest `last` seconds ago, the use given by `pct(i)` (oldest first).
fn samples(n: u64, last: u64, pct: impl Fn(f64) -> f64) -> Vec<Sample> {
    (0..n).map(|i| Sample { at: ago(last + (n - 1 - i) * HOUR), data_used_percent: pct(i as f64) }).collect()
}

fn device(host: &str, image: &str, arch: &str, version: &str, seen: u64) -> StatusFeed {
    StatusFeed {
        format: STATUS_FORMAT,
        device: DeviceInfo {
            hostname: host.into(),
            device_id: Some(format!("{:0>32}", hex(host))),
            profile: "home".into(),
            image: image.into(),
            arch: arch.into(),
            version: version.into(),
            channel: Some("stable".into()),
            booted: Some(ago(3 * 86400)),
        },
        updated: ago(seen),
        interval_secs: 300,
        summary: Summary {
            update: "up to date".into(),
            last_check: Some(ago(seen)),
            available: None,
            last_good_backup: Some(ago(7 * HOUR)),
            backup_configured: true,
            data_used_percent: Some(38.0),
            data_inodes_percent: Some(4.0),
            clock_synchronised: true,
        },
        open: Vec::new(),
        events: Vec::new(),
        samples: Vec::new(),
    }
}

fn hex(s: &str) -> String {
    s.bytes().map(|b| format!("{b:02x}")).collect()
}

/// kitchen: fine; garage: a warning; nas: the data partition 96 % full (an alert) after two
/// days of growth; shed: silent for 3 hours.
fn feeds() -> Vec<StatusFeed> {
    let mut kitchen = device("kitchen", "rpi4", "arm64", "0.3.0", 2 * 60);
    kitchen.samples = samples(48, 120, |i| 37.0 + (i / 7.0).sin() * 1.5 + i / 48.0);
    let mut garage = device("garage", "pc-uefi", "amd64", "0.2.0", 4 * 60);
    garage.summary.clock_synchronised = false;
    garage.summary.backup_configured = false;
    garage.summary.last_good_backup = None;
    garage.summary.data_used_percent = Some(12.0);
    garage.open.push(raised(
        "7-1",
        "clock",
        Severity::Warning,
        40 * 60,
        "clock not synchronised",
        "check that the device reaches an NTP server",
    ));
    let mut nas = device("nas", "pc-uefi", "amd64", "0.3.0", 30);
    nas.summary.data_used_percent = Some(96.2);
    nas.samples = samples(48, 30, |i| 61.0 + 35.2 * (i / 47.0).powi(2));
    let disk = raised(
        "12-1",
        "disk:/var",
        Severity::Alert,
        2 * HOUR,
        "/var is 96 % full",
        "free space on /var (old logs, media) or move the data to a larger disk",
    );
    nas.open.push(disk.clone());
    nas.events.push(disk);
    let mut shed = device("shed", "rpi4", "arm64", "0.2.0", 3 * HOUR + 10 * 60);
    shed.summary.data_used_percent = Some(54.0);
    shed.samples = samples(20, 3 * HOUR + 10 * 60, |i| 52.0 + i / 10.0);
    vec![kitchen, garage, nas, shed]
}

fn release(version: &str, image: &str, arch: &str) -> Release {
    Release {
        version: version.parse().unwrap(),
        published: ago(86400),
        profile: "home".into(),
        image: image.into(),
        arch: arch.into(),
        root_hash: "ab".repeat(32),
        artifacts: Vec::new(),
        changelog: Vec::new(),
        notes: String::new(),
        security: false,
    }
}

/// The channel's metadata: 0.3.0 for both boards, so garage and shed (0.2.0) are behind.
fn metadata() -> Metadata {
    Metadata {
        format: kiln_feed::FORMAT,
        channel: "stable".into(),
        generated: ago(86400),
        expires: Timestamp(now() + 30 * 86400),
        releases: vec![
            release("0.3.0", "pc-uefi", "amd64"),
            release("0.3.0", "rpi4", "arm64"),
            release("0.2.0", "pc-uefi", "amd64"),
        ],
    }
}

/// A directory as a device pushes into it: NAME.atom and NAME.json per device, and the release
/// channel's stable.json (not a status feed: `kiln status DIR` names it as skipped).
fn site() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for f in feeds() {
        std::fs::write(dir.path().join(format!("{}.json", f.name())), f.to_json()).unwrap();
        std::fs::write(dir.path().join(format!("{}.atom", f.name())), atom(&f, None)).unwrap();
    }
    std::fs::write(dir.path().join("stable.json"), serde_json::to_string_pretty(&metadata()).unwrap()).unwrap();
    dir
}

fn status(args: &[&str]) -> Output {
    let mut a = vec!["status", "--now", NOW];
    a.extend(args);
    kiln(&repo_root(), &a)
}

fn show(out: &Output) -> String {
    format!("status {:?}\n--- stdout\n{}--- stderr\n{}", out.status.code(), text(&out.stdout), text(&out.stderr))
}

#[test]
fn status_reads_feeds_over_http_and_from_a_directory() {
    let site = site();
    let server = Server::start(site.path());
    let url = |name: &str| format!("http://127.0.0.1:{}/{name}", server.port());
    let dir = site.path().display().to_string();

    // One healthy device: 0, and the .atom URL read as its .json twin.
    let out = status(&[&url("kitchen.atom")]);
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    assert_eq!(
        text(&out.stdout),
        "DEVICE   VERSION  CHANNEL  LAST SEEN  UPDATE      BACKUP  DISK  ALERTS\n\
         kitchen  0.3.0    stable   2m ago     up to date  7h ago  38%   0\n"
    );
    assert!(server.requests().iter().any(|r| r.path == "/kitchen.json" && r.status == 200), "{:?}", server.requests());

    // Warnings alone are still 0, but are named below the table.
    let out = status(&[&url("kitchen.atom"), &url("garage.json")]);
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    let t = text(&out.stdout);
    assert!(t.contains("garage   0.2.0    stable   4m ago     up to date  -       12%   0 (+1 warning)\n"), "{t}");
    assert!(t.contains("\n  garage: warning: clock not synchronised (since 2026-11-22T11:20:00Z, 40m ago)\n"), "{t}");

    // The directory: every device, the alert and the silence say 1; the metadata is skipped.
    let out = status(&[&dir]);
    assert_eq!(out.status.code(), Some(1), "{}", show(&out));
    let t = text(&out.stdout);
    let lines: Vec<&str> = t.lines().collect();
    assert_eq!(lines[0], "DEVICE   VERSION  CHANNEL  LAST SEEN  UPDATE      BACKUP  DISK  ALERTS", "{t}");
    assert_eq!(
        lines[1..5],
        [
            "garage   0.2.0    stable   4m ago     up to date  -       12%   0 (+1 warning)",
            "kitchen  0.3.0    stable   2m ago     up to date  7h ago  38%   0",
            "nas      0.3.0    stable   30s ago    up to date  7h ago  96%   1",
            "shed     0.2.0    stable   SILENT 3h  up to date  7h ago  54%   0",
        ],
        "{t}"
    );
    assert!(t.contains("  nas: ALERT: /var is 96 % full (since 2026-11-22T10:00:00Z, 2h ago)\n"), "{t}");
    assert!(t.contains("      what to do: free space on /var (old logs, media)"), "{t}");
    assert!(t.contains("  shed: SILENT: no status since 2026-11-22T08:50:00Z (3h ago)\n"), "{t}");
    assert_eq!(text(&out.stderr), format!("skipped {dir}/stable.json: not a kiln status feed\n"));
    // Told that 4 hours of silence is fine, only the alert is left.
    let out = status(&[&dir, "--silent-after", "4h"]);
    assert_eq!(out.status.code(), Some(1), "{}", show(&out));
    assert!(text(&out.stdout).contains("shed     0.2.0    stable   3h ago "), "{}", show(&out));

    // --json over HTTP.
    let urls: Vec<String> = ["kitchen", "garage", "nas", "shed"].iter().map(|n| url(&format!("{n}.atom"))).collect();
    let mut args: Vec<&str> = urls.iter().map(String::as_str).collect();
    args.push("--json");
    let out = status(&args);
    assert_eq!(out.status.code(), Some(1), "{}", show(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let states: Vec<&str> = v.as_array().unwrap().iter().map(|d| d["state"].as_str().unwrap()).collect();
    assert_eq!(states, ["fine", "warning", "alert", "silent"]);
    let nas = &v[2];
    assert_eq!(nas["name"], "nas");
    assert_eq!(nas["source"], url("nas.json"));
    assert_eq!(nas["version"], "0.3.0");
    assert_eq!(nas["channel"], "stable");
    assert_eq!(nas["last_seen"], "2026-11-22T11:59:30Z");
    assert_eq!(nas["silent"], false);
    assert_eq!(nas["data_used_percent"], 96.2);
    assert_eq!(nas["last_good_backup"], "2026-11-22T05:00:00Z");
    assert_eq!(nas["open"][0]["title"], "/var is 96 % full");
    assert_eq!(nas["open"][0]["severity"], "alert");
    assert_eq!(nas["open"][0]["since"], "2026-11-22T10:00:00Z");
    assert_eq!(v[3]["silent"], true);
    assert_eq!(v[1]["last_good_backup"], serde_json::Value::Null);

    // A source that cannot be read: 2, what could be read is still shown, each failure named.
    let garbage = site.path().join("garbage.json");
    std::fs::write(&garbage, "<html>502 Bad Gateway</html>").unwrap();
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let unreachable = format!("http://127.0.0.1:{closed}/cellar.atom");
    let out = status(&[&url("kitchen.atom"), &url("attic.atom"), &unreachable, garbage.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2), "{}", show(&out));
    assert!(text(&out.stdout).contains("\nkitchen  0.3.0 "), "{}", show(&out));
    let err = text(&out.stderr);
    let attic = url("attic.json");
    assert!(err.contains(&format!("cannot read {attic}: GET {attic}: HTTP 404\n")), "{err}");
    assert!(err.contains(&format!("cannot read http://127.0.0.1:{closed}/cellar.json: GET ")), "{err}");
    assert!(err.contains(&format!("cannot read {}: not a kiln status feed: ", garbage.display())), "{err}");
    // The garbage in the directory: a file that is not JSON is a failure, not a skip.
    let out = status(&[&dir]);
    assert_eq!(out.status.code(), Some(2), "{}", show(&out));
    assert!(text(&out.stderr).contains(&format!("cannot read {dir}/garbage.json: not JSON: ")), "{}", show(&out));
    std::fs::remove_file(&garbage).unwrap();

    // No source at all: 2, and how to name one.
    let out = status(&[]);
    assert_eq!(out.status.code(), Some(2), "{}", show(&out));
    assert!(
        text(&out.stderr).starts_with("error: name the devices' status feeds: kiln status SOURCE..."),
        "{}",
        show(&out)
    );

    // The release feed (its .atom URL stands for stable.json, or the file): garage and shed run
    // 0.2.0 where 0.3.0 is out for their boards.
    for feed in [url("stable.atom"), format!("{dir}/stable.json")] {
        let out = status(&[&dir, "--feed", &feed]);
        assert_eq!(out.status.code(), Some(1), "{}", show(&out));
        let t = text(&out.stdout);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(
            lines[1..5],
            [
                "garage   0.2.0    stable   4m ago     up to date; behind: 0.3.0 available  -       12%   0 (+1 warning)",
                "kitchen  0.3.0    stable   2m ago     up to date                           7h ago  38%   0",
                "nas      0.3.0    stable   30s ago    up to date                           7h ago  96%   1",
                "shed     0.2.0    stable   SILENT 3h  up to date; behind: 0.3.0 available  7h ago  54%   0",
            ],
            "{t}"
        );
    }
    let out = status(&[&dir, "--json", "--feed", &url("stable.atom")]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let behind: Vec<&serde_json::Value> = v.as_array().unwrap().iter().map(|d| &d["behind"]).collect();
    assert_eq!(behind, [&"0.3.0".into(), &serde_json::Value::Null, &serde_json::Value::Null, &"0.3.0".into()]);
    // A release feed that cannot be read is a failure like a device's.
    let out = status(&[&url("kitchen.atom"), "--feed", &url("beta.atom")]);
    assert_eq!(out.status.code(), Some(2), "{}", show(&out));
    assert!(text(&out.stderr).contains(&format!("cannot read {}: GET ", url("beta.json"))), "{}", show(&out));
}

/// The colours of the cards' left borders (and badges), as the page's CSS has them.
const CARD_COLOURS: [(&str, [u8; 3]); 4] = [
    ("green", [0x2e, 0x7d, 0x32]),
    ("amber", [0xf9, 0xa8, 0x25]),
    ("red", [0xc6, 0x28, 0x28]),
    ("grey", [0x75, 0x75, 0x75]),
];

#[test]
fn status_page_renders_in_a_browser() {
    let Some(_timed) = crate::heavy_test("status_page_renders_in_a_browser", &[Need::Tool("chromium")]) else {
        return;
    };
    let site = site();
    let work = tempfile::tempdir().unwrap();
    let page = work.path().join("page.html");
    let dir = site.path().display().to_string();
    let out = status(&[&dir, "--feed", &format!("{dir}/stable.json"), "--html", page.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1), "{}", show(&out));
    let html = std::fs::read_to_string(&page).unwrap();
    let lower = html.to_lowercase();
    for script in ["<script", "javascript:", "onload=", "onerror=", "onclick=", "<iframe", "<object"] {
        assert!(!lower.contains(script), "the page has {script}:\n{html}");
    }
    assert!(html.contains("<h2>nas</h2>") && html.contains("What to do: free space on /var"), "{html}");
    assert!(!work.path().join(".page.html.tmp").exists(), "written through a temporary file");

    let png = work.path().join("page.png");
    let seconds = screenshot(&page, &png, (1200, 900), work.path());
    let (w, h, pixels) = decode(&png);
    assert_eq!((w, h), (1200, 900));
    let mut figures = Vec::new();
    for (name, rgb) in CARD_COLOURS {
        let (count, run) = count_colour(&pixels, w as usize, rgb);
        // A card's border is a solid vertical stripe: text never draws 100 pixels of one colour
        // in a column.
        assert!(run >= 100, "{name} card border: {count} pixels, longest vertical run {run} (need 100)");
        figures.push(format!("{name} {count} px"));
    }
    println!(
        "kiln-it: status page ({} bytes of HTML, 4 cards) rendered by chromium in {seconds:.2}s: {w}x{h} PNG of {} bytes; border colours: {}",
        html.len(),
        std::fs::metadata(&png).unwrap().len(),
        figures.join(", ")
    );
    if let Some(to) = std::env::var_os("KILN_SAVE_SCREENSHOT") {
        let to = repo_root().join(PathBuf::from(to));
        screenshot(&page, &to, (1000, 700), work.path());
        println!(
            "kiln-it: saved the status page's screenshot to {} ({} bytes)",
            to.display(),
            to.metadata().unwrap().len()
        );
    }
}

/// Renders `page` with headless chromium into `png`; the time it took.
fn screenshot(page: &Path, png: &Path, (w, h): (u32, u32), work: &Path) -> f64 {
    let started = Instant::now();
    let mut child = Command::new("chromium")
        .args(["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--hide-scrollbars"])
        .args(["--no-first-run", "--no-default-browser-check", "--force-device-scale-factor=1"])
        .arg(format!("--user-data-dir={}", work.join("chromium-profile").display()))
        .arg(format!("--window-size={w},{h}"))
        .arg(format!("--screenshot={}", png.display()))
        .arg(format!("file://{}", page.display()))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(work.join("chromium.err")).unwrap())
        .spawn()
        .expect("chromium starts");
    let deadline = started + Duration::from_secs(120);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("chromium did not finish a screenshot in 120 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let seconds = started.elapsed().as_secs_f64();
    let err = std::fs::read_to_string(work.join("chromium.err")).unwrap_or_default();
    assert!(status.success() && png.exists(), "chromium {status}:\n{}", tail(&err, 30));
    seconds
}

fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Width, height and the RGB pixels of a PNG, row by row.
fn decode(path: &Path) -> (u32, u32, Vec<[u8; 3]>) {
    let mut decoder = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(path).unwrap()));
    decoder.set_transformations(png::Transformations::EXPAND | png::Transformations::STRIP_16);
    let mut reader = decoder.read_info().unwrap();
    let mut buf = vec![0; reader.output_buffer_size().unwrap()];
    let frame = reader.next_frame(&mut buf).unwrap();
    let step = match frame.color_type {
        png::ColorType::Rgb => 3,
        png::ColorType::Rgba => 4,
        other => panic!("{}: unexpected PNG colour type {other:?}", path.display()),
    };
    let pixels = buf[..frame.buffer_size()].chunks_exact(step).map(|p| [p[0], p[1], p[2]]).collect();
    (frame.width, frame.height, pixels)
}

/// How many pixels have `rgb` (within 2 per channel), and the longest vertical run of them.
fn count_colour(pixels: &[[u8; 3]], width: usize, rgb: [u8; 3]) -> (usize, usize) {
    let close = |p: &[u8; 3]| p.iter().zip(rgb).all(|(a, b)| a.abs_diff(b) <= 2);
    let count = pixels.iter().filter(|p| close(p)).count();
    let height = pixels.len() / width;
    let mut longest = 0;
    for x in 0..width {
        let mut run = 0;
        for y in 0..height {
            run = if close(&pixels[y * width + x]) { run + 1 } else { 0 };
            longest = longest.max(run);
        }
    }
    (count, longest)
}
