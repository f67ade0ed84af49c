//! The Wi-Fi networks a device is provisioned with (`kiln flash --provision DIR`): one file per
//! network, `DIR/wifi/<name>.network`, checked by `kiln flash` before anything is written and
//! read by the device at boot, which renders them into wpa_supplicant's configuration under
//! `/run` (the passphrases live on the data partition only, never in the image).
//!
//! ```text
//! # DIR/wifi/home.network
//! ssid=Home Network
//! passphrase=correct horse battery staple   # WPA2/WPA3 (transition mode); or:
//! # sae_password=...                          WPA3 only; or:
//! # open=true                                 no encryption
//! hidden=false                                # probe for it by name (default false)
//! priority=10                                 # higher is preferred (default 0)
//! ```
//!
//! Lines are `key=value`; `#` starts a comment line; blank lines are ignored. A value is taken
//! as written after the `=` (an SSID may have spaces); no control characters anywhere.

use std::collections::BTreeMap;

/// One provisioned network.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WifiNetwork {
    /// The file's name without `.network` (for messages).
    pub name: String,
    /// 1 to 32 bytes, as the access point announces it.
    pub ssid: String,
    pub security: Security,
    pub hidden: bool,
    pub priority: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Security {
    /// No encryption.
    Open,
    /// WPA2-Personal, and WPA3-Personal (SAE) with the same passphrase where the access point
    /// offers it: 8 to 63 printable ASCII characters.
    Passphrase(String),
    /// WPA3-Personal only (SAE, protected management frames required).
    Sae(String),
}

/// The file name suffix of a network file.
pub const SUFFIX: &str = ".network";
/// The highest `priority`.
pub const MAX_PRIORITY: u32 = 1000;

/// Parses one network file; an error is (line, message), line 0 for the file as a whole.
pub fn parse_network(name: &str, text: &str) -> Result<WifiNetwork, (usize, String)> {
    let mut seen: BTreeMap<String, (usize, String)> = BTreeMap::new();
    for (i, raw) in text.lines().enumerate() {
        let n = i + 1;
        if let Some(c) = raw.chars().find(|c| c.is_control() && *c != '\t') {
            return Err((n, format!("holds the control character U+{:04X}", c as u32)));
        }
        let line = raw.trim_start();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let Some((key, value)) = line.split_once('=') else {
            return Err((n, "expected key=value (ssid, passphrase, sae_password, open, hidden, priority)".into()));
        };
        let key = key.trim();
        if !["ssid", "passphrase", "sae_password", "open", "hidden", "priority"].contains(&key) {
            return Err((
                n,
                format!("unknown key {key:?} (known: ssid, passphrase, sae_password, open, hidden, priority)"),
            ));
        }
        if let Some((first, _)) = seen.get(key) {
            return Err((n, format!("{key} is given twice (first on line {first})")));
        }
        seen.insert(key.to_string(), (n, value.to_string()));
    }
    let get = |k: &str| seen.get(k).cloned();
    let flag = |k: &str| -> Result<bool, (usize, String)> {
        match get(k) {
            None => Ok(false),
            Some((n, v)) => match v.trim() {
                "true" => Ok(true),
                "false" => Ok(false),
                other => Err((n, format!("{k}: expected true or false, found {other:?}"))),
            },
        }
    };
    let Some((ssid_line, ssid)) = get("ssid") else {
        return Err((0, "no ssid= line: the network's name, as the access point announces it".into()));
    };
    if ssid.is_empty() || ssid.len() > 32 {
        return Err((ssid_line, format!("ssid: expected 1 to 32 bytes, found {}", ssid.len())));
    }
    let open = flag("open")?;
    let security = match (get("passphrase"), get("sae_password"), open) {
        (Some((n, p)), None, false) => {
            if !(8..=63).contains(&p.len()) || !p.chars().all(|c| (' '..='~').contains(&c)) {
                return Err((
                    n,
                    format!(
                        "passphrase: expected 8 to 63 printable ASCII characters (WPA), found {} characters{}",
                        p.chars().count(),
                        if p.is_ascii() { "" } else { " with non-ASCII ones" }
                    ),
                ));
            }
            Security::Passphrase(p)
        }
        (None, Some((n, p)), false) => {
            if p.is_empty() || p.len() > 128 {
                return Err((n, format!("sae_password: expected 1 to 128 bytes, found {}", p.len())));
            }
            Security::Sae(p)
        }
        (None, None, true) => Security::Open,
        (None, None, false) => {
            return Err((0, "no passphrase=, sae_password= or open=true: how the network is secured".into()));
        }
        (p, s, _) => {
            let n = [p.map(|x| x.0), s.map(|x| x.0)].into_iter().flatten().max().unwrap_or(0);
            return Err((n, "give one of passphrase=, sae_password= and open=true".into()));
        }
    };
    let priority = match get("priority") {
        None => 0,
        Some((n, v)) => match v.trim().parse::<u32>() {
            Ok(p) if p <= MAX_PRIORITY => p,
            _ => {
                return Err((
                    n,
                    format!("priority: expected a whole number from 0 to {MAX_PRIORITY}, found {:?}", v.trim()),
                ))
            }
        },
    };
    Ok(WifiNetwork { name: name.to_string(), ssid, security, hidden: flag("hidden")?, priority })
}

