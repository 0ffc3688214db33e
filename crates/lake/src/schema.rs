//! The lake's tables: their names, Arrow schemas (DESIGN.md, "Record schemas") and the columnar
//! row buffers that turn pipeline records into Arrow record batches.
//!
//! Every buffer keeps one plain `Vec` per primitive column and a [`StringBuilder`] per string
//! column. Appending a [`SampleChunk`] is one `extend_from_slice` per column; taking a batch hands
//! the vectors to Arrow without copying them. Nothing here allocates per row except the growth of
//! those vectors, which is amortised and reused across batches through `with_capacity`.

use std::ops::Range;
use std::sync::{Arc, LazyLock};

use arrow_array::builder::{BinaryBuilder, StringBuilder};
use arrow_array::types::{Float32Type, Float64Type, Int16Type, Int64Type, UInt32Type, UInt64Type};
use arrow_array::{ArrayRef, Int64Array, PrimitiveArray, RecordBatch};
use arrow_buffer::ScalarBuffer;
use arrow_schema::{ArrowError, DataType, Field, Schema, SchemaRef};
use sensorflow_records::{
    GapRecord, LateRecord, QuarantineRecord, SampleChunk, SessionAggregate, SessionRecord,
    WindowRecord,
};

/// One table of the lake; its [`name`](Table::name) is the directory under the lake root.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Table {
    /// Processed samples, partitioned by `timestamp_us`.
    Samples,
    /// Window features, partitioned by `window_start_us`.
    Windows,
    /// Periodic session aggregates, partitioned by `emitted_at_us`.
    SessionAggregates,
    /// Ended sessions, partitioned by `start_us`.
    Sessions,
    /// Sample-index gaps, partitioned by `detected_at_us`.
    Gaps,
    /// Late samples, partitioned by `detected_at_us`.
    Late,
    /// Records no stage may process (implausible event times, dead letters), partitioned by
    /// `ingest_us`: their own times cannot be trusted to name a date.
    Quarantine,
}

impl Table {
    /// Every table, in a fixed order (the order of [`Table::index`]).
    pub const ALL: [Table; 7] = [
        Table::Samples,
        Table::Windows,
        Table::SessionAggregates,
        Table::Sessions,
        Table::Gaps,
        Table::Late,
        Table::Quarantine,
    ];

    /// The table's directory name under the lake root (and its name in queries).
    pub fn name(self) -> &'static str {
        match self {
            Table::Samples => "samples",
            Table::Windows => "windows",
            Table::SessionAggregates => "session_aggregates",
            Table::Sessions => "sessions",
            Table::Gaps => "gaps",
            Table::Late => "late",
            Table::Quarantine => "quarantine",
        }
    }

    /// The table named `name`, if any.
    pub fn from_name(name: &str) -> Option<Table> {
        Table::ALL.into_iter().find(|t| t.name() == name)
    }

    /// Position of the table in [`Table::ALL`] (for per-table arrays).
    pub fn index(self) -> usize {
        self as usize
    }

    /// The Arrow schema every file of this table has. Shared; cloning is cheap.
    pub fn schema(self) -> SchemaRef {
        let schema: &LazyLock<SchemaRef> = match self {
            Table::Samples => &SAMPLES,
            Table::Windows => &WINDOWS,
            Table::SessionAggregates => &SESSION_AGGREGATES,
            Table::Sessions => &SESSIONS,
            Table::Gaps => &GAPS,
            Table::Late => &LATE,
            Table::Quarantine => &QUARANTINE,
        };
        Arc::clone(schema)
    }

    /// Columns worth dictionary-encoding in Parquet: the low-cardinality strings. Numeric
    /// columns are high-cardinality sensor readings for which a dictionary only costs time.
    pub(crate) fn dictionary_columns(self) -> &'static [&'static str] {
        match self {
            Table::Samples | Table::SessionAggregates | Table::Sessions => {
                &["sensor_id", "session_id"]
            }
            Table::Windows | Table::Gaps | Table::Late => &["sensor_id"],
            Table::Quarantine => &["sensor_id", "reason", "detail"],
        }
    }
}

