//! The markdown report: run metadata, the results table, anomalies and method notes.

use std::fmt::Write as _;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use crate::stats::{
    format_cpu_per_op, format_latency, format_mib, format_mib_delta, format_rate, format_rate_short, median_index,
};
use crate::targets::TargetKind;
use crate::workloads::{conns_for, Kind, Measurement, Workload, PASS_TIMEOUT};

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
    /// Agents of the fleet workload.
    pub fleet_agents: usize,
    /// Extra data loaded for opt-in workloads, one line each.
    pub data: Vec<String>,
    /// Whether etcd and the load generator ran on CPU 0 and each proxy on CPU 1 (`--pin`).
    pub pinned: bool,
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
            fleet_agents: 0,
            data: Vec::new(),
            pinned: false,
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

/// The targets the rounds visit, in order, as the method line names them: every target of any
/// workload, since not every workload visits every target.
fn target_order(results: &[WorkloadResult]) -> String {
    let labels: Vec<&str> = TargetKind::ALL
        .into_iter()
        .filter(|&kind| results.iter().any(|result| result.rows.iter().any(|row| row.kind == kind)))
        .map(TargetKind::label)
        .collect();
    labels.join(", ")
}

/// `text` with the run's settings in place of `{watch_rate}`, `{watch_rate/10}`,
/// `{fleet_agents}` and `{fleet_conns}`.
fn fill(text: &str, info: &RunInfo) -> String {
    text.replace("{watch_rate}", &info.watch_rate.to_string())
        .replace("{watch_rate/10}", &(f64::from(info.watch_rate) / 10.0).to_string())
        .replace("{fleet_agents}", &info.fleet_agents.to_string())
        .replace("{fleet_conns}", &conns_for(info.fleet_agents).to_string())
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
    if info.pinned {
        let _ = writeln!(
            out,
            "- Pinned (`--pin`): etcd and the load generator on CPU 0 for every target, each proxy on CPU 1, as a \
             sidecar with a core of its own; a proxy's CPU then no longer takes from the client's throughput, \
             and what remains is what it costs etcd and the client."
        );
    }
    let _ = writeln!(
        out,
        "- Method: {} round(s); per round each target gets {:.1} s warm-up and a {:.1} s window, targets alternating \
         ({}) within every round; each row is the round with the median \
         throughput, \"rounds\" lists all of them. Total run time {:.0} s.",
        info.rounds,
        info.warmup.as_secs_f64(),
        info.window.as_secs_f64(),
        target_order(results),
        total.as_secs_f64()
    );
    let paged = workloads.iter().any(Workload::needs_huge_data);
    if paged {
        let _ = writeln!(
            out,
            "- `range 1GiB paged` is measured per full pass instead: no warm-up, one pass per round and target \
             (capped at {:.0} s)",
            PASS_TIMEOUT.as_secs_f64()
        );
    }
    for line in &info.data {
        let _ = writeln!(out, "- Data: {line}");
    }
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
    out.push_str(&round_ratios_table(results));
    for result in results {
        if result.rows.iter().any(|row| row.rounds.iter().any(|round| round.pass.is_some())) {
            out.push_str(&pass_table(result));
        }
        if result.rows.iter().any(|row| row.rounds.iter().any(|round| round.events.is_some())) {
            out.push_str(&events_table(result));
        }
    }
    let _ = writeln!(out, "## Anomalies\n");
    let growth = pass_rss_growth(results);
    for line in &growth {
        let _ = writeln!(out, "- {line}");
    }
    if failures.is_empty() && notes.is_empty() && growth.is_empty() {
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
        let _ = writeln!(out, "- `{}`: {}.", workload.name, fill(workload.about, info));
    }
    let _ = writeln!(out);
    let _ = writeln!(out, "## How to read this\n");
    for line in METHOD_NOTES {
        let _ = writeln!(out, "- {line}");
    }
    if workloads.iter().any(|workload| matches!(workload.kind, Kind::Watch { .. })) {
        let _ = writeln!(out, "- {}", fill(WATCH_NOTE, info));
    }
    if workloads.iter().any(|workload| matches!(workload.kind, Kind::Fleet)) {
        let _ = writeln!(out, "- {}", fill(FLEET_NOTE, info));
    }
    if results.iter().any(|result| result.rows.iter().any(|row| row.kind == TargetKind::CompatProxyNoCache)) {
        let _ = writeln!(out, "- {NO_CACHE_NOTE}");
    }
    let _ = writeln!(out, "- {GRPC_PROXY_NOTE}");
    if results.iter().any(|result| result.rows.iter().any(|row| row.kind == TargetKind::H2Floor)) {
        let _ = writeln!(out, "- {H2_FLOOR_NOTE}");
    }
    if paged {
        for line in PAGED_NOTES {
            let _ = writeln!(out, "- {line}");
        }
    }
    out
}

