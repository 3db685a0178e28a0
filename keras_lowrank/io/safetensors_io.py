"""The one place that reads and writes safetensors files, and writes files
atomically.

Adapter files (`save_adapter`) and, later, PEFT folders use it, so that every
file keras_lowrank writes behaves the same way:

- `write_file_atomically(path, data)`: `path` is afterwards either the old
  file or the complete new one, never a partial file (temporary file in the
  same folder, flush and fsync, `os.replace`, fsync of the folder). A new
  file gets the permissions `open()` would give it (`0o666` less the umask),
  a replaced file keeps its own; a symlink keeps pointing where it pointed,
  and its target receives the new content.
- `save_tensors(path, tensors, metadata)`: a safetensors file, written that
  way.
- `load_tensors(path)`: `(metadata, tensors)` of a safetensors file, after
  checking the header, with errors that name the file.

Only NumPy arrays go in and come out (`safetensors.numpy`): no framework
tensors, no pickle, no code from a file runs.
"""

import json
import os
import tempfile

__all__ = [
    "check_path",
    "encode_tensors",
    "load_tensors",
    "read_bytes",
    "save_tensors",
    "write_file_atomically",
]


def check_path(path, argument, call):
    """`os.fspath(path)`, or a `TypeError` naming `argument` of `call`.

    Args:
        path: a `str` or `os.PathLike` (bytes paths are refused: every file
            keras_lowrank writes is named by text).
        argument: the argument's name, for the message.
        call: how the caller is called, for the message, e.g.
            `"save_adapter(model, path)"`.

    Returns:
        The path as a `str`.

    Example:

    >>> from keras_lowrank.io.safetensors_io import check_path
    >>> import pathlib
    >>> check_path(pathlib.Path("a.safetensors"), "path", "f(path)")
    'a.safetensors'
    """
    if isinstance(path, (str, os.PathLike)):
        value = os.fspath(path)
        if isinstance(value, str):
            return value
    raise TypeError(
        f"keras_lowrank: {call}: `{argument}` must be a file path (a str or "
        f"os.PathLike), not {type(path).__name__} {path!r}. Pass the file's "
        "name as a str or pathlib.Path, e.g. 'task.safetensors'."
    )


def write_file_atomically(path, data, what="file", fix=None):
    """Writes `data` to `path`: afterwards `path` is the old file or the
    complete new one, never a partial file.

    Args:
        path: the file to write (a `str` or `os.PathLike`). A symlink is
            kept; its target is written.
        data: `bytes`, or a callable `writer(file)` that writes into the
            binary file object it is given.
        what: what the file is, for error messages (`"adapter file"`).
        fix: what the caller should do when the folder is missing, for the
            message; default: create the folder first.

    Returns:
        `path`.

    Example:

    >>> import os, tempfile
    >>> from keras_lowrank.io.safetensors_io import write_file_atomically
    >>> path = os.path.join(tempfile.mkdtemp(), "note.txt")
    >>> _ = write_file_atomically(path, b"hello")
    >>> open(path, "rb").read()
    b'hello'
    """
    requested = os.fspath(path)
    # Writing through a link writes the file it points to: replacing the link
    # itself would silently detach whatever else relies on it.
    target = os.path.realpath(requested) if os.path.islink(requested) else requested
    if os.path.isdir(target):
        raise ValueError(
            f"keras_lowrank: '{requested}' is a folder; {_article(what)} {what} is "
            "a single file. Pass a file name such as 'task.safetensors'."
        )
    folder = os.path.dirname(os.path.abspath(target))
    if not os.path.isdir(folder):
        raise FileNotFoundError(
            f"keras_lowrank: cannot write {what} '{requested}': the folder "
            f"'{folder}' does not exist. "
            + (fix or f"Create it first (os.makedirs('{folder}')).")
        )
    mode = _mode_for(target)
    handle, temporary = tempfile.mkstemp(
        dir=folder, prefix=f".{os.path.basename(target)}.", suffix=".tmp"
    )
    try:
        with os.fdopen(handle, "wb") as file:
            if callable(data):
                data(file)
            else:
                file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.chmod(temporary, mode)
        os.replace(temporary, target)
    except BaseException:
        if os.path.exists(temporary):
            os.unlink(temporary)
        raise
    _sync_folder(folder)
    return path


