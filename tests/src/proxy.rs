use std::io;
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use tempfile::TempDir;

use crate::cluster::open_append;
use crate::http::http_get;
use crate::logs::{file_tail, last_lines, read_lossy, TAIL_LINES};
use crate::ports::free_port;

/// How long the proxy gets to accept connections and answer `/health`.
const READY_TIMEOUT: Duration = Duration::from_secs(10);
/// Start attempts when another process took an automatically chosen port first.
const START_ATTEMPTS: usize = 3;
const HTTP_TIMEOUT: Duration = Duration::from_secs(5);
const LISTEN_FLAG: &str = "--listen-addr";
const METRICS_FLAG: &str = "--metrics-addr";
/// When set (to a number), every proxy `start` the harness runs gets `--workers` with it, so
/// that the same tests check the multi-threaded proxy (`scripts/test.sh` runs a subset so).
pub const WORKERS_ENV: &str = "ETCD_COMPAT_TEST_PROXY_WORKERS";

/// The proxy binary running as a child process, with its output in a log file.
/// Dropping it SIGKILLs the process; during a panic the log is kept and its tail printed.
pub struct ProxyProcess {
    process: Child,
    exit_status: Option<ExitStatus>,
    listen_addr: SocketAddr,
    metrics_url: String,
    metrics_addr: SocketAddr,
    client_tls: bool,
    log_path: PathBuf,
    log_dir: TempDir,
}

impl ProxyProcess {
    /// Spawns `bin` with `args` (everything after the binary name, normally starting with
    /// `start`), adding `--listen-addr 127.0.0.1:<free port>` and
    /// `--metrics-addr http://127.0.0.1:<free port>` unless `args` already set them, and
    /// waits up to 10 s until the listen port accepts TCP and `GET /health` on the
    /// metrics address answers with any status.
    pub fn start(bin: &Path, args: Vec<String>) -> anyhow::Result<ProxyProcess> {
        let mut attempt = 1;
        loop {
            let chose_ports = flag_value(&args, LISTEN_FLAG).is_none() || flag_value(&args, METRICS_FLAG).is_none();
            match ProxyProcess::start_once(bin, args.clone()) {
                Ok(proxy) => return Ok(proxy),
                Err(failure) => {
                    let lost_port_race = chose_ports && mentions_port_in_use(&failure.log);
                    if attempt < START_ATTEMPTS && lost_port_race {
                        let summary = failure.error.to_string();
                        let first_line = summary.lines().next().unwrap_or("");
                        eprintln!("proxy start attempt {attempt} lost a port race, retrying: {first_line}");
                        attempt += 1;
                    } else {
                        return Err(failure.error);
                    }
                }
            }
        }
    }

    fn start_once(bin: &Path, mut args: Vec<String>) -> Result<ProxyProcess, StartFailure> {
        let no_log = |error: anyhow::Error| StartFailure { error, log: String::new() };
        // The suite can run every proxy it starts with several event loops (see WORKERS_ENV).
        if let Ok(workers) = std::env::var(WORKERS_ENV) {
            if args.first().is_some_and(|a| a == "start") && flag_value(&args, "--workers").is_none() {
                args.push(format!("--workers={workers}"));
            }
        }
        let listen_value = match flag_value(&args, LISTEN_FLAG) {
            Some(value) => value,
            None => {
                let port = free_port().context("picking the listen port").map_err(no_log)?;
                let value = format!("127.0.0.1:{port}");
                args.push(LISTEN_FLAG.to_owned());
                args.push(value.clone());
                value
            }
        };
        let metrics_url = match flag_value(&args, METRICS_FLAG) {
            Some(value) => value,
            None => {
                let port = free_port().context("picking the metrics port").map_err(no_log)?;
                let value = format!("http://127.0.0.1:{port}");
                args.push(METRICS_FLAG.to_owned());
                args.push(value.clone());
                value
            }
        };
        let listen_addr = resolve(&listen_value).map_err(no_log)?;
        let metrics_addr = resolve(strip_url(&metrics_url)).map_err(no_log)?;
        let client_tls = flag_value(&args, "--cert-file").is_some();

        let log_dir = tempfile::Builder::new()
            .prefix("etcd-compat-proxy-")
            .tempdir()
            .context("creating the proxy log directory")
            .map_err(no_log)?;
        let log_path = log_dir.path().join("proxy.log");
        let log = open_append(&log_path).map_err(no_log)?;
        let log_for_stderr = log.try_clone().context("duplicating the proxy log handle").map_err(no_log)?;
        let mut command = Command::new(bin);
        // The proxy reads its flags from ETCD_COMPAT_PROXY_* too; a developer's shell
        // must not reconfigure the process a test describes with `args`.
        for (name, _) in std::env::vars_os() {
            if name.to_string_lossy().starts_with("ETCD_COMPAT_PROXY_") {
                command.env_remove(name);
            }
        }
        // Logs go to a file that tests search; colour escapes would split the words.
        command.env("NO_COLOR", "1");
        let process = command
            .args(&args)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_for_stderr)
            .spawn()
            .with_context(|| format!("spawning {}", bin.display()))
            .map_err(no_log)?;

