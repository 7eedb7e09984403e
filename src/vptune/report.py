"""Accounting and tables: trainable parameters, their share of the backbone, file bytes."""

from __future__ import annotations

from pathlib import Path

import torch

from .taskfile import RECORD, WEIGHTS


def file_bytes(folder: str | Path) -> int:
    """Bytes of a task folder's two files (record + weights)."""
    return sum((Path(folder) / name).stat().st_size for name in (RECORD, WEIGHTS) if (Path(folder) / name).is_file())


def human_bytes(count: int) -> str:
    """``1536`` -> ``"1.5 KiB"``."""
    value = float(count)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GiB"


PAPER_TASKS = 24  # the paper's "total params" counts 19 VTAB-1k + 5 FGVC tasks


def params_multiple(record: dict, tasks: int = PAPER_TASKS) -> float:
    """The paper's "total params" for ``tasks`` tasks: (shared frozen backbone + tasks * per-task) / backbone.

    Pretrained tensors a method trains (``full``, ``bias`` ...) are stored per task, so they are not counted in the
    shared part: ``full`` gives about ``tasks``x (the paper's 24.02x), ``linear`` about 1.0x.
    """
    backbone = record["backbone"]["parameters"]
    shared = backbone - record["backbone"].get("tuned_parameters", 0)
    return (shared + tasks * record["trainable_parameters"]) / backbone


def task_summary(record: dict, folder: Path) -> dict:
    """What ``vptune inspect`` shows: method, trainable share, bytes, backbone, metrics."""
    backbone = record["backbone"]
    trainable = record.get("trainable_parameters") or 0
    prompt = record.get("prompt", {})
    return {
        "method": record["method"],
        "prompt": _prompt_line(prompt),
        "classes": record["num_classes"],
        "image_size": record["preprocessing"]["image_size"],
        "trainable_parameters": trainable,
        "percent_of_backbone": round(100 * trainable / backbone["parameters"], 4),
        "file_bytes": file_bytes(folder),
        f"total_params_{PAPER_TASKS}_tasks": f"{params_multiple(record):.2f}x",
        "backbone": f"{backbone['spec']} ({backbone.get('family', '?')}, {backbone['parameters']:,} params, "
        f"fingerprint {backbone['fingerprint']})",
        "data": (record.get("data") or {}).get("name"),
        "metrics": {k: v for k, v in (record.get("metrics") or {}).items() if "accuracy" in k or k == "epoch"},
        "vptune_version": (record.get("library") or {}).get("version"),
    }


def _prompt_line(prompt: dict) -> str:
    if not prompt.get("num_tokens"):
        return "none"
    depth = f"layers {prompt['layers']}" if prompt.get("layers") else ("deep" if prompt.get("deep") else "shallow")
    return f"{prompt['num_tokens']} tokens, {depth}, {prompt['location']}, readout {prompt['readout']}"


def markdown_table(rows: list[dict]) -> str:
    """Rows of equal keys as a markdown table."""
    if not rows:
        return ""
    keys = list(rows[0])
    lines = ["| " + " | ".join(keys) + " |", "|" + "|".join("---" for _ in keys) + "|"]
    lines += ["| " + " | ".join(str(row[key]) for key in keys) + " |" for row in rows]
    return "\n".join(lines)


def top_classes(probs: torch.Tensor, classes: list[str], top_k: int) -> list[dict]:
    """The ``top_k`` most probable classes: name, label and probability (rounded to 6 digits)."""
    top = probs.topk(min(top_k, probs.numel()))
    return [
        {"class": classes[i], "label": int(i), "probability": round(float(p), 6)}
        for p, i in zip(top.values, top.indices, strict=True)
    ]
