import subprocess
import sys

import pytest
import torch

from model import MASK_BIAS, SSRU, StudentConfig, StudentForTranslation, count_parameters

ROOT = __import__("pathlib").Path(__file__).resolve().parent.parent


def tiny(decoder: str, **overrides) -> StudentForTranslation:
    torch.manual_seed(0)
    cfg = StudentConfig(vocab_size=300, d_model=32, n_heads=4, encoder_layers=2, decoder_layers=2, ffn_dim=64,
                        decoder=decoder, dropout=0.0, max_source_len=12, max_target_len=10, **overrides)
    return StudentForTranslation(cfg).eval()


def batch():
    torch.manual_seed(1)
    source = torch.randint(3, 300, (3, 9))
    mask = torch.ones_like(source)
    mask[1, 6:] = 0
    return source, mask, torch.tensor([0, 1, 0])


@pytest.mark.parametrize("decoder", ["transformer", "recurrent"])
def test_cached_decoding_equals_uncached(decoder):
    model = tiny(decoder)
    assert model.generate(*batch(), use_cache=True) == model.generate(*batch(), use_cache=False)


@pytest.mark.parametrize("decoder", ["transformer", "recurrent"])
def test_incremental_logits_equal_teacher_forced(decoder):
    model = tiny(decoder)
    source, mask, direction = batch()
    target = torch.randint(3, 300, (3, 7))
    full = model(source, mask, direction, target).logits
    memory, bias = model.encode(source, mask, direction)
    states, steps = None, []
    for t in range(target.shape[1]):
        hidden, states = model.decode(target[:, t:t + 1], direction, memory, bias, states, t)
        steps.append(model.output_logits(hidden))
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-5)


