"""`traitscope train`'s command line, built from TrainConfig, RunSettings and the variants' Params:
counts, comma grids, help from the field docstrings, and TrainConfig's own checks."""

import dataclasses
import json

import pytest
from simple_parsing.docstring import get_attribute_docstring

from traitscope.cli import build_parser, main
from traitscope.errors import TraitscopeError
from traitscope.sae import variants
from traitscope.train.cli import config_from_args, l0_hint
from traitscope.train.config import RunSettings, TrainConfig, variant_fields


def plan(*argv: str):
    return config_from_args(build_parser("train").parse_args(["train", "--shards", "S", *argv]))


def test_no_option_gives_the_defaults_and_counts_read_suffixes():
    cfg, settings = plan()
    assert cfg == TrainConfig(shards="S") and settings == [RunSettings()]
    cfg, _ = plan("--tokens", "3k", "--batch-size", "1k", "--stop-after", "2.5k", "--checkpoint-every", "1M")
    assert (cfg.tokens, cfg.batch_size, cfg.stop_after, cfg.checkpoint_every) == (3_000, 1_000, 2_500, 1_000_000)


def test_comma_lists_make_a_grid_and_each_variant_takes_only_its_own_parameters():
    _, settings = plan("--sae", "topk,relu", "--k", "16,32", "--l1", "1,2", "--d-sae", "1k", "--lr-warmup", "5")
    assert [(s.variant, s.params.label(), s.d_sae, s.lr_warmup) for s in settings] == [
        ("topk", "k16", 1000, 5), ("topk", "k32", 1000, 5), ("relu", "l1_1", 1000, 5), ("relu", "l1_2", 1000, 5)]
    _, settings = plan("--sae", "relu", "--sae", "matryoshka", "--prefixes", "8,16,32", "--expansion", "2,4")
    assert [(s.variant, s.expansion) for s in settings] == [("relu", 2), ("relu", 4), ("matryoshka", 2), ("matryoshka", 4)]
    assert settings[-1].params.prefixes == [8, 16, 32]
    _, settings = plan("--variant", "batchtopk", "--lr", "1e-4,3e-4", "--k-aux", "64")
    assert [(s.lr, s.params.k_aux) for s in settings] == [(1e-4, 64), (3e-4, 64)]
    _, settings = plan("--sae", "relu,jumprelu", "--l0-coeff", "1e-3,2e-3", "--l1-warmup", "0.1")
    assert [(s.variant, s.params) for s in settings] == [
        ("relu", RunSettings(variant="relu", l1_warmup=0.1).params),
        ("jumprelu", RunSettings(variant="jumprelu", l0_coeff=1e-3).params),
        ("jumprelu", RunSettings(variant="jumprelu", l0_coeff=2e-3).params)]


def test_a_sweep_file_takes_the_command_line_as_shared_settings(tmp_path):
    sweep = tmp_path / "sweep.json"
    sweep.write_text(json.dumps({"tokens": "5k", "runs": [{"sae": "topk", "k": 4}, {"sae": "relu", "l1": 2}]}))
    cfg, settings = plan("--sweep", str(sweep), "--batch-size", "256", "--beta1", "0.8")
    assert (cfg.tokens, cfg.batch_size) == (5_000, 256)
    assert [(s.variant, s.params.label(), s.beta1) for s in settings] == [("topk", "k4", 0.8), ("relu", "l1_2", 0.8)]
    with pytest.raises(TraitscopeError, match="not both"):
        plan("--sweep", str(sweep), "--k", "8")
    with pytest.raises(TraitscopeError, match="on the command line but"):
        plan("--sweep", str(sweep), "--tokens", "6k")
    sweep.write_text(json.dumps([{"sae": "topk", "d_sae": "2k", "k": "16", "lr_warmup": "1k", "layer": "-2"}]))
    cfg, (s,) = plan("--sweep", str(sweep))  # every whole-number field reads a count
    assert (s.d_sae, s.params.k, s.lr_warmup, cfg.layer) == (2_000, 16, 1_000, -2)
    sweep.write_text(json.dumps([{"sae": "topk", "k": "many"}]))
    with pytest.raises(TraitscopeError, match="k: 'many' is not a valid value"):
        plan("--sweep", str(sweep))


def test_help_shows_every_setting_with_its_docstring(capsys):
    assert main(["train", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    docs = {f.name: get_attribute_docstring(cls, f.name).docstring_below
            for cls in (TrainConfig, RunSettings) for f in dataclasses.fields(cls) if f.name != "params"}
    docs |= {name: get_attribute_docstring(variants()[owners[0]].Params, name).docstring_below
             for name, (_, owners) in variant_fields().items()}
    for name, doc in docs.items():
        assert f"--{name.replace('_', '-')}" in text and " ".join(doc.split()).rstrip(".")[:40] in text, name
    for flag in ("--sae", "--l1", "--k", "(default: 50_000_000)", "(relu; default 5.0)"):
        assert flag in text


@pytest.mark.parametrize("argv, needle", [
    (["--tokens", "cls"], "--token-kind cls"), (["--tokens", "lots"], "--tokens: 'lots' is not a count"),
    (["--k", "x"], "'x' is not a count"), (["--d-sae", "1.5"], "--d-sae"), (["--layer", "top"], "--layer"),
    (["--token-kind", "faces"], "--token-kind must be one of"), (["--val-frac", "1.5"], "--val-frac"),
])
def test_a_bad_value_is_one_error_line_and_exit_2(argv, needle, tmp_path, capsys):
    assert main(["train", "--shards", str(tmp_path), "--out", str(tmp_path / "runs"), *argv]) == 2
    errors = [ln for ln in capsys.readouterr().err.splitlines() if ": error: " in ln]
    assert len(errors) == 1 and needle in errors[0], errors


@pytest.mark.parametrize("changes, needle", [
    ({"batch_size": 0}, "batch_size"), ({"tokens": 0}, "token budget"), ({"token_kind": "x"}, "--token-kind"),
    ({"dtype": "float16"}, "dtype"), ({"val_frac": 0}, "--val-frac 0"), ({"threads": -1}, "--threads"),
    ({"dist_mode": "x"}, "dist_mode"), ({"log_to": "mlflow"}, "log_to"),
])
def test_train_config_refuses_an_impossible_setting_by_name(changes, needle):
    TrainConfig().validate()
    with pytest.raises(TraitscopeError, match=needle):
        TrainConfig(**changes).validate()


@pytest.mark.parametrize("variant, l0, noted", [("matryoshka", 34.1, True), ("batchtopk", 40.0, True),
                                                 ("matryoshka", 33.0, False), ("topk", 40.0, False)])
def test_a_learned_threshold_firing_more_than_k_on_held_out_images_gets_a_note(tmp_path, variant, l0, noted):
    """Above 5% over k, a BatchTopK-family run's line is followed by why, and what keeps exactly k."""
    (tmp_path / "config.json").write_text(json.dumps({"sae": {"variant": variant, "k": 32}}))
    hint = l0_hint(tmp_path, {"l0": l0})
    assert (f"L0 {l0:.1f} on held-out images for k = 32" in hint and "--sae topk keeps exactly 32" in hint) == noted
    assert bool(hint) == noted
