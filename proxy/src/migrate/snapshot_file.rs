//! Reads an etcd snapshot file and reports what `migrate snapshot` prints about it: the revision
//! a cluster restored from it starts at, its compaction, its entry count, and whether its bytes
//! are whole, so that an operator never seeds a new cluster from a damaged or incomplete file.
//!
//! A snapshot is etcd's bbolt database as the `Maintenance/Snapshot` RPC streams it, followed by
//! the SHA-256 of everything before it (a copy of a member's `db` file has none). etcd tells the
//! two apart by size alone, as here: a database is whole pages, so only a hashed file is 32 bytes
//! past a multiple of 512 (`hasChecksum` in etcdutl). The database is read without a bbolt
//! library: the meta page bbolt would open it with, then the tree of buckets from its root, entry
//! by entry as `etcdutl snapshot status` walks them. The file may be damaged or not a snapshot at
//! all, so every offset is checked, a page may be referred to once only (which also ends any
//! cycle), trees are at most [`MAX_DEPTH`] levels deep, and, as bbolt's own check does, a
//! database that keeps a freelist must account for every page. Pages are read one at a time:
//! snapshots reach GiBs, and only a few pages are needed at once.

use std::borrow::Cow;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use ring::digest::{self, SHA256};

/// Facts read from an etcd snapshot file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SnapshotFacts {
    /// The store's revision when the snapshot was taken, which a cluster restored from it starts
    /// at: the newest revision among its keys, or the compaction's revision when that is later
    /// (compacting at a delete's revision removes that tombstone, the newest key, with the rest).
    /// `etcdutl snapshot status` reports the newest key's revision alone, lower in that case.
    pub revision: i64,
    /// The revision of the last finished compaction (`finishedCompactRev`); 0 if none.
    pub compact_revision: i64,
    /// The entries of all etcd's buckets, as `etcdutl snapshot status` (3.5) counts `totalKey`:
    /// every revision of every key (tombstones too), leases, members, users, roles, etcd's meta.
    pub total_keys: u64,
    /// The database's size, as `etcdutl snapshot status` reports `totalSize`: bbolt's pages in
    /// use (its high-water mark) times its page size. The file's hash, if any, comes after.
    pub size_bytes: u64,
    /// Whether the file ends in the SHA-256 the Snapshot RPC appends; it was checked if so.
    pub has_integrity_hash: bool,
}

/// Why a file is not a usable etcd snapshot.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotFileError {
    /// The file cannot be opened or read.
    #[error("cannot read {}: {source}; check the path, and that this user may read the file", path.display())]
    Read { path: PathBuf, source: std::io::Error },
    /// The SHA-256 at the file's end is not that of the bytes before it.
    #[error(
        "{file}: the SHA-256 at its end does not match its content; the file is damaged or incomplete: take the \
         snapshot again"
    )]
    HashMismatch { file: String },
    /// The file stops short of the database its meta page describes, or in the middle of a page.
    #[error("{file}: the snapshot is incomplete: {why}; take the snapshot again")]
    Incomplete { file: String, why: String },
    /// Not a bbolt database, or one without etcd's buckets.
    #[error(
        "{file}: not an etcd snapshot: {why}; give a file that `etcdctl snapshot save` or `etcd-compat-proxy migrate \
         snapshot` wrote (if it is one, it is damaged: take the snapshot again)"
    )]
    NotASnapshot { file: String, why: String },
    /// A bbolt database whose pages contradict each other.
    #[error("{file}: not a valid etcd snapshot: {why}; the file is damaged: take the snapshot again")]
    Damaged { file: String, why: String },
}

/// Reads `path` and returns its facts; checks the trailing SHA-256 when there is one.
pub fn read_snapshot_facts(path: &Path) -> Result<SnapshotFacts, SnapshotFileError> {
    let cannot_read = |source| SnapshotFileError::Read { path: path.to_path_buf(), source };
    let file = File::open(path).map_err(cannot_read)?;
    let len = file.metadata().map_err(cannot_read)?.len();
    let (db_len, has_integrity_hash) = split_hash(len);
    if has_integrity_hash && !file_hash_matches(&file, db_len).map_err(cannot_read)? {
        return Err(Problem::HashMismatch.in_file(Some(path)));
    }
    facts(Source::File(&file), db_len, has_integrity_hash).map_err(|problem| problem.in_file(Some(path)))
}

/// Reads the facts of a snapshot held in memory, as [`read_snapshot_facts`] reads a file's.
// The proxy reads snapshots from files, page by page; this one serves the tests and any caller
// that already holds the bytes.
#[cfg_attr(not(test), allow(dead_code))]
pub fn snapshot_facts(bytes: &[u8]) -> Result<SnapshotFacts, SnapshotFileError> {
    let (db_len, has_integrity_hash) = split_hash(bytes.len() as u64);
    let (db, hash) = bytes.split_at(bytes.len() - if has_integrity_hash { HASH_LEN } else { 0 });
    if has_integrity_hash && digest::digest(&SHA256, db).as_ref() != hash {
        return Err(Problem::HashMismatch.in_file(None));
    }
    facts(Source::Memory(db), db_len, has_integrity_hash).map_err(|problem| problem.in_file(None))
}

/// The length of the SHA-256 the Snapshot RPC appends.
const HASH_LEN: usize = 32;
/// A database is whole pages, and pages are multiples of 512 bytes: a file 32 bytes past a
/// multiple of this carries a hash (etcdutl's `hasChecksum`).
const HASH_ALIGNMENT: u64 = 512;

// bbolt's layout, from its page.go, db.go and bucket.go; every integer is little-endian.
const PAGE_HEADER_LEN: usize = 16;
/// Branch and leaf elements have the same size: (pos, key size, child page) or (flags, pos, key
/// size, value size).
const ELEMENT_LEN: usize = 16;
const META_LEN: usize = 64;
/// The checksum covers the meta's fields before it.
const META_CHECKSUM_AT: usize = 56;
const MAGIC: u32 = 0xED0C_DAED;
const VERSION: u32 = 2;
const BRANCH_PAGE: u16 = 0x01;
const LEAF_PAGE: u16 = 0x02;
const FREELIST_PAGE: u16 = 0x10;
/// A leaf entry with this flag is a sub-bucket: its value is a bucket header.
const BUCKET_ENTRY: u32 = 0x01;
/// A bucket header is its root page and sequence; root page 0 means an inline page follows.
const BUCKET_HEADER_LEN: usize = 16;
/// The freelist page of a database that does not keep one (etcd's on Linux).
const NO_FREELIST: u64 = u64::MAX;
/// A page header's element count at this value means the real count is the first element.
const COUNT_OVERFLOWED: u16 = u16::MAX;
// The page sizes at which bbolt looks for the second meta page when the first is damaged.
const MIN_PAGE_SIZE: u64 = 1024;
const MAX_PAGE_SIZE: u64 = 1024 << 14;
/// bbolt's trees stay a few levels deep (a branch holds at least two children); deeper means a
/// damaged file, and the walk must not exhaust the stack.
const MAX_DEPTH: usize = 64;

