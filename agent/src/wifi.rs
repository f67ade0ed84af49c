//! Wi-Fi: `kiln-agent wifi IFACE`, run by `kiln-wifi@IFACE.service`, which udev starts for
//! every wireless interface when the profile says `[network] wifi = true`.
//!
//! It reads the provisioned networks (`/var/kiln/provision/wifi/<name>.network`, on the data
//! partition: the image holds no network and no passphrase), writes wpa_supplicant's
//! configuration under `/run` (0600), runs wpa_supplicant for the interface as its child and
//! listens on its control socket. What the owner needs to know becomes one line each time it
//! changes (connected, a passphrase the access point refused, no provisioned network in range)
//! on the console and in the journal, and `/run/kiln-wifi/IFACE/status.json`, which
//! `kiln-agent status` shows. systemd-networkd does DHCP on the interface once it is associated
//! (`80-kiln-wifi.network`). A bad network file is named with its line and skipped; the others
//! still work.

use crate::exec::Cmd;
use anyhow::{bail, Context as _, Result};
use kiln_device::wifi::{parse_network, WifiNetwork, SUFFIX};
use serde::{Deserialize, Serialize};
use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// The provisioned networks.
pub const PROVISION_DIR: &str = "/var/kiln/provision/wifi";
/// Per interface: the supplicant's configuration, its control socket, the status.
pub const RUN_DIR: &str = "/run/kiln-wifi";
/// A network file is a few lines; anything bigger is not one.
const MAX_FILE: u64 = 64 * 1024;

/// What one interface is doing, as `kiln-agent status` shows it.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct WifiStatus {
    pub interface: String,
    pub state: State,
    /// The network file's name (without `.network`) this is about, if one.
    pub network: Option<String>,
    /// That network's SSID.
    pub ssid: Option<String>,
    /// Unix seconds since which this is the state.
    pub since: u64,
    /// The line that was said when the state began.
    pub message: String,
}

#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum State {
    /// No usable network file: the interface stays down.
    NoNetworks,
    /// Scanning for the provisioned networks.
    Searching,
    /// None of them is in range.
    NotFound,
    /// The access point refused the provisioned passphrase.
    WrongPassphrase,
    /// Associating failed for another reason; the supplicant keeps trying.
    Failing,
    Connected,
}

/// The provisioned networks in `dir`, by file name, and a line for each file that could not be
/// used (which names the file and the line).
pub fn load_networks(dir: &Path) -> (Vec<WifiNetwork>, Vec<String>) {
    let (mut networks, mut problems) = (Vec::new(), Vec::new());
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return (networks, problems),
        Err(e) => {
            problems.push(format!("reading {}: {e}", dir.display()));
            return (networks, problems);
        }
    };
    let mut names: Vec<String> =
        entries.filter_map(|e| e.ok()).filter_map(|e| e.file_name().into_string().ok()).collect();
    names.sort();
    for file in names {
        let path = dir.join(&file);
        let Some(name) = file.strip_suffix(SUFFIX).filter(|n| !n.is_empty() && !n.starts_with('.')) else {
            if !file.starts_with('.') {
                problems.push(format!("{}: not a network file (DIR/wifi/<name>{SUFFIX}); ignored", path.display()));
            }
            continue;
        };
        match read_small(&path).map_err(|e| (0, e)).and_then(|text| parse_network(name, &text)) {
            Ok(n) => networks.push(n),
            Err((0, e)) => problems.push(format!("{}: {e}; this network is skipped", path.display())),
            Err((line, e)) => problems.push(format!("{} line {line}: {e}; this network is skipped", path.display())),
        }
    }
    (networks, problems)
}

/// A regular file of at most [`MAX_FILE`] bytes, opened without following a link.
fn read_small(path: &Path) -> Result<String, String> {
    use kiln_device::fs::ReadError;
    let data = kiln_device::fs::read_regular(path, MAX_FILE).map_err(|e| match e {
        ReadError::Io(e) => format!("cannot be read ({e})"),
        ReadError::TooBig(n) => format!("{n} bytes; a network file has at most {MAX_FILE}"),
        ReadError::Link => "a symbolic link; a network file must be a regular file".to_string(),
        ReadError::NotRegular => "not a regular file".to_string(),
    })?;
    String::from_utf8(data).map_err(|e| format!("not UTF-8 text ({e})"))
}

