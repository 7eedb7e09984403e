"""Performance harness: training-step time, peak memory, FLOPs and utilisation per method, side by side in one run.

    python -m vptune.perf --backbone dinov2-small --image-size 224 --batch-size 32 --json perf.json
    python -m vptune.perf --methods vpt-deep,full --profile     # where each step's time goes, by operator

Every method runs in a fresh process on the same random batch: warm-up steps, then the median of ``--repeats`` timed
steps; ``--rounds R`` times every method R times, round-robin, each time in a fresh process, and reports the median
(a slow spell of a shared machine then hits every method alike; time vs full is the median of the rounds' ratios).
Peak memory is that of one steady-state step after the timing (optimiser state exists), from the loaded model on;
"step memory" is that peak minus what the loaded model and batch already held, i.e. what training adds
(activations, gradients, optimiser state). "Saved for backward" counts exactly the bytes the step's forward keeps
for its backward (activations, and any cast copies of frozen weights), free of allocator noise. CUDA: max
allocated. CPU: peak RSS, measured in a second fresh process whose glibc returns freed tensors to the system (a
fixed mmap threshold), so that it follows the live tensors; the timing process's peak RSS with glibc's defaults is
reported beside it. The same run measures a large GEMM in the step's dtype; utilisation = the step's counted FLOPs
per second / that GEMM's FLOPs per second.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset
from torch.utils.flop_counter import FlopCounterMode

from .backbones import FAMILIES, SPEC_LOADERS, Backbone, load_backbone, resolve_spec
from .data import train_batches
from .engine import TrainConfig, autocast, make_optimizer
from .methods import METHODS, build, get_method
from .preprocessing import normalize
from .prompts import PromptConfig


# Every method's rows (``Method.perf_rows``): the plain step, and variants named by suffix: ``-ckpt<K>`` gradient
# checkpointing of the first K blocks (``-ckpt``: all), ``-compiled`` torch.compile, ``-whole`` whole blocks (no
# skipping of unread outputs), ``-cached`` training on the cached frozen trunk.
def rows() -> list[str]:
    """Every registered method's rows."""
    return [name + suffix for name, method in METHODS.items() for suffix in method.perf_rows]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_seconds(fn, device: torch.device, warmup: int, repeats: int) -> float:
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def training_step(args: argparse.Namespace, method: str) -> tuple[torch.nn.Module, Callable[[], None]]:
    """One row's model and a closure running one training step (forward, backward, optimiser) on a random batch."""
    device = torch.device(args.device)
    backbone = load_backbone(args.backbone)
    name, blocks = _base_method(method)
    prompt = PromptConfig(num_tokens=args.num_tokens, dropout=0.0) if get_method(name)[0].prompted else None
    model = build(name, backbone, 10, prompt, args.image_size).to(device).train()
    model.skip_unread = not method.endswith("-whole")  # -whole: every output of every block computed (the A/B)
    recompute = (blocks or backbone.depth) if "-ckpt" in method else 0  # blocks recomputed in the backward pass
    x = torch.randn(args.batch_size, 3, args.image_size, args.image_size, device=device)
    labels = torch.randint(0, 10, (args.batch_size,), device=device)
    start_point = 0
    if method.endswith("-cached"):  # what training on the cached frozen trunk costs per step
        start_point = model.cache_point()
        x = model.trunk(x, start_point)
    optimizer = make_optimizer(model, TrainConfig(base_lr=0.01).for_method(name))
    runner = torch.compile(model) if method.endswith("-compiled") else model  # compiled in the warm-up steps

    def step(module: torch.nn.Module = runner) -> None:
        with autocast(device, args.precision), model.recomputing(recompute):
            loss = F.cross_entropy(module(x, start=start_point).float(), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return model, step


def measure_method(args: argparse.Namespace, method: str) -> dict:
    """One method's training step: seconds, images/s, FLOPs per image, peak memory."""
    device = torch.device(args.device)
    model, step = training_step(args, method)
    resident = _memory_in_use(device)  # the loaded model and batch
    if args.time_only:
        return {"method": method, "step_seconds": _median_seconds(step, device, args.warmup, args.repeats)}
    if args.memory_only:
        step()  # warm-up: optimiser state exists from here
    else:
        seconds = _median_seconds(step, device, args.warmup, args.repeats)
    _reset_peak_memory(device)
    step()  # a steady-state step: optimiser state and the step's activations and gradients
    peak = _peak_memory(device)
    memory = {"peak_memory_bytes": peak, "step_memory_bytes": max(0, peak - resident)}  # RSS lags by a few pages
    if args.memory_only:
        return memory
    with FlopCounterMode(display=False) as counter:
        step(model)  # counted eagerly: a compiled step does the same arithmetic in fused kernels
    flops = counter.get_total_flops()
    saved = None if method.endswith("-compiled") else saved_for_backward(model, step)  # compiled: inside its graph
    return {
        "method": method,
        "step_seconds": seconds,
        "images_per_s": args.batch_size / seconds,
        "flops_per_image": flops / args.batch_size,
        "achieved_flops": flops / seconds,
        **memory,
        "saved_bytes": saved,
        "memory_kind": "cuda max allocated" if device.type == "cuda" else "peak RSS",
    }


def saved_for_backward(model: torch.nn.Module, step: Callable[[], None]) -> int:
    """Bytes that one training step's forward keeps for its backward: every distinct storage autograd saves, less
    the model's own parameters and buffers (resident anyway). Exact and free of allocator noise, unlike peak RSS."""
    resident = {tensor.untyped_storage().data_ptr() for tensor in (*model.parameters(), *model.buffers())}
    saved: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in resident:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        step()
    return sum(saved.values())


def profile(args: argparse.Namespace, method: str, rows: int = 20) -> str:
    """The operators that take a row's training step time (``--profile``): torch.profiler over ``--repeats`` steps."""
    from torch.profiler import ProfilerActivity

    device = torch.device(args.device)
    _, step = training_step(args, method)
    for _ in range(args.warmup):
        step()
    _sync(device)
    on_gpu = device.type == "cuda"
    activities = [ProfilerActivity.CPU, ProfilerActivity.CUDA] if on_gpu else [ProfilerActivity.CPU]
    with torch.profiler.profile(activities=activities) as profiler:
        for _ in range(args.repeats):
            step()
        _sync(device)
    order = "self_device_time_total" if on_gpu else "self_cpu_time_total"
    table = profiler.key_averages().table(sort_by=order, row_limit=rows)
    return f"{method}: {args.repeats} steps, operators by self {'device' if on_gpu else 'CPU'} time\n{table}"


def _base_method(row: str) -> tuple[str, int]:
    """A row's method and checkpointed blocks: ``vpt-deep-ckpt3`` -> (vpt-deep, 3); ``-ckpt`` alone = every block."""
    name, _, blocks = row.removesuffix("-cached").removesuffix("-compiled").removesuffix("-whole").partition("-ckpt")
    if blocks and not blocks.isdigit():
        raise ValueError(f"row {row!r}: write -ckpt<K> with K the number of checkpointed blocks, e.g. vpt-deep-ckpt3")
    return name, int(blocks or 0)


def _memory_in_use(device: torch.device) -> int:
    """CUDA: allocated bytes; CPU: the resident set."""
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device)
    return _proc_status_bytes("VmRSS") or _peak_memory(device)


