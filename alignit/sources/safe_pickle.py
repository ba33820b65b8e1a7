"""Reading ``torch.save`` files without torch's unpickler, so that their safety does not depend on the torch a WebUI
ships: ``weights_only=True`` runs code on torch < 2.6 (CVE-2025-32434) and corrupts memory on torch < 2.10
(CVE-2026-24747); A1111 1.10 ships torch 2.1.2, Forge torch 2.3.1.

Formats read:

- the zip archive of torch >= 1.6: ``<any folder>/data.pkl`` and one uncompressed record ``<folder>/data/<key>`` per
  storage, read straight from the file (checksum checked where one is written); a ``byteorder`` other than
  ``little`` is refused;
- the legacy stream (torch < 1.6, or ``_use_new_zipfile_serialization=False``): pickles of the magic number, the
  protocol, the system info, the object and the storage keys, then each storage as a little-endian int64 element
  count and its bytes. It costs one more reader of ~30 lines beside the zip one, so it is read rather than refused.

Refused: the pre-0.4 tar format, TorchScript archives, plain pickles, compressed records.

Each pickle is first walked opcode by opcode (:mod:`pickletools`, which runs nothing): only opcodes that push data,
build containers, look up a global, call one (``REDUCE``) or name a storage (``BINPERSID``) are admitted; ``BUILD``,
``INST``, ``OBJ``, ``NEWOBJ``, the extension registry and out-of-band buffers, which genuine files never use, are
refused, and so are a memo index beyond the pickle's length and any ``GLOBAL`` not listed below. Then
:class:`pickle.Unpickler` runs with a ``find_class`` (which also sees ``STACK_GLOBAL``'s names) that knows only these
globals, each mapped to a function of this module or to a constant; nothing is imported, and none of torch's
functions ever sees the file:

- ``torch._utils._rebuild_tensor``, ``_rebuild_tensor_v2``, ``_rebuild_tensor_v3``: a tensor as storage, offset,
  size, stride (v2/v3: requires_grad, an empty hooks dict, no metadata; v3: its dtype on an untyped storage);
- ``torch._utils._rebuild_parameter``, ``_rebuild_parameter_with_state``: a Parameter, read as its plain tensor;
- ``torch.<Double|Float|Half|BFloat16|Long|Int|Short|Char|Byte|Bool|ComplexDouble|ComplexFloat>Storage`` and
  ``torch(.storage).UntypedStorage``: the element type each storage's persistent id names;
- ``torch.<dtype>`` (``float32``, ``uint16``, ``float8_e4m3fn``, ...): the dtype ``_rebuild_tensor_v3`` names;
- ``collections.OrderedDict`` (each tensor's hooks), ``torch.Size`` (read as a tuple), ``builtins.set`` /
  ``frozenset`` and ``_codecs.encode`` (how pickle protocol 2 writes sets and bytes).

Tensors are built last, from bytes this module read: a record must hold exactly numel × element size bytes, lie
inside the file and overlap no other record; a view's offset, sizes and strides must stay inside its storage (and
hold no more elements than it); bool storages must hold only 0 and 1. Views of one storage share its memory, as
with ``torch.load``. The result is plain data: dicts (OrderedDict kept), lists, tuples, sets, strings, bytes,
numbers, None, dtypes and tensors; anything else is refused. The file is only ever opened for reading.
"""

from __future__ import annotations

import bisect
import collections
import io
import math
import os
import pickle
import pickletools
import struct
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, cast

import torch


class RefusedFile(ValueError):
    """The file is not one this loader reads; the message (one line) says why."""


_NOTHING_RAN = "nothing in the file was run"
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001
_MAX_DEPTH = 64  # containers nested deeper than this (genuine files: a few levels) or in a cycle are refused
_MAX_ITEMS = 1_000_000  # container entries in the result, counting shared containers once per reference

_OPCODES = frozenset(
    """PROTO FRAME STOP MARK POP POP_MARK DUP GET BINGET LONG_BINGET PUT BINPUT LONG_BINPUT MEMOIZE
    NONE NEWTRUE NEWFALSE INT BININT BININT1 BININT2 LONG LONG1 LONG4 FLOAT BINFLOAT
    STRING BINSTRING SHORT_BINSTRING UNICODE SHORT_BINUNICODE BINUNICODE BINUNICODE8
    BINBYTES SHORT_BINBYTES BINBYTES8 BYTEARRAY8
    EMPTY_LIST APPEND APPENDS LIST EMPTY_TUPLE TUPLE TUPLE1 TUPLE2 TUPLE3 EMPTY_DICT DICT SETITEM SETITEMS
    EMPTY_SET ADDITEMS FROZENSET GLOBAL STACK_GLOBAL REDUCE BINPERSID""".split()
)
_MEMO_PUTS = frozenset({"PUT", "BINPUT", "LONG_BINPUT"})


