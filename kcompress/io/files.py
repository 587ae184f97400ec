"""Paths and bytes: reading an input file, a safetensors header, output paths, atomic writes, sha256.

Writes are atomic (temporary file beside the target, fsync, rename, fsync of the folder) and refuse to
replace the input or, without ``overwrite=True``, an existing file.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import stat
import struct
from pathlib import Path
from typing import Any, Mapping, Optional, Union

import safetensors.torch
from torch import Tensor

from kcompress.errors import KCompressError

try:
    import resource
except ImportError:  # not on Windows
    resource = None  # type: ignore[assignment]

PathLike = Union[str, "os.PathLike[str]"]
_MAX_HEADER = 100 * 1024 * 1024
#: bytes read to tell a file's format
HEAD_BYTES = 4096
_CGROUP = Path("/sys/fs/cgroup")
_TEMP_SUFFIX = ".kcompress-tmp"
_SPECIAL_FILES = ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                  (stat.S_ISSOCK, "a socket"))


def check_input_file(path: PathLike) -> Path:
    """``path`` if it is an existing, readable regular file; otherwise a one-line :class:`KCompressError`
    saying what it is (missing, a directory, a FIFO or device, unreadable)."""
    source = Path(path)
    try:
        mode = source.stat().st_mode
    except FileNotFoundError:
        raise KCompressError(f"{source}: no such file") from None
    except OSError as error:
        raise KCompressError(f"{source}: cannot read it ({error.strerror or error})") from None
    if stat.S_ISDIR(mode):
        raise KCompressError(f"{source}: is a directory, not a checkpoint file")
    if not stat.S_ISREG(mode):
        kind = next((name for test, name in _SPECIAL_FILES if test(mode)), "a special file")
        raise KCompressError(f"{source}: is {kind}, not a regular file; give a checkpoint file")
    if not os.access(source, os.R_OK):
        raise KCompressError(f"{source}: cannot read it (permission denied)")
    return source


def _read(path: Path) -> bytes:
    """All bytes of a regular, non-empty file that fits in the memory this process has left."""
    check_input_file(path)
    check_memory(path, path.stat().st_size, "the file")
    try:
        data = path.read_bytes()
    except MemoryError:
        raise KCompressError(f"{path}: too large to read into memory ({_size(path.stat().st_size)})") from None
    except OSError as error:
        raise KCompressError(f"{path}: cannot read it ({error.strerror or error})") from None
    if not data:
        raise KCompressError(f"{path}: the file is empty")
    return data


def read_head(path: Path, size: int = HEAD_BYTES) -> bytes:
    """The first ``size`` bytes of a regular, non-empty file (to tell its format before reading the rest)."""
    check_input_file(path)
    try:
        with open(path, "rb") as handle:
            head = handle.read(size)
    except OSError as error:
        raise KCompressError(f"{path}: cannot read it ({error.strerror or error})") from None
    if not head:
        raise KCompressError(f"{path}: the file is empty")
    return head


def available_memory() -> Optional[int]:
    """Bytes this process may still allocate, as far as the system says: the least of the address-space
    limit (``RLIMIT_AS``) less what is mapped, the cgroup's memory limit less its usage, and the kernel's
    ``MemAvailable``; None where none of them is known (not Linux)."""
    bounds = []
    soft, _ = resource.getrlimit(resource.RLIMIT_AS) if resource is not None else (-1, -1)
    mapped = _proc_kib("/proc/self/status", "VmSize")
    if soft not in (-1, getattr(resource, "RLIM_INFINITY", -1)) and mapped is not None:
        bounds.append(soft - mapped)
    limit, usage = (_first_int(_CGROUP / name) for name in ("memory.max", "memory.current"))
    if limit is not None and usage is not None:
        bounds.append(limit - usage)
    free = _proc_kib("/proc/meminfo", "MemAvailable")
    if free is not None:
        bounds.append(free)
    return max(0, min(bounds)) if bounds else None


def check_memory(path: PathLike, nbytes: int, what: str, copies: float = 1.0) -> None:
    """A one-line :class:`KCompressError` when ``copies`` times ``nbytes`` (the size of ``what`` in ``path``,
    as declared) exceed :func:`available_memory`, before anything of that size is allocated."""
    free = available_memory()
    if free is None or nbytes * copies <= free:
        return
    working = f", and loading, checking and converting it needs {_size(int(nbytes * copies))}" if copies != 1 else ""
    raise KCompressError(f"{path}: {what} takes {_size(nbytes)}{working}: more than the {_size(free)} of memory "
                         "available")


def _size(nbytes: int) -> str:
    """``"1.5 GB"``, ``"12.0 MB"``, ``"300 bytes"``."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if nbytes >= scale:
            return f"{nbytes / scale:.1f} {unit}"
    return f"{nbytes} bytes"


