"""LLaVA conversation data for training: records, token ids with assistant-only labels, batches.

The record format is the published LLaVA / LLaVA-NeXT one, as a JSON list or JSONL (one object a line):

    {"id": "000123", "image": "coco/0001.jpg",            # or a list of images, or "video": "clip.mp4"
     "conversations": [{"from": "human", "value": "<image>\\nWhat is on the table?"},
                       {"from": "gpt", "value": "A red cup."}]}

Roles `human`/`user`, `gpt`/`assistant` and `system` (`role`/`content` keys work too). Each `<image>` and
`<video>` placeholder (user turns only) takes the record's next image or video, so their counts must match.
Paths are relative to `image_folder` / `video_folder`.

Only assistant turns carry labels (the text an assistant turn adds to the chat template's rendering, its
end-of-turn token included); the system prompt, user turns, role headers and visual tokens are -100.
`ModalityLengthGroupedSampler` orders a data set so that every batch holds one modality (text, image or
video) of similar lengths, as the published stage 2 ("group by modality length") does.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field

import torch
from torch.utils.data import Dataset, Sampler

from ..processing import PatchClip
from .processing import visual_batch

IGNORE_INDEX = -100
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
MODALITIES = ("text", "image", "video")
PLACEHOLDERS = {"image": "<image>", "video": "<video>"}  # the data format's, whatever the processor's tokens
_PLACEHOLDER_PATTERN = "|".join(re.escape(m) for m in PLACEHOLDERS.values())


@dataclass
class Conversation:
    """One parsed record: chat messages (`role`, `content`) and the paths of its images and videos."""

    id: str
    messages: list[dict]
    images: list[str] = field(default_factory=list)
    videos: list[str] = field(default_factory=list)

    @property
    def modality(self) -> str:
        return "video" if self.videos else "image" if self.images else "text"

    @property
    def length(self) -> int:
        """A cheap length estimate for grouping (words of all turns): token counts need the tokenizer and the
        visual items, and within one modality the visual share is about constant."""
        return sum(len(m["content"].split()) for m in self.messages)


def _paths(value, folder: str | None, key: str, where: str) -> list[str]:
    if value is None:
        return []
    values = [value] if isinstance(value, str) else value
    if not isinstance(values, list) or not all(isinstance(v, str) and v for v in values):
        raise ValueError(f"{where}: {key!r} must be a path or a list of paths, got {value!r}")
    return [v if folder is None or os.path.isabs(v) else os.path.join(folder, v) for v in values]


def parse_record(record, where: str, image_folder: str | None = None, video_folder: str | None = None) -> Conversation:
    """Check one LLaVA record and turn it into a `Conversation`; `where` names it in errors."""
    if not isinstance(record, dict):
        raise ValueError(f"{where}: a record must be a JSON object, got {type(record).__name__}")
    where = f"{where} (id {record['id']!r})" if "id" in record else where
    turns = record.get("conversations")
    if not isinstance(turns, list) or not turns:
        raise ValueError(f"{where}: needs a non-empty 'conversations' list")
    messages = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise ValueError(f"{where}: turn {i} must be an object with 'from' and 'value'")
        role, content = turn.get("from", turn.get("role")), turn.get("value", turn.get("content"))
        if role not in ROLES or not isinstance(content, str):
            raise ValueError(f"{where}: turn {i} needs 'from' in {sorted(ROLES)} and a string 'value', got "
                             f"from={role!r} and a {type(content).__name__} value")
        messages.append({"role": ROLES[role], "content": content})
    spoken = [m["role"] for m in messages if m["role"] != "system"]
    if not spoken or spoken[0] != "user" or "assistant" not in spoken:
        raise ValueError(f"{where}: a conversation must start with a human turn and have a gpt turn, got roles "
                         f"{[t.get('from', t.get('role')) for t in turns]}")
    conversation = Conversation(
        id=str(record.get("id", where)),
        messages=messages,
        images=_paths(record.get("image"), image_folder, "image", where),
        videos=_paths(record.get("video"), video_folder, "video", where),
    )
    for kind, mark in PLACEHOLDERS.items():
        given = len(getattr(conversation, f"{kind}s"))
        in_text = sum(m["content"].count(mark) for m in messages)
        in_answers = sum(m["content"].count(mark) for m in messages if m["role"] == "assistant")
        if in_answers:
            raise ValueError(f"{where}: {mark} placeholders belong in human turns, found {in_answers} in gpt turns")
        if in_text != given:
            raise ValueError(f"{where}: the conversation has {in_text} {mark} placeholder(s) for {given} {kind}(s)")
    return conversation


def load_conversations(path: str | os.PathLike, image_folder: str | None = None,
                       video_folder: str | None = None) -> list[Conversation]:
    """Read a LLaVA conversation file (`.json`: a list of records; `.jsonl`: one record a line)."""
    path = os.fspath(path)
    try:
        with open(path, encoding="utf-8") as f:
            if path.endswith(".jsonl"):
                records = [(f"{path}:{n}", json.loads(line)) for n, line in enumerate(f, 1) if line.strip()]
            else:
                data = json.load(f)
                if not isinstance(data, list):
                    raise ValueError(f"{path}: a .json data file must hold a list of records")
                records = [(f"{path}: record {i}", r) for i, r in enumerate(data)]
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON{'L' if path.endswith('.jsonl') else ''}: {e}") from None
    if not records:
        raise ValueError(f"{path}: no records")
    return [parse_record(r, where, image_folder, video_folder) for where, r in records]


# ----------------------------------------------------------------------------------------------------
# Token ids and labels
# ----------------------------------------------------------------------------------------------------


def labelled_pieces(processor, messages: list[dict]) -> list[tuple[str, bool]]:
    """The rendered chat as (text, is_assistant_answer) pieces, located by rendering prefix after prefix.

    An answer is what rendering the conversation up to and including that assistant turn adds to rendering
    it up to the turn before with the generation prompt: the answer text and the template's end of turn.
    """
    def render(msgs, generation_prompt=False):
        return processor.tokenizer.apply_chat_template(msgs, chat_template=processor.chat_template, tokenize=False,
                                                       add_generation_prompt=generation_prompt)

    pieces, done = [], ""
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before, through = render(messages[:i], True), render(messages[: i + 1])
        if not (before.startswith(done) and through.startswith(before)):
            raise ValueError("the chat template does not render a conversation prefix by prefix, so the assistant "
                             "turns cannot be located for labelling")
        pieces += [(before[len(done):], False), (through[len(before):], True)]
        done = through
    pieces.append((render(messages)[len(done):], False))
    return [(text, answer) for text, answer in pieces if text]


def encode_conversation(processor, conversation: Conversation, max_length: int | None = None,
                        items: list[PatchClip] | None = None) -> dict:
    """Token ids, labels (-100 outside answers) and the visual items (text order) of one conversation.

    Each `<image>`/`<video>` becomes as many of the processor's placeholder tokens as its item has visual
    tokens. `items`: the visual items if already made (else they are made here with the processor). Past
    `max_length` the text is cut at the end; a cut through visual tokens is an error naming the record.
    """
    if items is None:
        items = visual_items(processor, conversation)
    tokenizer, queue = processor.tokenizer, iter(items)
    token_ids = {PLACEHOLDERS["image"]: processor.image_token_id, PLACEHOLDERS["video"]: processor.video_token_id}
    input_ids, labels = [], []
    for text, answer in labelled_pieces(processor, conversation.messages):
        for chunk in re.split(f"({_PLACEHOLDER_PATTERN})", text):
            if chunk in token_ids:
                ids = [token_ids[chunk]] * len(next(queue))
            elif chunk:
                ids = tokenizer(chunk, add_special_tokens=False)["input_ids"]
            else:
                continue
            input_ids += ids
            labels += ids if answer else [IGNORE_INDEX] * len(ids)
    if max_length is not None and len(input_ids) > max_length:
        placeholder = {processor.image_token_id, processor.video_token_id}
        if any(t in placeholder for t in input_ids[max_length:]):
            raise ValueError(f"record {conversation.id!r}: {len(input_ids)} tokens, and cutting them to max_length "
                             f"{max_length} would cut visual tokens; raise max_length or use fewer visual tokens")
        input_ids, labels = input_ids[:max_length], labels[:max_length]
    return {"input_ids": torch.tensor(input_ids), "labels": torch.tensor(labels), "visual_items": items}


def visual_items(processor, conversation: Conversation) -> list[PatchClip]:
    """The conversation's images and videos as patch lists, in the order their placeholders appear."""
    text = "".join(m["content"] for m in conversation.messages)
    queues = {PLACEHOLDERS["image"]: iter(enumerate(conversation.images)),
              PLACEHOLDERS["video"]: iter(enumerate(conversation.videos))}
    items = []
    for mark in re.findall(_PLACEHOLDER_PATTERN, text):
        index, path = next(queues[mark])
        name = f"record {conversation.id!r}: {mark[1:-1]} {index}"
        image = mark == PLACEHOLDERS["image"]
        items.append(processor.image_item(path, name) if image else processor.video_item(path, name))
    return items


