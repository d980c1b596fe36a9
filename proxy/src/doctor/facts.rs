//! What the doctor reads off the cluster, as the typed `etcd-client` sees it: the member list,
//! each member's Status (twice, a moment apart, to see movement), alarms, revisions, auth and
//! the sizes of key prefixes. Reading only; every failure is kept as evidence, not raised.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use etcd_client::{AlarmAction, AlarmType, Client, GetOptions};

use crate::cluster_access::ClusterAccess;

/// How long one etcd call of the doctor may take: a member slower than this is as good as down.
const CALL_TIMEOUT: Duration = Duration::from_secs(5);
/// Keys per page when sizing prefixes.
const SCAN_PAGE: i64 = 1000;

/// One Status answer of one member.
#[derive(Debug, Clone)]
pub struct StatusSample {
    pub version: String,
    pub db_size: i64,
    pub db_size_in_use: i64,
    /// The member's own quota (etcd 3.6+ says it; 0 before).
    pub quota: i64,
    pub leader: u64,
    pub raft_index: u64,
    pub raft_term: u64,
    pub raft_applied_index: u64,
    /// How long the Status call took.
    pub latency: Duration,
}

/// A member as the member list gives it, with what its own endpoint said.
#[derive(Debug, Clone)]
pub struct MemberFacts {
    pub id: u64,
    /// Empty for a member added but never started.
    pub name: String,
    pub client_urls: Vec<String>,
    pub is_learner: bool,
    /// The first Status, or why there is none.
    pub status: Result<StatusSample, String>,
    /// A second Status, taken after the doctor's other reads.
    pub later: Option<StatusSample>,
}

impl MemberFacts {
    /// The members of a MemberList answer, their Status not yet asked.
    pub fn listed(list: &etcd_client::MemberListResponse) -> Vec<MemberFacts> {
        list.members()
            .iter()
            .map(|m| MemberFacts {
                id: m.id(),
                name: m.name().to_owned(),
                client_urls: m.client_urls().to_vec(),
                is_learner: m.is_learner(),
                status: Err("not asked".to_owned()),
                later: None,
            })
            .collect()
    }
}

/// A configured endpoint that is no member's client URL.
#[derive(Debug, Clone)]
pub struct StrayEndpoint {
    pub url: String,
    /// The member id it answers as, or why it does not answer.
    pub answers_as: Result<u64, String>,
}

/// Whether auth is on, and whether the configured identity gets in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuthFacts {
    Disabled,
    /// On; `user` is the proxy's `--user`, if any, which authenticated.
    Enabled {
        user: Option<String>,
    },
    /// On, and the proxy's `--user` was refused with this error.
    Refused {
        user: String,
        error: String,
    },
    Unknown(String),
}

/// Total answer size of the keys under one prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PrefixSize {
    pub prefix: String,
    pub keys: u64,
    pub bytes: u64,
}

/// What a bounded scan of the keyspace found.
#[derive(Debug, Clone)]
pub struct KeyScan {
    pub keys: u64,
    pub bytes: u64,
    /// Stopped at the byte limit before the end of the keyspace.
    pub partial: bool,
    /// Largest first.
    pub prefixes: Vec<PrefixSize>,
}

/// Everything one diagnosis is made from.
#[derive(Debug, Clone)]
pub struct Facts {
    pub endpoints: Vec<String>,
    /// The member list, or why it could not be read.
    pub members: Result<Vec<MemberFacts>, String>,
    pub stray_endpoints: Vec<StrayEndpoint>,
    /// Active alarms as (member id, alarm), or why they could not be read.
    pub alarms: Result<Vec<(u64, AlarmType)>, String>,
    pub revision: Option<i64>,
    /// The oldest revision still readable (0: never compacted), or why it is not known.
    pub compact_revision: Result<i64, String>,
    pub auth: AuthFacts,
    pub key_scan: Result<KeyScan, String>,
}

/// How far the doctor reads.
#[derive(Debug, Clone, Copy)]
pub struct ReadLimits {
    /// Stop sizing prefixes after this many value bytes.
    pub scan_bytes: u64,
    /// Pause between the two Status rounds.
    pub sample_gap: Duration,
}

