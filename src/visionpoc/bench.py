"""The benchmark of issue 3: the peers and our code measured side by side in one process on one device.

- `peer`: timm's plain training step on synthetic tensors (bf16 autocast and fused AdamW on CUDA), eager
  and, on CUDA, `torch.compile`d; logic copied from the peer anchor (`shared/bench/peer_anchor.py`,
  which does not ship with the package).
- `hf`: HF transformers `ViTForImageClassification` (SDPA), eager, when `transformers` is installed.
- `input`: images/s of the input path alone on Stanford-Dogs-sized JPEGs (500x375) written by the bench:
  the stream path's PIL DataLoader vs the prepared store + `gpu_aug` (the store's build timed apart).
- `ours`: our loop's `train_one_epoch` (compiled on CUDA, channels_last CNNs, label smoothing,
  clipping) fed from the prepared store vs fed one synthetic batch already on the device; their ratio
  is the input path's efficiency (issue target: >= 0.95 on the GPU).
Figures exclude warm-up (compilation, autotuning, worker start-up), which is reported apart. Only ratios
from one run mean something: a throughput from another run or day is not comparable.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import itertools
import json
import logging
import os
import platform
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import timm
import timm.optim
import timm.scheduler
import torch
from torch import nn

from visionpoc import models
from visionpoc.atomic import atomic_write_json
from visionpoc.config import ModelConfig
from visionpoc.data.loaders import ImageDataset, train_transform
from visionpoc.data.prepared import PreparedStore, place, prepare_store, split_batches
from visionpoc.data.prepared import train_transform as store_transform
from visionpoc.data.sources import Split
from visionpoc.recovery import StopRequest
from visionpoc.results import environment
from visionpoc.step import StepParts
from visionpoc.timing import sync
from visionpoc.train import EpochProgress, is_transformer, train_one_epoch

log = logging.getLogger(__name__)

NUM_CLASSES = 120  # Stanford Dogs
SECTIONS = ("peer", "hf", "input", "ours")
TARGETS = {"vit_b16 img/s": 3400, "vit_b16 vs timm compiled": 1.05, "vit_b16 vs hf": 1.35,
           "xception_top10 img/s": 3700, "xception_full img/s": 2100,
           "input efficiency": 0.95}  # fmt: skip  # issue 3: one H100, end to end
Batch = tuple[torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class Spec:
    label: str
    timm: str
    finetune: str  # "full" or "top_fraction" (top 10% of convs)
    size: int
    batch: int
    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Plan:
    specs: tuple[Spec, ...]
    n_images: int
    store_size: int
    steps: int
    warm: int
    workers: int


def plan(smoke: bool) -> Plan:
    if smoke:  # toy sizes: checks the code on a CPU in seconds
        vit = Spec("vit_b16", "vit_tiny_patch16_224", "full", 32, 4, {"depth": 2})
        cnn = Spec("xception_top10", "legacy_xception", "top_fraction", 48, 2)
        return Plan((vit, cnn), n_images=32, store_size=48, steps=2, warm=1, workers=0)
    return Plan((Spec("vit_b16", "vit_base_patch16_224", "full", 224, 256),
                 Spec("xception_top10", "legacy_xception", "top_fraction", 299, 128),
                 Spec("xception_full", "legacy_xception", "full", 299, 128)),
                n_images=2048, store_size=320, steps=20, warm=5, workers=min(16, os.cpu_count() or 1))  # fmt: skip


def _timed(fn: Callable[[], Any], device: torch.device) -> float:
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def _build(spec: Spec) -> nn.Module:
    mcfg = ModelConfig(label=spec.label, timm=spec.timm, pretrained=False, finetune=spec.finetune,  # type: ignore[arg-type]
                       fraction=0.1, img_size=spec.size, model_kwargs=spec.kwargs)  # fmt: skip
    model = models.create_model(mcfg, NUM_CLASSES)
    models.apply_finetune(model, mcfg)
    return model


def _hf_vit(spec: Spec) -> nn.Module:
    from transformers import ViTConfig, ViTForImageClassification

    small = {"image_size": spec.size, "num_hidden_layers": 2, "hidden_size": 192, "intermediate_size": 768,
             "num_attention_heads": 3} if spec.kwargs["smoke"] else {}  # fmt: skip
    return ViTForImageClassification(ViTConfig(num_labels=NUM_CLASSES, attn_implementation="sdpa", **small))


def peer_step(spec: Spec, make: Callable[[Spec], nn.Module], device: torch.device, p: Plan,
              compile_: bool = False) -> dict[str, Any]:  # fmt: skip
    """A plain fwd+bwd+AdamW step on one synthetic batch (peer_anchor.py's `bench`)."""
    model = make(spec).to(device)
    cl = device.type == "cuda" and not (is_transformer(model) or spec.label.startswith("hf"))  # CNNs only
    if cl:
        model = model.to(memory_format=torch.channels_last)
    params = [q for q in model.parameters() if q.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, fused=device.type == "cuda")
    m = torch.compile(model) if compile_ else model
    x = torch.randn(spec.batch, 3, spec.size, spec.size, device=device)  # (B, 3, H, W)
    x = x.contiguous(memory_format=torch.channels_last) if cl else x
    y = torch.randint(0, NUM_CLASSES, (spec.batch,), device=device)  # (B,)
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    def steps(k: int) -> None:
        for _ in range(k):
            with amp:
                out = m(x)
                loss = nn.functional.cross_entropy(getattr(out, "logits", out), y)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

    warm = _timed(lambda: steps(p.warm), device)
    t = _timed(lambda: steps(p.steps), device)
    return {"name": spec.label, "compile": compile_, "bs": spec.batch, "size": spec.size, "warmup_s": warm,
            "img_s": spec.batch * p.steps / t, "trainable": sum(q.numel() for q in params)}  # fmt: skip


def write_jpegs(folder: Path, n: int, size: tuple[int, int] = (500, 375), workers: int = 1) -> Split:
    """`n` noisy-gradient JPEGs of Stanford Dogs' typical size (~100 KB at quality 90, as peer_anchor.py)."""
    from PIL import Image

    w, h = size
    base = np.linspace(0, 255, w)[None, :, None] * np.ones((h, 1, 3))  # (H, W, 3)

    def write(i: int) -> None:
        noise = np.random.default_rng([0, i]).integers(-40, 40, (h, w, 3))
        Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8)).save(folder / f"{i}.jpg", quality=90)

    with ThreadPoolExecutor(max(1, workers)) as pool:  # PIL encodes without the GIL
        list(pool.map(write, range(n)))
    labels = np.random.default_rng(0).integers(0, NUM_CLASSES, n).astype(np.int64)
    return Split(folder, [f"{i}.jpg" for i in range(n)], labels)


