"""The Translator API behind `inference.translate` and `inference.evaluate`.

A student folder (config.json with model_type rk_student, vocab_map.json) runs the encoder-decoder; any
other folder is treated as a Qwen causal LM and prompted with its chat template, exactly as in training.
With backend onnx, onnx-int8 or rknn-sim the folder is a deploy output (DIST, see inference/backends.py) and the
exported graphs decode greedily, one sentence at a time as on the board.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Sequence

import torch

import data
from inference import backends

log = logging.getLogger(__name__)


class InputTooLongError(ValueError):
    """A sentence has more tokens than the model accepts."""


def is_student_folder(folder: str | Path) -> bool:
    config = Path(folder, "config.json")
    return config.is_file() and json.loads(config.read_text()).get("model_type") == "rk_student"


def teacher_generate(model, tokenizer, prompts: Sequence[Sequence[int]], max_new_tokens: int, device,
                     synced_gpus: bool = False) -> list[str]:
    """Greedy continuations of chat prompts (token ids), left-padded into one batch."""
    width = max(len(p) for p in prompts)
    pad = tokenizer.pad_token_id
    input_ids = torch.tensor([[pad] * (width - len(p)) + list(p) for p in prompts], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    stop = [tokenizer.convert_tokens_to_ids(data.EOS_TOKEN), tokenizer.convert_tokens_to_ids(data.PAD_TOKEN)]
    with torch.no_grad():
        out = model.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                             do_sample=False, num_beams=1, eos_token_id=stop, pad_token_id=pad,
                             synced_gpus=synced_gpus)
    return [text.strip() for text in tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)]


class Translator:
    """Load a model folder once, translate many sentences (batched, greedy or beam)."""

    def __init__(self, folder: str | Path, device: str = "cpu", max_len: int | None = None, backend: str = "torch"):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        import model as student_lib
        self.folder = Path(folder)
        self.backend = backends.check_backend(backend)
        self.decoder: backends.Decoder | None = None
        if backend != "torch":
            self._load_deployed(backend)
            return
        if not Path(folder, "config.json").is_file():
            raise FileNotFoundError(f"{folder}: no config.json; give a student or teacher model folder")
        self.device = torch.device(device)
        self.tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
        self.is_student = is_student_folder(folder)
        if self.is_student:
            self.model = student_lib.StudentForTranslation.from_pretrained(folder).to(self.device).eval()
            vocab = data.VocabMap.load(folder)
            vocab.check_tokenizer(self.tokenizer, str(folder))
            cfg = self.model.config
            self.builder = data.ExampleBuilder(self.tokenizer, vocab, cfg.max_source_len, cfg.max_target_len)
            self.max_source_len, self.max_target_len = cfg.max_source_len, cfg.max_target_len
        else:
            self.model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=False).to(self.device).eval()
            full = data.VocabMap.full(self.tokenizer, self.model.config.vocab_size)
            self.max_source_len, self.max_target_len = max_len or 128, max_len or 128
            self.builder = data.ExampleBuilder(self.tokenizer, full, self.max_source_len, self.max_target_len)
        self.parameters = sum(p.numel() for p in self.model.parameters())

    def _load_deployed(self, backend: str) -> None:
        """A DIST folder: the student's tokenizer and vocabulary map from DIST/tokenizer, graphs per backend."""
        from transformers import AutoTokenizer

        dist = backends.Dist(self.folder)
        meta = backends.DeployMeta.load(dist.meta)
        self.tokenizer = AutoTokenizer.from_pretrained(dist.tokenizer)
        vocab = data.VocabMap.load(dist.tokenizer)
        vocab.check_tokenizer(self.tokenizer, str(dist.tokenizer))
        self.is_student, self.model = True, None
        self.builder = data.ExampleBuilder(self.tokenizer, vocab, meta.S, meta.Tc)
        self.max_source_len, self.max_target_len = meta.S, meta.Tc
        self.parameters = meta.parameters
        self.decoder = backends.open_decoder(self.folder, backend, progress=True)

    def source_ids(self, text: str) -> list[int]:
        ids = self.builder.student_ids(text.strip())
        if len(ids) > self.max_source_len:
            raise InputTooLongError(f"input has {len(ids)} tokens, the model takes at most {self.max_source_len}: "
                                    f"{text[:40]!r}...; shorten it or split it into sentences")
        return ids

    def translate(self, texts: Sequence[str], direction: str, num_beams: int = 1, batch_size: int = 32) -> list[str]:
        if direction not in ("zh-en", "en-zh"):
            raise ValueError(f"direction must be zh-en or en-zh, got {direction!r}")
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        results: list[str] = [""] * len(texts)
        for start in range(0, len(order), batch_size):
            chunk = order[start:start + batch_size]
            for i, text in zip(chunk, self._translate_batch([texts[i] for i in chunk], direction, num_beams)):
                results[i] = text
        return results

    def _translate_batch(self, texts: Sequence[str], direction: str, num_beams: int) -> list[str]:
        if not self.is_student:
            prompts = [self.builder.prompt_text(t.strip(), direction) for t in texts]
            ids = [self.tokenizer.encode(p, add_special_tokens=False) for p in prompts]
            return teacher_generate(self.model, self.tokenizer, ids, self.max_target_len, self.device)
        sources = [self.source_ids(t) for t in texts]
        if self.decoder is not None:
            if num_beams > 1:
                raise ValueError(f"backend {self.backend} decodes greedily only; use num_beams=1")
            out = self.decoder.decode(sources, [data.direction_index(direction)] * len(sources))
            return [self.builder.decode(row) for row in out]
        width = max(len(s) for s in sources)
        pad = self.builder.pad_id
        source = torch.tensor([s + [pad] * (width - len(s)) for s in sources], device=self.device)
        mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in sources], device=self.device)
        direction_ids = torch.full((len(texts),), data.direction_index(direction), device=self.device)
        out = self.model.generate(source, mask, direction_ids, num_beams=num_beams)
        return [self.builder.decode(row) for row in out]
