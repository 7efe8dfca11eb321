"""Saves as transactions: everything a save writes appears at once, or nothing does.

A save writes a temporary folder beside its target (`.NAME.tmp-PID-XXXXXXXX`) and swaps it in at the
end. The swap, and the removal of folders left by writers that were killed, happen under a lock on
the target (`.NAME.lock`, removed afterwards), so two processes saving one folder never see each
other's halves: both complete and the last one wins. Each temporary folder is owned: its writer holds
a lock on a file inside it, so a clean-up removes only folders whose writer is gone. A failure (full
disk, read-only file system, no permission) is a SaveError naming the target and the cause, with the
target left as it was. A save into a folder that another save of this process is writing (convert
and merge put the model and the tokenizer into one) is part of that save.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import os
import re
import secrets
import shutil
import stat
import sys
import threading
from collections.abc import Callable, Iterator

from .errors import AutolmError, SaveError

try:
    import fcntl
except ImportError:  # Windows: no locks, so folders left by killed saves are kept rather than guessed at
    fcntl = None  # type: ignore[assignment]

_OWNER = ".autolm-owner"  # inside each temporary folder; its writer holds a lock on it
_active: set[str] = set()  # temporary folders this process is writing into now
_active_lock = threading.Lock()


def _umask() -> int:
    # Read where the system shows it: setting and restoring it would briefly change it for every thread.
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save_error(target: str, e: OSError, existed: bool, tmp: str | None = None) -> SaveError:
    """SaveError for an OSError met while saving `target`: the cause, the file, and what became of target."""
    cause = e.strerror or str(e)
    name = e.filename if isinstance(e.filename, str) else None
    if name and tmp and name == tmp:
        name = target
    elif name and tmp and name.startswith(tmp + os.sep):
        name = os.path.join(target, os.path.relpath(name, tmp))  # the file as the user will know it
    where = f" writing {name}" if name and name != target else ""
    after = "the previous contents are unchanged" if existed else "nothing was written"
    err = SaveError(f"{target}: could not save ({cause}{where}); {after}")
    err.errno = e.errno
    return err


@contextlib.contextmanager
def _target_lock(parent: str, base: str) -> Iterator[None]:
    """Hold the lock of one save target; the lock file is removed when released."""
    if fcntl is None:
        yield
        return
    path = os.path.join(parent, f".{base}.lock")
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            mine = os.fstat(fd)
            now = os.stat(path)
        except FileNotFoundError:
            now = None
        except BaseException:
            os.close(fd)
            raise
        if now is not None and (now.st_ino, now.st_dev) == (mine.st_ino, mine.st_dev):
            break
        os.close(fd)  # its holder removed the file while we waited: lock the one there now
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)  # while still locked, so a waiter sees that it holds a removed file
        os.close(fd)


def _live(folder: str) -> bool:
    """Whether a temporary folder's writer is still running (it holds the lock on its owner file)."""
    if fcntl is None:
        return True
    try:
        fd = os.open(os.path.join(folder, _OWNER), os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        return False  # its writer died before locking it (or after its swap), or an older autolm made it
    except OSError:
        return True  # cannot tell: keep it
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return True
    finally:
        os.close(fd)
    return False


def _clean_stale(parent: str, base: str, target: str) -> None:
    """Remove what killed saves of `target` left beside it (called under the target's lock)."""
    pattern = re.compile(re.escape(f".{base}.") + r"(tmp|old)-(?:\d+-)?[0-9a-z_]{8}")
    for name in sorted(os.listdir(parent)):
        m = pattern.fullmatch(name)
        if m is None:
            continue
        path = os.path.join(parent, name)
        if m.group(1) == "old" and not os.path.lexists(target):
            os.replace(path, target)  # killed between the two renames of a swap: put the old one back
        elif m.group(1) == "old" or not _live(path):
            shutil.rmtree(path, ignore_errors=True)


def _new_folder(parent: str, base: str) -> tuple[str, int]:
    """A fresh temporary folder for `base` and the descriptor holding its owner lock."""
    while True:
        tmp = os.path.join(parent, f".{base}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
        try:
            os.mkdir(tmp, 0o700)
            break
        except FileExistsError:
            continue
    try:
        fd = os.open(os.path.join(tmp, _OWNER), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if fcntl is not None:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # a new file: nobody else can hold it
    return tmp, fd


def _joins(target: str) -> bool:
    with _active_lock:
        return any(target == t or target.startswith(t + os.sep) for t in _active)


@contextlib.contextmanager
def atomic_directory(target: str | os.PathLike, owned: Callable[[str], bool] | None = None) -> Iterator[str]:
    """Yield a fresh temporary directory beside `target`; on success it replaces `target` in one step,
    on failure it is removed and `target` is left as it was (errors on disk are SaveError).

    Files already in `target` are kept unless the new save writes a file of the same name or
    `owned(name)` says autolm wrote it (its own shards and index): nothing else of the user's is lost.
    A symlinked target is followed (the link stays). Files and folders get the permissions the umask gives.
    """
    target = os.path.realpath(os.path.abspath(os.fspath(target)))
    if _joins(target):  # inside another save's temporary folder: that save commits it
        os.makedirs(target, exist_ok=True)
        yield target
        return
    if os.path.exists(target) and not os.path.isdir(target):
        raise AutolmError(f"{target}: exists and is not a directory")
    existed = os.path.isdir(target)
    parent, base = os.path.split(target)
    try:
        os.makedirs(parent, exist_ok=True)
        with _target_lock(parent, base):
            _clean_stale(parent, base, target)
            tmp, owner = _new_folder(parent, base)
    except OSError as e:
        raise save_error(target, e, existed) from None
    with _active_lock:
        _active.add(tmp)
    try:
        yield tmp
        _commit(target, tmp, owned)
    except SaveError:
        raise
    except OSError as e:
        raise save_error(target, e, existed, tmp) from None
    finally:
        with _active_lock:
            _active.discard(tmp)
        shutil.rmtree(tmp, ignore_errors=True)  # after a swap: the previous version, or nothing
        os.close(owner)


def _commit(target: str, tmp: str, owned: Callable[[str], bool] | None) -> None:
    """Make what the save wrote durable, add the user's files from the target, and swap it in."""
    mask = _umask()
    for d, _, files in os.walk(tmp):
        for name in files:
            path = os.path.join(d, name)
            if name != _OWNER and not os.path.islink(path):
                os.chmod(path, 0o666 & ~mask)
                with open(path, "rb") as f:
                    os.fsync(f.fileno())
    parent, base = os.path.split(target)
    with _target_lock(parent, base):
        os.unlink(os.path.join(tmp, _OWNER))  # the lock on it stays held until the save ends
        if os.path.isdir(target):
            _keep_user_files(target, tmp, owned)
            os.chmod(tmp, stat.S_IMODE(os.stat(target).st_mode))
        else:
            os.chmod(tmp, 0o777 & ~mask)
        _fsync_dir(tmp)
        if not os.path.isdir(target):
            os.replace(tmp, target)
        elif not _exchange(tmp, target):
            old = os.path.join(parent, f".{base}.old-{os.getpid()}-{secrets.token_hex(4)}")
            os.replace(target, old)
            try:
                os.replace(tmp, target)
            except BaseException:
                os.replace(old, target)
                raise
            shutil.rmtree(old, ignore_errors=True)
    _fsync_dir(parent)


def _keep_user_files(target: str, tmp: str, owned: Callable[[str], bool] | None) -> None:
    """Hard-link (or copy) the target's files this save does not replace into the new folder."""
    for name in os.listdir(target):
        if name == _OWNER or os.path.lexists(os.path.join(tmp, name)) or (owned is not None and owned(name)):
            continue
        src, dst = os.path.join(target, name), os.path.join(tmp, name)
        if os.path.isdir(src) and not os.path.islink(src):
            shutil.copytree(src, dst, symlinks=True, copy_function=_link_or_copy)
        else:
            _link_or_copy(src, dst)


def _link_or_copy(src: str, dst: str) -> None:
    # A link costs no space or time (a tokenizer saved beside large weights keeps them as they are).
    try:
        os.link(src, dst, follow_symlinks=False)
    except OSError:
        shutil.copy2(src, dst, follow_symlinks=False)


@functools.lru_cache(maxsize=1)
def _renameat2():
    if not sys.platform.startswith("linux"):
        return None
    try:
        return getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    except OSError:
        return None


def _exchange(a: str, b: str) -> bool:
    """Swap two folders in one step (Linux's RENAME_EXCHANGE), so readers never find the target missing;
    False where the system or file system cannot."""
    fn = _renameat2()
    if fn is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), b)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write text to path through a temporary file, fsync and a rename (SaveError when it cannot)."""
    path = os.path.abspath(os.fspath(path))
    directory = os.path.dirname(path)
    existed = os.path.exists(path)
    tmp = None
    try:
        os.makedirs(directory, exist_ok=True)
        tmp = os.path.join(directory, f".tmp-{secrets.token_hex(4)}-{os.path.basename(path)}")
        with open(tmp, "x", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
        _fsync_dir(directory)
    except OSError as e:
        if tmp is not None and os.path.lexists(tmp):
            os.unlink(tmp)
        if _joins(directory):
            raise  # part of a folder's save, which names its own target
        raise save_error(path, e, existed, tmp) from None
    except BaseException:
        if tmp is not None and os.path.lexists(tmp):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def published_file(path: str, mode: int = 0o644) -> Iterator[str]:
    """A temporary path next to `path` for a tool to write (a compiler, a packager); when the block ends without
    an error it becomes `path` (mode set, renamed, the folder fsynced), else it is removed. A cache file: other
    processes see the old file or the whole new one, never a part."""
    directory = os.path.dirname(path)
    os.makedirs(directory, exist_ok=True)
    tmp = os.path.join(directory, f".tmp-{secrets.token_hex(4)}-{os.path.basename(path)}")
    try:
        yield tmp
        os.chmod(tmp, mode)
        os.replace(tmp, path)
        _fsync_dir(directory)
    finally:
        if os.path.lexists(tmp):
            os.unlink(tmp)
