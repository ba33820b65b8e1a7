"""Jobs (concept × prompt × seed) and their files under ``--out``, each written atomically.

A job's record ``jobs/<concept>/p<prompt>-s<seed>.json`` is written last, after both images: it is the job's commit
point, so a kill at any moment leaves either a whole job or none. Every job has its own record file, so processes never
share a file and a rerun with any number of processes sees every job done before. ``.attempts`` counts the starts of
a job; a job that took its process down ``MAX_ATTEMPTS`` times (killed, crashed, out of host memory) is recorded as
failed instead of started again.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from .inputs import EvalConcept

MAX_ATTEMPTS = 2
TIMING_KEY = "seconds"


@dataclass(frozen=True)
class Job:
    """One prompt and seed of one concept: generated with AlignIT off and on."""

    concept: EvalConcept
    prompt_index: int
    seed: int

    @property
    def stem(self) -> str:
        return f"p{self.prompt_index:03d}-s{self.seed}"

    @property
    def id(self) -> str:
        return f"{self.concept.name}/{self.stem}"

    @property
    def template(self) -> str:
        return self.concept.prompts[self.prompt_index]

    @property
    def prompt(self) -> str:
        return self.concept.prompt(self.template)

    @property
    def text_prompt(self) -> str:
        return self.concept.text_prompt(self.template)

    def image_path(self, aligned: bool) -> str:
        """Relative to the output folder."""
        return f"images/{self.concept.name}/{self.stem}-{'on' if aligned else 'off'}.png"

    def identity(self) -> dict[str, Any]:
        """What a record must repeat to count for this job (a changed prompt or source makes it stale)."""
        return {
            "job": self.id,
            "concept": self.concept.name,
            "prompt_index": self.prompt_index,
            "seed": self.seed,
            "prompt": self.prompt,
            "text_prompt": self.text_prompt,
            "source": self.concept.source,
            "strength": self.concept.strength,
        }


def plan(concepts: Sequence[EvalConcept], seeds: Sequence[int], prompts_limit: int | None = None) -> list[Job]:
    """Every job, in the order of the results file: concept, prompt, seed."""
    return [
        Job(concept, index, seed)
        for concept in concepts
        for index in range(min(len(concept.prompts), prompts_limit or len(concept.prompts)))
        for seed in seeds
    ]


def write_atomic(path: Path, data: bytes) -> None:
    """Write a temporary file beside ``path`` and move it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(temporary, "wb") as file:
        file.write(data)
        file.flush()
        os.fsync(file.fileno())
    os.replace(temporary, path)


def write_json(path: Path, value: Any) -> None:
    write_atomic(path, (json.dumps(value, sort_keys=True) + "\n").encode())


def save_image(out: Path, relative: str, image: Image.Image) -> None:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    write_atomic(out / relative, buffer.getvalue())


class Store:
    """The files of one output folder."""

    def __init__(self, out: Path) -> None:
        self.out = out

    def record_path(self, job: Job) -> Path:
        return self.out / "jobs" / job.concept.name / f"{job.stem}.json"

    def attempts_path(self, job: Job) -> Path:
        return self.out / "jobs" / job.concept.name / f"{job.stem}.attempts"

    def record(self, job: Job) -> dict[str, Any] | None:
        """The job's record if it is for this very job (same prompt, seed, source), else None."""
        try:
            record = json.loads(self.record_path(job).read_text())
        except (OSError, ValueError):
            return None
        identity = job.identity()
        return record if all(record.get(key) == value for key, value in identity.items()) else None

    def is_done(self, job: Job) -> bool:
        record = self.record(job)
        return record is not None and record.get("status") == "done"

    def attempts(self, job: Job) -> int:
        try:
            return int(self.attempts_path(job).read_text())
        except (OSError, ValueError):
            return 0

    def start(self, job: Job, attempts: int) -> None:
        write_atomic(self.attempts_path(job), str(attempts + 1).encode())

    def unstart(self, job: Job, attempts: int) -> None:
        """Undo ``start`` for a deliberate stop (Ctrl-C), which says nothing about the job."""
        if attempts:
            write_atomic(self.attempts_path(job), str(attempts).encode())
        else:
            self.attempts_path(job).unlink(missing_ok=True)

    def finish(self, job: Job, result: dict[str, Any], seconds: dict[str, float] | None = None) -> None:
        record = {**job.identity(), **result}
        if seconds is not None:
            record[TIMING_KEY] = seconds
        write_json(self.record_path(job), record)
        self.attempts_path(job).unlink(missing_ok=True)

    def remove_temporaries(self) -> None:
        """Half-written files a killed run left behind."""
        for folder in ("jobs", "images"):
            for path in (self.out / folder).glob("*/.*.tmp"):
                path.unlink(missing_ok=True)
