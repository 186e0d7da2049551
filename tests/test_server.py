"""inference.server as a real subprocess on a free localhost port, spoken to with http.client."""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from conftest import ROOT
from inference import Translator

LIMITS = ["--max_body_bytes", "4096", "--max_texts", "8", "--max_chars", "200"]
TEXTS = {"zh-en": ["打开文件", "保存", "退出程序"], "en-zh": ["Open the file", "Save", "Quit"]}


class Server:
    """A running `python -m inference.server --port 0`; its log goes to a file, so a chatty server never blocks on a
    full pipe, and the port it picked is read from that log."""

    def __init__(self, model: Path, log: Path, *flags: str):
        self.log = log
        with log.open("w") as handle:
            self.proc = subprocess.Popen([sys.executable, "-m", "inference.server", "--model", str(model),
                                          "--port", "0", *flags], cwd=ROOT, stdout=handle, stderr=subprocess.STDOUT,
                                         env={**os.environ, "HF_HUB_OFFLINE": "1"})
        deadline = time.monotonic() + 120
        while not (found := re.search(r"serving .* on http://127\.0\.0\.1:(\d+)", log.read_text())):
            assert self.proc.poll() is None, f"server exited with {self.proc.returncode}:\n{log.read_text()}"
            assert time.monotonic() < deadline, f"server did not start in 120 s:\n{log.read_text()}"
            time.sleep(0.2)
        self.port = int(found.group(1))

    def call(self, method: str, path: str, body: bytes | dict | None = None,
             headers: dict[str, str] | None = None) -> tuple[int, http.client.HTTPResponse, dict]:
        """(status, response, its JSON body)."""
        if isinstance(body, dict):
            body = json.dumps(body).encode()
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=120)
        try:
            connection.request(method, path, body=body, headers=headers or {})
            response = connection.getresponse()
            payload = json.loads(response.read())
        finally:
            connection.close()
        assert response.getheader("Content-Type") == "application/json; charset=utf-8"
        return response.status, response, payload

    def translate(self, texts: list, direction: str) -> tuple[int, dict]:
        status, _, payload = self.call("POST", "/translate", {"texts": texts, "direction": direction})
        return status, payload

    def stop(self) -> int:
        """SIGTERM, then the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=120)


@pytest.fixture(scope="module")
def translator(student_folder) -> Translator:
    return Translator(student_folder)


@pytest.fixture(scope="module")
def server(student_folder, tmp_path_factory):
    running = Server(student_folder, tmp_path_factory.mktemp("server") / "server.log", *LIMITS, "--max_queue", "16")
    yield running
    assert running.stop() == 0, running.log.read_text()


def test_health(server, student_folder, translator):
    status, _, health = server.call("GET", "/health")
    assert status == 200
    assert health == {"ok": True, "model": str(student_folder), "backend": "torch", "directions": ["zh-en", "en-zh"],
                      "parameters": translator.parameters, "max_source_len": 24, "split_long": False, "pending": 0,
                      "max_queue": 16}


@pytest.mark.parametrize("direction", ["zh-en", "en-zh"])
def test_translations_equal_the_translator_s(server, translator, direction):
    status, payload = server.translate(TEXTS[direction], direction)
    assert status == 200
    assert payload == {"translations": translator.translate(TEXTS[direction], direction)}
    assert all(payload["translations"])


def test_concurrent_requests_are_all_answered_correctly(server, translator):
    requests = [([f"{text}{i}" for text in TEXTS[direction]][:1 + i % 3], direction)
                for i in range(8) for direction in ("zh-en", "en-zh")]
    with ThreadPoolExecutor(len(requests)) as pool:
        answers = list(pool.map(lambda request: server.translate(*request), requests))
    assert [status for status, _ in answers] == [200] * len(requests)
    assert [payload["translations"] for _, payload in answers] == [translator.translate(*r) for r in requests]


@pytest.mark.parametrize(("body", "status", "message"), [
    (b"{not json", 400, "body is not valid UTF-8 JSON"),
    (b"\xff\xfe", 400, "body is not valid UTF-8 JSON"),
    (b'["Open"]', 400, "body must be a JSON object, got list"),
    ({"texts": "Open", "direction": "en-zh"}, 400, "texts must be a list of strings, got str"),
    ({"direction": "en-zh"}, 400, "texts must be a list of strings, got NoneType"),
    ({"texts": ["Open", 3], "direction": "en-zh"}, 400, "texts[1] must be a string, got int"),
    ({"texts": ["Open"], "direction": "fr-en"}, 400, "direction must be one of zh-en, en-zh, got 'fr-en'"),
    ({"texts": ["Open"]}, 400, "direction must be one of zh-en, en-zh, got None"),
    ({"texts": ["Open"], "direction": "en-zh", "beams": 4}, 400, "unknown field(s) beams"),
    ({"texts": ["Open"] * 9, "direction": "en-zh"}, 413, "9 texts in one request; this server takes at most 8"),
    ({"texts": ["x" * 201], "direction": "en-zh"}, 413, "texts[0] has 201 characters; this server takes at most 200"),
    ({"texts": ["Open", "文件" * 60], "direction": "zh-en"}, 400,
     "texts[1] has 60 tokens, the model takes at most 24: shorten it"),
    (json.dumps({"texts": ["x" * 150] * 8, "direction": "en-zh"}).encode() + b" " * 3000, 413,
     "this server takes at most 4096 (--max_body_bytes)"),
], ids=["broken", "not-utf8", "list", "texts-str", "no-texts", "text-int", "unknown-direction", "no-direction",
        "extra-field", "too-many-texts", "too-many-chars", "too-many-tokens", "body-too-large"])
def test_bad_requests_get_a_json_error(server, body, status, message):
    got, _, payload = server.call("POST", "/translate", body)
    assert (got, list(payload)) == (status, ["error"])
    assert message in payload["error"]


@pytest.mark.parametrize(("method", "path", "status", "allow"), [
    ("GET", "/translate", 405, "POST"), ("PUT", "/translate", 405, "POST"), ("DELETE", "/translate", 405, "POST"),
    ("POST", "/health", 405, "GET"), ("GET", "/", 404, None), ("POST", "/v1/translate", 404, None),
])
def test_wrong_path_or_method(server, method, path, status, allow):
    got, response, payload = server.call(method, path, {"texts": ["Open"], "direction": "en-zh"})
    assert (got, response.getheader("Allow")) == (status, allow)
    assert payload["error"].startswith("no such path" if status == 404 else f"{method} {path} is not allowed")


def test_body_without_content_length_is_refused(server):
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    connection.putrequest("POST", "/translate")
    connection.endheaders()
    response = connection.getresponse()
    assert response.status == 411
    assert json.loads(response.read())["error"].startswith("send a Content-Length header")
    connection.close()


def test_full_queue_answers_503_and_sigterm_finishes_accepted_work(student_folder, tmp_path):
    """--max_queue 0: while one big request is being translated, any other is refused at once."""
    server = Server(student_folder, tmp_path / "server.log", "--max_queue", "0", "--max_texts", "3000",
                    "--max_body_bytes", "1000000")
    try:
        slow_texts = [f"打开文件{i}" for i in range(400)]  # about a second of decoding, far longer than one call
        with ThreadPoolExecutor(1) as pool:
            slow = pool.submit(server.translate, slow_texts, "zh-en")
            while server.call("GET", "/health")[2]["pending"] == 0:
                assert not slow.done(), slow.result()
                time.sleep(0.05)
            status, response, payload = server.call("POST", "/translate", {"texts": ["保存"], "direction": "zh-en"})
            assert (status, response.getheader("Retry-After")) == (503, "1")
            assert payload["error"] == ("server busy: one request in progress and 0 waiting, the most allowed "
                                        "(--max_queue 0); retry later")
            server.proc.send_signal(signal.SIGTERM)
            status, payload = slow.result(timeout=300)
        assert status == 200 and len(payload["translations"]) == 400
        assert server.proc.wait(timeout=120) == 0
        log = server.log.read_text()
        assert "SIGTERM: no new connections; finishing 1 accepted requests" in log
        assert log.rstrip().endswith("inference.server INFO stopped")
    finally:
        server.stop()


@pytest.fixture(scope="module")
def dist(student_folder, small_corpus, tmp_path_factory) -> Path:
    """The student exported as `python -m deploy` does its first step: DIST/onnx, onnx-int8, tokenizer."""
    from deploy import export_onnx
    out = tmp_path_factory.mktemp("dist") / "onnx"
    export_onnx.export(export_onnx.ExportOptions(model=student_folder, out=out, calib=small_corpus / "valid.jsonl",
                                                 test=small_corpus / "test.jsonl", n_parity=4, n_calib=2, n_eval=1))
    return out.parent


def test_onnx_backend(dist, tmp_path):
    server = Server(dist, tmp_path / "server.log", "--backend", "onnx")
    try:
        assert server.call("GET", "/health")[2]["backend"] == "onnx"
        status, payload = server.translate(TEXTS["en-zh"], "en-zh")
        assert status == 200
        assert payload["translations"] == Translator(dist, backend="onnx").translate(TEXTS["en-zh"], "en-zh")
    finally:
        assert server.stop() == 0


def test_help_explains_every_flag():
    out = subprocess.run([sys.executable, "-m", "inference.server", "--help"], cwd=ROOT, capture_output=True,
                         text=True)
    assert out.returncode == 0
    flags = ["--model", "--backend", "--host", "--port", "--device", "--num_beams", "--batch_size", "--split_long",
             "--max_body_bytes", "--max_texts", "--max_chars", "--max_queue", "--log_level"]
    assert all(flag in out.stdout for flag in flags)
    assert "POST /translate" in out.stdout and "Retry-After" in out.stdout
