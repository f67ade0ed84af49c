//! The one place the agent spawns processes: an argv-vector command (no shell) with a clean
//! environment, the same contract as the builder's `exec`.
//!
//! Every program the agent runs (mount, umount, systemctl, restic) goes through [`Cmd`]: stdin
//! is /dev/null, the environment is `PATH` ([`PATH`]) and `LANG=C.UTF-8` plus what the caller
//! adds with [`Cmd::env`] (restic's credentials from backup/env), stderr is drained while the
//! program runs and its tail kept, and a failure carries the shell-escaped command line, the
//! exit status and that tail. A program that is not there says so.
//!
//! The command line shown in errors leaves the added variables out: they hold credentials
//! (RESTIC_REST_PASSWORD, AWS_SECRET_ACCESS_KEY, ...), and errors end up in the journal and in
//! the status records.

use std::collections::VecDeque;
use std::ffi::{OsStr, OsString};
use std::fmt;
use std::io::{BufRead, BufReader, Read};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The search path every spawned program gets.
pub const PATH: &str = "/usr/sbin:/usr/bin:/sbin:/bin";

/// How many lines of stderr a failure (and [`Finished::stderr`]) keeps.
const STDERR_TAIL_LINES: usize = 40;

/// How long a stopped program gets between SIGTERM and SIGKILL.
const KILL_AFTER: Duration = Duration::from_secs(20);

#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    #[error("{program} is not installed in this image (needed to run `{cmd}`)")]
    NotFound { program: String, cmd: String },
    #[error("could not run `{cmd}`: {source}")]
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

/// How a watched program ended ([`Cmd::watch`]); the caller judges it.
#[derive(Debug)]
pub struct Finished {
    pub success: bool,
    /// The exit code (None: killed by a signal).
    pub code: Option<i32>,
    /// The stdout lines `keep` accepted.
    pub stdout: Vec<String>,
    /// The last lines of stderr.
    pub stderr: Vec<String>,
    /// Why `judge` (or the time limit) stopped it.
    pub stopped: Option<String>,
}

/// A program to run: its arguments and the variables added to the clean environment.
#[derive(Clone)]
pub struct Cmd {
    program: OsString,
    args: Vec<OsString>,
    env: Vec<(OsString, OsString)>,
}

