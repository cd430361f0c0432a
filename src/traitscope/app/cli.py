"""`traitscope app`: start the feature explorer (`streamlit run` on app/main.py) and print its URL.

It binds to 127.0.0.1 unless --host says otherwise, sends no usage statistics, and opens a browser
only where there is a display and this is not CI (--no-browser turns that off).
"""

import argparse
import ipaddress
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import webbrowser
from pathlib import Path

from traitscope.app.data import Dataset, find_run_folders
from traitscope.errors import TraitscopeError

MAIN_FPATH = Path(__file__).with_name("main.py")


def default_cache_dpath() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "traitscope" / "app"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--runs", type=Path, required=True,
                        help="a folder of SAE run folders (or one run folder)")
    parser.add_argument("--shards", type=Path, nargs="+", required=True, metavar="DIR",
                        help="one or more shard folders (shards/<hash>): the datasets to browse")
    parser.add_argument("--images-root", nargs="+", metavar="DIR", default=None,
                        help="where each --shards folder's images lie, in the same order ('-' keeps the recorded "
                             "folder): saev shards do not record their image files, so their tiles and heatmaps "
                             "need the class-per-folder image tree saev read; also for photos that moved")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to bind (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=8501, help="port (default 8501; 0 picks a free one)")
    parser.add_argument("--ratings", type=Path, default=Path("ratings"),
                        help="folder for blind-test ratings files (default ./ratings)")
    parser.add_argument("--cache", type=Path, default=None,
                        help="folder for derived tables (default ~/.cache/traitscope/app)")
    parser.add_argument("--max-on-the-fly", type=int, default=5000, metavar="N",
                        help="compute inference on the fly for datasets of at most N images (default 5000)")
    parser.add_argument("--no-browser", action="store_true", help="do not open a browser")


def images_roots(shards: list[Path], images_root: list[str] | None) -> list[Path | None]:
    """Each shards folder's `--images-root` (None: as recorded), paired in order."""
    if images_root is None:
        return [None] * len(shards)
    if len(images_root) != len(shards):
        raise TraitscopeError(f"--images-root gives {len(images_root)} folders for {len(shards)} --shards folders: "
                              "give one per shards folder, in the same order ('-' keeps a folder's recorded images)")
    return [None if root == "-" else Path(root) for root in images_root]


def check_port_free(host: str, port: int) -> None:
    """TraitscopeError when something already listens on host:port, so the address printed is ours."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server binds: a closed socket's wait is fine
        try:
            s.bind((host, port))
        except OSError as err:
            raise TraitscopeError(f"--port {port} on {host} is not free ({err.strerror}; another server, perhaps "
                                  "another traitscope app?); use another --port, or --port 0 for a free one") from None


def free_port(host: str) -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def app_arguments(args: argparse.Namespace) -> list[str]:
    """The arguments main.py parses (after `--` on the streamlit command line)."""
    out = ["--runs", str(args.runs.resolve()), "--shards", *[str(p.resolve()) for p in args.shards],
           "--ratings", str(args.ratings.resolve()), "--cache", str((args.cache or default_cache_dpath()).resolve()),
           "--max-on-the-fly", str(args.max_on_the_fly)]
    roots = images_roots(args.shards, args.images_root)
    if any(roots):
        out += ["--images-root", *["-" if root is None else str(root.resolve()) for root in roots]]
    return out


def streamlit_command(host: str, port: int, app_args: list[str]) -> list[str]:
    return [sys.executable, "-m", "streamlit", "run", str(MAIN_FPATH),
            "--server.address", host, "--server.port", str(port),
            "--server.headless", "true",            # we print the URL and open the browser ourselves
            "--browser.gatherUsageStats", "false",  # no telemetry
            "--server.fileWatcherType", "none", "--server.runOnSave", "false",
            "--server.maxUploadSize", "50", "--global.developmentMode", "false",
            "--client.toolbarMode", "minimal", "--theme.base", "light",
            "--client.showErrorDetails", "type",    # never a traceback in the page (the app shows one line)
            "--", *app_args]


def wait_until_up(url: str, process: subprocess.Popen, timeout_s: float = 60.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and process.poll() is None:
        try:
            with urllib.request.urlopen(url + "_stcore/health", timeout=2) as response:
                if response.status == 200:
                    return True
        except OSError:
            time.sleep(0.3)
    return False


def run(args: argparse.Namespace) -> int:
    # Validate everything here, so a mistake is one clear line rather than a page error.
    runs, unusable = find_run_folders(args.runs)
    for name, why in unusable:
        print(f"traitscope app: warning: run {name} cannot be used: {why}", file=sys.stderr)
    datasets = [Dataset(p, root) for p, root in zip(args.shards, images_roots(args.shards, args.images_root))]
    for dataset in datasets:
        if dataset.images_unknown:
            print(f"traitscope app: warning: {dataset.images_unknown}", file=sys.stderr)
    if args.max_on_the_fly < 0:
        raise TraitscopeError("--max-on-the-fly must be >= 0")
    if not 0 <= args.port < 65536:
        raise TraitscopeError(f"--port {args.port}: not a port number")
    port = args.port or free_port(args.host)
    check_port_free(args.host, port)
    print(f"traitscope app: {len(runs)} runs under {args.runs}, datasets: "
          + ", ".join(d.title() for d in datasets))
    if not is_loopback(args.host):
        print(f"traitscope app: warning: listening on {args.host}, reachable from other machines", file=sys.stderr)
    host_in_url = f"[{args.host}]" if ":" in args.host else args.host
    url = f"http://{host_in_url}:{port}/"
    env = {**os.environ, "STREAMLIT_BROWSER_GATHER_USAGE_STATS": "false"}
    args.ratings.mkdir(parents=True, exist_ok=True)
    process = subprocess.Popen(streamlit_command(args.host, port, app_arguments(args)), env=env)
    # a plain `kill` of this process stops the server too (the finally below)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        up = wait_until_up(url, process)
        if not up:
            process.terminate()
            raise TraitscopeError(f"the app did not start (exit code {process.wait()})")
        print(f"traitscope app: open {url}", flush=True)
        headless = os.environ.get("CI") or not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")
                                                or sys.platform in ("darwin", "win32"))
        if not (args.no_browser or headless):
            webbrowser.open(url)
        return process.wait()
    finally:  # Ctrl+C, a kill, or an error: the server goes too
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
