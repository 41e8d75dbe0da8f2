//! `event-processor decode`: decode one Kafka message from files, print one JSON line.
//!
//! ```text
//! {"event":{"event_id":…,"sequence_id":…,"aggregate_id":…,"aggregate_type":…,
//!           "event_type":…,"payload":{…},"created_at":"<RFC 3339>"}}   exit 0
//! {"skip":"tombstone"}                                                 exit 0
//! {"error":"<message>"}                                                exit 3
//! ```
//!
//! An empty file stands for a Kafka null (value or key).

use crate::decode::{self, DecodeOptions, Decoded, MessageFormat, OutboxEvent, RawMessage};
use chrono::SecondsFormat;
use clap::{Args, ValueEnum};
use serde_json::{json, Value};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

/// Exit status when the message does not decode (or cannot be read).
pub const EXIT_UNDECODABLE: u8 = 3;

#[derive(Args, Debug)]
pub struct DecodeArgs {
    /// File with the Kafka message value; `-` reads standard input. Empty = Kafka null.
    #[arg(value_name = "FILE", default_value = "-")]
    pub file: PathBuf,
    /// File with the Kafka message key. Empty = Kafka null.
    #[arg(long, value_name = "FILE")]
    pub key: Option<PathBuf>,
    /// A record header (repeatable); later headers of the same name win.
    #[arg(long = "header", value_name = "NAME=VALUE", value_parser = parse_header)]
    pub headers: Vec<(String, String)>,
    /// The topic the message came from (the event router's aggregate type is in it).
    #[arg(long, value_name = "NAME")]
    pub topic: Option<String>,
    /// Which producer wrote the message.
    #[arg(long, value_enum, default_value_t = FormatArg::Auto)]
    pub format: FormatArg,
}

/// `--format`.
#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum FormatArg {
    /// Decide from the topic and the value's shape.
    Auto,
    /// Debezium change events of the outbox table.
    Cdc,
    /// Debezium Outbox Event Router output.
    EventRouter,
}

impl From<FormatArg> for MessageFormat {
    fn from(format: FormatArg) -> Self {
        match format {
            FormatArg::Auto => MessageFormat::Auto,
            FormatArg::Cdc => MessageFormat::Cdc,
            FormatArg::EventRouter => MessageFormat::EventRouter,
        }
    }
}

fn parse_header(text: &str) -> Result<(String, String), String> {
    match text.split_once('=') {
        Some((name, value)) if !name.is_empty() => Ok((name.to_string(), value.to_string())),
        _ => Err(format!("expected NAME=VALUE, got `{text}`")),
    }
}

/// Decodes the message the arguments name and prints exactly one JSON line.
///
/// Returns exit 0 for an event or a skip and exit 3 for a message that does not
/// decode or a file that cannot be read; `Err` only when `stdout` cannot be written.
pub fn execute(args: &DecodeArgs, stdout: &mut dyn Write) -> anyhow::Result<ExitCode> {
    let (line, code) = match decode_files(args) {
        Ok(Decoded::Event(event)) => (json!({ "event": event_json(&event) }), ExitCode::SUCCESS),
        Ok(Decoded::Skip(reason)) => (json!({ "skip": reason.as_str() }), ExitCode::SUCCESS),
        Err(message) => (
            json!({ "error": message }),
            ExitCode::from(EXIT_UNDECODABLE),
        ),
    };
    writeln!(stdout, "{line}")?;
    stdout.flush()?;
    Ok(code)
}

fn decode_files(args: &DecodeArgs) -> Result<Decoded, String> {
    let value = read_input(&args.file)?;
    let key = args.key.as_deref().map(read_input).transpose()?;
    let headers: Vec<(String, Option<Vec<u8>>)> = args
        .headers
        .iter()
        .map(|(name, value)| (name.clone(), Some(value.clone().into_bytes())))
        .collect();
    let msg = RawMessage {
        topic: args.topic.as_deref(),
        key: key.as_deref().filter(|k| !k.is_empty()),
        value: Some(value.as_slice()).filter(|v| !v.is_empty()),
        headers: &headers,
    };
    let options = DecodeOptions {
        format: args.format.into(),
        ..DecodeOptions::default()
    };
    decode::decode_message(&msg, &options).map_err(|err| err.to_string())
}

fn read_input(path: &Path) -> Result<Vec<u8>, String> {
    let mut bytes = Vec::new();
    let result = if path.as_os_str() == "-" {
        std::io::stdin().lock().read_to_end(&mut bytes).map(|_| ())
    } else {
        std::fs::File::open(path).and_then(|mut file| file.read_to_end(&mut bytes).map(|_| ()))
    };
    match result {
        Ok(()) => Ok(bytes),
        Err(err) if path.as_os_str() == "-" => Err(format!("cannot read standard input: {err}")),
        Err(err) => Err(format!("cannot read `{}`: {err}", path.display())),
    }
}

