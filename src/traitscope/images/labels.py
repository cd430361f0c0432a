"""Per-image labels for a folder of images: class subfolders, a labels CSV, or CelebA's attribute list.

All three give an `ImageLabels`: the label names (columns) and, for each image path, a uint8 multi-hot
row plus a single class label when there is one. Matching is strict where it matters: every image
needs a row, a row may name only one image, and the error says how many failed with an example.
Rows for images that are not in the folder are allowed (a labels file for a whole data set used
with a subset of its images), as long as at least one row matches.
"""

import csv
import hashlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np

from traitscope.errors import TraitscopeError

PATH_COLUMNS = ("path", "filename", "file", "file_name", "fname", "image", "image_id", "image_path", "img", "name")
"""Header names taken as the image path column (case-insensitive), in order of preference."""
CLASS_COLUMNS = ("label", "class", "category", "species", "target", "y")
"""Header names taken as a single class label column (case-insensitive)."""
_TRUE = {"1", "1.0", "true", "yes", "y"}
_FALSE = {"0", "0.0", "-1", "-1.0", "false", "no", "n", ""}


@dataclass
class ImageLabels:
    names: list[str]
    """Column names of the multi-hot rows."""
    rows: dict[str, np.ndarray]
    """Image path (relative POSIX) -> (len(names),) uint8 multi-hot."""
    classes: dict[str, str] | None
    """Image path -> its class name, for single-label sources; None for attribute (multi-label) sources."""
    identity: dict
    """What defines these labels, for content hashing."""

    def label(self, path: str) -> str | None:
        return None if self.classes is None else self.classes[path]


def from_folders(paths: list[str]) -> ImageLabels:
    """The first path component is the class: `cats/001.jpg` -> 'cats'."""
    loose = [p for p in paths if "/" not in p]
    if loose:
        raise TraitscopeError(
            f"--labels folders: {len(loose)} of {len(paths)} images are not inside a class subfolder "
            f"(e.g. {loose[0]!r}); put each image in <class>/<file>"
        )
    classes = {p: p.split("/", 1)[0] for p in paths}
    names = sorted(set(classes.values()))
    if len(names) < 2:
        raise TraitscopeError(f"--labels folders: all images are in one subfolder ({names[0]!r}); need two or more classes")
    return _one_hot(classes, names, {"kind": "folders"})


def from_file(fpath: str | Path, paths: list[str]) -> ImageLabels:
    """Labels for `paths` from a CSV (or TSV) with a header, or CelebA's `list_attr_celeba.txt` format."""
    fpath = Path(fpath)
    if not fpath.is_file():
        raise TraitscopeError(f"labels file {fpath} does not exist")
    raw = fpath.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise TraitscopeError(f"labels file {fpath} is not UTF-8 text") from err
    identity = {"kind": "file", "sha256": hashlib.sha256(raw).hexdigest()}
    lines = [line for line in text.splitlines() if line.strip()]
    if not lines:
        raise TraitscopeError(f"labels file {fpath} is empty")
    if lines[0].strip().isdigit():
        table, header = _read_celeba(fpath, lines)
    else:
        table, header = _read_csv(fpath, text)
    keys, values = _match(fpath, [row[0] for row in table], paths)
    return _build(fpath, header, [table[i][1:] for i in values], keys, identity)


def _read_celeba(fpath: Path, lines: list[str]) -> tuple[list[list[str]], list[str]]:
    """CelebA's attribute list: a count line, a header of attribute names, then `name v1 ... vn`."""
    if len(lines) < 2:
        raise TraitscopeError(f"{fpath}: a count line but no header line (CelebA attribute format)")
    names = lines[1].split()
    if names and names[0].lower() in PATH_COLUMNS and len(lines) > 2 and len(lines[2].split()) == len(names):
        names = names[1:]  # some copies name the path column in the header
    table = []
    for n, line in enumerate(lines[2:], start=3):
        cells = line.split()
        if len(cells) != len(names) + 1:
            raise TraitscopeError(
                f"{fpath} line {n}: {len(cells)} fields, expected a name and {len(names)} values (CelebA attribute format)"
            )
        table.append(cells)
    expected = int(lines[0].strip())
    if expected != len(table):
        raise TraitscopeError(f"{fpath}: the first line says {expected} rows but there are {len(table)}")
    return table, ["path", *names]


