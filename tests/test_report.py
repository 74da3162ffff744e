"""`workbench report`: a real small study's report builds, renders, decides from data and is stable."""

import hashlib
import json
from pathlib import Path

import pytest

from workbench.analysis.report import build_report
from workbench.cli import main
from workbench.executors import InlineExecutor
from workbench.study import load_study, run_study

STUDY = """
name = "tiny_report"
description = "PPO vs DPO on a bandit, tiny"
claims = ["C6", "C9"]
seeds = [0, 1, 2]

[[tasks]]
name = "bandit"
n_arms = 4

[budget]
steps = 12
batch_size = 16

[settings]
eval_every = 4
lr = 3e-3
model = { n_layer = 1, n_embd = 16, n_head = 2 }

[[algorithms]]
name = "ppo"

[[algorithms]]
name = "dpo"

[[verdicts]]
claim = "C6"
metric = "kl/exact_to_optimal"
kind = "below"
a = "dpo"
threshold = 100.0
statement = "trivially true: every seed is far below 100"

[[verdicts]]
claim = "C6"
metric = "kl/exact"
kind = "above"
a = "ppo"
threshold = -1.0
statement = "trivially true: a KL is never negative"

[[verdicts]]
claim = "C9"
metric = "grad/snr"
kind = "greater"
a = "ppo"
b = "dpo"
statement = "not measured by this study: must not get a verdict"
"""


@pytest.fixture(scope="module")
def report_dir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("report")
    (tmp / "tiny_report.toml").write_text(STUDY)
    run_study(load_study(tmp / "tiny_report.toml"), tmp / "results", InlineExecutor(), progress=False, quiet=True)
    assert main(["report", "tiny_report", "--results", str(tmp / "results"), "--out", str(tmp / "out")]) == 0
    return tmp


def test_report_files(report_dir):
    out = report_dir / "out"
    for f in ["report.md", "report.html", "report.pdf", "report.bib", "verdicts.json",
              "tables/final_metrics.csv", "tables/pairwise_tests.csv", "tables/runs.csv", "tables/verdict_rules.csv"]:  # fmt: skip
        assert (out / f).exists(), f
    pngs = sorted((out / "figures").glob("*.png"))
    assert pngs and all((out / "figures" / (p.stem + ".svg")).exists() for p in pngs)
    md = (out / "report.md").read_text()
    for section in ["## Verdicts", "## Final metrics", "## Pairwise tests", "## Provenance", "## How to cite", "CITATION.cff"]:
        assert section in md
    prov = json.loads(md.split("## Provenance\n```json\n")[1].split("```")[0])
    assert prov["seeds"] == [0, 1, 2] and len(prov["run_config_hashes"]) == 6 and "git_dirty" in prov
    assert prov["packages"]["torch"] and prov["budget_consumed"]["runs"] == 6
    bib = (out / "report.bib").read_text()
    assert bib.startswith("@misc{workbench_tiny_report_") and "C6, C9" in bib


def test_verdicts_are_computed_and_unmeasured_claims_get_none(report_dir):
    v = json.loads((report_dir / "out" / "verdicts.json").read_text())
    assert v["verdicts"] == {"C6": "supported", "C9": "not measured"}
    rules = {r["metric"]: r for r in v["rules"]}
    assert rules["grad/snr"]["verdict"] == "not measured"
    assert rules["kl/exact_to_optimal"]["ci_low"] <= rules["kl/exact_to_optimal"]["estimate"] <= rules["kl/exact_to_optimal"]["ci_high"]
    assert rules["kl/exact_to_optimal"]["figure"].startswith("figures/")


def test_html_is_self_contained_and_pdf_shows_every_figure(report_dir):
    import pypdfium2 as pdfium

    out = report_dir / "out"
    page = (out / "report.html").read_text()
    n_figs = len(list((out / "figures").glob("*.png")))
    assert page.count("<img ") == n_figs and page.count("data:image/png;base64,") == n_figs
    assert "src='figures/" not in page  # nothing external
    pdf = pdfium.PdfDocument(str(out / "report.pdf"))
    images = sum(1 for i in range(len(pdf)) for obj in pdf[i].get_objects() if obj.type == pdfium.raw.FPDF_PAGEOBJ_IMAGE)
    assert images == n_figs
    first = pdf[0].render(scale=1).to_pil()  # renders: a page with ink on it
    assert first.size[0] > 500 and len(set(first.convert("L").getdata())) > 10


def test_report_is_reproducible(report_dir, tmp_path):
    def digest(folder: Path):
        files = sorted(list((folder / "tables").glob("*.csv")) + list((folder / "figures").glob("*")))
        return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in files}

    again = build_report("tiny_report", report_dir / "results", tmp_path / "again")
    assert digest(again) == digest(report_dir / "out")
    assert (again / "report.bib").read_text() == (report_dir / "out" / "report.bib").read_text()


def test_report_of_unknown_study_exits_2(report_dir, capsys):
    assert main(["report", "nope", "--results", str(report_dir / "results")]) == 2
    assert "no study 'nope'" in capsys.readouterr().err
