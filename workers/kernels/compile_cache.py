"""The custom ops' share of torch.compile's cache keys.

Inductor's FX-graph cache and AOTAutograd's cache name a custom op in their keys but hash neither its
schema nor its fake implementation (pytorch/pytorch#187319). A compile cache kept across an upgrade that
changed an `omni::*` op (an argument removed, a fake's output changed) would then hand the new code a
graph compiled for the old op: the worker fails at warm-up ("omni::gemv() expected at most 5 argument(s)
but received 6"), or runs with stale shapes. Importing `workers.kernels` therefore adds a fingerprint of
this package's source to `torch.compiler.config.cache_key_tag`, which those keys include: any change to
the package means one cold compile, never a stale graph.
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
    """Put `omni-kernels-<fingerprint>` into torch.compile's cache key tag, in place of an earlier one of
    ours and beside any other (an operator's TORCH_COMPILE_CACHE_KEY_TAG); returns the whole tag."""
    config = torch.compiler.config
    others = [part for part in config.cache_key_tag.split("+") if part and not part.startswith(TAG_PREFIX)]
    config.cache_key_tag = "+".join([*others, TAG_PREFIX + fingerprint])
    return config.cache_key_tag
