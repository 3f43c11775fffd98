"""Every recipe and profile loads; tiny data exists; the full profiles carry the papers' numbers."""

import os

import pytest

from components.manifest import resolve_mixture
from components.processor import VideoSampling
from pipelines.recipes import list_recipes, load_recipe, step_config


@pytest.mark.parametrize("name", list_recipes())
@pytest.mark.parametrize("profile", ["tiny", "full"])
def test_every_recipe_and_profile_loads(name, profile, demo_dir):
    root, _ = demo_dir
    recipe = load_recipe(name, profile, demo_dir=str(root))
    assert recipe.stages and recipe.model.arch in ("llava_onevision", "llava_next", "llava")
    for stage in recipe.stages:
        config = step_config(recipe, stage)
        assert config.processor.template == stage.template
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


CLIP = ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))
SIGLIP = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
ALL = {"vision_tower", "multi_modal_projector", "language_model"}
PROJ, PROJ_LLM = {"multi_modal_projector"}, {"multi_modal_projector", "language_model"}

# The papers' values, written here (LLaVA: Liu et al. 2023, Sec. 4; LLaVA-1.5: Liu et al. 2023, Table 9 and
# the released scripts; LLaVA-NeXT-Interleave: Li et al. 2024; OneVision: Li et al. 2024, Table 1; the
# llava-hf conversions for the vision layer and normalization).
PAPERS = {
    "llava_v1": {
        "model": dict(
            arch="llava",
            vision="openai/clip-vit-large-patch14",
            projector="linear",
            vision_feature_layer=-2,
            vision_layers=None,
            template="vicuna_v0",
        ),
        "anyres": dict(tile_size=224, patch_size=14, multi_image_mode="pad", norm=CLIP),
        "stages": [
            dict(name="pretrain", template="vicuna_v0", trainable=PROJ, lr=2e-3, global_batch=128, epochs=1),
            dict(
                name="finetune", template="vicuna_v0", trainable=PROJ_LLM, lr=2e-5, global_batch=32, epochs=3
            ),
        ],
    },
    "llava_v1_5": {
        "model": dict(
            arch="llava",
            vision="openai/clip-vit-large-patch14-336",
            projector="mlp2x_gelu",
            vision_feature_layer=-2,
            vision_layers=None,
            template="vicuna_v1",
        ),
        "anyres": dict(tile_size=336, patch_size=14, multi_image_mode="pad", norm=CLIP),
        "stages": [
            dict(name="pretrain", template="plain", trainable=PROJ, lr=1e-3, global_batch=256, zero_stage=2),
            dict(
                name="finetune",
                template="vicuna_v1",
                trainable=PROJ_LLM,
                lr=2e-5,
                global_batch=128,
                zero_stage=3,
            ),
        ],
    },
    "llava_v1_5_hd": {
        "model": dict(
            arch="llava_next",
            vision="openai/clip-vit-large-patch14",
            projector="mlp2x_gelu",
            vision_feature_layer=-2,
            vision_layers=None,
            template="vicuna_v1",
        ),
        "anyres": dict(
            tile_size=224,
            patch_size=14,
            norm=CLIP,
            grids=(
                (1, 1),
                (1, 2),
                (2, 1),
                (1, 3),
                (3, 1),
                (1, 4),
                (4, 1),
                (1, 5),
                (5, 1),
                (1, 6),
                (6, 1),
                (2, 2),
                (2, 3),
                (3, 2),
            ),
        ),
        "stages": [
            dict(name="pretrain", template="plain", trainable=PROJ, lr=1e-3, global_batch=256),
            dict(name="finetune", template="vicuna_v1", trainable=PROJ_LLM, lr=2e-5, global_batch=128),
        ],
    },
    "llava_next_interleave": {
        "model": dict(
            arch="llava_onevision",
            vision="google/siglip-so400m-patch14-384",
            projector="mlp2x_gelu",
            vision_feature_layer=-1,
            vision_layers=26,
            template="chatml",
        ),
        "anyres": dict(tile_size=384, patch_size=14, norm=SIGLIP),
        "stages": [
            dict(name="stage1", template="plain", trainable=PROJ, lr=1e-3, base_only=True),
            dict(name="single_image", template="chatml", trainable=ALL, lr=1e-5, vision_lr=2e-6),
            dict(
                name="interleave_m4",
                template="chatml",
                trainable=ALL,
                lr=1e-5,
                vision_lr=2e-6,
                front_fraction=0.5,
            ),
        ],
    },
    "llava_onevision": {
        "model": dict(
            arch="llava_onevision",
            vision="google/siglip-so400m-patch14-384",
            projector="mlp2x_gelu",
            vision_feature_layer=-1,
            vision_layers=26,
            template="chatml",
        ),
        "anyres": dict(tile_size=384, patch_size=14, max_grid=6, max_tiles=9, norm=SIGLIP),
        "stages": [
            dict(
                name="stage1",
                template="plain",
                trainable=PROJ,
                lr=1e-3,
                global_batch=512,
                base_only=True,
                epochs=1,
            ),
            dict(
                name="stage1_5",
                template="chatml",
                trainable=ALL,
                lr=1e-5,
                vision_lr=2e-6,
                epochs=1,
                warmup_ratio=0.03,
                weight_decay=0.0,
            ),
            dict(
                name="stage2_si",
                template="chatml",
                trainable=ALL,
                lr=1e-5,
                vision_lr=2e-6,
                max_tiles=9,
                epochs=1,
            ),
            dict(
                name="stage2_ov",
                template="chatml",
                trainable=ALL,
                lr=1e-5,
                vision_lr=2e-6,
                max_tiles=9,
                video=VideoSampling(fps=1.0, max_frames=32),
                epochs=1,
            ),
        ],
    },
}


