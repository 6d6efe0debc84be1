"""The OneVision LLaVA model as an `lmms-eval` model: `lmms-eval --model onevision_llava --model_args pretrained=DIR`.

lmms-eval (0.7.3) finds external models through the Python entry-point group `lmms_eval.models`; this
package declares `onevision_llava = onevision_encoder.lmm.lmms_eval_plugin:manifest` there (pyproject.toml),
so installing it is all the registration there is. Only lmms-eval imports this module.

Each request's visuals (`doc_to_visual`) say their modality by type: PIL images are images, strings are
video file paths (lmms-eval's convention). A prompt without placeholders gets one per visual in front, as
lmms-eval's own LLaVA models do. `--model_args`: pretrained (a directory or hub id of an OneVision LLaVA
checkpoint with its processor), device (default cuda if available), dtype (auto, bfloat16, float16,
float32), batch_size, attn_implementation, and image_mode / video_mode / video_frames / video_budget /
video_size to override the processor's.
"""

from __future__ import annotations

import torch
from PIL import Image
from tqdm import tqdm

from lmms_eval.api.instance import GenerationResult, Instance
from lmms_eval.api.model import lmms

MODEL_ID = "onevision_llava"
PROCESSOR_OPTIONS = {"image_mode": str, "video_mode": str, "video_frames": int, "video_budget": int, "video_size": int}


