"""Task files: save -> load reproduces the model exactly; a wrong backbone or a damaged folder is refused clearly."""

from __future__ import annotations

import json
import re
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from conftest import IMAGE, WIDTH, pixels, tiny_backbone, tiny_hf_model
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file

import vptune
from vptune import PromptConfig, TaskFileError
from vptune.cli import main
from vptune.taskfile import RECORD, WEIGHTS

CLASSES = ["cat", "dog", "fox"]

CONFIGS = {
    "linear": ("linear", None),
    "shallow": ("vpt-shallow", PromptConfig(num_tokens=4)),
    "deep-dropout": ("vpt-deep", PromptConfig(num_tokens=4, dropout=0.1)),
    "deep-project-image": ("vpt-deep", PromptConfig(num_tokens=4, project=8, readout="image")),
    "deep-last-2-shared-drop": (
        "vpt-deep",
        PromptConfig(num_tokens=2, layers=[-2, -1], deep=True, shared=True, drop_after=True),
    ),
    "add": ("vpt-deep", PromptConfig(location="add")),
    "prepend-pixel-prompt": ("vpt-shallow", PromptConfig(num_tokens=3, location="prepend-pixel", readout="prompt")),
    "concat-channel": ("vpt-shallow", PromptConfig(location="concat-channel", readout="all")),
}


def trained(backbone: vptune.Backbone, method: str, prompt: PromptConfig | None) -> vptune.TaskModel:
    """A model whose trainable tensors differ from any fresh initialisation (as after training)."""
    model = vptune.build(method, backbone, len(CLASSES), prompt, image_size=IMAGE)
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for param in model.trainable_state_dict().values():
            param.add_(0.1 * torch.randn(param.shape, generator=generator))
    return model


@pytest.mark.parametrize("case", CONFIGS)
def test_save_load_reproduces_logits_exactly(tmp_path: Path, family: str, case: str) -> None:
    method, prompt = CONFIGS[case]
    model = trained(tiny_backbone(family), method, prompt).eval()
    vptune.save_task(model, tmp_path, classes=CLASSES)
    loaded = vptune.load_task(tmp_path, backbone=tiny_backbone(family))  # a fresh copy of the same weights
    assert not loaded.training and loaded.method == method and loaded.classes == CLASSES
    assert loaded.prompt_config == model.prompt_config
    x = pixels(model.backbone, 4)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    fresh = vptune.build(method, model.backbone, len(CLASSES), prompt, image_size=IMAGE)
    with torch.no_grad():
        assert not torch.equal(fresh.eval()(x), model(x))  # the weights came from the file, not the seed


def test_folder_holds_only_what_trained(tmp_path: Path, backbone: vptune.Backbone) -> None:
    model = trained(backbone, "vpt-deep", PromptConfig(num_tokens=4, project=8))
    vptune.save_task(model, tmp_path, classes=CLASSES)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([RECORD, WEIGHTS])  # no temporary files left
    with safe_open(str(tmp_path / WEIGHTS), framework="pt") as handle:
        names = set(handle.keys())
        metadata = handle.metadata()
        for name in names:
            assert torch.equal(handle.get_tensor(name), model.task_state_dict()[name])
    statistics = {"head.norm.running_mean", "head.norm.running_var"}  # the head's feature norm (see fidelity.md)
    assert names == set(model.trainable_state_dict()) | statistics and not any(n.startswith("backbone") for n in names)
    assert metadata["backbone_fingerprint"] == backbone.fingerprint() and metadata["method"] == "vpt-deep"
    record = json.loads((tmp_path / RECORD).read_text())
    assert record["backbone"]["fingerprint"] == backbone.fingerprint()
    assert record["backbone"]["spec"] == backbone.spec
    assert record["trainable_parameters"] == model.num_trainable()
    assert record["classes"] == CLASSES and record["num_classes"] == 3
    assert record["prompt"]["project"] == 8 and record["prompt"]["deep"] is True
    preprocessing = {key: record["preprocessing"][key] for key in ("image_size", "mean", "std")}
    assert preprocessing == {"image_size": IMAGE, "mean": list(backbone.mean), "std": list(backbone.std)}


@pytest.mark.parametrize("protocol", ["vtab", "fgvc"])
def test_a_task_normalised_its_own_way_reloads_with_its_own_normalisation(tmp_path: Path, protocol: str) -> None:
    """A task whose preprocessing is not its backbone's (its own mean and std, another protocol) is rebuilt with the
    preprocessing its file records: the same tensors into the network for the same image, the same logits."""
    backbone = tiny_backbone("dinov2")
    own = vptune.Preprocessing(IMAGE, mean=(0.1, 0.2, 0.3), std=(0.9, 0.8, 0.7), protocol=protocol)
    assert (own.mean, own.std) != (backbone.mean, backbone.std)
    model = vptune.build("vpt-deep", backbone, 3, PromptConfig(num_tokens=2), preprocessing=own, seed=2)
    vptune.save_task(model.eval(), tmp_path)
    loaded = vptune.load_task(tmp_path, backbone=backbone)
    assert loaded.preprocessing == own
    image = tmp_path / "image.png"
    Image.fromarray(torch.randint(0, 256, (20, 24, 3), dtype=torch.uint8).numpy()).save(image)
    with torch.no_grad():
        ours, theirs = loaded(loaded.preprocessing(image)[None]), model(own(image)[None])
    assert torch.equal(ours, theirs)


