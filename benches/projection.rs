//! The projection against the live MongoDB-wire server, beside that server's
//! own limit measured in the same run:
//!
//! 1. raw batched upserts (500 per `update` command) of as many documents as
//!    the projection writes: the sink limit, docs/s;
//! 2. a realistic generated history projected in batches of 1000: events/s,
//!    MongoDB round trips per event and documents written per event.
//!
//! ```sh
//! eval "$(scripts/services.sh up mongo)"
//! cargo bench --bench projection                    # 20000 events
//! PROJECTION_BENCH_EVENTS=100000 cargo bench --bench projection
//! ```
//! Under `cargo test --all-targets` it runs as a quick smoke test.

use activity_event_history::{generate, HistoryOptions};
use activity_event_processor::projection::Projector;
use activity_event_processor::store::mongo::MongoStore;
use mongodb::bson::doc;
use std::time::Instant;

fn main() {
    let benchmarking = std::env::args().any(|a| a == "--bench");
    let events: usize = std::env::var("PROJECTION_BENCH_EVENTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(if benchmarking { 20_000 } else { 300 });
    let uri = std::env::var("MONGODB_URI").unwrap_or_else(|_| {
        panic!("MONGODB_URI is not set: start the server with\n    eval \"$(scripts/services.sh up mongo)\"")
    });
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(run(&uri, events));
}

async fn run(uri: &str, events: usize) {
    let name = format!("aep_bench_{}", std::process::id());
    let store = MongoStore::connect(uri, &name).await.expect("connect");
    store.ensure_indexes().await.expect("indexes");
    let history = generate(2024, &HistoryOptions::realistic(events));
    let projector = Projector::new(store.clone());

    let started = Instant::now();
    let (mut trips, mut written) = (0u64, 0u64);
    for batch in history.chunks(1000) {
        let report = projector.apply(batch).await.expect("projection");
        trips += u64::from(report.round_trips);
        written += report.documents_written;
    }
    let projection = started.elapsed().as_secs_f64();

    // The sink limit: the same number of documents, upserted raw, 500 a command.
    let docs = written.max(1) as usize;
    let started = Instant::now();
    let ids: Vec<String> = (0..docs).map(|i| format!("raw-{i}")).collect();
    for chunk in ids.chunks(500) {
        let statements = chunk
            .iter()
            .map(|id| {
                doc! {
                    "q": { "_id": id },
                    "u": { "$set": { "title": "raw upsert", "capacity": 5, "status": "open" } },
                    "upsert": true,
                }
            })
            .collect();
        store
            .update("raw_upserts", statements, false)
            .await
            .expect("raw upserts");
    }
    let raw = started.elapsed().as_secs_f64();
    let _ = store.database().drop().await;

    let events_per_s = events as f64 / projection;
    let raw_docs_per_s = docs as f64 / raw;
    let docs_per_event = written as f64 / events as f64;
    println!("projection of {events} events into the MongoDB-wire server at {uri}");
    println!("  raw batched upserts (sink limit): {raw_docs_per_s:>10.0} docs/s");
    println!(
        "  projection:                       {events_per_s:>10.0} events/s ({:.0} docs/s)",
        written as f64 / projection
    );
    println!(
        "  ratio to the sink limit:          {:>10.2} (in documents written: {:.2})",
        events_per_s / raw_docs_per_s,
        (written as f64 / projection) / raw_docs_per_s
    );
    println!(
        "  round trips per event:            {:>10.4}",
        trips as f64 / events as f64
    );
    println!("  documents written per event:      {docs_per_event:>10.3}");
}
