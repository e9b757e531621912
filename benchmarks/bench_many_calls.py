"""Small models and many calls: what one attribute() call costs beyond the model.

1. The MLP of `igfast bench` (64 features, hidden 128, 128, 10 outputs), batch 64,
   gausslegendre, n_steps 16, 50 and 200: the floor (one forward and one
   input-gradient backward over every path row), a plain vectorised IG in PyTorch,
   igfast and Captum. The fixed cost of a call is igfast's median minus the floor's.
2. 1,000 calls of one example each (the MLP, n_steps 50): seconds for all of them.
3. Captum's metrics over each explainer: ``sensitivity_max`` (which calls
   ``attribute`` once and then once per batch of perturbed inputs: 11 calls here) and
   ``infidelity`` (one attribute() call, then forward calls of the model) on the MLP
   and the CNN of `igfast bench`, over igfast's IntegratedGradients against over
   Captum's.

Every variant is timed interleaved with the others of its table, one thread,
medians; calls are made without the convergence delta (the floor computes none).

    python benchmarks/bench_many_calls.py           # a few minutes on CPU
    python benchmarks/bench_many_calls.py --quick   # seconds (CI smoke)
    python benchmarks/bench_many_calls.py --json many-calls.json
"""

import argparse
import json
import time

import torch

import igfast
from igfast.bench.timing import interleaved_medians
from igfast.bench.workloads import WORKLOADS, input_path_floor, input_path_plain_ig


def fixed_cost_table(n_steps_list, repeats):
    model, x, baseline, target = WORKLOADS["mlp"].build("cpu")
    import captum.attr as captum_attr

    rows = []
    ours, theirs = igfast.IntegratedGradients(model), captum_attr.IntegratedGradients(model)
    for n_steps in n_steps_list:
        reference = theirs.attribute(x, baseline, target=target, n_steps=n_steps)
        difference = float((ours.attribute(x, baseline, target=target, n_steps=n_steps) - reference).abs().max())
        variants = {
            "floor": input_path_floor(model, x, baseline, target, n_steps, "gausslegendre"),
            "plain": input_path_plain_ig(model, x, baseline, target, n_steps, "gausslegendre"),
            "igfast": lambda: ours.attribute(x, baseline, target=target, n_steps=n_steps),
            "captum": lambda: theirs.attribute(x, baseline, target=target, n_steps=n_steps),
        }
        medians = interleaved_medians(variants, repeats, "cpu")
        rows.append(dict(
            n_steps=n_steps, **{f"{name}_ms": 1e3 * seconds for name, seconds in medians.items()},
            igfast_over_floor=medians["igfast"] / medians["floor"],
            plain_over_floor=medians["plain"] / medians["floor"],
            igfast_over_plain=medians["igfast"] / medians["plain"],
            speedup_over_captum=medians["captum"] / medians["igfast"],
            fixed_cost_us=1e6 * (medians["igfast"] - medians["floor"]),
            max_difference=difference, chunks=len(ours.last_integral.chunks),
        ))
    return rows


def one_example_calls(calls, repeats):
    model, x, baseline, target = WORKLOADS["mlp"].build("cpu")
    import captum.attr as captum_attr

    examples = [(x[i:i + 1], baseline[i:i + 1], target[i:i + 1]) for i in range(calls)] if calls <= len(x) else [
        (x[i % len(x)].unsqueeze(0), baseline[:1], target[i % len(x)].unsqueeze(0)) for i in range(calls)]
    ours, theirs = igfast.IntegratedGradients(model), captum_attr.IntegratedGradients(model)
    floors = [input_path_floor(model, a, b, t, 50, "gausslegendre") for a, b, t in examples]
    plains = [input_path_plain_ig(model, a, b, t, 50, "gausslegendre") for a, b, t in examples]

    def each(run):
        return lambda: [run(i) for i in range(calls)]

    variants = {
        "floor": each(lambda i: floors[i]()),
        "plain": each(lambda i: plains[i]()),
        "igfast": each(lambda i: ours.attribute(examples[i][0], examples[i][1], target=examples[i][2], n_steps=50)),
        "captum": each(lambda i: theirs.attribute(examples[i][0], examples[i][1], target=examples[i][2], n_steps=50)),
    }
    medians = interleaved_medians(variants, repeats, "cpu")
    return dict(calls=calls, **{f"{name}_s": seconds for name, seconds in medians.items()},
                igfast_over_floor=medians["igfast"] / medians["floor"],
                speedup_over_captum=medians["captum"] / medians["igfast"],
                fixed_cost_us=1e6 * (medians["igfast"] - medians["floor"]) / calls)


