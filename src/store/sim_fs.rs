//! A file system that loses what was not synced, for power-loss tests.
//!
//! `kill -9` keeps the page cache, so it never tests fsync ordering. This file
//! system keeps, for every file, what is durable and what was written since
//! the last `sync_data`, and for every directory, which creations, renames,
//! removals and subdirectories were made in it since its last `sync_dir`.
//! [`SimFs::power_loss`] builds the file system a machine would find after
//! losing power:
//! - each 512-byte sector of each unsynced write independently survives, is
//!   lost, or is torn inside itself (a prefix or a suffix of its bytes lands),
//!   and the survivors land in random order (writes are torn and reordered);
//!   a file marked with [`SimFs::tear_whole_pages`] may instead have the whole
//!   4 KiB page under an unsynced write garbled (a device whose physical
//!   sector is 4 KiB);
//! - a random prefix of the unsynced directory operations survives
//!   (journaled metadata keeps its order), and whatever sits in a directory
//!   whose own entry was lost is lost with it: a directory made but whose
//!   parent was never synced disappears, files and all.
//!
//! Operations can be made to fail (EIO), and a failed operation may have
//! taken effect anyway, as on a real system: a rename or a creation done and
//! then reported failed (an NFS retry, a journal error), a write done in
//! part, an fsync that persisted some pages (and, as Linux does, reads still
//! see every page while the failed ones count as clean), a directory fsync
//! that persisted some entries. Creating over an existing file truncates that
//! file (the same inode), as `O_TRUNC` does. Locks are per path and die with
//! the file system's "process" (a power loss drops them).
//!
//! Not modelled: metadata other than names and lengths, sparse files, a
//! full disk (see the `disk_full` tests), and reads that fail.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use super::fs::{Fs, FsFile, FsLock};

const SECTOR: usize = 512;
/// The unit a device with 4 KiB physical sectors writes (and tears).
const PAGE: usize = 4096;

/// A tiny deterministic generator (xorshift64*), seeded by the test.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed | 1)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    pub fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            0
        } else {
            self.next_u64() % n
        }
    }

    pub fn coin(&mut self) -> bool {
        self.next_u64() & 1 == 1
    }
}

#[derive(Debug, Clone)]
enum Pending {
    Write { offset: usize, bytes: Vec<u8> },
    SetLen(usize),
}

#[derive(Debug, Clone, Default)]
struct Inode {
    durable: Vec<u8>,
    current: Vec<u8>,
    pending: Vec<Pending>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Entry {
    File(u64),
    Dir,
}

#[derive(Debug, Clone)]
enum DirOp {
    Link(PathBuf, Entry),
    Unlink(PathBuf),
    /// Atomic, as rename(2) is (both names are in one directory here).
    Rename(PathBuf, PathBuf, u64),
}

impl DirOp {
    /// The directory whose fsync makes this operation durable.
    fn dir(&self) -> &Path {
        let path = match self {
            DirOp::Link(path, _) | DirOp::Unlink(path) | DirOp::Rename(_, path, _) => path,
        };
        path.parent().unwrap_or(Path::new("/"))
    }

    fn apply(&self, names: &mut BTreeMap<PathBuf, Entry>) {
        match self {
            DirOp::Link(path, entry) => {
                names.insert(path.clone(), *entry);
            }
            DirOp::Unlink(path) => {
                names.remove(path);
            }
            DirOp::Rename(from, to, inode) => {
                names.remove(from);
                names.insert(to.clone(), Entry::File(*inode));
            }
        }
    }
}

/// How much of a failed operation took effect before it reported failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Effect {
    /// Nothing: the operation failed cleanly.
    None,
    /// Some of it (part of a write, some pages of an fsync, some entries of
    /// a directory fsync; all or nothing for the atomic ones).
    Part,
    /// All of it: done, then reported failed.
    All,
}

