"""Writes a tiny random-weight checkpoint in exactly the Hugging Face layout, for tests and demos.

The output directory holds what a real Hub checkpoint holds, written by ``transformers`` itself:
``config.json``, ``generation_config.json``, ``model.safetensors`` (or ``model-0000i-of-0000n.safetensors``
plus ``model.safetensors.index.json`` when ``max_shard_size`` is small), ``tokenizer.json`` and
``tokenizer_config.json`` (with a ChatML chat template inside). Nothing is downloaded: the tokenizer is
a byte-level BPE trained in a few milliseconds on ``data/corpus.txt``, and the weights are random.
Afterwards config.json gets the two key spellings Hub checkpoints use (see ``_match_hub_config_keys``).

The same arguments and seed always produce byte-identical tensors and tokenizer files, so tests can
compare Duet's output against ``transformers`` run on the same directory.

    python -m engine.tools.make_tiny_model --arch qwen3 --out /tmp/tiny-qwen3 --max-shard-size 200KB
"""
from __future__ import annotations

import argparse
import json
import logging
import pathlib
from importlib import resources
from typing import Any

import torch
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import (
    AutoModelForCausalLM,
    GenerationConfig,
    LlamaConfig,
    MistralConfig,
    MixtralConfig,
    PretrainedConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen3Config,
    Qwen3MoeConfig,
)
from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX as QWEN2_PRETOKENIZE_REGEX

logger = logging.getLogger(__name__)

CONFIG_CLASSES: dict[str, type[PretrainedConfig]] = {
    "llama": LlamaConfig,
    "mistral": MistralConfig,
    "qwen2": Qwen2Config,
    "qwen3": Qwen3Config,
    "mixtral": MixtralConfig,
    "qwen3_moe": Qwen3MoeConfig,
}
MOE_ARCHS = frozenset({"mixtral", "qwen3_moe"})
DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

BOS_TOKEN = "<|bos|>"
EOS_TOKEN = "<|eos|>"
PAD_TOKEN = "<|pad|>"
IM_START_TOKEN = "<|im_start|>"
IM_END_TOKEN = "<|im_end|>"
# Order fixes the ids: bos=0, eos=1, pad=2, im_start=3, im_end=4.
SPECIAL_TOKENS = [BOS_TOKEN, EOS_TOKEN, PAD_TOKEN, IM_START_TOKEN, IM_END_TOKEN]
TOKENIZER_VOCAB_SIZE = 512

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# The HF default (0.02) leaves a 64-wide model's logits almost uniform (std ~0.2), so greedy decoding
# would hinge on float noise. With 0.2 the layers outweigh the token's own embedding in the residual
# stream, so outputs depend on the whole context even with tied embeddings (at 0.1 a tied model
# repeats one token forever), and attention is far from uniform.
INIT_STD = 0.2
# Scales the final RMSNorm weight: logits get std ~6 and the argmax a clear margin (median top-1/top-2
# gap ~1 logit) without touching the residual stream. Real checkpoints also have large final norms.
# Near-ties still occur now and then, so bf16 greedy runs can drift from fp32 ones after a few tokens.
FINAL_NORM_SCALE = 4.0
# Norm weights and biases are constant (1 and 0) after HF init; jittering them makes a loader that
# drops or misplaces them produce different logits instead of passing by accident.
NORM_JITTER_STD = 0.1

LLAMA3_ROPE_FACTOR = 8.0


def build_tokenizer(model_max_length: int) -> PreTrainedTokenizerFast:
    """Trains the byte-level BPE on the bundled corpus; deterministic and ~10 ms."""
    corpus = resources.files("duet.engine.tools").joinpath("data/corpus.txt").read_text(encoding="utf-8")
    tokenizer = Tokenizer(models.BPE())
    # transformers 5.x ignores tokenizer.json's normalizer and pre-tokenizer for some model types
    # (qwen2 among them) and rebuilds Qwen2Tokenizer's: NFC, then Qwen's split regex, then bytes.
    # Using that same pipeline for every arch keeps AutoTokenizer and a bare tokenizer.json reader in
    # agreement whatever the config's model_type says.
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TOKENIZER_VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        # All 256 byte symbols, so any UTF-8 text (emoji, CJK) encodes without an unknown token.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus.splitlines(keepends=True), trainer=trainer)
    bos_id = tokenizer.token_to_id(BOS_TOKEN)
    # Llama-style: encode() prepends <|bos|>; the chat template writes it itself and is tokenized
    # without special tokens, so chats get exactly one.
    tokenizer.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(
            single=f"{BOS_TOKEN} $A",
            pair=f"{BOS_TOKEN} $A {BOS_TOKEN} $B",
            special_tokens=[(BOS_TOKEN, bos_id)],
        ),
    ])
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        # Byte-level BPE never needs one; saying so stops Qwen2Tokenizer adding "<|endoftext|>".
        unk_token=None,
        additional_special_tokens=[IM_START_TOKEN, IM_END_TOKEN],
        chat_template=CHAT_TEMPLATE,
        model_max_length=model_max_length,
        clean_up_tokenization_spaces=False,
    )


