//! The status page on the admin address, as a browser shows it: headless Chromium loads `/` from
//! a proxy in front of a real three-member cluster (TLS on both sides, so that there are
//! certificates to show) while clients use it, and the rendered page must name every member, show
//! the doctor's verdicts and the certificates, and draw charts from the proxy's own counters.
//! Screenshots (desktop and phone width) are kept in `target/` for people to look at. Nothing
//! the page loads or links to may leave the admin server.

use std::collections::BTreeSet;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use etcd_client::{Certificate, Client, ConnectOptions, GetOptions, Identity, TlsOptions, WatchOptions};
use etcd_compat_tests::{chromium, workspace_root, ClientTls, EtcdVersion, ProxyProcess};

use crate::support::{both_versions, runtime, wait_for_health, Deployment, Wire};

const MEMBERS: [&str; 3] = ["m0", "m1", "m2"];

/// Longest a single Chromium run may take; a loaded CI machine starts it in a few seconds.
const BROWSER_TIMEOUT: Duration = Duration::from_secs(90);

/// The page scrapes `/metrics` at load, a second later and then every 2 s: eight seconds of the
/// browser's virtual time give it several samples, hence rates, whatever the machine's speed
/// (virtual time stands still while a fetch is under way). The page's clock is virtual too and
/// runs ahead of the traffic, so the screenshots' rates are lower than the real ones.
const VIRTUAL_TIME_MS: u32 = 8000;

both_versions!(status_page_shows_members_diagnosis_and_live_charts => status_page_3_4, status_page_3_5);

