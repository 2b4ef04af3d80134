"""Deployed models: a team's production model as a file (ONNX), scored as it is, never trained.

- `spec`: what the config says and the file declares, checked without torch: the file, its input shape
  against `preprocess` (size, NCHW/NHWC), its output size against `classes`, the class map read from a
  list or a file and matched to the dataset's classes (`ClassMatch`).
- `score`: the preprocessing built from `PreprocessConfig`, ONNX Runtime on the CPU, and the scores
  (`ModelResult` and predictions in the dataset's class space) that a trained model gets, so the report's
  metrics, intervals and paired tests treat both alike.
"""