impl std::fmt::Display for Table {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

fn required(name: &str, data_type: DataType) -> Field {
    Field::new(name, data_type, false)
}

static SAMPLES: LazyLock<SchemaRef> = LazyLock::new(|| {
    let f32 = |n| required(n, DataType::Float32);
    Arc::new(Schema::new(vec![
        required("sensor_id", DataType::Utf8),
        required("session_id", DataType::Utf8),
        required("sample_index", DataType::UInt32),
        required("timestamp_us", DataType::Int64),
        f32("acc_x"),
        f32("acc_y"),
        f32("acc_z"),
        f32("gyro_x"),
        f32("gyro_y"),
        f32("gyro_z"),
        f32("mag_x"),
        f32("mag_y"),
        f32("mag_z"),
        required("temp_raw", DataType::Int16),
        f32("accl_mag"),
        f32("gyro_mag"),
        f32("velocity_pred"),
        f32("velocity_raw"),
        f32("movement_prob"),
        required("model_version", DataType::Utf8),
        required("ingest_us", DataType::Int64),
    ]))
});

static WINDOWS: LazyLock<SchemaRef> = LazyLock::new(|| {
    let f64 = |n| required(n, DataType::Float64);
    Arc::new(Schema::new(vec![
        required("sensor_id", DataType::Utf8),
        required("window_start_us", DataType::Int64),
        required("window_end_us", DataType::Int64),
        required("count", DataType::UInt64),
        f64("accl_mag_mean"),
        f64("accl_mag_std"),
        f64("accl_mag_min"),
        f64("accl_mag_max"),
        f64("gyro_mag_mean"),
        f64("gyro_mag_std"),
        f64("gyro_mag_min"),
        f64("gyro_mag_max"),
    ]))
});

static SESSION_AGGREGATES: LazyLock<SchemaRef> = LazyLock::new(|| {
    let f64 = |n| required(n, DataType::Float64);
    Arc::new(Schema::new(vec![
        required("session_id", DataType::Utf8),
        required("sensor_id", DataType::Utf8),
        required("emitted_at_us", DataType::Int64),
        f64("max_velocity"),
        f64("distance_m"),
        f64("mean_velocity"),
        f64("moving_time_s"),
        required("sample_count", DataType::UInt64),
        f64("duration_s"),
    ]))
});

static SESSIONS: LazyLock<SchemaRef> = LazyLock::new(|| {
    Arc::new(Schema::new(vec![
        required("session_id", DataType::Utf8),
        required("sensor_id", DataType::Utf8),
        required("start_us", DataType::Int64),
        Field::new("end_us", DataType::Int64, true),
        required("last_seen_us", DataType::Int64),
        required("sample_count", DataType::UInt64),
    ]))
});

static GAPS: LazyLock<SchemaRef> = LazyLock::new(|| {
    Arc::new(Schema::new(vec![
        required("sensor_id", DataType::Utf8),
        required("from_index", DataType::UInt32),
        required("to_index", DataType::UInt32),
        required("missing", DataType::UInt64),
        required("detected_at_us", DataType::Int64),
    ]))
});

static LATE: LazyLock<SchemaRef> = LazyLock::new(|| {
    Arc::new(Schema::new(vec![
        required("sensor_id", DataType::Utf8),
        required("sample_index", DataType::UInt32),
        required("timestamp_us", DataType::Int64),
        required("watermark_us", DataType::Int64),
        required("detected_at_us", DataType::Int64),
    ]))
});

static QUARANTINE: LazyLock<SchemaRef> = LazyLock::new(|| {
    let f32 = |n| Field::new(n, DataType::Float32, true);
    Arc::new(Schema::new(vec![
        required("sensor_id", DataType::Utf8),
        required("reason", DataType::Utf8),
        required("detail", DataType::Utf8),
        required("ingest_us", DataType::Int64),
        required("detected_at_us", DataType::Int64),
        Field::new("sample_index", DataType::UInt32, true),
        Field::new("timestamp_us", DataType::UInt64, true),
        f32("acc_x"),
        f32("acc_y"),
        f32("acc_z"),
        f32("gyro_x"),
        f32("gyro_y"),
        f32("gyro_z"),
        f32("mag_x"),
        f32("mag_y"),
        f32("mag_z"),
        Field::new("temp_raw", DataType::Int16, true),
        Field::new("payload", DataType::Binary, true),
    ]))
});

/// Columnar rows of one table waiting to become a record batch.
pub(crate) trait RowBuffer: Send {
    /// The table whose schema [`take_batch`](RowBuffer::take_batch) produces.
    const TABLE: Table;
    /// An empty buffer sized for `capacity` rows.
    fn with_capacity(capacity: usize) -> Self;
    /// Rows buffered.
    fn len(&self) -> usize;
    /// Moves the buffered rows into a record batch, leaving the buffer empty with room for
    /// `capacity` more rows.
    fn take_batch(&mut self, capacity: usize) -> Result<RecordBatch, ArrowError>;
}

/// Moves `v` into an Arrow array (no copy) and leaves an empty vector of `capacity` behind.
fn take_col<T>(v: &mut Vec<T::Native>, capacity: usize) -> ArrayRef
where
    T: arrow_array::types::ArrowPrimitiveType,
{
    let values = std::mem::replace(v, Vec::with_capacity(capacity));
    Arc::new(PrimitiveArray::<T>::new(ScalarBuffer::from(values), None))
}

/// Average string length assumed when sizing string builders (sensor and session ids).
const STRING_BYTES_HINT: usize = 24;

fn string_builder(capacity: usize) -> StringBuilder {
    StringBuilder::with_capacity(capacity, capacity * STRING_BYTES_HINT)
}

/// Buffered rows of the `samples` table.
pub(crate) struct SamplesBuffer {
    sensor_id: StringBuilder,
    session_id: StringBuilder,
    sample_index: Vec<u32>,
    timestamp_us: Vec<i64>,
    /// acc_x .. movement_prob in schema order, minus temp_raw (which sits between mag_z and
    /// accl_mag and is kept apart because it is i16).
    f32_cols: [Vec<f32>; 14],
    temp_raw: Vec<i16>,
    model_version: StringBuilder,
    ingest_us: Vec<i64>,
}

impl SamplesBuffer {
    /// Appends rows `range` of `chunk`. The caller has checked that every column of the chunk
    /// has the same length and that `range` lies within it.
    pub(crate) fn push_range(&mut self, chunk: &SampleChunk, range: Range<usize>) {
        let n = range.len();
        self.sensor_id.append_value_n(&*chunk.sensor_id, n);
        self.session_id.append_value_n(&*chunk.session_id, n);
        self.sample_index
            .extend_from_slice(&chunk.sample_index[range.clone()]);
        self.timestamp_us
            .extend_from_slice(&chunk.timestamp_us[range.clone()]);
        for (dst, src) in self.f32_cols.iter_mut().zip(sample_f32_columns(chunk)) {
            dst.extend_from_slice(&src[range.clone()]);
        }
        self.temp_raw
            .extend_from_slice(&chunk.temp_raw[range.clone()]);
        self.model_version.append_value_n(&*chunk.model_version, n);
        self.ingest_us.extend_from_slice(&chunk.ingest_us[range]);
    }
}

/// The f32 columns of a chunk in the order of `SamplesBuffer::f32_cols`.
pub(crate) fn sample_f32_columns(c: &SampleChunk) -> [&[f32]; 14] {
    c.f32_columns()
}

impl RowBuffer for SamplesBuffer {
    const TABLE: Table = Table::Samples;

