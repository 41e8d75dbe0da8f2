//! The ownership of a replication slot under network faults, with two `run`
//! processes on one slot under a writer: the owner cut off by a partition
//! (a blackholing proxy between it and PostgreSQL), PostgreSQL restarting,
//! and the owner's lock session or walsender terminated by the server. A
//! watch samples PostgreSQL every 100 ms for which process holds the lock and
//! which streams the slot; every run ends with the read models equal to the
//! reference fold and every outbox row finished.

mod common;

use activity_event_history::{generate, HistoryOptions};
use activity_event_processor::decode::OutboxEvent;
use common::faults::{
    line_count, lines_with, log_path, logged_at, longest_unowned_streaming, spawn_run, streamers,
    wait_finished, wait_for_line, write_slowly, write_through_restarts, OwnershipWatch,
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

/// Two processes, each through a proxy of its own that only passes bytes
/// (so that the server's view of a connection tells which process it is).
struct Pair {
    a: kafka::Proc,
    b: kafka::Proc,
    a_log: std::path::PathBuf,
    b_log: std::path::PathBuf,
    watch: OwnershipWatch,
}

async fn start_pair(stage: &Stage, host: &str, port: &str) -> Pair {
    let (pa, pb) = (
        Arc::new(Proxy::start(socket_addr(host, port))),
        Arc::new(Proxy::start(socket_addr(host, port))),
    );
    let (a_log, b_log) = (stage.log_path(), log_path(stage, "b"));
    let a = spawn_run(
        stage,
        &[],
        &[("POSTGRES_PORT", pa.port().to_string())],
        &a_log,
    );
    let b = spawn_run(
        stage,
        &[],
        &[("POSTGRES_PORT", pb.port().to_string())],
        &b_log,
    );
    let watch = OwnershipWatch::start(
        stage.pg.config.clone(),
        &stage.slot,
        vec![("a", pa), ("b", pb)],
        None,
    );
    watch
        .wait_for("one of them streams", Instant::now(), LIMIT, |s| {
            s.streamer.is_some() && s.streamer == s.holder
        })
        .await;
    Pair {
        a,
        b,
        a_log,
        b_log,
        watch,
    }
}

impl Pair {
    /// Which processes logged that they stream, after the first `skip` lines
    /// of each log.
    fn logged_streaming(&self, skip: (usize, usize)) -> Vec<&'static str> {
        let mut who = Vec::new();
        if !lines_with(&self.a_log, "replication streaming", skip.0).is_empty() {
            who.push("a");
        }
        if !lines_with(&self.b_log, "replication streaming", skip.1).is_empty() {
            who.push("b");
        }
        who
    }

    fn lines(&self) -> (usize, usize) {
        (line_count(&self.a_log), line_count(&self.b_log))
    }

    fn tails(&self) -> String {
        format!(
            "--- a ---\n{}\n--- b ---\n{}",
            kafka::tail(&self.a_log),
            kafka::tail(&self.b_log)
        )
    }

    async fn finish(mut self, stage: &Stage, history: &[OutboxEvent]) {
        stage.wait_converged(history, LIMIT).await;
        wait_finished(stage, LIMIT, &self.a_log).await;
        stage.assert_converged(history, true).await;
        let tails = self.tails();
        let samples = self.watch.stop().await;
        let unowned = longest_unowned_streaming(&samples);
        eprintln!("longest streaming without the lock: {unowned:?}");
        assert!(unowned < Duration::from_secs(3), "{unowned:?}\n{tails}");
        for child in [&mut self.a, &mut self.b] {
            assert!(
                child.0.try_wait().expect("wait").is_none(),
                "a process exited\n{tails}"
            );
            terminate(child, Duration::from_secs(20));
        }
        for log in [&self.a_log, &self.b_log] {
            let _ = std::fs::remove_file(log);
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn after_postgres_restarts_exactly_one_of_two_processes_captures() {
    let services = OwnServices::up(&["pg", "mongo"]);
    let (host, port) = (services.get("POSTGRES_HOST"), services.get("POSTGRES_PORT"));
    let stage = Stage::on(&services).await;
    let _slots = kafka::Slots(stage.pg.config.clone());
    let history = generate(5152, &HistoryOptions::realistic(2_000));
    let (first, rest) = history.split_at(500);
    stage.load(first).await;
    let pair = start_pair(&stage, &host, &port).await;
    stage.wait_converged(first, LIMIT).await;
    let restart = async {
        tokio::time::sleep(Duration::from_secs(2)).await;
        // Counted before the restart: a process may reconnect and log before
        // the restart command returns.
        let lines = pair.lines();
        tokio::task::block_in_place(|| services.control(&["pg-restart", "immediate"]));
        (Instant::now(), lines)
    };
    let (_, (restarted, lines)) = tokio::join!(
        write_through_restarts(&stage, rest, 10, Duration::from_millis(100)),
        restart
    );
    stage.wait_converged(&history, LIMIT).await;
    let after: Vec<_> = pair
        .watch
        .samples()
        .into_iter()
        .filter(|s| s.at >= restarted)
        .collect();
    let seen = streamers(&after);
    eprintln!("after the restart, streaming: {seen:?}");
    assert_eq!(seen.len(), 1, "{seen:?}\n{}", pair.tails());
    let logged = pair.logged_streaming(lines);
    assert_eq!(logged.len(), 1, "{logged:?}\n{}", pair.tails());
    pair.finish(&stage, &history).await;
}

/// Terminates the server process that `sql` finds for `slot`; its pid.
async fn terminate_backend(stage: &Stage, sql: &str) -> i32 {
    let row = stage
        .pg
        .client()
        .await
        .query_one(sql, &[&stage.slot])
        .await
        .expect("find the backend");
    let (pid, done): (i32, bool) = (row.get(0), row.get(1));
    assert!(done, "pg_terminate_backend({pid}) failed");
    pid
}

const LOCK_SESSION: &str = "SELECT l.pid, pg_terminate_backend(l.pid) FROM pg_locks l \
     WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 2 \
       AND l.classid = hashtext('activity-event-processor:slot')::oid \
       AND l.objid = hashtext($1)::oid";

const WALSENDER: &str = "SELECT active_pid, pg_terminate_backend(active_pid) \
     FROM pg_replication_slots WHERE slot_name = $1 AND active_pid IS NOT NULL";

#[tokio::test(flavor = "multi_thread")]
async fn terminating_the_owners_lock_session_or_walsender_loses_nothing() {
    let stage = Stage::new().await;
    let _slots = kafka::Slots(stage.pg.config.clone());
    let pg = stage.pg.config.clone();
    let history = generate(5153, &HistoryOptions::realistic(2_000));
    let (first, rest) = history.split_at(500);
    stage.load(first).await;
    let pair = start_pair(&stage, &pg.host, &pg.port.to_string()).await;
    stage.wait_converged(first, LIMIT).await;
    let streams_again = |s: &common::faults::Sample| s.streamer.is_some() && s.streamer == s.holder;
    let faults = async {
        tokio::time::sleep(Duration::from_secs(2)).await;
        // The lock session alone: its process stops streaming, and one of
        // the two takes the slot.
        let before = pair.watch.samples().last().and_then(|s| s.holder.clone());
        let at = Instant::now();
        let pid = terminate_backend(&stage, LOCK_SESSION).await;
        let again = pair
            .watch
            .wait_for("a process owns and streams again", at, LIMIT, |s| {
                streams_again(s) && s.at >= at + Duration::from_millis(200)
            })
            .await;
        eprintln!(
            "lock session {pid} of {before:?} terminated: {:?} streamed again {:?} later",
            again.streamer,
            again.at - at
        );
        tokio::time::sleep(Duration::from_secs(2)).await;
        // The walsender alone: the owner keeps the lock and streams again.
        let owner = pair.watch.samples().last().and_then(|s| s.holder.clone());
        let at = Instant::now();
        let pid = terminate_backend(&stage, WALSENDER).await;
        let again = pair
            .watch
            .wait_for("the owner streams again", at, LIMIT, |s| {
                streams_again(s) && s.at >= at + Duration::from_millis(200)
            })
            .await;
        eprintln!(
            "walsender {pid} of {owner:?} terminated: {:?} streamed again {:?} later",
            again.streamer,
            again.at - at
        );
        assert_eq!(
            again.streamer,
            owner,
            "the ownership moved\n{}",
            pair.tails()
        );
    };
    tokio::join!(
        write_slowly(&stage, rest, 10, Duration::from_millis(100)),
        faults
    );
    pair.finish(&stage, &history).await;
}
