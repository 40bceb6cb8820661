"""Screenshot TensorBoard on a finished run with headless Chromium (no display needed).

Starts ``tensorboard --logdir LOGDIR`` on a free local port, waits until it answers, and saves
two pages with ``chromium --headless --screenshot``: the scalars (filtered by ``--tags``, by
default the per-replica training loss) and the images tab
(``imbalance/loss_by_position``). Stops TensorBoard afterwards.

    python3 scripts/dev.py demo                        # writes runs/demo/version_N
    python scripts/tensorboard_screenshot.py runs/demo --out docs/images

Needs a Chromium binary (Debian: ``apt-get install chromium``; ``--chromium PATH`` otherwise).
"""

from __future__ import annotations

import argparse
import json
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from urllib.parse import quote

PAGES = {
    # name: (URL fragment, what it shows)
    "scalars": ("#scalars&tagFilter={tags}&_smoothingWeight=0", "scalar curves"),
    "loss_by_position": ("#images", "the loss-by-position figure"),
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for(url: str, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError as err:
            if time.monotonic() > deadline:
                message = f"TensorBoard did not answer at {url} within {seconds:.0f} s"
                raise TimeoutError(message) from err
            time.sleep(0.5)


def wait_loaded(base: str, seconds: float) -> int:
    """Wait until TensorBoard has read the whole run (its scalar tag list stops growing)."""
    deadline = time.monotonic() + seconds
    previous = -1
    while time.monotonic() < deadline:
        with urllib.request.urlopen(base + "data/plugin/scalars/tags", timeout=5) as answer:
            runs = json.load(answer)
        count = sum(len(points) for tags in runs.values() for points in tags.values())
        count = sum(len(tags) for tags in runs.values()) if count == 0 else count
        if count and count == previous:
            return count
        previous = count
        time.sleep(3)
    return previous


def screenshot(chromium: str, url: str, out: Path, width: int, height: int, wait_ms: int) -> None:
    with tempfile.TemporaryDirectory(prefix="chromium-") as profile:
        subprocess.run(
            [
                chromium,
                "--headless=new",
                "--no-sandbox",  # root in a container
                "--disable-gpu",
                "--hide-scrollbars",
                f"--user-data-dir={profile}",
                f"--window-size={width},{height}",
                f"--virtual-time-budget={wait_ms}",
                f"--screenshot={out}",
                url,
            ],
            check=True,
            capture_output=True,
            timeout=120,
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("logdir", nargs="?", default="runs/demo", help="TensorBoard log directory")
    parser.add_argument("--out", default="docs/images", help="directory of the PNGs")
    parser.add_argument(
        "--tags",
        default="train_loss_step",
        help="regular expression of the scalar tags shown (TensorBoard's tag filter)",
    )
    parser.add_argument("--chromium", default=None, help="Chromium binary (default: on PATH)")
    parser.add_argument("--size", default="1400x900", help="window size WIDTHxHEIGHT")
    parser.add_argument("--wait_ms", type=int, default=20000, help="page time before the shot")
    args = parser.parse_args(argv)

    chromium = args.chromium or next(
        (
            shutil.which(n)
            for n in ("chromium", "chromium-browser", "google-chrome")
            if shutil.which(n)
        ),
        None,
    )
    if chromium is None:
        print(
            "error: no Chromium found; apt-get install chromium, or pass --chromium PATH",
            file=sys.stderr,
        )
        return 2
    if not Path(args.logdir).is_dir():
        print(
            f"error: {args.logdir} is not a directory; run a fit first "
            "(python3 scripts/dev.py demo)",
            file=sys.stderr,
        )
        return 2
    width, height = (int(v) for v in args.size.split("x"))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    port = free_port()
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tensorboard.main",
            "--logdir",
            args.logdir,
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        base = f"http://127.0.0.1:{port}/"
        wait_for(base + "data/environment", seconds=120)
        wait_loaded(base, seconds=120)
        for name, (fragment, what) in PAGES.items():
            target = out / f"tensorboard_{name}.png"
            url = base + fragment.format(tags=quote(args.tags))
            screenshot(chromium, url, target, width, height, args.wait_ms)
            print(f"{target}: {what} ({url})")
    finally:
        server.terminate()
        server.wait(timeout=30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
