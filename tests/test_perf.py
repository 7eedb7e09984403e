"""The performance harness runs end to end on a tiny backbone and reports every figure it promises."""

from __future__ import annotations

import json
import statistics

import pytest
import torch
from conftest import DEPTH, WIDTH, tiny_backbone

import vptune
import vptune.perf
from vptune.perf import _base_method, main, saved_for_backward


def test_harness_reports_every_method(tmp_path, saved_backbone, capsys) -> None:
    out = tmp_path / "perf.json"
    argv = ["--backbone", saved_backbone, "--image-size", "16", "--batch-size", "4", "--repeats", "1", "--warmup", "1"]
    assert main([*argv, "--no-fresh", "--rounds", "2", "--gemm-size", "64", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    rows = {row["method"]: row for row in result["rows"]}
    assert set(rows) == set(vptune.perf.rows())
    for row in rows.values():
        assert row["step_seconds"] > 0 and row["flops_per_image"] > 0 and 0 < row["utilisation"]
        assert row["peak_memory_bytes"] >= row["step_memory_bytes"] >= 0 and "time_vs_full" in row
        assert len(row["step_seconds_rounds"]) == 2 and row["step_seconds"] == statistics.median(
            row["step_seconds_rounds"]
        )
    # the cached step skips the backbone: far fewer FLOPs than the uncached linear step; full does the most work
    assert rows["linear-cached"]["flops_per_image"] < rows["linear"]["flops_per_image"] / 10
    assert rows["full"]["flops_per_image"] > rows["linear"]["flops_per_image"]
    # checkpointed blocks run their forward twice (the tiny backbone has 3 blocks: ckpt3 = every block)
    flops = {name: rows[name]["flops_per_image"] for name in ("vpt-deep", "vpt-deep-ckpt3", "vpt-deep-ckpt")}
    assert flops["vpt-deep"] < flops["vpt-deep-ckpt3"] == flops["vpt-deep-ckpt"]
    assert rows["vpt-deep"]["flops_per_image"] < rows["vpt-deep-whole"]["flops_per_image"]  # unread outputs skipped
    assert set(result["inference_images_per_s"]) == {"backbone", "vpt-deep"} and result["data_time_fraction"] > 0
    assert result["data_time_fraction_streamed"] > 0
    # what each step keeps for its backward: counted for every eager row, not for the compiled one
    saved = {name: row["saved_bytes"] for name, row in rows.items()}
    assert saved.pop("vpt-deep-compiled") is None and "saved_vs_full" not in rows["vpt-deep-compiled"]
    assert saved["vpt-deep-ckpt"] < saved["vpt-deep"] < min(saved["vpt-deep-whole"], saved["full"])
    assert 0 < saved["linear"] < saved["vpt-deep"] and rows["full"]["saved_vs_full"] == 1.0
    printed = capsys.readouterr().out
    assert "| vpt-deep |" in printed and "median of 2 rounds" in printed


def test_each_method_can_run_in_its_own_process(tmp_path, saved_backbone, capsys) -> None:
    out = tmp_path / "perf.json"
    argv = ["--backbone", saved_backbone, "--image-size", "16", "--batch-size", "4", "--repeats", "1", "--warmup", "1"]
    assert main([*argv, "--methods", "vpt-deep,full", "--gemm-size", "64", "--json", str(out)]) == 0
    assert "| full |" in capsys.readouterr().out
    for row in json.loads(out.read_text())["rows"]:  # CPU: memory from a second process with a strict allocator
        assert row["peak_rss_default_malloc_bytes"] > 0 and row["peak_memory_bytes"] >= row["step_memory_bytes"]
        assert "mmap threshold" in row["memory_kind"]


def test_row_names_give_the_method_and_checkpointed_blocks() -> None:
    assert _base_method("vpt-deep-ckpt3") == ("vpt-deep", 3)
    assert _base_method("vpt-deep-ckpt") == ("vpt-deep", 0)  # 0 = every block
    assert _base_method("linear-cached") == ("linear", 0) and _base_method("full") == ("full", 0)
    assert _base_method("vpt-deep-whole") == ("vpt-deep", 0)
    with pytest.raises(ValueError, match="-ckpt<K>"):
        _base_method("vpt-deep-ckptx")


def test_profile_prints_each_rows_operators(saved_backbone, capsys) -> None:
    argv = ["--backbone", saved_backbone, "--image-size", "16", "--batch-size", "2", "--repeats", "2", "--warmup", "1"]
    assert main([*argv, "--methods", "vpt-deep,linear-cached", "--profile"]) == 0
    printed = capsys.readouterr().out
    assert "vpt-deep: 2 steps, operators by self CPU time" in printed and "linear-cached: 2 steps" in printed
    assert "aten::addmm" in printed or "aten::linear" in printed or "aten::mm" in printed


TOKENS, PROMPTS, SIDE = 257, 10, 64  # 16x16 patches of 4 pixels and a class token


@pytest.mark.parametrize(("family", "hidden"), [("vit", 2 * WIDTH), ("dinov2", 4 * WIDTH), ("clip", 2 * WIDTH)])
def test_vpt_deep_keeps_only_what_frozen_blocks_need_for_the_input_gradient(family: str, hidden: int) -> None:
    # Per token, a frozen pre-norm block keeps for the gradient of its input: both norms' inputs, the query, the
    # attention output, the MLP activation's input (width ``hidden``), and keys and values over tokens and prompts;
    # the first block's input needs no gradient; the last computes only the class token (all the head reads), so it
    # keeps its first norm's input and the keys and values. Beyond that only per-token statistics (norms, softmax).
    backbone = tiny_backbone(family)
    prompt = vptune.PromptConfig(num_tokens=PROMPTS, dropout=0.0)
    model = vptune.build("vpt-deep", backbone, 3, prompt, SIDE).train()
    images = torch.randn(2, 3, SIDE, SIDE)
    saved = saved_for_backward(model, lambda: model(images).sum().backward())
    keys_values = 2 * WIDTH * (TOKENS + PROMPTS) / TOKENS
    per_token = (DEPTH - 1) * (4 * WIDTH + keys_values + hidden) - WIDTH + (WIDTH + keys_values)  # fp32 values
    expected = 4 * per_token * TOKENS * len(images)
    assert expected < saved < 1.04 * expected
    full = vptune.build("full", tiny_backbone(family), 3, None, SIDE).train()
    assert saved < 0.75 * saved_for_backward(full, lambda: full(images).sum().backward())


def test_a_run_cut_short_keeps_the_rows_it_measured(tmp_path, saved_backbone, monkeypatch) -> None:
    out = tmp_path / "perf.json"
    argv = ["--backbone", saved_backbone, "--image-size", "16", "--batch-size", "2", "--repeats", "1", "--warmup", "1"]
    measure = vptune.perf.measure_method

    def cut_short(args, method):
        if method == "full":
            raise RuntimeError("out of memory in row full")
        return measure(args, method)

    monkeypatch.setattr(vptune.perf, "measure_method", cut_short)
    with pytest.raises(RuntimeError, match="row full"):
        main([*argv, "--no-fresh", "--methods", "vpt-deep,full", "--json", str(out)])
    partial = json.loads(out.read_text())
    assert partial["partial"] and [row["method"] for row in partial["rows"]] == ["vpt-deep"]
