"""PPO for the Answer Agent on LoCoMo, embedded SmolLM2-135M-Instruct, sized for a 2-core CPU.

    python experiments/ppo_answer.py --config=experiments/configs/locomo_smollm2_135m_ppo.py \
        --workdir=runs/ppo_answer

The GRPO config with ``algo="ppo"``: per-token GAE advantages (gamma 1, lambda 0.95, whitened
over the batch) from a linear value head on the policy's stop-gradient hidden states (the
critic), trained at its own learning rate (``optim.critic_learning_rate``; the paper's 1e-6 /
1e-5 actor / critic split at 8B becomes 2e-5 / 1e-3 here: the head is a single linear layer
that starts at zero). PPO keeps the G samples per question so both algorithms see the same
rollouts per step.
"""

import pathlib
import runpy

_base = runpy.run_path(str(pathlib.Path(__file__).with_name("locomo_smollm2_135m_grpo.py")))


def get_config():
    c = _base["get_config"]()
    c.algo = "ppo"                      # actor + linear critic, GAE
    c.rollout.prompts_per_step = 4      # as measured (docs/training.md); the GRPO default
    c.eval.num_questions = 40           # moved to 8 questions a step and all 81 to validate
    c.optim.epochs = 1                  # one update per rollout batch: the setting these runs
    c.optim.minibatches = 1             # were measured with (the Answer Agent's GRPO default
                                        # is 2 x 2)
    return c
