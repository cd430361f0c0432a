"""`traitscope demo` end to end on a small synthetic set with the offline DINOv2-S, and its rerun."""

import re

import pytest

from traitscope.cli import main
from traitscope.demo.report import alignment_verdict, mostly_dead_note
from traitscope.features.alignment import MethodSummary
from traitscope.features.pareto import RunPoint
from locations import FISH


def test_demo_writes_an_honest_report_and_reuses_finished_steps(tmp_path, capsys):
    args = ["demo", "--out", str(tmp_path / "demo"), "--n-images", "40", "--tokens", "30k", "--ks", "8,16",
            "--expansion", "2", "--batch-size", "512", "--l1", "5"]
    assert main(args) == 0
    first = capsys.readouterr()
    report_fpath = tmp_path / "demo" / "report.html"
    page = report_fpath.read_text()
    # what every number was measured on is stated
    assert "fine-tuned for saliency" in page and "not DINOv2 itself" in page
    assert "30,000 tokens per SAE" in page and "held-out images (never trained on)" in page
    # the pictures exist: Pareto plot and one heatmap grid per drawn feature
    assert (tmp_path / "demo" / "pareto.png").is_file()
    assert "relu" in (tmp_path / "demo" / "pareto.csv").read_text()  # --l1 adds a ReLU/L1 SAE to the sweep
    figures = re.findall(r'src="(figures/feature-\d+\.png)"', page)
    assert figures and all((tmp_path / "demo" / f).is_file() for f in figures)
    for method in ("sae", "dense", "pca", "kmeans", "probe"):
        assert f"<td>{method}</td>" in page
    assert "traitscope app --runs" in first.out
    # the headline compares like with like, and says plainly whether the SAE beats each baseline
    assert "Dense scores (SAE pre-activations" in page and "Sparse scores (SAE codes" in page
    assert re.search(r"(beats|is beaten by|ties with|splits with) kmeans", page)

    assert main(args) == 0  # a rerun reuses the shards and the trained runs
    second = capsys.readouterr()
    assert "already complete" in second.out + second.err
    assert "already trained" in second.out + second.err


def test_the_report_says_whether_the_sae_beats_every_baseline():
    def by(scoring, **scores):
        return [MethodSummary("patch", m, scoring, ap, cov, 14) for m, (ap, cov) in scores.items()]

    dense = by("dense", sae=(0.50, 0.43), dense=(0.41, 0.36), pca=(0.35, 0.14), kmeans=(0.45, 0.36),
               probe=(0.9, 1.0))
    sparse = by("sparse", sae=(0.42, 0.29), dense=(0.30, 0.2), pca=(0.42, 0.29), kmeans=(0.45, 0.21))
    text = alignment_verdict(dense + sparse)
    assert "beats every baseline" in text.split("Sparse scores")[0]  # dense: above all three
    sparse_text = text.split("Sparse scores")[1]
    assert "beats dense (0.300, 20%)" in sparse_text and "ties with pca" in sparse_text
    assert "splits with kmeans" in sparse_text and "it beats 1 of 3 baselines" in sparse_text
    assert "the levers" in sparse_text  # where it does not win, the report says what would help
    assert "is beaten by kmeans" in alignment_verdict(by("dense", sae=(0.4, 0.3), kmeans=(0.5, 0.4)))


def test_the_report_explains_a_run_most_of_whose_latents_are_dead():
    def point(run, k, dead):
        return RunPoint(run, "matryoshka", k, None, 3072, k, 0.19, dead, dead, True, f"k={k}")

    assert mostly_dead_note([point("a", 16, 0.08), point("b", 32, 0.03)]) == ""
    note = mostly_dead_note([point("a", 8, 0.7734375), point("b", 16, 0.08)])
    assert "a (k=8): 2,376 of 3,072" in note and "b (k=16)" not in note
    assert "wider than the data uses" in note


@pytest.mark.skipif(not FISH.is_dir(), reason=f"{FISH} is absent")
def test_demo_on_unlabelled_photos_skips_alignment_and_says_so(tmp_path, capsys):
    photos = tmp_path / "photos"
    photos.mkdir()
    for fpath in sorted(FISH.glob("*.JPG"))[:16]:
        (photos / fpath.name).symlink_to(fpath)
    out = tmp_path / "demo"
    assert main(["demo", "--images", str(photos), "--out", str(out), "--tokens", "8k", "--ks", "8",
                 "--expansion", "2", "--batch-size", "512"]) == 0
    assert "alignment skipped" in capsys.readouterr().out
    page = (out / "report.html").read_text()
    assert "Trait alignment: skipped" in page and "have no labels" in page
    figures = re.findall(r'src="(figures/feature-\d+\.png)"', page)
    assert figures and all((out / f).is_file() for f in figures)
    assert "<td>kmeans (" in page  # the held-out metrics against the baselines are there
