//! `event-processor-bench` end to end on the real services, at a small size:
//! every stage runs, every figure is there and sane, the ratios are the
//! quotients of their figures, the charts are written, `--compare` reads an
//! earlier file, and bad arguments are refused. (How fast things are is the
//! benchmark's business, never a test's: nothing here asserts a speed.)
//!
//! The processes it measures are the product's `event-processor` binary,
//! found in the shared target folder (`cargo test --workspace` builds it).

use activity_event_bench::report::Results;
use std::path::{Path, PathBuf};

/// A variable `scripts/services.sh up` exports.
fn service_env(key: &str) -> String {
    std::env::var(key).unwrap_or_else(|_| {
        panic!(
            "{key} is not set: this test needs the real services. Start them with\n    \
             eval \"$(scripts/services.sh up)\"\n(or run the whole suite with scripts/test.sh)"
        )
    })
}

/// The product's binary, beside the benchmark's in the target folder.
fn processor_binary() -> String {
    let path =
        Path::new(env!("CARGO_BIN_EXE_event-processor-bench")).with_file_name("event-processor");
    assert!(
        path.is_file(),
        "{} is missing: build it with `cargo build --workspace` (or run `cargo test --workspace`)",
        path.display()
    );
    path.to_string_lossy().to_string()
}

fn env() -> Vec<(&'static str, String)> {
    vec![
        ("POSTGRES_HOST", service_env("POSTGRES_HOST")),
        ("POSTGRES_PORT", service_env("POSTGRES_PORT")),
        ("POSTGRES_DB", "postgres".to_string()),
        (
            "POSTGRES_USER",
            std::env::var("POSTGRES_USER").unwrap_or_else(|_| "postgres".into()),
        ),
        ("MONGODB_URI", service_env("MONGODB_URI")),
        ("KAFKA_BROKERS", service_env("KAFKA_BROKERS")),
        ("LOG_LEVEL", "warn".to_string()),
        ("EVENT_PROCESSOR_BIN", processor_binary()),
    ]
}

/// Runs the benchmark's binary with `env` added to a clean environment.
fn run_bench(args: &[&str], env: &[(&str, String)]) -> std::process::Output {
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_event-processor-bench"));
    command.args(args).env_clear();
    for key in ["PATH", "HOME"] {
        if let Ok(value) = std::env::var(key) {
            command.env(key, value);
        }
    }
    for (key, value) in env {
        command.env(key, value);
    }
    // No `.env` of the developer's may leak in.
    command.current_dir(std::env::temp_dir());
    command.output().expect("run event-processor-bench")
}

/// A fresh output folder, removed when dropped.
fn out_dir(name: &str) -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix(&format!("aep-bench-{name}-"))
        .tempdir()
        .expect("out dir")
}

/// The one result file in `dir`.
fn result_file(dir: &Path) -> PathBuf {
    let files: Vec<PathBuf> = std::fs::read_dir(dir)
        .expect("read out dir")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .collect();
    assert_eq!(
        files.len(),
        1,
        "one result file in {}: {files:?}",
        dir.display()
    );
    files[0].clone()
}

fn figure(results: &Results, id: &str) -> f64 {
    let value = results
        .get(id)
        .unwrap_or_else(|| panic!("figure {id} missing; figures: {:#?}", results.figures));
    assert!(value.is_finite() && value > 0.0, "{id} = {value}");
    value
}

