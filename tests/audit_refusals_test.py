"""Nothing silently wrong: the audit refuses bad input before any work.

Each case checks the refusal, that its message names the input, and, for the
run directory, that nothing in it changed.
"""

import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np
from PIL import Image
import pytest

from mia_jax import audit, errors, rundir
from mia_jax.data import sources
from tests import toy_models

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
  return toy_models.save_tiny_checkpoint(
      str(tmp_path_factory.mktemp("ckpt") / "target"))


def _cfg(ckpt, out, **kw):
  base = dict(checkpoint=ckpt, output=str(out), attacks=("naive",),
              oms_steps=0, batch_size=4, max_samples=4, bootstrap=0)
  return audit.AuditConfig(**{**base, **kw})


def _snapshot(directory):
  """{relative path: bytes} of every file (None when the dir is absent)."""
  if not os.path.exists(directory):
    return None
  out = {}
  for root, _, files in os.walk(directory):
    for name in files:
      path = os.path.join(root, name)
      with open(path, "rb") as f:
        out[os.path.relpath(path, directory)] = f.read()
  out.pop(rundir.LOCK_NAME, None)  # the lock's own holder note

  return out


def _refuses(cfg, match):
  before = _snapshot(cfg.output)
  with pytest.raises(errors.UserError, match=match):
    audit.run_audit(cfg, progress=False)
  assert _snapshot(cfg.output) == before, "a refused run changed its output"


def _digits_npz(path, positions, ids=None, **extra):
  images = sources.load_digits_uint8()[positions]
  arrays = dict(images=images, **extra)
  if ids is not None:
    arrays["ids"] = np.asarray(ids)
  np.savez(path, **arrays)
  return str(path)


# --- membership ground truth -------------------------------------------------


def test_same_images_under_other_ids_are_refused(ckpt, tmp_path):
  members = _digits_npz(tmp_path / "m.npz", np.arange(0, 6), ids=np.arange(6))
  # Non-members: two of the member images again, under different ids.
  nonmembers = _digits_npz(tmp_path / "n.npz", np.array([100, 101, 2, 5]),
                           ids=np.array([900, 901, 902, 903]))
  _refuses(_cfg(ckpt, tmp_path / "run", members=members, nonmembers=nonmembers,
                max_samples=None),
           r"2 image\(s\) are both members and nonmembers.*2 = 902, 5 = 903")


def test_drop_overlap_drops_the_shared_images_from_both_sides(ckpt, tmp_path):
  members = _digits_npz(tmp_path / "m.npz", np.arange(0, 4), ids=np.arange(4))
  nonmembers = _digits_npz(tmp_path / "n.npz", np.array([100, 101, 102, 3]),
                           ids=np.array([900, 901, 902, 903]))
  cfg = _cfg(ckpt, tmp_path / "run", members=members, nonmembers=nonmembers,
             drop_overlap=True)
  audit.run_audit(cfg, progress=False)
  with np.load(tmp_path / "run" / "scores.npz") as z:
    assert z["ids"].tolist() == [0, 1, 2, 900, 901, 902]


def test_captions_are_part_of_the_content(ckpt, tmp_path):
  # Same pixels, different captions: different samples (text-to-image).
  members = _digits_npz(tmp_path / "m.npz", np.arange(0, 4), ids=np.arange(4),
                        captions=np.array(["a"] * 4))
  nonmembers = _digits_npz(tmp_path / "n.npz", np.arange(0, 4),
                           ids=np.arange(10, 14), captions=np.array(["b"] * 4))
  from mia_jax.data import integrity
  m, n = sources.NpzSource(members), sources.NpzSource(nonmembers)
  kept = integrity.check_sample_sets([("members", m, np.arange(4)),
                                      ("nonmembers", n, np.arange(4))])
  assert [len(v) for v in kept.values()] == [4, 4]


