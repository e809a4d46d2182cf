"""Every config resolver and config node ``rmoe-train``, ``rmoe-eval`` and the tests register before composing a
config: the run's resolvers (:func:`tasks.run.common.register_resolvers`: data folders, job names, W&B names), each
benchmark's (DomainBed's sweep seed, :mod:`tasks.domainbed.seeds`), and the ``moe`` group's base nodes with rmoe's
defaults (:mod:`tasks.run.moe_schema`) in Hydra's ConfigStore. ``tasks.run`` knows no benchmark; this module knows
both. It imports Hydra: ``rmoe-train`` imports it after ``--help`` and completion.
"""

from __future__ import annotations

from hydra.core.config_store import ConfigStore

from tasks.domainbed import seeds as domainbed_seeds
from tasks.run import common
from tasks.run.moe_schema import schema_nodes


def register_resolvers() -> None:
    common.register_resolvers()
    domainbed_seeds.register_resolvers()
    store = ConfigStore.instance()
    for group, name, node in schema_nodes():  # moe/_layer, moe/_fusion, moe/_options/<router>: rmoe's defaults
        store.store(group=group, name=name, node=node)