def test_save_overwrites_and_default_class_names(tmp_path: Path, backbone: vptune.Backbone) -> None:
    first, second = (trained(backbone, "vpt-shallow", PromptConfig(num_tokens=n)) for n in (2, 5))
    vptune.save_task(first, tmp_path)
    vptune.save_task(second, tmp_path)
    loaded = vptune.load_task(tmp_path, backbone=backbone)
    assert loaded.prompts.embeddings.shape[2] == 5 and loaded.classes == ["0", "1", "2"]
    with pytest.raises(ValueError, match="2 class names"):
        vptune.save_task(first, tmp_path, classes=["a", "b"])


def test_other_backbone_is_refused_unless_allowed(tmp_path: Path, family: str) -> None:
    ours, theirs = tiny_backbone(family, seed=0), tiny_backbone(family, seed=1)
    model = trained(ours, "vpt-deep", PromptConfig(num_tokens=4))
    vptune.save_task(model, tmp_path)
    with pytest.raises(TaskFileError) as error:
        vptune.load_task(tmp_path, backbone=theirs)
    message = str(error.value)
    assert ours.fingerprint() in message and theirs.fingerprint() in message
    assert "allow_other_backbone" in message
    loaded = vptune.load_task(tmp_path, backbone=theirs, allow_other_backbone=True)
    assert loaded.backbone is theirs
    for name, tensor in model.trainable_state_dict().items():
        assert torch.equal(loaded.trainable_state_dict()[name], tensor)


def test_other_width_is_a_shape_mismatch(tmp_path: Path, family: str) -> None:
    vptune.save_task(trained(tiny_backbone(family), "vpt-deep", PromptConfig(num_tokens=4)), tmp_path)
    wider = vptune.wrap_model(tiny_hf_model(family, hidden_size=2 * WIDTH))
    with pytest.raises(TaskFileError, match=r"tensor \S+ has shape \(.*32\), the model expects \(.*64\)"):
        vptune.load_task(tmp_path, backbone=wider, allow_other_backbone=True)


def edit_record(folder: Path, change: Callable[[dict], None]) -> None:
    record = json.loads((folder / RECORD).read_text())
    change(record)
    (folder / RECORD).write_text(json.dumps(record))


# (what damages the folder, what the error must say)
DAMAGE = {
    "no record": (lambda f: (f / RECORD).unlink(), "vptune.json is missing"),
    "record not json": (lambda f: (f / RECORD).write_text("{'format': 1"), "not valid JSON"),
    "newer format": (lambda f: edit_record(f, lambda r: r.update(format=99)), "format 99.*upgrade"),
    "no weights": (lambda f: (f / WEIGHTS).unlink(), "weights.safetensors is missing"),
    "weights garbage": (lambda f: (f / WEIGHTS).write_bytes(b"\x00\x01garbage" * 20), "cannot be read as safetensors"),
    "weights truncated": (
        lambda f: (f / WEIGHTS).write_bytes((f / WEIGHTS).read_bytes()[:200]),
        "cannot be read as safetensors",
    ),
    "shape mismatch": (
        lambda f: edit_record(f, lambda r: r["prompt"].update(num_tokens=6)),
        r"prompts\.embeddings has shape \(1, 3, 4, 32\).*expects \(1, 3, 6, 32\)",
    ),
    "tensor missing": (
        lambda f: save_file({"head.weight": torch.zeros(1, 3, WIDTH), "head.bias": torch.zeros(1, 3)}, f / WEIGHTS),
        r"missing \['head\.norm\.running_mean', 'head\.norm\.running_var', 'prompts\.embeddings'\], unexpected \[\]",
    ),
    "other method": (lambda f: edit_record(f, lambda r: r.update(method="linear")), r"unexpected \['prompts"),
}


@pytest.mark.parametrize("case", DAMAGE)
def test_damaged_folder_is_refused_clearly(tmp_path: Path, backbone: vptune.Backbone, case: str) -> None:
    damage, message = DAMAGE[case]
    vptune.save_task(trained(backbone, "vpt-deep", PromptConfig(num_tokens=4)), tmp_path)
    vptune.load_task(tmp_path, backbone=backbone)  # whole, it loads
    damage(tmp_path)
    with pytest.raises(TaskFileError, match=message):
        vptune.load_task(tmp_path, backbone=backbone)


