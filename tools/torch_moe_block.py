#!/usr/bin/env python3
"""PyTorch-eager baseline for `launch/moe bench layer`: forward+backward time of a Hugging Face MoE block.

Builds transformers' Qwen2MoeSparseMoeBlock (default) or DeepseekV3MoE with the same shape flags as
`launch/moe bench layer` (--tokens --hidden --experts --top_k --ffn_hidden --shared), feeds it x of shape
(1, tokens, hidden) ~ N(0, 1), and times forward + out.backward(fixed random grad) with CUDA events. Each row
is the median (element n/2 of the sorted times, as in the C++ bench) of --iters iterations after --warmup.

Expert TFLOP/s uses the C++ bench's formula (FfnExperts::flops): 3 (fwd+bwd) * 3 GEMMs (SwiGLU) * 2 * rows *
hidden * ffn_hidden, with rows = tokens * top_k for the routed experts plus tokens * shared for the shared
ones, over the whole block's time (router, dispatch, combine included). The C++ bench prints GFLOP/s and
counts only assignments it processed; HF blocks are dropless, so compare with its --capacity_factor=0 rows.
Model differences: Qwen2-MoE has one sigmoid-gated shared expert, here of width shared * ffn_hidden (the FLOPs
of `shared` experts of width ffn_hidden); DeepSeek-V3 routes by sigmoid scores with a bias and scaling.
Expert weights run through transformers' eager per-expert loop (pinned on versions that offer other backends).
"""
import argparse
import json
import sys
import warnings

GEMMS_PER_EXPERT = 3  # SwiGLU: gate, up, down


class BenchError(Exception):  # reported as one line on stderr, exit code 1
    pass


def int_list(text):
    return [int(v) for v in text.split(",") if v.strip()]


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    for name, default in (("tokens", 16384), ("hidden", 2048), ("experts", 64), ("top_k", 6),
                          ("ffn_hidden", 1408), ("iters", 20), ("warmup", 5)):
        p.add_argument("--" + name, type=int, default=default)
    p.add_argument("--shared", type=int_list, default=[0, 2], help="comma list of shared-expert counts")
    p.add_argument("--dtype", default="bf16,fp32", help="comma list of bf16, fp16, fp32")
    p.add_argument("--model", choices=["qwen2_moe", "deepseek"], default="qwen2_moe")
    p.add_argument("--format", choices=["table", "json"], default="table")
    return p.parse_args()


def qwen_skip_shared(block, torch, cfg):
    """Qwen2MoeSparseMoeBlock always has one shared expert and no switch to turn it off, so for --shared 0 this
    instance's forward is replaced by the class's routed branch alone (no shared expert, no sigmoid gate): no
    shared work is timed, and the output is exactly the routed sum (not a zero-output stand-in). Handles both
    layouts: older transformers (nn.Linear router, ModuleList of per-expert MLPs) and newer ones (TopKRouter
    returning (logits, top_k_weights, top_k_index), fused experts called as experts(x, index, weights))."""
    F = torch.nn.functional

    def forward(hidden_states):
        b, s, h = hidden_states.shape
        x = hidden_states.reshape(-1, h)
        if isinstance(block.experts, torch.nn.ModuleList):
            w = F.softmax(block.gate(x), dim=1, dtype=torch.float)
            w, idx = torch.topk(w, cfg.num_experts_per_tok, dim=-1)
            if cfg.norm_topk_prob:
                w = w / w.sum(dim=-1, keepdim=True)
            w = w.to(x.dtype)
            out = torch.zeros_like(x)
            mask = F.one_hot(idx, num_classes=cfg.num_experts).permute(2, 1, 0)
            for e in (mask.sum(dim=(-1, -2)) > 0).nonzero(as_tuple=True)[0].tolist():
                slot, tok = torch.where(mask[e])
                out.index_add_(0, tok, (block.experts[e](x[tok]) * w[tok, slot, None]).to(x.dtype))
        else:  # the router returns (..., top_k_weights, top_k_index)
            r = block.gate(x)
            out = block.experts(x, r[-1], r[-2])
        return out.reshape(b, s, h)

    block.forward = forward
    block.shared_expert = block.shared_expert_gate = None  # drop the unused zero-width modules


def build_block(args, shared, dtype, torch, transformers):
    common = dict(hidden_size=args.hidden, num_experts_per_tok=args.top_k, moe_intermediate_size=args.ffn_hidden)
    if args.model == "qwen2_moe":
        try:
            from transformers.models.qwen2_moe.configuration_qwen2_moe import Qwen2MoeConfig as Config
            from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeSparseMoeBlock as Block
        except ImportError as e:
            raise BenchError(f"transformers {transformers.__version__} has no Qwen2MoeSparseMoeBlock ({e})")
        kwargs = dict(num_experts=args.experts, norm_topk_prob=True,
                      shared_expert_intermediate_size=shared * args.ffn_hidden, **common)
    else:
        try:
            from transformers.models.deepseek_v3.configuration_deepseek_v3 import DeepseekV3Config as Config
            from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE as Block
        except ImportError as e:
            raise BenchError(f"transformers {transformers.__version__} has no DeepseekV3MoE ({e}); "
                             "upgrade transformers or use --model qwen2_moe")
        # shared == 0 builds a zero-width shared MLP: HF's own way to have none (only empty kernels remain)
        kwargs = dict(n_routed_experts=args.experts, n_shared_experts=shared, n_group=1, topk_group=1, **common)
    try:
        cfg = Config(**kwargs)
    except (TypeError, ValueError) as e:  # a kwarg or value this version rejects
        raise BenchError(f"transformers {transformers.__version__}: {Config.__name__} rejected {kwargs} ({e})")
    # Newer transformers dispatch fused experts on config._experts_implementation, which only a PreTrainedModel
    # fills in (a bare block would see None): pin the eager per-expert loop.
    if hasattr(cfg, "_experts_implementation"):
        cfg._experts_implementation = "eager"
    with torch.device("cuda"), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Initializing zero-element tensors")  # zero-width shared MLP
        block = Block(cfg)
    if args.model == "qwen2_moe" and shared == 0:
        qwen_skip_shared(block, torch, cfg)
    # Check the shapes really came from our kwargs (configs keep unknown kwargs as plain attributes).
    per_expert, counts = GEMMS_PER_EXPERT * args.hidden * args.ffn_hidden, {"routed": 0, "shared": 0}
    for name, p in block.named_parameters():
        part = name.split(".")[0]
        if part in ("experts", "shared_expert", "shared_experts"):
            counts["routed" if part == "experts" else "shared"] += p.numel()
    want = {"routed": args.experts * per_expert, "shared": shared * per_expert}
    if counts != want:
        raise BenchError(f"transformers {transformers.__version__}: {type(block).__name__} built expert weights "
                         f"{counts}, expected {want}; a config kwarg was ignored by this version")
    with torch.no_grad():  # some versions leave weights uninitialised (torch.empty) or the router at zero
        for p in block.parameters():
            p.normal_(0.0, 0.02)
    return block.to(dtype).train()


