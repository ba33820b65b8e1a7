"""The pickle loader: hostile files are refused without running anything, genuine torch.save files read bit for bit,
whatever torch is installed; safetensors are read past the loaders WebUIs wrap. Every file is written here."""

from __future__ import annotations

import collections
import contextlib
import hashlib
import io
import os
import pickle
import struct
import subprocess
import sys
import time
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import safetensors.torch
import torch

from alignit.errors import ConceptError
from alignit.sources.files import load_tensors

# ---------------------------------------------------------------------------------------------- writing files by hand


def _zip_pt(path: Path, pkl: bytes, records: dict[str, bytes] | None = None, folder: str = "archive") -> Path:
    """A zip archive laid out as torch.save lays it out: data.pkl, one stored record per storage, byteorder."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
        archive.writestr(f"{folder}/data.pkl", pkl)
        archive.writestr(f"{folder}/byteorder", b"little")
        for key, data in (records or {}).items():
            archive.writestr(f"{folder}/data/{key}", data)
        archive.writestr(f"{folder}/version", b"3\n")
    return path


def _legacy_pt(
    path: Path, pkl: bytes, keys: list[str] | None = None, storages: list[bytes] | None = None, little_endian: bool = True
) -> Path:
    """The legacy stream: magic number, protocol, system info, the object's pickle, the storage keys, the storages."""
    system = {"protocol_version": 1001, "little_endian": little_endian, "type_sizes": {}}
    header = b"".join(pickle.dumps(value, protocol=2) for value in (0x1950A86A20F9469CFC6C, 1001, system))
    path.write_bytes(header + pkl + pickle.dumps(keys or [], protocol=2) + b"".join(storages or []))
    return path


class _Reduce:
    """Pickles as ``func(*args)``: what a hostile file asks the unpickler to call."""

    def __init__(self, func: Callable, *args: object) -> None:
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


class _Storage:
    """A storage the test writes: a persistent id ``('storage', torch.<kind>, key, 'cpu', numel)``."""

    def __init__(self, key: str, kind: str, numel: int) -> None:
        self.key, self.kind, self.numel = key, kind, numel


class _Tensor:
    """Pickles as ``torch._utils.<rebuild>(storage, offset, size, stride, False, OrderedDict(), *extra)``."""

    def __init__(self, storage, offset, size, stride, rebuild="_rebuild_tensor_v2", extra=()) -> None:
        self.args = (storage, offset, size, stride, False, collections.OrderedDict(), *extra)
        self.rebuild = getattr(torch._utils, rebuild)

    def __reduce__(self):
        return self.rebuild, self.args


class _TorchPickler(pickle.Pickler):
    def persistent_id(self, obj):
        if isinstance(obj, _Storage):
            return ("storage", getattr(torch, obj.kind), obj.key, "cpu", obj.numel)
        return None


def _torch_pickle(obj: object) -> bytes:
    stream = io.BytesIO()
    _TorchPickler(stream, protocol=2).dump(obj)
    return stream.getvalue()


def _floats(*values: float) -> bytes:
    return struct.pack(f"<{len(values)}f", *values)


# Pickle opcodes, for what pickle.dumps never writes.
def _str(text: str) -> bytes:
    data = text.encode()
    return b"X" + struct.pack("<I", len(data)) + data  # BINUNICODE


def _global(module: str, name: str) -> bytes:
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"  # GLOBAL


def _call(func: bytes, *args: bytes) -> bytes:
    return func + b"(" + b"".join(args) + b"tR"  # MARK args TUPLE REDUCE


def _proto2(body: bytes) -> bytes:
    return b"\x80\x02" + body + b"."


@contextlib.contextmanager
def _untouched(path: Path) -> Iterator[None]:
    """Reading leaves the file, its modification time and its folder as they were."""
    before = (hashlib.sha256(path.read_bytes()).hexdigest(), path.stat().st_mtime_ns, sorted(os.listdir(path.parent)))
    yield
    assert (hashlib.sha256(path.read_bytes()).hexdigest(), path.stat().st_mtime_ns, sorted(os.listdir(path.parent))) == before