def _proc_kib(path: str, key: str) -> Optional[int]:
    """``key``'s value in bytes from a ``/proc`` file that lists ``key: N kB`` (None where there is none)."""
    try:
        text = Path(path).read_text()
    except OSError:
        return None
    found = re.search(rf"^{key}:\s+(\d+) kB", text, re.MULTILINE)
    return int(found.group(1)) * 1024 if found else None


def _first_int(path: Path) -> Optional[int]:
    """The integer a one-value file holds (None: missing, unreadable, or ``max``)."""
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def _reason(error: BaseException) -> str:
    """``Type: first line of the message`` (at most 160 characters), for one-line errors."""
    lines = str(error).strip().splitlines()
    text = lines[0] if lines else ""
    return f"{type(error).__name__}: {text[:160]}" if text else type(error).__name__


def _corrupt(path: Path, error: BaseException) -> KCompressError:
    return KCompressError(f"{path}: truncated or corrupt checkpoint ({_reason(error)})")


def safetensors_header_of(path: Path) -> Optional[dict[str, Any]]:
    """The JSON header of the safetensors file at ``path`` (only the header is read), or None when the file
    does not start like one."""
    head = read_head(path, 8)
    if len(head) < 8:
        return None
    (size,) = struct.unpack("<Q", head)
    if not 2 <= size <= min(path.stat().st_size - 8, _MAX_HEADER):
        return None
    return _safetensors_header(read_head(path, 8 + size))


def _safetensors_header(data: bytes) -> Optional[dict[str, Any]]:
    """The JSON header of a safetensors file, or None when ``data`` does not start like one."""
    if len(data) < 10:
        return None
    (size,) = struct.unpack("<Q", data[:8])
    if not 2 <= size <= min(len(data) - 8, _MAX_HEADER) or data[8:9] != b"{":
        return None
    try:
        header = json.loads(data[8:8 + size])
    except (ValueError, RecursionError):
        return None
    return header if isinstance(header, dict) else None


def _safetensors_tensors(path: Path, data: bytes) -> dict[str, Tensor]:
    try:
        return dict(safetensors.torch.load(data))
    except Exception as error:  # noqa: BLE001 - the Rust parser raises SafetensorError and others
        raise _corrupt(path, error) from None


# ====================================================================== writing artifacts
def default_output_path(input_path: PathLike, format: str, rank: Any = None, ratio: Optional[float] = None) -> Path:
    """Beside the input, never the input: ``model.pt`` -> ``model.kcp-r8.safetensors`` (rank 8),
    ``model.tt-x100.safetensors`` (ratio 100), ``model.tt-r2_4.safetensors`` (per-bond ranks)."""
    source = Path(input_path)
    tag = str(format).lower()
    if rank is not None:
        tag += "-r" + ("_".join(str(r) for r in rank) if isinstance(rank, (list, tuple)) else str(rank))
    elif ratio is not None:
        tag += f"-x{float(ratio):g}"
    return source.with_name(f"{source.stem}.{tag}.safetensors")


def check_output_path(path: PathLike, *, overwrite: bool = False, source: Optional[PathLike] = None) -> Path:
    """``path`` if an artifact may be written there: not the ``source`` file, not a directory, new (or
    ``overwrite``), in an existing writable directory. Otherwise a :class:`KCompressError`."""
    target = Path(path)
    if source is not None and _same_file(target, Path(source)):
        raise KCompressError(f"{target} is the input file; choose another output path")
    if target.is_dir():
        raise KCompressError(f"{target} is a directory; give a file path")
    _refuse_special(target)
    if (target.exists() or target.is_symlink()) and not overwrite:
        raise KCompressError(f"{target} exists; pass --overwrite (overwrite=True) to replace it, "
                             "or choose another path")
    folder = target.parent
    if not folder.is_dir():
        existing = next(p for p in (folder, *folder.parents) if p.exists())  # "/" or "." at the latest
        if not existing.is_dir():
            raise KCompressError(f"cannot write {target}: {existing} is a file, not a directory")
        raise KCompressError(f"cannot write {target}: directory {folder} does not exist")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise KCompressError(f"cannot write {target}: directory {folder} is not writable")
    return target


