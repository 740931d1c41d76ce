"""Row-wise gradient accumulation of the word embedding (deberta_fast.ops.embedding_rows, models/embedding.py)
against torch's own nn.Embedding: same gradients over steps (accumulation included), dense .grad for the optimizer,
the sparse path really taken when a .grad is kept, and torch's dense gradient wherever the sparse one could leak
(torch.autograd.grad, tensor hooks, create_graph)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

from deberta_fast.models import DebertaV2ForMaskedLM, DebertaV2Model
from deberta_fast.models.embedding import RowGradEmbedding, row_grad_embedding_from, zero_grad
from deberta_fast.ops.embedding_rows import embedding_rows

from configs import make_config, perturb_

# name -> (vocab, dim, ids shape, padding_idx)
CASES = {
    "no_padding_1d": (50, 8, (40,), None),
    "padding_0_2d": (50, 8, (3, 20), 0),
    "negative_padding": (31, 5, (2, 33), -1),
    "few_rows_many_repeats": (200, 16, (4, 64), 3),
}


def make_ids(vocab, shape, padding_idx, seed):
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, min(vocab, 12) if seed % 2 else vocab, shape, generator=generator)  # repeats
    if padding_idx is not None:
        ids.view(-1)[::7] = padding_idx % vocab
    return ids


def pair(vocab, dim, padding_idx):
    torch.manual_seed(0)
    plain = nn.Embedding(vocab, dim, padding_idx=padding_idx)
    fast = row_grad_embedding_from(copy.deepcopy(plain))
    assert type(fast) is RowGradEmbedding
    return plain, fast


@pytest.mark.parametrize("case", CASES)
def test_gradients_equal_torch_over_steps_and_accumulation(case):
    """Three micro-batches accumulated, zero_grad, two more: .grad is dense and equals nn.Embedding's each time."""
    vocab, dim, shape, padding_idx = CASES[case]
    plain, fast = pair(vocab, dim, padding_idx)
    for step in range(5):
        if step == 3:
            plain.zero_grad(set_to_none=True)
            zero_grad(fast)
            assert fast.weight.grad is not None and not fast.weight.grad.any(), "the .grad is kept, zeroed"
        ids = make_ids(vocab, shape, padding_idx, seed=step)
        grad_out = torch.randn(*shape, dim, generator=torch.Generator().manual_seed(100 + step))
        expected = plain(ids)
        out = fast(ids)
        torch.testing.assert_close(out, expected, rtol=0, atol=0)  # the same lookup: exact by construction
        expected.backward(grad_out)
        out.backward(grad_out)
        assert fast.weight.grad.layout == torch.strided
        torch.testing.assert_close(fast.weight.grad, plain.weight.grad, rtol=1e-6, atol=1e-6)
        if padding_idx is not None:
            assert not fast.weight.grad[padding_idx % vocab].any(), "the padding row gets no gradient"


def profiled_backward(module, ids, grad_out):
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True) as prof:
        module(ids).backward(grad_out)
    return prof.events()


def test_kept_grad_is_updated_in_place_without_a_dense_gradient():
    vocab, dim = 4000, 32
    plain, fast = pair(vocab, dim, 0)
    ids = make_ids(vocab, (2, 50), 0, seed=4)
    grad_out = torch.randn(2, 50, dim)
    fast(ids).backward(grad_out)  # first step: no .grad yet, torch's dense gradient becomes it
    kept = fast.weight.grad
    events = profiled_backward(fast, ids, grad_out)
    names = {e.name for e in events}
    assert "aten::embedding_dense_backward" not in names
    full = [e for e in events if e.input_shapes and list(e.input_shapes[0]) == [vocab, dim] and
            e.name in ("aten::fill_", "aten::zero_", "aten::copy_")]
    assert full == [], "no [V, E] buffer may be written by the backward"
    assert fast.weight.grad is kept, "accumulated in place"
    # the plain module, for contrast, does build the dense gradient (the test above would catch it)
    plain(ids).backward(grad_out)
    assert "aten::embedding_dense_backward" in {e.name for e in profiled_backward(plain, ids, grad_out)}


def test_autograd_grad_hooks_and_create_graph_get_dense_gradients():
    vocab, dim = 60, 6
    plain, fast = pair(vocab, dim, None)
    ids = make_ids(vocab, (30,), None, seed=2)
    grad_out = torch.randn(30, dim)
    fast(ids).backward(grad_out)  # a kept .grad: the sparse path would be possible
    plain(ids).backward(grad_out)
    (captured,) = torch.autograd.grad(fast(ids), [fast.weight], grad_out)
    (expected,) = torch.autograd.grad(plain(ids), [plain.weight], grad_out)
    assert captured.layout == torch.strided
    torch.testing.assert_close(captured, expected)
    seen = []
    handle = fast.weight.register_hook(lambda g: seen.append(g.layout))
    fast(ids).backward(grad_out)
    handle.remove()
    assert seen == [torch.strided]
    # create_graph: a differentiable accumulation; values still torch's
    out = fast(ids)
    out.backward(grad_out, create_graph=True)
    plain(ids).backward(grad_out)
    plain(ids).backward(grad_out, create_graph=True)
    torch.testing.assert_close(fast.weight.grad, plain.weight.grad)


