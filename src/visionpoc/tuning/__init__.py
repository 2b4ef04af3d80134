"""`visionpoc tune`: an Optuna search of one model's hyper-parameters on validation accuracy.

- `search`: the study, the search space and each trial through the training loop;
- `ddp`: trials run data-parallel under torchrun (rank 0 talks to Optuna);
- `outputs`: the files a study writes (best params YAML, trials CSV, summary) and `compare --tuned`.
"""