def _refused(path: Path, match: str) -> str:
    with _untouched(path), pytest.raises(ConceptError) as caught:
        load_tensors(path)
    message = str(caught.value)
    assert message.startswith(f"cannot read {path.name}: ") and "\n" not in message, message
    assert match in message, message
    return message


# ----------------------------------------------------------------------------------------- pickles that run code


def _chain(marker: Path) -> bytes:
    """getattr(getattr(getattr(_rebuild_tensor_v2, '__globals__'), 'get')('__builtins__'), 'get')('eval')(code)"""
    getattr_ = _global("builtins", "getattr")
    module_globals = _call(getattr_, _global("torch._utils", "_rebuild_tensor_v2"), _str("__globals__"))
    builtins_dict = _call(_call(getattr_, module_globals, _str("get")), _str("__builtins__"))
    eval_ = _call(_call(getattr_, builtins_dict, _str("get")), _str("eval"))
    return _call(eval_, _str(f"open({str(marker)!r}, 'w').close()"))


# Each writes ``marker`` when a plain unpickler loads it (test_the_payloads_are_live): (pickle, what the refusal names).
_CODE = {
    "reduce_os_system": lambda m: (
        pickle.dumps({"w": _Reduce(os.system, f"touch '{m}'")}, protocol=2),
        f"refused global {os.system.__module__}.system",
    ),
    "builtins_eval": lambda m: (
        pickle.dumps(_Reduce(eval, f"open({str(m)!r}, 'w').close()"), protocol=2),
        "refused global __builtin__.eval",
    ),
    "builtins_exec": lambda m: (
        pickle.dumps(_Reduce(exec, f"open({str(m)!r}, 'w').close()"), protocol=2),
        "refused global __builtin__.exec",
    ),
    # getattr on an allowed function: _rebuild_tensor_v2.__globals__['__builtins__']['eval'](code)
    "getattr_chain": lambda m: (_proto2(_chain(m)), "refused global builtins.getattr"),
    "subprocess_popen": lambda m: (
        pickle.dumps({"w": _Reduce(subprocess.Popen, ["touch", str(m)])}, protocol=2),
        "refused global commands.Popen",  # protocol 2 writes Python 2's name; a plain unpickler maps it back
    ),
    "posix_system": lambda m: (_proto2(_call(_global("posix", "system"), _str(f"touch '{m}'"))), "refused global posix.system"),
    "nested_in_containers": lambda m: (
        pickle.dumps({"state_dict": {"w": 1.0, "extra": [{"note": _Reduce(os.system, f"touch '{m}'")}]}}, protocol=2),
        "refused global",
    ),
    # protocol 4: the names come from the memo, not from the opcode
    "stack_global_from_memo": lambda m: (
        b"\x80\x04\x8c\x02os\x94\x8c\x06system\x94h\x00h\x01\x93" + _str(f"touch '{m}'") + b"\x85R.",
        "refused global os.system",
    ),
    # protocol 4 resolves dotted names by getattr: from an allowed module to os.system
    "stack_global_dotted": lambda m: (
        b"\x80\x04" + _str("torch._utils") + _str("torch.os.system") + b"\x93" + _str(f"touch '{m}'") + b"\x85R.",
        "refused global torch._utils.torch.os.system",
    ),
    "inst": lambda m: (b"(" + b"S'touch \\'" + str(m).encode() + b"\\''\n" + b"ios\nsystem\n.", "refused pickle opcode INST"),
    "obj": lambda m: (_proto2(b"(" + _global("posix", "system") + _str(f"touch '{m}'") + b"o"), "refused global posix.system"),
}


def _wait_for(marker: Path) -> bool:
    for _ in range(100):
        if marker.exists():
            return True
        time.sleep(0.05)
    return False


