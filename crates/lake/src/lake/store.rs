//! Where the lake lives: a local directory, or a prefix of an object store (Amazon S3 or any
//! S3-compatible server, through the `object_store` crate).
//!
//! # Why files are staged locally and uploaded with one PUT
//!
//! The writer's code is the same for both: it encodes each file into a hidden `.tmp` in a
//! directory laid out like the lake (`{table}/date=…/.part-….parquet.tmp`). For a local lake
//! that directory *is* the lake and committing is the usual fsync + rename. For an object store
//! it is a staging directory under the data dir, and committing uploads the finished file to
//! `{prefix}/{table}/date=…/part-….parquet` in one PUT (or one multipart upload above
//! [`MULTIPART_THRESHOLD`]), then deletes the staged copy. An S3 PUT and a completed multipart
//! upload are atomic: readers see the whole object or none, so no partial file is ever visible,
//! and a crash mid-upload leaves at most an unfinished multipart upload, which S3 never lists
//! (a bucket lifecycle rule aborts it). Staging on disk rather than in memory keeps memory
//! bounded by the encoder's buffers even with seven tables × `max_open_partitions` files of up
//! to `target_file_bytes` open at once. The local path gains no copy: its files are never
//! staged.
//!
//! The staged file is not fsynced: the object store is the durable copy, and a staged file lost
//! in a crash is rewritten by the log replay like any uncommitted file.
//!
//! # Driving async I/O from the sink thread
//!
//! `object_store` is async; the lake is written from a plain OS thread (no runtime), so an
//! [`ObjectLake`] owns a current-thread tokio runtime and blocks on each request. Called from
//! inside another runtime (the binary opens the lake during its async start-up), the request
//! runs on a scoped thread instead, since a runtime cannot block inside another one.

use std::fmt;
use std::fs::File;
use std::future::Future;
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use chrono::NaiveDate;
use futures::stream::FuturesUnordered;
use futures::{StreamExt, TryStreamExt};
use object_store::aws::AmazonS3Builder;
use object_store::path::Path as ObjectPath;
use object_store::{ObjectMeta, ObjectStore, ObjectStoreExt, PutPayload};

use super::LakeError;
use super::layout::{file_epoch, file_partition_epoch};
use crate::schema::Table;

/// Files at least this large are uploaded in parts (S3 allows at most 5 GiB in one PUT, and a
/// failed part is cheaper to retry than a whole file).
pub const MULTIPART_THRESHOLD: u64 = 32 * 1024 * 1024;
/// Size of each part of a multipart upload (S3's minimum is 5 MiB, except for the last part).
const PART_BYTES: usize = 16 * 1024 * 1024;
/// Parts of one upload sent at once: one connection rarely fills the link to S3, and the sink
/// thread waits for the upload (bounds memory to this many parts).
const PARTS_IN_FLIGHT: usize = 4;

/// Where a lake lives.
#[derive(Clone, Debug)]
pub enum LakeLocation {
    /// A local directory; tables are directories beneath it.
    Dir(PathBuf),
    /// A prefix of an object store.
    Objects(ObjectLake),
}

impl LakeLocation {
    /// A lake at `url`: `s3://bucket/prefix` (also `s3a://`) on S3 or any S3-compatible server,
    /// configured by the standard AWS variables (see [`ObjectLake::s3`]), with files staged in
    /// `staging_dir`; anything else is a local directory.
    pub fn parse(url: &str, staging_dir: impl Into<PathBuf>) -> Result<LakeLocation, LakeError> {
        if url.starts_with("s3://") || url.starts_with("s3a://") {
            return Ok(LakeLocation::Objects(ObjectLake::s3(url, staging_dir)?));
        }
        if let Some((scheme, _)) = url.split_once("://") {
            if scheme != "file" {
                return Err(LakeError::InvalidUrl {
                    url: url.into(),
                    reason: "the lake is a directory or s3://bucket/prefix".into(),
                });
            }
            return Ok(LakeLocation::Dir(PathBuf::from(&url["file://".len()..])));
        }
        Ok(LakeLocation::Dir(PathBuf::from(url)))
    }

