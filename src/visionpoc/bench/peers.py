"""The benchmark's peers: a plain training step on one synthetic batch, the logic copied from the peer
anchor (`shared/bench/peer_anchor.py`, which does not ship with the package).

- timm: our models (`build_model`) in a plain fwd+bwd+AdamW step, bf16 autocast and fused AdamW on
  CUDA, eager and, on CUDA, `torch.compile`d.
- HF transformers: `ViTForImageClassification` (SDPA) in the same step, eager.
Figures exclude warm-up, which is reported apart.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from visionpoc.bench.workload import NUM_CLASSES, Plan, Spec, timed
from visionpoc.models import is_transformer


def hf_vit(spec: Spec) -> nn.Module:
    """HF transformers' ViT-B/16 for `spec` (a 2-layer toy when `spec.kwargs["smoke"]`)."""
    from transformers import ViTConfig, ViTForImageClassification

    small: dict[str, Any] = (
        {
            "image_size": spec.size,
            "num_hidden_layers": 2,
            "hidden_size": 192,
            "intermediate_size": 768,
            "num_attention_heads": 3,
        }
        if spec.kwargs["smoke"]
        else {}
    )
    settings: dict[str, Any] = {"num_labels": NUM_CLASSES, "attn_implementation": "sdpa", **small}
    return ViTForImageClassification(ViTConfig(**settings))


def peer_step(
    spec: Spec, make: Callable[[Spec], nn.Module], device: torch.device, p: Plan, compile_: bool = False
) -> dict[str, Any]:
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

    warm = timed(lambda: steps(p.warm), device)
    t = timed(lambda: steps(p.steps), device)
    return {
        "name": spec.label,
        "compile": compile_,
        "bs": spec.batch,
        "size": spec.size,
        "warmup_s": warm,
        "img_s": spec.batch * p.steps / t,
        "trainable": sum(q.numel() for q in params),
    }
