//! The workloads, and the in-process load generator that runs one of them against one target.
//!
//! Every target gets exactly the same client code (etcd-client over tonic), so the client's own
//! cost is identical in each row and cancels out of the ratios.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, ensure, Context, Result};
use etcd_client::{Client, ConnectOptions, EventType, GetOptions, KvClient, LeaseClient, WatchClient, WatchOptions};
use tokio::sync::watch;
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::{timeout, timeout_at, MissedTickBehavior};

use crate::procfs;
use crate::stats::format_latency;

/// Longest any single request may take; a slower one fails the run instead of dragging it.
pub const OP_TIMEOUT: Duration = Duration::from_secs(10);
/// Decoding limit for every client stub: the 3.5 MiB range is close to tonic's 4 MiB default.
const MAX_DECODE: usize = 16 << 20;
/// How long workers may take to finish after the window closes (in-flight ops included).
const STOP_GRACE: Duration = Duration::from_secs(12);
/// How long the watchers get to register with the target.
const WATCH_SETUP_TIMEOUT: Duration = Duration::from_secs(30);
/// How long watchers may lag behind the writer once it stopped before events count as lost.
const WATCH_DRAIN_TIMEOUT: Duration = Duration::from_secs(15);
/// Lease TTL of the keep-alive workload: long enough that no lease expires during a run.
const LEASE_TTL: i64 = 60;

/// Value size of the put and small range workloads.
pub const VALUE_LEN: usize = 256;
/// Keys the put workloads spread their writes over.
const PUT_KEYS: u64 = 1000;
const PUT_PREFIX: &str = "bench/put/";
const ONE_KEY: &str = "bench/one";
const R1000_PREFIX: &str = "bench/r1000/";
const R1000_KEYS: usize = 1000;
const BIG_PREFIX: &str = "bench/big/";
const BIG_KEYS: usize = 350;
const BIG_VALUE_LEN: usize = 10 * 1024;
/// The paged 1 GiB range: 16384 keys x 64 KiB values = 1 GiB of values under one prefix.
const HUGE_PREFIX: &str = "bench/huge/";
/// One past the last key under [`HUGE_PREFIX`] (`/` + 1 = `0`).
const HUGE_RANGE_END: &str = "bench/huge0";
const HUGE_KEYS: usize = 16384;
const HUGE_VALUE_LEN: usize = 64 * 1024;
/// The `limit` of every page, as a legacy client would set it.
const HUGE_PAGE_LIMIT: usize = 1000;
/// Concurrent Puts while loading the 1 GiB: enough to keep etcd busy on 2 cores.
const HUGE_WRITERS: usize = 16;
/// Decoding limit of the paging client: direct etcd answers 1000 x 64 KiB (64 MiB) pages.
const HUGE_MAX_DECODE: usize = 128 << 20;
/// Longest one page may take: a 64 MiB answer on a busy shared machine needs more than
/// [`OP_TIMEOUT`], and a stuck target still fails the row instead of hanging the bench.
const PAGE_TIMEOUT: Duration = Duration::from_secs(60);
/// Longest one full pass may take, whatever the pages do: about ten times what a pass takes
/// on a busy 2-core machine, and with 3 rounds x 3 targets the workload still ends within
/// 20 minutes however slow a target is.
pub const PASS_TIMEOUT: Duration = Duration::from_secs(120);
/// How often the proxy's VmRSS is sampled during a pass (besides VmHWM).
const RSS_SAMPLE_INTERVAL: Duration = Duration::from_millis(50);
/// Bytes per unit of the paged workload's throughput.
const MIB: u64 = 1024 * 1024;
const WATCH_KEY: &str = "bench/watch";
const WATCH_PREFIX: &str = "bench/watchdir/";
/// Keys the prefix writer cycles through, so that events come from many keys, as a fleet's
/// jobs do, and the watched range is never a single key in disguise.
const WATCH_PREFIX_KEYS: u64 = 100;
/// The watch writers' values: an 8-byte send timestamp, padded.
const WATCH_VALUE_LEN: usize = 64;
/// Watch streams per client connection, in the fleet as in the 1000- and 10000-watcher rows: a
/// fleet's agents reach the proxy over many connections, and 100 connections for 10000 watchers
/// stay far below the usual soft limit of 1024 file descriptors (bench, proxy and etcd alike),
/// so no rlimit needs raising.
pub const WATCHERS_PER_CONN: usize = 100;
/// The legacy fleet: agents watch the jobs prefix and poll the config key.
const FLEET_JOBS: &str = "/fleet/jobs/";
const FLEET_CONFIG: &str = "/fleet/config";
/// Job keys each fleet writer cycles through.
const FLEET_JOB_KEYS: u64 = 50;
const FLEET_WRITERS: u64 = 2;
const FLEET_WRITE_INTERVAL: Duration = Duration::from_millis(100);
/// Every this many Puts a fleet writer changes the config instead of a job: a config change
/// about once a second across both writers, rare next to the polls, as in a real fleet.
const FLEET_CONFIG_EVERY: u64 = 20;
/// An agent's pause between two polls: agents do other work between reads, and without a pause
/// 200 agents would be 200 closed-loop clients, a load test rather than a fleet.
const FLEET_POLL_PAUSE: Duration = Duration::from_millis(10);
/// What every fleet poll must read.
const FLEET_POLL: Query =
    Query { key: FLEET_CONFIG, prefix: false, serializable: true, count: 1, value_len: WATCH_VALUE_LEN };

/// One named workload of the table.
pub struct Workload {
    /// Name used in the table and matched by `--only`.
    pub name: &'static str,
    /// Unit of the throughput column.
    pub unit: &'static str,
    /// What the latency columns measure, for the report's notes.
    pub about: &'static str,
    /// What the load generator does.
    pub kind: Kind,
    /// Loads a lot of data first, so it runs only when asked for (`--big`, or `--only` text
    /// that names it and no regular workload).
    pub opt_in: bool,
}

impl Workload {
    /// Whether the 1 GiB under [`HUGE_PREFIX`] must be loaded before this workload runs.
    pub fn needs_huge_data(&self) -> bool {
        matches!(self.kind, Kind::PagedPass)
    }

    /// Whether the workload's reads are serializable Ranges, which etcd-compat-proxy may answer
    /// from its cache: only these are worth measuring with the cache off as well.
    pub fn reads_serializably(&self) -> bool {
        match &self.kind {
            Kind::Unary { op: UnaryOp::Get(query), .. } => query.serializable,
            Kind::Fleet => true,
            Kind::Unary { .. } | Kind::Watch { .. } | Kind::KeepAlive { .. } | Kind::PagedPass => false,
        }
    }
}

/// Connections that `agents` fleet agents (or watchers) are spread over.
pub fn conns_for(agents: usize) -> usize {
    agents.div_ceil(WATCHERS_PER_CONN).max(1)
}

