//! Outputs (`expand --out`, `logits --out`, chat `/save`) are checked before any work, written in a
//! staging folder beside them (`.NAME.expanse-staging-PID`) and published by a rename that never
//! replaces anything but what was checked; the next run recovers what a killed one left.
//!
//! Inside a staging folder: `out` (the output being written), `name` (the output's file name: the
//! folder's own name may be shortened) and, only while an output is being replaced, `old` (the
//! output it replaces, moved aside). So a leftover is read unambiguously: `old` beside `out` means
//! the run died between its two renames and `old` goes back; anything else is discarded.

use std::fmt::Display;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use crate::error::{Error, Result};

/// Staging folders of this process, to delete if it is interrupted.
static PENDING: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

pub(crate) fn pending() -> std::sync::MutexGuard<'static, Vec<PathBuf>> {
    // A panic while holding the lock leaves a valid Vec behind; keep using it.
    PENDING.lock().unwrap_or_else(|e| e.into_inner())
}

/// Installs a Ctrl-C handler that removes any partial output and exits with 130. Call once from
/// the binary; a library user with its own handler can skip it (errors still clean up).
pub fn install_interrupt_cleanup() {
    let _ = ctrlc::set_handler(|| {
        // Waits for a publish under way: `commit` holds the lock across its renames.
        for dir in pending().iter() {
            discard(dir);
        }
        eprintln!("interrupted: partial output removed");
        std::process::exit(130);
    });
}

/// Test hook: `hold:PATH` makes a run wait (up to a minute) for PATH to exist before it publishes,
/// so two runs can be made to race; `kill` kills the process between the two renames that replace
/// an output, as a crash there would.
pub const PUBLISH_HOOK_ENV: &str = "EXPANSE_TEST_PUBLISH";

const STAGING: &str = ".expanse-staging-";
/// The names expanse used before staging folders held `old`: `.NAME.expanse-tmp-PID` (an output being
/// written) and `.NAME.expanse-old-PID` (the output it replaced, during the swap).
const LEGACY_TMP: &str = ".expanse-tmp-";
const LEGACY_OLD: &str = ".expanse-old-";
const OUT: &str = "out";
const OLD: &str = "old";
const NAME: &str = "name";
/// Longer output names are shortened in the staging folder's name (start and hash), which must fit
/// the file system's name limit (255 bytes on most, 143 on eCryptfs) whatever the output is called.
const LONGEST_NAME: usize = 64;

/// Whether the output is a file (`logits`, `/save`) or a folder (`expand`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutKind {
    File,
    Folder,
}

/// What an entry is, to tell whether the one replaced is still the one checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Identity(u64, u64);

fn identity(meta: &std::fs::Metadata) -> Identity {
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        Identity(meta.dev(), meta.ino())
    }
    #[cfg(not(unix))]
    {
        let _ = meta;
        Identity(0, 0)
    }
}

/// An output path the user named, checked: its folder exists and is writable, it is none of the
/// run's inputs, and what is there now (if anything) may be replaced. Publishing replaces exactly
/// that, and nothing that appears in the meantime.
#[derive(Debug, Clone)]
pub struct Target {
    path: PathBuf,
    flag: String,
    parent: PathBuf,
    name: String,
    kind: OutKind,
    /// What was at `path` when checked (the entry itself, not what a symlink points to).
    found: Option<Identity>,
    /// A folder replaced without --force must still be empty when it is replaced.
    must_be_empty: bool,
}

impl Target {
    /// Checks `out` (given by `flag`) before any work. `force` lets a folder output replace a
    /// non-empty folder; `inputs` are the canonical paths the run reads
    /// ([`crate::engine::Source::input_paths`]): `out` may not be one, hold one or lie inside one.
    /// Leftovers of killed runs in `out`'s folder are recovered first.
    pub fn check(out: &Path, flag: &str, kind: OutKind, force: bool, inputs: &[PathBuf]) -> Result<Target> {
        let (parent, name) = split_out(out, flag)?;
        let target = Target { path: out.to_path_buf(), flag: flag.into(), parent, name, kind, found: None, must_be_empty: false };
        target.check_parent()?;
        for note in recover(&target.parent) {
            eprintln!("note: {note}");
        }
        target.refuse_inputs(inputs)?;
        target.inspect_existing(force)
    }

