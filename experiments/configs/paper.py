"""The paper's runs: one config per benchmark x backbone x algorithm (x agent for training).

    # train (LoCoMo conv-26, validate on conv-30)
    python experiments/grpo_answer.py \
        --config=experiments/configs/paper.py:locomo_train,qwen2.5-7b,grpo,answer \
        --config.model=/ckpt/Qwen2.5-7B-Instruct --workdir=gs://bucket/runs/qwen2.5-7b_grpo_answer
    python experiments/grpo_memory.py \
        --config=experiments/configs/paper.py:locomo_train,qwen2.5-7b,grpo,memory ...
    # evaluate (LoCoMo test split; MSC and LongMemEval zero-shot with the LoCoMo-trained agents)
    python experiments/evaluate.py \
        --config=experiments/configs/paper.py:locomo_eval,qwen2.5-7b,grpo --workdir=...

The spec is ``BENCHMARK,BACKBONE,ALGO[,AGENT]``: benchmarks :data:`BENCHMARKS`, backbones
:data:`BACKBONES`, algorithms ``grpo`` / ``ppo`` (and ``base``, the untrained model, for the
evaluation benchmarks), agents ``answer`` / ``memory`` (training only). :func:`all_specs` lists
every valid spec; ``experiments/plan.py --config=...`` prints each one's per-device memory.

Settings the paper gives (Memory-R1, §4 / appendix; DESIGN.md §1): global batch 128 prompts,
prompt 4096 / response 2048 tokens, actor lr 1e-6, critic lr 1e-5, rollouts at temperature 1.0,
greedy evaluation, EM reward, 60 retrieved memories (30 per speaker), 4 x H100 (8 for 14B).
Choices where it is silent (documented per field): G = 8 samples per prompt (MemFactory), KL
beta 0.01 with the k3 estimator (VERL's low-variance KL), clip eps 0.2 both sides, 50 steps
(~42 passes over the 152 QAs), validation every 5 steps with the best kept, float32 master
weights with bfloat16 compute, per-layer remat, FSDP over every device of one host.

Checkpoints are HF folders the user downloads (``config.json``, ``*.safetensors``, tokenizer):
``--config.model=DIR``, or put them under ``$MR1_CHECKPOINT_DIR`` with the folder names below.
The embedded SmolLM2-135M row needs nothing (it is the CPU default, ``locomo_smollm2_135m_*``).
"""

from __future__ import annotations

import os
import pathlib
import runpy

import ml_collections

_HERE = pathlib.Path(__file__).parent
_train_answer = runpy.run_path(str(_HERE / "locomo_smollm2_135m_grpo.py"))["get_config"]
_train_memory = runpy.run_path(str(_HERE / "locomo_smollm2_135m_grpo_memory.py"))["get_config"]
_evaluate = runpy.run_path(str(_HERE / "evaluate_locomo_smollm2.py"))["get_config"]

# backbone -> (ModelConfig preset, HF repository, folder name, devices, mesh (data, fsdp, tp),
#              accelerator the paper used)
BACKBONES = {
    "smollm2-135m": ("smollm2-135m", "HuggingFaceTB/SmolLM2-135M-Instruct", "", 1, (1, 1, 1),
                     "h100-80gb"),  # the paper's settings on one GPU (CPU: locomo_smollm2_*)
    "qwen2.5-3b": ("qwen2.5-3b", "Qwen/Qwen2.5-3B-Instruct", "Qwen2.5-3B-Instruct", 4,
                   (1, -1, 1), "h100-80gb"),
    "qwen2.5-7b": ("qwen2.5-7b", "Qwen/Qwen2.5-7B-Instruct", "Qwen2.5-7B-Instruct", 4,
                   (1, -1, 1), "h100-80gb"),
    "llama-3.1-8b": ("llama-3.1-8b", "meta-llama/Llama-3.1-8B-Instruct",
                     "Llama-3.1-8B-Instruct", 4, (1, -1, 1), "h100-80gb"),
    "qwen2.5-14b": ("qwen2.5-14b", "Qwen/Qwen2.5-14B-Instruct", "Qwen2.5-14B-Instruct", 8,
                    (1, -1, 1), "h100-80gb"),
}
BENCHMARKS = ("locomo_train", "locomo_eval", "msc_eval", "longmemeval_eval")
TRAIN_ALGOS = ("grpo", "ppo")
EVAL_ALGOS = ("base", "grpo", "ppo")
AGENTS = ("answer", "memory")

