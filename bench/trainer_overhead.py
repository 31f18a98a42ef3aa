# Per-step bookkeeping of pid.training for a full-size network (CPU): EMA update, grad norm, optimizer
# step, and snapshot writes. Usage: python bench/trainer_overhead.py PRESET
import os, sys, time, torch
import edm_networks
from pid.training import checkpoint as ckpt
from pid.training.config import TrainConfig
from pid.training.ema import EMAs
from pid.training.optim import make_optimizer

def timed(fn, reps=5):
    fn()  # warm-up
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t) / reps

torch.manual_seed(0)
net = edm_networks.build_preset(sys.argv[1]).model
params = [p for p in net.parameters()]
for p in params:
    p.grad = torch.randn_like(p) * 1e-3
cfg = TrainConfig()
emas = EMAs(net, cfg.ema)
opt = make_optimizer(params, cfg)
n = sum(p.numel() for p in params)
rows = [("parameters", f"{n / 1e6:.1f} M")]
rows.append(("EMA update, 3 rates (ms)", f"{1e3 * timed(lambda: emas.update(net)):.0f}"))
rows.append(("global grad norm (ms)", f"{1e3 * timed(lambda: torch.nn.utils.get_total_norm([p.grad for p in params])):.0f}"))
rows.append(("RAdam step (ms)", f"{1e3 * timed(lambda: opt.step()):.0f}"))
state = {"step": 1, "student": net.state_dict(), "emas": emas.state_dict(), "optimizer": opt.state_dict()}
path = "/tmp/pid-bench-training-state.pt"
rows.append(("training-state write (s)", f"{timed(lambda: ckpt.write_training_state(path, state), 2):.2f}"))
rows.append(("training-state size (MB)", f"{os.path.getsize(path) / 1e6:.0f}"))
rows.append(("training-state read (s)", f"{timed(lambda: ckpt.read_training_state(path), 2):.2f}"))
spath = "/tmp/pid-bench-student.pt"
rows.append(("student checkpoint write, 3 EMAs (s)", f"{timed(lambda: ckpt.write_student_checkpoint(spath, {}, emas.state_dict(), '0.9999', 1), 2):.2f}"))
rows.append(("student checkpoint size (MB)", f"{os.path.getsize(spath) / 1e6:.0f}"))
print(f"| {sys.argv[1]} | |\n|---|---|")
for k, v in rows:
    print(f"| {k} | {v} |")