@pytest.mark.parametrize("name", sorted(_CODE))
def test_the_payloads_are_live(tmp_path, name):
    """The corpus means something: a plain unpickler runs each payload."""
    marker = tmp_path / "ran"
    data, _ = _CODE[name](marker)
    result = pickle.loads(data)
    if name == "subprocess_popen":
        result["w"].wait()
    assert _wait_for(marker)


@pytest.mark.parametrize("layout", ["zip", "legacy"])
@pytest.mark.parametrize("name", sorted(_CODE))
def test_pickles_that_run_code_are_refused_unrun(tmp_path, name, layout):
    marker = tmp_path / "ran"
    data, names = _CODE[name](marker)
    path = _zip_pt(tmp_path / "evil.pt", data) if layout == "zip" else _legacy_pt(tmp_path / "evil.pt", data)
    _refused(path, names)
    if name == "subprocess_popen":
        time.sleep(0.2)  # a process the file started would have written by now
    assert not marker.exists()


def test_a_payload_among_real_tensors(tmp_path):
    """torch.save itself wrote the file: real storages, and the payload in a dict in a list in the state dict."""
    marker = tmp_path / "ran"
    state = {"state_dict": {"w": torch.ones(2), "extra": [{"note": _Reduce(os.system, f"touch '{marker}'")}]}}
    torch.save(state, tmp_path / "evil.ckpt")
    _refused(tmp_path / "evil.ckpt", f"refused global {os.system.__module__}.system")
    assert not marker.exists()
    torch.load(tmp_path / "evil.ckpt", weights_only=False)  # the unsafe loader runs it
    assert _wait_for(marker)


def test_torch_loaders_are_never_called(tmp_path, monkeypatch):
    """Neither torch's unpickler nor its rebuild functions see the file (A1111 and Forge replace torch.load)."""
    torch.save({"w": torch.nn.Parameter(torch.ones(2)), "b": torch.zeros(3, dtype=torch.float16)}, tmp_path / "x.pt")

    def fail(*args, **kwargs):
        raise AssertionError("torch's loader was called")

    for module, name in [(torch, "load"), (torch.serialization, "load")] + [
        (torch._utils, name) for name in ("_rebuild_tensor", "_rebuild_tensor_v2", "_rebuild_parameter")
    ]:
        monkeypatch.setattr(module, name, fail)
    tree = load_tensors(tmp_path / "x.pt")
    assert torch.equal(tree["w"], torch.ones(2)) and type(tree["w"]) is torch.Tensor


# ------------------------------------------------------------------------------------ pickle tricks without code


def _cycle() -> bytes:
    return _proto2(b"}" + _str("w") + b"]q\x00h\x00a" + b"s")  # {'w': l} where l = [l]


def _explosion() -> bytes:
    """{'w': a list of 3000 references to one list of 1000 Nones}: 6 kB that a naive copy turns into 3 million
    entries (and two more levels into 10^12)."""
    inner = b"(" + b"N" * 1000 + b"lq\x00"
    return _proto2(b"}" + _str("w") + inner + b"0(" + b"h\x00" * 3000 + b"ls")