def time_block(args, block, dtype, torch):
    x = torch.randn(1, args.tokens, args.hidden, device="cuda", dtype=dtype, requires_grad=True)
    grad = torch.randn(1, args.tokens, args.hidden, device="cuda", dtype=dtype)
    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for it in range(args.warmup + args.iters):
        block.zero_grad(set_to_none=True)
        x.grad = None
        start.record()
        out = block(x)
        out = out[0] if isinstance(out, tuple) else out  # (hidden, router_logits) in older versions
        out.backward(grad)
        stop.record()
        stop.synchronize()
        if it >= args.warmup:
            times.append(start.elapsed_time(stop))
    return sorted(times)[len(times) // 2]


def main():
    args = parse_args()
    try:
        import torch
    except ImportError as e:
        raise BenchError(f"PyTorch is not installed ({e})")
    try:
        import transformers
    except ImportError as e:
        raise BenchError(f"transformers is not installed ({e})")
    if not torch.cuda.is_available():
        raise BenchError("no CUDA device (torch.cuda.is_available() is False)")
    known = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    dtypes = [d.strip() for d in args.dtype.split(",") if d.strip()]
    if not dtypes or any(d not in known for d in dtypes):
        raise BenchError(f"--dtype {args.dtype}: expected a comma list of bf16, fp16, fp32")
    if min(args.tokens, args.hidden, args.experts, args.top_k, args.ffn_hidden, args.iters) < 1:
        raise BenchError("--tokens, --hidden, --experts, --top_k, --ffn_hidden and --iters must be >= 1")
    if args.top_k > args.experts or args.warmup < 0 or not args.shared or min(args.shared) < 0:
        raise BenchError("need --top_k <= --experts, --warmup >= 0 and a non-empty --shared list of counts >= 0")
    device = torch.cuda.get_device_name()
    cls = "Qwen2MoeSparseMoeBlock" if args.model == "qwen2_moe" else "DeepseekV3MoE"
    impl = f"torch-eager {cls}"
    cols = [("device", max(6, len(device)), "<s"), ("impl", len(impl), "<s"), ("dtype", 5, "<s"),
            ("shared", 6, ">d"), ("ms", 10, ">.3f"), ("tokens/s", 12, ">.0f"), ("expert TFLOP/s", 14, ">.2f")]
    if args.format == "table":
        print(f"# transformers {transformers.__version__}, torch {torch.__version__}; tokens {args.tokens}, "
              f"hidden {args.hidden}, experts {args.experts}, top_k {args.top_k}, ffn_hidden {args.ffn_hidden}, "
              f"{args.iters} iters after {args.warmup} warm-up (median)")
        print("  ".join(f"{name:{f[0]}{w}}" for name, w, f in cols), flush=True)
    for shared in args.shared:
        for d in dtypes:
            torch.manual_seed(0)
            try:
                ms = time_block(args, build_block(args, shared, known[d], torch, transformers), known[d], torch)
            except RuntimeError as e:  # torch.cuda.OutOfMemoryError is a RuntimeError
                if "out of memory" not in str(e):
                    raise
                raise BenchError(f"out of GPU memory at --shared {shared} --dtype {d} (--tokens {args.tokens})")
            torch.cuda.empty_cache()
            flops = 3.0 * GEMMS_PER_EXPERT * 2.0 * args.tokens * args.hidden * args.ffn_hidden * (args.top_k + shared)
            row = [device, impl, d, shared, ms, args.tokens / (ms * 1e-3), flops / (ms * 1e-3) / 1e12]
            if args.format == "table":
                print("  ".join(f"{v:{f[0]}{w}{f[1:]}}" for v, (_, w, f) in zip(row, cols)), flush=True)
            else:
                keys = ["device", "impl", "dtype", "shared", "ms", "tokens_per_s", "expert_tflops"]
                obj = dict(zip(keys, row), transformers_version=transformers.__version__,
                           torch_version=torch.__version__)
                print(json.dumps(obj), flush=True)


if __name__ == "__main__":
    try:
        main()
    except BenchError as e:
        sys.exit(f"torch_moe_block: {e}")
    except Exception as e:  # e.g. an API this transformers version lacks: keep it to one line
        sys.exit("torch_moe_block: " + " ".join(f"{type(e).__name__}: {e}".split()))
