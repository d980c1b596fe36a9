use std::fs::{File, OpenOptions};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail, Context};
use etcd_compat_certs::DevPki;
use tempfile::TempDir;

use crate::etcdctl::{etcdctl_command, ClientTls};
use crate::logs::{file_tail, read_lossy};
use crate::ports::free_port;
use crate::EtcdVersion;

/// Largest cluster [`EtcdCluster::start`] accepts.
pub const MAX_MEMBERS: usize = 5;

/// How long a (re)started member gets to serve and see a leader.
const READY_TIMEOUT: Duration = Duration::from_secs(20);
/// Whole-cluster start attempts when another process grabbed one of the chosen ports.
const START_ATTEMPTS: usize = 3;
const POLL_INTERVAL: Duration = Duration::from_millis(50);
const STOP_TIMEOUT: Duration = Duration::from_secs(10);
/// Readiness probes must fail fast so the poll loop can notice a crashed member.
const PROBE_TIMEOUT_ARGS: [&str; 2] = ["--dial-timeout=1s", "--command-timeout=2s"];

/// Raft timing for tests: fast elections, yet a heartbeat miss needs ten skipped
/// heartbeats, which a loaded 2-core machine running parallel tests does not produce.
const RAFT_TIMING_ARGS: [&str; 4] =
    ["--heartbeat-interval=100", "--election-timeout=1000", "--logger=zap", "--log-level=info"];

/// Server-side TLS for every member: client URLs become https:// with client
/// certificate authentication, and peers talk mutual TLS.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsSpec {
    /// Certificate members serve to clients.
    pub server_cert: PathBuf,
    /// Private key of `server_cert`.
    pub server_key: PathBuf,
    /// CA that client and peer certificates must chain to.
    pub trusted_ca: PathBuf,
    /// Certificate members present to each other (needs serverAuth and clientAuth).
    pub peer_cert: PathBuf,
    /// Private key of `peer_cert`.
    pub peer_key: PathBuf,
    /// What the harness itself presents for readiness probes and the etcdctl helpers.
    pub client: ClientTls,
}

impl TlsSpec {
    /// Server, peer and client material of a dev PKI, all trusting its CA.
    pub fn from_dev_pki(pki: &DevPki) -> TlsSpec {
        TlsSpec {
            server_cert: pki.server_cert.clone(),
            server_key: pki.server_key.clone(),
            trusted_ca: pki.ca_cert.clone(),
            peer_cert: pki.peer_cert.clone(),
            peer_key: pki.peer_key.clone(),
            client: ClientTls::from_dev_pki(pki),
        }
    }
}

/// What [`EtcdCluster::start`] should run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterSpec {
    /// etcd release line of every member.
    pub version: EtcdVersion,
    /// Member count, 1..=[`MAX_MEMBERS`].
    pub members: usize,
    /// TLS for client and peer traffic; `None` means plain http://.
    pub tls: Option<TlsSpec>,
    /// Appended to every member's command line; etcd keeps the last occurrence of a
    /// flag, so these can override the harness defaults.
    pub extra_args: Vec<String>,
    /// A snapshot every member's data directory is restored from (with etcd 3.5's `etcdutl`)
    /// before its first start; `None` starts an empty cluster.
    pub restore_from: Option<PathBuf>,
    /// `USER:PASSWORD` for the readiness probes, for a cluster that starts with auth on (one
    /// restored from a snapshot of such a cluster).
    pub probe_user: Option<String>,
}

impl ClusterSpec {
    /// A plain-http cluster of `members` members without extra flags.
    pub fn new(version: EtcdVersion, members: usize) -> ClusterSpec {
        ClusterSpec { version, members, tls: None, extra_args: Vec::new(), restore_from: None, probe_user: None }
    }

    /// The same spec, with readiness probes made as `user` (`USER:PASSWORD`).
    pub fn with_probe_user(mut self, user: &str) -> ClusterSpec {
        self.probe_user = Some(user.to_owned());
        self
    }

