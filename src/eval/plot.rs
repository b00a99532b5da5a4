//! Reliability diagrams of an evaluation: one panel per scoring mode (see [`crate::plot`]).

use super::report::ModeReport;
use crate::plot::Panel;

/// An SVG document with one reliability diagram per mode report, side by side.
pub fn reliability_svg(title: &str, reports: &[ModeReport]) -> String {
    let panels: Vec<Panel<'_>> = reports
        .iter()
        .map(|r| Panel {
            label: &r.mode,
            report: &r.calibration,
        })
        .collect();
    crate::plot::reliability_svg(title, &panels)
}