def build_rope_parameters(
    rope_scaling: str | dict[str, Any] | None, rope_theta: float, max_position_embeddings: int
) -> dict[str, Any]:
    """Returns the transformers 5.x ``rope_parameters`` dict (it replaced ``rope_theta``/``rope_scaling``)."""
    if rope_scaling is None:
        return {"rope_type": "default", "rope_theta": rope_theta}
    if rope_scaling == "llama3":
        # original_max_position_embeddings well below max_position_embeddings, so that with small head
        # dims some frequencies are kept, some interpolated and some divided by the factor.
        return {
            "rope_type": "llama3",
            "rope_theta": rope_theta,
            "factor": LLAMA3_ROPE_FACTOR,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": max(1, int(max_position_embeddings / LLAMA3_ROPE_FACTOR)),
        }
    if isinstance(rope_scaling, dict):
        return {"rope_theta": rope_theta, **rope_scaling}
    raise ValueError(f"rope_scaling must be None, 'llama3' or a dict, got {rope_scaling!r}")


def build_config(
    arch: str,
    *,
    vocab_size: int,
    hidden_size: int,
    num_layers: int,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    intermediate_size: int,
    num_experts: int,
    experts_per_token: int,
    moe_intermediate_size: int,
    max_position_embeddings: int,
    tie_word_embeddings: bool,
    rope_parameters: dict[str, Any],
    dtype: str,
    bos_token_id: int,
    eos_token_id: int,
    pad_token_id: int,
) -> PretrainedConfig:
    """Builds the architecture's own config class with the fields real checkpoints of it carry."""
    common: dict[str, Any] = dict(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        # Always written, so loaders need not derive it (Qwen3 checkpoints decouple it from hidden_size).
        head_dim=head_dim,
        hidden_act="silu",
        max_position_embeddings=max_position_embeddings,
        initializer_range=INIT_STD,
        rms_norm_eps=1e-6,
        tie_word_embeddings=tie_word_embeddings,
        rope_parameters=rope_parameters,
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
        dtype=dtype,
    )
    if arch == "llama":
        extra: dict[str, Any] = dict(attention_bias=False, mlp_bias=False)
    elif arch == "mistral":
        # Full attention: the tiny context never reaches a window anyway, and loaders need not care.
        extra = dict(sliding_window=None)
    elif arch in ("qwen2", "qwen3"):
        # Qwen2 always has q/k/v biases (hard-wired in its attention); Qwen3 has q/k RMSNorm instead.
        extra = dict(use_sliding_window=False, sliding_window=None)
    elif arch == "mixtral":
        # Mixtral's experts are sized by intermediate_size.
        extra = dict(
            intermediate_size=moe_intermediate_size,
            num_local_experts=num_experts,
            num_experts_per_tok=experts_per_token,
            sliding_window=None,
            router_jitter_noise=0.0,
        )
    elif arch == "qwen3_moe":
        extra = dict(
            num_experts=num_experts,
            num_experts_per_tok=experts_per_token,
            moe_intermediate_size=moe_intermediate_size,
            norm_topk_prob=True,
            decoder_sparse_step=1,
            mlp_only_layers=[],
            use_sliding_window=False,
            sliding_window=None,
        )
    else:
        raise ValueError(f"unknown arch {arch!r}; expected one of {sorted(CONFIG_CLASSES)}")
    return CONFIG_CLASSES[arch](**{**common, **extra})


