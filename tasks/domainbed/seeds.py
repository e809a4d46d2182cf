"""DomainBed's seeds without torch: ``seed_hash`` and the ``${rmoe_seed_hash:...}`` config resolver.

``${rmoe_seed_hash:<dataset>,<algorithm>,<test_envs>,<hparams_seed>,<trial_seed>}`` -> DomainBed's training
seed of a sweep job, ``misc.seed_hash(dataset, algorithm, test_envs, hparams_seed, trial_seed)`` (md5 of ``str``
of that tuple, mod 2**31), with DomainBed's argument types: two strings, a list of ints, two ints
(``hparams_seed`` may be null). Registered by :func:`tasks.resolvers.register_resolvers`.
"""

from __future__ import annotations

import hashlib
from typing import Any

from omegaconf import OmegaConf


def seed_hash(*args: Any) -> int:
    """``int(md5(str(args)).hexdigest(), 16) % 2**31`` (DomainBed's ``misc.seed_hash``)."""
    return int(hashlib.md5(str(args).encode("utf-8")).hexdigest(), 16) % (2**31)


def sweep_seed(dataset: Any, algorithm: Any, test_envs: Any, hparams_seed: Any, trial_seed: Any) -> int:
    """The ``rmoe_seed_hash`` resolver: :func:`seed_hash` of a sweep job's arguments, typed as DomainBed's."""
    if isinstance(test_envs, (str, int)):  # a single test env given without brackets
        test_envs = [test_envs]
    envs = [int(e) for e in test_envs]
    hp = None if hparams_seed is None else int(hparams_seed)
    return seed_hash(str(dataset), str(algorithm), envs, hp, int(trial_seed))


def register_resolvers() -> None:
    if not OmegaConf.has_resolver("rmoe_seed_hash"):
        OmegaConf.register_new_resolver("rmoe_seed_hash", sweep_seed)
