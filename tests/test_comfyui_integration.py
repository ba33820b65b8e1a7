"""End to end against a real ComfyUI, started here: this checkout linked into its ``custom_nodes/``, test sources
written into its ``models/`` folders (all removed afterwards), API-format workflows queued with ``POST /prompt``, their
results read from ``/history`` and their images fetched from ``/view``.

Skipped unless ``ALIGNIT_COMFYUI_DIR`` names a ComfyUI folder that starts offline on the CPU. ``ALIGNIT_COMFYUI_PYTHON``
(default: the folder's ``venv/bin/python``), ``ALIGNIT_COMFYUI_ARGS`` (more launch arguments), ``ALIGNIT_COMFYUI_LOG``
(the server's log), ``ALIGNIT_COMFYUI_LOCK`` (a file to hold with ``flock`` while the server lives),
``ALIGNIT_COMFYUI_CKPT`` (an SD1.5 checkpoint in its ``models/checkpoints``, default ``sd15_random.safetensors``) and
``ALIGNIT_COMFYUI_SDXL_CKPT`` (an SDXL one; the SDXL case is skipped without it).

What they show on the real ComfyUI: the node pack loads from ``custom_nodes/`` with what ComfyUI ships; AlignIT's layout
agrees with ComfyUI's own tokenizer on the prompts (it would say so otherwise); weight-side concepts (LoRA in both
scopes, with kohya LDM and kohya diffusers names mapped by ComfyUI's key maps, Custom Diffusion with a modifier token)
and embeddings, SD1.5 and SDXL, run without a message and change the image; bad concepts are reported on the node and
give exactly CLIP Text Encode's image; a plain workflow gives the same bytes before and after AlignIT runs (no patch,
changed weight or poisoned cache left behind); the example workflow runs.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from PIL import Image
from webui_server import CD, EMBEDDING, LORA, LORA_DIFFUSERS, _write_sources

pytestmark = pytest.mark.skipif(not os.environ.get("ALIGNIT_COMFYUI_DIR"), reason="ALIGNIT_COMFYUI_DIR is not set")

ROOT = Path(__file__).resolve().parents[1]
SD15 = os.environ.get("ALIGNIT_COMFYUI_CKPT", "sd15_random.safetensors")
SDXL = os.environ.get("ALIGNIT_COMFYUI_SDXL_CKPT")
PREFIX = "alignit_test"
EVIL = "alignit_test_evil"


class Server:
    """A running ComfyUI's HTTP API."""

    def __init__(self, url: str, output: Path):
        self.url, self.output = url, output

    def call(self, path: str, payload: dict | None = None, timeout: float = 60) -> dict:
        data = None if payload is None else json.dumps(payload).encode()
        request = urllib.request.Request(self.url + path, data=data, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                body = response.read()
        except urllib.error.HTTPError as error:
            raise AssertionError(f"{path}: HTTP {error.code}: {error.read().decode(errors='replace')[:3000]}") from None
        return json.loads(body) if body else {}

    def run(self, graph: dict, timeout: float = 1200) -> tuple[dict, dict[str, bytes]]:
        """Queue an API-format graph; its history entry and the PNG of each SaveImage node."""
        prompt_id = self.call("/prompt", {"prompt": graph, "client_id": "alignit-tests"})["prompt_id"]
        deadline = time.time() + timeout
        while True:
            entry = self.call(f"/history/{prompt_id}").get(prompt_id)
            if entry and entry["status"].get("completed") is not None and entry["status"].get("status_str") != "running":
                break
            assert time.time() < deadline, f"prompt {prompt_id} did not finish"
            time.sleep(1)
        assert entry["status"]["status_str"] == "success", json.dumps(entry["status"])[:3000]
        images = {}
        for node, output in entry["outputs"].items():
            for image in output.get("images", []):
                query = urllib.parse.urlencode({k: image[k] for k in ("filename", "subfolder", "type")})
                with urllib.request.urlopen(f"{self.url}/view?{query}", timeout=60) as response:
                    images[node] = response.read()
        return entry, images

    def free(self) -> None:
        """Unload the models and empty ComfyUI's node cache (main.py 253-264) before the next prompt."""
        self.call("/free", {"unload_models": True, "free_memory": True})


def _sources(tmp: Path, family: str, comfyui: Path, subfolder: str) -> list[Path]:
    """The sources ``webui_server`` writes for a model family, moved into ComfyUI's folders (in ``subfolder``)."""
    (tmp / family / "embeddings").mkdir(parents=True)
    folders = {".safetensors": "loras", ".bin": "custom_diffusion"}
    placed = []
    for path in _write_sources(tmp / family, family):
        folder = "embeddings" if path.stem == EMBEDDING else folders[path.suffix]
        target = comfyui / "models" / folder / subfolder / path.name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(path), target)
        placed.append(target)
    return placed


