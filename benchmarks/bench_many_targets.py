"""Many targets in one pass against K separate calls, with the ideal speedup beside it.

- CNN (3x32x32, batch 16), K = 10 classes, n_steps 50: igfast target="all" against
  10 separate igfast calls and 10 separate Captum calls.
- TinyCausalLM (seeded, width 128, 2 layers), prompt 16 tokens, K = 16 generated
  tokens, batch 4, n_steps 50: attribute_generated_tokens (one pass) against 16
  separate igfast / Captum LayerIG calls on the full sequence, and against per-token
  IG over growing prefixes (igfast and Captum), the usual way.

Variants run interleaved (medians); peak memory from a first, untimed round. The
ideal speedup over K separate calls is (F + B) / (F / K + B), with F and B the
forward and the input-gradient backward of the same path batch, timed in the
same run.

    python benchmarks/bench_many_targets.py           # about 5 minutes on CPU
    python benchmarks/bench_many_targets.py --quick
"""

import argparse
import json
import statistics
import time

import torch

import igfast
from igfast.attr.generated_tokens import GeneratedTokenLogProbs, attribute_generated_tokens
from igfast.bench.timing import interleaved_medians, synchronize
from igfast.bench.workloads import WORKLOADS
from igfast.examples.tiny_causal_lm import TinyCausalLM
from igfast.bench.peak import peak_of
from igfast.memory import format_size
from igfast.quadrature import alphas_and_weights

try:
    import captum.attr as captum_attr
except ImportError:
    captum_attr = None


def forward_and_backward_seconds(run_forward, path, device, repeats=5):
    """(F, B): median forward time and median backward time of one path batch."""
    forwards, backwards = [], []
    for _ in range(repeats + 1):
        leaf = path.detach().requires_grad_()
        synchronize(device)
        start = time.perf_counter()
        output = run_forward(leaf)
        synchronize(device)
        middle = time.perf_counter()
        torch.autograd.grad(output, leaf, torch.ones_like(output))
        synchronize(device)
        end = time.perf_counter()
        forwards.append(middle - start)
        backwards.append(end - middle)
    return statistics.median(forwards[1:]), statistics.median(backwards[1:])


def measure(variants, device, repeats):
    peaks = {}
    for name, run in variants.items():
        _, peaks[name] = peak_of(run, device)
    return interleaved_medians(variants, repeats, device, warmup=False), peaks


def path_rows(x, baseline, n_steps):
    alphas, _ = alphas_and_weights("gausslegendre", n_steps)
    alphas = alphas.to(x).view((-1,) + (1,) * x.dim())
    return (baseline + alphas * (x - baseline)).reshape((-1,) + x.shape[1:])


def cnn_case(quick, device, repeats):
    model, x, baseline, _ = WORKLOADS["cnn"].build(device)
    n_steps, classes = (8, 10) if quick else (50, 10)
    if quick:
        x, baseline = x[:4], baseline[:4]
    ours = igfast.IntegratedGradients(model)
    variants = {
        "igfast, one pass (target='all')": lambda: ours.attribute(x, baseline, target="all", n_steps=n_steps),
        "igfast, K separate calls": lambda: [ours.attribute(x, baseline, target=k, n_steps=n_steps)
                                             for k in range(classes)],
    }
    if captum_attr is not None:
        theirs = captum_attr.IntegratedGradients(model)
        variants["Captum, K separate calls"] = lambda: [
            theirs.attribute(x, baseline, target=k, n_steps=n_steps) for k in range(classes)]
    # F and B on the rows of one igfast single-target chunk.
    ours.attribute(x, baseline, target=0, n_steps=n_steps)
    rows = max(c.rows for c in ours.last_integral.chunks)
    path = path_rows(x, baseline, n_steps)[:rows]
    f, b = forward_and_backward_seconds(lambda leaf: model(leaf)[:, 0], path, device)
    medians, peaks = measure(variants, device, repeats)
    name = f"CNN 3x32x32, batch {x.shape[0]}, K = {classes} classes, n_steps {n_steps}"
    return name, classes, medians, peaks, (f, b), "igfast, one pass (target='all')", "igfast, K separate calls"