#[test]
fn bench_measures_every_stage_and_writes_its_results() {
    let dir = out_dir("full");
    let out = dir.path().to_string_lossy().to_string();
    let output = run_bench(
        &[
            "--events",
            "3000",
            "--sink-events",
            "2000",
            "--backlog",
            "6000",
            "--latency-seconds",
            "3",
            "--out",
            &out,
        ],
        &env(),
    );
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "bench failed: {}\nstdout:\n{stdout}\nstderr:\n{stderr}",
        output.status
    );
    let path = result_file(dir.path());
    let results: Results = serde_json::from_slice(&std::fs::read(&path).expect("read results"))
        .expect("parse results");
    assert!(results.skipped.is_empty(), "skipped: {:?}", results.skipped);

    for id in [
        "load.copy.rows_per_s",
        "capture.peek.events_per_s",
        "capture.recvlogical.events_per_s",
        "capture.ours.events_per_s",
        "capture.ours.cpu_us_per_event",
        "capture.no_metrics.events_per_s",
        "capture.no_metrics.cpu_us_per_event",
        "polling.claim.events_per_s",
        "polling.ordered_claim.events_per_s",
        "polling.w1.events_per_s",
        "polling.w2.events_per_s",
        "polling.w4.events_per_s",
        "sink.raw_upserts.docs_per_s",
        "e2e.events_per_s",
        "e2e.round_trips_per_event",
        "e2e.docs_per_event",
        "e2e.fold_docs_per_event",
        "e2e.docs_vs_fold",
        "latency.p50_ms",
        "memory.backlog.peak_rss_mb",
        "memory.e2e.peak_rss_mb",
        "kafka.relay.events_per_s",
        "kafka.relay.stage.source_ms_per_batch",
        "kafka.relay.stage.write_ms_per_batch",
        "kafka.relay.stage.mark_ms_per_batch",
        "kafka.relay_unmarked.events_per_s",
        "kafka.relay.machine_cpu_us_per_event",
        "kafka.produce.machine_cpu_us_per_event",
        "kafka.produce.msgs_per_s",
        "kafka.produce.before.msgs_per_s",
        "kafka.produce.after.msgs_per_s",
        "kafka.source.events_per_s",
        "kafka.consume.msgs_per_s",
    ] {
        figure(&results, id);
    }
    // Ratios are the quotients of the figures they name.
    for (ratio, numerator, denominator) in [
        (
            "capture.ours_vs_recvlogical",
            "capture.ours.events_per_s",
            "capture.recvlogical.events_per_s",
        ),
        (
            "capture.metrics_vs_none",
            "capture.ours.events_per_s",
            "capture.no_metrics.events_per_s",
        ),
        // Counted under callgrind (scripts/setup.sh --tests installs valgrind).
        (
            "capture.instructions_vs_recvlogical",
            "capture.ours.instructions_per_event",
            "capture.recvlogical.instructions_per_event",
        ),
        (
            "polling.w4_vs_claim",
            "polling.w4.events_per_s",
            "polling.claim.events_per_s",
        ),
        (
            "polling.ordered_vs_plain",
            "polling.ordered_claim.events_per_s",
            "polling.claim.events_per_s",
        ),
        (
            "polling.w2_vs_w1",
            "polling.w2.events_per_s",
            "polling.w1.events_per_s",
        ),
        ("e2e.vs_limit", "e2e.events_per_s", "e2e.limit"),
        (
            "e2e.vs_fold_writes",
            "e2e.events_per_s",
            "e2e.fold_writes_limit",
        ),
        (
            "e2e.docs_vs_fold",
            "e2e.docs_per_event",
            "e2e.fold_docs_per_event",
        ),
        (
            "kafka.relay_vs_produce",
            "kafka.relay.events_per_s",
            "kafka.produce.msgs_per_s",
        ),
        (
            "kafka.relay_unmarked_vs_produce",
            "kafka.relay_unmarked.events_per_s",
            "kafka.produce.msgs_per_s",
        ),
        (
            "kafka.source_vs_consume",
            "kafka.source.events_per_s",
            "kafka.consume.msgs_per_s",
        ),
    ] {
        let expected = figure(&results, numerator) / figure(&results, denominator);
        let actual = figure(&results, ratio);
        assert!(
            (actual - expected).abs() < 1e-9 * expected,
            "{ratio}: {actual} != {expected}"
        );
    }
    // The end-to-end limit is the slowest of the limits measured.
    let limit = figure(&results, "e2e.limit");
    for id in [
        "capture.peek.events_per_s",
        "capture.recvlogical.events_per_s",
        "sink.raw_upserts.docs_per_s",
    ] {
        assert!(limit <= figure(&results, id), "limit {limit} above {id}");
    }
    let p: Vec<f64> = ["p50", "p95", "p99", "max"]
        .iter()
        .map(|name| figure(&results, &format!("latency.{name}_ms")))
        .collect();
    assert!(
        p.windows(2).all(|w| w[0] <= w[1]),
        "percentiles out of order: {p:?}"
    );
    // Every offered event was measured, once.
    let offered = figure(&results, "latency.samples");
    assert!(offered >= 3.0, "latency samples {offered}");
    // The processor's own histogram saw the same events, and its quantile
    // buckets are found.
    assert_eq!(figure(&results, "latency.metrics_samples"), offered);
    for id in [
        "latency.metrics_p50_bucket_ms",
        "latency.metrics_p99_bucket_ms",
    ] {
        assert!(figure(&results, id) > 0.0, "{id}");
    }
    let distance = results
        .get("latency.metrics_bucket_distance")
        .expect("latency.metrics_bucket_distance");
    assert!(distance >= 0.0 && distance.fract() == 0.0, "{distance}");
    // The end-to-end run's time, stage by stage: the sink's reads and writes
    // and the checkpoint take time on every batch.
    for name in ["source", "load", "write", "checkpoint"] {
        figure(&results, &format!("e2e.stage.{name}_ms_per_batch"));
    }
    let docs = figure(&results, "e2e.docs_per_event");
    assert!((0.1..5.0).contains(&docs), "documents per event {docs}");
    // The fold's writes are its minimum, upserted raw: their documents per
    // event are the minimum's, and their rate is what the limit divides.
    let fold = figure(&results, "e2e.fold_docs_per_event");
    let limit = figure(&results, "e2e.fold_writes_limit");
    let fold_docs = figure(&results, "sink.fold_writes.docs_per_s");
    assert!(
        (fold_docs / limit - fold).abs() < 1e-9 * fold,
        "{fold_docs} docs/s over {limit} events/s is not {fold} docs per event"
    );
    let rss = figure(&results, "memory.backlog.peak_rss_mb");
    assert!((1.0..2048.0).contains(&rss), "peak RSS {rss} MB");

    let machine = &results.machine;
    assert!(
        machine.cores >= 1 && machine.memory_bytes > 0,
        "{machine:?}"
    );
    assert!(
        machine
            .postgres_version
            .starts_with(|c: char| c.is_ascii_digit()),
        "{machine:?}"
    );
    assert!(!machine.git_commit.is_empty());
    // capture, metrics cost, polling order, polling workers, end to end
    // (against the capture and raw sink limits; against this history's),
    // round trips, documents vs the fold, latency, /metrics buckets, relay,
    // backlog RSS;
    // the kafka source's once its rate after the group join is measured
    // (a run this small may be done within its first batch).
    let joined = results.get("kafka.source_steady_vs_consume").is_some();
    assert_eq!(
        results.targets.len(),
        12 + usize::from(joined),
        "{:?}",
        results.targets
    );
    let goals: Vec<&str> = results.targets.iter().map(|t| t.goal.as_str()).collect();
    assert!(goals.contains(&"relay >= 0.8x raw produce"), "{goals:?}");
    assert!(stdout.contains("targets"), "{stdout}");
    assert!(stdout.contains("3 our capture"), "{stdout}");

    let stem = path.with_extension("");
    for chart in ["latency", "throughput"] {
        let svg_path = PathBuf::from(format!("{}-{chart}.svg", stem.display()));
        let svg = std::fs::read_to_string(&svg_path)
            .unwrap_or_else(|e| panic!("{}: {e}", svg_path.display()));
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
    }

    // --compare: a quick second run shows the change against the first.
    let again = out_dir("again");
    let output = run_bench(
        &[
            "--events",
            "500",
            "--skip",
            "capture,polling,sink,end-to-end,latency,memory,kafka",
            "--out",
            &again.path().to_string_lossy(),
            "--compare",
            &path.to_string_lossy(),
        ],
        &env(),
    );
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        stdout.contains("earlier") && stdout.contains('%'),
        "{stdout}"
    );
}

#[test]
fn bench_refuses_bad_arguments_before_touching_anything() {
    let dir = out_dir("bad");
    let out = dir.path().to_string_lossy().to_string();
    let output = run_bench(&["--skip", "warp-drive", "--out", &out], &env());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("`warp-drive` is not a stage"), "{stderr}");

    let missing = dir.path().join("nope.json");
    let output = run_bench(
        &["--compare", &missing.to_string_lossy(), "--out", &out],
        &env(),
    );
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("cannot read") && stderr.contains("nope.json"),
        "{stderr}"
    );
    // Nothing was written.
    let written: Vec<_> = std::fs::read_dir(dir.path()).expect("dir").collect();
    assert!(written.is_empty(), "{written:?}");
}
