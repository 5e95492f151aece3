"""``ecgfm bench data | shard | readers | metrics | distillation | infer | embed | train | eval``: benchmarks measured
against a baseline run beside them."""

from __future__ import annotations

import importlib
import sys

from jsonargparse import ArgumentParser

USAGE = """usage: ecgfm bench data [--segments N] [--wfdb_records N] [--index_segments N] ...
       ecgfm bench shard [--records N] [--parts N] [--records_per_shard N] [--repeats N]
       ecgfm bench readers [--records N] [--repeats N] [--formats '[wfdb, edf, dicom]'] [--json_out FILE]
       ecgfm bench metrics [--labels N] [--samples N] [--batch N] [--bins N] ...
       ecgfm bench distillation [--out DIR] [--n_segments N] [--seeds '[0,1,2]'] [--label_fraction F] ...
       ecgfm bench infer [--backbones '[net1d-small, ecgfounder-12lead]'] [--repeats N] [--batch N] [--quick true]
       ecgfm bench embed [--model NAME_OR_DIR] [--n_segments N] [--epochs N] [--batch_size N] [--accelerator cpu]
       ecgfm bench train [--backbones '[net1d-small, ecgfounder-12lead]'] [--batch N] [--steps N] [--device cuda] ...
       ecgfm bench eval [--n 100000] [--n_resamples 2000] [--records_per_patient N] [--reference_resamples N]"""


#: Subcommand -> (module under ecgfm/bench/, its entry function): each entry's signature is its command line.
BENCHMARKS = {
    "data": ("data", "run_data_benchmark"),
    "shard": ("shard", "run_shard_benchmark"),
    "readers": ("readers", "run_readers_benchmark"),
    "metrics": ("metrics", "run_metrics_benchmark"),
    "distillation": ("distillation", "run_distillation_benchmark"),
    "infer": ("infer", "run_infer_benchmark"),
    "embed": ("embed", "run_embed_benchmark"),
    "train": ("train", "run_train_benchmark"),
    "eval": ("eval", "run_eval_benchmark"),
}


def run(argv: list[str]) -> int:
    if argv[:1] in (["-h"], ["--help"]):
        print(USAGE)
        return 0
    if not argv or argv[0] not in BENCHMARKS:
        print(USAGE, file=sys.stderr)
        return 2
    return run_benchmark(argv[0], argv[1:])


def run_benchmark(name: str, argv: list[str]) -> int:
    """Parse ``argv`` against the benchmark's signature (dashes in option names accepted) and run it; the
    distillation benchmark is handed the Lightning runner, which the library cannot import (commands sit above)."""
    module, function = BENCHMARKS[name]
    benchmark = getattr(importlib.import_module(f"ecgfm.bench.{module}"), function)
    description = (benchmark.__doc__ or "").split("\n\n")[0]
    parser = ArgumentParser(prog=f"ecgfm bench {name}", exit_on_error=False, description=description)
    parser.add_function_arguments(benchmark, skip={"console", "run"})
    cfg = {k: v for k, v in parser.parse_args(_underscored(argv)).as_dict().items() if k != "__path__"}
    if name == "data":
        cfg["workers"] = tuple(cfg["workers"])
    if name == "distillation":
        from ecgfm.commands.lightning import run_lightning

        benchmark(run_lightning, **cfg)
    else:
        benchmark(**cfg)
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