_TRICKS = {
    "build_on_allowed_class": (_proto2(_call(_global("collections", "OrderedDict")) + b"}" + _str("x") + b"K\x01sb"), "BUILD"),
    "build_on_a_tensor": (
        _torch_pickle(_Tensor(_Storage("0", "FloatStorage", 2), 0, (2,), (1,)))[:-1] + b"}" + _str("offset") + b"K\x05sb.",
        "BUILD",
    ),
    "inst_on_allowed_class": (b"(icollections\nOrderedDict\n.", "refused pickle opcode INST"),
    "obj_on_allowed_class": (_proto2(b"(" + _global("collections", "OrderedDict") + b"o"), "refused pickle opcode OBJ"),
    "newobj_on_allowed_class": (_proto2(_global("collections", "OrderedDict") + b")\x81"), "NEWOBJ"),
    "ext1_extension_registry": (_proto2(b"\x82\x01"), "EXT1"),
    "text_persistent_id": (b"Pstorage\n.", "PERSID"),
    "huge_memo_index": (_proto2(b"Nr" + struct.pack("<I", 0x7FFFFFFF)), "memo index"),
    "cycle": (_cycle(), "nested more than"),
    "shared_containers_explode": (_explosion(), "container entries"),
    "persistent_id_not_a_storage": (_proto2(_str("storage") + b"Q"), "persistent id"),
    "dotted_name_from_allowed_global": (
        b"\x80\x04" + _str("torch._utils") + _str("_rebuild_tensor_v2.__globals__") + b"\x93.",
        "refused global torch._utils._rebuild_tensor_v2.__globals__",
    ),
    "object_not_data": (_proto2(_global("torch", "FloatStorage")), "holds a _StorageType"),
}


def test_the_explosion_is_large():
    outer = pickle.loads(_explosion())["w"]
    assert len(outer) == 3000 and all(inner is outer[0] for inner in outer) and len(outer[0]) == 1000


@pytest.mark.parametrize("layout", ["zip", "legacy"])
@pytest.mark.parametrize("name", sorted(_TRICKS))
def test_pickle_tricks_are_refused(tmp_path, name, layout):
    data, names = _TRICKS[name]
    path = _zip_pt(tmp_path / "trick.pt", data) if layout == "zip" else _legacy_pt(tmp_path / "trick.pt", data)
    _refused(path, names)


# ------------------------------------------------------------------------------- storages, views and archives


def _views_outside() -> dict:
    storage = _Storage("0", "FloatStorage", 6)
    return {
        "offset": _Tensor(storage, 5, (2,), (1,)),
        "stride": _Tensor(storage, 0, (2, 3), (3, 2)),
        "size": _Tensor(storage, 0, (7,), (1,)),
        "broadcast": _Tensor(storage, 0, (100,), (0,)),
        "empty_past_the_end": _Tensor(storage, 7, (0,), (1,)),
    }


@pytest.mark.parametrize("view", sorted(_views_outside()))
def test_views_reaching_outside_their_storage(tmp_path, view):
    tensor = _views_outside()[view]
    path = _zip_pt(tmp_path / "view.pt", _torch_pickle({"w": tensor}), {"0": _floats(*range(6))})
    _refused(path, "reaching outside its storage")


@pytest.mark.parametrize(
    ("args", "match"),
    [
        ((-1, (2,), (1,)), "offset"),
        ((0, (2,), (-1,)), "stride"),
        ((0, (2, 2), (1,)), "2 sizes and 1 strides"),
        ((0, [2.0], (1,)), "size"),
    ],
)
def test_malformed_views(tmp_path, args, match):
    path = _zip_pt(
        tmp_path / "view.pt", _torch_pickle({"w": _Tensor(_Storage("0", "FloatStorage", 6), *args)}), {"0": _floats(*range(6))}
    )
    _refused(path, match)


def test_a_declared_storage_size_that_does_not_match_its_data(tmp_path):
    pkl = _torch_pickle({"w": _Tensor(_Storage("0", "FloatStorage", 10), 0, (10,), (1,))})
    _refused(
        _zip_pt(tmp_path / "size.pt", pkl, {"0": _floats(1, 2, 3)}), "holds 12 bytes where its 10 torch.float32 elements need 40"
    )
    legacy = _legacy_pt(tmp_path / "size_legacy.pt", _legacy_object(10), ["0"], [struct.pack("<q", 3) + _floats(1, 2, 3)])
    _refused(legacy, "another number of elements")


def _legacy_object(numel: int, view: tuple | None = None) -> bytes:
    class Pickler(pickle.Pickler):
        def persistent_id(self, obj):
            return ("storage", torch.FloatStorage, "0", "cpu", numel, view) if isinstance(obj, _Storage) else None

    stream = io.BytesIO()
    Pickler(stream, protocol=2).dump({"w": _Tensor(_Storage("0", "FloatStorage", numel), 0, (numel,), (1,))})
    return stream.getvalue()