@dataclass(frozen=True)
class _StorageType:
    dtype: torch.dtype  # the element type; uint8 for an untyped storage
    untyped: bool = False


class _Storage:
    __slots__ = ("type", "numel", "data")

    def __init__(self, storage_type: _StorageType, numel: int, data: torch.Tensor | None) -> None:
        self.type, self.numel, self.data = storage_type, numel, data  # data: its bytes as uint8, once read


@dataclass(frozen=True, eq=False)
class _TensorRef:
    storage: _Storage
    dtype: torch.dtype
    offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]


_STORAGE_TYPES = {
    f"{name}Storage": _StorageType(dtype)
    for name, dtype in {
        "Double": torch.float64,
        "Float": torch.float32,
        "Half": torch.float16,
        "BFloat16": torch.bfloat16,
        "Long": torch.int64,
        "Int": torch.int32,
        "Short": torch.int16,
        "Char": torch.int8,
        "Byte": torch.uint8,
        "Bool": torch.bool,
        "ComplexDouble": torch.complex128,
        "ComplexFloat": torch.complex64,
    }.items()
}
_UNTYPED = _StorageType(torch.uint8, untyped=True)
_DTYPES = {
    name: getattr(torch, name)
    for name in (
        "float64 float32 float16 bfloat16 int64 int32 int16 int8 uint8 bool complex128 complex64 complex32 "
        "uint16 uint32 uint64 float8_e4m3fn float8_e5m2 float8_e4m3fnuz float8_e5m2fnuz"
    ).split()
    if isinstance(getattr(torch, name, None), torch.dtype)  # the newer ones exist only in newer torch
}


def _is_index(value: Any) -> bool:
    return type(value) is int and value >= 0


def _shape(values: Any, what: str) -> tuple[int, ...]:
    if type(values) not in (tuple, list) or len(values) > 64 or not all(_is_index(v) for v in values):
        raise RefusedFile(f"a tensor's {what} is not a short list of non-negative integers")
    return tuple(values)


def _tensor(storage: Any, offset: Any, size: Any, stride: Any, dtype: torch.dtype | None = None) -> _TensorRef:
    if not isinstance(storage, _Storage) or storage.type.untyped != (dtype is not None):
        raise RefusedFile("a tensor whose storage is not a storage record of the kind its rebuild function takes")
    if not _is_index(offset):
        raise RefusedFile("a tensor whose storage offset is not a non-negative integer")
    size, stride = _shape(size, "size"), _shape(stride, "stride")
    if len(size) != len(stride):
        raise RefusedFile(f"a tensor with {len(size)} sizes and {len(stride)} strides")
    return _TensorRef(storage, storage.type.dtype if dtype is None else dtype, offset, size, stride)


def _plain(requires_grad: Any, hooks: Any, metadata: Any = None) -> None:
    if type(requires_grad) is not bool or type(hooks) not in (dict, collections.OrderedDict) or hooks or metadata:
        raise RefusedFile("a tensor with hooks, metadata or a non-boolean requires_grad")


def _rebuild_tensor(storage: Any, offset: Any, size: Any, stride: Any) -> _TensorRef:
    return _tensor(storage, offset, size, stride)


def _rebuild_tensor_v2(
    storage: Any, offset: Any, size: Any, stride: Any, requires_grad: Any, hooks: Any, metadata: Any = None
) -> _TensorRef:
    _plain(requires_grad, hooks, metadata)
    return _tensor(storage, offset, size, stride)


def _rebuild_tensor_v3(
    storage: Any, offset: Any, size: Any, stride: Any, requires_grad: Any, hooks: Any, dtype: Any, metadata: Any = None
) -> _TensorRef:
    _plain(requires_grad, hooks, metadata)
    if dtype not in _DTYPES.values():
        raise RefusedFile("a tensor whose dtype is not one of torch's")
    return _tensor(storage, offset, size, stride, dtype)