    fn with_capacity(capacity: usize) -> Self {
        Self {
            sensor_id: string_builder(capacity),
            session_id: string_builder(capacity),
            sample_index: Vec::with_capacity(capacity),
            timestamp_us: Vec::with_capacity(capacity),
            f32_cols: std::array::from_fn(|_| Vec::with_capacity(capacity)),
            temp_raw: Vec::with_capacity(capacity),
            model_version: string_builder(capacity),
            ingest_us: Vec::with_capacity(capacity),
        }
    }

    fn len(&self) -> usize {
        self.sample_index.len()
    }

    fn take_batch(&mut self, capacity: usize) -> Result<RecordBatch, ArrowError> {
        let mut f32s = self
            .f32_cols
            .each_mut()
            .map(|v| take_col::<Float32Type>(v, capacity))
            .into_iter();
        let mut next_f32 = || f32s.next().ok_or_else(|| unreachable_column("f32"));
        let mut columns: Vec<ArrayRef> = Vec::with_capacity(21);
        columns.push(Arc::new(self.sensor_id.finish()));
        columns.push(Arc::new(self.session_id.finish()));
        columns.push(take_col::<UInt32Type>(&mut self.sample_index, capacity));
        columns.push(take_col::<Int64Type>(&mut self.timestamp_us, capacity));
        for _ in 0..9 {
            columns.push(next_f32()?); // acc, gyro, mag
        }
        columns.push(take_col::<Int16Type>(&mut self.temp_raw, capacity));
        for _ in 0..5 {
            // accl_mag, gyro_mag, velocity_pred, velocity_raw, movement_prob
            columns.push(next_f32()?);
        }
        columns.push(Arc::new(self.model_version.finish()));
        columns.push(take_col::<Int64Type>(&mut self.ingest_us, capacity));
        RecordBatch::try_new(Table::Samples.schema(), columns)
    }
}

fn unreachable_column(kind: &str) -> ArrowError {
    ArrowError::InvalidArgumentError(format!("samples buffer ran out of {kind} columns"))
}

/// Buffered rows of the `windows` table.
pub(crate) struct WindowsBuffer {
    sensor_id: StringBuilder,
    window_start_us: Vec<i64>,
    window_end_us: Vec<i64>,
    count: Vec<u64>,
    stats: [Vec<f64>; 8],
}

impl WindowsBuffer {
    /// Appends one row.
    pub(crate) fn push(&mut self, r: &WindowRecord) {
        self.sensor_id.append_value(&*r.sensor_id);
        self.window_start_us.push(r.window_start_us);
        self.window_end_us.push(r.window_end_us);
        self.count.push(r.count);
        let values = [
            r.accl_mag_mean,
            r.accl_mag_std,
            r.accl_mag_min,
            r.accl_mag_max,
            r.gyro_mag_mean,
            r.gyro_mag_std,
            r.gyro_mag_min,
            r.gyro_mag_max,
        ];
        for (col, v) in self.stats.iter_mut().zip(values) {
            col.push(v);
        }
    }
}

impl RowBuffer for WindowsBuffer {
    const TABLE: Table = Table::Windows;

