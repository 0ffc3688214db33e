"""The Parquet lake is readable by pyarrow.dataset and DuckDB with Hive partitioning.

Builds a small deterministic lake with the `write_sample_lake` example of sensorflow-lake
(which prints the expected row counts per table and date) and reads it back with both engines.

Run: python -m pytest tests/python/test_lake_readers.py   (needs cargo, pyarrow, duckdb)
"""

import datetime as dt
import json
import os
import pathlib
import subprocess

import duckdb
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pytest

REPO = pathlib.Path(__file__).resolve().parents[2]
TABLES = ["samples", "windows", "session_aggregates", "sessions", "gaps", "late"]

# Every samples column is required (non-null); the readers keep that.
SAMPLES_SCHEMA = pa.schema(
    pa.field(name, typ, nullable=False)
    for name, typ in [
        ("sensor_id", pa.string()),
        ("session_id", pa.string()),
        ("sample_index", pa.uint32()),
        ("timestamp_us", pa.int64()),
        *[(c, pa.float32()) for c in ["acc_x", "acc_y", "acc_z", "gyro_x", "gyro_y", "gyro_z", "mag_x", "mag_y", "mag_z"]],
        ("temp_raw", pa.int16()),
        *[(c, pa.float32()) for c in ["accl_mag", "gyro_mag", "velocity_pred", "velocity_raw", "movement_prob"]],
        ("model_version", pa.string()),
        ("ingest_us", pa.int64()),
    ]
)


@pytest.fixture(scope="module")
def lake(tmp_path_factory):
    """(lake root, {table: {date: rows}}) of a freshly written sample lake."""
    root = tmp_path_factory.mktemp("lake")
    # A prebuilt example (scripts/test.sh sets it) avoids `cargo run -p`, whose per-package
    # feature resolution would rebuild half the dependencies.
    prebuilt = os.environ.get("SENSORFLOW_WRITE_SAMPLE_LAKE")
    cmd = [prebuilt] if prebuilt else ["cargo", "run", "-q", "-p", "sensorflow-lake", "--example", "write_sample_lake", "--"]
    out = subprocess.run(
        cmd + [str(root)],
        cwd=REPO,
        check=True,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    counts = json.loads(out.stdout.strip().splitlines()[-1])
    # A half-written file of a crashed writer must be invisible to both engines.
    partition = root / "samples" / "date=2024-03-09"
    (partition / ".part-9999999999999-000001-crashed.parquet.tmp").write_bytes(b"PAR1 garbage")
    return root, counts


def hive(table_root):
    return ds.dataset(
        table_root,
        format="parquet",
        partitioning=ds.partitioning(pa.schema([("date", pa.date32())]), flavor="hive"),
    )


def test_sample_lake_has_every_table_on_both_dates(lake):
    root, counts = lake
    assert sorted(counts) == sorted(TABLES)
    assert counts["samples"] == {"2024-03-09": 1800, "2024-03-10": 2040}
    for table in TABLES:
        dirs = sorted(p.name for p in (root / table).iterdir() if p.is_dir())
        assert dirs == [f"date={d}" for d in sorted(counts[table])]
    # Two flushes while writing samples: each partition holds more than one file.
    assert len(list((root / "samples" / "date=2024-03-10").glob("part-*.parquet"))) == 2


def test_pyarrow_dataset_reads_samples_with_exact_types_and_date_partition(lake):
    root, counts = lake
    dataset = hive(root / "samples")
    expected = SAMPLES_SCHEMA.append(pa.field("date", pa.date32()))
    assert dataset.schema.equals(expected, check_metadata=False), dataset.schema
    table = dataset.to_table()
    assert table.num_rows == sum(counts["samples"].values())

    per_date = table.group_by("date").aggregate([("sample_index", "count")])
    got = {d.isoformat(): n for d, n in zip(per_date["date"].to_pylist(), per_date["sample_index_count"].to_pylist())}
    assert got == counts["samples"]

    # Partition pruning on the date column.
    day1 = dataset.to_table(filter=ds.field("date") == pa.scalar(dt.date(2024, 3, 9), pa.date32()))
    assert day1.num_rows == counts["samples"]["2024-03-09"]
    assert pc.max(day1["timestamp_us"]).as_py() < 1_710_028_800_000_000


def test_pyarrow_reads_every_table(lake):
    root, counts = lake
    for table in TABLES:
        t = hive(root / table).to_table()
        assert t.num_rows == sum(counts[table].values()), table
        assert t.schema.field("date").type == pa.date32()
    sessions = hive(root / "sessions").to_table()
    assert sessions.schema.field("end_us").type == pa.int64()
    assert sessions.schema.field("end_us").nullable
    assert sessions.schema.field("sample_count").type == pa.uint64()
    late = hive(root / "late").to_table()
    assert late.column_names == ["sensor_id", "sample_index", "timestamp_us", "watermark_us", "detected_at_us", "date"]


def test_duckdb_reads_samples_with_hive_partitioning(lake):
    root, counts = lake
    con = duckdb.connect()
    src = f"read_parquet('{root}/samples/**/*.parquet', hive_partitioning=true)"
    types = dict(con.execute(f"SELECT column_name, column_type FROM (DESCRIBE SELECT * FROM {src})").fetchall())
    assert types["sensor_id"] == "VARCHAR"
    assert types["sample_index"] == "UINTEGER"
    assert types["timestamp_us"] == "BIGINT"
    assert types["temp_raw"] == "SMALLINT"
    assert types["acc_x"] == "FLOAT"
    assert types["ingest_us"] == "BIGINT"
    assert types["date"] == "DATE"
    assert list(types)[:-1] == SAMPLES_SCHEMA.names

    rows = con.execute(f"SELECT CAST(date AS VARCHAR), count(*) FROM {src} GROUP BY date ORDER BY date").fetchall()
    assert dict(rows) == counts["samples"]

    # (session_id, sample_index) is unique; the date filter prunes to one partition.
    total, distinct = con.execute(f"SELECT count(*), count(DISTINCT (session_id, sample_index)) FROM {src}").fetchone()
    assert total == distinct == sum(counts["samples"].values())
    (n,) = con.execute(f"SELECT count(*) FROM {src} WHERE date = DATE '2024-03-10'").fetchone()
    assert n == counts["samples"]["2024-03-10"]


def test_duckdb_reads_every_table(lake):
    root, counts = lake
    con = duckdb.connect()
    for table in TABLES:
        rows = con.execute(
            f"SELECT CAST(date AS VARCHAR), count(*) FROM read_parquet('{root}/{table}/**/*.parquet', "
            "hive_partitioning=true) GROUP BY date ORDER BY date"
        ).fetchall()
        assert dict(rows) == counts[table], table
    (nulls,) = con.execute(
        f"SELECT count(*) FROM read_parquet('{root}/sessions/**/*.parquet') WHERE end_us IS NULL"
    ).fetchone()
    assert nulls == 0
