"""File I/O at the library's edge: loading feature files and writing outputs atomically.

Atomic means: data goes to a temporary file in the destination folder, is flushed and fsync-ed,
then renamed over the destination. A kill at any moment leaves either the old file or the
complete new one, never a truncated file.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import tempfile
import zipfile
import zlib
from pathlib import Path

import numpy as np


class InputError(ValueError):
    """A user-facing problem with an input file or argument (the CLI prints it on one line)."""


def same_file(a, b) -> bool:
    """True when paths `a` and `b` name one file (links and relative paths resolved)."""
    a, b = Path(a).expanduser(), Path(b).expanduser()
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist (yet)
        return a.resolve() == b.resolve()


def check_output_path(path, inputs=()) -> Path:
    """`path` as a Path whose folder exists and is writable, which is not itself a folder and is
    none of the `inputs` (paths, None skipped): writing there would destroy an input."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise InputError(f"output path is a folder: {path}")
    for source in inputs:
        if source is not None and same_file(path, source):
            raise InputError(f"output path {path} is an input file ({source}); writing it would "
                             "destroy the input: choose another output path")
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise InputError(f"output folder does not exist: {folder}")
    if not os.access(folder, os.W_OK):
        raise InputError(f"output folder is not writable: {folder}")
    return path


def check_replaceable(path, keys, what: str) -> None:
    """Refuse an existing `path` unless it is a JSON object with every name in `keys`: an
    earlier result of `what` may be replaced, any other file (a selection, features, notes)
    may not."""
    path = Path(path)
    if not path.exists():
        return
    try:
        old = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError, RecursionError):
        old = None
    if not (isinstance(old, dict) and set(keys) <= set(old)):
        raise InputError(f"--out {path} exists and is not a {what} result; choose another "
                         "--out or remove it")


@contextlib.contextmanager
def exclusive_lock(path, what: str):
    """Hold an advisory lock on the file `path` (created if missing) for the block; if another
    process holds it, raise InputError saying `what` is in use. The lock dies with its process,
    so a killed run never leaves one behind."""
    import fcntl

    path = Path(path)
    try:
        f = open(path, "a")  # noqa: SIM115 - closed below, after the lock is released
    except IsADirectoryError:  # the bare "[Errno 21] Is a directory" says nothing of a lock
        raise InputError(f"{what}: its lock file {path} is a folder; remove it") from None
    except OSError as e:  # a read-only file system, say
        raise InputError(f"{what}: cannot open its lock file {path} ({e.strerror or e})") from None
    try:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise InputError(f"{what} is in use by another process; wait for it to finish") from None
        yield
    finally:
        f.close()


def call_get_config(path):
    """`get_config()` of the Python file `path`. A file that does not run, lacks get_config or
    whose get_config fails is a one-line InputError naming the file."""
    import importlib.util

    path = Path(path)
    spec = importlib.util.spec_from_file_location(f"_bilaf_config_{path.stem}", path)
    if spec is None:  # no loader for the suffix; module_from_spec(None) would raise AttributeError
        raise InputError(f"config {path} is not a Python file (.py)")
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except SyntaxError as e:
        raise InputError(f"config {path}: syntax error at line {e.lineno}: {e.msg}") from None
    except Exception as e:  # noqa: BLE001 - any failure of the user's file is reported as its own
        raise InputError(f"config {path} failed to load: {type(e).__name__}: {e}") from None
    if not callable(getattr(module, "get_config", None)):
        raise InputError(f"config {path} has no get_config()")
    try:
        return module.get_config()
    except Exception as e:  # noqa: BLE001
        raise InputError(f"config {path}: get_config() raised {type(e).__name__}: {e}") from None


def check_identity(record_path, current: dict, workdir, added_later=()) -> None:
    """Raise InputError unless the JSON at `record_path` holds `identity` equal to `current`.

    Used to refuse reusing a workdir made by a different configuration. Keys in `added_later`
    (recorded only since some version) are compared only where the stored identity has them."""
    record_path = Path(record_path)
    try:
        stored = json.loads(record_path.read_text())["identity"]
        if not isinstance(stored, dict):
            raise TypeError(f"its identity is a {type(stored).__name__}, not an object")
        current = {k: v for k, v in current.items() if k in stored or k not in added_later}
    except (OSError, ValueError, KeyError, TypeError, RecursionError) as e:
        raise InputError(f"workdir {workdir} has an unreadable {record_path.name} ({e})") from None
    # A key missing on one side counts as None: a setting added later with the default None
    # (what earlier runs did) leaves their workdirs usable.
    diff = sorted(k for k in set(stored) | set(current) if stored.get(k) != current.get(k))
    if diff:
        shown = "; ".join(f"{k}: {stored.get(k)!r} -> {current.get(k)!r}" for k in diff[:3])
        raise InputError(f"workdir {workdir} holds a run of a different config ({shown}); use a new --workdir")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def name_max(folder) -> int:
    """The longest file name (bytes) `folder` takes (255 where the system does not say)."""
    try:
        return os.pathconf(folder, "PC_NAME_MAX")
    except (OSError, ValueError):
        return 255


