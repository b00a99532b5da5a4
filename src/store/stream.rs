//! Reading a store on object storage part by part, with read-ahead and a bound on local disk.
//!
//! [`RemoteParts`] is the [`PartSource`] of a store read from `s3://...` by a sequential
//! reader (`distill`, `export`): nothing but the manifest is fetched up front. When the
//! reader asks for part `p`, a background thread fetches it (both files, streamed to disk,
//! size and sha256 checked against the manifest while they arrive) and then the next
//! `read_ahead` parts (wrapping to the first part, for the next epoch), so the reader rarely
//! waits. Parts live in a folder of this process only; when fetching the next one would put
//! more than `disk_limit` bytes there, the least recently used parts outside the read-ahead
//! window are deleted first (an open file stays readable after its name is deleted). A part
//! is fetched again if it is needed after it was deleted. When the whole store fits under
//! the limit, every part is fetched once, whatever the number of epochs.
//!
//! Memory is bounded by the object-store client's chunks (a part is never held in memory
//! whole); disk by `disk_limit`, which is exceeded only when one part alone is larger.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use futures::StreamExt;
use object_store::path::Path as ObjPath;
use object_store::{ObjectStore, ObjectStoreExt};
use sha2::Digest;

use super::manifest::PartFile;
use super::reader::PartSource;
use crate::error::{Error, Result};
use crate::schema::Table;

/// How far ahead to fetch and how much local disk the fetched parts may take.
#[derive(Debug, Clone, Copy)]
pub struct StreamOptions {
    /// Parts fetched ahead of the one being read.
    pub read_ahead: usize,
    /// Bytes of fetched parts kept on local disk.
    pub disk_limit: u64,
}

impl Default for StreamOptions {
    fn default() -> Self {
        StreamOptions {
            read_ahead: 2,
            disk_limit: 2 << 30,
        }
    }
}

/// What a stream fetched, for the command's report.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StreamReport {
    /// Part fetches (a part fetched twice counts twice).
    pub fetches: u64,
    /// Bytes fetched.
    pub bytes: u64,
    /// Most bytes of fetched parts on local disk at any time.
    pub peak_on_disk: u64,
    /// Fetched parts deleted to keep under the limit.
    pub evictions: u64,
}

#[derive(Debug, Clone, PartialEq)]
enum Slot {
    Absent,
    Fetching,
    Ready {
        used: u64,
    },
    /// The file that could not be fetched (relative to the store) and why.
    Failed {
        file: String,
        message: String,
    },
}

#[derive(Debug)]
struct State {
    slots: Vec<Slot>,
    /// The part most recently asked for: the read-ahead window starts there.
    wanted: Option<usize>,
    /// The two parts most recently asked for (a training and a validation reader may read
    /// two places of the store in turn); never deleted to make room.
    recent: [Option<usize>; 2],
    clock: u64,
    on_disk: u64,
    report: StreamReport,
    stop: bool,
}

#[derive(Debug)]
struct Shared {
    url: String,
    dir: PathBuf,
    store: Arc<dyn ObjectStore>,
    prefix: ObjPath,
    /// Per part: its labels and samples files as the manifest lists them.
    parts: Vec<[PartFile; 2]>,
    opts: StreamOptions,
    state: Mutex<State>,
    changed: Condvar,
}

/// A store's parts fetched from object storage as they are read (see the module docs).
#[derive(Debug)]
pub struct RemoteParts {
    shared: Arc<Shared>,
    worker: Option<std::thread::JoinHandle<()>>,
}

