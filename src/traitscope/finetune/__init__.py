"""The faces workflow: fine-tune a backbone with contrastive + orientation losses, embed images at the
image level, and show the top images of dense dimensions and SAE features as 4x4 grids.

    finetune/augment.py   random views for the contrastive loss
    finetune/losses.py    contrastive (two views) and orientation losses
    finetune/bases.py     the base model and its starting weights (--init)
    finetune/model.py     FinetunedBackbone, its files, and the `finetuned:<dir>` registry prefix
    finetune/trainer.py   the training loop, checkpoints and resume
    finetune/embed.py     image-level embeddings as shards (optionally L2-normalised)
    finetune/grids.py     top images per unit, 4x4 grid PNGs, attribute enrichment
"""
