"""Reading PyTorch checkpoints without PyTorch.

`torch.save` writes either the legacy format (before torch 1.6: five pickles in a row, then the
raw bytes of each storage) or a zip archive (`<root>/data.pkl` plus `<root>/data/<key>` per
storage). Tensors are pickled as calls to `torch._utils._rebuild_tensor_v2(storage, offset,
size, stride, ...)` whose storage is a persistent id naming the storage. A restricted unpickler
resolves only those few globals, so loading a checkpoint runs no arbitrary code, and returns
NumPy arrays in place of tensors.
"""

from __future__ import annotations

import collections
import contextlib
import io
import math
import mmap
import pickle
import struct
import zipfile
from pathlib import Path

import numpy as np

from bilaf_jax.io import InputError

_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_STORAGE_DTYPES = {
    "DoubleStorage": np.float64,
    "FloatStorage": np.float32,
    "HalfStorage": np.float16,
    "LongStorage": np.int64,
    "IntStorage": np.int32,
    "ShortStorage": np.int16,
    "CharStorage": np.int8,
    "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
    "BFloat16Storage": "bfloat16",
}


class _StorageType:
    def __init__(self, name: str):
        if name not in _STORAGE_DTYPES:
            raise InputError(f"unsupported tensor storage type torch.{name}")
        dtype = _STORAGE_DTYPES[name]
        if dtype == "bfloat16":
            import ml_dtypes

            dtype = ml_dtypes.bfloat16
        self.dtype = np.dtype(dtype)


class _Storage:
    """A storage's dtype and key; `data` is filled in once its bytes are read."""

    def __init__(self, dtype: np.dtype, key: str, numel: int):
        self.dtype, self.key, self.numel = dtype, key, numel
        self.data: np.ndarray | None = None


# An expanded tensor (stride 0) repeats its stored elements; materialising one bigger than this
# would need memory the checkpoint never held, so such a view is refused.
_MAX_EXPANDED_BYTES = 1 << 30


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


class _LazyTensor:
    def __init__(self, storage: _Storage, offset, size, stride):
        self.storage, self.offset, self.size, self.stride = storage, offset, size, stride

    def materialise(self) -> np.ndarray:
        key = self.storage.key
        data = self.storage.data
        if data is None:
            raise InputError(f"storage {key} has no data")
        offset, size, stride = self.offset, self.size, self.stride
        # A crafted view could reach outside the storage (garbage or a segfault in as_strided).
        if not (_is_int(offset) and isinstance(size, (tuple, list))
                and isinstance(stride, (tuple, list)) and all(map(_is_int, size))
                and all(map(_is_int, stride)) and len(size) == len(stride) <= 32):
            raise InputError(f"bad tensor view of storage {key}")
        if offset < 0 or min(size, default=0) < 0 or min(stride, default=0) < 0:
            raise InputError(f"bad tensor view of storage {key} (negative offset, size or stride)")
        numel = math.prod(size)
        if numel == 0:
            return np.zeros(size, data.dtype)
        # a dimension of size 1 is never stepped along, whatever its stride says
        stride = tuple(0 if n == 1 else st for n, st in zip(size, stride, strict=True))
        last = offset + sum((n - 1) * st for n, st in zip(size, stride, strict=True))
        if last >= data.size:
            raise InputError(f"tensor view exceeds storage {key}")
        nbytes = numel * data.dtype.itemsize
        if numel > data.size and nbytes > _MAX_EXPANDED_BYTES:
            raise InputError(
                f"tensor view of storage {key} repeats its {data.size} elements as {numel} "
                f"({nbytes / 2**30:.1f} GiB); refusing to materialise it")
        view = np.lib.stride_tricks.as_strided(
            data[offset:],
            shape=size,
            strides=tuple(st * data.dtype.itemsize for st in stride),
            writeable=False,
        )
        return np.array(view)


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False,
                       backward_hooks=None, metadata=None):
    return _LazyTensor(storage, storage_offset, size, stride)


def _rebuild_tensor(storage, storage_offset, size, stride):
    return _LazyTensor(storage, storage_offset, size, stride)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None):
    return data


def _rebuild_parameter_with_state(data, requires_grad, backward_hooks, state):
    return data


class _Opaque:
    """Stands in for harmless objects stored beside the weights (e.g. training arguments)."""

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        self.state = state


_ALLOWED = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter_with_state,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("builtins", "slice"): slice,
    ("argparse", "Namespace"): _Opaque,  # DINO stores its training arguments
}


# Python's own unpickler, not the C one: the C unpickler grows its memo table to whatever index
# a BINPUT names, so four damaged bytes of a weight file make it zero up to 32 GiB (the process
# is killed for memory); this one keeps the memo in a dict. Its inputs (a BytesIO, an mmap)
# never read more than the file holds, whatever length a damaged opcode gives.
class _Unpickler(pickle._Unpickler):
    def __init__(self, file, storages: dict):
        super().__init__(file, encoding="latin1")
        self.storages = storages

    def find_class(self, module, name):
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(name)
        if module == "torch" and name in ("float32", "float16", "float64", "bfloat16", "int64"):
            return name
        if (module, name) in _ALLOWED:
            return _ALLOWED[(module, name)]
        raise pickle.UnpicklingError(f"refusing to load global {module}.{name}")

    def persistent_load(self, pid):
        if not isinstance(pid, tuple) or not pid or pid[0] != "storage":
            raise pickle.UnpicklingError(f"unsupported persistent id {pid!r}")
        storage_type, key, _location, numel = pid[1], str(pid[2]), pid[3], pid[4]
        if not isinstance(storage_type, _StorageType):
            raise pickle.UnpicklingError(f"unsupported storage type {storage_type!r}")
        if not _is_int(numel) or numel < 0:
            raise pickle.UnpicklingError(f"bad element count {numel!r} of storage {key}")
        if key not in self.storages:
            self.storages[key] = _Storage(storage_type.dtype, key, int(numel))
        storage = self.storages[key]
        if len(pid) > 5 and pid[5] is not None:  # legacy view: (view_key, offset, size)
            raise pickle.UnpicklingError("legacy storage views are not supported")
        return storage


