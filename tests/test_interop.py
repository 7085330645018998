"""OpenAI-CLIP / open_clip checkpoint interop: reading torch files safely, the key layout, the BPE
tokenizer, and parity with an independent PyTorch model (tests/torch_clip_ref.py) run under
.venv-torch (created by `bash launch/venv.sh test` where a CPU torch wheel is available)."""

import functools
import glob
import json
import os
import pickle
import struct
import subprocess
import sys
import zipfile

import jax
import ml_dtypes
import numpy as np
import pytest
from flax import nnx

import configs.finetune as finetune_config
from xclip_jax import checkpoint, finetune, methods, train
from xclip_jax.data import clip_bpe
from xclip_jax.data import text_spec
from xclip_jax.data import tokenizer as tokenizer_lib
from xclip_jax.interop import convert, openai_layout, torch_files

from tests.tiny import subprocess_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TORCH_PYTHON = os.path.join(ROOT, ".venv-torch", "bin", "python")
HAS_TORCH = bool(glob.glob(os.path.join(ROOT, ".venv-torch/lib/python3*/site-packages/torch")))
NO_TORCH = (".venv-torch with torch is missing: `bash launch/venv.sh test` creates it where "
            "a CPU torch wheel is available (launch/torch_env.sh says why not)")
needs_torch = pytest.mark.skipif(not HAS_TORCH, reason=NO_TORCH)

# A tiny merges file in bpe_simple_vocab_16e6.txt's format: header line, then one pair per line.
MERGES = ["c a", "ca t</w>", "r e", "re d</w>", "o n</w>", "t h", "th e</w>"]
# Ids: 256 bytes (printable Latin-1 in order from '!': 'a' = 97 - 33 = 64), the same + '</w>'
# (+256), then the merges from 512: ca 512, cat</w> 513, re 514, red</w> 515, on</w> 516, th 517,
# the</w> 518; then <start_of_text> 519, <end_of_text> 520.
SOT, EOT, VOCAB = 519, 520, 521

SPEC = dict(seed=0, embed_dim=32, image_size=32, patch_size=8, vision_width=64, vision_layers=2,
            vision_heads=4,            # not OpenAI's width // 64: the import is told explicitly
            context_length=16, vocab_size=VOCAB, text_width=128, text_layers=2,
            text_heads=2)              # = 128 // 64, inferred
TEXTS = ["the red cat", "a cat!", "on the red, redo", "é &amp; the cat on the red"]


@pytest.fixture(scope="module")
def merges_path(tmp_path_factory):
  path = tmp_path_factory.mktemp("bpe") / "tiny_merges.txt"
  path.write_text("#version: 0.2\n" + "\n".join(MERGES) + "\n")
  return str(path)


# ---- tokenizer -----------------------------------------------------------------------------------

def test_clip_bpe_matches_hand_computed_ids(merges_path):
  tok = clip_bpe.ClipBpeTokenizer(merges_path)
  assert (tok.vocab_size, tok.sot_id, tok.eos_id, tok.pad_id) == (VOCAB, SOT, EOT, 0)
  ids = tok.encode(["The  RED cat", "a cat!", "redo", "é", "&amp;", "on"], 8)
  assert ids.dtype == np.int32 and ids.shape == (6, 8)
  np.testing.assert_array_equal(ids, [
      [SOT, 518, 515, 513, EOT, 0, 0, 0],     # the</w> red</w> cat</w>
      [SOT, 64 + 256, 513, 256, EOT, 0, 0, 0],  # a</w> cat</w> !</w>
      [SOT, 514, 67, 78 + 256, EOT, 0, 0, 0],   # re d o</w>: (re, d) is not a merge
      # é = bytes c3 a9 -> chars 'Ã' (106 + 195 - 174 = 127) and '©' (94 + 169 - 161 = 102)
      [SOT, 127, 102 + 256, EOT, 0, 0, 0, 0],
      [SOT, 5 + 256, EOT, 0, 0, 0, 0, 0],       # HTML-unescaped to '&' (38 - 33 = 5)
      [SOT, 516, EOT, 0, 0, 0, 0, 0]])
  # Too long: cut so that <end_of_text> stays last; the count of cut texts is reported.
  cut, truncated = tok.encode(["the red cat", "on"], 4, return_truncated=True)
  np.testing.assert_array_equal(cut, [[SOT, 518, 515, EOT], [SOT, 516, EOT, 0]])
  assert truncated == 1
  assert tok.decode(ids) == ["the red cat", "a cat !", "redo", "é", "&", "on"]
  # Every text the tower sees pools at <end_of_text>, OpenAI's argmax(ids).
  assert (ids.argmax(-1) == (ids == EOT).argmax(-1)).all()


