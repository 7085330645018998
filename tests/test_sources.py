"""data/sources.py: the factory picks the source config.data.name names; the synthetic source's
batches and TextSpec are data/synthetic.py's, the TFDS source's tokenizer is the run's."""

import jax
import numpy as np

from xclip_jax import methods
from xclip_jax.data import sources, synthetic
from xclip_jax.data import text_spec as text_spec_lib
from xclip_jax.parallel import mesh as mesh_lib

from tests.tiny import tiny_config


def test_synthetic_source_gives_synthetic_batches_from_the_start_step():
  config = tiny_config("", **{"data.name": synthetic.NAME})
  source = sources.make_source(config)
  assert isinstance(source, sources.SyntheticSource) and not source.evaluates
  assert source.tokenizer is None
  assert source.text_spec == text_spec_lib.TextSpec.reserved(config.model.text.vocab_size)
  sharding = mesh_lib.batch_sharding(mesh_lib.make_mesh(config.mesh))
  views = methods.get_method("declip").views
  got = next(iter(source.host_batches(views, sharding, host_batch=16, start_step=3)))
  want = synthetic.global_batch(config, 3, views)
  assert set(got) == set(want) and {"image", "image2", "text", "text_aug"} <= set(got)
  for key in want:
    np.testing.assert_array_equal(got[key], want[key])


def test_tfds_source_prepares_the_dataset_and_its_tokenizer(demo_dir):
  config = tiny_config(demo_dir)
  source = sources.make_source(config)
  assert isinstance(source, sources.TFDSSource) and source.evaluates
  assert source.text_spec == source.tokenizer.spec
  sharding = mesh_lib.batch_sharding(mesh_lib.make_mesh(config.mesh))
  batch = next(source.host_batches(methods.get_method("clip").views, sharding,
                                   host_batch=16, start_step=0).as_numpy_iterator())
  assert batch["image"].shape == (16, config.model.image.image_size, config.model.image.image_size, 3)
  assert batch["image"].dtype == np.uint8
  ids = batch["text"]
  assert ids.shape == (16, config.model.text.context_length)
  assert ((ids == source.text_spec.eos_id).sum(1) == 1).all()     # one end-of-text per row
  assert jax.device_count() == 8