def test_ssru_parallel_scan_equals_step_by_step():
    torch.manual_seed(0)
    ssru = SSRU(16)
    x, state = torch.randn(2, 13, 16), torch.randn(2, 16)
    parallel, last = ssru(x, state)
    outs = []
    for t in range(13):
        out, state = ssru.step(x[:, t], state)
        outs.append(out)
    torch.testing.assert_close(parallel, torch.stack(outs, 1), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(last, state, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("decoder", ["transformer", "recurrent"])
def test_static_step_matches_generate(decoder):
    """The fixed-shape step that deploy/ exports gives the same greedy tokens as generate()."""
    model = tiny(decoder)
    source, mask, direction = batch()
    expected = model.generate(source[:1], mask[:1], direction[:1])
    cfg = model.config
    src = torch.full((1, cfg.max_source_len), cfg.pad_token_id)
    src[0, :9] = source[0]
    src_mask = torch.zeros(1, cfg.max_source_len, dtype=torch.long)
    src_mask[0, :9] = 1
    with torch.no_grad():
        cross = model.static_encode(model.input_embeds(src, direction[:1]), src_mask.float())
        state, token, tokens = list(model.initial_static_state()), cfg.bos_token_id, []
        for step in range(cfg.max_target_len):
            if decoder == "transformer":  # the caller's side of the contract: mask and shift the cache
                state[0] = (torch.arange(cfg.max_target_len) >= cfg.max_target_len - step - 1).float()[None]
            embeds = model.input_embeds(torch.tensor([[token]]), direction[:1], step)
            logits, *new = model.static_step(embeds, src_mask.float(), *cross, *state)
            if decoder == "transformer":
                state[1:] = [torch.cat([cache[:, :, 1:], key], dim=2) for cache, key in zip(state[1:], new)]
            else:
                state = new
            token = int(logits.argmax(-1))
            if token == cfg.eos_token_id:
                break
            tokens.append(token)
    assert [tokens] == expected
    assert MASK_BIAS == -1e4


def test_beam_search_finds_the_best_length_normalised_sequence_of_a_markov_chain():
    """model.beam_search (the student's and the seq_kd teacher's) against exhaustive search: wide enough, it must
    return the best of all finished sequences by log-probability / length (the end token counted)."""
    import itertools

    from model import beam_search
    torch.manual_seed(3)
    batch, vocab, max_new, beams = 3, 6, 4, 32  # ids: 0 pad, 1 bos, 2 eos, 3..5 words
    logits = torch.randn(batch, vocab, vocab) * 2
    logits[..., :2] = float("-inf")  # never pad or bos
    table = torch.log_softmax(logits, dim=-1)  # table[b, previous token] -> next token log-probabilities
    sentence = torch.arange(batch).repeat_interleave(beams)
    found = beam_search(lambda last, origin, position: table[sentence, last], batch, beams, max_new, 1, 2, 0, "cpu")
    for b in range(batch):
        def score(words):
            path = [1, *words, 2]
            return sum(table[b, prev, nxt].item() for prev, nxt in zip(path, path[1:])) / (len(words) + 1)
        every = [list(w) for n in range(max_new) for w in itertools.product(range(3, vocab), repeat=n)]
        best = max(every, key=score)
        assert found[b] == (best, True), (b, found[b], best)


def test_beam_search_of_width_one_is_greedy_and_wider_scores_no_worse():
    model = tiny("transformer")
    greedy = model.generate(*batch())
    assert model.generate(*batch(), num_beams=1) == greedy
    assert len(model.generate(*batch(), num_beams=4)) == 3


def test_sampling_is_seeded_never_emits_bos_or_pad_and_is_seed_free_when_cold():
    """The on-policy steps (seq_kd.on_policy_loss) sample the student's translations with generate(temperature=...)."""
    model = tiny("transformer")
    special = {model.config.bos_token_id, model.config.pad_token_id}
    inputs = batch()  # before seeding: batch() seeds the generator itself

    def sample(seed: int, temperature: float) -> list[list[int]]:
        torch.manual_seed(seed)
        return model.generate(*inputs, temperature=temperature)

    assert sample(5, 1.0) == sample(5, 1.0)
    assert sample(5, 1.0) != sample(6, 1.0)
    # hot: near-uniform over 300 ids, so ~1,500 sampled ids would hold ~10 bos/pad if they were not excluded
    hot = [token for seed in range(50) for row in sample(seed, 5.0) for token in row]
    assert len(hot) > 1000 and not special & set(hot)
    # cold: the most likely allowed id every time, whatever the seed (this untrained model's greedy picks bos)
    assert sample(7, 1e-4) == sample(8, 1e-4) != model.generate(*inputs)


@pytest.mark.parametrize("decoder", ["transformer", "recurrent"])
def test_save_and_load_round_trip_bit_for_bit(decoder, tmp_path):
    from transformers import AutoConfig, AutoModel
    model = tiny(decoder)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    assert AutoConfig.from_pretrained(tmp_path).model_type == "rk_student"
    loaded = AutoModel.from_pretrained(tmp_path)
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    assert loaded.generate(*batch()) == model.generate(*batch())


def test_preset_parameter_counts():
    out = subprocess.run([sys.executable, "model.py"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    rows = {line.split()[0]: int(line.split()[3].replace(",", "")) for line in out.splitlines()[1:]}
    assert 2e6 <= rows["tiny"] <= 5e6
    assert 15e6 <= rows["balanced"] <= 25e6
    assert 30e6 <= rows["performance"] <= 80e6
    assert 10e6 <= rows["bergamot"] <= 25e6


def test_tied_embeddings_and_counts():
    model = tiny("recurrent")
    counts = count_parameters(model)
    assert counts["total"] == sum(p.numel() for p in model.parameters())
    assert not any("lm_head" in name for name in model.state_dict())


@pytest.mark.parametrize("decoder", ["transformer", "recurrent"])
def test_bf16_parameters_beside_float32_buffers_train_and_decode(decoder):
    """What DeepSpeed's bf16 engine hands the model: parameters cast to bf16, the position buffer left float32.
    Every tensor built inside forward (position rows, mask biases) must follow the activations' dtype."""
    reference, model = tiny(decoder), tiny(decoder)
    for param in model.parameters():
        param.data = param.data.to(torch.bfloat16)
    assert model.positions.dtype == torch.float32
    source, mask, direction = batch()
    target = torch.randint(3, 300, (3, 7))
    logits = model(source, mask, direction, target).logits
    assert logits.dtype == torch.bfloat16
    expected = reference(source, mask, direction, target).logits
    assert torch.nn.functional.cosine_similarity(logits.float().flatten(), expected.flatten(), dim=0) > 0.999
    model.train()
    model(source, mask, direction, target, labels=target).loss.backward()
    assert all(p.grad is not None and p.grad.dtype == torch.bfloat16 and torch.isfinite(p.grad).all()
               for p in model.parameters() if p.requires_grad and p is not model.direction_embed.weight)
    model.eval()
    assert len(model.generate(source, mask, direction)) == 3
    assert len(model.generate(source, mask, direction, num_beams=2)) == 3