def _reset_peak_memory(device: torch.device) -> None:
    """Start peak tracking now (CUDA: max allocated; Linux: the process's peak RSS, VmHWM)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
    except OSError:
        pass  # elsewhere the peak includes loading


def _peak_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return _proc_status_bytes("VmHWM") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _proc_status_bytes(key: str) -> int:
    """A ``kB`` field of ``/proc/self/status`` in bytes; 0 where there is no such file."""
    try:
        with open("/proc/self/status") as handle:
            line = next(line for line in handle if line.startswith(key + ":"))
    except (OSError, StopIteration):
        return 0
    return int(line.split()[1]) * 1024


def gemm_rate(device: torch.device, dtype: torch.dtype, size: int, repeats: int = 5) -> float:
    """FLOP/s of a square matrix multiply: the device's practical peak in this dtype."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    return 2 * size**3 / _median_seconds(lambda: a @ b, device, 2, repeats)


def default_rows(spec: str) -> list[str]:
    """The rows of every registered method that works on the backbone ``spec`` names (only its config is read):
    those whose needs its family's blocks meet (``Method.needs``, ``Backbone.capabilities``)."""
    from transformers import AutoConfig

    if any(spec.startswith(prefix) for prefix in SPEC_LOADERS):  # timm: a ViT whose fused qkv LoRA cannot take
        return [row for row in rows() if _base_method(row)[0] != "lora"]
    model_type = AutoConfig.from_pretrained(resolve_spec(spec)).model_type
    family = next((family for family in FAMILIES.values() if model_type in family.model_types), Backbone)
    return [row for row in rows() if _works_on(_base_method(row)[0], family.capabilities)]


