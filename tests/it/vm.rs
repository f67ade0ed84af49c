//! A QEMU guest for tests that talk to it: its serial console read line by line, services on
//! the host's loopback relayed into its restricted user-mode network.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Child;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Copies one guest connection (stdin/stdout, from QEMU's guestfwd `cmd:`) to 127.0.0.1:PORT.
const RELAY: &str = r#"import os, socket, sys, threading
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
def up():
    while True:
        d = os.read(0, 65536)
        if not d:
            s.shutdown(socket.SHUT_WR)
            return
        s.sendall(d)
threading.Thread(target=up, daemon=True).start()
while True:
    d = s.recv(65536)
    if not d:
        break
    os.write(1, d)
"#;

/// A QEMU guest whose serial console the test reads line by line. The guest's `reboot` ends
/// QEMU (`-no-reboot`): the test starts it again on the same disk, as a power cycle would.
pub struct Vm {
    pub child: Child,
    pub lines: Arc<Mutex<Vec<String>>>,
    /// What the console printed after its last newline (a boot menu draws without newlines).
    partial: Arc<Mutex<String>>,
    done: Arc<Mutex<bool>>,
    cursor: usize,
    /// QEMU's human monitor, for `info registers` when a guest goes silent.
    monitor: PathBuf,
}

impl Vm {
    /// Boots `disk` (changes persist) with the guest's `http://10.0.2.100:80` relayed to
    /// 127.0.0.1:`port` on the host.
    pub fn start(disk: &Path, qemu: &kiln::config::image::Qemu, port: u16, log: &Path, scratch: &Path) -> Vm {
        Vm::start_with(disk, qemu, &[("10.0.2.100:80", port)], None, log, scratch)
    }

    /// Boots `disk` (changes persist): each (guest address, host port) of `relays` reaches
    /// 127.0.0.1:port on the host; `ssh_port` forwards 127.0.0.1:ssh_port to the guest's SSH.
    pub fn start_with(
        disk: &Path,
        qemu: &kiln::config::image::Qemu,
        relays: &[(&str, u16)],
        ssh_port: Option<u16>,
        log: &Path,
        scratch: &Path,
    ) -> Vm {
        Vm::launch(disk, qemu, relays, ssh_port, false, log, scratch)
    }

    /// Boots a Raspberry Pi card (changes persist) the way its firmware would after the last
    /// reset: `tryboot` starts autoboot.txt's `[tryboot]` slot (falling back to `[all]` when
    /// that slot is not bootable), otherwise the `[all]` slot. See [`Vm::reset`].
    pub fn start_rpi(
        disk: &Path,
        qemu: &kiln::config::image::Qemu,
        relays: &[(&str, u16)],
        tryboot: bool,
        log: &Path,
        scratch: &Path,
    ) -> Vm {
        Vm::launch(disk, qemu, relays, None, tryboot, log, scratch)
    }

    /// How this run ended (QEMU has exited): what a Pi's firmware knows at the next start.
    /// `None` (a reset without a word, a watchdog) boots the `[all]` slot like a plain reboot.
    pub fn reset(&self) -> Option<kiln::boot::rpi::Reset> {
        kiln::boot::rpi::reset_of(&self.lines.lock().unwrap())
    }

    fn launch(
        disk: &Path,
        qemu: &kiln::config::image::Qemu,
        relays: &[(&str, u16)],
        ssh_port: Option<u16>,
        tryboot: bool,
        log: &Path,
        scratch: &Path,
    ) -> Vm {
        std::fs::create_dir_all(scratch).unwrap();
        let relay = scratch.join("relay.py");
        std::fs::write(&relay, RELAY).unwrap();
        let opts = kiln::boot::qemu::BootOptions {
            disk: disk.into(),
            qemu: qemu.clone(),
            accel: kiln::boot::qemu::Accel::Tcg,
            persist: true,
            ssh_port,
            // A `tcp:` chardev would be one connection made at QEMU's start; `cmd:` runs the
            // relay once per guest connection.
            net_rules: relays
                .iter()
                .map(|(guest, port)| format!("guestfwd=tcp:{guest}-cmd:python3 {} {port}", relay.display()))
                .collect(),
            log: None,
            tryboot,
            smp: None,
        };
        let monitor = scratch.join("monitor.sock");
        let _ = std::fs::remove_file(&monitor);
        let cmd = kiln::boot::qemu::command(&opts, kiln::boot::qemu::Accel::Tcg, scratch, false).unwrap().args([
            "-chardev".to_string(),
            format!("socket,id=kilnmon,path={},server=on,wait=off", monitor.display()),
            "-mon".to_string(),
            "chardev=kilnmon,mode=readline".to_string(),
        ]);
        let mut child = cmd.spawn_piped(false).unwrap();
        let mut stdout = child.stdout.take().unwrap();
        let lines = Arc::new(Mutex::new(Vec::new()));
        let partial = Arc::new(Mutex::new(String::new()));
        let done = Arc::new(Mutex::new(false));
        let (l, p, d) = (lines.clone(), partial.clone(), done.clone());
        let mut logf = std::fs::OpenOptions::new().create(true).append(true).open(log).unwrap();
        writeln!(logf, "==== qemu started{}", if tryboot { " (tryboot)" } else { "" }).unwrap();
        std::thread::spawn(move || {
            let mut pending = Vec::new();
            let mut chunk = [0u8; 4096];
            while let Ok(n @ 1..) = stdout.read(&mut chunk) {
                pending.extend_from_slice(&chunk[..n]);
                while let Some(i) = pending.iter().position(|b| *b == b'\n') {
                    let line = String::from_utf8_lossy(&pending[..i]).trim_end().replace('\r', "");
                    pending.drain(..=i);
                    let _ = writeln!(logf, "{line}");
                    l.lock().unwrap().push(line);
                }
                *p.lock().unwrap() = String::from_utf8_lossy(&pending).into_owned();
            }
            if !pending.is_empty() {
                let _ = writeln!(logf, "{}", String::from_utf8_lossy(&pending));
            }
            *d.lock().unwrap() = true;
        });
        Vm { child, lines, partial, done, cursor: 0, monitor }
    }

