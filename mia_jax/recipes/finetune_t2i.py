"""Recipe kind ``"finetune_t2i"``: a fine-tuned text-to-image model, audited.

The setting of the initial-noise probe paper and of the OMS paper's Stable
Diffusion tables, offline and at a small size
(``experiments/configs/finetune_t2i.py``):

1. data (``W/data``): Fashion-MNIST (Debian's ``dataset-fashion-mnist``:
   ``apt-get install dataset-fashion-mnist``; IDX files under
   ``/usr/share/datasets/fashion-mnist``), padded to 32x32, grey -> RGB,
   captions from the class names with several templates; disjoint seeded
   public / member / non-member sets written as ``.npz`` files with ids and
   captions, plus ``captions.jsonl``;
2. a CLIP-format tokenizer trained on the public captions (``W/tokenizer``);
3. pretraining on the public images (``W/pretrained/train_*``): the VAE, then
   the UNet and the text encoder together on VAE latents with caption
   dropout; exported as a diffusers folder ``W/pretrained/diffusers``;
4. fine-tuning of the UNet on the members only, many epochs (text encoder
   and VAE frozen, as diffusers' text-to-image fine-tuning does): exported as
   ``W/finetuned/diffusers``; with ``finetune.lora_rank > 0`` a LoRA
   fine-tune is exported and audited as well (``W/finetuned_lora``);
5. for each model: ``experiments/convert.py --format stable_diffusion`` and
   ``experiments/attack.py`` run as subprocesses, exactly as a user with a
   diffusers folder would (``W/<model>/checkpoint``, ``W/<model>/audit``);
   the pretrained model is the negative control (its "members" were never
   trained on);
6. GSA (with ``gsa`` in ``audit.attacks``): ``shadow.count`` shadow
   fine-tunes of the pretrained UNet, each on a seeded half of
   ``W/data/shadow_pool.npz`` (public images held out of pretraining), with
   the target's fine-tuning recipe (``W/shadow<i>/``); each converted with
   ``convert.py --trained_on/--held_out`` and passed to every audit as
   ``--shadow_checkpoints``;
7. ``W/report.md``: both tables, the strongest base attack per model, and
   what the initial-noise probe paper claims next to what its rows show.

The fine-tunes of step 4 and 6, and then the audits of step 5, do not depend
on each other: they run ``workers`` at a time as separate processes
(`mia_jax.recipes.processes`; a fine-tune is ``python -m
mia_jax.recipes.finetune_t2i W JOB ...``, logging to ``W/<job>/train.log``).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import time
from typing import Any, Optional

from absl import logging
import jax
import ml_collections
import numpy as np

from mia_jax import errors, report, runner, schedules, train_sd
from mia_jax.convert import sd_export
from mia_jax.data import spec as data_spec
from mia_jax.models.sd import clip as clip_lib
from mia_jax.models.sd import unet as unet_lib
from mia_jax.models.sd import vae as vae_lib
from mia_jax.recipes import common, processes
from mia_jax.recipes.t2i_data import (FASHION_CLASSES, FashionMnistMissing,
                                      load_fashion_mnist, make_captions,
                                      split_positions, to_rgb)

PROBE_CLAIM = (
    "\"Noise as a Probe\" claims that the initial noise obtained from a "
    "training image (by DDIM inversion, or even by forward diffusion to the "
    "last step) keeps a semantic residue of that image, so a fine-tuned "
    "text-to-image model regenerates its members from such noise closer to "
    "the original than it regenerates non-members; the attacker needs only "
    "the generation interface (choose the initial noise, see the output).")


# ------------------------------------------------------------ data


def prepare_data(cfg: ml_collections.ConfigDict, data_dir: str) -> dict:
  """Writes ``{public,members,nonmembers}.npz`` + ``captions.jsonl``.

  With GSA shadows (`shadow_count`), also ``shadow_pool.npz``: public
  images held out of pretraining (twice the member count), from which each
  shadow fine-tune takes a seeded half as its members.

  Returns ``{name: (images uint8 [N, r, r, 3], ids [N], captions)}``.
  """
  d = cfg.data
  images, labels = load_fashion_mnist(d.dir)
  sizes = {"public": d.num_public, "members": d.num_members,
           "nonmembers": d.num_nonmembers}
  if shadow_count(cfg):  # last, so the other splits do not move
    sizes["shadow_pool"] = 2 * d.num_members
  pos = split_positions(len(images), sizes, d.split_seed)
  captions = make_captions(labels, tuple(d.templates), d.split_seed)
  os.makedirs(data_dir, exist_ok=True)
  out, lines = {}, []
  for name, p in pos.items():
    imgs = to_rgb(images[p], d.resolution)
    caps = [captions[i] for i in p]
    out[name] = (imgs, p.astype(np.int64), caps)
    path = os.path.join(data_dir, f"{name}.npz")
    if not os.path.isfile(path):
      runner.atomic_savez(path, images=imgs, ids=p.astype(np.int64),
                          captions=np.array(caps))
    lines += [json.dumps({"id": int(i), "caption": c}) for i, c in
              zip(p, caps)]
  report.atomic_write_text(os.path.join(data_dir, "captions.jsonl"),
                           "\n".join(lines) + "\n")
  return out


def _float(images: np.ndarray) -> np.ndarray:
  return images.astype(np.float32) / 127.5 - 1.0


# ------------------------------------------------------------ models


def build_modules(cfg: ml_collections.ConfigDict):
  """``(unet, vae, text)`` modules of the recipe's configs."""
  vae = vae_lib.AutoencoderKL(**_tuples(cfg.vae.model),
                              sample_size=cfg.data.resolution)
  text = clip_lib.CLIPTextEncoder(**_tuples(cfg.text.model))
  unet = unet_lib.UNet2DCondition(
      **_tuples(cfg.unet.model),
      sample_size=cfg.data.resolution // vae.downsample_factor,
      in_channels=vae.latent_channels, out_channels=vae.latent_channels,
      cross_attention_dim=text.hidden_size)
  return unet, vae, text


