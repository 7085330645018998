"""Reads PyTorch checkpoints into numpy arrays without PyTorch and without running pickled code.

Three formats, told apart by their content, not their file name:
  safetensors       read through the `safetensors` package's numpy API.
  torch.save zip    (PyTorch >= 1.6; `.pt`, `.pth`, `.bin`): a zip holding `<name>/data.pkl` and one
                    raw storage per tensor in `<name>/data/<key>`.
  TorchScript zip   (`torch.jit.save`, e.g. OpenAI's released ViT-B-32.pt): the same storages, and
                    a data.pkl of the module tree whose classes are TorchScript's `__torch__.*`.

A pickle may name any importable callable and call it while loading, so a pickle from the internet
is a program. `RestrictedUnpickler` resolves only the few names a tensor file needs (torch's tensor
rebuild functions, storage types and dtypes, OrderedDict) to local stand-ins written here; every
other name is refused with `UnsafePickleError` before anything is called. TorchScript's module
classes become inert attribute holders (`ScriptObject`); the archive's code/ is never read.
"""

from __future__ import annotations

import collections
import io
import pickle
import zipfile
from typing import Any

import ml_dtypes  # noqa: F401  (registers numpy's 'bfloat16' dtype name, used by safetensors too)
import numpy as np

SAFETENSORS, TORCH_ZIP, TORCHSCRIPT = "safetensors", "torch_zip", "torchscript"

# torch.<Name>Storage -> element dtype (the legacy typed storages torch.save still names).
STORAGE_DTYPES = {
    "FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
    "BFloat16Storage": ml_dtypes.bfloat16, "LongStorage": np.int64, "IntStorage": np.int32,
    "ShortStorage": np.int16, "CharStorage": np.int8, "ByteStorage": np.uint8,
    "BoolStorage": np.bool_, "UntypedStorage": np.uint8,
}
# torch.<dtype> names (pickled by _rebuild_tensor_v3) -> numpy dtypes.
TORCH_DTYPES = {
    "float32": np.float32, "float": np.float32, "float64": np.float64, "double": np.float64,
    "float16": np.float16, "half": np.float16, "bfloat16": ml_dtypes.bfloat16,
    "int64": np.int64, "long": np.int64, "int32": np.int32, "int": np.int32, "int16": np.int16,
    "int8": np.int8, "uint8": np.uint8, "bool": np.bool_,
}


class UnsafePickleError(pickle.UnpicklingError):
  """The pickle names something other than the tensor-rebuilding globals this reader allows."""


# ---- stand-ins for what the pickle may name ------------------------------------------------------

class StorageType:
  """Stands for torch.<X>Storage in a persistent id: only its element dtype matters here."""

  def __init__(self, name: str):
    self.name, self.dtype = name, np.dtype(STORAGE_DTYPES[name])


class TorchDtype:
  def __init__(self, name: str):
    self.name, self.dtype = name, np.dtype(TORCH_DTYPES[name])


class ScriptObject:
  """A TorchScript module or object (`__torch__.<class>`): holds the attributes BUILD gives it."""

  qualified_name = "__torch__"

  def __setstate__(self, state: Any) -> None:
    self.__dict__["state"] = state


def _rebuild_tensor(storage: np.ndarray, offset: int, size, stride) -> np.ndarray:
  """A contiguous copy of the view torch describes as (storage, offset, size, stride) elements."""
  size, stride = tuple(int(s) for s in size), tuple(int(s) for s in stride)
  if len(size) != len(stride) or offset < 0 or any(s < 0 for s in size + stride):
    raise pickle.UnpicklingError(f"Invalid tensor layout: offset {offset}, size {size}, "
                                 f"stride {stride}.")
  if 0 in size:
    return np.zeros(size, storage.dtype)
  if not size:                       # a 0-d tensor (as_strided would read shape=() as "unset")
    if offset >= storage.size:
      raise pickle.UnpicklingError(f"Scalar tensor at offset {offset} is past its storage.")
    return np.array(storage[offset])
  # Bounds check before as_strided, which would otherwise read past the storage's memory.
  last = offset + sum((n - 1) * s for n, s in zip(size, stride))
  if last >= storage.size:
    raise pickle.UnpicklingError(f"Tensor of size {size}, stride {stride}, offset {offset} reads "
                                 f"past its storage of {storage.size} elements.")
  view = np.lib.stride_tricks.as_strided(storage[offset:], shape=size,
                                         strides=[s * storage.itemsize for s in stride])
  return np.ascontiguousarray(view)


