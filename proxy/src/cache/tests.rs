use super::*;

fn range(key: &str, end: &str) -> KeyRange {
    KeyRange { key: Bytes::copy_from_slice(key.as_bytes()), range_end: Bytes::copy_from_slice(end.as_bytes()) }
}

fn user(name: &str) -> User {
    Some(Arc::from(name))
}

fn request(text: &str) -> Bytes {
    Bytes::copy_from_slice(text.as_bytes())
}

/// Stores `answer` for `who`'s request `text` over `range` at `revision`; returns the new
/// watcher, if one was started.
fn put(
    cache: &ReadCache<String>,
    who: &User,
    text: &str,
    range: KeyRange,
    revision: i64,
    answer: &str,
) -> Option<NewWatcher> {
    let cacheable = Cacheable { range, epoch: cache.epoch() };
    cache.insert(who.clone(), request(text), cacheable, revision, answer.to_owned(), answer.len())
}

#[test]
fn answers_are_kept_per_user_and_request() {
    let cache = ReadCache::new(1 << 20);
    let alice = user("alice");
    let watcher = put(&cache, &alice, "get k", range("k", ""), 10, "v1").expect("first range starts a watcher");
    assert_eq!(cache.get(Some("alice"), b"get k").as_deref(), Some("v1"));
    assert_eq!(cache.get(Some("bob"), b"get k"), None, "another user's answer is never served");
    assert_eq!(cache.get(None, b"get k"), None);
    assert_eq!(cache.get(Some("alice"), b"get j"), None);
    assert_eq!((cache.stats.hits.load(Ordering::Relaxed), cache.stats.misses.load(Ordering::Relaxed)), (1, 3));
    let mut commands = watcher.commands;
    assert_eq!(
        commands.try_recv().ok(),
        Some(WatchCommand::Create { id: 1, range: range("k", ""), start_revision: 11 })
    );
    // A second request over the same range shares its watch.
    assert!(put(&cache, &alice, "get k keys-only", range("k", ""), 10, "k").is_none());
    assert!(commands.try_recv().is_err());
}

#[test]
fn a_change_drops_older_answers_and_keeps_newer_ones() {
    let cache = ReadCache::new(1 << 20);
    let who = user("alice");
    let _watcher = put(&cache, &who, "get k", range("k", ""), 10, "v1");
    put(&cache, &who, "get k count", range("k", ""), 12, "1");
    cache.changed(1, 12);
    assert_eq!(cache.get(Some("alice"), b"get k"), None);
    assert_eq!(cache.get(Some("alice"), b"get k count").as_deref(), Some("1"));
    // An answer older than a change already seen is not stored.
    assert!(put(&cache, &who, "get k", range("k", ""), 11, "v1").is_none());
    assert_eq!(cache.get(Some("alice"), b"get k"), None);
    put(&cache, &who, "get k", range("k", ""), 12, "v2");
    assert_eq!(cache.get(Some("alice"), b"get k").as_deref(), Some("v2"));
}

#[test]
fn an_answer_older_than_its_watch_is_not_stored() {
    let cache = ReadCache::new(1 << 20);
    let who = user("alice");
    let _watcher = put(&cache, &who, "get k", range("k", ""), 20, "new");
    // Read from a member that lags: a change between 15 and 20 would not be reported.
    put(&cache, &who, "get k count", range("k", ""), 15, "1");
    assert_eq!(cache.get(Some("alice"), b"get k count"), None);
}

#[test]
fn writes_through_the_proxy_drop_what_they_touch_and_what_raced_them() {
    let cache = ReadCache::new(1 << 20);
    let who = user("alice");
    let _watcher = put(&cache, &who, "get a", range("a", ""), 10, "a");
    put(&cache, &who, "get b", range("b", ""), 10, "b");
    put(&cache, &who, "get prefix", range("p/", "p0"), 10, "p");
    put(&cache, &who, "get all", range("", "\0"), 10, "all");
    cache.written(11, || Written::Ranges(vec![range("p/x", "")]));
    assert_eq!(cache.get(Some("alice"), b"get prefix"), None);
    assert_eq!(cache.get(Some("alice"), b"get all"), None);
    assert_eq!(cache.get(Some("alice"), b"get a").as_deref(), Some("a"));
    cache.written(12, || Written::Ranges(vec![range("a", "b")]));
    assert_eq!(cache.get(Some("alice"), b"get a"), None);
    assert_eq!(cache.get(Some("alice"), b"get b").as_deref(), Some("b"), "a range end is exclusive");
    // A read answered before the write (at 11) that arrives after it is not stored.
    put(&cache, &who, "get b2", range("b", ""), 11, "b");
    assert_eq!(cache.get(Some("alice"), b"get b2"), None);
    cache.written(13, || Written::Everything);
    assert_eq!(cache.get(Some("alice"), b"get b"), None);
}

