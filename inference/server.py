"""Serve a student (or teacher) folder over HTTP: POST /translate and GET /health.

    python -m inference.server --model runs/quickstart/distill/final --port 8000
    python -m inference.server --model dist/rv1126b --backend onnx        # a deploy output folder (DIST)

    curl -s localhost:8000/translate -d '{"texts": ["打开文件"], "direction": "zh-en"}'
    {"translations": ["Open file"]}
    curl -s localhost:8000/health
    {"ok": true, "model": "...", "backend": "torch", "directions": ["zh-en", "en-zh"], ...}

One model instance translates one request at a time (its texts batched); up to --max_queue more requests wait, and
beyond that the answer is 503 with Retry-After. Every request is checked (size, JSON, types, direction) before it
waits; a text over the model's token limit is refused with 400 (or, with --split_long, translated sentence by
sentence). Errors are JSON {"error": "..."} with a 4xx status: 400 malformed, 404 unknown path, 405 wrong method,
411 no Content-Length, 413 too large. SIGTERM or SIGINT stops accepting connections, finishes the requests already
accepted, and exits 0.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

import vocabulary
from config import DIRECTIONS
from deploy import contract
from inference import backends
from inference.translator import InputTooLongError, Translator
from inference.worker import QueueFullError, TranslationWorker

log = logging.getLogger("inference.server")

RETRY_AFTER_S = 1  # a request takes well under a second on a small student; clients should come back soon
# An unread body up to this many times --max_body_bytes is read and dropped before answering: closing a connection
# with unread data resets it, and the client would see the reset instead of our error.
DRAIN_FACTOR = 4
ROUTES = {"/translate": "POST", "/health": "GET"}
SERVER_BACKENDS = ("torch", "onnx", "onnx-int8")


class RequestError(ValueError):
    """A request the server will not take; status is the HTTP status to answer with."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Limits:
    max_body_bytes: int
    max_texts: int
    max_chars: int


def parse_request(body: bytes, limits: Limits) -> tuple[list[str], str]:
    """(texts, direction) from a /translate body; RequestError says what is wrong and how to fix it."""
    example = '{"texts": ["..."], "direction": "zh-en"}'
    try:
        payload = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RequestError(400, f"body is not valid UTF-8 JSON ({exc}); send {example}") from None
    if not isinstance(payload, dict):
        raise RequestError(400, f"body must be a JSON object, got {type(payload).__name__}; send {example}")
    unknown = sorted(set(payload) - {"texts", "direction"})
    if unknown:
        raise RequestError(400, f"unknown field(s) {', '.join(unknown)}; send only texts and direction")
    texts, direction = payload.get("texts"), payload.get("direction")
    if not isinstance(texts, list):
        raise RequestError(400, f"texts must be a list of strings, got {type(texts).__name__}; send {example}")
    if direction not in DIRECTIONS:
        raise RequestError(400, f"direction must be one of {', '.join(DIRECTIONS)}, got {direction!r}")
    if len(texts) > limits.max_texts:
        raise RequestError(413, f"{len(texts)} texts in one request; this server takes at most {limits.max_texts} "
                                "(--max_texts): send several requests")
    for index, text in enumerate(texts):
        if not isinstance(text, str):
            raise RequestError(400, f"texts[{index}] must be a string, got {type(text).__name__}")
        if len(text) > limits.max_chars:
            raise RequestError(413, f"texts[{index}] has {len(text)} characters; this server takes at most "
                                    f"{limits.max_chars} (--max_chars): split it")
    return texts, direction


class TranslationServer(ThreadingHTTPServer):
    """A thread per connection; the model itself is only used by the worker's thread."""

    daemon_threads = False  # server_close() then waits for requests in progress: the graceful part of shutdown

    def __init__(self, address: tuple[str, int], worker: TranslationWorker, limits: Limits):
        super().__init__(address, Handler)
        self.worker, self.limits = worker, limits

    def health(self) -> dict[str, Any]:
        translator = self.worker.translator
        return {"ok": True, "model": str(translator.folder), "backend": translator.backend,
                "directions": list(DIRECTIONS), "parameters": translator.parameters,
                "max_source_len": translator.max_source_len, "split_long": translator.split_long,
                "pending": self.worker.pending, "max_queue": self.worker.max_queue}


