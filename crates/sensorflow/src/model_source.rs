//! Where a model comes from: `--model` / `model.path` / `POST /model` take a file path, an
//! HTTP(S) URL or `s3://bucket/key` (DESIGN "Model contract"); the sidecar is the same location
//! with the extension `.json`.
//!
//! Remote models are fetched through `object_store` (its HTTP store for URLs, its S3 store,
//! configured by the standard AWS variables, for `s3://`), with a timeout and a size limit, and
//! kept in a cache under `{data_dir}/models/`, so that a restart without network still starts
//! with the model it ran. A cache entry is one file holding the location, the ONNX bytes and the
//! sidecar, written atomically (temp file, fsync, rename): the two halves of a model can never
//! come from different versions. Entries are named by location and content, so the exact model
//! a checkpoint ran can be found again even after the location's content changed.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use object_store::{ClientOptions, GetOptions, ObjectStore};
use sha2::{Digest, Sha256};

/// Cache entries kept per location (the newest by modification time); older ones are removed.
const CACHE_KEEP_PER_LOCATION: usize = 3;
const CACHE_MAGIC: &[u8; 8] = b"SFMODEL1";

#[derive(Debug, thiserror::Error)]
pub(crate) enum SourceError {
    #[error("model location {0:?}: {1}")]
    BadLocation(String, &'static str),
    #[error("fetching {location}: {source}")]
    Fetch {
        location: String,
        #[source]
        source: object_store::Error,
    },
    #[error("{location} is larger than model.max_bytes ({limit} bytes)")]
    TooLarge { location: String, limit: u64 },
    #[error("reading {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// A parsed model location.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Location {
    File(PathBuf),
    /// An `http://` or `https://` URL: the store's base (scheme and authority) and the path.
    Http {
        base: String,
        path: String,
    },
    S3 {
        bucket: String,
        key: String,
    },
}

impl Location {
    pub(crate) fn parse(s: &str) -> Result<Location, SourceError> {
        let bad = |why| SourceError::BadLocation(s.to_owned(), why);
        if let Some(rest) = s.strip_prefix("s3://") {
            let (bucket, key) = rest.split_once('/').ok_or_else(|| bad("no object key"))?;
            if bucket.is_empty() || key.is_empty() {
                return Err(bad("expected s3://bucket/key"));
            }
            return Ok(Location::S3 {
                bucket: bucket.to_owned(),
                key: key.to_owned(),
            });
        }
        if s.starts_with("http://") || s.starts_with("https://") {
            let url = url::Url::parse(s).map_err(|_| bad("not a valid URL"))?;
            if url.query().is_some() || url.fragment().is_some() {
                return Err(bad(
                    "query strings are not supported (the sidecar is the same URL with .json)",
                ));
            }
            let host = url.host_str().ok_or_else(|| bad("no host"))?;
            let base = match url.port() {
                Some(port) => format!("{}://{host}:{port}", url.scheme()),
                None => format!("{}://{host}", url.scheme()),
            };
            let path = url.path().trim_start_matches('/').to_owned();
            if path.is_empty() {
                return Err(bad("no file in the URL"));
            }
            return Ok(Location::Http { base, path });
        }
        if s.contains("://") {
            return Err(bad("only file paths, http(s):// and s3:// are supported"));
        }
        Ok(Location::File(PathBuf::from(s)))
    }

    pub(crate) fn is_remote(&self) -> bool {
        !matches!(self, Location::File(_))
    }
}

/// Fetch settings (`model.fetch_timeout_secs`, `model.max_bytes`).
#[derive(Clone, Copy, Debug)]
pub(crate) struct FetchLimits {
    pub(crate) timeout: Duration,
    pub(crate) max_bytes: u64,
}

/// A model's two files, as fetched.
#[derive(Clone, Debug)]
pub(crate) struct ModelBytes {
    pub(crate) location: String,
    pub(crate) onnx: Arc<[u8]>,
    pub(crate) sidecar: Arc<[u8]>,
    /// Hex SHA-256 of the ONNX bytes followed by the sidecar's: names this exact pair.
    pub(crate) sha256: String,
    /// True when the network failed and the cached copy is used.
    pub(crate) from_cache: bool,
}

/// The sidecar's path: the model's with the extension `.json` (`dir/m.onnx` → `dir/m.json`).
fn sidecar_path(path: &str) -> String {
    let (dir, file) = path.rsplit_once('/').map_or(("", path), |(d, f)| (d, f));
    let stem = file.rsplit_once('.').map_or(file, |(stem, _)| stem);
    if dir.is_empty() {
        format!("{stem}.json")
    } else {
        format!("{dir}/{stem}.json")
    }
}

/// The model cache under the data dir.
#[derive(Clone, Debug)]
pub(crate) struct ModelCache {
    dir: PathBuf,
}

impl ModelCache {
    pub(crate) fn new(data_dir: &Path) -> ModelCache {
        ModelCache {
            dir: data_dir.join("models"),
        }
    }

