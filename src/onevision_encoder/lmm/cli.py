"""`ove lmm`: the multimodal LLM's sub-commands (`convert`; training adds its own beside it)."""

from __future__ import annotations

import os
import sys


def add_lmm_parser(sub) -> None:
    p = sub.add_parser("lmm", help="the encoder inside a multimodal LLM (LLaVA-style): convert, train",
                       description="OneVision LLaVA models: our encoder, the mlp2x_gelu projector and any causal LM.")
    lmm_sub = p.add_subparsers(dest="lmm_command", required=True)
    _add_convert_parser(lmm_sub)
    _add_train_parser(lmm_sub)


def _add_convert_parser(sub) -> None:
    p = sub.add_parser(
        "convert",
        help="a checkpoint of the published LLaVA-NeXT fork (llava_qwen3) -> our layout",
        description="Rename the published checkpoint's weights (model.vision_tower.vision_tower.*, "
        "model.mm_projector.0/.2, the LLM's keys) and config (mm_* keys) into a OneVisionLlavaConfig folder "
        "that AutoModelForImageTextToText loads; the processor is written too, over --tokenizer or SRC's tokenizer. "
        "Exit status 2 for a source that is not in that layout or a DST that exists.",
    )
    p.add_argument("src", metavar="SRC", help="folder of the published checkpoint (config.json, *.safetensors)")
    p.add_argument("dst", metavar="DST", help="new output folder")
    p.add_argument("--vision-config", metavar="DIR_OR_ID",
                   help="the encoder's config (default: mm_vision_tower if it is a local folder, else read off "
                        "the weights' shapes)")
    p.add_argument("--tokenizer", metavar="DIR_OR_ID",
                   help="the LLM's tokenizer for the processor (default: SRC's, if it has one)")
    p.set_defaults(func=_run_convert)


def _run_convert(args) -> int:
    from .convert import convert

    try:
        config = convert(args.src, args.dst, vision_config=args.vision_config, tokenizer=args.tokenizer)
    except (ValueError, OSError) as e:
        print(f"ove lmm convert: error: {e}", file=sys.stderr)
        return 2
    text, vision = config.text_config, config.vision_config
    print(f"{args.dst}: {text.model_type} LLM ({text.num_hidden_layers} layers, width {text.hidden_size}) with a "
          f"{vision.num_hidden_layers}-layer encoder (width {vision.hidden_size}), features from layer "
          f"{config.vision_feature_layer}")
    if not os.path.isfile(os.path.join(args.dst, "processor_config.json")):
        print(f"{args.dst}: no processor (SRC has no tokenizer; give --tokenizer): build one over the LLM's tokenizer "
              f"with OneVisionLlavaProcessor; the model takes <image> as id {config.image_token_id} and <video> as "
              f"id {config.video_token_id}")
    return 0


def _add_train_parser(sub) -> None:
    p = sub.add_parser(
        "train",
        help="one of the two published training stages (1: projector only, 2: everything) from a YAML/JSON config",
        description="Train an OneVision LLaVA checkpoint on LLaVA conversation data with transformers' Trainer. "
        "CONFIG keys: model, data, output_dir, stage (1 or 2), processor, image_folder, video_folder, max_length, "
        "cache_visual, group_by_modality_length, vision_tower_lr, training (TrainingArguments fields, e.g. "
        "deepspeed or fsdp). Launch with torchrun or accelerate launch for several GPUs. Exit status 2 for a bad "
        "config or bad data.",
    )
    p.add_argument("config", metavar="CONFIG", help="the run's YAML or JSON file")
    p.set_defaults(func=_run_train)


def _run_train(args) -> int:
    from .train import TrainConfig, train

    try:
        config = TrainConfig.from_file(args.config)
        trainer = train(config)
    except (ValueError, OSError) as e:
        print(f"ove lmm train: error: {e}", file=sys.stderr)
        return 2
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    summary = f"; loss {losses[0]:.3f} -> {losses[-1]:.3f}" if losses else ""
    print(f"{config.output_dir}: stage {config.stage}, {trainer.state.global_step} steps{summary}")
    return 0