def _refuse_special(target: Path) -> None:
    """A :class:`KCompressError` when ``target`` exists (behind any symlink) and is not a regular file: a FIFO,
    device or socket is never replaced, whatever ``overwrite`` says."""
    try:
        mode = target.stat().st_mode
    except OSError:  # missing, or a dangling symlink
        return
    if not stat.S_ISREG(mode):
        kind = next((name for test, name in _SPECIAL_FILES if test(mode)), "a special file")
        raise KCompressError(f"{target} is {kind}, not a regular file; kcompress writes only regular files, "
                             "choose another path")


def check_output_paths(paths: Mapping[str, Optional[PathLike]], *, overwrite: bool = False,
                       source: Optional[PathLike] = None) -> None:
    """Every output of one run (``{"--output": path, "--report": path, ...}``; None: not written) checked by
    :func:`check_output_path` and distinct from the others, before any work; errors name the option."""
    taken: dict[Path, str] = {}
    for option, path in paths.items():
        if path is None:
            continue
        try:
            target = check_output_path(path, overwrite=overwrite, source=source)
        except KCompressError as error:
            raise KCompressError(f"{option}: {error}") from None
        key = target.resolve()
        if key in taken:
            raise KCompressError(f"{option} {path} is also the {taken[key]} path; choose another path")
        taken[key] = option


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist
        return a.resolve() == b.resolve()


def file_sha256(path: PathLike) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _source_digest(path: Path) -> str:
    try:
        return file_sha256(path)
    except OSError as error:
        raise KCompressError(f"{path}: cannot read the source file ({error.strerror or error})") from None


def atomic_write(path: Path, data: bytes, overwrite: bool) -> None:
    """``data`` to ``path`` through a temporary file in the same directory (write, flush, fsync, rename,
    fsync of the directory); the temporary file is removed on any failure (and on SIGINT/SIGTERM under the
    CLI), and temporary files for ``path`` left by a killed process are removed first. Without ``overwrite``
    the rename is a hard link, which fails instead of replacing a file that appeared meanwhile."""
    _refuse_special(path)
    _remove_stale_temporaries(path)
    temporary = path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}{_TEMP_SUFFIX}")
    try:
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # the umask applies, as for open()
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        if overwrite and path.exists():
            os.chmod(temporary, path.stat().st_mode & 0o7777)
        _publish(temporary, path, overwrite)
    except OSError as error:
        raise KCompressError(f"cannot write {path} ({error.strerror or error})") from None
    finally:
        temporary.unlink(missing_ok=True)
    _fsync_directory(path.parent)


def _remove_stale_temporaries(path: Path) -> None:
    """Remove ``.NAME.PID-TOKEN.kcompress-tmp`` files for ``path`` whose process no longer runs (killed
    before it could clean up: SIGKILL, a power loss)."""
    prefix = f".{path.name}."
    try:
        candidates = [p for p in path.parent.iterdir() if p.name.startswith(prefix) and p.name.endswith(_TEMP_SUFFIX)]
    except OSError:
        return
    for candidate in candidates:
        owner = re.fullmatch(r"(\d+)-[0-9a-f]{8}", candidate.name[len(prefix):-len(_TEMP_SUFFIX)])
        if owner is not None and not _running(int(owner.group(1))):
            try:
                candidate.unlink()
            except OSError:
                pass


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, owned by someone else
        return True
    return True


def _publish(temporary: Path, path: Path, overwrite: bool) -> None:
    """Give the written temporary file its final name."""
    if overwrite:
        os.replace(temporary, path)
        return
    try:
        os.link(temporary, path)
    except FileExistsError:
        raise KCompressError(f"{path} exists; pass --overwrite (overwrite=True) to replace it") from None
    except OSError:  # no hard links on this filesystem
        if path.exists():
            raise KCompressError(f"{path} exists; pass --overwrite (overwrite=True) to replace it") from None
        os.replace(temporary, path)


def _fsync_directory(folder: Path) -> None:
    """Persist the rename (best effort: some platforms cannot open directories)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
