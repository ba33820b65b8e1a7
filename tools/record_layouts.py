"""Record golden layouts: how a real WebUI's own ``tokenize_line`` lays out the prompts of ``tools/layout_corpus.py``.

    ALIGNIT_A1111_DIR=/path/to/a1111 python tools/record_layouts.py a1111 sd15 --ckpt /path/to/sd15.safetensors
    ALIGNIT_FORGE_DIR=/path/to/forge python tools/record_layouts.py forge sdxl --ckpt /path/to/sdxl.safetensors

The WebUI is started as the integration tests start it (``tests/webui_server.py``: CPU, offline, the test probe and
the corpus's embeddings installed for the run, all removed afterwards). For each case, AlignIT's rewrite of the
prompt (triggers → class words, with markers) goes through the WebUI's own prompt parser (AND parts, prompt editing,
alternation): the schedule texts are what AlignIT lays out; their plain text (markers stripped, which must be the
WebUI's parse of the plain prompt) is laid out by the WebUI's ``tokenize_line`` for every text encoder of the model,
under each of the case's settings (emphasis, comma backtrack). The result, with the WebUI's commit, goes to
``tests/golden/layouts_<webui>_<family>.json``; ``tests/test_golden_layouts.py`` compares AlignIT's layout with it.
Only the WebUI's outputs are stored.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "tools")]

from layout_corpus import CASES, EMBEDDINGS  # noqa: E402
from webui_server import EMBEDDING, call, running_webui  # noqa: E402

from alignit.concepts import Concept  # noqa: E402
from alignit.prompt import rewrite_prompt, strip_markers  # noqa: E402

STEPS = 20
CPU = {
    "a1111": ["--skip-prepare-environment", "--skip-torch-cuda-test", "--use-cpu", "all", "--no-half", "--disable-nan-check"],
    "forge": ["--skip-prepare-environment", "--skip-install", "--skip-torch-cuda-test", "--always-cpu", "--skip-version-check"],
}


def _runs(values: list) -> list[list]:
    """``[value, count]`` runs of a list (multipliers are mostly 1.0)."""
    runs: list[list] = []
    for value in values:
        if runs and runs[-1][0] == value:
            runs[-1][1] += 1
        else:
            runs.append([value, 1])
    return runs


def _schedule_texts(url: str, prompts: list[str]) -> list[list[dict]]:
    return call(url, "/alignit-probe/schedules", {"prompts": prompts, "steps": STEPS})["schedules"]


def record(url: str, webui: str) -> dict:
    rewrites = [rewrite_prompt(case.prompt, [Concept(t, c) for t, c in case.concepts]) for case in CASES]
    marked_schedules = _schedule_texts(url, [r.marked for r in rewrites])
    plain_schedules = _schedule_texts(url, [r.plain for r in rewrites])
    settings = sorted({s for case in CASES for s in case.settings if webui == "a1111" or s[1] == 20})
    cases, wanted = [], {s: set() for s in settings}
    for case, rewrite, marked, plain in zip(CASES, rewrites, marked_schedules, plain_schedules):
        texts: dict[str, str] = {}
        for part in marked:
            for _, text in part["schedule"]:
                texts.setdefault(text, strip_markers(text))
        plain_texts = [text for part in plain for _, text in part["schedule"]]
        mine = [s for s in case.settings if s in wanted]
        for setting in mine:
            wanted[setting].update(texts.values())
        index = {text: i for i, text in enumerate(texts)}
        cases.append(
            {
                "id": case.id,
                "tags": list(case.tags),
                "prompt": case.prompt,
                **({"concepts": [list(c) for c in case.concepts], "marked_prompt": rewrite.marked} if case.concepts else {}),
                "and_parts": [[part["weight"], [[end, index[text]] for end, text in part["schedule"]]] for part in marked],
                "plain_parse_agrees": sorted(set(texts.values())) == sorted(set(plain_texts)),
                "texts": [{"marked": m, **({"plain": p} if p != m else {})} for m, p in texts.items()],
                "settings": [list(s) for s in mine],
            }
        )

    laid_out: dict[tuple, dict] = {}
    tokens: dict[str, dict[str, list[int]]] = {}
    encoders: list[str] = []
    for (emphasis, backtrack), texts in wanted.items():
        ordered = sorted(texts)
        answer = call(url, "/alignit-probe/layouts", {"texts": ordered, "emphasis": emphasis, "comma_backtrack": backtrack})
        encoders = answer["encoders"]
        for text, layout in zip(ordered, answer["layouts"]):
            laid_out[(text, emphasis, backtrack)] = {name: _chunks(item["chunks"]) for name, item in layout.items()}
            for name, item in layout.items():
                tokens.setdefault(name, {}).update({fragment: ids for fragment, _, ids in item["fragments"]})
    for case in cases:
        for text in case["texts"]:
            plain = text.get("plain", text["marked"])
            text["layouts"] = [laid_out[(plain, e, b)] for e, b in case["settings"]]
    return {"encoders": encoders, "cases": cases, "tokenizer": {name: dict(sorted(t.items())) for name, t in tokens.items()}}


def _chunks(chunks: list[dict]) -> list[dict]:
    return [{"tokens": c["tokens"], "multipliers": _runs(c["multipliers"]), "fixes": c["fixes"]} for c in chunks]


def _commit(folder: Path) -> str:
    return subprocess.run(
        ["git", "-C", str(folder), "rev-parse", "HEAD"], capture_output=True, text=True, check=True
    ).stdout.strip()


def write(path: Path, data: dict) -> None:
    """JSON with one case per line (reviewable diffs, no line per token)."""
    head = {key: value for key, value in data.items() if key not in ("cases", "tokenizer")}
    lines = ["{"] + [f" {json.dumps(k)}: {json.dumps(v, ensure_ascii=False)}," for k, v in head.items()]
    lines.append(' "tokenizer": {')
    for i, (name, table) in enumerate(data["tokenizer"].items()):
        lines.append(f"  {json.dumps(name)}: {{")
        rows = [f"   {json.dumps(text, ensure_ascii=False)}: {json.dumps(ids)}" for text, ids in table.items()]
        lines.append(",\n".join(rows))
        lines.append("  }" + ("," if i < len(data["tokenizer"]) - 1 else ""))
    lines.append(" },")
    lines.append(' "cases": [')
    lines.append(",\n".join("  " + json.dumps(case, ensure_ascii=False, separators=(",", ":")) for case in data["cases"]))
    lines.append(" ]")
    lines.append("}")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("webui", choices=sorted(CPU))
    parser.add_argument("family", choices=["sd15", "sdxl"])
    parser.add_argument("--ckpt", required=True, help="the checkpoint to load (its family's text encoders lay out)")
    parser.add_argument("--args", default="", help="more launch arguments (--unet-in-fp16 --clip-in-fp16 on Forge SDXL)")
    parser.add_argument("--out", type=Path, default=None)
    options = parser.parse_args()
    prefix = f"ALIGNIT_{options.webui.upper()}"
    folder = Path(os.environ[f"{prefix}_DIR"])
    python = os.environ.get(f"{prefix}_PYTHON", str(folder / "venv" / "bin" / "python"))
    out = options.out or ROOT / "tests" / "golden" / f"layouts_{options.webui}_{options.family}.json"
    log = Path(os.environ.get(f"{prefix}_LOG", Path(tempfile.mkdtemp()) / "server.log"))
    arguments = [*CPU[options.webui], "--ckpt", options.ckpt, *options.args.split()]
    with running_webui(folder, python, arguments, log, options.family, EMBEDDINGS) as url:
        data = record(url, options.webui)
    meta = {
        "webui": options.webui,
        "commit": _commit(folder),
        "family": options.family,
        "checkpoint": Path(options.ckpt).name,
        "recorded_by": "tools/record_layouts.py (tests/webui_probe: the WebUI's own tokenize_line and prompt parser)",
        "embeddings": {**EMBEDDINGS, EMBEDDING: 2},
        "schedule_steps": STEPS,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    write(out, {**meta, **data})
    texts = sum(len(case["texts"]) for case in data["cases"])
    print(f"{out}: {len(data['cases'])} prompts, {texts} texts, encoders {data['encoders']}")


if __name__ == "__main__":
    main()
