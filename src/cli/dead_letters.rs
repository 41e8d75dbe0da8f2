//! `dead-letters list | show | retry | discard | export` (README, "Dead
//! letters"). Safe while `run` runs: a re-emitted event is an ordinary new
//! outbox row, and the fences make any concurrent application harmless.

use super::prune::parse_age;
use crate::config::Config;
use crate::dead_letter::audit::{self, Action, Record};
use crate::dead_letter::manage::{self, Outcome, Patience, Stopped};
use crate::dead_letter::records::{self, rfc3339, Letter, Selection};
use crate::outbox;
use crate::store::mongo::{redact_uri, MongoStore};
use clap::{Args, Subcommand};
use std::fmt::Write as _;
use std::process::ExitCode;
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

#[derive(Args, Debug)]
pub struct DeadLettersArgs {
    #[command(subcommand)]
    pub command: DeadLettersCommand,
    /// Longest wait for MongoDB while it is unreachable (and for the
    /// outbox's lock when re-emitting).
    #[arg(long, global = true, value_name = "DURATION", value_parser = parse_age, default_value = "60s")]
    pub wait: Duration,
}

#[derive(Subcommand, Debug)]
pub enum DeadLettersCommand {
    /// The dead letters as a table: id, event type, aggregate, error, attempts, first and last failure.
    List {
        #[command(flatten)]
        filters: Filters,
        /// One JSON object per line instead of the table.
        #[arg(long)]
        json: bool,
        /// The discarded letters (with reason and time) instead.
        #[arg(long, conflicts_with = "retried")]
        discarded: bool,
        /// The retried letters (with the re-emitted event) instead.
        #[arg(long)]
        retried: bool,
    },
    /// One dead letter in full, payload included.
    Show {
        #[arg(value_parser = letter_id)]
        id: Uuid,
        /// As one JSON object.
        #[arg(long)]
        json: bool,
    },
    /// Re-emit events at the end of the outbox (new event ids, same aggregate,
    /// type and payload), so they take effect through the normal pipeline;
    /// each letter moves to the audit collection.
    Retry(Select),
    /// Move dead letters to the audit collection with a reason (never deleted silently).
    Discard {
        #[command(flatten)]
        select: Select,
        /// Why (kept with the letter).
        #[arg(long, value_name = "TEXT", value_parser = non_blank)]
        reason: String,
    },
    /// Every dead letter in full, one JSON object per line.
    Export {
        /// The output format (only jsonl).
        #[arg(long, value_name = "jsonl", default_value = "jsonl", value_parser = ["jsonl"])]
        format: String,
        #[command(flatten)]
        filters: Filters,
    },
}

/// The filters that narrow a selection.
#[derive(Args, Debug, Default, Clone)]
pub struct Filters {
    /// Only letters of this event type.
    #[arg(long = "type", value_name = "EVENT_TYPE")]
    pub event_type: Option<String>,
    /// Only letters whose error contains this text (case-insensitive).
    #[arg(long, value_name = "TEXT")]
    pub error: Option<String>,
    /// Only letters that failed last within this long (e.g. 2h, 7d).
    #[arg(long, value_name = "DURATION", value_parser = parse_age)]
    pub since: Option<Duration>,
}

/// Which letters `retry` and `discard` act on: given ids, or `--all` (that pass the filters).
#[derive(Args, Debug, Clone)]
#[group(id = "which", required = true, multiple = false, args = ["ids", "all"])]
pub struct Select {
    /// Dead letter ids (the dead-lettered events' ids).
    #[arg(value_parser = letter_id)]
    pub ids: Vec<Uuid>,
    /// Every dead letter that passes the filters.
    #[arg(long)]
    pub all: bool,
    #[command(flatten)]
    pub filters: Filters,
}

/// A dead letter's id: the dead-lettered event's id, a UUID.
fn letter_id(raw: &str) -> Result<Uuid, String> {
    raw.trim().parse().map_err(|_| {
        format!("`{raw}` is not a dead letter id: give an id from the first column of `event-processor dead-letters list` (a UUID)")
    })
}

fn non_blank(raw: &str) -> Result<String, String> {
    if raw.trim().is_empty() {
        Err("give a reason (it is kept with the letter)".into())
    } else {
        Ok(raw.trim().to_string())
    }
}