class _Reduce:
    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


@contextlib.contextmanager
def running_comfyui(folder: Path, tmp: Path) -> Iterator[Server]:
    python = os.environ.get("ALIGNIT_COMFYUI_PYTHON", str(folder / "venv" / "bin" / "python"))
    log = Path(os.environ.get("ALIGNIT_COMFYUI_LOG", tmp / "comfyui.log"))
    link = folder / "custom_nodes" / "alignit"
    created_cd = not (folder / "models" / "custom_diffusion").exists()
    placed = _sources(tmp, "sd15", folder, "")
    if SDXL:
        placed += _sources(tmp, "sdxl", folder, "alignit_sdxl")
    evil = folder / "models" / "embeddings" / f"{EVIL}.pt"
    torch.save({"string_to_param": {"*": _Reduce(os.system, f"touch '{tmp / 'ran'}'")}}, evil)
    placed.append(evil)
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to(ROOT, target_is_directory=True)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = [python, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port), "--disable-api-nodes"]
    command += ["--disable-auto-launch", "--disable-metadata", *os.environ.get("ALIGNIT_COMFYUI_ARGS", "").split()]
    if os.environ.get("ALIGNIT_COMFYUI_LOCK"):
        command = ["flock", os.environ["ALIGNIT_COMFYUI_LOCK"], *command]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", DO_NOT_TRACK="1")
    with open(log, "w") as out:
        process = subprocess.Popen(command, cwd=folder, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    server = Server(f"http://127.0.0.1:{port}", folder / "output" / PREFIX)
    try:
        deadline = time.time() + (3 * 3600 if os.environ.get("ALIGNIT_COMFYUI_LOCK") else 900)  # the lock may be held long
        while True:
            try:
                server.call("/system_stats", timeout=10)
                break
            except (OSError, AssertionError):
                if process.poll() is not None or time.time() > deadline:
                    pytest.fail(f"ComfyUI did not start; see {log}:\n{log.read_text()[-3000:]}")
                time.sleep(3)
        server.log = log  # type: ignore[attr-defined]
        yield server
    finally:  # the whole process group: flock does not pass signals on to the server
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
        link.unlink()
        for path in placed:
            path.unlink()
        if SDXL:
            for kind in ("embeddings", "loras", "custom_diffusion"):
                with contextlib.suppress(OSError):
                    (folder / "models" / kind / "alignit_sdxl").rmdir()
        if created_cd:
            shutil.rmtree(folder / "models" / "custom_diffusion", ignore_errors=True)
        shutil.rmtree(server.output, ignore_errors=True)
        assert not (tmp / "ran").exists(), "a hostile pickle ran"


@pytest.fixture(scope="module")
def comfyui(tmp_path_factory) -> Iterator[Server]:
    with running_comfyui(Path(os.environ["ALIGNIT_COMFYUI_DIR"]), tmp_path_factory.mktemp("comfyui")) as server:
        yield server


def graph(text: str, concepts: list[tuple] | None = None, ckpt: str = SD15, seed: int = 7, **encode) -> dict:
    """txt2img at 64x64, 2 steps: CLIP Text Encode, or AlignIT Text Encode with a chain of AlignIT Concept nodes
    ``(trigger, class word, source[, options])``; its MODEL output goes to the sampler."""
    nodes: dict = {
        "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}},
        "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry", "clip": ["4", 1]}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
        "9": {"class_type": "SaveImage", "inputs": {"filename_prefix": f"{PREFIX}/image", "images": ["8", 0]}},
    }
    model, positive = ["4", 0], ["6", 0]
    if concepts is None:
        nodes["6"] = {"class_type": "CLIPTextEncode", "inputs": {"text": text, "clip": ["4", 1]}}
    else:
        chain = None
        for i, (trigger, class_word, source, *options) in enumerate(concepts):
            inputs = {"trigger": trigger, "class_word": class_word, "source": source, "strength": 1.0}
            inputs |= options[0] if options else {}
            if chain is not None:
                inputs["concepts"] = chain
            nodes[str(20 + i)] = {"class_type": "AlignITConcept", "inputs": inputs}
            chain = [str(20 + i), 0]
        inputs = {"clip": ["4", 1], "model": ["4", 0], "text": text, "concepts": chain, "start": 0.0, "end": 1.0} | encode
        nodes["6"] = {"class_type": "AlignITTextEncode", "inputs": inputs}
        model = ["6", 1]
    nodes["3"] = {
        "class_type": "KSampler",
        "inputs": {
            "seed": seed, "steps": 2, "cfg": 7.0, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0,
            "model": model, "positive": positive, "negative": ["7", 0], "latent_image": ["5", 0],
        },
    }  # fmt: skip
    return nodes


