"""Every file xfer writes goes through here: arrays, manifests, reports, plots.

One writer, so that every file gets the same care:

- **atomic**: the bytes go to a temporary file in the target's own directory, which is
  flushed and fsynced, then renamed over the target with ``os.replace`` (and the directory
  fsynced on POSIX, so the rename itself survives a power cut). A failure at any point
  leaves no partial file, and an existing file untouched.
- **arrays in a known element order**: safetensors 0.8 writes the *memory* of a numpy
  array that is not C-contiguous (a transposed view, a Fortran-ordered or negative-stride
  array) as if it were, with no error: the file loads with its elements in the wrong order
  (safetensors issue #825). Every array is therefore made C-contiguous and native-endian
  here first (0-d arrays stay 0-d), and nothing else in xfer calls ``save_file``.
- **verifiable**: :func:`write_arrays` returns the file's digest; :func:`verify_digest`
  checks a file against one before anything in it is used.

Nothing here imports a framework.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

_CHUNK = 1 << 20


def write_atomic(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """Create ``path`` atomically: ``write(tmp)`` fills a temporary file beside it, which
    is then fsynced and renamed over ``path``.

    ``write`` receives the temporary file's path (libraries such as safetensors and
    matplotlib write to a path). If it raises, the temporary file is removed and ``path``
    is left as it was.

    Raises:
        FileNotFoundError: the directory of ``path`` does not exist.

    Example:
        >>> import os, tempfile
        >>> from xfer.files import write_atomic
        >>> target = os.path.join(tempfile.mkdtemp(), "hello.txt")
        >>> _ = write_atomic(target, lambda tmp: open(tmp, "w").write("hi"))
        >>> open(target).read()
        'hi'
    """
    path = Path(path)
    directory = path.parent if str(path.parent) else Path(".")
    if not directory.is_dir():
        raise FileNotFoundError(
            f"cannot write {str(path)!r}: the directory {str(directory)!r} does not exist; "
            "create it first (os.makedirs) or choose another path."
        )
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
    os.close(fd)
    try:
        write(tmp)
        # mkstemp makes the file private (0600); give it the mode a plain open() would.
        os.chmod(tmp, _mode_for(path))
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    _fsync_directory(directory)
    return path


def _mode_for(path: Path) -> int:
    """The permission bits of the file being replaced, else those of a new file (umask)."""
    try:
        return os.stat(path).st_mode & 0o777
    except FileNotFoundError:
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask


def _fsync_directory(directory: Path) -> None:
    # POSIX: the rename is durable only once the directory entry is on disk. Windows
    # cannot open a directory for fsync, and does not need it.
    if os.name != "posix":
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically.

    Example:
        >>> import os, tempfile
        >>> from xfer.files import write_text
        >>> write_text(os.path.join(tempfile.mkdtemp(), "report.md"), "# hi\\n").name
        'report.md'
    """
    return write_atomic(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def write_json(path: str | os.PathLike, data: Any) -> Path:
    """Write ``data`` as JSON to ``path`` atomically.

    Example:
        >>> import json, os, tempfile
        >>> from xfer.files import write_json
        >>> path = write_json(os.path.join(tempfile.mkdtemp(), "m.json"), {"a": 1})
        >>> json.loads(path.read_text())
        {'a': 1}
    """
    return write_text(path, json.dumps(data, indent=1) + "\n")


def canonical_array(array: Any) -> np.ndarray:
    """``array`` as a C-contiguous, native-endian numpy array with the same values and
    shape (a 0-d array stays 0-d, unlike ``np.ascontiguousarray``): the only layout in
    which safetensors 0.8 writes what it is given.

    Example:
        >>> import numpy as np
        >>> a = canonical_array(np.arange(6, dtype=">f4").reshape(2, 3).T)
        >>> a.flags.c_contiguous, a.dtype.isnative, a.tolist()
        (True, True, [[0.0, 3.0], [1.0, 4.0], [2.0, 5.0]])
    """
    array = np.asarray(array)
    dtype = array.dtype if array.dtype.isnative else array.dtype.newbyteorder("=")
    return np.asarray(array, dtype=dtype, order="C")


def write_arrays(
    path: str | os.PathLike,
    arrays: Mapping[str, Any],
    metadata: Mapping[str, str] | None = None,
) -> str:
    """Write ``arrays`` to a safetensors file at ``path`` atomically; return its digest.

    Every array goes through :func:`canonical_array` first (see the module docstring for
    why). ``metadata`` is stored in the file's header (strings only, as safetensors wants).

    Example:
        >>> import os, tempfile, numpy as np
        >>> from safetensors.numpy import load_file
        >>> from xfer.files import write_arrays
        >>> path = os.path.join(tempfile.mkdtemp(), "w.safetensors")
        >>> kernel = np.arange(6, dtype="float32").reshape(2, 3)
        >>> digest = write_arrays(path, {"kernel": kernel.T})
        >>> load_file(path)["kernel"].tolist()
        [[0.0, 3.0], [1.0, 4.0], [2.0, 5.0]]
    """
    from safetensors.numpy import save_file

    tensors = {str(k): canonical_array(v) for k, v in arrays.items()}
    meta = None if metadata is None else {str(k): str(v) for k, v in metadata.items()}
    written = write_atomic(path, lambda tmp: save_file(tensors, tmp, metadata=meta))
    return file_digest(written)


def file_digest(path: str | os.PathLike) -> str:
    """The SHA-256 of the file at ``path``, as ``"sha256:<hex>"``.

    Example:
        >>> import os, tempfile
        >>> from xfer.files import file_digest, write_text
        >>> file_digest(write_text(os.path.join(tempfile.mkdtemp(), "t"), "")).split(":")[0]
        'sha256'
    """
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return f"sha256:{digest.hexdigest()}"


class CorruptFile(ValueError):
    """A file's content is not what was written (truncated, altered, replaced)."""


def verify_digest(path: str | os.PathLike, expected: str) -> None:
    """Raise :class:`CorruptFile` unless the file at ``path`` has the digest ``expected``
    (from :func:`write_arrays` or :func:`file_digest`).

    Example:
        >>> import os, tempfile
        >>> from xfer.files import file_digest, verify_digest, write_text
        >>> path = write_text(os.path.join(tempfile.mkdtemp(), "t"), "x")
        >>> verify_digest(path, file_digest(path))
    """
    actual = file_digest(path)
    if actual != expected:
        raise CorruptFile(
            f"{os.fspath(path)!r} is not the file that was written: its digest is {actual}, "
            f"expected {expected} (truncated, altered or replaced since)."
        )
