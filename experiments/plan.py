"""Per-device memory plan of a config on a mesh, and an abstract compile check.

    python experiments/plan.py \
        --config=experiments/configs/paper.py:locomo_train,qwen2.5-7b,grpo,answer
    python experiments/plan.py --config=... --devices=16 --mesh=1,-1,2 --accelerator=v5p
    python experiments/plan.py --config=... --compile   # lower + compile the jitted update
    python experiments/plan.py --all                    # one line per paper.py config

Prints the bytes per device of params, optimizer state, gradients, the frozen reference, the
rollout KV cache and activations (:mod:`mr1.planning`), and whether they fit each accelerator
(v4 / v5e / v5p / v6e TPU, A100 / H100 / H200). ``--compile`` builds the config's mesh from
fake CPU devices when no accelerator is present and compiles the real update (training
configs) or greedy sampler (evaluation configs) from abstract arrays: no weights needed.
"""

from __future__ import annotations

import json
import os
import pathlib
import sys

from absl import app, flags
from ml_collections import config_flags

ROOT = pathlib.Path(__file__).resolve().parents[1]
_CONFIG = config_flags.DEFINE_config_file("config", None, "config to plan", lock_config=False)
_DEVICES = flags.DEFINE_integer("devices", 0, "device count (default: config.plan.num_devices)")
_MESH = flags.DEFINE_string("mesh", "", "data,fsdp,tp sizes, one may be -1 (default: the "
                            "config's plan.mesh)")
_ACCEL = flags.DEFINE_string("accelerator", "", "only this accelerator's verdict (default: "
                             "all known)")
_COMPILE = flags.DEFINE_bool("compile", False, "lower and compile the jitted update / sampler "
                             "on the mesh from abstract arrays")
_ALL = flags.DEFINE_bool("all", False, "a one-line plan for every experiments/configs/paper.py "
                         "spec on its target hardware")
_JSON = flags.DEFINE_string("json", "", "also write the plan(s) here as JSON")


def _mesh_arg() -> tuple[int, ...]:
    return tuple(int(x) for x in _MESH.value.split(",")) if _MESH.value else ()


def _plan_dict(plan, compile_info=None) -> dict:
    from mr1.planning import ACCELERATORS, GiB
    return {"spec": plan.spec, "model": plan.model, "kind": plan.kind,
            "devices": plan.mesh.size, "mesh": plan.mesh.as_tuple(),
            "gib_per_device": {k: v / GiB for k, v in plan.components.items()},
            "phases_gib": {k: plan.phase_total(k) / GiB for k in plan.phases},
            "peak_gib": plan.total / GiB, "fits": {a: plan.fits(a) for a in ACCELERATORS},
            "shapes": plan.shapes, "notes": plan.notes, "compile": compile_info}


def _all() -> list[dict]:
    import runpy

    from mr1.planning import GiB, make_plan
    paper = runpy.run_path(str(ROOT / "experiments" / "configs" / "paper.py"))
    out = []
    print(f"{'spec':<46}{'devices':>8}  {'mesh':<12}{'GiB/device':>11}  target")
    for spec in paper["all_specs"]():
        config = paper["get_config"](spec)
        plan = make_plan(config)
        accel = config.plan.accelerator
        verdict = ("fits" if plan.fits(accel) else "DOES NOT FIT") if accel != "cpu" else "-"
        print(f"{spec:<46}{plan.mesh.size:>8}  {str(plan.mesh.as_tuple()):<12}"
              f"{plan.total / GiB:>11.1f}  {accel}: {verdict}")
        out.append(_plan_dict(plan))
    return out


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    if _ALL.value:
        plans = _all()
        if _JSON.value:
            pathlib.Path(_JSON.value).write_text(json.dumps(plans, indent=2))
        return
    config = _CONFIG.value
    if config is None:
        raise app.UsageError("--config is required (or --all)")
    devices = _DEVICES.value or int((config.get("plan") or {}).get("num_devices", 1) or 1)
    if _COMPILE.value and "--xla_force_host_platform_device_count" not in os.environ.get(
            "XLA_FLAGS", ""):  # fake CPU devices unless an accelerator provides them
        os.environ.setdefault("JAX_PLATFORMS", "cpu") if not _has_accelerator() else None
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                                   f" --xla_force_host_platform_device_count={devices}").strip()
    from mr1 import parallel
    from mr1.planning import (ACCELERATORS, PEAK, abstract_sampler, abstract_update,
                              compiled_memory, is_train_config, make_plan)

    try:
        plan = make_plan(config, devices, _mesh_arg() or None)
    except ValueError as e:
        raise app.UsageError(str(e)) from e
    accels = (_ACCEL.value,) if _ACCEL.value else tuple(ACCELERATORS)
    if _ACCEL.value and _ACCEL.value not in ACCELERATORS:
        raise app.UsageError(f"unknown accelerator {_ACCEL.value!r}; known: "
                             f"{sorted(ACCELERATORS)}")
    print(plan.table(accels))
    if is_train_config(config):
        accel = _ACCEL.value or (config.get("plan") or {}).get("accelerator", "")
        if accel in PEAK:
            _print_time(config, plan, accel)
    info = None
    if _COMPILE.value:
        import jax
        if jax.device_count() < plan.mesh.size:
            raise app.UsageError(f"mesh needs {plan.mesh.size} devices, {jax.device_count()} "
                                 "present")
        mesh = parallel.make_mesh(plan.mesh.size, plan.mesh)
        fn = abstract_update if is_train_config(config) else abstract_sampler
        compiled, secs = fn(config, mesh)
        info = {"seconds": secs, "platform": jax.devices()[0].platform,
                "xla_memory_gib": compiled_memory(compiled)}
        what = "update step" if is_train_config(config) else "greedy sampler"
        print(f"compiled the jitted {what} for mesh {plan.mesh} on {plan.mesh.size} "
              f"{info['platform']} devices in {secs:.1f} s")
        if info["xla_memory_gib"]:
            print("  XLA memory analysis (GiB / device): " + ", ".join(
                f"{k} {v:.2f}" for k, v in info["xla_memory_gib"].items()))
            if info["platform"] == "cpu":
                print("  (the CPU backend widens bfloat16 arrays to float32 and schedules for "
                      "CPU: run --compile on the target accelerator for its own figure)")
    if _JSON.value:
        pathlib.Path(_JSON.value).write_text(json.dumps(_plan_dict(plan, info), indent=2))


def _print_time(config, plan, accel: str) -> None:
    """The roofline time estimate (mr1.planning.estimate_step_seconds) for ``accel``."""
    from mr1.planning import BW_EFFICIENCY, MFU, estimate_step_seconds

    worst = estimate_step_seconds(config, plan, accel)
    short = estimate_step_seconds(config, plan, accel, response_tokens=256)
    steps = config.num_steps
    print(f"  time estimate on {plan.mesh.size} x {accel} (roofline at {MFU:.0%} MFU, decode at "
          f"{BW_EFFICIENCY:.0%} of HBM bandwidth; not measured):")
    for label, t in (("responses at the 2048-token cap", worst),
                     ("responses of 256 tokens", short)):
        print(f"    {label}: rollout {t['rollout_s']:.0f} s + update {t['update_s']:.0f} s = "
              f"{t['step_s']:.0f} s / step, {steps} steps = {steps * t['step_s'] / 3600:.1f} h")


def _has_accelerator() -> bool:
    return os.environ.get("JAX_PLATFORMS", "") not in ("", "cpu")


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    from mr1.entry import run_main
    run_main(main)  # user errors: one line, exit 2
