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

from mia_jax import audit, cli, report

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
_OUTPUT = flags.DEFINE_string("output", None, "Run directory.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  cli.setup_logging()
  cfg = audit.AuditConfig(
      checkpoint=_CHECKPOINT.value, output=_OUTPUT.value,
      members=_MEMBERS.value, nonmembers=_NONMEMBERS.value,
      attacks=tuple(_ATTACKS.value), oms_steps=_OMS_STEPS.value,
      timestep=_TIMESTEP.value, seed=_SEED.value,
      batch_size=_BATCH_SIZE.value, max_samples=_MAX_SAMPLES.value,
      bootstrap=_BOOTSTRAP.value, reference=_REFERENCE.value,
      shadow_checkpoints=tuple(_SHADOWS.value))
  rows = audit.run_audit(cfg)
  print(report.format_table(rows))
  print(f"\nrun directory: {cfg.output}")


if __name__ == "__main__":
  flags.mark_flags_as_required(["checkpoint", "output"])
  app.run(main)
