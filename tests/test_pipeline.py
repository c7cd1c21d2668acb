"""The `image-quality-assessment` pipeline: image-classification schema, batching of mixed sizes, clear errors."""

import json

import numpy as np
import pytest
from PIL import Image
from transformers import pipeline

from qualiclip_hf import IMAGE_QUALITY_TASK, ImageQualityAssessmentPipeline, QualiCLIPImageProcessor

from .conftest import direct_scores, photo


@pytest.fixture(scope="module")
def image_processor(tiny_model_dir):
    return QualiCLIPImageProcessor.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="module")
def judge(tiny_model, image_processor):
    return pipeline(IMAGE_QUALITY_TASK, model=tiny_model, image_processor=image_processor)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    paths = []
    for index, (height, width) in enumerate([(64, 96), (80, 48), (72, 72)]):
        paths.append(folder / f"image{index}.png")
        photo(height, width, seed=index).save(paths[-1])
    return paths


def model_score(model, image_processor, image, **kwargs) -> float:
    return direct_scores(model, image_processor, image, **kwargs).item()


def test_registry_builds_our_pipeline(judge):
    assert isinstance(judge, ImageQualityAssessmentPipeline)


def test_one_image_gives_good_and_bad_labels_in_the_image_classification_schema(judge, tiny_model, image_processor):
    image = photo(64, 96, seed=7)
    result = judge(image)
    assert [entry["label"] for entry in result] == ["good", "bad"]
    expected = model_score(tiny_model, image_processor, image)
    assert result[0]["score"] == pytest.approx(expected, abs=1e-6)
    assert result[1]["score"] == pytest.approx(1 - expected, abs=1e-6)
    assert json.loads(json.dumps(result)) == result  # plain Python values, as a server would send them


@pytest.mark.parametrize("batch_size", [1, 2])
def test_lists_of_mixed_inputs_and_sizes_match_single_calls(judge, tiny_model, image_processor, images, batch_size):
    inputs = [str(images[0]), images[1], Image.open(images[2]), np.array(photo(40, 56, seed=9))]
    results = judge(inputs, batch_size=batch_size)
    assert len(results) == len(inputs)
    expected = [model_score(tiny_model, image_processor, Image.open(path)) for path in images]
    expected.append(model_score(tiny_model, image_processor, np.array(photo(40, 56, seed=9))))
    for result, score in zip(results, expected, strict=True):
        assert result[0] == {"label": "good", "score": pytest.approx(score, abs=1e-5)}


def test_top_k_sorts_by_score_like_image_classification(judge):
    both = judge(photo(64, 64, seed=3))
    ranked = judge(photo(64, 64, seed=3), top_k=2)
    assert [entry["score"] for entry in ranked] == sorted([entry["score"] for entry in both], reverse=True)
    assert judge(photo(64, 64, seed=3), top_k=1) == ranked[:1]
    with pytest.raises(ValueError, match="top_k"):
        judge(photo(64, 64, seed=3), top_k=0)


def test_max_size_downscales_like_the_processor(judge, tiny_model, image_processor):
    image = photo(200, 100, seed=4)
    expected = model_score(tiny_model, image_processor, image, max_size=64)
    assert expected != pytest.approx(model_score(tiny_model, image_processor, image), abs=1e-6)
    assert judge(image, max_size=64)[0]["score"] == pytest.approx(expected, abs=1e-6)


def test_bad_inputs_get_an_error_naming_the_input(judge, tmp_path, images):
    notes = tmp_path / "notes.png"
    notes.write_text("not an image")
    small = tmp_path / "small.png"
    photo(16, 20).save(small)
    cases = {
        str(tmp_path / "missing.jpg"): "no such file",
        str(notes): "not an image file",
        str(tmp_path): "is a directory",
        str(small): "20x16 pixels is below the model's 32x32 minimum",
    }
    for path, cause in cases.items():
        with pytest.raises(ValueError, match=cause) as raised:
            judge(path)
        assert path in str(raised.value)
    with pytest.raises(ValueError, match=r"notes\.png"):  # in a batch, the bad file is the one named
        judge([str(images[0]), str(notes)], batch_size=2)
    with pytest.raises(ValueError, match="unsupported input type int"):
        judge(3)


def test_saved_folders_declare_the_pipeline_and_carry_its_code(tiny_model_dir, converted_dir):
    for folder in (tiny_model_dir, converted_dir):
        config = json.loads((folder / "config.json").read_text())
        assert config["custom_pipelines"][IMAGE_QUALITY_TASK]["impl"] == (
            "pipeline_qualiclip.ImageQualityAssessmentPipeline"
        )
        assert config["custom_pipelines"][IMAGE_QUALITY_TASK]["pt"] == ["AutoModel"]
        assert (folder / "pipeline_qualiclip.py").is_file()


def test_folder_pipeline_with_remote_code_matches_the_model(tiny_model_dir, tiny_model, image_processor, images):
    judge = pipeline(model=str(tiny_model_dir), trust_remote_code=True)  # task from config.json
    assert type(judge).__name__ == "ImageQualityAssessmentPipeline"
    assert judge.task == IMAGE_QUALITY_TASK
    expected = model_score(tiny_model, image_processor, Image.open(images[0]))
    assert judge(str(images[0]))[0]["score"] == pytest.approx(expected, abs=1e-6)


def test_the_installed_pipeline_serves_a_folder_without_remote_code(
    tiny_model_dir, tiny_model, image_processor, images
):
    # The folder declares the task in `custom_pipelines`; with qualiclip_hf imported, its installed pipeline is used,
    # as AutoModel uses the installed model class, and the task is still read from the folder.
    for judge in (pipeline(IMAGE_QUALITY_TASK, model=str(tiny_model_dir)), pipeline(model=str(tiny_model_dir))):
        assert type(judge) is ImageQualityAssessmentPipeline
        expected = model_score(tiny_model, image_processor, Image.open(images[0]))
        assert judge(str(images[0]))[0]["score"] == pytest.approx(expected, abs=1e-6)
