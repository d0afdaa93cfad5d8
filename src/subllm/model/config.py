"""Model configuration, structure strings and presets (docs/design.md §2, §3.1)."""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError, SubLLMWarning

# --------------------------------------------------------------------------------------
# Structure strings: "T" is a block, "(" a subsampling module, ")" upsampling + bypass.
# --------------------------------------------------------------------------------------


@dataclass
class Segment:
    """A subsampled segment: the blocks and nested segments between a `(` and its `)`.

    `index` counts the `(` in the string (0-based), `depth` is 1 for an outermost segment.
    """

    index: int
    depth: int
    children: list[int | Segment] = field(default_factory=list)

    def blocks(self) -> list[int]:
        out: list[int] = []
        for c in self.children:
            out.extend(c.blocks() if isinstance(c, Segment) else [c])
        return out


def parse_structure(structure: str) -> list[int | Segment]:
    """Parse e.g. "TT(T(TT)T)T" into a tree of block indices and Segments.

    Raises ConfigError naming the offending position.
    """
    if not isinstance(structure, str) or not structure:
        raise ConfigError("structure must be a non-empty string over 'T', '(' and ')'")
    root: list[int | Segment] = []
    stack: list[tuple[Segment, int]] = []  # (segment, position of its '(')
    n_blocks = n_segments = 0
    for pos, ch in enumerate(structure):
        here = stack[-1][0].children if stack else root
        if ch == "T":
            here.append(n_blocks)
            n_blocks += 1
        elif ch == "(":
            seg = Segment(index=n_segments, depth=len(stack) + 1)
            n_segments += 1
            here.append(seg)
            stack.append((seg, pos))
        elif ch == ")":
            if not stack:
                raise ConfigError(
                    f"structure {structure!r}: ')' at position {pos} has no matching '('"
                )
            seg, _ = stack.pop()
            if not seg.blocks():
                raise ConfigError(
                    f"structure {structure!r}: empty segment ending at position {pos}; "
                    "put at least one 'T' inside every '(...)'"
                )
        else:
            raise ConfigError(
                f"structure {structure!r}: invalid character {ch!r} at position {pos}; "
                "use only 'T', '(' and ')'"
            )
    if stack:
        raise ConfigError(
            f"structure {structure!r}: '(' at position {stack[-1][1]} is never closed"
        )
    return root


def iter_segments(tree: list[int | Segment]) -> list[Segment]:
    """All segments in the order of their `(` in the string."""
    out: list[Segment] = []
    for item in tree:
        if isinstance(item, Segment):
            out.append(item)
            out.extend(iter_segments(item.children))
    return sorted(out, key=lambda s: s.index)


def block_token_fractions(tree: list[int | Segment], keep: list[float]) -> dict[int, float]:
    """Fraction of the input tokens each block sees: product of enclosing keep ratios."""
    out: dict[int, float] = {}

    def walk(items: list[int | Segment], frac: float) -> None:
        for item in items:
            if isinstance(item, Segment):
                walk(item.children, frac * keep[item.depth - 1])
            else:
                out[item] = frac

    walk(tree, 1.0)
    return out


# --------------------------------------------------------------------------------------
# ModelConfig
# --------------------------------------------------------------------------------------


BALANCERS = ("measured", "paper", "none")
ROPE_POSITIONS = ("original", "parent")
# rope_scaling types and the keys each needs (required, optional), as `transformers`.
ROPE_SCALING_KEYS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "linear": (("factor",), ()),
    "dynamic": (("factor", "original_max_position_embeddings"), ()),
    "llama3": (("factor", "low_freq_factor", "high_freq_factor",
                "original_max_position_embeddings"), ()),
    "yarn": (("factor", "original_max_position_embeddings"),
             ("attention_factor", "beta_fast", "beta_slow", "mscale", "mscale_all_dim",
              "truncate")),
}
THRESHOLDS = ("rank", "calibrated", "zero")
# A saved config without `threshold` predates the choice: its model was trained for, and
# decided at inference by, score > 0 (no cut-off buffers either). Loading saved configs
# (checkpoints, exported config.json) fills this in; new configs get the default.
SAVED_WITHOUT_THRESHOLD = "zero"
# A saved config without `rank_band` predates the band: it loads without one, so the model
# keeps deciding as it did when it was saved.
SAVED_WITHOUT_RANK_BAND = None
HF_FAMILIES = ("llama", "qwen2", "qwen3", "mistral")