    /// The local directory the writer writes files in: the lake itself, or the staging
    /// directory of an object-store lake.
    pub fn local_root(&self) -> &Path {
        match self {
            LakeLocation::Dir(d) => d,
            LakeLocation::Objects(o) => &o.staging,
        }
    }

    /// The object store, if the lake lives in one.
    pub fn objects(&self) -> Option<&ObjectLake> {
        match self {
            LakeLocation::Dir(_) => None,
            LakeLocation::Objects(o) => Some(o),
        }
    }

    /// Deletes every committed data file whose epoch is greater than `epoch` (see
    /// [`super::remove_files_after_epoch`]); on an object store, found by listing the prefix.
    pub fn remove_files_after_epoch(&self, epoch: u64) -> Result<usize, LakeError> {
        self.remove_files_where(&|name| file_epoch(name).is_some_and(|e| e > epoch))
    }

    /// Deletes every committed data file of a stream partition `p` for which `committed(p)`
    /// is `Some(epoch)` and whose epoch is greater (see [`super::partition_epoch_writer_id`]),
    /// in one listing; other partitions' files and embedded mode's are left alone.
    pub fn remove_stream_files_after(
        &self,
        committed: &dyn Fn(u32) -> Option<u64>,
    ) -> Result<usize, LakeError> {
        self.remove_files_where(&|name| {
            file_partition_epoch(name)
                .is_some_and(|(p, e)| committed(p).is_some_and(|last| e > last))
        })
    }

    fn remove_files_where(&self, doomed: &dyn Fn(&str) -> bool) -> Result<usize, LakeError> {
        match self {
            LakeLocation::Dir(d) => super::layout::remove_files_where(d, doomed),
            LakeLocation::Objects(o) => o.remove_files_where(doomed),
        }
    }

    /// The dates of `table`'s partitions, oldest first (see [`super::partition_dates`]).
    pub fn partition_dates(&self, table: Table) -> Result<Vec<NaiveDate>, LakeError> {
        match self {
            LakeLocation::Dir(d) => super::layout::partition_dates(d, table),
            LakeLocation::Objects(o) => o.partition_dates(table),
        }
    }
}

impl fmt::Display for LakeLocation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LakeLocation::Dir(d) => write!(f, "{}", d.display()),
            LakeLocation::Objects(o) => f.write_str(&o.url),
        }
    }
}

impl PartialEq for LakeLocation {
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (LakeLocation::Dir(a), LakeLocation::Dir(b)) => a == b,
            (LakeLocation::Objects(a), LakeLocation::Objects(b)) => {
                Arc::ptr_eq(&a.store, &b.store) && a.prefix == b.prefix && a.staging == b.staging
            }
            _ => false,
        }
    }
}

impl From<PathBuf> for LakeLocation {
    fn from(p: PathBuf) -> Self {
        LakeLocation::Dir(p)
    }
}

impl From<&PathBuf> for LakeLocation {
    fn from(p: &PathBuf) -> Self {
        LakeLocation::Dir(p.clone())
    }
}

impl From<&Path> for LakeLocation {
    fn from(p: &Path) -> Self {
        LakeLocation::Dir(p.to_path_buf())
    }
}

impl From<&str> for LakeLocation {
    fn from(p: &str) -> Self {
        LakeLocation::Dir(PathBuf::from(p))
    }
}

impl From<&String> for LakeLocation {
    fn from(p: &String) -> Self {
        LakeLocation::Dir(PathBuf::from(p))
    }
}

impl From<String> for LakeLocation {
    fn from(p: String) -> Self {
        LakeLocation::Dir(PathBuf::from(p))
    }
}

impl From<ObjectLake> for LakeLocation {
    fn from(o: ObjectLake) -> Self {
        LakeLocation::Objects(o)
    }
}

