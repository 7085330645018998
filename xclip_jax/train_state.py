"""The train state as a plain pytree, created already sharded, and the jitted train step.

TrainState is a dict of pure pytrees so that checkpoints hold framework-neutral trees:
  step         int32 scalar
  params       nested dict of the model's nnx.Param arrays
  opt_state    optax state over `params`
  model_state  nested dict of the model's other variables (e.g. BatchNorm statistics)
  method_state the method's extra state (DeCLIP: the nearest-neighbour queue), or {}
  rng          uint32 PRNG key data, advanced every step
  ema_params   only with config.ema_decay > 0: the parameters' moving average (ema.py)
Nothing here knows which method is trained: the objective comes from the registry
(xclip_jax/methods/).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx

from xclip_jax import accumulate, param_groups
from xclip_jax import ema as ema_lib
from xclip_jax import methods
from xclip_jax.data import device_augment
from xclip_jax.data import text_spec as text_spec_lib
from xclip_jax.models import vit as vit_lib
from xclip_jax.parallel import mesh as mesh_lib

TrainState = dict[str, Any]


def init_method_state(method: methods.Method, config: ml_collections.ConfigDict,
                      mesh: jax.sharding.Mesh, seed: int) -> Any:
  """The method's extra state, created directly in the shardings its `state_specs` name."""
  specs = method.state_specs(config)
  shardings = jax.tree.map(lambda spec: jax.sharding.NamedSharding(mesh, spec), specs,
                           is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
  init = lambda: method.init_state(config, jax.random.fold_in(jax.random.key(seed), 1))
  mesh_lib.check_divisible(jax.tree.map(
      lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh),
      jax.eval_shape(init), shardings), mesh, what=f"{method.name} state",
      fix=f"or its size in config.{method.name} (e.g. a multiple of the device count)")
  with jax.set_mesh(mesh):
    return jax.jit(init, out_shardings=shardings)()


def init_train_state(params: Any, model_state: Any, tx: optax.GradientTransformation,
                     mesh: jax.sharding.Mesh, seed: int, method_state: Any = None) -> TrainState:
  """The full train state around already-sharded parameters; optimizer state is created sharded."""
  replicated = mesh_lib.replicated(mesh)
  # Parameter-shaped leaves (Adam's moments) take their parameter's sharding; counts and other
  # scalars are replicated. (Left to propagation, jit replicates them: FSDP would save nothing.)
  # Frozen parameters have no state: optax marks their place with an empty MaskedNode.
  masked = lambda x: isinstance(x, optax.MaskedNode)
  opt_shardings = optax.tree_map_params(
      tx, lambda x, sharding: x if masked(x) else sharding, jax.eval_shape(tx.init, params),
      shardings_of(params), transform_non_params=lambda _: replicated, is_leaf=masked)
  with jax.set_mesh(mesh):
    opt_state = jax.jit(tx.init, out_shardings=opt_shardings)(params)
  state = {
      "step": jax.device_put(jnp.zeros((), jnp.int32), replicated),
      "params": params,
      "opt_state": opt_state,
      "model_state": model_state,
      "method_state": {} if method_state is None else method_state,
      "rng": jax.device_put(jax.random.key_data(jax.random.key(seed)), replicated),
  }
  return state


def shardings_of(tree: Any) -> Any:
  return jax.tree.map(lambda x: x.sharding, tree)


