"""Bad sweep files: each mistake gets one message naming the key, the value and what is allowed."""

from __future__ import annotations

import re
import textwrap

import pytest
import yaml

from conftest import REPO_ROOT
from platform.sweep_checks import SEARCHABLE
from platform.sweep_spec import load_sweep_spec, parse_sweep_spec
from trainables.config import TrainConfig
from trainables.errors import UserError
from trainables.models import is_captioner_spec

GOOD = {
    "experiment": {"name": "t", "model": "tiny-clip", "train_data": "synthetic:train,n=16", "eval_data": "synthetic:test,n=8", "eval_eps": ["2/255", "4/255"]},
    "search": {"algorithm": "tpe", "num_trials": 2, "objectives": [{"metric": "pgd/eps4/tr1", "mode": "max"}]},
    "space": {"a": {"distribution": "loguniform", "low": 0.001, "high": 0.1}, "eps": {"distribution": "choice", "values": ["2/255", "4/255"]}},
}


def with_change(path: str, value) -> dict:
    data = yaml.safe_load(yaml.safe_dump(GOOD))
    *parents, leaf = path.split(".")
    node = data
    for part in parents:
        node = node.setdefault(part, {})
    if value is DELETE:
        del node[leaf]
    else:
        node[leaf] = value
    return data


DELETE = object()

MISTAKES = [
    ("experiment.learning_rate", 0.1, r"experiment.learning_rate': unknown key"),
    ("experiment.defense", "madry", r"experiment.defense'.*'mava', 'fare' or 'tecoa'"),
    ("experiment.epochs", 0, r"experiment.epochs'.*greater than or equal to 1"),
    ("experiment.epochs", "ten", r"experiment.epochs'.*valid integer.*'ten'"),
    ("experiment.name", "my sweep!", r"experiment.name'.*pattern"),
    ("experiment.eval_eps", ["5/0"], r"not a number or a fraction"),
    ("experiment.model", "vit-xyz", None),  # checked when the sweep starts (parse_model_spec), see test below
    ("search.algorithm", "bayes", r"search.algorithm'.*'tpe', 'nsga2' or 'grid'"),
    ("search.num_trials", DELETE, r"num_trials is required"),
    ("search.objectives", [], r"search.objectives'.*at least 1"),
    ("search.objectives", [{"metric": "pgd/eps8/tr1"}], r"'pgd/eps8/tr1' is not produced.*valid: clean/tr1"),
    ("search.objectives", [{"metric": "clean/tr1", "mode": "up"}], r"mode'.*'max' or 'min'"),
    ("search.scheduler", {"type": "asha"}, None),
    ("search.initial_points", [{"zeta": 1}], r"initial_points\[0\]: keys \['zeta'\] are not in space"),
    ("space.a", {"distribution": "loguniform", "low": 0.1, "high": 0.01}, r"space: key 'a': low \(0.1\) must be below high \(0.01\)"),
    ("space.a", {"distribution": "loguniform", "low": -1, "high": 0.01}, r"space.a.loguniform.low'.*greater than 0"),
    ("space.a", {"distribution": "gaussian", "mu": 0}, r"space.a'.*does not match any of the expected tags.*'uniform', 'loguniform', 'int', 'choice', 'fixed'"),
    ("space.eps", {"distribution": "choice", "values": ["2/255", 3]}, r"eps .*3.*outside \(0, 1\]"),
    ("search.seeds", [], r"search.seeds is empty: list the training seeds"),
    ("search.seeds", [0, 1, 1, 2, 2], r"search.seeds repeats 1, 2: .*list each seed once"),
    ("search.seeds", [0, 1.5], r"search.seeds.1'.*valid integer"),
    ("search.seeds", [0, "1"], r"search.seeds.1'.*valid integer"),
    ("search.seeds", 3, r"search.seeds'.*valid list"),
    ("space.N", {"distribution": "int", "low": -1, "high": 3}, r"space: key 'N' value -1: .*greater than or equal to 0"),
    ("space.M", {"distribution": "uniform", "low": 1, "high": 5}, r"key 'M' takes integers"),
    ("space.beta_gamma", {"distribution": "uniform", "low": 0, "high": 1}, r"key 'beta_gamma' is not a searchable training option; searchable: .*a, b, c"),
    ("space.defense", {"distribution": "choice", "values": ["mava", "dp"]}, r"space: key 'defense' value 'dp'"),
    ("space.lr", {"distribution": "choice", "values": []}, r"space.lr.choice.values'.*at least 1"),
    ("tracking.url", "http://x", r"tracking.url': unknown key"),
    ("resources.workers_per_trial", 0, r"resources.workers_per_trial'.*greater than or equal to 1"),
]