impl Filters {
    fn selection(&self, ids: Vec<Uuid>) -> Selection {
        Selection {
            ids,
            event_type: self.event_type.clone(),
            error: self.error.clone(),
            since: self.since,
        }
    }
}

/// Runs the subcommand.
pub async fn execute(config: &Config, args: DeadLettersArgs) -> anyhow::Result<ExitCode> {
    let interrupt = CancellationToken::new();
    let on_signal = interrupt.clone();
    tokio::spawn(async move {
        if tokio::signal::ctrl_c().await.is_ok() {
            on_signal.cancel();
        }
    });
    let patience = Patience::new(&config.pipeline, interrupt, args.wait);
    // Retry needs the outbox: without it, nothing may change (asked first,
    // so that it is said before any wait for MongoDB).
    let pg = match &args.command {
        DeadLettersCommand::Retry(_) => Some(connect_outbox(config).await?),
        _ => None,
    };
    let store = match connect(config, &patience).await {
        Ok(store) => store,
        Err(Stopped::Interrupted) => return stopped_before_any_change(Stopped::Interrupted),
        Err(stopped) => {
            return Err(anyhow::Error::new(stopped).context(format!(
                "cannot use MongoDB at {}; nothing changed",
                redact_uri(config.mongodb.uri.expose())
            )))
        }
    };
    let stdout = &mut std::io::stdout().lock();
    match args.command {
        DeadLettersCommand::List {
            filters,
            json,
            discarded,
            retried,
        } => {
            let audited = match (discarded, retried) {
                (true, _) => Some("discarded"),
                (_, true) => Some("retried"),
                _ => None,
            };
            write(stdout, &list(&store, &filters, json, audited).await?)?;
        }
        DeadLettersCommand::Show { id, json } => return show(&store, id, json, stdout).await,
        DeadLettersCommand::Export { filters, .. } => {
            let selection = filters.selection(Vec::new());
            let mut line = |letter: Letter| -> std::io::Result<()> {
                use std::io::Write as _;
                writeln!(stdout, "{}", letter.to_json())
            };
            records::each(&store, &selection, &mut line).await?;
            std::io::Write::flush(stdout)?;
        }
        DeadLettersCommand::Retry(select) => {
            let mut pg = match pg {
                Some(pg) => pg,
                None => connect_outbox(config).await?,
            };
            return act(&store, &patience, &select, Act::Retry(&mut pg), stdout).await;
        }
        DeadLettersCommand::Discard { select, reason } => {
            return act(&store, &patience, &select, Act::Discard(&reason), stdout).await;
        }
    }
    Ok(ExitCode::SUCCESS)
}

async fn connect_outbox(config: &Config) -> anyhow::Result<tokio_postgres::Client> {
    outbox::connect(&config.postgres).await.map_err(|e| {
        anyhow::Error::new(e).context(
            "dead-letters retry re-emits events into the outbox, which is unreachable: nothing changed",
        )
    })
}

/// The table (or JSON lines) of the dead letters, or of the audit records
/// of one action.
async fn list(
    store: &MongoStore,
    filters: &Filters,
    json: bool,
    audited: Option<&str>,
) -> anyhow::Result<String> {
    let selection = filters.selection(Vec::new());
    Ok(match audited {
        None => render_letters(&records::select(store, &selection).await?, json),
        Some(action) => render_records(&audit::list(store, action, &selection).await?, json),
    })
}

fn write(out: &mut impl std::io::Write, text: &str) -> anyhow::Result<()> {
    out.write_all(text.as_bytes())?;
    out.flush()?;
    Ok(())
}

/// MongoDB, waited for while it is unreachable.
async fn connect(config: &Config, patience: &Patience) -> Result<MongoStore, Stopped> {
    let uri = config.mongodb.uri.expose();
    let database = &config.mongodb.database;
    // Short attempts, so that the wait is said early and `--wait` holds.
    let attempt = (patience.wait / 4).clamp(Duration::from_millis(200), Duration::from_secs(5));
    patience
        .mongo(async || MongoStore::connect_within(uri, database, Some(attempt)).await)
        .await
}

