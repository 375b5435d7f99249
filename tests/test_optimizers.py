"""The server-side optimizers against torch.optim (a stored fixture), and their contract."""

from __future__ import annotations

import json
import math
import threading
from pathlib import Path

import numpy as np
import pytest

from ps.optimizer_config import DENSE_OPTIMIZERS, OptimizerConfig, Schedule, clip_norm_scale, lr_at
from ps.server.optimizers import make_optimizer, update_rate
from ps.v1 import optimizer_pb2

FIXTURE = json.loads((Path(__file__).parent / "fixtures" / "torch_optim_reference.json").read_text())
CASES = FIXTURE["cases"]

# Relative error |ours - torch| / max(|torch|, FLOOR): values under FLOOR in magnitude are held
# to an absolute error of tolerance * FLOOR instead, so a parameter crossing zero is not judged
# by a meaningless relative error.
FLOOR = 1e-3
TOLERANCE = {"float64": 1e-6, "float32": 1e-5}

# Configs that together reach every branch of every update (state kinds, clip, decay, schedule).
VARIANTS = [
    {"name": "sgd", "lr": 0.1},
    {"name": "sgd", "lr": 0.1, "weight_decay": 0.1, "clip_value": 0.5},
    {"name": "momentum", "dampening": 0.2, "weight_decay": 0.01},
    {"name": "nesterov", "clip_value": 1.0},
    {"name": "adagrad", "lr_decay": 0.1, "initial_accumulator_value": 0.1},
    {"name": "rmsprop", "centered": True, "momentum": 0.9, "weight_decay": 0.01},
    {"name": "rmsprop"},
    {"name": "adam", "weight_decay": 0.01, "schedule": {"kind": "cosine", "total_steps": 10}},
    {"name": "adam", "amsgrad": True, "clip_value": 0.3},
    {"name": "adamw", "schedule": {"kind": "warmup", "warmup_steps": 2}},
]
VARIANT_IDS = [f"{v['name']}-{i}" for i, v in enumerate(VARIANTS)]


def read_only(a: np.ndarray) -> np.ndarray:
    """A read-only view of the array's bytes, as the server receives a gradient off the network."""
    return np.frombuffer(a.tobytes(), a.dtype)


