"""A real WebUI (A1111 or Forge) started here for the integration tests and ``tools/record_layouts.py``, with AlignIT
and the test probe (``tests/webui_probe``: the WebUI's own layouts, prompt schedules and cross-attention keys/values)
linked into its ``extensions/`` and test sources written into its folders (all removed afterwards), driven through
its API."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from weight_files import diffusers_name

ROOT = Path(__file__).resolve().parents[1]
PROBE = ROOT / "tests" / "webui_probe"
EMBEDDING = "alignit_test_sks"
LORA = "alignit_test_lora"
LORA_DIFFUSERS = "alignit_test_lora_diffusers"
CD = "alignit_test_cd"
LYCORIS = {kind: f"alignit_test_{kind}" for kind in ("loha", "lokr", "ia3", "dora", "locon", "full")}
EMBEDDING_OTHER = "alignit_test_other_family"
LORA_OTHER = "alignit_test_lora_other_family"
REFINER = "alignit_test_refiner"
STARTED: list[str] = []
"""One line per WebUI the tests started: which WebUI at which commit, the model family and how its checkpoint was made
(the test summary prints them)."""
# Cross-attention layers (block → width, transformer depth), context width, text encoders (LoRA prefix → width,
# layers) and embedding shapes: SD1.5 (configs/v1-inference.yaml) and SDXL (sd_xl_base.yaml: depth 2 at 640, 10 at 1280)
FAMILIES = {
    "sd15": {
        "attn2": {
            **{f"input_blocks.{i}.1": (w, 1) for i, w in [(1, 320), (2, 320), (4, 640), (5, 640), (7, 1280), (8, 1280)]},
            "middle_block.1": (1280, 1),
            **{f"output_blocks.{i}.1": (w, 1) for i, w in [(3, 1280), (4, 1280), (5, 1280), (6, 640), (7, 640), (8, 640)]},
            **{f"output_blocks.{i}.1": (320, 1) for i in (9, 10, 11)},
        },
        "context": 768,
        "text": {"lora_te": (768, 12)},
        "embedding": {"emb_params": 768},
    },
    "sdxl": {
        "attn2": {
            **{f"input_blocks.{i}.1": (640, 2) for i in (4, 5)},
            **{f"input_blocks.{i}.1": (1280, 10) for i in (7, 8)},
            "middle_block.1": (1280, 10),
            **{f"output_blocks.{i}.1": (1280, 10) for i in (0, 1, 2)},
            **{f"output_blocks.{i}.1": (640, 2) for i in (3, 4, 5)},
        },
        "context": 2048,
        "text": {"lora_te1": (768, 12), "lora_te2": (1280, 32)},
        "embedding": {"clip_l": 768, "clip_g": 1280},
    },
}
BASE = {"steps": 2, "width": 64, "height": 64, "seed": 7, "sampler_name": "Euler", "cfg_scale": 7}


def call(url: str, path: str, payload: dict | None = None, timeout: float = 600) -> dict:
    data = None if payload is None else json.dumps(payload).encode()
    request = urllib.request.Request(url + path, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read())


def write_embedding(folder: Path, family: str, name: str, vectors: int, seed: int) -> Path:
    """A random textual-inversion embedding of ``vectors`` vectors for a model family, in the WebUI's ``embeddings``."""
    from safetensors.torch import save_file

    generator = torch.Generator().manual_seed(seed)
    path = folder / "embeddings" / f"{name}.safetensors"
    save_file(
        {key: torch.randn(vectors, width, generator=generator) * 0.3 for key, width in FAMILIES[family]["embedding"].items()},
        str(path),
    )
    return path


