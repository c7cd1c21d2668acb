"""
transformers' own common tests, applied to QualiCLIP the way transformers wires its models (`tests/models/clip/`):
a model tester with `ModelTesterMixin`, `ConfigTester` on the config and its sub-configs, an image processing tester
with `ImageProcessingTestMixin`, and `ProcessorTesterMixin` on the processor. The mixins come from the installed
transformers release's source distribution (see tests/transformers_common_tests.py); without access to it, this module
is skipped with the reason.

A common test is switched off only where the feature it tests does not exist in QualiCLIP; the reason is written
beside it.
"""

from __future__ import annotations

import unittest

import numpy as np
import torch
from PIL import Image

from qualiclip_hf import (
    QualiCLIPConfig,
    QualiCLIPImageProcessor,
    QualiCLIPModel,
    QualiCLIPProcessor,
    QualiCLIPTextConfig,
    QualiCLIPVisionConfig,
)
from qualiclip_hf.build_processor import build_clip_tokenizer

from .conftest import TINY_TEXT, TINY_VISION
from .transformers_common_tests import import_common

configuration_common = import_common("test_configuration_common")
modeling_common = import_common("test_modeling_common")
image_processing_common = import_common("test_image_processing_common")
processing_common = import_common("test_processing_common")


def _not_in_qualiclip(reason: str):
    """Switches off a common test whose feature QualiCLIP does not have, saying which and why."""
    return unittest.skip(f"not in QualiCLIP: {reason}")


class QualiCLIPModelTester:
    """Tiny QualiCLIP configs (the sizes of tests/conftest.py) and random CLIP-normalised images."""

    def __init__(self, parent: unittest.TestCase, batch_size: int = 2, image_size: int = 64) -> None:
        self.parent = parent
        self.batch_size = batch_size
        self.image_size = image_size
        # `forward` computes no loss (QualiCLIP trains with its own ranking losses, training/losses.py), which is
        # what transformers' training tests call backward on.
        self.is_training = False
        # The stem's output and the four stages' outputs, as transformers' ResNet.
        self.expected_num_hidden_layers = len(TINY_VISION["depths"]) + 1

    def get_config(self) -> QualiCLIPConfig:
        # A 99-token vocabulary, as transformers' testers use, keeps the model under the common tests' 1M parameters;
        # the text tower never runs in `forward`.
        return QualiCLIPConfig(vision_config=dict(TINY_VISION), text_config={**TINY_TEXT, "vocab_size": 99})

    def prepare_config_and_inputs(self) -> tuple[QualiCLIPConfig, torch.Tensor]:
        pixel_values = modeling_common.floats_tensor([self.batch_size, 3, self.image_size, self.image_size])
        return self.get_config(), pixel_values

    def prepare_config_and_inputs_for_common(self) -> tuple[QualiCLIPConfig, dict[str, torch.Tensor]]:
        config, pixel_values = self.prepare_config_and_inputs()
        return config, {"pixel_values": pixel_values}

    def create_and_check_model(self, config: QualiCLIPConfig, pixel_values: torch.Tensor) -> None:
        model = QualiCLIPModel(config).eval()
        with torch.no_grad():
            output = model(pixel_values)
        num_pairs = config.num_prompt_pairs
        self.parent.assertEqual(output.quality_score.shape, (self.batch_size,))
        self.parent.assertEqual(output.logits_per_prompt.shape, (self.batch_size, num_pairs, 2))
        self.parent.assertEqual(output.image_embeds.shape, (self.batch_size, config.vision_config.projection_dim))


