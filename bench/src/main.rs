//! etcd-compat-bench: one etcd 3.4 member measured directly, through `etcd grpc-proxy` and
//! through etcd-compat-proxy, in one run. Targets alternate within every round so that the
//! noise of a shared machine lands on all of them alike, and the report compares them by ratio.

mod procfs;
mod report;
mod stats;
mod targets;
mod workloads;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, ensure, Context, Result};
use clap::Parser;
use etcd_compat_tests::{workspace_root, EtcdVersion};

use crate::report::{RunInfo, TargetRow, WorkloadResult};
use crate::stats::{format_latency, format_mib, format_rate};
use crate::targets::Targets;
use crate::workloads::{RunContext, Workload};

/// Set by scripts/bench.sh to the command the user typed, for the report.
const INVOCATION_ENV: &str = "BENCH_INVOCATION";
/// The bare h2 forwarder of `--h2-floor`, a binary of this package.
const H2_FLOOR_BIN: &str = "etcd-compat-h2-floor";

/// Command line of the benchmark.
#[derive(Debug, Parser)]
#[command(
    name = "etcd-compat-bench",
    about = "Benchmarks etcd 3.4 directly, through etcd grpc-proxy and through etcd-compat-proxy in one run"
)]
struct Args {
    /// Measured rounds per workload and target; the report shows the median round.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Length of each measured window, in seconds.
    #[arg(long, default_value_t = 5.0)]
    seconds: f64,
    /// Load applied before each window opens, in seconds.
    #[arg(long, default_value_t = 1.0)]
    warmup: f64,
    /// Only run workloads whose name contains this text (repeatable). Opt-in workloads
    /// (`range 1GiB paged`) are matched only by text that matches no regular workload, e.g.
    /// `--only 1GiB`; `--only range` leaves them out unless --big is given too.
    #[arg(long, value_name = "SUBSTRING")]
    only: Vec<String>,
    /// Also run the opt-in workloads: `range 1GiB paged` loads 1 GiB into etcd first (~30 s,
    /// then ~20 s per round; etcd's database and WAL then take ~2 GiB more on tmpfs).
    #[arg(long)]
    big: bool,
    /// Smoke run: 1 round, 1 s windows, 0.5 s warm-up (overrides --rounds, --seconds, --warmup).
    #[arg(long)]
    quick: bool,
    /// Puts per second of the watch workloads' writer (the 10000-watcher ones Put a tenth as often).
    #[arg(long, default_value_t = 100)]
    watch_rate: u32,
    /// Agents of `fleet mixed`, 100 to a connection.
    #[arg(long, default_value_t = 200)]
    fleet_agents: usize,
    /// Where to write the markdown report [default: <workspace>/bench/RESULTS.md].
    #[arg(long, value_name = "FILE")]
    output: Option<PathBuf>,
    /// The etcd-compat-proxy binary [default: next to this binary].
    #[arg(long, value_name = "FILE")]
    proxy_bin: Option<PathBuf>,
    /// Another etcd-compat-proxy binary (e.g. main's build) measured as target `baseline` in
    /// the same rounds, so a change is compared under the same machine load.
    #[arg(long, value_name = "FILE")]
    baseline_bin: Option<PathBuf>,
    /// Also measure the h2 floor (`etcd-compat-h2-floor`, built next to this binary): a bare
    /// forwarder on the same h2 crate and settings as the proxy, with nothing else in it, so the
    /// report shows what of the proxy's cost is its own and what any h2 forwarder pays.
    #[arg(long)]
    h2_floor: bool,
    /// Give each proxy a core of its own, as a sidecar has: etcd and the load generator run on
    /// CPU 0 (for every target, direct included), each proxy on CPU 1. The report goes to
    /// bench/RESULTS-pinned.md unless --output says otherwise. Needs 2 CPUs and `taskset`.
    #[arg(long)]
    pin: bool,
}

/// Timing of every run, after --quick is applied.
struct Settings {
    rounds: usize,
    warmup: Duration,
    window: Duration,
    watch_rate: u32,
    fleet_agents: usize,
}