PROMPT_TOKENS, RESPONSE_TOKENS = 4096, 2048  # the paper's maxima
GLOBAL_BATCH = 128                           # prompts per update (paper)


def all_specs() -> list[str]:
    """Every valid ``BENCHMARK,BACKBONE,ALGO[,AGENT]``."""
    out = []
    for bench in BENCHMARKS:
        for backbone in BACKBONES:
            if bench == "locomo_train":
                out += [f"{bench},{backbone},{a},{g}" for a in TRAIN_ALGOS for g in AGENTS]
            else:
                out += [f"{bench},{backbone},{a}" for a in EVAL_ALGOS]
    return out


def parse_spec(spec: str) -> tuple[str, str, str, str]:
    """``(benchmark, backbone, algo, agent)`` of a spec (agent "" for evaluation)."""
    parts = [p.strip() for p in (spec or "").split(",")]
    if ",".join(parts) not in all_specs():
        raise ValueError(
            f"bad paper config spec {spec!r}: expected BENCHMARK,BACKBONE,ALGO[,AGENT] with "
            f"BENCHMARK in {BENCHMARKS}, BACKBONE in {tuple(BACKBONES)}, ALGO in "
            f"{TRAIN_ALGOS} (training) / {EVAL_ALGOS} (evaluation), AGENT in {AGENTS} "
            "(locomo_train only); e.g. 'locomo_train,qwen2.5-7b,grpo,answer'")
    return parts[0], parts[1], parts[2], parts[3] if len(parts) == 4 else ""


def model_path(backbone: str) -> str:
    """The backbone's checkpoint: the embedded GGUF, or ``$MR1_CHECKPOINT_DIR/<folder>``."""
    folder = BACKBONES[backbone][2]
    if not folder:
        return "smollm2-135m-instruct"
    return os.path.join(os.environ.get("MR1_CHECKPOINT_DIR", "checkpoints"), folder)


def run_name(backbone: str, algo: str, agent: str) -> str:
    return f"{backbone}_{algo}_{agent}"


def _common(c, backbone: str, spec: str):
    preset, repo, _, devices, mesh, accel = BACKBONES[backbone]
    c.spec = spec                       # this config's paper.py spec
    c.model = model_path(backbone)      # HF folder (download `repo`; --config.model=DIR)
    c.model_preset = preset             # ModelConfig preset: shapes for plan.py / compile checks
    c.hf_repo = repo                    # where to download the weights from (by hand)
    big = backbone != "smollm2-135m"
    c.param_dtype = "float32"           # master weights (Adam updates them)
    c.compute_dtype = "bfloat16" if big else ""  # activations and matmuls ("" = the params')
    c.matmul_precision = ""             # float32 matmuls: "" = the backend's (TF32 on GPUs),
                                        # "highest" = true float32 (ModelConfig.matmul_precision)
    c.attention_impl = "xla"            # decode-step attention: "xla" | "pallas" (GPU kernel)
    c.decode_unroll = 1                 # layers per decode-step loop iteration (num_layers: none)
    c.plan = ml_collections.ConfigDict()
    c.plan.num_devices = devices        # the paper's: 4 x H100 (8 for 14B)
    c.plan.accelerator = accel          # plan.py: does it fit this device's memory?
    c.plan.prompt_tokens = PROMPT_TOKENS    # shapes of the planner and compile check
    c.plan.response_tokens = RESPONSE_TOKENS
    c.plan.mesh = mesh                  # (data, fsdp, tp) on plan.num_devices


