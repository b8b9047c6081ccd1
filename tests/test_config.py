"""Config dataclasses: validation names the field, dict/YAML round trips, overrides."""

from pathlib import Path

import pytest

from wsdan.config import AugmentConfig, ConfigError, ModelConfig, OptimConfig, TrainConfig


def test_defaults_follow_the_recipe():
    cfg = TrainConfig()
    assert cfg.model.num_attentions == 32 and cfg.model.logit_scale == 100.0
    assert cfg.model.backbone == "inception_v3"
    assert (cfg.augment.crop_theta_low, cfg.augment.crop_theta_high) == (0.4, 0.6)
    assert (cfg.augment.drop_theta_low, cfg.augment.drop_theta_high) == (0.2, 0.5)
    assert cfg.optim.lr == 1e-3 and cfg.optim.center_beta == 0.05
    assert cfg.augment.fuse_crop_drop is False


def test_dict_and_yaml_round_trip(tmp_path):
    cfg = TrainConfig.from_dict({"model": {"backbone": "resnet18", "num_classes": 10, "num_attentions": 8},
                                 "optim": {"grad_clip_norm": 5, "lr": 0.01}, "seed": 3})
    assert cfg.optim.grad_clip_norm == 5.0 and isinstance(cfg.optim.grad_clip_norm, float)
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg
    path = tmp_path / "c.yaml"
    cfg.to_yaml(path)
    assert TrainConfig.from_yaml(path) == cfg
    flat = cfg.flat()
    assert flat["model.num_attentions"] == 8 and flat["seed"] == 3


def test_yaml_exponent_without_dot_is_a_float(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("optim:\n  lr: 1e-3\n")
    assert TrainConfig.from_yaml(path).optim.lr == 1e-3


def test_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    TrainConfig().to_yaml(path)
    cfg = TrainConfig.from_yaml(path, ["model.num_attentions=16", "augment.fuse_crop_drop=true",
                                       "model.weights=s3://b/w.pt"])
    assert cfg.model.num_attentions == 16 and cfg.augment.fuse_crop_drop
    assert cfg.model.weights == "s3://b/w.pt"


@pytest.mark.parametrize(
    "d, field",
    [
        ({"model": {"num_attentions": 0}}, "model.num_attentions"),
        ({"model": {"num_classes": 1}}, "model.num_classes"),
        ({"model": {"backbone": "resnet9000"}}, "model.backbone"),
        ({"augment": {"crop_theta_low": 0.0}}, "augment.crop_theta_low"),
        ({"augment": {"drop_theta_high": 1.5}}, "augment.drop_theta_high"),
        ({"augment": {"crop_theta_low": 0.7, "crop_theta_high": 0.6}}, "augment.crop_theta_low"),
        ({"optim": {"lr": -1}}, "optim.lr"),
        ({"optim": {"epochs": "ten"}}, "optim.epochs"),
        ({"optim": {"lr_scaling": "sqrt"}}, "optim.lr_scaling"),
        ({"model": {"num_attention": 4}}, "model.num_attention"),
        ({"modle": {}}, "modle"),
        ({"inference": {"refine_theta": 1.0}}, "inference.refine_theta"),
        ({"data": {"image_size": 64, "resize_size": 32}}, "data.resize_size"),
    ],
)
def test_invalid_values_name_the_field(d, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        TrainConfig.from_dict(d)


def test_direct_construction_validates():
    with pytest.raises(ConfigError, match="num_attentions"):
        ModelConfig(num_attentions=0)
    with pytest.raises(ConfigError, match="drop_theta_low"):
        AugmentConfig(drop_theta_low=0.6, drop_theta_high=0.5)
    with pytest.raises(ConfigError, match="grad_clip_norm"):
        OptimConfig(grad_clip_norm=0.0)


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        TrainConfig.from_yaml(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim:\n  momentum: 2\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: optim\.momentum"):
        TrainConfig.from_yaml(bad)


CONFIGS = sorted((Path(__file__).parents[1] / "jobs" / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_shipped_configs_are_valid(path):
    cfg = TrainConfig.from_yaml(path)
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg


# What the paper's recipe (docs/algorithm.md §5) has for the settings the configs may add to it.
PAPER_OPTIM = {"warmup_epochs": 0.0, "grad_clip_norm": None}


def _header(path):
    """The comment lines before the first YAML key."""
    lines = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        lines.append(line.lstrip("#").strip())
    return lines


def _claims_paper_recipe(path):
    return "paper" in path.stem or any("paper recipe" in s.lower() for s in _header(path))


PAPER_CLAIMS = [p for p in CONFIGS if _claims_paper_recipe(p)]


def test_the_four_data_set_configs_claim_the_paper_recipe():
    # Guards the test below against a header reworded so that it checks nothing.
    assert {p.name for p in PAPER_CLAIMS} >= {
        f"{d}_inception_v3_448.yaml" for d in ("cub", "cars", "aircraft", "dogs")}


@pytest.mark.parametrize("path", PAPER_CLAIMS, ids=[p.name for p in PAPER_CLAIMS])
def test_paper_recipe_configs_explain_each_departure_in_their_header(path):
    """A config that calls itself the paper recipe names, in its header, every setting
    where it departs from it, with the value it uses, and says why (a comment after it)."""
    optim = TrainConfig.from_yaml(path).optim
    header = _header(path)
    for key, paper in PAPER_OPTIM.items():
        value = getattr(optim, key)
        if value == paper:
            continue
        lines = [s for s in header if s.startswith(f"optim.{key}:")]
        assert lines, f"{path.name}: optim.{key}={value} differs from the paper ({paper}) " \
                      "and the header does not explain it"
        stated, _, why = lines[0].partition(":")[2].partition(" -- ")
        assert float(stated) == value, f"{path.name}: header says {stated.strip()}, file {value}"
        assert len(why.split()) >= 5, f"{path.name}: optim.{key} in the header says no why"