def manifest():
    """The entry point's payload: lmms-eval's model manifest pointing at `OneVisionLlava`."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=MODEL_ID, simple_class_path=f"{__name__}.OneVisionLlava")


def generation_settings(settings: dict) -> tuple[dict, list[str]]:
    """lmms-eval's generation kwargs -> `generate()` arguments and the stop strings. Greedy unless a
    temperature above 0 asks for sampling."""
    settings = dict(settings)
    until = settings.pop("until", None) or []
    until = [until] if isinstance(until, str) else [u for u in until if u]
    generate = {"max_new_tokens": int(settings.get("max_new_tokens", 128)), "do_sample": False}
    if float(settings.get("temperature") or 0) > 0:
        generate.update(do_sample=True, temperature=float(settings["temperature"]))
        if settings.get("top_p") is not None:
            generate["top_p"] = float(settings["top_p"])
    if int(settings.get("num_beams") or 1) > 1:
        generate["num_beams"] = int(settings["num_beams"])
    return generate, until


class OneVisionLlava(lmms):
    """Greedy or sampled generation and log-likelihoods with an OneVision LLaVA checkpoint."""

    def __init__(self, pretrained: str, device: str | None = None, dtype: str = "auto", batch_size: int | str = 1,
                 attn_implementation: str | None = None, **processor_options) -> None:
        super().__init__()
        import onevision_encoder.lmm  # noqa: F401  (registers the model with transformers' Auto classes)
        from accelerate import Accelerator
        from transformers import AutoModelForImageTextToText, AutoProcessor

        unknown = sorted(set(processor_options) - set(PROCESSOR_OPTIONS))
        if unknown:
            raise ValueError(f"{MODEL_ID}: unknown model_args {unknown}; known: pretrained, device, dtype, batch_size, "
                             f"attn_implementation, {', '.join(PROCESSOR_OPTIONS)}")
        # lmms-eval shards the documents by rank and gathers the results through this accelerator.
        self.accelerator = accelerator = Accelerator()
        self._rank, self._world_size = accelerator.process_index, accelerator.num_processes
        if device is None:
            device = f"cuda:{accelerator.local_process_index}" if torch.cuda.is_available() else "cpu"
        self._device = torch.device(device)
        if dtype != "auto" and not isinstance(getattr(torch, dtype, None), torch.dtype):
            raise ValueError(f"{MODEL_ID}: dtype must be auto, bfloat16, float16 or float32, got {dtype!r}")
        load = {"dtype": dtype if dtype == "auto" else getattr(torch, dtype)}
        if attn_implementation:
            load["attn_implementation"] = attn_implementation
        self.model = AutoModelForImageTextToText.from_pretrained(pretrained, **load).to(self._device).eval()
        options = {k: PROCESSOR_OPTIONS[k](v) for k, v in processor_options.items()}
        self.processor = AutoProcessor.from_pretrained(pretrained, **options)
        self.batch_size = int(batch_size)

    # -- prompts -------------------------------------------------------------------------------------------

    def _prompt(self, context: str, visuals: list, where: str) -> tuple[str, list, list]:
        """The chat prompt for one request and its images and videos (in prompt order)."""
        images, videos, marks = [], [], []
        for visual in visuals:
            if isinstance(visual, Image.Image):
                images.append(visual)
                marks.append(self.processor.image_token)
            elif isinstance(visual, str):
                videos.append(visual)
                marks.append(self.processor.video_token)
            else:
                raise ValueError(f"{where}: a visual must be a PIL image or a video path, got {type(visual).__name__}")
        if visuals and self.processor.image_token not in context and self.processor.video_token not in context:
            context = "\n".join(marks) + "\n" + context
        messages = [{"role": "user", "content": context}]
        return self.processor.apply_chat_template(messages, add_generation_prompt=True), images, videos

    def _request_prompt(self, request: Instance) -> tuple[str, list, list]:
        context, _, doc_to_visual, doc_id, task, split = request.args
        visuals = doc_to_visual(self.task_dict[task][split][doc_id]) or []
        return self._prompt(context, list(visuals), f"{task}/{split} doc {doc_id}")

    def _inputs(self, prompts: list[str], images: list[list], videos: list[list]) -> dict:
        batch = self.processor(text=prompts, images=images, videos=videos)
        return {k: v.to(self._device) if torch.is_tensor(v) else v for k, v in batch.items()}

    # -- lmms-eval's interface -----------------------------------------------------------------------------

    def generate_until(self, requests: list[Instance]) -> list[str]:
        answers = [""] * len(requests)
        groups: dict[str, list[int]] = {}  # one batch shares its generation settings
        for i, request in enumerate(requests):
            groups.setdefault(repr(sorted(request.args[1].items())), []).append(i)
        progress = tqdm(total=len(requests), disable=self.rank != 0, desc=MODEL_ID)
        for indices in groups.values():
            indices.sort(key=lambda i: -len(requests[i].args[0]))  # longest first: out of memory early if at all
            generate, until = generation_settings(requests[indices[0]].args[1])
            for start in range(0, len(indices), self.batch_size):
                chunk = indices[start : start + self.batch_size]
                prompts, images, videos = zip(*(self._request_prompt(requests[i]) for i in chunk))
                inputs = self._inputs(list(prompts), list(images), list(videos))
                with torch.inference_mode():
                    generated = self.model.generate(**inputs, **generate,
                                                    pad_token_id=self.processor.tokenizer.pad_token_id)
                for i, tokens in zip(chunk, generated[:, inputs["input_ids"].shape[1]:]):
                    text = self.processor.tokenizer.decode(tokens, skip_special_tokens=True)
                    for stop in until:
                        text = text.split(stop)[0]
                    answers[i] = text.strip()
                progress.update(len(chunk))
        progress.close()
        return answers

    def loglikelihood(self, requests: list[Instance]) -> list[GenerationResult]:
        """Per request: the mean negative log-likelihood of the continuation's tokens after the prompt (what
        lmms-eval's own models return and its multiple-choice scoring takes the argmin of) and whether greedy
        decoding would give the continuation."""
        results = []
        tokenizer = self.processor.tokenizer
        for request in tqdm(requests, disable=self.rank != 0, desc=f"{MODEL_ID} loglikelihood"):
            prompt, images, videos = self._request_prompt(request)
            continuation = request.args[1]
            inputs = self._inputs([prompt + continuation], [images], [videos])
            n = continuation_length(tokenizer, prompt, continuation)
            target = inputs["input_ids"][0, -n:]
            with torch.inference_mode():
                logits = self.model(**inputs).logits[0, -n - 1 : -1].float()
            loss = -torch.log_softmax(logits, dim=-1).gather(1, target[:, None]).mean()
            # lmms-eval 0.7.3 turns any reply other than a string or a GenerationResult into its str(); its
            # GenerationResult passes the (loss, greedy) pair through untouched.
            results.append(GenerationResult(text=(float(loss), bool((logits.argmax(-1) == target).all()))))
        return results

    def generate_until_multi_round(self, requests) -> list[str]:
        raise NotImplementedError(f"{MODEL_ID} does not implement multi-round generation")


def continuation_length(tokenizer, prompt: str, continuation: str) -> int:
    """How many of the tokens of `prompt + continuation` are the continuation's: the joint text's count less
    the prompt's, as lmms-eval's and lm-eval-harness's own models count (tokenizing the continuation alone
    miscounts where a token spans the boundary); at least one."""
    def count(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    return max(1, count(prompt + continuation) - count(prompt))
