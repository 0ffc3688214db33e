//! The log's record reader on arbitrary segment files: opening the log (which scans and
//! truncates a torn tail) and reading every record back must never panic, whatever the bytes.

#![no_main]

use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use sensorflow_log::{Log, LogConfig};

fuzz_target!(|data: &[u8]| {
    let Ok(dir) = tempfile::tempdir() else { return };
    if std::fs::write(dir.path().join(format!("{:020}.log", 0)), data).is_err() {
        return;
    }
    let mut config = LogConfig::new(dir.path());
    config.verify_on_open = true;
    let Ok((log, report)) = Log::open(config) else { return };
    assert_eq!(report.next_offset, log.end_offset());
    if let Ok(mut reader) = log.reader_untracked(0) {
        let mut out = Vec::new();
        let mut read = 0u64;
        while reader.position() < log.end_offset() {
            match reader.read_batch(&mut out, 1024, Duration::ZERO) {
                Ok(0) | Err(_) => break,
                Ok(n) => read += n as u64,
            }
            out.clear();
        }
        assert!(read <= log.end_offset());
    }
    let _ = log.close();
});
