//! Work that maintainer scripts would do under qemu-user emulation in a foreign-architecture
//! bootstrap, done on the host instead (part of making arm64 builds fast on x86-64).
//!
//! During the bootstrap, an extract hook diverts the slow programs to no-ops and pre-creates
//! placeholder SSH host keys (kiln removes host keys anyway; each device makes its own at first
//! boot). After mmdebstrap, `finish` does their work natively and removes the diversions, so the
//! image's dpkg database and programs are as Debian installed them.

use crate::host::exec::Cmd;
use anyhow::{Context as _, Result};
use std::collections::BTreeMap;
use std::path::Path;

/// Programs diverted to a no-op during a foreign bootstrap: (path, why).
pub const DIVERTED: &[(&str, &str)] =
    &[("/usr/sbin/update-ca-certificates", "one sed and ln per certificate: ~2 minutes under emulation")];

/// The extract hook (shell, run by mmdebstrap with the tree as `$1`, after the first packages
/// are unpacked and before any is configured; locked builds get no essential hook).
pub fn extract_hook() -> String {
    let mut parts = Vec::new();
    for (path, _) in DIVERTED {
        parts.push(format!(
            "chroot \"$1\" dpkg-divert --local --quiet --rename --divert {path}.kiln-native --add {path} && printf '#!/bin/sh\\nexit 0\\n' > \"$1{path}\" && chmod 755 \"$1{path}\""
        ));
    }
    // openssh-server's postinst makes host keys only where none exist (RSA under emulation: ~20 s).
    parts.push(
        "mkdir -p \"$1/etc/ssh\" && for t in rsa ecdsa ed25519; do : > \"$1/etc/ssh/ssh_host_${t}_key\"; done".into(),
    );
    parts.join(" && ")
}

/// After the bootstrap: restore the diverted programs and do their work on the host.
pub fn finish(tree: &Path) -> Result<()> {
    for (path, _) in DIVERTED {
        let stub = tree.join(path.trim_start_matches('/'));
        std::fs::remove_file(&stub).with_context(|| format!("removing the stand-in {}", stub.display()))?;
        Cmd::new("chroot").arg(tree).args(["dpkg-divert", "--local", "--quiet", "--rename", "--remove", path]).run()?;
    }
    for t in ["rsa", "ecdsa", "ed25519"] {
        let key = tree.join(format!("etc/ssh/ssh_host_{t}_key"));
        if std::fs::metadata(&key).map(|m| m.len() == 0).unwrap_or(false) {
            std::fs::remove_file(&key).with_context(|| format!("removing {}", key.display()))?;
        }
    }
    if tree.join("usr/sbin/update-ca-certificates").exists() {
        ca_certificates(tree)?;
    }
    Ok(())
}

