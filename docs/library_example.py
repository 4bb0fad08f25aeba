"""tinydiff as a library, on your own points: any number of coordinates, any units.

    python docs/library_example.py

Trains the default denoiser on a 3-D swiss roll given in centimetres and offset by 5 m, then
draws 2,000 samples in the same units. Needs only torch and tinydiff.py.
"""
import math
import os
import sys

import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tinydiff.py, one folder up
import tinydiff as td  # noqa: E402

torch.set_num_threads(1)  # a model this small runs fastest on one CPU thread
torch.manual_seed(0)

# 1. data: any (N, D) tensor in its own units (here D = 3, centimetres)
t = 1.5 * math.pi * (1 + 2 * torch.rand(20_000))
x = 500 + 10 * torch.stack([t * torch.cos(t), 21 * torch.rand(20_000), t * torch.sin(t)], 1)

# 2. model: one token per coordinate. set_data_stats maps each coordinate to mean 0 and sd 2 inside
#    the model (the scale its settings were tuned at) and keeps the moments for the sampler's start
model = td.Denoiser(td.DenoiserConfig(data_dim=x.shape[1]))
model.set_data_stats(x)
scheduler = td.NoiseScheduler()  # T = 100, linear betas

# 3. AdamW with a cosine decay, and an EMA of the weights for sampling. Wrap after set_data_stats:
#    AveragedModel copies the model, its data statistics included
steps = 1000
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
lr_schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.995))

# 4. the loss loop: ddpm_loss takes points in data units
for step in range(steps):
    batch = x[torch.randint(0, len(x), (256,))]
    loss = td.ddpm_loss(model, scheduler, batch)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    lr_schedule.step()
    ema.update_parameters(model)
    if step % 250 == 0 or step == steps - 1:
        print(f"step {step:4d} | loss {loss.item():.4f}")

# 5. samples in data units, from the EMA weights (sample finds the Denoiser inside the wrapper)
samples = td.sample(ema, scheduler, 2000, sampler="dpm++", generator=torch.Generator().manual_seed(0))
print(f"samples {tuple(samples.shape)}, mean {samples.mean(0).round().tolist()} cm (data: {x.mean(0).round().tolist()} cm)")
# on the roll, the angle of (x1, x3) around the centre equals its radius (in units of 10 cm), modulo 2 pi
r, angle = ((samples[:, [0, 2]] - 500) / 10).norm(dim=1), torch.atan2(samples[:, 2] - 500, samples[:, 0] - 500)
gap = torch.remainder(angle - r + math.pi, 2 * math.pi) - math.pi
print(f"median distance from the roll, in radians: {gap.abs().median():.3f} (points spread at random: about {math.pi / 2:.2f})")
