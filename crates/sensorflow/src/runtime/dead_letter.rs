//! Dead letters: log records that make a stage fail are found and set aside, so that no single
//! record can keep the dataflow failing after every restart.
//!
//! Most bad input never gets this far: the decoder counts malformed packets and the pipeline
//! quarantines implausible event times before any stage sees them. This is the net under
//! whatever still slips through (a bug in an operator, a row the lake cannot encode): a failure
//! that follows the data.
//!
//! How a record is found:
//!
//! 1. A failure whose cause can be traced to input — the pipeline panicked during a step, or the
//!    sink refused a batch's rows for what they contain ([`LakeError::is_data_error`]) — marks
//!    the log offsets of that step as *suspect*. The dataflow restarts from its checkpoint as
//!    after any failure.
//! 2. The restarted run processes the suspect range one record per step. If the failure is
//!    deterministic it happens again, now with a single record in the step: that record is
//!    *poisoned*. The dataflow restarts once more.
//! 3. Every later run skips a poisoned record: instead of processing it, it writes the record's
//!    payload to the lake's `quarantine` table (reason `stage_failed`) and counts it. The
//!    dataflow moves on.
//!
//! A failure that does not repeat (an environment problem that went away) simply clears the
//! suspicion once the range is past. Storage failures (disk full, directory gone) are not
//! suspected at all: they are retried as they are.
//!
//! The state lives in memory for the life of the process. A process restart re-finds a poisoned
//! record the same way: the failure is caught, never a crash.
//!
//! [`LakeError::is_data_error`]: sensorflow_lake::LakeError::is_data_error

use std::collections::BTreeMap;
use std::ops::Range;

/// Poisoned records remembered at most; the oldest offsets are forgotten first (the log has
/// moved past them).
const MAX_POISONED: usize = 10_000;

/// Log records suspected of, or found to be, making a stage fail. Shared by the runs of one
/// dataflow (see the module docs).
#[derive(Debug, Default)]
pub(crate) struct DeadLetters {
    /// Offsets whose step failed, not yet narrowed down to one record.
    suspect: Option<Range<u64>>,
    /// Records found to fail a stage: offset → what failed.
    poisoned: BTreeMap<u64, String>,
}

/// Why a run of the dataflow stopped, and the log offsets of the step that failed when the
/// failure followed the data.
#[derive(Debug)]
pub(crate) struct RunFailure {
    pub(crate) message: String,
    pub(crate) origin: Option<Range<u64>>,
}

impl std::fmt::Display for RunFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl DeadLetters {
    /// Records a failure of the step that processed `origin`: a single record is poisoned, a
    /// longer range becomes suspect.
    pub(crate) fn failed(&mut self, origin: Range<u64>, message: &str) {
        if origin.is_empty() {
            return;
        }
        if origin.end - origin.start == 1 {
            tracing::warn!(
                offset = origin.start,
                failure = message,
                "log record fails a stage deterministically; it goes to the quarantine table"
            );
            self.poisoned.insert(origin.start, message.to_owned());
            while self.poisoned.len() > MAX_POISONED {
                self.poisoned.pop_first();
            }
            self.suspect = None;
        } else {
            tracing::warn!(
                from = origin.start,
                to = origin.end,
                failure = message,
                "a step failed on its input; the restart processes these records one at a time"
            );
            self.suspect = Some(origin);
        }
    }

    /// Whether records in `range` must be processed one per step (they overlap the suspect
    /// range).
    pub(crate) fn is_suspect(&self, range: &Range<u64>) -> bool {
        self.suspect
            .as_ref()
            .is_some_and(|s| s.start < range.end && range.start < s.end)
    }

    /// The poisoned records in `range`, with what they failed (usually none).
    pub(crate) fn poisoned_in(&self, range: &Range<u64>) -> Vec<(u64, String)> {
        self.poisoned
            .range(range.clone())
            .map(|(&offset, failure)| (offset, failure.clone()))
            .collect()
    }

    /// The run got past `offset` without failing: a suspicion that ends before it is cleared.
    pub(crate) fn passed(&mut self, offset: u64) {
        if self.suspect.as_ref().is_some_and(|s| s.end <= offset) {
            tracing::info!("the suspected failure did not repeat; processing normally again");
            self.suspect = None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_range_is_suspect_and_a_failed_single_record_is_poisoned() {
        let mut d = DeadLetters::default();
        d.failed(10..20, "boom");
        assert!(d.is_suspect(&(15..16)));
        assert!(!d.is_suspect(&(20..30)));
        d.failed(17..18, "boom");
        assert_eq!(d.poisoned_in(&(0..100)), vec![(17, "boom".to_owned())]);
        assert!(
            !d.is_suspect(&(15..16)),
            "found: the rest is processed normally"
        );
    }

    #[test]
    fn a_suspicion_that_does_not_repeat_is_cleared_once_passed() {
        let mut d = DeadLetters::default();
        d.failed(10..20, "transient");
        d.passed(15);
        assert!(d.is_suspect(&(15..16)));
        d.passed(20);
        assert!(!d.is_suspect(&(15..16)));
        assert!(d.poisoned_in(&(0..100)).is_empty());
    }

    #[test]
    fn an_empty_origin_changes_nothing() {
        let mut d = DeadLetters::default();
        d.failed(5..5, "tick");
        assert!(!d.is_suspect(&(0..10)));
        assert!(d.poisoned_in(&(0..10)).is_empty());
    }
}
