"""`alignit evaluate` end to end with a deterministic fake generator and tiny random CLIP and DINO models: the files,
resuming, failures, a kill mid-job, and two processes under `accelerate launch`."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from evaluate_parts import save_tiny_clip, save_tiny_dino, write_concepts_yaml
from PIL import Image

from alignit.errors import InputError
from alignit.evaluate import cli, generator
from alignit.evaluate.metrics import FeatureModels, References, score

ROOT = Path(__file__).resolve().parents[1]
JOBS = 3 * 2 + 2 * 2  # cat: 3 prompts, mug: 2 prompts; 2 seeds each


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("evaluate")
    return {
        "concepts": write_concepts_yaml(root / "inputs"),
        "clip": save_tiny_clip(root / "clip"),
        "dino": save_tiny_dino(root / "dino"),
        "root": root,
    }


def arguments(setup, out: Path, *extra: str, factory: str = "factory") -> list[str]:
    return [
        *("--concepts", str(setup["concepts"]), "--out", str(out), "--seeds", "2", "--size", "64", "--steps", "2"),
        *("--clip-model", str(setup["clip"]), "--dino-model", str(setup["dino"]), "--device", "cpu"),
        *("--generator", f"evaluate_fakes:{factory}", "--bootstrap", "200", *extra),
    ]


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def markers(folder: Path) -> list[str]:
    """One name per finished generation: concept-prompt-seed-side."""
    return sorted(path.name.rsplit("-", 1)[0] for path in folder.iterdir())


def test_run_writes_results_summary_plot_and_report(setup, tmp_path):
    out = tmp_path / "out"
    assert cli.main(arguments(setup, out)) == 0
    results = lines(out / "results.jsonl")
    assert [r["job"] for r in results][:3] == ["cat/p000-s0", "cat/p000-s1", "cat/p001-s0"]
    assert len(results) == JOBS and all(r["status"] == "done" for r in results)
    job = results[2]
    assert (job["prompt"], job["text_prompt"]) == ("<new1> playing badminton.", "cat playing badminton.")
    assert results[-1]["text_prompt"] == "a coffee mug in the snow"
    assert "seconds" not in job and len(lines(out / "timings.jsonl")) == JOBS

    # The scores recorded are those of the images on disk.
    models = FeatureModels(str(setup["clip"]), str(setup["dino"]))
    references = References.of(models, [Image.open(p) for p in sorted((setup["concepts"].parent / "refs" / "cat").iterdir())])
    images = [Image.open(out / job[side]["image"]) for side in ("off", "on")]
    assert images[0].size == (64, 64) and images[0].tobytes() != images[1].tobytes()
    for side, scored in zip(("off", "on"), score(models, images, job["text_prompt"], references)):
        assert job[side]["text_alignment"] == pytest.approx(scored.text_alignment, abs=1e-6)
        assert job[side]["image_alignment"] == pytest.approx(scored.image_alignment, abs=1e-6)
        assert job[side]["dino_alignment"] == pytest.approx(scored.dino_alignment, abs=1e-6)

    summary = (out / "summary.csv").read_text().splitlines()
    assert [row.split(",")[:4] for row in summary[1:]] == [
        ["cat", "6", "6", "0"],
        ["mug", "4", "4", "0"],
        ["overall", "10", "10", "0"],
    ]
    assert (out / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    page = (out / "report.html").read_text()
    sources = [part.split('"')[0] for part in page.split('src="')[1:]]
    assert len(sources) == 2 * JOBS + 1 and all((out / source).is_file() for source in sources)


def test_rerun_skips_done_jobs_and_extends(setup, tmp_path, monkeypatch):
    out, seen = tmp_path / "out", tmp_path / "markers"
    seen.mkdir()
    monkeypatch.setenv("EVAL_FAKE_MARKERS", str(seen))
    assert cli.main(arguments(setup, out)) == 0
    assert len(markers(seen)) == 2 * JOBS
    first = (out / "results.jsonl").read_text()
    assert cli.main(arguments(setup, out)) == 0
    assert len(markers(seen)) == 2 * JOBS and (out / "results.jsonl").read_text() == first
    assert cli.main(arguments(setup, out, "--seeds", "0,1,2")) == 0
    assert len(markers(seen)) == 2 * JOBS + 2 * 5  # only the new seed's jobs
    assert len(lines(out / "results.jsonl")) == 15


def test_a_failing_job_is_recorded_and_the_run_goes_on(setup, tmp_path, monkeypatch):
    out = tmp_path / "out"
    monkeypatch.setenv("EVAL_FAKE_FAIL", "times square")
    assert cli.main(arguments(setup, out)) == 0
    failed = [r for r in lines(out / "results.jsonl") if r["status"] == "failed"]
    assert [r["job"] for r in failed] == ["cat/p002-s0", "cat/p002-s1"]
    assert failed[0]["reason"] == "OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB"
    assert not (out / "images" / "cat" / "p002-s0-off.png").exists()
    assert (out / "summary.csv").read_text().splitlines()[1].startswith("cat,6,4,2,")  # jobs, done, failed
    monkeypatch.delenv("EVAL_FAKE_FAIL")
    assert cli.main(arguments(setup, out)) == 0  # failed jobs run again
    assert all(r["status"] == "done" for r in lines(out / "results.jsonl"))


def test_a_concept_whose_generator_cannot_be_built_fails_its_jobs_only(setup, tmp_path):
    out = tmp_path / "out"
    assert cli.main(arguments(setup, out, factory="broken_factory")) == 0
    results = lines(out / "results.jsonl")
    assert {r["status"] for r in results if r["concept"] == "cat"} == {"done"}
    assert {r["reason"] for r in results if r["concept"] == "mug"} == {"concept mug: ValueError: cannot read someone/mug-lora"}


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda a: a[:1] + ["missing.yaml"] + a[2:], "cannot read missing.yaml"),
        (lambda a: [*a, "--seeds", "two"], "--seeds 'two'"),
        (lambda a: [*a, "--generator", "evaluate_fakes"], "MODULE:FACTORY"),
        (lambda a: [*a, "--generator", "no_such_module:factory"], "cannot import no_such_module"),
        (lambda a: [*a, "--generator", "evaluate_fakes:nothing"], "no callable nothing"),
        (lambda a: [*a, "--clip-model", "/no/such/clip"], "cannot load the metric models (/no/such/clip, "),
        (lambda a: [*a, "--out", "/dev/null/out"], "--out /dev/null/out: Not a directory"),
    ],
)
def test_bad_input_exits_2_with_one_line(setup, tmp_path, capsys, change, message):
    assert cli.main(change(arguments(setup, tmp_path / "out"))) == 2
    error = capsys.readouterr().err
    assert message in error and error.count("\n") == 1 and error.startswith("alignit evaluate: ")


def test_a_size_that_is_not_a_multiple_of_8_is_refused_by_the_parser(setup, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit:
        cli.main([*arguments(setup, tmp_path / "out"), "--size", "60"])
    assert exit.value.code == 2 and "'60': width and height must be positive multiples of 8" in capsys.readouterr().err


def test_an_output_folder_of_other_settings_is_refused(setup, tmp_path, capsys):
    out = tmp_path / "out"
    assert cli.main(arguments(setup, out, "--prompts-limit", "1")) == 0
    assert cli.main(arguments(setup, out, "--prompts-limit", "1", "--steps", "3")) == 2
    assert "holds a run with other settings" in capsys.readouterr().err


def test_missing_diffusers_host_is_one_line(monkeypatch):
    monkeypatch.setattr(generator, "DEFAULT_GENERATOR", "alignit.hosts.no_such_host:image_generator")
    with pytest.raises(InputError, match=r"^the diffusers host \(alignit.hosts.no_such_host\) is not available"):
        generator.load_factory(None)


# Subprocess runs: the CLI as users start it. One thread each, so one and two processes add up the same way.


def environment(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EVAL_FAKE_")}
    env.update(PYTHONPATH=f"{ROOT}{os.pathsep}{ROOT / 'tests'}", OMP_NUM_THREADS="1", HF_HOME=str(tmp_path / "hf"))
    env.update(HF_HUB_OFFLINE="1", **extra)
    return env


def run_module(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "alignit", "evaluate", *args], env=env, capture_output=True, text=True, timeout=600
    )


@pytest.fixture(scope="module")
def one_process_run(setup):
    out = setup["root"] / "one-process"
    done = run_module(arguments(setup, out), environment(setup["root"]))
    assert done.returncode == 0, done.stderr
    return out


def test_a_kill_mid_job_loses_nothing_and_a_rerun_does_no_job_twice(setup, tmp_path, one_process_run):
    out, seen = tmp_path / "out", tmp_path / "markers"
    seen.mkdir()
    killed = run_module(arguments(setup, out), environment(tmp_path, EVAL_FAKE_MARKERS=str(seen), EVAL_FAKE_KILL_AT="4"))
    assert killed.returncode == -9
    assert len(list((out / "jobs").glob("*/*.json"))) == 4  # four whole jobs; the fifth died after its plain image
    assert not (out / "results.jsonl").exists()
    rerun = run_module(arguments(setup, out), environment(tmp_path, EVAL_FAKE_MARKERS=str(seen)))
    assert rerun.returncode == 0, rerun.stderr
    counts = {name: markers(seen).count(name) for name in set(markers(seen))}
    assert len(counts) == 2 * JOBS
    # Only the killed job's plain image was made twice (the fifth job: cat's third prompt, seed 0).
    killed_job = f"cat-{hashlib.sha256(b'<new1> in times square.').hexdigest()[:8]}-0-off"
    assert {name: count for name, count in counts.items() if count != 1} == {killed_job: 2}
    assert (out / "results.jsonl").read_bytes() == (one_process_run / "results.jsonl").read_bytes()
    assert (out / "summary.csv").read_bytes() == (one_process_run / "summary.csv").read_bytes()
    assert not list(out.glob("*/*/.*.tmp")) and not list((out / "jobs").glob("*/*.attempts"))


def test_two_processes_give_the_one_process_results(setup, tmp_path, one_process_run):
    # `accelerate launch --cpu --num_processes 2` starts one process unless under MPI (accelerate 1.15's simple
    # launcher); --multi_gpu starts two through torchrun, and --device cpu makes them share the jobs over gloo.
    out = tmp_path / "out"
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    launch = [
        str(Path(sys.executable).parent / "accelerate"),
        *("launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no"),
        *("--dynamo_backend", "no", "--main_process_port", str(port), "-m", "alignit", "evaluate"),
    ]
    done = subprocess.run(
        [*launch, *arguments(setup, out)], env=environment(tmp_path), capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr
    assert (out / "results.jsonl").read_bytes() == (one_process_run / "results.jsonl").read_bytes()
    assert (out / "summary.csv").read_bytes() == (one_process_run / "summary.csv").read_bytes()
    assert (out / "progress" / "rank-1-of-2").read_text() == str(JOBS // 2)
