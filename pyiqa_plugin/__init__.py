"""pyiqa plugin: `pyiqa.create_metric("qualiclip")` runs `qualiclip_hf`'s QualiCLIP.

Installing the project is enough for the built-in names (`qualiclip`, `qualiclip+`, `qualiclip+-clive`,
`qualiclip+-flive`, `qualiclip+-spaq`): pyiqa loads this plugin through the `pyiqa.archs` entry point when it builds
its first network. The added names (`qualiclip-hf`, ... and pyiqa's built-in implementation as `qualiclip-pyiqa`,
...) are checked by pyiqa before it loads any plugin, so in a fresh process they need `import pyiqa_plugin` first.

Options of `create_metric(name, **options)`: `pretrained_model_name_or_path` (`"official"` by default, `"demo"`, a
converted folder or a Hub repository id), `max_size`, `logit_scale` (`"pyiqa"` by default, `"official"`, or a
number); see `QualiCLIPHF`.
"""

import importlib.util

if importlib.util.find_spec("pyiqa") is None:
    raise ImportError("pyiqa_plugin needs pyiqa: pip install 'qualiclip-hf[pyiqa]'")

from .qualiclip_arch import MODEL_TYPES, QualiCLIPHF
from .registration import ARCH_NAME, PYIQA_ARCH_NAME, metric_config, register

register()

__all__ = ["ARCH_NAME", "MODEL_TYPES", "PYIQA_ARCH_NAME", "QualiCLIPHF", "metric_config", "register"]
