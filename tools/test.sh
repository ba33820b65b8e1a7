#!/usr/bin/env bash
# Set up a virtual environment with AlignIT's test dependencies (CPU torch), then lint and run the tests.
# Extra arguments go to pytest. ALIGNIT_VENV picks the environment folder, TORCH_SPEC the torch requirement.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${ALIGNIT_VENV:-.venv}
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
py="$venv/bin/python"
"$py" -c "import torch" 2>/dev/null || "$py" -m pip install -q "${TORCH_SPEC:-torch==2.13.0}"
"$py" -m pip install -q -e ".[test]"
# The ldm modules A1111 runs, and the CLIP BPE vocabulary; both pin old packages, which the tests do not need.
"$py" -m pip install -q --no-deps stable-diffusion-sdkit==2.1.5 open_clip_torch==3.3.0
"$py" -m ruff check .
"$py" -m ruff format --check .
"$py" -m pytest "$@"