fn stopped_before_any_change(stopped: Stopped) -> anyhow::Result<ExitCode> {
    match stopped {
        Stopped::Interrupted => {
            eprintln!("interrupted: nothing changed");
            Ok(ExitCode::from(130))
        }
        other => Err(anyhow::Error::new(other).context("nothing changed")),
    }
}

async fn show(
    store: &MongoStore,
    id: Uuid,
    json: bool,
    out: &mut impl std::io::Write,
) -> anyhow::Result<ExitCode> {
    let selection = Selection {
        ids: vec![id],
        ..Selection::default()
    };
    if let Some(letter) = records::select(store, &selection).await?.pop() {
        let text = if json {
            format!("{}\n", letter.to_json())
        } else {
            format!("{:#}\n", letter.to_json())
        };
        write(out, &text)?;
        return Ok(ExitCode::SUCCESS);
    }
    match audit::find(store, &[id.to_string()]).await?.pop() {
        Some(record) => {
            let done = describe_record(&record);
            write(out, &format!("{id}: no longer a dead letter: {done}\n"))?;
            Ok(ExitCode::SUCCESS)
        }
        None => {
            eprintln!("error: no dead letter {id}");
            Ok(ExitCode::from(super::EXIT_FAILURE))
        }
    }
}

enum Act<'a> {
    Retry(&'a mut tokio_postgres::Client),
    Discard(&'a str),
}

/// `retry` or `discard`: the selection (every given id must be known,
/// else nothing changes), then the action, printing each letter's outcome.
async fn act(
    store: &MongoStore,
    patience: &Patience,
    select: &Select,
    action: Act<'_>,
    out: &mut impl std::io::Write,
) -> anyhow::Result<ExitCode> {
    let selection = select.filters.selection(select.ids.clone());
    let letters = match patience
        .mongo(async || records::select(store, &selection).await)
        .await
    {
        Ok(letters) => letters,
        Err(stopped) => return stopped_before_any_change(stopped),
    };
    if let Some(code) = check_ids(store, patience, &select.ids, &letters, out).await? {
        return Ok(code);
    }
    if letters.is_empty() {
        write(out, "no dead letters selected: nothing to do\n")?;
        return Ok(ExitCode::SUCCESS);
    }
    let mut refused = 0;
    let mut say = |letter: &Letter, outcome: &Outcome| {
        refused += usize::from(matches!(outcome, Outcome::Refused(_)));
        let _ = write(out, &format!("{}\n", describe_outcome(letter, outcome)));
    };
    let result = match action {
        Act::Retry(pg) => manage::retry(pg, store, patience, letters, &mut say).await,
        Act::Discard(reason) => manage::discard(store, patience, letters, reason, &mut say).await,
    };
    match result {
        Ok(()) if refused > 0 => {
            eprintln!("error: {refused} dead letters could not be re-emitted (see above)");
            Ok(ExitCode::from(super::EXIT_FAILURE))
        }
        Ok(()) => Ok(ExitCode::SUCCESS),
        Err(stopped) => {
            let code = if matches!(stopped, Stopped::Interrupted) {
                130
            } else {
                super::EXIT_FAILURE
            };
            eprintln!(
                "error: {stopped}: the letters printed above are done; run the same command \
                 again to finish the rest (it never re-emits a letter twice)"
            );
            Ok(ExitCode::from(code))
        }
    }
}

/// Given ids that are not dead letters: already handled ones are said (not
/// an error), unknown ones stop the command before any change (exit 1).
async fn check_ids(
    store: &MongoStore,
    patience: &Patience,
    ids: &[Uuid],
    letters: &[Letter],
    out: &mut impl std::io::Write,
) -> anyhow::Result<Option<ExitCode>> {
    let missing: Vec<String> = ids
        .iter()
        .map(Uuid::to_string)
        .filter(|id| !letters.iter().any(|l| &l.id == id))
        .collect();
    if missing.is_empty() {
        return Ok(None);
    }
    let audited = match patience
        .mongo(async || audit::find(store, &missing).await)
        .await
    {
        Ok(found) => found,
        Err(stopped) => return stopped_before_any_change(stopped).map(Some),
    };
    let unknown: Vec<&String> = missing
        .iter()
        .filter(|id| !audited.iter().any(|r| &&r.letter.id == id))
        .collect();
    if !unknown.is_empty() {
        eprintln!(
            "error: no dead letter with id {}: nothing changed (`dead-letters list` shows them)",
            unknown
                .iter()
                .map(|s| s.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        );
        return Ok(Some(ExitCode::from(super::EXIT_FAILURE)));
    }
    for record in &audited {
        let done = describe_record(record);
        write(out, &format!("{}: already {done}\n", record.letter.id))?;
    }
    Ok(None)
}

fn describe_outcome(letter: &Letter, outcome: &Outcome) -> String {
    let what = format!(
        "{} {} {} {}",
        letter.id, letter.event_type, letter.aggregate_type, letter.aggregate_id
    );
    match outcome {
        Outcome::ReEmitted {
            event_id,
            sequence_id,
        } => format!(
            "{what}: re-emitted as {event_id} (sequence_id {})",
            seq(*sequence_id)
        ),
        Outcome::AlreadyReEmitted {
            event_id,
            sequence_id,
        } => format!(
            "{what}: already re-emitted as {event_id} (sequence_id {}), not again",
            seq(*sequence_id)
        ),
        Outcome::Discarded => format!("{what}: discarded"),
        Outcome::Refused(why) => format!("{what}: not re-emitted: {why}"),
        Outcome::Waiting => format!(
            "{what}: not re-emitted: the kafka consumer still tries it (its aggregate \
             may yet be created); retry it once its error no longer says it waits"
        ),
    }
}

/// What was done with a letter: "retried at ..., re-emitted as ..." or
/// "discarded at ...: reason".
fn describe_record(record: &Record) -> String {
    let at = record.at.map_or("-".into(), |t| rfc3339(&t));
    match &record.action {
        Action::Retried {
            event_id,
            sequence_id,
        } => format!(
            "retried at {at}, re-emitted as {event_id} (sequence_id {})",
            seq(*sequence_id)
        ),
        Action::Discarded { reason } => format!("discarded at {at}: {reason}"),
    }
}

fn seq(sequence_id: Option<i64>) -> String {
    sequence_id.map_or("?".into(), |s| s.to_string())
}

/// The table (or JSON lines) of `list`.
fn render_letters(letters: &[Letter], json: bool) -> String {
    let mut out = String::new();
    if json {
        for letter in letters {
            let _ = writeln!(out, "{}", letter.summary_json());
        }
        return out;
    }
    if letters.is_empty() {
        return "no dead letters\n".into();
    }
    let _ = writeln!(
        out,
        "{:<36}  {:<18}  {:<45}  {:>8}  {:<24}  {:<24}  ERROR",
        "ID", "EVENT TYPE", "AGGREGATE", "ATTEMPTS", "FIRST FAILED", "LAST FAILED"
    );
    for l in letters {
        let _ = writeln!(
            out,
            "{:<36}  {:<18}  {:<45}  {:>8}  {:<24}  {:<24}  {}",
            l.id,
            l.event_type,
            format!("{} {}", l.aggregate_type, l.aggregate_id),
            l.attempts,
            l.first_failed_at.map_or("-".into(), |t| rfc3339(&t)),
            l.last_failed_at.map_or("-".into(), |t| rfc3339(&t)),
            one_line(&l.error)
        );
    }
    let _ = writeln!(out, "{} dead letters", letters.len());
    out
}

fn render_records(records: &[Record], json: bool) -> String {
    let mut out = String::new();
    for record in records {
        if json {
            let _ = writeln!(out, "{}", record.to_json());
        } else {
            let _ = writeln!(
                out,
                "{} {} {} {}",
                record.letter.id,
                record.letter.event_type,
                record.letter.aggregate_type,
                record.letter.aggregate_id
            );
            let _ = writeln!(out, "    {}", describe_record(record));
            let _ = writeln!(out, "    error: {}", one_line(&record.letter.error));
        }
    }
    if !json {
        let _ = writeln!(out, "{} dead letters moved to the audit", records.len());
    }
    out
}

/// An error on one line, cut to a readable length.
fn one_line(text: &str) -> String {
    let line: String = text.split_whitespace().collect::<Vec<_>>().join(" ");
    match line.char_indices().nth(120) {
        Some((cut, _)) => format!("{}…", &line[..cut]),
        None => line,
    }
}
