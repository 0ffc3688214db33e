//! The JSON packet published on `sensors/{sensor_id}/data`: one packet per message, samples in
//! physical units.
//!
//! ```json
//! {"timestamp_us": 1700000000000000, "base_sample_number": 640,
//!  "samples": [{"acc": {"x": 0.01, "y": -0.02, "z": 0.98},
//!               "gyro": {"x": 1.5, "y": 0.0, "z": -0.3},
//!               "mag": {"x": 0.2, "y": 0.1, "z": -0.4},
//!               "temp_raw": 2571}]}
//! ```
//!
//! Units are those of [`PhysSample`]: acc in g, gyro in deg/s, mag in gauss. Unknown fields are
//! ignored, so devices can add fields without breaking older platforms; missing fields, wrong
//! types and numbers that do not fit (`temp_raw` outside i16, a float beyond the f32 range) are
//! errors.

use serde::{Deserialize, Serialize};

use crate::imu::PhysSample;

/// A decoded JSON packet.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct JsonPacket {
    /// Device time of the first sample, microseconds since the Unix epoch.
    pub timestamp_us: u64,
    /// Index of the first sample.
    pub base_sample_number: u32,
    /// The samples in order, in physical units.
    pub samples: Vec<PhysSample>,
}

/// Why a payload is not a valid JSON packet. The message names the problem and where it is.
#[derive(Debug, thiserror::Error)]
pub enum JsonPacketError {
    /// Not JSON, or JSON of the wrong shape (the message says which field and where).
    #[error("invalid JSON packet: {0}")]
    Invalid(#[from] serde_json::Error),
    /// A sample value is not a finite f32 (e.g. `1e39`, which overflows to infinity).
    #[error("invalid JSON packet: samples[{index}].{field} is not a finite 32-bit float")]
    NonFinite {
        /// Position of the sample in `samples`.
        index: usize,
        /// The offending field, e.g. `"acc.x"`.
        field: &'static str,
    },
}

/// Parses one JSON packet.
pub fn parse_json_packet(bytes: &[u8]) -> Result<JsonPacket, JsonPacketError> {
    let wire: WirePacket = serde_json::from_slice(bytes)?;
    for (index, s) in wire.samples.iter().enumerate() {
        if let Some(field) = s.first_non_finite() {
            return Err(JsonPacketError::NonFinite { index, field });
        }
    }
    Ok(JsonPacket {
        timestamp_us: wire.timestamp_us,
        base_sample_number: wire.base_sample_number,
        samples: wire.samples.into_iter().map(PhysSample::from).collect(),
    })
}

/// Encodes a packet as compact JSON that [`parse_json_packet`] reads back exactly (floats are
/// written in their shortest round-tripping form). Non-finite values are written as `null`,
/// which the parser rejects.
#[must_use]
pub fn encode_json_packet(p: &JsonPacket) -> Vec<u8> {
    let wire = WirePacket {
        timestamp_us: p.timestamp_us,
        base_sample_number: p.base_sample_number,
        samples: p.samples.iter().map(WireSample::from).collect(),
    };
    // Plain structs with string keys serialised into a Vec: serde_json has no failure path here.
    serde_json::to_vec(&wire).expect("serialising a JSON packet into memory cannot fail")
}

/// The wire shape, kept private so the public type stays a plain struct of [`PhysSample`]s.
#[derive(Serialize, Deserialize)]
struct WirePacket {
    timestamp_us: u64,
    base_sample_number: u32,
    samples: Vec<WireSample>,
}

#[derive(Serialize, Deserialize)]
struct WireSample {
    acc: Xyz,
    gyro: Xyz,
    mag: Xyz,
    temp_raw: i16,
}

#[derive(Serialize, Deserialize)]
struct Xyz {
    x: f32,
    y: f32,
    z: f32,
}

impl WireSample {
    fn first_non_finite(&self) -> Option<&'static str> {
        let fields = [
            ("acc.x", self.acc.x),
            ("acc.y", self.acc.y),
            ("acc.z", self.acc.z),
            ("gyro.x", self.gyro.x),
            ("gyro.y", self.gyro.y),
            ("gyro.z", self.gyro.z),
            ("mag.x", self.mag.x),
            ("mag.y", self.mag.y),
            ("mag.z", self.mag.z),
        ];
        fields
            .into_iter()
            .find(|(_, v)| !v.is_finite())
            .map(|(name, _)| name)
    }
}

