"""DeepSpec-format drafter checkpoints: read, check against the target, write (reference §2).

A checkpoint is a directory with `config.json` (a deep copy of the target's config plus the drafter
fields of §2.1) and safetensors weights named as in §2.2 / §2.4. We dispatch on `architectures[0]`,
never through AutoModel (its `model_type` is the target's, which would build a plain decoder).

The embedding and LM head are the target's at run time: a stored copy is never loaded (only its
shape is checked), and the checkpoints we write leave them out and say so with
`"shares_target_embeddings": true`. Extensions we add to the config, both optional:
`shares_target_embeddings`, `confidence_temperatures` (per-position STS temperatures, §4.5),
`confidence_offsets` (per-position offsets added after them, engine/train/sts.py),
`confidence_draft_weights` (per-position weights of the draft's own log-odds for its token) and the
same triple for greedy requests, with the suffix `_greedy` (engine/drafters/confidence.py), and
per triple the request-history term's `confidence_history_weights` (per position) and
`confidence_history_prior` (a rate in (0, 1)), given together or not at all.

An optional draft vocabulary (engine/drafters/vocab.py) is the integer tensor `d2t` [N], in
EAGLE-3's convention: draft index i stands for target token i + d2t[i]. `dspark-node draft-vocab`
writes it into its own file, `draft_vocab.safetensors`, leaving the trained weights untouched.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from engine.loading import LoadedTarget, ModelLoadError, check_shapes

# Written by `calibrate` (per position, one entry per block slot); dropped by `train-drafter --init-from`.
CALIBRATION_FIELDS = ("confidence_temperatures", "confidence_offsets", "confidence_draft_weights",
                      "confidence_history_weights", "confidence_temperatures_greedy", "confidence_offsets_greedy",
                      "confidence_draft_weights_greedy", "confidence_history_weights_greedy")
# Written by `calibrate` with the history weights (one rate each); dropped with them.
HISTORY_PRIOR_FIELDS = ("confidence_history_prior", "confidence_history_prior_greedy")

# architectures[0] -> (drafter kind, layer family: qwen3 has per-head q/k norms, llama has none)
ARCHITECTURES = {
    "Qwen3DSparkModel": ("dspark", "qwen3"),
    "LlamaDSparkModel": ("dspark", "llama"),
    "Qwen3Eagle3Model": ("eagle3", "qwen3"),
    "Eagle3DraftModel": ("eagle3", "qwen3"),
    "LlamaEagle3Model": ("eagle3", "llama"),
}
SHARED = ("embed_tokens.weight", "lm_head.weight")
DRAFT_VOCAB = "d2t"
DRAFT_VOCAB_FILE = "draft_vocab.safetensors"


class CheckpointError(ModelLoadError):
    """A drafter checkpoint that cannot be served with this target; the message names the problem."""


class DrafterConfig(BaseModel):
    """The fields of config.json a drafter needs; the rest (inherited from the target) is kept aside.
    Strict types: JSON has them, and a lax `true` read as 1 or `"7"` as 7 (a hand edit gone wrong)
    would serve a drafter other than the one written."""
    model_config = ConfigDict(extra="allow", strict=True)

    architectures: list[str] = Field(min_length=1)
    hidden_size: int = Field(gt=0)
    intermediate_size: int = Field(gt=0)
    num_hidden_layers: int = Field(ge=1, le=64)
    num_attention_heads: int = Field(gt=0)
    num_key_value_heads: int = Field(gt=0)
    head_dim: int | None = Field(None, gt=0)
    rms_norm_eps: float = Field(gt=0)
    vocab_size: int = Field(gt=0)
    hidden_act: Literal["silu"] = "silu"
    attention_bias: Literal[False] = False
    num_target_layers: int = Field(ge=1)
    target_layer_ids: list[int] = Field(min_length=1)
    block_size: int | None = Field(None, ge=1, le=64)
    ttt_length: int | None = Field(None, ge=1, le=64)
    mask_token_id: int | None = None
    markov_rank: int = Field(0, ge=0)
    markov_head_type: Literal["vanilla", "gated", "rnn"] | None = None
    enable_confidence_head: bool = False
    confidence_head_with_markov: bool = False
    confidence_temperatures: list[float] | None = None
    confidence_offsets: list[float] | None = None
    confidence_temperatures_greedy: list[float] | None = None
    confidence_offsets_greedy: list[float] | None = None
    confidence_draft_weights: list[float] | None = None
    confidence_draft_weights_greedy: list[float] | None = None
    confidence_history_weights: list[float] | None = None
    confidence_history_weights_greedy: list[float] | None = None
    confidence_history_prior: float | None = None
    confidence_history_prior_greedy: float | None = None
    shares_target_embeddings: bool = False

    @field_validator("target_layer_ids")
    @classmethod
    def _increasing(cls, ids: list[int]) -> list[int]:
        if any(b <= a for a, b in zip(ids, ids[1:])) or ids[0] < -1:
            raise ValueError(f"must be strictly increasing ids >= -1, got {ids}")
        return ids

    @field_validator("confidence_temperatures", "confidence_temperatures_greedy")
    @classmethod
    def _positive(cls, temps: list[float] | None) -> list[float] | None:
        # an infinite one zeroes the head's logit: every confidence the bare offset, whatever the head says
        if temps is not None and any(not 0 < t < math.inf for t in temps):
            raise ValueError(f"temperatures must be finite and > 0, got {temps}")
        return temps

    @field_validator("confidence_offsets", "confidence_offsets_greedy", "confidence_draft_weights",
                     "confidence_draft_weights_greedy", "confidence_history_weights",
                     "confidence_history_weights_greedy")
    @classmethod
    def _finite(cls, values: list[float] | None) -> list[float] | None:
        if values is not None and any(not math.isfinite(b) for b in values):
            raise ValueError(f"must be finite, got {values}")
        return values

    @field_validator(*HISTORY_PRIOR_FIELDS)
    @classmethod
    def _rate(cls, prior: float | None) -> float | None:
        if prior is not None and not 0 < prior < 1:
            raise ValueError(f"must be a rate in (0, 1), got {prior}")
        return prior

    @model_validator(mode="after")
    def _consistent(self) -> DrafterConfig:
        if self.architectures[0] not in ARCHITECTURES:
            raise ValueError(f"architecture {self.architectures[0]} is not a drafter "
                             f"(known: {', '.join(ARCHITECTURES)})")
        if self.markov_rank > 0 and self.markov_head_type is None:
            raise ValueError("markov_head_type is required when markov_rank > 0")
        if self.enable_confidence_head and self.confidence_head_with_markov and self.markov_rank == 0:
            raise ValueError("confidence_head_with_markov needs a Markov head (markov_rank > 0)")
        if self.kind == "dspark" and (self.block_size is None or self.mask_token_id is None):
            raise ValueError("a DSpark/DFlash drafter needs block_size and mask_token_id")
        if self.kind == "eagle3" and -1 in self.target_layer_ids:
            raise ValueError("an EAGLE-3 drafter cannot tap the embedding output (-1)")
        for name in CALIBRATION_FIELDS:
            values = getattr(self, name)
            if values is not None and len(values) != self.block:
                raise ValueError(f"{name} has {len(values)} entries, block size is {self.block}")
        for weights, prior in zip(("confidence_history_weights", "confidence_history_weights_greedy"),
                                  HISTORY_PRIOR_FIELDS):
            if (getattr(self, weights) is None) != (getattr(self, prior) is None):
                raise ValueError(f"{weights} and {prior} go together: one is missing")
        return self

    @property
    def kind(self) -> str:
        return ARCHITECTURES[self.architectures[0]][0]

    @property
    def family(self) -> str:
        return ARCHITECTURES[self.architectures[0]][1]

    @property
    def block(self) -> int:
        """Draft tokens per round: block_size (DSpark), ttt_length (EAGLE-3, default 7)."""
        return self.block_size or self.ttt_length or 7

    @property
    def dim_head(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads


@dataclass
class DrafterCheckpoint:
    path: Path
    config: DrafterConfig
    weights: dict[str, torch.Tensor]     # everything but the shared embedding / LM head
    digest: bytes                        # sha256 over config.json and the weight files
    draft_vocab: torch.Tensor | None = None   # target ids the drafter proposes from (None: all)


def expected_shapes(c: DrafterConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor name of §2.2 (DSpark/DFlash) or §2.4 (EAGLE-3), shared embeddings excluded."""
    H, V, r, hd = c.hidden_size, c.vocab_size, c.markov_rank, c.dim_head
    nq, nkv, m = c.num_attention_heads * hd, c.num_key_value_heads * hd, len(c.target_layer_ids)
    width = 2 * H if c.kind == "eagle3" else H   # EAGLE-3 attends over [embedding ; hidden]
    shapes = {"fc.weight": (H, m * H), "norm.weight": (H,)}
    if c.kind == "dspark":
        shapes["hidden_norm.weight"] = (H,)
    for i in range(c.num_hidden_layers):
        p = f"layers.{i}."
        shapes.update({p + "self_attn.q_proj.weight": (nq, width), p + "self_attn.k_proj.weight": (nkv, width),
                       p + "self_attn.v_proj.weight": (nkv, width), p + "self_attn.o_proj.weight": (H, nq),
                       p + "mlp.gate_proj.weight": (c.intermediate_size, H),
                       p + "mlp.up_proj.weight": (c.intermediate_size, H),
                       p + "mlp.down_proj.weight": (H, c.intermediate_size),
                       p + "input_layernorm.weight": (H,), p + "post_attention_layernorm.weight": (H,)})
        if c.family == "qwen3":
            shapes[p + "self_attn.q_norm.weight"] = (hd,)
            shapes[p + "self_attn.k_norm.weight"] = (hd,)
        if c.kind == "eagle3":
            shapes[p + "hidden_norm.weight"] = (H,)
    if r > 0:
        shapes["markov_head.markov_w1.weight"] = (V, r)
        shapes["markov_head.markov_w2.weight"] = (V, r)
        if c.markov_head_type == "gated":
            shapes["markov_head.gate_proj.weight"] = (r, H + r)
            shapes["markov_head.gate_proj.bias"] = (r,)
        elif c.markov_head_type == "rnn":
            shapes["markov_head.joint_proj.weight"] = (3 * r, 2 * r + H)
            shapes["markov_head.joint_proj.bias"] = (3 * r,)
    if c.enable_confidence_head:
        shapes["confidence_head.proj.weight"] = (1, H + (r if c.confidence_head_with_markov else 0))
        shapes["confidence_head.proj.bias"] = (1,)
    return shapes


