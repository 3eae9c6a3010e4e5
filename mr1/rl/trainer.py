"""The RL loop (GRPO or PPO) shared by ``experiments/{grpo,ppo}_{answer,memory}.py``.

One step (DESIGN.md §2; docs/training.md "One GRPO step"): ``P`` training prompts (a seeded
permutation per epoch, so the data position is a function of the step) → ``G`` samples each at
temperature 1 from the jitted sampler (one shared prefill per prompt) → texts and rewards from
the task on the host (:class:`RLTask`: the Answer Agent's parsed answer line,
:class:`mr1.rl.answer_task.AnswerTask`; or the frozen Answer Agent's answers after the Memory
Manager's op, :class:`mr1.rl.memory_task.ManagerTask`) → the train step of
:func:`mr1.rl.runner.make_train_step`, one jitted, sharded program over the
:class:`~mr1.rl.runner.RunnerState` (advantages by registered estimator, reference log-probs,
``optim.epochs x optim.minibatches`` optimizer steps) → metrics (CSV + TensorBoard), the task's
validation every ``eval_every`` steps, an orbax checkpoint every ``checkpoint_every`` steps and
at exit (SIGTERM included). Restarting with the same ``--workdir`` resumes from the latest
checkpoint (:meth:`Trainer.resume`) and reproduces the uninterrupted run: the rollout key is
``fold_in(seed, step)``, the mini-batch shuffle key ``fold_in(state.rng, step)``.

Rollouts run on every process over the whole batch (a local copy of the params); the update is
data-parallel over the mesh. Rewards and metrics are host-side numpy.

``config.lora.rank > 0`` trains LoRA adapters (:mod:`mr1.models.lora`) on a frozen base instead
of every weight: the state (and so every checkpoint) holds ``{"lora": ...}`` and its optimizer
state only; the base lives in the runner state, and rollouts / validation sample from the base
with the adapters merged in (once per step, on device).
:func:`mr1.models.trained.load_trained_params` reads either kind of checkpoint back as full
policy params.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import pathlib
import time
from typing import Any, Callable, Protocol

import jax
import numpy as np

from mr1 import parallel
from mr1 import run_identity as RI
from mr1.fileio import write_json_atomic
# model and checkpoint loading live in mr1.models.trained; these names stay importable here
from mr1.models.trained import (  # noqa: F401
    load_policy_from_config,
    load_trained_params,
    lora_rank,
    run_config,
)
from mr1.rl.answer_task import ANSWER_PANELS
from mr1.rl.runner import make_train_step
from mr1.sampling import SamplingConfig

__all__ = ["train", "batch_indices", "Trainer", "RLTask", "build_then_train", "prepare_workdir"]


def batch_indices(step: int, batch: int, n: int, seed: int) -> np.ndarray:
    """Question indices of ``step``: consecutive slices of per-epoch seeded permutations."""
    out = np.empty(batch, np.int64)
    for k in range(batch):
        epoch, i = divmod(step * batch + k, n)
        out[k] = _permutation(seed, epoch, n)[i]
    return out


@functools.lru_cache(maxsize=8)
def _permutation(seed: int, epoch: int, n: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(n)


to_host = parallel.to_host  # (kept importable from here)


@dataclasses.dataclass
class Trainer:
    """One run: the task, the train step (:func:`mr1.rl.runner.make_train_step`) and its
    :class:`~mr1.rl.runner.RunnerState`; :meth:`run` is the loop."""

    config: Any
    workdir: pathlib.Path
    policy: Any
    task: "RLTask"
    log: Callable[[str], None] = print

    def __post_init__(self):
        c = self.config
        self.algo = c.algo
        self.G = c.rollout.group_size
        self.P = c.rollout.prompts_per_step
        self.step_fn = make_train_step(c, self.policy.config, log=self.log,
                                       layout=getattr(self.task, "step_layout", None))
        self.mesh = self.step_fn.mesh
        self.runner = self.step_fn.init(self.policy)
        allowed = tuple(getattr(self.task, "allowed_tokens", ()))  # constrained choices
        # parallel.shard_rollouts: the sampler runs on the mesh (rows over the batch axes, the
        # params as the state holds them); else on each process's local copy of the params
        self.shard_rollouts = bool(c.parallel.get("shard_rollouts", False))
        mesh = self.mesh if self.shard_rollouts else None
        self.rollout_cfg = SamplingConfig(max_new_tokens=self.task.max_new_tokens,
                                          temperature=c.rollout.temperature,
                                          num_samples=self.G, allowed_tokens=allowed, mesh=mesh,
                                          prompts_per_call=c.rollout.get("prompts_per_call", 0))
        self.greedy_cfg = SamplingConfig(max_new_tokens=self.task.max_new_tokens,
                                         allowed_tokens=allowed, mesh=mesh)
        self.nan_steps = set(c.debug.nan_reward_steps)

    @property
    def state(self):
        """The trainable state (params, optimizer state, step, rng): what checkpoints hold."""
        return self.runner.train

    def policy_params(self):
        """The current policy params (device arrays, the state's sharding): LoRA merged into
        the base once here, for the sampler."""
        return self.step_fn.policy_params(self.runner)

    def sampler_params(self):
        """The params rollouts and validation sample with: the sharded state's (sharded
        rollouts) or a local single-device copy."""
        params = self.policy_params()
        return params if self.shard_rollouts else parallel.local_copy(params)

    # ---------------------------------------------------------------- rollout
    def rollout(self, step: int) -> tuple[dict, dict]:
        """Samples ``G`` completions for the step's prompts (the task scores them); returns
        (host arrays, metrics)."""
        c = self.config
        idx = batch_indices(step, self.P, len(self.task), c.seed)
        key = jax.random.fold_in(jax.random.PRNGKey(c.seed), step)
        params = self.sampler_params()
        arrays, metrics = self.task.rollout(self.policy, params, idx, key, self.rollout_cfg)
        if step in self.nan_steps:  # fault injection (tests): a NaN reward must skip the update
            arrays["rewards"] = np.full_like(arrays["rewards"], np.nan)
            metrics.update(reward_mean=float("nan"), reward_std=float("nan"))
        return arrays, metrics

    # ---------------------------------------------------------------- update
    def train_step(self, step: int) -> dict:
        """Rollout (rewards on the host), then the whole update on the devices.

        Times: ``rollout_s`` (sampling), ``reward_s`` (the task's scoring), ``update_s``;
        ``step_s`` = sampling + update (the device work); ``step_wall_s`` the whole step."""
        t_step = time.time()
        arrays, metrics = self.rollout(step)
        t0 = time.time()
        self.runner, m = self.step_fn(self.runner, arrays)
        update_s = time.time() - t0
        tokens = float(arrays["prompt_mask"].sum() + arrays["completion_mask"].sum())
        metrics.update(m, update_s=update_s, update_tok_s=tokens / update_s,
                       step_s=update_s + metrics["rollout_s"],
                       step_wall_s=time.time() - t_step)
        if m["skipped"]:
            self.log(f"step {step}: non-finite loss/gradient, update skipped "
                     f"(loss {m['loss']}, grad_norm {m['grad_norm']})")
        return metrics

    # ---------------------------------------------------------------- evaluation
    def validate(self) -> dict:
        """The task's greedy validation metrics (``val_*``) under the current params."""
        return self.task.validate(self.policy, self.sampler_params(), self.greedy_cfg)

    # ---------------------------------------------------------------- loop
    def resume(self, ckpt) -> int:
        """The step to start from: 0 for a fresh run, else the latest checkpoint's, with its
        train state restored into the runner (the frozen base and reference are the model's,
        never checkpointed). Every check of a checkpoint against this run belongs here."""
        if ckpt.latest_step() is None:
            return 0
        train, _ = RI.restore_checkpoint(ckpt, self.runner.train)  # a mismatch: one line
        self.runner = self.runner.replace(train=train)
        start = int(to_host(train.step))
        self.log(f"resumed from {self.workdir / 'checkpoints'} at step {start}")
        return start

    def run(self) -> dict:
        from mr1.checkpoint import Checkpointer, StopSignal
        from mr1.metrics_io import MetricsWriter

        c = self.config
        ckpt = Checkpointer(self.workdir / "checkpoints", save_every=c.checkpoint_every,
                            max_to_keep=c.get("checkpoint_keep", 2))
        start = self.resume(ckpt)
        if jax.process_index() == 0:  # config.json + run_identity.json, after the restore
            RI.record(self.workdir, c, step=start)
        meta = RI.checkpoint_metadata(c)
        writer = MetricsWriter(self.workdir, resume_step=start)
        best = BestCheckpoint(self.workdir, metric=self.task.best_metric,
                              identity=meta["run_identity"], log=self.log)
        num_steps = c.num_steps
        last_val = {}
        bar = _progress(range(start, num_steps), c.progress, initial=start, total=num_steps)
        t_run = time.time()
        with StopSignal() as stop:
            if start == 0 and c.eval.every:
                last_val = self.validate()
                writer.write(0, last_val)
                best.update(0, last_val, self.state)
                self.log(f"step 0 validation: {_fmt(last_val)}")
            step = start
            for step in bar:
                metrics = self.train_step(step)
                done = step + 1
                if c.eval.every and (done % c.eval.every == 0 or done == num_steps):
                    last_val = self.validate()
                    metrics.update(last_val)
                    best.update(done, last_val, self.state)
                writer.write(done, metrics)
                if hasattr(bar, "set_postfix"):
                    bar.set_postfix(reward=f"{metrics['reward_mean']:.3f}",
                                    val_f1=f"{last_val.get('val_f1', float('nan')):.1f}")
                else:
                    self.log(f"step {done}: {_fmt(metrics)}")
                ckpt.save(done, self.state, metadata={"step": done, **meta})
                if stop():  # all processes agree (mr1.checkpoint.StopSignal)
                    self.log(f"SIGTERM: saving step {done} and stopping")
                    break
            final_step = int(to_host(self.state.step))
            ckpt.save(final_step, self.state, force=True, metadata={"step": final_step, **meta})
        ckpt.close()
        best.close()
        writer.close()
        summary = {"final_step": final_step, "wall_s": time.time() - t_run, **last_val}
        if jax.process_index() != 0:  # process 0 writes the run's files
            return summary
        png = plot_training_curves(self.workdir / "metrics.csv", self.workdir / "curves.png",
                                   title=f"{self.algo.upper()} {self.task.name}, {c.model}",
                                   panels=self.task.curve_panels)
        summary["curves"] = str(png)
        write_json_atomic(self.workdir / "summary.json", summary)
        self.log(f"done: {_fmt(summary)}")
        return summary


class BestCheckpoint:
    """Keeps the params of the best validation F1 so far in ``<workdir>/best`` (one orbax
    checkpoint, same layout as ``checkpoints/``) and its step and scores in
    ``<workdir>/best.json``: RL on 152 questions over-fits, and the last step is not the best.
    Evaluate it with ``evaluate.py --config.checkpoint=<workdir>/best``.

    ``identity`` (the run's fingerprint, :mod:`mr1.run_identity`) is stored in ``best.json``;
    a best of another identity (a run continued with ``MR1_ALLOW_CONFIG_CHANGE=1``) is not
    carried over: it is set aside as ``best.<fingerprint>`` / ``best.<fingerprint>.json``."""

    def __init__(self, workdir: pathlib.Path, metric: str = "val_f1", identity: str = "",
                 log: Callable[[str], None] = print):
        from mr1.checkpoint import Checkpointer

        self.metric, self.file, self.identity = metric, workdir / "best.json", identity
        found = json.loads(self.file.read_text()) if self.file.exists() else None
        old = (found or {}).get("run_identity", "")
        if found is not None and identity and old and old != identity:
            if jax.process_index() == 0:
                RI.set_aside_best(workdir, old)
            log(f"{self.file}: the best of config {old}, not this config's ({identity}); set "
                f"aside as best.{old}.json, not carried over")
            found = None
        self.ckpt = Checkpointer(workdir / "best", save_every=1, max_to_keep=1)
        self.score = found[metric] if found is not None else float("-inf")

    def update(self, step: int, val: dict, state) -> bool:
        if not val or not val[self.metric] > self.score:
            return False
        self.ckpt.save(step, state, force=True, metadata={"step": step, **val})
        self.score = val[self.metric]
        if jax.process_index() == 0:
            extra = {"run_identity": self.identity} if self.identity else {}
            write_json_atomic(self.file, {"step": step, **val, **extra})
        return True

    def close(self) -> None:
        self.ckpt.close()


CURVE_PANELS = ANSWER_PANELS  # the Answer Agent's (kept for importers)


def plot_training_curves(csv_path, png_path, title: str = "", panels=CURVE_PANELS) -> str:
    """The run's PNG: by default reward, validation F1, answer length and sample F1/EM
    against the step (a task passes its own ``panels``)."""
    from mr1.metrics_io import plot_curves
    return plot_curves(csv_path, png_path, panels=list(panels), title=title)


def _fmt(d: dict) -> str:
    return ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in d.items())


