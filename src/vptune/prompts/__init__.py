"""Visual prompts: the configuration, the interface every kind of prompt module answers, and the kinds.

Prompt tensors carry a leading task dimension T (1 for a single task), so a batch can pick each sample's prompts by
a task index: the path a multi-task model serves many tasks in one batch through. A backbone family says which kind
it takes and inserts it (``Backbone.new_prompts``, ``Backbone.prompted_features``); the prompts know no family.
"""

from .config import (
    CONV_LOCATIONS,
    INITS,
    LOCATIONS,
    PIXEL_LOCATIONS,
    READOUTS,
    TOKEN_INITS,
    PromptConfig,
    xavier_bound,
    xavier_norm,
)
from .module import Geometry, PromptModule
from .pixels import BorderPrompts, ChannelPrompts, PixelPrompts, normalized
from .tokens import Prompts, fourier

__all__ = [
    "CONV_LOCATIONS",
    "INITS",
    "LOCATIONS",
    "PIXEL_LOCATIONS",
    "READOUTS",
    "TOKEN_INITS",
    "BorderPrompts",
    "ChannelPrompts",
    "Geometry",
    "PixelPrompts",
    "PromptConfig",
    "PromptModule",
    "Prompts",
    "fourier",
    "normalized",
    "xavier_bound",
    "xavier_norm",
]