def test_ids_are_unique_when_neither_side_has_ids(ckpt, tmp_path):
  members = _digits_npz(tmp_path / "m.npz", np.arange(0, 4))
  nonmembers = _digits_npz(tmp_path / "n.npz", np.arange(100, 104))
  audit.run_audit(_cfg(ckpt, tmp_path / "run", members=members,
                       nonmembers=nonmembers), progress=False)
  with np.load(tmp_path / "run" / "scores.npz") as z:
    ids = z["ids"].tolist()
  assert len(set(ids)) == len(ids) == 8
  assert ids[0] == "members/0" and ids[4] == "nonmembers/0"


def test_one_sided_runs_need_the_other_side_named(ckpt, tmp_path):
  members = _digits_npz(tmp_path / "m.npz", np.arange(1000, 1004))
  _refuses(_cfg(ckpt, tmp_path / "run", members=members),
           "--nonmembers is missing.*--nonmembers recorded")
  _refuses(_cfg(ckpt, tmp_path / "run", nonmembers=members),
           "--members is missing")
  # Named explicitly and disjoint: runs against the recorded non-members.
  audit.run_audit(_cfg(ckpt, tmp_path / "ok", members=members,
                       nonmembers=audit.RECORDED), progress=False)
  # The recorded non-members (digits 40..79) overlap by content: refused.
  overlapping = _digits_npz(tmp_path / "o.npz", np.arange(40, 44))
  _refuses(_cfg(ckpt, tmp_path / "run", members=overlapping,
                nonmembers=audit.RECORDED), "both members and nonmembers")


# --- values accepted but meaningless ----------------------------------------


@pytest.mark.parametrize("kw,match", [
    (dict(timestep=-3), r"timestep -3 is out of range \(--timestep\).*0..999"),
    (dict(timestep=5000), r"timestep 5000 is out of range.*0..999"),
    (dict(timestep=2.5), r"timestep 2.5 is not an integer"),
    (dict(max_samples=-1), r"--max_samples must be an integer >= 2"),
    (dict(max_samples=0), r"--max_samples must be an integer >= 2"),
    (dict(max_samples=1), r"--max_samples must be an integer >= 2"),
    (dict(seed=-1), r"--seed must be an integer >= 0"),
    (dict(bootstrap=1), r"--bootstrap 1 gives a zero-width interval"),
    (dict(attack_overrides={"naive": {"p": 0}}), r"p must be a finite number > 0"),
    (dict(attack_overrides={"naive": {"p": -2}}), r"p must be a finite number > 0"),
    (dict(attack_overrides={"naive": {"p": "x"}}), r"p must be a finite number > 0"),
    (dict(attacks=("pia",), attack_overrides={"pia": {"p": 0.0}}),
     r"p must be a finite number > 0"),
    (dict(attacks=("secmi",), attack_overrides={"secmi": {"p": float("nan")}}),
     r"p must be a finite number > 0"),
    (dict(attack_overrides={"naive": {"scheme": "bogus"}}),
     r"bad scheme .*\(--attack_option naive.scheme\)"),
    (dict(members="digits:members:seed=-1", nonmembers="digits:nonmembers:seed=-1"),
     r"seed=-1 is negative"),
    (dict(bootstrap=-1), r"--bootstrap must be an integer >= 0"),
    (dict(batch_size=0), r"--batch_size must be an integer >= 1"),
    (dict(oms_steps=-1), r"--oms_steps must be an integer >= 0"),
    (dict(oms_steps=10**9), r"OMS depth 1000000000 is over the limit of 1000"),
    (dict(attack_overrides={"naive": {"oms_steps": 1e9}}),
     r"over the limit .*\(--attack_option naive.oms_steps"),
    (dict(attacks=()), r"no attack"),
    (dict(attacks=("naive", "")), r"no attack"),
    (dict(attacks=("naive", "naive")), r"named twice"),
    (dict(attacks=("nave",)), r"unknown attack 'nave'"),
    (dict(attack_overrides={"pia": {"timestep": 100}}),
     r"option for attack 'pia', which this run does not run"),
    (dict(attack_overrides={"naive": {"timstep": 100}}),
     r"attack naive has no option timstep"),
    (dict(attack_overrides={"naive": {"timestep": -3}}),
     r"timestep -3 is out of range \(naive timestep\)"),
    (dict(attack_overrides={"naive": {"timestep": 2.5}}),
     r"timestep 2.5 is not an integer"),
    (dict(attacks=("secmi",), attack_overrides={"secmi": {"timestep": 990}}),
     r"timestep 1000 is out of range \(secmi probe step"),
    (dict(attacks=("qr",), attack_overrides={"qr": {"timestep": 4000}}),
     r"timestep 4000 is out of range \(qr timestep\)"),
    (dict(attacks=("gsa",)), r"gsa needs shadow models"),
    (dict(attacks=("probe",), attack_overrides={"probe": {"sample_steps": 1001}}),
     r"probe sample_steps 1001 exceeds the 1000 timesteps"),
    (dict(attacks=("probe",), attack_overrides={"probe": {
        "timestep": 9, "inversion_steps": 11}}),
     r"probe inversion_steps 11 exceeds the 10 timesteps 0..9"),
])
def test_meaningless_values_are_refused_before_work(ckpt, tmp_path, kw, match):
  _refuses(_cfg(ckpt, tmp_path / "run", **kw), match)
  assert not os.path.exists(tmp_path / "run")


