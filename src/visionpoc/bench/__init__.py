"""`visionpoc bench`: our training step and input path against the peers, measured in one process.

- `run`: the command (sections, the report of figures and ratios);
- `workload`: the plan (models, sizes, synthetic JPEGs) and the timer every section shares;
- `ours`: our loop and input paths;
- `peers`: timm eager/compiled and Hugging Face transformers steps.
"""
