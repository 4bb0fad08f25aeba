"""Train a diffusion model on points, then evaluate it. Top to bottom, nanoGPT style:
settings -> data, model, optimizer -> training loop -> evaluation.

    python train.py --dataset dino                          # tinydiff defaults
    python train.py --dataset dino --attn_layers 2 --heads 4
    python train.py --dataset moons --preset paper          # the study's code path
    python train.py --dataset dino --resume                 # continue out/dino-base
    torchrun --standalone --nproc_per_node=2 train.py --dataset dino   # data-parallel (DDP)

Under torchrun every process draws the same global batch (--batch_size) and takes its own share of
the rows; rank 0 alone logs, writes checkpoints and evaluates.
"""

import glob
import math
import os
import sys
import time
from dataclasses import asdict

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.optim.swa_utils import AveragedModel

import datasets
import evaluate
import plots
import runs
import settings
import tinydiff as td
from runs import fail, quote

# -----------------------------------------------------------------------------
# data, model and optimizer


def check_data(args, data_file, device):
    """Read the points and check what depends on them (their count, range and the memory the flags
    need); returns the points, the DenoiserConfig and the NoiseScheduler's settings."""
    try:
        data = runs.run_data(data_file, args)
        X, K = data.points, len(data.names) if data.kind == "labels" else 0
        cfg = td.DenoiserConfig(
            attn_layers=args.attn_layers,
            heads=args.heads,
            ssm_layers=args.ssm_layers,
            hidden=args.hidden,
            block=args.block,
            coord_scale=args.coord_scale,
            data_dim=X.shape[1],
            num_classes=K,
            cond_dim=len(data.names) if data.kind == "numbers" else 0,
        )
        sched_cfg = dict(
            num_train_timesteps=args.num_timesteps,
            beta_schedule=args.beta_schedule,
            prediction_type=args.prediction_type,
        )
        runs.check_flag_memory(
            "--hidden", args.hidden, 16 * runs.param_bound(cfg), device
        )  # weights, gradients and AdamW's two moments
        model = td.Denoiser(cfg)
        runs.check_flag_memory(
            "--batch_size",
            args.batch_size,
            args.batch_size * runs.activation_bytes_per_row(model, td.NoiseScheduler(**sched_cfg), X),
            device,
        )
        runs.check_flag_memory("--n", args.n, args.n * X.shape[1] * 64, device)
    except ValueError as e:
        fail(str(e))
    if len(X) <= evaluate.KNN_K:
        fail(
            f"{data_file} holds {len(X)} point{'s' * (len(X) != 1)}; scoring a model needs more than {evaluate.KNN_K}"
            f" (the kNN KL compares each point with its {evaluate.KNN_K} nearest neighbours); give more points"
        )
    with np.errstate(over="ignore"):  # the overflow is the finding, said in one line below
        beyond = not np.isfinite(X.astype(np.float32)).all()
    if beyond:
        fail(f"{data_file} holds values beyond float32's range (|x| up to {np.abs(X).max():.3g}); rescale the data")
    try:
        runs.check_nll(data_file, data, args.nll, args.holdout)
    except ValueError as e:
        fail(str(e))
    if data.note:
        print(f"note: {data.note}", file=sys.stderr)
    return data, cfg, sched_cfg


def check_compile(device):
    """torch.compile a tiny function now, so that a missing C++ compiler is said before the run starts."""
    try:
        torch.compile(lambda x: x * 2 + 1)(torch.ones(4, device=device))
    except Exception as e:
        reason = " ".join(str(e).split())[:120]
        fail(
            f"--compile does not work here ({type(e).__name__}: {reason}); install a C++ compiler (g++) or run "
            "without --compile"
        )


# -----------------------------------------------------------------------------
# the run folder: start, resume, or refuse


