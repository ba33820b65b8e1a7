"""A real WebUI (A1111 or Forge) started here for the integration tests, with AlignIT linked into its
``extensions/`` and test sources written into its folders (all removed afterwards), driven through its API."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
import torch
from weight_files import diffusers_name

ROOT = Path(__file__).resolve().parents[1]
EMBEDDING = "alignit_test_sks"
LORA = "alignit_test_lora"
LORA_DIFFUSERS = "alignit_test_lora_diffusers"
CD = "alignit_test_cd"
# SD1.5's cross-attention layers, their widths and diffusers names (configs/v1-inference.yaml: 320 channels, mult 1, 2, 4, 4)
SD15_ATTN2 = {
    **{f"input_blocks.{i}.1": w for i, w in [(1, 320), (2, 320), (4, 640), (5, 640), (7, 1280), (8, 1280)]},
    "middle_block.1": 1280,
    **{f"output_blocks.{i}.1": w for i, w in [(3, 1280), (4, 1280), (5, 1280), (6, 640), (7, 640), (8, 640)]},
    **{f"output_blocks.{i}.1": 320 for i in (9, 10, 11)},
}
BASE = {"steps": 2, "width": 64, "height": 64, "seed": 7, "sampler_name": "Euler", "cfg_scale": 7}


def call(url: str, path: str, payload: dict | None = None, timeout: float = 600) -> dict:
    data = None if payload is None else json.dumps(payload).encode()
    request = urllib.request.Request(url + path, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read())


def _write_sources(folder: Path) -> list[Path]:
    """A test embedding, LoRA (kohya LDM names, and kohya diffusers names with text-encoder parts) and Custom
    Diffusion delta for SD1.5, in the WebUI's folders."""
    from safetensors.torch import save_file

    generator = torch.Generator().manual_seed(3)
    embedding = folder / "embeddings" / f"{EMBEDDING}.safetensors"
    save_file({"emb_params": torch.randn(2, 768, generator=generator) * 0.3}, str(embedding))
    loras = folder / "models" / "Lora"
    lora, lora_diffusers = loras / f"{LORA}.safetensors", loras / f"{LORA_DIFFUSERS}.safetensors"
    delta = folder / "models" / "CustomDiffusion" / f"{CD}.bin"
    loras.mkdir(parents=True, exist_ok=True)
    delta.parent.mkdir(parents=True, exist_ok=True)
    lora_tensors, diffusers_tensors, cd_tensors = {}, {}, {}
    for block, width in SD15_ATTN2.items():
        for proj in "kv":
            factors = {
                "lora_down.weight": torch.randn(4, 768, generator=generator) * 0.2,
                "lora_up.weight": torch.randn(width, 4, generator=generator) * 0.2,
                "alpha": torch.tensor(4.0),
            }
            name = f"lora_unet_{block.replace('.', '_')}_transformer_blocks_0_attn2_to_{proj}"
            lora_tensors |= {f"{name}.{part}": tensor for part, tensor in factors.items()}
            name = "lora_unet_" + diffusers_name(f"{block}.transformer_blocks.0.attn2.to_{proj}").replace(".", "_")
            diffusers_tensors |= {f"{name}.{part}": tensor.clone() for part, tensor in factors.items()}
            cd_tensors[f"model.diffusion_model.{block}.transformer_blocks.0.attn2.to_{proj}.weight"] = (
                torch.randn(width, 768, generator=generator) * 0.05
            )
    for layer in range(12):
        for proj in ("q_proj", "v_proj"):
            name = f"lora_te_text_model_encoder_layers_{layer}_self_attn_{proj}"
            diffusers_tensors[f"{name}.lora_down.weight"] = torch.randn(4, 768, generator=generator) * 0.02
            diffusers_tensors[f"{name}.lora_up.weight"] = torch.randn(768, 4, generator=generator) * 0.02
    save_file(lora_tensors, str(lora))
    save_file(diffusers_tensors, str(lora_diffusers))
    torch.save({"state_dict": cd_tensors | {"embed": torch.randn(1, 768, generator=generator) * 0.3}}, delta)
    return [embedding, lora, lora_diffusers, delta]


@contextlib.contextmanager
def running_webui(folder: Path, python: str, arguments: Sequence[str], log: Path) -> Iterator[str]:
    """Start the WebUI in ``folder`` on a free port with ``arguments``; yield its URL; stop it and clean up."""
    link = folder / "extensions" / "alignit"
    written = _write_sources(folder)
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to(ROOT, target_is_directory=True)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = [python, "launch.py", "--api", "--nowebui", "--port", str(port), *arguments]
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
        call(url, "/sdapi/v1/options", {"live_previews_enable": False, "emphasis": "Original"})
        call(url, "/sdapi/v1/refresh-embeddings", {})
        call(url, "/sdapi/v1/refresh-loras", {})
        yield url
    finally:
        server.terminate()
        try:
            server.wait(60)
        except subprocess.TimeoutExpired:
            server.kill()
        link.unlink()
        for path in written:
            path.unlink()


def txt2img(url: str, prompt: str, alignit: list | None = None, **extra) -> tuple[bytes, dict]:
    payload = dict(BASE, prompt=prompt, **extra)
    if alignit is not None:
        payload["alwayson_scripts"] = {"AlignIT": {"args": alignit}}
    result = call(url, "/sdapi/v1/txt2img", payload)
    return base64.b64decode(result["images"][0]), json.loads(result["info"])


def on(*rows, **settings) -> list:
    return [dict({"enabled": True, "concepts": [list(row) for row in rows]}, **settings)]
