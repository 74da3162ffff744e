"""Bad input is caught when a study or run is validated (issue 11, cases 6-10): exit 2 and a one-line
reason, or a warning, never a traceback at run time, and nothing registered or written."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from workbench.cli import main
from workbench.config import ConfigError, resolve
from workbench.results import metric_names
from workbench.studies import load_study

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--set", "model.n_layer=1", "--set", "model.n_embd=16", "--set", "model.n_head=2", "--quiet"]

GOOD = """
name = "good"
claims = ["C6"]
seeds = [0]

[[tasks]]
name = "bandit"
n_arms = 4

[budget]
steps = 1
batch_size = 8

[settings]
eval_every = 1
probe_every = 0
model = { n_layer = 1, n_embd = 16, n_head = 2 }

[[algorithms]]
name = "grpo"
settings = { group_size = 4 }
"""


def study(tmp_path: Path, text: str = GOOD, file: str = "study.toml") -> Path:
    path = tmp_path / file
    path.write_text(text)
    return path


def edit(old: str, new: str) -> str:
    assert old in GOOD
    return GOOD.replace(old, new, 1)


def run_cli(args: list[str], capsys) -> tuple[int, str]:
    code = main(args)
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return code, err


def assert_nothing_registered(results: Path) -> None:
    assert not (results / "index.sqlite").exists() and not (results / "runs").exists(), sorted(results.rglob("*"))


# -- 6. study names --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, why",
    [
        ("a" * 300, "at most 100 characters"),
        ("..", "should match pattern"),
        (".", "should match pattern"),
        ("../escape", "should match pattern"),
        ("-rf", "should match pattern"),
        ("", "should match pattern"),
    ],
)
def test_a_bad_study_name_exits_2_before_anything_is_registered(name, why, tmp_path, capsys):
    path = study(tmp_path, edit('name = "good"', f'name = "{name}"'))
    with pytest.raises(ConfigError, match=why):
        load_study(path)
    code, err = run_cli(["run", str(path), "--results", str(tmp_path / "results"), "--workers", "1", "--quiet"], capsys)
    assert code == 2 and "name:" in err and why in err
    assert len(max(err.splitlines(), key=len)) < 300  # the 300-character name is not echoed whole
    assert_nothing_registered(tmp_path / "results")


@pytest.mark.parametrize("file", ["..toml", "x" * 120 + ".toml"])
def test_a_file_name_that_cannot_name_the_study_needs_a_name(file, tmp_path):
    path = study(tmp_path, GOOD.replace('name = "good"\n', ""), file)
    with pytest.raises(ConfigError, match=r"name: the file name .* cannot name the study .*set name = "):
        load_study(path)
    assert load_study(study(tmp_path, GOOD, file)).name == "good"  # a name in the file is enough


def test_the_dotted_names_that_are_fine(tmp_path):
    for name in ("quickstart", "ppo_v1.2", "a-b", "_private", "x" * 100):
        assert load_study(study(tmp_path, edit('name = "good"', f'name = "{name}"'))).name == name


@pytest.mark.parametrize("cmd", ["report", "status"])
@pytest.mark.parametrize("name", ["..", ".", "a" * 300, "a b"])
def test_commands_taking_a_study_name_reject_one_no_study_can_have(cmd, name, tmp_path, capsys):
    from workbench.results import Store

    results = tmp_path / "results"
    Store(results).close()
    before = sorted(p.relative_to(results) for p in results.rglob("*"))
    code, err = run_cli([cmd, name, "--results", str(results)], capsys)
    assert code == 2 and "is not a study name" in err
    assert sorted(p.relative_to(results) for p in results.rglob("*")) == before  # nothing written into the results root


# -- 7. numbers: bounds, no inf or nan ----------------------------------------------------------------


@pytest.mark.parametrize(
    "sets, fragment",
    [
        (["--steps", "99999999999999999999"], "steps: Input should be less than or equal to"),
        (["--set", "lr=inf"], "lr: Input should be a finite number"),
        (["--set", "lr=Infinity"], "lr: Input should be a finite number"),
        (["--set", "beta=NaN"], "beta: Input should be a finite number"),
        (["--set", "algo.clip_eps=inf"], "algo.clip_eps: Input should be a finite number"),
        (["--set", "task.peak_width=nan"], "task.peak_width: Input should be a finite number"),
        (["--set", "eval_every=99999999999999999999"], "eval_every: Input should be less than or equal to"),
        (["--set", "batch_size=1000000000000"], "batch_size: Input should be less than or equal to"),
        (["--set", "model.n_embd=100000000"], "model.n_embd: Input should be less than or equal to"),
        (["--seed", "-1"], "seed: Input should be greater than or equal to 0"),
        (["--seed", "99999999999999999999"], "seed: Input should be less than or equal to"),
    ],
)
def test_train_rejects_unbounded_and_non_finite_numbers(sets, fragment, tmp_path, capsys):
    out = tmp_path / "run"
    code, err = run_cli(["train", "--task", "bandit", "--algo", "ppo", "--out", str(out), *TINY, *sets], capsys)
    assert code == 2 and fragment in err, err
    assert not out.exists()


@pytest.mark.parametrize(
    "old, new, fragment",
    [
        ("steps = 1", "steps = 99999999999999999999", "budget.steps: Input should be less than or equal to"),
        ("eval_every = 1", "eval_every = 1\nlr = inf", "settings.lr: Input should be a finite number"),
        ("eval_every = 1", "eval_every = 1\nbeta = nan", "settings.beta: Input should be a finite number"),
        (
            "settings = { group_size = 4 }",
            "settings = { group_size = 4, lr = inf }",
            "algorithms[0].settings.lr: Input should be a finite number",
        ),
        (
            'name = "grpo"',
            'name = "grpo"\nclip_eps_low = inf',
            "algorithms[0].clip_eps_low: Input should be a finite number",
        ),
        (
            "n_arms = 4",
            'n_arms = 4\nreward_shape = "peak"\npeak_width = inf',
            "tasks[0].peak_width: Input should be a finite number",
        ),
        ("seeds = [0]", "seeds = [0, 99999999999999999999]", "seeds[1]: Input should be less than or equal to"),
        ("[[algorithms]]", "[grid]\nlr = [1e-3, inf]\n\n[[algorithms]]", "lr: Input should be a finite number"),
    ],
)
def test_a_study_with_unbounded_or_non_finite_numbers_exits_2_before_registering(old, new, fragment, tmp_path, capsys):
    path = study(tmp_path, edit(old, new))
    code, err = run_cli(["run", str(path), "--results", str(tmp_path / "results"), "--workers", "1", "--quiet"], capsys)
    assert code == 2 and fragment in err, err
    assert_nothing_registered(tmp_path / "results")


# resolved with the code before these checks: validation must not change a run's config or its id
PINNED = {
    ("bandit", "sft"): "8b8e90cda9b2f90e",
    ("bandit", "rm"): "8abc60a21f5b8534",
    ("bandit", "reinforce"): "3949241ec45bea0f",
    ("bandit", "rloo"): "e5950cf17cfe58bc",
    ("bandit", "ppo"): "2af092784137383d",
    ("bandit", "grpo"): "5953c9d4ad0b668d",
    ("bandit", "dpo"): "3d850fea2114e9c8",
    ("bandit", "ipo"): "dfc0fcf1f0211e72",
    ("bandit", "online_dpo"): "980c6027487d82de",
    ("sequence", "sft"): "ea0a3623b97b3132",
    ("sequence", "rm"): "b7ecfb8b0f5921cf",
    ("sequence", "reinforce"): "abb806dde2c0b33e",
    ("sequence", "rloo"): "25e9cf1da521750f",
    ("sequence", "ppo"): "f2dfd45df4850432",
    ("sequence", "grpo"): "76f731f426b03393",
    ("sequence", "dpo"): "0df6297ed2475a87",
    ("sequence", "ipo"): "4de855e5d325757d",
    ("sequence", "online_dpo"): "a4a6e21598285d4c",
    ("arithmetic", "sft"): "30e0adc28deef82e",
    ("arithmetic", "rm"): "ecce90d37637fc31",
    ("arithmetic", "reinforce"): "9406b69f1620f875",
    ("arithmetic", "rloo"): "1af451df901de9e3",
    ("arithmetic", "ppo"): "71bc136cba9a1752",
    ("arithmetic", "grpo"): "ab7b6fef26ba348b",
    ("arithmetic", "dpo"): "ac7fabd1aa90d52f",
    ("arithmetic", "ipo"): "18f4fe5b66c93374",
    ("arithmetic", "online_dpo"): "86f531390a744b02",
}


def test_validation_leaves_configs_and_run_ids_unchanged():
    for (task, algo), h in PINNED.items():
        assert resolve({"task": {"name": task}, "algo": {"name": algo}}).config_hash == h, (task, algo)
    sets = {"steps": 50, "beta": 0.05, "seed": 3, "lr": 3e-4, "eval_every": 5, "task.n_arms": 4, "model.n_layer": 1}
    assert resolve({"task": {"name": "bandit"}, "algo": {"name": "ppo"}}, sets).config_hash == "4eedfe224dd9c50f"
    sets = {"probe_every": 10, "model.impl": "native", "algo.clip_eps": 1e9, "temperature": 0.7}
    assert resolve({"task": {"name": "bandit"}, "algo": {"name": "ppo"}}, sets).config_hash == "fddef854ef42e402"
    sets = {"reward_model": "fit", "sft_warmup_steps": 5}
    assert (
        resolve({"task": {"name": "sequence", "variant": "decisive"}, "algo": {"name": "grpo"}}, sets).config_hash
        == "0130ed5251e28304"
    )


# -- 8. checkpoint paths ---------------------------------------------------------------------------------


@pytest.mark.parametrize("key", ["model.path", "reward_model"])
def test_a_missing_checkpoint_path_exits_2_naming_the_key_and_the_path(key, tmp_path, capsys):
    missing = tmp_path / "no" / "checkpoint"
    out = tmp_path / "run"
    code, err = run_cli(
        ["train", "--task", "bandit", "--algo", "ppo", "--out", str(out), *TINY, "--set", f"{key}={missing}"], capsys
    )
    assert code == 2 and f"{key}: no such checkpoint folder: '{missing}'" in err, err
    assert "Repo id" not in err and not out.exists()
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match=f"{key}: .*has no config.json"):
        resolve({"task": {"name": "bandit"}, "algo": {"name": "ppo"}}, {key: str(tmp_path / "empty")})
    (tmp_path / "file").write_text("")
    with pytest.raises(ConfigError, match=f"{key}: .*is a file"):
        resolve({"task": {"name": "bandit"}, "algo": {"name": "ppo"}}, {key: str(tmp_path / "file")})


def test_reward_model_fit_is_a_keyword_and_a_real_checkpoint_passes(tmp_path):
    assert (
        resolve({"task": {"name": "bandit"}, "algo": {"name": "ppo"}}, {"reward_model": "fit"}).run.reward_model
        == "fit"
    )
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "config.json").write_text("{}")
    res = resolve(
        {"task": {"name": "bandit"}, "algo": {"name": "ppo"}}, {"reward_model": str(ckpt), "model.path": str(ckpt)}
    )
    assert res.run.model.path == str(ckpt) and res.run.reward_model == str(ckpt)


@pytest.mark.parametrize("setting", ['model = { path = "{p}" }', 'reward_model = "{p}"'])
def test_a_study_with_a_missing_checkpoint_exits_2_before_registering(setting, tmp_path, capsys):
    missing = str(tmp_path / "gone")
    path = study(tmp_path, edit("model = { n_layer = 1, n_embd = 16, n_head = 2 }", setting.replace("{p}", missing)))
    code, err = run_cli(["run", str(path), "--results", str(tmp_path / "results"), "--workers", "1", "--quiet"], capsys)
    key = "model.path" if "path" in setting else "reward_model"
    assert code == 2 and f"{key}: no such checkpoint folder: '{missing}'" in err, err
    assert_nothing_registered(tmp_path / "results")


# -- 9. verdict metrics no run logs --------------------------------------------------------------------------


def test_the_metric_list_is_the_one_in_docs_metrics_md():
    documented = metric_names.names_in_docs((ROOT / "docs" / "metrics.md").read_text())
    assert sorted(set(documented)) == sorted(set(metric_names.KNOWN) | set(metric_names.PATTERNS))
    assert metric_names.is_known("trl/entropy") and metric_names.is_known("credit/decisive_share_exact")
    assert not metric_names.is_known("trl/") and not metric_names.is_known("credit/share")
    assert metric_names.closest("reward/exactt")[0] == "reward/exact"
    assert (
        metric_names.closest("grad/exact_to_optimal")[0] == "kl/exact_to_optimal"
    )  # the right name under another prefix


VERDICTS = """
[[verdicts]]
claim = "C6"
metric = "{m0}"
kind = "below"
threshold = 0.1
a = "grpo"

