"""The bad-input catalogue (RELIABILITY.md): every script refuses a bad input with exit status 2,
exactly one stderr line `error: ...` naming the file / field / value and what was expected, no
traceback, and nothing written half-way (the output folder is absent or unchanged).

Most cases run in this process through `run_inprocess` (the script's own `cli.run`, flags
re-registered, SystemExit caught, stderr captured); cases marked `subprocess` run as a real
`python scripts/X.py` to prove the whole process prints no traceback.
"""

import contextlib
import dataclasses
import importlib.util
import io
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from test_data_fixtures import write_coprov2_folder, write_users

ROOT = Path(__file__).resolve().parents[1]


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    script: str
    args: tuple[str, ...]  # after --workdir OUT; "{key}" is replaced by the `world` fixture's paths
    fragments: tuple[str, ...]  # each must appear in the error line
    config: str = ""  # default configs/<script>.py
    subprocess: bool = False


def case(name, script, args, fragments, **kw) -> Case:
    return Case(name, script, tuple(args), tuple(fragments), **kw)


CASES = [
    # --- scripts/train.py: config values and typos
    case("train_config_typo", "train", ["--config.lora.rnak=4"], ["rnak"], subprocess=True),
    case("train_wrong_type", "train", ["--config.train.steps=many"], ["--config.train.steps=many"]),
    case("train_missing_config_file", "train", [], ["configs/nope.py", "no such config file"],
         config="configs/nope.py", subprocess=True),
    case("train_unknown_preset", "train", [], ["sd9", "unknown preset"], config="configs/train.py:sd9"),
    case("train_rank_0", "train", ["--config.lora.rank=0"], ["--config.lora.rank=0", "an integer >= 1"]),
    case("train_negative_beta", "train", ["--config.dpo.beta=-1"], ["--config.dpo.beta=-1.0", "a number >= 0"]),
    case("train_resolution_not_multiple_of_8", "train", ["--config.data.resolution=100"],
         ["--config.data.resolution=100", "multiple of 8"]),
    case("train_heartbeat_timeout_0", "train", ["--config.distributed.heartbeat_timeout_s=0"],
         ["--config.distributed.heartbeat_timeout_s=0", "an integer >= 1 (seconds)"]),
    case("train_unknown_optimizer", "train", ["--config.optim.name=sgd"], ["--config.optim.name='sgd'", "adamw"]),
    case("train_missing_model_folder", "train", ["--config.model.path={missing}"], ["{missing}"]),
    case("train_non_sd_config", "train", ["--config.model.path={vae_only}"], ["{vae_only}"]),
    case("train_truncated_weights", "train", ["--config.model.path={truncated_unet}"],
         ["diffusion_pytorch_model.safetensors", "safetensors"], subprocess=True),
    case("train_pickle_weights_without_flag", "train", ["--config.model.path={pickle_unet}"], [".bin"]),
    case("train_workdir_other_config", "train", ["--config.model.path={unet}", "--config.lora.rank=3"],
         ["--config.lora.rank=2, not 3", "new --workdir"], config="configs/train.py:tiny"),
    case("train_workdir_other_base_model", "train", ["--config.model.path={unet}", "--config.lora.rank=2"],
         ["base model", "new --workdir"]),
    case("train_workdir_is_a_file", "train", [], ["--workdir={a_file}", "cannot create the output folder"],
         config="configs/train.py:tiny", subprocess=True),
    case("train_missing_cache", "train", ["--config.model.path={unet}", "--config.data.source=cache",
                                          "--config.data.cache_dir={missing}"],
         ["{missing}", "not a latent cache"]),
    # --- scripts/sample.py
    case("sample_missing_model_folder", "sample", ["--config.model={missing}", "--config.prompts={prompts_txt}"],
         ["{missing}"]),
    case("sample_unknown_hub_id", "sample", ["--config.model=no-org/no-model", "--config.prompts={prompts_txt}"],
         ["--config.model='no-org/no-model' not found", "local diffusers folder", "Hugging Face cache", "single-file"]),
    case("sample_single_file_model", "sample", ["--config.model={single_file}", "--config.prompts={prompts_txt}"],
         ["single-file checkpoint", "scripts/convert_single_file.py"]),
    case("convert_unreadable_single_file", "convert_single_file",
         ["--config.checkpoint={single_file}", "--config.base={pipeline}"], ["{single_file}", "not a readable safetensors file"]),
    case("sample_missing_prompts_file", "sample", ["--config.model={pipeline}", "--config.prompts={missing}.txt"],
         ["{missing}.txt", "no such prompt file"]),
    case("sample_csv_without_caption_column", "sample", ["--config.model={pipeline}", "--config.prompts={bad_csv}"],
         ["{bad_csv}", "prompt/caption"]),
    case("sample_unknown_sampler", "sample", ["--config.sampler=heun", "--config.prompts={prompts_txt}"],
         ["--config.sampler='heun'", "expected one of"]),
    case("sample_steps_0", "sample", ["--config.steps=0", "--config.prompts={prompts_txt}"],
         ["--config.steps=0", ">= 1"]),
    case("sample_pipeline_missing_component", "sample", ["--config.model={no_vae_pipeline}",
                                                         "--config.prompts={prompts_txt}"], ["vae"]),
    case("sample_adapter_without_user", "sample", ["--config.checkpoint={adapter_run}",
                                                    "--config.prompts={prompts_txt}"], ["needs a user"]),
    case("sample_user_without_embedding", "sample",
         ["--config.checkpoint={adapter_run}", "--config.prompts={prompts_txt}", "--config.user_id=5",
          "--config.embeddings={embeddings}"], ["user 0000005 has no embedding", "embed_users.py"]),
    case("sample_embedding_wrong_size", "sample",
         ["--config.checkpoint={adapter_run}", "--config.prompts={prompts_txt}",
          "--config.user_embedding={wrong_embedding}"], ["{wrong_embedding}", "5 values"]),
    case("sample_lora_for_another_unet", "sample",
         ["--config.model={pipeline}", "--config.checkpoint={lora_other_unet_run}", "--config.prompts={prompts_txt}",
          "--config.steps=1"],
         ["--config.checkpoint={lora_other_unet_run}: made for another UNet", "attn2/to_k", "(32, 32)"],
         subprocess=True),
    case("sample_unwritable_output", "sample", ["--config.model={pipeline}", "--config.prompts={prompts_txt}"],
         ["cannot create the output folder"], subprocess=True),
    # --- scripts/export.py
    case("export_empty_checkpoint", "export", [], ["--config.checkpoint is empty"]),
    case("export_missing_checkpoint", "export", ["--config.checkpoint={missing}"], ["{missing}", "no such"]),
    case("export_unknown_format", "export", ["--config.checkpoint={lora_run}"], ["--config.format='onnx'", "peft"],
         config="configs/export.py:onnx"),
    case("export_adapter_from_lora_run", "export", ["--config.checkpoint={lora_run}"], ["holds no PSA adapter"],
         config="configs/export.py:ip-adapter"),
    case("export_lora_from_adapter_run", "export", ["--config.checkpoint={adapter_run}"], ["no LoRA", "'peft'"]),
    case("export_missing_step", "export", ["--config.checkpoint={lora_run}", "--config.step=7"],
         ["no checkpoint 7", "found steps [0]"]),
    case("export_damaged_checkpoint", "export", ["--config.checkpoint={damaged_run}"],
         ["damaged or incomplete"], subprocess=True),
    case("export_unet_missing_base_model", "export", ["--config.checkpoint={lora_run}", "--config.model={missing}"],
         ["{missing}", "no such folder"], config="configs/export.py:unet"),
    case("export_unet_lora_for_another_unet", "export",
         ["--config.checkpoint={lora_other_unet_run}", "--config.model={pipeline}"],
         ["made for another UNet", "attn2/to_k", "(32, 32)"], config="configs/export.py:unet"),
    case("export_unwritable_output", "export", ["--config.checkpoint={lora_run}"],
         ["cannot create the output folder"]),
    # --- scripts/prepare_data.py
    case("prepare_empty_pipeline", "prepare_data", [], ["--config.pipeline is empty"]),
    case("prepare_unknown_kind", "prepare_data", ["--config.pipeline={pipeline}", "--config.kind=laion"],
         ["--config.kind='laion'"]),
    case("prepare_dataset_not_built", "prepare_data", ["--config.pipeline={pipeline}", "--config.dataset={missing}"],
         ["{missing}", "not a built TFDS data set"]),
    case("prepare_resolution_not_multiple_of_8", "prepare_data",
         ["--config.pipeline={pipeline}", "--config.dataset={missing}", "--config.resolution=100"],
         ["resolution 100", "multiple of 8"]),
    case("prepare_csv_missing_columns", "prepare_data",
         ["--config.pipeline={pipeline}", "--config.table={csv_missing_columns}", "--config.images={coprov2}/images",
          "--config.tfds_dir={tfds_dir}"], ["{csv_missing_columns}", "image"]),
    case("prepare_missing_image_folder", "prepare_data",
         ["--config.pipeline={pipeline}", "--config.table={coprov2}/CoProv2_train.csv", "--config.images={missing}",
          "--config.tfds_dir={tfds_dir}"], ["{missing}", "does not exist"]),
    case("prepare_bad_rows_policy_fail", "prepare_data",
         ["--config.pipeline={pipeline}", "--config.table={coprov2}/CoProv2_train.csv",
          "--config.images={coprov2}/images", "--config.tfds_dir={tfds_dir}", "--config.policy=fail"],
         ["CoProv2_train.csv:"]),
    case("prepare_pairs_missing_images", "prepare_data",
         ["--config.pipeline={pipeline}", "--config.kind=pairs", "--config.table={pairs_missing_images}"],
         ["pairs table {pairs_missing_images}: no usable pair left", "{'missing_image': 2}", "pairs.csv:2"]),
    # --- scripts/embed_users.py
    case("embed_missing_users_csv", "embed_users", ["--config.users_csv={missing}.csv"], ["{missing}.csv"]),
    case("embed_users_csv_missing_columns", "embed_users", ["--config.users_csv={bad_csv}"], ["{bad_csv}", "Age"]),
    case("embed_missing_template", "embed_users", ["--config.users_csv={users_csv}", "--config.template={missing}"],
         ["{missing}", "template"]),
    case("embed_unknown_user", "embed_users", ["--config.users_csv={users_csv}", "--config.template={template}",
                                               "--config.users=99"], ["user 0000099 is not in the users file"]),
    case("embed_bad_user_range", "embed_users", ["--config.users_csv={users_csv}", "--config.template={template}",
                                                 "--config.users=a-b"], ["user id 'a'", "a number"]),
    case("embed_template_missing_placeholders", "embed_users",
         ["--config.users_csv={users_csv}", "--config.template={bad_template}"], ["lacks the placeholders <<AGE>>"]),
    case("embed_model_not_a_model", "embed_users", ["--config.users_csv={users_csv}", "--config.template={template}",
                                                    "--config.model={missing}"], ["{missing}", "config.json"]),
    # --- scripts/merge.py and scripts/evaluate.py
    case("merge_unknown_output_form", "merge", ["--config.output.form=zip"], ["--config.output.form='zip'"]),
    case("merge_missing_experts", "merge", ["--config.experts={missing}"], ["{missing}"]),
    case("train_experts_unknown_category", "train_experts", ["--config.data.source=cache",
         "--config.data.cache_dir={category_cache}", "--config.experts.categories=Hate,Spam"],
         ["--config.experts.categories", "'Spam'", "'Hate', 'cats on sofas'"], config="configs/train.py:tiny"),
    case("train_experts_no_cache_dir", "train_experts", ["--config.data.source=cache"],
         ["--config.data.cache_dir is empty"], config="configs/train.py:tiny"),
    case("train_experts_synthetic_source", "train_experts", [], ["--config.data.source=synthetic"],
         config="configs/train.py:tiny"),
    case("evaluate_unknown_benchmark", "evaluate", ["--config.benchmarks=nope"], ["nope"]),
    case("evaluate_missing_model", "evaluate", ["--config.model={missing}"], ["--config.model=", "{missing}"]),
]


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_unet_dir, tiny_unet) -> dict:
    """Every input the cases refer to, built once (tiny models, tiny files)."""
    import shutil

    from flax import traverse_util
    from pipelines import build_sd

    from safealign_jax import adapter, lora, runs
    from safealign_jax.runs import save_trained

    tmp = tmp_path_factory.mktemp("world")
    w = {"missing": str(tmp / "does_not_exist"), "unet": tiny_unet_dir}
    w["pipeline"] = build_sd(tmp)
    base = {"path": tiny_unet_dir, "sha256": runs.hash_folder(tiny_unet_dir)}
    _, params = tiny_unet
    trained_config = {"lora": {"rank": 2, "alpha": 2.0}, "psa": {"scale": 1.0}}
    tree = lora.init(jax.random.key(0), params, lora.LoRAConfig(rank=2, alpha=2.0))
    w["lora_run"] = str(tmp / "lora_run")
    save_trained(w["lora_run"], {"lora": tree}, trained_config, base)
    w["adapter_run"] = str(tmp / "adapter_run")
    save_trained(w["adapter_run"], {"adapter": adapter.init(jax.random.key(1), params, 8, 1)}, trained_config, base)
    # a LoRA made for a UNet whose cross-attention width is 48 (this one's is 32)
    wider = {path: np.zeros((48, x.shape[1]), np.float32) if path[-3:-1] in (("attn2", "to_k"), ("attn2", "to_v"))
             and path[-1] == "kernel" else x for path, x in traverse_util.flatten_dict(params).items()}
    wider = traverse_util.unflatten_dict(wider)
    w["lora_other_unet_run"] = str(tmp / "lora_other_unet_run")
    save_trained(w["lora_other_unet_run"], {"lora": lora.init(jax.random.key(0), wider, lora.LoRAConfig(rank=2))},
                 trained_config, base)
    w["damaged_run"] = str(tmp / "damaged_run")
    shutil.copytree(w["lora_run"], w["damaged_run"])
    for f in (Path(w["damaged_run"]) / "checkpoints/0/state").rglob("*"):
        if f.is_file() and f.stat().st_size > 1000:
            f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    # model folders: VAE-only, truncated UNet weights, pickle-only UNet, a pipeline without its VAE
    vae_only = tmp / "vae_only"
    shutil.copytree(Path(w["pipeline"]) / "vae", vae_only)
    w["vae_only"] = str(vae_only)
    truncated = tmp / "truncated_unet"
    shutil.copytree(tiny_unet_dir, truncated)
    weights = truncated / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:5000])
    w["truncated_unet"] = str(truncated)
    (tmp / "model.safetensors").write_bytes(weights.read_bytes())  # a single file cut short
    w["single_file"] = str(tmp / "model.safetensors")
    pickle_unet = tmp / "pickle_unet"
    shutil.copytree(tiny_unet_dir, pickle_unet)
    (pickle_unet / "diffusion_pytorch_model.safetensors").rename(pickle_unet / "diffusion_pytorch_model.bin")
    w["pickle_unet"] = str(pickle_unet)
    no_vae = tmp / "no_vae_pipeline"
    shutil.copytree(w["pipeline"], no_vae, ignore=shutil.ignore_patterns("vae"))
    w["no_vae_pipeline"] = str(no_vae)
    # training workdirs holding a checkpoint of another config / another base model
    for name, sha in (("train_workdir_other_config", base["sha256"]), ("train_workdir_other_base_model", "0" * 64)):
        ckpts = runs.Checkpoints(str(tmp / "out" / name), keep=1, async_save=False)
        ckpts.save(1, {"step": np.int32(1)}, {"lora": {"rank": 2, "alpha": 2.0},
                                              "optim": {"name": "adamw", "grad_accum": 1, "clip_norm": 1.0}},
                   {"index": 1}, {"path": "/elsewhere/unet", "sha256": sha})
        ckpts.close()
    # text inputs
    (tmp / "prompts.txt").write_text("a cat\na dog\n")
    w["prompts_txt"] = str(tmp / "prompts.txt")
    (tmp / "bad.csv").write_text("file_name,text\na.jpg,a cat\n")
    w["bad_csv"] = str(tmp / "bad.csv")
    (tmp / "embeddings").mkdir()
    w["embeddings"] = str(tmp / "embeddings")
    np.save(tmp / "wrong.npy", np.zeros(5, np.float32))
    w["wrong_embedding"] = str(tmp / "wrong.npy")
    write_users(tmp / "users.csv")
    w["users_csv"] = str(tmp / "users.csv")
    (tmp / "bad_template.txt").write_text("Age {Age}, {Gender}")
    w["bad_template"] = str(tmp / "bad_template.txt")
    fields = ["AGE", "AGE_GROUP", "GENDER", "RELIGION", "MENTAL", "PHYSICAL", "BANNED", "ALLOWED"]
    (tmp / "template.txt").write_text(" ".join(f"<<{f}>>" for f in fields))
    w["template"] = str(tmp / "template.txt")
    write_coprov2_folder(tmp / "coprov2")
    w["coprov2"] = str(tmp / "coprov2")
    (tmp / "missing_columns.csv").write_text("prompt,category\na cat,Hate\n")
    w["csv_missing_columns"] = str(tmp / "missing_columns.csv")
    (tmp / "pairs").mkdir()  # a pairs table whose images are all missing (a single missing one is skipped)
    (tmp / "pairs" / "pairs.csv").write_text("prompt,chosen,rejected\na cat,a.png,b.png\na dog,c.png,d.png\n")
    w["pairs_missing_images"] = str(tmp / "pairs" / "pairs.csv")
    w["tfds_dir"] = str(tmp / "tfds")
    w["category_cache"] = category_cache(tmp / "category_cache", ["Hate", "cats on sofas"])
    # an output path that cannot be created: its parent is a file
    (tmp / "a_file").write_text("")
    w["a_file"] = str(tmp / "a_file")
    w["unwritable"] = str(tmp / "a_file" / "out")
    w["out"] = str(tmp / "out")
    return w


