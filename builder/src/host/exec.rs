//! The one place that spawns processes: an argv-vector command with a clean environment.
//!
//! Every external tool kiln runs goes through [`Cmd`]: stdin is /dev/null, the environment is
//! reduced to what the build needs (`LANG=C.UTF-8`, `SOURCE_DATE_EPOCH`, `PATH`), stderr is
//! drained on a thread, and a failure carries the shell-escaped command line, the exit status
//! and the tail of stderr. `--debug` prints `+ cmd` before each run.

use std::ffi::{OsStr, OsString};
use std::fmt;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};

static DEBUG: AtomicBool = AtomicBool::new(false);

/// Adds the system directories an ordinary user's PATH lacks (`/usr/sbin`, `/sbin`: chroot,
/// mkfs.*, veritysetup, newuidmap's peers live there), keeping the user's order. Called once at
/// startup, before any thread: every program kiln runs and every `which` sees the same PATH.
pub fn complete_path() {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let mut dirs: Vec<std::path::PathBuf> = std::env::split_paths(&path).collect();
    for d in ["/usr/local/sbin", "/usr/local/bin", "/usr/sbin", "/usr/bin", "/sbin", "/bin"] {
        if !dirs.iter().any(|x| x == std::path::Path::new(d)) {
            dirs.push(d.into());
        }
    }
    if let Ok(p) = std::env::join_paths(dirs) {
        std::env::set_var("PATH", p);
    }
}

/// Turns on `+ cmd` logging of every spawned command (the CLI's `--debug`).
pub fn set_debug(on: bool) {
    DEBUG.store(on, Ordering::Relaxed);
}

pub fn debug_enabled() -> bool {
    DEBUG.load(Ordering::Relaxed)
}

/// How many lines of stderr a failure keeps.
const STDERR_TAIL_LINES: usize = 30;

#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    #[error("{program} is not installed (needed to run `{cmd}`); run `kiln doctor --install` or install the Debian package {package}")]
    NotFound { program: String, package: String, cmd: String },
    #[error("could not start `{cmd}`: {source}")]
    Spawn { cmd: String, source: std::io::Error },
    #[error("`{cmd}` failed ({status}){}", tail_suffix(.stderr_tail))]
    Failed { cmd: String, status: String, stderr_tail: String },
}

fn tail_suffix(tail: &str) -> String {
    if tail.trim().is_empty() {
        String::new()
    } else {
        format!(":\n{}", tail.trim_end())
    }
}

/// A command to run: program, arguments, working directory and extra environment.
#[derive(Clone)]
pub struct Cmd {
    program: OsString,
    args: Vec<OsString>,
    cwd: Option<PathBuf>,
    env: Vec<(OsString, OsString)>,
}

impl Cmd {
    pub fn new(program: impl AsRef<OsStr>) -> Self {
        Cmd { program: program.as_ref().to_owned(), args: Vec::new(), cwd: None, env: Vec::new() }
    }

    pub fn arg(mut self, arg: impl AsRef<OsStr>) -> Self {
        self.args.push(arg.as_ref().to_owned());
        self
    }

