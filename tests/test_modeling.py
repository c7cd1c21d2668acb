import copy

import pytest
import torch
from safetensors.torch import load_file

from qualiclip_hf import QUALICLIP_PROMPT_PAIRS, QualiCLIPConfig, QualiCLIPModel, QualiCLIPOutput
from qualiclip_hf.backends.fusion import fuse_conv_batch_norm, fuse_for_inference
from qualiclip_hf.modeling_qualiclip import Bottleneck

from .conftest import TINY_TEXT, TINY_VISION, tiny_config


def images(*sizes, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(3, h, w, generator=generator) for h, w in sizes]


@torch.no_grad()
def test_output_shapes_and_score_range(tiny_model):
    out = tiny_model(torch.randn(3, 3, 64, 96))
    assert isinstance(out, QualiCLIPOutput)
    assert out.quality_score.shape == (3,)
    assert out.logits_per_prompt.shape == (3, 7, 2)
    assert out.image_embeds.shape == (3, 32)
    assert torch.all((out.quality_score >= 0) & (out.quality_score <= 1))
    assert torch.allclose(out.image_embeds.norm(dim=-1), torch.ones(3), atol=1e-5)


@torch.no_grad()
def test_score_is_the_mean_positive_softmax_at_logit_scale(tiny_model):
    x = torch.randn(2, 3, 64, 64)
    out = tiny_model(x)
    cosine = out.image_embeds @ tiny_model.prompt_embeds.T
    expected = (100.0 * cosine).view(2, 7, 2).softmax(-1)[..., 0].mean(-1)
    torch.testing.assert_close(out.quality_score, expected)
    half = tiny_model(x, logit_scale=50.0).quality_score
    torch.testing.assert_close(half, (50.0 * cosine).view(2, 7, 2).softmax(-1)[..., 0].mean(-1))


@torch.no_grad()
def test_any_resolution_works_without_positional_embedding(tiny_model):
    for height, width in [(32, 32), (33, 47), (224, 224), (300, 97)]:
        assert tiny_model(torch.randn(1, 3, height, width)).quality_score.shape == (1,)


@torch.no_grad()
def test_too_small_images_are_refused_clearly(tiny_model):
    with pytest.raises(ValueError, match=r"16x16 pixels is smaller than the 32x32 minimum"):
        tiny_model(torch.randn(1, 3, 16, 16))
    with pytest.raises(ValueError, match="batch_size, 3, height, width"):
        tiny_model(torch.randn(3, 64, 64))


@torch.no_grad()
def test_padded_mixed_size_batch_gives_each_image_its_own_score(tiny_model):
    batch_images = images((64, 96), (40, 40), (64, 96), (97, 33))
    alone = torch.cat([tiny_model(image[None]).quality_score for image in batch_images])
    height = max(image.shape[1] for image in batch_images)
    width = max(image.shape[2] for image in batch_images)
    padded = torch.full((4, 3, height, width), 7.0)  # the padding value must not matter
    for index, image in enumerate(batch_images):
        padded[index, :, : image.shape[1], : image.shape[2]] = image
    sizes = torch.tensor([image.shape[1:] for image in batch_images])
    batched = tiny_model(padded, image_sizes=sizes).quality_score
    torch.testing.assert_close(batched, alone, atol=1e-6, rtol=0)


@torch.no_grad()
def test_image_sizes_larger_than_the_batch_are_refused(tiny_model):
    with pytest.raises(ValueError, match="larger than the padded batch"):
        tiny_model(torch.randn(1, 3, 64, 64), image_sizes=torch.tensor([[65, 64]]))


@torch.no_grad()
def test_attention_pool_equals_full_self_attention(tiny_model):
    pool = tiny_model.vision_model.attnpool
    features = torch.randn(2, 256, 3, 5)
    tokens = features.flatten(2).permute(2, 0, 1)
    tokens = torch.cat([tokens.mean(0, keepdim=True), tokens])
    full, _ = torch.nn.functional.multi_head_attention_forward(
        tokens, tokens, tokens, 256, pool.num_heads, None,
        torch.cat([pool.q_proj.bias, pool.k_proj.bias, pool.v_proj.bias]), None, None, False, 0.0,
        pool.c_proj.weight, pool.c_proj.bias, use_separate_proj_weight=True, q_proj_weight=pool.q_proj.weight,
        k_proj_weight=pool.k_proj.weight, v_proj_weight=pool.v_proj.weight, need_weights=False, training=False,
    )  # fmt: skip
    torch.testing.assert_close(pool(features), full[0], atol=1e-5, rtol=1e-5)


