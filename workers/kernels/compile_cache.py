"""The custom ops' share of torch.compile's cache keys.

Inductor's FX-graph cache and AOTAutograd's cache name a custom op in their keys but hash neither its
schema nor its fake implementation (pytorch/pytorch#187319). A compile cache kept across an upgrade that
changed an `omni::*` op (an argument removed, a fake's output changed) would then hand the new code a
graph compiled for the old op: the worker fails at warm-up ("omni::gemv() expected at most 5 argument(s)
but received 6"), or runs with stale shapes. Importing `workers.kernels` therefore adds a fingerprint of
this package's source to `torch.compiler.config.cache_key_tag`, which those keys include: any change to
the package means one cold compile of every graph (the tag is process-wide), never a stale graph.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch

PACKAGE_DIR = Path(__file__).resolve().parent
TAG_PREFIX = "omni-kernels-"


def source_fingerprint(directory: Path = PACKAGE_DIR) -> str:
    """16 hex digits of a sha256 over the names and contents of the `.py` files in `directory`."""
    digest = hashlib.sha256()
    for path in sorted(directory.glob("*.py")):
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def tag_compile_caches(fingerprint: str) -> str:
    """Put `omni-kernels-<fingerprint>` into torch.compile's cache key tag for every thread of the process,
    in place of an earlier one of ours and beside any other (an operator's TORCH_COMPILE_CACHE_KEY_TAG);
    returns the whole tag.

    An assignment to a torch config value is an override of the assigning thread only (torch 2.13), and
    the worker compiles on its model thread, so the tag goes into the value every thread falls back to:
    the one torch read from the environment variable at import (a private field of torch's config entry).
    """
    config = torch.compiler.config
    entry = config._config["cache_key_tag"]
    inherited = entry.env_value_default if isinstance(entry.env_value_default, str) else entry.default
    others = [part for part in inherited.split("+") if part and not part.startswith(TAG_PREFIX)]
    entry.env_value_default = "+".join([*others, TAG_PREFIX + fingerprint])
    config.cache_key_tag = entry.env_value_default  # this thread: also marks its cached config hash stale
    return entry.env_value_default
