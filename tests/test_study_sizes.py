"""Study sizes: ``[sizes.<size>]`` tables, ``workbench run STUDY --size SIZE`` and the ``<study>@<size>`` name.

Every study file in ``studies/`` declares a GPU size; it is checked here on CPU by resolution only
(load, merge, expand: no training). A tiny synthetic study is trained at a ``tiny`` size through the
command line, with the inline executor, to show that it runs, registers and reports under its own name.
"""

import json
import shutil
import tomllib
from pathlib import Path

import pytest

from workbench.cli import main
from workbench.config import ConfigError
from workbench.results import load_runs, load_studies
from workbench.studies import expand, legacy_plan, load_study
from workbench.studies.executors import InlineExecutor
from workbench.studies.plan import apply_size, sized_name, split_study_name, study_name_problem

STUDIES = sorted(Path(__file__).resolve().parents[1].joinpath("studies").glob("*.toml"))


# -- every study file's GPU size, by resolution only ---------------------------------------------


@pytest.mark.parametrize("path", STUDIES, ids=[p.stem for p in STUDIES])
def test_every_study_resolves_at_its_gpu_size(path):
    raw = tomllib.loads(path.read_text())
    assert "gpu" in raw.get("sizes", {}), f"{path.name}: no [sizes.gpu]"
    over = raw["sizes"]["gpu"]
    head = path.read_text().split("\n\n")[0]
    assert "[sizes.gpu]" in head and "--size gpu" in head, f"{path.name}: the header should point to [sizes.gpu]"

    default, gpu = load_study(path), load_study(path, size="gpu")
    assert default.size == "default" and default.name == raw.get("name", path.stem)
    assert gpu.size == "gpu" and gpu.name == f"{default.name}@gpu" and gpu.sizes == ["default", "gpu"]
    plan_default, plan_gpu = expand(default, "cpu"), expand(gpu, "cpu")
    ids_default, ids_gpu = {p.run_id for p in plan_default}, {p.run_id for p in plan_gpu}
    assert len(ids_gpu) == len(plan_gpu)
    assert not ids_default & ids_gpu, "a GPU-size run with the default size's config (and run id)"

    # the default size is the file as written
    assert {p.seed for p in plan_default} == set(raw["seeds"]) | set(raw.get("confirm_seeds", []))
    assert {p.res.run.steps for p in plan_default} == {raw["budget"]["steps"]}

    # the overrides are in the resolved configs
    seeds = set(over.get("seeds", raw["seeds"])) | set(over.get("confirm_seeds", raw.get("confirm_seeds", [])))
    assert {p.seed for p in plan_gpu} == seeds
    algos = {a.get("label", a["name"]): a for a in raw["algorithms"]}
    for key, value in over.get("budget", {}).items():
        assert {p.res.to_dict()[key] for p in plan_gpu} == {value}, key
    for key, values in over.get("grid", {}).items():
        assert {p.grid[key] for p in plan_gpu} == set(values), key
    for p in plan_gpu:
        cfg = p.res.to_dict()
        own = set(algos[p.algo_label].get("settings", {})) | set(p.grid)  # set per algorithm or by a grid point
        for key, value in over.get("settings", {}).items():
            if key == "model":
                assert {k: cfg["model"][k] for k in value} == value, p.name
                for k, v in raw["settings"].get("model", {}).items():  # the file's other model fields stay
                    if k not in value:
                        assert cfg["model"][k] == v, (p.name, k)
            elif key not in own:
                assert cfg[key] == value, (p.name, key)
        for key, value in over.get("tasks", {}).get(p.task_label, {}).items():
            assert cfg["task"][key] == value, (p.name, key)
        for key, value in over.get("algorithms", {}).get(p.algo_label, {}).items():
            if key not in ("settings", "grid"):
                assert cfg["algo"][key] == value, (p.name, key)
    # tasks the size leaves alone keep the file's parameters
    for t in raw["tasks"]:
        label = t.get("label", t["name"])
        if label not in over.get("tasks", {}):
            for p in (p for p in plan_gpu if p.task_label == label):
                assert all(p.res.to_dict()["task"][k] == v for k, v in t.items() if k not in ("name", "label"))


