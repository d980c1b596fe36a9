//! `etcd-compat-proxy migrate`: moves the clients' cluster to a new one through the running
//! proxy's admin address (`--metrics-addr`), where the migration itself runs.
//!
//! Exit codes: 0 done (for `verify`: equal), 1 done but not well (`verify`: different;
//! `status`: the mirror failed), 2 the command could not run (flags, the proxy, etcd).

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use bytes::Bytes;
use clap::{Args, Subcommand, ValueEnum};
use http::{header, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use serde::Deserialize;

use super::start::read_admin_token;
use crate::migrate::snapshot_file::read_snapshot_facts;

/// How long a connection to the admin address may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// `etcd-compat-proxy migrate` and its subcommands.
#[derive(Debug, Args)]
#[command(
    about = "Move clients to a new cluster, revision for revision, through the running proxy",
    long_about = "Move clients to a new cluster, revision for revision, through the running proxy.\n\n\
        Runbook: `migrate snapshot` (then restore the new cluster from it with the printed commands), \
        `migrate mirror` (the proxy replays every later revision onto it), `migrate status` and \
        `migrate verify` while it runs, `migrate abort` to stop. Calls other than status need the \
        proxy's --admin-token-file. Exit codes: 0 done (verify: equal), 1 done but not well (verify: \
        different, status: failed), 2 could not run."
)]
pub struct MigrateArgs {
    #[command(flatten)]
    pub admin: AdminArgs,
    #[command(subcommand)]
    pub command: MigrateCommand,
}

/// How to reach the running proxy's admin address.
#[derive(Debug, Args)]
pub struct AdminArgs {
    /// The proxy's admin address (its --metrics-addr), e.g. `http://127.0.0.1:6633`.
    #[arg(long, global = true, env = "ETCD_COMPAT_PROXY_ADMIN", value_name = "URL")]
    pub admin: Option<String>,
    /// File holding the proxy's admin token (the proxy's --admin-token-file).
    #[arg(long, global = true, env = "ETCD_COMPAT_PROXY_ADMIN_TOKEN_FILE", value_name = "FILE")]
    pub admin_token_file: Option<PathBuf>,
    /// The proxy's TOML file: `admin` (or else `metrics-addr`) and `admin-token-file` are read from it when not given otherwise.
    #[arg(long, global = true, env = "ETCD_COMPAT_PROXY_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
}

/// What `migrate` can do.
#[derive(Debug, Subcommand)]
pub enum MigrateCommand {
    /// Stream a snapshot of the current cluster to a file, and print how to seed the new cluster from it.
    Snapshot(SnapshotArgs),
    /// Start replaying every later revision onto the new cluster seeded from the snapshot.
    Mirror(MirrorArgs),
    /// Show where the migration stands.
    Status(OutputArgs),
    /// Compare the current and the new cluster at the mirror's revision.
    Verify(OutputArgs),
    /// Hold writes for a moment, let the mirror catch up, and switch clients to the new cluster.
    Cutover(CutoverArgs),
    /// Stop mirroring; clients stay on the current cluster.
    Abort(OutputArgs),
}

/// `migrate snapshot`.
#[derive(Debug, Args)]
pub struct SnapshotArgs {
    /// Where to write the snapshot.
    #[arg(long, value_name = "FILE")]
    pub out: PathBuf,
    /// Replace FILE if it exists.
    #[arg(long)]
    pub force: bool,
    /// Members of the new cluster, for the printed restore commands.
    #[arg(long, value_name = "N", default_value_t = 3)]
    pub members: usize,
}

/// `migrate mirror`.
#[derive(Debug, Args)]
pub struct MirrorArgs {
    /// The new cluster's client endpoints, comma-separated (`https://` or TLS files make them TLS).
    #[arg(long, value_name = "ENDPOINTS", value_delimiter = ',', required = true)]
    pub to: Vec<String>,
    /// CA bundle (PEM) of the new cluster's server certificates; repeatable. Paths are read by the proxy.
    #[arg(long, value_name = "FILE", value_delimiter = ',')]
    pub to_cacert: Vec<PathBuf>,
    /// Client certificate (PEM) the proxy presents to the new cluster.
    #[arg(long, value_name = "FILE")]
    pub to_cert: Option<PathBuf>,
    /// Private key (PEM) for --to-cert.
    #[arg(long, value_name = "FILE")]
    pub to_key: Option<PathBuf>,
}

