"""QualiCLIP's training objective on the similarities of degraded crops to the antonym prompts.

For each pristine image, two overlapping crops are degraded with the same composition at L increasing levels.
With `s+` / `s-` the cosine similarity of a crop's embedding to the positive / negative prompt of a pair:

- consistency: the two crops at the same level share content and degradation, so their similarities should be
  close: `max(0, |s(crop1, l) - s(crop2, l)| - margin_consistency)`, for `s+` and `s-`;
- positive ranking: a more degraded crop is less similar to the positive prompt:
  `max(0, s+(j) - s+(i) + margin_ranking)` for every level i < j;
- negative ranking: and more similar to the negative prompt: `max(0, s-(i) - s-(j) + margin_ranking)`.

Each term is averaged over images, crops, prompt pairs and level pairs.

Sources: the official QualiCLIP README names the three losses and what each enforces; the hinge forms above, the set
of ranked pairs (every i < j, both crops, every prompt pair) and the default margins are our reading and our choice,
not values checked against the paper (see training/README.md, "Recipe and sources").
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class QualiCLIPLossWeights:
    """
    Margins and weights of the three terms (see the module's docstring); the defaults are our choice.

    Attributes:
        margin_consistency (`float`, defaults to 0.025): Cosine-similarity gap tolerated between the two crops.
        margin_ranking (`float`, defaults to 0.05): Cosine-similarity gap demanded between two levels.
        weight_consistency (`float`, defaults to 1.0): Weight of the consistency term in the total loss.
        weight_positive (`float`, defaults to 1.0): Weight of the positive ranking term.
        weight_negative (`float`, defaults to 1.0): Weight of the negative ranking term.
    """

    margin_consistency: float = 0.025
    margin_ranking: float = 0.05
    weight_consistency: float = 1.0
    weight_positive: float = 1.0
    weight_negative: float = 1.0


def qualiclip_losses(similarities: torch.Tensor, weights: QualiCLIPLossWeights) -> dict[str, torch.Tensor]:
    """
    The consistency and the two ranking losses of QualiCLIP, and their weighted sum.

    Args:
        similarities (`torch.Tensor` of shape `(batch, levels, 2, num_pairs, 2)`): cosine similarity of each crop
            (third axis: the two crops) at each degradation level (increasing) to the (positive, negative) prompt of
            each pair, in [-1, 1].
        weights ([`QualiCLIPLossWeights`]): The margins and the weights of the terms.

    Returns:
        `dict[str, torch.Tensor]`: the scalars `loss` (the weighted sum), `consistency`, `positive` and `negative`,
        each >= 0.

    Raises:
        ValueError: when `similarities` does not have that shape.
    """
    if similarities.ndim != 5 or similarities.shape[2] != 2 or similarities.shape[-1] != 2:
        raise ValueError(f"expected (batch, levels, 2, num_pairs, 2) similarities, got {tuple(similarities.shape)}")
    positive, negative = similarities[..., 0], similarities[..., 1]  # (B, L, 2, P)

    crop_gap = (similarities[:, :, 0] - similarities[:, :, 1]).abs()
    consistency = (crop_gap - weights.margin_consistency).clamp(min=0).mean()

    levels = similarities.shape[1]
    less, more = torch.triu_indices(levels, levels, offset=1, device=similarities.device)  # all pairs i < j
    positive_rank = (positive[:, more] - positive[:, less] + weights.margin_ranking).clamp(min=0).mean()
    negative_rank = (negative[:, less] - negative[:, more] + weights.margin_ranking).clamp(min=0).mean()

    loss = (
        weights.weight_consistency * consistency
        + weights.weight_positive * positive_rank
        + weights.weight_negative * negative_rank
    )
    return {"loss": loss, "consistency": consistency, "positive": positive_rank, "negative": negative_rank}