def test_resolve_tokenizer_selects_clip_bpe(merges_path):
  from xclip_jax import config as config_lib
  c = config_lib.base_config()
  c.tokenizer.kind, c.tokenizer.path = "clip_bpe", merges_path
  tok = tokenizer_lib.resolve_tokenizer(c)
  assert isinstance(tok, clip_bpe.ClipBpeTokenizer)
  assert tok.spec == text_spec.TextSpec(vocab_size=SOT, pad_id=0, eos_id=EOT, mask_id=SOT,
                                        first_regular_id=1)
  c.tokenizer.path = merges_path + ".missing"
  with pytest.raises(FileNotFoundError, match="open_clip_torch wheel"):
    tokenizer_lib.resolve_tokenizer(c)


# ---- torch files without torch -------------------------------------------------------------------

def _unicode(text: str) -> bytes:
  data = text.encode()
  return b"X" + struct.pack("<I", len(data)) + data


def _tensor_pickle(offset: int, size: tuple[int, ...], stride: tuple[int, ...],
                   storage_type: str = "FloatStorage") -> bytes:
  """A hand-made torch.save data.pkl: {"w": _rebuild_tensor_v2(storage 0 (4 elements), ...)}."""
  def tup(values):
    return b"(" + b"".join(b"K" + bytes([v]) for v in values) + b"t"
  storage = (b"(" + _unicode("storage") + f"ctorch\n{storage_type}\n".encode() + _unicode("0")
             + _unicode("cpu") + b"K\x04t" + b"Q")
  rebuild = (b"ctorch._utils\n_rebuild_tensor_v2\n(" + storage + b"K" + bytes([offset])
             + tup(size) + tup(stride) + b"\x89" + b"ccollections\nOrderedDict\n)R" + b"tR")
  return b"\x80\x02}" + _unicode("w") + rebuild + b"s."


def _write_zip(path, pickle_bytes: bytes, storage: bytes = b"") -> str:
  with zipfile.ZipFile(path, "w") as z:
    z.writestr("archive/data.pkl", pickle_bytes)
    z.writestr("archive/byteorder", "little")
    z.writestr("archive/data/0", storage)
  return str(path)


@pytest.mark.parametrize("storage_type,dtype", [("FloatStorage", np.float32),
                                                ("HalfStorage", np.float16),
                                                ("BFloat16Storage", ml_dtypes.bfloat16)])
def test_torch_zip_reader_rebuilds_strided_views_and_checks_bounds(tmp_path, storage_type, dtype):
  storage = np.arange(4).astype(dtype).tobytes()
  path = _write_zip(tmp_path / "t.pt", _tensor_pickle(0, (2, 2), (1, 2), storage_type), storage)
  assert torch_files.detect_format(path) == torch_files.TORCH_ZIP
  w = torch_files.read_checkpoint(path)["w"]
  assert w.dtype == dtype
  np.testing.assert_array_equal(w.astype(np.float32), [[0, 2], [1, 3]])
  # What OpenAI released is float16; the import casts to our float32 parameters exactly.
  assert np.array_equal(w.astype(np.float32).astype(dtype), w)
  oob = _tensor_pickle(1, (2, 2), (2, 1), storage_type)
  path = _write_zip(tmp_path / "oob.pt", oob, storage)
  with pytest.raises(pickle.UnpicklingError, match="past its storage"):
    torch_files.read_checkpoint(path)


def test_safetensors_bfloat16_and_format_detection(tmp_path):
  from safetensors.numpy import save_file
  path = str(tmp_path / "w.safetensors")
  save_file({"w": np.arange(3).astype(ml_dtypes.bfloat16)}, path)
  assert torch_files.detect_format(path) == torch_files.SAFETENSORS
  assert torch_files.read_checkpoint(path)["w"].dtype == ml_dtypes.bfloat16
  legacy = tmp_path / "legacy.pt"
  legacy.write_bytes(pickle.dumps({"w": 1}, protocol=2))   # pre-1.6 torch.save starts so
  with pytest.raises(ValueError, match="legacy"):
    torch_files.read_checkpoint(str(legacy))


class _Exploit:
  def __init__(self, target):
    self.target = target

  def __reduce__(self):
    return os.system, (f"touch {self.target}",)


def test_unsafe_pickles_are_refused_without_running(tmp_path):
  target = tmp_path / "pwned"
  payloads = {
      "reduce": pickle.dumps({"w": _Exploit(target)}, protocol=2),
      "global": b"\x80\x02cbuiltins\neval\n" + _unicode("1") + b"\x85R.",
      "persistent_id": b"\x80\x02" + _unicode("not a storage") + b"Q.",
  }
  for name, payload in payloads.items():
    path = _write_zip(tmp_path / f"{name}.pt", payload)
    with pytest.raises(torch_files.UnsafePickleError):
      torch_files.read_checkpoint(path)
  assert not target.exists()
  # TorchScript archives may name __torch__ classes (inert stand-ins), and nothing else.
  with zipfile.ZipFile(tmp_path / "script.pt", "w") as z:
    z.writestr("m/data.pkl", payloads["reduce"])
    z.writestr("m/constants.pkl", b"\x80\x02).")
  with pytest.raises(torch_files.UnsafePickleError, match="posix.system|os.system"):
    torch_files.read_checkpoint(str(tmp_path / "script.pt"))
  assert not target.exists()


