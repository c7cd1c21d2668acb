"""QualiCLIP: no-reference image quality from the agreement of a CLIP image embedding with antonym prompts.

The image tower is OpenAI CLIP's ModifiedResNet whose attention pool skips the positional embedding, so images
are scored at their native resolution. The text tower is CLIP's causal transformer; it is frozen and only used
to (re)compute the prompt embeddings, which are stored as a buffer.

Reference: Agnolucci, Galteri, Bertini, "Quality-Aware Image-Text Alignment for Opinion-Unaware Image Quality
Assessment", arXiv:2403.11176.
"""

from __future__ import annotations

import difflib
import inspect
import math
import pickle
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.utils import ModelOutput, logging

from .configuration_qualiclip import (
    QualiCLIPConfig,
    QualiCLIPTextConfig,
    QualiCLIPVisionConfig,
    validate_prompt_pairs,
)

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

logger = logging.get_logger(__name__)

# Total stride of ModifiedResNet: a stride-2 stem convolution, a 2x2 average pool, and three stride-2 stages.
VISION_STRIDE = 32


@dataclass
class QualiCLIPOutput(ModelOutput):
    """
    Output of [`QualiCLIPModel`].

    Args:
        quality_score (`torch.FloatTensor` of shape `(batch_size,)`):
            Quality in [0, 1], higher is better: the mean over prompt pairs of the softmax probability of the
            positive prompt. With `config.quality_head="linear"`, the linear head's prediction of the opinion
            score rescaled to [0, 1] (it can stray slightly outside).
        logits_per_prompt (`torch.FloatTensor` of shape `(batch_size, num_prompt_pairs, 2)`):
            `logit_scale * cos(image, prompt)` for the (positive, negative) prompt of each pair.
        image_embeds (`torch.FloatTensor` of shape `(batch_size, projection_dim)`):
            L2-normalised image embeddings, in float32 (as the other outputs) whatever the model's dtype.
        hidden_states (`tuple(torch.FloatTensor)`, *optional*, returned when `output_hidden_states=True`):
            The image tower's feature maps, as transformers' `ResNetModel` returns them: the stem's output and each
            of the four stages' outputs, `(batch_size, channels, height / stride, width / stride)` with strides 4, 4,
            8, 16 and 32, in the tower's dtype. In a padded batch (`image_sizes`), each image's maps lie at the top
            left, zero-padded like the pixels.
    """

    quality_score: torch.FloatTensor | None = None
    logits_per_prompt: torch.FloatTensor | None = None
    image_embeds: torch.FloatTensor | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None


class ResidualOutputBatchNorm2d(nn.BatchNorm2d):
    """The BatchNorm that ends a residual branch; its own type lets it be zero-initialised (see `_init_weights`)."""