/// A lake under a prefix of an object store, with the local directory its files are staged in.
///
/// One writer per prefix, as for a directory: opening the lake deletes leftovers (hidden
/// objects, files of unfinished epochs) that a live writer would still need.
#[derive(Clone)]
pub struct ObjectLake {
    store: Arc<dyn ObjectStore>,
    prefix: ObjectPath,
    url: String,
    staging: PathBuf,
    multipart_threshold: u64,
    part_bytes: usize,
    driver: Arc<Driver>,
}

impl fmt::Debug for ObjectLake {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ObjectLake")
            .field("url", &self.url)
            .field("staging", &self.staging)
            .finish_non_exhaustive()
    }
}

/// The runtime that drives requests; shut down without blocking when the last lake handle is
/// dropped (dropping a runtime inside another one would panic).
struct Driver(Option<tokio::runtime::Runtime>);

impl Drop for Driver {
    fn drop(&mut self) {
        if let Some(rt) = self.0.take() {
            rt.shutdown_background();
        }
    }
}

impl ObjectLake {
    /// A lake under `prefix` (`/`-separated, may be empty) of `store`, staging files in
    /// `staging_dir`. `url` names it in logs and errors.
    pub fn new(
        store: Arc<dyn ObjectStore>,
        prefix: &str,
        url: impl Into<String>,
        staging_dir: impl Into<PathBuf>,
    ) -> Result<ObjectLake, LakeError> {
        let url = url.into();
        let prefix =
            ObjectPath::parse(prefix.trim_matches('/')).map_err(|e| LakeError::InvalidUrl {
                url: url.clone(),
                reason: e.to_string(),
            })?;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(LakeError::Runtime)?;
        Ok(ObjectLake {
            store,
            prefix,
            url,
            staging: staging_dir.into(),
            multipart_threshold: MULTIPART_THRESHOLD,
            part_bytes: PART_BYTES,
            driver: Arc::new(Driver(Some(rt))),
        })
    }

    /// A lake at `s3://bucket/prefix` on S3 or an S3-compatible server. Credentials, region and
    /// endpoint come from the standard AWS variables, read by `AmazonS3Builder::from_env`:
    /// `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`, `AWS_REGION` (or
    /// `AWS_DEFAULT_REGION`), `AWS_ENDPOINT_URL` (also `AWS_ENDPOINT`; `AWS_ENDPOINT_URL_S3`
    /// wins over both) and `AWS_ALLOW_HTTP=true` for a plain-HTTP server. Requests are
    /// path-style (`{endpoint}/{bucket}/…`, what MinIO and moto expect) unless
    /// `AWS_VIRTUAL_HOSTED_STYLE_REQUEST=true`.
    pub fn s3(url: &str, staging_dir: impl Into<PathBuf>) -> Result<ObjectLake, LakeError> {
        let invalid = |reason: String| LakeError::InvalidUrl {
            url: url.into(),
            reason,
        };
        let rest = url
            .strip_prefix("s3://")
            .or_else(|| url.strip_prefix("s3a://"))
            .ok_or_else(|| invalid("expected s3://bucket/prefix".into()))?;
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        if bucket.is_empty() {
            return Err(invalid("no bucket name".into()));
        }
        let store = AmazonS3Builder::from_env()
            .with_bucket_name(bucket)
            .build()
            .map_err(|e| invalid(e.to_string()))?;
        ObjectLake::new(Arc::new(store), prefix, url, staging_dir)
    }

    /// Uploads files of at least `bytes` in parts ([`MULTIPART_THRESHOLD`] by default).
    pub fn with_multipart_threshold(mut self, bytes: u64) -> ObjectLake {
        self.multipart_threshold = bytes;
        self
    }

    /// Sends multipart uploads in parts of `bytes` (16 MiB by default; S3 needs at least 5 MiB
    /// for every part but the last).
    pub fn with_part_bytes(mut self, bytes: usize) -> ObjectLake {
        self.part_bytes = bytes.max(1);
        self
    }

    /// The URL the lake was opened with.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The store.
    pub fn store(&self) -> &Arc<dyn ObjectStore> {
        &self.store
    }

    /// The prefix every table lives under.
    pub fn prefix(&self) -> &ObjectPath {
        &self.prefix
    }