def open_run(args, given):
    """Claim --out_dir and decide what the run is: a new one (the folder's old run replaced only with
    --overwrite) or a resumed one, whose settings come from its checkpoint. Returns (lock, checkpoint or None)."""
    ckpt_path = os.path.join(args.out_dir, "ckpt.pt")
    if (args.resume or args.auto_resume) and args.overwrite:
        fail("--resume continues the run in --out_dir and --overwrite replaces it; give one of them")
    if args.auto_resume:
        args.resume = os.path.isfile(ckpt_path)
    if args.resume and not os.path.isfile(ckpt_path):
        fail(
            f"--resume found no checkpoint at {quote(ckpt_path)}; run without --resume to start, or point --out_dir "
            "at the run"
        )
    lead = runs.launch()[1] == 0  # under torchrun, rank 0 holds the folder
    lock = runs.claim_run_dir(args.out_dir) if lead else None
    if not args.resume:
        old = [f for f in runs.RUN_FILES if os.path.isfile(os.path.join(args.out_dir, f))] if lead else []
        if old and not args.overwrite:
            fail(
                f"{quote(args.out_dir)} already holds a run ({', '.join(old)}); continue it with --resume, replace it "
                "with --overwrite, or choose another --out_dir"
            )
        return lock, None
    try:
        ckpt = runs.load_checkpoint(ckpt_path)
    except runs.CheckpointError as e:
        fail(str(e))
    finished = ckpt["step"] >= ckpt["args"]["train_steps"] and os.path.isfile(
        os.path.join(args.out_dir, "metrics.json")
    )
    if finished and ("train_steps" not in given or args.train_steps <= ckpt["step"]):
        if args.auto_resume:  # the flags given must still agree with the run's, as for a run to continue
            take_settings_from(ckpt, args, given - {"train_steps"}, ckpt_path, announce=False)
            print(f"{args.out_dir} is finished ({ckpt['step']} steps); nothing to do")
            sys.exit(0)
        fail(
            f"{quote(args.out_dir)} is already finished ({ckpt['step']} steps); pass a larger --train_steps to train "
            "it further"
        )
    take_settings_from(ckpt, args, given, ckpt_path)
    return lock, ckpt


def take_settings_from(ckpt, args, given, ckpt_path, announce=True):
    """--resume: flags not given take the checkpoint's value; a given run flag must agree with it, compared
    after both went through settings.fill_preset, so that the command that made the run always resumes it."""
    saved = ckpt["args"]
    for k in settings.RUN_KEYS + settings.KEPT:
        if k not in given:
            setattr(args, k, saved[k])
    settings.fill_preset(args)
    for k in sorted(given & set(settings.RUN_KEYS) - set(settings.RESUME_FREE)):
        if k == "dataset" and os.path.abspath(args.dataset) == ckpt["data"].get("path"):
            args.dataset = saved[k]  # the same file, named from another folder
        elif getattr(args, k) != saved[k]:
            fail(
                f"--{k} {getattr(args, k)} differs from this run's {saved[k]} (in {quote(ckpt_path)}); a resumed run "
                "keeps its settings: "
                f"drop the flag, or start a new run with --overwrite or another --out_dir"
            )
    if args.train_steps < saved["train_steps"]:
        fail(
            f"--train_steps {args.train_steps} is below this run's {saved['train_steps']}; a run can be extended, not "
            "shortened"
        )
    unused = {
        "label_column": None,
        "cond_columns": None,
        "conditional": False,
    }  # a run without a condition: not worth a word
    unused.update(p_uncond=args.p_uncond if not (args.conditional or args.label_column or args.cond_columns) else None)
    unused.update(holdout=args.holdout if args.dataset in datasets.DATASETS else None)
    if not announce:
        return
    print(
        f"resuming {ckpt_path} at step {ckpt['step']} of {args.train_steps}; from the checkpoint: "
        + ", ".join(
            f"{k} {getattr(args, k)}"
            for k in settings.RUN_KEYS
            if k not in given and unused.get(k, "-") != getattr(args, k)
        )
    )
    if args.train_steps > saved["train_steps"]:
        print(
            f"extending the run from {saved['train_steps']} to {args.train_steps} steps: the cosine schedule is "
            "stretched to the new end"
        )


