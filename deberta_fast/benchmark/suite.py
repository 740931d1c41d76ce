"""The benchmark suite behind ``deberta-fast bench``.

Cases, each over every provider this machine has:
  attention   one DeBERTa attention layer (projections + attention) at B=1, H=12, D=64, buckets 256:
              transformers eager, deberta_fast per backend, and scaled_dot_product_attention on the same q/k/v
              without positions (the speed of light of dense attention); forward and forward+backward
  model       full v3-base-shaped model, forward and forward+backward (deberta_fast.benchmark.model)
  lora        a LoRA linear (width 768, r 16) over T tokens: eager (three ops + add, as PEFT / AdapterHub),
              deberta_fast's op per backend, and the merged linear; forward and forward+backward
  bottleneck  a seq_bn-style bottleneck (768 -> 48 -> 768, relu, residual): eager vs deberta_fast per backend
  cpu_model   (CPU only) issue 15's four workloads, interleaved: transformers, ONNX Runtime on transformers' export,
              deberta_fast fp32 / bf16 and the GEMM floor, with peak RSS per column
              (deberta_fast.benchmark.cpu_model)
Medians come from one process, so ratios compare like with like; CSV rows carry machine, versions and git
revision; a PNG of the table is drawn when matplotlib is installed.

On CUDA the suite also runs the two GPU scripts (gpu_attention: ours vs transformers eager vs SDPA pinned to
FLASH_ATTENTION vs disentangled-flash and flashdeberta when importable, with correctness and peak memory;
gpu_adapters: fused vs eager vs merged LoRA, fused vs eager bottleneck), which write their own CSVs.
"""

from __future__ import annotations

import os

import torch

from . import harness
from . import model as model_bench

CASES = ("attention", "model", "lora", "bottleneck", "cpu_model")
DEFAULT_CASES = ("attention", "model", "lora", "bottleneck")  # cpu_model takes long: asked for by name


def add_arguments(parser) -> None:
    parser.add_argument("--cases", default=",".join(DEFAULT_CASES),
                        help=f"comma-separated subset of {', '.join(CASES)} (default: all but cpu_model)")
    parser.add_argument("--lengths", default=None,
                        help="sequence lengths of the attention case (default 512,2048; --quick: 128,256)")
    parser.add_argument("--model-shapes", default=None,
                        help="LENGTH:LAYERS pairs of the model case (default 512:12,2048:2; --quick: 128:2)")
    parser.add_argument("--tokens", type=int, default=None,
                        help="tokens of the lora / bottleneck cases (default 8192; --quick 1024)")
    parser.add_argument("--batch", type=int, default=1, help="batch size of the attention and model cases")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats per measurement (median kept)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"],
                        help="where to run (default: cuda when available, else cpu)")
    parser.add_argument("--quick", action="store_true", help="small shapes, finishes in about a minute on a CPU")
    parser.add_argument("--out", default=".",
                        help="folder of the CSV and PNG files (default: the current directory; never the package)")
    parser.add_argument("--csv", default=None, help="CSV path (default <--out>/suite_<device>.csv)")
    parser.add_argument("--png", default=None, help="PNG path of the table (default next to the CSV)")


def _int_list(text: str, option: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",")]
    except ValueError:
        raise ValueError(f"--{option}: expected comma-separated integers; got {text!r}") from None
    if any(v < 1 for v in values):
        raise ValueError(f"--{option}: values must be >= 1; got {text!r}")
    return values


def _backends(device: str, op_candidates) -> list[str]:
    """deberta_fast backends of an op that claim this device (reasons are checked per call when timing)."""
    return [c.name for c in op_candidates if c.device_type in (None, device)]


def _time(fn, repeats):
    try:
        return harness.median_seconds(fn, repeats=repeats, warmup=1), ""
    except Exception as error:  # a provider that cannot run this shape is reported, not fatal
        return None, f"{type(error).__name__}: {str(error).splitlines()[0][:160]}"


def _dense_sdpa(q):
    """Dense attention without positions; on CUDA pinned to the FLASH_ATTENTION backend (FA2-class)."""
    if q.device.type == "cuda":
        from torch.nn.attention import SDPBackend, sdpa_kernel

        half = q.half() if q.dtype == torch.float32 else q  # FLASH_ATTENTION takes fp16 / bf16 only
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return torch.nn.functional.scaled_dot_product_attention(half, half, half)
    return torch.nn.functional.scaled_dot_product_attention(q, q, q)


def _fwd_bwd(fn, inputs):
    def run():
        out = fn()
        out.float().sum().backward()
        for tensor in inputs:
            tensor.grad = None

    return run