// etcd's layout, from its mvcc package.
const KEY_BUCKET: &[u8] = b"key";
const META_BUCKET: &[u8] = b"meta";
const SCHEDULED_COMPACT: &[u8] = b"scheduledCompactRev";
const FINISHED_COMPACT: &[u8] = b"finishedCompactRev";
/// A revision: main revision, '_', sub revision, each 8 bytes big-endian.
const REVISION_LEN: usize = 17;
/// The mark after a revision that deleted its key.
const TOMBSTONE: u8 = b't';

/// What is wrong, before it is known which file it is in.
enum Problem {
    Io(std::io::Error),
    HashMismatch,
    Incomplete(String),
    NotASnapshot(String),
    Damaged(String),
}

impl Problem {
    fn in_file(self, path: Option<&Path>) -> SnapshotFileError {
        let file = path.map_or_else(|| "the snapshot".to_owned(), |path| path.display().to_string());
        match self {
            Problem::Io(source) => {
                SnapshotFileError::Read { path: path.map_or_else(|| PathBuf::from(&file), Path::to_path_buf), source }
            }
            Problem::HashMismatch => SnapshotFileError::HashMismatch { file },
            Problem::Incomplete(why) => SnapshotFileError::Incomplete { file, why },
            Problem::NotASnapshot(why) => SnapshotFileError::NotASnapshot { file, why },
            Problem::Damaged(why) => SnapshotFileError::Damaged { file, why },
        }
    }
}

fn damaged(why: impl Into<String>) -> Problem {
    Problem::Damaged(why.into())
}

/// The database's length in a file of `len` bytes, and whether a hash follows it.
fn split_hash(len: u64) -> (u64, bool) {
    match len % HASH_ALIGNMENT == HASH_LEN as u64 {
        true => (len - HASH_LEN as u64, true),
        false => (len, false),
    }
}

/// Whether the SHA-256 after the first `db_len` bytes of `file` is theirs.
fn file_hash_matches(file: &File, db_len: u64) -> std::io::Result<bool> {
    let mut context = digest::Context::new(&SHA256);
    let mut buffer = vec![0; 1 << 20];
    let mut offset = 0;
    while offset < db_len {
        let chunk = &mut buffer[..usize::try_from(db_len - offset).map_or(1 << 20, |left| left.min(1 << 20))];
        file.read_exact_at(chunk, offset)?;
        context.update(chunk);
        offset += chunk.len() as u64;
    }
    let mut stored = [0; HASH_LEN];
    file.read_exact_at(&mut stored, db_len)?;
    Ok(context.finish().as_ref() == stored)
}

/// Reads the facts of the database in the first `db_len` bytes of `source`.
fn facts(source: Source<'_>, db_len: u64, has_integrity_hash: bool) -> Result<SnapshotFacts, Problem> {
    let meta = current_meta(source, db_len)?;
    let size_bytes = meta
        .high_water
        .checked_mul(meta.page_size)
        .ok_or_else(|| damaged(format!("its meta page counts {} pages, more than any file holds", meta.high_water)))?;
    if size_bytes > db_len {
        return Err(Problem::Incomplete(format!("its database is {size_bytes} bytes, and the file holds {db_len}")));
    }
    let into_last_page = db_len % meta.page_size;
    if into_last_page > 0 {
        return Err(Problem::Incomplete(format!(
            "it ends {into_last_page} bytes into a {}-byte page: a SHA-256 cut short, or bytes added after the database",
            meta.page_size
        )));
    }
    let mut walker = Walker::new(source, &meta);
    walker.load_freelist(meta.freelist)?;

    let mut buckets = Vec::new();
    walker.walk_bucket(&Root::Paged(meta.root), 0, &mut |entry| {
        // etcdutl takes every top-level entry for a bucket, and a bbolt root holds nothing else.
        if !entry.is_bucket {
            return Err(damaged(format!("its top level holds {}, which is not a bucket", shown(entry.key))));
        }
        buckets.push((entry.key.to_vec(), bucket_root(entry.value)?));
        Ok(())
    })?;
    for name in [KEY_BUCKET, META_BUCKET] {
        if !buckets.iter().any(|(bucket, _)| bucket == name) {
            return Err(Problem::NotASnapshot(format!(
                "it is a bbolt database without etcd's `{}` bucket",
                String::from_utf8_lossy(name)
            )));
        }
    }

    let (mut newest_key, mut scheduled_compact, mut finished_compact, mut total_keys) = (0, 0, 0, 0);
    for (name, root) in &buckets {
        let mut nested = Vec::new();
        walker.walk_bucket(root, 1, &mut |entry| {
            total_keys += 1;
            if entry.is_bucket {
                nested.push(bucket_root(entry.value)?);
            }
            match name.as_slice() {
                KEY_BUCKET => {
                    let revision = main_revision(entry.key, true).ok_or_else(|| {
                        damaged(format!("bucket `key` holds {}, which is not a revision", shown(entry.key)))
                    })?;
                    newest_key = newest_key.max(revision);
                }
                META_BUCKET if entry.key == SCHEDULED_COMPACT => scheduled_compact = compaction(&entry)?,
                META_BUCKET if entry.key == FINISHED_COMPACT => finished_compact = compaction(&entry)?,
                _ => {}
            }
            Ok(())
        })?;
        // etcd makes no buckets in its buckets; bbolt's check would still walk them.
        for root in &nested {
            walker.walk_nested(root, 2)?;
        }
    }
    walker.check_every_page_accounted()?;

    Ok(SnapshotFacts {
        // A compaction is only ever scheduled at or below the store's revision, and finished
        // after it is scheduled, so neither can exceed the revision the snapshot was taken at.
        revision: newest_key.max(scheduled_compact).max(finished_compact),
        compact_revision: finished_compact,
        total_keys,
        size_bytes,
        has_integrity_hash,
    })
}

/// The revision a compaction entry of bucket `meta` holds.
fn compaction(entry: &Entry<'_>) -> Result<i64, Problem> {
    main_revision(entry.value, false).ok_or_else(|| {
        damaged(format!("bucket `meta` holds {} = {}, which is not a revision", shown(entry.key), shown(entry.value)))
    })
}

