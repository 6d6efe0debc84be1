"""LLaVA conversation data: parsing and its errors, assistant-only labels, batches, grouping by modality."""

import json
from collections import Counter

import pytest
import torch

from onevision_encoder.lmm import OneVisionLlavaProcessor
from onevision_encoder.lmm.data import (
    IGNORE_INDEX,
    ConversationCollator,
    ConversationDataset,
    ModalityLengthGroupedSampler,
    encode_conversation,
    load_conversations,
    parse_record,
)
from onevision_encoder.synthetic import write_image, write_video

RECORDS = [
    {"id": "t0", "conversations": [{"from": "human", "value": "describe this ."},
                                   {"from": "gpt", "value": "a helpful assistant ."}]},
    {"id": "i0", "image": "a.png", "conversations": [
        {"from": "human", "value": "<image>\nwhat colour is the shape ?"}, {"from": "gpt", "value": "red ."},
        {"from": "human", "value": "is the shape moving ?"}, {"from": "gpt", "value": "no ."}]},
    {"id": "i1", "image": ["a.png", "b.png"], "conversations": [
        {"from": "system", "value": "you are a helpful assistant ."},
        {"from": "human", "value": "<image> and <image> : what colour is the square ?"},
        {"from": "gpt", "value": "green and blue ."}]},
    {"id": "v0", "video": "v.mp4", "conversations": [
        {"from": "human", "value": "<video>\nwhat colour is the moving shape ?"}, {"from": "gpt", "value": "blue ."}]},
]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("llava_data")
    write_image(root / "a.png", width=42, height=28, seed=1)
    write_image(root / "b.png", width=28, height=28, seed=2)
    write_video(root / "v.mp4", num_frames=16, width=64, height=48, seed=3)
    return root


@pytest.fixture(scope="module")
def small_processor(tokenizer):
    return OneVisionLlavaProcessor(tokenizer, image_mode="native", video_frames=8, video_budget=24, video_size=56)


@pytest.fixture(scope="module")
def conversations(folder):
    path = folder / "data.json"
    path.write_text(json.dumps(RECORDS))
    return load_conversations(path, image_folder=str(folder), video_folder=str(folder))


def test_json_and_jsonl_give_the_same_conversations(folder, conversations):
    path = folder / "data.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in RECORDS) + "\n\n")
    assert load_conversations(path, image_folder=str(folder), video_folder=str(folder)) == conversations
    assert [c.modality for c in conversations] == ["text", "image", "image", "video"]
    assert conversations[2].images == [str(folder / "a.png"), str(folder / "b.png")]
    assert conversations[2].messages[0] == {"role": "system", "content": "you are a helpful assistant ."}


