//! Reading a child's `/metrics`: a free loopback port for it, one HTTP GET,
//! and the commit-to-durable histogram parsed from the Prometheus text, so
//! that the benchmark's latency figures can be checked against the
//! processor's own (docs/operating.md lists the metrics).

use anyhow::{Context, Result};
use std::net::SocketAddr;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A loopback address whose port was free a moment ago.
pub fn free_loopback_addr() -> Result<SocketAddr> {
    let listener =
        std::net::TcpListener::bind("127.0.0.1:0").context("cannot find a free local port")?;
    listener.local_addr().context("cannot read the free port")
}

/// The body of `GET /metrics` at `addr`.
pub async fn metrics_text(addr: SocketAddr) -> Result<String> {
    let mut stream = tokio::net::TcpStream::connect(addr)
        .await
        .with_context(|| format!("cannot connect to {addr}"))?;
    let request = format!("GET /metrics HTTP/1.0\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response).await?;
    let response = String::from_utf8(response).context("/metrics is not UTF-8")?;
    let (head, body) = response
        .split_once("\r\n\r\n")
        .context("/metrics answered without a header")?;
    if !head.starts_with("HTTP/1.1 200") && !head.starts_with("HTTP/1.0 200") {
        anyhow::bail!(
            "/metrics answered {}",
            head.lines().next().unwrap_or_default()
        );
    }
    Ok(body.to_string())
}

/// A Prometheus histogram: cumulative counts by upper bound (seconds),
/// ending with `+Inf`.
#[derive(Debug, Clone, PartialEq)]
pub struct Histogram {
    pub buckets: Vec<(f64, u64)>,
}

impl Histogram {
    /// The histogram `name` (without `_bucket`) in `text`, its buckets
    /// summed over every label set; `None` if it has no bucket.
    pub fn parse(text: &str, name: &str) -> Option<Histogram> {
        let prefix = format!("{name}_bucket{{");
        let mut buckets: Vec<(f64, u64)> = Vec::new();
        for line in text.lines().filter(|line| line.starts_with(&prefix)) {
            let le = line.split("le=\"").nth(1)?.split('"').next()?;
            let le = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().ok()?
            };
            let count: f64 = line.rsplit(' ').next()?.parse().ok()?;
            match buckets.iter_mut().find(|(bound, _)| *bound == le) {
                Some((_, total)) => *total += count as u64,
                None => buckets.push((le, count as u64)),
            }
        }
        buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
        (!buckets.is_empty()).then_some(Histogram { buckets })
    }

    /// Observations in all.
    pub fn count(&self) -> u64 {
        self.buckets.last().map_or(0, |&(_, count)| count)
    }

    /// The index of the bucket holding the `p` quantile (0..=1): the first
    /// whose cumulative count reaches `p` of the total, by nearest rank.
    pub fn quantile_bucket(&self, p: f64) -> Option<usize> {
        let count = self.count();
        if count == 0 {
            return None;
        }
        let rank = ((p * count as f64).ceil() as u64).clamp(1, count);
        self.buckets
            .iter()
            .position(|&(_, cumulative)| cumulative >= rank)
    }

    /// The index of the bucket a value of `seconds` falls in.
    pub fn bucket_of(&self, seconds: f64) -> usize {
        self.buckets
            .iter()
            .position(|&(bound, _)| seconds <= bound)
            .unwrap_or(self.buckets.len().saturating_sub(1))
    }

    /// The bucket's bounds `(above, up to)` in seconds.
    pub fn bounds(&self, index: usize) -> (f64, f64) {
        let low = index
            .checked_sub(1)
            .and_then(|i| self.buckets.get(i))
            .map_or(0.0, |&(bound, _)| bound);
        let high = self.buckets.get(index).map_or(f64::INFINITY, |&(b, _)| b);
        (low, high)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = "\
# HELP event_processor_commit_to_durable_seconds x
# TYPE event_processor_commit_to_durable_seconds histogram
event_processor_commit_to_durable_seconds_sum 1.5
event_processor_commit_to_durable_seconds_count 10
event_processor_commit_to_durable_seconds_bucket{le=\"0.001\"} 0
event_processor_commit_to_durable_seconds_bucket{le=\"0.01\"} 4
event_processor_commit_to_durable_seconds_bucket{le=\"0.1\"} 9
event_processor_commit_to_durable_seconds_bucket{le=\"+Inf\"} 10
event_processor_batch_size_bucket{le=\"1.0\"} 3
";

    #[test]
    fn reads_the_buckets_and_finds_the_quantiles() {
        let histogram =
            Histogram::parse(TEXT, "event_processor_commit_to_durable_seconds").expect("parsed");
        assert_eq!(histogram.buckets.len(), 4);
        assert_eq!(histogram.count(), 10);
        assert_eq!(histogram.quantile_bucket(0.4), Some(1));
        assert_eq!(histogram.quantile_bucket(0.5), Some(2));
        assert_eq!(histogram.quantile_bucket(0.99), Some(3));
        assert_eq!(histogram.bucket_of(0.005), 1);
        assert_eq!(histogram.bucket_of(0.01), 1);
        assert_eq!(histogram.bucket_of(5.0), 3);
        assert_eq!(histogram.bounds(1), (0.001, 0.01));
        assert_eq!(histogram.bounds(0), (0.0, 0.001));
        assert!(Histogram::parse(TEXT, "event_processor_nothing").is_none());
    }
}
