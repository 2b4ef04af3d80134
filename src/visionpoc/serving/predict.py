"""Predict with the trained models of a run: every successful model is loaded once, each image is
preprocessed exactly as evaluation does (the model's own timm eval transform on the RGB image), and
each model answers its top-k classes with probabilities and the forward latency.

The latency is one forward pass at batch 1, timed (synchronized on CUDA) after an untimed warm-up
forward per model: a process's first forward pays one-off costs (allocations, kernel selection, lazy
initialization) that can make it ten times slower, and would read as the model's speed. It leaves out
decoding and preprocessing. Results are returned, never logged: the caller shows them once.

Shared by `visionpoc predict` and the web service. A `Predictor` may be called from several threads:
each model has its own lock, because explanation switches the model's attention path and installs
hooks for the duration of a call.

Images whose sides differ by more than `MAX_ASPECT_RATIO` are refused: the eval transform resizes the
shorter side (e.g. to 256 px) keeping the ratio, so a 100000x1 strip (a few hundred bytes of PNG)
would become a gigapixel tensor.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from tqdm.auto import tqdm

from visionpoc.data.images import load_rgb, to_rgb
from visionpoc.data.loaders import eval_transform
from visionpoc.data.sources import IMG_EXTENSIONS
from visionpoc.errors import VisionpocError
from visionpoc.results import load_results
from visionpoc.serving.loading import TrainedModel, load_trained, trained_labels

log = logging.getLogger(__name__)

MAX_ASPECT_RATIO = 20  # longer side / shorter side; a panorama is ~4, a 20:1 strip is not a photo
LATENCY_NOTE = "ms: one forward pass at batch 1, timed after an untimed warm-up; decoding and preprocessing excluded"
Row = dict[str, Any]  # one image: {"image", "models": [{"model", "top", "latency_ms"}]} or {"image", "error"}


class ImageShapeError(VisionpocError):
    """An image too elongated to predict on (see `MAX_ASPECT_RATIO`)."""


def check_aspect_ratio(width: int, height: int, name: str = "the image") -> None:
    """Refuse (`ImageShapeError`) an image with a side more than `MAX_ASPECT_RATIO` times the other."""
    if min(width, height) < 1 or max(width, height) > MAX_ASPECT_RATIO * min(width, height):
        raise ImageShapeError(
            f"{name} is {width}x{height} pixels: one side is more than {MAX_ASPECT_RATIO} times the other, "
            "which is not a photo the models can take (resizing it would need gigapixels); crop it to at "
            f"most {MAX_ASPECT_RATIO}:1"
        )


class Predictor:
    """The successful models of the run in `run_dir` (or only `labels`), loaded once, in eval mode."""

    def __init__(
        self, run_dir: str | Path, labels: Sequence[str] | None = None, device: torch.device | str = "cpu"
    ) -> None:
        self.run_dir = Path(run_dir)
        results = load_results(self.run_dir)
        ok = trained_labels(self.run_dir)  # not a deployed file, nor a model `evaluate` added from another run
        wanted = list(labels) if labels else ok
        unknown = [label for label in wanted if label not in ok]
        if unknown:
            raise VisionpocError(
                f"{self.run_dir}: no successfully trained model {', '.join(map(repr, unknown))}; "
                f"choose from {', '.join(ok) or '(none: the run has no successful model)'}"
            )
        if not wanted:
            raise VisionpocError(f"{self.run_dir}: the run has no successfully trained model to predict with")
        self.device = torch.device(device)
        self.models: list[TrainedModel] = [
            load_trained(self.run_dir, label, results, device=self.device) for label in wanted
        ]
        self.class_names = list(results.dataset.class_names)
        self._transforms = {tm.label: eval_transform(tm.data_config) for tm in self.models}
        self._locks = {tm.label: threading.Lock() for tm in self.models}
        self._warm: set[str] = set()  # models that have run their untimed warm-up forward
        log.info("loaded %s from %s", ", ".join(self.labels), self.run_dir)

    @property
    def labels(self) -> list[str]:
        return [tm.label for tm in self.models]

    def preprocess(self, tm: TrainedModel, image: Image.Image) -> torch.Tensor:
        """The normalized tensor (1, 3, H, W) that evaluation would feed `tm` for `image`."""
        return self._transforms[tm.label](to_rgb(image)).unsqueeze(0).to(self.device)

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def predict_image(self, image: Image.Image, top: int = 5) -> list[dict[str, Any]]:
        """Each model's top-`top` classes for one image and its forward latency (ms: one forward at batch
        1 after a warm-up; no decode or preprocessing)."""
        if top < 1:
            raise ValueError(f"top must be at least 1, got {top}")
        check_aspect_ratio(image.width, image.height)
        k = min(top, len(self.class_names))
        answers = []
        for tm in self.models:
            x = self.preprocess(tm, image)  # (1, 3, H, W)
            with self._locks[tm.label], torch.inference_mode():
                if tm.label not in self._warm:  # the first forward's one-off costs are not the model's speed
                    tm.model(x)
                    self._warm.add(tm.label)
                self._sync()
                t0 = time.perf_counter()
                logits = tm.model(x)  # (1, num_classes)
                self._sync()
                latency = (time.perf_counter() - t0) * 1000
            probs, idx = logits.float().softmax(1)[0].topk(k)  # (k,), (k,)
            answers.append(
                {
                    "model": tm.label,
                    "top": [
                        {"label": self.class_names[int(i)], "index": int(i), "probability": float(p)}
                        for p, i in zip(probs.tolist(), idx.tolist(), strict=True)
                    ],
                    "latency_ms": latency,
                }
            )
        return answers

    def predict_images(self, images: list[Image.Image], top: int = 5, names: Sequence[str] | None = None) -> list[Row]:
        """One row per image: `{"image": name, "models": [{"model", "top": [{"label", "index",
        "probability"}], "latency_ms"}]}`; `names` default to the image's position."""
        names = list(names) if names is not None else [str(i) for i in range(len(images))]
        return [{"image": n, "models": self.predict_image(img, top)} for n, img in zip(names, images, strict=True)]

    def predict_paths(self, paths: Iterable[str | Path], top: int = 5) -> list[Row]:
        """Predict every image file named in `paths` (folders are searched recursively for image
        extensions). An image that cannot be decoded, or is too elongated (`MAX_ASPECT_RATIO`), gives a
        row with an `error` instead of stopping (the row carries it: the caller shows it)."""
        files = image_files(paths)
        rows: list[Row] = []
        for path in tqdm(files, desc="predict", unit="img", disable=None):
            try:
                image = load_rgb(path)  # within PIL's pixel limit, like any image: a strip decodes cheaply
                check_aspect_ratio(image.width, image.height, f"image {path}")  # before the resize
            except VisionpocError as e:
                rows.append({"image": str(path), "error": str(e)})
                continue
            rows.append({"image": str(path), "models": self.predict_image(image, top)})
        return rows

    def explain_image(self, image: Image.Image, size: int = 224) -> dict[str, tuple[str, Image.Image]]:
        """Per model, (method, overlay): the attention-rollout (ViT) or Grad-CAM (CNN) map of the predicted
        class over the crop the model saw, enlarged to at least `size` px. Models whose explanation
        fails are left out (logged); an absent `visionpoc.explain` gives `{}`."""
        try:
            from visionpoc import explain as xp
        except Exception as e:  # the module is optional for prediction
            log.warning("explanations unavailable: cannot import visionpoc.explain (%s)", e)
            return {}
        out: dict[str, tuple[str, Image.Image]] = {}
        for tm in self.models:
            x = self.preprocess(tm, image)  # (1, 3, H, W)
            try:
                with self._locks[tm.label]:
                    heatmap, method = xp.explain(tm.model, x)  # (H, W) in [0, 1]
                seen = xp.to_pil(x, tm.data_config["mean"], tm.data_config["std"])
                scale = max(1.0, size / min(seen.size))
                seen = seen.resize((round(seen.width * scale), round(seen.height * scale)), Image.Resampling.BICUBIC)
                out[tm.label] = (method, xp.overlay(seen, heatmap))
            except Exception as e:  # an explanation is a bonus; the prediction stands without it
                log.warning("no explanation for %s: %s: %s", tm.label, type(e).__name__, e)
        return out


