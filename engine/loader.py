"""Load a Hugging Face checkpoint directory into a Duet model.

Reads ``model.safetensors`` or the shards listed in ``model.safetensors.index.json``. Every parameter of
the model must be found once with the expected shape; errors name the file and the tensor.

A model built for one rank of a parallel layout holds slices: parameters marked by ``mark_shard`` are read
with safetensors' ``get_slice`` (only the rank's rows or columns leave the file), experts another rank
holds and layers another pipeline stage runs are skipped without being read.
"""
from __future__ import annotations

import hashlib
import json
import logging
import re
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import safe_open
from tqdm import tqdm

from duet.engine.model_config import ModelConfig
from duet.engine.models.decoder import DecoderForCausalLM
from duet.engine.models.layers import TPGroup
from duet.engine.parallel.layout import ParallelLayout

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


FINGERPRINT_DATA_BYTES = 1 << 16


def weights_fingerprint(model_dir: str | Path) -> str:
    """12 hex digits that differ between checkpoints: config.json, every safetensors header (names, dtypes,
    shapes, offsets) and the first 64 KiB of each file's tensor data. Cheap (no full read), so two servers
    can check at handshake that they hold the same weights, not just a directory of the same name. A
    directory without weights (``load_format="dummy"``) is fingerprinted by its config alone.
    """
    model_dir = Path(model_dir)
    h = hashlib.sha256((model_dir / "config.json").read_bytes())
    try:
        files = checkpoint_files(model_dir)
    except FileNotFoundError:
        files = []
    for path in files:
        with open(path, "rb") as f:
            head = f.read(8)
            header_len = int.from_bytes(head, "little") if len(head) == 8 else 0
            h.update(head + f.read(header_len) + f.read(FINGERPRINT_DATA_BYTES))
    return h.hexdigest()[:12]


def model_identity(model_dir: str | Path, architecture: str) -> str:
    """The model part of a KV layout: ``<architecture>:<directory name>:<weights fingerprint>``."""
    return f"{architecture}:{str(model_dir).rstrip('/').split('/')[-1]}:{weights_fingerprint(model_dir)}"


@contextmanager
def _default_dtype(dtype: torch.dtype):
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def build_model(
    cfg: ModelConfig, dtype: torch.dtype, device: torch.device, max_positions: int, show_progress: bool = True,
    layout: ParallelLayout = ParallelLayout(), tp_group: TPGroup | None = None, load_format: str = "auto",
) -> DecoderForCausalLM:
    """Instantiate the model (this rank's share of it) on ``device`` in ``dtype``, fill it from the checkpoint.

    ``load_format="dummy"`` fills it with random values instead (see ``init_dummy_weights``).
    """
    with _default_dtype(dtype), torch.device(device):
        model = DecoderForCausalLM(cfg, max_positions, layout, tp_group)
    if load_format == "dummy":
        init_dummy_weights(model)
    else:
        load_weights(model, Path(cfg.path), show_progress)
    model.fuse_projections()
    return model.eval()


@torch.no_grad()
def init_dummy_weights(model: DecoderForCausalLM, seed: int = 0, scale: float = 0.02) -> None:
    """Random weights at the model's real shapes, made on its device (no checkpoint read).

    Norm weights are 1; every other parameter is uniform in [-scale, scale], so activations stay finite
    through any depth. For benchmarks: speed does not depend on the values (MoE routing aside).
    """
    g = None
    for name, param in model.named_parameters():
        if g is None:
            g = torch.Generator(device=param.device).manual_seed(seed)
        if name.endswith("norm.weight"):
            param.fill_(1.0)
        else:
            param.uniform_(-scale, scale, generator=g)


