//! Oversize watch responses for limited clients, cut into several for the same watch.

use etcd_compat_proto::etcdserverpb::WatchResponse;
use etcd_compat_proto::mvccpb::Event;
use prost::Message;

use super::paging::field_size;

/// Splits one WatchResponse into several for the same watch, each at most `budget` bytes
/// encoded, cutting between revisions where possible and between events only when a single
/// revision is larger than the budget. Events keep their order; none is dropped or repeated.
pub fn split_watch_response(response: WatchResponse, budget: usize) -> Vec<WatchResponse> {
    let mut skeleton = response.clone();
    skeleton.events.clear();
    let base = skeleton.encoded_len();
    // Group consecutive events of one revision: a client sees a revision's events together.
    let mut groups: Vec<Vec<Event>> = Vec::new();
    for event in response.events {
        let revision = event.kv.as_ref().map_or(0, |kv| kv.mod_revision);
        match groups.last_mut() {
            Some(group) if group.last().and_then(|e| e.kv.as_ref()).map_or(0, |kv| kv.mod_revision) == revision => {
                group.push(event)
            }
            _ => groups.push(vec![event]),
        }
    }
    let mut parts: Vec<WatchResponse> = Vec::new();
    let mut current: Vec<Event> = Vec::new();
    let mut current_size = base;
    let flush = |parts: &mut Vec<WatchResponse>, events: &mut Vec<Event>, size: &mut usize| {
        if !events.is_empty() {
            parts.push(WatchResponse { events: std::mem::take(events), ..skeleton.clone() });
        }
        *size = base;
    };
    for group in groups {
        let group_size: usize = group.iter().map(|e| field_size(e.encoded_len())).sum();
        if current_size + group_size > budget && !current.is_empty() {
            flush(&mut parts, &mut current, &mut current_size);
        }
        if base + group_size <= budget {
            current_size += group_size;
            current.extend(group);
            continue;
        }
        // One revision larger than the budget: cut between its events.
        for event in group {
            let size = field_size(event.encoded_len());
            if current_size + size > budget && !current.is_empty() {
                flush(&mut parts, &mut current, &mut current_size);
            }
            current_size += size;
            current.push(event);
        }
    }
    flush(&mut parts, &mut current, &mut current_size);
    if parts.is_empty() {
        parts.push(skeleton);
    }
    parts
}

#[cfg(test)]
mod tests {
    use super::*;
    use etcd_compat_proto::mvccpb::KeyValue;

    #[test]
    fn watch_responses_split_between_revisions() {
        let event = |key: &str, revision: i64| Event {
            kv: Some(KeyValue {
                key: key.to_owned().into(),
                value: vec![b'v'; 1000].into(),
                mod_revision: revision,
                ..Default::default()
            }),
            ..Default::default()
        };
        let response = WatchResponse {
            watch_id: 7,
            events: vec![event("a", 5), event("b", 5), event("c", 6), event("d", 7), event("e", 7), event("f", 7)],
            ..Default::default()
        };
        let original = response.clone();
        let parts = split_watch_response(response, 2500);
        let revisions: Vec<Vec<i64>> =
            parts.iter().map(|p| p.events.iter().map(|e| e.kv.as_ref().unwrap().mod_revision).collect()).collect();
        // Revision 7 (three events, ~3 KB) is larger than the budget, so only it is cut inside.
        assert_eq!(revisions, vec![vec![5, 5], vec![6], vec![7, 7], vec![7]]);
        assert!(parts.iter().all(|p| p.encoded_len() <= 2500 && p.watch_id == 7));
        let rejoined: Vec<Event> = parts.into_iter().flat_map(|p| p.events).collect();
        assert_eq!(rejoined, original.events);
    }
}
