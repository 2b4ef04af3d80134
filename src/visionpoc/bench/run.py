"""The training benchmark (`visionpoc bench`): the peers and our code measured side by side in one
process on one device. This module runs the sections, records their figures, and turns them into the
ratios, the targets for one H100 and a text summary. The measurements live in `bench/peers.py` and
`bench/ours.py`, the workload they share in `bench/workload.py`.

- `peer`: timm's plain training step on synthetic tensors (bf16 autocast and fused AdamW on CUDA), eager
  and, on CUDA, `torch.compile`d; logic copied from the peer anchor (`shared/bench/peer_anchor.py`,
  which does not ship with the package).
- `hf`: HF transformers `ViTForImageClassification` (SDPA), eager, when `transformers` is installed.
- `input`: images/s of the input path alone on Stanford-Dogs-sized JPEGs (500x375) written by the bench:
  the stream path's PIL DataLoader vs the prepared store + `gpu_aug` (the store's build timed apart).
- `ours`: our loop's `train_one_epoch` (compiled on CUDA, channels_last CNNs, label smoothing,
  clipping) fed from the prepared store vs fed one synthetic batch already on the device; their ratio
  is the input path's efficiency (target: >= 0.95 on the GPU). Measured last, the plan's
  `variants` (ViT-B/16 at batch 512): does a batch that fills the GPU beat the peers' (batch 256)?
- `probe`: a 10-epoch linear probe through the backbone vs from cached features (`bench/linear_probe.py`);
  runs on the CPU too.
- `plain`: our loop (`fit`'s path) vs the plainest correct PyTorch loop on the same real photos, model,
  batch, workers and augmentation, `full` and `head` (`bench/plain.py`); runs on the CPU too.
Figures exclude warm-up (compilation, autotuning, worker start-up), which is reported apart. Only ratios
from one run mean something: a throughput from another run or day is not comparable.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import logging
import os
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import timm
import torch

from visionpoc.bench.linear_probe import linear_probe
from visionpoc.bench.ours import input_path, ours
from visionpoc.bench.peers import hf_vit, peer_step
from visionpoc.bench.plain import plain_peer
from visionpoc.bench.workload import Plan, Spec, build_model, plan, write_jpegs
from visionpoc.data.prepared import prepare_store
from visionpoc.data.store_batches import place
from visionpoc.errors import ConfigError
from visionpoc.results import cpu_name, environment
from visionpoc.runfiles import atomic_write_json

log = logging.getLogger(__name__)

SECTIONS = ("peer", "hf", "input", "ours", "probe", "plain")
CPU_SECTIONS = ("input", "probe", "plain")  # what a CPU measures without --smoke: the model steps measure a GPU
TARGETS = {
    "vit_b16 img/s": 3400,
    "vit_b16 vs timm compiled": 1.05,
    "vit_b16 vs hf": 1.35,
    "xception_top10 img/s": 3700,
    "xception_full img/s": 2100,
    "input efficiency": 0.95,
}  # one H100, end to end


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
    name = env["gpu_name"] or cpu_name()
    return env | {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "smoke": smoke,
        "device_name": name,
    }


def run_bench(
    smoke: bool, device: str = "auto", out: Path | None = None, sections: Sequence[str] | None = None
) -> dict[str, Any]:
    """Measure the peers and our input path and step on one device; write JSON to `out` if given
    (after every figure, so a run cut short keeps what it measured).

    `sections` picks among SECTIONS; by default all of them, except on a CPU without `smoke`, where
    only `input` runs (the model steps measure a GPU)."""
    dev = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device)
    p = plan(smoke)
    chosen = tuple(sections) if sections is not None else SECTIONS if smoke or dev.type == "cuda" else CPU_SECTIONS
    unknown = sorted(set(chosen) - set(SECTIONS))
    if unknown:
        raise ConfigError(f"bench sections {unknown} unknown; choose among {list(SECTIONS)}")
    why = "not asked for" if sections is not None else "model steps measure a GPU; try --smoke"
    res: dict[str, Any] = {
        "environment": _environment(dev, smoke),
        "input": None,
        "ours": [],
        "peer": [],
        "hf": [],
        "probe": None,
        "plain": None,
        "ratios": {},
        "skipped": {s: why for s in SECTIONS if s not in chosen},
    }

    def save() -> None:
        res["ratios"] = ratios(res)
        if not smoke and dev.type == "cuda":
            res["targets"] = targets(res)
        if out is not None:
            atomic_write_json(out, json.loads(json.dumps(res, default=list)))

    def record(section: str, figure: dict[str, Any]) -> None:
        res[section] = figure if section in ("input", "probe", "plain") else [*res[section], figure]
        save()

    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    torch.manual_seed(0)
    # Order: what the target ratios need first, so a run cut short (device time is scarce) keeps them:
    # the HF and eager timm peers, then our loop, then the compiled timm peers, then the PIL input path.
    if "hf" in chosen:
        try:
            import transformers  # noqa: F401
        except ImportError:
            res["skipped"]["hf"] = "transformers is not installed"
        else:
            hf = Spec("hf_vit", "transformers", "full", p.specs[0].size, p.specs[0].batch, {"smoke": smoke})
            record("hf", _guarded("hf_vit", peer_step, hf, hf_vit, dev, p))
    # eager for every spec; compiled for full fine-tuning only, on CUDA (the anchor's choice, saves time)
    compiled = [s for s in p.specs if dev.type == "cuda" and s.finetune == "full"]
    if "peer" in chosen:
        for s in p.specs:
            record("peer", _guarded(s.label, peer_step, s, build_model, dev, p, False))
    _on_jpegs(chosen, compiled, p, dev, record)
    save()
    return res


def _on_jpegs(
    chosen: tuple[str, ...],
    compiled: list[Spec],
    p: Plan,
    dev: torch.device,
    record: Callable[[str, dict[str, Any]], None],
) -> None:
    """The sections that read JPEGs written to a temporary folder (our loop, the input path), and the
    compiled peers between them (in the order `run_bench` explains)."""
    with tempfile.TemporaryDirectory(prefix="visionpoc-bench-") as tmp:
        if "input" in chosen or "ours" in chosen:
            (Path(tmp) / "jpg").mkdir()
            split = write_jpegs(Path(tmp) / "jpg", p.n_images, workers=os.cpu_count() or 1)
            paths = [split.path(i) for i in range(len(split))]
        if "ours" in chosen:
            store = prepare_store(paths, p.store_size, Path(tmp), p.workers)
            images = place(store.images, dev)
            for s in p.specs:
                record("ours", _guarded(s.label, ours, s, store, images, split, p, dev))
        if "peer" in chosen:
            for s in compiled:
                record("peer", _guarded(s.label, peer_step, s, build_model, dev, p, True))
        if "input" in chosen:
            pcfg = timm.models.get_pretrained_cfg(p.specs[0].timm)
            dcfg = timm.data.resolve_data_config({}, pretrained_cfg=pcfg.to_dict() if pcfg else {})
            dcfg["input_size"] = (3, p.specs[0].size, p.specs[0].size)
            cache = Path(tmp) / "input_store"  # not the store `ours` built: its build is timed here
            cache.mkdir()
            record("input", _guarded("input", input_path, split, dcfg, p, dev, cache))
        if "probe" in chosen:
            record("probe", _guarded("linear_probe", linear_probe, p.smoke, dev, Path(tmp)))
        if "plain" in chosen:
            record("plain", _guarded("plain", plain_peer, p.smoke, dev, Path(tmp)))
        if "ours" in chosen:  # last: what the targets need is measured before
            for s in p.variants:
                record("ours", _guarded(s.label, ours, s, store, images, split, p, dev))
            del images


def ratios(res: dict[str, Any]) -> dict[str, float]:
    """The figures that mean something across runs: ratios measured in one process."""
    r = {"input prepared/pil": res["input"]["ratio_prepared_vs_pil"]} if "pil" in (res["input"] or {}) else {}
    if "ratio" in (res.get("probe") or {}):
        r["linear probe cached vs through the backbone"] = res["probe"]["ratio"]
    for c in (res.get("plain") or {}).get("cases", []):
        r[f"{c['finetune']} vs the plain loop"] = c["ratio"]
        r[f"{c['finetune']} vs the plain loop, loops alone"] = c["loop"]["ratio"]
    peers = {(m["name"], m["compile"]): m["img_s"] for m in res["peer"] + res["hf"] if "img_s" in m}
    measured = [m for m in res["ours"] if "prepared_img_s" in m]
    vit = res["ours"][0]["name"] if res["ours"] else None  # the plan's first spec: the ViT, HF's counterpart
    for m in measured:
        r[f"{m['name']} input efficiency"] = m["input_efficiency"]
        base = m.get("peer", m["name"])  # a variant (another batch) is compared with its base's peers
        versus = [((base, False), "timm eager"), ((base, True), "timm compiled")]
        for key, peer in versus + ([(("hf_vit", False), "hf")] if base == vit else []):
            if key in peers:
                r[f"{m['name']} vs {peer}"] = m["prepared_img_s"] / peers[key]
    return r


def targets(res: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The H100 targets against this run's figures (meaningful on an H100 only)."""
    got = {f"{m['name']} img/s": m["prepared_img_s"] for m in res["ours"] if "prepared_img_s" in m}
    got |= {k: v for k, v in res["ratios"].items() if k in TARGETS}
    eff = [v for k, v in res["ratios"].items() if k.endswith("input efficiency")]
    got["input efficiency"] = min(eff) if eff else None
    return {k: {"target": t, "measured": got.get(k), "met": (got.get(k) or 0) >= t} for k, t in TARGETS.items()}


