"""Hugging Face checkpoint -> .pumice conversion on the real SmolLM2-135M-Instruct checkpoint."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from pumice.converter import (CheckpointError, MissingFileError, UnsupportedCheckpointError,
                              convert, load_checkpoint)
from pumice.converter.hf import model_config_from_hf
from pumice.converter.rtn import quantize_rtn
from pumice.format import PumiceFile, dequantize
from pumice.format.kinds import dequantize_parts

CONFIG_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
               "num_attention_heads", "num_key_value_heads", "head_dim", "max_position_embeddings",
               "tie_word_embeddings", "attention_bias", "mlp_bias")


def source_tensors(smollm2_dir):
    with safe_open(str(smollm2_dir / "model.safetensors"), framework="pt") as handle:
        return {name: handle.get_tensor(name) for name in handle.keys()}


def tensor_bits(tensor: torch.Tensor) -> np.ndarray:
    if tensor.dtype == torch.bfloat16:
        return tensor.view(torch.int16).numpy().view(np.uint16)
    return tensor.numpy()


def link_checkpoint_files(src, dst, skip_weights=True):
    dst.mkdir()
    for path in src.iterdir():
        if skip_weights and path.suffix in (".safetensors", ".bin"):
            continue
        (dst / path.name).symlink_to(path)
    return dst


def same_tensors(path_a, path_b):
    """Both files hold the same tensors with identical bytes (provenance may differ)."""
    with PumiceFile(path_a) as a, PumiceFile(path_b) as b:
        assert list(a.tensors) == list(b.tensors)
        for name, info in a.tensors.items():
            other = b.tensors[name]
            assert (info.kind, info.shape, info.params) == (other.kind, other.shape, other.params)
            for part, p in info.parts.items():
                assert p.crc32 == other.parts[part].crc32, (name, part)
                assert np.array_equal(a.part(name, part), b.part(name, part)), (name, part)
        meta_a = {k: v for k, v in a.metadata.items() if k != "provenance"}
        meta_b = {k: v for k, v in b.metadata.items() if k != "provenance"}
        assert meta_a == meta_b


# ------------------------------------------------------------------ dense

def test_dense_metadata(smollm2_dir, convert_smollm2):
    hf_config = json.loads((smollm2_dir / "config.json").read_text())
    with PumiceFile(convert_smollm2("dense")) as f:
        meta = f.metadata
        assert meta["architecture"] == "llama"
        for key in CONFIG_KEYS:
            assert meta["config"][key] == hf_config[key], key
        assert meta["config"]["rope_theta"] == 100000.0
        assert meta["config"]["rope_scaling"] is None
        assert meta["config"]["rms_norm_eps"] == pytest.approx(hf_config["rms_norm_eps"])
        assert meta["tokenizer"]["type"] == "hf_tokenizers"
        assert meta["tokenizer"]["blob"] == "tokenizer.json"
        assert f.blob("tokenizer.json") == (smollm2_dir / "tokenizer.json").read_bytes()
        assert "chat_template" not in meta["tokenizer"]["config"]
        assert meta["chat_template"] == (smollm2_dir / "chat_template.jinja").read_text()
        special = meta["special_tokens"]
        assert special["eos_token_ids"] == [2] and special["bos_token_id"] == 1
        assert special["eos_token"] == "<|im_end|>" and special["add_bos_token"] is False
        provenance = meta["provenance"]
        assert provenance["method"] == "dense" and provenance["bits"] is None
        assert provenance["source"] == smollm2_dir.resolve().name
        assert {"date", "pumice_version"} <= set(provenance)


def test_dense_tensors_are_bit_identical(smollm2_dir, convert_smollm2):
    source = source_tensors(smollm2_dir)
    with PumiceFile(convert_smollm2("dense")) as f:
        weights = [name for name, info in f.tensors.items() if info.kind != "blob"]
        assert sorted(weights) == sorted(source)  # tied: no lm_head
        assert weights[0] == "model.embed_tokens.weight" and weights[-1] == "model.norm.weight"
        for name, tensor in source.items():
            info = f.tensors[name]
            assert info.kind == "dense" and info.parts["weight"].dtype == "bf16"
            assert list(info.shape) == list(tensor.shape)
            np.testing.assert_array_equal(f.part(name, "weight"), tensor_bits(tensor), err_msg=name)


def test_dense_dtype_option(smollm2_dir, tmp_path):
    out = convert(smollm2_dir, tmp_path / "f16.pumice", dtype="f16", progress=False)
    source = source_tensors(smollm2_dir)
    with PumiceFile(out) as f:
        assert {info.parts["weight"].dtype for info in f.tensors.values()
                if info.kind == "dense"} == {"f16"}
        name = "model.layers.3.mlp.down_proj.weight"
        np.testing.assert_array_equal(f.part(name, "weight"), source[name].to(torch.float16).numpy())


# ------------------------------------------------------------------ rtn

def test_rtn_error_decreases_with_bits(smollm2_dir):
    source = source_tensors(smollm2_dir)
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.5.mlp.down_proj.weight"):
        weight = source[name].float()
        errors = []
        for bits in (2, 3, 4, 8):
            parts = quantize_rtn(weight, bits, 64)
            recon = dequantize_parts("rtn", tuple(weight.shape), {"bits": bits, "group_size": 64},
                                     parts)
            errors.append(float(((recon - weight.numpy()) ** 2).mean() / (weight ** 2).mean()))
        assert errors == sorted(errors, reverse=True) and errors[-1] < 1e-4, (name, errors)
        assert errors[2] < 0.02, (name, errors)  # 4 bits: within 2% relative squared error


def test_rtn_search_lowers_its_objective(smollm2_dir):
    """The clipping search and refit lower the error they minimise: plain squared error with
    weighting="uniform", magnitude-weighted squared error (the default), vs plain min/max."""
    weight = source_tensors(smollm2_dir)["model.layers.2.mlp.up_proj.weight"].float()
    groups = weight.reshape(weight.shape[0], -1, 64)
    importance = (groups.abs() + groups.square().mean(-1, keepdim=True).sqrt()).reshape(weight.shape)

    def errors(parts, bits):
        recon = torch.from_numpy(dequantize_parts("rtn", tuple(weight.shape),
                                                  {"bits": bits, "group_size": 64}, parts))
        squared = (recon - weight) ** 2
        return float(squared.mean()), float((squared * importance).mean())

    for bits in (2, 3):
        plain = errors(quantize_rtn(weight, bits, 64, grid=1, refine_steps=0), bits)
        uniform = errors(quantize_rtn(weight, bits, 64, weighting="uniform"), bits)
        default = errors(quantize_rtn(weight, bits, 64), bits)
        assert uniform[0] < 0.8 * plain[0], (bits, plain, uniform)
        assert default[1] < 0.9 * plain[1], (bits, plain, default)


def test_rtn_short_last_group_and_constant_groups():
    weight = torch.randn(5, 100)
    weight[1] = 0.25  # constant rows: exact
    parts = quantize_rtn(weight, 3, 64)
    recon = dequantize_parts("rtn", (5, 100), {"bits": 3, "group_size": 64}, parts)
    np.testing.assert_allclose(recon[1], 0.25, rtol=0, atol=1e-6)
    assert parts["scales"].shape == (5, 2)
    assert float(((recon - weight.numpy()) ** 2).mean()) < 0.05


def test_rtn4_file(smollm2_dir, convert_smollm2):
    source = source_tensors(smollm2_dir)
    with PumiceFile(convert_smollm2("rtn", bits=4)) as f:
        provenance = f.metadata["provenance"]
        assert provenance["method"] == "rtn" and provenance["bits"] == 4
        assert provenance["group_size"] == 64 and provenance["embedding"] == "rtn8g32"
        embed = f.tensors["model.embed_tokens.weight"]
        assert embed.kind == "rtn" and embed.params == {"bits": 8, "group_size": 32}
        norm = f.tensors["model.layers.0.input_layernorm.weight"]
        assert norm.kind == "dense" and norm.parts["weight"].dtype == "f32"
        name = "model.layers.7.self_attn.v_proj.weight"
        assert f.tensors[name].params == {"bits": 4, "group_size": 64}
        weight = source[name].float().numpy()
        err = ((dequantize(f, name) - weight) ** 2).mean() / (weight ** 2).mean()
        assert err < 0.02
        embed_err = ((dequantize(f, "model.embed_tokens.weight") -
                      source["model.embed_tokens.weight"].float().numpy()) ** 2).mean()
        assert embed_err / (source["model.embed_tokens.weight"].float() ** 2).mean() < 1e-4


# ------------------------------------------------------------------ other checkpoint layouts

def test_sharded_and_pytorch_checkpoints_convert_identically(smollm2_dir, convert_smollm2,
                                                             tmp_path):
    reference = convert_smollm2("dense")
    state = source_tensors(smollm2_dir)
    names = sorted(state)

    sharded = link_checkpoint_files(smollm2_dir, tmp_path / "sharded")
    half = len(names) // 2
    weight_map = {}
    for index, chunk in enumerate((names[:half], names[half:])):
        file = f"model-{index + 1:05d}-of-00002.safetensors"
        save_file({n: state[n] for n in chunk}, str(sharded / file), metadata={"format": "pt"})
        weight_map.update({n: file for n in chunk})
    (sharded / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map}))
    same_tensors(reference, convert(sharded, tmp_path / "sharded.pumice", progress=False))

    binary = link_checkpoint_files(smollm2_dir, tmp_path / "pytorch")
    torch.save(state, binary / "pytorch_model.bin")
    del state
    same_tensors(reference, convert(binary, tmp_path / "pytorch.pumice", progress=False))


# ------------------------------------------------------------------ unsupported / broken input

@pytest.fixture
def config_only_dir(smollm2_dir, tmp_path):
    """A copy of the checkpoint whose config.json the test may edit (weights symlinked)."""
    directory = tmp_path / "ckpt"
    directory.mkdir()
    for path in smollm2_dir.iterdir():
        if path.name == "config.json":
            shutil.copy(path, directory / path.name)
        else:
            (directory / path.name).symlink_to(path)
    return directory


def edit_config(directory, **changes):
    config = json.loads((directory / "config.json").read_text())
    for key, value in changes.items():
        if value is None and key.startswith("_drop_"):
            config.pop(key[6:], None)
        else:
            config[key] = value
    (directory / "config.json").write_text(json.dumps(config))


def test_gpt2_checkpoint_is_unsupported(config_only_dir, tmp_path):
    edit_config(config_only_dir, architectures=["GPT2LMHeadModel"], model_type="gpt2")
    with pytest.raises(UnsupportedCheckpointError, match="GPT2LMHeadModel.*LlamaForCausalLM"):
        convert(config_only_dir, tmp_path / "x.pumice", progress=False)
    assert not (tmp_path / "x.pumice").exists()


def test_unknown_rope_scaling_is_unsupported(config_only_dir, tmp_path):
    edit_config(config_only_dir, rope_parameters={"rope_type": "yarn", "factor": 4.0,
                                                  "rope_theta": 10000.0})
    with pytest.raises(UnsupportedCheckpointError, match="'yarn'"):
        convert(config_only_dir, tmp_path / "x.pumice", progress=False)


def test_missing_files_are_named(smollm2_dir, tmp_path):
    no_config = link_checkpoint_files(smollm2_dir, tmp_path / "no_config", skip_weights=False)
    (no_config / "config.json").unlink()
    with pytest.raises(MissingFileError, match="config.json"):
        convert(no_config, tmp_path / "x.pumice", progress=False)

    no_weights = link_checkpoint_files(smollm2_dir, tmp_path / "no_weights")
    with pytest.raises(MissingFileError, match="no weights"):
        convert(no_weights, tmp_path / "x.pumice", progress=False)

    no_tokenizer = link_checkpoint_files(smollm2_dir, tmp_path / "no_tokenizer", skip_weights=False)
    (no_tokenizer / "tokenizer.json").unlink()
    with pytest.raises(MissingFileError, match="tokenizer"):
        convert(no_tokenizer, tmp_path / "x.pumice", progress=False)

    with pytest.raises(MissingFileError, match="not found"):
        convert(tmp_path / "nowhere", tmp_path / "x.pumice", progress=False)


def test_config_variants():
    base = {"architectures": ["MistralForCausalLM"], "model_type": "mistral", "vocab_size": 32000,
            "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
            "num_attention_heads": 32, "num_key_value_heads": 8, "max_position_embeddings": 32768,
            "rms_norm_eps": 1e-5, "rope_theta": 1e6, "sliding_window": None}
    config = model_config_from_hf(base)
    assert config["head_dim"] == 128 and config["rope_scaling"] is None
    with pytest.raises(UnsupportedCheckpointError, match="sliding"):
        model_config_from_hf({**base, "sliding_window": 4096})
    llama3 = {**base, "architectures": ["LlamaForCausalLM"], "model_type": "llama",
              "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                               "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}}
    assert model_config_from_hf(llama3)["rope_scaling"]["rope_type"] == "llama3"
    linear = {**llama3, "rope_scaling": {"type": "linear", "factor": 2.0}}
    assert model_config_from_hf(linear)["rope_scaling"] == {"rope_type": "linear", "factor": 2.0}
    with pytest.raises(UnsupportedCheckpointError, match="dynamic"):
        model_config_from_hf({**llama3, "rope_scaling": {"rope_type": "dynamic", "factor": 2.0}})
    with pytest.raises(CheckpointError, match="hidden_size"):
        model_config_from_hf({k: v for k, v in base.items() if k != "hidden_size"})


def test_special_tokens_from_generation_config(config_only_dir):
    (config_only_dir / "generation_config.json").write_text(
        json.dumps({"eos_token_id": [2, 0], "temperature": 0.6, "top_p": 0.9}))
    with load_checkpoint(config_only_dir) as checkpoint:
        assert checkpoint.special_tokens["eos_token_ids"] == [2, 0]
        assert checkpoint.generation == {"temperature": 0.6, "top_p": 0.9}


def test_bad_options(smollm2_dir, tmp_path):
    with pytest.raises(ValueError, match="unknown conversion method"):
        convert(smollm2_dir, tmp_path / "x.pumice", method="magic", progress=False)
    with pytest.raises(ValueError, match="bits"):
        convert(smollm2_dir, tmp_path / "x.pumice", method="rtn", bits=5, progress=False)
    with pytest.raises(ValueError, match="does not take"):
        convert(smollm2_dir, tmp_path / "x.pumice", method="dense", calib="x", progress=False)
    assert not (tmp_path / "x.pumice").exists()


def test_sentencepiece_tokenizer_is_detected(smollm2_dir, tmp_path):
    directory = link_checkpoint_files(smollm2_dir, tmp_path / "sp", skip_weights=False)
    (directory / "tokenizer.json").unlink()
    (directory / "tokenizer.model").write_bytes(b"\x0a\x0bsentencepiece-model-bytes")
    with load_checkpoint(directory) as checkpoint:
        assert checkpoint.tokenizer_type == "sentencepiece"
        assert checkpoint.tokenizer_blob_name == "tokenizer.model"
        assert checkpoint.tokenizer_bytes.startswith(b"\x0a\x0b")
        assert checkpoint.special_tokens["add_bos_token"] is True  # the SentencePiece convention


def test_cli_convert_and_inspect(smollm2_dir, convert_smollm2, tmp_path, capsys):
    from pumice.converter.cli import main as convert_main
    from pumice.format.inspect import inspect_file, main as inspect_main

    assert convert_main([str(tmp_path / "missing"), "-o", str(tmp_path / "x.pumice")]) == 1
    assert "not found" in capsys.readouterr().err
    report = inspect_file(convert_smollm2("dense"))
    assert "architecture: llama" in report and "chat template: present" in report
    assert "model.layers.29.mlp.down_proj.weight" in report
    assert "decoder linear layers: 210 tensors" in report and "16.000 bits per weight" in report
    assert inspect_main([str(convert_smollm2("dense")), "--summary", "--no-verify"]) == 0
    assert "hf_tokenizers" in capsys.readouterr().out


def test_registered_method_plugs_in(smollm2_dir, tmp_path):
    """A method registered from outside the converter runs through ctx.run with its own options."""
    from pumice.converter.methods import available_methods, register_method

    layers_seen = []

    def convert_half(ctx):
        ctx.check_options({"note"})
        ctx.provenance["note"] = ctx.options["note"]

        def quantize(ctx, name, weight):
            assert weight.dtype == torch.float32
            return "dense", {}, {"weight": weight.to(torch.float16)}

        ctx.run(quantize, on_layer=lambda ctx, layer: layers_seen.append(layer))

    register_method("test_half", convert_half, defaults={"bits": 16})
    assert "test_half" in available_methods()
    out = convert(smollm2_dir, tmp_path / "half.pumice", method="test_half", note="hi",
                  embedding="bf16", progress=False)
    assert layers_seen == list(range(30))
    with PumiceFile(out) as f:
        assert f.metadata["provenance"]["note"] == "hi"
        assert f.metadata["provenance"]["bits"] == 16
        assert f.tensors["model.layers.4.mlp.up_proj.weight"].parts["weight"].dtype == "f16"
        assert f.tensors["model.layers.4.input_layernorm.weight"].parts["weight"].dtype == "f32"
        assert f.tensors["model.embed_tokens.weight"].parts["weight"].dtype == "bf16"
