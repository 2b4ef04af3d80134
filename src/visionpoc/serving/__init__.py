"""Using the models of a finished run: load them, predict, serve a web API and page, export them.

- `loading`: rebuild a run's trained models from its config and best weights;
- `predict`: each model's top-k for images (`visionpoc predict`);
- `app`: the FastAPI service (`visionpoc serve`); `uploads`: its upload checks; `page`: its demo page;
- `export`: ONNX and safetensors files with their preprocessing (`visionpoc export`).
"""
