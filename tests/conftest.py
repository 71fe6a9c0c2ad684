"""Test configuration.

--triton-interpret sets TRITON_INTERPRET=1 before anything imports triton, so Triton kernels run on CPU.
Tests that need a real GPU carry the `cuda` marker and are skipped when none is present.
"""

import os

import pytest


def pytest_addoption(parser):
    parser.addoption("--triton-interpret", action="store_true",
                     help="run Triton kernels on CPU through TRITON_INTERPRET=1")


def pytest_configure(config):
    if config.getoption("--triton-interpret"):
        os.environ["TRITON_INTERPRET"] = "1"


def pytest_collection_modifyitems(config, items):
    import torch

    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs a CUDA GPU")
        for item in items:
            if "cuda" in item.keywords:
                item.add_marker(skip)
