//! The markdown report: run metadata, the results table, anomalies and method notes.

use std::fmt::Write as _;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use crate::stats::{format_cpu_per_op, format_latency, format_mib, format_rate, format_rate_short, median_index};
use crate::targets::TargetKind;
use crate::workloads::{Measurement, Workload};

/// Longest failure message quoted inside the table; the full text goes below it.
const CELL_MESSAGE_CHARS: usize = 140;

/// What every round of one target produced for one workload.
pub struct TargetRow {
    /// The target.
    pub kind: TargetKind,
    /// Successful rounds, in order.
    pub rounds: Vec<Measurement>,
    /// Set once a round failed; no further rounds run for this target and workload.
    pub failure: Option<String>,
}

impl TargetRow {
    /// A row with nothing measured yet.
    pub fn new(kind: TargetKind) -> TargetRow {
        TargetRow { kind, rounds: Vec::new(), failure: None }
    }

    /// The round with the median throughput.
    pub fn median(&self) -> Option<&Measurement> {
        let throughputs: Vec<f64> = self.rounds.iter().map(Measurement::throughput).collect();
        median_index(&throughputs).map(|index| &self.rounds[index])
    }
}

/// All rows of one workload.
pub struct WorkloadResult {
    /// Workload name.
    pub name: &'static str,
    /// Throughput unit.
    pub unit: &'static str,
    /// One row per target, in [`TargetKind::ALL`] order.
    pub rows: Vec<TargetRow>,
}

/// Where and how the run happened.
pub struct RunInfo {
    /// UTC start time.
    pub date: String,
    /// `nproc`.
    pub nproc: String,
    /// First `model name` of /proc/cpuinfo.
    pub cpu_model: String,
    /// Version reported by `etcd --version`, and the binary's path.
    pub etcd_version: String,
    /// Where the member keeps its data (tmpfs or disk matters for Put latency).
    pub etcd_data_dir: String,
    /// Commit (and whether proxy/ had local changes) of the proxy that was measured.
    pub proxy_revision: String,
    /// The command line that produced the report.
    pub command: String,
    /// Rounds per target and workload.
    pub rounds: usize,
    /// Warm-up before each window.
    pub warmup: Duration,
    /// Measured window.
    pub window: Duration,
    /// Puts per second of the watch writer.
    pub watch_rate: u32,
}

impl RunInfo {
    /// Gathers the machine and software facts; anything unreadable becomes "unknown".
    pub fn collect(workspace: &Path, etcd_bin: &Path, command: String) -> RunInfo {
        let date = command_line("date", &["-u", "+%Y-%m-%d %H:%M:%S UTC"], None);
        let nproc = command_line("nproc", &[], None);
        let cpu_model = std::fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(|text| {
                text.lines()
                    .find(|line| line.starts_with("model name"))
                    .and_then(|line| line.split_once(':'))
                    .map(|(_, model)| model.trim().to_owned())
            })
            .unwrap_or_else(|| "unknown".to_owned());
        let version_line = command_line(&etcd_bin.display().to_string(), &["--version"], None);
        let version = version_line.strip_prefix("etcd Version:").map_or(version_line.as_str(), str::trim);
        let etcd_version = format!("{version} (`{}`)", etcd_bin.display());
        let commit = command_line("git", &["rev-parse", "--short", "HEAD"], Some(workspace));
        let dirty = command_line("git", &["status", "--porcelain", "--", "proxy", "proto"], Some(workspace));
        let proxy_revision = if dirty.is_empty() || dirty == "unknown" {
            commit
        } else {
            format!("{commit} with uncommitted changes under proxy/ or proto/")
        };
        RunInfo {
            date,
            nproc,
            cpu_model,
            etcd_version,
            etcd_data_dir: "unknown".to_owned(),
            proxy_revision,
            command,
            rounds: 0,
            warmup: Duration::ZERO,
            window: Duration::ZERO,
            watch_rate: 0,
        }
    }
}