@pytest.mark.parametrize("path, value, message", [m for m in MISTAKES if m[2]], ids=[f"{m[0]}={m[1]!r}"[:60] for m in MISTAKES if m[2]])
def test_each_mistake_gets_its_own_clear_message(path, value, message):
    with pytest.raises(UserError, match=message):
        parse_sweep_spec(with_change(path, value), "sweep.yaml")


def test_asha_needs_a_single_objective():
    data = with_change("search.scheduler", {"type": "asha"})
    data["search"]["objectives"].append({"metric": "clean/tr1"})
    with pytest.raises(UserError, match="ASHA.*single objective"):
        parse_sweep_spec(data, "sweep.yaml")


def test_grid_needs_choices():
    with pytest.raises(UserError, match="grid search needs choice or fixed values"):
        parse_sweep_spec(with_change("search.algorithm", "grid"), "sweep.yaml")


def test_eps_is_accepted_as_a_fraction_everywhere():
    spec = parse_sweep_spec(GOOD, "sweep.yaml")
    assert spec.space["eps"].values == [2 / 255, 4 / 255]
    assert spec.experiment.eval_eps == (2 / 255, 4 / 255)


def test_syntax_errors_and_missing_files(tmp_path):
    broken = tmp_path / "broken.yaml"
    broken.write_text("experiment:\n  name: x\n   model: [\n")
    with pytest.raises(UserError, match=r"not valid YAML at line \d+, column \d+"):
        load_sweep_spec(broken)
    with pytest.raises(UserError, match="does not exist.*search_spaces/abc.yaml"):
        load_sweep_spec(tmp_path / "missing.yaml")
    for text in ("", "# only a comment\n"):
        empty = tmp_path / "empty.yaml"
        empty.write_text(text)
        with pytest.raises(UserError, match=r"^sweep file .*empty.yaml is empty: write its sections experiment:, search: and space:"):
            load_sweep_spec(empty)


def test_shipped_sweep_files_are_valid():
    for path in sorted((REPO_ROOT / "search_spaces").glob("*.yaml")):
        # A captioner preset, or one that sets a task, keeps its model kind (its objective is that task's metric);
        # validation reads no model file.
        experiment = yaml.safe_load(path.read_text())["experiment"]
        keep = is_captioner_spec(experiment["model"]) or "task" in experiment
        model = {} if keep else {"experiment.model": "tiny-clip"}
        eval_data = {"entailment": "synthetic-ve:test", "grounding": "synthetic-vg:test"}.get(experiment.get("task"), "synthetic:test")
        if experiment.get("task") == "grounding" and not experiment["model"].startswith(("albef", "tcl")):
            model = {"experiment.model": "albef:/models/bert@/models/albef.pth"}  # a fusion model (every task); no file is read
        load_sweep_spec(path, {**model, "experiment.train_data": "synthetic:train", "experiment.eval_data": eval_data})


def test_the_command_line_prints_one_message_and_exits_2(tmp_path, capsys):
    """Through the command's own ``run_cli(main)`` in this process (tests/test_bad_input.py runs real subprocesses)."""
    from platform.cli import run_cli
    from platform.sweep import main

    bad = tmp_path / "bad.yaml"
    bad.write_text(textwrap.dedent(yaml.safe_dump(with_change("search.algorithm", "bayes"))))
    with pytest.raises(SystemExit) as exited:
        run_cli(lambda: main(["--space", str(bad)]))
    stderr = capsys.readouterr().err
    assert exited.value.code == 2
    assert "search.algorithm" in stderr and stderr.count("error: ") == 1, stderr


# ---- one schema: experiment: is TrainConfig, space: entries obey their field's type ----------------------