/// `migrate cutover`.
#[derive(Debug, Args)]
pub struct CutoverArgs {
    /// The longest writes may be held while the mirror catches up, e.g. `2s`, `500ms`; if it
    /// does not catch up in time, nothing changes and the held writes go on to the current cluster.
    #[arg(long, value_name = "DURATION", default_value = "5s", value_parser = parse_hold)]
    pub max_hold: Duration,
    #[command(flatten)]
    pub output: OutputArgs,
}

fn parse_hold(raw: &str) -> Result<Duration, String> {
    super::start::parse_duration(raw)
        .filter(|d| !d.is_zero() && *d <= Duration::from_secs(60))
        .ok_or_else(|| "expected a duration from 1ms to 60s, such as 500ms or 2s".to_owned())
}

/// `--output` for the commands that report.
#[derive(Debug, Args)]
pub struct OutputArgs {
    /// `text` for people, `json` for scripts.
    #[arg(long, value_enum, default_value_t = Output::Text)]
    pub output: Output,
}

/// Report formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Output {
    Text,
    Json,
}

/// A command that could not run, with what to do.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct Failed(String);

/// Runs `migrate` and returns its exit code.
pub fn run(args: MigrateArgs) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("etcd-compat-proxy migrate: cannot start the async runtime: {error}");
            return ExitCode::from(2);
        }
    };
    match runtime.block_on(execute(args)) {
        Ok(code) => code,
        Err(Failed(message)) => {
            eprintln!("etcd-compat-proxy migrate: {message}");
            ExitCode::from(2)
        }
    }
}