def _train(backbone: str, algo: str, agent: str, spec: str):
    c = _train_answer() if agent == "answer" else _train_memory()
    _common(c, backbone, spec)
    c.algo = algo
    c.num_steps = 50                    # unreported: ~42 passes over the 152 QAs at 128 / step
    c.memory.facts = "llm"              # the paper's pipeline: LLM-extracted facts ...
    c.memory.manager = "llm"            # ... and the prompted Memory Manager build the banks
    c.memory.manager_format = "json"    # the paper's JSON ops
    c.memory.num_slots = 2048           # per speaker (a LoCoMo conversation has ~600 turns)
    c.memory.max_len = 64
    c.answer.top_k = 30                 # 2 x 30 = 60 memories (paper)
    c.answer.max_new_tokens = RESPONSE_TOKENS
    c.rollout.prompts_per_step = GLOBAL_BATCH
    c.rollout.group_size = 8            # unreported; MemFactory's 8
    c.rollout.temperature = 1.0
    c.rollout.microbatch_prompts = c.plan.num_devices  # one group (8 rows) per device per pass
    c.rollout.prompts_per_call = 4 * c.plan.num_devices  # 4 prompts (32 rows) per device per
                                        # sampler call: bounds the rollout KV cache
    for k in list(c.reward.keys()):
        if k not in ("answer", "invalid_penalty"):
            c.reward[k] = 0.0
    if agent == "answer":
        c.reward.em = 1.0               # the paper's reward: exact match only
    else:
        c.memory.manager_format = "json"
        c.memory.retrieve_k = 10        # Mem0's 10 related memories per fact
        c.manager.max_new_tokens = RESPONSE_TOKENS
        c.reward.answer.em = 1.0        # EM of the frozen Answer Agent after the op
        c.reward.answer.f1 = 0.0
        c.reward.invalid_penalty = 0.0
        c.answer.checkpoint = ""        # the frozen Answer Agent: the base model (paper)
    c.loss.clip_eps_low = 0.2           # unreported; the PPO default both sides
    c.loss.clip_eps_high = 0.2
    c.loss.kl_beta = 0.01               # unreported (0.01-0.04 common); k3 estimator
    c.loss.kl_estimator = "k3"
    c.loss.agg = "token_mean"
    c.optim.learning_rate = 1e-6        # actor (paper)
    c.optim.critic_learning_rate = 1e-5  # critic (paper); ours is a linear value head on the
                                        # policy's hidden states, not a second LLM
    c.optim.warmup_steps = 0
    c.eval.every = 5
    if agent == "answer":
        c.eval.num_questions = 0        # all 81 conv-30 QAs
    else:
        c.eval.num_samples = 0          # every conv-30 fact
    c.eval.batch_size = 32
    c.checkpoint_every = 5
    c.checkpoint_keep = 3
    c.parallel.num_devices = 0          # every device of the run
    c.parallel.mesh = c.plan.mesh       # FSDP over all devices (ZeRO-3, as VERL's FSDP)
    c.parallel.remat = True             # 6144-token sequences: keep only layer inputs,
    c.parallel.attention_chunk = 512    # attention over 512-query blocks (memory-efficient),
    c.parallel.logit_chunk = 256        # log-probs over 256-position blocks of the vocabulary
    c.parallel.shard_rollouts = True    # sample on the mesh, rows split over data x fsdp
    c.optim.epochs = 1                  # unreported: one update per rollout batch
    c.optim.minibatches = 1
    return c


def _eval(bench: str, backbone: str, algo: str, spec: str):
    c = _evaluate()
    _common(c, backbone, spec)
    c.algo = algo
    c.benchmark = bench.split("_")[0]   # locomo | msc | longmemeval (zero-shot)
    c.checkpoint = ("" if algo == "base" else
                    f"runs/{run_name(backbone, algo, 'answer')}/best")  # Answer Agent run
    c.memory.facts = "llm"
    c.memory.manager = "llm"
    c.memory.manager_format = "json"
    c.memory.manager_checkpoint = ("" if algo == "base" else
                                   f"runs/{run_name(backbone, algo, 'memory')}/best")
    c.memory.num_slots = 2048
    c.memory.retrieve_k = 10
    c.memory.manager_max_new_tokens = 512   # one JSON op list
    c.answer.top_k = 30                 # 60 memories
    c.answer.max_new_tokens = RESPONSE_TOKENS
    c.answer.batch_size = 32
    c.answer.temperature = 0.0          # greedy (paper)
    c.param_dtype = "bfloat16" if backbone != "smollm2-135m" else "float32"  # no optimizer
    c.plan.mesh = (1, 1, 1)             # evaluation runs on one device (bf16 weights fit)
    c.plan.num_devices = 1
    c.parallel = ml_collections.ConfigDict()
    c.parallel.attention_chunk = 512    # prefill of 4096-token prompts in 512-query blocks
    return c


def get_config(spec: str = "locomo_train,smollm2-135m,grpo,answer"):
    bench, backbone, algo, agent = parse_spec(spec)
    if bench == "locomo_train":
        return _train(backbone, algo, agent, spec)
    return _eval(bench, backbone, algo, spec)