    /// The path as the user gave it.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The folder the output goes in (`.` for a bare name).
    pub fn parent(&self) -> &Path {
        &self.parent
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// `FLAG: PATH` followed by `rest` (which starts with `:` or a space).
    fn error(&self, rest: impl Display) -> Error {
        Error::flag(&self.flag, format!("{}{rest}", self.path.display()))
    }

    fn check_parent(&self) -> Result<()> {
        let parent = self.parent.display();
        if !self.parent.is_dir() {
            return Err(self.error(format_args!(": parent folder {parent} does not exist or is not a folder")));
        }
        writable(&self.parent).map_err(|e| self.error(format_args!(": cannot write in folder {parent}: {e}")))
    }

    /// Refuses an output that is, holds or lies inside one of `inputs`: writing it would destroy
    /// what the run reads (or, for a model's folder, mix the output into it).
    fn refuse_inputs(&self, inputs: &[PathBuf]) -> Result<()> {
        match clash(&self.path, inputs) {
            Some(how) => {
                let what = "the model, its expansion YAML or chat template";
                Err(self.error(format_args!(" {how}, which this run reads ({what}); choose another path")))
            }
            None => Ok(()),
        }
    }

    /// Records what is at the path now, refusing what this kind of output may not replace.
    fn inspect_existing(mut self, force: bool) -> Result<Target> {
        let link = match std::fs::symlink_metadata(&self.path) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(self),
            Err(e) => return Err(self.error(format_args!(": {e}"))),
        };
        // A rename replaces the entry itself; what it is, is what a symlink points to.
        let meta = std::fs::metadata(&self.path).unwrap_or_else(|_| link.clone());
        match self.kind {
            OutKind::File if meta.is_dir() => return Err(self.error(" is a folder, expected a file path")),
            OutKind::File if !meta.is_file() => return Err(self.error(format_args!(" is a {}, expected a regular file", crate::loader::file_kind(&meta)))),
            OutKind::Folder if !meta.is_dir() => return Err(self.error(" exists and is not a folder")),
            OutKind::Folder => {
                let empty = is_empty(&self.path).map_err(|e| self.error(format_args!(": {e}")))?;
                if !empty && !force {
                    return Err(self.error(" is not empty; pass --force to replace it"));
                }
                self.must_be_empty = !force;
            }
            OutKind::File => {}
        }
        self.found = Some(identity(&link));
        Ok(self)
    }
}

/// How writing `path` would touch one of `inputs` (canonical paths a run reads): `is X`, `holds X`
/// or `lies inside X`; None when it would not.
pub fn clash(path: &Path, inputs: &[PathBuf]) -> Option<String> {
    let target = placed(path)?;
    // The input itself when it is the output, else the first met (a folder before its files).
    let exact = inputs.iter().find(|i| **i == target);
    let input = exact.or_else(|| inputs.iter().find(|i| i.starts_with(&target) || target.starts_with(i)))?;
    let how = if *input == target {
        "is"
    } else if input.starts_with(&target) {
        "holds"
    } else {
        "lies inside"
    };
    Some(format!("{how} {}", input.display()))
}

/// `path` made canonical as far as it exists, so an output not written yet (or a symlink, which is
/// followed) is placed too. None for a path that ends in `..`.
fn placed(path: &Path) -> Option<PathBuf> {
    if let Ok(p) = path.canonicalize() {
        return Some(p);
    }
    let parent = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    Some(placed(parent)?.join(path.file_name()?))
}

fn is_empty(dir: &Path) -> std::io::Result<bool> {
    Ok(std::fs::read_dir(dir)?.next().is_none())
}

