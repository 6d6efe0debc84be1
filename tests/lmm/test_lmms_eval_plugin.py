"""`lmms-eval --model onevision_llava` on local tasks (YAML + local JSON data, images and a video) with the tiny
model: the harness finds the plugin through its entry point, and what it records is what the model answers."""

import glob
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from PIL import Image

from onevision_encoder.lmm import OneVisionLlavaProcessor
from onevision_encoder.synthetic import write_image, write_video

TASK_UTILS = '''
import os
from PIL import Image

HERE = os.path.dirname(os.path.abspath(__file__))


def doc_to_visual(doc):
    path = os.path.join(HERE, doc["file"])
    return [path] if doc["file"].endswith(".mp4") else [Image.open(path).convert("RGB")]


def doc_to_text(doc):
    return doc["question"]
'''

GENERATE_TASK = """
task: ove_colour_generate
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_visual: !function utils.doc_to_visual
doc_to_text: !function utils.doc_to_text
doc_to_target: answer
generation_kwargs:
  max_new_tokens: 3
  until: ["<|im_end|>"]
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
"""

CHOICE_TASK = """
task: ove_colour_choice
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_visual: !function utils.doc_to_visual
doc_to_text: !function utils.doc_to_text
doc_to_choice: ["red", "green", "blue"]
doc_to_target: label
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""

DOCS = [
    {"file": "a.png", "question": "what colour is the square ?", "answer": "red", "label": 0},
    {"file": "b.png", "question": "<image> what colour is the shape ?", "answer": "green", "label": 1},
    {"file": "v.mp4", "question": "what colour is the moving shape ?", "answer": "blue", "label": 2},
]


def lmms_eval_command():
    """lmms-eval's console script beside this interpreter (it is installed with --no-deps, see README)."""
    pytest.importorskip("lmms_eval", reason="lmms-eval is installed by .ci/run (pip install --no-deps lmms-eval)")
    script = os.path.join(os.path.dirname(sys.executable), "lmms-eval")
    return [script] if os.path.exists(script) else [sys.executable, "-m", "lmms_eval"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tokenizer, make_model):
    root = tmp_path_factory.mktemp("lmms_eval")
    checkpoint, tasks = root / "model", root / "tasks"
    tasks.mkdir()
    model = make_model(tokenizer, seed=5)
    model.save_pretrained(checkpoint)
    processor = OneVisionLlavaProcessor(tokenizer, image_mode="native", video_frames=8, video_budget=24, video_size=56)
    processor.save_pretrained(checkpoint)
    write_image(tasks / "a.png", width=42, height=28, seed=1)
    write_image(tasks / "b.png", width=28, height=42, seed=2)
    write_video(tasks / "v.mp4", num_frames=16, width=64, height=48, seed=3)
    data = tasks / "docs.json"
    data.write_text(json.dumps(DOCS))
    (tasks / "utils.py").write_text(TASK_UTILS)
    (tasks / "generate.yaml").write_text(GENERATE_TASK.format(data=data))
    (tasks / "choice.yaml").write_text(CHOICE_TASK.format(data=data))
    return root, model, processor


def expected_answers(model, processor, tasks):
    """What the model itself says to each doc's prompt (greedy, as the task asks)."""
    answers, choices = [], []
    for doc in DOCS:
        path = str(tasks / doc["file"])
        video = path.endswith(".mp4")
        mark = "" if "<image>" in doc["question"] else "<video>\n" if video else "<image>\n"
        question = mark + doc["question"]
        prompt = processor.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True)
        visual = {"videos": [path]} if video else {"images": [Image.open(path).convert("RGB")]}
        inputs = processor(text=prompt, **visual)
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
            answers.append(processor.tokenizer.decode(out[0, inputs["input_ids"].shape[1]:],
                                                      skip_special_tokens=True).split("<|im_end|>")[0].strip())
            scores = []
            for choice in ("red", "green", "blue"):  # lmms-eval's default target delimiter is a space
                full = processor(text=prompt + " " + choice, **visual)
                n = len(processor.tokenizer(" " + choice, add_special_tokens=False)["input_ids"])
                logits = model(**full).logits[0, -n - 1 : -1]
                scores.append(-float(torch.log_softmax(logits, -1).gather(1, full["input_ids"][0, -n:, None]).mean()))
            choices.append(scores)
    return answers, choices


