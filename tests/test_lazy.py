"""A thousand tasks on one backbone: task folders under a root loaded on first use, a bound on what stays resident,
folders changed or damaged on disk, task tables that grow and shrink without restacking, and a batch whose cost
does not depend on how many tasks are served."""

from __future__ import annotations

import hashlib
import json
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from conftest import IMAGE, pixels, tiny_backbone, trained_looking

import vptune
from vptune import stacking
from vptune.head import Head
from vptune.multitask import MultiTask, TaskNotFound

MIX = [  # (method, classes, prompt): three structures, five class counts
    ("vpt-deep", 3, {"num_tokens": 2}),
    ("vpt-deep", 5, {"num_tokens": 2}),
    ("vpt-shallow", 4, {"num_tokens": 3}),
    ("linear", 2, {}),
    ("vpt-deep", 6, {"num_tokens": 2}),
    ("vpt-deep", 3, {"num_tokens": 2}),
]


def many(backbone: vptune.Backbone, count: int) -> list[vptune.TaskModel]:
    return [trained_looking(backbone, *MIX[i % len(MIX)][:2], seed=i, **MIX[i % len(MIX)][2]) for i in range(count)]


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> tuple[vptune.Backbone, Path, dict[str, vptune.TaskModel]]:
    """Twelve task folders at different depths under one root."""
    backbone = tiny_backbone("dinov2")
    folder = tmp_path_factory.mktemp("root")
    models = {}
    for index, model in enumerate(many(backbone, 12)):
        name = f"customer{index % 3}/camera{index}" if index % 2 else f"task{index}"
        vptune.save_task(model, folder / name)
        models[name] = model
    return backbone, folder, models


def alone(model: vptune.TaskModel, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x.unsqueeze(0))[0]


def test_tasks_under_a_root_are_listed_without_loading_and_loaded_on_first_use(root) -> None:
    backbone, folder, models = root
    served = MultiTask(backbone, root=folder)
    assert served.servable() == sorted(models) and served.names == [] and served.loads == 0
    x = pixels(backbone, batch=3, seed=1)
    names = ["customer1/camera1", "task4", "customer1/camera1"]
    out = served(x, names)
    assert served.loads == 2 and sorted(served.names) == ["customer1/camera1", "task4"]
    for row, name in enumerate(names):
        torch.testing.assert_close(out[row], alone(models[name], x[row]), atol=1e-5, rtol=0)
    for bad in ("../root", "task4/..", "/etc", "nope", "customer1", "task4/../task2"):
        with pytest.raises(TaskNotFound):
            served.info(bad)


def test_beyond_max_resident_the_least_recently_used_goes_and_reloads_the_same(root) -> None:
    backbone, folder, models = root
    served = MultiTask(backbone, root=folder, max_resident=2)
    x = pixels(backbone, batch=1, seed=2)
    first = served(x, ["task0"])[0]
    served(x, ["task2"])
    served(x, ["task0"])  # task0 used last: task2 is the one to go
    served(x, ["task4"])
    assert sorted(served.names) == ["task0", "task4"] and served.loads == 3
    served(x, ["task2"])  # evicted: read again
    assert served.loads == 4 and sorted(served.names) == ["task2", "task4"]
    assert torch.equal(served(x, ["task0"])[0], first)
    # a batch needing more tasks than the bound gets them all, then the bound holds again
    out = served(x.expand(3, -1, -1, -1), ["task6", "task8", "task10"])
    assert [o.shape[0] for o in out] == [models[n].num_classes for n in ("task6", "task8", "task10")]
    assert len(served.names) == 2