def test_output_must_be_a_directory_outside_the_checkpoint(ckpt, tmp_path):
  _refuses(_cfg(ckpt, ckpt), "inside a checkpoint")
  _refuses(_cfg(ckpt, os.path.join(ckpt, "audit")), "inside a checkpoint")
  (tmp_path / "file").write_text("x")
  _refuses(_cfg(ckpt, tmp_path / "file"), "is a file")


# --- the run directory -------------------------------------------------------


def test_refused_rerun_names_the_setting_and_changes_nothing(ckpt, tmp_path):
  cfg = _cfg(ckpt, tmp_path / "run")
  audit.run_audit(cfg, progress=False)
  _refuses(audit.AuditConfig(**{**cfg.__dict__, "seed": 1}),
           r"different run.*seed: 0 -> 1")
  _refuses(audit.AuditConfig(**{**cfg.__dict__, "oms_steps": 1}),
           r"different run.*oms_steps: 0 -> 1")


def test_metrics_only_change_and_a_moved_directory_reuse_the_shards(ckpt, tmp_path):
  cfg = _cfg(ckpt, tmp_path / "run", bootstrap=5)
  audit.run_audit(cfg, progress=False)
  shards = tmp_path / "run" / "shards"
  mtimes = {n: os.path.getmtime(shards / n) for n in os.listdir(shards)}
  rows = audit.run_audit(audit.AuditConfig(**{**cfg.__dict__, "bootstrap": 7}),
                         progress=False)
  assert rows[0]["bootstrap"] == 7
  assert json.load(open(tmp_path / "run" / "config.json"))["bootstrap"] == 7
  assert {n: os.path.getmtime(shards / n) for n in os.listdir(shards)} == mtimes
  shutil.move(tmp_path / "run", tmp_path / "moved")
  audit.run_audit(audit.AuditConfig(**{**cfg.__dict__,
                                       "output": str(tmp_path / "moved")}),
                  progress=False)
  moved = tmp_path / "moved" / "shards"
  assert {n: os.path.getmtime(moved / n) for n in os.listdir(moved)} == mtimes


def test_an_edited_shard_is_refused(ckpt, tmp_path):
  cfg = _cfg(ckpt, tmp_path / "run")
  audit.run_audit(cfg, progress=False)
  shard = tmp_path / "run" / "shards" / "shard_000000.npz"
  with np.load(shard) as z:
    arrays = {k: z[k] for k in z.files}
  arrays["naive_oms0"] = arrays["naive_oms0"] + 1.0  # a forged score
  np.savez(shard, **arrays)
  _refuses(cfg, "changed after it was written.*shard_000000.npz")


