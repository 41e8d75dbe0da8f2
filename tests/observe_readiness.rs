//! `/readyz` of a real `run`, one test per cause on the real services, for
//! the replication source and (where the cause applies) the polling source:
//! PostgreSQL's backends terminated again and again for a while, the
//! PostgreSQL server stopped and started again, the replication slot dropped
//! (again and again for a while), and a stall while a backlog grows (a lock
//! the outbox marks wait for). For each: events are written before, during
//! and after; `/readyz` turns 503 within 60 s naming the cause's check in its
//! JSON, 200 again once the cause is gone, and nothing is lost (the read
//! models equal the reference fold of the outbox, and every outbox row is
//! finished). The MongoDB cause is `tests/observe_run.rs`'s. A slot
//! PostgreSQL invalidated is no outage the processor rides out: it stops
//! with what to do, and the test does it as an operator would.

mod common;

use activity_event_history::{generate, HistoryOptions};
use activity_event_processor::config::PostgresConfig;
use activity_event_processor::decode::OutboxEvent;
use common::faults::{spawn_run, write_through_restarts};
use common::kafka::{self, Proc};
use common::observe::{scrape, served_at, sum_of, wait_ready, wait_unready};
use common::pipeline::Stage;
use common::services::OwnServices;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// `/readyz` must show a cause within this long, and its end too.
const READINESS: Duration = Duration::from_secs(60);
/// The longest wait for the read models to converge.
const LIMIT: Duration = Duration::from_secs(180);

/// A `run` of a stage, observed.
struct Running {
    run: Proc,
    addr: SocketAddr,
    log: PathBuf,
}

/// `run --source <source>` on `stage`, once `/readyz` says it is ready.
async fn start(stage: &Stage, source: &str, name: &str) -> Running {
    let log = stage.log_path().with_extension(format!("{name}.log"));
    let mut run = spawn_run(stage, &["--source", source], &[], &log);
    let addr = served_at(&log, &mut run).await;
    wait_ready(addr, READINESS).await;
    Running { run, addr, log }
}

impl Running {
    /// Waits for the read models of `history`, failing at once if the
    /// process exits meanwhile.
    async fn converged(&mut self, stage: &Stage, history: &[OutboxEvent]) {
        common::faults::wait_converged_alive(stage, history, &mut self.run, &self.log, LIMIT).await;
    }

    fn tail(&self) -> String {
        kafka::tail(&self.log)
    }
}

/// A history in three parts: before, during and after the outage.
fn history(seed: u64) -> (Vec<OutboxEvent>, usize, usize) {
    let history = generate(seed, &HistoryOptions::realistic(1_500));
    let (a, b) = (history.len() / 3, 2 * history.len() / 3);
    (history, a, b)
}

/// The admin connection's config of the cluster `stage` is on.
fn admin_of(stage: &Stage) -> PostgresConfig {
    let mut admin = stage.pg.config.clone();
    admin.database = "postgres".into();
    admin
}

/// Runs `sql` every `every` on a connection to `admin` (made again when
/// lost) until `stop`; errors are ignored (the cause may race the process).
async fn again_and_again(
    admin: PostgresConfig,
    statements: Vec<String>,
    params: Vec<String>,
    every: Duration,
    stop: CancellationToken,
) -> u64 {
    let mut done = 0;
    let mut client: Option<tokio_postgres::Client> = None;
    while !stop.is_cancelled() {
        if client
            .as_ref()
            .is_none_or(tokio_postgres::Client::is_closed)
        {
            client = activity_event_processor::outbox::connect(&admin).await.ok();
            if let Some(c) = &client {
                let _ = c
                    .batch_execute("SET application_name = 'aep-test-cause'")
                    .await;
            }
        }
        if let Some(c) = &client {
            for sql in &statements {
                let params: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> = params
                    .iter()
                    .map(|p| p as &(dyn tokio_postgres::types::ToSql + Sync))
                    .collect();
                if let Ok(rows) = c.query(sql.as_str(), &params).await {
                    done += rows.len() as u64;
                }
            }
        }
        tokio::select! {
            _ = stop.cancelled() => {}
            _ = tokio::time::sleep(every) => {}
        }
    }
    done
}

