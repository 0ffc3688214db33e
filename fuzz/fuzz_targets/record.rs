//! `IngestRecordRef::decode` on arbitrary bytes: never panics, and whatever decodes re-encodes
//! to exactly the same bytes (the format has a single encoding per record).
#![no_main]

use libfuzzer_sys::fuzz_target;
use sensorflow_protocol::IngestRecordRef;

fuzz_target!(|data: &[u8]| {
    let Ok(record) = IngestRecordRef::decode(data) else { return };
    assert_eq!(record.encoded_len(), data.len());
    let mut out = Vec::with_capacity(data.len());
    record.encode(&mut out);
    assert_eq!(out, data, "decode -> encode is not the identity");

    let owned = record.to_owned();
    assert_eq!(owned.as_ref(), record);
    let mut again = Vec::new();
    owned.encode(&mut again);
    assert_eq!(again, data);
});