impl RemoteParts {
    /// Starts the fetcher of the parts `parts` of the store at `url` (`store` and `prefix`
    /// address its objects) into the local folder `dir`, which belongs to this reader only.
    pub fn start(
        url: &str,
        store: Arc<dyn ObjectStore>,
        prefix: ObjPath,
        dir: &Path,
        parts: Vec<[PartFile; 2]>,
        opts: StreamOptions,
    ) -> Result<Arc<RemoteParts>> {
        for file in parts.iter().flatten() {
            super::remote::check_inside(url, file)?;
        }
        for table in Table::ALL {
            let sub = dir.join(table.name());
            std::fs::create_dir_all(&sub).map_err(|e| Error::io(&sub, e))?;
        }
        let shared = Arc::new(Shared {
            url: url.to_string(),
            dir: dir.to_path_buf(),
            store,
            prefix,
            state: Mutex::new(State {
                slots: vec![Slot::Absent; parts.len()],
                wanted: None,
                recent: [None, None],
                clock: 0,
                on_disk: 0,
                report: StreamReport::default(),
                stop: false,
            }),
            parts,
            opts,
            changed: Condvar::new(),
        });
        let worker = {
            let shared = Arc::clone(&shared);
            std::thread::Builder::new()
                .name("firstkd-fetch".into())
                .spawn(move || fetch_loop(&shared))
                .map_err(|e| Error::io(dir, e))?
        };
        Ok(Arc::new(RemoteParts {
            shared,
            worker: Some(worker),
        }))
    }

    /// What has been fetched so far.
    pub fn report(&self) -> StreamReport {
        self.shared.lock().report
    }

    /// Stops fetching and deletes the fetched parts, even while readers (a prefetch thread
    /// that has not yet seen the end) still hold this source; their next part fails.
    pub fn close(&self) {
        let mut state = self.shared.lock();
        state.stop = true;
        self.shared.changed.notify_all();
        // A fetch under way finishes first (the fetcher starts no other once it sees `stop`).
        while state.slots.contains(&Slot::Fetching) {
            state = self
                .shared
                .changed
                .wait(state)
                .unwrap_or_else(std::sync::PoisonError::into_inner);
        }
        let _ = std::fs::remove_dir_all(&self.shared.dir);
    }
}

impl Drop for RemoteParts {
    fn drop(&mut self) {
        self.close();
        if let Some(worker) = self.worker.take() {
            let _ = worker.join();
        }
        let _ = std::fs::remove_dir_all(&self.shared.dir);
    }
}

impl PartSource for RemoteParts {
    fn open(&self, part: usize, _table: Table, path: &Path) -> Result<File> {
        let shared = &self.shared;
        if part >= shared.parts.len() {
            return Err(Error::InvalidArgument(format!(
                "{}: part {part} of {} is not committed",
                shared.url,
                shared.parts.len()
            )));
        }
        let mut state = shared.lock();
        state.wanted = Some(part);
        if state.recent[0] != Some(part) {
            state.recent = [Some(part), state.recent[0]];
        }
        shared.changed.notify_all();
        loop {
            match &state.slots[part] {
                Slot::Ready { .. } => break,
                Slot::Failed { file, message } => {
                    return Err(Error::ObjectStore {
                        url: format!("{}/{file}", shared.url),
                        error: message.clone(),
                    })
                }
                Slot::Absent | Slot::Fetching => {}
            }
            if state.stop {
                return Err(Error::Internal("part fetcher stopped".into()));
            }
            state = shared
                .changed
                .wait(state)
                .unwrap_or_else(std::sync::PoisonError::into_inner);
        }
        state.clock += 1;
        state.slots[part] = Slot::Ready { used: state.clock };
        // Opened under the lock: the fetcher deletes parts only while it holds it.
        File::open(path).map_err(|e| Error::io(path, e))
    }

