"""``ecgfm distill-cache``: store a teacher checkpoint's outputs in the shards, so students read them, not run it."""

from __future__ import annotations

from jsonargparse import ArgumentParser


def run(argv: list[str]) -> int:
    from ecgfm.finetune.distillation import teacher_target
    from ecgfm.finetune.teacher_cache import cache_teacher_outputs

    parser = ArgumentParser(
        prog="ecgfm distill-cache",
        exit_on_error=False,
        description=cache_teacher_outputs.__doc__.split("\n\n")[0].strip(),
    )
    parser.add_function_arguments(cache_teacher_outputs)
    cfg = {k: v for k, v in parser.parse_args(argv).as_dict().items() if k != "__path__"}
    record = cache_teacher_outputs(**cfg)
    heads = ", ".join(teacher_target(head) for head in record["heads"])
    print(
        f"cached the outputs of {record['checkpoint']} (sha256 {record['sha256'][:12]}) as {heads} in {cfg['root']}",
        flush=True,
    )
    return 0