def _rebuild_parameter(data: Any, requires_grad: Any, hooks: Any, state: Any = None) -> _TensorRef:
    _plain(requires_grad, hooks)
    if not isinstance(data, _TensorRef):
        raise RefusedFile("a Parameter that holds no tensor")
    return data  # its Python state (attributes set on the Parameter) is dropped with the Parameter


def _size(values: Any) -> tuple[int, ...]:
    return _shape(values, "size")


def _encode(text: Any, encoding: Any = "utf-8") -> bytes:
    if type(text) is not str or encoding not in ("latin1", "latin-1"):
        raise RefusedFile("_codecs.encode used for anything but protocol 2's latin-1 bytes")
    return text.encode("latin-1")


_GLOBALS: dict[tuple[str, str], Any] = {
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_tensor_v3"): _rebuild_tensor_v3,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch", "UntypedStorage"): _UNTYPED,
    ("torch.storage", "UntypedStorage"): _UNTYPED,
    **{("torch", name): storage_type for name, storage_type in _STORAGE_TYPES.items()},
    **{("torch", name): dtype for name, dtype in _DTYPES.items()},
    ("torch", "Size"): _size,
    ("collections", "OrderedDict"): collections.OrderedDict,
    **{(module, name): kind for module in ("builtins", "__builtin__") for name, kind in (("set", set), ("frozenset", frozenset))},
    ("_codecs", "encode"): _encode,
}


def _admitted(module: str, name: str) -> Any:
    found = _GLOBALS.get((module, name))
    if found is None:
        raise RefusedFile(f"refused global {module}.{name}: a weight file needs only tensors and plain data ({_NOTHING_RAN})")
    return found


class _Unpickler(pickle.Unpickler):
    def __init__(self, data: bytes, storage: Callable[[Any], _Storage] | None) -> None:
        super().__init__(io.BytesIO(data), encoding="utf-8")
        self._storage = storage

    def find_class(self, module: str, name: str) -> Any:
        return _admitted(module, name)

    def persistent_load(self, pid: Any) -> _Storage:
        if self._storage is None:
            raise RefusedFile("a storage reference outside the object pickle")
        return self._storage(pid)


def _checked_end(stream: IO[bytes], limit: int) -> int:
    """Walk one pickle's opcodes from the stream's position, refusing what weight files never need; the position
    after its STOP."""
    for opcode, arg, position in pickletools.genops(stream):
        if opcode.name not in _OPCODES:
            raise RefusedFile(f"refused pickle opcode {opcode.name} at byte {position}: weight files need none ({_NOTHING_RAN})")
        if opcode.name == "GLOBAL":  # named in the opcode: refused here by name; STACK_GLOBAL's by find_class
            _admitted(*str(arg).split(" ", 1))
        if opcode.name in _MEMO_PUTS and int(arg or 0) >= limit:
            raise RefusedFile(f"a pickle memo index of {arg} in a pickle of {limit} bytes")
    return stream.tell()


def _unpickle(data: bytes, storage: Callable[[Any], _Storage] | None = None) -> Any:
    _checked_end(io.BytesIO(data), len(data))
    return _Unpickler(data, storage).load()


def _storage_id(pid: Any, length: int) -> tuple[_StorageType, str, int]:
    if type(pid) is not tuple or len(pid) != length or pid[0] != "storage":
        raise RefusedFile("a persistent id that is not a torch storage")
    storage_type, key, _location, numel = pid[1:5]
    if not isinstance(storage_type, _StorageType) or type(key) is not str or not _is_index(numel):
        raise RefusedFile("a storage id without a storage type, key and element count")
    return storage_type, key, numel


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _read_storage(stream: IO[bytes], nbytes: int) -> tuple[torch.Tensor, int]:
    """The next ``nbytes`` bytes of the stream as a uint8 tensor (sharing one buffer), and their CRC-32."""
    if not nbytes:
        return torch.empty(0, dtype=torch.uint8), 0
    buffer = bytearray(nbytes)
    if cast(io.BufferedIOBase, stream).readinto(buffer) != nbytes:
        raise RefusedFile("the file ends inside a storage (truncated)")
    return torch.frombuffer(buffer, dtype=torch.uint8), zlib.crc32(buffer)