/// An interface name as the kernel makes them: 1 to 15 of letters, digits, `-`, `_`, `.`.
pub fn valid_interface(name: &str) -> bool {
    (1..=15).contains(&name.len())
        && !name.starts_with('.')
        && name.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
}

/// Runs Wi-Fi on `interface` until wpa_supplicant ends (an error: systemd starts it again).
pub fn run(config: &kiln_device::DeviceConfig, interface: &str) -> Result<()> {
    let Some(wifi) = &config.wifi else {
        bail!("this image has no Wi-Fi: the profile needs [network] wifi = true and country");
    };
    if !valid_interface(interface) {
        bail!("{interface:?} is not a network interface name");
    }
    let dir = Path::new(RUN_DIR).join(interface);
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))
        .with_context(|| format!("chmod {}", dir.display()))?;
    let mut say = Reporter { interface: interface.to_string(), status: dir.join("status.json"), last: None };

    let (networks, problems) = load_networks(Path::new(PROVISION_DIR));
    for p in &problems {
        println!("kiln-agent: wifi: {p}");
    }
    if networks.is_empty() {
        say.state(
            State::NoNetworks,
            None,
            None,
            format!(
                "{interface}: no Wi-Fi network is provisioned ({PROVISION_DIR}/<name>{SUFFIX}, written by kiln flash --provision DIR); {interface} stays down"
            ),
        );
        return Ok(());
    }

    let ctrl = dir.join("ctrl");
    let conf = dir.join("wpa_supplicant.conf");
    let text = kiln_device::wifi::supplicant_conf(&wifi.country, &ctrl.to_string_lossy(), &networks);
    write_private(&conf, text.as_bytes())?;
    let _ = std::fs::remove_dir_all(&ctrl);
    let mut child = Cmd::new("wpa_supplicant")
        .args(["-q", "-D", "nl80211,wext", "-i", interface, "-c"])
        .arg(&conf)
        .start()
        .context("starting wpa_supplicant")?;
    let events = match attach(&ctrl.join(interface), &dir.join("agent.sock"), &mut child) {
        Ok(s) => s,
        Err(e) => {
            let _ = child.kill();
            let _ = child.wait();
            return Err(e);
        }
    };
    let names: Vec<String> = networks.iter().map(|n| format!("{:?} ({}{SUFFIX})", n.ssid, n.name)).collect();
    say.state(State::Searching, None, None, format!("{interface}: looking for {}", names.join(", ")));

    let mut buf = [0u8; 4096];
    loop {
        match events.recv(&mut buf) {
            Ok(n) => {
                let event = String::from_utf8_lossy(&buf[..n]);
                if let Some((state, network, line)) = judge(&event, &networks, say.last) {
                    let ssid = network.as_ref().and_then(|name| networks.iter().find(|n| &n.name == name));
                    say.state(state, network.clone(), ssid.map(|n| n.ssid.clone()), format!("{interface}: {line}"));
                }
            }
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {}
            Err(e) => bail!("reading wpa_supplicant's events on {interface}: {e}"),
        }
        if let Some(status) = child.try_wait().context("waiting for wpa_supplicant")? {
            bail!("wpa_supplicant on {interface} ended ({status}); it is started again");
        }
    }
}

