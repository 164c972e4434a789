"""Load a Hugging Face checkpoint directory into a Duet model.

Reads ``model.safetensors`` or the shards listed in ``model.safetensors.index.json``. Every parameter of
the model must be found once with the expected shape; errors name the file and the tensor.
"""
from __future__ import annotations

import json
import logging
import re
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import safe_open
from tqdm import tqdm

from engine.model_config import ModelConfig
from engine.models.decoder import DecoderForCausalLM

logger = logging.getLogger(__name__)

# Per-expert checkpoint names (the Hugging Face hub format) -> our stacked parameter and the slice.
_EXPERT_RE = re.compile(
    r"^(model\.layers\.\d+)\.(block_sparse_moe|mlp)\.experts\.(\d+)\.(w1|w2|w3|gate_proj|up_proj|down_proj)\.weight$"
)
_EXPERT_PARAM = {"w1": "w_gate", "gate_proj": "w_gate", "w3": "w_up", "up_proj": "w_up", "w2": "w_down", "down_proj": "w_down"}
# Fused expert tensors (transformers >= 5 in-memory format), accepted too.
_FUSED_RE = re.compile(r"^(model\.layers\.\d+)\.(block_sparse_moe|mlp)\.experts\.(gate_up_proj|down_proj)$")
_IGNORED = re.compile(r"rotary_emb\.inv_freq$")


def checkpoint_files(model_dir: Path) -> list[Path]:
    """The safetensors files of a checkpoint, in a stable order."""
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise ValueError(f"{index}: not a valid safetensors index ({e})") from e
        files = sorted({model_dir / name for name in weight_map.values()})
        for f in files:
            if not f.is_file():
                raise FileNotFoundError(f"{f}: listed in {index.name} but missing")
        return files
    single = model_dir / "model.safetensors"
    if single.is_file():
        return [single]
    others = sorted(model_dir.glob("*.safetensors"))
    if others:
        return others
    raise FileNotFoundError(
        f"{model_dir}: no weights found (expected model.safetensors or model.safetensors.index.json)"
    )


@contextmanager
def _default_dtype(dtype: torch.dtype):
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def build_model(
    cfg: ModelConfig, dtype: torch.dtype, device: torch.device, max_positions: int, show_progress: bool = True
) -> DecoderForCausalLM:
    """Instantiate the model on ``device`` in ``dtype`` and fill it from the checkpoint files."""
    with _default_dtype(dtype), torch.device(device):
        model = DecoderForCausalLM(cfg, max_positions)
    load_weights(model, Path(cfg.path), show_progress)
    return model.eval()


def load_weights(model: DecoderForCausalLM, model_dir: Path, show_progress: bool = True) -> None:
    params = dict(model.named_parameters(remove_duplicate=False))
    tied = model.config.tie_word_embeddings
    # Expected (name, expert) slots; a tied lm_head is satisfied by the embedding.
    pending: set[tuple[str, int]] = set()
    for name, p in params.items():
        if tied and name == "lm_head.weight":
            continue
        if name.endswith((".w_gate", ".w_up", ".w_down")):
            pending.update((name, e) for e in range(p.shape[0]))
        else:
            pending.add((name, -1))

    files = checkpoint_files(model_dir)
    total = 0
    with tqdm(total=len(files), desc="Loading weights", unit="file", disable=not show_progress) as bar:
        for path in files:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                for key in f.keys():
                    total += 1
                    for target, expert, tensor in _targets(key, f, params, tied, path):
                        param = params[target]
                        dest = param.data[expert] if expert >= 0 else param.data
                        if tuple(tensor.shape) != tuple(dest.shape):
                            raise ValueError(
                                f"{path.name}: tensor {key!r} has shape {tuple(tensor.shape)}, "
                                f"model expects {tuple(dest.shape)} for {target}"
                            )
                        dest.copy_(tensor)
                        pending.discard((target, expert))
            bar.update(1)
    if pending:
        missing = sorted(f"{n}" + (f"[expert {e}]" if e >= 0 else "") for n, e in pending)
        raise ValueError(
            f"{model_dir}: checkpoint is missing {len(missing)} tensor(s), e.g. {missing[:5]} "
            f"(searched {', '.join(p.name for p in files)})"
        )
    logger.info("loaded %d tensors from %d file(s) in %s", total, len(files), model_dir)


def _targets(key: str, f, params: dict, tied: bool, path: Path):
    """Yield (parameter name, expert index or -1, tensor) for one checkpoint tensor."""
    if key in params:
        if tied and key == "lm_head.weight":
            return
        yield key, -1, f.get_tensor(key)
        return
    m = _EXPERT_RE.match(key)
    if m:
        prefix, block, expert, kind = m.groups()
        target = f"{prefix}.{block}.{_EXPERT_PARAM[kind]}"
        if target not in params:
            raise ValueError(f"{path.name}: tensor {key!r} has no matching MoE parameter in the model")
        yield target, int(expert), f.get_tensor(key)
        return
    m = _FUSED_RE.match(key)
    if m:
        prefix, block, kind = m.groups()
        tensor = f.get_tensor(key)  # gate_up_proj: [E, 2 * I, H]; down_proj: [E, H, I]
        if kind == "gate_up_proj":
            gate, up = tensor.chunk(2, dim=1)
            for e in range(tensor.shape[0]):
                yield f"{prefix}.{block}.w_gate", e, gate[e]
                yield f"{prefix}.{block}.w_up", e, up[e]
        else:
            for e in range(tensor.shape[0]):
                yield f"{prefix}.{block}.w_down", e, tensor[e]
        return
    if tied and key == "lm_head.weight" or _IGNORED.search(key):
        return
    raise ValueError(f"{path.name}: unexpected tensor {key!r}: the model has no such parameter")
