"""traitscope.runs: run folders old and new open the same way, find_runs' rules, config.json's one writer."""

import hashlib
import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from shard_fixtures import LAYER, make_shards

from traitscope.errors import TraitscopeError
from traitscope.runs import FORMAT, FoundRuns, RunFolder, ShardsRef, find_runs
from traitscope.sae import SAEConfig, build_sae, load_sae
from traitscope.train import RunSettings, TrainConfig, train

SHARDS = {"hash": "abc123", "path": "/data/shards", "layer": 7, "token_kind": "cls", "d_model": 8,
          "model": "toy", "weights_sha256": "ab" * 32}


def old_run(dpath, shards=None, metrics=True):
    """A run folder as an early `traitscope train` wrote it, by hand: no `format`, no val_split, a `shards`
    entry without token_kind or d_model, weights written by safetensors itself."""
    dpath.mkdir(parents=True)
    sae = build_sae(SAEConfig("topk", 8, 32, k=4))
    save_file({k: v.contiguous() for k, v in sae.state_dict().items()}, str(dpath / "sae.safetensors"))
    config = {"sae": {"variant": "topk", "d_model": 8, "d_sae": 32, "k": 4, "l1_coeff": None, "prefixes": None},
              "train": {"tokens": 1000, "val_rows": [0, 3]},
              "shards": shards if shards is not None else {"hash": "old", "layer": 2, "model": "toy"}}
    (dpath / "config.json").write_text(json.dumps(config))
    if metrics:
        (dpath / "metrics.json").write_text(json.dumps({"nmse": 0.5, "l0": 4.0}))
    return sae


def test_an_old_run_folder_opens_as_before(tmp_path):
    sae = old_run(tmp_path / "old")
    run = RunFolder(tmp_path / "old")
    assert run.is_run and run.has_weights and run.is_finished and run.name == "old"
    assert run.sae_config["k"] == 4 and run.metrics == {"nmse": 0.5, "l0": 4.0}
    assert run.shards == ShardsRef("old", None, 2, "patches", None, "toy", None)  # the defaults of older folders
    x = torch.randn(5, 8)
    assert torch.equal(load_sae(run.dpath).encode(x), sae.encode(x))
    assert run.read_log() == [] and run.inference_dpath("abc") == tmp_path / "old" / "inference" / "abc"


def test_save_writes_the_same_bytes_and_reads_back(tmp_path):
    sae = build_sae(SAEConfig("relu", 8, 16, l1_coeff=1e-3))
    sae.save(tmp_path / "new", {"format": FORMAT, "shards": SHARDS})
    run = RunFolder(tmp_path / "new")
    # config.json's bytes are what every version wrote: indent 2 and a final newline
    expected = {"sae": sae.cfg.to_dict(), "format": FORMAT, "shards": SHARDS}
    assert run.config_fpath.read_text() == json.dumps(expected, indent=2) + "\n"
    assert run.shards == ShardsRef(**SHARDS) and run.shards.view_kind == "cls"
    assert run.read_metrics() is None and run.metrics == {} and not run.is_finished
    assert run.weights_sha256() == hashlib.sha256(run.weights_fpath.read_bytes()).hexdigest()
    x = torch.randn(3, 8)
    assert torch.equal(load_sae(tmp_path / "new").encode(x), sae.encode(x))
    all_tokens = RunFolder(tmp_path / "new").config | {"shards": {**SHARDS, "token_kind": "all"}}
    RunFolder(tmp_path / "all").write_config(all_tokens)
    assert RunFolder(tmp_path / "all").shards.view_kind == "patches"


def test_one_writer_refuses_a_config_without_its_sae(tmp_path):
    run = RunFolder(tmp_path / "r")
    with pytest.raises(ValueError, match="'sae' entry"):
        run.write_config({"shards": SHARDS})
    assert not run.config_fpath.exists()


def test_damaged_files_are_one_line_errors(tmp_path):
    run = RunFolder(tmp_path / "r")
    run.dpath.mkdir()
    run.config_fpath.write_text("{not json")
    with pytest.raises(TraitscopeError, match="config.json is damaged"):
        run.config
    run.config_fpath.write_text(json.dumps({"model_type": "vit"}))  # another tool's config.json
    with pytest.raises(TraitscopeError, match="no 'sae' entry"):
        run.read_config()
    with pytest.raises(TraitscopeError, match="not an SAE run folder"):
        load_sae(run.dpath)
    with pytest.raises(TraitscopeError, match="invalid shards hash"):
        run.inference_dpath("../x")


def test_the_training_log_skips_a_torn_line(tmp_path):
    run = RunFolder(tmp_path)
    run.log_fpath.write_text('{"step": 1, "tokens": 10}\n{"step": 2, "tok')
    assert run.read_log() == [{"step": 1, "tokens": 10}]


def test_find_runs(tmp_path):
    old_run(tmp_path / "sweep" / "a")
    old_run(tmp_path / "sweep" / "b", metrics=False)  # unfinished: still a run
    old_run(tmp_path / "deep" / "x" / "y" / "z")  # four folders down
    old_run(tmp_path / ".hidden" / "h")
    old_run(tmp_path / "imp.partial")  # `traitscope import` still building it
    old_run(tmp_path / "sweep" / "a" / "inference" / "nested")  # inside a run: never searched
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text("[1, 2")
    (tmp_path / "empty").mkdir()
    found = find_runs(tmp_path)
    assert isinstance(found, FoundRuns)
    assert [r.name for r in found.runs] == ["sweep/a", "sweep/b"]
    assert [name for name, _ in found.unusable] == ["broken"] and "damaged" in found.unusable[0][1]
    assert [r.name for r in find_runs(tmp_path, max_depth=None).runs] == ["deep/x/y/z", "sweep/a", "sweep/b"]
    assert [r.name for r in find_runs(tmp_path / "sweep" / "a").runs] == ["a"]  # the folder itself
    assert found.runs[0].dpath == (tmp_path / "sweep" / "a").resolve()
    with pytest.raises(TraitscopeError, match="not a folder"):
        find_runs(tmp_path / "nothing")


def test_a_trained_run_folder(tmp_path):
    """What `traitscope train` leaves: config.json written by the one writer (the SAE's entry first, as
    every version wrote it, with the input scale that was folded into the weights), the log, the metrics."""
    rng = np.random.default_rng(0)
    shards = make_shards(tmp_path / "shards", rng.normal(size=(40, 4, 8)).astype(np.float32) * 3)
    cfg = TrainConfig(shards=str(shards.dpath), layer=LAYER, tokens=4096, batch_size=128, out=str(tmp_path / "runs"),
                      quiet=True, log_every=8, checkpoint_every=2048, val_tokens=256, threads=1)
    (result,) = train(cfg, [RunSettings(variant="topk", k=2, d_sae=16)], echo=lambda *a: None)
    (run,) = find_runs(tmp_path / "runs").runs
    assert run.dpath == result.dpath.resolve() and run.is_finished and run.metrics == result.metrics
    text = run.config_fpath.read_text()
    config = json.loads(text)
    assert list(config) == ["sae", "format", "train", "shards"] and text == json.dumps(config, indent=2) + "\n"
    state = json.loads((run.dpath / "checkpoint" / "state.json").read_text())
    assert config["train"]["input_scale"] == state["input_scale"] != 1.0
    assert run.shards == ShardsRef(shards.hash, str(shards.dpath.resolve()), LAYER, "patches", 8, "toy",
                                   shards.model["weights_sha256"])
    assert run.read_log() and all("tokens" in record for record in run.read_log()) and run.curves_fpath.is_file()
