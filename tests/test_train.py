"""train.py's pieces against independent references: the study's EMA rule and DataLoader batches."""

import pytest
import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

import runs
import settings
import tinydiff as td
import train


def ema_pytorch_reference(weights, beta=0.995, update_every=10, update_after_step=100, power=2 / 3):
    """ema_pytorch's EMA.update() called once per step, written as a loop from its definition:
    `step` counts earlier calls; act when step % update_every == 0; copy while step <= update_after_step;
    else lerp by 1 - decay with decay = clamp(1 - (1 + epoch)^-power, 0, beta), epoch = step + 1 - update_after_step -
    1."""
    ema = None
    for step, w in enumerate(weights):
        if step % update_every:
            continue
        if step <= update_after_step or ema is None:
            ema = w.clone()
            continue
        epoch = step - update_after_step
        decay = min(beta, max(0.0, 1 - (1 + epoch) ** -power))
        ema = ema + (1 - decay) * (w - ema)
    return ema


@pytest.mark.parametrize("n_steps", [5, 101, 350, 3000])
def test_study_ema_follows_ema_pytorch(n_steps):
    torch.manual_seed(0)
    weights = [torch.randn(3) for _ in range(n_steps)]
    model = torch.nn.Linear(3, 1, bias=False)
    avg = AveragedModel(model, multi_avg_fn=train.ema_update(0.995, 10, 100))
    for s, w in enumerate(weights):
        model.weight.data.copy_(w[None])
        if s % 10 == 0:
            avg.update_parameters(model)
    torch.testing.assert_close(avg.module.weight[0], ema_pytorch_reference(weights))


def test_constant_decay_equals_torch_ema():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    ours, ref = (
        AveragedModel(model, multi_avg_fn=fn) for fn in (train.ema_update(0.9, 1, 0), get_ema_multi_avg_fn(0.9))
    )
    for _ in range(20):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        ours.update_parameters(model)
        ref.update_parameters(model)
    for a, b in zip(ours.parameters(), ref.parameters()):
        assert torch.equal(a, b)


def test_epoch_batches_are_shuffled_passes_without_replacement():
    n, b = 1000, 256
    batches = train.EpochBatches(n, b, seed=3)
    per_epoch = [batches.rows(s) for s in range(4)]  # 256, 256, 256, 232
    assert [len(r) for r in per_epoch] == [256, 256, 256, 232]
    assert torch.equal(torch.cat(per_epoch).sort().values, torch.arange(n))  # every row once
    second = torch.cat([batches.rows(s) for s in range(4, 8)])
    assert torch.equal(second.sort().values, torch.arange(n)) and not torch.equal(second, torch.cat(per_epoch))
    resumed = train.EpochBatches(n, b, seed=3)  # a resumed run draws the same rows at the same step
    assert torch.equal(resumed.rows(6), batches.rows(6))


def test_library_defaults_are_the_tinydiff_preset_and_the_paper_preset_sets_the_study_values():
    import inspect

    import tinydiff as td

    preset, parser = settings.PRESETS["tinydiff"], settings.get_parser()
    cfg = td.DenoiserConfig()
    assert (cfg.coord_scale, cfg.block, cfg.hidden, cfg.heads) == (
        preset["coord_scale"],
        preset["block"],
        parser.get_default("hidden"),
        parser.get_default("heads"),
    )
    defaults = lambda f: {k: p.default for k, p in inspect.signature(f).parameters.items()}
    assert {k: defaults(td.sample_timesteps)[k] for k in ("low_t", "low_frac")} == dict(
        low_t=preset["low_t"], low_frac=preset["low_frac"]
    )
    sched = defaults(td.NoiseScheduler.__init__)
    assert (sched["num_train_timesteps"], sched["beta_schedule"]) == (preset["num_timesteps"], preset["beta_schedule"])
    # the paper preset builds the study's model and loss explicitly, whatever the library's defaults
    args = settings.fill_preset(parser.parse_args(["--preset", "paper", "--dataset", "moons"]))
    X, cfg, sched_cfg = train.check_data(args, "moons", torch.device("cpu"))
    assert (cfg.coord_scale, cfg.block, cfg.data_dim, args.low_frac, args.low_t) == (25.0, "relu", 2, 0.0, 0)
    assert sched_cfg == dict(num_train_timesteps=100, beta_schedule="linear", prediction_type="epsilon")


@pytest.mark.parametrize(
    "kw",
    [
        dict(),
        dict(attn_layers=2, heads=8),
        dict(ssm_layers=3),
        dict(ssm_layers=2, attn_layers=1, data_dim=8),
        dict(num_classes=10, hidden=64),
        dict(cond_dim=4, ssm_layers=1, ssm_dim=128, d_state=16),
        dict(hidden=1024, hidden_layers=6, block="relu"),
        dict(emb_dim=32, data_dim=20, ssm_layers=4),
    ],
)
def test_the_memory_check_bounds_the_parameters_it_does_not_build(kw):
    """runs.param_bound against the built model's own count: never below it (a refusal errs on the safe side), at most
    2x."""
    cfg = td.DenoiserConfig(**kw)
    real = sum(p.numel() for p in td.Denoiser(cfg).parameters())
    assert real <= runs.param_bound(cfg) <= 2 * real


def test_low_t_0_turns_oversampling_off_as_its_help_says():
    """Reference: the help's "0 = off"; both spellings of off are one written form, so a resume compares them equal."""
    parser = settings.get_parser()
    for flags in (["--low_t", "0"], ["--low_frac", "0"]):
        args = settings.fill_preset(parser.parse_args(["--dataset", "moons", *flags]))
        assert (args.low_t, args.low_frac) == (0, 0.0)
