"""Blind interpretability test: dense dimensions vs SAE features, rated for visual consistency.

A session mixes N raw dense dimensions and N SAE features in a seeded random order, shows each as a
4x4 grid of its maximally activating images without saying which kind it is, and asks for a 1-7
rating. The ratings file is JSON lines, appended and fsync'ed as each rating is given:

    {"type": "session", "format": "traitscope-ratings/1", "items": [{"kind": .., "index": ..}, ...], ...}
    {"type": "rating", "item": 0, "kind": "sae", "index": 123, "rating": 5, "time": ...}

so a reload or a crash loses nothing and the file alone resumes the session. The summary compares
the kinds: a histogram, pandas' describe() and Welch's t-test (scipy.stats.ttest_ind, equal_var=False).
"""

import json
import os
import re
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd
import scipy.stats
from PIL import Image

from traitscope.errors import TraitscopeError
from traitscope.viz import ratings_histogram

FORMAT = "traitscope-ratings/1"
QUESTION = "How visually consistent are these images? (1 = not at all, 7 = very)"
LEVELS = range(1, 8)
KINDS = ("dense", "sae")
SESSION_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")


class Item(NamedTuple):
    kind: str
    """'dense' (a raw dimension of the backbone's activations) or 'sae' (an SAE feature)."""
    index: int
    """The dimension or feature index."""


def plan_items(n: int, seed: int, dense_candidates: np.ndarray, sae_candidates: np.ndarray,
               grid_images: int = 16) -> list[Item]:
    """N dense dimensions and N SAE features drawn without replacement, in a seeded random order.

    `sae_candidates` are the features that fire on at least `grid_images` images (a full grid)."""
    if n < 1:
        raise TraitscopeError("the blind test needs at least one item of each kind")
    n_dense, n_sae = len(dense_candidates), len(sae_candidates)
    if n_dense < n or n_sae < n:
        lower = f"lower N to {min(n_dense, n_sae)}, or " if min(n_dense, n_sae) else ""
        raise TraitscopeError(
            f"not enough candidates for N={n} of each kind: {n_dense} dense dimensions, {n_sae} SAE features "
            f"that fire on at least {grid_images} images (a full {grid_images}-image grid). To fix it, {lower}"
            "use an SAE whose features fire on more images: a weaker L1 (--l1) or a larger k, fewer latents "
            "(--expansion), more images (docs/faces.md)")
    rng = np.random.default_rng(seed)
    items = [Item("dense", int(i)) for i in rng.choice(dense_candidates, n, replace=False)]
    items += [Item("sae", int(i)) for i in rng.choice(sae_candidates, n, replace=False)]
    return [items[i] for i in rng.permutation(len(items))]


def session_fpath(ratings_dpath: Path, name: str) -> Path:
    """The ratings file of a named session, refused unless the name is plain and stays in the folder."""
    if not isinstance(name, str) or not SESSION_NAME_RE.fullmatch(name):
        raise TraitscopeError("a session name is 1-64 letters, digits, '-' or '_' (starting with a letter or digit)")
    ratings_dpath = Path(ratings_dpath).resolve()
    fpath = (ratings_dpath / f"{name}.jsonl").resolve()
    if not fpath.is_relative_to(ratings_dpath):
        raise TraitscopeError(f"refusing session name {name!r}")
    return fpath