const PAGED_NOTES: &[&str] = &[
    "`range 1GiB paged`: the bench client keeps its default user-agent (`tonic/...`), which etcd-compat-proxy \
     classifies as a 4 MiB client, so each of its answers to a 1000-key page is cut to at most 4 MiB with \
     `more=true` and the client needs more round trips; only the client's own receive limit is raised (128 MiB), \
     so direct etcd's 64 MiB pages are accepted. The main table's throughput is MiB of values per second (an op is \
     1 MiB, so CPU/op is CPU per MiB); p50/p99 are per page. \"time vs direct\" is the paging overhead: the pass \
     time divided by direct etcd's pass time in the same run.",
    "Proxy RSS of a pass: idle is VmRSS after the client connected and before the first page; peak is VmHWM after \
     resetting it through /proc/<pid>/clear_refs just before the pass (or, where that is refused, the highest of \
     VmRSS samples taken every 50 ms), whichever of VmHWM and the samples is higher; after is VmRSS right after the \
     last page. A page unanswered for 60 s or a pass longer than 120 s fails the row.",
];

/// How much a proxy's RSS may rise during a paged pass before the report flags it: a client
/// reading page by page should cost the proxy about one page, "a few MiB" over idle.
const PASS_RSS_GROWTH_BUDGET: u64 = 8 * 1024 * 1024;

/// One line per workload and proxy whose RSS rose by more than [`PASS_RSS_GROWTH_BUDGET`]
/// during a paged pass, naming the worst pass.
fn pass_rss_growth(results: &[WorkloadResult]) -> Vec<String> {
    let mut lines = Vec::new();
    for result in results {
        for row in &result.rows {
            let worst = row
                .rounds
                .iter()
                .enumerate()
                .filter_map(|(index, round)| {
                    let pass = round.pass.as_ref()?;
                    let (peak, idle) = pass.rss_peak.zip(pass.rss_idle)?;
                    Some((peak.saturating_sub(idle), index + 1, idle, peak))
                })
                .max();
            if let Some((growth, round, idle, peak)) = worst.filter(|(growth, ..)| *growth > PASS_RSS_GROWTH_BUDGET) {
                lines.push(format!(
                    "{} / {}: proxy RSS rose by {} during a pass (round {round}: idle {}, peak {}), over the {} a \
                     paged read should cost",
                    result.name,
                    row.kind.label(),
                    format_mib_delta(growth, 0),
                    format_mib(idle),
                    format_mib(peak),
                    format_mib(PASS_RSS_GROWTH_BUDGET)
                ));
            }
        }
    }
    lines
}

