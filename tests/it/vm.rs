//! A QEMU guest for tests that talk to it: its serial console read line by line, services on
//! the host's loopback relayed into its restricted user-mode network.

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
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
    done: Arc<Mutex<bool>>,
    cursor: usize,
}

impl Vm {
    /// Boots `disk` (changes persist) with the guest's `http://10.0.2.100:80` relayed to
    /// 127.0.0.1:`port` on the host.
    pub fn start(disk: &Path, qemu: &kiln::image::Qemu, port: u16, log: &Path, scratch: &Path) -> Vm {
        Vm::start_with(disk, qemu, &[("10.0.2.100:80", port)], None, log, scratch)
    }

    /// Boots `disk` (changes persist): each (guest address, host port) of `relays` reaches
    /// 127.0.0.1:port on the host; `ssh_port` forwards 127.0.0.1:ssh_port to the guest's SSH.
    pub fn start_with(
        disk: &Path,
        qemu: &kiln::image::Qemu,
        relays: &[(&str, u16)],
        ssh_port: Option<u16>,
        log: &Path,
        scratch: &Path,
    ) -> Vm {
        std::fs::create_dir_all(scratch).unwrap();
        let relay = scratch.join("relay.py");
        std::fs::write(&relay, RELAY).unwrap();
        let opts = kiln::qemu::BootOptions {
            disk: disk.into(),
            qemu: qemu.clone(),
            accel: kiln::qemu::Accel::Tcg,
            persist: true,
            ssh_port,
            // A `tcp:` chardev would be one connection made at QEMU's start; `cmd:` runs the
            // relay once per guest connection.
            net_rules: relays
                .iter()
                .map(|(guest, port)| format!("guestfwd=tcp:{guest}-cmd:python3 {} {port}", relay.display()))
                .collect(),
            log: None,
            tryboot: false,
        };
        let cmd = kiln::qemu::command(&opts, kiln::qemu::Accel::Tcg, scratch, false).unwrap();
        let mut child = cmd.spawn_piped(false).unwrap();
        let stdout = child.stdout.take().unwrap();
        let lines = Arc::new(Mutex::new(Vec::new()));
        let done = Arc::new(Mutex::new(false));
        let (l, d) = (lines.clone(), done.clone());
        let mut logf = std::fs::OpenOptions::new().create(true).append(true).open(log).unwrap();
        writeln!(logf, "==== qemu started").unwrap();
        std::thread::spawn(move || {
            let mut r = BufReader::new(stdout);
            let mut buf = Vec::new();
            while r.read_until(b'\n', &mut buf).map(|n| n > 0).unwrap_or(false) {
                let line = String::from_utf8_lossy(&buf).trim_end().replace('\r', "");
                let _ = writeln!(logf, "{line}");
                l.lock().unwrap().push(line);
                buf.clear();
            }
            *d.lock().unwrap() = true;
        });
        Vm { child, lines, done, cursor: 0 }
    }

    pub fn tail(&self) -> String {
        let l = self.lines.lock().unwrap();
        l[l.len().saturating_sub(40)..].join("\n")
    }

    /// The next console line (after the last one matched) containing one of `what`.
    pub fn wait_for(&mut self, what: &[&str], timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            {
                let l = self.lines.lock().unwrap();
                while self.cursor < l.len() {
                    let line = &l[self.cursor];
                    self.cursor += 1;
                    if what.iter().any(|w| line.contains(w)) {
                        return line.clone();
                    }
                }
            }
            if *self.done.lock().unwrap() {
                panic!("QEMU ended while waiting for {what:?}; console tail:\n{}", self.tail());
            }
            if Instant::now() > deadline {
                panic!("no {what:?} within {}s; console tail:\n{}", timeout.as_secs(), self.tail());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Waits for the guest's reboot (QEMU exits with -no-reboot).
    pub fn wait_exit(&mut self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if self.child.try_wait().unwrap().is_some() {
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
