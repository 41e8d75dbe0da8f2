//! Every Debezium fixture message in `tests/fixtures/debezium/manifest.json`, decoded
//! and compared with what the fixture itself says (both converter variants), the
//! decoder fed arbitrary bytes and mutated fixtures (it must never panic), and the
//! `decode` subcommand of the built binary.

use activity_event_processor::decode::{
    decode_message, DecodeError, DecodeOptions, Decoded, MessageFormat, OutboxEvent, RawMessage,
    SkipReason,
};
use chrono::{DateTime, Utc};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use uuid::Uuid;

const VARIANTS: [&str; 2] = ["schemas-enabled", "schemas-disabled"];

fn fixture_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/debezium")
}

fn read(relative: &str) -> Vec<u8> {
    let path = fixture_dir().join(relative);
    std::fs::read(&path).unwrap_or_else(|err| panic!("cannot read {}: {err}", path.display()))
}

fn read_json(relative: &str) -> Value {
    serde_json::from_slice(&read(relative))
        .unwrap_or_else(|err| panic!("{relative} is not json: {err}"))
}

fn manifest() -> Vec<Value> {
    match read_json("manifest.json")["messages"].as_array() {
        Some(messages) => messages.clone(),
        None => panic!("manifest.json has no `messages` array"),
    }
}

fn text<'a>(value: &'a Value, field: &str) -> &'a str {
    value[field]
        .as_str()
        .unwrap_or_else(|| panic!("`{field}` is not a string in {value}"))
}

/// One fixture message as the Kafka consumer would see it.
struct Fixture {
    id: String,
    variant: &'static str,
    entry: Value,
    topic: String,
    key: Option<Vec<u8>>,
    value: Option<Vec<u8>>,
    headers: Vec<(String, Option<Vec<u8>>)>,
}

impl Fixture {
    fn load(entry: &Value, variant: &'static str) -> Fixture {
        let files = &entry["files"][variant];
        let flag = |name: &str| files[name].as_bool().unwrap_or(false);
        let key = files["key"]
            .as_str()
            .filter(|_| !flag("key_is_kafka_null"))
            .map(read);
        let value = files["value"]
            .as_str()
            .filter(|_| !flag("value_is_kafka_null"))
            .map(read);
        let mut topic = text(entry, "topic").to_string();
        let mut headers = Vec::new();
        if let Some(sidecar) = entry["files"]["headers"].as_str() {
            let sidecar = read_json(sidecar);
            topic = text(&sidecar, "topic").to_string();
            for header in sidecar["headers"].as_array().into_iter().flatten() {
                let value = header["value"].as_str().map(|v| v.as_bytes().to_vec());
                headers.push((text(header, "key").to_string(), value));
            }
        }
        Fixture {
            id: text(entry, "id").to_string(),
            variant,
            entry: entry.clone(),
            topic,
            key,
            value,
            headers,
        }
    }

    fn all() -> Vec<Fixture> {
        let mut fixtures = Vec::new();
        for entry in manifest() {
            for variant in VARIANTS {
                if entry["files"][variant].is_object() {
                    fixtures.push(Fixture::load(&entry, variant));
                }
            }
        }
        fixtures
    }

    fn kind(&self) -> &str {
        text(&self.entry, "kind")
    }

    fn decode(&self, format: MessageFormat) -> Result<Decoded, DecodeError> {
        self.decode_with(format, &self.headers)
    }

    fn decode_with(
        &self,
        format: MessageFormat,
        headers: &[(String, Option<Vec<u8>>)],
    ) -> Result<Decoded, DecodeError> {
        let msg = RawMessage {
            topic: Some(&self.topic),
            key: self.key.as_deref(),
            value: self.value.as_deref(),
            headers,
        };
        let options = DecodeOptions {
            format,
            ..DecodeOptions::default()
        };
        decode_message(&msg, &options)
    }

    fn label(&self) -> String {
        format!("{} ({})", self.id, self.variant)
    }
}

