"""traitscope: discover visual traits with sparse autoencoders on vision-model activations.

The pipeline, one package per stage:
images -> backbones -> shards -> sae / train -> features -> viz -> app, with finetune and demo on top.
"""

__version__ = "0.1.0"
