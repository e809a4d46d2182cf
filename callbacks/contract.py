"""The contract between the LightningModules / DataModules of ``tasks/`` and the callbacks of this package.

Each capability a callback needs from the module (or the datamodule) is a :class:`typing.Protocol` here. A callback
that needs one checks it once, in its ``setup``, with :func:`require` (the error names the callback, the class and
the missing members); an optional one is looked up once, at ``setup``, with ``isinstance`` (the protocols are
``runtime_checkable``), not by ``getattr`` at each call. ``callbacks/`` never imports ``tasks/``: the modules satisfy
these protocols structurally (``tasks.run.moe_module.MoEModule`` provides :class:`LambdaModule`).

=========================  ======================================  ===============================================
protocol                   members                                 used by
=========================  ======================================  ===============================================
:class:`LambdaModule`      ``set_lambda(value)``, ``lambda_aux``   ``callbacks.curriculum`` (required)
:class:`LambdaReader`      ``lambda_aux``                          ``callbacks.stability`` (optional: λ history)
:class:`RoutingProbe`      ``routing_probe(batch)``                ``callbacks.stability`` (optional: else the
                                                                   module's own forward on the probe batch)
:class:`TrainingForward`   ``training_forward(batch)``             ``callbacks.balancing`` (required for the
                                                                   global-batch pre-pass under accumulation)
:class:`DomainEvalModule`  ``last_eval``, ``lambda_aux``           ``callbacks.domainbed_results`` (required)
:class:`DomainEvalData`    ``eval_names``, ``environments``,       ``callbacks.stability`` (optional, on the
                           ``test_envs``                           datamodule: names the evaluation sets)
=========================  ======================================  ===============================================
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol, runtime_checkable


@runtime_checkable
class LambdaReader(Protocol):
    """The load-balancing weight λ the next loss uses, read back for the records."""

    @property
    def lambda_aux(self) -> float: ...


@runtime_checkable
class LambdaModule(LambdaReader, Protocol):
    """λ, set before every optimizer step (and read back)."""

    def set_lambda(self, value: float) -> None: ...


@runtime_checkable
class RoutingProbe(Protocol):
    """Forward the inputs of a (training or evaluation) batch, in eval mode, without a loss."""

    def routing_probe(self, batch: Any) -> None: ...


@runtime_checkable
class TrainingForward(Protocol):
    """The forward ``training_step`` runs on a batch (the routing pre-pass replays it per micro-batch)."""

    def training_forward(self, batch: Any) -> Any: ...


@runtime_checkable
class DomainEvalModule(LambdaReader, Protocol):
    """DomainBed's evaluation: ``last_eval`` = ``{env<i>_<split>_acc: accuracy}`` of the last evaluation, and λ."""

    last_eval: Mapping[str, float]


@runtime_checkable
class DomainEvalData(Protocol):
    """DomainBed's evaluation sets, on the datamodule: ``eval_names`` ``env<i>_<split>`` in loader order, the
    ``environments`` they index and the ``test_envs`` held out."""

    eval_names: Sequence[str]
    environments: Sequence[str]
    test_envs: Sequence[int]


def members(protocol: type) -> list[str]:
    """The members a protocol asks for (its methods, properties and annotated attributes, bases included)."""
    names: set[str] = set()
    for base in protocol.__mro__:
        if not getattr(base, "_is_protocol", False) or base is Protocol:
            continue
        names |= {n for n in (*vars(base).get("__annotations__", {}), *vars(base)) if not n.startswith("_")}
    return sorted(names)


def missing_members(obj: Any, protocol: type) -> list[str]:
    """The members of ``protocol`` that ``obj`` lacks (a method must be callable)."""
    out = []
    for name in members(protocol):
        declared = next((vars(b)[name] for b in protocol.__mro__ if name in vars(b)), None)
        if not hasattr(obj, name) or (callable(declared) and not callable(getattr(obj, name))):
            out.append(name)
    return out


def require(obj: Any, protocol: type, user: str, what: str = "LightningModule") -> None:
    """Raise ``TypeError`` unless ``obj`` provides every member of ``protocol``; the message names ``user`` (the
    callback), the class, the protocol and each missing member."""
    gone = missing_members(obj, protocol)
    if gone:
        raise TypeError(f"{user} needs the {what} to provide {protocol.__name__} (callbacks.contract): "
                        f"{type(obj).__name__} has no {', '.join(gone)}")
