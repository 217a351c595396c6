"""Small file helpers: every output is written to a temp path and renamed, so a crash never leaves
a half-written file where a finished one is expected.

Temporary names carry the writer's host and process id (`.<name>.<host>-<pid>.<random>.tmp`), so two
writers never share one, and the next writer of the same target removes what a killed process left
(`remove_stale_temps`): a temp whose process is gone (same host), or older than a day (another host).
Files and folders get the usual modes of the umask (0644 / 0755 under umask 022): `mkstemp`,
`mkdtemp` and safetensors create 0600 / 0700, which `apply_umask` corrects.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import socket
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from hivlp.errors import UsageError

# A temp of another host cannot be checked for a live writer; after this long it is taken as abandoned.
FOREIGN_TEMP_MAX_AGE_S = 24 * 3600
_TEMP_RE = re.compile(r"^\.(?P<name>.+)\.(?P<host>[A-Za-z0-9-]+)-(?P<pid>\d+)\.[A-Za-z0-9_]+\.tmp$")
# Temps written before names carried a writer: `.<name>.<random>.tmp` (mkstemp's 8 characters).
_LEGACY_TEMP_RE = re.compile(r"^\.(?P<name>.+)\.[A-Za-z0-9_]{8}\.tmp$")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def apply_umask(path: str | Path) -> None:
    """Give `path` the mode a plain `open()` / `mkdir()` would have (0666 / 0777 less the umask)."""
    p = Path(path)
    os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~_umask())


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9-]+", "-", socket.gethostname()) or "host"


def _temp_prefix(name: str) -> str:
    # The pid is read at each call: a forked worker gets its own.
    return f".{name}.{_host()}-{os.getpid()}."


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def _is_stale(entry: Path, now: float) -> bool:
    m = _TEMP_RE.match(entry.name)
    if m is None:
        return _LEGACY_TEMP_RE.match(entry.name) is not None
    pid = int(m.group("pid"))
    if m.group("host") == _host():
        return pid != os.getpid() and not _pid_alive(pid)
    try:
        return now - entry.lstat().st_mtime > FOREIGN_TEMP_MAX_AGE_S
    except FileNotFoundError:
        return False


def remove_stale_temps(folder: str | Path, name: str | None = None) -> list[Path]:
    """Remove the temps an interrupted writer left in `folder` (of target `name`, or of any target);
    return what was removed. A temp of a live writer is never touched."""
    d = Path(folder)
    if not d.is_dir():
        return []
    now = time.time()
    removed = []
    for entry in d.glob(f".{glob_escape(name)}.*.tmp" if name else ".*.tmp"):
        m = _TEMP_RE.match(entry.name) or _LEGACY_TEMP_RE.match(entry.name)
        if m is None or (name is not None and m.group("name") != name) or not _is_stale(entry, now):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                entry.unlink()
        removed.append(entry)
    return removed


def glob_escape(text: str) -> str:
    return re.sub(r"([*?\[])", r"[\1]", text)


def new_temp_file(path: str | Path) -> Path:
    """An empty temp file beside `path`, named for this writer (see the module docstring)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(path.parent, path.name)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=_temp_prefix(path.name), suffix=".tmp")
    os.close(fd)
    return Path(tmp)


def publish_file(tmp: str | Path, path: str | Path) -> None:
    """Flush `tmp` to disk, give it the umask's mode and rename it onto `path` (atomic)."""
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    apply_umask(tmp)
    os.replace(tmp, path)


@contextlib.contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """Yield a temp path to write `path`'s content to (with any library); on success it replaces
    `path`, on error it is removed."""
    tmp = new_temp_file(path)
    try:
        yield tmp
        publish_file(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_file(path) as tmp:
        Path(tmp).write_bytes(data)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def _json_default(o: Any) -> Any:
    if hasattr(o, "item"):  # numpy / torch scalars
        return o.item()
    if hasattr(o, "tolist"):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def _swap_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.old")


def recover_interrupted_swap(path: str | Path) -> None:
    """If a crash hit `atomic_dir` between moving the old folder aside and moving the new one in,
    put the old one back (it is complete; the new one was lost with the crash)."""
    path = Path(path)
    old = _swap_name(path)
    if not path.exists() and old.is_dir():
        with contextlib.suppress(FileNotFoundError):  # another process (a DDP rank) did it first
            os.replace(old, path)


def new_temp_dir(path: str | Path) -> Path:
    """An empty temp folder beside `path` (mode per the umask), named for this writer; temps of an
    earlier, interrupted write of `path` are removed first."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(path.parent, path.name)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=_temp_prefix(path.name), suffix=".tmp"))
    apply_umask(tmp)
    return tmp


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a temp folder beside `path`; on success it replaces `path` whole, on error it is removed.
    Temps of an earlier, interrupted write of `path` are removed first."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    recover_interrupted_swap(path)
    tmp = new_temp_dir(path)
    try:
        yield tmp
        if path.exists():
            old = _swap_name(path)
            if old.exists():
                shutil.rmtree(old)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------
# Reading JSON and checking output paths, with errors that name the file or option


class JSONFileError(UsageError):
    """A JSON file cannot be read or parsed; the message names the file and why."""


def read_json_file(path: str | Path, hint: str = "") -> Any:
    """Parse a JSON file; unreadable, invalid or absurdly nested content raises JSONFileError naming
    the file (and `hint`, what to do about it)."""
    p = Path(path)
    tail = f"; {hint}" if hint else ""
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise JSONFileError(f"{p}: file not found{tail}") from None
    except IsADirectoryError:
        raise JSONFileError(f"{p}: is a folder, expected a JSON file{tail}") from None
    except UnicodeDecodeError as e:
        raise JSONFileError(f"{p}: not UTF-8 text ({e.reason} at byte {e.start}){tail}") from None
    except OSError as e:
        raise JSONFileError(f"{p}: cannot read ({e.strerror}){tail}") from None
    return parse_json(text, str(p), hint)


def parse_json(text: str, where: str, hint: str = "") -> Any:
    tail = f"; {hint}" if hint else ""
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise JSONFileError(f"{where}: not valid JSON ({e}){tail}") from None
    except RecursionError:
        raise JSONFileError(f"{where}: JSON nested too deeply to read (thousands of levels){tail}") from None


def _check_ancestors(p: Path, option: str) -> None:
    """The nearest existing folder above (or at) `p` must be a writable folder."""
    a = p
    while not a.exists() and a != a.parent:
        a = a.parent
    if not a.is_dir():
        raise UsageError(f"{option} {p}: {a} is a file, so the folder cannot be created; choose another path")
    if not os.access(a, os.W_OK | os.X_OK):
        raise UsageError(f"{option} {p}: {a} is not writable; choose another path or fix its permissions")


def check_output_file(path: str | Path, option: str) -> Path:
    """Refuse, before any work, an output file path that cannot be written: a folder, or under a file."""
    p = Path(path)
    if p.is_dir():
        raise UsageError(f"{option} {p}: is a folder; give a file path, e.g. {p / 'out.json'}")
    if p.exists() and not os.access(p, os.W_OK):
        raise UsageError(f"{option} {p}: the file is not writable; choose another path or fix its permissions")
    _check_ancestors(p.parent, option)
    return p


def check_output_dir(path: str | Path, option: str) -> Path:
    """Refuse, before any work, an output folder path that cannot be used: a file, or under a file."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise UsageError(f"{option} {p}: is a file, not a folder; give a folder path (it is created if missing)")
    _check_ancestors(p, option)
    return p
