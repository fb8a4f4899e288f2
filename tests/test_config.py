"""Options are validated at once, and errors name the valid keys or values."""

from __future__ import annotations

import pytest
import torch

import memopt
from memopt.config import Config, option_names


def test_defaults():
    config = Config()
    assert config.lowering == "inductor"
    assert config.memory_budget is None
    assert config.strict is False
    assert config.reversible_inline is True
    assert config.reversible_nested is True
    assert Config.from_options(None) == config
    assert Config.from_options({}) == config


def test_config_is_frozen():
    with pytest.raises(AttributeError):
        Config().lowering = "eager"


def test_unknown_option_names_valid_ones():
    with pytest.raises(ValueError) as error:
        Config.from_options({"lowring": "eager"})
    message = str(error.value)
    assert "'lowring'" in message
    for name in option_names():
        assert name in message


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        ({"lowering": "tvm"}, "'inductor', 'eager'"),
        ({"lowering": True}, "'inductor', 'eager'"),
        ({"memory_budget": 0}, "(0, 1]"),
        ({"memory_budget": 1.5}, "(0, 1]"),
        ({"memory_budget": True}, "(0, 1]"),
        ({"memory_budget": "half"}, "(0, 1]"),
        ({"strict": 1}, "True or False"),
        ({"reversible_inline": "yes"}, "'reversible_inline' must be True or False"),
        ({"reversible_nested": 0}, "'reversible_nested' must be True or False"),
        ({"inductor_config": ["max_autotune"]}, "dict"),
        ({"inductor_config": {"max_autotunee": True}}, "no option 'max_autotunee'; did you mean 'max_autotune'"),
        # Attributes of the config module that are no options: a namespace, an imported module.
        ({"inductor_config": {"cpp": {"threads": 1}}}, "no option 'cpp'"),
        ({"inductor_config": {"os": 1}}, "no option 'os'"),
        ({"inductor_config": {"max_autotune": "false"}}, "'max_autotune' must be True or False; got 'false'"),
        ({"inductor_config": {"compile_threads": 1.5}}, "'compile_threads' must be an int or None"),
        ({"inductor_config": {"triton.descriptive_names": "aten"}}, "one of 'torch', 'original_aten', 'inductor_node'"),
        ({"reversible_deterministic_ops": 3}, "'mylib', 'mylib::fused_mlp' or 'mylib::fused_mlp.default'"),
        ({"reversible_deterministic_ops": ["mylib::"]}, "operator namespaces or names"),
        ({"reversible_deterministic_ops": ["my lib"]}, "operator namespaces or names"),
    ],
)
def test_bad_values_raise(options, expected):
    with pytest.raises(ValueError, match=None) as error:
        Config.from_options(options)
    assert expected in str(error.value)


def test_deterministic_ops_become_a_tuple():
    assert Config().reversible_deterministic_ops == ()
    assert Config(reversible_deterministic_ops="torchao").reversible_deterministic_ops == ("torchao",)
    names = ["mylib::fused_mlp", "mylib::fused_mlp.default"]
    assert Config(reversible_deterministic_ops=names).reversible_deterministic_ops == tuple(names)


def test_inductor_config_values_of_the_declared_types_pass():
    values = {
        "max_autotune": True, "compile_threads": None, "triton.descriptive_names": "torch", "epilogue_fusion": False,
    }
    assert Config.from_options({"inductor_config": values}).inductor_config == values


def test_memory_budget_accepts_int_one():
    assert Config(memory_budget=1).memory_budget == 1.0


def test_options_must_be_a_dict():
    with pytest.raises(ValueError, match="must be a dict"):
        Config.from_options(["lowering", "eager"])


def test_replace_validates():
    assert Config().replace(lowering="eager").lowering == "eager"
    with pytest.raises(ValueError, match="valid options"):
        Config().replace(nope=1)
    with pytest.raises(ValueError):
        Config().replace(memory_budget=-1)


def test_memopt_compile_rejects_bad_options_before_compiling():
    with pytest.raises(ValueError, match="valid options are"):
        memopt.compile(torch.nn.Linear(2, 2), not_an_option=True)


def test_torch_compile_bad_option_fails_on_first_call_with_the_reason():
    compiled = torch.compile(torch.nn.Linear(2, 2), backend="memopt", options={"lowering": "fast"})
    with pytest.raises(Exception) as error:
        compiled(torch.randn(3, 2))
    # Dynamo wraps backend errors; the ValueError and its message must survive.
    cause = error.value
    while cause is not None and not isinstance(cause, ValueError):
        cause = cause.__cause__ or cause.__context__
    assert isinstance(cause, ValueError)
    assert "'inductor', 'eager'" in str(cause)
