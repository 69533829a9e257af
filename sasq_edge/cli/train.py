"""sasq-train: calibrate and train the activation scales of a model; write the scale state.

Under ``accelerate launch`` / ``torchrun`` every process runs this command (data parallel,
``sasq_edge.distributed``); rank 0 alone locks and writes the run folder and prints the summary."""

from __future__ import annotations

import contextlib
import sys

from sasq_edge.cli import recipe
from sasq_edge.cli.common import DATA_EPILOG, add_data_args, add_model_args, data_spec, emit, entry, parser


def _train(argv: list[str] | None) -> int:
    p = parser("sasq-train", "Calibrate and train the activation scales of a model; write scales.safetensors + recipe.json.",
               epilog=DATA_EPILOG)
    p.add_argument("run_dir", help="output folder for the scale state")
    add_model_args(p, required=True)
    add_data_args(p, "calibration")
    recipe.add_train_args(p)
    p.add_argument("--layerwise", action="store_true",
                   help="calibrate a local safetensors checkpoint one decoder layer at a time (automatic when the float32 "
                        "model would not fit in memory; no training: --train-steps 0)")
    recipe.add_scaleout_args(p)
    args = p.parse_args(argv)
    from runtime.folder import exports_in
    from runtime.io import OutputFolder, preflight
    from runtime.sources import record_text
    from runtime.state import RECIPE_FILE, SCALES_FILE
    from sasq_edge.api import quantize
    from sasq_edge.distributed import init_from_env, shutdown
    from sasq_edge.errors import ConfigError

    cfg = recipe.config(args)
    data_spec(args.data)  # a bad spec fails before the model loads
    device = recipe.device(args)
    group = init_from_env(device)
    try:
        unit = OutputFolder(args.run_dir, own_files=(SCALES_FILE, RECIPE_FILE))
        exports = exports_in(unit.folder)
        if exports:
            raise ConfigError(f"{unit.folder} is an export folder ({', '.join(exports)}): sasq-train would replace the "
                              "scales its export was written with; train into a folder of its own (then sasq-export "
                              "--scales RUN)")
        if group.is_main:
            preflight(unit.folder)
        # a second run on the same folder fails now, not after training; only rank 0 writes
        with unit.lock() if group.is_main else contextlib.nullcontext():
            q = quantize(args.model, cfg, data=args.data, data_dir=args.data_dir, layerwise=args.layerwise,
                         trust_remote_code=args.trust_remote_code, device=device, memory_check=not args.no_memory_check,
                         for_export=False, dtype=args.dtype, gradient_checkpointing=args.gradient_checkpointing,
                         group=group, progress=not args.json, command="sasq-train")
            state, report = q.state, q.report
            if group.is_main:
                state.save(args.run_dir)
        # every rank leaves together, after rank 0 saved: CI once saw rank 0 abort (std::terminate) between
        # training and teardown while rank 1 had already gone on to destroy its gloo connections
        group.barrier()
    finally:
        shutdown(group)
    if not group.is_main:
        return 0
    if q.folder is not None:  # read one decoder layer at a time: no end-to-end steps
        how = "trained block by block" if cfg.blockwise else "calibrated"
        emit(args, f"{how} {len(state.scales)} activation scales layer by layer ({state.training['calib_windows']} "
                   f"windows of {state.training['seq_len']} tokens, profile {state.profile}) -> {args.run_dir}",
             {"run_dir": str(args.run_dir), "profile": state.profile, "modules": len(state.scales), **state.training})
        return 0
    factors = sum(v.size for v in state.smooth.values())
    what = f"{len(state.scales)} activation scales"
    if factors:
        what += f" and {factors} smoothing factors" if cfg.smooth_learn else f" ({factors} smoothing factors folded)"
    if state.rotation:
        blocks = sorted(set(state.rotation.values()))
        what += f", {len(state.rotation)} inputs rotated (Hadamard blocks of {'/'.join(map(str, blocks))})"
    data, heldout = state.training["data"], state.training.get("heldout")
    on = f" on {group.world} processes (global batch {cfg.batch_size * group.world})" if group.world > 1 else ""
    bw = state.training.get("blockwise")
    how = f"in {report.steps} steps{on} ({report.tokens} tokens, {report.wall_s:.1f} s)"
    if bw:
        how = (f"block by block ({bw['blocks']} blocks x {bw['steps_per_block']} steps, {bw['wall_s']:.0f} s; mean "
               f"reconstruction error {bw['error_ptq_mean']:.2e} calibrated -> {bw['error_trained_mean']:.2e} trained)"
               + (f", then {how} end to end" if report.steps else ""))
    summary = (f"trained {what} ({cfg.objective} objective, profile {state.profile}) {how} on {record_text(data)} "
               f"({data['windows']} windows) -> {args.run_dir}")
    if heldout:
        first = "after the block-wise pass" if bw else "after calibration"
        summary += (f"\nheld-out validation perplexity ({heldout['windows']} windows of {heldout['seq_len']} tokens never "
                    f"trained on): float {heldout['float_ppl']:.3f}, {first} {heldout['ptq_ppl']:.3f}, "
                    f"after training {heldout['trained_ppl']:.3f}")
    emit(args, summary,
         {"run_dir": str(args.run_dir), "profile": state.profile, "modules": len(state.scales), **report.summary(),
          "objective": cfg.objective, "smoothing_factors": factors, "smooth_alpha": state.method.get("smooth_alpha"),
          "rotated": len(state.rotation), "data": data, "heldout": heldout, "processes": group.world,
          "global_batch": cfg.batch_size * group.world,
          "dtype": state.training["weights_dtype"], "gradient_checkpointing": args.gradient_checkpointing})
    return 0


main = entry("sasq-train", _train)

if __name__ == "__main__":  # accelerate launch -m sasq_edge.cli.train / torchrun -m sasq_edge.cli.train
    sys.exit(main())
