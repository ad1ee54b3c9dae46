#!/usr/bin/env bash
# One command for a lent GPU: the test suite, the accelerator benchmark and an
# end-to-end audit of CIFAR-10 Table 1's size, in at most ~8 minutes.
#
#   OUT=/some/dir bash experiments/gpu_check.sh                 # on the GPU
#   GPU_CHECK_TINY=1 OUT=runs/gpu_check_cpu bash experiments/gpu_check.sh   # CPU dry run
#
# Missing pure-Python packages come from wheels in .gpu_wheels/ (see the
# README's Install section), installed with --no-deps into $GPU_CHECK_SITE
# only when the machine lacks them. Every part is bounded by `timeout` and
# writes what it measured under $OUT as it goes (JSON + logs), so a run cut
# off at a time limit still reports; $OUT/summary.json gathers the JSON.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/gpu_check}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
PY=${PYTHON:-python3}
TINY=${GPU_CHECK_TINY:-0}
SITE=${GPU_CHECK_SITE:-/tmp/mia_jax_site}
WORK=${GPU_CHECK_WORK:-/tmp/mia_jax_gpu_check}
mkdir -p "$WORK"
if [ "$TINY" = 1 ]; then
  TESTS=${TESTS:-tests/compute_test.py}; WORKERS=${WORKERS:-0}
  T_TESTS=${T_TESTS:-300}; T_BENCH=${T_BENCH:-300}; T_E2E=${T_E2E:-900}
  T_WARM=${T_WARM:-600}
  BENCH="--quick --time_budget_s=240"; MODEL=tiny; SAMPLES=${SAMPLES:-64}
  WARM_SAMPLES=16
else
  TESTS=${TESTS:-tests}; WORKERS=${WORKERS:-12}
  T_TESTS=${T_TESTS:-130}; T_BENCH=${T_BENCH:-140}; T_E2E=${T_E2E:-130}
  T_WARM=${T_WARM:-45}
  BENCH="--model=cifar10 --batch_size=256 --big_batch=1024 --reps=5 --time_budget_s=115"
  MODEL=cifar10; SAMPLES=${SAMPLES:-50000}; WARM_SAMPLES=2048
fi
PARTS=${PARTS:-tests,bench,e2e}  # a subset reruns only those parts
# Per-test limit: several tests compile a UNet training step in-process or
# run JAX subprocesses (40-130 s each on 2 busy CPU cores); a hung test is
# still bounded by T_TESTS.
T_TEST=${T_TEST:-300}
log() { echo "[gpu_check $(date +%T)] $*" | tee -a "$OUT/gpu_check.log"; }
START=$SECONDS

# 0. Packages the machine lacks, from the carried wheels.
if [ -d .gpu_wheels ]; then
  MISSING=$("$PY" - <<'EOF'
import glob, importlib.metadata, re
for whl in sorted(glob.glob(".gpu_wheels/*.whl")):
  dist = re.split(r"-\d", whl.split("/")[-1], maxsplit=1)[0]
  try:
    importlib.metadata.version(dist)
  except importlib.metadata.PackageNotFoundError:
    print(whl)
EOF
)
  if [ -n "$MISSING" ]; then
    log "installing into $SITE: $(echo $MISSING | tr '\n' ' ')"
    "$PY" -m pip install -q --no-index --no-deps --target "$SITE" $MISSING \
      > "$OUT/pip.log" 2>&1 || log "pip install failed (see pip.log)"
  fi
fi
export PYTHONPATH="$PWD:$SITE${PYTHONPATH:+:$PYTHONPATH}"
export XLA_PYTHON_CLIENT_PREALLOCATE=false
"$PY" - > "$OUT/environment.json" 2> "$OUT/environment.err" <<'EOF'
import json, sys, jax
try:
  import torch
  t = {"torch": torch.__version__, "cuda": torch.cuda.is_available()}
except Exception as e:  # pylint: disable=broad-except
  t = {"torch": f"unavailable: {e}"}
print(json.dumps({"python": sys.version, "jax": jax.__version__,
                  "devices": [str(d) for d in jax.devices()],
                  "kind": jax.devices()[0].device_kind, **t}, indent=2))
EOF
log "environment: $(tr -d '\n' < "$OUT/environment.json" | head -c 400)"

# (a) The test suite on the device. SIGINT first so pytest writes the
# junit XML and the failure list of what ran; -v streams results to the log.
if [[ $PARTS == *tests* ]]; then
log "tests: $TESTS, $WORKERS workers, at most ${T_TESTS}s"
XDIST=""; [ "$WORKERS" != 0 ] && XDIST="-n $WORKERS"
timeout -s INT -k 20 "$T_TESTS" "$PY" -m pytest -v -rfE --tb=short $XDIST \
  -p no:cacheprovider --timeout "$T_TEST" --junitxml="$OUT/junit.xml" $TESTS \
  > "$OUT/pytest.log" 2>&1
