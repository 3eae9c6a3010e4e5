"""The jitted policy-gradient update: train state, completion scoring, GRPO / PPO objectives.

One update consumes a :class:`RolloutBatch` of ``P`` prompts x ``G`` samples laid out with a
leading micro-batch axis ``[M, ...]`` (``P = M * P_mb``) and runs ``lax.scan`` over the ``M``
micro-batches, accumulating gradients, so the global batch is independent of memory.

Scoring a micro-batch (:func:`score_completions`) never runs the prompt once per sample: the
prompt is encoded once per group and its keys/values are a prefix the ``G`` completions attend
(the sampler's layout, so gradients flow into the prompt encoding exactly as a full forward
would), and the LM head is applied only at the ``T_c`` completion positions. Log-probs are
float32 from ``logits[token] - logsumexp(logits)``.

Objectives are registered by name (:data:`OBJECTIVES`): ``"grpo"`` (sequence advantages, KL to a
frozen reference) and ``"ppo"`` (per-token GAE advantages, a value head on the policy's
stop-gradient hidden states: a linear critic with its own learning rate). Each returns
``(loss, aux)`` for one micro-batch; the micro-batch loss is weighted by its share of the
global aggregation count (tokens for ``token_mean``, rows otherwise), so M micro-batches of any
size give the gradient of the global-batch loss.

A loss or gradient that is NaN/inf skips the update inside the jitted step (params and
optimizer state kept, ``skipped = 1`` in the metrics), so a bad batch never reaches a
checkpoint.

Sharding: :func:`make_update` jits with ``in_shardings`` over a named mesh — batch arrays split
over the ``"data"`` axis on their per-micro-batch axis, params replicated or FSDP-sharded
(:func:`mr1.parallel.param_shardings`); XLA inserts the gradient all-reduce. The same code runs
on 1 device, N devices and several processes.

LoRA (:mod:`mr1.models.lora`): the trainable ``params`` hold ``{"lora": ..., ["value_head"]}``
instead of ``"policy"``, and the frozen base params are an extra, never-donated argument of the
jitted update and scoring (``frozen``); :func:`policy_params` merges them into the policy the
loss sees. Gradients, accumulators and optimizer state then cover the adapters only.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

from mr1.models import transformer
from mr1.models.config import ModelConfig
from mr1.models.lora import merge_lora
from mr1.models.transformer import KVCache
from mr1.parallel import activation_mesh
from mr1.registry import Registry
from mr1.rl import losses as L

__all__ = ["TrainState", "RolloutBatch", "LossConfig", "OBJECTIVES", "register_objective",
           "score_completions", "make_optimizer", "init_train_state", "make_update",
           "update_step", "optimizer_step",
           "make_score", "init_value_head", "split_microbatches", "policy_params"]


@flax.struct.dataclass
class TrainState:
    """Everything an update changes. ``params = {"policy": ..., ["value_head": ...]}``, or with
    LoRA ``{"lora": ..., ["value_head": ...]}`` (the base params are not part of the state)."""

    step: jax.Array
    params: Any
    opt_state: Any
    rng: jax.Array  # raw uint32 PRNG key


@flax.struct.dataclass
class RolloutBatch:
    """One update's data. Leading axis ``M`` (micro-batches) on every field.

    prompt_ids / prompt_mask: ``[M, P, T_p]`` left-padded prompts (one row per group).
    tokens / completion_mask: ``[M, P*G, T_c]`` sampled completions (mask 1 on real tokens,
      the final EOS included).
    old_logp: ``[M, P*G, T_c]`` sampler log-probs (the old policy).
    ref_logp: ``[M, P*G, T_c]`` frozen-reference log-probs (zeros when KL is off).
    advantages: ``[M, P*G]`` (GRPO) or ``[M, P*G, T_c]`` (PPO).
    returns / old_values: ``[M, P*G, T_c]`` value targets and rollout values (PPO; else zeros).
    """

    prompt_ids: jax.Array
    prompt_mask: jax.Array
    tokens: jax.Array
    completion_mask: jax.Array
    old_logp: jax.Array
    ref_logp: jax.Array
    advantages: jax.Array
    returns: jax.Array
    old_values: jax.Array


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """Static loss knobs (hashable: one compile per distinct value)."""

    objective: str = "grpo"
    clip_eps_low: float = 0.2
    clip_eps_high: float = 0.28
    kl_beta: float = 0.0
    kl_estimator: str = "k3"
    agg: str = "token_mean"
    entropy_coef: float = 0.0
    vf_coef: float = 0.5
    vf_clip: float = 0.2
    max_grad_norm: float = 1.0
    remat: bool = False  # memory knobs, not loss terms: rematerialise each layer (backward);
    logit_chunk: int = 0  # LM head / log-probs over blocks of this many positions (0 = all)

    @classmethod
    def from_mapping(cls, m) -> "LossConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        items = dict(m.items()) if hasattr(m, "items") else dict(m)
        return cls(**{k: v for k, v in items.items() if k in names})


# ----------------------------------------------------------------------------- scoring

def policy_params(params: dict, frozen: Any = None, lora_scale: float = 1.0) -> Any:
    """The policy's parameter tree: ``params["policy"]``, or with LoRA (a ``"lora"`` entry) the
    frozen base ``frozen`` with the adapters merged in (:func:`mr1.models.lora.merge_lora`)."""
    if "lora" not in params:
        return params["policy"]
    if frozen is None:
        raise ValueError("LoRA params need the frozen base params (the `frozen` argument)")
    return merge_lora(frozen, params["lora"], lora_scale)


def init_value_head(cfg: ModelConfig) -> dict:
    """A zero-initialised linear value head ``{"w": [D], "b": []}`` (starts predicting 0)."""
    return {"w": jnp.zeros((cfg.hidden_size,), jnp.float32), "b": jnp.zeros((), jnp.float32)}


def score_completions(params: dict, cfg: ModelConfig, prompt_ids, prompt_mask, tokens,
                      completion_mask, *, value_head: dict | None = None,
                      with_entropy: bool = False, remat: bool = False,
                      logit_chunk: int = 0) -> dict[str, jax.Array]:
    """Per-token log-probs (and values / entropies) of completions under ``params``.

    Args:
      params: policy parameter tree.
      prompt_ids, prompt_mask: ``[P, T_p]`` left-padded prompts.
      tokens, completion_mask: ``[P*G, T_c]``; rows ``g*G .. g*G+G-1`` continue prompt ``g``.
      value_head: optional ``{"w", "b"}`` applied to stop-gradient hidden states.
      with_entropy: also return token entropies (costs a softmax over the vocabulary).
      remat: rematerialise each decoder layer in the backward pass (activation memory).
      logit_chunk: > 0: the LM head, log-probs and entropies over blocks of this many
        completion positions, each recomputed in the backward pass, so the float32
        ``[rows, T_c, V]`` logits never exist at once (``T_c`` divisible by it).

    Returns:
      ``{"logp": [P*G, T_c]}`` float32, plus ``"values"`` and ``"entropy"`` when asked.
    """
    p_rows = prompt_ids.shape[0]
    b, t_c = tokens.shape
    g = b // p_rows
    pm = prompt_mask.astype(jnp.int32)
    hidden_p, kv = transformer.forward(params, cfg, prompt_ids,
                                       transformer.padding_positions(pm),
                                       transformer.causal_mask(pm), remat=remat)
    prefix = KVCache(k=kv[0], v=kv[1])
    cm = completion_mask.astype(bool)
    start = jnp.repeat(jnp.sum(pm, axis=-1), g, axis=0)
    positions = (start[:, None] + jnp.arange(t_c)[None, :]).astype(jnp.int32)
    causal = jnp.tril(jnp.ones((t_c, t_c), bool))
    mask = causal[None] & cm[:, None, :]
    hidden_c, _ = transformer.forward(params, cfg, tokens, positions, mask,
                                      prefix=prefix, prefix_mask=pm.astype(bool), remat=remat)
    # token t is predicted from the hidden state before it: the prompt's last for t = 0
    h = jnp.concatenate([jnp.repeat(hidden_p[:, -1:], g, axis=0), hidden_c[:, :-1]], axis=1)
    out = _token_stats(params, cfg, h, tokens, cm, with_entropy, logit_chunk)
    if value_head is not None:
        hs = jax.lax.stop_gradient(h).astype(jnp.float32)
        out["values"] = hs @ value_head["w"] + value_head["b"]
    return out


def _token_stats(params, cfg, h, tokens, cm, with_entropy: bool, chunk: int) -> dict:
    """Log-probs (and entropies) of ``tokens`` from hidden states ``h [B, T, D]``."""
    def stats(hc, tc, mc):
        logits = transformer.logits_from_hidden(params, cfg, hc)
        out = {"logp": L.token_logprobs(logits, tc)}
        if with_entropy:
            out["entropy"] = L.entropy_from_logits(logits, mc)
        return out

    b, t = tokens.shape
    if not chunk or t <= chunk or t % chunk:
        return stats(h, tokens, cm)
    n = t // chunk
    blocks = lambda x: jnp.moveaxis(x.reshape(b, n, chunk, *x.shape[2:]), 1, 0)  # noqa: E731
    out = jax.lax.map(jax.checkpoint(lambda a: stats(*a)), (blocks(h), blocks(tokens),
                                                            blocks(cm)))
    return jax.tree.map(lambda x: jnp.moveaxis(x, 0, 1).reshape(b, t), out)


# ----------------------------------------------------------------------------- objectives

Objective = Callable[[dict, RolloutBatch, LossConfig], tuple[jax.Array, dict]]
OBJECTIVES = Registry("objective")
register_objective = OBJECTIVES.register  # decorator: @register_objective("name")


@register_objective("grpo")
def grpo_objective(scored: dict, mb: RolloutBatch, lc: LossConfig):
    ref = mb.ref_logp if lc.kl_beta > 0 else None
    return L.grpo_loss(scored["logp"], mb.old_logp, ref, mb.advantages, mb.completion_mask,
                       clip_eps_low=lc.clip_eps_low, clip_eps_high=lc.clip_eps_high,
                       kl_beta=lc.kl_beta, kl_estimator=lc.kl_estimator, agg=lc.agg)


@register_objective("ppo")
def ppo_objective(scored: dict, mb: RolloutBatch, lc: LossConfig):
    ref = mb.ref_logp if lc.kl_beta > 0 else None
    actor, aux = L.ppo_actor_loss(scored["logp"], mb.old_logp, mb.advantages, mb.completion_mask,
                                  clip_eps_low=lc.clip_eps_low, clip_eps_high=lc.clip_eps_high,
                                  entropy=scored.get("entropy"), entropy_coef=lc.entropy_coef,
                                  ref_logp=ref, kl_beta=lc.kl_beta,
                                  kl_estimator=lc.kl_estimator, agg=lc.agg)
    vloss, vaux = L.ppo_value_loss(scored["values"], mb.old_values, mb.returns,
                                   mb.completion_mask, lc.vf_clip, agg=lc.agg)
    aux = {**aux, **vaux, "vf_loss": vloss, "actor_loss": actor}
    return actor + lc.vf_coef * vloss, aux


# ----------------------------------------------------------------------------- optimizer / state

def make_optimizer(learning_rate: float, *, critic_learning_rate: float | None = None,
                   warmup_steps: int = 0, weight_decay: float = 0.0, b1: float = 0.9,
                   b2: float = 0.99, max_grad_norm: float = 1.0,
                   lora: bool = False) -> optax.GradientTransformation:
    """AdamW on ``params["policy"]`` (linear warm-up), its own LR on ``params["value_head"]``.

    With ``lora`` the actor part is ``params["lora"]`` (same learning rate and schedule).
    Gradients are clipped by global norm (over both parts) before Adam.
    """
    def adam(lr):
        sched = (optax.linear_schedule(0.0, lr, warmup_steps) if warmup_steps > 0 else lr)
        return optax.adamw(sched, b1=b1, b2=b2, weight_decay=weight_decay)

    parts = {"lora" if lora else "policy": adam(learning_rate)}
    if critic_learning_rate is not None:
        parts["value_head"] = adam(critic_learning_rate)
    labels = lambda params: {k: jax.tree.map(lambda _: k, v) for k, v in params.items()}  # noqa: E731
    return optax.chain(optax.clip_by_global_norm(max_grad_norm),
                       optax.multi_transform(parts, labels))


def init_train_state(params: dict, optimizer: optax.GradientTransformation, seed: int
                     ) -> TrainState:
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      opt_state=optimizer.init(params), rng=jax.random.PRNGKey(seed))


# ----------------------------------------------------------------------------- the update

def _agg_count(mask: jax.Array, agg: str) -> jax.Array:
    m = mask.astype(jnp.float32)
    return m.sum() if agg == "token_mean" else (m.sum(-1) > 0).astype(jnp.float32).sum()


def _is_finite_tree(tree) -> jax.Array:
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.bool_(True)


def update_step(state: TrainState, batch: RolloutBatch, *, cfg: ModelConfig, lc: LossConfig,
                optimizer: optax.GradientTransformation, frozen: Any = None,
                lora_scale: float = 1.0) -> tuple[TrainState, dict]:
    """One optimizer step over all micro-batches (pure; :func:`make_update` jits it); the
    state's ``step`` counts it.

    ``frozen``: the base policy params when ``state.params`` holds LoRA adapters (no gradient).
    """
    new_state, metrics = optimizer_step(state, batch, cfg=cfg, lc=lc, optimizer=optimizer,
                                        frozen=frozen, lora_scale=lora_scale)
    return new_state.replace(step=state.step + 1), metrics


def optimizer_step(state: TrainState, batch: RolloutBatch, *, cfg: ModelConfig, lc: LossConfig,
                   optimizer: optax.GradientTransformation, frozen: Any = None,
                   lora_scale: float = 1.0) -> tuple[TrainState, dict]:
    """The gradient of ``batch`` (``[M, ...]``: accumulated over its ``M`` micro-batches by
    ``lax.scan``) applied once: new params and optimizer state (``state.step`` unchanged), and
    ``loss``, ``grad_norm``, ``skipped`` and the objective's aux metrics.

    A non-finite loss, gradient or metric keeps params and optimizer state (``skipped = 1``).
    """
    objective = OBJECTIVES.get(lc.objective)
    total = jnp.maximum(_agg_count(batch.completion_mask, lc.agg), 1.0)

    def mb_loss(params, mb):
        scored = score_completions(policy_params(params, frozen, lora_scale), cfg,
                                   mb.prompt_ids, mb.prompt_mask, mb.tokens, mb.completion_mask,
                                   value_head=params.get("value_head"),
                                   with_entropy=lc.entropy_coef > 0, remat=lc.remat,
                                   logit_chunk=lc.logit_chunk)
        loss, aux = objective(scored, mb, lc)
        w = _agg_count(mb.completion_mask, lc.agg) / total
        return loss * w, {k: v * w for k, v in aux.items()}

    grad_fn = jax.value_and_grad(mb_loss, has_aux=True)

    def body(carry, mb):
        loss_acc, aux_acc, g_acc = carry
        (loss, aux), g = grad_fn(state.params, mb)
        add = lambda a, b: jax.tree.map(jnp.add, a, b)  # noqa: E731
        return (loss_acc + loss, add(aux_acc, aux), add(g_acc, g)), None

    first = jax.tree.map(lambda x: x[0], batch)
    aux0 = jax.eval_shape(lambda: mb_loss(state.params, first)[1])
    zeros = lambda t: jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), t)  # noqa: E731
    carry0 = (jnp.zeros((), jnp.float32), zeros(aux0),
              jax.tree.map(jnp.zeros_like, state.params))
    (loss, aux, grads), _ = jax.lax.scan(body, carry0, batch)

    grad_norm = optax.tree.norm(grads)
    ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & _is_finite_tree(aux)
    # zero non-finite grads before the optimizer so its arithmetic stays finite either way
    safe_grads = jax.tree.map(lambda g: jnp.where(ok, g, 0.0), grads)
    updates, new_opt = optimizer.update(safe_grads, state.opt_state, state.params)
    new_params = optax.apply_updates(state.params, updates)
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)  # noqa: E731
    new_state = state.replace(params=keep(new_params, state.params),
                              opt_state=keep(new_opt, state.opt_state))
    metrics = {"loss": loss, "grad_norm": grad_norm,
               "skipped": 1.0 - ok.astype(jnp.float32), **aux}
    return new_state, metrics


def make_update(cfg: ModelConfig, lc: LossConfig, optimizer: optax.GradientTransformation,
                mesh=None, state_sharding=None, *, lora_scale: float | None = None,
                frozen_sharding=None) -> Callable:
    """``jit(update_step)``; with a mesh, batch split over ``"data"``, state per ``state_sharding``.

    The state is donated (its buffers reused for the new state). With ``lora_scale`` (LoRA
    params in the state) the function is ``(state, batch, frozen)``: ``frozen`` the base policy
    params, laid out per ``frozen_sharding`` (default replicated) and never donated.
    """
    kw = dict(cfg=cfg, lc=lc, optimizer=optimizer)

    def fn(state, batch, frozen=None):
        with activation_mesh(mesh):  # activations keep the batch layout (mr1.parallel)
            if lora_scale is None:
                return update_step(state, batch, **kw)
            return update_step(state, batch, frozen=frozen, lora_scale=float(lora_scale), **kw)

    if mesh is None:
        return jax.jit(fn, donate_argnums=0)
    from mr1.parallel import batch_sharding, replicated

    in_shardings = (state_sharding, batch_sharding(mesh, microbatched=True))
    if lora_scale is not None:
        in_shardings += (replicated(mesh) if frozen_sharding is None else frozen_sharding,)
    return jax.jit(fn, in_shardings=in_shardings,
                   out_shardings=(state_sharding, replicated(mesh)), donate_argnums=0)


def make_score(cfg: ModelConfig, *, with_values: bool = False,
               lora_scale: float = 1.0, mesh=None, lc: LossConfig | None = None) -> Callable:
    """Jitted ``(params, batch[, frozen]) -> {"logp", ["values"]}`` over all micro-batches (no
    grad): reference log-probs (reference params) and rollout values (PPO). ``frozen`` (the base
    params) is needed when ``params`` holds LoRA adapters (:func:`policy_params`)."""

    lc = lc or LossConfig()

    def fn(params, batch: RolloutBatch, frozen=None):
        policy = policy_params(params, frozen, lora_scale)  # merged once, not per micro-batch

        def one(mb):
            return score_completions(policy, cfg, mb.prompt_ids, mb.prompt_mask, mb.tokens,
                                     mb.completion_mask,
                                     value_head=params.get("value_head") if with_values else None,
                                     logit_chunk=lc.logit_chunk)
        with activation_mesh(mesh):
            return jax.lax.map(one, batch)

    return jax.jit(fn)


def split_microbatches(arrays: dict[str, np.ndarray], num_prompts: int, group_size: int,
                       microbatch_prompts: int, *, fill: bool = True) -> RolloutBatch:
    """Host arrays of the global batch → :class:`RolloutBatch` with a leading micro-batch axis.

    ``arrays`` holds prompt-level ``prompt_ids``/``prompt_mask`` ``[P, T_p]`` and sample-level
    fields ``[P*G, ...]``; missing optional fields (``ref_logp``, ``returns``, ``old_values``)
    become zeros, or with ``fill=False`` None (the train step of :mod:`mr1.rl.runner` computes
    them on device, so they are never sent).
    """
    if num_prompts % microbatch_prompts:
        raise ValueError(f"{num_prompts} prompts per step not divisible by micro-batch "
                         f"{microbatch_prompts}")
    m = num_prompts // microbatch_prompts
    n = num_prompts * group_size
    tc = arrays["tokens"].shape[1]
    zeros = np.zeros((n, tc), np.float32)
    fields = {}
    for f in dataclasses.fields(RolloutBatch):
        x = arrays.get(f.name)
        if x is None and not fill:
            fields[f.name] = None
            continue
        if x is None:
            x = zeros
        x = np.asarray(x)
        lead = num_prompts if f.name.startswith("prompt_") else n
        if x.shape[0] != lead:
            raise ValueError(f"{f.name}: leading dim {x.shape[0]}, expected {lead}")
        fields[f.name] = x.reshape(m, lead // m, *x.shape[1:])
    return RolloutBatch(**fields)
