#!/usr/bin/env bash
# Run every claim study at its default size, then its report; print each one's wall time and verdicts.
#   [SEEDS=confirm] bash scripts/claim_studies.sh [RESULTS_DIR] [STUDY ...]   (default: results/, every study; all seeds)
set -uo pipefail
cd "$(dirname "$0")/.."
results=${1:-results}; shift || true
names=("$@")
[ ${#names[@]} -gt 0 ] || names=($(ls studies/*.toml | xargs -n1 basename | sed 's/\.toml$//'))
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
for s in "${names[@]}"; do
  start=$(date +%s)
  .venv/bin/workbench run "studies/$s.toml" --workers 2 --results "$results" --quiet --seeds "${SEEDS:-all}" > "$results.$s.log" 2>&1
  rc=$?
  end=$(date +%s)
  .venv/bin/workbench report "$s" --results "$results" >> "$results.$s.log" 2>&1
  echo "$s: run exit $rc, $((end - start)) s of wall time, load $(cut -d' ' -f1-3 /proc/loadavg)"
  .venv/bin/python - "$results/reports/$s/verdicts.json" <<'PY'
import json, sys
d = json.load(open(sys.argv[1]))
for c, v in d["verdicts"].items():
    print(f"  {c}: {v}")
for r in d["rules"]:
    print(f"    {r['claim']} {r['verdict']:<18} {r['metric']} {r['a']}{' vs ' + r['b'] if r['b'] else ''} "
          f"{r.get('where') or ''} est {r['estimate']:.4g} [{r['ci_low']:.4g}, {r['ci_high']:.4g}] n {r['n']}")
PY
done