    fn location_key(location: &str) -> String {
        hex(&Sha256::digest(location.as_bytes())[..8])
    }

    fn entry_path(&self, location: &str, sha256: &str) -> PathBuf {
        let short = sha256.get(..16).unwrap_or(sha256);
        self.dir
            .join(format!("{}-{short}.model", Self::location_key(location)))
    }

    /// Stores `m` atomically and prunes the location's older entries.
    pub(crate) fn store(&self, m: &ModelBytes) -> Result<(), SourceError> {
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| SourceError::Io { path, source }
        };
        std::fs::create_dir_all(&self.dir).map_err(io(&self.dir))?;
        let path = self.entry_path(&m.location, &m.sha256);
        let tmp = path.with_extension("tmp");
        {
            let mut f = std::fs::File::create(&tmp).map_err(io(&tmp))?;
            let mut write = |b: &[u8]| f.write_all(b);
            let result = (|| {
                write(CACHE_MAGIC)?;
                for part in [m.location.as_bytes(), &m.onnx[..]] {
                    write(&(part.len() as u64).to_le_bytes())?;
                    write(part)?;
                }
                write(&m.sidecar)
            })();
            result.map_err(io(&tmp))?;
            f.sync_all().map_err(io(&tmp))?;
        }
        std::fs::rename(&tmp, &path).map_err(io(&path))?;
        if let Ok(dir) = std::fs::File::open(&self.dir) {
            let _ = dir.sync_all();
        }
        self.prune(&m.location);
        Ok(())
    }

    /// The cached entry of `location` whose [`ModelBytes::sha256`] is `sha256`, or with `None` the newest
    /// one of `location`.
    pub(crate) fn load(&self, location: &str, sha256: Option<&str>) -> Option<ModelBytes> {
        let path = match sha256 {
            Some(sha) => self.entry_path(location, sha),
            None => self.entries(location).into_iter().next()?.1,
        };
        let bytes = std::fs::read(&path).ok()?;
        let m = decode_entry(&bytes)?;
        (m.location == location).then_some(m)
    }

    /// `location`'s entries, newest first.
    fn entries(&self, location: &str) -> Vec<(std::time::SystemTime, PathBuf)> {
        let prefix = format!("{}-", Self::location_key(location));
        let Ok(dir) = std::fs::read_dir(&self.dir) else {
            return Vec::new();
        };
        let mut entries: Vec<_> = dir
            .filter_map(Result::ok)
            .filter(|e| {
                let name = e.file_name();
                let name = name.to_string_lossy();
                name.starts_with(&prefix) && name.ends_with(".model")
            })
            .filter_map(|e| Some((e.metadata().ok()?.modified().ok()?, e.path())))
            .collect();
        entries.sort_by_key(|e| std::cmp::Reverse(e.0));
        entries
    }

    fn prune(&self, location: &str) {
        for (_, path) in self
            .entries(location)
            .into_iter()
            .skip(CACHE_KEEP_PER_LOCATION)
        {
            let _ = std::fs::remove_file(path);
        }
    }
}

fn decode_entry(bytes: &[u8]) -> Option<ModelBytes> {
    let rest = bytes.strip_prefix(CACHE_MAGIC)?;
    let take = |rest: &[u8]| -> Option<(Vec<u8>, usize)> {
        let len = usize::try_from(u64::from_le_bytes(rest.get(..8)?.try_into().ok()?)).ok()?;
        Some((rest.get(8..8usize.checked_add(len)?)?.to_vec(), 8 + len))
    };
    let (location, used) = take(rest)?;
    let rest = &rest[used..];
    let (onnx, used) = take(rest)?;
    let sidecar = rest[used..].to_vec();
    Some(ModelBytes {
        location: String::from_utf8(location).ok()?,
        sha256: content_sha256(&onnx, &sidecar),
        onnx: onnx.into(),
        sidecar: sidecar.into(),
        from_cache: true,
    })
}

