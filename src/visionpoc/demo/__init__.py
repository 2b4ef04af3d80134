"""`visionpoc demo`: a whole comparison in about a minute on a CPU, offline, through the real pipeline.

- `digits`: scikit-learn's handwritten digits (1,797 real 8x8 scans, 10 classes) written once as an image
  folder (`train/<digit>/*.png`, `test/<digit>/*.png`, upscaled RGB PNGs) and reused by later runs;
- `run`: the demo's config (the packaged `configs/demo.yaml`: a small CNN vs a small ViT, both from
  scratch), the comparison (`compare.run`), its report, and the lines that say what to do next.

Nothing is faked: the digits are read and split like any `folder` dataset, both models train through
the same loop, and the report is the one `visionpoc compare` writes.
"""