def _write_sources(folder: Path, family: str, embeddings: Mapping[str, int] | None = None) -> list[Path]:
    """A test embedding (and ``embeddings``: name → vectors), LoRA (kohya LDM names, and kohya diffusers names with
    text-encoder parts) and Custom Diffusion delta (with a modifier token on SD1.5) for a model family, in the
    WebUI's folders."""
    from safetensors.torch import save_file

    shapes = FAMILIES[family]
    extra = enumerate((embeddings or {}).items(), 10)
    written = [write_embedding(folder, family, name, count, seed) for seed, (name, count) in extra]
    generator = torch.Generator().manual_seed(3)
    embedding = folder / "embeddings" / f"{EMBEDDING}.safetensors"
    save_file(
        {key: torch.randn(2, width, generator=generator) * 0.3 for key, width in shapes["embedding"].items()}, str(embedding)
    )
    loras = folder / "models" / "Lora"
    lora, lora_diffusers = loras / f"{LORA}.safetensors", loras / f"{LORA_DIFFUSERS}.safetensors"
    delta = folder / "models" / "CustomDiffusion" / f"{CD}.bin"
    loras.mkdir(parents=True, exist_ok=True)
    delta.parent.mkdir(parents=True, exist_ok=True)
    lora_tensors, diffusers_tensors, cd_tensors = {}, {}, {}
    context = shapes["context"]
    for block, (width, depth) in shapes["attn2"].items():
        for index in range(depth):
            for proj in "kv":
                factors = {
                    "lora_down.weight": torch.randn(4, context, generator=generator) * 0.2,
                    "lora_up.weight": torch.randn(width, 4, generator=generator) * 0.2,
                    "alpha": torch.tensor(4.0),
                }
                layer = f"{block}.transformer_blocks.{index}.attn2.to_{proj}"
                lora_tensors |= {f"lora_unet_{layer.replace('.', '_')}.{part}": t for part, t in factors.items()}
                name = "lora_unet_" + diffusers_name(layer).replace(".", "_")
                diffusers_tensors |= {f"{name}.{part}": t.clone() for part, t in factors.items()}
                cd_tensors[f"model.diffusion_model.{layer}.weight"] = torch.randn(width, context, generator=generator) * 0.05
    for prefix, (width, layers) in shapes["text"].items():
        for layer in range(layers):
            for proj in ("q_proj", "v_proj"):
                name = f"{prefix}_text_model_encoder_layers_{layer}_self_attn_{proj}"
                diffusers_tensors[f"{name}.lora_down.weight"] = torch.randn(4, width, generator=generator) * 0.02
                diffusers_tensors[f"{name}.lora_up.weight"] = torch.randn(width, 4, generator=generator) * 0.02
    save_file(lora_tensors, str(lora))
    save_file(diffusers_tensors, str(lora_diffusers))
    if family == "sd15":  # a modifier token: Custom Diffusion's own SD1 training; refused on SDXL
        cd_tensors["embed"] = torch.randn(1, 768, generator=generator) * 0.3
    torch.save({"state_dict": cd_tensors}, delta)
    return [*written, embedding, lora, lora_diffusers, delta]


