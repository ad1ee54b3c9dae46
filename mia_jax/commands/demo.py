"""The offline demo: train a small DDPM on real images, audit it, give the verdict.

    python experiments/demo.py --workdir runs/demo

1. trains the digits target in the memorization regime of the published
   DDPM targets (`experiments/configs/train_digits.py:demo`: 96 of
   scikit-learn's 1,797 real 8x8 handwritten digits as members, each seen
   1,000 times; 1,342 non-members; 359 public reference images; fixed seed)
   -> runs/demo/train/target;
2. runs Naive, SecMI, PIA and PIAN with OMS depths 0..N on all members and
   non-members -> runs/demo/audit (scores.npz with per-sample p-values,
   metrics.json, verdict.json, roc.png, roc_log.png, score_hist.png,
   report.md, report.html);
3. prints the results table and the verdict (leakage level, strongest
   variant, model-free blind baseline, dataset-level test).

Both steps resume after a kill. Nothing is downloaded.

Installed, ``mia-jax demo`` runs this module with the same flags
(``python experiments/demo.py`` in a clone).
"""

import os

from absl import flags

from mia_jax import audit, cli, commands, report, train, verdict

_CONFIG = cli.define_config_file(
    "config", os.path.join(commands.REPO_ROOT, "experiments", "configs",
                           "train_digits.py:demo"),
    "Training config of the target (train_digits.py:demo_quick for a "
    "smoke run).",
    lock_config=False)
_WORKDIR = flags.DEFINE_string("workdir", "runs/demo", "Output directory.")
_ATTACKS = flags.DEFINE_list("attacks", ["naive", "secmi", "pia", "pian"],
                             "Attacks to run.")
_OMS_STEPS = flags.DEFINE_integer("oms_steps", 3, "Score OMS depths 0..N.")
_MAX_SAMPLES = flags.DEFINE_integer("max_samples", None,
                                    "Audit at most N members and N non-members.")
_BOOTSTRAP = flags.DEFINE_integer("bootstrap", 200, "Bootstrap resamples.")


def main(argv):
  del argv  # extra arguments are refused by `commands.run`
  cli.setup_logging()
  target = train.train(_CONFIG.value, f"{_WORKDIR.value}/train")
  cfg = audit.AuditConfig(
      checkpoint=target, output=f"{_WORKDIR.value}/audit",
      attacks=tuple(_ATTACKS.value), oms_steps=_OMS_STEPS.value,
      batch_size=128, max_samples=_MAX_SAMPLES.value,
      bootstrap=_BOOTSTRAP.value)
  rows = audit.run_audit(cfg)
  print("\nMembership inference on the digits DDPM "
        "(higher AUC = more leakage; oms<n> = n extra fixed-point steps)\n")
  print(report.format_table(rows))
  print("\n" + verdict.summary(cfg.output))
  print(f"\nmetrics: {cfg.output}/metrics.json  verdict: "
        f"{cfg.output}/verdict.json  plots: {cfg.output}/roc.png, "
        f"{cfg.output}/roc_log.png  report: {cfg.output}/report.html")


def run():
  """Runs this binary (`mia_jax.commands.run`)."""
  commands.run(__name__, main)
