//! Hand-written SVG plots (no plotting dependency): reliability diagrams of
//! [`CalibrationReport`]s and histograms. Used by `firstkd stats --plot` and `firstkd eval --plot`.

use std::fmt::Write as _;

use crate::calibration::CalibrationReport;

/// One reliability-diagram panel: a label and the report whose bins it draws.
#[derive(Debug, Clone, Copy)]
pub struct Panel<'a> {
    pub label: &'a str,
    pub report: &'a CalibrationReport,
}

/// An SVG document with one reliability diagram per panel, side by side: bars of per-bin
/// accuracy (opacity by bin count), the per-bin mean confidence in red, and the diagonal.
const PANEL: f64 = 300.0;
const MARGIN: f64 = 50.0;
const TOP: f64 = 50.0;

pub fn reliability_svg(title: &str, panels: &[Panel<'_>]) -> String {
    let width = MARGIN + panels.len().max(1) as f64 * (PANEL + MARGIN);
    let height = TOP + PANEL + 60.0;
    let mut s = svg_open(width, height, title);
    for (i, r) in panels.iter().enumerate() {
        panel(&mut s, MARGIN + i as f64 * (PANEL + MARGIN), r);
    }
    s.push_str("</svg>\n");
    s
}

fn panel(s: &mut String, x0: f64, r: &Panel<'_>) {
    let y0 = TOP;
    let px = |v: f64| x0 + v * PANEL;
    let py = |v: f64| y0 + (1.0 - v) * PANEL;
    let c = r.report;
    let _ = writeln!(
        s,
        r#"<text x="{}" y="{}" text-anchor="middle">{} (n={}): acc {:.3}, ECE {:.3}</text>"#,
        px(0.5),
        y0 - 8.0,
        escape(r.label),
        c.n,
        c.accuracy,
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

/// Opens an SVG document of the given size: white background and a centred title.
fn svg_open(width: f64, height: f64, title: &str) -> String {
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
    s
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// An SVG bar chart of `counts` over equal-width bins spanning `[lower, upper]`.
pub fn histogram_svg(title: &str, x_label: &str, lower: f64, upper: f64, counts: &[u64]) -> String {
    let (width, height) = (MARGIN * 2.0 + PANEL * 1.5, TOP + PANEL + 60.0);
    let plot_w = PANEL * 1.5;
    let mut s = svg_open(width, height, title);
    let total: u64 = counts.iter().sum();
    let max = counts.iter().copied().max().unwrap_or(1).max(1) as f64;
    let n = counts.len().max(1) as f64;
    let bar_w = plot_w / n;
    let _ = writeln!(
        s,
        r##"<rect x="{MARGIN}" y="{TOP}" width="{plot_w}" height="{PANEL}" fill="none" stroke="#333"/>"##
    );
    for (i, &c) in counts.iter().enumerate() {
        let h = c as f64 / max * PANEL;
        let lo = lower + (upper - lower) * i as f64 / n;
        let hi = lower + (upper - lower) * (i + 1) as f64 / n;
        let _ = writeln!(
            s,
            r##"<rect x="{:.2}" y="{:.2}" width="{:.2}" height="{:.2}" fill="#3b6fb6" stroke="#1d3d6b"><title>[{lo:.3}, {hi:.3}): {c} ({:.1}%)</title></rect>"##,
            MARGIN + i as f64 * bar_w,
            TOP + PANEL - h,
            bar_w,
            h,
            100.0 * c as f64 / total.max(1) as f64
        );
    }
    for t in 0..=4 {
        let v = lower + (upper - lower) * t as f64 / 4.0;
        let _ = writeln!(
            s,
            r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">{v:.2}</text>"#,
            MARGIN + plot_w * t as f64 / 4.0,
            TOP + PANEL + 16.0
        );
    }
    let _ = writeln!(
        s,
        r#"<text x="{:.1}" y="{:.1}" text-anchor="end">{}</text>"#,
        MARGIN - 4.0,
        TOP + 10.0,
        max as u64
    );
    let _ = writeln!(
        s,
        r#"<text x="{}" y="{}" text-anchor="middle">{} (n = {total})</text>"#,
        MARGIN + plot_w / 2.0,
        TOP + PANEL + 34.0,
        escape(x_label)
    );
    s.push_str("</svg>\n");
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::calibration::calibration_report;

    #[test]
    fn reliability_diagram_draws_every_non_empty_bin() {
        let report = calibration_report(
            &[0.1, 0.55, 0.56, 0.95, 1.0],
            &[false, true, false, true, true],
            None,
            15,
        )
        .unwrap();
        let svg = reliability_svg(
            "t <&>",
            &[Panel {
                label: "in loss",
                report: &report,
            }],
        );
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        assert_eq!(
            svg.matches("<title>").count(),
            report.bins.iter().filter(|b| b.count > 0).count()
        );
        assert!(svg.contains("t &lt;&amp;&gt;") && svg.contains("in loss (n=5)"));
    }

    #[test]
    fn histogram_has_one_bar_per_bin() {
        let svg = histogram_svg("mass", "top-5 mass", 0.0, 1.0, &[1, 0, 5, 2]);
        assert_eq!(svg.matches("<title>").count(), 4);
        assert!(svg.contains("(n = 8)") && svg.contains("62.5%"));
    }
}