def _lycoris_module(kind: str, out: int, inp: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """One linear module's parts in a LyCORIS file of ``kind`` (kohya part names), with a modest ``ΔW``."""

    def rand(*shape: int, scale: float = 0.2) -> torch.Tensor:
        return torch.randn(*shape, generator=generator) * scale

    if kind == "loha":
        return {"hada_w1_a": rand(out, 4), "hada_w1_b": rand(4, inp), "hada_w2_a": rand(out, 4), "hada_w2_b": rand(4, inp)}
    if kind == "lokr":
        return {"lokr_w1": rand(4, 4), "lokr_w2_a": rand(out // 4, 4), "lokr_w2_b": rand(4, inp // 4), "alpha": torch.tensor(4.0)}
    if kind == "ia3":
        return {"weight": rand(out, scale=0.3), "on_input": torch.tensor(False)}
    if kind == "dora":
        return {"lora_down.weight": rand(4, inp), "lora_up.weight": rand(out, 4), "alpha": torch.tensor(4.0)} | {
            "dora_scale": 0.5 + torch.rand(1, inp, generator=generator)
        }
    if kind == "full":
        return {"diff": rand(out, inp, scale=0.02)}
    return {"lora_down.weight": rand(4, inp), "lora_up.weight": rand(out, 4), "alpha": torch.tensor(4.0)}  # locon


def _write_more_sources(folder: Path, family: str) -> list[Path]:
    """LyCORIS files of every type AlignIT reads (``LYCORIS``: LoHa with text parts for each encoder, LoKr, (IA)³, DoRA,
    a LoCon whose conv parts are not K/V, a full diff on one layer), and an embedding and a LoRA of the other family."""
    from safetensors.torch import save_file

    shapes, generator = FAMILIES[family], torch.Generator().manual_seed(4)
    loras = folder / "models" / "Lora"
    written = []
    for kind, name in LYCORIS.items():
        tensors = {}
        for block, (width, depth) in list(shapes["attn2"].items())[: 1 if kind == "full" else None]:
            for index in range(1 if kind == "full" else depth):
                for proj in "kv"[: 1 if kind == "full" else 2]:
                    base = f"lora_unet_{block}.transformer_blocks.{index}.attn2.to_{proj}".replace(".", "_")
                    module = _lycoris_module(kind, width, shapes["context"], generator)
                    tensors |= {f"{base}.{part}": tensor for part, tensor in module.items()}
        if kind == "locon":  # a conv part, as LoCon trains on ResBlocks: not a K/V part
            base = "lora_unet_input_blocks_1_0_in_layers_2"
            tensors |= {f"{base}.lora_down.weight": torch.randn(4, 320, 3, 3, generator=generator) * 0.05}
            tensors |= {f"{base}.lora_up.weight": torch.randn(320, 4, 1, 1, generator=generator) * 0.05}
            tensors[f"{base}.alpha"] = torch.tensor(4.0)
        if kind == "loha":
            for prefix, (width, layers) in shapes["text"].items():
                for layer in range(layers):
                    module = _lycoris_module(kind, width, width, generator)
                    base = f"{prefix}_text_model_encoder_layers_{layer}_self_attn_q_proj"
                    tensors |= {f"{base}.{part}": tensor * 0.3 for part, tensor in module.items()}
        save_file(tensors, str(loras / f"{name}.safetensors"))
        written.append(loras / f"{name}.safetensors")
    other = FAMILIES["sdxl" if family == "sd15" else "sd15"]
    embedding = folder / "embeddings" / f"{EMBEDDING_OTHER}.safetensors"
    save_file(
        {key: torch.randn(2, width, generator=generator) * 0.3 for key, width in other["embedding"].items()}, str(embedding)
    )
    # a cross-attention layer of the other family that this one lacks (SDXL's second block at input 4; SD1.5's input 1)
    block, index = ("input_blocks.4.1", 1) if family == "sd15" else ("input_blocks.1.1", 0)
    base = f"lora_unet_{block}.transformer_blocks.{index}.attn2.to_k".replace(".", "_")
    width = other["attn2"][block][0]
    module = _lycoris_module("locon", width, other["context"], generator)
    save_file({f"{base}.{part}": tensor for part, tensor in module.items()}, str(loras / f"{LORA_OTHER}.safetensors"))
    return [*written, embedding, loras / f"{LORA_OTHER}.safetensors"]


def _refiner_alias(folder: Path, arguments: Sequence[str], family: str) -> list[Path]:
    """The SD1.5 checkpoint once more under the name ``REFINER`` (a link in ``models/Stable-diffusion``), for a refiner
    of the same weights. Not for SDXL: switching to a second SDXL model needs memory this machine does not have."""
    if family != "sd15" or "--ckpt" not in arguments:
        return []
    alias = folder / "models" / "Stable-diffusion" / f"{REFINER}.safetensors"
    if alias.is_symlink():  # left by a run that was killed
        alias.unlink()
    alias.symlink_to(Path(arguments[list(arguments).index("--ckpt") + 1]).resolve())
    return [alias]


def provenance(folder: Path, arguments: Sequence[str], family: str) -> str:
    """Which WebUI (and commit) the tests run, the model family and how its checkpoint was made: a checkpoint of
    ``tools/random_checkpoint.py`` says so in its metadata (random weights whose images depend on the prompt)."""
    webui = "Forge" if (folder / "modules_forge").is_dir() else "AUTOMATIC1111"
    git = subprocess.run(["git", "-C", str(folder), "rev-parse", "--short=8", "HEAD"], capture_output=True, text=True)
    commit = git.stdout.strip() or "unknown commit"
    made = "no --ckpt"
    if "--ckpt" in arguments:
        checkpoint = Path(arguments[list(arguments).index("--ckpt") + 1])
        made = f"{checkpoint.name}: a checkpoint not made by tools/random_checkpoint.py"
        if checkpoint.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(checkpoint), framework="pt") as file:
                recipe = (file.metadata() or {}).get("alignit_random_checkpoint")
            if recipe:
                made = f"{checkpoint.name}: random weights by tools/random_checkpoint.py ({recipe})"
    return f"{webui} at {commit}, family {family}, checkpoint {made}"


@contextlib.contextmanager
def running_webui(
    folder: Path,
    python: str,
    arguments: Sequence[str],
    log: Path,
    family: str = "sd15",
    embeddings: Mapping[str, int] | None = None,
    options: dict | None = None,
    ui: bool = False,
) -> Iterator[str]:
    """Start the WebUI in ``folder`` on a free port with ``arguments``, test sources for a model ``family`` (and
    extra test ``embeddings``: name → vectors) and WebUI ``options`` set for the run, API only unless ``ui``; yield
    its URL; stop it and clean up."""
    created = [path for path in (folder / "models" / "CustomDiffusion", folder / "models" / "Lora") if not path.exists()]
    links = {folder / "extensions" / "alignit": ROOT, folder / "extensions" / "alignit_probe": PROBE}
    written = (
        _write_sources(folder, family, embeddings or {})
        + _write_more_sources(folder, family)
        + _refiner_alias(folder, arguments, family)
    )
    for link, target in links.items():
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(target, target_is_directory=True)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    api = ["--api"] if ui else ["--api", "--nowebui"]
    command = [python, "launch.py", *api, "--server-name", "127.0.0.1", "--port", str(port), *arguments]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    with open(log, "w") as out:
        server = subprocess.Popen(command, cwd=folder, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 900
        while True:
            try:
                call(url, "/sdapi/v1/options", timeout=10)
                break
            except OSError:
                if server.poll() is not None or time.time() > deadline:
                    pytest.fail(f"the WebUI did not start; see {log}:\n{log.read_text()[-3000:]}")
                time.sleep(3)
        STARTED.append(provenance(folder, arguments, family))
        settings = {"live_previews_enable": False, "emphasis": "Original", **(options or {})}
        saved = {key: value for key, value in call(url, "/sdapi/v1/options").items() if key in settings}
        call(url, "/sdapi/v1/options", settings)
        if not ui:  # with its UI, the WebUI reads them itself (Forge's refresh-embeddings fails before a model loads)
            call(url, "/sdapi/v1/refresh-embeddings", {})
            call(url, "/sdapi/v1/refresh-loras", {})
        try:
            yield url
        finally:
            call(url, "/sdapi/v1/options", saved)  # the WebUI saves options to its config.json
    finally:
        server.terminate()
        try:
            server.wait(60)
        except subprocess.TimeoutExpired:
            server.kill()
        for link in links:
            link.unlink()
        for path in written:
            path.unlink()
        for made in created:
            if made.is_dir() and not any(made.iterdir()):
                made.rmdir()


def started(
    prefix: str,
    cpu: Sequence[str],
    tmp_path_factory,
    arguments: str | None = None,
    family: str = "sd15",
    options: dict | None = None,
):
    """The WebUI named by ``{prefix}_DIR``, started with ``cpu`` and ``{prefix}_ARGS`` (or ``arguments``), with
    ``{prefix}_PYTHON`` (default: its ``venv/bin/python``), its log in ``{prefix}_LOG``; a context giving its URL."""
    folder = Path(os.environ[f"{prefix}_DIR"])
    python = os.environ.get(f"{prefix}_PYTHON", str(folder / "venv" / "bin" / "python"))
    log = Path(os.environ.get(f"{prefix}_LOG", tmp_path_factory.mktemp("webui") / "server.log"))
    extra = os.environ.get(f"{prefix}_ARGS", "") if arguments is None else arguments
    return running_webui(folder, python, [*cpu, *extra.split()], log, family, options=options)


def webui_fixture(
    prefix: str, cpu: Sequence[str], arguments: str | None = None, family: str = "sd15", options: dict | None = None
):
    """A module-scoped ``webui`` fixture: the URL of the WebUI ``started`` with these settings (``options``: WebUI
    options set for the run, restored afterwards)."""

    @pytest.fixture(scope="module")
    def webui(tmp_path_factory):
        with started(prefix, cpu, tmp_path_factory, arguments, family, options) as url:
            yield url

    return webui


def txt2img(url: str, prompt: str, alignit: list | None = None, mode: str = "txt2img", **extra) -> tuple[bytes, dict]:
    """One image (and its info) from ``/sdapi/v1/{mode}``; img2img takes ``init_images`` in ``extra``."""
    payload = dict(BASE, prompt=prompt, **extra)
    if alignit is not None:
        payload["alwayson_scripts"] = {"AlignIT": {"args": alignit}}
    result = call(url, f"/sdapi/v1/{mode}", payload)
    return base64.b64decode(result["images"][0]), json.loads(result["info"])


def on(*rows, **settings) -> list:
    return [dict({"enabled": True, "concepts": [list(row) for row in rows]}, **settings)]


def webui_layout(url: str, text: str) -> list[dict]:
    """The chunks the WebUI's own ``tokenize_line`` makes of ``text`` (the first text encoder's), through the probe."""
    return call(url, "/alignit-probe/layouts", {"texts": [text]})["layouts"][0]["clip_l"]["chunks"]


@dataclass
class Attention:
    """The keys and values every cross-attention layer's attention received during one generation (the probe's
    record): per UNet call, the batch order (0 cond, 1 uncond), the dtype, and per ``layer.k``/``layer.v`` a tensor
    batch x rows x width; ``weights``: the dtype each projection's weight is stored in."""

    calls: list[dict]
    tensors: dict[str, torch.Tensor]
    weights: dict[str, str]

    def keys(self, call: int) -> list[str]:
        return sorted(self.calls[call]["kv"])

    def rows(self, call: int, key: str, kind: int) -> torch.Tensor:
        """The rows of the one batch item of ``kind`` (0: cond, 1: uncond) in that call."""
        order = self.calls[call]["order"]
        assert order.count(kind) == 1, f"UNet call {call}: batch order {order}"
        return self.tensors[f"{key}#{self.calls[call]['kv'][key]}"][order.index(kind)]


def recorded_attention(url: str, path: Path, prompt: str, alignit: list | None = None, **extra) -> tuple[dict, Attention]:
    """One txt2img (its info) with the probe recording what each cross-attention layer's attention received."""
    from safetensors.torch import load_file

    call(url, "/alignit-probe/kv/arm", {"path": str(path)})
    try:
        _, info = txt2img(url, prompt, alignit, **extra)
    finally:
        record = call(url, "/alignit-probe/kv/collect", {})
    return info, Attention(record["calls"], load_file(str(path)), record["weights"])
