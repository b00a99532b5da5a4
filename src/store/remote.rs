//! Stores on S3-compatible object storage (`s3://bucket/prefix`), through `object_store`.
//!
//! A store on object storage has the same keys as a local store has files (`manifest.json`,
//! `labels/*.parquet`, `samples/*.parquet`, `shards/*.json`). Commands work on a local copy:
//! - Readers ([`Remote::pull`]) download the manifest, then every part it lists into a cache
//!   folder, streaming each object to a temporary file, checking its size and sha256 against
//!   the manifest, then renaming it into place; parts already cached with the right checksum
//!   are not fetched again (parts are immutable: a new part gets a new name).
//! - A labelling run writes into a local staging folder with the ordinary writer; after every
//!   local commit, [`RemoteSink`] uploads the new parts whole (multipart above 16 MiB) and only
//!   then the manifest that lists them, so the remote manifest never lists a part that is not
//!   there. The local copy of an uploaded part is deleted (bounded disk). On a rerun the remote
//!   manifest is the truth: objects of this writer not listed in it (a part uploaded by a
//!   killed run before its manifest) are deleted, and labelling resumes after its cursor.
//! - Sharded stores keep their protocol (see [`super::shards`]): each shard puts only its own
//!   keys, and the commit step puts `manifest.json` with `If-None-Match: *`, so of two shards
//!   finishing together one creates it and the other finds the same content there.
//! - `calibrate` replaces `manifest.json` with `If-Match` on the ETag it read: a concurrent
//!   change makes it fail instead of being lost.
//!
//! Credentials, region and endpoint come from the standard AWS environment variables
//! (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`, `AWS_REGION`,
//! `AWS_ENDPOINT_URL` for S3-compatible servers; plain `http://` endpoints are allowed), then
//! from the profile `AWS_PROFILE` names in `~/.aws/credentials` and `~/.aws/config`
//! ([`profile`]).
//! - `distill` and `export` read a remote store part by part instead ([`Remote::stream`],
//!   [`super::stream`]): read-ahead, bounded local disk.
//! - `firstkd copy` ([`copy_store`]) moves a complete store between a folder and a bucket.

