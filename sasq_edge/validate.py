"""The twin's side of ``sasq-validate``: what the PyTorch fake-quant model (rebuilt by
``apply_state``) says each check should see, and the run of every check on an export folder.

Checks (each measured against a threshold, docs/VALIDATION.md):

1. fusion: every quantized linear runs as an integer kernel on ONNX Runtime's CPU graph
   (``runtime.fusion``);
2. weights digest: the INT8 weights stored in the graph are the ones the scale state was trained
   with (``recipe.json``'s ``weights``) and the twin holds;
3. integer replay (``runtime.replay``) of every quantized linear on ``layer_windows`` windows:
   ONNX Runtime's ``MatMul`` output against the integers the scale state and the twin's weight
   codes determine;
4. blocks, teacher-forced (``runtime.parity.BlockAccumulator``): each decoder block of the twin,
   fed ONNX Runtime's own input to that block, against ONNX Runtime's output of it;
5. distributions end to end (``runtime.parity.ParityAccumulator``): per-token KL, PPL ratio,
   confident top-1 agreement.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn
from tqdm.auto import tqdm

from runtime.families import arch_spec
from runtime.parity import BlockDivergence, BlockReport, ParityReport, Thresholds, compare
from runtime.perplexity import iter_logits as onnx_logits
from runtime.probe import ProbeSession, block_of, block_taps, linear_taps
from runtime.replay import LinearReplay, ReplayReport, TwinLinear, graph_weights_digest
from runtime.session import LMSession
from runtime.state import ScaleState
from sasq_edge.evaluate import iter_logits
from sasq_edge.modules import quant_linears
from sasq_edge.quant_math import soft_truncate
from sasq_edge.state import weights_of


def twin_linears(model: nn.Module, state: ScaleState) -> dict[str, TwinLinear]:
    """Module name -> what the twin's ``QuantLinear`` computes: its frozen INT8 codes and
    per-channel scales, the state's activation scale, its bias."""
    out = {}
    for name, m in quant_linears(model):
        bias = None if m.bias is None else m.bias.detach().float().cpu().numpy()
        out[name] = TwinLinear(m.weight_int.cpu().numpy(), m.weight_scale.cpu().numpy(), state.scales[name], bias)
    return out


def _blocks(model: nn.Module) -> tuple[nn.ModuleList, nn.Module | None]:
    """The decoder blocks and the final norm (the module beside the block list named ``norm``)."""
    spec = arch_spec(model.config.model_type)
    blocks = model.get_submodule(spec.blocks)
    parent = spec.blocks.rpartition(".")[0]
    norm = getattr(model.get_submodule(parent) if parent else model, "norm", None)
    return blocks, norm


@dataclass
class TeacherForced:
    """The twin's outputs when every stage reads ONNX Runtime's input to it: the residual stream
    entering the first block (the embedding) ``(T, H)``, each decoder block's output ``(T, H)``,
    the logits of the final norm and head ``(T, V)``, and (when the linears were forced too) the
    float tensor each quantized linear quantizes ``(T, K)``."""

    embedding: np.ndarray
    blocks: list[np.ndarray]
    logits: np.ndarray
    linear_inputs: dict[str, np.ndarray]


