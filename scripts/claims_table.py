"""Print the claims table of the README from the reports in a results folder.

    .venv/bin/python scripts/claims_table.py [RESULTS]      (default: results/)

One row per verdict rule of every report under RESULTS/reports/*/verdicts.json: the claim,
the study, the claim's verdict, the rule, its verdict, estimate and interval, seeds.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path


def fmt(x) -> str:
    return "n/a" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{x:.3g}"


def rule_text(r: dict) -> str:
    where = "".join(f" {k}={v}" for k, v in (r.get("where") or {}).items())
    sides = r["a"] + (f" vs {r['b']}" if r.get("b") else "")
    bound = {
        "below": f"< {r['threshold']}",
        "above": f"> {r['threshold']}",
        "greater": "a > b",
        "less": "a < b",
        "equivalent": f"\\|a - b\\| < {r['margin']}",
        "noninferior": f"a > b - {r['margin']}",
    }[r["kind"]]
    return f"`{r['metric']}` {sides}{where}: {bound}"


def main(results: str = "results") -> None:
    rows = []
    for path in sorted(Path(results, "reports").glob("*/verdicts.json")):
        doc = json.loads(path.read_text())
        for r in doc["rules"]:
            n = str(r["n_a"]) if r.get("n_b") is None else f"{r['n_a']}/{r['n_b']}"
            rows.append(
                (
                    r["claim"],
                    doc["study"],
                    doc["verdicts"][r["claim"]],
                    rule_text(r),
                    r["verdict"],
                    f"{fmt(r['estimate'])} [{fmt(r['ci_low'])}, {fmt(r['ci_high'])}]",
                    n,
                )
            )
    rows.sort(key=lambda x: (int(x[0][1:]), x[1]))
    print("| claim | study | claim verdict | rule | rule verdict | estimate [95% CI] | seeds |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main(*sys.argv[1:])
