"""Task folders on the Hub, offline: pushed to a local stand-in of the Hub's API, read back through huggingface_hub's
cache, served and predicted as ``hf://`` paths, read from the cache alone with HF_HUB_OFFLINE, checked as local
folders are."""

from __future__ import annotations

import json
import os

import pytest
import torch
from conftest import IMAGE

import vptune

pytest.importorskip("huggingface_hub")
httpx = pytest.importorskip("httpx")
pytest.importorskip("uvicorn")
from hub_standin import standin  # noqa: E402
from test_serve import png, running  # noqa: E402

from vptune.cli import main  # noqa: E402
from vptune.hub import HubTask, model_card  # noqa: E402
from vptune.taskfile import push_task  # noqa: E402

TOKEN = "hf_standin_token"


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """The stand-in on loopback as HF_ENDPOINT, an empty cache, the token; yields its repositories."""
    app, repos = standin(TOKEN)
    with running(app) as url:
        monkeypatch.setenv("HF_ENDPOINT", url)
        monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
        monkeypatch.setenv("HF_TOKEN", TOKEN)
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        yield repos


def api():
    """A client of the stand-in (huggingface_hub reads HF_ENDPOINT when imported: name it)."""
    from huggingface_hub import HfApi

    return HfApi(endpoint=os.environ["HF_ENDPOINT"], token=TOKEN)


@pytest.fixture
def task(tmp_path, saved_backbone):
    backbone = vptune.load_backbone(saved_backbone)
    model = vptune.build("vpt-deep", backbone, 3, vptune.PromptConfig(num_tokens=2), IMAGE, seed=3)
    with torch.no_grad():
        model.head.weight.normal_(0, 1, generator=torch.Generator().manual_seed(3))
    metrics = {"test_accuracy": 0.875}
    folder = vptune.save_task(model, tmp_path / "eurosat-deep", classes=["a", "b", "c"], metrics=metrics)
    return backbone, model.eval(), folder


def test_push_then_load_through_the_cache_gives_identical_logits(hub, task, tmp_path, monkeypatch) -> None:
    backbone, model, folder = task
    url = push_task(folder, "me/vpt-eurosat")
    assert "me/vpt-eurosat/commit/" in url
    ((sha, files),) = hub["me/vpt-eurosat"].commits
    assert sorted(files) == ["README.md", "vptune.json", "weights.safetensors"]
    assert files["weights.safetensors"] == (folder / "weights.safetensors").read_bytes()
    card = files["README.md"].decode()
    assert "library_name: vptune" in card and "vpt-deep" in card and "87.50 %" in card
    assert backbone.fingerprint() in card and 'vptune.load_task("hf://me/vpt-eurosat")' in card
    x = torch.randn(2, 3, IMAGE, IMAGE)
    with torch.no_grad():
        expected = model(x)
        loaded = vptune.load_task("hf://me/vpt-eurosat", backbone=backbone)
        assert torch.equal(loaded(x), expected)
        pinned = vptune.load_task(f"hf://me/vpt-eurosat@{sha}", backbone=backbone)
        assert torch.equal(pinned(x), expected)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # from the cache alone now
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing answers there
    with torch.no_grad():
        assert torch.equal(vptune.load_task("hf://me/vpt-eurosat", backbone=backbone)(x), expected)
    with pytest.raises(vptune.TaskFileError, match="not in the Hugging Face cache"):
        vptune.load_task("hf://me/never-pushed", backbone=backbone)


def test_subfolders_revisions_predict_and_serve(hub, task, tmp_path, capsys) -> None:
    backbone, model, folder = task
    assert main(["push", str(folder), "me/tasks", "--revision", "main"]) == 0
    assert "hf://me/tasks" in capsys.readouterr().out
    # a repository holding several task folders, one per subfolder
    api().upload_folder(folder_path=str(folder), path_in_repo="shop/shelf", repo_id="me/tasks")
    image = tmp_path / "x.png"
    image.write_bytes(png(1, size=IMAGE))
    assert main(["predict", "hf://me/tasks/shop/shelf", str(image), "--json", "--top-k", "3"]) == 0
    printed = json.loads(capsys.readouterr().out)[0]["top"]
    assert main(["predict", str(folder), str(image), "--json", "--top-k", "3"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["top"] == printed
    from vptune.serve import ServeConfig, create_app, served_tasks

    served = served_tasks(["hf://me/tasks/shop/shelf", "hf://me/tasks@main"], None)
    assert served.names == ["shelf", "tasks"]
    with running(create_app(served, ServeConfig())) as url:
        files = {"image": ("x.png", image.read_bytes(), "image/png")}
        answer = httpx.post(f"{url}/predict", files=files, data={"task": "shelf", "top_k": "3"}, timeout=60)
    assert answer.json()["predictions"]["shelf"] == printed


def test_what_is_read_from_the_hub_is_checked_as_a_local_folder(hub, task, tmp_path) -> None:
    backbone, _, folder = task
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    record = json.loads((folder / "vptune.json").read_text())
    record["tensors"]["head.weight"] = [1, 30, 32]
    (damaged / "vptune.json").write_text(json.dumps(record))
    (damaged / "weights.safetensors").write_bytes((folder / "weights.safetensors").read_bytes())
    with pytest.raises(vptune.TaskFileError, match="does not hold the tensors"):
        push_task(damaged, "me/damaged")  # refused before upload
    assert "me/damaged" not in hub
    api().create_repo("me/damaged")
    api().upload_folder(folder_path=str(damaged), repo_id="me/damaged")  # put there by someone else
    with pytest.raises(vptune.TaskFileError, match="does not hold the tensors"):
        vptune.load_task("hf://me/damaged", backbone=backbone)
    other = vptune.wrap_model(type(backbone.model)(backbone.model.config), spec="other")
    push_task(folder, "me/fine")
    with pytest.raises(vptune.TaskFileError, match="fingerprint"):
        vptune.load_task("hf://me/fine", backbone=other)
    with pytest.raises(vptune.TaskFileError, match="no such repository"):
        vptune.load_task("hf://me/absent", backbone=backbone)
    with pytest.raises(vptune.TaskFileError, match="holds no task folder"):
        vptune.load_task("hf://me/fine/nothing-here", backbone=backbone)


def test_hub_specs_and_the_card() -> None:
    assert HubTask.parse("hf://me/repo") == HubTask("me/repo")
    assert HubTask.parse("hf://me/repo/a/b@v1.0") == HubTask("me/repo", "a/b", "v1.0")
    assert HubTask.parse("hf://me/repo/a/b@v1.0").name == "b" and HubTask.parse("hf://me/repo").name == "repo"
    for bad in ("hf://me", "hf://me/repo/../x", "hf:/me/repo", "hf://me/re po"):
        with pytest.raises(ValueError, match="not a Hub task"):
            HubTask.parse(bad)
    assert callable(model_card)
