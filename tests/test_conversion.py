"""The official checkpoint layout, converted: parity with the official formula, completeness, bad files, download."""

import hashlib
import json
import pickle
import shutil

import pytest
import torch
import torch.nn.functional as F

from qualiclip_hf import QualiCLIPModel, QualiCLIPProcessor
from qualiclip_hf.convert_qualiclip_checkpoint import CheckpointError, load_official_checkpoint
from qualiclip_hf.loading import OFFICIAL_FILENAME, OFFICIAL_REPO_ID, download_official_checkpoint, official_model_dir

from .conftest import CLIP_MEAN, CLIP_STD, add_to_hub_cache, photo


def official_quality_score(clip_model, prompts_features: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    """The official QualiCLIP score written independently of our model, on OpenAI's CLIP modules: the ResNet
    trunk, then CLIP's attention pool over all HW + 1 tokens WITHOUT the positional embedding, then
    100 * cosine, softmax per (positive, negative) pair, mean positive probability."""
    visual = clip_model.visual
    x = visual.relu1(visual.bn1(visual.conv1(images)))
    x = visual.relu2(visual.bn2(visual.conv2(x)))
    x = visual.relu3(visual.bn3(visual.conv3(x)))
    x = visual.layer4(visual.layer3(visual.layer2(visual.layer1(visual.avgpool(x)))))
    pool = visual.attnpool
    batch, channels = x.shape[:2]
    tokens = x.reshape(batch, channels, -1).permute(2, 0, 1)
    tokens = torch.cat([tokens.mean(dim=0, keepdim=True), tokens])
    pooled, _ = F.multi_head_attention_forward(
        tokens, tokens, tokens, channels, pool.num_heads, None,
        torch.cat([pool.q_proj.bias, pool.k_proj.bias, pool.v_proj.bias]), None, None, False, 0.0,
        pool.c_proj.weight, pool.c_proj.bias, use_separate_proj_weight=True, q_proj_weight=pool.q_proj.weight,
        k_proj_weight=pool.k_proj.weight, v_proj_weight=pool.v_proj.weight, need_weights=False, training=False,
    )  # fmt: skip
    logits = 100.0 * F.normalize(pooled[0], dim=-1) @ prompts_features.T
    return logits.reshape(batch, -1, 2).softmax(dim=-1)[..., 0].mean(dim=1)


@torch.no_grad()
@pytest.mark.parametrize("size", [(224, 224), (320, 256), (97, 161)])
def test_converted_model_matches_the_official_formula(reference_clip, converted_dir, size):
    clip_model, prompts_features = reference_clip
    model = QualiCLIPModel.from_pretrained(converted_dir).eval()
    generator = torch.Generator().manual_seed(size[0])
    # Different contrast and brightness per image: a random CLIP is nearly blind to anything subtler.
    contrast = torch.tensor([0.2, 1.0, 2.0]).view(3, 1, 1, 1)
    brightness = torch.tensor([-1.0, 0.0, 1.0]).view(3, 1, 1, 1)
    images = torch.randn(3, 3, *size, generator=generator) * contrast + brightness
    expected = official_quality_score(clip_model, prompts_features, images)
    ours = model(images).quality_score
    assert (ours - expected).abs().max() <= 1e-5
    assert expected.std() > 1e-4, "the reference scores should depend on the image for the test to mean something"


@torch.no_grad()
def test_full_pipeline_from_a_photo_matches_the_official_preprocessing(reference_clip, converted_dir):
    clip_model, prompts_features = reference_clip
    model = QualiCLIPModel.from_pretrained(converted_dir).eval()
    processor = QualiCLIPProcessor.from_pretrained(converted_dir)
    image = photo(150, 210, seed=3)
    # The official inference: ToTensor + Normalize(CLIP mean/std), full resolution.
    tensor = torch.from_numpy(__import__("numpy").asarray(image).copy()).permute(2, 0, 1).float() / 255
    expected = official_quality_score(clip_model, prompts_features, ((tensor - CLIP_MEAN) / CLIP_STD)[None])
    ours = model(**processor(images=image, return_tensors="pt")).quality_score
    assert (ours - expected).abs().max() <= 1e-5


def test_converted_folder_is_complete(converted_dir, official_checkpoint):
    names = {path.name for path in converted_dir.iterdir()}
    assert {"config.json", "model.safetensors", "processor_config.json", "tokenizer.json"} <= names
    assert {"configuration_qualiclip.py", "modeling_qualiclip.py", "image_processing_qualiclip.py"} <= names
    config = json.loads((converted_dir / "config.json").read_text())
    assert config["model_type"] == "qualiclip"
    assert config["auto_map"]["AutoModel"] == "modeling_qualiclip.QualiCLIPModel"
    assert config["source_checkpoint_sha256"] == hashlib.sha256(official_checkpoint.read_bytes()).hexdigest()
    assert config["clip_logit_scale"] == pytest.approx(1 / 0.07, rel=1e-5)  # openai-clip's initial value
    assert not any(name.endswith((".pth", ".bin", ".pt")) for name in names)


def test_prompt_embeddings_come_from_the_checkpoint(reference_clip, converted_dir):
    _, prompts_features = reference_clip
    model = QualiCLIPModel.from_pretrained(converted_dir)
    torch.testing.assert_close(model.prompt_embeds, prompts_features, atol=1e-6, rtol=0)


def test_cli_convert_writes_a_loadable_folder(official_checkpoint, tmp_path):
    from qualiclip_hf.cli import main

    assert main(["convert", "--checkpoint", str(official_checkpoint), "--output", str(tmp_path / "out")]) == 0
    assert QualiCLIPModel.from_pretrained(tmp_path / "out").config.vision_config.depths == [3, 4, 6, 3]


def test_truncated_checkpoint_fails_clearly(official_checkpoint, tmp_path):
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(official_checkpoint.read_bytes()[:100_000])
    with pytest.raises(CheckpointError, match=r"truncated\.pth: not a readable PyTorch checkpoint"):
        load_official_checkpoint(truncated)


def test_non_checkpoints_fail_clearly(tmp_path):
    text = tmp_path / "notes.pth"
    text.write_text("hello")
    with pytest.raises(CheckpointError, match=r"notes\.pth"):
        load_official_checkpoint(text)
    other = tmp_path / "other.pth"
    torch.save({"weight": torch.zeros(1)}, other)
    with pytest.raises(CheckpointError, match="not a QualiCLIP checkpoint"):
        load_official_checkpoint(other)
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        load_official_checkpoint(tmp_path / "missing.pth")


class _Payload:
    def __reduce__(self):
        return (print, ("code ran",))


def test_pickles_carrying_code_are_refused(tmp_path, capsys):
    path = tmp_path / "evil.pth"
    with open(path, "wb") as file:
        pickle.dump({"prompts_features": _Payload()}, file)
    with pytest.raises(CheckpointError, match=r"evil\.pth"):
        load_official_checkpoint(path)
    assert "code ran" not in capsys.readouterr().out


def _fake_hub_cache(cache, checkpoint_bytes: bytes, blob_name: str):
    """Lays out `chaofengc/IQA-PyTorch-Weights` in a Hugging Face cache, its checkpoint's blob named `blob_name`."""
    add_to_hub_cache(
        cache, OFFICIAL_REPO_ID, {OFFICIAL_FILENAME: checkpoint_bytes}, etags={OFFICIAL_FILENAME: blob_name}
    )


def test_official_download_is_verified_and_converted_once(official_checkpoint, offline_hf_home, monkeypatch):
    data = official_checkpoint.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    _fake_hub_cache(offline_hf_home / "hub", data, digest)
    assert download_official_checkpoint().resolve().name == digest
    folder = official_model_dir()
    assert folder.parent == offline_hf_home / "qualiclip_hf"
    assert QualiCLIPModel.from_pretrained(folder).config.source_checkpoint_sha256 == digest
    # A second call reuses the converted folder instead of converting again.
    from qualiclip_hf import convert_qualiclip_checkpoint

    monkeypatch.setattr(convert_qualiclip_checkpoint, "convert_checkpoint", lambda *a, **k: pytest.fail("again"))
    assert official_model_dir() == folder


def test_tampered_download_is_rejected(official_checkpoint, offline_hf_home):
    data = bytearray(official_checkpoint.read_bytes())
    digest = hashlib.sha256(data).hexdigest()
    data[-10] ^= 0xFF
    _fake_hub_cache(offline_hf_home / "hub", bytes(data), digest)
    with pytest.raises(CheckpointError, match="does not match the published"):
        download_official_checkpoint()
    with pytest.raises(CheckpointError, match="does not match"):
        download_official_checkpoint(expected_sha256="f" * 64)
    shutil.rmtree(offline_hf_home)


def test_openai_clip_torchscript_becomes_a_training_starting_point(reference_clip, tmp_path):
    import warnings

    from qualiclip_hf.cli import main

    clip_model, prompts_features = reference_clip
    archive = tmp_path / "RN50.pt"
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        import clip

        image = torch.rand(1, 3, 224, 224)
        torch.jit.trace(clip_model, (image, clip.tokenize(["a photo"])), check_trace=False).save(str(archive))
    assert main(["convert", "--clip", str(archive), "--output", str(tmp_path / "start")]) == 0
    model = QualiCLIPModel.from_pretrained(tmp_path / "start").eval()
    # The prompt embeddings are CLIP's own text features of the seven pairs, computed with our tokenizer.
    torch.testing.assert_close(model.prompt_embeds, prompts_features, atol=2e-5, rtol=0)
    images = torch.randn(2, 3, 128, 160) * torch.tensor([0.3, 1.5]).view(2, 1, 1, 1)
    with torch.no_grad():
        expected = official_quality_score(clip_model, prompts_features, images)
        assert (model(images).quality_score - expected).abs().max() <= 1e-5
    (tmp_path / "text.pt").write_bytes(b"PK\x03\x04 not a zip")
    assert main(["convert", "--clip", str(tmp_path / "text.pt"), "--output", str(tmp_path / "x")]) == 1


def test_shipped_tokenizer_is_the_one_built_from_clips_vocabulary():
    # Conversion and training use the shipped files (no openai-clip needed); they must be what the BPE merges give.
    from qualiclip_hf.build_processor import CLIP_VOCAB_SIZE, build_clip_tokenizer, load_clip_tokenizer

    shipped, built = load_clip_tokenizer(), build_clip_tokenizer()
    assert len(shipped) == len(built) == CLIP_VOCAB_SIZE
    assert shipped.get_vocab() == built.get_vocab()
    texts = ["Good photo.", "High-resolution image.", "naïve café – déjà vu 123", "  spaces\tand\nlines  "]
    assert shipped(texts)["input_ids"] == built(texts)["input_ids"]


def test_a_model_with_a_missing_tensor_is_refused(official_checkpoint, tmp_path):
    from qualiclip_hf.convert_qualiclip_checkpoint import convert_checkpoint

    checkpoint = load_official_checkpoint(official_checkpoint)
    del checkpoint["clip_model.visual.layer2.0.bn2.weight"]
    broken = tmp_path / "broken.pth"
    torch.save(checkpoint, broken)
    with pytest.raises(CheckpointError, match=r"broken\.pth: missing tensors .*layer2\.0\.bn2\.weight"):
        convert_checkpoint(broken, tmp_path / "out")
    assert not (tmp_path / "out").exists()