/// The main revision in etcd's revision bytes, which a `t` follows when the revision deleted its
/// key (if `tombstone_allowed`).
fn main_revision(bytes: &[u8], tombstone_allowed: bool) -> Option<i64> {
    let revision = match bytes.split_at_checked(REVISION_LEN)? {
        (revision, []) => revision,
        (revision, [TOMBSTONE]) if tombstone_allowed => revision,
        _ => return None,
    };
    if revision[8] != b'_' {
        return None;
    }
    let main = be_i64(revision, 0)?;
    be_i64(revision, 9).map(|_sub| main)
}

/// Where the database's bytes are: in memory, or in a file read a page at a time.
#[derive(Clone, Copy)]
enum Source<'a> {
    Memory(&'a [u8]),
    File(&'a File),
}

impl<'a> Source<'a> {
    /// `len` bytes at `offset`, which the caller has checked lie in the database.
    fn read(self, offset: u64, len: u64) -> Result<Cow<'a, [u8]>, Problem> {
        let outside = || damaged(format!("{len} bytes at offset {offset} lie outside the database"));
        let len = usize::try_from(len).map_err(|_| outside())?;
        match self {
            Source::Memory(bytes) => usize::try_from(offset)
                .ok()
                .and_then(|start| bytes.get(start..start.checked_add(len)?))
                .map(Cow::Borrowed)
                .ok_or_else(outside),
            Source::File(file) => {
                let mut buffer = vec![0; len];
                file.read_exact_at(&mut buffer, offset).map_err(Problem::Io)?;
                Ok(Cow::Owned(buffer))
            }
        }
    }
}

/// The fields of a bbolt meta page that locate everything else.
struct Meta {
    page_size: u64,
    root: u64,
    freelist: u64,
    /// The number of pages in use: the database is this many pages long.
    high_water: u64,
    txid: u64,
}

/// The meta page bbolt would open the database with: of the two, the valid one of the latest
/// transaction, as a crash while one is written leaves the other.
fn current_meta(source: Source<'_>, db_len: u64) -> Result<Meta, Problem> {
    let meta_at = |offset: u64| -> Result<Option<Meta>, Problem> {
        match offset.checked_add((PAGE_HEADER_LEN + META_LEN) as u64) {
            Some(end) if end <= db_len => Ok(parse_meta(&source.read(offset, (PAGE_HEADER_LEN + META_LEN) as u64)?)),
            _ => Ok(None),
        }
    };
    if db_len < (PAGE_HEADER_LEN + META_LEN) as u64 {
        return Err(Problem::NotASnapshot(format!("it is {db_len} bytes long, too short for a bbolt database")));
    }
    let no_meta = || Problem::NotASnapshot("neither of its two bbolt meta pages is valid".to_owned());
    // The first meta page gives the page size; if it is damaged, bbolt looks for the second at
    // each page size it allows.
    let first = meta_at(0)?;
    let page_size = match &first {
        Some(meta) => meta.page_size,
        None => {
            let mut found = None;
            for page_size in (0..=14).map(|shift| MIN_PAGE_SIZE << shift) {
                if meta_at(page_size)?.is_some_and(|meta| meta.page_size == page_size) {
                    found = Some(page_size);
                    break;
                }
            }
            found.ok_or_else(no_meta)?
        }
    };
    if !(MIN_PAGE_SIZE..=MAX_PAGE_SIZE).contains(&page_size) {
        return Err(Problem::NotASnapshot(format!("its page size, {page_size} bytes, is not one bbolt uses")));
    }
    let second = meta_at(page_size)?.filter(|meta| meta.page_size == page_size);
    match (first, second) {
        (Some(first), Some(second)) => Ok(if second.txid > first.txid { second } else { first }),
        (Some(meta), None) | (None, Some(meta)) => Ok(meta),
        (None, None) => Err(no_meta()),
    }
}

/// The meta in a meta page, if bbolt would take it: magic, version and checksum.
fn parse_meta(page: &[u8]) -> Option<Meta> {
    let fields = page.get(PAGE_HEADER_LEN..PAGE_HEADER_LEN + META_LEN)?;
    let valid = le_u32(fields, 0)? == MAGIC
        && le_u32(fields, 4)? == VERSION
        && le_u64(fields, META_CHECKSUM_AT)? == fnv1a64(fields.get(..META_CHECKSUM_AT)?);
    valid.then_some(Meta {
        page_size: u64::from(le_u32(fields, 8)?),
        root: le_u64(fields, 16)?,
        freelist: le_u64(fields, 32)?,
        high_water: le_u64(fields, 40)?,
        txid: le_u64(fields, 48)?,
    })
}

/// FNV-1a, 64 bits: bbolt's meta checksum.
fn fnv1a64(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, byte| (hash ^ u64::from(*byte)).wrapping_mul(0x0000_0100_0000_01b3))
}

/// A page's header.
struct Header {
    id: u64,
    flags: u16,
    count: u16,
    overflow: u32,
}

impl Header {
    fn parse(page: &[u8]) -> Option<Header> {
        Some(Header {
            id: le_u64(page, 0)?,
            flags: le_u16(page, 8)?,
            count: le_u16(page, 10)?,
            overflow: le_u32(page, 12)?,
        })
    }
}

/// Where a bucket's entries are: a tree of pages, or one leaf page inside its parent's entry.
enum Root {
    Paged(u64),
    Inline(Vec<u8>),
}

/// The root of the sub-bucket whose header is `value`.
fn bucket_root(value: &[u8]) -> Result<Root, Problem> {
    let cut_short = || damaged("a bucket's header is cut short");
    let (header, inline) = value.split_at_checked(BUCKET_HEADER_LEN).ok_or_else(cut_short)?;
    match le_u64(header, 0).ok_or_else(cut_short)? {
        0 if inline.len() >= PAGE_HEADER_LEN => Ok(Root::Inline(inline.to_vec())),
        0 => Err(cut_short()),
        page => Ok(Root::Paged(page)),
    }
}

/// One entry of a leaf page.
struct Entry<'p> {
    is_bucket: bool,
    key: &'p [u8],
    value: &'p [u8],
}

type Visit<'v> = dyn FnMut(Entry<'_>) -> Result<(), Problem> + 'v;

/// Reads the database's trees page by page, remembering which pages it has met.
struct Walker<'a> {
    source: Source<'a>,
    page_size: u64,
    high_water: u64,
    /// Pages in use so far: one referred to twice is shared by two trees, or in a cycle.
    reached: PageSet,
    /// The pages the freelist lists, when the database keeps one (etcd's on Linux do not).
    freed: Option<PageSet>,
}