def _materialise(obj):
    if isinstance(obj, _LazyTensor):
        return obj.materialise()
    if isinstance(obj, dict):
        return type(obj)((k, _materialise(v)) for k, v in obj.items()) if isinstance(
            obj, collections.OrderedDict) else {k: _materialise(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_materialise(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_materialise(v) for v in obj)
    return obj


def _load_legacy(f: mmap.mmap) -> object:
    """The object a legacy-format file holds; `f` maps the whole file."""
    magic = _Unpickler(f, {}).load()
    if magic != _LEGACY_MAGIC:
        raise InputError("not a PyTorch checkpoint (bad magic number)")
    protocol = _Unpickler(f, {}).load()
    if protocol != 1001:
        raise InputError(f"unsupported PyTorch legacy protocol version {protocol}")
    _Unpickler(f, {}).load()  # sys_info
    storages: dict[str, _Storage] = {}
    result = _Unpickler(f, storages).load()
    keys = _Unpickler(f, {}).load()
    for key in keys:
        key = str(key)
        head = f.read(8)
        if len(head) != 8:
            raise InputError("truncated PyTorch checkpoint (storage header)")
        (numel,) = struct.unpack("<q", head)
        if key not in storages:
            raise InputError(f"PyTorch checkpoint stores data for unknown storage {key}")
        st = storages[key]
        nbytes = numel * st.dtype.itemsize
        # a crafted header must not make read() allocate more than the file holds
        if numel < 0 or nbytes > f.size() - f.tell():
            raise InputError(f"truncated PyTorch checkpoint (storage {key})")
        raw = f.read(nbytes)
        if len(raw) != nbytes:
            raise InputError(f"truncated PyTorch checkpoint (storage {key})")
        st.data = np.frombuffer(raw, dtype=st.dtype.newbyteorder("<")).astype(st.dtype)
    return result


def _load_zip(zf: zipfile.ZipFile) -> object:
    names = zf.namelist()
    pkls = [n for n in names if n.endswith("data.pkl") and n.count("/") == 1]
    if not pkls:
        raise InputError("zip file is not a PyTorch checkpoint (no <root>/data.pkl)")
    root = pkls[0].split("/")[0]
    order = "little"
    if f"{root}/byteorder" in names:
        order = zf.read(f"{root}/byteorder").decode().strip()
    storages: dict[str, _Storage] = {}
    result = _Unpickler(io.BytesIO(zf.read(pkls[0])), storages).load()
    for key, st in storages.items():
        try:
            raw = zf.read(f"{root}/data/{key}")
        except KeyError:
            raise InputError(f"PyTorch checkpoint lacks storage data/{key}") from None
        if len(raw) < st.numel * st.dtype.itemsize:
            raise InputError(f"truncated PyTorch checkpoint (storage {key})")
        dt = st.dtype.newbyteorder("<" if order == "little" else ">")
        st.data = np.frombuffer(raw, dtype=dt, count=st.numel).astype(st.dtype)
    return result


def load_torch_checkpoint(path) -> object:
    """Load a `torch.save` file (legacy or zip) as nested dicts/lists of NumPy arrays.

    Raises InputError (one line) for a missing, unreadable or corrupt file.
    """
    path = Path(path)
    if path.is_dir():
        raise InputError(f"weight file {path} is a folder, not a file")
    if not path.is_file():
        raise InputError(f"weight file not found: {path}")
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as zf:
                result = _load_zip(zf)
        else:
            with open(path, "rb") as f:
                if not path.stat().st_size:
                    raise InputError("empty file, not a PyTorch checkpoint")
                with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
                    result = _load_legacy(m)
        return _materialise(result)
    except InputError as e:
        raise InputError(f"{path}: {e}") from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError,
            KeyError, struct.error, zipfile.BadZipFile, OSError, UnicodeDecodeError,
            RecursionError) as e:
        msg = " ".join(str(e).split()) or type(e).__name__
        if isinstance(e, pickle.UnpicklingError):  # of a text file: "Memo value not found"
            head = b"\0"
            with contextlib.suppress(OSError), open(path, "rb") as f:
                head = f.read(256)
            if head.isascii() and all(c.isprintable() or c.isspace() for c in head.decode()):
                msg = "it is a text file"  # torch.save writes binary pickles
        raise InputError(f"{path} is not a readable PyTorch checkpoint ({msg})") from None


class StateDictReader:
    """Hands out state-dict entries by name with shape checks and remembers which were used, so
    a loader can refuse files with entries it does not understand."""

    def __init__(self, state_dict, model: str):
        self.state_dict = state_dict
        self.model = model
        self.used: set[str] = set()

    def take(self, key: str, shape) -> np.ndarray:
        if key not in self.state_dict:
            raise InputError(f"weight file lacks '{key}' (not the state dict of {self.model}?)")
        w = np.asarray(self.state_dict[key], np.float32)
        if tuple(w.shape) != tuple(shape):
            raise InputError(f"weight '{key}' has shape {w.shape}, expected {tuple(shape)}")
        self.used.add(key)
        return w

    def check_all_used(self, ignore_suffix: str | None = None) -> None:
        extra = [k for k in self.state_dict if k not in self.used
                 and not (ignore_suffix and k.endswith(ignore_suffix))]
        if extra:
            raise InputError(f"weight file has unexpected entries, e.g. '{extra[0]}'")