def clear_old_outputs(args, ckpt):
    """Outputs that no longer describe the run: a replaced run's files (--overwrite), or an extended run's results."""
    try:
        remove_old_outputs(args, ckpt)
    except OSError as e:  # a read-only folder, say: nothing new was written yet
        fail(
            f"cannot remove {quote(e.filename or args.out_dir)} ({e.strerror or e}); make {quote(args.out_dir)} "
            "writable, or train the run elsewhere with another --out_dir"
        )


def remove_old_outputs(args, ckpt):
    folder = glob.escape(args.out_dir)
    drawn = sorted(glob.glob(os.path.join(folder, "samples-*")))  # sample.py's files
    if ckpt is None:
        for f in [os.path.join(args.out_dir, f) for f in runs.RUN_FILES] + drawn:
            if os.path.isfile(f):
                os.remove(f)
        if drawn:
            print(f"note: removed sample.py's {', '.join(map(os.path.basename, drawn))}, drawn from the replaced run")
    elif args.train_steps > ckpt["args"]["train_steps"]:
        if os.path.isfile(os.path.join(args.out_dir, "metrics.json")):
            os.remove(os.path.join(args.out_dir, "metrics.json"))
        if drawn:
            print(
                f"note: {', '.join(map(os.path.basename, drawn))} in {args.out_dir} were drawn at step {ckpt['step']}; "
                "rerun sample.py once the extended run is done"
            )


def check_same_data(args, ckpt, data, data_file):
    """--resume trains on the points the run was trained on, or refuses."""
    have, want = data.fingerprint, ckpt["data"]
    meaning = "meaning" in want and have.get("meaning") != want["meaning"]  # class or column names renamed
    if have["shape"] != want["shape"] or have["sha256"] != want["sha256"] or meaning:
        shapes = lambda s: f"{s[0]} points of {s[1]} coordinate{'s' * (s[1] != 1)}"
        what = (
            f"{shapes(want['shape'])} then, {shapes(have['shape'])} now"
            if have["shape"] != want["shape"]
            else "the same shape, other values"
            if have["sha256"] != want["sha256"]
            else "the same values, other class or column names"
        )
        fail(
            f"{quote(data_file)} has changed since this run was trained on it ({what}); restore the file, "
            "or train a new run on it with --overwrite or another --out_dir"
        )


# -----------------------------------------------------------------------------
# the pieces of training


def lr_lambda(warmup, total):
    """Linear warm-up, then cosine annealing to 0 over the rest of the run."""

    def f(step):
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))

    return f


def ema_update(decay, every, warmup):
    """AveragedModel's update rule, called every `every` steps (n = updates so far, so the update
    of step s = n * every). warmup = 0: a constant decay. warmup > 0: the study's EMA (ema_pytorch
    with update_after_step=warmup, inv_gamma=1, power=2/3): copy the weights while s <= warmup, then
    decay by min(decay, 1 - (1 + s - warmup)^(-2/3)), which reaches 0.995 near s = 2,900 for warmup 100."""

    @torch.no_grad()
    def update(ema_params, params, n):
        s = int(n) * every
        d = decay if warmup == 0 else 0.0 if s <= warmup else min(decay, 1 - (1 + s - warmup) ** (-2 / 3))
        for e, p in zip(ema_params, params):
            e.lerp_(p, 1 - d)

    return update


def sub_seed(seed, k):
    """A seed of its own for the k-th stream of a run (an epoch's order, a resume on another device)."""
    return (seed * 1_000_003 + k) % 2**63