def _progress(it, enabled: bool, **kw):
    if not enabled or jax.process_index() != 0:
        return it
    from tqdm import tqdm
    return tqdm(it, desc="train", unit="step", **kw)


class RLTask(Protocol):
    """What :class:`Trainer` trains on: prompts in, completions, rewards and metrics out.

    ``rollout(policy, params, idx, key, cfg)`` samples completions for the training items
    ``idx`` and scores them on the host: host arrays ``prompt_ids``, ``prompt_mask``
    ``[P, T]``; ``tokens``, ``completion_mask``, ``old_logp`` ``[P * G, N]``; ``rewards
    [P * G]``; and float metrics (``reward_mean``, ``rollout_s`` among them). The Answer
    Agent and the per-fact Memory Manager use :func:`mr1.rl.rollout.sample_and_score` (``G``
    samples of each prompt); a task whose rows are laid out otherwise sets ``step_layout``
    (:class:`mr1.rl.runner.StepLayout`; the Memory Manager's episodes,
    :class:`mr1.rl.episode_task.EpisodeTask`). ``validate(policy, params, greedy_cfg)``
    returns ``val_*`` metrics, ``best_metric`` among them. ``max_new_tokens`` is the sampling
    budget; an optional ``allowed_tokens`` attribute constrains sampling to those token ids.
    Advantages, losses and everything else of the update are the train step's
    (:mod:`mr1.rl.runner`), not the task's. Implementations:
    :class:`mr1.rl.answer_task.AnswerTask`, :class:`mr1.rl.memory_task.ManagerTask`,
    :class:`mr1.rl.episode_task.EpisodeTask`.
    """

    name: str
    best_metric: str
    curve_panels: tuple
    max_new_tokens: int

    def __len__(self) -> int: ...

    def rollout(self, policy, params, idx: np.ndarray, key, cfg: SamplingConfig
                ) -> tuple[dict, dict]: ...

    def validate(self, policy, params, cfg: SamplingConfig) -> dict: ...