#[derive(Debug)]
struct State {
    inodes: HashMap<u64, Inode>,
    /// Names as they are now...
    names: BTreeMap<PathBuf, Entry>,
    /// ...and as they are durable.
    durable_names: BTreeMap<PathBuf, Entry>,
    pending_names: Vec<DirOp>,
    next_inode: u64,
    /// Mutating operations so far.
    ops: u64,
    /// Operation numbers that fail once with EIO, having taken a random
    /// part of their effect.
    fail_at: Vec<u64>,
    /// Operations (by kind and path) that fail once with EIO, in order.
    fail_next: Vec<(&'static str, PathBuf, Effect)>,
    /// From this operation on, everything fails: the power is out.
    dead_from: Option<u64>,
    /// The power goes right after the next operation of this kind on this
    /// path has taken effect.
    cut_after: Option<(&'static str, PathBuf)>,
    locked: BTreeSet<PathBuf>,
    /// Files whose unsynced writes may garble their whole 4 KiB page.
    tear_pages: BTreeSet<PathBuf>,
    /// Bytes read so far, by the path the file was opened as (reads do
    /// not count as operations: they change nothing).
    bytes_read: BTreeMap<PathBuf, u64>,
    rng: Rng,
}

impl State {
    fn new(rng: Rng) -> Self {
        let root: BTreeMap<PathBuf, Entry> = [(PathBuf::from("/"), Entry::Dir)].into();
        Self {
            inodes: HashMap::new(),
            names: root.clone(),
            durable_names: root,
            pending_names: Vec::new(),
            next_inode: 0,
            ops: 0,
            fail_at: Vec::new(),
            fail_next: Vec::new(),
            dead_from: None,
            cut_after: None,
            locked: BTreeSet::new(),
            tear_pages: BTreeSet::new(),
            bytes_read: BTreeMap::new(),
            rng,
        }
    }

    /// The parent of `path` must be a directory that exists now.
    fn check_parent(&self, path: &Path) -> io::Result<()> {
        match path.parent().map(|parent| self.names.get(parent)) {
            Some(Some(Entry::Dir)) => Ok(()),
            _ => Err(io::Error::from(io::ErrorKind::NotFound)),
        }
    }

    fn link(&mut self, path: &Path, entry: Entry) {
        self.names.insert(path.to_path_buf(), entry);
        self.pending_names
            .push(DirOp::Link(path.to_path_buf(), entry));
    }
}

/// See the module docs.
#[derive(Debug)]
pub struct SimFs {
    state: Mutex<State>,
}

struct SimFile {
    fs: Arc<SimFs>,
    inode: u64,
    path: PathBuf,
}

struct SimLock {
    fs: Arc<SimFs>,
    path: PathBuf,
}

impl Drop for SimLock {
    fn drop(&mut self) {
        self.fs.lock().locked.remove(&self.path);
    }
}

fn eio(what: &str) -> io::Error {
    io::Error::other(format!("simulated I/O error in {what}"))
}

impl SimFs {
    /// An empty file system: only `/`, durable.
    pub fn new(seed: u64) -> Arc<Self> {
        Arc::new(Self {
            state: Mutex::new(State::new(Rng::new(seed))),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().expect("sim fs lock is never poisoned")
    }

    /// Mutating operations so far.
    pub fn ops(&self) -> u64 {
        self.lock().ops
    }

    /// Bytes read so far from files opened (or created) as `path`.
    pub fn bytes_read(&self, path: &Path) -> u64 {
        self.lock().bytes_read.get(path).copied().unwrap_or(0)
    }

    /// Makes mutating operation number `op` (counting from the start) fail
    /// once with EIO, after taking a random part of its effect.
    pub fn fail_op(&self, op: u64) {
        self.lock().fail_at.push(op);
    }

    /// Makes the next operation of `kind` ("write", "fsync", "set_len",
    /// "create", "rename", "unlink", "fsync dir", "mkdir") on `path` fail
    /// once, cleanly. For a rename, `path` is the target.
    pub fn fail_next(&self, kind: &'static str, path: &Path) {
        self.fail_next_with(kind, path, Effect::None);
    }

    /// Like [`SimFs::fail_next`], with `effect` of it done before the error.
    pub fn fail_next_with(&self, kind: &'static str, path: &Path, effect: Effect) {
        self.lock()
            .fail_next
            .push((kind, path.to_path_buf(), effect));
    }

    /// Cuts the power before mutating operation number `op`: it and every
    /// later one fail, with no effect.
    pub fn cut_power_at(&self, op: u64) {
        self.lock().dead_from = Some(op);
    }

    /// Cuts the power right after the next operation of `kind` on `path`
    /// (see [`SimFs::fail_next`]) has taken effect: every later one fails.
    pub fn cut_power_after(&self, kind: &'static str, path: &Path) {
        self.lock().cut_after = Some((kind, path.to_path_buf()));
    }

    /// Unsynced writes to the file at `path` may garble the whole 4 KiB
    /// page they fall in at a power loss.
    pub fn tear_whole_pages(&self, path: &Path) {
        self.lock().tear_pages.insert(path.to_path_buf());
    }

    /// The names that exist now (files and directories).
    pub fn exists(&self, path: &Path) -> bool {
        self.lock().names.contains_key(path)
    }

    /// Writes `bytes` as the whole file at `path`, durably (a test's set-up).
    pub fn put_durable(&self, path: &Path, bytes: &[u8]) {
        let mut state = self.lock();
        let mut dir = PathBuf::from("/");
        for part in path.parent().unwrap_or(Path::new("/")).components().skip(1) {
            dir.push(part);
            state.names.insert(dir.clone(), Entry::Dir);
            state.durable_names.insert(dir.clone(), Entry::Dir);
        }
        let inode = state.next_inode;
        state.next_inode += 1;
        state.inodes.insert(
            inode,
            Inode {
                durable: bytes.to_vec(),
                current: bytes.to_vec(),
                pending: Vec::new(),
            },
        );
        state.names.insert(path.to_path_buf(), Entry::File(inode));
        state
            .durable_names
            .insert(path.to_path_buf(), Entry::File(inode));
    }

    /// The bytes of the file at `path` as they are now.
    pub fn contents(&self, path: &Path) -> Option<Vec<u8>> {
        let state = self.lock();
        match state.names.get(path)? {
            Entry::File(inode) => Some(state.inodes[inode].current.clone()),
            Entry::Dir => None,
        }
    }

    /// Counts a mutating operation; `Err(effect)` if it fails, having taken
    /// `effect` of its effect.
    fn step(state: &mut State, what: &'static str, path: &Path) -> Result<(), Effect> {
        let op = state.ops;
        state.ops += 1;
        if state.dead_from.is_some_and(|dead| op >= dead) {
            return Err(Effect::None);
        }
        if let Some(at) = state.fail_at.iter().position(|f| *f == op) {
            state.fail_at.swap_remove(at);
            let effect = match state.rng.below(3) {
                0 => Effect::None,
                1 => Effect::Part,
                _ => Effect::All,
            };
            return Err(effect);
        }
        if let Some(at) = state
            .fail_next
            .iter()
            .position(|(kind, p, _)| *kind == what && p == path)
        {
            let (_, _, effect) = state.fail_next.remove(at);
            return Err(effect);
        }
        if state
            .cut_after
            .as_ref()
            .is_some_and(|(kind, p)| *kind == what && p == path)
        {
            state.cut_after = None;
            state.dead_from = Some(op + 1);
        }
        Ok(())
    }

    /// The file system found after a power loss now.
    pub fn power_loss(&self, seed: u64) -> Arc<SimFs> {
        let state = self.lock();
        let mut rng = Rng::new(seed);
        let torn_pages: BTreeSet<u64> = state
            .tear_pages
            .iter()
            .filter_map(|path| match state.names.get(path) {
                Some(Entry::File(inode)) => Some(*inode),
                _ => None,
            })
            .collect();
        let mut inodes = HashMap::new();
        for (id, inode) in &state.inodes {
            let mut disk = inode.durable.clone();
            apply_some(&mut disk, &inode.pending, &mut rng, torn_pages.contains(id));
            inodes.insert(
                *id,
                Inode {
                    durable: disk.clone(),
                    current: disk,
                    pending: Vec::new(),
                },
            );
        }
        let mut names = state.durable_names.clone();
        let kept = rng.below(state.pending_names.len() as u64 + 1) as usize;
        for op in &state.pending_names[..kept] {
            op.apply(&mut names);
        }
        // A name whose directory is gone is gone (sorted: parents first).
        let mut reachable = BTreeMap::new();
        for (path, entry) in names {
            let parent_kept = match path.parent() {
                None => true,
                Some(parent) => reachable.get(parent) == Some(&Entry::Dir),
            };
            if parent_kept {
                reachable.insert(path, entry);
            }
        }
        let mut new = State::new(Rng::new(seed ^ 0x9e37_79b9));
        new.inodes = inodes;
        new.durable_names = reachable.clone();
        new.names = reachable;
        new.next_inode = state.next_inode;
        new.tear_pages = state.tear_pages.clone();
        Arc::new(SimFs {
            state: Mutex::new(new),
        })
    }

    fn file(self: &Arc<Self>, inode: u64, path: &Path) -> Box<dyn FsFile> {
        Box::new(SimFile {
            fs: self.clone(),
            inode,
            path: path.to_path_buf(),
        })
    }
}

/// Applies to `disk` a random part of `pending`: each sector of each write
/// survives, is lost or is torn inside itself, and survivors land in random
/// order. With `whole_pages`, a write may instead garble its 4 KiB pages.
fn apply_some(disk: &mut Vec<u8>, pending: &[Pending], rng: &mut Rng, whole_pages: bool) {
    let mut sectors: Vec<(usize, Vec<u8>)> = Vec::new();
    let flush = |disk: &mut Vec<u8>, sectors: &mut Vec<(usize, Vec<u8>)>, rng: &mut Rng| {
        // Shuffle, then apply: reordered writes.
        for i in (1..sectors.len()).rev() {
            let j = rng.below(i as u64 + 1) as usize;
            sectors.swap(i, j);
        }
        for (offset, bytes) in sectors.drain(..) {
            write_at(disk, offset, &bytes);
        }
    };
    for op in pending {
        match op {
            Pending::Write { offset, bytes } => {
                if whole_pages && rng.coin() {
                    // The device was rewriting the page when the power went.
                    let start = offset / PAGE * PAGE;
                    let end = (offset + bytes.len()).div_ceil(PAGE) * PAGE;
                    let end = end.min(disk.len().max(offset + bytes.len()));
                    let garbage: Vec<u8> = (start..end).map(|_| rng.next_u64() as u8).collect();
                    sectors.push((start, garbage));
                    continue;
                }
                let mut at = 0;
                while at < bytes.len() {
                    // Sector boundaries of the file, not of the write.
                    let sector_end = ((offset + at) / SECTOR + 1) * SECTOR;
                    let len = (sector_end - (offset + at)).min(bytes.len() - at);
                    let piece = &bytes[at..at + len];
                    match rng.below(4) {
                        0 => {}
                        1 | 2 => sectors.push((offset + at, piece.to_vec())),
                        _ => {
                            // Torn inside the sector: a prefix or a suffix lands.
                            let cut = rng.below(len as u64) as usize;
                            if rng.coin() {
                                sectors.push((offset + at, piece[..cut].to_vec()));
                            } else {
                                sectors.push((offset + at + cut, piece[cut..].to_vec()));
                            }
                        }
                    }
                    at += len;
                }
            }
            Pending::SetLen(len) => {
                flush(disk, &mut sectors, rng);
                if rng.coin() {
                    disk.resize(*len, 0);
                }
            }
        }
    }
    flush(disk, &mut sectors, rng);
}

fn write_at(data: &mut Vec<u8>, offset: usize, bytes: &[u8]) {
    if data.len() < offset + bytes.len() {
        data.resize(offset + bytes.len(), 0);
    }
    data[offset..offset + bytes.len()].copy_from_slice(bytes);
}

impl FsFile for SimFile {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let mut state = self.fs.lock();
        let data = &state.inodes[&self.inode].current;
        let offset = usize::try_from(offset).expect("small files");
        let end = offset + buf.len();
        if end > data.len() {
            return Err(io::Error::from(io::ErrorKind::UnexpectedEof));
        }
        buf.copy_from_slice(&data[offset..end]);
        let read = u64::try_from(buf.len()).expect("small files");
        *state.bytes_read.entry(self.path.clone()).or_insert(0) += read;
        Ok(())
    }

    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let mut state = self.fs.lock();
        let step = SimFs::step(&mut state, "write", &self.path);
        let len = match step {
            Ok(()) | Err(Effect::All) => buf.len(),
            Err(Effect::Part) => state.rng.below(buf.len() as u64) as usize,
            Err(Effect::None) => 0,
        };
        if len > 0 {
            let offset = usize::try_from(offset).expect("small files");
            let inode = state.inodes.get_mut(&self.inode).expect("open file");
            write_at(&mut inode.current, offset, &buf[..len]);
            inode.pending.push(Pending::Write {
                offset,
                bytes: buf[..len].to_vec(),
            });
        }
        step.map_err(|_| eio("write"))
    }

    fn sync_data(&self) -> io::Result<()> {
        let mut state = self.fs.lock();
        let powered = state.dead_from.is_none_or(|dead| state.ops < dead);
        let step = SimFs::step(&mut state, "fsync", &self.path);
        if !powered {
            // The machine is off: what reaches the disk is the power loss's call.
            return Err(eio("fsync"));
        }
        let State { inodes, rng, .. } = &mut *state;
        let inode = inodes.get_mut(&self.inode).expect("open file");
        let pending = std::mem::take(&mut inode.pending);
        match step {
            Ok(()) | Err(Effect::All) => inode.durable = inode.current.clone(),
            // Linux after a failed fsync: the pages count as clean, some
            // reached the disk and some did not, and reads see them all.
            Err(Effect::Part) => apply_some(&mut inode.durable, &pending, rng, false),
            Err(Effect::None) => {}
        }
        step.map_err(|_| eio("fsync"))
    }

    fn len(&self) -> io::Result<u64> {
        let state = self.fs.lock();
        Ok(state.inodes[&self.inode].current.len() as u64)
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        let mut state = self.fs.lock();
        let step = SimFs::step(&mut state, "set_len", &self.path);
        if matches!(step, Ok(()) | Err(Effect::All | Effect::Part)) {
            let len = usize::try_from(len).expect("small files");
            let inode = state.inodes.get_mut(&self.inode).expect("open file");
            inode.current.resize(len, 0);
            inode.pending.push(Pending::SetLen(len));
        }
        step.map_err(|_| eio("set_len"))
    }
}

/// Whether a failed atomic operation took effect.
fn took_effect(step: Result<(), Effect>) -> bool {
    !matches!(step, Err(Effect::None))
}

impl Fs for Arc<SimFs> {
    fn open(&self, path: &Path) -> io::Result<Box<dyn FsFile>> {
        let state = self.lock();
        let entry = *state
            .names
            .get(path)
            .ok_or_else(|| io::Error::from(io::ErrorKind::NotFound))?;
        drop(state);
        match entry {
            Entry::File(inode) => Ok(self.file(inode, path)),
            Entry::Dir => Err(io::Error::from(io::ErrorKind::IsADirectory)),
        }
    }

    fn create(&self, path: &Path) -> io::Result<Box<dyn FsFile>> {
        let mut state = self.lock();
        state.check_parent(path)?;
        let step = SimFs::step(&mut state, "create", path);
        if took_effect(step) {
            match state.names.get(path).copied() {
                Some(Entry::File(inode)) => {
                    // O_TRUNC: the same file, cut to nothing.
                    let inode = state.inodes.get_mut(&inode).expect("named file");
                    inode.current.clear();
                    inode.pending.push(Pending::SetLen(0));
                }
                Some(Entry::Dir) => return Err(io::Error::from(io::ErrorKind::IsADirectory)),
                None => {
                    let inode = state.next_inode;
                    state.next_inode += 1;
                    state.inodes.insert(inode, Inode::default());
                    state.link(path, Entry::File(inode));
                }
            }
        }
        step.map_err(|_| eio("create"))?;
        let Some(Entry::File(inode)) = state.names.get(path).copied() else {
            unreachable!("just created");
        };
        drop(state);
        Ok(self.file(inode, path))
    }

    fn read(&self, path: &Path) -> io::Result<Vec<u8>> {
        self.open(path)?.read_all()
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        let mut state = self.lock();
        let Some(Entry::File(inode)) = state.names.get(from).copied() else {
            return Err(io::Error::from(io::ErrorKind::NotFound));
        };
        state.check_parent(to)?;
        let step = SimFs::step(&mut state, "rename", to);
        if took_effect(step) {
            state.names.remove(from);
            state.names.insert(to.to_path_buf(), Entry::File(inode));
            state
                .pending_names
                .push(DirOp::Rename(from.to_path_buf(), to.to_path_buf(), inode));
        }
        step.map_err(|_| eio("rename"))
    }

    fn remove_file(&self, path: &Path) -> io::Result<()> {
        let mut state = self.lock();
        if !matches!(state.names.get(path), Some(Entry::File(_))) {
            return Err(io::Error::from(io::ErrorKind::NotFound));
        }
        let step = SimFs::step(&mut state, "unlink", path);
        if took_effect(step) {
            state.names.remove(path);
            state.pending_names.push(DirOp::Unlink(path.to_path_buf()));
        }
        step.map_err(|_| eio("unlink"))
    }

    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        let mut state = self.lock();
        if state.names.get(dir) != Some(&Entry::Dir) {
            return Err(io::Error::from(io::ErrorKind::NotFound));
        }
        let step = SimFs::step(&mut state, "fsync dir", dir);
        let ours = state
            .pending_names
            .iter()
            .filter(|op| op.dir() == dir)
            .count();
        let synced = match step {
            Ok(()) | Err(Effect::All) => ours,
            Err(Effect::Part) => state.rng.below(ours as u64 + 1) as usize,
            Err(Effect::None) => 0,
        };
        let State {
            pending_names,
            durable_names,
            ..
        } = &mut *state;
        let mut done = 0;
        pending_names.retain(|op| {
            if done < synced && op.dir() == dir {
                op.apply(durable_names);
                done += 1;
                false
            } else {
                true
            }
        });
        step.map_err(|_| eio("fsync dir"))
    }

    fn file_len(&self, path: &Path) -> io::Result<Option<u64>> {
        let state = self.lock();
        Ok(match state.names.get(path) {
            Some(Entry::File(inode)) => Some(state.inodes[inode].current.len() as u64),
            Some(Entry::Dir) => return Err(io::Error::from(io::ErrorKind::IsADirectory)),
            None => None,
        })
    }

    fn dir_exists(&self, dir: &Path) -> io::Result<bool> {
        match self.lock().names.get(dir) {
            Some(Entry::Dir) => Ok(true),
            Some(Entry::File(_)) => Err(io::Error::from(io::ErrorKind::NotADirectory)),
            None => Ok(false),
        }
    }

    fn create_dir(&self, dir: &Path) -> io::Result<()> {
        let mut state = self.lock();
        if state.names.contains_key(dir) {
            return Err(io::Error::from(io::ErrorKind::AlreadyExists));
        }
        state.check_parent(dir)?;
        let step = SimFs::step(&mut state, "mkdir", dir);
        if took_effect(step) {
            state.link(dir, Entry::Dir);
        }
        step.map_err(|_| eio("mkdir"))
    }

    fn try_lock(&self, path: &Path) -> io::Result<Option<FsLock>> {
        let mut state = self.lock();
        match state.names.get(path) {
            Some(Entry::File(_)) => {}
            Some(Entry::Dir) => return Err(io::Error::from(io::ErrorKind::IsADirectory)),
            None => {
                state.check_parent(path)?;
                let step = SimFs::step(&mut state, "create", path);
                if took_effect(step) {
                    let inode = state.next_inode;
                    state.next_inode += 1;
                    state.inodes.insert(inode, Inode::default());
                    state.link(path, Entry::File(inode));
                }
                step.map_err(|_| eio("create"))?;
            }
        }
        if !state.locked.insert(path.to_path_buf()) {
            return Ok(None);
        }
        drop(state);
        Ok(Some(Box::new(SimLock {
            fs: self.clone(),
            path: path.to_path_buf(),
        })))
    }
}
