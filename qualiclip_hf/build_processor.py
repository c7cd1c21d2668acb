"""Building the default QualiCLIP processor: CLIP's tokenizer and the full-resolution image processor.

Saved folders carry their own tokenizer files (`tokenizer.json`, ...), so scoring never builds a tokenizer. It is
needed only when a folder is made: converting the official weights, starting a training run from scratch, or
saving a trained model. Two sources give the same tokenizer:

- `load_clip_tokenizer()` reads the tokenizer files shipped inside this package (beside the embedded demo model),
  so that converting and training need nothing beyond the core dependencies;
- `build_clip_tokenizer()` builds it from the BPE merges inside the `openai-clip` package
  (`pip install "qualiclip-hf[tokenizer]"`), which is how the shipped files were made and how the tests check
  them against `clip.tokenize`.
"""

from __future__ import annotations

import gzip
import importlib.util
from pathlib import Path

from transformers import CLIPTokenizer
from transformers.convert_slow_tokenizer import bytes_to_unicode

from .image_processing_qualiclip import QualiCLIPImageProcessor
from .processing_qualiclip import QualiCLIPProcessor

# The tokenizer files of the embedded demo model: CLIP's tokenizer as `build_clip_tokenizer` makes it.
SHIPPED_TOKENIZER_DIR = Path(__file__).parent / "demo_model"
# OpenAI's vocabulary has 49408 entries: 256 byte symbols, their 256 end-of-word forms, 48894 merges and 2 special
# tokens (`clip/simple_tokenizer.py` of github.com/openai/CLIP).
CLIP_VOCAB_SIZE = 49408
_NUM_MERGES = CLIP_VOCAB_SIZE - 2 * 256 - 2

__all__ = ["CLIP_VOCAB_SIZE", "build_clip_tokenizer", "load_clip_tokenizer", "make_processor"]


def load_clip_tokenizer() -> CLIPTokenizer:
    """
    CLIP's tokenizer, read from the tokenizer files shipped with this package (no optional dependency).

    Raises:
        OSError: when the package's tokenizer files are missing (a damaged installation).
    """
    return CLIPTokenizer.from_pretrained(SHIPPED_TOKENIZER_DIR)


def build_clip_tokenizer() -> CLIPTokenizer:
    """
    CLIP's tokenizer built offline from the BPE merges that ship inside the `openai-clip` package
    (`clip/bpe_simple_vocab_16e6.txt.gz`), with the vocabulary laid out exactly as OpenAI's `SimpleTokenizer`
    builds it, so token ids match `clip.tokenize`.

    Raises:
        FileNotFoundError: when `openai-clip` is not installed (`pip install "qualiclip-hf[tokenizer]"`).
    """
    merges = _read_clip_bpe_merges()
    byte_symbols = list(bytes_to_unicode().values())
    tokens = byte_symbols + [symbol + "</w>" for symbol in byte_symbols]
    tokens += ["".join(merge) for merge in merges] + ["<|startoftext|>", "<|endoftext|>"]
    return CLIPTokenizer(vocab={token: index for index, token in enumerate(tokens)}, merges=merges)


def _read_clip_bpe_merges() -> list[tuple[str, str]]:
    spec = importlib.util.find_spec("clip")  # locate the data file without importing the package
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    candidates = [Path(location) / "bpe_simple_vocab_16e6.txt.gz" for location in locations]
    bpe_path = next((path for path in candidates if path.is_file()), None)
    if bpe_path is None:
        raise FileNotFoundError(
            "CLIP's BPE vocabulary (bpe_simple_vocab_16e6.txt.gz) was not found: install the 'openai-clip' package "
            '(pip install "qualiclip-hf[tokenizer]")'
        )
    with gzip.open(bpe_path, "rt", encoding="utf-8") as file:
        lines = file.read().split("\n")
    # The first line is a version header; the next `_NUM_MERGES` lines are the merges OpenAI uses.
    return [tuple(line.split()) for line in lines[1 : _NUM_MERGES + 1]]


def make_processor(tokenizer: CLIPTokenizer | None = None) -> QualiCLIPProcessor:
    """
    The default processor: full-resolution image processing and CLIP's tokenizer.

    Args:
        tokenizer: The tokenizer to bundle; by default the one shipped with the package (`load_clip_tokenizer`).
    """
    return QualiCLIPProcessor(image_processor=QualiCLIPImageProcessor(), tokenizer=tokenizer or load_clip_tokenizer())