async fn execute(args: MigrateArgs) -> Result<ExitCode, Failed> {
    let admin = AdminClient::from_args(args.admin)?;
    match args.command {
        MigrateCommand::Snapshot(snapshot) => take_snapshot(&admin, snapshot).await,
        MigrateCommand::Mirror(mirror) => start_mirror(&admin, mirror).await,
        MigrateCommand::Status(output) => {
            let body = admin.call(Method::GET, "/migrate/status", None).await?;
            let status: StatusReport = parse(&body)?;
            print_report(output.output, &body, || status.summary());
            Ok(if status.phase == "failed" { ExitCode::from(1) } else { ExitCode::SUCCESS })
        }
        MigrateCommand::Verify(output) => {
            let body = admin.call(Method::POST, "/migrate/verify", Some(Vec::new())).await?;
            let comparison: ComparisonReport = parse(&body)?;
            print_report(output.output, &body, || comparison.summary());
            Ok(if comparison.equal { ExitCode::SUCCESS } else { ExitCode::from(1) })
        }
        MigrateCommand::Cutover(cutover) => {
            let request = serde_json::json!({ "max_hold_ms": cutover.max_hold.as_millis() as u64 });
            let body = serde_json::to_vec(&request).map_err(|e| Failed(format!("cannot encode the request: {e}")))?;
            let answer = admin.call(Method::POST, "/migrate/cutover", Some(body)).await?;
            let report: CutoverReport = parse(&answer)?;
            print_report(cutover.output.output, &answer, || {
                format!(
                    "Cut over at revision {}: writes were held for {} ms; clients are now served by {}.",
                    report.revision,
                    report.held_ms,
                    report.serving.join(",")
                )
            });
            Ok(ExitCode::SUCCESS)
        }
        MigrateCommand::Abort(output) => {
            let body = admin.call(Method::POST, "/migrate/abort", Some(Vec::new())).await?;
            let status: StatusReport = parse(&body)?;
            print_report(output.output, &body, || {
                format!("Mirroring stopped; clients stay on the current cluster.\n{}", status.summary())
            });
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn print_report(output: Output, json: &[u8], text: impl FnOnce() -> String) {
    match output {
        Output::Json => print!("{}", String::from_utf8_lossy(json)),
        Output::Text => println!("{}", text()),
    }
}

fn parse<'a, T: Deserialize<'a>>(body: &'a [u8]) -> Result<T, Failed> {
    serde_json::from_slice(body).map_err(|error| {
        Failed(format!("the proxy's answer is not what this command expects ({error}); are the proxy and this binary the same release?"))
    })
}

/// The running proxy's admin address and token.
struct AdminClient {
    authority: http::uri::Authority,
    token: Option<crate::auth::Secret>,
    shown: String,
}

impl AdminClient {
    fn from_args(args: AdminArgs) -> Result<Self, Failed> {
        let file = match &args.config {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .map_err(|e| Failed(format!("cannot read --config {}: {e}", path.display())))?;
                let table: toml::Table =
                    toml::from_str(&text).map_err(|e| Failed(format!("invalid --config {}: {e}", path.display())))?;
                Some(table)
            }
            None => None,
        };
        let from_file = |key: &str| file.as_ref().and_then(|t| t.get(key)).and_then(|v| v.as_str()).map(str::to_owned);
        let raw = args.admin.or_else(|| from_file("admin")).or_else(|| from_file("metrics-addr")).ok_or_else(|| {
            Failed("no admin address: pass --admin URL (the proxy's --metrics-addr), or --config with the proxy's TOML file".to_owned())
        })?;
        let trimmed = raw.trim().trim_end_matches('/');
        let rest = trimmed.strip_prefix("http://").unwrap_or(trimmed);
        if rest.contains("://") {
            return Err(Failed(format!("--admin {raw:?}: the admin address is plain http://host:port")));
        }
        let authority: http::uri::Authority =
            rest.parse().map_err(|_| Failed(format!("--admin {raw:?}: expected http://host:port")))?;
        if authority.port_u16().is_none() {
            return Err(Failed(format!("--admin {raw:?}: the port is missing")));
        }
        let token_file = args.admin_token_file.or_else(|| from_file("admin-token-file").map(PathBuf::from));
        let token =
            token_file.as_deref().map(read_admin_token).transpose().map_err(|error| Failed(error.to_string()))?;
        Ok(AdminClient { shown: format!("http://{authority}"), authority, token })
    }

    /// Sends one call and returns the answer's body, or the proxy's error as a failure.
    async fn call(&self, method: Method, path: &str, body: Option<Vec<u8>>) -> Result<Vec<u8>, Failed> {
        let response = self.send(method, path, body).await?;
        let status = response.status();
        let body = response
            .into_body()
            .collect()
            .await
            .map_err(|e| Failed(format!("the answer from {} broke: {e}", self.shown)))?
            .to_bytes();
        if status.is_success() {
            Ok(body.to_vec())
        } else {
            Err(refusal(status, &body))
        }
    }

    async fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<http::Response<hyper::body::Incoming>, Failed> {
        let unreachable = |e: &dyn std::fmt::Display| {
            Failed(format!(
                "cannot reach the proxy's admin address {}: {e}; is the proxy running with --metrics-addr?",
                self.shown
            ))
        };
        let address = format!("{}:{}", self.authority.host(), self.authority.port_u16().unwrap_or(80));
        let stream = tokio::time::timeout(CONNECT_TIMEOUT, tokio::net::TcpStream::connect(&address))
            .await
            .map_err(|_| unreachable(&"no answer within 5s"))?
            .map_err(|e| unreachable(&e))?;
        let (mut sender, connection) =
            hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.map_err(|e| unreachable(&e))?;
        tokio::spawn(async move {
            let _ = connection.await;
        });
        let mut request = Request::builder().method(method).uri(path).header(header::HOST, self.authority.as_str());
        if let Some(token) = &self.token {
            let mut value = b"Bearer ".to_vec();
            value.extend_from_slice(token.expose());
            let mut value = header::HeaderValue::from_bytes(&value)
                .map_err(|_| Failed("the admin token file holds characters a header cannot carry".to_owned()))?;
            value.set_sensitive(true);
            request = request.header(header::AUTHORIZATION, value);
        }
        if body.is_some() {
            request = request.header(header::CONTENT_TYPE, "application/json");
        }
        let request = request
            .body(Full::new(Bytes::from(body.unwrap_or_default())))
            .map_err(|e| Failed(format!("cannot build the request: {e}")))?;
        sender.send_request(request).await.map_err(|e| unreachable(&e))
    }
}

/// The proxy's refusal in its own words.
fn refusal(status: StatusCode, body: &[u8]) -> Failed {
    #[derive(Deserialize)]
    struct Refusal {
        error: String,
    }
    match serde_json::from_slice::<Refusal>(body) {
        Ok(refusal) => Failed(refusal.error),
        Err(_) => Failed(format!("the proxy answered {status}: {}", String::from_utf8_lossy(body).trim())),
    }
}

async fn take_snapshot(admin: &AdminClient, args: SnapshotArgs) -> Result<ExitCode, Failed> {
    if args.out.exists() && !args.force {
        return Err(Failed(format!("{} exists; pass --force to replace it", args.out.display())));
    }
    let partial = partial_path(&args.out);
    let response = admin.send(Method::GET, "/migrate/snapshot", None).await?;
    let status = response.status();
    if !status.is_success() {
        let body = response.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
        return Err(refusal(status, &body));
    }
    let expected = response
        .headers()
        .get("x-etcd-snapshot-bytes")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let mut file =
        std::fs::File::create(&partial).map_err(|e| Failed(format!("cannot create {}: {e}", partial.display())))?;
    let mut progress = Progress::new(expected);
    let mut body = response.into_body();
    let mut written = 0u64;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| {
            let _ = std::fs::remove_file(&partial);
            Failed(format!("the snapshot stream broke after {written} bytes: {e}; take the snapshot again"))
        })?;
        if let Ok(data) = frame.into_data() {
            file.write_all(&data).map_err(|e| unwritable(&partial, &e))?;
            written += data.len() as u64;
            progress.show(written);
        }
    }
    file.sync_all().map_err(|e| unwritable(&partial, &e))?;
    drop(file);
    progress.finish(written);
    let facts = read_snapshot_facts(&partial).map_err(|error| {
        let _ = std::fs::remove_file(&partial);
        Failed(error.to_string())
    })?;
    std::fs::rename(&partial, &args.out)
        .map_err(|e| Failed(format!("cannot move {} to {}: {e}", partial.display(), args.out.display())))?;
    println!(
        "Snapshot written to {}: {} bytes, revision {}{}, {} keys{}.",
        args.out.display(),
        written,
        facts.revision,
        if facts.compact_revision > 0 { format!(" (compacted at {})", facts.compact_revision) } else { String::new() },
        facts.total_keys,
        if facts.has_integrity_hash { ", SHA-256 checked" } else { "" }
    );
    println!("{}", restore_commands(&args.out, facts.revision, args.members.max(1), admin));
    Ok(ExitCode::SUCCESS)
}

