//! The capture paths under network faults, each through a TCP fault proxy
//! (`tests/common/proxy.rs`) while a writer loads events: 50 ms of latency,
//! two resets, a 5 s blackhole, then pass again, between the processor and
//! PostgreSQL (replication; polling with two workers), MongoDB (replication:
//! the slot never passes what MongoDB holds, and nothing is acknowledged
//! during the blackhole), and the Kafka broker (the relay and the kafka
//! source both through it). Each run must end with the read models equal to
//! the reference fold, nothing dead-lettered beyond the history's own poison,
//! and every outbox row finished, without a restart.

mod common;

use activity_event_history::{generate, HistoryOptions};
use common::faults::{
    confirmed_flush, mongo_checkpoint, play_faults, spawn_run, stop_gracefully,
    wait_converged_alive, wait_finished, write_slowly,
};
use common::kafka;
use common::pipeline::Stage;
use common::proxy::{mongodb_address, mongodb_uri_through, socket_addr, Mode, Proxy};
use common::services::OwnServices;
use std::time::{Duration, Instant};

const LIMIT: Duration = Duration::from_secs(90);

/// One capture path through a proxy to PostgreSQL.
async fn through_postgres(seed: u64, args: &[&str], check_outbox: bool) {
    let stage = Stage::new().await;
    let _slots = kafka::Slots(stage.pg.config.clone());
    let pg = &stage.pg.config;
    let proxy = Proxy::start(socket_addr(&pg.host, &pg.port.to_string()));
    let history = generate(seed, &HistoryOptions::realistic(1_500));
    let (first, rest) = history.split_at(300);
    stage.load(first).await;
    let log = stage.log_path();
    let via = [("POSTGRES_PORT", proxy.port().to_string())];
    let mut run = spawn_run(&stage, args, &via, &log);
    tokio::join!(
        write_slowly(&stage, rest, 10, Duration::from_millis(120)),
        play_faults(&proxy, "postgres")
    );
    wait_converged_alive(&stage, &history, &mut run, &log, LIMIT).await;
    wait_finished(&stage, LIMIT, &log).await;
    stage.assert_converged(&history, check_outbox).await;
    assert!(proxy.resets() >= 2, "{} connections reset", proxy.resets());
    eprintln!(
        "{args:?}: {} connections through the proxy, {} reset",
        proxy.accepted(),
        proxy.resets()
    );
    stop_gracefully(&mut run, &log);
    let _ = std::fs::remove_file(&log);
}

