//! A file system that loses what was not synced, for power-loss tests.
//!
//! `kill -9` keeps the page cache, so it never tests fsync ordering. This file
//! system keeps, for every file, what is durable and what was written since
//! the last `sync_data`, and for the directory, which creations, renames and
//! removals were made since the last `sync_dir`. [`SimFs::power_loss`]
//! builds the file system a machine would find after losing power: each
//! 512-byte sector of each unsynced write independently survives or not, the
//! survivors land in random order (so writes are torn and reordered), and a
//! random prefix of the unsynced directory operations survives (journaled
//! metadata keeps its order). Operations can also be made to fail (EIO), and a
//! failed fsync loses or keeps each unsynced sector on disk while reads still
//! see the data, as Linux does.

use std::collections::{BTreeMap, HashMap};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use super::fs::{Fs, FsFile};

const SECTOR: usize = 512;

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

#[derive(Debug, Clone)]
enum DirOp {
    Link(PathBuf, u64),
    Unlink(PathBuf),
    /// Atomic, as rename(2) is.
    Rename(PathBuf, PathBuf, u64),
}

#[derive(Debug, Default)]
struct State {
    inodes: HashMap<u64, Inode>,
    /// Names as they are now...
    names: BTreeMap<PathBuf, u64>,
    /// ...and as they are durable.
    durable_names: BTreeMap<PathBuf, u64>,
    pending_names: Vec<DirOp>,
    next_inode: u64,
    /// Mutating operations so far.
    ops: u64,
    /// Operation numbers that fail once with EIO.
    fail_at: Vec<u64>,
    /// Operations (by kind and path) that fail once with EIO, in order.
    fail_next: Vec<(&'static str, PathBuf)>,
    /// From this operation on, everything fails: the power is out.
    dead_from: Option<u64>,
    rng: Option<Rng>,
}

/// See the module docs.
#[derive(Debug, Default)]
pub struct SimFs {
    state: Mutex<State>,
}

struct SimFile {
    fs: Arc<SimFs>,
    inode: u64,
    path: PathBuf,
}

fn eio(what: &str) -> io::Error {
    io::Error::other(format!("simulated I/O error in {what}"))
}

impl SimFs {
    pub fn new(seed: u64) -> Arc<Self> {
        let fs = Self::default();
        fs.lock().rng = Some(Rng::new(seed));
        Arc::new(fs)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().expect("sim fs lock is never poisoned")
    }

    /// Mutating operations so far.
    pub fn ops(&self) -> u64 {
        self.lock().ops
    }

    /// Makes mutating operation number `op` (counting from the start) fail
    /// once with EIO.
    pub fn fail_op(&self, op: u64) {
        self.lock().fail_at.push(op);
    }

    /// Makes the next operation of `kind` ("write", "fsync", "set_len",
    /// "create", "rename", "unlink", "fsync dir") on `path` fail once.
    pub fn fail_next(&self, kind: &'static str, path: &Path) {
        self.lock().fail_next.push((kind, path.to_path_buf()));
    }

    /// Cuts the power before mutating operation number `op`: it and every
    /// later one fail.
    pub fn cut_power_at(&self, op: u64) {
        self.lock().dead_from = Some(op);
    }

    /// Counts a mutating operation; fails it if the test said so.
    fn step(state: &mut State, what: &'static str, path: &Path) -> io::Result<()> {
        let op = state.ops;
        state.ops += 1;
        if state.dead_from.is_some_and(|dead| op >= dead) {
            return Err(eio(what));
        }
        if let Some(at) = state.fail_at.iter().position(|f| *f == op) {
            state.fail_at.swap_remove(at);
            return Err(eio(what));
        }
        if let Some(at) = state
            .fail_next
            .iter()
            .position(|(kind, p)| *kind == what && p == path)
        {
            state.fail_next.remove(at);
            return Err(eio(what));
        }
        Ok(())
    }

