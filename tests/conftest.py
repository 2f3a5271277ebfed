import os
import random
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from tiny import build_model  # noqa: E402

#: the global RNGs' seed of every test (replay or vary a run with MEZO_TEST_SEED=N)
SEED = int(os.environ.get("MEZO_TEST_SEED", "0"))


def pytest_collection_modifyitems(config, items):
    """``@pytest.mark.gpu`` tests need CUDA: skipped where there is none, so the CPU
    suite stays green and ``pytest -m gpu`` on the GPU host runs exactly them."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="gpu: needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def seeded_global_rngs():
    """random, numpy and torch start every test from SEED, printed (shown with a
    failure), so a test that draws from them can be replayed."""
    print(f"seed {SEED} (global RNGs; MEZO_TEST_SEED)")
    random.seed(SEED)
    np.random.seed(SEED)
    torch.manual_seed(SEED)


@pytest.fixture(autouse=True, scope="session")
def one_torch_thread():
    """Tiny models gain nothing from intra-op threads, and on a shared 2-core
    machine OpenMP's spinning makes their forwards ~3x slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory):
    return build_model(tmp_path_factory.mktemp("tiny-llama"), "llama")


@pytest.fixture(scope="session")
def tiny_gpt2(tmp_path_factory):
    return build_model(tmp_path_factory.mktemp("tiny-gpt2"), "gpt2")


@pytest.fixture
def fresh_registry():
    """The installed plugins, loaded anew for the test (a test may register its own)."""
    from mezo_core.registry import get_registry
    get_registry.cache_clear()
    yield get_registry()
    get_registry.cache_clear()


@pytest.fixture
def install_plugin(tmp_path, monkeypatch):
    """``install(module, dist, version, source, entry)``: a fake installed distribution,
    <site>/<module>.py and <site>/<module>-<version>.dist-info/{METADATA,entry_points.txt},
    found through the ``mezo`` entry-point group like a package pip installed."""
    import sys
    from mezo_core.registry import get_registry
    installed = []

    def install(module, dist, version, source, entry):
        site = tmp_path / f"site-{module}"
        site.mkdir()
        (site / f"{module}.py").write_text(source)
        info = site / f"{module}-{version}.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
        (info / "entry_points.txt").write_text(f"[mezo]\n{entry} = {module}\n")
        (info / "RECORD").write_text("")
        monkeypatch.syspath_prepend(str(site))
        sys.modules.pop(module, None)
        installed.append(module)
        get_registry.cache_clear()
        return site

    yield install
    get_registry.cache_clear()
    for module in installed:
        sys.modules.pop(module, None)