def image_files(paths: Iterable[str | Path]) -> list[Path]:
    """Files named in `paths`, with folders expanded recursively (sorted) to their image files."""
    paths = list(paths)
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMG_EXTENSIONS)
            if not found:
                log.warning("no image files (%s) under %s", " ".join(IMG_EXTENSIONS), p)
            files += found
        elif p.is_file():
            files.append(p)
        else:
            raise VisionpocError(f"{p} not found: pass image files or folders of images")
    if not files:
        raise VisionpocError(
            f"no image files ({' '.join(IMG_EXTENSIONS)}) in {', '.join(map(str, paths))}: nothing to predict"
        )
    return files


def format_predictions(rows: list[Row]) -> str:
    """A plain-text table per image, the models side by side: rank, class and probability; a last line
    says what the latency in each model's heading measures (`LATENCY_NOTE`)."""
    blocks = []
    for row in rows:
        if "error" in row:
            blocks.append(f"{row['image']}\n  error: {row['error']}")
            continue
        answers = row["models"]
        width = max([len(t["label"]) for a in answers for t in a["top"]] + [12]) + 8
        heads = [f"{a['model']} ({a['latency_ms']:.1f} ms)" for a in answers]
        width = max([width] + [len(h) + 2 for h in heads])
        lines = [str(row["image"]), "  #  " + "".join(h.ljust(width) for h in heads).rstrip()]
        for r in range(max(len(a["top"]) for a in answers)):
            cells = []
            for a in answers:
                t = a["top"][r] if r < len(a["top"]) else None
                cell = f"{t['label']:<{width - 9}} {100 * t['probability']:5.1f}%" if t else ""
                cells.append(cell.ljust(width))
            lines.append(f"  {r + 1:<3}" + "".join(cells).rstrip())
        blocks.append("\n".join(lines))
    if any("models" in row for row in rows):
        blocks.append(LATENCY_NOTE)
    return "\n\n".join(blocks)