def random_grads(n: int, dtype, steps: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [read_only(rng.standard_normal(n).astype(dtype)) for _ in range(steps)]


@pytest.mark.parametrize("case", CASES, ids=[c["id"] for c in CASES])
def test_optimizer_matches_torch_optim_step_by_step(case):
    dtype = np.dtype(case["dtype"])
    config = OptimizerConfig.from_dict(case["config"])
    opt = make_optimizer(config)
    param = np.array(case["param"], dtype)
    state = opt.init_state(param.size, dtype)
    for step, (g, expected) in enumerate(zip(case["grads"], case["params_after"]), start=1):
        grad = read_only(np.array(g, dtype))
        opt.apply(param, grad, state, step, grad_scale=clip_norm_scale([grad], config.clip_norm))
        assert param.dtype == dtype
        expected = np.array(expected)
        err = np.max(np.abs(param - expected) / np.maximum(np.abs(expected), FLOOR))
        assert err <= TOLERANCE[case["dtype"]], f"step {step}: relative error {err:.3g}"


def test_fixture_covers_every_optimizer_schedule_and_clip():
    configs = [c["config"] for c in CASES]
    assert {c["name"] for c in configs} == set(DENSE_OPTIMIZERS)
    assert {c["schedule"]["kind"] for c in configs} >= {"constant", "step", "cosine"}
    assert any(c["clip_norm"] for c in configs) and any(c["clip_value"] for c in configs)
    assert {c["dtype"] for c in CASES} == {"float32", "float64"}


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("given", VARIANTS, ids=VARIANT_IDS)
def test_applying_to_two_sub_ranges_equals_applying_to_the_whole_array(given, dtype):
    opt = make_optimizer(given)
    n, cut = 100_003, 40_001  # several blocks, a ragged tail, a cut inside a block
    rng = np.random.default_rng(1)
    whole = rng.standard_normal(n).astype(dtype)
    parts = whole.copy()
    s_whole, s_parts = opt.init_state(n, dtype), opt.init_state(n, dtype)
    for step, grad in enumerate(random_grads(n, dtype, 3), start=1):
        opt.apply(whole, grad, s_whole, step, grad_scale=0.7)
        for a, b in ((0, cut), (cut, n)):
            opt.apply(parts[a:b], grad[a:b], {k: v[a:b] for k, v in s_parts.items()}, step, grad_scale=0.7)
    np.testing.assert_array_equal(parts, whole)
    for k in opt.state_names:
        np.testing.assert_array_equal(s_parts[k], s_whole[k])


@pytest.mark.parametrize("given", VARIANTS, ids=VARIANT_IDS)
def test_apply_leaves_the_gradient_unchanged_and_accepts_a_read_only_one(given):
    opt = make_optimizer(given)
    n = 50_000
    param = np.ones(n, np.float32)
    state = opt.init_state(n, np.float32)
    grad = random_grads(n, np.float32, 1)[0]
    assert not grad.flags.writeable
    before = grad.copy()
    for step in (1, 2):
        for scale in (1.0, 0.5):
            opt.apply(param, grad, state, step, grad_scale=scale)
    np.testing.assert_array_equal(grad, before)
    assert np.all(np.isfinite(param)) and not np.array_equal(param, np.ones(n, np.float32))


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("name", DENSE_OPTIMIZERS)
def test_state_is_one_dimensional_in_the_parameter_dtype(name, dtype):
    opt = make_optimizer({"name": name})
    state = opt.init_state(11, dtype)
    assert tuple(state) == opt.state_names
    assert all(a.shape == (11,) and a.dtype == np.dtype(dtype) for a in state.values())
    assert (name == "sgd") == (opt.state_names == ())


def test_adagrad_state_starts_at_the_initial_accumulator_value():
    state = make_optimizer({"name": "adagrad", "initial_accumulator_value": 0.25}).init_state(4, np.float64)
    np.testing.assert_array_equal(state["sum"], np.full(4, 0.25))


def test_grad_scale_multiplies_the_gradient_before_the_update():
    opt = make_optimizer({"name": "sgd", "lr": 0.5})
    param = np.zeros(3)
    opt.apply(param, read_only(np.array([1.0, -2.0, 4.0])), {}, 1, grad_scale=0.25)
    np.testing.assert_array_equal(param, [-0.125, 0.25, -0.5])


def test_clip_value_clamps_each_element_after_the_grad_scale():
    opt = make_optimizer({"name": "sgd", "lr": 1.0, "clip_value": 1.0})
    param = np.zeros(3)
    opt.apply(param, read_only(np.array([1.0, -8.0, 4.0])), {}, 1, grad_scale=0.5)
    np.testing.assert_array_equal(param, [-0.5, 1.0, -1.0])


def test_an_empty_range_is_a_no_op():
    opt = make_optimizer({"name": "adam"})
    opt.apply(np.zeros(0, np.float32), np.zeros(0, np.float32), opt.init_state(0, np.float32), 1)


def test_mismatched_lengths_and_a_step_below_one_are_refused():
    opt = make_optimizer({"name": "adam"})
    state = opt.init_state(4, np.float32)
    with pytest.raises(ValueError, match="must be 1-D of one length"):
        opt.apply(np.zeros(4, np.float32), np.zeros(3, np.float32), state, 1)
    with pytest.raises(ValueError, match="step must be >= 1, got 0"):
        opt.apply(np.zeros(4, np.float32), np.zeros(4, np.float32), state, 0)


def test_threads_updating_different_slices_at_once_get_the_single_thread_result():
    opt = make_optimizer({"name": "adam", "amsgrad": True, "clip_value": 0.5})
    n, parts = 400_000, 8
    rng = np.random.default_rng(2)
    start = rng.standard_normal(n).astype(np.float32)
    grads = random_grads(n, np.float32, 3)
    serial, parallel = start.copy(), start.copy()
    s_serial, s_parallel = opt.init_state(n, np.float32), opt.init_state(n, np.float32)
    bounds = np.linspace(0, n, parts + 1).astype(int)

    def run(param, state, a, b):
        for step, g in enumerate(grads, start=1):
            opt.apply(param[a:b], g[a:b], {k: v[a:b] for k, v in state.items()}, step, 0.9)

    for a, b in zip(bounds, bounds[1:]):
        run(serial, s_serial, a, b)
    threads = [threading.Thread(target=run, args=(parallel, s_parallel, a, b)) for a, b in zip(bounds, bounds[1:])]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    np.testing.assert_array_equal(parallel, serial)


BAD_CONFIGS = [
    ({"name": "adamz"}, r"unknown optimizer 'adamz': expected one of sgd, momentum, nesterov, adagrad, "
                        r"rmsprop, adam, adamw"),
    ({"lr": -0.1}, r"lr must be >= 0, got -0.1"),
    ({"lr": "fast"}, r"lr must be a finite number, got 'fast'"),
    ({"lr": float("nan")}, r"lr must be a finite number, got nan"),
    ({"name": "adam", "eps": 0.0}, r"eps must be > 0, got 0.0"),
    ({"name": "adam", "eps": -1e-8}, r"eps must be > 0, got -1e-08"),
    ({"name": "adam", "beta1": 1.0}, r"beta1 must be in \[0, 1\), got 1.0"),
    ({"name": "adamw", "beta2": -0.5}, r"beta2 must be in \[0, 1\), got -0.5"),
    ({"name": "momentum", "momentum": -0.9}, r"momentum must be >= 0, got -0.9"),
    ({"name": "nesterov", "momentum": 0.0}, r"momentum must be > 0 for nesterov, got 0.0"),
    ({"name": "nesterov", "dampening": 0.1}, r"dampening=0.1 does not apply to 'nesterov'"),
    ({"name": "sgd", "amsgrad": True}, r"amsgrad=True does not apply to 'sgd' \(it is used by adam, adamw\)"),
    ({"name": "adam", "centered": True}, r"centered=True does not apply to 'adam'"),
    ({"name": "rmsprop", "centered": "yes"}, r"centered must be true or false, got 'yes'"),
    ({"clip_norm": 0}, r"clip_norm must be > 0 \(or left unset\), got 0.0"),
    ({"clip_value": -1.0}, r"clip_value must be > 0 \(or left unset\), got -1.0"),
    ({"learning_rate": 0.1}, r"unknown optimizer option 'learning_rate': expected one of name, lr, "),
    ({"schedule": {"kind": "cosin"}}, r"unknown schedule kind 'cosin': expected one of constant, step, "),
    ({"schedule": {"kind": "step"}}, r"schedule.step_size is required for a 'step' schedule"),
    ({"schedule": {"kind": "step", "step_size": 0}}, r"schedule.step_size must be an integer in \[1, "),
    ({"schedule": {"kind": "step", "step_size": 2.5}}, r"schedule.step_size must be an integer in \[1, .*2.5"),
    ({"schedule": {"kind": "cosine", "total_steps": 5, "T_max": 5}}, r"unknown schedule option 'T_max'"),
    ({"schedule": {"kind": "warmup", "warmup_steps": 5, "after": "cosine", "total_steps": 5}},
     r"schedule.total_steps must exceed schedule.warmup_steps \(5\) .*got 5"),
    ({"schedule": {"kind": "warmup", "warmup_steps": 5, "after": "linear"}},
     r"schedule.after must be 'constant' or 'cosine', got 'linear'"),
]


@pytest.mark.parametrize("given, message", BAD_CONFIGS, ids=[m.split(" ")[0].strip("\\r'") + f"-{i}"
                                                             for i, (_, m) in enumerate(BAD_CONFIGS)])
def test_a_bad_config_raises_value_error_naming_the_field_and_value(given, message):
    with pytest.raises(ValueError, match=message):
        OptimizerConfig.from_dict(given)
    with pytest.raises(ValueError, match=message):
        make_optimizer(given)


def test_unset_fields_take_torch_defaults_for_the_chosen_optimizer():
    adam, adamw, adagrad = (OptimizerConfig(name=n) for n in ("adam", "adamw", "adagrad"))
    assert (adam.lr, adam.eps, adam.weight_decay, adam.beta1, adam.beta2) == (1e-3, 1e-8, 0.0, 0.9, 0.999)
    assert (adamw.lr, adamw.weight_decay) == (1e-3, 0.01)
    assert (adagrad.lr, adagrad.eps) == (1e-2, 1e-10)
    assert OptimizerConfig(name="momentum").momentum == 0.9 == OptimizerConfig(name="nesterov").momentum
    assert OptimizerConfig(name="rmsprop").momentum == 0.0
    assert (OptimizerConfig(name="rmsprop").lr, OptimizerConfig(name="rmsprop").alpha) == (1e-2, 0.99)
    assert OptimizerConfig().name == "sgd" and OptimizerConfig().lr == 1e-3


ROUND_TRIP = VARIANTS + [
    {"name": "adam", "lr": 3e-4, "clip_norm": 1.0, "clip_value": 5.0, "beta2": 0.95, "eps": 1e-6},
    {"name": "momentum", "schedule": {"kind": "step", "step_size": 100, "gamma": 0.5}},
    {"name": "adamw", "schedule": {"kind": "warmup", "warmup_steps": 10, "after": "cosine", "total_steps": 100,
                                   "min_lr": 1e-5}},
]


@pytest.mark.parametrize("given", ROUND_TRIP, ids=[f"{v['name']}-{i}" for i, v in enumerate(ROUND_TRIP)])
def test_config_round_trips_through_dict_json_and_proto(given):
    config = OptimizerConfig.from_dict(given)
    assert OptimizerConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    wire = config.to_proto().SerializeToString()
    assert OptimizerConfig.from_proto(optimizer_pb2.OptimizerConfig.FromString(wire)) == config


def test_a_proto_with_only_a_name_takes_that_optimizers_defaults():
    assert OptimizerConfig.from_proto(optimizer_pb2.OptimizerConfig(name="adamw")) == OptimizerConfig(name="adamw")
    assert OptimizerConfig.from_proto(optimizer_pb2.OptimizerConfig()) == OptimizerConfig()


def test_a_proto_field_set_to_zero_counts_as_given():
    msg = optimizer_pb2.OptimizerConfig(name="adamw", weight_decay=0.0)
    assert OptimizerConfig.from_proto(msg).weight_decay == 0.0


def lrs(schedule: dict, lr: float, steps: int) -> list[float]:
    config = OptimizerConfig(name="sgd", lr=lr, schedule=Schedule(**schedule))
    return [lr_at(config, s) for s in range(1, steps + 1)]


def test_constant_schedule_keeps_the_learning_rate():
    assert lrs({}, 0.3, 4) == [0.3] * 4


def test_step_schedule_multiplies_by_gamma_every_step_size_updates():
    assert lrs({"kind": "step", "step_size": 2, "gamma": 0.5}, 1.0, 6) == [1, 1, 0.5, 0.5, 0.25, 0.25]


def test_cosine_schedule_reaches_min_lr_on_update_total_steps_plus_one_and_holds():
    c = (1 + math.cos(math.pi / 4)) / 2
    expected = [1.0, 0.1 + 0.9 * c, 0.55, 0.1 + 0.9 * (1 - c), 0.1, 0.1, 0.1]
    assert lrs({"kind": "cosine", "total_steps": 4, "min_lr": 0.1}, 1.0, 7) == pytest.approx(expected, rel=1e-12)


def test_warmup_schedule_ramps_linearly_then_holds():
    assert lrs({"kind": "warmup", "warmup_steps": 4}, 2.0, 6) == [0.5, 1.0, 1.5, 2.0, 2.0, 2.0]


def test_warmup_then_cosine_reaches_min_lr_on_update_total_steps():
    c = (1 + math.cos(math.pi / 4)) / 2
    expected = [0.5, 1.0, 0.1 + 0.9 * c, 0.55, 0.1 + 0.9 * (1 - c), 0.1, 0.1]
    got = lrs({"kind": "warmup", "warmup_steps": 2, "after": "cosine", "total_steps": 6, "min_lr": 0.1}, 1.0, 7)
    assert got == pytest.approx(expected, rel=1e-12)


def test_clip_norm_scale_is_torchs_clip_coefficient():
    grads = [np.array([3.0, 4.0], np.float32), np.array([[12.0]], np.float64)]
    assert clip_norm_scale(grads, 6.5) == pytest.approx(6.5 / (13 + 1e-6), rel=1e-12)
    assert clip_norm_scale(grads, 100.0) == 1.0
    assert clip_norm_scale(grads, None) == 1.0


def test_clip_norm_scale_of_a_large_float32_gradient_is_accurate():
    g = np.random.default_rng(3).standard_normal(1_000_003).astype(np.float32)
    exact = math.sqrt(float(np.sum(g.astype(np.float64) ** 2)))
    assert clip_norm_scale([g], 1.0) == pytest.approx(1.0 / (exact + 1e-6), rel=1e-6)


def test_update_rate_reports_the_rate_against_the_copy_limit():
    r = update_rate("adam", n=200_000, repeats=2)
    assert set(r) == {"optimizer", "params_per_s", "copyto_bytes_per_s", "limit_params_per_s", "to_limit_ratio"}
    assert r["optimizer"] == "adam" and r["params_per_s"] > 0
    assert r["limit_params_per_s"] == pytest.approx(2 * r["copyto_bytes_per_s"] / 28)
    assert r["to_limit_ratio"] == pytest.approx(r["params_per_s"] / r["limit_params_per_s"])


@pytest.mark.parametrize("config", [{"name": "sgd", "lr": 0.1}, {"name": "adam", "lr": 0.01},
                                    {"name": "adamw", "lr": 0.01, "weight_decay": 0.1}], ids=["sgd", "adam", "adamw"])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_compiled_updates_match_the_numpy_passes(monkeypatch, config, dtype):
    """ps.server.jit (numba, in the test extra) against the blocked NumPy reference, 5 updates."""
    from ps.server import jit
    assert jit.numba is not None, "numba is part of the test extra"
    grads = random_grads(300_001, dtype, 5, seed=3)
    results = {}
    for on in ("1", "0"):
        monkeypatch.setenv("PS_JIT", on)
        opt = make_optimizer(config)
        param = np.linspace(-1, 1, 300_001).astype(dtype)
        state = opt.init_state(param.size, dtype)
        for step, g in enumerate(grads, 1):
            opt.apply(param, g, state, step)
        results[on] = (param, state)
    # a fused multiply-add rounds once where two ufuncs round twice: a few ulps of the largest value
    ulps = lambda a: 4 * np.finfo(dtype).eps * np.abs(a).max()  # noqa: E731
    tol = TOLERANCE[dtype]
    np.testing.assert_allclose(results["1"][0], results["0"][0], rtol=tol, atol=ulps(results["0"][0]))
    for k in results["0"][1]:
        ref = results["0"][1][k]
        np.testing.assert_allclose(results["1"][1][k], ref, rtol=tol, atol=ulps(ref))