/// A regulatory country code: two capital letters (ISO 3166-1), or "00" (world).
pub fn valid_country(c: &str) -> bool {
    c == "00" || (c.len() == 2 && c.chars().all(|c| c.is_ascii_uppercase()))
}

/// wpa_supplicant's configuration for `networks` in `country`, its control sockets in
/// `ctrl_dir`. SSIDs are written in hex and secrets as quoted strings (wpa_supplicant takes
/// everything up to the last quote on the line, and no line break can be in one), so no value
/// can end its field early. wpa_supplicant numbers the networks from 0 in this order.
pub fn supplicant_conf(country: &str, ctrl_dir: &str, networks: &[WifiNetwork]) -> String {
    let mut out = String::from(
        "# Written by kiln-agent from /var/kiln/provision/wifi/*.network when the interface appeared; not kept.\n",
    );
    out.push_str(&format!("ctrl_interface=DIR={ctrl_dir}\nupdate_config=0\ncountry={country}\n"));
    for n in networks {
        let hex: String = n.ssid.bytes().map(|b| format!("{b:02x}")).collect();
        out.push_str(&format!("\n# {}\nnetwork={{\n\tssid={hex}\n", n.name));
        if n.hidden {
            out.push_str("\tscan_ssid=1\n");
        }
        match &n.security {
            Security::Open => out.push_str("\tkey_mgmt=NONE\n"),
            Security::Passphrase(p) => {
                out.push_str(&format!("\tkey_mgmt=WPA-PSK WPA-PSK-SHA256 SAE\n\tpsk=\"{p}\"\n\tieee80211w=1\n"))
            }
            Security::Sae(p) => out.push_str(&format!("\tkey_mgmt=SAE\n\tsae_password=\"{p}\"\n\tieee80211w=2\n")),
        }
        out.push_str(&format!("\tpriority={}\n}}\n", n.priority));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn networks_parse_and_render() {
        let n = parse_network(
            "home",
            "# my network\nssid=Home Net \"5G\"\npassphrase=correct horse \"battery\"\nhidden=true\npriority=10\n",
        )
        .unwrap();
        assert_eq!(n.ssid, "Home Net \"5G\"");
        assert_eq!(n.security, Security::Passphrase("correct horse \"battery\"".into()));
        assert!(n.hidden);
        assert_eq!(n.priority, 10);
        let sae = parse_network("wpa3", "ssid=x\nsae_password=a long one\n").unwrap();
        let open = parse_network("cafe", "ssid=Cafe\nopen=true\n").unwrap();
        let conf = supplicant_conf("DE", "/run/kiln-wifi/wlan0/ctrl", &[n, sae, open]);
        assert!(conf.contains("ctrl_interface=DIR=/run/kiln-wifi/wlan0/ctrl\nupdate_config=0\ncountry=DE\n"), "{conf}");
        assert!(conf.contains("country=DE\n"), "{conf}");
        assert!(conf.contains("\tssid=486f6d65204e65742022354722\n\tscan_ssid=1\n\tkey_mgmt=WPA-PSK WPA-PSK-SHA256 SAE\n\tpsk=\"correct horse \"battery\"\"\n\tieee80211w=1\n\tpriority=10\n"), "{conf}");
        assert!(
            conf.contains("\tssid=78\n\tkey_mgmt=SAE\n\tsae_password=\"a long one\"\n\tieee80211w=2\n\tpriority=0\n"),
            "{conf}"
        );
        assert!(conf.contains("\tssid=43616665\n\tkey_mgmt=NONE\n"), "{conf}");
    }

    #[test]
    fn mistakes_name_the_line() {
        let e = |t: &str| parse_network("n", t).unwrap_err();
        assert_eq!(
            e("ssid=a\npassphrase=short\n"),
            (2, "passphrase: expected 8 to 63 printable ASCII characters (WPA), found 5 characters".into())
        );
        assert_eq!(e("ssid=a\npasphrase=12345678\n").0, 2);
        assert!(e("ssid=a\npasphrase=12345678\n").1.starts_with("unknown key \"pasphrase\""));
        assert_eq!(e("ssid=a\nssid=b\nopen=true\n"), (2, "ssid is given twice (first on line 1)".into()));
        assert_eq!(e("passphrase=12345678\n").0, 0);
        assert_eq!(e("ssid=a\n").1, "no passphrase=, sae_password= or open=true: how the network is secured");
        assert_eq!(
            e("ssid=a\npassphrase=12345678\nopen=true\n"),
            (2, "give one of passphrase=, sae_password= and open=true".into())
        );
        assert_eq!(e("ssid=a\nopen=yes\n"), (2, "open: expected true or false, found \"yes\"".into()));
        assert_eq!(e("ssid=a\nopen=true\npriority=5000\n").0, 3);
        assert_eq!(
            e(&format!("ssid={}\nopen=true\n", "x".repeat(33))),
            (1, "ssid: expected 1 to 32 bytes, found 33".into())
        );
        assert_eq!(e("ssid=a\rpassphrase=x\n").1, "holds the control character U+000D");
        assert_eq!(e("just words\n").0, 1);
        assert!(valid_country("DE") && valid_country("00") && !valid_country("de") && !valid_country("DEU"));
    }
}