def test_save_and_load_keeps_every_tensor_bit_identical(tiny_model, tmp_path):
    tiny_model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    loaded = QualiCLIPModel.from_pretrained(tmp_path)
    original = tiny_model.state_dict()
    reloaded = loaded.state_dict()
    assert original.keys() == reloaded.keys()
    for key, tensor in original.items():
        assert torch.equal(tensor, reloaded[key]), key
    # The prompt embeddings travel in the safetensors file, not only in memory.
    assert torch.equal(load_file(tmp_path / "model.safetensors")["prompt_embeds"], tiny_model.prompt_embeds)


def test_text_tower_is_frozen_and_image_tower_trainable(tiny_model):
    assert not any(p.requires_grad for p in tiny_model.text_model.parameters())
    assert all(p.requires_grad for p in tiny_model.vision_model.parameters())


def test_score_is_differentiable_with_respect_to_the_input(tiny_model):
    x = torch.randn(1, 3, 64, 64, requires_grad=True)
    tiny_model(x).quality_score.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_fresh_model_starts_with_identity_residual_branches():
    model = QualiCLIPModel(tiny_config())
    bottlenecks = [m for m in model.modules() if isinstance(m, Bottleneck)]
    assert bottlenecks and all(torch.count_nonzero(m.bn3.weight) == 0 for m in bottlenecks)
    torch.testing.assert_close(model.prompt_embeds.norm(dim=-1), torch.ones(14))


@torch.no_grad()
def test_set_prompts_recomputes_embeddings_with_the_text_tower(tiny_model, tokenizer):
    model = QualiCLIPModel(tiny_config()).eval()
    model.load_state_dict(tiny_model.state_dict())
    model.set_prompts([("Crisp photo.", "Smeared photo.")], tokenizer)
    assert model.config.prompt_pairs == [["Crisp photo.", "Smeared photo."]]
    assert model.prompt_embeds.shape == (2, 32)
    tokens = tokenizer(["Crisp photo.", "Smeared photo."], padding="max_length", max_length=77, return_tensors="pt")
    direct = model.text_model(tokens["input_ids"], tokens["attention_mask"])
    torch.testing.assert_close(model.prompt_embeds, torch.nn.functional.normalize(direct, dim=-1))
    assert model(torch.randn(1, 3, 64, 64)).logits_per_prompt.shape == (1, 1, 2)
    # Recomputing the official pairs gives back the embeddings the fixture stored.
    model.set_prompts(QUALICLIP_PROMPT_PAIRS, tokenizer)
    torch.testing.assert_close(model.prompt_embeds, tiny_model.prompt_embeds)


@torch.no_grad()
def test_positional_embedding_flag_adds_the_table_and_still_takes_any_size():
    model = QualiCLIPModel(tiny_config(vision={"use_pos_embedding": True}))
    table = model.vision_model.attnpool.positional_embedding
    assert table is not None and table.shape == (7 * 7 + 1, 256)
    assert model.eval()(torch.randn(1, 3, 96, 160)).quality_score.shape == (1,)
    assert QualiCLIPModel(tiny_config()).vision_model.attnpool.positional_embedding is None


def test_return_dict_false_gives_a_tuple(tiny_model):
    with torch.no_grad():
        score, logits, embeds = tiny_model(torch.randn(1, 3, 64, 64), return_dict=False)
    assert score.shape == (1,) and logits.shape == (1, 7, 2) and embeds.shape == (1, 32)


def _conv_and_norm(seed: int = 0) -> tuple[torch.nn.Conv2d, torch.nn.BatchNorm2d]:
    generator = torch.Generator().manual_seed(seed)
    conv = torch.nn.Conv2d(4, 6, 3, padding=1, bias=False)
    norm = torch.nn.BatchNorm2d(6)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=generator))
        norm.weight.copy_(torch.rand(6, generator=generator) + 0.5)
        norm.bias.copy_(torch.randn(6, generator=generator))
        norm.running_mean.copy_(torch.randn(6, generator=generator))
        norm.running_var.copy_(torch.rand(6, generator=generator) + 0.5)
    return conv, norm