# ---- parity with PyTorch -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def torch_reference(tmp_path_factory, merges_path):
  """Runs tests/torch_clip_ref.py once: the checkpoints it saved and its features."""
  if not HAS_TORCH:
    pytest.skip(NO_TORCH)
  out = tmp_path_factory.mktemp("torch")
  images = np.random.default_rng(0).normal(size=(4, 3, 32, 32)).astype(np.float32)
  texts = clip_bpe.ClipBpeTokenizer(merges_path).encode(TEXTS, SPEC["context_length"])
  np.save(out / "images.npy", images)
  np.save(out / "texts.npy", texts.astype(np.int64))
  spec = dict(SPEC, images=str(out / "images.npy"), texts=str(out / "texts.npy"))
  (out / "spec.json").write_text(json.dumps(spec))
  run = subprocess.run([TORCH_PYTHON, os.path.join(ROOT, "tests", "torch_clip_ref.py"),
                        str(out / "spec.json"), str(out)], capture_output=True, text=True,
                       timeout=300)
  assert run.returncode == 0, run.stderr[-3000:]
  return dict(dir=str(out), images=images, texts=texts, ref=dict(np.load(out / "reference.npz")))


@functools.partial(jax.jit, static_argnums=0)
def _encode(graphdef, params, images, texts):
  model = nnx.merge(graphdef, params)
  return model.encode_image(images), model.encode_text(texts)


def _features(params, config, images_nchw, texts):
  """Our encode_image / encode_text of the torch inputs, with `params` in the model of `config`."""
  graphdef, abstract, rest = nnx.split(
      nnx.eval_shape(lambda: methods.build_model(config, eos_id=EOT, seed=0)), nnx.Param, ...)
  assert jax.tree.structure(params) == jax.tree.structure(nnx.to_pure_dict(abstract))
  assert not jax.tree.leaves(rest)
  image, text = _encode(graphdef, params, images_nchw.transpose(0, 2, 3, 1), texts)
  return np.asarray(image), np.asarray(text)


@needs_torch
@pytest.mark.parametrize("name", ["model.safetensors", "model.pt", "model_jit.pt",
                                  "model_openclip.pt"])
def test_imported_forward_matches_pytorch(torch_reference, name):
  state = torch_files.read_checkpoint(os.path.join(torch_reference["dir"], name))
  arch = openai_layout.infer_architecture(state, vision_heads=4)
  assert arch["image"]["heads"] == 4 and arch["text"]["heads"] == 2
  assert (arch["image"]["image_size"], arch["text"]["vocab_size"], arch["embed_dim"]) == (
      32, VOCAB, 32)
  params = openai_layout.to_params(state, arch)
  image, text = _features(params, convert.imported_config(arch), torch_reference["images"],
                          torch_reference["texts"])
  ref = torch_reference["ref"]
  image_diff = np.abs(image - ref["image_features"]).max()
  text_diff = np.abs(text - ref["text_features"]).max()
  print(f"{name}: max |ours - torch| image {image_diff:.2e}, text {text_diff:.2e}")
  assert image_diff <= 1e-4 and text_diff <= 1e-4
  assert float(params["logit_scale"]) == pytest.approx(float(ref["logit_scale"]))


@needs_torch
def test_layout_round_trips_are_bitwise(torch_reference):
  state = torch_files.read_checkpoint(os.path.join(torch_reference["dir"], "model.safetensors"))
  arch = openai_layout.infer_architecture(state, vision_heads=4)
  params = openai_layout.to_params(state, arch)
  back = openai_layout.from_params(params)
  assert sorted(back) == sorted(state)
  for key, value in state.items():
    assert back[key].shape == value.shape and np.array_equal(back[key], value), key
  again = openai_layout.to_params(back, arch)
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), again, params)
  # The TorchScript archive's extra entries (attention masks) are recognised and skipped.
  script = torch_files.read_checkpoint(os.path.join(torch_reference["dir"], "model_jit.pt"))
  assert {k for k in script if not openai_layout.IGNORED.search(k)} == set(state)
  # A key with no place in the model is an error, not silently dropped.
  with pytest.raises(ValueError, match="no place"):
    openai_layout.to_params(dict(state, **{"visual.transformer.resblocks.0.ls_1.gamma":
                                           np.ones(64, np.float32)}), arch)


