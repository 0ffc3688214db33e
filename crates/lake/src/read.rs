//! Reading the lake back: what load tests and tools need to check delivery.

use std::collections::{HashMap, HashSet};
use std::path::Path;

use arrow_array::{Array, StringArray, UInt32Array};
use parquet::arrow::ProjectionMask;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

use crate::lake::LakeError;

/// Rows of the `samples` table per sensor, and how many (sensor_id, sample_index) pairs
/// occurred more than once.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SampleCounts {
    pub rows: HashMap<String, u64>,
    pub duplicates: u64,
}

/// Counts the committed rows of `{root}/samples` per sensor, reading only the two key columns.
/// Hidden (`.`-prefixed) files are in-progress writes and are skipped, as every lake reader does.
pub fn count_samples_by_sensor(root: &Path) -> Result<SampleCounts, LakeError> {
    let mut counts = SampleCounts::default();
    let mut seen: HashMap<String, HashSet<u32>> = HashMap::new();
    let table_dir = root.join("samples");
    if !table_dir.exists() {
        return Ok(counts);
    }
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| LakeError::Io { path, source }
    };
    for partition in std::fs::read_dir(&table_dir).map_err(io(&table_dir))? {
        let partition = partition.map_err(io(&table_dir))?.path();
        if !partition.is_dir() {
            continue;
        }
        for file in std::fs::read_dir(&partition).map_err(io(&partition))? {
            let path = file.map_err(io(&partition))?.path();
            let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
            if name.starts_with('.') || !name.ends_with(".parquet") {
                continue;
            }
            let builder = ParquetRecordBatchReaderBuilder::try_new(
                std::fs::File::open(&path).map_err(io(&path))?,
            )?;
            let schema = builder.parquet_schema();
            let wanted: Vec<usize> = (0..schema.num_columns())
                .filter(|&i| matches!(schema.column(i).name(), "sensor_id" | "sample_index"))
                .collect();
            let mask = ProjectionMask::leaves(schema, wanted);
            for batch in builder.with_projection(mask).build()? {
                let batch = batch?;
                let sensors = batch
                    .column_by_name("sensor_id")
                    .and_then(|c| c.as_any().downcast_ref::<StringArray>());
                let indices = batch
                    .column_by_name("sample_index")
                    .and_then(|c| c.as_any().downcast_ref::<UInt32Array>());
                let (Some(sensors), Some(indices)) = (sensors, indices) else {
                    return Err(LakeError::InvalidConfig(
                        "samples file without sensor_id/sample_index columns",
                    ));
                };
                for i in 0..batch.num_rows() {
                    let id = sensors.value(i);
                    *counts.rows.entry(id.to_owned()).or_default() += 1;
                    if !seen
                        .entry(id.to_owned())
                        .or_default()
                        .insert(indices.value(i))
                    {
                        counts.duplicates += 1;
                    }
                }
            }
        }
    }
    Ok(counts)
}
