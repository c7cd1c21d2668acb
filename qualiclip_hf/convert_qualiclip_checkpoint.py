"""Conversion of the official QualiCLIP checkpoint (`qualiclip.pth`) to a Hugging Face folder.

The official file is a pickled dict: `"clip_model.<key>"` for every tensor of OpenAI CLIP RN50 (the image tower
fine-tuned by QualiCLIP, the text tower untouched) and `"prompts_features"`, the `(14, 1024)` normalised text
embeddings of the seven antonym pairs. It is published as the release asset `weights/qualiclip.pth` of
github.com/miccunifi/QualiCLIP and, byte for byte the same file, as `QualiCLIP.pth` in the Hub repository
`chaofengc/IQA-PyTorch-Weights` (pyiqa's weight store), which is where `qualiclip_hf.loading` downloads it from.

QualiCLIP+ (pyiqa's prompt-learning variant) adds, per training dataset, a file `QualiCLIP+_<dataset>.pth` in the
same Hub repository: `{"params": {"prompt_learner.ctx": (14, 16, 512), "prompt_learner.token_prefix": (14, 1, 512),
"prompt_learner.token_suffix": (14, 60, 512)}}`, the learned context of each prompt and the token embeddings of the
text around it. The towers are those of `QualiCLIP.pth`.
"""

from __future__ import annotations

import hashlib
import re
import zipfile
from pathlib import Path
from typing import Any

import torch
from transformers import CLIPTokenizer

from .build_processor import make_processor
from .configuration_qualiclip import QualiCLIPConfig
from .modeling_qualiclip import QualiCLIPModel
from .processing_qualiclip import QualiCLIPProcessor

_CHECKPOINT_PREFIX = "clip_model."
_PROMPTS_KEY = "prompts_features"
# Keys of the CLIP state dict that are not tensors of our model: the JIT archive's bookkeeping scalars, and the
# learned temperature, which goes to the config.
_DROPPED_KEYS = {"input_resolution", "context_length", "vocab_size", "logit_scale"}
_TEXT_KEYS = ("token_embedding.", "positional_embedding", "transformer.", "ln_final.", "text_projection")
_PLUS_KEYS = ("prompt_learner.ctx", "prompt_learner.token_prefix", "prompt_learner.token_suffix")


class CheckpointError(ValueError):
    """The file is not a readable QualiCLIP / CLIP checkpoint."""