/// The shape of a workload.
pub enum Kind {
    /// `concurrency` workers, each issuing one request at a time, over `conns` connections.
    Unary { concurrency: usize, conns: usize, op: UnaryOp },
    /// `watchers` watch streams on one key or prefix over `conns` connections, fed by a steady
    /// writer at `--watch-rate` / `rate_divisor` Puts a second.
    Watch { watchers: usize, conns: usize, scope: WatchScope, rate_divisor: u32 },
    /// `streams` LeaseKeepAlive streams, each with one keep-alive in flight at a time.
    KeepAlive { streams: usize, conns: usize },
    /// One client reads the whole [`HUGE_PREFIX`] once, page by page like a legacy client
    /// (`limit`, then last key + "\0" while `more`); throughput is MiB of values per second.
    PagedPass,
    /// `--fleet-agents` agents, each watching [`FLEET_JOBS`] and polling [`FLEET_CONFIG`] with a
    /// serializable Range every [`FLEET_POLL_PAUSE`], while [`FLEET_WRITERS`] writers Put through
    /// the target; the ops are the polls, the events are counted beside them.
    Fleet,
}

/// What the watchers of a fan-out workload watch, and so where its writer Puts.
#[derive(Debug, Clone, Copy)]
pub enum WatchScope {
    /// [`WATCH_KEY`], the one key the writer Puts.
    Key,
    /// [`WATCH_PREFIX`], under which the writer cycles through [`WATCH_PREFIX_KEYS`] keys.
    Prefix,
}

impl WatchScope {
    fn watched(self) -> Watched {
        match self {
            WatchScope::Key => Watched { key: WATCH_KEY, prefix: false },
            WatchScope::Prefix => Watched { key: WATCH_PREFIX, prefix: true },
        }
    }

    /// The key of the writer's `n`th Put.
    fn key(self, n: u64) -> String {
        match self {
            WatchScope::Key => WATCH_KEY.to_owned(),
            WatchScope::Prefix => format!("{WATCH_PREFIX}{:03}", n % WATCH_PREFIX_KEYS),
        }
    }
}

/// A key, or every key under a prefix, as a watch stream asks for it.
#[derive(Debug, Clone, Copy)]
struct Watched {
    key: &'static str,
    prefix: bool,
}

impl Watched {
    fn options(self, start_revision: i64) -> WatchOptions {
        let options = WatchOptions::new().with_start_revision(start_revision);
        if self.prefix {
            options.with_prefix()
        } else {
            options
        }
    }

    fn contains(self, key: &[u8]) -> bool {
        if self.prefix {
            key.starts_with(self.key.as_bytes())
        } else {
            key == self.key.as_bytes()
        }
    }
}

/// The request a unary worker repeats.
#[derive(Clone)]
pub enum UnaryOp {
    /// Put a [`VALUE_LEN`]-byte value to one of [`PUT_KEYS`] keys.
    Put,
    /// Range over pre-populated data and check the answer.
    Get(Query),
}

/// A Range request together with the answer it must get.
#[derive(Clone)]
pub struct Query {
    key: &'static str,
    prefix: bool,
    serializable: bool,
    count: usize,
    value_len: usize,
}

/// Every workload, in table order.
pub fn all() -> Vec<Workload> {
    let get = |concurrency, query| Kind::Unary { concurrency, conns: 1, op: UnaryOp::Get(query) };
    let one_key = |serializable| Query { key: ONE_KEY, prefix: false, serializable, count: 1, value_len: VALUE_LEN };
    let watch = |name, about, watchers, conns, scope, rate_divisor| Workload {
        name,
        unit: "events/s",
        about,
        kind: Kind::Watch { watchers, conns, scope, rate_divisor },
        opt_in: false,
    };
    // The watch workloads grow from one to the next: a proxy keeps memory it once needed, so a
    // small fan-out measured after a large one would show the large one's peak.
    vec![
        Workload {
            name: "put 256B c64 conn1",
            unit: "ops/s",
            about: "64 concurrent Puts of 256 B values over 1000 keys, one connection; latency per Put",
            kind: Kind::Unary { concurrency: 64, conns: 1, op: UnaryOp::Put },
            opt_in: false,
        },
        Workload {
            name: "put 256B c64 conn8",
            unit: "ops/s",
            about: "as above over 8 connections (8 workers each)",
            kind: Kind::Unary { concurrency: 64, conns: 8, op: UnaryOp::Put },
            opt_in: false,
        },
        Workload {
            name: "range 1key serializable",
            unit: "ops/s",
            about: "64 concurrent serializable Gets of one 256 B key, one connection",
            kind: get(64, one_key(true)),
            opt_in: false,
        },
        Workload {
            name: "range 1key linearizable",
            unit: "ops/s",
            about: "64 concurrent linearizable Gets of one 256 B key, one connection",
            kind: get(64, one_key(false)),
            opt_in: false,
        },
        Workload {
            name: "range 1000 keys",
            unit: "ops/s",
            about: "16 concurrent linearizable Gets of a 1000-key prefix (256 B values, ~270 KB answers), one connection",
            kind: get(
                16,
                Query { key: R1000_PREFIX, prefix: true, serializable: false, count: R1000_KEYS, value_len: VALUE_LEN },
            ),
            opt_in: false,
        },
        Workload {
            name: "range 3.5MiB",
            unit: "ops/s",
            about: "4 concurrent linearizable Gets of a 350-key prefix of 10 KiB values (3.4 MiB answers), one connection",
            kind: get(
                4,
                Query { key: BIG_PREFIX, prefix: true, serializable: false, count: BIG_KEYS, value_len: BIG_VALUE_LEN },
            ),
            opt_in: false,
        },
        watch(
            "watch fanout 100 key",
            "100 watch streams on one key over 10 connections, the writer Puts it {watch_rate} times a second; an op is \
             an event delivered to one watcher, latency is Put sent -> event received",
            100,
            10,
            WatchScope::Key,
            1,
        ),
        watch(
            "watch fanout 1000 key",
            "1000 watch streams on one key over 10 connections (100 each), the writer Puts it {watch_rate} times a \
             second; as above",
            1000,
            10,
            WatchScope::Key,
            1,
        ),
        watch(
            "watch fanout 1000 prefix",
            "1000 watch streams on the prefix `bench/watchdir/` over 10 connections (100 each), the writer Puts \
             {watch_rate} times a second to the 100 keys under it in turn; as above",
            1000,
            10,
            WatchScope::Prefix,
            1,
        ),
        watch(
            "watch fanout 10000 key",
            "10000 watch streams on one key over 100 connections (100 each), the writer Puts it {watch_rate/10} times \
             a second, a tenth as often, so that it asks for as many events as `watch fanout 1000 key` and the two \
             differ in streams held; as above",
            10_000,
            100,
            WatchScope::Key,
            10,
        ),
        watch(
            "watch fanout 10000 prefix",
            "10000 watch streams on the prefix `bench/watchdir/` over 100 connections (100 each), the writer Puts \
             {watch_rate/10} times a second to the 100 keys under it in turn; as above",
            10_000,
            100,
            WatchScope::Prefix,
            10,
        ),
        Workload {
            name: "lease keepalive",
            unit: "keep-alives/s",
            about: "64 LeaseKeepAlive streams on one connection, next keep-alive sent when the previous answer arrives; latency per keep-alive",
            kind: Kind::KeepAlive { streams: 64, conns: 1 },
            opt_in: false,
        },
        Workload {
            name: "fleet mixed",
            unit: "ops/s",
            about: "{fleet_agents} agents over {fleet_conns} connection(s) (at most 100 each), every one \
                    watching the prefix `/fleet/jobs/` and polling the key `/fleet/config` with a serializable Range, \
                    10 ms between an answer and the next poll; 2 writers, each on a connection of its own through \
                    the target, Put under the prefix every 100 ms, every 20th Put going to `/fleet/config` instead. \
                    An op is a poll, p50/p99 are per poll; the events delivered are in their own table",
            kind: Kind::Fleet,
            opt_in: false,
        },
        Workload {
            name: "range 1GiB paged",
            unit: "MiB/s",
            about: "one client reads 1 GiB (16384 keys x 64 KiB values, loaded straight to etcd) once, in Ranges with \
                    limit 1000 continued from the last key + \"\\0\" while `more`, as legacy clients page; every key \
                    checked once, in order; an op is 1 MiB of values, p50/p99 are per page; opt-in (--big), details \
                    in the per-pass table",
            kind: Kind::PagedPass,
            opt_in: true,
        },
    ]
}