impl<'a> Walker<'a> {
    fn new(source: Source<'a>, meta: &Meta) -> Walker<'a> {
        let mut reached = PageSet::new(meta.high_water);
        // The meta pages.
        reached.insert(0);
        reached.insert(1);
        Walker { source, page_size: meta.page_size, high_water: meta.high_water, reached, freed: None }
    }

    /// Page `id` with its overflow pages, after checking that nothing else referred to them.
    fn page(&mut self, id: u64) -> Result<(Cow<'a, [u8]>, Header), Problem> {
        if id < 2 || id >= self.high_water {
            return Err(damaged(format!("a page refers to page {id}, not one of its {} data pages", self.high_water)));
        }
        let offset = id.saturating_mul(self.page_size);
        let first = self.source.read(offset, self.page_size)?;
        let header = Header::parse(&first).ok_or_else(|| damaged(format!("page {id} is cut short")))?;
        if header.id != id {
            return Err(damaged(format!("page {id} is marked as page {}", header.id)));
        }
        let last = id
            .checked_add(u64::from(header.overflow))
            .filter(|last| *last < self.high_water)
            .ok_or_else(|| damaged(format!("page {id} runs past the end of the database")))?;
        for page in id..=last {
            if !self.reached.insert(page) {
                return Err(damaged(format!("page {page} is referred to twice")));
            }
            if self.freed.as_ref().is_some_and(|freed| freed.contains(page)) {
                return Err(damaged(format!("page {page} is in use, and listed as free")));
            }
        }
        let page = match header.overflow {
            0 => first,
            _ => self.source.read(offset, (last - id + 1).saturating_mul(self.page_size))?,
        };
        Ok((page, header))
    }

    /// Reads the freelist page, if the database keeps one.
    fn load_freelist(&mut self, id: u64) -> Result<(), Problem> {
        if id == NO_FREELIST {
            return Ok(());
        }
        let (page, header) = self.page(id)?;
        if header.flags & FREELIST_PAGE == 0 {
            return Err(damaged(format!("page {id}, its freelist, is not a freelist page")));
        }
        let runs_past = || damaged(format!("the freelist on page {id} runs past its page"));
        let (start, count) = match header.count {
            COUNT_OVERFLOWED => (PAGE_HEADER_LEN + 8, le_u64(&page, PAGE_HEADER_LEN).ok_or_else(runs_past)?),
            count => (PAGE_HEADER_LEN, u64::from(count)),
        };
        let list = usize::try_from(count)
            .ok()
            .and_then(|count| page.get(start..count.checked_mul(8)?.checked_add(start)?))
            .ok_or_else(runs_past)?;
        let mut freed = PageSet::new(self.high_water);
        for free in list.chunks_exact(8).filter_map(|id| le_u64(id, 0)) {
            // bbolt ignores what the list holds past the high-water mark; nothing refers to it.
            if free < 2 {
                return Err(damaged(format!("the freelist lists page {free}, a meta page")));
            }
            if free < self.high_water && !freed.insert(free) {
                return Err(damaged(format!("the freelist lists page {free} twice")));
            }
        }
        self.freed = Some(freed);
        Ok(())
    }

    /// Calls `visit` for each entry of the bucket at `root`, in order, checking that the keys
    /// ascend as bbolt keeps them.
    fn walk_bucket(&mut self, root: &Root, depth: usize, visit: &mut Visit<'_>) -> Result<(), Problem> {
        let mut last = Vec::new();
        let mut in_order = |entry: Entry<'_>| {
            // bbolt refuses empty keys, so the empty `last` is below every valid first key.
            if entry.key <= last.as_slice() {
                return Err(damaged(format!("the keys of a bucket are out of order at {}", shown(entry.key))));
            }
            last.clear();
            last.extend_from_slice(entry.key);
            visit(entry)
        };
        match root {
            Root::Paged(id) => self.walk_page(*id, depth, &mut in_order),
            Root::Inline(page) => match Header::parse(page) {
                Some(header) if header.flags & LEAF_PAGE != 0 => leaf_entries(page, header.count, None, &mut in_order),
                _ => Err(damaged("an inline bucket is not a leaf page")),
            },
        }
    }

    fn walk_page(&mut self, id: u64, depth: usize, visit: &mut Visit<'_>) -> Result<(), Problem> {
        if depth > MAX_DEPTH {
            return Err(damaged(format!("its trees are deeper than {MAX_DEPTH} levels at page {id}")));
        }
        let (page, header) = self.page(id)?;
        if header.flags & LEAF_PAGE != 0 {
            return leaf_entries(&page, header.count, Some(id), visit);
        }
        if header.flags & BRANCH_PAGE == 0 {
            return Err(damaged(format!("page {id} is in a tree, but neither a branch nor a leaf page")));
        }
        if header.count == 0 {
            return Err(damaged(format!("branch page {id} is empty")));
        }
        for index in 0..usize::from(header.count) {
            let child = branch_child(&page, index)
                .ok_or_else(|| damaged(format!("element {index} of page {id} lies outside the page")))?;
            self.walk_page(child, depth + 1, visit)?;
        }
        Ok(())
    }

    /// Walks a bucket inside one of etcd's for its pages alone.
    fn walk_nested(&mut self, root: &Root, depth: usize) -> Result<(), Problem> {
        if depth > MAX_DEPTH {
            return Err(damaged(format!("its buckets nest deeper than {MAX_DEPTH} levels")));
        }
        let mut nested = Vec::new();
        self.walk_bucket(root, depth, &mut |entry| {
            if entry.is_bucket {
                nested.push(bucket_root(entry.value)?);
            }
            Ok(())
        })?;
        for root in &nested {
            self.walk_nested(root, depth + 1)?;
        }
        Ok(())
    }

    /// With a freelist, every page below the high-water mark is in use or free (bbolt's check).
    fn check_every_page_accounted(&self) -> Result<(), Problem> {
        let Some(freed) = &self.freed else { return Ok(()) };
        match (0..self.high_water).find(|page| !self.reached.contains(*page) && !freed.contains(*page)) {
            Some(page) => Err(damaged(format!("page {page} is neither in use nor free"))),
            None => Ok(()),
        }
    }
}

/// Calls `visit` for each entry of a leaf page: a page of the file (`id`), or an inline bucket's.
fn leaf_entries(page: &[u8], count: u16, id: Option<u64>, visit: &mut Visit<'_>) -> Result<(), Problem> {
    for index in 0..usize::from(count) {
        let entry = leaf_entry(page, index).ok_or_else(|| {
            let page = id.map_or_else(|| "an inline bucket".to_owned(), |id| format!("page {id}"));
            damaged(format!("entry {index} of {page} lies outside it"))
        })?;
        visit(entry)?;
    }
    Ok(())
}

/// Entry `index` of a leaf page: its key and value start `pos` bytes after its element.
fn leaf_entry(page: &[u8], index: usize) -> Option<Entry<'_>> {
    let at = index.checked_mul(ELEMENT_LEN)?.checked_add(PAGE_HEADER_LEN)?;
    let key_start = at.checked_add(le_len(page, at + 4)?)?;
    let key_end = key_start.checked_add(le_len(page, at + 8)?)?;
    let value_end = key_end.checked_add(le_len(page, at + 12)?)?;
    Some(Entry {
        is_bucket: le_u32(page, at)? & BUCKET_ENTRY != 0,
        key: page.get(key_start..key_end)?,
        value: page.get(key_end..value_end)?,
    })
}

