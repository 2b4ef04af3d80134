"""Score a deployed ONNX model as it is: its own preprocessing, ONNX Runtime on the CPU, its class map.

The preprocessing follows `PreprocessConfig`: the project's decoding (`data/images.py`: RGB, EXIF
upright), torchvision's resize (bilinear, antialiased) of the shorter side to `resize` and centre crop to
`size` (or `squash`: straight to size x size), pixels scaled to [0, 1], the channel order (`BGR` flips
it), then mean/std (given in the model's channel order), then the layout (`NHWC` moves channels last).

Outputs become probabilities (a softmax when they are logits: a row does not sum to 1, or a score is
negative) and are put in the dataset's class space (`spec.ClassMatch`): outputs of classes the dataset
lacks are dropped and each row renormalised, so a prediction is the model's most probable dataset class;
dataset classes the model lacks get probability 0 (never predicted, so their images count as errors in
its own accuracy; the report's paired tests leave them out). The result has the metrics of a trained
model's on val and test (no train pass: it was not trained here) and the same predictions file.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from visionpoc.config import Config, ModelConfig, PreprocessConfig
from visionpoc.data.splits import Splits
from visionpoc.deployed import spec
from visionpoc.deployed.spec import DEPLOYED, ClassMatch, Keys
from visionpoc.errors import ConfigError
from visionpoc.evaluate import EvalStats, summarize
from visionpoc.results import ModelResult, save_predictions
from visionpoc.runfiles import PREDICTIONS_FILE
from visionpoc.timing import Progress

log = logging.getLogger(__name__)

BATCH = 32  # images per ONNX Runtime call (a model with a fixed batch size gets its own)


def image_transform(pp: PreprocessConfig) -> Callable[[Any], Any]:
    """PIL RGB image -> (3, size, size) float tensor in [0, 1], RGB: the geometric part of `pp`."""
    from torchvision import transforms as T

    bilinear = T.InterpolationMode.BILINEAR
    if pp.crop == "squash":
        return T.Compose([T.Resize((pp.size, pp.size), interpolation=bilinear), T.ToTensor()])
    resize = pp.resize if pp.resize is not None else round(pp.size / 0.875)
    return T.Compose([T.Resize(resize, interpolation=bilinear), T.CenterCrop(pp.size), T.ToTensor()])


def model_input(x: np.ndarray, pp: PreprocessConfig) -> np.ndarray:
    """(B, 3, H, W) RGB in [0, 1] -> what the model takes: channel order, mean/std, layout."""
    if pp.channels == "BGR":
        x = x[:, ::-1]
    mean = np.asarray(pp.mean, dtype=np.float32).reshape(1, -1, 1, 1)
    std = np.asarray(pp.std, dtype=np.float32).reshape(1, -1, 1, 1)
    x = (x - mean) / std
    if pp.layout == "NHWC":
        x = x.transpose(0, 2, 3, 1)  # (B, H, W, 3)
    return np.ascontiguousarray(x, dtype=np.float32)


def to_probs(outputs: np.ndarray) -> np.ndarray:
    """(N, K) scores -> probabilities: as they are when every row sums to 1 with no negative score, else
    their softmax (logits)."""
    out = outputs.astype(np.float64)
    if len(out) and ((out < 0).any() or not np.allclose(out.sum(1), 1.0, atol=1e-3)):
        out = np.exp(out - out.max(1, keepdims=True))
        out /= out.sum(1, keepdims=True)
    return out


def in_dataset_space(probs: np.ndarray, match: ClassMatch, num_classes: int) -> np.ndarray:
    """(N, K) model probabilities -> (N, C) over the dataset's classes, renormalised over the classes both
    know (a row with no mass there is uniform over them)."""
    out = np.zeros((len(probs), num_classes), dtype=np.float64)
    for k, c in enumerate(match.index):
        if c is not None:
            out[:, c] += probs[:, k]
    known = np.zeros(num_classes, dtype=bool)
    known[[c for c in match.index if c is not None]] = True
    total = out.sum(1, keepdims=True)
    out = np.where(total > 0, out / np.where(total > 0, total, 1.0), known / known.sum())
    return out.astype(np.float32)


@dataclass
class Deployed:
    """An opened deployed model: its session, what it declares, and its classes."""

    path: Path
    pp: PreprocessConfig
    io: spec.OnnxIO
    names: list[str]
    session: Any  # onnxruntime.InferenceSession

    def run(self, x: np.ndarray) -> np.ndarray:
        """(B, ...) model input -> (B, K) scores of the first output."""
        dtype = {"float32": np.float32, "float16": np.float16, "float64": np.float64}
        x = x.astype(dtype[spec.FLOAT_TYPES[self.io.input.elem_type]])
        out = self.session.run([self.io.output.name], {self.io.input.name: x})[0]
        return np.asarray(out, dtype=np.float64).reshape(len(x), -1)


def open_deployed(mcfg: ModelConfig, keys: Keys) -> Deployed:
    """Check the entry (`spec.problems`: file, shapes, classes) and open it with ONNX Runtime on the CPU."""
    import onnxruntime as ort

    found = spec.problems(mcfg, keys)
    if found:
        raise ConfigError("; ".join(found))
    assert mcfg.preprocess is not None and mcfg.onnx is not None  # spec.problems said so
    path = Path(mcfg.onnx).expanduser()
    io = spec.read_io(path, keys)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return Deployed(path, mcfg.preprocess, io, spec.read_classes(mcfg.classes, keys), session)


def model_scores(model: Deployed, split: Any, workers: int, desc: str) -> tuple[np.ndarray, float]:
    """(N, K) scores of `model` on every image of `split`, in its order, and the pass's wall time."""
    from torch.utils.data import DataLoader

    from visionpoc.data.loaders import ImageDataset

    fixed = model.io.input.dims[0]
    bs = fixed if isinstance(fixed, int) and fixed > 0 else BATCH
    loader = DataLoader(ImageDataset(split, image_transform(model.pp)), batch_size=bs, num_workers=workers)
    outs, t0 = [], time.perf_counter()
    bar = Progress(loader, desc, logger=log)
    for x, _ in bar:
        n = len(x)
        xb = x.numpy()  # (B, 3, H, W)
        if n < bs and isinstance(fixed, int):  # a fixed batch size: pad the last batch, keep its rows
            xb = np.concatenate([xb, np.repeat(xb[-1:], bs - n, axis=0)])
        outs.append(model.run(model_input(xb, model.pp))[:n])
        if bar.step(n):
            bar.show()
    bar.close()
    scores = np.concatenate(outs) if outs else np.zeros((0, len(model.names)))
    if len(scores) != len(split):
        raise AssertionError(f"scored {len(scores)} images, expected exactly {len(split)}")
    return scores, time.perf_counter() - t0


