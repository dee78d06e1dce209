"""The sweep's settings are grouped in nested models and spelled flat in files and records."""

from __future__ import annotations

import json

import pytest

from safemerge.config import EvalConfig, EvalSettings, SweepConfig, validate
from safemerge.errors import ConfigError

BASE = {"aligned": "a", "finetuned": ["b"], "out": "run", "safety": ["advbench"], "task_val": ["gsm8k"]}


def test_flat_settings_land_in_their_groups():
    cfg = SweepConfig(**BASE, max_new_tokens=7, merge_seed=3, merge_dtype="float32", density=0.3, address="auto")
    assert cfg.evaluation.max_new_tokens == 7
    assert (cfg.merge.seed, cfg.merge.dtype, cfg.merge.density) == (3, "float32", 0.3)
    assert cfg.ray.address == "auto"


def test_the_nested_spelling_reads_the_same_config():
    flat = SweepConfig(**BASE, max_new_tokens=7, merge_seed=3, num_workers=2)
    nested = SweepConfig(**BASE, evaluation={"max_new_tokens": 7}, merge={"seed": 3}, ray={"num_workers": 2})
    assert nested == flat


def test_a_record_is_flat_in_the_fields_order_and_reads_back():
    cfg = SweepConfig(**BASE, max_new_tokens=7, merge_seed=3)
    record = json.loads(json.dumps(cfg.model_dump(mode="json")))
    assert not {"evaluation", "merge", "ray"} & set(record)
    assert record["merge_seed"] == 3 and record["seed"] == 0  # the merge's seed and the evaluation's, apart
    keys = list(record)
    assert keys.index("max_asr_increase") < keys.index("density") < keys.index("merge_seed") < keys.index("safety")
    assert keys[-len(EvalSettings.model_fields):] == list(EvalSettings.model_fields)
    assert SweepConfig(**record) == cfg


def test_a_sweep_keeps_its_own_vllm_shares_unless_given():
    assert SweepConfig(**BASE).evaluation.gpu_memory_utilization == 0.55
    assert SweepConfig(**BASE).evaluation.judge_gpu_memory_utilization == 0.35
    given = SweepConfig(**BASE, evaluation={"gpu_memory_utilization": 0.5})
    assert (given.evaluation.gpu_memory_utilization, given.evaluation.judge_gpu_memory_utilization) == (0.5, 0.35)
    assert SweepConfig.flat_default("gpu_memory_utilization") == 0.55
    assert EvalConfig.model_fields["gpu_memory_utilization"].default == 0.9  # evaluate holds one engine at a time


def test_each_trial_evaluates_with_the_sweeps_settings():
    cfg = SweepConfig(**BASE, max_new_tokens=7, judge="keyword", limit=3)
    ev = cfg.eval_config()
    own = ("cache_dir", "stop_when_decided")  # the sweep sets these: its run directory, its --adaptive
    settings = {name: getattr(ev, name) for name in EvalSettings.model_fields if name not in own}
    assert settings == {k: v for k, v in cfg.evaluation.model_dump().items() if k not in own}
    assert ev.cache_dir == cfg.out / "cache" and ev.tasks == ["gsm8k"]
    assert ev.stop_when_decided is cfg.adaptive is True
    assert cfg.updated(adaptive=False).eval_config().stop_when_decided is False


def test_a_bad_grouped_setting_is_named_as_the_command_line_spells_it():
    with pytest.raises(ConfigError) as e:
        validate(SweepConfig, **BASE, max_new_tokens=0, merge_seed=-1, gpus_per_trial=-1, bogus=1)
    message = str(e.value)
    for flag in ("--max-new-tokens", "--merge-seed", "--gpus-per-trial", "--bogus"):
        assert flag in message
    assert "evaluation" not in message and "merge." not in message


def test_updated_validates_again():
    cfg = SweepConfig(**BASE)
    assert cfg.updated(judge="keyword", num_workers=3).ray.num_workers == 3
    with pytest.raises(ValueError):
        cfg.updated(max_new_tokens=0)