fn status_page_shows_members_diagnosis_and_live_charts(version: EtcdVersion) {
    let deployment = Deployment::start(version, 3, Wire::Tls, &[]);
    let tls = deployment.client_tls.clone().expect("client TLS material");
    let (status, health) = wait_for_health(&deployment.proxy, Duration::from_secs(30), |status, body| {
        status == 200 && body.contains("\"leader\":true") && body_names_all_members(body)
    });
    assert!(
        status == 200 && health.contains("\"leader\":true") && body_names_all_members(&health),
        "/health never named every member and a leader: {status} {health}"
    );

    // Calls through the proxy before the page loads (including two that etcd refuses, so that
    // the errors chart has something to show), a watch that stays open, and steady traffic
    // while the browser reads the page, so that its rates are not all zero.
    let runtime = runtime();
    let endpoint = deployment.endpoint.clone();
    let _watch = runtime.block_on(async {
        let mut client = connect(&endpoint, &tls).await;
        for i in 0..20 {
            client.put(format!("status/{i:02}"), "v", None).await.expect("put");
        }
        let listed = client.get("status/", Some(GetOptions::new().with_prefix())).await.expect("range");
        assert_eq!(listed.kvs().len(), 20);
        let head = listed.header().expect("header").revision();
        let future = GetOptions::new().with_revision(head + 1000);
        assert!(client.get("status/00", Some(future)).await.is_err(), "a future revision is refused");
        assert!(client.lease_revoke(0x5eed).await.is_err(), "an unknown lease is refused");
        client.watch("status/", Some(WatchOptions::new().with_prefix())).await.expect("watch")
    });
    let stop = Arc::new(AtomicBool::new(false));
    let traffic = runtime.spawn({
        let stop = Arc::clone(&stop);
        let tls = tls.clone();
        async move {
            let mut client = connect(&endpoint, &tls).await;
            let mut i = 0_u64;
            while !stop.load(Ordering::Relaxed) {
                // Failures would only show on the page; the assertions are about the page.
                let _ = client.put(format!("status/t{}", i % 16), "v", None).await;
                let _ = client.get("status/", Some(GetOptions::new().with_prefix().with_keys_only())).await;
                if i.is_multiple_of(2) {
                    // Refused by etcd: the errors chart's data.
                    let _ = client.lease_revoke(0x5eed).await;
                }
                i += 1;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    });

    let served = assert_no_external_references(&deployment.proxy);
    let diagnosis = diagnosis(&deployment.proxy);

    let scratch = tempfile::tempdir().expect("scratch dir");
    let url = format!("http://{}/", deployment.proxy.metrics_addr());
    let browser = Browser::new(scratch.path());
    // The page fills in as its fetches come back; a run that caught it before the first scrape
    // is repeated (bounded), and the last DOM is what the assertions below explain.
    let mut dom = String::new();
    for _ in 0..3 {
        dom = browser.dump_dom(&url);
        if MEMBERS.iter().all(|m| dom.contains(&member_row(m))) && data_points(&dom, "chart-requests") >= 1 {
            break;
        }
    }

    for member in MEMBERS {
        assert!(dom.contains(&member_row(member)), "member {member} is not on the page:\n{dom}");
    }
    assert_eq!(dom.matches("class=\"role-leader\"").count(), 1, "one member is shown as leader:\n{dom}");
    assert_eq!(dom.matches(">healthy</td>").count(), 3, "every member is shown healthy:\n{dom}");
    assert!(dom.contains(&format!(">{}.", version.as_str())), "the members' etcd release is shown:\n{dom}");

    // The diagnosis: the verdict, every check (the doctor always makes the same ones), each
    // member's database size against its quota, and every certificate with its days left.
    let verdict = attribute(&dom, "id=\"verdict\"", "data-verdict");
    assert!(["ok", "warning", "critical"].contains(&verdict.as_str()), "verdict banner shows {verdict:?}:\n{dom}");
    for check in &diagnosis.checks {
        assert!(
            dom.contains(&format!("data-check=\"{check}\"")),
            "the doctor's check {check} is not on the page:\n{dom}"
        );
    }
    for member in MEMBERS {
        let row = element(&dom, &member_row(member));
        let row = &row[..row.find("</tr>").unwrap_or(row.len())];
        assert!(row.contains("iB / "), "member {member}'s db size and quota are not shown: {row}");
    }
    assert!(!diagnosis.certificates.is_empty(), "the doctor lists no certificates though TLS is on");
    for (path, days_left) in &diagnosis.certificates {
        assert!(
            dom.contains(&format!(">{days_left}</td>")) && dom.contains(&format!(">{path}</td>")),
            "certificate {path} with {days_left} days left is not on the page:\n{dom}"
        );
    }

    for (chart, series) in [
        ("chart-requests", ["Put", "Range"]),
        ("chart-errors", ["Range", "LeaseRevoke"]),
        ("chart-streams", ["client connections", "auth sessions"]),
    ] {
        let points = data_points(&dom, chart);
        assert!(points >= 1, "{chart} was drawn with {points} points:\n{dom}");
        let legend = element(&dom, &format!("id=\"{chart}\""));
        for name in series {
            assert!(legend.contains(&format!(">{name}<")), "{chart} has no series {name}:\n{legend}");
        }
    }
    for chart in ["chart-latency", "chart-budget", "chart-failovers"] {
        assert!(data_points(&dom, chart) >= 1, "{chart} has no data:\n{dom}");
    }

    let target = workspace_root().join("target");
    for (name, width) in
        [(format!("status-page-{version}.png"), 1280), (format!("status-page-{version}-phone.png"), 412)]
    {
        let shot = scratch.path().join(&name);
        browser.screenshot(&url, &shot, width, 2400);
        let png = std::fs::read(&shot).unwrap_or_else(|error| panic!("no screenshot at {}: {error}", shot.display()));
        assert!(png.starts_with(b"\x89PNG\r\n\x1a\n"), "{} is not a PNG", shot.display());
        let shot_width = png.get(16..20).map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]));
        assert_eq!(shot_width, Some(width), "{} width", shot.display());
        assert!(png.len() > 20_000, "{} is only {} bytes: a blank page?", shot.display(), png.len());
        // Kept where people look for build output; the temp dir goes with the test.
        if std::fs::create_dir_all(&target).is_ok() {
            let _ = std::fs::copy(&shot, target.join(&name));
        }
    }

    stop.store(true, Ordering::Relaxed);
    runtime.block_on(traffic).expect("traffic task");
    assert!(served >= 6, "the page loads {served} files");
}

fn body_names_all_members(health: &str) -> bool {
    MEMBERS.iter().all(|m| health.contains(&format!("\"name\":\"{m}\"")))
}

fn member_row(name: &str) -> String {
    format!("data-member=\"{name}\"")
}