def test_a_task_changed_on_disk_is_reloaded_and_a_damaged_one_refused_alone(root, tmp_path) -> None:
    backbone, folder, models = root
    mine = tmp_path / "root"
    shutil.copytree(folder, mine)
    served = MultiTask(backbone, root=mine)
    x = pixels(backbone, batch=1, seed=3)
    before = served(x, ["task0"])[0]
    replacement = trained_looking(backbone, "vpt-deep", 3, seed=99, num_tokens=2)
    vptune.save_task(replacement, mine / "task0")
    assert served.info("task0").name == "task0" and served.loads == 2  # its next use read it again
    after = served(x, ["task0"])[0]
    torch.testing.assert_close(after, alone(replacement, x[0]), atol=1e-5, rtol=0)
    assert not torch.allclose(after, before)
    record = mine / "task2" / "vptune.json"
    record.write_text(record.read_text()[:-20])  # truncated
    with pytest.raises(vptune.TaskFileError, match="not valid JSON"):
        served.info("task2")
    weights = mine / "task4" / "weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(vptune.TaskFileError, match="safetensors"):
        served.info("task4")
    other = trained_looking(tiny_backbone("dinov2", seed=1), "linear", 2, seed=0)
    vptune.save_task(other, mine / "other")
    with pytest.raises(vptune.TaskFileError, match="fingerprint") as refused:
        served.info("other")
    assert backbone.fingerprint() in str(refused.value) and other.backbone.fingerprint() in str(refused.value)
    torch.testing.assert_close(served(x, ["task6"])[0], alone(models["task6"], x[0]), atol=1e-5, rtol=0)


def test_tables_grow_and_shrink_without_restacking(monkeypatch) -> None:
    backbone = tiny_backbone("vit")
    tasks = [trained_looking(backbone, "vpt-deep", 3, seed=i, num_tokens=2) for i in range(40)]
    stacks = []
    original = stacking.stack
    monkeypatch.setattr(stacking, "stack", lambda *a, **k: stacks.append(1) or original(*a, **k))
    monkeypatch.setattr("vptune.multitask.stack", stacking.stack)
    served = MultiTask(backbone)
    for index, task in enumerate(tasks):
        served.add(task, name=f"t{index}")
    (structure,) = served.groups()
    assert len(stacks) == 1  # the table's first row; every other task is written into a row
    assert structure.rows.capacity == 64 and structure.rows.grows == 2  # 16 -> 32 -> 64
    for index in range(0, 40, 2):
        served.remove(f"t{index}")
    assert structure.rows.used == 20 and structure.rows.capacity == 64
    for index in range(40, 60):
        served.add(tasks[index - 40], name=f"t{index}")  # into the freed rows
    assert structure.rows.capacity == 64 and structure.rows.grows == 2 and len(stacks) == 1
    x = pixels(backbone, batch=4, seed=4)
    names = ["t1", "t41", "t59", "t39"]
    for row, (name, logits) in enumerate(zip(names, served(x, names), strict=True)):
        source = tasks[int(name[1:]) - 40 if int(name[1:]) >= 40 else int(name[1:])]
        torch.testing.assert_close(logits, alone(source, x[row]), atol=1e-5, rtol=0)


def test_mixed_batches_over_many_tasks_gather_heads_by_class_count(monkeypatch) -> None:
    """Heads of one class count are rows of one table: a batch runs one head call per class count it holds, not
    one per task, and every sample equals its task run alone."""
    backbone = tiny_backbone("dinov2")
    tasks = many(backbone, 60)
    served = MultiTask(backbone, tasks)
    calls = []
    forward = Head.forward
    monkeypatch.setattr(Head, "forward", lambda self, *a: calls.append(1) or forward(self, *a))
    ids = torch.randint(0, 60, (24,), generator=torch.Generator().manual_seed(0))
    x = pixels(backbone, batch=24, seed=5)
    out = served(x, ids)
    assert len(calls) == len({tasks[i].num_classes for i in ids.tolist()}) <= 5
    assert len(served.groups()) == 3
    monkeypatch.setattr(Head, "forward", forward)
    for row, index in enumerate(ids.tolist()):
        torch.testing.assert_close(out[row], alone(tasks[index], x[row]), atol=1e-5, rtol=0)


