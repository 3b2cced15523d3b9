//! The database file and its directory: creating them usable by every user, and the
//! messages for a store that cannot be opened.
//!
//! Trust model: every user must be able to reserve and release GPUs, so the store is
//! shared-writable. When canhazgpu creates the store's directory it makes it mode
//! 0777 (no sticky bit: SQLite must be able to delete another user's `-wal`/`-shm`
//! files), and the database file 0666; SQLite gives its `-wal`, `-shm` and journal
//! files the database file's mode. Any local user can therefore also edit the file by
//! hand: canhazgpu coordinates cooperating users, it does not enforce quotas against
//! hostile ones.

use std::fs::{self, OpenOptions, Permissions};
use std::io;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;
use std::sync::atomic::{AtomicU32, Ordering};

use crate::error::Error;

/// The one line a user sees when the shared store is not usable for them: what is
/// wrong, and who can fix it.
pub(super) fn access_denied(path: &Path) -> Error {
    Error::Store(format!(
        "cannot open the canhazgpu store at {}: permission denied ({}) - ask root to run \
         'canhazgpu admin --gpus <count>', which creates or repairs it for every user, or \
         use --state-dir DIR",
        path.display(),
        why_denied(path)
    ))
}

fn why_denied(path: &Path) -> String {
    let described = |what: &str, path: &Path, wanted: u32| {
        let meta = fs::metadata(path).ok()?;
        let mode = meta.permissions().mode() & 0o7777;
        (mode & wanted != wanted).then(|| {
            let owner = nix::unistd::User::from_uid(meta.uid().into())
                .ok()
                .flatten()
                .map_or_else(|| meta.uid().to_string(), |user| user.name);
            format!("{what} is mode {mode:04o}, owned by {owner}, not writable by every user")
        })
    };
    let dir = path
        .parent()
        .filter(|dir| !dir.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    if !path.exists() {
        return "there is no store yet and you may not create one".into();
    }
    described("its directory", dir, 0o777)
        .or_else(|| described("the file", path, 0o666))
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
pub(super) fn add_permissions(path: &Path, bits: u32) -> io::Result<bool> {
    let mode = fs::metadata(path)?.permissions().mode();
    if mode & bits == bits {
        return Ok(false);
    }
    fs::set_permissions(path, Permissions::from_mode((mode & 0o7777) | bits))?;
    Ok(true)
}

/// Creates the directory (0777) and an empty database file (0666) where missing. The
/// file is created under a temporary name and linked into place, so no other process
/// can open it (and create `-wal`/`-shm` from its mode) before it is world-writable.
pub(super) fn create_shared(path: &Path) -> io::Result<()> {
    if path.exists() {
        return Ok(());
    }
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    if !dir.is_dir() {
        if let Some(above) = dir.parent() {
            fs::create_dir_all(above)?;
        }
        match fs::create_dir(dir) {
            Ok(()) => fs::set_permissions(dir, Permissions::from_mode(0o777))?,
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
        .mode(0o666)
        .open(&staging)?;
    let published = fs::set_permissions(&staging, Permissions::from_mode(0o666))
        .and_then(|()| fs::hard_link(&staging, path));
    fs::remove_file(&staging)?;
    match published {
        Err(err) if err.kind() == io::ErrorKind::AlreadyExists => Ok(()),
        other => other,
    }
}

/// Makes the `-wal` and `-shm` files this process created usable by every user.
/// SQLite gives a new side file the database's mode, but only when it is still empty
/// just after creating it: when another process grew it first, the file keeps the
/// creator's umask (say 0644) and nobody else can write until it is gone. Its owner
/// can always fix that; others retry (`with_access_retries`) until it has.
pub(super) fn share_side_files(path: &Path) {
    let me = nix::unistd::geteuid().as_raw();
    for suffix in ["-wal", "-shm"] {
        let mut side = path.as_os_str().to_owned();
        side.push(suffix);
        let side = Path::new(&side);
        if let Ok(meta) = fs::metadata(side)
            && meta.uid() == me
            && meta.permissions().mode() & 0o666 != 0o666
        {
            let _ = add_permissions(side, 0o666);
        }
    }
}