class ConversationDataset(Dataset):
    """LLaVA conversations as training samples (`encode_conversation` per item, plus its modality).

    cache_visual: keep each record's patch lists after their first use (small data sets trained for several
    epochs; memory grows with the data set).
    """

    def __init__(self, conversations: list[Conversation], processor, max_length: int | None = None,
                 cache_visual: bool = False):
        self.conversations, self.processor, self.max_length = conversations, processor, max_length
        self._cache: dict[int, list[PatchClip]] | None = {} if cache_visual else None

    def __len__(self) -> int:
        return len(self.conversations)

    def __getitem__(self, index: int) -> dict:
        conversation = self.conversations[index]
        items = self._cache.get(index) if self._cache is not None else None
        if items is None:
            items = visual_items(self.processor, conversation)
            if self._cache is not None:
                self._cache[index] = items
        sample = encode_conversation(self.processor, conversation, self.max_length, items)
        return {**sample, "modality": conversation.modality}

    @property
    def modalities(self) -> list[str]:
        return [c.modality for c in self.conversations]

    @property
    def lengths(self) -> list[int]:
        return [c.length for c in self.conversations]


@dataclass
class ConversationCollator:
    """Samples -> one batch: right-padded `input_ids`, `attention_mask`, `labels` (-100 on padding) and, when
    any sample has images or videos, all items in text order as one padded patch-list batch
    (`pixel_values`, `patch_positions`, `patch_attention_mask`)."""

    pad_token_id: int

    def __call__(self, samples: list[dict]) -> dict[str, torch.Tensor]:
        length = max(len(s["input_ids"]) for s in samples)
        input_ids = torch.full((len(samples), length), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(samples), length), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(samples), length), dtype=torch.long)
        for row, sample in enumerate(samples):
            n = len(sample["input_ids"])
            input_ids[row, :n], labels[row, :n], attention_mask[row, :n] = sample["input_ids"], sample["labels"], 1
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
        items = [item for sample in samples for item in sample["visual_items"]]
        if items:
            batch.update(visual_batch(items))
        return batch


