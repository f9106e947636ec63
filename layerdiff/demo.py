"""The end-to-end demo on the embedded default (README command 1).

Runs the same recipe a user would run with ``train.py``, plus the demo overlay:

1. builds the tiny SDXL-shaped model and the OpenMoji demo shards if they are missing;
2. validates the untrained transparency VAE (held-out alpha MSE, images at step 0);
3. trains it;
4. validates again (images at the last step) and exports the released-layout weights.

Extra command-line arguments override the recipe, as with ``train.py``::

    python -m layerdiff.demo --trainer.max_steps 100
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from layerdiff.cli import LayerdiffCLI
from layerdiff.export import save_transparent_vae

RECIPE = ["-c", "configs/transparent_vae.yaml", "-c", "configs/demo/transparent_vae.yaml"]
REQUIRED_IMPROVEMENT = 5.0


def run_demo(overrides: list[str]) -> int:
    started = time.perf_counter()
    cli = LayerdiffCLI(args=RECIPE + overrides, run=False)
    trainer, model, datamodule = cli.trainer, cli.model, cli.datamodule
    root = Path(trainer.default_root_dir)

    before = trainer.validate(model, datamodule=datamodule)[0]
    trainer.fit(model, datamodule=datamodule)
    after = trainer.validate(model, datamodule=datamodule)[0]
    export_paths = save_transparent_vae(
        model.transparent_encoder,
        model.transparent_decoder,
        root / "export",
        metadata=dict(model.hparams),
    )

    improvement = before["val/alpha_mse"] / max(after["val/alpha_mse"], 1e-12)
    summary = {
        "alpha_mse_before": before["val/alpha_mse"],
        "alpha_mse_after": after["val/alpha_mse"],
        "alpha_mse_improvement": improvement,
        "rgb_psnr_visible_after": after["val/rgb_psnr_visible"],
        "identity_psnr_after": after["val/identity_psnr"],
        "steps": trainer.global_step,
        "seconds": round(time.perf_counter() - started, 1),
    }
    (root / "demo_summary.json").write_text(json.dumps(summary, indent=2))

    print("\n== layerdiff demo: latent transparency on the embedded tiny SDXL ==")
    print(f"held-out alpha MSE   before {summary['alpha_mse_before']:.4f}  after {summary['alpha_mse_after']:.4f}"
          f"  ({improvement:.1f}x lower)")
    print(f"colour PSNR (visible pixels) after training: {summary['rgb_psnr_visible_after']:.2f} dB")
    print(f"identity PSNR (frozen decoder, adjusted vs plain latent): {summary['identity_psnr_after']:.2f} dB")
    print(f"pictures:      {root / 'images'}  (step 0 = before, step {trainer.global_step} = after)")
    print(f"checkpoints:   {root / 'checkpoints'}")
    print(f"export:        {', '.join(str(path) for path in export_paths)}")
    print(f"W&B (offline): {root / 'wandb'}   took {summary['seconds']} s")
    if improvement < REQUIRED_IMPROVEMENT:
        print(f"FAILED: alpha MSE improved only {improvement:.1f}x (expected at least {REQUIRED_IMPROVEMENT}x)")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(run_demo(sys.argv[1:]))