use std::collections::{HashMap, HashSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use futures::StreamExt;
use object_store::path::Path as ObjPath;
use object_store::{ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload, UpdateVersion};

use super::manifest::{Manifest, MANIFEST_FILE};
use super::shards::{self, Slot, SHARDS_DIR};
use super::stream::{RemoteParts, StreamOptions};
use super::writer::files::process_is_dead;
use crate::error::{Error, Result};
use crate::schema::Table;

pub mod profile;
mod transfer;
pub use transfer::{copy_store, CopyReport};

/// Parts at least this large are uploaded in several requests.
const MULTIPART_BYTES: u64 = 16 << 20;
const CHUNK_BYTES: usize = 8 << 20;

/// What a store argument names: a local folder, or a store on object storage.
pub enum Location {
    Local(PathBuf),
    Remote(Remote),
}

impl Location {
    /// Parses a store argument: `s3://bucket/prefix`, `file:///path`, or a local path.
    pub fn parse(arg: &Path) -> Result<Location> {
        let Some(text) = arg.to_str() else {
            return Ok(Location::Local(arg.to_path_buf()));
        };
        if let Some(path) = text.strip_prefix("file://") {
            return Ok(Location::Local(PathBuf::from(path)));
        }
        if text.starts_with("s3://") {
            return Remote::open(text).map(Location::Remote);
        }
        if let Some((scheme, _)) = text.split_once("://") {
            return Err(Error::InvalidArgument(format!(
                "{text}: unsupported store URL scheme {scheme:?} (expected s3:// or file://, or a local path)"
            )));
        }
        Ok(Location::Local(arg.to_path_buf()))
    }
}

/// A store on object storage, with the local folder commands work in.
pub struct Remote {
    url: String,
    store: Arc<dyn ObjectStore>,
    prefix: ObjPath,
    cache: PathBuf,
    rt: tokio::runtime::Runtime,
}

/// Root of the local copies of remote stores (`FIRSTKD_CACHE_DIR`, else
/// `~/.cache/firstkd/object-store`).
fn cache_root() -> PathBuf {
    if let Some(dir) = std::env::var_os("FIRSTKD_CACHE_DIR") {
        return PathBuf::from(dir).join("object-store");
    }
    let home = std::env::var_os("HOME").map_or_else(std::env::temp_dir, PathBuf::from);
    home.join(".cache").join("firstkd").join("object-store")
}

impl Remote {
    /// Connects to `s3://bucket/prefix` (nothing is read yet).
    pub fn open(url: &str) -> Result<Remote> {
        let err = |error: String| Error::ObjectStore {
            url: url.to_string(),
            error,
        };
        let rest = url
            .strip_prefix("s3://")
            .ok_or_else(|| err("expected s3://bucket/prefix".into()))?;
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        if bucket.is_empty() {
            return Err(err("no bucket name".into()));
        }
        let mut builder = object_store::aws::AmazonS3Builder::from_env().with_bucket_name(bucket);
        // The shared configuration files fill in what the environment leaves out.
        let profile = profile::from_environment().map_err(|e| err(e.to_string()))?;
        let env_set = |var: &str| std::env::var_os(var).is_some_and(|v| !v.is_empty());
        if !env_set("AWS_ACCESS_KEY_ID") {
            if let (Some(id), Some(secret)) = (&profile.access_key_id, &profile.secret_access_key) {
                builder = builder
                    .with_access_key_id(id)
                    .with_secret_access_key(secret);
                if let Some(token) = &profile.session_token {
                    builder = builder.with_token(token);
                }
            }
        }
        let env_region = env_set("AWS_REGION") || env_set("AWS_DEFAULT_REGION");
        if let (false, Some(region)) = (env_region, &profile.region) {
            builder = builder.with_region(region);
        }
        let endpoint = std::env::var("AWS_ENDPOINT_URL")
            .or_else(|_| std::env::var("AWS_ENDPOINT"))
            .ok()
            .filter(|e| !e.is_empty())
            .or_else(|| profile.endpoint_url.clone());
        if let Some(endpoint) = &endpoint {
            builder = builder.with_endpoint(endpoint);
            if endpoint.starts_with("http://") {
                builder = builder.with_allow_http(true);
            }
        }
        if !env_region && profile.region.is_none() {
            builder = builder.with_region("us-east-1");
        }
        let store = builder.build().map_err(|e| err(e.to_string()))?;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| err(format!("starting the I/O runtime: {e}")))?;
        let prefix = ObjPath::from(prefix.trim_matches('/'));
        let cache = {
            use sha2::Digest;
            let key = hex::encode(sha2::Sha256::digest(url.trim_end_matches('/').as_bytes()));
            cache_root().join(&key[..16])
        };
        Ok(Remote {
            url: url.trim_end_matches('/').to_string(),
            store: Arc::new(store),
            prefix,
            cache,
            rt,
        })
    }

    /// The store's URL.
    pub fn url(&self) -> &str {
        &self.url
    }

    fn err(&self, rel: &str, e: impl std::fmt::Display) -> Error {
        Error::ObjectStore {
            url: format!("{}/{rel}", self.url),
            error: e.to_string(),
        }
    }

    fn key(&self, rel: &str) -> ObjPath {
        let mut key = self.prefix.clone();
        for part in rel.split('/').filter(|p| !p.is_empty()) {
            key = key.join(part);
        }
        key
    }

    /// The key's path relative to the store prefix.
    fn rel_of(&self, key: &ObjPath) -> Option<String> {
        let parts: Vec<String> = key
            .prefix_match(&self.prefix)?
            .map(|p| p.as_ref().to_string())
            .collect();
        Some(parts.join("/"))
    }

    /// Every object under `rel_dir`, as (relative path, last modified, size).
    fn list(&self, rel_dir: &str) -> Result<Vec<(String, SystemTime, u64)>> {
        let prefix = self.key(rel_dir);
        self.rt.block_on(async {
            let mut out = Vec::new();
            let mut stream = self.store.list(Some(&prefix));
            while let Some(meta) = stream.next().await {
                let meta = meta.map_err(|e| self.err(rel_dir, e))?;
                if let Some(rel) = self.rel_of(&meta.location) {
                    out.push((rel, SystemTime::from(meta.last_modified), meta.size));
                }
            }
            Ok(out)
        })
    }

    /// The object at `rel` and its ETag; `None` when absent.
    fn get_bytes(&self, rel: &str) -> Result<Option<(bytes::Bytes, Option<String>)>> {
        Ok(self.get_with_time(rel)?.map(|(b, e, _)| (b, e)))
    }

    /// The object at `rel`, its ETag and when it was last replaced; `None` when absent.
    fn get_with_time(
        &self,
        rel: &str,
    ) -> Result<Option<(bytes::Bytes, Option<String>, SystemTime)>> {
        let key = self.key(rel);
        self.rt.block_on(async {
            match self.store.get(&key).await {
                Ok(r) => {
                    let etag = r.meta.e_tag.clone();
                    let time = SystemTime::from(r.meta.last_modified);
                    let bytes = r.bytes().await.map_err(|e| self.err(rel, e))?;
                    Ok(Some((bytes, etag, time)))
                }
                Err(object_store::Error::NotFound { .. }) => Ok(None),
                Err(e) => Err(self.err(rel, e)),
            }
        })
    }

    /// Streams the object at `rel` into `dest` (through a temporary file and a rename).
    fn download(&self, rel: &str, dest: &Path) -> Result<()> {
        let key = self.key(rel);
        let folder = dest.parent().unwrap_or(&self.cache).to_path_buf();
        std::fs::create_dir_all(&folder).map_err(|e| Error::io(&folder, e))?;
        let tmp = folder.join(format!(
            ".{}.{}.download",
            dest.file_name()
                .map_or_else(String::new, |n| n.to_string_lossy().into_owned()),
            std::process::id()
        ));
        let mut file = std::fs::File::create(&tmp).map_err(|e| Error::io(&tmp, e))?;
        self.rt.block_on(async {
            let r = self.store.get(&key).await.map_err(|e| self.err(rel, e))?;
            let mut stream = r.into_stream();
            while let Some(chunk) = stream.next().await {
                let chunk = chunk.map_err(|e| self.err(rel, e))?;
                file.write_all(&chunk).map_err(|e| Error::io(&tmp, e))?;
            }
            Ok::<(), Error>(())
        })?;
        file.sync_all().map_err(|e| Error::io(&tmp, e))?;
        drop(file);
        std::fs::rename(&tmp, dest).map_err(|e| Error::io(dest, e))
    }

    /// Uploads the local file `src` to `rel`, whole (several requests above 16 MiB).
    fn upload(&self, rel: &str, src: &Path) -> Result<()> {
        let key = self.key(rel);
        let size = std::fs::metadata(src).map_err(|e| Error::io(src, e))?.len();
        if size < MULTIPART_BYTES {
            let bytes = std::fs::read(src).map_err(|e| Error::io(src, e))?;
            return self.rt.block_on(async {
                self.store
                    .put(&key, PutPayload::from(bytes))
                    .await
                    .map(|_| ())
                    .map_err(|e| self.err(rel, e))
            });
        }
        self.rt.block_on(async {
            let upload = self
                .store
                .put_multipart(&key)
                .await
                .map_err(|e| self.err(rel, e))?;
            let mut writer = object_store::WriteMultipart::new_with_chunk_size(upload, CHUNK_BYTES);
            let mut file = std::fs::File::open(src).map_err(|e| Error::io(src, e))?;
            let mut buf = vec![0u8; CHUNK_BYTES];
            loop {
                let n = std::io::Read::read(&mut file, &mut buf).map_err(|e| Error::io(src, e))?;
                if n == 0 {
                    break;
                }
                writer
                    .wait_for_capacity(4)
                    .await
                    .map_err(|e| self.err(rel, e))?;
                writer.write(&buf[..n]);
            }
            writer
                .finish()
                .await
                .map(|_| ())
                .map_err(|e| self.err(rel, e))
        })
    }

    fn put_mode(&self, rel: &str, bytes: Vec<u8>, mode: PutMode) -> Result<bool> {
        let key = self.key(rel);
        self.rt.block_on(async {
            let opts = PutOptions {
                mode,
                ..PutOptions::default()
            };
            match self
                .store
                .put_opts(&key, PutPayload::from(bytes), opts)
                .await
            {
                Ok(_) => Ok(true),
                Err(object_store::Error::AlreadyExists { .. }) => Ok(false),
                Err(object_store::Error::Precondition { .. }) => Err(Error::ConcurrentUpdate {
                    url: format!("{}/{rel}", self.url),
                }),
                Err(e) => Err(self.err(rel, e)),
            }
        })
    }

    fn delete(&self, rel: &str) -> Result<()> {
        let key = self.key(rel);
        self.rt.block_on(async {
            match self.store.delete(&key).await {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
                Err(e) => Err(self.err(rel, e)),
            }
        })
    }

    /// Local copy of the store for reading: the manifest and every part it lists, checked
    /// against the manifest's sizes and sha256. Returns the folder and the manifest's ETag.
    pub fn pull(&self) -> Result<(PathBuf, Option<String>)> {
        let dir = self.cache.join("read");
        std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
        let Some((bytes, etag)) = self.get_bytes(MANIFEST_FILE)? else {
            return Err(self.missing_manifest()?);
        };
        write_atomic(&dir, MANIFEST_FILE, &bytes)?;
        let manifest = Manifest::load(&dir)?;
        let mut listed = HashSet::new();
        for part in &manifest.parts {
            for table in Table::ALL {
                let entry = part.file(table);
                check_inside(&self.url, entry)?;
                listed.insert(entry.file.clone());
                let dest = dir.join(&entry.file);
                let cached = std::fs::metadata(&dest).is_ok_and(|m| m.len() == entry.bytes)
                    && super::sha256_file(&dest).is_ok_and(|s| s == entry.sha256);
                if cached {
                    continue;
                }
                self.download(&entry.file, &dest)?;
                let sum = super::sha256_file(&dest)?;
                if sum != entry.sha256 {
                    return Err(Error::Corrupt {
                        path: PathBuf::from(format!("{}/{}", self.url, entry.file)),
                        row: None,
                        reason: format!("sha256 is {sum}, manifest says {}", entry.sha256),
                    });
                }
            }
        }
        // Files of an older version of the store are not this store's.
        for table in Table::ALL {
            let sub = dir.join(table.name());
            std::fs::create_dir_all(&sub).map_err(|e| Error::io(&sub, e))?;
            for entry in std::fs::read_dir(&sub).map_err(|e| Error::io(&sub, e))? {
                let entry = entry.map_err(|e| Error::io(&sub, e))?;
                let name = format!("{}/{}", table.name(), entry.file_name().to_string_lossy());
                if !listed.contains(&name) {
                    let path = entry.path();
                    std::fs::remove_file(&path).map_err(|e| Error::io(&path, e))?;
                }
            }
        }
        Ok((dir, etag))
    }

    /// The store for a sequential reader: its manifest in a folder of this process, and the
    /// [`RemoteParts`] that fetch its parts into that folder as they are read, `read_ahead`
    /// parts ahead, keeping at most `disk_limit` bytes of them (see [`super::stream`]).
    /// Folders left by killed readers are removed first.
    pub fn stream(&self, opts: StreamOptions) -> Result<(PathBuf, Arc<RemoteParts>)> {
        std::fs::create_dir_all(&self.cache).map_err(|e| Error::io(&self.cache, e))?;
        for entry in std::fs::read_dir(&self.cache).map_err(|e| Error::io(&self.cache, e))? {
            let entry = entry.map_err(|e| Error::io(&self.cache, e))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.strip_prefix("stream-").is_some_and(process_is_dead) {
                let path = entry.path();
                std::fs::remove_dir_all(&path).map_err(|e| Error::io(&path, e))?;
            }
        }
        let dir = self.cache.join(format!("stream-{}", std::process::id()));
        if dir.exists() {
            std::fs::remove_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
        }
        std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
        let Some((bytes, _)) = self.get_bytes(MANIFEST_FILE)? else {
            let _ = std::fs::remove_dir_all(&dir);
            return Err(self.missing_manifest()?);
        };
        write_atomic(&dir, MANIFEST_FILE, &bytes)?;
        let manifest = Manifest::load(&dir)?;
        let parts = manifest
            .parts
            .iter()
            .map(|p| [p.labels.clone(), p.samples.clone()])
            .collect();
        let source = RemoteParts::start(
            &self.url,
            Arc::clone(&self.store),
            self.prefix.clone(),
            &dir,
            parts,
            opts,
        )?;
        Ok((dir, source))
    }

    /// Why a store has no manifest: never written, or a sharded store not yet committed.
    fn missing_manifest(&self) -> Result<Error> {
        let shards = self.list(SHARDS_DIR)?;
        Ok(Error::NotAStore {
            path: PathBuf::from(&self.url),
            reason: if shards.is_empty() {
                format!("no {MANIFEST_FILE}")
            } else {
                format!(
                    "no {MANIFEST_FILE}: a sharded store whose shards are not all complete yet (`firstkd status {}`)",
                    self.url
                )
            },
        })
    }

    /// Replaces the remote manifest with the local `dir/manifest.json`, only if the remote one
    /// still has `etag` (the one [`Remote::pull`] read).
    pub fn push_manifest(&self, dir: &Path, etag: Option<String>) -> Result<()> {
        let path = Manifest::path(dir);
        let bytes = std::fs::read(&path).map_err(|e| Error::io(&path, e))?;
        let mode = match etag {
            Some(e_tag) => PutMode::Update(UpdateVersion {
                e_tag: Some(e_tag),
                version: None,
            }),
            None => PutMode::Overwrite,
        };
        self.put_mode(MANIFEST_FILE, bytes, mode).map(|_| ())
    }

    /// The store's manifests (`manifest.json`, `shards/*.json`) copied into `dir`, replacing
    /// the local ones; returns when each was last replaced.
    pub fn pull_manifests(&self, dir: &Path) -> Result<HashMap<String, SystemTime>> {
        let sub = dir.join(SHARDS_DIR);
        std::fs::create_dir_all(&sub).map_err(|e| Error::io(&sub, e))?;
        let mut modified = HashMap::new();
        let mut remote_shards = HashSet::new();
        for (rel, time, _) in self.list(SHARDS_DIR)? {
            let name = rel.rsplit('/').next().unwrap_or_default().to_string();
            if Slot::from_file_name(&name).is_none() {
                continue;
            }
            if let Some((bytes, _)) = self.get_bytes(&rel)? {
                write_atomic(&sub, &name, &bytes)?;
                remote_shards.insert(name);
                modified.insert(rel, time);
            }
        }
        for entry in std::fs::read_dir(&sub).map_err(|e| Error::io(&sub, e))? {
            let entry = entry.map_err(|e| Error::io(&sub, e))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if Slot::from_file_name(&name).is_some() && !remote_shards.contains(&name) {
                let path = entry.path();
                std::fs::remove_file(&path).map_err(|e| Error::io(&path, e))?;
            }
        }
        let local = Manifest::path(dir);
        match self.get_with_time(MANIFEST_FILE)? {
            Some((bytes, _, time)) => {
                write_atomic(dir, MANIFEST_FILE, &bytes)?;
                modified.insert(MANIFEST_FILE.to_string(), time);
            }
            None if local.exists() => {
                std::fs::remove_file(&local).map_err(|e| Error::io(&local, e))?;
            }
            None => {}
        }
        Ok(modified)
    }

    /// The store's manifests in a local folder, for `firstkd status`, with when each was
    /// last replaced.
    pub fn pull_status(&self) -> Result<(PathBuf, HashMap<String, SystemTime>)> {
        let dir = self.cache.join("status");
        std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
        let times = self.pull_manifests(&dir)?;
        Ok((dir, times))
    }

    /// Local staging folder for a labelling run of `slot` (the whole store when `None`),
    /// prepared from the remote store, and the sink that uploads its commits.
    pub fn prepare_write(&self, slot: Option<Slot>) -> Result<(PathBuf, RemoteSink<'_>)> {
        let name = slot.map_or_else(
            || "write".to_string(),
            |s| format!("write-{:05}-of-{:05}", s.index, s.count),
        );
        let dir = self.cache.join(&name);
        // One writer of this store (shard) on this machine at a time, before the staging
        // folder is touched: a second run must not wipe the first one's files.
        let lock = super::lock::lock(&self.cache.join(format!("{name}.lock")), &self.url)?;
        if dir.exists() {
            std::fs::remove_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
        }
        std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
        self.pull_manifests(&dir)?;
        if slot.is_none() {
            let shards = dir.join(SHARDS_DIR);
            if std::fs::remove_dir(&shards).is_err() && !Manifest::path(&dir).exists() {
                return Err(Error::InvalidArgument(format!(
                    "{}: a sharded store being written (`firstkd status {}`); label into it as one of its shards",
                    self.url, self.url
                )));
            }
        }
        let rel = super::shards::manifest_rel(slot);
        let mut uploaded = HashSet::new();
        if dir.join(&rel).exists() {
            let own = Manifest::load_file(&dir, &rel)?;
            for part in &own.parts {
                for table in Table::ALL {
                    uploaded.insert(part.file(table).file.clone());
                }
            }
        }
        // Objects of this writer that its manifest does not list: a part uploaded by a run
        // killed before it put the manifest. They are not part of the store; remove them.
        let prefix = slot.map(|s| s.file_prefix()).unwrap_or_default();
        for table in Table::ALL {
            for (file, _, _) in self.list(table.name())? {
                let name = file.rsplit('/').next().unwrap_or_default();
                if name.starts_with(&prefix) && !uploaded.contains(&file) {
                    self.delete(&file)?;
                }
            }
        }
        Ok((
            dir,
            RemoteSink {
                remote: self,
                uploaded,
                _lock: lock,
            },
        ))
    }
}

