//! What to do about a failure at run time, said after what went wrong on the
//! same line, in the terms the user typed: a setting given by a flag is named
//! by the flag, else by its key. The README's "Troubleshooting" table lists
//! the same cases.

use crate::config::{Flag, GLOBAL_FLAGS};

/// `message` with what to do appended (`; ...`) when the failure is one a
/// user can fix; unchanged otherwise.
pub fn with_hint(message: &str, given: &[(Flag, String)]) -> String {
    match hint(message, given) {
        Some(hint) => format!("{message}; {hint}"),
        None => message.to_string(),
    }
}

/// The setting `key`, as the user gave it: `--flag` if a flag set it, else
/// the key, with the flag that could set it in parentheses.
fn name(key: &str, given: &[(Flag, String)]) -> String {
    if let Some((flag, _)) = given.iter().find(|(flag, _)| flag.key == key) {
        return format!("--{}", flag.long);
    }
    match GLOBAL_FLAGS.iter().find(|flag| flag.key == key) {
        Some(flag) => format!("{key} (--{})", flag.long),
        None => key.to_string(),
    }
}

fn hint(message: &str, given: &[(Flag, String)]) -> Option<String> {
    let text = message.to_ascii_lowercase();
    let has = |needle: &str| text.contains(needle);
    if has("cannot connect to postgresql") {
        let credentials = has("password authentication failed")
            || has("no pg_hba.conf entry")
            || (has("role \"") && has("does not exist"));
        return Some(if credentials {
            format!(
                "check {} and POSTGRES_PASSWORD",
                name("POSTGRES_USER", given)
            )
        } else if has("database \"") && has("does not exist") {
            format!(
                "check {}, or create that database",
                name("POSTGRES_DB", given)
            )
        } else {
            format!(
                "check {} and {}, and that PostgreSQL is running there",
                name("POSTGRES_HOST", given),
                name("POSTGRES_PORT", given)
            )
        });
    }
    let says_migrate = has("event-processor migrate") || has("migrate` first");
    if has("event_outbox") && has("does not exist") && !says_migrate {
        return Some("run `event-processor migrate` first".to_string());
    }
    if has("mongodb") {
        if has("authentication failed") {
            return Some(
                "check the user name and password in MONGODB_URI (and its authSource)".to_string(),
            );
        }
        if has("no server available") || has("mongodb unavailable") {
            return Some(
                "check the host and port in MONGODB_URI, and that MongoDB is running there"
                    .to_string(),
            );
        }
    }
    if has("cannot reach the kafka brokers") {
        return Some("check KAFKA_BROKERS, and that the brokers are running there".to_string());
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::RUN_FLAGS;

    #[test]
    fn postgres_settings_are_named_as_given() {
        let refused = "cannot connect to PostgreSQL at h:1/db: error connecting to server: Connection refused (os error 111)";
        assert_eq!(
            with_hint(refused, &[]),
            format!("{refused}; check POSTGRES_HOST (--postgres-host) and POSTGRES_PORT (--postgres-port), and that PostgreSQL is running there")
        );
        let port = GLOBAL_FLAGS[1];
        assert_eq!(port.key, "POSTGRES_PORT");
        assert_eq!(
            with_hint(refused, &[(port, "1".into())]),
            format!("{refused}; check POSTGRES_HOST (--postgres-host) and --postgres-port, and that PostgreSQL is running there")
        );
        let role = "cannot connect to PostgreSQL at h:1/db: role \"nobody\" does not exist";
        assert!(with_hint(role, &[])
            .ends_with("; check POSTGRES_USER (--postgres-user) and POSTGRES_PASSWORD"));
        let db = "cannot connect to PostgreSQL at h:1/nodb: database \"nodb\" does not exist";
        assert!(with_hint(db, &[])
            .ends_with("; check POSTGRES_DB (--postgres-db), or create that database"));
    }

    #[test]
    fn mongodb_and_kafka_failures_name_their_setting() {
        let auth = "cannot use MongoDB at mongodb://***@h:1/: mongodb: authentication failed: SCRAM failure: authentication failed";
        assert!(with_hint(auth, &[])
            .ends_with("; check the user name and password in MONGODB_URI (and its authSource)"));
        let down = "cannot reach MongoDB at mongodb://h:1/: mongodb unavailable: no server available within the server selection timeout";
        assert!(with_hint(down, &[]).contains("; check the host and port in MONGODB_URI"));
        let kafka = "cannot reach the Kafka brokers at h:1 within 2s";
        assert!(with_hint(kafka, &[])
            .ends_with("; check KAFKA_BROKERS, and that the brokers are running there"));
    }

    #[test]
    fn other_failures_are_left_as_they_are() {
        let said = "verify: 2 mismatches";
        assert_eq!(with_hint(said, &[(RUN_FLAGS[0], "polling".into())]), said);
        let already = "table event_outbox does not exist in this database: run `event-processor migrate` first";
        assert_eq!(with_hint(already, &[]), already);
        let asked = "cannot prepare the seed insert (run `migrate` first?): relation \"event_outbox\" does not exist";
        assert_eq!(with_hint(asked, &[]), asked);
    }
}