/// See [`ModelBytes::sha256`].
pub(crate) fn content_sha256(onnx: &[u8], sidecar: &[u8]) -> String {
    let mut h = Sha256::new();
    h.update(onnx);
    h.update(sidecar);
    hex(&h.finalize())
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Reads the model at `location` and its sidecar. A remote location is fetched; when that
/// fails and the cache has a copy, the copy is used (with a warning) so a restart without
/// network still starts. The caller stores what it validated with [`ModelCache::store`].
pub(crate) async fn fetch(
    location: &str,
    limits: FetchLimits,
    cache: &ModelCache,
) -> Result<ModelBytes, SourceError> {
    let parsed = Location::parse(location)?;
    match fetch_fresh(location, &parsed, limits).await {
        Ok(m) => Ok(m),
        Err(e) if parsed.is_remote() => match cache.load(location, None) {
            Some(cached) => {
                tracing::warn!(location, error = %e, "fetching the model failed; using the cached copy");
                Ok(cached)
            }
            None => Err(e),
        },
        Err(e) => Err(e),
    }
}

async fn fetch_fresh(
    location: &str,
    parsed: &Location,
    limits: FetchLimits,
) -> Result<ModelBytes, SourceError> {
    let (onnx, sidecar) = match parsed {
        Location::File(path) => {
            let read = |p: PathBuf| async move {
                let len = tokio::fs::metadata(&p)
                    .await
                    .map_err(|source| SourceError::Io {
                        path: p.clone(),
                        source,
                    })?
                    .len();
                if len > limits.max_bytes {
                    return Err(SourceError::TooLarge {
                        location: p.display().to_string(),
                        limit: limits.max_bytes,
                    });
                }
                tokio::fs::read(&p)
                    .await
                    .map_err(|source| SourceError::Io { path: p, source })
            };
            let sidecar = path.with_extension("json");
            (read(path.clone()).await?, read(sidecar).await?)
        }
        Location::Http { base, path } => {
            let options = ClientOptions::new()
                .with_timeout(limits.timeout)
                .with_allow_http(true);
            let store = object_store::http::HttpBuilder::new()
                .with_url(base.as_str())
                .with_client_options(options)
                .build()
                .map_err(|source| SourceError::Fetch {
                    location: location.to_owned(),
                    source,
                })?;
            get_pair(&store, location, path, limits).await?
        }
        Location::S3 { bucket, key } => {
            // Client options set here replace those `from_env` read, AWS_ALLOW_HTTP included.
            let mut options = ClientOptions::new().with_timeout(limits.timeout);
            if std::env::var("AWS_ALLOW_HTTP").is_ok_and(|v| v.eq_ignore_ascii_case("true")) {
                options = options.with_allow_http(true);
            }
            // `from_env` reads AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_REGION and
            // AWS_ENDPOINT_URL (path-style requests, as S3-compatible servers expect).
            let store = object_store::aws::AmazonS3Builder::from_env()
                .with_bucket_name(bucket)
                .with_client_options(options)
                .build()
                .map_err(|source| SourceError::Fetch {
                    location: location.to_owned(),
                    source,
                })?;
            get_pair(&store, location, key, limits).await?
        }
    };
    Ok(ModelBytes {
        location: location.to_owned(),
        sha256: content_sha256(&onnx, &sidecar),
        onnx: onnx.into(),
        sidecar: sidecar.into(),
        from_cache: false,
    })
}

/// GETs the model and its sidecar from `store`.
async fn get_pair(
    store: &dyn ObjectStore,
    location: &str,
    path: &str,
    limits: FetchLimits,
) -> Result<(Vec<u8>, Vec<u8>), SourceError> {
    let onnx = get_limited(store, location, path, limits).await?;
    let sidecar = get_limited(store, location, &sidecar_path(path), limits).await?;
    Ok((onnx, sidecar))
}

/// One object, read as a stream and abandoned as soon as it exceeds `limits.max_bytes`
/// (whatever its declared length), within `limits.timeout` overall.
async fn get_limited(
    store: &dyn ObjectStore,
    location: &str,
    path: &str,
    limits: FetchLimits,
) -> Result<Vec<u8>, SourceError> {
    let fetch_err = |source| SourceError::Fetch {
        location: location.to_owned(),
        source,
    };
    let too_large = || SourceError::TooLarge {
        location: location.to_owned(),
        limit: limits.max_bytes,
    };
    let read = async {
        let result = store
            // `get_opts`, not `ObjectStoreExt::get`: the trait's boxed future is `Send`.
            .get_opts(&object_store::path::Path::from(path), GetOptions::default())
            .await
            .map_err(fetch_err)?;
        if result.meta.size > limits.max_bytes {
            return Err(too_large());
        }
        let mut body = Vec::with_capacity(usize::try_from(result.meta.size).unwrap_or(0));
        let mut stream = result.into_stream();
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(fetch_err)?;
            if (body.len() + chunk.len()) as u64 > limits.max_bytes {
                return Err(too_large());
            }
            body.extend_from_slice(&chunk);
        }
        Ok(body)
    };
    match tokio::time::timeout(limits.timeout, read).await {
        Ok(result) => result,
        Err(_) => Err(SourceError::Fetch {
            location: location.to_owned(),
            source: object_store::Error::Generic {
                store: "model",
                source: format!("timed out after {:?}", limits.timeout).into(),
            },
        }),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests unwrap freely
mod tests {
    use super::*;

    #[test]
    fn locations_parse_into_file_http_and_s3() {
        assert_eq!(
            Location::parse("models/m.onnx").unwrap(),
            Location::File("models/m.onnx".into())
        );
        assert_eq!(
            Location::parse("http://127.0.0.1:8080/a/m.onnx").unwrap(),
            Location::Http {
                base: "http://127.0.0.1:8080".into(),
                path: "a/m.onnx".into()
            }
        );
        assert_eq!(
            Location::parse("s3://bucket/dir/m.onnx").unwrap(),
            Location::S3 {
                bucket: "bucket".into(),
                key: "dir/m.onnx".into()
            }
        );
        for bad in [
            "s3://bucket",
            "s3:///key",
            "ftp://host/m.onnx",
            "https://host/",
            "https://host/m.onnx?sig=1",
        ] {
            assert!(
                matches!(Location::parse(bad), Err(SourceError::BadLocation(..))),
                "{bad}"
            );
        }
    }

    #[test]
    fn the_sidecar_sits_beside_the_model() {
        assert_eq!(sidecar_path("a/b/m.onnx"), "a/b/m.json");
        assert_eq!(sidecar_path("m.onnx"), "m.json");
        assert_eq!(sidecar_path("a.v2/m"), "a.v2/m.json");
    }

    #[test]
    fn the_cache_keeps_both_halves_together_and_finds_them_by_content() {
        let dir = tempfile::tempdir().unwrap();
        let cache = ModelCache::new(dir.path());
        let entry = |onnx: &[u8], sidecar: &[u8]| ModelBytes {
            location: "s3://b/m.onnx".into(),
            sha256: content_sha256(onnx, sidecar),
            onnx: onnx.into(),
            sidecar: sidecar.into(),
            from_cache: false,
        };
        let v1 = entry(b"onnx-1", b"{\"v\":1}");
        let v2 = entry(b"onnx-2", b"{\"v\":2}");
        cache.store(&v1).unwrap();
        cache.store(&v2).unwrap();
        let got = cache.load("s3://b/m.onnx", Some(&v1.sha256)).unwrap();
        assert_eq!(
            (&got.onnx[..], &got.sidecar[..]),
            (&b"onnx-1"[..], &b"{\"v\":1}"[..])
        );
        assert!(got.from_cache);
        assert!(cache.load("s3://b/other.onnx", None).is_none());
        // A torn entry is not a model.
        let path = cache.entry_path("s3://b/m.onnx", &v1.sha256);
        let bytes = std::fs::read(&path).unwrap();
        std::fs::write(&path, &bytes[..20]).unwrap();
        assert!(cache.load("s3://b/m.onnx", Some(&v1.sha256)).is_none());
    }
}