def test_lmms_eval_runs_the_plugin_on_local_tasks(setup):
    command = lmms_eval_command()
    root, model, processor = setup
    out = root / "results"
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "HF_HOME": str(root / "hf"),
           "TOKENIZERS_PARALLELISM": "false"}
    run = subprocess.run(
        [*command, "--model", "onevision_llava", "--model_args", f"pretrained={root / 'model'},device=cpu",
         "--tasks", "ove_colour_generate,ove_colour_choice", "--include_path", str(root / "tasks"),
         "--batch_size", "2", "--output_path", str(out), "--log_samples"],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    (results_file,) = glob.glob(str(out / "**" / "*results.json"), recursive=True)
    results = json.loads(open(results_file).read())["results"]

    answers, choices = expected_answers(model, processor, root / "tasks")
    samples = {}
    for path in glob.glob(str(out / "**" / "*samples_*.jsonl"), recursive=True):
        task = "generate" if "generate" in os.path.basename(path) else "choice"
        samples[task] = sorted((json.loads(line) for line in open(path)), key=lambda s: s["doc_id"])
    assert [s["filtered_resps"] for s in samples["generate"]] == answers
    exact = sum(a == d["answer"] for a, d in zip(answers, DOCS)) / len(DOCS)
    assert results["ove_colour_generate"]["exact_match,none"] == pytest.approx(exact)

    recorded = [[float(r[0]) for r in s["filtered_resps"]] for s in samples["choice"]]
    torch.testing.assert_close(torch.tensor(recorded), torch.tensor(choices), atol=1e-3, rtol=1e-4)
    accuracy = sum(min(range(3), key=c.__getitem__) == d["label"] for c, d in zip(choices, DOCS)) / len(DOCS)
    assert results["ove_colour_choice"]["acc,none"] == pytest.approx(accuracy)
    shutil.rmtree(out)


def test_bad_model_args_and_visuals_are_named(setup):
    pytest.importorskip("lmms_eval", reason="lmms-eval is installed by .ci/run (pip install --no-deps lmms-eval)")
    from onevision_encoder.lmm.lmms_eval_plugin import OneVisionLlava, generation_settings

    root, _, _ = setup
    with pytest.raises(ValueError, match=r"unknown model_args \['frames'\]"):
        OneVisionLlava(pretrained=str(root / "model"), device="cpu", frames=8)
    with pytest.raises(ValueError, match="dtype must be"):
        OneVisionLlava(pretrained=str(root / "model"), device="cpu", dtype="float13")
    lm = OneVisionLlava(pretrained=str(root / "model"), device="cpu", video_frames="4")
    assert lm.processor.video_frames == 4  # model_args override the saved processor's settings
    with pytest.raises(ValueError, match="task/test doc 3: a visual must be a PIL image or a video path, got int"):
        lm._prompt("what ?", [7], "task/test doc 3")
    prompt, images, videos = lm._prompt("what ?", [Image.new("RGB", (28, 28)), "v.mp4"], "doc")
    assert prompt.index("<image>") < prompt.index("<video>") < prompt.index("what ?")
    assert len(images) == len(videos) == 1
    assert generation_settings({"until": ["\n"], "max_new_tokens": 5, "temperature": 0}) == (
        {"max_new_tokens": 5, "do_sample": False}, ["\n"])
    assert generation_settings({"temperature": 0.5, "top_p": 0.9})[0] == {
        "max_new_tokens": 128, "do_sample": True, "temperature": 0.5, "top_p": 0.9}


def test_continuation_tokens_are_counted_on_the_joint_text():
    """With a BPE tokenizer that merges across the boundary ("x a" + "b" -> "x", "ab"), counting the continuation
    alone says 1 token; the joint text less the prompt says what the model actually scores."""
    pytest.importorskip("lmms_eval")
    from tokenizers import Tokenizer, models, trainers
    from transformers import PreTrainedTokenizerFast

    from onevision_encoder.lmm.lmms_eval_plugin import continuation_length

    core = Tokenizer(models.BPE(unk_token="<unk>"))
    core.train_from_iterator(["ab ab abc ab", "xab abc"], trainers.BpeTrainer(special_tokens=["<unk>"], vocab_size=40))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>")
    assert tokenizer.tokenize("xab")[-1] == "ab" and tokenizer.tokenize("xa")[-1] == "a"  # the merge happens
    # "xabc" is x | ab | c: the model scores 1 token after the prompt's "x", "a"; "bc" alone would be 2
    assert tokenizer.tokenize("xabc") == ["x", "ab", "c"] and len(tokenizer.tokenize("bc")) == 2
    assert continuation_length(tokenizer, "xa", "bc") == 1
    assert continuation_length(tokenizer, "x", "abc") == 2
    assert continuation_length(tokenizer, "xa", "b") == 1  # "xab" is as long as "xa": never less than one token
