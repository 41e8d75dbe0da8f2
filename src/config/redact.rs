//! Keeping secrets out of messages and logs: the MongoDB URI printed without
//! its credentials, and any text cleared of the secrets of a configuration.

use super::Config;

/// Query options of a MongoDB URI whose values are secrets (lowercase).
const SECRET_URI_OPTIONS: &[&str] = &[
    "authmechanismproperties",
    "proxypassword",
    "sslpemkeypassword",
    "tlscertificatekeyfilepassword",
];

/// The URI without its credentials: everything between the scheme and the
/// last `@` (a password may hold `/`, `?` or `@` unescaped, so the last one is
/// where the hosts begin) and the values of secret options become `***`.
pub fn redact_uri(uri: &str) -> String {
    let (scheme, rest) = match uri.find("://") {
        Some(at) => uri.split_at(at + 3),
        None => ("", uri),
    };
    match rest.rfind('@') {
        Some(at) => format!("{scheme}***@{}", redact_options(&rest[at + 1..])),
        None => format!("{scheme}{}", redact_options(rest)),
    }
}

fn redact_options(hosts_and_options: &str) -> String {
    let Some((hosts, options)) = hosts_and_options.split_once('?') else {
        return hosts_and_options.to_string();
    };
    let options: Vec<String> = options
        .split('&')
        .map(|option| match option.split_once('=') {
            Some((name, _)) if SECRET_URI_OPTIONS.contains(&name.to_ascii_lowercase().as_str()) => {
                format!("{name}=***")
            }
            _ => option.to_string(),
        })
        .collect();
    format!("{hosts}?{}", options.join("&"))
}

/// The secrets a MongoDB URI holds, as they may appear in a message: the user
/// information (whole, and each part of it after the user name, raw and
/// percent-decoded) and the values of secret options.
pub fn uri_secrets(uri: &str) -> Vec<String> {
    let rest = uri.split_once("://").map_or(uri, |(_, rest)| rest);
    let mut secrets = Vec::new();
    let hosts_and_options = match rest.rfind('@') {
        Some(at) => {
            let user_info = &rest[..at];
            secrets.push(user_info.to_string());
            if let Some((_, password)) = user_info.split_once(':') {
                secrets.push(password.to_string());
                secrets.extend(
                    password
                        .split([':', '/', '?', '#', '[', ']', '@'])
                        .map(str::to_string),
                );
            }
            &rest[at + 1..]
        }
        None => rest,
    };
    if let Some((_, options)) = hosts_and_options.split_once('?') {
        for option in options.split('&') {
            if let Some((name, value)) = option.split_once('=') {
                if SECRET_URI_OPTIONS.contains(&name.to_ascii_lowercase().as_str()) {
                    secrets.push(value.to_string());
                    secrets.extend(value.split([',', ':']).map(str::to_string));
                }
            }
        }
    }
    let decoded: Vec<String> = secrets.iter().filter_map(|s| percent_decode(s)).collect();
    secrets.extend(decoded);
    secrets.retain(|s| !s.is_empty());
    secrets
}