    /// The same spec, with every member seeded from `snapshot` (as a cluster moved to new
    /// machines is: same data and revisions, new members and cluster id).
    pub fn restored_from(mut self, snapshot: &Path) -> ClusterSpec {
        self.restore_from = Some(snapshot.to_path_buf());
        self
    }

    /// The same spec with TLS on.
    pub fn with_tls(mut self, tls: TlsSpec) -> ClusterSpec {
        self.tls = Some(tls);
        self
    }

    /// The same spec with `args` appended to every member's command line.
    pub fn with_extra_args<I, S>(mut self, args: I) -> ClusterSpec
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.extra_args.extend(args.into_iter().map(Into::into));
        self
    }
}

/// A snapshot of one member's identity and state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemberInfo {
    /// Position in the cluster, as used by [`EtcdCluster::kill`] and friends.
    pub index: usize,
    /// etcd member name (`m0`, `m1`, ...).
    pub name: String,
    /// Client URL, e.g. `http://127.0.0.1:40123`.
    pub client_url: String,
    /// Peer URL, e.g. `http://127.0.0.1:40124`.
    pub peer_url: String,
    /// OS process id while the member runs.
    pub pid: Option<u32>,
    /// Raft member id, learned once the cluster first became ready.
    pub member_id: Option<u64>,
    /// Data directory, kept across [`EtcdCluster::restart`].
    pub data_dir: PathBuf,
    /// The member's log (stdout and stderr of every run, appended).
    pub log_path: PathBuf,
}

struct Member {
    name: String,
    client_port: u16,
    peer_port: u16,
    data_dir: PathBuf,
    log_path: PathBuf,
    process: Option<Child>,
    member_id: Option<u64>,
    /// The etcd release this member runs: the cluster's, until [`EtcdCluster::upgrade`].
    version: EtcdVersion,
    /// Added with `member add` after the cluster started: its first run joins an existing cluster.
    joined_later: bool,
    /// Added as a learner and not promoted through [`EtcdCluster::mark_promoted`]: kept out of
    /// the endpoints the etcdctl helpers use, since learners refuse most requests.
    learner: bool,
}

/// A running etcd cluster on loopback. Dropping it kills every member and deletes the
/// data; when dropped during a panic the logs are kept and their location printed.
pub struct EtcdCluster {
    spec: ClusterSpec,
    members: Vec<Member>,
    /// Held only so that dropping the cluster deletes the data directories.
    _data_root: TempDir,
    log_root: TempDir,
    startup_time: Duration,
}

impl EtcdCluster {
    /// Starts a fresh cluster and waits (up to 20 s) until every member serves and
    /// agrees on a leader. Retries with new ports if another process took one first.
    pub fn start(spec: ClusterSpec) -> anyhow::Result<EtcdCluster> {
        if !(1..=MAX_MEMBERS).contains(&spec.members) {
            bail!("a test cluster has 1..={MAX_MEMBERS} members, not {}", spec.members);
        }
        // Resolving the binaries first installs or rejects them before anything is
        // spawned or created on disk.
        spec.version.etcd_bin();
        spec.version.etcdctl_bin();
        let began = Instant::now();
        let mut attempt = 1;
        loop {
            let mut cluster = EtcdCluster::prepare(spec.clone())?;
            match cluster.boot() {
                Ok(()) => {
                    cluster.startup_time = began.elapsed();
                    return Ok(cluster);
                }
                Err(error) if attempt < START_ATTEMPTS && cluster.lost_port_race() => {
                    let summary = error.to_string();
                    eprintln!(
                        "etcd {} cluster start attempt {attempt} lost a port race, retrying: {}",
                        spec.version,
                        summary.lines().next().unwrap_or("")
                    );
                    attempt += 1;
                }
                Err(error) => return Err(error),
            }
        }
    }

