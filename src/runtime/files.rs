//! Files only keyward's user may read: the data directory holds the admin
//! token, the embedded token's PINs and, in the database, hook secrets; an
//! agent's credential directory holds its key.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;

/// Files and directories the process creates from now on are its owner's
/// alone (umask 077).
pub fn private_umask() {
    rustix::process::umask(rustix::fs::Mode::from_raw_mode(0o077));
}

/// Creates a directory (and parents) readable by the owner only.
pub fn private_dir(path: &Path) -> std::io::Result<()> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(path)
}

/// Refuses a file or directory that group or others can reach: the data
/// directory holds the admin token, the embedded token's PINs and, in the
/// database, hook secrets. `None` when it is private or absent.
pub fn shared_with_others(path: &Path) -> std::io::Result<Option<String>> {
    let meta = match fs::metadata(path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 == 0 {
        return Ok(None);
    }
    let fix = if meta.is_dir() {
        "chmod 700"
    } else {
        "chmod 600"
    };
    Ok(Some(format!(
        "{} is open to group or others (mode {mode:o}): {fix} it",
        path.display()
    )))
}

/// Writes a new file readable by the owner only; fails if it exists.
pub fn write_private_file(path: &Path, contents: &[u8]) -> std::io::Result<()> {
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(contents)?;
    f.sync_all()
}
