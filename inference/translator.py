"""The Translator API behind `inference.translate` and `inference.evaluate`.

A student folder (config.json with model_type rk_student, vocab_map.json) runs the encoder-decoder; any
other folder is treated as a Qwen causal LM and prompted with its chat template, exactly as in training.
With backend onnx, onnx-int8 or rknn-sim the folder is a deploy output (DIST: deploy/contract.py; the backends:
inference/backends.py) and the exported graphs decode greedily, one sentence at a time as on the board.

A text over the model's source limit is never truncated: it is refused (InputTooLongError), or with split_long=True
translated sentence by sentence (inference/splitting.py) and the pieces joined again.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Sequence

import torch

import data
import vocabulary
from config import DIRECTIONS
from deploy import contract
from inference import backends, splitting

log = logging.getLogger(__name__)


class InputTooLongError(ValueError):
    """A text has more tokens than the model accepts; index is its place in the list given to translate()."""

    def __init__(self, tokens: int, limit: int, text: str, index: int | None = None):
        self.tokens, self.limit, self.text, self.index = tokens, limit, text, index
        which = "input" if index is None else f"input {index + 1}"
        preview = text if len(text) <= 40 else text[:40] + "..."
        super().__init__(f"{which} ({preview!r}) has {tokens} tokens, the model takes at most {limit}: "
                         "pass --split_long (Translator(..., split_long=True)) to split it by sentence")


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
    stop = [tokenizer.convert_tokens_to_ids(vocabulary.EOS_TOKEN),
            tokenizer.convert_tokens_to_ids(vocabulary.PAD_TOKEN)]
    with torch.no_grad():
        out = model.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                             do_sample=False, num_beams=1, eos_token_id=stop, pad_token_id=pad,
                             synced_gpus=synced_gpus)
    return [text.strip() for text in tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)]


class Translator:
    """Load a model folder once, translate many sentences (batched, greedy or beam).

    split_long: translate a text over the source limit sentence by sentence instead of refusing it.
    """

    def __init__(self, folder: str | Path, device: str = "cpu", max_len: int | None = None, backend: str = "torch",
                 split_long: bool = False):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        import model as student_lib
        self.folder = Path(folder)
        self.split_long = split_long
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
            # safetensors only: a pickled pytorch_model.bin from elsewhere could run code when loaded
            self.model = student_lib.StudentForTranslation.from_pretrained(folder, use_safetensors=True).to(
                self.device).eval()
            vocab = vocabulary.VocabMap.load(folder)
            vocab.check_tokenizer(self.tokenizer, str(folder))
            cfg = self.model.config
            self.builder = data.ExampleBuilder(self.tokenizer, vocab, cfg.max_source_len, cfg.max_target_len)
            self.max_source_len, self.max_target_len = cfg.max_source_len, cfg.max_target_len
        else:
            self.model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=False).to(self.device).eval()
            full = vocabulary.VocabMap.full(self.tokenizer, self.model.config.vocab_size)
            self.max_source_len, self.max_target_len = max_len or 128, max_len or 128
            self.builder = data.ExampleBuilder(self.tokenizer, full, self.max_source_len, self.max_target_len)
        self.parameters = sum(p.numel() for p in self.model.parameters())

    def _load_deployed(self, backend: str) -> None:
        """A DIST folder: the student's tokenizer and vocabulary map from DIST/tokenizer, graphs per backend."""
        from transformers import AutoTokenizer

        dist = contract.Dist(self.folder)
        meta = contract.DeployMeta.load(dist.meta)
        self.tokenizer = AutoTokenizer.from_pretrained(dist.tokenizer)
        vocab = vocabulary.VocabMap.load(dist.tokenizer)
        vocab.check_tokenizer(self.tokenizer, str(dist.tokenizer))
        self.is_student, self.model = True, None
        self.builder = data.ExampleBuilder(self.tokenizer, vocab, meta.S, meta.Tc)
        self.max_source_len, self.max_target_len = meta.S, meta.Tc
        self.parameters = meta.parameters
        self.decoder = backends.open_decoder(self.folder, backend, progress=True)

    def token_count(self, text: str) -> int:
        """Source tokens of text as the model sees it (the limit applies to this number)."""
        return len(self.builder.student_ids(text.strip()))

    def fits(self, text: str) -> bool:
        return self.token_count(text) <= self.max_source_len

    def source_ids(self, text: str) -> list[int]:
        ids = self.builder.student_ids(text.strip())
        if len(ids) > self.max_source_len:
            raise InputTooLongError(len(ids), self.max_source_len, text)
        return ids

    def pieces(self, text: str, index: int | None = None) -> list[str]:
        """[text] when it fits; with split_long its sentences, cut further where one is still too long."""
        tokens = self.token_count(text)
        if tokens <= self.max_source_len:
            return [text]
        if not self.split_long:
            raise InputTooLongError(tokens, self.max_source_len, text, index)
        pieces = splitting.split_to_fit(text, self.token_count, self.max_source_len)
        log.debug("input %s: %d tokens > %d, translated in %d pieces", index, tokens, self.max_source_len,
                  len(pieces))
        return pieces

    def translate(self, texts: Sequence[str], direction: str, num_beams: int = 1, batch_size: int = 32) -> list[str]:
        """One translation per text. Every text is checked before any is translated, so a refusal costs nothing."""
        if direction not in DIRECTIONS:
            raise ValueError(f"direction must be one of {', '.join(DIRECTIONS)}, got {direction!r}")
        pieces, owners = [], []
        for index, text in enumerate(texts):
            for piece in self.pieces(text, index):
                pieces.append(piece)
                owners.append(index)
        order = sorted(range(len(pieces)), key=lambda i: len(pieces[i]))
        translated: list[str] = [""] * len(pieces)
        cut_off = 0
        for start in range(0, len(order), batch_size):
            chunk = order[start:start + batch_size]
            outputs, cut = self._translate_batch([pieces[i] for i in chunk], direction, num_beams)
            cut_off += cut
            for i, text in zip(chunk, outputs):
                translated[i] = text
        if cut_off:
            log.warning("%d of %d translations reached the model's limit of %d target tokens without an end token "
                        "and may be cut off; shorter inputs avoid this (--split_long splits by sentence)", cut_off,
                        len(pieces), self.max_target_len)
        # Chinese is written without spaces between sentences, English with one.
        joiner = "" if direction.endswith("-zh") else " "
        parts: list[list[str]] = [[] for _ in texts]
        for owner, text in zip(owners, translated):
            if text.strip():
                parts[owner].append(text.strip())
        return [joiner.join(p) for p in parts]

    def _translate_batch(self, texts: Sequence[str], direction: str, num_beams: int) -> tuple[list[str], int]:
        """Translations of texts that fit, and how many of them stopped at max_target_len (students only)."""
        if not self.is_student:
            prompts = [self.builder.prompt_text(t.strip(), direction) for t in texts]
            ids = [self.tokenizer.encode(p, add_special_tokens=False) for p in prompts]
            return teacher_generate(self.model, self.tokenizer, ids, self.max_target_len, self.device), 0
        sources = [self.source_ids(t) for t in texts]
        if self.decoder is not None:
            if num_beams > 1:
                raise ValueError(f"backend {self.backend} decodes greedily only; use num_beams=1")
            out = self.decoder.decode(sources, [data.direction_index(direction)] * len(sources))
        else:
            width = max(len(s) for s in sources)
            pad = self.builder.pad_id
            source = torch.tensor([s + [pad] * (width - len(s)) for s in sources], device=self.device)
            mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in sources], device=self.device)
            direction_ids = torch.full((len(texts),), data.direction_index(direction), device=self.device)
            out = self.model.generate(source, mask, direction_ids, num_beams=num_beams)
        # Both decoders drop the end token, so a row as long as the limit is one that never produced it.
        cut = sum(len(row) >= self.max_target_len for row in out)
        return [self.builder.decode(row) for row in out], cut
