"""Learning-rate schedules (config.optim.schedule) against their formulas written out in numpy,
and the invalid combinations that config.validate refuses before anything compiles."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import clip as clip_config
from xclip_jax import config as config_lib
from xclip_jax import optim


def _schedule(name, total=200, **optim_fields):
  config = clip_config.get_config("demo")
  config.total_steps = total
  config.optim.update({**dict(lr=1e-3, min_lr=0.0, warmup_steps=20, schedule=name), **optim_fields})
  return optim_schedule(config), config


def optim_schedule(config):
  config_lib.validate(config)                    # every schedule tested here is a valid config
  return optim.learning_rate_schedule(config.optim, config.total_steps)


def _values(sched, steps):
  return np.array([float(sched(jnp.int32(t))) for t in steps])


def test_cosine_is_bitwise_optax_warmup_cosine_by_default():
  config = clip_config.get_config("vit_b16")
  assert config.optim.schedule == "cosine"
  config.optim.min_lr = 1e-6
  sched = optim.learning_rate_schedule(config.optim, config.total_steps)
  reference = optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=config.optim.lr, warmup_steps=config.optim.warmup_steps,
      decay_steps=config.total_steps, end_value=config.optim.min_lr)
  steps = jnp.array([0, 1, 999, 2000, 2001, 51_000, 99_999, 100_000, 120_000], jnp.int32)
  np.testing.assert_array_equal(np.asarray(sched(steps)), np.asarray(reference(steps)))


def test_constant_schedule_warms_up_then_holds():
  sched, _ = _schedule("constant")
  t = np.arange(0, 201)
  expected = 1e-3 * np.minimum(1.0, t / 20)                 # warmup start 0, end (t=20) at lr
  np.testing.assert_allclose(_values(sched, t), expected, rtol=1e-6, atol=1e-12)
  np.testing.assert_allclose(_values(sched, [0, 10, 20, 199]), [0, 5e-4, 1e-3, 1e-3], rtol=1e-6)


@pytest.mark.parametrize("cooldown", [dict(cooldown_steps=50), dict(cooldown_fraction=0.25)])
def test_constant_cooldown_goes_linearly_to_min_lr(cooldown):
  sched, _ = _schedule("constant_cooldown", min_lr=1e-5, **cooldown)
  t = np.arange(0, 201)
  # Cooldown from t = 150 (200 - 50): lr at its start, min_lr at t = 200.
  factor = np.clip((200 - t) / 50, 0.0, 1.0)
  expected = 1e-5 + (1e-3 * np.minimum(1.0, t / 20) - 1e-5) * factor
  np.testing.assert_allclose(_values(sched, t), expected, rtol=1e-6, atol=1e-12)
  np.testing.assert_allclose(_values(sched, [20, 150, 175, 199, 200]),
                             [1e-3, 1e-3, (1e-3 + 1e-5) / 2, 1e-5 + (1e-3 - 1e-5) / 50, 1e-5],
                             rtol=1e-5)


def test_rsqrt_follows_big_vision():
  """big_vision.utils.create_learning_rate_schedule(decay_type='rsqrt', timescale, warmup_steps,
  cooldown_steps), written out: lr * min(1, t/w) / sqrt(1 + max(t - w, 0) / timescale)
  * min(1, (T - t) / cooldown)."""
  sched, _ = _schedule("rsqrt", total=1000, rsqrt_timescale=100, cooldown_steps=200)
  t = np.arange(0, 1001)
  w, ts, total, cool = 20, 100.0, 1000, 200
  expected = (1e-3 * np.minimum(1.0, t / w) / np.sqrt(1 + np.maximum(t - w, 0) / ts)
              * np.minimum(1.0, (total - t) / cool))
  np.testing.assert_allclose(_values(sched, t), expected, rtol=1e-6, atol=1e-12)
  # Hand values: the peak at the warmup's end, 1/sqrt(2) and 1/2 of it one and three timescales
  # later, the cooldown's start (t = 800: lr / sqrt(8.8)), its middle and its end.
  np.testing.assert_allclose(
      _values(sched, [10, 20, 120, 320, 800, 900, 1000]),
      [5e-4, 1e-3, 1e-3 / np.sqrt(2), 5e-4, 1e-3 / np.sqrt(8.8), 0.5e-3 / np.sqrt(9.8), 0.0],
      rtol=1e-6, atol=1e-12)


def test_rsqrt_without_cooldown_keeps_decaying():
  sched, _ = _schedule("rsqrt", total=1000, rsqrt_timescale=100)
  np.testing.assert_allclose(_values(sched, [20, 120, 999]),
                             [1e-3, 1e-3 / np.sqrt(2), 1e-3 / np.sqrt(1 + 979 / 100)], rtol=1e-6)


def test_make_optimizer_steps_with_the_configured_schedule():
  config = clip_config.get_config("demo")
  config.total_steps = 10
  config.optim.update(dict(lr=0.1, warmup_steps=2, schedule="constant_cooldown", cooldown_steps=4,
                           weight_decay=0.5, grad_clip_norm=0.0))
  params = {"kernel": jnp.ones((3,))}
  tx, schedule = optim.make_optimizer(config, params)
  state = tx.init(params)
  zeros = jax.tree.map(jnp.zeros_like, params)
  for t in range(10):
    updates, state = tx.update(zeros, state, params)
    # Zero gradients: the update is AdamW's decay alone, -lr(t) x weight_decay x p.
    lr_t = 0.1 * min(1.0, t / 2) * min(1.0, (10 - t) / 4)
    np.testing.assert_allclose(float(schedule(t)), lr_t, rtol=1e-6, atol=1e-12)
    np.testing.assert_allclose(updates["kernel"], -0.5 * lr_t, rtol=1e-5, atol=1e-12)


@pytest.mark.parametrize("overrides,message", [
    (dict(schedule="linear"), "schedule='linear'"),
    (dict(schedule="constant_cooldown"), "constant_cooldown needs"),
    (dict(schedule="constant_cooldown", cooldown_steps=190), "exceed config.total_steps=200"),
    (dict(schedule="rsqrt", cooldown_fraction=0.95), "exceed config.total_steps=200"),
    (dict(schedule="cosine", cooldown_steps=10), "has no cooldown"),
    (dict(schedule="constant", cooldown_fraction=0.1), "has no cooldown"),
    (dict(schedule="rsqrt", cooldown_steps=10, cooldown_fraction=0.1), "not both"),
    (dict(schedule="rsqrt", cooldown_fraction=1.5), "cooldown_fraction"),
    (dict(schedule="rsqrt", rsqrt_timescale=0), "rsqrt_timescale=0"),
    (dict(schedule="constant", min_lr=1e-5), "never reaches it"),
])
def test_invalid_schedules_are_config_errors(overrides, message):
  config = clip_config.get_config("demo")
  config.total_steps = 200
  config.optim.update(dict(warmup_steps=20, **overrides))
  with pytest.raises(ValueError, match=message):
    config_lib.validate(config)


def test_cli_schedule_flags_reach_validation(tmp_path):
  from tests.test_config import _main
  out = _main("--config=configs/clip.py:demo", f"--workdir={tmp_path}",
              "--config.optim.schedule=rsqrt", "--config.optim.cooldown_steps=100000")
  assert out.returncode != 0
  assert "cooldown 100000 steps exceed config.total_steps=600" in out.stderr
  assert "compiled" not in out.stderr and not (tmp_path / "checkpoints").exists()