def score_split(model: Deployed, match: ClassMatch, split: Any, num_classes: int, workers: int, desc: str) -> EvalStats:
    """The metrics of `model` on `split` in the dataset's class space (`in_dataset_space`)."""
    scores, time_s = model_scores(model, split, workers, desc)
    k = scores.shape[1] if scores.ndim == 2 else 0
    if len(scores) and k != len(model.names):
        raise ConfigError(f"the model gives {k} scores per image but its classes list {len(model.names)} names")
    probs = in_dataset_space(to_probs(scores), match, num_classes)
    targets = np.asarray(split.labels, dtype=np.int64)
    p_true = probs[np.arange(len(targets)), targets] if len(targets) else np.zeros(0)
    loss = float(-np.log(np.maximum(p_true, 1e-12)).mean()) if len(targets) else float("nan")
    return summarize(targets, probs, loss, time_s)


def warn_classes(label: str, match: ClassMatch, keys: Keys) -> None:
    """Say which classes the comparison leaves out, and why."""
    if match.unknown:
        log.warning(
            "%s: %s names no output for %d dataset class(es) (%s): the model never predicts them; the paired "
            "tests count only the classes both models know (the report says which)",
            label,
            keys.classes,
            len(match.unknown),
            ", ".join(match.unknown[:5]) + (", ..." if len(match.unknown) > 5 else ""),
        )
    if match.ignored:
        log.warning(
            "%s: %d of the model's classes are not in the dataset (%s): their outputs are dropped",
            label,
            len(match.ignored),
            ", ".join(match.ignored[:5]) + (", ..." if len(match.ignored) > 5 else ""),
        )


def score_deployed(
    cfg: Config, mcfg: ModelConfig, splits: Splits, class_folders: list[str], out_dir: Path, keys: Keys
) -> ModelResult:
    """Score the deployed model `mcfg` on val and test of `splits`; write its test predictions in `out_dir`."""
    from visionpoc.data.loaders import default_workers

    model = open_deployed(mcfg, keys)
    match = spec.match_classes(model.names, splits.class_names, class_folders, keys)
    warn_classes(mcfg.label, match, keys)
    nc, workers = splits.num_classes, default_workers(cfg.data)
    log.info("[%s] scoring the deployed model %s as it is (not trained)", mcfg.label, model.path)
    val = score_split(model, match, splits.val, nc, workers, "val") if len(splits.val) else None
    test = score_split(model, match, splits.test, nc, workers, "test")
    result = ModelResult(
        label=mcfg.label,
        timm=mcfg.name,
        finetune=DEPLOYED,
        pretrained=False,
        policy=DEPLOYED,
        img_size=model.pp.size,
        params=model.io.params,
        onnx=str(model.path.resolve()),
        classes_unknown=list(match.unknown),
        classes_ignored=list(match.ignored),
        test_accuracy=test.accuracy,
        test_top5_accuracy=test.top5_accuracy,
        test_macro_f1=test.macro_f1,
        test_per_class_accuracy=test.per_class_accuracy,
        eval_time_s=test.time_s,
        eval_img_s=test.img_s,
    )
    if val is not None:
        result.val_accuracy, result.val_top5_accuracy = val.accuracy, val.top5_accuracy
        result.val_macro_f1, result.val_per_class_accuracy = val.macro_f1, val.per_class_accuracy
    out_dir.mkdir(parents=True, exist_ok=True)
    save_predictions(out_dir / PREDICTIONS_FILE, test.targets, test.probs, splits.test.files)
    return result
