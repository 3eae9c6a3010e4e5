"""One RL state and one RL step: :class:`RunnerState` and :func:`make_train_step`.

purejaxrl's ``make_train(config)`` threads one ``runner_state`` through a pure step whose
``_update_epoch`` scans shuffled mini-batches; this is that shape for an LLM policy. A step of
GRPO / PPO is::

    rollout (the jitted sampler, mr1.sampling)           device
      -> texts -> rewards (the task, mr1.rl.rollout)     host: the one hop
      -> train_step(runner, arrays)                      device, one jitted program:
           reference log-probs (KL on)   value pass (an estimator that needs values)
           advantages (ESTIMATORS[config.loss.advantage_estimator])
           epochs x minibatches lax.scan of optimizer steps over shuffled mini-batches

The host sends the rollout's arrays and the rewards once (:meth:`TrainStep.__call__`) and reads
the step's scalar metrics once; advantages, returns, values and reference log-probs never leave
the devices.

:class:`RunnerState` is everything a step reads: the trainable :class:`TrainState` (params,
optimizer state, step, rng; what a checkpoint holds), the frozen LoRA base params and the frozen
KL reference params (None when unused; never donated, never checkpointed: both are the initial
policy, rebuilt from the model). ``TrainState.step`` counts RL steps (one per call, whatever
``epochs x minibatches``; the optimizer's own count, in its state, counts optimizer steps), and
``TrainState.rng`` seeds the mini-batch shuffles (``fold_in(rng, step)``), so a resumed run
shuffles as the uninterrupted one did.

Mini-batches (``config.optim.minibatches`` = K, ``config.optim.epochs`` = E): the ``P`` prompts
of a step (each with its ``G`` samples: a group is never split) are permuted per epoch and cut
into K mini-batches of ``P / K`` prompts; each mini-batch is one optimizer step (its gradient
accumulated over micro-batches of ``rollout.microbatch_prompts`` prompts as before), so one RL
step makes ``E * K`` optimizer steps and the importance ratio (and so the PPO/GRPO clip) matters
from the second on. E = K = 1 (the default) is one optimizer step over the unshuffled batch:
exactly the update before this module existed (:func:`mr1.rl.train_step.update_step`). The
metrics are means over the ``E * K`` optimizer steps (``skipped``: the fraction skipped).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import numpy as np

from mr1 import parallel
from mr1.models import transformer
from mr1.models.lora import init_lora, lora_scale
from mr1.registry import ConfigError
from mr1.rl import train_step as TS
from mr1.rl.advantages import ESTIMATORS, AdvantageConfig

__all__ = ["RunnerState", "StepConfig", "StepLayout", "config_layout",
           "StepParts", "TrainStep", "make_train_step",
           "step_parts", "rl_update", "jit_update", "estimator_name", "DEFAULT_ESTIMATORS"]

# config.loss.advantage_estimator = "" picks the algorithm's default from the loss config
DEFAULT_ESTIMATORS: dict[str, Callable[[Any], str]] = {
    "grpo": lambda loss: "grpo" if loss.get("normalize_std", True) else "drgrpo",
    "ppo": lambda loss: "gae",
}


def estimator_name(config) -> str:
    """The advantage estimator of a run config: ``loss.advantage_estimator``, or the algo's
    default (GRPO: ``grpo`` / ``drgrpo`` per ``loss.normalize_std``; PPO: ``gae``)."""
    name = config.loss.get("advantage_estimator", "")
    return name or DEFAULT_ESTIMATORS[config.algo](config.loss)


@flax.struct.dataclass
class RunnerState:
    """Everything one RL step reads and writes (module docstring).

    ``train``: the trainable state (checkpointed); ``frozen``: the LoRA base params (None for
    full fine-tuning); ``ref``: the KL reference policy params (None with KL off; the LoRA base
    itself under LoRA).
    """

    train: TS.TrainState
    frozen: Any = None
    ref: Any = None

    @property
    def step(self) -> jax.Array:
        """RL steps done (``train.step``)."""
        return self.train.step

    @property
    def rng(self) -> jax.Array:
        """The shuffle key (``train.rng``)."""
        return self.train.rng


@dataclasses.dataclass(frozen=True)
class StepConfig:
    """Static layout of one step (hashable: part of the compiled update)."""

    prompts: int                 # P prompts (groups) per step
    group_size: int              # G samples per prompt
    microbatch_prompts: int      # prompts per gradient micro-batch
    epochs: int = 1              # passes over the rollout batch
    minibatches: int = 1         # optimizer steps per pass
    estimator: str = "grpo"      # ESTIMATORS name

    def __post_init__(self):
        if self.epochs < 1 or self.minibatches < 1:
            raise ConfigError(f"epochs ({self.epochs}) and minibatches ({self.minibatches}) "
                              "must be >= 1")
        if self.prompts % (self.minibatches * self.microbatch_prompts):
            raise ConfigError(f"prompts_per_step {self.prompts} must split into "
                              f"{self.minibatches} mini-batches of whole micro-batches of "
                              f"{self.microbatch_prompts} prompts")

    @property
    def num_microbatches(self) -> int:
        return self.prompts // self.microbatch_prompts


@dataclasses.dataclass(frozen=True)
class StepLayout:
    """How a task's rollout rows map onto the update when they are not the config's
    ``prompts_per_step x group_size`` (an :class:`~mr1.rl.trainer.RLTask` may set
    ``step_layout``): ``prompts`` rows of ``prompt_ids`` with ``group_size`` samples each, and
    ``advantage_group`` consecutive samples normalised together by the estimator (the Memory
    Manager's episodes, :class:`mr1.rl.episode_task.EpisodeTask`: ``P x F`` fact prompts with
    ``G`` samples, or, over several sessions, one sample per prompt with the ``G`` op
    sequences of a fact a group). ``config.rollout.microbatch_prompts`` counts its prompts."""

    prompts: int
    group_size: int
    advantage_group: int


def config_layout(config) -> StepLayout:
    """The update's prompts and groups a run config implies (what :func:`step_parts` and
    :mod:`mr1.planning` use): ``prompts_per_step x group_size``; for the Memory Manager's
    episodes (``manager.task == "episodes"``, :mod:`mr1.rl.episode_task`) the
    ``episode.max_facts`` fact slots of each of the ``prompts_per_step`` episodes, with ``G``
    samples per fact prompt (one-session windows) or one per prompt (longer windows)."""
    P, G = config.rollout.prompts_per_step, config.rollout.group_size
    if (config.get("manager") or {}).get("task", "") != "episodes":
        return StepLayout(P, G, G)
    F = int(config.episode.max_facts)
    if int(config.episode.window_sessions) == 1:
        return StepLayout(P * F, G, G)
    return StepLayout(P * F * G, 1, G)


# ----------------------------------------------------------------------------- the update

def _score_all(params, batch: TS.RolloutBatch, cfg, lc: TS.LossConfig, value_head=None):
    """Log-probs (and values) of every micro-batch of ``batch`` under ``params`` (no grad)."""
    def one(mb):
        return TS.score_completions(params, cfg, mb.prompt_ids, mb.prompt_mask, mb.tokens,
                                    mb.completion_mask, value_head=value_head,
                                    logit_chunk=lc.logit_chunk)
    return jax.lax.map(one, batch)


def _with_advantages(state: TS.TrainState, batch: TS.RolloutBatch, rewards, frozen, ref, *,
                     cfg, lc: TS.LossConfig, sc: StepConfig, ac: AdvantageConfig,
                     lora_scale: float) -> TS.RolloutBatch:
    """``batch`` with reference log-probs (KL on), advantages, and the estimator's returns and
    old values filled in, all computed here from the rewards ``[M, P_mb * G]``."""
    est = ESTIMATORS.get(sc.estimator)
    fields = {}
    if lc.kl_beta > 0:
        fields["ref_logp"] = _score_all(ref, batch, cfg, lc)["logp"]
    values = None
    cm = batch.completion_mask
    if est.needs_values:
        policy = TS.policy_params(state.params, frozen, lora_scale)  # merged once
        values = _score_all(policy, batch, cfg, lc, state.params["value_head"])["values"]
        fields["old_values"] = values * cm
    flat = lambda x: x.reshape(-1, *x.shape[2:])  # noqa: E731  [M, R, ...] -> [M * R, ...]
    adv, ret = est.fn(flat(rewards), flat(cm), None if values is None else flat(values), ac)
    unflat = lambda x: x.reshape(*cm.shape[:2], *x.shape[1:])  # noqa: E731
    fields["advantages"] = unflat(adv)
    if ret is not None:
        fields["returns"] = unflat(ret)
    return batch.replace(**fields)


def _minibatches(batch: TS.RolloutBatch, key, sc: StepConfig, mesh) -> TS.RolloutBatch:
    """``batch`` ``[M, ...]`` as ``[K, M / K, ...]``: K mini-batches of whole micro-batches,
    the prompts (with their groups) permuted by ``key`` first when K > 1."""
    k, m = sc.minibatches, sc.num_microbatches
    p = sc.prompts
    perm = jax.random.permutation(key, p) if k > 1 else None

    def regroup(name, x):
        if x is None:
            return None
        per_prompt = 1 if name.startswith("prompt_") else sc.group_size
        rest = x.shape[2:]
        y = x.reshape(p, per_prompt, *rest)
        if perm is not None:
            y = y[perm]
        y = y.reshape(k, m // k, sc.microbatch_prompts * per_prompt, *rest)
        return parallel.constrain(y, mesh, (None, None, parallel.BATCH) + (None,) * len(rest))

    return batch.replace(**{f.name: regroup(f.name, getattr(batch, f.name))
                            for f in dataclasses.fields(batch)})


def rl_update(state: TS.TrainState, batch: TS.RolloutBatch, rewards: jax.Array, frozen=None,
              ref=None, *, cfg, lc: TS.LossConfig, sc: StepConfig, ac: AdvantageConfig,
              optimizer, lora_scale: float = 1.0, mesh=None) -> tuple[TS.TrainState, dict]:
    """One RL step's update (pure; :func:`make_train_step` jits it): advantages from
    ``rewards [M, P_mb * G]``, then ``epochs x minibatches`` optimizer steps (module docstring).

    ``batch`` needs the rollout fields only (``ref_logp``, ``advantages``, ``returns``,
    ``old_values`` may be None). ``frozen``: the LoRA base; ``ref``: the reference policy
    params (used when ``lc.kl_beta > 0``).
    """
    batch = _with_advantages(state, batch, rewards, frozen, ref, cfg=cfg, lc=lc, sc=sc, ac=ac,
                             lora_scale=lora_scale)
    opt_step = functools.partial(TS.optimizer_step, cfg=cfg, lc=lc, optimizer=optimizer,
                                 frozen=frozen, lora_scale=lora_scale)
    if sc.epochs == 1 and sc.minibatches == 1:  # the one-update step, as it always was
        new, metrics = opt_step(state, batch)
        return new.replace(step=state.step + 1), metrics

    def epoch(st, key):
        return jax.lax.scan(opt_step, st, _minibatches(batch, key, sc, mesh))

    keys = jax.random.split(jax.random.fold_in(state.rng, state.step), sc.epochs)
    new, per_step = jax.lax.scan(epoch, state, keys)  # metrics [E, K]
    metrics = {k: jnp.mean(v) for k, v in per_step.items()}
    return new.replace(step=state.step + 1), metrics


def jit_update(cfg, lc: TS.LossConfig, sc: StepConfig, ac: AdvantageConfig, optimizer, *,
               lora_scale: float | None, mesh, state_sharding, frozen_sharding=None,
               ref_sharding=None) -> Callable:
    """``jit(rl_update)`` as ``(state, batch, rewards, frozen, ref) -> (state, metrics)`` over
    ``mesh``: the batch and rewards split on their per-micro-batch axis, the state per
    ``state_sharding`` and donated; ``frozen`` / ``ref`` (None when unused) never donated.
    What the trainer runs, and what :func:`mr1.planning.abstract_update` compiles."""
    kw = dict(cfg=cfg, lc=lc, sc=sc, ac=ac, optimizer=optimizer,
              lora_scale=float(lora_scale or 1.0), mesh=mesh)

    def fn(state, batch, rewards, frozen, ref):
        with parallel.activation_mesh(mesh):
            return rl_update(state, batch, rewards, frozen, ref, **kw)

    repl = parallel.replicated(mesh)
    batch = parallel.batch_sharding(mesh, microbatched=True)
    return jax.jit(fn, in_shardings=(state_sharding, batch, batch, frozen_sharding or repl,
                                     ref_sharding or repl),
                   out_shardings=(state_sharding, repl), donate_argnums=0)


# ----------------------------------------------------------------------------- the step object

@dataclasses.dataclass
class TrainStep:
    """What :func:`make_train_step` builds: the mesh, the optimizer, the shardings and the
    jitted update of one run. :meth:`init` makes the :class:`RunnerState`; calling the object
    runs one step's update from a rollout's host arrays."""

    model_config: Any
    mesh: Any
    parts: "StepParts"
    seed: int
    log: Callable[[str], None] = print

    def __post_init__(self):
        p = self.parts
        self.lc, self.sc, self.ac, self.optimizer = p.lc, p.sc, p.ac, p.optimizer
        self.lora_rank, self.lora_alpha, self.lora_targets = (p.lora_rank, p.lora_alpha,
                                                              p.lora_targets)
        self.lora_scale = p.lora_scale
        self.needs_critic = ESTIMATORS.get(self.sc.estimator).needs_values
        mode = "fsdp" if parallel.mesh_shape(self.mesh).fsdp > 1 else "replicated"
        self.shard = lambda t: parallel.param_shardings(t, self.mesh, mode)  # noqa: E731
        self.batch_sharding = parallel.batch_sharding(self.mesh, microbatched=True)
        self.state_sharding = self.frozen_sharding = self.ref_sharding = None
        self._update = self._merge = None

    # -- state
    def init(self, policy) -> RunnerState:
        """The initial runner state for ``policy`` (its params are the base / reference),
        placed on the mesh; compiles the update."""
        base = policy.params
        if self.lora_scale is None:
            params = {"policy": base}
        else:
            params = {"lora": init_lora(base, self.lora_rank, self.lora_targets,
                                        rng=jax.random.fold_in(jax.random.PRNGKey(self.seed),
                                                               1))}
        if self.needs_critic:
            params["value_head"] = TS.init_value_head(self.model_config)
        state = TS.init_train_state(params, self.optimizer, self.seed)
        self.state_sharding = TS.TrainState(step=parallel.replicated(self.mesh),
                                            params=self.shard(state.params),
                                            opt_state=self.shard(state.opt_state),
                                            rng=parallel.replicated(self.mesh))
        train = parallel.to_global(jax.device_get(state), self.state_sharding)
        frozen = ref = None
        if self.lora_scale is not None:
            self.frozen_sharding = self.shard(base)
            frozen = parallel.to_global(jax.device_get(base), self.frozen_sharding)
            self._merge = jax.jit(functools.partial(TS.policy_params,
                                                    lora_scale=self.lora_scale),
                                  out_shardings=self.frozen_sharding)
            n_lora = sum(x.size for x in jax.tree.leaves(params["lora"]))
            n_base = sum(x.size for x in jax.tree.leaves(base))
            self.log(f"LoRA rank {self.lora_rank} (alpha {self.lora_alpha}) on "
                     f"{', '.join(self.lora_targets)}: {n_lora:,} trainable parameters "
                     f"({100 * n_lora / n_base:.2f}% of {n_base:,})")
        if self.lc.kl_beta > 0:  # frozen reference = the initial policy (the LoRA base),
            if frozen is not None:  # kept in the compute dtype (a bfloat16 copy under
                ref, self.ref_sharding = frozen, self.frozen_sharding  # float32 masters)
            else:
                host = jax.tree.map(lambda x: np.asarray(x).astype(transformer.activation_dtype(
                    self.model_config, x.dtype)), jax.device_get(base))
                self.ref_sharding = self.shard(host)
                ref = parallel.to_global(host, self.ref_sharding)
        self._update = self._compile()
        return RunnerState(train=train, frozen=frozen, ref=ref)

    def _compile(self):
        return jit_update(self.model_config, self.lc, self.sc, self.ac, self.optimizer,
                          lora_scale=self.lora_scale, mesh=self.mesh,
                          state_sharding=self.state_sharding,
                          frozen_sharding=self.frozen_sharding, ref_sharding=self.ref_sharding)

    # -- the step
    def device_batch(self, arrays: dict) -> tuple[TS.RolloutBatch, jax.Array]:
        """The rollout's host arrays (``prompt_ids``, ``prompt_mask``, ``tokens``,
        ``completion_mask``, ``old_logp``, ``rewards``) as the update's global arrays, sent in
        one transfer."""
        sc = self.sc
        host = TS.split_microbatches({k: v for k, v in arrays.items()
                                      if k in _ROLLOUT_FIELDS}, sc.prompts, sc.group_size,
                                     sc.microbatch_prompts, fill=False)
        rewards = np.asarray(arrays["rewards"], np.float32).reshape(sc.num_microbatches, -1)
        return parallel.to_global((host, rewards), self.batch_sharding)

    def __call__(self, runner: RunnerState, arrays: dict) -> tuple[RunnerState, dict]:
        """One step's update from a rollout (``arrays``: host arrays with ``rewards [P*G]``);
        returns the new runner state (the old one's train state is donated) and the metrics
        as floats."""
        batch, rewards = self.device_batch(arrays)
        train, metrics = self._update(runner.train, batch, rewards, runner.frozen, runner.ref)
        # the metrics are replicated scalars: this process's copies, fetched in one call
        values = jax.device_get([v.addressable_data(0) for v in metrics.values()])
        return runner.replace(train=train), {k: float(v) for k, v in zip(metrics, values)}

    def policy_params(self, runner: RunnerState):
        """The current policy params (device arrays, the state's sharding): LoRA merged into
        the base once here, for the sampler."""
        if self.lora_scale is None:
            return runner.train.params["policy"]
        return self._merge(runner.train.params, runner.frozen)


_ROLLOUT_FIELDS = ("prompt_ids", "prompt_mask", "tokens", "completion_mask", "old_logp")


@dataclasses.dataclass(frozen=True)
class StepParts:
    """What a run config says about its train step (:func:`step_parts`)."""

    lc: TS.LossConfig
    sc: StepConfig
    ac: AdvantageConfig
    optimizer: Any
    lora_rank: int
    lora_alpha: float
    lora_targets: tuple

    @property
    def lora_scale(self) -> float | None:
        return lora_scale(self.lora_alpha, self.lora_rank) if self.lora_rank > 0 else None


def step_parts(config, layout: StepLayout | None = None) -> StepParts:
    """Loss, layout, estimator and optimizer of a run config (``algo``, ``rollout``, ``loss``,
    ``optim``, ``lora``, ``parallel``), checked: ``prompts_per_step`` splits into
    ``optim.minibatches`` mini-batches of whole micro-batches, the estimator and objective
    exist. ``layout`` (a task's :class:`StepLayout`; default :func:`config_layout`) gives the
    update's prompts and groups."""
    c = config
    layout = layout or config_layout(c)
    P, G, A = layout.prompts, layout.group_size, layout.advantage_group
    sc = StepConfig(prompts=P, group_size=G, microbatch_prompts=c.rollout.microbatch_prompts or P,
                    epochs=int(c.optim.get("epochs", 1)),
                    minibatches=int(c.optim.get("minibatches", 1)), estimator=estimator_name(c))
    est = ESTIMATORS.get(sc.estimator)
    lc = TS.LossConfig.from_mapping({**c.loss, "objective": c.algo,
                                     "remat": c.parallel.get("remat", False),
                                     "logit_chunk": c.parallel.get("logit_chunk", 0)})
    TS.OBJECTIVES.get(lc.objective)  # an unknown algo fails here, not at trace time
    ac = AdvantageConfig(group_size=A, gamma=float(c.loss.get("gamma", 1.0)),
                         lam=float(c.loss.get("gae_lambda", 0.95)),
                         whiten=bool(c.loss.get("whiten_advantages", True)))
    lora_cfg = c.get("lora") or {}
    rank = int(lora_cfg.get("rank", 0) or 0)
    optimizer = TS.make_optimizer(
        c.optim.learning_rate,
        critic_learning_rate=c.optim.critic_learning_rate if est.needs_values else None,
        warmup_steps=c.optim.warmup_steps, weight_decay=c.optim.weight_decay,
        b1=c.optim.b1, b2=c.optim.b2, max_grad_norm=c.loss.max_grad_norm, lora=rank > 0)
    return StepParts(lc, sc, ac, optimizer, rank, float(lora_cfg.get("alpha", 16.0)),
                     tuple(lora_cfg.get("targets", ())))


def make_train_step(config, policy_config, *, layout: StepLayout | None = None,
                    log: Callable[[str], None] = print) -> TrainStep:
    """The train step of a run config (``algo``, ``rollout``, ``loss``, ``optim``, ``lora``,
    ``parallel``, ``seed``) for a model of ``policy_config``; call ``.init(policy)`` for the
    :class:`RunnerState`, then ``step(runner, arrays)`` once per rollout. ``layout``: the
    task's rows when they are not ``prompts_per_step x group_size`` (:class:`StepLayout`).

    Batch sizes are checked up front (:func:`step_parts`; and a micro-batch splits over the
    devices the batch is split over).
    """
    c = config
    n_all = c.parallel.num_devices or jax.device_count()
    mesh = parallel.make_mesh(n_all, parallel.mesh_shape_from_config(c.parallel, n_all))
    parts = step_parts(c, layout)
    mb, n_dev = parts.sc.microbatch_prompts, parallel.batch_devices(mesh)
    if parts.sc.prompts % mb or mb % n_dev:
        raise ConfigError(f"prompts_per_step {parts.sc.prompts} must split into micro-batches of "
                          f"{mb} prompts, each divisible by the {n_dev} devices the batch is "
                          f"split over (mesh {parallel.mesh_shape(mesh)})")
    return TrainStep(policy_config, mesh, parts, int(c.seed), log=log)