def _cell(v: float | None) -> str:
    return f"{'-' if v is None else f'{v:.1f}':>12}"


def format_bench(d: dict[str, Any]) -> str:
    """A plain-text summary of `run_bench`'s result."""
    env, inp = d["environment"], d["input"] or {}
    smoke = " [smoke: toy sizes]" if env["smoke"] else ""
    lines = [
        f"visionpoc bench, {env['device_name']} ({env['device']}), torch {env['torch']}, timm {env['timm']}, "
        f"{env['date']}{smoke}"
    ]
    if "pil" in inp:
        pil, pr = inp["pil"], inp["prepared"]
        where = "on the device" if pr["resident"] else "from host memory"
        lines += [
            f"input path: {inp['n_images']} JPEGs 500x375 ({inp['jpeg_kib']} KiB), random-resized-crop "
            f"to {inp['input_size'][-1]}px, whole passes after a warm-up one",
            f"  PIL DataLoader, {pil['workers']} workers {pil['img_s']:10.1f} img/s (batch {pil.get('batch', '?')})",
            f"  prepared store + gpu_aug   {pr['img_s']:10.1f} img/s (batch {inp['batch']}; {where}; built once in "
            f"{pr['build_s']:.1f}s = {pr['build_img_s']:.0f} img/s)",
        ]
    lp = d.get("probe") or {}
    if "ratio" in lp:
        lines.append(
            f"linear probe, {lp['model']} at {lp['img_size']}px, {lp['epochs']} epochs on {lp['images']['train']} "
            f"images: through the backbone {lp['through_backbone_s']:.1f}s, cached features {lp['cached_s']:.1f}s"
        )
    pl = d.get("plain") or {}
    for c in pl.get("cases", []):
        lines.append(
            f"our loop vs a plain loop, {c['timm']} {c['finetune']} at {c['size']}px, batch {c['batch']}, "
            f"{c['workers']} workers, {pl['threads']} threads: plain {c['plain_img_s']:.1f} img/s, ours "
            f"{c['ours_img_s']:.1f} img/s (ratio {c['ratio']:.3f}, {c['ratio_min']:.3f}-{c['ratio_max']:.3f}); "
            f"the loops alone on built batches: ratio {c['loop']['ratio']:.3f} "
            f"({c['loop']['ratio_min']:.3f}-{c['loop']['ratio_max']:.3f})"
        )
    failed = [inp, lp, pl, *d["ours"], *d["peer"], *d["hf"]]
    lines += [f"{m['name']}: FAILED {m['error']}" for m in failed if "error" in m]
    lines += [
        f"{m['name']}: out of memory at batch {m['bs']}, measured with micro-batches of {m['micro_batch']}"
        for m in d["ours"]
        if m.get("micro_batch")
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