class _Records:
    """Reads stored zip records straight from the file: each must lie inside it and overlap no other record."""

    def __init__(self, file: IO[bytes], size: int) -> None:
        self._file, self._size = file, size
        self._claimed: list[tuple[int, int]] = []

    def _seek_data(self, info: zipfile.ZipInfo) -> None:
        if info.compress_type != zipfile.ZIP_STORED:
            raise RefusedFile(f"record {info.filename} is compressed (torch.save stores its records as they are)")
        self._file.seek(info.header_offset)
        header = self._file.read(30)
        if len(header) < 30 or header[:4] != b"PK\x03\x04":
            raise RefusedFile(f"record {info.filename} has no local header (a damaged archive)")
        name_length, extra_length = struct.unpack("<HH", header[26:30])
        start = info.header_offset + 30 + name_length + extra_length
        end = start + info.file_size
        if info.compress_size != info.file_size or end > self._size:
            raise RefusedFile(f"record {info.filename} runs past the end of the file (truncated)")
        at = bisect.bisect_left(self._claimed, (info.header_offset, end))
        if (at and self._claimed[at - 1][1] > info.header_offset) or (at < len(self._claimed) and self._claimed[at][0] < end):
            raise RefusedFile(f"record {info.filename} overlaps another record")
        self._claimed.insert(at, (info.header_offset, end))
        self._file.seek(start)

    @staticmethod
    def _check_crc(info: zipfile.ZipInfo, crc: int) -> None:
        if info.CRC and crc != info.CRC:  # torch.save can be told not to write checksums: it writes 0
            raise RefusedFile(f"record {info.filename} fails its checksum (a damaged archive)")

    def read_bytes(self, info: zipfile.ZipInfo) -> bytes:
        self._seek_data(info)
        data = self._file.read(info.file_size)
        if len(data) != info.file_size:
            raise RefusedFile(f"record {info.filename} is truncated")
        self._check_crc(info, zlib.crc32(data))
        return data

    def read_tensor(self, info: zipfile.ZipInfo) -> torch.Tensor:
        self._seek_data(info)
        data, crc = _read_storage(self._file, info.file_size)
        self._check_crc(info, crc)
        return data


def _load_zip(file: IO[bytes], size: int) -> Any:
    try:
        archive = zipfile.ZipFile(file)
    except zipfile.BadZipFile as error:
        raise RefusedFile(f"a damaged or truncated zip archive ({error})") from None
    names = archive.namelist()
    if len(set(names)) != len(names):
        raise RefusedFile("a zip archive with two records of one name")
    pickles = [name for name in names if name.endswith("/data.pkl") and name.count("/") == 1]
    if len(pickles) != 1:
        raise RefusedFile(f"a zip archive with {len(pickles)} top-level data.pkl records, not a torch.save file")
    folder = pickles[0].removesuffix("data.pkl")
    records = _Records(file, size)
    if folder + "byteorder" in names and records.read_bytes(archive.getinfo(folder + "byteorder")) != b"little":
        raise RefusedFile("a big-endian archive")
    storages: dict[str, _Storage] = {}

    def storage(pid: Any) -> _Storage:
        storage_type, key, numel = _storage_id(pid, 5)
        if key in storages:
            known = storages[key]
            if known.type != storage_type or known.numel != numel:
                raise RefusedFile(f"storage data/{key} is named with two different types or sizes")
            return known
        try:
            info = archive.getinfo(f"{folder}data/{key}")
        except KeyError:
            raise RefusedFile(f"no record data/{key} for a storage the pickle names") from None
        nbytes = numel * _itemsize(storage_type.dtype)
        if info.file_size != nbytes:
            raise RefusedFile(
                f"record data/{key} holds {info.file_size} bytes where its {numel} {storage_type.dtype} elements need {nbytes}"
            )
        storages[key] = _Storage(storage_type, numel, records.read_tensor(info))
        return storages[key]

    return _unpickle(records.read_bytes(archive.getinfo(pickles[0])), storage)


