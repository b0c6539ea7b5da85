"""torch.compile's on-disk caches must not replay a graph compiled for an older version of a custom op.

Inductor keys a custom op by name only (pytorch/pytorch#187319); `workers.kernels.compile_cache` folds a
fingerprint of the ops' source into the cache key tag. The end-to-end test compiles a graph that calls an
op, then changes the op's schema (an argument removed, as the one-pass GEMV prologue's flag was) and
compiles the same graph again in a new process over the same cache directory; a third process with the
op unchanged shows that the cache was in play (it hits).
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from workers.kernels.compile_cache import TAG_PREFIX, source_fingerprint, tag_compile_caches

REPO_ROOT = Path(__file__).resolve().parent.parent

OP_MODULE = '''
import torch


@torch.library.custom_op("omnitest::scale", mutates_args=())
def scale(x: torch.Tensor, factor: float = 2.0{extra}) -> torch.Tensor:
    return x * factor


@scale.register_fake
def _scale_fake(x: torch.Tensor, factor: float = 2.0{extra}) -> torch.Tensor:
    return torch.empty_like(x)
'''

# argv: the op module's folder. The graph passes no optional argument, so both op versions trace to the
# same FX graph; the compiled code names every argument of the op it was compiled for.
COMPILE_SCRIPT = '''
import sys
from pathlib import Path

import torch

from workers.kernels.compile_cache import source_fingerprint, tag_compile_caches

tag_compile_caches(source_fingerprint(Path(sys.argv[1])))
sys.path.insert(0, sys.argv[1])
from scale_op import scale

print(torch.compile(lambda x: scale(x) + 1.0, dynamic=False)(torch.ones(3)).tolist())
from torch._dynamo.utils import counters

print(counters["inductor"]["fxgraph_cache_hit"])
'''


def test_the_tag_reaches_every_thread_and_keeps_other_tags():
    import workers.kernels  # noqa: F401  (the import tags the caches)

    seen: list[str] = []  # a thread started afterwards, as the worker's model thread that compiles
    thread = threading.Thread(target=lambda: seen.append(torch.compiler.config.cache_key_tag))
    thread.start()
    thread.join()
    ours = TAG_PREFIX + source_fingerprint()
    assert ours in seen[0].split("+") and ours in torch.compiler.config.cache_key_tag.split("+")
    entry = torch.compiler.config._config["cache_key_tag"]
    saved = entry.env_value_default
    try:
        entry.env_value_default = "operator+omni-kernels-0123"  # as TORCH_COMPILE_CACHE_KEY_TAG=operator
        assert tag_compile_caches("abcd") == "operator+omni-kernels-abcd"
        assert tag_compile_caches("ef01") == "operator+omni-kernels-ef01"
    finally:
        entry.env_value_default = saved
        torch.compiler.config.cache_key_tag = saved


def test_the_fingerprint_follows_every_source_file(tmp_path):
    for name in ("a.py", "b.py"):
        (tmp_path / name).write_text(f"# {name}\n")
    (tmp_path / "notes.txt").write_text("not source")
    first = source_fingerprint(tmp_path)
    assert len(first) == 16 and source_fingerprint(tmp_path) == first
    (tmp_path / "notes.txt").write_text("changed, still not source")
    assert source_fingerprint(tmp_path) == first
    (tmp_path / "b.py").write_text("# b.py, edited\n")
    assert source_fingerprint(tmp_path) != first


@pytest.mark.slow
def test_a_changed_op_schema_compiles_afresh_over_a_kept_cache(tmp_path):
    op_dir, cache_dir = tmp_path / "op", tmp_path / "inductor_cache"
    op_dir.mkdir()
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(cache_dir), "PYTHONPATH": str(REPO_ROOT)}
    env.pop("TORCH_COMPILE_CACHE_KEY_TAG", None)
    cache_hits = []
    # version 1, then version 2 without the argument, then version 2 again
    for extra in (", unused: bool = False", "", ""):
        (op_dir / "scale_op.py").write_text(OP_MODULE.format(extra=extra))
        proc = subprocess.run([sys.executable, "-c", COMPILE_SCRIPT, str(op_dir)], cwd=REPO_ROOT, env=env,
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        output, hits = proc.stdout.split("\n")[-3:-1]
        assert output == "[3.0, 3.0, 3.0]"
        cache_hits.append(int(hits))
    assert cache_hits[1] == 0 and cache_hits[2] >= 1