def temp_prefix(name: str, folder) -> str:
    """`.NAME.` for the temporary sibling of NAME, NAME cut short where `.NAME.xxxxxxxx.tmp`
    would pass the folder's name length limit (a name that fits would fail to be written)."""
    room = name_max(folder) - len("..") - 8 - len(".tmp")  # mkstemp adds 8 random characters
    while len(os.fsencode(name)) > room:
        name = name[:-1]
    return f".{name}."


@contextlib.contextmanager
def atomic_open(path, mode: str = "wb"):
    """Open a temporary sibling of `path` for writing; rename it over `path` on success."""
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise InputError(f"output folder does not exist: {folder}")
    if not os.access(folder, os.W_OK):
        raise InputError(f"output folder is not writable: {folder}")
    fd, tmp = tempfile.mkstemp(prefix=temp_prefix(path.name, folder), suffix=".tmp", dir=folder)
    try:
        # mkstemp makes 0600 files; give the result the mode a plain open() would.
        os.chmod(tmp, 0o666 & ~_umask())
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_bytes_atomic(path, data: bytes) -> None:
    with atomic_open(path, "wb") as f:
        f.write(data)


def write_text_atomic(path, text: str) -> None:
    write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path, obj, indent: int | None = None, allow_nan: bool = True) -> None:
    """`obj` as JSON, atomically; `allow_nan=False` refuses NaN/inf (not strict JSON)."""
    write_text_atomic(path, json.dumps(obj, indent=indent, allow_nan=allow_nan) + "\n")


def save_npz_atomic(path, **arrays) -> None:
    """np.savez to `path` atomically (the name is used as given; no '.npz' is appended)."""
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    write_bytes_atomic(path, buf.getvalue())


def arrays_sha256(*arrays) -> str:
    """sha256 of the arrays' dtypes, shapes and bytes, in order."""
    h = hashlib.sha256()
    for a in arrays:
        a = np.ascontiguousarray(a)
        h.update(f"{a.dtype.str}{a.shape}".encode())
        h.update(a.reshape(-1).view(np.uint8))  # the bytes, not a copy
    return h.hexdigest()


