"""The parameters' moving average (config.ema_decay, xclip_jax/ema.py): its recurrence against
optax.ema and a numpy sum, its place in the state and checkpoints, its evaluation, its loading,
and exact resume."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

import xclip_jax
from xclip_jax import checkpoint, config as config_lib, ema, train
from xclip_jax.evaluate import runner
from xclip_jax import methods
from xclip_jax.parallel import mesh as mesh_lib
from xclip_jax.parallel import multihost

from tests.test_reliability import _sigterm_at
from tests.tiny import tiny_config


def _run_updates(params_per_step, decay):
  """ema.update applied after each step t = 1..T, starting from the initial parameters."""
  average = params_per_step[0]
  update = jax.jit(ema.update, static_argnums=3)
  for t, params in enumerate(params_per_step[1:], start=1):
    average = update(average, params, jnp.int32(t), decay)
  return average


def test_update_equals_debiased_optax_ema_and_the_weighted_sum():
  rng = np.random.RandomState(0)
  init = {"w": rng.normal(size=(3, 4)).astype(np.float32), "b": np.float32(5.0)}
  steps = [jax.tree.map(lambda x: (x + rng.normal(size=np.shape(x))).astype(np.float32), init)
           for _ in range(6)]
  for decay in (0.5, 0.9, 0.9999):
    got = _run_updates([init] + steps, decay)
    # The reference sum weighs only the steps' parameters: the initialisation has weight 0.
    want = ema.reference(steps, decay)
    # optax's own debiased EMA (zero start, divided by 1 - d^t) of the same sequence.
    tx = optax.ema(decay, debias=True)
    opt_state = tx.init(init)
    for params in steps:
      out, opt_state = tx.update(params, opt_state)
    # optax forms 1 - d and 1 - d^t in float32: at d = 0.9999 that is 1.7e-4 off (float32's
    # 0.9999 is 0.99989998), which ema.update avoids (exp(t log d) from a float64 log d).
    optax_rtol = 2e-6 if decay < 0.99 else 3e-4
    for g, w, o in zip(jax.tree.leaves(got), jax.tree.leaves(want), jax.tree.leaves(out)):
      np.testing.assert_allclose(g, w, rtol=2e-6, atol=2e-6)
      np.testing.assert_allclose(g, o, rtol=optax_rtol, atol=2e-6)


def test_hand_computed_toy():
  # Parameters 1, 2, 3 after steps 1..3, d = 0.5: weights (0.25, 0.5, 1) / 1.75 over 1, 2, 3
  # give (0.25 + 1 + 3) / 1.75 = 17/7; step 1 alone gives its own value (no pull to the init).
  seq = [{"p": np.float32(100.0)}] + [{"p": np.float32(v)} for v in (1.0, 2.0, 3.0)]
  assert float(_run_updates(seq[:2], 0.5)["p"]) == 1.0
  np.testing.assert_allclose(float(_run_updates(seq, 0.5)["p"]), 17 / 7, rtol=1e-6)


def test_state_copy_is_sharded_like_the_params_and_absent_when_off():
  config = tiny_config("", **{"model.image.patch_size": 8})
  mesh = mesh_lib.make_mesh(dict(data=4, fsdp=2, tensor=1))
  model_fn = lambda: methods.build_model(config, eos_id=2, seed=0)
  _, params, _ = mesh_lib.create_sharded(model_fn, mesh)
  assert ema.KEY not in ema.add_to_state({"params": params}, config)
  config.ema_decay = 0.99
  state = ema.add_to_state({"params": params}, config)
  sharded = 0
  for p, e in zip(jax.tree.leaves(params), jax.tree.leaves(state[ema.KEY])):
    assert e.sharding == p.sharding
    pointer = lambda x: x.addressable_shards[0].data.unsafe_buffer_pointer()
    assert pointer(e) != pointer(p)         # a copy: the step donates both
    np.testing.assert_array_equal(e, p)
    sharded += "fsdp" in str(p.sharding.spec)
  assert sharded > 0       # the check covers FSDP-sharded leaves, not only replicated ones


def test_bad_decay_is_a_clear_error():
  config = tiny_config("", ema_decay=1.0)
  with pytest.raises(ValueError, match="config.ema_decay=1.0"):
    config_lib.validate(config)


def _stored_keys(workdir, step):
  path = f"{checkpoint.checkpoint_dir(workdir)}/{step}/state"
  return set(ocp.PyTreeCheckpointer().metadata(path).item_metadata.tree)


def _assert_trees_equal(a, b):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_array_equal(x, y)


@pytest.mark.slow
def test_train_evaluates_saves_loads_and_resumes_the_ema(demo_dir, tmp_path, monkeypatch):
  decay = 0.5     # far from 1, so the average differs visibly from the last parameters
  config = lambda **kw: tiny_config(demo_dir, ema_decay=decay, **{"checkpoint.every": 1,
                                                                 "checkpoint.keep": 10, **kw})
  straight = str(tmp_path / "straight")
  results = train.run(config(), straight)

  # In-loop evaluation: every raw result has its ema/ twin, over the same 64 examples.
  assert results["ema/zeroshot/examples"] == results["zeroshot/examples"] == 64
  assert {f"ema/{k}" for k in results if k.startswith("zeroshot/")} <= set(results)

  # The stored EMA is the recurrence over the stored parameters of steps 1..4.
  per_step = [checkpoint.load_params(straight, step=s) for s in (1, 2, 3, 4)]
  stored_ema = checkpoint.load_params(straight, ema=True)
  for got, want, last in zip(jax.tree.leaves(stored_ema),
                             jax.tree.leaves(ema.reference(per_step, decay)),
                             jax.tree.leaves(per_step[-1])):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  assert not np.allclose(stored_ema["image"]["projection"], per_step[-1]["image"]["projection"])

  # xclip_jax.load(ema=True) serves the same average; the default stays the parameters.
  _assert_trees_equal(jax.device_get(xclip_jax.load(straight, ema=True).params), stored_ema)
  _assert_trees_equal(jax.device_get(xclip_jax.load(straight).params), per_step[-1])
  # python -m xclip_jax.evaluate restores it beside the parameters (and reports ema/* too).
  saved = checkpoint.saved_config(straight)
  saved.mesh.update(dict(data=-1, fsdp=1, tensor=1))
  restored = runner.restore(saved, straight, None)[-1]
  _assert_trees_equal(jax.device_get(restored[ema.KEY]), stored_ema)
  _assert_trees_equal(jax.device_get(restored["params"]), per_step[-1])
  # The export path (python -m xclip_jax.interop.convert --export --ema) writes the average.
  from xclip_jax.interop import convert, openai_layout  # noqa: PLC0415
  exported = convert.export_checkpoint(straight, str(tmp_path / "ema.safetensors"), ema=True)
  for key, value in openai_layout.from_params(stored_ema).items():
    np.testing.assert_array_equal(exported[key], value)

  # SIGTERM after step 2, then the same command: parameters and EMA bitwise those of the
  # uninterrupted run.
  interrupted = str(tmp_path / "interrupted")
  with monkeypatch.context() as m:
    _sigterm_at(m, 2)
    with pytest.raises(multihost.Preempted):
      train.run(config(**{"evals.zeroshot.enabled": False}), interrupted)
  assert ema.KEY in _stored_keys(interrupted, 2)
  train.run(config(**{"evals.zeroshot.enabled": False}), interrupted)
  _assert_trees_equal(checkpoint.load_params(interrupted), per_step[-1])
  _assert_trees_equal(checkpoint.load_params(interrupted, ema=True), stored_ema)


@pytest.mark.slow
def test_off_keeps_no_ema_and_resuming_with_it_on_starts_it_at_the_parameters(demo_dir,
                                                                              tmp_path):
  workdir = str(tmp_path / "run")
  off = dict(total_steps=2, **{"evals.zeroshot.enabled": False})
  results = train.run(tiny_config(demo_dir, **off), workdir)
  assert ema.KEY not in _stored_keys(workdir, 2)
  assert not any(k.startswith("ema/") for k in results)
  with pytest.raises(ValueError, match="ema_decay=0"):
    checkpoint.load_params(workdir, ema=True)

  # ema_decay defines the run: a plain resume with it changed is refused ...
  on = dict(off, total_steps=3, ema_decay=0.5)
  from xclip_jax import resume
  with pytest.raises(resume.ConfigMismatchError, match="ema_decay"):
    train.run(tiny_config(demo_dir, **on), workdir)
  # ... and --resume_with_changes starts the average at the step-2 parameters.
  train.run(tiny_config(demo_dir, **on), workdir, resume_with_changes=True)
  p2, p3 = (checkpoint.load_params(workdir, step=s) for s in (2, 3))
  weight = 0.5 / (1 - 0.5**3)
  want = jax.tree.map(lambda a, b: a + weight * (b - a), p2, p3)
  for got, w in zip(jax.tree.leaves(checkpoint.load_params(workdir, ema=True)),
                    jax.tree.leaves(want)):
    np.testing.assert_allclose(got, w, rtol=1e-5, atol=1e-6)