/// Whether this process may create entries in `dir` (checked early, so a read-only folder is
/// reported before the model loads, not after).
fn writable(dir: &Path) -> std::io::Result<()> {
    #[cfg(unix)]
    {
        let c = c_path(dir)?;
        // SAFETY: `c` is a NUL-terminated path that outlives the call; access only reads it.
        if unsafe { libc::access(c.as_ptr(), libc::W_OK | libc::X_OK) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    #[cfg(not(unix))]
    let _ = dir;
    Ok(())
}

#[cfg(unix)]
fn c_path(p: &Path) -> std::io::Result<std::ffi::CString> {
    use std::os::unix::ffi::OsStrExt;
    std::ffi::CString::new(p.as_os_str().as_bytes()).map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidInput, "path contains a NUL byte"))
}

/// Renames `from` to `to` only if nothing is at `to` (else `AlreadyExists`), atomically where the
/// system can (Linux `renameat2(RENAME_NOREPLACE)`).
pub fn rename_noreplace(from: &Path, to: &Path) -> std::io::Result<()> {
    #[cfg(target_os = "linux")]
    {
        let (f, t) = (c_path(from)?, c_path(to)?);
        // SAFETY: both paths are NUL-terminated and outlive the call, which only reads them.
        let rc = unsafe { libc::syscall(libc::SYS_renameat2, libc::AT_FDCWD, f.as_ptr(), libc::AT_FDCWD, t.as_ptr(), libc::RENAME_NOREPLACE) };
        if rc == 0 {
            return Ok(());
        }
        let e = std::io::Error::last_os_error();
        // ENOSYS: an old kernel; EINVAL: a file system without the flag. Both take the fallback.
        if !matches!(e.raw_os_error(), Some(libc::ENOSYS | libc::EINVAL)) {
            return Err(e);
        }
    }
    rename_noreplace_fallback(from, to)
}

/// Without an atomic no-replace rename: a file is hard-linked (which never replaces) then unlinked;
/// a folder is renamed after checking `to` is free, and rename(2) never replaces a non-empty folder,
/// so at worst an empty folder created in that instant is replaced.
fn rename_noreplace_fallback(from: &Path, to: &Path) -> std::io::Result<()> {
    let taken = || std::io::Error::new(std::io::ErrorKind::AlreadyExists, "already exists");
    if std::fs::symlink_metadata(to).is_ok() {
        return Err(taken());
    }
    if !std::fs::symlink_metadata(from)?.is_dir() {
        match std::fs::hard_link(from, to) {
            Ok(()) => return std::fs::remove_file(from),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => return Err(e),
            // No hard links on this file system: the checked rename below.
            Err(_) => {}
        }
    }
    std::fs::rename(from, to)
}

