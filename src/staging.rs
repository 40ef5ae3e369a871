//! Staging folders beside an output (`.NAME.expanse-tmp-PID`): everything is written there and moved
//! into place at the end, so a failure or a kill never leaves a partial output under its real name;
//! folders left by killed processes are removed by the next run, and finished files get the mode
//! any file the user creates gets (the umask's).

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use crate::error::{Error, Result};

/// Folders to delete if the process is interrupted: staging folders being written and, during an
/// output replacement, the old output moved aside.
static PENDING: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

pub(crate) fn pending() -> std::sync::MutexGuard<'static, Vec<PathBuf>> {
    // A panic while holding the lock leaves a valid Vec behind; keep using it.
    PENDING.lock().unwrap_or_else(|e| e.into_inner())
}

/// Installs a Ctrl-C handler that removes any partial output and exits with 130. Call once from
/// the binary; a library user with its own handler can skip it (errors still clean up).
pub fn install_interrupt_cleanup() {
    let _ = ctrlc::set_handler(|| {
        for dir in pending().iter() {
            let _ = std::fs::remove_dir_all(dir);
        }
        eprintln!("interrupted: partial output removed");
        std::process::exit(130);
    });
}

const TMP: &str = ".expanse-tmp-";
const OLD: &str = ".expanse-old-";

/// The pid in a staging or set-aside folder name of ours (`.NAME.expanse-tmp-PID`, `.NAME.expanse-old-PID`).
fn owner_pid(file_name: &str) -> Option<u32> {
    if !file_name.starts_with('.') {
        return None;
    }
    let at = file_name.rfind(TMP).map(|i| i + TMP.len()).or_else(|| file_name.rfind(OLD).map(|i| i + OLD.len()))?;
    file_name[at..].parse().ok()
}

/// Whether process `pid` still exists (on other systems: assumed alive, so nothing is removed).
fn alive(pid: u32) -> bool {
    #[cfg(unix)]
    {
        let Ok(pid) = libc::pid_t::try_from(pid) else { return false };
        // SAFETY: signal 0 only checks that the process exists and may be signalled; nothing is sent.
        let rc = unsafe { libc::kill(pid, 0) };
        // EPERM: it exists but belongs to someone else.
        rc == 0 || std::io::Error::last_os_error().raw_os_error() != Some(libc::ESRCH)
    }
    #[cfg(not(unix))]
    {
        let _ = pid;
        true
    }
}

/// Removes staging folders in `parent` whose process is gone (a killed `expand` or `logits`), and
/// returns them. A folder of a live process, ours included, is left alone.
pub fn remove_stale(parent: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(parent) else { return Vec::new() };
    let me = std::process::id();
    let mut removed = Vec::new();
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name.to_str().and_then(owner_pid) else { continue };
        let is_dir = entry.file_type().is_ok_and(|t| t.is_dir());
        if is_dir && pid != me && !alive(pid) && std::fs::remove_dir_all(entry.path()).is_ok() {
            removed.push(entry.path());
        }
    }
    removed
}

/// The mode a new file gets from `creat(0666)` under this process's umask.
#[cfg(unix)]
fn default_file_mode() -> u32 {
    use std::sync::OnceLock;
    static MODE: OnceLock<u32> = OnceLock::new();
    *MODE.get_or_init(|| {
        // SAFETY: umask only swaps the process's file-creation mask; it is put back at once. No file
        // is created in between on this thread, and expanse creates files from one thread only.
        let mask = unsafe {
            let m = libc::umask(0o022);
            libc::umask(m);
            m
        };
        0o666 & !(mask as u32)
    })
}

/// Gives `path` the mode a file the user creates gets: the safetensors writer's temporary files are
/// created 0600 and keep that mode when renamed into place.
pub fn set_default_mode(path: &Path) -> Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(default_file_mode())).map_err(|e| Error::io(path, e))?;
    }
    #[cfg(not(unix))]
    let _ = path;
    Ok(())
}

/// `out`'s parent folder (`.` for a bare name) and its file name.
pub fn split_out(out: &Path, flag: &str) -> Result<(PathBuf, String)> {
    let name = out
        .file_name()
        .and_then(|n| n.to_str())
        .filter(|n| *n != "." && *n != "..")
        .ok_or_else(|| Error::flag(flag, format!("{}: expected a path ending in a name", out.display())))?
        .to_string();
    let parent = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    Ok((parent, name))
}

/// The folder everything is written into, beside the output; removed unless committed.
pub struct Staging {
    pub path: PathBuf,
    parent: PathBuf,
    name: String,
    committed: bool,
}

impl Staging {
    /// A fresh staging folder for output `name` in `parent`, after removing stale ones there.
    pub fn create(parent: &Path, name: &str) -> Result<Staging> {
        remove_stale(parent);
        let path = parent.join(format!(".{name}{TMP}{}", std::process::id()));
        if path.exists() {
            // Left by an earlier run of this very pid (pids are reused): it is ours to replace.
            std::fs::remove_dir_all(&path).map_err(|e| Error::io(&path, e))?;
        }
        std::fs::create_dir(&path).map_err(|e| Error::io(&path, e))?;
        pending().push(path.clone());
        Ok(Staging { path, parent: parent.to_path_buf(), name: name.to_string(), committed: false })
    }

    /// Moves the staged entry `item` (the whole folder when `None`) to `out`, replacing what is
    /// there (the caller decided that may be replaced).
    pub fn commit(mut self, item: Option<&str>, out: &Path) -> Result<()> {
        let staged = item.map_or_else(|| self.path.clone(), |i| self.path.join(i));
        let mut list = pending();
        let old = if item.is_none() && out.exists() {
            let old = self.parent.join(format!(".{}{OLD}{}", self.name, std::process::id()));
            std::fs::rename(out, &old).map_err(|e| Error::io(out, e))?;
            Some(old)
        } else {
            None
        };
        // A file is replaced by the rename itself (atomically).
        if let Err(e) = std::fs::rename(&staged, out) {
            if let Some(old) = &old {
                let _ = std::fs::rename(old, out);
            }
            return Err(Error::io(out, e));
        }
        if item.is_none() {
            self.committed = true;
            list.retain(|p| p != &self.path);
        }
        if let Some(old) = old {
            list.push(old.clone());
            drop(list);
            let _ = std::fs::remove_dir_all(&old);
            pending().retain(|p| p != &old);
        }
        Ok(())
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        if !self.committed {
            let _ = std::fs::remove_dir_all(&self.path);
            pending().retain(|p| p != &self.path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owner_pids_are_read_from_our_names_only() {
        assert_eq!(owner_pid(".out.expanse-tmp-123"), Some(123));
        assert_eq!(owner_pid(".a.b.expanse-old-9"), Some(9));
        assert_eq!(owner_pid("out.expanse-tmp-123"), None);
        assert_eq!(owner_pid(".out.expanse-tmp-x"), None);
        assert_eq!(owner_pid(".tmpA1b2"), None);
    }
}