[[verdicts]]
claim = "C6"
metric = "{m1}"
kind = "below"
threshold = 0.1
a = "grpo"

[report]
metrics = ["reward/exact", "{m2}"]
"""


def with_rules(m0: str, m1: str, m2: str) -> str:  # verdicts are decided on confirmation seeds
    return edit("seeds = [0]", "seeds = [0]\nconfirm_seeds = [100, 101, 102, 103, 104]") + VERDICTS.replace(
        "{m0}", m0
    ).replace("{m1}", m1).replace("{m2}", m2)


def test_an_unknown_verdict_metric_is_a_warning_with_the_closest_names(tmp_path):
    s = load_study(study(tmp_path, with_rules("kl/exact_to_optimall", "loss/sft", "credit/corr")))
    assert len(s.warnings) == 2, s.warnings
    assert (
        s.warnings[0].startswith("verdicts[0].metric: 'kl/exact_to_optimall' is not a metric")
        and "closest: kl/exact_to_optimal" in s.warnings[0]
    )
    assert "verdicts[1].metric: 'loss/sft' is logged only by sft, not by grpo" in s.warnings[1]
    s = load_study(study(tmp_path, with_rules("credit/corr", "trl/entropy", "reward/exct")))
    assert len(s.warnings) == 1 and s.warnings[0].startswith(
        "report.metrics[1]: 'reward/exct' is not a metric the workbench logs (docs/metrics.md); closest: reward/exact"
    )


def test_the_claim_studies_name_only_known_metrics():
    import tomllib

    for f in sorted((ROOT / "studies").glob("*.toml")):
        raw = tomllib.loads(f.read_text())
        used = [v["metric"] for v in raw.get("verdicts", [])] + raw.get("report", {}).get("metrics", [])
        assert [m for m in used if not metric_names.is_known(m)] == [], f.name


def test_workbench_run_prints_the_metric_warning_and_runs(tmp_path, capsys, monkeypatch):
    from workbench.studies import executors

    monkeypatch.setattr(executors, "LocalProcessExecutor", lambda n, preload=(): executors.InlineExecutor())
    path = study(tmp_path, with_rules("kl/exact_to_optimal", "reward/exactt", "kl/exact"))
    code, err = run_cli(["run", str(path), "--results", str(tmp_path / "results"), "--workers", "1", "--quiet"], capsys)
    assert code == 0, err
    assert (
        "warning:" in err
        and "verdicts[1].metric: 'reward/exactt' is not a metric" in err
        and "closest: reward/exact" in err
    )


# -- 10. `workbench report FILE` finds the study by its name ----------------------------------------------------


def test_report_of_a_study_file_uses_the_name_inside_it(tmp_path, capsys, monkeypatch):
    from workbench.reporting import report
    from workbench.results import Store

    results = tmp_path / "results"
    Store(results).close()
    path = study(tmp_path, GOOD, "file_stem_differs.toml")
    asked = []

    def fake_build_report(name, root, out, command=None, pdf=True):
        asked.append(name)
        out = Path(out or root / "reports" / name)
        out.mkdir(parents=True)
        (out / "verdicts.json").write_text(json.dumps({"verdicts": {"C6": "supported"}}))
        return out

    monkeypatch.setattr(report, "build_report", fake_build_report)
    code, err = run_cli(["report", str(path), "--results", str(results)], capsys)
    assert code == 0 and asked == ["good"], err
    code, err = run_cli(["report", "good", "--results", str(results), "--out", str(tmp_path / "r2")], capsys)
    assert code == 0 and asked == ["good", "good"], err


def test_bad_input_is_a_message_in_a_fresh_process_too(tmp_path):
    """The same checks end to end: the console script's own process, exit 2, no traceback."""
    cmd = [
        sys.executable,
        "-m",
        "workbench.cli",
        "train",
        "--task",
        "bandit",
        "--algo",
        "ppo",
        "--out",
        str(tmp_path / "x"),
        "--set",
        "lr=inf",
        "--quiet",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert (
        proc.returncode == 2 and "Traceback" not in proc.stderr and "lr: Input should be a finite number" in proc.stderr
    )