    /// The file system found after a power loss now.
    pub fn power_loss(&self, seed: u64) -> Arc<SimFs> {
        let state = self.lock();
        let mut rng = Rng::new(seed);
        let mut inodes = HashMap::new();
        for (id, inode) in &state.inodes {
            let mut disk = inode.durable.clone();
            apply_some(&mut disk, &inode.pending, &mut rng);
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
            match op {
                DirOp::Link(path, inode) => {
                    names.insert(path.clone(), *inode);
                }
                DirOp::Unlink(path) => {
                    names.remove(path);
                }
                DirOp::Rename(from, to, inode) => {
                    names.remove(from);
                    names.insert(to.clone(), *inode);
                }
            }
        }
        let fs = SimFs::default();
        {
            let mut new = fs.lock();
            new.inodes = inodes;
            new.durable_names = names.clone();
            new.names = names;
            new.next_inode = state.next_inode;
            new.rng = Some(Rng::new(seed ^ 0x9e37_79b9));
        }
        Arc::new(fs)
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
/// survives or not, and survivors land in random order.
fn apply_some(disk: &mut Vec<u8>, pending: &[Pending], rng: &mut Rng) {
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
                let mut at = 0;
                while at < bytes.len() {
                    // Sector boundaries of the file, not of the write.
                    let sector_end = ((offset + at) / SECTOR + 1) * SECTOR;
                    let len = (sector_end - (offset + at)).min(bytes.len() - at);
                    if rng.coin() {
                        sectors.push((offset + at, bytes[at..at + len].to_vec()));
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
        let state = self.fs.lock();
        let data = &state.inodes[&self.inode].current;
        let offset = usize::try_from(offset).expect("small files");
        let end = offset + buf.len();
        if end > data.len() {
            return Err(io::Error::from(io::ErrorKind::UnexpectedEof));
        }
        buf.copy_from_slice(&data[offset..end]);
        Ok(())
    }

    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let mut state = self.fs.lock();
        SimFs::step(&mut state, "write", &self.path)?;
        let offset = usize::try_from(offset).expect("small files");
        let inode = state.inodes.get_mut(&self.inode).expect("open file");
        write_at(&mut inode.current, offset, buf);
        inode.pending.push(Pending::Write {
            offset,
            bytes: buf.to_vec(),
        });
        Ok(())
    }

    fn sync_data(&self) -> io::Result<()> {
        let mut state = self.fs.lock();
        let failed = SimFs::step(&mut state, "fsync", &self.path);
        let mut rng = state.rng.take().expect("seeded");
        let inode = state.inodes.get_mut(&self.inode).expect("open file");
        let pending = std::mem::take(&mut inode.pending);
        if failed.is_ok() {
            inode.durable = inode.current.clone();
        } else {
            // Linux after a failed fsync: the pages count as clean, some
            // reached the disk and some did not, and reads see them all.
            apply_some(&mut inode.durable, &pending, &mut rng);
        }
        state.rng = Some(rng);
        failed
    }

    fn len(&self) -> io::Result<u64> {
        let state = self.fs.lock();
        Ok(state.inodes[&self.inode].current.len() as u64)
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        let mut state = self.fs.lock();
        SimFs::step(&mut state, "set_len", &self.path)?;
        let len = usize::try_from(len).expect("small files");
        let inode = state.inodes.get_mut(&self.inode).expect("open file");
        inode.current.resize(len, 0);
        inode.pending.push(Pending::SetLen(len));
        Ok(())
    }
}

impl Fs for Arc<SimFs> {
    fn open(&self, path: &Path) -> io::Result<Box<dyn FsFile>> {
        let state = self.lock();
        let inode = *state
            .names
            .get(path)
            .ok_or_else(|| io::Error::from(io::ErrorKind::NotFound))?;
        drop(state);
        Ok(self.file(inode, path))
    }

    fn create(&self, path: &Path) -> io::Result<Box<dyn FsFile>> {
        let mut state = self.lock();
        SimFs::step(&mut state, "create", path)?;
        let inode = state.next_inode;
        state.next_inode += 1;
        state.inodes.insert(inode, Inode::default());
        state.names.insert(path.to_path_buf(), inode);
        state
            .pending_names
            .push(DirOp::Link(path.to_path_buf(), inode));
        drop(state);
        Ok(self.file(inode, path))
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        let mut state = self.lock();
        SimFs::step(&mut state, "rename", to)?;
        let inode = state
            .names
            .remove(from)
            .ok_or_else(|| io::Error::from(io::ErrorKind::NotFound))?;
        state.names.insert(to.to_path_buf(), inode);
        state
            .pending_names
            .push(DirOp::Rename(from.to_path_buf(), to.to_path_buf(), inode));
        Ok(())
    }

    fn remove_file(&self, path: &Path) -> io::Result<()> {
        let mut state = self.lock();
        SimFs::step(&mut state, "unlink", path)?;
        state
            .names
            .remove(path)
            .ok_or_else(|| io::Error::from(io::ErrorKind::NotFound))?;
        state.pending_names.push(DirOp::Unlink(path.to_path_buf()));
        Ok(())
    }

    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        let mut state = self.lock();
        SimFs::step(&mut state, "fsync dir", dir)?;
        state.durable_names = state.names.clone();
        state.pending_names.clear();
        Ok(())
    }

    fn file_len(&self, path: &Path) -> io::Result<Option<u64>> {
        let state = self.lock();
        Ok(state
            .names
            .get(path)
            .map(|inode| state.inodes[inode].current.len() as u64))
    }

    fn create_dir_all(&self, _dir: &Path) -> io::Result<()> {
        Ok(())
    }
}