def _append_line(fpath: Path, record: dict, create: bool = False) -> None:
    line = (json.dumps(record, sort_keys=True) + "\n").encode()
    flags = os.O_WRONLY | os.O_APPEND | (os.O_CREAT | os.O_EXCL if create else 0)
    fd = os.open(fpath, flags, 0o644)
    try:
        os.write(fd, line)
        os.fsync(fd)
    finally:
        os.close(fd)
    if create:  # make the new directory entry durable too
        dir_fd = os.open(fpath.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


class Session(NamedTuple):
    """A ratings file read back: its header and the ratings so far (item position -> rating)."""

    fpath: Path
    header: dict
    items: list[Item]
    ratings: dict[int, int]

    @property
    def next_item(self) -> int | None:
        """Position of the first unrated item, or None when every item is rated."""
        return next((i for i in range(len(self.items)) if i not in self.ratings), None)

    def answer(self, position: int, rating: int) -> "Session":
        """Rate the item now shown, `position`; an item already rated keeps its rating (a click on a
        button of the page before, still on screen while the next item loads, changes nothing)."""
        return self.rate(position, rating) if position == self.next_item else self

    def rate(self, position: int, rating: int) -> "Session":
        """Record a rating durably (appended and fsync'ed before this returns)."""
        if not 0 <= position < len(self.items):
            raise TraitscopeError(f"no item {position} in this session")
        if rating not in LEVELS:
            raise TraitscopeError(f"a rating is an integer from {LEVELS.start} to {LEVELS.stop - 1}")
        item = self.items[position]
        _append_line(self.fpath, {"type": "rating", "item": position, "kind": item.kind,
                                  "index": item.index, "rating": int(rating), "time": time.time()})
        return self._replace(ratings={**self.ratings, position: int(rating)})


def create_session(fpath: Path, items: list[Item], **info) -> Session:
    """Start a ratings file (refusing to overwrite one) with the items and what they came from."""
    fpath.parent.mkdir(parents=True, exist_ok=True)
    header = {"type": "session", "format": FORMAT, "created": time.time(),
              "items": [{"kind": it.kind, "index": it.index} for it in items], **info}
    try:
        _append_line(fpath, header, create=True)
    except FileExistsError:
        raise TraitscopeError(f"{fpath} already exists: resume it instead") from None
    return Session(fpath, header, list(items), {})


def load_session(fpath: str | Path) -> Session:
    """Read a ratings file; a rating given twice keeps the last; a torn last line (crash) is ignored."""
    fpath = Path(fpath)
    if not fpath.is_file():
        raise TraitscopeError(f"{fpath}: no such ratings file")
    lines = fpath.read_bytes().split(b"\n")
    header, ratings = None, {}
    for i, raw in enumerate(lines):
        if not raw.strip():
            continue
        try:
            record = json.loads(raw)
        except json.JSONDecodeError:
            if i == len(lines) - 1:  # a write cut short by a crash: everything before it stands
                break
            raise TraitscopeError(f"{fpath}:{i + 1}: not a JSON line") from None
        if not isinstance(record, dict):
            raise TraitscopeError(f"{fpath}:{i + 1}: not a JSON object")
        if record.get("type") == "session":
            if header is not None or record.get("format") != FORMAT:
                raise TraitscopeError(f"{fpath}:{i + 1}: unexpected session header")
            header = record
        elif record.get("type") == "rating" and header is not None:
            position, rating = record.get("item"), record.get("rating")
            if not (isinstance(position, int) and 0 <= position < len(header["items"])
                    and isinstance(rating, int) and rating in LEVELS):
                raise TraitscopeError(f"{fpath}:{i + 1}: invalid rating record")
            ratings[position] = rating
        else:
            raise TraitscopeError(f"{fpath}:{i + 1}: unexpected record")
    if header is None:
        raise TraitscopeError(f"{fpath}: not a ratings file (no session header)")
    items = []
    for entry in header.get("items", []):
        if not (isinstance(entry, dict) and entry.get("kind") in KINDS and isinstance(entry.get("index"), int)):
            raise TraitscopeError(f"{fpath}: invalid item in the session header")
        items.append(Item(entry["kind"], entry["index"]))
    return Session(fpath, header, items, ratings)


class Summary(NamedTuple):
    """The blind test's result."""

    ratings: pd.DataFrame
    """One row per rated item: position, kind, index, rating."""
    describe: pd.DataFrame
    """pandas describe() of the ratings, one row per kind."""
    t: float
    """Welch's t statistic, SAE minus dense (nan with fewer than two ratings of a kind)."""
    p: float
    """Its two-sided p-value."""

    def histogram(self) -> Image.Image:
        by_kind = {kind: self.ratings.loc[self.ratings["kind"] == kind, "rating"].to_numpy() for kind in KINDS}
        return ratings_histogram(by_kind, LEVELS, title="Blind test: ratings by kind")

    def text(self) -> str:
        lines = [f"{len(self.ratings)} ratings", "", self.describe.to_string(), ""]
        lines.append(f"Welch's t-test (SAE vs dense, unequal variances): t = {self.t:.3f}, p = {self.p:.4g}")
        return "\n".join(lines)


def summarise(session: Session) -> Summary:
    rows = [{"position": i, "kind": session.items[i].kind, "index": session.items[i].index, "rating": r}
            for i, r in sorted(session.ratings.items())]
    df = pd.DataFrame(rows, columns=["position", "kind", "index", "rating"])
    describe = df.groupby("kind")["rating"].describe().reindex(list(KINDS))
    sae = df.loc[df["kind"] == "sae", "rating"].to_numpy(dtype=float)
    dense = df.loc[df["kind"] == "dense", "rating"].to_numpy(dtype=float)
    if len(sae) >= 2 and len(dense) >= 2:
        result = scipy.stats.ttest_ind(sae, dense, equal_var=False)
        t, p = float(result.statistic), float(result.pvalue)
    else:
        t = p = float("nan")
    return Summary(df, describe, t, p)