def test_the_embedded_default_resolves_to_the_same_training_config_as_before():
    """abc.yaml's first trial (the paper's point in search.initial_points), field by field, as the old
    experiment: + options: schema resolved it (printed by that code before the change): the numbers must not move."""
    spec = load_sweep_spec(REPO_ROOT / "search_spaces" / "abc.yaml")
    resolved = spec.train_config(spec.search.initial_points[0]).model_dump(mode="json")
    assert resolved == {
        "model": "tiny-clip", "task": None, "defense": "mava", "train_data": "synthetic:train,n=256", "eval_data": "synthetic:test,n=100",
        "epochs": 2, "batch_size": 32, "lr": 1e-4, "weight_decay": 1e-4, "optimizer": "adamw", "momentum": 0.9,
        "eps": 4 / 255, "pgd_steps": 10, "pgd_step_size": 1 / 255, "a": 0.002, "b": 0.4, "c": 0.6, "N": 3, "M": 5, "beta": 1.5,
        "neighbours": "uniform", "embedding_space": "raw", "cms_form": "one_minus_cos", "sca_half": True,
        "inner_text_distance": False, "eval_attacks": ["pgd"], "eval_eps": [2 / 255, 4 / 255], "eval_every": 1, "seed": 0,
        "device": "auto", "precision": "fp32", "compile": False, "channels_last": False,
        # Options added since, at the defaults that compute what the code computed before: the inner PGD at r = 0
        # with a random start (as it was); k_test and the word source act only on ITM models and text attacks.
        "inner_neighbourhood": "zero", "mava_random_start": True, "k_test": 128, "word_candidates": "tiny-mlm",
        # FARE's inner PGD only (this sweep is MAVA): RobustVLM's sign momentum, the FARE code's.
        "fare_sign_momentum": True,
        # Table 4's ablation (none: full MAVA) and the example pictures drawn after the last epoch (they change no metric).
        "ablate": "none", "examples": 3,
    }
    # What Tune hands every trial (fixed options under "train") is that config before the searched keys are applied.
    assert spec.fixed_options() == spec.train_config().model_dump(mode="json")


def test_defaults_are_the_training_configs_own():
    spec = parse_sweep_spec({**GOOD, "experiment": {"name": "t"}}, "sweep.yaml")
    assert spec.train_config() == TrainConfig()  # one set of defaults: epochs 10, SGD, the paper's a, b, c...


def test_the_old_options_section_is_refused_with_where_each_key_goes():
    data = with_change("experiment.options", {"optimizer": "adamw", "eval_every": 0})
    with pytest.raises(UserError, match=r"^experiment.options is gone: write `optimizer: adamw`, `eval_every: 0` directly under experiment:"):
        parse_sweep_spec(data, "sweep.yaml")


INT_FIELDS = [name for name, field in TrainConfig.model_fields.items() if field.annotation is int and name in SEARCHABLE]
FLOAT_FIELDS = [name for name, field in TrainConfig.model_fields.items() if field.annotation is float]


def test_the_integer_fields_come_from_the_annotations():
    assert {"seed", "eval_every", "N", "M", "epochs", "pgd_steps", "batch_size", "k_test", "examples"} == set(INT_FIELDS)
    assert {"lr", "eps", "a", "b", "c", "beta", "momentum"} <= set(FLOAT_FIELDS)


@pytest.mark.parametrize("key", INT_FIELDS)
@pytest.mark.parametrize("kind", ["uniform", "loguniform"])
def test_an_integer_field_refuses_a_continuous_distribution(key, kind):
    with pytest.raises(UserError, match=rf"space: key '{key}' takes integers, but {kind} draws fractions: write it as `\{{distribution: int, low: 1, high: 3\}}`"):
        parse_sweep_spec(with_change(f"space.{key}", {"distribution": kind, "low": 1, "high": 3}), "sweep.yaml")
    spec = parse_sweep_spec(with_change(f"space.{key}", {"distribution": "int", "low": 1, "high": 3}), "sweep.yaml")
    assert spec.candidate_values(key) == [1, 3]


@pytest.mark.parametrize("key", FLOAT_FIELDS)
def test_a_float_field_takes_uniform_and_loguniform_within_its_own_range(key):
    default = TrainConfig.model_fields[key].default
    for kind in ("uniform", "loguniform"):
        spec = parse_sweep_spec(with_change(f"space.{key}", {"distribution": kind, "low": default / 2, "high": default}), "sweep.yaml")
        assert spec.space[key].distribution == kind


@pytest.mark.parametrize("key, distribution, message", [
    ("momentum", {"distribution": "uniform", "low": 0.5, "high": 1.0}, r"key 'momentum' value 1.0: Input should be less than 1"),
    ("eval_every", {"distribution": "int", "low": -1, "high": 2}, r"key 'eval_every' value -1: .*greater than or equal to 0"),
    ("optimizer", {"distribution": "uniform", "low": 0, "high": 1}, r"key 'optimizer' takes one of sgd, adamw, not a number range: write it as `\{distribution: choice"),
    ("compile", {"distribution": "int", "low": 0, "high": 1}, r"key 'compile' takes true or false, not a number range"),
    ("seed", {"distribution": "choice", "values": [0, 1.5]}, r"key 'seed' value 1.5: .*valid integer"),
    ("device", {"distribution": "choice", "values": ["cpu", "gpu"]}, r"key 'device' value 'gpu': unknown device 'gpu': use auto"),
    ("eval_data", {"distribution": "choice", "values": ["synthetic:test"]}, r"key 'eval_data' is the same for every trial of a sweep.*set it under experiment:"),
    ("model", {"distribution": "choice", "values": ["tiny-clip", "nope"]}, r"unknown model kind 'nope' in model spec 'nope'"),
])
def test_each_space_entry_is_checked_against_its_field(key, distribution, message):
    with pytest.raises(UserError, match=message):
        parse_sweep_spec(with_change(f"space.{key}", distribution), "sweep.yaml")