/// Plays an outage: `cause` starts it, events `during` are written
/// meanwhile, and once `/readyz` is 503 naming one of `names` (and at least
/// `lasting` has passed), `remove` ends it (a future runs only when
/// awaited); then `/readyz` must be 200 again. Returns the failing check
/// seen and its reason.
async fn outage<C, R>(
    stage: &Stage,
    running: &Running,
    during: &[OutboxEvent],
    names: &[&str],
    lasting: Duration,
    cause: C,
    remove: R,
) -> (String, String)
where
    C: std::future::Future<Output = ()>,
    R: std::future::Future<Output = ()>,
{
    let began = Instant::now();
    cause.await;
    let writer = write_through_restarts(stage, during, 25, Duration::from_millis(150));
    let watch = async {
        let (took, name, reason) = wait_unready(running.addr, names, READINESS).await;
        eprintln!("/readyz 503 naming {name} after {took:?}: {reason}");
        let rest = lasting.saturating_sub(began.elapsed());
        tokio::time::sleep(rest).await;
        remove.await;
        let took = wait_ready(running.addr, READINESS).await;
        eprintln!("/readyz 200 again {took:?} after the cause was removed");
        (name, reason)
    };
    // The writer goes on through the outage, and past it if it must.
    let ((), seen) = tokio::join!(writer, watch);
    seen
}

/// After the outage: the rest of the history is written, the read models
/// converge, the process is stopped and every outbox row is finished.
async fn finish(stage: &Stage, mut running: Running, history: &[OutboxEvent], after: usize) {
    stage.load(&history[after..]).await;
    running.converged(stage, history).await;
    assert!(
        running.run.0.try_wait().expect("wait").is_none(),
        "{}",
        running.tail()
    );
    // The marks follow the effects: every row finished, the process alive.
    common::faults::wait_finished(stage, LIMIT, &running.log).await;
    let log = running.log.clone();
    drop(running);
    stage.assert_converged(history, true).await;
    let _ = std::fs::remove_file(log);
}

/// `retries_total` of `components` with a class among `classes`.
fn retries(samples: &BTreeMap<String, f64>, components: &[&str], classes: &[&str]) -> f64 {
    sum_of(samples, "event_processor_retries_total", |labels| {
        components
            .iter()
            .any(|c| labels.contains(&format!("component=\"{c}\"")))
            && classes
                .iter()
                .any(|c| labels.contains(&format!("class=\"{c}\"")))
    })
}

// --- PostgreSQL's backends terminated -----------------------------------------------

