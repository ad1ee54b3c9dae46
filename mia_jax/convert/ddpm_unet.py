"""pytorch-ddpm (SecMI / PIA) checkpoints -> `mia_jax.models.ddpm_unet.DDPMUNet`.

Source: github.com/w86763777/pytorch-ddpm ``main.py`` writes
``torch.save({"net_model", "ema_model", "sched", "optim", "step", "x_T"})``
(``ckpt.pt``; SecMI/PIA trainers ``ckpt-step{n}.pt``, SecMI's attack expects
``checkpoint.pt`` beside an absl ``flagfile.txt``). Attacks use the EMA
weights. Bare state dicts (``torch.save(model.state_dict())``) are accepted.

The key table is generated from the architecture by `unet_layers`, which
enumerates every parametrised layer once with its Flax path, its pytorch-ddpm
name and its diffusers ``UNet2DModel`` name (the diffusers converter reuses
it), so both tables come from one description of the network.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Optional

import numpy as np

from mia_jax import errors
from mia_jax.convert import common
from mia_jax.convert import io as ckpt_io

TABLE_KEY = "time_embedding.timembedding.0.weight"
# torch's float32 exp differs from a correctly rounded one by 1 ulp on a few
# frequencies (see layers.ddpm_torch_timestep_table): <= 3.1e-5 at T = 1000.
# A genuinely different table (other T, layout, frequencies) is off by O(1).
TABLE_ATOL = 1e-4


@dataclasses.dataclass(frozen=True)
class Layer:
  """One parametrised layer of the UNet.

  Attributes:
    flax: path in the Flax params tree (``downblocks_3/attn/proj_q``).
    torch: pytorch-ddpm module name (``downblocks.3.attn.proj_q``).
    diffusers: diffusers UNet2DModel module name
      (``down_blocks.1.attentions.0.to_q``), or None if it has none.
    kind: ``"conv"``, ``"dense"``, ``"norm"`` or ``"attn_proj"``.
  """

  flax: str
  torch: str
  diffusers: Optional[str]
  kind: str


def unet_layers(config: dict[str, Any]) -> list[Layer]:
  """Every parametrised layer of a `DDPMUNet` config, in state-dict order.

  Args:
    config: a resolved DDPMUNet config (`ddpm_unet.resolve_config`).
  Returns:
    The layers (the frozen time table is not a layer; see `TABLE_KEY`).
  """
  ch, mult = config["ch"], tuple(config["ch_mult"])
  attn_levels = set(config["attn_levels"])
  nrb = config["num_res_blocks"]
  num_levels = len(mult)
  out: list[Layer] = []

  def add(flax, torch, diffusers, kind):
    out.append(Layer(flax, torch, diffusers, kind))

  def resblock(fl, tc, df, in_ch, out_ch, attn, df_attn):
    add(f"{fl}/block1_0", f"{tc}.block1.0", f"{df}.norm1", "norm")
    add(f"{fl}/block1_2", f"{tc}.block1.2", f"{df}.conv1", "conv")
    add(f"{fl}/temb_proj_1", f"{tc}.temb_proj.1", f"{df}.time_emb_proj",
        "dense")
    add(f"{fl}/block2_0", f"{tc}.block2.0", f"{df}.norm2", "norm")
    add(f"{fl}/block2_3", f"{tc}.block2.3", f"{df}.conv2", "conv")
    if in_ch != out_ch:
      add(f"{fl}/shortcut", f"{tc}.shortcut", f"{df}.conv_shortcut", "conv")
    if attn:
      add(f"{fl}/attn/group_norm", f"{tc}.attn.group_norm",
          f"{df_attn}.group_norm", "norm")
      for ours, theirs in (("proj_q", "to_q"), ("proj_k", "to_k"),
                           ("proj_v", "to_v"), ("proj", "to_out.0")):
        add(f"{fl}/attn/{ours}", f"{tc}.attn.{ours}", f"{df_attn}.{theirs}",
            "attn_proj")

  add("time_embedding/timembedding_1", "time_embedding.timembedding.1",
      "time_embedding.linear_1", "dense")
  add("time_embedding/timembedding_3", "time_embedding.timembedding.3",
      "time_embedding.linear_2", "dense")
  add("head", "head", "conv_in", "conv")

  chs = [ch]
  now = ch
  idx = 0
  for level, m in enumerate(mult):
    for j in range(nrb):
      df = f"down_blocks.{level}"
      resblock(f"downblocks_{idx}", f"downblocks.{idx}", f"{df}.resnets.{j}",
               now, ch * m, level in attn_levels, f"{df}.attentions.{j}")
      now = ch * m
      chs.append(now)
      idx += 1
    if level != num_levels - 1:
      add(f"downblocks_{idx}/main", f"downblocks.{idx}.main",
          f"down_blocks.{level}.downsamplers.0.conv", "conv")
      chs.append(now)
      idx += 1

  resblock("middleblocks_0", "middleblocks.0", "mid_block.resnets.0", now,
           now, True, "mid_block.attentions.0")
  resblock("middleblocks_1", "middleblocks.1", "mid_block.resnets.1", now,
           now, False, None)

  idx = 0
  for level in reversed(range(num_levels)):
    df = f"up_blocks.{num_levels - 1 - level}"
    for j in range(nrb + 1):
      in_ch = chs.pop() + now
      resblock(f"upblocks_{idx}", f"upblocks.{idx}", f"{df}.resnets.{j}",
               in_ch, ch * mult[level], level in attn_levels,
               f"{df}.attentions.{j}")
      now = ch * mult[level]
      idx += 1
    if level != 0:
      add(f"upblocks_{idx}/main", f"upblocks.{idx}.main",
          f"{df}.upsamplers.0.conv", "conv")
      idx += 1

  add("tail_0", "tail.0", "conv_norm_out", "norm")
  add("tail_2", "tail.2", "conv_out", "conv")
  return out


def _attn_proj_transform(source_layout: str, target_layout: str):
  """Weight transform between {conv1x1, linear} source and target layouts."""
  return {
      ("conv1x1", "conv1x1"): common.conv_oihw_to_hwio,
      ("conv1x1", "linear"): common.conv1x1_to_dense,
      ("linear", "linear"): common.linear_to_dense,
      ("linear", "conv1x1"): common.linear_to_conv1x1,
  }[(source_layout, target_layout)]


def layer_rules(layers: list[Layer], naming: str, attn_source_layout: str,
                attn_target_layout: str) -> list[common.Rule]:
  """Rules for ``weight``/``bias`` of every layer.

  Args:
    layers: from `unet_layers`.
    naming: ``"torch"`` (pytorch-ddpm names) or ``"diffusers"``.
    attn_source_layout: ``"conv1x1"`` ([C, C, 1, 1]) or ``"linear"`` ([C, C])
      attention projections in the checkpoint.
    attn_target_layout: the module's ``attn_proj``.
  """
  weight_fns = {
      "conv": ("kernel", common.conv_oihw_to_hwio),
      "dense": ("kernel", common.linear_to_dense),
      "norm": ("scale", common.identity),
      "attn_proj": ("kernel", _attn_proj_transform(attn_source_layout,
                                                   attn_target_layout)),
  }
  rules = []
  for layer in layers:
    src = getattr(layer, naming)
    if src is None:
      raise ValueError(f"layer {layer.flax} has no {naming} name")
    leaf, fn = weight_fns[layer.kind]
    rules.append(common.rule(f"{layer.flax}/{leaf}", f"{src}.weight", fn))
    rules.append(common.rule(f"{layer.flax}/bias", f"{src}.bias"))
  return rules


def _check_time_table(config: dict[str, Any]):
  from mia_jax.models import layers  # pylint: disable=g-import-not-at-top
  want = layers.ddpm_torch_timestep_table(config["num_timesteps"],
                                          config["ch"])

  def check(table: np.ndarray) -> None:
    if table.shape != want.shape:
      raise ValueError(
          f"frozen time table has shape {table.shape}, expected "
          f"{want.shape} = (num_timesteps, ch); set num_timesteps/ch to the "
          "checkpoint's T and ch")
    err = float(np.max(np.abs(table.astype(np.float64) - want)))
    if not err <= TABLE_ATOL:
      raise ValueError(
          f"frozen time table differs from the analytic pytorch-ddpm table "
          f"by {err:.3g} (> {TABLE_ATOL}); the module recomputes the table, "
          "so this checkpoint cannot be converted faithfully")
  return check


def pytorch_ddpm_key_table(config: dict[str, Any]) -> list[common.Rule]:
  """The strict key table for a resolved `DDPMUNet` config."""
  if config["time_embedding"] != "ddpm_torch":
    raise ValueError("pytorch-ddpm checkpoints use time_embedding="
                     f"'ddpm_torch', got {config['time_embedding']!r}")
  rules = layer_rules(unet_layers(config), "torch", "conv1x1",
                      config["attn_proj"])
  rules.append(common.drop(
      TABLE_KEY, _check_time_table(config),
      note="frozen sinusoid table; recomputed by the module"))
  return rules


# ------------------------------------------------------------ flagfiles

_INT_FLAGS = {"ch": "ch", "num_res_blocks": "num_res_blocks",
              "T": "num_timesteps"}
_LIST_FLAGS = {"ch_mult": "ch_mult", "attn": "attn_levels"}


def parse_flagfile(path: str | os.PathLike) -> tuple[dict[str, Any],
                                                     dict[str, Any]]:
  """Reads pytorch-ddpm's absl ``flagfile.txt``.

  Multi-valued flags (``--ch_mult``, ``--attn``) are written one value per
  line; comma-separated values are accepted too.

  Returns:
    ``(model_overrides, extras)``: DDPMUNet fields, and the schedule /
    training flags (``beta_1``, ``beta_T``, ``img_size``, ``mean_type``, ...).
  """
  model: dict[str, Any] = {}
  lists: dict[str, list[int]] = {}
  extras: dict[str, Any] = {}
  with open(path) as f:
    for raw in f:
      line = raw.strip()
      if not line.startswith("--") or "=" not in line:
        continue
      name, value = line[2:].split("=", 1)
      if name in _INT_FLAGS:
        model[_INT_FLAGS[name]] = int(value)
      elif name in _LIST_FLAGS:
        lists.setdefault(name, []).extend(
            int(v) for v in value.split(",") if v.strip())
      elif name == "dropout":
        model["dropout"] = float(value)
      else:
        extras[name] = value
  for name, values in lists.items():
    model[_LIST_FLAGS[name]] = tuple(values)
  return model, extras


# ------------------------------------------------------------ converter


def _select_state_dict(obj: Any, use_ema: bool, path: str):
  if isinstance(obj, dict) and ("ema_model" in obj or "net_model" in obj):
    key = "ema_model" if use_ema else "net_model"
    if key not in obj:
      raise ckpt_io.CheckpointReadError(
          f"{path!r} has no {key!r} entry (it has {sorted(obj)}); pass "
          f"use_ema={not use_ema} to use the other weights")
    return ckpt_io.tensor_dict(obj[key], f"{key!r} state dict"), key, obj
  if isinstance(obj, dict) and obj and all(
      isinstance(v, np.ndarray) for v in obj.values()):
    if not use_ema:
      # Asked for the raw weights of a file that holds one unnamed set: the
      # audit would be labelled with a choice that was never made.
      raise ckpt_io.CheckpointReadError(
          "--weights net: the checkpoint is a bare state dict with one set "
          "of weights (no 'net_model' / 'ema_model')", path,
          "drop --weights (the file's weights are converted as they are)")
    return obj, "state_dict", {}
  keys = sorted(obj)[:10] if isinstance(obj, dict) else type(obj).__name__
  raise ckpt_io.CheckpointReadError(
      f"{path!r} is neither a pytorch-ddpm checkpoint (a dict with "
      f"'net_model'/'ema_model') nor a bare state dict of tensors; got {keys}")


def convert_pytorch_ddpm(
    path: str | os.PathLike, *, use_ema: bool = True,
    model_config: dict[str, Any] | str | None = None,
    flagfile: str | os.PathLike | None = None,
) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
  """Converts a pytorch-ddpm / SecMI / PIA checkpoint.

  Args:
    path: ``ckpt.pt`` (``torch.save`` dict with ``net_model``/``ema_model``)
      or a bare state dict file.
    use_ema: take ``ema_model`` (what every attack uses) rather than
      ``net_model``. False is refused for a bare state dict.
    model_config: a `DDPMUNet` config dict or preset name. Default: the
      ``flagfile`` if given, else ``flagfile.txt`` beside ``path`` if present,
      else the ``"cifar10"`` preset.
    flagfile: an absl flagfile written by the training run. It (or
      ``flagfile.txt`` beside ``path``) is read whenever present, also with
      ``model_config``: its ``--beta_1``/``--beta_T`` give the schedule, a
      ``--mean_type`` other than epsilon is refused, and its architecture
      flags must agree with ``model_config``.
  Returns:
    ``(params, model_config, provenance)``: a params tree of float32 NumPy
    arrays for ``DDPMUNet(**model_config)``, the resolved JSON-able config
    and a provenance dict (source path, sha256, weights used, step, config
    source, and a ``"schedule"`` config for `schedules.from_config`).
  Raises:
    ConversionError: the checkpoint does not match the architecture (lists
      every missing / unexpected / mismatched key).
    UnsafeCheckpointError / CheckpointReadError: see `io`.
  """
  from mia_jax.models import ddpm_unet  # pylint: disable=g-import-not-at-top
  path = os.path.abspath(os.fspath(path))
  sha = ckpt_io.sha256_file(path)
  obj = ckpt_io.read_torch_checkpoint(path)
  state, weights, full = _select_state_dict(obj, use_ema, path)
  state = common.strip_prefix(state, "module.")
  common.check_finite(state, path)

  # The flagfile records the training run's schedule and prediction target
  # even when the architecture is given, so it is always read when present.
  if flagfile is None:
    beside = os.path.join(os.path.dirname(path), "flagfile.txt")
    flagfile = beside if os.path.isfile(beside) else None
  overrides: dict[str, Any] = {}
  extras: dict[str, Any] = {}
  if flagfile is not None:
    flagfile = os.path.abspath(os.fspath(flagfile))
    try:
      overrides, extras = parse_flagfile(flagfile)
    except ValueError as e:
      raise ckpt_io.CheckpointReadError(
          f"cannot parse the flagfile ({e})", flagfile,
          "pass the flagfile.txt the training run wrote") from None
    mean_type = extras.get("mean_type", "epsilon")
    if mean_type != "epsilon":
      raise ckpt_io.CheckpointReadError(
          f"the flagfile records mean_type={mean_type!r}", flagfile,
          "the attacks need an eps-predicting model (--mean_type=epsilon); "
          "an x0- or x_prev-predicting pytorch-ddpm model is not supported")
  if model_config is not None:
    config_source = (f"preset:{model_config}" if isinstance(model_config, str)
                     else "argument")
    try:
      config = ddpm_unet.resolve_config(model_config)
    except errors.UserError:
      raise
    except (TypeError, ValueError) as e:
      raise errors.UserError(f"invalid DDPMUNet model config ({e})",
                             str(model_config)[:200], "fix --preset / "
                             "--model_config") from None
    # A flagfile of another run (or of another architecture) beside the
    # checkpoint: its schedule would not be this model's either.
    conflicts = [f"{k}: flagfile {v}, model_config {config.get(k)}"
                 for k, v in sorted(overrides.items())
                 if k != "dropout" and _as_tuple(v) != _as_tuple(config.get(k))]
    if conflicts:
      raise ckpt_io.CheckpointReadError(
          f"the flagfile disagrees with the given model config ("
          f"{'; '.join(conflicts)})", flagfile, "drop --preset/--model_config"
          " to use the flagfile's architecture, or move the flagfile of "
          "another run away")
    if flagfile is not None:
      config_source += f"; schedule from flagfile:{flagfile}"
  elif flagfile is not None:
    config_source = f"flagfile:{flagfile}"
    config = ddpm_unet.resolve_config({"preset": "cifar10", **overrides})
  else:
    config_source = "preset:cifar10"
    config = ddpm_unet.resolve_config("cifar10")

  module = ddpm_unet.build_module(config)
  abstract = ddpm_unet.abstract_params(module)
  try:
    params = common.apply_key_table(state, pytorch_ddpm_key_table(config),
                                    abstract)
  except common.ConversionError as e:
    raise common.ConversionError(
        f"{path!r} ({weights}) does not match DDPMUNet config from "
        f"{config_source}; pass model_config= or flagfile= with the training "
        f"architecture.\n  {e}", missing=e.missing, unexpected=e.unexpected,
        mismatched=e.mismatched, duplicated=e.duplicated) from None

  try:
    schedule = {"kind": "linear", "num_timesteps": config["num_timesteps"],
                "beta_start": float(extras.get("beta_1", 1e-4)),
                "beta_end": float(extras.get("beta_T", 0.02))}
    resolution = int(extras["img_size"]) if "img_size" in extras else None
  except ValueError:
    raise ckpt_io.CheckpointReadError(
        "the flagfile's --beta_1 / --beta_T / --img_size is not a number",
        flagfile, "pass the flagfile.txt the training run wrote") from None
  from mia_jax import schedules  # pylint: disable=g-import-not-at-top
  try:
    schedules.from_config(schedule)
  except errors.UserError as e:
    raise errors.UserError(e.what, f"{flagfile or path}: {e.input}",
                           e.todo) from None
  provenance = {
      "format": "pytorch-ddpm",
      "converter": "mia_jax.convert.ddpm_unet.convert_pytorch_ddpm",
      "source": path,
      "sha256": sha,
      "weights": weights,
      "step": _as_int(full.get("step")),
      "config_source": config_source,
      "schedule": schedule,
      "schedule_source": (f"flagfile:{flagfile}" if flagfile is not None
                          else "assumed: no flagfile; pytorch-ddpm's "
                          "defaults --beta_1=1e-4 --beta_T=0.02"),
      "resolution": resolution,
      "num_tensors": len(state),
  }
  return params, _json_config(config), provenance


def _as_int(x: Any) -> Optional[int]:
  try:
    return int(np.asarray(x)) if x is not None else None
  except (TypeError, ValueError):
    return None


def _as_tuple(value: Any) -> Any:
  return tuple(value) if isinstance(value, (list, tuple)) else value


def _json_config(config: dict[str, Any]) -> dict[str, Any]:
  """Tuples -> lists so the config round-trips through JSON unchanged."""
  return {k: list(v) if isinstance(v, tuple) else v for k, v in config.items()}


__all__ = ["Layer", "unet_layers", "layer_rules", "pytorch_ddpm_key_table",
           "parse_flagfile", "convert_pytorch_ddpm", "TABLE_KEY"]