def test_device_accepts_only_what_the_loop_can_run():
    with pytest.raises(UserError, match=r"experiment.device'.*unknown device 'gpu': use auto .*cpu, cuda or cuda:N"):
        parse_sweep_spec(with_change("experiment.device", "gpu"), "sweep.yaml")
    with pytest.raises(UserError, match=r"experiment.device 'cuda' runs each worker on a GPU, but resources.gpus_per_worker is 0: set device: auto"):
        parse_sweep_spec(with_change("experiment.device", "cuda"), "sweep.yaml")
    data = with_change("experiment.device", "cuda:1")
    data["resources"] = {"gpus_per_worker": 1}
    assert parse_sweep_spec(data, "sweep.yaml").experiment.device == "cuda:1"  # the machine check comes later (preflight)


@pytest.mark.parametrize("written, rewritten", [
    ({"uniform": [0.1, 1.0]}, "{distribution: uniform, low: 0.1, high: 1.0}"),
    ({"loguniform": [1.0e-5, 1.0e-3]}, "{distribution: loguniform, low: 1.0e-05, high: 0.001}"),
    ({"randint": [1, 5]}, "{distribution: int, low: 1, high: 4}"),  # Ray's randint excludes 5
    ({"choice": [0.01, 0.1]}, "{distribution: choice, values: [0.01, 0.1]}"),
    ({"min": 0.1, "max": 1.0}, "{distribution: uniform, low: 0.1, high: 1.0}"),  # W&B
    ({"distribution": "log_uniform_values", "min": 0.01, "max": 0.1}, "{distribution: loguniform, low: 0.01, high: 0.1}"),  # W&B
    ({"values": [0.01, 0.1]}, "{distribution: choice, values: [0.01, 0.1]}"),  # W&B
])
def test_ray_and_wandb_ranges_get_this_files_spelling(written, rewritten):
    with pytest.raises(UserError, match=r"^space: key 'a': `.*` is Ray Tune / W&B style: write it as `" + re.escape(rewritten) + "`\n") as info:
        parse_sweep_spec(with_change("space.a", written), "sweep.yaml")
    assert "discriminator" not in str(info.value)
    fixed = parse_sweep_spec(with_change("space.a", yaml.safe_load(rewritten)), "sweep.yaml")  # the suggestion is valid
    assert fixed.space["a"].distribution == yaml.safe_load(rewritten)["distribution"]


def test_epochs_may_be_searched_and_asha_runs_to_the_longest():
    from platform.search import scheduler

    data = with_change("space.epochs", {"distribution": "choice", "values": [1, 3]})
    data["search"]["scheduler"] = {"type": "asha"}
    spec = parse_sweep_spec(data, "sweep.yaml")
    assert spec.largest("epochs") == 3 and scheduler(spec)._max_t == 3


def test_initial_points_are_checked_like_trials():
    data = with_change("space.N", {"distribution": "int", "low": 1, "high": 3})
    data["search"]["initial_points"] = [{"N": -1}]
    with pytest.raises(UserError, match=r"search.initial_points\[0\]: Input should be greater than or equal to 0"):
        parse_sweep_spec(data, "sweep.yaml")


def test_seeds_cannot_also_be_searched_nor_split_by_asha():
    both = with_change("space.seed", {"distribution": "choice", "values": [0, 1]}) | {}
    both["search"]["seeds"] = [0, 1]
    with pytest.raises(UserError, match="seed is both in space: and in search.seeds"):
        parse_sweep_spec(both, "t.yaml")
    asha = with_change("search.scheduler", {"type": "asha"})
    asha["search"]["seeds"] = [0, 1]
    with pytest.raises(UserError, match="search.seeds with search.scheduler: ASHA would stop some seeds"):
        parse_sweep_spec(asha, "t.yaml")


