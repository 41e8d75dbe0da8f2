//! `event-processor decode`: decode one Kafka message from files, print one JSON line.
//!
//! ```text
//! {"event":{"event_id":…,"sequence_id":…,"aggregate_id":…,"aggregate_type":…,
//!           "event_type":…,"payload":{…},"created_at":"<RFC 3339>"}}   exit 0
//! {"skip":"tombstone"}                                                 exit 0
//! {"error":"<message>"}                                                exit 3
//! ```
//!
//! A file that is empty, or holds nothing but the JSON `null` (whitespace
//! around it allowed), stands for a Kafka null (value or key): a value like
//! that is a tombstone. A file that cannot be read is a usage error: one line
//! on stderr naming the path, nothing on stdout, exit 2.

use crate::decode::{self, DecodeOptions, Decoded, MessageFormat, OutboxEvent, RawMessage};
use chrono::SecondsFormat;
use clap::{Args, ValueEnum};
use serde_json::{json, Value};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

/// Exit status when the message does not decode.
pub const EXIT_UNDECODABLE: u8 = 3;
/// Exit status when an input file cannot be read (a usage error).
pub const EXIT_USAGE: u8 = 2;

#[derive(Args, Debug)]
pub struct DecodeArgs {
    /// File with the Kafka message value; `-` reads standard input. Empty or `null` = Kafka null (a tombstone).
    #[arg(value_name = "FILE", default_value = "-")]
    pub file: PathBuf,
    /// File with the Kafka message key. Empty or `null` = Kafka null.
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
/// decode. An input file that cannot be read prints one line on `stderr` (and
/// nothing on `stdout`) and returns exit 2. `Err` only when `stdout` cannot be
/// written.
pub fn execute(
    args: &DecodeArgs,
    stdout: &mut dyn Write,
    stderr: &mut dyn Write,
) -> anyhow::Result<ExitCode> {
    let inputs = match read_inputs(args) {
        Ok(inputs) => inputs,
        Err(message) => {
            writeln!(stderr, "error: {message}")?;
            return Ok(ExitCode::from(EXIT_USAGE));
        }
    };
    let (line, code) = match decode_inputs(args, &inputs) {
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

/// The value and the key as read, `None` for a Kafka null.
struct Inputs {
    value: Option<Vec<u8>>,
    key: Option<Vec<u8>>,
}

fn read_inputs(args: &DecodeArgs) -> Result<Inputs, String> {
    let value = kafka_null_as_none(read_input(&args.file, "")?);
    let key = match args.key.as_deref() {
        Some(path) => kafka_null_as_none(read_input(path, "--key ")?),
        None => None,
    };
    Ok(Inputs { value, key })
}

fn decode_inputs(args: &DecodeArgs, inputs: &Inputs) -> Result<Decoded, String> {
    let headers: Vec<(String, Option<Vec<u8>>)> = args
        .headers
        .iter()
        .map(|(name, value)| (name.clone(), Some(value.clone().into_bytes())))
        .collect();
    let msg = RawMessage {
        topic: args.topic.as_deref(),
        key: inputs.key.as_deref(),
        value: inputs.value.as_deref(),
        headers: &headers,
    };
    let options = DecodeOptions {
        format: args.format.into(),
        ..DecodeOptions::default()
    };
    decode::decode_message(&msg, &options).map_err(|err| err.to_string())
}

/// An empty file, or one holding only the JSON `null`, is a Kafka null.
fn kafka_null_as_none(bytes: Vec<u8>) -> Option<Vec<u8>> {
    let trimmed = bytes.trim_ascii();
    if trimmed.is_empty() || trimmed == b"null" {
        None
    } else {
        Some(bytes)
    }
}

/// Reads one input; `what` is the flag that named it (`""` or `"--key "`).
fn read_input(path: &Path, what: &str) -> Result<Vec<u8>, String> {
    let mut bytes = Vec::new();
    let result = if path.as_os_str() == "-" {
        std::io::stdin().lock().read_to_end(&mut bytes).map(|_| ())
    } else {
        std::fs::File::open(path).and_then(|mut file| file.read_to_end(&mut bytes).map(|_| ()))
    };
    match result {
        Ok(()) => Ok(bytes),
        Err(err) if path.as_os_str() == "-" => Err(format!(
            "cannot read standard input ({what}-): {}",
            io_reason(&err)
        )),
        Err(err) => Err(format!(
            "cannot read {what}`{}`: {}; give the path of a readable file (`-` reads standard input)",
            path.display(),
            io_reason(&err)
        )),
    }
}

/// An I/O error's reason without the `(os error N)` suffix.
fn io_reason(err: &std::io::Error) -> String {
    match err.kind() {
        std::io::ErrorKind::NotFound => "no such file".to_string(),
        std::io::ErrorKind::PermissionDenied => "permission denied".to_string(),
        std::io::ErrorKind::IsADirectory => "it is a directory".to_string(),
        _ => {
            let text = err.to_string();
            match text.find(" (os error") {
                Some(at) => text[..at].to_string(),
                None => text,
            }
        }
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
        let mut err = Vec::new();
        let code = match execute(args, &mut out, &mut err) {
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

    /// A folder of input files, removed when dropped.
    struct Inputs(tempfile::TempDir);

    impl Inputs {
        fn new() -> Inputs {
            match tempfile::Builder::new().prefix("decode-cli-").tempdir() {
                Ok(dir) => Inputs(dir),
                Err(err) => panic!("cannot create a temp folder: {err}"),
            }
        }

        fn file(&self, name: &str, content: &[u8]) -> PathBuf {
            let path = self.0.path().join(name);
            match std::fs::write(&path, content) {
                Ok(()) => path,
                Err(err) => panic!("cannot write a temp file: {err}"),
            }
        }
    }

    /// Stdout and stderr of `execute`, and its exit code.
    fn run_raw(args: &DecodeArgs) -> (String, String, ExitCode) {
        let (mut out, mut err) = (Vec::new(), Vec::new());
        let code = match execute(args, &mut out, &mut err) {
            Ok(code) => code,
            Err(err) => panic!("execute failed: {err:#}"),
        };
        let text = |bytes: Vec<u8>| String::from_utf8_lossy(&bytes).into_owned();
        (text(out), text(err), code)
    }

    #[test]
    fn a_missing_file_is_a_usage_error_naming_the_path() {
        let (out, err, code) = run_raw(&args(PathBuf::from("/nonexistent/value.json")));
        assert_eq!(code, ExitCode::from(EXIT_USAGE));
        assert_eq!(out, "");
        assert_eq!(
            err,
            "error: cannot read `/nonexistent/value.json`: no such file; give the path of a readable file (`-` reads standard input)\n"
        );
    }

    #[test]
    fn a_missing_key_file_is_a_usage_error_naming_the_flag() {
        let inputs = Inputs::new();
        let mut args = args(inputs.file("value.json", b"{}"));
        args.key = Some(PathBuf::from("/nonexistent/key.json"));
        let (out, err, code) = run_raw(&args);
        assert_eq!(code, ExitCode::from(EXIT_USAGE));
        assert_eq!(out, "");
        assert!(
            err.starts_with("error: cannot read --key `/nonexistent/key.json`: no such file;"),
            "{err}"
        );
        assert_eq!(err.lines().count(), 1, "{err}");
    }

    #[test]
    fn an_empty_file_is_a_tombstone() {
        let inputs = Inputs::new();
        let (line, code) = run(&args(inputs.file("empty.json", b"")));
        assert_eq!(code, ExitCode::SUCCESS);
        assert_eq!(line, json!({"skip": "tombstone"}));
    }

    #[test]
    fn a_json_null_is_a_tombstone() {
        let inputs = Inputs::new();
        for content in [&b"null"[..], b"null\n", b"  null \r\n\t", b"\n"] {
            let (line, code) = run(&args(inputs.file("null.json", content)));
            assert_eq!(code, ExitCode::SUCCESS, "{content:?}");
            assert_eq!(line, json!({"skip": "tombstone"}), "{content:?}");
        }
    }

    #[test]
    fn null_inside_a_value_is_not_a_tombstone() {
        let inputs = Inputs::new();
        for content in [&b"nullx"[..], b"[null]", b"\"null\""] {
            let (line, code) = run(&args(inputs.file("value.json", content)));
            assert_eq!(
                code,
                ExitCode::from(EXIT_UNDECODABLE),
                "{content:?}: {line}"
            );
        }
    }

    #[test]
    fn an_event_prints_every_field() {
        let value = br#"{"before":null,"after":{"event_id":"0192f4b7-1c3d-7e4f-9a50-3b6c7d8e9f10","sequence_id":104,"aggregate_id":"7d3c9a52-1e4f-4b8a-9c61-2f5e8d7a4b10","aggregate_type":"User","event_type":"UserCreated","payload":"{\"email\": \"a@example.com\"}","created_at":"2026-09-15T09:41:07.509871Z"},"source":{},"op":"c"}"#;
        let inputs = Inputs::new();
        let (line, code) = run(&args(inputs.file("insert.json", value)));
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
        let inputs = Inputs::new();
        let mut args = args(inputs.file("routed.json", br#""{\"a\": 1}""#));
        args.key = Some(inputs.file("routed.key", b"\"7d3c9a52-1e4f-4b8a-9c61-2f5e8d7a4b10\""));
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
