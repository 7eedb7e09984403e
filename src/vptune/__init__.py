"""vptune: Visual Prompt Tuning (Jia et al., ECCV 2022) on one frozen backbone, every variant and baseline.

Public API::

    bb = vptune.load_backbone("dinov2-small")
    model = vptune.build("vpt-deep", bb, num_classes=10, prompt=vptune.PromptConfig(num_tokens=10))
    vptune.fit(model, "eurosat", vptune.TrainConfig(epochs=10))
    vptune.save_task(model, "runs/eurosat")
    model = vptune.load_task("runs/eurosat")
"""

__version__ = "0.1.0"

from .backbones import Backbone, load_backbone, wrap_model
from .engine import Splits, TrainConfig, TrainingDiverged, evaluate, fit
from .methods import METHODS, MethodOptions, build, method_names, register
from .model import TaskModel
from .multitask import MultiTask
from .prompts import PromptConfig
from .taskfile import TaskFileError, load_task, read_record, save_task

__all__ = [
    "Backbone",
    "METHODS",
    "MethodOptions",
    "MultiTask",
    "PromptConfig",
    "Splits",
    "TaskFileError",
    "TaskModel",
    "TrainConfig",
    "TrainingDiverged",
    "build",
    "evaluate",
    "fit",
    "load_backbone",
    "load_task",
    "method_names",
    "read_record",
    "register",
    "save_task",
    "wrap_model",
]
