"""Every recipe and profile loads; tiny data exists; the full profiles carry the papers' numbers."""

import os

import pytest

from components.manifest import resolve_mixture
from pipelines.recipes import list_recipes, load_recipe, stage_config


@pytest.mark.parametrize("name", list_recipes())
@pytest.mark.parametrize("profile", ["tiny", "full"])
def test_every_recipe_and_profile_loads(name, profile, demo_dir):
    root, _ = demo_dir
    recipe = load_recipe(name, profile, demo_dir=str(root))
    assert recipe.stages and recipe.model.arch in ("llava_onevision", "llava")
    for stage in recipe.stages:
        config = stage_config(recipe, stage)
        assert config.template == stage.template
        if profile == "tiny":
            assert stage.max_steps is not None or stage.epochs <= 4  # tiny stays small: minutes on 2 CPUs
            entries = resolve_mixture(stage.data, recipe.data_root)
            assert entries and not any(e.read_error for e in entries)
            assert os.path.isabs(stage.data["datasets"][0]["json_path"])


def test_every_yaml_opens_with_the_command_that_runs_it():
    from pipelines.recipes import recipe_path

    for name in list_recipes():
        with open(recipe_path(name)) as f:
            assert f.readline().startswith(f"# llava-ray run --recipe {name}")


def test_onevision_full_profile_matches_table_1():
    r = load_recipe("llava_onevision", "full")
    s1, s15, s2, ov = r.stages
    assert (s1.trainable, s1.lr, s1.global_batch, s1.template) == (
        ["multi_modal_projector"],
        1e-3,
        512,
        "plain",
    )
    for s in (s15, s2, ov):
        assert set(s.trainable) == {"vision_tower", "multi_modal_projector", "language_model"}
        assert (
            s.lr == 1e-5 and s.vision_lr == 2e-6 and s.lr / s.vision_lr == pytest.approx(5) and s.epochs == 1
        )
        assert s.warmup_ratio == 0.03 and s.weight_decay == 0.0
    assert s2.anyres_config(r.model.anyres).max_tiles == 9 and ov.max_frames == 32
    assert r.model.anyres.tile_size == 384 and r.model.vision_feature_layer == -1


def test_llava_1_5_and_1_0_numbers():
    r = load_recipe("llava_v1_5", "full")
    pre, ft = r.stages
    assert (pre.zero_stage, pre.lr, pre.global_batch) == (2, 1e-3, 256)
    assert (ft.zero_stage, ft.lr, ft.global_batch) == (3, 2e-5, 128)
    assert r.model.projector == "mlp2x_gelu" and r.model.vision_feature_layer == -2
    v1 = load_recipe("llava_v1", "full")
    assert v1.model.projector == "linear" and v1.model.template == "vicuna_v0"
    assert all("vision_tower" not in s.trainable for s in v1.stages)


def test_interleave_mixes_formats():
    r = load_recipe("llava_next_interleave", "tiny")
    assert r.stage("interleave_m4").front_fraction == 0.5


def test_unknown_profile_and_stage_fields_are_errors(tmp_path):
    with pytest.raises(KeyError, match="profile"):
        load_recipe("llava_onevision", "huge")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nmodel: {}\nstages:\n  s: {template: plain, data: {datasets: [{json_path: a}]},"
                   " trainable: [multi_modal_projector], lr: 1, learning_rate: 2}\nprofiles: {tiny: {}}\n")  # fmt: skip
    with pytest.raises(ValueError, match="learning_rate"):
        load_recipe(str(bad), "tiny")
