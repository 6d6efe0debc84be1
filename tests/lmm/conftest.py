"""Tiny real components for the LMM tests: our encoder (tiny-p14's config), a random Qwen3, a word-level
tokenizer built here with `tokenizers` and a ChatML template, and the processor over them."""

import os

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast, Qwen3Config

from onevision_encoder import OneVisionEncoderConfig
from onevision_encoder.lmm import OneVisionLlavaConfig, OneVisionLlavaForConditionalGeneration, OneVisionLlavaProcessor

TINY_P14 = os.path.join(os.path.dirname(__file__), "..", "data", "tiny-p14")
SPECIALS = ["<pad>", "<unk>", "<|im_start|>", "<|im_end|>", "<image>", "<video>"]
WORDS = ("system user assistant you are a helpful what colour is the shape square circle red green blue yes no "
         "moving left right up down describe this image video frame chart document picture and in of").split()


def build_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer: special tokens first, then words and punctuation; split on spaces and punctuation."""
    vocab = {t: i for i, t in enumerate(SPECIALS + WORDS + list(".,?!:\n"))}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", unk_token="<unk>",
                                        eos_token="<|im_end|>")
    tokenizer.add_tokens(SPECIALS[2:], special_tokens=True)
    return tokenizer


def tiny_text_config(vocab_size: int, cls=Qwen3Config, **extra):
    sizes = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096)
    if cls is Qwen3Config:
        sizes.update(head_dim=16, tie_word_embeddings=True)
    return cls(**sizes, **extra)


def tiny_model(tokenizer, text_config=None, seed: int = 0) -> OneVisionLlavaForConditionalGeneration:
    torch.manual_seed(seed)
    config = OneVisionLlavaConfig(
        vision_config=OneVisionEncoderConfig.from_pretrained(TINY_P14),
        text_config=text_config or tiny_text_config(len(tokenizer)),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        video_token_id=tokenizer.convert_tokens_to_ids("<video>"),
    )
    return OneVisionLlavaForConditionalGeneration(config).eval()


@pytest.fixture(scope="session")
def tokenizer():
    return build_tokenizer()


@pytest.fixture(scope="session")
def model(tokenizer):
    return tiny_model(tokenizer)


@pytest.fixture(scope="session")
def processor(tokenizer):
    return OneVisionLlavaProcessor(tokenizer)


@pytest.fixture(scope="session")
def make_model():
    """`make_model(tokenizer, text_config=None, seed=0)`: a fresh tiny model (test modules cannot import conftest)."""
    return tiny_model


@pytest.fixture(scope="session")
def make_text_config():
    """`make_text_config(vocab_size, cls=Qwen3Config, **extra)`: a tiny causal LM config."""
    return tiny_text_config