def abstract_of(tree: Any) -> Any:
  """ShapeDtypeStructs carrying each leaf's sharding: the restore target for Orbax."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


def make_train_step(graphdef: Any, tx: optax.GradientTransformation, schedule: optax.Schedule,
                    method: methods.Method, config: ml_collections.ConfigDict,
                    text_spec: text_spec_lib.TextSpec | None = None, augment: bool = True,
                    stop_frozen_gradients: bool = True):
  """Returns the un-jitted step: (state, batch) -> (state, metrics).

  The batch's image views (the method's declared `views`) are uint8 pixels (float is read as
  0..255 too); the step first augments and normalises them on the device as each view declares
  (data/device_augment.py), with per-example keys from (config.seed, state["step"], global row).
  augment=False skips that: the images are then the model's input as given (already normalised
  float32; benchmarks compare the two). `text_spec` (the tokenizer's vocab size and special ids)
  is needed by methods whose `prepare` edits token ids (DeCLIP's MLM masking).

  Frozen parameters (param_groups.py: a locked tower, the frozen patch embedding) enter the model
  under jax.lax.stop_gradient, so no backward pass runs into them; their gradients (zeros) and
  grad_norm then count the trainable parameters only. stop_frozen_gradients=False leaves that to
  the optimizer's set_to_zero alone (tests/test_locked_towers.py compares the programs).
  """
  accum_steps = int(config.accum_steps)
  if accum_steps > 1 and method.accumulation is None:
    supported = [name for name in methods.names() if methods.get_method(name).accumulation]
    raise ValueError(f"config.accum_steps={accum_steps}: gradient accumulation with cached "
                     f"features supports {supported}, not {method.name!r}.")
  ema_decay = ema_lib.decay_of(config)
  augment_batch = (device_augment.make_batch_augment(method.views, config.data, int(config.seed))
                   if augment else None)
  stop_frozen = (param_groups.stop_frozen_gradients(config) if stop_frozen_gradients
                 else lambda params: params)

  def train_step(state: TrainState, batch: dict[str, jax.Array]):
    if augment_batch is not None:
      # Before prepare and before accumulation splits the batch: every consumer of the images
      # sees the augmented, normalised views.
      batch = augment_batch(batch, state["step"])
    rng, prepare_rng = jax.random.split(jax.random.wrap_key_data(state["rng"]))
    batch = method.prepare(batch, prepare_rng, config, text_spec)
    batch = vit_lib.add_patch_keys(batch, config, state["step"])   # FLIP keys; none when off

    def loss_fn(params):
      model = nnx.merge(graphdef, stop_frozen(params), state["model_state"])
      outputs = model(batch, train=True)
      loss, metrics, method_state = method.objective(outputs, batch, config,
                                                     state["method_state"])
      _, _, model_state = nnx.split(model, nnx.Param, ...)
      return loss, (metrics, nnx.to_pure_dict(model_state), method_state)

    if accum_steps > 1:
      def loss_of_outputs(outputs):
        loss, metrics, _ = method.objective(outputs, batch, config, state["method_state"])
        return loss, metrics
      (loss, metrics), grads = accumulate.accumulated_value_and_grad(
          graphdef, state["params"], state["model_state"], batch, accum_steps, loss_of_outputs,
          method.accumulation.features, method.accumulation.shared, prepare_params=stop_frozen)
      model_state, method_state = state["model_state"], state["method_state"]
    else:
      grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
      (loss, (metrics, model_state, method_state)), grads = grad_fn(state["params"])
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    # The method's parameter constraints (e.g. the CLIP family's logit-scale range).
    params = method.constrain_params(params, config)

    # A non-finite loss or gradient skips the update: every part of the state but the step
    # counter and the rng stays as it was (the batch is consumed). The loop counts the skips.
    grad_norm = optax.tree.norm(grads)
    finite = (jnp.isfinite(loss) & jnp.isfinite(grad_norm) &
              jnp.isfinite(optax.tree.norm(params)))    # an overflowing update counts too
    keep_if_bad = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
    params = keep_if_bad(params, state["params"])
    opt_state = keep_if_bad(opt_state, state["opt_state"])
    model_state = keep_if_bad(model_state, state["model_state"])
    method_state = keep_if_bad(method_state, state["method_state"])

    metrics = dict(metrics, loss=loss, grad_norm=grad_norm, skipped=1 - finite.astype(jnp.int32),
                   param_norm=optax.tree.norm(params), lr=schedule(state["step"]))
    new_state = {"step": state["step"] + 1, "params": params, "opt_state": opt_state,
                 "model_state": model_state, "method_state": method_state,
                 "rng": jax.random.key_data(rng)}
    if ema_lib.KEY in state:       # present exactly when config.ema_decay > 0 (ema.add_to_state)
      new_state[ema_lib.KEY] = ema_lib.update(state[ema_lib.KEY], params, new_state["step"],
                                              ema_decay)
    return new_state, metrics

  return train_step


def jit_train_step(train_step, state_shardings: Any, batch_sharding: Any,
                   mesh: jax.sharding.Mesh):
  """jax.jit with explicit in/out shardings; the old state is donated so its buffers are reused."""
  return jax.jit(train_step,
                 in_shardings=(state_shardings, batch_sharding),
                 out_shardings=(state_shardings, mesh_lib.replicated(mesh)),
                 donate_argnums=(0,))
