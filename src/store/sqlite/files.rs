//! The database file and its directory: their two layouts, and the messages for a
//! store that cannot be opened.
//!
//! Shared (a personal install): every user must be able to reserve and release
//! GPUs, so the store is shared-writable. When canhazgpu creates the store's
//! directory it makes it mode 0777 (no sticky bit: SQLite must be able to delete
//! another user's `-wal`/`-shm` files), and the database file 0666; SQLite gives its
//! `-wal`, `-shm` and journal files the database file's mode. Any local user can
//! therefore also edit the file by hand.
//!
//! Protected (the binary is setgid `canhazgpu`): the directory is `root:canhazgpu
//! 2770` and the files `0660`, so only the group, which is to say canhazgpu acting
//! for its user, reaches them; the directory's setgid bit gives every side file the
//! group.

use std::fs::{self, OpenOptions, Permissions};
use std::io;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;
use std::sync::atomic::{AtomicU32, Ordering};

use crate::error::Error;

/// Who may reach the store's files.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Layout {
    /// Every user: directory 0777, files 0666.
    Shared,
    /// The group `canhazgpu` alone: directory `root:canhazgpu 2770`, files 0660.
    Protected,
}

impl Layout {
    pub fn name(self) -> &'static str {
        match self {
            Layout::Shared => "shared",
            Layout::Protected => "protected",
        }
    }

    fn dir_mode(self) -> u32 {
        match self {
            Layout::Shared => 0o777,
            Layout::Protected => 0o2770,
        }
    }

    fn file_mode(self) -> u32 {
        match self {
            Layout::Shared => 0o666,
            Layout::Protected => 0o660,
        }
    }
}

/// The one line a user sees when the store is not usable for them: what is wrong,
/// and who can fix it.
pub(super) fn access_denied(path: &Path) -> Error {
    let shown = path.display();
    if crate::privilege::raised() {
        // The system's store, opened with the group's privilege: its modes are wrong.
        return Error::Store(format!(
            "cannot open the canhazgpu store at {shown}: permission denied ({}) - ask root to \
             run 'canhazgpu admin --gpus <count>', which repairs it",
            why_denied(path, Layout::Protected)
        ));
    }
    if let Some(dir) = protected_ancestor(path) {
        let which = match crate::privilege::available() {
            true => "this path is not",
            false => "this binary is not setgid canhazgpu",
        };
        return Error::Store(format!(
            "cannot open the canhazgpu store at {shown}: permission denied ({} is protected: \
             only the installed canhazgpu opens a store in it, at the state directory the \
             system configuration names, and {which})",
            dir.display()
        ));
    }
    Error::Store(format!(
        "cannot open the canhazgpu store at {shown}: permission denied ({}) - ask root to run \
         'canhazgpu admin --gpus <count>', which creates or repairs it for every user, or \
         use --state-dir DIR",
        why_denied(path, Layout::Shared)
    ))
}

/// The nearest directory on the way to `path` that only the group `canhazgpu` may
/// enter, if any.
fn protected_ancestor(path: &Path) -> Option<&Path> {
    let group = crate::privilege::group_gid()?.as_raw();
    path.ancestors().skip(1).find(|dir| {
        fs::metadata(dir).is_ok_and(|meta| {
            meta.is_dir() && meta.gid() == group && meta.permissions().mode() & 0o007 == 0
        })
    })
}

fn why_denied(path: &Path, layout: Layout) -> String {
    let (who, kept) = match layout {
        Layout::Shared => ("every user", 0o777),
        Layout::Protected => ("group canhazgpu", 0o770),
    };
    let described = |what: &str, path: &Path, wanted: u32| {
        let wanted = wanted & kept;
        let meta = fs::metadata(path).ok()?;
        let mode = meta.permissions().mode() & 0o7777;
        (mode & wanted != wanted).then(|| {
            let owner = nix::unistd::User::from_uid(meta.uid().into())
                .ok()
                .flatten()
                .map_or_else(|| meta.uid().to_string(), |user| user.name);
            format!("{what} is mode {mode:04o}, owned by {owner}, not writable by {who}")
        })
    };
    if !path.exists() {
        return "there is no store yet and you may not create one".into();
    }
    described("its directory", parent_of(path), layout.dir_mode())
        .or_else(|| described("the file", path, layout.file_mode()))
        .unwrap_or_else(|| "the file or its directory is not writable by you".into())
}

pub(super) fn open_failure(path: &Path, err: io::Error) -> Error {
    if err.kind() == io::ErrorKind::PermissionDenied {
        access_denied(path)
    } else {
        Error::Store(format!(
            "cannot open the canhazgpu store at {}: {err}",
            path.display()
        ))
    }
}