def messages(entry: dict) -> list[str]:
    """What AlignIT Text Encode said (its UI output)."""
    return entry["outputs"].get("6", {}).get("text", [])


def pixels(png: bytes) -> bytes:
    return Image.open(io.BytesIO(png)).convert("RGB").tobytes()


def test_by_the_definition_on_comfyuis_own_modules():
    """tests/comfyui_inprocess.py with ComfyUI's Python: its CLIP, tokenizer, weighting, LoRA loader, UNet and sampler."""
    folder = Path(os.environ["ALIGNIT_COMFYUI_DIR"])
    python = os.environ.get("ALIGNIT_COMFYUI_PYTHON", str(folder / "venv" / "bin" / "python"))
    script = Path(__file__).with_name("comfyui_inprocess.py")
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    result = subprocess.run([python, str(script), str(folder), str(ROOT)], capture_output=True, text=True, env=env, timeout=1800)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert result.stdout.count("ok ") == 15, result.stdout


def test_the_pack_loads_and_declares_its_nodes(comfyui):
    log = comfyui.log.read_text()  # type: ignore[attr-defined]
    assert "IMPORT FAILED" not in log and "Cannot import" not in log, log[-3000:]
    info = comfyui.call("/object_info/AlignITTextEncode")["AlignITTextEncode"]
    assert info["category"] == "conditioning/alignit" and info["display_name"] == "AlignIT Text Encode"
    assert info["output"] == ["CONDITIONING", "MODEL"]
    for group in ("required", "optional"):
        assert all(options.get("tooltip") for _, options in info["input"][group].values())
    concept = comfyui.call("/object_info/AlignITConcept")["AlignITConcept"]
    sources = concept["input"]["required"]["source"][0]
    assert {f"embeddings/{EMBEDDING}.safetensors", f"loras/{LORA}.safetensors", f"custom_diffusion/{CD}.bin"} <= set(sources)


def test_embedding_and_no_trace(comfyui):
    """The plain workflow gives the same bytes before and after AlignIT ran on the same cached checkpoint: its text
    differs by a space, so CLIP Text Encode and the sampler run again, on the MODEL and CLIP AlignIT was given."""
    comfyui.free()
    _, before = comfyui.run(graph("a cat playing badminton in a garden"))
    entry, aligned = comfyui.run(
        graph("a <sks> playing badminton in a garden", [("<sks>", "cat", f"embeddings/{EMBEDDING}.safetensors")])
    )
    _, after = comfyui.run(graph("a cat playing badminton in a garden "))
    assert messages(entry) == []
    assert pixels(aligned["9"]) != pixels(before["9"])
    assert after["9"] == before["9"]


@pytest.mark.parametrize("scope", ["kv", "full"])
@pytest.mark.parametrize("lora", [LORA, LORA_DIFFUSERS])
def test_lora_concept(comfyui, lora, scope):
    """kohya LDM names (UNet K/V) and kohya diffusers names (UNet K/V and text parts), mapped by ComfyUI's key maps."""
    _, plain = comfyui.run(graph("a photo of a man playing badminton"))
    row = ("ohwx", "man", f"loras/{lora}.safetensors", {"lora_weight": 0.8, "lora_scope": scope})
    entry, image = comfyui.run(graph("a photo of ohwx playing badminton", [row]))
    _, after = comfyui.run(graph("a photo of a man playing badminton "))
    assert messages(entry) == []
    assert pixels(image["9"]) != pixels(plain["9"]) and after["9"] == plain["9"]


def test_custom_diffusion_concept_with_an_embedding_and_a_step_range(comfyui):
    rows = [("<new1> cat", "cat", f"custom_diffusion/{CD}.bin"), ("<sks>", "dog", f"embeddings/{EMBEDDING}.safetensors")]
    _, plain = comfyui.run(graph("a cat and a dog playing badminton"))
    entry, image = comfyui.run(graph("a <new1> cat and a <sks> playing badminton", rows))
    assert messages(entry) == [] and pixels(image["9"]) != pixels(plain["9"])
    entry, ranged = comfyui.run(graph("a <new1> cat and a <sks> playing badminton", rows, start=0.0, end=0.5))
    assert messages(entry) == [] and pixels(ranged["9"]) not in (pixels(plain["9"]), pixels(image["9"]))


