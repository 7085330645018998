"""A workdir holds one run: resuming it with a config that differs in what defines the run is
refused (naming the keys) unless --resume_with_changes; fine-tuning never resumes its source."""

import json
import os
import subprocess
import sys

import pytest

from xclip_jax import checkpoint, finetune, resume, train

from tests.tiny import ROOT, checkpoint_steps

import configs.clip as clip_config

TINY = {"data.name": "synthetic", "batch_size": 16, "total_steps": 2, "log_every": 1,
        "model.embed_dim": 16, "model.image.width": 32, "model.image.layers": 1,
        "model.image.heads": 2, "model.image.patch_size": 16, "model.text.width": 32,
        "model.text.layers": 1, "model.text.heads": 2, "optim.warmup_steps": 1,
        "checkpoint.every": 100}


def _config(**overrides):
  c = clip_config.get_config("demo")
  for key, value in {**TINY, **overrides}.items():
    node = c
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  return c


def _saved(config):
  return json.loads(json.dumps(config.to_dict()))


def test_run_length_logging_eval_and_layout_fields_may_change():
  saved = _saved(_config())
  changed = _config(**{"total_steps": 50, "log_every": 7, "eval_every": 3, "dry_run": True,
                       "checkpoint.every": 5, "checkpoint.keep": 9,
                       "checkpoint.async_save": False, "evals.zeroshot.enabled": True,
                       "evals.retrieval.batch_size": 8, "data.prefetch": 4,
                       "data.num_parallel_calls": 2, "mesh.data": 2, "mesh.fsdp": 4,
                       "model.remat": "full", "accum_steps": 2, "contrastive.impl": "chunked"})
  assert resume.differences(saved, changed) == {}
  assert resume.check(saved, changed, step=4, workdir="w", allow_changes=False) == {}


@pytest.mark.parametrize("key,value", [("optim.lr", 0.002), ("seed", 1), ("batch_size", 32),
                                       ("data.name", "xclip_demo"), ("model.embed_dim", 32),
                                       ("method", "siglip"), ("data.shuffle_buffer", 7),
                                       ("optim.no_decay", ("bias",))])
def test_a_change_that_defines_another_run_is_refused_naming_the_key(key, value):
  saved = _saved(_config())
  with pytest.raises(resume.ConfigMismatchError) as e:
    resume.check(saved, _config(**{key: value}), step=4, workdir="w", allow_changes=False)
  assert f"  {key}: saved " in str(e.value) and "--resume_with_changes" in str(e.value)
  assert resume.differences(saved, _config(**{key: value})).keys() == {key}


def test_method_options_may_change_and_method_fields_may_not():
  # Options (methods.base.Option) compute the same loss another way; a method's own fields
  # (its config section) define the run like any other.
  saved = _saved(_config())
  assert resume.differences(saved, _config(**{"siglip.impl": "ring"})) == {}
  for key, value in (("declip.queue_size", 8), ("siglip.bias_init", -5.0), ("slip.ssl_weight", 2.0),
                     ("nclip.clip_weight", 1.0)):
    assert resume.differences(saved, _config(**{key: value})).keys() == {key}


def test_fields_added_to_the_schema_since_the_save_are_not_compared():
  saved = _saved(_config())
  del saved["optim"]["max_nonfinite_steps"]
  assert resume.differences(saved, _config(**{"optim.max_nonfinite_steps": 3})) == {}


@pytest.mark.slow
def test_resume_refuses_a_changed_lr_and_the_flag_allows_and_records_it(tmp_path, caplog):
  workdir = str(tmp_path / "run")
  train.run(_config(), workdir)
  assert checkpoint_steps(workdir) == [2]
  # Same config, longer: resumes (run length may change) -- refused only for the lr below.
  with pytest.raises(resume.ConfigMismatchError) as e:
    train.run(_config(**{"optim.lr": 0.002, "seed": 3, "total_steps": 3}), workdir)
  message = str(e.value)
  assert "optim.lr: saved 0.001, now 0.002" in message and "seed: saved 0, now 3" in message
  assert "total_steps" not in message.split("define the run:")[1].split("Start")[0]
  assert checkpoint_steps(workdir) == [2]                     # nothing written
  assert not os.path.exists(os.path.join(workdir, resume.CHANGES_FILE))

  train.run(_config(**{"optim.lr": 0.002, "total_steps": 3}), workdir, resume_with_changes=True)
  assert checkpoint_steps(workdir) == [2, 3]
  (line,) = open(os.path.join(workdir, resume.CHANGES_FILE)).read().splitlines()
  record = json.loads(line)
  assert record["step"] == 2 and record["changes"] == {"optim.lr": {"saved": 0.001, "now": 0.002}}
  assert checkpoint.load_config(workdir, 3).optim.lr == 0.002   # the new run's config from now on
  assert checkpoint.load_config(workdir, 2).optim.lr == 0.001