/// Processes whose CPU time is sampled around the measured window.
#[derive(Debug, Clone, Copy)]
pub struct Pids {
    /// The etcd member.
    pub etcd: u32,
    /// The proxy in front of it, if the target is one.
    pub proxy: Option<u32>,
}

/// Everything a run needs to know about its target and the timing.
pub struct RunContext {
    /// Client URL of the target (etcd itself or a proxy).
    pub endpoint: String,
    /// A client connected straight to etcd, for work that must not go through the target.
    pub control: Client,
    /// Processes to sample.
    pub pids: Pids,
    /// Load before the window opens.
    pub warmup: Duration,
    /// Length of the measured window.
    pub window: Duration,
    /// Puts per second of the watch writer.
    pub watch_rate: u32,
    /// Agents of the fleet workload.
    pub fleet_agents: usize,
}

/// The outcome of one measured window.
#[derive(Debug, Clone)]
pub struct Measurement {
    /// Operations (or events) completed inside the window.
    pub ops: u64,
    /// Actual window length.
    pub elapsed: Duration,
    /// Median latency of the operations completed in the window.
    pub p50: Option<Duration>,
    /// 99th percentile latency.
    pub p99: Option<Duration>,
    /// CPU time etcd used during the window.
    pub etcd_cpu: Duration,
    /// CPU time the proxy used during the window.
    pub proxy_cpu: Option<Duration>,
    /// Proxy resident memory when the window closed (for a paged pass, and for the workloads
    /// that hold watch streams, its peak over the whole run).
    pub proxy_rss: Option<u64>,
    /// Watch events delivered inside the window, where they are not the ops (the fleet).
    pub events: Option<u64>,
    /// What a paged pass measured beyond the common columns.
    pub pass: Option<PassDetail>,
}

/// One full paged pass over [`HUGE_PREFIX`].
#[derive(Debug, Clone)]
pub struct PassDetail {
    /// Range requests the pass took.
    pub pages: u64,
    /// Proxy VmRSS just before the pass (client connected, nothing in flight).
    pub rss_idle: Option<u64>,
    /// Highest proxy RSS during the pass: VmHWM after resetting it, or the highest 50 ms
    /// VmRSS sample, whichever is higher.
    pub rss_peak: Option<u64>,
    /// Proxy VmRSS right after the last page arrived.
    pub rss_after: Option<u64>,
    /// Whether the peak includes VmHWM (false: only the samples, because the reset failed).
    pub peak_from_hwm: bool,
}

impl Measurement {
    /// Operations (or events) per second.
    pub fn throughput(&self) -> f64 {
        self.ops as f64 / self.elapsed.as_secs_f64()
    }
}

/// Runs `workload` once against the target described by `ctx`.
pub async fn run(workload: &Workload, ctx: &RunContext) -> Result<Measurement> {
    let measurement = match &workload.kind {
        Kind::Unary { concurrency, conns, op } => run_unary(ctx, *concurrency, *conns, op).await?,
        Kind::Watch { watchers, conns, scope, rate_divisor } => {
            run_watch(ctx, *watchers, *conns, *scope, *rate_divisor).await?
        }
        Kind::KeepAlive { streams, conns } => run_keepalive(ctx, *streams, *conns).await?,
        Kind::PagedPass => run_paged_pass(ctx).await?,
        Kind::Fleet => run_fleet(ctx).await?,
    };
    // A target that answers nothing must not show up as a slow success.
    ensure!(measurement.ops > 0, "no operation completed within the {:?} window", ctx.window);
    Ok(measurement)
}

/// Connects a client with the settings every target gets.
pub async fn connect(endpoint: &str) -> Result<Client> {
    let options = ConnectOptions::new().with_connect_timeout(Duration::from_secs(5));
    Client::connect([endpoint], Some(options)).await.with_context(|| format!("connecting to {endpoint}"))
}

/// `count` independent clients, i.e. `count` HTTP/2 connections.
async fn connect_many(endpoint: &str, count: usize) -> Result<Vec<Client>> {
    let mut clients = Vec::with_capacity(count);
    for _ in 0..count {
        clients.push(connect(endpoint).await?);
    }
    Ok(clients)
}

/// Writes the data the range workloads read, through `control`, and checks it reads back.
pub async fn populate(control: &Client) -> Result<()> {
    let mut kv = control.kv_client();
    kv.put(ONE_KEY, vec![b'o'; VALUE_LEN], None).await.context("writing the single range key")?;
    kv.put(FLEET_CONFIG, vec![b'c'; WATCH_VALUE_LEN], None).await.context("writing the fleet's config key")?;
    const WRITERS: usize = 8;
    let mut writers = JoinSet::new();
    for shard in 0..WRITERS {
        let mut kv = control.kv_client();
        writers.spawn(async move {
            for index in (shard..R1000_KEYS).step_by(WRITERS) {
                kv.put(format!("{R1000_PREFIX}{index:04}"), vec![b'r'; VALUE_LEN], None).await?;
            }
            for index in (shard..BIG_KEYS).step_by(WRITERS) {
                kv.put(format!("{BIG_PREFIX}{index:03}"), vec![b'b'; BIG_VALUE_LEN], None).await?;
            }
            anyhow::Ok(())
        });
    }
    while let Some(result) = writers.join_next().await {
        result.context("a populating task died")?.context("populating the range data")?;
    }
    let mut kv = kv.max_decoding_message_size(MAX_DECODE);
    for workload in all() {
        if let Kind::Unary { op: UnaryOp::Get(query), .. } = &workload.kind {
            query.execute(&mut kv).await.with_context(|| format!("checking the data of {:?}", workload.name))?;
        }
    }
    FLEET_POLL.execute(&mut kv).await.context("checking the fleet's config key")?;
    Ok(())
}