impl Cmd {
    pub fn new(program: impl AsRef<OsStr>) -> Self {
        Cmd { program: program.as_ref().to_owned(), args: Vec::new(), env: Vec::new() }
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

    /// Adds a variable to the program's (otherwise clean) environment.
    pub fn env(mut self, key: impl AsRef<OsStr>, val: impl AsRef<OsStr>) -> Self {
        self.env.push((key.as_ref().to_owned(), val.as_ref().to_owned()));
        self
    }

    fn command(&self) -> Command {
        let mut c = Command::new(&self.program);
        c.args(&self.args);
        c.env_clear();
        c.env("PATH", PATH);
        c.env("LANG", "C.UTF-8");
        for (k, v) in &self.env {
            c.env(k, v);
        }
        c.stdin(Stdio::null());
        c
    }

    fn spawn(&self, mut c: Command) -> Result<Child, ExecError> {
        c.spawn().map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                ExecError::NotFound { program: self.program.to_string_lossy().into_owned(), cmd: self.to_string() }
            } else {
                ExecError::Spawn { cmd: self.to_string(), source: e }
            }
        })
    }

    fn wait(&self, child: &mut Child) -> Result<ExitStatus, ExecError> {
        child.wait().map_err(|e| ExecError::Spawn { cmd: self.to_string(), source: e })
    }

    /// Runs the program to completion and returns its stdout; stderr is kept for the error.
    pub fn output(&self) -> Result<Vec<u8>, ExecError> {
        let mut c = self.command();
        c.stdout(Stdio::piped()).stderr(Stdio::piped());
        let mut child = self.spawn(c)?;
        let stderr = child.stderr.take().expect("stderr is piped");
        let drain = std::thread::spawn(move || {
            let mut tail = VecDeque::new();
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                push_tail(&mut tail, line);
            }
            Vec::from(tail)
        });
        let mut out = Vec::new();
        if let Some(mut stdout) = child.stdout.take() {
            let _ = stdout.read_to_end(&mut out);
        }
        let status = self.wait(&mut child)?;
        let tail = drain.join().unwrap_or_default();
        if !status.success() {
            return Err(ExecError::Failed {
                cmd: self.to_string(),
                status: describe_status(status),
                stderr_tail: tail.join("\n"),
            });
        }
        Ok(out)
    }

    /// Starts the program in the background with this process's stdout and stderr (the
    /// journal, for a service): for a daemon the caller supervises.
    pub fn start(&self) -> Result<Child, ExecError> {
        let mut c = self.command();
        c.stdout(Stdio::inherit()).stderr(Stdio::inherit());
        self.spawn(c)
    }

    /// Runs the program to completion, discarding stdout.
    pub fn run(&self) -> Result<(), ExecError> {
        self.output().map(|_| ())
    }

    /// Runs the program reading both outputs line by line: stdout lines that `keep` accepts
    /// are returned, every stderr line goes to `judge`, which may stop the program (SIGTERM,
    /// then SIGKILL after 20 s) by returning a reason. `limit` stops it the same way. Only a
    /// program that could not be started is an error; how it ended is for the caller to judge.
    pub fn watch(
        &self,
        limit: Duration,
        keep: fn(&str) -> bool,
        mut judge: impl FnMut(&str) -> Option<String>,
    ) -> Result<Finished, ExecError> {
        let mut c = self.command();
        c.stdout(Stdio::piped()).stderr(Stdio::piped());
        let mut child = self.spawn(c)?;
        let pid = nix::unistd::Pid::from_raw(child.id() as i32);
        let stdout = child.stdout.take().expect("stdout is piped");
        let stderr = child.stderr.take().expect("stderr is piped");
        let out_thread = std::thread::spawn(move || {
            BufReader::new(stdout).lines().map_while(Result::ok).filter(|l| keep(l)).collect::<Vec<_>>()
        });
        let done = Arc::new(Mutex::new(false));
        let stopped: Arc<Mutex<Option<String>>> = Arc::new(Mutex::new(None));
        let stop = move |reason: String, stopped: &Arc<Mutex<Option<String>>>| {
            let mut s = stopped.lock().unwrap();
            if s.is_none() {
                *s = Some(reason);
                let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
                std::thread::spawn(move || {
                    std::thread::sleep(KILL_AFTER);
                    let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
                });
            }
        };
        {
            let (done, stopped) = (done.clone(), stopped.clone());
            std::thread::spawn(move || {
                let start = Instant::now();
                while start.elapsed() < limit {
                    std::thread::sleep(Duration::from_millis(500));
                    if *done.lock().unwrap() {
                        return;
                    }
                }
                stop(format!("still running after {}s", limit.as_secs()), &stopped);
            });
        }
        let mut tail = VecDeque::new();
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if let Some(reason) = judge(&line) {
                stop(reason, &stopped);
            }
            push_tail(&mut tail, line);
        }
        let status = self.wait(&mut child)?;
        *done.lock().unwrap() = true;
        let stdout = out_thread.join().unwrap_or_default();
        let stopped = stopped.lock().unwrap().clone();
        Ok(Finished {
            success: status.success() && stopped.is_none(),
            code: status.code(),
            stdout,
            stderr: tail.into(),
            stopped,
        })
    }
}

fn push_tail(tail: &mut VecDeque<String>, line: String) {
    if tail.len() == STDERR_TAIL_LINES {
        tail.pop_front();
    }
    tail.push_back(line);
}

// describe_status, shell_quote and the Display below are the builder's (builder/src/host/exec.rs)
// to the letter; the agent does not depend on the builder, and their shared home would be
// kiln-device, which this change leaves alone.
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

