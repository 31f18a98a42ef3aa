"""Safe loading of NVIDIA EDM network pickles (``edm-*.pkl``, ``network-snapshot-*.pkl``).

EDM stores every network object as a call to ``torch_utils.persistence._reconstruct_persistent_obj`` whose
argument carries the Python source of the defining module; EDM's own loader executes that source. Here an
allow-list unpickler turns each such call into an inert record (class name + attribute dict), and networks
are rebuilt by class name with our own classes from the recorded constructor arguments and tensors. Nothing
stored in the file is ever executed or imported. Format facts: ``docs/edm.md`` §5.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import io
import os
import pickle
import struct
from typing import Any, BinaryIO, Iterator, Optional, Union

import torch

from .classes import NETWORK_CLASSES, PRECOND_CLASSES

__all__ = ["load_network_pickle", "NetworkPickleError", "UnsafePickleError", "InertRecord"]

# Persistent classes that are not networks: returned as inert records, never instantiated.
INERT_CLASSES = frozenset({"EDMLoss", "VPLoss", "VELoss", "AugmentPipe"})
_EXPECTED = "an EDM network pickle (network-snapshot-*.pkl or edm-*.pkl: a dict with an 'ema' network)"
_ZIP_MAGIC = b"PK\x03\x04"
# Start of a legacy (non-zip) torch.save file: PROTO 2, then LONG1 of torch's 10-byte magic number.
_LEGACY_TORCH_MAGIC = b"\x80\x02\x8a\x0a" + (0x1950A86A20F9469CFC6C).to_bytes(10, "little")


class NetworkPickleError(ValueError):
    """A file is missing, corrupt, or not an EDM network pickle; the message names the file and the fix."""


class UnsafePickleError(NetworkPickleError):
    """A pickle references a global or persistent class outside the allow-list; nothing was executed."""


class _FormatError(Exception):
    """Internal: the stream is malformed; turned into a NetworkPickleError that names the file."""


_STORAGE_DTYPES = {
    "FloatStorage": torch.float32, "DoubleStorage": torch.float64, "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8, "BoolStorage": torch.bool,
}


class _FlatStorage:
    """A decoded storage: a flat 1-D tensor that tensors are strided views of."""

    __slots__ = ("data",)

    def __init__(self, data: torch.Tensor):
        self.data = data

    def __setstate__(self, state: Any) -> None:
        raise _FormatError("BUILD applied to a storage")


class _TensorRef:
    """A rebuilt tensor, wrapped so that a BUILD opcode cannot reach ``torch.Tensor.__setstate__``."""

    __slots__ = ("tensor",)

    def __init__(self, tensor: torch.Tensor):
        self.tensor = tensor

    def __setstate__(self, state: Any) -> None:
        raise _FormatError("BUILD applied to a tensor")


class _PayloadUnpickler(pickle.Unpickler):
    """Reads the small pickles inside a storage payload: no globals except ``torch.<X>Storage``."""

    def __init__(self, file: BinaryIO, storage_ids: list):
        super().__init__(file)
        self._ids = storage_ids

    def find_class(self, module: str, name: str) -> Any:
        if module == "torch" and name in _STORAGE_DTYPES:
            return _STORAGE_DTYPES[name]
        raise _FormatError(f"storage payload references '{module}.{name}'; only torch.*Storage types are allowed")

    def persistent_load(self, pid: Any) -> Any:
        # Legacy torch.save id: ('storage', dtype, key, location, numel, view_metadata).
        if (type(pid) is not tuple or len(pid) != 6 or pid[0] != "storage" or type(pid[1]) is not torch.dtype
                or type(pid[2]) is not str or type(pid[4]) is not int):
            raise _FormatError(f"malformed storage id {pid!r:.100}")
        self._ids.append(pid)
        return pid


def _load_storage_payload(payload: Any) -> _FlatStorage:
    """Safe ``torch.storage._load_from_bytes``: parse the legacy torch.save stream of one storage (§5.3).

    Parts: magic number, protocol 1001, sys_info, a pickle holding one persistent storage id, the key list,
    then per key an int64 LE element count and the raw little-endian elements.
    """
    if not isinstance(payload, (bytes, bytearray)):
        raise _FormatError("storage payload is not bytes")
    f, ids = io.BytesIO(payload), []
    reader = lambda: _PayloadUnpickler(f, ids).load()  # noqa: E731 - each part is its own small pickle
    try:
        magic, protocol, sys_info = reader(), reader(), reader()
        if magic != 0x1950A86A20F9469CFC6C or protocol != 1001 or type(sys_info) is not dict:
            raise _FormatError("storage payload is not a legacy torch.save stream")
        if not sys_info.get("little_endian", False):
            raise _FormatError("big-endian storage payloads are not supported")
        root, keys = reader(), reader()
    except (pickle.UnpicklingError, EOFError) as exc:
        raise _FormatError(f"storage payload is truncated or corrupt ({exc})") from None
    if len(ids) != 1 or root is not ids[0] or type(keys) is not list or keys != [root[2]]:
        raise _FormatError("storage payload must hold exactly one storage")
    _, dtype, _, _, numel, view = root
    (count,) = struct.unpack("<q", f.read(8).ljust(8, b"\xff"))
    itemsize = torch.empty((), dtype=dtype).element_size()
    if count != numel or numel < 0 or numel * itemsize > len(payload) - f.tell():  # check before allocating
        raise _FormatError(f"storage payload is truncated or corrupt: {count} of {numel} elements")
    raw = bytearray(numel * itemsize)
    f.readinto(raw)
    flat = torch.frombuffer(raw, dtype=dtype) if numel else torch.empty(0, dtype=dtype)
    if view is not None:  # a view into a larger storage (very old torch): (key, offset, size)
        if (type(view) is not tuple or len(view) != 3 or type(view[1]) is not int or type(view[2]) is not int
                or view[1] < 0 or view[1] + view[2] > numel):
            raise _FormatError("malformed storage view")
        flat = flat[view[1]:view[1] + view[2]]
    return _FlatStorage(flat)


@dataclasses.dataclass
class InertRecord:
    """A persistent EDM object that is not a network (``loss_fn``, ``augment_pipe``): data only, runs nothing.

    ``class_name`` is EDM's class name (e.g. ``'EDMLoss'``), ``init_kwargs`` the constructor arguments EDM
    recorded (numpy scalars as Python numbers), ``state`` the remaining attributes.
    """

    class_name: str
    init_kwargs: dict
    state: dict
    init_args: tuple = ()


class _Persistent:
    """What ``_reconstruct_persistent_obj`` yields while unpickling: a class name and an attribute dict."""

    __slots__ = ("class_name", "state")

    def __init__(self, class_name: str, state: dict):
        self.class_name = class_name
        self.state = state

    def __setstate__(self, state: Any) -> None:  # a BUILD could otherwise rename an already-checked record
        raise _FormatError("BUILD applied to a persistent object")


class _ModuleDictStandIn:
    """Stands in for ``torch.nn.ModuleDict`` (EDM's ``enc``/``dec``): accepts NEWOBJ + BUILD and keeps the dict."""

    __slots__ = ("state",)
    class_name = "ModuleDict"

    def __setstate__(self, state: Any) -> None:
        if type(state) is not dict or hasattr(self, "state"):
            raise _FormatError("malformed ModuleDict state (expected one dict)")
        self.state = state


class _NumpyDtype:
    """Stands in for ``numpy.dtype`` inside a pickle; only the type code and byte order are kept."""

    __slots__ = ("code", "byteorder")
    _FORMATS = {"f2": "e", "f4": "f", "f8": "d", "i1": "b", "i2": "h", "i4": "i", "i8": "q",
                "u1": "B", "u2": "H", "u4": "I", "u8": "Q", "b1": "?"}

    def __init__(self, code: Any, align: Any = False, copy: Any = True):
        if code not in self._FORMATS:
            raise _FormatError(f"numpy scalar of dtype {code!r} is not supported (only numbers)")
        self.code, self.byteorder = code, "<"

    def __setstate__(self, state: Any) -> None:
        if type(state) is not tuple or len(state) < 2 or state[1] not in ("<", ">", "|", "="):
            raise _FormatError("malformed numpy dtype state")
        self.byteorder = ">" if state[1] == ">" else "<"


def _numpy_scalar(dtype: Any, data: Any = None) -> Union[float, int, bool]:
    """Decode what ``numpy.core.multiarray.scalar(dtype, bytes)`` would build, as a plain Python number."""
    if type(dtype) is not _NumpyDtype or not isinstance(data, (bytes, bytearray)):
        raise _FormatError("malformed numpy scalar")
    fmt = dtype.byteorder + _NumpyDtype._FORMATS[dtype.code]
    if len(data) != struct.calcsize(fmt):
        raise _FormatError(f"numpy scalar of dtype {dtype.code} has {len(data)} bytes")
    return struct.unpack(fmt, data)[0]


def _latin1_encode(text: Any, encoding: Any = "utf-8") -> bytes:
    """``_codecs.encode`` as protocol-2 pickles use it for bytes; only latin-1 text is accepted."""
    if type(text) is not str or encoding not in ("latin1", "latin-1"):
        raise _FormatError("_codecs.encode is only allowed for latin-1 text")
    return text.encode("latin-1")


def _check_ints(values: Any, what: str) -> tuple:
    if type(values) not in (tuple, list) or not all(type(v) is int and v >= 0 for v in values):
        raise _FormatError(f"tensor {what} must be a tuple of non-negative ints, got {values!r:.80}")
    return tuple(values)


def _rebuild_tensor(storage: Any, offset: Any, size: Any, stride: Any, requires_grad: Any = False,
                    hooks: Any = None, metadata: Any = None) -> _TensorRef:
    """Safe ``torch._utils._rebuild_tensor_v2``: a strided view of a decoded storage, bounds-checked."""
    if type(storage) is not _FlatStorage or type(offset) is not int or offset < 0:
        raise _FormatError("malformed tensor (storage or offset)")
    size, stride = _check_ints(size, "size"), _check_ints(stride, "stride")
    if len(size) != len(stride):
        raise _FormatError("tensor size and stride differ in length")
    numel = storage.data.numel()
    if 0 not in size and offset + sum((n - 1) * s for n, s in zip(size, stride)) >= numel:
        raise _FormatError(f"tensor of size {size} does not fit its storage of {numel} elements")
    return _TensorRef(storage.data.as_strided(size, stride, offset))


def _rebuild_parameter(data: Any, requires_grad: Any = False, hooks: Any = None, state: Any = None) -> _TensorRef:
    """Safe ``_rebuild_parameter[_with_state]``: keep the values only (no hooks, no Python attributes)."""
    if type(data) is not _TensorRef:
        raise _FormatError("malformed parameter")
    return data


class _SafeUnpickler(pickle.Unpickler):
    """Allow-list unpickler for EDM's persistence format (``docs/edm.md`` §5.5)."""

    def __init__(self, file: BinaryIO, source: str, known_classes: frozenset):
        super().__init__(file)
        self._source = source
        self._known = known_classes
        self._allowed = {
            ("torch_utils.persistence", "_reconstruct_persistent_obj"): self._reconstruct,
            ("collections", "OrderedDict"): collections.OrderedDict,
            ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
            ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
            ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
            ("torch.storage", "_load_from_bytes"): _load_storage_payload,
            ("torch.nn.modules.container", "ModuleDict"): _ModuleDictStandIn,
            ("numpy.core.multiarray", "scalar"): _numpy_scalar,   # numpy 1.x (released pickles)
            ("numpy._core.multiarray", "scalar"): _numpy_scalar,  # numpy 2.x
            ("numpy", "dtype"): _NumpyDtype,
            ("builtins", "set"): set, ("__builtin__", "set"): set,  # protocol <= 2 spells sets this way
            ("_codecs", "encode"): _latin1_encode,
        }

    def find_class(self, module: str, name: str) -> Any:
        found = self._allowed.get((module, name))
        if found is None:
            raise UnsafePickleError(
                f"{self._source}: refused to load: the pickle references the global '{module}.{name}', which is "
                f"not on the allow-list for {_EXPECTED}. Nothing from the file was executed.")
        return found

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafePickleError(f"{self._source}: refused to load: unexpected persistent id {pid!r:.100} "
                                f"(EDM network pickles have none). Nothing from the file was executed.")

    def _reconstruct(self, meta: Any) -> _Persistent:
        """Replacement for ``_reconstruct_persistent_obj``: check the record, never look at ``module_src``."""
        if type(meta) is not dict or type(meta.get("state")) is not dict:
            raise _FormatError("malformed persistent object (expected a dict with a 'state' dict)")
        if meta.get("type") != "class" or meta.get("version") != 6:
            raise _FormatError(f"persistent object of type {meta.get('type')!r:.40}, version "
                                     f"{meta.get('version')!r:.40}; only EDM's version-6 'class' objects exist")
        name = meta.get("class_name")
        if type(name) is not str or name not in self._known:
            raise UnsafePickleError(
                f"{self._source}: refused to load: persistent class {name!r:.100} is not a known EDM class "
                f"(known: {', '.join(sorted(self._known))}). Its embedded module source was not executed.")
        return _Persistent(name, meta["state"])


def load_network_pickle(path_or_file: Union[str, os.PathLike, BinaryIO]) -> dict:
    """Load an EDM network pickle without executing anything stored in it.

    Accepts a path or an open binary file (read from its current position). Returns a plain dict with the
    pickle's keys in order: ``'ema'`` is one of our preconditioners (``EDMPrecond``, ``VPPrecond``,
    ``VEPrecond``, ``iDDPMPrecond``) with the file's weights, in eval mode with ``requires_grad`` False, on
    CPU; ``'loss_fn'`` / ``'augment_pipe'`` are ``InertRecord``s (or None); ``'dataset_kwargs'`` a plain
    dict. Torch's global RNG state is left untouched.

    Raises ``UnsafePickleError`` for any global or persistent class outside the allow-list and
    ``NetworkPickleError`` for a missing, truncated, corrupt or wrong-kind file.
    """
    known = frozenset(NETWORK_CLASSES) | frozenset(PRECOND_CLASSES) | INERT_CLASSES
    with _open_binary(path_or_file) as (f, source):
        head = _check_header(f, source)
        raw = _unpickle(f, source, known, head)
    if type(raw) not in (dict, collections.OrderedDict):
        raise NetworkPickleError(f"{source}: holds a {type(raw).__name__} at the top level; expected {_EXPECTED}")
    if "ema" not in raw:
        keys = ", ".join(repr(k) for k in dict.keys(raw)) or "none"
        raise NetworkPickleError(f"{source}: has no 'ema' network (top-level keys: {keys}); expected {_EXPECTED}")
    out, plain = {}, _Plainer()   # one walker: objects shared between keys are converted once
    try:
        for key, value in dict.items(raw):
            if isinstance(value, _Persistent) and value.class_name in PRECOND_CLASSES:
                out[key] = _build_network(value, PRECOND_CLASSES[value.class_name], source, key)
            else:
                out[key] = plain(value)
    except _FormatError as exc:
        raise NetworkPickleError(f"{source}: is corrupt: {exc}; expected {_EXPECTED}") from None
    except RecursionError:
        raise NetworkPickleError(f"{source}: is corrupt: its module tree is cyclic or absurdly deep; "
                                 f"expected {_EXPECTED}") from None
    if not isinstance(out["ema"], torch.nn.Module):
        got = out["ema"].class_name if isinstance(out["ema"], InertRecord) else type(out["ema"]).__name__
        raise NetworkPickleError(f"{source}: 'ema' is a {got}; expected one of the preconditioners "
                                 f"{', '.join(sorted(PRECOND_CLASSES))}")
    return out


@contextlib.contextmanager
def _open_binary(path_or_file: Any) -> Iterator[tuple]:
    """Yield ``(seekable binary file, name for messages)`` for a path or an open file."""
    if isinstance(path_or_file, (str, os.PathLike)):
        path = os.fspath(path_or_file)
        if not os.path.exists(path):
            raise NetworkPickleError(f"network pickle not found: {path}; check the path. Expected {_EXPECTED}")
        if os.path.isdir(path):
            raise NetworkPickleError(f"{path} is a directory; expected {_EXPECTED}")
        with open(path, "rb") as f:
            yield f, path
        return
    if not hasattr(path_or_file, "read"):
        raise TypeError(f"load_network_pickle expects a path or an open binary file, got {type(path_or_file)}")
    source = str(getattr(path_or_file, "name", "<file object>"))
    if isinstance(path_or_file, io.TextIOBase):
        raise NetworkPickleError(f"{source}: was opened in text mode; open it with open(path, 'rb')")
    seekable = getattr(path_or_file, "seekable", lambda: False)()
    yield (path_or_file if seekable else io.BytesIO(path_or_file.read())), source


def _check_header(f: BinaryIO, source: str) -> bytes:
    """Recognise files that are certainly not EDM network pickles, to say what they are instead."""
    start = f.tell()
    head = f.read(16)
    f.seek(start)
    if not head:
        raise NetworkPickleError(f"{source}: the file is empty; expected {_EXPECTED}")
    if head.startswith(_ZIP_MAGIC) or head.startswith(_LEGACY_TORCH_MAGIC):
        raise NetworkPickleError(
            f"{source}: is a torch.save file (for example EDM's training-state-*.pt or a pid checkpoint), not "
            f"a network pickle; expected {_EXPECTED}. For an EDM run, use the network-snapshot-*.pkl of the "
            f"same step.")
    if head[0] != 0x80 or not 2 <= head[1] <= pickle.HIGHEST_PROTOCOL:
        # EDM writes protocol 4; older protocols have no header and would let any text be read as opcodes.
        raise NetworkPickleError(f"{source}: is not a pickle file of protocol 2 or newer (it starts with "
                                 f"{head[:12]!r}); expected {_EXPECTED}")
    return head


def _unpickle(f: BinaryIO, source: str, known: frozenset, head: bytes) -> Any:
    """Run the allow-list unpickler; every failure becomes a NetworkPickleError naming the file."""
    unpickler = _SafeUnpickler(f, source, known)
    try:
        return unpickler.load()
    except NetworkPickleError:
        raise
    except EOFError:
        raise NetworkPickleError(f"{source}: is truncated (the pickle stream ends early); expected {_EXPECTED}. "
                                 "Download or copy the file again.") from None
    except _FormatError as exc:
        raise NetworkPickleError(f"{source}: is corrupt: {exc}; expected {_EXPECTED}") from None
    except pickle.UnpicklingError as exc:
        if "truncated" in str(exc):
            raise NetworkPickleError(f"{source}: is truncated ({exc}); expected {_EXPECTED}. Download or copy "
                                     "the file again.") from None
        raise NetworkPickleError(f"{source}: is not a pickle file or is corrupt ({exc}); it starts with "
                                 f"{head[:12]!r}; expected {_EXPECTED}") from None
    except MemoryError:  # a length field claims more bytes than memory holds; nothing was read yet
        raise NetworkPickleError(f"{source}: is corrupt: it claims an object larger than the available memory; "
                                 f"expected {_EXPECTED}") from None
    except Exception as exc:  # anything else the pickle machine raises on a malformed stream
        raise NetworkPickleError(f"{source}: is corrupt ({type(exc).__name__}: {exc}); expected {_EXPECTED}") \
            from None
    finally:  # the memo holds every storage payload and sits in a reference cycle: free it now, not at GC time
        unpickler.memo.clear()


def _state_of(record: Any) -> dict:
    """The attribute dict of a record; a ModuleDict that never got its BUILD state is corrupt."""
    state = getattr(record, "state", None)
    if type(state) is not dict:
        raise _FormatError(f"{record.class_name} object without a state dict")
    return state


def _as_dict(value: Any, what: str) -> dict:
    if value is None:
        return {}
    if type(value) not in (dict, collections.OrderedDict):
        raise _FormatError(f"{what} is a {type(value).__name__}, expected a dict")
    return value


# Bounds on what the walk over unpickled data accepts. Pickles share objects by reference (the memo), so a
# 263 KB file can describe nested lists whose naive expansion has 2^80 items ("billion laughs"): each shared
# object is converted once, and a file whose expansion would still be huge for any consumer is refused.
_MAX_DEPTH = 64                 # nesting levels of plain data or modules; EDM's own files use fewer than 20
_MAX_EXPANDED_ITEMS = 10 ** 7   # items a full (unshared) copy of one value would have; EDM's have < 10^4


class _Plainer:
    """Turn unpickled data into plain Python: records become InertRecords, tensors are detached views.

    Each distinct object is converted once (memoised by identity) and shared objects stay shared in the
    result, so the work is linear in the number of pickle opcodes. Alongside each result the walker keeps
    its expanded size (items counted as if every reference were a copy) to refuse data that a consumer
    could not copy or serialise.
    """

    def __init__(self):
        self._done: dict = {}        # id(object) -> (plain value, expanded size); objects stay alive in the tree
        self._open: set = set()      # ids on the current path, to report cycles instead of recursing forever

    def __call__(self, value: Any) -> Any:
        return self._walk(value, 0)[0]

    def _walk(self, value: Any, depth: int) -> tuple:
        if value is None or type(value) in (bool, int, float, str, bytes):
            return value, 1
        if type(value) is _TensorRef:
            return value.tensor.detach(), 1
        key = id(value)
        if key in self._done:
            return self._done[key]
        if key in self._open:
            raise _FormatError("data that contains itself (a reference cycle)")
        if depth >= _MAX_DEPTH:
            raise _FormatError(f"data nested more than {_MAX_DEPTH} levels deep")
        self._open.add(key)
        try:
            result = self._convert(value, depth + 1)
        finally:
            self._open.discard(key)
        if result[1] > _MAX_EXPANDED_ITEMS:
            raise _FormatError(f"shared references that expand to more than {_MAX_EXPANDED_ITEMS:,} items")
        self._done[key] = result
        return result

    def _convert(self, value: Any, depth: int) -> tuple:
        if isinstance(value, (_Persistent, _ModuleDictStandIn)):
            raw = _state_of(value)
            state, n = self._dict({k: v for k, v in dict.items(raw) if k not in ("_init_args", "_init_kwargs")},
                                  depth)
            kwargs, nk = self._walk(raw.get("_init_kwargs", {}), depth)
            args, na = self._walk(raw.get("_init_args", ()), depth)
            return InertRecord(value.class_name, kwargs if type(kwargs) is dict else {}, state,
                               tuple(args) if type(args) in (tuple, list) else ()), n + nk + na
        if type(value) in (dict, collections.OrderedDict):
            return self._dict(value, depth)
        if type(value) in (list, tuple):
            parts = [self._walk(v, depth) for v in value]
            return type(value)(p[0] for p in parts), 1 + sum(p[1] for p in parts)
        if type(value) is set:
            if not all(v is None or type(v) in (bool, int, float, str, bytes) for v in value):
                raise _FormatError("a set holds something other than numbers or strings")
            return set(value), 1 + len(value)
        raise _FormatError(f"unexpected object of type {type(value).__name__}")

    def _dict(self, value: dict, depth: int) -> tuple:
        out, size = {}, 1
        for k, v in dict.items(value):
            if not (k is None or type(k) in (bool, int, float, str, bytes)):
                raise _FormatError(f"a dict key is a {type(k).__name__}, not a number or string")
            out[k], n = self._walk(v, depth)
            size += 1 + n
        return out, size


def _plain(value: Any) -> Any:
    """Plain Python for one unpickled value (see `_Plainer`); shared objects within it are converted once."""
    return _Plainer()(value)


def _state_dict_of(record: Any, prefix: str, out: dict, seen: Optional[set] = None) -> dict:
    """EDM's state_dict from a record tree: parameters, persistent buffers, then submodules (§5.5).

    EDM networks never share a submodule, so a record reached twice (a cycle, or a diamond that would make
    the walk exponential) marks the file as corrupt; depth is bounded by ``_MAX_DEPTH``.
    """
    seen = set() if seen is None else seen
    if id(record) in seen:
        raise _FormatError(f"submodule {prefix.rstrip('.') or 'network'} appears more than once in the module "
                           "tree (shared or cyclic)")
    if prefix.count(".") >= _MAX_DEPTH:
        raise _FormatError(f"the module tree is nested more than {_MAX_DEPTH} levels deep")
    seen.add(id(record))
    state = _state_of(record)
    skip = state.get("_non_persistent_buffers_set") or set()
    if type(skip) not in (set, frozenset, list, tuple):
        raise _FormatError(f"{prefix or 'network '}_non_persistent_buffers_set is not a set")
    for group in ("_parameters", "_buffers"):
        for name, tensor in dict.items(_as_dict(state.get(group), f"{prefix or 'network '}{group}")):
            if tensor is None or (group == "_buffers" and name in skip):
                continue
            if type(tensor) is not _TensorRef:
                raise _FormatError(f"{prefix}{name} is a {type(tensor).__name__}, not a tensor")
            out[f"{prefix}{name}"] = tensor.tensor.detach()
    for name, child in dict.items(_as_dict(state.get("_modules"), f"{prefix or 'network '}_modules")):
        if child is None:
            continue
        if not isinstance(child, (_Persistent, _ModuleDictStandIn)) or child.class_name in INERT_CLASSES:
            raise _FormatError(f"submodule {prefix}{name} is not a network layer")
        _state_dict_of(child, f"{prefix}{name}.", out, seen)
    return out


def _build_network(record: _Persistent, cls: type, source: str, key: str) -> torch.nn.Module:
    """Build our preconditioner from the record's ``_init_kwargs`` and load its tensors strictly."""
    kwargs = _plain(record.state.get("_init_kwargs"))
    if type(kwargs) is not dict or not all(type(k) is str for k in kwargs) or record.state.get("_init_args"):
        raise NetworkPickleError(f"{source}: is corrupt: '{key}' ({record.class_name}) has no usable "
                                 "constructor arguments (_init_kwargs)")
    model = dict.get(_as_dict(record.state.get("_modules"), "_modules"), "model")
    model_type = kwargs.get("model_type")
    if isinstance(model, _Persistent) and model_type is not None and model.class_name != model_type:
        raise NetworkPickleError(f"{source}: is corrupt: '{key}' says model_type={model_type!r} but holds a "
                                 f"{model.class_name}")
    try:
        with torch.random.fork_rng(devices=[]):  # construction draws random init we overwrite: keep RNG as is
            net = cls(**kwargs)
    except Exception as exc:  # whatever our constructors say about arguments from the file
        raise NetworkPickleError(f"{source}: '{key}' ({record.class_name}) cannot be rebuilt from its stored "
                                 f"constructor arguments {kwargs!r:.300}: {exc}") from None
    tensors = _state_dict_of(record, "", {})
    own = net.state_dict()
    problems = [f"missing {k}" for k in own if k not in tensors]
    problems += [f"unexpected {k}" for k in tensors if k not in own]
    problems += [f"{k} has shape {tuple(tensors[k].shape)}, expected {tuple(v.shape)}"
                 for k, v in own.items() if k in tensors and tensors[k].shape != v.shape]
    if problems:
        raise NetworkPickleError(f"{source}: '{key}' ({record.class_name}) does not match the network its "
                                 f"arguments describe ({len(problems)} problems): {'; '.join(problems[:5])}")
    net.load_state_dict(tensors, strict=True)
    return net.eval().requires_grad_(False)

