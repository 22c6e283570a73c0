"""While a round runs with torch on several threads, numpy's OpenBLAS is held to one thread (its
spinning workers would take a core from the next round's training), and given back after."""

from __future__ import annotations

import numpy as np
import pytest
import torch

threadpoolctl = pytest.importorskip("threadpoolctl")

from fedmtl.config import parse_config  # noqa: E402
from fedmtl.experiment.run import build  # noqa: E402
from fedmtl.runtime.threads import torch_owns_the_cores  # noqa: E402
from tests.conftest import digits_config  # noqa: E402


def _openblas_threads() -> list[int]:
    return [i["num_threads"] for i in threadpoolctl.threadpool_info() if i["internal_api"] == "openblas"]


@pytest.fixture
def two_of_each():
    """torch and OpenBLAS on two threads each (``make test`` runs with OMP_NUM_THREADS=1)."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    with threadpoolctl.threadpool_limits(limits=2, user_api="blas"):
        if not _openblas_threads():
            pytest.skip("numpy is not built on OpenBLAS here")
        yield
    torch.set_num_threads(before)


def test_openblas_runs_on_one_thread_inside_and_gets_its_limit_back(two_of_each):
    assert set(_openblas_threads()) == {2}
    with torch_owns_the_cores():
        assert set(_openblas_threads()) == {1}
        assert torch.get_num_threads() == 2  # torch's own pool is untouched
    assert set(_openblas_threads()) == {2}
    with pytest.raises(RuntimeError, match="boom"), torch_owns_the_cores():
        raise RuntimeError("boom")
    assert set(_openblas_threads()) == {2}  # restored on errors too
    torch.set_num_threads(1)  # torch on one thread leaves the pools alone
    with torch_owns_the_cores():
        assert set(_openblas_threads()) == {2}


def test_a_simulated_round_aggregates_with_openblas_on_one_thread(two_of_each):
    _, algo, sim = build(parse_config(digits_config()))
    seen: list[list[int]] = []
    step = algo.server_update

    def spy(*args, **kwargs):
        seen.append(_openblas_threads())
        np.ones((64, 64)) @ np.ones((64, 64))  # a server-side product, as Krum's distances are
        return step(*args, **kwargs)

    algo.server_update = spy  # type: ignore[method-assign]
    sim.run_round(1, algo.init_server(), {})
    assert seen and set(seen[0]) == {1}
    assert set(_openblas_threads()) == {2}
