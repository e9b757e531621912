"""LLM attribution: igfast's one pass against Captum's LLMGradientAttribution.

Model: a GPT-2-small-sized config (12 layers, width 768, 12 heads, vocabulary
50257, random weights), prompt 64 tokens, targets of 16 and 64 tokens, n_steps 16
and 50 (gausslegendre). Variants, interleaved (medians):

- igfast: ``igfast.LLMGradientAttribution(igfast.LayerIntegratedGradients(...))``,
  every target token in one pass;
- captum: ``captum.attr.LLMGradientAttribution(captum.attr.LayerIntegratedGradients(...))``,
  one LayerIG per target token over the growing prefix;
- captum+igfast: Captum's wrapper (its per-token loop) over igfast's LayerIG.

Reported: time, peak memory (first, untimed round), model calls, the largest
difference to Captum relative to its scale, and the bound of the one-pass design:
per path row the per-token loop costs sum_t (F_t + B_t) (forward and backward over
the prompt and t target tokens, as Captum runs them) and the one pass F + T * B
(forward over prompt + target, one backward per token), all timed in the same run;
bound = sum_t (F_t + B_t) / (F + T * B) is the speedup the design allows, and
"of bound" = (Captum time / igfast time) / bound (goal: >= 0.9). F_t and B_t are
timed at three prefix lengths and summed over t from the quadratic through them
(attention makes the cost quadratic in length).

    python benchmarks/bench_llm.py                    # the full CPU table: hours on one thread
    python benchmarks/bench_llm.py --cases 16x16      # one case (target tokens x n_steps)
    python benchmarks/bench_llm.py --quick            # tiny config, CI smoke
    python benchmarks/bench_llm.py --device cuda --dtype bfloat16 --llama   # the GPU check's case

``llama_case(device, dtype, prompt_len=256, target_len=64)`` is the GPU check's
entry point (a Llama config of about 1.1B parameters; ``tiny=True`` for a CPU test).
"""

import argparse
import json
import statistics
import time
from typing import Any, Callable, Dict, List, Optional

import torch

import igfast
from igfast.attr.llm_attr import TargetLogProbs
from igfast.bench.timing import interleaved_medians, synchronize
from igfast.examples.hf_causal_lm import CORPUS, byte_level_tokenizer, random_causal_lm
from igfast.bench.peak import AllocationPeak
from igfast.memory import format_size

try:
    import captum.attr as captum_attr
except ImportError:
    captum_attr = None

GPT2_SMALL = dict(family="gpt2", vocabulary=50257, width=768, layers=12, heads=12)
# TinyLlama-1.1B's shape: 1.1e9 parameters.
LLAMA_1B = dict(family="llama", vocabulary=32000, width=2048, layers=22, heads=32,
                intermediate_size=5632, num_key_value_heads=4)
TINY_GPT2 = dict(family="gpt2", vocabulary=None, width=32, layers=2, heads=4)
TINY_LLAMA = dict(family="llama", vocabulary=None, width=64, layers=2, heads=4)


def build_model(shape: Dict[str, Any], tokenizer, device: str, dtype: torch.dtype):
    settings = dict(shape)
    family = settings.pop("family")
    return random_causal_lm(family, tokenizer, max_length=2048, dtype=dtype, **settings).to(device)


def prompt_and_target(tokenizer, prompt_len: int, target_len: int):
    """A TextTokenInput of exactly prompt_len tokens (<s> and corpus text) and the
    target_len corpus tokens that follow it."""
    words = tokenizer.encode(" ".join([CORPUS.replace("\n", " ")] * 64), add_special_tokens=False)
    starts = [i for i, t in enumerate(tokenizer.convert_ids_to_tokens(words)) if t.startswith("Ġ")]
    for start in starts:
        body = words[start:start + prompt_len - 1]  # <s> makes prompt_len
        text = tokenizer.decode(body).lstrip()
        make = captum_attr.TextTokenInput if captum_attr is not None else igfast.TextTokenInput
        inp = make(text, tokenizer, skip_tokens=["<s>"])
        if inp.inp_tensor.shape[1] == prompt_len:
            end = start + prompt_len - 1
            return inp, torch.tensor(words[end:end + target_len])
    raise RuntimeError(f"no corpus window tokenizes to {prompt_len} tokens")


