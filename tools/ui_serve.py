"""Start a real WebUI with its UI for tools/ui_check.mjs: this checkout linked into its extensions, the integration
tests' sources written (all removed afterwards), on 127.0.0.1; its URL is written to URL_FILE; SIGTERM stops it.

    flock /work/webuis/.heavy.lock .venv/bin/python tools/ui_serve.py a1111|forge WEBUI_DIR CHECKPOINT URL_FILE [ARGS…]
"""

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests"), str(ROOT)]
from webui_server import _write_sources, call  # noqa: E402

kind, folder, checkpoint, url_file = sys.argv[1], Path(sys.argv[2]), sys.argv[3], Path(sys.argv[4])
cpu = {
    "a1111": ["--skip-prepare-environment", "--skip-torch-cuda-test", "--use-cpu", "all", "--no-half", "--disable-nan-check"],
    "forge": ["--skip-prepare-environment", "--skip-install", "--skip-torch-cuda-test", "--always-cpu", "--skip-version-check"],
}[kind]
link = folder / "extensions" / "alignit"
created = [p for p in (folder / "models" / "CustomDiffusion", folder / "models" / "Lora") if not p.exists()]
written = _write_sources(folder, "sd15")
if link.is_symlink() or link.exists():
    link.unlink()
link.symlink_to(ROOT, target_is_directory=True)
with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
cmd = [
    str(folder / "venv/bin/python"),
    "launch.py",
    "--api",
    "--server-name",
    "127.0.0.1",
    "--port",
    str(port),
    *cpu,
    "--ckpt",
    checkpoint,
    *sys.argv[5:],
]
env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
log = open(url_file.with_suffix(".log"), "w")
server = subprocess.Popen(cmd, cwd=folder, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
url = f"http://127.0.0.1:{port}"
stop = False


def handler(*_):
    global stop
    stop = True


signal.signal(signal.SIGTERM, handler)
signal.signal(signal.SIGINT, handler)
saved = None
try:
    while not stop:
        try:
            call(url, "/sdapi/v1/options", timeout=10)
            break
        except OSError:
            if server.poll() is not None:
                print("server died")
                stop = True
            time.sleep(3)
    if not stop:
        settings = {"live_previews_enable": False, "emphasis": "Original"}
        saved = {k: v for k, v in call(url, "/sdapi/v1/options").items() if k in settings}
        call(url, "/sdapi/v1/options", settings)
        url_file.write_text(url)
        print("up", url, flush=True)
    while not stop and server.poll() is None:
        time.sleep(1)
finally:
    try:
        if saved is not None:
            call(url, "/sdapi/v1/options", saved)
    except Exception as e:
        print("restore failed", e)
    url_file.unlink(missing_ok=True)
    os.killpg(server.pid, signal.SIGTERM)
    try:
        server.wait(60)
    except subprocess.TimeoutExpired:
        os.killpg(server.pid, signal.SIGKILL)
    link.unlink()
    for p in written:
        p.unlink()
    for f in created:
        if f.is_dir() and not any(f.iterdir()):
            f.rmdir()
    print("cleaned", flush=True)
