"""Shared fixtures and the GPU skip hook for the CPU test suite."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from layerdiff.models.tiny import build_tiny_sdxl


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip ``@pytest.mark.gpu`` tests on machines without CUDA (development and CI)."""
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def tiny_sdxl(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Folder of the embedded tiny SDXL model (seed 0), built once per session; do not modify."""
    return build_tiny_sdxl(tmp_path_factory.mktemp("models") / "tiny-sdxl")
