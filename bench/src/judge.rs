//! The bench's verdict: each target the issues name, met or missed, from
//! the figures of one run.

use super::*;

impl Bench {
    /// Targets of the issue, met or missed.
    pub(super) fn judge(&mut self) {
        let r = &self.results;
        let mut targets = Vec::new();
        if let Some(rate) = r.get("capture.ours_vs_recvlogical") {
            // With few events pg_recvlogical may use less CPU than the
            // kernel's accounting can see; the target is then not met,
            // and says why.
            let (cpu, met) = match r.get("capture.cpu_vs_recvlogical") {
                Some(cpu) => (format!("{cpu:.2}x CPU/event"), cpu <= 1.0),
                None => ("pg_recvlogical's CPU too small to measure".into(), false),
            };
            let instructions = r
                .get("capture.instructions_vs_recvlogical")
                .map(|x| format!(", {x:.2}x instructions/event"))
                .unwrap_or_default();
            targets.push((
                "capture >= 0.95x pg_recvlogical events/s, CPU/event <= its",
                format!("{rate:.2}x events/s, {cpu}{instructions}"),
                rate >= 0.95 && met,
            ));
        }
        if let Some(ratio) = r.get("capture.metrics_vs_none") {
            targets.push((
                "metrics cost < 3% of capture events/s",
                format!("{:.1}% ({ratio:.3}x)", (1.0 - ratio) * 100.0),
                ratio > 0.97,
            ));
        }
        if let Some(distance) = r.get("latency.metrics_bucket_distance") {
            targets.push((
                "bench latency p50/p99 within one /metrics bucket",
                format!("{distance:.0} bucket(s) apart"),
                distance <= 1.0,
            ));
        }
        if let Some(ratio) = r.get("e2e.vs_limit") {
            targets.push((
                "end to end >= 0.8x min(capture limit, sink limit)",
                format!("{ratio:.2}x"),
                ratio >= 0.8,
            ));
        }
        if let (Some(history), Some(raw)) = (r.get("e2e.vs_fold_writes"), r.get("e2e.vs_limit")) {
            targets.push((
                "end to end >= 0.8x the sink limit for this history, >= 0.5x raw upserts",
                format!("{history:.2}x; {raw:.2}x"),
                history >= 0.8 && raw >= 0.5,
            ));
        }
        if let Some(trips) = r.get("e2e.round_trips_per_event") {
            targets.push((
                "MongoDB round trips <= 0.01 per event",
                format!("{trips:.4}"),
                trips <= 0.01,
            ));
        }
        if let (Some(p50), Some(p99)) = (r.get("latency.p50_ms"), r.get("latency.p99_ms")) {
            targets.push((
                "commit-to-read-model p50 < 15 ms, p99 < 50 ms at 50% load",
                format!("{p50:.1} ms; {p99:.1} ms"),
                p50 < 15.0 && p99 < 50.0,
            ));
        }
        if let Some(ratio) = r.get("kafka.relay_vs_produce") {
            let unmarked = r
                .get("kafka.relay_unmarked_vs_produce")
                .map_or(String::new(), |u| {
                    format!(" ({u:.2}x with MARK_PROCESSED=false)")
                });
            targets.push((
                "relay >= 0.8x raw produce",
                format!("{ratio:.2}x{unmarked}"),
                ratio >= 0.8,
            ));
        }
        if let (Some(joining), Some(joined)) = (
            r.get("kafka.source_vs_group_consume"),
            r.get("kafka.source_steady_vs_consume"),
        ) {
            targets.push((
                "kafka source >= 0.8x raw consume (joining a fresh group; once joined)",
                format!("{joining:.2}x; {joined:.2}x"),
                joining >= 0.8 && joined >= 0.8,
            ));
        }
        if let Some(rss) = r.get("memory.backlog.peak_rss_mb") {
            targets.push((
                "peak RSS < 150 MB draining the backlog",
                format!("{rss:.1} MB"),
                rss < 150.0,
            ));
        }
        for (goal, actual, met) in targets {
            self.results.target(goal, actual, met);
        }
    }
}
