"""`visionpoc bench`: our training step and input path against the peers, measured in one process.

- `run`: the command (sections, the report of figures and ratios);
- `workload`: the plan (models, sizes, synthetic JPEGs) and the timer every section shares;
- `ours`: our loop and input paths;
- `peers`: timm eager/compiled and Hugging Face transformers steps.
- `plain`: our loop against the plainest correct PyTorch loop on real photos (`full` and `head`);
- `linear_probe`: a linear probe through the backbone vs from cached features.
"""