    fn with_capacity(capacity: usize) -> Self {
        Self {
            sensor_id: string_builder(capacity),
            window_start_us: Vec::with_capacity(capacity),
            window_end_us: Vec::with_capacity(capacity),
            count: Vec::with_capacity(capacity),
            stats: std::array::from_fn(|_| Vec::with_capacity(capacity)),
        }
    }

    fn len(&self) -> usize {
        self.window_start_us.len()
    }

    fn take_batch(&mut self, capacity: usize) -> Result<RecordBatch, ArrowError> {
        let mut columns: Vec<ArrayRef> = vec![
            Arc::new(self.sensor_id.finish()),
            take_col::<Int64Type>(&mut self.window_start_us, capacity),
            take_col::<Int64Type>(&mut self.window_end_us, capacity),
            take_col::<UInt64Type>(&mut self.count, capacity),
        ];
        columns.extend(
            self.stats
                .iter_mut()
                .map(|v| take_col::<Float64Type>(v, capacity)),
        );
        RecordBatch::try_new(Table::Windows.schema(), columns)
    }
}

/// Buffered rows of the `session_aggregates` table.
pub(crate) struct AggregatesBuffer {
    session_id: StringBuilder,
    sensor_id: StringBuilder,
    emitted_at_us: Vec<i64>,
    /// max_velocity, distance_m, mean_velocity, moving_time_s.
    before_count: [Vec<f64>; 4],
    sample_count: Vec<u64>,
    duration_s: Vec<f64>,
}

impl AggregatesBuffer {
    /// Appends one row.
    pub(crate) fn push(&mut self, r: &SessionAggregate) {
        self.session_id.append_value(&*r.session_id);
        self.sensor_id.append_value(&*r.sensor_id);
        self.emitted_at_us.push(r.emitted_at_us);
        let values = [
            r.max_velocity,
            r.distance_m,
            r.mean_velocity,
            r.moving_time_s,
        ];
        for (col, v) in self.before_count.iter_mut().zip(values) {
            col.push(v);
        }
        self.sample_count.push(r.sample_count);
        self.duration_s.push(r.duration_s);
    }
}

impl RowBuffer for AggregatesBuffer {
    const TABLE: Table = Table::SessionAggregates;