def _load_pickle_safely(path: Path) -> Any:
    """`torch.load(weights_only=True)`: tensors and plain containers only, never code; errors name the file."""
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    _check_zip_checksums(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as error:
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint (truncated or corrupt?): {error}") from None
    except Exception as error:  # an unpickler refusal (a pickle that carries code) is not a plain error subclass
        with open(path, "rb") as file:
            is_pickle = file.read(1) == b"\x80"  # the PROTO opcode that starts every pickle since protocol 2
        if not is_pickle and not zipfile.is_zipfile(path):
            raise CheckpointError(
                f"{path}: not a PyTorch checkpoint (neither a torch.save archive nor a pickle)"
            ) from None
        raise CheckpointError(
            f"{path}: refused to load: it holds more than tensors and plain containers ({_unpickler_cause(error)}), "
            "and such a file can run code when it is loaded"
        ) from None


def _unpickler_cause(error: Exception) -> str:
    """The cause in torch's refusal, without its advice to retry with `weights_only=False`, which we never take."""
    text = str(error)
    detail = text.partition("WeightsUnpickler error:")[2].strip().splitlines()
    return detail[0].strip() if detail else type(error).__name__


def _check_zip_checksums(path: Path) -> None:
    # `torch.save` files are zip archives with a CRC-32 per entry, which `torch.load` does not verify: a flipped byte
    # in a tensor would load silently as a wrong weight.
    if not zipfile.is_zipfile(path):
        return  # a legacy pickle (no checksums), or a file truncated before its directory: torch.load reports it
    try:
        with zipfile.ZipFile(path) as archive:
            damaged = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as error:
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint (truncated or corrupt?): {error}") from None
    if damaged is not None:
        raise CheckpointError(
            f"{path}: corrupt: the checksum of its entry '{damaged}' does not match its contents (damaged or altered "
            "file); download it again"
        )


def load_official_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """
    Reads an official-layout checkpoint safely (`weights_only=True`: tensors and plain containers only, no code).

    Raises:
        CheckpointError: naming the file and the cause when it is missing, truncated, not a checkpoint, or lacks
            the QualiCLIP keys.
    """
    path = Path(path)
    state_dict = _load_pickle_safely(path)
    if not isinstance(state_dict, dict) or _PROMPTS_KEY not in state_dict:
        raise CheckpointError(f"{path}: not a QualiCLIP checkpoint (no '{_PROMPTS_KEY}' entry)")
    if not any(key.startswith(_CHECKPOINT_PREFIX) for key in state_dict):
        raise CheckpointError(f"{path}: not a QualiCLIP checkpoint (no '{_CHECKPOINT_PREFIX}*' tensors)")
    return state_dict


def load_plus_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """
    Reads a QualiCLIP+ file of pyiqa (`QualiCLIP+_<dataset>.pth`) safely and returns its `params`.

    Raises:
        CheckpointError: naming the file and the cause when it is unreadable or lacks the prompt-learner tensors.
    """
    path = Path(path)
    checkpoint = _load_pickle_safely(path)
    params = checkpoint.get("params") if isinstance(checkpoint, dict) else None
    if not isinstance(params, dict) or not all(key in params for key in _PLUS_KEYS):
        raise CheckpointError(f"{path}: not a QualiCLIP+ checkpoint (needs 'params' with {', '.join(_PLUS_KEYS)})")
    return params


def config_from_state_dict(state_dict: dict[str, torch.Tensor], **overrides: Any) -> QualiCLIPConfig:
    """Infers the tower sizes from CLIP ResNet tensors (keys without the `clip_model.` prefix)."""
    if "visual.proj" in state_dict:
        raise CheckpointError("this is a CLIP ViT checkpoint; QualiCLIP uses the ResNet image tower")
    layers = [
        len({key.split(".")[2] for key in state_dict if key.startswith(f"visual.layer{stage}.")})
        for stage in (1, 2, 3, 4)
    ]
    width = state_dict["visual.layer1.0.conv1.weight"].shape[0]
    output_dim = state_dict["text_projection"].shape[1]
    pos_tokens = state_dict["visual.attnpool.positional_embedding"].shape[0]
    text_width = state_dict["ln_final.weight"].shape[0]
    vision_config = {
        "depths": layers,
        "embedding_size": width,
        # OpenAI's rule: 64 channels per attention head in the pool.
        "num_attention_heads": width * 32 // 64,
        "projection_dim": output_dim,
        "image_size": round((pos_tokens - 1) ** 0.5) * 32,
    }
    text_config = {
        "max_position_embeddings": state_dict["positional_embedding"].shape[0],
        "vocab_size": state_dict["token_embedding.weight"].shape[0],
        "hidden_size": text_width,
        "num_attention_heads": text_width // 64,
        "num_hidden_layers": len({key.split(".")[2] for key in state_dict if key.startswith("transformer.resblocks.")}),
        "projection_dim": output_dim,
    }
    vision_config.update(overrides.pop("vision_config", {}))
    clip_logit_scale = float(state_dict["logit_scale"].exp()) if "logit_scale" in state_dict else None
    return QualiCLIPConfig(
        vision_config=vision_config, text_config=text_config, clip_logit_scale=clip_logit_scale, **overrides
    )


def checkpoint_filter_fn(state_dict: dict[str, torch.Tensor], config: QualiCLIPConfig) -> dict[str, torch.Tensor]:
    """
    Maps CLIP ResNet tensor names (without the `clip_model.` prefix) to `QualiCLIPModel` names.

    `visual.*` becomes `vision_model.*` (with the downsample branch's `0`/`1` indices named `conv`/`bn`), the text
    tensors go under `text_model.` (the `transformer.` level is dropped), and the attention pool's positional
    embedding is kept only if the config uses it.
    """
    converted = {}
    for key, tensor in state_dict.items():
        if key in _DROPPED_KEYS:
            continue
        if key.startswith("visual."):
            if key == "visual.attnpool.positional_embedding" and not config.vision_config.use_pos_embedding:
                continue
            new_key = "vision_model." + key[len("visual.") :]
            new_key = re.sub(r"\.downsample\.0\.", ".downsample.conv.", new_key)
            new_key = re.sub(r"\.downsample\.1\.", ".downsample.bn.", new_key)
        elif key.startswith(_TEXT_KEYS):
            new_key = "text_model." + key.removeprefix("transformer.")
        else:
            raise CheckpointError(f"unexpected tensor '{key}' in a CLIP ResNet checkpoint")
        converted[new_key] = tensor
    return converted


def convert_state_dict(
    checkpoint: dict[str, torch.Tensor], **config_overrides: Any
) -> tuple[QualiCLIPConfig, dict[str, torch.Tensor]]:
    """Turns an official-layout checkpoint into a `(config, state_dict)` for `QualiCLIPModel`."""
    clip_state = {
        key[len(_CHECKPOINT_PREFIX) :]: tensor
        for key, tensor in checkpoint.items()
        if key.startswith(_CHECKPOINT_PREFIX)
    }
    config = config_from_state_dict(clip_state, **config_overrides)
    state_dict = checkpoint_filter_fn(clip_state, config)
    prompts = checkpoint[_PROMPTS_KEY].float()
    expected = (2 * config.num_prompt_pairs, config.vision_config.projection_dim)
    if prompts.shape != expected:
        raise CheckpointError(
            f"'{_PROMPTS_KEY}' has shape {tuple(prompts.shape)}, expected {expected} for {config.num_prompt_pairs} "
            "pairs"
        )
    state_dict["prompt_embeds"] = torch.nn.functional.normalize(prompts, dim=-1)
    return config, {key: tensor.float() for key, tensor in state_dict.items()}


def convert_qualiclip_plus(
    base_checkpoint: str | Path, plus_checkpoint: str | Path, output_dir: str | Path, **config_overrides: Any
) -> Path:
    """
    Converts QualiCLIP+ into a complete Hugging Face folder: the towers of the official-layout `base_checkpoint`
    (`QualiCLIP.pth`), the learned prompt context of pyiqa's `plus_checkpoint` (`QualiCLIP+_<dataset>.pth`) as
    `prompt_context`, and `prompt_embeds` recomputed from both. `source_checkpoint_sha256` is the base file's.

    Raises:
        CheckpointError: when a file is unreadable, or when the token embeddings stored around the context do not
            match our prompts and tokenizer (the context was learned for other prompts or another text tower).

    Returns:
        The output folder.
    """
    base_checkpoint, plus_checkpoint = Path(base_checkpoint), Path(plus_checkpoint)
    checkpoint = load_official_checkpoint(base_checkpoint)
    params = load_plus_checkpoint(plus_checkpoint)
    context = params["prompt_learner.ctx"].float()
    config, state_dict = convert_state_dict(
        checkpoint,
        source_checkpoint_sha256=sha256_of(base_checkpoint),
        prompt_context_length=context.shape[-2],
        **config_overrides,
    )
    num_prompts, width = 2 * config.num_prompt_pairs, config.text_config.hidden_size
    if context.ndim == 2:  # one context shared by every prompt (pyiqa's prompt_specific_ctx=False)
        context = context.expand(num_prompts, -1, -1)
    if context.shape != (num_prompts, config.prompt_context_length, width):
        raise CheckpointError(
            f"{plus_checkpoint}: 'prompt_learner.ctx' has shape {tuple(params['prompt_learner.ctx'].shape)}, "
            f"expected ({num_prompts}, n_ctx, {width}) for {num_prompts} prompts of the base checkpoint"
        )
    state_dict["prompt_context"] = context.contiguous()
    model = _build_checked_model(config, state_dict, base_checkpoint)
    processor = make_processor()
    _check_plus_token_embeddings(model, processor.tokenizer, params, plus_checkpoint)
    model.set_prompts(config.prompt_pairs, processor.tokenizer)
    return _save_folder(model, processor, output_dir)


def _build_checked_model(
    config: QualiCLIPConfig,
    state_dict: dict[str, torch.Tensor],
    source: Path,
    recomputed: frozenset[str] = frozenset(),
) -> QualiCLIPModel:
    """
    `QualiCLIPModel(config)` with `state_dict` loaded, refusing any missing or unexpected tensor.

    Args:
        recomputed: Tensors the caller computes after loading (the prompt embeddings of a CLIP checkpoint), which
            may therefore be missing.

    Raises:
        CheckpointError: naming `source` and the tensors.
    """
    model = QualiCLIPModel(config)
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    if set(missing) - recomputed or unexpected:
        raise CheckpointError(f"{source}: missing tensors {missing}, unexpected tensors {unexpected}")
    return model


def _save_folder(model: QualiCLIPModel, processor: QualiCLIPProcessor, output_dir: str | Path) -> Path:
    """Saves a complete folder: config, safetensors weights, processor and tokenizer files, remote code."""
    output_dir = Path(output_dir)
    model.save_pretrained(output_dir)
    processor.save_pretrained(output_dir)
    return output_dir


def _check_plus_token_embeddings(
    model: QualiCLIPModel, tokenizer: CLIPTokenizer, params: dict[str, torch.Tensor], path: Path
) -> None:
    # pyiqa stores, besides the context, the embeddings of the start token (`token_prefix`) and of the words, the
    # end token and the padding after it (`token_suffix`). We rebuild those from our tokenizer and token embedding
    # instead of storing them; they must agree, or the scores would silently differ from pyiqa's.
    texts = [text for pair in model.config.prompt_pairs for text in pair]
    tokens = tokenizer(
        texts, padding="max_length", max_length=model.config.text_config.max_position_embeddings, return_tensors="pt"
    )
    with torch.no_grad():
        embeds = model.text_model.token_embedding(tokens["input_ids"])
    prefix = params["prompt_learner.token_prefix"].float()
    suffix = params["prompt_learner.token_suffix"].float()
    if prefix.shape[:2] != (len(texts), 1) or suffix.shape[0] != len(texts):
        raise CheckpointError(
            f"{path}: token_prefix {tuple(prefix.shape)} / token_suffix {tuple(suffix.shape)} do not hold "
            f"{len(texts)} prompts"
        )
    # Tolerant enough for a context learned with fp16 token embeddings, far below the gap between two tokens.
    for index, (text, eot) in enumerate(zip(texts, (tokens["attention_mask"].sum(dim=-1) - 1).tolist(), strict=True)):
        start_matches = torch.allclose(prefix[index, 0], embeds[index, 0], atol=1e-3, rtol=1e-2)
        words_match = torch.allclose(suffix[index, :eot], embeds[index, 1 : eot + 1], atol=1e-3, rtol=1e-2)
        if not (start_matches and words_match):
            raise CheckpointError(
                f"{path}: its learned context belongs to other prompts or another CLIP text tower: the stored token "
                f"embeddings of prompt {index} do not match {text!r} through the base checkpoint's token embedding"
            )


def convert_checkpoint(checkpoint_path: str | Path, output_dir: str | Path, **config_overrides: Any) -> Path:
    """
    Converts an official-layout QualiCLIP checkpoint into a complete Hugging Face folder: config, safetensors
    weights, processor and tokenizer files, and the remote-code files for `trust_remote_code=True`.

    Returns:
        The output folder.
    """
    checkpoint_path = Path(checkpoint_path)
    checkpoint = load_official_checkpoint(checkpoint_path)
    config, state_dict = convert_state_dict(
        checkpoint, source_checkpoint_sha256=sha256_of(checkpoint_path), **config_overrides
    )
    model = _build_checked_model(config, state_dict, checkpoint_path)
    return _save_folder(model, make_processor(), output_dir)


def convert_clip_checkpoint(clip_path: str | Path, output_dir: str | Path, **config_overrides: Any) -> Path:
    """
    Turns an OpenAI CLIP ResNet checkpoint (`RN50.pt` as OpenAI publishes it: a TorchScript archive; or a plain
    state dict) into the starting point of QualiCLIP training: a complete folder whose prompt embeddings are
    computed with CLIP's own text tower for the seven antonym pairs.

    TorchScript archives are read with `torch.jit.load` (TorchScript, not arbitrary Python); anything else only
    with `torch.load(weights_only=True)`.
    """
    clip_path = Path(clip_path)
    if not clip_path.is_file():
        raise CheckpointError(f"{clip_path}: no such checkpoint file")
    if zipfile.is_zipfile(clip_path) and _is_torchscript(clip_path):
        _check_zip_checksums(clip_path)
        try:
            state_dict = torch.jit.load(str(clip_path), map_location="cpu").state_dict()
        except RuntimeError as error:
            raise CheckpointError(f"{clip_path}: not a readable TorchScript archive: {error}") from None
    else:
        state_dict = _load_pickle_safely(clip_path)
    if not isinstance(state_dict, dict) or "visual.layer1.0.conv1.weight" not in state_dict:
        raise CheckpointError(f"{clip_path}: not a CLIP ResNet checkpoint")
    config = config_from_state_dict(state_dict, source_checkpoint_sha256=sha256_of(clip_path), **config_overrides)
    weights = {key: tensor.float() for key, tensor in checkpoint_filter_fn(state_dict, config).items()}
    model = _build_checked_model(config, weights, clip_path, recomputed=frozenset({"prompt_embeds"}))
    processor = make_processor()
    model.set_prompts(config.prompt_pairs, processor.tokenizer)
    return _save_folder(model, processor, output_dir)


def _is_torchscript(path: Path) -> bool:
    with zipfile.ZipFile(path) as archive:
        return any("/code/" in name for name in archive.namelist())  # TorchScript keeps its code there


def sha256_of(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
