"""The training config (file, overrides, errors) and the optimiser's schedule and parameter groups."""

import json

import pytest
from transformers import AutoModel

import onevision_encoder  # noqa: F401 - registers the model
from onevision_encoder.configuration import OneVisionEncoderConfig
from onevision_encoder.train.config import ConfigError, OptimConfig, load_config
from onevision_encoder.train.optim import learning_rate, parameter_groups

HEAD = {"name": "images", "inputs": ["data/"], "labels": "labels.npy", "num_classes": 10}


def _write(tmp_path, text: str, name: str = "c.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_yaml_and_json_give_the_same_config_and_overrides_win(tmp_path):
    data = {"optim": {"lr": 5e-4}, "heads": [HEAD]}
    from_json = load_config(_write(tmp_path, json.dumps(data), "c.json"))
    from_yaml = load_config(_write(tmp_path, "optim:\n  lr: 5e-4\nheads:\n  - {name: images, inputs: [data/], "
                                             "labels: labels.npy, num_classes: 10}\n"))
    assert from_json == from_yaml
    assert from_yaml.optim.lr == 5e-4  # YAML reads 5e-4 as text; the float field takes it as a number

    config = load_config(_write(tmp_path, json.dumps(data), "c.json"),
                         ["optim.lr=1e-4", "heads.0.batch_size=16", "heads.0.video_mix.codec=1",
                          "heads.1.name=ocr", "heads.1.inputs=[ocr/]", "heads.1.num_classes=5", "stages.0.image_size=448"])
    assert config.optim.lr == 1e-4 and config.heads[0].batch_size == 16 and config.heads[0].video_mix.codec == 1.0
    assert [h.name for h in config.heads] == ["images", "ocr"]
    assert config.stages[0].image_size == 448 and config.image_size_at(0) == 448


@pytest.mark.parametrize("override, named", [
    ("optim.learning_rate=1", "optim.learning_rate"),
    ("heads.0.batchsize=4", "heads.0.batchsize"),
    ("heads.0.video_mix.codecs=1", "heads.0.video_mix.codecs"),
    ("trainer.steps=3", "trainer"),
])
def test_an_unknown_key_is_one_error_naming_it(tmp_path, override, named):
    path = _write(tmp_path, json.dumps({"heads": [HEAD]}), "c.json")
    with pytest.raises(ConfigError, match=f"unknown config key '{named}'"):
        load_config(path, [override])


@pytest.mark.parametrize("override, message", [
    ("run.steps=many", "run.steps must be a number"),
    ("run.steps=2.5", "whole number"),
    ("model.gradient_checkpointing=1", "true or false"),
    ("precision=fp8", "precision must be one of"),
    ("heads.0.num_classes=null", "exactly one of bank and num_classes"),
    ("heads.3.name=x", "heads has 1 entries"),
    ("model.config.hidden_size=64", "not both"),
])
def test_bad_values_are_named(tmp_path, override, message):
    path = _write(tmp_path, json.dumps({"model": {"init": "published/"}, "heads": [HEAD]}), "c.json")
    with pytest.raises(ConfigError, match=message):
        load_config(path, [override])


def test_a_config_without_heads_says_so(tmp_path):
    with pytest.raises(ConfigError, match="no heads"):
        load_config(_write(tmp_path, "optim: {lr: 0.1}\n"))


def test_schedule_warms_up_linearly_then_decays_as_a_true_power_2_curve():
    optim = OptimConfig(lr=1e-3, min_lr=1e-5, warmup_steps=10, power=2.0)
    total = 110
    rates = [learning_rate(s, optim, total) for s in range(total)]
    assert rates[:10] == pytest.approx([1e-3 * (s + 1) / 10 for s in range(10)])
    assert rates[10] == pytest.approx(1e-3)
    # half way through the decay: (1 - 0.5)^2 = a quarter of the way from min_lr to lr (linear would be half)
    assert rates[60] == pytest.approx(1e-5 + (1e-3 - 1e-5) * 0.25)
    assert all(a > b for a, b in zip(rates[10:], rates[11:]))
    assert rates[-1] > 1e-5 and learning_rate(total, optim, total) == pytest.approx(1e-5)
    # the rate is a function of the step alone: a resumed run cannot jump
    assert [learning_rate(s, optim, total) for s in range(50, 60)] == rates[50:60]


def test_norms_biases_and_the_probe_are_not_decayed_unless_asked():
    model = AutoModel.from_config(OneVisionEncoderConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                                         num_attention_heads=2, patch_size=8))
    names = {id(p): n for n, p in model.named_parameters()}
    groups = {g["name"]: (g["weight_decay"], {names[id(p)] for p in g["params"]})
              for g in parameter_groups(model, OptimConfig())}
    decay, no_decay = groups["decay"][1], groups["no_decay"][1]
    assert groups["decay"][0] == 0.05 and groups["no_decay"][0] == 0.0
    assert "head.probe" in no_decay and "layernorm_pre.weight" in no_decay
    assert "encoder.layers.0.mlp.fc1.bias" in no_decay and "head.attention.in_proj_bias" in no_decay
    assert all(not n.endswith(".bias") and "norm" not in n for n in decay)
    assert "embeddings.patch_embedding.weight" in decay and "encoder.layers.0.mlp.fc1.weight" in decay
    everything = parameter_groups(model, OptimConfig(decay_everything=True))
    assert len(everything) == 1 and len(everything[0]["params"]) == len(list(model.parameters()))
