"""One-off check behind the README's seed-8 paragraph: how much does re-estimating BatchNorm
statistics move a dense checkpoint's top-1 on the demo set's 200 validation images?

    python docs/results/tta/int8/seed8_bn_check.py /tmp/tta/s8/100mbit/none/checkpoints/epoch0004.pt

(the final checkpoint that ``bench tta --extra '--seed 8' --out /tmp/tta/s8`` leaves). One
process: the statistics are pooled exactly as ``recompute_batchnorm`` pools ranks and the model
is scored by the training application's own ``evaluate``, each with an identity allreduce. Output of the 2026-12-06 run: ``seed8_bn_check.txt``."""
import random
import sys

import torch

from hvd_rsgc.app import checkpoint as ckpt
from hvd_rsgc.app.config import Config
from hvd_rsgc.app.data import build_datasets
from hvd_rsgc.app.models import build_model
from hvd_rsgc.app.strategies import recompute_batchnorm
from hvd_rsgc.app.train import evaluate, model_input


class OneRank:
    Sum = Average = None

    def allreduce(self, t, op=None, name=None):
        return t

    def rank(self):
        return 0

    def size(self):
        return 1


def main(path: str) -> None:
    torch.set_num_threads(2)
    d = ckpt.load(path)
    cfg = Config.from_flat(d["config"])
    train, val, classes = build_datasets(cfg.data, cfg.run.seed)
    model = build_model(cfg.optim.model, len(classes), cfg.data.image_size)
    model.load_state_dict(d["model"])
    tx = model_input(torch.stack([train[i][0] for i in range(len(train))]), train, cfg)

    def top1() -> float:
        cm, _ = evaluate(model, val, cfg, OneRank(), len(classes))
        return cm.trace().item() / cm.sum().item()

    print(f"statistics saved by the run: top-1 {top1():.3f}")
    rng = random.Random(0)
    bs = cfg.optim.batch_size
    for batches in (16, (len(train) + bs - 1) // bs):
        accs = []
        for _ in range(5):
            idx = list(range(len(train)))
            rng.shuffle(idx)
            idx = idx[:batches * bs]
            recompute_batchnorm(model, (tx[idx[s:s + bs]] for s in range(0, len(idx), bs)), OneRank())
            accs.append(top1())
        print(f"re-estimated from {len(idx)} training images, 5 draws: "
              + " ".join(f"{a:.3f}" for a in accs))


if __name__ == "__main__":
    main(sys.argv[1])