/// The row image of a CDC message, read from its schemas-disabled value file with
/// `serde_json::Value` (a path independent of the decoder's typed one).
fn cdc_after(id: &str) -> Value {
    let entry = manifest()
        .into_iter()
        .find(|entry| entry["id"] == id)
        .unwrap_or_else(|| panic!("no manifest entry {id}"));
    let mut value = read_json(text(&entry["files"]["schemas-disabled"], "value"));
    if value.get("schema").is_some() && value.get("payload").is_some() {
        value = value["payload"].take();
    }
    value["after"].take()
}

/// The event a CDC row image stands for.
fn expected_event(after: &Value) -> OutboxEvent {
    let uuid = |field: &str| -> Uuid {
        text(after, field)
            .parse()
            .unwrap_or_else(|err| panic!("{field}: {err}"))
    };
    let payload: Value = serde_json::from_str(text(after, "payload"))
        .unwrap_or_else(|err| panic!("fixture payload is not json: {err}"));
    let created_at: DateTime<Utc> = text(after, "created_at")
        .parse()
        .unwrap_or_else(|err| panic!("created_at: {err}"));
    OutboxEvent {
        event_id: uuid("event_id"),
        sequence_id: after["sequence_id"].as_i64(),
        aggregate_id: uuid("aggregate_id"),
        aggregate_type: text(after, "aggregate_type").to_string(),
        event_type: text(after, "event_type").to_string(),
        payload: payload.into(),
        created_at: Some(created_at),
    }
}

/// What `table.expand.json.payload=true` does to a payload: null members and empty
/// arrays are dropped (`table.json.payload.null.behavior=ignore`).
fn without_nulls(value: &Value) -> Value {
    match value {
        Value::Object(map) => Value::Object(
            map.iter()
                .filter(|(_, v)| !v.is_null() && !matches!(v, Value::Array(a) if a.is_empty()))
                .map(|(k, v)| (k.clone(), without_nulls(v)))
                .collect(),
        ),
        Value::Array(items) => Value::Array(items.iter().map(without_nulls).collect()),
        other => other.clone(),
    }
}

fn expect_event(fixture: &Fixture, result: Result<Decoded, DecodeError>) -> OutboxEvent {
    match result {
        Ok(Decoded::Event(event)) => event,
        other => panic!("{}: expected an event, got {other:?}", fixture.label()),
    }
}

fn expect_skip(fixture: &Fixture, result: Result<Decoded, DecodeError>, reason: SkipReason) {
    match result {
        Ok(Decoded::Skip(got)) if got == reason => {}
        other => panic!(
            "{}: expected skip {}, got {other:?}",
            fixture.label(),
            reason.as_str()
        ),
    }
}

fn expect_error(fixture: &Fixture, result: Result<Decoded, DecodeError>) -> String {
    match result {
        Err(err) => err.to_string(),
        Ok(other) => panic!("{}: expected an error, got {other:?}", fixture.label()),
    }
}

fn check_cdc(fixture: &Fixture) {
    let op = fixture.entry["op"].as_str();
    for format in [MessageFormat::Auto, MessageFormat::Cdc] {
        let result = fixture.decode(format);
        match op {
            Some("c" | "r") => {
                let event = expect_event(fixture, result);
                assert_eq!(
                    event,
                    expected_event(&cdc_after(&fixture.id)),
                    "{}",
                    fixture.label()
                );
            }
            Some("u") => expect_skip(fixture, result, SkipReason::Update),
            Some("d") => expect_skip(fixture, result, SkipReason::Delete),
            Some("t") => expect_skip(fixture, result, SkipReason::Truncate),
            None => expect_skip(fixture, result, SkipReason::Tombstone),
            Some(other) => panic!("{}: unexpected op {other} in the manifest", fixture.label()),
        }
    }
}

