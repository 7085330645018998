"""DeCLIP's nearest-neighbour supervision (NNS): a FIFO queue of text embeddings, its top-1 cosine
lookup, and the image -> neighbour InfoNCE.

The queue is an array in the train state ([size, D] float32, L2-normalised rows, plus an int32
write pointer), sharded over the mesh by rows; these functions are pure, so the train step queries
it *before* enqueueing the current batch (a caption is never its own neighbour in that step), as
DeCLIP's `NNMemoryBankModule` does.

One queue serves the whole global batch. DeCLIP keeps a separate 65,536-entry bank per GPU holding
only that GPU's texts; a global queue makes the neighbours independent of the device count.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from xclip_jax.objectives import clip


def init_queue(rng: jax.Array, size: int, dim: int) -> dict[str, jax.Array]:
  """Random unit-norm rows (DeCLIP initialises its bank the same way) and pointer 0."""
  rows = jax.random.normal(rng, (size, dim), jnp.float32)
  rows = rows / jnp.linalg.norm(rows, axis=-1, keepdims=True)
  return {"queue": rows, "ptr": jnp.zeros((), jnp.int32)}


def nearest_neighbours(queue: jax.Array, queries: jax.Array) -> jax.Array:
  """For each query row, the queue row with the highest cosine similarity (no gradient)."""
  queries = jax.lax.stop_gradient(queries.astype(jnp.float32))
  queries = queries / jnp.maximum(jnp.linalg.norm(queries, axis=-1, keepdims=True), 1e-12)
  index = jnp.argmax(queries @ queue.T, axis=-1)
  return jnp.take(queue, index, axis=0)


def enqueue(state: dict[str, jax.Array], items: jax.Array) -> dict[str, jax.Array]:
  """Writes `items` (L2-normalised, no gradient) at the pointer, wrapping around; FIFO."""
  queue, ptr = jnp.asarray(state["queue"]), jnp.asarray(state["ptr"])
  items = jax.lax.stop_gradient(items.astype(queue.dtype))
  index = (ptr + jnp.arange(items.shape[0])) % queue.shape[0]
  return {"queue": queue.at[index].set(items), "ptr": (ptr + items.shape[0]) % queue.shape[0]}


def image_to_text_nce(image_emb: jax.Array, text_emb: jax.Array, scale: jax.Array) -> jax.Array:
  """The image -> text half of InfoNCE (positives on the diagonal), as NNS uses it."""
  logits = clip.contrastive_logits(image_emb, text_emb, scale)
  return -jnp.mean(jnp.diagonal(jax.nn.log_softmax(logits, axis=1)))


def nns_loss(image_views: tuple[jax.Array, ...], neighbours: tuple[jax.Array, ...],
             scale: jax.Array, image_to_text: Callable[..., jax.Array] = image_to_text_nce
             ) -> jax.Array:
  """Mean over image views and neighbour sets of image -> neighbour-text InfoNCE.

  DeCLIP: for each image view x, ½[CE(x, NN(t)) + CE(x, NN(t_aug))], then averaged over views.
  `image_to_text` is that InfoNCE half (the chunked shard_map form under contrastive.impl=chunked).
  """
  terms = [image_to_text(x, nn, scale) for x in image_views for nn in neighbours]
  return sum(terms) / len(terms)