    fn prepare(spec: ClusterSpec) -> anyhow::Result<EtcdCluster> {
        let data_root = data_tempdir()?;
        let log_root = tempfile::Builder::new()
            .prefix("etcd-compat-logs-")
            .tempdir()
            .context("creating the etcd log directory")?;
        let mut members = Vec::with_capacity(spec.members);
        for index in 0..spec.members {
            let name = format!("m{index}");
            members.push(Member {
                data_dir: data_root.path().join(&name),
                log_path: log_root.path().join(format!("{name}.log")),
                name,
                client_port: free_port().context("picking a client port")?,
                peer_port: free_port().context("picking a peer port")?,
                process: None,
                member_id: None,
                version: spec.version,
                joined_later: false,
                learner: false,
            });
        }
        Ok(EtcdCluster { spec, members, _data_root: data_root, log_root, startup_time: Duration::ZERO })
    }

    fn boot(&mut self) -> anyhow::Result<()> {
        let cluster_token = unique_cluster_token();
        if let Some(snapshot) = self.spec.restore_from.clone() {
            self.restore(&snapshot, &cluster_token)?;
        }
        for index in 0..self.members.len() {
            self.spawn_member(index, Some(&cluster_token))?;
        }
        let everyone: Vec<usize> = (0..self.members.len()).collect();
        self.wait_ready(&everyone)
    }

    /// `--initial-cluster`: every member's name and peer URL.
    fn initial_cluster(&self) -> String {
        let scheme = self.scheme();
        self.members
            .iter()
            .map(|member| format!("{}={scheme}://127.0.0.1:{}", member.name, member.peer_port))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Restores every member's data directory from `snapshot` with etcd 3.5's `etcdutl`.
    fn restore(&self, snapshot: &Path, cluster_token: &str) -> anyhow::Result<()> {
        let etcdutl = EtcdVersion::V3_5.etcdutl_bin();
        let scheme = self.scheme();
        let initial_cluster = self.initial_cluster();
        for member in &self.members {
            let output = Command::new(&etcdutl)
                .arg("snapshot")
                .arg("restore")
                .arg(snapshot)
                .arg(format!("--name={}", member.name))
                .arg(format!("--data-dir={}", member.data_dir.display()))
                .arg(format!("--initial-cluster={initial_cluster}"))
                .arg(format!("--initial-cluster-token={cluster_token}"))
                .arg(format!("--initial-advertise-peer-urls={scheme}://127.0.0.1:{}", member.peer_port))
                .output()
                .with_context(|| format!("running {}", etcdutl.display()))?;
            if !output.status.success() {
                bail!(
                    "etcdutl snapshot restore {} for {} failed: {}",
                    snapshot.display(),
                    member.name,
                    String::from_utf8_lossy(&output.stderr)
                );
            }
        }
        Ok(())
    }

    /// `cluster_token` is set for the first run only; on restart etcd takes the cluster
    /// from the data directory and ignores the initial-cluster flags anyway.
    fn spawn_member(&mut self, index: usize, cluster_token: Option<&str>) -> anyhow::Result<()> {
        let etcd = self.members[index].version.etcd_bin();
        let scheme = self.scheme();
        let initial_cluster = self.initial_cluster();
        let member = &self.members[index];
        let client_url = format!("{scheme}://127.0.0.1:{}", member.client_port);
        let peer_url = format!("{scheme}://127.0.0.1:{}", member.peer_port);

        let mut command = Command::new(&etcd);
        // etcd reads ETCD_* variables as flags, and ETCD_3_x_DIR would be one of them.
        for (name, _) in std::env::vars_os() {
            if name.to_string_lossy().starts_with("ETCD") {
                command.env_remove(name);
            }
        }
        command
            .arg(format!("--name={}", member.name))
            .arg(format!("--data-dir={}", member.data_dir.display()))
            .arg(format!("--listen-client-urls={client_url}"))
            .arg(format!("--advertise-client-urls={client_url}"))
            .arg(format!("--listen-peer-urls={peer_url}"))
            .arg(format!("--initial-advertise-peer-urls={peer_url}"))
            .arg(format!("--initial-cluster={initial_cluster}"))
            .args(RAFT_TIMING_ARGS);
        if let Some(token) = cluster_token {
            command.arg("--initial-cluster-state=new").arg(format!("--initial-cluster-token={token}"));
        } else if member.joined_later && !member.data_dir.exists() {
            command.arg("--initial-cluster-state=existing");
        }
        if let Some(tls) = &self.spec.tls {
            command
                .arg(format!("--cert-file={}", tls.server_cert.display()))
                .arg(format!("--key-file={}", tls.server_key.display()))
                .arg(format!("--trusted-ca-file={}", tls.trusted_ca.display()))
                .arg("--client-cert-auth=true")
                .arg(format!("--peer-cert-file={}", tls.peer_cert.display()))
                .arg(format!("--peer-key-file={}", tls.peer_key.display()))
                .arg(format!("--peer-trusted-ca-file={}", tls.trusted_ca.display()))
                .arg("--peer-client-cert-auth=true");
        }
        command.args(&self.spec.extra_args);

        let log = open_append(&member.log_path)?;
        let log_for_stderr = log.try_clone().with_context(|| format!("duplicating {}", member.log_path.display()))?;
        command.stdin(Stdio::null()).stdout(log).stderr(log_for_stderr);
        let child = command.spawn().with_context(|| format!("spawning {}", etcd.display()))?;
        self.members[index].process = Some(child);
        Ok(())
    }

    /// Waits until each member in `indices` answers, all of them name the same leader,
    /// and a quorum read through them succeeds.
    fn wait_ready(&mut self, indices: &[usize]) -> anyhow::Result<()> {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            for &index in indices {
                if let Some(status) = self.reap_if_exited(index)? {
                    bail!(
                        "etcd {} member {} exited with {status} before becoming ready\n{}",
                        self.spec.version,
                        self.members[index].name,
                        file_tail(&self.members[index].log_path)
                    );
                }
            }
            let problem = match self.probe_ready(indices) {
                Ok(()) => return Ok(()),
                Err(problem) => problem,
            };
            if Instant::now() >= deadline {
                let tails: Vec<String> =
                    indices.iter().map(|&index| file_tail(&self.members[index].log_path)).collect();
                bail!(
                    "etcd {} members {indices:?} not ready within {READY_TIMEOUT:?}; last probe: {problem:#}\n{}",
                    self.spec.version,
                    tails.join("\n")
                );
            }
            thread::sleep(POLL_INTERVAL);
        }
    }

