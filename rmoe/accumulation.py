"""The global-batch balance loss made exact under gradient accumulation: the routing pre-pass.

The ``global_batch`` loss (Qwen; :func:`rmoe.losses.global_batch_balance_loss`) takes ``f_e`` over the
whole global batch of an optimizer step. Under gradient accumulation a step is ``M`` micro-batches,
each run forward and backward before the next, so no micro-batch's forward knows the later ones'
counts. The routing pre-pass supplies them:

1. before the first micro-batch of a window, :func:`open_window` runs the training forward of every
   micro-batch of the window under ``torch.no_grad()`` (each forward's activations are freed when it
   returns: the memory of one forward) and records, for every MoE layer whose aux loss is
   ``global_batch``, each micro-batch's selection counts (all ``k`` per token) and token count;
2. it sums them over the window and all-reduces the sums over data-parallel ranks: ``C_e``, ``N``;
3. around real training forward ``j`` (:meth:`AccumulationWindow.begin` / :meth:`~AccumulationWindow.end`,
   or :meth:`~AccumulationWindow.micro_batch`) each such router holds a
   :class:`rmoe.losses.GlobalBatchWindow` with those counts and its loss is
   ``E Σ_e (C_e/(kN)) · (R·M/N) · Σ_{t∈(j,r)} p_te``. A trainer that divides each micro-batch's loss by the
   accumulation count ``A`` and sums the gradients, with DDP averaging them over the ``R`` ranks,
   gets the gradient of ``(M/A) · E Σ_e f_e P_e`` over the whole window: for a full window (``M = A``)
   exactly the gradient of one forward over the global batch.

The real forwards must route as the pre-pass did:

* random numbers: the torch CPU generator's state (and the CUDA generator's of the model's device)
  before pre-pass forward ``j`` is kept; ``begin(j)`` puts it in force for real forward ``j`` and
  ``end()`` puts the generators back as ``begin`` found them. The pre-pass forwards draw one
  contiguous stream from the state at the window's start, and the generators then continue from its
  end, so whatever else draws between micro-batches (data augmentation in the main process, a data
  loader's seed) gets numbers no forward of the window uses, while gate noise and dropout of every
  real forward are its pre-pass forward's;
* state: every buffer of the model (Stateful Fusion's ``m``, loss-free counts, adaptive-pool records,
  batch-norm statistics) moves during the pre-pass as it will in the real forwards — later layers see
  the inputs they will see — and is put back afterwards, as are the layers' ``last_routing`` and the
  routers' windows; train/eval modes are not touched;
* each real forward checks that it routes exactly the counts its pre-pass forward routed (per layer,
  on its rank) and raises otherwise: ``f_e`` is never silently another batch's.

Plain PyTorch loop (one process, ``A`` micro-batches ``xs`` of one step)::

    window = open_window(model, [functools.partial(model, x) for x in xs])
    for j, x in enumerate(xs):
        with window.micro_batch(j):
            (loss_fn(model(x)) / len(xs)).backward()
    optimizer.step()
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from .layer import MoELayer
from .losses import WINDOW_REQUIRED, GlobalBatchCounter, GlobalBatchWindow
from .surgery import find_moe_layers

RNGState = tuple[Tensor, "Tensor | None"]
"""``(torch CPU generator state, CUDA generator state of the model's device or None)``."""


def global_batch_layers(model: nn.Module) -> list[MoELayer]:
    """The MoE layers of ``model`` whose aux loss is ``global_batch`` with ``global_batch_mode=window`` (the
    routing pre-pass's layers; ``megatron`` needs none), in module order."""
    return [m for _, m in find_moe_layers(model) if getattr(m.router.aux_loss_fn, "name", None) == "global_batch"
            and not getattr(m.router, "megatron_global_batch", False)]


def megatron_global_batch_layers(model: nn.Module) -> list[MoELayer]:
    """The MoE layers of ``model`` with ``global_batch_mode=megatron`` (running counts reset after each step)."""
    return [m for _, m in find_moe_layers(model) if getattr(m.router, "megatron_global_batch", False)]


def rng_state(device: torch.device | None = None) -> RNGState:
    """The torch CPU generator's state and, for a CUDA ``device``, that device's generator state."""
    cuda = torch.cuda.get_rng_state(device) if device is not None and device.type == "cuda" else None
    return torch.get_rng_state(), cuda


def set_rng_state(state: RNGState, device: torch.device | None = None) -> None:
    """Put back a state from :func:`rng_state`."""
    cpu, cuda = state
    torch.set_rng_state(cpu)
    if cuda is not None and device is not None and device.type == "cuda":
        torch.cuda.set_rng_state(cuda, device)


def _device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _dist_world() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size()
    return 1


@torch.no_grad()
def routing_prepass(model: nn.Module, forwards: Sequence[Callable[[], Any]],
                    rng_states: Sequence[RNGState] | None = None,
                    device: torch.device | None = None) -> tuple[list[Tensor], list[RNGState]]:
    """Run ``forwards`` (each one micro-batch's training forward) without gradients and leave the
    model's state as it was.

    Returns, per ``global_batch`` layer, a ``[M, E + 1]`` float64 tensor: this rank's selection
    counts and token count of each micro-batch; and the generator states in force before each forward.
    ``rng_states`` None: the forwards draw one stream from the current state and the generators are
    left at its end; given: forward ``j`` starts from ``rng_states[j]`` and the generators are put back
    afterwards. Buffers, ``last_routing`` and the routers' windows are put back in every case.
    """
    device = device if device is not None else _device(model)
    layers = global_batch_layers(model)
    saved = [(b, b.detach().clone()) for b in model.buffers()]
    last = [(m, m.last_routing) for _, m in find_moe_layers(model)]
    windows = [m.router.global_batch_window for m in layers]
    before = rng_state(device)
    counters = [GlobalBatchCounter() for _ in layers]
    rows: list[list[Tensor]] = [[] for _ in layers]
    states: list[RNGState] = []
    try:
        for j, forward in enumerate(forwards):
            if rng_states is not None:
                set_rng_state(rng_states[j], device)
            states.append(rng_state(device))
            for m, c in zip(layers, counters):
                c.recorded.clear()
                m.router.global_batch_window = c
            forward()
            for i, (m, c) in enumerate(zip(layers, counters)):
                if len(c.recorded) > 1:
                    raise RuntimeError(f"global_batch accumulation: an MoE layer ran {len(c.recorded)} times in one "
                                       "training forward; the routing pre-pass supports one call per layer and forward")
                rows[i].append(c.recorded[0].to(device) if c.recorded else
                               torch.zeros(m.router.max_experts + 1, dtype=torch.float64, device=device))
    finally:
        for b, v in saved:
            b.copy_(v)
        for m, rec in last:
            m.last_routing = rec
        for m, w in zip(layers, windows):
            m.router.global_batch_window = w
        if rng_states is not None:
            set_rng_state(before, device)
    return [torch.stack(r) for r in rows], states


@dataclass
class AccumulationWindow:
    """One accumulation window: the global counts from its pre-pass, applied micro-batch by micro-batch.

    counts: per ``global_batch`` layer ``[E + 1]``: selection counts and tokens over all ``size``
    micro-batches and all ``world`` ranks. rng: the generator state of micro-batches ``first ..
    size - 1``; local: per layer ``[size - first, E + 1]``, this rank's pre-pass counts of those
    micro-batches (what each real forward must route). ``first > 0``: a window resumed between
    micro-batches (its earlier micro-batches ran before the checkpoint).
    """

    layers: list[MoELayer]
    counts: list[Tensor]
    size: int
    world: int
    rng: list[RNGState]
    local: list[Tensor]
    first: int = 0
    device: torch.device | None = None
    current: int | None = field(default=None, init=False)
    _outer: RNGState | None = field(default=None, init=False, repr=False)

    def begin(self, j: int) -> None:
        """Before real forward ``j``: its window on every ``global_batch`` router, its pre-pass forward's
        generator state in force (the current one kept for :meth:`end`)."""
        if self.current is not None:
            raise RuntimeError(f"accumulation window: micro-batch {self.current} was not ended before {j} began")
        if not self.first <= j < self.size:
            raise IndexError(f"micro-batch {j} is not in this window (micro-batches {self.first}..{self.size - 1})")
        self._outer = rng_state(self.device)
        set_rng_state(self.rng[j - self.first], self.device)
        for i, m in enumerate(self.layers):
            c = self.counts[i]
            e = c.numel() - 1
            m.router.global_batch_window = GlobalBatchWindow(
                counts=c[:e], total=float(c[e]), scale=float(self.world * self.size),
                expected=self.local[i][j - self.first])
        self.current = j

    def end(self, required: bool = True) -> None:
        """After real forward (and backward) ``j``: the generators back as :meth:`begin` found them; the
        routers' window :data:`rmoe.losses.WINDOW_REQUIRED` (``required``) or None."""
        for m in self.layers:
            m.router.global_batch_window = WINDOW_REQUIRED if required else None
        if self._outer is not None:
            set_rng_state(self._outer, self.device)
            self._outer = None
        self.current = None

    @contextlib.contextmanager
    def micro_batch(self, j: int, required: bool = False) -> Iterator[None]:
        """``begin(j)`` ... ``end(required)``."""
        self.begin(j)
        try:
            yield
        finally:
            self.end(required)


def open_window(model: nn.Module, forwards: Sequence[Callable[[], Any]], device: torch.device | None = None,
                reduce: bool = True) -> AccumulationWindow:
    """The routing pre-pass of a window whose micro-batches' training forwards are ``forwards`` (same
    number on every rank): their counts summed, then all-reduced over ranks (``reduce`` and a process
    group up)."""
    device = device if device is not None else _device(model)
    layers = global_batch_layers(model)
    local, states = routing_prepass(model, forwards, device=device)
    counts = [rows.sum(0) for rows in local]
    world = _dist_world() if reduce else 1
    if world > 1 and counts:
        flat = torch.cat(counts)
        torch.distributed.all_reduce(flat)
        counts = list(flat.split([c.numel() for c in counts]))
    return AccumulationWindow(layers, counts, len(forwards), world, states, local, 0, device)


def resume_window(model: nn.Module, forwards: Sequence[Callable[[], Any]], counts: Sequence[Tensor], size: int,
                  world: int, first: int, rng: Sequence[RNGState],
                  device: torch.device | None = None) -> AccumulationWindow:
    """A window resumed at micro-batch ``first`` from its saved global ``counts`` and the generator states
    ``rng`` of micro-batches ``first .. size - 1``; ``forwards`` are those micro-batches' training forwards
    (a pre-pass over them gives the counts each real forward is checked against)."""
    if len(forwards) != size - first or len(rng) != size - first:
        raise ValueError(f"resume_window: {len(forwards)} forwards and {len(rng)} generator states for micro-batches "
                         f"{first}..{size - 1}")
    device = device if device is not None else _device(model)
    layers = global_batch_layers(model)
    if len(counts) != len(layers):
        raise ValueError(f"resume_window: counts of {len(counts)} layers for a model with {len(layers)} global_batch "
                         "layers")
    local, _ = routing_prepass(model, forwards, rng_states=rng, device=device)
    return AccumulationWindow(layers, [c.to(device=device, dtype=torch.float64) for c in counts], size, world,
                              list(rng), local, first, device)
