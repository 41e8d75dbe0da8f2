//! The ownership of a replication slot under network faults, with two `run`
//! processes on one slot under a writer: the owner cut off by a partition
//! (a blackholing proxy between it and PostgreSQL). A watch samples
//! PostgreSQL every 100 ms for which process holds the lock and which streams
//! the slot; every run ends with the read models equal to the reference fold
//! and every outbox row finished.

mod common;

use activity_event_processor::history::{generate, HistoryOptions};
use common::faults::{
    line_count, lines_with, log_path, logged_at, longest_unowned_streaming, spawn_run, streamers,
    wait_finished, wait_for_line, write_slowly, OwnershipWatch,
};
use common::kafka::{self, kill_9, terminate};
use common::pipeline::Stage;
use common::proxy::{socket_addr, Mode, Proxy};
use common::services::OwnServices;
use std::sync::Arc;
use std::time::{Duration, Instant};

const LIMIT: Duration = Duration::from_secs(90);

fn is(name: &str) -> impl Fn(&Option<String>) -> bool + '_ {
    move |who| who.as_deref() == Some(name)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_partitioned_owner_is_replaced_and_stands_by_once_the_partition_heals() {
    let services = OwnServices::up(&["pg", "mongo"]);
    let (host, port) = (services.get("POSTGRES_HOST"), services.get("POSTGRES_PORT"));
    // The walsender of a partitioned owner holds the slot until this passes.
    let admin = common::connect(&common::postgres_config_at(&host, &port, "postgres")).await;
    for sql in [
        "ALTER SYSTEM SET wal_sender_timeout = '10s'",
        "SELECT pg_reload_conf()",
    ] {
        admin
            .batch_execute(sql)
            .await
            .expect("lower wal_sender_timeout");
    }
    let stage = Stage::on(&services).await;
    let _slots = kafka::Slots(stage.pg.config.clone());
    let proxy = Arc::new(Proxy::start(socket_addr(&host, &port)));
    let through = [("POSTGRES_PORT", proxy.port().to_string())];
    let history = generate(5150, &HistoryOptions::realistic(2_000));
    let (first, second, third) = (
        &history[..500],
        &history[500..1_000],
        &history[1_000..1_500],
    );
    stage.load(first).await;
    let (a_log, b_log) = (stage.log_path(), log_path(&stage, "b"));
    let mut a = spawn_run(&stage, &[], &through, &a_log);
    stage.wait_converged(first, LIMIT).await;
    let mut b = spawn_run(&stage, &[], &[], &b_log);
    wait_for_line(&b_log, "standing by to take over", 0, LIMIT).await;
    let watch = OwnershipWatch::start(
        stage.pg.config.clone(),
        &stage.slot,
        vec![("a", proxy.clone())],
        Some("b"),
    );
    watch
        .wait_for("a owns and streams", Instant::now(), LIMIT, |s| {
            is("a")(&s.holder) && is("a")(&s.streamer)
        })
        .await;

    // The partition: a reaches nothing, nothing reaches a.
    let (cut, cut_at, a_lines) = (Instant::now(), chrono::Utc::now(), line_count(&a_log));
    proxy.set(Mode::Blackhole);
    write_slowly(&stage, second, 50, Duration::from_millis(200)).await;
    let freed = watch
        .wait_for("the server frees a's lock", cut, LIMIT, |s| {
            !is("a")(&s.holder)
        })
        .await;
    let streams = watch
        .wait_for("b streams", cut, LIMIT, |s| is("b")(&s.streamer))
        .await;
    stage.wait_converged(&history[..1_000], LIMIT).await;
    let applied = cut.elapsed();
    let took_over = wait_for_line(&b_log, "took over the replication slot", 0, LIMIT).await;
    eprintln!(
        "partition of the owner: lock freed after {:?}, b took the lock {:?} and streamed {:?} \
         after the cut, and had applied the events written meanwhile {applied:?} after it",
        freed.at - cut,
        (logged_at(&took_over) - cut_at)
            .to_std()
            .unwrap_or_default(),
        streams.at - cut,
    );
    assert!(
        freed.at - cut < Duration::from_secs(20),
        "the lock was freed {:?} after the cut",
        freed.at - cut
    );
    let mut noticed = lines_with(&a_log, "slot ownership session is lost", a_lines);
    noticed.extend(lines_with(&a_log, "lost the ownership", a_lines));
    noticed.sort();
    assert!(
        !noticed.is_empty(),
        "a never noticed it lost the ownership\n{}",
        kafka::tail(&a_log)
    );
    eprintln!(
        "a noticed {:?} after the cut",
        (logged_at(&noticed[0]) - cut_at)
            .to_std()
            .unwrap_or_default()
    );

    // The partition heals: a must find b owning the slot and stand by.
    let (healed, a_lines) = (Instant::now(), line_count(&a_log));
    proxy.set(Mode::Pass);
    write_slowly(&stage, third, 50, Duration::from_millis(200)).await;
    stage.wait_converged(&history[..1_500], LIMIT).await;
    wait_for_line(&a_log, "owned by another process", a_lines, LIMIT).await;
    let after: Vec<_> = watch
        .samples()
        .into_iter()
        .filter(|s| s.at >= healed)
        .collect();
    assert_eq!(
        streamers(&after),
        ["b".to_string()].into(),
        "after the partition healed\n{}",
        kafka::tail(&a_log)
    );
    assert!(
        after.iter().all(|s| is("b")(&s.holder)),
        "b lost the lock after the heal"
    );

    // a stands by for real: b dies, a takes over and applies the rest.
    kill_9(&mut b);
    let killed = Instant::now();
    stage.load(&history[1_500..]).await;
    watch
        .wait_for("a streams again", killed, LIMIT, |s| is("a")(&s.streamer))
        .await;
    stage.wait_converged(&history, LIMIT).await;
    wait_finished(&stage, LIMIT, &a_log).await;
    stage.assert_converged(&history, true).await;
    let samples = watch.stop().await;
    let unowned = longest_unowned_streaming(&samples);
    eprintln!("longest streaming without the lock: {unowned:?}");
    assert!(unowned < Duration::from_secs(6), "{unowned:?}");
    terminate(&mut a, Duration::from_secs(20));
    for log in [&a_log, &b_log] {
        let _ = std::fs::remove_file(log);
    }
}