def metric_rows(workloads, batch, repeats):
    import captum.attr as captum_attr
    from captum.metrics import infidelity, sensitivity_max

    rows = []
    for key in workloads:
        model, x, baseline, target = WORKLOADS[key].build("cpu")
        x, baseline, target = x[:batch], baseline[:batch], target[:batch]
        explainers = {"igfast": igfast.IntegratedGradients(model), "captum": captum_attr.IntegratedGradients(model)}

        def perturb(inputs):
            noise = torch.randn_like(inputs) * 0.02
            return noise, inputs - noise

        def sensitivity(explainer):
            torch.manual_seed(0)
            return sensitivity_max(explainer.attribute, x, n_perturb_samples=10, max_examples_per_batch=batch,
                                   baselines=baseline, target=target, n_steps=50)

        def infidelity_of(explainer):
            torch.manual_seed(0)
            attributions = explainer.attribute(x, baseline, target=target, n_steps=50)
            return infidelity(model, perturb, x, attributions, target=target, n_perturb_samples=10)

        for metric, run in (("sensitivity_max", sensitivity), ("infidelity", infidelity_of)):
            values = {name: run(explainer) for name, explainer in explainers.items()}
            difference = float((values["igfast"] - values["captum"]).abs().max())
            medians = interleaved_medians({name: (lambda e=e: run(e)) for name, e in explainers.items()},
                                          repeats, "cpu")
            rows.append(dict(workload=key, metric=metric, batch=batch, igfast_s=medians["igfast"],
                             captum_s=medians["captum"], speedup=medians["captum"] / medians["igfast"],
                             metric_difference=difference))
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer steps, calls and repeats (seconds)")
    parser.add_argument("--json", help="also write the tables to this file")
    args = parser.parse_args()
    torch.set_num_threads(1)
    started = time.perf_counter()
    repeats = 5 if args.quick else 41
    fixed = fixed_cost_table((16,) if args.quick else (16, 50, 200), repeats)
    print("MLP (64 features, batch 64), gausslegendre, medians (ms):\n")
    print("| n_steps | floor | plain IG | igfast | Captum | igfast / floor | plain / floor | igfast / plain | "
          "speedup over Captum | fixed cost (us) | chunks |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for row in fixed:
        print(f"| {row['n_steps']} | {row['floor_ms']:.3f} | {row['plain_ms']:.3f} | {row['igfast_ms']:.3f} | "
              f"{row['captum_ms']:.3f} | {row['igfast_over_floor']:.2f} | {row['plain_over_floor']:.2f} | "
              f"{row['igfast_over_plain']:.2f} | {row['speedup_over_captum']:.2f}x | {row['fixed_cost_us']:.0f} | "
              f"{row['chunks']} |")
    single = one_example_calls(20 if args.quick else 1000, 3 if args.quick else 7)
    print(f"\n{single['calls']} calls of one example each (MLP, n_steps 50), seconds for all:\n")
    print("| floor | plain IG | igfast | Captum | igfast / floor | speedup over Captum | fixed cost per call (us) |")
    print("|---|---|---|---|---|---|---|")
    print(f"| {single['floor_s']:.3f} | {single['plain_s']:.3f} | {single['igfast_s']:.3f} | {single['captum_s']:.3f} | "
          f"{single['igfast_over_floor']:.2f} | {single['speedup_over_captum']:.2f}x | {single['fixed_cost_us']:.0f} |")
    metrics = metric_rows(("mlp",) if args.quick else ("mlp", "cnn"), 8, 3 if args.quick else 15)
    print("\nCaptum's metrics over igfast's IntegratedGradients against over Captum's (batch 8, n_steps 50, "
          "10 perturbations), medians (s):\n")
    print("| workload | metric | over igfast | over Captum | speedup | largest metric difference |")
    print("|---|---|---|---|---|---|")
    for row in metrics:
        print(f"| {row['workload']} | {row['metric']} | {row['igfast_s']:.4f} | {row['captum_s']:.4f} | "
              f"{row['speedup']:.2f}x | {row['metric_difference']:.1e} |")
    print(f"\n({time.perf_counter() - started:.0f} s)")
    if args.json:
        with open(args.json, "w") as out:
            json.dump({"fixed_cost": fixed, "one_example_calls": single, "metrics": metrics}, out, indent=1)


if __name__ == "__main__":
    main()
