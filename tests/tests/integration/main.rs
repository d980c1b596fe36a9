//! Integration tests against real etcd clusters and real clients; one module per area.

mod auth_sessions;
mod byte_fidelity;
mod cert_lifecycle;
mod cluster_routing;
mod deploy;
mod doctor;
mod errors;
mod etcdctl_compat;
mod explaining_logs;
mod failover;
mod hardening;
mod harness_smoke;
mod lifecycle;
mod migration;
mod read_cache;
mod restarts;
mod shared_sessions;
mod size_budget;
mod status_page;
mod support;
mod watch_coalescing;
