//! Stage progress on stderr: a spinner with the latest tool output on a terminal, plain
//! "==> stage" / "    done" lines otherwise (CI logs).

use indicatif::{ProgressBar, ProgressStyle};
use std::io::IsTerminal;
use std::time::{Duration, Instant};

pub struct StageProgress {
    name: &'static str,
    started: Instant,
    bar: Option<ProgressBar>,
}

impl StageProgress {
    pub fn start(name: &'static str, what: &str) -> StageProgress {
        let tty = std::io::stderr().is_terminal() && !crate::host::exec::debug_enabled();
        let bar = if tty {
            let b = ProgressBar::new_spinner();
            b.set_style(
                ProgressStyle::with_template("{spinner} {prefix:.bold} {elapsed:>4} {wide_msg}")
                    .expect("valid template"),
            );
            b.set_prefix(name);
            b.set_message(what.to_string());
            b.enable_steady_tick(Duration::from_millis(120));
            Some(b)
        } else {
            eprintln!("==> {name}: {what}");
            None
        };
        StageProgress { name, started: Instant::now(), bar }
    }

    /// Shows the latest line of a tool's output next to the spinner.
    pub fn line(&self, line: &str) {
        if let Some(b) = &self.bar {
            let short: String = line.chars().take(100).collect();
            b.set_message(short);
        }
    }

    pub fn finish(self, summary: &str) -> Duration {
        let took = self.started.elapsed();
        let text = format!("{:<18} {:>6.1}s  {summary}", self.name, took.as_secs_f64());
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
        eprintln!("    {text}");
        took
    }
}