/// Writes the 1 GiB the paged workload reads straight to etcd through `control`, with
/// [`HUGE_WRITERS`] Puts in flight (one at a time it would take minutes), and returns a line
/// for the report saying how long that took and how large etcd's database became.
pub async fn populate_huge(control: &Client) -> Result<String> {
    let started = Instant::now();
    let mut writers = JoinSet::new();
    for shard in 0..HUGE_WRITERS {
        let mut kv = control.kv_client();
        writers.spawn(async move {
            // One buffer per writer; the Put takes a copy, so it is not rebuilt per key.
            let value = vec![b'h'; HUGE_VALUE_LEN];
            for index in (shard..HUGE_KEYS).step_by(HUGE_WRITERS) {
                let key = huge_key(index);
                timeout(OP_TIMEOUT, kv.put(key.as_str(), value.clone(), None))
                    .await
                    .map_err(|_| anyhow!("Put {key} got no answer within {OP_TIMEOUT:?}"))?
                    .with_context(|| format!("Put {key}"))?;
            }
            anyhow::Ok(())
        });
    }
    while let Some(result) = writers.join_next().await {
        result.context("a loading task died")?.context("loading the 1 GiB range data")?;
    }
    let took = started.elapsed();
    // One untimed direct pass checks the data and lets etcd fault its freshly written database
    // pages into its mmap and grow its heap to 64 MiB answers; otherwise the first target of
    // round 1 pays for that (in a trial run without it: 5.9 s, against 2.6 s for later passes).
    let warmed = Instant::now();
    let mut kv = control.kv_client().max_decoding_message_size(HUGE_MAX_DECODE);
    let pages = timeout(PASS_TIMEOUT, paged_pass(&mut kv, &mut Vec::new()))
        .await
        .map_err(|_| anyhow!("the warm-up pass over the loaded data took over {PASS_TIMEOUT:?}"))?
        .context("the warm-up pass over the loaded data")?;
    let endpoint = control.maintenance_client().status().await.context("reading etcd's status")?;
    Ok(format!(
        "{HUGE_KEYS} keys x {} KiB under `{HUGE_PREFIX}` ({} MiB of values) loaded straight to etcd with \
         {HUGE_WRITERS} concurrent Puts in {:.1} s, then read once directly ({pages} pages, {:.1} s, untimed \
         warm-up); etcd database {:.0} MiB",
        HUGE_VALUE_LEN / 1024,
        huge_value_bytes() / MIB,
        took.as_secs_f64(),
        warmed.elapsed().as_secs_f64(),
        endpoint.db_size() as f64 / MIB as f64
    ))
}

/// etcd's current revision, read through `control`.
async fn current_revision(control: &Client) -> Result<i64> {
    control
        .kv_client()
        .get(ONE_KEY, Some(GetOptions::new().with_count_only()))
        .await
        .context("reading the current revision")?
        .header()
        .map(|header| header.revision())
        .ok_or_else(|| anyhow!("Range answer without a header"))
}

fn huge_key(index: usize) -> String {
    format!("{HUGE_PREFIX}{index:05}")
}

fn huge_value_bytes() -> u64 {
    (HUGE_KEYS * HUGE_VALUE_LEN) as u64
}

/// Compacts etcd's history up to now and waits until the compaction is physically done, so
/// that one run's garbage is neither carried into nor cleaned up during the next run.
pub async fn compact(control: &Client, compacted: &mut i64) -> Result<()> {
    let mut kv = control.kv_client();
    let revision = current_revision(control).await?;
    if revision > *compacted {
        let options = etcd_client::CompactionOptions::new().with_physical();
        kv.compact(revision, Some(options)).await.with_context(|| format!("compacting to revision {revision}"))?;
        *compacted = revision;
    }
    Ok(())
}

impl Query {
    fn options(&self) -> GetOptions {
        let mut options = GetOptions::new();
        if self.prefix {
            options = options.with_prefix();
        }
        if self.serializable {
            options = options.with_serializable();
        }
        options
    }

    /// Sends the Range and checks that the answer has the expected keys and value sizes.
    async fn execute(&self, kv: &mut KvClient) -> Result<()> {
        let response = kv.get(self.key, Some(self.options())).await.with_context(|| format!("Range {}", self.key))?;
        let kvs = response.kvs();
        ensure!(
            response.count() == self.count as i64 && kvs.len() == self.count,
            "Range {} returned count {} with {} key-values, expected {}",
            self.key,
            response.count(),
            kvs.len(),
            self.count
        );
        if let Some(bad) =
            kvs.iter().find(|kv| kv.value().len() != self.value_len || !kv.key().starts_with(self.key.as_bytes()))
        {
            bail!(
                "Range {} returned key {:?} with a {}-byte value, expected keys under {:?} with {}-byte values",
                self.key,
                String::from_utf8_lossy(bad.key()),
                bad.value().len(),
                self.key,
                self.value_len
            );
        }
        Ok(())
    }
}

impl UnaryOp {
    async fn execute(&self, kv: &mut KvClient, key_index: u64) -> Result<()> {
        match self {
            UnaryOp::Put => {
                let key = format!("{PUT_PREFIX}{:04}", key_index % PUT_KEYS);
                let response = kv.put(key, vec![b'p'; VALUE_LEN], None).await.context("Put")?;
                let revision = response.header().map_or(0, |header| header.revision());
                ensure!(revision > 0, "Put answered without a revision");
                Ok(())
            }
            UnaryOp::Get(query) => query.execute(kv).await,
        }
    }
}

/// State shared by the controller and the load-generating tasks of one run.
#[derive(Default)]
struct Shared {
    /// Set while the window is open: only then are latencies recorded.
    measuring: AtomicBool,
    /// Tells the workers to finish.
    stop: AtomicBool,
    /// Operations (or events) completed so far, window or not.
    done: AtomicU64,
    /// Watch events received so far where they are not the ops (the fleet), window or not.
    events: AtomicU64,
    failed: AtomicBool,
    first_error: Mutex<Option<String>>,
}

impl Shared {
    /// Records `error` (the first one wins) and makes everyone wind down.
    fn fail(&self, error: anyhow::Error) {
        let mut first = self.first_error.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if first.is_none() {
            *first = Some(format!("{error:#}"));
        }
        self.failed.store(true, Ordering::SeqCst);
    }

    fn failed(&self) -> bool {
        self.failed.load(Ordering::Relaxed)
    }

    fn error(&self) -> Option<String> {
        self.first_error.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).clone()
    }

    fn record(&self, latencies: &mut Vec<u64>, started: Instant) {
        if self.measuring.load(Ordering::Relaxed) {
            latencies.push(nanos(started.elapsed()));
        }
        self.done.fetch_add(1, Ordering::Relaxed);
    }
}

fn nanos(duration: Duration) -> u64 {
    u64::try_from(duration.as_nanos()).unwrap_or(u64::MAX)
}

/// Counters and CPU times at one instant.
struct Sample {
    at: Instant,
    done: u64,
    events: u64,
    etcd_cpu: Duration,
    proxy_cpu: Option<Duration>,
}

impl Sample {
    fn take(pids: Pids, shared: &Shared) -> Result<Sample> {
        Ok(Sample {
            at: Instant::now(),
            done: shared.done.load(Ordering::Relaxed),
            events: shared.events.load(Ordering::Relaxed),
            etcd_cpu: procfs::cpu_time(pids.etcd).context("sampling etcd")?,
            proxy_cpu: pids.proxy.map(procfs::cpu_time).transpose().context("sampling the proxy")?,
        })
    }
}

/// The raw numbers of a window, before latencies are attached.
struct Window {
    ops: u64,
    events: u64,
    elapsed: Duration,
    etcd_cpu: Duration,
    proxy_cpu: Option<Duration>,
    proxy_rss: Option<u64>,
}

