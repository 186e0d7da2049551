"""The student: a small encoder-decoder translator as a Hugging Face PreTrainedModel.

Shape: pre-norm transformer encoder; a decoder that is either `transformer` (causal self-attention with a
KV cache) or `recurrent` (SSRU layers: a gated linear recurrence with a fixed-size state, the cheapest
decoder step on an NPU, as in Mozilla's on-device students). Token embeddings are tied to the output layer;
a learned direction embedding (zh-en / en-zh) and fixed sinusoidal positions are added to every input.

`static_encode` and `static_step` are the encoder (ending in the decoder's cross-attention keys and values) and the
decoder step with static shapes that deploy/ exports to ONNX (docs/CONTRACTS.md).

    python model.py --preset tiny      # parameter counts per preset
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModel, PretrainedConfig, PreTrainedModel
from transformers.utils import ModelOutput

from data import IGNORE_INDEX

MASK_BIAS = -1e4  # finite: rknn-toolkit2 clamps -inf and very large negatives


class StudentConfig(PretrainedConfig):
    model_type = "rk_student"

    def __init__(self, vocab_size: int = 8000, d_model: int = 128, n_heads: int = 4, encoder_layers: int = 3,
                 decoder_layers: int = 2, ffn_dim: int = 512, decoder: str = "transformer", dropout: float = 0.1,
                 max_source_len: int = 48, max_target_len: int = 48, n_directions: int = 2,
                 preset: str = "custom", pad_token_id: int = 0, bos_token_id: int = 1, eos_token_id: int = 2,
                 **kwargs):
        self.vocab_size, self.d_model, self.n_heads = vocab_size, d_model, n_heads
        self.encoder_layers, self.decoder_layers, self.ffn_dim = encoder_layers, decoder_layers, ffn_dim
        self.decoder, self.dropout, self.preset = decoder, dropout, preset
        self.max_source_len, self.max_target_len, self.n_directions = max_source_len, max_target_len, n_directions
        kwargs.setdefault("tie_word_embeddings", True)
        super().__init__(pad_token_id=pad_token_id, bos_token_id=bos_token_id, eos_token_id=eos_token_id, **kwargs)

    @classmethod
    def from_model_config(cls, model_cfg, vocab_size: int, pad_id: int, bos_id: int, eos_id: int) -> "StudentConfig":
        """From config.ModelConfig plus the trimmed vocabulary's size and special ids."""
        return cls(vocab_size=vocab_size, d_model=model_cfg.d_model, n_heads=model_cfg.n_heads,
                   encoder_layers=model_cfg.encoder_layers, decoder_layers=model_cfg.decoder_layers,
                   ffn_dim=model_cfg.ffn_dim, decoder=model_cfg.decoder, dropout=model_cfg.dropout,
                   max_source_len=model_cfg.max_source_len, max_target_len=model_cfg.max_target_len,
                   preset=model_cfg.preset, pad_token_id=pad_id, bos_token_id=bos_id, eos_token_id=eos_id)


@dataclass
class StudentOutput(ModelOutput):
    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    hidden: torch.Tensor | None = None  # final decoder states before the output layer, [B, T, D]
    loss_parts: Any = None              # what forward's output_loss returned (kd_loss.LossParts)