        let mut proxy = ProxyProcess {
            process,
            exit_status: None,
            listen_addr,
            metrics_url,
            metrics_addr,
            client_tls,
            log_path,
            log_dir,
        };
        match proxy.wait_ready(&args) {
            Ok(()) => Ok(proxy),
            Err(error) => Err(StartFailure { error, log: proxy.log_contents() }),
        }
    }

    fn wait_ready(&mut self, args: &[String]) -> anyhow::Result<()> {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Some(status) = self.try_exit_status()? {
                bail!(
                    "proxy exited with {status} before becoming ready (args {args:?})\n{}",
                    file_tail(&self.log_path)
                );
            }
            let problem = match self.probe_ready() {
                Ok(()) => return Ok(()),
                Err(problem) => problem,
            };
            if Instant::now() >= deadline {
                bail!(
                    "proxy not ready within {READY_TIMEOUT:?} (args {args:?}); last probe: {problem}\n{}",
                    file_tail(&self.log_path)
                );
            }
            thread::sleep(Duration::from_millis(25));
        }
    }

    fn probe_ready(&self) -> io::Result<()> {
        let probe_timeout = Duration::from_millis(500);
        TcpStream::connect_timeout(&self.listen_addr, probe_timeout)?;
        if self.metrics_url.starts_with("https://") {
            // The harness speaks plain HTTP only; accepting TCP is the best it can check.
            TcpStream::connect_timeout(&self.metrics_addr, probe_timeout)?;
        } else {
            http_get(self.metrics_addr, "/health", probe_timeout)?;
        }
        Ok(())
    }

    fn try_exit_status(&mut self) -> anyhow::Result<Option<ExitStatus>> {
        if self.exit_status.is_none() {
            self.exit_status = self.process.try_wait().context("checking the proxy process")?;
        }
        Ok(self.exit_status)
    }

    /// Address the proxy serves etcd clients on.
    pub fn listen_addr(&self) -> SocketAddr {
        self.listen_addr
    }

    /// Client endpoint URL: `http://127.0.0.1:PORT`, or `https://` when `--cert-file` was given.
    pub fn endpoint(&self) -> String {
        let scheme = if self.client_tls { "https" } else { "http" };
        format!("{scheme}://{}", self.listen_addr)
    }

    /// The `--metrics-addr` value, e.g. `http://127.0.0.1:PORT`.
    pub fn metrics_url(&self) -> &str {
        &self.metrics_url
    }

    /// Socket address of the metrics/health listener.
    pub fn metrics_addr(&self) -> SocketAddr {
        self.metrics_addr
    }

    /// OS process id of the proxy.
    pub fn pid(&self) -> u32 {
        self.process.id()
    }

    /// Resident memory of the proxy now (`VmRSS` in `/proc/<pid>/status`), in bytes.
    pub fn rss_bytes(&self) -> anyhow::Result<u64> {
        proc_status_bytes(self.process.id(), "VmRSS")
    }

    /// The most resident memory the proxy has had since it started (`VmHWM`, the high-water
    /// mark, in `/proc/<pid>/status`), in bytes. A short spike between two samples is still
    /// counted, which polling [`ProxyProcess::rss_bytes`] could miss.
    pub fn peak_rss_bytes(&self) -> anyhow::Result<u64> {
        proc_status_bytes(self.process.id(), "VmHWM")
    }

    /// Path of the file holding the proxy's stdout and stderr.
    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// Everything the proxy wrote to stdout and stderr so far.
    pub fn log_contents(&self) -> String {
        read_lossy(&self.log_path)
    }

    /// `GET path` on the metrics address; panics (with the log tail) if the request fails.
    pub fn http_get(&self, path: &str) -> (u16, String) {
        match self.try_http_get(path) {
            Ok(response) => response,
            Err(error) => panic!("GET {path} on {} failed: {error}\n{}", self.metrics_url, file_tail(&self.log_path)),
        }
    }

    /// `GET path` on the metrics address, returning `(status, body)`.
    pub fn try_http_get(&self, path: &str) -> io::Result<(u16, String)> {
        http_get(self.metrics_addr, path, HTTP_TIMEOUT)
    }

    /// Sends SIGTERM (a no-op error if the proxy already exited).
    pub fn sigterm(&mut self) -> anyhow::Result<()> {
        if let Some(status) = self.try_exit_status()? {
            bail!("proxy already exited with {status}");
        }
        let pid = self.process.id().to_string();
        let status = Command::new("kill").args(["-TERM", &pid]).status().context("running kill -TERM")?;
        if !status.success() {
            bail!("kill -TERM {pid} exited with {status}");
        }
        Ok(())
    }

    /// Waits up to `timeout` for the proxy to exit and returns its exit status.
    pub fn wait_exit(&mut self, timeout: Duration) -> anyhow::Result<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.try_exit_status()? {
                return Ok(status);
            }
            if Instant::now() >= deadline {
                return Err(anyhow!("proxy still running {timeout:?} later\n{}", file_tail(&self.log_path)));
            }
            thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for ProxyProcess {
    fn drop(&mut self) {
        if self.exit_status.is_none() {
            // Nothing useful can be done about a failure while dropping.
            let _ = self.process.kill();
            let _ = self.process.wait();
        }
        if thread::panicking() {
            self.log_dir.disable_cleanup(true);
            eprintln!(
                "proxy log kept at {}; last {TAIL_LINES} lines:\n{}",
                self.log_path.display(),
                last_lines(&self.log_contents(), TAIL_LINES)
            );
        }
    }
}