/// Refuses a manifest entry whose file would lie outside the store at `url`.
pub(crate) fn check_inside(url: &str, file: &super::manifest::PartFile) -> Result<()> {
    if file.file.contains("..") || file.file.starts_with('/') {
        return Err(Error::InvalidManifest {
            path: PathBuf::from(format!("{url}/{MANIFEST_FILE}")),
            reason: format!("part file {} is outside the store", file.file),
        });
    }
    Ok(())
}

fn write_atomic(dir: &Path, name: &str, bytes: &[u8]) -> Result<()> {
    let tmp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
    let path = dir.join(name);
    std::fs::write(&tmp, bytes).map_err(|e| Error::io(&tmp, e))?;
    std::fs::rename(&tmp, &path).map_err(|e| Error::io(&path, e))
}

/// Uploads a labelling run's commits: new parts first, then the manifest listing them.
pub struct RemoteSink<'a> {
    remote: &'a Remote,
    uploaded: HashSet<String>,
    _lock: super::lock::WriterLock,
}

impl crate::label::CommitSink for RemoteSink<'_> {
    fn committed(&mut self, dir: &Path, rel: &str, manifest: &Manifest) -> Result<()> {
        for part in &manifest.parts {
            for table in Table::ALL {
                let file = &part.file(table).file;
                if self.uploaded.contains(file) {
                    continue;
                }
                let local = dir.join(file);
                self.remote.upload(file, &local)?;
                std::fs::remove_file(&local).map_err(|e| Error::io(&local, e))?;
                self.uploaded.insert(file.clone());
            }
        }
        let path = dir.join(rel);
        let bytes = std::fs::read(&path).map_err(|e| Error::io(&path, e))?;
        self.remote
            .put_mode(rel, bytes, PutMode::Overwrite)
            .map(|_| ())
    }

    fn combine(&mut self, dir: &Path, count: u64) -> Result<Option<Manifest>> {
        self.remote.pull_manifests(dir)?;
        if Manifest::path(dir).exists() {
            return Manifest::load(dir).map(Some);
        }
        let Some(manifest) = shards::combined(dir, count)? else {
            return Ok(None);
        };
        let text = serde_json::to_string_pretty(&manifest)? + "\n";
        // Created once: a shard that loses the race finds the same manifest there.
        self.remote
            .put_mode(MANIFEST_FILE, text.into_bytes(), PutMode::Create)?;
        self.remote.pull_manifests(dir)?;
        Manifest::load(dir).map(Some)
    }
}