class Handler(BaseHTTPRequestHandler):
    server: TranslationServer
    server_version = "rk-distill"
    timeout = 60  # seconds a client may stall mid-request before its connection (and thread) is dropped

    def do_GET(self) -> None:
        self._route("GET")

    def do_POST(self) -> None:
        self._route("POST")

    def do_PUT(self) -> None:
        self._route("PUT")

    def do_DELETE(self) -> None:
        self._route("DELETE")

    def do_PATCH(self) -> None:
        self._route("PATCH")

    def _route(self, method: str) -> None:
        self._started, self._body_read = time.perf_counter(), False
        path = urlsplit(self.path).path
        allowed = ROUTES.get(path)
        if allowed is None:
            self._send(404, {"error": f"no such path {path}; use POST /translate or GET /health"})
        elif method != allowed:
            self._send(405, {"error": f"{method} {path} is not allowed; use {allowed} {path}"}, {"Allow": allowed})
        elif path == "/health":
            self._send(200, self.server.health())
        else:
            self._translate()

    def _translate(self) -> None:
        try:
            texts, direction = parse_request(self._read_body(), self.server.limits)
            translations = self.server.worker.submit(texts, direction).result()
        except RequestError as exc:
            self._send(exc.status, {"error": str(exc)})
        except QueueFullError as exc:
            self._send(503, {"error": str(exc)}, {"Retry-After": str(RETRY_AFTER_S)})
        except InputTooLongError as exc:
            self._send(400, {"error": f"texts[{exc.index}] has {exc.tokens} tokens, the model takes at most "
                                      f"{exc.limit}: shorten it or split it into sentences (or start the server "
                                      "with --split_long)"})
        except Exception as exc:  # noqa: BLE001 -- one bad request must not take the server down
            log.exception("translating failed")
            self._send(500, {"error": f"internal error ({type(exc).__name__}: {exc}); see the server log"})
        else:
            self._send(200, {"translations": translations})

    def _read_body(self) -> bytes:
        length = self.headers.get("Content-Length")
        if length is None:
            raise RequestError(411, "send a Content-Length header with the JSON body (chunked bodies are not taken)")
        if not length.isdigit():
            raise RequestError(400, f"Content-Length {length!r} is not a number of bytes")
        if int(length) > self.server.limits.max_body_bytes:
            raise RequestError(413, f"body has {length} bytes; this server takes at most "
                                    f"{self.server.limits.max_body_bytes} (--max_body_bytes)")
        self._body_read = True
        try:
            return self.rfile.read(int(length))
        except TimeoutError:
            raise RequestError(408, f"the body did not arrive within {self.timeout} s; send it whole") from None

    def _drain_body(self) -> None:
        length = self.headers.get("Content-Length", "")
        unread = int(length) if length.isdigit() and not self._body_read else 0
        if unread <= DRAIN_FACTOR * self.server.limits.max_body_bytes:
            self.rfile.read(unread)
        self._body_read = True

    def _send(self, status: int, payload: dict[str, Any], headers: dict[str, str] | None = None) -> None:
        self._drain_body()
        body = json.dumps(payload, ensure_ascii=False).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)
        log.info("%s %s %d in %.0f ms%s", self.command, urlsplit(self.path).path, status,
                 1000 * (time.perf_counter() - self._started), f": {payload['error']}" if "error" in payload else "")

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        """_send logs each answer with its time; the base class's access line would repeat it."""

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 -- the base class's signature
        log.info("%s %s", self.address_string(), format % args)


def positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text}: must be 1 or more")
    return value


def non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text}: must be 0 or more")
    return value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True,
                        help="student folder (RUN/final) or teacher folder; with --backend onnx or onnx-int8, a "
                             "deploy output folder (DIST from python -m deploy)")
    parser.add_argument("--backend", default="torch", choices=SERVER_BACKENDS,
                        help="torch (default) runs the folder's weights; onnx and onnx-int8 run DIST's exported "
                             "graphs with onnxruntime, greedy, one sentence at a time as on the board")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default 127.0.0.1, this machine only; 0.0.0.0 for every "
                             "interface)")
    parser.add_argument("--port", type=non_negative, default=8000,
                        help="TCP port (default 8000; 0 picks a free one, logged at start-up)")
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda (torch backend only)")
    parser.add_argument("--num_beams", type=positive, default=1, help="beam width (1 = greedy; torch backend only)")
    parser.add_argument("--batch_size", type=positive, default=32,
                        help="sentences decoded together within one request (default 32)")
    parser.add_argument("--split_long", action="store_true",
                        help="translate a text over the model's source limit sentence by sentence instead of "
                             "answering 400")
    parser.add_argument("--max_body_bytes", type=positive, default=1 << 20,
                        help="largest request body, in bytes; larger ones get 413 (default 1048576)")
    parser.add_argument("--max_texts", type=positive, default=64,
                        help="most texts in one request; more get 413 (default 64)")
    parser.add_argument("--max_chars", type=positive, default=2000,
                        help="longest text, in characters; longer ones get 413 (default 2000)")
    parser.add_argument("--max_queue", type=non_negative, default=16,
                        help="requests allowed to wait while one is being translated; beyond that 503 with "
                             f"Retry-After: {RETRY_AFTER_S} (default 16; 0 = only the one in progress)")
    parser.add_argument("--log_level", default="INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR"),
                        help="logging level (default INFO: one line per request)")
    args = parser.parse_args(argv)
    if args.backend != "torch" and args.num_beams > 1:
        parser.error(f"--backend {args.backend} decodes greedily only; use --num_beams 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        translator = Translator(args.model, args.device, backend=args.backend, split_long=args.split_long)
    except (vocabulary.VocabMismatchError, FileNotFoundError, contract.ContractError, backends.BackendError) as exc:
        log.error("%s", exc)
        return 2
    worker = TranslationWorker(translator, args.max_queue, args.num_beams, args.batch_size)
    try:
        server = TranslationServer((args.host, args.port), worker,
                                   Limits(args.max_body_bytes, args.max_texts, args.max_chars))
    except OSError as exc:
        log.error("cannot listen on %s:%d (%s); pick another --port or --host", args.host, args.port, exc)
        return 2
    stop = threading.Event()
    received: list[str] = []

    def on_signal(signum: int, _frame: Any) -> None:
        received.append(signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    # serve_forever runs on its own thread: shutdown() waits for that loop to end, so it cannot be called from
    # the thread running it, and the main thread stays free to receive signals.
    serving = threading.Thread(target=server.serve_forever, name="http")
    serving.start()
    host, port = server.server_address[:2]
    log.info("serving %s (%s) on http://%s:%d: POST /translate, GET /health", args.model, args.backend, host, port)
    stop.wait()
    log.info("%s: no new connections; finishing %d accepted requests", received[0], worker.pending)
    server.shutdown()
    serving.join()
    server.server_close()  # joins the request threads, which are waiting for the worker
    worker.close()
    log.info("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