def _works_on(method: str, capabilities: frozenset[str]) -> bool:
    return set(get_method(method)[0].needs) <= capabilities


@torch.no_grad()
def inference_rate(args: argparse.Namespace) -> dict:
    """Images/s of the backbone alone and of a VPT model (VPT-Deep, or VPT-Shallow where deep prompts do not
    apply), in eval mode."""
    device = torch.device(args.device)
    backbone = load_backbone(args.backbone).to(device)
    method = next(name for name in ("vpt-deep", "vpt-shallow") if _works_on(name, backbone.capabilities))
    prompted = build(method, backbone, 10, PromptConfig(num_tokens=args.num_tokens), args.image_size).to(device).eval()
    x = torch.randn(args.batch_size, 3, args.image_size, args.image_size, device=device)
    rates = {}
    for name, fn in (("backbone", lambda: backbone(x)), (method, lambda: prompted(x))):
        with autocast(device, args.precision):
            rates[name] = args.batch_size / _median_seconds(fn, device, args.warmup, args.repeats)
    return rates


def data_fraction(args: argparse.Namespace, step_seconds: float, streamed: bool = False) -> float:
    """Time to draw and normalise one batch of cached uint8 images, as a fraction of a training step: as ``fit``
    draws them (stacked once on the device), or, with ``streamed``, through a DataLoader (pinned memory on CUDA)."""
    device = torch.device(args.device)
    images = torch.randint(0, 256, (args.batch_size * 4, 3, args.image_size, args.image_size), dtype=torch.uint8)
    dataset = TensorDataset(images, torch.zeros(len(images), dtype=torch.long))
    sampler = DistributedSampler(dataset, num_replicas=1, rank=0, shuffle=True)
    if streamed:
        loader = DataLoader(dataset, args.batch_size, sampler=sampler, pin_memory=device.type == "cuda")
    else:
        loader = train_batches(dataset, args.batch_size, sampler, device)

    def draw() -> None:
        for batch, _ in loader:
            normalize(batch.to(device, non_blocking=True), (0.5,) * 3, (0.5,) * 3)

    return _median_seconds(draw, device, 1, 3) / 4 / step_seconds


