//! What the proxy tests share: a real etcd cluster with the proxy in front of it, starting and
//! running the proxy binary, clients and calls, reading `/health` and `/metrics`, and the checks
//! every failover test makes of writes that met a failing member.

use std::fmt::Display;
use std::io::Read;
use std::net::SocketAddr;
use std::ops::Range;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use etcd_client::{Client, GetOptions, WatchStream};
use etcd_compat_certs::DevPki;
use etcd_compat_tests::{ClientTls, ClusterSpec, EtcdCluster, EtcdVersion, ProxyProcess, TlsSpec};
use http::{HeaderMap, Request};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tempfile::TempDir;

/// The proxy binary built from this workspace (a thin copy of `proxy/src/main.rs`, so that
/// cargo builds it for these tests).
pub const PROXY_BIN: &str = env!("CARGO_BIN_EXE_etcd-compat-proxy-under-test");

/// Defines `#[test]`s `$test_3_4` and `$test_3_5` calling `$base(EtcdVersion::V3_4 / V3_5, args...)`.
macro_rules! both_versions {
    ($base:ident $(($($arg:expr),+))? => $test_3_4:ident, $test_3_5:ident) => {
        #[test]
        fn $test_3_4() {
            $base(::etcd_compat_tests::EtcdVersion::V3_4 $($(, $arg)+)?);
        }

        #[test]
        fn $test_3_5() {
            $base(::etcd_compat_tests::EtcdVersion::V3_5 $($(, $arg)+)?);
        }
    };
}
pub(crate) use both_versions;

/// Whether TLS is on between client and proxy and between proxy and etcd.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wire {
    /// Plaintext both sides (the sidecar setup).
    Plain,
    /// TLS with client certificates on both sides, with two unrelated CAs: the client trusts
    /// only the proxy's CA, the proxy trusts only the cluster's.
    Tls,
}

/// etcd behind the proxy.
pub struct Deployment {
    /// The cluster.
    pub cluster: EtcdCluster,
    /// The proxy in front of every member.
    pub proxy: ProxyProcess,
    /// What a client needs to reach the proxy (TLS only).
    pub client_tls: Option<ClientTls>,
    /// The proxy's address as a client endpoint (`https://` with TLS).
    pub endpoint: String,
    _pki_dir: TempDir,
}

impl Deployment {
    /// Starts `members` members of `version` and the proxy in front of them; `extra` goes to the proxy.
    pub fn start(version: EtcdVersion, members: usize, wire: Wire, extra: &[&str]) -> Deployment {
        Self::start_with(ClusterSpec::new(version, members), wire, extra)
    }

    /// Like [`Deployment::start`] with a custom cluster spec (TLS is added for [`Wire::Tls`]).
    pub fn start_with(spec: ClusterSpec, wire: Wire, extra: &[&str]) -> Deployment {
        let pki_dir = tempfile::tempdir().expect("pki dir");
        let (spec, proxy_tls_args, client_tls) = match wire {
            Wire::Plain => (spec, Vec::new(), None),
            Wire::Tls => {
                let cluster_pki = DevPki::create(pki_dir.path(), "cluster").expect("cluster pki");
                let proxy_pki = DevPki::create(pki_dir.path(), "proxy").expect("proxy pki");
                let args = vec![
                    format!("--cacert={}", path(&cluster_pki.ca_cert)),
                    format!("--cert={}", path(&cluster_pki.client_cert)),
                    format!("--key={}", path(&cluster_pki.client_key)),
                    format!("--cert-file={}", path(&proxy_pki.server_cert)),
                    format!("--key-file={}", path(&proxy_pki.server_key)),
                    format!("--trusted-ca-file={}", path(&proxy_pki.ca_cert)),
                ];
                (spec.with_tls(TlsSpec::from_dev_pki(&cluster_pki)), args, Some(ClientTls::from_dev_pki(&proxy_pki)))
            }
        };
        let cluster = EtcdCluster::start(spec).expect("etcd cluster starts");
        let mut args = vec![format!("--endpoints={}", cluster.client_endpoints_csv())];
        args.extend(proxy_tls_args);
        args.extend(extra.iter().map(|s| s.to_string()));
        let proxy = start_proxy(args);
        let scheme = if client_tls.is_some() { "https" } else { "http" };
        let endpoint = format!("{scheme}://{}", proxy.listen_addr());
        Deployment { cluster, proxy, client_tls, endpoint, _pki_dir: pki_dir }
    }
}

/// A path as a command-line argument.
pub fn path(p: &Path) -> String {
    p.display().to_string()
}

// ---------------------------------------------------------------------------------------------
// The proxy binary.

/// Starts the proxy with `start` and `args`; returns once it accepts connections and answers `/health`.
pub fn start_proxy(args: Vec<String>) -> ProxyProcess {
    let mut full = vec!["start".to_owned()];
    full.extend(args);
    ProxyProcess::start(Path::new(PROXY_BIN), full).expect("proxy starts")
}