/// Why one start attempt failed, with the log so the caller can spot a port race.
struct StartFailure {
    error: anyhow::Error,
    log: String,
}

fn mentions_port_in_use(log: &str) -> bool {
    let lowercase = log.to_ascii_lowercase();
    lowercase.contains("address already in use") || lowercase.contains("addrinuse")
}

/// A `kB` line of `/proc/<pid>/status` (e.g. `VmHWM:\t  10240 kB`), in bytes.
fn proc_status_bytes(pid: u32, field: &str) -> anyhow::Result<u64> {
    let path = format!("/proc/{pid}/status");
    let status = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    parse_status_kib(&status, field).map(|kib| kib * 1024).ok_or_else(|| anyhow!("no {field} line in {path}"))
}

fn parse_status_kib(status: &str, field: &str) -> Option<u64> {
    let line = status.lines().find_map(|line| line.strip_prefix(field)?.strip_prefix(':'))?;
    let number = line.trim().strip_suffix("kB")?;
    number.trim().parse().ok()
}

/// Value of `--flag=value` or `--flag value` in `args`.
fn flag_value(args: &[String], flag: &str) -> Option<String> {
    let with_equals = format!("{flag}=");
    let mut args = args.iter();
    while let Some(arg) = args.next() {
        if arg == flag {
            return args.next().cloned();
        }
        if let Some(value) = arg.strip_prefix(&with_equals) {
            return Some(value.to_owned());
        }
    }
    None
}

/// `http://127.0.0.1:9000/path` -> `127.0.0.1:9000`.
fn strip_url(url: &str) -> &str {
    let without_scheme = url.split_once("://").map_or(url, |(_, rest)| rest);
    without_scheme.split('/').next().unwrap_or(without_scheme)
}

fn resolve(host_port: &str) -> anyhow::Result<SocketAddr> {
    host_port
        .to_socket_addrs()
        .with_context(|| format!("resolving {host_port:?}"))?
        .next()
        .ok_or_else(|| anyhow!("{host_port:?} resolves to no address"))
}

#[cfg(test)]
mod tests {
    use super::{flag_value, parse_status_kib, strip_url};

    #[test]
    fn status_lines_are_read_in_kib() {
        let status = "Name:\tproxy\nVmPeak:\t  20000 kB\nVmHWM:\t   10240 kB\nVmRSS:\t    9000 kB\n";
        assert_eq!(parse_status_kib(status, "VmHWM"), Some(10240));
        assert_eq!(parse_status_kib(status, "VmRSS"), Some(9000));
        assert_eq!(parse_status_kib(status, "VmSwap"), None);
    }

    #[test]
    fn flag_value_accepts_both_spellings() {
        let args: Vec<String> = ["start", "--listen-addr=127.0.0.1:1", "--metrics-addr", "http://x:2"]
            .into_iter()
            .map(String::from)
            .collect();
        assert_eq!(flag_value(&args, "--listen-addr").as_deref(), Some("127.0.0.1:1"));
        assert_eq!(flag_value(&args, "--metrics-addr").as_deref(), Some("http://x:2"));
        assert_eq!(flag_value(&args, "--cert-file"), None);
    }

    #[test]
    fn strip_url_keeps_host_and_port() {
        assert_eq!(strip_url("http://127.0.0.1:9000/metrics"), "127.0.0.1:9000");
        assert_eq!(strip_url("127.0.0.1:9000"), "127.0.0.1:9000");
    }
}
