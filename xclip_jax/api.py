"""A trained model for notebooks and scripts: `xclip_jax.load(workdir)`.

    model = xclip_jax.load("workdirs/clip_demo")          # latest checkpoint
    img = model.encode_image([pil_image, "cat.jpg", uint8_array])  # L2-normalised [N, D]
    txt = model.encode_text(["a red circle.", "a blue square."])
    probs = model.similarity(img, txt, softmax=True)
    classifier = model.zeroshot_classifier(["red circle", "blue square"], templates="demo")

Features and scores follow the method's scoring spaces (`model.scoring_spaces`, see
evaluate/spaces.py): "clip" for the CLIP family, "prototypes" for nCLIP (whose CLIP head is never
trained), both for xCLIP; every method below defaults to the first and takes `space=` to pick.

The config is the checkpoint's (merged onto today's schema), the tokenizer is the one the run
trained with (`model.tokenizer`), and images go through the evaluation preprocessing
(`model.preprocess`: config.evals.transform, e.g. OpenAI's for imported models). The model is
restored onto a mesh of this process's devices (all on the data axis by default) without reading
the optimizer state. Single-process use; multi-host evaluation is `python -m xclip_jax.evaluate`.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import os
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from xclip_jax import checkpoint
from xclip_jax import methods
from xclip_jax.evaluate import spaces as spaces_lib
from xclip_jax.parallel import mesh as mesh_lib


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _encode(graphdef: Any, which: str, space: str, params: Any, model_state: Any,
            x: jax.Array) -> jax.Array:
  model = nnx.merge(graphdef, params, model_state)
  return model.encode_image(x, space) if which == "image" else model.encode_text(x, space)


@dataclasses.dataclass(frozen=True)
class ParamRow:
  path: str
  shape: tuple[int, ...]
  dtype: str
  count: int
  sharding: str          # the PartitionSpec over the mesh axes, e.g. "P('fsdp', None)"


class LoadedModel:
  """A restored checkpoint with its tokenizer and preprocessing. Build it with `load`."""

  def __init__(self, config: ml_collections.ConfigDict, step: int, mesh: jax.sharding.Mesh,
               graphdef: Any, params: dict, model_state: dict, tokenizer: Any):
    self.config = config
    self.step = step
    self.mesh = mesh
    self.graphdef = graphdef
    self.params = params
    self.model_state = model_state
    self.tokenizer = tokenizer
    self.image_size = int(config.model.image.image_size)
    self.context_length = int(config.model.text.context_length)
    method = methods.get_method(config.method)
    # Spaces zero-shot and retrieval score in (the first is the default) and the probe's features.
    self.scoring_spaces: tuple[str, ...] = tuple(method.scoring_spaces)
    self.probe_space: str = method.probe_space

  # ---- inspection ---------------------------------------------------------------------------------

  @property
  def module(self) -> nnx.Module:
    """The nnx module with the restored weights (for calling heads or towers directly)."""
    return nnx.merge(self.graphdef, self.params, self.model_state)

  @property
  def logit_scale(self) -> float:
    """The multiplier of the cosines as the model's forward pass applies it (`module.scale()`:
    exp of the parameter, capped at config.model.logit_scale_max)."""
    return float(jax.device_get(self.module.scale()))

  def param_table(self) -> list[ParamRow]:
    """Every parameter: '/'-joined path, shape, dtype, element count and sharding spec."""
    rows = []
    for path, leaf in jax.tree_util.tree_flatten_with_path(self.params)[0]:
      name = "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)
      spec = getattr(leaf.sharding, "spec", None)
      rows.append(ParamRow(name, tuple(leaf.shape), str(leaf.dtype), int(np.prod(leaf.shape)),
                           str(spec) if spec is not None else str(leaf.sharding)))
    return rows

  def num_params(self) -> int:
    return sum(r.count for r in self.param_table())

  # ---- preprocessing ------------------------------------------------------------------------------

  def preprocess(self, images: Any) -> np.ndarray:
    """Evaluation preprocessing of a list of images -> float32 [N, S, S, 3].

    Each image may be a PIL image, a uint8 array [H, W, 3] (or [H, W] grey), encoded bytes or a
    file path. A uint8 array [N, H, W, 3] is a batch. The transform is the evaluators' own,
    `config.evals.transform` (`openai`: bicubic resize to S + centre crop, bit-exact with
    OpenAI's / open_clip's preprocessing; `resize_256_crop_224`).
    """
    import tensorflow as tf  # noqa: PLC0415  (TensorFlow only where images are preprocessed)

    from xclip_jax.data import eval_datasets, eval_image  # noqa: PLC0415
    if isinstance(images, np.ndarray) and images.ndim == 4:
      images = list(images)
    elif not isinstance(images, (list, tuple)):
      images = [images]
    data = self.config.data
    transform = eval_datasets.eval_transform_name(self.config)
    out = []
    for item in images:
      pixels = tf.constant(_as_uint8_rgb(item))
      crop = eval_image.crop_pixels(pixels, size=self.image_size, transform=transform)
      out.append(eval_image.normalize(crop, data.mean, data.std).numpy())
    return np.stack(out).astype(np.float32)

  def tokenize(self, texts: Sequence[str]) -> np.ndarray:
    """int32 [N, context_length] ids, exactly as training and zero-shot evaluation encode them."""
    if isinstance(texts, str):
      texts = [texts]
    return self.tokenizer.encode(list(texts), self.context_length)

  # ---- embeddings ---------------------------------------------------------------------------------

  def _space(self, space: str | None) -> str:
    space = self.scoring_spaces[0] if space is None else space
    spaces_lib.check_spaces((space,))
    return space

  def encode_image(self, images: Any, batch_size: int = 256, space: str | None = None
                   ) -> np.ndarray:
    """float32 [N, D] image features of `space` (default: the method's first scoring space;
    "clip": L2-normalised embeddings, "prototypes": log p_v; "pooled" also works).

    `images`: anything `preprocess` takes, or an already preprocessed float array [N, S, S, 3].
    """
    if not (isinstance(images, np.ndarray) and images.dtype != np.uint8 and images.ndim == 4):
      images = self.preprocess(images)
    if images.shape[1:] != (self.image_size, self.image_size, 3):
      raise ValueError(f"Preprocessed images must be [N, {self.image_size}, {self.image_size}, 3]"
                       f", got {images.shape}.")
    space = space if space == "pooled" else self._space(space)
    return self._embed("image", space, images.astype(np.float32), batch_size)

  def encode_text(self, texts: Sequence[str] | np.ndarray, batch_size: int = 256,
                  space: str | None = None) -> np.ndarray:
    """float32 [N, D] text features of `space` (default: the method's first scoring space;
    "clip": L2-normalised embeddings, "prototypes": q_t) of strings or int token ids [N, L]."""
    ids = texts if isinstance(texts, np.ndarray) and texts.dtype.kind == "i" else self.tokenize(texts)
    space = space if space == "pooled" else self._space(space)
    return self._embed("text", space, ids.astype(np.int32), batch_size)

  def similarity(self, image_emb: np.ndarray, text_emb: np.ndarray, *,
                 softmax: bool = False, space: str | None = None) -> np.ndarray:
    """[N_img, N_txt] scores as the evaluators rank them: in the "clip" space the scaled cosine
    logits of training, in "prototypes" Σ_k q_t(k) log p_v(k); softmax=True: over texts per
    image. `space` must be the one the features were encoded in (default: the first)."""
    space = self._space(space)
    scale = self.logit_scale if space in spaces_lib.SCALED_BY_LOGIT_SCALE else 1.0
    logits = scale * np.asarray(image_emb, np.float32) @ np.asarray(text_emb, np.float32).T
    if not softmax:
      return logits
    logits = logits - logits.max(axis=1, keepdims=True)
    probs = np.exp(logits)
    return probs / probs.sum(axis=1, keepdims=True)

  def zeroshot_classifier(self, class_names: Sequence[str],
                          templates: str | Sequence[str] = "clip80",
                          space: str | None = None) -> np.ndarray:
    """[C, D] class features, as the zero-shot evaluator builds them: in the "clip" space each
    class's prompt embeddings averaged and renormalised, in "prototypes" the mean of its prompts'
    q_t. `templates` is a set name (demo, short, clip80) or a list."""
    from xclip_jax.evaluate import benchmarks  # noqa: PLC0415
    space = self._space(space)
    if isinstance(templates, str):
      templates = benchmarks.get_templates(templates)
    prompts = [t.format(name) for name in class_names for t in templates]
    return np.asarray(spaces_lib.class_features(
        space, jnp.asarray(self.encode_text(prompts, space=space)), len(class_names)))

  def _embed(self, which: str, space: str, rows: np.ndarray, batch_size: int) -> np.ndarray:
    """Runs one tower over `rows` in mesh-divisible, zero-padded batches; padding dropped."""
    shards = int(np.prod([self.mesh.shape[a] for a in mesh_lib.BATCH_AXES]))
    batch_size = max(shards, -(-batch_size // shards) * shards)
    sharding = mesh_lib.batch_sharding(self.mesh)
    encode = functools.partial(_encode, self.graphdef, which, space, self.params,
                               self.model_state)
    out = []
    with jax.set_mesh(self.mesh):
      for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        n = len(chunk)
        padded = np.concatenate([chunk, np.zeros((-n % shards,) + chunk.shape[1:], chunk.dtype)])
        out.append(np.asarray(encode(jax.device_put(padded, sharding)))[:n])
      if not out:
        dim = jax.eval_shape(encode, jax.ShapeDtypeStruct((shards,) + rows.shape[1:],
                                                          rows.dtype)).shape[-1]
        return np.zeros((0, dim), np.float32)
    return np.concatenate(out)


def _as_uint8_rgb(item: Any) -> np.ndarray:
  """PIL image / uint8 array / encoded bytes / path -> uint8 [H, W, 3]."""
  from PIL import Image  # noqa: PLC0415
  if isinstance(item, (str, os.PathLike)):
    with open(item, "rb") as f:
      item = f.read()
  if isinstance(item, (bytes, bytearray)):
    item = Image.open(io.BytesIO(item))
  if isinstance(item, Image.Image):
    item = np.asarray(item.convert("RGB"))
  array = np.asarray(item)
  if array.ndim == 2:
    array = np.repeat(array[..., None], 3, axis=-1)
  if array.ndim != 3 or array.shape[-1] not in (3, 4):
    raise ValueError(f"An image must be [H, W, 3] (or grey [H, W]); got shape {array.shape}.")
  if array.dtype != np.uint8:
    raise ValueError(f"Image arrays must be uint8 0..255; got {array.dtype}. Preprocessed float "
                     "batches go to encode_image as one [N, S, S, 3] array.")
  return array[..., :3]


def load(workdir: str, step: int | None = None, *, mesh: jax.sharding.Mesh | None = None,
         config_overrides: dict[str, Any] | None = None, ema: bool = False) -> LoadedModel:
  """Restores a workdir's checkpoint (the latest, or `step`) with its tokenizer.

  `mesh` defaults to every local device on the data axis; `config_overrides` ({"data.data_dir":
  ...}) adjusts the saved config first, e.g. when the dataset (and so the tokenizer) moved.
  ema=True loads the moving average of the parameters instead of the parameters (runs trained
  with config.ema_decay > 0; ValueError otherwise).
  """
  from xclip_jax.data import tokenizer as tokenizer_lib  # noqa: PLC0415

  config = checkpoint.saved_config(workdir, step)
  for key, value in (config_overrides or {}).items():
    node = config
    *parents, leaf = key.split(".")
    for part in parents:
      node = node[part]
    node[leaf] = value
  if mesh is None:
    mesh = mesh_lib.make_mesh(dict(data=-1, fsdp=1, tensor=1), devices=jax.local_devices())
  tokenizer = tokenizer_lib.resolve_tokenizer(config, process_index=0)
  model_fn = lambda: methods.build_model(config, eos_id=tokenizer.spec.eos_id, seed=config.seed)
  graphdef, abstract_params, abstract_rest = mesh_lib.abstract_model(model_fn, mesh)
  step, restored = checkpoint.restore_model(
      workdir, step, {"params": abstract_params, "model_state": abstract_rest}, ema=ema)
  return LoadedModel(config, step, mesh, graphdef, restored["params"], restored["model_state"],
                     tokenizer)

