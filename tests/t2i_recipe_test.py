"""Recipe finetune_t2i: data preparation, report, and the whole flow (slow)."""

import gzip
import json
import os

import numpy as np
import pytest

from mia_jax import checkpoints, errors, recipes
from mia_jax.recipes import finetune_t2i as t2i_recipe
from mia_jax.data import sources

CONFIG = "experiments/configs/finetune_t2i.py"


def _write_idx(directory, n=160, seed=0):
  """A small Fashion-MNIST look-alike in the IDX format (gzip)."""
  rng = np.random.RandomState(seed)
  labels = rng.randint(0, 10, n).astype(np.uint8)
  images = np.zeros((n, 28, 28), np.uint8)
  for i, c in enumerate(labels):  # a class-dependent bar + noise
    images[i, 4 + 2 * c:8 + 2 * c, 4:24] = 200
    images[i] += rng.randint(0, 30, (28, 28)).astype(np.uint8)
  os.makedirs(directory, exist_ok=True)
  head = (0x803).to_bytes(4, "big") + b"".join(
      int(v).to_bytes(4, "big") for v in (n, 28, 28))
  with gzip.open(os.path.join(directory, "train-images-idx3-ubyte.gz"),
                 "wb") as f:
    f.write(head + images.tobytes())
  with gzip.open(os.path.join(directory, "train-labels-idx1-ubyte.gz"),
                 "wb") as f:
    f.write((0x801).to_bytes(4, "big") + n.to_bytes(4, "big") +
            labels.tobytes())
  return images, labels


def test_idx_labels_and_data_preparation(tmp_path):
  images, labels = _write_idx(str(tmp_path / "fm"))
  np.testing.assert_array_equal(
      sources.read_idx_labels(tmp_path / "fm" / "train-labels-idx1-ubyte.gz"),
      labels)
  cfg = recipes.load_config_file(CONFIG + ":tiny")
  cfg.data.dir = str(tmp_path / "fm")
  out = t2i_recipe.prepare_data(cfg, str(tmp_path / "data"))
  ids = {k: set(v[1].tolist()) for k, v in out.items()}
  assert not ids["members"] & ids["nonmembers"]
  assert not ids["public"] & (ids["members"] | ids["nonmembers"])
  # GSA's shadow pool (tiny audits gsa): public images kept out of
  # pretraining and out of the audit, twice the member count.
  assert len(ids["shadow_pool"]) == 32
  assert not ids["shadow_pool"] & (ids["public"] | ids["members"]
                                   | ids["nonmembers"])
  imgs, pos, caps = out["members"]
  assert imgs.shape == (16, 32, 32, 3) and imgs.dtype == np.uint8
  # Padded by 2 pixels, grey replicated to RGB.
  np.testing.assert_array_equal(imgs[:, 2:30, 2:30, 0], images[pos])
  np.testing.assert_array_equal(imgs[..., 0], imgs[..., 2])
  assert (imgs[:, :2] == 0).all()
  for p, c in zip(pos, caps):
    assert t2i_recipe.FASHION_CLASSES[labels[p]] in c
  src = sources.NpzSource(tmp_path / "data" / "members.npz")
  assert src.captions(np.arange(3)) == caps[:3]
  with open(tmp_path / "data" / "captions.jsonl") as f:
    rows = [json.loads(line) for line in f]
  assert len(rows) == 64 + 16 + 16 + 32


def test_missing_fashion_mnist_is_a_user_error(tmp_path):
  with pytest.raises(errors.UserError, match="dataset-fashion-mnist"):
    t2i_recipe.load_fashion_mnist(str(tmp_path))


def test_split_is_disjoint_and_refuses_too_many():
  pos = t2i_recipe.split_positions(50, {"a": 10, "b": 20}, 0)
  assert len(set(pos["a"]) | set(pos["b"])) == 30
  with pytest.raises(errors.UserError):
    t2i_recipe.split_positions(10, {"a": 8, "b": 8}, 0)


def _row(variant, auc, oms=0):
  return {"variant": variant, "attack": variant.rsplit("_oms", 1)[0],
          "oms_steps": oms, "timestep": 10, "auc": auc, "asr": auc,
          "tpr_at_1pct_fpr": 0.0}


