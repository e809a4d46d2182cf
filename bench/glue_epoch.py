"""Training throughput of the study's GLUE jobs, before and after the performance work: tokens/s.

``python -m bench.glue_epoch [--task cola] [--moe rmoe] [--batches 0] [--threads 1]`` composes the study's
own job config (``sweeps/reproduce_glue.yaml``, the same files the study reads) once per variant,
instantiates its data and module, and runs training steps (forward, loss with λ = 0.01, backward, AdamW)
over the first ``--batches`` batches (0: all) of its first ``--epochs`` epochs (default: the study's
``trainer.max_epochs``) of every variant, interleaved
batch by batch so that load drift on a shared machine hits each variant alike. It prints, per
variant, the real (non-pad) tokens, the padded tokens, the training time and real tokens/s, and the
ratio of each variant's tokens/s to the first. Not a test: numbers measured side by side.

Variants (Hydra overrides on top of the study's config):

* ``random``: batches drawn in a seeded random order (the superseded study's loader);
* ``by_length``: ``data.group_by_length=true`` (batches of similar length: fewer pad tokens);
* ``by_length+cache``: also ``module.cache_frozen=true`` (the frozen layers' output computed once per
  example and reused from the second epoch on; the module runs under a trainer in its fitting state);
* ``+fused``: also torch's fused AdamW (what the modules' ``configure_optimizers`` now build on CPU) instead
  of torch's CPU default, the per-tensor loop: the study's setting. The first three use the per-tensor loop.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import hydra
import lightning as L
import torch
from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from lightning.pytorch.trainer.states import TrainerFn

from tasks.resolvers import register_resolvers

REPO = Path(__file__).resolve().parents[1]
VARIANTS = {  # name -> (Hydra overrides, fused AdamW)
    "random": (["data.group_by_length=false", "module.cache_frozen=false"], False),
    "by_length": (["data.group_by_length=true", "module.cache_frozen=false"], False),
    "by_length+cache": (["data.group_by_length=true", "module.cache_frozen=true"], False),
    "+fused": (["data.group_by_length=true", "module.cache_frozen=true"], True),
}


def compose(task: str, moe: str, overrides: list[str]):
    register_resolvers()  # the rmoe_* interpolations
    with initialize_config_dir(config_dir=str(REPO / "sweeps"), version_base=None):
        return hydra_compose("reproduce_glue", overrides=[f"hydra.searchpath=[file://{REPO / 'tasks' / 'conf'}]",
                                                          f"task=glue/{task}", f"moe={moe}", "seed=0", *overrides])


class Job:
    """One variant: its loader's epoch-0 batches, its module and optimizer."""

    def __init__(self, cfg, epochs: int, fused: bool) -> None:
        torch.manual_seed(0)
        self.dm = hydra.utils.instantiate(cfg.data, _convert_="all")
        self.dm.setup("fit")
        self.module = hydra.utils.instantiate(cfg.module, _convert_="all")
        self.module.set_lambda(0.01)
        trainer = L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                            enable_model_summary=False)
        trainer.state.fn = TrainerFn.FITTING  # the frozen-prefix cache works while fitting only
        self.module.trainer = trainer
        self.module.train()
        params = [p for p in self.module.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(params, lr=float(cfg.module.lr), **({"fused": True} if fused else {}))
        loader = self.dm.train_dataloader()
        self.batches = []
        for epoch in range(epochs):
            loader.sampler.set_epoch(epoch)
            self.batches += list(loader)
        self.seconds, self.real, self.padded, self.done = 0.0, 0, 0, 0

    def step(self, i: int) -> None:
        batch = self.batches[i]
        t0 = time.perf_counter()
        logits = self.module(batch)
        loss, _, _ = self.module.moe_loss(self.module.task_loss(logits, batch["labels"]), self.module.encoder)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        self.seconds += time.perf_counter() - t0
        mask = batch["attention_mask"]
        self.real += int(mask.sum())
        self.padded += mask.numel()
        self.done += 1


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--task", default="cola", choices=("cola", "mrpc", "rte"))
    ap.add_argument("--moe", default="rmoe", help="the moe config (dense, moe_topk, dynmoe, rmoe, lossfree)")
    ap.add_argument("--batches", type=int, default=0, help="batches per variant (0: all of --epochs)")
    ap.add_argument("--epochs", type=int, default=0, help="epochs (0: the study's trainer.max_epochs)")
    ap.add_argument("--rows", type=int, default=0, help="training rows (0: the study's; fewer = a shorter run)")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (the study's jobs use 1)")
    ap.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated, first = reference")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    names = a.variants.split(",")
    rows = [f"data.max_train_samples={a.rows}"] if a.rows else []
    cfgs = {n: compose(a.task, a.moe, VARIANTS[n][0] + rows) for n in names}
    epochs = a.epochs or int(cfgs[names[0]].trainer.max_epochs)
    jobs = {n: Job(cfg, epochs, VARIANTS[n][1]) for n, cfg in cfgs.items()}
    n = min(len(j.batches) for j in jobs.values())
    n = n if a.batches <= 0 else min(n, a.batches)
    for j in jobs.values():  # warm-up step (allocator, lazy init), not counted; the cache forgets it
        j.step(0)
        j.seconds, j.real, j.padded, j.done = 0.0, 0, 0, 0
        j.module._frozen_cache.clear()
    for i in range(n):
        for name in names[i % len(names):] + names[:i % len(names)]:
            jobs[name].step(i)
    ref = jobs[names[0]]
    print(f"GLUE {a.task}, moe={a.moe}, study config sweeps/reproduce_glue.yaml{' ' + rows[0] if rows else ''}, "
          f"{n} batches of {epochs} epoch(s) per variant, {a.threads} thread(s), torch {torch.__version__}")
    head = f"{'real tok':>9} {'padded tok':>11} {'train s':>8} {'real tok/s':>11}"
    print(f"  {'variant':<12} {head} {'x ' + names[0]:>10}")
    for name, j in jobs.items():
        rate = j.real / j.seconds
        print(f"  {name:<12} {j.real:>9} {j.padded:>11} {j.seconds:>8.1f} {rate:>11.0f} "
              f"{rate / (ref.real / ref.seconds):>10.2f}")


if __name__ == "__main__":
    main()
