"""GRPO for the Memory Manager on LoCoMo, embedded SmolLM2-135M-Instruct, sized for a 2-core CPU.

    python experiments/grpo_memory.py \
        --config=experiments/configs/locomo_smollm2_135m_grpo_memory.py \
        --config.answer.checkpoint=runs/grpo_answer/best --workdir=runs/grpo_memory

Training data (mr1.rl.memory_task): every LoCoMo observation of ``conv-26`` whose turn is
evidence for a QA (104 facts linked to 121 QAs), each with the temporal bank of all preceding
turns; validation: the same on ``conv-30``. The manager gets the paper's JSON prompt with
``memory.retrieve_k`` related memories and its reply's op word is sampled from the four op
words (``memory.manager_format="json_op"``); ``G`` outputs per fact are applied to copies of
the bank and the frozen Answer Agent (``answer.checkpoint``; "" = the base model) answers
the linked QAs. CPU-scale choices (the paper's 8B setup in comments): the reward adds F1 to EM
(a 135M Answer Agent rarely hits EM; equal rewards give no gradient) and a small penalty for
malformed or refused ops; optimiser and loss settings are the Answer Agent's.
"""

import pathlib
import runpy

import ml_collections

_base = runpy.run_path(str(pathlib.Path(__file__).with_name("locomo_smollm2_135m_grpo.py")))


def get_config():
    c = _base["get_config"]()
    c.num_steps = 20                    # 20 x 4 = 80 facts (of the 104)
    c.rollout.prompts_per_step = 4      # facts per step (the answer config's default is 8)
    c.loss.normalize_std = True         # GRPO (r - mean) / std, as measured (docs/training.md)
    c.data = ml_collections.ConfigDict()
    c.data.max_train_samples = 0        # 0 = every training fact

    c.memory.retrieve_k = 5             # related memories shown to the manager (Mem0: 10)
    c.memory.manager_format = "json_op"  # the paper's JSON prompt, the reply forced to
                                        # '{"memory": [{"event": "' and the op word (ADD /
                                        # UPDATE / DELETE / NONE) constrained; UPDATE and DELETE
                                        # act on the most similar memory, UPDATE appends the
                                        # fact to it, ADD writes the fact. "json" (free JSON) or
                                        # "line": free text, which SmolLM2-135M sampled at T=1
                                        # almost never gets right; "op": one word after a short
                                        # prompt of its own (the untrained model ADDs every fact)

    c.manager = ml_collections.ConfigDict()
    c.manager.max_new_tokens = 64       # "json"/"line" reply budget (paper: 2048); "op": 1

    c.answer.checkpoint = ""            # frozen Answer Agent ("" = base model; e.g.
                                        # runs/grpo_answer/best)
    c.answer.batch_size = 16            # greedy answer prompts per generate call

    c.reward = ml_collections.ConfigDict()
    c.reward.answer = ml_collections.ConfigDict()  # mr1.rl.rewards terms on the frozen agent's
    c.reward.answer.em = 1.0            # answers to the linked QAs (paper: EM only)
    c.reward.answer.f1 = 1.0
    c.reward.invalid_penalty = 0.1      # malformed / refused op (applied as NOOP)

    c.eval.every = 5                    # validate every N steps (and at step 0 and the end)
    c.eval.num_samples = 32             # conv-30 facts used (0 = all 54)
    c.eval.batch_size = 16
    c.checkpoint_every = 5
    del c.eval.num_questions
    c.optim.epochs = 1                  # one update per rollout batch: the setting these runs
    c.optim.minibatches = 1             # were measured with (the Answer Agent's GRPO default
                                        # is 2 x 2)
    return c
