//! Stage progress on stderr: a spinner with the latest tool output on a terminal, plain
//! "==> stage" / "    done" lines otherwise (CI logs). Stages that run at the same time (the
//! agent's cross-build beside the bootstrap) each have their own spinner line.

use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use std::io::IsTerminal;
use std::time::{Duration, Instant};

/// Every spinner of this process, drawn together.
fn spinners() -> &'static MultiProgress {
    static MULTI: std::sync::OnceLock<MultiProgress> = std::sync::OnceLock::new();
    MULTI.get_or_init(MultiProgress::new)
}

pub struct StageProgress {
    name: &'static str,
    started: Instant,
    bar: Option<ProgressBar>,
}

impl StageProgress {
    pub fn start(name: &'static str, what: &str) -> StageProgress {
        let tty = std::io::stderr().is_terminal() && !crate::host::exec::debug_enabled();
        let bar = if tty {
            let b = spinners().add(ProgressBar::new_spinner());
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
        match &self.bar {
            Some(b) => {
                b.finish_and_clear();
                spinners().remove(b);
                // Above the spinners still running, not through them.
                if spinners().println(format!("    {text}")).is_err() {
                    eprintln!("    {text}");
                }
            }
            None => eprintln!("    {text}"),
        }
        took
    }
}
