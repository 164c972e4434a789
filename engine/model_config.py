"""What the engine needs to know about a Hugging Face checkpoint, parsed from its ``config.json``."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

SUPPORTED_ARCHITECTURES = (
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
    "MixtralForCausalLM",
    "Qwen3MoeForCausalLM",
)

_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
}


def parse_dtype(name: str | torch.dtype, field_name: str = "dtype") -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    key = str(name).removeprefix("torch.")
    if key not in _DTYPES:
        raise ValueError(f"{field_name} must be one of float32 / bfloat16 / float16, got {name!r}")
    return _DTYPES[key]


@dataclass(frozen=True)
class RopeConfig:
    theta: float = 10000.0
    """Base of the rotary frequencies."""
    rope_type: str = "default"
    """``default`` or ``llama3`` (frequency-dependent scaling of long wavelengths)."""
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclass(frozen=True)
class ModelConfig:
    """Architecture facts of one checkpoint. Built by ``ModelConfig.from_pretrained``."""

    path: str
    architecture: str
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    rope: RopeConfig
    tie_word_embeddings: bool
    attention_bias: bool
    """Bias on q/k/v projections (Qwen2)."""
    qk_norm: bool
    """RMSNorm on each head of q and k before RoPE (Qwen3)."""
    dtype: torch.dtype
    """Checkpoint dtype (``torch_dtype`` / ``dtype`` in config.json)."""
    num_experts: int = 0
    """0 = dense MLP."""
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = True
    """Renormalise the top-k gate weights to sum to 1 (Mixtral always does; Qwen3-MoE per config)."""
    moe_layers: tuple[bool, ...] = field(default_factory=tuple)
    """Per layer: MoE (True) or dense MLP."""
    sliding_window: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    bos_token_id: int | None = None

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    @classmethod
    def from_pretrained(cls, path: str | Path) -> "ModelConfig":
        path = Path(path)
        config_file = path / "config.json"
        if not path.is_dir():
            raise FileNotFoundError(f"model directory {str(path)!r} does not exist")
        if not config_file.is_file():
            raise FileNotFoundError(f"{config_file}: missing config.json in the model directory")
        try:
            raw = json.loads(config_file.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{config_file}: invalid JSON ({e})") from e
        return cls.from_dict(raw, str(path))

    @classmethod
    def from_dict(cls, raw: dict, path: str = "<dict>") -> "ModelConfig":
        where = f"{path}/config.json"
        archs = raw.get("architectures") or []
        arch = next((a for a in archs if a in SUPPORTED_ARCHITECTURES), None)
        if arch is None:
            raise ValueError(
                f"{where}: unsupported architecture {archs!r}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
            )

        def need(key: str):
            if key not in raw:
                raise ValueError(f"{where}: missing field {key!r} required by {arch}")
            return raw[key]

        hidden = int(need("hidden_size"))
        num_heads = int(need("num_attention_heads"))
        num_kv_heads = int(raw.get("num_key_value_heads") or num_heads)
        head_dim = int(raw.get("head_dim") or hidden // num_heads)
        if num_heads % num_kv_heads:
            raise ValueError(f"{where}: num_attention_heads={num_heads} not divisible by num_key_value_heads={num_kv_heads}")

        rope_raw = dict(raw.get("rope_scaling") or {})
        rope_raw.update(raw.get("rope_parameters") or {})
        rope_type = rope_raw.get("rope_type", rope_raw.get("type", "default")) or "default"
        if rope_type not in ("default", "llama3"):
            raise ValueError(f"{where}: unsupported rope_type {rope_type!r} (supported: default, llama3)")
        rope = RopeConfig(
            theta=float(rope_raw.get("rope_theta", raw.get("rope_theta", 10000.0))),
            rope_type=rope_type,
            factor=float(rope_raw.get("factor", 1.0)),
            low_freq_factor=float(rope_raw.get("low_freq_factor", 1.0)),
            high_freq_factor=float(rope_raw.get("high_freq_factor", 4.0)),
            original_max_position_embeddings=int(rope_raw.get("original_max_position_embeddings", 8192)),
        )

        num_layers = int(need("num_hidden_layers"))
        num_experts = 0
        if arch == "MixtralForCausalLM":
            num_experts = int(raw.get("num_local_experts") or raw.get("num_experts") or 0)
        elif arch == "Qwen3MoeForCausalLM":
            num_experts = int(raw.get("num_experts") or raw.get("num_local_experts") or 0)
        moe_layers: tuple[bool, ...] = (False,) * num_layers
        if num_experts:
            step = int(raw.get("decoder_sparse_step", 1) or 1)
            dense = set(raw.get("mlp_only_layers") or [])
            moe_layers = tuple((i not in dense) and (i + 1) % step == 0 for i in range(num_layers))

        top_k = int(raw.get("num_experts_per_tok") or 0)
        if num_experts and not 1 <= top_k <= num_experts:
            raise ValueError(f"{where}: num_experts_per_tok={top_k} must be in [1, num_experts={num_experts}]")

        eos = raw.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else ((eos,) if eos is not None else ())
        dtype_name = raw.get("dtype") or raw.get("torch_dtype") or "float32"
        sliding = raw.get("sliding_window") if raw.get("use_sliding_window", True) else None
        return cls(
            path=path,
            architecture=arch,
            model_type=str(raw.get("model_type", "")),
            vocab_size=int(need("vocab_size")),
            hidden_size=hidden,
            intermediate_size=int(raw.get("intermediate_size") or 0),
            num_layers=num_layers,
            num_heads=num_heads,
            num_kv_heads=num_kv_heads,
            head_dim=head_dim,
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
            max_position_embeddings=int(raw.get("max_position_embeddings", 4096)),
            rope=rope,
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            attention_bias=arch == "Qwen2ForCausalLM" or bool(raw.get("attention_bias", False)),
            qk_norm=arch in ("Qwen3ForCausalLM", "Qwen3MoeForCausalLM"),
            dtype=parse_dtype(dtype_name, f"{where}: dtype"),
            num_experts=num_experts,
            num_experts_per_tok=top_k,
            moe_intermediate_size=int(raw.get("moe_intermediate_size") or raw.get("intermediate_size") or 0),
            norm_topk_prob=True if arch == "MixtralForCausalLM" else bool(raw.get("norm_topk_prob", False)),
            moe_layers=moe_layers,
            sliding_window=int(sliding) if sliding else None,
            eos_token_ids=eos_ids,
            bos_token_id=raw.get("bos_token_id"),
        )
