//! Sandboxed services end to end: the README's `profiles/home.toml` (caddy, syncthing, radicale,
//! backups, updates) extended with a program of the user's own and Wi-Fi, locked and built for real; the security gate's scores (every one within the
//! 2.0 budget); a deliberately weak unit that fails the build with the directives to fix; and in
//! QEMU: every service active, only declared ports listening, the firewall dropping an
//! undeclared port that something listens on, and SSH refusing passwords. (The Lynis audit of
//! booted images takes minutes per image under TCG: `scripts/bench-lynis`, not CI.)

use crate::Need;
use crate::{kiln_bin, kiln_in, kiln_ok, repo_root, text};
use std::process::Command;
use std::time::Instant;

/// A stand-in for a user's own web service: answers on --port, counts its starts in its
/// state directory.
const MYAPP: &str = r#"#!/usr/bin/python3
import http.server, os, sys
port = int(sys.argv[sys.argv.index("--port") + 1])
state = os.environ["STATE_DIRECTORY"]
with open(os.path.join(state, "starts"), "a") as f:
    f.write("start\n")
class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = b"myapp ok\n"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
http.server.ThreadingHTTPServer(("", port), Handler).serve_forever()
"#;

/// Wi-Fi in the guest, run over SSH after the other checks: two mac80211_hwsim radios appear
/// (as a USB stick would); the test's access point (hostapd, WPA2, with networkd's DHCP server)
/// takes wlan1, the appliance's own kiln-wifi@wlan0 joins it with the provisioned network and
/// gets a lease over the air; then the same network provisioned with a wrong passphrase.
const WIFI: &str = r#"set -e
net="ssid=kiln-it net"
printf "%s\npassphrase=correct horse battery\n" "$net" | sudo install -D -m 0600 /dev/stdin /var/kiln/provision/wifi/home.network
printf "ssid=Typo\npassphrase=short\n" | sudo install -m 0600 /dev/stdin /var/kiln/provision/wifi/typo.network
sudo install -d -m 0755 /run/kiln-it /run/systemd/network
printf "interface=wlan1\ndriver=nl80211\nssid=kiln-it net\nhw_mode=g\nchannel=6\nwpa=2\nwpa_key_mgmt=WPA-PSK\nrsn_pairwise=CCMP\nwpa_passphrase=correct horse battery\n" | sudo tee /run/kiln-it/hostapd.conf >/dev/null
printf "[Match]\nName=wlan1\n[Network]\nAddress=192.168.207.1/24\nDHCPServer=yes\n[DHCPServer]\nPoolOffset=100\nPoolSize=20\n" | sudo install -m 0644 /dev/stdin /run/systemd/network/10-kiln-it-ap.network
sudo networkctl reload
sudo systemctl mask --runtime --quiet kiln-wifi@wlan1.service
sudo nft insert rule inet kiln input iifname wlan1 udp dport 67 accept
sudo modprobe mac80211_hwsim radios=2
sudo udevadm settle
sudo systemd-run --quiet --unit kiln-it-ap /usr/sbin/hostapd /run/kiln-it/hostapd.conf
for i in $(seq 90); do
  addr=$(ip -4 -br addr show dev wlan0 2>&1 || true)
  case "$addr" in *192.168.207.*) break ;; esac
  sleep 1
done
echo "wifi-after $i s: $addr"
sudo kiln-agent status | grep "^wifi:" | sed "s/^/wifi-status /"
sudo kiln-agent status --json | grep ssid | sed "s/^ *//; s/,\$//; s/^/wifi-ssid /"
systemctl is-enabled wpa_supplicant.service 2>&1 | sed "s/^/wifi-debian-unit /"
sudo /usr/lib/kiln/health-check | sed "s/^/wifi-health /"
printf "%s\npassphrase=not the passphrase\n" "$net" | sudo install -m 0600 /dev/stdin /var/kiln/provision/wifi/home.network
sudo systemctl restart kiln-wifi@wlan0.service
for i in $(seq 90); do
  sudo kiln-agent status | grep -q "refused the passphrase" && break
  sleep 1
done
sudo kiln-agent status | grep "^wifi:" | sed "s/^/wifi-wrong-status /"
sudo journalctl -b -o cat -u kiln-wifi@wlan0.service | sed "s/^/wifi-journal /"
sudo /usr/lib/kiln/health-check | sed "s/^/wifi-wrong-health /"
sudo stat -c "%a %U %n" /run/kiln-wifi/wlan0/wpa_supplicant.conf /var/kiln/provision/wifi/home.network | sed "s/^/wifi-mode /"
"#;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

