"""Distillation methods, one package each; networks and teachers are the other axis (any method, any teacher).

* `pid.methods.pid` — Physics Informed Distillation (Tee et al. 2024): one-step student, residual objective.
* `pid.methods.mm` — Moment Matching (Salimans et al. 2024): k-step generator, auxiliary denoiser (Alg. 2).
"""
