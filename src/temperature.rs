//! [`Temperature`]: a softmax temperature, finite and positive by construction, so the
//! teacher, the losses, the reports and the evaluation need no checks of their own; and how a
//! temperature is fitted and applied to a top-k list ([`TemperatureMode`], [`FitObjective`]),
//! which the store's manifest records and the trainer checks.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// A softmax temperature `T`: logits (or log-probabilities) are divided by it. Always finite
/// and positive; `T = 1` leaves a distribution unchanged.
#[derive(Debug, Clone, Copy, PartialEq, PartialOrd, Serialize, Deserialize)]
#[serde(try_from = "f64", into = "f64")]
pub struct Temperature(f64);

impl Temperature {
    /// `T = 1`.
    pub const ONE: Temperature = Temperature(1.0);

    /// `t` as a temperature; an error unless it is finite and positive.
    pub fn new(t: f64) -> Result<Self> {
        if t.is_finite() && t > 0.0 {
            Ok(Temperature(t))
        } else {
            Err(Error::InvalidArgument(format!(
                "temperature {t} must be finite and positive"
            )))
        }
    }

    /// The value.
    pub fn get(self) -> f64 {
        self.0
    }

    /// Whether this is `T = 1` exactly.
    pub fn is_one(self) -> bool {
        self.0 == 1.0
    }
}

impl Default for Temperature {
    fn default() -> Self {
        Temperature::ONE
    }
}

impl TryFrom<f64> for Temperature {
    type Error = Error;
    fn try_from(t: f64) -> Result<Self> {
        Temperature::new(t)
    }
}

impl From<Temperature> for f64 {
    fn from(t: Temperature) -> f64 {
        t.0
    }
}

impl FromStr for Temperature {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        let t: f64 = s
            .trim()
            .parse()
            .map_err(|_| Error::InvalidArgument(format!("temperature {s:?} is not a number")))?;
        Temperature::new(t)
    }
}

impl fmt::Display for Temperature {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0, f)
    }
}

/// How the top-k distribution is renormalised after dividing by a temperature.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum TemperatureMode {
    /// Softmax of `lp_i / T` over the `k` stored entries (FIRST); exact
    /// logit temperature restricted to the top-k.
    #[default]
    #[value(alias = "renormalised")]
    Renormalized,
    /// The mass outside the top-k is modelled as `V - k` tokens of equal
    /// probability and scaled along; exact at `T = 1` only.
    #[value(alias = "uniform_tail")]
    UniformTail,
}

/// What [`crate::calibration::fit_temperature`] minimises.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum FitObjective {
    /// Equal-width ECE of the top-1 confidence, with `FitOptions::n_bins` bins.
    Ece,
    /// Mean negative log-probability of the target. In
    /// [`TemperatureMode::Renormalized`] only positions whose target is in
    /// the top-k count (the others have probability 0 at every `T`).
    Nll,
}

impl TemperatureMode {
    /// The manifest / command-line spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            TemperatureMode::Renormalized => "renormalized",
            TemperatureMode::UniformTail => "uniform_tail",
        }
    }
}

impl FitObjective {
    /// The manifest / command-line spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            FitObjective::Ece => "ece",
            FitObjective::Nll => "nll",
        }
    }
}

impl fmt::Display for TemperatureMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Display for FitObjective {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_finite_positive_values_are_temperatures() {
        assert_eq!(Temperature::new(2.5).unwrap().get(), 2.5);
        for bad in [0.0, -1.0, f64::NAN, f64::INFINITY] {
            assert!(Temperature::new(bad).is_err(), "{bad}");
        }
        assert_eq!("1.5".parse::<Temperature>().unwrap().get(), 1.5);
        assert!("x".parse::<Temperature>().is_err());
        assert!("0".parse::<Temperature>().is_err());
        // JSON is a plain number, checked on the way in.
        let t: Temperature = serde_json::from_str("2.0").unwrap();
        assert_eq!(serde_json::to_string(&t).unwrap(), "2.0");
        assert!(serde_json::from_str::<Temperature>("-2.0").is_err());
        // The spellings of the manifest are serde's.
        for m in [TemperatureMode::Renormalized, TemperatureMode::UniformTail] {
            assert_eq!(serde_json::to_value(m).unwrap(), m.as_str());
        }
        for o in [FitObjective::Ece, FitObjective::Nll] {
            assert_eq!(serde_json::to_value(o).unwrap(), o.as_str());
        }
    }
}
