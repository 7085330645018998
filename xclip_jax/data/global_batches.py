"""Host batches (numpy dicts, e.g. from train_pipeline.make_train_dataset) -> global jax.Arrays,
placed on this process's devices by a background thread a few batches ahead of the train step."""

from __future__ import annotations

import queue
import threading
from typing import Iterable

import jax

# A host batch may carry per-batch data counters under this key (train_pipeline.py fills it): they
# stay on the host and are summed by GlobalBatchIterator.data_counters().
STATS_KEY = "data_stats"


class _Raised:
  def __init__(self, error: BaseException):
    self.error = error


_END = object()


class GlobalBatchIterator:
  """Iterates host batches (numpy dicts) as global jax.Arrays, `prefetch` batches ahead.

  A background thread pulls the next host batch and places it on this process's devices with
  `jax.make_array_from_process_local_data`, so the train step does not wait for input as long as
  the host keeps up. `sharding` is one Sharding for every leaf (e.g. NamedSharding(mesh,
  P(("data", "fsdp")))) or a pytree of them matching the batch. Exceptions raised while producing
  re-raise in the consumer; `close()` (or `with`) stops the thread.

  A host batch's STATS_KEY entry (data counters) stays on the host: `data_counters()` sums it
  over the batches consumed so far.
  """

  def __init__(self, dataset: Iterable[dict], sharding, prefetch: int = 2):
    # A tf.data.Dataset yields numpy through as_numpy_iterator; any other iterable as it is.
    self._source = (dataset.as_numpy_iterator() if hasattr(dataset, "as_numpy_iterator")
                    else iter(dataset))
    self._sharding = sharding
    self._queue: queue.Queue = queue.Queue(maxsize=max(1, prefetch))
    self._stop = threading.Event()
    self._done = False
    self._counters: dict[str, int] = {}
    self._thread = threading.Thread(target=self._produce, name="GlobalBatchIterator", daemon=True)
    self._thread.start()

  def _to_global(self, host_batch):
    put = jax.make_array_from_process_local_data
    if isinstance(self._sharding, jax.sharding.Sharding):
      return jax.tree.map(lambda x: put(self._sharding, x), host_batch)
    return jax.tree.map(lambda s, x: put(s, x), self._sharding, host_batch)

  def _put(self, item) -> bool:
    while not self._stop.is_set():
      try:
        self._queue.put(item, timeout=0.1)
        return True
      except queue.Full:
        continue
    return False

  def _produce(self) -> None:
    try:
      for host_batch in self._source:
        stats = host_batch.pop(STATS_KEY, None) if isinstance(host_batch, dict) else None
        if self._stop.is_set() or not self._put((self._to_global(host_batch), stats)):
          return
      self._put(_END)
    except BaseException as e:  # noqa: BLE001  (handed to the consumer thread)
      self._put(_Raised(e))

  def __iter__(self):
    return self

  def __next__(self):
    if self._done:
      raise StopIteration
    item = self._queue.get()
    if item is _END or isinstance(item, _Raised):
      self._done = True
      if isinstance(item, _Raised):
        raise item.error
      raise StopIteration
    batch, stats = item
    for k, v in (stats or {}).items():
      self._counters[k] = self._counters.get(k, 0) + int(v)
    return batch

  def data_counters(self) -> dict[str, int]:
    """Sums of the data counters (STATS_KEY) of the batches returned so far."""
    return dict(self._counters)

  def close(self, timeout: float = 10.0) -> None:
    """Stops the producer thread and drops batches still in flight."""
    self._stop.set()
    self._done = True
    while True:   # free the queue so a producer blocked in put() notices the stop
      try:
        self._queue.get_nowait()
      except queue.Empty:
        break
    self._thread.join(timeout)

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()