/// First line of a command's stdout, or "unknown".
fn command_line(program: &str, args: &[&str], dir: Option<&Path>) -> String {
    let mut command = Command::new(program);
    command.args(args);
    if let Some(dir) = dir {
        command.current_dir(dir);
    }
    match command.output() {
        Ok(output) if output.status.success() => {
            String::from_utf8_lossy(&output.stdout).lines().next().unwrap_or("").trim().to_owned()
        }
        _ => "unknown".to_owned(),
    }
}

/// Renders the whole report.
pub fn render(
    info: &RunInfo,
    workloads: &[Workload],
    results: &[WorkloadResult],
    notes: &[String],
    total: Duration,
) -> String {
    let mut out = String::new();
    // Writing to a String cannot fail; the results are ignored for that reason.
    let _ = writeln!(out, "# etcd-compat-proxy benchmark\n");
    let _ = writeln!(out, "- Date: {}", info.date);
    let _ = writeln!(out, "- Machine: {} CPUs (`nproc`), {}", info.nproc, info.cpu_model);
    let _ = writeln!(out, "- etcd: {}, one member, data dir {}", info.etcd_version, info.etcd_data_dir);
    let _ = writeln!(out, "- etcd-compat-proxy: {}", info.proxy_revision);
    let _ = writeln!(out, "- Command: `{}`", info.command);
    let _ = writeln!(
        out,
        "- Method: {} round(s); per round each target gets {:.1} s warm-up and a {:.1} s window, targets alternating \
         (direct, grpc-proxy, etcd-compat-proxy) within every round; each row is the round with the median \
         throughput, \"rounds\" lists all of them. Total run time {:.0} s.",
        info.rounds,
        info.warmup.as_secs_f64(),
        info.window.as_secs_f64(),
        total.as_secs_f64()
    );
    let _ = writeln!(out);
    let _ = writeln!(
        out,
        "| workload | target | throughput | vs direct | p50 | p99 | proxy CPU/op | etcd CPU/op | proxy RSS | rounds |"
    );
    let _ = writeln!(out, "|---|---|--:|--:|--:|--:|--:|--:|--:|---|");
    let mut failures = Vec::new();
    for result in results {
        let direct = result
            .rows
            .iter()
            .find(|row| row.kind == TargetKind::Direct && row.failure.is_none())
            .and_then(TargetRow::median)
            .map(Measurement::throughput);
        for row in &result.rows {
            let _ = writeln!(out, "{}", table_row(result, row, direct));
            if let Some(failure) = &row.failure {
                failures.push(format!("{} / {}: {}", result.name, row.kind.label(), one_line(failure)));
            }
        }
    }
    let _ = writeln!(out);
    let _ = writeln!(out, "## Anomalies\n");
    if failures.is_empty() && notes.is_empty() {
        let _ = writeln!(out, "- None detected: every target completed every round of every workload.");
    }
    for failure in &failures {
        let _ = writeln!(out, "- FAILED {failure}");
    }
    for note in notes {
        let _ = writeln!(out, "- {}", one_line(note));
    }
    let _ = writeln!(out);
    let _ = writeln!(out, "## Workloads\n");
    for workload in workloads {
        let _ = writeln!(out, "- `{}`: {}.", workload.name, workload.about);
    }
    let _ = writeln!(out);
    let _ = writeln!(out, "## How to read this\n");
    for line in METHOD_NOTES {
        let _ = writeln!(out, "- {}", line.replace("{watch_rate}", &info.watch_rate.to_string()));
    }
    out
}

const METHOD_NOTES: &[&str] = &[
    "The load generator runs in the bench process (etcd-client over tonic, tokio multi-thread runtime) on the same \
     CPUs as etcd and the proxies; it is the same code for every target, so ratios compare the targets, not the client.",
    "Every response is checked (Range counts and value sizes, Put revisions, watch event keys, order and count, \
     keep-alive lease ids and TTLs); any error or a request unanswered for 10 s fails that target's row instead of \
     being counted.",
    "CPU/op is (utime+stime) of the process over the window from /proc/<pid>/stat, divided by the operations (or \
     delivered events) completed in the window; proxy RSS is VmRSS when the window closes.",
    "Watch workloads: a writer Puts the watched key {watch_rate} times a second straight to etcd (not through the \
     target), so the proxy's CPU is spent on fan-out alone; throughput is events delivered per second over all \
     watchers and stays near watchers x {watch_rate} while a target keeps up. After the window every watcher must \
     have received every Put.",
    "etcd's history is compacted (physically) after every window so no run inherits another's garbage.",
    "etcd grpc-proxy is not a plain forwarder, which explains some of its rows: it answers serializable Ranges from \
     its own cache (hence etcd CPU/op near zero for `range 1key serializable`), coalesces identical watchers into \
     one etcd watcher (lower etcd CPU per event), and answers LeaseKeepAlive from its own clientv3 lessor, which \
     renews a lease only every TTL/3 (20 s with the 60 s TTL used here), so a client that waits for each answer \
     stalls and the 10 s limit fails the row. etcd-compat-proxy forwards every call and stream to etcd as is.",
];

