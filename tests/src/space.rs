//! Running a cluster out of space: a small backend quota and a fill that stops at etcd's NOSPACE,
//! for tests of what clients, logs and repairs see then.

use anyhow::{bail, Context};
use etcd_client::{Client, PutOptions};

/// etcd's answer to every write once its database reached the quota (code `ResourceExhausted`).
pub const NOSPACE_MESSAGE: &str = "etcdserver: mvcc: database space exceeded";

/// A quota small enough to fill in a few seconds, large enough for a member to start and serve.
pub const SMALL_QUOTA_BYTES: u64 = 16 << 20;

/// Size of each value the fill writes: well under etcd's default 1.5 MiB request limit.
pub const FILL_VALUE_BYTES: usize = 512 << 10;

/// The member flag that sets the backend quota to `bytes` (for [`crate::ClusterSpec::with_extra_args`]).
pub fn quota_arg(bytes: u64) -> String {
    format!("--quota-backend-bytes={bytes}")
}

/// What [`fill_until_nospace`] wrote before etcd refused a write for lack of space.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Filled {
    /// Values etcd accepted.
    pub values: usize,
    /// Their total size in bytes (values only, keys not counted).
    pub bytes: u64,
}

/// Writes [`FILL_VALUE_BYTES`] values under `prefix` through `client` until etcd refuses one with
/// [`NOSPACE_MESSAGE`] (which raises the cluster's NOSPACE alarm); errors if any other failure
/// comes first or if `max_bytes` were written without reaching the quota.
pub async fn fill_until_nospace(client: &mut Client, prefix: &str, max_bytes: u64) -> anyhow::Result<Filled> {
    fill_history_until_nospace(client, prefix, usize::MAX, max_bytes).await
}

/// Like [`fill_until_nospace`], overwriting the same `keys` keys in turn, so that what fills the
/// database is history (old revisions), as in a cluster that never compacts: compaction and
/// defragmentation give the space back.
pub async fn fill_history_until_nospace(
    client: &mut Client,
    prefix: &str,
    keys: usize,
    max_bytes: u64,
) -> anyhow::Result<Filled> {
    let value = vec![b'x'; FILL_VALUE_BYTES];
    let mut filled = Filled { values: 0, bytes: 0 };
    while filled.bytes < max_bytes {
        let key = format!("{prefix}{:06}", filled.values % keys.max(1));
        match client.put(key.as_str(), value.clone(), None::<PutOptions>).await {
            Ok(_) => {
                filled.values += 1;
                filled.bytes += FILL_VALUE_BYTES as u64;
            }
            Err(etcd_client::Error::GRpcStatus(status)) if status.message() == NOSPACE_MESSAGE => return Ok(filled),
            Err(error) => {
                return Err(error).with_context(|| format!("put {key} after {} values", filled.values));
            }
        }
    }
    bail!("{} bytes written under {prefix} and etcd still accepts writes: is the quota set?", filled.bytes)
}
