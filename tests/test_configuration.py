import json

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


def test_defaults_describe_the_official_rn50_checkpoint(reference_clip):
    """The default config is the one the sizes of a CLIP RN50 state dict (OpenAI's own module, tests/conftest.py)
    infer, so `QualiCLIPConfig()` loads the official weights; the positional embedding stays off, so a default model
    scores any image size (tests/test_modeling.py). The default `logit_scale` is checked by the score parity with
    the official formula (tests/test_conversion.py)."""
    from qualiclip_hf.convert_qualiclip_checkpoint import config_from_state_dict

    clip_model, _ = reference_clip
    inferred = config_from_state_dict(clip_model.state_dict())
    default = QualiCLIPConfig()
    assert inferred.vision_config.to_dict() == default.vision_config.to_dict()
    assert inferred.text_config.to_dict() == default.text_config.to_dict()
    assert inferred.vision_config.image_size == clip_model.visual.input_resolution
    assert inferred.vision_config.use_pos_embedding is False


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
        QualiCLIPConfig(vision_config={"projection_dim": 64}, text_config={"projection_dim": 32})
    with pytest.raises(ValueError, match="embedding size"):  # the names of folders saved before
        QualiCLIPConfig(vision_config={"output_dim": 64}, text_config={"output_dim": 32})


def test_official_pairs_constant_is_positive_first():
    assert all(pair[0].startswith(("Good", "Sharp", "High", "Noise-free")) for pair in QUALICLIP_PROMPT_PAIRS)


# OpenAI's names, which config.json files written before the standard names carry (the demo folder among them).
LEGACY_VISION = {"layers": [2, 1, 1, 2], "width": 16, "heads": 4, "output_dim": 48, "image_resolution": 96}
LEGACY_TEXT = {"context_length": 20, "width": 32, "heads": 2, "layers": 3, "output_dim": 48}


def test_folders_saved_with_openai_names_load_under_the_standard_names(tmp_path):
    folder = tmp_path / "old"
    tiny_config().save_pretrained(folder)
    saved = json.loads((folder / "config.json").read_text())
    saved["vision_config"] = {"model_type": "qualiclip_vision_model", **LEGACY_VISION}
    saved["text_config"] = {"model_type": "qualiclip_text_model", **LEGACY_TEXT}
    (folder / "config.json").write_text(json.dumps(saved))

    config = QualiCLIPConfig.from_pretrained(folder)
    vision, text = config.vision_config, config.text_config
    assert (vision.depths, vision.embedding_size, vision.num_attention_heads) == ([2, 1, 1, 2], 16, 4)
    assert (vision.projection_dim, vision.image_size) == (48, 96)
    assert (text.max_position_embeddings, text.hidden_size, text.num_attention_heads) == (20, 32, 2)
    assert (text.num_hidden_layers, text.projection_dim) == (3, 48)
    # The old names still read (and write) the same values, as aliases.
    assert (vision.layers, vision.width, vision.heads, vision.output_dim) == ([2, 1, 1, 2], 16, 4, 48)
    assert (text.context_length, text.width, text.layers) == (20, 32, 3)
    # Saved again, the folder has the standard names only, and loads to the same config.
    config.save_pretrained(tmp_path / "new")
    resaved = json.loads((tmp_path / "new" / "config.json").read_text())
    assert not set(LEGACY_VISION) & set(resaved["vision_config"])
    assert not set(LEGACY_TEXT) & set(resaved["text_config"])
    again = QualiCLIPConfig.from_pretrained(tmp_path / "new")
    assert again.vision_config.to_dict() == vision.to_dict() and again.text_config.to_dict() == text.to_dict()


def test_the_embedded_demo_folder_written_with_openai_names_loads_with_its_weights():
    from qualiclip_hf import QualiCLIPModel
    from qualiclip_hf.loading import DEMO_MODEL_PATH

    written = json.loads((DEMO_MODEL_PATH / "config.json").read_text())
    model = QualiCLIPModel.from_pretrained(DEMO_MODEL_PATH)  # strict: any tensor of another shape would raise
    vision, text = model.config.vision_config, model.config.text_config
    old_vision, old_text = written["vision_config"], written["text_config"]
    assert vision.depths == old_vision.get("layers", old_vision.get("depths"))
    assert vision.embedding_size == old_vision.get("width", old_vision.get("embedding_size"))
    assert text.hidden_size == old_text.get("width", old_text.get("hidden_size"))
    assert text.num_hidden_layers == old_text.get("layers", old_text.get("num_hidden_layers"))
    assert model.vision_model.layer1[0].conv1.out_channels == vision.embedding_size