/// The child page of element `index` of a branch page, whose key must lie in the page too.
fn branch_child(page: &[u8], index: usize) -> Option<u64> {
    let at = index.checked_mul(ELEMENT_LEN)?.checked_add(PAGE_HEADER_LEN)?;
    let key_start = at.checked_add(le_len(page, at)?)?;
    page.get(key_start..key_start.checked_add(le_len(page, at + 4)?)?)?;
    le_u64(page, at + 8)
}

/// A set of pages below the high-water mark, a bit each.
struct PageSet(Vec<u64>);

impl PageSet {
    fn new(pages: u64) -> PageSet {
        // The high-water mark is at most the file's length over the page size, so this fits.
        PageSet(vec![0; usize::try_from(pages.div_ceil(64)).unwrap_or(0)])
    }

    fn contains(&self, page: u64) -> bool {
        let (word, bit) = Self::locate(page);
        word.and_then(|word| self.0.get(word)).is_some_and(|bits| bits & bit != 0)
    }

    /// Adds `page`; false if it was there already (or is past the set's end, which callers
    /// rule out).
    fn insert(&mut self, page: u64) -> bool {
        let (word, bit) = Self::locate(page);
        match word.and_then(|word| self.0.get_mut(word)) {
            Some(bits) if *bits & bit == 0 => {
                *bits |= bit;
                true
            }
            _ => false,
        }
    }

    fn locate(page: u64) -> (Option<usize>, u64) {
        (usize::try_from(page / 64).ok(), 1 << (page % 64))
    }
}

/// A key or value for a message: printable, and cut short when long.
fn shown(bytes: &[u8]) -> String {
    const SHOWN: usize = 40;
    let cut = if bytes.len() > SHOWN { "..." } else { "" };
    format!("\"{}{cut}\"", bytes.get(..SHOWN).unwrap_or(bytes).escape_ascii())
}

fn le_u16(bytes: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_le_bytes(bytes.get(at..at.checked_add(2)?)?.try_into().ok()?))
}

fn le_u32(bytes: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(bytes.get(at..at.checked_add(4)?)?.try_into().ok()?))
}

fn le_u64(bytes: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(bytes.get(at..at.checked_add(8)?)?.try_into().ok()?))
}

/// A little-endian u32 used as an offset or length.
fn le_len(bytes: &[u8], at: usize) -> Option<usize> {
    usize::try_from(le_u32(bytes, at)?).ok()
}

