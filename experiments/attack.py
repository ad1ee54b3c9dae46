"""Audits a checkpoint with membership inference attacks and OMS.

    python experiments/attack.py --checkpoint runs/digits/target \
        --attacks naive,secmi,pia,pian --oms_steps 2 --output runs/digits/audit

Members and non-members default to the ids recorded in the checkpoint by
training; otherwise pass ``--members SPEC --nonmembers SPEC`` (an .npz, an
image folder, or a tensorflow-datasets spec; see mia_jax/data). Writes
scores.npz, metrics.json, config.json, roc.png, roc_log.png and report.md /
report.html to --output and prints the table. Re-running the same command
after a kill resumes from the finished shards.
"""

from absl import app, flags
import jax
from ml_collections import config_flags

from mia_jax import attacks, audit, cli, fixed_point, report, verdict

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Optional preset (e.g. experiments/configs/attack_sd.py); "
    "flags given on the command line override its values.")
_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "Checkpoint directory.")
_MEMBERS = flags.DEFINE_string("members", None, "Member data spec.")
_NONMEMBERS = flags.DEFINE_string("nonmembers", None, "Non-member data spec.")
_ATTACKS = flags.DEFINE_list("attacks", ["naive", "secmi", "pia", "pian"],
                             "Attacks (see mia_jax.attacks.PRESETS).")
_OMS_STEPS = flags.DEFINE_integer("oms_steps", 1, "Score OMS depths 0..N.")
_TIMESTEP = flags.DEFINE_integer("timestep", None,
                                 "Overrides every attack's preset timestep.")
_SEED = flags.DEFINE_integer("seed", 0, "Run seed.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 64, "Samples per call.")
_MAX_SAMPLES = flags.DEFINE_integer("max_samples", None,
                                    "Use at most N members and N non-members.")
_BOOTSTRAP = flags.DEFINE_integer("bootstrap", 200, "Bootstrap resamples.")
_REFERENCE = flags.DEFINE_string(
    "reference", None, "Public non-member data for fitted attacks (qr, gsa); "
    "defaults to the public ids recorded by training.")
_SHADOWS = flags.DEFINE_list("shadow_checkpoints", [],
                             "Shadow model checkpoints (gsa).")
_SCHEME = flags.DEFINE_string(
    "scheme", "plain", "Fixed-point scheme of the loss attacks' chains: plain "
    "(OMS), km:A (Krasnoselskii-Mann), ishikawa:A,B or anderson:M.")
_OPTIONS = flags.DEFINE_multi_string(
    "attack_option", [], "Per-attack option NAME.KEY=VALUE (VALUE parsed as "
    "JSON when it can be), e.g. pia.timestep=100, qr.head=gaussian, "
    "gsa.scaling=per_model, probe.sample_steps=100; repeatable.")
_CAPTIONS = flags.DEFINE_string(
    "captions", None, "Text-to-image models: captions file (id -> caption).")
_LATENT_SAMPLE = flags.DEFINE_bool(
    "latent_sample", False, "Latent models: encode with a posterior sample "
    "instead of the mean.")
_MULTIHOST = flags.DEFINE_bool(
    "multihost", False, "Call jax.distributed.initialize(): start the same "
    "command on every host with --output on a shared filesystem; each host "
    "scores its own batches, process 0 writes the outputs.")
_OUTPUT = flags.DEFINE_string("output", None, "Run directory.")


def _value(flag, key):
  """The flag's value if given on the command line, else the preset's."""
  preset = _CONFIG.value
  if flags.FLAGS[flag.name].present or preset is None or key not in preset:
    return flag.value
  value = preset[key]
  return tuple(value) if isinstance(value, (list, tuple)) else value


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  cli.setup_logging()
  cli.maybe_initialize_distributed(_MULTIHOST.value)
  preset = _CONFIG.value
  cfg = audit.AuditConfig(
      checkpoint=_CHECKPOINT.value, output=_OUTPUT.value,
      members=_MEMBERS.value, nonmembers=_NONMEMBERS.value,
      attacks=tuple(_value(_ATTACKS, "attacks")),
      oms_steps=_value(_OMS_STEPS, "oms_steps"),
      timestep=_TIMESTEP.value, seed=_SEED.value,
      batch_size=_value(_BATCH_SIZE, "batch_size"),
      max_samples=_MAX_SAMPLES.value,
      bootstrap=_BOOTSTRAP.value, reference=_REFERENCE.value,
      shadow_checkpoints=tuple(_SHADOWS.value), captions=_CAPTIONS.value,
      latent_sample=_LATENT_SAMPLE.value,
      attack_overrides=(preset.get("attack_overrides", {}).to_dict()
                        if preset is not None and "attack_overrides" in preset
                        else {}))
  for option in _OPTIONS.value:
    name, key, value = audit.parse_attack_option(option)
    cfg.attack_overrides.setdefault(name, {})[key] = value
  if _SCHEME.value != "plain":
    scheme = fixed_point.parse_scheme(_SCHEME.value)
    for name in cfg.attacks:  # preset aliases (naive_oms_paper, ...) too
      if attacks.takes_scheme(name):
        cfg.attack_overrides.setdefault(name, {})["scheme"] = scheme
  rows = audit.run_audit(cfg)
  if jax.process_index() == 0:
    print(report.format_table(rows))
    print("\n" + verdict.summary(cfg.output))
    print(f"\nrun directory: {cfg.output}")


if __name__ == "__main__":
  flags.mark_flags_as_required(["checkpoint", "output"])
  cli.run(main)
