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
"$py" -m mypy
"$py" -m pytest "$@"
# The loader of pickled concept files again under torch 2.1.2, the torch A1111 v1.10 ships, whose own weights_only
# unpickler is not safe: ours must not depend on it. PyPI has it for Python <= 3.11 as a CUDA build (~2.7 GB, once).
old=${ALIGNIT_OLD_TORCH_VENV:-.venv-torch212}
if python3 -c 'import sys; sys.exit(sys.version_info[:2] > (3, 11))'; then
  [ -x "$old/bin/python" ] || { python3 -m venv "$old" && "$old/bin/pip" install -q torch==2.1.2 "numpy<2" pytest==9.2.0 safetensors==0.4.2; }
  "$old/bin/python" -m pytest -q -p no:cacheprovider --noconftest tests/test_safe_pickle.py
else
  echo "torch 2.1.2 has no wheel for this Python: the loader tests ran under $("$py" -c 'import torch; print(torch.__version__)') only"
fi
