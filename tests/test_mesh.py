"""Mesh construction, the logical rules table, and parameters created sharded (8 CPU devices)."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AxisType, PartitionSpec as P

from xclip_jax import config as cfglib
from xclip_jax import methods
from xclip_jax.parallel import mesh as meshlib

EOS = 2
WIDTH, LAYERS, MLP = 32, 2, 64


def tiny_config():
  c = cfglib.base_config()
  c.model.embed_dim = 16
  c.model.image.update(dict(image_size=16, patch_size=8, width=WIDTH, layers=LAYERS, heads=2,
                            mlp_ratio=MLP / WIDTH))
  c.model.text.update(dict(context_length=8, width=WIDTH, layers=LAYERS, heads=2,
                           mlp_ratio=MLP / WIDTH, vocab_size=64))
  return c


def model_fn():
  return methods.build_model(tiny_config(), eos_id=EOS, seed=0)


def mesh_of(data, fsdp, tensor=1):
  return meshlib.make_mesh(dict(data=data, fsdp=fsdp, tensor=tensor))


# ---- make_mesh -----------------------------------------------------------------------------------


@pytest.mark.parametrize("cfg,shape", [
    (dict(data=-1, fsdp=1, tensor=1), (8, 1, 1)),
    (dict(data=2, fsdp=-1, tensor=1), (2, 4, 1)),
    (dict(data=2, fsdp=2, tensor=-1), (2, 2, 2)),
    (dict(data=8), (8, 1, 1)),                      # missing axes default to 1
])
def test_make_mesh_fills_minus_one(cfg, shape):
  mesh = meshlib.make_mesh(ml_collections.ConfigDict(cfg))
  assert mesh.axis_names == meshlib.MESH_AXES
  assert tuple(mesh.shape[a] for a in meshlib.MESH_AXES) == shape
  assert all(t == AxisType.Auto for t in mesh.axis_types)
  assert sorted(d.id for d in mesh.devices.flat) == list(range(8))


@pytest.mark.parametrize("cfg,message", [
    (dict(data=3, fsdp=2, tensor=1), r"product 6 != 8 devices"),
    (dict(data=-1, fsdp=-1, tensor=1), r"only one axis may be -1, got data, fsdp"),
    (dict(data=-1, fsdp=3, tensor=1), r"not divisible by the fixed axes' product 3"),
    (dict(data=0, fsdp=8, tensor=1), r"config.mesh.data=0"),
    (dict(data=8, model=1), r"unknown axes \['model'\]"),
])
def test_make_mesh_errors_name_the_config(cfg, message):
  with pytest.raises(ValueError, match=message):
    meshlib.make_mesh(cfg)


def test_make_mesh_on_given_devices():
  devices = jax.devices()[4:]
  mesh = meshlib.make_mesh(dict(data=-1, fsdp=2, tensor=1), devices=devices)
  assert mesh.devices.shape == (2, 2, 1)
  assert list(mesh.devices.flat) == devices
  with pytest.raises(ValueError, match="product 8 != 4 devices"):
    meshlib.make_mesh(dict(data=4, fsdp=2, tensor=1), devices=devices)


# ---- batch shardings -----------------------------------------------------------------------------


def test_batch_and_replicated_shardings():
  mesh = mesh_of(2, 4)
  batch = jax.device_put(np.arange(16 * 3).reshape(16, 3), meshlib.batch_sharding(mesh))
  assert {shard.data.shape for shard in batch.addressable_shards} == {(2, 3)}
  assert len({shard.index for shard in batch.addressable_shards}) == 8   # all rows distinct
  full = jax.device_put(np.ones((4, 3)), meshlib.replicated(mesh))
  assert {shard.data.shape for shard in full.addressable_shards} == {(4, 3)}


def test_batch_size_per_process():
  assert meshlib.batch_size_per_process(64, mesh_of(2, 4)) == 64    # one process feeds it all
  assert meshlib.batch_size_per_process(8, mesh_of(2, 2, 2)) == 8    # tensor copies count once
  with pytest.raises(ValueError, match=r"config.batch_size=30 .* data x fsdp = 2 x 4 = 8"):
    meshlib.batch_size_per_process(30, mesh_of(2, 4))


# ---- logical rules and parameter shardings -------------------------------------------------------


def test_rules_cover_every_logical_name():
  model = nnx.eval_shape(model_fn)
  names = set()
  for _, variable in nnx.to_flat_state(nnx.state(model)):
    names.update(n for n in variable.get_metadata().get("out_sharding") or () if n is not None)
  rules = dict(meshlib.LOGICAL_RULES)
  assert len(rules) == len(meshlib.LOGICAL_RULES), "a logical name is listed twice"
  assert names <= set(rules), f"unmapped logical names: {names - set(rules)}"
  assert {"embed", "mlp", "heads", "vocab", "layers", "norm"} <= names
  for target in rules.values():
    targets = target if isinstance(target, tuple) else (target,)
    assert all(t is None or t in meshlib.MESH_AXES for t in targets)


def blocks_of(params, tower):
  return params[tower]["transformer"]["blocks"]


@pytest.mark.parametrize("data,fsdp", [(2, 4), (4, 2)])
def test_large_kernels_are_fsdp_sharded_on_embed(data, fsdp):
  _, params, rest = meshlib.abstract_model(model_fn, mesh_of(data, fsdp))
  assert rest == {}
  for tower in ("image", "text"):
    blocks = blocks_of(params, tower)
    qkv, fc, proj = (blocks["attn"]["qkv_kernel"], blocks["mlp"]["fc"]["kernel"],
                     blocks["mlp"]["proj"]["kernel"])
    assert qkv.sharding.spec == P(None, "fsdp", None, "tensor", None)
    assert fc.sharding.spec == P(None, "fsdp", "tensor")
    assert proj.sharding.spec == P(None, "tensor", "fsdp")
    # The embed dim really is split fsdp ways; the layers dim stays whole for scan.
    assert qkv.sharding.shard_shape(qkv.shape)[:2] == (LAYERS, WIDTH // fsdp)
    assert fc.sharding.shard_shape(fc.shape) == (LAYERS, WIDTH // fsdp, MLP)
    assert blocks["ln_1"]["scale"].sharding.is_fully_replicated
  token = params["text"]["token_embedding"]
  assert token.sharding.spec == P("tensor", "fsdp")
  assert token.sharding.shard_shape(token.shape) == (64, WIDTH // fsdp)
  assert params["logit_scale"].sharding.is_fully_replicated


def test_nothing_is_sharded_without_fsdp():
  _, params, _ = meshlib.abstract_model(model_fn, mesh_of(8, 1))
  leaves = jax.tree.leaves(params)
  assert len(leaves) > 20
  assert all(leaf.sharding.is_fully_replicated for leaf in leaves)


def test_tensor_axis_splits_heads_and_mlp():
  _, params, _ = meshlib.abstract_model(model_fn, mesh_of(2, 2, 2))
  blocks = blocks_of(params, "text")
  fc, qkv = blocks["mlp"]["fc"]["kernel"], blocks["attn"]["qkv_kernel"]
  assert fc.sharding.shard_shape(fc.shape) == (LAYERS, WIDTH // 2, MLP // 2)
  assert qkv.sharding.shard_shape(qkv.shape) == (LAYERS, WIDTH // 2, 3, 1, WIDTH // 2)


def test_uneven_split_is_a_clear_error_before_compiling():
  # 2 heads cannot be split over tensor=4.
  with pytest.raises(ValueError, match=r"attn/\w+_kernel.*size 2.*mesh axes \('tensor',\).*config.mesh.tensor"):
    meshlib.create_sharded(model_fn, mesh_of(2, 1, 4))


# ---- real sharded creation and a sharded step ----------------------------------------------------


@pytest.fixture(scope="module")
def sharded():
  mesh = mesh_of(2, 4)
  return (mesh, *meshlib.create_sharded(model_fn, mesh))


def test_create_sharded_places_params_as_annotated(sharded):
  mesh, graphdef, params, rest = sharded
  _, abstract, _ = meshlib.abstract_model(model_fn, mesh)
  assert rest == {}
  assert jax.tree.structure(params) == jax.tree.structure(abstract)
  jax.tree.map(lambda a, b: (a.shape, a.dtype, a.sharding) == (b.shape, b.dtype, b.sharding)
               or pytest.fail(f"{a} vs {b}"), params, abstract)
  qkv = blocks_of(params, "text")["attn"]["qkv_kernel"]
  assert {s.data.shape for s in qkv.addressable_shards} == {(LAYERS, WIDTH // 4, 3, 2, 16)}
  np.testing.assert_allclose(params["logit_scale"], np.log(1 / 0.07), rtol=1e-6)
  # Each layer got its own init, and no parameter came out all zeros by mistake.
  assert float(jnp.abs(qkv[0] - qkv[1]).max()) > 1e-3
  assert float(jnp.abs(params["text"]["token_embedding"]).max()) > 1e-3


class _BigTable(nnx.Module):
  def __init__(self, rngs):
    init = nnx.with_partitioning(nnx.initializers.normal(0.02), ("vocab", "embed"))
    self.table = nnx.Param(init(rngs.params(), (1000, 32), jnp.float32))


def test_create_sharded_never_builds_a_whole_parameter(monkeypatch):
  compiled = []
  real_jit = jax.jit

  def spying_jit(fn, **kwargs):          # keeps the HLO that create_sharded compiles
    jitted = real_jit(fn, **kwargs)
    compiled.append(lambda: jitted.lower().compile().as_text())
    return jitted

  monkeypatch.setattr(jax, "jit", spying_jit)
  mesh = mesh_of(1, 8)
  _, params, _ = meshlib.create_sharded(lambda: _BigTable(nnx.Rngs(0)), mesh)
  monkeypatch.undo()
  with jax.set_mesh(mesh), nnx.logical_axis_rules(meshlib.LOGICAL_RULES):
    hlo = compiled[-1]()
  assert "[1000,4]" in hlo            # each device draws its own 1000 x 32/8 slice
  assert "[1000,32]" not in hlo       # and nothing of the full shape exists anywhere
  assert {s.data.shape for s in params["table"].addressable_shards} == {(1000, 4)}
  # Partitionable threefry: the values do not depend on the mesh. The random bits are identical;
  # the bits -> normal transform (erfinv) may round differently by 1 ulp when XLA vectorises a
  # [1000, 4] slice and a [125, 32] slice differently, so equality is up to float32 rounding
  # (a different random stream would differ by O(0.02) everywhere).
  _, unsharded, _ = meshlib.create_sharded(lambda: _BigTable(nnx.Rngs(0)), mesh_of(8, 1))
  np.testing.assert_allclose(params["table"], unsharded["table"], rtol=1e-6, atol=1e-8)


def _loss(graphdef, params, rest, batch):
  out = nnx.merge(graphdef, params, rest)(batch)
  logits = out["logit_scale"] * out["image_emb"] @ out["text_emb"].T
  return -jnp.mean(jnp.diagonal(jax.nn.log_softmax(logits, axis=1)))


def test_sharded_step_matches_unsharded(sharded):
  mesh, graphdef, params, rest = sharded
  rng = np.random.RandomState(0)
  ids = rng.randint(3, 64, size=(8, 8)).astype(np.int32)
  ids[:, 5], ids[:, 6:] = EOS, 0
  batch = {"image": rng.normal(size=(8, 16, 16, 3)).astype(np.float32), "text": ids}

  # A train-step shaped function: merge inside jit, grads w.r.t. the sharded params.
  loss_fn = lambda p, r, b: _loss(graphdef, p, r, b)
  param_shardings = meshlib.state_shardings(params)
  step = jax.jit(jax.value_and_grad(loss_fn),
                 in_shardings=(param_shardings, {}, meshlib.batch_sharding(mesh)),
                 out_shardings=(meshlib.replicated(mesh), param_shardings))
  with jax.set_mesh(mesh):
    loss, grads = step(params, rest, batch)
  # The same loss on one device from host copies of the parameters. (Gradient values are
  # checked against an unsharded reference in test_models; compiling both here costs ~10 s.)
  ref_loss = jax.jit(loss_fn)(jax.device_get(params), {}, batch)

  np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
  assert jax.tree.structure(grads) == jax.tree.structure(params)
  assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))
  assert grads["text"]["token_embedding"].sharding.spec == P("tensor", "fsdp")
  assert float(jnp.abs(grads["image"]["projection"]).max()) > 0
  assert float(jnp.abs(grads["logit_scale"])) > 0