def test_deep_prompts_keys_and_values_are_computed_once_per_task() -> None:
    backbone = tiny_backbone("dinov2")
    tasks = [trained_looking(backbone, "vpt-deep", 3, seed=i, num_tokens=2) for i in range(4)]
    cached, plain = MultiTask(backbone, tasks), MultiTask(backbone, tasks, kv_cache=0)
    (structure,) = cached.groups()
    x = pixels(backbone, batch=6, seed=6)
    ids = [0, 1, 2, 0, 1, 2]
    first = cached(x, ids)
    assert structure.cache.computed == 3 * backbone.depth  # three tasks, every block
    again = cached(x.flip(0), ids[::-1])
    assert structure.cache.computed == 3 * backbone.depth  # nothing computed again
    cached(x[:1], [3])
    assert structure.cache.computed == 4 * backbone.depth
    reference = plain(x, ids)
    for row, index in enumerate(ids):
        torch.testing.assert_close(first[row], reference[row], atol=1e-5, rtol=0)
        torch.testing.assert_close(first[row], alone(tasks[index], x[row]), atol=1e-5, rtol=0)
        torch.testing.assert_close(again[len(ids) - 1 - row], first[row], atol=1e-6, rtol=0)
    replacement = trained_looking(backbone, "vpt-deep", 3, seed=50, num_tokens=2)
    cached.remove("task1")
    cached.add(replacement, name="new")  # into task1's row: its kept keys and values must not be used
    torch.testing.assert_close(cached(x[:1], ["new"])[0], alone(replacement, x[0]), atol=1e-5, rtol=0)


def test_the_backbone_fingerprint_is_computed_once(root, monkeypatch) -> None:
    backbone, folder, _ = root
    fresh = vptune.wrap_model(backbone.model, spec=backbone.spec)
    hashes = []
    sha = hashlib.sha256
    monkeypatch.setattr(hashlib, "sha256", lambda *a: hashes.append(1) or sha(*a))
    served = MultiTask(fresh, root=folder)
    for name in served.servable():
        served.info(name)
    assert served.loads == 12 and len(hashes) == 1


def test_a_record_naming_other_tensors_is_refused_before_loading(root, tmp_path) -> None:
    backbone, folder, _ = root
    mine = tmp_path / "r"
    shutil.copytree(folder / "task0", mine / "t")
    record = json.loads((mine / "t" / "vptune.json").read_text())
    record["tensors"]["prompts.embeddings"] = [1, 12, 2, 32]
    (mine / "t" / "vptune.json").write_text(json.dumps(record))
    with pytest.raises(vptune.TaskFileError, match="does not hold the tensors"):
        MultiTask(backbone, root=mine).info("t")


# --- the HTTP server over a task root ---------------------------------------------------------------------------
httpx = pytest.importorskip("httpx")
pytest.importorskip("uvicorn")
from test_serve import png, running  # noqa: E402

from vptune.cli import main  # noqa: E402
from vptune.serve import ServeConfig, create_app, served_tasks  # noqa: E402


def ask(url: str, name: str, image: bytes, top_k: int = 10) -> httpx.Response:
    files = {"image": ("x.png", image, "image/png")}
    return httpx.post(f"{url}/predict", files=files, data={"task": name, "top_k": str(top_k)}, timeout=60)


def test_lazy_server_answers_what_predict_answers(tmp_path, saved_backbone, capsys) -> None:
    backbone = vptune.load_backbone(saved_backbone)
    prep = vptune.Preprocessing(IMAGE, mean=(0.3, 0.4, 0.5), std=(0.2, 0.25, 0.3))
    model = vptune.build("vpt-deep", backbone, 4, vptune.PromptConfig(num_tokens=2), preprocessing=prep, seed=1)
    with torch.no_grad():
        model.head.weight.normal_(0, 1, generator=torch.Generator().manual_seed(1))
    folder = vptune.save_task(model, tmp_path / "root" / "shop" / "shelf", classes=["a", "b", "c", "d"])
    image = tmp_path / "image.png"
    image.write_bytes(png(11, size=23))
    assert main(["predict", str(folder), str(image), "--json", "--top-k", "4"]) == 0
    printed = json.loads(capsys.readouterr().out)[0]["top"]
    served = served_tasks([], None, str(tmp_path / "root"))  # the backbone the task folders name
    assert served.backbone.fingerprint() == backbone.fingerprint() and served.loads == 0
    with running(create_app(served, ServeConfig())) as url:
        listed = httpx.get(f"{url}/tasks").json()
        assert listed == {"tasks": [], "resident": [], "servable": ["shop/shelf"]} and served.loads == 0
        answer = ask(url, "shop/shelf", image.read_bytes(), top_k=4)
        assert answer.status_code == 200, answer.text
        assert answer.json()["predictions"]["shop/shelf"] == printed
        assert httpx.get(f"{url}/tasks").json()["resident"] == ["shop/shelf"]
        unnamed = httpx.post(f"{url}/predict", files={"image": ("x.png", png(1), "image/png")})
        assert unnamed.status_code == 400 and "name the task" in unnamed.json()["detail"]