@torch.no_grad()
def test_fused_convolution_equals_convolution_then_batch_norm():
    conv, norm = _conv_and_norm()
    conv.eval(), norm.eval()
    x = torch.randn(2, 4, 9, 7)
    torch.testing.assert_close(fuse_conv_batch_norm(conv, norm)(x), norm(conv(x)))
    conv.double(), norm.double()
    fused = fuse_conv_batch_norm(conv, norm)
    assert fused.weight.dtype == torch.float64
    torch.testing.assert_close(fused(x.double()), norm(conv(x.double())))
    # Half-precision weights are folded in float32: the fused weight is the float32 fold, rounded once.
    conv_half, norm_half = _conv_and_norm()
    conv_half.half(), norm_half.half()
    expected = fuse_conv_batch_norm(copy.deepcopy(conv_half).float(), copy.deepcopy(norm_half).float())
    assert torch.equal(fuse_conv_batch_norm(conv_half, norm_half).weight, expected.weight.half())


def test_fused_model_keeps_gradients_for_the_input():
    conv, norm = _conv_and_norm()
    conv.eval(), norm.eval()
    x = torch.randn(2, 4, 9, 7, requires_grad=True)
    (fused_grad,) = torch.autograd.grad(fuse_conv_batch_norm(conv, norm)(x).square().sum(), [x])
    (reference_grad,) = torch.autograd.grad(norm(conv(x)).square().sum(), [x])
    torch.testing.assert_close(fused_grad, reference_grad, rtol=1e-4, atol=1e-4)


@torch.no_grad()
def test_fused_scores_equal_the_model_which_is_left_as_it_was_and_the_fused_scorer_is_for_inference_only(tiny_model):
    x = torch.randn(3, 3, 70, 90)
    unfused = tiny_model(x)
    before = {key: value.clone() for key, value in tiny_model.state_dict().items()}
    scorer = fuse_for_inference(tiny_model)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in scorer.modules())
    # The model file keeps only the math: fusing never changes the model it was given.
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in tiny_model.modules()) > 0
    assert all(torch.equal(value, before[key]) for key, value in tiny_model.state_dict().items())
    fused = scorer(x.contiguous())
    torch.testing.assert_close(fused.image_embeds, unfused.image_embeds, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fused.quality_score, unfused.quality_score, atol=1e-6, rtol=0)
    assert scorer.device == tiny_model.device
    with pytest.raises(RuntimeError, match="fused for inference"):
        scorer.train()
    scorer.eval()  # eval mode stays allowed (Grad-CAM restores the mode it found)


def test_training_mode_normalises_with_batch_statistics_and_updates_them(tiny_model):
    model = copy.deepcopy(tiny_model).train()
    norm = model.vision_model.bn1
    before = norm.running_mean.clone()
    model(torch.randn(2, 3, 64, 64))
    assert not torch.equal(norm.running_mean, before)


@torch.no_grad()
def test_half_precision_weights_still_give_a_float32_score_close_to_float32(tiny_model):
    x = torch.randn(2, 3, 64, 96)
    reference = tiny_model(x).quality_score
    half = copy.deepcopy(tiny_model).to(torch.bfloat16)(x)
    assert half.quality_score.dtype == torch.float32 and half.image_embeds.dtype == torch.float32
    torch.testing.assert_close(half.quality_score, reference, atol=2e-2, rtol=0)


@torch.no_grad()
def test_cpu_chunks_of_the_fused_scorer_give_the_whole_batch_scores_and_the_model_keeps_its_batch(
    tiny_model, monkeypatch
):
    x = torch.randn(5, 3, 64, 96)
    sizes = torch.tensor([[64, 96], [64, 64], [32, 96], [64, 96], [48, 80]])
    whole = tiny_model(x, sizes).quality_score
    calls = []
    tower_features = type(tiny_model.vision_model).forward_features
    monkeypatch.setattr(
        type(tiny_model.vision_model),
        "forward_features",
        lambda self, images, *args: calls.append(len(images)) or tower_features(self, images, *args),
    )
    unpadded = tiny_model(x).quality_score
    assert calls == [5], "a plain model keeps the batch whole"
    calls.clear()
    scorer = fuse_for_inference(tiny_model, cpu_chunk_pixels=2 * 64 * 96)
    torch.testing.assert_close(scorer(x).quality_score, unpadded, atol=1e-6, rtol=0)
    assert calls == [2, 2, 1]
    torch.testing.assert_close(scorer(x, sizes).quality_score, whole, atol=1e-6, rtol=0)  # true sizes kept per chunk


