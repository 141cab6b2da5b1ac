//! The store id, and what a data dir must hold before it is used.
//!
//! A room space restarts at room 1 whenever a server finds no store where
//! one was expected: a volume that did not mount, a mistyped `--data-dir`.
//! Nothing in the rooms themselves can tell, so every store carries an id, a
//! random UUID (v4) written when it is created, which `serve` logs, `migrate`
//! reports and `/metrics` exports (`room_allocator_store_info{store_id}`): a
//! new id where an old one was expected is a new room space, noticed before
//! rooms repeat. And the commands refuse to create a space silently: `serve`
//! creates a store only in a missing or empty dir (and says so at WARN), and
//! `migrate` moves only an existing store.
//!
//! # Format
//! `STORE_ID` in the data dir: the id, 36 characters, lowercase hex with
//! hyphens, then a newline. It is written aside (`STORE_ID.tmp`), fsynced,
//! renamed into place and the directory fsynced, so it appears whole or not
//! at all; a data dir from before ids gets one at its next start.

use std::io;
use std::path::{Path, PathBuf};

use super::fs::Fs;
use super::OpenError;

pub const STORE_ID_FILE: &str = "STORE_ID";
const STORE_ID_TMP: &str = "STORE_ID.tmp";
/// Files a store's first start may leave before its log and commit file
/// exist: a dir holding only these (and `lost+found`) counts as empty.
/// (`rooms.commit.tmp` only beside a log: the first start writes the log
/// first.)
const SETUP_FILES: &[&str] = &["LOCK", "rooms.log", "rooms.commit", "rooms.commit.tmp"];
/// Files written only once a store's log and commit file exist (its id, a
/// compaction, the commit file's upgrade): without those two files they are
/// the traces of a store that was lost, not of one being made.
const STORE_TRACES: &[&str] = &[
    STORE_ID_FILE,
    STORE_ID_TMP,
    "rooms.log.compact",
    "rooms.commit.tmp",
];
/// The two files that make a dir a store.
const STORE_FILES: &[&str] = &["rooms.log", "rooms.commit"];
/// What `mkfs.ext4` leaves on a fresh volume: a mount point holding only
/// this is empty.
const LOST_AND_FOUND: &str = "lost+found";

/// Who is about to use a data dir.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DataDirUse {
    /// A server: may create a store, but only in a missing or empty dir.
    Serve,
    /// `migrate`: moves an existing store only, and creates nothing.
    Migrate,
}

/// Refuses a data dir that `use_` must not touch: for `migrate` one without
/// a store (missing, empty, or holding something else); for `serve` one
/// that holds something other than a store. Reads only.
pub fn check_data_dir(dir: &Path, use_: DataDirUse) -> Result<(), OpenError> {
    let io_err = |cause| OpenError::Io {
        path: dir.to_path_buf(),
        cause,
    };
    let entries: Vec<String> = match std::fs::read_dir(dir) {
        Ok(entries) => entries
            .map(|entry| entry.map(|e| e.file_name().to_string_lossy().into_owned()))
            .collect::<io::Result<_>>()
            .map_err(io_err)?,
        Err(error) if error.kind() == io::ErrorKind::NotFound => Vec::new(),
        Err(cause) => return Err(io_err(cause)),
    };
    let is_store = STORE_FILES
        .iter()
        .any(|file| entries.iter().any(|entry| entry == file));
    match use_ {
        // The store files decide; a half-made store is judged by the open.
        DataDirUse::Migrate if STORE_FILES.iter().all(|f| entries.iter().any(|e| e == f)) => Ok(()),
        DataDirUse::Migrate => Err(OpenError::NoStore {
            dir: dir.to_path_buf(),
        }),
        DataDirUse::Serve if is_store => Ok(()),
        DataDirUse::Serve => {
            if let Some(trace) = entries
                .iter()
                .find(|entry| STORE_TRACES.contains(&entry.as_str()))
            {
                return Err(OpenError::StoreGone {
                    dir: dir.to_path_buf(),
                    trace: trace.clone(),
                });
            }
            match entries
                .into_iter()
                .find(|entry| entry != LOST_AND_FOUND && !SETUP_FILES.contains(&entry.as_str()))
            {
                None => Ok(()),
                Some(entry) => Err(OpenError::NotAStore {
                    dir: dir.to_path_buf(),
                    entry,
                }),
            }
        }
    }
}

/// The store's id, written (durably) if the store has none yet; true if it
/// was just written.
pub fn read_or_create(fs: &dyn Fs, dir: &Path) -> Result<(String, bool), OpenError> {
    let path = dir.join(STORE_ID_FILE);
    let io_err = |path: &Path| {
        let path = path.to_path_buf();
        move |cause| OpenError::Io { path, cause }
    };
    if fs.file_len(&path).map_err(io_err(&path))?.is_some() {
        let bytes = fs
            .open(&path)
            .and_then(|file| file.read_all())
            .map_err(io_err(&path))?;
        let text = String::from_utf8_lossy(&bytes);
        let id = text.trim_end_matches('\n');
        if !is_uuid(id) {
            return Err(corrupt(path, &text));
        }
        return Ok((id.to_owned(), false));
    }
    let id = new_uuid_v4().map_err(io_err(&path))?;
    let tmp = dir.join(STORE_ID_TMP);
    let file = fs.create(&tmp).map_err(io_err(&tmp))?;
    file.write_all_at(format!("{id}\n").as_bytes(), 0)
        .map_err(io_err(&tmp))?;
    file.sync_data().map_err(io_err(&tmp))?;
    drop(file);
    fs.rename(&tmp, &path).map_err(io_err(&path))?;
    fs.sync_dir(dir).map_err(io_err(dir))?;
    Ok((id, true))
}

