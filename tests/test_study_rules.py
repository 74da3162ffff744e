"""What a study must declare before its verdicts can be cited: confirmation seeds, deviations, like-for-like rules."""

import subprocess
import sys

import pytest

from workbench.studies import StudyError, load_study

STUDY = """
name = "rules"
claims = ["C9"]
seeds = [0, 1, 2]
confirm_seeds = [100, 101, 102, 103, 104]

[[tasks]]
name = "bandit"
n_arms = 4

[budget]
steps = 2
batch_size = 8

[settings]
beta = 0.1
model = { n_layer = 1, n_embd = 16, n_head = 2 }

[[algorithms]]
name = "ppo"

[[algorithms]]
name = "grpo"

[[algorithms]]
name = "ppo"
label = "ppo_k3loss"
kl_in = "loss"
kl_estimator = "k3"

[[verdicts]]
claim = "C9"
metric = "reward/exact"
kind = "greater"
a = "grpo"
b = "ppo"
"""


def write(tmp_path, text: str):
    path = tmp_path / "rules.toml"
    path.write_text(text)
    return path


def test_raw_reward_between_grpo_and_ppo_is_refused_with_the_fix(tmp_path):
    """GRPO (k3 in the loss) vs PPO (k1 in the reward) on raw reward: exit 2, the rule named, the fix given."""
    path = write(tmp_path, STUDY)
    out = subprocess.run(
        [sys.executable, "-m", "workbench.cli", "run", str(path), "--results", str(tmp_path / "r")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 2, out.stderr
    assert "Traceback" not in out.stderr
    err = out.stderr
    assert str(path) in err and "verdicts[0] (reward/exact: grpo vs ppo)" in err
    assert "KL k3 in the loss" in err and "KL k1 in the reward" in err
    assert "objective/exact" in err and "kl/exact_to_optimal" in err and "confounded" in err
    assert not (tmp_path / "r" / "index.sqlite").exists()  # refused before anything was registered


@pytest.mark.parametrize(
    "change",
    [
        ('metric = "reward/exact"', 'metric = "objective/exact"'),  # the regularised objective: comparable
        ('metric = "reward/exact"', 'metric = "kl/exact_to_optimal"'),  # the distance to pi*: comparable
        ('b = "ppo"', 'b = "ppo_k3loss"'),  # PPO with GRPO's penalty: the same regulariser
        ('b = "ppo"', 'b = "ppo"\nconfounded = "declared: the reward gap is the point"'),
    ],
)
def test_like_for_like_or_declared_comparisons_pass(tmp_path, change):
    study = load_study(write(tmp_path, STUDY.replace(*change)))
    assert study.config.verdicts[0].b in ("ppo", "ppo_k3loss")


def test_different_regularisers_through_a_grid_or_beta_are_caught(tmp_path):
    # PPO at beta = 0 (no penalty) against PPO at beta = 0.1 (k1 in the reward): the penalty differs
    text = STUDY.replace(
        '[[algorithms]]\nname = "grpo"\n', '[[algorithms]]\nname = "grpo"\nsettings = { beta = 0.0 }\n'
    )
    with pytest.raises(StudyError, match="no KL penalty vs KL k1 in the reward"):
        load_study(write(tmp_path, text))
    # both without a penalty (beta = 0): raw reward compares like for like
    both = text.replace("[settings]\nbeta = 0.1", "[settings]\nbeta = 0.0")
    assert load_study(write(tmp_path, both))


@pytest.mark.parametrize(
    "old, new, message",
    [
        ("confirm_seeds = [100, 101, 102, 103, 104]\n", "", "confirm_seeds: required when the study has [[verdicts]]"),
        (
            "confirm_seeds = [100, 101, 102, 103, 104]",
            "confirm_seeds = [2, 100, 101, 102, 103]",
            "must not repeat exploration seeds",
        ),
        ("confirm_seeds = [100, 101, 102, 103, 104]", "confirm_seeds = [100, 100, 101, 102, 103]", "each seed once"),
        ('b = "ppo"', 'b = "ppo_k3loss"\nfailures = "worst"', "worst"),
        ('name = "rules"', 'name = "rules"\n[statistics]\nmin_seeds = 2', "min_seeds"),
    ],
)
def test_seed_and_rule_declarations_are_checked(tmp_path, old, new, message):
    assert old in STUDY
    with pytest.raises(StudyError, match=message.replace("[", r"\[").replace("]", r"\]")):
        load_study(write(tmp_path, STUDY.replace(old, new)))


def test_few_confirmation_seeds_warn_and_deviations_load(tmp_path):
    text = STUDY.replace("confirm_seeds = [100, 101, 102, 103, 104]", "confirm_seeds = [100, 101, 102]")
    text = text.replace('b = "ppo"', 'b = "ppo_k3loss"') + (
        '\n[[deviations]]\nwhat = "beta"\nfrom = 0.05\nto = 0.1\nwhy = "seen on seeds 0-2"\n'
    )
    study = load_study(write(tmp_path, text))
    assert any("insufficient seeds" in w for w in study.warnings)
    d = study.config.deviations[0]
    assert (d.what, d.from_, d.to, d.why) == ("beta", 0.05, 0.1, "seen on seeds 0-2")
    assert study.config.all_seeds == [0, 1, 2, 100, 101, 102]


def test_a_rule_side_that_pools_grid_points_is_refused(tmp_path):
    """Values from two grid points are not seeds of one condition: the rule must pin the grid point."""
    text = STUDY.replace('b = "ppo"', 'b = "ppo_k3loss"').replace(
        '[[algorithms]]\nname = "ppo"\n', '[[algorithms]]\nname = "ppo"\n', 1
    )
    text = text.replace("[settings]\nbeta = 0.1", "[grid]\nlr = [0.001, 0.003]\n\n[settings]\nbeta = 0.1")
    with pytest.raises(StudyError, match=r"verdicts\[0\]\.a: 'grpo' spans 2 tasks x grid points.*pin lr"):
        load_study(write(tmp_path, text))
    assert load_study(write(tmp_path, text.replace('b = "ppo_k3loss"', 'b = "ppo_k3loss"\nwhere = { lr = 0.001 }')))


def test_a_different_beta_is_a_different_regulariser(tmp_path):
    text = STUDY.replace('b = "ppo"', 'b = "ppo_k3loss"')
    text = text.replace('kl_estimator = "k3"\n', 'kl_estimator = "k3"\nsettings = { beta = 1.0 }\n')
    with pytest.raises(StudyError, match="beta 0.1 vs KL k3 in the loss, beta 1"):
        load_study(write(tmp_path, text))


def test_a_bad_grid_value_is_a_message_not_a_traceback(tmp_path):
    text = STUDY.replace('kl_estimator = "k3"\n', 'kl_estimator = "k3"\ngrid = { "algo.kl_estimator" = ["k9"] }\n')
    text = text.replace('b = "ppo"', 'b = "ppo_k3loss"')
    out = subprocess.run(
        [sys.executable, "-m", "workbench.cli", "run", str(write(tmp_path, text)), "--results", str(tmp_path / "r")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 2 and "Traceback" not in out.stderr and "k9" in out.stderr, out.stderr


def test_an_algorithm_with_tasks_runs_on_those_tasks_only_and_a_rule_must_name_one_of_them(tmp_path):
    """``tasks = [...]`` on an algorithm entry drops its runs on the other tasks; the verdict rule checks it."""
    from workbench.studies import expand

    two_tasks = STUDY.replace(
        '[[tasks]]\nname = "bandit"\nn_arms = 4\n',
        '[[tasks]]\nname = "bandit"\nn_arms = 4\nlabel = "b4"\n\n'
        '[[tasks]]\nname = "bandit"\nn_arms = 3\nlabel = "b3"\n',
    ).replace('b = "ppo"', 'b = "ppo_k3loss"\nwhere = { task = "b4" }')
    full = expand(load_study(write(tmp_path, two_tasks)))
    assert len(full) == 2 * 3 * 8  # tasks x algorithms x (3 + 5 seeds)
    only = two_tasks.replace('[[algorithms]]\nname = "grpo"\n', '[[algorithms]]\nname = "grpo"\ntasks = ["b4"]\n')
    plan = expand(load_study(write(tmp_path, only)))
    assert len(plan) == 2 * 3 * 8 - 8
    assert {(p.task_label, p.algo_label) for p in plan} == {
        ("b4", "ppo"),
        ("b3", "ppo"),
        ("b4", "grpo"),
        ("b4", "ppo_k3loss"),
        ("b3", "ppo_k3loss"),
    }
    # a run kept is the same run (same id) as without the restriction
    assert {p.run_id for p in plan} <= {p.run_id for p in full}
    with pytest.raises(StudyError, match=r"verdicts\[0\]\.a: 'grpo' does not run on task 'b3'"):
        load_study(write(tmp_path, only.replace('where = { task = "b4" }', 'where = { task = "b3" }')))
    with pytest.raises(StudyError, match=r"algorithms\[1\]\.tasks: unknown task label 'b5'; allowed: b4, b3"):
        load_study(write(tmp_path, only.replace('tasks = ["b4"]', 'tasks = ["b5"]')))
