//! CPU time and resident memory of the processes under test, read from `/proc`.

use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

use anyhow::{anyhow, Context, Result};

/// User plus system CPU time consumed so far by all threads of `pid`.
pub fn cpu_time(pid: u32) -> Result<Duration> {
    let path = format!("/proc/{pid}/stat");
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    let ticks = parse_stat_cpu_ticks(&text).with_context(|| format!("parsing {path}"))?;
    Ok(Duration::from_secs_f64(ticks as f64 / clock_ticks_per_second() as f64))
}

/// Resident set size of `pid` in bytes (`VmRSS`).
pub fn rss_bytes(pid: u32) -> Result<u64> {
    status_kib(pid, "VmRSS").map(|kib| kib * 1024)
}

/// Peak resident set size of `pid` in bytes (`VmHWM`), since it started or since the last
/// [`reset_peak_rss`].
pub fn peak_rss_bytes(pid: u32) -> Result<u64> {
    status_kib(pid, "VmHWM").map(|kib| kib * 1024)
}

/// Resets `pid`'s `VmHWM` to its current RSS (`echo 5 > /proc/<pid>/clear_refs`, Linux 4.0+),
/// so that a later [`peak_rss_bytes`] covers only what happened in between rather than the
/// whole life of a process that already served other workloads.
pub fn reset_peak_rss(pid: u32) -> Result<()> {
    let path = format!("/proc/{pid}/clear_refs");
    std::fs::write(&path, "5").with_context(|| format!("writing 5 to {path}"))
}

/// A kB field of `/proc/<pid>/status`.
fn status_kib(pid: u32, field: &str) -> Result<u64> {
    let path = format!("/proc/{pid}/status");
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    parse_status_kib(&text, field).with_context(|| format!("parsing {path}"))
}

/// utime + stime, in clock ticks, from the text of `/proc/<pid>/stat`.
fn parse_stat_cpu_ticks(stat: &str) -> Result<u64> {
    // Field 2 (comm) is parenthesised and may itself contain spaces or ')', so the
    // numbered fields are counted from the last ')'.
    let (_, rest) = stat.rsplit_once(')').ok_or_else(|| anyhow!("no ')' after the command name"))?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // `rest` starts at field 3 (state); utime and stime are fields 14 and 15.
    let field = |index: usize, name: &str| -> Result<u64> {
        fields
            .get(index)
            .ok_or_else(|| anyhow!("{name} missing"))?
            .parse::<u64>()
            .with_context(|| format!("{name} is not a number"))
    };
    Ok(field(11, "utime")? + field(12, "stime")?)
}

/// The value (kB) of `field` (`VmRSS`, `VmHWM`) from the text of `/proc/<pid>/status`.
fn parse_status_kib(status: &str, field: &str) -> Result<u64> {
    let line = status
        .lines()
        .find_map(|line| line.strip_prefix(field).and_then(|rest| rest.strip_prefix(':')))
        .ok_or_else(|| anyhow!("no {field} line (a zombie process has none)"))?;
    let number = line.split_whitespace().next().ok_or_else(|| anyhow!("empty {field} line"))?;
    number.parse().with_context(|| format!("{field} {number:?} is not a number"))
}

/// USER_HZ, the unit of the stat times: asked of `getconf` once, since std has no sysconf;
/// 100 is what Linux uses on every mainstream architecture.
fn clock_ticks_per_second() -> u64 {
    static TICKS: OnceLock<u64> = OnceLock::new();
    *TICKS.get_or_init(|| {
        Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .filter(|output| output.status.success())
            .and_then(|output| String::from_utf8_lossy(&output.stdout).trim().parse().ok())
            .filter(|ticks| *ticks > 0)
            .unwrap_or(100)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_times_are_counted_from_the_last_parenthesis() {
        let stat = "4242 (odd) name) S 1 4242 4242 0 -1 4194560 100 0 0 0 250 75 0 0 20 0 3 0 1 2 3";
        assert_eq!(parse_stat_cpu_ticks(stat).unwrap(), 325);
    }

    #[test]
    fn truncated_stat_is_an_error() {
        assert!(parse_stat_cpu_ticks("1 (x) S 1 2").is_err());
        assert!(parse_stat_cpu_ticks("garbage").is_err());
    }

    #[test]
    fn vm_rss_is_read_in_kib() {
        let status = "Name:\tetcd\nVmPeak:\t  900 kB\nVmHWM:\t   23456 kB\nVmRSS:\t   12345 kB\nThreads:\t9\n";
        assert_eq!(parse_status_kib(status, "VmRSS").unwrap(), 12345);
        assert_eq!(parse_status_kib(status, "VmHWM").unwrap(), 23456);
        assert!(parse_status_kib("Name:\tzombie\n", "VmRSS").is_err());
    }

    #[test]
    fn own_process_is_readable() {
        let pid = std::process::id();
        assert!(rss_bytes(pid).unwrap() > 0);
        cpu_time(pid).unwrap();
        reset_peak_rss(pid).unwrap();
        assert!(peak_rss_bytes(pid).unwrap() > 0);
    }
}