    fn probe_ready(&mut self, indices: &[usize]) -> anyhow::Result<()> {
        // A TCP connect costs nothing next to spawning etcdctl, so it filters out the
        // early polls while members are still opening their listeners.
        for &index in indices {
            let addr = self.client_addr(index);
            TcpStream::connect_timeout(&addr, Duration::from_millis(200))
                .with_context(|| format!("{} not accepting on {addr}", self.members[index].name))?;
        }
        let mut member_ids = Vec::with_capacity(indices.len());
        let mut leaders = Vec::with_capacity(indices.len());
        for &index in indices {
            let (member_id, leader) = self.endpoint_status(index)?;
            self.members[index].member_id = Some(member_id);
            member_ids.push(member_id);
            leaders.push(leader);
        }
        // A leader outside `indices` is one that was stopped: the survivors have not
        // noticed yet.
        let first_leader = leaders.first().copied().unwrap_or(0);
        if !member_ids.contains(&first_leader) || leaders.iter().any(|leader| *leader != first_leader) {
            bail!("members {indices:?} report leaders {leaders:x?}");
        }
        let endpoints = indices.iter().map(|&index| self.client_url(index)).collect::<Vec<_>>().join(",");
        let output = self.probe_etcdctl(&endpoints, &["endpoint", "health"])?;
        if !output.status.success() {
            bail!(
                "endpoint health failed: {}{}",
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            );
        }
        Ok(())
    }

    /// `(member id, leader id)` as reported by member `index`; leader 0 means none yet.
    fn endpoint_status(&self, index: usize) -> anyhow::Result<(u64, u64)> {
        let output = self.probe_etcdctl(&self.client_url(index), &["endpoint", "status", "-w", "json"])?;
        let stdout = String::from_utf8_lossy(&output.stdout);
        if !output.status.success() {
            bail!(
                "endpoint status of {} failed: {}",
                self.members[index].name,
                String::from_utf8_lossy(&output.stderr).trim()
            );
        }
        let member_id = json_u64_field(&stdout, "member_id")
            .ok_or_else(|| anyhow!("no member_id in endpoint status {stdout:?}"))?;
        let leader =
            json_u64_field(&stdout, "leader").ok_or_else(|| anyhow!("no leader in endpoint status {stdout:?}"))?;
        Ok((member_id, leader))
    }