def load_weights(model: DecoderForCausalLM, model_dir: Path, show_progress: bool = True) -> None:
    params = dict(model.named_parameters(remove_duplicate=False))
    tied = model.config.tie_word_embeddings
    # A last pipeline stage without the embedding reads its tied lm_head from the embedding's tensor.
    embed_into_lm_head = tied and "lm_head.weight" in params and "model.embed_tokens.weight" not in params
    absent = model.absent_prefixes()
    # Expected (name, expert) slots; a tied lm_head is satisfied by the embedding.
    pending: set[tuple[str, int]] = set()
    for name, p in params.items():
        if tied and name == "lm_head.weight" and not embed_into_lm_head:
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
                    if embed_into_lm_head and key == "model.embed_tokens.weight":
                        targets = [("lm_head.weight", -1, f.get_tensor(key))]
                    elif key.startswith(absent):
                        continue
                    else:
                        targets = _targets(key, f, params, tied, path)
                    for target, expert, tensor in targets:
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
        missing = sorted(
            f"{n}" + (f"[expert {e + params[n].expert_start}]" if e >= 0 else "") for n, e in pending
        )
        raise ValueError(
            f"{model_dir}: checkpoint is missing {len(missing)} tensor(s), e.g. {missing[:5]} "
            f"(searched {', '.join(p.name for p in files)})"
        )
    logger.info("loaded %d tensors from %d file(s) in %s", total, len(files), model_dir)


def _read(f, key: str, param: torch.Tensor, path: Path) -> torch.Tensor:
    """The tensor ``key``, or only the slice of it ``param`` holds (``mark_shard``)."""
    shard = getattr(param, "tp_shard", None)
    if shard is None:
        return f.get_tensor(key)
    dim, start, full_size = shard
    view = f.get_slice(key)
    shape = view.get_shape()
    if dim >= len(shape) or shape[dim] != full_size:
        raise ValueError(
            f"{path.name}: tensor {key!r} has shape {tuple(shape)}, expected {full_size} along dim {dim}"
        )
    size = param.shape[dim + 1] if hasattr(param, "expert_start") else param.shape[dim]
    index = [slice(None)] * len(shape)
    index[dim] = slice(start, start + size)
    return view[tuple(index)]


def _targets(key: str, f, params: dict, tied: bool, path: Path):
    """Yield (parameter name, local expert index or -1, tensor) for one checkpoint tensor."""
    if key in params:
        if tied and key == "lm_head.weight":
            return
        yield key, -1, _read(f, key, params[key], path)
        return
    m = _EXPERT_RE.match(key)
    if m:
        prefix, block, expert, kind = m.groups()
        target = f"{prefix}.{block}.{_EXPERT_PARAM[kind]}"
        if target not in params:
            raise ValueError(f"{path.name}: tensor {key!r} has no matching MoE parameter in the model")
        param = params[target]
        local = int(expert) - param.expert_start
        if 0 <= local < param.shape[0]:  # else another rank holds this expert
            yield target, local, _read(f, key, param, path)
        return
    m = _FUSED_RE.match(key)
    if m:
        prefix, block, kind = m.groups()
        yield from _fused_targets(f, key, f"{prefix}.{block}", kind, params, path)
        return
    if tied and key == "lm_head.weight" or _IGNORED.search(key):
        return
    raise ValueError(f"{path.name}: unexpected tensor {key!r}: the model has no such parameter")


def _fused_targets(f, key: str, moe: str, kind: str, params: dict, path: Path):
    """Per-expert slices of a fused tensor: gate_up_proj [E, 2 * I, H] or down_proj [E, H, I]."""
    view = f.get_slice(key)
    shape = view.get_shape()
    if len(shape) != 3:
        raise ValueError(f"{path.name}: tensor {key!r} has shape {tuple(shape)}, expected 3 dimensions")
    if kind == "gate_up_proj":
        # Rows [0, I) are the gate, [I, 2I) the up projection; dim 1 of the file is dim 0 of one expert.
        parts = (("w_gate", 0), ("w_up", shape[1] // 2))
    else:
        parts = (("w_down", 0),)
    for name, offset in parts:
        target = f"{moe}.{name}"
        if target not in params:
            raise ValueError(f"{path.name}: tensor {key!r} has no matching MoE parameter in the model")
        param = params[target]
        first, count = param.expert_start, param.shape[0]
        index = [slice(first, first + count), slice(None), slice(None)]
        shard = getattr(param, "tp_shard", None)
        if shard is not None:
            dim, start, _ = shard
            index[dim + 1] = slice(offset + start, offset + start + param.shape[dim + 1])
        elif kind == "gate_up_proj":
            index[1] = slice(offset, offset + shape[1] // 2)
        tensor = view[tuple(index)]
        for e in range(tensor.shape[0]):
            yield target, e, tensor[e]