fn check_outbox(fixture: &Fixture) {
    let source = cdc_after(text(&fixture.entry, "source_record"));
    let mut headers = fixture.headers.clone();
    if !headers.iter().any(|(name, _)| name == "eventType") {
        // As configured for the fixtures (no additional placement), the event type is missing.
        for format in [MessageFormat::Auto, MessageFormat::EventRouter] {
            let message = expect_error(fixture, fixture.decode(format));
            assert_eq!(
                message,
                "missing header `eventType` with the event type: debezium's outbox event router adds it \
                 only with `table.fields.additional.placement=event_type:header:eventType`",
                "{}",
                fixture.label()
            );
        }
        // With `table.fields.additional.placement=event_type:header:eventType` it decodes.
        let event_type = text(&source, "event_type");
        headers.push(("eventType".into(), Some(event_type.as_bytes().to_vec())));
    }
    for format in [MessageFormat::Auto, MessageFormat::EventRouter] {
        let event = expect_event(fixture, fixture.decode_with(format, &headers));
        let mut expected = expected_event(&source);
        expected.sequence_id = None;
        expected.created_at = None;
        if fixture.id.contains("expand-json") {
            expected.payload = without_nulls(&expected.payload.to_json()).into();
        }
        assert_eq!(event, expected, "{}", fixture.label());
        assert_eq!(
            format!("outbox.event.{}", event.aggregate_type),
            fixture.topic,
            "{}",
            fixture.label()
        );
    }
}

fn check_malformed(fixture: &Fixture) {
    let message = expect_error(fixture, fixture.decode(MessageFormat::Auto));
    let expected_start = match fixture.id.as_str() {
        "malformed/truncated_json" => "value is not valid json: ",
        "malformed/missing_op" => "missing field `op`",
        "malformed/unknown_op" => "unknown op `x`",
        "malformed/create_without_after" => "missing field `after` in a create (op=c) event",
        "malformed/create_with_null_after" => "field `after` is null in a create (op=c) event",
        "malformed/payload_not_json" => "payload is not valid json: ",
        "malformed/sequence_id_wrong_type" => {
            "field `sequence_id` has the wrong type: expected integer, got string"
        }
        _ => "",
    };
    assert!(
        message.starts_with(expected_start),
        "{}: {message:?} does not start with {expected_start:?}",
        fixture.label()
    );
    let cdc = expect_error(fixture, fixture.decode(MessageFormat::Cdc));
    assert_eq!(cdc, message, "{}", fixture.label());
}

#[test]
fn every_manifest_message_decodes_as_the_manifest_says() {
    let fixtures = Fixture::all();
    let mut seen = std::collections::BTreeMap::<String, usize>::new();
    for fixture in &fixtures {
        let valid = fixture.entry["valid"].as_bool().unwrap_or(true);
        match fixture.kind() {
            _ if !valid => check_malformed(fixture),
            "cdc" | "compat" => check_cdc(fixture),
            "outbox" => check_outbox(fixture),
            "malformed" => check_malformed(fixture),
            "heartbeat" => {
                for format in [MessageFormat::Auto, MessageFormat::Cdc] {
                    expect_skip(fixture, fixture.decode(format), SkipReason::Heartbeat);
                }
            }
            "transaction" => {
                for format in [MessageFormat::Auto, MessageFormat::Cdc] {
                    expect_skip(fixture, fixture.decode(format), SkipReason::Transaction);
                }
            }
            other => panic!("{}: unknown kind {other}", fixture.label()),
        }
        *seen.entry(fixture.kind().to_string()).or_default() += 1;
    }
    // Both variants of every message were checked; a manifest that lost messages fails.
    assert_eq!(fixtures.len(), 2 * manifest().len());
    for kind in ["cdc", "outbox", "malformed", "heartbeat", "transaction"] {
        assert!(
            seen.get(kind).copied().unwrap_or(0) >= 2,
            "no {kind} fixtures"
        );
    }
}