def test_report_states_the_probe_rule(tmp_path):
  tables = {"pretrained": [_row("naive_oms0", 0.5), _row("probe", 0.52)],
            "finetuned": [_row("naive_oms0", 0.97), _row("naive_oms1", 0.99, 1),
                          _row("probe", 0.58)]}
  assert t2i_recipe.best_base(tables["finetuned"])["variant"] == "naive_oms0"
  path = t2i_recipe.write_report(str(tmp_path), tables, 60.0)
  text = open(path).read()
  assert "does not hold" in text and "0.9700" in text
  tables["finetuned"][-1]["auc"] = 0.8
  assert "-> the claim holds" in t2i_recipe.probe_verdict(tables)


@pytest.mark.slow
def test_recipe_end_to_end_tiny(tmp_path):
  _write_idx(str(tmp_path / "fm"))
  cfg = recipes.load_config_file(CONFIG + ":tiny")
  cfg.data.dir = str(tmp_path / "fm")
  work = str(tmp_path / "w")
  result = recipes.run_recipe(cfg, work)
  for model in ("pretrained", "finetuned"):
    folder = os.path.join(work, model, "diffusers")
    for part in ("model_index.json", "unet", "vae", "text_encoder",
                 "tokenizer", "scheduler"):
      assert os.path.exists(os.path.join(folder, part))
  for model in ("pretrained", "finetuned", "finetuned_lora"):
    with open(os.path.join(work, model, "audit", "metrics.json")) as f:
      variants = {r["variant"] for r in json.load(f)}
    assert {"naive_oms0", "naive_oms2", "pian_oms2", "probe",
            "probe_forward", "gsa1_oms0", "gsa2_oms1"} <= variants
    log = open(os.path.join(work, model, "commands.log")).read()
    assert "experiments/convert.py --format stable_diffusion" in log
    assert "--shadow_checkpoints " + os.path.join(
        work, "shadow0", "checkpoint") in log
  # The shadow fine-tune records its split of the held-out public pool.
  shadow = checkpoints.read_metadata(os.path.join(work, "shadow0",
                                                  "checkpoint"))["data"]
  pool = np.load(os.path.join(work, "data", "shadow_pool.npz"))
  assert shadow["source"] == os.path.join(work, "data", "shadow_pool.npz")
  assert sorted(shadow["members"] + shadow["nonmembers"]) == sorted(
      pool["ids"].tolist())
  assert len(shadow["members"]) == len(shadow["nonmembers"]) == 16
  public = np.load(os.path.join(work, "data", "public.npz"))["ids"]
  assert not set(public.tolist()) & set(pool["ids"].tolist())
  assert "--lora" in open(os.path.join(work, "finetuned_lora",
                                       "commands.log")).read()
  assert set(result.extra["tables"]) == {"pretrained", "finetuned",
                                         "finetuned_lora"}
  for job in ("finetuned", "finetuned_lora", "shadow0"):  # ran in parallel
    assert "mia_jax.recipes.finetune_t2i" in open(
        os.path.join(work, job, "train.log")).read()
  assert "initial-noise probe" in open(os.path.join(work, "report.md")).read()


def test_config_variants_load_and_document_the_command():
  text = open(os.path.join(recipes.REPO_ROOT, CONFIG)).read()
  assert ("python experiments/recipe.py --config experiments/configs/"
          "finetune_t2i.py:reduced") in text
  assert "apt-get install -y dataset-fashion-mnist" in text
  for variant in ("reduced", "tiny", "full"):
    cfg = recipes.load_config_file(f"{CONFIG}:{variant}")
    assert cfg.kind in recipes.KINDS and cfg.variant == variant
  with pytest.raises(ValueError, match="unknown variant"):
    recipes.load_config_file(CONFIG + ":nope")


