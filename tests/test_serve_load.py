"""A load test on loopback: 16 concurrent clients for about 20 seconds, mixing good requests, malformed ones and
oversized images, get only 2xx and 4xx answers, no broken connection, and a fixed image gets the same answer before
and after."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from conftest import IMAGE, tiny_backbone

import vptune
from vptune.multitask import MultiTask

pytest.importorskip("httpx")
from test_serve import running  # noqa: E402

from vptune.serve import ServeConfig, create_app  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from serve_load import answer, png, run_load  # noqa: E402

SECONDS, CLIENTS, LIMIT = 20.0, 16, 300_000


def test_sixteen_clients_of_good_malformed_and_oversized_requests(tmp_path) -> None:
    backbone = tiny_backbone("dinov2")
    names = ["alpha", "beta", "gamma"]
    for seed, name in enumerate(names):
        model = vptune.build("vpt-deep", backbone, 4, vptune.PromptConfig(num_tokens=2), IMAGE, seed=seed)
        with torch.no_grad():
            model.head.weight.normal_(0, 1, generator=torch.Generator().manual_seed(seed))
        vptune.save_task(model, tmp_path / name)
    served = MultiTask(backbone, [tmp_path / name for name in names])
    config = ServeConfig(max_upload_bytes=LIMIT, max_pixels=1_000_000, max_wait_ms=10)
    with running(create_app(served, config)) as url:
        fixed = png(12345)
        before = answer(url, fixed, "alpha")
        result = run_load(url, names, SECONDS, CLIENTS, LIMIT)
        after = answer(url, fixed, "alpha")
    assert result["broken_connections"] == [] and result["server_errors"] == 0, result
    statuses = result["statuses"]
    assert set(statuses["good"]) == {200} and statuses["good"][200] > 20
    assert all(400 <= status < 500 for kind in ("malformed", "oversized") for status in statuses[kind])
    assert 413 in statuses["oversized"] and sum(statuses["malformed"].values()) > 10
    assert before == after and "predictions" in before
