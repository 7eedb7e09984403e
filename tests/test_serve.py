"""The HTTP service on loopback: concurrent clients, mixed batches, tasks added and removed, bad input answered."""

from __future__ import annotations

import io
import json
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import IMAGE, tiny_backbone
from PIL import Image

import vptune
from vptune.cli import main
from vptune.multitask import MultiTask

httpx = pytest.importorskip("httpx")
uvicorn = pytest.importorskip("uvicorn")
from vptune.serve import ServeConfig, create_app  # noqa: E402  (needs fastapi, checked above)


def png(seed: int, size: int = 20) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def expected(model: vptune.TaskModel, data: bytes) -> torch.Tensor:
    pixels = model.preprocessing(io.BytesIO(data))
    with torch.no_grad():
        return model(pixels.unsqueeze(0))[0].softmax(-1)


@pytest.fixture(scope="module")
def tasks(tmp_path_factory) -> tuple[vptune.Backbone, dict[str, Path], dict[str, vptune.TaskModel]]:
    backbone = tiny_backbone("dinov2")
    root = tmp_path_factory.mktemp("served")
    specs = {
        "deep3": ("vpt-deep", {"num_tokens": 3}, 4),
        "deep3b": ("vpt-deep", {"num_tokens": 3}, 3),
        "shallow": ("vpt-shallow", {"num_tokens": 2}, 5),
        "linear": ("linear", {}, 2),
    }
    folders, models = {}, {}
    for seed, (name, (method, prompt, classes)) in enumerate(specs.items()):
        config = vptune.PromptConfig(**prompt) if prompt else None
        model = vptune.build(method, backbone, classes, config, IMAGE, seed=seed)
        with torch.no_grad():
            model.head.weight.normal_(0, 1, generator=torch.Generator().manual_seed(seed))
        folders[name] = vptune.save_task(model, root / name, classes=[f"{name}-{i}" for i in range(classes)])
        models[name] = vptune.load_task(folders[name], backbone=backbone)
    return backbone, folders, models


@pytest.fixture
def server(tasks):
    backbone, folders, _ = tasks
    served = MultiTask(backbone, [folders["deep3"], folders["deep3b"], folders["shallow"]])
    with running(create_app(served, ServeConfig(max_batch=16, max_wait_ms=20, max_image_bytes=50_000))) as url:
        yield url


