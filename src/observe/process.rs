//! The standard `process_*` metrics (CPU seconds, memory, start time, file
//! descriptors), read from `/proc` at each scrape. On a system without
//! `/proc` they are left out.

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;

/// What `/proc` says about this process.
#[derive(Debug, Clone, PartialEq)]
pub struct ProcessStats {
    pub cpu_seconds: f64,
    pub resident_bytes: u64,
    pub virtual_bytes: u64,
    /// Unix time.
    pub start_time_seconds: f64,
    pub open_fds: u64,
    pub max_fds: Option<u64>,
}

/// `AT_CLKTCK` and `AT_PAGESZ` from the process's auxiliary vector, with the
/// Linux defaults if it cannot be read.
fn clock_ticks_and_page_size() -> (u64, u64) {
    let (mut ticks, mut page) = (100, 4096);
    if let Ok(auxv) = std::fs::read("/proc/self/auxv") {
        let word = std::mem::size_of::<usize>();
        let read = |chunk: &[u8]| -> u64 {
            let mut bytes = [0u8; 8];
            bytes[..chunk.len().min(8)].copy_from_slice(&chunk[..chunk.len().min(8)]);
            u64::from_ne_bytes(bytes)
        };
        for pair in auxv.chunks_exact(2 * word) {
            let (key, value) = (read(&pair[..word]), read(&pair[word..]));
            match key {
                6 if value > 0 => page = value,
                17 if value > 0 => ticks = value,
                _ => {}
            }
        }
    }
    (ticks, page)
}

/// Reads `/proc/self/stat`, `/proc/stat`, `/proc/self/fd` and
/// `/proc/self/limits`; `None` where `/proc` is missing or unreadable.
pub fn read_process_stats() -> Option<ProcessStats> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // The command name (field 2) may hold spaces and parentheses: the
    // fields we want follow its last ')'.
    let after = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = after.split_whitespace().collect();
    let field = |n: usize| -> Option<u64> { fields.get(n - 3)?.parse().ok() };
    let (ticks, page) = clock_ticks_and_page_size();
    let cpu_ticks = field(14)? + field(15)?;
    let boot_time: u64 = std::fs::read_to_string("/proc/stat")
        .ok()?
        .lines()
        .find_map(|line| line.strip_prefix("btime ")?.trim().parse().ok())?;
    let open_fds = std::fs::read_dir("/proc/self/fd").ok()?.count() as u64;
    let max_fds = std::fs::read_to_string("/proc/self/limits")
        .ok()
        .and_then(|limits| {
            limits.lines().find_map(|line| {
                line.strip_prefix("Max open files")?
                    .split_whitespace()
                    .next()?
                    .parse()
                    .ok()
            })
        });
    Some(ProcessStats {
        cpu_seconds: cpu_ticks as f64 / ticks as f64,
        virtual_bytes: field(23)?,
        resident_bytes: field(24)? * page,
        start_time_seconds: boot_time as f64 + field(22)? as f64 / ticks as f64,
        open_fds,
        max_fds,
    })
}

#[derive(Debug, Default)]
pub(super) struct ProcessCollector;

impl ProcessCollector {
    pub(super) fn new() -> Self {
        ProcessCollector
    }
}

fn gauge<N>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    value: N,
) -> Result<(), std::fmt::Error>
where
    ConstGauge<N>: EncodeMetric,
{
    let metric = ConstGauge::new(value);
    metric.encode(encoder.encode_descriptor(name, help, None, metric.metric_type())?)
}

impl Collector for ProcessCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let Some(stats) = read_process_stats() else {
            return Ok(());
        };
        let cpu = ConstCounter::new(stats.cpu_seconds);
        cpu.encode(encoder.encode_descriptor(
            "process_cpu_seconds",
            "Total user and system CPU time spent in seconds.",
            None,
            cpu.metric_type(),
        )?)?;
        let bytes = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        gauge(
            &mut encoder,
            "process_resident_memory_bytes",
            "Resident memory size in bytes.",
            bytes(stats.resident_bytes),
        )?;
        gauge(
            &mut encoder,
            "process_virtual_memory_bytes",
            "Virtual memory size in bytes.",
            bytes(stats.virtual_bytes),
        )?;
        gauge(
            &mut encoder,
            "process_start_time_seconds",
            "Start time of the process since unix epoch in seconds.",
            stats.start_time_seconds,
        )?;
        gauge(
            &mut encoder,
            "process_open_fds",
            "Number of open file descriptors.",
            bytes(stats.open_fds),
        )?;
        if let Some(max) = stats.max_fds {
            gauge(
                &mut encoder,
                "process_max_fds",
                "Maximum number of open file descriptors.",
                bytes(max),
            )?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[cfg(target_os = "linux")]
    fn proc_is_read() {
        let stats = read_process_stats().expect("/proc is readable");
        assert!(stats.resident_bytes > 1024 * 1024, "{stats:?}");
        assert!(stats.virtual_bytes >= stats.resident_bytes, "{stats:?}");
        assert!(stats.open_fds >= 3, "{stats:?}");
        let now = super::super::metrics::unix_seconds(std::time::SystemTime::now());
        assert!(stats.start_time_seconds <= now + 1.0, "{stats:?}");
        assert!(stats.start_time_seconds > now - 86_400.0, "{stats:?}");
        // Burn a little CPU: the counter moves.
        let before = stats.cpu_seconds;
        let mut x = 0u64;
        let start = std::time::Instant::now();
        while start.elapsed() < std::time::Duration::from_millis(300) {
            x = x.wrapping_mul(31).wrapping_add(7);
        }
        std::hint::black_box(x);
        let after = read_process_stats().expect("/proc is readable").cpu_seconds;
        assert!(after > before, "{before} -> {after}");
    }
}