fn event_json(event: &OutboxEvent) -> Value {
    json!({
        "event_id": event.event_id.to_string(),
        "sequence_id": event.sequence_id,
        "aggregate_id": event.aggregate_id.to_string(),
        "aggregate_type": event.aggregate_type,
        "event_type": event.event_type,
        "payload": event.payload,
        "created_at": event
            .created_at
            .map(|t| t.to_rfc3339_opts(SecondsFormat::AutoSi, true)),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn args(file: PathBuf) -> DecodeArgs {
        DecodeArgs {
            file,
            key: None,
            headers: Vec::new(),
            topic: None,
            format: FormatArg::Auto,
        }
    }

    fn run(args: &DecodeArgs) -> (Value, ExitCode) {
        let mut out = Vec::new();
        let code = match execute(args, &mut out) {
            Ok(code) => code,
            Err(err) => panic!("execute failed: {err:#}"),
        };
        let text = String::from_utf8_lossy(&out).into_owned();
        assert!(
            text.ends_with('\n') && text.matches('\n').count() == 1,
            "{text:?}"
        );
        match serde_json::from_str(&text) {
            Ok(value) => (value, code),
            Err(err) => panic!("not json: {text:?}: {err}"),
        }
    }

    fn temp_file(name: &str, content: &[u8]) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("decode-cli-{}", std::process::id()));
        let created = std::fs::create_dir_all(&dir).and_then(|()| {
            let path = dir.join(name);
            std::fs::write(&path, content).map(|()| path)
        });
        match created {
            Ok(path) => path,
            Err(err) => panic!("cannot write a temp file: {err}"),
        }
    }

    #[test]
    fn an_unreadable_file_is_an_error_naming_the_path() {
        let (line, code) = run(&args(PathBuf::from("/nonexistent/value.json")));
        assert_eq!(code, ExitCode::from(EXIT_UNDECODABLE));
        let message = line["error"].as_str().unwrap_or_default();
        assert!(message.contains("/nonexistent/value.json"), "{message}");
    }

    #[test]
    fn an_empty_file_is_a_tombstone() {
        let (line, code) = run(&args(temp_file("empty.json", b"")));
        assert_eq!(code, ExitCode::SUCCESS);
        assert_eq!(line, json!({"skip": "tombstone"}));
    }

    #[test]
    fn an_event_prints_every_field() {
        let value = br#"{"before":null,"after":{"event_id":"0192f4b7-1c3d-7e4f-9a50-3b6c7d8e9f10","sequence_id":104,"aggregate_id":"7d3c9a52-1e4f-4b8a-9c61-2f5e8d7a4b10","aggregate_type":"User","event_type":"UserCreated","payload":"{\"email\": \"a@example.com\"}","created_at":"2026-09-15T09:41:07.509871Z"},"source":{},"op":"c"}"#;
        let (line, code) = run(&args(temp_file("insert.json", value)));
        assert_eq!(code, ExitCode::SUCCESS);
        assert_eq!(
            line,
            json!({"event": {
                "event_id": "0192f4b7-1c3d-7e4f-9a50-3b6c7d8e9f10",
                "sequence_id": 104,
                "aggregate_id": "7d3c9a52-1e4f-4b8a-9c61-2f5e8d7a4b10",
                "aggregate_type": "User",
                "event_type": "UserCreated",
                "payload": {"email": "a@example.com"},
                "created_at": "2026-09-15T09:41:07.509871Z",
            }})
        );
    }

    #[test]
    fn an_event_router_message_from_key_headers_and_topic() {
        let mut args = args(temp_file("routed.json", br#""{\"a\": 1}""#));
        args.key = Some(temp_file(
            "routed.key",
            b"\"7d3c9a52-1e4f-4b8a-9c61-2f5e8d7a4b10\"",
        ));
        args.topic = Some("outbox.event.User".into());
        args.headers = vec![
            ("id".into(), "0192f4b7-1c3d-7e4f-9a50-3b6c7d8e9f10".into()),
            ("eventType".into(), "UserCreated".into()),
        ];
        let (line, code) = run(&args);
        assert_eq!(code, ExitCode::SUCCESS);
        assert_eq!(line["event"]["aggregate_type"], "User");
        assert_eq!(line["event"]["payload"], json!({"a": 1}));
        assert_eq!(line["event"]["sequence_id"], Value::Null);
        assert_eq!(line["event"]["created_at"], Value::Null);
    }

    #[test]
    fn header_arguments_need_a_name() {
        assert_eq!(parse_header("a=b=c"), Ok(("a".into(), "b=c".into())));
        assert_eq!(parse_header("a="), Ok(("a".into(), String::new())));
        assert!(parse_header("=b").is_err());
        assert!(parse_header("ab").is_err());
    }
}