/// A child process that is killed when dropped, so that a failing test leaves none behind.
pub struct Running(pub std::process::Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Runs the proxy with `args` and no inherited `ETCD_COMPAT_PROXY_*`: (exit code, stderr), `None` if killed after 10 s.
pub fn run_proxy(args: &[&str]) -> (Option<i32>, String) {
    let mut command = Command::new(PROXY_BIN);
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("ETCD_COMPAT_PROXY_") {
            command.env_remove(name);
        }
    }
    // Colour escapes would split the words the assertions look for.
    command.env("NO_COLOR", "1");
    let mut child =
        command.args(args).stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::piped()).spawn().expect("spawn");
    let deadline = Instant::now() + Duration::from_secs(10);
    let code = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status.code();
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut stderr = String::new();
    child.stderr.take().expect("stderr").read_to_string(&mut stderr).expect("read stderr");
    (code, stderr)
}

/// Panics unless `start --help` lists each of `flags` (without `--`) with its `ETCD_COMPAT_PROXY_*` twin.
pub fn assert_flags_in_help_with_env_twins(flags: &[&str]) {
    let output = Command::new(PROXY_BIN).args(["start", "--help"]).output().expect("help");
    let help = String::from_utf8_lossy(&output.stdout);
    for flag in flags {
        assert!(help.contains(&format!("--{flag}")), "--{flag} missing from help");
        let env = format!("ETCD_COMPAT_PROXY_{}", flag.to_uppercase().replace('-', "_"));
        assert!(help.contains(&format!("[env: {env}=")), "{env} missing from help");
    }
}

/// The object `/health` shows for the member at client URL `url`.
pub fn health_entry<'a>(health: &'a str, url: &str) -> Option<&'a str> {
    let start = health.find(&format!("{{\"endpoint\":\"{url}\""))?;
    let end = health[start..].find('}')? + start + 1;
    Some(&health[start..end])
}

/// Polls `/health` every 100 ms until `done(status, body)` holds or `timeout` passes; returns the last answer.
pub fn wait_for_health(proxy: &ProxyProcess, timeout: Duration, done: impl Fn(u16, &str) -> bool) -> (u16, String) {
    let deadline = Instant::now() + timeout;
    loop {
        let (status, body) = proxy.http_get("/health");
        if done(status, &body) || Instant::now() > deadline {
            return (status, body);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Reads a counter or gauge from Prometheus text: the value of the first line starting with `series`.
pub fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|line| line.strip_prefix(series).and_then(|rest| rest.trim().parse().ok()))
}

/// Requests the proxy has sent to the member whose client URL is `url`, from `/metrics` text.
pub fn upstream_requests(metrics: &str, url: &str) -> Option<f64> {
    metric(metrics, &format!("etcd_compat_proxy_upstream_requests_total{{endpoint=\"{url}\"}}"))
}

/// Runs `openssl` with `args`; panics (quoting its stderr) unless it succeeds.
pub fn openssl(args: &[&str]) {
    let output = Command::new("openssl").args(args).output().expect("run openssl");
    assert!(output.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&output.stderr));
}

// ---------------------------------------------------------------------------------------------
// Clients and calls.

/// A multi-threaded tokio runtime for the async clients.
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Runtime::new().expect("runtime")
}

/// An etcd-client `Client` of `endpoint` without auth or TLS; panics if it cannot connect.
pub async fn connect(endpoint: &str) -> Client {
    Client::connect([endpoint], None).await.unwrap_or_else(|error| panic!("connect to {endpoint}: {error}"))
}

/// The gRPC code name and message of a failed call; panics if the call succeeded or failed otherwise.
pub fn grpc_status<T: std::fmt::Debug>(result: Result<T, etcd_client::Error>) -> (String, String) {
    match result {
        Err(etcd_client::Error::GRpcStatus(status)) => (format!("{:?}", status.code()), status.message().to_owned()),
        other => panic!("expected a gRPC status, got {other:?}"),
    }
}

/// One unary gRPC call's answer, as raw as HTTP/2 allows.
#[derive(Debug, PartialEq)]
pub struct RawAnswer {
    /// HTTP status.
    pub status: u16,
    /// Response headers (a trailers-only answer carries its gRPC status here).
    pub headers: HeaderMap,
    /// The response body: gRPC-framed messages.
    pub body: Bytes,
    /// Trailers, if any were sent.
    pub trailers: Option<HeaderMap>,
}

impl RawAnswer {
    /// The value of `name` in the trailers, else in the headers.
    pub fn field(&self, name: &str) -> Option<String> {
        let trailer = self.trailers.as_ref().and_then(|trailers| trailers.get(name));
        trailer.or_else(|| self.headers.get(name)).map(|value| String::from_utf8_lossy(value.as_bytes()).into_owned())
    }
}