def lm_case(quick, device, repeats):
    lm = TinyCausalLM(vocabulary=64, width=128 if not quick else 32, layers=2).to(device)
    batch, prompt_length, tokens, n_steps = (2, 6, 4, 8) if quick else (4, 16, 16, 50)
    prompt = torch.randint(1, 64, (batch, prompt_length), generator=torch.Generator().manual_seed(0)).to(device)
    generated = lm.generate(prompt, tokens)
    ids = torch.cat([prompt, generated], 1)
    baselines = torch.cat([torch.zeros_like(prompt), generated], 1)
    full = GeneratedTokenLogProbs(lm, prompt_length)
    ours_full = igfast.LayerIntegratedGradients(full, lm.tokens)

    def per_token_prefix(library):
        for t in range(tokens):
            prefix = prompt_length + t + 1
            library.LayerIntegratedGradients(GeneratedTokenLogProbs(lm, prompt_length + t), lm.tokens).attribute(
                ids[:, :prefix], baselines=baselines[:, :prefix], n_steps=n_steps)

    variants = {
        "igfast, one pass (attribute_generated_tokens)": lambda: attribute_generated_tokens(
            lm, lm.tokens, prompt, generated, 0, n_steps=n_steps),
        "igfast, K separate calls": lambda: [ours_full.attribute(ids, baselines=baselines, target=t,
                                                                 n_steps=n_steps) for t in range(tokens)],
        "igfast, per-token IG on growing prefixes": lambda: per_token_prefix(igfast),
    }
    if captum_attr is not None:
        theirs_full = captum_attr.LayerIntegratedGradients(full, lm.tokens)
        variants["Captum, K separate calls"] = lambda: [
            theirs_full.attribute(ids, baselines=baselines, target=t, n_steps=n_steps) for t in range(tokens)]
        variants["Captum, per-token IG on growing prefixes"] = lambda: per_token_prefix(captum_attr)
    # F and B: the path of the token embeddings of one chunk, through the model.
    ours_full.attribute(ids, baselines=baselines, target=0, n_steps=n_steps)
    rows = max(c.rows for c in ours_full.last_integral.chunks)
    with torch.no_grad():
        end, start = lm.tokens(ids), lm.tokens(baselines)
    path = path_rows(end, start, n_steps)[:rows]
    repeated = ids.repeat(n_steps, 1)[:rows]

    def forward_from_embeddings(leaf):
        handle = lm.tokens.register_forward_hook(lambda m, a, out: leaf)
        try:
            return full(repeated)[:, 0]
        finally:
            handle.remove()

    f, b = forward_and_backward_seconds(forward_from_embeddings, path, device)
    medians, peaks = measure(variants, device, repeats)
    name = (f"TinyCausalLM (width {lm.head.in_features}), batch {batch}, prompt {prompt_length}, "
            f"K = {tokens} generated tokens, n_steps {n_steps}")
    return name, tokens, medians, peaks, (f, b), "igfast, one pass (attribute_generated_tokens)", "igfast, K separate calls"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds (default 3, quick 2)")
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    repeats = args.repeats or (2 if args.quick else 3)
    print(f"igfast {igfast.__version__}, torch {torch.__version__}, device {args.device}, "
          f"threads {args.threads}, {repeats} interleaved rounds, medians")
    results = {}
    for case in (cnn_case, lm_case):
        name, k, medians, peaks, (f, b), one_pass, separate = case(args.quick, args.device, repeats)
        ideal = (f + b) / (f / k + b)
        achieved = medians[separate] / medians[one_pass]
        print(f"\n{name}")
        print(f"  one chunk: forward {1e3 * f:.1f} ms, backward {1e3 * b:.1f} ms -> ideal speedup over K "
              f"separate calls (F + B) / (F / K + B) = {ideal:.2f}; achieved {achieved:.2f} "
              f"({100 * achieved / ideal:.0f}% of ideal)")
        header = f"  {'variant':48} {'median s':>9} {'one pass faster by':>18} {'peak memory':>12}"
        print(header)
        for variant, seconds in medians.items():
            peak = format_size(peaks[variant]) if peaks[variant] is not None else "-"
            print(f"  {variant:48} {seconds:9.3f} {seconds / medians[one_pass]:17.2f}x {peak:>12}")
        results[name] = {"K": k, "forward_s": f, "backward_s": b, "ideal_speedup": ideal,
                         "achieved_speedup": achieved,
                         "variants": {v: {"median_s": medians[v], "peak_bytes": peaks[v]} for v in medians}}
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(results, handle, indent=2)


if __name__ == "__main__":
    main()
