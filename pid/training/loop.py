"""The training loop shared by every distillation method.

One optimizer step, in order (see `Trainer.train_step`):
  1. for each accumulation round r of this process: seed the micro-batch generator from (seed, step, slot),
     run `method.loss` under autocast, backward `sum(loss_i) / global_batch` (scaled by the GradScaler for fp16);
     with several processes the rounds before the last run under DDP's `no_sync()`, and the last round's
     backward sums the gradients over processes bucket by bucket as they become ready (distributed.py);
  2. sum logged scalars over processes (and the gradients, with `grad_sync='manual'`);
  3. unscale, measure the global gradient norm; if the loss or the norm is not finite, skip the step (weights,
     optimizer state and EMAs untouched; fp16's loss scale is lowered);
  4. otherwise clip, step the optimizer, update the loss scale and the EMAs.

Reduction differs from the reference on purpose: the reference backpropagates the *mean* of each micro-batch
and lets the gradients add up over micro-batches (then DDP averages over GPUs), so its gradient scale depends
on how the batch is split. Here the optimized loss is always the mean over the global batch, so one process
with accumulation, or N processes, give the same step.

Randomness: micro-batch `slot = rank * rounds + r` draws from a generator seeded by hash(seed, step, slot).
That makes every step a pure function of the weights and the step number, so a resumed run repeats the
uninterrupted one exactly, and N processes reproduce one process that accumulates N rounds.

Several networks: a method may train more than one network (moment matching: generator and auxiliary
denoiser). The trainer then receives `{name: module}`; each network has its own optimizer and GradScaler, EMAs
are kept for the networks the method names in `ema_networks`, and `method.phase(step)` names the one network
that step `step` updates. The network named `method.export` is the one sampled, evaluated and exported.
"""

import contextlib
import copy
import dataclasses
import hashlib
import os
import signal
import time
from typing import Callable, Dict, Optional, Union

import torch

from pid.errors import CheckpointError
from pid.training import checkpoint as ckpt
from pid.training import distributed as D
from pid.training import fast
from pid.training.config import TrainConfig
from pid.training.ema import EMAs
from pid.training.method import Method
from pid.training.optim import lr_at, make_optimizer, set_lr
from pid.training.runlog import RunLogger
from pid.training.samples import write_sample_grid
from pid.training.state import capture_rng, restore_rng, seed_process

__all__ = ["Trainer", "step_seed", "MicroBatch"]

_AMP_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