@pytest.mark.parametrize("name", sorted(PAPERS))
def test_full_profiles_carry_the_papers_values(name):
    """Every recipe's full profile against the table above: architecture, encoders, projector, the vision
    layer, normalization, tiling, templates, trainable parts, LRs and batches per stage."""
    paper, recipe = PAPERS[name], load_recipe(name, "full")
    for key, value in paper["model"].items():
        assert getattr(recipe.model, key) == value, (name, key)
    anyres = recipe.model.anyres
    for key, value in paper["anyres"].items():
        found = (tuple(anyres.mean), tuple(anyres.std)) if key == "norm" else getattr(anyres, key)
        assert found == value, (name, key, found)
    assert [s.name for s in recipe.stages] == [s["name"] for s in paper["stages"]]
    for stage, expected in zip(recipe.stages, paper["stages"], strict=True):
        config = stage.processor_config(recipe.model)
        for key, value in expected.items():
            if key in ("base_only", "max_tiles"):
                found = getattr(config.anyres, key)
            elif key == "trainable":
                found = set(stage.trainable)
            else:
                found = getattr(stage, key)
            assert found == value, (name, stage.name, key, found)
        assert config.anyres.mean == anyres.mean  # every stage normalizes as its encoder expects


def test_cli_names_every_bad_recipe_profile_and_stage(capsys):
    """Bad --recipe, --profile, --from, --until and stage names: one line in the project's grammar (what was
    asked, what there is), exit 2, before any Ray starts."""
    from pipelines.cli import main

    cases = [
        (["run", "--recipe", "nosuch"], "--recipe: expected one of"),
        (["run", "--profile", "huge"], "--profile: expected a profile of recipe llava_onevision"),
        (
            ["run", "--from", "nosuchstage"],
            "--from: expected a stage of recipe llava_onevision (stage1, stage1_5",
        ),
        (["run", "--until", "stage9"], "--until: expected a stage of recipe llava_onevision"),
        (
            ["run", "--from", "stage2_ov", "--until", "stage1"],
            "--from/--until: expected 'stage2_ov' no later than",
        ),
        (
            ["stage", "stage3", "--recipe", "llava_v1"],
            "stage: expected a stage of recipe llava_v1 (pretrain, finetune)",
        ),
    ]
    for argv, message in cases:
        with pytest.raises(SystemExit) as exit_:
            main(argv)
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and message in err and "Traceback" not in err, (argv, err)


def test_seed_workers_and_step_cap_reach_the_model_and_every_stage(demo_dir):
    """``llava-ray run --seed 1 --max-steps 4 --workers 1``: the seed sets the model's initialisation
    (another seed, other weights) and every stage's seed (data order, mixture sampling); the cap limits
    every stage and keeps a checkpoint half-way; the workers replace the profile's. Without the flags the
    recipe is unchanged.
    Guards: --seed reaches the recipe's one seed; fails with with_overrides leaving it alone."""
    import torch

    from components.model import build_model
    from pipelines.cli import _pipeline_config, build_parser
    from pipelines.dag import with_overrides

    root, _ = demo_dir
    recipe = load_recipe("llava_v1", "tiny", demo_dir=str(root))
    args = build_parser().parse_args(
        ["run", "--recipe", "llava_v1", "--seed", "1", "--max-steps", "4", "--workers", "1"]
    )
    cfg = _pipeline_config(args)
    assert (cfg.seed, cfg.max_steps, cfg.workers) == (1, 4, 1)
    seeded = with_overrides(recipe, cfg)
    assert recipe.workers == 2 and seeded.workers == 1
    assert (recipe.seed, seeded.seed) == (0, 1)
    assert [(s.max_steps, s.checkpoint_every) for s in seeded.stages] == [(4, 2), (4, 2)]
    assert with_overrides(recipe, _pipeline_config(build_parser().parse_args(["run"]))) == recipe
    weights = [
        build_model(r.model, seed=r.seed)[0].state_dict()["model.multi_modal_projector.linear.weight"]
        for r in (recipe, seeded)
    ]
    assert not torch.equal(*weights)


def test_unknown_profile_and_stage_fields_are_errors(tmp_path):
    with pytest.raises(ValueError, match="profile"):
        load_recipe("llava_onevision", "huge")
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "name: x\nmodel: {}\nstages:\n  s: {template: plain, data: {datasets: [{json_path: a}]},"
        " trainable: [multi_modal_projector], lr: 1, learning_rate: 2}\nprofiles: {tiny: {}}\n"
    )
    with pytest.raises(ValueError, match="learning_rate"):
        load_recipe(str(bad), "tiny")


