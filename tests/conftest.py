"""Shared, generic fixtures: generated images on disk and the ``salient`` CLI run in-process."""

from __future__ import annotations

import io
import os
import traceback
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import pytest
from click.testing import CliRunner, Result


@pytest.fixture(autouse=True, scope="session")
def _isolated_settings(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """A developer's SALIENT_* variables must not leak into the tests' settings (session-wide, so that
    module-scoped fixtures running the CLI see a clean environment too). Local files are readable under
    the session's temporary folder only, where every test writes its images (workers inherit this)."""
    with pytest.MonkeyPatch.context() as patch:
        for name in list(os.environ):
            if name.startswith("SALIENT_"):
                patch.delenv(name)
        patch.setenv("SALIENT_FILE_ROOTS", str(tmp_path_factory.getbasetemp()))
        yield


def _smooth_rgb(height: int, width: int, seed: int = 0) -> np.ndarray:
    """H×W×3 uint8 picture of smooth gradients plus mild noise: survives JPEG well, and differs per seed."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    phase = rng.uniform(0, 2 * np.pi, size=3)
    channels = [127 + 100 * np.sin(xx / (7 + 3 * c) + yy / (11 + c) + phase[c]) for c in range(3)]
    noisy = np.stack(channels, axis=-1) + rng.normal(0, 4, size=(height, width, 3))
    return noisy.clip(0, 255).astype(np.uint8)


def _encode(pixels: np.ndarray, fmt: str, **options) -> bytes:
    """Bytes of ``pixels`` (uint8 or uint16, H×W or H×W×C) saved by Pillow in ``fmt``."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, fmt, **options)
    return buf.getvalue()


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """For modules of many tiny forwards: on a busy two-core machine torch's second thread only spins."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def smooth_rgb() -> Callable[..., np.ndarray]:
    """The picture generator: ``smooth_rgb(height, width, seed=0)``."""
    return _smooth_rgb


@pytest.fixture(scope="session")
def encode_image() -> Callable[..., bytes]:
    """The encoder: ``encode_image(pixels, "PNG", **pillow_options)``."""
    return _encode


@pytest.fixture(scope="session")
def tiny_images(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """Factory: ``tiny_images(n, size=(h, w), folder="images")`` writes n distinct small images (PNG, JPEG and
    WebP in turn, so formats are mixed) into a new folder and returns it. Session-scoped, so module-scoped
    fixtures can use it; every call gets its own folder."""

    def make(n: int = 4, size: tuple[int, int] = (48, 64), folder: str = "images") -> Path:
        out = tmp_path_factory.mktemp(folder)
        formats = [("png", "PNG", {}), ("jpg", "JPEG", {"quality": 95}), ("webp", "WEBP", {"lossless": True})]
        for i in range(n):
            suffix, fmt, options = formats[i % len(formats)]
            (out / f"img{i:03d}.{suffix}").write_bytes(_encode(_smooth_rgb(*size, seed=i), fmt, **options))
        return out

    return make


@pytest.fixture(scope="session")
def run_cli() -> Callable[..., Result]:
    """Run ``salient ARGS`` in-process; fails the test with the output when the exit code is unexpected."""
    from salient_maps.producer.cli import main

    def invoke(args: list[str], expect_exit: int = 0) -> Result:
        result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=True)
        if result.exit_code != expect_exit:
            detail = "".join(traceback.format_exception(*result.exc_info)) if result.exc_info else ""
            pytest.fail(f"salient {' '.join(map(str, args))} exited {result.exit_code}, expected {expect_exit}:\n"
                        f"{result.output}\n{detail}")
        return result

    return invoke