def step_seed(seed: int, step: int, slot: int) -> int:
    """63-bit seed of micro-batch `slot` at optimizer step `step` (independent streams per step and slot)."""
    digest = hashlib.sha256(f"pid-train/{seed}/{step}/{slot}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


@dataclasses.dataclass(frozen=True)
class MicroBatch:
    """What a several-network method's `loss` learns about the micro-batch it computes.

    step: optimizer step (0-based); phase: the network this step updates; slot: rank * rounds + round;
    position: index of the micro-batch's first sample in the run's global sample order (step * batch +
    slot * micro), so that data order is a pure function of the step: N processes = 1 process, exact resume.
    """
    step: int
    phase: str
    slot: int
    position: int


class Trainer:
    """Owns the networks' weights, optimizers, scalers, EMAs and the run directory's files."""

    def __init__(self, config: TrainConfig, method: Method, student: Union[torch.nn.Module, Dict[str, torch.nn.Module]],
                 dist: D.DistInfo, run_dir: str, run_config: dict,
                 evaluate: Optional[Callable[[torch.nn.Module], dict]] = None):
        self.config, self.method, self.dist = config, method, dist
        self.run_dir, self.run_config, self.evaluate = run_dir, run_config, evaluate
        self.device = dist.device
        self.multi = isinstance(student, dict)
        self.nets = {k: v.to(self.device).train() for k, v in (student if self.multi else {"student": student}).items()}
        self.export_name = getattr(method, "export", None) or next(iter(self.nets))
        self.student = self.nets[self.export_name]     # the network that is sampled, evaluated and exported
        if hasattr(method, "to"):
            method.to(self.device)
        fast.prepare_networks(self.nets, method, config)   # before the gradients exist: they follow the layout
        self.params, self.optimizers, self.scalers, self.train_nets, self.ddp = {}, {}, {}, {}, {}
        ddp = config.grad_sync == "ddp" and dist.distributed
        for name, net in self.nets.items():
            if not ddp:
                D.broadcast_params_(net)   # DDP's constructor does this itself
            self.params[name] = [p for p in net.parameters() if p.requires_grad]
            # Gradients exist for every parameter from the start, so that all processes all-reduce the same
            # tensors even when a method leaves some parameter unused in a micro-batch.
            for p in self.params[name]:
                p.grad = torch.zeros_like(p)
            # What the method calls: the network, wrapped by DDP, compiled (on top of DDP, so that dynamo splits
            # the graph at bucket boundaries); checkpoints, EMAs and grids use the bare `self.nets`.
            self.ddp[name] = D.wrap_ddp(net, dist) if ddp else None
            call = self.ddp[name] if ddp else net
            self.train_nets[name] = fast.compiled(call) if config.compile else call
            self.optimizers[name] = make_optimizer(self.params[name], config)
            self.scalers[name] = torch.amp.GradScaler(self.device.type, enabled=config.precision == "fp16")
        if config.compile:
            for module in fast.frozen_modules(method):
                module.compile(**fast.COMPILE_OPTIONS)   # in place: the method holds it
        ema_names = getattr(method, "ema_networks", None) or (self.export_name,)
        self.ema_sets = {n: EMAs(self.nets[n], config.ema) for n in ema_names} if dist.is_main else {}
        self.emas = self.ema_sets.get(self.export_name)
        self.generator = torch.Generator(device=self.device)
        seed_process(config.seed, dist.rank)
        self.step, self.nan_skipped, self.best = 0, 0, None
        self._signal_received = False   # set by the handler in this process
        self.stop_requested = False     # agreed by all processes (any one received a signal)
        self._eval_module: Optional[torch.nn.Module] = None
        self.log: Optional[RunLogger] = None

    # ----------------------------------------------------------------------------------------- one step
    def phase(self) -> str:
        """The network this step updates (the only one for single-network methods)."""
        return self.method.phase(self.step) if self.multi else self.export_name

    def _forward_backward(self, round_index: int, rounds: int, micro: int, phase: str) -> tuple:
        slot = self.dist.rank * rounds + round_index
        self.generator.manual_seed(step_seed(self.config.seed, self.step, slot))
        amp = self.config.precision in _AMP_DTYPES
        with contextlib.ExitStack() as no_sync:
            # DDP all-reduces in the backward of the last round only, and only the phase's network.
            for name, ddp in self.ddp.items():
                if ddp is not None and (name != phase or round_index < rounds - 1):
                    no_sync.enter_context(ddp.no_sync())
            with torch.autocast(self.device.type, dtype=_AMP_DTYPES.get(self.config.precision), enabled=amp):
                if self.multi:
                    ctx = MicroBatch(self.step, phase, slot, self.step * self.config.batch + slot * micro)
                    losses, stats = self.method.loss(self.train_nets, micro, self.generator, self.device, ctx)
                else:
                    losses, stats = self.method.loss(self.train_nets[self.export_name], micro, self.generator,
                                                     self.device)
            losses = losses.float()
            self.scalers[phase].scale(losses.sum() / self.config.batch).backward()
        return losses.detach().sum(), stats

    def train_step(self) -> dict:
        """One optimizer step over the global batch; returns this step's logged scalars."""
        cfg, world = self.config, self.dist.world_size
        rounds, micro = cfg.accum_rounds(world), cfg.micro_batch(world)
        phase = self.phase()
        optimizer, scaler, params = self.optimizers[phase], self.scalers[phase], self.params[phase]
        lr = lr_at(self.step, cfg) * (self.method.lr_scale(phase) if hasattr(self.method, "lr_scale") else 1.0)
        set_lr(optimizer, lr)
        optimizer.zero_grad(set_to_none=False)
        loss_sum = torch.zeros((), device=self.device)
        stat_sums: Dict[str, torch.Tensor] = {}
        for r in range(rounds):
            loss, stats = self._forward_backward(r, rounds, micro, phase)
            loss_sum += loss
            for k, v in stats.items():  # summed on the device: no sync inside the accumulation loop
                v = torch.as_tensor(v, device=self.device).detach().float()
                stat_sums[k] = stat_sums[k] + v if k in stat_sums else v
        if self.ddp[phase] is None:
            D.all_reduce_grads_(params)   # --grad-sync=manual (a no-op in one process)
        keys = sorted(stat_sums)
        local = [loss_sum, torch.tensor(float(self._signal_received), device=self.device)]
        local += [stat_sums[k] for k in keys]
        totals = D.all_reduce_sum_(torch.stack([t.float() for t in local])).tolist()
        self.stop_requested = totals[1] > 0
        record = {"loss": totals[0] / cfg.batch, "lr": lr}
        record.update({k: v / (rounds * world) for k, v in zip(keys, totals[2:])})
        scaler.unscale_(optimizer)
        grad_norm = torch.nn.utils.get_total_norm([p.grad for p in params])
        record["grad_norm"] = float(grad_norm)
        record["skipped"] = not (torch.isfinite(grad_norm) and torch.isfinite(torch.tensor(totals[0])))
        self._apply(record["skipped"], grad_norm, phase)
        if scaler.is_enabled():
            record["loss_scale"] = float(scaler.get_scale())
        if self.multi:
            record["phase"] = phase
        self.step += 1
        record["nan_skipped_total"] = self.nan_skipped
        return record

    def _apply(self, skip: bool, grad_norm: torch.Tensor, phase: str) -> None:
        optimizer, scaler = self.optimizers[phase], self.scalers[phase]
        if skip:
            self.nan_skipped += 1
            if scaler.is_enabled():
                scaler.update()  # unscale_ recorded the inf: the scale is lowered, nothing is stepped
            optimizer.zero_grad(set_to_none=False)
            return
        if self.config.grad_clip is not None:
            torch.nn.utils.clip_grads_with_norm_(self.params[phase], self.config.grad_clip, grad_norm)
        scaler.step(optimizer)
        scaler.update()
        if phase in self.ema_sets:
            self.ema_sets[phase].update(self.nets[phase])

    # ------------------------------------------------------------------------------------ state & files
    def training_state(self) -> dict:
        """Everything an exact resume needs (called on every process: RNG states are gathered).

        A single network keeps the flat layout (`student`, `emas`, `optimizer`, `scaler`); several networks are
        stored per name (`networks`, `ema_sets`, `optimizers`, `scalers`). A method with state adds `method`.
        """
        rng = D.gather_objects(capture_rng(self.device))
        state = {"step": self.step, "rng": rng, "world_size": self.dist.world_size, "config": self.run_config,
                 "nan_skipped": self.nan_skipped, "best": self.best}
        if self.multi:
            state.update(networks={k: v.state_dict() for k, v in self.nets.items()},
                         ema_sets={k: v.state_dict() for k, v in self.ema_sets.items()},
                         optimizers={k: v.state_dict() for k, v in self.optimizers.items()},
                         scalers={k: v.state_dict() for k, v in self.scalers.items()})
        else:
            state.update(student=self.student.state_dict(), emas=self.emas.state_dict() if self.emas else {},
                         optimizer=self.optimizers[self.export_name].state_dict(),
                         scaler=self.scalers[self.export_name].state_dict())
        if hasattr(self.method, "state_dict"):
            state["method"] = self.method.state_dict()
        return state

    def load_training_state(self, state: dict) -> None:
        """Restore a state written by `training_state` (same configuration checked by the caller)."""
        if self.multi:
            nets, emas = state["networks"], state["ema_sets"]
            optims, scalers = state["optimizers"], state["scalers"]
        else:
            name = self.export_name
            nets, emas = {name: state["student"]}, {name: state["emas"]}
            optims, scalers = {name: state["optimizer"]}, {name: state.get("scaler")}
        for name, net in self.nets.items():
            net.load_state_dict(nets[name])
            self.optimizers[name].load_state_dict(optims[name])
            if self.scalers[name].is_enabled() and scalers.get(name):
                self.scalers[name].load_state_dict(scalers[name])
        for name, ema in self.ema_sets.items():
            ema.load_state_dict(emas[name])
        if hasattr(self.method, "load_state_dict") and "method" in state:
            self.method.load_state_dict(state["method"])
        if state.get("world_size") == self.dist.world_size:
            restore_rng(state["rng"][self.dist.rank], self.device)
        self.step, self.nan_skipped, self.best = state["step"], state.get("nan_skipped", 0), state.get("best")

    def weights_for_export(self) -> Dict[str, Dict[str, torch.Tensor]]:
        """{name: state_dict} written to student checkpoints: all EMAs, or the raw weights when there are none."""
        if self.emas is not None and self.emas.states:
            return self.emas.state_dict()
        return {"raw": self.student.state_dict()}

    def export_student(self, path: str, extra: Optional[dict] = None) -> None:
        """Write a student checkpoint (main process only): the default weights, or every EMA with snap_emas='all'."""
        spec = self.student.export_spec() if hasattr(self.student, "export_spec") else {
            "class": type(self.student).__name__}
        weights = self.weights_for_export()
        default = self.config.default_ema_name() if self.config.default_ema_name() in weights else "raw"
        if default not in weights:
            weights = {**weights, "raw": self.student.state_dict()}
        if self.config.snap_emas == "default":   # each EMA is a full copy of the network: write one
            weights = {default: weights[default]}
        ckpt.write_student_checkpoint(path, spec, weights, default, self.step,
                                      {"method": self.method.name, "run_config": self.run_config, **(extra or {})})

    def save_snapshot(self) -> None:
        """student-<step>.pt and training-state-<step>.pt, then prune old states (collective call)."""
        state = self.training_state()
        if self.dist.is_main:
            self.log.flush_tracking()   # the events up to this step exist before the state that resumes from it
            try:
                self.export_student(ckpt.student_path(self.run_dir, self.step))
                ckpt.write_training_state(ckpt.state_path(self.run_dir, self.step), state)
            except CheckpointError as exc:  # disk full: earlier states are intact; log it, then stop the run
                self.log.error(f"snapshot at step {self.step} failed, stopping: {exc}")
                raise
            self._prune_states()
            self._prune_students()
            self.log.info(f"saved student-{self.step:07d}.pt and training-state-{self.step:07d}.pt")
        D.barrier()

    def _prune_states(self) -> None:
        keep = self.config.keep_states
        if keep:
            for _, path in list(ckpt.list_states(self.run_dir).items())[:-keep]:
                os.remove(path)

    def _prune_students(self) -> None:
        keep = self.config.keep_students
        if keep:
            for _, path in list(ckpt.list_students(self.run_dir).items())[:-keep]:
                os.remove(path)

    def default_student(self, shared: bool = False) -> torch.nn.Module:
        """A copy of the student holding the default (EMA) weights, in eval mode.

        EMAs live on the main process; `shared=True` (a collective call) broadcasts the weights so that every
        process holds them (evaluation is split across processes)."""
        if self._eval_module is None:
            self._eval_module = copy.deepcopy(self.student).eval().requires_grad_(False)
            for p in self._eval_module.parameters():
                p.grad = None   # deepcopy copied the training gradients; the copy never needs them
        if self.dist.is_main:
            name = self.config.default_ema_name()
            weights = self.weights_for_export().get(name, self.student.state_dict())
            self._eval_module.load_state_dict(weights)
        if shared:
            D.broadcast_params_(self._eval_module)
        return self._eval_module

    # -------------------------------------------------------------------------------- grids & evaluation
    def write_grid(self) -> None:
        """samples-<step>.png from the default weights on fixed seeds (main process only)."""
        if self.config.grid_seeds and hasattr(self.student, "generate"):
            path = os.path.join(self.run_dir, f"samples-{self.step:07d}.png")
            chunk = self.config.micro_batch(self.dist.world_size)
            write_sample_grid(self.default_student(), path, self.config.grid_seeds, chunk, self.device)
            self.log.image(path, self.step)

    def run_evaluation(self) -> None:
        """Call the evaluator on the default weights on every process (a distributed evaluator splits the seeds
        across them and returns the same metrics everywhere); the main process appends metrics.jsonl and keeps
        student-best.pt."""
        result = self.evaluate(self.default_student(shared=True))
        metrics, primary, mode = result["metrics"], result.get("primary"), result.get("mode", "min")
        self.log.metrics(self.step, metrics)   # main process only (the others' logger is disabled)
        self.log.info("eval " + " ".join(f"{k} {v:.5g}" for k, v in metrics.items()
                                          if isinstance(v, (int, float))))
        if primary in metrics:
            value = float(D.broadcast_object(float(metrics[primary])))   # one decision for every process
            better = self.best is None or (value < self.best["value"] if mode == "min" else value > self.best["value"])
            if better:
                self.best = {"step": self.step, "metric": primary, "value": value, "mode": mode}
                if self.dist.is_main:
                    self.export_student(os.path.join(self.run_dir, "student-best.pt"), {"best": self.best})
                self.log.info(f"new best {primary} {value:.5g}: student-best.pt")

    def write_report(self) -> None:
        """report.png: the curves so far and the newest grid (main process). A plot that cannot be drawn or
        written (say a full disk) is a warning in log.txt: it never stops a training run."""
        from pid.training.tracking import write_run_report
        try:
            write_run_report(self.run_dir)
        except Exception as exc:
            self.log.info(f"warning: report.png not written at step {self.step}: {type(exc).__name__}: {exc}")

    # ------------------------------------------------------------------------------------------ the loop
    def _due(self, every: int) -> bool:
        return bool(every) and (self.step % every == 0 or self.step == self.config.steps)

    def run(self, fresh: bool) -> str:
        """Train until `config.steps` or a SIGINT/SIGTERM; returns the run directory."""
        cfg = self.config
        self.log = RunLogger(self.run_dir, cfg.steps, self.step, cfg.log_every, enabled=self.dist.is_main,
                             tensorboard=cfg.tensorboard)
        self.log.info(f"{'starting' if fresh else 'resuming'} at step {self.step} of {cfg.steps}: "
                      f"{self.dist.world_size} process(es) on {self.device}, global batch {cfg.batch} = "
                      f"{cfg.micro_batch(self.dist.world_size)} x {cfg.accum_rounds(self.dist.world_size)} "
                      f"rounds x {self.dist.world_size}, precision {cfg.precision}")
        prepare = getattr(self.method, "prepare", None)
        if prepare is not None:   # e.g. moment matching's --data=teacher generates its samples (all processes)
            prepare(self.run_dir, self.dist, self.log)
        if fresh and self.dist.is_main and cfg.grid_every:
            self.write_grid()
        old = _install_signal_handlers(self._on_signal)
        try:
            while self.step < cfg.steps and not self.stop_requested:
                self._one_iteration()
        finally:
            _restore_signal_handlers(old)
            self.log.close()
        return self.run_dir

    def _one_iteration(self) -> None:
        t0 = time.time()
        record = self.train_step()
        self.log.step(self.step, record, self.config.batch, time.time() - t0)
        if record["skipped"]:
            self.log.info(f"step {self.step - 1}: non-finite loss or gradient; step skipped "
                          f"(weights, optimizer and EMAs unchanged; {self.nan_skipped} skipped so far)")
        snapshot = self._due(self.config.snap) or self.stop_requested or self.step == self.config.steps
        if snapshot:
            self.save_snapshot()
        if self.dist.is_main and self._due(self.config.grid_every):
            self.write_grid()
        evaluation = self.evaluate is not None and self._due(self.config.eval_every)
        if evaluation:
            self.run_evaluation()
        if (snapshot or evaluation) and self.dist.is_main and self.config.plot:
            self.write_report()
        if self.stop_requested:
            self.log.info(f"stopped by signal at step {self.step}; continue with --resume=auto "
                          f"(or --resume={self.run_dir})")

    def _on_signal(self, signum, frame) -> None:
        # Only a flag: the processes agree on stopping at the next step's all-reduce, then save and leave.
        # A second signal means "now": give up on saving (e.g. a step that hangs).
        if self._signal_received:
            raise KeyboardInterrupt
        self._signal_received = True


def _install_signal_handlers(handler) -> dict:
    old = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            old[sig] = signal.signal(sig, handler)
        except ValueError:  # not the main thread: signals stay with the caller
            pass
    return old


def _restore_signal_handlers(old: dict) -> None:
    for sig, handler in old.items():
        signal.signal(sig, handler)