def _tuples(node) -> dict[str, Any]:
  return {k: tuple(v) if isinstance(v, (list, tuple)) else v
          for k, v in dict(node).items()}


def _module_config(module) -> dict[str, Any]:
  return {f: getattr(module, f) for f in module.__dataclass_fields__
          if f not in ("parent", "name")}


def _export(folder, unet, vae, text, params, scaling, tok_dir, sched):
  if os.path.isfile(os.path.join(folder, "model_index.json")):
    return folder
  return sd_export.export_stable_diffusion(
      folder, unet=(params["unet"], _module_config(unet)),
      vae=(params["vae"], _module_config(vae)),
      text_encoder=(params["text_encoder"], _module_config(text)),
      scaling_factor=scaling, tokenizer_dir=tok_dir,
      schedule=sched.to_config())


def shadow_count(cfg: ml_collections.ConfigDict) -> int:
  """How many GSA shadow fine-tunes the recipe trains (0 without gsa)."""
  if "gsa" not in tuple(cfg.audit.attacks):
    return 0
  count = int(cfg.get("shadow", {}).get("count") or 0)
  if count < 1:
    raise errors.UserError("gsa needs at least one shadow fine-tune",
                           f"shadow.count={count}",
                           "set shadow.count >= 1 or drop gsa from "
                           "audit.attacks")
  return count


def shadow_specs(cfg: ml_collections.ConfigDict, data_dir: str, i: int
                 ) -> tuple[str, str]:
  """Data specs of shadow ``i``'s members and held-out images."""
  pool = os.path.join(data_dir, "shadow_pool.npz")
  seed = int(cfg.shadow.split_seed) + i
  return f"{pool}:members:seed={seed}", f"{pool}:nonmembers:seed={seed}"


@dataclasses.dataclass
class Pretrained:
  """The pretrained pipeline and the encoded data every fine-tune starts from."""

  unet: Any
  vae: Any
  text: Any
  sched: schedules.Schedule
  tok_dir: str
  latents: dict[str, np.ndarray]  # split -> scaled VAE latents
  ids: dict[str, np.ndarray]      # split -> token ids
  uncond: np.ndarray              # the empty caption's token ids
  loss: Any                       # train_sd.unet_loss
  params: dict[str, Any]          # vae, unet, text_encoder
  scaling: float
  export_dir: str


