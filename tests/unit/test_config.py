"""A wrong key or value stops the run with a message naming the key and what is allowed."""
import copy

import pytest

from glrs import config
from glrs.errors import GlrsError


@pytest.fixture
def default():
    return config.load()


def check_error(cfg, *needles):
    with pytest.raises(GlrsError) as e:
        config.validate(cfg)
    for needle in needles:
        assert needle in str(e.value)


def test_default_config_is_valid(default):
    assert default["model"] == "smollm2-135m-instruct"


@pytest.mark.parametrize("density", [0, -0.1, 1.5])
def test_density_outside_unit_interval_is_rejected(default, density):
    cfg = copy.deepcopy(default) | {"target_density": [density]}
    check_error(cfg, "target_density", "> 0", "<= 1")


def test_unknown_key_names_the_allowed_keys(default):
    cfg = copy.deepcopy(default)
    cfg["rpca"]["tolerance"] = 1e-6
    check_error(cfg, "rpca", "tolerance", "allowed keys", "lambda_scale")


def test_unknown_allocator_lists_the_choices(default):
    cfg = copy.deepcopy(default) | {"allocators": ["greedy"]}
    check_error(cfg, "allocators.0", "'greedy'", "cap", "uniform", "rpca-threshold")


def test_single_value_means_a_list_of_one(default):
    cfg = copy.deepcopy(default) | {"target_density": 0.4}
    assert config.validate(cfg)["target_density"] == [0.4]


def test_every_cap_setting_with_its_default_passes_the_schema(default):
    """The schema lists CAP's settings by hand: each one glrs.cap knows, at its default, must validate
    (the budget policy's settings were once missing, so `policy: budget` in a config was refused)."""
    from glrs import cap

    cfg = copy.deepcopy(default)
    cfg["allocator_params"]["cap"] = dict(cap.ALLOC_PARAMS_DEFAULTS)
    config.validate(cfg)


def test_nested_command_line_values_are_typed_as_yaml():
    """`snakemake --config 'rpca={lambda_scale: 2, max_iter: 300}'` hands the numbers over as strings."""
    cfg = config.load()
    cfg["rpca"] = {"lambda_scale": "2", "max_iter": "300"}
    cfg["realise"] = {"damp": "0.02"}
    out = config.validate(cfg)
    assert out["rpca"] == {"lambda_scale": 2, "max_iter": 300} and out["realise"]["damp"] == 0.02


def test_schema_and_modules_name_the_same_settings():
    """Each section's settings are defined with their defaults in one module; the schema checks their values.
    The two must name the same keys, so that a setting added to one is never missing from the other."""
    import yaml

    from glrs import cap, realise, rpca

    schema = yaml.safe_load(config.SCHEMA.read_text())
    props = schema["properties"]
    assert set(props["rpca"]["properties"]) == set(rpca.DEFAULTS)
    assert set(props["realise"]["properties"]) == set(realise.DEFAULTS) | {"sparsity"}
    assert set(schema["$defs"]["cap_params"]["properties"]) == set(cap.ALLOC_PARAMS_DEFAULTS) | set(cap.OPTIONAL)


def test_the_former_rpca_method_names_its_replacement(default):
    cfg = copy.deepcopy(default)
    cfg["rpca"] = {"method": "none"}
    with pytest.raises(GlrsError, match="stage1: weights"):
        config.validate(cfg)