def _perturb_init(model: torch.nn.Module) -> None:
    """Randomises what HF init leaves constant and sharpens the logits; draws from the seeded global RNG."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.add_(torch.randn_like(param) * NORM_JITTER_STD)
                if name == "model.norm.weight":
                    param.mul_(FINAL_NORM_SCALE)
            elif name.endswith(".bias"):
                param.normal_(0.0, INIT_STD)


def _match_hub_config_keys(config_path: pathlib.Path, arch: str) -> None:
    """Rewrites two keys that transformers 5.x spells differently from the checkpoints on the Hub.

    Engines meet Hub checkpoints, so the tiny ones should look like them; transformers 5.x still loads
    both spellings (``num_experts`` via Qwen3MoeConfig.attribute_map, ``torch_dtype`` as a legacy alias).
    """
    config = json.loads(config_path.read_text(encoding="utf-8"))
    if arch == "qwen3_moe":
        # Qwen3-MoE checkpoints say num_experts; transformers 5.x saves its internal num_local_experts.
        config["num_experts"] = config.pop("num_local_experts")
    # Checkpoints saved before transformers 5 carry only torch_dtype, and older readers look only there.
    config["torch_dtype"] = config["dtype"]
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _validate(arch: str, hidden_size: int, num_heads: int, num_kv_heads: int, num_experts: int,
              experts_per_token: int, dtype: str) -> None:
    if arch not in CONFIG_CLASSES:
        raise ValueError(f"unknown arch {arch!r}; expected one of {sorted(CONFIG_CLASSES)}")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    if hidden_size % num_heads != 0:
        raise ValueError(f"hidden_size {hidden_size} is not divisible by num_heads {num_heads}")
    if num_kv_heads <= 0 or num_heads % num_kv_heads != 0:
        raise ValueError(f"num_heads {num_heads} is not a multiple of num_kv_heads {num_kv_heads}")
    if arch in MOE_ARCHS and not 0 < experts_per_token <= num_experts:
        raise ValueError(f"experts_per_token must be in [1, num_experts={num_experts}], got {experts_per_token}")


def make_tiny_model(
    arch: str,
    out_dir: str | pathlib.Path,
    *,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    head_dim: int | None = None,
    intermediate_size: int = 128,
    num_experts: int = 4,
    experts_per_token: int = 2,
    moe_intermediate_size: int | None = None,
    max_position_embeddings: int = 1024,
    tie_word_embeddings: bool = False,
    rope_scaling: str | dict[str, Any] | None = None,
    rope_theta: float = 10000.0,
    dtype: str = "float32",
    seed: int = 0,
    max_shard_size: int | str | None = None,
    vocab_size: int | None = None,
    weights: bool = True,
) -> pathlib.Path:
    """Writes the checkpoint into ``out_dir`` (created if needed) and returns it as a Path.

    ``head_dim`` defaults to ``hidden_size // num_heads``; ``moe_intermediate_size`` (the per-expert
    width, MoE archs only) defaults to ``intermediate_size``; ``vocab_size`` defaults to the
    tokenizer's length and may be larger (padded embedding rows, as in real checkpoints).
    ``rope_scaling="llama3"`` applies Llama-3.1 scaling with ``original_max_position_embeddings =
    max_position_embeddings / 8``. ``max_shard_size`` (e.g. ``"200KB"``) splits the weights into shards.
    ``weights=False`` writes everything but the safetensors: a model to load with ``load_format="dummy"``
    at real sizes (an 8B checkpoint would take minutes to write and read).
    """
    _validate(arch, hidden_size, num_heads, num_kv_heads, num_experts, experts_per_token, dtype)
    rope_parameters = build_rope_parameters(rope_scaling, rope_theta, max_position_embeddings)
    tokenizer = build_tokenizer(max_position_embeddings)
    num_tokens = len(tokenizer)
    if vocab_size is None:
        vocab_size = num_tokens
    elif vocab_size < num_tokens:
        raise ValueError(f"vocab_size {vocab_size} is smaller than the tokenizer's {num_tokens} tokens")
    bos_id = tokenizer.convert_tokens_to_ids(BOS_TOKEN)
    eos_id = tokenizer.convert_tokens_to_ids(EOS_TOKEN)
    pad_id = tokenizer.convert_tokens_to_ids(PAD_TOKEN)
    im_end_id = tokenizer.convert_tokens_to_ids(IM_END_TOKEN)

    config = build_config(
        arch,
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim if head_dim is not None else hidden_size // num_heads,
        intermediate_size=intermediate_size,
        num_experts=num_experts,
        experts_per_token=experts_per_token,
        moe_intermediate_size=moe_intermediate_size if moe_intermediate_size is not None else intermediate_size,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=tie_word_embeddings,
        rope_parameters=rope_parameters,
        dtype=dtype,
        bos_token_id=bos_id,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
    )

    if weights:
        # Initialised in float32 and cast afterwards, so every dtype of one seed holds the same values
        # (up to rounding). fork_rng leaves the caller's global RNG as it was.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
            _perturb_init(model)
        model = model.to(DTYPES[dtype])
        model.config.dtype = dtype
    generation_config = GenerationConfig(
        bos_token_id=bos_id,
        # A chat turn ends with <|im_end|>; plain completion ends with <|eos|>.
        eos_token_id=[eos_id, im_end_id],
        pad_token_id=pad_id,
        do_sample=True,
        temperature=0.8,
        top_p=0.95,
        top_k=50,
    )

    out_path = pathlib.Path(out_dir)
    out_path.mkdir(parents=True, exist_ok=True)
    # A rerun into the same directory must not leave an index that points at shards of an earlier run.
    for stale in [*out_path.glob("model*.safetensors"), out_path / "model.safetensors.index.json"]:
        stale.unlink(missing_ok=True)
    save_kwargs: dict[str, Any] = {}
    if max_shard_size is not None:
        save_kwargs["max_shard_size"] = max_shard_size
    if weights:
        model.generation_config = generation_config
        model.save_pretrained(out_path, **save_kwargs)
    else:
        config.architectures = [AutoModelForCausalLM._model_mapping[type(config)].__name__]
        config.save_pretrained(out_path)
        generation_config.save_pretrained(out_path)
    # save_jinja_files=False keeps the template inside tokenizer_config.json, where most loaders look.
    tokenizer.save_pretrained(out_path, save_jinja_files=False)
    _match_hub_config_keys(out_path / "config.json", arch)
    if weights:
        logger.info("wrote tiny %s checkpoint (%d parameters) to %s", arch, model.num_parameters(), out_path)
    else:
        logger.info("wrote %s config and tokenizer (no weights) to %s", arch, out_path)
    return out_path


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", required=True, choices=sorted(CONFIG_CLASSES))
    parser.add_argument("--out", required=True, type=pathlib.Path, help="output directory")
    parser.add_argument("--hidden-size", type=int, default=64)
    parser.add_argument("--num-layers", type=int, default=2)
    parser.add_argument("--num-heads", type=int, default=4)
    parser.add_argument("--num-kv-heads", type=int, default=2)
    parser.add_argument("--head-dim", type=int, default=None)
    parser.add_argument("--intermediate-size", type=int, default=128)
    parser.add_argument("--num-experts", type=int, default=4)
    parser.add_argument("--experts-per-token", type=int, default=2)
    parser.add_argument("--moe-intermediate-size", type=int, default=None)
    parser.add_argument("--max-position-embeddings", type=int, default=1024)
    parser.add_argument("--vocab-size", type=int, default=None, help="default: the tokenizer's length")
    parser.add_argument("--tie-word-embeddings", action="store_true")
    parser.add_argument("--rope-scaling", choices=["llama3"], default=None)
    parser.add_argument("--rope-theta", type=float, default=10000.0)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-shard-size", default=None, help="e.g. 200KB; default: one file")
    parser.add_argument("--no-weights", action="store_true",
                        help="config and tokenizer only, for --load-format dummy at real model sizes")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = _parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    out = make_tiny_model(
        args.arch,
        args.out,
        hidden_size=args.hidden_size,
        num_layers=args.num_layers,
        num_heads=args.num_heads,
        num_kv_heads=args.num_kv_heads,
        head_dim=args.head_dim,
        intermediate_size=args.intermediate_size,
        num_experts=args.num_experts,
        experts_per_token=args.experts_per_token,
        moe_intermediate_size=args.moe_intermediate_size,
        max_position_embeddings=args.max_position_embeddings,
        tie_word_embeddings=args.tie_word_embeddings,
        rope_scaling=args.rope_scaling,
        rope_theta=args.rope_theta,
        dtype=args.dtype,
        seed=args.seed,
        max_shard_size=args.max_shard_size,
        vocab_size=args.vocab_size,
        weights=not args.no_weights,
    )
    print(out)


if __name__ == "__main__":
    main()
