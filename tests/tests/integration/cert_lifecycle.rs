//! Certificate lifecycle against real etcd 3.4 and 3.5: an old client with an expired old-CA
//! certificate through the proxy to a cluster on a new CA; listener and upstream certificates and
//! CAs replaced twice under 10 000 requests; broken replacements refused; expiry in metrics, logs
//! and /health; CN-only member certificates; RSA/PKCS#1/SEC1 keys and TLS 1.2.

use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use etcd_client::{Certificate, Client, ConnectOptions, Identity, TlsOptions};
use etcd_compat_certs::{inspect, load_certs, Authority, DevPki, LeafSpec, San, Usage};
use etcd_compat_tests::{
    etcdctl, etcdctl_command, etcdctl_ok, ClientTls, ClusterSpec, EtcdCluster, EtcdVersion, ProxyProcess, TlsSpec,
};
use tempfile::TempDir;

use crate::support::{
    assert_flags_in_help_with_env_twins, both_versions, metric, openssl, path, run_proxy, start_proxy, wait_for_health,
    PROXY_BIN,
};

const DAY: Duration = Duration::from_secs(86_400);
const RELOAD_TIMEOUT: Duration = Duration::from_secs(15);

fn local_sans() -> Vec<San> {
    vec![San::Dns("localhost".into()), San::Ip(IpAddr::V4(Ipv4Addr::LOCALHOST))]
}

/// A CA whose certificate is written to `<dir>/<name>-ca.pem`.
struct TestCa {
    authority: Authority,
    cert: PathBuf,
    dir: PathBuf,
    name: String,
}

impl TestCa {
    fn new(dir: &Path, name: &str) -> TestCa {
        let authority = Authority::new(&format!("{name} CA"), 30 * DAY).expect("CA");
        let cert = dir.join(format!("{name}-ca.pem"));
        std::fs::write(&cert, authority.cert_pem()).expect("write CA");
        TestCa { authority, cert, dir: dir.to_owned(), name: name.to_owned() }
    }

    /// Issues `<dir>/<name>-<leaf>.pem` and `-key.pem`; `valid_from_days` shifts the start.
    fn issue(
        &self,
        leaf: &str,
        cn: &str,
        usage: Usage,
        validity: Duration,
        valid_from_days: i64,
    ) -> (PathBuf, PathBuf) {
        let sans = if usage == Usage::Client { Vec::new() } else { local_sans() };
        let issued = self
            .authority
            .issue(&LeafSpec {
                common_name: cn.to_owned(),
                sans,
                usage,
                validity,
                not_before_offset: Some(time::Duration::days(valid_from_days)),
            })
            .expect("issue");
        let cert = self.dir.join(format!("{}-{leaf}.pem", self.name));
        let key = self.dir.join(format!("{}-{leaf}-key.pem", self.name));
        std::fs::write(&cert, issued.cert_pem).expect("write cert");
        std::fs::write(&key, issued.key_pem).expect("write key");
        (cert, key)
    }
}

/// Replaces `target` the way Kubernetes and cert-manager do: write elsewhere, rename over it.
fn replace_file(target: &Path, contents: &[u8]) {
    let staging = target.with_extension("staging");
    std::fs::write(&staging, contents).expect("write staging file");
    std::fs::rename(&staging, target).expect("rename over target");
}

fn copy_over(target: &Path, source: &Path) {
    replace_file(target, &std::fs::read(source).expect("read source"));
}

fn bundle(target: &Path, parts: &[&Path]) {
    let mut contents = Vec::new();
    for part in parts {
        contents.extend(std::fs::read(part).expect("read bundle part"));
    }
    replace_file(target, &contents);
}

fn metrics(proxy: &ProxyProcess) -> String {
    let (status, body) = proxy.http_get("/metrics");
    assert_eq!(status, 200);
    body
}

