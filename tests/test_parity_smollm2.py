"""The embedded SmolLM2-135M-Instruct: mr1 vs HF transformers (PyTorch) on the same GGUF."""

from __future__ import annotations

import numpy as np

from mr1.sampling import encode_prompts, generate, left_pad

PROMPTS = [
    "Hello, my name is",
    "The capital of France is Paris and the capital of Germany is",
    "a",
    "Caroline: I went to a LGBTQ support group yesterday and it was so powerful.\n"
    "Melanie: That's wonderful! How did it make you feel?\nCaroline: Accepted, for once.",
]

CHAT_PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Caroline went to a LGBTQ support group on 7 May 2023. When did Caroline go?",
    "List three fruits.",
    "Explain gravity to a child in two sentences.",
    "Melanie painted a sunrise by the lake last year. What did Melanie paint?",
]


def test_logits_match_hf_with_left_padding(embedded_policy, hf_embedded, torch_mod):
    tok = embedded_policy.tokenizer
    ids = [tok(p, add_special_tokens=False)["input_ids"] for p in PROMPTS]
    assert len({len(i) for i in ids}) == len(ids), "prompts must differ in length"
    input_ids, mask = left_pad(ids, embedded_policy.pad_token_id)
    ours = embedded_policy.logits(input_ids, mask)
    with torch_mod.no_grad():
        ref = hf_embedded(input_ids=torch_mod.tensor(input_ids, dtype=torch_mod.long),
                          attention_mask=torch_mod.tensor(mask, dtype=torch_mod.long)).logits
    ref = ref.float().numpy()
    real = mask.astype(bool)
    max_diff = float(np.abs(ours - ref)[real].max())
    print(f"max |logits - HF logits| over real tokens: {max_diff:.2e}")
    assert ours.dtype == np.float32 and ours.shape == ref.shape
    assert max_diff <= 1e-3


def test_greedy_generation_matches_hf(embedded_policy, hf_embedded, torch_mod):
    out = generate(embedded_policy, CHAT_PROMPTS, max_new_tokens=48, temperature=0.0)
    ids = encode_prompts(embedded_policy, CHAT_PROMPTS)
    eos = embedded_policy.eos_token_ids
    for i, p in enumerate(ids):
        with torch_mod.no_grad():
            ref = hf_embedded.generate(torch_mod.tensor([p]), max_new_tokens=48, do_sample=False,
                                       eos_token_id=list(eos),
                                       pad_token_id=embedded_policy.pad_token_id)
        ref = ref[0, len(p):].numpy()
        ours = out.tokens[i, :out.lengths[i]]
        np.testing.assert_array_equal(ours, ref, err_msg=f"prompt {i}: {CHAT_PROMPTS[i]!r}")
    assert "Paris" in out.texts[0]


def test_embedded_policy_metadata(embedded_policy):
    cfg = embedded_policy.config
    assert (cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads) == (30, 576, 9, 3)
    assert cfg.tie_embeddings and 134e6 < cfg.num_params < 136e6
    assert embedded_policy.eos_token_ids == (2,)
    chat = embedded_policy.tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert chat.endswith("<|im_start|>assistant\n")
