//! Reliability diagrams as hand-written SVG: one panel per mode, bars of per-bin accuracy,
//! the per-bin mean confidence as a marker, the diagonal, and bar opacity by bin count.

use std::fmt::Write as _;

use super::report::ModeReport;

const PANEL: f64 = 300.0;
const MARGIN: f64 = 50.0;
const TOP: f64 = 50.0;

/// An SVG document with one reliability diagram per report, side by side.
pub fn reliability_svg(title: &str, reports: &[ModeReport]) -> String {
    let width = MARGIN + reports.len().max(1) as f64 * (PANEL + MARGIN);
    let height = TOP + PANEL + 60.0;
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(s, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ = writeln!(
        s,
        r#"<text x="{}" y="20" font-size="14" text-anchor="middle">{}</text>"#,
        width / 2.0,
        escape(title)
    );
    for (i, r) in reports.iter().enumerate() {
        panel(&mut s, MARGIN + i as f64 * (PANEL + MARGIN), r);
    }
    s.push_str("</svg>\n");
    s
}

fn panel(s: &mut String, x0: f64, r: &ModeReport) {
    let y0 = TOP;
    let px = |v: f64| x0 + v * PANEL;
    let py = |v: f64| y0 + (1.0 - v) * PANEL;
    let c = &r.calibration;
    let _ = writeln!(
        s,
        r#"<text x="{}" y="{}" text-anchor="middle">{} (n={}): acc {:.3}, ECE {:.3}</text>"#,
        px(0.5),
        y0 - 8.0,
        r.mode,
        r.n,
        r.accuracy,
        c.ece
    );
    let _ = writeln!(
        s,
        r##"<rect x="{x0}" y="{y0}" width="{PANEL}" height="{PANEL}" fill="none" stroke="#333"/>"##
    );
    let max_count = c.bins.iter().map(|b| b.count).max().unwrap_or(1).max(1) as f64;
    for b in c.bins.iter().filter(|b| b.count > 0) {
        let w = (b.upper - b.lower) * PANEL;
        let opacity = 0.25 + 0.75 * b.count as f64 / max_count;
        let _ = writeln!(
            s,
            r##"<rect x="{:.2}" y="{:.2}" width="{:.2}" height="{:.2}" fill="#3b6fb6" fill-opacity="{opacity:.2}" stroke="#1d3d6b"><title>[{:.3}, {:.3}): n={}, acc {:.3}, conf {:.3}</title></rect>"##,
            px(b.lower),
            py(b.accuracy),
            w,
            b.accuracy * PANEL,
            b.lower,
            b.upper,
            b.count,
            b.accuracy,
            b.mean_confidence
        );
        let _ = writeln!(
            s,
            r##"<line x1="{:.2}" x2="{:.2}" y1="{:.2}" y2="{:.2}" stroke="#c0392b" stroke-width="2"/>"##,
            px(b.lower),
            px(b.upper),
            py(b.mean_confidence),
            py(b.mean_confidence)
        );
    }
    let _ = writeln!(
        s,
        r##"<line x1="{}" y1="{}" x2="{}" y2="{}" stroke="#888" stroke-dasharray="4 3"/>"##,
        px(0.0),
        py(0.0),
        px(1.0),
        py(1.0)
    );
    for t in [0.0, 0.25, 0.5, 0.75, 1.0] {
        let _ = writeln!(
            s,
            r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">{t}</text><text x="{:.1}" y="{:.1}" text-anchor="end">{t}</text>"#,
            px(t),
            py(0.0) + 16.0,
            x0 - 4.0,
            py(t) + 4.0
        );
    }
    let _ = writeln!(
        s,
        r#"<text x="{}" y="{}" text-anchor="middle">confidence (bars: accuracy; red: mean confidence)</text>"#,
        px(0.5),
        py(0.0) + 34.0
    );
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}