def test_legacy_stream_layout(tmp_path):
    storage = [struct.pack("<q", 3) + _floats(1, 2, 3)]
    _refused(_legacy_pt(tmp_path / "keys.pt", _legacy_object(3), ["0", "1"], storage), "does not match")
    _refused(_legacy_pt(tmp_path / "view.pt", _legacy_object(3, ("1", 0, 3)), ["0"], storage), "legacy storage view")
    _refused(_legacy_pt(tmp_path / "big.pt", _legacy_object(3), ["0"], storage, little_endian=False), "big-endian")
    _assert_same(
        load_tensors(_legacy_pt(tmp_path / "good.pt", _legacy_object(3), ["0"], storage)), {"w": torch.tensor([1.0, 2, 3])}
    )


def test_storage_records(tmp_path):
    """Missing, reused with another type, compressed, past the end of the file, overlapping another, non-boolean."""
    floats = _floats(*range(6))
    missing = _torch_pickle({"w": _Tensor(_Storage("7", "FloatStorage", 6), 0, (6,), (1,))})
    _refused(_zip_pt(tmp_path / "missing.pt", missing, {"0": floats}), "no record data/7")

    twice = [_Tensor(_Storage("0", kind, 6), 0, (6,), (1,)) for kind in ("FloatStorage", "IntStorage")]
    _refused(_zip_pt(tmp_path / "twice.pt", _torch_pickle({"w": twice}), {"0": floats}), "two different types")

    path = tmp_path / "deflated.pt"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("archive/data.pkl", _torch_pickle({"w": _Tensor(_Storage("0", "FloatStorage", 6), 0, (6,), (1,))}))
        archive.writestr("archive/data/0", floats, compress_type=zipfile.ZIP_DEFLATED)
    _refused(path, "compressed")

    path = tmp_path / "past_the_end.pt"
    big = 1 << 20
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("archive/data.pkl", _torch_pickle({"w": _Tensor(_Storage("0", "ByteStorage", big), 0, (big,), (1,))}))
        archive.writestr("archive/data/0", b"\x00" * 16)
        archive.getinfo("archive/data/0").file_size = archive.getinfo("archive/data/0").compress_size = big
    _refused(path, "runs past the end of the file")

    # record 1's local header and data lie inside record 0's data: ten such records would read the file ten times
    inner = io.BytesIO()
    with zipfile.ZipFile(inner, "w") as archive:
        archive.writestr("archive/data/1", b"\x01" * 64)
    nested = inner.getvalue()[: 30 + len("archive/data/1") + 64]
    path = tmp_path / "overlap.pt"
    pkl = _torch_pickle(
        {
            "a": _Tensor(_Storage("0", "ByteStorage", len(nested)), 0, (len(nested),), (1,)),
            "b": _Tensor(_Storage("1", "ByteStorage", 64), 0, (64,), (1,)),
        }
    )
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("archive/data.pkl", pkl)
        archive.writestr("archive/data/0", nested)
        archive.writestr("archive/data/1", b"\x01" * 64)
        archive.getinfo("archive/data/1").header_offset = (
            archive.getinfo("archive/data/0").header_offset + 30 + len("archive/data/0")
        )
    _refused(path, "overlaps another record")

    path = _zip_pt(
        tmp_path / "bools.pt", _torch_pickle({"w": _Tensor(_Storage("0", "BoolStorage", 2), 0, (2,), (1,))}), {"0": b"\x01\x02"}
    )
    _refused(path, "other than 0 and 1")


