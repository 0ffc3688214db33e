//! The JSON sidecar that travels beside every ONNX model: which feature columns the model
//! reads, how to standard-scale them, the shape of its recurrent state and the movement
//! threshold (DESIGN.md, "Model contract").

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::ModelError;

/// A model's sidecar, `FILE.json` beside `FILE.onnx`.
///
/// Unknown keys are ignored so that training pipelines may add their own metadata.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
pub struct Sidecar {
    /// Feature column names in the order of the model's last input axis, e.g.
    /// `["accl_mag", "gyro_mag"]`.
    pub feature_cols: Vec<String>,
    /// Standard-scaling parameters per feature column.
    pub scaler: Scaler,
    /// Shape of the recurrent state; `None` for a stateless model (one without `h_0`).
    #[serde(default)]
    pub state: Option<StateSpec>,
    /// Samples whose `movement_prob` is below this count as not moving (velocity forced to 0).
    #[serde(default = "default_movement_threshold")]
    pub movement_threshold: f32,
    /// The model's version as its training pipeline names it (e.g. `"2026-12-01.3"`), stamped
    /// on every sample row as `model_version`; without it the version is the first 12 hex
    /// digits of the ONNX file's SHA-256 (see `Model::version`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
}

/// Longest `version` a sidecar may declare: it is stamped on every sample row.
pub const MAX_VERSION_LEN: usize = 64;

fn default_movement_threshold() -> f32 {
    0.5
}

/// Standard-scaling parameters: a feature `x` enters the model as `(x - mean) / std`.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
pub struct Scaler {
    /// Mean per feature column name.
    pub mean: BTreeMap<String, f32>,
    /// Standard deviation per feature column name; must be finite and > 0.
    pub std: BTreeMap<String, f32>,
}

/// Shape of a recurrent model's state: `h_0`/`c_0` are `[layers * directions, batch, hidden]`.
#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq, Eq)]
pub struct StateSpec {
    /// Stacked recurrent layers.
    pub layers: usize,
    /// 1 (unidirectional) or 2 (bidirectional).
    pub directions: usize,
    /// Hidden units per layer and direction.
    pub hidden: usize,
}

impl StateSpec {
    /// Floats of `h` (and, separately, of `c`) per key: `layers * directions * hidden`.
    pub fn len(&self) -> usize {
        self.layers * self.directions * self.hidden
    }

    /// True when the state holds no values (never the case for a validated spec).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// `layers * directions`, the leading axis of `h_0`/`c_0`.
    pub fn stacks(&self) -> usize {
        self.layers * self.directions
    }
}

impl Sidecar {
    /// Parses a sidecar from JSON bytes and validates it.
    pub fn from_json(json: &[u8]) -> Result<Sidecar, ModelError> {
        let sidecar: Sidecar = serde_json::from_slice(json)?;
        sidecar.validate()?;
        Ok(sidecar)
    }

    /// Checks the sidecar is usable: at least one feature, no duplicates, every feature has a
    /// finite mean and a finite std > 0, the state spec (if any) is non-degenerate and the
    /// threshold lies in [0, 1]. Reports the first problem found.
    pub fn validate(&self) -> Result<(), ModelError> {
        if self.feature_cols.is_empty() {
            return Err(ModelError::NoFeatures);
        }
        let mut seen = BTreeSet::new();
        for col in &self.feature_cols {
            if !seen.insert(col.as_str()) {
                return Err(ModelError::DuplicateFeature(col.clone()));
            }
            let mean = *self
                .scaler
                .mean
                .get(col)
                .ok_or_else(|| ModelError::MissingMean(col.clone()))?;
            let std = *self
                .scaler
                .std
                .get(col)
                .ok_or_else(|| ModelError::MissingStd(col.clone()))?;
            if !mean.is_finite() {
                return Err(ModelError::BadMean {
                    feature: col.clone(),
                    mean,
                });
            }
            // Written so that NaN fails too.
            if !(std.is_finite() && std > 0.0) {
                return Err(ModelError::BadStd {
                    feature: col.clone(),
                    std,
                });
            }
        }
        if let Some(s) = self.state
            && (s.layers == 0 || s.hidden == 0 || !(1..=2).contains(&s.directions))
        {
            return Err(ModelError::BadStateSpec {
                layers: s.layers,
                directions: s.directions,
                hidden: s.hidden,
            });
        }
        if !(0.0..=1.0).contains(&self.movement_threshold) {
            return Err(ModelError::BadThreshold(self.movement_threshold));
        }
        if let Some(v) = &self.version
            && (v.is_empty()
                || v.len() > MAX_VERSION_LEN
                || !v.chars().all(|c| c.is_ascii_graphic()))
        {
            return Err(ModelError::BadVersion(v.clone()));
        }
        Ok(())
    }