def category_cache(folder: Path, names: list[str]) -> str:
    """The metadata of a latent cache with these categories (no shards): what train_experts reads."""
    import json

    from safealign_jax.data import cache

    folder.mkdir()
    (folder / cache.METADATA).write_text(json.dumps(
        {"format": cache.FORMAT, "shards": [], "category_index": {n: [i] for i, n in enumerate(names)}}))
    (folder / cache.EMPTY).write_bytes(cache.pack({"encoder_hidden_states": np.zeros((2, 4), np.float32)}))
    return str(folder)


def fill(text: str, world: dict) -> str:
    for key, value in world.items():
        text = text.replace("{" + key + "}", value)
    return text


def run_inprocess(script: str, argv: list[str]) -> tuple[int, str]:
    """Runs scripts/<script>.py's `cli.run` in this process: (exit status, stderr)."""
    from absl import flags

    from safealign_jax import cli

    _forget_script_flags(flags)  # each script defines --config (+ overrides), --workdir afresh
    spec = importlib.util.spec_from_file_location(f"script_{script}", ROOT / f"scripts/{script}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config_flag = module.CONFIG if hasattr(module, "CONFIG") else cli.define_flags()
    err, saved_argv = io.StringIO(), sys.argv
    sys.argv = [f"scripts/{script}.py", *argv]
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            cli.run(module.main, config_flag)
        code = 0
    except SystemExit as e:
        code = e.code or 0
    finally:
        sys.argv = saved_argv
        _forget_script_flags(flags)  # leave no definitions for other test modules' imports
    return code, err.getvalue()


def _forget_script_flags(flags) -> None:
    for name in list(flags.FLAGS):
        if name in ("config", "workdir") or name.startswith("config."):
            delattr(flags.FLAGS, name)


def run_subprocess(script: str, argv: list[str]) -> tuple[int, str]:
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    result = subprocess.run([sys.executable, f"scripts/{script}.py", *argv], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=300)
    return result.returncode, result.stderr


def snapshot(folder: str) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in Path(folder).rglob("*")) if os.path.isdir(folder) else []