def attention_case(lengths, batch, repeats, device, facts):
    from transformers.models.deberta_v2 import modeling_deberta_v2 as hf

    from ..models import fast_attention_from
    from ..ops import attention as attention_op

    config = hf.DebertaV2Config(**model_bench.V3_BASE,
                                num_hidden_layers=1, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    rows = []
    for length in lengths:
        torch.manual_seed(0)
        reference = hf.DisentangledSelfAttention(config).to(device).eval()
        rel = torch.randn(2 * config.position_buckets, config.hidden_size, device=device)
        hidden = torch.randn(batch, length, config.hidden_size, device=device, requires_grad=True)
        mask4 = torch.ones(batch, 1, length, length, device=device)
        mask2 = torch.ones(batch, length, device=device)
        providers = {"transformers": lambda: reference(hidden, mask4, rel_embeddings=rel)[0]}
        for backend in _backends(device, attention_op.CANDIDATES):
            fast = fast_attention_from(hf.DisentangledSelfAttention(config).to(device).eval())
            fast.load_state_dict(reference.state_dict())
            fast.backend = backend
            providers[f"deberta_fast[{backend}]"] = (lambda f=fast: f(hidden, mask2, rel_embeddings=rel)[0])
        q = torch.randn(batch, 12, length, 64, device=device, requires_grad=True)
        providers["sdpa_no_positions"] = lambda: _dense_sdpa(q)
        baseline = {}
        for provider, fn in providers.items():
            for mode in ("fwd", "fwd+bwd"):
                if mode == "fwd":
                    def timed(fn=fn):
                        with torch.no_grad():
                            return fn()
                else:
                    timed = _fwd_bwd(fn, [hidden, q])
                seconds, note = _time(timed, repeats)
                baseline.setdefault(mode, seconds if provider == "transformers" else None)
                rows.append({"case": "attention_layer", "length": length, "batch": batch, "mode": mode,
                             "provider": provider, "median_s": seconds,
                             "speedup_vs_transformers": (baseline[mode] / seconds) if seconds and baseline[mode]
                             else None, "note": note, **facts})
    return rows


def model_case(shapes, batch, repeats, device, facts):
    rows = []
    for length, layers in shapes:
        inputs = model_bench.make_inputs(length, batch, device)
        baseline = {}
        for provider in model_bench.available_providers(device):
            model = model_bench.build_model(provider, layers, device, torch.float32)
            forward = model_bench.forward_fn(model, inputs)

            def training_step(model=model):
                # eval mode (no dropout): the fused backends serve the whole step, as with dropout-free fine-tuning
                model(**inputs).last_hidden_state.float().pow(2).mean().backward()
                model.zero_grad(set_to_none=True)

            for mode, fn in (("fwd", forward), ("fwd+bwd", training_step)):
                seconds, note = _time(fn, repeats)
                baseline.setdefault(mode, seconds if provider == "transformers" else None)
                rows.append({"case": "model", "length": length, "layers": layers, "batch": batch, "mode": mode,
                             "provider": provider, "median_s": seconds,
                             "speedup_vs_transformers": (baseline[mode] / seconds) if seconds and baseline[mode]
                             else None, "note": note, **facts})
            del model
    return rows


def lora_case(tokens, repeats, device, facts, width=768, rank=16):
    from ..ops import lora as lora_op

    torch.manual_seed(0)
    x = torch.randn(tokens, width, device=device, requires_grad=True)
    weight = torch.randn(width, width, device=device) / width**0.5
    bias = torch.randn(width, device=device)
    lora_A = (torch.randn(rank, width, device=device) / width**0.5).requires_grad_()
    lora_B = (torch.randn(width, rank, device=device) / rank**0.5).requires_grad_()
    merged = weight + 2.0 * lora_B.detach() @ lora_A.detach()
    providers = {
        "base_linear": lambda: torch.nn.functional.linear(x, weight, bias),
        "eager_lora": lambda: lora_op.lora_linear_reference(x, weight, bias, lora_A, lora_B, 2.0),
        "merged_lora": lambda: torch.nn.functional.linear(x, merged, bias),
    }
    for backend in _backends(device, lora_op.CANDIDATES):
        if backend != "reference":
            providers[f"deberta_fast[{backend}]"] = (
                lambda b=backend: lora_op.lora_linear(x, weight, bias, lora_A, lora_B, 2.0, backend=b))
    return _op_rows("lora_linear", providers, [x, lora_A, lora_B], tokens, repeats, facts, "eager_lora")


def bottleneck_case(tokens, repeats, device, facts, width=768, reduction=16):
    from ..ops import bottleneck as bottleneck_op

    torch.manual_seed(0)
    hidden = width // reduction
    x = torch.randn(tokens, width, device=device, requires_grad=True)
    params = [torch.randn(hidden, width, device=device) / width**0.5, torch.zeros(hidden, device=device),
              torch.randn(width, hidden, device=device) / hidden**0.5, torch.zeros(width, device=device)]
    for p in params:
        p.requires_grad_()
    providers = {"eager_bottleneck": lambda: bottleneck_op.bottleneck_adapter_reference(x, *params, x, "relu", 1.0)}
    for backend in _backends(device, bottleneck_op.CANDIDATES):
        if backend != "reference":
            providers[f"deberta_fast[{backend}]"] = (
                lambda b=backend: bottleneck_op.bottleneck_adapter(x, *params, x, activation="relu", backend=b))
    return _op_rows("bottleneck_adapter", providers, [x, *params], tokens, repeats, facts, "eager_bottleneck")


def _op_rows(case, providers, grads, tokens, repeats, facts, baseline_name):
    rows, baseline = [], {}
    for provider, fn in providers.items():
        for mode in ("fwd", "fwd+bwd"):
            if mode == "fwd":
                def timed(fn=fn):
                    with torch.no_grad():
                        return fn()
            else:
                timed = _fwd_bwd(fn, grads)
            seconds, note = _time(timed, repeats)
            if provider == baseline_name:
                baseline[mode] = seconds
            rows.append({"case": case, "tokens": tokens, "mode": mode, "provider": provider, "median_s": seconds,
                         "note": note, **facts})
    for row in rows:
        base = baseline.get(row["mode"])
        row[f"speedup_vs_{baseline_name}"] = (base / row["median_s"]) if base and row["median_s"] else None
    return rows


def check_args(args) -> dict:
    """Every option checked before anything is built or timed; returns the resolved settings. ValueError names
    the option."""
    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    if not cases:
        raise ValueError(f"--cases: expected a comma-separated subset of {', '.join(CASES)}; got {args.cases!r}")
    unknown = [c for c in cases if c not in CASES]
    if unknown:
        raise ValueError(f"--cases: unknown case(s) {unknown}; expected a subset of {', '.join(CASES)}")
    for option in ("batch", "repeats", "tokens"):
        value = getattr(args, option)
        if value is not None and value < 1:
            raise ValueError(f"--{option}: expected an integer >= 1; got {value}")
    shapes = model_bench.parse_shapes(args.model_shapes or ("128:2" if args.quick else "512:12,2048:2"),
                                      "--model-shapes")
    return {
        "cases": cases,
        "lengths": _int_list(args.lengths or ("128,256" if args.quick else "512,2048"), "lengths"),
        "shapes": shapes,
        "tokens": args.tokens or (1024 if args.quick else 8192),
        "repeats": args.repeats or (2 if args.quick else 5),
        "out": os.path.abspath(args.out),
    }


def run_from_args(args) -> list[dict]:
    settings = check_args(args)
    cases, lengths, shapes = settings["cases"], settings["lengths"], settings["shapes"]
    tokens, repeats, out = settings["tokens"], settings["repeats"], settings["out"]
    os.makedirs(out, exist_ok=True)
    facts = harness.machine_facts()
    rows = []
    if "attention" in cases:
        rows += attention_case(lengths, args.batch, repeats, args.device, facts)
    if "model" in cases:
        rows += model_case(shapes, args.batch, repeats, args.device, facts)
    if "lora" in cases:
        rows += lora_case(tokens, repeats, args.device, facts)
    if "bottleneck" in cases:
        rows += bottleneck_case(tokens, repeats, args.device, facts)
    if "cpu_model" in cases and args.device == "cpu":
        from . import cpu_model

        rows += [{**row, "note": ""} for row in cpu_model.run(quick=args.quick, repeats=args.repeats)]
    if args.device == "cuda" and not args.quick:
        from . import gpu_adapters, gpu_attention

        if "attention" in cases:
            gpu_attention.main(["--out", os.path.join(out, "gpu_attention.csv")])
        if "lora" in cases or "bottleneck" in cases:
            gpu_adapters.main(["--out", os.path.join(out, "gpu_adapters.csv")])
    unavailable = {(r["case"], r["provider"]): r["note"] for r in rows if r["note"].startswith("BackendUnavailable")}
    rows = [r for r in rows if (r["case"], r["provider"]) not in unavailable]
    path = args.csv or os.path.join(out, f"suite_{args.device}{'_quick' if args.quick else ''}.csv")
    harness.write_csv(rows, path)
    columns = ["case", "workload", "length", "layers", "tokens", "mode", "provider", "median_s", "speedup_vs_transformers",
               "vs_gemm_floor",
               "peak_mib", "speedup_vs_eager_lora", "speedup_vs_eager_bottleneck", "note"]
    columns = [c for c in columns if any(row.get(c) not in (None, "") for row in rows)]
    table = harness.format_table(rows, columns)
    print(f"machine: {facts['machine']} ({facts['device']}); torch {facts['torch']}, triton {facts['triton']}, "
          f"transformers {facts['transformers']}, git {facts['git']}")
    print(table)
    for (case, provider), note in unavailable.items():
        print(f"not available here: {case} / {provider}: {note}")
    print(f"CSV: {path}")
    png = harness.table_png(rows, columns, args.png or os.path.splitext(path)[0] + ".png")
    if png:
        print(f"PNG: {png}")
    return rows