def test_a_grid_runs_every_point_once_per_seed_and_the_seed_is_the_trials_param():
    from ray.tune.search.variant_generator import generate_variants

    from platform.search import num_samples, planned_trials, tune_space

    data = with_change("search.algorithm", "grid")
    data["search"]["seeds"] = [3, 7]
    data["space"] = {"defense": {"distribution": "choice", "values": ["mava", "fare", "tecoa"]}}
    spec = parse_sweep_spec(data, "t.yaml")
    assert planned_trials(spec) == 6 and num_samples(spec) == 1  # one pass over a grid of 3 x 2
    assert spec.searched_keys() == ["defense", "seed"]  # what each trial records from its Tune config
    points = sorted((config["defense"], config["seed"]) for _, config in generate_variants(tune_space(spec)))
    assert points == sorted((d, s) for d in ("mava", "fare", "tecoa") for s in (3, 7))


def test_optuna_sees_each_configuration_once_told_the_mean_over_its_seeds():
    from ray.tune.search import ConcurrencyLimiter

    from platform.search import SeedRepeater, num_samples, planned_trials, searcher

    data = with_change("search.seeds", [0, 1, 2])
    spec = parse_sweep_spec(data, "t.yaml")
    assert planned_trials(spec) == num_samples(spec) == 6  # 2 configurations x 3 seeds
    search = searcher(spec, study_name="seeds-test")
    assert isinstance(search, ConcurrencyLimiter) and isinstance(search.searcher, SeedRepeater)
    repeater = search.searcher
    repeater.set_search_properties(None, None, {"a": __import__("ray").tune.loguniform(0.001, 0.1)})
    configs = [repeater.suggest(f"t{i}") for i in range(3)]
    assert [c["seed"] for c in configs] == [0, 1, 2] and len({c["a"] for c in configs}) == 1  # one point, three seeds
    for trial, value in zip(("t0", "t1", "t2"), (10.0, 20.0, None)):  # t2 failed (no result): left out of the mean
        repeater.on_trial_complete(trial, None if value is None else {"final/pgd/eps4/tr1": value})
    (told,) = repeater.searcher._ot_study.trials
    assert told.values == [15.0]
    assert repeater.suggest("t3")["a"] != configs[0]["a"]  # the next configuration starts a new group


def test_nsga2_seeds_average_each_objective_on_its_own():
    from platform.search import searcher

    data = with_change("search.seeds", [5, 6])
    data["search"] |= {"algorithm": "nsga2", "num_trials": 4,
                       "objectives": [{"metric": "clean/tr1", "mode": "max"}, {"metric": "pgd/eps4/tr1", "mode": "max"}]}
    repeater = searcher(parse_sweep_spec(data, "t.yaml"), study_name="seeds-nsga2").searcher
    repeater.set_search_properties(None, None, {"a": __import__("ray").tune.loguniform(0.001, 0.1)})
    assert [repeater.suggest(t)["seed"] for t in ("t0", "t1")] == [5, 6]
    repeater.on_trial_complete("t0", {"final/clean/tr1": 40.0, "final/pgd/eps4/tr1": 10.0})
    repeater.on_trial_complete("t1", {"final/clean/tr1": 50.0, "final/pgd/eps4/tr1": 20.0})
    assert repeater.searcher._ot_study.trials[0].values == [45.0, 15.0]


def test_two_one_cpu_trials_fit_a_two_core_machine_side_by_side():
    """The trial driver's placement bundle holds no CPU: with 0.01 CPU (as before), two trials of one
    one-CPU worker needed 2.02 CPUs, so on 2 cores ``max_concurrent_trials: 2`` ran one trial at a time."""
    from ray.tune.execution.placement_groups import resource_dict_to_pg_factory

    from platform.preflight import TRIAL_DRIVER_RESOURCES

    driver = resource_dict_to_pg_factory(TRIAL_DRIVER_RESOURCES).required_resources
    assert 2 * (driver.get("CPU", 0) + 1) <= 2
    assert any(value > 0 for value in driver.values())  # Ray refuses a placement bundle of zeros


def test_a_searched_model_registers_each_models_best_under_its_own_name():
    """Encoders of different models are not versions of one registered model; two specs that shorten alike stay apart."""
    fixed = parse_sweep_spec(with_change("tracking.experiment", "exp"), "sweep.yaml")
    assert fixed.registered_model_names() == {None: "exp-robust-vision"}
    models = ["tiny-clip", "albef:/m/text@/m/a/w.pth", "albef:/n/text@/n/a/w.pth"]
    data = with_change("space.model", {"distribution": "choice", "values": models})
    data.setdefault("tracking", {})["experiment"] = "exp"
    assert parse_sweep_spec(data, "sweep.yaml").registered_model_names() == {
        "tiny-clip": "exp-tiny-clip-robust-vision", models[1]: "exp-albef-text-w.pth-robust-vision",
        models[2]: "exp-albef-text-w.pth-2-robust-vision"}