/// Concrete values, so that a fixture and the decoder cannot drift together unnoticed.
#[test]
fn known_fixtures_decode_to_known_values() {
    let fixtures = Fixture::all();
    let find = |id: &str, variant: &str| -> &Fixture {
        fixtures
            .iter()
            .find(|f| f.id == id && f.variant == variant)
            .unwrap_or_else(|| panic!("fixture {id} ({variant}) is missing"))
    };
    for variant in VARIANTS {
        let fixture = find("cdc/insert_user_created", variant);
        let event = expect_event(fixture, fixture.decode(MessageFormat::Auto));
        assert_eq!(
            event.event_id.to_string(),
            "0192f4b7-1c3d-7e4f-9a50-3b6c7d8e9f10"
        );
        assert_eq!(event.sequence_id, Some(104));
        assert_eq!(
            event.aggregate_id.to_string(),
            "7d3c9a52-1e4f-4b8a-9c61-2f5e8d7a4b10"
        );
        assert_eq!(event.aggregate_type, "User");
        assert_eq!(event.event_type, "UserCreated");
        assert_eq!(
            event.payload.to_json()["email"],
            json!("alice.martin@example.com")
        );
        assert_eq!(
            event.payload.to_json()["displayName"],
            json!("Alice Martin")
        );
        assert_eq!(
            event.created_at.map(|t| t.timestamp_micros()),
            Some(1_789_465_267_509_871)
        );

        let fixture = find("cdc/snapshot_read_first", variant);
        let event = expect_event(fixture, fixture.decode(MessageFormat::Auto));
        assert_eq!(event.sequence_id, Some(101));
        assert_eq!(event.payload.to_json()["displayName"], json!("Bob Okafor"));

        let fixture = find("cdc/insert_participant_joined", variant);
        let event = expect_event(fixture, fixture.decode(MessageFormat::Auto));
        assert_eq!(event.sequence_id, Some(107));
        assert_eq!(event.event_type, "ParticipantJoined");
        assert_eq!(event.payload.to_json()["invitedBy"], Value::Null);
        assert_eq!(event.payload.to_json()["participantCount"], json!(1));

        let fixture = find("outbox/expand-json/activity_created", variant);
        let mut headers = fixture.headers.clone();
        headers.push(("eventType".into(), Some(b"ActivityCreated".to_vec())));
        headers.push(("sequenceId".into(), Some(b"106".to_vec())));
        let event = expect_event(fixture, fixture.decode_with(MessageFormat::Auto, &headers));
        assert_eq!(event.aggregate_type, "Activity");
        assert_eq!(event.sequence_id, Some(106));
        assert_eq!(
            event.aggregate_id.to_string(),
            "a1f2c3d4-5e6f-4a8b-9c0d-1e2f3a4b5c6d"
        );
        assert_eq!(event.payload.to_json()["location"]["lat"], json!(51.4561));
        assert_eq!(event.payload.to_json()["maxParticipants"], json!(12));
    }
}

struct Run {
    stdout: Value,
    code: Option<i32>,
}