#[test]
fn a_write_to_an_empty_cache_still_refuses_a_racing_read() {
    let cache: ReadCache<String> = ReadCache::new(1 << 20);
    cache.written(30, || Written::Ranges(vec![range("k", "")]));
    assert!(put(&cache, &user("alice"), "get k", range("k", ""), 29, "old").is_none());
    assert_eq!(cache.get(Some("alice"), b"get k"), None);
}

#[test]
fn memory_stays_under_the_limit_least_recently_used_first() {
    let limit = 64 * 1024;
    let cache = ReadCache::new(limit);
    let who = user("alice");
    let _watcher = put(&cache, &who, "get 0", range("0", ""), 1, &"x".repeat(1000));
    for i in 1..640 {
        if i % 10 == 0 {
            // Kept in use: never the least recently used.
            assert!(cache.get(Some("alice"), b"get 0").is_some(), "at {i}");
        }
        put(&cache, &who, &format!("get {i}"), range(&i.to_string(), ""), 1, &"x".repeat(1000));
        assert!(cache.bytes() <= limit, "{} bytes after {i} answers", cache.bytes());
    }
    assert!(cache.get(Some("alice"), b"get 0").is_some());
    assert!(cache.get(Some("alice"), b"get 639").is_some());
    assert!(cache.get(Some("alice"), b"get 1").is_none());
    assert!(cache.stats.evictions.load(Ordering::Relaxed) > 500);
    let store = cache.lock();
    assert!(store.groups.len() <= IDLE_GROUPS_KEPT + store.by_request.len());
}

#[test]
fn an_answer_too_large_for_its_share_is_not_stored() {
    let cache = ReadCache::new(8 * 1024);
    assert!(put(&cache, &None, "get big", range("big", ""), 1, &"x".repeat(2000)).is_none());
    assert_eq!(cache.get(None, b"get big"), None);
    assert_eq!(cache.bytes(), 0);
}

#[test]
fn a_failed_stream_drops_its_users_answers_and_the_next_one_starts_clean() {
    let cache = ReadCache::new(1 << 20);
    let (alice, bob) = (user("alice"), user("bob"));
    let first = put(&cache, &alice, "get k", range("k", ""), 5, "a").expect("watcher");
    let _bob = put(&cache, &bob, "get k", range("k", ""), 5, "b").expect("bob's own watcher");
    cache.forget_user(&alice, first.generation + 100);
    assert!(cache.get(Some("alice"), b"get k").is_some(), "another generation's end changes nothing");
    cache.forget_user(&alice, first.generation);
    assert_eq!(cache.get(Some("alice"), b"get k"), None);
    assert_eq!(cache.get(Some("bob"), b"get k").as_deref(), Some("b"));
    let second = put(&cache, &alice, "get k", range("k", ""), 6, "a2").expect("a new stream");
    assert_ne!(second.generation, first.generation);
    // The old stream reporting late does not touch the new one.
    cache.forget_user(&alice, first.generation);
    assert_eq!(cache.get(Some("alice"), b"get k").as_deref(), Some("a2"));
}

#[test]
fn an_ended_watch_drops_its_answers_and_the_last_group_ends_the_stream() {
    let cache = ReadCache::new(1 << 20);
    let who = user("alice");
    let mut watcher = put(&cache, &who, "get k", range("k", ""), 5, "a").expect("watcher").commands;
    put(&cache, &who, "get j", range("j", ""), 5, "j");
    let _ = watcher.try_recv();
    let _ = watcher.try_recv();
    cache.watch_ended(1);
    assert_eq!(cache.get(Some("alice"), b"get k"), None);
    assert_eq!(watcher.try_recv().ok(), Some(WatchCommand::Cancel { id: 1 }));
    cache.watch_ended(2);
    assert!(watcher.try_recv().is_err());
    assert!(watcher.is_closed(), "no group left: the stream's channel closes");
}

