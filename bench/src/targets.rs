//! The targets: one etcd member, `etcd grpc-proxy` and etcd-compat-proxy in front of it, the
//! same etcd-compat-proxy with its serializable-read cache off, and optionally a second
//! etcd-compat-proxy build to compare a change against.
//!
//! Every process is owned by a harness type that kills it when dropped, so nothing outlives
//! the bench, whether it returns, fails or panics.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use etcd_compat_tests::{ClusterSpec, EtcdCluster, EtcdVersion, ProxyProcess};
use tempfile::TempDir;

use crate::workloads::{self, Pids, Workload};

/// etcd's backend quota: 8 GiB, room for the 1 GiB paged-range data and its history.
const ETCD_QUOTA_ARG: &str = "--quota-backend-bytes=8589934592";
/// Turns etcd-compat-proxy's serializable-read cache off, for the target that shows what the
/// cache is worth.
const NO_CACHE_ARGS: [&str; 2] = ["--serializable-cache-bytes", "0"];
/// How long a proxy gets to answer its first gRPC request after its port opened.
const GRPC_READY_TIMEOUT: Duration = Duration::from_secs(20);

/// Which server the load generator talks to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TargetKind {
    /// The etcd member itself.
    Direct,
    /// `etcd grpc-proxy start` (the same etcd 3.4 binary).
    GrpcProxy,
    /// This repository's proxy.
    CompatProxy,
    /// The same build with `--serializable-cache-bytes 0`, only for workloads whose reads the
    /// cache could answer.
    CompatProxyNoCache,
    /// Another build of this repository's proxy (`--baseline-bin`), to measure a change.
    Baseline,
    /// `etcd-compat-h2-floor` (`--h2-floor`): a bare h2 forwarder, what no proxy on h2 can
    /// undercut.
    H2Floor,
}

impl TargetKind {
    /// Every target, in the order each round visits them.
    pub const ALL: [TargetKind; 6] = [
        TargetKind::Direct,
        TargetKind::GrpcProxy,
        TargetKind::CompatProxy,
        TargetKind::CompatProxyNoCache,
        TargetKind::Baseline,
        TargetKind::H2Floor,
    ];

    /// Name used in the table.
    pub fn label(self) -> &'static str {
        match self {
            TargetKind::Direct => "direct",
            TargetKind::GrpcProxy => "grpc-proxy",
            TargetKind::CompatProxy => "etcd-compat-proxy",
            TargetKind::CompatProxyNoCache => "etcd-compat-proxy (no cache)",
            TargetKind::Baseline => "baseline",
            TargetKind::H2Floor => "h2 floor",
        }
    }
}

/// A proxy process plus what it takes to start it again if it dies mid-bench.
struct ManagedProxy {
    kind: TargetKind,
    bin: PathBuf,
    args: Vec<String>,
    process: ProxyProcess,
}

/// The CPU each proxy runs on when the benchmark pins processes (`--pin`).
#[derive(Debug, Clone, Copy)]
pub struct Pinning {
    proxy_cpu: usize,
}

/// Moves this process to CPU 0, for `--pin`; what it starts afterwards (etcd, the load
/// generator's threads) inherits that CPU, and proxies are started on CPU 1.
pub fn pin_to_first_cpu() -> Result<Pinning> {
    let cpus = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    anyhow::ensure!(cpus >= 2, "--pin needs 2 CPUs, this machine offers {cpus}");
    let status = std::process::Command::new("taskset")
        .args(["-a", "-p", "-c", "0", &std::process::id().to_string()])
        .stdout(std::process::Stdio::null())
        .status()
        .context("running taskset (util-linux) for --pin")?;
    anyhow::ensure!(status.success(), "taskset could not move the benchmark to CPU 0: {status}");
    Ok(Pinning { proxy_cpu: 1 })
}

impl ManagedProxy {
    fn start(kind: TargetKind, bin: &Path, args: Vec<String>, pinning: Option<Pinning>) -> Result<ManagedProxy> {
        // Pinned, the proxy runs under `taskset -c 1`, which execs it: the pid stays the proxy's.
        let (bin, args) = match pinning {
            Some(pinning) => {
                let mut wrapped = vec!["-c".to_owned(), pinning.proxy_cpu.to_string(), bin.display().to_string()];
                wrapped.extend(args);
                (Path::new("taskset"), wrapped)
            }
            None => (bin, args),
        };
        let process = ProxyProcess::start(bin, args.clone())
            .with_context(|| format!("starting {} ({} {})", kind.label(), bin.display(), args.join(" ")))?;
        Ok(ManagedProxy { kind, bin: bin.to_path_buf(), args, process })
    }

