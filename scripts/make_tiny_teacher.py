"""Build a small, randomly initialised Qwen2 teacher folder that loads like a real Qwen checkpoint.

    python -m scripts.make_tiny_teacher --corpus data/catalogs --out models/tiny-qwen [--size tiny|small]

Trains a Qwen2-style byte-level BPE tokenizer on both sides of CORPUS/train.jsonl, then writes OUT/ with
tokenizer.json, tokenizer_config.json (ChatML template), config.json, generation_config.json and
model.safetensors (float32). The model's vocab_size is padded past the tokenizer's length, as real Qwen's is,
so the rows past len(tokenizer) are never produced by the tokenizer.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Protocol

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
from tokenizers import processors, trainers

from corpus import CorpusError, read_pairs
from vocabulary import BOS_TOKEN, EOS_TOKEN, PAD_TOKEN

if TYPE_CHECKING:
    from transformers import Qwen2ForCausalLM, Qwen2TokenizerFast

log = logging.getLogger("make_tiny_teacher")

# Qwen2's pre-tokenizer pattern (single digits, unlike GPT-4's \p{N}{1,3}).
QWEN2_SPLIT_PATTERN = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
                       r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")
# Qwen's order: the three specials take the ids right after the BPE vocabulary (151643, 151644, 151645).
SPECIAL_TOKENS = (PAD_TOKEN, BOS_TOKEN, EOS_TOKEN)
VOCAB_MULTIPLE = 64

# Qwen2 ChatML, without Qwen's implicit default system message so a lone user turn renders minimally.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{- raise_exception('unsupported chat role: ' + message['role']) }}"
    "{%- endif %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- endif %}"
)


@dataclass(frozen=True)
class Architecture:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    max_positions: int = 512
    model_vocab: int = 0  # output rows; 0 = the tokenizer's length padded to a multiple of VOCAB_MULTIPLE

    def describe(self) -> str:
        return (f"hidden {self.hidden}, {self.layers} layers, {self.heads} heads ({self.kv_heads} KV), "
                f"MLP {self.intermediate}")


SIZES = {
    "tiny": Architecture(hidden=128, layers=2, heads=4, kv_heads=2, intermediate=384),
    "small": Architecture(hidden=256, layers=4, heads=8, kv_heads=4, intermediate=768),
    # benchmark shapes (bench/train_step.py): speed only, never trained
    "medium": Architecture(hidden=512, layers=8, heads=8, kv_heads=4, intermediate=1408),
    "qwen1.5-1.8b": Architecture(hidden=2048, layers=24, heads=16, kv_heads=16, intermediate=5504,
                                 max_positions=4096, model_vocab=151936),
}
DEFAULT_VOCAB = {"tiny": 6000, "small": 8000, "medium": 8000, "qwen1.5-1.8b": 8000}


class TextPair(Protocol):
    zh: str
    en: str


@dataclass(frozen=True)
class TeacherInfo:
    path: Path
    parameters: int
    tokenizer_len: int
    model_vocab: int
    size: str

    def summary(self) -> str:
        return (f"{self.size} teacher: {self.parameters:,} parameters, tokenizer {self.tokenizer_len} tokens, "
                f"model vocab {self.model_vocab} (padded to a multiple of {VOCAB_MULTIPLE}) -> {self.path}")


def padded_vocab_size(tokenizer_len: int) -> int:
    """Next multiple of VOCAB_MULTIPLE strictly above tokenizer_len, so unused rows always exist (as in Qwen)."""
    return (tokenizer_len // VOCAB_MULTIPLE + 1) * VOCAB_MULTIPLE


def qwen2_backend(model: models.Model) -> Tokenizer:
    """A tokenizers.Tokenizer wired like Qwen2's tokenizer.json around the given BPE model."""
    backend = Tokenizer(model)
    backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    return backend


def add_qwen_specials(backend: Tokenizer) -> None:
    backend.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in SPECIAL_TOKENS])


def wrap_qwen2_tokenizer(backend: Tokenizer, model_max_length: int) -> Qwen2TokenizerFast:
    from transformers import Qwen2TokenizerFast  # transformers and torch load lazily: usage errors answer at once

    return Qwen2TokenizerFast(tokenizer_object=backend, bos_token=None, unk_token=None, eos_token=EOS_TOKEN,
                              pad_token=PAD_TOKEN, chat_template=CHAT_TEMPLATE, model_max_length=model_max_length)


def train_tokenizer(texts: list[str], vocab_size: int, max_positions: int) -> Qwen2TokenizerFast:
    """Byte-level BPE on texts; vocab_size counts the three specials, all 256 bytes are always tokens."""
    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise ValueError(f"vocab_size {vocab_size} is too small: the 256 byte tokens and "
                         f"{len(SPECIAL_TOKENS)} special tokens alone need {256 + len(SPECIAL_TOKENS)}")
    backend = qwen2_backend(models.BPE())
    # Specials are not given to the trainer: it would put them at ids 0-2, whereas Qwen appends them.
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - len(SPECIAL_TOKENS), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(texts, trainer, length=len(texts))
    add_qwen_specials(backend)
    return wrap_qwen2_tokenizer(backend, max_positions)