log "tests exit $?: $(grep -E '^(=+ .*(passed|failed|error).* =+)$' "$OUT/pytest.log" | tail -1)"
fi

# (b) The accelerator benchmark (its JSON is rewritten after every section).
if [[ $PARTS == *bench* ]]; then
log "benchmark, at most ${T_BENCH}s"
timeout -s INT -k 10 "$T_BENCH" "$PY" experiments/benchmark.py --accelerator \
  $BENCH --attacks=naive,secmi,pia,pian --oms_steps=0,1,2 \
  --compilation_cache_dir= --output="$OUT/benchmark_accel.json" \
  > "$OUT/benchmark.log" 2>&1
log "benchmark exit $?"
fi

# (c) End to end: Table 1's size (25k + 25k 32x32x3) on random weights,
# Naive/SecMI/PIA/PIAN with OMS 0..2 in bfloat16, cold cache, then a rerun
# on a warm cache (fewer samples: it measures compilation).
if [[ $PARTS == *e2e* ]]; then
log "e2e: making a random-weight $MODEL target and $SAMPLES samples"
E2E_START=$SECONDS
rm -rf "$WORK/target" "$WORK/members.npz" "$WORK/nonmembers.npz"
"$PY" experiments/gpu_check.py make_target --output="$WORK" --model="$MODEL" \
  --samples="$SAMPLES" > "$OUT/make_target.log" 2>&1 || log "make_target failed"
rm -rf "$WORK/xla_cache" "$WORK/audit_cold" "$WORK/audit_warm"
audit() {  # NAME TIMEOUT EXTRA_FLAGS...
  local name=$1 limit=$2; shift 2
  local s=$SECONDS
  timeout -s INT -k 10 "$limit" "$PY" experiments/attack.py \
    --checkpoint="$WORK/target" --members="$WORK/members.npz" \
    --nonmembers="$WORK/nonmembers.npz" --attacks=naive,secmi,pia,pian \
    --oms_steps=2 --dtype=bfloat16 --batch_size=auto --bootstrap=0 \
    --compilation_cache_dir="$WORK/xla_cache" --output="$WORK/$name" "$@" \
    > "$OUT/$name.log" 2>&1
  local rc=$?
  "$PY" - "$WORK/$name" "$OUT/$name.json" "$rc" "$((SECONDS - s))" <<'EOF'
import json, os, re, sys
run, dest, rc, wall = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
out = {"exit": rc, "wall_s": wall}
try:
  cfg = json.load(open(os.path.join(run, "config.json")))
  out.update(batch_size=cfg["batch_size"], compute=cfg.get("compute"))
  out["metrics"] = [{k: r[k] for k in ("variant", "auc", "queries_per_sample")}
                    for r in json.load(open(os.path.join(run, "metrics.json")))]
  text = open(os.path.join(run, "report.md")).read()
  m = re.search(r'"compile_s": ([0-9.]+)', text)
  out["compile_s"] = float(m.group(1)) if m else None
  m = re.search(r'"cache_hits": (\d+)', text)
  out["cache_hits"] = int(m.group(1)) if m else None
except Exception as e:  # pylint: disable=broad-except
  out["error"] = repr(e)
rates = re.findall(r"scored (\d+)/(\d+) samples, ([0-9.]+) samples/s",
                   open(dest[:-5] + ".log").read())
out["progress"] = rates[-3:]
json.dump(out, open(dest, "w"), indent=2)
print(json.dumps({k: v for k, v in out.items() if k != "metrics"}))
EOF
}
REMAIN=$((T_E2E - (SECONDS - E2E_START)))
log "audit_cold: $(audit audit_cold $((REMAIN > 30 ? REMAIN : 30)))"
# Same batch size as the cold run, so the programs are the cached ones.
BATCH=$("$PY" -c "import json,sys; print(json.load(open(sys.argv[1])).get('batch_size') or 'auto')" "$OUT/audit_cold.json" 2>/dev/null || echo auto)
log "audit_warm: $(audit audit_warm "$T_WARM" --max_samples=$((WARM_SAMPLES / 2)) --batch_size=$BATCH)"
fi
"$PY" experiments/gpu_check.py summarize --output="$OUT" > /dev/null 2>&1
log "done in $((SECONDS - START)) s; results in $OUT (summary.json)"
