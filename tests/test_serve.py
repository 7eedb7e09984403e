"""The HTTP service on loopback: concurrent clients, mixed batches, tasks added and removed, bad input answered."""

from __future__ import annotations

import io
import json
import socket
import threading
import time
import tracemalloc
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

TOKEN = "a-test-admin-token-of-32-chars!!"
ADMIN = {"Authorization": f"Bearer {TOKEN}"}


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
    config = ServeConfig(max_batch=16, max_wait_ms=20, max_upload_bytes=50_000, admin_token=TOKEN)
    with running(create_app(served, config)) as url:
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
    metrics = httpx.get(f"{server}/metrics.json").json()
    assert metrics["requests"] == 32 and metrics["max_batch_size"] > 1  # concurrent requests were gathered
    assert metrics["latency_ms"]["p50"] is not None and metrics["latency_ms"]["p99"] >= metrics["latency_ms"]["p50"]


def test_tasks_are_added_and_removed_at_run_time(server, tasks) -> None:
    _, folders, models = tasks
    added = httpx.post(f"{server}/tasks", json={"path": str(folders["linear"])}, headers=ADMIN)
    assert added.status_code == 200 and added.json()["added"] == "linear"
    files = {"image": ("x.png", png(1), "image/png")}
    answer = httpx.post(f"{server}/predict", files=files, data={"task": "linear"}).json()["predictions"]["linear"]
    assert answer[0]["probability"] == pytest.approx(float(expected(models["linear"], png(1)).max()), abs=1e-5)
    assert httpx.delete(f"{server}/tasks/deep3", headers=ADMIN).json()["tasks"] == ["deep3b", "shallow", "linear"]
    assert httpx.post(f"{server}/predict", files=files, data={"task": "deep3"}).status_code == 404
    assert httpx.delete(f"{server}/tasks/deep3", headers=ADMIN).status_code == 404