/// Every connection the processor has to the stage's database (the
/// walsender, the slot ownership session, the samplers', the marks'),
/// terminated every 100 ms for 20 s, while events are written.
async fn backends_terminated(source: &str, seed: u64, names: &[&str]) {
    let stage = Stage::new().await;
    let _slots = kafka::Slots(stage.pg.config.clone());
    let (history, a, b) = history(seed);
    stage.load(&history[..a]).await;
    let mut running = start(&stage, source, "terminated").await;
    running.converged(&stage, &history[..a]).await;

    let stop = CancellationToken::new();
    let terminator = tokio::spawn(again_and_again(
        admin_of(&stage),
        vec!["SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
              WHERE datname = $1 AND application_name LIKE 'activity-event-processor%'"
            .into()],
        vec![stage.pg.config.database.clone()],
        Duration::from_millis(100),
        stop.clone(),
    ));
    let stopping = stop.clone();
    let (name, reason) = outage(
        &stage,
        &running,
        &history[a..b],
        names,
        Duration::from_secs(20),
        async {},
        async move { stopping.cancel() },
    )
    .await;
    let terminated = terminator.await.expect("the terminator");
    eprintln!("{terminated} backends terminated; {name} failed: {reason}");
    assert!(terminated > 0);
    finish(&stage, running, &history, b).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn replication_backends_terminated_make_it_unready_until_they_stay() {
    backends_terminated(
        "replication",
        1401,
        &["runtime_replication", "runtime_postgres", "postgres"],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn polling_backends_terminated_make_it_unready_until_they_stay() {
    backends_terminated("polling", 1402, &["runtime_postgres", "postgres"]).await;
}

// --- the PostgreSQL server stopped ------------------------------------------------------

/// `pg_ctl stop -m fast` on a private cluster, started again on the same
/// port and data directory once `/readyz` named `postgres` (and at least
/// 10 s passed). The retries count as `connection` or `unavailable`.
async fn server_stopped(source: &str, seed: u64, components: &[&str]) {
    let services = OwnServices::up(&["pg"]);
    let stage = Stage::on_postgres(&services).await;
    let _slots = kafka::Slots(stage.pg.config.clone());
    let (history, a, b) = history(seed);
    stage.load(&history[..a]).await;
    let mut running = start(&stage, source, "stopped").await;
    running.converged(&stage, &history[..a]).await;
    let classes = ["connection", "unavailable"];
    let before = retries(&scrape(running.addr).await, components, &classes);

    let services = std::sync::Arc::new(services);
    let (stopping, starting) = (services.clone(), services.clone());
    let (name, reason) = outage(
        &stage,
        &running,
        &history[a..b],
        &["postgres"],
        Duration::from_secs(10),
        async move {
            tokio::task::block_in_place(|| stopping.control(&["pg-stop", "fast"]));
        },
        async move {
            tokio::task::block_in_place(|| starting.control(&["pg-start"]));
        },
    )
    .await;
    assert!(
        reason.contains("cannot connect") || reason.contains("no answer"),
        "{name}: {reason}"
    );
    let samples = scrape(running.addr).await;
    let after = retries(&samples, components, &classes);
    for (series, value) in samples.iter().filter(|(s, _)| s.contains("retries_total")) {
        eprintln!("{series} {value}");
    }
    assert!(
        after > before,
        "retries_total of {components:?} with a class among {classes:?} did not rise \
         ({before} -> {after}): {:#?}",
        samples
            .iter()
            .filter(|(series, _)| series.contains("retries_total"))
            .collect::<Vec<_>>()
    );
    finish(&stage, running, &history, b).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn replication_server_stopped_makes_it_unready_until_it_is_back() {
    server_stopped("replication", 1403, &["replication", "postgres"]).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn polling_server_stopped_makes_it_unready_until_it_is_back() {
    server_stopped("polling", 1404, &["postgres"]).await;
}

// --- the replication slot dropped -------------------------------------------------------

/// The slot dropped as an operator would (its walsender terminated first,
/// since an active slot cannot be dropped), every 50 ms for 20 s: each time
/// the processor creates it again and reads the whole outbox again. Rows
/// committed meanwhile are all found; nothing is applied twice.
#[tokio::test(flavor = "multi_thread")]
async fn replication_slot_dropped_makes_it_unready_and_it_recreates_the_slot() {
    // A cluster of its own: creating a slot waits for every transaction
    // running in the cluster, such as another test's stalled one.
    let services = OwnServices::up(&["pg"]);
    let stage = Stage::on_postgres(&services).await;
    let _slots = kafka::Slots(stage.pg.config.clone());
    let (history, a, b) = history(1405);
    stage.load(&history[..a]).await;
    let mut running = start(&stage, "replication", "dropped").await;
    running.converged(&stage, &history[..a]).await;

    let stop = CancellationToken::new();
    let dropper = tokio::spawn(again_and_again(
        admin_of(&stage),
        vec![
            "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots \
             WHERE slot_name = $1 AND active_pid IS NOT NULL"
                .into(),
            "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots \
             WHERE slot_name = $1 AND NOT active"
                .into(),
        ],
        vec![stage.slot.clone()],
        Duration::from_millis(50),
        stop.clone(),
    ));
    let stopping = stop.clone();
    let (name, reason) = outage(
        &stage,
        &running,
        &history[a..b],
        &["slot"],
        Duration::from_secs(20),
        async {},
        async move { stopping.cancel() },
    )
    .await;
    dropper.await.expect("the dropper");
    assert!(
        reason.contains(&stage.slot) && reason.contains("does not exist"),
        "{name}: {reason}"
    );
    let text = std::fs::read_to_string(&running.log).unwrap_or_default();
    assert!(
        text.contains("replication slot disappeared"),
        "the recreation is logged:\n{}",
        running.tail()
    );
    finish(&stage, running, &history, b).await;
}

// --- no progress while a backlog grows --------------------------------------------------

/// A trigger makes every UPDATE of the outbox wait for an advisory lock the
/// test holds (as a long transaction's lock would): the outbox marks
/// (replication) or claims (polling) wait, nothing is acknowledged, while
/// events keep coming. PostgreSQL and MongoDB answer their pings all along:
/// only `progress` can tell. On a cluster of its own: the stalled
/// transaction would hold up the creation of any other test's slot.
async fn stalled(source: &str, seed: u64) {
    let services = OwnServices::up(&["pg"]);
    let stage = Stage::on_postgres(&services).await;
    let _slots = kafka::Slots(stage.pg.config.clone());
    stage
        .pg
        .client()
        .await
        .batch_execute(
            "CREATE FUNCTION aep_test_stall() RETURNS trigger LANGUAGE plpgsql AS $$ \
             BEGIN PERFORM pg_advisory_xact_lock_shared(4242); RETURN NEW; END $$; \
             CREATE TRIGGER aep_test_stall BEFORE UPDATE ON event_outbox \
             FOR EACH ROW EXECUTE FUNCTION aep_test_stall()",
        )
        .await
        .expect("the stalling trigger");
    let (history, a, b) = history(seed);
    stage.load(&history[..a]).await;
    let mut running = start(&stage, source, "stalled").await;
    running.converged(&stage, &history[..a]).await;

    let lock = stage.pg.client().await;
    let (name, reason) = outage(
        &stage,
        &running,
        &history[a..b],
        &["progress"],
        Duration::ZERO,
        async {
            lock.query_one("SELECT pg_advisory_lock(4242)", &[])
                .await
                .expect("take the lock");
        },
        async {
            lock.query_one("SELECT pg_advisory_unlock(4242)", &[])
                .await
                .expect("release the lock");
        },
    )
    .await;
    assert!(reason.contains("no progress"), "{name}: {reason}");
    finish(&stage, running, &history, b).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn replication_stalled_with_a_backlog_makes_it_unready_until_it_moves() {
    stalled("replication", 1406).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn polling_stalled_with_a_backlog_makes_it_unready_until_it_moves() {
    stalled("polling", 1407).await;
}

// --- the replication slot invalidated ---------------------------------------------------

/// The slot invalidated by PostgreSQL (`max_slot_wal_keep_size` passed
/// while the processor was stopped): `run` stops with exit status 1 and
/// what to do; the operator drops the slot as told and starts it again,
/// which creates a new slot and reads the whole outbox again: nothing lost.
#[tokio::test(flavor = "multi_thread")]
async fn replication_slot_invalidated_stops_it_until_an_operator_drops_the_slot() {
    let services = OwnServices::up(&["pg"]);
    let stage = Stage::on_postgres(&services).await;
    let _slots = kafka::Slots(stage.pg.config.clone());
    let (history, a, b) = history(1408);
    stage.load(&history[..a]).await;
    let mut running = start(&stage, "replication", "invalidated").await;
    running.converged(&stage, &history[..a]).await;
    kafka::terminate(&mut running.run, Duration::from_secs(30));

    // Stopped: rows come, and more WAL than the slot may keep.
    stage.load(&history[a..b]).await;
    let admin = common::connect(&admin_of(&stage)).await;
    for sql in [
        "ALTER SYSTEM SET max_slot_wal_keep_size = '1MB'",
        "SELECT pg_reload_conf()",
    ] {
        admin
            .batch_execute(sql)
            .await
            .expect("limit the WAL a slot keeps");
    }
    let client = stage.pg.client().await;
    client
        .batch_execute("CREATE TABLE aep_test_filler (x text)")
        .await
        .expect("a table to write WAL with");
    let began = Instant::now();
    loop {
        client
            .batch_execute(
                "INSERT INTO aep_test_filler SELECT repeat(md5(g::text), 32) \
                 FROM generate_series(1, 20000) g; SELECT pg_switch_wal(); CHECKPOINT",
            )
            .await
            .expect("write WAL");
        let lost: Option<String> = client
            .query_one(
                "SELECT wal_status FROM pg_replication_slots WHERE slot_name = $1",
                &[&stage.slot],
            )
            .await
            .expect("the slot")
            .get(0);
        if lost.as_deref() == Some("lost") {
            break;
        }
        assert!(
            began.elapsed() < READINESS,
            "the slot was not invalidated: {lost:?}"
        );
    }

    // Started again: it stops at once, saying what to do.
    let log = stage.log_path().with_extension("invalidated-again.log");
    let mut refused = spawn_run(&stage, &["--source", "replication"], &[], &log);
    let began = Instant::now();
    let status = loop {
        if let Some(status) = refused.0.try_wait().expect("wait") {
            break status;
        }
        assert!(
            began.elapsed() < READINESS,
            "it did not stop:\n{}",
            kafka::tail(&log)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    assert_eq!(status.code(), Some(1), "{text}");
    let told = format!("SELECT pg_drop_replication_slot('{}')", stage.slot);
    assert!(
        text.contains("was invalidated by PostgreSQL") && text.contains(&told),
        "{text}"
    );

    // The operator does as told; the next start loses nothing.
    admin
        .execute(told.as_str(), &[])
        .await
        .expect("drop the slot");
    let running = start(&stage, "replication", "invalidated-dropped").await;
    finish(&stage, running, &history, b).await;
    let _ = std::fs::remove_file(log);
}