    /// Starts the proxy again if it exited; returns a description of what happened if so.
    fn ensure_running(&mut self) -> Result<Option<String>> {
        // A zero timeout makes wait_exit a non-blocking "has it exited?" check.
        let Ok(status) = self.process.wait_exit(Duration::ZERO) else {
            return Ok(None);
        };
        let tail = last_lines(&self.process.log_contents(), 5);
        let replacement = ProxyProcess::start(&self.bin, self.args.clone())
            .with_context(|| format!("restarting {} after it exited with {status}", self.kind.label()))?;
        self.process = replacement;
        Ok(Some(format!("{} had exited ({status}) and was restarted; its log ended with: {}", self.kind.label(), tail)))
    }
}

/// The etcd member and the proxies in front of it.
pub struct Targets {
    // Proxies are declared first so they are dropped (killed) before etcd.
    grpc_proxy: ManagedProxy,
    compat_proxy: ManagedProxy,
    compat_no_cache: Option<ManagedProxy>,
    baseline: Option<ManagedProxy>,
    h2_floor: Option<ManagedProxy>,
    cluster: EtcdCluster,
    /// `--data-dir` of grpc-proxy, so it never writes into the working directory.
    _grpc_proxy_dir: TempDir,
}

impl Targets {
    /// Starts etcd 3.4 (one member) and the proxies, the cache-off one only if `no_cache`;
    /// blocks until each accepts connections.
    pub fn start(
        compat_proxy_bin: &Path,
        baseline_bin: Option<&Path>,
        h2_floor_bin: Option<&Path>,
        no_cache: bool,
        pinning: Option<Pinning>,
    ) -> Result<Targets> {
        // The opt-in 1 GiB workload would come close to etcd's default 2 GiB backend quota (and
        // raise a NOSPACE alarm with history); the quota is only a limit, nothing is allocated
        // for it, so every run gets the 8 GiB etcd documents as its recommended maximum.
        let spec = ClusterSpec::new(EtcdVersion::V3_4, 1).with_extra_args([ETCD_QUOTA_ARG]);
        let cluster = EtcdCluster::start(spec).context("starting the etcd 3.4 member")?;
        let member = cluster.client_addrs()[0].to_string();
        let etcd_bin = EtcdVersion::V3_4.etcd_bin();

        let grpc_proxy_dir = tempfile::Builder::new()
            .prefix("etcd-compat-bench-grpc-proxy-")
            .tempdir()
            .context("creating a temp dir")?;
        let grpc_proxy = ManagedProxy::start(
            TargetKind::GrpcProxy,
            &etcd_bin,
            vec![
                "grpc-proxy".to_owned(),
                "start".to_owned(),
                format!("--endpoints={member}"),
                format!("--data-dir={}", grpc_proxy_dir.path().display()),
            ],
            pinning,
        )?;
        let compat_args = vec!["start".to_owned(), format!("--endpoints={member}")];
        let compat_proxy =
            ManagedProxy::start(TargetKind::CompatProxy, compat_proxy_bin, compat_args.clone(), pinning)?;
        let compat_no_cache = no_cache
            .then(|| {
                let mut args = compat_args.clone();
                args.extend(NO_CACHE_ARGS.map(str::to_owned));
                ManagedProxy::start(TargetKind::CompatProxyNoCache, compat_proxy_bin, args, pinning)
            })
            .transpose()?;
        // The baseline keeps its own defaults: a build older than the cache has no flag for it.
        let baseline = baseline_bin
            .map(|bin| ManagedProxy::start(TargetKind::Baseline, bin, compat_args.clone(), pinning))
            .transpose()?;
        let h2_floor =
            h2_floor_bin.map(|bin| ManagedProxy::start(TargetKind::H2Floor, bin, compat_args, pinning)).transpose()?;
        Ok(Targets {
            grpc_proxy,
            compat_proxy,
            compat_no_cache,
            baseline,
            h2_floor,
            cluster,
            _grpc_proxy_dir: grpc_proxy_dir,
        })
    }

    /// Data directory of the etcd member.
    pub fn etcd_data_dir(&self) -> PathBuf {
        self.cluster.member(0).data_dir
    }

    /// Client URL of the etcd member.
    pub fn etcd_endpoint(&self) -> String {
        self.cluster.client_urls()[0].clone()
    }