def sinusoid_table(length: int, dim: int) -> torch.Tensor:
    position = torch.arange(length, dtype=torch.float32)[:, None]
    rate = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10000.0) / dim))
    table = torch.zeros(length, dim)
    table[:, 0::2] = torch.sin(position * rate)
    table[:, 1::2] = torch.cos(position * rate[: dim // 2])
    return table


class TokenEmbedding(nn.Embedding):
    """Token lookup; the tied output layer with project=True; a loss fused with the output layer with
    output_loss=fn (called as fn(hidden, weight), e.g. kd_loss.fused_distill_loss).

    All uses go through this module's own call because ZeRO-3 gathers a partitioned weight only
    while the module that owns it runs; a bare F.linear on the weight elsewhere would see an empty tensor.
    """

    def forward(self, x: torch.Tensor, project: bool = False, output_loss: Callable | None = None):
        if output_loss is not None:
            return output_loss(x, self.weight)
        return F.linear(x, self.weight) if project else super().forward(x)


class Attention(nn.Module):
    """Multi-head attention written out with MatMul/Softmax so it exports to NPU-friendly ONNX."""

    def __init__(self, d_model: int, n_heads: int, dropout: float):
        super().__init__()
        self.n_heads, self.head_dim = n_heads, d_model // n_heads
        self.q, self.k, self.v, self.o = (nn.Linear(d_model, d_model) for _ in range(4))
        self.dropout = dropout

    def split(self, x: torch.Tensor) -> torch.Tensor:  # [B, T, D] -> [B, H, T, hd]
        return x.view(x.shape[0], x.shape[1], self.n_heads, self.head_dim).transpose(1, 2)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """q [B,H,Tq,hd], k/v [B,H,Tk,hd], bias broadcastable to [B,H,Tq,Tk] -> [B, Tq, D]."""
        scores = torch.matmul(q, k.transpose(-1, -2)) * (self.head_dim ** -0.5) + bias
        if scores.dtype == torch.float32:
            weights = torch.softmax(scores, dim=-1)
        else:  # bf16/fp16 training: normalise in float32, as a low-precision sum of exponentials drifts
            weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(scores.dtype)
        weights = F.dropout(weights, self.dropout, self.training)
        out = torch.matmul(weights, v).transpose(1, 2)
        return self.o(out.reshape(out.shape[0], out.shape[1], -1))

    def forward(self, x: torch.Tensor, memory: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        return self.attend(self.split(self.q(x)), self.split(self.k(memory)), self.split(self.v(memory)), bias)


class FeedForward(nn.Module):
    def __init__(self, d_model: int, ffn_dim: int, dropout: float):
        super().__init__()
        self.up, self.down, self.dropout = nn.Linear(d_model, ffn_dim), nn.Linear(ffn_dim, d_model), dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.dropout(F.relu(self.up(x)), self.dropout, self.training))


class EncoderLayer(nn.Module):
    def __init__(self, cfg: StudentConfig):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(cfg.d_model), nn.LayerNorm(cfg.d_model)
        self.attn = Attention(cfg.d_model, cfg.n_heads, cfg.dropout)
        self.ffn = FeedForward(cfg.d_model, cfg.ffn_dim, cfg.dropout)
        self.dropout = cfg.dropout

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x)
        x = x + F.dropout(self.attn(h, h, bias), self.dropout, self.training)
        return x + F.dropout(self.ffn(self.norm2(x)), self.dropout, self.training)


class SSRU(nn.Module):
    """Simpler simple recurrent unit: c_t = f_t * c_{t-1} + (1 - f_t) * W x_t, out = relu(c_t),
    with f_t = sigmoid(W_f x_t + b_f). No matrix multiply touches the state, so a step is cheap and
    the state is one vector per layer."""

    def __init__(self, d_model: int):
        super().__init__()
        self.value = nn.Linear(d_model, d_model, bias=False)
        self.forget = nn.Linear(d_model, d_model)

    def gates(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = torch.sigmoid(self.forget(x))
        return f, (1 - f) * self.value(x)

    def forward(self, x: torch.Tensor, state: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Whole sequence at once: x [B, T, D], state [B, D] or None -> (out [B, T, D], last state [B, D]).

        c_t = a_t c_{t-1} + b_t is a linear recurrence, so it is evaluated as a parallel prefix scan
        (Hillis-Steele: log2(T) elementwise steps) instead of T sequential ones.
        """
        a, b = self.gates(x)
        if state is not None:
            b = torch.cat([b[:, :1] + a[:, :1] * state[:, None], b[:, 1:]], dim=1)
        shift = 1
        while shift < x.shape[1]:
            # combine each position with the prefix ending `shift` earlier: (a1,b1) then (a2,b2) = (a1 a2, a2 b1 + b2)
            b = torch.cat([b[:, :shift], a[:, shift:] * b[:, :-shift] + b[:, shift:]], dim=1)
            a = torch.cat([a[:, :shift], a[:, shift:] * a[:, :-shift]], dim=1)
            shift *= 2
        return F.relu(b), b[:, -1]

    def step(self, x: torch.Tensor, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One position: x [B, D], state [B, D] -> (out [B, D], new state [B, D])."""
        a, b = self.gates(x)
        state = a * state + b
        return F.relu(state), state


class DecoderLayer(nn.Module):
    """Self-attention (transformer) or SSRU (recurrent), then cross-attention, then feed-forward."""

    def __init__(self, cfg: StudentConfig):
        super().__init__()
        self.recurrent = cfg.decoder == "recurrent"
        self.norm1, self.norm2, self.norm3 = (nn.LayerNorm(cfg.d_model) for _ in range(3))
        if self.recurrent:
            self.ssru = SSRU(cfg.d_model)
        else:
            self.self_attn = Attention(cfg.d_model, cfg.n_heads, cfg.dropout)
        self.cross_attn = Attention(cfg.d_model, cfg.n_heads, cfg.dropout)
        self.ffn = FeedForward(cfg.d_model, cfg.ffn_dim, cfg.dropout)
        self.dropout = cfg.dropout

    def mix(self, x: torch.Tensor, state, causal_bias: torch.Tensor | None):
        """The sequence-mixing sublayer over the new positions x; returns (output, new state).

        state: recurrent [B, D] or None; transformer (keys, values) [B, H, T_past, hd] or None.
        """
        h = self.norm1(x)
        if self.recurrent:
            if x.shape[1] == 1 and state is not None:
                out, state = self.ssru.step(h[:, 0], state)
                return out[:, None], state
            return self.ssru(h, state)
        attn = self.self_attn
        k, v = attn.split(attn.k(h)), attn.split(attn.v(h))
        if state is not None:
            k, v = torch.cat([state[0], k], dim=2), torch.cat([state[1], v], dim=2)
        bias = causal_bias if causal_bias is not None else torch.zeros((), dtype=x.dtype, device=x.device)
        return attn.attend(attn.split(attn.q(h)), k, v, bias), (k, v)

    def finish(self, x: torch.Tensor, mixed: torch.Tensor, memory_kv, src_bias: torch.Tensor) -> torch.Tensor:
        x = x + F.dropout(mixed, self.dropout, self.training)
        q = self.cross_attn.split(self.cross_attn.q(self.norm2(x)))
        x = x + F.dropout(self.cross_attn.attend(q, memory_kv[0], memory_kv[1], src_bias), self.dropout, self.training)
        return x + F.dropout(self.ffn(self.norm3(x)), self.dropout, self.training)

    def memory_kv(self, memory: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.cross_attn.split(self.cross_attn.k(memory)), self.cross_attn.split(self.cross_attn.v(memory))


class StudentForTranslation(PreTrainedModel):
    config_class = StudentConfig
    base_model_prefix = "student"
    main_input_name = "source_ids"
    _no_split_modules = ["EncoderLayer", "DecoderLayer"]

    def __init__(self, config: StudentConfig):
        super().__init__(config)
        if config.decoder not in ("transformer", "recurrent"):
            raise ValueError(f"decoder must be 'transformer' or 'recurrent', got {config.decoder!r}")
        self.embed = TokenEmbedding(config.vocab_size, config.d_model)
        self.direction_embed = nn.Embedding(config.n_directions, config.d_model)
        positions = max(config.max_source_len, config.max_target_len) + 1
        # persistent: from_pretrained builds on the meta device and would leave a non-saved buffer empty
        self.register_buffer("positions", sinusoid_table(positions, config.d_model))
        self.encoder = nn.ModuleList(EncoderLayer(config) for _ in range(config.encoder_layers))
        self.decoder = nn.ModuleList(DecoderLayer(config) for _ in range(config.decoder_layers))
        self.encoder_norm, self.decoder_norm = nn.LayerNorm(config.d_model), nn.LayerNorm(config.d_model)
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.d_model ** -0.5
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=std)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed = value

    # ------------------------------------------------------------------ building blocks

    def input_embeds(self, ids: torch.Tensor, direction: torch.Tensor, start: int = 0) -> torch.Tensor:
        """Token (scaled) + direction + position embeddings: ids [B, T], direction [B] -> [B, T, D]."""
        x = self.embed(ids) * math.sqrt(self.config.d_model) + self.direction_embed(direction)[:, None]
        # the engine casts parameters to bf16 but not buffers: the position table follows the activations
        x = x + self.positions[start:start + ids.shape[1]].to(x.dtype)
        return F.dropout(x, self.config.dropout, self.training)

    def encode_embeds(self, x: torch.Tensor, src_bias: torch.Tensor) -> torch.Tensor:
        """x [B, S, D], src_bias [B, S] (0 or MASK_BIAS) -> encoder states [B, S, D]."""
        bias = src_bias[:, None, None, :]
        for layer in self.encoder:
            x = layer(x, bias)
        return self.encoder_norm(x)

    def encode(self, source_ids: torch.Tensor, source_mask: torch.Tensor, direction: torch.Tensor):
        x = self.input_embeds(source_ids, direction)
        src_bias = (1.0 - source_mask.to(x.dtype)) * MASK_BIAS  # in the weights' dtype: bf16 runs stay bf16
        return self.encode_embeds(x, src_bias), src_bias

    def output_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.embed(hidden, project=True)

    def decode(self, decoder_input_ids: torch.Tensor, direction: torch.Tensor, memory: torch.Tensor,
               src_bias: torch.Tensor, states=None, start: int = 0, memory_kv=None):
        """Decoder over new positions [start, start+T); returns (hidden [B,T,D] after the final norm, states)."""
        x = self.input_embeds(decoder_input_ids, direction, start)
        length = decoder_input_ids.shape[1]
        causal = None
        if length > 1:  # several positions are only decoded from scratch (training, uncached generation)
            future = torch.ones(length, length, dtype=torch.bool, device=x.device).triu(1)
            causal = torch.zeros(length, length, dtype=x.dtype, device=x.device).masked_fill(future, MASK_BIAS)
        states = states or [None] * len(self.decoder)
        memory_kv = memory_kv or [layer.memory_kv(memory) for layer in self.decoder]
        bias = src_bias[:, None, None, :]
        new_states = []
        for layer, state, kv in zip(self.decoder, states, memory_kv):
            mixed, state = layer.mix(x, state, causal)
            x = layer.finish(x, mixed, kv, bias)
            new_states.append(state)
        return self.decoder_norm(x), new_states

    # ------------------------------------------------------------------ training forward

    def forward(self, source_ids: torch.Tensor, source_mask: torch.Tensor, direction: torch.Tensor,
                decoder_input_ids: torch.Tensor, labels: torch.Tensor | None = None,
                return_logits: bool = True, output_loss: Callable | None = None, **_) -> StudentOutput:
        """Teacher-forced pass. Shapes: source [B, S], direction [B], decoder_input_ids/labels [B, T].

        With output_loss, the output layer is left to that function (fed the final hidden states and the
        tied weight) and no logits are built: its result comes back as loss_parts, its .total as loss.
        """
        memory, src_bias = self.encode(source_ids, source_mask, direction)
        hidden, _ = self.decode(decoder_input_ids, direction, memory, src_bias)
        if output_loss is not None:
            parts = self.embed(hidden, output_loss=output_loss)
            return StudentOutput(loss=parts.total, hidden=hidden, loss_parts=parts)
        logits = self.output_logits(hidden) if return_logits or labels is not None else None
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX)
        return StudentOutput(loss=loss, logits=logits if return_logits else None, hidden=hidden)

    # ------------------------------------------------------------------ generation

    @torch.no_grad()
    def generate(self, source_ids: torch.Tensor, source_mask: torch.Tensor, direction: torch.Tensor,
                 max_new_tokens: int | None = None, num_beams: int = 1, use_cache: bool = True,
                 all_done=None, temperature: float = 0.0) -> list[list[int]]:
        """Greedy (num_beams=1), beam search, or sampling (temperature > 0: from the softened distribution, never
        bos or pad); returns token ids per sentence without bos/eos: a sentence of max_new_tokens ids never ended.

        all_done(local_done) -> bool lets distributed callers stop only when every rank is done: under
        ZeRO-3 a rank that stopped early would leave the others waiting for its parameter gathers.
        """
        max_new_tokens = min(max_new_tokens or self.config.max_target_len, self.config.max_target_len)
        if num_beams > 1:
            return self._beam_search(source_ids, source_mask, direction, max_new_tokens, num_beams)
        memory, src_bias = self.encode(source_ids, source_mask, direction)
        memory_kv = [layer.memory_kv(memory) for layer in self.decoder]
        batch = source_ids.shape[0]
        tokens = torch.full((batch, 1), self.config.bos_token_id, dtype=torch.long, device=source_ids.device)
        done = torch.zeros(batch, dtype=torch.bool, device=source_ids.device)
        states = None
        for step in range(max_new_tokens):
            if use_cache:
                hidden, states = self.decode(tokens[:, -1:], direction, memory, src_bias, states, step, memory_kv)
            else:
                hidden, _ = self.decode(tokens, direction, memory, src_bias, memory_kv=memory_kv)
            logits = self.output_logits(hidden[:, -1])
            if temperature > 0:
                logits = logits.float() / temperature
                logits[:, [self.config.bos_token_id, self.config.pad_token_id]] = float("-inf")
                next_token = torch.multinomial(torch.softmax(logits, -1), 1)[:, 0]
            else:
                next_token = logits.argmax(-1)
            next_token = next_token.masked_fill(done, self.config.pad_token_id)
            tokens = torch.cat([tokens, next_token[:, None]], dim=1)
            done |= next_token == self.config.eos_token_id
            finished = bool(done.all())
            if all_done(finished) if all_done else finished:
                break
        return [self._strip(row) for row in tokens[:, 1:].tolist()]

    def _strip(self, ids: list[int]) -> list[int]:
        out = []
        for token in ids:
            if token == self.config.eos_token_id:
                break
            out.append(token)
        return out

    def _beam_search(self, source_ids, source_mask, direction, max_new_tokens: int, beams: int) -> list[list[int]]:
        expand = lambda t: t.repeat_interleave(beams, dim=0)  # noqa: E731
        memory, src_bias = self.encode(expand(source_ids), expand(source_mask), expand(direction))
        direction = expand(direction)
        memory_kv = [layer.memory_kv(memory) for layer in self.decoder]
        states = None

        def step(last: torch.Tensor, origin: torch.Tensor | None, position: int) -> torch.Tensor:
            nonlocal states
            if origin is not None:
                states = [self._reorder(s, origin) for s in states]
            hidden, states = self.decode(last[:, None], direction, memory, src_bias, states, position, memory_kv)
            return torch.log_softmax(self.output_logits(hidden[:, -1]).float(), dim=-1)

        found = beam_search(step, source_ids.shape[0], beams, max_new_tokens, self.config.bos_token_id,
                            self.config.eos_token_id, self.config.pad_token_id, source_ids.device)
        return [ids for ids, _ in found]

    @staticmethod
    def _reorder(state, index: torch.Tensor):
        if isinstance(state, tuple):
            return tuple(s[index] for s in state)
        return state[index]

    # ------------------------------------------------------------------ static graphs for export

    def static_encode(self, src_embeds: torch.Tensor, src_mask: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The encoder graph, batch 1 (docs/CONTRACTS.md): src_embeds [1, S, D], src_mask [1, S] (1 real, 0 padding)
        -> every decoder layer's cross-attention keys and values, (k_0, v_0, k_1, v_1, ...) each [1, H, S, hd].

        The decoder step takes them as inputs, so they are computed once per sentence, not once per token.
        """
        memory = self.encode_embeds(src_embeds, static_mask_bias(src_mask))
        return tuple(t for layer in self.decoder for t in layer.memory_kv(memory))

    def static_step(self, tok_embeds: torch.Tensor, src_mask: torch.Tensor,
                    *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """One decoder step with static shapes, batch 1 (docs/CONTRACTS.md). tensors, L = decoder layers:

        cross_k_0, cross_v_0, ... (2L, static_encode's outputs), then
          recurrent:   state_0, ... [1, D] (L)                       -> (logits [1, V], new_state_0, ...)
          transformer: self_mask [1, Tc] (1 on the last t+1 positions at step t), then self_k_0, self_v_0, ...
                       [1, H, Tc-1, hd] (2L: the previous positions, oldest first)
                                                                      -> (logits, step_k_0, step_v_0, ... [1, H, 1, hd])
        A transformer step attends over its cache and its own key/value (appended last) and returns only the latter;
        the caller drops the oldest cached position and appends them. Every per-layer tensor is its own input, and
        reshapes stand in for index selects: an integer index would export as a scalar-index Gather.
        """
        n_layers = len(self.decoder)
        cross, rest = tensors[:2 * n_layers], tensors[2 * n_layers:]
        width = self.config.d_model
        src_bias = static_mask_bias(src_mask)[:, None, None, :]
        self_bias = None if self.config.decoder == "recurrent" else static_mask_bias(rest[0])[:, None, None, :]
        x, outputs = tok_embeds, []
        for index, layer in enumerate(self.decoder):
            h = layer.norm1(x)
            if layer.recurrent:
                mixed, new_state = layer.ssru.step(h.reshape(1, width), rest[index])
                mixed = mixed.reshape(1, 1, width)
                outputs.append(new_state)
            else:
                attn = layer.self_attn
                key, value = attn.split(attn.k(h)), attn.split(attn.v(h))
                past_k, past_v = rest[1 + 2 * index], rest[2 + 2 * index]
                keys, values = torch.cat([past_k, key], dim=2), torch.cat([past_v, value], dim=2)
                mixed = attn.attend(attn.split(attn.q(h)), keys, values, self_bias)
                outputs += [key, value]
            x = layer.finish(x, mixed, (cross[2 * index], cross[2 * index + 1]), src_bias)
        return (self.output_logits(self.decoder_norm(x)).reshape(1, self.config.vocab_size), *outputs)

    def initial_static_state(self) -> tuple[torch.Tensor, ...]:
        """static_step's carried inputs before step 0: zero states, or the fully masked mask and zero caches."""
        cfg = self.config
        if cfg.decoder == "recurrent":
            return tuple(torch.zeros(1, cfg.d_model) for _ in range(cfg.decoder_layers))
        cache = (1, cfg.n_heads, cfg.max_target_len - 1, cfg.d_model // cfg.n_heads)
        return (torch.zeros(1, cfg.max_target_len), *(torch.zeros(cache) for _ in range(2 * cfg.decoder_layers)))


# Masked positions' bias inside the exported graphs. Not MASK_BIAS: rknn-toolkit2's int8 exSDPAttention quantizes
# the scores with the mask per tensor, and a -1e4 range leaves the scores no resolution (the tests' students on rv1126b
# w8a8: encoder output cosine 0.46 with -1e4, 0.99 with -50). exp(-50) ~ 2e-22 still removes a masked position in
# float32 and float16, so onnxruntime matches torch's -1e4 to 1e-5.
STATIC_MASK_BIAS = -50.0


def static_mask_bias(mask: torch.Tensor) -> torch.Tensor:
    """A 0/1 mask input of the exported graphs (1 = attend) as an additive bias: 0 or STATIC_MASK_BIAS.

    The graphs take 0/1 masks rather than biases because an int8 input holds 0 and 1 exactly, whatever its
    scale; the bias is made inside, in the graph's own precision."""
    return (1.0 - mask) * STATIC_MASK_BIAS


AutoConfig.register(StudentConfig.model_type, StudentConfig)
AutoModel.register(StudentConfig, StudentForTranslation)


def beam_search(step, batch: int, beams: int, max_new_tokens: int, bos_id: int, eos_id: int, pad_id: int, device,
                all_done=None) -> list[tuple[list[int], bool]]:
    """Beam search with length-normalised scores (log-probability / length, the end token counted) for any model.

    step(last, origin, position) -> log-probabilities [batch * beams, V] of the next token: last [batch * beams]
    holds each beam's previous token (bos at position 0), origin (None at position 0) the row each beam continues
    from, by which the model reorders its own state. Rows b * beams ... b * beams + beams - 1 belong to sentence b.
    A sentence is closed once it has `beams` finished hypotheses and none open can beat its best; its rows then
    idle, so its result no longer changes while others decode. all_done(local_done) -> bool lets distributed
    callers stop only when every rank is done (each step is a collective under ZeRO-3).
    Returns (ids without bos/eos, finished) per sentence; finished is False when none ended within max_new_tokens
    (the best open beam is returned).
    """
    tokens = torch.full((batch * beams, 1), bos_id, dtype=torch.long, device=device)
    scores = torch.full((batch, beams), float("-inf"), device=device)
    scores[:, 0] = 0.0  # all beams start identical: keep one alive so they do not duplicate
    finished: list[list[tuple[float, list[int]]]] = [[] for _ in range(batch)]
    closed = [False] * batch
    origin = None
    for position in range(max_new_tokens):
        logprobs = step(tokens[:, -1], origin, position)
        vocab = logprobs.shape[-1]
        total = (scores.view(-1, 1) + logprobs).view(batch, beams * vocab)
        top_scores, top_index = (t.tolist() for t in total.topk(min(2 * beams, beams * vocab), dim=-1))
        new_scores = torch.full((batch, beams), float("-inf"), device=device)
        slot_origin = torch.zeros(batch, beams, dtype=torch.long, device=device)
        chosen = torch.full((batch, beams), pad_id, dtype=torch.long, device=device)
        for b in range(batch):
            slot = 0
            for score, index in zip(top_scores[b], top_index[b]):
                if closed[b] or score == float("-inf"):
                    break
                beam, token = divmod(index, vocab)
                if token == eos_id:
                    hyp = tokens[b * beams + beam, 1:].tolist()
                    finished[b].append((score / (len(hyp) + 1), hyp))
                    continue
                new_scores[b, slot], slot_origin[b, slot], chosen[b, slot] = score, beam, token
                slot += 1
                if slot == beams:
                    break
        origin = (slot_origin + torch.arange(batch, device=device)[:, None] * beams).view(-1)
        tokens = torch.cat([tokens[origin], chosen.view(-1, 1)], dim=1)
        scores = new_scores
        best_open = (scores.max(dim=-1).values / (position + 2)).tolist()
        for b, hyps in enumerate(finished):
            closed[b] = closed[b] or (len(hyps) >= beams and max(h[0] for h in hyps) >= best_open[b])
        if all_done(all(closed)) if all_done else all(closed):
            break
    return [(max(finished[b], key=lambda h: h[0])[1], True) if finished[b] else (tokens[b * beams, 1:].tolist(), False)
            for b in range(batch)]


def count_parameters(model: nn.Module) -> dict[str, int]:
    embed = model.embed.weight.numel() + model.direction_embed.weight.numel()
    total = sum(p.numel() for p in model.parameters())
    return {"total": total, "embeddings": embed, "encoder": sum(p.numel() for p in model.encoder.parameters()),
            "decoder": sum(p.numel() for p in model.decoder.parameters())}


def main() -> None:
    import argparse

    from config import PRESETS, Config, apply_preset
    parser = argparse.ArgumentParser(description="Print the student's parameter count per preset.")
    parser.add_argument("--preset", choices=[*PRESETS, "all"], default="all", help="preset to count (default all)")
    parser.add_argument("--vocab_size", type=int, default=0,
                        help="trimmed vocabulary size to assume (default: the preset's data.vocab_size cap)")
    args = parser.parse_args()
    print(f"{'preset':<12}{'decoder':<13}{'vocab':>7}{'total':>12}{'embeddings':>12}{'encoder':>11}{'decoder':>11}")
    for name in PRESETS if args.preset == "all" else [args.preset]:
        cfg = Config()
        apply_preset(cfg, name)
        vocab = args.vocab_size or cfg.data.vocab_size
        with torch.device("meta"):
            student = StudentForTranslation(StudentConfig.from_model_config(cfg.model, vocab, 0, 1, 2))
        n = count_parameters(student)
        print(f"{name:<12}{cfg.model.decoder:<13}{vocab:>7}{n['total']:>12,}{n['embeddings']:>12,}"
              f"{n['encoder']:>11,}{n['decoder']:>11,}")


if __name__ == "__main__":
    main()
