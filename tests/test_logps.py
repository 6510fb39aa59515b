"""Chunked completion log-probs against the naive full-logits computation on the tiny VLM."""

import pytest
import torch
import torch.nn.functional as F

from rdpo.engine.encode import collate_sequences, encode_prompt
from rdpo.engine.logps import completion_logps, sequence_logps, token_logps
from rdpo.pool import load_pool

COMPLETIONS = ["There is a red circle on the left.", "Blue.", "The square is on the right. I hope this helps."]


@pytest.fixture(scope="module")
def batch_parts(tiny_model_and_processor, toy_pools):
    _, processor = tiny_model_and_processor
    records = load_pool(toy_pools.train)[:3]
    return processor, [encode_prompt(processor, r) for r in records], COMPLETIONS


@pytest.fixture(scope="module")
def batch(batch_parts):
    processor, prompts, completions = batch_parts
    return collate_sequences(processor, prompts, completions)


def model_inputs(batch):
    return {k: v for k, v in batch.items() if k != "completion_mask"}


def naive_logps(model, batch, average=False):
    """log_softmax over the full [B, T, V] logits, shifted gather, masked sum."""
    logits = model(**model_inputs(batch)).logits.float()
    logp = logits[:, :-1].log_softmax(-1).gather(-1, batch["input_ids"][:, 1:, None]).squeeze(-1)
    mask = batch["completion_mask"][:, 1:].float()
    total = (logp * mask).sum(1)
    return total / mask.sum(1) if average else total


def hidden_states(model, batch):
    return model.model(**model_inputs(batch), use_cache=False).last_hidden_state


def test_batch_is_padded_with_different_lengths(batch):
    # the premise of the batched tests: right padding is actually exercised
    lengths = batch["attention_mask"].sum(1)
    assert len(set(lengths.tolist())) == 3
    assert (batch["attention_mask"][:, -1] == 0).sum() == 2


def test_completion_logps_equals_full_logits(tiny_model_and_processor, batch):
    model, _ = tiny_model_and_processor
    with torch.no_grad():
        expected = naive_logps(model, batch)
        got = completion_logps(hidden_states(model, batch), model.lm_head, batch["input_ids"],
                               batch["completion_mask"])
        via_model = sequence_logps(model, batch)
    assert got.shape == (3,) and got.dtype == torch.float32
    assert (expected < 0).all()
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(via_model, expected, atol=1e-5, rtol=0)


def test_average_is_sum_over_completion_tokens(tiny_model_and_processor, batch_parts, batch):
    model, _ = tiny_model_and_processor
    processor, _, completions = batch_parts
    # completion tokens: the response's own tokens plus the end-of-turn token
    counts = torch.tensor([len(processor.tokenizer(c, add_special_tokens=False)["input_ids"]) + 1
                           for c in completions], dtype=torch.float32)
    with torch.no_grad():
        total = sequence_logps(model, batch)
        mean = sequence_logps(model, batch, average=True)
        naive_mean = naive_logps(model, batch, average=True)
    torch.testing.assert_close(mean, total / counts, atol=1e-6, rtol=0)
    torch.testing.assert_close(mean, naive_mean, atol=1e-6, rtol=0)


def test_chunk_size_does_not_change_the_result(tiny_model_and_processor, batch):
    model, _ = tiny_model_and_processor
    with torch.no_grad():
        hidden = hidden_states(model, batch)
    args = (hidden, model.lm_head, batch["input_ids"], batch["completion_mask"])
    results = [completion_logps(*args, chunk_size=c) for c in (1, 3, 10_000)]
    for r in results[1:]:
        torch.testing.assert_close(r, results[0], atol=1e-5, rtol=0)


def test_token_logps_rows_and_empty():
    torch.manual_seed(0)
    head = torch.nn.Linear(8, 11, bias=True)
    hidden = torch.randn(5, 8)
    targets = torch.tensor([0, 10, 3, 3, 7])
    expected = F.log_softmax(hidden @ head.weight.T + head.bias, -1)[torch.arange(5), targets]
    with torch.no_grad():
        for chunk in (1, 2, 5, 64):
            torch.testing.assert_close(token_logps(hidden, head, targets, chunk), expected)
        empty = token_logps(hidden[:0], head, targets[:0])
    assert empty.shape == (0,) and empty.dtype == torch.float32


def test_sequence_without_completion_tokens_scores_zero():
    torch.manual_seed(0)
    head = torch.nn.Linear(8, 11, bias=False)
    hidden = torch.randn(2, 4, 8)
    ids = torch.randint(0, 11, (2, 4))
    mask = torch.tensor([[0, 0, 1, 1], [0, 0, 0, 0]])
    with torch.no_grad():
        total = completion_logps(hidden, head, ids, mask)
        mean = completion_logps(hidden, head, ids, mask, average=True)
    assert total[1].item() == 0.0 and mean[1].item() == 0.0
    assert total[0].item() < 0
    assert mean[0].item() == pytest.approx(total[0].item() / 2, abs=1e-6)


