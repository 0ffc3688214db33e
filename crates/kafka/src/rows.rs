//! The JSON values of the output topics (DESIGN.md, "Distributed mode"): what the processor
//! writes and the api role (or any Kafka client) reads.
//!
//! Field names are the lake's columns. Samples travel as one message per processed chunk (the
//! samples of one packet): a JSON array of sample rows, and a reader also accepts a single row
//! object. Session events are the sessions row with an `"event"` field (`"started"` or
//! `"ended"`) and, on `"ended"`, the `"end_reason"`. Every other topic holds one row object per
//! message. Keys are the sensor id.

use std::sync::Arc;

use sensorflow_records::{
    SampleChunk, SampleRow, SessionEndReason, SessionEvent, SessionId, SessionRecord,
};
use serde::{Deserialize, Serialize};

/// The value of a `sensor-data-transformed` message: `chunk`'s rows as a JSON array.
pub fn encode_samples(chunk: &SampleChunk) -> Vec<u8> {
    let rows: Vec<SampleRow> = (0..chunk.len()).map(|i| chunk.row(i)).collect();
    // Serialising plain numbers and strings cannot fail.
    serde_json::to_vec(&rows).unwrap_or_default()
}

/// The rows of a `sensor-data-transformed` message: a JSON array of rows or one row.
pub fn decode_samples(value: &[u8]) -> Result<Vec<SampleRow>, serde_json::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        Many(Vec<SampleRow>),
        One(Box<SampleRow>),
    }
    Ok(match serde_json::from_slice(value)? {
        OneOrMany::Many(rows) => rows,
        OneOrMany::One(row) => vec![*row],
    })
}

/// `rows` as chunks: each run of consecutive rows of one sensor, session and model version
/// becomes one [`SampleChunk`] (the live hub's unit), in order.
pub fn chunks_from_rows(rows: Vec<SampleRow>) -> Vec<SampleChunk> {
    let mut chunks: Vec<SampleChunk> = Vec::new();
    for row in rows {
        let same = chunks.last().is_some_and(|c| {
            c.sensor_id == row.sensor_id
                && c.session_id == row.session_id
                && c.model_version == row.model_version
        });
        if !same {
            let mut chunk =
                SampleChunk::with_capacity(row.sensor_id.clone(), row.session_id.clone(), 64);
            chunk.model_version = row.model_version.clone();
            chunks.push(chunk);
        }
        if let Some(c) = chunks.last_mut() {
            c.sample_index.push(row.sample_index);
            c.timestamp_us.push(row.timestamp_us);
            c.acc_x.push(row.acc_x);
            c.acc_y.push(row.acc_y);
            c.acc_z.push(row.acc_z);
            c.gyro_x.push(row.gyro_x);
            c.gyro_y.push(row.gyro_y);
            c.gyro_z.push(row.gyro_z);
            c.mag_x.push(row.mag_x);
            c.mag_y.push(row.mag_y);
            c.mag_z.push(row.mag_z);
            c.temp_raw.push(row.temp_raw);
            c.accl_mag.push(row.accl_mag);
            c.gyro_mag.push(row.gyro_mag);
            c.velocity_pred.push(row.velocity_pred);
            c.velocity_raw.push(row.velocity_raw);
            c.movement_prob.push(row.movement_prob);
            c.ingest_us.push(row.ingest_us);
        }
    }
    chunks
}

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum EventKind {
    Started,
    Ended,
}

/// `new-session-topic`'s value: the sessions row, flattened, with the event and end reason.
#[derive(Serialize, Deserialize)]
struct SessionEventJson {
    event: EventKind,
    #[serde(flatten)]
    session: SessionRecord,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    end_reason: Option<SessionEndReason>,
}

/// The value of a `new-session-topic` message.
pub fn encode_session_event(event: &SessionEvent) -> Vec<u8> {
    let json = match event {
        SessionEvent::Started { session } => SessionEventJson {
            event: EventKind::Started,
            session: session.clone(),
            end_reason: None,
        },
        SessionEvent::Ended { session, reason } => SessionEventJson {
            event: EventKind::Ended,
            session: session.clone(),
            end_reason: Some(*reason),
        },
    };
    serde_json::to_vec(&json).unwrap_or_default()
}