/// `out`'s parent folder (`.` for a bare name) and its file name.
pub fn split_out(out: &Path, flag: &str) -> Result<(PathBuf, String)> {
    if out.as_os_str().is_empty() {
        return Err(Error::flag(flag, "the path is empty"));
    }
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

/// The staging folder's name for output `name` of process `pid`: short enough for any file system.
fn staging_name(name: &str, pid: u32) -> String {
    use std::hash::{Hash, Hasher};
    if name.len() <= LONGEST_NAME {
        return format!(".{name}{STAGING}{pid}");
    }
    let mut end = LONGEST_NAME - 24;
    while !name.is_char_boundary(end) {
        end -= 1;
    }
    // Two long names with the same start differ in the hash.
    let mut h = std::hash::DefaultHasher::new();
    name.hash(&mut h);
    format!(".{}~{:016x}{STAGING}{pid}", &name[..end], h.finish())
}

/// The folder an output is written in, beside it; removed unless committed.
pub struct Staging {
    path: PathBuf,
    target: Target,
    committed: bool,
}

impl Staging {
    /// A fresh staging folder for `target`, with an empty `out` folder in it for a folder output.
    pub fn create(target: &Target) -> Result<Staging> {
        let path = target.parent.join(staging_name(&target.name, std::process::id()));
        {
            // Registered under the lock, so recovery never takes a live staging folder for a leftover.
            let mut list = pending();
            let msg = |e| target.error(format_args!(": cannot create a staging folder in {}: {e}", target.parent.display()));
            std::fs::create_dir(&path).map_err(msg)?;
            list.push(path.clone());
        }
        let staging = Staging { path, target: target.clone(), committed: false };
        let name = staging.path.join(NAME);
        std::fs::write(&name, &target.name).map_err(|e| staging.user_error(Error::io(&name, e)))?;
        if target.kind == OutKind::Folder {
            std::fs::create_dir(staging.out()).map_err(|e| staging.user_error(Error::io(staging.out(), e)))?;
        }
        Ok(staging)
    }

    /// Where the output is written: a file or a folder, as the target's kind says.
    pub fn out(&self) -> PathBuf {
        self.path.join(OUT)
    }

    /// `e` as the user should read it: a path in the staging folder is named as the output's path
    /// (`--out x/model.safetensors: No space left on device`), not as the staging folder's.
    pub fn user_error(&self, e: Error) -> Error {
        let (path, cause) = match &e {
            Error::Io { path, source } => (path, source.to_string()),
            Error::BadFile { path, msg } => (path, msg.clone()),
            _ => return e,
        };
        let Ok(inside) = path.strip_prefix(&self.path) else { return e };
        let shown = match inside.strip_prefix(OUT) {
            Ok(rest) if !rest.as_os_str().is_empty() => self.target.path.join(rest),
            _ => self.target.path.clone(),
        };
        Error::flag(&self.target.flag, format!("{}: {cause}", shown.display()))
    }

    /// Publishes the output: it takes the target's place if nothing is there, or replaces exactly
    /// what the check found there. Anything else (another run's output, a folder that filled up)
    /// is left alone and this run fails, naming the flag and path.
    pub fn commit(mut self) -> Result<()> {
        hold_hook();
        // Ctrl-C's cleanup waits while the output is swapped: it must not run between the renames.
        let mut list = pending();
        let result = match (self.target.found, self.target.kind) {
            (None, _) => rename_noreplace(&self.out(), &self.target.path).map_err(|e| self.publish_error(e)),
            // A file is replaced by the rename itself, atomically, if it is still the one checked.
            (Some(found), OutKind::File) => {
                let same = std::fs::symlink_metadata(&self.target.path).is_ok_and(|m| identity(&m) == found);
                if same {
                    std::fs::rename(self.out(), &self.target.path).map_err(|e| self.target.error(format_args!(": {e}")))
                } else {
                    Err(self.target.error(" changed while this run was writing its replacement; nothing was replaced"))
                }
            }
            (Some(found), OutKind::Folder) => self.swap(found),
        };
        if result.is_ok() {
            self.committed = true;
            list.retain(|p| p != &self.path);
        }
        drop(list);
        result?;
        // What is left is the output replaced, if any, which the check allowed replacing.
        let _ = std::fs::remove_dir_all(&self.path);
        Ok(())
    }

    /// Replaces the folder the check found: moved aside into the staging folder, confirmed to be
    /// the one checked, then the new one published; on any failure the old one is put back.
    fn swap(&self, found: Identity) -> Result<()> {
        let (out, old) = (&self.target.path, self.path.join(OLD));
        std::fs::rename(out, &old).map_err(|e| self.target.error(format_args!(": cannot move it aside to replace it: {e}")))?;
        kill_hook();
        let same = std::fs::symlink_metadata(&old).is_ok_and(|m| identity(&m) == found);
        let still_empty = !self.target.must_be_empty || is_empty(&old).unwrap_or(false);
        let published = if same && still_empty {
            rename_noreplace(&self.out(), out).map_err(|e| self.publish_error(e))
        } else {
            Err(self.target.error(" changed while this run was writing its replacement; nothing was replaced"))
        };
        if published.is_err() {
            if let Err(e) = rename_noreplace(&old, out) {
                return Err(self.target.error(format_args!(": could not be put back after a failed replacement ({e}); it is kept in {}", old.display())));
            }
        }
        published
    }

    fn publish_error(&self, e: std::io::Error) -> Error {
        if std::fs::symlink_metadata(&self.target.path).is_ok() {
            return self.target.error(" appeared while this run was writing it (another run?); it was left alone and this run's output discarded");
        }
        self.target.error(format_args!(": {e}"))
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        if !self.committed {
            discard(&self.path);
            pending().retain(|p| p != &self.path);
        }
    }
}

/// Removes a staging folder, unless it holds an output that was being replaced and could not be
/// put back: that is the user's, and recovery (or the user) puts it back.
fn discard(dir: &Path) {
    if std::fs::symlink_metadata(dir.join(OLD)).is_err() {
        let _ = std::fs::remove_dir_all(dir);
    }
}

fn hook() -> Option<String> {
    std::env::var(PUBLISH_HOOK_ENV).ok()
}

fn hold_hook() {
    let Some(path) = hook().and_then(|h| h.strip_prefix("hold:").map(PathBuf::from)) else { return };
    let started = std::time::Instant::now();
    while !path.exists() && started.elapsed() < std::time::Duration::from_secs(60) {
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

fn kill_hook() {
    if hook().as_deref() == Some("kill") {
        #[cfg(unix)]
        // SAFETY: kill with this process's own pid and SIGKILL has no memory effects.
        unsafe {
            libc::kill(libc::getpid(), libc::SIGKILL);
        }
        std::process::abort();
    }
}

/// Whether process `pid` still exists (on other systems: assumed alive, so nothing is recovered).
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

/// Whether the folder `dir` of process `pid` was left by a run that is gone. Our own pid counts as
/// gone for folders this process does not have under way (an earlier process had the same pid).
fn abandoned(pid: u32, dir: &Path) -> bool {
    if pid == std::process::id() {
        return !pending().iter().any(|p| p == dir);
    }
    !alive(pid)
}

/// One of our folders, by its name.
#[derive(Debug, PartialEq)]
enum Leftover {
    Staging(u32),
    /// An earlier expanse's staging folder of output `.0`.
    LegacyTmp(String, u32),
    /// An earlier expanse's set-aside output `.0`, during its replacement.
    LegacyOld(String, u32),
}

impl Leftover {
    fn parse(file_name: &str) -> Option<Leftover> {
        let rest = file_name.strip_prefix('.')?;
        let split = |marker: &str| rest.rfind(marker).map(|at| (rest[..at].to_string(), rest[at + marker.len()..].parse::<u32>()));
        if let Some((_, pid)) = split(STAGING) {
            return pid.ok().map(Leftover::Staging);
        }
        if let Some((name, pid)) = split(LEGACY_TMP) {
            return pid.ok().map(|p| Leftover::LegacyTmp(name, p));
        }
        let (name, pid) = split(LEGACY_OLD)?;
        pid.ok().map(|p| Leftover::LegacyOld(name, p))
    }
}

/// Recovers what runs that are gone (killed, crashed) left in `parent`: an output they were
/// replacing is put back, partial outputs are removed. Folders of live runs are left alone.
/// Returns what the user should hear about.
pub fn recover(parent: &Path) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(parent) else { return Vec::new() };
    let mut notes = Vec::new();
    for entry in entries.flatten() {
        let Some(left) = entry.file_name().to_str().and_then(Leftover::parse) else { continue };
        let dir = entry.path();
        let pid = match &left {
            Leftover::Staging(p) | Leftover::LegacyTmp(_, p) | Leftover::LegacyOld(_, p) => *p,
        };
        if !entry.file_type().is_ok_and(|t| t.is_dir()) || !abandoned(pid, &dir) {
            continue;
        }
        let note = match left {
            Leftover::Staging(_) => recover_staging(parent, &dir),
            Leftover::LegacyTmp(name, pid) => {
                // With its set-aside output beside it, it is dealt with there.
                if !parent.join(format!(".{name}{LEGACY_OLD}{pid}")).is_dir() {
                    let _ = std::fs::remove_dir_all(&dir);
                }
                None
            }
            Leftover::LegacyOld(name, pid) => recover_legacy_old(parent, &dir, &name, pid),
        };
        notes.extend(note);
    }
    notes
}

fn present(p: &Path) -> bool {
    std::fs::symlink_metadata(p).is_ok()
}

/// A staging folder whose run is gone: `old` beside `out` means the run died between moving the
/// output aside and publishing its replacement, so `old` goes back; otherwise nothing in it is the
/// only copy of anything the user had (`old` alone: the replacement was published).
fn recover_staging(parent: &Path, dir: &Path) -> Option<String> {
    let old = dir.join(OLD);
    if !present(&old) || !present(&dir.join(OUT)) {
        let _ = std::fs::remove_dir_all(dir);
        return None;
    }
    let name = std::fs::read_to_string(dir.join(NAME)).ok().filter(|n| is_plain_name(n));
    let Some(name) = name else {
        return Some(format!(
            "{} holds an output an interrupted expanse run was replacing, under a name it could not read; move it back by hand",
            old.display()
        ));
    };
    put_back(&old, &parent.join(name), dir)
}

/// An earlier expanse's set-aside output: put back when its place is free (its staging folder, the
/// unpublished replacement, is then removed). Otherwise it may be the only copy of the user's
/// output, or a superseded one: which, nothing here can tell, so it is kept and the user told.
fn recover_legacy_old(parent: &Path, old: &Path, name: &str, pid: u32) -> Option<String> {
    let target = parent.join(name);
    if present(&target) {
        // The replacement beside it was never published: it is no one's only copy.
        let _ = std::fs::remove_dir_all(parent.join(format!(".{name}{LEGACY_TMP}{pid}")));
        return Some(format!(
            "{} holds what {} held before an interrupted expanse run replaced it; delete it once {} is what you want",
            old.display(),
            target.display(),
            target.display()
        ));
    }
    put_back(old, &target, &parent.join(format!(".{name}{LEGACY_TMP}{pid}")))
}

/// Moves `old` back to `target` (never over anything) and then removes `then_remove`.
fn put_back(old: &Path, target: &Path, then_remove: &Path) -> Option<String> {
    match rename_noreplace(old, target) {
        Ok(()) => {
            let _ = std::fs::remove_dir_all(then_remove);
            Some(format!("restored {}: an expanse run was interrupted while replacing it", target.display()))
        }
        Err(e) => Some(format!(
            "{} holds what {} held before an interrupted expanse run; it could not be put back ({e}): move it back by hand",
            old.display(),
            target.display()
        )),
    }
}

fn is_plain_name(n: &str) -> bool {
    !n.is_empty() && n != "." && n != ".." && !n.contains(['/', '\\', '\0'])
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

#[cfg(test)]
mod tests {
    use super::*;

    fn dead_pid() -> u32 {
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id();
        child.wait().unwrap();
        pid
    }

    fn names(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
        v.sort();
        v
    }

    /// A leftover staging folder of process `pid` for output `out`, holding `parts` (`out`, `old`).
    fn leftover(parent: &Path, out: &str, pid: u32, parts: &[&str]) -> PathBuf {
        let dir = parent.join(staging_name(out, pid));
        std::fs::create_dir(&dir).unwrap();
        std::fs::write(dir.join(NAME), out).unwrap();
        for part in parts {
            std::fs::create_dir(dir.join(part)).unwrap();
            std::fs::write(dir.join(part).join("what"), part).unwrap();
        }
        dir
    }

    #[test]
    fn leftovers_are_read_from_our_names_only() {
        assert_eq!(Leftover::parse(".out.expanse-staging-123"), Some(Leftover::Staging(123)));
        assert_eq!(Leftover::parse(".out.expanse-tmp-123"), Some(Leftover::LegacyTmp("out".into(), 123)));
        assert_eq!(Leftover::parse(".a.b.expanse-old-9"), Some(Leftover::LegacyOld("a.b".into(), 9)));
        for other in ["out.expanse-tmp-123", ".out.expanse-tmp-x", ".tmpA1b2", ".out.expanse-staging-"] {
            assert_eq!(Leftover::parse(other), None, "{other}");
        }
    }

    #[test]
    fn staging_names_fit_any_file_system_whatever_the_output_is_called() {
        assert_eq!(staging_name("out", 7), ".out.expanse-staging-7");
        let a = format!("{}a", "é".repeat(127));
        let b = format!("{}b", "é".repeat(127));
        let (sa, sb) = (staging_name(&a, u32::MAX), staging_name(&b, u32::MAX));
        assert!(sa.len() <= 100 && sb.len() <= 100, "{} bytes", sa.len());
        assert_ne!(sa, sb, "names that differ only at the end");
        assert_eq!(Leftover::parse(&sa), Some(Leftover::Staging(u32::MAX)));
    }

    #[test]
    fn no_replace_renames_never_replace() {
        let tmp = tempfile::tempdir().unwrap();
        let p = |n: &str| tmp.path().join(n);
        std::fs::write(p("a"), "a").unwrap();
        std::fs::write(p("b"), "b").unwrap();
        std::fs::create_dir(p("d")).unwrap();
        std::fs::create_dir(p("e")).unwrap();
        for rename in [rename_noreplace, rename_noreplace_fallback] {
            for (from, to) in [("a", "b"), ("d", "e"), ("a", "e"), ("d", "b")] {
                let e = rename(&p(from), &p(to)).unwrap_err();
                assert_eq!(e.kind(), std::io::ErrorKind::AlreadyExists, "{from} → {to}: {e}");
            }
            assert_eq!(std::fs::read_to_string(p("b")).unwrap(), "b");
            rename(&p("a"), &p("c")).unwrap();
            rename(&p("c"), &p("a")).unwrap();
            rename(&p("d"), &p("f")).unwrap();
            rename(&p("f"), &p("d")).unwrap();
        }
        assert_eq!(names(tmp.path()), ["a", "b", "d", "e"]);
    }

    #[test]
    fn recovery_puts_back_an_output_caught_between_the_two_renames() {
        let tmp = tempfile::tempdir().unwrap();
        let pid = dead_pid();
        leftover(tmp.path(), "out", pid, &[OUT, OLD]);
        let notes = recover(tmp.path());
        assert!(notes.len() == 1 && notes[0].starts_with("restored"), "{notes:?}");
        assert_eq!(names(tmp.path()), ["out"]);
        assert_eq!(std::fs::read_to_string(tmp.path().join("out/what")).unwrap(), OLD);
    }

    #[test]
    fn recovery_discards_only_what_is_no_ones_only_copy() {
        let tmp = tempfile::tempdir().unwrap();
        let pid = dead_pid();
        // Published (only `old` left, superseded) and never published (only `out`): both go.
        std::fs::create_dir(tmp.path().join("a")).unwrap();
        leftover(tmp.path(), "a", pid, &[OLD]);
        leftover(tmp.path(), "b", pid, &[OUT]);
        // Caught between the renames, but something took the output's place since: kept, and said.
        std::fs::create_dir(tmp.path().join("c")).unwrap();
        let kept = leftover(tmp.path(), "c", pid, &[OUT, OLD]);
        // A live run's folder is left alone.
        let live = leftover(tmp.path(), "d", std::process::id(), &[OUT, OLD]);
        pending().push(live.clone());
        let notes = recover(tmp.path());
        pending().retain(|p| p != &live);
        assert!(notes.len() == 1 && notes[0].contains("by hand") && notes[0].contains("/c"), "{notes:?}");
        let mut want =
            vec!["a".to_string(), "c".into(), kept.file_name().unwrap().to_string_lossy().into(), live.file_name().unwrap().to_string_lossy().into()];
        want.sort();
        assert_eq!(names(tmp.path()), want);
        assert_eq!(names(&kept), [NAME, OLD, OUT]);
    }

    #[test]
    fn publishing_leaves_alone_what_appeared_meanwhile() {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("out");
        for kind in [OutKind::File, OutKind::Folder] {
            let target = Target::check(&out, "--out", kind, false, &[]).unwrap();
            let staging = Staging::create(&target).unwrap();
            if kind == OutKind::File {
                std::fs::write(staging.out(), "new").unwrap();
            }
            std::fs::create_dir(&out).unwrap();
            std::fs::write(out.join("theirs"), "x").unwrap();
            let err = staging.commit().unwrap_err().to_string();
            assert!(err.starts_with("--out: ") && err.contains("appeared"), "{err}");
            assert_eq!(names(tmp.path()), ["out"]);
            assert_eq!(names(&out), ["theirs"]);
            std::fs::remove_dir_all(&out).unwrap();
        }
    }

    #[test]
    fn a_replacement_leaves_alone_a_folder_that_changed_meanwhile() {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("out");
        std::fs::create_dir(&out).unwrap();
        // Found empty, so replaceable without --force; then someone writes into it.
        let target = Target::check(&out, "--out", OutKind::Folder, false, &[]).unwrap();
        let staging = Staging::create(&target).unwrap();
        std::fs::write(out.join("theirs"), "x").unwrap();
        let err = staging.commit().unwrap_err().to_string();
        assert!(err.contains("changed while"), "{err}");
        assert_eq!(names(tmp.path()), ["out"]);
        assert_eq!(names(&out), ["theirs"]);
        // With --force it is replaced.
        let target = Target::check(&out, "--out", OutKind::Folder, true, &[]).unwrap();
        let staging = Staging::create(&target).unwrap();
        std::fs::write(staging.out().join("mine"), "y").unwrap();
        staging.commit().unwrap();
        assert_eq!(names(tmp.path()), ["out"]);
        assert_eq!(names(&out), ["mine"]);
    }

    #[test]
    fn a_replacement_leaves_alone_a_file_that_changed_meanwhile() {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("out.gguf");
        std::fs::write(&out, "checked").unwrap();
        let target = Target::check(&out, "--out", OutKind::File, true, &[]).unwrap();
        let staging = Staging::create(&target).unwrap();
        std::fs::write(staging.out(), "new").unwrap();
        // Someone else's file takes the path (renamed over it: a new inode) while this run writes.
        let theirs = tmp.path().join("theirs.part");
        std::fs::write(&theirs, "theirs").unwrap();
        std::fs::rename(&theirs, &out).unwrap();
        let err = staging.commit().unwrap_err().to_string();
        assert!(err.contains("changed while"), "{err}");
        assert_eq!(std::fs::read_to_string(&out).unwrap(), "theirs");
        assert_eq!(names(tmp.path()), ["out.gguf"]);
        // The file the check found is replaced.
        let target = Target::check(&out, "--out", OutKind::File, true, &[]).unwrap();
        let staging = Staging::create(&target).unwrap();
        std::fs::write(staging.out(), "new").unwrap();
        staging.commit().unwrap();
        assert_eq!(std::fs::read_to_string(&out).unwrap(), "new");
        assert_eq!(names(tmp.path()), ["out.gguf"]);
    }

    #[test]
    fn errors_in_the_staging_folder_name_the_output() {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("o");
        let staging = Staging::create(&Target::check(&out, "--out", OutKind::Folder, false, &[]).unwrap()).unwrap();
        let full = || std::io::Error::from_raw_os_error(libc::ENOSPC);
        let e = staging.user_error(Error::io(staging.out().join("model.safetensors"), full())).to_string();
        assert_eq!(e, format!("--out: {}: {}", out.join("model.safetensors").display(), full()));
        let e = staging.user_error(Error::io(&staging.path, full())).to_string();
        assert!(e.starts_with(&format!("--out: {}: ", out.display())), "{e}");
        // A source file's error is left as it is.
        assert_eq!(staging.user_error(Error::io("/src/x", full())).to_string(), format!("/src/x: {}", full()));
    }
}