/// The per-pass table of a paged workload: time, pages, CPU and the proxy's memory per pass.
fn pass_table(result: &WorkloadResult) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "### `{}`, per pass\n", result.name);
    let _ = writeln!(
        out,
        "| target | pass time | MiB/s | time vs direct | pages/pass | page p50 | page p99 | proxy CPU/pass | \
         etcd CPU/pass | proxy RSS idle | proxy RSS peak | peak - idle | RSS after | every pass: time, RSS idle -> peak |"
    );
    let _ = writeln!(out, "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|---|");
    let direct = result
        .rows
        .iter()
        .find(|row| row.kind == TargetKind::Direct && row.failure.is_none())
        .and_then(TargetRow::median)
        .map(|median| median.elapsed);
    for row in &result.rows {
        let label = row.kind.label();
        let Some(median) = row.median().filter(|_| row.failure.is_none()) else {
            let what = row.failure.as_deref().map_or_else(|| "not run".to_owned(), |f| format!("FAILED: {}", cell(f)));
            let _ = writeln!(out, "| {label} | {what} | | | | | | | | | | | | |");
            continue;
        };
        let dash = || "-".to_owned();
        let mib = |value: Option<u64>| value.map_or_else(dash, format_mib);
        let latency = |value: Option<Duration>| value.map_or_else(dash, format_latency);
        let pass = median.pass.as_ref();
        let ratio = match direct {
            Some(direct) if !direct.is_zero() => format!("{:.2}x", median.elapsed.as_secs_f64() / direct.as_secs_f64()),
            _ => "n/a".to_owned(),
        };
        let delta = match pass.and_then(|p| p.rss_peak.zip(p.rss_idle)) {
            Some((peak, idle)) => format_mib_delta(peak, idle),
            None => dash(),
        };
        let peak = match pass {
            Some(p) if p.rss_peak.is_some() && !p.peak_from_hwm => format!("{} (samples)", mib(p.rss_peak)),
            Some(p) => mib(p.rss_peak),
            None => dash(),
        };
        let times: Vec<String> = row
            .rounds
            .iter()
            .map(|round| match round.pass.as_ref().and_then(|p| p.rss_idle.zip(p.rss_peak)) {
                Some((idle, peak)) => format!(
                    "{:.1} s, {:.1} -> {}",
                    round.elapsed.as_secs_f64(),
                    idle as f64 / (1024.0 * 1024.0),
                    format_mib(peak)
                ),
                None => format!("{:.1} s", round.elapsed.as_secs_f64()),
            })
            .collect();
        let _ = writeln!(
            out,
            "| {label} | {:.1} s | {} | {ratio} | {} | {} | {} | {} | {} | {} | {peak} | {delta} | {} | {} |",
            median.elapsed.as_secs_f64(),
            format_rate(median.throughput()),
            pass.map_or_else(dash, |p| p.pages.to_string()),
            latency(median.p50),
            latency(median.p99),
            latency(median.proxy_cpu),
            format_latency(median.etcd_cpu),
            mib(pass.and_then(|p| p.rss_idle)),
            mib(pass.and_then(|p| p.rss_after)),
            times.join(" / ")
        );
    }
    let _ = writeln!(out);
    out
}

const METHOD_NOTES: &[&str] = &[
    "The load generator runs in the bench process (etcd-client over tonic, tokio multi-thread runtime) on the same \
     CPUs as etcd and the proxies; it is the same code for every target, so ratios compare the targets, not the client.",
    "Every response is checked (Range counts and value sizes, Put revisions, watch event keys, order and count, \
     keep-alive lease ids and TTLs); any error or a request unanswered for 10 s fails that target's row instead of \
     being counted.",
    "CPU/op is (utime+stime) of the process over the window from /proc/<pid>/stat, divided by the ops completed in \
     the window: a request, a keep-alive, in watch rows one event delivered to one watcher, in `fleet mixed` one \
     poll. Proxy RSS is VmRSS \
     when the window closes, except in the rows that hold watch streams (watch and fleet), where it is the peak over \
     the whole run, from before the first connection to the last event (VmHWM reset through \
     /proc/<pid>/clear_refs, or 50 ms VmRSS samples where the reset is refused). Either way memory a proxy kept from \
     an earlier workload counts, which is why the watch workloads run from the smallest fan-out to the largest.",
    "etcd's history is compacted (physically) after every window so no run inherits another's garbage.",
];

const WATCH_NOTE: &str = "Watch workloads: a writer Puts straight to etcd (not through the target), {watch_rate} \
    times a second ({watch_rate/10} with 10000 watchers, so that those rows ask for as many events as the \
    1000-watcher rows and differ in streams held), to the watched key, or in turn to 100 keys under the watched prefix; \
    the proxy's CPU is thus spent on fan-out alone. Watchers are spread 100 to a connection (10 to a connection in \
    `watch fanout 100 key`), like a fleet of agents; opening the connections and creating the watches happen before \
    the warm-up. Throughput is events delivered per second over all watchers and stays near watchers x Puts/s while a \
    target keeps up; an op is one event delivered to one watcher, so CPU/op is CPU per delivered event. After the \
    window every watcher must have received every Put.";

const FLEET_NOTE: &str = "`fleet mixed`: {fleet_agents} agents over {fleet_conns} connection(s), each with a watch \
    stream on `/fleet/jobs/` and a loop of serializable Ranges of `/fleet/config`, 10 ms apart (first polls staggered \
    over those 10 ms), and 2 writers through the target, as a fleet's control plane would write. An op is a poll: \
    throughput is polls per second, p50/p99 are per poll, and CPU/op is CPU per poll, which includes the cost of \
    delivering the watch events and of the writers' Puts (about 20 a second), since the window has no way to tell them \
    apart. The events delivered to the agents are in the table \"watch events delivered\" below the main one; after \
    the window every agent must have received every job Put.";

