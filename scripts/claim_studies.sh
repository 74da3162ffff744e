#!/usr/bin/env bash
# Run every claim study, then its report; print each one's wall time and verdicts.
#   [SEEDS=confirm] [SIZE=gpu] bash scripts/claim_studies.sh [RESULTS_DIR] [STUDY ...]
# Defaults: results/, every study, all seeds, each study's default size. SIZE=<size> runs every study at the size
# its file declares in [sizes.<size>] (workbench run --size), under the name <study>@<size>: its report is
# RESULTS_DIR/reports/<study>@<size>/ and its log RESULTS_DIR.<study>@<size>.log.
set -uo pipefail
cd "$(dirname "$0")/.."
results=${1:-results}; shift || true
names=("$@")
[ ${#names[@]} -gt 0 ] || names=($(ls studies/*.toml | xargs -n1 basename | sed 's/\.toml$//'))
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
size=(); [ -n "${SIZE:-}" ] && size=(--size "$SIZE")
for s in "${names[@]}"; do
  name=$s; [ -n "${SIZE:-}" ] && name="$s@$SIZE"  # the study's name in the results at that size
  start=$(date +%s)
  .venv/bin/workbench run "studies/$s.toml" "${size[@]}" --workers 2 --results "$results" --quiet --seeds "${SEEDS:-all}" > "$results.$name.log" 2>&1
  rc=$?
  end=$(date +%s)
  .venv/bin/workbench report "$name" --results "$results" >> "$results.$name.log" 2>&1
  echo "$name: run exit $rc, $((end - start)) s of wall time, load $(cut -d' ' -f1-3 /proc/loadavg)"
  .venv/bin/python - "$results/reports/$name/verdicts.json" <<'PY'
import json, sys
d = json.load(open(sys.argv[1]))
for c, v in d["verdicts"].items():
    print(f"  {c}: {v}")
for r in d["rules"]:
    print(f"    {r['claim']} {r['verdict']:<18} {r['metric']} {r['a']}{' vs ' + r['b'] if r['b'] else ''} "
          f"{r.get('where') or ''} est {r['estimate']:.4g} [{r['ci_low']:.4g}, {r['ci_high']:.4g}] n {r['n']}")
PY
done