def build_then_train(config, workdir, build_task: Callable[[], RLTask], *, policy,
                     log=print) -> dict:
    """Builds the task (process 0 first when there are several) and runs the trainer.

    Process 0 builds (or loads) the memory banks first, the others after it: on a shared
    workdir they load its banks (two writers of one bank directory collide), on a local one
    they build the same banks themselves.
    """
    task = parallel.process_zero_first(build_task, "mr1.rl.trainer: task built")
    return Trainer(config, workdir, policy, task, log=log).run()


def prepare_workdir(config, workdir) -> pathlib.Path:
    """Checks ``workdir`` against the config (:func:`mr1.run_identity.prepare_workdir`: a
    directory, holding no run of another config) and creates it. ``config.json`` is written by
    :meth:`Trainer.run` once the data loaded and the checkpoint restored."""
    return RI.prepare_workdir(config, workdir)


def train(config, workdir, *, policy=None, embedder=None, log=print) -> dict:
    """Builds the Answer Agent task from ``config`` and runs (or resumes) training in
    ``workdir``."""
    from mr1.rl.answer_task import AnswerTask

    workdir = prepare_workdir(config, workdir)
    policy = policy or load_policy_from_config(config)
    if embedder is None:
        from mr1.memory.embedder import load_embedder
        embedder = load_embedder()
    return build_then_train(
        config, workdir, lambda: AnswerTask.from_config(config, policy, embedder, workdir, log),
        policy=policy, log=log)
