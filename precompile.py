"""Fill torch_compile_cache/ ahead of deployment: load -> compile -> warm-up once, then exit.

    python precompile.py [--config config.json] [--set model.preset=tiny ...]

Runs the same start phases as a worker (without its HTTP server) and records the cold compile time in
`<cache_dir>/precompile.json`, so the next worker start can report how long compiling took cold versus
with the warm cache. Exits 0 on success, 1 if a phase failed, 2 for a bad configuration.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time

import torch

from common.config import add_config_arguments, load_config_or_report
from workers import compile as compile_tools
from workers.worker import Worker


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_config_arguments(parser)
    parser.add_argument("--gpu-id", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = load_config_or_report(args.config, args.overrides, "precompile")
    if cfg is None:
        return 2
    worker = Worker(cfg, gpu_id=args.gpu_id)
    if not worker.compile_enabled:
        print(
            "precompile: compiling is off (service.compile is false or model.acceleration is eager)",
            file=sys.stderr,
        )
        return 2
    worker.start_blocking()
    if worker.state != "idle":
        print(f"precompile: failed in phase {worker.progress.phase}: {worker.error}", file=sys.stderr)
        return 1
    cache = worker.compile_cache
    compile_s = worker.phase_times_s["compiling"]
    record = compile_tools.read_precompile_record(worker.cache_dir) or {}
    # A cold run: nothing came from the cache, or (in a cache without a record) only what this same run had
    # just compiled, e.g. the second of two identical graphs. A run that loaded kernels is not recorded.
    if cache["verdict"] == "miss" or (cache["verdict"] == "partial" and "cold_compile_s" not in record):
        record["cold_compile_s"] = compile_s
    record["last_run"] = {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "compile_s": compile_s,
        "cache": cache,
        "phase_times_s": worker.phase_times_s,
        "engine": worker.engine.info,
        "torch": torch.__version__,
        "compile": cfg.compile.model_dump(),
        "warmup_tokens": worker.warmup["compile_pass"]["tokens"],
    }
    path = compile_tools.write_precompile_record(worker.cache_dir, record)
    print(
        json.dumps({"cache_dir": str(worker.cache_dir), "record": str(path), **record["last_run"]}, indent=2)
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
