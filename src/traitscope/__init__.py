"""traitscope: discover visual traits with sparse autoencoders on vision-model activations.

The pipeline, one package per stage:
images -> backbones -> shards -> sae / train -> features -> viz -> app, with finetune and demo on top.

Each stage imports only the stages below it (pyproject.toml's import-linter contracts, checked by
tests/test_imports.py; no import circle either, not even through an import inside a function):

    cli                               the `traitscope` command: wires the stages' CLI modules (entry-point group traitscope.commands)
    app | demo | finetune | interop   workflows and adapters, independent of each other
    features                          evaluation: inference, metrics tables, alignment, rankings, enrichment
    train                             the training loop
    sae                               SAE variants and their reconstruction / sparsity metrics
    runs                              the SAE run folder
    shards                            activation shard folders (ours and saev's)
    images | viz                      image sources and labels; pictures from arrays
    backbones                         vision models, behind a registry (entry-point group traitscope.backbones)
    dist | files | cli_config         processes and devices; atomic files; options from config dataclasses
    errors                            TraitscopeError

A helper needed by two stages lives in the lower one (the metrics training reports are in
`sae.metrics`; top-image rankings and enrichment, used by the app and `grids`, in `features`). A
higher stage that extends a lower one's registry does it through an entry point (a fine-tuned
backbone: `finetuned:<dir>`), so the lower one never names it.
"""

__version__ = "0.1.0"
