"""One way to write files that survive a crash, open images, and print Markdown tables.

Every artifact of the project is written through ``write_atomic``: a temp file beside the target,
flushed and fsynced, renamed over it, then the folder fsynced. A reader sees the old file or the
whole new one, never a part, and a killed writer leaves at most a temp file that ``remove_temp_files``
(or the next writer) clears. A full disk is a ``DiskFullError`` naming the file and the bytes needed.

An output folder has one writer at a time: ``lock_folder`` takes an OS lock (flock) on a file beside it,
which the kernel drops when its holder dies, so a killed run never leaves a stale lock.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from .errors import ConfigError, InputError, Llm2ClipError

TMP_MARK = ".tmp-"
LOCK_SUFFIX = ".lock"

log = logging.getLogger(__name__)


class DiskFullError(Llm2ClipError):
    """No space (or quota) left for a file: the message names it and the bytes it needed."""


class FolderInUseError(ConfigError):
    """Another live process writes the same output folder."""


def fsync_dir(path: str | Path) -> None:
    """Make a rename inside ``path`` durable; a no-op where folders cannot be opened."""
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


def temp_path(path: str | Path) -> Path:
    path = Path(path)
    return path.with_name(f".{path.name}{TMP_MARK}{os.getpid()}")


def write_atomic(path: str | Path, write: Callable[[io.BufferedWriter], None], size: int | None = None) -> Path:
    """Call ``write(f)`` on a temp file beside ``path``, then replace ``path`` with it, durably."""

    def save(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            write(f)

    return save_atomic(path, save, size)


def _sync_file(path: Path) -> None:
    # where a delayed-allocation filesystem reports a full disk (tests inject ENOSPC here)
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def save_atomic(path: str | Path, save: Callable[[Path], None], size: int | None = None) -> Path:
    """``save(temp path)`` for writers that want a file name (safetensors, HF), then the same durable rename.
    ``size``: the bytes it will write, when known, for the message of a full disk."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    try:
        save(tmp)
        _sync_file(tmp)
        os.replace(tmp, path)
    except OSError as err:
        if err.errno not in (errno.ENOSPC, errno.EDQUOT):
            tmp.unlink(missing_ok=True)
            raise
        got = tmp.stat().st_size if tmp.is_file() else 0
        tmp.unlink(missing_ok=True)
        raise disk_full(path, size if size is not None else got, at_least=size is None) from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return path


def disk_full(path: str | Path, needed: int, at_least: bool = False) -> DiskFullError:
    """The error for a file that did not fit: its path, the bytes it needed, the bytes free there."""
    path = Path(path)
    try:
        free = f"{shutil.disk_usage(path.parent).free:,} bytes free there"
    except OSError:
        free = "free space unknown"
    need = f"{'more than ' if at_least else ''}{needed:,} bytes"
    return DiskFullError(f"{path}: no space left on the device: it needs {need} ({free}); free "
                         "some space and rerun the same command: finished parts are kept")


def write_bytes_atomic(path: str | Path, data: bytes) -> str:
    """Write ``data`` atomically; returns its sha256 hex digest."""
    write_atomic(path, lambda f: f.write(data), size=len(data))
    return hashlib.sha256(data).hexdigest()


def write_text_atomic(path: str | Path, text: str) -> Path:
    write_atomic(path, lambda f: f.write(text.encode("utf-8")))
    return Path(path)


def write_json_atomic(path: str | Path, obj, indent: int = 2, **kwargs) -> Path:
    """JSON with a trailing newline; values JSON cannot hold are written as ``str`` (paths, dtypes)."""
    kwargs.setdefault("default", str)
    return write_text_atomic(path, json.dumps(obj, indent=indent, **kwargs) + "\n")