def _pass(batches: Iterable[Batch], device: torch.device) -> tuple[float, float]:
    """(img/s after the first batch, seconds to the first batch) over one pass of `batches`."""
    t0, n, first, t1 = time.perf_counter(), 0, 0.0, 0.0
    for i, (x, _) in enumerate(batches):
        x = x.to(device, non_blocking=True)
        if i == 0:
            sync(device)
            t1 = time.perf_counter()
            first = t1 - t0
        else:
            n += len(x)
    sync(device)
    return n / max(time.perf_counter() - t1, 1e-9), first


def input_path(
    split: Split, dcfg: dict[str, Any], p: Plan, device: torch.device, cache: Path
) -> dict[str, Any]:
    bs, paths = p.specs[0].batch, [split.path(i) for i in range(len(split))]
    pil = torch.utils.data.DataLoader(ImageDataset(split, train_transform(dcfg)), batch_size=bs, shuffle=True,
                                      num_workers=p.workers, pin_memory=device.type == "cuda")  # fmt: skip
    pil_img_s, pil_first = _pass(pil, device)
    store = prepare_store(paths, p.store_size, cache, workers=p.workers)
    images = place(store.images, device)
    fast = split_batches(store, images, split, store_transform(dcfg), bs, device, train=True)
    _pass(fast, device)  # warm-up: kernels, page cache
    img_s, first = _pass(fast, device)
    return {"n_images": len(split), "batch": bs, "input_size": dcfg["input_size"],
            "jpeg_kib": round(sum(os.path.getsize(q) for q in paths) / len(paths) / 1024, 1),
            "pil": {"img_s": pil_img_s, "first_batch_s": pil_first, "workers": p.workers},
            "prepared": {"img_s": img_s, "first_batch_s": first, "store_size": p.store_size, "build_s": store.build_s,
                         "build_img_s": len(paths) / max(store.build_s, 1e-9),
                         "resident": isinstance(images, torch.Tensor)},
            "ratio_prepared_vs_pil": img_s / pil_img_s}  # fmt: skip