@contextlib.contextmanager
def _hooks(handles: list) -> Iterator[None]:
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def teacher_forced(model: nn.Module, ids: np.ndarray, inputs: list[np.ndarray],
                   linear_outputs: dict[str, np.ndarray] | None = None) -> TeacherForced:
    """One forward pass of the twin on the window ``ids`` ``(T,)`` in which block ``l`` reads
    ``inputs[l]`` (ONNX Runtime's residual stream entering it) instead of the previous block's
    output, and the final norm reads ``inputs[-1]``. With ``linear_outputs`` (ONNX Runtime's
    ``MatMul`` output of each quantized linear, bias not added), every quantized linear returns
    ONNX Runtime's output instead of its own, so the block computes only its float operations
    on ONNX Runtime's values, and the tensor each linear quantizes is returned (after soft
    truncation, as the graph's ``QuantizeLinear`` reads it). Every hook is removed on exit."""
    blocks, norm = _blocks(model)
    if len(inputs) != len(blocks) + 1:
        raise ValueError(f"{len(inputs)} block inputs for {len(blocks)} blocks (expected one more)")
    device = next(model.parameters()).device

    def tensor(x: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))[None].to(device)

    feeds = [tensor(x) for x in inputs]
    outs: list[torch.Tensor | None] = [None] * len(blocks)
    emb: list[torch.Tensor] = []
    seen: dict[str, np.ndarray] = {}

    def feed(i: int):
        def hook(_module, args, kwargs):
            if i == 0:  # the twin's own residual stream entering the first block (embedding, scaled where the family does)
                emb.append(args[0] if args else kwargs["hidden_states"])
            if args:
                return (feeds[i], *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": feeds[i]}
        return hook

    def keep(i: int):
        def hook(_module, _args, output):
            outs[i] = output[0] if isinstance(output, tuple) else output
        return hook

    def force(name: str, m: nn.Module):
        def hook(_module, args, output):
            x = m.quantizer_input(args[0])  # smoothed and rotated as the graph's QuantizeLinear reads it
            trunc = m.act_quant.trunc
            seen[name] = (x if trunc is None else soft_truncate(x, trunc))[0].float().cpu().numpy()
            y = tensor(linear_outputs[name]).to(output.dtype)
            return y if m.bias is None else y + m.bias
        return hook

    handles = []
    for i, block in enumerate(blocks):
        handles.append(block.register_forward_pre_hook(feed(i), with_kwargs=True))
        handles.append(block.register_forward_hook(keep(i)))
    if norm is not None:
        handles.append(norm.register_forward_pre_hook(lambda _m, args: (feeds[-1], *args[1:])))
    if linear_outputs is not None:
        for name, m in quant_linears(model):
            if name in linear_outputs:
                handles.append(m.register_forward_hook(force(name, m)))
    with _hooks(handles):
        logits = model(input_ids=torch.from_numpy(np.ascontiguousarray(ids, dtype=np.int64))[None].to(device)).logits
    return TeacherForced(emb[0][0].float().cpu().numpy(), [o[0].float().cpu().numpy() for o in outs],
                         logits[0].float().cpu().numpy(), seen)


@dataclass
class WeightsCheck:
    """The INT8 weights' digests: stored in the graph, recorded in the scale state, held by the twin."""

    graph: str
    state: str | None
    twin: str

    @property
    def passed(self) -> bool:
        return self.graph == self.twin and self.state in (None, self.twin)

    def to_dict(self) -> dict:
        return {"graph": self.graph, "state": self.state, "twin": self.twin, "passed": self.passed}


@dataclass
class LayerChecks:
    replay: ReplayReport
    blocks: BlockReport
    weights: WeightsCheck


def layer_checks(model: nn.Module, state: ScaleState, path: str | os.PathLike, windows: np.ndarray,
                 thresholds: Thresholds, providers: list[str] | tuple[str, ...] = ("cpu",), threads: int | None = None,
                 progress: bool = True) -> LayerChecks:
    """The integer replay and the teacher-forced block check of the export at ``path`` against
    the twin ``model`` (``apply_state`` applied), on ``windows`` ``(W, T)``."""
    path = Path(path)
    proto = onnx.load(str(path))
    taps = linear_taps(proto)
    layers = len(_blocks(model)[0])
    bt = block_taps(proto, layers)
    twins = twin_linears(model, state)
    grid = state.deploy.act
    replays = {t.layer: LinearReplay(t.layer, quantized=t.quantized, graph_scale=t.graph_scale) for t in taps}
    unknown = sorted(set(replays) - set(twins))
    if unknown:  # a quantized weight the twin does not quantize: it cannot be replayed
        for name in unknown:
            replays[name].quantized = False
    names = [n for t in taps if t.layer in twins for n in (t.x, t.y)] + list(bt.inputs)
    probe = ProbeSession(path, proto, names, providers, threads)
    stages = [BlockDivergence("embedding"), *(BlockDivergence(f"layer {i}") for i in range(layers)),
              BlockDivergence("final norm + head")] if bt.mapped else []
    for ids in tqdm(windows, desc="layer checks", unit="window", disable=not progress):
        logits, out = probe.run(ids)
        for t in taps:
            if t.layer in twins:
                replays[t.layer].update(out[t.x], out[t.y], twins[t.layer], grid, thresholds.tie_ulps)
        if bt.mapped:
            res = [out[n] for n in bt.inputs]
            own = teacher_forced(model, ids, res)  # blocks on ORT's inputs, with the twin's own linears
            forced = teacher_forced(model, ids, res, {t.layer: out[t.y] for t in taps if t.layer in twins})
            stages[0].block.update(own.embedding, res[0], res[0])
            stages[0].output.update(forced.embedding, res[0], res[0])
            for i in range(layers):
                stages[i + 1].block.update(own.blocks[i], res[i + 1], res[i + 1] - res[i])
                stages[i + 1].output.update(forced.blocks[i], res[i + 1], res[i + 1] - res[i])
            stages[-1].block.update(own.logits, logits, logits)
            stages[-1].output.update(forced.logits, logits, logits)
            for t in taps:
                if t.layer in forced.linear_inputs:
                    b = block_of(t.layer)
                    stage = stages[-1] if b is None else stages[b + 1]
                    stage.update_linear(t.layer, forced.linear_inputs[t.layer], out[t.x])
    replay = ReplayReport([replays[t.layer] for t in taps], len(windows), thresholds.tie_ulps)
    blocks = BlockReport(stages, thresholds.block_error, len(windows), bt.how, bt.reason, bt.required)
    weights = WeightsCheck(graph_weights_digest(proto), state.weights, weights_of(model))
    return LayerChecks(replay, blocks, weights)


def distribution_check(model: nn.Module, sess: LMSession, windows: np.ndarray, thresholds: Thresholds) -> ParityReport:
    """The end-to-end statistics of the twin against ONNX Runtime over ``windows``."""
    return compare(windows, iter_logits(model, windows), onnx_logits(sess, windows)).report(thresholds)
