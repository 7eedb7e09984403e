"""vptune: Visual Prompt Tuning (Jia et al., ECCV 2022) on one frozen backbone, every variant and baseline.

Public API::

    bb = vptune.load_backbone("dinov2-small")
    model = vptune.build("vpt-deep", bb, num_classes=10, prompt=vptune.PromptConfig(num_tokens=10))
    vptune.fit(model, "eurosat", vptune.TrainConfig(epochs=10))
    vptune.save_task(model, "runs/eurosat")
    model = vptune.load_task("runs/eurosat")

One training job from a spec (what ``vptune train`` runs)::

    vptune.run(vptune.RunSpec("eurosat", "vpt-deep", image_size=112), out="runs/eurosat")
"""

from ._version import __version__
from .backbones import Backbone, load_backbone, register_family, wrap_model
from .data import open_task
from .engine import Splits, TrainConfig, TrainingDiverged, evaluate
from .export import export_onnx
from .loop import fit
from .methods import METHODS, BuildContext, Method, build, method_names, register
from .model import TaskModel
from .multitask import MultiTask
from .preprocessing import Preprocessing
from .prompts import PromptConfig
from .runs import RunResult, RunSpec, run
from .taskcheck import TaskFileError
from .taskfile import load_task, push_task, read_record, save_task

__all__ = [
    "Backbone",
    "BuildContext",
    "METHODS",
    "Method",
    "MultiTask",
    "Preprocessing",
    "PromptConfig",
    "RunResult",
    "RunSpec",
    "Splits",
    "TaskFileError",
    "TaskModel",
    "TrainConfig",
    "TrainingDiverged",
    "__version__",
    "build",
    "evaluate",
    "export_onnx",
    "fit",
    "load_backbone",
    "load_task",
    "method_names",
    "open_task",
    "push_task",
    "read_record",
    "register",
    "register_family",
    "run",
    "save_task",
    "wrap_model",
]