/// A big-endian revision number, which etcd keeps non-negative.
fn be_i64(bytes: &[u8], at: usize) -> Option<i64> {
    i64::try_from(u64::from_be_bytes(bytes.get(at..at.checked_add(8)?)?.try_into().ok()?)).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const PAGE: usize = 4096;
    const META_PAGE: u16 = 0x04;

    /// A bbolt database laid out page by page as bbolt writes one: two meta pages, then data.
    struct Image {
        pages: Vec<Vec<u8>>,
        freelist: u64,
    }

    impl Image {
        fn new() -> Image {
            Image { pages: vec![vec![0; PAGE]; 2], freelist: NO_FREELIST }
        }

        /// Adds a page holding `content` (header included), with overflow pages if it needs
        /// them, and returns its id.
        fn add(&mut self, mut content: Vec<u8>) -> u64 {
            let id = self.pages.len() as u64;
            let overflow = content.len().div_ceil(PAGE).max(1) - 1;
            content.resize((overflow + 1) * PAGE, 0);
            content[0..8].copy_from_slice(&id.to_le_bytes());
            content[12..16].copy_from_slice(&(overflow as u32).to_le_bytes());
            self.pages.extend(content.chunks(PAGE).map(<[u8]>::to_vec));
            id
        }

        fn leaf(&mut self, entries: &[(u32, &[u8], &[u8])]) -> u64 {
            self.add(leaf_page(entries))
        }

        fn branch(&mut self, children: &[(&[u8], u64)]) -> u64 {
            let mut page = header(BRANCH_PAGE, children.len());
            let mut data = Vec::new();
            for (index, (key, child)) in children.iter().enumerate() {
                let pos = ELEMENT_LEN * (children.len() - index) + data.len();
                page.extend_from_slice(&(pos as u32).to_le_bytes());
                page.extend_from_slice(&(key.len() as u32).to_le_bytes());
                page.extend_from_slice(&child.to_le_bytes());
                data.extend_from_slice(key);
            }
            page.extend_from_slice(&data);
            self.add(page)
        }

        fn set_freelist(&mut self, free: &[u64]) {
            let mut page = header(FREELIST_PAGE, free.len());
            free.iter().for_each(|id| page.extend_from_slice(&id.to_le_bytes()));
            self.freelist = self.add(page);
        }

        /// The file, whose meta pages hold `(root, txid)` each.
        fn bytes_with_metas(&self, metas: [(u64, u64); 2]) -> Vec<u8> {
            let mut pages = self.pages.clone();
            for (id, (root, txid)) in metas.into_iter().enumerate() {
                let mut page = header(META_PAGE, 0);
                page[0..8].copy_from_slice(&(id as u64).to_le_bytes());
                let mut meta = Vec::new();
                meta.extend_from_slice(&MAGIC.to_le_bytes());
                meta.extend_from_slice(&VERSION.to_le_bytes());
                meta.extend_from_slice(&(PAGE as u32).to_le_bytes());
                meta.extend_from_slice(&0u32.to_le_bytes());
                meta.extend_from_slice(&root.to_le_bytes());
                meta.extend_from_slice(&0u64.to_le_bytes());
                meta.extend_from_slice(&self.freelist.to_le_bytes());
                meta.extend_from_slice(&(self.pages.len() as u64).to_le_bytes());
                meta.extend_from_slice(&txid.to_le_bytes());
                meta.extend_from_slice(&fnv1a64(&meta).to_le_bytes());
                page.extend_from_slice(&meta);
                page.resize(PAGE, 0);
                pages[id] = page;
            }
            pages.concat()
        }

        fn bytes(&self, root: u64) -> Vec<u8> {
            self.bytes_with_metas([(root, 7), (root, 6)])
        }
    }

    fn header(flags: u16, count: usize) -> Vec<u8> {
        let mut page = vec![0; PAGE_HEADER_LEN];
        page[8..10].copy_from_slice(&flags.to_le_bytes());
        page[10..12].copy_from_slice(&(count as u16).to_le_bytes());
        page
    }

    /// A leaf page of `(flags, key, value)` entries, in the order given.
    fn leaf_page(entries: &[(u32, &[u8], &[u8])]) -> Vec<u8> {
        let mut page = header(LEAF_PAGE, entries.len());
        let mut data = Vec::new();
        for (index, (flags, key, value)) in entries.iter().enumerate() {
            let pos = ELEMENT_LEN * (entries.len() - index) + data.len();
            for field in [*flags, pos as u32, key.len() as u32, value.len() as u32] {
                page.extend_from_slice(&field.to_le_bytes());
            }
            data.extend_from_slice(key);
            data.extend_from_slice(value);
        }
        page.extend_from_slice(&data);
        page
    }

    /// A sub-bucket's value: its header, and its entries on an inline page.
    fn inline_bucket(entries: &[(u32, &[u8], &[u8])]) -> Vec<u8> {
        [vec![0; BUCKET_HEADER_LEN], leaf_page(entries)].concat()
    }

    fn paged_bucket(root: u64) -> Vec<u8> {
        [root.to_le_bytes(), 0u64.to_le_bytes()].concat()
    }

    fn revision(main: i64, sub: i64) -> Vec<u8> {
        [&main.to_be_bytes()[..], b"_", &sub.to_be_bytes()].concat()
    }

    fn tombstone(main: i64, sub: i64) -> Vec<u8> {
        [revision(main, sub), b"t".to_vec()].concat()
    }

    /// A snapshot whose buckets `key`, `lease` and `meta` hold `keys`, one lease, and `meta`
    /// with a consistent index; on inline pages, or on pages of their own if `paged`.
    fn snapshot(keys: &[Vec<u8>], meta: &[(&[u8], Vec<u8>)], paged: bool) -> Vec<u8> {
        let mut image = Image::new();
        let root = etcd_buckets(&mut image, keys, meta, paged);
        image.bytes(root)
    }

    fn etcd_buckets(image: &mut Image, keys: &[Vec<u8>], meta: &[(&[u8], Vec<u8>)], paged: bool) -> u64 {
        let mut keys: Vec<(u32, &[u8], &[u8])> = keys.iter().map(|key| (0, key.as_slice(), &b"kv"[..])).collect();
        keys.sort();
        let mut meta: Vec<(u32, &[u8], &[u8])> = meta.iter().map(|(key, value)| (0, *key, value.as_slice())).collect();
        meta.push((0, b"consistent_index", &[0, 0, 0, 0, 0, 0, 0, 9]));
        meta.sort();
        let lease: &[(u32, &[u8], &[u8])] = &[(0, &[0, 0, 0, 0, 0, 0, 0, 1], b"lease")];
        let buckets: Vec<Vec<u8>> = [keys.as_slice(), lease, meta.as_slice()]
            .into_iter()
            .map(|entries| match paged {
                true => paged_bucket(image.leaf(entries)),
                false => inline_bucket(entries),
            })
            .collect();
        image.leaf(&[
            (BUCKET_ENTRY, b"key", &buckets[0]),
            (BUCKET_ENTRY, b"lease", &buckets[1]),
            (BUCKET_ENTRY, b"meta", &buckets[2]),
        ])
    }

    /// A root page for buckets `key`, on page `key_root`, and an empty `meta`.
    fn key_bucket_at(image: &mut Image, key_root: u64) -> u64 {
        image.leaf(&[(BUCKET_ENTRY, b"key", &paged_bucket(key_root)), (BUCKET_ENTRY, b"meta", &inline_bucket(&[]))])
    }

    fn compactions(scheduled: i64, finished: i64) -> Vec<(&'static [u8], Vec<u8>)> {
        vec![(FINISHED_COMPACT, revision(finished, 0)), (SCHEDULED_COMPACT, revision(scheduled, 0))]
    }

    fn with_hash(mut bytes: Vec<u8>) -> Vec<u8> {
        let hash = digest::digest(&SHA256, &bytes);
        bytes.extend_from_slice(hash.as_ref());
        bytes
    }

    fn message(result: Result<SnapshotFacts, SnapshotFileError>) -> String {
        match result {
            Ok(facts) => panic!("read as a snapshot: {facts:?}"),
            Err(error) => error.to_string(),
        }
    }

    #[test]
    fn reads_the_newest_key_revision_the_compaction_and_every_entry() {
        let keys = [revision(2, 0), revision(3, 0), revision(3, 1), revision(5, 0)];
        for paged in [false, true] {
            let bytes = snapshot(&keys, &compactions(3, 3), paged);
            let facts = snapshot_facts(&bytes).unwrap();
            let expected = SnapshotFacts {
                revision: 5,
                compact_revision: 3,
                // 4 revisions, 1 lease, 2 compactions and the consistent index.
                total_keys: 8,
                size_bytes: bytes.len() as u64,
                has_integrity_hash: false,
            };
            assert_eq!(facts, expected, "paged: {paged}");
        }
    }

    #[test]
    fn a_store_never_compacted_has_no_compact_revision() {
        let facts = snapshot_facts(&snapshot(&[revision(2, 0)], &[], false)).unwrap();
        assert_eq!((facts.revision, facts.compact_revision, facts.total_keys), (2, 0, 3));
    }

    #[test]
    fn a_compaction_past_the_newest_key_is_the_revision() {
        // The last change deleted a key, and a compaction at its revision removed the tombstone.
        let keys = [revision(2, 0), revision(4, 0)];
        let facts = snapshot_facts(&snapshot(&keys, &compactions(7, 7), true)).unwrap();
        assert_eq!((facts.revision, facts.compact_revision), (7, 7));
        // Taken while that compaction ran: the previous one is the last finished.
        let facts = snapshot_facts(&snapshot(&keys, &compactions(9, 7), true)).unwrap();
        assert_eq!((facts.revision, facts.compact_revision), (9, 7));
    }

    #[test]
    fn tombstones_are_revisions_and_entries() {
        let keys = [revision(2, 0), revision(3, 0), tombstone(6, 0)];
        let facts = snapshot_facts(&snapshot(&keys, &compactions(2, 2), false)).unwrap();
        assert_eq!((facts.revision, facts.total_keys), (6, 3 + 1 + 3));
    }

    #[test]
    fn large_buckets_span_branch_pages_and_overflow_pages() {
        let mut image = Image::new();
        let big = vec![7; 3 * PAGE];
        let keys: Vec<Vec<u8>> = (1..=300).map(|main| revision(main, 0)).collect();
        let leaves: Vec<(Vec<u8>, u64)> = keys
            .chunks(100)
            .map(|chunk| {
                let mut entries: Vec<(u32, &[u8], &[u8])> =
                    chunk.iter().map(|key| (0, key.as_slice(), &b"kv"[..])).collect();
                // A value larger than a page, as a large key-value pair is in etcd.
                entries[1].2 = &big;
                (chunk[0].clone(), image.leaf(&entries))
            })
            .collect();
        let lower = image.branch(&[(&leaves[0].0, leaves[0].1), (&leaves[1].0, leaves[1].1)]);
        let key_root = image.branch(&[(&leaves[0].0, lower), (&leaves[2].0, leaves[2].1)]);
        let meta = image.leaf(&[(0, FINISHED_COMPACT, &revision(120, 0)), (0, SCHEDULED_COMPACT, &revision(120, 0))]);
        let root = image
            .leaf(&[(BUCKET_ENTRY, b"key", &paged_bucket(key_root)), (BUCKET_ENTRY, b"meta", &paged_bucket(meta))]);
        let bytes = image.bytes(root);
        assert!(image.pages.len() > 3 * 4 + 5, "overflow pages were written");
        let facts = snapshot_facts(&bytes).unwrap();
        assert_eq!((facts.revision, facts.compact_revision, facts.total_keys), (300, 120, 302));
        assert_eq!(facts.size_bytes, bytes.len() as u64);
    }

    #[test]
    fn a_bucket_in_a_bucket_is_one_entry_and_its_pages_are_checked() {
        let build = |nested_root: Option<u64>| {
            let mut image = Image::new();
            let keys = image.leaf(&[(0, &revision(4, 0), b"kv")]);
            let nested = image.leaf(&[(0, b"a", b"1"), (0, b"b", b"2")]);
            let outer = inline_bucket(&[(BUCKET_ENTRY, b"inner", &paged_bucket(nested_root.unwrap_or(nested)))]);
            let root = image.leaf(&[
                (BUCKET_ENTRY, b"extra", &outer),
                (BUCKET_ENTRY, b"key", &paged_bucket(keys)),
                (BUCKET_ENTRY, b"meta", &inline_bucket(&[])),
            ]);
            image.bytes(root)
        };
        // As etcdutl counts: `inner` is an entry of `extra`, and what it holds is not counted.
        let facts = snapshot_facts(&build(None)).unwrap();
        assert_eq!((facts.revision, facts.total_keys), (4, 2));
        // Its pages are walked, as bbolt's check walks them.
        assert!(message(snapshot_facts(&build(Some(2)))).contains("page 2 is referred to twice"));
    }

    #[test]
    fn a_valid_hash_is_checked_and_reported() {
        let plain = snapshot(&[revision(2, 0), revision(3, 0)], &[], false);
        let hashed = with_hash(plain.clone());
        let facts = snapshot_facts(&hashed).unwrap();
        assert!(facts.has_integrity_hash);
        assert_eq!(facts, SnapshotFacts { has_integrity_hash: true, ..snapshot_facts(&plain).unwrap() });
        assert_eq!(facts.size_bytes, hashed.len() as u64 - 32);
    }

    #[test]
    fn a_wrong_hash_is_refused() {
        let hashed = with_hash(snapshot(&[revision(2, 0)], &[], false));
        // A byte no page uses, so that the database alone would read fine; then the hash itself.
        for at in [3 * PAGE - 1, hashed.len() - 1] {
            let mut damaged = hashed.clone();
            damaged[at] ^= 1;
            let error = snapshot_facts(&damaged).unwrap_err();
            assert!(matches!(error, SnapshotFileError::HashMismatch { .. }), "{error}");
            assert_eq!(
                error.to_string(),
                "the snapshot: the SHA-256 at its end does not match its content; the file is damaged or incomplete: \
                 take the snapshot again"
            );
        }
    }

    #[test]
    fn a_truncated_file_is_incomplete() {
        let bytes = snapshot(&[revision(2, 0)], &compactions(2, 2), true);
        let error = snapshot_facts(&bytes[..bytes.len() - PAGE]).unwrap_err();
        assert!(matches!(error, SnapshotFileError::Incomplete { .. }), "{error}");
        assert!(error.to_string().contains("incomplete") && error.to_string().ends_with("take the snapshot again"));
        // A hash cut short leaves no hash, and a database that stops inside a page.
        let hashed = with_hash(bytes.clone());
        let error = snapshot_facts(&hashed[..hashed.len() - 5]).unwrap_err();
        assert!(matches!(error, SnapshotFileError::Incomplete { .. }), "{error}");
        // Whatever the cut, an error and no panic; but the hash cut off whole leaves a member's
        // database as it is on disk, which is a snapshot without a hash.
        for source in [&bytes, &hashed] {
            for len in (0..source.len()).filter(|len| *len != bytes.len()) {
                assert!(snapshot_facts(&source[..len]).is_err(), "{len} bytes of {}", source.len());
            }
        }
        assert!(!snapshot_facts(&hashed[..bytes.len()]).unwrap().has_integrity_hash);
    }

    #[test]
    fn garbage_is_not_a_snapshot() {
        let mut noise = Vec::new();
        let mut state = 0x2545_f491_4f6c_dd1d_u64;
        for _ in 0..65536 {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            noise.push(state as u8);
        }
        let text = b"etcd snapshot? no. ".repeat(500);
        for garbage in [&b""[..], b"hello", &[0; 8192], &noise, &text] {
            let error = snapshot_facts(garbage).unwrap_err();
            assert!(matches!(error, SnapshotFileError::NotASnapshot { .. }), "{} bytes: {error}", garbage.len());
            assert!(error.to_string().contains("not an etcd snapshot"), "{error}");
        }
    }

    #[test]
    fn the_meta_of_the_latest_valid_transaction_is_used() {
        let mut image = Image::new();
        let older = etcd_buckets(&mut image, &[revision(3, 0)], &[], false);
        let newer = etcd_buckets(&mut image, &[revision(3, 0), revision(5, 0)], &[], false);
        let revision_of = |bytes: &[u8]| snapshot_facts(bytes).map(|facts| facts.revision);
        assert_eq!(revision_of(&image.bytes_with_metas([(newer, 8), (older, 7)])).unwrap(), 5);
        assert_eq!(revision_of(&image.bytes_with_metas([(older, 8), (newer, 9)])).unwrap(), 5);
        // A crash while writing the newer meta page leaves the older one (and the page size is
        // then read from the second page).
        let mut bytes = image.bytes_with_metas([(newer, 8), (older, 7)]);
        bytes[PAGE_HEADER_LEN + 20] ^= 1;
        assert_eq!(revision_of(&bytes).unwrap(), 3);
        let mut bytes = image.bytes_with_metas([(older, 8), (newer, 9)]);
        bytes[PAGE + PAGE_HEADER_LEN + 50] ^= 1;
        assert_eq!(revision_of(&bytes).unwrap(), 3);
        bytes[PAGE_HEADER_LEN] ^= 1;
        assert!(message(snapshot_facts(&bytes)).contains("neither of its two bbolt meta pages is valid"));
    }

    #[test]
    fn inconsistent_pages_are_damage() {
        let damage = |bytes: Vec<u8>| match snapshot_facts(&bytes) {
            Err(SnapshotFileError::Damaged { why, .. }) => why,
            other => panic!("not refused as damaged: {other:?}"),
        };
        let keys = [revision(2, 0), revision(3, 0)];

        // A branch page that is its own child.
        let mut image = Image::new();
        let looping = image.pages.len() as u64;
        image.branch(&[(&keys[0], looping)]);
        let root = key_bucket_at(&mut image, looping);
        assert!(damage(image.bytes(root)).contains("referred to twice"));

        // Two buckets sharing a page.
        let mut image = Image::new();
        let shared = image.leaf(&[(0, &keys[0], b"kv")]);
        let root = image
            .leaf(&[(BUCKET_ENTRY, b"key", &paged_bucket(shared)), (BUCKET_ENTRY, b"meta", &paged_bucket(shared))]);
        assert!(damage(image.bytes(root)).contains("page 2 is referred to twice"));

        // A chain of branch pages deeper than any real tree.
        let mut image = Image::new();
        let mut child = image.leaf(&[(0, &keys[0], b"kv")]);
        for _ in 0..MAX_DEPTH + 5 {
            child = image.branch(&[(&keys[0], child)]);
        }
        let root = key_bucket_at(&mut image, child);
        assert!(damage(image.bytes(root)).contains("deeper than 64 levels"));

        // A reference past the database's end, and a page marked with another id.
        let mut image = Image::new();
        let root = key_bucket_at(&mut image, 40);
        assert!(damage(image.bytes(root)).contains("refers to page 40"));
        let mut bytes = snapshot(&keys, &[], true);
        bytes[2 * PAGE] = 9;
        assert!(damage(bytes).contains("page 2 is marked as page 9"));

        // An entry whose key lies past its page's end, and keys out of order.
        let mut bytes = snapshot(&keys, &[], true);
        bytes[2 * PAGE + PAGE_HEADER_LEN + 4..][..4].copy_from_slice(&5000u32.to_le_bytes());
        assert!(damage(bytes).contains("entry 0 of page 2 lies outside it"));
        let mut image = Image::new();
        let keys_page = image.leaf(&[(0, &keys[1], b"kv"), (0, &keys[0], b"kv")]);
        let root = key_bucket_at(&mut image, keys_page);
        assert!(damage(image.bytes(root)).contains("out of order"));

        // What etcd never writes: a key that is not a revision, a top-level entry that is not a
        // bucket, a compaction that is not a revision.
        assert!(damage(snapshot(&[b"foo".to_vec()], &[], false)).contains("bucket `key` holds \"foo\""));
        assert!(damage(snapshot(&[revision(-1, 0)], &[], false)).contains("not a revision"));
        let mut image = Image::new();
        let root = image.leaf(&[(0, b"key", b"value"), (BUCKET_ENTRY, b"meta", &inline_bucket(&[]))]);
        assert!(damage(image.bytes(root)).contains("\"key\", which is not a bucket"));
        assert!(damage(snapshot(&keys, &[(FINISHED_COMPACT, b"7".to_vec())], false)).contains("`meta` holds"));
    }

    #[test]
    fn a_bbolt_database_without_etcds_buckets_is_not_a_snapshot() {
        let mut image = Image::new();
        let root = image.leaf(&[(BUCKET_ENTRY, b"widgets", &inline_bucket(&[(0, b"a", b"b")]))]);
        let message = message(snapshot_facts(&image.bytes(root)));
        assert!(
            message.contains("not an etcd snapshot: it is a bbolt database without etcd's `key` bucket"),
            "{message}"
        );
    }

    #[test]
    fn a_freelist_must_account_for_every_page() {
        let keys = [revision(2, 0)];
        let build = |free: &[u64], orphan: bool| {
            let mut image = Image::new();
            let root = etcd_buckets(&mut image, &keys, &[], true);
            image.add(leaf_page(&[]));
            if orphan {
                image.add(leaf_page(&[]));
            }
            image.set_freelist(free);
            image.bytes(root)
        };
        // Pages 2 to 4 hold the buckets, 5 the root; 6 is free.
        let facts = snapshot_facts(&build(&[6], false)).unwrap();
        assert_eq!((facts.revision, facts.total_keys), (2, 3));
        assert!(message(snapshot_facts(&build(&[6], true))).contains("page 7 is neither in use nor free"));
        assert!(message(snapshot_facts(&build(&[4, 6], false))).contains("page 4 is in use, and listed as free"));
        assert!(message(snapshot_facts(&build(&[6, 6], false))).contains("lists page 6 twice"));
    }

    #[test]
    fn reads_files_page_by_page() {
        let bytes = snapshot(&[revision(2, 0), revision(9, 0)], &compactions(2, 2), true);
        let dir = std::env::temp_dir().join(format!("snapshot-file-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        for (name, content) in [("plain.db", bytes.clone()), ("hashed.db", with_hash(bytes.clone()))] {
            let path = dir.join(name);
            std::fs::write(&path, &content).unwrap();
            assert_eq!(read_snapshot_facts(&path).unwrap(), snapshot_facts(&content).unwrap());
        }
        let mut damaged = with_hash(bytes);
        damaged[PAGE * 3 - 1] ^= 1;
        std::fs::write(dir.join("damaged.db"), &damaged).unwrap();
        let message = message(read_snapshot_facts(&dir.join("damaged.db")));
        assert!(message.starts_with(&format!("{}: the SHA-256 at its end", dir.join("damaged.db").display())));
        let missing = read_snapshot_facts(&dir.join("missing.db")).unwrap_err();
        assert!(matches!(missing, SnapshotFileError::Read { .. }) && missing.to_string().contains("missing.db"));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    proptest! {
        /// Whatever bytes of a snapshot are damaged, reading it ends, without a panic.
        #[test]
        fn damage_anywhere_never_panics(
            hashed in any::<bool>(),
            damage in prop::collection::vec((0usize..12 * PAGE, any::<u8>(), any::<bool>()), 1..16),
        ) {
            let keys: Vec<Vec<u8>> = (1..40).map(|main| revision(main, 0)).collect();
            let mut bytes = snapshot(&keys, &compactions(20, 20), true);
            for (at, byte, in_structure) in damage {
                let mut at = at % bytes.len();
                if in_structure {
                    // Headers, elements and meta fields, rather than the zeros that fill pages.
                    at = at - at % PAGE + at % 96;
                }
                bytes[at] = byte;
            }
            if hashed {
                bytes = with_hash(bytes);
            }
            let _ = snapshot_facts(&bytes);
        }
    }
}
