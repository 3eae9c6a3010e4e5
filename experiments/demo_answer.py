"""Demo: the embedded model answers LoCoMo questions from retrieved memories.

    python experiments/demo_answer.py --num_questions=3

Memories are LoCoMo's per-session observations (facts with the session date), embedded with the
embedded all-MiniLM-L6-v2; for each question the top ``--per_speaker`` memories of each speaker
are retrieved and the embedded SmolLM2-135M-Instruct answers greedily. Prints each answer beside
the gold answer with the Mem0-style F1. Runs offline once ``python -m mr1.assets`` has fetched
the two embedded assets and the LoCoMo file is found (``$MR1_DATA_DIR`` or ``--data``).
"""

from __future__ import annotations

import time

import numpy as np
from absl import flags

from mr1.data.locomo import load_locomo, split_locomo
from mr1.eval.metrics import f1
from mr1.memory.embedder import load_embedder
from mr1.models import load_policy
from mr1.sampling import generate

_DATA = flags.DEFINE_string("data", None, "path to locomo10.json (default: $MR1_DATA_DIR)")
_CONV = flags.DEFINE_string("conversation", "conv-30", "LoCoMo sample id")
_NUM = flags.DEFINE_integer("num_questions", 3, "questions to answer")
_PER_SPEAKER = flags.DEFINE_integer("per_speaker", 5, "memories retrieved per speaker")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 24, "answer budget in tokens")

PROMPT = """You answer questions about a conversation between {a} and {b} using memories.

Memories of {a}:
{mem_a}

Memories of {b}:
{mem_b}

Question: {question}
Answer in a few words, with the date if the question asks when."""


def main(argv):
    del argv
    t0 = time.time()
    split = split_locomo(load_locomo(_DATA.value))
    conv = next(c for c in (*split.train, *split.validation, *split.test)
                if c.sample_id == _CONV.value)
    dates = {s.idx: s.date for s in conv.sessions}
    memories = [(o.speaker, f"({dates.get(o.session_idx, '?')}) {o.text}")
                for o in conv.observations]
    embedder = load_embedder()
    policy = load_policy("smollm2-135m-instruct")
    mem_emb = embedder.encode([f"{s}: {t}" for s, t in memories])
    speakers = np.asarray([s for s, _ in memories])
    qas = conv.qas[:_NUM.value]
    q_emb = embedder.encode([qa.question for qa in qas])

    def top(q, speaker):
        idx = np.flatnonzero(speakers == speaker)
        best = idx[np.argsort(-(mem_emb[idx] @ q))[:_PER_SPEAKER.value]]
        return "\n".join(f"- {memories[i][1]}" for i in best)

    prompts = [PROMPT.format(a=conv.speaker_a, b=conv.speaker_b, question=qa.question,
                             mem_a=top(q, conv.speaker_a), mem_b=top(q, conv.speaker_b))
               for qa, q in zip(qas, q_emb)]
    out = generate(policy, prompts, max_new_tokens=_MAX_NEW.value, temperature=0.0)
    scores = []
    for qa, answer in zip(qas, out.texts):
        scores.append(f1(answer, qa.answer))
        print(f"Q: {qa.question}\n  model: {answer.strip()!r}\n  gold:  {qa.answer!r}  "
              f"F1={scores[-1]:.2f}")
    print(f"{len(qas)} questions from {conv.sample_id}: mean F1 {np.mean(scores):.3f} "
          f"({time.time() - t0:.0f} s)")


if __name__ == "__main__":
    from mr1.entry import run_main
    run_main(main)  # user errors: one line, exit 2