@pytest.mark.parametrize("chunk_size", [2, 1024])
def test_gradients_match_naive(tiny_model_and_processor, batch, chunk_size):
    model, _ = tiny_model_and_processor
    weights = torch.tensor([1.0, -0.5, 2.0])  # distinct per-sequence weights catch row mix-ups
    params = [model.lm_head.weight, model.model.language_model.embed_tokens.weight]

    def grads(loss):
        return torch.autograd.grad(loss, params)

    expected = grads((naive_logps(model, batch) * weights).sum())
    got = grads((sequence_logps(model, batch, chunk_size=chunk_size) * weights).sum())
    for g, e in zip(got, expected, strict=True):
        assert e.abs().max() > 0
        torch.testing.assert_close(g, e, atol=1e-5, rtol=0)


def test_checkpointed_chunks_under_autograd(tiny_model_and_processor, batch, monkeypatch):
    # With grad enabled and hidden requiring grad, every chunk goes through checkpoint.
    import rdpo.engine.logps

    model, _ = tiny_model_and_processor
    calls = []
    real = rdpo.engine.logps.checkpoint

    def spy(fn, *args, **kwargs):
        calls.append(args[0].shape[0])
        return real(fn, *args, **kwargs)

    monkeypatch.setattr(rdpo.engine.logps, "checkpoint", spy)
    n_tokens = int(batch["completion_mask"][:, 1:].sum())
    out = sequence_logps(model, batch, chunk_size=4)
    assert out.requires_grad
    assert sum(calls) == n_tokens and max(calls) <= 4
    calls.clear()
    with torch.no_grad():
        sequence_logps(model, batch, chunk_size=4)
    assert calls == []


def test_batched_equals_one_by_one(tiny_model_and_processor, batch_parts, batch):
    model, _ = tiny_model_and_processor
    processor, prompts, completions = batch_parts
    with torch.no_grad():
        batched = sequence_logps(model, batch)
        single = torch.cat([sequence_logps(model, collate_sequences(processor, [p], [c]))
                            for p, c in zip(prompts, completions, strict=True)])
    torch.testing.assert_close(batched, single, atol=1e-5, rtol=0)


def test_sequence_logps_never_projects_the_full_sequence(tiny_model_and_processor, batch,
                                                         monkeypatch):
    model, _ = tiny_model_and_processor
    head = model.lm_head
    n_tokens = int(batch["completion_mask"][:, 1:].sum())
    assert n_tokens < batch["input_ids"].numel()

    def forbidden(*args, **kwargs):
        raise AssertionError("full forward / lm_head.forward must not run")

    monkeypatch.setattr(model, "forward", forbidden)
    monkeypatch.setattr(head, "forward", forbidden)
    rows = []
    real_linear = F.linear

    def linear(x, weight, bias=None):
        if weight is head.weight:
            rows.append(x.shape[:-1].numel())
        return real_linear(x, weight, bias)

    monkeypatch.setattr(F, "linear", linear)
    with torch.no_grad():
        out = sequence_logps(model, batch, chunk_size=5)
    assert out.shape == (3,)
    # only completion positions reach the output layer, at most chunk_size rows at a time
    assert sum(rows) == n_tokens
    assert max(rows) <= 5


@pytest.mark.parametrize("chunk_size", [3, 1024])
def test_frozen_output_layer_gradient_precomputed(tiny_model_and_processor, batch, chunk_size,
                                                  monkeypatch):
    # LoRA/QLoRA: the output layer does not train, so each chunk's input gradient is computed
    # in the forward pass (no checkpoint, no recomputed logits); same log-probs, same gradients.
    import rdpo.engine.logps

    model, _ = tiny_model_and_processor
    weights = torch.tensor([1.0, -0.5, 2.0])
    embed = model.model.language_model.embed_tokens.weight
    calls = []
    monkeypatch.setattr(rdpo.engine.logps, "checkpoint", lambda *a, **k: calls.append(1))
    model.lm_head.weight.requires_grad_(False)
    try:
        expected_logps = naive_logps(model, batch)
        expected = torch.autograd.grad((expected_logps * weights).sum(), embed)[0]
        got_logps = sequence_logps(model, batch, chunk_size=chunk_size)
        got = torch.autograd.grad((got_logps * weights).sum(), embed)[0]
        with torch.no_grad():
            reference = sequence_logps(model, batch, chunk_size=chunk_size)
    finally:
        model.lm_head.weight.requires_grad_(True)
    assert calls == []
    assert torch.equal(got_logps.detach(), reference)  # the reference pass computes the same
    torch.testing.assert_close(got_logps.detach(), expected_logps.detach(), atol=1e-4, rtol=1e-5)
    assert expected.abs().max() > 0
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