    pub fn tail(&self) -> String {
        let l = self.lines.lock().unwrap();
        let mut t = l[l.len().saturating_sub(40)..].join("\n");
        let p = self.partial.lock().unwrap();
        if !p.is_empty() {
            t.push_str(&format!("\n[after the last newline, {} bytes:] {}", p.len(), printable(&p, 2000)));
        }
        t
    }

    /// Where the guest's CPU is (`info registers` on QEMU's monitor): firmware or kernel.
    pub fn registers(&self) -> String {
        use std::os::unix::net::UnixStream;
        let Ok(mut s) = UnixStream::connect(&self.monitor) else {
            return format!("(no monitor at {})", self.monitor.display());
        };
        let _ = s.set_read_timeout(Some(Duration::from_secs(3)));
        let _ = s.write_all(b"info registers\n");
        let mut out = Vec::new();
        let mut buf = [0u8; 8192];
        while let Ok(n @ 1..) = s.read(&mut buf) {
            out.extend_from_slice(&buf[..n]);
            if out.windows(3).any(|w| w == b"EFL") && out.ends_with(b"(qemu) ") {
                break;
            }
        }
        let text = String::from_utf8_lossy(&out);
        text.lines()
            .filter(|l| l.contains("RIP=") || l.contains("CR0=") || l.contains("CS ="))
            .collect::<Vec<_>>()
            .join(" | ")
    }

    /// Waits until the guest has left the firmware and the boot loader: a complete console line
    /// after OVMF's `BdsDxe: starting` (profiles boot with `quiet`, so the kernel's own first line
    /// may never show; the next one is the initramfs's or systemd's). `Err` carries what a silent
    /// guest showed: the console after its last newline and where the CPU is. A guest that ends
    /// meanwhile is left to the next `wait_for`, which reports it with the console.
    pub fn wait_for_os(&mut self, timeout: Duration) -> Result<(), String> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if past_loader(&self.lines.lock().unwrap()[self.cursor..]) || *self.done.lock().unwrap() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        Err(format!(
            "no line after the loader within {}s; cpu: {}; console tail:\n{}",
            timeout.as_secs(),
            self.registers(),
            self.tail()
        ))
    }

    /// The next console line (after the last one matched) containing one of `what`.
    pub fn wait_for(&mut self, what: &[&str], timeout: Duration) -> String {
        match self.wait_within(what, timeout) {
            Some(line) => line,
            None => panic!("no {what:?} within {}s; console tail:\n{}", timeout.as_secs(), self.tail()),
        }
    }

    /// Like [`Vm::wait_for`], but `None` when `timeout` passes without such a line (a guest that
    /// ends meanwhile still panics: the console then says why).
    pub fn wait_within(&mut self, what: &[&str], timeout: Duration) -> Option<String> {
        let deadline = Instant::now() + timeout;
        loop {
            // Read before the lines: a line that came with the console's end is seen first.
            let ended = *self.done.lock().unwrap();
            {
                let l = self.lines.lock().unwrap();
                while self.cursor < l.len() {
                    let line = &l[self.cursor];
                    self.cursor += 1;
                    if what.iter().any(|w| line.contains(w)) {
                        return Some(line.clone());
                    }
                }
            }
            if ended {
                panic!("QEMU ended while waiting for {what:?}; console tail:\n{}", self.tail());
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Waits for the guest's reboot (QEMU exits with -no-reboot).
    pub fn wait_exit(&mut self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if self.child.try_wait().unwrap().is_some() {
                // Its last lines (the reboot's command for `reset`) may still be on their way
                // from the console's reader.
                let read = Instant::now() + Duration::from_secs(10);
                while !*self.done.lock().unwrap() && Instant::now() < read {
                    std::thread::sleep(Duration::from_millis(50));
                }
                return;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        panic!("the guest did not reboot within {}s; console tail:\n{}", timeout.as_secs(), self.tail());
    }

    /// Pulls the plug.
    pub fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `s` with control bytes shown as escapes, at most `max` characters from its end.
fn printable(s: &str, max: usize) -> String {
    let out: String =
        s.chars().flat_map(|c| if c.is_control() { c.escape_default().collect::<Vec<_>>() } else { vec![c] }).collect();
    let skip = out.chars().count().saturating_sub(max);
    out.chars().skip(skip).collect()
}

/// Whether `lines` (one boot's console) show anything after OVMF handed over to the loader.
fn past_loader(lines: &[String]) -> bool {
    match lines.iter().rposition(|l| l.contains("BdsDxe: starting")) {
        Some(i) => lines[i + 1..].iter().any(|l| !l.trim().is_empty()),
        None => lines.iter().any(|l| l.contains("Welcome to") || l.contains("kiln-agent:")),
    }
}

#[test]
fn past_loader_needs_a_line_after_the_firmware() {
    let l = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    assert!(!past_loader(&l(&["BdsDxe: loading Boot0001", "BdsDxe: starting Boot0001 \"UEFI Misc Device\""])));
    assert!(!past_loader(&l(&["BdsDxe: starting Boot0001", "  "])));
    assert!(past_loader(&l(&["BdsDxe: starting Boot0001", "Welcome to Debian GNU/Linux 13 (trixie)!"])));
    assert!(!past_loader(&l(&[])));
}