class _Batches:
    """`steps` batches cycled from `source` (a one-batch list, or a StoreBatches' successive epochs)."""

    def __init__(self, steps: int, source: Iterable[Batch]) -> None:
        self.steps, self.source = steps, source

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[Batch]:
        return itertools.islice(itertools.chain.from_iterable(itertools.repeat(self.source)), self.steps)


def ours(spec: Spec, store: PreparedStore, images: torch.Tensor | np.ndarray, split: Split, p: Plan,
         device: torch.device) -> dict[str, Any]:  # fmt: skip
    """Our loop's img/s fed by the prepared store and by a synthetic batch already on the device."""
    model = _build(spec).to(device)
    dcfg = models.data_config(model, ModelConfig(label=spec.label, timm=spec.timm, img_size=spec.size))
    cl = device.type == "cuda" and not is_transformer(model)
    if cl:
        model = model.to(memory_format=torch.channels_last)
    step_model: nn.Module = torch.compile(model) if device.type == "cuda" else model  # type: ignore[assignment]
    fused: dict[str, Any] = {"fused": True} if device.type == "cuda" else {}
    opt = timm.optim.create_optimizer_v2(model, opt="adamw", lr=1e-4, weight_decay=0.05, **fused)
    sched = timm.scheduler.CosineLRScheduler(opt, t_initial=10**6, t_in_epochs=False)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=0.1)
    dtype = torch.bfloat16 if device.type == "cuda" else None
    synthetic = [(torch.randn(spec.batch, *dcfg["input_size"], device=device),  # (B, 3, H, W)
                  torch.randint(0, NUM_CLASSES, (spec.batch,), device=device))]  # fmt: skip
    fed = split_batches(store, images, split, store_transform(dcfg), spec.batch, device, train=True)
    parts, stop, step = StepParts(step_model, opt, sched, loss_fn, device, dtype, 1.0, cl), StopRequest(), 0

    def run(batches: Iterable[Batch], k: int) -> None:
        nonlocal step
        _, step, _ = train_one_epoch(parts, _Batches(k, batches), 1, step, EpochProgress(), stop)

    warm = _timed(lambda: run(synthetic, p.warm), device)
    run(fed, 1)  # the augmentation's first call
    t_syn = _timed(lambda: run(synthetic, p.steps), device)
    t_store = _timed(lambda: run(fed, p.steps), device)
    return {"name": spec.label, "timm": spec.timm, "finetune": spec.finetune, "bs": spec.batch, "size": spec.size,
            "compile": device.type == "cuda", "warmup_s": warm, "synthetic_img_s": spec.batch * p.steps / t_syn,
            "prepared_img_s": spec.batch * p.steps / t_store, "input_efficiency": t_syn / t_store}  # fmt: skip