# The valid values of every number of ModelConfig, as intervals ("[0, 1]": a probability;
# "(0, inf)": any finite positive number; NaN is in none of them): (interval, integer?).
# Schedules count steps from 1 (0 would skip the ramp), strengths and margins cannot be
# negative, probabilities and shares lie in [0, 1]. keep and rope_scaling are checked
# with their structure.
VALUE_RANGES: dict[str, tuple[str, bool]] = {
    "vocab_size": ("[1, inf)", True), "dim": ("[1, inf)", True),
    "n_layers": ("[1, inf)", True), "n_heads": ("[1, inf)", True),
    "n_kv_heads": ("[1, inf)", True), "ffn_dim": ("[1, inf)", True),
    "max_seq_len": ("[1, inf)", True), "head_dim": ("[2, inf)", True),
    "sliding_window": ("[1, inf)", True),
    "rope_theta": ("(1, inf)", False),  # the base of the rotary wavelengths
    "norm_eps": ("(0, inf)", False), "init_std": ("(0, inf)", False),
    "bypass_init": ("[0, 1]", False),  # the bypass scale c, held in [c_min, 1]
    "bypass_min_start": ("(0, 1]", False), "bypass_min_end": ("(0, 1]", False),
    "bypass_min_steps": ("[1, inf)", True), "bypass_limit_prob": ("[0, 1]", False),
    "balancer_prob_start": ("[0, 1]", False), "balancer_prob_end": ("[0, 1]", False),
    "balancer_prob_steps": ("[1, inf)", True), "balancer_strength": ("[0, inf)", False),
    "balancer_margin": ("[0, 1]", False),  # half-width of a band of kept fractions
    "balancer_rms_min": ("(0, inf)", False), "balancer_rms_max": ("(0, inf)", False),
    "threshold_decay": ("[0, 1)", False), "rank_band": ("[0, 1]", False),
}
OPTIONAL_VALUES = ("head_dim", "sliding_window", "rank_band")  # null: none
# Fields of older versions, removed because measurement showed they no longer paid for
# themselves (design.md §3.8): a saved config that has them still loads; they are dropped
# with one line of warning (`drop_retired`).
RETIRED = {"rank_quota_rate": "the quota controller", "rank_quota_every": "the quota controller",
           "weight_leak": "the leaky clamp"}


def drop_retired(d: dict[str, Any]) -> dict[str, Any]:
    """`d` without the retired fields, warning once (one line) about those it had."""
    old = [k for k in RETIRED if k in d]
    if not old:
        return d
    what = " and ".join(dict.fromkeys(RETIRED[k] for k in old))
    message = (f"ignoring {', '.join(old)}: settings of an older subllm for {what}, retired "
               "because they no longer paid for themselves (docs/design.md §3.8)")
    if message not in _WARNED:  # a model is read in several places: say it once
        _WARNED.add(message)
        warnings.warn(message, SubLLMWarning, stacklevel=3)
    return {k: v for k, v in d.items() if k not in RETIRED}


_WARNED: set[str] = set()


def check_value(name: str, v: Any, interval: str, integer: bool = False,
                none_ok: bool = False) -> None:
    """Raise ConfigError unless `v` is a number (an integer when `integer`; a bool is
    neither) in `interval`, written "[lo, hi]", "(lo, inf)", ...: NaN is refused always, and
    +-inf wherever a bound is finite or open."""
    left, right = interval[0], interval[-1]
    lo, hi = (float(x) for x in interval[1:-1].split(","))
    if (not isinstance(v, bool) and isinstance(v, int if integer else (int, float))
            and (lo < v if left == "(" else lo <= v) and (v < hi if right == ")" else v <= hi)):
        return
    if hi < math.inf:
        valid = f"in {interval}"
    elif integer:
        valid = "a positive integer" if (lo, left) == (1, "[") else f"an integer >= {lo:g}"
    else:
        valid = f"a finite number {'>' if left == '(' else '>='} {lo:g}"
    hint = ""
    if isinstance(v, str):  # YAML 1.1 reads 1e-5 (no dot) as text
        yaml_float = "e" in v.lower() and v.strip().lower() not in ("inf", "nan")
        hint = (" (text, not a number: YAML wants a dot in it, as in 1.0e-5)" if yaml_float
                else " (text, not a number: write it without quotes)")
    raise ConfigError(f"{name} must be {valid}{' or null' if none_ok else ''}, got {v!r}{hint}")