def sha256_file(path, block: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            h.update(chunk)
    return h.hexdigest()


def _refuse_objects(path, error: Exception) -> None:
    """NumPy's refusal of a pickled object array (a whole file, not a corrupt one), said so."""
    if str(error).startswith("Object arrays"):
        raise InputError(f"{path} holds an array of Python objects (pickled), not numbers; save "
                         "the features as a float array") from None


def load_features(path, label_column: bool = False, key: str = "features"):
    """Load a feature matrix from `.npy` ([n, d]) or `.npz` (array `key`, optional `labels`).

    With `label_column`, the file is the authors' layout [n, d + 1] whose last column is a label
    (returned separately, never used for selection).
    Returns (features float array [n, d], labels int array [n] or None).
    Raises InputError with a one-line message for every problem a user can cause.
    """
    path = Path(path)
    if not path.exists():
        raise InputError(f"features file not found: {path}")
    if path.is_dir():
        raise InputError(f"features path is a folder, not a file: {path}")
    if not os.access(path, os.R_OK):
        raise InputError(f"features file is not readable: {path}")
    labels = None
    try:
        loaded = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
        with open(path, "rb") as f:
            head = f.read(64).lstrip()
        if head[:1] in (b"[", b"{"):  # numpy's own message would advise unpickling it
            raise InputError(f"{path} is JSON (a selection or results file?), not a NumPy "
                             ".npy/.npz feature file") from None
        _refuse_objects(path, e)
        why = str(e).splitlines()[0]
        if "pickled" in why:  # neither header: NumPy took it for a pickle, and would advise loading one
            why = "it starts with neither the .npy header nor a zip archive's"
        raise InputError(f"{path} is not a NumPy .npy/.npz file ({why})") from None
    if isinstance(loaded, np.lib.npyio.NpzFile):
        with loaded:
            if key not in loaded.files:
                raise InputError(f"{path} has no array named '{key}' (found: {', '.join(loaded.files) or 'none'})")
            try:
                features = loaded[key]
                if "labels" in loaded.files and not label_column:
                    labels = loaded["labels"]
            except (ValueError, OSError, EOFError, zipfile.BadZipFile, zlib.error) as e:
                # zlib.error: a damaged member of a compressed .npz (np.savez_compressed)
                _refuse_objects(path, e)
                raise InputError(f"{path} is corrupt ({str(e).splitlines()[0]})") from None
    else:
        features = loaded
    if features.dtype == object or features.dtype.kind not in "fiu":
        raise InputError(f"{path}: features must be numeric, got dtype {features.dtype}")
    if features.ndim != 2:
        raise InputError(f"{path}: features must be 2-D [n, d], got shape {features.shape}")
    if label_column:
        if features.shape[1] < 2:
            raise InputError(f"{path}: --label-column needs at least 2 columns, got {features.shape[1]}")
        labels = features[:, -1]
        features = features[:, :-1]
    if features.shape[0] == 0 or features.shape[1] == 0:
        raise InputError(f"{path}: features are empty, shape {features.shape}")
    if features.dtype.kind != "f":
        features = features.astype(np.float32)
    elif not features.dtype.isnative:  # a file written on a big-endian machine
        features = features.astype(features.dtype.newbyteorder("="))
    if not np.isfinite(features).all():
        raise InputError(f"{path}: features contain NaN or Inf")
    if labels is not None:
        labels = np.asarray(labels)
        if labels.shape != (features.shape[0],):
            raise InputError(f"{path}: labels must have shape ({features.shape[0]},), one per "
                             f"row of the features, got {labels.shape}")
        if labels.dtype.kind not in "fiub" or (
                labels.dtype.kind == "f" and not (np.isfinite(labels).all()
                                                  and (labels == np.round(labels)).all())):
            where = ("--label-column: its last column must hold class ids (whole numbers); "
                     "without the flag every column is a feature" if label_column
                     else "labels must be whole numbers (class ids)")
            raise InputError(f"{path}: {where}, got {labels.dtype} values such as "
                             f"{labels.reshape(-1)[:3].tolist()}")
        with np.errstate(invalid="ignore"):
            as_int = labels.astype(np.int64)
        # 1e30 or a uint64 above 2**63 would become int64's minimum or a negative id, silently
        if not (as_int == labels).all():
            bad = labels.reshape(-1)[as_int != labels][0]
            raise InputError(f"{path}: label {bad.item()!r} is out of the range of class ids "
                             "(64-bit integers)")
        labels = as_int
    return features, labels


def indices_sha256(indices) -> str:
    """sha256 of an index list's content (not of a file's bytes: reformatting keeps it); the
    `indices_sha256` that ties a `bilaf select` record to its list."""
    return hashlib.sha256(json.dumps([int(i) for i in indices]).encode()).hexdigest()


def selection_record_path(selection_path) -> Path:
    """sel.json -> sel.meta.json: the provenance record `bilaf select` writes beside a list."""
    path = Path(selection_path)
    stem = path.name[:-5] if path.name.endswith(".json") else path.name
    return path.with_name(stem + ".meta.json")


def read_json_object(path) -> dict | None:
    """The JSON object in the file `path`, or None where there is none, it cannot be read or
    parsed, or it holds something else than an object."""
    try:
        obj = json.loads(Path(path).read_text())
    except (OSError, ValueError, RecursionError):
        return None
    return obj if isinstance(obj, dict) else None


def read_selection_record(selection_path) -> dict | None:
    """The record `bilaf select` wrote beside a selection list (`selection_record_path`), or
    None where there is none or it is not a JSON object."""
    return read_json_object(selection_record_path(selection_path))


def load_index_list(path, n: int | None = None, name: str = "selection", *,
                    allow_empty: bool = False) -> list[int]:
    """Read a JSON list of unique non-negative ints (a selection file), checking range if n
    given. `allow_empty`: [] is a valid list (no labelled rows yet), not an error."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{name} file not found: {path}")
    if path.is_dir():  # reading it would say "not valid JSON ([Errno 21] Is a directory ...)"
        raise InputError(f"{name} path is a folder, not a file: {path}")
    try:
        obj = json.loads(path.read_text())
    except OSError as e:
        raise InputError(f"{name} file {path} cannot be read ({e.strerror or e})") from None
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        # RecursionError: lists nested thousands deep, which json gives up on
        raise InputError(f"{name} file {path} is not valid JSON ({e})") from None
    if isinstance(obj, dict) and "indices" in obj:
        # a `bilaf run` selection record: its bare list is beside it
        stem = path.name[:-5] if path.name.endswith(".json") else path.name
        beside = path.with_name(stem + ".indices.json")
        hint = (f"use the list beside it, {beside.name}" if beside.is_file() else
                "write its 'indices' list to a file of its own")
        raise InputError(f"{name} file {path} is a `bilaf run` selection record, not a JSON "
                         f"list; {hint}")
    if not isinstance(obj, list) or not all(
        isinstance(v, int) and not isinstance(v, bool) for v in obj
    ):
        raise InputError(f"{name} file {path} must be a JSON list of integers")
    if not obj and not allow_empty:
        raise InputError(f"{name} file {path} is an empty list")
    if len(set(obj)) != len(obj):
        seen, dup = set(), None
        for v in obj:
            if v in seen:
                dup = v
                break
            seen.add(v)
        # official mode can pick a sample twice, as the authors' script does
        hint = "; `bilaf select --unique` writes each sample once" if name == "selection" else ""
        raise InputError(f"{name} file {path} repeats index {dup}{hint}")
    bad = [v for v in obj if v < 0 or (n is not None and v >= n)]
    if bad:
        bound = f"[0, {n})" if n is not None else ">= 0"
        raise InputError(f"{name} file {path} has index {bad[0]} out of range {bound}")
    return obj
