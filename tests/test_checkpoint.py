"""Orbax round trips: sharded state restored exactly (also onto another mesh), params for notebooks."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from xclip_jax import checkpoint
from xclip_jax import train_state as ts


def _mesh(shape):
  return jax.make_mesh(shape, ("data", "fsdp"), axis_types=(AxisType.Auto,) * 2)


def _state(mesh, seed=0):
  rng = np.random.default_rng(seed)
  params = {"tower": {"kernel": rng.normal(size=(16, 8)).astype(np.float32),
                      "bias": rng.normal(size=(8,)).astype(np.float32)},
            "logit_scale": np.float32(2.6592)}
  shardings = {"tower": {"kernel": NamedSharding(mesh, P("fsdp", None)),
                         "bias": NamedSharding(mesh, P())},
               "logit_scale": NamedSharding(mesh, P())}
  params = jax.device_put(params, shardings)
  tx = optax.adamw(1e-3)
  return ts.init_train_state(params, {}, tx, mesh, seed), tx


def _config():
  return ml_collections.ConfigDict({"method": "clip", "batch_size": 8, "mesh": {"fsdp": 2}})


def _assert_trees_equal(a, b):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_round_trip_onto_a_different_mesh(tmp_path):
  mesh = _mesh((4, 2))
  state, tx = _state(mesh)
  # Take one optimizer step so the moments are non-trivial.
  grads = jax.tree.map(jnp.ones_like, state["params"])
  updates, state["opt_state"] = tx.update(grads, state["opt_state"], state["params"])
  state["params"] = optax.apply_updates(state["params"], updates)

  ckpt = checkpoint.Checkpointer(str(tmp_path), every=10, keep=2)
  assert ckpt.save(10, state, _config())
  assert not ckpt.save(11, state, _config())        # off the interval: skipped
  ckpt.wait()
  assert ckpt.latest_step() == 10

  other = _mesh((2, 4))
  template, _ = _state(other, seed=1)
  restored = ckpt.restore(10, ts.abstract_of(template))
  ckpt.close()
  _assert_trees_equal(restored, state)
  kernel = restored["params"]["tower"]["kernel"]
  assert kernel.sharding.mesh.shape == other.shape
  assert kernel.sharding.spec == P("fsdp", None)


def test_keep_k_and_config_json(tmp_path):
  state, _ = _state(_mesh((8, 1)))
  ckpt = checkpoint.Checkpointer(str(tmp_path), every=1, keep=2)
  for step in (1, 2, 3):
    ckpt.save(step, state, _config())
  ckpt.close()
  assert sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir()
                if p.name.isdigit()) == [2, 3]
  cfg = checkpoint.load_config(str(tmp_path))
  assert cfg.batch_size == 8 and cfg.mesh.fsdp == 2


def test_load_params_gives_numpy_without_a_mesh(tmp_path):
  state, _ = _state(_mesh((4, 2)))
  ckpt = checkpoint.Checkpointer(str(tmp_path), every=5, keep=3)
  ckpt.save(5, state, _config())
  ckpt.close()
  params = checkpoint.load_params(str(tmp_path))
  assert set(params) == {"tower", "logit_scale"}
  assert isinstance(params["tower"]["kernel"], np.ndarray)
  np.testing.assert_array_equal(params["tower"]["kernel"],
                                np.asarray(state["params"]["tower"]["kernel"]))
  with pytest.raises(FileNotFoundError, match="step 7"):
    checkpoint.load_params(str(tmp_path), step=7)
  with pytest.raises(FileNotFoundError, match="No checkpoint"):
    checkpoint.load_params(str(tmp_path / "elsewhere"))


def test_data_counters_and_config_round_trip_and_old_checkpoints_restore(tmp_path):
  import orbax.checkpoint as ocp
  state, _ = _state(_mesh((8, 1)))
  ckpt = checkpoint.Checkpointer(str(tmp_path / "new"), every=5, keep=3)
  ckpt.save(5, state, _config(), counters={"records": 40, "undecodable_image": 3})
  ckpt.close()
  ckpt = checkpoint.Checkpointer(str(tmp_path / "new"), every=5, keep=3)
  assert ckpt.restore_counters(5) == {"records": 40, "undecodable_image": 3}
  assert ckpt.restore_config(5) == {"method": "clip", "batch_size": 8, "mesh": {"fsdp": 2}}
  ckpt.close()
  # A checkpoint written before data counters were saved: restores, with no counters.
  old = ocp.CheckpointManager(checkpoint.checkpoint_dir(str(tmp_path / "old")),
                              item_names=("state", "config"))
  old.save(3, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                      config=ocp.args.JsonSave(_config().to_dict())))
  old.close()
  ckpt = checkpoint.Checkpointer(str(tmp_path / "old"), every=5, keep=3)
  assert ckpt.latest_step() == 3 and ckpt.restore_counters(3) == {}
  _assert_trees_equal(ckpt.restore(3, ts.abstract_of(state)), state)
  ckpt.close()


def test_orbax_is_told_the_loops_preemption_decision_and_never_asks_jax(tmp_path, monkeypatch):
  """Orbax's own preemption check would move JAX's per-process sync-point counter."""
  from jax.experimental import multihost_utils
  calls = []
  monkeypatch.setattr(multihost_utils, "reached_preemption_sync_point",
                      lambda step: calls.append(step) or False)
  state, _ = _state(_mesh((8, 1)))
  ckpt = checkpoint.Checkpointer(str(tmp_path), every=5, keep=3)
  ckpt.save(5, state, _config())
  ckpt.save(7, state, _config(), force=True, preempted=True)
  ckpt.close()
  assert calls == []
  assert ckpt._manager.reached_preemption(7) and not ckpt._manager.reached_preemption(5)


def test_restore_model_reads_only_the_subtrees_asked_for(tmp_path):
  """init_from asks for the params alone; a run's checkpoint also holds model_state (here a
  BatchNorm-like statistic), which must be skipped, not a KeyError."""
  mesh = _mesh((4, 2))
  state, _ = _state(mesh)
  state["model_state"] = {"norm": {"mean": jax.device_put(np.arange(8, dtype=np.float32),
                                                          NamedSharding(mesh, P()))}}
  ckpt = checkpoint.Checkpointer(str(tmp_path), every=5, keep=3)
  ckpt.save(5, state, _config())
  ckpt.close()
  abstract = ts.abstract_of(state)
  step, restored = checkpoint.restore_model(str(tmp_path), None, {"params": abstract["params"]})
  assert step == 5 and set(restored) == {"params", "model_state"}
  assert restored["model_state"] == {}
  _assert_trees_equal(restored["params"], state["params"])
  _, both = checkpoint.restore_model(str(tmp_path), 5, {k: abstract[k]
                                                        for k in ("params", "model_state")})
  _assert_trees_equal(both["model_state"], state["model_state"])
