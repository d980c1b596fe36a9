//! Percentiles, median-round selection and the number formats of the report.

use std::time::Duration;

/// Nearest-rank percentile `p` (0..=100) of ascending `sorted` samples.
pub fn percentile(sorted: &[u64], p: f64) -> Option<u64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    Some(sorted[rank.clamp(1, sorted.len()) - 1])
}

/// Index of the median of `values` (the lower middle one for an even count), so that the
/// reported latency and CPU figures all come from one real round rather than a blend.
pub fn median_index(values: &[f64]) -> Option<usize> {
    if values.is_empty() {
        return None;
    }
    let mut order: Vec<usize> = (0..values.len()).collect();
    order.sort_by(|&a, &b| values[a].total_cmp(&values[b]));
    Some(order[(values.len() - 1) / 2])
}

/// `1234567.8` -> `"1,234,568"`; rates below 100 keep one decimal.
pub fn format_rate(rate: f64) -> String {
    if rate < 100.0 {
        return format!("{rate:.1}");
    }
    group_thousands(rate.round() as u64)
}

/// Compact rate for the all-rounds column: `"12.3k"`, `"4,567"`, `"7.9"`.
pub fn format_rate_short(rate: f64) -> String {
    if rate >= 10_000.0 {
        format!("{:.1}k", rate / 1000.0)
    } else {
        format_rate(rate)
    }
}

/// A latency with a unit that keeps three significant digits readable.
pub fn format_latency(latency: Duration) -> String {
    let micros = latency.as_secs_f64() * 1e6;
    if micros < 1_000.0 {
        format!("{micros:.0} µs")
    } else if micros < 1_000_000.0 {
        format!("{:.2} ms", micros / 1e3)
    } else {
        format!("{:.2} s", micros / 1e6)
    }
}

/// CPU time per operation in microseconds.
pub fn format_cpu_per_op(cpu: Duration, ops: u64) -> String {
    if ops == 0 {
        return "-".to_owned();
    }
    let micros = cpu.as_secs_f64() * 1e6 / ops as f64;
    if micros < 10.0 {
        format!("{micros:.2} µs")
    } else if micros < 1_000.0 {
        format!("{micros:.1} µs")
    } else {
        format!("{} µs", group_thousands(micros.round() as u64))
    }
}

/// Bytes as MiB with one decimal.
pub fn format_mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1024.0 * 1024.0))
}

/// The signed difference `to - from` as MiB: `"+12.5 MiB"`, `"-0.3 MiB"`.
pub fn format_mib_delta(to: u64, from: u64) -> String {
    let mib = (to as f64 - from as f64) / (1024.0 * 1024.0);
    format!("{mib:+.1} MiB")
}

fn group_thousands(value: u64) -> String {
    let digits = value.to_string();
    // The first group takes the leftover digits so that every later group has three.
    let first = match digits.len() % 3 {
        0 => 3.min(digits.len()),
        rest => rest,
    };
    let mut grouped = digits[..first].to_owned();
    let mut rest = &digits[first..];
    while !rest.is_empty() {
        grouped.push(',');
        grouped.push_str(&rest[..3]);
        rest = &rest[3..];
    }
    grouped
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let samples: Vec<u64> = (1..=100).collect();
        assert_eq!(percentile(&samples, 50.0), Some(50));
        assert_eq!(percentile(&samples, 99.0), Some(99));
        assert_eq!(percentile(&samples, 100.0), Some(100));
        assert_eq!(percentile(&samples, 0.0), Some(1));
        assert_eq!(percentile(&[7], 99.0), Some(7));
        assert_eq!(percentile(&[], 50.0), None);
    }

    #[test]
    fn median_index_picks_the_middle_round() {
        assert_eq!(median_index(&[30.0, 10.0, 20.0]), Some(2));
        assert_eq!(median_index(&[5.0]), Some(0));
        assert_eq!(median_index(&[4.0, 1.0, 3.0, 2.0]), Some(3));
        assert_eq!(median_index(&[]), None);
    }

    #[test]
    fn formats() {
        assert_eq!(format_rate(1_234_567.8), "1,234,568");
        assert_eq!(format_rate(999.4), "999");
        assert_eq!(format_rate(100_000.0), "100,000");
        assert_eq!(format_rate(1_000.0), "1,000");
        assert_eq!(format_rate(42.25), "42.2");
        assert_eq!(format_rate_short(12_345.0), "12.3k");
        assert_eq!(format_rate_short(4_567.4), "4,567");
        assert_eq!(format_latency(Duration::from_micros(850)), "850 µs");
        assert_eq!(format_latency(Duration::from_micros(12_345)), "12.35 ms");
        assert_eq!(format_latency(Duration::from_millis(2_500)), "2.50 s");
        assert_eq!(format_cpu_per_op(Duration::from_millis(10), 1000), "10.0 µs");
        assert_eq!(format_cpu_per_op(Duration::from_millis(5), 1000), "5.00 µs");
        assert_eq!(format_cpu_per_op(Duration::from_secs(3), 1000), "3,000 µs");
        assert_eq!(format_cpu_per_op(Duration::from_secs(1), 0), "-");
        assert_eq!(format_mib(3 * 1024 * 1024 / 2), "1.5 MiB");
        assert_eq!(format_mib_delta(5 << 20, 2 << 20), "+3.0 MiB");
        assert_eq!(format_mib_delta(2 << 20, 5 << 20), "-3.0 MiB");
    }
}