const NO_CACHE_NOTE: &str = "`etcd-compat-proxy (no cache)` is the same build as `etcd-compat-proxy`, started with \
    `--serializable-cache-bytes 0` (the default keeps 64 MiB of answers); it runs only the workloads whose reads are \
    serializable Ranges, the ones its cache could answer, so the pair shows what the cache saves etcd and what it \
    costs the proxy. `baseline`, when measured, keeps its own defaults.";

const GRPC_PROXY_NOTE: &str = "etcd grpc-proxy is not a plain forwarder, which explains some of its rows: it answers \
    serializable Ranges from its own cache (hence etcd CPU/op near zero for `range 1key serializable`), coalesces \
    identical watchers into one etcd watcher (lower etcd CPU per event), and answers LeaseKeepAlive from its own \
    clientv3 lessor, which renews a lease only every TTL/3 (20 s with the 60 s TTL used here), so a client that waits \
    for each answer stalls and the 10 s limit fails the row. etcd-compat-proxy forwards every call and stream to etcd, \
    except that it answers serializable Ranges from its cache (`--serializable-cache-bytes`) and lets identical \
    watches of one etcd user share one etcd watch (`--watch-coalescing`), both on by default.";

const H2_FLOOR_NOTE: &str = "`h2 floor` (`--h2-floor`) is `etcd-compat-h2-floor`, a bare forwarder built in this \
    repository as a measuring stick: the same h2 crate, HTTP/2 windows, frame size, batched writes, allocator and \
    single-threaded runtime as etcd-compat-proxy, one connection to the member, a task per call, a single-message \
    request read whole before it goes up, and nothing else (no TLS, auth, routing, retries, limits, metrics; it \
    buffers what a client does not read). What etcd-compat-proxy costs beyond it is the proxy's own work; what the \
    floor costs, any proxy on h2 pays. \"proxy CPU/op vs h2 floor\" compares each target with it within each round.";

/// Each target's ratios to direct (throughput) and to grpc-proxy (proxy CPU per op) taken within
/// each round, then their median. Targets alternate within a round, so two of them measured in
/// the same round met the same machine: on a shared machine whose speed changes between rounds,
/// these are steadier than the ratio of two median rounds in the main table, which may come from
/// different rounds.
fn round_ratios_table(results: &[WorkloadResult]) -> String {
    let with_floor = results.iter().any(|result| result.rows.iter().any(|row| row.kind == TargetKind::H2Floor));
    let mut lines = Vec::new();
    for result in results {
        let rounds_of = |kind| result.rows.iter().find(|row| row.kind == kind).map(|row| row.rounds.as_slice());
        let direct = rounds_of(TargetKind::Direct).unwrap_or_default();
        let grpc_proxy = rounds_of(TargetKind::GrpcProxy).unwrap_or_default();
        let h2_floor = rounds_of(TargetKind::H2Floor);
        // A paged pass is compared by its own table; one round has nothing to pair.
        if direct.len() < 2 || direct.iter().any(|round| round.pass.is_some()) {
            continue;
        }
        for row in result.rows.iter().filter(|row| row.kind != TargetKind::Direct) {
            let throughput: Vec<f64> = row
                .rounds
                .iter()
                .zip(direct)
                .filter(|(_, direct)| direct.throughput() > 0.0)
                .map(|(round, direct)| round.throughput() / direct.throughput())
                .collect();
            let cpu: Vec<f64> = match row.kind {
                TargetKind::GrpcProxy => Vec::new(),
                _ => row.rounds.iter().zip(grpc_proxy).filter_map(|(round, grpc)| cpu_ratio(round, grpc)).collect(),
            };
            if throughput.is_empty() {
                continue;
            }
            let mut line = format!(
                "| {} | {} | {} | {} |",
                result.name,
                row.kind.label(),
                median_and_rounds(&throughput),
                median_and_rounds(&cpu)
            );
            if with_floor {
                let to_floor: Vec<f64> = match (row.kind, h2_floor) {
                    (TargetKind::H2Floor, _) | (_, None) => Vec::new(),
                    (_, Some(floor)) => {
                        row.rounds.iter().zip(floor).filter_map(|(round, floor)| cpu_ratio(round, floor)).collect()
                    }
                };
                let _ = write!(line, " {} |", median_and_rounds(&to_floor));
            }
            lines.push(line);
        }
    }
    if lines.is_empty() {
        return String::new();
    }
    let (floor_header, floor_rule) = if with_floor { (" proxy CPU/op vs h2 floor |", "--:|") } else { ("", "") };
    let mut out = format!(
        "### Ratios within each round\n\nThe median of the ratios taken within each round, then every round's, in \
         order. Targets alternate within a round, so these are less exposed than the table above to the machine's \
         speed changing between rounds.\n\n| workload | target | throughput vs direct | proxy CPU/op vs grpc-proxy \
         |{floor_header}\n|---|---|--:|--:|{floor_rule}\n",
    );
    for line in lines {
        let _ = writeln!(out, "{line}");
    }
    let _ = writeln!(out);
    out
}

