//! The results of one `bench` run: figures, ratios, the machine they were
//! measured on; the terminal table, the JSON file and the comparison with an
//! earlier file.

use serde::{Deserialize, Serialize};
use std::fmt::Write;

/// Bumped when the meaning of a figure changes.
pub const FORMAT_VERSION: u32 = 1;

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Machine {
    pub hostname: String,
    pub cpu_model: String,
    pub cores: usize,
    pub memory_bytes: u64,
    pub kernel: String,
    pub postgres_version: String,
    pub mongodb_version: String,
    pub kafka: Option<String>,
    pub git_commit: String,
    pub binary_version: String,
}

/// How a figure improves.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Better {
    Higher,
    Lower,
    /// Context only (sizes, counts).
    Neither,
}

/// One measured number.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Figure {
    /// Stable key, e.g. `capture.ours.events_per_s`: what `--compare` matches on.
    pub id: String,
    /// Which numbered part of the run it belongs to, e.g. "3 capture".
    pub stage: String,
    /// What it is, for a person.
    pub label: String,
    pub value: f64,
    /// "events/s", "x", "ms", "MB", ...
    pub unit: String,
    pub better: Better,
}

/// A goal and whether this run met it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Target {
    pub goal: String,
    pub actual: String,
    pub met: bool,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Results {
    pub format: u32,
    pub started_at: String,
    pub duration_s: f64,
    pub machine: Machine,
    /// The options of the run (`--events`, ...).
    pub options: serde_json::Value,
    pub figures: Vec<Figure>,
    pub targets: Vec<Target>,
    /// Stages that did not run, with why.
    pub skipped: Vec<String>,
}

impl Results {
    pub fn push(
        &mut self,
        id: &str,
        stage: &str,
        label: &str,
        value: f64,
        unit: &str,
        better: Better,
    ) {
        self.figures.push(Figure {
            id: id.to_string(),
            stage: stage.to_string(),
            label: label.to_string(),
            value,
            unit: unit.to_string(),
            better,
        });
    }

    pub fn get(&self, id: &str) -> Option<f64> {
        self.figures
            .iter()
            .find(|f| f.id == id)
            .map(|f| f.value)
            .filter(|v| v.is_finite())
    }

    /// Records `numerator / denominator` as a ratio figure, when both exist.
    pub fn ratio(
        &mut self,
        id: &str,
        stage: &str,
        label: &str,
        numerator: &str,
        denominator: &str,
    ) {
        if let (Some(n), Some(d)) = (self.get(numerator), self.get(denominator)) {
            if d > 0.0 {
                self.push(id, stage, label, n / d, "x", Better::Higher);
            }
        }
    }

    pub fn target(&mut self, goal: &str, actual: String, met: bool) {
        self.targets.push(Target {
            goal: goal.to_string(),
            actual,
            met,
        });
    }
}

/// A number with few, meaningful digits.
pub fn format_value(value: f64, unit: &str) -> String {
    if !value.is_finite() {
        return "-".into();
    }
    let digits = if unit == "x" {
        2
    } else if value.abs() >= 100.0 {
        0
    } else if value.abs() >= 10.0 {
        1
    } else if value.abs() >= 0.1 {
        2
    } else {
        4
    };
    let number = format!("{value:.digits$}");
    // Thousands separators for big figures.
    let formatted = if digits == 0 && value.abs() >= 10_000.0 {
        let negative = number.starts_with('-');
        let raw = number.trim_start_matches('-');
        let mut out = String::new();
        for (i, c) in raw.chars().enumerate() {
            if i > 0 && (raw.len() - i) % 3 == 0 {
                out.push(',');
            }
            out.push(c);
        }
        if negative {
            format!("-{out}")
        } else {
            out
        }
    } else {
        number
    };
    if unit == "x" {
        format!("{formatted}x")
    } else {
        format!("{formatted} {unit}")
    }
}

