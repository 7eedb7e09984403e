"""The Ray Serve deployment on a local Ray instance: it answers as the local server does, for tasks loaded on
demand, routed by the multiplexing header, with the same refusals."""

from __future__ import annotations

import socket

import pytest
import torch
from conftest import IMAGE

import vptune

httpx = pytest.importorskip("httpx")
pytest.importorskip("uvicorn")
ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")
from test_serve import png, running  # noqa: E402

from vptune.ray_serve import TASK_HEADER, ray_app  # noqa: E402
from vptune.serve import ServeConfig, create_app, served_tasks  # noqa: E402


@pytest.fixture(scope="module")
def task_root(tmp_path_factory, saved_backbone):
    backbone = vptune.load_backbone(saved_backbone)
    root = tmp_path_factory.mktemp("ray-root")
    for seed, (name, method, classes) in enumerate(
        [("shop/deep", "vpt-deep", 4), ("shop/shallow", "vpt-shallow", 3), ("linear", "linear", 5)]
    ):
        prompt = vptune.PromptConfig(num_tokens=2) if method != "linear" else None
        model = vptune.build(method, backbone, classes, prompt, IMAGE, seed=seed)
        with torch.no_grad():
            model.head.weight.normal_(0, 1, generator=torch.Generator().manual_seed(seed))
        vptune.save_task(model, root / name, classes=[f"{name}-{i}" for i in range(classes)])
    (root / "broken").mkdir()
    (root / "broken" / "vptune.json").write_text("{")
    (root / "broken" / "weights.safetensors").write_bytes(b"")
    return root


@pytest.fixture(scope="module")
def ray_url(task_root):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(ray_app(task_root, max_resident=2, replicas=2, cpus_per_replica=0.5), route_prefix="/")
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


def post(url: str, image: bytes, task: str | None = None, header: str | None = None) -> httpx.Response:
    headers = {TASK_HEADER: header} if header else {}
    data = {"task": task, "top_k": "10"} if task else {"top_k": "10"}
    files = {"image": ("x.png", image, "image/png")}
    return httpx.post(f"{url}/predict", files=files, data=data, headers=headers, timeout=120)


def test_ray_serve_answers_like_the_local_server(task_root, ray_url) -> None:
    local = served_tasks([], None, str(task_root))
    names = ["shop/deep", "shop/shallow", "linear", "shop/deep"]
    with running(create_app(local, ServeConfig())) as local_url:
        for index, name in enumerate(names):
            image = png(index, size=19)
            expected = post(local_url, image, task=name)
            assert expected.status_code == 200, expected.text
            routed = post(ray_url, image, header=name)  # routed to a replica holding the task
            assert routed.status_code == 200, routed.text
            by_field = post(ray_url, image, task=name)
            for answer in (routed, by_field):
                got, want = answer.json()["predictions"][name], expected.json()["predictions"][name]
                assert [e["label"] for e in got] == [e["label"] for e in want]
                assert [e["probability"] for e in got] == pytest.approx([e["probability"] for e in want], abs=1e-5)


def test_ray_serve_refuses_what_the_local_server_refuses(ray_url) -> None:
    image = png(1)
    assert post(ray_url, image, header="broken").status_code == 422
    assert "not valid JSON" in post(ray_url, image, header="broken").json()["detail"]
    assert post(ray_url, image, header="nope").status_code == 404
    assert post(ray_url, image, header="../x").status_code == 404
    assert post(ray_url, image, header="linear", task="shop/deep").status_code == 400
    assert post(ray_url, b"not an image", header="linear").status_code == 400
    assert post(ray_url, image).status_code == 400
    assert post(ray_url, image, header="linear").status_code == 200
