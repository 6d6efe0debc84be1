"""The whole pretraining path on CPU, as the README tells it: generated images and videos, their features from
a small model (`ove encode`), concept banks and labels (`ove concepts`), a tiny model trained by `ove train`
until its loss has fallen by more than half, and the result loaded by `from_pretrained` and run by `ove encode`."""

import json
import os

import torch
from transformers import AutoImageProcessor, AutoModel

import onevision_encoder
from onevision_encoder.cli import main
from onevision_encoder.train.logging import read_log

TINY_P14 = os.path.join(os.path.dirname(__file__), "..", "data", "tiny-p14")


def test_features_banks_training_and_the_trained_model(tmp_path, training_data, tiny_config, one_thread, capsys):
    features = {}
    for name, mode in (("images", "image"), ("videos", "frames")):
        features[name] = tmp_path / f"{name}-features"
        frames = ["--frames", "8"] if mode == "frames" else []
        assert main(["encode", str(training_data / name), "--model", TINY_P14, "--out", str(features[name]),
                     "--mode", mode, "--workers", "0", *frames]) == 0
        bank, labels = tmp_path / f"{name}-bank.safetensors", tmp_path / f"{name}-labels.npy"
        assert main(["concepts", "build", str(features[name]), "--num-concepts", "4", "--out", str(bank)]) == 0
        assert main(["concepts", "assign", str(features[name]), "--bank", str(bank), "--top-k", "1",
                     "--out", str(labels)]) == 0

    # One label a sample: with so few concepts, a sample's other labels are close negatives that hold a multi-
    # label loss near scale * margin until its embedding is within the 0.75 threshold of all of them.
    config = tiny_config(tmp_path / "run", steps=200)
    config["run"].update(save_every=100, log_every=1)
    config["optim"].update(lr=5e-3, warmup_steps=10)
    for head in config["heads"]:
        name = head["name"]
        head.update(inputs=[str(features[name])], labels=str(tmp_path / f"{name}-labels.npy"),
                    bank=str(tmp_path / f"{name}-bank.safetensors"), num_classes=None, sample_rate=1.0,
                    labels_per_step=1)
    config["heads"][1]["batch_size"] = 2
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    capsys.readouterr()
    assert main(["train", str(path)]) == 0

    log = read_log(tmp_path / "run")
    first = sum(r["loss"] for r in log[:10]) / 10
    last = sum(r["loss"] for r in log[-10:]) / 10
    print(f"loss {first:.2f} -> {last:.2f}")
    assert last < 0.5 * first
    assert (tmp_path / "run" / "loss.png").stat().st_size > 1000

    final = tmp_path / "run" / "final"
    model = AutoModel.from_pretrained(final).eval()
    processor = AutoImageProcessor.from_pretrained(final)
    assert processor.crop_size["height"] == 48  # the last stage's image size
    assert main(["encode", str(training_data / "images"), "--model", str(final), "--out", str(tmp_path / "encoded"),
                 "--mode", "image", "--workers", "0"]) == 0
    encoded = onevision_encoder.load_features(tmp_path / "encoded")
    assert encoded.pooled.shape == (16, 64)
    from PIL import Image

    pixels = onevision_encoder.image_processor()(Image.open(encoded.paths[0]).convert("RGB"),
                                                 return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        direct = model(pixel_values=pixels).pooler_output[0]
    torch.testing.assert_close(torch.as_tensor(encoded.pooled[0]), direct, rtol=1e-4, atol=1e-4)
