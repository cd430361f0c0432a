"""Command lines built from config dataclasses (traitscope.cli_config): counts, comma lists, bool flags,
help from the field docstrings, and bad values as one-line errors with exit 2."""

import dataclasses

import pytest
from simple_parsing.docstring import get_attribute_docstring

from traitscope.cli import build_parser, main
from traitscope.cli_config import parse_count
from traitscope.demo.pipeline import DemoConfig
from traitscope.errors import TraitscopeError
from traitscope.finetune.augment import AugmentConfig
from traitscope.finetune.grids_cli import GridsConfig
from traitscope.finetune.trainer import FinetuneConfig


def parse(*argv: str):
    return build_parser(argv[0]).parse_args(list(argv))


def test_counts_read_suffixes_and_refuse_what_is_not_a_whole_count():
    assert [parse_count(t) for t in ("50M", "3k", "2.5k", "1e6", "4_096", 4096, "1G")] == \
        [50_000_000, 3_000, 2_500, 1_000_000, 4_096, 4_096, 1_000_000_000]
    for bad in ("lots", "1.5", "-3", "3x", ""):
        with pytest.raises(TraitscopeError):
            parse_count(bad)


def test_no_option_gives_the_dataclass_defaults():
    assert parse("demo").cfg == DemoConfig()
    assert parse("finetune", "--images", "x", "--out", "y").cfg == FinetuneConfig()
    assert parse("grids", "--shards", "S", "--out", "O").cfg == GridsConfig(shards="S", out="O")
    assert not parse("grids", "--shards", "S", "--out", "O", "--no-normalize").cfg.normalize


def test_counts_comma_lists_bools_optionals_and_nested_configs_from_the_command_line():
    cfg = parse("demo", "--tokens", "30k", "--ks", "8,16", "--l1", "2", "--images", "photos").cfg
    assert (cfg.tokens, cfg.ks, cfg.l1, cfg.images) == (30_000, (8, 16), 2.0, "photos")
    cfg = parse("finetune", "--images", "x", "--out", "y", "--no-normalize-orientation", "--image-size", "64",
                "--min-scale", "0.3", "--batch-size", "16").cfg
    assert (cfg.normalize_orientation, cfg.image_size, cfg.augment.min_scale, cfg.batch_size) == (False, 64, 0.3, 16)
    assert parse("finetune", "--images", "x", "--out", "y", "--normalize-orientation").cfg.normalize_orientation


@pytest.mark.parametrize("command, classes", [("demo", [DemoConfig]), ("finetune", [FinetuneConfig, AugmentConfig]),
                                              ("grids", [GridsConfig])])
def test_help_shows_every_field_with_its_docstring_and_default(command, classes, capsys):
    assert main([command, "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    for cls in classes:
        for f in dataclasses.fields(cls):
            if dataclasses.is_dataclass(f.type):
                continue
            doc = " ".join(get_attribute_docstring(cls, f.name).docstring_below.split())
            assert f"--{f.name.replace('_', '-')}" in text and doc[:40] in text, (f.name, doc)
    if command == "demo":
        assert "(default: 400_000)" in text and "(default: 8,16,32)" in text
    elif command == "finetune":
        assert "--no-normalize-orientation" in text and "(default: efficientnet-lite0)" in text


@pytest.mark.parametrize("argv, needle", [
    (["demo", "--tokens", "lots"], "--tokens: 'lots' is not a count"),
    (["demo", "--ks", "8,x"], "--ks"),
    (["demo", "--val-frac", "half"], "--val-frac"),
    (["finetune", "--images", "x", "--out", "y", "--epochs", "two"], "--epochs"),
    (["finetune", "--images", "x", "--out", "y", "--image-size"], "--image-size"),
])
def test_a_bad_value_is_one_error_line_and_exit_2(argv, needle, capsys):
    assert main(argv) == 2
    errors = [ln for ln in capsys.readouterr().err.splitlines() if ": error: " in ln]
    assert len(errors) == 1 and needle in errors[0], errors
