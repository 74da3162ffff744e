"""The workbench dashboard: ``workbench dashboard [--results DIR] [--port P]``.

Reads the results store through ``workbench.results``'s loader only (never training code),
from ``$WORKBENCH_RESULTS`` (set by ``--results``), else ``./results``. Pages:

    Studies       every study and run, status and budget, live while running; open a run
    Compare       any metric over steps or samples, mean and 95% band over seeds
    Frontier      reward vs KL per method, with the exact pi* frontier
    Gradients     SNR, variance, cosine to the true gradient vs batch size; objectives' cosines
    Credit        exact vs estimated per-token advantages by position
    Convergence   where RL and supervised methods end at the same policy, and where they part
    Claims        each claim's verdict from the reports, with its evidence

Run by hand from the repository root, ``streamlit run dashboard/app.py`` reads
``.streamlit/config.toml`` there: 127.0.0.1 only, headless, usage statistics off.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the pages import board.*

import streamlit as st  # noqa: E402
from board import ui  # noqa: E402

st.set_page_config(page_title="workbench", page_icon="⚖️", layout="wide")
ui.prewarm()  # once per server: the chart stack (altair) imported in the background while the first page shows

PAGES = [
    st.Page("views/studies.py", title="Studies", icon=":material/table_view:", default=True),
    st.Page("views/compare.py", title="Compare", icon=":material/show_chart:"),
    st.Page("views/frontier.py", title="Frontier", icon=":material/scatter_plot:"),
    st.Page("views/gradients.py", title="Gradients", icon=":material/north_east:"),
    st.Page("views/credit.py", title="Credit", icon=":material/grid_on:"),
    st.Page("views/convergence.py", title="Convergence map", icon=":material/join:"),
    st.Page("views/claims.py", title="Claims", icon=":material/gavel:"),
]
nav = st.navigation(PAGES)
ctx = ui.sidebar()
if ctx is None:
    ui.empty_store(ui.data.results())
    st.stop()
st.session_state["ctx"] = ctx
ui.preload_frontend()
try:
    nav.run()
finally:
    ui.run_over()  # the background reads of the study start now (ui.prewarm_study)
