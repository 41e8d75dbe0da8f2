//! Payloads nested deeper than the JSON parser goes: unknown fields are
//! ignored at any depth, so a too-deep member no handler reads is left out
//! instead of failing the event. Scanned without recursion.

/// The payload fields any handler reads (docs/design.md section 3).
const HANDLED_FIELDS: [&str; 11] = [
    "email",
    "displayName",
    "organizerId",
    "title",
    "startsAt",
    "maxParticipants",
    "location",
    "reason",
    "userId",
    "joinedAt",
    "activityId",
];

/// Nesting the parser takes in one go (serde_json stops at 128).
pub(super) const SHALLOW: usize = 100;

/// The bytes of a JSON text that are structure (outside strings), with their
/// offsets: a scan without recursion, whatever the depth.
struct Structure<'a> {
    bytes: std::iter::Enumerate<std::str::Bytes<'a>>,
    in_string: bool,
    escaped: bool,
}

fn structure(text: &str) -> Structure<'_> {
    Structure {
        bytes: text.bytes().enumerate(),
        in_string: false,
        escaped: false,
    }
}

impl Iterator for Structure<'_> {
    type Item = (usize, u8);

    fn next(&mut self) -> Option<(usize, u8)> {
        for (i, byte) in self.bytes.by_ref() {
            if !self.in_string {
                self.in_string = byte == b'"';
                return Some((i, byte));
            }
            match byte {
                _ if self.escaped => self.escaped = false,
                b'\\' => self.escaped = true,
                b'"' => self.in_string = false,
                _ => {}
            }
        }
        None
    }
}

/// The deepest nesting of objects and arrays in `text` (strings skipped).
pub(super) fn nesting(text: &str) -> usize {
    let (mut depth, mut deepest) = (0usize, 0usize);
    for (_, byte) in structure(text) {
        match byte {
            b'{' | b'[' => {
                depth += 1;
                deepest = deepest.max(depth);
            }
            b'}' | b']' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    deepest
}

/// A payload object with its too-deep members left out, when none of them is
/// a field a handler reads; `None` when it is not an object of well-formed
/// members, or a handled field is among the deep ones.
pub(super) fn shallow_payload(text: &str) -> Option<serde_json::Value> {
    let body = text.trim();
    let inner = body.strip_prefix('{')?.strip_suffix('}')?;
    let mut object = serde_json::Map::new();
    for (key, value) in top_level_members(inner)? {
        let key: String = serde_json::from_str(key).ok()?;
        if nesting(value) <= SHALLOW {
            object.insert(key, serde_json::from_str(value).ok()?);
        } else if HANDLED_FIELDS.contains(&key.as_str()) {
            return None;
        }
    }
    Some(serde_json::Value::Object(object))
}

/// The `"key": value` members of an object's body, as raw text, split at the
/// top level's commas (iteratively: any depth).
fn top_level_members(body: &str) -> Option<Vec<(&str, &str)>> {
    let mut members = Vec::new();
    let (mut depth, mut start, mut colon) = (0usize, 0usize, None);
    let mut scan = structure(body);
    for (i, byte) in scan.by_ref() {
        match byte {
            b'{' | b'[' => depth += 1,
            b'}' | b']' => depth = depth.checked_sub(1)?,
            b':' if depth == 0 && colon.is_none() => colon = Some(i),
            b',' if depth == 0 => {
                let at = colon.take()?;
                members.push((body[start..at].trim(), body[at + 1..i].trim()));
                start = i + 1;
            }
            _ => {}
        }
    }
    if depth != 0 || scan.in_string {
        return None;
    }
    match colon {
        Some(at) => members.push((body[start..at].trim(), body[at + 1..].trim())),
        None if body[start..].trim().is_empty() && members.is_empty() => {}
        None => return None,
    }
    Some(members)
}

#[cfg(test)]
mod tests {
    use super::super::json::parse_payload_text;
    use super::*;

    #[test]
    fn a_deep_unknown_field_is_ignored_and_a_deep_handled_one_is_an_error() {
        let deep = format!("{}1{}", "[".repeat(5_000), "]".repeat(5_000));
        let text = format!(r#"{{"email": "a@b", "x": {{"y": {deep}}}, "displayName": "A"}}"#);
        let payload = match parse_payload_text(&text) {
            Ok(payload) => payload,
            Err(err) => panic!("{err}"),
        };
        assert_eq!(
            payload,
            serde_json::json!({"email": "a@b", "displayName": "A"})
        );
        // Well-formed, so it decodes; a handler cannot read it.
        let handled = format!(r#"{{"email": "a@b", "location": {deep}}}"#);
        let handled = parse_payload_text(&handled).map(|p| p.value().is_none());
        assert_eq!(handled.ok(), Some(true));
        let array = parse_payload_text(&format!("[{deep}]")).map(|p| p.value().is_none());
        assert_eq!(array.ok(), Some(true));
        // Broken JSON stays an error whatever its depth.
        let broken = format!(r#"{{"email": "a@b", "x": {}"#, "[".repeat(500));
        assert!(parse_payload_text(&broken).is_err());
        // Strings with brackets and escaped quotes do not count as nesting.
        assert_eq!(nesting(r#"{"a": "[[[\"{{"}"#), 1);
        assert_eq!(
            top_level_members(r#""a": 1, "b": {"c": [1, 2]}"#),
            Some(vec![("\"a\"", "1"), ("\"b\"", r#"{"c": [1, 2]}"#)])
        );
        assert_eq!(top_level_members(""), Some(vec![]));
        assert_eq!(top_level_members(r#""a": "open"#), None);
        assert_eq!(top_level_members(r#""a": [1"#), None);
    }
}