def _rebuild_tensor_v2(storage, offset, size, stride, requires_grad=False, backward_hooks=None,
                       metadata=None):
  del requires_grad, backward_hooks, metadata   # autograd facts; conj/neg bits never set on reals
  return _rebuild_tensor(storage, offset, size, stride)


def _rebuild_tensor_v3(storage, offset, size, stride, requires_grad, backward_hooks, dtype,
                       metadata=None):
  del requires_grad, backward_hooks, metadata
  return _rebuild_tensor(storage.view(dtype.dtype), offset, size, stride)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, state=None):
  del requires_grad, backward_hooks, state
  return data


def _identity(value, *unused):
  return value


ALLOWED_GLOBALS = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_tensor_v3"): _rebuild_tensor_v3,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    # TorchScript's pickler tags typed containers; the values are plain lists/dicts already.
    ("torch.jit._pickle", "restore_type_tag"): _identity,
    ("torch.jit._pickle", "build_intlist"): _identity,
    ("torch.jit._pickle", "build_doublelist"): _identity,
    ("torch.jit._pickle", "build_boollist"): _identity,
    ("torch.jit._pickle", "build_tensorlist"): _identity,
}


class RestrictedUnpickler(pickle.Unpickler):
  """Unpickles a torch data.pkl, mapping storages to numpy arrays read from the zip archive."""

  def __init__(self, data: bytes, load_storage, *, torchscript: bool):
    super().__init__(io.BytesIO(data))
    self._load_storage = load_storage
    self._torchscript = torchscript
    self._script_classes: dict[str, type] = {}

  def find_class(self, module: str, name: str) -> Any:
    if (module, name) in ALLOWED_GLOBALS:
      return ALLOWED_GLOBALS[(module, name)]
    if module == "torch" and name in STORAGE_DTYPES:
      return StorageType(name)
    if module == "torch" and name in TORCH_DTYPES:
      return TorchDtype(name)
    if self._torchscript and (module == "__torch__" or module.startswith("__torch__.")):
      qualified = f"{module}.{name}"
      if qualified not in self._script_classes:   # an inert class per TorchScript type
        self._script_classes[qualified] = type(name, (ScriptObject,),
                                               {"qualified_name": qualified})
      return self._script_classes[qualified]
    raise UnsafePickleError(
        f"Refusing to load the global {module}.{name}: this checkpoint reader only rebuilds "
        "tensors (torch rebuild functions, storage types, OrderedDict), and loading anything else "
        "would run code from the file. Re-save the weights alone, e.g. as safetensors "
        "(safetensors.torch.save_file(model.state_dict(), 'model.safetensors')).")

  def persistent_load(self, pid: Any) -> np.ndarray:
    if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"
            and isinstance(pid[1], StorageType)):
      raise UnsafePickleError(f"Unexpected persistent id {pid!r} (expected a torch storage).")
    _, storage_type, key, _location, numel = pid
    return self._load_storage(str(key), storage_type.dtype, int(numel))


# ---- archives ------------------------------------------------------------------------------------