def _read_csv(fpath: Path, text: str) -> tuple[list[list[str]], list[str]]:
    """A delimited table with a header row; the path column goes first in the returned rows."""
    first = text.splitlines()[0]
    delimiter = max(",\t;", key=first.count) if any(d in first for d in ",\t;") else ","
    rows = [[cell.strip() for cell in row] for row in csv.reader(text.splitlines(), delimiter=delimiter)]
    rows = [row for row in rows if any(row)]
    header, table = rows[0], rows[1:]
    lower = [h.lower() for h in header]
    path_col = next((lower.index(c) for c in PATH_COLUMNS if c in lower), None)
    if path_col is None:
        raise TraitscopeError(
            f"{fpath}: no path column; name one of {', '.join(PATH_COLUMNS[:4])} in the header (found: {', '.join(header)})"
        )
    for n, row in enumerate(table, start=2):
        if len(row) != len(header):
            raise TraitscopeError(f"{fpath} line {n}: {len(row)} fields, the header has {len(header)}")
    order = [path_col] + [i for i in range(len(header)) if i != path_col]
    if len(order) < 2:
        raise TraitscopeError(f"{fpath}: only a path column; add a label column or 0/1 attribute columns")
    return [[row[i] for i in order] for row in table], [header[i] for i in order]


def _match(fpath: Path, keys: list[str], paths: list[str]) -> tuple[list[str], list[int]]:
    """Pair each image path with its row index: by relative path, else by file name when names are unique."""
    by_path = {}
    for i, key in enumerate(keys):
        key = str(PurePosixPath(key.strip().replace("\\", "/")))  # also drops a leading './'
        if key in by_path:
            raise TraitscopeError(f"{fpath}: {key!r} has more than one row")
        by_path[key] = i
    matched = {p: by_path[p] for p in paths if p in by_path}
    if len(matched) < len(paths):
        basenames = [p.rsplit("/", 1)[-1] for p in paths]
        if len(set(basenames)) == len(basenames):
            by_name = {}
            for key, i in by_path.items():
                by_name.setdefault(key.rsplit("/", 1)[-1], i)
            matched = {p: by_name[b] for p, b in zip(paths, basenames) if b in by_name}
    missing = [p for p in paths if p not in matched]
    if missing:
        example_key = keys[0] if keys else "(no rows)"
        raise TraitscopeError(
            f"{fpath}: {len(missing)} of {len(paths)} images have no row (e.g. {missing[0]!r}; "
            f"the file's first row names {example_key!r}); rows are matched by path relative to the images "
            "folder, or by file name"
        )
    return list(matched), list(matched.values())


def _build(fpath: Path, header: list[str], values: list[list[str]], keys: list[str], identity: dict) -> ImageLabels:
    columns = header[1:]
    lower = [c.lower() for c in columns]
    binary = [all(row[j].lower() in _TRUE | _FALSE for row in values) for j in range(len(columns))]
    if len(columns) == 1 and (lower[0] in CLASS_COLUMNS or not binary[0]):
        classes = {k: row[0] for k, row in zip(keys, values)}
        empty = [k for k, c in classes.items() if not c]
        if empty:
            raise TraitscopeError(f"{fpath}: {len(empty)} images have an empty {columns[0]!r} (e.g. {empty[0]!r})")
        return _one_hot(classes, sorted(set(classes.values())), identity | {"column": columns[0]})
    if not all(binary):
        bad = columns[binary.index(False)]
        example = next(row[binary.index(False)] for row in values if row[binary.index(False)].lower() not in _TRUE | _FALSE)
        raise TraitscopeError(
            f"{fpath}: column {bad!r} has a value {example!r} that is not 0/1, 1/-1 or true/false; a labels "
            "file has a path column and either one label column or binary attribute columns"
        )
    rows = {k: np.array([row[j].lower() in _TRUE for j in range(len(columns))], dtype=np.uint8) for k, row in zip(keys, values)}
    return ImageLabels(names=list(columns), rows=rows, classes=None, identity=identity)


def _one_hot(classes: dict[str, str], names: list[str], identity: dict) -> ImageLabels:
    column = {name: j for j, name in enumerate(names)}
    rows = {}
    for path, name in classes.items():
        row = np.zeros(len(names), dtype=np.uint8)
        row[column[name]] = 1
        rows[path] = row
    return ImageLabels(names=names, rows=rows, classes=classes, identity=identity | {"names": names})