class EpochBatches:
    """The study's batches: shuffled passes over the data without replacement (a DataLoader with
    shuffle=True), the last batch of each pass short. A function of the step alone, so resuming
    draws the same rows."""

    def __init__(self, n, batch_size, seed):
        self.n, self.batch_size, self.seed, self.epoch, self.perm = n, batch_size, seed, None, None

    def rows(self, step):
        epoch, j = divmod(step, -(-self.n // self.batch_size))  # ceil(n / batch) batches per pass
        if epoch != self.epoch:
            self.epoch = epoch
            self.perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(sub_seed(self.seed, epoch)))
        return self.perm[j * self.batch_size : (j + 1) * self.batch_size]


def init_ddp(args, device):
    """Under torchrun (WORLD_SIZE > 1): join the process group (gloo on CPU, nccl on CUDA) and return
    (rank, world size, this process's device); alone: (0, 1, device)."""
    world, rank, local = runs.launch()
    if world == 1:
        return 0, 1, device
    if args.batch_size % world:
        fail(f"--batch_size {args.batch_size} does not split over {world} processes; use a multiple of {world}")
    backend = "nccl" if device.type == "cuda" else "gloo"
    if not dist.is_available() or not dist.is_backend_available(backend):
        fail(f"this torch has no {backend} backend for data-parallel training on {device.type}; run without torchrun")
    if device.type == "cuda":
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    elif device.type != "cpu":
        fail(f"data-parallel training runs on cpu or cuda, not {device.type}; pass --device cpu")
    dist.init_process_group(backend)
    if rank:
        sys.stdout = open(os.devnull, "w")  # rank 0 alone logs
    return rank, world, device


class Run:
    """Everything one training run holds: settings, data, model, EMA, optimizer, and progress."""

    def __init__(self, args, data, cfg, sched_cfg, device, rank=0, world=1):
        self.args, self.data, self.cfg, self.sched_cfg, self.device, self.rank, self.world = (
            args,
            data,
            cfg,
            sched_cfg,
            device,
            rank,
            world,
        )
        X = self.X = data.points
        self.ckpt_path = os.path.join(args.out_dir, "ckpt.pt")
        torch.manual_seed(args.seed)
        # float64 where the device has it: points far from the origin are standardised before any cast
        self.points = torch.as_tensor(X, dtype=torch.float32 if device.type == "mps" else torch.float64, device=device)
        numbers = (
            torch.float32 if device.type == "mps" else torch.float64
        )  # conditions, like points, are standardised in float64
        self.cond = (
            None
            if data.cond is None
            else torch.as_tensor(data.cond, dtype=torch.long if data.kind == "labels" else numbers, device=device)
        )
        self.model = td.Denoiser(cfg).to(device)
        # a user's file is standardized inside the model (named datasets keep the study's coordinates); prior data:
        # start from the data's moments
        self.model.set_data_stats(
            X, data.cond, standardize=args.dataset not in datasets.DATASETS, moments=args.prior == "data"
        )
        self.scheduler = td.NoiseScheduler(**sched_cfg).to(device)
        self.ema = AveragedModel(self.model, multi_avg_fn=ema_update(args.ema_decay, args.ema_every, args.ema_warmup))
        self.epochs = EpochBatches(len(X), args.batch_size, args.seed) if args.batches == "epochs" else None
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=args.lr, fused=device.type in ("cuda", "cpu"))
        self.schedule = lr_lambda(args.warmup_steps, args.train_steps)
        self.lr_sched = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self.schedule)
        self.gen = torch.Generator(device=device).manual_seed(args.seed)  # batches, timesteps and noise
        self.step, self.losses, self.train_time, self.curve, self.saved_step = 0, [], 0.0, [], None
        self.curve_eval = None  # the KL during training (--eval_interval), made in restore for a run that recorded one
        if args.eval_interval:
            self.curve_eval = evaluate.CurveEval(data, args.dataset, device)
        net = DistributedDataParallel(self.model) if world > 1 else self.model
        self.net = torch.compile(net) if args.compile else net  # what the training step calls

    def restore(self, ckpt):
        """Continue from a checkpoint: weights, EMA, optimizer, LR schedule, RNG states and progress."""
        try:
            self.model.load_state_dict(ckpt["model"])
            self.ema.module.load_state_dict(ckpt["ema"])
            self.ema.n_averaged.fill_(ckpt["ema_n_averaged"])
            self.optimizer.load_state_dict(ckpt["optimizer"])
            self.lr_sched.load_state_dict(ckpt["lr_scheduler"])
            torch.set_rng_state(ckpt["rng"]["torch"])
            self.step, self.losses, self.train_time, self.curve = (
                ckpt["step"],
                ckpt["losses"],
                ckpt["train_time"],
                ckpt["curve"],
            )
            if ckpt["rng"]["device"] == self.device.type:
                self.gen.set_state(ckpt["rng"]["gen"])
            # another kind of device, whose generator state has another form: a stream of its own for this seed and step
            else:
                self.gen.manual_seed(sub_seed(self.args.seed, self.step))
                print(
                    f"note: {self.ckpt_path} was saved on {ckpt['rng']['device']}, whose random-generator state "
                    f"{self.device.type} "
                    "cannot use; the run goes on with a new random stream (from --seed and the step)"
                )
        except (KeyError, TypeError, ValueError, RuntimeError) as e:
            fail(
                f"{quote(self.ckpt_path)} does not hold a complete training state ({type(e).__name__}: "
                f"{' '.join(str(e).split())[:80]}); "
                "start a new run with --overwrite"
            )
        for group, base in zip(
            self.optimizer.param_groups, self.lr_sched.base_lrs
        ):  # the schedule's value now (differs only when extended)
            group["lr"] = base * self.schedule(self.step)
        if self.curve and self.curve_eval is None:  # its floor goes into metrics.json
            self.curve_eval = evaluate.CurveEval(self.data, self.args.dataset, self.device)
        self.saved_step = self.step

    def save(self, data_path):
        state = dict(
            args=vars(self.args),
            model_config=asdict(self.cfg),
            scheduler_config=self.sched_cfg,
            data=dict(path=data_path, **self.data.fingerprint),
            condition=dict(kind=self.data.kind, names=self.data.names),
            step=self.step,
            model=self.model.state_dict(),
            ema=self.ema.module.state_dict(),
            ema_n_averaged=int(self.ema.n_averaged),
            optimizer=self.optimizer.state_dict(),
            lr_scheduler=self.lr_sched.state_dict(),
            rng=dict(torch=torch.get_rng_state(), gen=self.gen.get_state(), device=self.device.type),
            losses=self.losses,
            train_time=self.train_time,
            curve=self.curve,
        )
        if self.rank == 0:
            try:
                runs.save_checkpoint(state, self.ckpt_path)
            except runs.DivergedError as e:
                kept = f"step {self.saved_step}'s checkpoint is kept" if self.saved_step is not None else "none saved"
                fail(
                    f"the run diverged before step {self.step} ({e}); {kept} in {quote(self.ckpt_path)}; start again "
                    f"with a lower --lr (now {self.args.lr:g}) and --overwrite",
                    code=1,
                )
            except OSError as e:
                fail(
                    f"could not write {quote(self.ckpt_path)} ({e.strerror or e}); free some space, then rerun with "
                    "--resume (the last checkpoint is intact)"
                )
        self.saved_step = self.step

    def batch_loss(self):
        """One batch's loss on this process's share of the rows. Every process draws the whole batch's
        rows, timesteps and noise, so that any number of processes trains the weights one would."""
        a = self.args
        rows = (
            self.epochs.rows(self.step).to(self.device)
            if self.epochs
            else torch.randint(0, len(self.points), (a.batch_size,), device=self.device, generator=self.gen)
        )
        x0 = self.points[rows]
        t = td.sample_timesteps(len(x0), a.num_timesteps, a.low_t, a.low_frac, generator=self.gen, device=self.device)
        noise = torch.randn(x0.shape, generator=self.gen, device=self.device)
        share = slice(self.rank * len(x0) // self.world, (self.rank + 1) * len(x0) // self.world)
        y = drop = None
        if self.cond is not None:  # the whole batch's condition dropout, drawn like t and noise
            y, drop = (
                self.cond[rows][share],
                (torch.rand(len(x0), generator=self.gen, device=self.device) < a.p_uncond)[share],
            )
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=a.dtype == "bf16"):
            loss = td.ddpm_loss(
                self.net, self.scheduler, x0[share], t[share], noise[share], y, drop=drop, weighting=a.loss_weighting
            )
        if self.world == 1:
            return loss
        # this share's part of the batch mean; DDP averages gradients over processes, hence * world
        return loss * (share.stop - share.start) / len(x0) * self.world