def check_values(values: Mapping[str, Any]) -> None:
    """`check_value` for each field of `values` that VALUE_RANGES names (null where the
    field is optional): a whole config, or the `model:` fields a settings file sets."""
    for name, v in values.items():
        if name in VALUE_RANGES and (v is not None or name not in OPTIONAL_VALUES):
            check_value(name, v, *VALUE_RANGES[name], none_ok=name in OPTIONAL_VALUES)


@dataclass
class ModelConfig:
    """Every hyper-parameter of a SUBLLM / LLaMA model.

    `structure` of only "T"s (the default) is a plain LLaMA. `keep` is the keep ratio of
    the subsampling modules: one float for every depth, or a list with one per depth.
    """

    vocab_size: int = 32000
    dim: int = 2048
    n_layers: int = 24
    n_heads: int = 16
    n_kv_heads: int | None = None  # None: n_heads (no grouped KV heads)
    ffn_dim: int = 5504
    structure: str | None = None  # None: "T" * n_layers
    keep: float | list[float] = 0.64
    max_seq_len: int = 4096
    rope_theta: float = 10000.0
    # RoPE positions of the blocks in a nested segment (depth >= 2; design.md §3.3):
    # "original" (the token's position in the sequence) or "parent" (its index among the
    # enclosing segment's kept tokens, as the authors' release's full pass does).
    rope_positions: str = "original"
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    head_dim: int | None = None  # None: dim // n_heads
    # Rotary scaling as in `transformers`' `rope_parameters` (rope_theta aside): None, or
    # {"rope_type": "llama3" | "linear" | "yarn" | "dynamic", "factor": ..., ...} with the
    # keys of ROPE_SCALING_KEYS (design.md §2.1; Llama-3.1, long-context Qwen).
    rope_scaling: dict[str, Any] | None = None
    qkv_bias: bool = False  # biases on q, k, v projections (Qwen2; Llama's attention_bias)
    o_bias: bool = False  # bias on the output projection (Llama's / Qwen3's attention_bias)
    qk_norm: bool = False  # RMSNorm over head_dim on each query and key head (Qwen3)
    # Sliding-window attention (Mistral): a token attends to the keys of the last
    # `sliding_window` positions, itself included (design.md §2.1).
    sliding_window: int | None = None
    # The `transformers` family a converted model came from (HF_FAMILIES), so that
    # `to_hf` writes its own class back; None for our own models.
    hf_family: str | None = None
    init_std: float = 0.02
    # Bypass (design.md §3.4): initial scale, and the schedule of its lower limit c_min.
    bypass_init: float = 0.5
    bypass_min_start: float = 0.9
    bypass_min_end: float = 0.2
    bypass_min_steps: int = 20000
    bypass_limit_prob: float = 0.6
    # Score balancer (design.md §3.5).
    balancer_prob_start: float = 1.0
    balancer_prob_end: float = 0.25
    balancer_prob_steps: int = 8000
    balancer_strength: float = 0.04
    # Band around `keep` for the measured fraction of positive scores (0.05 in our first
    # design): the balancer only acts outside the band, so scores settle at its edge; 0.02
    # keeps the eval-mode kept fraction within 0.05 of keep (docs/design.md §3.5).
    balancer_margin: float = 0.02
    balancer_rms_min: float = 1.25
    balancer_rms_max: float = 5.0
    # Which balancer (design.md §3.5): "measured" (ours: the direction from the measured
    # fraction of positive scores, scaled by the gradient's rms), "paper" (the published
    # rule: m / sd into the Gaussian quantile band keep +- 0.05, scaled by |g| elementwise)
    # or "none".
    balancer: str = "measured"
    # The inference rule (design.md §3.8): "rank" keeps a token whose score ranks in the top
    # `keep` share of its row so far (training's top-k made causal: the kept share holds on
    # any text); "calibrated" keeps a token whose score is above a running estimate of the
    # training top-k cut-off score (a buffer of each subsampler, updated in every training
    # forward pass; "rank" uses it for the upsampling weights); "zero" is the paper's rule,
    # score > 0 (models converted from the authors' release use it).
    threshold: str = "rank"
    threshold_decay: float = 0.99  # of the cut-off's running mean (about 100 steps)
    # The rank rule's budget band (design.md §3.8): inference keeps the rank rule's choice
    # while a row's kept count stays within (keep +- rank_band) x the tokens so far, and is
    # overruled (a token kept, or dropped) where it would leave that band, so every row keeps
    # keep +- rank_band (+ one token) of its tokens on any text. None: the plain rank rule.
    rank_band: float | None = 0.02

    def __post_init__(self) -> None:
        if self.structure is None and isinstance(self.n_layers, int):
            self.structure = "T" * self.n_layers
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if isinstance(self.keep, tuple):
            self.keep = list(self.keep)
        self.validate()

    # ---- derived ------------------------------------------------------------------
    @property
    def tree(self) -> list[int | Segment]:
        return parse_structure(self.structure)

    @property
    def segments(self) -> list[Segment]:
        return iter_segments(self.tree)

    @property
    def max_depth(self) -> int:
        return max((s.depth for s in self.segments), default=0)

    @property
    def is_subllm(self) -> bool:
        return "(" in self.structure

    @property
    def keep_per_depth(self) -> list[float]:
        depth = max(self.max_depth, 1)
        if isinstance(self.keep, list):
            return [float(k) for k in self.keep]
        return [float(self.keep)] * depth

    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim if self.head_dim is not None else self.dim // self.n_heads

    def segment_keep(self, seg: Segment) -> float:
        return self.keep_per_depth[seg.depth - 1]

    def block_fractions(self) -> dict[int, float]:
        return block_token_fractions(self.tree, self.keep_per_depth)

    def compute_fraction(self) -> float:
        """Block compute relative to a LLaMA of the same size (design.md §3.1)."""
        return sum(self.block_fractions().values()) / self.n_layers

    # ---- validation ---------------------------------------------------------------
    def validate(self) -> ModelConfig:
        """Refuse any value the model cannot mean (ConfigError naming the field, the value
        and what is valid): every number is checked against VALUE_RANGES, then the
        relations between fields."""
        check_values({name: getattr(self, name) for name in VALUE_RANGES})
        if self.head_dim is None and self.dim % self.n_heads:
            raise ConfigError(
                f"dim={self.dim} is not divisible by n_heads={self.n_heads}; "
                "choose n_heads that divides dim (or set head_dim)"
            )
        if self.head_dim is not None and self.head_dim % 2:
            raise ConfigError(f"head_dim must be a positive even integer, got {self.head_dim!r}")
        if self.resolved_head_dim % 2:
            raise ConfigError(
                f"head dimension {self.resolved_head_dim} (dim / n_heads) must be even for "
                "rotary embeddings; change dim or n_heads"
            )
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(
                f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}; "
                "choose n_kv_heads that divides n_heads"
            )
        tree = parse_structure(self.structure)
        n_t = self.structure.count("T")
        if n_t != self.n_layers:
            raise ConfigError(
                f"structure {self.structure!r} has {n_t} 'T' blocks but n_layers={self.n_layers}; "
                "make them equal"
            )
        depth = max((s.depth for s in iter_segments(tree)), default=0)
        keeps = self.keep if isinstance(self.keep, list) else [self.keep]
        if isinstance(self.keep, list) and depth and len(self.keep) != depth:
            raise ConfigError(
                f"keep has {len(self.keep)} values but the structure nests {depth} deep; "
                "give one keep ratio, or exactly one per depth"
            )
        for k in keeps:
            check_value("keep ratio", k, "(0, 1]")
        if self.bypass_min_end > self.bypass_min_start:
            raise ConfigError(f"bypass_min_end={self.bypass_min_end!r} is above bypass_min_start="
                              f"{self.bypass_min_start!r}; the bypass limit ramps down: need "
                              "0 < bypass_min_end <= bypass_min_start <= 1")
        if self.balancer_rms_min > self.balancer_rms_max:
            raise ConfigError(f"balancer_rms_min={self.balancer_rms_min!r} is above "
                              f"balancer_rms_max={self.balancer_rms_max!r}; need rms_min <= "
                              "rms_max")
        self._validate_rope_scaling()
        for name in ("qkv_bias", "o_bias", "qk_norm", "tie_embeddings"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be true or false, got {getattr(self, name)!r}")
        if self.hf_family is not None and self.hf_family not in HF_FAMILIES:
            raise ConfigError(f"hf_family must be one of {', '.join(HF_FAMILIES)} or null, got "
                              f"{self.hf_family!r}")
        if self.rope_positions not in ROPE_POSITIONS:
            raise ConfigError(f"rope_positions must be one of {', '.join(ROPE_POSITIONS)}, "
                              f"got {self.rope_positions!r}")
        if self.balancer not in BALANCERS:
            raise ConfigError(f"balancer must be one of {', '.join(BALANCERS)}, got "
                              f"{self.balancer!r}")
        if self.threshold not in THRESHOLDS:
            raise ConfigError(f"threshold must be one of {', '.join(THRESHOLDS)}, got "
                              f"{self.threshold!r}")
        return self

    def _validate_rope_scaling(self) -> None:
        rs = self.rope_scaling
        if rs is None:
            return
        if not isinstance(rs, dict):
            raise ConfigError(f"rope_scaling must be a mapping or null, got {rs!r}")
        kind = rs.get("rope_type")
        if kind not in ROPE_SCALING_KEYS:
            raise ConfigError(f"rope scaling type {kind!r} is not supported; supported: "
                              f"{', '.join(ROPE_SCALING_KEYS)} (or none)")
        required, optional = ROPE_SCALING_KEYS[kind]
        for key in rs:
            if key != "rope_type" and key not in required + optional:
                raise ConfigError(f"rope scaling {kind!r}: key {key!r} is not supported "
                                  f"(known: {', '.join(required + optional)})")
        for key in required:
            v = rs.get(key)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v < math.inf:
                raise ConfigError(f"rope scaling {kind!r} needs a finite positive {key!r}, got "
                                  f"{v!r}")
        for key in optional:
            if key == "truncate":
                if not isinstance(rs.get(key, True), bool):
                    raise ConfigError(f"rope scaling {kind!r}: 'truncate' must be true or "
                                      f"false, got {rs[key]!r}")
            elif rs.get(key) is not None:
                check_value(f"rope scaling {kind!r}: {key!r}", rs[key], "[0, inf)")
        if kind == "llama3" and not rs["low_freq_factor"] < rs["high_freq_factor"]:
            raise ConfigError(f"rope scaling 'llama3' needs low_freq_factor < high_freq_factor, "
                              f"got {rs['low_freq_factor']!r} and {rs['high_freq_factor']!r}")
        if kind == "dynamic" and self.max_seq_len > rs["original_max_position_embeddings"]:
            # Dynamic NTK changes the frequencies only past the original context, growing
            # with the sequence; inside it, it is the plain rotary embedding (design.md §2.1).
            raise ConfigError(
                f"dynamic rope scaling is implemented up to its original context "
                f"({rs['original_max_position_embeddings']} tokens) only; max_seq_len="
                f"{self.max_seq_len} is longer: lower max_seq_len")

    # ---- (de)serialisation ----------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        if not isinstance(d, dict):
            raise ConfigError(f"a model config must be a mapping of keys to values, got {d!r}")
        d = drop_retired(d)
        names = [f.name for f in dataclasses.fields(cls)]
        for key in d:
            if key not in names:
                near = difflib.get_close_matches(str(key), names, n=1)
                hint = f"; did you mean {near[0]!r}?" if near else f"; valid keys: {names}"
                raise ConfigError(f"unknown model config key {key!r}{hint}")
        try:
            return cls(**d)
        except TypeError as e:  # e.g. a list where an int belongs
            raise ConfigError(f"invalid model config: {e}") from None

    @classmethod
    def from_file(cls, path: str | Path) -> ModelConfig:
        """Load a config from YAML or JSON. A top-level `model:` section is accepted."""
        try:  # in a try block so that exported model code does not require PyYAML
            import yaml
        except ImportError:  # pragma: no cover - PyYAML is a dependency of subllm
            raise ConfigError("reading config files needs PyYAML: pip install pyyaml") from None

        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {str(p)!r} does not exist")
        text = p.read_text()
        try:
            d = json.loads(text) if p.suffix == ".json" else yaml.safe_load(text)
        except (json.JSONDecodeError, yaml.YAMLError) as e:
            first = str(e).strip().splitlines()[0]
            raise ConfigError(f"cannot parse {str(p)!r}: {first}") from None
        if isinstance(d, dict) and isinstance(d.get("model"), dict):
            d = d["model"]
        if isinstance(d, dict) and "preset" in d:
            base = cls.preset(d.pop("preset")).to_dict()
            if "n_layers" in d and "structure" not in d:
                base["structure"] = None
            base.update(d)
            d = base
        return cls.from_dict(d)

    @classmethod
    def preset(cls, name: str) -> ModelConfig:
        if name not in PRESETS:
            near = difflib.get_close_matches(name, list(PRESETS), n=1)
            hint = f"did you mean {near[0]!r}? " if near else ""
            raise ConfigError(f"unknown preset {name!r}; {hint}presets: {', '.join(PRESETS)}")
        return cls(**PRESETS[name])

    @classmethod
    def load(cls, preset_or_path: str) -> ModelConfig:
        """A preset name, or a path to a YAML/JSON config file."""
        if preset_or_path in PRESETS:
            return cls.preset(preset_or_path)
        path = Path(preset_or_path)
        if path.suffix in (".yaml", ".yml", ".json") or path.exists():
            return cls.from_file(preset_or_path)
        return cls.preset(preset_or_path)  # raises with the list of presets


def require_model_config(config: Any, owner: str) -> None:
    """A TypeError that says what to pass when a model part is built from something other
    than a ModelConfig (a dict, a transformers config). By class name too: a model directory
    exported with its own copy of this package has its own ModelConfig class."""
    if isinstance(config, ModelConfig) or type(config).__name__ == "ModelConfig":
        return
    if isinstance(config, dict):
        how = "ModelConfig.from_dict(d) or ModelConfig(**d) from a dict d"
    elif type(config).__name__ == "SubLLMConfig":
        how = "config.to_model_config() (or use SubLLMForCausalLM(config))"
    else:
        how = "ModelConfig(...), ModelConfig.preset(name) or ModelConfig.load(path)"
    raise TypeError(f"{owner}(config) takes a subllm.ModelConfig, got {type(config).__name__}; "
                    f"make one with {how}")


PAPER_STRUCTURE = "TTTTT(TTTTT(TTTT)TTTTT)TTTTT"

_PAPER = dict(vocab_size=32000, dim=2048, n_layers=24, n_heads=16, ffn_dim=5504, max_seq_len=4096,
              tie_embeddings=False, norm_eps=1e-5, rope_theta=10000.0)
# `small`: the paper's 24-block shape at a size a CPU can train and benchmark.
_SMALL = dict(vocab_size=8192, dim=512, n_layers=24, n_heads=8, ffn_dim=1376, max_seq_len=2048,
              tie_embeddings=False, norm_eps=1e-5)
# `tiny`: a few M parameters, trains on a CPU in minutes (the demo and the tests).
_TINY = dict(vocab_size=8192, dim=128, n_layers=12, n_heads=4, ffn_dim=352, max_seq_len=1024,
             tie_embeddings=True, norm_eps=1e-5)

PRESETS: dict[str, dict[str, Any]] = {
    "llama-tiny": {**_TINY},
    "subllm-tiny": {**_TINY, "structure": "TTT(TT(TT)TT)TTT", "keep": 0.64},
    "llama-small": {**_SMALL},
    "subllm-small": {**_SMALL, "structure": PAPER_STRUCTURE, "keep": 0.64},
    "llama-1.3b": {**_PAPER},
    "subllm-1.3b": {**_PAPER, "structure": PAPER_STRUCTURE, "keep": 0.64},
}


# the loss-chunk rule lives here, torch-free, so that the memory planner uses it too
def default_loss_chunk_tokens(vocab_size: int, dim: int, n_tokens: int) -> int:
    """Tokens per loss chunk when neither `chunks` nor `chunk_size` is given (design.md §4).

    Two (x d) buffers exist during the loss whatever the chunking: the hidden states
    (n_tokens x d) and the head's weight gradient (vocab x d). A chunk's one fp32 buffer
    (c x vocab: logits, then in place their gradient) is made half as large as the larger
    of the two, so the loss holds at most 1.5 times what it must hold anyway: c = d / 2 at a
    vocabulary larger than the sequence, else c = ceil(n_tokens * d / (2 vocab)) (twice the
    paper's M = ceil(vocab / d) chunks, design.md §4). Measured on a CPU (HF Llama, d 256,
    vocab 128256, 8k tokens, fp32): d / 2 = 128-token chunks peaked 4.6 % lower than d-token
    ones at 6 % more time, 64-token ones no lower than 128 (the step's peak has left the
    loss) and 10-15 % slower. No smaller: each chunk streams the whole (vocab x d) weight
    gradient through memory once (its update's inner dimension is c), so short chunks
    spend the step on memory traffic (17-token chunks, the paper's rule there, made the
    loss 1.7x slower). At most 512 tokens: beyond that the matmuls are no faster and only
    the memory grows.
    """
    per_chunk = math.ceil(dim * max(n_tokens, vocab_size) / (2 * vocab_size))
    return max(1, min(per_chunk, 512, n_tokens))