def read_json(path: str | Path, what: str = "JSON file", hint: str = ""):
    """The JSON in ``path``; a damaged or truncated file is an ``InputError`` naming it (and ``hint``)."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError) as err:
        raise InputError(f"{path}: not a valid {what} ({err}){'; ' + hint if hint else ''}") from None


def remove_temp_files(folder: str | Path) -> int:
    """Delete temp files a killed writer left in ``folder``; returns how many."""
    n = 0
    for p in Path(folder).glob(f".*{TMP_MARK}*"):
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)  # a temp folder of building_dir
        else:
            p.unlink(missing_ok=True)
        n += 1
    return n


# ------------------------------------------------------------------------------------------ folders
# Files whose presence marks a folder as written by llm2clip (job record, model, encoder, conversion and
# export records, webdataset shard list): only such a folder may be replaced by --force / --overwrite.
JOB_RECORD = "llm2clip_job.json"
OWN_RECORDS = (JOB_RECORD, "llm2clip_model.json", "llm2clip_encoder.json", "llm2clip_conversion.json",
               "llm2clip_export.json", "llm2clip_onnx.json", "shards.json")


class UnsafeOutputError(ConfigError):
    """An output folder that must not be written or replaced."""


def written_by_llm2clip(folder: str | Path) -> bool:
    """True when ``folder`` holds one of ``OWN_RECORDS`` (a ``shards.json`` must carry our format)."""
    folder = Path(folder)
    for name in OWN_RECORDS:
        p = folder / name
        if not p.is_file():
            continue
        if name.startswith("llm2clip_"):
            return True
        try:
            fmt = json.loads(p.read_text(encoding="utf-8")).get("format", "")
        except (OSError, UnicodeDecodeError, ValueError, AttributeError):
            continue
        if isinstance(fmt, str) and fmt.startswith("llm2clip"):
            return True
    return False


def _protected(path: Path) -> str | None:
    """Why ``path`` may never be replaced: the working folder, home, or a folder above either."""
    here, home = Path.cwd().resolve(), Path.home().resolve()
    if path == here or here.is_relative_to(path):
        return "it is the working folder or holds it"
    if path == home or home.is_relative_to(path):
        return "it is the home folder or holds it"
    return None


def prepare_output_dir(path: str | Path, replace: bool, flag: str = "--force",
                       error: type[Exception] = UnsafeOutputError) -> Path:
    """Check that a folder may be written as a whole: absent or empty, or (with ``replace``) one that
    llm2clip wrote and that is not the working folder, home, or above either. Deletes nothing: the
    caller builds beside it (``building_dir``) and the finished folder is swapped in."""
    path = Path(path).expanduser()
    if not path.exists() and not path.is_symlink():
        path.parent.mkdir(parents=True, exist_ok=True)
        return path
    if not path.is_dir():
        raise error(f"{path}: exists and is not a folder; choose another output")
    if not any(path.iterdir()):
        return path
    if not replace:
        raise error(f"{path}: exists and is not empty (pass overwrite / {flag} to replace it)")
    why = _protected(path.resolve())
    if why:
        raise error(f"{path}: refusing to replace it: {why}")
    if not written_by_llm2clip(path):
        raise error(f"{path}: refusing to replace it: not written by llm2clip (none of {', '.join(OWN_RECORDS)} "
                    "in it); remove it yourself or choose another output")
    return path


def temp_dir(out: str | Path) -> Path:
    """A fresh hidden folder beside ``out`` (same filesystem, so it can be renamed onto ``out``)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{out.name}{TMP_MARK}", dir=out.parent))


def publish_dir(tmp: str | Path, out: str | Path, keep_existing: bool = False) -> Path:
    """Rename the finished folder ``tmp`` to ``out``. With ``keep_existing`` an ``out`` that appeared
    meanwhile (another process built the same cache) wins and ``tmp`` is dropped; otherwise an existing
    ``out`` (checked by ``prepare_output_dir``) is swapped aside first and then removed."""
    tmp, out = Path(tmp), Path(out)
    if out.exists() and keep_existing:
        shutil.rmtree(tmp, ignore_errors=True)
        return out
    old = None
    if out.exists() or out.is_symlink():
        old = out.with_name(f".{out.name}.old{TMP_MARK}{os.getpid()}")
        os.replace(out, old)
    try:
        os.replace(tmp, out)
    except OSError:
        if old is not None:
            os.replace(old, out)
        elif keep_existing and out.exists():
            shutil.rmtree(tmp, ignore_errors=True)
            return out
        raise
    fsync_dir(out.parent)
    if old is not None:
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink(missing_ok=True)
    return out


@contextmanager
def building_dir(out: str | Path, keep_existing: bool = False) -> Iterator[Path]:
    """Yield a temp folder beside ``out``; when the block ends without error it becomes ``out``
    (``publish_dir``), else it is removed. Readers never see a half-built ``out``."""
    tmp = temp_dir(out)
    try:
        yield tmp
        publish_dir(tmp, out, keep_existing=keep_existing)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# ------------------------------------------------------------------------------------------ one writer
_HELD: dict[str, tuple[int, int]] = {}  # lock file -> (fd, pid of the process that took it)


def lock_path(folder: str | Path) -> Path:
    """The lock file of ``folder``: beside it, so that the folder itself may be cleared or swapped."""
    folder = Path(folder).expanduser().resolve()
    return folder.with_name(f".{folder.name}{LOCK_SUFFIX}")


def check_output_folder(folder: str | Path, error: type[Exception] = UnsafeOutputError) -> Path:
    """``folder`` is a folder or can become one: neither it nor a folder above it is a file."""
    folder = Path(folder).expanduser()
    if folder.exists() and not folder.is_dir():
        raise error(f"{folder}: exists and is not a folder; choose another output")
    for up in folder.absolute().parents:
        if up.exists():
            if not up.is_dir():
                raise error(f"{up}: is a file, so {folder} cannot be created; choose another output")
            break
    return folder


