//! `etcd-compat-proxy recover-space`: the NOSPACE runbook as one command. Prints the plan, asks
//! on a terminal (`--yes` for scripts, `--dry-run` to only print), then compacts, defragments
//! one member at a time and disarms the alarms, with a progress bar per step.
//!
//! Exit codes: 0 done (or dry run), 1 stopped at a failure (what was done and what is left are
//! printed), 2 nothing was done (configuration, cluster state, or no confirmation).

use std::io::{BufRead, IsTerminal, Write};
use std::process::ExitCode;

use clap::Args;

use super::start::{parse_duration, StartArgs};
use crate::cluster_access::ClusterAccess;
use crate::recover::{self, Progress};

/// Width of the progress bar, in characters.
const BAR_WIDTH: usize = 24;

/// `etcd-compat-proxy recover-space`.
#[derive(Debug, Args)]
#[command(
    about = "Recover from `mvcc: database space exceeded`: compact, defragment each member safely, disarm NOSPACE",
    long_about = "Recover from `mvcc: database space exceeded` (the NOSPACE alarm) in one command.\n\n\
        Prints the plan, then asks for confirmation on a terminal: compact the history to the current \
        revision (or keep --keep-revisions), defragment the members one at a time (learners and followers \
        first, the leader last, each only while every other member is healthy), then disarm the NOSPACE \
        alarms. Stops at the first failure and says what was done and what is left. Compaction drops old \
        revisions, never a key. Takes the same flags, environment variables and --config file as `start` \
        for reaching the cluster; with auth on, --user must have the root role. Exit codes: 0 done, \
        1 stopped at a failure, 2 nothing done."
)]
pub struct RecoverSpaceArgs {
    /// Do not ask for confirmation (for scripts).
    #[arg(long)]
    pub yes: bool,
    /// Print the plan and change nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Revisions of history to keep before the current one (0: compact to the current revision).
    #[arg(long, env = "ETCD_COMPAT_PROXY_KEEP_REVISIONS", value_name = "N", default_value_t = 0)]
    pub keep_revisions: u64,
    /// Longest one member's defragmentation (or the compaction) may take; a 2 GiB database takes tens of seconds.
    #[arg(long, env = "ETCD_COMPAT_PROXY_DEFRAG_TIMEOUT", value_name = "DURATION", default_value = "5m")]
    pub defrag_timeout: String,
    #[command(flatten)]
    pub start: Box<StartArgs>,
}

/// Runs `recover-space` and returns its exit code.
pub fn run(args: RecoverSpaceArgs) -> ExitCode {
    let fail = |message: String| {
        eprintln!("etcd-compat-proxy recover-space: {message}");
        ExitCode::from(2)
    };
    let Some(defrag_timeout) = parse_duration(&args.defrag_timeout).filter(|d| !d.is_zero()) else {
        return fail(format!(
            "invalid --defrag-timeout {:?}: expected a duration such as `5m` or `90s`",
            args.defrag_timeout
        ));
    };
    let keep_revisions = i64::try_from(args.keep_revisions).unwrap_or(i64::MAX);
    let config = match args.start.merge_config_file().and_then(|start| start.validate()) {
        Ok(config) => config,
        Err(error) => return fail(error.to_string()),
    };
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(error) => return fail(format!("cannot start the async runtime: {error}")),
    };
    let access = ClusterAccess::source_of(&config);
    let plan = match runtime.block_on(recover::plan(&access, keep_revisions)) {
        Ok(plan) => plan,
        Err(error) => return fail(format!("cannot make a plan: {error}")),
    };
    print!("{plan}");
    if args.dry_run {
        println!("dry run: nothing was changed");
        return ExitCode::SUCCESS;
    }
    if !args.yes {
        if !std::io::stdin().is_terminal() {
            return fail(
                "refusing to change the cluster without confirmation: run it on a terminal, or pass --yes".to_owned(),
            );
        }
        if !confirmed() {
            println!("nothing was changed");
            return ExitCode::from(2);
        }
    }
    let mut progress = Bars::new(std::io::stdout().is_terminal());
    match runtime.block_on(recover::execute(&access, &plan, defrag_timeout, &mut progress)) {
        Ok(recovered) => {
            println!("recovered:");
            for line in &recovered.done {
                println!("  - {line}");
            }
            println!("  - keys: {} before, {} after", recovered.keys.0, recovered.keys.1);
            println!("check the space left with `etcd-compat-proxy doctor`; make sure compaction runs (--auto-compaction-mode)");
            ExitCode::SUCCESS
        }
        Err(stopped) => {
            eprint!("{stopped}");
            ExitCode::from(1)
        }
    }
}

fn confirmed() -> bool {
    print!("proceed? [y/N] ");
    let _ = std::io::stdout().flush();
    let mut answer = String::new();
    if std::io::stdin().lock().read_line(&mut answer).is_err() {
        return false;
    }
    matches!(answer.trim().to_ascii_lowercase().as_str(), "y" | "yes")
}

/// A progress bar per step on a terminal, redrawn in place; a line per change elsewhere.
struct Bars {
    terminal: bool,
    step: usize,
    title: String,
    units: usize,
}

impl Bars {
    fn new(terminal: bool) -> Bars {
        Bars { terminal, step: 0, title: String::new(), units: 0 }
    }

    fn line(&self, done: usize, doing: &str) -> String {
        let filled = (done * BAR_WIDTH).checked_div(self.units).unwrap_or(BAR_WIDTH).min(BAR_WIDTH);
        format!(
            "[{}/3] {:<10} [{}{}] {done}/{} {doing}",
            self.step,
            self.title,
            "#".repeat(filled),
            "-".repeat(BAR_WIDTH - filled),
            self.units
        )
    }
}

impl Progress for Bars {
    fn start(&mut self, step: usize, title: &str, units: usize) {
        self.step = step;
        self.title = title.to_owned();
        self.units = units;
    }

    fn advance(&mut self, done: usize, doing: &str) {
        if self.terminal {
            // Clear the rest of the line: the previous text may have been longer.
            print!("\r{}\x1b[K", self.line(done, doing));
        } else {
            println!("{}", self.line(done, doing));
        }
        let _ = std::io::stdout().flush();
    }

    fn finish(&mut self, outcome: &str) {
        let line = self.line(self.units, outcome);
        if self.terminal {
            println!("\r{line}\x1b[K");
        } else {
            println!("{line}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bar_fills_with_the_units_done() {
        let mut bars = Bars::new(false);
        bars.start(2, "defragment", 3);
        assert_eq!(
            bars.line(1, "defragmenting m1"),
            "[2/3] defragment [########----------------] 1/3 defragmenting m1"
        );
        bars.start(3, "disarm", 0);
        assert_eq!(bars.line(0, "none"), "[3/3] disarm     [########################] 0/0 none");
    }
}