    fn name(&self) -> &str {
        &self.shared.url
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn part_bytes(&self, part: usize) -> u64 {
        self.parts[part].iter().map(|f| f.bytes).sum()
    }

    /// The read-ahead window: the wanted part, then the next `read_ahead` parts (wrapping).
    fn window(&self, state: &State) -> Vec<usize> {
        let n = self.parts.len();
        let Some(start) = state.wanted else {
            return Vec::new();
        };
        (0..=self.opts.read_ahead.min(n.saturating_sub(1)))
            .map(|i| (start + i) % n)
            .collect()
    }

    /// Deletes least recently used parts outside `keep` until `need` more bytes fit under the
    /// limit (or nothing more can go). Returns whether they fit.
    fn make_room(&self, state: &mut State, keep: &[usize], need: u64) -> bool {
        while state.on_disk + need > self.opts.disk_limit {
            let victim = state
                .slots
                .iter()
                .enumerate()
                .filter_map(|(i, s)| match s {
                    Slot::Ready { used }
                        if !keep.contains(&i) && !state.recent.contains(&Some(i)) =>
                    {
                        Some((*used, i))
                    }
                    _ => None,
                })
                .min();
            let Some((_, victim)) = victim else {
                return false;
            };
            for file in &self.parts[victim] {
                let _ = std::fs::remove_file(self.dir.join(&file.file));
            }
            state.slots[victim] = Slot::Absent;
            state.on_disk -= self.part_bytes(victim);
            state.report.evictions += 1;
        }
        true
    }

    /// Fetches one part file to its place in the folder, checking its size and sha256.
    async fn fetch_file(&self, file: &PartFile) -> std::result::Result<(), (String, String)> {
        let mut key = self.prefix.clone();
        for piece in file.file.split('/').filter(|p| !p.is_empty()) {
            key = key.join(piece);
        }
        let dest = self.dir.join(&file.file);
        let tmp = dest.with_extension("parquet.download");
        let result = async {
            let mut out = File::create(&tmp).map_err(|e| format!("{}: {e}", tmp.display()))?;
            let got = self.store.get(&key).await.map_err(|e| e.to_string())?;
            let mut stream = got.into_stream();
            let mut hash = sha2::Sha256::new();
            let mut len = 0u64;
            while let Some(chunk) = stream.next().await {
                let chunk = chunk.map_err(|e| e.to_string())?;
                len += chunk.len() as u64;
                if len > file.bytes {
                    return Err(format!(
                        "the object is longer than the {} bytes the manifest lists",
                        file.bytes
                    ));
                }
                hash.update(&chunk);
                out.write_all(&chunk)
                    .map_err(|e| format!("{}: {e}", tmp.display()))?;
            }
            if len != file.bytes {
                return Err(format!(
                    "the object is {len} bytes but the manifest lists {} bytes",
                    file.bytes
                ));
            }
            let sum = hex::encode(hash.finalize());
            if sum != file.sha256 {
                return Err(format!(
                    "sha256 is {sum}, manifest says {}: not the part this store committed",
                    file.sha256
                ));
            }
            std::fs::rename(&tmp, &dest).map_err(|e| format!("{}: {e}", dest.display()))
        }
        .await;
        if result.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        result.map_err(|message| (file.file.clone(), message))
    }
}

/// The fetcher thread: the wanted part first, then the rest of the window, while they fit.
fn fetch_loop(shared: &Shared) {
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            let mut state = shared.lock();
            for (slot, files) in state.slots.iter_mut().zip(&shared.parts) {
                *slot = Slot::Failed {
                    file: files[0].file.clone(),
                    message: format!("starting the I/O runtime: {e}"),
                };
            }
            shared.changed.notify_all();
            return;
        }
    };
    let mut state = shared.lock();
    loop {
        if state.stop {
            return;
        }
        let window = shared.window(&state);
        let next = window
            .iter()
            .copied()
            .find(|&p| state.slots[p] == Slot::Absent);
        let Some(part) = next else {
            state = shared
                .changed
                .wait(state)
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            continue;
        };
        let bytes = shared.part_bytes(part);
        let fits = shared.make_room(&mut state, &window, bytes);
        // The wanted part is fetched even when it alone is over the limit; parts ahead only
        // when they fit.
        if !fits && Some(part) != state.wanted {
            state = shared
                .changed
                .wait(state)
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            continue;
        }
        state.slots[part] = Slot::Fetching;
        state.on_disk += bytes;
        state.report.peak_on_disk = state.report.peak_on_disk.max(state.on_disk);
        drop(state);
        let result = rt.block_on(async {
            for file in &shared.parts[part] {
                shared.fetch_file(file).await?;
            }
            Ok::<(), (String, String)>(())
        });
        state = shared.lock();
        match result {
            Ok(()) => {
                state.clock += 1;
                state.slots[part] = Slot::Ready { used: state.clock };
                state.report.fetches += 1;
                state.report.bytes += bytes;
            }
            Err((file, message)) => {
                for file in &shared.parts[part] {
                    let _ = std::fs::remove_file(shared.dir.join(&file.file));
                }
                state.on_disk -= bytes;
                state.slots[part] = Slot::Failed { file, message };
            }
        }
        shared.changed.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use object_store::memory::InMemory;
    use object_store::PutPayload;

    /// `n` parts of `size` bytes each (labels and samples halves) in an in-memory store.
    fn parts(n: usize, size: usize) -> (Arc<dyn ObjectStore>, Vec<[PartFile; 2]>) {
        let store = InMemory::new();
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let mut out = Vec::new();
        for p in 0..n {
            let files = Table::ALL.map(|table| {
                let bytes: Vec<u8> = (0..size / 2).map(|i| (i * 7 + p) as u8).collect();
                let file = format!("{}/part-{p:05}.parquet", table.name());
                let key = ObjPath::from(format!("s/{file}"));
                rt.block_on(store.put(&key, PutPayload::from(bytes.clone())))
                    .unwrap();
                PartFile {
                    file,
                    rows: 1,
                    bytes: bytes.len() as u64,
                    sha256: hex::encode(sha2::Sha256::digest(&bytes)),
                }
            });
            out.push(files);
        }
        (Arc::new(store), out)
    }

    /// A fetcher of `files` from `store` into `dir`.
    fn start(
        store: Arc<dyn ObjectStore>,
        files: Vec<[PartFile; 2]>,
        dir: &Path,
        opts: StreamOptions,
    ) -> Arc<RemoteParts> {
        RemoteParts::start("s3://b/s", store, ObjPath::from("s"), dir, files, opts).unwrap()
    }

    fn read(parts: &RemoteParts, dir: &Path, p: usize) -> Result<Vec<u8>> {
        let file = &parts.shared.parts[p][0].file;
        let mut f = parts.open(p, Table::Labels, &dir.join(file))?;
        let mut buf = Vec::new();
        std::io::Read::read_to_end(&mut f, &mut buf).unwrap();
        Ok(buf)
    }

    fn on_disk(dir: &Path) -> u64 {
        Table::ALL
            .iter()
            .flat_map(|t| std::fs::read_dir(dir.join(t.name())).unwrap())
            .map(|e| e.unwrap().metadata().unwrap().len())
            .sum()
    }

    #[test]
    fn reads_every_part_within_the_disk_limit_over_two_epochs() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("stream");
        let (store, files) = parts(10, 1000);
        let opts = StreamOptions {
            read_ahead: 2,
            disk_limit: 4000,
        };
        let src = start(store, files.clone(), &dir, opts);
        for _epoch in 0..2 {
            for p in 0..10 {
                let got = read(&src, &dir, p).unwrap();
                assert_eq!(got.len(), 500);
                assert_eq!(got[1], (7 + p) as u8);
                assert!(on_disk(&dir) <= 4000, "{} bytes on disk", on_disk(&dir));
            }
        }
        let r = src.report();
        assert!(r.peak_on_disk <= 4000, "{r:?}");
        // Every part twice (the store does not fit), at most the read-ahead window more.
        assert!(r.fetches >= 20 && r.fetches <= 23, "{r:?}");
        assert!(r.evictions > 0, "{r:?}");
        drop(src);
        assert!(!dir.exists(), "the stream folder is removed");
    }

    #[test]
    fn a_store_under_the_limit_is_fetched_once() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("stream");
        let (store, files) = parts(5, 1000);
        let src = start(store, files, &dir, StreamOptions::default());
        for _epoch in 0..3 {
            for p in 0..5 {
                read(&src, &dir, p).unwrap();
            }
        }
        let r = src.report();
        assert_eq!((r.fetches, r.evictions, r.peak_on_disk), (5, 0, 5000));
    }

    #[test]
    fn a_changed_or_missing_object_is_refused_with_its_url() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("stream");
        let (store, mut files) = parts(3, 1000);
        files[1][0].sha256 = "00".repeat(32);
        files[2][1].file = "samples/gone.parquet".into();
        let src = start(store, files, &dir, StreamOptions::default());
        assert!(read(&src, &dir, 0).is_ok());
        let err = read(&src, &dir, 1).unwrap_err().to_string();
        assert!(
            err.contains("s3://b/s/labels/part-00001.parquet") && err.contains("sha256"),
            "{err}"
        );
        let err = read(&src, &dir, 2).unwrap_err().to_string();
        assert!(err.contains("s3://b/s/samples/gone.parquet"), "{err}");
        assert!(!dir.join("labels/part-00001.parquet").exists());
    }
}