def test_lazy_server_refuses_damaged_and_foreign_tasks_alone(root, tmp_path) -> None:
    backbone, folder, models = root
    mine = tmp_path / "root"
    shutil.copytree(folder, mine)
    (mine / "task2" / "weights.safetensors").write_bytes(b"\0" * 64)
    (mine / "task4" / "vptune.json").write_text("{")
    vptune.save_task(trained_looking(tiny_backbone("dinov2", seed=1), "linear", 2, seed=0), mine / "foreign")
    vptune.save_task(vptune.build("bias", backbone, 2, image_size=IMAGE), mine / "bias")
    served = MultiTask(backbone, root=mine, max_resident=3)
    config = ServeConfig(max_batch=8, max_wait_ms=300)  # concurrent requests share a batch
    with running(create_app(served, config)) as url:
        together = ["task0", "task2", "task6", "task4", "customer1/camera1"]
        with ThreadPoolExecutor(max_workers=len(together)) as pool:
            statuses = list(pool.map(lambda name: ask(url, name, png(5)).status_code, together))
        assert statuses == [200, 422, 200, 422, 200]
        assert httpx.get(f"{url}/metrics.json").json()["max_batch_size"] >= 2
        refusals = {
            "task2": (422, "safetensors"),
            "task4": (422, "not valid JSON"),
            "foreign": (422, backbone.fingerprint()),
            "bias": (422, "changes the backbone"),
            "nope": (404, "no task named"),
            "../etc": (404, "no task named"),
        }
        for name, (status, words) in refusals.items():
            answer = ask(url, name, png(3))
            assert answer.status_code == status, (name, answer.text)
            assert words in answer.json()["detail"], name
        for name in ("task0", "customer1/camera1", "task6", "customer0/camera3"):
            answer = ask(url, name, png(4)).json()["predictions"][name]
            logits = alone(models[name], models[name].preprocessing(__import__("io").BytesIO(png(4))))
            top = logits.softmax(-1).argmax()
            assert answer[0]["label"] == int(top)
        vptune.save_task(models["task6"], mine / "task2")  # repaired: served at its next request
        assert ask(url, "task2", png(4)).status_code == 200
        metrics = httpx.get(f"{url}/metrics.json").json()
        assert not any(status.startswith("5") for status in metrics["responses_by_status"])
    assert len(served.names) <= 3


def test_a_task_damaged_after_its_request_fails_that_request_alone(root, tmp_path) -> None:
    """Between a request's check and its batch, its task folder is rewritten damaged: the batch answers the other
    samples, and that sample gets the error naming the problem."""
    from vptune.serve import answer_batch

    backbone, folder, models = root
    mine = tmp_path / "root"
    shutil.copytree(folder, mine)
    served = MultiTask(backbone, root=mine)
    names = ["task0", "task2", "task6", "task2"]
    for name in names:
        served.info(name)
    (mine / "task2" / "vptune.json").write_text("{")
    x = pixels(backbone, batch=4, seed=8)
    answers, runs = answer_batch(served, list(x), names)
    assert runs == [2]
    assert isinstance(answers[1], vptune.TaskFileError) and "not valid JSON" in str(answers[1])
    assert answers[3] is answers[1] or isinstance(answers[3], vptune.TaskFileError)
    for row in (0, 2):
        torch.testing.assert_close(answers[row], alone(models[names[row]], x[row]), atol=1e-5, rtol=0)
