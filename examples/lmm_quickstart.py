"""Multimodal LLM quick start with no network: our encoder + a causal LM, a mixed batch, generation.

Generates a video, a chart-like picture and two photos; builds a small random Qwen3 with a tokenizer
trained here on a few sentences (stand-ins for a real LLM such as Qwen/Qwen3-4B-Instruct-2507), joins it
to an encoder checkpoint in the published layout (default: the small one shipped in tests/data/tiny-p14),
then runs one batch of a text-only, a single-image, a two-image and a video conversation through
`generate()`, saves the model and processor and loads them back with the Auto classes.

    python examples/lmm_quickstart.py
    python examples/lmm_quickstart.py --encoder lmms-lab-encoder/onevision-encoder-large --llm Qwen/Qwen3-4B-Instruct-2507

The random LLM answers nonsense; the point is the plumbing. Images are read at native resolution and the
video is selected on a 12x12 grid here, so that it runs in seconds on a CPU; `--published-geometry` gives the
published geometry (anyres images, 64 frames on 36x36 patches, 10368 video tokens).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (AutoModelForImageTextToText, AutoProcessor, AutoTokenizer, PreTrainedTokenizerFast,
                          Qwen3Config, Qwen3ForCausalLM)

from onevision_encoder import synthetic
from onevision_encoder.lmm import OneVisionLlavaForConditionalGeneration, OneVisionLlavaProcessor

TINY_CHECKPOINT = Path(__file__).resolve().parent.parent / "tests" / "data" / "tiny-p14"
CHATML = ["<|im_start|>", "<|im_end|>", "<|endoftext|>"]


def small_llm(folder: Path) -> str:
    """A BPE tokenizer trained on a few sentences and a random 2-layer Qwen3 over it, saved in `folder`."""
    core = Tokenizer(models.BPE(unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    text = ["You are a helpful assistant.", "What happens in the video?", "Describe the chart.",
            "What changed between the two pictures?", "Write a haiku about the sea."]
    core.train_from_iterator(text * 4, trainers.BpeTrainer(vocab_size=300, special_tokens=["[UNK]", *CHATML],
                                                           initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tokenizer.save_pretrained(folder)
    config = Qwen3Config(vocab_size=len(tokenizer) + 2, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, tie_word_embeddings=True)
    torch.manual_seed(0)
    Qwen3ForCausalLM(config).save_pretrained(folder)  # +2: room for <image> and <video>
    return str(folder)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--encoder", default=str(TINY_CHECKPOINT), help="encoder: hub id or local folder")
    parser.add_argument("--llm", help="causal LM: hub id or local folder (default: a small random one)")
    parser.add_argument("--out", default="out/lmm_quickstart", help="where the generated inputs and model go")
    parser.add_argument("--published-geometry", action="store_true",
                        help="anyres images and the 36x36-grid codec video (slower on a CPU)")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    video = synthetic.write_video(out / "clip.mp4", num_frames=96, width=320, height=240)["path"]
    chart, photo_a, photo_b = (synthetic.write_image(out / name, width=w, height=h, seed=i) for i, (name, w, h) in
                               enumerate([("chart.png", 280, 140), ("a.jpg", 160, 120), ("b.jpg", 120, 160)]))

    llm = args.llm or small_llm(out / "llm")
    settings = {} if args.published_geometry else dict(image_mode="native", video_budget=8 * 144, video_size=168)
    processor = OneVisionLlavaProcessor(AutoTokenizer.from_pretrained(llm), **settings)
    model = OneVisionLlavaForConditionalGeneration.from_encoder_and_llm(
        args.encoder, llm, image_token_id=processor.image_token_id, video_token_id=processor.video_token_id).eval()

    def ask(*items, question):
        return [{"role": "user", "content": [*items, {"type": "text", "text": question}]}]

    conversations = [
        ask(question="Write a haiku about the sea."),
        ask({"type": "image", "image": chart}, question="Describe the chart."),
        ask({"type": "image", "image": photo_a}, {"type": "image", "image": photo_b},
            question="What changed between the two pictures?"),
        ask({"type": "video", "video": video}, question="What happens in the video?"),
    ]
    batch = processor.apply_chat_template(conversations, add_generation_prompt=True, tokenize=True)
    tokens = batch["patch_attention_mask"].sum(1).tolist()
    print(f"one batch: {len(conversations)} samples, {len(tokens)} visual items of {tokens} tokens, "
          f"prompt length {batch['input_ids'].shape[1]} (left-padded)")
    with torch.inference_mode():
        generated = model.generate(**batch, max_new_tokens=8, do_sample=False)
    for answer in processor.tokenizer.batch_decode(generated[:, batch["input_ids"].shape[1]:], skip_special_tokens=True):
        print("answer:", repr(answer))

    model.save_pretrained(out / "model")
    processor.save_pretrained(out / "model")
    loaded = AutoModelForImageTextToText.from_pretrained(out / "model").eval()
    again = AutoProcessor.from_pretrained(out / "model").apply_chat_template(conversations, add_generation_prompt=True,
                                                                             tokenize=True)
    with torch.inference_mode():
        diff = (loaded(**again).logits - model(**batch).logits).abs().max().item()
    print(f"saved to {out / 'model'} and loaded back: max |diff| of the logits {diff:.1e}")


if __name__ == "__main__":
    main()
