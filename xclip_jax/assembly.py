"""One assembly of a run's parts for train.py, bench.py and the tests alike: the mesh, the
method, the model created in its shardings, the optimizer and the train state, and the jitted
(not yet compiled) train step.

What feeds the step (TFDS or synthetic batches, the tokenizer) is the data source's business
(data/sources.py); the parts need only its TextSpec.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import ml_collections

from xclip_jax import config as config_lib
from xclip_jax import ema as ema_lib
from xclip_jax import methods
from xclip_jax import optim
from xclip_jax import train_state as ts
from xclip_jax.data import text_spec as text_spec_lib
from xclip_jax.parallel import mesh as mesh_lib


@dataclasses.dataclass
class RunParts:
  config: ml_collections.ConfigDict
  method: methods.Method
  mesh: jax.sharding.Mesh
  text_spec: text_spec_lib.TextSpec
  host_batch: int                 # this process's rows of the global batch
  graphdef: Any                   # the model's nnx graph definition (params live in state)
  tx: Any                         # the optax transformation
  schedule: Callable[[Any], Any]  # step -> learning rate
  state: dict[str, Any]           # params, model state, opt state, step, rng, method state

  @property
  def batch_sharding(self) -> jax.sharding.NamedSharding:
    return mesh_lib.batch_sharding(self.mesh)

  @property
  def num_params(self) -> int:
    return sum(x.size for x in jax.tree.leaves(self.state["params"]))

  def train_step(self, *, augment: bool = True):
    """The jitted train step (lower and compile it with a batch, or call it directly)."""
    step = ts.make_train_step(self.graphdef, self.tx, self.schedule, self.method, self.config,
                              self.text_spec, augment=augment)
    return ts.jit_train_step(step, ts.shardings_of(self.state), self.batch_sharding, self.mesh)

  def with_params(self, params: dict[str, Any]) -> None:
    """Fine-tuning: new parameters, with optimizer, step and rng started afresh."""
    state = ts.init_train_state(params, self.state["model_state"], self.tx, self.mesh,
                                self.config.seed, self.state["method_state"])
    self.state = ema_lib.add_to_state(state, self.config)


def check_batch(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh) -> int:
  """This process's rows of the global batch; each accumulation micro-batch must split too."""
  host_batch = mesh_lib.batch_size_per_process(config.batch_size, mesh)
  if config.accum_steps > 1:
    mesh_lib.batch_size_per_process(config.batch_size // config.accum_steps, mesh)
  return host_batch


def check_text_spec(config: ml_collections.ConfigDict, text_spec: text_spec_lib.TextSpec) -> None:
  if text_spec.vocab_size > config.model.text.vocab_size:
    raise ValueError(f"The tokenizer has {text_spec.vocab_size} ids but config.model.text.vocab_size"
                     f"={config.model.text.vocab_size}; raise the latter.")


def build_mesh(config: ml_collections.ConfigDict) -> tuple[methods.Method, jax.sharding.Mesh, int]:
  """The cheap part, checked before anything compiles: validated config, method, mesh, rows."""
  config_lib.validate(config)
  method = methods.get_method(config.method)
  mesh = mesh_lib.make_mesh(config.mesh)
  return method, mesh, check_batch(config, mesh)


def build(config: ml_collections.ConfigDict, text_spec: text_spec_lib.TextSpec | None = None,
          *, mesh: jax.sharding.Mesh | None = None) -> RunParts:
  """Every part of a run but its data, created directly in its shardings. `text_spec` defaults to
  the SentencePiece layout over config.model.text.vocab_size (what synthetic data uses)."""
  method, default_mesh, host_batch = build_mesh(config)
  mesh = mesh or default_mesh
  if mesh is not default_mesh:
    host_batch = check_batch(config, mesh)
  text_spec = text_spec or text_spec_lib.TextSpec.reserved(config.model.text.vocab_size)
  check_text_spec(config, text_spec)
  model_fn = lambda: methods.build_model(config, eos_id=text_spec.eos_id, seed=config.seed)
  graphdef, params, model_state = mesh_lib.create_sharded(model_fn, mesh)
  tx, schedule = optim.make_optimizer(config, params)
  method_state = ts.init_method_state(method, config, mesh, config.seed)
  state = ts.init_train_state(params, model_state, tx, mesh, config.seed, method_state)
  state = ema_lib.add_to_state(state, config)       # config.ema_decay > 0: the parameters' EMA
  return RunParts(config=config, method=method, mesh=mesh, text_spec=text_spec,
                  host_batch=host_batch, graphdef=graphdef, tx=tx, schedule=schedule, state=state)