/// What `update-ca-certificates` does, on the host: a `.pem` link in /etc/ssl/certs for every
/// certificate enabled in /etc/ca-certificates.conf (and local ones), the bundle
/// `ca-certificates.crt`, and OpenSSL's `<subject hash>.<n>` links. Returns the count.
pub fn ca_certificates(tree: &Path) -> Result<usize> {
    let conf_path = tree.join("etc/ca-certificates.conf");
    let conf = std::fs::read_to_string(&conf_path).with_context(|| format!("reading {}", conf_path.display()))?;
    let mut certs: Vec<String> = conf
        .lines()
        .filter(|l| !l.is_empty() && !l.starts_with('#') && !l.starts_with('!'))
        .map(|l| format!("/usr/share/ca-certificates/{l}"))
        .filter(|c| tree.join(c.trim_start_matches('/')).is_file())
        .collect();
    let local = tree.join("usr/local/share/ca-certificates");
    if let Ok(rd) = std::fs::read_dir(&local) {
        let mut extra: Vec<String> = rd
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".crt"))
            .map(|n| format!("/usr/local/share/ca-certificates/{n}"))
            .collect();
        extra.sort();
        certs.extend(extra);
    }
    let etc = tree.join("etc/ssl/certs");
    std::fs::create_dir_all(&etc).with_context(|| format!("creating {}", etc.display()))?;
    // Start from a clean directory of links, as `update-ca-certificates --fresh` would.
    for e in std::fs::read_dir(&etc).with_context(|| format!("reading {}", etc.display()))? {
        let p = e?.path();
        if p.symlink_metadata().map(|m| m.file_type().is_symlink()).unwrap_or(false) {
            std::fs::remove_file(&p).with_context(|| format!("removing {}", p.display()))?;
        }
    }
    let mut bundle = Vec::new();
    let mut by_hash: BTreeMap<String, Vec<(String, String)>> = BTreeMap::new();
    for cert in &certs {
        let stem = Path::new(cert).file_stem().expect("file name").to_string_lossy();
        let pem: String = stem
            .chars()
            .map(|c| match c {
                ' ' | ',' => '_',
                '(' | ')' => '=',
                c => c,
            })
            .collect::<String>()
            + ".pem";
        // `ln -sf`, as the script does: a file of that name is replaced.
        let _ = std::fs::remove_file(etc.join(&pem));
        std::os::unix::fs::symlink(cert, etc.join(&pem))
            .with_context(|| format!("linking {pem} in {}", etc.display()))?;
        let file = tree.join(cert.trim_start_matches('/'));
        let mut data = std::fs::read(&file).with_context(|| format!("reading {}", file.display()))?;
        if !data.ends_with(b"\n") {
            data.push(b'\n');
        }
        bundle.extend_from_slice(&data);
    }
    // `openssl rehash` hashes every .pem in the directory: the links above and any certificate
    // a package put there as a file (ssl-cert's snakeoil).
    let mut pems: Vec<String> = std::fs::read_dir(&etc)
        .with_context(|| format!("reading {}", etc.display()))?
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".pem"))
        .collect();
    pems.sort();
    for pem in pems {
        let link = etc.join(&pem);
        let file = match std::fs::read_link(&link) {
            Ok(target) if target.is_absolute() => tree.join(target.strip_prefix("/").expect("absolute")),
            Ok(target) => etc.join(target),
            Err(_) => link.clone(),
        };
        let out = Cmd::new("openssl")
            .args(["x509", "-noout", "-hash", "-fingerprint", "-sha256", "-in"])
            .arg(&file)
            .read()?;
        let mut lines = out.lines();
        let hash = lines.next().unwrap_or_default().trim().to_string();
        let fingerprint = lines.next().unwrap_or_default().trim().to_string();
        by_hash.entry(hash).or_default().push((fingerprint, pem));
    }
    let bundle_path = etc.join("ca-certificates.crt");
    std::fs::write(&bundle_path, &bundle).with_context(|| format!("writing {}", bundle_path.display()))?;
    // `openssl rehash` numbering: certificates sharing a subject hash get .0, .1, ... (the same
    // certificate twice only once).
    for (hash, mut entries) in by_hash {
        entries.sort();
        entries.dedup_by(|a, b| a.0 == b.0);
        for (n, (_, pem)) in entries.iter().enumerate() {
            std::os::unix::fs::symlink(pem, etc.join(format!("{hash}.{n}")))
                .with_context(|| format!("linking {hash}.{n}"))?;
        }
    }
    let hooks = tree.join("etc/ca-certificates/update.d");
    if std::fs::read_dir(&hooks).map(|mut d| d.next().is_some()).unwrap_or(false) {
        Cmd::new("chroot").arg(tree).args(["run-parts", "/etc/ca-certificates/update.d"]).run()?;
    }
    Ok(certs.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn links(d: &Path, strip: &str) -> BTreeMap<String, String> {
        std::fs::read_dir(d)
            .unwrap()
            .flatten()
            .filter(|e| e.path().symlink_metadata().unwrap().file_type().is_symlink())
            .map(|e| {
                let target = std::fs::read_link(e.path()).unwrap().to_string_lossy().into_owned();
                (
                    e.file_name().to_string_lossy().into_owned(),
                    target.strip_prefix(strip).unwrap_or(&target).to_string(),
                )
            })
            .collect()
    }

    fn tree_with_host_certs(tree: &Path) {
        assert!(
            Path::new("/usr/share/ca-certificates/mozilla").is_dir(),
            "this test needs the ca-certificates package on the host"
        );
        std::fs::create_dir_all(tree.join("usr/share/ca-certificates")).unwrap();
        std::fs::create_dir_all(tree.join("usr/local/share/ca-certificates")).unwrap();
        std::fs::create_dir_all(tree.join("etc/ssl/certs")).unwrap();
        std::fs::create_dir_all(tree.join("etc/ca-certificates/update.d")).unwrap();
        Cmd::new("cp")
            .args(["-a", "/usr/share/ca-certificates/mozilla"])
            .arg(tree.join("usr/share/ca-certificates/"))
            .run()
            .unwrap();
        // Debian's default: every certificate enabled; one disabled to check '!' lines.
        let mut names: Vec<String> = std::fs::read_dir(tree.join("usr/share/ca-certificates/mozilla"))
            .unwrap()
            .flatten()
            .map(|e| format!("mozilla/{}", e.file_name().to_string_lossy()))
            .collect();
        names.sort();
        names[0] = format!("!{}", names[0]);
        std::fs::write(tree.join("etc/ca-certificates.conf"), names.join("\n") + "\n").unwrap();
    }

    /// Same input, Debian's script (run with its directory options) and ours: the same links
    /// (`<name>.pem` and `<hash>.<n>`) and a byte-identical bundle.
    #[test]
    fn matches_debians_update_ca_certificates() {
        let dir = tempfile::tempdir().unwrap();
        let (ours, theirs) = (dir.path().join("ours"), dir.path().join("theirs"));
        tree_with_host_certs(&ours);
        tree_with_host_certs(&theirs);
        let n = ca_certificates(&ours).unwrap();
        assert!(n > 100, "{n} certificates");
        let t = theirs.to_string_lossy().into_owned();
        Cmd::new("/usr/sbin/update-ca-certificates")
            .arg("--certsconf")
            .arg(format!("{t}/etc/ca-certificates.conf"))
            .arg("--certsdir")
            .arg(format!("{t}/usr/share/ca-certificates"))
            .arg("--localcertsdir")
            .arg(format!("{t}/usr/local/share/ca-certificates"))
            .arg("--etccertsdir")
            .arg(format!("{t}/etc/ssl/certs"))
            .arg("--hooksdir")
            .arg(format!("{t}/etc/ca-certificates/update.d"))
            .run()
            .unwrap();
        let a = links(&ours.join("etc/ssl/certs"), "");
        let b = links(&theirs.join("etc/ssl/certs"), &t);
        let differ: Vec<_> = b
            .iter()
            .filter(|(k, v)| a.get(*k) != Some(v))
            .chain(a.iter().filter(|(k, _)| !b.contains_key(*k)))
            .collect();
        assert!(differ.is_empty(), "links that differ: {differ:?}");
        assert_eq!(a.len(), b.len());
        assert_eq!(a.len(), 2 * n, "a .pem and a hash link per certificate");
        assert_eq!(
            std::fs::read(ours.join("etc/ssl/certs/ca-certificates.crt")).unwrap(),
            std::fs::read(theirs.join("etc/ssl/certs/ca-certificates.crt")).unwrap()
        );
    }
}