def pretrain(cfg: ml_collections.ConfigDict, workdir: str, data: dict
             ) -> Pretrained:
  """Tokenizer, VAE, UNet + text encoder on the public data; exported.

  Resumable: finished parts are restored, not retrained.
  """
  from mia_jax.convert import sd as convert_sd  # lazy: transformers
  unet, vae, text = build_modules(cfg)
  sched = schedules.from_config(dict(cfg.schedule))
  tok_dir = os.path.join(workdir, "tokenizer")
  if not os.path.isfile(os.path.join(tok_dir, "vocab.json")):
    train_sd.build_tokenizer(data["public"][2], tok_dir,
                             vocab_size=cfg.tokenizer.vocab_size,
                             max_length=text.max_position_embeddings)
  tokenize = convert_sd.load_tokenizer(tok_dir, text.max_position_embeddings)
  with open(os.path.join(tok_dir, "vocab.json")) as f:
    if len(json.load(f)) > text.vocab_size:
      raise errors.UserError("the tokenizer is larger than the text encoder",
                             f"text.model.vocab_size={text.vocab_size}",
                             "raise it or lower tokenizer.vocab_size")
  key = jax.random.key(cfg.seed)
  pre = os.path.join(workdir, "pretrained")
  pub_images = _float(data["public"][0])
  vae_params = train_sd.fit(
      os.path.join(pre, "train_vae"), "vae", train_sd.vae_loss(
          vae, cfg.vae.kl_weight),
      vae_lib.init_params(vae, jax.random.fold_in(key, 1),
                          resolution=cfg.data.resolution),
      {}, {"images": pub_images}, cfg.vae.train, seed=cfg.seed)
  scaling, latents = train_sd.cached_latents(
      os.path.join(pre, "latents.npz"), vae, vae_params,
      {name: _float(v[0]) for name, v in data.items()}, "public")
  ids = {name: tokenize(v[2]) for name, v in data.items()}
  uncond = tokenize([""])[0]
  loss = train_sd.unet_loss(unet, text, sched, cfg.unet.p_uncond)
  pre_params = train_sd.fit(
      os.path.join(pre, "train_unet"), "unet+text", loss,
      {"unet": unet_lib.init_params(unet, jax.random.fold_in(key, 2)),
       "text_encoder": clip_lib.init_params(text, jax.random.fold_in(key, 3))},
      {"uncond_ids": uncond},
      {"latents": latents["public"], "input_ids": ids["public"]},
      cfg.unet.train, seed=cfg.seed + 1)
  params = {"vae": vae_params, **pre_params}
  export_dir = _export(os.path.join(pre, "diffusers"), unet, vae, text,
                       params, scaling, tok_dir, sched)
  return Pretrained(unet, vae, text, sched, tok_dir, latents, ids, uncond,
                    loss, params, scaling, export_dir)


def finetune_jobs(cfg: ml_collections.ConfigDict) -> list[str]:
  """The fine-tunes of the pretrained model, in order: ``finetuned``,
  ``finetuned_lora`` (with ``finetune.lora_rank > 0``), ``shadow<i>``."""
  jobs = ["finetuned"]
  if int(cfg.finetune.get("lora_rank") or 0) > 0:
    jobs.append("finetuned_lora")
  return jobs + [f"shadow{i}" for i in range(shadow_count(cfg))]


def _job_output(workdir: str, job: str) -> str:
  """The file whose presence marks fine-tune ``job`` as exported."""
  if job == "finetuned_lora":
    return os.path.join(workdir, job, "pytorch_lora_weights.safetensors")
  return os.path.join(workdir, job, "diffusers", "model_index.json")


