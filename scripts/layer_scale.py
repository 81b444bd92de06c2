"""Per-layer stage-1 error relative to the size of what each layer must reproduce.

    .venv/bin/python scripts/layer_scale.py runs/reproduce-small/hedgehog
    .venv/bin/python scripts/layer_scale.py runs/reproduce-small/lolcats --rows 8 --json out.json

Stage-1's validation MSE is absolute: a layer whose softmax output is small scores a small MSE
however poorly it is matched. This takes the teacher of a run (its resolved config.yaml), runs
the first ``--rows`` rows of the run's own validation split through it, and reports for every
layer the mean square of the teacher's attention output (the per-head outputs, the target of
stage 1's MSE), beside the run's final per-layer validation MSE and their ratio: the share of the
output's energy left as error (0 = exact, 1 = as far off as predicting zeros).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from omegaconf import OmegaConf

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from linearize.config import Config, validate  # noqa: E402
from linearize.data import prepare_data  # noqa: E402
from linearize.models.load import load_teacher, load_tokenizer  # noqa: E402


def teacher_output_energy(model, ids: torch.Tensor) -> dict[int, float]:
    """Mean square of every layer's attention output before o_proj (all heads, all tokens)."""
    energy: dict[int, float] = {}
    hooks = [
        layer.self_attn.o_proj.register_forward_hook(
            lambda _m, inp, _out, i=i: energy.__setitem__(i, energy.get(i, 0.0) + inp[0].float().pow(2).mean().item())
        )
        for i, layer in enumerate(model.model.layers)
    ]
    try:
        with torch.no_grad():
            for row in ids:
                model(input_ids=row[None], use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    return {i: e / len(ids) for i, e in energy.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path, help="a run dir with config.yaml and transfer/result.json")
    parser.add_argument("--rows", type=int, default=4, help="validation rows to average over")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()

    result_path = args.run_dir / "transfer" / "result.json"
    if not result_path.is_file():
        sys.exit(f"{result_path} not found: give a run dir whose transfer stage has finished")
    mse = {int(i): v for i, v in json.loads(result_path.read_text())["val_mse_per_layer"].items()}
    cfg = validate(OmegaConf.merge(OmegaConf.structured(Config), OmegaConf.load(args.run_dir / "config.yaml")))
    tokenizer = load_tokenizer(cfg.model, cfg.cache_dir)
    val = prepare_data(cfg.data, tokenizer, cfg.data_dir, cfg.run.seed).val.input_ids[: args.rows]
    model = load_teacher(cfg.model, cache_dir=cfg.cache_dir, device=torch.device("cpu"))
    energy = teacher_output_energy(model, val)

    rows = [{"layer": i, "teacher_mean_square": energy[i], "val_mse": mse[i], "relative": mse[i] / energy[i]}
            for i in sorted(mse)]  # fmt: skip
    print(f"{args.run_dir} ({len(val)} val rows x {val.shape[1]} tokens)")
    print("layer  teacher mean square  val MSE   relative")
    for r in rows:
        print(f"{r['layer']:>5}  {r['teacher_mean_square']:>19.5f}  {r['val_mse']:.5f}  {r['relative']:>8.3f}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