/// The command line as a shell would take it, without the added variables (credentials).
impl fmt::Display for Cmd {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", shell_quote(&self.program.to_string_lossy()))?;
        for a in &self.args {
            write!(f, " {}", shell_quote(&a.to_string_lossy()))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_command_line_is_quoted_and_keeps_credentials_out() {
        let c = Cmd::new("restic").args(["--repo", "/srv/a b", "it's"]).env("RESTIC_REST_PASSWORD", "s3cret");
        assert_eq!(c.to_string(), "restic --repo '/srv/a b' 'it'\\''s'");
    }

    #[test]
    fn a_failure_names_the_command_its_status_and_the_stderr_tail() {
        let script = "for i in $(seq 1 100); do echo line$i >&2; done; exit 3";
        let err = Cmd::new("sh").args(["-c", script]).run().unwrap_err();
        let msg = err.to_string();
        assert!(msg.starts_with(&format!("`sh -c '{script}'` failed (exit status 3):\n")), "{msg}");
        assert!(msg.ends_with("line99\nline100"), "{msg}");
        assert!(!msg.contains("line60\n") && msg.contains("line61\n"), "only the tail is kept: {msg}");
        let ExecError::Failed { stderr_tail, .. } = err else { panic!("{err}") };
        assert_eq!(stderr_tail.lines().count(), STDERR_TAIL_LINES);
    }

    #[test]
    fn a_missing_program_says_so() {
        let err = Cmd::new("kiln-agent-no-such-program").arg("x").run().unwrap_err();
        assert!(matches!(err, ExecError::NotFound { .. }), "{err}");
        assert_eq!(
            err.to_string(),
            "kiln-agent-no-such-program is not installed in this image (needed to run `kiln-agent-no-such-program x`)"
        );
        let err = Cmd::new("/nonexistent/restic").watch(Duration::from_secs(5), |_| true, |_| None).unwrap_err();
        assert!(matches!(err, ExecError::NotFound { .. }), "{err}");
    }

    #[test]
    fn the_environment_is_clean_but_for_what_is_added() {
        std::env::set_var("KILN_AGENT_TEST_LEAK", "1");
        let out =
            String::from_utf8(Cmd::new("/usr/bin/env").env("RESTIC_PROGRESS_FPS", "0.016").output().unwrap()).unwrap();
        let mut vars: Vec<&str> = out.lines().collect();
        vars.sort();
        assert_eq!(vars, ["LANG=C.UTF-8", &format!("PATH={PATH}"), "RESTIC_PROGRESS_FPS=0.016"]);
        assert!(!out.contains("KILN_AGENT_TEST_LEAK"));
    }

    #[test]
    fn stdout_comes_back_and_stdin_is_empty() {
        let out = Cmd::new("sh").args(["-c", "cat; echo out"]).output().unwrap();
        assert_eq!(out, b"out\n");
    }

    #[test]
    fn a_watched_program_is_kept_judged_and_stopped() {
        let script = "echo keep; echo drop; echo err1 >&2; echo fatal >&2; exec sleep 30";
        let start = Instant::now();
        let f = Cmd::new("sh")
            .args(["-c", script])
            .watch(Duration::from_secs(60), |l| l.starts_with("keep"), |l| (l == "fatal").then(|| "refused".into()))
            .unwrap();
        assert!(start.elapsed() < Duration::from_secs(20), "stopped by SIGTERM, not waited for");
        assert!(!f.success);
        assert_eq!(f.code, None);
        assert_eq!(f.stdout, ["keep"]);
        assert_eq!(f.stderr, ["err1", "fatal"]);
        assert_eq!(f.stopped.as_deref(), Some("refused"));
        let ok =
            Cmd::new("sh").args(["-c", "echo a; exit 0"]).watch(Duration::from_secs(60), |_| true, |_| None).unwrap();
        assert!(ok.success && ok.code == Some(0) && ok.stdout == ["a"] && ok.stopped.is_none());
    }
}