def _guarded(name: str, fn: Callable[..., dict[str, Any]], *args: Any) -> dict[str, Any]:
    try:
        return fn(*args)
    except Exception as e:  # keep measuring the rest, as the peer anchor does
        log.error("bench %s failed: %s: %s", name, type(e).__name__, e)
        return {"name": name, "error": f"{type(e).__name__}: {e}"[:400]}
    finally:
        torch._dynamo.reset()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def _environment(device: torch.device, smoke: bool) -> dict[str, Any]:
    env = dataclasses.asdict(environment(str(device), seed=0))
    cpu = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    model = next(
        (ln.split(":", 1)[1].strip() for ln in cpu.splitlines() if ln.startswith("model name")), None
    )
    name = env["gpu_name"] or model or platform.processor() or platform.machine()
    return env | {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "smoke": smoke,
        "device_name": name,
    }


def run_bench(smoke: bool, device: str = "auto", out: Path | None = None,
              sections: Sequence[str] | None = None) -> dict[str, Any]:  # fmt: skip
    """Measure the peers and our input path and step on one device; write JSON to `out` if given
    (after every figure, so a run cut short keeps what it measured).

    `sections` picks among SECTIONS; by default all of them, except on a CPU without `smoke`, where
    only `input` runs (the model steps measure a GPU)."""
    dev = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device)
    p = plan(smoke)
    chosen = (
        tuple(sections) if sections is not None else SECTIONS if smoke or dev.type == "cuda" else ("input",)
    )
    why = "not asked for" if sections is not None else "model steps measure a GPU; try --smoke"
    res: dict[str, Any] = {"environment": _environment(dev, smoke), "input": None, "ours": [], "peer": [],
                           "hf": [], "ratios": {}, "skipped": {s: why for s in SECTIONS if s not in chosen}}  # fmt: skip

    def save() -> None:
        res["ratios"] = ratios(res)
        if not smoke and dev.type == "cuda":
            res["targets"] = targets(res)
        if out is not None:
            atomic_write_json(out, json.loads(json.dumps(res, default=list)))

    def record(section: str, figure: dict[str, Any]) -> None:
        res[section] = figure if section == "input" else [*res[section], figure]
        save()

    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory(prefix="visionpoc-bench-") as tmp:
        if "input" in chosen or "ours" in chosen:
            (Path(tmp) / "jpg").mkdir()
            split = write_jpegs(Path(tmp) / "jpg", p.n_images, workers=os.cpu_count() or 1)
            paths = [split.path(i) for i in range(len(split))]
        if "input" in chosen:
            pcfg = timm.models.get_pretrained_cfg(p.specs[0].timm)
            dcfg = timm.data.resolve_data_config({}, pretrained_cfg=pcfg.to_dict() if pcfg else {})
            dcfg["input_size"] = (3, p.specs[0].size, p.specs[0].size)
            record("input", _guarded("input", input_path, split, dcfg, p, dev, Path(tmp)))
        if "ours" in chosen:
            store = prepare_store(paths, p.store_size, Path(tmp), p.workers)
            images = place(store.images, dev)
            for s in p.specs:
                record("ours", _guarded(s.label, ours, s, store, images, split, p, dev))
            del images
    if "peer" in chosen:  # eager first; compiled for full fine-tuning only (the anchor's choice, saves time)
        runs = [(s, False) for s in p.specs] + [
            (s, True) for s in p.specs if dev.type == "cuda" and s.finetune == "full"
        ]
        for s, c in runs:
            record("peer", _guarded(s.label, peer_step, s, _build, dev, p, c))
    if "hf" in chosen:
        try:
            import transformers  # noqa: F401
        except ImportError:
            res["skipped"]["hf"] = "transformers is not installed"
        else:
            hf = Spec("hf_vit", "transformers", "full", p.specs[0].size, p.specs[0].batch, {"smoke": smoke})
            record("hf", _guarded("hf_vit", peer_step, hf, _hf_vit, dev, p))
    save()
    return res