def random_qwen2(arch: Architecture, vocab_size: int, pad_id: int, eos_id: int, seed: int,
                 tie_embeddings: bool = False, dtype: str = "float32",
                 attention_dropout: float = 0.0) -> Qwen2ForCausalLM:
    import torch
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        vocab_size=vocab_size, hidden_size=arch.hidden, num_hidden_layers=arch.layers,
        num_attention_heads=arch.heads, num_key_value_heads=arch.kv_heads, intermediate_size=arch.intermediate,
        max_position_embeddings=arch.max_positions, tie_word_embeddings=tie_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0},
        # Qwen2Config's defaults point at 151643 and would fall outside a small vocabulary.
        bos_token_id=None, eos_token_id=eos_id, pad_token_id=pad_id, dtype=dtype,
        attention_dropout=attention_dropout,  # Qwen2's only dropout: it regularises a teacher trained for many epochs
    )
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config).to(getattr(torch, dtype))
    model.generation_config = GenerationConfig(eos_token_id=eos_id, pad_token_id=pad_id)
    return model


def save_folder(tokenizer: Qwen2TokenizerFast, model: Qwen2ForCausalLM, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    # The template goes into tokenizer_config.json, where Qwen's own checkpoints and older tools look for it.
    tokenizer.save_pretrained(out_dir, save_jinja_files=False)
    model.save_pretrained(out_dir, safe_serialization=True)


def check_output_folder(out_dir: Path, force: bool) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise FileExistsError(f"{out_dir} exists and is not a folder")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not force:
        raise FileExistsError(f"{out_dir} is not empty; pass --force (force=True) to overwrite its files")


def build_teacher(pairs: Iterable[TextPair], out_dir: str | Path, size: str = "tiny", vocab_size: int | None = None,
                  seed: int = 0, force: bool = False, dtype: str = "float32",
                  attention_dropout: float = 0.0) -> TeacherInfo:
    """Train the tokenizer on both sides of pairs, build the random model, save both to out_dir.

    With force, files in a non-empty out_dir are overwritten in place (nothing else there is deleted).
    """
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; choose one of {', '.join(SIZES)}")
    out_dir = Path(out_dir)
    check_output_folder(out_dir, force)
    pairs = list(pairs)
    if not pairs:
        raise ValueError("no training pairs to train the tokenizer on")
    arch = SIZES[size]
    vocab_size = DEFAULT_VOCAB[size] if vocab_size is None else vocab_size

    started = time.perf_counter()
    tokenizer = train_tokenizer([p.zh for p in pairs] + [p.en for p in pairs], vocab_size, arch.max_positions)
    log.info("tokenizer: %d tokens from %d pairs in %.1fs", len(tokenizer), len(pairs), time.perf_counter() - started)

    pad_id, eos_id = tokenizer.convert_tokens_to_ids([PAD_TOKEN, EOS_TOKEN])
    model = random_qwen2(arch, arch.model_vocab or padded_vocab_size(len(tokenizer)), pad_id, eos_id, seed,
                         dtype=dtype, attention_dropout=attention_dropout)
    save_folder(tokenizer, model, out_dir)
    log.info("saved %s in %.1fs", out_dir, time.perf_counter() - started)
    return TeacherInfo(out_dir, model.num_parameters(), len(tokenizer), model.config.vocab_size, size)


def make_tiny_teacher(pairs: Iterable[TextPair], out_dir: str | Path, size: str = "tiny",
                      vocab_size: int | None = None, seed: int = 0, force: bool = False) -> Path:
    """Build a teacher folder (see build_teacher) and return its path."""
    return build_teacher(pairs, out_dir, size, vocab_size, seed, force).path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", default="data/catalogs", help="corpus folder; its train.jsonl trains the tokenizer")
    parser.add_argument("--out", default="models/tiny-qwen", help="output folder for the teacher (must be empty)")
    parser.add_argument("--size", choices=sorted(SIZES), default="tiny",
                        help="model shape: " + "; ".join(f"{k}: {v.describe()}" for k, v in SIZES.items()))
    parser.add_argument("--vocab_size", type=int, default=None,
                        help="tokenizer size including the 3 special tokens (default: "
                             + ", ".join(f"{k} {v}" for k, v in DEFAULT_VOCAB.items()) + ")")
    parser.add_argument("--seed", type=int, default=0, help="seed for the random weights")
    parser.add_argument("--force", action="store_true", help="overwrite files in a non-empty --out folder")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                        help="weights' precision (bfloat16 halves a benchmark-sized teacher; default float32)")
    parser.add_argument("--attention_dropout", type=float, default=0.0,
                        help="Qwen2's attention dropout while it is fine-tuned (default 0.0)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    train_file = Path(args.corpus) / "train.jsonl"
    try:
        pairs = read_pairs(train_file)
        if not pairs:
            raise CorpusError(f"{train_file}: no pairs")
        info = build_teacher(pairs, args.out, args.size, args.vocab_size, args.seed, args.force, args.dtype,
                             args.attention_dropout)
    except CorpusError as exc:
        print(f"make_tiny_teacher: no usable corpus: {exc} (build one with: python -m scripts.build_corpus)",
              file=sys.stderr)
        return 2
    except (FileExistsError, ValueError) as exc:
        print(f"make_tiny_teacher: {exc}", file=sys.stderr)
        return 2
    print(info.summary())
    return 0


if __name__ == "__main__":
    sys.exit(main())
