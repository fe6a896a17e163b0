"""A plain PyTorch training loop, for checking what lctrun's trainer adds per step (README, "Mixed precision").

The network, SGD settings and data of experiments/mnist-cnn.yaml (cnn-small on MNIST, batch 128, lr 0.05,
Nesterov momentum 0.9, weight decay 5e-4, cosine schedule stepped per step), one epoch on 2 threads, with none
of lctrun's runtime, metrics or checks. Compare with `lctrun train experiments/mnist-cnn.yaml epochs=1` under
the same GLIBC_TUNABLES, alternating the two:

    LCTRUN_DATA=../shared/data .venv/bin/python scripts/plain_bp_loop.py [KEY=VALUE ...]
"""

import math
import sys
import time

import torch
import torch.nn.functional as F

from lctrun.config import load_experiment
from lctrun.data import load_data
from lctrun.models import build_model

torch.set_num_threads(2)
cfg = load_experiment("experiments/mnist-cnn.yaml", ["epochs=1", *sys.argv[1:]])
data = load_data(cfg.data, cfg.seed)
torch.manual_seed(cfg.seed)
model = build_model(cfg.model.name, data.num_classes, data.in_shape)
o = cfg.optim
params = model.parameters()
opt = torch.optim.SGD(params, lr=o.lr, momentum=o.momentum, nesterov=o.nesterov, weight_decay=o.weight_decay)
batch = cfg.data.batch_size
steps = math.ceil(len(data.train_y) / batch)
sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
mean, std = data.mean.view(-1, 1, 1), data.std.view(-1, 1, 1)
order = torch.randperm(len(data.train_y), generator=torch.Generator().manual_seed(cfg.seed))
model.train()
start = time.perf_counter()
for i in range(steps):
    idx = order[i * batch : (i + 1) * batch]
    x = (data.train_x[idx].float().div_(255) - mean).div_(std)
    loss = F.cross_entropy(model(x), data.train_y[idx])
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    sched.step()
seconds = time.perf_counter() - start
print(f"plain loop: {len(data.train_y) / seconds:.1f} samples/s ({seconds:.2f} s, {steps} steps)")