def finetune(cfg: ml_collections.ConfigDict, workdir: str, pre: Pretrained,
             job: str) -> Any:
  """Trains and exports fine-tune ``job`` (one of `finetune_jobs`).

  Returns:
    ``finetuned``: its diffusers folder; ``finetuned_lora``: (the pretrained
    folder, the LoRA file); ``shadow<i>``: ``{"diffusers": dir,
    "trained_on": spec, "held_out": spec}``.
  """
  ft, key, p = cfg.finetune, jax.random.key(cfg.seed), pre.params
  job_dir = os.path.join(workdir, job)
  done = os.path.isfile(_job_output(workdir, job))
  common_frozen = {"uncond_ids": pre.uncond,
                   "text_encoder": p["text_encoder"]}
  if job == "finetuned_lora":  # a LoRA file on the pretrained folder
    rank = int(ft.lora_rank)
    alpha = float(ft.get("lora_alpha") or rank)
    lora_file = _job_output(workdir, job)
    if not done:
      factors = train_sd.fit(
          os.path.join(job_dir, "train_lora"), "finetune-lora",
          train_sd.lora_loss(pre.loss, alpha / rank),
          {"lora": train_sd.lora_init(p["unet"], rank,
                                      jax.random.fold_in(key, 4))},
          {**common_frozen, "unet_base": p["unet"]},
          {"latents": pre.latents["members"],
           "input_ids": pre.ids["members"]},
          ft.get("lora_train") or ft.train, seed=cfg.seed + 3)
      sd_export.export_lora(lora_file, factors["lora"], rank, alpha)
    return (pre.export_dir, lora_file)
  if job == "finetuned":
    rows, name, seed, extra = None, "finetune", cfg.seed + 2, {}
    split = "members"
  elif job.startswith("shadow") and job[6:].isdigit():
    # GSA shadows: the attacker's copies of the fine-tuning, on public
    # images the pretraining never saw, with the target's recipe.
    i = int(job[6:])
    trained_on, held_out = shadow_specs(cfg, os.path.join(workdir, "data"),
                                        i)
    rows = data_spec.parse_spec(trained_on).indices
    name, seed, split = f"shadow{i} finetune", cfg.seed + 10 + i, \
        "shadow_pool"
    extra = {"trained_on": trained_on, "held_out": held_out}
  else:
    raise ValueError(f"unknown fine-tune {job!r}; expected one of "
                     f"{finetune_jobs(cfg)}")
  folder = os.path.join(job_dir, "diffusers")
  if not done:
    take = (lambda a: a) if rows is None else (lambda a: a[rows])
    unet = train_sd.fit(
        os.path.join(job_dir, "train_unet"), name, pre.loss,
        {"unet": p["unet"]}, common_frozen,
        {"latents": take(pre.latents[split]),
         "input_ids": take(pre.ids[split])},
        ft.train, seed=seed)["unet"]
    _export(folder, pre.unet, pre.vae, pre.text, {**p, "unet": unet},
            pre.scaling, pre.tok_dir, pre.sched)
  return {"diffusers": folder, **extra} if extra else folder


def train_models(cfg: ml_collections.ConfigDict, workdir: str, data: dict
                 ) -> tuple[dict[str, Any], list[dict[str, str]]]:
  """Pretrains, fine-tunes and exports.

  The fine-tunes (`finetune_jobs`) run as ``cfg.workers`` parallel
  processes (`processes.run_parallel`; each: ``python -m
  mia_jax.recipes.finetune_t2i WORKDIR JOB``, log ``W/<job>/train.log``).

  Returns:
    ``({model: diffusers dir or (dir, LoRA file)}, shadows)``; each shadow
    is ``{"diffusers": dir, "trained_on": spec, "held_out": spec}``.
  """
  pre = pretrain(cfg, workdir, data)
  jobs = finetune_jobs(cfg)
  pending = [j for j in jobs if not os.path.isfile(_job_output(workdir, j))]
  workers = _workers(cfg)
  if workers > 1 and len(pending) > 1:
    logging.info("fine-tuning %s as %d parallel processes (progress in "
                 "W/<job>/train.log)", pending, workers)

    def step(job):
      def run_job():
        os.makedirs(os.path.join(workdir, job), exist_ok=True)
        processes.run_binary(
            ["-m", "mia_jax.recipes.finetune_t2i", workdir, job,
             *processes.compute_flags()],
            os.path.join(workdir, job, "train.log"))
      return run_job

    processes.run_parallel([step(j) for j in pending], workers)
  results = {j: finetune(cfg, workdir, pre, j) for j in jobs}
  out = {"pretrained": pre.export_dir,
         **{j: results[j] for j in jobs if not j.startswith("shadow")}}
  shadows = [results[j] for j in jobs if j.startswith("shadow")]
  logging.info("exported %s; shadows %s", out, shadows)
  return out, shadows