/// The terminal table, grouped by stage; with `earlier`, a change column.
pub fn table(results: &Results, earlier: Option<&Results>) -> String {
    let mut rows: Vec<[String; 4]> = Vec::new();
    let mut stage = "";
    for figure in &results.figures {
        if figure.stage != stage {
            stage = &figure.stage;
            rows.push([
                figure.stage.clone(),
                String::new(),
                String::new(),
                String::new(),
            ]);
        }
        let change = earlier
            .and_then(|e| e.get(&figure.id))
            .map(|old| change_text(old, figure.value, figure.better))
            .unwrap_or_default();
        rows.push([
            format!("  {}", figure.label),
            format_value(figure.value, &figure.unit),
            earlier
                .and_then(|e| e.get(&figure.id))
                .map(|old| format_value(old, &figure.unit))
                .unwrap_or_default(),
            change,
        ]);
    }
    let header = earlier.map(|_| {
        [
            String::new(),
            "this run".to_string(),
            "earlier".to_string(),
            "change".to_string(),
        ]
    });
    // Column widths from every row that is laid out in columns (a stage's
    // heading stands on a line of its own), the header included.
    let widths: Vec<usize> = (0..4)
        .map(|i| {
            header
                .iter()
                .chain(rows.iter().filter(|r| !r[1].is_empty()))
                .map(|r| r[i].chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for row in header.iter().chain(&rows) {
        if row[1].is_empty() {
            let _ = writeln!(out, "{}", row[0]);
            continue;
        }
        let line = format!(
            "{:<w0$}  {:>w1$}  {:>w2$}  {}",
            row[0],
            row[1],
            row[2],
            row[3],
            w0 = widths[0],
            w1 = widths[1],
            w2 = widths[2]
        );
        let _ = writeln!(out, "{}", line.trim_end());
    }
    if !results.targets.is_empty() {
        let _ = writeln!(out, "\ntargets");
        for target in &results.targets {
            let mark = if target.met { "met   " } else { "missed" };
            let _ = writeln!(out, "  {mark}  {}: {}", target.goal, target.actual);
        }
    }
    for skipped in &results.skipped {
        let _ = writeln!(out, "skipped: {skipped}");
    }
    out
}

/// "+12.3% better", "-4.0% worse", "+1.0%".
pub fn change_text(old: f64, new: f64, better: Better) -> String {
    if old == 0.0 || !old.is_finite() || !new.is_finite() {
        return String::new();
    }
    let change = (new - old) / old.abs() * 100.0;
    let verdict = match better {
        _ if change.abs() < 5.0 => "",
        Better::Higher if change > 0.0 => " better",
        Better::Lower if change < 0.0 => " better",
        Better::Neither => "",
        _ => " worse",
    };
    format!("{change:+.1}%{verdict}")
}

/// The Markdown table for the README.
pub fn markdown(results: &Results) -> String {
    let mut out = String::from("| stage | measure | value |\n| --- | --- | --- |\n");
    for figure in &results.figures {
        let _ = writeln!(
            out,
            "| {} | {} | {} |",
            figure.stage,
            figure.label,
            format_value(figure.value, &figure.unit)
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Results {
        let mut r = Results::default();
        r.push(
            "a.rate",
            "1 stage",
            "ours",
            120_000.0,
            "events/s",
            Better::Higher,
        );
        r.push(
            "a.limit",
            "1 stage",
            "limit",
            100_000.0,
            "events/s",
            Better::Higher,
        );
        r.ratio("a.ratio", "1 stage", "ours / limit", "a.rate", "a.limit");
        r
    }

    #[test]
    fn ratios_divide_the_named_figures() {
        let r = sample();
        assert_eq!(r.get("a.ratio"), Some(1.2));
        let mut r = r;
        r.ratio("missing", "1 stage", "none", "a.rate", "nope");
        assert_eq!(r.get("missing"), None);
    }

    #[test]
    fn values_are_formatted_for_reading() {
        assert_eq!(format_value(123_456.7, "events/s"), "123,457 events/s");
        assert_eq!(format_value(1.234, "x"), "1.23x");
        assert_eq!(format_value(0.0123, "trips/event"), "0.0123 trips/event");
        assert_eq!(format_value(f64::NAN, "ms"), "-");
    }

    #[test]
    fn the_comparison_says_which_way_is_better() {
        assert_eq!(change_text(100.0, 120.0, Better::Higher), "+20.0% better");
        assert_eq!(change_text(100.0, 120.0, Better::Lower), "+20.0% worse");
        assert_eq!(change_text(100.0, 102.0, Better::Higher), "+2.0%");
        let old = sample();
        let mut new = sample();
        new.figures[0].value = 60_000.0;
        let text = table(&new, Some(&old));
        assert!(text.contains("-50.0% worse"), "{text}");
        assert!(text.contains("earlier"), "{text}");
    }

    /// Where `value` ends on the line of `text` that starts with `label`
    /// (its first occurrence after the label; with `last`, its last).
    fn value_end(text: &str, label: &str, value: &str, last: bool) -> usize {
        let line = text
            .lines()
            .find(|line| line.starts_with(label))
            .unwrap_or_else(|| panic!("no line {label:?} in\n{text}"));
        let rest = &line[label.len()..];
        let at = if last {
            rest.rfind(value)
        } else {
            rest.find(value)
        };
        let at = at.unwrap_or_else(|| panic!("no {value:?} on {line:?}"));
        label.len() + at + value.len()
    }

    fn end_of(text: &str, label: &str, value: &str) -> usize {
        value_end(text, label, value, false)
    }

    #[test]
    fn the_columns_align_whatever_the_lengths() {
        let mut old = Results::default();
        let mut new = Results::default();
        for r in [&mut old, &mut new] {
            r.push("a.x", "1 stage", "x", 1.0, "x", Better::Higher);
            r.push(
                "a.long",
                "1 stage",
                "a measure with a very long name indeed, longer than any other",
                123_456_789.0,
                "events/s",
                Better::Higher,
            );
            r.push(
                "b.y",
                "2 a stage whose name is longer than every label",
                "y",
                2.5,
                "ms",
                Better::Lower,
            );
        }
        new.figures[1].value = 7.0;
        let long = "  a measure with a very long name indeed, longer than any other";
        let text = table(&new, Some(&old));
        let this_run = [
            end_of(&text, "  x ", "1.00x"),
            end_of(&text, long, "7.00 events/s"),
            end_of(&text, "  y ", "2.50 ms"),
            end_of(&text, " ", "this run"),
        ];
        assert!(
            this_run.iter().all(|e| *e == this_run[0]),
            "{this_run:?}\n{text}"
        );
        let earlier = [
            value_end(&text, "  x ", "1.00x", true),
            end_of(&text, long, "123,456,789 events/s"),
            value_end(&text, "  y ", "2.50 ms", true),
            end_of(&text, " ", "earlier"),
        ];
        assert!(
            earlier.iter().all(|e| *e == earlier[0]),
            "{earlier:?}\n{text}"
        );
        // Values narrower than the header.
        let mut short = Results::default();
        short.push("c.x", "3 c", "x", 1.0, "x", Better::Higher);
        let text = table(&short, Some(&short));
        assert_eq!(
            end_of(&text, "  x ", "1.00x"),
            end_of(&text, " ", "this run"),
            "{text}"
        );
        assert_eq!(
            value_end(&text, "  x ", "1.00x", true),
            end_of(&text, " ", "earlier"),
            "{text}"
        );
        let alone = table(&new, None);
        let ends = [
            end_of(&alone, "  x ", "1.00x"),
            end_of(&alone, long, "7.00 events/s"),
            end_of(&alone, "  y ", "2.50 ms"),
        ];
        assert!(ends.iter().all(|e| *e == ends[0]), "{ends:?}\n{alone}");
        assert!(
            alone.contains("\n2 a stage whose name is longer than every label\n"),
            "{alone}"
        );
    }

    #[test]
    fn results_round_trip_through_json() {
        let mut r = sample();
        r.target("capture >= 0.95x", "1.20x".into(), true);
        let text = serde_json::to_string(&r).expect("json");
        let back: Results = serde_json::from_str(&text).expect("parse");
        assert_eq!(back, r);
        assert!(table(&r, None).contains("met"));
        assert!(markdown(&r).contains("| 1 stage | ours | 120,000 events/s |"));
    }
}
