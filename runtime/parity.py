"""Parity between the PyTorch fake-quant twin and its ONNX export, judged by distributions and
by layer. Numpy only.

End to end (``ParityAccumulator``), window by window, as llama.cpp's ``--kl-divergence`` does:
the per-token KL divergence ``KL(twin || onnx)`` of the next-token distributions (mean, 99th
percentile, max), the perplexity ratio, and top-1 agreement, over all positions and over the
positions where the twin is confident (its top-2 logit margin above ``top1_margin``). On a deep
static W8A8 model these mix float-kernel noise (an ulp of difference in a norm or ``exp`` flips a
quantization code now and then, and the flip grows through the layers) with real faults, so
their thresholds only catch faults that change the model's predictions.

Per decoder block (``BlockAccumulator``), teacher-forced: the twin's block ``l`` is fed ONNX
Runtime's own input to block ``l``, and its output is compared with ONNX Runtime's; the
divergence does not accumulate, so a correct export stays at one block's noise and the first
block that leaves it is named. The integer replay of every quantized linear is
``runtime.replay``.

Every threshold is measured (bench/validate_thresholds.py; docs/VALIDATION.md): the noise of
correct exports against the smallest seeded fault.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field

import numpy as np

from runtime.perplexity import token_nll


@dataclass(frozen=True)
class Thresholds:
    """The bars of each check (docs/VALIDATION.md, gives the measurements behind them)."""

    kl_mean: float = 0.5  # max mean per-token KL(twin || onnx), nats
    kl_p99: float = 3.0  # max 99th percentile of the per-token KL, nats
    ppl_ratio: float = 0.04  # max |PPL_onnx / PPL_twin - 1|
    top1_margin: float = 1.0  # positions whose twin top-2 logit margin exceeds this are "confident"
    min_top1_confident: float = 0.97  # min top-1 agreement over the confident positions
    block_error: float = 1e-5  # max relative divergence of a teacher-forced block (see BlockAccumulator)
    tie_ulps: int = 4  # integer replay: how near a rounding tie x / s may lie, in float32 ulps

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Check:
    """One statistic against its threshold."""

    name: str
    value: float
    threshold: float
    op: str  # "<=" or ">="

    @property
    def passed(self) -> bool:
        if not math.isfinite(self.value):
            return False
        return self.value <= self.threshold if self.op == "<=" else self.value >= self.threshold

    def to_dict(self) -> dict:
        return {"value": self.value, "threshold": self.threshold, "op": self.op, "passed": self.passed}


@dataclass
class ParityReport:
    ppl_torch: float  # the twin's perplexity
    ppl_onnx: float
    ppl_ratio: float  # ppl_onnx / ppl_torch
    kl_mean: float  # per-token KL(twin || onnx), nats
    kl_p99: float
    kl_max: float
    top1_agreement: float  # over all positions
    top1_confident: float  # over positions whose twin top-2 margin exceeds thresholds.top1_margin (nan if none)
    confident_positions: int
    positions: int
    max_abs_logit_diff: float
    mean_abs_logit_diff: float
    windows: int
    tokens: int
    thresholds: Thresholds = field(default_factory=Thresholds)

    @property
    def rel_diff(self) -> float:
        """``|PPL_onnx - PPL_twin| / PPL_twin``."""
        return abs(self.ppl_ratio - 1)

    @property
    def checks(self) -> list[Check]:
        t = self.thresholds
        confident = self.top1_confident if self.confident_positions else 1.0  # no confident position: nothing to check
        return [Check("kl_mean", self.kl_mean, t.kl_mean, "<="),
                Check("kl_p99", self.kl_p99, t.kl_p99, "<="),
                Check("ppl_ratio", self.rel_diff, t.ppl_ratio, "<="),
                Check("top1_confident", confident, t.min_top1_confident, ">=")]

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checks)

    def to_dict(self) -> dict:
        d = {k: getattr(self, k) for k in self.__dataclass_fields__ if k != "thresholds"}
        d["rel_diff"] = self.rel_diff
        d["top1_margin"] = self.thresholds.top1_margin
        d["checks"] = {c.name: c.to_dict() for c in self.checks}
        d["passed"] = self.passed
        return d


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


def token_kl(logits_p: np.ndarray, logits_q: np.ndarray, chunk: int = 64) -> np.ndarray:
    """``KL(p || q)`` per position, in float64: logits ``(T, V)`` -> ``(T,)`` nats."""
    out = np.empty(logits_p.shape[0], dtype=np.float64)
    for i in range(0, logits_p.shape[0], chunk):
        lp, lq = _log_softmax(logits_p[i:i + chunk]), _log_softmax(logits_q[i:i + chunk])
        out[i:i + chunk] = np.maximum((np.exp(lp) * (lp - lq)).sum(axis=-1), 0.0)
    return out


def top2_margin(logits: np.ndarray) -> np.ndarray:
    """The top logit minus the second, per position: ``(T, V)`` -> ``(T,)``."""
    top2 = np.partition(logits, -2, axis=-1)[:, -2:]
    return (top2[:, 1] - top2[:, 0]).astype(np.float64)


class ParityAccumulator:
    """``update(ids, logits_twin, logits_onnx)`` per window, then ``report(thresholds)``."""

    def __init__(self) -> None:
        self.nll_torch = 0.0
        self.nll_onnx = 0.0
        self.tokens = 0
        self.kl: list[np.ndarray] = []
        self.agree: list[np.ndarray] = []
        self.margin: list[np.ndarray] = []
        self.max_abs = 0.0
        self.sum_abs = 0.0
        self.values = 0
        self.windows = 0

    def update(self, ids: np.ndarray, logits_torch: np.ndarray, logits_onnx: np.ndarray) -> None:
        if logits_torch.shape != logits_onnx.shape:
            raise ValueError(f"logit shapes differ: torch {logits_torch.shape}, onnx {logits_onnx.shape}")
        self.nll_torch += float(token_nll(logits_torch, ids).sum())
        nll = token_nll(logits_onnx, ids)
        self.nll_onnx += float(nll.sum())
        self.tokens += nll.shape[0]
        self.kl.append(token_kl(logits_torch, logits_onnx))
        self.agree.append(logits_torch.argmax(-1) == logits_onnx.argmax(-1))
        self.margin.append(top2_margin(logits_torch))
        diff = np.abs(logits_torch.astype(np.float64) - logits_onnx)
        self.max_abs = max(self.max_abs, float(diff.max()))
        self.sum_abs += float(diff.sum())
        self.values += diff.size
        self.windows += 1

    def report(self, thresholds: Thresholds | None = None) -> ParityReport:
        if self.windows == 0:
            raise ValueError("no window was compared")
        t = thresholds or Thresholds()
        pt = math.exp(self.nll_torch / self.tokens)
        po = math.exp(self.nll_onnx / self.tokens)
        kl, agree, margin = np.concatenate(self.kl), np.concatenate(self.agree), np.concatenate(self.margin)
        confident = margin > t.top1_margin
        return ParityReport(
            ppl_torch=pt,
            ppl_onnx=po,
            ppl_ratio=po / pt,
            kl_mean=float(kl.mean()),
            kl_p99=float(np.percentile(kl, 99)),
            kl_max=float(kl.max()),
            top1_agreement=float(agree.mean()),
            top1_confident=float(agree[confident].mean()) if confident.any() else math.nan,
            confident_positions=int(confident.sum()),
            positions=int(agree.size),
            max_abs_logit_diff=self.max_abs,
            mean_abs_logit_diff=self.sum_abs / self.values,
            windows=self.windows,
            tokens=self.tokens,
            thresholds=t,
        )


def compare(windows: np.ndarray, logits_a: Iterable[np.ndarray], logits_b: Iterable[np.ndarray]) -> ParityAccumulator:
    """Feed two per-window logit streams (e.g. PyTorch and ONNX Runtime) over the same windows."""
    acc = ParityAccumulator()
    for ids, a, b in zip(windows, logits_a, logits_b, strict=True):
        acc.update(ids, a, b)
    return acc


# --- per block, teacher-forced ----------------------------------------------------------------------


@dataclass
class RelativeError:
    """``||a - b|| / ||ref||`` accumulated over windows (Frobenius norms), and its largest value
    for one token (row)."""

    sq_diff: float = 0.0
    sq_ref: float = 0.0
    token_max: float = 0.0
    max_abs_diff: float = 0.0

    def update(self, a: np.ndarray, b: np.ndarray, ref: np.ndarray) -> None:
        a, b, ref = (np.asarray(t, dtype=np.float64) for t in (a, b, ref))
        if a.shape != b.shape:
            raise ValueError(f"shapes differ: {a.shape} vs {b.shape}")
        d = a - b
        d2 = (d ** 2).reshape(-1, d.shape[-1]).sum(-1)  # per token
        r2 = (ref ** 2).reshape(-1, d.shape[-1]).sum(-1)
        self.sq_diff += float(d2.sum())
        self.sq_ref += float(r2.sum())
        self.token_max = max(self.token_max, float(np.sqrt(d2 / np.maximum(r2, 1e-30)).max(initial=0.0)))
        self.max_abs_diff = max(self.max_abs_diff, float(np.abs(d).max(initial=0.0)))

    @property
    def value(self) -> float:
        if self.sq_ref == 0.0:
            return 0.0 if self.sq_diff == 0.0 else math.inf
        return math.sqrt(self.sq_diff / self.sq_ref)


@dataclass
class BlockDivergence:
    """One stage of the model (the embedding, a decoder block, the final norm and head), fed
    ONNX Runtime's own input.

    ``block``: the twin's stage on ONNX Runtime's input alone, its output against ONNX Runtime's
    relative to what the stage added to the residual stream (``out - in``; the logits for the
    head). Inside the block the twin's own quantized linears run, so an ulp of difference in a
    norm or ``exp`` that flips a quantization code shows up here (a few 1e-3 on SmolLM2).

    ``float_error``: the same stage with every quantized linear also returning ONNX Runtime's
    output (whose integers the replay proves), so only the float operations between them are
    the twin's: the largest of the relative differences of the tensors each linear quantizes
    (``linears``, against ONNX Runtime's) and of the stage's output. Code flips cannot enter it,
    so a correct export stays at float32 rounding noise, and a changed epsilon, attention or
    activation leaves it."""

    name: str
    block: RelativeError = field(default_factory=RelativeError)
    output: RelativeError = field(default_factory=RelativeError)
    linears: dict[str, RelativeError] = field(default_factory=dict)

    def update_linear(self, layer: str, x_twin: np.ndarray, x_onnx: np.ndarray) -> None:
        self.linears.setdefault(layer, RelativeError()).update(x_twin, x_onnx, x_onnx)

    @property
    def error(self) -> float:
        return self.block.value

    @property
    def float_error(self) -> float:
        return max([self.output.value, *(r.value for r in self.linears.values())])

    @property
    def worst_linear(self) -> str | None:
        return max(self.linears, key=lambda k: self.linears[k].value) if self.linears else None

    def to_dict(self) -> dict:
        return {"name": self.name, "float_error": self.float_error, "output_float_error": self.output.value,
                "worst_linear_input": self.worst_linear,
                "linear_input_errors": {k: r.value for k, r in self.linears.items()},
                "block_error": self.error, "block_token_error": self.block.token_max,
                "block_max_abs_diff": self.block.max_abs_diff}


@dataclass
class BlockReport:
    """The teacher-forced divergence of every stage against ``threshold`` (on ``float_error``);
    ``mapped`` False (with ``reason``) when the graph's block boundaries could not be found."""

    stages: list[BlockDivergence]
    threshold: float
    windows: int
    how: str = ""
    reason: str | None = None
    required: bool = False  # an unmapped graph fails (the fused graph sasq-edge writes always maps)

    @property
    def mapped(self) -> bool:
        return self.reason is None

    @property
    def ran(self) -> bool:
        """Whether the check has a verdict: it ran, or it had to and could not (a failure)."""
        return self.mapped or self.required

    def error_ok(self, s: BlockDivergence) -> bool:
        return math.isfinite(s.float_error) and s.float_error <= self.threshold

    @property
    def failed(self) -> list[BlockDivergence]:
        return [s for s in self.stages if not self.error_ok(s)]

    @property
    def first_failure(self) -> str | None:
        bad = self.failed
        return bad[0].name if bad else None

    @property
    def passed(self) -> bool:
        return self.mapped and bool(self.stages) and not self.failed

    def summary(self) -> str:
        if not self.mapped:
            return f"block check {'FAILED' if self.required else 'NOT RUN'}: {self.reason}"
        worst = max(self.stages, key=lambda s: s.float_error)
        block = max(self.stages, key=lambda s: s.error)
        head = (f"block check {'PASSED' if self.passed else 'FAILED'}: {len(self.stages) - len(self.failed)}/{len(self.stages)} "
                f"stages within {self.threshold:g} (teacher-forced, {self.windows} windows; largest float error "
                f"{worst.float_error:.2e} at {worst.name}; block error with the twin's own linears up to {block.error:.2e} "
                f"at {block.name})")
        if not self.passed:
            bad = self.failed[0]
            at = bad.worst_linear
            where = f", at the input of {at}" if at and bad.linears[at].value == bad.float_error else ""
            head += f"; first stage to leave float noise: {bad.name}{where}"
        return head

    def to_dict(self) -> dict:
        return {"passed": self.passed, "mapped": self.mapped, "required": self.required, "reason": self.reason, "how": self.how,
                "threshold": self.threshold, "windows": self.windows, "first_failure": self.first_failure,
                "max_float_error": max((s.float_error for s in self.stages), default=None),
                "max_block_error": max((s.error for s in self.stages), default=None),
                "stages": [s.to_dict() | {"passed": self.error_ok(s)} for s in self.stages]}