def test_a_second_run_on_a_locked_directory_refuses_at_once(ckpt, tmp_path):
  out = tmp_path / "run"
  holder = subprocess.Popen(
      [sys.executable, "-c",
       "import sys, time\nfrom mia_jax import rundir\n"
       f"with rundir.lock({str(out)!r}):\n"
       "  print('locked', flush=True)\n  time.sleep(120)\n"],
      cwd=ROOT, stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline().strip() == "locked"
    before = _snapshot(out)
    cli = subprocess.run(
        [sys.executable, os.path.join(ROOT, "experiments", "attack.py"),
         f"--checkpoint={ckpt}", f"--output={out}", "--attacks=naive",
         "--oms_steps=0", "--max_samples=2", "--batch_size=2", "--bootstrap=0"],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert cli.returncode == 2, cli.stderr[-2000:]
    last = cli.stderr.strip().splitlines()[-1]
    assert last.startswith("error: the run directory is in use by another run")
    assert f"pid {holder.pid}" in last and "Traceback" not in cli.stderr
    assert _snapshot(out) == before
  finally:
    holder.kill()
    holder.wait()
  # The lock died with its holder: the same command now runs.
  with rundir.lock(str(out)):
    pass


def test_a_refused_run_leaves_an_existing_lock_record_as_it_was(tmp_path):
  """The holder record names who wrote the results: a run refused while it
  held the lock restores it (any other error keeps its own, for forensics)."""
  out = tmp_path / "run"
  out.mkdir()
  (out / ".lock").write_text('{"pid": 1, "command": "the run that wrote it"}')
  before = _snapshot(out)
  with pytest.raises(errors.UserError):
    with rundir.lock(str(out)):
      assert "the run that wrote it" not in (out / ".lock").read_text()
      raise errors.UserError("refused", "--x", "fix it")
  assert _snapshot(out) == before
  with pytest.raises(RuntimeError):
    with rundir.lock(str(out)):
      raise RuntimeError("a bug")
  assert "the run that wrote it" not in (out / ".lock").read_text()


def test_two_attack_processes_on_one_output(ckpt, tmp_path):
  """Two real attack.py runs at once: one runs, the other refuses at once."""
  out = tmp_path / "run"
  cmd = [sys.executable, os.path.join(ROOT, "experiments", "attack.py"),
         f"--checkpoint={ckpt}", f"--output={out}", "--attacks=naive,pia",
         "--oms_steps=2", "--max_samples=40", "--batch_size=4", "--bootstrap=0"]
  first = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)
  deadline = time.time() + 120
  while not (out / ".lock").exists() or not (out / ".lock").read_text():
    assert time.time() < deadline and first.poll() is None
    time.sleep(0.05)
  second = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
  first_out, first_err = first.communicate(timeout=600)
  assert first.returncode == 0, first_err[-2000:]
  if second.returncode == 0:
    pytest.skip("the first run finished before the second started")
  assert second.returncode == 2 and "in use by another run" in second.stderr
  assert "Traceback" not in second.stderr
  config = json.load(open(out / "config.json"))
  with np.load(out / "scores.npz") as z:
    assert len(z["ids"]) == 80 and config["oms_steps"] == 2


# --- images -----------------------------------------------------------------


def test_sixteen_bit_png_is_read_at_its_true_range(tmp_path):
  wide = (np.arange(64, dtype=np.uint16).reshape(8, 8) * 1000)
  Image.fromarray(wide).save(tmp_path / "a.png")
  pixels = sources.FolderSource(tmp_path).get([0])[..., 0][0]
  np.testing.assert_array_equal(pixels, np.round(wide / 257.0).astype(np.uint8))
  assert pixels.max() < 255 and len(np.unique(pixels)) == 64  # not saturated


def test_unreadable_images_are_all_reported_before_scoring(ckpt, tmp_path):
  members, nonmembers = tmp_path / "m", tmp_path / "n"
  digits = sources.load_digits_uint8()
  for folder, start in ((members, 0), (nonmembers, 100)):
    folder.mkdir()
    for i in range(4):
      Image.fromarray(digits[start + i, ..., 0]).save(folder / f"{i}.png")
  good = (members / "1.png").read_bytes()
  (members / "1.png").write_bytes(good[:len(good) // 2])  # truncated
  buf = bytearray((nonmembers / "2.png").read_bytes())
  buf[60:80] = b"\0" * 20  # corrupt data stream
  (nonmembers / "2.png").write_bytes(bytes(buf))
  cfg = _cfg(ckpt, tmp_path / "run", members=str(members),
             nonmembers=str(nonmembers))
  with pytest.raises(errors.UserError) as info:
    audit.run_audit(cfg, progress=False)
  text = str(info.value)
  assert "cannot be read" in text and "1.png" in text
  assert not os.path.exists(tmp_path / "run")


def test_cli_prints_one_line_without_traceback(ckpt, tmp_path):
  cli = subprocess.run(
      [sys.executable, os.path.join(ROOT, "experiments", "attack.py"),
       f"--checkpoint={ckpt}", f"--output={tmp_path / 'run'}",
       "--timestep=-3"], cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert cli.returncode == 2
  assert "Traceback" not in cli.stderr
  assert cli.stderr.strip().splitlines()[-1].startswith(
      "error: timestep -3 is out of range (--timestep)")
  cli = subprocess.run(
      [sys.executable, os.path.join(ROOT, "experiments", "attack.py"),
       f"--checkpoint={ckpt}", f"--output={tmp_path / 'run'}",
       "--timestep=-3", "--traceback"], cwd=ROOT, capture_output=True,
      text=True, timeout=300)
  assert cli.returncode != 0 and "Traceback" in cli.stderr


def test_config_presets_are_honoured_or_refused(ckpt, tmp_path):
  preset = tmp_path / "preset.py"
  preset.write_text(
      "import ml_collections\n"
      "def get_config(arg=''):\n"
      "  c = ml_collections.ConfigDict()\n"
      "  c.attacks = ('naive',)\n  c.oms_steps = 0\n  c.seed = 5\n"
      "  c.max_samples = 2\n  c.batch_size = 2\n  c.bootstrap = 0\n"
      "  if arg == 'typo':\n    c.sed = 1\n"
      "  return c\n")
  cmd = [sys.executable, os.path.join(ROOT, "experiments", "attack.py"),
         f"--checkpoint={ckpt}"]
  ok = subprocess.run(cmd + [f"--config={preset}", f"--output={tmp_path / 'a'}"],
                      cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert ok.returncode == 0, ok.stderr[-2000:]
  assert json.load(open(tmp_path / "a" / "config.json"))["seed"] == 5
  bad = subprocess.run(cmd + [f"--config={preset}:typo",
                              f"--output={tmp_path / 'b'}"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert bad.returncode == 2 and "unknown key(s) ['sed']" in bad.stderr
  missing = subprocess.run(cmd + [f"--config={tmp_path / 'nope.py'}",
                                  f"--output={tmp_path / 'c'}"],
                           cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert missing.returncode == 2 and "Traceback" not in missing.stderr
  assert "cannot load the config file" in missing.stderr


@pytest.mark.parametrize("name,timestep", [("naive", -3), ("pia", 1000),
                                           ("secmi", 990), ("naive", 2.5)])
def test_every_caller_of_a_score_function_gets_the_timestep_check(name, timestep):
  """Recipes, sweeps, GSA and QR call score_fn directly: it checks too."""
  import jax
  from mia_jax import attacks, schedules
  sched = schedules.linear(1000)
  attack = attacks.build(name, lambda p, x, t, c=None: x, timestep=timestep,
                         oms_steps=0)
  x0 = np.zeros((2, 4, 4, 1), np.float32)
  keys = jax.random.split(jax.random.key(0), 2)
  with pytest.raises(errors.UserError, match="timestep|step"):
    attack.score_fn({}, sched, x0, keys)


@pytest.mark.parametrize("args,match", [
    (["--timesteps=abc"], r"'abc' is not an integer \(--timesteps\)"),
    (["--timesteps=50,-3"], r"timestep -3 is out of range \(--timesteps\)"),
    (["--timesteps=2.5"], r"'2.5' is not an integer \(--timesteps\)"),
    (["--num_samples=-1"], r"--num_samples must be an integer >= 1"),
    (["--pair_scales=0.1,x"], r"'x' is not a number \(--pair_scales\)"),
    (["--num_probes=1"], r"num_probes must be >= 2"),
])
def test_analyze_refuses_bad_flags_in_one_line(ckpt, tmp_path, args, match):
  out = tmp_path / "analysis"
  cli = subprocess.run(
      [sys.executable, os.path.join(ROOT, "experiments", "analyze.py"),
       f"--checkpoint={ckpt}", f"--output={out}", *args], cwd=ROOT,
      capture_output=True, text=True, timeout=300)
  assert cli.returncode == 2 and "Traceback" not in cli.stderr
  import re
  assert re.search(match, cli.stderr.strip().splitlines()[-1]), cli.stderr
  assert not out.exists()


@pytest.mark.parametrize("value", ["[5000]", "[1,x]", "[]", "[99,499,99]"])
def test_bad_gsa_timesteps_refused_before_any_write(ckpt, tmp_path, value):
  """Checked against the model's schedule before scoring, so the run
  directory stays untouched (not refused after the loss attacks ran)."""
  cfg = _cfg(ckpt, tmp_path / "run", attacks=("naive", "gsa"),
             shadow_checkpoints=(ckpt,))
  name, key, parsed = audit.parse_attack_option(f"gsa.timesteps={value}")
  cfg.attack_overrides[name] = {key: parsed}
  _refuses(cfg, "timestep")


@pytest.mark.parametrize("option,match", [
    (None, r"shadow .* was trained or held out on \d+ image"),
    ("gsa.classifier=forest", r"unknown classifier 'forest'"),
])
def test_gsa_inputs_refused_before_any_write(ckpt, tmp_path, option, match):
  """The target given as its own shadow (its recorded members are the
  evaluated ones: GSA would learn the labels) and a bad classifier are
  refused before config.json, not after the loss attacks ran."""
  cfg = _cfg(ckpt, tmp_path / "run", attacks=("naive", "gsa"),
             shadow_checkpoints=(ckpt,))
  if option:
    name, key, parsed = audit.parse_attack_option(option)
    cfg.attack_overrides[name] = {key: parsed}
  _refuses(cfg, match)


def test_a_presets_options_for_attacks_not_run_are_dropped_not_refused():
  # attack_sd.py gives timesteps for naive/secmi/pia/pian; `--attacks gsa`
  # with that config once failed on options the user never wrote.
  preset = {"naive": {"timestep": 500}, "pia": {"timestep": 500}}
  kept = audit.preset_overrides(preset, ("pia", "gsa"))
  assert kept == {"pia": {"timestep": 500}}
  kept["pia"]["timestep"] = 1  # a copy: the preset is not changed
  assert preset["pia"] == {"timestep": 500}
  assert audit.preset_overrides(None, ("gsa",)) == {}
  # A user's own option for an attack not run is still refused.
  cfg = audit.AuditConfig(checkpoint="c", output="o", attacks=("gsa",),
                          attack_overrides={"naive": {"timestep": 5}})
  with pytest.raises(errors.UserError, match="which this run does not run"):
    audit.check_attack_settings(cfg)


# --- the data boundary: ground truth against the checkpoint's record -------
# The toy checkpoint records digits 0..39 as members, 40..79 as non-members.


@pytest.mark.parametrize("members, nonmembers, match", [
    # The given members were held out from training.
    ("__npz__:40:44", "__npz__:1100:1104",
     r"4 of the given members are recorded in the checkpoint as non-members "
     r"\(held out\) \(same pixels; ids: 0, 1, 2, 3\) \(--members "),
    # Another seeded split of the data the model was trained on.
    ("digits:members:seed=0", "digits:nonmembers:seed=0",
     r"given (non)?members are recorded in the checkpoint as"),
    # Copies of trained-on images handed in as non-members.
    ("__npz__:1000:1004", "__npz__:0:4",
     r"4 of the given nonmembers are recorded in the checkpoint as members "
     r"\(trained on\)"),
    # A recorded member the --max_samples cut leaves out of the members.
    (audit.RECORDED, "__npz__:30:34", r"given nonmembers are recorded .* as "
     r"members"),
])
def test_sides_contradicting_the_recorded_split_are_refused(
    ckpt, tmp_path, members, nonmembers, match):
  def spec(text, name):
    if not text.startswith("__npz__"):
      return text
    start, stop = (int(v) for v in text.split(":")[1:])
    return _digits_npz(tmp_path / f"{name}.npz", np.arange(start, stop))
  _refuses(_cfg(ckpt, tmp_path / "run", members=spec(members, "m"),
                nonmembers=spec(nonmembers, "n")), match)


def test_float_images_cast_to_uint8_are_refused(ckpt, tmp_path):
  # x.astype(np.uint8) of images in [0, 1]: every pixel 0 or 1 (black).
  binary = (sources.load_digits_uint8()[100:104] > 127).astype(np.uint8)
  np.savez(tmp_path / "m.npz", images=binary)
  nonmembers = _digits_npz(tmp_path / "n.npz", np.arange(200, 204))
  _refuses(_cfg(ckpt, tmp_path / "run", members=str(tmp_path / "m.npz"),
                nonmembers=nonmembers),
           r"every members pixel is 0 or 1 .*cast to uint8")


def test_one_sample_on_a_side_is_refused_before_scoring(ckpt, tmp_path):
  members = _digits_npz(tmp_path / "m.npz", np.arange(1000, 1001))
  nonmembers = _digits_npz(tmp_path / "n.npz", np.arange(1100, 1110))
  _refuses(_cfg(ckpt, tmp_path / "run", members=members, nonmembers=nonmembers,
                max_samples=None),
           r"members set has 1 sample\(s\); the metrics .*need at least 2")
  np.savez(tmp_path / "r.npz", images=sources.load_digits_uint8()[1200:1201])
  members = _digits_npz(tmp_path / "m4.npz", np.arange(1000, 1004))
  _refuses(_cfg(ckpt, tmp_path / "run", members=members, nonmembers=nonmembers,
                attacks=("qr",), reference=str(tmp_path / "r.npz")),
           r"reference set has 1 sample")
  assert not os.path.exists(tmp_path / "run")


def test_captions_do_not_separate_samples_of_an_unconditional_model(
    ckpt, tmp_path):
  # The DDPM never reads captions: same pixels are the same sample.
  members = _digits_npz(tmp_path / "m.npz", np.arange(1000, 1004),
                        captions=np.array(["a"] * 4))
  nonmembers = _digits_npz(tmp_path / "n.npz", np.arange(1000, 1004),
                           ids=np.arange(10, 14), captions=np.array(["b"] * 4))
  _refuses(_cfg(ckpt, tmp_path / "run", members=members,
                nonmembers=nonmembers),
           r"4 image\(s\) are both members and nonmembers")
  (tmp_path / "c.json").write_text(json.dumps({str(i): "x" for i in range(4)}))
  _refuses(_cfg(ckpt, tmp_path / "run", members=members,
                nonmembers=_digits_npz(tmp_path / "o.npz",
                                       np.arange(1100, 1104)),
                captions=str(tmp_path / "c.json")),
           r"reads no captions \(--captions\)")


def test_reference_of_another_shape_is_refused(ckpt, tmp_path):
  members = _digits_npz(tmp_path / "m.npz", np.arange(1000, 1004))
  nonmembers = _digits_npz(tmp_path / "n.npz", np.arange(1100, 1104))
  big = np.repeat(np.repeat(sources.load_digits_uint8()[1200:1210], 2, 1), 2, 2)
  np.savez(tmp_path / "r.npz", images=big)
  _refuses(_cfg(ckpt, tmp_path / "run", members=members, nonmembers=nonmembers,
                attacks=("qr",), reference=str(tmp_path / "r.npz")),
           r"reference images are 16x16 but the model expects 8x8")


# --- the recorded split's content digest -------------------------------------


def _npz_target(tmp_path):
  """A checkpoint whose record names an .npz (ids 100..123) split 12/12."""
  from mia_jax import data
  npz = _digits_npz(tmp_path / "pool.npz", np.arange(24),
                    ids=np.arange(100, 124))
  record = data.training_record(f"{npz}:members:seed=1",
                                f"{npz}:nonmembers:seed=1")
  assert set(record["content_sha256"]) == {"members", "nonmembers"}
  return npz, toy_models.save_tiny_checkpoint(str(tmp_path / "target"),
                                              data=record)


def _edit_one_recorded(npz, ckpt, role):
  """Rewrites the .npz with one image of ``role`` changed, same ids."""
  from mia_jax import checkpoints
  recorded = checkpoints.read_metadata(ckpt)["data"][role]
  with np.load(npz) as f:
    images, ids = f["images"].copy(), f["ids"]
  row = int(np.flatnonzero(ids == recorded[0])[0])
  images[row] = 255 - images[row]
  np.savez(npz, images=images, ids=ids)


@pytest.mark.parametrize("role,kw", [
    ("members", {}),                                      # no sides given
    ("members", {"members": audit.RECORDED, "max_samples": None}),
    ("nonmembers", {"max_samples": None}),   # the audit's own hashes reused
])
def test_recorded_split_edited_since_training_is_refused(tmp_path, role, kw):
  npz, ckpt = _npz_target(tmp_path)
  _edit_one_recorded(npz, ckpt, role)
  cfg = _cfg(ckpt, tmp_path / "out", **kw)
  _refuses(cfg, rf"the recorded {role} are not the images the model was "
                rf"trained on.*\({ckpt}, recorded {role}\).*restore the data")
  assert not os.path.exists(tmp_path / "out" / "config.json")
  # The CLI's one line names the checkpoint, the role and what to do.
  from mia_jax import errors as errors_lib
  with pytest.raises(errors.UserError) as e:
    audit.run_audit(cfg, progress=False)
  line = errors_lib.one_line(e.value)
  assert "\n" not in line and "--members / --nonmembers explicitly" in line


def test_recorded_split_unchanged_or_given_explicitly_runs(
    tmp_path, caplog, monkeypatch):
  from mia_jax.data import integrity
  npz, ckpt = _npz_target(tmp_path)
  reads = []
  hashes = integrity.content_hashes
  monkeypatch.setattr(integrity, "content_hashes",
                      lambda *a, **k: reads.append(k["role"]) or hashes(*a, **k))
  # max_samples=4 verifies by reading the whole recorded sides again; the
  # whole sides reuse the hashes the audit's data check read.
  for name, kw, again in (("a", {}, ["recorded members", "recorded nonmembers"]),
                          ("b", {"max_samples": None}, [])):
    reads.clear()
    with caplog.at_level("WARNING"):
      audit.run_audit(_cfg(ckpt, tmp_path / name, **kw), progress=False)
    assert os.path.exists(tmp_path / name / "metrics.json")
    assert reads == again
  assert "could not be verified" not in caplog.text
  # Edited: the documented way out, both sides given, runs; the edited
  # record is not used to judge the given sides.
  _edit_one_recorded(npz, ckpt, "members")
  with caplog.at_level("WARNING"):
    audit.run_audit(_cfg(ckpt, tmp_path / "c", members=f"{npz}:members:seed=1",
                         nonmembers=f"{npz}:nonmembers:seed=1"), progress=False)
  assert "recorded members are not the images it was trained on" in caplog.text


def test_recorded_split_without_digest_runs_with_one_log_line(tmp_path, caplog):
  npz, ckpt = _npz_target(tmp_path)
  meta_path = os.path.join(ckpt, "model.json")
  meta = json.load(open(meta_path))
  del meta["data"]["content_sha256"]  # as written before the digest existed
  json.dump(meta, open(meta_path, "w"))
  _edit_one_recorded(npz, ckpt, "members")  # undetectable without it
  with caplog.at_level("WARNING"):
    audit.run_audit(_cfg(ckpt, tmp_path / "out"), progress=False)
  lines = [r.getMessage() for r in caplog.records
           if "could not be verified" in r.getMessage()]
  assert len(lines) == 1 and ckpt in lines[0], lines
