"""The model zoo table: igfast against Captum on every zoo model (igfast/bench/zoo.py),
for IntegratedGradients, LayerIntegratedGradients and NoiseTunnel under igfast's
automatic budget, a small memory_budget and an integer internal_batch_size.

Per row: whether igfast equals Captum (relative difference of attributions and delta
against the largest Captum attribution, at most 1e-5), the graphs a compiled model
compiled in each of two calls (igfast / Captum), and igfast's warnings. Captum runs
unchunked where igfast has a memory_budget.

    python benchmarks/bench_zoo.py               # every model (about a minute on CPU)
    python benchmarks/bench_zoo.py --quick       # the models without transformers
    python benchmarks/bench_zoo.py --json zoo.json
"""

import argparse
import json
import warnings

import torch

from igfast.bench import zoo

QUICK = ("compile_aot_eager", "autograd_function_ste", "checkpoint_non_reentrant", "batchnorm_train_mode")


def rows(models):
    for model in models:
        subject = zoo.ZOO[model]()
        for method in zoo.METHODS:
            for mode in zoo.MODES:
                if method in subject.unsupported:
                    yield dict(model=model, method=method, mode=mode, result="GradientError (Captum: RuntimeError)")
                    continue
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    comparison = zoo.compare(model, method, mode, subject)
                batch_dependent = subject.warns is not None and mode == "memory_budget"
                equal = comparison.relative_difference <= subject.tolerance
                yield dict(
                    model=model, method=method, mode=mode,
                    result=("equal" if equal else "differs") + (" (warned: batch-dependent)" if batch_dependent else ""),
                    relative_difference=comparison.relative_difference,
                    graphs_igfast=comparison.graphs_igfast, graphs_captum=comparison.graphs_captum,
                    warnings=[w.split(":")[0] for w in comparison.warnings],
                )


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the models without transformers")
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args()
    torch.set_num_threads(1)
    models = QUICK if args.quick else tuple(zoo.ZOO)
    table = []
    print("| model | method | mode | result | relative difference | graphs per call igfast / Captum | igfast warns |")
    print("|---|---|---|---|---|---|---|")
    for row in rows(models):
        table.append(row)
        difference = f"{row['relative_difference']:.1e}" if "relative_difference" in row else ""
        graphs = (f"{row['graphs_igfast']} / {row['graphs_captum']}" if row.get("graphs_igfast") or
                  row.get("graphs_captum") else "")
        print(f"| {row['model']} | {row['method']} | {row['mode']} | {row['result']} | {difference} | {graphs} | "
              f"{', '.join(sorted(set(row.get('warnings', []))))} |", flush=True)
    if args.json:
        with open(args.json, "w") as out:
            json.dump(table, out, indent=1)
    if any(row["result"].startswith("differs") and "warned" not in row["result"] for row in table):
        raise SystemExit("igfast differs from Captum on a zoo model")


if __name__ == "__main__":
    main()