    /// Standard-scales raw value `x` of feature column `feature_idx` (an index into
    /// `feature_cols`): `(x - mean) / std`.
    ///
    /// Meant for a sidecar that passed [`Sidecar::validate`]; for an index out of range or a
    /// column without scaler entries it returns NaN, so the mistake shows in the output
    /// instead of passing unscaled values to the model. Hot loops should prefer
    /// [`Sidecar::scaling`], which avoids the per-call map lookups.
    pub fn scale(&self, feature_idx: usize, x: f32) -> f32 {
        let Some(col) = self.feature_cols.get(feature_idx) else {
            return f32::NAN;
        };
        match (self.scaler.mean.get(col), self.scaler.std.get(col)) {
            (Some(mean), Some(std)) => (x - mean) / std,
            _ => f32::NAN,
        }
    }

    /// The scaler as `(mean, std)` vectors in `feature_cols` order, or the first missing entry.
    pub fn scaling(&self) -> Result<(Vec<f32>, Vec<f32>), ModelError> {
        let mut mean = Vec::with_capacity(self.feature_cols.len());
        let mut std = Vec::with_capacity(self.feature_cols.len());
        for col in &self.feature_cols {
            mean.push(
                *self
                    .scaler
                    .mean
                    .get(col)
                    .ok_or_else(|| ModelError::MissingMean(col.clone()))?,
            );
            std.push(
                *self
                    .scaler
                    .std
                    .get(col)
                    .ok_or_else(|| ModelError::MissingStd(col.clone()))?,
            );
        }
        Ok((mean, std))
    }

