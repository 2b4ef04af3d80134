"""The price of each model at inference: CPU latency (p50, p95 at batch 1), throughput, peak memory and
file size with ONNX Runtime on this machine (`cost`: exports and orchestration; `worker`: the measuring
process, which imports neither torch nor the rest of the package), and torch on CUDA when there is a GPU
(`gpu`). Nothing is imported here: the worker starts light."""