/// Warms up, then samples counters and CPU around a window of `ctx.window`. Returns early
/// with the failure if a worker reports one.
async fn measure_window(ctx: &RunContext, shared: &Shared) -> Result<Window> {
    sleep_unless_failed(ctx.warmup, shared).await?;
    let before = Sample::take(ctx.pids, shared)?;
    shared.measuring.store(true, Ordering::Relaxed);
    let slept = sleep_unless_failed(ctx.window, shared).await;
    shared.measuring.store(false, Ordering::Relaxed);
    slept?;
    let after = Sample::take(ctx.pids, shared)?;
    let proxy_rss = ctx.pids.proxy.map(procfs::rss_bytes).transpose().context("reading the proxy's RSS")?;
    Ok(Window {
        ops: after.done - before.done,
        events: after.events - before.events,
        elapsed: after.at - before.at,
        etcd_cpu: after.etcd_cpu.saturating_sub(before.etcd_cpu),
        proxy_cpu: after.proxy_cpu.zip(before.proxy_cpu).map(|(after, before)| after.saturating_sub(before)),
        proxy_rss,
    })
}

/// Sleeps for `duration` in short steps so that a worker's failure ends the run at once.
async fn sleep_unless_failed(duration: Duration, shared: &Shared) -> Result<()> {
    let deadline = Instant::now() + duration;
    loop {
        if shared.failed() {
            bail!("{}", shared.error().unwrap_or_else(|| "a worker failed".to_owned()));
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Ok(());
        }
        tokio::time::sleep(left.min(Duration::from_millis(50))).await;
    }
}

/// Joins every worker (aborting them after `grace`) and returns their latencies, sorted;
/// any worker failure becomes the run's error.
async fn collect(
    workers: &mut JoinSet<Vec<u64>>,
    shared: &Shared,
    grace: Duration,
    stuck: impl FnOnce() -> String,
) -> Result<Vec<u64>> {
    let deadline = tokio::time::Instant::now() + grace;
    let mut latencies = Vec::new();
    loop {
        match timeout_at(deadline, workers.join_next()).await {
            Ok(Some(Ok(mut more))) => latencies.append(&mut more),
            Ok(Some(Err(join_error))) => shared.fail(anyhow!("a load-generator task died: {join_error}")),
            Ok(None) => break,
            Err(_) => {
                workers.abort_all();
                shared.fail(anyhow!("{}", stuck()));
                break;
            }
        }
    }
    if let Some(error) = shared.error() {
        bail!("{error}");
    }
    latencies.sort_unstable();
    Ok(latencies)
}

fn finish(window: Window, latencies: &[u64]) -> Measurement {
    let at = |p| crate::stats::percentile(latencies, p).map(Duration::from_nanos);
    Measurement {
        ops: window.ops,
        elapsed: window.elapsed,
        p50: at(50.0),
        p99: at(99.0),
        etcd_cpu: window.etcd_cpu,
        proxy_cpu: window.proxy_cpu,
        proxy_rss: window.proxy_rss,
        events: None,
        pass: None,
    }
}

// ------------------------------------------------------------------ unary

async fn run_unary(ctx: &RunContext, concurrency: usize, conns: usize, op: &UnaryOp) -> Result<Measurement> {
    let clients = connect_many(&ctx.endpoint, conns).await?;
    let shared = Arc::new(Shared::default());
    let mut workers = JoinSet::new();
    for worker in 0..concurrency {
        let kv = clients[worker % conns].kv_client().max_decoding_message_size(MAX_DECODE);
        workers.spawn(unary_worker(worker, concurrency, kv, op.clone(), Duration::ZERO, shared.clone()));
    }
    let window = measure_window(ctx, &shared).await;
    shared.stop.store(true, Ordering::Relaxed);
    let latencies = collect(&mut workers, &shared, STOP_GRACE, || {
        format!("requests still in flight {STOP_GRACE:?} after the window closed")
    })
    .await?;
    Ok(finish(window?, &latencies))
}

/// Repeats `op` until told to stop, waiting `pause` after each answer.
async fn unary_worker(
    worker: usize,
    workers: usize,
    mut kv: KvClient,
    op: UnaryOp,
    pause: Duration,
    shared: Arc<Shared>,
) -> Vec<u64> {
    let mut latencies = Vec::new();
    // Workers interleave over the key space so concurrent Puts hit different keys.
    let mut key_index = worker as u64;
    while !shared.stop.load(Ordering::Relaxed) && !shared.failed() {
        let started = Instant::now();
        match timeout(OP_TIMEOUT, op.execute(&mut kv, key_index)).await {
            Ok(Ok(())) => shared.record(&mut latencies, started),
            Ok(Err(error)) => {
                shared.fail(error);
                break;
            }
            Err(_) => {
                shared.fail(anyhow!("a request got no answer within {OP_TIMEOUT:?}"));
                break;
            }
        }
        key_index += workers as u64;
        if !pause.is_zero() {
            tokio::time::sleep(pause).await;
        }
    }
    latencies
}

// ------------------------------------------------------------------ paged 1 GiB range

/// One full paged pass over [`HUGE_PREFIX`] through the target, with the proxy's CPU and its
/// RSS before, during (peak) and after. No warm-up: the pass itself is the unit measured, and
/// the targets alternate, so none of them is favoured by a warm cache.
async fn run_paged_pass(ctx: &RunContext) -> Result<Measurement> {
    let client = connect(&ctx.endpoint).await?;
    // The default user-agent (tonic/...) is kept on purpose: etcd-compat-proxy classifies it as
    // a 4 MiB client and cuts every page to fit, which is the path measured here. Only the
    // client's own receive limit is raised, so that etcd's 64 MiB pages are accepted directly.
    let mut kv = client.kv_client().max_decoding_message_size(HUGE_MAX_DECODE);
    // One small call first, so the connection exists before the idle RSS is read.
    timeout(OP_TIMEOUT, kv.get(ONE_KEY, None))
        .await
        .map_err(|_| anyhow!("the first Range got no answer within {OP_TIMEOUT:?}"))?
        .context("the first Range")?;

    let rss_idle = ctx.pids.proxy.map(procfs::rss_bytes).transpose().context("reading the proxy's idle RSS")?;
    let mut peak_rss = PeakRss::start(ctx.pids.proxy);

    let before = Sample::take(ctx.pids, &Shared::default())?;
    let mut latencies = Vec::new();
    let passed = timeout(PASS_TIMEOUT, paged_pass(&mut kv, &mut latencies)).await;
    let after = Sample::take(ctx.pids, &Shared::default())?;
    let rss_after = ctx.pids.proxy.map(procfs::rss_bytes).transpose().context("reading the proxy's RSS")?;
    let rss_peak = match peak_rss.as_mut() {
        Some(peak) => Some(peak.stop().await?),
        None => None,
    };
    let peak_from_hwm = peak_rss.as_ref().is_some_and(|peak| peak.from_hwm);
    let pages = match passed {
        Ok(pages) => pages?,
        Err(_) => bail!(
            "the pass did not finish within {PASS_TIMEOUT:?} ({} pages answered, the slowest in {})",
            latencies.len(),
            latencies.iter().max().map_or_else(|| "-".to_owned(), |&n| format_latency(Duration::from_nanos(n)))
        ),
    };
    latencies.sort_unstable();
    let at = |p| crate::stats::percentile(&latencies, p).map(Duration::from_nanos);
    Ok(Measurement {
        ops: huge_value_bytes() / MIB,
        elapsed: after.at - before.at,
        p50: at(50.0),
        p99: at(99.0),
        etcd_cpu: after.etcd_cpu.saturating_sub(before.etcd_cpu),
        proxy_cpu: after.proxy_cpu.zip(before.proxy_cpu).map(|(after, before)| after.saturating_sub(before)),
        proxy_rss: rss_peak,
        events: None,
        pass: Some(PassDetail { pages, rss_idle, rss_peak, rss_after, peak_from_hwm }),
    })
}

