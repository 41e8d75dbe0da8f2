//! Self-contained SVG charts for the event-processor benchmark report.
//!
//! * [`latency_svg`] draws a histogram of commit-to-read-model latencies (ms)
//!   with named percentiles (p50, p99, max, ...) as dashed, labelled lines.
//!   When the data spans more than ~2 orders of magnitude the x axis is capped
//!   at 1.1 × p99.9; the values above it land in a red "overflow" bucket and a
//!   note gives their count.
//! * [`throughput_svg`] draws events/s over time for one or more named series,
//!   with a legend in the top-right corner and the y axis starting at 0.
//!
//! The output is a plain SVG string (no scripts, no external resources) that
//! renders in browsers and on GitHub. Non-finite inputs are skipped; empty
//! input yields a valid chart saying "no data".

use std::fmt::Write;

const W: f64 = 800.0;
const H: f64 = 400.0;
const PL: f64 = 72.0; // plot padding: left, right, top, bottom
const PR: f64 = 24.0;
const PT: f64 = 44.0;
const PB: f64 = 52.0;
const BUCKETS: usize = 50;
const PALETTE: [&str; 6] = [
    "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b",
];

/// Escapes the XML special characters in `s`.
fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// Compact number: 12000 -> "12k", 1500000 -> "1.5M", 3.67 -> "3.7", 0.05 -> "0.05".
fn fmt_num(v: f64) -> String {
    let (s, suffix) = match v.abs() {
        a if a >= 1e9 => (v / 1e9, "G"),
        a if a >= 1e6 => (v / 1e6, "M"),
        a if a >= 1e3 => (v / 1e3, "k"),
        _ => (v, ""),
    };
    let digits = usize::from(s.abs() < 100.0) + usize::from(s.abs() < 1.0);
    let mut t = format!("{:.*}", digits, s + 0.0);
    if t.contains('.') {
        t = t.trim_end_matches('0').trim_end_matches('.').to_string();
    }
    if t == "-0" {
        t = "0".to_string();
    }
    t + suffix
}

/// A "nice" step (1, 2 or 5 × 10^k) giving roughly `target` intervals over `range`.
fn nice_step(range: f64, target: f64) -> f64 {
    let raw = (range / target).max(f64::MIN_POSITIVE);
    let mag = 10f64.powf(raw.log10().floor());
    let m = [1.0, 2.0, 5.0].into_iter().find(|m| raw / mag <= m + 1e-9);
    m.unwrap_or(10.0) * mag
}

/// Rounds `max` up to a multiple of a nice step; returns (axis end, step).
fn nice_ceil(max: f64, target: f64) -> (f64, f64) {
    let step = nice_step(max, target);
    ((max / step - 1e-9).ceil().max(1.0) * step, step)
}

/// Value of the `q` quantile of sorted, non-empty `v` (nearest rank).
fn pct(v: &[f64], q: f64) -> f64 {
    let i = ((v.len().saturating_sub(1)) as f64 * q).round() as usize;
    v.get(i).copied().unwrap_or(0.0)
}