def test_unknown_record_keys_warn_and_load(tmp_path: Path, backbone: vptune.Backbone) -> None:
    model = trained(backbone, "vpt-shallow", PromptConfig(num_tokens=4)).eval()
    vptune.save_task(model, tmp_path)
    edit_record(tmp_path, lambda r: r["prompt"].update(future_option=3))
    with pytest.warns(UserWarning, match="future_option"):
        loaded = vptune.load_task(tmp_path, backbone=backbone)
    x = pixels(backbone, 2)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


# A damaged vptune.json: (the change, the words of the one-line error)
FIELD_DAMAGE = {
    "no method": (lambda r: r.pop("method"), "field 'method' (the method's name) is missing"),
    "no backbone": (lambda r: r.pop("backbone"), "field 'backbone' (the backbone it was trained on) is missing"),
    "no prompt": (lambda r: r.pop("prompt"), "field 'prompt' (the prompt configuration) is missing"),
    "no classes": (lambda r: r.pop("classes"), "field 'classes' (the class names) is missing"),
    "no preprocessing": (lambda r: r.pop("preprocessing"), "field 'preprocessing' (how images become input)"),
    "no num_classes": (lambda r: r.pop("num_classes"), "field 'num_classes' (the number of classes) is missing"),
    "no fingerprint": (lambda r: r["backbone"].pop("fingerprint"), "field 'backbone.fingerprint' is missing"),
    "method a list": (lambda r: r.update(method=["vpt-deep"]), "field 'method' must be a str"),
    "classes a string": (lambda r: r.update(classes="cat,dog,fox"), "field 'classes' must be a list"),
    "num_classes text": (lambda r: r.update(num_classes="3"), "field 'num_classes' must be a int"),
    "image size text": (lambda r: r["preprocessing"].update(image_size="16"), "'preprocessing.image_size' must be"),
    "too few class names": (lambda r: r.update(classes=["cat"]), "'classes' must be 3 class names"),
    "record a list": (lambda r: r.clear(), "field 'method'"),
    "prompt value wrong": (lambda r: r["prompt"].update(num_tokens="four"), "num_tokens must be int"),
    "unknown option": (lambda r: r.update(options={"rank": 2}), "does not take options"),
}


@pytest.mark.parametrize("case", FIELD_DAMAGE)
def test_a_damaged_record_is_one_line_naming_the_field(tmp_path: Path, case: str, capsys) -> None:
    change, words = FIELD_DAMAGE[case]
    backbone = tiny_backbone("dinov2")
    vptune.save_task(trained(backbone, "vpt-deep", PromptConfig(num_tokens=4)), tmp_path, classes=CLASSES)
    edit_record(tmp_path, change)
    with pytest.raises(TaskFileError, match=re.escape(words)) as error:
        vptune.load_task(tmp_path, backbone=backbone)
    assert "\n" not in str(error.value) and str(tmp_path) in str(error.value)
    for argv in (["inspect", str(tmp_path)], ["predict", str(tmp_path), str(tmp_path / RECORD)]):
        assert main(argv) == 1  # an error line, no traceback
        assert words.split("'")[0] in capsys.readouterr().err


def test_inspect_checks_the_weights(tmp_path: Path, capsys) -> None:
    vptune.save_task(trained(tiny_backbone("vit"), "linear", None), tmp_path, classes=CLASSES)
    assert main(["inspect", str(tmp_path)]) == 0
    capsys.readouterr()
    data = (tmp_path / WEIGHTS).read_bytes()
    (tmp_path / WEIGHTS).write_bytes(data[: len(data) - 16])  # the last tensor's bytes cut short
    assert main(["inspect", str(tmp_path)]) == 1
    assert "declared inconsistently with the file" in capsys.readouterr().err


def test_declared_sizes_are_checked_before_anything_is_allocated(tmp_path: Path) -> None:
    """A 3 KB record declaring 2,000,000 classes must not make vptune allocate a 2,000,000-row head."""
    backbone = tiny_backbone("vit")
    vptune.save_task(trained(backbone, "linear", None), tmp_path, classes=CLASSES)
    edit_record(tmp_path, lambda r: r.update(num_classes=2_000_000, classes=[str(i) for i in range(2_000_000)]))
    tracemalloc.start()
    with pytest.raises(TaskFileError, match="the head has \\[3\\] classes, vptune.json says 2000000"):
        vptune.load_task(tmp_path, backbone=backbone)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 200 * 2**20  # the record's own list of names, not a head of 2e6 x d floats (3 GB at d = 384)
    edit_record(tmp_path, lambda r: r.update(num_classes=3, classes=CLASSES, tensors={"head.weight": [1, 9, 32]}))
    with pytest.raises(TaskFileError, match="does not hold the tensors"):
        vptune.load_task(tmp_path, backbone=backbone)