    fn with_capacity(capacity: usize) -> Self {
        Self {
            session_id: string_builder(capacity),
            sensor_id: string_builder(capacity),
            emitted_at_us: Vec::with_capacity(capacity),
            before_count: std::array::from_fn(|_| Vec::with_capacity(capacity)),
            sample_count: Vec::with_capacity(capacity),
            duration_s: Vec::with_capacity(capacity),
        }
    }

    fn len(&self) -> usize {
        self.emitted_at_us.len()
    }

    fn take_batch(&mut self, capacity: usize) -> Result<RecordBatch, ArrowError> {
        let mut columns: Vec<ArrayRef> = vec![
            Arc::new(self.session_id.finish()),
            Arc::new(self.sensor_id.finish()),
            take_col::<Int64Type>(&mut self.emitted_at_us, capacity),
        ];
        columns.extend(
            self.before_count
                .iter_mut()
                .map(|v| take_col::<Float64Type>(v, capacity)),
        );
        columns.push(take_col::<UInt64Type>(&mut self.sample_count, capacity));
        columns.push(take_col::<Float64Type>(&mut self.duration_s, capacity));
        RecordBatch::try_new(Table::SessionAggregates.schema(), columns)
    }
}

/// Buffered rows of the `sessions` table.
pub(crate) struct SessionsBuffer {
    session_id: StringBuilder,
    sensor_id: StringBuilder,
    start_us: Vec<i64>,
    end_us: Vec<Option<i64>>,
    last_seen_us: Vec<i64>,
    sample_count: Vec<u64>,
}

impl SessionsBuffer {
    /// Appends one row.
    pub(crate) fn push(&mut self, r: &SessionRecord) {
        self.session_id.append_value(&*r.session_id);
        self.sensor_id.append_value(&*r.sensor_id);
        self.start_us.push(r.start_us);
        self.end_us.push(r.end_us);
        self.last_seen_us.push(r.last_seen_us);
        self.sample_count.push(r.sample_count);
    }
}

impl RowBuffer for SessionsBuffer {
    const TABLE: Table = Table::Sessions;

    fn with_capacity(capacity: usize) -> Self {
        Self {
            session_id: string_builder(capacity),
            sensor_id: string_builder(capacity),
            start_us: Vec::with_capacity(capacity),
            end_us: Vec::with_capacity(capacity),
            last_seen_us: Vec::with_capacity(capacity),
            sample_count: Vec::with_capacity(capacity),
        }
    }

    fn len(&self) -> usize {
        self.start_us.len()
    }

    fn take_batch(&mut self, capacity: usize) -> Result<RecordBatch, ArrowError> {
        let end_us = std::mem::replace(&mut self.end_us, Vec::with_capacity(capacity));
        let columns: Vec<ArrayRef> = vec![
            Arc::new(self.session_id.finish()),
            Arc::new(self.sensor_id.finish()),
            take_col::<Int64Type>(&mut self.start_us, capacity),
            Arc::new(Int64Array::from(end_us)),
            take_col::<Int64Type>(&mut self.last_seen_us, capacity),
            take_col::<UInt64Type>(&mut self.sample_count, capacity),
        ];
        RecordBatch::try_new(Table::Sessions.schema(), columns)
    }
}

/// Buffered rows of the `gaps` table.
pub(crate) struct GapsBuffer {
    sensor_id: StringBuilder,
    from_index: Vec<u32>,
    to_index: Vec<u32>,
    missing: Vec<u64>,
    detected_at_us: Vec<i64>,
}

impl GapsBuffer {
    /// Appends one row.
    pub(crate) fn push(&mut self, r: &GapRecord) {
        self.sensor_id.append_value(&*r.sensor_id);
        self.from_index.push(r.from_index);
        self.to_index.push(r.to_index);
        self.missing.push(r.missing);
        self.detected_at_us.push(r.detected_at_us);
    }
}

impl RowBuffer for GapsBuffer {
    const TABLE: Table = Table::Gaps;