#[tokio::test(start_paused = true)]
async fn answers_are_read_again_after_the_recheck_time() {
    let cache = ReadCache::new(1 << 20);
    let _watcher = put(&cache, &None, "get k", range("k", ""), 5, "a");
    assert!(cache.get(None, b"get k").is_some());
    tokio::time::advance(RECHECK_AFTER).await;
    assert_eq!(cache.get(None, b"get k"), None);
}

#[test]
fn a_reversed_range_written_names_no_key() {
    let cache = ReadCache::new(1 << 20);
    let who = user("alice");
    let _watcher = put(&cache, &who, "get b", range("b", ""), 10, "b");
    put(&cache, &who, "get a..c", range("a", "c"), 10, "abc");
    // etcd accepts a DeleteRange whose end comes before its key, and deletes nothing.
    cache.written(11, || Written::Ranges(vec![range("b", "a")]));
    assert_eq!(cache.get(Some("alice"), b"get b").as_deref(), Some("b"));
    assert_eq!(cache.get(Some("alice"), b"get a..c").as_deref(), Some("abc"));
    cache.written(12, || Written::Ranges(vec![range("b", "b")]));
    assert_eq!(cache.get(Some("alice"), b"get b").as_deref(), Some("b"));
}

#[test]
fn an_answer_refreshed_many_times_stays_under_its_watch() {
    let cache = ReadCache::new(1 << 20);
    let who = user("alice");
    let watcher = put(&cache, &who, "get k", range("k", ""), 10, "v10").expect("first range starts a watcher");
    // Each refresh replaces the answer; the group must never look idle meanwhile (it went
    // through the idle queue on every refresh, and past the queue's length was dropped with
    // its watch while the new answer went in).
    for revision in 11..(11 + 2 * IDLE_GROUPS_KEPT as i64) {
        assert!(put(&cache, &who, "get k", range("k", ""), revision, "v").is_none(), "no second watcher");
    }
    let mut commands = watcher.commands;
    assert!(matches!(commands.try_recv(), Ok(WatchCommand::Create { id: 1, .. })));
    assert!(commands.try_recv().is_err(), "the watch was never cancelled");
    // A write through the proxy still finds it.
    cache.written(5000, || Written::Ranges(vec![range("k", "")]));
    assert_eq!(cache.get(Some("alice"), b"get k"), None);
}

#[test]
fn the_idle_queue_holds_each_group_once() {
    let cache = ReadCache::new(1 << 20);
    let who = user("alice");
    let _watcher = put(&cache, &who, "get k", range("k", ""), 10, "v");
    for revision in 11..200 {
        cache.changed(1, revision);
        put(&cache, &who, "get k", range("k", ""), revision, "v");
    }
    assert_eq!(cache.lock().idle_groups.len(), 1);
}

#[test]
fn an_answer_read_across_a_write_of_unknown_revision_is_not_stored() {
    let cache = ReadCache::new(1 << 20);
    let who = user("alice");
    let _watcher = put(&cache, &who, "get a", range("a", ""), 10, "a");
    // A read of k misses and is forwarded; a write of k is acknowledged at a revision the proxy
    // could not read, so everything goes; then the read's answer, from before the write, arrives.
    let read = Cacheable { range: range("k", ""), epoch: cache.epoch() };
    cache.forget_everything();
    assert_eq!(cache.get(Some("alice"), b"get a"), None);
    assert!(cache.insert(who.clone(), request("get k"), read, 11, "old".to_owned(), 3).is_none());
    assert_eq!(cache.get(Some("alice"), b"get k"), None);
    // A read forwarded after it is stored.
    assert!(put(&cache, &who, "get k", range("k", ""), 12, "new").is_some());
    assert_eq!(cache.get(Some("alice"), b"get k").as_deref(), Some("new"));
}