class CountCalls:
    """Counts the model's forward calls while active."""

    def __init__(self, model) -> None:
        self.model, self.calls = model, 0

    def __enter__(self):
        self.handle = self.model.register_forward_hook(lambda *_: setattr(self, "calls", self.calls + 1))
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def _median_seconds(run: Callable[[], Any], device: str, repeats: int) -> float:
    times = []
    for _ in range(repeats + 1):
        synchronize(device)
        start = time.perf_counter()
        run()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def forward_backward_row_costs(model, ids: torch.Tensor, targets: torch.Tensor, rows: int, device: str,
                               repeats: int = 2) -> Dict[str, float]:
    """Seconds per path row: sum_t (F_t + B_t) of the per-token loop and F + T * B of
    the one pass, the backward taken with respect to the embedding output."""
    layer = model.get_input_embeddings()
    count = targets.shape[0]

    def forward_backward(forward, sequence, backwards):
        batch = sequence.expand(rows, -1).contiguous()
        holder = {}

        def keep(module, args, output):
            holder["leaf"] = output.detach().requires_grad_()
            return holder["leaf"]

        def forward_only():
            handle = layer.register_forward_hook(keep)
            try:
                holder["out"] = forward(batch)
            finally:
                handle.remove()

        def backward_only():
            out = holder["out"]
            for t in range(backwards):
                column = out[:, t] if out.dim() == 2 else out
                torch.autograd.grad(column, holder["leaf"], torch.ones_like(column), retain_graph=True)

        f = _median_seconds(forward_only, device, repeats)
        forward_only()
        b = _median_seconds(backward_only, device, repeats) / backwards
        return f / rows, b / rows

    def last_token_log_prob(target):
        return lambda batch: model(batch).logits[:, -1].log_softmax(-1)[:, target]

    lengths = sorted({0, count // 2, count - 1})
    per_length = {}
    for t in lengths:
        sequence = torch.cat([ids, targets[:t].reshape(1, -1).to(ids)], dim=1)
        per_length[t] = sum(forward_backward(last_token_log_prob(int(targets[t])), sequence, 1))
    xs = torch.tensor(lengths, dtype=torch.float64)
    ys = torch.tensor([per_length[t] for t in lengths], dtype=torch.float64)
    degree = len(lengths) - 1
    coefficients = torch.linalg.lstsq(torch.vander(xs, degree + 1), ys.unsqueeze(1)).solution.squeeze(1)
    loop = float((torch.vander(torch.arange(count, dtype=torch.float64), degree + 1) @ coefficients).sum())
    sequence = torch.cat([ids, targets[:-1].reshape(1, -1).to(ids)], dim=1)
    one_forward, one_backward = forward_backward(TargetLogProbs(model, targets), sequence, min(count, 4))
    return {"loop_row_s": loop, "one_pass_row_s": one_forward + count * one_backward,
            "F_s": one_forward, "B_s": one_backward}


def run_case(model, tokenizer, device: str, prompt_len: int, target_len: int, n_steps: int, repeats: int,
             captum: bool = True, mixed: bool = True, memory_budget=None) -> Dict[str, Any]:
    """One row of the table: times, peaks, calls, parity and the bound."""
    inp, targets = prompt_and_target(tokenizer, prompt_len, target_len)
    layer = model.get_input_embeddings()
    variants: Dict[str, Callable[[], Any]] = {}
    ours = igfast.LLMGradientAttribution(igfast.LayerIntegratedGradients(model, layer), tokenizer)
    variants["igfast"] = lambda: ours.attribute(inp, target=targets, n_steps=n_steps, memory_budget=memory_budget)
    if captum and captum_attr is not None:
        theirs = captum_attr.LLMGradientAttribution(captum_attr.LayerIntegratedGradients(model, layer), tokenizer)
        variants["captum"] = lambda: theirs.attribute(inp, target=targets, n_steps=n_steps)
        if mixed:
            wrapped = captum_attr.LLMGradientAttribution(igfast.LayerIntegratedGradients(model, layer), tokenizer)
            variants["captum+igfast"] = lambda: wrapped.attribute(inp, target=targets, n_steps=n_steps)
    results, peaks, calls = {}, {}, {}
    for name, run in variants.items():  # first, untimed round: results, peaks, calls
        with CountCalls(model) as counter, AllocationPeak(device) as meter:
            results[name] = run()
        peaks[name], calls[name] = meter.bytes, counter.calls
    row: Dict[str, Any] = {"prompt": prompt_len, "targets": target_len, "n_steps": n_steps,
                           "device": device, "dtype": str(next(model.parameters()).dtype).replace("torch.", "")}
    if "captum" in results:
        reference = results["captum"].token_attr.double()
        scale = float(reference.abs().max())
        for name in results:
            if name != "captum":
                row[f"rel_diff_{name}"] = float((results[name].token_attr.double() - reference).abs().max()) / scale
    times = interleaved_medians(variants, repeats, device, warmup=False)
    costs = forward_backward_row_costs(model, inp.inp_tensor.to(device), targets.to(device),
                                       rows=min(n_steps, 4), device=device)
    bound = costs["loop_row_s"] / costs["one_pass_row_s"]
    row.update({f"time_{k}_s": v for k, v in times.items()})
    row.update({f"peak_{k}_bytes": v for k, v in peaks.items()})
    row.update({f"calls_{k}": v for k, v in calls.items()})
    row.update(costs)
    row["bound"] = bound
    row["one_pass_floor_s"] = n_steps * costs["one_pass_row_s"]
    if "captum" in times:
        row["speedup"] = times["captum"] / times["igfast"]
        row["of_bound"] = row["speedup"] / bound
        if "captum+igfast" in times:
            row["speedup_captum_wrapper_over_igfast"] = times["captum"] / times["captum+igfast"]
    return row


def llama_case(device: str, dtype: torch.dtype, prompt_len: int = 256, target_len: int = 64, n_steps: int = 16,
               repeats: int = 1, tiny: bool = False, memory_budget=None) -> Dict[str, Any]:
    """The GPU check's case: a Llama config of about 1.1B parameters (random weights),
    igfast against Captum: times, peak memory, model calls, parity and the bound.
    ``tiny=True`` uses a 2-layer width-64 Llama (for CPU tests of this function)."""
    tokenizer = byte_level_tokenizer()
    model = build_model(TINY_LLAMA if tiny else LLAMA_1B, tokenizer, device, dtype)
    row = run_case(model, tokenizer, device, prompt_len, target_len, n_steps, repeats, mixed=False,
                   memory_budget=memory_budget)
    row["parameters"] = sum(p.numel() for p in model.parameters())
    return row


def _print_table(rows: List[Dict[str, Any]]) -> None:
    header = (f"{'T':>4} {'n':>4} {'igfast s':>9} {'captum s':>9} {'c+igfast s':>10} {'speedup':>8} "
              f"{'bound':>6} {'of bound':>8} {'floor s':>8} {'peak igfast':>12} {'peak captum':>12} "
              f"{'calls i/c':>10} {'rel diff':>9}")
    print(header)
    for r in rows:
        print(f"{r['targets']:>4} {r['n_steps']:>4} {r['time_igfast_s']:>9.3f} {r.get('time_captum_s', float('nan')):>9.3f} "
              f"{r.get('time_captum+igfast_s', float('nan')):>10.3f} {r.get('speedup', float('nan')):>8.2f} "
              f"{r['bound']:>6.2f} {r.get('of_bound', float('nan')):>8.2f} {r['one_pass_floor_s']:>8.3f} "
              f"{format_size(r['peak_igfast_bytes']):>12} {format_size(r.get('peak_captum_bytes', 0)):>12} "
              f"{r['calls_igfast']:>4}/{r.get('calls_captum', 0):<5} {r.get('rel_diff_igfast', float('nan')):>9.1e}")


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny config, prompt 8, targets 4, n_steps 4 (CI smoke)")
    parser.add_argument("--cases", default="16x16,16x50,64x16,64x50",
                        help="target tokens x n_steps, comma-separated (default: the full table)")
    parser.add_argument("--prompt", type=int, default=64)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--llama", action="store_true", help="the GPU check's Llama-1.1B case instead")
    parser.add_argument("--no-mixed", action="store_true", help="skip Captum's wrapper over igfast's LayerIG")
    parser.add_argument("--json", default=None, help="write the rows here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    if args.llama:
        rows = [llama_case(args.device, dtype, tiny=args.quick, repeats=args.repeats,
                           **({"prompt_len": 8, "target_len": 4, "n_steps": 4} if args.quick else {}))]
    else:
        tokenizer = byte_level_tokenizer()
        model = build_model(TINY_GPT2 if args.quick else GPT2_SMALL, tokenizer, args.device, dtype)
        cases = [(4, 4)] if args.quick else [tuple(int(v) for v in c.split("x")) for c in args.cases.split(",")]
        prompt = 8 if args.quick else args.prompt
        rows = []
        for target_len, n_steps in cases:
            rows.append(run_case(model, tokenizer, args.device, prompt, target_len, n_steps,
                                 1 if args.quick else args.repeats, mixed=not args.no_mixed))
            print(json.dumps(rows[-1]), flush=True)
    _print_table(rows)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(rows, handle, indent=1)


if __name__ == "__main__":
    main()