/// Reads the cluster behind `access`.
pub async fn gather(access: &ClusterAccess, limits: ReadLimits) -> Facts {
    let auth = probe_auth(access).await;
    let mut client = match connect_any(access).await {
        Ok(client) => client,
        Err(error) => {
            return Facts {
                endpoints: access.endpoints.clone(),
                members: Err(error.clone()),
                stray_endpoints: Vec::new(),
                alarms: Err(error.clone()),
                revision: None,
                compact_revision: Err(error.clone()),
                auth,
                key_scan: Err(error),
            };
        }
    };
    let client = &mut client;
    let mut members = timed(client.member_list()).await.map(|list| MemberFacts::listed(&list));
    if let Ok(members) = members.as_mut() {
        for member in members.iter_mut() {
            member.status = status_of_member(access, member).await;
        }
    }
    let stray_endpoints = stray_endpoints(access, members.as_ref().ok().map(Vec::as_slice)).await;
    let alarms = timed(client.alarm(AlarmAction::Get, AlarmType::None, None))
        .await
        .map(|answer| answer.alarms().iter().map(|a| (a.member_id(), a.alarm())).collect::<Vec<_>>());
    let revision = timed(client.get(vec![0u8], Some(GetOptions::new().with_count_only())))
        .await
        .ok()
        .and_then(|answer| answer.header().map(|h| h.revision()));
    let compact_revision = match revision {
        Some(revision) => oldest_readable_revision(client, revision).await,
        None => Err("the current revision could not be read".to_owned()),
    };
    let key_scan = match revision {
        Some(revision) => scan_prefixes(client, revision, limits.scan_bytes).await,
        None => Err("the current revision could not be read".to_owned()),
    };
    // The second round shows what moved while the doctor read: terms (elections), indexes.
    tokio::time::sleep(limits.sample_gap).await;
    if let Ok(members) = members.as_mut() {
        for member in members.iter_mut().filter(|m| m.status.is_ok()) {
            member.later = status_of_member(access, member).await.ok();
        }
    }
    Facts {
        endpoints: access.endpoints.clone(),
        members,
        stray_endpoints,
        alarms,
        revision,
        compact_revision,
        auth,
        key_scan,
    }
}

/// One etcd call within [`CALL_TIMEOUT`], its error as text.
pub async fn timed<T>(call: impl std::future::Future<Output = Result<T, etcd_client::Error>>) -> Result<T, String> {
    match tokio::time::timeout(CALL_TIMEOUT, call).await {
        Ok(Ok(answer)) => Ok(answer),
        Ok(Err(error)) => Err(describe(&error)),
        Err(_) => Err(format!("no answer within {}s", CALL_TIMEOUT.as_secs())),
    }
}

/// An etcd-client error as etcd said it: the gRPC message where there is one.
pub fn describe(error: &etcd_client::Error) -> String {
    match error {
        etcd_client::Error::GRpcStatus(status) => status.message().to_owned(),
        other => other.to_string(),
    }
}

/// A client of exactly one endpoint, so that Status and Defragment reach that member.
pub async fn connect_one(access: &ClusterAccess, url: &str) -> Result<Client, String> {
    let single = ClusterAccess { endpoints: vec![url.to_owned()], ..access.clone() };
    match tokio::time::timeout(CALL_TIMEOUT, single.connect(url)).await {
        Ok(Ok(client)) => Ok(client),
        // A --user configured for a cluster without auth: the reads need no identity.
        Ok(Err(error))
            if single.credentials.is_some() && error.to_string().contains("authentication is not enabled") =>
        {
            Box::pin(connect_one(&ClusterAccess { credentials: None, ..single }, url)).await
        }
        Ok(Err(error)) => Err(error.to_string()),
        Err(_) => Err(format!("{url}: no connection within {}s", CALL_TIMEOUT.as_secs())),
    }
}

/// A client of the first endpoint that answers, tried in order: a client balanced over every
/// endpoint would send some calls to a member that is down, and the doctor must read the
/// cluster exactly then.
pub async fn connect_any(access: &ClusterAccess) -> Result<Client, String> {
    let mut errors = Vec::new();
    for url in &access.endpoints {
        match connect_one(access, url).await {
            Ok(mut client) => match timed(client.status()).await {
                Ok(_) => return Ok(client),
                Err(error) => errors.push(format!("{url}: {error}")),
            },
            Err(error) => errors.push(error),
        }
    }
    Err(format!("no endpoint answers: {}", errors.join("; ")))
}

/// The member's Status from its first client URL.
pub async fn status_of_member(access: &ClusterAccess, member: &MemberFacts) -> Result<StatusSample, String> {
    let Some(url) = member.client_urls.first() else {
        return Err("the member has no client URL: it was added but never started".to_owned());
    };
    status_of(access, url).await
}

async fn status_of(access: &ClusterAccess, url: &str) -> Result<StatusSample, String> {
    let mut client = connect_one(access, url).await?;
    let started = Instant::now();
    let status = timed(client.status()).await?;
    Ok(StatusSample {
        version: status.version().to_owned(),
        db_size: status.db_size(),
        db_size_in_use: status.raft_used_db_size(),
        quota: status.db_size_quota(),
        leader: status.leader(),
        raft_index: status.raft_index(),
        raft_term: status.raft_term(),
        raft_applied_index: status.raft_applied_index(),
        latency: started.elapsed(),
    })
}

/// Configured endpoints that no member lists as a client URL: a member removed from the
/// cluster but left in `--endpoints`, or a typo.
async fn stray_endpoints(access: &ClusterAccess, members: Option<&[MemberFacts]>) -> Vec<StrayEndpoint> {
    let Some(members) = members else { return Vec::new() };
    let listed = |url: &str| {
        members.iter().any(|m| m.client_urls.iter().any(|c| c.trim_end_matches('/') == url.trim_end_matches('/')))
    };
    let mut strays = Vec::new();
    for url in access.endpoints.iter().filter(|url| !listed(url)) {
        let answers_as = match connect_one(access, url).await {
            Ok(mut client) => timed(client.status()).await.map(|s| s.header().map_or(0, |h| h.member_id())),
            Err(error) => Err(error),
        };
        strays.push(StrayEndpoint { url: url.clone(), answers_as });
    }
    strays
}

