"""Run the jobs (data-parallel under ``accelerate launch``), then merge and report on the main process.

Every process reads which jobs are done before any writes (a barrier keeps the reads before the writes), so all agree
on the pending jobs and share them out with ``split_between_processes``; each keeps one concept's generator and
references at a time (the shares are contiguous in concept order). A job that raises (out of memory included) is
recorded as failed with the reason and the run goes on.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from tqdm import tqdm

from ..errors import InputError
from .generator import GenerationSettings, GeneratorFactory, ImageGenerator
from .inputs import EvalConcept
from .jobs import MAX_ATTEMPTS, TIMING_KEY, Job, Store, plan, save_image, write_atomic, write_json
from .metrics import FeatureModels, References, score
from .report import plot_png, report_html
from .summary import Row, summarize, to_csv


@dataclass(frozen=True)
class RunConfig:
    """Everything a run needs besides the generator factory."""

    out: Path
    concepts: Sequence[EvalConcept]
    seeds: Sequence[int]
    settings: GenerationSettings
    clip_model: str
    dino_model: str
    generator: str
    prompts_limit: int | None = None
    bootstrap: int = 1000

    def fingerprint(self) -> dict[str, Any]:
        """What every job of one output folder must share (the device may differ between processes)."""
        settings = {k: v for k, v in dataclasses.asdict(self.settings).items() if k != "device"}
        return {"settings": settings, "clip_model": self.clip_model, "dino_model": self.dino_model, "generator": self.generator}


def _reason(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"[:500]


def _open(path: Path) -> Image.Image:
    with Image.open(path) as image:
        image.load()
        return image


class _Progress:
    """A bar on the main process over all jobs; the other processes report their counts through small files."""

    def __init__(self, out: Path, rank: int, world: int, total: int, initial: int) -> None:
        self.out, self.rank, self.world, self.initial, self.count = out, rank, world, initial, 0
        self.bar = tqdm(total=total, initial=initial, unit="job", disable=rank != 0, dynamic_ncols=True)
        self._write()

    def _file(self, rank: int) -> Path:
        return self.out / "progress" / f"rank-{rank}-of-{self.world}"

    def _write(self) -> None:
        if self.world > 1:
            write_atomic(self._file(self.rank), str(self.count).encode())

    def advance(self) -> None:
        self.count += 1
        self._write()
        if self.rank == 0:
            self.bar.update(self.initial + self._everyone() - self.bar.n)

    def _everyone(self) -> int:
        total = self.count
        for rank in range(1, self.world):
            try:
                total += int(self._file(rank).read_text())
            except (OSError, ValueError):
                pass
        return total

    def close(self) -> None:
        if self.rank == 0:
            self.bar.update(self.initial + self._everyone() - self.bar.n)
        self.bar.close()


class _Worker:
    """Runs one process's share: one concept's generator and references at a time."""

    def __init__(self, config: RunConfig, factory: GeneratorFactory, models: FeatureModels) -> None:
        self.config, self.factory, self.models = config, factory, models
        self.store = Store(config.out)
        self.concept: EvalConcept | None = None
        self.generator: ImageGenerator | None = None
        self.references: References | None = None
        self.broken: str | None = None

    def _switch(self, concept: EvalConcept) -> None:
        self.close()
        self.concept, self.broken = concept, None
        try:
            self.references = References.of(self.models, [_open(path) for path in concept.reference_images()])
            self.generator = self.factory(concept, self.config.settings)
        except Exception as error:
            self.broken = f"concept {concept.name}: {_reason(error)}"

    def run(self, job: Job) -> None:
        if job.concept is not self.concept:
            self._switch(job.concept)
        attempts = self.store.attempts(job)
        if self.broken or attempts >= MAX_ATTEMPTS:
            reason = self.broken or f"the process ended during this job {attempts} times (killed, crashed or out of memory)"
            self.store.finish(job, {"status": "failed", "reason": reason})
            return
        self.store.start(job, attempts)
        try:
            self._generate_and_score(job)
        except KeyboardInterrupt:
            self.store.unstart(job, attempts)
            raise
        except Exception as error:
            if isinstance(error, torch.OutOfMemoryError) and torch.cuda.is_available():
                torch.cuda.empty_cache()
            self.store.finish(job, {"status": "failed", "reason": _reason(error)})

    def _generate_and_score(self, job: Job) -> None:
        assert self.generator is not None and self.references is not None
        start = time.perf_counter()
        images = [self.generator.generate(job.prompt, job.seed, aligned) for aligned in (False, True)]
        for image in images:
            if not isinstance(image, Image.Image):
                raise TypeError(f"the generator returned a {type(image).__name__}, not a PIL image")
        generated = time.perf_counter()
        scores = score(self.models, images, job.text_prompt, self.references)
        scored = time.perf_counter()
        result: dict[str, Any] = {"status": "done"}
        for aligned, image, side in zip((False, True), images, scores):
            save_image(self.config.out, job.image_path(aligned), image)
            result["on" if aligned else "off"] = {"image": job.image_path(aligned), **dataclasses.asdict(side)}
        seconds = {"generate": generated - start, "score": scored - generated, "write": time.perf_counter() - scored}
        self.store.finish(job, result, seconds)

    def close(self) -> None:
        close = getattr(self.generator, "close", None)
        if callable(close):
            close()
        self.generator = self.references = None


def _check_fingerprint(config: RunConfig, is_main: bool) -> None:
    path = config.out / "run.json"
    fingerprint = config.fingerprint()
    try:
        before = json.loads(path.read_text())
    except FileNotFoundError:
        before = None
    except (OSError, ValueError) as error:
        raise InputError(f"{path} is unreadable ({error}); use another --out") from error
    if before is not None and before != json.loads(json.dumps(fingerprint)):
        changed = sorted(key for key in fingerprint if before.get(key) != json.loads(json.dumps(fingerprint[key])))
        raise InputError(f"--out {config.out} holds a run with other {', '.join(changed)}; use another --out")
    if before is None and is_main:
        write_json(path, fingerprint)


def merge(config: RunConfig, jobs: Sequence[Job]) -> list[dict[str, Any]]:
    """results.jsonl (one line a job, in plan order, without timings) and timings.jsonl; returns the results."""
    store = Store(config.out)
    results, timings = [], []
    for job in jobs:
        record = store.record(job) or {**job.identity(), "status": "missing", "reason": "no record: its process ended early"}
        seconds = record.pop(TIMING_KEY, None)
        results.append(record)
        if seconds is not None:
            timings.append({"job": job.id, **seconds})
    lines = lambda rows: "".join(json.dumps(row, sort_keys=True) + "\n" for row in rows).encode()  # noqa: E731
    write_atomic(config.out / "results.jsonl", lines(results))
    write_atomic(config.out / "timings.jsonl", lines(timings))
    return results


def report(config: RunConfig, results: Sequence[dict[str, Any]]) -> list[Row]:
    """summary.csv, plot.png and report.html from the merged results."""
    rows = summarize([concept.name for concept in config.concepts], results, config.bootstrap)
    write_atomic(config.out / "summary.csv", to_csv(rows).encode())
    write_atomic(config.out / "plot.png", plot_png(rows))
    write_atomic(config.out / "report.html", report_html(rows, results).encode())
    return rows


def _load_models(config: RunConfig) -> FeatureModels:
    try:
        return FeatureModels(config.clip_model, config.dino_model, config.settings.device)
    except (OSError, ValueError) as error:
        raise InputError(f"cannot load the metric models ({config.clip_model}, {config.dino_model}): {_reason(error)}") from error


def evaluate(config: RunConfig, factory: GeneratorFactory) -> list[Row] | None:
    """Run every pending job of this process's share; on the main process merge and report (others return None)."""
    from accelerate import PartialState

    state = PartialState()
    store = Store(config.out)
    jobs = plan(config.concepts, config.seeds, config.prompts_limit)
    _check_fingerprint(config, state.is_main_process)
    if state.is_main_process:
        store.remove_temporaries()
    pending = [job for job in jobs if not store.is_done(job)]
    models = _load_models(config) if pending else None
    progress = _Progress(config.out, state.process_index, state.num_processes, len(jobs), len(jobs) - len(pending))
    state.wait_for_everyone()
    if models is not None:
        worker = _Worker(config, factory, models)
        try:
            with state.split_between_processes(pending) as mine:
                for job in mine:
                    worker.run(job)
                    progress.advance()
        finally:
            worker.close()
    state.wait_for_everyone()
    progress.close()
    if not state.is_main_process:
        return None
    return report(config, merge(config, jobs))
