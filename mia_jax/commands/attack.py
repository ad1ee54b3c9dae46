r"""Audits a checkpoint with membership inference attacks and OMS.

    python experiments/attack.py --checkpoint runs/digits/target \
        --attacks naive,secmi,pia,pian --oms_steps 2 --output runs/digits/audit

Members and non-members default to the ids recorded in the checkpoint by
training; otherwise pass ``--members SPEC --nonmembers SPEC`` (an .npz, an
image folder, or a tensorflow-datasets spec; see mia_jax/data). Writes
scores.npz, metrics.json, config.json, roc.png, roc_log.png and report.md /
report.html to --output and prints the table. Re-running the same command
after a kill resumes from the finished shards.

Installed, ``mia-jax attack`` runs this module with the same flags
(``python experiments/attack.py`` in a clone).
"""

from absl import flags, logging
import jax

from mia_jax import audit, cli, commands, compute, errors, report, verdict

_CONFIG = cli.define_config_file(
    "config", None, "Optional preset (e.g. experiments/configs/attack_sd.py): "
    "its keys are flag names (plus attack_overrides: {attack: {option: "
    "value}}), each honoured; flags given on the command line override it.")
_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "Checkpoint directory.")
_MEMBERS = flags.DEFINE_string(
    "members", None, "Member data spec; 'recorded' (or both left out) takes "
    "the set recorded in the checkpoint by training.")
_NONMEMBERS = flags.DEFINE_string(
    "nonmembers", None, "Non-member data spec; 'recorded' as for --members. "
    "Give both sides or neither (one side with the other 'recorded' is fine).")
_DROP_OVERLAP = flags.DEFINE_bool(
    "drop_overlap", False, "Drop samples whose pixels (and caption) are in two "
    "sets (members, non-members, reference) from all of them instead of "
    "refusing the run.")
_ATTACKS = flags.DEFINE_list("attacks", ["naive", "secmi", "pia", "pian"],
                             "Attacks (see mia_jax.attacks.PRESETS).")
_OMS_STEPS = flags.DEFINE_integer("oms_steps", 1, "Score OMS depths 0..N.")
_TIMESTEP = flags.DEFINE_integer("timestep", None,
                                 "Overrides every attack's preset timestep.")
_SEED = flags.DEFINE_integer("seed", 0, "Run seed.")
_BATCH_SIZE = flags.DEFINE_string(
    "batch_size", "auto", "Samples per call, or auto (the largest that fits "
    "the accelerator's free memory; 64 on CPU).")
cli.define_compute_flags()  # --dtype, --matmul_precision, --compilation_cache_dir
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


def main(argv):
  del argv  # extra arguments are refused by `commands.run`
  # The preset first: it may set any flag, --multihost and --dtype included.
  preset = cli.apply_preset(
      "config", [f.name for f in flags.FLAGS.get_key_flags_for_module(__name__)]
      + list(cli.COMPUTE_FLAGS), extra_keys=("attack_overrides",))
  cli.setup_logging()
  cli.maybe_initialize_distributed(_MULTIHOST.value)
  cli.apply_compute_flags()
  cfg = audit.AuditConfig(
      checkpoint=_CHECKPOINT.value, output=_OUTPUT.value,
      members=_MEMBERS.value, nonmembers=_NONMEMBERS.value,
      attacks=tuple(_ATTACKS.value), oms_steps=_OMS_STEPS.value,
      timestep=_TIMESTEP.value, seed=_SEED.value,
      batch_size=cli.parse_batch_size(str(_BATCH_SIZE.value)),
      max_samples=_MAX_SAMPLES.value, bootstrap=_BOOTSTRAP.value,
      reference=_REFERENCE.value, shadow_checkpoints=tuple(_SHADOWS.value),
      captions=_CAPTIONS.value, latent_sample=_LATENT_SAMPLE.value,
      drop_overlap=_DROP_OVERLAP.value,
      attack_overrides=audit.preset_overrides(
          preset.get("attack_overrides"), _ATTACKS.value))
  if not cfg.checkpoint or not cfg.output:
    raise errors.UserError("--checkpoint and --output are required",
                           "--checkpoint / --output",
                           "pass both (on the command line or in --config)")
  for option in _OPTIONS.value:
    name, key, value = audit.parse_attack_option(option)
    cfg.attack_overrides.setdefault(name, {})[key] = value
  audit.apply_scheme(cfg, _SCHEME.value)
  if compute.current().dtype == "bfloat16":
    for line in compute.bfloat16_warnings(cfg.attacks):
      logging.warning("--dtype bfloat16: %s", line)
  rows = audit.run_audit(cfg)
  if jax.process_index() == 0:
    print(report.format_table(rows))
    print("\n" + verdict.summary(cfg.output))
    print(f"\nrun directory: {cfg.output}")


def run():
  """Runs this binary (`mia_jax.commands.run`)."""
  commands.run(__name__, main)