def _finetune_main(argv: list[str]) -> None:
  """``python -m mia_jax.recipes.finetune_t2i WORKDIR JOB --dtype=...
  --matmul_precision=... --compilation_cache_dir=...``: one fine-tune of a
  recipe run, with the parent's compute settings (`processes.compute_flags`;
  the config is ``WORKDIR/recipe.json``)."""
  if len(argv) != 6:
    raise SystemExit("usage: python -m mia_jax.recipes.finetune_t2i WORKDIR "
                     "JOB --dtype=D --matmul_precision=P "
                     "--compilation_cache_dir=DIR")
  workdir, job = os.path.abspath(argv[1]), argv[2]
  logging.set_verbosity(logging.INFO)
  processes.apply_compute_flags(argv[3:])
  with open(os.path.join(workdir, "recipe.json")) as f:
    cfg = ml_collections.ConfigDict(json.load(f))
  data = prepare_data(cfg, os.path.join(workdir, "data"))
  finetune(cfg, workdir, pretrain(cfg, workdir, data), job)


# ------------------------------------------------------------ auditing


def convert_shadow(shadow: dict[str, str], shadow_dir: str) -> str:
  """convert.py on a shadow folder, recording its fine-tuning split."""
  ckpt = os.path.join(shadow_dir, "checkpoint")
  if not os.path.isfile(os.path.join(ckpt, "model.json")):
    processes.run_binary(
        ["experiments/convert.py", "--format", "stable_diffusion",
         "--source", shadow["diffusers"], "--output", ckpt,
         "--trained_on", shadow["trained_on"],
         "--held_out", shadow["held_out"]],
        os.path.join(shadow_dir, "commands.log"))
  return ckpt


def audit_model(cfg: ml_collections.ConfigDict, diffusers_dir: str,
                model_dir: str, data: dict[str, str],
                shadow_checkpoints: tuple[str, ...] = ()) -> list[dict]:
  """convert.py + attack.py on a diffusers folder; the metric rows.

  Args:
    diffusers_dir: the Stable Diffusion folder, or ``(folder, LoRA file)``
      (converted with ``--lora``).
    model_dir: gets ``checkpoint/`` (converted), ``audit/`` (the run
      directory) and ``commands.log`` (the exact commands and their output).
    data: ``members``, ``nonmembers``, ``captions`` paths.
    shadow_checkpoints: converted shadow fine-tunes (GSA).
  """
  ckpt = os.path.join(model_dir, "checkpoint")
  log = os.path.join(model_dir, "commands.log")
  os.makedirs(model_dir, exist_ok=True)
  lora = None
  if isinstance(diffusers_dir, (tuple, list)):  # (base folder, LoRA file)
    diffusers_dir, lora = diffusers_dir
  if not os.path.isfile(os.path.join(ckpt, "model.json")):
    processes.run_binary(
        ["experiments/convert.py", "--format", "stable_diffusion",
         "--source", diffusers_dir, "--output", ckpt]
        + (["--lora", lora] if lora else []), log)
  out = os.path.join(model_dir, "audit")
  a = cfg.audit
  args = ["experiments/attack.py", "--config", "experiments/configs/attack_sd.py",
          "--checkpoint", ckpt, "--members", data["members"],
          "--nonmembers", data["nonmembers"], "--captions", data["captions"],
          "--attacks", ",".join(a.attacks), "--oms_steps", str(a.oms_steps),
          "--batch_size", str(a.batch_size), "--seed", str(a.seed),
          "--bootstrap", str(a.bootstrap), "--output", out,
          *processes.compute_flags()]
  if a.get("max_samples"):
    args += ["--max_samples", str(a.max_samples)]
  for option in a.get("attack_options", ()) or ():
    args += ["--attack_option", option]
  if "gsa" in a.attacks:
    # The shadows' features are the same for every audited model: one cache.
    args += ["--shadow_checkpoints", ",".join(shadow_checkpoints),
             "--attack_option", "gsa.shadow_cache_dir=" + os.path.join(
                 os.path.dirname(model_dir), "gsa_shadow_features")]
  processes.run_binary(args, log)
  with open(os.path.join(out, "metrics.json")) as f:
    return json.load(f)


# ------------------------------------------------------------ the report


def best_base(rows: list[dict]) -> Optional[dict]:
  """The strongest depth-0 row (highest AUC)."""
  base = [r for r in rows if int(r.get("oms_steps") or 0) == 0]
  return max(base, key=lambda r: r["auc"]) if base else None