    fn proxy(&mut self, kind: TargetKind) -> Option<&mut ManagedProxy> {
        match kind {
            TargetKind::Direct => None,
            TargetKind::GrpcProxy => Some(&mut self.grpc_proxy),
            TargetKind::CompatProxy => Some(&mut self.compat_proxy),
            TargetKind::CompatProxyNoCache => self.compat_no_cache.as_mut(),
            TargetKind::Baseline => self.baseline.as_mut(),
            TargetKind::H2Floor => self.h2_floor.as_mut(),
        }
    }

    /// The targets of this run, in the order each round visits them.
    pub fn kinds(&self) -> Vec<TargetKind> {
        TargetKind::ALL
            .into_iter()
            .filter(|&kind| match kind {
                TargetKind::Direct | TargetKind::GrpcProxy | TargetKind::CompatProxy => true,
                TargetKind::CompatProxyNoCache => self.compat_no_cache.is_some(),
                TargetKind::Baseline => self.baseline.is_some(),
                TargetKind::H2Floor => self.h2_floor.is_some(),
            })
            .collect()
    }

    /// The targets `workload` visits: the cache-off proxy only where the cache could answer, as
    /// elsewhere it would be the same proxy measured twice, at the cost of a longer run.
    pub fn kinds_for(&self, workload: &Workload) -> Vec<TargetKind> {
        let serializable = workload.reads_serializably();
        self.kinds().into_iter().filter(|&kind| kind != TargetKind::CompatProxyNoCache || serializable).collect()
    }

    /// Checks that etcd still runs (fatal if not) and restarts the proxy of `kind` if it died;
    /// returns the target's endpoint, the pids to sample and a note about any restart.
    pub async fn prepare(&mut self, kind: TargetKind) -> Result<(String, Pids, Option<String>)> {
        if !self.cluster.is_running(0) {
            bail!("the etcd member exited; its log:\n{}", self.cluster.log_contents(0));
        }
        let etcd = self.cluster.member(0).pid.ok_or_else(|| anyhow!("the etcd member has no pid"))?;
        let Some(proxy) = self.proxy(kind) else {
            return Ok((self.etcd_endpoint(), Pids { etcd, proxy: None }, None));
        };
        // Starting a proxy polls with blocking sleeps; keep them off the async workers.
        let note = tokio::task::block_in_place(|| proxy.ensure_running())?;
        let endpoint = proxy.process.endpoint();
        let pids = Pids { etcd, proxy: Some(proxy.process.pid()) };
        if note.is_some() {
            wait_grpc_ready(kind, &endpoint).await?;
        }
        Ok((endpoint, pids, note))
    }

    /// Waits until every proxy answers a real Range, not just accept TCP.
    pub async fn wait_ready(&mut self) -> Result<()> {
        for kind in self.kinds().into_iter().filter(|&kind| kind != TargetKind::Direct) {
            let (endpoint, _, _) = self.prepare(kind).await?;
            wait_grpc_ready(kind, &endpoint).await?;
        }
        Ok(())
    }

    /// The last warnings or errors a proxy logged, for failure messages: its log directory is
    /// deleted when the bench exits, so a path would point nowhere, and routine info lines would
    /// only bury the message. Empty for the direct target or a proxy that logged no problem.
    pub fn log_problems(&mut self, kind: TargetKind) -> String {
        let Some(proxy) = self.proxy(kind) else {
            return String::new();
        };
        let log = proxy.process.log_contents();
        let problems: Vec<&str> = log
            .lines()
            .filter(|line| {
                let lower = line.to_ascii_lowercase();
                ["warn", "error", "panic", "fatal"].iter().any(|word| lower.contains(word))
            })
            .collect();
        last_lines(&problems.join("\n"), 3)
    }
}

/// The last `count` non-empty lines of `text`, joined with " / " to fit in one table note.
fn last_lines(text: &str, count: usize) -> String {
    let lines: Vec<&str> = text.lines().filter(|line| !line.trim().is_empty()).collect();
    lines[lines.len().saturating_sub(count)..].join(" / ")
}

async fn wait_grpc_ready(kind: TargetKind, endpoint: &str) -> Result<()> {
    let deadline = Instant::now() + GRPC_READY_TIMEOUT;
    loop {
        let attempt = async {
            let client = workloads::connect(endpoint).await?;
            client.kv_client().get("bench/ready", None).await.context("Range")?;
            anyhow::Ok(())
        };
        let error = match tokio::time::timeout(Duration::from_secs(2), attempt).await {
            Ok(Ok(())) => return Ok(()),
            Ok(Err(error)) => error,
            Err(_) => anyhow!("no answer within 2 s"),
        };
        if Instant::now() >= deadline {
            return Err(
                error.context(format!("{} at {endpoint} not serving within {GRPC_READY_TIMEOUT:?}", kind.label()))
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
