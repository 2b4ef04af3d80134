"""The report's image sections: the disagreement gallery and "what they look at" (saliency maps).

Both need the test images on this machine; saliency also needs the trained weights (`load_trained`).
Whatever is missing, each function returns a `Picture` whose `note` says what was skipped and why,
and the report carries on.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from visionpoc.data.images import load_rgb
from visionpoc.data.loaders import eval_transform
from visionpoc.explain import explain, overlay, to_pil
from visionpoc.report import plots
from visionpoc.report.inputs import Predictions, align, open_test_images, test_image_path, test_split_root
from visionpoc.report.plots import Caption
from visionpoc.results import RunResults

log = logging.getLogger(__name__)

GALLERY_SIZE = 8
EXPLAIN_SIZE = 4


@dataclass
class Picture:
    """A figure (PNG bytes) with notes for the reader; `png` is None when the section was skipped."""

    png: bytes | None = None
    notes: list[str] = field(default_factory=list)


def _missing_images(r: RunResults) -> str:
    return (
        f"The test images are not on this machine (looked for the {r.dataset.source} test split under "
        f"{r.dataset.root!r}), so this section is skipped. Run `visionpoc report` where the dataset is."
    )


def _pick_disagreements(pa: Predictions, pb: Predictions, ia: np.ndarray, ib: np.ndarray, k: int) -> list[int]:
    """Positions (in the aligned order) where the predictions differ: half where only the candidate is right,
    half where only the baseline is, then the rest; the most confident disagreements first."""
    a_pred, b_pred, t = pa.preds[ia], pb.preds[ib], pa.targets[ia]
    conf = pa.probs[ia].max(1) + pb.probs[ib].max(1)
    differ = a_pred != b_pred
    groups = [differ & (b_pred == t), differ & (a_pred == t), differ & (a_pred != t) & (b_pred != t)]
    ordered = [np.flatnonzero(g)[np.argsort(-conf[g], kind="stable")].tolist() for g in groups]
    chosen = ordered[0][: k // 2] + ordered[1][: k // 2]
    rest = [i for g in ordered for i in g if i not in chosen]
    return chosen + rest[: k - len(chosen)]


def _disagreement_captions(
    names: list[str],
    baseline: str,
    candidate: str,
    pa: Predictions,
    pb: Predictions,
    ia: np.ndarray,
    ib: np.ndarray,
    picks: list[int],
) -> list[list[Caption]]:
    """For each picked position: the truth, then both models' predictions, coloured right or wrong."""
    captions = []
    for i in picks:
        t, a, b = int(pa.targets[ia[i]]), int(pa.preds[ia[i]]), int(pb.preds[ib[i]])
        captions.append(
            [
                Caption(f"truth: {names[t]}"),
                Caption(f"{baseline}: {names[a]}", a == t),
                Caption(f"{candidate}: {names[b]}", b == t),
            ]
        )
    return captions


def disagreement_gallery(r: RunResults, baseline: str, candidate: str, pa: Predictions, pb: Predictions) -> Picture:
    """Test images where `baseline` and `candidate` disagree, captioned with the truth and both predictions."""
    pair = align(pa, pb)
    if pair is None:
        return Picture(notes=["The two prediction files do not cover the same test images; no gallery."])
    ia, ib = pair
    picks = _pick_disagreements(pa, pb, ia, ib, GALLERY_SIZE)
    if not picks:
        return Picture(notes=[f"{baseline} and {candidate} agree on every test image."])
    n_diff = int((pa.preds[ia] != pb.preds[ib]).sum())
    images = open_test_images(r.dataset, [pa.files[ia[i]] for i in picks])
    if images is None:
        return Picture(notes=[_missing_images(r)])
    captions = _disagreement_captions(r.dataset.class_names, baseline, candidate, pa, pb, ia, ib, picks)
    note = f"{len(picks)} of the {n_diff} test images where they disagree (green: right, red: wrong)."
    return Picture(plots.gallery(images, captions), [note])


def _pick_explain_images(preds: Predictions, k: int) -> list[int]:
    """Up to `k` test images of different classes, chosen reproducibly."""
    rng = np.random.default_rng(0)
    order = rng.permutation(len(preds.files))
    picks, seen = [], set()
    for i in order:
        if int(preds.targets[i]) not in seen:
            picks.append(int(i))
            seen.add(int(preds.targets[i]))
        if len(picks) == k:
            break
    return picks


def what_they_look_at(r: RunResults, run_dir: Path, preds: dict[str, Predictions]) -> Picture:
    """Attention rollout (ViT family) or Grad-CAM (CNNs) for a few test images, one row per model."""
    from visionpoc.serving.loading import load_trained  # imports the model stack only when this section runs

    ok = [m for m in r.models if m.status == "ok" and m.label in preds]
    if not ok:
        return Picture(notes=["No model has test predictions; nothing to explain."])
    ref = preds[ok[0].label]
    picks = _pick_explain_images(ref, EXPLAIN_SIZE)
    if test_split_root(r.dataset) is None or any(test_image_path(r.dataset, ref.files[i]) is None for i in picks):
        return Picture(notes=[_missing_images(r)])
    paths = [test_image_path(r.dataset, ref.files[i]) for i in picks]
    originals = [load_rgb(p) for p in paths if p is not None]
    names = r.dataset.class_names
    rows = [("test image", originals, [Caption(f"truth: {names[int(ref.targets[i])]}") for i in picks])]
    notes = []
    for m in ok:
        if m.onnx:  # a deployed file is scored as it is: no PyTorch module to take gradients or attention from
            notes.append(f"{m.label}: a deployed model (ONNX), scored as it is; no saliency map.")
            continue
        try:
            tm = load_trained(run_dir, m.label, r)
        except Exception as e:  # missing weights, a changed timm, a corrupt file: say so and go on
            log.warning("cannot load %s for the saliency maps: %s", m.label, e)
            notes.append(f"{m.label}: could not load the trained model ({type(e).__name__}: {e}); no map.")
            continue
        transform = eval_transform(tm.data_config)
        shown, caps, method = [], [], ""
        try:
            for img, i in zip(originals, picks, strict=True):
                x = transform(img).unsqueeze(0)  # (1, 3, H, W)
                with torch.no_grad():
                    pred = int(tm.model(x).argmax(1).item())
                heat, method = explain(tm.model, x)
                shown.append(overlay(to_pil(x, tm.data_config["mean"], tm.data_config["std"]), heat))
                caps.append(Caption(f"predicts {names[pred]}", pred == int(ref.targets[i])))
        except Exception as e:  # an architecture neither method handles
            log.warning("saliency for %s failed: %s", m.label, e)
            notes.append(f"{m.label}: no saliency map ({type(e).__name__}: {e}).")
            continue
        rows.append((f"{m.label}\n({method})", shown, caps))
        notes.append(f"{m.label}: {method}, on the {tm.data_config['input_size'][-1]} px crop the model sees.")
    if len(rows) == 1:
        return Picture(notes=notes)
    return Picture(plots.image_grid(rows), notes)