class Bottleneck(nn.Module):
    """ResNet bottleneck whose strided variant average-pools before the 3x3 convolution (anti-aliasing)."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.avgpool = nn.AvgPool2d(stride) if stride > 1 else nn.Identity()
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, 1, bias=False)
        self.bn3 = ResidualOutputBatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)

        self.downsample = None
        if stride > 1 or inplanes != planes * self.expansion:
            self.downsample = nn.Sequential(
                OrderedDict(
                    pool=nn.AvgPool2d(stride),
                    conv=nn.Conv2d(inplanes, planes * self.expansion, 1, bias=False),
                    bn=nn.BatchNorm2d(planes * self.expansion),
                )
            )

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        identity = hidden_states
        if self.downsample is not None:
            identity = self.downsample(hidden_states)
        out = self.relu(self.bn1(self.conv1(hidden_states)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(self.avgpool(out)))
        out += identity  # in place: on a CPU, allocating the sum costs as much as computing it
        return self.relu(out)


class AttentionPool2d(nn.Module):
    """
    CLIP's attention pooling: the mean of the feature map is prepended as a query token and attends to itself and to
    every spatial position; its output, projected, is the image embedding.

    Only the mean token's output is ever used, so only its query is needed, and with a single query the key and
    value projections can move from the `HW + 1` tokens to that query (see `forward`): the result is the same as
    full multi-head self-attention, without the two `(HW + 1) x C x C` projections that dominate on large images.
    """

    def __init__(self, embed_dim: int, num_heads: int, output_dim: int, num_pos_tokens: int | None) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.q_proj = nn.Linear(embed_dim, embed_dim)
        self.k_proj = nn.Linear(embed_dim, embed_dim)
        self.v_proj = nn.Linear(embed_dim, embed_dim)
        self.c_proj = nn.Linear(embed_dim, output_dim)
        # QualiCLIP runs without it; it exists only when the config asks for it, so that no unused parameter is
        # carried around (and trained) otherwise.
        self.positional_embedding = (
            nn.Parameter(torch.zeros(num_pos_tokens, embed_dim)) if num_pos_tokens is not None else None
        )

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """
        Args:
            features (`torch.Tensor` of shape `(batch_size, embed_dim, height, width)`): the last stage's output.

        Returns:
            `torch.Tensor` of shape `(batch_size, projection_dim)`.
        """
        batch_size, channels, height, width = features.shape
        # (B, HW, C); a view, not a copy, when the features are channels_last (as the image tower makes them).
        tokens = features.permute(0, 2, 3, 1).reshape(batch_size, height * width, channels)
        tokens = torch.cat([tokens.mean(dim=1, keepdim=True), tokens], dim=1)  # (B, L = HW + 1, C)
        if self.positional_embedding is not None:
            tokens = tokens + self._resized_positional_embedding(tokens.shape[1]).to(tokens.dtype)

        head_dim = channels // self.num_heads
        query = self.q_proj(tokens[:, 0]).view(batch_size, self.num_heads, head_dim) * head_dim**-0.5  # (B, h, d)
        # Attention logits q . (W_k t + b_k) = (W_k^T q) . t + q . b_k. The second term, the same for every token of
        # a head, does not change the softmax; it is kept so that every parameter stays in the graph (DDP).
        key_weight = self.k_proj.weight.view(self.num_heads, head_dim, channels)
        query_in_token_space = torch.einsum("bhd,hdc->bhc", query, key_weight)  # (B, h, C)
        key_bias_logit = (query * self.k_proj.bias.view(self.num_heads, head_dim)).sum(dim=-1, keepdim=True)
        logits = torch.einsum("bhc,blc->bhl", query_in_token_space, tokens) + key_bias_logit  # (B, h, L)
        attention = logits.softmax(dim=-1)
        # The attention weights sum to 1, so sum_l a_l (W_v t_l + b_v) = W_v (sum_l a_l t_l) + b_v.
        attended_tokens = torch.einsum("bhl,blc->bhc", attention, tokens)  # (B, h, C)
        value_weight = self.v_proj.weight.view(self.num_heads, head_dim, channels)
        pooled = torch.einsum("bhc,hdc->bhd", attended_tokens, value_weight) + self.v_proj.bias.view(
            self.num_heads, head_dim
        )
        return self.c_proj(pooled.reshape(batch_size, channels))

    def _resized_positional_embedding(self, num_tokens: int) -> torch.Tensor:
        # Same resizing as the official QualiCLIP code: the (tokens, channels) table is interpolated as one
        # image to the new number of tokens; at the training resolution it is the identity.
        table = self.positional_embedding
        if table.shape[0] == num_tokens:
            return table
        return F.interpolate(table[None, None], size=(num_tokens, table.shape[1]), mode="bicubic")[0, 0]


class QualiCLIPVisionTower(nn.Module):
    """OpenAI CLIP's ModifiedResNet: 3-convolution stem, anti-aliased bottleneck stages, attention pooling."""

    def __init__(self, config: QualiCLIPVisionConfig) -> None:
        super().__init__()
        width = config.embedding_size
        self.conv1 = nn.Conv2d(3, width // 2, 3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width // 2)
        self.conv2 = nn.Conv2d(width // 2, width // 2, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width // 2)
        self.conv3 = nn.Conv2d(width // 2, width, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(width)
        self.avgpool = nn.AvgPool2d(2)
        self.relu = nn.ReLU(inplace=True)

        inplanes = width
        stages = []
        for index, num_blocks in enumerate(config.depths):
            planes = width * 2**index
            blocks = [Bottleneck(inplanes, planes, stride=1 if index == 0 else 2)]
            inplanes = planes * Bottleneck.expansion
            blocks += [Bottleneck(inplanes, planes) for _ in range(1, num_blocks)]
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages

        num_pos_tokens = (config.image_size // VISION_STRIDE) ** 2 + 1 if config.use_pos_embedding else None
        self.attnpool = AttentionPool2d(width * 32, config.num_attention_heads, config.projection_dim, num_pos_tokens)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """
        Args:
            pixel_values (`torch.Tensor` of shape `(batch_size, 3, height, width)`): CLIP-normalised RGB.

        Returns:
            `torch.Tensor` of shape `(batch_size, projection_dim)`: unnormalised image embeddings.
        """
        return self.attnpool(self.forward_features(pixel_values)[0])

    def forward_features(
        self, pixel_values: torch.Tensor, output_hidden_states: bool = False
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...] | None]:
        """
        The convolutional part of the tower.

        Returns:
            The last stage's feature map, `(batch_size, embedding_size * 32, height / 32, width / 32)`, and, with
            `output_hidden_states`, the stem's and the four stages' feature maps (else `None`). Only asked-for maps
            are kept, so that a plain forward frees each stage's activations as soon as the next one is computed.
        """
        # channels_last: oneDNN and cuDNN run these convolutions faster on NHWC activations; the results match.
        hidden = pixel_values.contiguous(memory_format=torch.channels_last)
        hidden = self.relu(self.bn1(self.conv1(hidden)))
        hidden = self.relu(self.bn2(self.conv2(hidden)))
        hidden = self.relu(self.bn3(self.conv3(hidden)))
        hidden = self.avgpool(hidden)
        hidden_states = [hidden] if output_hidden_states else None
        for stage in (self.layer1, self.layer2, self.layer3, self.layer4):
            hidden = stage(hidden)
            if hidden_states is not None:
                hidden_states.append(hidden)
        return hidden, None if hidden_states is None else tuple(hidden_states)


class ResidualAttentionBlock(nn.Module):
    """Pre-LayerNorm transformer block of CLIP's text tower (QuickGELU MLP)."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(
            OrderedDict(c_fc=nn.Linear(width, width * 4), gelu=QuickGELU(), c_proj=nn.Linear(width * 4, width))
        )

    def forward(self, hidden: torch.Tensor, causal_mask: torch.Tensor) -> torch.Tensor:
        normed = self.ln_1(hidden)
        hidden = hidden + self.attn(normed, normed, normed, attn_mask=causal_mask, need_weights=False)[0]
        return hidden + self.mlp(self.ln_2(hidden))


class QuickGELU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class QualiCLIPTextTower(nn.Module):
    """CLIP's causal text transformer; the embedding is read at the end-of-text token and projected."""

    def __init__(self, config: QualiCLIPTextConfig) -> None:
        super().__init__()
        self.token_embedding = nn.Embedding(config.vocab_size, config.hidden_size)
        self.positional_embedding = nn.Parameter(torch.zeros(config.max_position_embeddings, config.hidden_size))
        self.resblocks = nn.ModuleList(
            [
                ResidualAttentionBlock(config.hidden_size, config.num_attention_heads)
                for _ in range(config.num_hidden_layers)
            ]
        )
        self.ln_final = nn.LayerNorm(config.hidden_size)
        self.text_projection = nn.Parameter(torch.zeros(config.hidden_size, config.projection_dim))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """
        Args:
            input_ids (`torch.LongTensor` of shape `(num_prompts, max_position_embeddings)`):
                CLIP BPE tokens padded to the context length, `<|startoftext|> ... <|endoftext|>`.
            attention_mask (`torch.LongTensor` of shape `(num_prompts, max_position_embeddings)`):
                1 up to and including the end-of-text token.

        Returns:
            `torch.Tensor` of shape `(num_prompts, projection_dim)`: unnormalised text embeddings.
        """
        return self.encode_embeddings(self.token_embedding(input_ids), attention_mask.sum(dim=-1) - 1)

    def encode_embeddings(self, token_embeds: torch.Tensor, eot_index: torch.Tensor) -> torch.Tensor:
        """
        Runs the transformer on token embeddings (learned prompt contexts enter here).

        Args:
            token_embeds (`torch.Tensor` of shape `(num_prompts, max_position_embeddings, hidden_size)`).
            eot_index (`torch.LongTensor` of shape `(num_prompts,)`): position of each end-of-text token.
        """
        length = token_embeds.shape[1]
        hidden = token_embeds + self.positional_embedding[:length].to(token_embeds.dtype)
        causal_mask = torch.full((length, length), float("-inf"), device=hidden.device).triu_(1).to(hidden.dtype)
        for block in self.resblocks:
            hidden = block(hidden, causal_mask)
        hidden = self.ln_final(hidden)
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), eot_index] @ self.text_projection


class QualiCLIPPreTrainedModel(PreTrainedModel):
    config_class = QualiCLIPConfig
    base_model_prefix = "qualiclip"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    supports_gradient_checkpointing = False
    _no_split_modules = ["Bottleneck", "ResidualAttentionBlock"]

    def _initialize_weights(self, module: nn.Module, is_custom_code: bool = False) -> None:
        # For code outside the transformers package, transformers skips every module whose own tensors are all loaded,
        # which includes every module without tensors of its own: the attention pool without its positional
        # embedding, whose `_init_weights` branch initialises its projections. That shortcut exists for custom
        # `_init_weights` that write tensors directly; this one only uses transformers' `init` functions, which skip
        # loaded tensors themselves, so every module is visited as transformers visits its own models.
        super()._initialize_weights(module, is_custom_code=False)

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        # CLIP's own initialisation (`CLIP.initialize_parameters` of OpenAI's clip/model.py), through transformers'
        # `init` functions: they skip tensors that were loaded from a checkpoint, so loading never overwrites weights
        # (tested by the save/load round trip). Biases CLIP leaves at PyTorch's random default are zeroed.
        if isinstance(module, AttentionPool2d):
            std = module.c_proj.in_features**-0.5
            for linear in (module.q_proj, module.k_proj, module.v_proj, module.c_proj):
                init.normal_(linear.weight, std=std)
                init.zeros_(linear.bias)
            if module.positional_embedding is not None:
                init.normal_(module.positional_embedding, std=std)
        elif isinstance(module, nn.Conv2d):
            init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(module, nn.BatchNorm2d):
            # Zero scale at the end of each residual branch: every block starts as the identity.
            if isinstance(module, ResidualOutputBatchNorm2d):
                init.zeros_(module.weight)
            else:
                init.ones_(module.weight)
            init.zeros_(module.bias)
            init.zeros_(module.running_mean)
            init.ones_(module.running_var)
            init.zeros_(module.num_batches_tracked)
        elif isinstance(module, QualiCLIPTextTower):
            width = module.ln_final.normalized_shape[0]
            residual_std = width**-0.5 * (2 * max(len(module.resblocks), 1)) ** -0.5
            init.normal_(module.token_embedding.weight, std=0.02)
            init.normal_(module.positional_embedding, std=0.01)
            init.normal_(module.text_projection, std=width**-0.5)
            for block in module.resblocks:
                init.normal_(block.attn.in_proj_weight, std=width**-0.5)
                init.zeros_(block.attn.in_proj_bias)
                init.normal_(block.attn.out_proj.weight, std=residual_std)
                init.zeros_(block.attn.out_proj.bias)
                init.normal_(block.mlp.c_fc.weight, std=(2 * width) ** -0.5)
                init.zeros_(block.mlp.c_fc.bias)
                init.normal_(block.mlp.c_proj.weight, std=residual_std)
                init.zeros_(block.mlp.c_proj.bias)
        elif isinstance(module, nn.LayerNorm):
            init.ones_(module.weight)
            init.zeros_(module.bias)
        elif isinstance(module, QualiCLIPModel):
            init.copy_(module.prompt_embeds, initial_prompt_embeds(*module.prompt_embeds.shape))
            if module.prompt_context is not None:
                init.normal_(module.prompt_context, std=0.02)  # CoOp's initialisation of learned contexts
            if module.linear_head is not None:
                init.zeros_(module.linear_head.weight)
                init.zeros_(module.linear_head.bias)


class QualiCLIPModel(QualiCLIPPreTrainedModel):
    """
    QualiCLIP for no-reference image quality assessment.

    `forward(pixel_values)` embeds the images, compares them with the stored prompt embeddings and returns a quality
    score in [0, 1] per image. Images of different sizes can be batched: pad them to a common size and pass their
    true sizes as `image_sizes` (what [`QualiCLIPImageProcessor`] does); each image is then cropped back and scored
    alone or with same-size companions, so padding never changes a score.

    Example:

    ```python
    >>> from transformers import AutoModel, AutoProcessor
    >>> model = AutoModel.from_pretrained("path/to/qualiclip", trust_remote_code=True)
    >>> processor = AutoProcessor.from_pretrained("path/to/qualiclip", trust_remote_code=True)
    >>> model(**processor(images=[image_a, image_b], return_tensors="pt")).quality_score  # shape (2,)
    ```
    """

    def __init__(self, config: QualiCLIPConfig) -> None:
        super().__init__(config)
        self.vision_model = QualiCLIPVisionTower(config.vision_config)
        self.text_model = QualiCLIPTextTower(config.text_config)
        self.text_model.requires_grad_(False)
        # Normalised text embeddings of the prompts, in (positive, negative) order per pair. Saved with the weights
        # so that scoring never runs the text tower.
        self.register_buffer(
            "prompt_embeds", initial_prompt_embeds(2 * config.num_prompt_pairs, config.vision_config.projection_dim)
        )
        # QualiCLIP+: learned context token embeddings of each prompt, in the order of `prompt_embeds`. They enter
        # the score only through `prompt_embeds`, which `set_prompts` recomputes from them.
        self.prompt_context = (
            nn.Parameter(
                torch.zeros(2 * config.num_prompt_pairs, config.prompt_context_length, config.text_config.hidden_size)
            )
            if config.prompt_context_length is not None
            else None
        )
        # `quality_head="linear"` (a model fine-tuned with `training/finetune.py --method ridge`): the score is a
        # linear map of the normalised image embedding instead of the prompts' softmax.
        self.linear_head = (
            nn.Linear(config.vision_config.projection_dim, 1) if config.quality_head == "linear" else None
        )
        self.post_init()

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: Any, *model_args: Any, **kwargs: Any) -> QualiCLIPModel:
        """
        [`PreTrainedModel.from_pretrained`], strict: a truncated or corrupt weight file, or tensors that do not match
        the config (missing, unexpected, or of another shape), raise an `OSError` naming the model and the tensors,
        instead of giving a model with randomly initialised parts, whose scores would be meaningless. Weights are
        read from safetensors, or from pickles with `torch.load(weights_only=True)` (transformers' default).

        As in transformers, `output_loading_info=True` returns `(model, loading_info)` and leaves the missing,
        unexpected and mismatched tensors (initialised as a fresh model's) to the caller, who asked for the report;
        `ignore_mismatched_sizes=True` accepts tensors of another shape the same way. Non-finite weights always
        raise.
        """
        output_loading_info = kwargs.pop("output_loading_info", False)
        ignore_mismatched_sizes = kwargs.pop("ignore_mismatched_sizes", False)
        try:
            model, info = super().from_pretrained(
                pretrained_model_name_or_path,
                *model_args,
                output_loading_info=True,
                ignore_mismatched_sizes=True,  # reported below, with the tensor names
                **kwargs,
            )
        except SafetensorError as error:
            raise OSError(
                f"{pretrained_model_name_or_path}: the weight file is truncated or corrupt (safetensors: {error})"
            ) from None
        except pickle.UnpicklingError as error:
            raise OSError(
                f"{pretrained_model_name_or_path}: refused the pickled weight file: it holds more than tensors (code "
                f"runs when such a file is unpickled) or is corrupt; only torch.load(weights_only=True) is used "
                f"({str(error).splitlines()[-1]})"
            ) from None
        problems: dict[str, list[str]] = {}
        if not output_loading_info:
            problems["missing"] = sorted(info["missing_keys"])
            problems["unexpected"] = sorted(info["unexpected_keys"])
        problems["load errors"] = list(info.get("error_msgs") or [])
        if not (ignore_mismatched_sizes or output_loading_info):
            problems["of another shape (file vs model)"] = [
                f"{key} {tuple(file_shape)} vs {tuple(model_shape)}"
                for key, file_shape, model_shape in sorted(info["mismatched_keys"])
            ]
        # Flipped bits in a tensor's bytes pass every check above; those that hit an exponent show up as NaN or inf.
        problems["not finite"] = [
            name
            for name, tensor in model.state_dict().items()
            if tensor.is_floating_point() and tensor.device.type != "meta" and not tensor.isfinite().all()
        ]
        found = "; ".join(f"{kind}: {', '.join(keys)}" for kind, keys in problems.items() if keys)
        if found:
            raise OSError(
                f"{pretrained_model_name_or_path}: the weights are corrupt or do not match the config: {found}"
            )
        return (model, info) if output_loading_info else model

    @property
    def min_image_size(self) -> int:
        """Smallest height and width the image tower accepts."""
        return VISION_STRIDE

    def forward(
        self,
        pixel_values: torch.Tensor,
        image_sizes: torch.Tensor | None = None,
        logit_scale: float | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs: Any,
    ) -> QualiCLIPOutput | tuple[torch.Tensor, ...]:
        """
        Args:
            pixel_values (`torch.FloatTensor` of shape `(batch_size, 3, height, width)`):
                CLIP-normalised RGB images (see [`QualiCLIPImageProcessor`]); any size of at least 32x32.
            image_sizes (`torch.LongTensor` of shape `(batch_size, 2)`, *optional*):
                The true `(height, width)` of each image when the batch was padded to a common size; padding lies
                below and to the right of each image. Omit it when no image is padded.
            logit_scale (`float`, *optional*):
                Overrides `config.logit_scale`, the multiplier of the cosine similarities.
            output_hidden_states (`bool`, *optional*):
                Also return the image tower's feature maps (defaults to `config.output_hidden_states`).
            return_dict (`bool`, *optional*): Return a [`QualiCLIPOutput`] (default) or a tuple.

        Returns:
            [`QualiCLIPOutput`] with `quality_score` `(batch_size,)`, `logits_per_prompt`
            `(batch_size, num_prompt_pairs, 2)`, `image_embeds` `(batch_size, projection_dim)` and, when asked,
            `hidden_states`.

        Raises:
            TypeError: an argument the model does not take (a misspelt `image_sizes` would otherwise score the
                padding).
        """
        _refuse_unknown_arguments("forward", kwargs, self.forward)
        _check_pixel_values(pixel_values, image_sizes)
        features = self.get_image_features(
            pixel_values, image_sizes, output_hidden_states=output_hidden_states, return_dict=True
        )
        # The head runs in float32 whatever the tower's dtype: a logit scale of 100 turns the rounding of a half
        # precision cosine (about 4e-3) into a visible change of the score.
        image_embeds = F.normalize(features.pooler_output.float(), dim=-1)
        quality_score, logits_per_prompt = self.score_embeddings(image_embeds, logit_scale=logit_scale)

        output = QualiCLIPOutput(
            quality_score=quality_score,
            logits_per_prompt=logits_per_prompt,
            image_embeds=image_embeds,
            hidden_states=features.hidden_states,
        )
        return_dict = self.config.return_dict if return_dict is None else return_dict
        return output if return_dict else output.to_tuple()

    def score_embeddings(
        self,
        image_embeds: torch.Tensor,
        prompt_embeds: torch.Tensor | None = None,
        logit_scale: float | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """
        The score head, in float32.

        Args:
            image_embeds (`torch.Tensor` of shape `(batch_size, projection_dim)`): L2-normalised image embeddings.
            prompt_embeds (`torch.Tensor` of shape `(2 * num_prompt_pairs, projection_dim)`, *optional*):
                L2-normalised prompt embeddings instead of the stored ones (prompt learning passes the ones it
                trains).
            logit_scale (`float`, *optional*): Overrides `config.logit_scale`.

        Returns:
            `tuple[torch.Tensor, torch.Tensor]`: `quality_score` `(batch_size,)` and `logits_per_prompt`
            `(batch_size, num_prompt_pairs, 2)`, as in [`QualiCLIPOutput`].
        """
        image_embeds = image_embeds.float()
        prompt_embeds = self.prompt_embeds if prompt_embeds is None else prompt_embeds
        scale = self.config.logit_scale if logit_scale is None else logit_scale
        logits = scale * image_embeds @ prompt_embeds.float().T
        logits_per_prompt = logits.view(logits.shape[0], -1, 2)
        if self.linear_head is None:
            quality_score = logits_per_prompt.softmax(dim=-1)[..., 0].mean(dim=-1)
        else:
            head = self.linear_head
            quality_score = F.linear(image_embeds, head.weight.float(), head.bias.float())[:, 0]
        return quality_score, logits_per_prompt

    def get_image_features(
        self,
        pixel_values: torch.Tensor,
        image_sizes: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs: Any,
    ) -> BaseModelOutputWithPooling | tuple[torch.Tensor, ...]:
        """
        The image tower's output, as transformers' `CLIPModel.get_image_features` returns it. With `image_sizes`, each
        image is cropped to its true size and images of equal size are embedded together.

        Args: as [`QualiCLIPModel.forward`].

        Returns:
            [`~modeling_outputs.BaseModelOutputWithPooling`] (a tuple with `return_dict=False` or
            `config.return_dict=False`):
            - `pooler_output` `(batch_size, projection_dim)`: the image embeddings, unnormalised (the attention pool's
              projected output), in the tower's dtype;
            - `last_hidden_state` `(batch_size, embedding_size * 32, height / 32, width / 32)`: the last stage's
              feature map, as transformers' `ResNetModel` returns it;
            - `hidden_states` (with `output_hidden_states`): the stem's and the four stages' feature maps.
            In a padded batch, each image's feature maps lie at the top left, zero-padded like the pixels.

        Raises:
            TypeError: an argument the method does not take.
        """
        _refuse_unknown_arguments("get_image_features", kwargs, self.get_image_features)
        if output_hidden_states is None:
            output_hidden_states = self.config.output_hidden_states
        pixel_values = pixel_values.to(self.vision_model.conv1.weight.dtype)
        padded_size = tuple(pixel_values.shape[-2:])
        groups: dict[tuple[int, int], list[int]] = {padded_size: list(range(pixel_values.shape[0]))}
        if image_sizes is not None:
            sizes = [tuple(size) for size in torch.as_tensor(image_sizes).tolist()]
            if len(sizes) != pixel_values.shape[0]:
                raise ValueError(f"got {len(sizes)} image_sizes for a batch of {pixel_values.shape[0]} images")
            groups = {}
            for index, size in enumerate(sizes):
                if size[0] > padded_size[0] or size[1] > padded_size[1]:
                    raise ValueError(f"image {index} claims size {size}, larger than the padded batch {padded_size}")
                groups.setdefault(size, []).append(index)

        if len(groups) == 1 and next(iter(groups)) == padded_size:
            self._check_size(padded_size)
            output = self._embed_images(pixel_values, output_hidden_states)
        else:
            parts = []
            for (height, width), indices in groups.items():
                self._check_size((height, width))
                index_tensor = torch.tensor(indices, device=pixel_values.device)
                parts.append(
                    (
                        index_tensor,
                        self._embed_images(pixel_values[index_tensor, :, :height, :width], output_hidden_states),
                    )
                )
            output = _merge_groups(parts, pixel_values.shape[0])

        return_dict = self.config.return_dict if return_dict is None else return_dict
        return output if return_dict else output.to_tuple()

    def _embed_images(
        self, pixel_values: torch.Tensor, output_hidden_states: bool = False
    ) -> BaseModelOutputWithPooling:
        """The image tower on `(batch_size, 3, height, width)` images of one size."""
        features, hidden_states = self.vision_model.forward_features(pixel_values, output_hidden_states)
        return BaseModelOutputWithPooling(
            last_hidden_state=features, pooler_output=self.vision_model.attnpool(features), hidden_states=hidden_states
        )

    def _check_size(self, size: tuple[int, int]) -> None:
        if min(size) < self.min_image_size:
            raise ValueError(
                f"an image of {size[0]}x{size[1]} pixels is smaller than the {self.min_image_size}x"
                f"{self.min_image_size} minimum of the image tower (its total stride); upscale it first"
            )

    @torch.no_grad()
    def set_prompts(
        self, prompt_pairs: list[tuple[str, str]] | list[list[str]], tokenizer: PreTrainedTokenizerBase
    ) -> None:
        """
        Replaces the prompt pairs and recomputes their embeddings with the (frozen) text tower, with the learned
        context inserted when the model has one (QualiCLIP+; call it again after changing `prompt_context`).

        Args:
            prompt_pairs: `(positive, negative)` pairs of prompts.
            tokenizer: CLIP's tokenizer (the one saved with the model, or `QualiCLIPProcessor.tokenizer`).
        """
        prompt_pairs = validate_prompt_pairs(prompt_pairs)
        texts = [text for pair in prompt_pairs for text in pair]
        tokens = tokenizer(
            texts,
            padding="max_length",
            max_length=self.config.text_config.max_position_embeddings,
            truncation=True,
            return_tensors="pt",
        ).to(self.prompt_embeds.device)
        embeds = self.encode_prompts(tokens["input_ids"], tokens["attention_mask"])
        self.config.prompt_pairs = prompt_pairs
        self.prompt_embeds = F.normalize(embeds.float(), dim=-1).to(self.prompt_embeds.dtype)

    def encode_prompts(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """
        Text embeddings of tokenised prompts. With a learned context (QualiCLIP+), each prompt becomes
        `<|startoftext|> context[:n/2] words context[n/2:] <|endoftext|>`, the layout of pyiqa's QualiCLIP+; the
        result is differentiable with respect to `prompt_context`, so the context can be trained.

        Args:
            input_ids (`torch.LongTensor` of shape `(num_prompts, max_position_embeddings)`): the prompts alone, padded.
            attention_mask (`torch.LongTensor` of shape `(num_prompts, max_position_embeddings)`).

        Returns:
            `torch.Tensor` of shape `(num_prompts, projection_dim)`: unnormalised text embeddings.
        """
        if self.prompt_context is None:
            return self.text_model(input_ids, attention_mask)
        num_prompts, length = input_ids.shape
        num_context = self.prompt_context.shape[1]
        if num_prompts != self.prompt_context.shape[0]:
            raise ValueError(
                f"the model has learned contexts for {self.prompt_context.shape[0]} prompts, got {num_prompts}"
            )
        eot_index = attention_mask.sum(dim=-1) - 1
        if int(eot_index.max()) + num_context >= length:
            raise ValueError(f"a prompt is too long to fit {num_context} context tokens in {length} positions")
        token_embeds = self.text_model.token_embedding(input_ids)
        context = self.prompt_context.to(token_embeds.dtype)
        half = num_context // 2
        rows = []
        for tokens, prompt_context, eot in zip(token_embeds, context, eot_index.tolist(), strict=True):
            # The padding after the end-of-text token is cut by as many positions as the context adds; the causal
            # mask keeps padding from influencing the end-of-text output, so only the length matters.
            words, end = tokens[1:eot], tokens[eot : length - num_context]
            rows.append(torch.cat([tokens[:1], prompt_context[:half], words, prompt_context[half:], end]))
        return self.text_model.encode_embeddings(torch.stack(rows), eot_index + num_context)


def initial_prompt_embeds(num_prompts: int, projection_dim: int) -> torch.Tensor:
    """
    The prompt embeddings of a model before weights are loaded or `set_prompts` runs, `(num_prompts, projection_dim)`:
    pair `i` is `(+e_k, -e_k)` with `k = i mod projection_dim`, unit vectors in opposite directions, so that a random
    model's scores still depend on the image. Deterministic, as buffers are in transformers: a model built on the
    meta device and initialised equals one built directly.
    """
    embeds = torch.zeros(num_prompts, projection_dim)
    for index in range(num_prompts):
        embeds[index, (index // 2) % projection_dim] = 1.0 if index % 2 == 0 else -1.0
    return embeds


def _refuse_unknown_arguments(method: str, kwargs: dict[str, Any], function: Any) -> None:
    """
    Raises `TypeError` naming the arguments of `kwargs` and the closest accepted name: the model's methods take
    `**kwargs` as transformers' do, but a misspelt argument silently ignored (`image_size` for `image_sizes`) would
    give wrong results.
    """
    if not kwargs:
        return
    accepted = [name for name in inspect.signature(function).parameters if name != "kwargs"]
    hints = []
    for name in kwargs:
        close = difflib.get_close_matches(name, accepted, n=1)
        hints.append(f"{name!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
    raise TypeError(
        f"QualiCLIPModel.{method}() got unexpected argument(s) {', '.join(hints)}; it takes {', '.join(accepted)}"
    )


def _merge_groups(
    parts: list[tuple[torch.Tensor, BaseModelOutputWithPooling]], batch_size: int
) -> BaseModelOutputWithPooling:
    """
    Puts the outputs of groups of same-size images back into batch order: embeddings row by row, feature maps at
    the top left of zero maps as large as the largest group's (the padding convention of the pixels).
    """

    def merge(tensors: list[torch.Tensor]) -> torch.Tensor:
        shape = [max(tensor.shape[dim] for tensor in tensors) for dim in range(1, tensors[0].ndim)]
        merged = tensors[0].new_zeros(batch_size, *shape)
        for (index, _), tensor in zip(parts, tensors, strict=True):
            region = (index, *(slice(0, size) for size in tensor.shape[1:]))
            merged[region] = tensor
        return merged.contiguous(memory_format=torch.channels_last) if merged.ndim == 4 else merged

    outputs = [output for _, output in parts]
    hidden_states = None
    if outputs[0].hidden_states is not None:
        hidden_states = tuple(merge(list(level)) for level in zip(*(o.hidden_states for o in outputs), strict=True))
    return BaseModelOutputWithPooling(
        last_hidden_state=merge([output.last_hidden_state for output in outputs]),
        pooler_output=merge([output.pooler_output for output in outputs]),
        hidden_states=hidden_states,
    )


def _check_pixel_values(pixel_values: Any, image_sizes: Any) -> None:
    """
    Refuses inputs that would give a meaningless score or a cryptic error deeper down. The values themselves have no
    hard bound once normalised (resampling overshoots, contrast changes), so only non-finite values are refused, and
    values that look like unnormalised 8-bit pixels are warned about.

    The value check runs only on CPU tensors: on an accelerator, reading a value back forces a device-to-host
    synchronisation at every forward. Inputs are checked where they enter instead (`QualiCLIPImageProcessor` refuses
    NaN, infinite and out-of-range pixels); shape and dtype are checked everywhere, at no cost.
    """
    if not isinstance(pixel_values, torch.Tensor):
        raise TypeError(f"pixel_values must be a torch.Tensor, got {type(pixel_values).__name__}")
    if pixel_values.ndim != 4 or pixel_values.shape[1] != 3:
        raise ValueError(
            f"pixel_values must be a (batch_size, 3, height, width) tensor, got shape {tuple(pixel_values.shape)}"
        )
    if not pixel_values.is_floating_point():
        raise TypeError(
            f"pixel_values must be a floating-point tensor of CLIP-normalised pixels, got {pixel_values.dtype}; "
            "QualiCLIPImageProcessor prepares images"
        )
    if image_sizes is not None and tuple(torch.as_tensor(image_sizes).shape) != (pixel_values.shape[0], 2):
        raise ValueError(
            f"image_sizes must have shape ({pixel_values.shape[0]}, 2), one (height, width) per image, got "
            f"{tuple(torch.as_tensor(image_sizes).shape)}"
        )
    if pixel_values.numel() == 0 or pixel_values.device.type != "cpu" or torch.compiler.is_compiling():
        return
    peak = pixel_values.detach().abs().amax().item()  # NaN and infinity both propagate to the peak
    if not math.isfinite(peak):
        raise ValueError("pixel_values contains NaN or infinite values")
    if peak > 25:
        logger.warning_once(
            f"pixel_values reach {peak:g}, far outside CLIP-normalised pixels (about -1.8 to 2.2): were the images "
            "normalised? QualiCLIPImageProcessor prepares them"
        )


__all__ = ["QualiCLIPModel", "QualiCLIPOutput", "QualiCLIPPreTrainedModel"]