impl Settings {
    fn from_args(args: &Args) -> Result<Settings> {
        let (rounds, seconds, warmup) =
            if args.quick { (1, 1.0, 0.5) } else { (args.rounds, args.seconds, args.warmup) };
        ensure!(rounds >= 1, "--rounds must be at least 1");
        ensure!(seconds > 0.0 && seconds.is_finite(), "--seconds must be positive");
        ensure!(warmup >= 0.0 && warmup.is_finite(), "--warmup must not be negative");
        ensure!(args.watch_rate >= 1, "--watch-rate must be at least 1");
        ensure!(args.fleet_agents >= 1, "--fleet-agents must be at least 1");
        Ok(Settings {
            rounds,
            warmup: Duration::from_secs_f64(warmup),
            window: Duration::from_secs_f64(seconds),
            watch_rate: args.watch_rate,
            fleet_agents: args.fleet_agents,
        })
    }
}

fn main() -> ExitCode {
    match run(Args::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("etcd-compat-bench: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: Args) -> Result<()> {
    let settings = Settings::from_args(&args)?;
    let selected = select_workloads(&args.only, args.big)?;
    let proxy_bin = match &args.proxy_bin {
        Some(path) => path.clone(),
        None => std::env::current_exe().context("locating this binary")?.with_file_name("etcd-compat-proxy"),
    };
    ensure!(
        proxy_bin.is_file(),
        "{} not found: build it (cargo build --release -p etcd-compat-proxy) or pass --proxy-bin",
        proxy_bin.display()
    );
    if let Some(baseline) = &args.baseline_bin {
        ensure!(baseline.is_file(), "--baseline-bin {}: no such file", baseline.display());
    }
    let h2_floor_bin = if args.h2_floor {
        let bin = std::env::current_exe().context("locating this binary")?.with_file_name(H2_FLOOR_BIN);
        ensure!(
            bin.is_file(),
            "--h2-floor: {} not found: build it with cargo build --release -p etcd-compat-bench",
            bin.display()
        );
        Some(bin)
    } else {
        None
    };
    if cfg!(debug_assertions) {
        eprintln!("warning: this is a debug build of the load generator; scripts/bench.sh builds --release");
    }
    let workspace = workspace_root();
    let report_name = if args.pin { "RESULTS-pinned.md" } else { "RESULTS.md" };
    let output = args.output.clone().unwrap_or_else(|| workspace.join("bench").join(report_name));
    let command = std::env::var(INVOCATION_ENV).unwrap_or_else(|_| std::env::args().collect::<Vec<_>>().join(" "));
    let mut info = RunInfo {
        rounds: settings.rounds,
        warmup: settings.warmup,
        window: settings.window,
        watch_rate: settings.watch_rate,
        fleet_agents: settings.fleet_agents,
        pinned: args.pin,
        ..RunInfo::collect(&workspace, &EtcdVersion::V3_4.etcd_bin(), command)
    };
    // After the machine's CPUs were counted, before any thread or process starts: they inherit
    // this process's CPU.
    let pinning = if args.pin { Some(targets::pin_to_first_cpu()?) } else { None };

    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().context("starting tokio")?;
    eprintln!("starting etcd {} and the proxies", info.etcd_version);
    // The cache-off proxy is a process more, so it runs only when something would visit it.
    let no_cache = selected.iter().any(Workload::reads_serializably);
    let mut targets =
        Targets::start(&proxy_bin, args.baseline_bin.as_deref(), h2_floor_bin.as_deref(), no_cache, pinning)?;
    let data_dir = targets.etcd_data_dir();
    let medium = if data_dir.starts_with("/dev/shm") { "tmpfs" } else { "disk" };
    info.etcd_data_dir = format!("on {medium} ({})", data_dir.display());
    let started = Instant::now();
    let outcome = runtime.block_on(async {
        tokio::select! {
            outcome = bench(&mut targets, &selected, &settings) => outcome,
            signal = interrupted() => Err(anyhow!("interrupted by {signal}")),
        }
    });
    // Connections and tasks go before the processes they talk to.
    drop(runtime);
    drop(targets);
    let (results, notes, data) = outcome?;
    info.data = data;

    let markdown = report::render(&info, &selected, &results, &notes, started.elapsed());
    println!("{markdown}");
    std::fs::write(&output, &markdown).with_context(|| format!("writing {}", output.display()))?;
    eprintln!("wrote {}", output.display());
    Ok(())
}

fn select_workloads(only: &[String], big: bool) -> Result<Vec<Workload>> {
    let all = workloads::all();
    let regular: Vec<&'static str> =
        all.iter().filter(|workload| !workload.opt_in).map(|workload| workload.name).collect();
    let names: Vec<String> = all
        .iter()
        .map(|workload| if workload.opt_in { format!("{} (opt-in)", workload.name) } else { workload.name.to_owned() })
        .collect();
    let named = |name: &str| only.is_empty() || only.iter().any(|text| name.contains(text.as_str()));
    // An opt-in workload costs minutes of loading, so a broad `--only range` must not pull it
    // in: without --big it needs a text that names it and no regular workload.
    let named_alone = |name: &str| {
        only.iter().any(|text| name.contains(text.as_str()) && !regular.iter().any(|r| r.contains(text.as_str())))
    };
    let selected: Vec<Workload> = all
        .into_iter()
        .filter(|workload| if workload.opt_in && !big { named_alone(workload.name) } else { named(workload.name) })
        .collect();
    if selected.is_empty() {
        bail!("--only {only:?} matches no workload; the workloads are: {}", names.join(", "));
    }
    Ok(selected)
}

/// Runs every selected workload: round by round, each round visiting every target in turn.
async fn bench(
    targets: &mut Targets,
    selected: &[Workload],
    settings: &Settings,
) -> Result<(Vec<WorkloadResult>, Vec<String>, Vec<String>)> {
    let control = workloads::connect(&targets.etcd_endpoint()).await?;
    workloads::populate(&control).await?;
    let mut data = Vec::new();
    // Only when selected: loading takes a while and leaves etcd gigabytes larger.
    if selected.iter().any(|workload| workload.needs_huge_data()) {
        eprintln!("loading 1 GiB for the paged range workload");
        let loaded = workloads::populate_huge(&control).await?;
        eprintln!("  {loaded}");
        data.push(loaded);
    }
    targets.wait_ready().await?;
    let mut compacted = 0;
    workloads::compact(&control, &mut compacted).await?;

    let mut results = Vec::new();
    let mut notes = Vec::new();
    for workload in selected {
        let mut rows: Vec<TargetRow> = targets.kinds_for(workload).into_iter().map(TargetRow::new).collect();
        for round in 1..=settings.rounds {
            for row in rows.iter_mut().filter(|row| row.failure.is_none()) {
                let label = row.kind.label();
                let (endpoint, pids, restarted) = targets.prepare(row.kind).await?;
                if let Some(note) = restarted {
                    eprintln!("  {note}");
                    notes.push(format!("before round {round} of `{}`: {note}", workload.name));
                }
                let ctx = RunContext {
                    endpoint,
                    control: control.clone(),
                    pids,
                    warmup: settings.warmup,
                    window: settings.window,
                    watch_rate: settings.watch_rate,
                    fleet_agents: settings.fleet_agents,
                };
                let prefix = format!("[{}] round {round}/{} {label}", workload.name, settings.rounds);
                match workloads::run(workload, &ctx).await {
                    Ok(measurement) => {
                        let latency = |value: Option<Duration>| value.map_or_else(|| "-".to_owned(), format_latency);
                        eprintln!(
                            "{prefix}: {} {} (p50 {}, p99 {})",
                            format_rate(measurement.throughput()),
                            workload.unit,
                            latency(measurement.p50),
                            latency(measurement.p99)
                        );
                        if let Some(events) = measurement.events {
                            eprintln!(
                                "{prefix}: {} watch events delivered ({} events/s)",
                                format_rate(events as f64),
                                format_rate(events as f64 / measurement.elapsed.as_secs_f64())
                            );
                        }
                        if let Some(pass) = &measurement.pass {
                            let mib = |value: Option<u64>| value.map_or_else(|| "-".to_owned(), format_mib);
                            eprintln!(
                                "{prefix}: {} pages in {:.1} s, proxy RSS idle {} peak {} after {}",
                                pass.pages,
                                measurement.elapsed.as_secs_f64(),
                                mib(pass.rss_idle),
                                mib(pass.rss_peak),
                                mib(pass.rss_after)
                            );
                        }
                        row.rounds.push(measurement);
                    }
                    Err(error) => {
                        let problems = targets.log_problems(row.kind);
                        let message = if problems.is_empty() {
                            format!("round {round}: {error:#}")
                        } else {
                            format!("round {round}: {error:#} [last problems in the {label} log: {problems}]")
                        };
                        eprintln!("{prefix}: FAILED: {message}");
                        row.failure = Some(message);
                    }
                }
                workloads::compact(&control, &mut compacted).await?;
            }
        }
        results.push(WorkloadResult { name: workload.name, unit: workload.unit, rows });
    }
    Ok((results, notes, data))
}

/// Resolves on SIGINT, SIGTERM or SIGHUP, so that the processes are still killed on the way out.
async fn interrupted() -> &'static str {
    use tokio::signal::unix::{signal, SignalKind};
    match (signal(SignalKind::interrupt()), signal(SignalKind::terminate()), signal(SignalKind::hangup())) {
        (Ok(mut interrupt), Ok(mut terminate), Ok(mut hangup)) => tokio::select! {
            _ = interrupt.recv() => "SIGINT",
            _ = terminate.recv() => "SIGTERM",
            _ = hangup.recv() => "SIGHUP",
        },
        // Without handlers the default actions apply; the bench then cannot clean up itself.
        _ => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(only: &[&str], big: bool) -> Vec<&'static str> {
        let only: Vec<String> = only.iter().map(|text| text.to_string()).collect();
        select_workloads(&only, big).unwrap().iter().map(|workload| workload.name).collect()
    }

    #[test]
    fn opt_in_workloads_run_only_when_asked_for() {
        let big = "range 1GiB paged";
        assert!(!names(&[], false).contains(&big));
        assert!(names(&[], true).contains(&big));
        // A broad text keeps a run quick unless --big says otherwise.
        assert!(!names(&["range"], false).contains(&big));
        assert!(names(&["range"], false).contains(&"range 3.5MiB"));
        assert!(names(&["range"], true).contains(&big));
        assert_eq!(names(&["1GiB"], false), vec![big]);
        assert_eq!(names(&["range 1GiB"], false), vec![big]);
        assert_eq!(
            names(&["watch", "paged"], false),
            vec![
                "watch fanout 100 key",
                "watch fanout 1000 key",
                "watch fanout 1000 prefix",
                "watch fanout 10000 key",
                "watch fanout 10000 prefix",
                big
            ]
        );
        assert!(select_workloads(&["nothing".to_owned()], true).is_err());
    }

    #[test]
    fn watch_families_and_the_fleet_are_selected_by_name() {
        assert_eq!(names(&["prefix"], false), vec!["watch fanout 1000 prefix", "watch fanout 10000 prefix"]);
        assert_eq!(names(&["10000"], false), vec!["watch fanout 10000 key", "watch fanout 10000 prefix"]);
        assert_eq!(names(&["fleet"], false), vec!["fleet mixed"]);
    }

    #[test]
    fn only_serializable_reads_visit_the_cache_off_proxy() {
        let serializable: Vec<&str> =
            workloads::all().into_iter().filter(Workload::reads_serializably).map(|workload| workload.name).collect();
        assert_eq!(serializable, vec!["range 1key serializable", "fleet mixed"]);
    }
}