def test_archive_layout(tmp_path):
    pkl = _torch_pickle({"w": _Tensor(_Storage("0", "FloatStorage", 6), 0, (6,), (1,))})
    floats = _floats(*range(6))
    path = tmp_path / "big_endian.pt"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("archive/data.pkl", pkl)
        archive.writestr("archive/byteorder", b"big")
        archive.writestr("archive/data/0", floats)
    _refused(path, "big-endian")
    path = tmp_path / "two_folders.pt"
    with zipfile.ZipFile(path, "w") as archive:
        for folder in ("a", "b"):
            archive.writestr(f"{folder}/data.pkl", pkl)
    _refused(path, "2 top-level data.pkl records")
    path = tmp_path / "checksum.pt"
    _zip_pt(path, pkl, {"0": floats})
    data = path.read_bytes()
    path.write_bytes(data.replace(floats, floats[:-1] + b"\x7f"))
    _refused(path, "fails its checksum")
    path = tmp_path / "metadata.pt"
    conj = _Tensor(_Storage("0", "ComplexFloatStorage", 1), 0, (1,), (1,), extra=({"conj": True},))
    _refused(_zip_pt(path, _torch_pickle({"w": conj}), {"0": _floats(1, 2)}), "metadata")


def test_truncated_and_garbage_files(tmp_path):
    torch.save({"w": torch.randn(64, 64)}, tmp_path / "full.pt")
    data = (tmp_path / "full.pt").read_bytes()
    for cut in (len(data) // 2, len(data) - 10):
        (tmp_path / "cut.pt").write_bytes(data[:cut])
        _refused(tmp_path / "cut.pt", "damaged or truncated zip archive")
    torch.save({"w": torch.randn(64, 64)}, tmp_path / "full_legacy.pt", _use_new_zipfile_serialization=False)
    (tmp_path / "cut_legacy.pt").write_bytes((tmp_path / "full_legacy.pt").read_bytes()[:-100])
    _refused(tmp_path / "cut_legacy.pt", "truncated")
    (tmp_path / "garbage.pt").write_bytes(bytes(range(256)) * 8)
    _refused(tmp_path / "garbage.pt", "neither a zip archive")
    (tmp_path / "empty.bin").write_bytes(b"")
    _refused(tmp_path / "empty.bin", "neither a zip archive")
    (tmp_path / "plain.pt").write_bytes(pickle.dumps({"w": 1.0}, protocol=2))
    _refused(tmp_path / "plain.pt", "without torch's magic number")
    (tmp_path / "junk_after_magic.pt").write_bytes(b"\x80\x02garbage")
    _refused(tmp_path / "junk_after_magic.pt", "damaged file or not a torch.save file")


def test_what_lightning_adds_is_refused_with_its_name(tmp_path):
    """Numbers Lightning saves as numpy scalars need numpy's globals: refused by name, not read half."""
    numpy = pytest.importorskip("numpy")
    torch.save({"state_dict": {"w": torch.ones(2)}, "loss": numpy.float64(0.5)}, tmp_path / "epoch=1.ckpt")
    _refused(tmp_path / "epoch=1.ckpt", "refused global numpy")


# --------------------------------------------------------------------------------------------- genuine files


def _generator() -> torch.Generator:
    return torch.Generator().manual_seed(0)


def _views() -> dict:
    base = torch.randn(4, 6, generator=_generator())
    return {"base": base, "t": base.t(), "row": base[2], "every_other": base[:, ::2], "column": base[1:, 1]}


_GENUINE: dict[str, Callable[[], object]] = {
    "plain_dict": lambda: {
        "lora_unet_a.lora_down.weight": torch.randn(2, 8, generator=_generator()),
        "lora_unet_a.alpha": torch.tensor(2.0),
    },
    "custom_diffusion_delta": lambda: {
        "unet": {
            "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight": torch.randn(8, 4, generator=_generator()),
            "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_v.weight": torch.randn(8, 4, generator=_generator()),
        },
        "modifier_token": {"<new1>": torch.randn(32, generator=_generator())},
    },
    "lightning": lambda: {
        "state_dict": {"model.diffusion_model.middle_block.1.w": torch.randn(3, 3, generator=_generator())},
        "epoch": 3,
        "global_step": 10,
    },
    "a1111_embedding": lambda: {
        "string_to_token": {"*": 265},
        "string_to_param": {"*": torch.nn.Parameter(torch.randn(2, 32, generator=_generator()))},
        "name": "x",
        "step": 100,
        "sd_checkpoint": "abc",
        "sd_checkpoint_name": "m",
    },
    "diffusers_embedding": lambda: {"<cat-toy>": torch.randn(32, generator=_generator())},
    "dtypes": lambda: (
        {
            str(dtype): (torch.randn(3, 2, generator=_generator()) * 50).to(dtype)
            for dtype in (
                torch.float16,
                torch.bfloat16,
                torch.float32,
                torch.float64,
                torch.int64,
                torch.int32,
                torch.int8,
                torch.uint8,
            )
        }
        | {"bool": torch.tensor([True, False, True]), "complex": torch.randn(2, generator=_generator()).to(torch.complex64)}
    ),
    "views_and_shared_storage": _views,
    "scalars_and_empty": lambda: {
        "scalar": torch.tensor(3.5),
        "int": torch.tensor(7),
        "empty": torch.zeros(0, 3),
        "half": torch.tensor(1.0).half(),
    },
    "ordered_dict": lambda: collections.OrderedDict([("b", torch.ones(2)), ("a", torch.zeros(1))]),
    "plain_data": lambda: {
        "list": [torch.ones(1), 2],
        "tuple": (torch.ones(1), "x"),
        "size": torch.Size([2, 3]),
        "set": {1, 2},
        "bytes": b"\x00\xff",
        "none": None,
        "float": 1.5,
        "dtype": torch.float16,
        "tied": [torch.ones(2)] * 2,
    },
}
if hasattr(torch.storage, "_new_dtypes"):  # torch.save writes these with _rebuild_tensor_v3 on an untyped storage
    _GENUINE["v3_dtypes"] = lambda: {
        "uint16": torch.tensor([1, 2, 65535], dtype=torch.uint16),
        "f8": torch.ones(3).to(torch.float8_e4m3fn),
    }

_FORMATS = {
    "zip": {},
    "legacy": {"_use_new_zipfile_serialization": False},
    "protocol_4": {"pickle_protocol": 4},
}


def _bytes(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach().contiguous().reshape(-1).view(torch.uint8)


def _assert_same(got: object, expected: object) -> None:
    """Bit for bit, with the same shape, strides and offset; a Parameter comes back as its plain tensor."""
    if isinstance(expected, torch.Tensor):
        assert type(got) is torch.Tensor and not got.requires_grad
        assert (got.dtype, got.shape, got.stride(), got.storage_offset()) == (
            expected.dtype,
            expected.shape,
            expected.stride(),
            expected.storage_offset(),
        )
        if expected.numel():
            assert torch.equal(_bytes(got), _bytes(expected))
    elif isinstance(expected, dict):
        assert type(got) is type(expected) and list(got) == list(expected)
        for key in expected:
            _assert_same(got[key], expected[key])
    elif isinstance(expected, (list, tuple)):
        assert type(got) is (tuple if type(expected) is torch.Size else type(expected)) and len(got) == len(expected)
        for one, other in zip(got, expected):
            _assert_same(one, other)
    else:
        assert type(got) is type(expected) and got == expected


@pytest.mark.parametrize("layout", sorted(_FORMATS))
@pytest.mark.parametrize("name", sorted(_GENUINE))
def test_genuine_files_read_bit_for_bit(tmp_path, name, layout):
    if name == "v3_dtypes" and layout == "legacy":
        pytest.skip("torch writes no legacy file of these dtypes")
    expected = _GENUINE[name]()
    path = tmp_path / "concept.pt"
    torch.save(expected, path, **_FORMATS[layout])
    with _untouched(path):
        got = load_tensors(path)
    _assert_same(got, expected)
    if name == "views_and_shared_storage":  # like torch.load: views of one storage share it
        assert len({tensor.untyped_storage().data_ptr() for tensor in got.values()}) == 1
        got["base"][0, 1] = 100.0
        assert got["t"][1, 0] == 100.0
    if name == "plain_data":
        assert got["tied"][0] is got["tied"][1]


def test_any_folder_name_and_no_checksums(tmp_path):
    expected = _views() | {"w": torch.randn(5, generator=_generator())}
    torch.save(expected, tmp_path / "x.pt")
    with zipfile.ZipFile(tmp_path / "x.pt") as source, zipfile.ZipFile(tmp_path / "renamed.bin", "w") as target:
        for info in source.infolist():
            target.writestr("my model v2/" + info.filename.split("/", 1)[1], source.read(info))
    _assert_same(load_tensors(tmp_path / "renamed.bin"), expected)
    if hasattr(torch.serialization, "set_crc32_options"):  # torch >= 2.6 can leave the checksums out (all zero)
        torch.serialization.set_crc32_options(False)
        try:
            torch.save(expected, tmp_path / "no_crc.pt")
        finally:
            torch.serialization.set_crc32_options(True)
        assert {info.CRC for info in zipfile.ZipFile(tmp_path / "no_crc.pt").infolist()} == {0}
        _assert_same(load_tensors(tmp_path / "no_crc.pt"), expected)


def test_a_refused_module_is_not_even_imported(tmp_path):
    """pickle's own find_class imports the module a global names, running its top level."""
    assert "tabnanny" not in sys.modules
    _refused(_zip_pt(tmp_path / "x.pt", _proto2(_global("tabnanny", "check"))), "refused global tabnanny.check")
    assert "tabnanny" not in sys.modules


# -------------------------------------------------------------------------------------------------- safetensors


def _forge_wrapper(calls: list) -> Callable:
    """What Forge's modules_forge/patch_basic.build_loaded puts in place of safetensors.torch.load_file: on any
    error it moves every existing path among the arguments to ``<path>.corrupted``."""
    original = safetensors.torch.load_file

    def loader(*args, **kwargs):
        calls.append(args)
        try:
            return original(*args, **kwargs)
        except Exception as error:
            for path in list(args) + list(kwargs.values()):
                if isinstance(path, str) and os.path.exists(path):
                    os.replace(path, path + ".corrupted")
            raise ValueError(str(error)) from error

    return loader


def test_safetensors_are_read_past_forges_wrapper(tmp_path, monkeypatch):
    calls: list = []
    monkeypatch.setattr(safetensors.torch, "load_file", _forge_wrapper(calls))
    expected = {"a": torch.randn(3, 2, generator=_generator()), "b": torch.ones(2, dtype=torch.bfloat16)}
    safetensors.torch.save_file(expected, str(tmp_path / "good.safetensors"))
    with _untouched(tmp_path / "good.safetensors"):
        _assert_same(load_tensors(tmp_path / "good.safetensors"), expected)
    data = (tmp_path / "good.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[:-5])
    (tmp_path / "junk.safetensors").write_bytes(b"\xff" * 64)
    for name in ("cut.safetensors", "junk.safetensors"):
        _refused(tmp_path / name, "")
    assert calls == [] and not list(tmp_path.glob("*.corrupted"))


def test_safetensors_tensors_do_not_keep_the_file_mapped(tmp_path):
    """A file rewritten in place after reading leaves the tensors read before as they were."""
    path = tmp_path / "lora.safetensors"
    safetensors.torch.save_file({"w": torch.zeros(4096)}, str(path))
    tree = load_tensors(path)
    data = path.read_bytes()
    with open(path, "r+b") as file:  # the same inode, new bytes
        file.write(data[: len(data) - 4 * 4096] + b"\x01" * (4 * 4096))
    assert torch.equal(tree["w"], torch.zeros(4096))