class QualiCLIPModelTest(modeling_common.ModelTesterMixin, unittest.TestCase):
    all_model_classes = (QualiCLIPModel,)
    # An image model: no token embeddings to resize, no attention weights returned (the attention pool has a single
    # query and computes no attention map worth returning; the text tower only ever runs on the prompts).
    test_resize_embeddings = False
    has_attentions = False
    # `get_image_features().last_hidden_state` is the last stage's `(batch, channels, height, width)` feature map, as
    # transformers' ResNetModel returns it; the common shape check assumes a `(batch, tokens, hidden_size)` sequence.
    skip_test_image_features_output_shape = True

    def setUp(self) -> None:
        self.model_tester = QualiCLIPModelTester(self)
        self.config_tester = configuration_common.ConfigTester(
            self, config_class=QualiCLIPConfig, has_text_modality=False
        )

    def test_config(self) -> None:
        self.config_tester.run_common_tests()

    def test_model(self) -> None:
        self.model_tester.create_and_check_model(*self.model_tester.prepare_config_and_inputs())

    def test_hidden_states_output(self) -> None:
        # transformers' ResNet test's version: the common one expects `(batch, tokens, hidden_size)` sequences, a
        # convolutional tower returns `(batch, channels, height, width)` feature maps.
        config, inputs_dict = self.model_tester.prepare_config_and_inputs_for_common()
        size = self.model_tester.image_size
        width = config.vision_config.embedding_size
        expected = [(width, size // 4, size // 4)] + [
            (width * 2**stage * 4, size // 4 // 2**stage, size // 4 // 2**stage) for stage in range(4)
        ]
        for from_config in (False, True):
            config.output_hidden_states = from_config
            model = QualiCLIPModel(config).eval()
            with torch.no_grad():
                outputs = model(**inputs_dict, **({} if from_config else {"output_hidden_states": True}))
            self.assertEqual([tuple(state.shape[1:]) for state in outputs.hidden_states], expected)

    @_not_in_qualiclip("no input or output embeddings: the model's input is pixels (as transformers' ResNet)")
    def test_model_get_set_embeddings(self) -> None:
        pass


class QualiCLIPVisionConfigTest(unittest.TestCase):
    def test_config(self) -> None:
        tester = configuration_common.ConfigTester(
            self,
            config_class=QualiCLIPVisionConfig,
            has_text_modality=False,
            common_properties=["num_attention_heads", "projection_dim"],
            **TINY_VISION,
        )
        tester.run_common_tests()


class QualiCLIPTextConfigTest(unittest.TestCase):
    def test_config(self) -> None:
        tester = configuration_common.ConfigTester(self, config_class=QualiCLIPTextConfig, **TINY_TEXT)
        tester.run_common_tests()


class QualiCLIPImageProcessingTester(image_processing_common.ImageProcessingTester):
    def __init__(self, parent: unittest.TestCase, **kwargs) -> None:
        # Images of at least the model's 32x32 minimum; the processor keeps each image's size.
        kwargs.setdefault("min_resolution", 32)
        kwargs.setdefault("max_resolution", 96)
        super().__init__(parent, **kwargs)

    def _get_image_processing_classes(self) -> dict[str, type]:
        # transformers finds a model's processors from its folder name under tests/models/; QualiCLIP's is registered
        # with AutoImageProcessor as the torchvision backend (qualiclip_hf.register_auto_classes).
        return {"torchvision": QualiCLIPImageProcessor}

    def expected_output_image_shape(self, images) -> tuple[int, int, int]:
        # No resize: every image keeps its size, and the batch is padded to the largest height and width.
        sizes = []
        for image in images:
            if isinstance(image, Image.Image):
                sizes.append((image.height, image.width))
            elif image.shape[0] in (1, 3, 4):  # channels first, as transformers' test inputs are unless numpy
                sizes.append(tuple(image.shape[1:3]))
            else:
                sizes.append(tuple(image.shape[0:2]))
        return self.num_channels, max(size[0] for size in sizes), max(size[1] for size in sizes)


class QualiCLIPImageProcessingTest(image_processing_common.ImageProcessingTestMixin, unittest.TestCase):
    image_processor_tester_class = QualiCLIPImageProcessingTester


class QualiCLIPProcessorTest(processing_common.ProcessorTesterMixin, unittest.TestCase):
    processor_class = QualiCLIPProcessor

    @classmethod
    def _setup_tokenizer(cls):
        return build_clip_tokenizer()

    @classmethod
    def _setup_image_processor(cls):
        return QualiCLIPImageProcessor()

    def prepare_images_inputs(self, batch_size: int | None = None, nested: bool = False):
        # transformers' test images are 30 pixels high, below the 32x32 minimum of QualiCLIP's image tower (its
        # total stride), which the processor refuses; these are 32 pixels high, otherwise the same.
        image = Image.fromarray(np.random.randint(255, size=(32, 400, 3), dtype=np.uint8))
        if batch_size is None:
            return image
        return [[image]] * batch_size if nested else [image] * batch_size
