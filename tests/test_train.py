"""The train loop end to end on the demo data: checkpoints, resume, mesh parity, non-finite steps.
(SIGTERM and SIGKILL of a real process: test_reliability.py.)"""

import logging

import jax
import numpy as np
import pytest

from xclip_jax import checkpoint, train
from xclip_jax.parallel import mesh as mesh_lib

from tests.tiny import checkpoint_steps, tiny_config, tiny_state


def test_train_checkpoints_and_resumes(demo_dir, tmp_path, caplog):
  workdir = str(tmp_path / "run")
  metrics = train.run(tiny_config(demo_dir), workdir)
  # The symmetric InfoNCE is the mean of its two directions. One batch of 16 after 4 tiny steps
  # from init (logit scale 1/0.07, random 16-d embeddings) gives 3.2-5.3 across seeds and caption
  # draws, above the tied-logits value log 16 = 2.77 and far below a diverged run's.
  assert metrics["loss"] == pytest.approx((metrics["loss_i2t"] + metrics["loss_t2i"]) / 2, 1e-5)
  assert 2.5 < metrics["loss"] < 6.0
  # Percent of exactly the 64 examples evaluated at the last step (padding never counted).
  assert metrics["zeroshot/examples"] == 64
  hits = metrics["zeroshot/top1"] * 64 / 100
  assert hits == pytest.approx(round(hits))
  assert metrics["zeroshot/top1"] <= metrics["zeroshot/top5"]
  assert metrics["lr"] > 0 and metrics["images_per_sec"] > 0
  assert checkpoint_steps(workdir) == [2, 4]

  params = checkpoint.load_params(workdir)
  assert params["image"]["projection"].shape == (32, 16)
  assert isinstance(params["logit_scale"], np.ndarray)
  first = params["image"]["projection"].copy()

  # Same workdir, more steps: continues from step 4 and writes 6.
  caplog.set_level(logging.INFO)
  metrics = train.run(tiny_config(demo_dir, total_steps=6), workdir)
  assert "Resuming from the checkpoint at step 4" in caplog.text
  assert checkpoint_steps(workdir) == [2, 4, 6]
  assert not np.array_equal(checkpoint.load_params(workdir)["image"]["projection"], first)
  np.testing.assert_array_equal(checkpoint.load_params(workdir, step=4)["image"]["projection"],
                                first)

  # A finished run started again does nothing and keeps its checkpoints.
  assert train.run(tiny_config(demo_dir, total_steps=6), workdir) == {}
  assert checkpoint_steps(workdir) == [2, 4, 6]


def test_train_step_on_8_devices_equals_1_device():
  # eps=1e-3 keeps Adam's first steps Lipschitz in the gradient: with eps=1e-6, a gradient of
  # ~1e-6 (a rare token's embedding row) turns reduction-order noise into a visible update change.
  config = tiny_config("", **{"model.image.patch_size": 8, "optim.lr": 1e-2, "optim.eps": 1e-3})
  rng = np.random.RandomState(0)
  batches = []
  for _ in range(3):
    text = rng.randint(4, 200, size=(16, 32)).astype(np.int32)
    text[:, 9], text[:, 10:] = 2, 0
    batches.append({"image": rng.normal(size=(16, 32, 32, 3)).astype(np.float32), "text": text})

  def trajectory(mesh):
    state, step = tiny_state(mesh, config)
    losses = []
    with jax.set_mesh(mesh):
      for b in batches:
        state, metrics = step(state, jax.device_put(b, mesh_lib.batch_sharding(mesh)))
        losses.append(float(metrics["loss"]))
    return losses, jax.device_get(state["params"])

  one = mesh_lib.make_mesh(dict(data=1, fsdp=1, tensor=1), devices=jax.devices()[:1])
  eight = mesh_lib.make_mesh(dict(data=4, fsdp=2, tensor=1))
  losses_1, params_1 = trajectory(one)
  losses_8, params_8 = trajectory(eight)
  assert losses_1[0] != losses_1[-1]                       # it trains
  np.testing.assert_allclose(losses_8, losses_1, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(params_8), jax.tree.leaves(params_1)):
    # Adam steps are ~lr = 1e-2; reduction order moves them by ~1e-6.
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_nonfinite_step_is_skipped_and_state_kept():
  config = tiny_config("", **{"model.image.patch_size": 8})
  mesh = mesh_lib.make_mesh(dict(data=8))
  state, step = tiny_state(mesh, config)
  rng = np.random.RandomState(0)
  text = rng.randint(4, 200, size=(16, 32)).astype(np.int32)
  text[:, 9], text[:, 10:] = 2, 0
  good = {"image": rng.normal(size=(16, 32, 32, 3)).astype(np.float32), "text": text}
  bad = dict(good, image=np.where(np.arange(32)[None, :, None, None] == 3, np.nan,
                                  good["image"]).astype(np.float32))
  with jax.set_mesh(mesh):
    state, m = step(state, jax.device_put(good, mesh_lib.batch_sharding(mesh)))
    before = jax.device_get(state)
    state, m = step(state, jax.device_put(bad, mesh_lib.batch_sharding(mesh)))
  after = jax.device_get(state)
  assert int(m["skipped"]) == 1 and not np.isfinite(float(m["loss"]))
  for key in ("params", "opt_state", "model_state", "method_state"):
    for a, b in zip(jax.tree.leaves(after[key]), jax.tree.leaves(before[key])):
      np.testing.assert_array_equal(a, b)
  assert int(after["step"]) == 2                           # the batch was consumed
  with jax.set_mesh(mesh):
    state, m = step(state, jax.device_put(good, mesh_lib.batch_sharding(mesh)))
  assert int(m["skipped"]) == 0


def test_consecutive_nonfinite_steps_stop_the_run_with_checkpoints_intact(tmp_path):
  # lr=inf: every update is non-finite (warmup's first lr is 0 * inf = nan) and is skipped.
  config = tiny_config("", **{"data.name": "synthetic", "optim.lr": float("inf"),
                              "optim.warmup_steps": 2, "total_steps": 20,
                              "optim.max_nonfinite_steps": 3})
  workdir = str(tmp_path / "run")
  with pytest.raises(FloatingPointError, match=r"3 consecutive steps \(up to step 3\).*those of step 0.*latest: 2"):
    train.run(config, workdir)
  assert checkpoint_steps(workdir) == [2]
  params = checkpoint.load_params(workdir)
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(params))
