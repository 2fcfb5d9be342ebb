//! Progress and plugin log lines on stderr: a bar on a terminal, plain
//! throttled lines otherwise (CI logs, Slurm output files), nothing with --quiet.

use std::io::IsTerminal;
use std::sync::Mutex;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

pub struct Progress {
    prefix: String,
    quiet: bool,
    bar: Option<ProgressBar>,
    /// Plain mode: the last tenth of the work reported.
    last_tenth: Mutex<Option<u64>>,
}

impl Progress {
    pub fn new(prefix: &str, quiet: bool) -> Self {
        let bar = (!quiet && std::io::stderr().is_terminal()).then(|| {
            let bar = ProgressBar::with_draw_target(Some(0), ProgressDrawTarget::stderr());
            bar.set_style(
                ProgressStyle::with_template("{prefix} [{bar:30}] {pos}/{len} {wide_msg} ({eta})")
                    .unwrap_or_else(|_| ProgressStyle::default_bar())
                    .progress_chars("=> "),
            );
            bar.set_prefix(prefix.to_string());
            bar
        });
        Self {
            prefix: prefix.to_string(),
            quiet,
            bar,
            last_tenth: Mutex::new(None),
        }
    }

    pub fn update(&self, done: u64, total: u64, message: &str) {
        if self.quiet {
            return;
        }
        if let Some(bar) = &self.bar {
            bar.set_length(total);
            bar.set_position(done);
            bar.set_message(message.to_string());
            return;
        }
        let tenth = (done.min(total) * 10).checked_div(total).unwrap_or(10);
        let mut last = self.last_tenth.lock().unwrap_or_else(|p| p.into_inner());
        if *last != Some(tenth) {
            *last = Some(tenth);
            eprintln!("{}: {done}/{total} {message}", self.prefix);
        }
    }

    /// A plugin's log line; warnings are shown even with --quiet.
    pub fn log(&self, warning: bool, message: &str) {
        if self.quiet && !warning {
            return;
        }
        let line = if warning {
            format!("{}: warning: {message}", self.prefix)
        } else {
            format!("{}: {message}", self.prefix)
        };
        match &self.bar {
            Some(bar) => bar.println(line),
            None => eprintln!("{line}"),
        }
    }

    pub fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}
