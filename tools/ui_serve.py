"""Start a real WebUI with its UI for tools/ui_check.mjs: this checkout linked into its extensions, the integration
tests' sources written (all removed afterwards, as the integration harness does), on 127.0.0.1; its URL is written
to URL_FILE; SIGTERM stops it.

    flock /work/webuis/.heavy.lock .venv/bin/python tools/ui_serve.py a1111|forge WEBUI_DIR CHECKPOINT URL_FILE [ARGS…]
"""

import signal
import sys
import threading
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "tests" / "contract"), str(ROOT)]
from webui_server import running_webui  # noqa: E402

CPU = {
    "a1111": ["--skip-prepare-environment", "--skip-torch-cuda-test", "--use-cpu", "all", "--no-half", "--disable-nan-check"],
    "forge": ["--skip-prepare-environment", "--skip-install", "--skip-torch-cuda-test", "--always-cpu", "--skip-version-check"],
}


def main() -> None:
    kind, folder, checkpoint, url_file = sys.argv[1], Path(sys.argv[2]), sys.argv[3], Path(sys.argv[4])
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    arguments = [*CPU[kind], "--ckpt", checkpoint, *sys.argv[5:]]
    with running_webui(folder, str(folder / "venv" / "bin" / "python"), arguments, url_file.with_suffix(".log"), ui=True) as url:
        url_file.write_text(url)
        print("up", url, flush=True)
        stop.wait()
        url_file.unlink(missing_ok=True)
    print("cleaned", flush=True)


if __name__ == "__main__":
    main()