fn corrupt(path: PathBuf, text: &str) -> OpenError {
    OpenError::Corrupt {
        path,
        offset: 0,
        reason: format!(
            "it holds {:?}, not a store id (a UUID); if this is not the data dir the server used, point --data-dir at the right one",
            text.chars().take(64).collect::<String>()
        ),
    }
}

/// 36 characters: lowercase hex in groups of 8-4-4-4-12.
pub(crate) fn is_uuid(id: &str) -> bool {
    let groups: Vec<&str> = id.split('-').collect();
    groups.len() == 5
        && groups
            .iter()
            .zip([8, 4, 4, 4, 12])
            .all(|(group, len)| group.len() == len)
        && groups.iter().all(|group| {
            group
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        })
}

/// A random (version 4) UUID from the kernel's random source.
pub fn new_uuid_v4() -> io::Result<String> {
    let mut bytes = [0u8; 16];
    let mut filled = 0;
    while filled < bytes.len() {
        let rest = &mut bytes[filled..];
        // SAFETY: the pointer and length describe `rest`, which is valid for
        // writes of that many bytes.
        let n = unsafe { libc::getrandom(rest.as_mut_ptr().cast(), rest.len(), 0) };
        match usize::try_from(n) {
            Ok(n) => filled += n,
            Err(_) => {
                let error = io::Error::last_os_error();
                if error.kind() != io::ErrorKind::Interrupted {
                    return Err(error);
                }
            }
        }
    }
    Ok(format_uuid_v4(bytes))
}

/// Sets the version (4) and variant (RFC 9562) bits and formats the bytes.
fn format_uuid_v4(mut bytes: [u8; 16]) -> String {
    bytes[6] = (bytes[6] & 0x0f) | 0x40;
    bytes[8] = (bytes[8] & 0x3f) | 0x80;
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &hex[0..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..32]
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_version_4_uuids_and_differ() {
        let a = new_uuid_v4().expect("random");
        let b = new_uuid_v4().expect("random");
        assert!(is_uuid(&a), "{a}");
        assert_ne!(a, b);
        assert_eq!(&a[14..15], "4", "{a}");
        assert!("89ab".contains(&a[19..20]), "{a}");
        assert_eq!(
            format_uuid_v4([0xff; 16]),
            "ffffffff-ffff-4fff-bfff-ffffffffffff"
        );
        assert!(!is_uuid("ffffffff-ffff-4fff-bfff-fffffffffffF"));
        assert!(!is_uuid("ffffffff-ffff-4fff-bfff"));
    }

    #[test]
    fn the_id_is_written_once_and_read_back() {
        let dir = tempfile::tempdir().expect("tempdir");
        let fs = super::super::fs::RealFs;
        let (id, created) = read_or_create(&fs, dir.path()).expect("create");
        assert!(created);
        let (again, created) = read_or_create(&fs, dir.path()).expect("read");
        assert!(!created);
        assert_eq!(id, again);
        std::fs::write(dir.path().join(STORE_ID_FILE), "garbage\n").expect("write");
        let error = read_or_create(&fs, dir.path()).expect_err("damaged id refused");
        assert!(error.to_string().contains("not a store id"), "{error}");
    }

    #[test]
    fn serve_takes_a_missing_or_empty_dir_and_migrate_only_a_store() {
        let top = tempfile::tempdir().expect("tempdir");
        let missing = top.path().join("missing");
        assert!(check_data_dir(&missing, DataDirUse::Serve).is_ok());
        assert!(check_data_dir(&missing, DataDirUse::Migrate).is_err());

        let mount = top.path().join("mount");
        std::fs::create_dir_all(mount.join(LOST_AND_FOUND)).expect("mkdir");
        std::fs::write(mount.join("LOCK"), "").expect("write");
        assert!(check_data_dir(&mount, DataDirUse::Serve).is_ok());
        assert!(check_data_dir(&mount, DataDirUse::Migrate).is_err());

        std::fs::write(mount.join("other"), "x").expect("write");
        let error = check_data_dir(&mount, DataDirUse::Serve).expect_err("foreign content");
        assert!(error.to_string().contains("\"other\""), "{error}");

        for file in STORE_FILES {
            std::fs::write(mount.join(file), "").expect("write");
        }
        assert!(check_data_dir(&mount, DataDirUse::Serve).is_ok());
        assert!(check_data_dir(&mount, DataDirUse::Migrate).is_ok());
    }

    /// `STORE_ID` (and its temp file), a compacted log and an upgraded commit
    /// file are written only once a store's log and commit file exist: a dir
    /// holding one of them without those files lost its store (a clean-up,
    /// a partial restore), and a new space there would repeat its rooms.
    #[test]
    fn serve_refuses_a_dir_whose_store_files_are_gone_but_whose_traces_remain() {
        for trace in [
            STORE_ID_FILE,
            STORE_ID_TMP,
            "rooms.log.compact",
            "rooms.commit.tmp",
        ] {
            let dir = tempfile::tempdir().expect("tempdir");
            std::fs::write(dir.path().join("LOCK"), "").expect("write");
            std::fs::write(dir.path().join(trace), "x").expect("write");
            let error = check_data_dir(dir.path(), DataDirUse::Serve)
                .expect_err("a dir that held a store is not empty");
            assert!(
                error.to_string().contains(trace)
                    && error.to_string().contains("held a room-allocator store"),
                "{trace}: {error}"
            );
        }
        // An interrupted first start: a log of at most a header, maybe a
        // commit file being written aside. The open judges the header.
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("rooms.log"), "").expect("write");
        std::fs::write(dir.path().join("rooms.commit.tmp"), "").expect("write");
        assert!(check_data_dir(dir.path(), DataDirUse::Serve).is_ok());
    }
}