# -----------------------------------------------------------------------------
# training loop


def train_loop(run, stop, data_path):
    args = run.args
    run.model.train()
    t_log, step_at_log = time.perf_counter(), run.step
    stop.active = True
    while run.step < args.train_steps:
        if stop_requested(run, stop):  # a signal: save at this step boundary, then stop
            run.save(data_path)
            fail(
                f"stopped by {stop.name} at step {run.step}; saved {run.ckpt_path}; continue with: "
                f"python train.py --out_dir {quote(args.out_dir)} --resume",
                code=128 + stop.signum,
                together=True,
            )
        t0 = time.perf_counter()
        loss = run.batch_loss()
        run.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(run.model.parameters(), args.grad_clip)
        loss_val = batch_mean(run, loss)
        if not (math.isfinite(loss_val) and math.isfinite(grad_norm.item())):  # stop before the bad update
            kept = (
                f"the last good checkpoint (step {run.saved_step}) is kept in {run.ckpt_path}"
                if run.saved_step is not None
                else "no checkpoint was written"
            )
            fail(
                f"the run diverged at step {run.step} (loss {loss_val:.4g}, grad norm {grad_norm.item():.4g}); start "
                "again with a lower --lr "
                f"(now {args.lr:g}) and --overwrite; {kept}",
                code=1,
            )
        run.optimizer.step()
        run.lr_sched.step()
        if run.step % args.ema_every == 0:
            run.ema.update_parameters(run.model)
        run.losses.append(loss_val)
        run.step += 1
        run.train_time += time.perf_counter() - t0
        if run.step % args.log_interval == 0 or run.step == args.train_steps:
            ms = (time.perf_counter() - t_log) / (run.step - step_at_log) * 1e3
            print(
                f"step {run.step:6d} | loss {np.mean(run.losses[-args.log_interval :]):.4f} | lr "
                f"{run.lr_sched.get_last_lr()[0]:.2e} | "
                f"{ms:.2f} ms/step | ETA {ms * (args.train_steps - run.step) / 1e3:.0f}s",
                flush=True,
            )
            t_log, step_at_log = time.perf_counter(), run.step
        if (
            args.eval_interval
            and run.rank == 0
            and (run.step % args.eval_interval == 0 or run.step == args.train_steps)
        ):
            t_eval = time.perf_counter()
            run.curve.append(
                dict(
                    step=run.step,
                    train_time_s=run.train_time,
                    knn_kl_bits=run.curve_eval(run.ema.module, run.scheduler),
                )
            )
            t_log += time.perf_counter() - t_eval  # the log's ms/step counts training only
        if run.step % args.ckpt_interval == 0 or run.step == args.train_steps:
            run.save(data_path)
    if stop_requested(
        run, stop
    ):  # a signal during the last save, on any process: the run is saved; stop before evaluating
        stop.active = False
        fail(
            f"stopped by {stop.name} after the last step; saved {run.ckpt_path}; evaluate it with: "
            f"python train.py --out_dir {quote(args.out_dir)} --resume",
            code=128 + stop.signum,
            together=True,
        )
    stop.active = False


