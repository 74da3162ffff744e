"""Claims: each claim's verdict from the finished studies' reports, with its evidence and the report."""

from pathlib import Path

import pandas as pd
import streamlit as st
from board import data, ui

CLAIMS = {  # docs/claims.md, shortened
    "C1": "RL uses stochastic gradient estimates; SFT is ordinary gradient descent on fixed targets",
    "C2": "Policy gradients optimise non-differentiable rewards",
    "C3": "Policy gradients are high-variance and need variance reduction",
    "C4": "Sparse (last-token) reward makes credit assignment hard",
    "C5": "Process (step-level) rewards beat outcome rewards",
    "C6": "The KL-constrained RLHF objective reduces to a supervised loss (DPO) with optimum pi*",
    "C7": "RLHF is three phases: SFT, a Bradley-Terry reward model, then RL",
    "C8": "PPO for LLMs = token actions + KL penalty + value head + ratio clipping",
    "C9": "GRPO drops the value network and keeps the effectiveness",
    "C10": "Reasoning can emerge from pure RL on answer correctness",
    "C11": "Agentic RL is closer to classic RL: multi-step episodes, tools, sparse success",
    "C12": "Online RL learns from its own samples; DPO from a fixed batch",
    "C13": "Whether supervised learning can replace RL remains open",
    "C14": "GRPO's per-sequence length normalisation lengthens incorrect answers; Dr. GRPO's constant does not",
}
BADGE = {
    "supported": ":green-badge[supported]",
    "contradicted": ":red-badge[contradicted]",
    "inconclusive": ":orange-badge[inconclusive]",
    "unstable": ":orange-badge[unstable]",
    "incomplete": ":gray-badge[incomplete]",
    "insufficient seeds": ":gray-badge[insufficient seeds]",
    "not measured": ":gray-badge[not measured]",
}
PAGES = {"Compare": "views/compare.py"}
MEANS = {  # what a verdict says: about the study's rules, not the claim's wording
    "supported": "every rule of the study held",
    "contradicted": "a rule of the study failed",
    "inconclusive": "a rule's interval does not settle it",
    "unstable": "too many runs of a rule failed to judge it",
}

ctx = ui.current()
st.title("Claims")
st.caption(
    "Each study names the claims it tests; `workbench report STUDY` decides each one on the study's confirmation "
    "seeds (supported only if every rule is; otherwise incomplete, contradicted, unstable or inconclusive) with the "
    f"figure and interval that decided it, and writes `{ctx.root}/reports/STUDY/verdicts.json` beside the report. "
    "A claim is never supported by a run that did not measure it, nor by a failed run's earlier values. "
    "Each claim in full, with what measures it: docs/claims.md."
)

verdicts, issues = data.verdicts(ctx.root, data.reports_signature(ctx.root))
ui.show_issues([{"run_id": "-", **i} for i in issues], what="report")
studies = ctx.studies
tested = {c: [s for s, cl in zip(studies["name"], studies["claims"]) if c in cl] for c in CLAIMS}
rows = []
for c, text in CLAIMS.items():
    v = verdicts[verdicts["claim"] == c]
    rows.append(
        {
            "claim": c,
            "statement": text,
            "studies": ", ".join(tested[c]) or "-",
            "verdicts": ", ".join(f"{s}: {x}" for s, x in zip(v["study"], v["verdict"]))
            or ("no report yet" if tested[c] else "no study"),
        }
    )
overview = pd.DataFrame(rows)
st.table(overview.set_index("claim"))  # a static table wraps the statements (a data grid truncates them)
if len(verdicts):
    st.download_button(
        "Download all verdicts (CSV)",
        ui.csv_of(verdicts.drop(columns=["path", "rules"])),
        file_name="verdicts.csv",
        mime="text/csv",
        key="claims_download_csv",
    )

st.subheader(f"Study {ctx.study}")
row = studies[studies["name"] == ctx.study].iloc[0]
mine = verdicts[verdicts["study"] == ctx.study]
if not len(mine):
    done = int(row["done"] + row["diverged"])
    st.info(f"No report yet for {ctx.study} ({done}/{int(row['n_runs'])} runs finished).")
    st.markdown(f"Decide its claims ({', '.join(row['claims'])}) with:")
    st.code(f"workbench report {ctx.study} --results {ctx.root}", language="bash")
    st.stop()

report = mine["report"].dropna()
if len(report) and Path(report.iloc[0]).exists():
    path = Path(report.iloc[0])
    mime = {".pdf": "application/pdf", ".html": "text/html", ".md": "text/markdown"}.get(
        path.suffix, "application/octet-stream"
    )
    st.download_button(
        f"Download the report ({path.name})",
        path.read_bytes,  # read when clicked: a PDF is not sent with every visit
        file_name=f"{ctx.study}_{path.name}",
        mime=mime,
        key="claims_download_report",
        type="primary",
    )
st.caption(f"Report generated {mine['generated_at'].iloc[0] or '(time not recorded)'} · `{mine['path'].iloc[0]}`")
for i, v in mine.reset_index(drop=True).iterrows():
    with st.container(border=True):
        st.markdown(f"**{v['claim']}** {BADGE.get(v['verdict'], v['verdict'])} {CLAIMS.get(v['claim'], '')}")
        rules = v["rules"] or []
        said = "; ".join(r.get("statement") or r.get("metric") or "" for r in rules)
        if rules and v["verdict"] in MEANS:
            question = any(w in CLAIMS.get(v["claim"], "").lower() for w in ("remains open", "whether"))
            st.caption(
                ("The claim is an open question: " if question else "")
                + f"{v['verdict']} means {MEANS[v['verdict']]}: {said}"
            )
        if not rules:
            st.caption("No rule of the study measured this claim.")
        for j, r in enumerate(rules):
            est = r.get("estimate")
            lo, hi = r.get("ci_low"), r.get("ci_high")
            val = f" = {est:.4g}" if isinstance(est, (int, float)) and pd.notna(est) else ""
            ci = (
                f" (95% CI {lo:.4g} to {hi:.4g})"
                if all(isinstance(x, (int, float)) and pd.notna(x) for x in (lo, hi))
                else ""
            )
            st.markdown(
                f"{BADGE.get(r.get('verdict'), r.get('verdict'))} {r.get('statement') or ''}  \n"
                f"Evidence: `{r.get('metric')}`{val}{ci}" + (f", n = {r['n']}" if r.get("n") else "")
            )
            fig = r.get("figure")
            if fig and Path(fig).exists():
                with st.expander("the report's figure (static); open the metric in Compare to explore it"):
                    st.image(fig, width=480)
            if r.get("metric") and st.button(f"Open {r['metric']} in Compare", key=f"claims_goto_{i}_{j}"):
                st.session_state["compare_goto"] = r["metric"]
                # query_params={}: the default (None) clears every query parameter, and ?study= is bound to the
                # sidebar's picker, which makes Streamlit raise; the picker writes ?study= back on the next page
                st.switch_page(PAGES["Compare"], query_params={})
