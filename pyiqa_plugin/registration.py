"""Registers `QualiCLIPHF` with pyiqa and points pyiqa's QualiCLIP metric names at it.

pyiqa looks a metric name up in `DEFAULT_CONFIGS` first, then builds the network named by the entry's `type` from
`ARCH_REGISTRY`, whose first lookup loads the `pyiqa.archs` entry points (ours calls `register`). So:

- the built-in names (`qualiclip`, `qualiclip+`, ...) already pass pyiqa's name check, and their entries name the
  arch "QualiCLIP"; registering our arch under that name makes them run ours even in the very call that loads
  the plugin, when pyiqa has already read the built-in entry;
- the new names (`qualiclip-hf`, `qualiclip-pyiqa`, ...) exist once `register` has run. pyiqa checks names before
  it loads any plugin, so in a fresh process they need `import pyiqa_plugin` (or an earlier `create_metric`).
"""

from __future__ import annotations

import copy
from typing import Any

# The name under which pyiqa's own QualiCLIP class registers itself, and which its metric entries use.
BUILTIN_ARCH_NAME = "QualiCLIP"
# Our arch, and pyiqa's built-in one under a name that no longer collides with ours.
ARCH_NAME = "QualiCLIPHF"
PYIQA_ARCH_NAME = "QualiCLIPPyIQA"
HF_SUFFIX = "-hf"
PYIQA_SUFFIX = "-pyiqa"

_registered = False


def metric_config(model_type: str) -> dict[str, Any]:
    """The `DEFAULT_CONFIGS` entry of our metric for `model_type` (a key of `MODEL_TYPES`)."""
    return {
        "metric_opts": {"type": ARCH_NAME, "model_type": model_type},
        "metric_mode": "NR",
        "lower_better": False,
        "score_range": "0, 1",
    }


def register() -> None:
    """
    Makes `pyiqa.create_metric` run `QualiCLIPHF` for every QualiCLIP name: `qualiclip`, `qualiclip+`,
    `qualiclip+-clive`, `qualiclip+-flive`, `qualiclip+-spaq`, and the same names with `-hf`. pyiqa's built-in
    implementation stays available with `-pyiqa` (`qualiclip-pyiqa`, `qualiclip+-pyiqa`, ...). Safe to call more than
    once; pyiqa calls it through the `pyiqa.archs` entry point, and `import pyiqa_plugin` calls it too.
    """
    global _registered
    if _registered:
        return

    # pyiqa's arch module registers its class as "QualiCLIP" when first imported, and refuses a name that is taken:
    # importing it before we take the name keeps it importable, and lets us register its class under a new name.
    from pyiqa.archs import qualiclip_arch as builtin_arch
    from pyiqa.default_model_configs import DEFAULT_CONFIGS
    from pyiqa.utils import get_root_logger
    from pyiqa.utils.registry import ARCH_REGISTRY

    from .qualiclip_arch import MODEL_TYPES, QualiCLIPHF

    ARCH_REGISTRY.register(builtin_arch.QualiCLIP, name=PYIQA_ARCH_NAME, override=True)
    ARCH_REGISTRY.register(QualiCLIPHF, name=ARCH_NAME, aliases=[BUILTIN_ARCH_NAME], override=True)

    for name in MODEL_TYPES:
        builtin_entry = DEFAULT_CONFIGS.get(name)
        if builtin_entry is not None and builtin_entry["metric_opts"]["type"] == BUILTIN_ARCH_NAME:
            pyiqa_entry = copy.deepcopy(builtin_entry)
            pyiqa_entry["metric_opts"]["type"] = PYIQA_ARCH_NAME
            DEFAULT_CONFIGS[name + PYIQA_SUFFIX] = pyiqa_entry
        DEFAULT_CONFIGS[name] = metric_config(name)
        DEFAULT_CONFIGS[name + HF_SUFFIX] = metric_config(name)

    _registered = True
    get_root_logger().info(
        "pyiqa_plugin: the metrics %s now run qualiclip_hf's QualiCLIP (arch %s, pyiqa's score formula by default); "
        "pyiqa's built-in implementation is %s",
        ", ".join(repr(name) for name in MODEL_TYPES),
        ARCH_NAME,
        ", ".join(repr(name + PYIQA_SUFFIX) for name in MODEL_TYPES),
    )