@pytest.mark.slow
@needs_torch
def test_convert_evaluate_finetune_export(torch_reference, merges_path, demo_dir, tmp_path):
  """The CLI import -> `python -m xclip_jax.evaluate` -> a 2-step fine-tune from the import ->
  export, loaded by the torch model with strict key checking."""
  src = os.path.join(torch_reference["dir"], "model.pt")
  imported, tuned = str(tmp_path / "imported"), str(tmp_path / "tuned")
  # One CPU device in the subprocesses: the same code path, a quicker start and compile.
  env = subprocess_env(1)
  run = subprocess.run(
      [sys.executable, "-m", "xclip_jax.interop.convert", f"--input={src}",
       f"--workdir={imported}", f"--bpe_vocab={merges_path}", "--vision_heads=4",
       "--config=configs/clip.py:demo", f"--config.data.data_dir={demo_dir}"],
      cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
  assert run.returncode == 0, run.stderr[-3000:]
  assert "(4 heads)" in run.stdout
  config = checkpoint.saved_config(imported)
  assert (config.tokenizer.kind, config.model.image.heads, config.model.text.vocab_size) == (
      "clip_bpe", 4, VOCAB)
  assert config.evals.transform == "openai"           # OpenAI's preprocessing by default
  state = torch_files.read_checkpoint(src)
  reference = openai_layout.to_params(
      state, openai_layout.infer_architecture(state, vision_heads=4))
  jax.tree.map(np.testing.assert_array_equal, checkpoint.load_params(imported), reference)

  run = subprocess.run(
      [sys.executable, "-m", "xclip_jax.evaluate", f"--workdir={imported}",
       "--config.evals.zeroshot.max_examples=48", "--config.evals.zeroshot.batch_size=16",
       "--config.evals.retrieval.enabled=False"],
      cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
  assert run.returncode == 0, run.stderr[-3000:]
  results = json.load(open(os.path.join(imported, "eval", "step_0.json")))
  assert 0 <= results["zeroshot/top1"] <= 100

  # The converted workdir is not a run to resume; fine-tuning starts a new one from it. (In
  # process: `python -m xclip_jax.main --config=configs/finetune.py:W` is these two calls.)
  config = finetune_config.get_config(imported)
  assert config.init_from == imported
  config.update_from_flattened_dict({
      "total_steps": 2, "batch_size": 16, "optim.warmup_steps": 1, "optim.lr": 1e-4,
      "log_every": 1, "evals.zeroshot.enabled": False, "evals.retrieval.enabled": False,
      "checkpoint.every": 2, "data.shuffle_buffer": 64})
  # Neither fine-tuning into the imported workdir nor resuming it as a run is allowed.
  with pytest.raises(ValueError, match="starts from: fine-tuning would resume or overwrite it"):
    train.run(config, imported)
  as_run = config.copy_and_resolve_references()
  as_run.init_from = ""
  with pytest.raises(ValueError, match="holds an imported model"):
    train.run(as_run, imported)
  metrics = train.run(config, tuned)
  assert np.isfinite(metrics["loss"])
  tuned_params = checkpoint.load_params(tuned)
  change = max(jax.tree.leaves(jax.tree.map(lambda a, b: float(np.abs(a - b).max()),
                                            tuned_params, reference)))
  assert 0 < change < 1e-2      # started from the import (random init differs by ~0.1-1)

  exported = str(tmp_path / "tuned.safetensors")
  convert.export_checkpoint(tuned, exported)
  state = torch_files.read_checkpoint(exported)
  reimported = openai_layout.to_params(
      state, openai_layout.infer_architecture(state, vision_heads=4))
  jax.tree.map(np.testing.assert_array_equal, reimported, tuned_params)
  out = tmp_path / "torch_tuned"
  run = subprocess.run([TORCH_PYTHON, os.path.join(ROOT, "tests", "torch_clip_ref.py"),
                        os.path.join(torch_reference["dir"], "spec.json"), str(out), exported],
                       capture_output=True, text=True, timeout=300)
  assert run.returncode == 0, run.stderr[-3000:]
  ref = np.load(out / "reference.npz")
  image, text = _features(tuned_params, config, torch_reference["images"],
                          torch_reference["texts"])
  image_diff = np.abs(image - ref["image_features"]).max()
  text_diff = np.abs(text - ref["text_features"]).max()
  print(f"exported fine-tune: max |ours - torch| image {image_diff:.2e}, text {text_diff:.2e}")
  assert image_diff <= 1e-4 and text_diff <= 1e-4

  # init_from with a model of another shape names the parameters that differ.
  other = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tuned_params)
  other["text"]["token_embedding"] = jax.ShapeDtypeStruct((VOCAB + 1, 128), np.float32)
  with pytest.raises(ValueError, match="text/token_embedding: checkpoint"):
    finetune.init_params(imported, other)