def detect_format(path: str) -> str:
  """SAFETENSORS, TORCH_ZIP or TORCHSCRIPT from the file's content."""
  if zipfile.is_zipfile(path):
    with zipfile.ZipFile(path) as archive:
      names = archive.namelist()
    if any(n.endswith("/constants.pkl") or "/code/" in n for n in names):
      return TORCHSCRIPT
    if any(n.endswith("data.pkl") for n in names):
      return TORCH_ZIP
    raise ValueError(f"{path} is a zip file but not a PyTorch checkpoint (no data.pkl).")
  with open(path, "rb") as f:
    head = f.read(9)
  if len(head) == 9 and head[8:9] == b"{":      # u64 little-endian header size, then JSON
    return SAFETENSORS
  if head[:1] == b"\x80":
    raise ValueError(
        f"{path} looks like a legacy (pre-1.6, non-zip) torch.save file, which this reader does "
        "not parse. Re-save it with a current PyTorch (torch.save uses the zip format) or as "
        "safetensors.")
  raise ValueError(f"{path} is neither safetensors nor a PyTorch zip checkpoint.")


def read_zip_pickle(path: str, *, torchscript: bool) -> Any:
  """The object of a torch.save / torch.jit.save zip archive's data.pkl, tensors as numpy."""
  with zipfile.ZipFile(path) as archive:
    names = archive.namelist()
    pickles = [n for n in names if n.endswith("data.pkl") and n.count("/") <= 1]
    if len(pickles) != 1:
      raise ValueError(f"{path}: expected one top-level data.pkl, found {pickles or 'none'}.")
    prefix = pickles[0][:-len("data.pkl")]
    byteorder = "little"
    if f"{prefix}byteorder" in names:
      byteorder = archive.read(f"{prefix}byteorder").decode().strip()
    storages: dict[str, np.ndarray] = {}

    def load_storage(key: str, dtype: np.dtype, numel: int) -> np.ndarray:
      if key not in storages:
        raw = archive.read(f"{prefix}data/{key}")
        dt = dtype.newbyteorder("<" if byteorder == "little" else ">")
        array = np.frombuffer(raw, dtype=dt)
        storages[key] = array.astype(dtype) if dt != dtype else array
      storage = storages[key]
      if storage.size < numel:
        raise pickle.UnpicklingError(f"Storage {key} holds {storage.size} elements; the pickle "
                                     f"says {numel}.")
      return storage

    return RestrictedUnpickler(archive.read(pickles[0]), load_storage,
                               torchscript=torchscript).load()


def flatten_tensors(obj: Any, prefix: str = "") -> dict[str, np.ndarray]:
  """{dotted name: array} of every array in nested dicts and TorchScript objects."""
  if isinstance(obj, ScriptObject):
    obj = obj.__dict__.get("state", {})
  out: dict[str, np.ndarray] = {}
  if isinstance(obj, np.ndarray):
    out[prefix.rstrip(".")] = obj
  elif isinstance(obj, dict):
    for key, value in obj.items():
      if isinstance(key, str):
        out.update(flatten_tensors(value, f"{prefix}{key}."))
  return out


def unwrap_state_dict(obj: Any) -> dict[str, np.ndarray]:
  """The weights of a loaded checkpoint: open_clip's {"state_dict": ...} training checkpoints and
  DataParallel's `module.` key prefixes are unwrapped; other entries (optimizer, epoch) dropped."""
  if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
    obj = obj["state_dict"]
  tensors = {k: v for k, v in obj.items() if isinstance(v, np.ndarray)}
  if tensors and all(k.startswith("module.") for k in tensors):
    tensors = {k[len("module."):]: v for k, v in tensors.items()}
  return tensors


def read_checkpoint(path: str) -> dict[str, np.ndarray]:
  """{name: numpy array} of a safetensors file, torch.save state dict or TorchScript archive."""
  fmt = detect_format(path)
  if fmt == SAFETENSORS:
    from safetensors.numpy import load_file
    return dict(load_file(path))
  if fmt == TORCHSCRIPT:
    return flatten_tensors(read_zip_pickle(path, torchscript=True))
  obj = read_zip_pickle(path, torchscript=False)
  if not isinstance(obj, dict):
    raise ValueError(f"{path} holds a {type(obj).__name__}, not a state dict.")
  return unwrap_state_dict(obj)