def _table(rows: list[dict]) -> str:
  lines = ["| variant | OMS | t | AUC | ASR | TPR@1%FPR |",
           "|---|---|---|---|---|---|"]
  for r in rows:
    lines.append(f"| {r['variant']} | {r.get('oms_steps')} | "
                 f"{r.get('timestep')} | {r['auc']:.4f} | {r['asr']:.4f} | "
                 f"{r['tpr_at_1pct_fpr']:.4f} |")
  return "\n".join(lines)


def probe_verdict(tables: dict[str, list[dict]]) -> str:
  """What the probe rows show, stated without a threshold tuned to them."""
  lines = []
  for model, rows in tables.items():
    probes = [r for r in rows if r["attack"].startswith("probe")]
    best = best_base([r for r in rows if not r["attack"].startswith("probe")])
    for r in probes:
      lines.append(f"- {model}: {r['variant']} AUC {r['auc']:.4f} "
                   f"(TPR@1%FPR {r['tpr_at_1pct_fpr']:.4f})"
                   + (f"; strongest loss attack {best['variant']} AUC "
                      f"{best['auc']:.4f}" if best else ""))
  ft = [r for r in tables.get("finetuned", []) if r["attack"].startswith(
      "probe")]
  ctrl = [r for r in tables.get("pretrained", []) if r["attack"].startswith(
      "probe")]
  if ft and ctrl:
    top, base = max(r["auc"] for r in ft), max(r["auc"] for r in ctrl)
    holds = top >= 0.6 and top - base >= 0.1
    lines.append(
        f"\nRule (fixed before the run): the claim holds here if a probe "
        f"variant reaches AUC >= 0.6 on the fine-tuned model and beats the "
        f"pretrained control by >= 0.1. Best probe AUC: fine-tuned "
        f"{top:.4f}, control {base:.4f} -> the claim "
        f"{'holds' if holds else 'does not hold'} here.")
  return "\n".join(lines)


def write_report(workdir: str, tables: dict[str, list[dict]],
                 seconds: float, num_shadows: int = 0) -> str:
  parts = ["# Fine-tuned text-to-image model: membership audit\n",
           f"Time taken (training, export, conversion, audits): "
           f"{seconds / 60:.1f} min.\n"]
  if num_shadows:
    parts.append(
        f"GSA rows: a classifier on per-tensor gradient norms, fitted on "
        f"{num_shadows} shadow fine-tune(s) of the pretrained model "
        f"(W/shadow*/: the target's fine-tuning recipe on public images "
        f"held out of pretraining, half as shadow members); the same "
        f"shadows serve every audited model. The shadows are full "
        f"fine-tunes, also for the LoRA target.\n")
  for model, rows in tables.items():
    best = best_base(rows)
    role = ("negative control: pretrained only, its members were never "
            "trained on" if model == "pretrained" else
            "target: LoRA fine-tuned on the members" if model.endswith("lora")
            else "target: fine-tuned on the members")
    parts.append(f"## {model} ({role})\n")
    if best:
      parts.append(f"Strongest base attack: {best['variant']}, AUC "
                   f"{best['auc']:.4f}.\n")
    parts.append(_table(rows) + "\n")
  parts += ["## The initial-noise probe\n", PROBE_CLAIM + "\n",
            probe_verdict(tables) + "\n"]
  path = os.path.join(workdir, "report.md")
  report.atomic_write_text(path, "\n".join(parts))
  return path


def check_config(cfg: ml_collections.ConfigDict) -> None:
  """Refuses a bad ``workers``, ``shadow.count`` or user-model setting
  before any work (`run_recipe` calls it before it writes to the workdir)."""
  _workers(cfg)
  shadow_count(cfg)
  _user_models(cfg)