def _holder(fd: int) -> str:
    for _ in range(20):  # the holder writes its PID just after taking the lock
        os.lseek(fd, 0, os.SEEK_SET)
        pid = os.read(fd, 32).decode("ascii", "replace").strip()
        if pid:
            return f"PID {pid}"
        time.sleep(0.05)
    return "PID unknown"


def lock_folder(folder: str | Path, what: str = "llm2clip") -> Path | None:
    """Make this process the one writer of ``folder`` until ``unlock_folder`` or its exit; a no-op when it is
    already. Raises ``FolderInUseError`` (naming the holder's PID) at once when another live process holds it.
    Where no lock file can be made (a read-only parent, no flock) it warns and returns None."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no OS lock
        return None
    check_output_folder(folder)
    lock = lock_path(folder)
    held = _HELD.get(str(lock))
    if held and held[1] == os.getpid():
        return lock
    lock.parent.mkdir(parents=True, exist_ok=True)
    while True:
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as err:
            log.warning("%s: cannot lock %s (%s); no other process must write it meanwhile", lock, folder, err)
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):  # no flock here (some network
                os.close(fd)  # filesystems): not a holder to name
                log.warning("%s: cannot lock %s (%s); no other process must write it meanwhile", lock, folder, err)
                return None
            who = _holder(fd)
            os.close(fd)
            raise FolderInUseError(f"{Path(folder)}: in use by another {what} process ({who}); wait for it to "
                                   f"finish or stop it (its lock: {lock})") from None
        try:  # a holder that was releasing may have removed this file meanwhile: lock the one at the path
            same = os.path.samestat(os.fstat(fd), os.stat(lock))
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
    except OSError:  # a full disk: the lock holds all the same, without the PID to name
        pass
    _HELD[str(lock)] = (fd, os.getpid())
    return lock


def unlock_folder(folder: str | Path) -> None:
    """Release this process's lock of ``folder`` (its file goes first, so a waiter locks a fresh one)."""
    lock = lock_path(folder)
    held = _HELD.get(str(lock))
    if not held or held[1] != os.getpid():
        return
    del _HELD[str(lock)]
    lock.unlink(missing_ok=True)
    os.close(held[0])


@contextmanager
def folder_lock(folder: str | Path, what: str = "llm2clip") -> Iterator[Path]:
    """``lock_folder`` for a block; a lock this process held before the block is kept after it."""
    before = _HELD.get(str(lock_path(folder)), (None, None))[1] == os.getpid()
    lock_folder(folder, what)
    try:
        yield Path(folder)
    finally:
        if not before:
            unlock_folder(folder)


# ------------------------------------------------------------------------------------------ images
def image_errors() -> tuple[type[BaseException], ...]:
    """What decoding a bad image file can raise: PIL uses many types; a decompression bomb is one (its
    warning too, where warnings are turned into errors)."""
    from PIL import Image

    return (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError, Image.DecompressionBombWarning)


def open_image(source) -> Image.Image:  # noqa: F821 - PIL is imported lazily
    """An RGB image from a path, bytes or a binary file object, decoded now (a truncated file fails here).

    Raises ``FileNotFoundError`` for a missing file and one of ``image_errors()`` for a bad one. An image of
    more pixels than PIL's limit (``Image.MAX_IMAGE_PIXELS``) is refused as a decompression bomb before
    decoding: PIL itself only warns up to twice the limit and would decode it.
    """
    from PIL import Image

    if isinstance(source, (bytes, bytearray, memoryview)):
        source = io.BytesIO(bytes(source))
    with Image.open(source) as im:
        limit = Image.MAX_IMAGE_PIXELS
        if limit and im.width * im.height > limit:
            raise Image.DecompressionBombError(f"image of {im.width}x{im.height} pixels exceeds the limit of "
                                               f"{limit} pixels (PIL.Image.MAX_IMAGE_PIXELS): a decompression bomb?")
        im.load()
        return im.convert("RGB")


# ------------------------------------------------------------------------------------------ tables
def markdown_table(header: Sequence[str], rows: Iterable[Sequence], align: Sequence[str] | None = None) -> str:
    """A Markdown table; ``align`` holds 'l' or 'r' per column (default: left)."""
    header = [str(h) for h in header]
    align = list(align or ["l"] * len(header))
    if len(align) != len(header):
        raise ValueError("one alignment per column")
    lines = ["| " + " | ".join(header) + " |", "|" + "".join("---:|" if a == "r" else "---|" for a in align)]
    for row in rows:
        cells = [str(c) for c in row]
        if len(cells) != len(header):
            raise ValueError(f"row has {len(cells)} cells for {len(header)} columns")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
