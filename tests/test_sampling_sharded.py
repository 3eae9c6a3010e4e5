"""The sampler with rows sharded over a mesh (``SamplingConfig.mesh``) draws the same tokens as
on one device: 8 fake CPU devices, data / fsdp / data-fsdp-tp meshes, greedy and T=1 sampling.
16 prompts: 2 per device on the 8-way batch meshes (one prefill pass), 4 per device on the
(2, 2, 2) mesh (two passes of 2: the strided sharded prefill)."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import textwrap

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]

_SCRIPT = textwrap.dedent("""
    import json, sys
    import jax, numpy as np
    sys.path.insert(0, {root!r})
    from mr1 import parallel
    from mr1.models import transformer
    from mr1.models.config import get_config
    from mr1.models.policy import Policy
    from mr1.sampling import SamplingConfig, sample_padded, left_pad

    cfg = get_config("tiny")
    params = transformer.init_params(cfg, jax.random.PRNGKey(0))
    policy = Policy(config=cfg, params=params, tokenizer=None)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, 250, int(n)).tolist() for n in rng.integers(3, 12, 16)]
    ids, mask = left_pad(prompts, cfg.pad_token_id, 16)
    key = jax.random.PRNGKey(3)
    out = {{}}
    for name, shape, mode in [("1", None, None), ("data8", (8, 1, 1), "replicated"),
                              ("fsdp8", (1, 8, 1), "fsdp"), ("d2f2t2", (2, 2, 2), "fsdp")]:
        mesh = None if shape is None else parallel.make_mesh(8, shape)
        p = params if mesh is None else parallel.to_global(
            params, parallel.param_shardings(params, mesh, mode))
        res = {{}}
        for kind, scfg in [("greedy", SamplingConfig(max_new_tokens=6, mesh=mesh)),
                           ("sampled", SamplingConfig(max_new_tokens=6, temperature=1.0,
                                                      num_samples=4, mesh=mesh))]:
            tok, lp, lens = sample_padded(policy, ids, mask, key, scfg, params=p)
            res[kind] = {{"tokens": tok.tolist(), "logprobs": lp.tolist(),
                          "lengths": lens.tolist()}}
        out[name] = res
    print("RESULT" + json.dumps(out))
""")


def test_sharded_sampler_matches_one_device():
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
           "JAX_PLATFORMS": "cpu"}
    res = subprocess.run([sys.executable, "-c", _SCRIPT.format(root=str(ROOT))], env=env,
                         capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout.split("RESULT", 1)[1])
    ref = out["1"]
    assert np.asarray(ref["sampled"]["tokens"]).shape == (64, 6)
    for name in ("data8", "fsdp8", "d2f2t2"):
        for kind in ("greedy", "sampled"):
            got, want = out[name][kind], ref[kind]
            assert got["tokens"] == want["tokens"], (name, kind)
            assert got["lengths"] == want["lengths"], (name, kind)
            np.testing.assert_allclose(got["logprobs"], want["logprobs"], atol=1e-5)
