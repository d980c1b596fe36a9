//! Do the source and the target hold the same data at a revision?
//!
//! `HashKV` answers cheaply when both clusters compacted at the same revision (the hash covers
//! the history after the compaction). Otherwise, or when the hashes differ, every key is read at
//! the revision from both and compared field by field, so that the answer names the keys.

use etcd_client::{Client, GetOptions, KeyValue, SortOrder, SortTarget};
use serde::Serialize;

use super::MigrateError;

/// Keys read per page in a key-by-key comparison.
const PAGE_KEYS: i64 = 1000;
/// Differences listed in a comparison; the count covers all of them.
const LISTED_DIFFERENCES: usize = 20;

/// The outcome of comparing the source and the target at one revision.
#[derive(Debug, Clone, Serialize)]
pub struct Comparison {
    /// The revision both were read at.
    pub revision: i64,
    /// Whether they hold the same data.
    pub equal: bool,
    /// `hashkv` or `keys`.
    pub method: &'static str,
    /// Keys compared (key-by-key only).
    pub keys_compared: u64,
    /// How many keys differ.
    pub differences: u64,
    /// The first differences, one line each.
    pub first_differences: Vec<String>,
}

/// Compares both clusters at `revision`.
pub async fn at_revision(mut source: Client, mut target: Client, revision: i64) -> Result<Comparison, MigrateError> {
    let source_hash = source
        .hash_kv(revision)
        .await
        .map_err(|e| MigrateError::etcd(format!("HashKV at revision {revision} on the source"), e))?;
    let target_hash = target
        .hash_kv(revision)
        .await
        .map_err(|e| MigrateError::etcd(format!("HashKV at revision {revision} on the target"), e))?;
    if source_hash.compact_version() == target_hash.compact_version() && source_hash.hash() == target_hash.hash() {
        return Ok(Comparison {
            revision,
            equal: true,
            method: "hashkv",
            keys_compared: 0,
            differences: 0,
            first_differences: Vec::new(),
        });
    }
    key_by_key(&mut source, &mut target, revision).await
}

/// Reads every key at `revision` from both, in key order, and lists what differs.
pub async fn key_by_key(source: &mut Client, target: &mut Client, revision: i64) -> Result<Comparison, MigrateError> {
    let mut comparison = Comparison {
        revision,
        equal: true,
        method: "keys",
        keys_compared: 0,
        differences: 0,
        first_differences: Vec::new(),
    };
    let mut from = vec![0u8];
    loop {
        let left = page(source, &from, revision, "the source").await?;
        let right = page(target, &from, revision, "the target").await?;
        // Compare the union of both pages' keys up to the smaller last key, so that a key
        // missing on one side shows up without the pages drifting apart.
        let bound = match (left.last(), right.last()) {
            (Some(a), Some(b)) => Some(a.key().min(b.key()).to_vec()),
            (Some(a), None) => Some(a.key().to_vec()),
            (None, Some(b)) => Some(b.key().to_vec()),
            (None, None) => None,
        };
        let Some(bound) = bound else { break };
        let full = left.len() as i64 == PAGE_KEYS || right.len() as i64 == PAGE_KEYS;
        let within = |kv: &&KeyValue| !full || kv.key() <= bound.as_slice();
        let mut left = left.iter().filter(within).peekable();
        let mut right = right.iter().filter(within).peekable();
        loop {
            let difference = match (left.peek(), right.peek()) {
                (None, None) => break,
                (Some(a), Some(b)) if a.key() == b.key() => {
                    let line = describe(a, b);
                    left.next();
                    right.next();
                    line
                }
                (Some(a), Some(b)) if a.key() < b.key() => {
                    let line = Some(format!("{}: only on the source", printable(a.key())));
                    left.next();
                    line
                }
                (Some(_), Some(b)) | (None, Some(b)) => {
                    let line = Some(format!("{}: only on the target", printable(b.key())));
                    right.next();
                    line
                }
                (Some(a), None) => {
                    let line = Some(format!("{}: only on the source", printable(a.key())));
                    left.next();
                    line
                }
            };
            comparison.keys_compared += 1;
            if let Some(line) = difference {
                comparison.equal = false;
                comparison.differences += 1;
                if comparison.first_differences.len() < LISTED_DIFFERENCES {
                    comparison.first_differences.push(line);
                }
            }
        }
        if !full {
            break;
        }
        from = bound;
        from.push(0);
    }
    Ok(comparison)
}

async fn page(client: &mut Client, from: &[u8], revision: i64, side: &str) -> Result<Vec<KeyValue>, MigrateError> {
    let options = GetOptions::new()
        .with_from_key()
        .with_revision(revision)
        .with_limit(PAGE_KEYS)
        .with_sort(SortTarget::Key, SortOrder::Ascend);
    let mut answer = client
        .get(from.to_vec(), Some(options))
        .await
        .map_err(|e| MigrateError::etcd(format!("reading {side}'s keys at revision {revision}"), e))?;
    Ok(answer.take_kvs())
}

/// What differs between the same key on both sides, if anything.
fn describe(source: &KeyValue, target: &KeyValue) -> Option<String> {
    let mut fields = Vec::new();
    if source.value() != target.value() {
        fields.push("value".to_owned());
    }
    for (name, a, b) in [
        ("create_revision", source.create_revision(), target.create_revision()),
        ("mod_revision", source.mod_revision(), target.mod_revision()),
        ("version", source.version(), target.version()),
        ("lease", source.lease(), target.lease()),
    ] {
        if a != b {
            fields.push(format!("{name} {a} on the source, {b} on the target"));
        }
    }
    (!fields.is_empty()).then(|| format!("{}: {}", printable(source.key()), fields.join("; ")))
}

/// A key for a message: as text when it is, escaped otherwise.
pub fn printable(key: &[u8]) -> String {
    key.escape_ascii().to_string()
}
