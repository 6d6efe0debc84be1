"""The two training stages on transformers' Trainer: what each stage trains and at which learning rate, and an
end-to-end run in which a tiny random model learns the colour of the shape in generated images and videos."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from onevision_encoder.lmm import OneVisionLlavaProcessor
from onevision_encoder.lmm.train import TrainConfig, train, training_arguments
from onevision_encoder.synthetic import write_frames

COLOURS = {"red": (215, 40, 40), "green": (40, 190, 50), "blue": (40, 70, 225)}
SIDE, FRAMES = 56, 16
IMAGE_QUESTION = "what colour is the square ?"
VIDEO_QUESTION = "what colour is the moving shape ?"


def scene(rng, colour, moving: bool):
    """Frames of a grey, noisy background with a square of `colour`. Moving: it slides right along the top
    half while a still square of another colour sits in the bottom half (only motion tells them apart)."""
    side = int(rng.integers(12, 18))
    y, x0 = int(rng.integers(0, SIDE // 2 - side)), int(rng.integers(0, SIDE // 2))
    still = rng.choice([c for c in COLOURS if c != colour])
    sy, sx = int(rng.integers(SIDE // 2, SIDE - side)), int(rng.integers(0, SIDE - side))
    frames = []
    for t in range(FRAMES if moving else 1):
        frame = np.clip(rng.normal(128, 12, (SIDE, SIDE, 3)), 0, 255).astype(np.uint8)
        x = int((x0 + t * 2) % (SIDE - side)) if moving else x0
        frame[y : y + side, x : x + side] = COLOURS[colour]
        if moving:
            frame[sy : sy + side, sx : sx + side] = COLOURS[still]
        frames.append(frame)
    return frames


def write_data(root, count: int, seed: int):
    """`count` image records and `count` video records, colours in turn; returns (records, answers)."""
    rng = np.random.default_rng(seed)
    records = []
    for i in range(2 * count):
        colour = list(COLOURS)[i % 3]
        if i % 2 == 0:
            name = f"s{seed}_{i}.png"
            Image.fromarray(scene(rng, colour, moving=False)[0]).save(root / name)
            key, question = "image", f"<image>\n{IMAGE_QUESTION}"
        else:
            name = f"s{seed}_{i}.mp4"
            write_frames(root / name, scene(rng, colour, moving=True), g=8, bf=0)
            key, question = "video", f"<video>\n{VIDEO_QUESTION}"
        records.append({"id": f"{seed}-{i}", key: name, "conversations": [
            {"from": "human", "value": question}, {"from": "gpt", "value": f"{colour} ."}]})
    return records


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tokenizer, make_model):
    """A tiny random model (tiny-p14's encoder, a random Qwen3) and its processor saved in one directory."""
    root = tmp_path_factory.mktemp("lmm_ckpt")
    make_model(tokenizer).save_pretrained(root)
    OneVisionLlavaProcessor(tokenizer, image_mode="native", video_frames=8, video_budget=32,
                            video_size=SIDE).save_pretrained(root)
    return root


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("lmm_train_data")
    train_path, test_records = root / "train.jsonl", write_data(root, 12, seed=2)
    train_path.write_text("\n".join(json.dumps(r) for r in write_data(root, 24, seed=1)))
    return root, train_path, test_records


def config(checkpoint, data, out, stage, **training):
    root, train_path, _ = data
    return TrainConfig(model=str(checkpoint), data=str(train_path), output_dir=str(out), stage=stage,
                       image_folder=str(root), video_folder=str(root), cache_visual=True,
                       training={"per_device_train_batch_size": 8, "save_strategy": "no", "logging_steps": 2,
                                 "disable_tqdm": True, "seed": 0, **training})


def test_stage_defaults_are_the_published_recipe(tmp_path):
    one = TrainConfig(model="m", data="d", output_dir=str(tmp_path), stage=1)
    two = TrainConfig(model="m", data="d", output_dir=str(tmp_path), stage=2)
    args_one, args_two = training_arguments(one), training_arguments(two)
    assert (args_one.learning_rate, args_two.learning_rate) == (1e-3, 1e-5)
    assert (one.vision_tower_lr, two.vision_tower_lr) == (None, 2e-6)
    for args in (args_one, args_two):
        assert args.lr_scheduler_type == "cosine" and args.get_warmup_steps(1000) == 30
        assert args.remove_unused_columns is False
    with pytest.raises(ValueError, match="stage must be 1"):
        TrainConfig(model="m", data="d", output_dir="o", stage=3)
    with pytest.raises(ValueError, match=r"unknown TrainingArguments field\(s\) \['learning_rat'\]"):
        training_arguments(TrainConfig(model="m", data="d", output_dir="o", training={"learning_rat": 1}))


def test_config_file_errors_name_the_key(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("model: m\ndata: d\noutput_dir: o\nstages: 2\n")
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['stages'\]"):
        TrainConfig.from_file(path)
    path.write_text("model: m\n")
    with pytest.raises(ValueError, match=r"missing key\(s\) \['data', 'output_dir'\]"):
        TrainConfig.from_file(path)


def test_a_model_folder_that_is_not_there_is_one_line_naming_it(data, tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(OSError, match=rf"model '{missing}' cannot be loaded: [^\n]*$"):
        train(config(missing, data, tmp_path / "out", stage=1, max_steps=1))


def test_stage_1_trains_the_projector_only(checkpoint, data, tmp_path):
    from transformers import AutoModelForImageTextToText

    before = AutoModelForImageTextToText.from_pretrained(checkpoint).state_dict()
    trainer = train(config(checkpoint, data, tmp_path, stage=1, max_steps=3))
    after = AutoModelForImageTextToText.from_pretrained(tmp_path).state_dict()  # what train() saved
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith("multi_modal_projector.") for k in changed)
    assert {k for k in before if k.startswith("multi_modal_projector.")} == changed
    assert all(g["initial_lr"] == 1e-3 for g in trainer.optimizer.param_groups)


def test_stage_2_trains_everything_with_the_tower_at_its_own_lr(checkpoint, data, tmp_path):
    trainer = train(config(checkpoint, data, tmp_path, stage=2, max_steps=1))
    model = trainer.model
    tower = {id(p) for p in model.vision_tower.parameters()}
    assert all(p.requires_grad for p in model.parameters())
    by_lr = {}
    for group in trainer.optimizer.param_groups:
        for p in group["params"]:
            by_lr.setdefault(group["initial_lr"], set()).add(id(p))
    assert by_lr[2e-6] == tower
    assert by_lr[1e-5] == {id(p) for p in model.parameters()} - tower


def answer_accuracy(model, processor, records, root):
    """Greedy answers to held-out questions: the share whose first word is the right colour, per modality."""
    right = {"image": [], "video": []}
    model.eval()
    for record in records:
        kind = "image" if "image" in record else "video"
        question = record["conversations"][0]["value"]
        messages = [{"role": "user", "content": question}]
        prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
        inputs = processor(text=prompt, **{f"{kind}s": [str(root / record[kind])]})
        with torch.no_grad():
            generated = model.generate(**inputs, max_new_tokens=2, do_sample=False)
        answer = processor.tokenizer.decode(generated[0, inputs["input_ids"].shape[1]:]).split()
        right[kind].append(bool(answer) and answer[0] == record["conversations"][1]["value"].split()[0])
    return {kind: sum(v) / len(v) for kind, v in right.items()}


def test_a_tiny_model_learns_the_colour_of_the_shape(checkpoint, data, tmp_path):
    """Stage 2 (everything trains; the tiny random model gets larger learning rates than the published 1e-5)."""
    root, _, test_records = data
    run = config(checkpoint, data, tmp_path, stage=2, learning_rate=3e-3, num_train_epochs=10)
    run.vision_tower_lr = 1e-3
    trainer = train(run)
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    first, last = np.mean(losses[:2]), np.mean(losses[-3:])
    print(f"loss {first:.3f} -> {last:.3f} over {trainer.state.global_step} steps")
    assert last < 0.3 * first

    accuracy = answer_accuracy(trainer.model, trainer.processing_class, test_records, root)
    print(f"held-out accuracy {accuracy} (chance 1/3)")
    assert accuracy["image"] >= 0.75 and accuracy["video"] >= 0.75


def test_ove_lmm_train_runs_a_config_file(checkpoint, data, tmp_path, capsys):
    import yaml
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from onevision_encoder.cli import main

    root, train_path, _ = data
    run = {"model": str(checkpoint), "data": str(train_path), "output_dir": str(tmp_path / "out"), "stage": 1,
           "image_folder": str(root), "video_folder": str(root),
           "training": {"max_steps": 2, "per_device_train_batch_size": 4, "logging_steps": 1, "save_strategy": "no",
                        "disable_tqdm": True}}
    (tmp_path / "stage1.yaml").write_text(yaml.safe_dump(run))
    assert main(["lmm", "train", str(tmp_path / "stage1.yaml")]) == 0
    assert "stage 1, 2 steps; loss" in capsys.readouterr().out
    AutoModelForImageTextToText.from_pretrained(tmp_path / "out")  # the trained model and its processor saved
    assert AutoProcessor.from_pretrained(tmp_path / "out").video_budget == 32

    bad = dict(run, data=str(tmp_path / "missing.jsonl"))
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(bad))
    assert main(["lmm", "train", str(tmp_path / "bad.yaml")]) == 2
    err = capsys.readouterr().err
    assert "ove lmm train: error:" in err and "missing.jsonl" in err