/// The smallest revision a Range can still read at, found by bisection with single-key,
/// count-only reads (cheap however large the keyspace): 0 when revision 1 is still readable.
pub async fn oldest_readable_revision(client: &mut Client, current: i64) -> Result<i64, String> {
    let readable = |revision: i64| {
        let mut client = client.clone();
        async move {
            let options = GetOptions::new().with_revision(revision).with_count_only();
            match timed(client.get(vec![0u8], Some(options))).await {
                Ok(_) => Ok(true),
                Err(error) if error.contains("required revision has been compacted") => Ok(false),
                Err(error) => Err(error),
            }
        }
    };
    if readable(1).await? {
        return Ok(0);
    }
    // Invariant: `low` is compacted, `high` is readable.
    let (mut low, mut high) = (1, current);
    while high - low > 1 {
        let middle = low + (high - low) / 2;
        if readable(middle).await? {
            high = middle;
        } else {
            low = middle;
        }
    }
    Ok(high)
}

/// Sizes what a `get --prefix` of each prefix would answer, reading the keyspace in pages at
/// `revision` until `max_bytes` of values were read.
async fn scan_prefixes(client: &mut Client, revision: i64, max_bytes: u64) -> Result<KeyScan, String> {
    let mut sizes: BTreeMap<String, (u64, u64)> = BTreeMap::new();
    let (mut keys, mut bytes) = (0u64, 0u64);
    let mut from = vec![0u8];
    let partial = loop {
        let options = GetOptions::new().with_from_key().with_limit(SCAN_PAGE).with_revision(revision);
        let page = timed(client.get(from.clone(), Some(options))).await?;
        for kv in page.kvs() {
            // What a KeyValue costs in a Range answer: key, value and about 20 bytes of fields.
            let size = (kv.key().len() + kv.value().len() + 20) as u64;
            for prefix in prefixes_of(kv.key()) {
                let entry = sizes.entry(prefix).or_default();
                entry.0 += 1;
                entry.1 += size;
            }
            keys += 1;
            bytes += size;
        }
        match page.kvs().last() {
            Some(last) if page.more() => {
                from = last.key().to_vec();
                from.push(0);
            }
            _ => break false,
        }
        if bytes >= max_bytes {
            break true;
        }
    };
    let mut prefixes: Vec<PrefixSize> =
        sizes.into_iter().map(|(prefix, (keys, bytes))| PrefixSize { prefix, keys, bytes }).collect();
    prefixes.sort_by(|a, b| b.bytes.cmp(&a.bytes).then_with(|| a.prefix.cmp(&b.prefix)));
    Ok(KeyScan { keys, bytes, partial, prefixes })
}

/// The prefixes a key is counted under, as `get --prefix` would answer it: its first path
/// segment and its first two (`/registry/` and `/registry/pods/`, `jobs/`); none for a key
/// without a `/` after its first character.
pub fn prefixes_of(key: &[u8]) -> Vec<String> {
    let text = String::from_utf8_lossy(key);
    let skip = usize::from(text.starts_with('/'));
    text.match_indices('/').skip(skip).take(2).map(|(index, _)| text[..=index].to_owned()).collect()
}

/// Whether auth is on and the configured identity authenticates. Asked without a token: with
/// auth off, etcd refuses an Authenticate with "authentication is not enabled".
async fn probe_auth(access: &ClusterAccess) -> AuthFacts {
    let anonymous = ClusterAccess { credentials: None, ..access.clone() };
    let client = match connect_any(&anonymous).await {
        Ok(client) => client,
        Err(error) => return AuthFacts::Unknown(error),
    };
    let (user, password) = match &access.credentials {
        Some(credentials) => {
            (credentials.user.clone(), String::from_utf8_lossy(credentials.password.expose()).into_owned())
        }
        None => (String::new(), String::new()),
    };
    match timed(client.auth_client().authenticate(user.clone(), password)).await {
        Ok(_) => AuthFacts::Enabled { user: Some(user) },
        Err(error) if error.contains("authentication is not enabled") => AuthFacts::Disabled,
        Err(error) if user.is_empty() => {
            if error.contains("authentication failed") || error.contains("invalid") {
                AuthFacts::Enabled { user: None }
            } else {
                AuthFacts::Unknown(error)
            }
        }
        Err(error) => AuthFacts::Refused { user, error },
    }
}

#[cfg(test)]
mod tests {
    use super::prefixes_of;

    #[test]
    fn a_key_counts_under_its_first_one_and_two_segments() {
        assert_eq!(prefixes_of(b"/registry/pods/a"), ["/registry/", "/registry/pods/"]);
        assert_eq!(prefixes_of(b"/registry/pods/a/b"), ["/registry/", "/registry/pods/"]);
        assert_eq!(prefixes_of(b"jobs/1"), ["jobs/"]);
        assert!(prefixes_of(b"plain").is_empty());
        assert!(prefixes_of(b"/top").is_empty());
    }
}