/// Adds `bits` to the permissions of `path` where they are missing (keeping any
/// sticky bit, as on /tmp); says whether any were missing.
fn add_permissions(path: &Path, bits: u32) -> io::Result<bool> {
    let mode = fs::metadata(path)?.permissions().mode();
    if mode & bits == bits {
        return Ok(false);
    }
    fs::set_permissions(path, Permissions::from_mode((mode & 0o7777) | bits))?;
    Ok(true)
}

/// Creates the directory and an empty database file with the layout's modes where
/// missing. The file is created under a temporary name and linked into place, so no
/// other process can open it (and create `-wal`/`-shm` from its mode) before it has
/// its final mode.
pub(super) fn create_files(path: &Path, layout: Layout) -> io::Result<()> {
    if path.exists() {
        return Ok(());
    }
    let dir = parent_of(path);
    if !dir.is_dir() {
        if let Some(above) = dir.parent() {
            fs::create_dir_all(above)?;
        }
        match fs::create_dir(dir) {
            Ok(()) => set_owner_and_mode(dir, layout, layout.dir_mode())?,
            Err(err) if err.kind() == io::ErrorKind::AlreadyExists => {}
            Err(err) => return Err(err),
        }
    }
    let file_name = path.file_name().unwrap_or_default().to_string_lossy();
    // Unique per process and call, so concurrent creators never share a staging file.
    static CREATIONS: AtomicU32 = AtomicU32::new(0);
    let staging = dir.join(format!(
        ".{file_name}.{}.{}.new",
        std::process::id(),
        CREATIONS.fetch_add(1, Ordering::Relaxed)
    ));
    OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(layout.file_mode())
        .open(&staging)?;
    let published = set_owner_and_mode(&staging, layout, layout.file_mode())
        .and_then(|()| fs::hard_link(&staging, path));
    fs::remove_file(&staging)?;
    match published {
        Err(err) if err.kind() == io::ErrorKind::AlreadyExists => Ok(()),
        other => other,
    }
}

fn parent_of(path: &Path) -> &Path {
    match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    }
}

/// Gives `path` exactly `mode`; in the protected layout also the owner `root` and the
/// group `canhazgpu`.
fn set_owner_and_mode(path: &Path, layout: Layout, mode: u32) -> io::Result<()> {
    if layout == Layout::Protected {
        let gid = crate::privilege::group_gid()
            .ok_or_else(|| io::Error::other("there is no group canhazgpu"))?;
        std::os::unix::fs::chown(path, Some(0), Some(gid.as_raw()))?;
    }
    fs::set_permissions(path, Permissions::from_mode(mode))
}

/// Gives an existing store the layout (`admin`): the shared one adds what is missing
/// (keeping a sticky bit, as on /tmp); the protected one sets owner, group and modes
/// of the directory, the database and its side files. Says whether anything changed.
pub(super) fn apply_layout(path: &Path, layout: Layout) -> io::Result<bool> {
    let dir = parent_of(path);
    match layout {
        Layout::Shared => {
            let dir_changed = add_permissions(dir, layout.dir_mode())?;
            Ok(add_permissions(path, layout.file_mode())? | dir_changed)
        }
        Layout::Protected => {
            let gid = crate::privilege::group_gid()
                .ok_or_else(|| io::Error::other("there is no group canhazgpu"))?;
            let mut changed = false;
            let mut targets = vec![(dir.to_path_buf(), layout.dir_mode())];
            targets.extend(
                ["", "-wal", "-shm", "-journal"]
                    .into_iter()
                    .map(|suffix| (side_file(path, suffix), layout.file_mode()))
                    .filter(|(file, _)| file.exists()),
            );
            for (target, mode) in targets {
                let meta = fs::metadata(&target)?;
                if meta.uid() != 0 || meta.gid() != gid.as_raw() || meta.mode() & 0o7777 != mode {
                    set_owner_and_mode(&target, layout, mode)?;
                    changed = true;
                }
            }
            Ok(changed)
        }
    }
}

fn side_file(path: &Path, suffix: &str) -> std::path::PathBuf {
    let mut side = path.as_os_str().to_owned();
    side.push(suffix);
    side.into()
}

/// Gives the `-wal` and `-shm` files this process created the database's
/// permissions (every user's, or the group's). SQLite gives a new side file the
/// database's mode, but only when it is still empty just after creating it: when
/// another process grew it first, the file keeps the creator's umask (say 0644) and
/// nobody else can write until it is gone. Its owner can always fix that; others
/// retry (`with_access_retries`) until it has.
pub(super) fn share_side_files(path: &Path) {
    let me = nix::unistd::geteuid().as_raw();
    let Ok(database) = fs::metadata(path) else {
        return;
    };
    let wanted = database.permissions().mode() & 0o666;
    for suffix in ["-wal", "-shm"] {
        let side = side_file(path, suffix);
        if let Ok(meta) = fs::metadata(&side)
            && meta.uid() == me
            && meta.permissions().mode() & wanted != wanted
        {
            let _ = add_permissions(&side, wanted);
        }
    }
}
