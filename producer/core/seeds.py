"""Seeds: the job seed, and the per-image seed derived from it.

Image i of a job is sampled from ``image_seed(job_seed, i)`` alone, so it is the same image on a rerun whatever
batch or shard it rides in. Clients can recompute any image's seed from the manifest's job seed.
"""

from __future__ import annotations

import hashlib
import secrets

# Seeds chosen for callers stay below 2**31 so they survive any JSON client (JavaScript numbers included).
_CHOSEN_SEED_BOUND = 2**31


def new_job_seed() -> int:
    """A fresh random job seed, recorded in the job so the run can be repeated."""
    return secrets.randbelow(_CHOSEN_SEED_BOUND)


def image_seed(job_seed: int, index: int) -> int:
    """The seed of output ``index`` of a job: 63 bits of BLAKE2b over (job seed, index)."""
    if index < 0:
        raise ValueError(f"image index must be >= 0, got {index}")
    digest = hashlib.blake2b(f"genq:{job_seed}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 1
