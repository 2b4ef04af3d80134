"""`python -m visionpoc ...` for the torchrun tests, recording what each process did.

Run as `torchrun ... tests/ddp_probe.py <visionpoc arguments>`. Each rank writes
`$PROBE_DIR/rank<R>.json` (outside the run folder) with:
- `writes`: every path under `$PROBE_WATCH` this process opened for writing, created, renamed,
  removed or made a folder of (a `sys.addaudithook` hook: Python and os-level calls, so also the temp
  files that safetensors writes into);
- `first_step`: digests of its random streams (torch, Python, NumPy) and of its model's weights when
  its first training step starts.
`PROBE_PRUNE=N` makes rank 0's Optuna prune trial N after its first reported epoch.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import sys
from pathlib import Path
from typing import Any

WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
EVENTS = {"os.rename": 0, "os.remove": 0, "os.mkdir": 0, "os.rmdir": 0, "os.truncate": 0, "os.chmod": 0}
seen: list[tuple[str, Any]] = []


def audit(event: str, args: tuple[Any, ...]) -> None:
    if event == "open":
        path, _, flags = args
        if isinstance(path, (str, bytes, os.PathLike)) and isinstance(flags, int) and flags & WRITE_FLAGS:
            seen.append((event, path))
    elif event in EVENTS:
        seen.append((event, args[EVENTS[event]]))
        if event == "os.rename":
            seen.append((event, args[1]))


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


def main() -> int:
    import numpy as np
    import torch

    from visionpoc import train
    from visionpoc.checkpoint import unwrap
    from visionpoc.cli import main as cli_main

    record: dict[str, Any] = {}
    real_step = train.train_step

    def probe_step(p, x, y, where):  # type: ignore[no-untyped-def]
        if "first_step" not in record:
            weights = b"".join(t.detach().cpu().numpy().tobytes() for t in unwrap(p.model).state_dict().values())
            record["first_step"] = {
                "torch": digest(torch.get_rng_state().numpy().tobytes()),
                "python": digest(repr(random.getstate()).encode()),
                "numpy": digest(np.random.get_state()[1].tobytes()),
                "weights": digest(weights),
            }
        return real_step(p, x, y, where)

    train.train_step = probe_step
    prune = os.environ.get("PROBE_PRUNE")
    if prune is not None and os.environ.get("RANK") == "0":
        import optuna

        optuna.trial.Trial.should_prune = lambda self: self.number == int(prune)  # type: ignore[method-assign]
    watch = os.path.abspath(os.environ["PROBE_WATCH"])
    sys.addaudithook(audit)
    try:
        return cli_main(sys.argv[1:])
    finally:
        paths = {os.path.abspath(os.fsdecode(p)) for _, p in seen}
        record["writes"] = sorted(p for p in paths if p == watch or p.startswith(watch + os.sep))
        out = Path(os.environ["PROBE_DIR"]) / f"rank{os.environ.get('RANK', '0')}.json"
        out.write_text(json.dumps(record))


if __name__ == "__main__":
    raise SystemExit(main())