    fn probe_etcdctl(&self, endpoints: &str, args: &[&str]) -> anyhow::Result<Output> {
        let mut full_args: Vec<&str> = PROBE_TIMEOUT_ARGS.to_vec();
        let user = self.spec.probe_user.as_ref().map(|user| format!("--user={user}"));
        full_args.extend(user.as_deref());
        full_args.extend_from_slice(args);
        let mut command = etcdctl_command(self.spec.version, endpoints, self.client_tls(), &full_args);
        command.output().with_context(|| format!("running {command:?}"))
    }

    fn reap_if_exited(&mut self, index: usize) -> anyhow::Result<Option<ExitStatus>> {
        let member = &mut self.members[index];
        let Some(process) = member.process.as_mut() else {
            bail!("member {} is not running", member.name);
        };
        let status = process.try_wait().with_context(|| format!("checking etcd member {}", member.name))?;
        if status.is_some() {
            member.process = None;
        }
        Ok(status)
    }

    fn lost_port_race(&self) -> bool {
        self.members
            .iter()
            .any(|member| member.log_path.exists() && read_lossy(&member.log_path).contains("address already in use"))
    }

    /// Clients and peers use the same scheme: TLS is on for both or for neither.
    fn scheme(&self) -> &'static str {
        if self.spec.tls.is_some() {
            "https"
        } else {
            "http"
        }
    }

    fn client_addr(&self, index: usize) -> SocketAddr {
        SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, self.members[index].client_port))
    }

    fn client_url(&self, index: usize) -> String {
        format!("{}://127.0.0.1:{}", self.scheme(), self.members[index].client_port)
    }

    fn running_indices(&self) -> Vec<usize> {
        (0..self.members.len()).filter(|&index| self.members[index].process.is_some()).collect()
    }

    fn checked_index(&self, index: usize) -> anyhow::Result<()> {
        if index >= self.members.len() {
            bail!("member index {index} out of range for a {}-member cluster", self.members.len());
        }
        Ok(())
    }

    /// The spec this cluster was started from.
    pub fn spec(&self) -> &ClusterSpec {
        &self.spec
    }

    /// etcd release line of every member.
    pub fn version(&self) -> EtcdVersion {
        self.spec.version
    }

    /// Number of members, running or not.
    pub fn len(&self) -> usize {
        self.members.len()
    }

    /// Always false: a cluster has at least one member; present for clippy's `len` rule.
    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }

    /// Wall time [`EtcdCluster::start`] took, retries included.
    pub fn startup_time(&self) -> Duration {
        self.startup_time
    }

    /// Client URLs of all members (running or not), in member order.
    pub fn client_urls(&self) -> Vec<String> {
        (0..self.members.len()).map(|index| self.client_url(index)).collect()
    }

    /// [`EtcdCluster::client_urls`] joined with commas, as `--endpoints` expects.
    pub fn client_endpoints_csv(&self) -> String {
        self.client_urls().join(",")
    }

    /// Client socket addresses of all members, in member order.
    pub fn client_addrs(&self) -> Vec<SocketAddr> {
        (0..self.members.len()).map(|index| self.client_addr(index)).collect()
    }

    /// Client TLS material the cluster accepts, if TLS is on.
    pub fn client_tls(&self) -> Option<&ClientTls> {
        self.spec.tls.as_ref().map(|tls| &tls.client)
    }

    /// Identity and state of member `index`. Panics if `index` is out of range.
    pub fn member(&self, index: usize) -> MemberInfo {
        let member = &self.members[index];
        MemberInfo {
            index,
            name: member.name.clone(),
            client_url: self.client_url(index),
            peer_url: format!("{}://127.0.0.1:{}", self.scheme(), member.peer_port),
            pid: member.process.as_ref().map(Child::id),
            member_id: member.member_id,
            data_dir: member.data_dir.clone(),
            log_path: member.log_path.clone(),
        }
    }

    /// Whether member `index` is running (it may have crashed since it was last checked).
    pub fn is_running(&mut self, index: usize) -> bool {
        index < self.members.len() && matches!(self.reap_if_exited(index), Ok(None))
    }

    /// Full log of member `index` so far (all runs).
    pub fn log_contents(&self, index: usize) -> String {
        read_lossy(&self.members[index].log_path)
    }

    /// SIGKILLs member `index` and reaps it.
    pub fn kill(&mut self, index: usize) -> anyhow::Result<()> {
        self.checked_index(index)?;
        let member = &mut self.members[index];
        let mut process = member.process.take().ok_or_else(|| anyhow!("member {} is not running", member.name))?;
        process.kill().with_context(|| format!("killing member {}", member.name))?;
        process.wait().with_context(|| format!("reaping member {}", member.name))?;
        Ok(())
    }

    /// SIGTERMs member `index` and waits for it to exit (SIGKILL and an error after 10 s).
    pub fn stop(&mut self, index: usize) -> anyhow::Result<ExitStatus> {
        self.checked_index(index)?;
        let member = &mut self.members[index];
        let mut process = member.process.take().ok_or_else(|| anyhow!("member {} is not running", member.name))?;
        send_signal(process.id(), "TERM")?;
        let deadline = Instant::now() + STOP_TIMEOUT;
        loop {
            if let Some(status) = process.try_wait()? {
                return Ok(status);
            }
            if Instant::now() >= deadline {
                // Best effort: the error below is what matters to the caller.
                let _ = process.kill();
                let _ = process.wait();
                bail!("member {} ignored SIGTERM for {STOP_TIMEOUT:?}\n{}", member.name, file_tail(&member.log_path));
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGSTOPs member `index`: its TCP connections stay open but nothing answers, as with a
    /// VM paused or a host cut off without a reset.
    pub fn freeze(&mut self, index: usize) -> anyhow::Result<()> {
        self.signal_running(index, "STOP")
    }

    /// SIGCONTs a member [`EtcdCluster::freeze`] stopped.
    pub fn thaw(&mut self, index: usize) -> anyhow::Result<()> {
        self.signal_running(index, "CONT")
    }

    fn signal_running(&mut self, index: usize, signal: &str) -> anyhow::Result<()> {
        self.checked_index(index)?;
        let member = &self.members[index];
        let process = member.process.as_ref().ok_or_else(|| anyhow!("member {} is not running", member.name))?;
        send_signal(process.id(), signal)
    }

    /// Starts a killed or stopped member again with its data directory and ports, then
    /// waits until it and the other running members agree on a leader.
    pub fn restart(&mut self, index: usize) -> anyhow::Result<()> {
        self.checked_index(index)?;
        if self.members[index].process.is_some() {
            bail!("member {} is still running", self.members[index].name);
        }
        self.spawn_member(index, None)?;
        let running = self.running_indices();
        self.wait_ready(&running)
    }

    /// An in-place upgrade of member `index`, as operators do it: SIGTERM, then `version`'s etcd
    /// started on the same data directory and ports; waits as [`EtcdCluster::restart`] does.
    pub fn upgrade(&mut self, index: usize, version: EtcdVersion) -> anyhow::Result<()> {
        self.checked_index(index)?;
        version.etcd_bin();
        self.stop(index)?;
        self.members[index].version = version;
        self.restart(index)
    }

    /// Index of the member the running members name as leader; an error if they
    /// disagree, have none, or name a member that is not running.
    pub fn leader_index(&mut self) -> anyhow::Result<usize> {
        let running = self.running_indices();
        if running.is_empty() {
            bail!("no member is running");
        }
        let mut leader = None;
        for &index in &running {
            let (member_id, reported) = self.endpoint_status(index)?;
            self.members[index].member_id = Some(member_id);
            match leader {
                None => leader = Some(reported),
                Some(previous) if previous != reported => {
                    bail!("members disagree on the leader: {previous:x} vs {reported:x}")
                }
                Some(_) => {}
            }
        }
        let leader = leader.unwrap_or(0);
        if leader == 0 {
            bail!("the running members have no leader");
        }
        let index = self
            .members
            .iter()
            .position(|member| member.member_id == Some(leader))
            .ok_or_else(|| anyhow!("leader {leader:x} is not a known member"))?;
        // Right after the leader is killed the survivors still name it until their
        // election timeout fires; that view is stale, not an answer.
        if !running.contains(&index) {
            bail!("the running members still name stopped member {} as leader", self.members[index].name);
        }
        Ok(index)
    }

    /// Polls [`EtcdCluster::leader_index`] until it succeeds or `timeout` passes, e.g.
    /// after killing the leader.
    pub fn wait_for_leader(&mut self, timeout: Duration) -> anyhow::Result<usize> {
        let deadline = Instant::now() + timeout;
        loop {
            match self.leader_index() {
                Ok(index) => return Ok(index),
                Err(error) if Instant::now() >= deadline => {
                    return Err(error.context(format!("no leader within {timeout:?}")))
                }
                Err(_) => thread::sleep(POLL_INTERVAL),
            }
        }
    }

    /// Runs etcdctl against the running members with the cluster's client TLS; returns the
    /// output whatever the exit status.
    pub fn etcdctl(&self, args: &[&str]) -> Output {
        crate::etcdctl(self.spec.version, &self.running_endpoints_csv(), self.client_tls(), args)
    }

    /// Like [`EtcdCluster::etcdctl`], but panics unless it succeeds; returns stdout.
    pub fn etcdctl_ok(&self, args: &[&str]) -> String {
        crate::etcdctl_ok(self.spec.version, &self.running_endpoints_csv(), self.client_tls(), args)
    }

    fn running_endpoints_csv(&self) -> String {
        self.running_indices()
            .into_iter()
            .filter(|&index| !self.members[index].learner)
            .map(|index| self.client_url(index))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Adds a member with `etcdctl member add` (as a learner if `learner`; `auth_args` such as
    /// `--user=root:pw` go to that etcdctl call), starts it joining the running cluster, and
    /// waits (up to 20 s) until it names the same leader as the others. Returns its index.
    pub fn add_member(&mut self, learner: bool, auth_args: &[&str]) -> anyhow::Result<usize> {
        if self.members.len() >= MAX_MEMBERS {
            bail!("a test cluster has at most {MAX_MEMBERS} members");
        }
        let index = self.members.len();
        let name = format!("m{index}");
        let data_root = self.members[0].data_dir.parent().map(Path::to_path_buf).context("data root")?;
        let member = Member {
            data_dir: data_root.join(&name),
            log_path: self.log_root.path().join(format!("{name}.log")),
            name: name.clone(),
            client_port: free_port().context("picking a client port")?,
            peer_port: free_port().context("picking a peer port")?,
            process: None,
            member_id: None,
            version: self.spec.version,
            joined_later: true,
            learner,
        };
        let peer_url = format!("{}://127.0.0.1:{}", self.scheme(), member.peer_port);
        self.members.push(member);
        let mut args = vec!["member".to_owned(), "add".to_owned(), name.clone(), format!("--peer-urls={peer_url}")];
        if learner {
            args.push("--learner".to_owned());
        }
        args.extend(auth_args.iter().map(|a| a.to_string()));
        let arg_refs: Vec<&str> = args.iter().map(String::as_str).collect();
        // etcd refuses reconfiguration until its members have been connected for 5 s.
        let add_deadline = Instant::now() + READY_TIMEOUT;
        let output = loop {
            let output = self.etcdctl(&arg_refs);
            let too_early = String::from_utf8_lossy(&output.stderr).contains("etcdserver: unhealthy cluster");
            if output.status.success() || !too_early || Instant::now() >= add_deadline {
                break output;
            }
            thread::sleep(Duration::from_millis(250));
        };
        if !output.status.success() {
            self.members.pop();
            bail!(
                "etcdctl member add {name} failed: {}{}",
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            );
        }
        self.spawn_member(index, None)?;
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Some(status) = self.reap_if_exited(index)? {
                bail!(
                    "etcd member {name} exited with {status} while joining\n{}",
                    file_tail(&self.members[index].log_path)
                );
            }
            let joined = self.endpoint_status(index).ok().filter(|(_, leader)| *leader != 0);
            let leader = self.leader_index().ok().and_then(|leader| self.members[leader].member_id);
            if let (Some((member_id, reported)), Some(leader)) = (joined, leader) {
                if reported == leader {
                    self.members[index].member_id = Some(member_id);
                    return Ok(index);
                }
            }
            if Instant::now() >= deadline {
                bail!(
                    "etcd member {name} did not join within {READY_TIMEOUT:?}\n{}",
                    file_tail(&self.members[index].log_path)
                );
            }
            thread::sleep(POLL_INTERVAL);
        }
    }

    /// Records that learner `index` was promoted, so the etcdctl helpers may use it again.
    pub fn mark_promoted(&mut self, index: usize) {
        if let Some(member) = self.members.get_mut(index) {
            member.learner = false;
        }
    }
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        for member in &mut self.members {
            if let Some(mut process) = member.process.take() {
                // Nothing useful can be done about a failure while dropping.
                let _ = process.kill();
                let _ = process.wait();
            }
        }
        // The data directory (on tmpfs, i.e. memory) is deleted even after a panic;
        // only the small logs are worth keeping.
        let anything_logged = self.members.iter().any(|member| member.log_path.exists());
        if thread::panicking() && anything_logged {
            self.log_root.disable_cleanup(true);
            eprintln!("etcd {} cluster logs kept in {}", self.spec.version, self.log_root.path().display());
        }
    }
}

fn send_signal(pid: u32, signal: &str) -> anyhow::Result<()> {
    let flag = format!("-{signal}");
    let status = Command::new("kill").args([&flag, &pid.to_string()]).status().context("running kill")?;
    if !status.success() {
        bail!("kill {flag} {pid} exited with {status}");
    }
    Ok(())
}

pub(crate) fn open_append(path: &Path) -> anyhow::Result<File> {
    OpenOptions::new().create(true).append(true).open(path).with_context(|| format!("opening log {}", path.display()))
}

/// Data directories go to tmpfs when there is one: etcd fsyncs every commit, and on a
/// disk that dominates the run time of a test suite.
fn data_tempdir() -> anyhow::Result<TempDir> {
    let builder = {
        let mut builder = tempfile::Builder::new();
        builder.prefix("etcd-compat-data-");
        builder
    };
    let shm = Path::new("/dev/shm");
    if shm.is_dir() {
        if let Ok(dir) = builder.tempdir_in(shm) {
            return Ok(dir);
        }
    }
    builder.tempdir().context("creating the etcd data directory")
}

/// Distinct per cluster so members of two test clusters can never join each other,
/// even if a port gets reused.
fn unique_cluster_token() -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map(|elapsed| elapsed.as_nanos()).unwrap_or(0);
    format!("etcd-compat-{}-{}-{nanos}", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed))
}

/// The first unsigned integer value of `"key":` in `json`. Enough for etcdctl's
/// `endpoint status -w json`, whose ids are u64 numbers that need no escaping rules.
fn json_u64_field(json: &str, key: &str) -> Option<u64> {
    let needle = format!("\"{key}\":");
    let start = json.find(&needle)? + needle.len();
    let digits: String = json[start..].trim_start().chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::json_u64_field;

    #[test]
    fn json_u64_field_reads_etcdctl_status_ids() {
        let status = r#"[{"Endpoint":"http://127.0.0.1:1","Status":{"header":{"cluster_id":1,"member_id":18446744073709551615,"revision":1,"raft_term":2},"version":"3.4.23","dbSize":20480,"leader":42,"raftIndex":4}}]"#;
        assert_eq!(json_u64_field(status, "member_id"), Some(u64::MAX));
        assert_eq!(json_u64_field(status, "leader"), Some(42));
        assert_eq!(json_u64_field(status, "missing"), None);
    }
}