/// Opens our end of the control socket and asks for events (the supplicant makes its socket a
/// moment after it starts).
fn attach(ctrl: &Path, ours: &Path, child: &mut std::process::Child) -> Result<UnixDatagram> {
    let start = Instant::now();
    while !ctrl.exists() {
        if let Some(status) = child.try_wait()? {
            bail!("wpa_supplicant ended before it was ready ({status}); its lines above say why");
        }
        if start.elapsed() > Duration::from_secs(30) {
            bail!("wpa_supplicant made no control socket at {} within 30s", ctrl.display());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = std::fs::remove_file(ours);
    let sock = UnixDatagram::bind(ours).with_context(|| format!("binding {}", ours.display()))?;
    sock.connect(ctrl).with_context(|| format!("connecting to {}", ctrl.display()))?;
    sock.set_read_timeout(Some(Duration::from_secs(5)))?;
    sock.send(b"ATTACH")?;
    let mut buf = [0u8; 256];
    let n = sock.recv(&mut buf).with_context(|| format!("no answer to ATTACH from {}", ctrl.display()))?;
    if !buf[..n].starts_with(b"OK") {
        bail!("wpa_supplicant refused ATTACH: {}", String::from_utf8_lossy(&buf[..n]).trim());
    }
    Ok(sock)
}

/// What a supplicant event means for the owner: the new state, the network it is about and
/// the line to say, or None when nothing changed that they need to hear about.
pub fn judge(event: &str, networks: &[WifiNetwork], now: Option<State>) -> Option<(State, Option<String>, String)> {
    // "<3>CTRL-EVENT-..." : the priority, then the event.
    let event = event.trim().trim_start_matches(|c| c != '>').trim_start_matches('>');
    // The first `id=` is the supplicant's; `reason=` is read from the end (an SSID, quoted
    // before it, may hold spaces and anything).
    let field = |key: &str| {
        event.split_whitespace().find_map(|w| w.strip_prefix(key)).map(|v| v.trim_end_matches(']').to_string())
    };
    let last_field = |key: &str| event.split_whitespace().rev().find_map(|w| w.strip_prefix(key)).map(str::to_string);
    let network = |id: Option<String>| id.and_then(|i| i.parse::<usize>().ok()).and_then(|i| networks.get(i));
    let named = |n: &WifiNetwork| format!("{:?} ({PROVISION_DIR}/{}{SUFFIX})", n.ssid, n.name);
    if event.starts_with("CTRL-EVENT-CONNECTED") {
        let n = network(field("[id=").or_else(|| field("id=")));
        let what = n.map(named).unwrap_or_else(|| "a provisioned network".into());
        let bssid = event.split_whitespace().nth(4).unwrap_or("?");
        return Some((State::Connected, n.map(|n| n.name.clone()), format!("connected to {what} via {bssid}")));
    }
    if event.starts_with("CTRL-EVENT-SSID-TEMP-DISABLED") {
        let n = network(field("id="));
        let reason = last_field("reason=").unwrap_or_default();
        let what = n.map(named).unwrap_or_else(|| "a provisioned network".into());
        let state = if reason == "WRONG_KEY" { State::WrongPassphrase } else { State::Failing };
        if now == Some(state) {
            return None;
        }
        let line = if state == State::WrongPassphrase {
            format!("the access point of {what} refused the passphrase (the 4-way handshake failed): provision the right one with kiln flash --provision, or correct that file; retrying meanwhile")
        } else {
            format!("connecting to {what} failed ({reason}); retrying")
        };
        return Some((state, n.map(|n| n.name.clone()), line));
    }
    if event.starts_with("CTRL-EVENT-DISCONNECTED") && now == Some(State::Connected) {
        let reason = last_field("reason=").unwrap_or_else(|| "?".into());
        return Some((
            State::Searching,
            None,
            format!("disconnected (reason {reason}); looking for the networks again"),
        ));
    }
    if event.starts_with("CTRL-EVENT-NETWORK-NOT-FOUND") && matches!(now, Some(State::Searching)) {
        let names: Vec<String> = networks.iter().map(|n| format!("{:?}", n.ssid)).collect();
        return Some((
            State::NotFound,
            None,
            format!("none of the provisioned networks is in range ({}); still looking", names.join(", ")),
        ));
    }
    None
}

/// Says each state once, and keeps it for `kiln-agent status`.
struct Reporter {
    interface: String,
    status: PathBuf,
    last: Option<State>,
}

impl Reporter {
    fn state(&mut self, state: State, network: Option<String>, ssid: Option<String>, message: String) {
        println!("kiln-agent: wifi: {message}");
        self.last = Some(state);
        let s = WifiStatus {
            interface: self.interface.clone(),
            state,
            ssid,
            network,
            since: std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0),
            message,
        };
        let json = serde_json::to_vec_pretty(&s).expect("a status serialises");
        if let Err(e) = write_private(&self.status, &json) {
            println!("kiln-agent: wifi: {e:#}");
        }
    }
}

/// Writes `data` to `path` (0600) through a temporary file and a rename.
fn write_private(path: &Path, data: &[u8]) -> Result<()> {
    let tmp = path.with_extension("tmp");
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .with_context(|| format!("creating {}", tmp.display()))?;
    std::io::Write::write_all(&mut f, data).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))
}