#[tokio::test(flavor = "multi_thread")]
async fn replication_through_latency_resets_and_a_blackhole_to_postgres() {
    through_postgres(6001, &[], true).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn polling_with_two_workers_through_latency_resets_and_a_blackhole_to_postgres() {
    through_postgres(6002, &["--source", "polling", "--workers", "2"], true).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn replication_through_latency_resets_and_a_blackhole_to_mongodb() {
    let stage = Stage::new().await;
    let _slots = kafka::Slots(stage.pg.config.clone());
    let proxy = Proxy::start(mongodb_address(&stage.mongo.uri));
    let uri = mongodb_uri_through(&stage.mongo.uri, &proxy);
    let history = generate(6003, &HistoryOptions::realistic(1_500));
    let (first, rest) = history.split_at(300);
    stage.load(first).await;
    // The slot and a checkpoint first (the position of a new slot is the
    // server's, not an acknowledgement): everything after streams.
    stage.run_until_caught_up(&[], &[], LIMIT);
    let log = stage.log_path();
    let mut run = spawn_run(&stage, &[], &[("MONGODB_URI", uri)], &log);
    // Every 200 ms: the slot, what MongoDB holds, and the proxy's mode.
    let sampling = async {
        let mut samples = Vec::new();
        let end = Instant::now() + Duration::from_secs(17);
        while Instant::now() < end {
            let slot = confirmed_flush(&stage, &stage.slot).await;
            let held = mongo_checkpoint(&stage, &stage.slot).await;
            samples.push((Instant::now(), proxy.mode(), slot, held));
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        samples
    };
    let (_, _, samples) = tokio::join!(
        write_slowly(&stage, rest, 10, Duration::from_millis(120)),
        play_faults(&proxy, "mongodb"),
        sampling
    );
    wait_converged_alive(&stage, &history, &mut run, &log, LIMIT).await;
    wait_finished(&stage, LIMIT, &log).await;
    stage.assert_converged(&history, true).await;
    for (_, mode, slot, held) in &samples {
        if let Some(slot) = slot {
            let held = held.unwrap_or(0);
            assert!(
                *slot <= held,
                "slot {slot:X} ahead of MongoDB {held:X} ({mode:?})"
            );
        }
    }
    // Nothing acknowledged while MongoDB could not be reached (after a
    // moment for an acknowledgement already on its way to PostgreSQL).
    let blackhole: Vec<_> = samples
        .iter()
        .filter(|(_, mode, _, _)| *mode == Mode::Blackhole)
        .collect();
    assert!(
        blackhole.len() >= 15,
        "{} samples in the blackhole",
        blackhole.len()
    );
    let settled = blackhole[0].0 + Duration::from_millis(500);
    let during: Vec<_> = blackhole.iter().filter(|s| s.0 >= settled).collect();
    assert!(
        during.iter().all(|s| s.2 == during[0].2),
        "the slot moved while MongoDB was unreachable: {:?}",
        during.iter().map(|s| s.2).collect::<Vec<_>>()
    );
    // And MongoDB was reached only through the proxy: its checkpoint stood still.
    assert!(
        during.iter().all(|s| s.3 == during[0].3),
        "the checkpoint moved while the proxy held everything: {:?}",
        during.iter().map(|s| s.3).collect::<Vec<_>>()
    );
    eprintln!(
        "mongodb: {} connections through the proxy, {} reset",
        proxy.accepted(),
        proxy.resets()
    );
    assert!(proxy.resets() >= 2, "{} connections reset", proxy.resets());
    stop_gracefully(&mut run, &log);
    let _ = std::fs::remove_file(&log);
}

#[tokio::test(flavor = "multi_thread")]
async fn relay_and_kafka_source_through_latency_resets_and_a_blackhole_to_the_broker() {
    // Clients go to the address the broker advertises: a broker of this
    // test's own advertises the proxy's.
    let proxy = Proxy::unrouted();
    let services = OwnServices::up_with(
        &["kafka"],
        &[("KAFKA_ADVERTISED_PORT", proxy.port().to_string())],
    );
    let broker = services.get("KAFKA_BROKERS");
    let (host, port) = broker.rsplit_once(':').expect("host:port");
    proxy.set_upstream(socket_addr(host, port));
    let brokers = proxy.address();
    let stage = Stage::new().await;
    let _slots = kafka::Slots(stage.pg.config.clone());
    let topic = kafka::fresh("faults");
    kafka::create_topic_at(&brokers, &topic, 2).await;
    assert_eq!(
        advertised_ports(&brokers),
        vec![proxy.port()],
        "the broker does not advertise the proxy"
    );
    let history = generate(6004, &HistoryOptions::realistic(1_500));
    let (first, rest) = history.split_at(300);
    stage.load(first).await;
    let mut env = kafka::kafka_env(&topic, &kafka::fresh("group"));
    env.retain(|(key, _)| *key != "KAFKA_BROKERS");
    env.push(("KAFKA_BROKERS", brokers.clone()));
    let (log, relay_log) = (
        stage.log_path(),
        stage.log_path().with_extension("relay.log"),
    );
    let mut consumer = spawn_run(&stage, &["--source", "kafka"], &env, &log);
    let mut relay_env = stage.env();
    relay_env.push(("LOG_LEVEL", "info".into()));
    relay_env.extend(env.iter().cloned());
    let mut relay = kafka::spawn(&["relay"], &relay_env, &relay_log);
    tokio::join!(
        write_slowly(&stage, rest, 10, Duration::from_millis(120)),
        play_faults(&proxy, "kafka")
    );
    wait_converged_alive(&stage, &history, &mut consumer, &log, LIMIT).await;
    // Every row relayed: the relay marks a row once the broker has it.
    wait_finished(&stage, LIMIT, &relay_log).await;
    stage.assert_converged(&history, false).await;
    assert!(
        relay.0.try_wait().expect("wait").is_none(),
        "the relay exited\n{}",
        kafka::tail(&relay_log)
    );
    assert!(proxy.resets() >= 2, "{} connections reset", proxy.resets());
    eprintln!(
        "kafka: {} connections through the proxy, {} reset",
        proxy.accepted(),
        proxy.resets()
    );
    stop_gracefully(&mut consumer, &log);
    stop_gracefully(&mut relay, &relay_log);
    for path in [&log, &relay_log] {
        let _ = std::fs::remove_file(path);
    }
}

/// The ports of the brokers the cluster at `brokers` advertises.
fn advertised_ports(brokers: &str) -> Vec<u16> {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    let consumer: BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .expect("metadata client");
    let metadata = consumer
        .fetch_metadata(None, Duration::from_secs(10))
        .expect("broker metadata");
    metadata
        .brokers()
        .iter()
        .map(|b| u16::try_from(b.port()).expect("a port"))
        .collect()
}
