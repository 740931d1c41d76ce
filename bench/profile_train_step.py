"""Profile one train-mode step (forward + backward, dropout on) of a DeBERTa-v3-base-shaped model on the CPU.

    python bench/profile_train_step.py                    # B=1 L=512, 2 layers, deberta_fast (native op)
    python bench/profile_train_step.py --layers 12 --provider transformers
    python bench/profile_train_step.py --unfused          # deberta_fast with transformers' output blocks

Prints torch.profiler's table of the top operators by self CPU time with each one's share of the profiled steps.
"""

from __future__ import annotations

import argparse

import torch

from bench_train_fusions import train_step, unfused
from deberta_fast.benchmark import cpu_model


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--length", type=int, default=512)
    parser.add_argument("--steps", type=int, default=2, help="profiled steps (after one warm-up)")
    parser.add_argument("--provider", default="deberta_fast", choices=["deberta_fast", "transformers"])
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--unfused", action="store_true",
                        help="deberta_fast with transformers' SelfOutput / Intermediate / Output (no fused blocks)")
    args = parser.parse_args(argv)
    work = dict(name="profile", batch=1, length=args.length, layers=args.layers, train=True, padded=None)
    model = cpu_model.transformers_model(args.layers, train=True)
    if args.provider == "deberta_fast":
        model = cpu_model.fast_model(model).train()
        if args.unfused:
            unfused(model)
    step = train_step(model, cpu_model.make_inputs(work))
    step()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profiler:
        for _ in range(args.steps):
            step()
    events = profiler.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    name = args.provider + (" (unfused blocks)" if args.unfused else "")
    print(f"{name}, B=1 L={args.length}, {args.layers} layers, {args.steps} steps, "
          f"{total / 1e6 / args.steps:.3f} s of self CPU time per step")
    print("| op | self CPU ms / step | % of step | calls / step |")
    print("|---|---|---|---|")
    for event in sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[: args.top]:
        print(f"| {event.key} | {event.self_cpu_time_total / 1e3 / args.steps:.1f} | "
              f"{100 * event.self_cpu_time_total / total:.1f} | {event.count // args.steps} |")


if __name__ == "__main__":
    main()