@pytest.mark.parametrize("c", CASES, ids=[c.name for c in CASES])
def test_bad_input(c: Case, world):
    unwritable = "unwritable_output" in c.name
    workdir = world["unwritable"] if unwritable else os.path.join(world["out"], c.name)
    if c.name.endswith("workdir_is_a_file"):
        workdir = world["a_file"]
    before = snapshot(workdir)
    config = c.config or f"configs/{c.script}.py"
    argv = ["--config", config, "--workdir", workdir, *(fill(a, world) for a in c.args)]
    code, stderr = (run_subprocess if c.subprocess else run_inprocess)(c.script, argv)
    lines = stderr.strip().splitlines()
    assert code == 2, stderr[-3000:]
    assert "Traceback" not in stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr[-3000:]
    for fragment in c.fragments:
        assert fill(fragment, world) in lines[0], lines[0]
    assert snapshot(workdir) == before  # nothing written (a created folder stays empty)
    print(f"\n{c.name}: {lines[0]}")


def test_catalogue_is_documented():
    """RELIABILITY.md lists every case of this file by name."""
    text = (ROOT / "RELIABILITY.md").read_text()
    missing = [c.name for c in CASES if f"`{c.name}`" not in text]
    assert not missing, missing
    assert len(CASES) >= 25


