"""assembly.build: the parts a run trains with, the same whoever asks (train.py, bench.py, the
tests); fine-tuning parameters restart the optimizer; a tokenizer larger than the embedding table
is refused before anything is built."""

import jax
import numpy as np
import pytest

from xclip_jax import assembly, methods
from xclip_jax.data import synthetic
from xclip_jax.data import text_spec as text_spec_lib
from xclip_jax.parallel import mesh as mesh_lib

from tests.tiny import tiny_config


def _config(**overrides):
  return tiny_config("", **{"data.name": synthetic.NAME, **overrides})


def test_two_builds_of_one_config_are_equal_and_take_one_step():
  config = _config()
  a, b = assembly.build(config), assembly.build(config)
  for x, y in zip(jax.tree.leaves(a.state), jax.tree.leaves(b.state)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  assert a.method is methods.get_method("clip")
  assert a.host_batch == 16 and a.num_params == sum(x.size for x in jax.tree.leaves(a.state["params"]))
  batch = jax.device_put(synthetic.global_batch(config, 0, a.method.views), a.batch_sharding)
  state, metrics = a.train_step()(a.state, batch)
  assert int(state["step"]) == 1 and np.isfinite(float(metrics["loss"]))


def test_with_params_restarts_the_optimizer_and_keeps_the_given_values():
  parts = assembly.build(_config())
  new = jax.tree.map(lambda x: x + 1, parts.state["params"])
  parts.with_params(new)
  assert int(parts.state["step"]) == 0
  for x, y in zip(jax.tree.leaves(parts.state["params"]), jax.tree.leaves(new)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  moments = [x for x in jax.tree.leaves(parts.state["opt_state"]) if x.ndim > 0]
  assert moments and all(not np.asarray(m).any() for m in moments)    # Adam's moments are zero


def test_a_tokenizer_larger_than_the_embedding_table_is_refused():
  config = _config()
  spec = text_spec_lib.TextSpec.reserved(config.model.text.vocab_size + 1)
  with pytest.raises(ValueError, match="raise the latter"):
    assembly.build(config, spec)


def test_an_uneven_batch_is_refused_by_the_mesh_check():
  with pytest.raises(ValueError):
    assembly.build_mesh(_config(batch_size=12))
  assert mesh_lib.make_mesh(_config().mesh).size == 8
