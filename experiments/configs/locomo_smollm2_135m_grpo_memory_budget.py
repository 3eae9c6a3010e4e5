"""GRPO for the Memory Manager under a memory budget (issue 20): episodes of sessions at 32
memories per speaker, embedded SmolLM2-135M-Instruct, sized for a 2-core CPU.

    python experiments/grpo_memory.py \
        --config=experiments/configs/locomo_smollm2_135m_grpo_memory_budget.py \
        --config.answer.checkpoint=runs/grpo_answer/best --workdir=runs/grpo_memory_budget

The task is :mod:`mr1.rl.episode_task`: an episode is one session of ``conv-26`` replayed from
the banks after the sessions before it (built by ``episode.snapshot_manager`` at the budget);
``G`` op sequences from that snapshot, each applied to its own copy of the banks through the
jittable env; the reward is the frozen Answer Agent's EM + F1 on the questions whose evidence
lies at or before the session (those inside it first), answered from each copy, minus a penalty
for a refused op (an ADD into a bank that filled during the session). The manager sees how full
its bank is and answers with one op word; when its bank is full at the session's start it
chooses among UPDATE (merge into the most similar memory), DELETE and NONE, since the env
would refuse an ADD (the ``"op_budget_mask"`` form; ``"op_budget"`` offers ADD there too).
Validation builds the whole ``conv-30`` banks with greedy ops from empty banks, as evaluation
does, and answers 40 of its questions. Runs and figures: ``docs/memory_capacity.md``.
"""

import pathlib
import runpy

import ml_collections

_base = runpy.run_path(str(pathlib.Path(__file__).with_name("locomo_smollm2_135m_grpo_memory.py")))


def get_config():
    c = _base["get_config"]()
    c.num_steps = 20                    # 20 episodes (the 19 conv-26 sessions, ~1 pass)
    c.rollout.prompts_per_step = 1      # episodes (windows) per step
    c.rollout.group_size = 8            # G op sequences per episode
    c.rollout.microbatch_prompts = 2    # facts per gradient micro-batch (x G op words: 16 rows;
                                        # with window_sessions > 1 it counts rows: use 16)
    c.loss.normalize_std = False        # Dr. GRPO over the G episode rewards

    c.memory.num_slots = 32             # the budget: memories per speaker
    c.memory.full_policy = "refuse"     # an ADD into a full bank is refused (and penalised)
    c.memory.manager_format = "op_budget_mask"  # one op word; the prompt says how full the
                                        # bank is, and a full bank's fact cannot choose ADD
                                        # (UPDATE / DELETE / NONE: the env would refuse it)
    c.memory.retrieve_k = 5

    c.manager.task = "episodes"         # mr1.rl.episode_task.MANAGER_TASKS

    c.episode = ml_collections.ConfigDict()
    c.episode.window_sessions = 1       # sessions per episode (a curriculum may grow it)
    c.episode.min_start = 0             # first window start (session position)
    c.episode.max_facts = 16            # fact slots per episode in the update (conv-26's
                                        # sessions have at most 14 facts; more is an error)
    c.episode.snapshot_manager = "add_all"  # rule manager building the banks before a window
    c.episode.max_questions = 8         # questions answered per episode copy (in-window first)
    c.episode.sample_batch = 32         # sampled rows per sampler call (>= 8 prompts)

    c.reward.turn = 0.0                 # > 0: the paper's per-turn reward (questions linked to
                                        # a fact's turn, answered after its session) added
    c.reward.invalid_penalty = 0.1      # a malformed op or one the bank refused

    c.eval.every = 5
    c.eval.num_questions = 40           # conv-30 questions answered after the greedy build
    c.eval.max_conversations = 1
    del c.eval.num_samples
    return c
