"""`traitscope pareto` on hand-made run folders: the frontier, the CSV and the picture."""

import csv
import json

from PIL import Image

from traitscope.cli import main
from traitscope.features.pareto import find_points, mark_frontier

RUNS = {  # name: (variant, k, l1, l0, nmse)
    "topk-16": ("topk", 16, None, 16.0, 0.30),
    "topk-32": ("topk", 32, None, 32.0, 0.20),
    "topk-64": ("topk", 64, None, 64.0, 0.22),    # dominated by topk-32 (denser and worse)
    "relu-1e-3": ("relu", None, 1e-3, 40.0, 0.15),
    "relu-1e-2": ("relu", None, 1e-2, 20.0, 0.35),  # dominated by topk-16
    "btk-32": ("batchtopk", 32, None, 32.0, 0.20),  # ties topk-32: neither dominates
}


def make_runs(root):
    for name, (variant, k, l1, l0, nmse) in RUNS.items():
        dpath = root / "sweep" / name
        dpath.mkdir(parents=True)
        (dpath / "config.json").write_text(json.dumps({"sae": {"variant": variant, "d_model": 8, "d_sae": 64,
                                                               "k": k, "l1_coeff": l1, "prefixes": None}}))
        metrics = {"l0": l0, "nmse": nmse, "dead_frac": 0.01, "dead_frac_train": 0.002}
        (dpath / "metrics.json").write_text(json.dumps(metrics))
    unfinished = root / "sweep" / "unfinished"
    unfinished.mkdir()
    (unfinished / "config.json").write_text(json.dumps({"sae": {"variant": "topk"}}))


def test_frontier_is_the_non_dominated_runs(tmp_path):
    make_runs(tmp_path)
    points, skipped = find_points(tmp_path)
    assert len(points) == 6 and len(skipped) == 1 and "unfinished" in skipped[0]
    front = {p.run for p in mark_frontier(points) if p.on_frontier}
    assert front == {"sweep/topk-16", "sweep/topk-32", "sweep/btk-32", "sweep/relu-1e-3"}


def test_pareto_cli_writes_csv_and_png(tmp_path, capsys):
    make_runs(tmp_path / "runs")
    assert main(["pareto", "--runs", str(tmp_path / "runs"), "--out", str(tmp_path / "out"), "--labels"]) == 0
    out = capsys.readouterr().out
    assert "4 on the frontier" in out and "| sweep/relu-1e-3 | relu | λ=0.001 |" in out
    with open(tmp_path / "out" / "pareto.csv") as f:
        rows = {r["run"]: r for r in csv.DictReader(f)}
    assert rows["sweep/topk-64"]["on_frontier"] == "False" and rows["sweep/topk-32"]["on_frontier"] == "True"
    assert rows["sweep/relu-1e-3"]["l1_coeff"] == "0.001" and rows["sweep/topk-16"]["k"] == "16"
    assert rows["sweep/relu-1e-3"]["setting"] == "λ=0.001" and rows["sweep/topk-16"]["setting"] == "k=16"
    assert rows["sweep/topk-16"]["dead_frac"] == "0.01" and rows["sweep/topk-16"]["dead_frac_train"] == "0.002"
    assert Image.open(tmp_path / "out" / "pareto.png").size[0] > 300
    assert main(["pareto", "--runs", str(tmp_path / "empty")]) == 2
