"""Hugging Face `transformers` image classifiers as visionpoc models (`hf:` model entries).

An entry `{label: vit_hf, hf: google/vit-base-patch16-224-in21k}` (a hub id, or a folder written by
`save_pretrained`) loads through `AutoModelForImageClassification` with a new head for the dataset's
classes. The model keeps its own class and module tree (so its weights stay those of
`save_pretrained`) and gains a forward that takes a (B, 3, H, W) batch and returns the logits, plus
the attributes `visionpoc.models` reads of a timm model: `pretrained_cfg` (the preprocessing of its
`AutoImageProcessor`, the classifier's name, the exact revision) and `get_classifier()`. Everything
else (policies, the loop, bf16, `torch.compile`, EMA, checkpoints, export) is the timm path's.

- `source`: where an `hf:` entry points (folder or hub id), its revision, its preflight check and the
  error when its files are missing offline. Imports neither torch nor transformers.
- `build`: the model, its preprocessing, the architecture files kept in the run, the export.

`transformers` is an optional extra (`pip install 'visionpoc[hf]'`); the core path never imports it.
"""

from visionpoc.hfmodels.source import HF_EXTRA, hf_source, revision, source_problem

__all__ = ["HF_EXTRA", "hf_source", "revision", "source_problem"]