def ratios(res: dict[str, Any]) -> dict[str, float]:
    """The figures that mean something across runs: ratios measured in one process."""
    r = {"input prepared/pil": res["input"]["ratio_prepared_vs_pil"]} if "pil" in (res["input"] or {}) else {}
    peers = {(m["name"], m["compile"]): m["img_s"] for m in res["peer"] + res["hf"] if "img_s" in m}
    for i, m in enumerate(m for m in res["ours"] if "prepared_img_s" in m):
        r[f"{m['name']} input efficiency"] = m["input_efficiency"]
        versus = [((m["name"], False), "timm eager"), ((m["name"], True), "timm compiled")]
        for key, peer in versus + ([(("hf_vit", False), "hf")] if i == 0 else []):
            if key in peers:
                r[f"{m['name']} vs {peer}"] = m["prepared_img_s"] / peers[key]
    return r


def targets(res: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Issue 3's targets against this run's figures (meaningful on an H100 only)."""
    got = {f"{m['name']} img/s": m["prepared_img_s"] for m in res["ours"] if "prepared_img_s" in m}
    got |= {k: v for k, v in res["ratios"].items() if k in TARGETS}
    eff = [v for k, v in res["ratios"].items() if k.endswith("input efficiency")]
    got["input efficiency"] = min(eff) if eff else None
    return {
        k: {"target": t, "measured": got.get(k), "met": (got.get(k) or 0) >= t} for k, t in TARGETS.items()
    }


def _cell(v: float | None) -> str:
    return f"{'-' if v is None else f'{v:.1f}':>12}"


def format_bench(d: dict[str, Any]) -> str:
    """A plain-text summary of `run_bench`'s result."""
    env, inp = d["environment"], d["input"] or {}
    smoke = " [smoke: toy sizes]" if env["smoke"] else ""
    lines = [f"visionpoc bench, {env['device_name']} ({env['device']}), torch {env['torch']}, timm {env['timm']}, "
             f"{env['date']}{smoke}"]  # fmt: skip
    if "pil" in inp:
        pil, pr = inp["pil"], inp["prepared"]
        where = "on the device" if pr["resident"] else "from host memory"
        lines += [f"input path: {inp['n_images']} JPEGs 500x375 ({inp['jpeg_kib']} KiB), batch {inp['batch']}, "
                  f"random-resized-crop to {inp['input_size'][-1]}px",
                  f"  PIL DataLoader, {pil['workers']} workers {pil['img_s']:10.1f} img/s",
                  f"  prepared store + gpu_aug   {pr['img_s']:10.1f} img/s ({where}; built once in "
                  f"{pr['build_s']:.1f}s = {pr['build_img_s']:.0f} img/s)"]  # fmt: skip
    lines += [
        f"{m['name']}: FAILED {m['error']}" for m in [inp, *d["ours"], *d["peer"], *d["hf"]] if "error" in m
    ]
    peers = {(m["name"], m["compile"]): m["img_s"] for m in d["peer"] + d["hf"] if "img_s" in m}
    names = list(dict.fromkeys(m["name"] for m in d["ours"] + d["peer"] if "error" not in m))
    if names:
        heads = ("ours+store", "ours synth", "timm eager", "timm comp.", "hf eager")
        lines.append(f"{'train img/s':<15}" + "".join(f"{h:>12}" for h in heads))
    for n in names:
        o: dict[str, Any] = next((m for m in d["ours"] if m["name"] == n and "error" not in m), {})
        hf = peers.get(("hf_vit", False)) if n == names[0] else None
        cells = (
            o.get("prepared_img_s"),
            o.get("synthetic_img_s"),
            peers.get((n, False)),
            peers.get((n, True)),
            hf,
        )
        lines.append(f"{n:<15}" + "".join(_cell(c) for c in cells))
    lines += [f"ratio {k}: {v:.3f}" for k, v in d["ratios"].items()]
    for k, t in d.get("targets", {}).items():
        got = "-" if t["measured"] is None else f"{t['measured']:.2f}"
        lines.append(f"target {k} >= {t['target']}: {got} {'met' if t['met'] else 'NOT MET'}")
    return "\n".join(lines + [f"skipped {k}: {v}" for k, v in d["skipped"].items()])
