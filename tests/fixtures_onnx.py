"""Tiny ONNX graphs that obey docs/CONTRACTS.md ("Static graphs for deployment"), for tests.

Until the real exporter exists, this builds `encoder.onnx` and `decoder.onnx` (recurrent or transformer step) from a
small random torch module, plus calibration/eval `.npz` files in the layout deploy/convert_rknn.py reads:
arrays `encoder/<input>` and `decoder/<input>`, float32, with a leading sample axis.

The sample inputs are made by actually running the torch modules (encoder on a padded source, then a few decoder
steps feeding back their own state/cache), so state, cache and masks look like what the board runner will feed,
not like white noise. Runs in the main venv (torch + onnx).
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import onnx
import torch
from torch import nn

DecoderKind = Literal["recurrent", "transformer"]

WIDTH = 64
HEADS = 4
SRC_LEN = 16  # S
TGT_LEN = 16  # Tc
VOCAB = 500  # V
ENC_LAYERS = 2
DEC_LAYERS = 2  # L
OPSET = 17
MASK_NEG = -1e4  # finite: the toolkit clamps values below -3e38 and -inf breaks int8 calibration

# Ops the RKNN toolkit cannot convert (REFERENCE.md, op support list); fixtures must never contain them.
FORBIDDEN_OPS = frozenset({"Range", "Trilu", "CumSum", "TopK", "GatherND", "Neg", "Einsum", "IsNaN"})

ENCODER_INPUTS = ("src_embeds", "src_mask_bias")
ENCODER_OUTPUTS = ("enc_out",)
RECURRENT_INPUTS = ("tok_embeds", "enc_out", "src_mask_bias", "state")
RECURRENT_OUTPUTS = ("logits", "new_state")
TRANSFORMER_INPUTS = ("tok_embeds", "enc_out", "src_mask_bias", "cache_k", "cache_v", "cache_mask_bias")
TRANSFORMER_OUTPUTS = ("logits", "new_cache_k", "new_cache_v")


def _split_heads(x: torch.Tensor) -> torch.Tensor:
    """[1, T, D] -> [1, H, T, hd]."""
    return x.reshape(1, x.shape[1], HEADS, WIDTH // HEADS).transpose(1, 2)


def _merge_heads(x: torch.Tensor) -> torch.Tensor:
    """[1, H, T, hd] -> [1, T, D]."""
    return x.transpose(1, 2).reshape(1, x.shape[2], WIDTH)


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """q [1,H,Tq,hd], k/v [1,H,Tk,hd], bias [1,Tk] additive -> [1,H,Tq,hd]. Softmax on axis 3 (NPU-friendly)."""
    scores = torch.matmul(q, k.transpose(2, 3)) * (1.0 / math.sqrt(WIDTH // HEADS))
    scores = scores + bias.reshape(1, 1, 1, bias.shape[-1])
    return torch.matmul(torch.softmax(scores, dim=3), v)


class CrossAttention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(WIDTH, WIDTH) for _ in range(4))

    def forward(self, x: torch.Tensor, mem: torch.Tensor, mem_bias: torch.Tensor) -> torch.Tensor:
        out = _attend(_split_heads(self.q(x)), _split_heads(self.k(mem)), _split_heads(self.v(mem)), mem_bias)
        return self.o(_merge_heads(out))


def _ffn() -> nn.Sequential:
    return nn.Sequential(nn.Linear(WIDTH, 2 * WIDTH), nn.GELU(), nn.Linear(2 * WIDTH, WIDTH))


class EncoderLayer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn, self.ffn = CrossAttention(), _ffn()
        self.ln1, self.ln2 = nn.LayerNorm(WIDTH), nn.LayerNorm(WIDTH)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        h = self.ln1(x)
        x = x + self.attn(h, h, bias)
        return x + self.ffn(self.ln2(x))


class TinyEncoder(nn.Module):
    """(src_embeds [1,S,D], src_mask_bias [1,S]) -> enc_out [1,S,D]."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList(EncoderLayer() for _ in range(ENC_LAYERS))
        self.ln = nn.LayerNorm(WIDTH)

    def forward(self, src_embeds: torch.Tensor, src_mask_bias: torch.Tensor) -> torch.Tensor:
        x = src_embeds
        for layer in self.layers:
            x = layer(x, src_mask_bias)
        return self.ln(x)