def test_the_gpu_sizes_are_wider_and_use_more_seeds():
    for path in STUDIES:
        default, gpu = load_study(path), load_study(path, size="gpu")
        d, g = expand(default, "cpu")[0].res.run, expand(gpu, "cpu")[0].res.run
        assert g.model.n_embd > d.model.n_embd and g.model.n_layer > d.model.n_layer, path.name
        assert g.steps > d.steps, path.name
        assert len(gpu.config.confirm_seeds) == 10 > len(default.config.confirm_seeds), path.name


# -- the size table: merging and validation ----------------------------------------------------------

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
eval_every = 1
save_checkpoint = false
model = { n_layer = 1, n_embd = 16, n_head = 2 }

[[algorithms]]
name = "grpo"
settings = { group_size = 4 }
"""

TINY = """
[sizes.tiny]
note = "two seeds, one step, a narrower model"
seeds = [0, 1]
budget = { steps = 1 }
settings = { model = { n_embd = 8 } }

[sizes.tiny.tasks.bandit]
n_arms = 3
"""


def test_apply_size_replaces_lists_and_merges_tables():
    raw = {
        "seeds": [0],
        "budget": {"steps": 2, "batch_size": 8},
        "settings": {"lr": 1e-3, "model": {"n_layer": 1, "n_head": 2, "impl": "native"}},
        "grid": {"beta": [0.1], "lr": [1e-3]},
        "tasks": [{"name": "bandit", "n_arms": 4}, {"name": "bandit", "label": "b2", "n_arms": 5}],
        "algorithms": [{"name": "ppo", "clip_eps": 0.2, "settings": {"lr": 3e-4}, "grid": {"algo.epochs": [1]}}],
        "sizes": {
            "big": {
                "note": "x",
                "confirm_seeds": [7],
                "budget": {"steps": 9},
                "settings": {"model": {"n_layer": 4}},
                "grid": {"beta": [0.2, 0.3]},
                "tasks": {"b2": {"n_arms": 50}},
                "algorithms": {"ppo": {"clip_eps": 0.1, "settings": {"temperature": 2.0}}},
            }
        },
    }
    before = json.dumps(raw)
    out = apply_size(raw, "big")
    assert json.dumps(raw) == before  # the file's table is not touched
    assert out["seeds"] == [0] and out["confirm_seeds"] == [7]
    assert out["budget"] == {"steps": 9, "batch_size": 8}
    assert out["settings"] == {"lr": 1e-3, "model": {"n_layer": 4, "n_head": 2, "impl": "native"}}
    assert out["grid"] == {"beta": [0.2, 0.3], "lr": [1e-3]}
    assert out["tasks"] == [{"name": "bandit", "n_arms": 4}, {"name": "bandit", "label": "b2", "n_arms": 50}]
    assert out["algorithms"] == [
        {"name": "ppo", "clip_eps": 0.1, "settings": {"lr": 3e-4, "temperature": 2.0}, "grid": {"algo.epochs": [1]}}
    ]


def test_names_at_a_size():
    assert sized_name("quickstart", "default") == "quickstart" and sized_name("quickstart", "gpu") == "quickstart@gpu"
    assert split_study_name("quickstart@gpu") == ("quickstart", "gpu")
    assert split_study_name("quickstart") == ("quickstart", "default")
    assert study_name_problem("quickstart@gpu") is None and study_name_problem("ppo_v1.2@big-2") is None
    for bad in ("quickstart@", "@gpu", "a@b@c", "a@../x", "a@" + "x" * 31, "a@.x"):
        assert study_name_problem(bad), bad


def write(tmp_path: Path, text: str, name: str = "good.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_a_study_at_a_size_is_the_file_with_the_size_merged(tmp_path):
    path = write(tmp_path, GOOD + TINY)
    default, tiny = load_study(path), load_study(path, size="tiny")
    assert (default.name, tiny.name, tiny.sizes) == ("good", "good@tiny", ["default", "tiny"])
    assert load_study(path, size="default").name == "good"
    plan = expand(tiny)
    assert sorted(p.seed for p in plan) == [0, 1]
    assert {(p.res.run.steps, p.res.run.model.n_embd, p.res.run.model.n_head, p.res.task.cfg.n_arms) for p in plan} == {
        (1, 8, 2, 3)
    }
    assert {p.res.run.steps for p in expand(default)} == {2}
    # the copy a run keeps in the results folder is named <study>@<size>.toml: it loads at that size
    assert load_study(write(tmp_path, GOOD + TINY, "good@tiny.toml")).name == "good@tiny"
    (tmp_path / "copy").mkdir()
    unnamed = write(tmp_path / "copy", GOOD.replace('name = "good"\n', "") + TINY, "good@tiny.toml")
    assert load_study(unnamed).name == "good@tiny" and len(expand(load_study(unnamed))) == 2


S = "\n[sizes.gpu]\n"
BAD_SIZES = {
    "unknown key": (S + "seedz = [1]\n", ["sizes.gpu.seedz: unknown key", "allowed here:", "confirm_seeds", "tasks"]),
    "unknown setting": (S + "settings = { lrr = 1e-3 }\n", ["sizes.gpu.settings.lrr: unknown key", "lr,"]),
    "budget in settings": (S + "settings = { steps = 5 }\n", ["sizes.gpu.settings.steps: unknown key"]),
    "unknown model field": (
        S + "settings = { model = { n_embdd = 32 } }\n",
        ["sizes.gpu.settings.model.n_embdd: unknown key", "n_embd"],
    ),
    "unknown budget key": (
        S + "budget = { stepz = 5 }\n",
        ["sizes.gpu.budget.stepz: unknown key", "batch_size, steps"],
    ),
    "wrong type": (S + 'budget = { steps = "many" }\n', ["sizes.gpu.budget.steps: Input should be a valid integer"]),
    "unknown task parameter": (
        "\n[sizes.gpu.tasks.bandit]\nn_arm = 64\n",
        ["sizes.gpu.tasks.bandit.n_arm: unknown key", "n_arms", "n_contexts"],
    ),
    "unknown task label": (
        "\n[sizes.gpu.tasks.bandt]\nn_arms = 64\n",
        ["sizes.gpu.tasks.bandt: no task labelled 'bandt'; task labels: bandit"],
    ),
    "bad task value": ("\n[sizes.gpu.tasks.bandit]\nn_arms = -1\n", ["sizes.gpu.tasks.bandit.n_arms:"]),
    "unknown algorithm parameter": (
        "\n[sizes.gpu.algorithms.grpo]\nclip_epz = 0.1\n",
        ["sizes.gpu.algorithms.grpo.clip_epz: unknown key", "clip_eps", "settings", "grid"],
    ),
    "unknown algorithm label": (
        "\n[sizes.gpu.algorithms.ppo]\nclip_eps = 0.1\n",
        ["sizes.gpu.algorithms.ppo: no algorithm labelled 'ppo'; algorithm labels: grpo"],
    ),
    "model per algorithm": (
        "\n[sizes.gpu.algorithms.grpo]\nsettings = { model = { n_layer = 2 } }\n",
        ["sizes.gpu.algorithms.grpo.settings.model: unknown key"],
    ),
    "bad algorithm grid key": (
        '\n[sizes.gpu.algorithms.grpo]\ngrid = { "algo.clip" = [1] }\n',
        ["sizes.gpu.algorithms.grpo.grid.'algo.clip': not a key a grid can vary"],
    ),
    "bad size name": ('\n[sizes."g@pu"]\nseeds = [1]\n', ["sizes.g@pu: a size name is letters, digits"]),
    "the default size": ("\n[sizes.default]\nseeds = [1]\n", ["sizes.default: 'default' is the file as written"]),
    "a bad grid key, merged": (
        S + 'grid = { "lrr" = [1e-3] }\n',
        ["at size gpu (sizes.gpu merged over the file): grid.'lrr': not a key a grid can vary"],
    ),
    "confirmation seeds that repeat, merged": (
        S + "confirm_seeds = [0, 1]\n",
        ["at size gpu (sizes.gpu merged over the file): confirm_seeds: must not repeat exploration seeds"],
    ),
}


@pytest.mark.parametrize("case", list(BAD_SIZES))
def test_a_typo_in_a_size_exits_2_naming_the_file_and_the_key(case, tmp_path, capsys):
    extra, fragments = BAD_SIZES[case]
    path = write(tmp_path, GOOD + extra)
    with pytest.raises(ConfigError):  # every size is checked, whichever the run asks for
        load_study(path)
    code = main(["run", str(path), "--results", str(tmp_path / "results"), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2
    assert str(path) in err, err
    for f in fragments:
        assert f in err, f"{f!r} not in:\n{err}"
    assert "Traceback" not in err and len(err.splitlines()) <= 20
    assert not (tmp_path / "results" / "runs").exists()


def test_a_run_that_cannot_resolve_at_a_size_exits_2(tmp_path, capsys):
    path = write(tmp_path, GOOD + S + "budget = { batch_size = 6 }\n")
    assert load_study(path).name == "good"  # the default size is fine
    code = main(["run", str(path), "--size", "gpu", "--results", str(tmp_path / "results"), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and str(path) in err and "batch_size 6 must be a multiple of group_size 4" in err, err


@pytest.mark.parametrize(
    "size, fragment",
    [("nope", "--size 'nope', which the study does not declare"), ("../x", "a size name is letters, digits")],
)
def test_an_undeclared_size_exits_2_listing_the_declared_sizes(size, fragment, tmp_path, capsys):
    path = STUDIES[0]
    code = main(["run", str(path), "--size", size, "--results", str(tmp_path / "results"), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert str(path) in err and "sizes of this study: default, gpu" in err and fragment in err, err
    assert "Traceback" not in err
    assert not (tmp_path / "results" / "runs").exists()
    with pytest.raises(ConfigError, match="sizes of this study: default, tiny"):
        load_study(write(tmp_path, GOOD + TINY), size="gpu")
    with pytest.raises(ConfigError, match="the file name 'good@gpu.toml' asks for size 'gpu'"):
        load_study(write(tmp_path, GOOD + TINY, "good@gpu.toml"))


# -- a tiny size, trained through the command line ------------------------------------------------


def test_a_size_trains_registers_and_reports_under_its_own_name(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(
        "workbench.studies.executors.LocalProcessExecutor", lambda *a, **k: InlineExecutor()
    )  # cmd_run's executor, in this process
    path = write(tmp_path, GOOD + TINY)
    results = tmp_path / "results"
    args = ["--results", str(results), "--quiet", "--workers", "1"]

    assert main(["run", str(path), "--size", "tiny", *args]) == 0
    out = capsys.readouterr().out
    assert "study good@tiny: 2 runs (2 done" in out, out
    assert list(load_studies(results)["name"]) == ["good@tiny"]  # the default size has not run
    tiny = load_runs(results, "good@tiny")
    assert sorted(tiny["seed"]) == [0, 1] and set(tiny["status"]) == {"done"} and set(tiny["steps"]) == {1}
    assert (results / "studies" / "good@tiny.toml").read_text() == path.read_text()

    assert main(["run", str(path), *args]) == 0  # the default size: another study, other runs
    capsys.readouterr()
    assert sorted(load_studies(results)["name"]) == ["good", "good@tiny"]
    default = load_runs(results, "good")
    assert list(default["seed"]) == [0] and set(default["steps"]) == {2}
    assert not set(default["run_id"]) & set(tiny["run_id"])

    assert main(["status", "good@tiny", "--results", str(results)]) == 0
    out = capsys.readouterr().out
    assert "study good@tiny: 2 runs" in out and "1/1" in out

    # the results folder's copy re-expands at its size (the index rebuild of results without manifests)
    again = legacy_plan(results / "studies" / "good@tiny.toml")
    assert again["name"] == "good@tiny" and {r["run_id"] for r in again["runs"]} == set(tiny["run_id"])

    # a second run at the size trains nothing
    assert main(["run", str(path), "--size", "tiny", *args]) == 0
    assert "trained now: 0, finished before: 2" in capsys.readouterr().out


def test_the_report_of_a_size_reads_its_seeds(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("workbench.studies.executors.LocalProcessExecutor", lambda *a, **k: InlineExecutor())
    path = write(tmp_path, GOOD + TINY)
    results = tmp_path / "results"
    assert main(["run", str(path), "--size", "tiny", "--results", str(results), "--quiet"]) == 0
    shutil.rmtree(results / "reports", ignore_errors=True)
    assert main(["report", "good@tiny", "--results", str(results)]) == 0, capsys.readouterr().err
    runs = (results / "reports" / "good@tiny" / "tables" / "runs.csv").read_text()
    assert len(runs.strip().splitlines()) == 3  # both seeds of the tiny size (the default size has one)