/// One proxy's CPU per op over another's (grpc-proxy's, the h2 floor's), in the same round.
fn cpu_ratio(round: &Measurement, other: &Measurement) -> Option<f64> {
    let per_op = |m: &Measurement| m.proxy_cpu.filter(|_| m.ops > 0).map(|cpu| cpu.as_secs_f64() / m.ops as f64);
    match (per_op(round), per_op(other)) {
        (Some(ours), Some(theirs)) if theirs > 0.0 => Some(ours / theirs),
        _ => None,
    }
}

/// `0.82x (0.85 / 0.80 / 0.82)`: the median ratio, then each round's; `-` for none.
fn median_and_rounds(ratios: &[f64]) -> String {
    let Some(median) = median_index(ratios) else {
        return "-".to_owned();
    };
    let rounds: Vec<String> = ratios.iter().map(|ratio| format!("{ratio:.2}")).collect();
    format!("{:.2}x ({})", ratios[median], rounds.join(" / "))
}

/// The events a workload's watchers received beside its ops (the fleet), per target: the main
/// table has no column for them.
fn events_table(result: &WorkloadResult) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "### `{}`, watch events delivered\n", result.name);
    let _ = writeln!(out, "| target | throughput | p99 | events in the window | events/s | every round: events/s |");
    let _ = writeln!(out, "|---|--:|--:|--:|--:|---|");
    let events_per_second = |round: &Measurement| round.events.unwrap_or(0) as f64 / round.elapsed.as_secs_f64();
    for row in &result.rows {
        let label = row.kind.label();
        let Some(median) = row.median().filter(|_| row.failure.is_none()) else {
            let what = row.failure.as_deref().map_or_else(|| "not run".to_owned(), |f| format!("FAILED: {}", cell(f)));
            let _ = writeln!(out, "| {label} | {what} | | | | |");
            continue;
        };
        let rounds: Vec<String> = row.rounds.iter().map(|round| format_rate_short(events_per_second(round))).collect();
        let _ = writeln!(
            out,
            "| {label} | {} {} | {} | {} | {} | {} |",
            format_rate(median.throughput()),
            result.unit,
            median.p99.map_or_else(|| "-".to_owned(), format_latency),
            median.events.map_or_else(|| "-".to_owned(), |events| format_rate(events as f64)),
            format_rate(events_per_second(median)),
            rounds.join(" / ")
        );
    }
    let _ = writeln!(out);
    out
}