@pytest.mark.slow
def test_main_refuses_before_compiling_and_prints_the_differing_keys(tmp_path):
  workdir = tmp_path / "run"
  train.run(_config(), str(workdir))
  flags = [f"--config.{k}={v}" for k, v in TINY.items()]
  out = subprocess.run([sys.executable, "-m", "xclip_jax.main", "--config=configs/clip.py:demo",
                        f"--workdir={workdir}", *flags, "--config.optim.lr=0.01"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert out.returncode == 1, out.stderr[-2000:]
  assert "optim.lr: saved 0.001, now 0.01" in out.stderr
  assert "compiled" not in out.stderr


# ---- fine-tuning: never into the source ----------------------------------------------------------

def test_finetune_default_workdir_is_beside_the_source_never_the_source():
  from xclip_jax import main
  config = _config(init_from="workdirs/clip_demo")
  assert main.default_workdir(config) == os.path.join("workdirs", "finetune_clip_demo")
  config.init_from = "gs://bucket/runs/b16/checkpoints/3000"
  assert main.default_workdir(config) == os.path.join("workdirs", "finetune_b16_step3000")
  config.init_from = ""
  assert main.default_workdir(config) == os.path.join("workdirs", "clip_demo")


def test_finetune_into_its_source_is_refused(tmp_path):
  source = tmp_path / "src"
  for workdir in (source, f"{source}/", tmp_path / "x" / ".." / "src"):
    with pytest.raises(ValueError, match="is the run config.init_from"):
      finetune.check_not_source(str(workdir), f"{source}/checkpoints/4")
  finetune.check_not_source(str(tmp_path / "new"), str(source))
  finetune.check_not_source(str(source), "")        # not fine-tuning: nothing to check
  with pytest.raises(ValueError, match="is the run config.init_from"):
    train.run(_config(init_from=str(source)), str(source))


# Recipes changed since 8b2b9d9 on purpose: {recipe: {field: (then, now)}}.
RECIPE_CHANGES_SINCE_8B2B9D9 = {
    # configs/clip.py: the demo clips gradients again, and the DeCLIP demo with it.
    "clip:demo": {"optim.grad_clip_norm": (0.0, 1.0)},
    "declip:demo": {"optim.grad_clip_norm": (0.0, 1.0)},
}

ADDED_SINCE_8B2B9D9 = [
    "data.mixture", "ema_decay", "model.image.patch_dropout", "optim.cooldown_fraction",
    "optim.cooldown_steps", "optim.layer_decay", "optim.locked_tower", "optim.lr_mults",
    "optim.rsqrt_timescale", "optim.schedule", "profile.num_steps", "profile.perfetto",
    "profile.start_step", "wandb.dir", "wandb.enabled", "wandb.mode", "wandb.name",
    "wandb.project"]


def _flat(tree, prefix=""):
  out = {}
  for key, value in tree.items():
    out.update(_flat(value, f"{prefix}{key}.") if isinstance(value, dict)
               else {prefix + key: value})
  return out


def test_configs_saved_before_the_methods_package_resume_and_load_unchanged():
  # Saved by the code before xclip_jax/methods/ existed (main at 8b2b9d9): the method sections
  # now come from the method files, and a resume of each recipe must see no difference.
  import importlib

  from xclip_jax import config as config_lib
  with open(os.path.join(ROOT, "tests", "saved_configs_8b2b9d9.json")) as f:
    saved = json.load(f)
  for name, old in saved.items():
    module, variant = name.split(":")
    config = importlib.import_module(f"configs.{module}").get_config(variant)
    changed = RECIPE_CHANGES_SINCE_8B2B9D9.get(name, {})
    if changed:   # a recipe changed on purpose: resuming an old run of it must say so
      with pytest.raises(resume.ConfigMismatchError, match=next(iter(changed))):
        resume.check(old, config, step=4, workdir="w", allow_changes=False)
    assert resume.check(old, config, step=4, workdir="w", allow_changes=True) == changed, name
    # Every field saved then is there, with the same value (or the recipe's new one); what is
    # new is issue 20's fields.
    now, then = _flat(_saved(config)), _flat(old)
    assert {k: now.get(k, "<missing>") for k in then} == {
        **then, **{k: new for k, (_, new) in changed.items()}}, name
    assert sorted(set(now) - set(then)) == ADDED_SINCE_8B2B9D9, name
    merged = config_lib.base_config()                        # checkpoint.saved_config's merge
    config_lib.merge_saved(merged, old)
    merged_now = _flat(_saved(merged))
    assert {k: merged_now[k] for k in then} == then, name
    assert all(merged_now[k] == _flat(_saved(config_lib.base_config()))[k]
               for k in ADDED_SINCE_8B2B9D9), name    # fields added since keep their defaults
