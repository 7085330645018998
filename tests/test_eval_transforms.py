"""The evaluation transforms give the documented pixels on fixed images: `openai` equals
torchvision's Resize(S, BICUBIC) + CenterCrop(S) on PIL images bit for bit (PIL computes the
reference here, with the crop box written out), `resize_256_crop_224` resizes to 256/224 and
crops at the documented offsets; xclip_jax.load(...).preprocess follows config.evals.transform."""

import io

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from xclip_jax import api
from xclip_jax import config as config_lib
from xclip_jax.data import eval_image

MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)


def _fixed_image(h=375, w=500):
  """Gradients, a sine texture, a red block and noise: every resampling error shows."""
  y, x = np.mgrid[0:h, 0:w]
  img = np.stack([x * 255 / w, y * 255 / h, 128 + 100 * np.sin(x / 7.0) * np.cos(y / 11.0)], -1)
  img[100:200, 150:300] = [250, 10, 30]
  noise = np.random.default_rng(0).normal(0, 12, img.shape)
  return np.clip(img + noise, 0, 255).astype(np.uint8)


def _encode(pixels, fmt):
  buffer = io.BytesIO()
  Image.fromarray(pixels).save(buffer, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
  return buffer.getvalue()


def _normalise(pixels):
  return ((pixels.astype(np.float32) / 255.0 - np.float32(MEAN)) / np.float32(STD))


def _openai_reference(encoded, resized_wh, box):
  """torchvision's Resize(224, BICUBIC) + CenterCrop(224) as PIL does them, sizes written out."""
  image = Image.open(io.BytesIO(encoded)).convert("RGB")
  return np.asarray(image.resize(resized_wh, Image.BICUBIC).crop(box))


def test_openai_transform_equals_pil_bicubic_resize_and_torchvision_centre_crop():
  pixels = _fixed_image()
  png = _encode(pixels, "PNG")
  # 500x375 -> shorter side 224: width int(224 * 500 / 375) = 298; left = round(74 / 2) = 37.
  ref = _openai_reference(png, (298, 224), (37, 0, 261, 224))
  crop = eval_image.crop_pixels(eval_image.decode(png), size=224, transform="openai").numpy()
  assert crop.dtype == np.uint8 and crop.shape == (224, 224, 3)
  np.testing.assert_array_equal(crop, ref)
  out = eval_image.eval_transform(png, size=224, mean=MEAN, std=STD, transform="openai").numpy()
  np.testing.assert_allclose(out, _normalise(ref), atol=1e-6)
  # Portrait and upscaling: 120x150 -> 224 x int(224 * 150 / 120) = 280; top = round(56 / 2).
  small = _encode(pixels[:150, :120], "PNG")
  ref = _openai_reference(small, (224, 280), (0, 28, 224, 252))
  crop = eval_image.crop_pixels(eval_image.decode(small), size=224, transform="openai").numpy()
  np.testing.assert_array_equal(crop, ref)
  # TF's own bicubic resize is not PIL's: it is why the transform resizes with PIL.
  tf_bicubic = tf.image.resize(pixels, (224, 298), method="bicubic", antialias=True).numpy()
  tf_crop = np.clip(np.round(tf_bicubic), 0, 255).astype(np.uint8)[:, 37:261]
  assert np.abs(tf_crop.astype(int) - _openai_reference(png, (298, 224), (37, 0, 261, 224))
                .astype(int)).max() >= 2


def test_openai_transform_decodes_jpeg_like_pil():
  jpeg = _encode(_fixed_image(), "JPEG")
  decoded = np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB"))
  np.testing.assert_array_equal(eval_image.decode(jpeg).numpy(), decoded)
  crop = eval_image.crop_pixels(eval_image.decode(jpeg), size=224, transform="openai").numpy()
  np.testing.assert_array_equal(crop, _openai_reference(jpeg, (298, 224), (37, 0, 261, 224)))


@pytest.mark.parametrize("width,left", [(300, 38), (301, 38), (303, 40)])
def test_openai_centre_crop_rounds_half_to_even_like_torchvision(width, left):
  # Height 224 already: the resize is the identity and the crop offset is visible directly.
  # torchvision: round((W - 224) / 2) with Python's round: 38.0 -> 38, 38.5 -> 38, 39.5 -> 40.
  pixels = _fixed_image(224, width)
  crop = eval_image.crop_pixels(tf.constant(pixels), size=224, transform="openai").numpy()
  np.testing.assert_array_equal(crop, pixels[:, left:left + 224])


def test_resize_256_crop_224_geometry():
  pixels = _fixed_image()
  png = _encode(pixels, "PNG")
  # Shorter side 375 -> 256; width round(500 * 256 / 375) = 341; crop at (256-224)//2 = 16,
  # (341-224)//2 = 58: bilinear, antialiased, float pixels.
  ref = tf.image.resize(pixels, (256, 341), method="bilinear", antialias=True).numpy()
  ref = ref[16:240, 58:282]
  out = eval_image.eval_transform(png, size=224, mean=MEAN, std=STD).numpy()
  np.testing.assert_allclose(out, _normalise(ref), atol=1e-5)
  # A flat image stays flat under both transforms: the normalised colour, exactly.
  flat = _encode(np.full((40, 80, 3), (10, 200, 90), np.uint8), "PNG")
  for transform in eval_image.TRANSFORMS:
    out = eval_image.eval_transform(flat, size=32, mean=MEAN, std=STD, transform=transform)
    np.testing.assert_allclose(out.numpy(), np.broadcast_to(
        _normalise(np.array([10, 200, 90])), (32, 32, 3)), atol=1e-6)
  with pytest.raises(ValueError, match="'openai'"):
    eval_image.check_transform("bicubic")


@pytest.mark.parametrize("transform", eval_image.TRANSFORMS)
def test_api_preprocess_follows_the_configured_transform(transform):
  config = config_lib.base_config()
  config.model.image.image_size = 224
  config.evals.transform = transform
  model = api.LoadedModel(config, 0, None, None, {}, {}, None)   # preprocess needs no weights
  pixels = _fixed_image()
  png = _encode(pixels, "PNG")
  expected = eval_image.eval_transform(png, size=224, mean=config.data.mean, std=config.data.std,
                                       transform=transform).numpy()
  got = model.preprocess([Image.fromarray(pixels), png])
  assert got.shape == (2, 224, 224, 3)
  np.testing.assert_allclose(got[0], expected, atol=1e-5)
  np.testing.assert_allclose(got[1], expected, atol=1e-5)


def test_imported_models_default_to_openais_transform():
  from xclip_jax.interop import convert
  config = convert.imported_config({"embed_dim": 8, "image": {}, "text": {}})
  assert config.evals.transform == "openai"
  assert config_lib.base_config().evals.transform == "resize_256_crop_224"