/// Waits until `series` reaches `at_least`; returns how long that took.
fn wait_for_metric(proxy: &ProxyProcess, series: &str, at_least: f64) -> Duration {
    let started = Instant::now();
    loop {
        let value = metric(&metrics(proxy), series).unwrap_or(0.0);
        if value >= at_least {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < RELOAD_TIMEOUT,
            "{series} stayed at {value}, expected {at_least}\n{}",
            proxy.log_contents()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `/health` once a member is healthy (the first health check runs just after start).
fn health_when_up(proxy: &ProxyProcess) -> String {
    let (status, body) = wait_for_health(proxy, RELOAD_TIMEOUT, |status, _| status == 200);
    assert_eq!(status, 200, "proxy never became healthy: {body}");
    body
}

fn reloads(side: &str, outcome: &str) -> String {
    format!("etcd_compat_proxy_certificate_reloads_total{{side=\"{side}\",outcome=\"{outcome}\"}}")
}

/// What a fresh TLS connection to `addr` is served, as printed by `certs inspect --endpoints`.
fn served(addr: &str) -> String {
    let output = Command::new(PROXY_BIN).args(["certs", "inspect", "--endpoints", addr]).output().expect("inspect");
    assert!(output.status.success(), "inspect {addr}: {}", String::from_utf8_lossy(&output.stderr));
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn served_line(addr: &str, field: &str) -> String {
    let printed = served(addr);
    printed
        .lines()
        .find_map(|line| line.trim().strip_prefix(field).map(|rest| rest.trim().to_owned()))
        .unwrap_or_else(|| panic!("no {field} in {printed}"))
}

fn expiry_text(cert: &Path) -> String {
    let info = inspect(&load_certs(cert).expect("load")[0]).expect("inspect");
    let t = info.not_after;
    format!(
        "{:04}-{:02}-{:02} {:02}:{:02}:{:02} UTC",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second()
    )
}

// ---------------------------------------------------------------------------------------------
// An old client, an old CA, and a cluster that moved to a new CA.

fn old_client_reaches_new_ca_cluster(version: EtcdVersion) {
    let dir = TempDir::new().expect("tempdir");
    // The cluster was renewed: new CA, client certificates required from it.
    let new_pki = DevPki::create(dir.path(), "new").expect("new pki");
    let cluster =
        EtcdCluster::start(ClusterSpec::new(version, 1).with_tls(TlsSpec::from_dev_pki(&new_pki))).expect("cluster");
    // The legacy client's material: it trusts only the old CA and holds an old-CA client
    // certificate that expired 35 days ago.
    let old_ca = TestCa::new(dir.path(), "old");
    let (old_server, old_server_key) = old_ca.issue("server", "legacy-proxy", Usage::Server, 30 * DAY, 0);
    let (old_client, old_client_key) = old_ca.issue("client", "root", Usage::Client, 365 * DAY, -400);
    let legacy_client = ClientTls { ca_cert: old_ca.cert.clone(), cert: old_client.clone(), key: old_client_key };

    let direct = etcdctl(version, &cluster.client_endpoints_csv(), Some(&legacy_client), &["get", "k"]);
    assert!(!direct.status.success(), "etcd must refuse the legacy client directly");

    let until = time::OffsetDateTime::now_utc().date() + time::Duration::days(30);
    let common = vec![
        format!("--endpoints={}", cluster.client_endpoints_csv()),
        format!("--cacert={}", path(&new_pki.ca_cert)),
        format!("--cert={}", path(&new_pki.client_cert)),
        format!("--key={}", path(&new_pki.client_key)),
        format!("--cert-file={}", path(&old_server)),
        format!("--key-file={}", path(&old_server_key)),
        format!("--trusted-ca-file={}", path(&old_ca.cert)),
    ];
    let mut with_exception = common.clone();
    with_exception.push(format!("--legacy-client-ca-file={}", path(&old_ca.cert)));
    with_exception.push(format!("--legacy-client-expired-until={until}"));
    let proxy = start_proxy(with_exception);
    let endpoint = proxy.endpoint();

    assert_eq!(etcdctl_ok(version, &endpoint, Some(&legacy_client), &["put", "job/1", "run"]), "OK\n");
    assert_eq!(etcdctl_ok(version, &endpoint, Some(&legacy_client), &["get", "job/1"]), "job/1\nrun\n");
    let admitted =
        metric(&metrics(&proxy), "etcd_compat_proxy_legacy_expired_client_certificates_total").expect("legacy counter");
    assert!(admitted >= 2.0, "two etcdctl runs, each at least one connection: {admitted}");
    let log = proxy.log_contents();
    let admissions = log.matches("legacy client let in with an expired certificate").count();
    assert_eq!(admissions as f64, admitted, "every admission is logged once\n{log}");
    assert!(log.contains("subject=CN=root"), "{log}");
    // The proxy presents the old-CA certificate to the legacy client.
    assert_eq!(served_line(&proxy.listen_addr().to_string(), "issuer:"), "CN=old CA");

    // Without the exception, the expired certificate is refused.
    let strict = start_proxy(common);
    let refused = etcdctl(version, &strict.endpoint(), Some(&legacy_client), &["get", "job/1", "--dial-timeout=2s"]);
    assert!(!refused.status.success(), "expired client certificate must be refused by default");
    assert!(strict.log_contents().contains("client TLS handshake failed"), "{}", strict.log_contents());
    let failed = "etcd_compat_proxy_client_connections_closed_total{reason=\"tls_handshake_failed\"}";
    assert!(metric(&metrics(&strict), failed) >= Some(1.0), "the refused handshake is counted");
    assert_eq!(metric(&metrics(&strict), "etcd_compat_proxy_legacy_expired_client_certificates_total"), Some(0.0));
}

both_versions!(
    old_client_reaches_new_ca_cluster => old_client_reaches_new_ca_cluster_3_4, old_client_reaches_new_ca_cluster_3_5
);

// ---------------------------------------------------------------------------------------------
// Rotation of everything, twice, under load.

const REQUESTS: usize = 10_000;
const REQUESTS_PER_CONNECTION: usize = 500;

/// Runs REQUESTS puts, each REQUESTS_PER_CONNECTION on a fresh TLS connection; stops before
/// the last 1000 until `rotations_done` reaches 2, so both rotations happen during the run.
fn run_load(
    endpoint: String,
    tls: ClientTls,
    done: Arc<AtomicUsize>,
    failures: Arc<AtomicU64>,
    rotations_done: Arc<AtomicUsize>,
) -> Vec<String> {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    runtime.block_on(async move {
        let read = |path: &Path| std::fs::read(path).expect("read client tls");
        let mut errors = Vec::new();
        let mut sent = 0;
        while sent < REQUESTS {
            let options = ConnectOptions::new().with_tls(
                TlsOptions::new()
                    .ca_certificate(Certificate::from_pem(read(&tls.ca_cert)))
                    .identity(Identity::from_pem(read(&tls.cert), read(&tls.key)))
                    .domain_name("localhost"),
            );
            let mut client = match Client::connect([endpoint.as_str()], Some(options)).await {
                Ok(client) => client,
                Err(error) => {
                    failures.fetch_add(1, Ordering::Relaxed);
                    errors.push(format!("connect: {error}"));
                    sent += 1;
                    continue;
                }
            };
            for _ in 0..REQUESTS_PER_CONNECTION {
                if sent == REQUESTS - 1000 {
                    while rotations_done.load(Ordering::SeqCst) < 2 {
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                }
                if let Err(error) = client.put(format!("load/{sent:05}"), "v", None).await {
                    failures.fetch_add(1, Ordering::Relaxed);
                    errors.push(format!("put {sent}: {error}"));
                }
                sent += 1;
                done.store(sent, Ordering::SeqCst);
            }
        }
        errors
    })
}

fn wait_for_requests(done: &AtomicUsize, at_least: usize) {
    let started = Instant::now();
    while done.load(Ordering::SeqCst) < at_least {
        assert!(started.elapsed() < Duration::from_secs(120), "load stalled at {}", done.load(Ordering::SeqCst));
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn rotation_twice_under_load(version: EtcdVersion) {
    let dir = TempDir::new().expect("tempdir");
    let d = dir.path();
    // Upstream: etcd serves E1 (the harness PKI) and trusts one CA for the proxy's client
    // certificates; the proxy's client certificate and its CA bundle for etcd rotate.
    let cluster_pki = DevPki::create(d, "e1").expect("cluster pki");
    let upstream_client_ca = TestCa::new(d, "proxy-client");
    let etcd_trust = d.join("etcd-trusted.pem");
    bundle(&etcd_trust, &[&cluster_pki.ca_cert, &upstream_client_ca.cert]);
    let mut tls_spec = TlsSpec::from_dev_pki(&cluster_pki);
    tls_spec.trusted_ca = etcd_trust;
    // etcd reads its serving certificate at every handshake: these copies are what gets rotated.
    let etcd_cert = d.join("etcd-serving.pem");
    let etcd_key = d.join("etcd-serving-key.pem");
    copy_over(&etcd_cert, &cluster_pki.server_cert);
    copy_over(&etcd_key, &cluster_pki.server_key);
    tls_spec.server_cert = etcd_cert.clone();
    tls_spec.server_key = etcd_key.clone();
    let cluster = EtcdCluster::start(ClusterSpec::new(version, 1).with_tls(tls_spec)).expect("cluster");
    let etcd_addr = cluster.client_addrs()[0].to_string();

    // Client side: listener CAs L1..L3 (the client trusts all three, as during a migration);
    // client certificates from C1, which the proxy keeps trusting while C2, C3 are added.
    let listener_cas: Vec<TestCa> = (1..=3).map(|i| TestCa::new(d, &format!("l{i}"))).collect();
    let client_cas: Vec<TestCa> = (1..=3).map(|i| TestCa::new(d, &format!("c{i}"))).collect();
    let etcd_signers = [TestCa::new(d, "e2"), TestCa::new(d, "e3")];
    let etcd_cas: Vec<PathBuf> =
        vec![cluster_pki.ca_cert.clone(), etcd_signers[0].cert.clone(), etcd_signers[1].cert.clone()];
    let client_trust = d.join("client-trusts.pem");
    bundle(&client_trust, &[&listener_cas[0].cert, &listener_cas[1].cert, &listener_cas[2].cert]);
    let (client_cert, client_key) = client_cas[0].issue("client", "root", Usage::Client, 10 * DAY, 0);
    let client_tls = ClientTls { ca_cert: client_trust, cert: client_cert, key: client_key };

    // The files the proxy is configured with, replaced in place below.
    let listener_cert = d.join("proxy-listener.pem");
    let listener_key = d.join("proxy-listener-key.pem");
    let listener_client_cas = d.join("proxy-client-cas.pem");
    let upstream_cas = d.join("proxy-upstream-cas.pem");
    let upstream_cert = d.join("proxy-upstream.pem");
    let upstream_key = d.join("proxy-upstream-key.pem");
    let install_generation = |k: usize| {
        let (cert, key) = listener_cas[k].issue("server", &format!("proxy-gen{}", k + 1), Usage::Server, 10 * DAY, 0);
        copy_over(&listener_cert, &cert);
        copy_over(&listener_key, &key);
        let trusted: Vec<&Path> = client_cas[..=k].iter().map(|ca| ca.cert.as_path()).collect();
        bundle(&listener_client_cas, &trusted);
        let (cert, key) = upstream_client_ca.issue(
            &format!("gen{}", k + 1),
            &format!("proxy-gen{}", k + 1),
            Usage::Client,
            10 * DAY,
            0,
        );
        copy_over(&upstream_cert, &cert);
        copy_over(&upstream_key, &key);
        let etcd_trusted: Vec<&Path> = etcd_cas[k.saturating_sub(1)..=k].iter().map(PathBuf::as_path).collect();
        bundle(&upstream_cas, &etcd_trusted);
    };
    install_generation(0);
    let proxy = start_proxy(vec![
        format!("--endpoints={}", cluster.client_endpoints_csv()),
        format!("--cacert={}", path(&upstream_cas)),
        format!("--cert={}", path(&upstream_cert)),
        format!("--key={}", path(&upstream_key)),
        format!("--cert-file={}", path(&listener_cert)),
        format!("--key-file={}", path(&listener_key)),
        format!("--trusted-ca-file={}", path(&listener_client_cas)),
    ]);
    let proxy_addr = proxy.listen_addr().to_string();
    assert_eq!(served_line(&proxy_addr, "subject:"), "CN=proxy-gen1");

    // A watch opened before the rotations lives on the connections made before them.
    let watch_log = d.join("watch.out");
    let mut watcher = etcdctl_command(version, &proxy.endpoint(), Some(&client_tls), &["watch", "watched"])
        .stdout(std::fs::File::create(&watch_log).expect("watch log"))
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("etcdctl watch");
    std::thread::sleep(Duration::from_millis(500));

    let done = Arc::new(AtomicUsize::new(0));
    let failures = Arc::new(AtomicU64::new(0));
    let rotations_done = Arc::new(AtomicUsize::new(0));
    let load = {
        let (endpoint, tls) = (proxy.endpoint(), client_tls.clone());
        let (done, failures, rotations_done) = (done.clone(), failures.clone(), rotations_done.clone());
        std::thread::spawn(move || run_load(endpoint, tls, done, failures, rotations_done))
    };

    let mut reload_latencies = Vec::new();
    for generation in 1..=2 {
        wait_for_requests(&done, generation * 3000);
        let at_rotation = done.load(Ordering::SeqCst);
        install_generation(generation);
        reload_latencies.push(wait_for_metric(&proxy, &reloads("listener", "applied"), generation as f64));
        reload_latencies.push(wait_for_metric(&proxy, &reloads("upstream", "applied"), generation as f64));
        wait_for_metric(&proxy, "etcd_compat_proxy_upstream_redials_total{outcome=\"ok\"}", generation as f64);
        // Now that the proxy trusts it, etcd switches to a certificate from the next CA.
        let signer = &etcd_signers[generation - 1];
        let (cert, key) = signer.issue("serving", "etcd-member", Usage::Server, 10 * DAY, 0);
        copy_over(&etcd_key, &key);
        copy_over(&etcd_cert, &cert);
        let expected_issuer = format!("CN={} CA", signer.name);
        assert_eq!(served_line(&etcd_addr, "issuer:"), expected_issuer, "etcd serves the new certificate");
        // New client connections get the new listener certificate.
        assert_eq!(served_line(&proxy_addr, "subject:"), format!("CN=proxy-gen{}", generation + 1));
        assert_eq!(served_line(&proxy_addr, "issuer:"), format!("CN=l{} CA", generation + 1));
        let during =
            etcdctl_ok(version, &proxy.endpoint(), Some(&client_tls), &["get", "load/00000", "--print-value-only"]);
        assert_eq!(during, "v\n");
        eprintln!("rotation {generation} started after {at_rotation} requests");
        rotations_done.store(generation, Ordering::SeqCst);
    }
    let errors = load.join().expect("load thread");
    assert_eq!(
        etcdctl_ok(version, &proxy.endpoint(), Some(&client_tls), &["put", "watched", "after-rotations"]),
        "OK\n"
    );
    let started = Instant::now();
    while std::fs::read_to_string(&watch_log).unwrap_or_default() != "PUT\nwatched\nafter-rotations\n" {
        assert!(started.elapsed() < Duration::from_secs(10), "watch output: {:?}", std::fs::read_to_string(&watch_log));
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = watcher.kill();
    let _ = watcher.wait();
    assert_eq!(failures.load(Ordering::SeqCst), 0, "failed requests: {errors:?}");
    assert_eq!(done.load(Ordering::SeqCst), REQUESTS);

    // Finally drop the old etcd CA from the proxy's bundle: the re-dialled connection must
    // verify etcd's current (third-generation) certificate with the newest CA alone.
    replace_file(&upstream_cas, &std::fs::read(&etcd_cas[2]).expect("read e3"));
    wait_for_metric(&proxy, &reloads("upstream", "applied"), 3.0);
    wait_for_metric(&proxy, "etcd_compat_proxy_upstream_redials_total{outcome=\"ok\"}", 3.0);
    let count = etcdctl_ok(
        version,
        &proxy.endpoint(),
        Some(&client_tls),
        &["get", "load/", "--prefix", "--limit=1", "-w", "fields"],
    );
    assert!(count.contains("\"Count\" : 10000"), "{count}");
    let text = metrics(&proxy);
    assert_eq!(metric(&text, "etcd_compat_proxy_upstream_redials_total{outcome=\"failed\"}"), Some(0.0));
    // The watch's upstream stream was never cut: old connections drain instead of closing.
    assert_eq!(metric(&text, "etcd_compat_proxy_streams_broken_total"), Some(0.0));
    assert!(text.contains("role=\"upstream-client\""), "{text}");
    assert!(text.contains("subject=\"CN=proxy-gen3\""), "{text}");
    eprintln!("etcd {version}: {REQUESTS} requests, 0 failures; reload latencies {reload_latencies:?}");
}

both_versions!(rotation_twice_under_load => rotation_twice_under_load_3_4, rotation_twice_under_load_3_5);

// ---------------------------------------------------------------------------------------------
// Broken replacements are refused; serving continues with the previous material.

fn broken_replacements_are_refused(version: EtcdVersion) {
    let dir = TempDir::new().expect("tempdir");
    let d = dir.path();
    let cluster_pki = DevPki::create(d, "cluster").expect("cluster pki");
    let cluster = EtcdCluster::start(ClusterSpec::new(version, 1).with_tls(TlsSpec::from_dev_pki(&cluster_pki)))
        .expect("cluster");
    let proxy_ca = TestCa::new(d, "proxy");
    let (good_cert, good_key) = proxy_ca.issue("good", "proxy-good", Usage::Server, 20 * DAY, 0);
    let (client_cert, client_key) = proxy_ca.issue("client", "root", Usage::Client, 20 * DAY, 0);
    let client_tls = ClientTls { ca_cert: proxy_ca.cert.clone(), cert: client_cert, key: client_key };
    let listener_cert = d.join("listener.pem");
    let listener_key = d.join("listener-key.pem");
    copy_over(&listener_cert, &good_cert);
    copy_over(&listener_key, &good_key);
    let upstream_cert = d.join("upstream.pem");
    let upstream_key = d.join("upstream-key.pem");
    copy_over(&upstream_cert, &cluster_pki.client_cert);
    copy_over(&upstream_key, &cluster_pki.client_key);
    let proxy = start_proxy(vec![
        format!("--endpoints={}", cluster.client_endpoints_csv()),
        format!("--cacert={}", path(&cluster_pki.ca_cert)),
        format!("--cert={}", path(&upstream_cert)),
        format!("--key={}", path(&upstream_key)),
        format!("--cert-file={}", path(&listener_cert)),
        format!("--key-file={}", path(&listener_key)),
        format!("--trusted-ca-file={}", path(&proxy_ca.cert)),
    ]);
    let addr = proxy.listen_addr().to_string();
    let works = |key: &str| {
        assert_eq!(etcdctl_ok(version, &proxy.endpoint(), Some(&client_tls), &["put", key, "v"]), "OK\n");
        assert_eq!(served_line(&addr, "subject:"), "CN=proxy-good", "the previous certificate is still served");
    };
    works("before");

    // 1. Not PEM at all.
    replace_file(&listener_cert, b"this is not a certificate\n");
    wait_for_metric(&proxy, &reloads("listener", "rejected"), 1.0);
    assert!(proxy.log_contents().contains(&format!("no CERTIFICATE block in {}", path(&listener_cert))));
    works("after-garbage");

    // 2. A valid certificate whose key is not in the key file.
    let (other_cert, _) = proxy_ca.issue("other", "proxy-other", Usage::Server, 20 * DAY, 0);
    copy_over(&listener_cert, &other_cert);
    wait_for_metric(&proxy, &reloads("listener", "rejected"), 2.0);
    assert!(
        proxy.log_contents().contains(&format!(
            "certificate {} and key {} cannot be used together",
            path(&listener_cert),
            path(&listener_key)
        )),
        "{}",
        proxy.log_contents()
    );
    works("after-mismatch");

    // 3. An expired upstream client certificate with its own key: refused, naming file and date.
    let cluster_ca = Authority::from_pem(
        &std::fs::read_to_string(&cluster_pki.ca_cert).unwrap(),
        &std::fs::read_to_string(&cluster_pki.ca_key).unwrap(),
    )
    .expect("cluster CA");
    let expired =
        TestCa { authority: cluster_ca, cert: cluster_pki.ca_cert.clone(), dir: d.to_owned(), name: "cluster2".into() };
    let (expired_cert, expired_key) = expired.issue("expired", "root", Usage::Client, 10 * DAY, -12);
    copy_over(&upstream_key, &expired_key);
    copy_over(&upstream_cert, &expired_cert);
    wait_for_metric(&proxy, &reloads("upstream", "rejected"), 1.0);
    let expected = format!("certificate {} (CN=root) expired on {}", path(&upstream_cert), expiry_text(&expired_cert));
    assert!(proxy.log_contents().contains(&expected), "{expected}\n{}", proxy.log_contents());
    works("after-expired");

    // 4. A well-formed client certificate from a CA etcd does not trust: the files load, but
    //    the trial connection is refused by etcd, so the old material stays.
    let (stranger_cert, stranger_key) = proxy_ca.issue("stranger", "root", Usage::Client, 20 * DAY, 0);
    copy_over(&upstream_key, &stranger_key);
    copy_over(&upstream_cert, &stranger_cert);
    wait_for_metric(&proxy, &reloads("upstream", "rejected"), 2.0);
    assert!(
        proxy.log_contents().contains("every connected etcd member refused a connection with the new TLS material"),
        "{}",
        proxy.log_contents()
    );
    works("after-stranger");
    let exported = metrics(&proxy);
    assert_eq!(metric(&exported, "etcd_compat_proxy_upstream_redials_total{outcome=\"failed\"}"), Some(1.0));
    assert_eq!(metric(&exported, &reloads("listener", "applied")), None, "nothing was applied");
    assert_eq!(metric(&exported, &reloads("upstream", "applied")), None, "nothing was applied");

    // 5. Putting the good files back is picked up.
    copy_over(&listener_cert, &good_cert);
    copy_over(&upstream_cert, &cluster_pki.client_cert);
    copy_over(&upstream_key, &cluster_pki.client_key);
    wait_for_metric(&proxy, &reloads("listener", "applied"), 1.0);
    wait_for_metric(&proxy, &reloads("upstream", "applied"), 1.0);
    works("after-repair");
    let health = health_when_up(&proxy);
    // The dev PKI's upstream certificates are valid for one day: critical; the listener's 20 days are not.
    assert!(health.contains("\"degraded\":true,\"expiring_certificates\":[{\"role\":\"upstream-client\""), "{health}");
    assert!(!health.contains("\"role\":\"listener\""), "{health}");

    // At startup, the same expired file stops the proxy with exit code 2 before binding.
    let (code, stderr) = run_proxy(&[
        "start",
        "--endpoints",
        &cluster.client_endpoints_csv(),
        "--cacert",
        &path(&cluster_pki.ca_cert),
        "--cert",
        &path(&expired_cert),
        "--key",
        &path(&expired_key),
    ]);
    assert_eq!(code, Some(2));
    let expected = format!("certificate {} (CN=root) expired on {}", path(&expired_cert), expiry_text(&expired_cert));
    assert!(stderr.contains(&expected), "{stderr}");
}

both_versions!(
    broken_replacements_are_refused => broken_replacements_are_refused_3_4, broken_replacements_are_refused_3_5
);

// ---------------------------------------------------------------------------------------------
// Expiry is never a surprise.

/// Cluster TLS valid for 30 days (the dev PKI's one day would itself be inside every window).
fn month_long_cluster_tls(d: &Path) -> TlsSpec {
    let ca = TestCa::new(d, "month");
    let (server_cert, server_key) = ca.issue("server", "etcd-server", Usage::Server, 30 * DAY, 0);
    let (peer_cert, peer_key) = ca.issue("peer", "etcd-peer", Usage::Peer, 30 * DAY, 0);
    let (cert, key) = ca.issue("client", "root", Usage::Client, 30 * DAY, 0);
    let client = ClientTls { ca_cert: ca.cert.clone(), cert, key };
    TlsSpec { server_cert, server_key, trusted_ca: ca.cert, peer_cert, peer_key, client }
}

fn expiry_is_reported(version: EtcdVersion) {
    let dir = TempDir::new().expect("tempdir");
    let d = dir.path();
    let cluster_tls = month_long_cluster_tls(d);
    let cluster = EtcdCluster::start(ClusterSpec::new(version, 1).with_tls(cluster_tls.clone())).expect("cluster");
    let proxy_ca = TestCa::new(d, "proxy");
    let (short_cert, short_key) = proxy_ca.issue("short", "proxy-short", Usage::Server, 10 * DAY, 0);
    let base = vec![
        format!("--endpoints={}", cluster.client_endpoints_csv()),
        format!("--cacert={}", path(&cluster_tls.trusted_ca)),
        format!("--cert={}", path(&cluster_tls.client.cert)),
        format!("--key={}", path(&cluster_tls.client.key)),
        format!("--cert-file={}", path(&short_cert)),
        format!("--key-file={}", path(&short_key)),
    ];
    let not_after = inspect(&load_certs(&short_cert).unwrap()[0]).unwrap().not_after.unix_timestamp();

    // Defaults: warned (30 days), not yet critical (7 days).
    let proxy = start_proxy(base.clone());
    let series = format!(
        "etcd_compat_proxy_certificate_expiry_timestamp_seconds{{role=\"listener\",path=\"{}\",subject=\"CN=proxy-short\"}}",
        path(&short_cert)
    );
    assert_eq!(metric(&metrics(&proxy), &series), Some(not_after as f64));
    let upstream_series = format!(
        "etcd_compat_proxy_certificate_expiry_timestamp_seconds{{role=\"upstream-client\",path=\"{}\",subject=\"CN=root\"}}",
        path(&cluster_tls.client.cert)
    );
    assert!(metric(&metrics(&proxy), &upstream_series).is_some(), "{}", metrics(&proxy));
    let warning = format!(
        "certificate expires soon; renew it (etcd-compat-proxy certs renew) and replace the file, the proxy reloads it role=\"listener\" file={} subject=CN=proxy-short expires={} days_left=",
        path(&short_cert),
        expiry_text(&short_cert)
    );
    // Ten days minus the seconds since issuing: 10 within the issuing second, else 9.
    let ten_or_nine = |text: &str, prefix: &str| {
        text.find(prefix)
            .map(|at| &text[at + prefix.len()..])
            .is_some_and(|rest| rest.starts_with("10") || rest.starts_with('9'))
    };
    let started = Instant::now();
    while !ten_or_nine(&proxy.log_contents(), &warning) {
        assert!(started.elapsed() < RELOAD_TIMEOUT, "no warning {warning:?} in\n{}", proxy.log_contents());
        std::thread::sleep(Duration::from_millis(20));
    }
    let health = health_when_up(&proxy);
    assert!(health.contains("\"degraded\":false"), "{health}");

    // A 14-day critical window makes the same certificate degrade /health (still 200: serving works).
    let mut critical = base;
    critical.push("--cert-expiry-critical-days=14".to_owned());
    let proxy = start_proxy(critical);
    let health = health_when_up(&proxy);
    let expected = format!(
        "\"degraded\":true,\"expiring_certificates\":[{{\"role\":\"listener\",\"path\":\"{}\",\"subject\":\"CN=proxy-short\",\"not_after\":\"{}\",\"days_left\":",
        path(&short_cert),
        expiry_text(&short_cert)
    );
    assert!(ten_or_nine(&health, &expected), "{health}");
}

both_versions!(expiry_is_reported => expiry_is_reported_3_4, expiry_is_reported_3_5);

// ---------------------------------------------------------------------------------------------
// Old certificates: CN-only member certificates, RSA and PKCS#1/SEC1 keys, TLS 1.2.

fn cn_only_member_certificate(version: EtcdVersion) {
    let dir = TempDir::new().expect("tempdir");
    let d = dir.path();
    let cluster_pki = DevPki::create(d, "cluster").expect("cluster pki");
    let mut spec = TlsSpec::from_dev_pki(&cluster_pki);
    let serving = d.join("serving.pem");
    let serving_key = d.join("serving-key.pem");
    copy_over(&serving, &cluster_pki.server_cert);
    copy_over(&serving_key, &cluster_pki.server_key);
    spec.server_cert = serving.clone();
    spec.server_key = serving_key.clone();
    let cluster = EtcdCluster::start(ClusterSpec::new(version, 1).with_tls(spec)).expect("cluster");
    // Swap in an old-style certificate, CN only, from the same CA (etcd reads it per handshake).
    let ca = Authority::from_pem(
        &std::fs::read_to_string(&cluster_pki.ca_cert).unwrap(),
        &std::fs::read_to_string(&cluster_pki.ca_key).unwrap(),
    )
    .expect("CA");
    let issued = ca
        .issue(&LeafSpec {
            common_name: "etcd.legacy.internal".into(),
            sans: Vec::new(),
            usage: Usage::Server,
            validity: 10 * DAY,
            not_before_offset: None,
        })
        .expect("issue");
    replace_file(&serving_key, issued.key_pem.as_bytes());
    replace_file(&serving, issued.cert_pem.as_bytes());
    let etcd_addr = cluster.client_addrs()[0].to_string();
    assert!(served(&etcd_addr).contains("SANs:       none (hosts are matched against the CN only"));

    let args = |extra: &[&str]| {
        let mut args = vec![
            format!("--endpoints={}", cluster.client_endpoints_csv()),
            format!("--cacert={}", path(&cluster_pki.ca_cert)),
            format!("--cert={}", path(&cluster_pki.client_cert)),
            format!("--key={}", path(&cluster_pki.client_key)),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        args
    };
    let accepting = start_proxy(args(&["--upstream-server-cn=etcd.legacy.internal"]));
    assert_eq!(etcdctl_ok(version, &accepting.endpoint(), None, &["put", "cn", "only"]), "OK\n");

    let wrong_name = start_proxy(args(&["--upstream-server-cn=other.name"]));
    let refused = etcdctl(version, &wrong_name.endpoint(), None, &["get", "cn", "--command-timeout=3s"]);
    assert!(!refused.status.success());
    let strict = start_proxy(args(&[]));
    let refused = etcdctl(version, &strict.endpoint(), None, &["get", "cn", "--command-timeout=3s"]);
    assert!(!refused.status.success());
    let (_, health) = strict.http_get("/health");
    assert!(health.contains("\"health\":\"false\""), "{health}");
    assert!(health.contains("certificate not valid for name"), "{health}");
}

both_versions!(cn_only_member_certificate => cn_only_member_certificate_3_4, cn_only_member_certificate_3_5);

/// RSA with a PKCS#1 key on the listener, ECDSA with a SEC1 key upstream, both made by openssl;
/// a TLS 1.2 ECDHE-AES-GCM client (as Go 1.11) still connects.
#[test]
fn rsa_pkcs1_sec1_keys_and_tls12() {
    let version = EtcdVersion::V3_5;
    let dir = TempDir::new().expect("tempdir");
    let d = dir.path();
    let cluster_pki = DevPki::create(d, "cluster").expect("cluster pki");
    let cluster = EtcdCluster::start(ClusterSpec::new(version, 1).with_tls(TlsSpec::from_dev_pki(&cluster_pki)))
        .expect("cluster");
    let p = |name: &str| path(&d.join(name));
    let ext = p("ext.cnf");
    std::fs::write(&ext, "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n").unwrap();
    openssl(&["genrsa", "-traditional", "-out", &p("rsa-key.pem"), "2048"]);
    openssl(&["req", "-new", "-key", &p("rsa-key.pem"), "-subj", "/CN=rsa-listener", "-out", &p("rsa.csr")]);
    let (ca, ca_key) = (path(&cluster_pki.ca_cert), path(&cluster_pki.ca_key));
    openssl(&[
        "x509",
        "-req",
        "-in",
        &p("rsa.csr"),
        "-CA",
        &ca,
        "-CAkey",
        &ca_key,
        "-CAcreateserial",
        "-days",
        "30",
        "-extfile",
        &ext,
        "-out",
        &p("rsa.pem"),
    ]);
    assert!(std::fs::read_to_string(d.join("rsa-key.pem")).unwrap().starts_with("-----BEGIN RSA PRIVATE KEY-----"));
    std::fs::write(d.join("client.cnf"), "extendedKeyUsage=clientAuth\n").unwrap();
    openssl(&["ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", &p("ec-key.pem")]);
    assert!(std::fs::read_to_string(d.join("ec-key.pem")).unwrap().starts_with("-----BEGIN EC PRIVATE KEY-----"));
    openssl(&["req", "-new", "-key", &p("ec-key.pem"), "-subj", "/CN=root", "-out", &p("ec.csr")]);
    openssl(&[
        "x509",
        "-req",
        "-in",
        &p("ec.csr"),
        "-CA",
        &ca,
        "-CAkey",
        &ca_key,
        "-CAcreateserial",
        "-days",
        "30",
        "-extfile",
        &p("client.cnf"),
        "-out",
        &p("ec.pem"),
    ]);

    let proxy = start_proxy(vec![
        format!("--endpoints={}", cluster.client_endpoints_csv()),
        format!("--cacert={ca}"),
        format!("--cert={}", p("ec.pem")),
        format!("--key={}", p("ec-key.pem")),
        format!("--cert-file={}", p("rsa.pem")),
        format!("--key-file={}", p("rsa-key.pem")),
    ]);
    let client = ClientTls {
        ca_cert: cluster_pki.ca_cert.clone(),
        cert: cluster_pki.client_cert.clone(),
        key: cluster_pki.client_key.clone(),
    };
    assert_eq!(etcdctl_ok(version, &proxy.endpoint(), Some(&client), &["put", "rsa", "ok"]), "OK\n");
    let output = Command::new("openssl")
        .args([
            "s_client",
            "-connect",
            &proxy.listen_addr().to_string(),
            "-tls1_2",
            "-cipher",
            "ECDHE-RSA-AES128-GCM-SHA256",
            "-CAfile",
            &ca,
            "-alpn",
            "h2",
        ])
        .stdin(std::process::Stdio::null())
        .output()
        .expect("openssl s_client");
    let printed = String::from_utf8_lossy(&output.stdout);
    assert!(printed.contains("Protocol  : TLSv1.2") || printed.contains("Protocol: TLSv1.2"), "{printed}");
    assert!(printed.contains("Cipher is ECDHE-RSA-AES128-GCM-SHA256"), "{printed}");
    assert!(printed.contains("Verify return code: 0 (ok)"), "{printed}");
    assert!(printed.contains("CN = rsa-listener") || printed.contains("CN=rsa-listener"), "{printed}");
}

// ---------------------------------------------------------------------------------------------
// `certs` commands make certificates etcd itself accepts for serving, peers and clients.

fn certs_cli(args: &[&str]) -> String {
    let output = Command::new(PROXY_BIN).arg("certs").args(args).output().expect("run certs");
    assert!(output.status.success(), "certs {args:?}: {}", String::from_utf8_lossy(&output.stderr));
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn certs_commands_make_a_working_cluster(version: EtcdVersion) {
    let dir = TempDir::new().expect("tempdir");
    let p = |name: &str| path(&dir.path().join(name));
    certs_cli(&["ca", "--cn", "etcd-ca", "--out-cert", &p("ca.pem"), "--out-key", &p("ca-key.pem")]);
    let issue = |kind: &str, cn: &str, name: &str, sans: &[&str]| {
        let (cert, key) = (p(&format!("{name}.pem")), p(&format!("{name}-key.pem")));
        let mut args = vec![
            kind,
            "--ca",
            &*p("ca.pem"),
            "--ca-key",
            &*p("ca-key.pem"),
            "--cn",
            cn,
            "--out-cert",
            &cert,
            "--out-key",
            &key,
        ]
        .into_iter()
        .map(str::to_owned)
        .collect::<Vec<_>>();
        for san in sans {
            args.push("--san".into());
            args.push((*san).to_owned());
        }
        let printed = certs_cli(&args.iter().map(String::as_str).collect::<Vec<_>>());
        assert!(printed.starts_with(&format!("wrote {cert} and {key} (mode 0600): CN={cn} valid until ")), "{printed}");
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(&key).unwrap().permissions().mode() & 0o777, 0o600);
    };
    issue("server", "etcd-server", "server", &["127.0.0.1", "localhost"]);
    issue("peer", "etcd-peer", "peer", &["127.0.0.1,localhost"]);
    issue("client", "root", "client", &[]);
    let client = ClientTls {
        ca_cert: dir.path().join("ca.pem"),
        cert: dir.path().join("client.pem"),
        key: dir.path().join("client-key.pem"),
    };
    let spec = TlsSpec {
        server_cert: dir.path().join("server.pem"),
        server_key: dir.path().join("server-key.pem"),
        trusted_ca: dir.path().join("ca.pem"),
        peer_cert: dir.path().join("peer.pem"),
        peer_key: dir.path().join("peer-key.pem"),
        client: client.clone(),
    };
    // Two members: peers authenticate each other with the peer certificates.
    let cluster = EtcdCluster::start(ClusterSpec::new(version, 2).with_tls(spec)).expect("TLS cluster of two");
    let endpoints = cluster.client_endpoints_csv();
    assert_eq!(etcdctl_ok(version, &endpoints, Some(&client), &["put", "made-by", "certs"]), "OK\n");
    let members = etcdctl_ok(version, &endpoints, Some(&client), &["member", "list"]);
    assert_eq!(members.lines().filter(|line| line.contains(", started, ")).count(), 2, "{members}");
    let health = etcdctl(version, &endpoints, Some(&client), &["endpoint", "health"]);
    assert!(health.status.success(), "{}", String::from_utf8_lossy(&health.stderr));

    // Renewal in place: same key, new validity; etcd serves it from the next handshake.
    let etcd_addr = cluster.client_addrs()[0].to_string();
    let serial_before = served_line(&etcd_addr, "serial:");
    let renewed = certs_cli(&[
        "renew",
        "--ca",
        &p("ca.pem"),
        "--ca-key",
        &p("ca-key.pem"),
        "--cert",
        &p("server.pem"),
        "--key",
        &p("server-key.pem"),
        "--days",
        "45",
    ]);
    assert!(renewed.starts_with(&format!("wrote {}: CN=etcd-server valid until ", p("server.pem"))), "{renewed}");
    let serial_after = served_line(&etcd_addr, "serial:");
    assert_ne!(serial_before, serial_after);
    assert_eq!(served_line(&etcd_addr, "SANs:"), "IP:127.0.0.1, DNS:localhost");
    assert_eq!(served_line(&etcd_addr, "days left:"), "44");
    assert_eq!(etcdctl_ok(version, &endpoints, Some(&client), &["get", "made-by", "--print-value-only"]), "certs\n");

    // inspect on files and endpoints, verified against the CA.
    let printed = certs_cli(&["inspect", "--endpoints", &etcd_addr, "--cacert", &p("ca.pem")]);
    assert!(printed.contains("  issuer:     CN=etcd-ca\n"), "{printed}");
    assert!(printed.contains("  verified against --cacert: yes"), "{printed}");
    let printed = certs_cli(&["inspect", &p("peer.pem")]);
    assert!(printed.contains("  usages:     serverAuth, clientAuth\n"), "{printed}");
}

both_versions!(
    certs_commands_make_a_working_cluster
        => certs_commands_make_a_working_cluster_3_4, certs_commands_make_a_working_cluster_3_5
);

#[test]
fn certificate_flags_have_environment_twins_and_are_validated() {
    assert_flags_in_help_with_env_twins(&[
        "legacy-client-ca-file",
        "legacy-client-expired-until",
        "upstream-server-cn",
        "cert-expiry-warning-days",
        "cert-expiry-critical-days",
        "cert-reload-interval",
    ]);
    let dir = TempDir::new().expect("tempdir");
    let pki = DevPki::create(dir.path(), "p").expect("pki");
    let listener = [
        format!("--cert-file={}", path(&pki.server_cert)),
        format!("--key-file={}", path(&pki.server_key)),
        format!("--trusted-ca-file={}", path(&pki.ca_cert)),
    ];
    let run = |extra: &[&str]| {
        let mut args = vec!["start"];
        args.extend(listener.iter().map(String::as_str));
        args.extend(extra);
        run_proxy(&args)
    };
    let legacy = format!("--legacy-client-ca-file={}", path(&pki.ca_cert));
    let (code, stderr) = run(&[&legacy]);
    assert_eq!(code, Some(2));
    assert!(stderr.contains("--legacy-client-ca-file needs an end date for the exception"), "{stderr}");
    let (code, stderr) = run(&[&legacy, "--legacy-client-expired-until=2020-01-31"]);
    assert_eq!(code, Some(2));
    assert!(stderr.contains("invalid --legacy-client-expired-until \"2020-01-31\": the date has passed"), "{stderr}");
    let (code, stderr) = run(&[&legacy, "--legacy-client-expired-until=31.01.2030"]);
    assert_eq!(code, Some(2));
    assert!(stderr.contains("expected a date YYYY-MM-DD (UTC)"), "{stderr}");
}

/// SIGHUP reloads at once, without waiting for the (here hour-long) poll interval.
#[test]
fn sighup_reloads_immediately() {
    let dir = TempDir::new().expect("tempdir");
    let d = dir.path();
    let ca = TestCa::new(d, "hup");
    let (first, first_key) = ca.issue("first", "before-hup", Usage::Server, 20 * DAY, 0);
    let (second, second_key) = ca.issue("second", "after-hup", Usage::Server, 20 * DAY, 0);
    let (cert, key) = (d.join("listener.pem"), d.join("listener-key.pem"));
    copy_over(&cert, &first);
    copy_over(&key, &first_key);
    let proxy = start_proxy(vec![
        "--endpoints=127.0.0.1:1".to_owned(),
        format!("--cert-file={}", path(&cert)),
        format!("--key-file={}", path(&key)),
        "--cert-reload-interval=1h".to_owned(),
    ]);
    let addr = proxy.listen_addr().to_string();
    assert_eq!(served_line(&addr, "subject:"), "CN=before-hup");
    copy_over(&key, &second_key);
    copy_over(&cert, &second);
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(served_line(&addr, "subject:"), "CN=before-hup", "not polled within the hour");
    let status = Command::new("kill").args(["-HUP", &proxy.pid().to_string()]).status().expect("kill -HUP");
    assert!(status.success());
    let latency = wait_for_metric(&proxy, &reloads("listener", "applied"), 1.0);
    assert_eq!(served_line(&addr, "subject:"), "CN=after-hup");
    assert!(proxy.log_contents().contains("SIGHUP: reloading certificates"));
    eprintln!("SIGHUP to reload observed: {latency:?}");
}

/// The client CRL keeps working and is reloaded like the rest: revoking a client certificate
/// shuts out its new connections without a restart.
#[test]
fn client_crl_is_reloaded() {
    let version = EtcdVersion::V3_5;
    let dir = TempDir::new().expect("tempdir");
    let d = dir.path();
    let pki = DevPki::create(d, "crl").expect("pki");
    let p = |name: &str| path(&d.join(name));
    std::fs::write(d.join("index.txt"), "").unwrap();
    std::fs::write(d.join("crlnumber"), "01\n").unwrap();
    std::fs::write(
        d.join("ca.cnf"),
        format!(
            "[ca]\ndefault_ca = own\n[own]\ndatabase = {}\ncrlnumber = {}\ndefault_md = sha256\ndefault_crl_days = 30\n",
            p("index.txt"),
            p("crlnumber")
        ),
    )
    .unwrap();
    let ca_args = ["-config", &*p("ca.cnf"), "-cert", &*path(&pki.ca_cert), "-keyfile", &*path(&pki.ca_key)];
    let gencrl = |out: &str| {
        let mut args = vec!["ca"];
        args.extend(ca_args);
        args.extend(["-gencrl", "-out", out]);
        openssl(&args);
    };
    let crl = p("client.crl.pem");
    gencrl(&crl);

    let cluster = EtcdCluster::start(ClusterSpec::new(version, 1)).expect("cluster");
    let proxy = start_proxy(vec![
        format!("--endpoints={}", cluster.client_endpoints_csv()),
        format!("--cert-file={}", path(&pki.server_cert)),
        format!("--key-file={}", path(&pki.server_key)),
        format!("--trusted-ca-file={}", path(&pki.ca_cert)),
        format!("--client-crl-file={crl}"),
    ]);
    let client = ClientTls::from_dev_pki(&pki);
    assert_eq!(etcdctl_ok(version, &proxy.endpoint(), Some(&client), &["put", "crl", "before"]), "OK\n");

    let mut revoke = vec!["ca"];
    revoke.extend(ca_args);
    let client_cert = path(&pki.client_cert);
    revoke.extend(["-revoke", &client_cert]);
    openssl(&revoke);
    let staged = p("staged.crl.pem");
    gencrl(&staged);
    std::fs::rename(&staged, &crl).unwrap();
    wait_for_metric(&proxy, &reloads("listener", "applied"), 1.0);

    let refused = etcdctl(version, &proxy.endpoint(), Some(&client), &["get", "crl", "--dial-timeout=2s"]);
    assert!(!refused.status.success(), "a revoked client certificate must be refused");
    let log = proxy.log_contents();
    assert!(log.contains("client TLS handshake failed") && log.contains("invalid peer certificate: Revoked"), "{log}");
}
