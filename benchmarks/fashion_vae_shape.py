"""Which latent shape lets a toy VAE keep Fashion-MNIST's detail? Two VAEs of the toy teacher's classes
trained side by side from the same seed for the same steps (MSE + 1e-6 KL, AdamW 1e-3, batch 32, one
thread each), then scored on their reconstructions of 1,000 t10k photos by the toy metrics (FD, FD-patch,
prompt accuracy, sharpness: the ceiling of any teacher built on that VAE).

    python benchmarks/fashion_vae_shape.py 8x8x8 500 &  python benchmarks/fashion_vae_shape.py 16x16x4 500

Each run prints its row and writes benchmarks/results/fashion_vae_shape_<shape>_<steps>.json.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

SHAPES = {"8x8x8": dict(latent_channels=8, vae_channels=(32, 64, 64)),  # the first Fashion teacher's
          "16x16x4": dict(latent_channels=4, vae_channels=(32, 64))}


def main(shape: str, steps: int) -> dict:
    import torch
    import torch.nn.functional as F

    from pipeline import metrics
    from pipeline.data import toy_dataset
    from pipeline.zoo import ToyModelConfig, build_components

    torch.set_num_threads(1)
    torch.manual_seed(0)
    vae = build_components(ToyModelConfig(**SHAPES[shape]), seed=0)["vae"].train()
    ds = toy_dataset("fashion_mnist")
    train, t10k = ds.load("train"), ds.load("heldout")
    opt = torch.optim.AdamW(vae.parameters(), lr=1e-3, weight_decay=0.0)
    g, t0 = torch.Generator().manual_seed(0), time.time()
    for step in range(steps):
        x = train.images[torch.randint(0, len(train.images), (32,), generator=g)]
        post = vae.encode(x).latent_dist
        loss = F.mse_loss(vae.decode(post.sample()).sample, x) + 1e-6 * post.kl().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if (step + 1) % 100 == 0:
            print(f"[vae {shape}] step {step + 1}/{steps} loss {loss.item():.4f} {time.time() - t0:.0f} s", flush=True)
    vae.eval()
    x = t10k.images[:1000]
    with torch.no_grad():
        rec = torch.cat([vae.decode(vae.encode(x[i:i + 250]).latent_dist.mean).sample
                         for i in range(0, len(x), 250)]).clamp(-1, 1)
    row = {"shape": shape, "steps": steps, "params": sum(p.numel() for p in vae.parameters()),
           "train_seconds": round(time.time() - t0, 1), "recon_mse": round(float(((rec - x) ** 2).mean()), 4),
           **{k: round(v, 3) for k, v in metrics.score(rec, torch.as_tensor(t10k.labels[:1000]),
                                                        dataset="fashion_mnist").items()}}
    print(json.dumps(row), flush=True)
    out = REPO / "benchmarks" / "results" / f"fashion_vae_shape_{shape}_{steps}.json"
    out.write_text(json.dumps(row, indent=2) + "\n")
    return row


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] not in SHAPES:
        sys.exit(f"usage: python benchmarks/fashion_vae_shape.py {{{','.join(SHAPES)}}} STEPS")
    main(sys.argv[1], int(sys.argv[2]))