def check_fits(c: DrafterConfig, target: LoadedTarget, where: str) -> None:
    """Refuse a drafter trained for another target, naming the first field that does not fit."""
    a = target.model.args
    layers = a.num_layers
    checks = [
        ("hidden_size", c.hidden_size, a.hidden_size),
        ("vocab_size", c.vocab_size, a.vocab_size),
        ("num_target_layers", c.num_target_layers, layers),
        ("head_dim", c.dim_head, a.head_dim),
        ("rope_theta", _rope(c.model_dump()), _rope(target.hf_config.to_dict())),
    ]
    for name, mine, theirs in checks:
        if mine != theirs:
            raise CheckpointError(f"{where}: {name} is {mine}, the target {target.model_id} has {theirs}")
    check_target_layers(c.target_layer_ids, layers, f"{where}: target_layer_ids")
    if c.mask_token_id is not None and not 0 <= c.mask_token_id < a.vocab_size:
        raise CheckpointError(f"{where}: mask_token_id {c.mask_token_id} is outside the target's "
                              f"vocabulary of {a.vocab_size}")


def check_target_layers(ids: list[int], layers: int, what: str) -> None:
    """Refuse tapped layer ids a target of `layers` layers cannot give a drafter: -1 (the embedding
    output) to the second-last. The last layer's output feeds the final norm; no DeepSpec drafter
    is trained on it (§1.1)."""
    if any(not -1 <= i <= layers - 2 for i in ids):
        raise CheckpointError(f"{what} {ids} do not fit the target's {layers} layers "
                              f"(allowed: -1..{layers - 2}; the final layer is not tapped)")