@pytest.mark.parametrize("record, message", [
    ({"id": "x", "image": "a.png", "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "no"}]},
     r"'x'.*0 <image> placeholder\(s\) for 1 image"),
    ({"id": "x", "conversations": [{"from": "human", "value": "<video> ?"}, {"from": "gpt", "value": "no"}]},
     r"1 <video> placeholder\(s\) for 0 video"),
    ({"id": "x", "conversations": []}, "non-empty 'conversations'"),
    ({"id": "x", "conversations": [{"from": "robot", "value": "hi"}]}, "turn 0 needs 'from'"),
    ({"id": "x", "conversations": [{"from": "gpt", "value": "hi"}, {"from": "human", "value": "hi"}]},
     "start with a human turn"),
    ({"id": "x", "image": "a.png", "conversations": [{"from": "human", "value": "hi"},
                                                     {"from": "gpt", "value": "<image>"}]}, "belong in human turns"),
    ({"id": "x", "image": 3, "conversations": [{"from": "human", "value": "<image>"}, {"from": "gpt", "value": "a"}]},
     "'image' must be a path"),
])
def test_bad_records_name_the_record_and_the_problem(record, message):
    with pytest.raises(ValueError, match=message):
        parse_record(record, "data.json: record 7")


def test_bad_files_name_the_file_and_line(tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text(json.dumps(RECORDS[0]) + "\n{not json\n")
    with pytest.raises(ValueError, match="broken.jsonl: not valid JSONL"):
        load_conversations(path)
    path.write_text(json.dumps(RECORDS[0]) + "\n" + json.dumps({"id": "q", "conversations": [{"from": "x"}]}) + "\n")
    with pytest.raises(ValueError, match=r"broken.jsonl:2 \(id 'q'\)"):
        load_conversations(path)


def answers(tokenizer, sample):
    """The labelled stretches of a sample, decoded one by one."""
    labels = sample["labels"].tolist()
    stretches, current = [], []
    for token, label in zip(sample["input_ids"].tolist(), labels):
        if label != IGNORE_INDEX:
            assert label == token  # labels are the input ids (the LM shifts them)
            current.append(token)
        elif current:
            stretches.append(tokenizer.decode(current)), current.clear()
    return stretches + ([tokenizer.decode(current)] if current else [])


def test_only_assistant_turns_carry_labels(small_processor, conversations):
    tokenizer = small_processor.tokenizer
    sample = encode_conversation(small_processor, conversations[1])
    assert [a.split() for a in answers(tokenizer, sample)] == [["red", ".", "<|im_end|>"], ["no", ".", "<|im_end|>"]]
    # Everything else is the prompt: system, the user turns, role headers, visual tokens.
    prompt = tokenizer.decode(sample["input_ids"][sample["labels"] == IGNORE_INDEX])
    assert "what colour is the shape" in prompt and "is the shape moving" in prompt and "red" not in prompt
    (image,) = sample["visual_items"]
    assert int((sample["input_ids"] == small_processor.image_token_id).sum()) == len(image)
    assert (sample["labels"][sample["input_ids"] == small_processor.image_token_id] == IGNORE_INDEX).all()


def test_the_template_renders_the_same_text_as_the_processor(small_processor, conversations):
    """Pieces put together are the processor's own chat rendering, placeholders expanded: nothing lost."""
    conversation = conversations[2]
    sample = encode_conversation(small_processor, conversation)
    text = small_processor.apply_chat_template(conversation.messages, tokenize=False)
    expected = small_processor(text=text, images=conversation.images)["input_ids"][0]
    assert sample["input_ids"].tolist() == expected.tolist()
    assert [len(i) for i in sample["visual_items"]] == [6, 4]  # native 42x28 and 28x28 images, 14-px patches


def test_max_length_cuts_text_but_never_visual_tokens(small_processor, conversations):
    full = encode_conversation(small_processor, conversations[1])
    cut = encode_conversation(small_processor, conversations[1], max_length=len(full["input_ids"]) - 3)
    assert cut["input_ids"].tolist() == full["input_ids"][:-3].tolist()
    with pytest.raises(ValueError, match="'i0'.*would cut visual tokens"):
        encode_conversation(small_processor, conversations[1], max_length=5)


def test_collated_batch_mixes_modalities_for_the_model(small_processor, conversations, make_model):
    dataset = ConversationDataset(conversations, small_processor, cache_visual=True)
    samples = [dataset[i] for i in range(len(dataset))]
    assert [s["modality"] for s in samples] == ["text", "image", "image", "video"]
    assert dataset[3]["visual_items"][0] is samples[3]["visual_items"][0]  # cached: decoded once
    batch = ConversationCollator(small_processor.tokenizer.pad_token_id)(samples)
    lengths = [len(s["input_ids"]) for s in samples]
    assert batch["attention_mask"].sum(1).tolist() == lengths
    assert (batch["labels"][batch["attention_mask"] == 0] == IGNORE_INDEX).all()
    assert batch["pixel_values"].shape[0] == 4  # 0 + 1 + 2 + 1 items, text order
    assert batch["patch_attention_mask"].sum(1).tolist() == [len(i) for s in samples for i in s["visual_items"]]

    model = make_model(small_processor.tokenizer)
    with torch.no_grad():
        out = model(**batch)
    # The model's loss is the mean next-token cross-entropy over the labelled tokens only.
    logits, labels = out.logits[:, :-1], batch["labels"][:, 1:]
    expected = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX)
    torch.testing.assert_close(out.loss, expected, atol=1e-5, rtol=1e-5)

    text_only = ConversationCollator(0)([samples[0]])
    assert "pixel_values" not in text_only


def test_sampler_groups_each_step_by_modality_and_length():
    modalities = ["text"] * 37 + ["image"] * 50 + ["video"] * 21
    lengths = torch.randint(1, 500, (len(modalities),), generator=torch.Generator().manual_seed(0)).tolist()
    sampler = ModalityLengthGroupedSampler(modalities, lengths, batch_size=4, world_size=2, megabatches=3)
    order = list(sampler)
    assert sorted(order) == list(range(len(modalities)))
    steps = [order[i : i + 8] for i in range(0, len(order), 8)]
    whole = len(steps) - 3  # at most one leftover step of each modality, mixed, at the end
    assert all(len({modalities[i] for i in step}) == 1 for step in steps[:whole])
    assert len({modalities[step[0]] for step in steps[:whole]}) == 3  # the steps of all modalities are shuffled
    for step in steps[:whole]:  # sorted within each mega-batch: every step is a contiguous length range
        assert [lengths[i] for i in step] == sorted((lengths[i] for i in step), reverse=True)
    assert Counter(modalities[i] for i in order) == Counter(modalities)
    assert list(sampler) == order  # deterministic per epoch...
    sampler.set_epoch(1)
    assert list(sampler) != order  # ...and shuffled anew for the next one
