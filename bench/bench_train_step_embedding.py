"""Train step before / after the word embedding's row-wise gradient, in one process, interleaved.

    python bench/bench_train_step_embedding.py                 # B=1 L=512, 12 layers, 5 repetitions
    python bench/bench_train_step_embedding.py --layers 2 --repeats 3

Both columns are deberta_fast on the native op with the same weights (DeBERTa-v3-base shape, dropout on, loss
mean(last_hidden_state²)), as in ``bench/bench_cpu_model.py``'s train workload:
  before   the word embedding is a plain nn.Embedding (torch's dense [V, E] gradient) and zero_grad(set_to_none=True)
  after    RowGradEmbedding (patch_deberta's default) and deberta_fast.models.embedding.zero_grad, which keeps its
           .grad and zeroes it in place, so the backward adds the looked-up rows into it
Each repetition runs both columns once, in turn (no optimizer step: the optimizer reads every row either way).
Also times the word embedding alone (forward + backward + clearing its gradient), before and after.
Writes bench/results/train_step_embedding.csv.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import time

import torch

from deberta_fast.benchmark import cpu_model, harness
from deberta_fast.models.embedding import RowGradEmbedding, zero_grad


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--length", type=int, default=512)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    work = dict(name="train", batch=args.batch, length=args.length, layers=args.layers, train=True, padded=None)
    inputs = cpu_model.make_inputs(work)
    after = cpu_model.fast_model(cpu_model.transformers_model(args.layers, train=True))
    assert type(after.embeddings.word_embeddings) is RowGradEmbedding
    before = copy.deepcopy(after)
    before.embeddings.word_embeddings.__class__ = torch.nn.Embedding

    def step_before():
        before(**inputs).last_hidden_state.pow(2).mean().backward()
        before.zero_grad(set_to_none=True)

    def step_after():
        after(**inputs).last_hidden_state.pow(2).mean().backward()
        zero_grad(after)

    # The word embedding alone, forward + backward + clearing, on its own copies of the weight.
    ids = inputs["input_ids"]
    alone_before = copy.deepcopy(before.embeddings.word_embeddings)
    alone_after = copy.deepcopy(after.embeddings.word_embeddings)
    grad_out = torch.randn(*ids.shape, alone_after.embedding_dim)

    def grad_before():  # torch's embedding backward: a dense gradient on fresh pages
        alone_before(ids).backward(grad_out)
        alone_before.zero_grad(set_to_none=True)

    def grad_after():  # the looked-up rows added into the kept .grad, which is then zeroed in place
        alone_after(ids).backward(grad_out)
        zero_grad(alone_after)

    columns = {"step_before": step_before, "step_after": step_after, "grad_before": grad_before,
               "grad_after": grad_after}
    for fn in columns.values():  # warm-up: lazy initialisation, the kept .grad of the after column
        fn()
    times = {name: [] for name in columns}
    for repeat in range(args.repeats):
        for name, fn in columns.items():
            times[name].append(timed(fn))
        print(f"repeat {repeat + 1}/{args.repeats}: " + ", ".join(f"{k} {v[-1]:.3f} s" for k, v in times.items()),
              flush=True)
    medians = {name: statistics.median(values) for name, values in times.items()}
    facts = harness.machine_facts()
    rows_out = [
        dict(what="train step (fwd + bwd + zero_grad)", before_s=medians["step_before"],
             after_s=medians["step_after"], ratio=medians["step_before"] / medians["step_after"]),
        dict(what="word embedding alone (fwd + bwd + zero_grad)", before_s=medians["grad_before"], after_s=medians["grad_after"],
             ratio=medians["grad_before"] / medians["grad_after"]),
    ]
    print(f"B={args.batch} L={args.length}, {args.layers} layers, medians of {args.repeats} interleaved repetitions; "
          f"{facts['machine']}")
    print(harness.format_table(rows_out, ["what", "before_s", "after_s", "ratio"]))
    path = os.path.join(harness.results_dir(), "train_step_embedding.csv")
    harness.write_csv([{**row, "layers": args.layers, "length": args.length, "batch": args.batch,
                        "repeats": args.repeats, **facts} for row in rows_out], path)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