@contextmanager
def running(app) -> Iterator[str]:
    """The app served by uvicorn on a free loopback port, in a thread, until the context ends."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning")
    instance = uvicorn.Server(config)
    thread = threading.Thread(target=instance.run, daemon=True)
    thread.start()
    for _ in range(200):
        if instance.started:
            break
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        instance.should_exit = True
        thread.join(timeout=10)


def test_concurrent_clients_get_single_task_answers(server, tasks) -> None:
    _, _, models = tasks
    names = ["deep3", "deep3b", "shallow"]
    assert httpx.get(f"{server}/health").json() == {"status": "ok", "tasks": 3}
    listed = httpx.get(f"{server}/tasks").json()["tasks"]
    assert [t["name"] for t in listed] == names and listed[2]["classes"] == [f"shallow-{i}" for i in range(5)]

    def ask(index: int) -> tuple[int, list[str], dict]:
        chosen = [names[index % 3]] if index % 4 else names  # some requests ask every task
        files = {"image": ("x.png", png(index), "image/png")}
        answer = httpx.post(f"{server}/predict", files=files, data={"task": chosen, "top_k": "10"}, timeout=60)
        assert answer.status_code == 200, answer.text
        return index, chosen, answer.json()["predictions"]

    with ThreadPoolExecutor(max_workers=8) as pool:
        answers = list(pool.map(ask, range(32)))
    for index, chosen, predictions in answers:
        assert sorted(predictions) == sorted(chosen)
        for name in chosen:
            probs = expected(models[name], png(index))
            for entry in predictions[name]:
                assert entry["class"] == f"{name}-{entry['label']}"
                assert entry["probability"] == pytest.approx(float(probs[entry["label"]]), abs=1e-5)
            assert [e["label"] for e in predictions[name]] == probs.argsort(descending=True).tolist()
    metrics = httpx.get(f"{server}/metrics").json()
    assert metrics["requests"] == 32 and metrics["max_batch_size"] > 1  # concurrent requests were gathered
    assert metrics["latency_ms"]["p50"] is not None and metrics["latency_ms"]["p99"] >= metrics["latency_ms"]["p50"]


def test_tasks_are_added_and_removed_at_run_time(server, tasks) -> None:
    _, folders, models = tasks
    added = httpx.post(f"{server}/tasks", json={"path": str(folders["linear"])})
    assert added.status_code == 200 and added.json()["added"] == "linear"
    files = {"image": ("x.png", png(1), "image/png")}
    answer = httpx.post(f"{server}/predict", files=files, data={"task": "linear"}).json()["predictions"]["linear"]
    assert answer[0]["probability"] == pytest.approx(float(expected(models["linear"], png(1)).max()), abs=1e-5)
    assert httpx.delete(f"{server}/tasks/deep3").json()["tasks"] == ["deep3b", "shallow", "linear"]
    assert httpx.post(f"{server}/predict", files=files, data={"task": "deep3"}).status_code == 404
    assert httpx.delete(f"{server}/tasks/deep3").status_code == 404


def test_bad_input_gets_a_4xx_and_the_server_keeps_serving(server, tmp_path) -> None:
    image = {"image": ("x.png", png(2), "image/png")}
    cases = [
        (httpx.post(f"{server}/predict", files={"image": ("x.png", b"not an image", "image/png")}), 400, "decoded"),
        (httpx.post(f"{server}/predict", files={"image": ("x.png", b"\0" * 60_000, "image/png")}), 413, "larger"),
        (httpx.post(f"{server}/predict", files=image, data={"task": "nope"}), 404, "unknown task"),
        (httpx.post(f"{server}/predict", data={"task": "shallow"}), 400, "'image'"),
        (
            httpx.post(f"{server}/predict", content=b"{}", headers={"content-type": "application/json"}),
            400,
            "multipart",
        ),
        (httpx.post(f"{server}/predict", files=image, data={"top_k": "many"}), 400, "top_k"),
        (httpx.post(f"{server}/tasks", json={"path": str(tmp_path)}), 400, "vptune.json"),
        (httpx.post(f"{server}/tasks", json={}), 400, "path"),
    ]
    for response, status, words in cases:
        assert response.status_code == status, response.text
        assert words in response.json()["detail"]
    assert httpx.post(f"{server}/predict", files=image, data={"task": "shallow"}).status_code == 200


def test_predict_and_serve_give_the_same_probabilities(tmp_path, saved_backbone, capsys) -> None:
    """The command line and the HTTP server read the task file's preprocessing alike (a non-default mean and std)."""
    backbone = vptune.load_backbone(saved_backbone)
    prep = vptune.Preprocessing(IMAGE, mean=(0.3, 0.4, 0.5), std=(0.2, 0.25, 0.3))
    model = vptune.build("vpt-deep", backbone, 4, vptune.PromptConfig(num_tokens=2), preprocessing=prep, seed=1)
    with torch.no_grad():
        model.head.weight.normal_(0, 1, generator=torch.Generator().manual_seed(1))
    folder = vptune.save_task(model, tmp_path / "task", classes=["a", "b", "c", "d"])
    image = tmp_path / "image.png"
    image.write_bytes(png(11, size=23))
    assert main(["predict", str(folder), str(image), "--json", "--top-k", "4"]) == 0
    printed = json.loads(capsys.readouterr().out)[0]["top"]
    with running(create_app(MultiTask(backbone, [folder]), ServeConfig())) as url:
        files = {"image": ("image.png", image.read_bytes(), "image/png")}
        answer = httpx.post(f"{url}/predict", files=files, data={"task": "task", "top_k": "4"}, timeout=60)
    assert answer.status_code == 200, answer.text
    assert answer.json()["predictions"]["task"] == printed
    own = expected(vptune.load_task(folder, backbone=backbone), image.read_bytes())
    assert [entry["probability"] for entry in printed] == [round(float(p), 6) for p in own.sort(descending=True)[0]]


def test_batches_never_exceed_max_batch(tasks) -> None:
    backbone, folders, _ = tasks
    served = MultiTask(backbone, [folders["deep3"], folders["shallow"]])
    with running(create_app(served, ServeConfig(max_batch=2, max_wait_ms=50))) as url:

        def ask(index: int) -> int:
            files = {"image": ("x.png", png(index), "image/png")}
            return httpx.post(f"{url}/predict", files=files, data={"task": "deep3"}, timeout=60).status_code

        with ThreadPoolExecutor(max_workers=8) as pool:
            assert set(pool.map(ask, range(12))) == {200}
        metrics = httpx.get(f"{url}/metrics").json()
    assert metrics["images"] == 12 and metrics["max_batch_size"] <= 2 and metrics["batches"] >= 6


def test_every_task_answers_when_none_is_named_and_top_k_is_capped(server, tasks) -> None:
    files = {"image": ("x.png", png(5), "image/png")}
    answer = httpx.post(f"{server}/predict", files=files, data={"top_k": "99"}).json()["predictions"]
    assert sorted(answer) == ["deep3", "deep3b", "shallow"]
    assert [len(answer[name]) for name in ("deep3", "deep3b", "shallow")] == [4, 3, 5]  # every class, no more
    _, _, models = tasks
    for name, entries in answer.items():
        assert sum(entry["probability"] for entry in entries) == pytest.approx(1.0, abs=1e-5)
        assert entries[0]["label"] == int(expected(models[name], png(5)).argmax())
