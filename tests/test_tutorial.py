"""docs/tutorial.md runs as written: both command blocks, on the small data beside the project.

The fish block runs on ../shared/data/fishvista_demo, the labelled block on ../shared/data/celeba_32
with its attribute list. Each block's last command starts the app; it is started in the background and
must answer on its port.
"""

import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pandas as pd
import pytest
from locations import CELEBA, FISH, REPO, SHARED_DATA as SHARED



def _blocks() -> list[str]:
    return re.findall(r"```bash\n(.*?)```", (REPO / "docs" / "tutorial.md").read_text(), flags=re.S)


def _run_block(block: str, cwd: Path) -> None:
    """Run the block's commands with bash; its final `traitscope app` line in the background."""
    lines = block.strip().splitlines()
    assert lines[-1].startswith("traitscope app "), "each tutorial block ends by opening the app"
    port = int(re.search(r"--port (\d+)", lines[-1]).group(1))
    script = "\n".join(lines[:-1]) + f"\n{lines[-1]} > app.log 2>&1 &\necho $! > app.pid\n"
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    proc = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    pid = int((cwd / "app.pid").read_text())
    try:
        deadline, status = time.time() + 90, None
        while time.time() < deadline and status != 200:
            try:
                status = urllib.request.urlopen(f"http://127.0.0.1:{port}/_stcore/health", timeout=2).status
            except OSError:
                time.sleep(1)
        assert status == 200, (cwd / "app.log").read_text()[-2000:]
    finally:
        os.kill(pid, signal.SIGTERM)


@pytest.mark.skipif(not FISH.is_dir(), reason=f"{FISH} is absent")
def test_fish_photos_block(tmp_path):
    block = _blocks()[0]
    assert re.search(r"^PHOTOS=\.\./shared/data/fishvista_demo", block, flags=re.M)
    (tmp_path / "shared").symlink_to(SHARED.parent)  # the block's ../shared, seen from a working folder
    cwd = tmp_path / "work"
    cwd.mkdir()
    _run_block(block, cwd)
    assert (cwd / "fish" / "runs" / "pareto.png").is_file()
    (run,) = (cwd / "fish" / "runs").glob("topk-k16-*")
    (inference,) = (run / "inference").iterdir()
    assert (inference / "top_patch_acts.npy").is_file() and (inference / "metrics.md").is_file()


@pytest.mark.skipif(not CELEBA.is_dir(), reason=f"{CELEBA} is absent")
def test_labelled_faces_block(tmp_path):
    block = _blocks()[1]
    assert re.search(r"^DATA=\.\./shared/data/celeba_32", block, flags=re.M)
    (tmp_path / "shared").symlink_to(SHARED.parent)  # the block's ../shared, seen from a working folder
    cwd = tmp_path / "work"
    cwd.mkdir()
    _run_block(block, cwd)
    (run,) = (cwd / "celeba" / "runs").glob("batchtopk-*")
    (inference,) = (run / "inference").iterdir()
    table = (inference / "alignment.md").read_text()
    assert "Smiling" in table and "sae" in table and "probe" in table
    traits = pd.read_csv(cwd / "celeba" / "smiling.csv")
    assert len(traits) == 32 and traits["feature"].nunique() == 1 and "label_Smiling" in traits
    assert traits["max"].max() > 0