def test_misspelt_or_unknown_arguments_are_refused_with_the_close_name(tiny_model):
    pixel_values = torch.randn(1, 3, 64, 64)
    with pytest.raises(TypeError, match=r"'image_size' \(did you mean 'image_sizes'\?\)"):
        tiny_model(pixel_values=pixel_values, image_size=torch.tensor([[64, 64]]))
    with pytest.raises(TypeError, match="'output_attentions'"):
        tiny_model.get_image_features(pixel_values, output_attentions=True)


@torch.no_grad()
def test_image_features_of_a_padded_batch_are_each_images_own(tiny_model):
    a, b = images((64, 96), (96, 64))
    batch = torch.zeros(2, 3, 96, 96)
    batch[0, :, :64, :96], batch[1, :, :96, :64] = a, b
    padded = tiny_model.get_image_features(batch, torch.tensor([[64, 96], [96, 64]]), output_hidden_states=True)
    assert len(padded.hidden_states) == 5
    for index, image in enumerate((a, b)):
        alone = tiny_model.get_image_features(image[None], output_hidden_states=True)
        torch.testing.assert_close(padded.pooler_output[index], alone.pooler_output[0], atol=1e-5, rtol=1e-5)
        for padded_map, own_map in zip(padded.hidden_states, alone.hidden_states, strict=True):
            height, width = own_map.shape[-2:]
            torch.testing.assert_close(padded_map[index, :, :height, :width], own_map[0], atol=1e-5, rtol=1e-5)
            assert not padded_map[index, :, height:, :].any() and not padded_map[index, :, :, width:].any()
    # The score's embeddings are the normalised pooler output; a tuple comes back on request.
    scored = tiny_model(batch, torch.tensor([[64, 96], [96, 64]]))
    torch.testing.assert_close(scored.image_embeds, torch.nn.functional.normalize(padded.pooler_output, dim=-1))
    assert isinstance(tiny_model.get_image_features(batch, return_dict=False), tuple)


def test_a_fresh_model_gets_clips_initialisation_everywhere():
    torch.manual_seed(0)
    model = QualiCLIPModel(tiny_config(vision={"embedding_size": 16}))
    pool = model.vision_model.attnpool
    for linear in (pool.q_proj, pool.k_proj, pool.v_proj, pool.c_proj):
        # CLIP's std in_features ** -0.5; PyTorch's default uniform init would give a std of (3 * in_features) ** -0.5.
        assert linear.weight.std().item() == pytest.approx(linear.in_features**-0.5, rel=0.1)
        assert not linear.bias.any()
    for block in model.text_model.resblocks:
        assert not block.mlp.c_fc.bias.any() and not block.mlp.c_proj.bias.any()
    assert all(not buffer.any() for name, buffer in model.named_buffers() if name.endswith("num_batches_tracked"))


def test_ignore_mismatched_sizes_initialises_the_mismatched_tensors(tmp_path, tiny_model):
    tiny_model.save_pretrained(tmp_path)
    config = QualiCLIPConfig(
        vision_config={**TINY_VISION, "projection_dim": 16}, text_config={**TINY_TEXT, "projection_dim": 16}
    )
    with pytest.raises(OSError, match="of another shape"):
        QualiCLIPModel.from_pretrained(tmp_path, config=config)
    model = QualiCLIPModel.from_pretrained(tmp_path, config=config, ignore_mismatched_sizes=True)
    c_proj = model.vision_model.attnpool.c_proj
    assert c_proj.weight.shape == (16, 256) and not c_proj.bias.any()
    assert c_proj.weight.std().item() == pytest.approx(256**-0.5, rel=0.1)
    torch.testing.assert_close(
        model.vision_model.layer1[0].conv1.weight, tiny_model.vision_model.layer1[0].conv1.weight
    )