def _rope(config: dict) -> tuple:
    params = config.get("rope_parameters") or {}
    return (params.get("rope_theta", config.get("rope_theta")), params.get("rope_type", "default"))


def parse_config(raw: dict, where: str) -> DrafterConfig:
    try:
        return DrafterConfig.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'config'}: {e['msg']}" for e in exc.errors())
        raise CheckpointError(f"{where}: {problems}") from None


def load_checkpoint(path: str | Path, target: LoadedTarget) -> DrafterCheckpoint:
    path = Path(path).expanduser()
    config_file = path / "config.json"
    if not config_file.is_file():
        raise CheckpointError(f"{path}: no config.json (a DeepSpec drafter directory is expected)")
    try:
        raw = json.loads(config_file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{config_file} cannot be read: {exc}") from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"{config_file}: expected a JSON object")
    config = parse_config(raw, str(config_file))
    check_fits(config, target, str(path))
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{path} has no *.safetensors weights")
    shapes = expected_shapes(config)
    weights: dict[str, torch.Tensor] = {}
    d2t: torch.Tensor | None = None
    origin: dict[str, Path] = {}   # a tensor in two files (a copy kept beside the weights) is ambiguous
    for f in files:
        try:
            with safe_open(f, framework="pt") as fh:
                for name in fh.keys():
                    if name in origin:
                        raise CheckpointError(f"{path}: tensor {name} is in both {origin[name].name} and {f.name} "
                                              "(keep one copy of the weights in the directory)")
                    origin[name] = f
                    if name == DRAFT_VOCAB:
                        d2t = fh.get_tensor(name)
                    elif name in SHARED:  # the target's copy is used; only check it is the same shape
                        got = tuple(fh.get_slice(name).get_shape())
                        want = (config.vocab_size, config.hidden_size)
                        if got != want:
                            raise CheckpointError(f"{f}: {name} has shape {got}, expected {want}")
                    elif name not in shapes:
                        raise CheckpointError(f"{f}: unexpected tensor {name} for {config.architectures[0]} "
                                              f"(markov_head_type / enable_confidence_head mismatch?)")
                    else:
                        weights[name] = fh.get_tensor(name)
        except (SafetensorError, OSError) as exc:
            raise CheckpointError(f"{f} is not a readable safetensors file: {exc}") from None
    check_shapes(weights, shapes, path, CheckpointError)
    draft_vocab = None if d2t is None else draft_vocab_ids(d2t, config.vocab_size, str(path))
    digest = hashlib.sha256()
    for f in (config_file, *files):
        digest.update(f.read_bytes())
    return DrafterCheckpoint(path=path, config=config, weights=weights, digest=digest.digest(),
                             draft_vocab=draft_vocab)


def draft_vocab_ids(d2t: torch.Tensor, vocab_size: int, where: str) -> torch.Tensor:
    """`d2t` offsets -> the target ids [N] they stand for, refusing what cannot be a subset of the
    target's vocabulary in increasing order."""
    if d2t.dtype not in (torch.int32, torch.int64) or d2t.dim() != 1 or not 1 <= len(d2t) <= vocab_size:
        raise CheckpointError(f"{where}: {DRAFT_VOCAB} must be a 1-D int32/int64 tensor of 1..{vocab_size} "
                              f"entries, got {d2t.dtype} {tuple(d2t.shape)}")
    ids = torch.arange(len(d2t)) + d2t.long()
    if int(ids.min()) < 0 or int(ids.max()) >= vocab_size:
        raise CheckpointError(f"{where}: {DRAFT_VOCAB} names token ids outside the target's vocabulary "
                              f"0..{vocab_size - 1}")
    if len(ids) > 1 and not bool((ids[1:] > ids[:-1]).all()):
        raise CheckpointError(f"{where}: {DRAFT_VOCAB} must name strictly increasing token ids")
    return ids


def write_draft_vocab(path: str | Path, ids: torch.Tensor, metadata: dict[str, str]) -> Path:
    """Store target ids `ids` (strictly increasing) as the drafter's draft vocabulary, replacing any
    earlier one; written to a temporary file first, so an interrupted write leaves the old one."""
    path = Path(path)
    ids = ids.long().cpu()
    d2t = ids - torch.arange(len(ids))
    target = path / DRAFT_VOCAB_FILE
    partial = path / (DRAFT_VOCAB_FILE + ".partial")
    save_file({DRAFT_VOCAB: d2t.contiguous()}, partial, metadata={"format": "pt", **metadata})
    partial.chmod(0o644)   # readable like the weights beside it (a node may run as another user)
    partial.replace(target)
    return target


def save_checkpoint(path: str | Path, config: dict, state: dict[str, torch.Tensor],
                    dtype: torch.dtype | None = None) -> Path:
    """Write config.json + model.safetensors (in `dtype`, default as given); checked before writing."""
    path = Path(path)
    parsed = parse_config(config, str(path / "config.json"))
    shapes = expected_shapes(parsed)
    for name, tensor in state.items():
        if name not in SHARED and shapes.get(name) != tuple(tensor.shape):
            raise CheckpointError(f"tensor {name} {tuple(tensor.shape)} does not match the config "
                                  f"({shapes.get(name, 'not a tensor of this architecture')})")
    missing = sorted(set(shapes) - set(state))
    if missing:
        raise CheckpointError(f"state dict lacks {', '.join(missing)}")
    config = dict(config, shares_target_embeddings=not all(n in state for n in SHARED))
    path.mkdir(parents=True, exist_ok=True)
    tensors = {k: (v if dtype is None else v.to(dtype)).detach().cpu().contiguous() for k, v in state.items()}
    weights, weights_partial = path / "model.safetensors", path / "model.safetensors.partial"
    config_file, config_partial = path / "config.json", path / "config.json.partial"
    save_file(tensors, weights_partial, metadata={"format": "pt"})
    weights_partial.chmod(0o644)   # safetensors writes 0600; a node may run as another user
    config_partial.write_text(json.dumps(config, indent=2, sort_keys=True))
    # Both complete before either replaces its predecessor: a write cut short (Ctrl-C, a full disk)
    # leaves the earlier checkpoint as it was, not a truncated weights file beside its config.
    weights_partial.replace(weights)
    config_partial.replace(config_file)
    return path