/// An etcd-client `Client` of the proxy at `endpoint`, over TLS with `tls`.
async fn connect(endpoint: &str, tls: &ClientTls) -> Client {
    let read = |path: &Path| std::fs::read(path).unwrap_or_else(|error| panic!("read {}: {error}", path.display()));
    let options = ConnectOptions::new().with_tls(
        TlsOptions::new()
            .ca_certificate(Certificate::from_pem(read(&tls.ca_cert)))
            .identity(Identity::from_pem(read(&tls.cert), read(&tls.key))),
    );
    Client::connect([endpoint], Some(options)).await.unwrap_or_else(|error| panic!("connect to {endpoint}: {error}"))
}

/// What `/doctor` reported that the page must show.
struct Diagnosis {
    /// Every check, as `group/name`.
    checks: BTreeSet<String>,
    /// Every certificate, as (path, days left).
    certificates: Vec<(String, i64)>,
}

fn diagnosis(proxy: &ProxyProcess) -> Diagnosis {
    let (status, body) = proxy.http_get("/doctor");
    assert_eq!(status, 200, "/doctor answered {status}: {body}");
    let answer: serde_json::Value =
        serde_json::from_str(&body).unwrap_or_else(|error| panic!("/doctor is not JSON ({error}): {body}"));
    let checks = answer["checks"].as_array().unwrap_or_else(|| panic!("/doctor has no checks: {body}"));
    let checks = checks
        .iter()
        .map(|check| format!("{}/{}", check["group"].as_str().unwrap_or("?"), check["name"].as_str().unwrap_or("?")))
        .collect();
    let certificates =
        answer["certificates"].as_array().unwrap_or_else(|| panic!("/doctor has no certificates: {body}"));
    let certificates = certificates
        .iter()
        .map(|cert| (cert["path"].as_str().unwrap_or("?").to_owned(), cert["days_left"].as_i64().unwrap_or(i64::MIN)))
        .collect();
    Diagnosis { checks, certificates }
}

/// The opening tag of the first element carrying `marker` (an attribute as written in the DOM)
/// up to the end of the document: the element and what follows it.
fn element<'a>(dom: &'a str, marker: &str) -> &'a str {
    let at = dom.find(marker).unwrap_or_else(|| panic!("no element with {marker} on the page:\n{dom}"));
    let start = dom[..at].rfind('<').unwrap_or(at);
    let end = dom[at..].find("</figure>").map_or(dom.len(), |end| at + end);
    &dom[start..end]
}

/// The value of attribute `name` on the element carrying `marker`; empty if it has none.
fn attribute(dom: &str, marker: &str, name: &str) -> String {
    let tag = element(dom, marker);
    let tag = &tag[..tag.find('>').unwrap_or(tag.len())];
    let needle = format!("{name}=\"");
    tag.find(&needle)
        .map_or(String::new(), |at| tag[at + needle.len()..].split('"').next().unwrap_or_default().to_owned())
}

/// How many points the page says it drew in chart `id` (0 before its first drawing).
fn data_points(dom: &str, id: &str) -> u64 {
    if !dom.contains(&format!("id=\"{id}\"")) {
        return 0;
    }
    attribute(dom, &format!("id=\"{id}\""), "data-points").parse().unwrap_or(0)
}

// ---------------------------------------------------------------------------------------------
// Where the page's files point.