fn table_row(result: &WorkloadResult, row: &TargetRow, direct: Option<f64>) -> String {
    let label = row.kind.label();
    if let Some(failure) = &row.failure {
        let mut message = one_line(failure);
        if message.chars().count() > CELL_MESSAGE_CHARS {
            message = message.chars().take(CELL_MESSAGE_CHARS).collect::<String>() + "...";
        }
        return format!("| {} | {label} | FAILED: {} | | | | | | | |", result.name, escape(&message));
    }
    let Some(median) = row.median() else {
        return format!("| {} | {label} | not run | | | | | | | |", result.name);
    };
    let throughput = median.throughput();
    let ratio = match direct {
        Some(direct) if direct > 0.0 => format!("{:.2}x", throughput / direct),
        _ => "n/a".to_owned(),
    };
    let latency = |value: Option<Duration>| value.map_or_else(|| "-".to_owned(), format_latency);
    let proxy_cpu = median.proxy_cpu.map_or_else(|| "-".to_owned(), |cpu| format_cpu_per_op(cpu, median.ops));
    let rss = median.proxy_rss.map_or_else(|| "-".to_owned(), format_mib);
    let rounds: Vec<String> = row.rounds.iter().map(|round| format_rate_short(round.throughput())).collect();
    format!(
        "| {} | {label} | {} {} | {ratio} | {} | {} | {proxy_cpu} | {} | {rss} | {} |",
        result.name,
        format_rate(throughput),
        result.unit,
        latency(median.p50),
        latency(median.p99),
        format_cpu_per_op(median.etcd_cpu, median.ops),
        rounds.join(" / ")
    )
}

fn one_line(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

fn escape(text: &str) -> String {
    text.replace('|', "\\|")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn measurement(ops: u64) -> Measurement {
        Measurement {
            ops,
            elapsed: Duration::from_secs(1),
            p50: Some(Duration::from_micros(500)),
            p99: Some(Duration::from_millis(2)),
            etcd_cpu: Duration::from_millis(100),
            proxy_cpu: Some(Duration::from_millis(50)),
            proxy_rss: Some(10 * 1024 * 1024),
        }
    }

    #[test]
    fn rows_show_the_median_round_and_the_ratio_to_direct() {
        let result = WorkloadResult {
            name: "w",
            unit: "ops/s",
            rows: vec![TargetRow {
                kind: TargetKind::CompatProxy,
                rounds: vec![measurement(900), measurement(1000), measurement(800)],
                failure: None,
            }],
        };
        let row = table_row(&result, &result.rows[0], Some(1000.0));
        assert_eq!(
            row,
            "| w | etcd-compat-proxy | 900 ops/s | 0.90x | 500 µs | 2.00 ms | 55.6 µs | 111.1 µs | 10.0 MiB | 900 / 1,000 / 800 |"
        );
    }

    #[test]
    fn failed_rows_carry_a_short_escaped_message() {
        let result = WorkloadResult {
            name: "w",
            unit: "ops/s",
            rows: vec![TargetRow {
                kind: TargetKind::GrpcProxy,
                rounds: vec![measurement(5)],
                failure: Some("round 2: a | b\nc".to_owned()),
            }],
        };
        let row = table_row(&result, &result.rows[0], None);
        assert_eq!(row, "| w | grpc-proxy | FAILED: round 2: a \\| b c | | | | | | | |");
    }
}
