"""Seeds mixed from several values, the same in every process, platform and release."""

from __future__ import annotations

import hashlib


def mixed_seed(*parts: int | str) -> int:
    """A seed in [0, 2**63) from `parts` (e.g. the config's seed, an epoch, a rank, a step).

    BLAKE2b of the parts joined by commas (Python's ``hash`` is not used: it is salted for strings
    and an implementation detail for tuples), so neighbouring parts give unrelated seeds, unlike a
    linear mix where rank r at step t would replay rank 0 at step t + c * r.
    """
    digest = hashlib.blake2b(",".join(str(int(p) if not isinstance(p, str) else p) for p in parts).encode(),
                             digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 1