/// Reads every key under [`HUGE_PREFIX`] once, exactly as a legacy client pages: `limit`,
/// then from the last key + "\0" while `more`. Checks that the keys arrive once each, in
/// order, with full values, and that every `count` is the true number of keys left; returns
/// the number of pages and records each page's latency in `latencies`.
async fn paged_pass(kv: &mut KvClient, latencies: &mut Vec<u64>) -> Result<u64> {
    let mut cursor = HUGE_PREFIX.as_bytes().to_vec();
    let mut seen = 0usize;
    let mut pages = 0u64;
    loop {
        pages += 1;
        let options = GetOptions::new().with_range(HUGE_RANGE_END).with_limit(HUGE_PAGE_LIMIT as i64);
        let started = Instant::now();
        let response = timeout(PAGE_TIMEOUT, kv.get(cursor.clone(), Some(options)))
            .await
            .map_err(|_| anyhow!("page {pages} (after {seen} keys) got no answer within {PAGE_TIMEOUT:?}"))?
            .with_context(|| format!("page {pages} (after {seen} keys)"))?;
        latencies.push(nanos(started.elapsed()));
        let left = HUGE_KEYS - seen;
        ensure!(
            response.count() == left as i64,
            "page {pages}: count {} but {left} keys are left after {seen}",
            response.count()
        );
        let kvs = response.kvs();
        ensure!(kvs.len() <= HUGE_PAGE_LIMIT, "page {pages}: {} keys for limit {HUGE_PAGE_LIMIT}", kvs.len());
        // Empty pages with more=true would loop for ever.
        ensure!(!kvs.is_empty() || !response.more(), "page {pages}: no keys but more=true");
        for kv in kvs {
            let expected = huge_key(seen);
            ensure!(
                kv.key() == expected.as_bytes() && kv.value().len() == HUGE_VALUE_LEN,
                "page {pages}: key {:?} with a {}-byte value, expected {expected:?} with {HUGE_VALUE_LEN} bytes",
                String::from_utf8_lossy(kv.key()),
                kv.value().len()
            );
            seen += 1;
        }
        ensure!(
            response.more() == (seen < HUGE_KEYS),
            "page {pages}: more={} after {seen} of {HUGE_KEYS} keys",
            response.more()
        );
        match kvs.last() {
            // The smallest key after the last one read, as etcd's own clients continue.
            Some(last) if response.more() => {
                cursor = last.key().to_vec();
                cursor.push(0);
            }
            _ => return Ok(pages),
        }
    }
}

/// Samples `pid`'s VmRSS every [`RSS_SAMPLE_INTERVAL`] while `running`; returns the highest.
async fn sample_peak_rss(pid: u32, running: Arc<AtomicBool>) -> u64 {
    let mut peak = 0;
    let mut ticker = tokio::time::interval(RSS_SAMPLE_INTERVAL);
    ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
    while running.load(Ordering::Relaxed) {
        ticker.tick().await;
        // A failed read (the process just died) leaves the peak as it was; the pass reports
        // the failure itself.
        if let Ok(rss) = procfs::rss_bytes(pid) {
            peak = peak.max(rss);
        }
    }
    peak
}

/// A proxy's peak RSS over part of a run: VmHWM, reset when tracking starts (otherwise it would
/// be the peak of every earlier workload too), and the highest of VmRSS samples, for a kernel
/// that refuses the reset.
struct PeakRss {
    pid: u32,
    /// Whether the reset worked, so that VmHWM counts.
    from_hwm: bool,
    sampling: Arc<AtomicBool>,
    sampler: Option<JoinHandle<u64>>,
}

impl PeakRss {
    /// Starts tracking `pid`; `None` when there is no proxy to track.
    fn start(pid: Option<u32>) -> Option<PeakRss> {
        let pid = pid?;
        let from_hwm = match procfs::reset_peak_rss(pid) {
            Ok(()) => true,
            Err(error) => {
                eprintln!("  cannot reset the proxy's VmHWM, using 50 ms VmRSS samples only: {error:#}");
                false
            }
        };
        let sampling = Arc::new(AtomicBool::new(true));
        let sampler = Some(tokio::spawn(sample_peak_rss(pid, sampling.clone())));
        Some(PeakRss { pid, from_hwm, sampling, sampler })
    }

    /// Stops the sampling and returns the peak since [`PeakRss::start`].
    async fn stop(&mut self) -> Result<u64> {
        self.sampling.store(false, Ordering::Relaxed);
        let sampled = match self.sampler.take() {
            Some(task) => task.await.context("the RSS sampler died")?,
            None => 0,
        };
        let hwm =
            if self.from_hwm { procfs::peak_rss_bytes(self.pid).context("reading the proxy's VmHWM")? } else { 0 };
        Ok(hwm.max(sampled))
    }
}

impl Drop for PeakRss {
    // A run that fails half-way never calls stop, and its sampler must not outlive it.
    fn drop(&mut self) {
        self.sampling.store(false, Ordering::Relaxed);
    }
}

// ------------------------------------------------------------------ watch

async fn run_watch(
    ctx: &RunContext,
    watchers: usize,
    conns: usize,
    scope: WatchScope,
    rate_divisor: u32,
) -> Result<Measurement> {
    // Tracked from before the connections open: they and their streams are most of what a
    // fan-out costs the proxy in memory.
    let mut peak_rss = PeakRss::start(ctx.pids.proxy);
    let clients = connect_many(&ctx.endpoint, conns).await?;
    let shared = Arc::new(Shared::default());
    let (finished_tx, finished_rx) = watch::channel(None);
    let plan = WatchPlan {
        watched: scope.watched(),
        // Nothing else writes during the run, so every watcher must see exactly the writer's Puts.
        start_revision: current_revision(&ctx.control).await? + 1,
        epoch: Instant::now(),
        counts: Counts::Ops,
        shared: shared.clone(),
        finished: finished_rx,
    };
    let mut tasks = JoinSet::new();
    open_watchers(&mut tasks, &clients, watchers, &plan).await?;

    let interval = Duration::from_secs_f64(f64::from(rate_divisor) / f64::from(ctx.watch_rate));
    let writer = tokio::spawn(write_steadily(
        ctx.control.kv_client(),
        interval,
        plan.epoch,
        shared.clone(),
        move |n| (scope.key(n), true),
        "the watch writer, sent to etcd directly".to_owned(),
    ));
    let window = measure_window(ctx, &shared).await;
    shared.stop.store(true, Ordering::Relaxed);
    let puts = match writer.await {
        Ok(puts) => puts,
        Err(join_error) => {
            shared.fail(anyhow!("the watch writer died: {join_error}"));
            0
        }
    };
    finished_tx.send_replace(Some(puts));
    let expected = puts * watchers as u64;
    let delivered = shared.clone();
    let latencies = collect(&mut tasks, &shared, WATCH_DRAIN_TIMEOUT, move || {
        format!(
            "only {} of {expected} events ({puts} Puts x {watchers} watchers) arrived within {WATCH_DRAIN_TIMEOUT:?} after the writer stopped",
            delivered.done.load(Ordering::Relaxed)
        )
    })
    .await?;
    let mut measurement = finish(window?, &latencies);
    if let Some(peak) = peak_rss.as_mut() {
        measurement.proxy_rss = Some(peak.stop().await?);
    }
    Ok(measurement)
}