/// `%XX` sequences decoded, if there are any and they make UTF-8.
fn percent_decode(text: &str) -> Option<String> {
    if !text.contains('%') {
        return None;
    }
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (bytes[i], hex) {
            (b'%', Some(byte)) => {
                out.push(byte);
                i += 3;
            }
            (byte, _) => {
                out.push(byte);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok()
}

/// Why the MongoDB driver cannot read `uri` (not empty), without any of its
/// secrets.
pub(super) fn uri_problem(uri: &str) -> Option<String> {
    if uri.is_empty() {
        return None;
    }
    if !uri.starts_with("mongodb://") && !uri.starts_with("mongodb+srv://") {
        return Some(format!(
            "`{}` must start with mongodb:// or mongodb+srv://",
            redact_uri(uri)
        ));
    }
    // A URI is ASCII (anything else is percent-encoded); the driver's parser
    // also assumes it, and panics on some multi-byte text after a `%`.
    if !uri.is_ascii() {
        return Some(format!(
            "`{}` has characters that must be percent-encoded (a URI is ASCII)",
            redact_uri(uri)
        ));
    }
    let err = mongodb::options::ConnectionString::parse(uri).err()?;
    let reason = match err.kind.as_ref() {
        mongodb::error::ErrorKind::InvalidArgument { message, .. } => message.clone(),
        other => other.to_string(),
    };
    let secrets = uri_secrets(uri);
    let secrets: Vec<&str> = secrets.iter().map(String::as_str).collect();
    Some(format!(
        "`{}` is not a valid connection string: {}",
        redact_uri(uri),
        scrub(&reason, &secrets)
    ))
}

/// `text` with every occurrence of a non-empty value that stands apart
/// (not inside a longer word) replaced by `***`.
pub fn scrub(text: &str, values: &[&str]) -> String {
    let mut text = text.to_string();
    let mut values: Vec<&str> = values.iter().copied().filter(|v| !v.is_empty()).collect();
    // Longest first, so that a value containing another is cleared whole.
    values.sort_by_key(|v| std::cmp::Reverse(v.len()));
    values.dedup();
    let alphanumeric = |c: Option<char>| c.is_some_and(char::is_alphanumeric);
    for value in values {
        let mut out = String::with_capacity(text.len());
        let mut done = 0;
        while let Some(found) = text[done..].find(value) {
            let at = done + found;
            let end = at + value.len();
            let inside_word = (alphanumeric(text[..at].chars().last())
                && alphanumeric(value.chars().next()))
                || (alphanumeric(text[end..].chars().next()) && alphanumeric(value.chars().last()));
            out.push_str(&text[done..at]);
            out.push_str(if inside_word { value } else { "***" });
            done = end;
        }
        out.push_str(&text[done..]);
        text = out;
    }
    text
}

/// Whether a librdkafka property holds a secret (by its name).
pub fn is_secret_property(name: &str) -> bool {
    [
        "password",
        "secret",
        "token",
        "pem",
        "jaas",
        "oauthbearer.config",
    ]
    .iter()
    .any(|word| name.contains(word))
}

impl Config {
    /// Every secret of this configuration, in the forms it may take in a log
    /// line or message (as is, and escaped as in a JSON string).
    pub fn secrets(&self) -> Vec<String> {
        let mut secrets = vec![self.postgres.password.expose().to_string()];
        secrets.extend(uri_secrets(self.mongodb.uri.expose()));
        for properties in [
            &self.kafka.client_config,
            &self.kafka.consumer_config,
            &self.kafka.producer_config,
        ] {
            secrets.extend(
                properties
                    .0
                    .iter()
                    .filter(|(name, _)| is_secret_property(name))
                    .map(|(_, value)| value.clone()),
            );
        }
        let escaped: Vec<String> = secrets
            .iter()
            .filter_map(|s| {
                let json = serde_json::to_string(s).ok()?;
                let inner = json.get(1..json.len().saturating_sub(1))?;
                (inner != s).then(|| inner.to_string())
            })
            .collect();
        secrets.extend(escaped);
        secrets.retain(|s| !s.is_empty());
        secrets.sort();
        secrets.dedup();
        secrets
    }

    /// `text` cleared of every secret of this configuration.
    pub fn scrub(&self, text: &str) -> String {
        let secrets = self.secrets();
        let secrets: Vec<&str> = secrets.iter().map(String::as_str).collect();
        scrub(text, &secrets)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_and_secret_options_are_redacted() {
        for (uri, expected) in [
            (
                "mongodb://app:s3cret@db1:27017,db2/?replicaSet=rs",
                "mongodb://***@db1:27017,db2/?replicaSet=rs",
            ),
            (
                "mongodb://127.0.0.1:27017/?retryWrites=false",
                "mongodb://127.0.0.1:27017/?retryWrites=false",
            ),
            ("not a uri", "not a uri"),
            ("mongodb://u:pa/ss@h/db", "mongodb://***@h/db"),
            ("mongodb://u:pa?ss@h/db", "mongodb://***@h/db"),
            ("mongodb://u:p@ss@h", "mongodb://***@h"),
            ("mongodb://user:pw@[bad", "mongodb://***@[bad"),
            (
                "mongodb://h/?tls=true&tlsCertificateKeyFilePassword=k3y&w=1",
                "mongodb://h/?tls=true&tlsCertificateKeyFilePassword=***&w=1",
            ),
        ] {
            assert_eq!(redact_uri(uri), expected, "{uri}");
        }
    }

    #[test]
    fn uri_secrets_cover_every_part_of_the_password() {
        let secrets = uri_secrets("mongodb://u:pa%3Fss?x@h/?proxyPassword=pr0xy");
        for expected in [
            "u:pa%3Fss?x",
            "pa%3Fss?x",
            "pa%3Fss",
            "x",
            "pa?ss?x",
            "pr0xy",
        ] {
            assert!(
                secrets.iter().any(|s| s == expected),
                "{expected} not in {secrets:?}"
            );
        }
        assert!(uri_secrets("mongodb://h:27017/").is_empty());
    }

    #[test]
    fn a_uri_that_is_not_ascii_is_refused_before_the_driver_reads_it() {
        // `%` then multi-byte text made the driver's parser panic.
        let uri = "mongodb://u:p%\u{2496}\u{2496}@local/";
        let problem = uri_problem(uri).expect("refused");
        assert!(problem.contains("percent-encoded"), "{problem}");
        assert!(uri_problem("mongodb://u:p%C3%A9@local/").is_none());
    }

    #[test]
    fn an_unreadable_uri_is_described_without_its_password() {
        for uri in [
            "mongodb://user:S3CR3T@[bad",
            "mongodb://user:S3?CR3T@host",
            "mongodb://user:S3:CR3T@host",
            "mongodb://user:S3CR3T@host:port",
        ] {
            let problem = uri_problem(uri).expect("invalid");
            assert!(!problem.contains("S3"), "{problem}");
            assert!(!problem.contains("CR3T"), "{problem}");
        }
        assert_eq!(uri_problem("mongodb://user:pw@host:27017/db"), None);
    }

    #[test]
    fn scrubbing_replaces_values_that_stand_apart() {
        assert_eq!(
            scrub("Invalid value \"abc\" for property", &["abc", ""]),
            "Invalid value \"***\" for property"
        );
        assert_eq!(scrub("range 1..3 of 1x", &["1"]), "range ***..3 of 1x");
        assert_eq!(
            scrub("pw=s3cr3t-long", &["s3cr3t", "s3cr3t-long"]),
            "pw=***"
        );
    }
}