/// A unary call to `path` with `metadata` on a new plaintext HTTP/2 connection, `framed` sent byte for byte.
pub async fn raw_unary(addr: SocketAddr, path: &str, metadata: &[(&str, &str)], framed: Vec<u8>) -> RawAnswer {
    let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let (mut sender, connection) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
        .handshake::<_, Full<Bytes>>(TokioIo::new(tcp))
        .await
        .expect("h2 handshake");
    tokio::spawn(connection);
    let mut request = Request::post(format!("http://{addr}{path}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers");
    for (name, value) in metadata {
        request = request.header(*name, *value);
    }
    let request = request.body(Full::new(Bytes::from(framed))).expect("request");
    let response = sender.send_request(request).await.expect("response");
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let collected = response.into_body().collect().await.expect("body");
    let trailers = collected.trailers().cloned();
    RawAnswer { status, headers, body: collected.to_bytes(), trailers }
}

// ---------------------------------------------------------------------------------------------
// Writes that meet a failing member.

/// The proxy's answer to a write in flight when its member failed, which it does not retry.
pub const OUTCOME_UNKNOWN: &str = "may or may not have been applied";

/// etcd's own errors while leadership moves, which a client talking to etcd directly gets too.
pub const ELECTION_ERRORS: [&str; 3] =
    ["etcdserver: leader changed", "etcdserver: no leader", "etcdserver: request timed out"];

/// Panics unless every one of `failures` contains one of the `acceptable` messages.
pub fn assert_failures_among(failures: &[String], acceptable: &[&str]) {
    for failure in failures {
        assert!(acceptable.iter().any(|message| failure.contains(message)), "unexpected failure: {failure}");
    }
}

/// How the writes through the proxy ended.
#[derive(Debug, Default)]
pub struct Tally {
    /// Keys of the acknowledged writes.
    pub acknowledged: Vec<String>,
    /// `(key, revision)` of the acknowledged writes recorded with [`Tally::record_put`].
    pub acknowledged_at: Vec<(String, i64)>,
    /// `key: error` for every write that failed.
    pub failed: Vec<String>,
}

impl Tally {
    /// Records how the write of `key` ended.
    pub fn record<T>(&mut self, key: String, outcome: Result<T, impl Display>) {
        match outcome {
            Ok(_) => self.acknowledged.push(key),
            Err(error) => self.failed.push(format!("{key}: {error}")),
        }
    }

    /// Records how the Put of `key` ended, with the revision etcd acknowledged it at.
    pub fn record_put(&mut self, key: String, outcome: Result<etcd_client::PutResponse, String>) {
        if let Ok(put) = &outcome {
            self.acknowledged_at.push((key.clone(), put.header().map_or(0, |h| h.revision())));
        }
        self.record(key, outcome);
    }

    /// Puts `v` at `{prefix}{i:05}` for each `i` in `range`, one after the other, recording each outcome.
    pub async fn put_each(&mut self, client: &mut Client, prefix: &str, range: Range<usize>) {
        for i in range {
            let key = format!("{prefix}{i:05}");
            let outcome = client.put(key.as_str(), "v", None).await;
            self.record(key, outcome);
        }
    }

    /// Adds the writes of `other`.
    pub fn extend(&mut self, other: Tally) {
        self.acknowledged.extend(other.acknowledged);
        self.acknowledged_at.extend(other.acknowledged_at);
        self.failed.extend(other.failed);
    }

    /// Panics unless every failed write failed with [`OUTCOME_UNKNOWN`] or one of [`ELECTION_ERRORS`].
    pub fn assert_failures_acceptable(&self) {
        let [leader_changed, no_leader, timed_out] = ELECTION_ERRORS;
        assert_failures_among(&self.failed, &[OUTCOME_UNKNOWN, leader_changed, no_leader, timed_out]);
    }

    /// Panics unless every acknowledged key is among the keys under `prefix` read back through `client`.
    pub async fn assert_acknowledged_stored(&self, client: &mut Client, prefix: &str) {
        let response =
            client.get(prefix, Some(GetOptions::new().with_prefix().with_keys_only())).await.expect("read back");
        let stored: Vec<&str> = response.kvs().iter().map(|kv| kv.key_str().expect("utf8")).collect();
        for key in &self.acknowledged {
            assert!(stored.contains(&key.as_str()), "acknowledged write {key} is missing");
        }
    }
}

/// The mod revisions of the next `count` events on `stream`.
pub async fn revisions_seen(stream: &mut WatchStream, count: usize) -> Vec<i64> {
    let mut got = Vec::new();
    while got.len() < count {
        let response = tokio::time::timeout(Duration::from_secs(10), stream.message())
            .await
            .expect("events in time")
            .expect("response")
            .expect("open");
        got.extend(response.events().iter().map(|e| e.kv().expect("kv").mod_revision()));
    }
    got
}