    /// The local directory files are encoded in before their upload.
    pub fn staging_dir(&self) -> &Path {
        &self.staging
    }

    /// `{prefix}/{parts…}`.
    pub(crate) fn key<'a>(&self, parts: impl IntoIterator<Item = &'a str>) -> ObjectPath {
        parts
            .into_iter()
            .fold(self.prefix.clone(), |path, part| path.join(part))
    }

    /// The key of a staged file's committed object: its path relative to the staging dir
    /// (`{table}/date=…/part-….parquet`) under the prefix. `None` if outside the staging dir.
    pub(crate) fn key_of_staged(&self, final_path: &Path) -> Option<ObjectPath> {
        let rel = final_path.strip_prefix(&self.staging).ok()?;
        let parts = rel
            .components()
            .map(|c| c.as_os_str().to_str())
            .collect::<Option<Vec<_>>>()?;
        Some(self.key(parts))
    }

    /// `{prefix}/{table}/date=YYYY-MM-DD`.
    pub(crate) fn partition_key(&self, table: Table, date: NaiveDate) -> ObjectPath {
        let date = format!("date={}", date.format("%Y-%m-%d"));
        self.key([table.name(), date.as_str()])
    }

    /// Runs `f` to completion on the lake's runtime.
    fn block_on<T: Send>(&self, f: impl Future<Output = T> + Send) -> T {
        let Some(rt) = self.driver.0.as_ref() else {
            unreachable!("the runtime is only taken on drop")
        };
        if tokio::runtime::Handle::try_current().is_err() {
            return rt.block_on(f);
        }
        std::thread::scope(|s| match s.spawn(|| rt.block_on(f)).join() {
            Ok(v) => v,
            Err(panic) => std::panic::resume_unwind(panic),
        })
    }

    fn err(&self, key: &ObjectPath) -> impl FnOnce(object_store::Error) -> LakeError + '_ {
        let key = key.to_string();
        move |source| LakeError::Store {
            url: self.url.clone(),
            key,
            source,
        }
    }

    /// Every object under `prefix`, recursively.
    pub(crate) fn list(&self, prefix: &ObjectPath) -> Result<Vec<ObjectMeta>, LakeError> {
        self.block_on(self.store.list(Some(prefix)).try_collect::<Vec<_>>())
            .map_err(self.err(prefix))
    }

    /// The names of the "directories" right under `prefix`.
    fn list_dirs(&self, prefix: &ObjectPath) -> Result<Vec<String>, LakeError> {
        let listing = self
            .block_on(self.store.list_with_delimiter(Some(prefix)))
            .map_err(self.err(prefix))?;
        Ok(listing
            .common_prefixes
            .iter()
            .filter_map(|p| p.filename().map(str::to_owned))
            .collect())
    }

    /// Uploads the local file `path` to `key`: one PUT, or a multipart upload from
    /// [`ObjectLake::with_multipart_threshold`] on (aborted on failure). Either way the object appears whole or
    /// not at all. Returns its size.
    pub(crate) fn upload(&self, path: &Path, key: &ObjectPath) -> Result<u64, LakeError> {
        let io_err = |source: io::Error| LakeError::Io {
            path: path.to_path_buf(),
            source,
        };
        let mut file = File::open(path).map_err(io_err)?;
        let len = file.metadata().map_err(io_err)?.len();
        if len < self.multipart_threshold {
            let mut buf = Vec::with_capacity(len as usize);
            file.read_to_end(&mut buf).map_err(io_err)?;
            self.put(key, Bytes::from(buf))?;
            return Ok(len);
        }
        let store = &self.store;
        let result: Result<Result<(), LakeError>, object_store::Error> = self.block_on(async {
            let mut upload = store.put_multipart(key).await?;
            let part_bytes = self.part_bytes;
            let parts = async {
                // Parts are numbered in `put_part` order and may finish in any order.
                let mut in_flight = FuturesUnordered::new();
                loop {
                    let mut part = Vec::with_capacity(part_bytes);
                    (&mut file)
                        .take(part_bytes as u64)
                        .read_to_end(&mut part)
                        .map_err(io_err)?;
                    if part.is_empty() {
                        break;
                    }
                    in_flight.push(upload.put_part(PutPayload::from(part)));
                    if in_flight.len() >= PARTS_IN_FLIGHT
                        && let Some(r) = in_flight.next().await
                    {
                        r.map_err(self.err(key))?;
                    }
                }
                while let Some(r) = in_flight.next().await {
                    r.map_err(self.err(key))?;
                }
                Ok::<_, LakeError>(())
            }
            .await;
            match parts {
                Ok(()) => match upload.complete().await {
                    Ok(_) => Ok(Ok(())),
                    Err(e) => {
                        let _ = upload.abort().await;
                        Err(e)
                    }
                },
                Err(e) => {
                    let _ = upload.abort().await;
                    Ok(Err(e))
                }
            }
        });
        result.map_err(self.err(key))??;
        Ok(len)
    }

    /// Uploads a file staged at `staged` to the key of its final staging path `final_path`
    /// (see [`ObjectLake::key_of_staged`]).
    pub(crate) fn upload_staged(&self, staged: &Path, final_path: &Path) -> Result<u64, LakeError> {
        let key = self
            .key_of_staged(final_path)
            .ok_or(LakeError::InvalidConfig(
                "a staged file lies outside the staging directory",
            ))?;
        self.upload(staged, &key)
    }

    /// Writes `bytes` to `key` in one PUT.
    pub(crate) fn put(&self, key: &ObjectPath, bytes: Bytes) -> Result<(), LakeError> {
        self.block_on(self.store.put(key, PutPayload::from(bytes)))
            .map(drop)
            .map_err(self.err(key))
    }

    /// The object at `key`; `None` if there is none.
    pub(crate) fn get(&self, key: &ObjectPath) -> Result<Option<Bytes>, LakeError> {
        let result = self.block_on(async { self.store.get(key).await?.bytes().await });
        match result {
            Ok(b) => Ok(Some(b)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(self.err(key)(e)),
        }
    }

    /// Whether an object exists at `key`.
    pub(crate) fn exists(&self, key: &ObjectPath) -> Result<bool, LakeError> {
        match self.block_on(self.store.head(key)) {
            Ok(_) => Ok(true),
            Err(object_store::Error::NotFound { .. }) => Ok(false),
            Err(e) => Err(self.err(key)(e)),
        }
    }

    /// Deletes `key`; a missing object is not an error (S3's DELETE is idempotent too).
    pub(crate) fn delete(&self, key: &ObjectPath) -> Result<(), LakeError> {
        match self.block_on(self.store.delete(key)) {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(self.err(key)(e)),
        }
    }

    /// Server-side copy of `from` to `to` (atomic for readers of `to`, like a PUT).
    pub(crate) fn copy(&self, from: &ObjectPath, to: &ObjectPath) -> Result<(), LakeError> {
        self.block_on(self.store.copy(from, to))
            .map_err(self.err(to))
    }

    fn remove_files_where(&self, doomed: &dyn Fn(&str) -> bool) -> Result<usize, LakeError> {
        let mut removed = 0;
        for table in Table::ALL {
            for meta in self.list(&self.key([table.name()]))? {
                if is_partition_data_file(&meta.location, self, table)
                    && meta.location.filename().is_some_and(doomed)
                {
                    self.delete(&meta.location)?;
                    removed += 1;
                }
            }
        }
        Ok(removed)
    }

    fn partition_dates(&self, table: Table) -> Result<Vec<NaiveDate>, LakeError> {
        let mut dates: Vec<NaiveDate> = self
            .list_dirs(&self.key([table.name()]))?
            .iter()
            .filter_map(|n| parse_partition(n))
            .collect();
        dates.sort_unstable();
        Ok(dates)
    }

    /// Committed data files of a partition (`part-….parquet` right in it), sorted by name
    /// (= creation order), with sizes.
    pub(crate) fn committed_files(
        &self,
        table: Table,
        date: NaiveDate,
    ) -> Result<Vec<(String, u64)>, LakeError> {
        let dir = self.partition_key(table, date);
        let mut files: Vec<(String, u64)> = self
            .list(&dir)?
            .into_iter()
            .filter(|m| m.location.parts().count() == dir.parts().count() + 1)
            .filter_map(|m| {
                let name = m.location.filename()?;
                (name.starts_with("part-") && name.ends_with(".parquet"))
                    .then(|| (name.to_owned(), m.size))
            })
            .collect();
        files.sort();
        Ok(files)
    }
}