    pub fn args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.args.extend(args.into_iter().map(|a| a.as_ref().to_owned()));
        self
    }

    pub fn cwd(mut self, dir: impl AsRef<Path>) -> Self {
        self.cwd = Some(dir.as_ref().to_owned());
        self
    }

    pub fn env(mut self, key: impl AsRef<OsStr>, val: impl AsRef<OsStr>) -> Self {
        self.env.push((key.as_ref().to_owned(), val.as_ref().to_owned()));
        self
    }

    pub fn program(&self) -> String {
        self.program.to_string_lossy().into_owned()
    }

    fn command(&self) -> Command {
        let mut c = Command::new(&self.program);
        c.args(&self.args);
        c.env_clear();
        let path = std::env::var_os("PATH")
            .unwrap_or_else(|| "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into());
        c.env("PATH", path);
        c.env("LANG", "C.UTF-8");
        c.env("LC_ALL", "C.UTF-8");
        c.env("TZ", "UTC");
        if let Some(home) = std::env::var_os("HOME") {
            c.env("HOME", home);
        }
        if let Some(sde) = std::env::var_os("SOURCE_DATE_EPOCH") {
            c.env("SOURCE_DATE_EPOCH", sde);
        }
        for (k, v) in &self.env {
            c.env(k, v);
        }
        if let Some(dir) = &self.cwd {
            c.current_dir(dir);
        }
        c.stdin(Stdio::null());
        c
    }

    fn log(&self) {
        if debug_enabled() {
            eprintln!("+ {self}");
        }
    }

    fn spawn_error(&self, e: std::io::Error) -> ExecError {
        // execvp reports EACCES when a PATH directory cannot be searched (root's PATH kept by
        // `su`), even if the program is nowhere: that is a missing program too.
        let missing = e.kind() == std::io::ErrorKind::NotFound
            || (e.kind() == std::io::ErrorKind::PermissionDenied
                && !self.program().contains('/')
                && crate::host::tools::which(&self.program()).is_none());
        if missing {
            let program = self.program();
            let package = crate::host::tools::package_for_program(&program).unwrap_or("providing it").to_string();
            ExecError::NotFound { program, package, cmd: self.to_string() }
        } else {
            ExecError::Spawn { cmd: self.to_string(), source: e }
        }
    }

    fn check(&self, status: ExitStatus, stderr: &str) -> Result<(), ExecError> {
        if status.success() {
            return Ok(());
        }
        let lines: Vec<&str> = stderr.lines().collect();
        let start = lines.len().saturating_sub(STDERR_TAIL_LINES);
        Err(ExecError::Failed {
            cmd: self.to_string(),
            status: describe_status(status),
            stderr_tail: lines[start..].join("\n"),
        })
    }

    /// Runs the command; stdout and stderr are captured (stderr is kept for the error).
    /// Returns stdout.
    pub fn output(&self) -> Result<Vec<u8>, ExecError> {
        self.log();
        let mut c = self.command();
        c.stdout(Stdio::piped()).stderr(Stdio::piped());
        let mut child = c.spawn().map_err(|e| self.spawn_error(e))?;
        let mut stderr = child.stderr.take().expect("stderr is piped");
        let drain = std::thread::spawn(move || {
            let mut buf = Vec::new();
            let _ = stderr.read_to_end(&mut buf);
            buf
        });
        let mut out = Vec::new();
        if let Some(mut so) = child.stdout.take() {
            let _ = so.read_to_end(&mut out);
        }
        let status = child.wait().map_err(|e| ExecError::Spawn { cmd: self.to_string(), source: e })?;
        let err = drain.join().unwrap_or_default();
        let err = String::from_utf8_lossy(&err);
        if debug_enabled() && !err.trim().is_empty() {
            for line in err.lines() {
                eprintln!("  | {line}");
            }
        }
        self.check(status, &err)?;
        Ok(out)
    }

    /// Runs the command and returns stdout as text.
    pub fn read(&self) -> Result<String, ExecError> {
        Ok(String::from_utf8_lossy(&self.output()?).into_owned())
    }

    /// Runs the command; both output streams are read line by line and handed to `on_line`
    /// (for progress display), and kept for the error message.
    pub fn run_with_lines(&self, mut on_line: impl FnMut(&str)) -> Result<(), ExecError> {
        self.log();
        let mut c = self.command();
        c.stdout(Stdio::piped()).stderr(Stdio::piped());
        let mut child = c.spawn().map_err(|e| self.spawn_error(e))?;
        let stderr = child.stderr.take().expect("stderr is piped");
        let stdout = child.stdout.take().expect("stdout is piped");
        let (tx, rx) = std::sync::mpsc::channel::<String>();
        let tx2 = tx.clone();
        let t1 = std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let t2 = std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = tx2.send(line);
            }
        });
        let mut tail: std::collections::VecDeque<String> = std::collections::VecDeque::new();
        for line in rx {
            if debug_enabled() {
                eprintln!("  | {line}");
            }
            on_line(&line);
            tail.push_back(line);
            if tail.len() > STDERR_TAIL_LINES {
                tail.pop_front();
            }
        }
        let _ = t1.join();
        let _ = t2.join();
        let status = child.wait().map_err(|e| ExecError::Spawn { cmd: self.to_string(), source: e })?;
        let tail: Vec<String> = tail.into_iter().collect();
        self.check(status, &tail.join("\n"))
    }

    /// Runs the command, discarding stdout.
    pub fn run(&self) -> Result<(), ExecError> {
        self.output().map(|_| ())
    }

    /// Spawns the command with stdout piped and stderr inherited, for long-running children
    /// (QEMU) whose output the caller streams itself.
    pub fn spawn_piped(&self, interactive: bool) -> Result<std::process::Child, ExecError> {
        self.log();
        let mut c = self.command();
        if interactive {
            c.stdin(Stdio::inherit()).stdout(Stdio::inherit()).stderr(Stdio::inherit());
        } else {
            c.stdout(Stdio::piped()).stderr(Stdio::piped());
        }
        c.spawn().map_err(|e| self.spawn_error(e))
    }
}

pub fn describe_status(status: ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exit status {code}"),
        (None, Some(sig)) => format!("killed by signal {sig}"),
        _ => "unknown status".into(),
    }
}

/// Quotes one word for a POSIX shell, only when needed.
pub fn shell_quote(word: &str) -> String {
    let safe = !word.is_empty() && word.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_./=:,+@%^".contains(&b));
    if safe {
        word.to_string()
    } else {
        format!("'{}'", word.replace('\'', "'\\''"))
    }
}

impl fmt::Display for Cmd {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(dir) = &self.cwd {
            write!(f, "(cd {} && ", shell_quote(&dir.to_string_lossy()))?;
        }
        for (k, v) in &self.env {
            write!(f, "{}={} ", k.to_string_lossy(), shell_quote(&v.to_string_lossy()))?;
        }
        write!(f, "{}", shell_quote(&self.program.to_string_lossy()))?;
        for a in &self.args {
            write!(f, " {}", shell_quote(&a.to_string_lossy()))?;
        }
        if self.cwd.is_some() {
            write!(f, ")")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_quotes_only_what_needs_it() {
        let c = Cmd::new("mkfs.erofs").arg("-zlz4hc").arg("/tmp/a b").arg("it's");
        assert_eq!(c.to_string(), "mkfs.erofs -zlz4hc '/tmp/a b' 'it'\\''s'");
    }

    #[test]
    fn failure_carries_command_status_and_stderr() {
        let err = Cmd::new("sh").args(["-c", "echo boom >&2; exit 3"]).run().unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("`sh -c 'echo boom >&2; exit 3'` failed (exit status 3)"), "{msg}");
        assert!(msg.ends_with("boom"), "{msg}");
    }

    #[test]
    fn missing_program_says_how_to_install() {
        let err = Cmd::new("mkfs.erofs-does-not-exist").run().unwrap_err();
        assert!(matches!(err, ExecError::NotFound { .. }), "{err}");
    }

    #[test]
    fn environment_is_clean() {
        std::env::set_var("KILN_TEST_LEAK", "1");
        let out = Cmd::new("env").read().unwrap();
        assert!(!out.contains("KILN_TEST_LEAK"));
        assert!(out.contains("LANG=C.UTF-8"));
    }
}