def _user_models(cfg: ml_collections.ConfigDict
                 ) -> Optional[tuple[dict, dict, tuple[str, ...]]]:
  """``(models, data, shadow checkpoints)`` of a user's own folders (`:full`),
  checked; None when the recipe trains its own."""
  given = {m: cfg.models.get(m) for m in ("pretrained", "finetuned")}
  if not any(given.values()):
    return None
  missing = [f"audit.{k}" for k in ("members", "nonmembers", "captions")
             if not cfg.audit.get(k)]
  if missing or not all(given.values()):
    raise errors.UserError(
        "user models need both folders and the data",
        ", ".join(missing + [f"models.{m}" for m, v in given.items()
                             if not v]),
        "set models.pretrained, models.finetuned, audit.members, "
        "audit.nonmembers and audit.captions")
  for m, folder in given.items():
    if not os.path.isfile(os.path.join(folder, "model_index.json")):
      raise errors.UserError("not a diffusers pipeline folder (no "
                             "model_index.json)", f"models.{m}={folder}",
                             "give the folder save_pretrained wrote")
  for k in ("members", "nonmembers"):
    try:  # a missing file or a malformed spec, named by its config field
      data_spec.parse_spec(cfg.audit[k])
    except errors.UserError as e:
      raise errors.UserError(e.line(), f"audit.{k}") from e
  if not os.path.isfile(cfg.audit.captions):
    raise errors.MissingInputError(
        "no such file", f"audit.captions={cfg.audit.captions}",
        "give the id -> caption JSONL file")
  shadow_ckpts = tuple(cfg.audit.get("shadow_checkpoints") or ())
  if "gsa" in tuple(cfg.audit.attacks) and not shadow_ckpts:
    raise errors.UserError(
        "gsa on user models needs converted shadow fine-tunes",
        "audit.shadow_checkpoints",
        "fine-tune copies of the pretrained model on public images, "
        "convert each with experiments/convert.py --trained_on SPEC "
        "--held_out SPEC, and list them; or drop gsa from audit.attacks")
  data = {k: cfg.audit[k] for k in ("members", "nonmembers", "captions")}
  return given, data, shadow_ckpts


def _workers(cfg: ml_collections.ConfigDict) -> int:
  w = cfg.get("workers", 1)
  if isinstance(w, bool) or not isinstance(w, int) or w < 1:
    raise errors.UserError("workers must be a whole number >= 1",
                           f"workers={w!r}", "set --config.workers=1 (one "
                           "step at a time) or 2 (two processes at once)")
  return w


def run(cfg: ml_collections.ConfigDict, workdir: str, *, progress: bool = True
        ) -> common.RecipeResult:
  """Runs the recipe (see the module docstring)."""
  del progress  # the binaries print their own progress into commands.log
  t0 = time.time()
  check_config(cfg)  # also when called directly, not via run_recipe
  workdir = os.path.abspath(workdir)
  os.makedirs(workdir, exist_ok=True)
  user = _user_models(cfg)
  if user:  # a user's own folders: nothing is trained
    models, data, shadow_ckpts = user
  else:
    data_dir = os.path.join(workdir, "data")
    arrays = prepare_data(cfg, data_dir)
    models, shadows = train_models(cfg, workdir, arrays)
    shadow_ckpts = tuple(
        convert_shadow(sh, os.path.join(workdir, f"shadow{i}"))
        for i, sh in enumerate(shadows))
    data = {"members": os.path.join(data_dir, "members.npz"),
            "nonmembers": os.path.join(data_dir, "nonmembers.npz"),
            "captions": os.path.join(data_dir, "captions.jsonl")}
  # The audits are independent (`cfg.workers` at a time; GSA's shared
  # shadow-feature cache is filled by one of them while the others wait).
  audits = [functools.partial(audit_model, cfg, folder,
                              os.path.join(workdir, m), data, shadow_ckpts)
            for m, folder in models.items()]
  tables = dict(zip(models, processes.run_parallel(
      audits, _workers(cfg))))
  seconds = time.time() - t0
  path = write_report(workdir, tables, seconds, len(shadow_ckpts))
  dirs = [os.path.join(workdir, m, "audit") for m in models]
  return common.RecipeResult("finetune_t2i", tables["finetuned"], dirs,
                             {"tables": tables, "report": path,
                              "seconds": seconds})


__all__ = ["FASHION_CLASSES", "FashionMnistMissing", "PROBE_CLAIM",
           "load_fashion_mnist", "to_rgb", "make_captions",
           "split_positions", "prepare_data",
           "build_modules", "shadow_count", "shadow_specs", "Pretrained",
           "pretrain", "finetune_jobs", "finetune", "train_models",
           "convert_shadow", "audit_model", "best_base",
           "probe_verdict", "write_report", "check_config", "run"]


if __name__ == "__main__":  # one fine-tune, run by `train_models`
  from absl import app, flags  # pylint: disable=g-import-not-at-top
  # The compute flags are this module's arguments, not absl flags.
  app.run(_finetune_main, flags_parser=lambda a: (flags.FLAGS(a[:1]), a)[1])
