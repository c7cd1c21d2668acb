import pytest

from qualiclip_hf import QUALICLIP_PROMPT_PAIRS, QualiCLIPConfig

from .conftest import tiny_config


def test_default_prompts_are_the_seven_official_pairs_without_the_merged_string():
    config = QualiCLIPConfig()
    assert config.num_prompt_pairs == 7
    texts = [text for pair in config.prompt_pairs for text in pair]
    assert len(texts) == 14
    # The official flat list lacks a comma and merges these two; here they are separate prompts of two pairs.
    assert ["Noise-free image.", "Noisy image."] in config.prompt_pairs
    assert ["High-quality image.", "Low-quality image."] in config.prompt_pairs
    assert "Noisy image.High-quality image." not in texts


def test_defaults_are_clip_rn50_with_the_positional_embedding_off():
    config = QualiCLIPConfig()
    assert config.vision_config.layers == [3, 4, 6, 3]
    assert (config.vision_config.width, config.vision_config.heads, config.vision_config.output_dim) == (64, 32, 1024)
    assert config.vision_config.use_pos_embedding is False
    text = config.text_config
    assert (text.context_length, text.vocab_size, text.width, text.heads, text.layers) == (77, 49408, 512, 8, 12)
    assert config.logit_scale == 100.0


def test_round_trip_through_json(tmp_path):
    config = tiny_config(prompt_pairs=[("Sharp.", "Blurry.")], logit_scale=50.0)
    config.save_pretrained(tmp_path)
    loaded = QualiCLIPConfig.from_pretrained(tmp_path)
    assert loaded.prompt_pairs == [["Sharp.", "Blurry."]]
    assert loaded.logit_scale == 50.0
    assert loaded.vision_config.to_dict() == config.vision_config.to_dict()
    assert loaded.text_config.to_dict() == config.text_config.to_dict()


@pytest.mark.parametrize(
    "pairs",
    [[], [("only one",)], [("good", "")], ["Good photo.", "Bad photo."], [("a", "b", "c")]],
)
def test_malformed_prompt_pairs_are_refused(pairs):
    with pytest.raises(ValueError, match="prompt pair"):
        QualiCLIPConfig(prompt_pairs=pairs)


def test_towers_must_share_the_embedding_size():
    with pytest.raises(ValueError, match="embedding size"):
        QualiCLIPConfig(vision_config={"output_dim": 64}, text_config={"output_dim": 32})


def test_official_pairs_constant_is_positive_first():
    assert all(pair[0].startswith(("Good", "Sharp", "High", "Noise-free")) for pair in QUALICLIP_PROMPT_PAIRS)
