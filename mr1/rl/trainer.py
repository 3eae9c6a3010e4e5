"""The RL loop (GRPO or PPO) shared by ``experiments/{grpo,ppo}_{answer,memory}.py``.

One step (DESIGN.md §2): ``P`` training prompts (a seeded permutation per epoch, so the data
position is a function of the step) → ``G`` samples each at temperature 1 from the jitted
sampler (one shared prefill per prompt) → rewards from the task (:class:`RLTask`: the Answer
Agent's parsed answer line, :class:`mr1.rl.answer_task.AnswerTask`; or the frozen Answer
Agent's answers after the Memory Manager's op, :class:`mr1.rl.memory_task.ManagerTask`) →
advantages (GRPO: group-normalised; PPO: GAE over tokens with a linear critic) → one jitted,
sharded update (:mod:`mr1.rl.train_step`) → metrics (CSV + TensorBoard), the task's validation
every ``eval_every`` steps, an orbax checkpoint every ``checkpoint_every`` steps and
at exit (SIGTERM included). Restarting with the same ``--workdir`` resumes from the latest
checkpoint and reproduces the uninterrupted run: the rollout key is ``fold_in(seed, step)``.

Rollouts run on every process over the whole batch (a local copy of the params); the update is
data-parallel over the mesh. Rewards and metrics are host-side numpy.

``config.lora.rank > 0`` trains LoRA adapters (:mod:`mr1.models.lora`) on a frozen base instead
of every weight: the state (and so every checkpoint) holds ``{"lora": ...}`` and its optimizer
state only; the base is an extra argument of the update, and rollouts / validation sample from
the base with the adapters merged in (once per step, on device). :func:`load_trained_params`
reads either kind of checkpoint back as full policy params.
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
from mr1.models import transformer
from mr1.models.lora import init_lora, lora_scale
from mr1.rl import advantages as A
from mr1.rl import train_step as TS
from mr1.rl.answer_task import ANSWER_PANELS
from mr1.sampling import SamplingConfig

__all__ = ["train", "batch_indices", "Trainer", "RLTask", "load_trained_params", "run_config",
           "lora_rank", "load_policy_from_config"]


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


def load_policy_from_config(config):
    """The config's ``model`` (and optional ``tokenizer``, ``param_dtype``, ``compute_dtype``)
    as a Policy."""
    import jax.numpy as jnp

    from mr1.models import load_policy
    from mr1.models.config import execution_overrides
    from mr1.models.policy import load_tokenizer_from_gguf

    tokenizer = None
    if config.get("tokenizer", ""):
        from mr1 import assets
        src = config.tokenizer
        path = assets.smollm2_gguf() if src == "embedded" else pathlib.Path(src)
        tokenizer = load_tokenizer_from_gguf(path)
    policy = load_policy(config.model, tokenizer=tokenizer, seed=config.seed,
                         dtype=jnp.dtype(config.get("param_dtype", "float32")))
    changes = execution_overrides(config)
    if changes:  # execution knobs of the model config (same weights)
        policy = dataclasses.replace(policy, config=policy.config.replace(**changes))
    return policy


@dataclasses.dataclass
class Trainer:
    """Holds the compiled pieces of one run; :meth:`run` is the loop."""

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
        n_all = c.parallel.num_devices or jax.device_count()
        self.mesh = parallel.make_mesh(n_all, parallel.mesh_shape_from_config(c.parallel, n_all))
        n_dev = parallel.batch_devices(self.mesh)
        mb = c.rollout.microbatch_prompts or self.P
        if self.P % mb or mb % n_dev:
            raise ValueError(f"prompts_per_step {self.P} must split into micro-batches of "
                             f"{mb} prompts, each divisible by the {n_dev} devices the batch is "
                             f"split over (mesh {parallel.mesh_shape(self.mesh)})")
        self.mb = mb
        self.lc = TS.LossConfig.from_mapping({
            **c.loss, "objective": self.algo, "remat": c.parallel.get("remat", False),
            "logit_chunk": c.parallel.get("logit_chunk", 0)})
        lora_cfg, rank = c.get("lora") or {}, lora_rank(c)
        # LoRA: train adapters on a frozen base (None: full fine-tuning)
        self.lora_scale = lora_scale(lora_cfg["alpha"], rank) if rank > 0 else None
        critic_lr = c.optim.critic_learning_rate if self.algo == "ppo" else None
        self.optimizer = TS.make_optimizer(
            c.optim.learning_rate, critic_learning_rate=critic_lr,
            warmup_steps=c.optim.warmup_steps, weight_decay=c.optim.weight_decay,
            b1=c.optim.b1, b2=c.optim.b2, max_grad_norm=c.loss.max_grad_norm,
            lora=self.lora_scale is not None)
        if self.lora_scale is None:
            params = {"policy": self.policy.params}
        else:
            params = {"lora": init_lora(self.policy.params, rank, tuple(lora_cfg["targets"]),
                                        rng=jax.random.fold_in(jax.random.PRNGKey(c.seed), 1))}
        if self.algo == "ppo":
            params["value_head"] = TS.init_value_head(self.policy.config)
        state = TS.init_train_state(params, self.optimizer, c.seed)
        mode = "fsdp" if parallel.mesh_shape(self.mesh).fsdp > 1 else "replicated"
        shard = lambda t: parallel.param_shardings(t, self.mesh, mode)  # noqa: E731
        self.state_sharding = TS.TrainState(step=parallel.replicated(self.mesh),
                                            params=shard(state.params),
                                            opt_state=shard(state.opt_state),
                                            rng=parallel.replicated(self.mesh))
        self.state = parallel.to_global(jax.device_get(state), self.state_sharding)
        self.frozen = self.frozen_sharding = None  # LoRA: the base params, never updated
        self.update_extra = ()                    # LoRA: (frozen,) after (state, batch)
        if self.lora_scale is not None:
            self.frozen_sharding = shard(self.policy.params)
            self.frozen = parallel.to_global(jax.device_get(self.policy.params),
                                             self.frozen_sharding)
            self.update_extra = (self.frozen,)
            self._merge = jax.jit(functools.partial(TS.policy_params,
                                                    lora_scale=self.lora_scale),
                                  out_shardings=self.frozen_sharding)
            n_lora = sum(x.size for x in jax.tree.leaves(params["lora"]))
            n_base = sum(x.size for x in jax.tree.leaves(self.policy.params))
            self.log(f"LoRA rank {rank} (alpha {lora_cfg['alpha']}) on "
                     f"{', '.join(lora_cfg['targets'])}: {n_lora:,} trainable parameters "
                     f"({100 * n_lora / n_base:.2f}% of {n_base:,})")
        self.ref_params = None
        if self.lc.kl_beta > 0:  # frozen reference = the initial policy (the LoRA base),
            # kept in the compute dtype (a bfloat16 copy under float32 master weights)
            ref = jax.tree.map(lambda x: np.asarray(x).astype(transformer.activation_dtype(
                self.policy.config, x.dtype)), jax.device_get({"policy": self.policy.params}))
            self.ref_params = ({"policy": self.frozen} if self.frozen is not None else
                               parallel.to_global(ref, shard(ref)))
        self.update = TS.make_update(self.policy.config, self.lc, self.optimizer, self.mesh,
                                     self.state_sharding, lora_scale=self.lora_scale,
                                     frozen_sharding=self.frozen_sharding)
        self.score = TS.make_score(self.policy.config, with_values=self.algo == "ppo",
                                   lora_scale=self.lora_scale or 1.0, mesh=self.mesh, lc=self.lc)
        self.batch_sharding = parallel.batch_sharding(self.mesh, microbatched=True)
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

    def policy_params(self):
        """The current policy params (device arrays, the state's sharding): LoRA merged into
        the base once here, for the sampler."""
        if self.lora_scale is None:
            return self.state.params["policy"]
        return self._merge(self.state.params, self.frozen)

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

    def _to_batch(self, arrays: dict, batch: TS.RolloutBatch | None = None,
                  fields: tuple[str, ...] = ()) -> TS.RolloutBatch:
        """The update's device batch from host ``arrays``; given the ``batch`` already on the
        devices, only ``fields`` are sent (the rest are the same arrays)."""
        host = TS.split_microbatches(arrays, self.P, self.G, self.mb)
        if batch is None:
            return parallel.to_global(host, self.batch_sharding)
        return batch.replace(**{f: parallel.to_global(getattr(host, f), self.batch_sharding)
                                for f in fields})

    def advantages(self, arrays: dict) -> tuple[dict, TS.RolloutBatch | None]:
        """Adds ``advantages`` (and PPO's ``returns`` / ``old_values``) to the host arrays.

        Returns them with PPO's device batch (the value pass sent it; the update then sends
        only the new fields), or None (GRPO).
        """
        c, rewards = self.config, arrays["rewards"]
        if self.algo == "grpo":
            arrays["advantages"] = np.asarray(A.group_advantages(
                rewards, self.G, normalize_std=c.loss.get("normalize_std", True)))
            return arrays, None
        batch = self._to_batch(arrays)
        values = to_host(self.score(self.state.params, batch, self.frozen)["values"]).reshape(
            arrays["tokens"].shape)
        cm = arrays["completion_mask"]
        last = np.maximum(cm.sum(-1).astype(np.int64) - 1, 0)
        r = np.zeros_like(cm)
        r[np.arange(len(r)), last] = rewards
        done = np.zeros_like(cm)
        done[np.arange(len(r)), last] = 1.0
        adv, ret = A.gae(r, values * cm, done, gamma=c.loss.gamma, lam=c.loss.gae_lambda,
                         mask=cm)
        adv, ret = np.asarray(adv), np.asarray(ret)
        if c.loss.whiten_advantages:
            mu = (adv * cm).sum() / max(cm.sum(), 1.0)
            sd = np.sqrt((((adv - mu) * cm) ** 2).sum() / max(cm.sum(), 1.0))
            adv = (adv - mu) / (sd + 1e-6) * cm
        arrays.update(advantages=adv.astype(np.float32), returns=ret.astype(np.float32),
                      old_values=(values * cm).astype(np.float32))
        return arrays, batch

    # ---------------------------------------------------------------- update
    def train_step(self, step: int) -> dict:
        arrays, metrics = self.rollout(step)
        arrays, batch = self.advantages(arrays)
        t0 = time.time()
        batch = self._to_batch(arrays, batch, ("advantages", "returns", "old_values"))
        if self.ref_params is not None:
            ref = self.score(self.ref_params, batch)["logp"]
            batch = batch.replace(ref_logp=ref)
        self.state, m = self.update(self.state, batch, *self.update_extra)
        m = {k: float(to_host(v)) for k, v in m.items()}
        update_s = time.time() - t0
        tokens = float(arrays["prompt_mask"].sum() + arrays["completion_mask"].sum())
        metrics.update(m, update_s=update_s, update_tok_s=tokens / update_s,
                       step_s=update_s + metrics["rollout_s"])
        if m["skipped"]:
            self.log(f"step {step}: non-finite loss/gradient, update skipped "
                     f"(loss {m['loss']}, grad_norm {m['grad_norm']})")
        return metrics

    # ---------------------------------------------------------------- evaluation
    def validate(self) -> dict:
        """The task's greedy validation metrics (``val_*``) under the current params."""
        return self.task.validate(self.policy, self.sampler_params(), self.greedy_cfg)

    # ---------------------------------------------------------------- loop
    def run(self) -> dict:
        from mr1.checkpoint import Checkpointer, StopSignal
        from mr1.metrics_io import MetricsWriter

        c = self.config
        ckpt = Checkpointer(self.workdir / "checkpoints", save_every=c.checkpoint_every,
                            max_to_keep=c.get("checkpoint_keep", 2))
        start = 0
        if ckpt.latest_step() is not None:
            self.state, _ = RI.restore_checkpoint(ckpt, self.state)  # a mismatch: one line
            start = int(to_host(self.state.step))
            self.log(f"resumed from {self.workdir / 'checkpoints'} at step {start}")
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


def run_config(checkpoint) -> dict:
    """The run's ``config.json`` (the trainer writes it in the workdir that holds
    ``checkpoints/``) as a dict for the checkpoint directory ``checkpoint``; ``{}`` if absent."""
    from etils import epath

    path = epath.Path(checkpoint).parent / "config.json"
    return json.loads(path.read_text()) if path.exists() else {}


def lora_rank(run: dict) -> int:
    """The LoRA rank of a run config (0: full fine-tuning)."""
    return int((run.get("lora") or {}).get("rank", 0) or 0)


def load_trained_params(checkpoint, base_params, *, step: int | None = None,
                        run: dict | None = None):
    """Full policy params from a trainer checkpoint directory (``<workdir>/checkpoints``).

    ``run`` is the run's config (default: its ``config.json``, :func:`run_config`). Full
    fine-tuning checkpoints hold ``{"policy": ...}``, returned as they are. LoRA runs
    (``lora.rank > 0``) hold only ``{"lora": ...}``: the adapters are merged into
    ``base_params``, which must be the run's base model (same weights and dtype). A PPO run's
    value head is read along (it is saved with the params) and dropped. ``step``: default the
    latest.
    """
    from mr1.checkpoint import restore_params
    from mr1.models.lora import merge_lora

    run = run_config(checkpoint) if run is None else run
    rank = lora_rank(run)
    if rank > 0:
        lora = run["lora"]
        like = {"lora": jax.eval_shape(lambda: init_lora(base_params, rank,
                                                         tuple(lora["targets"])))}
    else:
        like = {"policy": base_params}
    if run.get("algo") == "ppo":
        d = np.shape(base_params["embed"])[-1]
        like["value_head"] = {"w": jax.ShapeDtypeStruct((d,), np.float32),
                              "b": jax.ShapeDtypeStruct((), np.float32)}
    try:
        restored = restore_params(checkpoint, like, step=step)
    except FileNotFoundError:
        raise
    except Exception as e:  # noqa: BLE001
        kind = f"LoRA rank {rank}" if rank > 0 else "full fine-tuning"
        raise RI.CheckpointMismatchError(
            f"{checkpoint}: params do not match a {kind} {run.get('algo', 'grpo')} run; LoRA "
            "and PPO checkpoints are read with the run's config.json, expected in the "
            "directory above checkpoints/") from e
    if rank <= 0:
        return restored["policy"]
    return merge_lora(base_params, restored["lora"], lora_scale(lora["alpha"], rank))


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
    """What :class:`Trainer` trains on: prompts to sample from, their rewards, a validation.

    ``rollout(policy, params, idx, key, cfg)`` samples ``cfg.num_samples`` completions for the
    training prompts ``idx`` with :func:`mr1.sampling.sample_padded` and scores them; it returns
    host arrays (``prompt_ids``, ``prompt_mask`` ``[P, T]``; ``tokens``, ``completion_mask``,
    ``old_logp`` ``[P * G, N]``; ``rewards [P * G]``) and a dict of float metrics.
    ``validate(policy, params, greedy_cfg)`` returns ``val_*`` metrics, ``best_metric`` among
    them. An optional ``allowed_tokens`` attribute constrains sampling to those token ids.
    Implementations: :class:`mr1.rl.answer_task.AnswerTask`,
    :class:`mr1.rl.memory_task.ManagerTask`.
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