def encode_tensors(tensors, metadata=None):
    """The bytes of a safetensors file holding `tensors` (`{name: array}`)
    and `metadata` (`{str: str}`, the header's `__metadata__`)."""
    return _safetensors_numpy().save(dict(tensors), metadata=metadata)


def save_tensors(path, tensors, metadata=None, what="safetensors file", fix=None):
    """Writes `tensors` and `metadata` as a safetensors file, atomically.

    Args:
        path: the file to write.
        tensors: `{name: np.ndarray}`.
        metadata: `{str: str}` for the header's `__metadata__`, or `None`.
        what: what the file is, for error messages.
        fix: see `write_file_atomically`.

    Returns:
        `path`.

    Example:

    >>> import numpy as np, os, tempfile
    >>> from keras_lowrank.io.safetensors_io import load_tensors, save_tensors
    >>> path = os.path.join(tempfile.mkdtemp(), "t.safetensors")
    >>> _ = save_tensors(path, {"w": np.ones(2, "float32")}, {"note": "hi"})
    >>> metadata, tensors = load_tensors(path)
    >>> metadata, tensors["w"].tolist()
    ({'note': 'hi'}, [1.0, 1.0])
    """
    return write_file_atomically(path, encode_tensors(tensors, metadata), what, fix)


def read_bytes(path, what="safetensors file", fix=None):
    """The bytes of the file `path`; errors name the file (`what`), and
    point a folder to `fix`."""
    file = os.fspath(path)
    if not os.path.exists(file):
        raise FileNotFoundError(f"keras_lowrank: {what} '{file}' does not exist.")
    if os.path.isdir(file):
        raise ValueError(
            f"keras_lowrank: '{file}' is a folder, not {_article(what)} {what}."
            + (f" {fix}" if fix else "")
        )
    with open(file, "rb") as handle:
        return handle.read()


def load_tensors(path, what="safetensors file", fix=None, data=None):
    """`(metadata, tensors)` of a safetensors file, checked whole.

    Args:
        path: the file.
        what: what the file is, for error messages.
        fix: what to do about a folder or an unreadable file, for messages.
        data: the file's bytes if already read (then `path` only names it).

    Returns:
        `({str: str}, {name: np.ndarray})`.

    Raises:
        FileNotFoundError: no such file. ValueError: a folder, or not a
        readable safetensors file; the message names the file.
    """
    file = os.fspath(path)
    if data is None:
        data = read_bytes(file, what, fix)

    def unreadable(why):
        return ValueError(
            f"keras_lowrank: {what} '{file}' cannot be read: {why}. It is "
            f"truncated, corrupt or not {_article(what)} {what}"
            + (f"; {fix}" if fix else ".")
        )

    if len(data) < 8:
        raise unreadable(f"it holds {len(data)} bytes, fewer than a header")
    size = int.from_bytes(data[:8], "little")
    if size > len(data) - 8:
        raise unreadable(
            f"its header announces {size} bytes but only {len(data) - 8} follow"
        )
    try:
        header = json.loads(data[8 : 8 + size])
        metadata = header.get("__metadata__") or {}
    except (ValueError, AttributeError):
        raise unreadable("its header is not valid safetensors JSON") from None
    if not isinstance(metadata, dict) or not all(
        isinstance(v, str) for v in metadata.values()
    ):
        raise unreadable("its header's __metadata__ is not a map of strings")
    try:
        tensors = _safetensors_numpy().load(data)
    except Exception as error:  # safetensors raises its own error types
        raise unreadable(f"its tensors cannot be decoded ({error})") from None
    return metadata, tensors


# --- internals ----------------------------------------------------------------


def _mode_for(target):
    """An existing file keeps its permissions; a new one gets what `open()`
    would give it (`mkstemp` creates 0600, private by accident)."""
    if os.path.exists(target):
        return os.stat(target).st_mode & 0o7777
    umask = os.umask(0)  # the only way to read it; set straight back
    os.umask(umask)
    return 0o666 & ~umask


def _sync_folder(folder):
    """Makes the rename itself durable (POSIX); harmless where unsupported."""
    try:
        descriptor = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


def _article(what):
    return "an" if what[:1] in "aeiou" else "a"


def _safetensors_numpy():
    try:
        import safetensors.numpy
    except ImportError:  # pragma: no cover - depends on the environment
        raise ImportError(
            "keras_lowrank: adapter files need the `safetensors` package: "
            "pip install safetensors (or keras-lowrank[io])."
        ) from None
    return safetensors.numpy
