"""Block hashes for prefix caching, pure code (the worker's cache and the front's index).

A full block's hash covers every token before it, as a chain (vLLM's scheme):

    seed  = sha256(model identity)                 anything else that changes the KV
    h[0]  = sha256(seed || tokens[0:bs])
    h[i]  = sha256(h[i-1] || tokens[i*bs:(i+1)*bs])

so two prompts share `h[i]` exactly when their first (i+1)*bs tokens are equal (up to a
sha256 collision). Only full blocks are hashed: a partial last block is never shared.
"""

from __future__ import annotations

import hashlib
from array import array


def hash_seed(model_identity: str) -> bytes:
    return hashlib.sha256(b"tetri-prefix-v1\0" + model_identity.encode()).digest()


def extend_block_hashes(hashes: list[bytes], token_ids: list[int], block_size: int, seed: bytes,
                        upto_tokens: int | None = None) -> list[bytes]:
    """Append to `hashes` the hashes of the full blocks among `token_ids[:upto_tokens]` that it
    does not hold yet (it holds the first len(hashes) blocks' hashes); returns `hashes`."""
    stop = len(token_ids) if upto_tokens is None else min(upto_tokens, len(token_ids))
    parent = hashes[-1] if hashes else seed
    for i in range(len(hashes), stop // block_size):
        h = hashlib.sha256(parent)
        h.update(array("q", token_ids[i * block_size:(i + 1) * block_size]).tobytes())
        parent = h.digest()
        hashes.append(parent)
    return hashes


def block_hashes(token_ids: list[int], block_size: int, seed: bytes) -> list[bytes]:
    return extend_block_hashes([], token_ids, block_size, seed)


def cacheable_blocks(num_tokens: int, block_size: int) -> int:
    """Most leading blocks of a `num_tokens` prefill that may come from the cache: at least
    one token is always computed (the step that samples needs its logits)."""
    return max(0, num_tokens - 1) // block_size