    fn with_capacity(capacity: usize) -> Self {
        Self {
            sensor_id: string_builder(capacity),
            from_index: Vec::with_capacity(capacity),
            to_index: Vec::with_capacity(capacity),
            missing: Vec::with_capacity(capacity),
            detected_at_us: Vec::with_capacity(capacity),
        }
    }

    fn len(&self) -> usize {
        self.from_index.len()
    }

    fn take_batch(&mut self, capacity: usize) -> Result<RecordBatch, ArrowError> {
        let columns: Vec<ArrayRef> = vec![
            Arc::new(self.sensor_id.finish()),
            take_col::<UInt32Type>(&mut self.from_index, capacity),
            take_col::<UInt32Type>(&mut self.to_index, capacity),
            take_col::<UInt64Type>(&mut self.missing, capacity),
            take_col::<Int64Type>(&mut self.detected_at_us, capacity),
        ];
        RecordBatch::try_new(Table::Gaps.schema(), columns)
    }
}

/// Buffered rows of the `late` table.
pub(crate) struct LateBuffer {
    sensor_id: StringBuilder,
    sample_index: Vec<u32>,
    timestamp_us: Vec<i64>,
    watermark_us: Vec<i64>,
    detected_at_us: Vec<i64>,
}

impl LateBuffer {
    /// Appends one row.
    pub(crate) fn push(&mut self, r: &LateRecord) {
        self.sensor_id.append_value(&*r.sensor_id);
        self.sample_index.push(r.sample_index);
        self.timestamp_us.push(r.timestamp_us);
        self.watermark_us.push(r.watermark_us);
        self.detected_at_us.push(r.detected_at_us);
    }
}

impl RowBuffer for LateBuffer {
    const TABLE: Table = Table::Late;

    fn with_capacity(capacity: usize) -> Self {
        Self {
            sensor_id: string_builder(capacity),
            sample_index: Vec::with_capacity(capacity),
            timestamp_us: Vec::with_capacity(capacity),
            watermark_us: Vec::with_capacity(capacity),
            detected_at_us: Vec::with_capacity(capacity),
        }
    }

    fn len(&self) -> usize {
        self.sample_index.len()
    }

    fn take_batch(&mut self, capacity: usize) -> Result<RecordBatch, ArrowError> {
        let columns: Vec<ArrayRef> = vec![
            Arc::new(self.sensor_id.finish()),
            take_col::<UInt32Type>(&mut self.sample_index, capacity),
            take_col::<Int64Type>(&mut self.timestamp_us, capacity),
            take_col::<Int64Type>(&mut self.watermark_us, capacity),
            take_col::<Int64Type>(&mut self.detected_at_us, capacity),
        ];
        RecordBatch::try_new(Table::Late.schema(), columns)
    }
}

/// Buffered rows of the `quarantine` table. Rare rows: kept simple, one `Option` per cell.
pub(crate) struct QuarantineBuffer {
    sensor_id: StringBuilder,
    reason: StringBuilder,
    detail: StringBuilder,
    ingest_us: Vec<i64>,
    detected_at_us: Vec<i64>,
    sample_index: Vec<Option<u32>>,
    timestamp_us: Vec<Option<u64>>,
    /// acc_x .. mag_z in schema order.
    readings: [Vec<Option<f32>>; 9],
    temp_raw: Vec<Option<i16>>,
    payload: BinaryBuilder,
}

impl QuarantineBuffer {
    /// Appends one row.
    pub(crate) fn push(&mut self, r: &QuarantineRecord) {
        self.sensor_id.append_value(&*r.sensor_id);
        self.reason.append_value(r.reason.as_str());
        self.detail.append_value(&r.detail);
        self.ingest_us.push(r.ingest_us);
        self.detected_at_us.push(r.detected_at_us);
        self.sample_index.push(r.sample_index);
        self.timestamp_us.push(r.timestamp_us);
        let values = [
            r.acc_x, r.acc_y, r.acc_z, r.gyro_x, r.gyro_y, r.gyro_z, r.mag_x, r.mag_y, r.mag_z,
        ];
        for (col, v) in self.readings.iter_mut().zip(values) {
            col.push(v);
        }
        self.temp_raw.push(r.temp_raw);
        self.payload.append_option(r.payload.as_deref());
    }
}

impl RowBuffer for QuarantineBuffer {
    const TABLE: Table = Table::Quarantine;

