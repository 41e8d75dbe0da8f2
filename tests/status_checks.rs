//! `event-processor status` shows the readiness checks of the configured
//! source, looked at once, on the real services: all ok beside a running
//! `run` (whose own `/readyz` it shows too, when `METRICS_ADDR` points at
//! it), and MongoDB failing with a clear one-line reason, without the
//! driver's debug output or the password, when its port is dead.

mod common;

use activity_event_history::{generate, HistoryOptions};
use common::faults::spawn_run;
use common::kafka;
use common::observe::{served_at, wait_ready};
use common::pipeline::Stage;
use common::run_binary;
use std::time::Duration;

/// `status --json` and `status` with `env`: the JSON, the text, the exit code.
fn status(env: &[(&str, String)]) -> (serde_json::Value, String, Option<i32>) {
    let out = run_binary(&["status", "--json"], env);
    let json = serde_json::from_slice(&out.stdout).unwrap_or_else(|err| {
        panic!(
            "status --json is not JSON ({err}): {}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    let text = run_binary(&["status"], env);
    assert_eq!(text.status.code(), out.status.code());
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&text.stdout),
        String::from_utf8_lossy(&text.stderr)
    );
    (json, text, out.status.code())
}

/// The state and reason of check `name` in a `status --json`'s `checks`.
fn check(json: &serde_json::Value, name: &str) -> Option<(String, Option<String>)> {
    json["checks"].as_array()?.iter().find_map(|check| {
        (check["name"] == name).then(|| {
            (
                check["state"].as_str().unwrap_or_default().to_string(),
                check["reason"].as_str().map(str::to_string),
            )
        })
    })
}

#[tokio::test(flavor = "multi_thread")]
async fn beside_a_running_process_every_check_is_ok_and_its_readyz_is_shown() {
    let stage = Stage::new().await;
    let _slots = kafka::Slots(stage.pg.config.clone());
    let history = generate(1501, &HistoryOptions::realistic(300));
    stage.load(&history).await;
    let log = stage.log_path().with_extension("status.log");
    let mut run = spawn_run(&stage, &["--source", "replication"], &[], &log);
    let addr = served_at(&log, &mut run).await;
    stage
        .wait_converged(&history, Duration::from_secs(120))
        .await;
    wait_ready(addr, Duration::from_secs(60)).await;

    let mut env = stage.env();
    env.push(("METRICS_ADDR", addr.to_string()));
    let (json, text, code) = status(&env);
    assert_eq!(code, Some(0), "{text}");
    for name in ["postgres", "slot", "mongodb"] {
        assert_eq!(
            check(&json, name),
            Some(("ok".to_string(), None)),
            "{name}: {json}"
        );
    }
    assert_eq!(check(&json, "progress"), None, "one look cannot judge it");
    assert_eq!(check(&json, "kafka"), None, "not the kafka source");
    assert_eq!(json["running"]["address"], addr.to_string(), "{json}");
    assert_eq!(json["running"]["readiness"]["ready"], true, "{json}");
    assert!(
        text.contains(&format!("running process on {addr} (its /readyz): ready")),
        "{text}"
    );
    assert!(text.contains("  slot                  ok\n"), "{text}");
    drop(run);
    let _ = std::fs::remove_file(log);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_dead_mongodb_port_fails_its_check_in_one_clear_line() {
    let stage = Stage::new().await;
    let password = "s3cret-mongo-pw";
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("a free port");
    let dead = listener.local_addr().expect("its address").port();
    drop(listener);
    let mut env = stage.env();
    env.retain(|(key, _)| *key != "MONGODB_URI");
    env.push((
        "MONGODB_URI",
        format!("mongodb://app:{password}@127.0.0.1:{dead}/?directConnection=true"),
    ));
    env.push(("SOURCE", "polling".into()));
    let (json, text, code) = status(&env);
    assert_eq!(
        code,
        Some(0),
        "a failing check is shown, not an error: {text}"
    );
    assert_eq!(check(&json, "postgres"), Some(("ok".to_string(), None)));
    assert_eq!(check(&json, "slot"), None, "not the replication source");
    let (state, reason) = check(&json, "mongodb").expect("the mongodb check");
    assert_eq!(state, "failing", "{json}");
    let reason = reason.expect("a reason");
    assert!(reason.contains("Connection refused"), "{reason}");
    assert!(reason.contains(&format!("127.0.0.1:{dead}")), "{reason}");
    for dump in ["Topology", "labels", "server response", "Kind:"] {
        assert!(
            !text.contains(dump),
            "driver debug output `{dump}`:\n{text}"
        );
    }
    assert!(!text.contains(password), "{text}");
    assert!(
        text.contains("  mongodb               failing: ping failed: "),
        "{text}"
    );
    assert_eq!(
        text.lines()
            .filter(|line| line.contains("Connection refused"))
            .count(),
        2,
        "the read models' line and the check's: {text}"
    );
}