#[test]
fn services_are_sandboxed_gated_and_only_declared_ports_listen() {
    let Some(_timed) = crate::heavy_test(
        "services_are_sandboxed_gated_and_only_declared_ports_listen",
        &[Need::Root, Need::Tool("mmdebstrap"), Need::Tool("qemu-system-x86_64")],
    ) else {
        return;
    };
    let root = repo_root();
    let work = root.join("target/kiln-it-services");
    let _scratch = crate::Scratch(work.clone());
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(work.join("profiles/dist")).unwrap();

    let key = work.join("id_ed25519");
    let kg = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", "kiln-it", "-f"])
        .arg(&key)
        .status()
        .unwrap();
    assert!(kg.success());
    let public = std::fs::read_to_string(work.join("id_ed25519.pub")).unwrap();
    std::fs::write(work.join("profiles/dist/myapp"), MYAPP).unwrap();
    // The README's worked example, as it is in the repository, with a release key of the test's
    // own next to it; the test's appliance extends it.
    std::fs::copy(repo_root().join("profiles/home.toml"), work.join("profiles/home.toml")).unwrap();
    kiln_ok(&work, &["keygen", "--out", "profiles/keys"]);
    std::fs::write(
        work.join("profiles/svc.toml"),
        format!(
            r#"extends = "home"
[users.tester]
ssh_keys = ["{}"]
groups = ["sudo"]

[services.myapp]
binary = "dist/myapp"
exec = "/usr/local/bin/myapp --port 8080"
ports = [8080]
state = true

# Wi-Fi: the appliance joins the provisioned networks. hostapd is the test's access point.
[network]
wifi = true
country = "DE"
[system]
packages = ["hostapd"]
"#,
            public.trim()
        ),
    )
    .unwrap();
    // The same appliance with one more service whose sandbox the profile took apart.
    std::fs::write(
        work.join("profiles/weak.toml"),
        r#"extends = "svc"
[services.weak]
exec = "/usr/bin/sleep infinity"
[services.weak.loosen]
DynamicUser = "no"
ProtectSystem = "no"
ProtectHome = "no"
PrivateDevices = "no"
NoNewPrivileges = "no"
CapabilityBoundingSet = "~"
SystemCallFilter = ""
RestrictAddressFamilies = ""
RestrictNamespaces = "no"
"#,
    )
    .unwrap();

    // Lock, then build exactly that.
    let t = Instant::now();
    kiln_ok(&work, &["lock", "--profile", "profiles/svc.toml", "--out", "scratch"]);
    println!("kiln-it: locked the service profile in {:.1}s", t.elapsed().as_secs_f64());
    let t = Instant::now();
    let built = kiln_ok(&work, &["build", "--profile", "profiles/svc.toml", "--locked", "--out", "out"]);
    println!("kiln-it: built svc-pc-uefi in {:.1}s", t.elapsed().as_secs_f64());
    let table: Vec<&str> = built.lines().skip_while(|l| !l.starts_with("services (systemd-analyze")).take(6).collect();
    println!("kiln-it: the security gate's table:\n{}", table.join("\n"));
    for l in built.lines().filter(|l| l.starts_with("firewall:") || l.starts_with("setuid:")) {
        println!("kiln-it: {l}");
    }

    let dir = work.join("out/svc-pc-uefi");
    let manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("manifest.json")).unwrap()).unwrap();
    let scores = manifest["security"]["services"].as_array().unwrap();
    let mut names: Vec<&str> = scores.iter().map(|s| s["name"].as_str().unwrap()).collect();
    names.sort();
    assert_eq!(names, ["caddy", "myapp", "radicale", "syncthing"], "{scores:?}");
    for s in scores {
        let e = s["exposure"].as_f64().unwrap();
        assert!(e <= 2.0, "{} scored {e}: {s}", s["name"]);
        assert!(s["loosened"].as_array().unwrap().is_empty());
    }
    let fw: Vec<&str> =
        manifest["security"]["firewall"].as_array().unwrap().iter().map(|v| v.as_str().unwrap()).collect();
    assert_eq!(
        fw,
        [
            "22/tcp ssh",
            "80/tcp caddy",
            "443/tcp caddy",
            "443/udp caddy",
            "5232/tcp radicale",
            "8080/tcp myapp",
            "21027/udp syncthing",
            "22000/tcp syncthing",
            "22000/udp syncthing"
        ]
    );
    let inspect = Command::new(kiln_bin()).arg("inspect").arg(&dir).output().unwrap();
    assert!(text(&inspect.stdout).contains("services (systemd-analyze security exposure"), "{}", text(&inspect.stdout));

    // The weak unit: the same packages (the locked tree comes from the cache), and the gate
    // stops the build naming the service, its score and what would lower it.
    let t = Instant::now();
    let weak = kiln_in(
        &work,
        &["build", "--profile", "profiles/weak.toml", "--lock", "profiles/svc.pc-uefi.lock", "--out", "out-weak"],
    );
    let err = text(&weak.stderr);
    assert!(!weak.status.success(), "a weak unit must fail the build:\n{}", text(&weak.stdout));
    assert!(err.contains("security gate: services.weak: weak.service has exposure"), "{err}");
    assert!(err.contains("over its budget of 2.0"), "{err}");
    assert!(err.contains("loosened by the profile: "), "{err}");
    assert!(err.contains("these settings would lower it"), "{err}");
    assert!(!work.join("out-weak/weak-pc-uefi").exists(), "a failed build leaves no output");
    let gate: Vec<&str> = err.lines().skip_while(|l| !l.contains("security gate:")).take(8).collect();
    println!("kiln-it: the weak unit failed the build in {:.1}s:\n{}", t.elapsed().as_secs_f64(), gate.join("\n"));

    // Boot: every service active, listeners only on declared ports, the firewall in the way
    // of an undeclared one, and passwords refused.
    let ssh_port = free_port();
    let app_port = free_port();
    let open_port = free_port();
    let ssh = format!(
        "ssh -i {} -p {ssh_port} -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o ConnectTimeout=20 -o LogLevel=ERROR -o BatchMode=yes tester@127.0.0.1",
        key.display()
    );
    let script = format!(
        r#"set -e
{ssh} 'for u in caddy syncthing radicale myapp; do echo "active $u $(systemctl is-active $u)"; done
  echo "home-timers $(systemctl is-enabled kiln-backup.timer kiln-backup-drill.timer kiln-agent.timer | tr "\n" " ")"
  echo "hello from caddy" | sudo install -D -m 0644 /dev/stdin /srv/www/index.html
  python3 -c "import urllib.request as u; print(\"caddy-says\", u.urlopen(\"http://127.0.0.1/\").read().decode().strip())"
  python3 -c "import time, urllib.request as u, urllib.error as e
for _ in range(90):
    try: u.urlopen(u.Request(\"http://127.0.0.1:5232/tester/\", method=\"PROPFIND\")); break
    except e.HTTPError as x: print(\"radicale-says\", x.code); break
    except OSError: time.sleep(1)"
  sudo cat /var/lib/private/myapp/starts | wc -l | sed "s/^/myapp-starts /"
  nohup python3 -m http.server 9999 >/dev/null 2>&1 &
  for _ in $(seq 60); do ss -Htln | grep -q ":9999 " && break; sleep 1; done
  ss -Htln | sed "s/^/tcp-listen /"
  ss -Hluln | sed "s/^/udp-listen /"
  sudo nft list ruleset | grep -c accept | sed "s/^/nft-accept-rules /"'
python3 - <<'EOF'
import socket
for name, port in (("declared", {app_port}), ("undeclared", {open_port})):
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    s.settimeout(8)
    s.sendall(b"GET / HTTP/1.0\r\n\r\n")
    try:
        data = s.recv(100)
    except socket.timeout:
        data = b""
    print("host-" + name, "answered" if data.startswith(b"HTTP/") else "no-answer", data[:40])
EOF
if {ssh} -o PubkeyAuthentication=no -o PreferredAuthentications=password,keyboard-interactive true 2>/dev/null; then echo password-login-accepted; else echo password-login-refused; fi
{ssh} '{WIFI}'
"#
    );
    let t = Instant::now();
    let boot = Command::new(kiln_bin())
        .args(["boot", "--check", "--timeout", "600", "--ssh-port", &ssh_port.to_string()])
        .args(["--forward", &format!("{app_port}:8080"), "--forward", &format!("{open_port}:9999")])
        .arg(dir.join("disk.img"))
        .args(["--", "sh", "-c", &script])
        .output()
        .unwrap();
    let out = text(&boot.stdout);
    assert!(boot.status.success(), "boot check failed:\n{out}\n{}", text(&boot.stderr));
    println!(
        "kiln-it: booted and checked in {:.1}s: {}",
        t.elapsed().as_secs_f64(),
        out.lines().find(|l| l.contains("ready after")).unwrap_or_default()
    );
    for u in ["caddy", "syncthing", "radicale", "myapp"] {
        assert!(out.contains(&format!("active {u} active")), "{u} is not active:\n{out}");
    }
    assert!(out.contains("home-timers enabled enabled enabled"), "home.toml's backups and updates are on:\n{out}");
    assert!(out.contains("caddy-says hello from caddy"), "{out}");
    assert!(out.contains("radicale-says 401"), "radicale must ask for a login:\n{out}");
    assert!(out.contains("myapp-starts 1"), "{out}");
    assert!(out.contains("host-declared answered"), "{out}");
    assert!(out.contains("host-undeclared no-answer"), "the firewall must drop port 9999:\n{out}");
    assert!(out.contains("password-login-refused"), "{out}");
    wifi_checks(&out);

    // Listening sockets: every one on a non-loopback address is a declared port (or 9999,
    // which the test opened itself and the firewall dropped).
    let declared_tcp = [22u16, 80, 443, 5232, 8080, 22000, 9999];
    let declared_udp = [443u16, 21027, 22000, 68, 546];
    let mut seen = Vec::new();
    for (prefix, declared) in [("tcp-listen ", &declared_tcp[..]), ("udp-listen ", &declared_udp[..])] {
        for l in out.lines().filter_map(|l| l.strip_prefix(prefix)) {
            let local = l.split_whitespace().nth(3).unwrap_or_default();
            let (addr, port) = local.rsplit_once(':').unwrap_or_default();
            let port: u16 = port.parse().unwrap_or(0);
            let loopback = addr.starts_with("127.") || addr == "[::1]" || addr.starts_with("[::ffff:127.");
            // UDP sockets in the ephemeral range are clients' (syncthing's discovery and NAT
            // lookups, time sync): bound, not serving; the firewall drops what they did not ask for.
            if prefix == "udp-listen " && port >= 32768 {
                continue;
            }
            if !loopback {
                assert!(declared.contains(&port), "{prefix}{local} is not a declared port:\n{out}");
                seen.push(format!("{}{}", prefix.trim_end().replace("-listen", ""), port));
            }
        }
    }
    seen.sort();
    seen.dedup();
    // The firewall's drop above means something only if the port was open behind it.
    assert!(seen.iter().any(|p| p == "tcp9999"), "the test's server on port 9999 never listened:\n{out}");
    println!(
        "kiln-it: non-loopback listeners: {} (all declared; 9999 opened by the test and dropped by the firewall)",
        seen.join(" ")
    );
}

/// What the Wi-Fi part of the guest script printed.
fn wifi_checks(out: &str) {
    let lines = |p: &str| out.lines().filter(|l| l.starts_with(p)).map(|l| l[p.len()..].trim()).collect::<Vec<_>>();
    let after = lines("wifi-after ");
    assert!(after.first().is_some_and(|a| a.contains("192.168.207.")), "no DHCP lease over Wi-Fi on wlan0:\n{out}");
    let status = lines("wifi-status ").join("\n");
    assert!(status.contains("connected to \"kiln-it net\" (/var/kiln/provision/wifi/home.network)"), "{out}");
    assert_eq!(lines("wifi-ssid "), [r#""ssid": "kiln-it net""#], "kiln-agent status --json names the SSID:\n{out}");
    assert_eq!(lines("wifi-debian-unit "), ["disabled"], "Debian's D-Bus supplicant is not enabled:\n{out}");
    assert!(lines("wifi-health ").iter().any(|l| l.starts_with("KILN-READY")), "health check with Wi-Fi up:\n{out}");
    let journal = lines("wifi-journal ");
    assert!(
        journal.iter().any(|l| l.contains("typo.network line 2: passphrase: expected 8 to 63")),
        "a bad network file is named with its line:\n{out}"
    );
    let refused: Vec<&&str> = journal.iter().filter(|l| l.contains("refused the passphrase")).collect();
    assert_eq!(refused.len(), 1, "a wrong passphrase is one line in the journal:\n{out}");
    assert!(lines("wifi-wrong-status ").iter().any(|l| l.contains("refused the passphrase")), "{out}");
    assert!(
        lines("wifi-wrong-health ").iter().any(|l| l.starts_with("KILN-READY")),
        "a wrong passphrase is not a failed boot:\n{out}"
    );
    // The passphrase is on the data partition and, for the supplicant, in /run: root's alone.
    let modes = lines("wifi-mode ");
    assert_eq!(
        modes,
        ["600 root /run/kiln-wifi/wlan0/wpa_supplicant.conf", "600 root /var/kiln/provision/wifi/home.network"],
        "{out}"
    );
    println!("kiln-it: Wi-Fi: lease after {}", after[0]);
    println!("kiln-it: Wi-Fi: kiln-agent status: {status}");
    println!("kiln-it: Wi-Fi: wrong passphrase: {}", refused[0]);
}