/// A snapshot file that could not be written (a full disk): removed, so that no partial
/// snapshot is left to be restored by mistake.
fn unwritable(partial: &Path, error: &std::io::Error) -> Failed {
    let _ = std::fs::remove_file(partial);
    Failed(format!(
        "cannot write {}: {error}; nothing was kept, free space and take the snapshot again",
        partial.display()
    ))
}

fn partial_path(out: &Path) -> PathBuf {
    let mut name = out.file_name().map(|n| n.to_os_string()).unwrap_or_default();
    name.push(".part");
    out.with_file_name(name)
}

/// The commands that seed a new cluster of `members` from `file`, with placeholders to fill in.
fn restore_commands(file: &Path, revision: i64, members: usize, admin: &AdminClient) -> String {
    let names: Vec<String> = (1..=members).map(|i| format!("NAME_{i}")).collect();
    let cluster: Vec<String> =
        names.iter().enumerate().map(|(i, n)| format!("{n}=https://PEER_HOST_{}:2380", i + 1)).collect();
    let mut text = format!(
        "\nSeed the new cluster from it: on each new member, with etcd 3.5's etcdutl (etcd 3.4: `etcdctl snapshot \
         restore`, same flags), before its first start. Fill in the names, peer URLs and data directories; the \
         cluster token must be new. The new cluster starts at revision {revision}, with the same keys, revisions, \
         leases, users and roles.\n"
    );
    for (i, name) in names.iter().enumerate() {
        text.push_str(&format!(
            "  etcdutl snapshot restore {} --name {name} --data-dir DATA_DIR_{n} --initial-cluster {} \
             --initial-cluster-token NEW_CLUSTER_TOKEN --initial-advertise-peer-urls https://PEER_HOST_{n}:2380\n",
            file.display(),
            cluster.join(","),
            n = i + 1
        ));
    }
    let endpoints: Vec<String> = (1..=members).map(|i| format!("https://CLIENT_HOST_{i}:2379")).collect();
    text.push_str(&format!(
        "\nStart the new members on those data directories (--data-dir), keep every client away from them, and \
         start the mirror before the current cluster compacts past revision {revision}:\n  etcd-compat-proxy \
         migrate mirror --admin {} --to {} [--to-cacert CA --to-cert CERT --to-key KEY]",
        admin.shown,
        endpoints.join(",")
    ));
    text
}

/// Bytes written, on one terminal line that is rewritten at most ten times a second.
struct Progress {
    expected: Option<u64>,
    terminal: bool,
    shown: Instant,
}

impl Progress {
    fn new(expected: Option<u64>) -> Self {
        Progress { expected, terminal: std::io::stderr().is_terminal(), shown: Instant::now() }
    }