    /// Floats of `h` (and of `c`) per key; 0 for a stateless model.
    pub fn state_len(&self) -> usize {
        self.state.map_or(0, |s| s.len())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // Tests fail loudly by design.
mod tests {
    use super::*;

    const DEMO: &str = r#"{"feature_cols":["accl_mag","gyro_mag"],
        "scaler":{"mean":{"accl_mag":1.1,"gyro_mag":0.8},"std":{"accl_mag":0.3,"gyro_mag":0.76}},
        "state":{"layers":2,"directions":1,"hidden":32},"movement_threshold":0.5}"#;

    fn demo() -> Sidecar {
        Sidecar::from_json(DEMO.as_bytes()).unwrap()
    }

    #[test]
    fn a_version_is_optional_and_must_be_a_short_printable_name() {
        assert_eq!(demo().version, None);
        let with = |v: &str| {
            DEMO.replace(
                "\"movement_threshold\"",
                &format!("\"version\":{v},\"movement_threshold\""),
            )
        };
        let s = Sidecar::from_json(with("\"2026-12-01.3\"").as_bytes()).unwrap();
        assert_eq!(s.version.as_deref(), Some("2026-12-01.3"));
        for bad in ["\"\"", "\"has space\"", &format!("\"{}\"", "x".repeat(65))] {
            let err = Sidecar::from_json(with(bad).as_bytes()).unwrap_err();
            assert!(matches!(err, ModelError::BadVersion(_)), "{bad}: {err}");
        }
    }

    #[test]
    fn parses_the_contract_example() {
        let s = demo();
        assert_eq!(s.feature_cols, ["accl_mag", "gyro_mag"]);
        assert_eq!(
            s.state,
            Some(StateSpec {
                layers: 2,
                directions: 1,
                hidden: 32
            })
        );
        assert_eq!(s.state_len(), 64);
        assert_eq!(s.movement_threshold, 0.5);
    }

    #[test]
    fn defaults_threshold_and_treats_missing_state_as_stateless() {
        let s = Sidecar::from_json(
            br#"{"feature_cols":["a"],"scaler":{"mean":{"a":0},"std":{"a":1}},"extra":{"trained_by":"x"}}"#,
        )
        .unwrap();
        assert_eq!(s.movement_threshold, 0.5);
        assert_eq!(s.state, None);
        assert_eq!(s.state_len(), 0);
        let null_state = Sidecar::from_json(
            br#"{"feature_cols":["a"],"scaler":{"mean":{"a":0},"std":{"a":1}},"state":null}"#,
        )
        .unwrap();
        assert_eq!(null_state.state, None);
    }

    #[test]
    fn scales_with_mean_and_std() {
        let s = demo();
        assert!((s.scale(0, 1.4) - 1.0).abs() < 1e-6);
        assert!((s.scale(1, 0.8) - 0.0).abs() < 1e-6);
        assert!(s.scale(2, 1.0).is_nan());
        let (mean, std) = s.scaling().unwrap();
        assert_eq!(mean, [1.1, 0.8]);
        assert_eq!(std, [0.3, 0.76]);
    }

    #[test]
    fn rejects_malformed_json() {
        assert!(matches!(
            Sidecar::from_json(b"{\"feature_cols\":"),
            Err(ModelError::SidecarJson(_))
        ));
        assert!(matches!(
            Sidecar::from_json(br#"{"feature_cols":["a"]}"#),
            Err(ModelError::SidecarJson(_))
        ));
    }

    #[test]
    fn rejects_a_feature_without_mean_or_std() {
        let mut s = demo();
        s.scaler.mean.remove("gyro_mag");
        assert!(matches!(s.validate(), Err(ModelError::MissingMean(f)) if f == "gyro_mag"));
        let mut s = demo();
        s.scaler.std.remove("accl_mag");
        assert!(matches!(s.validate(), Err(ModelError::MissingStd(f)) if f == "accl_mag"));
    }

    #[test]
    fn rejects_zero_negative_and_nan_std() {
        for bad in [0.0, -1.0, f32::NAN, f32::INFINITY] {
            let mut s = demo();
            s.scaler.std.insert("gyro_mag".into(), bad);
            assert!(
                matches!(s.validate(), Err(ModelError::BadStd { .. })),
                "std {bad} accepted"
            );
        }
        let mut s = demo();
        s.scaler.mean.insert("accl_mag".into(), f32::NAN);
        assert!(matches!(s.validate(), Err(ModelError::BadMean { .. })));
    }

    #[test]
    fn rejects_empty_or_duplicate_features_bad_state_and_threshold() {
        let mut s = demo();
        s.feature_cols.clear();
        assert!(matches!(s.validate(), Err(ModelError::NoFeatures)));
        let mut s = demo();
        s.feature_cols.push("accl_mag".into());
        assert!(matches!(s.validate(), Err(ModelError::DuplicateFeature(_))));
        for spec in [(0, 1, 32), (2, 3, 32), (2, 1, 0)] {
            let mut s = demo();
            s.state = Some(StateSpec {
                layers: spec.0,
                directions: spec.1,
                hidden: spec.2,
            });
            assert!(
                matches!(s.validate(), Err(ModelError::BadStateSpec { .. })),
                "{spec:?} accepted"
            );
        }
        let mut s = demo();
        s.movement_threshold = 1.5;
        assert!(matches!(s.validate(), Err(ModelError::BadThreshold(_))));
    }

    #[test]
    fn round_trips_through_json() {
        let s = demo();
        let back: Sidecar = serde_json::from_str(&serde_json::to_string(&s).unwrap()).unwrap();
        assert_eq!(back, s);
    }
}