def test_tied_weight_gets_both_contributions():
    """The embedding tied to an output projection (a masked-LM decoder): sparse rows + dense product, summed."""
    vocab, dim = 70, 8
    plain, fast = pair(vocab, dim, 0)
    ids = make_ids(vocab, (3, 10), 0, seed=6)
    for module in (plain, fast):
        for _ in range(2):
            hidden = module(ids)
            logits = hidden @ module.weight.t()
            logits.pow(2).mean().backward()
    torch.testing.assert_close(fast.weight.grad, plain.weight.grad, rtol=1e-6, atol=1e-6)


def test_frozen_and_no_grad_lookups_are_plain_embedding():
    weight = torch.randn(20, 4)
    ids = torch.tensor([[1, 2, 3]])
    torch.testing.assert_close(embedding_rows(ids, weight), weight[ids])
    trainable = weight.clone().requires_grad_()
    with torch.no_grad():
        assert embedding_rows(ids, trainable).grad_fn is None


def test_zero_grad_keeps_only_row_grad_embedding_weights():
    torch.manual_seed(0)
    model = DebertaV2Model(make_config("v3"))
    assert type(model.embeddings.word_embeddings) is RowGradEmbedding, "patch_deberta switches the word embedding"
    ids = torch.randint(1, model.config.vocab_size, (2, 9))
    model(input_ids=ids).last_hidden_state.sum().backward()
    word = model.embeddings.word_embeddings.weight
    kept = word.grad
    zero_grad(model)
    assert word.grad is kept and not kept.any()
    others = [n for n, p in model.named_parameters() if p is not word and p.grad is not None]
    assert others == []


@pytest.mark.parametrize("model_class", (DebertaV2Model, DebertaV2ForMaskedLM))
def test_adamw_training_matches_plain_embeddings(model_class):
    """Three AdamW steps with the kept .grad (deberta_fast's zero_grad) against the same model with a plain
    nn.Embedding and zero_grad(set_to_none=True): same weights (the masked-LM head ties its decoder to it)."""
    torch.manual_seed(0)
    fast = perturb_(model_class(make_config("v3")), seed=1).train()
    plain = copy.deepcopy(fast)
    assert type(plain.get_input_embeddings()) is RowGradEmbedding
    plain.get_input_embeddings().__class__ = nn.Embedding
    generator = torch.Generator().manual_seed(3)
    batches = [torch.randint(1, fast.config.vocab_size, (2, 11), generator=generator) for _ in range(3)]
    results = []
    for model, zero in ((fast, lambda m, o: zero_grad(m, o)), (plain, lambda m, o: o.zero_grad(set_to_none=True))):
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01)
        for ids in batches:
            out = model(input_ids=ids)
            hidden = out.logits if model_class is DebertaV2ForMaskedLM else out.last_hidden_state
            hidden.pow(2).mean().backward()
            optimizer.step()
            zero(model, optimizer)
        results.append(dict(model.named_parameters()))
    assert results[0].keys() == results[1].keys()
    for name, value in results[0].items():
        torch.testing.assert_close(value, results[1][name], rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")


def test_non_leaf_weight_and_torch_func_use_torch_embedding():
    base = torch.randn(20, 4, requires_grad=True)
    ids = torch.tensor([[1, 2, 2, 7]])
    weight = base * 2  # not a leaf: it has no .grad, so no rows could be accumulated into one
    out = embedding_rows(ids, weight)
    assert out.grad_fn.name() == "EmbeddingBackward0"
    out.sum().backward()
    expected = torch.zeros(20, 4).index_add_(0, ids.view(-1), torch.full((4, 4), 2.0))
    torch.testing.assert_close(base.grad, expected)
    leaf = torch.randn(20, 4, requires_grad=True)
    grad = torch.func.grad(lambda w: embedding_rows(ids, w).sum())(leaf)
    torch.testing.assert_close(grad, expected / 2)


def test_row_accumulation_does_not_depend_on_the_thread_count():
    """Exact equality is the claim here: torch's dense += (uncoalesced) sparse gives each thread a fixed range of
    rows and adds a row's entries in token order, so the thread count cannot change any sum's order."""
    vocab, dim = 300, 16
    ids = make_ids(vocab, (4, 128), 0, seed=1)  # many repeats
    grad_out = torch.randn(4, 128, dim, generator=torch.Generator().manual_seed(9))
    threads = torch.get_num_threads()
    results = []
    try:
        for count in (1, 2, 3):
            torch.set_num_threads(count)
            _, fast = pair(vocab, dim, 0)
            fast(ids).backward(grad_out)
            fast(ids).backward(grad_out)  # the second one takes the row-wise path
            results.append(fast.weight.grad)
    finally:
        torch.set_num_threads(threads)
    for grad in results[1:]:
        assert torch.equal(grad, results[0])
