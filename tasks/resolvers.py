"""Every config resolver ``rmoe-train``, ``rmoe-eval`` and the tests register before composing a config: the
run's (:func:`tasks.run.common.register_resolvers`: data folders, job names, W&B names) and each benchmark's
(DomainBed's sweep seed, :mod:`tasks.domainbed.seeds`). ``tasks.run`` knows no benchmark; this module knows both.
"""

from __future__ import annotations

from tasks.domainbed import seeds as domainbed_seeds
from tasks.run import common


def register_resolvers() -> None:
    common.register_resolvers()
    domainbed_seeds.register_resolvers()