    fn show(&mut self, written: u64) {
        if self.shown.elapsed() >= Duration::from_millis(100) {
            self.draw(written);
        }
    }

    /// The last state, whatever the time since the previous one, and the end of the line.
    fn finish(&mut self, written: u64) {
        self.draw(written);
        if self.terminal {
            eprintln!();
        }
    }

    fn draw(&mut self, written: u64) {
        if !self.terminal {
            return;
        }
        self.shown = Instant::now();
        let mib = |bytes: u64| bytes as f64 / (1024.0 * 1024.0);
        let line = match self.expected.filter(|e| *e > 0) {
            Some(expected) => {
                let done = (written.min(expected) * 40 / expected) as usize;
                format!(
                    "snapshot [{}{}] {:.1} / {:.1} MiB",
                    "#".repeat(done),
                    " ".repeat(40 - done),
                    mib(written),
                    mib(expected)
                )
            }
            None => format!("snapshot {:.1} MiB", mib(written)),
        };
        eprint!("\r{line}");
    }
}

async fn start_mirror(admin: &AdminClient, args: MirrorArgs) -> Result<ExitCode, Failed> {
    // The proxy reads the files, from its own working directory: relative paths are made whole here.
    let absolute = |path: PathBuf| std::path::absolute(&path).unwrap_or(path);
    let request = serde_json::json!({
        "to": args.to,
        "to_cacert": args.to_cacert.into_iter().map(absolute).collect::<Vec<_>>(),
        "to_cert": args.to_cert.map(absolute),
        "to_key": args.to_key.map(absolute),
    });
    let body = serde_json::to_vec(&request).map_err(|e| Failed(format!("cannot encode the request: {e}")))?;
    let answer = admin.call(Method::POST, "/migrate/mirror", Some(body)).await?;
    #[derive(Deserialize)]
    struct Started {
        seed_revision: i64,
    }
    let started: Started = parse(&answer)?;
    println!(
        "Mirroring: the new cluster holds the current one's data at revision {}, and the proxy now replays every \
         later revision onto it. Follow it with `etcd-compat-proxy migrate status --admin {}`.",
        started.seed_revision, admin.shown
    );
    Ok(ExitCode::SUCCESS)
}

/// `GET /migrate/status`, as far as this command shows it.
#[derive(Debug, Deserialize)]
struct StatusReport {
    phase: String,
    source_revision: i64,
    applied_revision: i64,
    lag_revisions: i64,
    error: Option<String>,
    seed_revision: Option<i64>,
    target: Option<Vec<String>>,
    transactions: u64,
    leases_granted: u64,
    leases_revoked: u64,
}

impl StatusReport {
    fn summary(&self) -> String {
        let mut lines = vec![format!("phase:            {}", self.phase)];
        if let Some(target) = &self.target {
            lines.push(format!("target:           {}", target.join(",")));
        }
        if let Some(seed) = self.seed_revision {
            lines.push(format!("seeded at:        revision {seed}"));
            lines.push(format!("source revision:  {}", self.source_revision));
            lines.push(format!("applied revision: {} (lag {} revisions)", self.applied_revision, self.lag_revisions));
            lines.push(format!(
                "replayed:         {} transactions; leases {} granted, {} revoked",
                self.transactions, self.leases_granted, self.leases_revoked
            ));
        }
        if let Some(error) = &self.error {
            lines.push(format!("error:            {error}"));
        }
        lines.join("\n")
    }
}

/// `POST /migrate/cutover`'s answer.
#[derive(Debug, Deserialize)]
struct CutoverReport {
    revision: i64,
    held_ms: u64,
    serving: Vec<String>,
}

/// `POST /migrate/verify`'s answer.
#[derive(Debug, Deserialize)]
struct ComparisonReport {
    revision: i64,
    equal: bool,
    method: String,
    keys_compared: u64,
    differences: u64,
    first_differences: Vec<String>,
}

impl ComparisonReport {
    fn summary(&self) -> String {
        let how = match self.method.as_str() {
            "hashkv" => "HashKV".to_owned(),
            _ => format!("{} keys compared one by one", self.keys_compared),
        };
        if self.equal {
            return format!("equal at revision {} ({how})", self.revision);
        }
        let mut text = format!("different at revision {} ({how}): {} key(s) differ", self.revision, self.differences);
        for line in &self.first_differences {
            text.push_str(&format!("\n  {line}"));
        }
        text
    }
}