class RecurrentLayer(nn.Module):
    """An SSRU-style cell (forget gate, no recurrent matmul), then cross-attention and an FFN."""

    def __init__(self) -> None:
        super().__init__()
        self.gate, self.cand = nn.Linear(WIDTH, WIDTH), nn.Linear(WIDTH, WIDTH, bias=False)
        self.cross, self.ffn = CrossAttention(), _ffn()
        self.ln1, self.ln2, self.ln3 = nn.LayerNorm(WIDTH), nn.LayerNorm(WIDTH), nn.LayerNorm(WIDTH)

    def forward(
        self, x: torch.Tensor, prev: torch.Tensor, mem: torch.Tensor, mem_bias: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.ln1(x)
        f = torch.sigmoid(self.gate(h))
        cell = f * prev + (1.0 - f) * self.cand(h)
        x = x + torch.relu(cell)
        x = x + self.cross(self.ln2(x), mem, mem_bias)
        return x + self.ffn(self.ln3(x)), cell


class TransformerLayer(nn.Module):
    """Self-attention over a fixed-size cache shifted by one position, cross-attention, FFN."""

    def __init__(self) -> None:
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(WIDTH, WIDTH) for _ in range(4))
        self.cross, self.ffn = CrossAttention(), _ffn()
        self.ln1, self.ln2, self.ln3 = nn.LayerNorm(WIDTH), nn.LayerNorm(WIDTH), nn.LayerNorm(WIDTH)

    def forward(
        self, x: torch.Tensor, cache_k: torch.Tensor, cache_v: torch.Tensor, cache_bias: torch.Tensor,
        mem: torch.Tensor, mem_bias: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        h = self.ln1(x)
        # Drop the oldest position and append this step's key/value at the end (CONTRACTS.md).
        k = torch.cat([cache_k[:, :, 1:, :], _split_heads(self.k(h))], dim=2)
        v = torch.cat([cache_v[:, :, 1:, :], _split_heads(self.v(h))], dim=2)
        x = x + self.o(_merge_heads(_attend(_split_heads(self.q(h)), k, v, cache_bias)))
        x = x + self.cross(self.ln2(x), mem, mem_bias)
        return x + self.ffn(self.ln3(x)), k, v


class LmHead(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.ln, self.proj = nn.LayerNorm(WIDTH), nn.Linear(WIDTH, VOCAB)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.ln(x)).reshape(1, VOCAB)


class RecurrentStep(nn.Module):
    """(tok_embeds, enc_out, src_mask_bias, state [L,1,D]) -> (logits [1,V], new_state [L,1,D])."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList(RecurrentLayer() for _ in range(DEC_LAYERS))
        self.head = LmHead()

    def forward(
        self, tok_embeds: torch.Tensor, enc_out: torch.Tensor, src_mask_bias: torch.Tensor, state: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        x, cells = tok_embeds, []
        for i, layer in enumerate(self.layers):
            # Slices, not state[i]: an integer index exports as a rank-0 Gather, which RV1126B does not take.
            x, cell = layer(x, state[i : i + 1], enc_out, src_mask_bias)
            cells.append(cell)
        return self.head(x), torch.cat(cells, dim=0)


class TransformerStep(nn.Module):
    """(tok_embeds, enc_out, src_mask_bias, cache_k, cache_v, cache_mask_bias) -> (logits, new_cache_k, new_cache_v)."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList(TransformerLayer() for _ in range(DEC_LAYERS))
        self.head = LmHead()

    def forward(
        self, tok_embeds: torch.Tensor, enc_out: torch.Tensor, src_mask_bias: torch.Tensor,
        cache_k: torch.Tensor, cache_v: torch.Tensor, cache_mask_bias: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x, ks, vs = tok_embeds, [], []
        for i, layer in enumerate(self.layers):
            x, k, v = layer(x, cache_k[i : i + 1], cache_v[i : i + 1], cache_mask_bias, enc_out, src_mask_bias)
            ks.append(k)
            vs.append(v)
        return self.head(x), torch.cat(ks, dim=0), torch.cat(vs, dim=0)


def _empty_decoder_inputs(kind: DecoderKind) -> dict[str, torch.Tensor]:
    """The per-sentence decoder inputs before step 0 (zero state/cache, cache fully masked)."""
    if kind == "recurrent":
        return {"state": torch.zeros(DEC_LAYERS, 1, WIDTH)}
    hd = WIDTH // HEADS
    return {
        "cache_k": torch.zeros(DEC_LAYERS, HEADS, TGT_LEN, hd),
        "cache_v": torch.zeros(DEC_LAYERS, HEADS, TGT_LEN, hd),
        "cache_mask_bias": torch.full((1, TGT_LEN), MASK_NEG),
    }


def _example_inputs(kind: DecoderKind) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    enc = {"src_embeds": torch.randn(1, SRC_LEN, WIDTH), "src_mask_bias": torch.zeros(1, SRC_LEN)}
    dec = {"tok_embeds": torch.randn(1, 1, WIDTH), "enc_out": torch.randn(1, SRC_LEN, WIDTH),
           "src_mask_bias": torch.zeros(1, SRC_LEN), **_empty_decoder_inputs(kind)}
    return enc, dec


def _export(module: nn.Module, feeds: dict[str, torch.Tensor], outputs: tuple[str, ...], path: Path) -> None:
    # The TorchScript exporter (dynamo=False) on purpose: static shapes, no onnxscript dependency, plain opset-17
    # ops; its deprecation warnings are expected noise here.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(module, tuple(feeds.values()), str(path), input_names=list(feeds),
                          output_names=list(outputs), opset_version=OPSET, dynamo=False, do_constant_folding=True)


def _mask_bias(n_real: int, length: int, real_at_end: bool = False) -> torch.Tensor:
    bias = torch.full((1, length), MASK_NEG)
    if real_at_end:
        bias[:, length - n_real :] = 0.0
    else:
        bias[:, :n_real] = 0.0
    return bias


def _collect_samples(
    encoder: TinyEncoder, decoder: nn.Module, kind: DecoderKind, n_sources: int, steps: int, gen: torch.Generator
) -> dict[str, np.ndarray]:
    """Run n_sources padded sources through the encoder and `steps` decoder steps each; stack every graph call."""
    rows: dict[str, list[np.ndarray]] = {}

    def add(prefix: str, feeds: dict[str, torch.Tensor]) -> None:
        for name, value in feeds.items():
            rows.setdefault(f"{prefix}/{name}", []).append(value.numpy().astype(np.float32))

    for _ in range(n_sources):
        n_real = int(torch.randint(3, SRC_LEN + 1, (1,), generator=gen))
        enc_feeds = {"src_embeds": torch.randn(1, SRC_LEN, WIDTH, generator=gen),
                     "src_mask_bias": _mask_bias(n_real, SRC_LEN)}
        add("encoder", enc_feeds)
        enc_out = encoder(**enc_feeds)
        carried = _empty_decoder_inputs(kind)
        for t in range(steps):
            if kind == "transformer":
                carried["cache_mask_bias"] = _mask_bias(t + 1, TGT_LEN, real_at_end=True)
            dec_feeds = {"tok_embeds": torch.randn(1, 1, WIDTH, generator=gen), "enc_out": enc_out,
                         "src_mask_bias": enc_feeds["src_mask_bias"], **carried}
            add("decoder", dec_feeds)
            outs = decoder(**dec_feeds)
            carried = {"state": outs[1]} if kind == "recurrent" else {"cache_k": outs[1], "cache_v": outs[2]}
    return {key: np.stack(values) for key, values in rows.items()}


@dataclass(frozen=True)
class Fixture:
    onnx_dir: Path  # holds encoder.onnx and decoder.onnx
    calib: Path
    eval: Path


def build_fixture(out_dir: Path, kind: DecoderKind, n_calib: int = 8, n_eval: int = 2, steps: int = 4,
                  seed: int = 0) -> Fixture:
    """Export encoder.onnx + decoder.onnx for `kind` into out_dir/onnx and write calib.npz / eval.npz beside it.

    Calibration holds n_calib sources (n_calib*steps decoder calls); eval holds n_eval different sources.
    """
    torch.manual_seed(seed)
    encoder = TinyEncoder().eval()
    decoder = (RecurrentStep() if kind == "recurrent" else TransformerStep()).eval()
    onnx_dir = out_dir / "onnx"
    onnx_dir.mkdir(parents=True, exist_ok=True)
    enc_feeds, dec_feeds = _example_inputs(kind)
    dec_outputs = RECURRENT_OUTPUTS if kind == "recurrent" else TRANSFORMER_OUTPUTS
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        _export(encoder, enc_feeds, ENCODER_OUTPUTS, onnx_dir / "encoder.onnx")
        _export(decoder, dec_feeds, dec_outputs, onnx_dir / "decoder.onnx")
        fixture = Fixture(onnx_dir, out_dir / "calib.npz", out_dir / "eval.npz")
        np.savez(fixture.calib, **_collect_samples(encoder, decoder, kind, n_calib, steps, gen))
        np.savez(fixture.eval, **_collect_samples(encoder, decoder, kind, n_eval, steps, gen))
    return fixture


def op_types(path: Path) -> set[str]:
    """Every op type in an ONNX file's main graph."""
    return {node.op_type for node in onnx.load(str(path)).graph.node}


def io_shapes(path: Path) -> dict[str, list[int]]:
    """Input and output names of an ONNX file mapped to their static shapes."""
    graph = onnx.load(str(path)).graph
    return {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim] for v in [*graph.input, *graph.output]}