def test_one_set_of_defaults_and_one_validation_per_setting(tmp_path):
    """A recipe that leaves a setting out gets the dataclass's default (load_recipe keeps none of its
    own); a bad value is refused where the setting is defined, naming it; and a run's override (--data-mode)
    passes through the same validation as the YAML's."""
    import dataclasses

    from pipelines.dag import PipelineConfig, with_overrides
    from pipelines.recipes import Recipe, StageSpec

    minimal = tmp_path / "minimal.yaml"
    minimal.write_text(
        "name: x\nmodel: {}\nstages:\n  s: {template: plain, data: {datasets: [{json_path: a}]},"
        " trainable: [multi_modal_projector], lr: 1}\nprofiles: {tiny: {}}\n"
    )
    recipe = load_recipe(str(minimal), "tiny")
    defaults = {f.name: f.default for f in dataclasses.fields(Recipe) if f.default is not dataclasses.MISSING}
    assert {k: getattr(recipe, k) for k in defaults} == defaults
    stage_defaults = {
        f.name: f.default for f in dataclasses.fields(StageSpec) if f.default is not dataclasses.MISSING
    }
    assert {k: getattr(recipe.stage("s"), k) for k in stage_defaults} == stage_defaults
    for bad, match in (
        (dict(workers=0), "workers: expected"),
        (dict(cpus_per_worker="2"), "cpus_per_worker"),
    ):
        with pytest.raises(ValueError, match=match):
            dataclasses.replace(recipe, **bad)
    with pytest.raises(ValueError, match="stage s: data_mode: expected one of"):
        with_overrides(recipe, PipelineConfig(data_mode="disk"))
    assert {s.data_mode for s in with_overrides(recipe, PipelineConfig(data_mode="stream")).stages} == {
        "stream"
    }


HF_CLASSES = {
    "llava": "LlavaForConditionalGeneration",
    "llava_next": "LlavaNextForConditionalGeneration",
    "llava_onevision": "LlavaOnevisionForConditionalGeneration",
}


@pytest.mark.parametrize("name", list_recipes())
def test_every_tiny_recipe_model_exports_a_transformers_checkpoint(name, demo_dir, tmp_path):
    """Each recipe's tiny model, saved as its stages export it, loads with AutoModelForImageTextToText into
    its architecture's transformers class with no missing or unexpected keys, and gives the logits of the
    model that was saved (the in-memory one, an independent reference: a weight or config field lost on
    save shows) on its processor's probe batch. Untrained, without a stage: the e2e DAG test checks every
    recipe's trained exports against their training-time logits.
    Guards: save_model keeps every weight; fails with image_newline zeroed on save."""
    import torch
    from transformers import AutoModelForImageTextToText

    from components.model import build_model, save_model

    root, _ = demo_dir
    recipe = load_recipe(name, "tiny", demo_dir=str(root))
    model, processor = build_model(recipe.model)
    batch = processor.probe_batch()
    with torch.no_grad():
        saved = model.eval()(**batch).logits
    save_model(model, processor, str(tmp_path / "hf"))
    hf, info = AutoModelForImageTextToText.from_pretrained(tmp_path / "hf", output_loading_info=True)
    assert not any(info.values()), info
    assert type(hf).__name__ == HF_CLASSES[recipe.model.arch]
    with torch.no_grad():
        assert torch.allclose(hf.eval()(**batch).logits, saved, atol=1e-5)


def test_each_config_given_no_values_is_its_dataclass_defaults(tmp_path):
    """Guards: each setting defined once; fails if the CLI, serve.yaml's loader or a derived config states
    a default of its own."""
    from components.evaluation import ANSWER_TOKENS, evaluate
    from components.scheduler import EngineConfig
    from pipelines.cli import _generate_config, _pipeline_config, build_parser
    from pipelines.dag import PipelineConfig
    from pipelines.generate import GenerateConfig
    from pipelines.recipes import EvalSpec, Recipe, StageSpec
    from pipelines.steps import StepConfig
    from serve.app import ServeConfig, load_serve_config

    parser = build_parser()
    assert _pipeline_config(parser.parse_args(["run"])) == PipelineConfig()
    required = ["--images", "i.json", "--endpoint", "http://x/v1", "--model", "m", "--out", "o"]
    assert _generate_config(parser.parse_args(["generate", *required])) == GenerateConfig(
        endpoint="http://x/v1", model="m", out="o"
    )
    empty = tmp_path / "serve.yaml"
    empty.write_text("")
    assert load_serve_config(str(empty), "ckpt") == ServeConfig(checkpoint="ckpt")
    assert ServeConfig(checkpoint="ckpt").engine == EngineConfig()
    steps = StepConfig()
    assert (steps.max_length, steps.front_fraction, steps.seed) == (
        StageSpec.max_length,
        StageSpec.front_fraction,
        Recipe.seed,
    )
    assert EvalSpec().max_new_tokens == ANSWER_TOKENS == evaluate.__kwdefaults__["max_new_tokens"]