def stop_requested(run, stop):
    """Whether any process was signalled: under torchrun every process stops at the same step."""
    if run.world == 1:
        return stop.signum is not None
    flag = torch.tensor([float(stop.signum or 0)], device=run.device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    stop.signum = stop.signum or int(flag.item()) or None
    return stop.signum is not None


def batch_mean(run, loss):
    """The whole batch's loss, for the log: the processes' shares summed (each share is already weighted)."""
    if run.world == 1:
        return loss.item()
    total = loss.detach() / run.world
    dist.all_reduce(total)
    return total.item()


# -----------------------------------------------------------------------------
# evaluation with the EMA weights: the study's columns, plus the floors of both KL metrics


def final_eval(run, axis_names):
    args, out = run.args, lambda name: os.path.join(args.out_dir, name)
    model_ema, device, data = run.ema.module.eval(), run.device, run.data
    n_params = sum(p.numel() for p in run.model.parameters())
    steps = runs.sampler_steps(args.sampler, args.sample_steps, args.num_timesteps)
    samples, cond, metrics = evaluate.score(
        model_ema,
        run.scheduler,
        data,
        args.dataset,
        args.n,
        device,
        guidance=args.guidance,
        nll=args.nll,
        sampler=args.sampler,
        steps=steps,
    )
    if args.eval_loss == "raw-train":  # the study's: the raw model over one pass of the training points
        metrics["eval_loss"] = evaluate.eval_loss(
            run.model.eval(), run.scheduler, data.points, data.cond, device, batch_size=args.batch_size
        )
    config = runs.config_name(**vars(args))
    metrics.update(
        train_time_s=run.train_time,
        ms_per_step=run.train_time / max(1, len(run.losses)) * 1e3,
        dataset=args.dataset,
        config=config,
        params=n_params,
        alpha_bar_T=run.scheduler.alpha_bar_T,
        device=str(device),
        threads=args.threads,
        args=vars(args),
        condition=dict(kind=data.kind, names=data.names),
    )
    if args.dataset not in datasets.DATASETS:
        metrics["holdout"] = 0 if data.held is None else len(data.held)
    title = f"{args.dataset} · {config} · {args.preset} preset" + (
        f" · w={args.guidance:g}" if args.guidance != 1 else ""
    )
    if run.curve:
        metrics.update(curve=run.curve, curve_floor=run.curve_eval.floor, curve_samples=evaluate.CURVE_N)
        if run.curve_eval.density:  # else every point is NaN, and the warning says why
            runs.write_or_fail(out("kl.png"), lambda f: plots.plot_curve(run.curve, run.curve_eval.floor, f, title))
    runs.write_or_fail(out("samples.npy"), lambda f: np.save(f, samples))
    if cond is not None:
        runs.write_or_fail(
            out("samples_cond.npy" if data.kind == "numbers" else "samples_labels.npy"),
            lambda f: np.save(f, cond if data.kind == "numbers" else np.array(data.names)[cond]),
        )
    labelled = dict(data_labels=data.cond, sample_labels=cond, classes=data.names) if data.kind == "labels" else {}
    runs.write_or_fail(
        out("samples.png"),
        lambda f: plots.plot_samples(
            data.points, samples, f, plots.sample_title(title, metrics), axis_names, **labelled
        ),
    )
    if data.kind == "labels":
        runs.write_or_fail(
            out("guidance.png"), lambda f: plots.plot_guidance(model_ema, run.scheduler, data, device, f, title)
        )
    runs.write_or_fail(out("loss.png"), lambda f: plots.plot_loss(run.losses, f))
    runs.write_or_fail(
        out("metrics.json"), lambda f: f.write(runs.to_json(metrics).encode())
    )  # last: it marks the run finished
    print(f"\n{title} · {n_params:,} params · {args.train_steps} steps · batch {args.batch_size}")
    print(f"training time   {run.train_time:8.1f} s   ({metrics['ms_per_step']:.2f} ms/step)")
    print(f"inference time  {metrics['inference_s']:8.2f} s   ({args.n} samples, {args.sampler})")
    print(evaluate.format_table({k: v for k, v in metrics.items() if k != "inference_s"}))
    for w in metrics.get("warnings", []):
        print(f"warning: {w}", file=sys.stderr)
    print(f"wrote {args.out_dir}/: " + " ".join(f for f in runs.RUN_FILES if os.path.isfile(out(f))))
    return metrics


# -----------------------------------------------------------------------------
# main: settings -> run folder -> data, model, optimizer -> loop -> evaluation


@runs.script
def main(argv=None):
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    settings.check_aliases(argv)
    args, given = settings.get_parser().parse_args(argv), runs.given_flags(argv)
    args.out_dir = args.out_dir or settings.default_out_dir(args)
    settings.fill_preset(args)
    runs.check_launch()
    device = runs.pick_device(args.device)
    lock, ckpt = open_run(args, given)
    try:  # every setting, the command line's or a resumed run's, is checked once here, before any work
        settings.check_flags(args)
        settings.check_condition_flags(args, given)
        data_file = (
            runs.run_dataset(ckpt) if ckpt else args.dataset
        )  # a resumed run's file where it was trained, from any folder
        data, cfg, sched_cfg = check_data(args, data_file, device)
        if ckpt:
            check_same_data(args, ckpt, data, data_file)
        if args.compile:
            check_compile(device)
        world, last = runs.launch()[0], len(data.points) % args.batch_size
        if world > 1 and args.batches == "epochs" and 0 < last < world:  # a process would get no rows
            fail(
                f"each pass over the {len(data.points)} points ends in a batch of {last}, fewer rows than the {world} "
                "processes;"
                " choose a --batch_size that leaves none or at least that many, or --batches random"
            )
    except BaseException:  # a refusal or a defect: the folder this command made is not left behind
        if lock:
            lock.abandon()
        raise
    if "heads" in given and not args.attn_layers:
        print(
            "warning: --heads has no effect without --attn_layers (this run has no attention layers)", file=sys.stderr
        )
    axis_names = (
        data.columns if data.kind else datasets.column_names(data_file, data.points.shape[1])
    )  # a text file's header, for the plot's axes
    data_path = (
        None if data_file in datasets.DATASETS else os.path.abspath(data_file)
    )  # for sample.py and --resume from elsewhere
    stop = runs.StopFlag()
    rank, world, device = init_ddp(args, device)
    if rank == 0:
        clear_old_outputs(args, ckpt)
    if device.type == "cpu":
        args.threads = args.threads or 1
        torch.set_num_threads(args.threads)

    run = Run(args, data, cfg, sched_cfg, device, rank, world)
    if ckpt is not None:
        run.restore(ckpt)
    held = f" (+{len(data.held)} held out)" if data.held is not None else ""
    n_names = len(data.names) if data.kind else 0
    condition = {"labels": f", {n_names} classes", "numbers": f", conditioned on {n_names} numbers"}
    n_params = sum(p.numel() for p in run.model.parameters())
    threads = f" ({args.threads} thread)" if device.type == "cpu" else ""
    low_t = f", {args.low_frac:.0%} of each batch at t < {args.low_t}" if args.low_frac > 0 else ""
    print(
        f"{args.dataset}: {len(data.points)} points{held}{condition.get(data.kind, '')} | "
        f"{runs.config_name(**vars(args))}: {n_params:,} params | device {device}{threads} | "
        f"T={args.num_timesteps} {args.beta_schedule}, alpha_bar_T={run.scheduler.alpha_bar_T:.3f}, prior {args.prior}"
        f"{low_t}{f' | {world} processes' if world > 1 else ''}",
        flush=True,
    )
    train_loop(run, stop, data_path)
    if world > 1:  # leave together: a rank that tears gloo down while the other still talks to it can abort
        dist.barrier()
        dist.destroy_process_group()
        if rank:
            return None
    try:
        metrics = final_eval(run, axis_names)
    except KeyboardInterrupt as e:  # the last checkpoint holds the finished run: say how to evaluate it
        raise KeyboardInterrupt(
            *e.args[:1], f"evaluate it with: python train.py --out_dir {quote(args.out_dir)} --resume"
        ) from None
    if lock:
        lock.close()
    return metrics


if __name__ == "__main__":
    main()
