"""GRPO for the Answer Agent on LoCoMo, embedded SmolLM2-135M-Instruct, sized for a 2-core CPU.

    python experiments/grpo_answer.py --config=experiments/configs/locomo_smollm2_135m_grpo.py \
        --workdir=runs/grpo_answer

Trains on the 152 ``conv-26`` QAs, validates greedily on ``conv-30``. Memories are LoCoMo's
observations added as-is (the ``evaluate_locomo_smollm2`` pipeline), 2 x ``answer.top_k``
memories per question. CPU-scale choices (the paper's 8B setup is in comments): the reward
adds a small format term and F1 to EM because a 135M model almost never hits EM at first (all
groups would have equal rewards and no gradient); KL to the reference is off by default (its
extra forward costs ~1/3 of an update on CPU; set ``loss.kl_beta`` to turn it on).
"""

import ml_collections


def get_config():
    c = ml_collections.ConfigDict()
    c.algo = "grpo"                     # "grpo" | "ppo" (objective registry, mr1.rl.train_step)
    c.model = "smollm2-135m-instruct"   # load_policy name / GGUF path / HF folder
    c.tokenizer = ""                    # "" = the model's; "embedded" = the embedded GGUF's
    c.data_path = ""                    # locomo10.json; "" = $MR1_DATA_DIR or the cache
    c.seed = 0                          # data order, rollout keys, init
    c.num_steps = 30                    # optimizer steps (30 x 8 = 240 questions, ~1.6 passes
                                        # over the 152; docs/training.md has the runs)
    c.progress = True                   # tqdm bar

    c.data = ml_collections.ConfigDict()
    c.data.max_train_questions = 0     # 0 = all 152 conv-26 QAs

    c.memory = ml_collections.ConfigDict()
    c.memory.dir = ""                   # banks saved/resumed here ("" = <workdir>/memory)
    c.memory.facts = "observations"     # "observations" (LoCoMo's) | "llm"
    c.memory.manager = "add_all"        # "add_all" | "llm" (prompted manager)
    c.memory.num_slots = 512            # bank slots per speaker
    c.memory.max_len = 64               # tokens per memory in the bank tensors
    c.memory.full_policy = "evict_lru"  # ADD on a full bank

    c.answer = ml_collections.ConfigDict()
    c.answer.top_k = 5                  # memories per speaker (paper: 30; CPU: 5)
    c.answer.max_new_tokens = 32        # distillation + answer line budget (paper: 2048)
    c.answer.distill = True             # prompt asks for the relevant memories, then the
                                        # answer line (paper); False = answer line only
                                        # (ablation; evaluate with the same setting)

    c.rollout = ml_collections.ConfigDict()
    c.rollout.prompts_per_step = 8      # questions per step (paper: global batch 128; 4 learned
                                        # less: docs/training.md)
    c.rollout.group_size = 8            # G samples per question (MemFactory: 8)
    c.rollout.temperature = 1.0         # rollouts sample at T=1 (paper)
    c.rollout.microbatch_prompts = 2    # questions per gradient micro-batch (memory knob)
    c.rollout.prompts_per_call = 0      # questions per sampler call (KV-cache memory; 0 = all)

    c.reward = ml_collections.ConfigDict()  # weights of mr1.rl.rewards terms
    c.reward.em = 1.0                   # exact match (the paper's reward)
    c.reward.f1 = 1.0                   # Mem0 set-token F1 (dense signal for a 135M model)
    c.reward.format = 0.2               # a "**Answer:** <= 6 words" line is present
    c.reward.brevity = 0.1              # the parsed answer has 1..6 words (answer line or not)

    c.loss = ml_collections.ConfigDict()
    c.loss.clip_eps_low = 0.2           # ratio clip below
    c.loss.clip_eps_high = 0.28         # ratio clip above ("clip-higher")
    c.loss.kl_beta = 0.0                # beta * KL(pi || pi_ref); 0 skips the reference pass
    c.loss.kl_estimator = "k3"          # k1 | k2 | k3
    c.loss.agg = "token_mean"           # token_mean | seq_mean_token_mean | seq_mean_token_sum
    c.loss.normalize_std = False        # False = Dr. GRPO, r - mean (the best-validation run's;
                                        # docs/training.md); True = GRPO, (r - mean) / std
    c.loss.advantage_estimator = ""     # mr1.rl.advantages.ESTIMATORS: grpo | drgrpo | rloo |
                                        # gae; "" = the algo's (GRPO: per normalize_std; PPO: gae)
    c.loss.max_grad_norm = 1.0          # global-norm clip
    c.loss.entropy_coef = 0.0           # PPO entropy bonus
    c.loss.vf_coef = 0.5                # PPO value-loss weight
    c.loss.vf_clip = 0.2                # PPO value clip
    c.loss.gamma = 1.0                  # PPO discount over tokens
    c.loss.gae_lambda = 0.95            # PPO GAE lambda
    c.loss.whiten_advantages = True     # PPO: normalise token advantages over the batch

    c.optim = ml_collections.ConfigDict()
    c.optim.learning_rate = 2e-5        # actor (paper at 8B: 1e-6)
    c.optim.critic_learning_rate = 1e-3  # PPO linear value head (paper's critic at 8B: 1e-5)
    c.optim.warmup_steps = 2            # linear warm-up
    c.optim.weight_decay = 0.0
    c.optim.b1 = 0.9
    c.optim.b2 = 0.99
    c.optim.epochs = 2                  # passes over each rollout batch (VERL's ppo_epochs)
    c.optim.minibatches = 2             # optimizer steps per pass: the batch's prompts (with
                                        # their groups) shuffled and split this many ways; 1 x 1
                                        # = one step per rollout (the clip never binds). 2 x 2
                                        # since 2026-11-27: validation F1 42.1 vs 32.7 at 1 x 1
                                        # (seed 0), test F1 30.55 (docs/training.md)

    c.lora = ml_collections.ConfigDict()  # mr1.models.lora; rank 0 = full fine-tuning
    c.lora.rank = 0                     # > 0: train rank-r adapters on a frozen base
    c.lora.alpha = 16.0                 # merge scale alpha / rank
    c.lora.targets = ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down")  # adapted weights

    c.eval = ml_collections.ConfigDict()
    c.eval.every = 5                    # validate every N steps (and at step 0 and the end);
                                        # the best is kept in <workdir>/best
    c.eval.num_questions = 0            # conv-30 questions used (0 = all 81; 40 picked best/
                                        # noisily)
    c.eval.batch_size = 20              # greedy prompts per generate call

    c.checkpoint_every = 10             # orbax save period (and at exit / SIGTERM)
    c.checkpoint_keep = 2               # checkpoints kept

    c.parallel = ml_collections.ConfigDict()
    c.parallel.num_devices = 0          # devices used (0 = all)
    c.parallel.mesh = ()                # (data, fsdp, tp) sizes, one may be -1 (mr1.parallel);
                                        # () = all devices on one axis, per param_sharding:
    c.parallel.param_sharding = "replicated"  # "replicated" (data) | "fsdp" (params sharded)
    c.parallel.remat = False            # recompute layer activations in the backward pass
    c.parallel.attention_chunk = 0      # > 0: memory-efficient attention over query blocks
    c.parallel.logit_chunk = 0          # > 0: log-probs over blocks of completion positions
    c.parallel.shard_rollouts = False   # sample on the mesh (rows over data x fsdp); False =
                                        # every process samples the whole batch on one device

    c.debug = ml_collections.ConfigDict()
    c.debug.nan_reward_steps = ()       # fault injection: steps whose rewards become NaN
    return c
