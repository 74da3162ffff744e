"""`workbench report`: a real small study's report builds, renders, decides from data and is stable."""

import hashlib
import json
from pathlib import Path

import pytest

from workbench.cli import main
from workbench.reporting.report import build_report
from workbench.studies import load_study, run_study
from workbench.studies.executors import InlineExecutor

STUDY = """
name = "tiny_report"
description = "PPO vs DPO on a bandit, tiny, and an SFT arm that diverges"
claims = ["C6", "C7", "C8", "C9"]
seeds = [0, 1, 2]
confirm_seeds = [3, 4, 5]

[statistics]
min_seeds = 3

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

[[algorithms]]
name = "sft"
label = "sft_diverges"
settings = { lr = 1e12 }   # the loss is non-finite at step 1: every run diverges after logging step 0

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

[[verdicts]]
claim = "C9"
metric = "kl/exact_to_optimal"
kind = "below"
a = "ppo"
threshold = 100.0
statement = "true, but the claim's other rule measured nothing: the claim is incomplete"

[[verdicts]]
claim = "C8"
metric = "reward/exact"
kind = "above"
a = "sft_diverges"
threshold = -1.0
statement = "true of the step-0 value the diverged runs logged, which must not count: unstable"

[[verdicts]]
claim = "C7"
metric = "reward/exact"
kind = "above"
a = "sft_diverges"
threshold = -1.0
failures = "worst"
worst = -5.0
statement = "a diverged run counts as -5: contradicted, never the pre-divergence reward"

[[deviations]]
what = "lr of sft_diverges"
from = 3e-3
to = 1e12
why = "to make every run of the arm diverge"
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
    for f in [
        "report.md",
        "report.html",
        "report.pdf",
        "report.bib",
        "verdicts.json",
        "tables/final_metrics.csv",
        "tables/pairwise_tests.csv",
        "tables/runs.csv",
        "tables/verdict_rules.csv",
    ]:
        assert (out / f).exists(), f
    pngs = sorted((out / "figures").glob("*.png"))
    assert pngs and all((out / "figures" / (p.stem + ".svg")).exists() for p in pngs)
    md = (out / "report.md").read_text()
    for section in [
        "## Verdicts (confirmation seeds)",
        "## The same rules on the exploration seeds",
        "## Final metrics",
        "## Tests within each task and grid point",
        "## Provenance",
        "## How to cite",
        "CITATION.cff",
        "intersection-union",
        "docs/claims.md#c6",
        "## Deviations declared by the study",
        "to make every run of the arm diverge",
    ]:
        assert section in md, section
    prov = json.loads(md.split("## Provenance\n```json\n")[1].split("```")[0])
    assert prov["seeds"] == [0, 1, 2, 3, 4, 5] and len(prov["run_config_hashes"]) == 18 and "git_dirty" in prov
    assert prov["packages"]["torch"] and prov["budget_consumed"]["runs"] == 18
    assert prov["exploration_seeds"] == [0, 1, 2] and prov["confirmation_seeds"] == [3, 4, 5]
    assert prov["study_file_sha256"] == hashlib.sha256(STUDY.encode()).hexdigest()
    bib = (out / "report.bib").read_text()
    assert bib.startswith("@misc{workbench_tiny_report_") and "C6, C7, C8, C9" in bib


def test_verdicts_are_computed_and_unmeasured_claims_get_none(report_dir):
    v = json.loads((report_dir / "out" / "verdicts.json").read_text())
    assert v["verdicts"] == {"C6": "supported", "C9": "incomplete", "C8": "unstable", "C7": "contradicted"}
    assert [r["verdict"] for r in v["rules"]] == [
        "supported",
        "supported",
        "not measured",
        "supported",
        "unstable",
        "contradicted",
    ]
    assert v["confirmation_seeds"] == [3, 4, 5] and all(r["n"] == 3 or r["verdict"] != "supported" for r in v["rules"])
    rules = {r["metric"]: r for r in v["rules"]}
    assert rules["grad/snr"]["verdict"] == "not measured"
    assert (
        rules["kl/exact_to_optimal"]["ci_low"]
        <= rules["kl/exact_to_optimal"]["estimate"]
        <= rules["kl/exact_to_optimal"]["ci_high"]
    )
    assert rules["kl/exact_to_optimal"]["figure"].startswith("figures/")


def test_html_is_self_contained_and_pdf_shows_every_figure(report_dir):
    import pypdfium2 as pdfium

    out = report_dir / "out"
    page = (out / "report.html").read_text()
    n_figs = len(list((out / "figures").glob("*.png")))
    assert page.count("<img ") == n_figs and page.count("data:image/png;base64,") == n_figs
    assert "src='figures/" not in page  # nothing external
    pdf = pdfium.PdfDocument(str(out / "report.pdf"))
    images = sum(
        1 for i in range(len(pdf)) for obj in pdf[i].get_objects() if obj.type == pdfium.raw.FPDF_PAGEOBJ_IMAGE
    )
    assert images == n_figs
    first = pdf[0].render(scale=1).to_pil()  # renders: a page with ink on it
    assert first.size[0] > 500 and len(set(first.convert("L").getdata())) > 10


def test_report_is_reproducible(report_dir, tmp_path):
    def digest(folder: Path):
        files = sorted(list((folder / "tables").glob("*.csv")) + list((folder / "figures").glob("*")))
        return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in files}

    (tmp_path / "again").mkdir()
    (tmp_path / "again" / "report.pdf").write_bytes(b"an earlier report's PDF")
    again = tmp_path / "again"  # --no-pdf: the same report less its PDF, and no stale PDF left beside it
    args = ["report", "tiny_report", "--results", str(report_dir / "results"), "--out", str(again), "--no-pdf"]
    assert main(args) == 0
    assert digest(again) == digest(report_dir / "out")
    assert (again / "report.bib").read_text() == (report_dir / "out" / "report.bib").read_text()
    assert not (again / "report.pdf").exists() and (again / "report.html").exists()
    first, second = (json.loads((d / "verdicts.json").read_text()) for d in (report_dir / "out", again))
    assert first.pop("report") == {**second.pop("report"), "pdf": "report.pdf"} and first == second


def test_report_of_unknown_study_exits_2(report_dir, capsys):
    assert main(["report", "nope", "--results", str(report_dir / "results")]) == 2
    assert "no study 'nope'" in capsys.readouterr().err


def test_a_diverged_arm_never_lends_its_pre_divergence_values(report_dir):
    """The diverged SFT runs logged a step-0 reward (the untrained policy's): no verdict, table or figure uses it."""
    import pandas as pd

    v = json.loads((report_dir / "out" / "verdicts.json").read_text())
    unstable, worst = v["rules"][4], v["rules"][5]
    assert (unstable["failed_a"], unstable["runs_a"], unstable["n_a"]) == (3, 3, 0)
    assert worst["estimate"] == -5.0 and worst["ci_low"] == worst["ci_high"] == -5.0
    runs = pd.read_csv(report_dir / "out" / "tables" / "runs.csv")
    bad = runs[runs["group"] == "sft_diverges"]
    assert (bad["status"] == "diverged").all() and bad["reward/exact"].isna().all()
    summary = pd.read_csv(report_dir / "out" / "tables" / "final_metrics.csv")
    assert set(summary.loc[summary["group"] == "sft_diverges", "diverged"]) == {6}
    assert summary.loc[summary["group"] == "sft_diverges", "mean"].isna().all()
    assert "3 of 3 failed or diverged, excluded" in (report_dir / "out" / "report.md").read_text()


def test_three_seeds_with_the_default_minimum_are_insufficient(report_dir, tmp_path):
    """The same runs under a study that keeps the default min_seeds = 5: every rule lacks seeds, no verdict."""
    strict = STUDY.replace('name = "tiny_report"', 'name = "tiny_strict"').replace("[statistics]\nmin_seeds = 3\n", "")
    (tmp_path / "tiny_strict.toml").write_text(strict)
    study = load_study(tmp_path / "tiny_strict.toml")
    assert any("insufficient seeds" in w for w in study.warnings)
    out = run_study(study, report_dir / "results", InlineExecutor(), progress=False, quiet=True)
    assert out.executed == []  # the same runs: done once, whatever study asks
    v = json.loads(
        (build_report("tiny_strict", report_dir / "results", tmp_path / "out") / "verdicts.json").read_text()
    )
    by = [r["verdict"] for r in v["rules"]]
    assert by == [
        "insufficient seeds",
        "insufficient seeds",
        "not measured",
        "insufficient seeds",
        "unstable",
        "insufficient seeds",
    ]
    assert v["verdicts"] == {"C6": "incomplete", "C9": "incomplete", "C8": "unstable", "C7": "incomplete"}


def test_verdicts_come_from_the_confirmation_seeds_only(report_dir, tmp_path, monkeypatch):
    """Exploration seeds that disagree (DPO far from pi* there) change the exploration table, not the verdict."""
    import workbench.reporting.report as store  # build_report looks load_final up there

    real = store.load_final

    def disagreeing(*args, **kwargs):
        df = real(*args, **kwargs)
        explore = (df["algo_label"] == "dpo") & df["seed"].isin([0, 1, 2])
        df.loc[explore, "kl/exact_to_optimal"] = 1000.0
        return df

    monkeypatch.setattr(store, "load_final", disagreeing)
    v = json.loads(
        (build_report("tiny_report", report_dir / "results", tmp_path / "out") / "verdicts.json").read_text()
    )
    assert v["rules"][0]["verdict"] == "supported" and v["rules"][0]["estimate"] < 100
    assert (
        v["exploration"]["rules"][0]["verdict"] == "contradicted" and v["exploration"]["rules"][0]["estimate"] == 1000.0
    )
    assert v["verdicts"]["C6"] == "supported" and v["exploration"]["verdicts"]["C6"] == "contradicted"
