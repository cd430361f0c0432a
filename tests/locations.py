"""Where the tests find the repository, the app script and the team's shared photos."""

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
APP_MAIN = REPO / "src" / "traitscope" / "app" / "main.py"
SHARED_DATA = REPO.parent / "shared" / "data"
FISH = SHARED_DATA / "fishvista_demo"
CELEBA = SHARED_DATA / "celeba_32"
CAMVID = SHARED_DATA / "camvid_train"


def needs(dpath: Path) -> pytest.MarkDecorator:
    """Skip a test when a shared data folder is absent (and only then)."""
    return pytest.mark.skipif(not dpath.is_dir(), reason=f"{dpath} is absent")