def test_finetune_jobs_follow_the_config():
  cfg = recipes.load_config_file(CONFIG + ":reduced")
  assert t2i_recipe.finetune_jobs(cfg) == ["finetuned", "shadow0"]
  assert cfg.workers == 2
  assert recipes.load_config_file(CONFIG + ":full").workers == 1
  cfg.finetune.lora_rank, cfg.shadow.count = 8, 2
  assert t2i_recipe.finetune_jobs(cfg) == ["finetuned", "finetuned_lora",
                                          "shadow0", "shadow1"]
  cfg.audit.attacks = ("naive", "probe")  # no gsa: no shadows
  assert t2i_recipe.finetune_jobs(cfg) == ["finetuned", "finetuned_lora"]


@pytest.mark.parametrize("workers", [0, -1, True])
def test_bad_worker_counts_are_refused_before_work(tmp_path, workers):
  # (ml_collections itself refuses a non-integer --config.workers.)
  cfg = recipes.load_config_file(CONFIG + ":tiny")
  cfg.workers = workers
  with pytest.raises(errors.UserError, match="workers must be a whole"):
    t2i_recipe.run(cfg, str(tmp_path / "w"))
  assert not os.path.exists(tmp_path / "w" / "data")


def test_bad_config_leaves_an_existing_workdir_untouched(tmp_path):
  work = tmp_path / "w"
  work.mkdir()
  (work / "recipe.json").write_text("{}")
  for field, value, match in [("workers", 0, "workers must be a whole"),
                              ("shadow.count", 0, "at least one shadow")]:
    cfg = recipes.load_config_file(CONFIG + ":tiny")
    cfg.update_from_flattened_dict({field: value})
    with pytest.raises(errors.UserError, match=match):
      recipes.run_recipe(cfg, str(work))
    assert os.listdir(work) == ["recipe.json"]
    assert (work / "recipe.json").read_text() == "{}"


def test_user_models_without_data_are_refused_before_work(tmp_path):
  cfg = recipes.load_config_file(CONFIG + ":full")
  cfg.models.pretrained = str(tmp_path / "a")
  with pytest.raises(errors.UserError, match="audit.members"):
    t2i_recipe.run(cfg, str(tmp_path / "w"))
  assert not os.path.exists(tmp_path / "w" / "pretrained")


def test_bad_user_models_are_refused_before_the_workdir_is_touched(
    tmp_path):
  pipe = tmp_path / "pipe"
  pipe.mkdir()
  (pipe / "model_index.json").write_text("{}")
  members = tmp_path / "m.npz"
  np.savez(members, images=np.zeros((2, 8, 8, 3), np.uint8), ids=[0, 1])
  captions = tmp_path / "c.jsonl"
  captions.write_text('{"id": 0, "caption": "a"}\n')
  good = dict(pretrained=str(pipe), finetuned=str(pipe),
              members=str(members), nonmembers=str(members),
              captions=str(captions))
  for field, value, match in [
      ("finetuned", str(tmp_path), r"no model_index.json.*models.finetuned"),
      ("members", str(tmp_path / "nope.npz"), r"does not exist.*audit.members"),
      ("captions", str(tmp_path / "nope.jsonl"), "audit.captions"),
  ]:
    cfg = recipes.load_config_file(CONFIG + ":full")
    cfg.audit.attacks = ("naive",)
    for key, v in dict(good, **{field: value}).items():
      (cfg.models if key in ("pretrained", "finetuned") else cfg.audit)[
          key] = v
    work = tmp_path / f"w_{field}"
    with pytest.raises(errors.UserError, match=match):
      recipes.run_recipe(cfg, str(work))
    assert not work.exists()


def test_the_fine_tune_child_takes_the_compute_flags(tmp_path):
  # The command line `train_models` gives each fine-tune process: the
  # compute flags must reach `_finetune_main`, not absl's flag parser (which
  # once refused them and failed every parallel fine-tune). With no
  # recipe.json the child gets as far as reading it.
  from mia_jax.recipes import processes
  log = tmp_path / "child.log"
  with pytest.raises(RuntimeError, match="exited"):
    processes.run_binary(["-m", "mia_jax.recipes.finetune_t2i",
                          str(tmp_path), "finetuned",
                          *processes.compute_flags()], str(log))
  text = log.read_text()
  assert "Unknown command line flag" not in text
  assert "recipe.json" in text and "FileNotFoundError" in text