/// `date=YYYY-MM-DD` → the date.
fn parse_partition(name: &str) -> Option<NaiveDate> {
    name.strip_prefix("date=")
        .and_then(|d| NaiveDate::parse_from_str(d, "%Y-%m-%d").ok())
}

/// Whether `key` is `{prefix}/{table}/date=…/part-….parquet`.
fn is_partition_data_file(key: &ObjectPath, lake: &ObjectLake, table: Table) -> bool {
    let Some(rest) = key.prefix_match(&lake.key([table.name()])) else {
        return false;
    };
    let rest: Vec<_> = rest.collect();
    match rest.as_slice() {
        [partition, file] => {
            parse_partition(partition.as_ref()).is_some()
                && file.as_ref().starts_with("part-")
                && file.as_ref().ends_with(".parquet")
        }
        _ => false,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use object_store::aws::AmazonS3ConfigKey;
    use object_store::memory::InMemory;

    use super::*;

    #[test]
    fn aws_endpoint_url_is_read_as_the_endpoint() {
        // `from_env` lowercases each `AWS_*` variable's name and parses it as a config key.
        let key: AmazonS3ConfigKey = "aws_endpoint_url".parse().unwrap();
        assert_eq!(key, AmazonS3ConfigKey::Endpoint);
        let key: AmazonS3ConfigKey = "aws_allow_http".parse().unwrap();
        assert_eq!(
            key,
            AmazonS3ConfigKey::Client(object_store::ClientConfigKey::AllowHttp)
        );
        let key: AmazonS3ConfigKey = "aws_region".parse().unwrap();
        assert_eq!(key, AmazonS3ConfigKey::Region);
    }

    #[test]
    fn urls_name_a_directory_or_a_bucket_and_prefix() {
        assert_eq!(
            LakeLocation::parse("/srv/lake", "/tmp/s").unwrap(),
            LakeLocation::Dir("/srv/lake".into())
        );
        assert_eq!(
            LakeLocation::parse("file:///srv/lake", "/tmp/s").unwrap(),
            LakeLocation::Dir("/srv/lake".into())
        );
        assert!(matches!(
            LakeLocation::parse("gs://b/p", "/tmp/s"),
            Err(LakeError::InvalidUrl { .. })
        ));
        assert!(matches!(
            LakeLocation::parse("s3:///p", "/tmp/s"),
            Err(LakeError::InvalidUrl { .. })
        ));
    }

    #[test]
    fn staged_files_map_to_keys_under_the_prefix() {
        let lake = ObjectLake::new(Arc::new(InMemory::new()), "/a/b/", "mem", "/stage").unwrap();
        let key = lake
            .key_of_staged(Path::new("/stage/samples/date=2024-03-10/part-1.parquet"))
            .unwrap();
        assert_eq!(key.as_ref(), "a/b/samples/date=2024-03-10/part-1.parquet");
        assert!(lake.key_of_staged(Path::new("/elsewhere/x")).is_none());
    }

    #[test]
    fn lake_can_be_used_from_inside_a_runtime() {
        let lake = ObjectLake::new(Arc::new(InMemory::new()), "p", "mem", "/stage").unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        rt.block_on(async {
            lake.put(&lake.key(["x"]), Bytes::from_static(b"1"))
                .unwrap();
            assert!(lake.exists(&lake.key(["x"])).unwrap());
        });
        drop(rt);
        drop(lake);
    }
}
