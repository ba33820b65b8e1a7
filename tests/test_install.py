"""install.py: A1111 and Forge run it with their ``launch`` module importable; ComfyUI-Manager runs it with plain
Python in the pack's folder (comfyui_manager/glob/manager_core.py ``try_install_script``: ``[sys.executable,
"install.py"]``, cwd = the pack), where it must succeed and install nothing."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAUNCH = """
import json, os
def is_installed(package):
    return os.environ["INSTALLED"] == "1"
def run_pip(command, desc=None):
    open(os.environ["CALLS"], "a").write(json.dumps([command, desc]) + "\\n")
"""


def test_comfyui_manager_runs_it_with_plain_python():
    result = subprocess.run(
        [sys.executable, "install.py"], cwd=ROOT, capture_output=True, text=True, env={"PATH": os.environ["PATH"]}
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == result.stderr == ""


@pytest.mark.parametrize("installed", ["0", "1"])
def test_the_webuis_get_safetensors_when_missing(tmp_path, installed):
    (tmp_path / "launch.py").write_text(LAUNCH)
    calls = tmp_path / "calls"
    env = {"PATH": os.environ["PATH"], "PYTHONPATH": str(tmp_path), "INSTALLED": installed, "CALLS": str(calls)}
    subprocess.run([sys.executable, str(ROOT / "install.py")], cwd=tmp_path, check=True, env=env)
    expected = '["install safetensors", "safetensors for AlignIT"]\n' if installed == "0" else ""
    assert (calls.read_text() if calls.exists() else "") == expected