fn table_row(result: &WorkloadResult, row: &TargetRow, direct: Option<f64>) -> String {
    let label = row.kind.label();
    if let Some(failure) = &row.failure {
        return format!("| {} | {label} | FAILED: {} | | | | | | | |", result.name, cell(failure));
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

/// A failure message shortened and escaped to fit in a table cell.
fn cell(failure: &str) -> String {
    let mut message = one_line(failure);
    if message.chars().count() > CELL_MESSAGE_CHARS {
        message = message.chars().take(CELL_MESSAGE_CHARS).collect::<String>() + "...";
    }
    escape(&message)
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
            events: None,
            pass: None,
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

    /// A target's rounds of (ops in the 1 s window, proxy CPU per op in µs).
    fn row(kind: TargetKind, rounds: &[(u64, u64)]) -> TargetRow {
        TargetRow {
            kind,
            rounds: rounds
                .iter()
                .map(|&(ops, micros)| Measurement {
                    proxy_cpu: Some(Duration::from_micros(ops * micros)),
                    ..measurement(ops)
                })
                .collect(),
            failure: None,
        }
    }

    #[test]
    fn ratios_are_taken_within_each_round() {
        let result = WorkloadResult {
            name: "w",
            unit: "ops/s",
            rows: vec![
                row(TargetKind::Direct, &[(1000, 0), (2000, 0), (1500, 0)]),
                row(TargetKind::GrpcProxy, &[(500, 100), (1000, 125), (600, 80)]),
                // Its median round (900) against direct's (1500) would be 0.60x; within each
                // round it is 0.90x, 0.90x and 0.50x.
                row(TargetKind::CompatProxy, &[(900, 30), (1800, 35), (750, 32)]),
            ],
        };
        let table = round_ratios_table(std::slice::from_ref(&result));
        let lines: Vec<&str> = table.lines().filter(|line| line.starts_with("| w |")).collect();
        assert_eq!(
            lines,
            [
                "| w | grpc-proxy | 0.50x (0.50 / 0.50 / 0.40) | - |",
                "| w | etcd-compat-proxy | 0.90x (0.90 / 0.90 / 0.50) | 0.30x (0.30 / 0.28 / 0.40) |",
            ]
        );
    }

    #[test]
    fn the_h2_floor_adds_a_column_of_cpu_per_op_against_it() {
        let result = WorkloadResult {
            name: "w",
            unit: "ops/s",
            rows: vec![
                row(TargetKind::Direct, &[(1000, 0), (2000, 0)]),
                row(TargetKind::GrpcProxy, &[(500, 100), (1000, 120)]),
                row(TargetKind::CompatProxy, &[(900, 30), (1800, 36)]),
                row(TargetKind::H2Floor, &[(950, 25), (1900, 30)]),
            ],
        };
        let table = round_ratios_table(std::slice::from_ref(&result));
        assert!(
            table.contains("| proxy CPU/op vs grpc-proxy | proxy CPU/op vs h2 floor |\n|---|---|--:|--:|--:|\n"),
            "{table}"
        );
        let lines: Vec<&str> = table.lines().filter(|line| line.starts_with("| w |")).collect();
        assert_eq!(
            lines,
            [
                "| w | grpc-proxy | 0.50x (0.50 / 0.50) | - | 4.00x (4.00 / 4.00) |",
                "| w | etcd-compat-proxy | 0.90x (0.90 / 0.90) | 0.30x (0.30 / 0.30) | 1.20x (1.20 / 1.20) |",
                "| w | h2 floor | 0.95x (0.95 / 0.95) | 0.25x (0.25 / 0.25) | - |",
            ]
        );
    }

    #[test]
    fn one_round_has_no_ratio_table() {
        let row = |kind| TargetRow { kind, rounds: vec![measurement(1000)], failure: None };
        let result = WorkloadResult {
            name: "w",
            unit: "ops/s",
            rows: vec![row(TargetKind::Direct), row(TargetKind::CompatProxy)],
        };
        assert_eq!(round_ratios_table(std::slice::from_ref(&result)), "");
    }

    #[test]
    fn a_baseline_build_is_a_target_of_its_own() {
        let row = |kind| TargetRow { kind, rounds: vec![measurement(1000)], failure: None };
        let result = WorkloadResult {
            name: "w",
            unit: "ops/s",
            rows: vec![row(TargetKind::Direct), row(TargetKind::CompatProxy), row(TargetKind::Baseline)],
        };
        assert_eq!(target_order(std::slice::from_ref(&result)), "direct, etcd-compat-proxy, baseline");
        let line = table_row(&result, &result.rows[2], Some(1000.0));
        assert!(line.starts_with("| w | baseline | 1,000 ops/s | 1.00x |"), "{line}");
    }

    #[test]
    fn pass_table_shows_pages_memory_and_the_overhead_against_direct() {
        let pass = |seconds, pages, rss: Option<(u64, u64)>| Measurement {
            ops: 1024,
            elapsed: Duration::from_secs(seconds),
            proxy_cpu: rss.map(|_| Duration::from_secs(2)),
            proxy_rss: rss.map(|(_, peak)| peak),
            pass: Some(crate::workloads::PassDetail {
                pages,
                rss_idle: rss.map(|(idle, _)| idle),
                rss_peak: rss.map(|(_, peak)| peak),
                rss_after: rss.map(|(_, peak)| peak),
                peak_from_hwm: true,
            }),
            ..measurement(1024)
        };
        let result = WorkloadResult {
            name: "paged",
            unit: "MiB/s",
            rows: vec![
                TargetRow { kind: TargetKind::Direct, rounds: vec![pass(8, 17, None)], failure: None },
                TargetRow {
                    kind: TargetKind::GrpcProxy,
                    rounds: Vec::new(),
                    failure: Some("round 1: page 2 | timed out".to_owned()),
                },
                TargetRow {
                    kind: TargetKind::CompatProxy,
                    rounds: vec![pass(10, 261, Some((12 << 20, 15 << 20)))],
                    failure: None,
                },
            ],
        };
        let table = pass_table(&result);
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(
            lines[4],
            "| direct | 8.0 s | 128 | 1.00x | 17 | 500 µs | 2.00 ms | - | 100.00 ms | - | - | - | - | 8.0 s |"
        );
        assert_eq!(lines[5], "| grpc-proxy | FAILED: round 1: page 2 \\| timed out | | | | | | | | | | | | |");
        assert_eq!(
            lines[6],
            "| etcd-compat-proxy | 10.0 s | 102 | 1.25x | 261 | 500 µs | 2.00 ms | 2.00 s | 100.00 ms | 12.0 MiB | 15.0 MiB | +3.0 MiB | 15.0 MiB | 10.0 s, 12.0 -> 15.0 MiB |"
        );
        // +3 MiB is within budget; +30 MiB is flagged.
        assert!(pass_rss_growth(std::slice::from_ref(&result)).is_empty());
        let grown = WorkloadResult {
            rows: vec![TargetRow {
                kind: TargetKind::CompatProxy,
                rounds: vec![pass(10, 261, Some((12 << 20, 42 << 20))), pass(10, 261, Some((42 << 20, 43 << 20)))],
                failure: None,
            }],
            ..result
        };
        assert_eq!(
            pass_rss_growth(&[grown]),
            vec!["paged / etcd-compat-proxy: proxy RSS rose by +30.0 MiB during a pass (round 1: idle 12.0 MiB, peak 42.0 MiB), over the 8.0 MiB a paged read should cost"]
        );
    }

    #[test]
    fn the_cache_off_proxy_is_named_where_any_workload_visits_it() {
        let row = |kind| TargetRow { kind, rounds: vec![measurement(1000)], failure: None };
        let put = WorkloadResult {
            name: "put",
            unit: "ops/s",
            rows: vec![row(TargetKind::Direct), row(TargetKind::CompatProxy)],
        };
        let read = WorkloadResult {
            name: "read",
            unit: "ops/s",
            rows: vec![row(TargetKind::Direct), row(TargetKind::CompatProxy), row(TargetKind::CompatProxyNoCache)],
        };
        assert_eq!(target_order(&[put, read]), "direct, etcd-compat-proxy, etcd-compat-proxy (no cache)");
    }

    #[test]
    fn events_table_shows_what_the_fleet_delivered_beside_its_polls() {
        let fleet = |polls, events| Measurement { events: Some(events), ..measurement(polls) };
        let result = WorkloadResult {
            name: "fleet mixed",
            unit: "ops/s",
            rows: vec![
                TargetRow {
                    kind: TargetKind::CompatProxyNoCache,
                    rounds: vec![fleet(900, 3800), fleet(1000, 3700), fleet(800, 3900)],
                    failure: None,
                },
                TargetRow { kind: TargetKind::GrpcProxy, rounds: Vec::new(), failure: Some("round 1: x".to_owned()) },
            ],
        };
        let table = events_table(&result);
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines[0], "### `fleet mixed`, watch events delivered");
        assert_eq!(
            lines[4],
            "| etcd-compat-proxy (no cache) | 900 ops/s | 2.00 ms | 3,800 | 3,800 | 3,800 / 3,700 / 3,900 |"
        );
        assert_eq!(lines[5], "| grpc-proxy | FAILED: round 1: x | | | | |");
    }

    #[test]
    fn workload_texts_name_the_run_settings() {
        let info = RunInfo {
            watch_rate: 25,
            fleet_agents: 250,
            ..RunInfo::collect(Path::new("/nonexistent"), Path::new("/nonexistent/etcd"), String::new())
        };
        assert_eq!(
            fill("{watch_rate}/s, {watch_rate/10}/s, {fleet_agents} agents on {fleet_conns}", &info),
            "25/s, 2.5/s, 250 agents on 3"
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
