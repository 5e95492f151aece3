"""``ecgfm bench data | shard | metrics | distillation | infer | embed | train | eval``: benchmarks measured against a
baseline run beside them."""

from __future__ import annotations

import sys

from jsonargparse import ArgumentParser

USAGE = """usage: ecgfm bench data [--segments N] [--wfdb_records N] [--index_segments N] ...
       ecgfm bench shard [--records N] [--parts N] [--records_per_shard N] [--repeats N]
       ecgfm bench metrics [--labels N] [--samples N] [--batch N] [--bins N] ...
       ecgfm bench distillation [--out DIR] [--n_segments N] [--seeds '[0,1,2]'] [--label_fraction F] ...
       ecgfm bench infer [--backbones '[net1d-small, ecgfounder-12lead]'] [--repeats N] [--batch N] [--quick true]
       ecgfm bench embed [--model NAME_OR_DIR] [--n_segments N] [--epochs N] [--batch_size N] [--accelerator cpu]
       ecgfm bench train [--backbones '[net1d-small, ecgfounder-12lead]'] [--batch N] [--steps N] [--device cuda] ...
       ecgfm bench eval [--n 100000] [--n_resamples 2000] [--records_per_patient N] [--reference_resamples N]"""


def run(argv: list[str]) -> int:
    if argv[:1] == ["data"]:
        return run_data(argv[1:])
    if argv[:1] == ["shard"]:
        return run_shard(argv[1:])
    if argv[:1] == ["metrics"]:
        return run_metrics(argv[1:])
    if argv[:1] == ["distillation"]:
        return run_distillation(argv[1:])
    if argv[:1] == ["infer"]:
        return run_infer(argv[1:])
    if argv[:1] == ["embed"]:
        return run_embed(argv[1:])
    if argv[:1] == ["train"]:
        return run_train(argv[1:])
    if argv[:1] == ["eval"]:
        return run_eval(argv[1:])
    if argv[:1] in (["-h"], ["--help"]):
        print(USAGE)
        return 0
    print(USAGE, file=sys.stderr)
    return 2


def run_data(argv: list[str]) -> int:
    from ecgfm.bench.data import run_data_benchmark

    parser = ArgumentParser(prog="ecgfm bench data", exit_on_error=False, description=run_data_benchmark.__doc__)
    parser.add_function_arguments(run_data_benchmark, skip={"console"})
    cfg = parser.parse_args(argv).as_dict()
    cfg["workers"] = tuple(cfg["workers"])
    run_data_benchmark(**{k: v for k, v in cfg.items() if k != "__path__"})
    return 0


def run_shard(argv: list[str]) -> int:
    from ecgfm.bench.shard import run_shard_benchmark

    description = run_shard_benchmark.__doc__.split("\n\n")[0]
    parser = ArgumentParser(prog="ecgfm bench shard", exit_on_error=False, description=description)
    parser.add_function_arguments(run_shard_benchmark, skip={"console"})
    cfg = parser.parse_args(argv).as_dict()
    run_shard_benchmark(**{k: v for k, v in cfg.items() if k != "__path__"})
    return 0


def run_metrics(argv: list[str]) -> int:
    from ecgfm.bench.metrics import run_metrics_benchmark

    parser = ArgumentParser(
        prog="ecgfm bench metrics", exit_on_error=False, description=run_metrics_benchmark.__doc__.split("\n\n")[0]
    )
    parser.add_function_arguments(run_metrics_benchmark, skip={"console"})
    cfg = parser.parse_args(argv).as_dict()
    run_metrics_benchmark(**{k: v for k, v in cfg.items() if k != "__path__"})
    return 0


def run_distillation(argv: list[str]) -> int:
    from ecgfm.bench.distillation import run_distillation_benchmark
    from ecgfm.commands.lightning import run_lightning

    description = run_distillation_benchmark.__doc__.split("\n\n")[0]
    parser = ArgumentParser(prog="ecgfm bench distillation", exit_on_error=False, description=description)
    parser.add_function_arguments(run_distillation_benchmark, skip={"run"})
    cfg = {k: v for k, v in parser.parse_args(argv).as_dict().items() if k != "__path__"}
    run_distillation_benchmark(run_lightning, **cfg)
    return 0


def run_embed(argv: list[str]) -> int:
    from ecgfm.bench.embed import run_embed_benchmark

    description = run_embed_benchmark.__doc__.split("\n\n")[0]
    parser = ArgumentParser(prog="ecgfm bench embed", exit_on_error=False, description=description)
    parser.add_function_arguments(run_embed_benchmark, skip={"console"})
    cfg = {k: v for k, v in parser.parse_args(argv).as_dict().items() if k != "__path__"}
    run_embed_benchmark(**cfg)
    return 0


def run_infer(argv: list[str]) -> int:
    from ecgfm.bench.infer import run_infer_benchmark

    description = run_infer_benchmark.__doc__.split("\n\n")[0]
    parser = ArgumentParser(prog="ecgfm bench infer", exit_on_error=False, description=description)
    parser.add_function_arguments(run_infer_benchmark, skip={"console"})
    cfg = {k: v for k, v in parser.parse_args(argv).as_dict().items() if k != "__path__"}
    run_infer_benchmark(**cfg)
    return 0


def run_train(argv: list[str]) -> int:
    from ecgfm.bench.train import run_train_benchmark

    description = run_train_benchmark.__doc__.split("\n\n")[0]
    parser = ArgumentParser(prog="ecgfm bench train", exit_on_error=False, description=description)
    parser.add_function_arguments(run_train_benchmark, skip={"console"})
    cfg = {k: v for k, v in parser.parse_args(_underscored(argv)).as_dict().items() if k != "__path__"}
    run_train_benchmark(**cfg)
    return 0


def run_eval(argv: list[str]) -> int:
    from ecgfm.bench.eval import run_eval_benchmark

    description = run_eval_benchmark.__doc__.split("\n\n")[0]
    parser = ArgumentParser(prog="ecgfm bench eval", exit_on_error=False, description=description)
    parser.add_function_arguments(run_eval_benchmark, skip={"console"})
    cfg = {k: v for k, v in parser.parse_args(argv).as_dict().items() if k != "__path__"}
    run_eval_benchmark(**cfg)
    return 0


def _underscored(argv: list[str]) -> list[str]:
    """``--peak-tflops 989`` as ``--peak_tflops 989``: option names with dashes are accepted too."""
    out = []
    for arg in argv:
        if arg.startswith("--") and len(arg) > 2:
            name, sep, value = arg[2:].partition("=")
            arg = f"--{name.replace('-', '_')}{sep}{value}"
        out.append(arg)
    return out