/// The event of a `new-session-topic` message. An `"ended"` event without a reason (written by
/// another producer) reads as ended by the gap.
pub fn decode_session_event(value: &[u8]) -> Result<SessionEvent, serde_json::Error> {
    let json: SessionEventJson = serde_json::from_slice(value)?;
    Ok(match json.event {
        EventKind::Started => SessionEvent::Started {
            session: json.session,
        },
        EventKind::Ended => SessionEvent::Ended {
            session: json.session,
            reason: json.end_reason.unwrap_or(SessionEndReason::Gap),
        },
    })
}

/// The value of a message of the other output topics (aggregates, windows, gaps, late): the
/// row as a JSON object.
pub fn encode_row<T: Serialize>(row: &T) -> Vec<u8> {
    serde_json::to_vec(row).unwrap_or_default()
}

/// The session id's sensor: the part before the last `_` (`{sensor_id}_{first_timestamp_us}`).
pub fn session_sensor(session_id: &SessionId) -> Option<Arc<str>> {
    session_id.rsplit_once('_').map(|(s, _)| Arc::from(s))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests unwrap freely
mod tests {
    use super::*;

    fn chunk(sensor: &str, session: &str, n: u32) -> SampleChunk {
        let mut c = SampleChunk::with_capacity(sensor.into(), session.into(), n as usize);
        c.model_version = "v1".into();
        for i in 0..n {
            c.sample_index.push(i);
            c.timestamp_us.push(1_000 * i64::from(i));
            for col in c.f32_columns_mut() {
                col.push(i as f32 / 2.0);
            }
            c.temp_raw.push(-3);
            c.ingest_us.push(7);
        }
        c
    }

    #[test]
    fn samples_round_trip_as_an_array_of_rows_with_the_lake_column_names() {
        let c = chunk("s1", "s1_0", 3);
        let bytes = encode_samples(&c);
        let value: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(value.as_array().unwrap().len(), 3);
        assert_eq!(value[2]["sample_index"], 2);
        assert_eq!(value[0]["model_version"], "v1");
        assert!(value[0].get("velocity_raw").is_some());
        let rows = decode_samples(&bytes).unwrap();
        assert_eq!(chunks_from_rows(rows), vec![c]);
    }

    #[test]
    fn a_single_row_object_is_accepted() {
        let c = chunk("s1", "s1_0", 1);
        let one = serde_json::to_vec(&c.row(0)).unwrap();
        assert_eq!(decode_samples(&one).unwrap(), vec![c.row(0)]);
        assert!(decode_samples(b"{\"sensor_id\":1}").is_err());
    }

    #[test]
    fn rows_of_different_sessions_make_different_chunks() {
        let mut rows: Vec<_> = (0..2).map(|i| chunk("s1", "s1_0", 2).row(i)).collect();
        rows.extend((0..2).map(|i| chunk("s1", "s1_9", 2).row(i)));
        let chunks = chunks_from_rows(rows);
        assert_eq!(chunks.len(), 2);
        assert_eq!(&*chunks[1].session_id, "s1_9");
    }

    #[test]
    fn session_events_are_the_sessions_row_with_event_and_reason() {
        let session = SessionRecord {
            session_id: "a_b_5".into(),
            sensor_id: "a_b".into(),
            start_us: 5,
            end_us: Some(9),
            last_seen_us: 9,
            sample_count: 4,
        };
        let ended = SessionEvent::Ended {
            session: session.clone(),
            reason: SessionEndReason::Idle,
        };
        let bytes = encode_session_event(&ended);
        let v: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(v["event"], "ended");
        assert_eq!(v["session_id"], "a_b_5");
        assert_eq!(v["end_reason"], "idle");
        assert_eq!(decode_session_event(&bytes).unwrap(), ended);
        let started = SessionEvent::Started { session };
        let v: serde_json::Value = serde_json::from_slice(&encode_session_event(&started)).unwrap();
        assert!(v.get("end_reason").is_none());
        assert_eq!(v["end_us"], 9);
        assert_eq!(session_sensor(&"a_b_5".into()).as_deref(), Some("a_b"));
    }
}