def _changed_copy(source: Path, target: Path, change) -> str:
    from safetensors.numpy import load_file, save_file

    tensors = load_file(str(source))
    key = sorted(tensors)[0]
    tensors[key] = change(tensors[key])
    save_file(tensors, str(target))
    return str(target)


def test_shape_mismatched_lora_and_adapter_files(world, tiny_unet, tmp_path):
    """Library level (no script reads these files): a LoRA / IP-Adapter file whose tensor has the
    wrong shape is one UserError line naming the file and the tensor."""
    from safealign_jax import adapter, lora
    from safealign_jax.convert.adapter_files import load_ip_adapter, save_ip_adapter
    from safealign_jax.convert.lora_files import load_lora_file, save_peft_lora
    from safealign_jax.errors import UserError

    _, params = tiny_unet
    tree = lora.init(jax.random.key(0), params, lora.LoRAConfig(rank=2, alpha=2.0))
    save_peft_lora(str(tmp_path / "lora.safetensors"), tree, 2, 2.0)
    bad = _changed_copy(tmp_path / "lora.safetensors", tmp_path / "bad_lora.safetensors",
                        lambda x: np.concatenate([x, x], axis=-1))
    save_ip_adapter(str(tmp_path / "ip.safetensors"), adapter.init(jax.random.key(1), params, 8, 1), params)
    bad_ip = _changed_copy(tmp_path / "ip.safetensors", tmp_path / "bad_ip.safetensors", lambda x: x[..., :-1])
    for load, path in ((load_lora_file, bad), (load_ip_adapter, bad_ip)):
        with pytest.raises(UserError) as e:
            load(path, params)
        message = str(e.value)
        assert path in message and "shape" in message and len(message.splitlines()) == 1, message
        print(f"\n{Path(path).name}: {message}")