/// Fetches `/` and every file it references, transitively; panics if any reference leaves the
/// admin server or any referenced file is missing. Returns how many files were fetched.
///
/// Only references are checked (HTML `src`/`href`, CSS `url(`/`@import`, script `fetch(`),
/// not every `http` in the text: a minified library may carry its homepage in its licence
/// banner or XML namespace names, which no browser loads.
fn assert_no_external_references(proxy: &ProxyProcess) -> usize {
    let mut queue = vec!["/".to_owned()];
    let mut fetched = BTreeSet::new();
    while let Some(path) = queue.pop() {
        if !fetched.insert(path.clone()) {
            continue;
        }
        let (status, text) = proxy.http_get(&path);
        assert_eq!(status, 200, "{path} (referenced by the status page) answered {status}: {text}");
        if path == "/" {
            assert!(!text.to_ascii_lowercase().contains("<base"), "a <base> would change where paths point");
        }
        for (kind, target) in references(&text) {
            let lower = target.to_ascii_lowercase();
            assert!(
                !(lower.starts_with("http:") || lower.starts_with("https:") || lower.starts_with("//")),
                "{path} references {target:?} ({kind}): the page must load nothing from elsewhere"
            );
            match kind {
                // Data the scripts read: the admin server's own answers (a variable holding one
                // of them is fine too).
                "fetch(" | "getJson(" => assert!(
                    ["metrics", "health", "doctor", "path"].contains(&target.as_str()),
                    "{path} fetches {target:?}"
                ),
                // Files, relative to the page at `/`.
                _ => queue.push(format!("/{}", target.trim_start_matches("./").trim_start_matches('/'))),
            }
        }
    }
    fetched.len()
}

/// `(marker, target)` for every reference in `text`: what follows `src=`, `href=`, `url(`,
/// `@import` or `fetch(`, without quotes.
fn references(text: &str) -> Vec<(&'static str, String)> {
    let mut found = Vec::new();
    for marker in ["src=", "href=", "url(", "@import", "fetch(", "getJson("] {
        for (at, _) in text.match_indices(marker) {
            let rest = text[at + marker.len()..].trim_start_matches([' ', '"', '\'', '`']);
            let target: String =
                rest.chars().take_while(|c| !matches!(c, '"' | '\'' | '`' | ')' | ',' | ' ' | '>' | ';')).collect();
            found.push((marker, target));
        }
    }
    found
}

// ---------------------------------------------------------------------------------------------
// The browser.

/// Headless Chromium with its own profile, so that parallel tests do not share one.
struct Browser {
    dir: PathBuf,
}

impl Browser {
    fn new(dir: &Path) -> Browser {
        Browser { dir: dir.to_path_buf() }
    }

    /// The DOM of `url` after [`VIRTUAL_TIME_MS`] of the page's time.
    fn dump_dom(&self, url: &str) -> String {
        let out = self.dir.join("dom.html");
        self.run(&["--window-size=1280,2400".to_owned(), "--dump-dom".to_owned(), url.to_owned()], &out);
        std::fs::read_to_string(&out).expect("read the dumped DOM")
    }

    /// Saves a PNG of `url` at `width`x`height` after [`VIRTUAL_TIME_MS`] of the page's time.
    fn screenshot(&self, url: &str, png: &Path, width: u32, height: u32) {
        let args =
            [format!("--window-size={width},{height}"), format!("--screenshot={}", png.display()), url.to_owned()];
        self.run(&args, &self.dir.join("screenshot.out"));
    }

    /// Runs Chromium with `args`, its stdout into `out`; panics with its stderr if it fails or
    /// takes longer than [`BROWSER_TIMEOUT`].
    fn run(&self, args: &[String], out: &Path) {
        let stderr_path = self.dir.join("chromium.err");
        let stdout = File::create(out).expect("create the browser's output file");
        let stderr = File::create(&stderr_path).expect("create the browser's log file");
        let mut child = Command::new(chromium())
            .args([
                "--headless=new",
                // Tests run as root in containers, where Chromium's sandbox cannot start.
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--no-first-run",
                "--no-default-browser-check",
                "--disable-extensions",
                // The page must work offline: nothing but the proxy is contacted.
                "--disable-background-networking",
                "--disable-component-update",
                "--hide-scrollbars",
            ])
            .arg(format!("--user-data-dir={}", self.dir.join("profile").display()))
            .arg(format!("--virtual-time-budget={VIRTUAL_TIME_MS}"))
            .args(args)
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr)
            .spawn()
            .expect("start chromium");
        let deadline = Instant::now() + BROWSER_TIMEOUT;
        let status = loop {
            if let Some(status) = child.try_wait().expect("wait for chromium") {
                break status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("chromium {args:?} took longer than {BROWSER_TIMEOUT:?}:\n{}", log_tail(&stderr_path));
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        assert!(status.success(), "chromium {args:?} exited with {status}:\n{}", log_tail(&stderr_path));
    }
}

fn log_tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}