def run(args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    rows = []
    for method in args.methods:
        rows.append(_in_fresh_process(args, method) if args.fresh else measure_method(args, method))
        row = rows[-1]  # a line per row as it comes, and the rows so far in the JSON: a run cut short keeps them
        print(
            f"{method}: {row['step_seconds']:.4f} s/step, peak {_mib(row['peak_memory_bytes'])} MiB, "
            f"saved for backward {_mib(row.get('saved_bytes'))} MiB",
            file=sys.stderr,
        )
        if args.json:
            _write_json(args.json, {"partial": True, "rows": rows})
    for row in rows:
        row["step_seconds_rounds"] = [row["step_seconds"]]
    for _ in range(args.rounds - 1):  # round-robin, so that a slow spell of the machine hits every row alike
        for row in rows:
            row["step_seconds_rounds"].append(_time_again(args, row["method"]))
    peak = gemm_rate(device, dtype, args.gemm_size)
    full = next((row for row in rows if row["method"] == "full"), None)
    for row in rows:
        row["step_seconds"] = statistics.median(row["step_seconds_rounds"])
        row["images_per_s"] = args.batch_size / row["step_seconds"]
        row["achieved_flops"] = row["flops_per_image"] * row["images_per_s"]
        row["utilisation"] = row["achieved_flops"] / peak
        if full is not None:  # the median of the rounds' ratios: robust to drift between rounds
            pairs = zip(row["step_seconds_rounds"], full["step_seconds_rounds"], strict=True)
            row["time_vs_full"] = statistics.median(seconds / full_seconds for seconds, full_seconds in pairs)
            row["memory_vs_full"] = row["peak_memory_bytes"] / full["peak_memory_bytes"]
            if full["step_memory_bytes"] > 0:
                row["step_memory_vs_full"] = row["step_memory_bytes"] / full["step_memory_bytes"]
            if row.get("saved_bytes") is not None and full.get("saved_bytes"):
                row["saved_vs_full"] = row["saved_bytes"] / full["saved_bytes"]
    deep = next((row for row in rows if row["method"] == "vpt-deep"), rows[0])
    return {
        "backbone": args.backbone,
        "size": args.image_size,
        "batch": args.batch_size,
        "device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
        "precision": args.precision,
        "threads": torch.get_num_threads(),
        "gemm_flops": peak,
        "rounds": args.rounds,
        "rows": rows,
        "inference_images_per_s": inference_rate(args),
        "data_time_row": deep["method"],
        "data_time_fraction": data_fraction(args, deep["step_seconds"]),
        "data_time_fraction_streamed": data_fraction(args, deep["step_seconds"], streamed=True),
    }


def _in_fresh_process(args: argparse.Namespace, method: str) -> dict:
    """Time ``method`` in a fresh process; on CPU, measure its memory in a second one with a strict allocator.

    glibc keeps freed blocks and raises its mmap threshold as tensors are freed, so with its defaults the peak RSS
    holds much memory no tensor uses; with a fixed 128 KiB threshold, freed tensors return to the system and peak
    RSS follows the live tensors (allocation is slower then, so the timing comes from the default process).
    """
    row = _child(args, method, {})
    if torch.device(args.device).type == "cpu":
        memory = _child(args, method, {"MALLOC_MMAP_THRESHOLD_": "131072"}, "--memory-only")
        row["peak_rss_default_malloc_bytes"] = row["peak_memory_bytes"]
        row.update(memory, memory_kind="peak RSS, glibc mmap threshold 128 KiB")
    return row


def _time_again(args: argparse.Namespace, method: str) -> float:
    """Another timing of ``method`` (step time only), in a fresh process unless ``--no-fresh``."""
    if not args.fresh:
        return measure_method(argparse.Namespace(**{**vars(args), "time_only": True}), method)["step_seconds"]
    return _child(args, method, {}, "--time-only")["step_seconds"]


def _child(args: argparse.Namespace, method: str, env: dict, *flags: str) -> dict:
    command = [sys.executable, "-m", "vptune.perf", "--one", method, *_forward_args(args), *flags]
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, **env})
    if done.returncode:
        raise RuntimeError(f"measuring {method} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _forward_args(args: argparse.Namespace) -> list[str]:
    pairs = {"--backbone": args.backbone, "--image-size": args.image_size, "--batch-size": args.batch_size}
    pairs["--device"] = args.device
    pairs.update({"--precision": args.precision, "--num-tokens": args.num_tokens, "--repeats": args.repeats})
    pairs["--warmup"] = args.warmup
    return [str(item) for pair in pairs.items() for item in pair]


def markdown(result: dict) -> str:
    lines = [
        f"{result['backbone']}, {result['size']}x{result['size']}, batch {result['batch']}, {result['device']}, "
        f"{result['precision']}, {result['threads']} threads; GEMM {result['gemm_flops'] / 1e9:.1f} GFLOP/s"
        + _rounds_note(result.get("rounds", 1)),
        "",
        "| method | step (s) | images/s | GFLOP/image | utilisation | peak memory (MiB) | step memory (MiB) "
        "| peak RSS, default malloc (MiB) | saved for backward (MiB) | time vs full | peak vs full "
        "| step memory vs full | saved vs full |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in result["rows"]:
        keys = ("time_vs_full", "memory_vs_full", "step_memory_vs_full", "saved_vs_full")
        versus = " | ".join(f"{row[key]:.2f}x" if key in row else "-" for key in keys)
        lines.append(
            f"| {row['method']} | {row['step_seconds']:.3f} | {row['images_per_s']:.1f} | "
            f"{row['flops_per_image'] / 1e9:.2f} | {100 * row['utilisation']:.0f}% | "
            f"{row['peak_memory_bytes'] / 2**20:.0f} | {row['step_memory_bytes'] / 2**20:.0f} | "
            f"{_mib(row.get('peak_rss_default_malloc_bytes'))} | {_mib(row.get('saved_bytes'))} | {versus} |"
        )
    rates = ", ".join(f"{name} {rate:.1f} images/s" for name, rate in result["inference_images_per_s"].items())
    lines += [
        "",
        f"Inference: {rates}. "
        f"Data time with cached inputs: {100 * result['data_time_fraction']:.1f}% of a "
        f"{result.get('data_time_row', 'vpt-deep')} step as fit draws "
        f"them (stacked on the device), {100 * result.get('data_time_fraction_streamed', float('nan')):.1f}% "
        "through a DataLoader.",
    ]
    return "\n".join(lines)


def _rounds_note(rounds: int) -> str:
    if rounds == 1:
        return ""
    return f"; step time: median of {rounds} rounds, time vs full: median of the rounds' ratios"


def _mib(count: int | None) -> str:
    return "-" if count is None else f"{count / 2**20:.0f}"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m vptune.perf", description=__doc__.splitlines()[0])
    add = parser.add_argument
    add("--backbone", default="dinov2-small", help="backbone spec (default: dinov2-small)")
    add("--image-size", "--size", dest="image_size", type=int, default=224, help="square input side (default: 224)")
    add("--batch-size", "--batch", dest="batch_size", type=int, default=32, help="images per step (default: 32)")
    add("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu, cuda ... (default: cuda if any)")
    add("--precision", default="fp32", choices=("fp32", "bf16"), help="fp32, or bf16 autocast (default: fp32)")
    add("--num-tokens", type=int, default=10, help="prompt tokens of the VPT rows (default: 10)")
    add(
        "--methods", type=_rows, default=None,
        help=f"comma-separated rows (default: all that apply to the backbone: {', '.join(rows())})",
    )  # fmt: skip
    add("--repeats", type=int, default=5, help="timed steps per row; the median is reported (default: 5)")
    add("--warmup", type=int, default=2, help="untimed steps before timing (default: 2)")
    add("--rounds", type=int, default=1, help="time every row this many times, round-robin (default: 1)")
    add("--gemm-size", type=int, default=2048, help="side of the GEMM that gives the device's peak (default: 2048)")
    add("--no-fresh", dest="fresh", action="store_false", help="measure every row in this process")
    add("--one", metavar="ROW", help="internal: measure one row and print it as JSON (a fresh process)")
    add("--memory-only", action="store_true", help="internal: with --one, peak memory only")
    add("--time-only", action="store_true", help="internal: with --one, step time only")
    add("--json", help="also write the result here")
    add("--profile", action="store_true", help="print each row's costliest operators instead")
    return parser


def _rows(text: str) -> list[str]:
    rows = [row for row in text.split(",") if row]
    for row in rows:
        try:
            get_method(_base_method(row)[0])
        except ValueError as error:
            raise argparse.ArgumentTypeError(f"row {row!r}: {error}; rows are a method with a suffix") from error
    return rows


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    args.methods = args.methods or default_rows(args.backbone)
    if args.one:  # a child process measuring one method
        print(json.dumps(measure_method(args, args.one)))
        return 0
    if args.profile:
        for method in args.methods:
            print(profile(args, method))
        return 0
    result = run(args)
    print(markdown(result))
    if args.json:
        _write_json(args.json, result)
    return 0


def _write_json(path: str, result: dict) -> None:
    with open(path, "w") as handle:
        json.dump(result, handle, indent=2)


if __name__ == "__main__":
    raise SystemExit(main())
