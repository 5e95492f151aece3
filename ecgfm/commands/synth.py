"""``ecgfm synth``: synthetic 12-lead shards whose potassium and lab values are known, for tests and benchmarks."""

from __future__ import annotations

from jsonargparse import ActionConfigFile, ArgumentParser


def run(argv: list[str]) -> int:
    from ecgfm.data.synthetic import write_synthetic_shards

    parser = ArgumentParser(prog="ecgfm synth", exit_on_error=False, description=write_synthetic_shards.__doc__)
    parser.add_argument("--config", action=ActionConfigFile)
    parser.add_function_arguments(write_synthetic_shards)
    cfg = {k: v for k, v in parser.parse_args(argv).as_dict().items() if k not in ("config", "__path__")}
    manifest = write_synthetic_shards(**cfg)
    print(f"wrote {manifest.n_segments} synthetic segments in {len(manifest.shards)} shards to {cfg['out']}")
    return 0
