"""What to quantize and how: one rule object for ``qflax.linen.quantize_params`` and ``qflax.nnx.quantize_model``.

A :class:`QuantRules` is an ordered list of :class:`Rule` s. Each layer of a float model, a Dense (a
2-D Flax ``kernel``, an ``nnx.Linear``) or an Embed (a 2-D ``embedding``, an ``nnx.Embed``), takes the
first rule that matches its dotted module path (``"encoder.layers_0.fc"``; NNX list items by index,
``"blocks.0"``) and its kind. A layer no rule matches, or whose rule says ``keep_float=True``, stays
float. Both converters read the same rules the same way, so a Linen and an NNX model with the same
module names are quantized to the same bytes.

The default (``QuantRules.default()``, what ``rules=None`` means) quantizes every Dense layer to NF4,
blocksize 64 with double quantization, and leaves embedding tables float: what bitsandbytes'
``load_in_4bit`` does to a transformers model.

Example:
  >>> rules = QuantRules(
  ...     Rule("lm_head", keep_float=True),
  ...     Rule("*", layers="embed", format="8bit"),
  ...     Rule("*", format="4bit", quant_type="fp4", blocksize=128),
  ... )
"""

import dataclasses
import fnmatch
import math
from typing import Callable, Iterable, Optional, Union

from qflax.quant import codebooks, validation

FORMATS = ("4bit", "8bit")
KINDS = ("dense", "embed")
LAYER_CHOICES = KINDS + ("all",)
# bitsandbytes' defaults: Linear4bit double-quantizes its absmax, Embedding4bit does not.
DEFAULT_COMPRESS_STATISTICS = {"dense": True, "embed": False}

Pattern = Union[str, Callable[[str], bool]]


@dataclasses.dataclass(frozen=True)
class Rule:
    """How the layers matching one pattern are quantized.

    Attributes:
      pattern: an ``fnmatch`` pattern on the dotted module path (``"*"``, ``"lm_head"``,
        ``"encoder.*.attention.*"``; the root layer's path is ``""``), or a predicate on that path.
      layers: the layer kinds the rule applies to: "dense", "embed" or "all".
      format: "4bit" (NF4/FP4: Dense4bit, Embed4bit) or "8bit" (LLM.int8 rows: Dense8bitLt, Embed8bit).
      quant_type: "nf4" or "fp4" (4-bit only).
      blocksize: elements per absmax block, 32 ... 4096 (4-bit only).
      compress_statistics: double quantization of the absmax (4-bit only); None takes
        bitsandbytes' default per kind: True for Dense, False for Embed.
      threshold: LLM.int8 outlier threshold of the Dense8bitLt layers an NNX model gets (8-bit Dense
        only; it is a setting of the layer, not of the stored weight).
      keep_float: leave the matching layers float (the other settings are ignored).

    Raises:
      ValueError, TypeError: a setting outside the allowed values (named in the message).
    """

    pattern: Pattern = "*"
    layers: str = "all"
    format: str = "4bit"
    quant_type: str = "nf4"
    blocksize: int = 64
    compress_statistics: Optional[bool] = None
    threshold: float = 0.0
    keep_float: bool = False

    def __post_init__(self):
        if not (isinstance(self.pattern, str) or callable(self.pattern)):
            raise TypeError(f"Rule pattern must be an fnmatch pattern (str) or a predicate, got {self.pattern!r}")
        validation.check_choice(self.layers, LAYER_CHOICES, "Rule layers")
        validation.check_choice(self.format, FORMATS, "Rule format")
        validation.check_choice(self.quant_type, codebooks.QUANT_TYPES, "Rule quant_type")
        validation.check_choice(self.blocksize, validation.BLOCKSIZES_4BIT, "Rule blocksize")
        if self.compress_statistics not in (None, True, False):
            raise TypeError(f"Rule compress_statistics must be None, True or False, got {self.compress_statistics!r}")
        if isinstance(self.threshold, bool) or not (math.isfinite(self.threshold) and self.threshold >= 0):
            raise ValueError(f"Rule threshold must be a finite number >= 0, got {self.threshold!r}")

    def matches(self, path: str, kind: str) -> bool:
        """Whether this rule applies to the layer of kind ``kind`` ("dense"/"embed") at ``path``."""
        if self.layers not in (kind, "all"):
            return False
        if isinstance(self.pattern, str):
            return fnmatch.fnmatchcase(path, self.pattern)
        return bool(self.pattern(path))


@dataclasses.dataclass(frozen=True)
class LayerQuantization:
    """What one layer becomes: a matched :class:`Rule` with the per-kind defaults filled in.

    Attributes:
      kind: "dense" or "embed".
      format: "4bit" or "8bit".
      quant_type: "nf4" or "fp4".
      blocksize: absmax block size.
      compress_statistics: double quantization (resolved, never None).
      threshold: the LLM.int8 threshold (8-bit Dense layers).
    """

    kind: str
    format: str
    quant_type: str
    blocksize: int
    compress_statistics: bool
    threshold: float


class QuantRules:
    """An ordered set of :class:`Rule` s; the first that matches a layer decides.

    Args:
      *rules: the rules, most specific first.

    Raises:
      TypeError: an argument is not a Rule.
    """

    def __init__(self, *rules: Rule):
        for rule in rules:
            if not isinstance(rule, Rule):
                raise TypeError(f"QuantRules takes Rule objects, got {type(rule).__name__}")
        self.rules = tuple(rules)

    @classmethod
    def default(cls) -> "QuantRules":
        """Every Dense layer NF4 (blocksize 64, double quantization); embeddings stay float."""
        return cls(Rule("*", layers="dense"))

    def resolve(self, path: str, kind: str) -> Optional[LayerQuantization]:
        """What the layer of kind ``kind`` at dotted ``path`` becomes; None keeps it float."""
        validation.check_choice(kind, KINDS, "kind")
        for rule in self.rules:
            if rule.matches(path, kind):
                if rule.keep_float:
                    return None
                nested = rule.compress_statistics
                if nested is None:
                    nested = DEFAULT_COMPRESS_STATISTICS[kind]
                return LayerQuantization(kind, rule.format, rule.quant_type, rule.blocksize, nested, rule.threshold)
        return None

    def __iter__(self):
        return iter(self.rules)

    def __eq__(self, other) -> bool:
        return isinstance(other, QuantRules) and self.rules == other.rules

    __hash__ = None

    def __repr__(self) -> str:
        return f"QuantRules({', '.join(map(repr, self.rules))})"


def as_rules(rules: Union[None, Rule, QuantRules, Iterable[Rule]]) -> QuantRules:
    """The :class:`QuantRules` of a converter's ``rules`` argument: None (the default), a Rule, or Rules.

    Raises:
      TypeError: anything else.
    """
    if rules is None:
        return QuantRules.default()
    if isinstance(rules, QuantRules):
        return rules
    if isinstance(rules, Rule):
        return QuantRules(rules)
    if isinstance(rules, (str, bytes)) or not isinstance(rules, Iterable):
        raise TypeError(f"rules must be None, a Rule, a QuantRules or a sequence of Rules, got {type(rules).__name__}")
    return QuantRules(*rules)