/// Every interface's status, for `kiln-agent status`.
pub fn statuses(run_dir: &Path) -> Vec<WifiStatus> {
    let mut out: Vec<WifiStatus> = std::fs::read_dir(run_dir)
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok())
        .filter_map(|e| std::fs::read(e.path().join("status.json")).ok())
        .filter_map(|b| serde_json::from_slice(&b).ok())
        .collect();
    out.sort_by(|a, b| a.interface.cmp(&b.interface));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nets() -> Vec<WifiNetwork> {
        vec![
            parse_network("home", "ssid=Home\npassphrase=correct horse\n").unwrap(),
            parse_network("cafe", "ssid=Cafe\nopen=true\n").unwrap(),
        ]
    }

    #[test]
    fn supplicant_events_become_one_line_per_change() {
        let n = nets();
        let wrong = "<3>CTRL-EVENT-SSID-TEMP-DISABLED id=0 ssid=\"Home\" auth_failures=1 duration=10 reason=WRONG_KEY";
        let (state, net, line) = judge(wrong, &n, Some(State::Searching)).unwrap();
        assert_eq!((state, net.as_deref()), (State::WrongPassphrase, Some("home")));
        assert!(
            line.contains("refused the passphrase") && line.contains("/var/kiln/provision/wifi/home.network"),
            "{line}"
        );
        // The supplicant retries and fails again: said once.
        let again = wrong.replace("auth_failures=1 duration=10", "auth_failures=2 duration=20");
        assert_eq!(judge(&again, &n, Some(State::WrongPassphrase)), None);
        let up = "<3>CTRL-EVENT-CONNECTED - Connection to 02:00:00:00:01:00 completed [id=1 id_str=]";
        let (state, net, line) = judge(up, &n, Some(State::WrongPassphrase)).unwrap();
        assert_eq!((state, net.as_deref()), (State::Connected, Some("cafe")));
        assert_eq!(line, "connected to \"Cafe\" (/var/kiln/provision/wifi/cafe.network) via 02:00:00:00:01:00");
        let down = "<3>CTRL-EVENT-DISCONNECTED bssid=02:00:00:00:01:00 reason=3 locally_generated=1";
        assert_eq!(judge(down, &n, Some(State::Connected)).unwrap().0, State::Searching);
        assert_eq!(judge(down, &n, Some(State::Searching)), None);
        let missing = "<3>CTRL-EVENT-NETWORK-NOT-FOUND";
        assert!(judge(missing, &n, Some(State::Searching)).unwrap().2.contains("\"Home\", \"Cafe\""));
        assert_eq!(judge(missing, &n, Some(State::NotFound)), None);
        assert_eq!(judge("<3>CTRL-EVENT-SCAN-RESULTS ", &n, Some(State::Searching)), None);
        let other = "<3>CTRL-EVENT-SSID-TEMP-DISABLED id=7 ssid=\"x\" auth_failures=1 duration=10 reason=CONN_FAILED";
        let (state, net, line) = judge(other, &n, Some(State::Searching)).unwrap();
        assert_eq!((state, net), (State::Failing, None));
        assert!(line.contains("(CONN_FAILED)"), "{line}");
    }

    #[test]
    fn bad_files_are_named_with_their_line_and_skipped() {
        let d = std::env::temp_dir().join(format!("kiln-wifi-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join("b-home.network"), "ssid=Home\npassphrase=correct horse\n").unwrap();
        std::fs::write(d.join("a-bad.network"), "ssid=Bad\npassphrase=short\n").unwrap();
        std::fs::write(d.join("notes.txt"), "x").unwrap();
        std::os::unix::fs::symlink(d.join("b-home.network"), d.join("c-link.network")).unwrap();
        let (nets, problems) = load_networks(&d);
        assert_eq!(nets.iter().map(|n| n.name.as_str()).collect::<Vec<_>>(), ["b-home"]);
        assert_eq!(problems.len(), 3, "{problems:?}");
        assert!(problems[0].contains("a-bad.network line 2: passphrase: expected 8 to 63"), "{problems:?}");
        assert!(problems[1].contains("c-link.network: a symbolic link"), "{problems:?}");
        assert!(problems[2].contains("notes.txt: not a network file"), "{problems:?}");
        assert_eq!(load_networks(&d.join("missing")), (vec![], vec![]));
        std::fs::remove_dir_all(&d).unwrap();
        assert!(
            valid_interface("wlan0") && valid_interface("wlp2s0") && !valid_interface("../x") && !valid_interface("")
        );
        assert!(!valid_interface("a-very-long-interface"));
    }
}