def _load_legacy(data: bytes) -> Any:
    stream = io.BytesIO(data)

    def next_pickle(storage: Callable[[Any], _Storage] | None = None) -> Any:
        start = stream.tell()
        return _unpickle(data[start : _checked_end(stream, len(data))], storage)

    if next_pickle() != _LEGACY_MAGIC:
        raise RefusedFile("a pickle without torch's magic number, not a torch.save file")
    if next_pickle() != _LEGACY_PROTOCOL:
        raise RefusedFile("a legacy torch file of an unknown protocol")
    system = next_pickle()
    if type(system) is not dict or system.get("little_endian") is not True:
        raise RefusedFile("a legacy torch file written on a big-endian machine")
    storages: dict[str, _Storage] = {}

    def storage(pid: Any) -> _Storage:
        storage_type, key, numel = _storage_id(pid, 6)
        if pid[5] is not None:
            raise RefusedFile("a legacy storage view (torch < 1.0)")
        known = storages.setdefault(key, _Storage(storage_type, numel, None))
        if known.type != storage_type or known.numel != numel:
            raise RefusedFile(f"storage {key} is named with two different types or sizes")
        return known

    tree = next_pickle(storage)
    keys = next_pickle()
    if type(keys) is not list or len(keys) != len(storages) or set(keys) != set(storages):
        raise RefusedFile("the list of storages does not match the storages the object names")
    for key in keys:
        header = stream.read(8)
        if len(header) != 8 or struct.unpack("<q", header)[0] != storages[key].numel:
            raise RefusedFile(f"storage {key} is truncated or holds another number of elements than the pickle says")
        nbytes = storages[key].numel * _itemsize(storages[key].type.dtype)
        if stream.tell() + nbytes > len(data):
            raise RefusedFile(f"the file ends inside storage {key} (truncated)")
        storages[key].data = _read_storage(stream, nbytes)[0]
    return tree


def _view(ref: _TensorRef) -> torch.Tensor:
    data = ref.storage.data
    assert data is not None  # every storage was read before any tensor is built
    itemsize = _itemsize(ref.dtype)
    if data.numel() % itemsize:
        raise RefusedFile(f"a {ref.dtype} tensor on a storage of {data.numel()} bytes")
    count = data.numel() // itemsize
    elements = math.prod(ref.size)
    last = ref.offset + sum((size - 1) * stride for size, stride in zip(ref.size, ref.stride))
    outside = ref.offset > count if elements == 0 else last >= count or elements > count
    if outside:
        raise RefusedFile(
            f"a tensor view (offset {ref.offset}, size {list(ref.size)}, stride {list(ref.stride)}) reaching outside "
            f"its storage of {count} elements"
        )
    if ref.dtype == torch.bool and bool((data > 1).any()):
        raise RefusedFile("a bool storage holding bytes other than 0 and 1")
    return data.view(ref.dtype).as_strided(ref.size, ref.stride, ref.offset)


_LEAVES = (str, bytes, bytearray, int, float, bool, type(None), torch.dtype)


def _materialized(tree: Any) -> Any:
    """The unpickled tree with its tensor references turned into tensors (one tensor per reference object)."""
    tensors: dict[int, torch.Tensor] = {}
    items = 0

    def build(value: Any, depth: int) -> Any:
        nonlocal items
        kind = type(value)
        if kind is _TensorRef:
            if id(value) not in tensors:
                tensors[id(value)] = _view(value)
            return tensors[id(value)]
        if kind in _LEAVES:
            return value
        if depth >= _MAX_DEPTH:
            raise RefusedFile(f"containers nested more than {_MAX_DEPTH} deep (or in a cycle)")
        if kind in (dict, collections.OrderedDict, list, tuple, set, frozenset):
            items += len(value)
            if items > _MAX_ITEMS:
                raise RefusedFile(f"more than {_MAX_ITEMS} container entries (shared containers repeated)")
            if kind in (dict, collections.OrderedDict):
                return kind((build(key, depth + 1), build(item, depth + 1)) for key, item in value.items())
            return kind(build(item, depth + 1) for item in value)
        raise RefusedFile(f"it holds a {kind.__name__}, which is not data")

    return build(tree, 0)


def load(path: str | Path) -> Any:
    """The object a ``torch.save`` file holds, its tensors on the CPU (a Parameter as its plain tensor).

    :class:`RefusedFile` says why a file is not read; OSError (a missing file) passes through.
    """
    with open(path, "rb") as file:
        size = os.fstat(file.fileno()).st_size
        head = file.read(4)
        file.seek(0)
        try:
            if head in (b"PK\x03\x04", b"PK\x05\x06"):
                tree = _load_zip(file, size)
            elif head[:1] == b"\x80":
                tree = _load_legacy(file.read())
            else:
                raise RefusedFile("neither a zip archive (torch >= 1.6) nor a legacy torch.save stream")
            return _materialized(tree)
        except RefusedFile:
            raise
        except Exception as error:  # pickle, zipfile and struct raise their own types for a damaged file
            raise RefusedFile(f"a damaged file or not a torch.save file ({type(error).__name__}: {error})") from error
