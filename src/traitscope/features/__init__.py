"""Sparse features over a data set: inference, held-out metrics, baselines, Pareto frontier, alignment.

Reads an SAE run folder and a shard folder; writes `<run>/inference/<shards-hash>/` (docs/formats.md).
"""

from traitscope.features.inference import Inference, inference_dpath, run_inference
from traitscope.features.inputs import RunInputs, open_inputs, split_rows

__all__ = ["Inference", "RunInputs", "inference_dpath", "open_inputs", "run_inference", "split_rows"]