/// Writes a `<text>` element; `body` is escaped.
fn text(o: &mut String, x: f64, y: f64, attrs: &str, body: &str) {
    let body = esc(body);
    let _ = write!(o, r#"<text x="{x:.1}" y="{y:.1}" {attrs}>{body}</text>"#);
}

/// Writes a `<line>` element.
fn line(o: &mut String, (x1, y1): (f64, f64), (x2, y2): (f64, f64), attrs: &str) {
    let _ = write!(
        o,
        r#"<line x1="{x1:.1}" y1="{y1:.1}" x2="{x2:.1}" y2="{y2:.1}" {attrs}/>"#
    );
}

const HALO: &str = r##"stroke="#fff" stroke-width="3" paint-order="stroke""##;
const GRID: &str = r##"stroke="#e6e6e6""##;

struct Frame {
    x0: f64,
    x1: f64,
    y1: f64,
}

impl Frame {
    fn px(&self, x: f64) -> f64 {
        PL + (x - self.x0) / (self.x1 - self.x0) * (W - PL - PR)
    }
    fn py(&self, y: f64) -> f64 {
        H - PB - y / self.y1 * (H - PT - PB)
    }
}

fn header(title: &str) -> String {
    let mut o = format!(
        r##"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" font-family="Helvetica, Arial, sans-serif" font-size="12" fill="#333"><rect width="{W}" height="{H}" fill="#ffffff"/>"##
    );
    let attrs = r##"font-size="16" font-weight="bold" text-anchor="middle" fill="#222""##;
    text(&mut o, W / 2.0, 26.0, attrs, title);
    o
}

fn no_data(mut o: String) -> String {
    let attrs = r##"font-size="18" text-anchor="middle" fill="#888""##;
    text(&mut o, W / 2.0, H / 2.0, attrs, "no data");
    o + "</svg>"
}

/// Gridlines, ticks, tick labels, axis lines and axis titles.
fn axes(o: &mut String, f: &Frame, (xstep, ystep): (f64, f64), (xlabel, ylabel): (&str, &str)) {
    let (left, right, top, bottom) = (PL, W - PR, PT, H - PB);
    let first = (f.x0 / xstep - 1e-9).ceil() as i64;
    for v in (first..=(f.x1 / xstep + 1e-9) as i64).map(|i| i as f64 * xstep) {
        let (x, label) = (f.px(v), fmt_num(v));
        line(o, (x, top), (x, bottom), GRID);
        text(o, x, bottom + 16.0, r#"text-anchor="middle""#, &label);
    }
    for v in (0..=(f.y1 / ystep + 1e-9) as i64).map(|i| i as f64 * ystep) {
        let (y, label) = (f.py(v), fmt_num(v));
        line(o, (left, y), (right, y), GRID);
        text(o, left - 6.0, y + 4.0, r#"text-anchor="end""#, &label);
    }
    let axis = format!("M{left} {top}V{bottom}H{right}");
    let _ = write!(o, r##"<path d="{axis}" fill="none" stroke="#444"/>"##);
    let mid = r#"text-anchor="middle" font-size="13""#;
    text(o, (left + right) / 2.0, H - 12.0, mid, xlabel);
    let (cy, label) = ((top + bottom) / 2.0, esc(ylabel));
    let rot = format!("translate(18 {cy}) rotate(-90)");
    let _ = write!(o, r#"<text transform="{rot}" {mid}>{label}</text>"#);
}

/// A histogram of commit-to-read-model latencies, in milliseconds, with the
/// named percentiles drawn as labelled vertical lines (e.g. ("p50", 3.2), ("p99", 12.0), ("max", 40.1)).
pub fn latency_svg(title: &str, latencies_ms: &[f64], marks: &[(&str, f64)]) -> String {
    let mut o = header(title);
    let mut v = latencies_ms.to_vec();
    v.retain(|x| x.is_finite());
    if v.is_empty() {
        return no_data(o);
    }
    v.sort_by(f64::total_cmp);
    let max = v.last().copied().unwrap_or(0.0).max(0.0);
    let p999 = pct(&v, 0.999);
    let min_pos = v.iter().copied().find(|x| *x > 0.0).unwrap_or(max);
    let wide = max > 100.0 * min_pos || max > 10.0 * p999;
    let capped = p999 > 0.0 && max > p999 * 1.1 && wide;
    let hi = if capped { p999 * 1.1 } else { max * 1.05 };
    let (x1, xstep) = nice_ceil(if hi > 0.0 { hi } else { 1.0 }, 8.0);
    let bw = x1 / BUCKETS as f64;
    let mut counts = [0usize; BUCKETS];
    let mut over = 0usize;
    for &x in &v {
        over += usize::from(x > x1);
        counts[((x / bw).floor().max(0.0) as usize).min(BUCKETS - 1)] += 1;
    }
    let top = counts.iter().copied().max().unwrap_or(0).max(1) as f64;
    let (y1, ystep) = nice_ceil(top * 1.2, 5.0);
    let f = Frame { x0: 0.0, x1, y1 };
    axes(&mut o, &f, (xstep, ystep), ("latency (ms)", "events"));
    for (i, &c) in counts.iter().enumerate().filter(|(_, c)| **c > 0) {
        let (a, b) = (i as f64 * bw, (i + 1) as f64 * bw);
        let (xa, xb) = (f.px(a), f.px(b));
        let overflow = over > 0 && i == BUCKETS - 1;
        let (range, fill) = match overflow {
            true => (format!("≥ {} ms (overflow)", fmt_num(a)), "#e15759"),
            false => (format!("{}–{} ms", fmt_num(a), fmt_num(b)), "#8fb3d9"),
        };
        let w = (xb - xa - 1.0).max(0.5);
        let h = (f.py(0.0) - f.py(c as f64)).max(1.5);
        let _ = write!(
            o,
            r#"<rect x="{xa:.1}" y="{:.1}" width="{w:.1}" height="{h:.1}" fill="{fill}"><title>{}: {c}</title></rect>"#,
            f.py(0.0) - h,
            esc(&range)
        );
        if overflow {
            let attrs = format!(r##"font-size="10" text-anchor="end" fill="#c0392b" {HALO}"##);
            text(&mut o, xb - 4.0, f.py(0.0) - h - 4.0, &attrs, "overflow");
        }
    }
    let small = r##"font-size="11" fill="#666""##;
    let n = format!("n = {}", fmt_num(v.len() as f64));
    text(&mut o, PL, PT - 8.0, small, &n);
    if over > 0 {
        let (cap, top_v) = (fmt_num(x1), fmt_num(max));
        let note = format!("values above {cap} ms: {over} (max {top_v} ms)");
        let attrs = format!(r#"{small} text-anchor="end""#);
        text(&mut o, W - PR, PT - 8.0, &attrs, &note);
    }
    let mut ms: Vec<(&str, f64)> = marks.iter().copied().filter(|m| m.1.is_finite()).collect();
    ms.sort_by(|a, b| a.1.total_cmp(&b.1));
    let mut rows: Vec<f64> = Vec::new(); // rightmost label edge per row
    for (k, (name, val)) in ms.iter().enumerate() {
        let x = f.px(val.clamp(0.0, x1));
        let arrow = if *val > x1 { " ▸" } else { "" };
        let label = format!("{name} {} ms{arrow}", fmt_num(*val));
        let w = label.chars().count() as f64 * 6.2 + 6.0;
        let to_left = x + w > W - PR;
        let (l, r) = if to_left { (x - w, x) } else { (x, x + w) };
        let row = rows.iter().position(|&e| e + 4.0 < l).unwrap_or(rows.len());
        match rows.get_mut(row) {
            Some(e) => *e = e.max(r),
            None => rows.push(r),
        }
        let color = PALETTE[(k + 1) % PALETTE.len()];
        let dash = format!(r#"stroke="{color}" stroke-width="1.5" stroke-dasharray="5 4""#);
        line(&mut o, (x, PT), (x, H - PB), &dash);
        let (anchor, tx) = [("start", x + 3.0), ("end", x - 3.0)][usize::from(to_left)];
        let attrs = format!(
            r#"font-size="11" font-weight="bold" text-anchor="{anchor}" fill="{color}" {HALO}"#
        );
        text(&mut o, tx, PT + 12.0 + row as f64 * 14.0, &attrs, &label);
    }
    o + "</svg>"
}

/// Throughput over time: one or more named series of (seconds since start, events per second) points,
/// drawn as lines with a legend.
pub fn throughput_svg(title: &str, series: &[(&str, Vec<(f64, f64)>)]) -> String {
    let mut o = header(title);
    let finite = |p: &&(f64, f64)| p.0.is_finite() && p.1.is_finite();
    let clean: Vec<(&str, Vec<(f64, f64)>)> = series
        .iter()
        .map(|(name, pts)| {
            let mut p: Vec<(f64, f64)> = pts.iter().filter(finite).copied().collect();
            p.sort_by(|a, b| a.0.total_cmp(&b.0));
            (*name, p)
        })
        .collect();
    let all = || clean.iter().flat_map(|s| s.1.iter());
    if all().next().is_none() {
        return no_data(o);
    }
    let xmin = all().map(|p| p.0).fold(0.0, f64::min);
    let xmax = all().map(|p| p.0).fold(f64::MIN, f64::max);
    let ymax = all().map(|p| p.1).fold(0.0, f64::max);
    let xmax = if xmax > xmin { xmax } else { xmin + 1.0 };
    let xstep = nice_step(xmax - xmin, 8.0);
    let x0 = (xmin / xstep + 1e-9).floor() * xstep;
    let x1 = ((xmax / xstep - 1e-9).ceil() * xstep).max(x0 + xstep);
    let (y1, ystep) = nice_ceil(if ymax > 0.0 { ymax * 1.1 } else { 1.0 }, 5.0);
    let f = Frame { x0, x1, y1 };
    axes(&mut o, &f, (xstep, ystep), ("time (s)", "events/s"));
    for (k, (_, pts)) in clean.iter().enumerate() {
        let color = PALETTE[k % PALETTE.len()];
        let mut d = String::new();
        for (i, &(x, y)) in pts.iter().enumerate() {
            let cmd = if i == 0 { "M" } else { "L" };
            let _ = write!(d, "{cmd}{:.1} {:.1}", f.px(x), f.py(y.max(0.0)));
        }
        if let [(x, y)] = pts.as_slice() {
            let (cx, cy) = (f.px(*x), f.py(y.max(0.0)));
            let circle = format!(r#"cx="{cx:.1}" cy="{cy:.1}" r="3.5""#);
            let _ = write!(o, r#"<circle {circle} fill="{color}"/>"#);
        } else if !pts.is_empty() {
            let attrs = r#"fill="none" stroke-width="1.8" stroke-linejoin="round""#;
            let _ = write!(o, r#"<path d="{d}" stroke="{color}" {attrs}/>"#);
        }
    }
    let chars = clean.iter().map(|s| s.0.chars().count()).max().unwrap_or(0) as f64;
    let (lw, lh) = (chars * 7.0 + 44.0, clean.len() as f64 * 18.0 + 8.0);
    let (lx, ly) = (W - PR - lw - 8.0, PT + 8.0);
    let _ = write!(
        o,
        r##"<rect x="{lx:.1}" y="{ly}" width="{lw:.1}" height="{lh}" fill="#fff" fill-opacity="0.85" stroke="#ccc" rx="3"/>"##
    );
    for (k, (name, _)) in clean.iter().enumerate() {
        let y = ly + 17.0 + k as f64 * 18.0;
        let color = PALETTE[k % PALETTE.len()];
        let stroke = format!(r#"stroke="{color}" stroke-width="3""#);
        line(&mut o, (lx + 8.0, y - 4.0), (lx + 30.0, y - 4.0), &stroke);
        text(&mut o, lx + 36.0, y, "", name);
    }
    o + "</svg>"
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Minimal well-formedness check: start and end tags balance and nest, and
    /// every `&` starts an entity.
    fn well_formed(s: &str) -> bool {
        let mut stack = Vec::new();
        for part in s.split('<').skip(1) {
            let Some((tag, _)) = part.split_once('>') else {
                return false;
            };
            let name = tag.trim_start_matches('/').split([' ', '/']).next();
            if tag.starts_with('/') {
                if stack.pop() != Some(name) {
                    return false;
                }
            } else if !tag.ends_with('/') {
                stack.push(name);
            }
        }
        let entities = ["&amp;", "&lt;", "&gt;", "&quot;"];
        let amp_ok = s
            .match_indices('&')
            .all(|(i, _)| entities.iter().any(|e| s[i..].starts_with(e)));
        stack.is_empty() && amp_ok && s.matches("<text").count() == s.matches("</text>").count()
    }

    fn check(s: &str) {
        assert!(s.starts_with("<svg") && s.ends_with("</svg>"), "{s}");
        assert!(well_formed(s), "{s}");
    }

    #[test]
    fn latency_chart_has_title_and_marks() {
        let data: Vec<f64> = (0..10_000).map(|i| 1.0 + f64::from(i % 97) * 0.3).collect();
        let marks = [("p50", 15.0), ("p99", 29.0), ("max", 29.8)];
        let s = latency_svg("Latency", &data, &marks);
        check(&s);
        for t in "Latency|p50 15 ms|p99 29 ms|max 29.8 ms|latency (ms)|>events<".split('|') {
            assert!(s.contains(t), "missing {t}");
        }
        assert!(!s.contains("overflow"));
    }

    #[test]
    fn latency_caps_wide_range_with_overflow_note() {
        let mut data: Vec<f64> = (1..=5000).map(|i| f64::from(i) / 1000.0).collect();
        data.push(900.0);
        let s = latency_svg("wide", &data, &[("max", 900.0)]);
        check(&s);
        assert!(s.contains("values above") && s.contains("overflow") && s.contains("max 900 ms"));
    }

    #[test]
    fn degenerate_inputs_do_not_panic() {
        let nan = [f64::NAN, f64::INFINITY, f64::NEG_INFINITY];
        for s in [
            latency_svg("empty", &[], &[("p50", 1.0)]),
            latency_svg("nan", &nan, &[("p50", f64::NAN)]),
            throughput_svg("empty", &[]),
            throughput_svg("nan", &[("a", vec![(f64::NAN, 1.0), (1.0, f64::INFINITY)])]),
        ] {
            check(&s);
            assert!(s.contains("no data"));
        }
        for s in [
            latency_svg("one", &[5.0], &[("p50", 5.0), ("p99", 5.0), ("max", 5.0)]),
            latency_svg("zeros", &[0.0; 100], &[("p50", 0.0)]),
            latency_svg("neg", &[-1.0, 2.0, f64::NAN], &[]),
            throughput_svg("one", &[("a", vec![(3.0, 10.0)]), ("b", vec![])]),
            throughput_svg("flat", &[("a", vec![(0.0, 0.0), (0.0, 0.0)])]),
        ] {
            check(&s);
            assert!(!s.contains("no data") && !s.contains("NaN") && !s.contains("inf"));
        }
    }

    #[test]
    fn escapes_special_characters() {
        let s = latency_svg("a<b & \"c\"", &[1.0], &[("<p50>", 1.0)]);
        check(&s);
        assert!(s.contains("a&lt;b &amp; &quot;c&quot;") && s.contains("&lt;p50&gt;"));
        let t = throughput_svg("x<y", &[("s&t", vec![(0.0, 1.0), (1.0, 2.0)])]);
        check(&t);
        assert!(!well_formed("<svg><text>a<b</text></svg>") && !well_formed("<svg><g></svg>"));
        assert!(t.contains("x&lt;y") && t.contains("s&amp;t") && t.contains("events/s"));
    }

    #[test]
    fn throughput_has_legend_and_distinct_colours() {
        let a: Vec<(f64, f64)> = (0..120).map(|t| (f64::from(t), 12_000.0)).collect();
        let b: Vec<(f64, f64)> = (0..120).map(|t| (f64::from(t), 8_000.0)).collect();
        let s = throughput_svg("Throughput", &[("kafka", a), ("wal", b)]);
        check(&s);
        assert!(s.contains(">kafka<") && s.contains(">wal<") && s.contains(">10k<"));
        assert!(s.contains(PALETTE[0]) && s.contains(PALETTE[1]) && s.contains("time (s)"));
    }

    #[test]
    fn numbers_are_compact_and_steps_nice() {
        assert_eq!(
            [fmt_num(12e3), fmt_num(1.5e6), fmt_num(0.05)],
            ["12k", "1.5M", "0.05"]
        );
        assert_eq!(
            [fmt_num(3.67), fmt_num(-0.0), fmt_num(250.0)],
            ["3.7", "0", "250"]
        );
        assert!((nice_step(100.0, 8.0) - 20.0).abs() < 1e-9);
        assert!((nice_step(44.0, 8.0) - 10.0).abs() < 1e-9);
    }
}
