"""Memory under a budget (issue 20): each Memory Manager baseline at ``memory.num_slots``
memories per speaker, the baseline picked by the config string (``path:baseline``):

    python experiments/evaluate.py \
        --config=experiments/configs/evaluate_locomo_capacity.py:add_all_refuse \
        --workdir=runs/cap32/add_all_refuse
    python experiments/evaluate.py \
        --config=experiments/configs/evaluate_locomo_capacity.py:skip_similar \
        --config.memory.num_slots=16 --workdir=runs/cap16/skip_similar

Baselines (:data:`BASELINES`; the managers are :data:`mr1.memory.managers.MANAGERS`):

* ``add_all_refuse`` / ``add_all_lru`` / ``add_all_fifo`` -- every fact ADDed; a full bank
  refuses the ADD, or evicts the least recently updated / the oldest memory;
* ``merge_similar`` -- ADD while there is room, then merge each fact into its most similar
  memory (UPDATE ``"<memory>; <fact>"``);
* ``skip_similar`` -- NOOP when the nearest memory's cosine is ``>= memory.skip_tau`` (0.75:
  on the train conversation conv-26 about half of the facts have an earlier fact of their
  speaker that close), else ADD (refused when full);
* ``prompted`` -- the embedded model as the Memory Manager (the ablation grid's ``json_op``
  prompt; ``--config.memory.manager_checkpoint=runs/grpo_memory/best`` for the RL manager);
* ``prompted_budget`` -- the embedded model with the ``op_budget`` prompt (one op word; the
  prompt says how full the bank is);
* ``prompted_budget_mask`` -- the same, but a fact whose bank is full at the session's start
  chooses among UPDATE / DELETE / NONE only (``op_budget_mask``, the form the episode task
  trains): the RL manager of ``mr1.rl.episode_task`` with
  ``--config.memory.manager_checkpoint=runs/grpo_memory_budget/best``;
* ``oracle`` -- ADD only the facts whose evidence turns are gold evidence for some question of
  the conversation: an upper bound that reads the answers' evidence (reported, never trained
  on).

Every build counts full-bank refusals, evictions and truncated texts (``results.md``,
``results.json``'s ``memory_ops``, ``<memory dir>/manifest.json``), and the memory dir's
identity includes the budget, so banks of another ``num_slots`` / ``full_policy`` /
``max_len`` / ``max_sessions`` are never resumed. Questions and prompts are those of
``evaluate_locomo_memory_ablation.py`` (16 seeded questions per test conversation, 2 x 5
memories, 32 new tokens); ``--config.max_questions_per_conversation=0`` answers all 1,307.
"""

import pathlib
import runpy

_base = runpy.run_path(str(pathlib.Path(__file__).with_name(
    "evaluate_locomo_memory_ablation.py")))

#: baseline name -> overrides of the base config (dotted keys); one line each.
BASELINES = {
    "add_all_refuse": {"memory.manager": "add_all", "memory.full_policy": "refuse"},
    "add_all_lru": {"memory.manager": "add_all", "memory.full_policy": "evict_lru"},
    "add_all_fifo": {"memory.manager": "add_all", "memory.full_policy": "evict_fifo"},
    "merge_similar": {"memory.manager": "merge_similar", "memory.full_policy": "refuse"},
    "skip_similar": {"memory.manager": "skip_similar", "memory.full_policy": "refuse"},
    "prompted": {"memory.manager": "llm", "memory.full_policy": "refuse"},
    # the prompt that says how full the bank is; ADD stays on offer when it is full
    "prompted_budget": {"memory.manager": "llm", "memory.manager_format": "op_budget",
                        "memory.full_policy": "refuse"},
    # the same, a full bank's fact choosing among UPDATE / DELETE / NONE (the budget config's
    # form): the untrained row, and the RL manager's with --config.memory.manager_checkpoint
    "prompted_budget_mask": {"memory.manager": "llm", "memory.manager_format": "op_budget_mask",
                             "memory.full_policy": "refuse"},
    "oracle": {"memory.manager": "oracle", "memory.full_policy": "refuse"},
}


def get_config(baseline: str = "add_all_refuse"):
    if baseline not in BASELINES:
        raise ValueError(f"unknown baseline {baseline!r}; one of {sorted(BASELINES)}")
    c = _base["get_config"]()
    c.memory.num_slots = 32      # memories per speaker (the budget; 16 / 64 in the issue)
    c.memory.skip_tau = 0.75     # skip_similar's near-duplicate threshold (see above)
    c.update_from_flattened_dict(BASELINES[baseline])
    return c