/// Puts `interval` apart until `shared.stop`, each Put to the key `key_of(n)` gives for the
/// `n`th; returns how many Puts went to keys it marked watched.
async fn write_steadily(
    mut kv: KvClient,
    interval: Duration,
    epoch: Instant,
    shared: Arc<Shared>,
    key_of: impl Fn(u64) -> (String, bool),
    who: String,
) -> u64 {
    let mut ticker = tokio::time::interval(interval);
    // A late tick must not be followed by a burst: the pace is the point.
    ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut puts = 0;
    let mut watched_puts = 0;
    loop {
        ticker.tick().await;
        if shared.stop.load(Ordering::Relaxed) || shared.failed() {
            return watched_puts;
        }
        let sent_micros = u64::try_from(epoch.elapsed().as_micros()).unwrap_or(u64::MAX);
        let mut value = sent_micros.to_le_bytes().to_vec();
        value.resize(WATCH_VALUE_LEN, b'w');
        let (key, watched) = key_of(puts);
        match timeout(OP_TIMEOUT, kv.put(key, value, None)).await {
            Ok(Ok(_)) => {
                puts += 1;
                watched_puts += u64::from(watched);
            }
            Ok(Err(error)) => {
                shared.fail(anyhow::Error::new(error).context(format!("Put by {who}")));
                return watched_puts;
            }
            Err(_) => {
                shared.fail(anyhow!("a Put by {who} got no answer within {OP_TIMEOUT:?}"));
                return watched_puts;
            }
        }
    }
}

/// What a watcher's events are to its workload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Counts {
    /// The ops themselves: counted in `done`, their latency recorded while the window is open.
    Ops,
    /// Load beside the ops (the fleet's polls): counted in `events` only.
    Events,
}

/// What every watcher of one run shares.
struct WatchPlan {
    watched: Watched,
    start_revision: i64,
    /// The writers' timestamps count from here.
    epoch: Instant,
    counts: Counts,
    shared: Arc<Shared>,
    /// Becomes `Some(puts)` once the writers stopped after `puts` Puts to watched keys.
    finished: watch::Receiver<Option<u64>>,
}

