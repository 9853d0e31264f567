"""TimestepScale routing: every timestep that cannot pick an expert unambiguously raises a RoutingError naming the
fix (never torch's own error, never a silent expert), and the legitimate forms around those cases still route."""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model

from peft_quant import RoutingError, TimestepScaleConfig

from .test_timestep_scale import _base, _Single, _tiny_unet

ROUTER = "_peft_quant_timestep_router"


def _model(**config):
    base, x = _base("linear")  # batch of 4
    return get_peft_model(_Single(base), TimestepScaleConfig(**config)), x


def _experts(model) -> list[int]:
    """The experts the last forward used (every adapter of these tests has the same boundaries)."""
    (experts,) = getattr(model.base_model.model, ROUTER).last_experts.values()
    return experts.tolist()


@pytest.mark.parametrize("timestep,message", [
    (None, r"`timestep` is None, not a number"),
    ("500", r"`timestep` is '500', not a number"),
    (["a", "b"], r"`timestep` \(list\) cannot be read as numbers"),
    (torch.tensor([True, False, True, True]), r"`timestep` is a torch.bool tensor"),
    (torch.tensor(float("nan")), r"non-finite values \(nan"),
    (torch.tensor([1.0, float("inf"), 3.0, 4.0]), r"non-finite values \(1, inf, 3, 4"),
    (torch.tensor([-1, 10, 20, 30]), r"Timesteps -1\.\.30 .* outside \[0, 1000\]"),
    (torch.tensor([1000.5, 10, 20, 30]), r"Timesteps 10\.\.1000\.5 .* outside \[0, 1000\]"),
    (torch.tensor([1, 2, 3]), r"has shape \(3,\); expected a scalar or one value per sample \(batch 4\)"),
    (torch.tensor([]), r"has shape \(0,\)"),
    (torch.ones(4, 1), r"has shape \(4, 1\)"),
])
def test_bad_timesteps_raise_a_routing_error_naming_the_fix(timestep, message):
    model, x = _model()
    with pytest.raises(RoutingError, match=message) as error:
        model(x, timestep)
    assert "Fix:" in str(error.value)


def test_range_ends_are_valid():
    """``0`` and ``T`` are inside the range: flow matching starts at ``sigma = 1``, i.e. ``t = T``, the last expert."""
    model, x = _model()
    model(x, torch.tensor([0.0, 1000.0, 499.99, 500.0]))
    assert _experts(model) == [0, 1, 0, 1]


@pytest.mark.diffusers
def test_fractional_timesteps_on_a_unet_without_multiplier_raise():
    """A flow-matching pipeline's ``t / 1000`` on a UNet (multiplier 1 by default) would put every sample in expert
    0: refused, naming ``timestep_multiplier=1000``."""
    model = get_peft_model(_tiny_unet(), TimestepScaleConfig())
    sample, text = torch.randn(2, 4, 8, 8), torch.randn(2, 5, 32)
    with pytest.raises(RoutingError, match=r"all lie in \[0, 1\].*Fix: set TimestepScaleConfig\(timestep_multiplier="
                                           r"1000\)"):
        model(sample, torch.tensor([0.3, 0.8]), encoder_hidden_states=text)
    fixed = get_peft_model(_tiny_unet(), TimestepScaleConfig(timestep_multiplier=1000))
    fixed(sample, torch.tensor([0.3, 0.8]), encoder_hidden_states=text)
    assert _experts(fixed) == [0, 1]


@pytest.mark.parametrize("config,timesteps,experts", [
    ({}, torch.tensor([0, 1, 1, 0]), [0, 0, 0, 0]),  # integer timesteps 0 and 1: the end of a DDPM schedule
    ({}, torch.tensor([0.0, 1.0, 1.0, 0.0]), [0, 0, 0, 0]),  # the same as floats
    ({"timestep_multiplier": 1000}, torch.tensor([0.2, 0.7, 0.5, 1.0]), [0, 1, 1, 1]),  # fractions, as declared
    ({"timestep_multiplier": 1}, torch.tensor([0.2, 0.7, 0.5, 1.0]), [0, 0, 0, 0]),  # declared: really [0, T]
    ({"num_experts": 1}, torch.tensor([0.2, 0.7, 0.5, 1.0]), [0, 0, 0, 0]),  # one expert: nothing to route
    ({"num_train_timesteps": 1}, torch.tensor([0.2, 0.7, 0.5, 1.0]), [0, 1, 1, 1]),  # T = 1: fractions are the range
])
def test_legitimate_timesteps_in_zero_one_still_route(config, timesteps, experts):
    model, x = _model(**config)
    model(x, timesteps)
    assert _experts(model) == experts


def test_fractions_at_the_tail_of_a_sampling_loop_pass():
    """Once a forward had timesteps above 1, the timesteps span [0, T]: a schedule's last steps below 1 are real."""
    model, x = _model()
    with pytest.raises(RoutingError, match="look like fractions"):
        model(x, 0.5)
    model(x, 999.0)
    model(x, 0.5)
    assert _experts(model) == [0, 0, 0, 0]


def test_an_explicit_multiplier_on_any_adapter_turns_the_fractions_check_off():
    model, x = _model()
    model.add_adapter("declared", TimestepScaleConfig(timestep_multiplier=1))  # same reading, stated explicitly
    model(x, 0.5)
    assert _experts(model) == [0, 0, 0, 0]