    fn with_capacity(capacity: usize) -> Self {
        Self {
            sensor_id: string_builder(capacity),
            reason: string_builder(capacity),
            detail: string_builder(capacity),
            ingest_us: Vec::with_capacity(capacity),
            detected_at_us: Vec::with_capacity(capacity),
            sample_index: Vec::with_capacity(capacity),
            timestamp_us: Vec::with_capacity(capacity),
            readings: std::array::from_fn(|_| Vec::with_capacity(capacity)),
            temp_raw: Vec::with_capacity(capacity),
            payload: BinaryBuilder::new(),
        }
    }

    fn len(&self) -> usize {
        self.ingest_us.len()
    }

    fn take_batch(&mut self, capacity: usize) -> Result<RecordBatch, ArrowError> {
        fn opt<T: arrow_array::types::ArrowPrimitiveType>(
            v: &mut Vec<Option<T::Native>>,
            capacity: usize,
        ) -> ArrayRef {
            let values = std::mem::replace(v, Vec::with_capacity(capacity));
            Arc::new(values.into_iter().collect::<PrimitiveArray<T>>())
        }
        let mut columns: Vec<ArrayRef> = vec![
            Arc::new(self.sensor_id.finish()),
            Arc::new(self.reason.finish()),
            Arc::new(self.detail.finish()),
            take_col::<Int64Type>(&mut self.ingest_us, capacity),
            take_col::<Int64Type>(&mut self.detected_at_us, capacity),
            opt::<UInt32Type>(&mut self.sample_index, capacity),
            opt::<UInt64Type>(&mut self.timestamp_us, capacity),
        ];
        for col in &mut self.readings {
            columns.push(opt::<Float32Type>(col, capacity));
        }
        columns.push(opt::<Int16Type>(&mut self.temp_raw, capacity));
        columns.push(Arc::new(self.payload.finish()));
        RecordBatch::try_new(Table::Quarantine.schema(), columns)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn every_table_round_trips_through_its_name() {
        for t in Table::ALL {
            assert_eq!(Table::from_name(t.name()), Some(t));
            assert_eq!(Table::ALL[t.index()], t);
        }
        assert_eq!(Table::from_name("nope"), None);
    }

    #[test]
    fn samples_batch_has_the_schema_column_order() {
        let mut chunk = SampleChunk::with_capacity("s1".into(), "s1_0".into(), 2);
        for i in 0..2u32 {
            chunk.sample_index.push(i);
            chunk.timestamp_us.push(i64::from(i) * 5000);
            for col in chunk.f32_columns_mut() {
                col.push(i as f32);
            }
            chunk.temp_raw.push(7);
            chunk.ingest_us.push(42);
        }
        let mut buf = SamplesBuffer::with_capacity(4);
        buf.push_range(&chunk, 1..2);
        assert_eq!(buf.len(), 1);
        let batch = buf.take_batch(4).unwrap();
        assert_eq!(batch.num_rows(), 1);
        assert_eq!(batch.schema(), Table::Samples.schema());
        assert_eq!(buf.len(), 0);
        // The f32 columns are all alike to Arrow: check their names line up with the chunk's.
        let schema = Table::Samples.schema();
        let f32_names: Vec<&str> = schema
            .fields()
            .iter()
            .filter(|f| f.data_type() == &DataType::Float32)
            .map(|f| f.name().as_str())
            .collect();
        assert_eq!(f32_names, SampleChunk::F32_COLUMNS);
    }
}