/// Opens `count` watch streams as `plan` says, spread over `clients`, and waits until every
/// one was created, so that the window measures delivery, not setup.
async fn open_watchers(
    tasks: &mut JoinSet<Vec<u64>>,
    clients: &[Client],
    count: usize,
    plan: &WatchPlan,
) -> Result<()> {
    let created = Arc::new(AtomicUsize::new(0));
    for index in 0..count {
        let watcher = Watcher {
            index,
            client: clients[index % clients.len()].watch_client(),
            watched: plan.watched,
            start_revision: plan.start_revision,
            epoch: plan.epoch,
            counts: plan.counts,
            shared: plan.shared.clone(),
            created: created.clone(),
            finished: plan.finished.clone(),
        };
        tasks.spawn(watcher.run());
    }
    let setup_deadline = Instant::now() + WATCH_SETUP_TIMEOUT;
    while created.load(Ordering::Relaxed) < count {
        if let Some(error) = plan.shared.error() {
            bail!("creating watchers: {error}");
        }
        if Instant::now() >= setup_deadline {
            bail!(
                "only {} of {count} watchers were created within {WATCH_SETUP_TIMEOUT:?}",
                created.load(Ordering::Relaxed)
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

/// One watch stream and the checks on what it receives.
struct Watcher {
    index: usize,
    client: WatchClient,
    watched: Watched,
    start_revision: i64,
    epoch: Instant,
    counts: Counts,
    shared: Arc<Shared>,
    created: Arc<AtomicUsize>,
    /// Becomes `Some(puts)` once the writers stopped after `puts` Puts to watched keys.
    finished: watch::Receiver<Option<u64>>,
}

impl Watcher {
    async fn run(mut self) -> Vec<u64> {
        let shared = self.shared.clone();
        let index = self.index;
        match self.receive().await {
            Ok(latencies) => latencies,
            Err(error) => {
                shared.fail(error.context(format!("watcher {index}")));
                Vec::new()
            }
        }
    }

    async fn receive(&mut self) -> Result<Vec<u64>> {
        let options = self.watched.options(self.start_revision);
        let mut stream = timeout(OP_TIMEOUT, self.client.watch(self.watched.key, Some(options)))
            .await
            .map_err(|_| anyhow!("the Watch call got no answer within {OP_TIMEOUT:?}"))?
            .context("starting the Watch call")?;
        let mut latencies = Vec::new();
        let mut received = 0u64;
        let mut last_revision = self.start_revision - 1;
        let mut is_created = false;
        loop {
            if let Some(expected) = *self.finished.borrow_and_update() {
                if received >= expected {
                    ensure!(received == expected, "received {received} events for {expected} Puts");
                    return Ok(latencies);
                }
            }
            if self.shared.failed() {
                // Someone else's failure ends the run; it is reported, not this watcher.
                return Ok(latencies);
            }
            let message = tokio::select! {
                message = stream.message() => message,
                changed = self.finished.changed() => {
                    changed.map_err(|_| anyhow!("the run ended while the watcher waited"))?;
                    continue;
                }
            };
            let response = message.context("receiving watch events")?.ok_or_else(|| anyhow!("watch stream ended"))?;
            if response.created() && !is_created {
                is_created = true;
                self.created.fetch_add(1, Ordering::Relaxed);
            }
            ensure!(
                !response.canceled(),
                "watch canceled by the server: {:?} (compact revision {})",
                response.cancel_reason(),
                response.compact_revision()
            );
            for event in response.events() {
                ensure!(is_created, "events arrived before the 'created' response");
                ensure!(event.event_type() == EventType::Put, "unexpected {:?} event", event.event_type());
                let kv = event.kv().ok_or_else(|| anyhow!("event without a key-value"))?;
                ensure!(
                    self.watched.contains(kv.key()),
                    "event for key {:?}, watched {:?}{}",
                    String::from_utf8_lossy(kv.key()),
                    self.watched.key,
                    if self.watched.prefix { " as a prefix" } else { "" }
                );
                ensure!(
                    kv.mod_revision() > last_revision,
                    "event at revision {} after revision {last_revision}",
                    kv.mod_revision()
                );
                last_revision = kv.mod_revision();
                let stamp: [u8; 8] = kv
                    .value()
                    .get(..8)
                    .and_then(|bytes| bytes.try_into().ok())
                    .ok_or_else(|| anyhow!("event value of {} bytes has no timestamp", kv.value().len()))?;
                received += 1;
                match self.counts {
                    Counts::Ops => {
                        if self.shared.measuring.load(Ordering::Relaxed) {
                            let sent = Duration::from_micros(u64::from_le_bytes(stamp));
                            latencies.push(nanos(self.epoch.elapsed().saturating_sub(sent)));
                        }
                        self.shared.done.fetch_add(1, Ordering::Relaxed);
                    }
                    Counts::Events => {
                        self.shared.events.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }
    }
}

// ------------------------------------------------------------------ fleet

/// The legacy fleet ([`Kind::Fleet`]): its agents' watch streams are opened first, then the
/// agents poll and the writers write, through the target, for the warm-up and the window.
async fn run_fleet(ctx: &RunContext) -> Result<Measurement> {
    let agents = ctx.fleet_agents;
    let mut peak_rss = PeakRss::start(ctx.pids.proxy);
    let clients = connect_many(&ctx.endpoint, conns_for(agents)).await?;
    // The writers stand for the fleet's control plane: clients of their own, not agents.
    let writer_clients = connect_many(&ctx.endpoint, FLEET_WRITERS as usize).await?;
    let shared = Arc::new(Shared::default());
    let (finished_tx, finished_rx) = watch::channel(None);
    let plan = WatchPlan {
        watched: Watched { key: FLEET_JOBS, prefix: true },
        // Only the writers write during the run, so every agent must see every job they Put.
        start_revision: current_revision(&ctx.control).await? + 1,
        epoch: Instant::now(),
        counts: Counts::Events,
        shared: shared.clone(),
        finished: finished_rx,
    };
    let mut tasks = JoinSet::new();
    open_watchers(&mut tasks, &clients, agents, &plan).await?;

    for agent in 0..agents {
        let kv = clients[agent % clients.len()].kv_client();
        // A fleet's agents do not poll in step: their first polls are spread over one pause.
        let stagger = FLEET_POLL_PAUSE.mul_f64(agent as f64 / agents as f64);
        let shared = shared.clone();
        tasks.spawn(async move {
            tokio::time::sleep(stagger).await;
            unary_worker(agent, agents, kv, UnaryOp::Get(FLEET_POLL), FLEET_POLL_PAUSE, shared).await
        });
    }
    let mut writers = JoinSet::new();
    for (writer, client) in (0u64..).zip(&writer_clients) {
        // The writers change the config half a cycle apart, so it changes at an even pace.
        let config_turn = writer * FLEET_CONFIG_EVERY / FLEET_WRITERS;
        let key_of = move |n: u64| {
            if n % FLEET_CONFIG_EVERY == config_turn {
                (FLEET_CONFIG.to_owned(), false)
            } else {
                (format!("{FLEET_JOBS}w{writer}-{:02}", n % FLEET_JOB_KEYS), true)
            }
        };
        writers.spawn(write_steadily(
            client.kv_client(),
            FLEET_WRITE_INTERVAL,
            plan.epoch,
            shared.clone(),
            key_of,
            format!("fleet writer {writer}, through the target"),
        ));
    }
    let window = measure_window(ctx, &shared).await;
    shared.stop.store(true, Ordering::Relaxed);
    let mut puts = 0;
    while let Some(joined) = writers.join_next().await {
        match joined {
            Ok(watched_puts) => puts += watched_puts,
            Err(join_error) => shared.fail(anyhow!("a fleet writer died: {join_error}")),
        }
    }
    finished_tx.send_replace(Some(puts));
    let expected = puts * agents as u64;
    let delivered = shared.clone();
    let latencies = collect(&mut tasks, &shared, WATCH_DRAIN_TIMEOUT, move || {
        format!(
            "only {} of {expected} events ({puts} job Puts x {agents} agents) arrived within {WATCH_DRAIN_TIMEOUT:?} \
             after the writers stopped, or a poll was still unanswered",
            delivered.events.load(Ordering::Relaxed)
        )
    })
    .await?;
    let window = window?;
    let events = window.events;
    let mut measurement = finish(window, &latencies);
    measurement.events = Some(events);
    if let Some(peak) = peak_rss.as_mut() {
        measurement.proxy_rss = Some(peak.stop().await?);
    }
    Ok(measurement)
}

// ------------------------------------------------------------------ lease keep-alive

async fn run_keepalive(ctx: &RunContext, streams: usize, conns: usize) -> Result<Measurement> {
    let clients = connect_many(&ctx.endpoint, conns).await?;
    let mut granted = Vec::with_capacity(streams);
    let mut lease = clients[0].lease_client();
    let mut result = async {
        for _ in 0..streams {
            let grant = timeout(OP_TIMEOUT, lease.grant(LEASE_TTL, None))
                .await
                .map_err(|_| anyhow!("LeaseGrant got no answer within {OP_TIMEOUT:?}"))?
                .context("LeaseGrant")?;
            ensure!(grant.ttl() > 0, "LeaseGrant answered TTL {}: {}", grant.ttl(), grant.error());
            granted.push(grant.id());
        }
        keep_alive_phase(ctx, &clients, &granted).await
    }
    .await;
    // Leases go away whatever happened, so none pile up across runs; the revoke goes to etcd
    // directly because the target may be the thing that broke.
    let mut control = ctx.control.lease_client();
    for id in granted {
        if let Err(error) = control.revoke(id).await {
            if result.is_ok() {
                result = Err(anyhow::Error::new(error).context(format!("revoking lease {id:x} after the run")));
            }
        }
    }
    result
}

async fn keep_alive_phase(ctx: &RunContext, clients: &[Client], leases: &[i64]) -> Result<Measurement> {
    let shared = Arc::new(Shared::default());
    let mut workers = JoinSet::new();
    for (index, &id) in leases.iter().enumerate() {
        let lease = clients[index % clients.len()].lease_client();
        let shared = shared.clone();
        workers.spawn(async move {
            match keep_alive_loop(id, lease, &shared).await {
                Ok(latencies) => latencies,
                Err(error) => {
                    shared.fail(error.context(format!("keep-alive stream of lease {id:x}")));
                    Vec::new()
                }
            }
        });
    }
    let window = measure_window(ctx, &shared).await;
    shared.stop.store(true, Ordering::Relaxed);
    let latencies = collect(&mut workers, &shared, STOP_GRACE, || {
        format!("keep-alives still unanswered {STOP_GRACE:?} after the window closed")
    })
    .await?;
    Ok(finish(window?, &latencies))
}

async fn keep_alive_loop(id: i64, mut lease: LeaseClient, shared: &Shared) -> Result<Vec<u64>> {
    // Opening the stream already sends one keep-alive and waits for its answer.
    let (mut keeper, mut stream) = timeout(OP_TIMEOUT, lease.keep_alive(id))
        .await
        .map_err(|_| anyhow!("opening the stream got no answer within {OP_TIMEOUT:?}"))?
        .context("opening the LeaseKeepAlive stream")?;
    let mut latencies = Vec::new();
    while !shared.stop.load(Ordering::Relaxed) && !shared.failed() {
        let started = Instant::now();
        keeper.keep_alive().await.context("sending a keep-alive")?;
        let response = timeout(OP_TIMEOUT, stream.message())
            .await
            .map_err(|_| anyhow!("a keep-alive got no answer within {OP_TIMEOUT:?}"))?
            .context("receiving a keep-alive answer")?
            .ok_or_else(|| anyhow!("the keep-alive stream ended"))?;
        ensure!(response.id() == id, "keep-alive answer for lease {:x}", response.id());
        ensure!(response.ttl() > 0, "keep-alive answered TTL {}: the lease is gone", response.ttl());
        shared.record(&mut latencies, started);
    }
    Ok(latencies)
}
