//! Calibration metrics and temperature fitting for teacher soft labels.
//!
//! Two halves:
//!
//! * [`metrics`]: top-label calibration of `(confidence, correct)` pairs —
//!   equal-width reliability bins, ECE, MCE, adaptive (equal-mass) ECE,
//!   top-label and multi-class Brier score, NLL — either one-shot
//!   ([`calibration_report`], [`ece`], ...) or streaming
//!   ([`CalibrationAccumulator`]), summarised in a serialisable
//!   [`CalibrationReport`].
//! * [`temperature`]: rescaling stored top-k log-probabilities by a
//!   temperature ([`TemperatureMode::Renormalized`] as FIRST teaches, or
//!   [`TemperatureMode::UniformTail`] which keeps the mass outside the top-k)
//!   and fitting the temperature on held-out positions
//!   ([`fit_temperature`]).
//!
//! The exact definitions live in `docs/calibration.md`.
//!
//! ```
//! use firstkd::calibration::{calibration_report, DEFAULT_N_BINS};
//!
//! let confidence = [0.9, 0.8, 1.0, 0.3];
//! let correct = [true, false, true, false];
//! let report = calibration_report(&confidence, &correct, None, DEFAULT_N_BINS).unwrap();
//! assert_eq!(report.n, 4);
//! assert!(report.nll.is_none());
//! ```

pub mod metrics;
pub mod store_fit;
pub mod temperature;

pub use metrics::{
    adaptive_ece, brier_top_label, calibration_report, ece, mce, multiclass_brier,
    multiclass_brier_item, nll, reliability_bins, CalibrationAccumulator, CalibrationReport,
    ReliabilityBin, DEFAULT_N_BINS,
};
pub use temperature::{
    fit_temperature, rescaled_topk_logprobs, target_logprob_at, top1_confidence_at,
    topk_calibration_report, FitObjective, FitOptions, RescaledTopK, TemperatureFit,
    TemperatureMode, TopKPosition, MAX_TEMPERATURE, MIN_TEMPERATURE,
};
