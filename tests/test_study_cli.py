"""`workbench run | status | list`: bad study files exit 2 with a message, and the listings."""

import subprocess
import sys

import pytest
import torch

from workbench.cli import main

GOOD = """
name = "good"
claims = ["C6"]
seeds = [0]

[[tasks]]
name = "bandit"
n_arms = 4

[budget]
steps = 2
batch_size = 8

[settings]
model = { n_layer = 1, n_embd = 16, n_head = 2 }

[[algorithms]]
name = "grpo"
settings = { group_size = 4 }
"""


def bad(old: str, new: str) -> str:
    assert old in GOOD
    return GOOD.replace(old, new, 1)


CASES = {
    "unknown top-level key": (
        bad("seeds = [0]", "seeds = [0]\nseedz = [1]"),
        ["seedz: unknown key", "allowed here:", "algorithms", "budget", "seeds"],
    ),
    "unknown nested key": (
        bad("steps = 2", "stepz = 2"),
        ["budget.stepz: unknown key", "allowed here: batch_size, steps", "budget.steps: required key is missing"],
    ),
    "unknown task parameter": (bad("n_arms = 4", "n_arm = 4"), ["tasks[0].n_arm: unknown key", "n_arms", "n_contexts"]),
    "unknown algorithm parameter": (
        bad('name = "grpo"', 'name = "grpo"\nclip_epz = 0.1'),
        ["algorithms[0].clip_epz: unknown key", "clip_eps_low", "settings", "grid"],
    ),
    "unknown setting": (
        bad("[settings]", "[settings]\nlrr = 1e-3"),
        ["settings.lrr: unknown key", "allowed here:", "lr,"],
    ),
    "budget in settings": (bad("[settings]", "[settings]\nsteps = 5"), ["settings.steps: unknown key", "beta"]),
    "model per algorithm": (
        bad("settings = { group_size = 4 }", "settings = { model = { n_layer = 2 } }"),
        ["algorithms[0].settings.model: unknown key", "group_size"],
    ),
    "batch size per algorithm": (
        bad('name = "grpo"', 'name = "grpo"\nbatch_size = 4'),
        ["algorithms[0].batch_size: set by budget.batch_size"],
    ),
    "wrong type": (bad("steps = 2", 'steps = "many"'), ["budget.steps: Input should be a valid integer", "'many'"]),
    "wrong type in a task": (bad("n_arms = 4", 'n_arms = "four"'), ["tasks[0].n_arms:", "valid integer", "'four'"]),
    "out of range": (bad("steps = 2", "steps = 0"), ["budget.steps: Input should be greater than or equal to 1"]),
    "unknown task": (
        bad('name = "bandit"', 'name = "bandt"'),
        [
            "tasks[0].name: unknown task 'bandt'",
            "allowed: arithmetic, bandit, digit_sum, scratch_add, sequence, tool_use",
        ],
    ),
    "unknown algorithm": (
        bad('name = "grpo"', 'name = "grpx"'),
        ["algorithms[0].name: unknown algorithm 'grpx'", "dpo", "grpo", "ppo", "sft"],
    ),
    "unknown claim": (bad('claims = ["C6"]', 'claims = ["C99"]'), ["claims[0]:", "'C1'", "'C13'", "'C99'"]),
    "bad grid key": (
        bad("settings = { group_size = 4 }", 'settings = { group_size = 4 }\ngrid = { "algo.clip" = [1] }'),
        ["algorithms[0].grid.'algo.clip': not a key a grid can vary", "algo.clip_eps_low"],
    ),
    "a run that cannot resolve": (
        bad("batch_size = 8", "batch_size = 6"),
        ["algorithms[0] 'grpo'", "batch_size 6 must be a multiple of group_size 4"],
    ),
    "malformed TOML": (bad("steps = 2", "steps = = 2"), ["not valid TOML", "line"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_study_file_exits_2_with_a_message(case, tmp_path, capsys):
    text, fragments = CASES[case]
    path = tmp_path / "study.toml"
    path.write_text(text)
    code = main(["run", str(path), "--results", str(tmp_path / "results"), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2
    assert str(path) in err, err
    for f in fragments:
        assert f in err, f"{f!r} not in:\n{err}"
    assert "Traceback" not in err and len(err.splitlines()) <= 20  # one screen
    assert not (tmp_path / "results" / "runs").exists() or not any((tmp_path / "results" / "runs").iterdir())


def test_missing_study_file_exits_2_naming_it(tmp_path, capsys):
    (tmp_path / "real.toml").write_text(GOOD)
    missing = tmp_path / "typo.toml"
    assert main(["run", str(missing), "--results", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert f"{missing}: no such study file" in err and "real.toml" in err and "Traceback" not in err


def test_bad_study_file_from_a_real_process_has_no_traceback(tmp_path):
    path = tmp_path / "study.toml"
    path.write_text(bad("steps = 2", "stepz = 2"))
    p = subprocess.run(
        [sys.executable, "-m", "workbench.cli", "run", str(path), "--results", str(tmp_path / "r")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert p.returncode == 2 and "budget.stepz: unknown key" in p.stderr and "Traceback" not in p.stderr


def test_status_and_list_show_what_exists(tmp_path, capsys, monkeypatch):
    from workbench.studies import load_study, run_study
    from workbench.studies.executors import InlineExecutor

    results = tmp_path / "results"
    monkeypatch.setenv("WORKBENCH_RESULTS", str(results))
    assert main(["status"]) == 0 and "no results in" in capsys.readouterr().out
    path = tmp_path / "good.toml"
    path.write_text(GOOD)
    run_study(load_study(path), results, InlineExecutor(), progress=False, quiet=True)
    (tmp_path / "studies").mkdir()
    (tmp_path / "studies" / "later.toml").write_text(GOOD)

    assert main(["status"]) == 0
    out = capsys.readouterr().out
    assert "good" in out and "done" in out and out.splitlines()[2].split() == ["good", "1", "0", "0", "1", "0", "0"]
    assert main(["status", "good"]) == 0
    out = capsys.readouterr().out
    assert "grpo" in out and "2/2" in out and "16 completions" in out and "reward/exact" in out
    assert main(["status", str(path), "--results", str(results)]) == 0 and "grpo" in capsys.readouterr().out
    assert main(["status", "nope"]) == 2 and "no study 'nope'" in capsys.readouterr().err
    assert main(["list", "--studies", str(tmp_path / "studies"), "--runs"]) == 0
    out = capsys.readouterr().out
    assert "good" in out and "C6" in out and "1/1" in out and "later" in out and "not run" in out and "runs (1)" in out


def test_two_tables_that_make_the_same_run_are_an_error(tmp_path, capsys):
    path = tmp_path / "study.toml"
    path.write_text(GOOD + '\n[[algorithms]]\nname = "grpo"\nlabel = "again"\nsettings = { group_size = 4 }\n')
    assert main(["run", str(path), "--results", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "algorithms[1] 'again', seed 0 is the same run as" in err and "algorithms[0] 'grpo'" in err


def test_interrupted_run_prints_the_command_that_resumes_it_with_the_same_options(tmp_path, capsys, monkeypatch):
    import workbench.studies as studies

    def interrupted(*a, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(studies, "run_study", interrupted)
    path, results = tmp_path / "good.toml", tmp_path / "results"
    path.write_text(GOOD + "\n[sizes.small]\nbudget = { steps = 1 }\n")
    assert main(["run", str(path), "--results", str(results), "--quiet"]) == 130
    assert capsys.readouterr().err.strip().endswith(f"Run again to resume: workbench run {path} --results {results}")
    given = ["--size", "small", "--device", "cpu", "--seeds", "explore", "--workers", "9", "--no-stack"]
    assert main(["run", str(path), "--results", str(results), "--quiet", *given]) == 130
    err = capsys.readouterr().err.strip()
    assert err.endswith(
        f"workbench run {path} --size small --results {results} --device cpu --seeds explore --workers 9 --no-stack"
    ), err
    assert main(["run", str(path), "--results", str(results), "--stack", "4"]) == 130
    assert capsys.readouterr().err.strip().endswith(f"--results {results} --stack 4")


def test_the_default_stack_is_wider_on_cuda():
    from workbench.cli import DEFAULT_STACK, DEFAULT_STACK_CUDA, build_parser, default_stack

    assert (default_stack("cpu"), default_stack("cuda")) == (DEFAULT_STACK, DEFAULT_STACK_CUDA) == (16, 64)
    assert default_stack("auto") == (64 if torch.cuda.is_available() else 16)
    assert build_parser().parse_args(["run", "s.toml"]).stack is None  # None: the device's default