@pytest.mark.parametrize(
    "text, row, said",
    [
        ("a <sks> on a sofa", ("<sks>", "cat", "embeddings/alignit_test_missing.safetensors"), "no file 'alignit_test_missing"),
        ("a dog on a sofa", ("<sks>", "cat", f"embeddings/{EMBEDDING}.safetensors"), "its trigger is not in the text"),
        ("a <sks> on a sofa", ("<sks>", "cat", f"embeddings/{EVIL}.pt"), f"cannot read {EVIL}.pt: refused global"),
    ],
)
def test_bad_concepts_give_clip_text_encodes_image(comfyui, text, row, said):
    _, plain = comfyui.run(graph(text))
    entry, image = comfyui.run(graph(text, [row]))
    assert said in messages(entry)[0] and messages(entry)[-1] == "AlignIT: no usable concept; encoding without AlignIT"
    assert image["9"] == plain["9"]


@pytest.mark.skipif(not SDXL, reason="ALIGNIT_COMFYUI_SDXL_CKPT is not set")
def test_sdxl(comfyui):
    """CLIP-L and OpenCLIP-G: an embedding with clip_l and clip_g vectors, a LoRA with both text parts."""
    comfyui.free()
    rows = [
        ("<sks>", "cat", f"embeddings/alignit_sdxl/{EMBEDDING}.safetensors"),
        ("ohwx", "man", f"loras/alignit_sdxl/{LORA_DIFFUSERS}.safetensors"),
    ]
    _, plain = comfyui.run(graph("a cat and a man playing badminton", ckpt=SDXL))
    entry, image = comfyui.run(graph("a <sks> and ohwx playing badminton", rows, ckpt=SDXL))
    _, after = comfyui.run(graph("a cat and a man playing badminton ", ckpt=SDXL))
    assert messages(entry) == []
    assert pixels(image["9"]) != pixels(plain["9"]) and after["9"] == plain["9"]
    comfyui.free()


def api_prompt(workflow: dict, object_info: dict) -> dict:
    """The API-format prompt the frontend makes of a UI-format workflow: links by input, widget values in the order
    of each node's widget inputs (a seed's "control after generate" value skipped)."""
    links = {link[0]: link for link in workflow["links"]}
    prompt = {}
    for node in workflow["nodes"]:
        if node["type"] not in object_info:
            continue  # notes
        declared = object_info[node["type"]]["input"]
        linked = {i["name"]: links[i["link"]] for i in node.get("inputs", []) if i.get("link") is not None}
        inputs = {name: [str(link[1]), link[2]] for name, link in linked.items()}
        values = iter(node.get("widgets_values", []))
        order = object_info[node["type"]]["input_order"]
        for name in order["required"] + order.get("optional", []):
            spec = declared.get("required", {}).get(name) or declared["optional"][name]
            kind, options = spec[0], spec[1] if len(spec) > 1 else {}
            if name in linked or not (isinstance(kind, list) or kind in ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO")):
                continue
            inputs[name] = next(values)
            if options.get("control_after_generate"):
                next(values)
        prompt[str(node["id"])] = {"class_type": node["type"], "inputs": inputs}
    return prompt


def test_the_example_workflow_runs(comfyui):
    """workflows/alignit_sd15.json, with this machine's checkpoint and the test embedding in place of the user's."""
    text = (ROOT / "workflows" / "alignit_sd15.json").read_text()
    text = text.replace("v1-5-pruned-emaonly-fp16.safetensors", SD15).replace("my_concept", EMBEDDING)
    workflow = json.loads(text)
    for node in workflow["nodes"]:
        if node["type"] == "EmptyLatentImage":
            node["widgets_values"] = [64, 64, 1]
        if node["type"] == "KSampler":
            node["widgets_values"][2] = 2  # steps
    types = {node["type"] for node in workflow["nodes"]}
    object_info = {kind: comfyui.call(f"/object_info/{kind}")[kind] for kind in types if kind not in ("MarkdownNote", "Note")}
    entry, images = comfyui.run(api_prompt(workflow, object_info))
    aligned = next(node for node in workflow["nodes"] if node["type"] == "AlignITTextEncode")
    assert entry["outputs"].get(str(aligned["id"]), {}).get("text", []) == []
    assert len(images) == 2 and len({pixels(png) for png in images.values()}) == 2
