"""The command line end to end: a tiny saved backbone and a tiny VTAB-layout task made in the test."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import pytest
import torch
from conftest import needs_real
from safetensors.torch import load_file
from transformers import Dinov2Config, Dinov2Model

import vptune
from vptune import commands, load_backbone
from vptune.bench import DEFAULT_METHODS
from vptune.cli import _int_list, build_parser, main
from vptune.data import load_split, open_task
from vptune.perf import _parser as perf_parser
from vptune.sweep import make_executor, plan_sweep


def _train(tmp_path: Path, backbone: str, task: Path, *extra: str) -> Path:
    out = tmp_path / "run"
    argv = ["train", "--data", str(task), "--backbone", backbone, "--image-size", "16", "--out", str(out)]
    argv += ["--epochs", "2", "--warmup-epochs", "1", "--batch-size", "8", "--base-lr", "1", "--no-progress", *extra]
    assert main(argv) == 0
    return out


def test_train_writes_run_folder_and_eval_predict_inspect_read_it(tmp_path, saved_backbone, tiny_task, capsys):
    out = _train(tmp_path, saved_backbone, tiny_task, "--method", "vpt-deep", "--num-tokens", "3")
    assert {p.name for p in out.iterdir()} >= {"config.json", "metrics.jsonl", "vptune.json", "weights.safetensors"}
    resolved = json.loads((out / "config.json").read_text())
    assert resolved["prompt"]["num_tokens"] == 3 and resolved["prompt"]["deep"] is True
    assert resolved["prompt"]["dropout"] == 0.1  # vpt-deep's default from the released configs
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [line["epoch"] for line in lines] == [1, 2, 2] and "test_accuracy" in lines[-1]
    capsys.readouterr()

    model = vptune.load_task(out)
    assert main(["eval", str(out), "--split", "val", "--json"]) == 0
    scored = json.loads(capsys.readouterr().out)
    own = vptune.evaluate(model, load_split(open_task(tiny_task), "val", model.preprocessing), device="cpu")
    assert (scored["accuracy"], scored["loss"], scored["count"]) == (own["accuracy"], own["loss"], 9)

    images = sorted((tiny_task / "images").glob("test_*.png"))[:3]
    assert main(["predict", str(out), *map(str, images), "--top-k", "2", "--json"]) == 0
    answers = json.loads(capsys.readouterr().out)
    with torch.no_grad():
        probs = model(torch.stack([model.preprocessing(image) for image in images])).softmax(-1)
    for answer, image, row in zip(answers, images, probs, strict=True):
        top = row.topk(2)
        assert answer["image"] == str(image) and [entry["label"] for entry in answer["top"]] == top.indices.tolist()
        assert [entry["probability"] for entry in answer["top"]] == [round(float(p), 6) for p in top.values]
        assert [entry["class"] for entry in answer["top"]] == [model.classes[i] for i in top.indices]

    assert main(["inspect", str(out), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    backbone = load_backbone(saved_backbone)
    expected = 2 * 3 * 32 + 32 * 3 + 3  # deep prompts N*p*d + head d*C + C
    assert summary["trainable_parameters"] == expected
    assert summary["percent_of_backbone"] == round(100 * expected / backbone.num_parameters(), 4)
    assert summary["file_bytes"] == sum(f.stat().st_size for f in (out / "vptune.json", out / "weights.safetensors"))


def test_config_file_is_read_and_flags_override_it(tmp_path, saved_backbone, tiny_task):
    config = tmp_path / "run.yaml"
    config.write_text("method: vpt-shallow\nprompt:\n  num_tokens: 4\n  init: zeros\ntrain:\n  epochs: 5\n")
    out = _train(tmp_path, saved_backbone, tiny_task, "--config", str(config), "--num-tokens", "2")
    resolved = json.loads((out / "config.json").read_text())
    assert resolved["method"] == "vpt-shallow"
    assert resolved["prompt"]["num_tokens"] == 2  # flag beats file
    assert resolved["prompt"]["init"] == "zeros"  # file beats default
    assert resolved["train"]["epochs"] == 2  # flag beats file


def test_bad_input_gives_clear_errors(tmp_path, saved_backbone, tiny_task, capsys):
    assert main(["train", "--backbone", saved_backbone]) == 1
    assert "--data" in capsys.readouterr().err
    assert main(["train", "--data", str(tmp_path / "nowhere"), "--backbone", saved_backbone]) == 1
    assert "nowhere" in capsys.readouterr().err
    assert main(["train", "--data", str(tiny_task), "--backbone", "resnet"]) == 1
    assert "accepted forms" in capsys.readouterr().err
    assert main(["inspect", str(tmp_path)]) == 1
    assert "vptune.json" in capsys.readouterr().err


def test_other_backbone_is_refused_unless_allowed(tmp_path, saved_backbone, tiny_task, capsys):
    out = _train(tmp_path, saved_backbone, tiny_task, "--method", "linear")
    torch.manual_seed(1)
    other = tmp_path / "other"
    config = Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, patch_size=4, image_size=16)
    Dinov2Model(config).save_pretrained(other)
    capsys.readouterr()
    assert main(["eval", str(out), "--backbone", f"hf:{other}"]) == 1
    error = capsys.readouterr().err
    assert load_backbone(saved_backbone).fingerprint() in error and load_backbone(f"hf:{other}").fingerprint() in error
    assert main(["eval", str(out), "--backbone", f"hf:{other}", "--allow-other-backbone"]) == 0


@pytest.mark.real
@needs_real("eurosat")
def test_train_on_real_eurosat_at_tiny_size(tmp_path, capsys):
    out = tmp_path / "eurosat"
    argv = ["train", "--data", "eurosat", "--method", "vpt-shallow", "--image-size", "28", "--out", str(out)]
    argv += ["--epochs", "1", "--batch-size", "64", "--base-lr", "0.1", "--no-progress", "--test-split", "none"]
    assert main(argv) == 0
    record = json.loads((out / "vptune.json").read_text())
    assert record["backbone"]["spec"] == "dinov2-small" and record["data"]["name"] == "eurosat"
    assert record["classes"][0] == "AnnualCrop" and record["metrics"]["val_accuracy"] > 0.1


ALL_METHODS = (*DEFAULT_METHODS, "vpt-deep+bias")  # the paper's ten plus the extras


@pytest.mark.real
@needs_real("eurosat")
@pytest.mark.parametrize("method", ALL_METHODS)
def test_every_method_trains_on_real_eurosat(tmp_path, capsys, method: str):
    out = tmp_path / method
    argv = ["train", "--data", "eurosat", "--method", method, "--image-size", "28", "--out", str(out)]
    argv += ["--epochs", "1", "--batch-size", "64", "--no-progress", "--test-split", "none"]
    argv += ["--num-tokens", "2"] if method.startswith("vpt") else []
    assert main(argv) == 0
    record = json.loads((out / "vptune.json").read_text())
    resolved = json.loads((out / "config.json").read_text())
    assert record["method"] == method and record["metrics"]["val_accuracy"] > 0.1  # 10 classes
    assert resolved["train"]["optimizer"] == ("adamw" if method == "full" else "sgd")
    capsys.readouterr()
    assert main(["inspect", str(out), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    backbone, trainable = record["backbone"], record["trainable_parameters"]
    multiple = (backbone["parameters"] - backbone["tuned_parameters"] + 24 * trainable) / backbone["parameters"]
    assert summary["total_params_24_tasks"] == f"{multiple:.2f}x"
    assert (multiple > 24) == (method == "full")


def test_method_options_on_the_command_line(tmp_path, saved_backbone, tiny_task, capsys):
    _train(tmp_path, saved_backbone, tiny_task, "--method", "adapter", "--reduction", "4")
    record = json.loads((tmp_path / "run" / "vptune.json").read_text())
    assert record["options"] == {"reduction": 4}
    assert json.loads((tmp_path / "run" / "config.json").read_text())["options"] == {"reduction": 4}
    capsys.readouterr()
    with pytest.raises(SystemExit):
        main(["train", "--method", "mlp-0", "--data", str(tiny_task)])
    assert "unknown method 'mlp-0'" in capsys.readouterr().err
    argv = ["train", "--method", "linear", "--reduction", "4", "--data", str(tiny_task), "--backbone", saved_backbone]
    assert main([*argv, "--out", str(tmp_path / "x")]) == 1
    assert "does not take options ['reduction']" in capsys.readouterr().err


def test_demo_trains_each_method_and_prints_one_table(tmp_path, saved_backbone, tiny_task, capsys):
    argv = ["demo", "--data", str(tiny_task), "--backbone", saved_backbone, "--image-size", "16", "--epochs", "1"]
    argv += ["--methods", "linear,vpt-deep,lora,full", "--out", str(tmp_path), "--json"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    rows = json.loads(out[out.index("[\n") :])
    assert [row["method"] for row in rows] == ["linear", "vpt-deep", "lora", "full"]
    assert "| method | trainable params |" in out
    by_method = {row["method"]: row for row in rows}
    assert by_method["linear"]["s/epoch"].endswith("(cached)") and "cached" not in by_method["lora"]["s/epoch"]
    assert by_method["full"]["optimizer, base lr"] == "adamw 0.0005"
    assert float(by_method["full"]["total params (24 tasks)"].rstrip("x")) > 24
    for method in by_method:
        assert vptune.load_task(tmp_path / method).method == method
    assert main(["demo", "--methods", "linear,nope", "--data", str(tiny_task)]) == 1
    assert "unknown method 'nope'" in capsys.readouterr().err


def test_interrupted_run_keeps_its_last_finished_epoch_apart(tmp_path, saved_backbone, tiny_task, monkeypatch):
    import vptune.loop

    real_epoch, calls = vptune.loop.train_epoch, []

    def interrupt_second_epoch(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_epoch(*args, **kwargs)

    monkeypatch.setattr(vptune.loop, "train_epoch", interrupt_second_epoch)
    with pytest.raises(KeyboardInterrupt):
        _train(tmp_path, saved_backbone, tiny_task, "--method", "vpt-shallow", "--epochs", "3")
    out, partial = tmp_path / "run", tmp_path / "run.partial"
    assert not out.exists()  # a run folder holds finished runs only
    lines = [json.loads(line) for line in (partial / "metrics.jsonl").read_text().splitlines()]
    assert [line["epoch"] for line in lines] == [1]
    with pytest.warns(UserWarning, match="did not finish"):
        vptune.load_task(partial)
    record = vptune.read_record(partial)
    assert record["metrics"]["epoch"] == 1 and record["train_config"]["epochs"] == 3
    assert record["status"] == "partial: epoch 1 of 3; stopped: KeyboardInterrupt: "
    assert not list(tmp_path.glob(".run.*"))  # no staging folder left behind


def diverging(tmp_path, saved_backbone, tiny_task, out: str, *extra: str) -> list[str]:
    argv = ["train", "--data", str(tiny_task), "--backbone", saved_backbone, "--image-size", "16", "--method", "linear"]
    return [*argv, "--out", str(tmp_path / out), "--batch-size", "8", "--warmup-epochs", "0", "--no-progress", *extra]


@pytest.mark.parametrize("lr", ["1e20", "1e6"])  # non-finite weights; a finite loss far above its limit
def test_a_diverged_run_is_an_error_and_saves_nothing(tmp_path, saved_backbone, tiny_task, capsys, lr: str):
    extra = ["--epochs", "2", "--base-lr", lr, "--head-norm", "none"]  # without the batch norm, the loss explodes
    argv = diverging(tmp_path, saved_backbone, tiny_task, "run", *extra)
    assert main(argv) == 1
    assert "training diverged at epoch 1, step" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
    assert not (tmp_path / "run.partial" / "weights.safetensors").exists()  # no epoch finished: no task file
    for line in (tmp_path / "run.partial" / "metrics.jsonl").read_text().splitlines():
        json.loads(line, parse_constant=lambda text: pytest.fail(f"{text} in the metrics"))


def test_a_diverged_rerun_leaves_the_earlier_run_whole(tmp_path, saved_backbone, tiny_task, capsys):
    good = diverging(tmp_path, saved_backbone, tiny_task, "run", "--epochs", "1", "--base-lr", "0.1")
    assert main(good) == 0
    before = {p.name: p.read_bytes() for p in (tmp_path / "run").iterdir()}
    bad = diverging(tmp_path, saved_backbone, tiny_task, "run", "--epochs", "1", "--base-lr", "1e20", "--seed", "5")
    assert main(bad) == 1
    assert {p.name: p.read_bytes() for p in (tmp_path / "run").iterdir()} == before  # config.json included
    assert vptune.load_task(tmp_path / "run").method == "linear"


def test_out_must_be_new_or_a_run_folder(tmp_path, saved_backbone, tiny_task, capsys):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    argv = diverging(tmp_path, saved_backbone, tiny_task, "mine", "--epochs", "1", "--base-lr", "0.1")
    assert main(argv) == 1
    assert "holds files that are not a run's" in capsys.readouterr().err
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


def test_config_json_reruns_the_run_exactly(tmp_path, saved_backbone, tiny_task):
    first = _train(tmp_path, saved_backbone, tiny_task, "--method", "vpt-deep", "--num-tokens", "2", "--seed", "3")
    again = tmp_path / "again"
    assert main(["train", "--config", str(first / "config.json"), "--out", str(again)]) == 0
    resolved = json.loads((first / "config.json").read_text())
    assert resolved["train"]["seed"] == 3 and resolved["image_size"] == 16 and resolved["prompt"]["deep"] is True
    assert json.loads((again / "config.json").read_text()) == resolved
    ours, theirs = load_file(first / "weights.safetensors"), load_file(again / "weights.safetensors")
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[name], theirs[name]) for name in ours)


def every_action(parser: argparse.ArgumentParser):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                yield from every_action(child)
        elif action.option_strings or action.dest not in ("command",):
            yield parser.prog, action


@pytest.mark.parametrize("parser", [build_parser(), perf_parser()], ids=["vptune", "perf"])
def test_every_flag_has_a_help_line(parser: argparse.ArgumentParser):
    missing = [f"{prog} {action.option_strings or action.dest}" for prog, action in every_action(parser)
               if not action.help or action.help == argparse.SUPPRESS]  # fmt: skip
    assert missing == []


def test_one_vocabulary_with_the_old_spellings_kept(tmp_path):
    parser = build_parser()
    sweep = ["sweep", "--data", "x", "--method", "linear", "--out", "o"]
    new = parser.parse_args([*sweep, "--base-lr", "0.5,0.1", "--weight-decay", "0"])
    old = parser.parse_args([*sweep, "--lr", "0.5,0.1", "--wd", "0"])
    assert (new.base_lr, new.weight_decay) == (old.base_lr, old.weight_decay) == ([0.5, 0.1], [0.0])
    harness = perf_parser()
    new, old = (
        harness.parse_args(["--image-size", "28", "--batch-size", "4"]),
        harness.parse_args(["--size", "28", "--batch", "4"]),
    )
    assert (new.image_size, new.batch_size) == (old.image_size, old.batch_size) == (28, 4)
    train = parser.parse_args(["train", "--data", "x", "--image-size", "28", "--batch-size", "4", "--base-lr", "0.1"])
    assert train.layer == {"data": "x", "image_size": 28, "train": {"batch_size": 4, "base_lr": 0.1}}
    with pytest.raises(SystemExit):
        harness.parse_args(["--methods", "vpt-deep,no-such-method"])


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--optimizer", "adam"], "unknown optimizer 'adam'; choose one of sgd, adamw"),
        (["--precision", "fp16"], "unknown precision 'fp16'; choose one of auto, bf16, fp32"),
        (["--cache", "on"], "unknown cache 'on'; choose one of auto, off"),
        (["--val-split", "dev"], "unknown val_split 'dev'; choose one of train, val, trainval, test"),
        (["--device", "gpu0"], "device must be auto, cpu, cuda"),
        (["--location", "append"], "unknown location 'append'; choose one of prepend, add"),
    ],
)
def test_bad_options_are_errors_naming_the_choices(tmp_path, saved_backbone, tiny_task, capsys, flags, message):
    argv = ["train", "--data", str(tiny_task), "--backbone", saved_backbone, "--out", str(tmp_path), *flags]
    assert main(argv) == 1
    assert message in capsys.readouterr().err
    assert not (tmp_path / "config.json").exists()  # refused before any work


def test_configs_refuse_wrong_types_and_choices():
    with pytest.raises(ValueError, match="unknown optimizer 'adam'; choose one of sgd, adamw"):
        vptune.TrainConfig(optimizer="adam")
    with pytest.raises(ValueError, match="epochs must be int"):
        vptune.TrainConfig(epochs="3")
    with pytest.raises(ValueError, match="num_tokens must be int"):
        vptune.PromptConfig(num_tokens=[10])
    with pytest.raises(ValueError, match="unknown method"):
        vptune.RunSpec("eurosat", "vpt-deeep")
    with pytest.raises(ValueError, match="prompt must be a mapping of options"):
        vptune.RunSpec.from_layers({"data": "eurosat", "prompt": 10})
    with pytest.raises(ValueError, match="unknown keys \\['lr'\\]"):
        vptune.RunSpec.from_layers({"data": "eurosat", "lr": 0.1})
    with pytest.raises(ValueError, match="unknown budget 'huge'; choose one of smoke, cpu, paper"):
        plan_sweep("eurosat", "linear", "huge")
    with pytest.raises(ValueError, match="unknown backend 'spark'"):
        make_executor("spark")


@pytest.mark.parametrize(("layers", "blocks"), [("last:1", [1]), ("first:1", [0]), ("last:2", [0, 1]), ("1", [1])])
def test_layers_flag_selects_the_blocks(tmp_path, saved_backbone, tiny_task, layers: str, blocks: list[int]):
    assert _int_list("last:3") == [-3, -2, -1] and _int_list("first:3") == [0, 1, 2] and _int_list("0,2") == [0, 2]
    out = _train(tmp_path, saved_backbone, tiny_task, "--method", "vpt-deep", "--layers", layers, "--epochs", "1")
    assert vptune.load_task(out).prompts.layers == blocks  # the saved DINOv2 has 2 blocks


def test_serve_command_passes_its_limits_on(monkeypatch, tmp_path):
    seen = {}
    monkeypatch.setattr(commands, "serve_folders", lambda *args, **kwargs: seen.update(args=args, kwargs=kwargs))
    argv = ["serve", str(tmp_path), "--max-batch", "3", "--max-wait-ms", "7", "--top-k", "2", "--port", "8123"]
    assert main(argv) == 0
    paths, backbone, host, port, config = seen["args"]
    assert (paths, backbone, host, port) == ([str(tmp_path)], None, "127.0.0.1", 8123)
    assert (config.max_batch, config.max_wait_ms, config.top_k) == (3, 7.0, 2)
    assert seen["kwargs"] == {"lazy": False, "max_resident": None}
    assert main(["serve", "--lazy", "--task-root", str(tmp_path), "--max-resident", "5"]) == 0
    assert seen["args"][0] == [] and seen["args"][4].task_root == str(tmp_path)
    assert seen["kwargs"] == {"lazy": True, "max_resident": 5}
    monkeypatch.setattr(commands, "serve_ray", lambda *args, **kwargs: seen.update(args=args, kwargs=kwargs))
    assert main(["serve", "--backend", "ray", "--task-root", str(tmp_path), "--replicas", "3"]) == 0
    assert seen["args"][:2] == (str(tmp_path), None)
    assert seen["kwargs"] == {"max_resident": None, "replicas": 3, "address": None}


@pytest.mark.parametrize(
    ("argv", "words"),
    [
        (["serve", "--lazy"], "--task-root"),
        (["serve"], "name task folders"),
        (["serve", "x", "--max-resident", "3"], "--lazy"),
        (["serve", "--backend", "ray"], "--task-root"),
    ],
)
def test_serve_command_says_what_is_missing(argv, words, capsys):
    assert main(argv) != 0
    assert words in capsys.readouterr().err


def test_predict_reports_bad_images_beside_the_good_ones(tmp_path, saved_backbone, tiny_task, capsys):
    out = _train(tmp_path, saved_backbone, tiny_task, "--method", "linear", "--epochs", "1")
    good = next((tiny_task / "images").glob("test_*.png"))
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image")
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)  # reading it would block forever
    capsys.readouterr()
    argv = ["predict", str(out), str(good), str(broken), str(fifo), str(tmp_path / "absent.png"), str(good), "--json"]
    assert main(argv) == 1
    answers = json.loads(capsys.readouterr().out)
    assert ["top" if "top" in answer else "error" for answer in answers] == ["top", "error", "error", "error", "top"]
    assert answers[0]["top"] == answers[4]["top"] and "cannot read image" in answers[1]["error"]
    assert answers[2]["error"] == answers[3]["error"] == "not a regular file"
