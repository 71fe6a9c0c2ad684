"""Test configuration.

--triton-interpret sets TRITON_INTERPRET=1 before anything imports triton, so Triton kernels run on CPU.
Tests that need a real GPU carry the `cuda` marker and are skipped when none is present.
Every test starts from its own fixed random state (torch, random, numpy), derived from its node id, so a
result never depends on which tests ran before it; SPARSEKIT_TEST_SEED=<int> shifts every seed, to run the
suite under other random draws.
"""

import os
import random
import zlib

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


@pytest.fixture(autouse=True)
def _seed_per_test(request):
    import torch

    seed = (zlib.crc32(request.node.nodeid.encode()) + int(os.environ.get("SPARSEKIT_TEST_SEED", "0"))) % 2**31
    torch.manual_seed(seed)
    random.seed(seed)
    try:
        import numpy
    except ImportError:
        return
    numpy.random.seed(seed)