class ModalityLengthGroupedSampler(Sampler[int]):
    """A shuffled order in which every run of `batch_size * world_size` indices (one optimiser step's samples
    over all processes) holds one modality and similar lengths.

    Each modality is shuffled, cut into mega-batches of `megabatches` steps, each sorted by length (longest
    first) and cut into steps; the steps of all modalities are then shuffled together. The few samples left
    over by each modality form the last, mixed steps. Deterministic per (seed, epoch).
    """

    def __init__(self, modalities: list[str], lengths: list[int], batch_size: int, world_size: int = 1,
                 seed: int = 0, megabatches: int = 50):
        if len(modalities) != len(lengths):
            raise ValueError(f"{len(modalities)} modalities for {len(lengths)} lengths")
        self.modalities, self.lengths = modalities, lengths
        self.step, self.megabatch = batch_size * world_size, batch_size * world_size * megabatches
        self.seed, self.epoch = seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.modalities)

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        steps, leftovers = [], []
        for modality in MODALITIES:
            indices = [i for i, m in enumerate(self.modalities) if m == modality]
            indices = [indices[j] for j in torch.randperm(len(indices), generator=generator).tolist()]
            for start in range(0, len(indices), self.megabatch):
                mega = sorted(indices[start : start + self.megabatch], key=lambda i: -self.lengths[i])
                full = len(mega) - len(mega) % self.step
                steps += [mega[j : j + self.step] for j in range(0, full, self.step)]
                leftovers += mega[full:]
        order = [steps[j] for j in torch.randperm(len(steps), generator=generator).tolist()]
        order += [leftovers[j : j + self.step] for j in range(0, len(leftovers), self.step)]
        return iter([i for step in order for i in step])