/// The built binary's `decode`: exit code, stdout and stderr as text.
fn run_decode_raw(args: &[&str], stdin: Option<&[u8]>) -> (Option<i32>, String, String) {
    let mut command = Command::new(env!("CARGO_BIN_EXE_event-processor"));
    command
        .arg("decode")
        .args(args)
        .current_dir(fixture_dir())
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = command
        .spawn()
        .unwrap_or_else(|err| panic!("cannot start the binary: {err}"));
    if let (Some(input), Some(mut pipe)) = (stdin, child.stdin.take()) {
        use std::io::Write;
        pipe.write_all(input)
            .unwrap_or_else(|err| panic!("cannot write stdin: {err}"));
    }
    let output = child
        .wait_with_output()
        .unwrap_or_else(|err| panic!("the binary did not finish: {err}"));
    (
        output.status.code(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// The built binary's `decode`, which must print one JSON line on stdout.
fn run_decode(args: &[&str], stdin: Option<&[u8]>) -> Run {
    let (code, text, stderr) = run_decode_raw(args, stdin);
    assert_eq!(
        text.lines().count(),
        1,
        "expected one line on stdout for {args:?}, got {text:?} (stderr: {stderr})"
    );
    let stdout = serde_json::from_str(&text)
        .unwrap_or_else(|err| panic!("stdout is not json ({err}): {text:?}"));
    Run { stdout, code }
}

/// A temporary file holding `content`, removed when dropped.
fn temp_input(content: &[u8]) -> tempfile::NamedTempFile {
    let mut file = tempfile::Builder::new()
        .prefix("decode-input-")
        .suffix(".json")
        .tempfile()
        .unwrap_or_else(|err| panic!("cannot create a temp file: {err}"));
    std::io::Write::write_all(&mut file, content)
        .unwrap_or_else(|err| panic!("cannot write a temp file: {err}"));
    file
}

#[test]
fn the_decode_subcommand_prints_one_json_line() {
    // An event.
    let run = run_decode(
        &["cdc/schemas-enabled/insert_user_created.value.json"],
        None,
    );
    assert_eq!(run.code, Some(0));
    assert_eq!(
        run.stdout,
        json!({"event": {
            "event_id": "0192f4b7-1c3d-7e4f-9a50-3b6c7d8e9f10",
            "sequence_id": 104,
            "aggregate_id": "7d3c9a52-1e4f-4b8a-9c61-2f5e8d7a4b10",
            "aggregate_type": "User",
            "event_type": "UserCreated",
            "payload": serde_json::from_str::<Value>(
                text(&cdc_after("cdc/insert_user_created"), "payload")
            ).unwrap_or_default(),
            "created_at": "2026-09-15T09:41:07.509871Z",
        }})
    );

    // A skip, from standard input.
    let update = read("cdc/schemas-disabled/update_status_identity_default.value.json");
    let run = run_decode(&["-"], Some(&update));
    assert_eq!((run.code, run.stdout), (Some(0), json!({"skip": "update"})));

    // A malformed message.
    let run = run_decode(&["malformed/schemas-disabled/unknown_op.value.json"], None);
    assert_eq!(run.code, Some(3));
    assert_eq!(
        run.stdout,
        json!({"error": "unknown op `x`: expected one of c, r, u, d, t"})
    );

    // An empty file is a Kafka null: a tombstone.
    let empty = temp_input(b"");
    let run = run_decode(&[&empty.path().to_string_lossy()], None);
    assert_eq!(
        (run.code, run.stdout),
        (Some(0), json!({"skip": "tombstone"}))
    );
}

#[test]
fn a_json_null_value_is_a_tombstone() {
    for content in [&b"null"[..], b"null\n", b" \tnull\r\n  "] {
        let file = temp_input(content);
        let run = run_decode(&[&file.path().to_string_lossy()], None);
        assert_eq!(
            (run.code, run.stdout),
            (Some(0), json!({"skip": "tombstone"})),
            "{content:?}"
        );
    }
    // From standard input too.
    let run = run_decode(&["-"], Some(b"null\n"));
    assert_eq!(
        (run.code, run.stdout),
        (Some(0), json!({"skip": "tombstone"}))
    );
}

#[test]
fn a_missing_input_file_is_a_usage_error_naming_the_path() {
    let (code, stdout, stderr) = run_decode_raw(&["no/such/file.json"], None);
    assert_eq!(code, Some(2), "stdout: {stdout:?}, stderr: {stderr:?}");
    assert_eq!(stdout, "");
    assert_eq!(
        stderr,
        "error: cannot read `no/such/file.json`: no such file; give the path of a readable file (`-` reads standard input)\n"
    );

    let (code, stdout, stderr) = run_decode_raw(
        &[
            "cdc/schemas-enabled/insert_user_created.value.json",
            "--key=no/such/key.json",
        ],
        None,
    );
    assert_eq!(code, Some(2), "stdout: {stdout:?}, stderr: {stderr:?}");
    assert_eq!(stdout, "");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.starts_with("error: cannot read --key `no/such/key.json`: no such file;"),
        "{stderr}"
    );
}

#[test]
fn the_decode_subcommand_reads_event_router_records() {
    let source = cdc_after("cdc/insert_user_updated");
    let id_header = format!("id={}", text(&source, "event_id"));
    let run = run_decode(
        &[
            "outbox/default/schemas-disabled/user_updated.value.json",
            "--key=outbox/default/schemas-disabled/user_updated.key.json",
            "--topic=outbox.event.User",
            "--header",
            &id_header,
            "--header=eventType=UserUpdated",
            "--header=sequenceId=105",
            "--format=event-router",
        ],
        None,
    );
    assert_eq!(run.code, Some(0), "{}", run.stdout);
    let payload: Value = serde_json::from_str(text(&source, "payload")).unwrap_or_default();
    assert_eq!(
        run.stdout,
        json!({"event": {
            "event_id": source["event_id"],
            "sequence_id": 105,
            "aggregate_id": source["aggregate_id"],
            "aggregate_type": "User",
            "event_type": "UserUpdated",
            "payload": payload,
            "created_at": null,
        }})
    );
}