impl From<WireSample> for PhysSample {
    fn from(s: WireSample) -> Self {
        PhysSample {
            acc: s.acc.into(),
            gyro: s.gyro.into(),
            mag: s.mag.into(),
            temp_raw: s.temp_raw,
        }
    }
}

impl From<&PhysSample> for WireSample {
    fn from(s: &PhysSample) -> Self {
        WireSample {
            acc: s.acc.into(),
            gyro: s.gyro.into(),
            mag: s.mag.into(),
            temp_raw: s.temp_raw,
        }
    }
}

impl From<Xyz> for [f32; 3] {
    fn from(v: Xyz) -> Self {
        [v.x, v.y, v.z]
    }
}

impl From<[f32; 3]> for Xyz {
    fn from([x, y, z]: [f32; 3]) -> Self {
        Xyz { x, y, z }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests may unwrap: a panic is the failure report
mod tests {
    use super::*;

    const EXAMPLE: &str = r#"{"timestamp_us":1700000000000000,"base_sample_number":640,
        "samples":[{"acc":{"x":0.5,"y":-0.25,"z":1.0},"gyro":{"x":14,"y":0,"z":-0.14},
                    "mag":{"x":0.2,"y":0.1,"z":-0.4},"temp_raw":2571,"extra":"ignored"}],
        "firmware":"1.2.3"}"#;

    #[test]
    fn documented_example_parses_to_physical_samples() {
        let p = parse_json_packet(EXAMPLE.as_bytes()).unwrap();
        assert_eq!(p.timestamp_us, 1_700_000_000_000_000);
        assert_eq!(p.base_sample_number, 640);
        assert_eq!(
            p.samples,
            [PhysSample {
                acc: [0.5, -0.25, 1.0],
                gyro: [14.0, 0.0, -0.14],
                mag: [0.2, 0.1, -0.4],
                temp_raw: 2571
            }]
        );
    }

    #[test]
    fn encoded_packet_parses_back_identically() {
        let p = parse_json_packet(EXAMPLE.as_bytes()).unwrap();
        let bytes = encode_json_packet(&p);
        assert!(bytes.starts_with(br#"{"timestamp_us":1700000000000000,"base_sample_number":640,"samples":[{"acc":{"x":0.5,"#));
        assert_eq!(parse_json_packet(&bytes).unwrap(), p);
    }

    #[test]
    fn packet_without_samples_is_valid() {
        let p = parse_json_packet(br#"{"timestamp_us":1,"base_sample_number":2,"samples":[]}"#)
            .unwrap();
        assert!(p.samples.is_empty());
    }

    #[test]
    fn missing_field_error_names_the_field() {
        let e = parse_json_packet(br#"{"base_sample_number":2,"samples":[]}"#).unwrap_err();
        assert!(
            e.to_string().contains("missing field `timestamp_us`"),
            "{e}"
        );
    }

    #[test]
    fn out_of_range_temperature_is_rejected() {
        let json = EXAMPLE.replace("2571", "40000");
        let e = parse_json_packet(json.as_bytes()).unwrap_err();
        assert!(e.to_string().contains("40000"), "{e}");
    }

    #[test]
    fn float_beyond_f32_range_is_rejected_with_its_position() {
        let json = EXAMPLE.replace(r#""y":0.1"#, r#""y":1e39"#);
        let e = parse_json_packet(json.as_bytes()).unwrap_err();
        assert!(
            matches!(
                e,
                JsonPacketError::NonFinite {
                    index: 0,
                    field: "mag.y"
                }
            ),
            "{e}"
        );
        assert_eq!(
            e.to_string(),
            "invalid JSON packet: samples[0].mag.y is not a finite 32-bit float"
        );
    }

    #[test]
    fn non_json_input_is_an_error_not_a_panic() {
        for bad in [
            &b""[..],
            b"\xff\xfe",
            b"[1,2]",
            b"{\"timestamp_us\":-1}",
            b"null",
        ] {
            assert!(parse_json_packet(bad).is_err());
        }
    }
}