def test_bad_input_gets_a_4xx_and_the_server_keeps_serving(server, tmp_path) -> None:
    image = {"image": ("x.png", png(2), "image/png")}
    cases = [
        (httpx.post(f"{server}/predict", files={"image": ("x.png", b"not an image", "image/png")}), 400, "decoded"),
        (httpx.post(f"{server}/predict", files={"image": ("x.png", b"\0" * 60_000, "image/png")}), 413, "larger"),
        (httpx.post(f"{server}/predict", files=image, data={"task": "nope"}), 404, "no task named"),
        (httpx.post(f"{server}/predict", data={"task": "shallow"}), 400, "'image'"),
        (
            httpx.post(f"{server}/predict", content=b"{}", headers={"content-type": "application/json"}),
            400,
            "multipart",
        ),
        (httpx.post(f"{server}/predict", files=image, data={"top_k": "many"}), 400, "top_k"),
        (httpx.post(f"{server}/tasks", json={"path": str(tmp_path)}, headers=ADMIN), 400, "vptune.json"),
        (httpx.post(f"{server}/tasks", json={}, headers=ADMIN), 400, "path"),
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
        metrics = httpx.get(f"{url}/metrics.json").json()
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


@pytest.fixture
def guarded(tasks, tmp_path):
    """A server with small limits and an admin token whose task root is ``tmp_path / "root"``."""
    backbone, folders, _ = tasks
    root = tmp_path / "root"
    root.mkdir()
    config = ServeConfig(
        max_upload_bytes=300_000, max_pixels=1_000_000, max_tasks=3, admin_token=TOKEN, task_root=str(root)
    )
    with running(create_app(MultiTask(backbone, [folders["deep3"], folders["shallow"]]), config)) as url:
        yield url, root


def copy_task(folder: Path, to: Path) -> Path:
    to.mkdir(parents=True)
    for file in folder.iterdir():
        (to / file.name).write_bytes(file.read_bytes())
    return to


def test_changing_tasks_needs_the_admin_token(server, tasks, guarded) -> None:
    _, folders, _ = tasks
    url, root = guarded
    inside = copy_task(folders["linear"], root / "linear")
    body = {"path": str(inside)}
    assert httpx.post(f"{url}/tasks", json=body).status_code == 401
    assert httpx.post(f"{url}/tasks", json=body, headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert httpx.delete(f"{url}/tasks/deep3").status_code == 401
    outside = httpx.post(f"{url}/tasks", json={"path": str(folders["linear"])}, headers=ADMIN)
    assert outside.status_code == 403 and "task root" in outside.json()["detail"]
    for name in ("../x", "a/b", "", ".hidden", "x" * 65):
        assert httpx.post(f"{url}/tasks", json={**body, "name": name}, headers=ADMIN).status_code == 400, name
    assert httpx.post(f"{url}/tasks", json=body, headers=ADMIN).json()["added"] == "linear"
    assert httpx.delete(f"{url}/tasks/linear", headers=ADMIN).status_code == 200
    # a server started without a token has no admin endpoints at all (the `server` fixture has one: check a new app)
    backbone, folders, _ = tasks
    with running(create_app(MultiTask(backbone, [folders["deep3"]]), ServeConfig())) as open_url:
        refused = httpx.delete(f"{open_url}/tasks/deep3", headers=ADMIN)
        assert refused.status_code == 403 and "--admin-token" in refused.json()["detail"]
        assert httpx.get(f"{open_url}/tasks").json()["tasks"][0]["name"] == "deep3"


def test_a_hostile_task_file_is_refused_before_allocation(tasks, guarded) -> None:
    _, folders, _ = tasks
    url, root = guarded
    hostile = copy_task(folders["linear"], root / "hostile")
    record = json.loads((hostile / "vptune.json").read_text())
    record.update(num_classes=2_000_000, classes=["c"] * 2_000_000)
    (hostile / "vptune.json").write_text(json.dumps(record))
    tracemalloc.start()
    answer = httpx.post(f"{url}/tasks", json={"path": str(hostile)}, headers=ADMIN, timeout=60)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert answer.status_code == 400 and "vptune.json says 2000000" in answer.json()["detail"]
    assert peak < 300 * 2**20  # the record's list of names, not a head of 2e6 x d floats


def image_bytes(width: int, height: int, fmt: str = "PNG", mode: str = "L", **options) -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, (width, height)).save(buffer, format=fmt, **options)
    return buffer.getvalue()


def test_images_and_uploads_are_bounded_before_they_are_read(guarded, monkeypatch) -> None:
    url, _ = guarded
    decoded = []
    real = vptune.Preprocessing.__call__
    monkeypatch.setattr(vptune.Preprocessing, "__call__", lambda self, src: decoded.append(1) or real(self, src))
    bomb = image_bytes(12000, 12000)  # 144 megapixels in a small PNG
    tall = image_bytes(32, 5_242_884, "TIFF", compression="tiff_adobe_deflate")
    assert len(bomb) < 300_000 and len(tall) < 300_000  # small files, huge images
    for data in (bomb, tall):
        start = time.perf_counter()
        answer = httpx.post(f"{url}/predict", files={"image": ("x", data)}, data={"task": "deep3"}, timeout=60)
        assert answer.status_code == 413 and "pixels" in answer.json()["detail"]
        assert time.perf_counter() - start < 2.0 and decoded == []  # refused from the header, never decoded
    big = httpx.post(f"{url}/predict", content=b"\0" * 5_000_000, headers={"content-type": "multipart/form-data"})
    assert big.status_code == 413 and "larger than 300000 bytes" in big.json()["detail"]
    fields = {"task": ["deep3"] * 20}  # one task asked 20 times: decoded once, answered once
    answer = httpx.post(f"{url}/predict", files={"image": ("x.png", png(3))}, data=fields, timeout=60)
    assert answer.status_code == 200 and list(answer.json()["predictions"]) == ["deep3"] and len(decoded) == 1
    many = {"task": ["deep3", "shallow", "a", "b"]}
    assert httpx.post(f"{url}/predict", files={"image": ("x.png", png(3))}, data=many).status_code == 400


MALFORMED = [
    b"",
    b"not json",
    b"[1, 2]",
    b'{"name": "x"}',
    b'{"path": 42}',
    b'{"path": ["a", "b"]}',
    b'{"path": "/tmp/x", "name": ["x"]}',
    b'{"path": "' + b"a" * 10_000 + b'"}',
    b'{"path": "/nowhere", "name": "' + b"n" * 1000 + b'"}',
]


def test_malformed_requests_get_a_4xx_and_the_connection_stays(guarded) -> None:
    url, root = guarded
    with httpx.Client(base_url=url, headers=ADMIN) as client:
        for body in MALFORMED:
            answer = client.post("/tasks", content=body, headers={"content-type": "application/json"})
            assert 400 <= answer.status_code < 500, (body[:40], answer.text)
            assert "detail" in answer.json()
        files = {"image": ("x.png", png(1))}
        for data in ({"top_k": "0"}, {"top_k": "x" * 500}, {"task": "no/such"}, {"task": ""}):
            assert 400 <= client.post("/predict", files=files, data=data).status_code < 500
        assert client.post("/predict", data={"image": "text, not a file"}).status_code == 400
        assert client.get("/no/such/route").status_code == 404
        assert client.post("/predict", files=files, data={"task": "deep3"}).status_code == 200  # same connection
        text = client.get("/metrics").text
        counted = client.get("/metrics.json").json()["responses_by_status"]
    assert 'vptune_requests_total{method="POST",route="/tasks",status="400"}' in text
    assert 'status="200"' in text and 'status="404"' in text
    assert counted["400"] >= len(MALFORMED) and counted["200"] >= 1 and counted["404"] >= 1


def test_an_unexpected_failure_is_a_json_500_and_the_server_keeps_serving(tasks, monkeypatch) -> None:
    backbone, folders, _ = tasks
    served = MultiTask(backbone, [folders["deep3"]])
    with running(create_app(served, ServeConfig())) as url, httpx.Client(base_url=url) as client:
        files = {"image": ("x.png", png(1))}
        monkeypatch.setattr(MultiTask, "forward", lambda *args: (_ for _ in ()).throw(RuntimeError("boom")))
        failed = client.post("/predict", files=files)
        assert failed.status_code == 500 and "keeps serving" in failed.json()["detail"]
        monkeypatch.undo()
        assert client.post("/predict", files=files).status_code == 200  # the same connection


def test_malloc_arenas_capped_unless_the_user_chose(monkeypatch):
    import ctypes.util
    import platform

    from vptune.serve import limit_malloc_arenas

    monkeypatch.setenv("MALLOC_ARENA_MAX", "4")
    assert limit_malloc_arenas() is False
    monkeypatch.delenv("MALLOC_ARENA_MAX")
    glibc = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc" and ctypes.util.find_library("c")
    assert limit_malloc_arenas() is bool(glibc)
